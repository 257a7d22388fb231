"""Lexical retrieval over passages: bm25s (BM25 on scipy sparse matrices) with a Snowball stemmer and English stop words.

    passages_of(chunks, words)   sentence-aligned windows of each chunk, each citing its document and section
    Bm25Index.build(passages)    index them;  .save(folder) / Bm25Index.load(folder, passages)
    index.search(query, k)       [Hit(passage, score, rank)], best first;  index.search_many(queries, k)
    recall_at_k(index, pairs, k) share of (query, source chunk id) pairs whose chunk is among the top k

bm25s is the maintained library the brief names; it keeps the index as sparse score matrices, so a query costs a few
sparse row lookups (well under a millisecond on the demo's index). What it does not keep is the tokenizer's stemmer,
so the index folder also holds `slmforge.json` (stemmer, stop words, passage ids) and loading checks the passages
still match.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from slmforge.records import Chunk, Passage

META = "slmforge.json"
_SENTENCE = re.compile(r"(?<=[.!?:;])[ \t]+(?=[A-Z0-9\"'(`])")


def section_of(chunk: Chunk) -> str:
    """The innermost specific heading without its number ("5.4.1. Check Constraints" -> "Check Constraints"); generic
    ones ("Parameters", "Notes") give way to the next one out, and then to the page title."""
    from slmforge.generate.extractive import _GENERIC_HEADINGS, SECTION_NUMBER

    for h in [*reversed(chunk.headings), chunk.title]:
        name = SECTION_NUMBER.sub("", h).strip().lstrip("#").strip()
        if name and name.lower() not in _GENERIC_HEADINGS:
            return name
    return chunk.title.strip()


def _units(text: str) -> list[tuple[str, bool]]:
    """(piece, ends its line): lines, then sentences of long lines, the pieces a passage boundary may fall between.
    Code and table lines stay whole and keep their line breaks."""
    out = []
    for line in text.splitlines():
        pieces = [p.strip() for p in _SENTENCE.split(line) if p.strip()]
        out += [(p, i == len(pieces) - 1) for i, p in enumerate(pieces)]
    return out


def passages_of(chunks: Iterable[Chunk], words: int = 120) -> list[Passage]:
    """Cut every chunk into passages of about `words` words, on sentence or line boundaries, without overlap; a short
    tail joins the passage before it. Ids are stable: "<chunk_id>-p<j>"."""
    out: list[Passage] = []
    for chunk in chunks:
        section = section_of(chunk)
        groups: list[list[str]] = []
        current: list[str] = []
        n = 0
        for unit, eol in _units(chunk.text):
            current.append(unit + ("\n" if eol else " "))
            n += len(unit.split())
            if n >= words:
                groups.append(current)
                current, n = [], 0
        if current:
            if groups and n < words // 3:
                groups[-1].extend(current)
            else:
                groups.append(current)
        for j, group in enumerate(groups):
            out.append(Passage(id=f"{chunk.id}-p{j}", chunk_id=chunk.id, doc_id=chunk.doc_id, source=chunk.source,
                               title=chunk.title, section=section, text="".join(group).strip()))
    return out


@dataclass(frozen=True)
class Hit:
    passage: Passage
    score: float
    rank: int  # 1 = best

    def as_dict(self) -> dict:
        p = self.passage
        return {"id": p.id, "chunk_id": p.chunk_id, "doc_id": p.doc_id, "source": p.source, "section": p.section,
                "title": p.title, "score": round(self.score, 4), "rank": self.rank, "citation": p.citation}


def _tokenizer_settings(stemmer: str | None, stopwords: str | None) -> dict:
    return {"stemmer": stemmer, "stopwords": stopwords}


def indexed_passages(folder: Path, ids: Sequence[str], passages: Sequence[Passage]) -> list[Passage]:
    """The passages a saved index (at `folder`) holds, in its order, from the run's `passages`; an error when some
    are missing (the index and the passages come from different runs)."""
    by_id = {p.id: p for p in passages}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ValueError(f"{folder}: {len(missing)} indexed passages are not in the passages given (e.g. {missing[0]}); "
                         "the index and its passages come from different runs")
    return [by_id[i] for i in ids]


class Bm25Index:
    """A BM25 index over passages. Build once per run (the index stage); load wherever a question needs passages."""

    def __init__(self, retriever, passages: Sequence[Passage], stemmer: str | None = "english", stopwords: str | None = "en"):
        self.retriever, self.passages = retriever, list(passages)
        self.stemmer_name, self.stopwords = stemmer, stopwords
        self._stemmer = None
        if stemmer:
            import Stemmer  # PyStemmer, bm25s's recommended stemmer (Snowball, C)

            self._stemmer = Stemmer.Stemmer(stemmer)

    # -------------------------------------------------------------------------------------------- build / io
    @classmethod
    def build(cls, passages: Sequence[Passage], stemmer: str | None = "english", stopwords: str | None = "en") -> "Bm25Index":
        import bm25s

        if not passages:
            raise ValueError("cannot build a retrieval index from 0 passages")
        index = cls(None, passages, stemmer, stopwords)
        tokens = index._tokenize([p.text if not p.section else f"{p.section}. {p.text}" for p in passages])
        retriever = bm25s.BM25()
        retriever.index(tokens, show_progress=False)
        index.retriever = retriever
        return index

    def _tokenize(self, texts: list[str]):
        import bm25s

        return bm25s.tokenize(texts, stopwords=self.stopwords, stemmer=self._stemmer, show_progress=False)

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.retriever.save(str(folder))
        meta = {**_tokenizer_settings(self.stemmer_name, self.stopwords), "passages": [p.id for p in self.passages]}
        (folder / META).write_text(json.dumps(meta))

    @classmethod
    def load(cls, folder: Path, passages: Sequence[Passage]) -> "Bm25Index":
        import bm25s

        folder = Path(folder)
        try:
            meta = json.loads((folder / META).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{folder}: not a slmforge retrieval index ({err}); rerun `slmforge index`") from None
        indexed = indexed_passages(folder, meta["passages"], passages)
        return cls(bm25s.BM25.load(str(folder)), indexed, meta.get("stemmer"), meta.get("stopwords"))

    # -------------------------------------------------------------------------------------------- search
    def search_many(self, queries: Sequence[str], k: int = 2, exclude_docs: Sequence[set[str]] | None = None) -> list[list[Hit]]:
        """Top-k passages per query. `exclude_docs[i]`: document ids the i-th query must not get back."""
        if not queries:
            return []
        extra = max((len(e) for e in exclude_docs), default=0) * 4 if exclude_docs else 0
        want = min(len(self.passages), k + extra)
        tokens = self._tokenize(list(queries))
        ids, scores = self.retriever.retrieve(tokens, k=want, show_progress=False, n_threads=1)
        out = []
        for qi in range(len(queries)):
            hits = []
            for j in range(want):
                score = float(scores[qi, j])
                if score <= 0:  # no query word in the passage: not retrieved
                    break
                passage = self.passages[int(ids[qi, j])]
                if exclude_docs and passage.doc_id in exclude_docs[qi]:
                    continue
                hits.append(Hit(passage, score, len(hits) + 1))
                if len(hits) == k:
                    break
            out.append(hits)
        return out

    def search(self, query: str, k: int = 2) -> list[Hit]:
        return self.search_many([query], k)[0]


def recall_from_hits(results: Sequence[Sequence[Hit]], sources: Sequence[str], ks: Sequence[int]) -> dict[str, float | None]:
    """{k: share} of queries whose source chunk (`sources[i]`, a chunk id) has a passage among their first k hits;
    None for every k when there are no queries."""
    n = len(sources)
    return {str(k): round(sum(any(h.passage.chunk_id == chunk for h in hits[:k]) for hits, chunk in zip(results, sources)) / n, 4)
            if n else None for k in ks}


def recall_at_k(index: Bm25Index, pairs: Sequence[tuple[str, str]], ks: Sequence[int] = (1, 2, 5, 10)) -> dict:
    """{"n", "recall@k": {k: share}} of (query, source chunk id) pairs whose source chunk has a passage in the top k."""
    if not pairs:
        return {"n": 0, "recall@k": {}}
    results = index.search_many([q for q, _ in pairs], max(ks))
    return {"n": len(pairs), "recall@k": recall_from_hits(results, [chunk for _, chunk in pairs], ks)}


def format_passages(passages: Sequence[Passage], max_words: int | None = None) -> str:
    """Passages as a prompt prefix, numbered, each with its citation; RAFT training data, open-book evaluation and
    serving all use this one layout, so the model reads at inference what it was trained on:
        Passages:
        [1] [source § section] text
        [2] ...
    `max_words` caps the words of passage text in all (the last passages are cut, then left out)."""
    parts = []
    budget = max_words
    for i, p in enumerate(passages, 1):
        text = p.text
        if budget is not None:
            if budget <= 0:
                break
            words = text.split()
            if len(words) > budget:
                text = " ".join(words[:budget])
            budget -= len(words)
        parts.append(f"[{i}] {p.citation} {text}")
    return "Passages:\n" + "\n".join(parts) if parts else ""


def passages_prompt(question: str, passages: Sequence[Passage], max_words: int | None = None) -> str:
    """The prompt a model reads passages in (RAFT training rows, serving): format_passages, a blank line, then
    `Question: {question}`; with no passages, the question as it is."""
    context = format_passages(passages, max_words)
    return f"{context}\n\nQuestion: {question}" if context else question


def context_of(hits: Sequence[Hit], max_words: int | None = None) -> str:
    """format_passages of the hits' passages, in rank order."""
    return format_passages([h.passage for h in hits], max_words)
