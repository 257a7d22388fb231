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
        good, counts = usable_pairs([r.model_dump(mode="json", exclude_unset=True) for r in ctx.read(DPO_ROWS)], cfg,
                                    ctx.recipe.base_model, ctx.run.path(DPO_ROWS))
        # Only the pairs the step budget reaches: precomputing reference log-probs for unused pairs is wasted time.
        needed = min(cfg.max_steps * cfg.batch_size * cfg.grad_accum * world_size(cfg), len(good))
        used = random.Random(ctx.recipe.seed).sample(good, needed)
        # shortest first: the reference pass reads the file in order, batches of similar length pad little (training
        # draws its batches by length too, make_trainer)
        used.sort(key=lambda p: p["length"])
        self.train_rows(ctx, used, {**counts, "pairs_used": needed,
                                    "pair_tokens_mean": round(sum(p["length"] for p in used) / max(needed, 1), 1)})


def usable_pairs(rows: list[dict], cfg: DpoConfig, tokenizer_spec: str, where) -> tuple[list[dict], dict]:
    """The pairs DPO trains on (prompt, chosen, rejected, length: tokens of the prompt and its longer answer): those of
    `cfg.kinds` (and the user's kind-less ones) that are well formed and fit max_length; `where` names the file in
    errors. Also what was left out, counted."""
    if cfg.kinds:
        present = sorted({r.get("kind", "") for r in rows})
        kept = [r for r in rows if r.get("kind", "") in (*cfg.kinds, "")]  # kind-less pairs: the user's own
        if not kept:
            raise ValueError(f"{where}: no pairs of dpo.kinds {cfg.kinds} (the file holds kinds "
                             f"{present}; generate.matching makes 'matching' pairs)")
    else:
        kept = rows
    good = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in kept if valid_pair(r)]
    fitting = fitting_pairs(good, tokenizer_spec, cfg.max_length)
    if not fitting:
        raise ValueError(f"{where}: no usable preference pairs (rows need conversational 'prompt', "
                         f"'chosen', 'rejected', within dpo.max_length {cfg.max_length} tokens)")
    return fitting, {"pairs": len(fitting), "skipped_rows": len(kept) - len(good), "skipped_too_long": len(good) - len(fitting)}


def fitting_pairs(pairs: list[dict], tokenizer_spec: str, max_length: int, room: int = 8) -> list[dict]:
    """The pairs whose prompt + longer answer fit max_length tokens (with `room` for the chat template's markers), each
    with its `length` in tokens: TRL truncates the others until a completion can be empty, which fails the loss (RAFT
    prompts hold whole passages)."""
    from slmforge.models import load_tokenizer

    tok = load_tokenizer(tokenizer_spec)

    def n(turns: list[dict]) -> int:
        return sum(len(tok(t["content"], add_special_tokens=False)["input_ids"]) + 4 for t in turns)

    sized = [{**p, "length": n(p["prompt"]) + max(n(p["chosen"]), n(p["rejected"])) + room} for p in pairs]
    return [p for p in sized if p["length"] <= max_length]


class LengthBatches:
    """Indices in batches of similar length, batch order shuffled (seeded, a new order each epoch): every pair sorted
    by length (ties in random order) and cut into runs of `batch` pairs. transformers' LengthGroupedSampler sorts only
    within random megabatches (a few batches on a CPU budget of ~100 pairs), which still mixes 60- and 450-token pairs
    in one batch."""

    def __init__(self, lengths: list[int], batch: int, seed: int = 0):
        self.lengths, self.batch, self.seed, self.epoch = lengths, batch, seed, 0

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        rng = random.Random(f"{self.seed}:{self.epoch}")
        self.epoch += 1
        order = sorted(rng.sample(range(len(self.lengths)), len(self.lengths)), key=self.lengths.__getitem__)
        batches = [order[i:i + self.batch] for i in range(0, len(order), self.batch)]
        rng.shuffle(batches)
        return iter([i for b in batches for i in b])


def make_trainer(model, tok, dataset, kwargs: dict, cfg: DpoConfig):
    from trl import DPOConfig, DPOTrainer

    class LengthGroupedDPOTrainer(DPOTrainer):
        """Batches of pairs of similar length (LengthBatches). A batch pads every pair to its longest, and a 60-token
        closed-book pair beside a 450-token open-book one costs as much as the long one (8-pair batches of both kinds
        mixed held ~1/4 real tokens). The trainer drops unknown columns before it builds the sampler, so the lengths
        are taken from TRL's tokenized columns."""

        def _get_train_sampler(self, train_dataset=None):
            data = self.train_dataset if train_dataset is None else train_dataset
            lengths = [len(p) + max(len(c), len(r)) for p, c, r in
                       zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])]
            return LengthBatches(lengths, self.args.train_batch_size * self.args.gradient_accumulation_steps, self.args.seed)

    losses = [cfg.loss_type] if isinstance(cfg.loss_type, str) else list(cfg.loss_type)
    if cfg.loss_weights and len(cfg.loss_weights) != len(losses):
        raise ValueError(f"dpo.loss_weights {cfg.loss_weights} needs one weight per dpo.loss_type {losses}")
    args = DPOConfig(**kwargs, max_length=cfg.max_length, beta=cfg.beta, loss_type=losses,
                     loss_weights=cfg.loss_weights or None, precompute_ref_log_probs=cfg.precompute_ref)
    return LengthGroupedDPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
