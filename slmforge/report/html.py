"""The run report: one self-contained HTML file (inline CSS and PNG plots) at runs/<name>/report.html.

Sections: data funnel (ingest/curate/generate manifest counts), evaluation table and per-benchmark bars (base vs
stages, 95% CIs, chance), forgetting check, loss curves (<stage>/log_history.json), sample generations base vs
specialist on held-out questions, decontamination, timings per stage, and every manifest.
"""

from __future__ import annotations

import json
import time
from html import escape
from pathlib import Path

from slmforge.artifacts import (CURATE, CURATE_REPORT, GENERATE, GENERATE_REPORT, INGEST, PREDICTIONS, REPORT, RESULTS, SFT, STAGES, TRAIN_STAGES,
                                log_history, predictions_file)
from slmforge.artifacts import MERGE_CANDIDATES
from slmforge.report import plots
from slmforge.run import atomic_write_text, read_jsonl

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}.worse{color:#b00}.better{color:#1a7f1a}
.muted{color:#777}pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:12px;max-height:420px}
img{max-width:100%}details{margin:.3em 0}.gen td{max-width:320px;white-space:pre-wrap}
"""


def _table(head: list[str], body: list[list[str]], cls: str = "") -> str:
    h = "".join(f"<th>{escape(c)}</th>" for c in head)
    rows = "".join("<tr>" + "".join(body_cell for body_cell in r) + "</tr>" for r in body)
    return f'<table class="{cls}"><tr>{h}</tr>{rows}</table>'


def _td(text: str, num: bool = False, extra: str = "") -> str:
    return f'<td class="{"num " if num else ""}{extra}">{escape(str(text))}</td>'


def _img(uri: str | None, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="{uri}">' if uri else f'<p class="muted">no data for {escape(alt)}</p>'


def funnel_steps(manifests: dict[str, dict]) -> list[tuple[str, float]]:
    steps = []
    ing = (manifests.get(INGEST) or {}).get("counts", {})
    cur = (manifests.get(CURATE) or {}).get("counts", {})
    gen = (manifests.get(GENERATE) or {}).get("counts", {})
    sft = (manifests.get(SFT) or {}).get("counts", {})
    candidates = gen.get("items", 0) + gen.get("rejected", 0) if gen else None
    for label, value in (("files read", ing.get("files")), ("documents", ing.get("documents")), ("chunks", ing.get("chunks")),
                         ("curated train chunks", cur.get("train_chunks")), ("held-out chunks (eval only)", cur.get("heldout_chunks")),
                         ("generated candidates", candidates), ("accepted items", gen.get("items")),
                         ("SFT rows", gen.get("sft_rows")), ("SFT rows trained on", sft.get("conversations")),
                         ("DPO pairs", gen.get("dpo_rows")), ("pretraining rows", gen.get("pretrain_rows"))):
        if isinstance(value, (int, float)) and value > 0:
            steps.append((label, value))
    return steps


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _funnel_section(manifests: dict, run=None) -> str:
    """The funnel plot, then where data was dropped and why: ingest, curation, and each generator's verification."""
    cur = (manifests.get(CURATE) or {}).get("counts", {})
    ing = (manifests.get(INGEST) or {}).get("counts", {})
    tables = []
    dropped = [[_td(f"ingest: {k}"), _td(f"{v:,}", True)] for k, v in (ing.get("rejected_by_reason") or {}).items()]
    dropped += [[_td(f"curate: {k.replace('_', ' ')}"), _td(f"{v:,}", True)] for k, v in cur.get("removed", {}).items()]
    if dropped:
        tables.append(_table(["removed (stage: reason)", "files / chunks"], dropped))
    tables += _curate_documents_tables(_read_json(run.path(CURATE_REPORT)) if run else {})
    per_generator = _read_json(run.path(GENERATE_REPORT)).get("per_generator", {}) if run else {}
    if per_generator:
        body = [[_td(name), _td(f"{g['candidates']:,}", True), _td(f"{g['accepted']:,}", True), _td(f"{g['rate']:.0%}", True),
                 _td(", ".join(f"{k} {v}" for k, v in sorted(g["reasons"].items(), key=lambda kv: -kv[1])) or "—")]
                for name, g in per_generator.items()]
        tables.append(_table(["generator (kind/origin)", "candidates", "accepted", "rate", "rejection reasons"], body))
    return "<h2>Data funnel</h2>" + _img(plots.funnel(funnel_steps(manifests)), "data funnel") + "".join(tables)


def _curate_documents_tables(report: dict, listed: int = 20) -> list[str]:
    """Which documents lost what share of their text to which curate filter (worst first), and the bounds used."""
    out = []
    docs = [d for d in report.get("documents", []) if d.get("warned")]
    if docs:
        share = report.get("document_warn_share")
        steps = sorted({s for d in docs for s in d["removed"]})
        body = [[_td(d["source"]), _td(f"{d['chunks']:,}", True)]
                + [_td(f"{d['removed'][s]['share']:.0%} ({d['removed'][s]['chunks']})" if s in d["removed"] else "–", True,
                       "worse" if s in d["warned"] else "") for s in steps]
                for d in docs[:listed]]
        more = f" ({len(docs) - listed} more in curate/report.json)" if len(docs) > listed else ""
        head = f"documents that lost over {share:.0%} of their text to a filter" if isinstance(share, (int, float)) else \
            "documents that lost text to a filter"
        out.append(f"<p class='muted'>{escape(head)}: {len(docs)}{escape(more)}; share of the document's chunk tokens "
                   "(removed chunks)</p>")
        out.append(_table(["document", "chunks", *[f"curate: {s.replace('_', ' ')}" for s in steps]], body))
    bounds = report.get("bounds") or {}
    if bounds:
        body = [[_td(k), _td(f"{v['median']:g}" if v.get("median") is not None else "–", True), _td(f"{v['bound']:g}", True),
                 _td(f"{v['gopher']:g}", True)] for k, v in bounds.items()]
        out.append(f"<details><summary>curate quality bounds ({escape(str(report.get('quality_mode')))} mode)</summary>"
                   + _table(["statistic", "corpus median", "bound used", "Gopher (web text)"], body) + "</details>")
    return out


def _eval_section(results: dict | None) -> str:
    if not results:
        return '<h2>Evaluation</h2><p class="muted">not evaluated yet: run <code>slmforge eval</code></p>'
    from slmforge.evaluate.compare import beats_base, cell_text, label, reference_rows, rows, verdict, worse_than_base

    models = [m["name"] for m in results["models"]]
    table_rows = rows(results)
    body = []
    for r in table_rows:
        cells = [_td(label(r)), _td(r["n"], True), _td("" if r["chance"] is None else f"{r['chance']:.3f}", True)]
        cells += [_td(cell_text(r["cells"].get(m)), True, "worse" if worse_than_base(r, m) else "better" if beats_base(r, m) else "")
                  for m in models]
        body.append(cells)
    for name, n, text in reference_rows(results):
        body.append([_td(name), _td(n, True), _td(""), _td(text, True), *[_td("") for _ in models[1:]]])
    html = ["<h2>Evaluation: base vs stages</h2>",
            "<p>Value [95% CI] · Δ = paired difference from the base on the same items [paired-bootstrap 95% CI] (p = exact "
            "McNemar for accuracies) → BEATS only when the CI lies on the better side of 0, WORSE on the other side, else "
            "not distinguishable (so is a CI resting on a handful of differing items: exact sign test p ≥ 0.05); green = BEATS, red = WORSE. Rows marked (no model) pick answers without any model. "
            "Benchmarks come only from held-out documents (or your questions) and are frozen (sha256 below); every model "
            "is scored on identical items with lm-evaluation-harness.</p>",
            f"<p><b>{escape(verdict(results))}</b></p>",
            _table(["benchmark", "n", "chance", *models], body),
            _img(plots.paired_differences(table_rows, models), "paired differences from the base"),
            _img(plots.benchmark_bars([r for r in table_rows if not r["general"]], models), "domain benchmarks")]
    general = [r for r in table_rows if r["general"]]
    if general:
        html += ["<h3>Forgetting check (general ability, not domain data)</h3>", _img(plots.benchmark_bars(general, models), "general")]
    html.append(_open_book_section(results, models))
    bench_rows = [[_td(b), _td(m["n"], True), _td(m.get("built") or m.get("description", "")), _td(m["sha256"][:16])]
                  for b, m in results["benchmarks"].items()]
    html += ["<h3>Frozen benchmarks</h3>", _table(["benchmark", "items", "what", "sha256"], bench_rows)]
    html.append(_questions_note(results))
    d = results.get("decontamination", {})
    if d:
        html.append(f"<h3>Decontamination</h3><p>{d.get('dropped', 0)} candidate items dropped: ≥ {d.get('max_overlap')} of their "
                    f"{d.get('ngram')}-word n-grams occur in training data ({escape(json.dumps(d.get('training_rows', {})))} rows "
                    f"indexed). Candidates per kind: {escape(json.dumps(d.get('candidates', {})))}; teacher: "
                    f"{escape(str(results.get('teacher')))}.</p>")
        if d.get("examples"):
            html.append(_table(["dropped item", "overlap"], [[_td(e["text"]), _td(e["overlap"], True)] for e in d["examples"]]))
    timing = [[_td(m["name"]), _td(m["path"]), _td(f"{m['seconds']:.1f}s", True)] for m in results["models"]]
    html += ["<h3>Scoring time per model</h3>", _table(["model", "from", "seconds"], timing)]
    return "".join(html)


def _open_book_section(results: dict, models: list[str]) -> str:
    """Closed-book and open-book scores side by side per question benchmark, and retrieval's recall@k."""
    from slmforge.evaluate.lm_eval_tasks import OPEN_BOOK, SPECS

    scores, benches = results.get("scores", {}), results.get("benchmarks", {})
    body = []
    for closed, opened in OPEN_BOOK.items():
        if opened not in benches:
            continue
        metric = SPECS[closed].metrics[0]
        for m in models:
            a = scores.get(m, {}).get(closed, {}).get(metric)
            b = scores.get(m, {}).get(opened, {}).get(metric)
            if a is None or b is None:
                continue
            recall = benches[opened].get("retrieval_recall") or {}
            body.append([_td(closed if m == models[0] else ""), _td(metric if m == models[0] else ""), _td(m),
                         _td(f"{a['value']:.3f}", True), _td(f"{b['value']:.3f}", True), _td(f"{b['value'] - a['value']:+.3f}", True),
                         _td(" · ".join(f"@{k} {v:.0%}" for k, v in recall.items()) if m == models[0] and recall else "", True)])
    if not body:
        return ""
    generate = results.get("retrieval") or {}
    note = ("<p>Open book: each question after the passages the run's BM25 index finds for it (training + held-out "
            "documents, as a deployed specialist searches; the model never trained on the held-out ones). Recall@k: share "
            "of items whose source chunk is among the top k passages. Paired differences of each open-book row from the "
            "base are in the table above (rows ending in _open).</p>")
    if generate.get("recall@k"):
        note += ("<p>Recall@k of the generated training questions' source chunks (training index): "
                 + escape(" · ".join(f"@{k} {v:.0%}" for k, v in generate["recall@k"].items() if v is not None)) + "</p>")
    return ("<h3>Closed book vs open book</h3>" + note +
            _table(["benchmark", "metric", "model", "closed book", "open book", "open − closed", "retrieval recall"], body))


def _merge_section(doc: dict | None) -> str:
    """The merge candidates (slmforge/merge): the table the stage wrote, the trade-off plot, and the choice."""
    if not doc:
        return ""
    from slmforge.evaluate.lm_eval_tasks import SPECS  # not slmforge.merge: eval's code hash would then cover the merge stage

    def headline(bench: str) -> str:
        return SPECS[bench].metrics[0]

    domain = doc["domain_benchmarks"]
    body = []
    for r in doc["candidates"] + ([doc["prune"]["row"]] if doc.get("prune") else []):
        label = r["name"] + (" (kept)" if r.get("chosen") else "") + (f" (Δ vs {r['compared_with']})" if r.get("compared_with") else "")
        cells = [_td(label), _td(f"{r['domain_score']:.3f}", True),
                 _td(f"{r['domain_gain']:+.3f}", True, "better" if r["domain_gain"] > 0 else "worse" if r["domain_gain"] < 0 else "")]
        for b in domain:
            v, p = r["scores"].get(b), r["paired"].get(b)
            text = "–" if v is None else f"{v['value']:.3f}"
            if p:
                text += f" · Δ {p['diff']:+.3f} [{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}] → {p['verdict']}"
            cells.append(_td(text, True))
        f = r["forgetting"]
        cells += [_td("–" if f is None else f"{f:+.1%}", True, "" if r.get("within_limit") else "worse")]
        body.append(cells)
    html = ["<h2>Merge candidates</h2>",
            f"<p><b>Kept: {escape(doc['chosen'])}</b>: {escape(doc['reason'])}.</p>",
            "<p>Each candidate is scored on the same seeded sample of the frozen held-out benchmarks "
            f"({escape(', '.join(f'{b} {n}' for b, n in doc['benchmarks'].items()))} items); domain score = mean of the "
            "headline metrics; Δ = paired difference from the unmerged specialist [paired-bootstrap 95% CI]; forgetting = "
            f"general-text perplexity vs the base (limit {doc['max_forgetting']:.0%}).</p>",
            _table(["candidate", "domain score", "Δ vs specialist", *[f"{b} {headline(b)}" for b in domain], "forgetting"], body),
            _img(plots.merge_tradeoff(doc), "domain gain vs forgetting")]
    p = doc.get("prune")
    if p:
        html.append(f"<p>Pruned (MLP channels, importance on domain + general text): {p['params_before']:,} → "
                    f"{p['params_after']:,} parameters ({p['params_after'] / p['params_before']:.1%}), intermediate_size "
                    f"{p['intermediate_before']} → {p['intermediate_after']}, recovery {p.get('recovery_steps')} steps; "
                    f"transformers tokens/s {p['tokens_per_s_unpruned']} → {p['tokens_per_s_pruned']}.</p>")
    return "".join(html)


def _questions_note(results: dict) -> str:
    """Your questions: how they were kept out of training, and how much of them the training files still contain."""
    q = results.get("benchmarks", {}).get("questions")
    if not q:
        return ""
    text = [f"Your questions ({q['n']} from {q.get('source', '')}): {q.get('built', '')}."]
    removed = q.get("removed_from_training")
    if removed:
        text.append(f"The generate stage removed {removed['items_removed']} training items and {removed['pretrain_rows_removed']} "
                    f"pretraining rows sharing a long n-gram with {removed['questions_hit']} of them.")
    elif removed is None:
        text.append("The generate stage has not run with these questions (no synthetic data was decontaminated against them).")
    o = q.get("training_overlap") or {}
    if o:
        text.append(f"{o['overlapping']} of {q['n']} questions (question + answer) still share {o['ngram']}-word n-grams with "
                    f"the training files (max share {o['max']:.0%}); the documents themselves (curate/train.jsonl) are "
                    "trained on verbatim, so keep FAQ pages out of the documents folder.")
    return "<h3>Your questions</h3><p>" + escape(" ".join(text)) + "</p>"


def _samples_section(predictions: dict[str, list[dict]], models: list[str], n: int) -> str:
    """A few held-out questions: the reference answer, then each model's generation side by side."""
    if not predictions or n <= 0:
        return ""
    base = predictions.get(models[0], []) if models else []
    for bench in ("qa", "summary", "cloze"):
        picked = [r for r in base if r.get("bench") == bench and "prediction" in r][:n]
        if picked:
            break
    else:
        return ""
    by_model = {m: {(r["bench"], r["id"]): r for r in predictions.get(m, [])} for m in models}
    body = []
    for r in picked:
        cells = [_td(r["prompt"][-400:]), _td(r["reference"])]
        cells += [_td(by_model[m].get((bench, r["id"]), {}).get("prediction", "–")) for m in models]
        body.append(cells)
    return (f"<h2>Sample generations ({escape(bench)}, held-out)</h2>"
            + _table(["prompt", "reference", *models], body, "gen"))


def _stage_files(run) -> tuple[dict, dict]:
    manifests = {s: m for s in STAGES if (m := run.manifest(s))}
    histories = {}
    for s in TRAIN_STAGES:
        path = run.path(log_history(s))
        if path.is_file():
            try:
                histories[s] = json.loads(path.read_text())
            except json.JSONDecodeError:
                pass
    return manifests, histories


def render(run, results: dict | None = None, predictions: dict | None = None, samples: int = 4,
           extra_timings: dict | None = None, merge: dict | None = None) -> str:
    manifests, histories = _stage_files(run)
    if merge is None and run.has(MERGE_CANDIDATES):
        merge = json.loads(run.path(MERGE_CANDIDATES).read_text())
    if results is None and run.has(RESULTS):
        results = json.loads(run.path(RESULTS).read_text())
    if predictions is None and results:
        pred_dir = run.path(PREDICTIONS)
        predictions = {m["name"]: read_jsonl(pred_dir / predictions_file(m["name"])) for m in results["models"]
                       if (pred_dir / predictions_file(m["name"])).is_file()}
    models = [m["name"] for m in results["models"]] if results else []
    timings = {s: m.get("seconds") for s, m in manifests.items()}
    timings.update(extra_timings or {})
    timing_rows = [[_td(s), _td(f"{t:.1f}s" if isinstance(t, (int, float)) else "–", True),
                    _td(manifests.get(s, {}).get("started", "now"))] for s, t in timings.items()]
    name = run.root.name
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>slmforge report: {escape(name)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>slmforge run report: {escape(name)}</h1>",
        f"<p class='muted'>written {time.strftime('%Y-%m-%d %H:%M:%S')} · {escape(str(run.root))}</p>",
        _funnel_section(manifests, run),
        _eval_section(results),
        _merge_section(merge),
        "<h2>Training loss</h2>" + _img(plots.loss_curves(histories), "loss curves (no log_history.json yet)"),
        _samples_section(predictions or {}, models, samples),
        "<h2>Timings per stage</h2>" + _table(["stage", "seconds", "started"], timing_rows),
        "<h2>Manifests</h2>",
        *[f"<details><summary>{escape(s)}</summary><pre>{escape(json.dumps(m, indent=2, default=str))}</pre></details>"
          for s, m in manifests.items()],
        "</body></html>",
    ]
    return "\n".join(parts)


def write_report(run, results: dict | None = None, predictions: dict | None = None, samples: int = 4,
                 extra_timings: dict | None = None, merge: dict | None = None) -> Path:
    path = run.path(REPORT)
    atomic_write_text(path, render(run, results, predictions, samples, extra_timings, merge))
    return path
