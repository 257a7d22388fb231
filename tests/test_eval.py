"""Evaluation: decontamination, metrics, lm-eval agreement, frozen benchmarks, chance-level sanity, the stage and report.

Models here are tiny randomly initialised Llamas with the real SmolLM2 tokenizer (seconds, not minutes).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from slmforge.evaluate.decontaminate import NgramIndex, decontaminate
from slmforge.evaluate.lm_eval_tasks import write_tasks
from slmforge.evaluate.metrics import bootstrap_ci, exact_match, rouge_l, token_f1, wilson_ci
from slmforge.records import Chunk, Item
from slmforge.run import RunDir, atomic_write_json, atomic_write_jsonl, hash_obj, read_jsonl

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "examples" / "postgres" / "docs"
HELDOUT_PAGES = ("datatype-geometric.html", "ddl-generated-columns.html", "indexes-unique.html", "datatype-xml.html",
                 "indexes-bitmap-scans.html", "tutorial-table.html", "sql-delete.html", "datatype.html")
TRAIN_PAGES = ("datatype-boolean.html", "datatype-enum.html")


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer Llama (random weights, wide init so choices get distinct log-likelihoods) + the real tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from slmforge.models import resolve_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(resolve_model("default"))
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=len(tok), max_position_embeddings=1024, initializer_range=0.2, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def page_chunks(names) -> list[Chunk]:
    """Real held-out-like chunks: one per section of a few pages of the PostgreSQL manual shipped in examples/."""
    from slmforge.ingest.readers import read_file

    chunks = []
    for name in names:
        doc = read_file(DOCS / name, DOCS)
        for i, s in enumerate(doc.sections):
            if len(s.text.split()) >= 20:
                chunks.append(Chunk(id=f"{doc.id}-{i:04d}", doc_id=doc.id, index=i, source=doc.source, title=doc.title,
                                    headings=s.headings, text=s.text, n_tokens=len(s.text.split())))
    return chunks


def mcq(i: int, question: str, choices: list[str], answer_index: int, doc: str = "d0") -> Item:
    return Item(id=f"q{i:04d}", kind="mcq", chunk_id=f"{doc}-0000", doc_id=doc, origin="test", prompt=question,
                answer=choices[answer_index], choices=choices, answer_index=answer_index)


# ------------------------------------------------------------------------------------------------ metrics
def test_metrics_known_values():
    assert token_f1("the GiST index", "a GiST index!") == 1.0  # SQuAD normalisation: case, articles, punctuation
    assert token_f1("btree index", "gist index") == pytest.approx(0.5)
    assert token_f1("", "x") == 0.0
    assert exact_match("points, and more text", "Points") == 1.0
    assert exact_match("polygons", "points") == 0.0
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert 0 < rouge_l("the cat sat", "the cat sat on the mat") < 1
    lo, hi = wilson_ci(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    lo, hi = wilson_ci(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    lo, hi = bootstrap_ci([0.0, 1.0] * 50)
    assert lo < 0.5 < hi and hi - lo < 0.25


# ------------------------------------------------------------------------------------------------ decontamination
def test_decontamination_catches_planted_overlaps(tmp_path):
    from slmforge.generate import make_items
    from slmforge.recipe import GenerateConfig

    heldout = page_chunks(HELDOUT_PAGES)
    # user_questions off: its several wordings of one fact share the answer, so planting one drops its siblings too
    items, _ = make_items(heldout, ["mcq", "cloze", "qa"], GenerateConfig(user_questions=0), cache_dir=tmp_path / "c", seed=0)
    assert len(items) >= 20
    planted = [items[3], items[11], items[17]]
    # training artifacts in three shapes: Chunk rows, SFT messages, DPO pairs; each hides one item among real text
    train_chunks = [c.model_dump() for c in page_chunks(TRAIN_PAGES)]
    train_chunks[0]["text"] += "\n\n" + f"{planted[0].prompt} {planted[0].answer}".upper()  # case must not matter
    atomic_write_jsonl(tmp_path / "train.jsonl", train_chunks)
    atomic_write_jsonl(tmp_path / "sft.jsonl", [
        {"messages": [{"role": "user", "content": "Explain geometric types."}, {"role": "assistant", "content": "They are 2-D objects."}]},
        {"messages": [{"role": "user", "content": planted[1].prompt}, {"role": "assistant", "content": planted[1].answer}]},
    ])
    atomic_write_jsonl(tmp_path / "dpo.jsonl", [{"prompt": "Question?", "chosen": f"Indeed: {planted[2].prompt}, {planted[2].answer}.",
                                                  "rejected": "no"}])
    index = NgramIndex(8)
    for name in ("train.jsonl", "sft.jsonl", "dpo.jsonl"):
        index.add_jsonl(tmp_path / name, name)
    kept, report = decontaminate(items, index, max_overlap=0.3)

    dropped = {r["id"] for r in report if r["dropped"]}
    assert {p.id for p in planted} <= dropped
    assert len(dropped) <= len(planted) + 1  # unrelated pages of one manual share only a stray boilerplate phrase
    assert len(kept) == len(items) - len(dropped)
    by_id = {r["id"]: r for r in report}
    # SFT rows keep prompt and answer in separate messages, so the few n-grams spanning that boundary are unseen
    assert all(by_id[p.id]["overlap"] >= 0.8 for p in planted)
    assert len(report) == len(items)


# ------------------------------------------------------------------------------------------------ scoring vs lm-eval
def _mcq_items(n: int, seed: int) -> list[Item]:
    rng = random.Random(seed)
    words = ["index", "table", "vacuum", "planner", "tuple", "schema", "trigger", "lock", "join", "cursor", "role", "view",
             "sequence", "partition", "snapshot", "replica", "checkpoint", "buffer", "segment", "tablespace"]
    items = []
    for i in range(n):
        choices = rng.sample(words, 4)
        items.append(mcq(i, f"Which object does PostgreSQL use for item {i}?", choices, rng.randrange(4), doc=f"d{i % 5}"))
    return items


def _reference_scores(model_dir: Path, items: list[Item]) -> tuple[float, float]:
    """acc and acc_norm computed by hand from log P(" choice" | "Question: ...\\nAnswer:"), as lm-eval defines them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    acc = acc_norm = 0
    for it in items:
        ctx = f"Question: {it.prompt}\nAnswer:"
        lls = []
        for choice in it.choices:
            ctx_ids = tok(ctx)["input_ids"]
            full = tok(ctx + " " + choice)["input_ids"]
            cont = full[len(ctx_ids):]
            with torch.no_grad():
                logp = model(torch.tensor([full])).logits[0].log_softmax(-1)
            lls.append(sum(logp[len(ctx_ids) - 1 + j, t].item() for j, t in enumerate(cont)))
        acc += max(range(4), key=lambda k: lls[k]) == it.answer_index
        acc_norm += max(range(4), key=lambda k: lls[k] / len(it.choices[k])) == it.answer_index
    return acc / len(items), acc_norm / len(items)


def test_mcq_scores_agree_with_lm_eval_cli_and_by_hand(tiny_model, tmp_path):
    from slmforge.evaluate.scoring import score_model

    items = _mcq_items(24, seed=1)
    data = tmp_path / "benchmarks" / "mcq.jsonl"
    atomic_write_jsonl(data, items)
    task_dir = tmp_path / "lm_eval"
    names, _ = write_tasks(task_dir, "slmforge_t", {"mcq": data}, {})
    ours = score_model("tiny", str(tiny_model), task_dir, "slmforge_t", ["mcq"], batch_size=4, seed=0)["scores"]["mcq"]

    # the exported folder names its data relative to itself: move both folders elsewhere, run from yet another directory
    assert str(tmp_path) not in (task_dir / "mcq.yaml").read_text() and "../benchmarks/mcq.jsonl" in (task_dir / "mcq.yaml").read_text()
    moved = tmp_path / "moved" / "eval"
    moved.mkdir(parents=True)
    (tmp_path / "benchmarks").rename(moved / "benchmarks")
    task_dir.rename(moved / "lm_eval")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    # lm-eval's own command line on the exported task folder (offline), loading the model itself
    out = tmp_path / "cli"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={tiny_model},dtype=float32",
                    "--device", "cpu", "--batch_size", "1", "--include_path", str(moved / "lm_eval"), "--tasks", names[0],
                    "--output_path", str(out)], check=True, env=env, cwd=elsewhere, capture_output=True, timeout=600)
    cli = json.loads(next(out.rglob("results_*.json")).read_text())["results"][names[0]]
    assert ours["acc"]["value"] == pytest.approx(cli["acc,none"], abs=1e-9)
    assert ours["acc_norm"]["value"] == pytest.approx(cli["acc_norm,none"], abs=1e-9)
    assert ours["acc"]["n"] == 24

    acc, acc_norm = _reference_scores(tiny_model, items)
    assert ours["acc"]["value"] == pytest.approx(acc)
    assert ours["acc_norm"]["value"] == pytest.approx(acc_norm)
    lo, hi = ours["acc"]["ci"]
    assert lo <= ours["acc"]["value"] <= hi


def test_random_items_score_at_chance(tiny_model, tmp_path, capfd):
    """A model that cannot know the answers (random labels over random options) must land on chance, not above it;
    lm-eval's own progress bars stay hidden (the stage shows its own)."""
    from slmforge.evaluate.scoring import score_model

    items = _mcq_items(200, seed=7)
    data = tmp_path / "mcq.jsonl"
    atomic_write_jsonl(data, items)
    write_tasks(tmp_path / "t", "slmforge_chance", {"mcq": data}, {})
    scores = score_model("tiny", str(tiny_model), tmp_path / "t", "slmforge_chance", ["mcq"], batch_size=16, seed=0)["scores"]["mcq"]
    for metric in ("acc", "acc_norm"):
        lo, hi = scores[metric]["ci"]
        assert lo <= 0.25 <= hi, (metric, scores[metric])
        assert 0.15 < scores[metric]["value"] < 0.35
    err = capfd.readouterr().err
    assert "Running loglikelihood requests" not in err and "| 200/200 [" not in err, err[-500:]  # requests, task docs


# ------------------------------------------------------------------------------------------------ the stage + report
def _fake_run(tmp_path: Path, tiny_model: Path) -> tuple[Path, RunDir]:
    """A run folder with finished curate outputs (real manual pages) and a finished 'sft' stage with a tiny model."""
    import shutil

    docs = tmp_path / "docs"
    docs.mkdir()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "evaltest", "documents": str(docs), "run_dir": str(tmp_path / "runs"), "base_model": str(tiny_model),
        "eval": {"teacher": False, "items": {"mcq": 12, "cloze": 8, "qa": 5, "summary": 2}, "perplexity_words": 300,
                 "general_mcq_items": 12, "general_text_words": 200, "max_new_tokens": {"cloze": 4, "qa": 8, "summary": 8},
                 "batch_size": 8, "questions": "faq.jsonl"},
    }))
    faq = [("How do I create a unique index?", "Use CREATE UNIQUE INDEX on the column; duplicates then raise an error.", "Indexes"),
           ("Can a bitmap scan combine two indexes?", "Yes: the planner ANDs or ORs the bitmaps of several index scans.", "Indexes"),
           ("How do I delete every row of a table?", "DELETE FROM the table without WHERE, or TRUNCATE it for speed.", "SQL"),
           ("What does a generated column store?", "A value computed from other columns, written when the row changes.", "SQL"),
           ("Which type stores a point on a plane?", "The point type stores a pair of floating-point coordinates.", "Types"),
           ("Can XML values be checked for well-formedness?", "Yes: the xml type checks input values when they are stored.", "Types"),
           ("How do I add a column to a table?", "ALTER TABLE ... ADD COLUMN with the name and type of the new column.", "SQL"),
           ("Why is my index not used?", "The planner estimated a sequential scan to be cheaper for that query.", "Indexes")]
    (tmp_path / "faq.jsonl").write_text("".join(json.dumps({"question": q, "answer": a, "section": sec}) + "\n" for q, a, sec in faq))
    run = RunDir(tmp_path / "runs" / "evaltest")
    from slmforge.ingest.readers import read_file

    heldout = page_chunks(HELDOUT_PAGES)
    atomic_write_jsonl(run.stage_dir("curate") / "heldout.jsonl", heldout)
    atomic_write_jsonl(run.stage_dir("curate") / "train.jsonl", page_chunks(TRAIN_PAGES))
    atomic_write_jsonl(run.stage_dir("curate") / "heldout_documents.jsonl", [read_file(DOCS / p, DOCS) for p in HELDOUT_PAGES])
    from slmforge.run import sha256_file

    outputs = {n: sha256_file(run.stage_dir("curate") / n) for n in ("heldout.jsonl", "train.jsonl", "heldout_documents.jsonl")}
    atomic_write_json(run.stage_dir("curate") / "manifest.json", {"stage": "curate", "outputs": outputs, "seconds": 1.0,
                                                                   "counts": {"train_chunks": 7, "heldout_chunks": len(heldout)}})
    shutil.copytree(tiny_model, run.stage_dir("sft") / "model")
    atomic_write_json(run.stage_dir("sft") / "manifest.json", {"stage": "sft", "key": hash_obj("sft-v1"), "outputs": {}, "seconds": 2.0})
    atomic_write_json(run.stage_dir("sft") / "log_history.json", [{"step": s, "loss": 3.0 - 0.1 * s} for s in range(1, 11)])
    return recipe, run


def test_eval_stage_freezes_benchmarks_writes_table_and_report(tiny_model, tmp_path, capfd):
    from slmforge.cli import run_stages

    recipe, run = _fake_run(tmp_path, tiny_model)
    run_stages(recipe, ["index", "eval"])  # the index: open-book variants of the question benchmarks
    err = capfd.readouterr().err
    assert "Running loglikelihood requests" not in err, err[-800:]  # lm-eval's bars (perplexity's too) stay hidden
    ev = run.stage_dir("eval")
    results = json.loads((ev / "results.json").read_text())
    # open book: the same items after the top passages of the deployed index (training + held-out pages)
    for closed, opened in (("mcq", "mcq_open"), ("qa", "qa_open"), ("questions", "questions_open"),
                           ("doc_questions", "doc_questions_open")):
        assert results["benchmarks"][opened]["n"] == results["benchmarks"][closed]["n"]
        rows_open, rows_closed = read_jsonl(ev / results["benchmarks"][opened]["file"]), read_jsonl(ev / results["benchmarks"][closed]["file"])
        assert [r["id"] for r in rows_open] == [r["id"] for r in rows_closed]
        assert all(r["passages"].startswith("Passages:\n[1] [") for r in rows_open if r["passages"])
        assert set(results["scores"]["base"][opened]) == set(results["scores"]["base"][closed])
    recall = results["benchmarks"]["mcq_open"]["retrieval_recall"]
    assert 0 < recall["1"] <= recall["5"] <= 1  # held-out items: their own chunk is in the deployed index
    assert results["benchmarks"]["questions_open"]["retrieval_recall"] is None  # your questions have no source chunk
    assert "{{passages}}" in (ev / "lm_eval" / "mcq_open.yaml").read_text()
    assert [m["name"] for m in results["models"]] == ["base", "sft"]
    assert {"mcq", "cloze", "domain_ppl", "general_mcq", "general_ppl"} <= set(results["benchmarks"])
    for bench, meta in results["benchmarks"].items():
        assert meta["n"] > 0
        for model in ("base", "sft"):
            first = next(iter(results["scores"][model][bench].values()))
            assert first["n"] == meta["n"] and first["ci"][0] <= first["value"] <= first["ci"][1]
    # same weights under two names: identical items scored identically, so every change from base is zero
    assert results["scores"]["base"] == results["scores"]["sft"]
    assert results["benchmarks"]["mcq"]["chance"] == pytest.approx(0.25)
    assert all(d == 0 for d in results["forgetting"]["sft"].values())

    # your questions: frozen, scored for both models, paired, with the no-model references beside them
    q = results["benchmarks"]["questions"]
    assert q["n"] == 8 and q["file"] == "benchmarks/questions.jsonl" and (ev / q["file"]).is_file()
    assert set(results["scores"]["base"]["questions"]) == {"acc_norm", "acc", "acc_norm_char", "answer_ppl"}
    assert results["scores"]["base"]["questions"]["answer_ppl"]["value"] > 1
    assert set(results["references"]["questions"]) == {"chance", "word_overlap", "longest_option"}
    assert results["references"]["questions"]["chance"]["acc"] == pytest.approx(0.25)
    assert q["training_overlap"]["overlapping"] == 0 and q["removed_from_training"] is None
    # questions the held-out pages ask themselves ("Creating XML Values" -> "How do I create XML values?"), same scoring
    dq = results["benchmarks"]["doc_questions"]
    assert dq["n"] >= 3 and "Disjoint from every training template" in dq["built"] and dq["rules"]["by_rule"]["task"] >= 3
    assert any(r["question"] == "How do I create XML values?" for r in read_jsonl(ev / dq["file"]))
    assert "same generator and wording as the training drills" in results["benchmarks"]["mcq"]["built"]
    # paired verdicts on every row: identical weights are never distinguishable from the base
    for bench, metrics in results["paired"]["sft"].items():
        for metric, p in metrics.items():
            assert p["verdict"] == "not distinguishable" and p["diff"] == 0 and p["n"] == results["benchmarks"][bench]["n"]
    assert set(results["paired"]["sft"]) == set(results["benchmarks"])

    table = (ev / "table.md").read_text()
    assert "| benchmark | n | chance | base | sft |" in table and "mcq acc ↑" in table and "questions acc_norm ↑" in table
    assert "Δ +0.000 [+0.000, +0.000] p=1 → not distinguishable" in table and "Δ nats/word +0.000" in table
    assert "questions acc: word overlap (no model)" in table and "questions acc: longest option (no model)" in table
    n_domain = len([b for b in results["benchmarks"] if not b.startswith("general_")])
    assert f"It beats the base on 0 of {n_domain}, not distinguishable on {n_domain}" in table
    for yaml_file in (ev / "lm_eval").glob("*.yaml"):
        if not yaml_file.name.startswith("_group"):
            assert f"../benchmarks/{yaml_file.stem}.jsonl" in yaml_file.read_text()  # beside the published files, relative
    assert (ev / "lm_eval" / "slmforge_metrics.py").is_file()
    assert len(read_jsonl(ev / "predictions" / "sft.jsonl")) == sum(m["n"] for m in results["benchmarks"].values())
    html = (run.root / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4  # funnel, paired differences, benchmark bars, general bars, loss curves
    assert 'alt="paired differences from the base"' in html and "Your questions" in html and "(no model)" in html
    assert "Sample generations" in html and "Forgetting check" in html and "slmforge run report: evaltest" in html
    assert "Closed book vs open book" in html

    # frozen: a forced rerun rebuilds identical benchmark files (same hashes) and reuses the cached scores
    hashes = {b: m["sha256"] for b, m in results["benchmarks"].items()}
    outcome = run_stages(recipe, ["eval"], force=True)[0]
    again = json.loads((ev / "results.json").read_text())
    assert {b: m["sha256"] for b, m in again["benchmarks"].items()} == hashes
    assert outcome.manifest["counts"]["scored_from_cache"] == 2
    assert outcome.manifest["outputs"]["benchmarks/mcq.jsonl"] == hashes["mcq"]


def test_benchmark_hash_is_stable_across_fresh_builds(tmp_path):
    """Two independent builds (no shared cache) of the same held-out split give byte-identical benchmark files."""
    from slmforge.evaluate import benchmarks as bm
    from slmforge.recipe import EvalConfig, build_recipe
    from slmforge.run import sha256_file

    chunks = page_chunks(HELDOUT_PAGES)
    recipe = build_recipe({"name": "h", "documents": str(DOCS)})
    cfg = EvalConfig(teacher=False, items={"mcq": 10, "cloze": 10, "qa": 5})
    hashes = []
    for attempt in range(2):
        items, _, _ = bm.build_items(chunks, cfg, recipe, tmp_path / f"cache{attempt}")
        selected, _ = bm.select(items, NgramIndex(8), cfg, seed=0)
        for kind, rows in selected.items():
            atomic_write_jsonl(tmp_path / f"b{attempt}" / f"{kind}.jsonl", rows)
        hashes.append({k: sha256_file(tmp_path / f"b{attempt}" / f"{k}.jsonl") for k in selected})
    assert hashes[0] == hashes[1] and set(hashes[0]) == {"mcq", "cloze", "qa"}
