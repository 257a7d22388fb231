"""Model-written generators: a request per (chunk, kind, index), and a parser from the teacher's reply to an Item.

Every prompt carries the source passage (the teacher is grounded by it, even when it is the small base model
itself); a focus sentence picked from the passage steers each question to a different, checkable fact.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from slmforge.generate.extractive import make_id
from slmforge.generate.text import cut_words, sentences
from slmforge.recipe import GenerateConfig
from slmforge.records import Chunk, Item

REPHRASE_STYLES = (
    "as a clear textbook paragraph for a student",
    "in simple words for a beginner, keeping every fact",
    "as a short explanation a senior engineer would give a colleague",
)


@dataclass
class Unit:
    """One request to the teacher and what it is for."""

    chunk: Chunk
    kind: str
    index: int
    request: dict
    extra: dict = field(default_factory=dict)  # e.g. the question and chosen answer of a preference pair

    @property
    def key(self) -> str:
        return f"{self.chunk.id}/{self.kind}/{self.index}"


def _guidance(cfg: GenerateConfig) -> str:
    parts = []
    if cfg.topics:
        parts.append("Prefer questions about: " + "; ".join(cfg.topics) + ".")
    for ex in cfg.seed_examples[:3]:
        if ex.get("question") and ex.get("answer"):
            parts.append(f"Example:\nQuestion: {ex['question']}\nAnswer: {ex['answer']}")
    return ("\n\n" + "\n\n".join(parts)) if parts else ""


def _request(text: str, cfg: GenerateConfig, seed: int, temperature: float | None = None) -> dict:
    t = cfg.teacher
    return {"messages": [{"role": "user", "content": text}], "max_tokens": t.max_new_tokens,
            "temperature": t.temperature if temperature is None else temperature, "seed": seed}


def plan_units(chunks: list[Chunk], kinds: set[str], cfg: GenerateConfig, seed: int) -> list[Unit]:
    """Requests for the model-written kinds (qa is planned whenever preference pairs are asked for: they build on it)."""
    units = []
    guide = _guidance(cfg)
    for chunk in chunks:
        passage = cut_words(chunk.text, cfg.max_passage_words)
        rng = random.Random(f"{seed}:{chunk.id}:writers")
        focus = sentences(passage) or [passage]
        rng.shuffle(focus)
        for i in range(cfg.items_per_chunk):
            s = focus[i % len(focus)]
            varied = None if i == 0 else max(cfg.teacher.temperature, 0.7)  # greedy twice gives the same text twice
            if kinds & {"qa", "preference"}:
                units.append(Unit(chunk, "qa", i, _request(
                    f"Passage:\n{passage}\n\nWrite one question that this sentence of the passage answers: \"{s}\"\n"
                    f"Then answer it using only the passage.{guide}\n\nReply in exactly this form:\n"
                    "Question: <the question>\nAnswer: <the answer>", cfg, seed, varied), {"passage": passage}))
            if "mcq" in kinds:
                units.append(Unit(chunk, "mcq", i, _request(
                    f"Passage:\n{passage}\n\nWrite one multiple-choice question about this sentence: \"{s}\"\n"
                    "Give four options, exactly one correct according to the passage, and the letter of the correct one."
                    f"{guide}\n\nReply in exactly this form:\nQuestion: <question>\nA) <option>\nB) <option>\n"
                    "C) <option>\nD) <option>\nAnswer: <letter>", cfg, seed, varied), {"passage": passage}))
            if "summary" in kinds:
                units.append(Unit(chunk, "summary", i, _request(
                    f"Passage:\n{passage}\n\nSummarize the passage in two or three sentences of your own words.",
                    cfg, seed, varied), {"passage": passage}))
            if "rephrase" in kinds:
                style = REPHRASE_STYLES[i % len(REPHRASE_STYLES)]
                units.append(Unit(chunk, "rephrase", i, _request(
                    f"Passage:\n{passage}\n\nRewrite the passage {style}. Keep every fact; add nothing.",
                    cfg, seed, varied), {"passage": passage, "instruction": f"Rewrite the passage {style}."}))
    return units


def preference_unit(qa: Item, chunk: Chunk, cfg: GenerateConfig, seed: int, index: int) -> Unit:
    """The rejected side of a pair: the teacher answering the question closed-book (no passage to lean on)."""
    req = _request(f"{qa.prompt}\nAnswer in one or two sentences.", cfg, seed)
    return Unit(chunk, "preference", index, req, {"question": qa.prompt, "chosen": qa.answer, "passage": qa.context})


_LABEL = re.compile(r"^\s*\**\s*(question|answer|summary|rewritten passage)\s*\**\s*[:：]\s*", re.I)
_QA = re.compile(r"question\s*\**\s*[:：]\s*(?P<q>.+?)\s*\**\s*answer\s*\**\s*[:：]\s*(?P<a>.+)", re.I | re.S)
_OPTION = re.compile(r"^\s*\(?([A-D])[).:]\s*(.+?)\s*$", re.M)
_LETTER = re.compile(r"answer\s*\**\s*[:：]\s*\(?([A-D])\b", re.I)


_PREAMBLE = re.compile(r"^\s*(?:(?:the |my )?answer(?: is)?|sure[,!.]?(?: here.*?)?)\s*[:：]\s*", re.I)


def _clean(text: str) -> str:
    """Labels and preambles off; a reply cut by max_tokens is trimmed back to its last full sentence."""
    text = _PREAMBLE.sub("", _LABEL.sub("", text.strip().strip("*").strip())).strip()
    if text and text[-1] not in ".!?)\"'`”" and re.search(r"[.!?](?=\s)", text):
        text = text[: max(m.end() for m in re.finditer(r"[.!?](?=\s)", text))]
    return text.strip()


def parse_reply(unit: Unit, reply: str, origin: str) -> Item | str:
    """The Item a reply describes, or the reason it could not be read."""
    c, passage = unit.chunk, unit.extra.get("passage", unit.chunk.text)
    base = dict(chunk_id=c.id, doc_id=c.doc_id, origin=origin, context=passage)
    reply = reply.strip()
    if not reply:
        return "unparseable: empty reply"
    if unit.kind == "qa":
        m = _QA.search(reply)
        if not m:
            return "unparseable: no 'Question:'/'Answer:'"
        q, a = _clean(m["q"]), _clean(m["a"].split("\nQuestion")[0])
        return Item(id=make_id(kind="qa", prompt=q, answer=a), kind="qa", prompt=q, answer=a, **base)
    if unit.kind == "mcq":
        m, options, letter = re.search(r"question\s*[:：]\s*(.+?)\n", reply, re.I), _OPTION.findall(reply), _LETTER.search(reply)
        opts = {k: _clean(v) for k, v in options}
        if not m or len(opts) != 4 or not letter:
            return "unparseable: needs a question, options A-D and 'Answer: <letter>'"
        choices = [opts[k] for k in "ABCD"]
        idx = "ABCD".index(letter[1].upper())
        q = _clean(m[1])
        return Item(id=make_id(kind="mcq", prompt=q, choices=choices), kind="mcq", prompt=q, answer=choices[idx],
                    choices=choices, answer_index=idx, **base)
    if unit.kind in ("summary", "rephrase"):
        text = _clean(reply)
        prompt = passage if unit.kind == "summary" else unit.extra["instruction"]
        return Item(id=make_id(kind=unit.kind, prompt=prompt, answer=text), kind=unit.kind, prompt=prompt, answer=text, **base)
    if unit.kind == "preference":
        q, chosen, rejected = unit.extra["question"], unit.extra["chosen"], _clean(reply)
        return Item(id=make_id(kind="preference", prompt=q, answer=chosen, rejected=rejected), kind="preference",
                    prompt=q, answer=chosen, rejected=rejected, **base)
    raise ValueError(f"unknown kind {unit.kind!r}")
