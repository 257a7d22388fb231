"""Question-answer matching pairs for DPO: a question's own answer preferred over the answer to another chunk's question.

Cross-entropy on questions and answers (SFT) and on the documents (DAPT) raises the likelihood of every domain answer
alike, so a model can learn the manual's wording without learning which answer goes with which question. A real
multiple-choice question about the documents asks exactly that: which of several answers of the same manual answers
this question. These pairs teach it directly, with DPO (TRL's DPOTrainer, closed book, the chat format serving uses):

    prompt    a question item of the training chunks (the user-style questions, definitions, teacher-written QA)
    chosen    its own answer (the sentence of its chunk that answers it)
    rejected  the answer of a question item from another chunk, drawn at random (seeded)

The CPU recipe (the demo preset) trains DPO on these pairs only; README "Which answer goes with which question" has what
they did on real FAQs never trained on. The negatives are random, not retrieved neighbours (hard negatives, not
compared yet): a neighbouring chunk's answer may well answer the question too, and would teach rejecting right answers.

The same pairs open book (kind `matching_open`, slmforge/generate/raft.py): the prompt holds the question's source
passage among retrieved distractors, as serving and the open-book benchmarks show them, so the preference is for the
answer that the passages in front of the model support, each answer cited with the source passage.
"""

from __future__ import annotations

import random

from slmforge.evaluate.questions import content_words
from slmforge.records import Item

KIND = "matching"


def partners(items: list[Item], seed: int = 0) -> dict[str, Item]:
    """Each qa item's rejected answer: a question item of another chunk whose answer is not a near-copy of its own
    (duplicated sentences across pages exist), drawn seeded per item; items with none are left out."""
    questions = [it for it in items if it.kind == "qa" and it.answer.strip()]
    if len({it.chunk_id for it in questions}) < 2:
        return {}  # every answer comes from one chunk: no answer of another chunk to prefer it over
    words = {it.id: content_words(it.answer) for it in questions}
    out = {}
    for item in questions:
        rng = random.Random(f"{seed}:matching:{item.id}")
        own = words[item.id]
        for _attempt in range(20):
            other = rng.choice(questions)
            if other.chunk_id != item.chunk_id and len(own & words[other.id]) < 0.5 * max(len(own), 1):
                out[item.id] = other
                break
    return out


def pair(prompt: str, chosen: str, rejected: str, item: Item, kind: str = KIND) -> dict:
    """One DPO row in TRL's conversational format."""
    return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "chunk_id": item.chunk_id, "teacher": item.origin,
            "kind": kind}


def matching_pairs(items: list[Item], seed: int = 0, drawn: dict[str, Item] | None = None) -> list[dict]:
    """DPO rows (TRL's conversational format) for the qa items: own answer over another chunk's answer; `drawn`:
    partners(items, seed) when the caller has it already."""
    other = partners(items, seed) if drawn is None else drawn
    return [pair(item.prompt, item.answer, other[item.id].answer, item) for item in items if item.id in other]
