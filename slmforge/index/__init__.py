"""Retrieval over the run's own documents: passages, a BM25 index (bm25s), dense (MiniLM) and hybrid indexes, recall@k.

`open_index(run, deployed=True)` loads the index a finished index stage made: `deployed` = training + held-out
passages (serving, open-book evaluation), else the training passages only (RAFT training data). Which retriever it
returns (Bm25Index, DenseIndex or HybridIndex, all with the same `search`/`search_many`) is the one the index stage was
built with (`index.retriever` in its manifest; runs made before the setting existed are BM25).
"""

from __future__ import annotations


def built_retriever(run) -> str:
    """The `index.retriever` the run's finished index stage was built with."""
    from slmforge.artifacts import INDEX

    return ((run.manifest(INDEX) or {}).get("config", {}).get("stage", {}) or {}).get("retriever", "bm25")


def open_index(source, deployed: bool = True):
    """`source`: a RunDir, or a stage's StageContext (whose reads are checked against what the stage declares)."""
    from slmforge.artifacts import BM25_ALL, BM25_TRAIN, DENSE_ALL, DENSE_TRAIN, HELDOUT_PASSAGES, PASSAGES
    from slmforge.index.bm25 import Bm25Index

    run = source.run if hasattr(source, "input") else source
    locate = source.input if hasattr(source, "input") else source.require
    passages = list(source.read(PASSAGES)) + (list(source.read(HELDOUT_PASSAGES)) if deployed else [])
    retriever = built_retriever(run)
    if retriever == "dense":  # no BM25 load: the dense index alone answers
        from slmforge.index.dense import DenseIndex

        return DenseIndex.load(_dense_path(source, DENSE_ALL if deployed else DENSE_TRAIN), passages)
    bm25 = Bm25Index.load(locate(BM25_ALL if deployed else BM25_TRAIN), passages)
    if retriever == "hybrid":
        from slmforge.index.dense import DenseIndex, HybridIndex

        return HybridIndex(bm25, DenseIndex.load(_dense_path(source, DENSE_ALL if deployed else DENSE_TRAIN), passages))
    return bm25


def _dense_path(source, art):
    """The embeddings folder. A stage that declares only the BM25 folders (generate, eval) still reads it: it is made
    by the same index stage, whose key (config with `retriever`, the model's hash) is already among that stage's
    inputs through the BM25 artifact it declares, so a changed dense index reruns it all the same."""
    if hasattr(source, "input"):
        declared = () if source.stage is None else (*source.stage.needs_for(source.recipe), *source.stage.uses_for(source.recipe))
        return source.input(art) if source.stage is None or art in declared else source.run.require(art)
    return source.require(art)
