"""Index stage: curated chunks -> retrieval passages, two BM25 indexes and (index.retriever dense/hybrid) their embeddings.

    PASSAGES          Passage rows of the training chunks        BM25_TRAIN  their index (RAFT data, real-question bench)
    HELDOUT_PASSAGES  Passage rows of the held-out chunks         BM25_ALL    training + held-out: what serving and
    INDEX_REPORT      counts, passage sizes                                    open-book evaluation search
    DENSE_TRAIN / DENSE_ALL   MiniLM embeddings of the same two passage sets (only when the retriever is dense or hybrid)
    (declared in slmforge/artifacts.py)

The training index never holds a held-out passage: RAFT prompts are built from it, so no held-out text reaches training.
The deployed index adds the held-out documents, as a deployed specialist's index would; the model never trained on them.
BM25 is always built (hybrid fuses it; it costs about a second), so `index.retriever` changes which index is searched.
"""

from __future__ import annotations

import statistics
import time

from slmforge.artifacts import (BM25_ALL, BM25_TRAIN, DENSE_ALL, DENSE_TRAIN, HELDOUT_CHUNKS, HELDOUT_PASSAGES, INDEX,
                                INDEX_REPORT, PASSAGES, TRAIN_CHUNKS)
from slmforge.index.bm25 import Bm25Index, passages_of
from slmforge.run import Stage, StageContext


class IndexStage(Stage):
    name = INDEX
    needs = (TRAIN_CHUNKS, HELDOUT_CHUNKS)
    makes = (PASSAGES, HELDOUT_PASSAGES, BM25_TRAIN, BM25_ALL, DENSE_TRAIN, DENSE_ALL, INDEX_REPORT)

    def external_inputs(self, recipe, run) -> dict[str, str]:
        if recipe.index.retriever == "bm25":
            return {}
        from slmforge.index.dense import model_hash

        return {"index/dense_model": model_hash()}  # other weights, other embeddings

    def run(self, ctx: StageContext) -> None:
        cfg = ctx.recipe.index
        train = passages_of(ctx.read(TRAIN_CHUNKS), cfg.passage_words)
        heldout = passages_of(ctx.read(HELDOUT_CHUNKS), cfg.passage_words)
        if not train:
            raise ValueError(f"{ctx.run.path(TRAIN_CHUNKS)} has no chunks: nothing to index")
        Bm25Index.build(train, cfg.stemmer, cfg.stopwords).save(ctx.path(BM25_TRAIN))
        Bm25Index.build(train + heldout, cfg.stemmer, cfg.stopwords).save(ctx.path(BM25_ALL))
        if cfg.retriever != "bm25":
            from slmforge.index.dense import DenseIndex

            start = time.perf_counter()
            cache = ctx.run.cache_dir("index-embeddings")
            dense = DenseIndex.build(train, progress=f"index: embedding {len(train):,} passages", cache=cache)
            dense.save(ctx.path(DENSE_TRAIN))
            dense.extended(heldout, progress=f"index: embedding {len(heldout):,} held-out passages",
                           cache=cache).save(ctx.path(DENSE_ALL))
            ctx.counts.update(embed_s=round(time.perf_counter() - start, 1), embed_dtype=dense.model.dtype)
        ctx.write(PASSAGES, train)
        ctx.write(HELDOUT_PASSAGES, heldout)
        words = [len(p.text.split()) for p in train + heldout]
        ctx.counts.update(passages=len(train), heldout_passages=len(heldout), documents=len({p.doc_id for p in train}),
                          median_words=statistics.median(words), max_words=max(words), retriever=cfg.retriever)
        ctx.write_json(INDEX_REPORT, {"counts": ctx.counts, "settings": cfg.model_dump(mode="json")})

    def summary_rows(self, c: dict) -> list[tuple[str, str]]:
        rows = [("passages (train / held-out)", f"{c['passages']:,} / {c['heldout_passages']:,}"),
                ("words per passage (median, max)", f"{c['median_words']:.0f}, {c['max_words']}")]
        if c.get("retriever", "bm25") != "bm25":
            rows.append((f"retriever {c['retriever']}: embedding", f"{c.get('embed_s', 0):.0f} s ({c.get('embed_dtype')})"))
        return rows
