"""Paired verdicts: BEATS only when the paired interval clears zero; a model is indistinguishable from itself."""

import random

from slmforge.evaluate.paired import BEATS, TIE, WORSE, mcnemar_exact_p, paired_diff


def test_identical_scores_are_not_distinguishable():
    a = [float(random.Random(i).random() > 0.5) for i in range(80)]
    out = paired_diff(a, list(a), binary=True)
    assert out["verdict"] == TIE and out["diff"] == 0 and out["ci"] == [0.0, 0.0] and out["p_mcnemar"] == 1.0


def test_clear_gain_beats_and_clear_loss_is_worse():
    a = [0.0] * 40 + [1.0] * 10
    b = [1.0] * 30 + [0.0] * 10 + [1.0] * 10
    up = paired_diff(a, b, binary=True)
    assert up["verdict"] == BEATS and up["ci"][0] > 0 and up["p_mcnemar"] < 1e-6 and up["b_better"] == 30
    assert paired_diff(b, a, binary=True)["verdict"] == WORSE


def test_overlapping_point_gain_is_not_distinguishable():
    # 9 right vs 6 right flips in 40 items: the point estimate moved, the interval straddles zero
    a = [1.0] * 6 + [0.0] * 9 + [1.0] * 10 + [0.0] * 15
    b = [0.0] * 6 + [1.0] * 9 + [1.0] * 10 + [0.0] * 15
    out = paired_diff(a, b, binary=True)
    assert out["diff"] > 0 and out["ci"][0] < 0 < out["ci"][1] and out["verdict"] == TIE
    assert 0.5 < mcnemar_exact_p(a, b) <= 1.0


def test_lower_is_better_flips_the_verdict():
    a = [3.0 + 0.01 * i for i in range(30)]
    b = [x - 0.5 for x in a]  # every item's loss fell
    assert paired_diff(a, b, higher_is_better=False)["verdict"] == BEATS
