"""Verification of every item before use. Each check returns a reason string or None; rejections are data.

    schema -> length bounds -> grounding in the source passage -> not a copy (rephrase/summary)
    -> no long n-gram shared with held-out text -> not a near-duplicate of an accepted item
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Iterable

from slmforge.generate.text import grounding, ngrams, words
from slmforge.records import Item
from slmforge.recipe import GenerateVerifyConfig

KINDS = ("rephrase", "qa", "mcq", "cloze", "summary", "preference")
_SHINGLE = 5


def item_texts(item: Item) -> list[str]:
    """The fields of an item that end up in training or benchmark data (the grounding context is not one)."""
    return [t for t in (item.prompt, item.answer, item.rejected or "", *item.choices) if t]


def check_schema(item: Item) -> str | None:
    if item.kind not in KINDS:
        return f"schema: unknown kind {item.kind!r}"
    if not item.prompt.strip() or not item.answer.strip():
        return "schema: empty prompt or answer"
    if item.kind == "mcq" or item.choices:
        norm = [" ".join(words(c)) for c in item.choices]
        if len(item.choices) < 2 or len(set(norm)) != len(norm) or not all(norm):
            return "schema: choices must be distinct and non-empty"
        if item.answer_index is None or not 0 <= item.answer_index < len(item.choices):
            return "schema: answer_index out of range"
        if item.choices[item.answer_index] != item.answer:
            return "schema: answer is not choices[answer_index]"
    if item.kind == "preference":
        if not (item.rejected or "").strip():
            return "schema: preference without a rejected answer"
        if words(item.rejected or "") == words(item.answer):
            return "schema: rejected equals chosen"
    return None


class Verifier:
    """Stateful: remembers accepted items for near-duplicate detection; held-out n-grams are indexed once."""

    def __init__(self, cfg: GenerateVerifyConfig, avoid_texts: Iterable[str] = ()):
        self.cfg = cfg
        self.avoid: set[tuple[str, ...]] = set()
        for t in avoid_texts:
            self.avoid |= ngrams(t, cfg.heldout_ngram)
        self._shingles: dict[str, list[set]] = defaultdict(list)  # kind -> accepted items' shingle sets
        self._index: dict[str, dict[tuple, list[int]]] = defaultdict(lambda: defaultdict(list))
        self.reasons: Counter = Counter()

    # ---------------------------------------------------------------------------------- single checks
    def overlaps_avoid(self, text: str) -> bool:
        return bool(self.avoid) and not self.avoid.isdisjoint(ngrams(text, self.cfg.heldout_ngram))

    @staticmethod
    def repetitive(text: str) -> bool:
        """Degenerate loops small teachers fall into: many repeated 3-grams, or one line said three times."""
        w = words(text)
        grams = [tuple(w[i : i + 3]) for i in range(len(w) - 2)]
        if len(grams) >= 10 and 1 - len(set(grams)) / len(grams) > 0.3:
            return True
        lines = Counter(line.strip().lower() for line in text.splitlines() if line.strip())
        return any(k >= 3 for k in lines.values())

    def check_length(self, item: Item) -> str | None:
        n, c = len(item.answer.split()), self.cfg
        if self.repetitive(item.answer):
            return "repetitive"
        if item.kind in ("qa", "preference") and words(item.prompt) and " ".join(words(item.prompt)) in " ".join(words(item.answer)):
            return "answer_repeats_question"
        if n < c.min_answer_words:
            return "too_short"
        if n > c.max_answer_words:
            return "too_long"
        if item.kind in ("qa", "mcq", "preference") and len(item.prompt.split()) < 3:
            return "too_short: question"
        if item.origin != "extractive" and item.kind in ("summary", "rephrase") and item.answer.rstrip()[-1:] not in ".!?)\"'`”":
            return "truncated"  # cut by max_tokens mid-sentence
        passage_words = len(item.context.split())
        if item.kind == "summary" and passage_words and not (8 <= n <= max(8, 0.8 * passage_words)):
            return "length: summary not shorter than passage" if n > 8 else "too_short"
        if item.kind == "rephrase" and passage_words and n < max(20, 0.3 * passage_words):
            return "too_short"
        return None

    def check_grounding(self, item: Item) -> str | None:
        if item.origin == "extractive" or not item.context:
            return None  # extractive items are copied from the passage: grounded by construction
        c, passage = self.cfg, item.context
        chosen = grounding(item.answer, passage)
        if chosen < c.min_grounding:
            return "ungrounded_answer"
        if item.kind in ("qa", "mcq", "preference") and grounding(item.prompt, passage) < c.min_question_grounding:
            return "ungrounded_question"
        if item.kind == "preference" and grounding(item.rejected or "", passage) >= chosen:
            return "rejected_not_worse"  # the rejected answer must be less grounded than the chosen one
        if item.kind == "preference" and grounding(item.answer, item.rejected or "") >= 0.9:
            return "rejected_contains_chosen"  # a pair that differs only by padding teaches nothing
        if item.kind in ("summary", "rephrase"):
            grams = ngrams(item.answer, 8)
            if grams and len(grams & ngrams(passage, 8)) / len(grams) >= c.max_copy:
                return "copies_passage"
        return None

    def _shingle_set(self, item: Item) -> set:
        return ngrams(f"{item.prompt} {item.answer}", _SHINGLE) or {tuple(words(f"{item.prompt} {item.answer}"))}

    def check_duplicate(self, item: Item, shingles: set) -> str | None:
        # inverted index over shingles: only items sharing one are compared (no all-pairs loop)
        shared: Counter = Counter()
        index = self._index[item.kind]
        for s in shingles:
            for j in index.get(s, ()):
                shared[j] += 1
        accepted = self._shingles[item.kind]
        for j, k in shared.items():
            if k / (len(shingles) + len(accepted[j]) - k) >= self.cfg.near_duplicate:
                return "near_duplicate"
        return None

    # ---------------------------------------------------------------------------------- all checks
    def check(self, item: Item) -> str | None:
        """None when the item is accepted (and then remembered for duplicate checks), else the reason."""
        reason = check_schema(item) or self.check_length(item) or self.check_grounding(item)
        if reason is None and any(self.overlaps_avoid(t) for t in item_texts(item)):
            reason = "heldout_overlap"
        shingles = self._shingle_set(item)
        if reason is None:
            reason = self.check_duplicate(item, shingles)
        if reason is None:
            accepted = self._shingles[item.kind]
            for s in shingles:
                self._index[item.kind][s].append(len(accepted))
            accepted.append(shingles)
        else:
            self.reasons[reason] += 1
        return reason
