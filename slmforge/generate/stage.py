"""Generate stage: curate/train.jsonl -> verified synthetic items and TRL-ready training files.

    items.jsonl     every accepted Item            pretrain.jsonl  {"text", "chunk_id", "teacher", "kind"}
    sft.jsonl       {"messages", ...}              dpo.jsonl       {"prompt", "chosen", "rejected", ...}
    rejected.jsonl  rejected items with a reason   report.json     acceptance per generator, reason counts

Held-out chunks are read only to decontaminate: no output may share a long n-gram with them. Teacher replies are
cached per request under runs/<name>/cache/generate, so a killed run resumes without asking twice.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict

from slmforge.evaluate.questions import drop_question_overlap, questions_input
from slmforge.generate.formats import dpo_rows, pretrain_rows, sft_rows
from slmforge.generate.pipeline import MODEL_KINDS, make_items
from slmforge.generate.teachers import make_teacher
from slmforge.generate.verify import Verifier
from slmforge.records import Chunk
from slmforge.run import Stage, StageContext, atomic_write_json, atomic_write_jsonl, read_jsonl


def acceptance(items, rejected: list[dict]) -> dict:
    """{"<kind>/<origin>": {"candidates", "accepted", "rate", "reasons"}}: how each generator fared."""
    stats: dict[str, dict] = defaultdict(lambda: {"candidates": 0, "accepted": 0, "reasons": Counter()})
    for it in items:
        s = stats[f"{it.kind}/{it.origin}"]
        s["candidates"] += 1
        s["accepted"] += 1
    for r in rejected:
        s = stats[f"{r['kind']}/{r['origin']}"]
        s["candidates"] += 1
        s["reasons"][r["reason"]] += 1
    return {k: {**v, "reasons": dict(v["reasons"]), "rate": round(v["accepted"] / v["candidates"], 3)}
            for k, v in sorted(stats.items())}


class GenerateStage(Stage):
    name = "generate"
    version = "1"

    def inputs(self, recipe, run):
        return {"train": run.artifact_hash("curate", "train.jsonl"), "heldout": run.artifact_hash("curate", "heldout.jsonl"),
                **questions_input(recipe)}

    def run(self, ctx: StageContext) -> None:
        cfg, recipe = ctx.recipe.generate, ctx.recipe
        train = read_jsonl(ctx.run.require("curate", "train.jsonl"), Chunk)
        heldout = read_jsonl(ctx.run.require("curate", "heldout.jsonl"), Chunk)
        if not train:
            raise ValueError(f"{ctx.run.stage_dir('curate') / 'train.jsonl'} has no chunks: nothing to generate from")
        started = time.time()
        wants_teacher = bool(set(cfg.kinds) & set(cfg.teacher_kinds) & set(MODEL_KINDS)) and cfg.teacher.backend != "none"
        teacher = make_teacher(cfg, recipe.base_model) if wants_teacher else None
        avoid = [c.text for c in heldout]
        items, rejected = make_items(train, cfg.kinds, cfg, teacher=teacher, cache_dir=ctx.run.cache_dir("generate"),
                                     seed=recipe.seed, avoid_texts=avoid)

        chunks = {c.id: c for c in train}
        check = Verifier(cfg.verify, avoid)
        pretrain = []
        for row in pretrain_rows(items, chunks):  # passages ride along in reading-comprehension rows: check them too
            if check.overlaps_avoid(row["text"]):
                rejected.append({"kind": row["kind"], "chunk_id": row["chunk_id"], "origin": row["teacher"], "reason": "heldout_overlap"})
            else:
                pretrain.append(row)
        items, pretrain, question_rejects, questions = drop_question_overlap(recipe, items, pretrain)  # eval.questions
        rejected += question_rejects
        sft, dpo = sft_rows(items), dpo_rows(items)

        atomic_write_jsonl(ctx.out / "items.jsonl", items)
        atomic_write_jsonl(ctx.out / "pretrain.jsonl", pretrain)
        atomic_write_jsonl(ctx.out / "sft.jsonl", sft)
        atomic_write_jsonl(ctx.out / "dpo.jsonl", dpo)
        atomic_write_jsonl(ctx.out / "rejected.jsonl", rejected)
        per_generator = acceptance(items, rejected)
        ctx.counts.update(
            train_chunks=len(train), teacher=teacher.name if teacher else "none", items=len(items), rejected=len(rejected),
            by_kind=dict(Counter(i.kind for i in items)), pretrain_rows=len(pretrain), sft_rows=len(sft), dpo_rows=len(dpo),
            teacher_failures=sum(r["reason"] == "teacher_error" for r in rejected),
            acceptance={k: v["rate"] for k, v in per_generator.items()},
        )
        if questions:
            ctx.counts["question_overlap"] = {k: questions[k] for k in ("items_removed", "pretrain_rows_removed", "questions_hit")}
        atomic_write_json(ctx.out / "report.json", {
            "counts": ctx.counts, "per_generator": per_generator,
            "reasons": dict(Counter(r["reason"] for r in rejected).most_common()),
            "questions_decontamination": questions,
            "seconds": round(time.time() - started, 1),
        })

    def summary_rows(self, c: dict) -> list[tuple[str, str]]:
        rows = [("teacher", c["teacher"]),
                ("items (by kind)", f"{c['items']:,} (" + ", ".join(f"{k} {v}" for k, v in sorted(c["by_kind"].items())) + ")"),
                ("pretrain / sft / dpo rows", f"{c['pretrain_rows']:,} / {c['sft_rows']:,} / {c['dpo_rows']:,}"),
                ("rejected (teacher failures)", f"{c['rejected']:,} ({c['teacher_failures']})")]
        if "question_overlap" in c:
            q = c["question_overlap"]
            rows.append(("removed: overlap with eval.questions", f"{q['items_removed']} items, {q['pretrain_rows_removed']} "
                         f"pretrain rows ({q['questions_hit']} questions)"))
        return rows + [(f"accepted: {k}", f"{v:.0%}") for k, v in c["acceptance"].items()]
