"""Concurrent load on `slmforge serve`'s in-process transformers engine: 1, 8 and 32 clients streaming chat answers at
once (each client sends its requests one after another), on 127.0.0.1; server and clients are two processes.
Reports aggregate generated tokens/s, p50/p95 request latency (to the last byte) and errors per level.

    .venv/bin/python bench/serve.py                    # SmolLM2-135M-Instruct (the default model)
    .venv/bin/python bench/serve.py --model tiny       # a random 2-layer Llama (the server's own overhead shows)
    PYTHONPATH=/path/to/older/checkout .venv/bin/python bench/serve.py   # the same load on another version
Ends with one line: RESULT {json}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("SLMFORGE_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(*args: str, script: str = __file__) -> tuple[str, subprocess.Popen]:
    """Start `script` (this one by default) as a server process; return its /v1 URL once /health answers."""
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, script, *args, "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return f"{url}/v1", proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"server {args} did not start")
        time.sleep(0.2)


def run_server(args) -> None:
    import uvicorn

    from slmforge.models import load_causal_lm, load_tokenizer
    from slmforge.recipe import ServeConfig
    from slmforge.serve.app import create_app

    try:
        from slmforge.lm.hf import TransformersLM as Engine
    except ImportError:  # a checkout from before slmforge.lm
        from slmforge.serve.engines import LocalEngine as Engine

    model, tok = tiny_model() if args.model == "tiny" else (load_causal_lm(args.model), load_tokenizer(args.model))
    app = create_app(Engine(model, tok, "bench"), ServeConfig(max_tokens=4096))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


def tiny_model():
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from slmforge.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("default"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=len(tok), tie_word_embeddings=True,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    return model.eval(), tok


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] if s else float("nan")


async def level(url: str, clients: int, per_client: int, max_tokens: int) -> dict:
    """`clients` concurrent clients, each streaming `per_client` requests in a row."""
    import httpx

    latencies: list[float] = []
    tokens, errors = 0, []

    async def client_loop(c: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens
        for i in range(per_client):
            body = {"model": "x", "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True},
                    "temperature": 0, "messages": [{"role": "user", "content": f"Client {c}, question {i}: what does VACUUM reclaim?"}]}
            t = time.perf_counter()
            try:
                async with http.stream("POST", f"{url}/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        errors.append(f"HTTP {r.status_code}")
                        await r.aread()
                        continue
                    usage = None
                    async for line in r.aiter_lines():
                        if line.startswith("data:") and '"usage"' in line and line[5:].strip() != "[DONE]":
                            data = json.loads(line[5:])
                            usage = data.get("usage") or usage
                            if "error" in data:
                                errors.append(data["error"].get("message", "error"))
                    tokens += (usage or {}).get("completion_tokens", 0)
                latencies.append(time.perf_counter() - t)
            except httpx.HTTPError as err:
                errors.append(f"{type(err).__name__}: {err}")

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=900, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(c, http) for c in range(clients)))
        wall = time.perf_counter() - started
    return {"clients": clients, "requests": clients * per_client, "errors": len(errors), "error_examples": errors[:3],
            "completion_tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 2),
            "p50_s": round(pct(latencies, 0.5), 3), "p95_s": round(pct(latencies, 0.95), 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default", help="'tiny' (random 2-layer Llama) or any slmforge model spec")
    ap.add_argument("--clients", default="1,8,32", help="concurrency levels")
    ap.add_argument("--requests", type=int, default=16, help="requests per level (split over its clients, at least 1 each)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--role", default="client", choices=["client", "server"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "server":
        return run_server(args)

    url, server = spawn("--role", "server", "--model", args.model)
    try:
        asyncio.run(level(url, 2, 1, args.max_tokens))  # warm-up: first-call costs off the books
        levels = []
        for clients in (int(c) for c in args.clients.split(",")):
            levels.append(asyncio.run(level(url, clients, max(1, args.requests // clients), args.max_tokens)))
            print(json.dumps(levels[-1]), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    by = {lv["clients"]: lv for lv in levels}
    print(f"{'clients':>8}{'requests':>10}{'tok/s':>10}{'p50 s':>10}{'p95 s':>10}{'errors':>8}")
    for lv in levels:
        print(f"{lv['clients']:>8}{lv['requests']:>10}{lv['tokens_per_s']:>10}{lv['p50_s']:>10}{lv['p95_s']:>10}{lv['errors']:>8}")
    result = {"model": args.model, "max_tokens": args.max_tokens, "stream": True, "levels": levels,
              "speedup_8_vs_1": round(by[8]["tokens_per_s"] / by[1]["tokens_per_s"], 2) if 1 in by and 8 in by else None,
              "pythonpath": os.environ.get("PYTHONPATH", "")}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
