"""Decontamination: word n-gram overlap of each benchmark item against every training artifact.

An item whose share of n-grams found in the training text reaches `max_overlap` is dropped (the GPT-3 / Llama
reports' method, with the n and threshold as recipe settings); every item's overlap lands in the report.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

from slmforge.records import Item

_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(text: str, n: int) -> set[int]:
    w = words(text)
    return {hash(tuple(w[i : i + n])) for i in range(len(w) - n + 1)}


def strings_in(obj) -> Iterable[str]:
    """Every string inside a JSON row (training files differ in shape: Chunk, messages, prompt/chosen/rejected)."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if k not in ("id", "chunk_id", "doc_id", "source", "origin", "kind", "role"):
                yield from strings_in(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings_in(v)


class NgramIndex:
    """Hashed word n-grams of the training text (in memory: ~70 bytes per distinct n-gram)."""

    def __init__(self, n: int):
        self.n = n
        self.grams: set[int] = set()
        self.sources: dict[str, int] = {}

    def add_text(self, text: str) -> None:
        self.grams |= ngrams(text, self.n)

    def add_jsonl(self, path: Path, label: str) -> None:
        rows = 0
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    for s in strings_in(json.loads(line)):
                        self.add_text(s)
                    rows += 1
        self.sources[label] = rows

    def overlap(self, text: str) -> float | None:
        """Share of the text's n-grams seen in training; None when the text is shorter than n words."""
        grams = ngrams(text, self.n)
        return len(grams & self.grams) / len(grams) if grams else None


def item_text(item: Item) -> str:
    """What a model would have to have memorised: the question or passage plus the reference answer."""
    return f"{item.prompt} {item.answer}"


def decontaminate(items: list[Item], index: NgramIndex, max_overlap: float) -> tuple[list[Item], list[dict]]:
    """Split items into (kept, report rows); report rows hold every item's overlap and whether it was dropped."""
    kept, report = [], []
    for item in items:
        share = index.overlap(item_text(item))
        dropped = share is not None and share >= max_overlap
        report.append({"id": item.id, "kind": item.kind, "chunk_id": item.chunk_id,
                       "overlap": None if share is None else round(share, 4), "dropped": dropped})
        if not dropped:
            kept.append(item)
    return kept, report
