"""Generate stage: verifiers on known good/bad items, extractive generators, decontamination, formats, stage run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmforge.generate import make_items, make_teacher
from slmforge.generate.extractive import TermIndex, extractive_items
from slmforge.generate.teachers import teacher_request
from slmforge.lm import LM, CachingLM, LMError, Request, Result
from slmforge.generate.text import ngrams, sentences
from slmforge.generate.verify import Verifier, item_texts
from slmforge.recipe import GenerateConfig, GenerateVerifyConfig, build_recipe
from slmforge.records import Chunk, Item
from slmforge.run import RunDir, atomic_write_json, atomic_write_jsonl, read_jsonl, sha256_file

from conftest import demo_curate

ROOT = Path(__file__).resolve().parents[1]
PASSAGE = ("The bytea data type allows storage of binary strings. A binary string is a sequence of octets. "
           "Binary strings specifically allow storing octets of value zero and other non-printable octets. "
           "The output format depends on the configuration parameter bytea_output; the default is hex.")


def _item(**kw) -> Item:
    base = dict(id="x", kind="qa", chunk_id="c-0000", doc_id="c", origin="teacher", context=PASSAGE,
                prompt="What does the bytea data type store?", answer="The bytea data type stores binary strings.")
    base.update(kw)
    return Item(**base)


def _chunks(path: Path, n: int | None = None) -> list[Chunk]:
    rows = read_jsonl(path, Chunk)
    return rows[:n] if n else rows


# ------------------------------------------------------------------------------------------------ verifiers
def test_verifier_accepts_good_and_names_the_reason_for_bad_items():
    v = Verifier(GenerateVerifyConfig(), avoid_texts=["completely unrelated held out text " * 3])
    assert v.check(_item()) is None
    cases = {
        "ungrounded_answer": _item(id="a", answer="Kubernetes schedules docker containers across nodes in clusters."),
        "ungrounded_question": _item(id="b", prompt="Who won the football world cup in Brazil?"),
        "schema: answer is not choices[answer_index]": _item(id="c", kind="mcq", choices=["bytea", "text", "json", "xml"],
                                                              answer_index=1, answer="bytea"),
        "schema: choices must be distinct and non-empty": _item(id="d", kind="mcq", choices=["bytea", "bytea", "json", "xml"],
                                                                  answer_index=0, answer="bytea"),
        "schema: rejected equals chosen": _item(id="e", kind="preference", rejected="The bytea data type stores binary strings."),
        "rejected_not_worse": _item(id="f", kind="preference", rejected="The bytea type stores binary strings of octets."),
        "repetitive": _item(id="g", answer="binary strings.\nbinary strings.\nbinary strings.\nbinary strings."),
        "answer_repeats_question": _item(id="h", answer="What does the bytea data type store? It stores octets."),
        "copies_passage": _item(id="i", kind="summary", prompt=PASSAGE, answer=PASSAGE.rsplit(" The output", 1)[0]),
        "near_duplicate": _item(id="j", answer="The bytea data type stores binary strings!"),
        "rejected_contains_chosen": _item(id="n", kind="preference", prompt="What does bytea hold?", answer="Binary strings of octets.",
                                          rejected="The answer to this question is: binary strings of octets, I think."),
        "truncated": _item(id="m", kind="summary", prompt=PASSAGE, answer="Binary strings in bytea are octets, and the output format of"),
    }
    for reason, item in cases.items():
        assert v.check(item) == reason, reason
    # a worse (ungrounded) rejected side passes; an extractive item needs no grounding check
    assert v.check(_item(id="k", kind="preference", prompt="What does bytea hold?", answer="Binary strings: sequences of octets.",
                         rejected="It holds JSON documents and XML trees.")) is None
    assert v.check(_item(id="l", origin="extractive", prompt="Which term fits here?", answer="zebra")) is None


def test_verifier_rejects_heldout_ngram_overlap_in_any_field():
    heldout = "In short, binary strings are appropriate for storing data that the programmer thinks of as raw bytes, always."
    v = Verifier(GenerateVerifyConfig(heldout_ngram=13), avoid_texts=[heldout])
    copied = "binary strings are appropriate for storing data that the programmer thinks of as raw bytes"
    assert v.check(_item(id="a", answer=f"Octets. {copied}.", origin="extractive")) == "heldout_overlap"
    assert v.check(_item(id="b", kind="preference", origin="extractive", answer="Binary strings.", rejected=copied)) == "heldout_overlap"
    twelve = " ".join(copied.split()[:12])  # one word short of the limit: allowed
    assert v.check(_item(id="c", answer=twelve, origin="extractive")) is None


# ------------------------------------------------------------------------------------------------ extractive
def test_extractive_items_are_correct_by_construction():
    chunks = _chunks(demo_curate() / "train.jsonl")
    terms = TermIndex(chunks)
    items = [i for c in chunks[:80] for i in extractive_items(c, ["mcq", "cloze", "qa", "preference"], terms, 2, seed=0)]
    kinds = {i.kind for i in items}
    assert kinds == {"mcq", "cloze", "qa", "preference"}
    by_id = {c.id: c for c in chunks}
    for it in items:
        text = by_id[it.chunk_id].text
        if it.kind in ("mcq", "cloze"):
            assert len(it.choices) == 4 and it.choices[it.answer_index] == it.answer
            assert it.answer in text
            own = {w.lower() for w in terms.in_chunk[it.chunk_id]}
            assert all(c.lower() not in own for c in it.choices if c != it.answer), "a distractor occurs in the passage"
        if it.kind == "preference":
            assert " ".join(it.answer.split()) in " ".join(text.split()) and it.rejected != it.answer
        if it.kind == "qa":
            assert it.prompt.startswith(("What ", "In “")) and it.prompt.endswith("?")
            assert " ".join(it.answer.split()) in " ".join(text.split())
    again = [i for c in chunks[:80] for i in extractive_items(c, ["mcq", "cloze", "qa", "preference"], terms, 2, seed=0)]
    assert [i.id for i in again] == [i.id for i in items]  # deterministic for a seed


def _chunk(text: str, title: str = "DELETE", headings: tuple = ("DELETE", "Parameters")) -> Chunk:
    return Chunk(id="c" + str(abs(hash(text)) % 10**8), doc_id="d", index=0, source="s.html", title=title,
                 headings=list(headings), text=text, n_tokens=len(text.split()))


def test_questions_are_well_posed_closed_book():
    text = ("The count is the number of rows deleted. The optional RETURNING clause causes DELETE to compute and return "
            "values based on each row actually deleted. An expression that returns a value of type boolean is allowed "
            "here. A cursor is a named query whose rows are fetched one at a time.")
    other = _chunk("The RETURNING clause appears in INSERT too. A cursor can also be used in UPDATE statements.", "UPDATE")
    chunk = _chunk(text)
    terms = TermIndex([chunk, other])
    qa = {i.prompt: i.answer for i in extractive_items(chunk, ["qa"], terms, 5, seed=0)}
    # a generic subject names the page it comes from (the generic "Parameters" heading gives way to the title)
    assert qa["In “DELETE”, what is the count?"] == "The count is the number of rows deleted."
    assert qa["What does the optional RETURNING clause cause?"].startswith("The optional RETURNING clause causes")
    assert not any("expression that" in q for q in qa)  # a relative clause is not a subject
    assert len(qa) == 3


def test_extractive_summary_is_the_principal_sentences():
    text = ("Partitioning refers to splitting what is logically one large table into smaller physical pieces. "
            "The weather was nice on the day this page was written. "
            "Partitioning can improve query performance when the most heavily accessed rows of the table are in a "
            "single partition or a small number of partitions. "
            "Bulk loads and deletes can be accomplished by adding or removing partitions of the large table. "
            "Seldom-used data can be migrated to cheaper and slower storage media. "
            "Each partition of a partitioned table is an ordinary table with its own indexes and storage.")
    chunk = _chunk(text, "Table Partitioning", ("5.11. Table Partitioning",))
    (item,) = extractive_items(chunk, ["summary"], TermIndex([chunk]), 2, seed=0)
    picked = sentences(item.answer)
    assert len(picked) == 2 and all(s in text for s in picked)
    assert text.index(picked[0]) < text.index(picked[1])  # passage order
    assert "weather" not in item.answer  # the off-topic sentence shares nothing with the rest
    assert len(item.answer.split()) <= 0.5 * len(item.prompt.split()) and item.prompt == text
    short = _chunk("Partitioning splits a table. It has pieces. Each piece is a table.")
    assert extractive_items(short, ["summary"], TermIndex([short]), 2, seed=0) == []  # too few sentences to summarise


def test_make_items_without_teacher_never_overlaps_heldout(tmp_path):
    train = _chunks(demo_curate() / "train.jsonl", 120)
    heldout = _chunks(demo_curate() / "heldout.jsonl")
    # a contaminated held-out chunk: it repeats two sentences of the training split verbatim
    leaked = [s for c in train[:10] for s in sentences(c.text) if len(s.split()) >= 14][:6]
    assert leaked
    heldout.append(Chunk(id="leak-0000", doc_id="leak", index=0, source="leak", title="leak", headings=[],
                         text=" ".join(leaked), n_tokens=100))
    avoid = [c.text for c in heldout]
    items, rejected = make_items(train, ["mcq", "cloze", "qa", "preference"], GenerateConfig(),
                                 cache_dir=tmp_path, seed=0, avoid_texts=avoid)
    assert len(items) > 200 and {i.origin for i in items} == {"extractive"}
    assert any(r["reason"] == "heldout_overlap" for r in rejected)
    held = set().union(*(ngrams(t, 13) for t in avoid))
    for it in items:
        for t in item_texts(it):
            assert held.isdisjoint(ngrams(t, 13)), (it.id, t)
    assert len({i.id for i in items}) == len(items)
    with pytest.raises(ValueError, match="unknown item kinds"):
        make_items(train, ["essay"], GenerateConfig(), cache_dir=tmp_path, seed=0)


# ------------------------------------------------------------------------------------------------ teachers
class CountingLM(LM):
    """A plumbing double for the cache (the real backends are tested below, in test_lm.py and test_generate_http.py)."""

    name = "counting"
    batch_hint = 3

    def __init__(self, fail: set[str] = frozenset()):
        self.calls, self.fail = 0, fail

    def identity(self):
        return {"backend": "counting"}

    def generate(self, requests):
        self.calls += len(requests)
        return [LMError(502, "boom") if r.messages[0]["content"] in self.fail else Result(r.messages[0]["content"].upper())
                for r in requests]


def test_caching_lm_pays_once_and_retries_only_failures(tmp_path):
    reqs = [Request(messages=[{"role": "user", "content": f"q{i}"}], max_tokens=4) for i in range(7)] * 2  # duplicates
    t = CountingLM(fail={"q3"})
    out = CachingLM(t, tmp_path).generate(reqs)
    assert t.calls == 7 and out[0].text == "Q0" and isinstance(out[3], LMError) and out[7].text == "Q0"
    t2 = CountingLM()
    out2 = CachingLM(t2, tmp_path).generate(reqs)
    assert t2.calls == 1 and out2[3].text == "Q3"  # only the failed request went out again
    assert CountingLM().identity() == t.identity() and CachingLM(CountingLM(), tmp_path).generate(reqs[:1])[0].text == "Q0"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A randomly initialised Llama of SmolLM2's architecture, with the real tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from slmforge.models import resolve_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(resolve_model("default"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_transformers_teacher_batches_and_matches_sequential(tiny_model):
    cfg = GenerateConfig(teacher={"model": str(tiny_model), "batch_size": 4, "max_new_tokens": 6})
    teacher = make_teacher(cfg, "default")
    reqs = [{"messages": [{"role": "user", "content": "Explain bytea " * (1 + i)}], "max_tokens": 6, "temperature": 0.0, "seed": 0}
            for i in range(4)]
    reqs = [teacher_request(r) for r in reqs]
    batched = [r.text for r in teacher.generate(reqs)]
    sequential = [teacher.generate([r])[0].text for r in reqs]
    assert len(batched) == 4 and all(isinstance(t, str) and t for t in batched)
    assert batched == sequential  # left padding: a row's greedy output does not depend on its batch mates


# ------------------------------------------------------------------------------------------------ stage
def _fake_run(tmp_path: Path, n_train: int, extra_heldout: list[Chunk]) -> Path:
    root = tmp_path / "runs" / "t"
    cur = root / "curate"
    cur.mkdir(parents=True)
    atomic_write_jsonl(cur / "train.jsonl", _chunks(demo_curate() / "train.jsonl", n_train))
    atomic_write_jsonl(cur / "heldout.jsonl", _chunks(demo_curate() / "heldout.jsonl") + extra_heldout)
    outputs = {p.name: sha256_file(p) for p in cur.glob("*.jsonl")}
    atomic_write_json(cur / "manifest.json", {"stage": "curate", "key": "test", "outputs": outputs, "counts": {}})
    return tmp_path / "runs"


def test_generate_stage_end_to_end_with_tiny_teacher(tmp_path, tiny_model, monkeypatch):
    from slmforge.generate.stage import GenerateStage
    from slmforge.lm.hf import TransformersLM

    train = _chunks(demo_curate() / "train.jsonl", 40)
    leak = " ".join(s for s in sentences(train[1].text) if len(s.split()) >= 14)
    runs = _fake_run(tmp_path, 40, [Chunk(id="leak-0000", doc_id="leak", index=0, source="l", title="l", headings=[], text=leak, n_tokens=9)])
    data = {"name": "t", "documents": str(ROOT / "examples/postgres/docs"), "run_dir": str(runs),
            "generate": {"enabled": True, "max_chunks": 3, "max_passage_words": 60,
                         "teacher": {"model": str(tiny_model), "max_new_tokens": 8, "batch_size": 4, "api_key": "sk-SECRET-123"}}}
    recipe = build_recipe(data)
    calls = []
    real = TransformersLM.generate
    monkeypatch.setattr(TransformersLM, "generate", lambda self, reqs: calls.append(len(reqs)) or real(self, reqs))
    run = RunDir(recipe.run_path)
    outcome = run.execute(GenerateStage(), recipe)
    out = run.stage_dir("generate")
    assert not outcome.skipped and sum(calls) > 0
    assert "sk-SECRET-123" not in (out / "manifest.json").read_text()

    items = read_jsonl(out / "items.jsonl", Item)
    rejected = read_jsonl(out / "rejected.jsonl")
    assert all("reason" in r for r in rejected)
    assert any(r["reason"] == "heldout_overlap" for r in rejected)
    assert len({i.id for i in items}) == len(items)
    # every model-written request ended as an item or a rejected row (a random tiny teacher writes junk: rejected)
    model_units = {r["unit"] for r in rejected if r.get("unit")}
    assert len(model_units) + sum(i.origin != "extractive" for i in items) >= 3 * 3  # 3 chunks x qa/summary/rephrase

    held = set().union(*(ngrams(c.text, 13) for c in read_jsonl(runs / "t/curate/heldout.jsonl", Chunk)))
    texts = [t for i in items for t in item_texts(i)]
    texts += [r["text"] for r in read_jsonl(out / "pretrain.jsonl")]
    texts += [m["content"] for r in read_jsonl(out / "sft.jsonl") for m in r["messages"]]
    texts += [r[k][0]["content"] for r in read_jsonl(out / "dpo.jsonl") for k in ("prompt", "chosen", "rejected")]
    assert all(held.isdisjoint(ngrams(t, 13)) for t in texts)

    # TRL's documented columns
    sft, dpo, pre = (read_jsonl(out / f) for f in ("sft.jsonl", "dpo.jsonl", "pretrain.jsonl"))
    assert sft and dpo and pre
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] and r["chunk_id"] and r["teacher"] for r in sft)
    assert all(r["prompt"][0]["role"] == "user" and r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant" for r in dpo)
    assert {r["kind"] for r in pre} >= {"reading_comprehension"}
    report = json.loads((out / "report.json").read_text())
    assert report["per_generator"]["mcq/extractive"]["accepted"] > 0
    assert 0 <= report["per_generator"]["mcq/extractive"]["rate"] <= 1

    # a forced rerun resumes from the response cache: the teacher is not asked again
    calls.clear()
    run.execute(GenerateStage(), recipe, force=True)
    assert sum(calls) == 0
    assert [i.id for i in read_jsonl(out / "items.jsonl", Item)] == [i.id for i in items]
    assert run.execute(GenerateStage(), recipe).skipped


def test_generate_drops_training_rows_that_share_ngrams_with_eval_questions(tmp_path):
    """eval.questions are never trained on: items and pretraining rows sharing a 13-gram with a question or answer go."""
    from slmforge.generate.stage import GenerateStage

    runs = _fake_run(tmp_path, 30, [])
    train = _chunks(demo_curate() / "train.jsonl", 30)
    # the team's FAQ happens to quote the manual: two answers are sentences of training chunks, verbatim
    quoted = [s for c in train[:12] for s in sentences(c.text) if len(s.split()) >= 16][:2]
    assert len(quoted) == 2
    faq = tmp_path / "faq.csv"
    faq.write_text("question,answer\n" + "".join(f'"What does the manual say, part {i}?","{s}"\n' for i, s in enumerate(quoted))
                   + '"Is this unrelated?","Yes, this answer shares nothing with the manual at all."\n')
    recipe = build_recipe({"name": "t", "documents": str(ROOT / "examples/postgres/docs"), "run_dir": str(runs),
                           "generate": {"enabled": True, "teacher": {"backend": "none"}},
                           "eval": {"questions": "faq.csv"}}, base_dir=tmp_path)
    assert recipe.eval.questions == faq  # relative to the recipe, like every path
    run = RunDir(recipe.run_path)
    outcome = run.execute(GenerateStage(), recipe)
    out = run.stage_dir("generate")
    rejected = [r for r in read_jsonl(out / "rejected.jsonl") if r["reason"] == "question_overlap"]
    report = json.loads((out / "report.json").read_text())["questions_decontamination"]
    assert rejected and report["items_removed"] + report["pretrain_rows_removed"] == len(rejected)
    # the unrelated question cannot be hit; a quoted one only where a generator used that sentence
    assert 1 <= report["questions_hit"] <= 2 and outcome.manifest["counts"]["question_overlap"] == {
        k: report[k] for k in ("items_removed", "pretrain_rows_removed", "questions_hit")}
    summary = dict(GenerateStage().summary_rows(outcome.manifest["counts"]))
    assert summary["removed: overlap with eval.questions"].startswith(f"{report['items_removed']} items")
    guarded = set().union(*(ngrams(s, 13) for s in quoted))
    texts = [t for i in read_jsonl(out / "items.jsonl", Item) for t in item_texts(i)]
    texts += [r["text"] for r in read_jsonl(out / "pretrain.jsonl")]
    texts += [m["content"] for r in read_jsonl(out / "sft.jsonl") for m in r["messages"]]
    assert texts and all(guarded.isdisjoint(ngrams(t, 13)) for t in texts)
    # the questions are part of the stage's key: editing them reruns generate
    faq.write_text(faq.read_text() + '"Another?","Another answer that is new."\n')
    assert not run.execute(GenerateStage(), recipe).skipped


# ------------------------------------------------------------------------------------------------ teacher failures
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _openai_recipe(runs: Path, url: str):
    return build_recipe({"name": "t", "documents": str(ROOT / "examples/postgres/docs"), "run_dir": str(runs),
                         "generate": {"enabled": True, "max_chunks": 4, "max_passage_words": 60, "kinds": ["qa", "summary", "cloze"],
                                      "teacher_kinds": ["qa", "summary"],
                                      "teacher": {"backend": "openai", "base_url": url, "model": "m", "max_retries": 0,
                                                  "timeout_s": 5, "max_new_tokens": 8}}})


def test_a_teacher_that_answers_nothing_fails_the_stage_naming_the_endpoint(tmp_path):
    from slmforge.generate.stage import GenerateStage, TeacherFailed

    url = f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens there
    recipe = _openai_recipe(_fake_run(tmp_path, 20, []), url)
    run = RunDir(recipe.run_path)
    with pytest.raises(TeacherFailed) as err:
        run.execute(GenerateStage(), recipe)
    msg = str(err.value)
    assert f"{url}/chat/completions" in msg and "answered none of 8 requests" in msg and "attempt" in msg, msg
    assert run.manifest("generate") is None  # not recorded as done: the next run tries again
    with pytest.raises(TeacherFailed):
        run.execute(GenerateStage(), recipe)


def test_partial_teacher_failures_are_listed_and_a_rerun_retries_only_those(tmp_path):
    import hashlib

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from slmforge.generate.stage import GenerateStage
    from test_serve import running

    state = {"flaky": True, "received": 0}

    async def chat(request):
        body = await request.body()
        state["received"] += 1
        if state["flaky"] and hashlib.sha256(body).digest()[0] % 2:
            return JSONResponse({"error": "overloaded"}, status_code=503)
        return JSONResponse({"choices": [{"message": {"role": "assistant", "content": "The index scans rows."}}]})

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])

    with running(app) as url:
        recipe = _openai_recipe(_fake_run(tmp_path, 20, []), url)
        run = RunDir(recipe.run_path)
        first = run.execute(GenerateStage(), recipe)
        counts = first.manifest["counts"]
        failed = counts["teacher_failures"]
        assert 0 < failed < counts["teacher_requests"] == state["received"] == 8
        assert counts["incomplete"].startswith(f"{failed} of 8 teacher requests to {url}/chat/completions (model m) failed")
        listed = [r for r in read_jsonl(run.stage_dir("generate") / "rejected.jsonl") if r["reason"] == "teacher_error"]
        assert len(listed) == failed and all("HTTP 503" in r["detail"] for r in listed)

        state.update(flaky=False, received=0)
        second = run.execute(GenerateStage(), recipe)  # no --force: an incomplete stage is never skipped
        assert not second.skipped and state["received"] == failed  # only the failed requests went out again
        assert second.manifest["counts"]["teacher_failures"] == 0 and "incomplete" not in second.manifest["counts"]
        assert run.execute(GenerateStage(), recipe).skipped and state["received"] == failed


def test_matching_pairs_prefer_a_questions_own_answer_over_another_chunks():
    from slmforge.generate.matching import matching_pairs, partners
    from slmforge.records import DpoRow

    topics = ["vacuum reclaims dead tuples", "pg_dump writes a script file", "a role owns objects",
              "LOCK TABLE waits for conflicting locks", "TimeZone sets the display zone"]
    items = [_item(id=f"q{c}{j}", chunk_id=f"c-{c:04d}", prompt=f"What about {t} ({j})?", answer=f"{t.capitalize()} ({j}).")
             for c, t in enumerate(topics) for j in range(2)]
    items.append(_item(id="cloze", kind="cloze", chunk_id="c-0000", answer="vacuum"))  # only questions take part
    rows = matching_pairs(items, seed=0)
    assert len(rows) == 10 and all(r["kind"] == "matching" for r in rows)
    answers = {it.answer: it.chunk_id for it in items if it.kind == "qa"}
    for row, item in zip(rows, [it for it in items if it.kind == "qa"]):
        DpoRow.model_validate(row)
        assert row["prompt"][0]["content"] == item.prompt and row["chosen"][0]["content"] == item.answer
        assert answers[row["rejected"][0]["content"]] != item.chunk_id  # another chunk's answer
    assert matching_pairs(items, seed=0) == rows and matching_pairs(items, seed=1) != rows  # seeded
    assert matching_pairs(items, drawn=partners(items, seed=0)) == rows  # the partners drawn once, as generate does
    assert matching_pairs([it for it in items if it.chunk_id == "c-0000"]) == []  # one chunk: nothing to prefer over
