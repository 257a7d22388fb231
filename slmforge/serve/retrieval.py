"""Retrieval in front of the served model: each chat request's last user message is searched in the run's deployed index
(training + held-out passages, `slmforge.index.open_index`), the top passages go into that message, and the answer
carries their citations.

    retrieval_prompt(question, hits, max_words)   the user message the model sees (RAFT training prompts use it too)
    Retrieval(index, k, max_words)                 what the app holds: search + the prompt, timed
    open_retrieval(recipe)                          the Retrieval `serve.retrieval` asks for, or None

The passages go in the user message, not a system message: RAFT fine-tuning shows the model a user message that starts
with the passages and ends with the question, so the served model sees the prompt it was trained on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

from slmforge.index.bm25 import context_of, passages_prompt

def retrieval_prompt(question: str, hits: Sequence, max_words: int | None = None) -> str:
    """The passages block, a blank line, then `Question: {question}` (`slmforge.index.bm25.passages_prompt`, which RAFT
    training rows use too); with no passages, the question as it is (the closed-book prompt)."""
    return passages_prompt(question, [h.passage for h in hits], max_words)


def shown(hits: Sequence, prompt: str) -> list:
    """The hits whose passage made it into `prompt` (the word budget may stop before the last ones)."""
    return [h for i, h in enumerate(hits, 1) if f"\n[{i}] {h.passage.citation} " in "\n" + prompt]


def citation(hit) -> dict:
    """What a response says about a passage: document, section, chunk and passage ids, BM25 score, rank, citation."""
    d = hit.as_dict()
    return {"document": d["source"], "section": d["section"], "title": d["title"], "doc_id": d["doc_id"],
            "chunk_id": d["chunk_id"], "passage_id": d["id"], "score": d["score"], "rank": d["rank"],
            "citation": d["citation"]}


@dataclass
class Retrieved:
    """What one request's retrieval did: the rewritten text, the passages shown, and how long it took."""

    text: str
    hits: list = field(default_factory=list)
    ms: float = 0.0

    def citations(self) -> list[dict]:
        return [citation(h) for h in self.hits]

    def info(self, k: int) -> dict:
        return {"k": k, "passages": len(self.hits), "ms": round(self.ms, 3)}


class Retrieval:
    """Top-`k` passages of `index` (anything with `.search(query, k)` giving slmforge.index Hits), at most `max_words`
    words of them in a prompt: the budget that keeps prompt + answer inside the model's context."""

    def __init__(self, index, k: int = 2, max_words: int | None = 240):
        self.index, self.k, self.max_words = index, k, max_words

    @property
    def size(self) -> int:
        return len(getattr(self.index, "passages", ()))

    def question(self, question: str, max_words: int | None = None) -> Retrieved:
        """A chat question -> the user message with its passages (`retrieval_prompt`), at most `max_words` words of
        them (default: this Retrieval's budget)."""
        started = time.perf_counter()
        hits = self.index.search(question, self.k) if question.strip() else []
        text = retrieval_prompt(question, hits, max_words or self.max_words)
        return Retrieved(text, shown(hits, text), (time.perf_counter() - started) * 1000)

    def prefix(self, prompt: str, max_words: int | None = None) -> Retrieved:
        """A plain completion prompt -> the passages block, a blank line, then the prompt as it was."""
        started = time.perf_counter()
        hits = self.index.search(prompt, self.k) if prompt.strip() else []
        context = context_of(hits, max_words or self.max_words)
        text = f"{context}\n\n{prompt}" if context else prompt
        return Retrieved(text, shown(hits, text), (time.perf_counter() - started) * 1000)

    def chat(self, messages: list[dict], max_words: int | None = None) -> Retrieved | None:
        """Rewrite the last user message of `messages` in place; None when there is no user message."""
        for m in reversed(messages):
            if m["role"] == "user":
                got = self.question(m["content"], max_words)
                m["content"] = got.text
                return got
        return None

    def apply(self, req, kind: str, fits=None) -> Retrieved | None:
        """Put passages in `req` (a chat or completion Request) in place. `fits(req)` False (prompt + max_tokens over
        the model's context): the passages are cut to half the words, then half again, down to none."""
        started = time.perf_counter()
        original = [dict(m) for m in req.messages] if kind == "chat" else req.prompt
        budget = self.max_words or 10**9
        while True:
            if kind == "chat":
                got = self.chat(req.messages, budget)
            else:
                got = self.prefix(req.prompt, budget)
                req.prompt = got.text
            if got is None or not got.hits or fits is None or fits(req):
                break
            if kind == "chat":
                req.messages = [dict(m) for m in original]
            else:
                req.prompt = original
            budget //= 2
            if budget < 16:  # not even a short passage fits: the request as it came (the engine says if it is too long)
                got = None
                break
        if got is not None:
            got.ms = (time.perf_counter() - started) * 1000
        return got


def open_retrieval(recipe) -> Retrieval | None:
    """serve.retrieval: 'auto' = on when the run has a finished index stage, true = on (a clear error without an index),
    false = off."""
    from slmforge.artifacts import BM25_ALL, INDEX
    from slmforge.index import open_index
    from slmforge.run import RunDir

    cfg = recipe.serve
    if cfg.retrieval is False:
        return None
    run = RunDir(recipe.run_path)
    if not recipe.index.enabled or not run.has(BM25_ALL):
        if cfg.retrieval is True:
            why = "index.enabled is false" if not recipe.index.enabled else f"{run.path(BM25_ALL)} is missing"
            raise ValueError(f"serve.retrieval is true but this run has no retrieval index ({why}): "
                             f"run `slmforge {INDEX} RECIPE`, or set serve.retrieval to auto or false")
        return None
    k = cfg.retrieval_k or recipe.index.k
    words = cfg.retrieval_words or k * recipe.index.passage_words
    return Retrieval(open_index(run, deployed=True), k, words)
