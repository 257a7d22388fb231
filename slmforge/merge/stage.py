"""Merge stage: candidates built with mergekit from the final specialist, its base and the stage models; each scored on
eval's frozen held-out benchmarks and the forgetting check; the best within `merge.max_forgetting` becomes merge/model.

    model/           the chosen candidate (pruned and recovered when merge.prune.enabled), what export and serve take
    candidates.json  every candidate: headline scores, domain score, forgetting, paired differences from the unmerged
                     specialist (paired bootstrap + exact sign test, slmforge/evaluate/paired.py), the choice and why
    candidates.md    the same as a table; candidates.png: domain gain vs forgetting per candidate

Candidates: linear and SLERP interpolations of the specialist (the last trained stage) with its base at the recipe's
ratios, TIES / DARE merges of every trained stage's model over the base (when there are two or more), the unmerged
specialist itself and the base. Scoring is eval's own (lm-evaluation-harness through slmforge.evaluate.scoring) on a
seeded sample of `merge.max_items` items per benchmark, each model's scores a cached unit keyed by its weights.
"""

from __future__ import annotations

import base64
import os
import random
import shutil
import time
from pathlib import Path

from slmforge.artifacts import (BENCHMARKS, MERGE, MERGE_CANDIDATES, MERGE_PLOT, MERGE_TABLE, MERGED_MODEL, PRETRAIN_ROWS,
                                TRAIN_CHUNKS, TRAIN_STAGES, benchmark_file, trained_model)
from slmforge.console import console
from slmforge.merge.choice import choose
from slmforge.run import Stage, StageContext, atomic_write_jsonl, cached_unit, code_hash, hash_obj, read_jsonl

FORGETTING_BENCH, FORGETTING_METRIC = "general_ppl", "word_perplexity"
QUESTION_BENCHES = ("questions", "doc_questions")  # scored by evaluate.questions on the loaded model, not as lm-eval tasks


class MergeStage(Stage):
    name = MERGE
    needs = (BENCHMARKS,)
    uses = tuple(trained_model(s) for s in TRAIN_STAGES)
    makes = (MERGED_MODEL, MERGE_CANDIDATES, MERGE_TABLE, MERGE_PLOT)

    def uses_for(self, recipe):
        # pruning calibrates and recovers on the curated training text (never the held-out split)
        return self.uses + ((TRAIN_CHUNKS, PRETRAIN_ROWS) if recipe.merge.prune.enabled else ())

    def external_inputs(self, recipe, run):
        from slmforge.models import model_identity

        return {"base_model": model_identity(recipe.base_model), "eval": hash_obj(recipe.eval.model_dump(
            mode="json", include={"chat_template", "max_new_tokens", "batch_size"}))}

    # ------------------------------------------------------------------------------------------------ run
    def run(self, ctx: StageContext) -> None:
        from slmforge.models import resolve_model

        cfg, recipe, run = ctx.recipe.merge, ctx.recipe, ctx.run
        started = time.time()
        trained = {s: str(f) for s, f in run.trained_models().items()}
        if not trained:
            raise ValueError("the merge stage needs a trained model: enable and run dapt, sft or dpo first")
        spec_stage, spec_folder = list(trained.items())[-1]
        base = resolve_model(recipe.base_model)
        bench = Benchmarks(ctx, cfg)

        from slmforge.merge.candidates import candidate_configs, run_merge

        specialist = f"{spec_stage} (unmerged)"
        models: dict[str, str] = {specialist: spec_folder}
        configs = candidate_configs((spec_stage, spec_folder), base, trained, cfg, recipe.seed)
        merge_seconds = {}
        for name, config in configs.items():
            folder = ctx.scratch / "candidates" / _safe(name)
            if not (folder / "config.json").is_file():  # a rerun after a kill keeps the merges already made
                t = time.time()
                console.print(f"  merging {name}", highlight=False)
                run_merge(config, folder, spec_folder, recipe.seed)
                merge_seconds[name] = round(time.time() - t, 1)
            models[name] = str(folder)
        models["base"] = base

        scored = {name: bench.score(name, folder) for name, folder in models.items()}
        table = candidate_rows(scored, specialist, bench.domain, recipe.seed)
        chosen, reason = choose([{"name": r["name"], "domain_score": r["domain_score"], "forgetting": r["forgetting"]}
                                 for r in table], cfg.max_forgetting)
        for r in table:
            r["chosen"] = r["name"] == chosen
            r["within_limit"] = r["forgetting"] is not None and r["forgetting"] <= cfg.max_forgetting
            r["config"] = configs.get(r["name"])
            r["merge_seconds"] = merge_seconds.get(r["name"])
        console.print(f"  kept {chosen}: {reason}", highlight=False)

        model_dir = ctx.path(MERGED_MODEL)
        _place(Path(models[chosen]), model_dir)
        doc = {"specialist": specialist, "chosen": chosen, "reason": reason, "max_forgetting": cfg.max_forgetting,
               "benchmarks": {b: len(r) for b, r in bench.rows.items()}, "domain_benchmarks": bench.domain,
               "forgetting": f"{FORGETTING_BENCH} {FORGETTING_METRIC}: candidate / base - 1", "candidates": table}

        if cfg.prune.enabled:
            from slmforge.merge.prune import prune_and_recover

            info = prune_and_recover(ctx, model_dir, ctx.scratch / "pruned", cfg.prune, recipe)
            pruned_name = f"pruned({chosen})"
            scored[pruned_name] = bench.score(pruned_name, str(model_dir))
            pruned_row = pruned_candidate_row(scored, pruned_name, chosen, bench.domain, recipe.seed, cfg.max_forgetting)
            info["tokens_per_s_pruned"] = tokens_per_second(str(model_dir))
            info["tokens_per_s_unpruned"] = tokens_per_second(models[chosen])
            doc["prune"] = {**info, "row": pruned_row}
            doc["model"] = pruned_name
        else:
            doc["model"] = chosen

        doc["seconds"] = round(time.time() - started, 1)
        ctx.write_json(MERGE_CANDIDATES, doc)
        ctx.write_text(MERGE_TABLE, markdown(doc))
        from slmforge.report import plots

        uri = plots.merge_tradeoff(doc)
        if uri:
            ctx.path(MERGE_PLOT).write_bytes(base64.b64decode(uri.split(",", 1)[1]))
        ctx.counts.update(chosen=chosen, reason=reason, model=doc["model"],
                          candidates={r["name"]: {"domain_score": round(r["domain_score"], 4),
                                                  "forgetting": None if r["forgetting"] is None else round(r["forgetting"], 4)}
                                      for r in table},
                          scored_from_cache=bench.stats.get("cache_hits", 0))
        if "prune" in doc:
            ctx.counts["prune"] = {k: v for k, v in doc["prune"].items() if k != "row"}
        from slmforge.report import write_report

        console.print(f"  report → {write_report(run, merge=doc)}")

    def summary_rows(self, c: dict) -> list[tuple[str, str]]:
        rows = [("merge: kept", str(c.get("model"))), ("merge: why", str(c.get("reason", ""))[:100])]
        if c.get("prune"):
            p = c["prune"]
            rows.append(("prune: parameters", f"{p['params_before']:,} → {p['params_after']:,} ({p['params_after'] / p['params_before']:.1%})"))
        return rows


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-._" else "_" for ch in name)


def _place(src: Path, dest: Path) -> None:
    """The chosen model's files into dest: hard links where possible (the specialist and base stay where they are)."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name in ("manifest.json", "SOURCE"):
            continue
        target = dest / f.name
        target.unlink(missing_ok=True)
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)


class Benchmarks:
    """A seeded sample of eval's frozen benchmarks, written once as lm-eval tasks, and scoring a model on it."""

    def __init__(self, ctx: StageContext, cfg):
        from slmforge.evaluate.lm_eval_tasks import asked_in_chat, safe_prefix, write_tasks
        from slmforge.evaluate.stage import base_has_chat_template

        recipe = ctx.recipe
        folder = ctx.input(BENCHMARKS)
        wanted = [b for b in cfg.benchmarks if (folder / benchmark_file(b)).is_file()]
        if not wanted:
            raise ValueError(f"none of merge.benchmarks ({', '.join(cfg.benchmarks)}) was built by eval in {folder}")
        if not (folder / benchmark_file(FORGETTING_BENCH)).is_file():
            raise ValueError(f"{folder / benchmark_file(FORGETTING_BENCH)} is missing: the forgetting check needs eval.general: "
                             "true and eval.general_text_words > 0")
        self.domain = wanted
        self.rows: dict[str, list[dict]] = {}
        data_dir = ctx.scratch / "sample"  # the seeded sample of eval's benchmark files
        data_files = {}
        for b in (*wanted, FORGETTING_BENCH):
            rows = read_jsonl(folder / benchmark_file(b))
            if b != FORGETTING_BENCH and len(rows) > cfg.max_items:  # the forgetting set is small already: all of it
                keep = sorted(random.Random(f"{recipe.seed}:{b}").sample(range(len(rows)), cfg.max_items))
                rows = [rows[i] for i in keep]
            self.rows[b] = rows
            if b not in QUESTION_BENCHES:
                data_files[b] = data_dir / benchmark_file(b)
                atomic_write_jsonl(data_files[b], rows)
        self.lm_benches = list(data_files)
        has_template = base_has_chat_template(recipe.base_model)
        self.chat = tuple(sorted(b for b in self.lm_benches if asked_in_chat(b, recipe.eval.chat_template, has_template)))
        self.prefix = safe_prefix(recipe.name)
        self.task_dir = ctx.scratch / "tasks"
        write_tasks(self.task_dir, self.prefix, data_files, recipe.eval.max_new_tokens, set(self.chat))
        self.hashes = {b: hash_obj(r) for b, r in self.rows.items()}
        self.cache = ctx.run.cache_dir("merge-scores")
        self.eval_cfg, self.seed = recipe.eval, recipe.seed
        self.stats: dict = {}

    def score(self, name: str, folder: str) -> dict:
        """eval's score_model on this sample: {scores, items, seconds}, cached by the model's weights."""
        from slmforge.evaluate.scoring import score_model
        from slmforge.lm.identity import weights_hash

        key = hash_obj({"code": code_hash("slmforge.evaluate.scoring"), "model": weights_hash(folder), "benchmarks": self.hashes,
                        "chat": self.chat, "max_new_tokens": self.eval_cfg.max_new_tokens, "batch_size": self.eval_cfg.batch_size,
                        "seed": self.seed})
        console.print(f"  scoring {name}", highlight=False)
        questions = {b: self.rows[b] for b in QUESTION_BENCHES if b in self.rows}
        return cached_unit(self.cache, key, lambda: score_model(
            name, folder, self.task_dir, self.prefix, self.lm_benches, batch_size=self.eval_cfg.batch_size, seed=self.seed,
            chat=self.chat, questions=questions), self.stats)


def headline(bench: str) -> str:
    from slmforge.evaluate.lm_eval_tasks import SPECS

    return SPECS[bench].metrics[0]


def candidate_rows(scored: dict[str, dict], specialist: str, domain: list[str], seed: int, only: list[str] | None = None) -> list[dict]:
    """One row per model: headline score per benchmark, domain score (their mean), forgetting (general-text perplexity
    over the base's, minus 1) and paired differences from the specialist per benchmark (slmforge.evaluate.compare)."""
    from slmforge.evaluate.compare import paired_results

    names = [n for n in scored if only is None or n in only]
    predictions = {n: [{"bench": b, **row} for b, rows in s["items"].items() for row in rows] for n, s in scored.items()}
    paired = paired_results(predictions, [specialist, *[n for n in names if n != specialist]], seed)
    base_ppl = scored["base"]["scores"].get(FORGETTING_BENCH, {}).get(FORGETTING_METRIC, {}).get("value") if "base" in scored else None
    spec_domain = _domain_score(scored[specialist], domain)
    out = []
    for n in names:
        s = scored[n]["scores"]
        ppl = s.get(FORGETTING_BENCH, {}).get(FORGETTING_METRIC, {}).get("value")
        score = _domain_score(scored[n], domain)
        out.append({
            "name": n, "domain_score": score, "domain_gain": score - spec_domain,
            "scores": {b: s[b][headline(b)] for b in domain if b in s},
            "general_ppl": ppl, "forgetting": (ppl / base_ppl - 1) if ppl and base_ppl else None,
            "paired": {b: paired.get(n, {}).get(b, {}).get(headline(b)) for b in (*domain, FORGETTING_BENCH)} if n != specialist else {},
            "seconds": scored[n].get("seconds"),
        })
    return out


def pruned_candidate_row(scored: dict[str, dict], pruned: str, source: str, domain: list[str], seed: int,
                         max_forgetting: float) -> dict:
    """The pruned model's row, compared with `source`, the model it was cut from (the kept candidate), so its cells
    measure pruning alone, not merging too; forgetting stays against the base."""
    row = candidate_rows(scored, source, domain, seed, only=[pruned])[0]
    row.update(chosen=False, within_limit=row["forgetting"] is not None and row["forgetting"] <= max_forgetting,
               pruned=True, compared_with=source)
    return row


def _domain_score(scored: dict, domain: list[str]) -> float:
    values = [scored["scores"][b][headline(b)]["value"] for b in domain if b in scored["scores"]]
    return sum(values) / len(values) if values else 0.0


def markdown(doc: dict) -> str:
    from slmforge.evaluate.compare import paired_text

    domain = doc["domain_benchmarks"]
    head = ["candidate", "domain score", "Δ vs specialist", *[f"{b} {headline(b)}" for b in domain],
            "general ppl", "forgetting", "within limit", "kept"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = doc["candidates"] + ([doc["prune"]["row"]] if doc.get("prune") else [])
    for r in rows:
        cells = [r["name"], f"{r['domain_score']:.3f}", f"{r['domain_gain']:+.3f}"]
        for b in domain:
            v = r["scores"].get(b)
            p = r["paired"].get(b)
            cells.append("–" if v is None else f"{v['value']:.3f}" + (f" · {paired_text(p)}" if p else ""))
        cells += ["–" if r["general_ppl"] is None else f"{r['general_ppl']:.2f}",
                  "–" if r["forgetting"] is None else f"{r['forgetting']:+.1%}",
                  "yes" if r.get("within_limit") else "no", "**kept**" if r.get("chosen") else ("pruned" if r.get("pruned") else "")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Kept: **{doc['chosen']}**: {doc['reason']}.",
              f"Items per benchmark: {', '.join(f'{b} {n}' for b, n in doc['benchmarks'].items())} (a seeded sample of eval's "
              "frozen held-out benchmarks, the same items for every candidate). Domain score = mean of the headline metrics "
              f"of {', '.join(domain)}. Forgetting = {doc['forgetting']}. Δ cells: paired difference from the unmerged "
              "specialist on the same items [paired-bootstrap 95% CI] → verdict (slmforge/evaluate/paired.py)."]
    if doc.get("prune"):
        p = doc["prune"]
        lines += ["", f"Pruned row: Δ and paired cells against {p['row'].get('compared_with', doc['specialist'])}, the model it "
                  f"was pruned from. Pruned: {p['params_before']:,} → {p['params_after']:,} parameters ({p['params_after'] / p['params_before']:.1%}); "
                  f"intermediate_size {p['intermediate_before']} → {p['intermediate_after']}; recovery {p.get('recovery_steps', 0)} steps "
                  f"(loss {p.get('recovery_first_loss')} → {p.get('recovery_final_loss')}); transformers greedy tokens/s "
                  f"{p['tokens_per_s_unpruned']} → {p['tokens_per_s_pruned']}."]
    return "\n".join(lines) + "\n"


def tokens_per_second(folder: str, prompts: tuple[str, ...] = ("What does VACUUM do?", "Explain an index in one sentence."),
                      new_tokens: int = 48) -> float:
    """Greedy decoding speed in transformers (fp32, this process's threads), prompt processing included."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    made, seconds = 0, 0.0
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt")
            t = time.perf_counter()
            out = model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
            seconds += time.perf_counter() - t
            made += out.shape[1] - ids["input_ids"].shape[1]
    return round(made / seconds, 1)
