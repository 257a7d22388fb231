"""Retrieval-augmented fine-tuning data (RAFT): a question with its source passage among retrieved distractors.

For every question item (kind qa) the training index (the index stage's BM25 over the training passages only) is asked
the item's question, as serving will ask it. The prompt holds `k` passages:
  - with probability `p_source`: the source passage (the passage of the item's chunk that holds most of the answer)
    and k-1 distractors, the best-ranked passages of other chunks (hard negatives), in a seeded random order; the answer
    is the item's answer followed by the source's citation "[document § section]";
  - otherwise k distractors only: the answer says the passages do not cover it, then answers from memory (RAFT's
    share without the oracle document, so the model keeps its closed-book knowledge and says when retrieval missed).
The same prompt layout is used everywhere a model reads passages (slmforge.index.bm25.passages_prompt):
    Passages:
    [1] [source § section] text
    [2] ...

    Question: <question>
SFT gets it as a chat turn; DAPT (mixed training) gets the with-source examples as plain text ending in
"Answer: <answer>"; DPO gets pairs whose rejected answer answers from a distractor passage and cites it, and (given
the matching partners) open-book matching pairs: the same with-source prompt, the item's own answer preferred over
another chunk's question's answer (slmforge/generate/matching.py), both cited with the source passage.
It also measures retrieval: recall@k of each question's source chunk (the figure the report shows).
"""

from __future__ import annotations

import random

from slmforge.evaluate.questions import content_words
from slmforge.index.bm25 import Bm25Index, passages_prompt, recall_from_hits
from slmforge.records import Item, Passage

OPEN_KIND = "matching_open"
NO_SOURCE = "The passages above do not answer this; from the documentation: "


def source_passage(item: Item, candidates: list[Passage]) -> Passage | None:
    """The passage of the item's chunk sharing most content words with its answer."""
    if not candidates:
        return None
    answer = content_words(item.answer)
    return max(candidates, key=lambda p: len(answer & content_words(p.text)))


def _first_sentence(text: str, words: int = 40) -> str:
    from slmforge.generate.text import sentences

    sents = sentences(text)
    return sents[0] if sents else " ".join(text.split()[:words])


def raft_data(items: list[Item], index: Bm25Index, k: int = 2, p_source: float = 0.8, seed: int = 0,
              recall_ks: tuple[int, ...] = (1, 2, 5, 10), partners: dict[str, Item] | None = None
              ) -> tuple[list[dict], list[dict], list[dict], dict]:
    """(sft rows, pretrain rows, dpo rows, stats) for the qa items; `partners` (slmforge.generate.matching.partners:
    each question's rejected answer) adds the open-book matching pairs."""
    from slmforge.generate.matching import pair

    questions = [it for it in items if it.kind == "qa"]
    other = partners or {}
    by_chunk: dict[str, list[Passage]] = {}
    for p in index.passages:
        by_chunk.setdefault(p.chunk_id, []).append(p)
    top = max(max(recall_ks), k + 4)
    results = index.search_many([it.prompt for it in questions], top)
    sft, pretrain, dpo = [], [], []
    for item, hits in zip(questions, results):
        source = source_passage(item, by_chunk.get(item.chunk_id, []))
        if source is None:
            continue
        distractors = [h.passage for h in hits if h.passage.chunk_id != item.chunk_id]
        rng = random.Random(f"{seed}:raft:{item.id}")
        meta = {"chunk_id": item.chunk_id, "teacher": item.origin}
        if rng.random() < p_source or not distractors:
            shown = distractors[: k - 1] + [source]
            rng.shuffle(shown)
            prompt, answer = passages_prompt(item.prompt, shown), f"{item.answer} {source.citation}"
            pretrain.append({"text": f"{prompt}\nAnswer: {answer}", "kind": "raft", **meta})
            if distractors:
                wrong = distractors[0]
                dpo.append({"prompt": [{"role": "user", "content": prompt}],
                            "chosen": [{"role": "assistant", "content": answer}],
                            "rejected": [{"role": "assistant", "content": f"{_first_sentence(wrong.text)} {wrong.citation}"}],
                            "kind": "raft", **meta})
            if item.id in other:
                dpo.append(pair(prompt, answer, f"{other[item.id].answer} {source.citation}", item, OPEN_KIND))
        else:
            prompt, answer = passages_prompt(item.prompt, distractors[:k]), NO_SOURCE + item.answer
        sft.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                    "kind": "raft", **meta})
    stats = {"questions": len(questions), "raft_rows": len(sft), "with_source": len(pretrain),
             "recall@k": recall_from_hits(results, [it.chunk_id for it in questions], recall_ks)}
    return sft, pretrain, dpo, stats
