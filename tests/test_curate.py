import json

import pytest

from slmforge.curate.blocks import RedactPII, heldout_documents
from slmforge.recipe import load_recipe
from slmforge.run import RunDir, read_jsonl

from conftest import paragraph, write_recipe


def _run(tmp_path, corpus, **curate):
    from slmforge.curate.stage import CurateStage
    from slmforge.ingest.stage import IngestStage

    recipe = load_recipe(write_recipe(tmp_path, corpus, ingest={"chunk_tokens": 256, "chunk_overlap": 0}, curate=curate))
    run = RunDir(recipe.run_path)
    run.execute(IngestStage(), recipe)
    outcome = run.execute(CurateStage(), recipe)
    out = recipe.run_path / "curate"
    return outcome.manifest["counts"], out


# ------------------------------------------------------------------------------------------ PII
@pytest.mark.parametrize("text, expected, kinds", [
    ("Write to jane.doe@acme-corp.com for access.", "Write to <EMAIL> for access.", {"email": 1}),
    ("Examples use user@example.com and admin@db.example.", "Examples use user@example.com and admin@db.example.", {}),
    ("Call +1 415 555 0132 or (415) 555-0199 or 415-555-0100.", "Call <PHONE> or <PHONE> or <PHONE>.", {"phone": 3}),
    ("Range -32768 to +32767, max 2147483647, on 2024-01-15, version 15.18.", None, {}),
    ("Server 8.8.8.8 replicates to 10.0.0.5 via 127.0.0.1.", "Server <IP_ADDRESS> replicates to 10.0.0.5 via 127.0.0.1.", {"ip": 1}),
    ("See Section 9.4.1.2 and\n### 8.5.1.1. Time Stamps", None, {}),
    ("export AWS_KEY=AKIAIOSFODNN7EXAMPLE", "export AWS_KEY=<SECRET>", {"secret": 1}),
    ("token: ghp_" + "a1B2" * 9 + " done", "token: <SECRET> done", {"secret": 1}),
    ("password = 'Zx81Ab93Kd82Lm20Qp'", "password = '<SECRET>'", {"secret": 1}),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----", "<SECRET>", {"secret": 1}),
])
def test_pii_redaction_on_known_inputs(text, expected, kinds):
    redacted, found = RedactPII().redact(text)
    assert redacted == (text if expected is None else expected)
    assert dict(found) == kinds


def test_pii_can_be_limited_per_kind():
    redacted, _ = RedactPII(emails=False, ips=True, only_public_ips=False).redact("a@b.co at 10.1.2.3")
    assert redacted == "a@b.co at <IP_ADDRESS>"


# ------------------------------------------------------------------------------------------ split
def test_heldout_split_is_stable_disjoint_and_grows_monotonically():
    ids = [f"doc{i}" for i in range(400)]
    a = heldout_documents(ids, 0.1, seed=0)
    assert a == heldout_documents(list(reversed(ids)), 0.1, seed=0)  # order does not matter
    assert 20 < len(a) < 60  # ~10%
    more = heldout_documents(ids + [f"new{i}" for i in range(100)], 0.1, seed=0)
    assert a <= more and not (more - a) - {f"new{i}" for i in range(100)}  # old documents keep their side
    assert heldout_documents(ids, 0.1, seed=1) != a  # the seed picks another split
    assert len(heldout_documents(["x", "y"], 0.1, seed=0)) == 1  # tiny corpora still hold one out
    assert heldout_documents(ids, 0.0, seed=0) == set()


# ------------------------------------------------------------------------------------------ stage
def test_curate_dedups_filters_redacts_and_splits(tmp_path, corpus):
    # exact copy with different case/whitespace, a near copy, an off-topic page, boilerplate, and PII
    original = (corpus / "note01.txt").read_text()
    (corpus / "copy_exact.txt").write_bytes(("\n\n" + original.replace("\n", "\r\n") + "\r\n\r\n").encode())
    near = original.replace(", so the ", ", so a ", 1) + " It also applies to replicas."
    (corpus / "copy_near.txt").write_text(near)
    (corpus / "cooking.txt").write_text(
        "Banana bread\n\nMash three ripe bananas with melted butter in a large bowl. Stir in the brown sugar, one beaten "
        "egg and a spoon of vanilla. Fold the flour and baking soda in gently, then pour the batter into a buttered tin. "
        "Bake the loaf for about an hour until it turns golden and smells fragrant. Let it cool on a rack before slicing, "
        "and serve it warm with honey, fresh berries or a little salted butter for breakfast with friends.")
    (corpus / "menu.txt").write_text("Home | Next | Prev\n" * 40)
    (corpus / "contact.txt").write_text(paragraph(77) + " Questions go to ops.lead@bigcorp.io or +44 20 7946 0958.")

    counts, out = _run(tmp_path, corpus, heldout_fraction=0.25)
    removed = counts["removed"]
    assert removed["exact_duplicate"] >= 1
    assert removed["near_duplicate"] >= 1
    assert removed["relevance"] >= 1
    assert removed["quality"] + removed["repetition"] >= 1

    train, heldout = read_jsonl(out / "train.jsonl"), read_jsonl(out / "heldout.jsonl")
    everything = train + heldout
    assert not any("Banana" in r["text"] for r in everything)
    assert not any("Home | Next" in r["text"] for r in everything)
    texts = " ".join(r["text"] for r in everything)
    assert "ops.lead@bigcorp.io" not in texts and "7946" not in texts
    assert counts["pii_redacted"] == {"email": 1, "phone": 1}
    # each kept copy-group keeps exactly one member
    marker = paragraph(1)[-60:].upper()
    assert sum(marker in " ".join(r["text"].upper().split()) for r in everything) == 1

    # held-out split is document-level and disjoint
    train_docs, heldout_docs = {r["doc_id"] for r in train}, {r["doc_id"] for r in heldout}
    assert heldout_docs and train_docs and not train_docs & heldout_docs
    listed = {d["id"] for d in read_jsonl(out / "heldout_documents.jsonl")}
    assert heldout_docs <= listed

    # rejections are data: each removed chunk kept with its reason, examples in the report
    report = json.loads((out / "report.json").read_text())
    assert report["removed"]["relevance"]["examples"][0]["text"].startswith("Banana")
    rows = read_jsonl(out / "removed" / "exact_duplicate.jsonl")
    assert rows and all(r["source"] for r in rows)


def test_exact_dedup_key_ignores_case_and_whitespace():
    from datatrove.data import Document

    from slmforge.curate.blocks import normalized_text

    a = Document(text="Vacuum  reclaims\nstorage.", id="a")
    b = Document(text="  VACUUM reclaims storage. ", id="b")
    assert normalized_text(a) == normalized_text(b) != normalized_text(Document(text="Vacuum reclaims space.", id="c"))


def test_disabled_steps_remove_nothing(tmp_path, corpus):
    (corpus / "copy.txt").write_text((corpus / "note02.txt").read_text())
    counts, _ = _run(tmp_path, corpus, exact_dedup=False, near_dedup={"enabled": False}, quality={"enabled": False},
                     relevance={"enabled": False}, pii={"enabled": False})
    assert sum(counts["removed"].values()) == 0
    assert counts["train_chunks"] + counts["heldout_chunks"] == counts["input_chunks"]


# ------------------------------------------------------------------------------------------ empty / mostly removed
def test_curate_that_keeps_nothing_stops_naming_the_filter_and_counts(tmp_path, corpus):
    from typer.testing import CliRunner

    from slmforge.cli import app

    recipe = write_recipe(tmp_path, corpus, curate={"quality": {"mode": "absolute", "min_words": 50_000}})
    result = CliRunner().invoke(app, ["build", str(recipe), "--until", "curate"])
    assert result.exit_code == 1, result.output
    out = " ".join(result.output.split())
    assert "error in stage curate" in out and "kept 0 of" in out
    assert "the quality filter removed all" in out and "loosen curate.quality" in out
    assert not (tmp_path / "runs" / "t" / "curate" / "manifest.json").exists()  # not recorded as done
    again = CliRunner().invoke(app, ["build", str(recipe), "--until", "curate"])
    assert again.exit_code == 1 and "kept 0 of" in again.output  # and a rerun does not skip it as "unchanged"


def test_a_filter_removing_over_half_is_a_warning(tmp_path, corpus):
    import random

    words = "index table row column planner vacuum checkpoint replica lock snapshot tuple page buffer query join".split()
    for i in range(30):  # distinct short notes: under quality.min_words, so the quality filter removes them
        rng = random.Random(i)
        (corpus / f"short{i:02d}.txt").write_text(" ".join(f"{rng.choice(words)}{rng.randint(1, 999)}" for _ in range(9)))
    counts, out = _run(tmp_path, corpus, heldout_fraction=0.25, quality={"mode": "absolute"})  # the web-text rules
    report = json.loads((out / "report.json").read_text())
    assert counts["train_chunks"] > 0
    warnings = [w for w in counts["warnings"] if "quality filter removed" in w]
    assert len(warnings) == 1 and "removed 30 of 54" in warnings[0], counts["warnings"]
    quality = next(f for f in report["flow"] if f["filter"] == "quality")
    assert quality["removed"] == 30 and quality["removed"] > quality["input"] / 2


def test_curate_that_keeps_next_to_nothing_stops_naming_the_filter(tmp_path, corpus):
    import random
    import shutil

    from typer.testing import CliRunner

    from slmforge.cli import app

    keep = sorted(corpus.rglob("*.txt"))[0].read_text()
    shutil.rmtree(corpus)
    corpus.mkdir()
    (corpus / "good.txt").write_text(keep)
    words = "index table row column planner vacuum checkpoint replica lock snapshot tuple page buffer query join".split()
    for i in range(60):  # distinct short notes, under quality.min_words: the quality filter removes all of them
        rng = random.Random(i)
        (corpus / f"short{i:02d}.txt").write_text(" ".join(f"{rng.choice(words)}{rng.randint(1, 999)}" for _ in range(9)))
    recipe = write_recipe(tmp_path, corpus, curate={"heldout_fraction": 0.0, "quality": {"mode": "absolute"}})
    result = CliRunner().invoke(app, ["build", str(recipe), "--until", "curate"])
    out = " ".join(result.output.split())
    assert result.exit_code == 1 and "kept only" in out and "the quality filter removed 60" in out, out
    assert not (tmp_path / "runs" / "t" / "curate" / "manifest.json").exists()
