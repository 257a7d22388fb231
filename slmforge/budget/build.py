"""A build under a budget: probe (cached), settle `precision: auto`, plan, and record planned against actual seconds.

`prepare` returns the recipe every stage of this invocation runs with: precision and the planned fields set on its
typed sections, so the stages' cache keys see them (an unchanged plan skips finished stages; a changed one reruns).
It writes runs/<name>/budget.json (plan, probe figures, precision choice, fixed-cost estimates) and, after each stage,
that stage's planned and actual seconds; each stage's own manifest gets its planned seconds and precision under "build".
After each training stage that ran, `Build.replan` re-plans the stages still to run at the pace training actually had
(plan.replan): budget.json keeps every re-plan under "replans" and the latest plan under "plan".
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from slmforge import artifacts as art
from slmforge.budget import plan as planner
from slmforge.budget.probes import Figures, figures
from slmforge.run import RunDir, atomic_write_json

TRAIN = art.TRAIN_STAGES
# first-build estimates of the stages the plan does not size, per MB of documents (this 2-core AMX Xeon, demo corpus);
# replaced by the previous build's manifests once there are some
PER_MB = {art.INGEST: (1.0, 2.0), art.CURATE: (5.0, 10.0), art.INDEX: (0.5, 1.0), art.GENERATE: (5.0, 15.0)}
EXPORT_S, EXPORT_PER_GGUF_S = 15.0, 25.0  # (an AVX2-only EPYC, 1.9-2.4x slower per training token, exported in 93 s too)
# the first export on a machine downloads llama.cpp's converter (the llama-cpp-python sdist, ~75 MB) and unpacks its
# Python part: 123 s more than the same export with it cached, on that EPYC
CONVERTER_FETCH_S = 120.0


def documents_mb(folder: Path) -> float:
    """Size of the documents folder (a cheap measure: stat only)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 1e6


def _rows(path: Path | None) -> int:
    if path is None or not Path(path).is_file():
        return 0
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return sum(1 for line in text.splitlines() if line.strip()) - (1 if Path(path).suffix == ".csv" else 0)


def _converter_ready(spec: str) -> bool:
    from slmforge.export import gguf

    try:
        gguf.find_converter(spec, fetch=False)
    except gguf.ConverterMissing:
        return False
    return True


def fixed_costs(recipe, run: RunDir, fig: Figures) -> dict:
    """Seconds of the stages the plan does not size: the previous build's manifests when present, else per MB."""
    mb = documents_mb(recipe.documents)
    facts: dict = {"documents_mb": round(mb, 3), "questions": _rows(recipe.eval.questions), "source": {}}
    for stage, (base, per_mb) in PER_MB.items():
        facts[stage] = base + per_mb * mb
        facts["source"][stage] = "estimate (documents MB)"
    facts[art.EXPORT] = EXPORT_S + EXPORT_PER_GGUF_S * len(recipe.export.gguf)
    facts["source"][art.EXPORT] = "estimate (GGUF files)"
    if recipe.export.gguf and not _converter_ready(recipe.export.llama_cpp):
        facts[art.EXPORT] += CONVERTER_FETCH_S
        facts["source"][art.EXPORT] += ", converter download"
    benchmarks = ((run.manifest(art.EVAL) or {}).get("counts") or {}).get("benchmarks") or {}
    if benchmarks:  # how many questions the held-out documents gave last time (at most eval.doc_questions)
        facts["doc_questions"] = int(benchmarks.get("doc_questions", 0))
    for stage in (art.INGEST, art.CURATE, art.INDEX, art.GENERATE, art.EXPORT):
        done = run.manifest(stage)
        if not done or done.get("adopted") or "seconds" not in done:
            continue
        seconds = float(done["seconds"])
        if stage == art.GENERATE:  # its extractive part: the teacher's predicted share of that build taken out
            try:
                before = planner.apply(recipe, {})
                before.generate = type(recipe.generate).model_validate(done["config"]["stage"])
                seconds = max(1.0, seconds - planner.teacher_seconds(before, fig))
            except (KeyError, ValueError):
                continue
        facts[stage] = round(seconds, 1)
        facts["source"][stage] = "previous manifest"
    return {k: (round(v, 1) if isinstance(v, float) else v) for k, v in facts.items()}


def precision_record(fig: Figures, tokens: int) -> dict:
    """precision: auto's choice and the step times it was made on (seconds per step of `tokens` tokens)."""
    return {"choice": fig.precision, "tokens_per_step": tokens,
            "step_s": {p: round(fig.step_seconds(tokens, p), 3) for p in fig.train},
            "measured": {p: f.measured for p, f in fig.train.items()}, **({"note": fig.bf16_note} if fig.bf16_note else {})}


class Build:
    """Planned and actual seconds of one invocation's stages; feeds budget.json, the manifests and the console ETA."""

    def __init__(self, run: RunDir, record: dict, planned: dict[str, float], planning: tuple | None = None):
        """`planning`: (recipe as written, figures, fixed-cost facts, Plan) of a budgeted build, for re-plans."""
        self.run, self.record, self.planned, self.planning = run, record, planned, planning
        self.started = time.time()
        self.order: list[str] = []
        self.record.setdefault("stages", {})

    def start(self, stages: list[str]) -> None:
        """This invocation runs `stages`: the console's build ETA counts their planned seconds."""
        from slmforge import console

        self.order = list(stages)
        planned = {s: self.planned[s] for s in stages if s in self.planned}
        console.build_clock = console.BuildClock(planned, self.record.get("budget_s")) if planned else None
        self.started = time.time()

    def header(self, stage: str) -> str:
        """Beside the stage's name: its planned seconds and the whole build's ETA."""
        from slmforge import console

        clock = console.build_clock
        if clock is None or stage not in self.planned:
            return ""
        clock.begin(stage)
        clock.deadline = self.deadline(stage)
        return f"  [dim](planned {_fmt(self.planned[stage])}; {clock.line()})[/dim]"

    def deadline(self, stage: str) -> float | None:
        """The wall-clock time (epoch seconds) by which `stage`, starting now, must end for the build to end within its
        budget: the budget less the probes, the stages finished so far (a skipped one at what it cost) and the planned
        seconds of the stages after it. None without a budget. Training stops there (slmforge/train/job.py): a plan that
        turned out optimistic costs the last steps, not the budget."""
        budget = self.record.get("budget_s")
        if not budget:
            return None
        finished = self.record["stages"]
        after = self.order[self.order.index(stage) + 1:] if stage in self.order else []
        left = (budget - self.record.get("probe_wall_s", 0.0) - sum(s["spent_s"] for s in finished.values())
                - sum(self.planned.get(s, 0.0) for s in after if s not in finished))
        return time.time() + left

    def notes(self, stage: str) -> dict | None:
        out = {}
        if stage in self.planned:
            out["planned_s"] = self.planned[stage]
        if stage in TRAIN and "precision" in self.record:
            out["precision"] = self.record["precision"]
        if "budget_s" in self.record:
            out["budget_s"] = self.record["budget_s"]
        return out or None

    def finished(self, stage: str, seconds: float, skipped: bool, spent: float | None = None) -> None:
        """`seconds` this invocation took for the stage; `spent`: what the stage cost the build (a skipped stage's
        manifest seconds: it ran earlier in the same budget)."""
        from slmforge import console

        if console.build_clock is not None:
            console.build_clock.end(stage)
        self.record["stages"][stage] = {"planned_s": self.planned.get(stage), "actual_s": round(seconds, 1), "skipped": skipped,
                                        "spent_s": round(seconds if spent is None else spent, 1)}
        stages = self.record["stages"].values()
        self.record["total"] = {"planned_s": round(sum(s["planned_s"] or 0 for s in stages), 1),
                                "actual_s": round(sum(s["actual_s"] for s in stages), 1),
                                "wall_s": round(time.time() - self.started, 1)}
        self.save()

    def _data_facts(self, recipe, remaining: list[str]) -> dict:
        """What the stages still to run will train on, measured now that generate has written it: the mean tokens of
        the DPO pairs (the planner priced them at dpo.max_length before)."""
        if art.DPO not in remaining or not recipe.dpo.enabled or not self.run.has(art.DPO_ROWS):
            return {}
        from slmforge.train.dpo import usable_pairs

        rows = [r.model_dump(mode="json", exclude_unset=True) for r in self.run.read(art.DPO_ROWS)]
        try:
            pairs, _ = usable_pairs(rows, recipe.dpo, recipe.base_model, self.run.path(art.DPO_ROWS))
        except ValueError:
            return {}  # the DPO stage itself names what is wrong with the file
        return {"dpo_pair_tokens": round(sum(p["length"] for p in pairs) / len(pairs), 1)}

    def replan(self, stage: str, recipe, say=print):
        """The recipe the rest of the build runs with, re-planned after `stage` when it was a training stage that ran;
        `recipe` itself when nothing changed."""
        from slmforge import console

        done = self.record["stages"]
        if self.planning is None or stage not in TRAIN or done.get(stage, {}).get("skipped", True):
            return recipe
        written, fig, facts, plan = self.planning
        measured = self._data_facts(recipe, [s for s in self.order if s not in done])
        facts = {**facts, **measured}
        ran = {s: r["actual_s"] for s, r in done.items() if s in TRAIN and not r["skipped"]}
        spent = {s: r["spent_s"] for s, r in done.items()}
        new = planner.replan(written, fig, facts, plan, stage, spent, ran, [s for s in self.order if s not in done])
        self.planning = (written, fig, facts, new)
        if new.settings == plan.settings:
            return recipe
        changed = {k: v for k, v in new.settings.items() if plan.settings.get(k) != v}
        ahead = {s: v for s, v in new.predicted.items() if s not in done}
        self.planned.update(ahead)
        if console.build_clock is not None:
            console.build_clock.planned.update(ahead)
        self.record["plan"] = new.model_dump(mode="json")
        self.record.setdefault("replans", []).append(
            {"after": stage, "pace": new.pace, "changed": changed, "predicted": ahead, **({"facts": measured} if measured else {}),
             "predicted_total_s": new.predicted_total_s})
        self.save()
        shown = ", ".join(f"{k} {plan.settings.get(k)}→{v}" for k, v in changed.items() if k != "eval.items")
        say(f"  [dim]re-planned: training ran at {new.pace:.2f}x its predicted seconds; {shown}; build predicted "
            f"{_fmt(new.predicted_total_s)} of {_fmt(new.usable_s)} usable[/dim]")
        return planner.apply(recipe, new.settings)

    def save(self) -> None:
        atomic_write_json(self.run.path(art.BUILD_PLAN), self.record)


def _previous(run: RunDir) -> dict | None:
    try:
        return json.loads(run.path(art.BUILD_PLAN).read_text()).get("plan")
    except (OSError, ValueError, AttributeError):
        return None


def needs_probes(recipe) -> bool:
    import torch

    train = [getattr(recipe, s) for s in TRAIN if getattr(recipe, s).enabled]
    return bool(recipe.budget) or (bool(train) and not torch.cuda.is_available() and any(c.precision == "auto" for c in train))


def prepare(recipe, run: RunDir, say=print):
    """(the recipe this build runs, Build or None). Probes only when a budget is set or `precision: auto` must be
    settled for an enabled training stage on CPU."""
    from slmforge import console

    console.build_clock = None  # an earlier build's, in this process
    if not needs_probes(recipe):
        return recipe, None
    import torch

    from slmforge.models import model_identity, resolve_model

    model_path = resolve_model(recipe.base_model)
    teacher = recipe.generate.teacher
    teacher_path = teacher_id = None
    if recipe.budget and recipe.generate.enabled and teacher.backend == "transformers" and teacher.model != "base":
        teacher_path, teacher_id = resolve_model(teacher.model), model_identity(teacher.model)
    started = time.time()
    fig = figures(recipe, model_path, model_identity(recipe.base_model), teacher_path, teacher_id,
                  progress=lambda msg: say(f"  probe: {msg}"), generation=bool(recipe.budget))
    record: dict = {"figures": fig.model_dump(mode="json"), "probe_s": fig.probe_s, "probes_cached": fig.cached,
                    "probe_wall_s": round(time.time() - started, 1)}
    resolved = recipe.model_copy(deep=True)
    if not torch.cuda.is_available():
        train = [s for s in TRAIN if getattr(resolved, s).enabled and getattr(resolved, s).precision == "auto"]
        for s in train:
            getattr(resolved, s).precision = fig.precision
        if train:
            cfg = getattr(recipe, train[0])
            record["precision"] = precision_record(fig, cfg.batch_size * cfg.max_length)
            times = ", ".join(f"{p} {t:.2f}s" for p, t in record["precision"]["step_s"].items())
            say(f"  precision: auto → {fig.precision} (measured per {record['precision']['tokens_per_step']}-token step: "
                f"{times}{'; cached' if fig.cached else ''})")
    planned: dict[str, float] = {}
    planning = None
    if recipe.budget:
        facts = fixed_costs(resolved, run, fig)
        plan = planner.make_plan(resolved, fig, facts, recipe.budget, _previous(run))
        planning = (resolved, fig, facts, plan)
        resolved = planner.apply(resolved, plan.settings)
        planned = plan.predicted
        record.update(budget_s=recipe.budget, plan=plan.model_dump(mode="json"), facts=facts)
        shown = ", ".join(f"{k} {'+'.join(v) if isinstance(v, list) else v}" for k, v in plan.settings.items()
                          if k != "eval.items")
        if "eval.items" in plan.settings:
            shown += f", eval items {sum(plan.settings['eval.items'].values())}"
        say(f"  budget {_fmt(recipe.budget)}: probes {fig.probe_s:.0f}s{' (cached)' if fig.cached else ''}; plan ×{plan.scale:g}: "
            f"{shown}; predicted {_fmt(plan.predicted_total_s)} of {_fmt(plan.usable_s)} usable")
        for note in plan.notes:
            say(f"  [yellow]budget:[/yellow] {note}")
    build = Build(run, record, planned, planning)
    build.save()
    return resolved, build


def _fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
