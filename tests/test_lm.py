"""slmforge.lm: one model-calling layer. Its outputs equal the code paths it replaced (recorded from them on the default
model in tests/data/lm_golden.json), concurrent serving requests are decoded together yet answered as if alone, the
queue is bounded, streams come token by token and stop when the client goes away, and a model is known by its weights."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from slmforge.lm import Request, weights_hash
from slmforge.lm.hf import TransformersLM

GOLDEN = json.loads((Path(__file__).parent / "data" / "lm_golden.json").read_text())
PROMPTS = ["What does VACUUM reclaim in PostgreSQL?", "Name one index type."]  # as recorded


@pytest.fixture(scope="module")
def lm():
    return TransformersLM.load("default", name="smollm2", batch_hint=8)


def chat(p: str, **kw) -> Request:
    return Request(messages=[{"role": "user", "content": p}], **kw)


@pytest.mark.slow
def test_teacher_replay_and_export_outputs_equal_the_old_code_paths(lm):
    from slmforge.export import gguf
    from slmforge.generate import teacher_request
    from slmforge.train import mixture

    reqs = [{"messages": [{"role": "user", "content": p}], "max_tokens": 24, "temperature": 0.0, "seed": 0} for p in PROMPTS]
    assert [r.text.strip() for r in lm.generate([teacher_request(r) for r in reqs])] == GOLDEN["teacher_greedy"]
    sampled = [teacher_request(dict(r, temperature=0.8, seed=3)) for r in reqs]
    assert [r.text.strip() for r in lm.generate(sampled)] == GOLDEN["teacher_sampled"]
    loaded = {"lm": lm}
    assert mixture._generate(loaded, "", PROMPTS, 24, 0.8, 5) == GOLDEN["replay_sampled"]
    assert mixture._generate(loaded, "", PROMPTS, 24, 0.0, 5) == GOLDEN["replay_greedy"]
    ids = gguf.chat_inputs(lm.tok, PROMPTS)
    assert ids == GOLDEN["export_ids"]
    assert gguf.greedy(lm.model, ids, 12) == GOLDEN["export_greedy"]


def test_serving_answers_equal_the_old_engine(lm):
    async def main():
        reqs = [chat(p, max_tokens=16) for p in PROMPTS] + [chat(PROMPTS[0], max_tokens=24, stop=["."])]
        return await asyncio.gather(*(lm.complete(r) for r in reqs))

    for got, old in zip(asyncio.run(main()), GOLDEN["serve_greedy"]):
        assert (got.text, got.tokens, got.finish_reason) == (old["text"], old["tokens"], old["finish"])
        assert got.logprobs == pytest.approx(old["logprobs"], abs=1e-3)


@pytest.mark.slow
def test_concurrent_requests_are_batched_and_answered_as_if_alone(lm):
    prompts = ["What is a tablespace?", "Explain MVCC in one sentence.", "Name a PostgreSQL data type.",
               "What does EXPLAIN ANALYZE show about a query plan?", "Hi", "Why run VACUUM?"]
    reqs = [chat(p, max_tokens=4 + 3 * i, stop=["\n\n"] if i == 2 else []) for i, p in enumerate(prompts)]
    reqs.append(chat(prompts[0], max_tokens=10, temperature=0.9, seed=11))
    reqs.append(chat(prompts[0], max_tokens=10, temperature=0.9, seed=11))  # same seed, own generator: same sample

    async def together():
        return await asyncio.gather(*(lm.complete(r) for r in reqs))

    async def alone():
        return [await lm.complete(r) for r in reqs]

    sched = lm.scheduler
    steps0 = sched.steps
    batched = asyncio.run(together())
    together_steps = sched.steps - steps0
    single = asyncio.run(alone())
    assert sched.peak_batch >= 4  # they were decoded in one batch ...
    assert together_steps < sum(r.completion_tokens for r in batched) / 2  # ... sharing decode steps
    for b, s, r in zip(batched, single, reqs):  # ... and each answer is its own
        assert b.text == s.text and b.token_ids == s.token_ids and len(b.token_ids) <= r.max_tokens, r
    assert batched[-1].text == batched[-2].text
    assert len({b.text for b in batched[:6]}) == 6


def test_stream_is_token_by_token_and_stops_when_the_client_leaves(lm):
    req = chat("Write a long story about a database.", max_tokens=200)

    async def main():
        stamps, deltas = [], []
        start = time.perf_counter()
        gen = lm.stream(req)
        async for item in gen:
            if isinstance(item, str):
                deltas.append(item)
                stamps.append(time.perf_counter() - start)
            if len(deltas) == 5:
                break
        await gen.aclose()  # what the server does when the client disconnects
        steps = lm.scheduler.steps
        await asyncio.sleep(0.5)
        return deltas, stamps, lm.scheduler.steps - steps

    deltas, stamps, later_steps = asyncio.run(main())
    assert len(deltas) == 5 and all(deltas) and stamps[0] < stamps[-1]
    assert later_steps <= 1 and not lm.scheduler.active  # the row left the batch; no more decoding for it


def test_a_full_queue_answers_503_with_retry_after(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slmforge.recipe import ServeConfig
    from slmforge.serve.app import create_app
    from test_export import tiny_model_folder
    from test_serve import running

    folder = tiny_model_folder(tmp_path / "tiny")
    lm = TransformersLM(AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), "tiny",
                        max_batch=1, max_queue=1)
    real_step = lm.scheduler._step
    lm.scheduler._step = lambda: (time.sleep(0.02), real_step())  # slow decoding: requests pile up
    body = {"model": "x", "max_tokens": 30, "messages": [{"role": "user", "content": "Name an index type."}]}
    with running(create_app(lm, ServeConfig())) as url:
        async def main():
            async with httpx.AsyncClient(timeout=60) as client:
                first = asyncio.create_task(client.post(f"{url}/chat/completions", json=body))  # runs
                await asyncio.sleep(0.3)
                second = asyncio.create_task(client.post(f"{url}/chat/completions", json=body))  # waits
                await asyncio.sleep(0.3)
                full = await client.post(f"{url}/chat/completions", json=body)
                full_stream = await client.post(f"{url}/chat/completions", json={**body, "stream": True})
                return await first, await second, full, full_stream

        first, second, full, full_stream = asyncio.run(main())
    assert first.status_code == second.status_code == 200
    for r in (full, full_stream):
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full" and "serve.max_queue" in r.json()["error"]["message"]


def test_identity_is_the_weights_content_not_the_path(tmp_path, lm):
    from safetensors.torch import save_file
    import torch

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file({"w": torch.zeros(4)}, folder / "model.safetensors")
    before = weights_hash(folder)
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    assert weights_hash(moved) == before  # same weights elsewhere: same identity
    save_file({"w": torch.ones(4)}, folder / "model.safetensors")  # new weights at the same path
    assert weights_hash(folder) != before
    ident = json.dumps(lm.identity())
    assert lm.path not in ident and len(lm.identity()["weights"]) == 64


def test_http_client_retries_transient_failures_and_keeps_the_key_to_itself():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response

    from slmforge.lm import LMError
    from slmforge.lm.http import OpenAILM
    from test_serve import running

    seen = []
    script = {"flaky": ["500", "malformed", "ok"], "bad": ["400"]}

    async def chat(request):
        body = await request.json()
        kind = body["messages"][0]["content"]
        seen.append((kind, request.headers.get("authorization")))
        step = script[kind][min(len(script[kind]) - 1, sum(k == kind for k, _ in seen) - 1)]
        if step == "500":
            return JSONResponse({"error": "injected"}, status_code=500)
        if step == "400":
            return JSONResponse({"error": "bad request"}, status_code=400)
        if step == "malformed":
            return Response('{"choices": [{"message": {"content": "cut', media_type="application/json")
        return JSONResponse({"model": "m", "choices": [{"message": {"content": "fine"}, "finish_reason": "stop"}]})

    app = Starlette()
    app.add_route("/v1/chat/completions", chat, methods=["POST"])

    with running(app) as url:
        lm = OpenAILM(url, "m", "sk-SECRET-42", max_retries=3, backoff_s=0.01)
        flaky, bad = lm.generate([Request(messages=[{"role": "user", "content": k}]) for k in ("flaky", "bad")])
        assert flaky.text == "fine" and sum(k == "flaky" for k, _ in seen) == 3  # 500, malformed, then the answer
        assert isinstance(bad, LMError) and bad.status == 400 and sum(k == "bad" for k, _ in seen) == 1  # not retried
        seen.clear()
        once = OpenAILM(url, "m", "sk-SECRET-42", max_retries=1, backoff_s=0.01).generate(
            [Request(messages=[{"role": "user", "content": "flaky"}])])[0]
        assert isinstance(once, LMError) and once.status == 502 and "after 2 attempts" in once.message
    assert {auth for _, auth in seen} == {"Bearer sk-SECRET-42"}
    assert "SECRET" not in repr(lm) + repr(lm.client) + json.dumps(lm.identity()) + bad.message + once.message
