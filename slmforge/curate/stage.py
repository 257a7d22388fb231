"""Curate stage: ingest chunks -> train.jsonl / heldout.jsonl, as a datatrove pipeline.

    exact dedup (3 steps) -> MinHash near-dedup (4 steps) -> Gopher quality + repetition (bounds relative to the
    corpus by default, curate/relative.py) -> domain relevance
    -> PII redaction -> document-level held-out split

Every dropped chunk is kept in removed/<step>/ with its reason. The executor (local, Ray, Slurm) is a recipe
setting; datatrove's completion markers in the scratch folder make a killed run resume task by task.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from slmforge.artifacts import CHUNKS, CURATE, CURATE_REMOVED, CURATE_REPORT, DOCUMENTS, HELDOUT_CHUNKS, HELDOUT_DOCUMENTS, TRAIN_CHUNKS
from slmforge.console import console
from slmforge.records import Chunk
from slmforge.run import StageContext, Stage, atomic_write_jsonl

CHUNK_FIELDS = set(Chunk.model_fields)


def chunk_adapter(self, document) -> dict:
    """datatrove Document -> our Chunk row (plus curation metadata kept beside it)."""
    row = {k: v for k, v in document.metadata.items() if k in CHUNK_FIELDS}
    row.update(id=document.id, text=document.text)
    for extra in ("filter_reason", "relevance", "pii"):
        if extra in document.metadata:
            row[extra] = document.metadata[extra]
    return row


# curate.executor_options for Ray that go to `ray.init` (which cluster, what code to ship), not to datatrove's executor
RAY_INIT_OPTIONS = ("address", "runtime_env", "namespace")


def _run_on_ray(cfg, chain) -> None:
    """Connect to the Ray cluster named by `executor_options.address` (else $RAY_ADDRESS, else a local one-machine
    cluster, as ray.init decides), then run the chain: datatrove's Ray executor expects `ray.init` done beforehand."""
    import ray

    ray.init(**{k: cfg.executor_options[k] for k in RAY_INIT_OPTIONS if k in cfg.executor_options},
             logging_level="WARNING", log_to_driver=False)
    try:
        chain.run()
    finally:
        ray.shutdown()


def _executor(cfg, pipeline, logging_dir: Path, tasks: int, depends=None):
    if cfg.executor == "local":
        from datatrove.executor import LocalPipelineExecutor

        return LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(cfg.workers, tasks), logging_dir=str(logging_dir),
                                     depends=depends, skip_completed=True, **cfg.executor_options)
    if cfg.executor == "ray":
        from datatrove.executor.ray import RayPipelineExecutor

        opts = {k: v for k, v in cfg.executor_options.items() if k not in RAY_INIT_OPTIONS}
        return RayPipelineExecutor(pipeline, tasks=tasks, workers=cfg.workers, logging_dir=str(logging_dir),
                                   depends=depends, skip_completed=True, **opts)
    from datatrove.executor import SlurmPipelineExecutor

    opts = {"time": "01:00:00", "partition": "cpu", "job_name": f"slmforge-curate-{logging_dir.name}", **cfg.executor_options}
    if not {"env_command", "venv_path", "condaenv"} & set(opts):
        # the jobs run datatrove's `launch_pickled_pipeline` / `merge_stats` commands: take them from the Python that
        # submits (its venv need not be activated), as datatrove would only find them on the PATH
        opts["env_command"] = f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH"
    return SlurmPipelineExecutor(pipeline, tasks=tasks, logging_dir=str(logging_dir), depends=depends, **opts)


def _chain(executor) -> list:
    """The executors of a chain, first to last (datatrove forgets `depends` once it has submitted a job)."""
    out = []
    while executor is not None:
        out.insert(0, executor)
        executor = executor.depends
    return out


def _squeue(job_ids: set[str]) -> list[tuple[str, str, str]]:
    """(job id, state, reason) of our jobs still in Slurm's queue: the ones submitted for the steps and every job
    depending on them (datatrove's stats-merging jobs, whose ids it does not keep). Adds the dependants to job_ids."""
    out = subprocess.run(["squeue", "-h", "-o", "%F|%T|%r|%E"], capture_output=True, text=True)
    rows = [line.split("|", 3) for line in out.stdout.splitlines() if line.count("|") == 3]
    grew = True
    while grew:  # a job whose dependency names one of ours is ours (dependencies read like "afterok:12_*(unfulfilled)")
        new = {r[0] for r in rows if r[0] not in job_ids and job_ids & set(re.findall(r"\d+", r[3]))}
        job_ids |= new
        grew = bool(new)
    return [(r[0], r[1], r[2]) for r in rows if r[0] in job_ids]


def _wait_for(executors: list, timeout_s: float = 24 * 3600) -> None:
    """Slurm's run() only submits; block until the last job's tasks have all written completion markers. A job that
    failed (its dependants can then never start) or jobs that left the queue with tasks unfinished are an error naming
    the Slurm logs, not an endless wait."""
    last, start, delay = executors[-1], time.time(), 0.5
    job_ids = {str(e.job_id) for e in executors if e.job_id not in (None, -1)}
    while incomplete := last.get_incomplete_ranks(skip_completed=True):
        queued = _squeue(job_ids)
        stuck = [j for j, _, reason in queued if "DependencyNeverSatisfied" in reason]
        if not queued and not last.get_incomplete_ranks(skip_completed=True):
            break  # the last task finished between the two looks
        if stuck or not queued:
            failed = [e for e in executors if e.get_incomplete_ranks(skip_completed=True)]
            if stuck:
                subprocess.run(["scancel", *sorted(job_ids)], capture_output=True)
            first = failed[0] if failed else last
            raise RuntimeError(
                f"Slurm job {first.job_id} ({first.job_name}) ended with tasks {first.get_incomplete_ranks(skip_completed=True)} "
                f"unfinished{'; the jobs after it were cancelled' if stuck else ''}; its logs: {first.slurm_logs_folder}")
        if time.time() - start > timeout_s:
            raise TimeoutError(f"datatrove jobs did not finish within {timeout_s}s ({len(incomplete)} tasks left); "
                               f"see {last.logging_dir.path}")
        time.sleep(delay)
        delay = min(delay * 1.5, 10)


def build_pipeline(cfg, seed: int, chunks: list[Chunk], heldout: set[str], work: Path, bounds: dict | None = None):
    """The chain of datatrove executors for the curate recipe; `.run()` on the result runs them all in order.

    `bounds`: the quality and repetition bounds (curate/relative.py `corpus_bounds`); computed here when not given.
    """
    from datatrove.pipeline.dedup import (
        ExactDedupConfig, ExactDedupFilter, ExactDedupSignature, ExactFindDedups, MinhashConfig,
        MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature,
    )
    from datatrove.pipeline.filters import GopherRepetitionFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    from slmforge.curate.blocks import DomainRelevanceFilter, QualityFilter, RedactPII, TagSplit, normalized_text
    from slmforge.curate.relative import corpus_bounds, quality_filter_kwargs, repetition_filter_kwargs

    tasks = cfg.tasks
    if bounds is None and cfg.quality.enabled:
        bounds = corpus_bounds([c.text for c in chunks], cfg.quality, seed=seed)

    # Shard the input so `tasks` workers have files to share (datatrove readers split by file). The shards are
    # contiguous runs of the corpus order, so (file, line) order is corpus order whatever the task count: datatrove's
    # dedup keeps the first member of a duplicate cluster in that order (MinhashDedupCluster unions by size, ties to
    # the earlier signature), so 1 task, 2 tasks, Ray and Slurm keep the same chunks. Hash-sharding by document made
    # which copy survives depend on the task count.
    shard_dir = work / "input"
    if not (shard_dir / "DONE").exists():
        for i in range(tasks):
            part = chunks[i * len(chunks) // tasks:(i + 1) * len(chunks) // tasks]
            atomic_write_jsonl(shard_dir / f"{i:05d}.jsonl", [c.model_dump() for c in part])
        (shard_dir / "DONE").write_text("ok")

    def reader(folder: Path):
        return JsonlReader(str(folder), compression=None, add_file_path=False, glob_pattern="*.jsonl")

    def excluded(step: str):
        return JsonlWriter(str(work / "excluded" / step), output_filename="${rank}.jsonl", compression=None, adapter=chunk_adapter)

    logs, chain, stage_input = work / "logs", None, shard_dir
    if cfg.exact_dedup:
        exact = ExactDedupConfig(content_getter=normalized_text)
        chain = _executor(cfg, [reader(stage_input), ExactDedupSignature(str(work / "exact/sigs"), config=exact, finder_workers=1)], logs / "exact1", tasks)
        chain = _executor(cfg, [ExactFindDedups(str(work / "exact/sigs"), str(work / "exact/dups"), config=exact)], logs / "exact2", 1, chain)
        chain = _executor(cfg, [
            reader(stage_input), ExactDedupFilter(str(work / "exact/dups"), config=exact, exclusion_writer=excluded("exact_duplicate")),
            JsonlWriter(str(work / "after_exact"), output_filename="${rank}.jsonl", compression=None, adapter=chunk_adapter),
        ], logs / "exact3", tasks, chain)
        stage_input = work / "after_exact"

    final_steps = []
    if cfg.near_dedup.enabled:
        mh = MinhashConfig(n_grams=cfg.near_dedup.ngram, num_buckets=cfg.near_dedup.buckets,
                           hashes_per_bucket=cfg.near_dedup.hashes_per_bucket, seed=seed + 1)
        chain = _executor(cfg, [reader(stage_input), MinhashDedupSignature(str(work / "minhash/sigs"), config=mh)], logs / "mh1", tasks, chain)
        chain = _executor(cfg, [MinhashDedupBuckets(str(work / "minhash/sigs"), str(work / "minhash/buckets"), config=mh)], logs / "mh2", mh.num_buckets, chain)
        chain = _executor(cfg, [MinhashDedupCluster(str(work / "minhash/buckets"), str(work / "minhash/remove"), config=mh)], logs / "mh3", 1, chain)
        final_steps.append(MinhashDedupFilter(str(work / "minhash/remove"), exclusion_writer=excluded("near_duplicate")))

    q = cfg.quality
    if q.enabled:
        # the bounds: the recipe's (absolute) or derived from this corpus's chunks (relative); see curate/relative.py
        broken = q.broken if q.mode == "relative" else None  # absolute: exactly the web-text rules
        final_steps.append(QualityFilter(**quality_filter_kwargs(bounds, q.max_words),
                                         max_control_char_ratio=broken.max_control_char_ratio if broken else None,
                                         max_encoded_char_ratio=broken.max_encoded_char_ratio if broken else None,
                                         exclusion_writer=excluded("quality")))
        if q.repetition:
            final_steps.append(GopherRepetitionFilter(**repetition_filter_kwargs(bounds), exclusion_writer=excluded("repetition")))
    if cfg.relevance.enabled:
        final_steps.append(DomainRelevanceFilter([c.text for c in chunks], cfg.relevance.reference,
                                                 cfg.relevance.min_relative_score, exclusion_writer=excluded("relevance")))
    if cfg.pii.enabled:
        p = cfg.pii
        final_steps.append(RedactPII(emails=p.emails, phones=p.phones, ips=p.ips, only_public_ips=p.only_public_ips, secrets=p.secrets))
    final_steps += [
        TagSplit(heldout),
        JsonlWriter(str(work / "kept"), output_filename="${split}/${rank}.jsonl", compression=None, adapter=chunk_adapter),
    ]
    chain = _executor(cfg, [reader(stage_input), *final_steps], logs / "final", tasks, chain)
    return chain


class EmptyOutputError(RuntimeError):
    """A stage would hand nothing (or next to nothing) to the next one."""


NEAR_EMPTY_SHARE = 0.05  # keeping under 5% of the chunks for training is an error, not a warning
NEAR_EMPTY_MIN_INPUT = 20  # (only for corpora with at least this many chunks: a tiny corpus may be mostly held out)


# the recipe setting behind each filter, for "loosen ..." hints
_SETTING = {"exact_duplicate": "exact_dedup", "near_duplicate": "near_dedup", "quality": "quality",
            "repetition": "quality.repetition", "relevance": "relevance.min_relative_score"}


def _filter_flow(n_input: int, removed: dict) -> tuple[list[dict], list[str]]:
    """What reached each filter and what it removed, in pipeline order; a warning for each that removed over half."""
    flow, warnings, left = [], [], n_input
    for step, info in removed.items():
        n = info["count"]
        flow.append({"filter": step, "input": left, "removed": n})
        if left and n > left / 2:
            warnings.append(f"the {step.replace('_', ' ')} filter removed {n} of {left} chunks ({n / left:.0%}); "
                            f"see removed/{step}.jsonl, or loosen curate.{_SETTING[step]}")
        left -= n
    return flow, warnings


def _empty_message(n_input: int, n_heldout: int, flow: list[dict], removed_dir: Path) -> str:
    steps = "; ".join(f"{f['filter'].replace('_', ' ')} removed {f['removed']} of {f['input']}" for f in flow if f["removed"])
    head = f"curate kept 0 of {n_input} chunks for training ({n_heldout} held out)"
    if not steps:
        return f"{head}: every chunk went to the held-out split; lower curate.heldout_fraction or add documents"
    culprit = next((f for f in reversed(flow) if f["removed"] and f["removed"] == f["input"]), None)
    culprit = culprit or max(flow, key=lambda f: f["removed"])
    what = (f"the {culprit['filter'].replace('_', ' ')} filter removed all {culprit['input']} chunks that reached it"
            if culprit["removed"] == culprit["input"] else "the filters together removed everything")
    return (f"{head}: {what} ({steps}); loosen curate.{_SETTING[culprit['filter']]}. "
            f"The removed chunks and their reasons are in {removed_dir}")


# filters whose removals lose a document's content (a duplicate's text is kept in its other copy)
CONTENT_FILTERS = ("quality", "repetition", "relevance")


def document_losses(chunks: list[Chunk], removed_rows: dict[str, list[dict]], warn_share: float) -> list[dict]:
    """Per document that lost anything: its chunks and tokens, and what each filter removed of them (share of the
    document's chunk tokens; neighbouring chunks overlap, so the shares are of chunk tokens, not of the file).
    `warned` lists the content filters that removed more than `warn_share`. Worst first."""
    total: dict[str, dict] = {}
    for c in chunks:
        d = total.setdefault(c.doc_id, {"doc_id": c.doc_id, "source": c.source, "chunks": 0, "tokens": 0, "removed": {}})
        d["chunks"] += 1
        d["tokens"] += c.n_tokens
    for step, step_rows in removed_rows.items():
        for r in step_rows:
            d = total.get(r["doc_id"])
            if d is None:
                continue
            lost = d["removed"].setdefault(step, {"chunks": 0, "tokens": 0})
            lost["chunks"] += 1
            lost["tokens"] += r["n_tokens"]
    out = []
    for d in total.values():
        if not d["removed"]:
            continue
        for lost in d["removed"].values():
            lost["share"] = round(lost["tokens"] / max(1, d["tokens"]), 4)
        d["warned"] = [s for s in CONTENT_FILTERS if d["removed"].get(s, {}).get("share", 0) > warn_share]
        out.append(d)
    def worst(d: dict, steps) -> float:
        return max((v["share"] for s, v in d["removed"].items() if s in steps), default=0.0)

    return sorted(out, key=lambda d: (-worst(d, CONTENT_FILTERS), -worst(d, d["removed"]), d["source"]))


def document_warnings(documents: list[dict], warn_share: float, listed: int = 5) -> list[str]:
    """One warning per content filter that removed more than `warn_share` of some document, naming the worst ones."""
    out = []
    for step in CONTENT_FILTERS:
        hit = sorted((d for d in documents if step in d["warned"]), key=lambda d: -d["removed"][step]["share"])
        if hit:
            names = ", ".join(f"{d['source']} {d['removed'][step]['share']:.0%}" for d in hit[:listed])
            more = f" and {len(hit) - listed} more" if len(hit) > listed else ""
            out.append(f"{len(hit)} document{'s' * (len(hit) != 1)} lost over {warn_share:.0%} of their text to the {step} "
                       f"filter: {names}{more} (per document in curate/report.json; threshold curate.document_warn_share)")
    return out


class CurateStage(Stage):
    name = CURATE
    needs = (CHUNKS, DOCUMENTS)
    makes = (TRAIN_CHUNKS, HELDOUT_CHUNKS, HELDOUT_DOCUMENTS, CURATE_REMOVED, CURATE_REPORT)

    def run(self, ctx: StageContext) -> None:
        from slmforge.curate.blocks import heldout_documents

        cfg, seed = ctx.recipe.curate, ctx.recipe.seed
        chunks = ctx.read(CHUNKS)
        documents = ctx.read(DOCUMENTS)
        heldout = heldout_documents([d.id for d in documents], cfg.heldout_fraction, seed)
        work, logs = ctx.scratch, ctx.scratch / "logs"
        from slmforge.curate.relative import corpus_bounds

        self.bounds = corpus_bounds([c.text for c in chunks], cfg.quality, seed=seed) if cfg.quality.enabled else None
        chain = build_pipeline(cfg, seed, chunks, heldout, work, self.bounds)
        # datatrove logs every block at INFO on stderr; keep that in a file, the stage report says it shorter.
        from loguru import logger

        resumed = sorted(d.parent.name for d in logs.glob("*/completions") if any(d.iterdir()))

        from slmforge.procs import ChildFailed, run_in_group

        stderr = sys.stderr  # inside the block sys.stderr is the log file, closed after it: loguru goes back to this one
        with open(work / "datatrove.log", "a") as log, contextlib.redirect_stderr(log):
            logger.remove()
            logger.add(log)
            try:
                if cfg.executor == "slurm":
                    # submitting is a few sbatch calls, here in the build; Slurm runs the jobs and owns their processes
                    executors = _chain(chain)
                    chain.run()
                    _wait_for(executors)
                else:
                    # in a child process group that dies with the build: a kill -9 of the build leaves no datatrove
                    # worker (forkserver pool, Manager) running on, orphaned
                    run = (lambda: _run_on_ray(cfg, chain)) if cfg.executor == "ray" else chain.run
                    run_in_group(run, what="the datatrove pipeline")
            except ChildFailed as err:
                log.write(err.traceback)
                raise RuntimeError(f"{err} (traceback in {work / 'datatrove.log'})") from None
            finally:
                logger.remove()
                logger.add(stderr, level="WARNING")

        self._collect(ctx, chunks, heldout, documents)
        ctx.counts["resumed_steps"] = resumed  # datatrove steps a killed earlier attempt had already finished

    def _collect(self, ctx: StageContext, chunks: list[Chunk], heldout: set[str], documents: list) -> None:
        work, cfg = ctx.scratch, ctx.recipe.curate
        order = {c.id: i for i, c in enumerate(chunks)}

        def rows(folder: Path) -> list[dict]:
            out = []
            for f in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
                out += [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
            return sorted(out, key=lambda r: order.get(r["id"], 0))  # deterministic, in corpus order

        kept = {split: rows(work / "kept" / split) for split in ("train", "heldout")}
        pii = Counter()
        for split, split_rows in kept.items():
            for r in split_rows:
                pii.update(r.pop("pii", {}))
                r.pop("relevance", None)
            ctx.write({"train": TRAIN_CHUNKS, "heldout": HELDOUT_CHUNKS}[split], [Chunk.model_validate(r) for r in split_rows])

        removed, removed_rows = {}, {}
        for step in ("exact_duplicate", "near_duplicate", "quality", "repetition", "relevance"):
            step_rows = removed_rows[step] = rows(work / "excluded" / step)
            if step_rows:
                atomic_write_jsonl(ctx.path(CURATE_REMOVED) / f"{step}.jsonl", step_rows)
            removed[step] = {
                "count": len(step_rows),
                "reasons": dict(Counter(r.get("filter_reason", step) for r in step_rows)),
                "examples": [{"id": r["id"], "source": r["source"], "reason": r.get("filter_reason", step), "text": r["text"][:400]}
                             for r in step_rows[: cfg.examples_per_reason]],
            }
        flow, warnings = _filter_flow(len(chunks), removed)
        documents_lost = document_losses(chunks, removed_rows, cfg.document_warn_share)
        warnings += document_warnings(documents_lost, cfg.document_warn_share)
        heldout_docs = [d for d in documents if d.id in heldout]
        ctx.write(HELDOUT_DOCUMENTS, heldout_docs)
        ctx.counts.update(
            input_chunks=len(chunks), train_chunks=len(kept["train"]), heldout_chunks=len(kept["heldout"]),
            train_tokens=sum(r["n_tokens"] for r in kept["train"]), heldout_tokens=sum(r["n_tokens"] for r in kept["heldout"]),
            heldout_documents=len(heldout_docs), removed={k: v["count"] for k, v in removed.items()}, pii_redacted=dict(pii),
        )
        if not kept["train"]:  # the next stage would get nothing: stop here, not as a silent empty success
            raise EmptyOutputError(_empty_message(len(chunks), len(kept["heldout"]), flow, work / "excluded"))
        if len(chunks) >= NEAR_EMPTY_MIN_INPUT and len(kept["train"]) < NEAR_EMPTY_SHARE * len(chunks):  # scraps only
            worst = max(flow, key=lambda f: f["removed"])
            raise EmptyOutputError(
                f"curate kept only {len(kept['train'])} of {len(chunks)} chunks for training (under "
                f"{NEAR_EMPTY_SHARE:.0%}): the {worst['filter'].replace('_', ' ')} filter removed {worst['removed']} of the "
                f"{worst['input']} that reached it; loosen curate.{_SETTING[worst['filter']]}. The removed chunks and their "
                f"reasons are in {work / 'excluded'}")
        if not kept["heldout"] and cfg.heldout_fraction > 0:
            warnings.append(f"no held-out chunks (heldout_fraction {cfg.heldout_fraction} of {len(documents)} documents): "
                            "the eval stage will have nothing to build benchmarks from")
        ctx.counts["warnings"] = warnings
        for w in warnings:
            console.print(f"  [yellow]warning:[/yellow] {w}", highlight=False)
        ctx.counts["documents_over_warn_share"] = sum(1 for d in documents_lost if d["warned"])
        bounds = getattr(self, "bounds", None)
        ctx.write_json(CURATE_REPORT, {
            "counts": ctx.counts, "removed": removed, "flow": flow,
            "documents": documents_lost, "document_warn_share": cfg.document_warn_share,  # who lost what, to which filter
            "quality_mode": cfg.quality.mode, "bounds": bounds["stats"] if bounds else None,  # the bounds each filter used
            "bounds_measured_on_chunks": bounds["measured_chunks"] if bounds else 0,
        })

    def summary_rows(self, c: dict) -> list[tuple[str, str]]:
        rows = [(f"removed: {step.replace('_', ' ')}", f"{n:,}") for step, n in c["removed"].items()]
        rows += [("warning", w) for w in c.get("warnings", [])]
        return rows + [
            ("PII redacted", ", ".join(f"{k} {v}" for k, v in c["pii_redacted"].items()) or "0"),
            ("train chunks / tokens", f"{c['train_chunks']:,} / {c['train_tokens']:,}"),
            ("held-out documents / chunks", f"{c['heldout_documents']:,} / {c['heldout_chunks']:,}"),
        ]
