"""Benchmark construction: held-out chunks -> verified items (slmforge.generate.make_items, the same generators and
verifiers as the training data) -> decontaminated against every training artifact -> a fixed per-kind budget ->
frozen files eval/benchmarks/<kind>.jsonl whose sha256 every score refers to.

Plus the texts for perplexity (held-out documents) and the general-ability sets shipped in evaluate/data/.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

from slmforge import artifacts
from slmforge.evaluate.decontaminate import NgramIndex, decontaminate
from slmforge.records import Document, Item

DATA = Path(__file__).with_name("data")
TRAINING_DATA = tuple(a for a in vars(artifacts).values() if isinstance(a, artifacts.Artifact) and a.role == "train")


def training_artifacts(run) -> dict[str, Path]:
    """{"curate/train.jsonl": path, ...}: every finished artifact whose role is training data (generate's only when it ran)."""
    return {a.label: run.path(a) for a in TRAINING_DATA if run.has(a)}


def spread(items: list[Item], budget: int, seed: int) -> list[Item]:
    """Up to `budget` items, drawn round-robin over documents (seeded), so one long document cannot dominate."""
    rng = random.Random(seed)
    by_doc: dict[str, list[Item]] = defaultdict(list)
    for it in sorted(items, key=lambda i: i.id):
        by_doc[it.doc_id].append(it)
    queues = [rng.sample(v, len(v)) for _, v in sorted(by_doc.items())]
    rng.shuffle(queues)
    picked: list[Item] = []
    while len(picked) < budget and any(queues):
        for q in queues:
            if q and len(picked) < budget:
                picked.append(q.pop())
    return sorted(picked, key=lambda i: (i.doc_id, i.chunk_id, i.id))


def build_items(chunks, cfg, recipe, cache_dir: Path) -> tuple[list[Item], list[dict], str]:
    """Verified items of the configured kinds over held-out chunks; returns (items, rejected rows, teacher name)."""
    from slmforge.generate import make_items, make_teacher

    gen_cfg = recipe.generate.model_copy(update={"max_chunks": cfg.teacher_chunks, "extractive_per_chunk": cfg.extractive_per_chunk})
    items, rejected = make_items(chunks, cfg.kinds, gen_cfg, teacher=None, cache_dir=cache_dir, seed=recipe.seed)
    note = "none"
    model_kinds = [k for k in cfg.teacher_kinds if k in cfg.kinds]
    if cfg.teacher and model_kinds and gen_cfg.teacher.backend != "none":
        try:
            teacher = make_teacher(gen_cfg, recipe.base_model)
        except (ValueError, RuntimeError, ImportError) as err:  # no teacher reachable: extractive items still work
            return items, rejected, f"none ({err})"
        note = teacher.name if teacher else "none"
        written, more_rejected = make_items(chunks, model_kinds, gen_cfg.model_copy(update={"extractive": False}),
                                            teacher=teacher, cache_dir=cache_dir, seed=recipe.seed)
        seen = {i.id for i in items}
        items += [i for i in written if i.id not in seen]
        rejected += more_rejected
    return [i for i in items if i.kind in cfg.kinds], rejected, note


def select(items: list[Item], index: NgramIndex, cfg, seed: int) -> tuple[dict[str, list[Item]], list[dict]]:
    """Decontaminate, then take each kind's budget. Returns ({kind: items}, decontamination rows)."""
    clean, report = decontaminate(items, index, cfg.decontamination.max_overlap)
    by_kind: dict[str, list[Item]] = defaultdict(list)
    for it in clean:
        by_kind[it.kind].append(it)
    return {k: spread(by_kind[k], cfg.items[k], seed) for k in cfg.kinds if by_kind.get(k) and cfg.items.get(k)}, report


def text_rows(documents: list[Document], budget_words: int, min_words: int = 40) -> list[dict]:
    """Held-out documents for perplexity: an equal share of the word budget each, cut at a paragraph boundary."""
    docs = [d for d in documents if len(d.text.split()) >= min_words]
    if not docs:
        return []
    share = max(min_words, budget_words // len(docs))
    rows = []
    for d in docs:
        kept, n = [], 0
        for para in d.text.split("\n\n"):
            w = len(para.split())
            if kept and n + w > share:
                break
            kept.append(para)
            n += w
        rows.append({"id": d.id, "source": d.source, "text": "\n\n".join(kept)})
    return rows


def general_mcq(limit: int) -> list[Item]:
    rows = [json.loads(line) for line in (DATA / "general_mcq.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    items = [Item(id=r["id"], kind="mcq", chunk_id="", doc_id=f"mmlu:{r['subject']}", origin="mmlu-dev",
                  prompt=r["question"], answer=r["choices"][r["answer_index"]], choices=r["choices"],
                  answer_index=r["answer_index"]) for r in rows]
    return spread(items, limit, 0)


def general_text(budget_words: int) -> list[dict]:
    rows, n = [], 0
    for line in (DATA / "general_text.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            if rows and n + len(r["text"].split()) > budget_words:
                break
            rows.append({"id": r["id"], "source": f"mmlu:{r['subject']}", "text": r["text"]})
            n += len(r["text"].split())
    return rows
