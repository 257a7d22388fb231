"""The budget planner: probe figures + recipe + fixed-cost estimates -> per-stage settings and predicted seconds.

A pure function (no clock, no files), so it is tested on fixed figures. The recipe's own settings give the
proportions and the budget gives the scale: one factor s, taken from a geometric grid (steps of 2^(1/8), ~9%), scales
the teacher's chunks (generate.max_chunks) and every enabled training stage's max_steps (rounded to the nearest multiple
of its save_steps), and, only when s < 1, the eval items per kind (the held-out documents' own questions too). The
largest s whose predicted build fits budget * (1 - margin) - probe seconds wins; when even the smallest does not, eval
scores the base and the final model only, not every stage's. Eval's prediction counts the open-book twins of the
question benchmarks (eval.open_book), each prompt after index.k passages. The grid and the rounding make the plan
move only when the machine's speed does; what the grid leaves is filled one checkpoint per training stage at a time
(`_fill`); and a previous plan made from the same inputs is kept while it still fits
the budget (margin included) and spends most of it (`KEEP`), so refined fixed-cost estimates after the first build do
not rerun its stages.

During the build the plan is re-planned after each training stage (`replan`): the remaining stages are predicted at the
pace the finished training stages actually ran (their actual / predicted seconds, bounded to REPLAN_RATIO) and the
grid is searched again for them alone, the finished stages' seconds counted as spent, so a plan whose predictions were
pessimistic still spends the budget and an optimistic one shrinks what is left to stay inside it.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, Field

from slmforge.budget.probes import Figures
from slmforge.evaluate.lm_eval_tasks import OPEN_BOOK
from slmforge.run import hash_obj

MARGIN = 0.10  # share of the budget left unplanned: estimates are estimates
KEEP = 0.85  # a previous plan is kept while it predicts at least this share of the usable budget (and fits)
GRID = range(-40, 49)  # s = 2 ** (k / 8): 1/32 .. 64
EVAL_MIN_ITEMS = 10  # a shrunk benchmark keeps at least this many items per kind (or all it had)
TRAINER_SETUP_S = 4.0  # building the Trainer, tokenizing the stage's data, accelerate's setup
DPO_PADDING = 1.1  # a length-grouped DPO batch pads to its longest pair: ~10% over the pairs' mean
# a TRL DPO step costs more than an SFT step of the same tokens (two short sequences a pair, full-vocabulary log-probs,
# entropy and reward metrics): 16.5 s measured against 9.4 s predicted per 8-pair step on an AVX2 EPYC (Debian FAQ build)
DPO_STEP_FACTOR = 1.75
EVAL_MODEL_SETUP_S = 5.0  # lm-eval's setup per scored model
TOKENS_PER_WORD = 1.5
# tokens a scored item costs (prompt; or prompt + option per choice), from the demo's benchmarks
MCQ_TOKENS, GENERAL_MCQ_TOKENS, QUESTION_PROMPT_TOKENS = 150, 100, 40
PROMPT_TOKENS = {"cloze": 120, "qa": 200, "summary": 350}
TEACHER_INSTRUCTION_TOKENS = 80
PLANNED_TRAIN = ("dapt", "sft", "dpo")
REPLAN_RATIO = (0.5, 1.5)  # bounds on the measured pace: one odd stage (a resumed one) moves the rest only so far
DISTILL_ROWS_UNCAPPED = 1000  # context-distilled rows of a kind without a cap (the plan cannot count the rows)


class Plan(BaseModel):
    budget_s: float
    usable_s: float = Field(description="budget less the safety margin and the probes' own time")
    scale: float
    settings: dict = Field(description="the planned recipe fields: 'dapt.max_steps' -> 40, 'eval.items' -> {...}")
    predicted: dict[str, float] = Field(description="stage -> predicted seconds under the planned settings")
    predicted_total_s: float
    fits: bool
    kept_previous: bool = False
    replanned_after: list[str] = Field(default_factory=list, description="stages after which the build re-planned")
    pace: float | None = Field(None, description="actual / predicted seconds of the finished training stages (re-plans)")
    inputs: str = Field(description="hash of what the plan was made from (recipe as written, probe figures, budget)")
    notes: list[str] = Field(default_factory=list)


# ------------------------------------------------------------------------------------------ settings
def base_settings(recipe) -> dict:
    """The planned fields as the recipe writes them (the proportions the plan scales)."""
    out: dict = {}
    if recipe.generate.enabled and recipe.generate.max_chunks and recipe.generate.teacher.backend == "transformers":
        out["generate.max_chunks"] = recipe.generate.max_chunks
    for stage in PLANNED_TRAIN:
        if getattr(recipe, stage).enabled:
            out[f"{stage}.max_steps"] = getattr(recipe, stage).max_steps
    if recipe.eval.enabled:
        out["eval.items"] = dict(recipe.eval.items)
        if recipe.eval.doc_questions:
            out["eval.doc_questions"] = recipe.eval.doc_questions
    return out


def _eval_items(n: int, s: float) -> int:
    """An eval item count at scale s: unchanged unless the budget is short (s < 1), never under EVAL_MIN_ITEMS."""
    return n if n <= EVAL_MIN_ITEMS else max(EVAL_MIN_ITEMS, math.floor(n * min(1.0, s)))


def scaled(recipe, s: float) -> dict:
    out = {}
    for field, value in base_settings(recipe).items():
        if field == "eval.items":
            out[field] = {k: _eval_items(n, s) for k, n in value.items()}
        elif field == "eval.doc_questions":  # the held-out documents' own questions: a benchmark like the others
            out[field] = _eval_items(value, s)
        elif field == "generate.max_chunks":
            out[field] = max(1, math.floor(value * s + 1e-9))
        else:
            save = getattr(recipe, field.split(".")[0]).save_steps
            q = save if value >= save else 1  # whole checkpoints: a resumed run and the next plan line up
            out[field] = max(q, round(value * s / q) * q)  # the nearest whole checkpoint: the grid checks the fit
    return out


def apply(recipe, settings: dict):
    """A copy of the recipe with the planned fields set (through the typed sections, so they are validated)."""
    out = recipe.model_copy(deep=True)
    for field, value in settings.items():
        section, name = field.split(".")
        setattr(getattr(out, section), name, value)
    return out


# ------------------------------------------------------------------------------------------ predictions
def _precision(cfg, fig: Figures) -> str:
    p = fig.precision if cfg.precision == "auto" else cfg.precision
    return p if p in fig.train else "fp32"


def train_seconds(stage: str, recipe, fig: Figures, facts: dict | None = None) -> float:
    """`facts["dpo_pair_tokens"]`: the mean tokens of the pairs DPO will train on, once generate has written them (its
    batches are grouped by length, so they pad little); until then every pair is priced at dpo.max_length."""
    cfg = getattr(recipe, stage)
    prec = _precision(cfg, fig)
    length = cfg.max_length
    if stage == "dpo" and (facts or {}).get("dpo_pair_tokens"):
        length = min(cfg.max_length, facts["dpo_pair_tokens"] * DPO_PADDING)
    micro_tokens = cfg.batch_size * length * (2 if stage == "dpo" else 1)  # DPO: chosen and rejected
    step = cfg.grad_accum * fig.step_seconds(micro_tokens, prec) * (DPO_STEP_FACTOR if stage == "dpo" else 1.0)
    seconds = fig.load_s + TRAINER_SETUP_S + cfg.max_steps * step + (cfg.max_steps // cfg.save_steps) * fig.save_s
    seconds += 0.4 * fig.save_s  # the final model folder (weights only)
    if stage == "dapt" and cfg.general_dataset is None and (cfg.domain_ratio < 1 or cfg.upsample_ratio < 1) and fig.generate:
        g = fig.generation(8)  # self-synthesized replay, batches of 8 (train/mixture.py)
        seconds += math.ceil(cfg.replay_samples / 8) * (cfg.replay_max_new_tokens * g.decode_step_s + 8 * 40 * g.prefill_token_s)
    if stage in ("dapt", "sft") and cfg.selection.method == "loss":  # scoring a pool of candidates, forward only
        trained = cfg.max_steps * cfg.batch_size * cfg.grad_accum * cfg.max_length * (cfg.domain_ratio if stage == "dapt" else 1)
        seconds += fig.load_s + cfg.selection.pool * trained * fig.train[prec].forward_token_s
    if stage == "sft" and cfg.context_distill.enabled:  # the teacher reads passage + question + answer once per row
        dc = cfg.context_distill
        rows = sum(cfg.kind_caps.get(k, cfg.max_per_kind) or DISTILL_ROWS_UNCAPPED for k in dc.kinds)
        seconds += fig.load_s + rows * (dc.passage_words * TOKENS_PER_WORD + QUESTION_PROMPT_TOKENS * 2) * fig.train[prec].forward_token_s
    if stage == "dpo" and cfg.precompute_ref:  # reference log-probs of every pair used, forward only
        pairs = cfg.max_steps * cfg.batch_size * cfg.grad_accum
        seconds += pairs * 2 * length * fig.train[prec].forward_token_s
    return seconds


def teacher_requests(recipe) -> int:
    """Requests the generate stage sends its teacher (preference's closed-book answers counted at their maximum)."""
    from slmforge.generate.pipeline import MODEL_KINDS

    cfg = recipe.generate
    kinds = set(cfg.kinds) & set(cfg.teacher_kinds) & set(MODEL_KINDS)
    per_chunk = len(kinds - {"preference"}) * cfg.items_per_chunk + ("preference" in kinds) * cfg.items_per_chunk
    return cfg.max_chunks * per_chunk


def teacher_seconds(recipe, fig: Figures) -> float:
    t = recipe.generate.teacher
    if t.backend != "transformers" or not recipe.generate.max_chunks or not fig.generate:
        return 0.0
    g = fig.generation(t.batch_size, teacher=True)
    prompt = min(recipe.generate.max_passage_words, 400) * TOKENS_PER_WORD + TEACHER_INSTRUCTION_TOKENS
    batches = math.ceil(teacher_requests(recipe) / t.batch_size)
    return batches * (t.max_new_tokens * g.decode_step_s + t.batch_size * prompt * g.prefill_token_s)


def eval_models(recipe) -> int:
    return sum(1 for m in recipe.eval.models if m == "base" or (m in PLANNED_TRAIN and getattr(recipe, m).enabled))


def _items_seconds(cfg, fig: Figures, kind: str, n: int, passage_tokens: float = 0.0) -> float:
    """Scoring n items of one benchmark kind (eval's settings `cfg`) on one model; `passage_tokens` before each prompt
    for its open-book twin (lm-eval runs an mcq prompt once per option; evaluate.questions runs a question's prompt
    once and reuses its KV cache for the options)."""
    fwd = fig.train["fp32"].forward_token_s
    if kind in ("questions", "doc_questions"):
        return n * (cfg.question_options * (cfg.question_option_words * TOKENS_PER_WORD + QUESTION_PROMPT_TOKENS)
                    + passage_tokens) * fwd
    if kind == "mcq":
        return n * 4 * (MCQ_TOKENS + passage_tokens) * fwd
    if not fig.generate:
        return 0.0
    g = fig.generation(cfg.batch_size)
    return n * ((PROMPT_TOKENS[kind] + passage_tokens) * g.prefill_token_s
                + cfg.max_new_tokens.get(kind, 32) * g.decode_step_s / cfg.batch_size)


def doc_questions(cfg, facts: dict) -> int:
    """Questions the held-out documents ask: as many as they gave last time when known, at most eval.doc_questions."""
    return min(cfg.doc_questions, facts.get("doc_questions", cfg.doc_questions))


def eval_seconds(recipe, fig: Figures, facts: dict) -> float:
    """Predicted eval stage: every scored model x (its setup + every benchmark item), plus building the benchmarks."""
    cfg = recipe.eval
    fwd = fig.train["fp32"].forward_token_s
    per_model = fig.load_s + EVAL_MODEL_SETUP_S + sum(_items_seconds(cfg, fig, kind, cfg.items.get(kind, 0)) for kind in cfg.kinds)
    per_model += cfg.perplexity_words * TOKENS_PER_WORD * fwd
    if cfg.general:
        per_model += (cfg.general_mcq_items * 4 * GENERAL_MCQ_TOKENS + cfg.general_text_words * TOKENS_PER_WORD) * fwd
    questions = facts.get("questions", 0) + doc_questions(cfg, facts)
    per_model += _items_seconds(cfg, fig, "questions", questions)
    if cfg.open_book and recipe.index.enabled:  # the `_open` twins: the same items after index.k passages each
        passages = recipe.index.k * recipe.index.passage_words * TOKENS_PER_WORD
        per_model += sum(_items_seconds(cfg, fig, kind, cfg.items.get(kind, 0), passages)
                         for kind in OPEN_BOOK if kind in cfg.kinds)
        per_model += _items_seconds(cfg, fig, "questions", questions, passages)
    teacher = 0.0
    if cfg.teacher and cfg.teacher_chunks and recipe.generate.teacher.backend == "transformers" and fig.generate:
        t = recipe.generate.teacher
        g = fig.generation(t.batch_size, teacher=True)
        teacher = math.ceil(cfg.teacher_chunks * len(cfg.teacher_kinds) / t.batch_size) * t.max_new_tokens * g.decode_step_s
    return facts.get("eval_fixed", 10.0) + teacher + eval_models(recipe) * per_model


def merge_models(recipe) -> int:
    """Candidates the merge stage makes with mergekit (the unmerged specialist and the base are scored besides)."""
    cfg = recipe.merge
    trained = sum(1 for s in PLANNED_TRAIN if getattr(recipe, s).enabled)
    return len(cfg.linear) + len(cfg.slerp) + (len(cfg.stage_merges) if trained >= 2 else 0)


def merge_seconds(recipe, fig: Figures, facts: dict) -> float:
    """Predicted merge stage: each candidate written by mergekit (about a model load and a save), then every candidate,
    the specialist and the base scored on merge.max_items of each merge benchmark and the forgetting check; with
    merge.prune, the importance pass, the recovery steps and one more scoring."""
    cfg, ev = recipe.merge, recipe.eval
    fwd = fig.train["fp32"].forward_token_s
    items = {"questions": facts.get("questions", 0), "doc_questions": doc_questions(ev, facts)}
    per_model = fig.load_s + EVAL_MODEL_SETUP_S + ev.general_text_words * TOKENS_PER_WORD * fwd
    per_model += sum(_items_seconds(ev, fig, b, min(cfg.max_items, items.get(b, ev.items.get(b, 0)))) for b in cfg.benchmarks)
    n = merge_models(recipe)
    seconds = n * (fig.load_s + fig.save_s) + (n + 2) * per_model
    p = cfg.prune
    if p.enabled:
        calibration = 2 * p.calibration_texts * fig.step_seconds(p.calibration_tokens, "fp32")  # forward + backward per text
        steps = p.recovery_steps * fig.step_seconds(p.recovery_batch_size * p.recovery_max_length, _precision(recipe.dapt, fig))
        speed = 2 * 2 * 48 * fig.generation(1).decode_step_s if fig.generate else 0.0  # greedy tokens/s, pruned and not
        seconds += calibration + fig.load_s + TRAINER_SETUP_S + steps + 2 * fig.save_s + speed + per_model
    return seconds


def predict(recipe, fig: Figures, facts: dict) -> dict[str, float]:
    """{stage: predicted seconds} of every enabled stage. `facts` holds the fixed costs measured or estimated outside
    (ingest, curate, generate's extractive part, export, eval_fixed: seconds; questions: eval.questions rows;
    doc_questions: how many the held-out documents gave last time, when known)."""
    out = {}
    for stage in recipe.enabled_stages():
        if stage in PLANNED_TRAIN:
            out[stage] = train_seconds(stage, recipe, fig, facts)
        elif stage == "generate":
            out[stage] = facts.get("generate", 0.0) + teacher_seconds(recipe, fig)
        elif stage == "eval":
            out[stage] = eval_seconds(recipe, fig, facts)
        elif stage == "merge":
            out[stage] = merge_seconds(recipe, fig, facts)
        else:
            out[stage] = facts.get(stage, 0.0)
    return {k: round(v, 1) for k, v in out.items()}


# ------------------------------------------------------------------------------------------ the plan
def plan_inputs(recipe, fig: Figures, budget_s: float) -> str:
    """What a plan is made from, less the fixed-cost estimates (which improve after the first build)."""
    figures = fig.model_dump(mode="json", exclude={"cached"})
    return hash_obj({"recipe": recipe.model_dump(mode="json", exclude={"budget", "serve"}), "figures": figures,
                     "budget": budget_s})


def _cost(recipe, fig: Figures, facts: dict, settings: dict, cost=None) -> tuple[dict, float]:
    """(predicted, total seconds) of the recipe under `settings`; `cost(predicted)` replaces the plain sum (a re-plan)."""
    predicted = predict(apply(recipe, settings), fig, facts)
    return cost(predicted) if cost else (predicted, sum(predicted.values()))


def _search(recipe, fig: Figures, facts: dict, usable: float, fixed: dict, cost=None) -> tuple[float, dict, dict, float]:
    """(s, settings, predicted, total) of the largest grid scale whose predicted build fits `usable` seconds (the
    smallest scale when none does); `fixed` planned fields are set whatever the scale; `cost(predicted)` -> (predicted,
    total) when the build's cost is not the plain sum of the predictions (a re-plan)."""
    best = None
    for k in GRID:
        s = 2 ** (k / 8)
        settings = {**scaled(recipe, s), **fixed}
        predicted, total = _cost(recipe, fig, facts, settings, cost)
        if best is None or total <= usable:
            best = (s, settings, predicted, total)
        if total > usable:
            break
    return _fill(recipe, fig, facts, usable, fixed, cost, best) if best[3] <= usable else best


def _fill(recipe, fig, facts, usable, fixed, cost, best):
    """Spend what the grid left: steps come in whole checkpoints, so on a slow machine one grid step can add more
    seconds than the budget has left (a DPO checkpoint of 4 steps was ~2 minutes on an AVX2-only EPYC). One checkpoint
    more per training stage in turn, in recipe order, while the build still fits."""
    s, settings, predicted, total = best
    fields = [f for f in settings if f.endswith(".max_steps") and f not in fixed]
    grown = True
    while grown:
        grown = False
        for field in fields:
            save = getattr(recipe, field.split(".")[0]).save_steps
            trial = {**settings, field: settings[field] + (save if settings[field] >= save else 1)}
            p, t = _cost(recipe, fig, facts, trial, cost)
            if t <= usable:
                settings, predicted, total, grown = trial, p, t, True
    return s, settings, predicted, total


def make_plan(recipe, fig: Figures, facts: dict, budget_s: float, previous: dict | None = None) -> Plan:
    """The plan for `recipe` (as written; precision already resolved) on a machine with figures `fig`."""
    usable = budget_s * (1 - MARGIN) - fig.probe_s
    inputs = plan_inputs(recipe, fig, budget_s)
    notes = []
    if not base_settings(recipe):
        notes.append("nothing to size: no enabled stage has planned settings")
    if recipe.generate.enabled and recipe.generate.teacher.backend == "transformers" and not recipe.generate.max_chunks:
        notes.append("generate.max_chunks is 0 (every chunk): not planned, and its teacher time is not predicted")
    if recipe.generate.enabled and recipe.generate.teacher.backend not in ("transformers", "none"):
        notes.append(f"generate.max_chunks is not planned: the {recipe.generate.teacher.backend} teacher is not probed")
    same = bool(previous) and previous.get("inputs") == inputs and isinstance(previous.get("settings"), dict)
    if same and previous.get("replanned_after"):
        # re-planned during the build from its measured pace: kept as it is, so an unchanged rerun skips every stage and
        # a killed build resumes its stages with the settings they started with
        return Plan.model_validate({**previous, "kept_previous": True,
                                    "notes": notes + ["kept the previous build's re-planned settings"]})
    if same:
        try:
            kept = predict(apply(recipe, previous["settings"]), fig, facts)
        except (ValueError, AttributeError):
            kept = None
        # kept while it spends most of the usable budget and fits the budget itself: refining an estimate may use the
        # safety margin, which is there for estimates being off
        if kept is not None and KEEP * usable <= sum(kept.values()) <= budget_s - fig.probe_s:
            return Plan(budget_s=budget_s, usable_s=round(usable, 1), scale=previous.get("scale", 1.0),
                        settings=previous["settings"], predicted=kept, predicted_total_s=round(sum(kept.values()), 1),
                        fits=True, kept_previous=True, inputs=inputs, notes=notes + ["kept the previous plan: it still fits"])
    s, settings, predicted, total = _search(recipe, fig, facts, usable, {})
    fits = total <= usable
    stage_models = [m for m in recipe.eval.models if m in PLANNED_TRAIN and getattr(recipe, m).enabled]
    if not fits and recipe.eval.enabled and len(stage_models) > 1:
        # a budget too short even for the smallest plan: eval scores the base and the final model only (the build's
        # headline), not every stage's model, before the build is let run over
        fewer = {"eval.models": [m for m in recipe.eval.models if m == "base"] + stage_models[-1:]}
        s, settings, predicted, total = _search(recipe, fig, facts, usable, fewer)
        fits = total <= usable
        notes.append(f"eval scores {' and '.join(fewer['eval.models'])} only (eval.models): with every stage's model "
                     "scored, the smallest plan does not fit the budget")
    if not fits:
        notes.append(f"the budget is too small: the smallest plan needs {total:.0f}s of {usable:.0f}s usable "
                     "(fixed costs: ingest, curate, export, eval setup)")
    return Plan(budget_s=budget_s, usable_s=round(usable, 1), scale=round(s, 4), settings=settings, predicted=predicted,
                predicted_total_s=round(total, 1), fits=fits, inputs=inputs, notes=notes)


def replan(recipe, fig: Figures, facts: dict, plan: Plan, after: str, spent: dict[str, float], ran: dict[str, float],
           remaining: list[str]) -> Plan:
    """The plan for the `remaining` stages of a build under way, `after` that stage finished. `recipe` as written
    (precision resolved, as given to make_plan); `spent`: seconds each finished stage took (counted against the
    budget); `ran`: actual seconds of the training stages that ran in this invocation, whose ratio to their predictions
    is the pace the remaining training stages are predicted at. The finished stages' settings stay as they ran; `plan` comes back unchanged when nothing
    measured or nothing planned is left."""
    measured = {s: t for s, t in ran.items() if plan.predicted.get(s)}
    left = [s for s in remaining if s in plan.predicted and s not in spent]
    if not measured or not any(f.split(".")[0] in left for f in plan.settings):
        return plan
    raw = predict(apply(recipe, plan.settings), fig, facts)  # the probes' own figures, before any earlier re-plan's pace
    pace = sum(measured.values()) / sum(raw[s] for s in measured)
    pace = min(max(pace, REPLAN_RATIO[0]), REPLAN_RATIO[1])
    fixed = {f: v for f, v in plan.settings.items() if f.split(".")[0] not in left or f == "eval.models"}
    used = sum(spent.values())

    def cost(predicted: dict) -> tuple[dict, float]:
        ahead = {s: round(predicted[s] * (pace if s in PLANNED_TRAIN else 1.0), 1) for s in left}
        return ahead, used + sum(ahead.values())

    s, settings, ahead, total = _search(recipe, fig, facts, plan.usable_s, fixed, cost)
    notes = [n for n in plan.notes if not n.startswith("re-planned")]
    notes.append(f"re-planned after {', '.join(plan.replanned_after + [after])}: training ran at "
                 f"{pace:.2f}x its predicted seconds")
    predicted = {**{k: v for k, v in plan.predicted.items() if k not in left}, **ahead}
    return plan.model_copy(update={
        "scale": round(s, 4), "settings": settings, "predicted": predicted,
        "predicted_total_s": round(total + sum(v for k, v in plan.predicted.items() if k not in left and k not in spent), 1),
        "fits": total <= plan.usable_s, "kept_previous": False, "pace": round(pace, 3),
        "replanned_after": plan.replanned_after + [after], "notes": notes})
