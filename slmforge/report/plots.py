"""Matplotlib figures for the run report, returned as inline PNG data URIs (the report stays one self-contained file)."""

from __future__ import annotations

import base64
import io

COLORS = ("#7f7f7f", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display here, and none needed
    import matplotlib.pyplot as plt

    return plt


def to_data_uri(fig) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def benchmark_bars(table_rows: list[dict], models: list[str]) -> str | None:
    """One panel per benchmark metric: a bar per model with its 95% CI, and the chance level as a dashed line."""
    if not table_rows or not models:
        return None
    plt = _plt()
    cols = min(4, len(table_rows))
    nrows = (len(table_rows) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.3 * cols, 2.8 * nrows), squeeze=False)
    for ax, r in zip(axes.flat, table_rows):
        names = [m for m in models if m in r["cells"]]
        vals = [r["cells"][m]["value"] for m in names]
        lo = [max(0.0, v - r["cells"][m]["ci"][0]) for m, v in zip(names, vals)]
        hi = [max(0.0, r["cells"][m]["ci"][1] - v) for m, v in zip(names, vals)]
        ax.bar(range(len(names)), vals, yerr=[lo, hi], capsize=4, color=[COLORS[i % len(COLORS)] for i in range(len(names))])
        if r.get("chance") is not None:
            ax.axhline(r["chance"], ls="--", lw=1, color="black", label="chance")
            ax.legend(fontsize=7, loc="upper right")
        ax.set_xticks(range(len(names)), names, fontsize=8)
        arrow = "↓" if r["better"] == "lower" else "↑"
        ax.set_title(f"{r['bench']} · {r['metric']} {arrow} (n={r['n']})", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(table_rows):]:
        ax.axis("off")
    fig.tight_layout()
    return to_data_uri(fig)


VERDICT_COLORS = {"BEATS": "#2ca02c", "WORSE": "#d62728"}  # anything else (not distinguishable): grey


def paired_differences(table_rows: list[dict], models: list[str]) -> str | None:
    """Forest plot: each model's paired difference from the base with its 95% CI, one line per benchmark metric,
    a panel per unit (score points, nats/word, ...); green = BEATS, red = WORSE, grey = not distinguishable."""
    panels: dict[str, list[tuple[str, dict]]] = {}
    for r in table_rows:
        arrow = "↓" if r["better"] == "lower" else "↑"
        for m in models[1:]:
            p = (r["cells"].get(m) or {}).get("paired")
            if p:
                panels.setdefault(p.get("unit") or "score", []).append((f"{r['bench']} {r['metric']} {arrow} · {m}", p))
    if not panels:
        return None
    plt = _plt()
    heights = [0.32 * len(v) + 0.9 for v in panels.values()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7.5, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (unit, lines) in zip(axes.flat, panels.items()):
        for y, (_, p) in enumerate(lines):
            color = VERDICT_COLORS.get(p["verdict"], "#7f7f7f")
            ax.errorbar(p["diff"], y, xerr=[[max(0.0, p["diff"] - p["ci"][0])], [max(0.0, p["ci"][1] - p["diff"])]],
                        fmt="o", color=color, capsize=3, ms=4)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(lines)), [name for name, _ in lines], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(f"difference from base ({unit}), paired 95% CI", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    return to_data_uri(fig)


def loss_curves(histories: dict[str, list[dict]]) -> str | None:
    """Training (and eval, when logged) loss per step for each stage's Trainer log_history."""
    series = {s: h for s, h in histories.items() if any("loss" in e or "eval_loss" in e for e in h)}
    if not series:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 2.8), squeeze=False)
    for ax, (stage, hist) in zip(axes.flat, series.items()):
        for key, style in (("loss", "-"), ("eval_loss", "--o")):
            pts = [(e.get("step", i), e[key]) for i, e in enumerate(hist) if isinstance(e.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), style, label=key, ms=3)
        ax.set_title(stage, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=7)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return to_data_uri(fig)


def funnel(steps: list[tuple[str, float]]) -> str | None:
    """Horizontal bars: how much data survived each step (files -> chunks -> curated -> generated)."""
    if not steps:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(steps) + 0.6))
    labels, values = zip(*steps)
    ax.barh(range(len(steps)), values, color="#1f77b4")
    ax.set_yticks(range(len(steps)), labels, fontsize=8)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:,.0f}", va="center", fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    return to_data_uri(fig)


def merge_tradeoff(doc: dict) -> str | None:
    """Merge candidates: forgetting (general-text perplexity vs base) on x, domain score gain over the unmerged
    specialist on y; the forgetting limit as a dashed line, the kept candidate circled, a pruned model as a square."""
    rows = [r for r in doc.get("candidates", []) if r.get("forgetting") is not None]
    pruned = (doc.get("prune") or {}).get("row")
    if pruned and pruned.get("forgetting") is not None:
        rows = rows + [pruned]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    # y from the domain scores: a pruned row's own gain is against the model it was cut from, not the specialist
    spec = next((r["domain_score"] for r in doc["candidates"] if r["name"] == doc.get("specialist")), None)
    for r in rows:
        x, y = 100 * r["forgetting"], (r["domain_score"] - spec if spec is not None else r["domain_gain"])
        color = "#2ca02c" if r.get("within_limit") else "#d62728"
        ax.scatter([x], [y], s=90 if r.get("chosen") else 30, marker="s" if r.get("pruned") else "o", color=color,
                   edgecolors="black" if r.get("chosen") else "none", linewidths=1.5, zorder=3)
        ax.annotate(r["name"], (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.axvline(100 * doc["max_forgetting"], ls="--", lw=1, color="black", label=f"max_forgetting {doc['max_forgetting']:.0%}")
    ax.axhline(0, lw=0.8, color="#999")
    ax.set_xlabel("forgetting: general-text perplexity vs base (%)", fontsize=8)
    ax.set_ylabel("domain score − unmerged specialist", fontsize=8)
    ax.set_title(f"merge candidates (kept: {doc['chosen']})", fontsize=9)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    return to_data_uri(fig)
