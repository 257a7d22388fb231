"""Model-aware selection (selection: loss): per-example losses, the choice at equal tokens, and the stages using it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from slmforge.recipe import SftConfig
from slmforge.train import dapt, selection, sft
from tests.test_train import TINY_TRAIN, make_run, real_model_dir, tiny_model  # noqa: F401 (fixtures)


def test_example_losses_are_the_models_own_loss_on_the_scored_tokens(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(5, 1000, (n,), generator=g).tolist() for n in (12, 7, 30, 3)]
    masks = [[1] * len(seqs[0]), [0, 0, 0, 1, 1, 1, 1], [1] * 30, [1, 1, 1]]
    got = selection.example_losses(model, list(zip(seqs, masks)), batch_tokens=40)  # padded batches of mixed lengths
    for ids, mask, loss in zip(seqs, masks, got):
        labels = torch.tensor([t if m else -100 for t, m in zip(ids, mask)])
        with torch.no_grad():
            want = model(input_ids=torch.tensor([ids]), labels=labels[None]).loss.item()
        assert loss == pytest.approx(want, rel=1e-4)


def test_loss_selection_keeps_the_highest_loss_per_group_until_the_trained_tokens():
    sizes = [10] * 12
    groups = ["a"] * 8 + ["b"] * 4
    losses = {i: float(i) for i in range(12)}  # higher index = less known
    keep, counts = selection.select_by_loss(sizes, groups, tokens=60, pool=4.0, seed=0,
                                            score=lambda idx: [losses[i] for i in idx])
    # the pool is everything (120 tokens < 4 x 60); group a holds 2/3 of it -> 40 tokens, b -> 20 tokens
    assert keep == [4, 5, 6, 7, 10, 11]
    assert counts["kept_tokens"] == 60 and counts["scored"] == 12
    assert counts["mean_loss_kept"] > counts["mean_loss_scored"]
    # the data fits in what is trained on: nothing is scored, everything kept
    keep, counts = selection.select_by_loss(sizes, groups, tokens=500, pool=4.0, seed=0,
                                            score=lambda idx: pytest.fail("scored although nothing is chosen"))
    assert keep == list(range(12)) and counts["scored"] == 0 and "nothing to select" in counts["note"]
    # a small pool scores a seeded random sample of about pool x tokens
    keep, counts = selection.select_by_loss([10] * 100, ["a"] * 100, tokens=20, pool=2.0, seed=3,
                                            score=lambda idx: [losses.get(i, 0.0) for i in idx])
    assert counts["scored"] == 4 and counts["kept_tokens"] == 20


def test_sft_loss_selection_picks_the_answers_the_real_model_does_not_know(real_model_dir):
    rng = random.Random(0)
    known = [{"kind": "qa", "messages": [{"role": "user", "content": f"Say hello to me, friend number {i}."},
                                         {"role": "assistant", "content": "Hello! How can I help you today?"}]}
             for i in range(8)]
    unknown = [{"kind": "qa", "messages": [{"role": "user", "content": f"Say hello to me, friend number {i}."},
                                           {"role": "assistant", "content": " ".join(
                                               "".join(rng.choice("qxzjvkw") for _ in range(5)) for _ in range(5))}]}
               for i in range(8)]
    rows = [r for pair in zip(known, unknown) for r in pair]
    cfg = SftConfig(enabled=True, max_steps=1, batch_size=8, max_length=128, packing=False,
                    selection={"method": "loss", "pool": 4.0})
    kept, counts = sft.select_rows(rows, real_model_dir, cfg, seed=0)
    assert len(kept) == 8 and all(r in unknown for r in kept)
    assert counts["kept"] == 8 and counts["scored"] == 16


def test_dapt_with_loss_selection_trains_on_the_mixtures_domain_tokens_and_records_the_choice(tmp_path, tiny_model):
    train = {**TINY_TRAIN, "max_steps": 2, "batch_size": 1}
    recipe, run = make_run(tmp_path, tiny_model, dapt={"enabled": True, **train, "domain_ratio": 1.0,
                                                       "selection": {"method": "loss", "pool": 2.0}})
    outcome = run.execute(dapt.DaptStage(), recipe)
    counts = outcome.manifest["counts"]
    chosen = counts["selection"]
    assert chosen["method"] == "loss" and chosen["scored"] < 28  # 24 chunks + 4 generated, a pool of ~2 x 128 tokens
    assert 128 <= chosen["kept_tokens"] < 128 + 64  # 2 blocks of 64 tokens, the last text may overrun
    assert counts["steps"] == 2
    # random (the default) leaves no selection record, and the stage reruns when the method changes
    recipe2, _ = make_run(tmp_path, tiny_model, dapt={"enabled": True, **train, "domain_ratio": 1.0})
    again = run.execute(dapt.DaptStage(), recipe2)
    assert not again.skipped and "selection" not in again.manifest["counts"]
