"""Model-aware data selection: when a stage can train on only part of its data, train on what the model does not know.

The budget lets DAPT see a few percent of a manual and SFT a share of its generated rows. `random` (the default)
takes a seeded random share. `loss` scores a seeded random pool of candidates (`pool` times the tokens the stage trains
on) with the stage's start model, and keeps the candidates it predicts worst (highest mean loss per scored token) until
the stage's training tokens are filled: the student-uncertainty half of LLKD (Li et al. 2024) and the single-checkpoint
form of S2L (Yang et al. 2024), which rank by the loss of a small proxy; here the proxy is the model itself, so nothing
extra is trained. SFT keeps each item kind's share of tokens of the pool, so drills and open answers stay balanced as
`max_per_kind` made them. Both arms train on the same number of tokens (the stage's steps x tokens per step).

The per-example loss is a plain padded forward pass: TRL and datasets have no "loss of every example" helper, and the
lm-eval engine slmforge scores benchmarks with adds a request per continuation, not per example.
"""

from __future__ import annotations

import random


def forward_batches(model, examples: list[tuple[list[int], list[int]]], *, batch_tokens: int = 4096, bf16: bool = False,
                    description: str | None = None):
    """Yields (indexes, log-probs, targets, rows) per padded batch of (input_ids, mask) examples, longest first, for
    the scored positions only (those predicting a token whose mask is 1), in row-major order: log-probs (n, vocab) fp32
    of the next token, targets (n,) the tokens they predict, rows (n,) the batch row of each. Only those positions go
    through the LM head (transformers' boolean `logits_to_keep`), as SFT's scored-positions loss does: the 49k-word head
    over every prompt and passage token costs more than the model body. One progress bar when `description` is given."""
    import torch
    import torch.nn.functional as F

    from slmforge.console import track

    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    batches, i = [], 0
    while i < len(order):
        batches.append(order[i: i + max(1, batch_tokens // max(2, len(examples[order[i]][0])))])
        i += len(batches[-1])
    model.eval()
    for batch in (track(batches, description) if description else batches):
        width = max(2, max(len(examples[j][0]) for j in batch))
        ids = torch.zeros((len(batch), width), dtype=torch.long, device=device)
        attn = torch.zeros_like(ids)
        scored = torch.zeros_like(ids, dtype=torch.bool)
        for row, j in enumerate(batch):
            tokens, mask = examples[j]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            attn[row, : len(tokens)] = 1
            scored[row, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
        # position p predicts token p + 1; the first token is never scored
        keep = scored[:, 1:] & attn[:, 1:].bool()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids, attention_mask=attn, logits_to_keep=F.pad(keep, (0, 1))).logits
        rows = torch.arange(len(batch), device=device)[:, None].expand_as(keep)[keep]
        yield batch, logits.float().log_softmax(-1), ids[:, 1:][keep], rows


def example_losses(model, examples: list[tuple[list[int], list[int]]], *, batch_tokens: int = 4096,
                   bf16: bool = False, description: str | None = None) -> list[float]:
    """Mean next-token loss over the scored positions of each (input_ids, mask) example (mask 1 = scored token)."""
    out = [float("nan")] * len(examples)
    for batch, logp, targets, rows in forward_batches(model, examples, batch_tokens=batch_tokens, bf16=bf16,
                                                      description=description):
        nll = -logp.gather(-1, targets[:, None]).squeeze(-1)
        for row, j in enumerate(batch):
            mine = rows == row
            n = int(mine.sum())
            out[j] = float(nll[mine].sum() / n) if n else float("nan")
    return out


def _fill(order, sizes: list[int], tokens: float) -> list[int]:
    """The candidates taken in `order` until they hold `tokens` tokens (the last one may overrun); in index order."""
    out, total = [], 0
    for i in order:
        if total >= tokens:
            break
        out.append(i)
        total += sizes[i]
    return sorted(out)


def candidate_pool(sizes: list[int], tokens: int, pool: float, seed: int) -> list[int]:
    """Indexes of a seeded random sample of the candidates holding about `pool` x `tokens` tokens (all when fewer)."""
    order = list(range(len(sizes)))
    random.Random(seed).shuffle(order)
    return _fill(order, sizes, pool * tokens)


def top_until(scores: dict[int, float], sizes: list[int], tokens: float) -> list[int]:
    """The highest-scored candidates (ties and NaN last, by index) until they hold `tokens` tokens; in index order."""
    return _fill(sorted(scores, key=lambda i: (-(scores[i] if scores[i] == scores[i] else float("-inf")), i)), sizes, tokens)


def select_by_loss(sizes: list[int], groups: list[str], tokens: int, pool: float, seed: int, score) -> tuple[list[int], dict]:
    """Indexes kept: from a random pool (`candidate_pool`), per group the highest `score(indexes) -> losses` until the
    group's token share of the pool of `tokens`. Returns (indexes, counts for the manifest)."""
    cand = candidate_pool(sizes, tokens, pool, seed)
    pool_tokens = sum(sizes[i] for i in cand)
    if pool_tokens <= tokens:  # the pool stops past pool x tokens, so this is all the data: nothing to choose
        return cand, {"method": "loss", "candidates": len(sizes), "scored": 0, "kept": len(cand),
                      "note": f"all the data ({pool_tokens} tokens) fits in the {tokens} trained on: nothing to select"}
    losses = score(cand)
    scores = dict(zip(cand, losses))
    kept: list[int] = []
    by_group: dict[str, list[int]] = {}
    for i in cand:
        by_group.setdefault(groups[i], []).append(i)
    for members in by_group.values():
        share = sum(sizes[i] for i in members) / pool_tokens
        kept += top_until({i: scores[i] for i in members}, sizes, share * tokens)
    finite = [x for x in losses if x == x]
    kept_scores = [scores[i] for i in kept if scores[i] == scores[i]]
    mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    return sorted(kept), {"method": "loss", "candidates": len(sizes), "scored": len(cand), "scored_tokens": pool_tokens,
                          "kept": len(kept), "kept_tokens": sum(sizes[i] for i in kept),
                          "mean_loss_scored": mean(finite), "mean_loss_kept": mean(kept_scores)}


def load_scorer(model_path: str, cfg):
    """(the stage's start model for forward passes, whether to autocast bf16 as its training does)."""
    import torch
    from transformers import AutoModelForCausalLM

    from slmforge.train.arguments import trainer_kwargs

    bf16 = bool(trainer_kwargs(cfg, output_dir=".", seed=0).get("bf16"))
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return (model.cuda() if torch.cuda.is_available() else model), bf16


def score_with(model_path: str, examples: list[tuple[list[int], list[int]]], cfg, label: str) -> list[float]:
    """`example_losses` of the stage's start model, in the stage's training precision."""
    model, bf16 = load_scorer(model_path, cfg)
    return example_losses(model, examples, bf16=bf16, description=f"{label}: scoring candidates (selection: loss)")
