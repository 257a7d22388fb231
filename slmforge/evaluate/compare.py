"""One comparison table, base vs every stage: rows are benchmark metrics, cells are value [95% CI] and the paired
difference from the base with its 95% CI and verdict (BEATS / WORSE / not distinguishable; see paired.py).

The same rows feed the terminal (rich), eval/table.md (pasted into the model card) and the HTML report.
"""

from __future__ import annotations

import math

from slmforge.evaluate.lm_eval_tasks import GENERAL, SPECS
from slmforge.evaluate.paired import BEATS, TIE, WORSE, paired_diff


def item_score(bench: str, metric: str, row: dict) -> float | None:
    """One item's score behind a metric, in the unit its paired difference is reported in.

    Accuracies, exact match, F1, ROUGE-L: the item's own value. Perplexity rows: the document's loss per unit
    (nats per word for word_perplexity, bits per byte), since a perplexity is exp of the pooled loss. The questions'
    answer_ppl: the gold answer's NLL per token.
    """
    spec = SPECS[bench]
    if spec.output_type == "loglikelihood_rolling":
        ll, units = row[metric]
        loss = -ll / max(1, units)
        return loss / math.log(2) if metric == "bits_per_byte" else loss
    if metric == "answer_ppl":
        return row["gold_nll"] / max(1, row["gold_tokens"])
    value = row.get(metric)
    return None if value is None else float(value)


def diff_unit(bench: str, metric: str) -> str:
    if SPECS[bench].output_type == "loglikelihood_rolling":
        return "bits/byte" if metric == "bits_per_byte" else "nats/word"
    return "nats/token" if metric == "answer_ppl" else ""


def paired_results(predictions: dict[str, list[dict]], models: list[str], seed: int = 0) -> dict:
    """{model: {bench: {metric: paired_diff + unit}}} for every model after the base, from the per-item rows of
    eval/predictions (items matched by id; an item only one side has is left out, and `n` says how many were paired)."""
    if not models:
        return {}
    base = {}
    for row in predictions.get(models[0], []):
        base.setdefault(row["bench"], {})[row["id"]] = row
    out: dict = {}
    for m in models[1:]:
        mine: dict[str, dict] = {}
        for row in predictions.get(m, []):
            mine.setdefault(row["bench"], {})[row["id"]] = row
        for bench, items in mine.items():
            if bench not in SPECS or bench not in base:
                continue
            spec = SPECS[bench]
            ids = [i for i in items if i in base[bench]]
            for metric in spec.metrics:
                a = [item_score(bench, metric, base[bench][i]) for i in ids]
                b = [item_score(bench, metric, items[i]) for i in ids]
                pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
                if not pairs:
                    continue
                res = paired_diff([x for x, _ in pairs], [y for _, y in pairs], binary=metric in spec.binary,
                                  higher_is_better=metric not in spec.lower_is_better, seed=seed)
                out.setdefault(m, {}).setdefault(bench, {})[metric] = {**res, "unit": diff_unit(bench, metric)}
    return out


def rows(results: dict) -> list[dict]:
    """[{bench, metric, n, chance, better: "higher"|"lower", general, cells: {model: {value, ci, delta, paired}}}]."""
    out = []
    models = [m["name"] for m in results["models"]]
    paired = results.get("paired", {})
    for bench, meta in results["benchmarks"].items():
        spec = SPECS[bench]
        for metric in spec.metrics:
            cells = {}
            for m in models:
                s = results["scores"].get(m, {}).get(bench, {}).get(metric)
                if s is None:
                    continue
                base = results["scores"].get(models[0], {}).get(bench, {}).get(metric)
                delta = None if m == models[0] or base is None else s["value"] - base["value"]
                cells[m] = {"value": s["value"], "ci": s["ci"], "n": s["n"], "delta": delta,
                            "paired": paired.get(m, {}).get(bench, {}).get(metric) if m != models[0] else None}
            out.append({"bench": bench, "metric": metric, "n": meta["n"], "chance": meta.get("chance") if metric in spec.binary or metric == "acc_norm" else None,
                        "better": "lower" if metric in spec.lower_is_better else "higher", "general": bench in GENERAL, "cells": cells})
    return out


def _num(v: float) -> str:
    return f"{v:.1f}" if abs(v) >= 100 else f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"


def _signed(v: float) -> str:
    return ("+" if v >= 0 else "−") + _num(abs(v))


def paired_text(p: dict | None) -> str:
    """'Δ +0.050 [−0.010, +0.110] p=0.21 → not distinguishable' (the difference's unit when it is not the metric's)."""
    if not p:
        return ""
    unit = f" {p['unit']}" if p.get("unit") else ""
    text = f"Δ{unit} {_signed(p['diff'])} [{_signed(p['ci'][0])}, {_signed(p['ci'][1])}]"
    if "p_mcnemar" in p:
        text += f" p={p['p_mcnemar']:.2g}"
    return f"{text} → {p['verdict']}"


def cell_text(cell: dict | None, markdown: bool = True) -> str:
    if cell is None:
        return "–"
    text = f"{_num(cell['value'])} [{_num(cell['ci'][0])}, {_num(cell['ci'][1])}]"
    if cell.get("paired"):
        text += f" · {paired_text(cell['paired'])}"
    elif cell["delta"] is not None:  # no per-item scores to pair (older results): the point change only
        text += f" ({'+' if cell['delta'] >= 0 else '−'}{_num(abs(cell['delta']))})"
    return text


def label(row: dict) -> str:
    arrow = "↓" if row["better"] == "lower" else "↑"
    return f"{row['bench']} {row['metric']} {arrow}"


def outcome(row: dict, model: str) -> str | None:
    """BEATS / WORSE / not distinguishable from the paired CI; None for the base or a model not scored on the row."""
    cell = row["cells"].get(model)
    if not cell or cell.get("paired") is None:
        return None
    return cell["paired"]["verdict"]


def worse_than_base(row: dict, model: str) -> bool:
    """Worse only when the paired 95% CI of the difference says so (a point drop inside the noise is not)."""
    return outcome(row, model) == WORSE


def beats_base(row: dict, model: str) -> bool:
    return outcome(row, model) == BEATS


def verdict(results: dict) -> str:
    """One sentence: on how many held-out domain benchmarks (first metric of each) the last model BEATS its base, is
    WORSE, or is not distinguishable from it, each judged by the paired 95% CI of the per-item differences."""
    models = [m["name"] for m in results["models"]]
    if len(models) < 2:
        return ""
    final, seen, counted = models[-1], set(), {BEATS: [], TIE: [], WORSE: []}
    for r in rows(results):
        if r["general"] or r["bench"] in seen or r["metric"] != SPECS[r["bench"]].metrics[0]:
            continue
        result = outcome(r, final)
        if result is None:
            continue
        seen.add(r["bench"])
        counted[result].append(f"{r['bench']} ({r['metric']})")
    if not seen:
        return ""
    n = len(seen)
    parts = [f"It beats the base on {len(counted[BEATS])} of {n}" + (f" ({', '.join(counted[BEATS])})" if counted[BEATS] else "")]
    if counted[TIE]:
        parts.append(f"not distinguishable on {len(counted[TIE])} ({', '.join(counted[TIE])})")
    if counted[WORSE]:
        parts.append(f"worse on {len(counted[WORSE])} ({', '.join(counted[WORSE])})")
    return (f"Verdict: the final model ({final}) vs {models[0]} on held-out domain benchmarks, by the paired 95% CI of "
            f"the per-item difference. " + ", ".join(parts) + ".")


def reference_rows(results: dict) -> list[list[str]]:
    """[[label, n, text]] for the no-model references (chance, word overlap, longest option) of each benchmark."""
    out = []
    for bench, refs in results.get("references", {}).items():
        for name, ref in refs.items():
            out.append([f"{bench} acc: {name.replace('_', ' ')} (no model)", str(ref["n"]),
                        f"{_num(ref['acc'])} [{_num(ref['ci'][0])}, {_num(ref['ci'][1])}]"])
    return out


def markdown_table(results: dict) -> str:
    models = [m["name"] for m in results["models"]]
    head = ["benchmark", "n", "chance", *models]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "--:", "--:", *["--:"] * len(models)]) + "|"]
    for r in rows(results):
        chance = "" if r["chance"] is None else f"{r['chance']:.3f}"
        cells = [cell_text(r["cells"].get(m)) for m in models]
        lines.append("| " + " | ".join([label(r), str(r["n"]), chance, *cells]) + " |")
    for name, n, text in reference_rows(results):  # no model at all: the value sits in the first column
        lines.append("| " + " | ".join([name, n, "", text, *[""] * (len(models) - 1)]) + " |")
    notes = [
        "",
        "Cells: score [95% CI] · Δ = paired difference from the base (mean over the same items) [paired-bootstrap 95% CI], "
        "p = exact McNemar for accuracies → BEATS when the CI lies on the better side of 0, WORSE on the other, else "
        "not distinguishable. Perplexity rows pair per-document loss (nats/word, bits/byte); answer_ppl pairs the gold "
        "answer's loss per token. Score CIs: Wilson for accuracies and exact match, bootstrap over items for F1/ROUGE-L "
        "and over documents for perplexity. ↑ higher is better, ↓ lower is better. general_* rows are the "
        "forgetting check (not domain data). Benchmarks are built only from held-out documents and decontaminated "
        "against every training artifact.",
    ]
    if "questions" in results.get("benchmarks", {}):
        notes[-1] += (" `questions` are yours (eval.questions): synthetic training data sharing a long n-gram with them is "
                      "removed by the generate stage (see the report); (no model) rows pick answers without any model.")
    chat = [b for b, m in results.get("benchmarks", {}).items() if m.get("chat_template")]
    if chat:
        notes[-1] += f" Asked in each model's chat template: {', '.join(chat)}; the rest as plain text."
    if verdict(results):
        notes += ["", verdict(results)]
    return "\n".join(lines + notes) + "\n"


def rich_table(results: dict):
    from rich.table import Table

    models = [m["name"] for m in results["models"]]
    table = Table(title="evaluation: base vs stages (value [95% CI] · paired Δ vs base [95% CI] → verdict)", header_style="bold")
    for col, just in (("benchmark", "left"), ("n", "right"), ("chance", "right")):
        table.add_column(col, justify=just)
    for m in models:
        table.add_column(m, justify="right")
    for r in rows(results):
        cells = []
        for m in models:
            text = cell_text(r["cells"].get(m))
            cells.append(f"[red]{text}[/red]" if worse_than_base(r, m) else f"[green]{text}[/green]" if beats_base(r, m) else text)
        table.add_row(label(r), str(r["n"]), "" if r["chance"] is None else f"{r['chance']:.2f}", *cells)
    for name, n, text in reference_rows(results):
        table.add_row(f"[dim]{name}[/dim]", n, "", f"[dim]{text}[/dim]", *[""] * (len(models) - 1))
    return table
