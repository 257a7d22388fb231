"""Export: LoRA merge, HF folder that loads and generates, GGUF via llama.cpp's converter read back with matching
greedy output, Ollama Modelfile, model card with eval table and licences. Tiny random Llama + the real tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from slmforge.export import gguf
from slmforge.export.merge import load_merged, resolve_source
from slmforge.export.stage import ExportStage
from slmforge.models import resolve_model
from slmforge.recipe import build_recipe
from slmforge.run import RunDir, atomic_write_json


def tiny_model_folder(folder: Path, seed: int = 0, sharpen: bool = True) -> Path:
    """A 2-layer Llama with SmolLM2's tokenizer; weights rounded to f16 so an f16 GGUF is lossless.
    sharpen=False keeps the stock init: near-uniform next-token distributions (an unsure model)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(resolve_model("default"))
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0 if sharpen else 1.0)  # sharper (less uniform) logits: greedy choices are not near-ties
            p.copy_(p.half().float())
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def test_lora_adapter_is_merged_into_the_weights(tiny, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "sft" / "adapter"
    peft_model.save_pretrained(adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny)

    source = resolve_source(str(adapter), RunDir(tmp_path / "run"), "default")
    assert source.adapter == adapter and source.model == str(tiny)
    merged, _ = load_merged(source)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = [1, 502, 1053, 30, 4001]
    fresh_base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32), adapter)
    assert torch.allclose(_logits(merged, ids), _logits(with_adapter, ids), atol=1e-4)
    assert not torch.allclose(_logits(merged, ids), _logits(fresh_base, ids), atol=1e-3)  # the adapter changed something


def _fake_stage(run: RunDir, stage: str, outputs: dict, counts: dict) -> None:
    atomic_write_json(run.stage_dir(stage) / "manifest.json",
                      {"stage": stage, "outputs": outputs, "counts": counts, "started": "2026-11-28T08:00:00", "seconds": 1.0,
                       "stage_version": "1", "config": {}})


def _recipe(tmp_path: Path, tiny: Path, **export):
    docs = tmp_path / "corpus" / "docs"
    docs.mkdir(parents=True)
    (docs / "a.txt").write_text("PostgreSQL notes.")
    (tmp_path / "corpus" / "LICENSE").write_text("PostgreSQL Database Management System\n(also known as Postgres)\n")
    data = {"name": "tiny-spec", "documents": str(docs), "run_dir": str(tmp_path / "runs"), "base_model": str(tiny),
            "export": {"enabled": True, "corpus_license": "PostgreSQL", "verify_tokens": 12, **export}}
    return build_recipe(data)


@pytest.fixture(scope="module")
def converter() -> Path:
    try:
        return gguf.find_converter("auto")  # cached after the first fetch of the llama-cpp-python sdist
    except gguf.ConverterMissing as err:
        pytest.skip(f"llama.cpp converter unavailable: {err}")


def test_export_stage_end_to_end(tiny, converter, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = _recipe(tmp_path, tiny, gguf=["f16", "q8_0", "Q4_K_M"])
    run = RunDir(recipe.run_path)
    # A finished sft stage (a different tiny model) and an eval table: export must pick sft, not the base model.
    sft = tiny_model_folder(run.stage_dir("sft") / "model", seed=1)
    _fake_stage(run, "sft", {"model/model.safetensors": "x"}, {"steps": 10})
    _fake_stage(run, "curate", {"train.jsonl": "y"}, {"train_chunks": 12, "removed": {"quality": 3}})
    (run.stage_dir("eval")).mkdir()
    (run.stage_dir("eval") / "table.md").write_text("| model | qa acc |\n|---|---|\n| base | 0.31 |\n| sft | 0.47 |\n")
    _fake_stage(run, "eval", {"table.md": "z"}, {})

    outcome = run.execute(ExportStage(), recipe)
    out = run.stage_dir("export")
    counts = outcome.manifest["counts"]
    assert counts["source"] == "sft"

    # The HF folder loads in transformers, equals the sft weights, and generates.
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "What is VACUUM?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 5
    ref = AutoModelForCausalLM.from_pretrained(sft)
    assert torch.equal(_logits(model, [1, 2, 3]), _logits(ref, [1, 2, 3]))

    # GGUF: f16 and q8_0 written by llama.cpp's converter, read back by transformers with the same greedy tokens.
    gg = counts["gguf"]
    assert {"f16", "q8_0"} <= {v["type"] for v in gg.values()}
    f16 = next(v for v in gg.values() if v["type"] == "f16")
    assert f16["verify"] == "3/3", gg
    assert (out / "gguf" / "tiny-spec-f16.gguf").stat().st_size > 1e6
    if gguf.quantizer() is None:
        assert any("Q4_K_M skipped" in s for s in counts["gguf_skipped"])
    else:  # llama-cpp-python installed: its quantizer made Q4_K_M, and llama.cpp itself ran every file
        assert {v["type"] for v in gg.values()} == {"f16", "q8_0", "Q4_K_M"}, counts
        assert f16["verify_llama_cpp"] == "3/3", gg
        assert all(v["verify_llama_cpp"].endswith("/3") for v in gg.values()), gg
    verify = json.loads((out / "verify.json").read_text())
    assert verify["gguf"]["tiny-spec-f16.gguf"] == verify["hf"]

    # Modelfile and card.
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./gguf/tiny-spec-q8_0.gguf") and "<|im_end|>" in modelfile
    # The HF folder is a whole hub repo on its own: card with the hub's YAML front matter, and the licences.
    assert not (out / "README.md").exists() and not (out / "LICENSE-corpus").exists()
    readme = (out / "model" / "README.md").read_text()
    front = yaml.safe_load(readme.split("---")[1])
    assert front["base_model"] and front["license"] and front["library_name"] == "transformers"
    assert "| sft | 0.47 |" in readme  # the eval table, verbatim
    assert "PostgreSQL" in readme and "LICENSE-corpus" in readme and (out / "model" / "LICENSE-corpus").is_file()
    assert "| `model.safetensors` |" in readme and "| `LICENSE-corpus` |" in readme  # the folder's own files
    assert "| train_chunks | 12 |" in readme and "| removed | quality: 3 |" in readme
    assert "tiny-spec-f16.gguf" in readme and "3/3" in readme


def test_missing_converter_is_a_clear_skip_not_a_failure(tiny, tmp_path):
    recipe = _recipe(tmp_path, tiny, llama_cpp=str(tmp_path / "nowhere"), gguf=["f16"], verify_prompts=["Hi"])
    run = RunDir(recipe.run_path)
    outcome = run.execute(ExportStage(), recipe)
    out = run.stage_dir("export")
    assert outcome.manifest["counts"]["source"] == "base" and outcome.manifest["counts"]["gguf"] == {}
    assert "holds no convert_hf_to_gguf.py" in outcome.manifest["counts"]["gguf_skipped"][0]
    assert (out / "Modelfile").read_text().startswith("FROM ./model")
    assert "No evaluation table" in (out / "model" / "README.md").read_text()
    assert (out / "model" / "model.safetensors").is_file()

    # Unchanged inputs: skipped. A new eval table: rerun, and the card shows it.
    assert run.execute(ExportStage(), recipe).skipped
    (run.stage_dir("eval")).mkdir()
    (run.stage_dir("eval") / "table.md").write_text("| model | qa acc |\n|---|---|\n| sft | 0.50 |\n")
    _fake_stage(run, "eval", {"table.md": "new"}, {})
    again = run.execute(ExportStage(), recipe)
    assert not again.skipped and "| sft | 0.50 |" in (out / "model" / "README.md").read_text()
    assert not (run.root / ".work" / "export.old").exists()
