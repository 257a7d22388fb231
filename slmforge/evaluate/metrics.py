"""Per-item metrics for generated answers, and confidence intervals for their means.

Token F1 and answer normalisation are SQuAD's (as lm-eval's squad/drop tasks compute them); ROUGE-L is Google's
`rouge_score` (what lm-eval's and HF evaluate's rouge use). The same functions are copied into every exported
lm-eval task folder (see lm_eval_tasks.py), so `lm_eval --include_path` computes identical numbers.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections import Counter
from functools import lru_cache

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    """1 if the prediction starts with the reference, after SQuAD normalisation, else 0.

    A completion model keeps writing past the gap (until a newline or its token budget), so the reference is
    compared with the same number of leading words of the prediction.
    """
    ref = normalize_answer(reference).split()
    return float(bool(ref) and normalize_answer(prediction).split()[: len(ref)] == ref)


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of stemmed words)."""
    return _scorer().score(reference, prediction)["rougeL"].fmeasure


def wilson_ci(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (well behaved at 0, 1 and small n, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_ci(values: list[float], iters: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean (for scores in [0, 1] that are not 0/1, e.g. F1, ROUGE-L)."""
    if not values:
        return (0.0, 1.0)
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(iters))
    return (means[int(0.025 * iters)], means[min(iters - 1, int(0.975 * iters))])


def mean_ci(values: list[float], binary: bool, seed: int = 0) -> dict:
    """{"value", "ci": [lo, hi], "n"}: Wilson for 0/1 scores, bootstrap otherwise."""
    n = len(values)
    value = sum(values) / n if n else float("nan")
    lo, hi = wilson_ci(sum(values), n) if binary else bootstrap_ci(values, seed=seed)
    return {"value": value, "ci": [lo, hi], "n": n}


# ----------------------------------------------------------------------------- lm-eval `custom_dataset` hook
# lm-eval hands `dataset_kwargs.data_files` to datasets.load_dataset, which resolves relative paths against the working
# directory. Exported tasks instead name `custom_dataset: !function slmforge_metrics.load_local` and give their data
# files relative to the task folder: this copy of the module lives in that folder, so `__file__` anchors them and the
# folder can be moved (with the benchmarks beside it) or run from anywhere.
def load_local(data_files: dict | None = None, **_metadata):
    import datasets
    from pathlib import Path

    here = Path(__file__).resolve().parent
    files = {split: str(here / path) for split, path in (data_files or {}).items()}
    return datasets.load_dataset("json", data_files=files)


# ----------------------------------------------------------------------------- lm-eval `process_results` hooks
# Exported task YAMLs point at these (`process_results: !function slmforge_metrics.process_qa`); `doc` is an Item row
# and `results` holds the one generated string (generate_until).
def process_qa(doc: dict, results: list[str]) -> dict:
    return {"token_f1": token_f1(results[0], doc["answer"]), "rouge_l": rouge_l(results[0], doc["answer"])}


def process_cloze(doc: dict, results: list[str]) -> dict:
    return {"exact_match": exact_match(results[0], doc["answer"]), "rouge_l": rouge_l(results[0], doc["answer"])}


def process_summary(doc: dict, results: list[str]) -> dict:
    return {"rouge_l": rouge_l(results[0], doc["answer"])}
