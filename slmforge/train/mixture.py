"""DAPT data: domain text, general replay, packing into blocks, and the domain/general mixture laid out step by step.

General replay guards against forgetting. By default it is self-synthesized rehearsal: the base model answers a set of
diverse general prompts, and those conversations are replayed (no original pretraining data needed); a user file of
general text can replace it. Each source is packed separately (TRL `pack_dataset`, best-fit decreasing with
overflow split), so a block is all-domain or all-general and the mixture can be counted exactly. Packed sequences
keep their boundaries (`seq_lengths` -> position_ids), so attention never crosses documents.
"""

from __future__ import annotations

import random
from pathlib import Path

from slmforge.console import track
from slmforge.run import cached_unit, hash_obj, read_jsonl

# Diverse everyday requests for self-synthesized rehearsal: the base model's own answers stand in for its training data.
REPLAY_PROMPTS = [
    "Explain how photosynthesis works in simple terms.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main causes of inflation?",
    "Give me three tips for improving my sleep.",
    "Summarize the plot of Romeo and Juliet.",
    "How do vaccines train the immune system?",
    "Write a polite email asking a colleague to review a document.",
    "What is the difference between weather and climate?",
    "Describe the water cycle.",
    "Write a haiku about autumn leaves.",
    "How does a bicycle stay upright when moving?",
    "List some healthy breakfast ideas.",
    "Explain what a black hole is.",
    "What should I consider when adopting a dog?",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "Why is the sky blue?",
    "Give a brief history of the printing press.",
    "Explain the rules of chess for a beginner.",
    "How can I make my presentations more engaging?",
    "What is machine learning, in one paragraph?",
    "Write a limerick about a cat who loves cheese.",
    "What are the benefits of regular exercise?",
    "Describe how a bill becomes a law.",
    "How do I calculate the area of a circle?",
    "What is the capital of Australia, and why was it chosen?",
    "Suggest a plan for a weekend trip to the mountains.",
    "Explain the difference between a virus and a bacterium.",
    "Write a Python function that reverses a string.",
    "What makes a good friend?",
    "How do solar panels produce electricity?",
    "Give me a simple recipe for tomato soup.",
    "What were the main causes of the First World War?",
    "Explain compound interest with an example.",
    "How do bees make honey?",
    "Write a motivational message for someone starting a new job.",
    "What is the theory of evolution?",
    "How does the internet route a message from one computer to another?",
    "Describe the taste of a lemon to someone who has never had one.",
    "What are some ways to reduce plastic waste at home?",
    "Explain what a prime number is and give examples.",
]


def domain_texts(chunks, pretrain=None) -> tuple[list[str], dict]:
    """Curated chunks (never the held-out split) plus generated rephrasings (PretrainRow) when given."""
    texts = [c.text for c in chunks if c.text.strip()]
    counts = {"domain_chunks": len(texts), "synthetic_texts": 0}
    if pretrain is not None:
        extra = [r.text for r in pretrain if r.text.strip()]
        texts += extra
        counts["synthetic_texts"] = len(extra)
    return texts, counts


def user_general_texts(path: Path) -> list[str]:
    """General text from a .jsonl file (field 'text') or a .txt file (blank-line separated paragraphs)."""
    if not path.is_file():
        raise FileNotFoundError(f"dapt.general_dataset: file not found: {path}")
    if path.suffix == ".jsonl":
        rows = read_jsonl(path)
        texts = [r["text"] for r in rows if isinstance(r, dict) and isinstance(r.get("text"), str) and r["text"].strip()]
    else:
        texts = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    if not texts:
        raise ValueError(f"dapt.general_dataset: {path} holds no text (expected .jsonl rows with a 'text' field, or .txt)")
    return texts


def synthesize_replay(model_path: str, model_key: str, cache: Path, *, samples: int, max_new_tokens: int,
                      temperature: float, seed: int, batch_size: int = 8) -> list[str]:
    """Self-synthesized rehearsal: the start model answers diverse prompts; each conversation becomes a replay text.

    One cached unit per batch: a rerun after a kill regenerates only the batches that had not finished.
    """
    prompts = [REPLAY_PROMPTS[i % len(REPLAY_PROMPTS)] for i in range(samples)]
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    loaded: dict = {}
    texts: list[str] = []
    for b, batch in enumerate(track(batches, "replay: sampling the base model")):
        key = hash_obj({"model": model_key, "prompts": batch, "index": b, "max_new_tokens": max_new_tokens,
                        "temperature": temperature, "seed": seed})
        texts += cached_unit(cache, key, lambda: _generate(loaded, model_path, batch, max_new_tokens, temperature, seed + b))
    return texts


def _generate(loaded: dict, model_path: str, prompts: list[str], max_new_tokens: int, temperature: float, seed: int) -> list[str]:
    """One batch of replay conversations, sampled (top_p 0.95) or greedy, seeded once per batch."""
    from slmforge.lm import LMError, Request
    from slmforge.lm.hf import TransformersLM

    if not loaded:
        loaded["lm"] = TransformersLM.load(model_path, name="replay", batch_hint=max(1, len(prompts)))
    lm = loaded["lm"]
    lm.batch_hint = max(lm.batch_hint, len(prompts))  # the whole batch in one generate(), as its cache unit is
    convs = [[{"role": "user", "content": p}] for p in prompts]
    reqs = [Request(messages=c, max_tokens=max_new_tokens, temperature=temperature, top_p=0.95 if temperature > 0 else 1.0,
                    seed=seed, logprobs=False) for c in convs]
    results = lm.generate(reqs)
    failed = [r for r in results if isinstance(r, LMError)]
    if failed:
        raise RuntimeError(f"dapt replay: the model failed to answer: {failed[0].message}")
    return [lm.tok.apply_chat_template(c + [{"role": "assistant", "content": r.text.strip()}], tokenize=False)
            for c, r in zip(convs, results) if r.text.strip()]


def pack(texts: list[str], tok, block: int) -> list[dict]:
    """Tokenize (each text ends with EOS) and pack into blocks of `block` tokens with per-document `seq_lengths`."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    packed = pack_dataset(Dataset.from_dict({"input_ids": ids}), block, strategy="bfd_split")
    return [{"input_ids": r["input_ids"], "seq_lengths": r["seq_lengths"]} for r in packed]


def plan(n_blocks: int, ratio: float, upsample_last: float = 0.0, upsample_ratio: float = 1.0) -> list[float]:
    """Target domain share (of tokens) for each block in training order.

    The last `upsample_last` share of blocks use `upsample_ratio` (domain upsampling at the end of training).
    """
    start_upsample = n_blocks - round(n_blocks * upsample_last)
    return [upsample_ratio if i >= start_upsample else ratio for i in range(n_blocks)]


def mix(domain: list[dict], general: list[dict], targets: list[float], seed: int) -> tuple[list[dict], dict]:
    """Lay the blocks out in training order so the domain share of tokens tracks the target over every stretch.

    Each block is taken from the source whose running token share is furthest below its target (counted per phase,
    so the upsampling phase is met on its own). Pools are cycled, reshuffled on every pass, as often as needed.
    """
    if not general and any(t < 1 for t in targets):
        raise ValueError("dapt: the mixture asks for general replay blocks but there is no general text")
    rng = random.Random(seed)
    pools = {"domain": _cycle(domain, rng), "general": _cycle(general, rng) if general else iter(())}
    blocks, tokens, phase, seen = [], {"domain": 0, "general": 0}, None, {"domain": 0, "general": 0}
    for target in targets:
        if target != phase:
            phase, seen = target, {"domain": 0, "general": 0}
        total = seen["domain"] + seen["general"]
        share = seen["domain"] / total if total else (1.0 if target < 0.5 else 0.0)
        source = "domain" if share < target or target >= 1 else "general"
        block = dict(next(pools[source]), source=source)
        blocks.append(block)
        seen[source] += len(block["input_ids"])
        tokens[source] += len(block["input_ids"])
    n_domain = sum(b["source"] == "domain" for b in blocks)
    return blocks, {
        "domain_blocks": n_domain,
        "general_blocks": len(blocks) - n_domain,
        "domain_tokens": tokens["domain"],
        "general_tokens": tokens["general"],
        "domain_share_tokens": round(tokens["domain"] / max(1, sum(tokens.values())), 4),
        "domain_epochs": round(tokens["domain"] / max(1, sum(len(b["input_ids"]) for b in domain)), 3),
    }


def _cycle(pool: list[dict], rng: random.Random):
    while True:
        order = list(range(len(pool)))
        rng.shuffle(order)
        for i in order:
            yield pool[i]

