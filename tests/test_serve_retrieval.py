"""`slmforge serve` with retrieval: a real index (ingest -> curate -> index on a few demo pages), real uvicorn servers and
the official `openai` client. Questions whose answer sits in one chunk get that chunk cited; streaming ends with the
citations; JSON-schema output still validates; the fallback sees the same passages; retrieval off gives no citations."""

from __future__ import annotations

import json
import shutil

import httpx
import jsonschema
import openai
import pytest

from conftest import DEMO_DOCS, write_recipe
from slmforge.recipe import RoutingConfig, ServeConfig, load_recipe
from slmforge.serve.app import ServeError, build_app, create_app
from slmforge.serve.retrieval import Retrieval, retrieval_prompt, shown
from slmforge.lm.http import OpenAILM
from test_export import tiny_model_folder
from test_serve import SERVER_SCHEMA, real_engine, running, tiny_engine, unsure_engine  # noqa: F401 (fixtures)

PAGES = ["tutorial-transactions.html", "datatype-money.html", "indexes-types.html", "datatype-uuid.html",
         "datatype-boolean.html", "indexes-partial.html"]

# (question, words found in exactly one chunk of these pages: the chunk that answers it)
ASKED = [
    ("Which setting controls the output format of the money type?", "lc_monetary"),
    ("What index types can I create besides B-tree?", "provides several index types"),
    ("What is a partial index built over?", "index built over a subset of a table"),
    ("Which RFC defines the UUIDs that the uuid type stores?", "RFC 4122"),
    ("Which states can the boolean type have?", "can have several states"),
    ("Can a savepoint be released to free resources?", "it can be released, so the system can free some resources"),
]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A run of six demo pages through ingest, curate and index (the real stages), with no held-out documents."""
    from slmforge.curate.stage import CurateStage
    from slmforge.index.stage import IndexStage
    from slmforge.ingest.stage import IngestStage
    from slmforge.run import RunDir

    tmp = tmp_path_factory.mktemp("rag")
    docs = tmp / "docs"
    docs.mkdir()
    for page in PAGES:
        shutil.copy(DEMO_DOCS / page, docs / page)
    recipe = load_recipe(write_recipe(tmp, docs, curate={"heldout_fraction": 0.0}))
    run = RunDir(recipe.run_path)
    for stage in (IngestStage(), CurateStage(), IndexStage()):
        run.execute(stage, recipe)
    return tmp / "recipe.yaml", run


@pytest.fixture(scope="module")
def retrieval(demo_run):
    from slmforge.index import open_index

    return Retrieval(open_index(demo_run[1]), k=2, max_words=240)


def answer_chunk(retrieval: Retrieval, words: str) -> str:
    chunks = {p.chunk_id for p in retrieval.index.passages if words in p.text}
    assert len(chunks) == 1, (words, chunks)  # the answer sits in one chunk
    return chunks.pop()


@pytest.fixture(scope="module")
def rag_server(tiny_engine, retrieval):
    app = create_app(tiny_engine, ServeConfig(max_tokens=64, default_max_tokens=8), retrieval=retrieval)
    with running(app) as url:
        yield url, app


def test_retrieval_prompt_is_passages_a_blank_line_then_the_question(retrieval):
    hits = retrieval.index.search(ASKED[0][0], 2)
    p1, p2 = hits[0].passage, hits[1].passage
    prompt = retrieval_prompt("Can money be cast?", hits)
    assert prompt == f"Passages:\n[1] {p1.citation} {p1.text}\n[2] {p2.citation} {p2.text}\n\nQuestion: Can money be cast?"
    assert retrieval_prompt("Anything?", []) == "Anything?"  # no passage: the closed-book prompt, as it was
    # A word budget that the first passage fills: the second is not shown, so it is not cited either.
    cut = retrieval_prompt("q", hits, max_words=len(p1.text.split()))
    assert "[2]" not in cut and shown(hits, cut) == hits[:1] and shown(hits, prompt) == hits
    short = Retrieval(retrieval.index, k=2, max_words=10).question(ASKED[0][0])
    head = f"Passages:\n[1] {short.hits[0].passage.citation} "
    assert len(short.hits) == 1 and short.text.startswith(head)
    assert len(short.text.removeprefix(head).split("\n\nQuestion:")[0].split()) == 10


def test_questions_get_a_citation_of_the_chunk_that_answers_them(rag_server, retrieval):
    url, app = rag_server
    client = openai.OpenAI(base_url=url, api_key="unused")
    top = 0
    for question, words in ASKED:
        r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": question}], max_tokens=4)
        cites = r.model_extra["citations"]
        want = answer_chunk(retrieval, words)
        assert want in [c["chunk_id"] for c in cites], (question, cites)
        top += cites[0]["chunk_id"] == want
        c = cites[0]
        assert c["document"] in PAGES and c["section"] and c["passage_id"].startswith(c["chunk_id"] + "-p")
        assert c["score"] > 0 and c["rank"] == 1 and c["citation"] == f"[{c['document']} § {c['section']}]"
        info = r.model_extra["slmforge"]["retrieval"]
        assert info["k"] == 2 and info["passages"] == len(cites) and 0 < info["ms"] < 1000
    assert top == len(ASKED)  # and BM25 ranks it first for every one of these

    # The same question with retrieval turned off: no citations, a much shorter prompt.
    question = [{"role": "user", "content": ASKED[0][0]}]
    on = client.chat.completions.create(model="x", messages=question, max_tokens=2)
    off = client.chat.completions.create(model="x", messages=question, max_tokens=2, extra_body={"retrieval": False})
    assert "citations" not in off.model_extra and "retrieval" not in off.model_extra["slmforge"]
    assert on.usage.prompt_tokens > off.usage.prompt_tokens + 100
    metrics = httpx.get(url.removesuffix("/v1") + "/metrics").text
    assert f"slmforge_retrieval_seconds_count {len(ASKED) + 1}.0" in metrics


def test_streaming_ends_with_the_citations(rag_server):
    url, _ = rag_server
    client = openai.OpenAI(base_url=url, api_key="unused")
    question = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": ASKED[1][0]}]
    plain = client.chat.completions.create(model="x", messages=question, max_tokens=8)
    chunks = list(client.chat.completions.create(model="x", messages=question, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    assert final.model_extra["citations"] == plain.model_extra["citations"] and plain.model_extra["citations"]
    assert all("citations" not in c.model_extra for c in chunks if c is not final)
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens  # the streamed prompt held the same passages
    off = list(client.chat.completions.create(model="x", messages=question, max_tokens=8, stream=True, extra_body={"retrieval": False}))
    assert not any("citations" in c.model_extra for c in off)


def test_passages_are_cut_to_fit_the_model_context(rag_server, tiny_engine, monkeypatch):
    url, _ = rag_server
    client = openai.OpenAI(base_url=url, api_key="unused")
    question = [{"role": "user", "content": ASKED[4][0]}]
    full = client.chat.completions.create(model="x", messages=question, max_tokens=4)
    bare = client.chat.completions.create(model="x", messages=question, max_tokens=4, extra_body={"retrieval": False})
    assert len(full.model_extra["citations"]) == 2
    limit = bare.usage.prompt_tokens + 4 + 120  # room for about half of one passage
    monkeypatch.setattr(tiny_engine, "max_context", limit)
    cut = client.chat.completions.create(model="x", messages=question, max_tokens=4)
    assert cut.model_extra["citations"] and bare.usage.prompt_tokens < cut.usage.prompt_tokens <= limit - 4
    assert cut.model_extra["citations"][0] == full.model_extra["citations"][0]
    monkeypatch.setattr(tiny_engine, "max_context", bare.usage.prompt_tokens + 4 + 5)  # no passage fits at all
    none = client.chat.completions.create(model="x", messages=question, max_tokens=4)
    assert "citations" not in none.model_extra and none.usage.prompt_tokens == bare.usage.prompt_tokens


def test_completions_take_passages_only_when_asked(rag_server, tiny_engine):
    url, _ = rag_server
    client = openai.OpenAI(base_url=url, api_key="unused")
    prompt = f"Question: {ASKED[2][0]}\nAnswer:"
    plain = client.completions.create(model="x", prompt=prompt, max_tokens=2)
    assert "citations" not in plain.model_extra
    asked = client.completions.create(model="x", prompt=prompt, max_tokens=2, extra_body={"retrieval": True})
    assert asked.model_extra["citations"] and asked.usage.prompt_tokens > plain.usage.prompt_tokens + 100
    # A server without an index says so when a request asks for retrieval.
    with running(create_app(tiny_engine, ServeConfig())) as bare:
        r = httpx.post(f"{bare}/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "retrieval": True})
        assert r.status_code == 400 and "no retrieval index" in r.json()["error"]["message"]
        ok = httpx.post(f"{bare}/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert ok.status_code == 200 and "citations" not in ok.json()


class Recording:
    """A real engine that keeps the requests it was asked (to see what the fallback received)."""

    def __init__(self, engine):
        self.engine, self.name, self.seen = engine, engine.name, []

    def __getattr__(self, attr):
        return getattr(self.engine, attr)

    async def complete(self, req):
        self.seen.append(req.messages)
        return await self.engine.complete(req)

    async def stream(self, req):
        self.seen.append(req.messages)
        async for item in self.engine.stream(req):
            yield item


def test_the_fallback_receives_the_same_passages(tiny_engine, unsure_engine, retrieval):
    fallback_engine = Recording(tiny_engine)
    with running(create_app(fallback_engine, ServeConfig(), model_name="fallback-large")) as fb_url:
        routing = RoutingConfig(fallback_url=fb_url, fallback_model="fallback-large", threshold=-3.0)
        app = create_app(unsure_engine, ServeConfig(routing=routing), fallback=OpenAILM(fb_url, "fallback-large"),
                         retrieval=retrieval)
        with running(app) as url:
            client = openai.OpenAI(base_url=url, api_key="unused")
            question = ASKED[3][0]
            r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": question}], max_tokens=4)
            assert r.model_extra["slmforge"]["route"] == "fallback"  # the random specialist is unsure of everything
            hits = retrieval.index.search(question, 2)
            assert fallback_engine.seen[-1][-1] == {"role": "user", "content": retrieval_prompt(question, hits, 240)}
            assert [c["passage_id"] for c in r.model_extra["citations"]] == [h.passage.id for h in hits]
            streamed = list(client.chat.completions.create(model="x", messages=[{"role": "user", "content": question}],
                                                           max_tokens=4, stream=True))
            assert fallback_engine.seen[-1][-1]["content"] == retrieval_prompt(question, hits, 240)
            assert streamed[-1].model_extra["citations"] == r.model_extra["citations"]


@pytest.mark.slow
def test_json_schema_output_is_valid_with_retrieval_on(real_engine, retrieval):
    app = create_app(real_engine, ServeConfig(max_tokens=64, default_max_tokens=32), retrieval=retrieval)
    with running(app) as url:
        client = openai.OpenAI(base_url=url, api_key="unused")
        fmt = {"type": "json_schema", "json_schema": {"name": "server", "schema": SERVER_SCHEMA, "strict": True}}
        msg = [{"role": "user", "content": "Which index types does PostgreSQL provide? Give one name and a port as JSON."}]
        r = client.chat.completions.create(model="x", messages=msg, max_tokens=40, response_format=fmt)
        data = json.loads(r.choices[0].message.content)
        jsonschema.validate(data, SERVER_SCHEMA)
        assert r.model_extra["slmforge"]["schema_valid"] is True and r.model_extra["citations"]
        streamed = list(client.chat.completions.create(model="x", messages=msg, max_tokens=40, response_format=fmt, stream=True))
        assert json.loads("".join(c.choices[0].delta.content or "" for c in streamed if c.choices)) == data
        assert streamed[-1].model_extra["citations"] == r.model_extra["citations"]


def test_serve_retrieval_auto_true_false_from_the_recipe(demo_run, tmp_path):
    from fastapi.testclient import TestClient

    recipe_file, run = demo_run
    model = str(tiny_model_folder(tmp_path / "tiny"))
    question = {"max_tokens": 2, "messages": [{"role": "user", "content": ASKED[0][0]}]}

    def app(*overrides):
        return build_app(load_recipe(recipe_file, overrides=[f"serve.model={model}", *overrides]))

    served = app("serve.retrieval_k=1")  # auto: the run has an index, so retrieval is on
    assert served.state.retrieval.k == 1 and served.state.retrieval.max_words == 120  # 1 x index.passage_words
    with TestClient(served) as client:
        body = client.post("/v1/chat/completions", json=question).json()
    assert len(body["citations"]) == 1 and body["citations"][0]["document"] == "datatype-money.html"
    assert app("serve.retrieval=false").state.retrieval is None
    assert app("serve.retrieval=true").state.retrieval.k == 2  # index.k
    with pytest.raises(ServeError, match="no retrieval index"):
        app("serve.retrieval=true", f"run_dir={tmp_path / 'empty'}")
    assert app(f"run_dir={tmp_path / 'empty'}").state.retrieval is None  # auto without an index: off
