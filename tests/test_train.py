"""Training stages (DAPT -> SFT -> DPO) on a tiny random-init Llama with the real tokenizer; one test uses the real model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from slmforge.recipe import build_recipe
from slmforge.run import RunDir, atomic_write_jsonl, sha256_file
from slmforge import artifacts as art
from slmforge.train import arguments, attention, checkpoints, dapt, loading, mixture, sft

ROOT = Path(__file__).resolve().parents[1]
DOMAIN = [f"PostgreSQL table {i}: CREATE INDEX builds a btree index on the column; VACUUM reclaims storage of dead tuples."
          for i in range(24)]
GENERAL = [f"Bananas and apples grow in the orchard number {i}; the farmer sells fruit at the market every morning."
           for i in range(12)]
SFT_ROWS = [{"messages": [{"role": "user", "content": f"What does VACUUM do? ({i})"},
                          {"role": "assistant", "content": f"VACUUM reclaims storage occupied by dead tuples {i}."}]}
            for i in range(16)]
DPO_ROWS = [{"prompt": [{"role": "user", "content": f"What does CREATE INDEX build? ({i})"}],
             "chosen": [{"role": "assistant", "content": "A btree index by default."}],
             "rejected": [{"role": "assistant", "content": "A new table with no rows."}]} for i in range(16)]


@pytest.fixture(scope="session")
def real_model_dir() -> str:
    from slmforge.models import resolve_model

    return resolve_model("default")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, real_model_dir) -> str:
    """A randomly initialised 2-layer Llama with the real SmolLM2 tokenizer and chat template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny") / "model"
    tok = AutoTokenizer.from_pretrained(real_model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def make_run(tmp: Path, model: str, *, generate: bool = True, general_file: Path | None = None, **sections) -> tuple:
    """A run directory with finished curate (and generate) stages, and a recipe training `model`."""
    docs = tmp / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    data = {"name": "t", "documents": str(docs), "run_dir": str(tmp / "runs"), "base_model": model, **sections}
    if general_file is not None:
        data.setdefault("dapt", {})["general_dataset"] = str(general_file)
    recipe = build_recipe(data)
    run = RunDir(recipe.run_path)
    run.adopt(art.CURATE, {art.TRAIN_CHUNKS: [_chunk(i, t) for i, t in enumerate(DOMAIN)],
                           art.HELDOUT_CHUNKS: [_chunk(99, "HELDOUT never train on this")]})
    if generate:
        run.adopt(art.GENERATE, {art.PRETRAIN_ROWS: [{"text": t.replace("table", "rephrased table"), "chunk_id": "c",
                                                      "teacher": "x", "kind": "rephrase"} for t in DOMAIN[:4]],
                                 art.SFT_ROWS: SFT_ROWS, art.DPO_ROWS: DPO_ROWS})
    return recipe, run


def _chunk(i: int, text: str) -> dict:
    return {"id": f"d{i}-0000", "doc_id": f"d{i}", "index": 0, "source": f"d{i}.txt", "title": "t", "headings": [],
            "text": text, "n_tokens": len(text.split())}


TINY_TRAIN = {"max_steps": 4, "batch_size": 2, "max_length": 64, "save_steps": 2, "report_to": ["tensorboard"]}


def generate_text(folder: Path, prompt: str = "What does VACUUM do?", tokens: int = 5) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    out = model.generate(**ids, max_new_tokens=tokens, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    return tok.decode(out[0, ids["input_ids"].shape[1]:])


# ---------------------------------------------------------------------------------------------- mixture
def test_mix_meets_the_token_ratio_with_unequal_blocks_and_upsamples_at_the_end():
    domain = [{"input_ids": [1] * 64, "seq_lengths": [64]}] * 5
    general = [{"input_ids": [2] * 20, "seq_lengths": [20]}] * 3  # small replay blocks: a block count would mislead
    blocks, counts = mixture.mix(domain, general, mixture.plan(200, 0.75, upsample_last=0.2, upsample_ratio=1.0), seed=0)
    main, tail = blocks[:160], blocks[160:]
    for stretch in (main[:40], main[40:80], main[80:]):  # met over every stretch, not only on average
        dom = sum(len(b["input_ids"]) for b in stretch if b["source"] == "domain")
        assert abs(dom / sum(len(b["input_ids"]) for b in stretch) - 0.75) < 0.03
    assert all(b["source"] == "domain" for b in tail)
    assert counts["domain_blocks"] + counts["general_blocks"] == 200 and counts["general_blocks"] > 40


def test_mixture_ratio_is_realised_in_the_trainers_batches(tmp_path, tiny_model):
    """Count domain vs general tokens in the batches the DAPT Trainer actually feeds the model."""
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = build_recipe({"name": "t", "documents": str(tmp_path), "dapt": {**TINY_TRAIN, "max_steps": 20,
                        "domain_ratio": 0.75, "upsample_last": 0.2, "upsample_ratio": 1.0}}).dapt
    n = cfg.max_steps * cfg.batch_size
    blocks, counts = mixture.mix(mixture.pack(DOMAIN, tok, 64), mixture.pack(GENERAL, tok, 64),
                                 mixture.plan(n, cfg.domain_ratio, cfg.upsample_last, cfg.upsample_ratio), seed=0)
    atomic_write_jsonl(tmp_path / "blocks.jsonl", blocks)
    model, tok = loading.load_model_and_tokenizer(tiny_model, cfg)
    trainer = dapt.make_trainer(model, tok, load_dataset("json", data_files=str(tmp_path / "blocks.jsonl"), split="train"),
                                arguments.trainer_kwargs(cfg, tmp_path / "ckpt", 0), cfg)
    per_batch = []  # (domain tokens, general tokens) in each batch, classified per packed document
    for batch in trainer.get_train_dataloader():
        ids, pos = batch["input_ids"][0], batch["position_ids"][0]
        assert "attention_mask" not in batch  # padding-free: one flat sequence, positions restart per document
        starts = (pos == 0).nonzero().flatten().tolist() + [len(ids)]
        tokens = {"domain": 0, "general": 0}
        for a, b in zip(starts, starts[1:]):
            text = tok.decode(ids[a:b])
            kind = "general" if "orchard" in text or "market" in text else "domain"
            assert kind == "general" or "VACUUM" in text or "index" in text or "PostgreSQL" in text, text
            tokens[kind] += b - a
        per_batch.append((tokens["domain"], tokens["general"]))
    assert len(per_batch) == cfg.max_steps
    before, after = per_batch[:16], per_batch[16:]
    domain, general = sum(d for d, _ in before), sum(g for _, g in before)
    assert 0.7 <= domain / (domain + general) <= 0.8, per_batch  # 75% domain before the upsampling phase
    assert all(g == 0 and d > 0 for d, g in after), "the final 20% of steps must be all domain (upsampling)"
    assert counts["domain_blocks"] + counts["general_blocks"] == 40
    assert counts["domain_share_tokens"] == pytest.approx((domain + sum(d for d, _ in after)) / sum(map(sum, per_batch)), abs=1e-3)


def test_self_synthesized_replay_is_cached(tmp_path, tiny_model, monkeypatch):
    texts = mixture.synthesize_replay(tiny_model, "k", tmp_path, samples=3, max_new_tokens=6, temperature=0.8, seed=0,
                                      batch_size=2)
    assert 1 <= len(texts) <= 3 and all("<|im_start|>assistant" in t for t in texts)
    monkeypatch.setattr(mixture, "_generate", lambda *a, **k: pytest.fail("replay regenerated despite the cache"))
    assert mixture.synthesize_replay(tiny_model, "k", tmp_path, samples=3, max_new_tokens=6, temperature=0.8, seed=0,
                                     batch_size=2) == texts


def test_packed_documents_do_not_attend_to_each_other(tmp_path, tiny_model):
    """In the model as the DAPT Trainer holds it, a document packed after another gives the logits it gives alone."""
    from datasets import Dataset

    cfg = build_recipe({"name": "t", "documents": str(tmp_path), "dapt": TINY_TRAIN}).dapt
    model, tok = loading.load_model_and_tokenizer(tiny_model, cfg)
    trainer = dapt.make_trainer(model, tok, Dataset.from_list([{"input_ids": [1, 2], "seq_lengths": [2]}]),
                                arguments.trainer_kwargs(cfg, tmp_path, 0), cfg)
    model = trainer.model.train()
    a, b = torch.randint(10, 1000, (1, 7)), torch.randint(10, 1000, (1, 5))
    packed = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0)
    with torch.no_grad():
        together = model(input_ids=packed, position_ids=pos).logits[0, 7:]
        alone = model(input_ids=b).logits[0]
        leaky = model(input_ids=packed, position_ids=pos, use_cache=True).logits[0, 7:]  # a cache disables the check
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)
    assert (leaky - alone).abs().max() > 1e-3  # the comparison can fail: attention across documents shows up


# ---------------------------------------------------------------------------------------------- SFT
def test_sft_loss_only_on_assistant_tokens(tmp_path, tiny_model):
    from datasets import Dataset

    cfg = build_recipe({"name": "t", "documents": str(tmp_path), "sft": {**TINY_TRAIN, "max_length": 128}}).sft
    cfgd = cfg
    model, tok = loading.load_model_and_tokenizer(tiny_model, cfgd)
    trainer = sft.make_trainer(model, tok, Dataset.from_list(SFT_ROWS[:4]), arguments.trainer_kwargs(cfgd, tmp_path, 0), cfgd)
    batch = next(iter(trainer.get_train_dataloader()))
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    trained = tok.decode(ids[labels != -100])
    ignored = tok.decode(ids[labels == -100])
    assert trained.count("<|im_end|>") == 4 and trained.count("VACUUM reclaims storage") == 4  # replies + end of turn
    assert "What does VACUUM do" not in trained and "SmolLM" not in trained and "user" not in trained
    assert ignored.count("What does VACUUM do") == 4
    assert int((batch["position_ids"][0] == 0).sum()) == 4  # packed: 4 conversations, positions restart
    # the template used for masking renders exactly like the base template
    plain = tok.apply_chat_template(SFT_ROWS[0]["messages"], tokenize=False, chat_template=open(Path(tiny_model) / "chat_template.jinja").read())
    assert tok.apply_chat_template(SFT_ROWS[0]["messages"], tokenize=False) == plain


def test_cpu_per_document_attention_equals_the_block_diagonal_mask(tiny_model):
    """Packed padding-free rows: SDPA per document (CPU path) = transformers' SDPA with its block-diagonal mask."""
    from transformers import AutoModelForCausalLM

    lengths = [7, 12, 3, 9]
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    ids = torch.randint(10, 1000, pos.shape, generator=torch.Generator().manual_seed(0))
    results = []
    for impl in ("sdpa", attention.attn_implementation()):
        model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=impl).train()
        logits = model(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=12,
                       max_length_k=12, use_cache=False).logits
        logits.square().mean().backward()
        results.append((logits.detach(), model.model.layers[0].self_attn.q_proj.weight.grad))
    assert model.config._attn_implementation == "sdpa_varlen"  # this test runs on CPU
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-6, rtol=1e-4)
    alone = model(input_ids=ids[:, 7:19], use_cache=False).logits  # and a document alone gives the same logits
    torch.testing.assert_close(results[1][0][:, 7:19], alone.detach(), atol=1e-5, rtol=1e-4)


def test_sft_scored_positions_loss_equals_trls_loss(tmp_path, tiny_model):
    """The CPU loss (LM head at scored positions only) gives TRL SFTTrainer's loss and gradients on the same batch."""
    from datasets import Dataset
    from trl import SFTTrainer

    cfg = build_recipe({"name": "t", "documents": str(tmp_path), "sft": {**TINY_TRAIN, "max_length": 128}}).sft
    cfgd = cfg
    out = []
    for trl_loss in (True, False):
        model, tok = loading.load_model_and_tokenizer(tiny_model, cfgd)
        trainer = sft.make_trainer(model, tok, Dataset.from_list(SFT_ROWS[:6]), arguments.trainer_kwargs(cfgd, tmp_path, 0), cfgd)
        assert type(trainer).__name__ == "ScoredPositionsSFTTrainer"  # CPU
        if trl_loss:
            trainer.__class__ = SFTTrainer
        model.train()
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        loss = trainer.compute_loss(model, batch, num_items_in_batch=None)  # fp32: the unprepared model has no autocast
        loss.backward()
        out.append((loss.detach(), model.model.embed_tokens.weight.grad, model.model.layers[1].mlp.up_proj.weight.grad,
                    trainer._metrics["train"]["mean_token_accuracy"][-1]))
    (trl_loss, *trl_grads, trl_acc), (loss, *grads, acc) = out
    torch.testing.assert_close(loss, trl_loss, atol=1e-5, rtol=1e-5)
    for g, trl_g in zip(grads, trl_grads):
        assert (g - trl_g).norm() <= 1e-4 * trl_g.norm()
    assert acc == pytest.approx(trl_acc, abs=1e-6)


def test_sft_without_generate_output_names_the_missing_artifact(tmp_path, tiny_model):
    recipe, run = make_run(tmp_path, tiny_model, generate=False, sft={"enabled": True})
    with pytest.raises(FileNotFoundError, match=r"generate/sft.jsonl is missing"):
        run.execute(sft.SftStage(), recipe)


def test_dpo_kinds_train_only_those_pairs_and_name_the_kinds_the_file_holds(tmp_path, tiny_model):
    from slmforge.train.dpo import DpoStage

    recipe, run = make_run(tmp_path, tiny_model, dpo={"enabled": True, **TINY_TRAIN, "max_length": 128, "kinds": ["matching"],
                                                          "loss_type": ["sigmoid", "sft"]})
    atomic_write_jsonl(run.path(art.DPO_ROWS), [{**r, "kind": "preference"} for r in DPO_ROWS])
    with pytest.raises(ValueError, match=r"generate/dpo.jsonl: no pairs of dpo.kinds \['matching'\].*\['preference'\]"):
        run.execute(DpoStage(), recipe)
    rows = [{**r, "kind": "matching" if i % 2 else "preference"} for i, r in enumerate(DPO_ROWS * 4)]
    atomic_write_jsonl(run.path(art.DPO_ROWS), rows)
    counts = run.execute(DpoStage(), recipe).manifest["counts"]
    assert counts["pairs"] == len(rows) // 2 and counts["steps"] == TINY_TRAIN["max_steps"]


def test_dpo_batches_pairs_of_similar_length(tiny_model):
    """Short closed-book pairs and long open-book ones are batched apart: a mixed batch pads every pair to the longest."""
    from datasets import Dataset

    from slmforge.models import load_causal_lm, load_tokenizer
    from slmforge.recipe import DpoConfig
    from slmforge.train.dpo import make_trainer

    long = "Passages: [1] VACUUM reclaims storage occupied by dead tuples. " * 12
    pairs = [{**r, "prompt": [{"role": "user", "content": (long if i % 2 else "") + r["prompt"][0]["content"]}]}
             for i, r in enumerate(DPO_ROWS)]
    cfg = DpoConfig(enabled=True, batch_size=4, max_length=512, max_steps=4)
    kwargs = {"output_dir": "unused", "per_device_train_batch_size": 4, "max_steps": 4, "report_to": [], "use_cpu": True}
    trainer = make_trainer(load_causal_lm(tiny_model), load_tokenizer(tiny_model), Dataset.from_list(pairs), kwargs, cfg)
    order = list(trainer._get_train_sampler())
    assert sorted(order) == list(range(len(pairs)))  # every pair once an epoch
    for start in range(0, len(order), 4):  # each batch of 4: all long or all short
        assert len({i % 2 for i in order[start:start + 4]}) == 1, order


# ---------------------------------------------------------------------------------------------- stages end to end
def test_dapt_sft_dpo_chain_produces_loadable_models(tmp_path, tiny_model):
    general = tmp_path / "general.jsonl"
    atomic_write_jsonl(general, [{"text": t} for t in GENERAL])
    recipe, run = make_run(tmp_path, tiny_model, general_file=general,
                           dapt={"enabled": True, **TINY_TRAIN, "domain_ratio": 0.5},
                           sft={"enabled": True, **TINY_TRAIN, "method": "lora", "max_length": 128},
                           dpo={"enabled": True, **TINY_TRAIN, "max_length": 128})
    from slmforge.train.dpo import DpoStage

    before = {k: v.clone() for k, v in _weights(Path(tiny_model)).items()}
    for stage in (dapt.DaptStage(), sft.SftStage(), DpoStage()):
        outcome = run.execute(stage, recipe)
        counts = outcome.manifest["counts"]
        assert counts["steps"] == 4 and counts["tokens_seen"] > 0 and counts["final_loss"] is not None
        folder = run.stage_dir(stage.name)
        history = json.loads((folder / "log_history.json").read_text())
        assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]
        assert list((folder / "tensorboard").rglob("events.out.tfevents*"))
        assert (folder / "model" / "chat_template.jinja").read_text() == (Path(tiny_model) / "chat_template.jinja").read_text()
        generate_text(folder / "model")
    assert run.manifest("dapt")["counts"]["synthetic_texts"] == 4
    assert run.manifest("sft")["counts"]["start_model"] == str(run.stage_dir("dapt") / "model")
    assert run.manifest("dpo")["counts"]["start_model"] == str(run.stage_dir("sft") / "model")
    assert (run.stage_dir("sft") / "adapter" / "adapter_config.json").is_file()
    assert not (run.stage_dir("sft") / "model" / "adapter_config.json").exists()  # merged, plain model folder
    after = _weights(run.stage_dir("dapt") / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert set(run.trained_models()) == {"dapt", "sft", "dpo"}
    assert run.execute(dapt.DaptStage(), recipe).skipped  # unchanged -> skipped


def test_a_training_stage_stops_at_the_builds_deadline_and_says_so(tmp_path, tiny_model, monkeypatch):
    """In a budgeted build the running stage has a deadline (slmforge.budget.build.Build.deadline): a step that would
    end past it is not started, the model of the steps done is saved, and the manifest and console say so."""
    import time

    from slmforge import console

    general = tmp_path / "general.jsonl"
    atomic_write_jsonl(general, [{"text": t} for t in GENERAL])
    recipe, run = make_run(tmp_path, tiny_model, general_file=general,
                           dapt={"enabled": True, **TINY_TRAIN, "max_steps": 6, "domain_ratio": 0.5})
    clock = console.BuildClock({"dapt": 10.0}, budget_s=60)
    clock.begin("dapt")
    clock.deadline = time.time()  # already due: the first step runs (its pace is unknown before it), no second
    monkeypatch.setattr(console, "build_clock", clock)
    printed = []
    monkeypatch.setattr(console.console, "print", lambda *a, **k: printed.append(" ".join(map(str, a))))
    counts = run.execute(dapt.DaptStage(), recipe).manifest["counts"]
    assert counts["steps"] == 1 and counts["planned_steps"] == 6 and counts["stopped_at_deadline"]
    generate_text(run.stage_dir("dapt") / "model")
    assert any("dapt stopped at step 1 of 6" in line for line in printed)

    clock.deadline = time.time() + 3600  # far: every planned step
    counts = run.execute(dapt.DaptStage(), recipe, force=True).manifest["counts"]
    assert counts["steps"] == 6 and not counts["stopped_at_deadline"]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


# ---------------------------------------------------------------------------------------------- resume, DDP
def _write_recipe(tmp_path: Path, recipe) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    return path


def test_resume_skips_a_checkpoint_the_kill_left_half_written(tmp_path):
    # A kill while the Trainer saves leaves checkpoint-N without (or with a truncated) trainer_state.json.
    for step, state in [(3, '{"global_step": 3}'), (6, None), (9, '{"global_st')]:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x")
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    assert checkpoints.last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]  # the rerun saves steps 6 and 9 again
    assert checkpoints.last_checkpoint(tmp_path / "absent") is None


def test_resume_after_kill9_continues_from_checkpoint(tmp_path, tiny_model):
    general = tmp_path / "general.jsonl"
    atomic_write_jsonl(general, [{"text": t} for t in GENERAL])
    recipe, run = make_run(tmp_path, tiny_model, general_file=general,
                           dapt={"enabled": True, **TINY_TRAIN, "max_steps": 30, "save_steps": 3, "report_to": []})
    path = _write_recipe(tmp_path, recipe)
    env = {**os.environ, "SLMFORGE_QUIET": "1"}
    cmd = [sys.executable, "-m", "slmforge.cli", "train", str(path)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if any((c / "trainer_state.json").is_file() for c in (run.root / ".work").glob("dapt-*/scratch/checkpoints/checkpoint-*")):
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert run.manifest("dapt") is None
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = run.manifest("dapt")["counts"]
    assert counts["resumed_from_step"] >= 3 and counts["resumed_from_step"] % 3 == 0
    assert counts["steps"] == 30


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_ddp_two_processes_match_one_process(tmp_path, tiny_model, precision):
    """`accelerate launch` with 2 CPU processes (gloo) gives the same model as 1 process on the same global batch.

    Tolerances: fp32 -> weights within 1e-4 (measured ~1e-7); auto (bf16 autocast on AMX CPUs) -> bf16 rounding of
    differently ordered sums, weights within 1e-3 and 20% of the update itself (measured ~4e-4 of ~3e-3).
    """
    general = tmp_path / "general.jsonl"
    atomic_write_jsonl(general, [{"text": t} for t in GENERAL])
    results, before = {}, _weights(Path(tiny_model))
    for procs in (1, 2):
        recipe, run = make_run(tmp_path / f"p{procs}", tiny_model, general_file=general,
                               dapt={"enabled": True, **TINY_TRAIN, "max_steps": 3, "batch_size": 4 // procs,
                                     "processes": procs, "report_to": [], "learning_rate": 1e-3, "precision": precision})
        outcome = run.execute(dapt.DaptStage(), recipe)
        assert outcome.manifest["counts"]["processes"] == procs
        assert outcome.manifest["counts"]["distributed"] == ("ddp" if procs == 2 else "none")
        results[procs] = (_weights(run.stage_dir("dapt") / "model"), json.loads((run.stage_dir("dapt") / "log_history.json").read_text()))
    one, two = results[1], results[2]
    losses1 = [h["loss"] for h in one[1] if "loss" in h]
    losses2 = [h["loss"] for h in two[1] if "loss" in h]
    assert len(losses1) == len(losses2) == 3
    # tolerance: fp32 reductions run in a different order across 2 processes; measured differences are ~1e-6
    loss_diff = max(abs(a - b) for a, b in zip(losses1, losses2))
    weight_diff = max((one[0][k] - two[0][k]).abs().max().item() for k in one[0])
    print(f"DDP 2 vs 1 process: max loss diff {loss_diff:.2e}, max weight diff {weight_diff:.2e}")
    update = max((one[0][k] - before[k]).abs().max().item() for k in before)
    exact = precision == "fp32" or not arguments.cpu_fast_bf16()
    assert loss_diff < 1e-3 and weight_diff < (1e-4 if exact else 1e-3)
    assert weight_diff < (0.01 if exact else 0.2) * update  # well below the training update itself


# ---------------------------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_real_default_model_from_gguf_trains_and_generates(tmp_path, monkeypatch):
    """Convert the packaged GGUF afresh, train the real SmolLM2-135M-Instruct a few DAPT steps, load and generate."""
    from slmforge.models import default_gguf, resolve_model

    monkeypatch.setenv("SLMFORGE_CACHE", str(tmp_path / "cache"))
    folder = Path(resolve_model("default"))
    assert folder.is_relative_to(tmp_path) and (folder / "model.safetensors").is_file()
    assert sha256_file(default_gguf())[:16] == folder.name
    recipe, run = make_run(tmp_path, "default", dapt={"enabled": True, "max_steps": 2, "batch_size": 1, "max_length": 64,
                                                      "domain_ratio": 1.0, "report_to": [], "save_steps": 10})
    outcome = run.execute(dapt.DaptStage(), recipe)
    counts = outcome.manifest["counts"]
    assert counts["steps"] == 2 and 2 < counts["first_loss"] < 12
    before, after = _weights(folder), _weights(run.stage_dir("dapt") / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert generate_text(run.stage_dir("dapt") / "model", tokens=4).strip()


def test_world_size_is_the_accelerate_configs_num_processes(tmp_path):
    """The data is sized to the processes that will train: `accelerate launch --config_file` takes num_processes from the
    file whatever `processes` says; a contradicting `processes` is an error naming both."""
    from slmforge.recipe import DaptConfig

    config = tmp_path / "acc.yaml"
    config.write_text(yaml.safe_dump({"compute_environment": "LOCAL_MACHINE", "distributed_type": "FSDP", "num_processes": 8,
                                      "num_machines": 2, "mixed_precision": "no", "use_cpu": False}))
    assert arguments.world_size(DaptConfig(processes=3)) == 3
    assert arguments.world_size(DaptConfig(accelerate_config=config)) == 8
    assert arguments.world_size(DaptConfig(processes=8, accelerate_config=config)) == 8
    with pytest.raises(ValueError, match=r"processes: 2 but .*acc.yaml has num_processes: 8"):
        arguments.world_size(DaptConfig(processes=2, accelerate_config=config))


def test_fsdp2_config_on_cpu_shards_matches_one_process_resumes_and_exports_full_weights(tmp_path, tiny_model, monkeypatch, capfd):
    """The shipped examples/accelerate/fsdp-8gpu.yaml, resized to 2 CPU processes, runs FSDP2 over gloo (torch's
    fully_shard; accelerate's own FSDP2 path, which slmforge enables on CPU: job.enable_fsdp2_on_cpu). Each rank holds
    half of the parameters and writes its own shard of every checkpoint; the stage sizes its data to the config's 2
    processes (not `processes: 1`), trains with 1 process's loss curve on the same global batch, exports the gathered
    full weights, and a run resumed from its sharded step-2 checkpoint ends with the uninterrupted run's weights.

    Tolerances as the fp32 DDP test: fp32 sums over 2 processes in another order, losses within 1e-4 and weights within
    1e-4 and 1% of the training update. With the data sized to `processes` (1) instead, half the blocks were written,
    the second epoch reshuffled them from step 3, and the losses were 2e-2 apart at step 4."""
    from slmforge.train import job as train_job

    general = tmp_path / "general.jsonl"
    atomic_write_jsonl(general, [{"text": t} for t in GENERAL])
    config = yaml.safe_load((ROOT / "examples" / "accelerate" / "fsdp-8gpu.yaml").read_text())
    config.update(num_processes=2, mixed_precision="no", use_cpu=True, main_process_port=train_job._free_port())
    config.pop("gpu_ids")
    fsdp_yaml = tmp_path / "fsdp-2cpu.yaml"
    fsdp_yaml.write_text(yaml.safe_dump(config))

    kept = {}
    real_train = train_job.train

    def train_and_keep_checkpoints(kind, *, model, data, ctx, cfg):  # the stage removes its scratch when it publishes
        result = real_train(kind, model=model, data=data, ctx=ctx, cfg=cfg)
        kept[cfg.accelerate_config is not None] = folder = shutil.copytree(ctx.scratch / "checkpoints", tmp_path / f"kept-{len(kept)}")
        shutil.copy(data, folder / "data.jsonl")
        return result

    monkeypatch.setattr("slmforge.train.stage.train", train_and_keep_checkpoints)
    results, before = {}, _weights(Path(tiny_model))
    for name, extra in (("one", {"batch_size": 4}), ("fsdp", {"batch_size": 2, "accelerate_config": str(fsdp_yaml)})):
        recipe, run = make_run(tmp_path / name, tiny_model, general_file=general,
                               dapt={"enabled": True, **TINY_TRAIN, "max_steps": 4, "save_steps": 2, "report_to": [],
                                     "learning_rate": 1e-3, "precision": "fp32", **extra})
        outcome = run.execute(dapt.DaptStage(), recipe)
        results[name] = (_weights(run.stage_dir("dapt") / "model"), json.loads((run.stage_dir("dapt") / "log_history.json").read_text()),
                         outcome.manifest["counts"])
    (w1, log1, c1), (w2, log2, c2) = results["one"], results["fsdp"]
    assert (c1["processes"], c1["distributed"], c1["rank0_parameter_share"]) == (1, "none", 1.0)
    assert (c2["processes"], c2["distributed"]) == (2, "fsdp2") and 0.45 < c2["rank0_parameter_share"] < 0.55, c2
    assert "butacceleraterunsDDP" not in "".join(capfd.readouterr().err.split())  # no "not sharded" warning
    assert sum(1 for _ in open(kept[True] / "data.jsonl")) == sum(1 for _ in open(kept[False] / "data.jsonl")) == 16  # 4 x 4
    losses1, losses2 = [h["loss"] for h in log1 if "loss" in h], [h["loss"] for h in log2 if "loss" in h]
    assert len(losses1) == len(losses2) == 4
    loss_diff = max(abs(a - b) for a, b in zip(losses1, losses2))
    assert sorted(w2) == sorted(w1) and all(w2[k].shape == w1[k].shape for k in w1)  # the full weights
    weight_diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    update = max((w1[k] - before[k]).abs().max().item() for k in before)
    print(f"FSDP2 on CPU, 2 vs 1 process: max loss diff {loss_diff:.2e}, max weight diff {weight_diff:.2e} "
          f"(update {update:.2e}); losses {losses1} vs {losses2}")
    assert update > 1e-4  # it trained
    assert loss_diff < 1e-4 and weight_diff < 1e-4 and weight_diff < 0.01 * update

    # resume: as if the run had been killed after its step-2 checkpoint (FSDP2's sharded one: a torch.distributed
    # .checkpoint folder each for the model and the optimizer, one file per rank)
    ckpt = kept[True]
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        shards = sorted(p.name for p in (ckpt / "checkpoint-2" / part).glob("*.distcp"))
        assert len(shards) == 2, (part, sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*")))
    shutil.rmtree(ckpt / "checkpoint-4")
    (ckpt / "result.json").unlink()
    spec = json.loads((ckpt / "job.json").read_text())
    spec.update(output_dir=str(ckpt), out=str(tmp_path / "resumed"), data=str(ckpt / "data.jsonl"))
    (tmp_path / "resumed").mkdir()
    train_job.launch(spec, train_job.SECTIONS["dapt"].model_validate(spec["config"]), ckpt)
    resumed = json.loads((ckpt / "result.json").read_text())
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 4 and resumed["distributed"] == "fsdp2"
    w3 = _weights(tmp_path / "resumed" / "model")
    resume_diff = max((w2[k] - w3[k]).abs().max().item() for k in w2)
    print(f"FSDP2 on CPU, resumed from step 2 vs uninterrupted: max weight diff {resume_diff:.2e}")
    assert resume_diff < 1e-5


def test_sft_kind_caps_replace_the_shared_cap_per_kind():
    rows = [{"kind": k, "i": i} for k in ("cloze", "raft", "qa") for i in range(10)]
    kept = sft.balance_kinds(rows, 3, seed=0, caps={"raft": 0, "qa": 5})
    count = {k: sum(r["kind"] == k for r in kept) for k in ("cloze", "raft", "qa")}
    assert count == {"cloze": 3, "raft": 10, "qa": 5}
    assert kept == [r for r in rows if r in kept]  # file order kept
    assert sft.balance_kinds(rows, 0) == rows and len(sft.balance_kinds(rows, 0, caps={"qa": 2})) == 22
