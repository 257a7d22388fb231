"""Retrieval over the run's own documents: passages, a BM25 index (bm25s), search, recall@k.

`open_index(run, deployed=True)` loads the index a finished index stage made: `deployed` = training + held-out
passages (serving, open-book evaluation), else the training passages only (RAFT training data).
"""

from __future__ import annotations


def open_index(source, deployed: bool = True):
    """`source`: a RunDir, or a stage's StageContext (whose reads are checked against what the stage declares)."""
    from slmforge.artifacts import BM25_ALL, BM25_TRAIN, HELDOUT_PASSAGES, PASSAGES
    from slmforge.index.bm25 import Bm25Index

    locate = source.input if hasattr(source, "input") else source.require
    passages = list(source.read(PASSAGES)) + (list(source.read(HELDOUT_PASSAGES)) if deployed else [])
    return Bm25Index.load(locate(BM25_ALL if deployed else BM25_TRAIN), passages)
