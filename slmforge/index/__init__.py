"""Retrieval over the run's own documents: passages, a BM25 index (bm25s), search, recall@k.

`open_index(run, deployed=True)` loads the index a finished index stage made: `deployed` = training + held-out
passages (serving, open-book evaluation), else the training passages only (RAFT training data).
"""

from __future__ import annotations


def open_index(run, deployed: bool = True):
    from slmforge.artifacts import BM25_ALL, BM25_TRAIN, HELDOUT_PASSAGES, PASSAGES
    from slmforge.index.bm25 import Bm25Index

    passages = list(run.read(PASSAGES)) + (list(run.read(HELDOUT_PASSAGES)) if deployed else [])
    return Bm25Index.load(run.require(BM25_ALL if deployed else BM25_TRAIN), passages)
