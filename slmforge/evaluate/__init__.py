"""Evaluation: frozen, decontaminated benchmarks from held-out documents; lm-eval scoring; base vs stages."""

from slmforge.evaluate.decontaminate import NgramIndex, decontaminate
from slmforge.evaluate.metrics import exact_match, rouge_l, token_f1, wilson_ci

__all__ = ["NgramIndex", "decontaminate", "exact_match", "rouge_l", "token_f1", "wilson_ci"]
