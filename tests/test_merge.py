"""Merge and prune: the choice rule on fixed scores; a mergekit merge of two tiny Llamas loads in transformers and
converts to GGUF; a pruned model keeps the channels that matter, loads, trains a step and converts to GGUF."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slmforge.merge.choice import choose


def test_choice_rule_best_domain_score_within_forgetting():
    cands = [{"name": "dpo (unmerged)", "domain_score": 0.50, "forgetting": 0.04},
             {"name": "linear-0.75", "domain_score": 0.52, "forgetting": 0.02},
             {"name": "slerp-0.75", "domain_score": 0.60, "forgetting": 0.09},  # best score, forgets too much
             {"name": "linear-0.25", "domain_score": 0.40, "forgetting": 0.00},
             {"name": "base", "domain_score": 0.30, "forgetting": 0.0}]
    name, reason = choose(cands, 0.05)
    assert name == "linear-0.75"
    assert "4 candidates" in reason and "1 over the limit" in reason
    assert choose(cands, 0.10)[0] == "slerp-0.75"  # a looser limit admits it
    # a tie on the domain score goes to the one that forgets less; an exact tie to the earlier (the specialist first)
    tie = [{"name": "spec", "domain_score": 0.5, "forgetting": 0.03}, {"name": "m1", "domain_score": 0.5, "forgetting": 0.01},
           {"name": "m2", "domain_score": 0.5, "forgetting": 0.01}]
    assert choose(tie, 0.05)[0] == "m1"
    assert choose([tie[0], {**tie[0], "name": "later"}], 0.05)[0] == "spec"


def _scored(correct: list[int], ppl: float) -> dict:
    rows = [{"id": f"q{i}", "acc": c, "acc_norm": c} for i, c in enumerate(correct)]
    value = sum(correct) / len(correct)
    return {"scores": {"mcq": {"acc": {"value": value}, "acc_norm": {"value": value}},
                       "general_ppl": {"word_perplexity": {"value": ppl}}}, "items": {"mcq": rows}}


def test_a_pruned_row_is_compared_with_the_model_it_was_cut_from():
    from slmforge.merge.stage import candidate_rows, pruned_candidate_row

    n = 40
    scored = {"dpo (unmerged)": _scored([1] * 10 + [0] * 30, 20.0),  # 0.25
              "linear-0.50": _scored([1] * 30 + [0] * 10, 20.5),  # 0.75: the kept merge
              "base": _scored([1] * 8 + [0] * 32, 20.0),
              "pruned(linear-0.50)": _scored([1] * 28 + [0] * 12, 22.0)}  # 0.70: pruning cost 0.05
    assert len(scored["base"]["items"]["mcq"]) == n
    vs_spec = candidate_rows(scored, "dpo (unmerged)", ["mcq"], 0, only=["pruned(linear-0.50)"])[0]
    vs_kept = pruned_candidate_row(scored, "pruned(linear-0.50)", "linear-0.50", ["mcq"], 0, max_forgetting=0.05)
    assert vs_spec["domain_gain"] == pytest.approx(0.45)  # merging and pruning mixed together
    assert vs_kept["domain_gain"] == pytest.approx(-0.05)  # pruning alone
    assert vs_kept["paired"]["mcq"]["diff"] == pytest.approx(-0.05)
    assert vs_kept["forgetting"] == pytest.approx(0.10)  # forgetting stays against the base
    assert vs_kept["compared_with"] == "linear-0.50" and vs_kept["pruned"] and not vs_kept["within_limit"]


def test_choice_rule_when_nothing_is_within_the_limit():
    cands = [{"name": "a", "domain_score": 0.9, "forgetting": 0.20}, {"name": "b", "domain_score": 0.1, "forgetting": 0.08},
             {"name": "c", "domain_score": 0.5, "forgetting": None}]
    name, reason = choose(cands, 0.05)
    assert name == "b" and "no candidate is within" in reason
    with pytest.raises(ValueError, match="forgetting"):
        choose([{"name": "c", "domain_score": 0.5, "forgetting": None}], 0.05)
    with pytest.raises(ValueError):
        choose([], 0.05)


def _tiny(folder: Path, seed: int, intermediate: int = 128) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from slmforge.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("default"))
    cfg = LlamaConfig(hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=1024, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def converter():
    from slmforge.export import gguf

    try:
        return gguf.find_converter("auto")
    except gguf.ConverterMissing as err:
        pytest.skip(f"llama.cpp converter unavailable: {err}")


def _gguf_roundtrip(folder: Path, converter, tmp_path: Path):
    """f16 GGUF of the folder read back by transformers: the same greedy tokens as the folder itself."""
    from transformers import AutoModelForCausalLM

    from slmforge.export import gguf

    out = gguf.convert(folder, tmp_path / f"{folder.name}-f16.gguf", "f16", converter, tmp_path / "gguf.log")
    assert out.stat().st_size > 1e5
    reread = gguf.load_gguf(out)
    ids = [[1, 504, 3458, 314]]
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert gguf.greedy(reread, ids, 6) == gguf.greedy(hf, ids, 6)
    return reread


def test_merged_model_loads_in_transformers_and_converts_to_gguf(tmp_path, converter):
    pytest.importorskip("mergekit")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from slmforge.merge.candidates import candidate_configs, run_merge
    from slmforge.recipe import MergeConfig

    base, spec = _tiny(tmp_path / "base", 0), _tiny(tmp_path / "spec", 1)
    configs = candidate_configs(("sft", str(spec)), str(base), {"sft": str(spec)}, MergeConfig(linear=[0.25], slerp=[0.5]), 0)
    assert set(configs) == {"linear-0.25", "slerp-0.50"}  # one trained stage: no TIES/DARE of stage models
    merged = run_merge(configs["linear-0.25"], tmp_path / "merged", str(spec), seed=0)
    a, b, m = (load_file(f / "model.safetensors") for f in (base, spec, merged))
    key = "model.layers.1.mlp.up_proj.weight"
    assert torch.allclose(m[key], 0.75 * a[key] + 0.25 * b[key], atol=1e-6)  # weight 0.25 on the specialist
    assert (merged / "chat_template.jinja").is_file() or "chat_template" in (merged / "tokenizer_config.json").read_text()
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size
    _gguf_roundtrip(merged, converter, tmp_path)
    # two or more trained stages: TIES and DARE candidates of their task vectors over the base
    two = candidate_configs(("dpo", str(spec)), str(base), {"sft": str(spec), "dpo": str(spec)}, MergeConfig(linear=[], slerp=[]), 0)
    assert set(two) == {"ties(sft+dpo)", "dare_ties(sft+dpo)"}


def test_pruned_model_keeps_important_channels_loads_trains_and_exports(tmp_path, converter):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slmforge.merge.prune import prune_folder, recover
    from slmforge.recipe import PruneConfig, build_recipe

    src = _tiny(tmp_path / "spec", 2, intermediate=4096)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    dead = list(range(0, 4096, 2))[:1500]  # channels whose gate row is zero contribute nothing: importance exactly 0
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[dead] = 0
    model.save_pretrained(src)
    texts = ["PostgreSQL stores tables in pages of eight kilobytes each. " * 4, "VACUUM reclaims storage of dead tuples. " * 4]
    general = ["The sun rises in the east and sets in the west. " * 4]
    cfg = PruneConfig(enabled=True, keep=0.75, multiple_of=64, calibration_tokens=64, recovery_steps=1, recovery_batch_size=2,
                      recovery_max_length=64)
    info = prune_folder(src, tmp_path / "pruned", texts, general, cfg, seed=0)
    assert info["intermediate_before"] == 4096 and info["intermediate_after"] % 64 == 0
    assert 0.72 < info["params_after"] / info["params_before"] < 0.78
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32)
    assert pruned.config.intermediate_size == info["intermediate_after"]
    assert sum(p.numel() for p in pruned.parameters()) == info["params_after"]
    # no dead channel survived while live ones were dropped: every kept gate row is non-zero
    for layer in pruned.model.layers:
        assert (layer.mlp.gate_proj.weight.abs().sum(1) > 0).all()
    # the same outputs as the unpruned model when only dead channels go (here more go, so compare loss only loosely)
    tok = AutoTokenizer.from_pretrained(tmp_path / "pruned")
    ids = tok(texts[0], return_tensors="pt")["input_ids"]
    assert torch.isfinite(pruned(input_ids=ids, labels=ids).loss)

    recipe = build_recipe({"name": "t", "documents": str(tmp_path), "run_dir": str(tmp_path / "runs"), "base_model": str(src)})
    cfg.recovery_domain_ratio = 0.5
    result = recover(tmp_path / "pruned", tmp_path / "work", texts * 4, cfg, recipe, general=general * 4)
    assert result["recovery_steps"] == 1 and result["intermediate_saved"] == info["intermediate_after"]
    mixed = result["recovery_mixture"]  # recovery replays general text beside the domain's, as DAPT does
    assert mixed["domain_blocks"] == 1 and mixed["general_blocks"] == 1
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32)
    assert not torch.equal(trained.model.layers[0].mlp.up_proj.weight, pruned.model.layers[0].mlp.up_proj.weight)
    _gguf_roundtrip(tmp_path / "pruned", converter, tmp_path)


def test_merge_stage_is_ordered_after_eval_and_before_export():
    from slmforge.stages import ordered

    names = [s.name for s in ordered(["export", "merge", "eval", "dpo", "sft"])]
    assert names.index("sft") < names.index("dpo") < names.index("eval") < names.index("merge") < names.index("export")


def test_export_and_serve_take_the_merged_model_unless_it_is_stale(tmp_path):
    from slmforge.artifacts import MERGED_MODEL, trained_model
    from slmforge.export.merge import resolve_source
    from slmforge.recipe import build_recipe
    from slmforge.run import MANIFEST, RunDir, atomic_write_json, sha256_file
    from slmforge.serve.app import serving_model

    run = RunDir(tmp_path / "runs" / "t")

    def finish(stage: str, folder: Path, inputs: dict | None = None, weights: bytes = b"w"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(stage.encode() + weights)
        outputs = {f"{folder.name}/{p.name}": sha256_file(p) for p in folder.iterdir()}
        atomic_write_json(run.stage_dir(stage) / MANIFEST, {"stage": stage, "outputs": outputs, "inputs": inputs or {}})

    finish("sft", run.path(trained_model("sft")))
    assert resolve_source("auto", run, "default").label == "sft"  # no merge stage yet
    sft = trained_model("sft")
    finish("merge", run.path(MERGED_MODEL), {sft.label: run.hash(sft)})
    source = resolve_source("auto", run, "default")
    assert source.label == "merge" and source.model == str(run.path(MERGED_MODEL))
    recipe = build_recipe({"name": "t", "documents": str(tmp_path), "run_dir": str(tmp_path / "runs")})
    assert serving_model(recipe) == str(run.path(MERGED_MODEL))
    finish("sft", run.path(sft), weights=b"retrained")  # sft retrained after the merge: the merge is stale
    assert resolve_source("auto", run, "default").label == "sft"
    assert serving_model(recipe) == str(run.path(sft))
