"""SFT stage: TRL SFTTrainer on generate/sft.jsonl conversations, base chat template, loss on assistant tokens only."""

from __future__ import annotations

import random
import re

from slmforge.artifacts import SFT, SFT_ROWS, TRAIN_CHUNKS
from slmforge.recipe import SftConfig
from slmforge.run import StageContext
from slmforge.train import distill, selection
from slmforge.train.arguments import triton_lm_head, world_size
from slmforge.train.stage import FineTuneStage

ROLES = {"system", "user", "assistant"}

# The ChatML message line used by SmolLM2 and many others; TRL's get_training_chat_template only patches the templates
# it knows, and this one is not among them.
_CHATML_LINE = re.compile(
    r"\{\{\s*'<\|im_start\|>'\s*\+\s*message\['role'\]\s*\+\s*'\n'\s*\+\s*message\['content'\]\s*\+\s*'<\|im_end\|>'\s*\+\s*'\n'\s*\}\}")
_CHATML_MARKED = ("{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
                  "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
                  "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}")


def training_chat_template(tok) -> str | None:
    """The base chat template with {% generation %} markers around assistant replies (+ end-of-turn), for the loss mask."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = tok.chat_template or ""
    if has_generation_markers(template):
        return template
    if _CHATML_LINE.search(template):
        return _CHATML_LINE.sub(lambda _: _CHATML_MARKED, template)
    try:
        return get_training_chat_template(tok) or template
    except ValueError as err:
        raise ValueError(f"sft.assistant_only_loss: cannot mark assistant turns in this model's chat template ({err}); "
                         "set sft.assistant_only_loss=false to train on whole conversations") from None


def conversation_tokens(tok, messages: list[dict], template: str, assistant_only: bool = True) -> tuple[list[int], list[int]]:
    """(input_ids, mask of the trained tokens) as TRL's SFT tokenization makes them: the assistant tokens (`template`
    must carry generation markers, see training_chat_template), or every token."""
    enc = tok.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=assistant_only)
    ids = list(enc["input_ids"])
    return ids, list(enc["assistant_masks"]) if assistant_only else [1] * len(ids)


def valid_conversation(row) -> bool:
    msgs = row.get("messages") if isinstance(row, dict) else None
    return (isinstance(msgs, list) and len(msgs) >= 2
            and all(isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in msgs)
            and any(m["role"] == "assistant" and m["content"].strip() for m in msgs))


def balance_kinds(rows: list[dict], max_per_kind: int, seed: int = 0, caps: dict[str, int] | None = None) -> list[dict]:
    """At most `max_per_kind` rows of each "kind" (`caps[kind]` instead where given), a seeded sample spread over the
    file (file order kept); a cap of 0 keeps all of that kind."""
    caps = caps or {}
    if not max_per_kind and not any(caps.values()):
        return rows
    by_kind: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_kind.setdefault(r.get("kind", ""), []).append(i)
    rng = random.Random(seed)
    keep = set()
    for kind, idx in by_kind.items():
        cap = caps.get(kind, max_per_kind)
        keep.update(rng.sample(idx, cap) if cap and len(idx) > cap else idx)
    return [r for i, r in enumerate(rows) if i in keep]


class SftStage(FineTuneStage):
    name = SFT
    data = (SFT_ROWS,)
    optional_data = (TRAIN_CHUNKS,)  # the passages of context distillation

    def uses_for(self, recipe):
        return self.optional_data if recipe.sft.context_distill.enabled else ()

    def run(self, ctx: StageContext) -> None:
        rows = [r.model_dump(mode="json", exclude_unset=True) for r in ctx.read(SFT_ROWS)]
        cfg = ctx.recipe.sft
        capped = balance_kinds([r for r in rows if valid_conversation(r)], cfg.max_per_kind, ctx.recipe.seed, cfg.kind_caps)
        if not capped:
            raise ValueError(f"{ctx.run.path(SFT_ROWS)}: no usable conversations (rows need 'messages': [{{role, content}}, ...] "
                             "with an assistant reply)")
        counts = {"conversations": len(capped), "skipped_rows": len(rows) - len(capped)}
        if cfg.selection.method == "loss":
            capped, counts["selection"] = select_rows(capped, self.start_model(ctx), cfg, ctx.recipe.seed)
            counts["conversations"] = len(capped)
        if cfg.context_distill.enabled:
            passages = {c.id: c.text for c in ctx.read(TRAIN_CHUNKS)} if ctx.run.has(TRAIN_CHUNKS) else {}
            good, counts["context_distill"] = distill.distill_rows(capped, passages, self.start_model(ctx), cfg)
        else:
            good = [{"messages": [{"role": m["role"], "content": m["content"]} for m in r["messages"]]} for r in capped]
        self.train_rows(ctx, good, counts)


def select_rows(rows: list[dict], model_path: str, cfg: SftConfig, seed: int) -> tuple[list[dict], dict]:
    """selection: loss — the rows whose assistant tokens the start model predicts worst, filling the tokens the steps
    train on (packed: steps x global batch x max_length; unpacked: that many rows), each kind keeping its share."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    template = training_chat_template(tok) if cfg.assistant_only_loss else tok.chat_template
    examples = []
    for r in rows:  # scored as trained: the assistant tokens (TRL's mask), or the whole conversation
        ids, mask = conversation_tokens(tok, r["messages"], template, cfg.assistant_only_loss)
        examples.append((ids[: cfg.max_length], mask[: cfg.max_length]))
    global_rows = cfg.max_steps * cfg.batch_size * cfg.grad_accum * world_size(cfg)
    sizes = [len(ids) for ids, _ in examples] if cfg.packing else [1] * len(examples)
    tokens = global_rows * (cfg.max_length if cfg.packing else 1)
    keep, counts = selection.select_by_loss(
        sizes, [r.get("kind", "") for r in rows], tokens, cfg.selection.pool, seed,
        lambda idx: selection.score_with(model_path, [examples[i] for i in idx], cfg, "sft"))
    return [rows[i] for i in keep], counts


def make_trainer(model, tok, dataset, kwargs: dict, cfg: SftConfig):
    from trl import SFTConfig, SFTTrainer

    if cfg.assistant_only_loss:
        tok.chat_template = training_chat_template(tok)  # in memory only: model/ gets the base's template unchanged
    if cfg.packing:
        kwargs = {**kwargs, "include_num_input_tokens_seen": "all"}  # packed = padding-free: no pad tokens to skip
    if distill.TEACHER_IDS in dataset.column_names:  # context distillation: rows tokenized and packed by distill.py
        # packed already: TRL's packing flags stay off (they refuse a custom collator); ours is padding-free when packed
        args = SFTConfig(**kwargs, max_length=cfg.max_length, packing=False, padding_free=False,
                         remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True})
        return scored_positions_trainer(SFTTrainer, cfg.context_distill.weight)(
            model=model, args=args, train_dataset=distill.prepare_dataset(dataset, cfg), processing_class=tok,
            data_collator=distill.collator(tok, cfg, cfg.context_distill.top_k))
    args = SFTConfig(**kwargs, max_length=cfg.max_length, packing=cfg.packing, packing_strategy="bfd",
                     assistant_only_loss=cfg.assistant_only_loss)
    trainer_class = SFTTrainer if triton_lm_head() else scored_positions_trainer(SFTTrainer)
    return trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tok)


def scored_positions_trainer(base, distill_weight: float = 0.0):
    """`base` (SFTTrainer) with a loss that runs the LM head only where a label is scored, and torch's cross-entropy.

    TRL's loss is a chunked log-prob LM head that never builds the (tokens x 49k vocabulary) logits: a Triton kernel on
    GPUs. Without Triton (CPU) it falls back to ~15 torch elementwise passes over every position's logits, prompt and
    document-boundary positions included, with fp32 GEMMs in its backward: 1.9 s of a 5.5 s step of the default model
    here. This projects only the scored positions (transformers' boolean `logits_to_keep`; assistant tokens with
    assistant-only loss) in the autocast dtype, with log-softmax + NLL in fp32 as transformers' own causal-LM loss does.
    The loss normalisation is TRL's (same loss and gradients within bf16 rounding; tests/test_train.py compares them).
    Batches from distill.collator add `distill_weight` x the KL to the passage-reading teacher on the tokens that have one.
    """
    import torch
    import torch.nn.functional as F

    class ScoredPositionsSFTTrainer(base):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            teacher = [inputs.pop(k, None) for k in (distill.TEACHER_IDS, distill.TEACHER_LOGP, "has_teacher")]
            labels = inputs.pop("labels")[:, 1:]  # the hidden state at position p predicts token p + 1
            scored = labels != -100
            logits = model(**inputs, use_cache=False, logits_to_keep=F.pad(scored, (0, 1))).logits  # (n_scored, vocab)
            targets = labels[scored]
            log_probs = logits.log_softmax(-1, dtype=torch.float32)  # fp32 softmax without a separate upcast copy
            n_scored = scored.sum()
            total = F.nll_loss(log_probs, targets, reduction="sum")
            if teacher[0] is not None:  # the teacher of the token each scored position predicts
                t_ids, t_logp, has = (t[:, 1:][scored] for t in teacher)
                total = total + distill_weight * distill.kl_term(log_probs, t_ids, t_logp, has)
            loss = total / (n_scored.clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as TRL: DDP averages the gradients across ranks
            with torch.no_grad():  # TRL's metrics, less entropy: two more passes over the logits, ~4% of a step here
                mode = "train" if self.model.training else "eval"
                gather = self.accelerator.gather_for_metrics
                n = gather(n_scored).sum().clamp(min=1)
                # top-1 = the target's log-prob is the row maximum (amax on fp32 is ~7x faster than argmax on bf16 here)
                correct = (log_probs.gather(1, targets[:, None]).squeeze(1) >= log_probs.amax(-1)).sum()
                self._metrics[mode]["mean_token_accuracy"].append((gather(correct).sum() / n).item())
                if mode == "train":  # padding-free batches have no attention_mask: every position is a token
                    mask = inputs.get("attention_mask")
                    tokens = mask.sum() if mask is not None else torch.tensor(inputs["input_ids"].numel())
                    self._total_train_tokens += gather(tokens).sum().item()
                self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return (loss, logits) if return_outputs else loss

    return ScoredPositionsSFTTrainer
