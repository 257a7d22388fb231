"""What the training stages share: where each starts (the nearest earlier enabled training stage, else the base model),
what that makes them need, and their summary rows. The training job itself is slmforge/train/job.py."""

from __future__ import annotations

from pathlib import Path

from slmforge.artifacts import TRAIN_STAGES, Artifact, trained_model, training_outputs
from slmforge.models import model_identity, resolve_model
from slmforge.run import RunDir, Stage, StageContext, atomic_write_jsonl
from slmforge.train.job import train


def previous_model(recipe, stage: str) -> Artifact | None:
    """The model artifact a training stage starts from, or None when it starts from the base model."""
    for prev in reversed(TRAIN_STAGES[: TRAIN_STAGES.index(stage)]):
        if getattr(recipe, prev).enabled:
            return trained_model(prev)
    return None


class TrainingStage(Stage):
    """A training stage: needs its data (`data`) and its start model; makes a model folder, adapter, log and events."""

    data: tuple[Artifact, ...] = ()  # the training data it needs
    optional_data: tuple[Artifact, ...] = ()  # read when present

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.name:
            previous = tuple(trained_model(s) for s in TRAIN_STAGES[: TRAIN_STAGES.index(cls.name)])
            cls.needs, cls.uses, cls.makes = cls.data, cls.optional_data + previous, training_outputs(cls.name)

    def needs_for(self, recipe):
        prev = previous_model(recipe, self.name)
        return self.data + ((prev,) if prev else ())

    def uses_for(self, recipe):
        return self.optional_data

    def external_inputs(self, recipe, run):
        return {} if previous_model(recipe, self.name) else {"base_model": model_identity(recipe.base_model)}

    def start_model(self, ctx: StageContext) -> str:
        prev = previous_model(ctx.recipe, self.name)
        return str(ctx.input(prev)) if prev else resolve_model(ctx.recipe.base_model)

    def train_on(self, ctx: StageContext, data: Path, counts: dict) -> dict:
        """Train from the start model on `data` (a .jsonl in scratch); `counts` go to the manifest first."""
        model_path = self.start_model(ctx)
        ctx.counts.update({**counts, "start_model": model_path})
        result = train(self.name, model=model_path, data=data, ctx=ctx, cfg=getattr(ctx.recipe, self.name))
        ctx.counts.update(result)
        return result

    def summary_rows(self, counts):
        return summary_rows(self.name, counts)


class FineTuneStage(TrainingStage):
    """SFT and DPO: rows of one generate artifact -> the usable ones in scratch -> a job from the previous model."""

    def train_rows(self, ctx: StageContext, rows: list[dict], counts: dict) -> None:
        path = ctx.scratch / self.data[0].name
        atomic_write_jsonl(path, rows)
        self.train_on(ctx, path, counts)


def summary_rows(stage: str, counts: dict) -> list[tuple[str, str]]:
    if not counts:
        return []
    rows = [(f"{stage}: steps", f"{counts.get('steps')} ({counts.get('method')}, resumed from {counts.get('resumed_from_step', 0)})"),
            (f"{stage}: tokens seen", f"{counts.get('tokens_seen', 0):,}"),
            (f"{stage}: loss first → final", f"{counts.get('first_loss')} → {counts.get('final_loss')}"),
            (f"{stage}: tokens/s", f"{counts.get('tokens_per_s')}")]
    return rows
