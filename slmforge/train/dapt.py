"""DAPT stage: continued pretraining on domain text mixed with general replay, packed, on a warmup-stable-decay schedule.

    curate/train.jsonl (+ generate/pretrain.jsonl) ──┐
    general replay (self-synthesized, or a file) ───┴─> packed blocks in mixture order -> transformers Trainer
"""

from __future__ import annotations

import math

from slmforge.recipe import DaptConfig

from slmforge.artifacts import DAPT, PRETRAIN_ROWS, TRAIN_CHUNKS
from slmforge.models import cache_root, model_identity
from slmforge.run import StageContext, atomic_write_jsonl, hash_obj, sha256_file
from slmforge.train import mixture
from slmforge.train.arguments import world_size
from slmforge.train.stage import TrainingStage, summary_rows


class DaptStage(TrainingStage):
    name = DAPT
    data = (TRAIN_CHUNKS,)
    optional_data = (PRETRAIN_ROWS,)

    def uses_for(self, recipe):
        return self.optional_data if recipe.dapt.synthetic else ()

    def external_inputs(self, recipe, run):
        out = super().external_inputs(recipe, run)
        if recipe.dapt.general_dataset is not None and recipe.dapt.general_dataset.is_file():
            out["general"] = sha256_file(recipe.dapt.general_dataset)
        return out

    def run(self, ctx: StageContext) -> None:
        from transformers import AutoTokenizer

        cfg, seed = ctx.recipe.dapt, ctx.recipe.seed
        model_path = self.start_model(ctx)
        tok = AutoTokenizer.from_pretrained(model_path)
        synthetic = ctx.read(PRETRAIN_ROWS) if cfg.synthetic and ctx.run.has(PRETRAIN_ROWS) else None
        domain, counts = mixture.domain_texts(ctx.read(TRAIN_CHUNKS), synthetic)
        if not domain:
            raise ValueError(f"{ctx.run.path(TRAIN_CHUNKS)} holds no text to train on")
        general: list[str] = []
        if cfg.domain_ratio < 1 or cfg.upsample_ratio < 1:
            if cfg.general_dataset is not None:
                general = mixture.user_general_texts(cfg.general_dataset)
                counts["general_source"] = str(cfg.general_dataset)
            else:
                general = mixture.synthesize_replay(
                    model_path, model_identity(model_path), cache_root() / "replay", samples=cfg.replay_samples,
                    max_new_tokens=cfg.replay_max_new_tokens, temperature=cfg.replay_temperature, seed=seed)
                counts["general_source"] = "self-synthesized"
            counts["general_texts"] = len(general)
        n_blocks = cfg.max_steps * cfg.batch_size * cfg.grad_accum * world_size(cfg)
        targets = mixture.plan(n_blocks, cfg.domain_ratio, cfg.upsample_last, cfg.upsample_ratio)
        if cfg.selection.method == "loss":
            domain, counts["selection"] = select_texts(domain, counts["domain_chunks"], tok, model_path, cfg,
                                                       round(sum(targets)) * cfg.max_length, seed)
        blocks, mix_counts = mixture.mix(mixture.pack(domain, tok, cfg.max_length),
                                         mixture.pack(general, tok, cfg.max_length) if general else [], targets, seed)
        data = ctx.scratch / f"blocks-{hash_obj(blocks)[:12]}.jsonl"
        if not data.is_file():
            atomic_write_jsonl(data, blocks)
        counts.update(mix_counts)
        self.train_on(ctx, data, counts)

    def summary_rows(self, counts):
        rows = summary_rows(self.name, counts)
        if counts:
            rows.insert(1, ("dapt: domain share (tokens)", f"{counts.get('domain_share_tokens', 1.0):.0%} "
                                                          f"(replay: {counts.get('general_source', 'none')})"))
        return rows


def select_texts(texts: list[str], n_chunks: int, tok, model_path: str, cfg: DaptConfig, tokens: int,
                 seed: int) -> tuple[list[str], dict]:
    """selection: loss — the domain texts the start model predicts worst, filling the domain tokens of the mixture
    (`tokens`); curated chunks (the first `n_chunks`) and generated texts keep their shares."""
    from slmforge.train import selection

    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    examples = [(x[: cfg.max_length], [1] * min(len(x), cfg.max_length)) for x in ids]
    groups = ["chunk" if i < n_chunks else "generated" for i in range(len(texts))]
    keep, counts = selection.select_by_loss(
        [len(x) for x in ids], groups, tokens, cfg.selection.pool, seed,
        lambda idx: selection.score_with(model_path, [examples[i] for i in idx], cfg, "dapt"))
    return [texts[i] for i in keep], counts


def lr_schedule(cfg: DaptConfig) -> dict:
    """Trainer arguments for the learning-rate schedule; wsd = warmup, constant, then decay over the last `decay_ratio`."""
    if cfg.lr_schedule != "wsd":
        return {"lr_scheduler_type": cfg.lr_schedule}
    return {"lr_scheduler_type": "warmup_stable_decay",
            "lr_scheduler_kwargs": {"num_decay_steps": max(1, math.ceil(cfg.decay_ratio * cfg.max_steps))}}


def make_trainer(model, tok, dataset, kwargs: dict, cfg: DaptConfig):
    """A transformers Trainer that keeps the block order (the mixture schedule) and packs without cross-document attention."""
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainingArguments
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    class InOrderTrainer(Trainer):
        # The mixture plan (ratio per step, domain upsampling at the end) is laid out in order; shuffling would undo it.
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    kwargs = {**kwargs, "include_num_input_tokens_seen": "all"}  # padding-free: no pad tokens (pad id = EOS here)
    args = TrainingArguments(**kwargs, **lr_schedule(cfg), remove_unused_columns=False)
    # padding-free: a batch is one flat sequence with position_ids restarting per document -> block-diagonal attention
    collator = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)
    return InOrderTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator, processing_class=tok)
