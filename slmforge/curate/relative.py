"""Quality and repetition thresholds relative to the corpus's own distribution.

Gopher's rules (Rae et al. 2021, Table A1) were tuned on web pages. On a manual they remove what users ask about:
a synopsis is mostly brackets (few "alphabetic" words), a table of types has no stop words, a parameter list
repeats "(integer) Per-table value of ..." and a code example repeats `END LOOP;`. In `mode: relative` every Gopher
statistic gets its bound from the corpus's chunks: a chunk is removed only where it is an outlier of its corpus on
that statistic (beyond the robust z-score `outlier_z` from the median, in MAD units, AND in the corpus's extreme
`outlier_share`), beyond the Gopher bound of the recipe as well (the corpus may loosen a web rule, never tighten it),
or beyond the `broken` floor whatever the corpus looks like (binary junk, one line repeated, a page of symbols).

The judging itself stays datatrove's GopherQualityFilter / GopherRepetitionFilter, built with the derived numbers,
so both modes apply exactly the same rules. The statistics are computed here, in a pre-pass on the driver, with
datatrove's own helpers (`split_into_words`, `PUNCTUATION_SET`, `find_duplicates`, ...): datatrove computes them
inside `filter()` and does not expose them. A pre-pass rather than a datatrove step because the bounds must be known
before the first chunk is judged: a stats step would need its own executor run plus a merge step (two more executor
start-ups, 5-10 s each on a small machine) while the chunks are already in memory here, as for DomainRelevanceFilter.
Its cost is one word split per measured chunk (a seeded sample of at most 2,000): about what one Gopher filter spends
on those chunks. The bounds are measured on the chunks before deduplication; copies shift quantiles very little.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from datatrove.pipeline.filters.gopher_quality_filter import STOP_WORDS
from datatrove.pipeline.filters.gopher_repetition_filter import find_all_duplicate, find_duplicates, find_top_duplicate, get_n_grams
from datatrove.utils.text import PUNCTUATION_SET, split_into_words

TOP_N = (2, 3, 4)
DUP_N = (5, 6, 7, 8, 9, 10)


@dataclass(frozen=True)
class Stat:
    name: str
    high_is_bad: bool  # True: large values are bad (a max_ bound); False: small values are bad (a min_ bound)
    gopher: float  # the web-text bound (absolute mode), from the recipe or datatrove's defaults
    broken: float  # bound applied whatever the corpus looks like: past it, the text is not text


def quality_stats(text: str, words: list[str] | None = None) -> dict[str, float]:
    """The statistics GopherQualityFilter judges, computed as it computes them (datatrove 0.10)."""
    words = split_into_words(text, "en") if words is None else words
    n = len(words) or 1
    non_symbol = [w for w in words if any(ch not in PUNCTUATION_SET for ch in w)]
    lines = text.splitlines() or [""]
    return {
        "words": float(len(non_symbol)),
        "avg_word_length": float(np.mean([len(w) for w in non_symbol])) if non_symbol else 0.0,
        "hash_word_ratio": text.count("#") / n,
        "ellipsis_word_ratio": (text.count("...") + text.count("…")) / n,
        "bullet_lines_ratio": sum(s.lstrip().startswith(("•", "-")) for s in lines) / len(lines),
        "ellipsis_lines_ratio": sum(s.rstrip().endswith(("...", "…")) for s in lines) / len(lines),
        "alpha_words_ratio": sum(any(c.isalpha() for c in w) for w in words) / n,
        "stop_words": float(len(set(STOP_WORDS) & set(words))),
    }


def repetition_stats(text: str, words: list[str] | None = None) -> dict[str, float]:
    """The statistics GopherRepetitionFilter judges, computed as it computes them (datatrove 0.10)."""
    import re

    size = len(text) or 1
    paragraphs = re.split(r"\n{2,}", text.strip())
    para_dups, para_chars = find_duplicates(paragraphs)
    lines = re.split("\n+", text)
    line_dups, line_chars = find_duplicates(lines)
    words = split_into_words(text, "en") if words is None else words
    out = {"dup_para_frac": para_dups / len(paragraphs), "dup_para_char_frac": para_chars / size,
           "dup_line_frac": line_dups / len(lines), "dup_line_char_frac": line_chars / size}
    for n in TOP_N:
        grams = get_n_grams(words, n)
        out[f"top_{n}_gram"] = find_top_duplicate(grams) / size if grams else 0.0
    for n in DUP_N:
        out[f"dup_{n}_gram"] = find_all_duplicate(words, n) / size
    return out


def quality_stat_table(q) -> list[Stat]:
    """Each quality statistic with its direction, the recipe's Gopher bound and the broken-text floor."""
    b = q.broken
    return [
        Stat("words", False, q.min_words, b.min_words),
        Stat("avg_word_length", False, q.min_avg_word_length, b.min_avg_word_length),
        Stat("avg_word_length", True, q.max_avg_word_length, b.max_avg_word_length),
        Stat("hash_word_ratio", True, q.max_symbol_word_ratio, b.max_symbol_word_ratio),
        Stat("ellipsis_word_ratio", True, q.max_symbol_word_ratio, b.max_symbol_word_ratio),
        Stat("bullet_lines_ratio", True, q.max_bullet_lines_ratio, b.max_bullet_lines_ratio),
        Stat("ellipsis_lines_ratio", True, q.max_ellipsis_lines_ratio, b.max_ellipsis_lines_ratio),
        Stat("alpha_words_ratio", False, q.max_non_alpha_words_ratio, b.min_alpha_words_ratio),
        Stat("stop_words", False, q.min_stop_words, b.min_stop_words),
    ]


# Gopher's repetition bounds (Table A1; datatrove's defaults), and where repetition means the text is broken
# (a line, paragraph or phrase repeated over most of the chunk).
REPETITION_GOPHER = {"dup_para_frac": 0.3, "dup_para_char_frac": 0.2, "dup_line_frac": 0.3, "dup_line_char_frac": 0.2,
                     "top_2_gram": 0.2, "top_3_gram": 0.18, "top_4_gram": 0.16, "dup_5_gram": 0.15, "dup_6_gram": 0.14,
                     "dup_7_gram": 0.13, "dup_8_gram": 0.12, "dup_9_gram": 0.11, "dup_10_gram": 0.10}


def repetition_stat_table(q) -> list[Stat]:
    b = q.broken
    return [Stat(name, True, gopher, b.max_repetition_frac if name.startswith("dup_") else b.max_top_ngram_frac)
            for name, gopher in REPETITION_GOPHER.items()]


def relative_bound(values: np.ndarray, stat: Stat, z: float, share: float) -> float:
    """The corpus's outlier bound for one statistic, clamped between the Gopher bound and the broken floor.

    Outlier = beyond median ± z·(1.4826·MAD) and beyond the `share` quantile: the more lenient of the two, so a
    statistic flags at most `share` of the corpus (short of the broken floor) and only values far from its middle.
    """
    if not len(values):
        return stat.gopher
    med = float(np.median(values))
    scale = 1.4826 * float(np.median(np.abs(values - med)))
    # "higher"/"lower": an observed value, so at most share·n chunks lie beyond it; a corpus of under 1/share chunks
    # has no quantile outliers at all (its most extreme chunk is not an outlier just for being the most extreme)
    if stat.high_is_bad:
        bound = max(stat.gopher, med + z * scale, float(np.quantile(values, 1 - share, method="higher")))
        return min(bound, stat.broken)
    bound = min(stat.gopher, med - z * scale, float(np.quantile(values, share, method="lower")))
    return max(bound, stat.broken)


def corpus_bounds(texts: list[str], q, sample: int = 2000, seed: int = 0) -> dict:
    """Per-statistic bounds for `texts` under QualityConfig `q`, with the corpus medians beside them (for the report).

    Returns {"quality": {key: bound}, "repetition": {key: bound}, "stats": {key: {median, bound, gopher}}}, keys
    "min_<stat>" / "max_<stat>". The statistics are measured on at most `sample` chunks (a seeded sample): the word
    split is the costly part (spaCy, ~10-50 ms a chunk), and quantiles of 2,000 chunks are close enough to the whole.
    """
    rows: list[tuple[dict, dict]] = []
    if q.mode == "relative":  # absolute: the recipe's bounds as they are, no pass
        chosen = texts if len(texts) <= sample else [texts[i] for i in sorted(np.random.default_rng(seed).choice(len(texts), sample, replace=False))]
        for t in chosen:
            words = split_into_words(t, "en")  # once per chunk, for both filters' statistics
            rows.append((quality_stats(t, words), repetition_stats(t, words) if q.repetition else {}))
    out: dict = {"quality": {}, "repetition": {}, "stats": {}, "measured_chunks": len(rows)}
    for i, (kind, table) in enumerate((("quality", quality_stat_table(q)), ("repetition", repetition_stat_table(q)))):
        if kind == "repetition" and not q.repetition:
            continue
        for stat in table:
            values = np.array([r[i][stat.name] for r in rows], dtype=float)
            key = ("max_" if stat.high_is_bad else "min_") + stat.name
            bound = stat.gopher if q.mode == "absolute" else relative_bound(values, stat, q.outlier_z, q.outlier_share)
            out[kind][key] = bound
            out["stats"][key] = {"median": round(float(np.median(values)), 4) if len(values) else None,
                                 "bound": round(float(bound), 4), "gopher": stat.gopher}
    return out


def quality_filter_kwargs(bounds: dict, max_words: int) -> dict:
    """GopherQualityFilter's arguments for these bounds.

    Gopher uses one max_symbol_word_ratio for both '#' and '...' per word; the more lenient of the two bounds is
    passed (a chunk full of '#' comments in a shell example and one full of '...' in a synopsis are both normal in
    manuals). Counts are rounded up: `n < 23.4` and `n < 24` keep the same chunks.
    """
    b = bounds["quality"]
    return dict(
        min_doc_words=int(np.ceil(b["min_words"])), max_doc_words=max_words,
        min_avg_word_length=b["min_avg_word_length"], max_avg_word_length=b["max_avg_word_length"],
        max_symbol_word_ratio=max(b["max_hash_word_ratio"], b["max_ellipsis_word_ratio"]),
        max_bullet_lines_ratio=b["max_bullet_lines_ratio"], max_ellipsis_lines_ratio=b["max_ellipsis_lines_ratio"],
        max_non_alpha_words_ratio=b["min_alpha_words_ratio"], min_stop_words=int(np.ceil(b["min_stop_words"])),
    )


def repetition_filter_kwargs(bounds: dict) -> dict:
    b = bounds["repetition"]
    return dict(
        dup_line_frac=b["max_dup_line_frac"], dup_para_frac=b["max_dup_para_frac"],
        dup_line_char_frac=b["max_dup_line_char_frac"], dup_para_char_frac=b["max_dup_para_char_frac"],
        top_n_grams=tuple((n, b[f"max_top_{n}_gram"]) for n in TOP_N),
        dup_n_grams=tuple((n, b[f"max_dup_{n}_gram"]) for n in DUP_N),
    )
