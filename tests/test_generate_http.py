"""The OpenAI-compatible teacher against a real local server (FastAPI + transformers, the real default model).

The server injects faults on ~30% of attempts (HTTP 500, a hang past the client timeout, malformed JSON), chosen by
a hash of (request body, attempt number) so the schedule does not depend on the order requests arrive in.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from slmforge.generate import make_items, make_teacher
from slmforge.recipe import GenerateConfig
from slmforge.records import Chunk
from slmforge.run import read_jsonl

from conftest import demo_curate

ROOT = Path(__file__).resolve().parents[1]
CLIENT_TIMEOUT = 8.0  # generous: 2 shared CPU cores, requests queue behind one model


class Server:
    """Chat completions from the real SmolLM2-135M-Instruct, with request counting and fault injection."""

    def __init__(self):
        import torch

        from slmforge.models import load_causal_lm, load_tokenizer

        self.tok = load_tokenizer("default")
        self.model = load_causal_lm("default", device="cpu").eval()
        # one thread: on 2 cores shared with pytest and other jobs, OpenMP barriers in 2 threads stall badly
        torch.set_num_threads(1)
        self.lock = threading.Lock()
        self.fault_rate = 0.0
        self.salt = 0  # a new salt draws a new fault schedule
        self.log: list = []
        self.received = 0  # every HTTP attempt that reached the server
        self.attempts: Counter = Counter()
        self.faults: Counter = Counter()
        self.auth: set[str] = set()
        app = FastAPI()

        def generate(messages, max_tokens):
            prompt = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            enc = self.tok(prompt, return_tensors="pt", add_special_tokens=False)
            with self.lock, torch.inference_mode():
                out = self.model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, temperature=None, top_p=None,
                                          top_k=None, pad_token_id=self.tok.pad_token_id)
            return self.tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            raw = await request.body()
            self.received += 1
            self.auth.add(request.headers.get("authorization", ""))
            body = json.loads(raw)
            key = hashlib.sha256(raw).hexdigest()
            self.attempts[key] += 1
            roll = int(hashlib.sha256(f"{self.salt}:{key}:{self.attempts[key]}".encode()).hexdigest(), 16) % 1000 / 1000
            self.log.append((key[:8], self.attempts[key], round(roll, 3)))
            if roll < self.fault_rate:
                fault = ("500", "timeout", "malformed")[int(roll / self.fault_rate * 3)]
                self.faults[fault] += 1
                if fault == "500":
                    return JSONResponse({"error": "injected"}, status_code=500)
                if fault == "timeout":
                    await asyncio.sleep(CLIENT_TIMEOUT + 1)
                    return JSONResponse({"error": "too late"}, status_code=500)
                return Response('{"choices": [{"message": {"content": "cut', media_type="application/json")
            text = await asyncio.to_thread(generate, body["messages"], int(body.get("max_tokens", 16)))
            return {"id": "x", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}]}

        self.app = app
        generate([{"role": "user", "content": "warm up"}], 2)  # the first generate() is slow; keep it out of timeouts


@pytest.fixture(scope="module")
def server():
    import torch
    import uvicorn

    threads = torch.get_num_threads()  # Server sets 1 thread process-wide; give the rest of the suite its threads back
    srv = Server()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(srv.app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started and time.time() < deadline:
        time.sleep(0.05)
    assert uv.started, "test server did not start"
    srv.url = f"http://127.0.0.1:{port}/v1"
    yield srv
    uv.should_exit = True
    thread.join(timeout=10)
    torch.set_num_threads(threads)


def _cfg(url: str, retries: int) -> GenerateConfig:
    return GenerateConfig(extractive=False, max_chunks=0, max_passage_words=40, kinds=["qa", "summary"],
                          teacher={"backend": "openai", "base_url": url, "model": "smollm2-135m", "concurrency": 2,
                                   "timeout_s": CLIENT_TIMEOUT, "max_retries": retries, "backoff_s": 0.05,
                                   "max_new_tokens": 4, "api_key": "sk-test-key"})


def _outcomes(items, rejected) -> Counter:
    """(chunk, kind) -> how many times it ended (as an item or as a rejected/failed row)."""
    ends = Counter((i.chunk_id, i.kind) for i in items)
    ends.update((r["chunk_id"], r["kind"]) for r in rejected)
    return ends


@pytest.mark.slow
def test_openai_teacher_with_faults_lists_failures_and_resumes_from_cache(server, tmp_path):
    chunks = read_jsonl(demo_curate() / "train.jsonl", Chunk)[:8]
    units = {(c.id, k) for c in chunks for k in ("qa", "summary")}

    # 1. no retries, ~30% of attempts fail: each unit ends exactly once, failures are listed as teacher errors
    server.fault_rate, server.received = 0.3, 0
    teacher = make_teacher(_cfg(server.url, retries=0), "default")
    assert "sk-test-key" not in repr(teacher) + json.dumps(teacher.identity())
    items, rejected = make_items(chunks, ["qa", "summary"], _cfg(server.url, 0), teacher=teacher, cache_dir=tmp_path, seed=0)
    ends = _outcomes(items, rejected)
    assert set(ends) == units and set(ends.values()) == {1}, "every unit ends once: produced or listed as failed"
    failed = [r for r in rejected if r["reason"] == "teacher_error"]
    assert 0 < len(failed) < len(units) and server.received == len(units)
    assert sum(server.faults.values()) == len(failed) and len(server.faults) >= 2  # several fault kinds were hit
    assert server.auth == {"Bearer sk-test-key"}
    first = {(r["chunk_id"], r["kind"]) for r in failed}

    # 2. rerun with a healthy server: only the failed requests reach it; the rest come from the cache
    server.fault_rate, server.received = 0.0, 0
    items2, rejected2 = make_items(chunks, ["qa", "summary"], _cfg(server.url, 0), teacher=teacher, cache_dir=tmp_path, seed=0)
    assert server.received == len(first)
    ends2 = _outcomes(items2, rejected2)
    assert set(ends2) == units and set(ends2.values()) == {1}
    assert not any(r["reason"] == "teacher_error" for r in rejected2)
    assert len({i.id for i in items2}) == len(items2)

    # 3. with retries and backoff the same faults heal within one run (fresh cache)
    server.fault_rate, server.received = 0.3, 0
    server.faults.clear()
    server.attempts.clear()
    server.salt = 1
    retry = make_teacher(_cfg(server.url, retries=4), "default")
    items3, rejected3 = make_items(chunks, ["qa", "summary"], _cfg(server.url, 4), teacher=retry, cache_dir=tmp_path / "fresh", seed=0)
    assert not [r for r in rejected3 if r["reason"] == "teacher_error"], (server.faults, server.log)
    assert server.received == len(units) + sum(server.faults.values()) > len(units)
    assert set(_outcomes(items3, rejected3)) == units
    server.fault_rate = 0.0
