"""Eval stage: frozen benchmarks from held-out documents; base vs every trained stage in one table; the run report.

    benchmarks/<kind>.jsonl   frozen items (mcq, cloze, qa, summary), perplexity texts and the general sets
    decontamination.json      n-gram overlap of every candidate item with every training artifact; what was dropped
    lm_eval/                  every benchmark as an lm-eval task (YAML + metrics module) runnable with --include_path
    predictions/<model>.jsonl per-item scores and generations of each model
    results.json, table.md    the comparison (table.md is what the model card pastes)
    ../report.html            the self-contained run report

Each model's scores are a cached unit keyed by the model's content and the benchmarks' hashes, so a rerun after a
kill (or after training one more stage) scores only what is new.
"""

from __future__ import annotations

import time
from collections import Counter

from slmforge.console import console, track
from slmforge.evaluate import benchmarks as bm
from slmforge.evaluate.compare import beats_base, markdown_table, paired_results, rich_table, rows, worse_than_base
from slmforge.evaluate.decontaminate import NgramIndex
from slmforge.evaluate.lm_eval_tasks import GENERAL, OPEN_BOOK, SPECS, asked_in_chat, safe_prefix, write_tasks
from slmforge.artifacts import (BENCHMARKS, BM25_ALL, DECONTAMINATION, EVAL, GENERATE, GENERATE_REPORT, HELDOUT_CHUNKS, HELDOUT_DOCUMENTS,
                                HELDOUT_PASSAGES, LM_EVAL_TASKS, PASSAGES, PREDICTIONS, RESULTS, TABLE, TRAIN_STAGES,
                                benchmark_file, predictions_file, trained_model)
from slmforge.evaluate.questions import questions_input, training_overlap
from slmforge.records import Item, Prediction
from slmforge.run import Stage, StageContext, atomic_write_json, atomic_write_jsonl, cached_unit, code_hash, hash_obj, sha256_file

# How each held-out benchmark is made, for the report: the first four share the training drills' generators and wording
BUILT = {
    "mcq": "a domain term of a held-out sentence blanked, distractors other corpus terms: the same generator and wording "
           "as the training drills ('Which term fills the blank?'), so it also rewards the trained format",
    "cloze": "a held-out sentence to complete ('Complete the sentence: …'): the same generator as the training cloze drills",
    "qa": "'What is / What does X …?' asked of held-out definition and function sentences: the same generator and "
          "template as the training QA drills",
    "summary": "the principal sentences of a held-out passage: the same generator as the training summaries",
    "domain_ppl": "perplexity of held-out documents, cut at paragraph boundaries",
}


def model_specs(recipe, run) -> dict[str, tuple[str, str]]:
    """{name: (spec for load_causal_lm, identity for cache keys)} for base + finished trained stages, in order. The
    identity is the content of the weights (the base's files; a trained stage's model folder), never a path."""
    from slmforge.models import model_identity

    wanted = recipe.eval.models
    out = {}
    if "base" in wanted:
        out["base"] = (recipe.base_model, model_identity(recipe.base_model))
    for stage, folder in run.trained_models().items():
        if stage in wanted:
            out[stage] = (str(folder), run.hash(trained_model(stage)))
    return out


class EvalStage(Stage):
    name = EVAL
    needs = (HELDOUT_CHUNKS, HELDOUT_DOCUMENTS)
    open_book_inputs = (PASSAGES, HELDOUT_PASSAGES, BM25_ALL, GENERATE_REPORT)
    uses = bm.TRAINING_DATA + tuple(trained_model(s) for s in TRAIN_STAGES) + open_book_inputs  # decontaminated against; scored
    makes = (BENCHMARKS, DECONTAMINATION, LM_EVAL_TASKS, PREDICTIONS, RESULTS, TABLE)

    def uses_for(self, recipe):
        if recipe.eval.open_book and recipe.index.enabled:
            return self.uses
        return tuple(a for a in self.uses if a not in self.open_book_inputs)

    def external_inputs(self, recipe, run):
        out = {f"model:{name}": identity for name, (_, identity) in model_specs(recipe, run).items()}
        out.update(questions_input(recipe))
        return out

    # ------------------------------------------------------------------------------------------------ run
    def run(self, ctx: StageContext) -> None:
        cfg, recipe, run = ctx.recipe.eval, ctx.recipe, ctx.run
        started = time.time()
        chunks = ctx.read(HELDOUT_CHUNKS)
        documents = ctx.read(HELDOUT_DOCUMENTS)
        if not chunks:
            raise ValueError(f"{run.path(HELDOUT_CHUNKS)} is empty: set curate.heldout_fraction > 0 "
                             "so some documents are kept for evaluation")
        frozen = self._benchmarks(ctx, chunks)
        data_files, meta = self._freeze(ctx, frozen, documents)
        questions = freeze_questions(ctx, meta, documents)
        if BM25_ALL in self.uses_for(recipe) and run.has(BM25_ALL):
            freeze_open_book(ctx, data_files, meta, questions)
        built_s = time.time() - started

        prefix = safe_prefix(recipe.name)
        has_template = base_has_chat_template(recipe.base_model)
        chat = {b for b in data_files if asked_in_chat(b, cfg.chat_template, has_template)}
        # exported tasks name their data relative to their own folder (../benchmarks/...): right before and after publish
        write_tasks(ctx.path(LM_EVAL_TASKS), prefix, data_files, cfg.max_new_tokens, chat)
        task_dir = ctx.scratch / "tasks"  # the same tasks pointing at this attempt's files, for scoring now
        write_tasks(task_dir, prefix, data_files, cfg.max_new_tokens, chat)

        models = model_specs(recipe, run)
        scores_cache = run.cache_dir("eval-scores")
        for b in chat:
            meta[b]["chat_template"] = True
        results = {"run": recipe.name, "benchmarks": meta, "models": [], "scores": {}, "lm_eval": {},
                   "decontamination": frozen["decontamination_summary"], "teacher": frozen["teacher"]}
        stats: dict = {}
        predictions: dict[str, list[dict]] = {}
        for name, (spec, identity) in track(list(models.items()), "eval models"):
            key = hash_obj({"code": code_hash("slmforge.evaluate.scoring"), "model": identity, "benchmarks": {b: m["sha256"] for b, m in meta.items()},
                            "scoring": cfg.model_dump(include={"max_new_tokens", "batch_size"}), "chat": sorted(chat),
                            "seed": recipe.seed})
            console.print(f"  scoring {name} ({spec}) on {len(data_files)} benchmarks", highlight=False)
            scored = cached_unit(scores_cache, key, lambda: self._score(name, spec, task_dir, prefix, list(data_files), cfg,
                                                                       recipe.seed, chat, questions), stats)
            results["models"].append({"name": name, "path": spec, "seconds": scored["seconds"]})
            results["scores"][name] = scored["scores"]
            results["lm_eval"][name] = scored["lm_eval"]
            predictions[name] = [{"bench": b, **row} for b, item_rows in scored["items"].items() for row in item_rows]
            atomic_write_jsonl(ctx.path(PREDICTIONS) / predictions_file(name),
                               [Prediction.model_validate(r) for r in predictions[name]])  # typed rows, metrics as extras
        results["paired"] = paired_results(predictions, [m["name"] for m in results["models"]], recipe.seed)
        if questions:
            results["references"] = {b: question_references(r, recipe.seed) for b, r in questions.items()}
        results["forgetting"] = forgetting(results)
        generated = ctx.read(GENERATE_REPORT) if run.has(GENERATE_REPORT) else {}  # recall@k of the training questions
        results["retrieval"] = generated.get("retrieval") or {}
        results["seconds"] = {"benchmarks": round(built_s, 2), "total": round(time.time() - started, 2)}
        ctx.write_json(RESULTS, results)
        ctx.write_text(TABLE, markdown_table(results))
        console.print(rich_table(results))

        ctx.counts.update(
            benchmarks={b: m["n"] for b, m in meta.items()}, models=[m["name"] for m in results["models"]],
            decontaminated=frozen["decontamination_summary"]["dropped"], teacher=frozen["teacher"],
            headline=headline(results), scored_from_cache=stats.get("cache_hits", 0),
            model_seconds={m["name"]: m["seconds"] for m in results["models"]},
        )
        from slmforge.report import write_report

        path = write_report(run, results, predictions, cfg.samples, extra_timings={"eval": time.time() - started})
        console.print(f"  report → {path}")

    def _score(self, name, spec, task_dir, prefix, benches, cfg, seed, chat, questions=None) -> dict:
        from slmforge.evaluate.scoring import score_model

        return score_model(name, spec, task_dir, prefix, benches, batch_size=cfg.batch_size, seed=seed, chat=tuple(sorted(chat)),
                           questions=questions)

    # ------------------------------------------------------------------------------------------------ benchmarks
    def _benchmarks(self, ctx: StageContext, chunks: list[Chunk]) -> dict:
        """Build (or reuse, when nothing it depends on changed) the decontaminated item set: one cached unit."""
        cfg, recipe, run = ctx.recipe.eval, ctx.recipe, ctx.run
        artifacts = bm.training_artifacts(run)
        key = hash_obj({
            "code": code_hash("slmforge.evaluate.benchmarks"), "heldout": run.hash(HELDOUT_CHUNKS),
            "training": {label: sha256_file(p) for label, p in artifacts.items()},
            "cfg": cfg.model_dump(include={"kinds", "items", "extractive_per_chunk", "teacher", "teacher_chunks", "teacher_kinds",
                                           "decontamination"}),
            "generate": recipe.generate.model_dump(mode="json", include={"teacher", "verify", "max_passage_words"}),
            "seed": recipe.seed, "base_model": recipe.base_model,
        })

        def build() -> dict:
            items, rejected, teacher = bm.build_items(chunks, cfg, recipe, run.cache_dir("eval-teacher"))
            index = NgramIndex(cfg.decontamination.ngram)
            for label, path in artifacts.items():
                index.add_jsonl(path, label)
            selected, report = bm.select(items, index, cfg, recipe.seed)
            dropped = [r for r in report if r["dropped"]]
            by_id = {i.id: i for i in items}
            summary = {
                "ngram": index.n, "max_overlap": cfg.decontamination.max_overlap, "training_rows": index.sources,
                "candidates": dict(Counter(i.kind for i in items)), "dropped": len(dropped),
                "dropped_by_kind": dict(Counter(r["kind"] for r in dropped)),
                "unchecked_short": sum(r["overlap"] is None for r in report),
                "examples": [{**r, "text": f"{by_id[r['id']].prompt} → {by_id[r['id']].answer}"[:300]} for r in dropped[:5]],
                "rejected_by_verifier": dict(Counter(f"{r['kind']}: {r['reason']}" for r in rejected)),
            }
            return {"items": {k: [i.model_dump(mode="json") for i in v] for k, v in selected.items()},
                    "decontamination": report, "decontamination_summary": summary, "teacher": teacher}

        return cached_unit(run.cache_dir("eval-benchmarks"), key, build)

    def _freeze(self, ctx: StageContext, frozen: dict, documents: list[Document]):
        """Write every benchmark file once; return ({bench: path}, {bench: {file, sha256, n, chance, origin}})."""
        cfg, out = ctx.recipe.eval, ctx.path(BENCHMARKS)
        files: dict[str, list] = {k: [Item.model_validate(r) for r in v] for k, v in frozen["items"].items()}
        if cfg.perplexity_words:
            files["domain_ppl"] = bm.text_rows(documents, cfg.perplexity_words)
        if cfg.general:
            if cfg.general_mcq_items:
                files["general_mcq"] = bm.general_mcq(cfg.general_mcq_items)
            if cfg.general_text_words:
                files["general_ppl"] = bm.general_text(cfg.general_text_words)
        data_files, meta = {}, {}
        for bench, rows_ in files.items():
            if not rows_:
                continue
            path = out / benchmark_file(bench)
            atomic_write_jsonl(path, rows_)
            data_files[bench] = path
            chance = None
            if SPECS[bench].output_type == "multiple_choice":
                chance = sum(1 / len(r.choices) for r in rows_) / len(rows_)
            meta[bench] = {"file": f"{BENCHMARKS.name}/{path.name}", "sha256": sha256_file(path), "n": len(rows_), "chance": chance,
                           "description": SPECS[bench].description, "built": BUILT.get(bench, SPECS[bench].description)}
        atomic_write_json(ctx.path(DECONTAMINATION), {"summary": frozen["decontamination_summary"], "items": frozen["decontamination"]})
        if not data_files:
            raise ValueError("no benchmark items could be built from the held-out documents (see decontamination.json)")
        return data_files, meta

    def summary_rows(self, c: dict) -> list[tuple[str, str]]:
        out = [("benchmarks (items)", ", ".join(f"{b} {n}" for b, n in c["benchmarks"].items())),
               ("decontaminated (dropped)", str(c["decontaminated"])),
               ("models scored", ", ".join(c["models"]))]
        out += [(k, v) for k, v in c["headline"].items()]
        return out


def _freeze_mcq(ctx: StageContext, meta: dict, bench: str, questions, extra: dict) -> list[dict]:
    """Multiple-choice rows of `questions` frozen into benchmarks/<bench>.jsonl; its sha256 joins meta (so every
    score's cache key)."""
    from slmforge.evaluate.questions import mcq_items

    cfg = ctx.recipe.eval
    rows_ = mcq_items(questions, seed=ctx.recipe.seed, n_options=cfg.question_options, option_words=cfg.question_option_words)
    path = ctx.path(BENCHMARKS) / benchmark_file(bench)
    atomic_write_jsonl(path, rows_)
    meta[bench] = {"file": f"{BENCHMARKS.name}/{path.name}", "sha256": sha256_file(path), "n": len(rows_),
                   "chance": sum(1 / len(r["choices"]) for r in rows_) / len(rows_), "description": SPECS[bench].description,
                   "sections": len({r["section"] for r in rows_}), **extra}
    return rows_


def freeze_questions(ctx: StageContext, meta: dict, documents: list[Document] = ()) -> dict[str, list[dict]]:
    """{bench: multiple-choice rows}: eval.questions as `questions` and the held-out documents' own questions as
    `doc_questions` (each skipped when not configured or empty), frozen beside the other benchmarks."""
    from slmforge.evaluate import doc_questions as dq
    from slmforge.evaluate.questions import load_questions, training_index

    cfg, out = ctx.recipe.eval, {}
    if cfg.questions is None and not cfg.doc_questions:
        return out
    index = training_index(bm.training_artifacts(ctx.run), cfg.decontamination.ngram)
    scoring = (f"each scored as {cfg.question_options}-way multiple choice whose distractors are other questions' answers "
               f"(same section first, seeded per item id), options cut to {cfg.question_option_words} words; "
               "log-likelihood of ' option' after 'Question: …\\nAnswer:' (closed book)")
    if cfg.questions is not None:
        questions = load_questions(cfg.questions)
        overlap, _ = training_overlap(questions, index)
        generate = ctx.run.manifest(GENERATE)
        out["questions"] = _freeze_mcq(ctx, meta, "questions", questions, {
            "source": str(cfg.questions), "built": f"your file {cfg.questions.name}: {len(questions)} questions; {scoring}",
            "training_overlap": overlap,
            "removed_from_training": ((generate or {}).get("counts") or {}).get("question_overlap")})
    if cfg.doc_questions:
        found, summary = dq.document_questions(list(documents))
        _, shares = training_overlap(found, index)
        clean = [q for q in found if shares[q.id] < cfg.decontamination.max_overlap]
        if len(clean) < len(found):
            summary["dropped"]["n-grams seen in training data"] = len(found) - len(clean)
        picked = dq.spread(clean, cfg.doc_questions, ctx.recipe.seed)
        if len({q.answer for q in picked}) >= 2:
            out["doc_questions"] = _freeze_mcq(ctx, meta, "doc_questions", picked, {
                "built": dq.built_text(summary, len(picked)) + f" {scoring}.", "rules": summary})
        else:
            console.print(f"  doc_questions: {len(picked)} question-like headings in the held-out documents: too few to "
                          f"score (rules: {', '.join(dq.RULES)})", highlight=False)
    return out


def _query(bench: str, row: dict) -> str:
    """What retrieval is asked for an item: the question (a blanked sentence without its instruction for mcq)."""
    text = row.get("question") or row.get("prompt") or ""
    return text.split("\n\n", 1)[-1].replace("_____", " ") if bench == "mcq" else text


def freeze_open_book(ctx: StageContext, data_files: dict, meta: dict, questions: dict[str, list[dict]]) -> None:
    """`<bench>_open` beside each question benchmark: the same items, each with `passages`, the top index.k passages of
    the deployed index (training + held-out documents: a deployed specialist's index holds every document, though the
    model never trained on the held-out ones). Their meta records recall@k of the item's source chunk where known."""
    from slmforge.index import open_index
    from slmforge.index.bm25 import context_of, recall_from_hits
    from slmforge.run import read_jsonl

    k = ctx.recipe.index.k
    index = open_index(ctx, deployed=True)
    sources = {**{b: read_jsonl(p) for b, p in data_files.items() if b in OPEN_BOOK}, **questions}
    for bench, rows_ in sources.items():
        if bench not in OPEN_BOOK or not rows_:
            continue
        hits = index.search_many([_query(bench, r) for r in rows_], max(k, 5))
        opened = [{**r, "passages": context_of(h[:k])} for r, h in zip(rows_, hits)]
        name = OPEN_BOOK[bench]
        recall = None
        if all(r.get("chunk_id") for r in rows_):  # items built from a held-out chunk: was that chunk found?
            recall = recall_from_hits(hits, [r["chunk_id"] for r in rows_], (1, k, 5))
        info = {"description": SPECS[name].description, "k": k, "retrieval_recall": recall,
                "no_passage": sum(not h for h in hits),
                "built": f"the {bench} items, each after the top {k} passages the {ctx.recipe.index.retriever} retriever finds for its question in the "
                         "training + held-out documents"}
        path = ctx.path(BENCHMARKS) / benchmark_file(name)
        atomic_write_jsonl(path, opened)
        if bench in questions:
            questions[name] = opened  # scored by evaluate.questions.score_mcq with the passages as contexts
        else:
            data_files[name] = path  # an lm-eval task whose template starts with {{passages}}
        meta[name] = {**meta[bench], "file": f"{BENCHMARKS.name}/{path.name}", "sha256": sha256_file(path), **info}


def question_references(rows_: list[dict], seed: int) -> dict:
    """{name: {acc, ci, n, description}}: answers picked with no model (chance, word overlap, longest option)."""
    from slmforge.evaluate.metrics import wilson_ci
    from slmforge.evaluate.questions import references

    out = {}
    for name, ref in references(rows_, seed).items():
        ci = wilson_ci(ref["acc"] * len(rows_), len(rows_))
        out[name] = {"acc": ref["acc"], "ci": list(ci), "n": len(rows_), "description": ref["description"]}
    return out


def base_has_chat_template(spec: str) -> bool:
    """Whether the base model's tokenizer has a chat template (trained stages keep the base's)."""
    from slmforge.models import load_tokenizer

    return bool(getattr(load_tokenizer(spec), "chat_template", None))


def forgetting(results: dict) -> dict:
    """{model: {"general_mcq acc": Δ, "general_ppl word_perplexity": Δ}}: the change from base on general ability."""
    base = results["models"][0]["name"] if results["models"] else None
    out = {}
    for m in results["models"][1:]:
        deltas = {}
        for bench in GENERAL:
            for metric in SPECS[bench].metrics[:1]:
                a = results["scores"].get(base, {}).get(bench, {}).get(metric)
                b = results["scores"].get(m["name"], {}).get(bench, {}).get(metric)
                if a and b:
                    deltas[f"{bench} {metric}"] = b["value"] - a["value"]
        out[m["name"]] = deltas
    return out


def headline(results: dict) -> dict[str, str]:
    """'<bench> <metric>' -> 'base 0.41 · sft 0.45' for each benchmark's first metric (summary table rows)."""
    out = {}
    for r in rows(results):
        if r["metric"] != SPECS[r["bench"]].metrics[0]:
            continue
        parts = []
        for m, cell in r["cells"].items():
            flag = " (worse)" if worse_than_base(r, m) else " (beats)" if beats_base(r, m) else ""
            parts.append(f"{m} {cell['value']:.3g}{flag}")
        out[f"{r['bench']} {r['metric']}"] = " · ".join(parts)
    return out
