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


# ------------------------------------------------------------------------------------------------ the table's verdicts
def _fixed_results():
    """Base vs sft with fixed per-item scores: mcq clearly better, cloze a point drop inside the noise, documents
    clearly worse (every document's loss per word up by 0.3 nats)."""
    import math

    from slmforge.evaluate.compare import paired_results

    mcq_base = [0.0] * 30 + [1.0] * 10
    mcq_sft = [1.0] * 25 + [0.0] * 5 + [1.0] * 10
    cloze_base = [0.0] * 6 + [1.0] * 9 + [1.0] * 10 + [0.0] * 15  # 19 right
    cloze_sft = [1.0] * 6 + [0.0] * 9 + [1.0] * 10 + [0.0] * 15  # 16 right: down 3 points, not distinguishable
    words = [100 + 7 * i for i in range(12)]
    base_ll = [-3.0 * w - i for i, w in enumerate(words)]
    sft_ll = [ll - 0.3 * w for ll, w in zip(base_ll, words)]
    preds = {"base": [], "sft": []}
    for model, mcq, cloze, lls in (("base", mcq_base, cloze_base, base_ll), ("sft", mcq_sft, cloze_sft, sft_ll)):
        preds[model] += [{"bench": "mcq", "id": f"m{i}", "acc": v, "acc_norm": v} for i, v in enumerate(mcq)]
        preds[model] += [{"bench": "cloze", "id": f"c{i}", "exact_match": v, "rouge_l": v} for i, v in enumerate(cloze)]
        preds[model] += [{"bench": "domain_ppl", "id": f"d{i}", "word_perplexity": [ll, w], "bits_per_byte": [ll, 5 * w]}
                         for i, (ll, w) in enumerate(zip(lls, words))]

    def score(model, bench, metric):
        rows = [r for r in preds[model] if r["bench"] == bench]
        if bench == "domain_ppl":
            v = -sum(r[metric][0] for r in rows) / sum(r[metric][1] for r in rows)
            v = v / math.log(2) if metric == "bits_per_byte" else math.exp(v)
        else:
            v = sum(r[metric] for r in rows) / len(rows)
        return {"value": v, "ci": [v - 0.1, v + 0.1], "n": len(rows)}

    metrics = {"mcq": ("acc", "acc_norm"), "cloze": ("exact_match", "rouge_l"), "domain_ppl": ("word_perplexity", "bits_per_byte")}
    results = {"models": [{"name": "base"}, {"name": "sft"}],
               "benchmarks": {"mcq": {"n": 40, "chance": 0.25}, "cloze": {"n": 40}, "domain_ppl": {"n": 12}},
               "scores": {m: {b: {k: score(m, b, k) for k in ks} for b, ks in metrics.items()} for m in preds}}
    results["paired"] = paired_results(preds, ["base", "sft"])
    return results


def test_table_rows_carry_paired_ci_and_verdicts():
    from slmforge.evaluate.compare import markdown_table, rows, verdict, worse_than_base

    results = _fixed_results()
    by = {(r["bench"], r["metric"]): r for r in rows(results)}
    mcq = by[("mcq", "acc")]["cells"]["sft"]["paired"]
    assert mcq["verdict"] == BEATS and mcq["diff"] == 0.625 and mcq["ci"][0] > 0 and mcq["p_mcnemar"] < 1e-6
    cloze = by[("cloze", "exact_match")]
    assert cloze["cells"]["sft"]["delta"] < 0 and cloze["cells"]["sft"]["paired"]["verdict"] == TIE
    assert not worse_than_base(cloze, "sft")  # a point drop inside the paired CI is not "worse"
    ppl = by[("domain_ppl", "word_perplexity")]
    p = ppl["cells"]["sft"]["paired"]
    assert p["verdict"] == WORSE and p["unit"] == "nats/word" and abs(p["diff"] - 0.3) < 1e-9 and "p_mcnemar" not in p
    assert worse_than_base(ppl, "sft") and by[("domain_ppl", "bits_per_byte")]["cells"]["sft"]["paired"]["verdict"] == WORSE
    assert by[("mcq", "acc")]["cells"]["base"]["paired"] is None
    line = verdict(results)
    assert ("It beats the base on 1 of 3 (mcq (acc)), not distinguishable on 1 (cloze (exact_match)), "
            "worse on 1 (domain_ppl (word_perplexity))") in line
    table = markdown_table(results)
    assert "Δ +0.625 [" in table and "→ BEATS" in table and "Δ nats/word +0.300 [+0.300, +0.300] → WORSE" in table
    assert "Δ −0.075 [" in table and "→ not distinguishable" in table


def test_paired_differences_plot():
    from slmforge.evaluate.compare import rows
    from slmforge.report.plots import paired_differences

    results = _fixed_results()
    uri = paired_differences(rows(results), ["base", "sft"])
    assert uri.startswith("data:image/png;base64,") and len(uri) > 2000
    assert paired_differences(rows(results), ["base"]) is None  # nothing to compare with
