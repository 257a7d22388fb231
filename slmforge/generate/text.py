"""Small text helpers shared by the generators and verifiers: words, content words, n-grams, sentences."""

from __future__ import annotations

import re

from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

WORD = re.compile(r"\w+", re.UNICODE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9“\"(])")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def _stem(w: str) -> str:
    # crude plural folding ("octets" ~ "octet") so grounding does not punish inflection; not a real stemmer
    return w[:-1] if len(w) > 4 and w.endswith("s") and not w.endswith("ss") else w


def content_words(text: str) -> set[str]:
    return {_stem(w) for w in words(text) if len(w) > 1 and w not in ENGLISH_STOP_WORDS}


def grounding(text: str, passage: str) -> float:
    """Share of the text's content words that occur in the passage (1.0 when the text has none)."""
    cw = content_words(text)
    return len(cw & content_words(passage)) / len(cw) if cw else 1.0


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def sentences(text: str, min_words: int = 6, max_words: int = 60) -> list[str]:
    """Prose sentences of a chunk: headings, table rows, code-like and list lines are skipped."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        block = " ".join(block.split())
        if not block or block.startswith("#") or block.count("|") >= 2 or block.startswith(("-", "*", "•")):
            continue
        for s in _SENTENCE_END.split(block):
            s = s.strip()
            n = len(s.split())
            if min_words <= n <= max_words and s[-1:] in ".!?" and s[:1].isupper():
                out.append(s)
    return out


def cut_words(text: str, n: int) -> str:
    """The first n words of a text, whitespace kept, with an ellipsis when cut."""
    parts = re.split(r"(\s+)", text)
    out, count = [], 0
    for p in parts:
        if p and not p.isspace():
            count += 1
            if count > n:
                return "".join(out).rstrip() + " …"
        out.append(p)
    return text
