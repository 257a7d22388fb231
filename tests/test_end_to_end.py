"""The whole build — ingest, curate, generate, DAPT, SFT, DPO, eval, export — on a tiny slice with tiny budgets,
with the real default model, then the served result answers a chat request."""

import shutil

import pytest
from typer.testing import CliRunner

from conftest import DEMO_DOCS, write_recipe

PAGES = ["tutorial-table.html", "tutorial-populate.html", "tutorial-select.html", "tutorial-join.html",
         "tutorial-agg.html", "tutorial-update.html", "tutorial-delete.html", "tutorial-views.html",
         "tutorial-fk.html", "tutorial-transactions.html", "indexes-intro.html", "indexes-types.html"]

TINY = {
    "ingest": {"chunk_tokens": 192, "chunk_overlap": 16},
    "curate": {"heldout_fraction": 0.25},
    "generate": {"enabled": True, "max_chunks": 1, "extractive_per_chunk": 1,
                 "teacher": {"batch_size": 2, "max_new_tokens": 16}},
    "dapt": {"enabled": True, "max_steps": 2, "batch_size": 2, "max_length": 64, "save_steps": 1,
             "replay_samples": 2, "replay_max_new_tokens": 16, "report_to": []},
    "sft": {"enabled": True, "max_steps": 2, "batch_size": 2, "max_length": 128, "save_steps": 1, "report_to": []},
    "dpo": {"enabled": True, "max_steps": 1, "batch_size": 1, "max_length": 128, "save_steps": 1, "report_to": []},
    "eval": {"enabled": True, "items": {"mcq": 6, "cloze": 4, "qa": 2, "summary": 1}, "teacher": False,
             "perplexity_words": 120, "general_mcq_items": 4, "general_text_words": 120, "samples": 1,
             "max_new_tokens": {"cloze": 4, "qa": 8, "summary": 8}},
    "export": {"enabled": True, "gguf": [], "corpus_license": "PostgreSQL"},
}


@pytest.mark.slow
def test_tiny_build_end_to_end_then_serve(tmp_path):
    from slmforge.cli import app

    docs = tmp_path / "docs"
    docs.mkdir()
    for page in PAGES:
        shutil.copy(DEMO_DOCS / page, docs / page)
    recipe = write_recipe(tmp_path, docs, **TINY)

    result = CliRunner().invoke(app, ["build", str(recipe)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "t"
    for stage in ("ingest", "curate", "generate", "dapt", "sft", "dpo", "eval", "export"):
        assert (run / stage / "manifest.json").is_file(), stage

    # one table, base vs every stage, with CIs; the final summary says where things are
    table = (run / "eval" / "table.md").read_text()
    for model in ("base", "dapt", "sft", "dpo"):
        assert model in table
    assert "[" in table  # confidence intervals
    assert "Verdict: the final model (dpo) vs base" in table and "It beats the base on" in table
    assert "comparison" in result.output.lower() and str(run / "report.html") in result.output
    assert str(run / "export" / "model") in result.output
    assert (run / "report.html").stat().st_size > 10_000
    card = (run / "export" / "model" / "README.md").read_text()  # the HF folder carries its own card
    assert "PostgreSQL" in card and "dpo" in card

    # the rerun skips every finished stage
    again = CliRunner().invoke(app, ["build", str(recipe)])
    assert again.exit_code == 0 and again.output.count("skipped") >= 8

    # and the served specialist answers a chat request
    from fastapi.testclient import TestClient

    from slmforge.recipe import load_recipe
    from slmforge.serve.app import build_app

    with TestClient(build_app(load_recipe(recipe))) as client:
        reply = client.post("/v1/chat/completions", json={
            "model": "t", "max_tokens": 8, "messages": [{"role": "user", "content": "What does CREATE TABLE do?"}]})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["choices"][0]["message"]["content"].strip()
    # no fallback is configured: the exported specialist itself answered, with a measured confidence
    assert body["slmforge"]["route"] == "specialist" and body["slmforge"]["answered_by"] == "t"
    assert body["slmforge"]["confidence"] < 0
