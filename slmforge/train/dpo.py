"""DPO stage: TRL DPOTrainer on generate/dpo.jsonl preference pairs, starting from the SFT model."""

from __future__ import annotations

import random

from slmforge.run import Stage, StageContext, atomic_write_jsonl, read_jsonl
from slmforge.train import common


def _turns(value, role: str) -> bool:
    return (isinstance(value, list) and len(value) >= 1 and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value)
            and value[-1].get("role") == role)


def valid_pair(row) -> bool:
    return (isinstance(row, dict) and _turns(row.get("prompt"), "user") and _turns(row.get("chosen"), "assistant")
            and _turns(row.get("rejected"), "assistant") and row["chosen"][-1]["content"] != row["rejected"][-1]["content"])


class DpoStage(Stage):
    name = "dpo"
    version = "1"

    def inputs(self, recipe, run):
        data = run.artifact_hash("generate", "dpo.jsonl")  # first: a clear error when generate has not run
        _, model_key = common.start_model(recipe, run, self.name)
        return {"dpo": data, "model": model_key}

    def run(self, ctx: StageContext) -> None:
        cfg = ctx.recipe.dpo
        source = ctx.run.require("generate", "dpo.jsonl")
        rows = read_jsonl(source)
        good = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows if valid_pair(r)]
        if not good:
            raise ValueError(f"{source}: no usable preference pairs (rows need conversational 'prompt', 'chosen', 'rejected')")
        # Only the pairs the step budget reaches: precomputing reference log-probs for unused pairs is wasted time.
        needed = cfg.max_steps * cfg.batch_size * cfg.grad_accum * cfg.processes
        data = ctx.scratch / "dpo.jsonl"
        atomic_write_jsonl(data, random.Random(ctx.recipe.seed).sample(good, min(needed, len(good))))
        model_path, _ = common.start_model(ctx.recipe, ctx.run, self.name)
        ctx.counts.update({"pairs": len(good), "pairs_used": min(needed, len(good)), "skipped_rows": len(rows) - len(good),
                           "start_model": model_path})
        ctx.counts.update(common.train(self.name, model=model_path, data=data, ctx=ctx, cfg=cfg))

    def summary_rows(self, counts):
        return common.summary_rows(self.name, counts)


def make_trainer(model, tok, dataset, kwargs: dict, job: dict):
    from trl import DPOConfig, DPOTrainer

    cfg = job["config"]
    args = DPOConfig(**kwargs, max_length=cfg["max_length"], beta=cfg["beta"], loss_type=[cfg["loss_type"]],
                     precompute_ref_log_probs=cfg["precompute_ref"])
    return DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
