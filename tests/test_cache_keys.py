"""Cache keys know the code and the weights: a changed stage reruns with everything after it; new weights at the same
path are a new model."""

import shutil

import pytest

from slmforge import artifacts as art
from slmforge import run as run_module
from slmforge.recipe import load_recipe
from slmforge.run import RunDir, code_files, code_hash

from conftest import write_recipe


def _stages():
    from slmforge.curate.stage import CurateStage
    from slmforge.generate.stage import GenerateStage
    from slmforge.ingest.stage import IngestStage

    return IngestStage(), CurateStage(), GenerateStage()


def test_code_hash_covers_the_stage_package_and_the_core_it_imports():
    files = code_files("slmforge.curate.stage")
    assert {"slmforge/curate/stage.py", "slmforge/curate/blocks.py", "slmforge/run.py", "slmforge/records.py",
            "slmforge/artifacts.py", "slmforge/recipe.py"} <= set(files)
    assert not any(f.startswith(("slmforge/train/", "slmforge/serve/")) for f in files)
    # eval builds its benchmarks with generate's item makers: their code is part of eval's identity
    assert "slmforge/generate/extractive.py" in code_files("slmforge.evaluate.stage")
    assert "slmforge/evaluate/data/general_mcq.jsonl" in code_files("slmforge.evaluate.stage")  # shipped data too


def test_a_changed_stage_reruns_with_everything_after_it(tmp_path, corpus, monkeypatch):
    recipe = load_recipe(write_recipe(tmp_path, corpus, curate={"heldout_fraction": 0.25},
                                      generate={"enabled": True, "teacher": {"backend": "none"}}))
    run = RunDir(recipe.run_path)
    stages = _stages()
    assert not any(run.execute(s, recipe).skipped for s in stages)
    assert all(run.execute(s, recipe).skipped for s in stages)

    # a copy of the package whose curate code differs by one line (as after an upgrade), read in place of the real one
    copy = tmp_path / "pkg" / "slmforge"
    shutil.copytree(run_module._PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    blocks = copy / "curate" / "blocks.py"
    blocks.write_text(blocks.read_text() + "\n# a changed filter\n")
    monkeypatch.setattr(run_module, "_PACKAGE", copy)
    code_hash.cache_clear()
    before = {s.name: run.manifest(s.name)["key"] for s in stages}
    again = [run.execute(s, recipe) for s in stages]
    assert [o.skipped for o in again] == [True, False, False]  # ingest skipped; curate and generate rerun
    assert again[1].manifest["outputs"] == run_module.json.loads((run.stage_dir(art.CURATE) / "manifest.json").read_text())["outputs"]
    assert all(run.manifest(s.name)["key"] != before[s.name] for s in stages[1:])
    code_hash.cache_clear()


@pytest.fixture
def tiny_base(tmp_path):
    from slmforge.models import resolve_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    import torch

    tok = AutoTokenizer.from_pretrained(resolve_model("default"))
    folder = tmp_path / "base"

    def save(seed: int):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                             tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        LlamaForCausalLM(config).save_pretrained(folder)
        tok.save_pretrained(folder)

    save(0)
    return folder, save


def test_new_weights_at_the_same_path_are_scored_again(tmp_path, corpus, tiny_base):
    from slmforge.curate.stage import CurateStage
    from slmforge.evaluate.stage import EvalStage
    from slmforge.ingest.stage import IngestStage

    folder, save = tiny_base
    recipe = load_recipe(write_recipe(tmp_path, corpus, base_model=str(folder), curate={"heldout_fraction": 0.25},
                                      eval={"enabled": True, "models": ["base"], "kinds": ["mcq"], "items": {"mcq": 6},
                                            "perplexity_words": 200, "general": False, "samples": 0}))
    run = RunDir(recipe.run_path)
    for stage in (IngestStage(), CurateStage()):
        run.execute(stage, recipe)
    first = run.execute(EvalStage(), recipe)
    assert not first.skipped and first.manifest["counts"]["scored_from_cache"] == 0
    assert run.execute(EvalStage(), recipe).skipped

    save(1)  # other weights, same path, same file names
    second = run.execute(EvalStage(), recipe)
    assert not second.skipped and second.manifest["counts"]["scored_from_cache"] == 0
    assert second.manifest["inputs"]["model:base"] != first.manifest["inputs"]["model:base"]
