"""Items -> the rows TRL and `datasets` take directly: `text` (pretraining), `messages` (SFT), prompt/chosen/rejected (DPO)."""

from __future__ import annotations

from collections import defaultdict

from slmforge.records import Chunk, Item

LETTERS = "ABCDEFGH"
SUMMARY_INSTRUCTION = "Summarize this passage in one or two sentences."  # SFT rows and the chat-format benchmark share it


def mcq_prompt(item: Item) -> str:
    return item.prompt + "\n\n" + "\n".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(item.choices)) + "\n\nAnswer with the letter."


def _qa_lines(item: Item) -> str:
    if item.kind == "mcq":
        return f"Question: {mcq_prompt(item)}\nAnswer: {LETTERS[item.answer_index]}) {item.answer}"
    if item.kind == "cloze":
        return f"Complete: {item.prompt} …\nAnswer: {item.answer}"
    return f"Question: {item.prompt}\nAnswer: {item.answer}"


def _teacher(items: list[Item]) -> str:
    names = sorted({i.origin for i in items} - {"extractive"})
    return "+".join(names) or "extractive"


def pretrain_rows(items: list[Item], chunks: dict[str, Chunk]) -> list[dict]:
    """Reading-comprehension texts (passage, then questions and answers about it), rephrasings and summaries."""
    rows = []
    per_chunk: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        if it.kind in ("qa", "mcq", "cloze"):
            per_chunk[it.chunk_id].append(it)
        elif it.kind == "rephrase":
            rows.append({"text": it.answer, "chunk_id": it.chunk_id, "teacher": it.origin, "kind": "rephrase"})
        elif it.kind == "summary" and it.origin != "extractive":  # extractive summaries repeat the passage's own text
            title = chunks[it.chunk_id].title if it.chunk_id in chunks else ""
            text = f"Summary of “{title}”: {it.answer}" if title else it.answer
            rows.append({"text": text, "chunk_id": it.chunk_id, "teacher": it.origin, "kind": "summary"})
    for chunk_id, group in per_chunk.items():
        chunk = chunks.get(chunk_id)
        if chunk is None:
            continue
        body = "\n\n".join(_qa_lines(i) for i in group)
        text = f"{chunk.text}\n\nQuestions and answers about the passage above:\n\n{body}"
        rows.append({"text": text, "chunk_id": chunk_id, "teacher": _teacher(group), "kind": "reading_comprehension"})
    return rows


def sft_rows(items: list[Item]) -> list[dict]:
    rows = []
    for it in items:
        if it.kind == "qa":
            user, assistant = it.prompt, it.answer
        elif it.kind == "mcq":
            user, assistant = mcq_prompt(it), f"{LETTERS[it.answer_index]}) {it.answer}"
        elif it.kind == "cloze":
            user, assistant = f"Complete the text with the missing term:\n\n{it.prompt} …", it.answer
        elif it.kind == "summary":
            user, assistant = f"{SUMMARY_INSTRUCTION}\n\n{it.prompt}", it.answer
        else:
            continue  # rephrasings are pretraining text; preference pairs go to DPO
        rows.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
                     "chunk_id": it.chunk_id, "teacher": it.origin, "kind": it.kind})
    return rows


def dpo_rows(items: list[Item]) -> list[dict]:
    return [
        {"prompt": [{"role": "user", "content": it.prompt}], "chosen": [{"role": "assistant", "content": it.answer}],
         "rejected": [{"role": "assistant", "content": it.rejected}], "chunk_id": it.chunk_id, "teacher": it.origin,
         "kind": "preference"}
        for it in items if it.kind == "preference"
    ]
