"""Token-bounded chunking that respects headings.

Units are paragraphs (a code block is one paragraph); a paragraph longer than a chunk is split into sentences,
lines, and as a last resort token windows. Units are packed greedily up to `chunk_tokens`. A new heading starts a
new chunk unless the current one is under half full (tiny sections merge with their neighbour, heading line
included, instead of becoming useless fragments). Neighbouring chunks of one section share up to `chunk_overlap`
tokens of trailing units, so no sentence loses its context at a boundary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from slmforge.records import Chunk, Document

JOIN_TOKENS = 2
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\"'])")


class TokenCounter:
    """Counts tokens with the base model's tokenizer (the `tokenizers` library, no transformers import)."""

    def __init__(self, tokenizer_json: Path | None):
        self.tok = None
        if tokenizer_json is not None:
            from tokenizers import Tokenizer

            self.tok = Tokenizer.from_file(str(tokenizer_json))

    def count_many(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        if self.tok is None:  # whitespace fallback, only when no tokenizer exists at all
            return [len(t.split()) for t in texts]
        return [len(e.ids) for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def windows(self, text: str, size: int) -> list[str]:
        """Cut text into pieces of at most `size` tokens at token boundaries (character offsets)."""
        if self.tok is None:
            words = text.split()
            return [" ".join(words[i : i + size]) for i in range(0, len(words), size)]
        offsets = self.tok.encode(text, add_special_tokens=False).offsets
        pieces = []
        for i in range(0, len(offsets), size):
            block = offsets[i : i + size]
            pieces.append(text[block[0][0] : block[-1][1]])
        return [p for p in pieces if p.strip()]


@dataclass
class Unit:
    section: int
    headings: list[str]
    text: str
    tokens: int
    joiner: str = "\n\n"  # separator before this unit: a paragraph break, or " "/"\n" inside a split paragraph


def _join(units: list[Unit]) -> str:
    return units[0].text + "".join(u.joiner + u.text for u in units[1:])


def _units(doc: Document, counter: TokenCounter, limit: int) -> list[Unit]:
    raw: list[tuple[int, list[str], str]] = []
    for i, section in enumerate(doc.sections):
        if section.headings:
            raw.append((i, section.headings, "#" * min(len(section.headings), 6) + " " + section.headings[-1]))
        for para in re.split(r"\n\s*\n", section.text):
            if para.strip():
                raw.append((i, section.headings, para.strip("\n")))
    counts = counter.count_many([t for _, _, t in raw])
    units: list[Unit] = []
    for (i, headings, text), n in zip(raw, counts):
        if n <= limit:
            units.append(Unit(i, headings, text, n))
            continue
        # too long: sentences for prose, lines for code, then token windows
        sep = " " if "\n" not in text.strip() else "\n"
        parts = _SENTENCE.split(text) if sep == " " else text.split("\n")
        first = True
        for part, m in zip(parts, counter.count_many(parts)):
            if not part.strip():
                continue
            pieces = [(part, m)] if m <= limit else [(p, counter.count_many([p])[0]) for p in counter.windows(part, limit)]
            for piece, k in pieces:
                units.append(Unit(i, headings, piece, k, "\n\n" if first else sep))
                first = False
    return units


def _tail_sentences(unit: Unit, counter: TokenCounter, budget: int) -> Unit | None:
    sentences = _SENTENCE.split(unit.text) if "\n" not in unit.text.strip() else unit.text.split("\n")
    sep = " " if "\n" not in unit.text.strip() else "\n"
    counts = counter.count_many(sentences)
    taken, used = [], 0
    for sentence, n in zip(reversed(sentences), reversed(counts)):
        if used + n + 1 > budget:
            break
        taken.insert(0, sentence)
        used += n + 1
    if not taken or len(taken) == len(sentences):
        return None
    text = sep.join(taken)
    return Unit(unit.section, unit.headings, text, counter.count_many([text])[0])


def chunk_document(doc: Document, counter: TokenCounter, chunk_tokens: int, overlap: int, min_tokens: int) -> list[Chunk]:
    units = _units(doc, counter, chunk_tokens - 1)
    groups: list[list[Unit]] = []
    current: list[Unit] = []
    used = 0
    for unit in units:
        # +2 for the paragraph break that joins units: "\n\n" is a token, and the unit's first word usually costs one
        # more after it than alone (measured: +1 per join fell 20-30 tokens short on pages of short API entries, and
        # the bound check below then split off one-entry chunks, "stat.S_IRGRP" alone)
        cost = unit.tokens + JOIN_TOKENS
        new_section = bool(current) and unit.section != current[-1].section
        if current and (used + cost > chunk_tokens or (new_section and used >= chunk_tokens // 2)):
            groups.append(current)
            carried: list[Unit] = []
            budget = min(overlap, chunk_tokens - cost)  # the overlap shrinks so the next unit still fits
            if not new_section and budget > 1:
                for prev in reversed(current):
                    if sum(u.tokens + 1 for u in carried) + prev.tokens + 1 > budget:
                        if not carried:  # the last unit alone is too long: carry its closing sentences
                            tail = _tail_sentences(prev, counter, budget - 1)
                            carried = [tail] if tail else []
                        break
                    carried.insert(0, prev)
            current, used = carried, sum(u.tokens + JOIN_TOKENS for u in carried)
        current.append(unit)
        used += cost
    if current:
        # a too-small tail joins the previous chunk when that still fits
        tail = sum(u.tokens + 1 for u in current)
        if groups and tail < min_tokens and sum(u.tokens + 1 for u in groups[-1]) + tail <= chunk_tokens:
            groups[-1].extend(u for u in current if not any(u is v for v in groups[-1]))
        else:
            groups.append(current)

    # Tokens do not add up exactly across joins (BPE merges at boundaries): enforce the bound on the joined text.
    texts, counts = [], []
    i = 0
    while i < len(groups):
        text = _join(groups[i])
        n = counter.count_many([text])[0]
        if n > chunk_tokens and len(groups[i]) > 1:
            moved = groups[i].pop()
            following = groups[i + 1] if i + 1 < len(groups) else []
            # the next chunk may begin with `moved`'s closing sentences, carried as overlap: the whole unit replaces
            # them there, or the chunk would hold those sentences twice
            tail = (following[0] if following and following[0] is not moved and following[0].section == moved.section
                    and moved.text.endswith(following[0].text) else None)
            if any(u is moved for u in following):
                pass  # already there as overlap
            elif following and sum(u.tokens + 1 for u in following) - (tail.tokens + 1 if tail else 0) + moved.tokens + 1 <= chunk_tokens:
                following[: 1 if tail else 0] = [moved]
            else:
                groups.insert(i + 1, [moved])
            continue
        texts.append(text)
        counts.append(n)
        i += 1
    chunks = []
    for index, (group, text, n) in enumerate(zip(groups, texts, counts)):
        chunks.append(
            Chunk(
                id=f"{doc.id}-{index:04d}", doc_id=doc.id, index=index, source=doc.source, title=doc.title,
                headings=group[0].headings, text=text, n_tokens=n,
            )
        )
    return chunks
