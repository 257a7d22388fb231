"""`slmforge serve`: real uvicorn servers on 127.0.0.1 answering the official `openai` client; auth, limits, 4xx;
guided JSON; small-first routing to a second real server; a 50-client load test; router mode over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import httpx
import jsonschema
import openai
import pytest

from slmforge.recipe import RoutingConfig, ServeConfig
from slmforge.serve.app import create_app
from slmforge.lm.hf import TransformersLM
from slmforge.lm.http import OpenAILM
from slmforge.serve.protocol import GenRequest, Generation
from slmforge.serve.router import Router
from slmforge.serve.metrics import Metrics
from test_export import tiny_model_folder

KEY = "sk-test-0123456789"
HELLO = [{"role": "user", "content": "Name one PostgreSQL index type."}]


@contextlib.contextmanager
def running(app):
    """A real uvicorn server on a free 127.0.0.1 port, in a thread; yields its /v1 base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_keep_alive=30))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_model_folder(tmp_path_factory.mktemp("serve") / "tiny")
    return TransformersLM(AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), "tiny-specialist")


@pytest.fixture(scope="module")
def unsure_engine(tmp_path_factory):
    """A stock random init: every next token is a near-uniform guess (mean log-prob about -ln(49152) = -10.8)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_model_folder(tmp_path_factory.mktemp("serve") / "unsure", seed=2, sharpen=False)
    return TransformersLM(AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), "unsure-specialist")


@pytest.fixture(scope="module")
def real_engine():
    from slmforge.models import load_causal_lm, load_tokenizer

    return TransformersLM(load_causal_lm("default"), load_tokenizer("default"), "smollm2-135m")


@pytest.fixture(scope="module")
def tiny_server(tiny_engine):
    cfg = ServeConfig(max_tokens=64, default_max_tokens=16, max_request_bytes=4096)
    app = create_app(tiny_engine, cfg, api_key=KEY)
    with running(app) as url:
        yield url, app


def test_openai_client_plain_streaming_completions_and_stop(tiny_server):
    url, _ = tiny_server
    client = openai.OpenAI(base_url=url, api_key=KEY)
    assert [m.id for m in client.models.list().data] == ["tiny-specialist"]

    plain = client.chat.completions.create(model="tiny-specialist", messages=HELLO, max_tokens=12, logprobs=True)
    text = plain.choices[0].message.content
    assert plain.model == "tiny-specialist" and plain.model_extra["slmforge"]["answered_by"] == "tiny-specialist"
    assert plain.usage.completion_tokens <= 12 and plain.usage.prompt_tokens > 5
    assert len(plain.choices[0].logprobs.content) == plain.usage.completion_tokens
    assert all(c.logprob <= 0 for c in plain.choices[0].logprobs.content)

    # Streaming gives the same greedy text, in several deltas, ending with a finish_reason.
    chunks = list(client.chat.completions.create(model="x", messages=HELLO, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == text and len(deltas) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens

    # A stop sequence taken from the middle of the greedy answer cuts it there, streamed or not.
    assert len(text) > 6, text
    stop = text[3:6]
    cut = client.chat.completions.create(model="x", messages=HELLO, max_tokens=12, stop=[stop]).choices[0]
    assert cut.message.content == text[: text.find(stop)] and cut.finish_reason == "stop"
    streamed = client.chat.completions.create(model="x", messages=HELLO, max_tokens=12, stop=[stop], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut.message.content

    # Plain completions, with and without streaming.
    comp = client.completions.create(model="x", prompt="SELECT * FROM", max_tokens=6, logprobs=0)
    assert comp.choices[0].text and len(comp.choices[0].logprobs.token_logprobs) == comp.usage.completion_tokens
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="x", prompt="SELECT * FROM", max_tokens=6, stream=True))
    assert streamed == comp.choices[0].text


def test_auth_rejects_bad_or_missing_key(tiny_server):
    url, _ = tiny_server
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="sk-wrong").chat.completions.create(model="x", messages=HELLO, max_tokens=2)
    r = httpx.post(f"{url}/chat/completions", json={"messages": HELLO})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/models").status_code == 401
    assert httpx.get(url.removesuffix("/v1") + "/health").json()["status"] == "ok"  # health needs no key


def test_with_a_key_every_route_but_health_needs_it_and_health_shows_no_urls(tiny_engine):
    fallback = OpenAILM("http://127.0.0.1:9/v1", "big-model", name="big-model")
    app = create_app(tiny_engine, ServeConfig(), fallback=fallback, api_key=KEY)
    with running(app) as url:
        root = url.removesuffix("/v1")
        for path in ("/metrics", "/openapi.json", "/v1/models", "/docs", "/no-such-route"):
            r = httpx.get(root + path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
            assert httpx.get(root + path, headers={"Authorization": "Bearer sk-wrong"}).status_code == 401, path
        authed = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(root + "/metrics", headers=authed).status_code == 200
        assert httpx.get(root + "/openapi.json", headers=authed).status_code == 200
        assert httpx.post(f"{url}/chat/completions", json={"model": "x", "messages": HELLO}).status_code == 401
        health = httpx.get(root + "/health")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        assert "127.0.0.1" not in health.text and "http" not in health.text


def test_oversize_and_malformed_requests_get_4xx(tiny_server):
    url, _ = tiny_server
    h = {"Authorization": f"Bearer {KEY}"}

    def post(body, **kw):
        return httpx.post(f"{url}/chat/completions", headers={**h, **kw.pop("headers", {})}, **({"json": body} if body is not None else {}), **kw)

    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    assert post(big).status_code == 413
    chunked = httpx.post(f"{url}/chat/completions", headers=h, content=iter([json.dumps(big).encode()[i:i + 1000] for i in range(0, 5100, 1000)]))
    assert chunked.status_code == 413  # no Content-Length: counted while reading
    cases = {
        "not json": post(None, content=b"{not json", headers={"content-type": "application/json"}),
        "array body": post([1, 2]),
        "no messages": post({"model": "x"}),
        "empty messages": post({"messages": []}),
        "bad role": post({"messages": [{"role": "wizard", "content": "hi"}]}),
        "max_tokens over limit": post({"messages": HELLO, "max_tokens": 65}),
        "max_tokens zero": post({"messages": HELLO, "max_tokens": 0}),
        "temperature": post({"messages": HELLO, "temperature": 7}),
        "n=2": post({"messages": HELLO, "n": 2}),
        "bad schema": post({"messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "nope"}}}}),
        "image part": post({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
        "two prompts": httpx.post(f"{url}/completions", headers=h, json={"prompt": ["a", "b"]}),
    }
    for what, r in cases.items():
        assert r.status_code == 400, (what, r.status_code, r.text)
        assert r.json()["error"]["message"], what
    assert "messages" in cases["no messages"].json()["error"]["message"]
    assert "max_tokens" in cases["max_tokens over limit"].json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        openai.OpenAI(base_url=url, api_key=KEY).chat.completions.create(model="x", messages=HELLO, max_tokens=10_000)
    # The server is still fine afterwards.
    assert post({"messages": HELLO, "max_tokens": 2}).status_code == 200


SERVER_SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                                  "port": {"type": "integer", "minimum": 1, "maximum": 65535}},
                 "required": ["name", "port"], "additionalProperties": False}


@pytest.mark.slow
def test_json_schema_output_is_valid_with_the_real_model(real_engine):
    app = create_app(real_engine, ServeConfig(max_tokens=64, default_max_tokens=32))
    with running(app) as url:
        client = openai.OpenAI(base_url=url, api_key="unused")
        fmt = {"type": "json_schema", "json_schema": {"name": "server", "schema": SERVER_SCHEMA, "strict": True}}
        msg = [{"role": "user", "content": "Give the name and default port of the PostgreSQL server as JSON."}]
        r = client.chat.completions.create(model="x", messages=msg, max_tokens=40, response_format=fmt)
        data = json.loads(r.choices[0].message.content)
        jsonschema.validate(data, SERVER_SCHEMA)
        assert r.model_extra["slmforge"]["schema_valid"] is True
        streamed = client.chat.completions.create(model="x", messages=msg, max_tokens=40, response_format=fmt, stream=True)
        assert json.loads("".join(c.choices[0].delta.content or "" for c in streamed if c.choices)) == data
        metrics = httpx.get(url.removesuffix("/v1") + "/metrics").text
        assert 'slmforge_schema_checks_total{result="valid"} 2.0' in metrics
        assert "slmforge_schema_validity_rate 1.0" in metrics


@pytest.mark.slow
def test_small_first_routing_falls_back_when_unsure_and_stays_local_when_sure(tiny_engine, unsure_engine, real_engine):
    # The fallback is a second real server (another app instance) on its own port.
    fallback_app = create_app(tiny_engine, ServeConfig(), model_name="fallback-large")
    with running(fallback_app) as fb_url:
        routing = RoutingConfig(fallback_url=fb_url, fallback_model="fallback-large", threshold=-3.0)
        fallback = OpenAILM(fb_url, "fallback-large")

        # A random tiny model is unsure of everything (mean log-prob ~ -10): the fallback answers.
        unsure = create_app(unsure_engine, ServeConfig(routing=routing), fallback=fallback)
        with running(unsure) as url:
            client = openai.OpenAI(base_url=url, api_key="unused")
            r = client.chat.completions.create(model="x", messages=HELLO, max_tokens=6)
            route = r.model_extra["slmforge"]
            assert r.model == "fallback-large" and route["route"] == "fallback" and route["fallback_reason"] == "low_confidence"
            assert route["confidence"] < -3.0
            streamed = list(client.chat.completions.create(model="x", messages=HELLO, max_tokens=6, stream=True))
            deltas = [c.choices[0].delta.content for c in streamed if c.choices and c.choices[0].delta.content]
            assert "".join(deltas) == r.choices[0].message.content
            assert len(deltas) > 1  # the fallback's answer streams token by token, not as one block
            assert streamed[-1].model_extra["slmforge"]["route"] == "fallback"
            metrics = httpx.get(url.removesuffix("/v1") + "/metrics").text
            assert 'slmforge_fallbacks_total{reason="low_confidence"} 2.0' in metrics and "slmforge_fallback_rate 1.0" in metrics
            fb_metrics = httpx.get(fb_url.removesuffix("/v1") + "/metrics").text
            assert 'slmforge_requests_total{endpoint="chat",status="200"} 2.0' in fb_metrics  # it really went there

        # The real model on an easy question is sure of itself (mean log-prob ~ -0.3): it answers locally.
        sure = create_app(real_engine, ServeConfig(routing=routing), fallback=OpenAILM(fb_url, "fallback-large"))
        with running(sure) as url:
            r = openai.OpenAI(base_url=url, api_key="unused").chat.completions.create(
                model="x", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=8)
            route = r.model_extra["slmforge"]
            assert r.model == "smollm2-135m" and route["route"] == "specialist" and route["confidence"] > -3.0
            assert "Paris" in r.choices[0].message.content
            metrics = httpx.get(url.removesuffix("/v1") + "/metrics").text
            assert "slmforge_fallback_rate 0.0" in metrics and 'slmforge_answers_total{route="specialist"} 1.0' in metrics

            # Asking for the fallback by name goes straight there, streamed or not; /v1/models lists both names.
            client = openai.OpenAI(base_url=url, api_key="unused")
            assert [m.id for m in client.models.list()] == ["smollm2-135m", "fallback-large"]
            r = client.chat.completions.create(model="fallback-large", messages=HELLO, max_tokens=6)
            assert r.model == "fallback-large" and r.model_extra["slmforge"]["fallback_reason"] == "requested"
            streamed = list(client.chat.completions.create(model="fallback-large", messages=HELLO, max_tokens=6, stream=True))
            assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == r.choices[0].message.content
            assert 'slmforge_fallbacks_total{reason="requested"} 2.0' in httpx.get(url.removesuffix("/v1") + "/metrics").text


def test_unreachable_fallback_keeps_the_specialist_answer(unsure_engine):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"  # bound, never listening: connection refused
        routing = RoutingConfig(fallback_url=dead, threshold=-3.0)
        app = create_app(unsure_engine, ServeConfig(routing=routing), fallback=OpenAILM(dead, "gone", timeout_s=5))
        with running(app) as url:
            r = openai.OpenAI(base_url=url, api_key="unused").chat.completions.create(model="x", messages=HELLO, max_tokens=4)
            assert r.model == "unsure-specialist", r.model_extra
            assert "unreachable" in r.model_extra["slmforge"].get("fallback_error", ""), r.model_extra
            streamed = list(openai.OpenAI(base_url=url, api_key="unused").chat.completions.create(
                model="x", messages=HELLO, max_tokens=4, stream=True))
            assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == r.choices[0].message.content
            assert "unreachable" in streamed[-1].model_extra["slmforge"]["fallback_error"]
            assert "slmforge_fallback_errors_total 2.0" in httpx.get(url.removesuffix("/v1") + "/metrics").text


def test_invalid_schema_output_is_routed_to_the_fallback():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    router = Router(None, None, RoutingConfig(threshold=-5.0), Metrics())
    sure = [-0.1, -0.2]
    assert router.reason_to_fall_back(Generation('{"a": 1}', "m", logprobs=sure), GenRequest(schema=schema))[0] is None
    assert router.reason_to_fall_back(Generation('{"a": "x"}', "m", logprobs=sure), GenRequest(schema=schema))[0] == "invalid_schema"
    assert router.reason_to_fall_back(Generation('{"a": 1', "m", logprobs=sure), GenRequest(schema=schema))[0] == "invalid_schema"
    assert router.reason_to_fall_back(Generation("hi", "m", logprobs=[-9.0, -2.5]), GenRequest())[0] == "low_confidence"
    assert router.reason_to_fall_back(Generation("hi", "m", logprobs=None), GenRequest())[0] is None  # unknown confidence
    min_router = Router(None, None, RoutingConfig(threshold=-5.0, confidence="min_logprob"), Metrics())
    assert min_router.reason_to_fall_back(Generation("hi", "m", logprobs=[-6.0, -0.1, -0.1, -0.1]), GenRequest())[0] == "low_confidence"
    assert router.reason_to_fall_back(Generation("hi", "m", logprobs=[-6.0, -0.1, -0.1, -0.1]), GenRequest())[0] is None


def test_router_mode_in_front_of_an_openai_compatible_backend(tiny_server):
    backend_url, _ = tiny_server
    cfg = ServeConfig()
    app = create_app(OpenAILM(backend_url, "tiny-specialist", api_key=KEY, name="routed"), cfg)
    with running(app) as url:
        client = openai.OpenAI(base_url=url, api_key="unused")
        direct = openai.OpenAI(base_url=backend_url, api_key=KEY).chat.completions.create(model="x", messages=HELLO, max_tokens=8)
        via = client.chat.completions.create(model="x", messages=HELLO, max_tokens=8)
        assert via.choices[0].message.content == direct.choices[0].message.content
        assert via.model_extra["slmforge"]["confidence"] is not None  # log-probs came through from the backend
        streamed = client.chat.completions.create(model="x", messages=HELLO, max_tokens=8, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == direct.choices[0].message.content


def test_load_50_concurrent_clients(tiny_server):
    url, app = tiny_server

    async def one(i: int, client: openai.AsyncOpenAI) -> str:
        msg = [{"role": "user", "content": f"Question {i}: what does VACUUM do?"}]
        if i % 3 == 0:
            parts = [c.choices[0].delta.content or "" async for c in await client.chat.completions.create(
                model="x", messages=msg, max_tokens=8, stream=True) if c.choices]
            return "".join(parts)
        if i % 3 == 1:
            return (await client.completions.create(model="x", prompt=f"Query {i}:", max_tokens=8)).choices[0].text
        return (await client.chat.completions.create(model="x", messages=msg, max_tokens=8)).choices[0].message.content

    async def main():
        async with openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(one(i, client) for i in range(50)), return_exceptions=True)

    before = app.state.metrics.requests.labels("chat", "200")._value.get() + app.state.metrics.requests.labels("completion", "200")._value.get()
    started = time.time()
    results = asyncio.run(main())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert all(isinstance(r, str) for r in results)
    after = app.state.metrics.requests.labels("chat", "200")._value.get() + app.state.metrics.requests.labels("completion", "200")._value.get()
    assert after - before == 50
    assert time.time() - started < 120
    assert app.state.metrics.latency_quantile(0.95) >= app.state.metrics.latency_quantile(0.5) > 0
