"""SFT stage: TRL SFTTrainer on generate/sft.jsonl conversations, base chat template, loss on assistant tokens only."""

from __future__ import annotations

import random
import re

from slmforge.run import Stage, StageContext, atomic_write_jsonl, read_jsonl
from slmforge.train import common

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


def valid_conversation(row) -> bool:
    msgs = row.get("messages") if isinstance(row, dict) else None
    return (isinstance(msgs, list) and len(msgs) >= 2
            and all(isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in msgs)
            and any(m["role"] == "assistant" and m["content"].strip() for m in msgs))


def balance_kinds(rows: list[dict], max_per_kind: int, seed: int = 0) -> list[dict]:
    """At most `max_per_kind` rows of each "kind", a seeded sample spread over the file (file order kept); 0 keeps all."""
    if not max_per_kind:
        return rows
    by_kind: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_kind.setdefault(r.get("kind", ""), []).append(i)
    rng = random.Random(seed)
    keep = {i for idx in by_kind.values() for i in (rng.sample(idx, max_per_kind) if len(idx) > max_per_kind else idx)}
    return [r for i, r in enumerate(rows) if i in keep]


class SftStage(Stage):
    name = "sft"
    version = "1"

    def inputs(self, recipe, run):
        data = run.artifact_hash("generate", "sft.jsonl")  # first: a clear error when generate has not run
        _, model_key = common.start_model(recipe, run, self.name)
        return {"sft": data, "model": model_key}

    def run(self, ctx: StageContext) -> None:
        source = ctx.run.require("generate", "sft.jsonl")
        rows = read_jsonl(source)
        good = [{"messages": [{"role": m["role"], "content": m["content"]} for m in r["messages"]]}
                for r in balance_kinds([r for r in rows if valid_conversation(r)], ctx.recipe.sft.max_per_kind, ctx.recipe.seed)]
        if not good:
            raise ValueError(f"{source}: no usable conversations (rows need 'messages': [{{role, content}}, ...] with an assistant reply)")
        data = ctx.scratch / "sft.jsonl"
        atomic_write_jsonl(data, good)
        model_path, _ = common.start_model(ctx.recipe, ctx.run, self.name)
        ctx.counts.update({"conversations": len(good), "skipped_rows": len(rows) - len(good), "start_model": model_path})
        ctx.counts.update(common.train(self.name, model=model_path, data=data, ctx=ctx, cfg=ctx.recipe.sft))

    def summary_rows(self, counts):
        return common.summary_rows(self.name, counts)


def make_trainer(model, tok, dataset, kwargs: dict, job: dict):
    from trl import SFTConfig, SFTTrainer

    cfg = job["config"]
    if cfg["assistant_only_loss"]:
        tok.chat_template = training_chat_template(tok)  # in memory only: model/ gets the base's template unchanged
    if cfg["packing"]:
        kwargs = {**kwargs, "include_num_input_tokens_seen": "all"}  # packed = padding-free: no pad tokens to skip
    args = SFTConfig(**kwargs, max_length=cfg["max_length"], packing=cfg["packing"], packing_strategy="bfd",
                     assistant_only_loss=cfg["assistant_only_loss"])
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
