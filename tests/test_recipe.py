from pathlib import Path

import pytest
import yaml

from slmforge.recipe import STARTER, RecipeError, build_recipe, load_recipe

from conftest import REPO, write_recipe


def test_unknown_key_names_file_field_and_suggests(tmp_path, corpus):
    path = write_recipe(tmp_path, corpus, curate={"heldout_fracton": 0.2})
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "unknown key 'curate.heldout_fracton'" in msg
    assert "did you mean 'heldout_fraction'" in msg


def test_wrong_type_and_range_are_reported_together(tmp_path, corpus):
    path = write_recipe(tmp_path, corpus, ingest={"chunk_tokens": "many"}, curate={"heldout_fraction": 1.5})
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert "2 problems" in msg
    assert "field 'ingest.chunk_tokens'" in msg and "'many'" in msg
    assert "field 'curate.heldout_fraction'" in msg and "less than 1" in msg


def test_missing_documents_folder_and_missing_name(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"documents": "nowhere"}))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert "missing required field 'name'" in msg
    assert "field 'documents'" in msg and "does not exist" in msg and "nowhere" in msg


def test_invalid_yaml_and_non_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "absent.yaml")


def test_cross_field_check(tmp_path, corpus):
    path = write_recipe(tmp_path, corpus, ingest={"chunk_tokens": 64, "chunk_overlap": 64})
    with pytest.raises(RecipeError, match="chunk_overlap .* must be smaller than chunk_tokens"):
        load_recipe(path)


def test_layers_preset_then_yaml_then_overrides(tmp_path, corpus):
    path = write_recipe(tmp_path, corpus, preset="gpu", ingest={"chunk_overlap": 100})
    recipe = load_recipe(path, overrides=["curate.heldout_fraction=0.3", "ingest.exclude=[drafts/*]"])
    assert recipe.ingest.chunk_tokens == 1024  # from the gpu preset
    assert recipe.ingest.chunk_overlap == 100  # the YAML wins over the preset
    assert recipe.curate.heldout_fraction == 0.3  # the CLI wins over the YAML
    assert recipe.ingest.exclude == ["drafts/*"]
    assert recipe.documents == corpus.resolve()
    with pytest.raises(RecipeError, match="must look like key.path=value"):
        load_recipe(path, overrides=["nonsense"])


def test_relative_paths_resolve_against_the_recipe_file(tmp_path, corpus):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "documents": "../docs", "dapt": {"general_dataset": "general.jsonl"},
                                    "sft": {"accelerate_config": "/etc/fsdp.yaml"}}))
    recipe = load_recipe(path)
    assert recipe.documents == corpus.resolve()
    assert recipe.run_path == (tmp_path / "sub" / "runs" / "x").resolve()
    assert recipe.dapt.general_dataset == (tmp_path / "sub" / "general.jsonl").resolve()
    assert recipe.sft.accelerate_config == Path("/etc/fsdp.yaml")  # absolute paths stay as written


@pytest.mark.parametrize("recipe_path", sorted(REPO.glob("examples/*/recipe.yaml")), ids=lambda p: p.parent.name)
def test_every_shipped_recipe_loads(recipe_path):
    recipe = load_recipe(recipe_path)
    assert recipe.enabled_stages()[:2] == ["ingest", "curate"]


def test_starter_recipe_is_valid(tmp_path, corpus):
    data = yaml.safe_load(STARTER.format(name="starter", documents=str(corpus)))
    recipe = build_recipe(data, source="starter")
    assert recipe.name == "starter" and recipe.curate.pii.enabled


def test_init_command_writes_a_loadable_recipe(tmp_path, corpus):
    from typer.testing import CliRunner

    from slmforge.cli import app

    target = tmp_path / "new.yaml"
    result = CliRunner().invoke(app, ["init", str(target), "--documents", str(corpus)])
    assert result.exit_code == 0, result.output
    assert load_recipe(target).documents == corpus.resolve()
    again = CliRunner().invoke(app, ["init", str(target)])
    assert again.exit_code == 1  # never overwrites


def test_duplicate_key_is_an_error_with_key_and_line(tmp_path, corpus):
    path = tmp_path / "dup.yaml"
    path.write_text(f"name: t\ndocuments: {corpus}\ningest:\n  chunk_tokens: 128\ncurate:\n  tasks: 1\n"
                    "ingest:\n  chunk_overlap: 8\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert str(path) in msg and "duplicate key 'ingest' on line 7" in msg and "line 3" in msg
    nested = tmp_path / "nested.yaml"
    nested.write_text(f"name: t\ndocuments: {corpus}\ncurate: {{tasks: 1, tasks: 2}}\n")
    with pytest.raises(RecipeError, match="duplicate key 'tasks' on line 3"):
        load_recipe(nested)


@pytest.mark.parametrize("where", ["proc", "file"])
def test_unusable_run_dir_is_one_line_naming_the_field(tmp_path, corpus, where):
    from typer.testing import CliRunner

    from slmforge.cli import app

    if where == "proc":
        run_dir = Path("/proc/slmforge-runs")
    else:
        run_dir = tmp_path / "a-file"
        run_dir.write_text("not a folder")
    recipe = write_recipe(tmp_path, corpus)
    result = CliRunner().invoke(app, ["ingest", str(recipe), "--set", f"run_dir={run_dir}"])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "run_dir" in lines[0] and str(run_dir) in lines[0], result.output
    assert "Traceback" not in result.output


def test_init_recipe_unedited_enables_the_whole_pipeline(tmp_path, corpus):
    from typer.testing import CliRunner

    from slmforge.cli import app
    from slmforge.recipe import STAGES

    target = tmp_path / "fresh.yaml"
    result = CliRunner().invoke(app, ["init", str(target), "--documents", str(corpus)])
    assert result.exit_code == 0, result.output
    recipe = load_recipe(target)
    # ingest ... export, nothing to switch on by hand; merge is opt-in (it pays only when a candidate beats the specialist)
    assert recipe.enabled_stages() == [s for s in STAGES if s != "merge"]
    assert recipe.generate.teacher.backend == "transformers" and recipe.base_model == "default"


def test_errors_print_brackets_as_written(tmp_path, corpus):
    """Error text is not rich markup: a path or an extra like `slmforge[serve]` in a message is printed whole."""
    from typer.testing import CliRunner

    from slmforge.cli import app

    recipe = write_recipe(tmp_path, corpus)
    missing = tmp_path / "manuals[v2]"
    result = CliRunner().invoke(app, ["ingest", str(recipe), "--set", f"documents={missing}"])
    assert result.exit_code != 0 and "manuals[v2]" in result.output.replace("\n", ""), result.output
