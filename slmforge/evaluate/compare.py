"""One comparison table, base vs every stage: rows are benchmark metrics, cells are value [95% CI] (change from base).

The same rows feed the terminal (rich), eval/table.md (pasted into the model card) and the HTML report.
"""

from __future__ import annotations

from slmforge.evaluate.lm_eval_tasks import GENERAL, SPECS


def rows(results: dict) -> list[dict]:
    """[{bench, metric, n, chance, better: "higher"|"lower", general, cells: {model: {value, ci, delta}}}]."""
    out = []
    models = [m["name"] for m in results["models"]]
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
                cells[m] = {"value": s["value"], "ci": s["ci"], "n": s["n"], "delta": delta}
            out.append({"bench": bench, "metric": metric, "n": meta["n"], "chance": meta.get("chance") if metric in spec.binary or metric == "acc_norm" else None,
                        "better": "lower" if metric in spec.lower_is_better else "higher", "general": bench in GENERAL, "cells": cells})
    return out


def _num(v: float) -> str:
    return f"{v:.1f}" if abs(v) >= 100 else f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"


def cell_text(cell: dict | None, markdown: bool = True) -> str:
    if cell is None:
        return "–"
    text = f"{_num(cell['value'])} [{_num(cell['ci'][0])}, {_num(cell['ci'][1])}]"
    if cell["delta"] is not None:
        text += f" ({'+' if cell['delta'] >= 0 else '−'}{_num(abs(cell['delta']))})"
    return text


def label(row: dict) -> str:
    arrow = "↓" if row["better"] == "lower" else "↑"
    return f"{row['bench']} {row['metric']} {arrow}"


def worse_than_base(row: dict, model: str) -> bool:
    d = row["cells"].get(model, {}).get("delta")
    return d is not None and (d < 0 if row["better"] == "higher" else d > 0)


def verdict(results: dict) -> str:
    """One sentence: where the last model beats its base on the domain benchmarks (first metric of each), and where not."""
    models = [m["name"] for m in results["models"]]
    if len(models) < 2:
        return ""
    final, seen, outcome = models[-1], set(), {"better": [], "worse": [], "unchanged": []}
    for r in rows(results):
        if r["general"] or r["bench"] in seen or r["cells"].get(final, {}).get("delta") is None:
            continue
        seen.add(r["bench"])
        delta = r["cells"][final]["delta"]
        key = "unchanged" if delta == 0 else ("worse" if worse_than_base(r, final) else "better")
        outcome[key].append(f"{r['bench']} ({r['metric']})")
    parts = [f"{k} on {', '.join(v)}" for k, v in outcome.items() if v]
    return (f"Verdict: the final model ({final}) vs {models[0]} on held-out domain benchmarks: " + "; ".join(parts) + ". "
            f"It beats the base on {len(outcome['better'])} of {len(seen)}.")


def markdown_table(results: dict) -> str:
    models = [m["name"] for m in results["models"]]
    head = ["benchmark", "n", "chance", *models]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "--:", "--:", *["--:"] * len(models)]) + "|"]
    for r in rows(results):
        chance = "" if r["chance"] is None else f"{r['chance']:.3f}"
        cells = [cell_text(r["cells"].get(m)) for m in models]
        lines.append("| " + " | ".join([label(r), str(r["n"]), chance, *cells]) + " |")
    notes = [
        "",
        "Cells: score [95% CI] (change from base). CIs: Wilson for accuracies and exact match, bootstrap over items for "
        "F1/ROUGE-L and over documents for perplexity. ↑ higher is better, ↓ lower is better. general_* rows are the "
        "forgetting check (not domain data). Benchmarks are built only from held-out documents and decontaminated "
        "against every training artifact.",
    ]
    chat = [b for b, m in results.get("benchmarks", {}).items() if m.get("chat_template")]
    if chat:
        notes[-1] += f" Asked in each model's chat template: {', '.join(chat)}; the rest as plain text."
    if verdict(results):
        notes += ["", verdict(results)]
    return "\n".join(lines + notes) + "\n"


def rich_table(results: dict):
    from rich.table import Table

    models = [m["name"] for m in results["models"]]
    table = Table(title="evaluation: base vs stages (value [95% CI] (Δ vs base))", header_style="bold")
    for col, just in (("benchmark", "left"), ("n", "right"), ("chance", "right")):
        table.add_column(col, justify=just)
    for m in models:
        table.add_column(m, justify="right")
    for r in rows(results):
        cells = []
        for m in models:
            text = cell_text(r["cells"].get(m))
            cells.append(f"[red]{text}[/red]" if worse_than_base(r, m) else text)
        table.add_row(label(r), str(r["n"]), "" if r["chance"] is None else f"{r['chance']:.2f}", *cells)
    return table
