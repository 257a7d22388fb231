"""make_items: chunks in, verified items out. Used by the generate stage and by evaluation (held-out benchmarks).

    extractive items from every chunk (correct by construction)
    -> teacher requests for the model-written kinds on up to max_chunks chunks (cached per request)
    -> parse -> verify -> preference pairs from accepted QA (closed-book answer as the rejected side) -> verify
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import Iterable

from slmforge.console import track
from slmforge.generate.user_questions import user_question_groups
from slmforge.generate.extractive import TermIndex, extractive_items
from slmforge.generate.teachers import teacher_request
from slmforge.generate.verify import Verifier
from slmforge.lm import LM, CachingLM, LMError
from slmforge.generate.writers import Unit, parse_reply, plan_units, preference_unit
from slmforge.recipe import GenerateConfig
from slmforge.records import Chunk, Item

EXTRACTIVE_KINDS = ("mcq", "cloze", "preference", "qa", "summary")
MODEL_KINDS = ("qa", "mcq", "summary", "rephrase", "preference")


def _rejected_row(kind: str, chunk_id: str, origin: str, reason: str, *, item: Item | None = None, detail: str = "", unit: str = "") -> dict:
    row = {"kind": kind, "chunk_id": chunk_id, "origin": origin, "reason": reason}
    if detail:
        row["detail"] = detail[:500]
    if unit:
        row["unit"] = unit
    if item is not None:
        row["item"] = item.model_dump(mode="json", exclude={"context"})
    return row


def teacher_chunks(chunks: list[Chunk], max_chunks: int, seed: int) -> list[Chunk]:
    """The chunks sent to the teacher: all, or a seeded sample of max_chunks kept in corpus order."""
    if not max_chunks or len(chunks) <= max_chunks:
        return list(chunks)
    picked = sorted(random.Random(seed).sample(range(len(chunks)), max_chunks))
    return [chunks[i] for i in picked]


def make_items(chunks: list[Chunk], kinds: Iterable[str], cfg: GenerateConfig, *, teacher: LM | None = None,
               cache_dir: Path, seed: int, avoid_texts: Iterable[str] = (), stats: dict | None = None) -> tuple[list[Item], list[dict]]:
    """(accepted items, rejected rows with "reason") for `kinds` over `chunks`.

    teacher=None: extractive kinds only (cloze, mcq, definition qa, principal-sentence summary, term-swap preference),
    correct by construction.
    avoid_texts: no item may share a `cfg.verify.heldout_ngram`-word n-gram with any of them (decontamination).
    stats: filled with teacher_requests, teacher_failures and teacher_errors ({message: count}) when given.
    """
    stats = {} if stats is None else stats
    stats.update(teacher_requests=0, teacher_failures=0, teacher_errors={})
    kinds = set(kinds)
    unknown = kinds - set(EXTRACTIVE_KINDS) - set(MODEL_KINDS) - {"cloze"}
    if unknown:
        raise ValueError(f"unknown item kinds {sorted(unknown)}; choose from rephrase, qa, mcq, cloze, summary, preference")
    verifier = Verifier(cfg.verify, avoid_texts)
    accepted: list[Item] = []
    rejected: list[dict] = []
    seen_ids: set[str] = set()

    def consider(item: Item, unit: str = "", emit: bool = True) -> bool:
        reason = "duplicate" if item.id in seen_ids else verifier.check(item)
        if reason:
            rejected.append(_rejected_row(item.kind, item.chunk_id, item.origin, reason, item=item, unit=unit))
            return False
        seen_ids.add(item.id)
        if emit:
            accepted.append(item)
        return True

    # 1. extractive: every chunk, no teacher needed
    if cfg.extractive or teacher is None:
        wanted = [k for k in EXTRACTIVE_KINDS if k in kinds]
        if wanted and cfg.extractive_per_chunk:
            terms = TermIndex(chunks)
            for chunk in track(chunks, "extractive items"):
                for item in extractive_items(chunk, wanted, terms, cfg.extractive_per_chunk, seed, cfg.max_passage_words):
                    consider(item)
                if "qa" in kinds and cfg.user_questions:
                    for first, *more in user_question_groups(chunk, cfg.user_questions):
                        if consider(first):  # more wordings of an accepted fact are wanted, not near duplicates
                            for item in more:
                                if item.id not in seen_ids and not verifier.check_length(item):
                                    seen_ids.add(item.id)
                                    accepted.append(item)
    if teacher is None:
        return accepted, rejected

    # 2. model-written: one cached request per (chunk, kind, index)
    picked = teacher_chunks(chunks, cfg.max_chunks, seed)
    units = plan_units(picked, kinds & set(MODEL_KINDS) & set(cfg.teacher_kinds), cfg, seed)
    qa_items: list[Item] = []

    def run_units(batch: list[Unit], description: str) -> None:
        results = CachingLM(teacher, cache_dir).generate([teacher_request(u.request) for u in batch], description)
        stats["teacher_requests"] += len(results)
        for unit, result in zip(batch, results):
            if isinstance(result, LMError):
                stats["teacher_failures"] += 1
                stats["teacher_errors"][str(result)] = stats["teacher_errors"].get(str(result), 0) + 1
                rejected.append(_rejected_row(unit.kind, unit.chunk.id, teacher.name, "teacher_error", detail=str(result), unit=unit.key))
                continue
            reply = result.text.strip()
            item = parse_reply(unit, reply, teacher.name)
            if isinstance(item, str):
                rejected.append(_rejected_row(unit.kind, unit.chunk.id, teacher.name, item.split(":")[0], detail=f"{item}; reply: {reply}", unit=unit.key))
                continue
            if consider(item, unit.key, emit=item.kind != "qa" or "qa" in kinds) and item.kind == "qa":
                qa_items.append(item)

    run_units(units, f"teacher {teacher.name}")

    # 3. preference pairs: chosen = an accepted grounded answer, rejected = the closed-book answer
    if "preference" in kinds and "preference" in cfg.teacher_kinds:
        in_picked = {c.id for c in picked}
        by_chunk = {c.id: c for c in picked}
        sources = qa_items + [i for i in accepted if i.kind == "qa" and i.origin == "extractive" and i.chunk_id in in_picked]
        count: dict[str, int] = defaultdict(int)
        pref_units = []
        for qa in sources:
            if count[qa.chunk_id] < cfg.items_per_chunk:
                pref_units.append(preference_unit(qa, by_chunk[qa.chunk_id], cfg, seed, count[qa.chunk_id]))
                count[qa.chunk_id] += 1
        if pref_units:
            run_units(pref_units, f"closed-book answers {teacher.name}")
    return accepted, rejected
