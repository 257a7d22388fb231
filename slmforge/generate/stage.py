"""Generate stage: curate/train.jsonl -> verified synthetic items and TRL-ready training files.

    ITEMS              every accepted Item              PRETRAIN_ROWS  PretrainRow {"text", "chunk_id", "teacher", "kind"}
    SFT_ROWS           SftRow {"messages", ...}         DPO_ROWS       DpoRow {"prompt", "chosen", "rejected", ...}
    GENERATE_REJECTED  rejected items with a reason     GENERATE_REPORT acceptance per generator, reason counts
    (declared in slmforge/artifacts.py)

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
from slmforge.artifacts import (BM25_TRAIN, DPO_ROWS, GENERATE, GENERATE_REJECTED, GENERATE_REPORT, HELDOUT_CHUNKS, ITEMS,
                                PASSAGES, PRETRAIN_ROWS, SFT_ROWS, TRAIN_CHUNKS)
from slmforge.run import Stage, StageContext


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


class TeacherFailed(RuntimeError):
    pass


class GenerateStage(Stage):
    name = GENERATE
    needs = (TRAIN_CHUNKS, HELDOUT_CHUNKS)  # held-out chunks only to decontaminate against
    makes = (ITEMS, PRETRAIN_ROWS, SFT_ROWS, DPO_ROWS, GENERATE_REJECTED, GENERATE_REPORT)

    uses = (PASSAGES, BM25_TRAIN)  # RAFT rows: the training index (never the held-out passages)

    def uses_for(self, recipe):
        return self.uses if recipe.generate.raft.enabled and recipe.index.enabled else ()

    def external_inputs(self, recipe, run):
        return questions_input(recipe)  # training items overlapping the user's questions are dropped

    def run(self, ctx: StageContext) -> None:
        cfg, recipe = ctx.recipe.generate, ctx.recipe
        train = ctx.read(TRAIN_CHUNKS)
        heldout = ctx.read(HELDOUT_CHUNKS)
        if not train:
            raise ValueError(f"{ctx.run.path(TRAIN_CHUNKS)} has no chunks: nothing to generate from")
        started = time.time()
        wants_teacher = bool(set(cfg.kinds) & set(cfg.teacher_kinds) & set(MODEL_KINDS)) and cfg.teacher.backend != "none"
        teacher = make_teacher(cfg, recipe.base_model) if wants_teacher else None
        avoid = [c.text for c in heldout]
        stats: dict = {}
        items, rejected = make_items(train, cfg.kinds, cfg, teacher=teacher, cache_dir=ctx.run.cache_dir(self.name),
                                     seed=recipe.seed, avoid_texts=avoid, stats=stats)
        asked, failed = stats["teacher_requests"], stats["teacher_failures"]
        errors = sorted(stats["teacher_errors"].items(), key=lambda kv: -kv[1])
        if teacher is not None and asked and failed == asked:  # a teacher that answered nothing fails the stage
            raise TeacherFailed(f"generate.teacher: {teacher.endpoint} answered none of {asked} requests; "
                                f"the error: {errors[0][0]}" + (f" (and {len(errors) - 1} other errors)" if len(errors) > 1 else ""))
        if not items:
            reasons = dict(Counter(r["reason"] for r in rejected).most_common())
            raise ValueError(f"generate produced 0 items from {len(train)} chunks: every candidate was rejected {reasons}")

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
        drawn = {}  # each question's rejected answer, drawn once for the closed- and the open-book matching pairs
        if cfg.matching:
            from slmforge.generate.matching import matching_pairs, partners

            drawn = partners(items, recipe.seed)
            dpo += matching_pairs(items, drawn=drawn)
        retrieval = None
        if BM25_TRAIN in self.uses_for(recipe) and ctx.run.has(BM25_TRAIN):
            from slmforge.generate.raft import raft_data
            from slmforge.index import open_index

            index = open_index(ctx, deployed=False)
            raft_sft, raft_pretrain, raft_dpo, retrieval = raft_data(items, index, recipe.index.k, cfg.raft.p_source, recipe.seed,
                                                                      partners=drawn)
            kept = [r for r in raft_pretrain if not check.overlaps_avoid(r["text"])]  # passages of other chunks ride along
            sft += raft_sft if cfg.raft.sft else []
            pretrain += kept if cfg.raft.pretrain else []
            dpo += raft_dpo if cfg.raft.dpo else []
            retrieval["heldout_overlap_dropped"] = len(raft_pretrain) - len(kept)

        ctx.write(ITEMS, items)
        ctx.write(PRETRAIN_ROWS, pretrain)
        ctx.write(SFT_ROWS, sft)
        ctx.write(DPO_ROWS, dpo)
        ctx.write(GENERATE_REJECTED, rejected)
        per_generator = acceptance(items, rejected)
        ctx.counts.update(
            train_chunks=len(train), teacher=teacher.name if teacher else "none", items=len(items), rejected=len(rejected),
            by_kind=dict(Counter(i.kind for i in items)), pretrain_rows=len(pretrain), sft_rows=len(sft), dpo_rows=len(dpo),
            dpo_by_kind=dict(Counter(r["kind"] for r in dpo)),
            teacher_failures=failed, teacher_requests=asked,
            acceptance={k: v["rate"] for k, v in per_generator.items()},
        )
        if retrieval:
            ctx.counts["raft_rows"] = retrieval["raft_rows"]
            ctx.counts["retrieval_recall"] = retrieval["recall@k"]
        if failed:  # published so the next stages can run, but never skipped as done: a rerun retries only these
            ctx.counts["incomplete"] = (f"{failed} of {asked} teacher requests to {teacher.endpoint} failed "
                                        f"(listed in rejected.jsonl as teacher_error); rerun to retry only those")
        if questions:
            ctx.counts["question_overlap"] = {k: questions[k] for k in ("items_removed", "pretrain_rows_removed", "questions_hit")}
        ctx.write_json(GENERATE_REPORT, {
            "counts": ctx.counts, "per_generator": per_generator,
            "teacher_errors": dict(errors),
            "reasons": dict(Counter(r["reason"] for r in rejected).most_common()),
            "questions_decontamination": questions,
            "retrieval": retrieval or {},
            "seconds": round(time.time() - started, 1),
        })

    def summary_rows(self, c: dict) -> list[tuple[str, str]]:
        rows = [("teacher", c["teacher"]),
                ("items (by kind)", f"{c['items']:,} (" + ", ".join(f"{k} {v}" for k, v in sorted(c["by_kind"].items())) + ")"),
                ("pretrain / sft / dpo rows", f"{c['pretrain_rows']:,} / {c['sft_rows']:,} / {c['dpo_rows']:,}"
                 + (" (dpo: " + ", ".join(f"{k} {v}" for k, v in sorted(c["dpo_by_kind"].items())) + ")"
                    if c.get("dpo_by_kind") else "")),
                ("rejected (teacher failures)", f"{c['rejected']:,} ({c['teacher_failures']})")]
        if "raft_rows" in c:
            rows.append(("RAFT rows; recall@1/2/5 of the source", f"{c['raft_rows']:,}; " + " / ".join(
                f"{c['retrieval_recall'].get(k, 0):.0%}" for k in ("1", "2", "5"))))
        if "question_overlap" in c:
            q = c["question_overlap"]
            rows.append(("removed: overlap with eval.questions", f"{q['items_removed']} items, {q['pretrain_rows_removed']} "
                         f"pretrain rows ({q['questions_hit']} questions)"))
        return rows + [(f"accepted: {k}", f"{v:.0%}") for k, v in c["acceptance"].items()]
