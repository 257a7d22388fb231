"""DPO stage: TRL DPOTrainer on generate/dpo.jsonl preference pairs, starting from the SFT model."""

from __future__ import annotations

import random

from slmforge.artifacts import DPO, DPO_ROWS
from slmforge.recipe import DpoConfig
from slmforge.run import StageContext
from slmforge.train.arguments import world_size
from slmforge.train.stage import FineTuneStage


def _turns(value, role: str) -> bool:
    return (isinstance(value, list) and len(value) >= 1 and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value)
            and value[-1].get("role") == role)


def valid_pair(row) -> bool:
    return (isinstance(row, dict) and _turns(row.get("prompt"), "user") and _turns(row.get("chosen"), "assistant")
            and _turns(row.get("rejected"), "assistant") and row["chosen"][-1]["content"] != row["rejected"][-1]["content"])


class DpoStage(FineTuneStage):
    name = DPO
    data = (DPO_ROWS,)

    def run(self, ctx: StageContext) -> None:
        cfg = ctx.recipe.dpo
        rows = [r.model_dump(mode="json", exclude_unset=True) for r in ctx.read(DPO_ROWS)]
        if cfg.kinds:
            present = sorted({r.get("kind", "") for r in rows})
            rows = [r for r in rows if r.get("kind", "") in (*cfg.kinds, "")]  # kind-less pairs: the user's own
            if not rows:
                raise ValueError(f"{ctx.run.path(DPO_ROWS)}: no pairs of dpo.kinds {cfg.kinds} (the file holds kinds "
                                 f"{present}; generate.matching makes 'matching' pairs)")
        good = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows if valid_pair(r)]
        good, too_long = fitting_pairs(good, ctx.recipe.base_model, cfg.max_length)
        if not good:
            raise ValueError(f"{ctx.run.path(DPO_ROWS)}: no usable preference pairs (rows need conversational 'prompt', "
                             "'chosen', 'rejected')")
        # Only the pairs the step budget reaches: precomputing reference log-probs for unused pairs is wasted time.
        needed = min(cfg.max_steps * cfg.batch_size * cfg.grad_accum * world_size(cfg), len(good))
        self.train_rows(ctx, random.Random(ctx.recipe.seed).sample(good, needed),
                      {"pairs": len(good), "pairs_used": needed, "skipped_rows": len(rows) - len(good) - too_long,
                       "skipped_too_long": too_long})


def fitting_pairs(pairs: list[dict], tokenizer_spec: str, max_length: int, room: int = 8) -> tuple[list[dict], int]:
    """The pairs whose prompt + longer answer fit max_length tokens (with `room` for the chat template's markers), and
    how many did not: TRL truncates the others until a completion can be empty, which fails the loss (RAFT prompts
    hold whole passages)."""
    from slmforge.models import load_tokenizer

    tok = load_tokenizer(tokenizer_spec)

    def n(turns: list[dict]) -> int:
        return sum(len(tok(t["content"], add_special_tokens=False)["input_ids"]) + 4 for t in turns)

    kept = [p for p in pairs if n(p["prompt"]) + max(n(p["chosen"]), n(p["rejected"])) + room <= max_length]
    return kept, len(pairs) - len(kept)


def make_trainer(model, tok, dataset, kwargs: dict, cfg: DpoConfig):
    from trl import DPOConfig, DPOTrainer

    losses = [cfg.loss_type] if isinstance(cfg.loss_type, str) else list(cfg.loss_type)
    if cfg.loss_weights and len(cfg.loss_weights) != len(losses):
        raise ValueError(f"dpo.loss_weights {cfg.loss_weights} needs one weight per dpo.loss_type {losses}")
    args = DPOConfig(**kwargs, max_length=cfg.max_length, beta=cfg.beta, loss_type=losses,
                     loss_weights=cfg.loss_weights or None, precompute_ref_log_probs=cfg.precompute_ref)
    return DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
