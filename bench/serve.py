"""Concurrent load on `slmforge serve`'s in-process transformers engine: 1, 8 and 32 clients streaming chat answers at
once (each client sends its requests one after another), on 127.0.0.1; server and clients are two processes.
Reports aggregate generated tokens/s, p50/p95 request latency (to the last byte) and errors per level.

Retrieval (serve.retrieval) is measured on the demo's deployed index (examples/postgres: ingest -> curate -> index,
built once into --index-dir and reused): the search + prompt alone, in process, over the demo's 26 user questions;
then the same questions sent to the server one at a time, alternately with and without retrieval, giving the
server-side retrieval time and the per-request latency it adds (search + the longer prompt the model reads).
The load levels run with retrieval off, so they compare with older checkouts.

    .venv/bin/python bench/serve.py                    # SmolLM2-135M-Instruct (the default model)
    .venv/bin/python bench/serve.py --model tiny       # a random 2-layer Llama (the server's own overhead shows)
    .venv/bin/python bench/serve.py --no-retrieval     # the load levels only
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
import tempfile
import time
from pathlib import Path

os.environ.setdefault("SLMFORGE_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "postgres"


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
    extra = {"retrieval": demo_retrieval(args.serve_index)} if args.serve_index else {}
    app = create_app(Engine(model, tok, "bench"), ServeConfig(max_tokens=4096), **extra)
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


def demo_retrieval(run_dir: str):
    """The Retrieval `slmforge serve` would use on the demo: its index stage built (or reused) under `run_dir`."""
    from slmforge.curate.stage import CurateStage
    from slmforge.index.stage import IndexStage
    from slmforge.ingest.stage import IngestStage
    from slmforge.recipe import load_recipe
    from slmforge.run import RunDir
    from slmforge.serve.retrieval import open_retrieval

    recipe = load_recipe(DEMO / "recipe.yaml", overrides=[f"run_dir={run_dir}"])
    run = RunDir(recipe.run_path)
    for stage in (IngestStage(), CurateStage(), IndexStage()):  # each skipped when already done
        run.execute(stage, recipe)
    return open_retrieval(recipe)


def demo_questions() -> list[str]:
    return [json.loads(line)["question"] for line in (DEMO / "questions.jsonl").read_text().splitlines() if line.strip()]


def retrieval_alone(retrieval, questions: list[str], rounds: int) -> dict:
    """Search alone and search + prompt (what a request pays before the model), in ms, every question `rounds` times."""
    for q in questions:  # first calls (stemmer caches, page faults) off the books
        retrieval.question(q)
    search, whole = [], []
    for _ in range(rounds):
        for q in questions:
            t = time.perf_counter()
            retrieval.index.search(q, retrieval.k)
            search.append((time.perf_counter() - t) * 1000)
            whole.append(retrieval.question(q).ms)
    return {"passages": retrieval.size, "k": retrieval.k, "max_words": retrieval.max_words, "queries": len(whole),
            "search_ms_p50": round(pct(search, 0.5), 3), "search_ms_p95": round(pct(search, 0.95), 3),
            "retrieval_ms_p50": round(pct(whole, 0.5), 3), "retrieval_ms_p95": round(pct(whole, 0.95), 3),
            "retrieval_ms_max": round(max(whole), 3)}


async def retrieval_overhead(url: str, questions: list[str], rounds: int, max_tokens: int) -> dict:
    """One client, each question streamed with retrieval on then off: server-side retrieval ms (from the response)
    and the request latency retrieval adds (search, plus prefill of the passages)."""
    import httpx

    on, off, server_ms, prompt_on, prompt_off, errors = [], [], [], [], [], []
    async with httpx.AsyncClient(timeout=900) as http:
        warm = {"model": "x", "max_tokens": 1, "retrieval": True, "messages": [{"role": "user", "content": questions[0]}]}
        (await http.post(f"{url}/chat/completions", json=warm)).raise_for_status()  # the first search's setup off the books
        for _ in range(rounds):
            for q in questions:
                for use in (True, False):
                    body = {"model": "x", "max_tokens": max_tokens, "stream": True, "temperature": 0, "retrieval": use,
                            "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": q}]}
                    t = time.perf_counter()
                    async with http.stream("POST", f"{url}/chat/completions", json=body) as r:
                        if r.status_code != 200:
                            errors.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                            continue
                        async for line in r.aiter_lines():
                            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                                continue
                            data = json.loads(line[5:])
                            if "retrieval" in (data.get("slmforge") or {}):
                                server_ms.append(data["slmforge"]["retrieval"]["ms"])
                            if data.get("usage"):
                                (prompt_on if use else prompt_off).append(data["usage"]["prompt_tokens"])
                    (on if use else off).append(time.perf_counter() - t)
    p50_on, p50_off = pct(on, 0.5), pct(off, 0.5)
    return {"requests": len(on) + len(off), "errors": len(errors), "error_examples": errors[:3],
            "server_retrieval_ms_p50": round(pct(server_ms, 0.5), 3), "server_retrieval_ms_p95": round(pct(server_ms, 0.95), 3),
            "request_p50_s_on": round(p50_on, 3), "request_p50_s_off": round(p50_off, 3),
            "overhead_ms_p50": round((p50_on - p50_off) * 1000, 1),
            "overhead_ms_p50_paired": round(pct([a - b for a, b in zip(on, off)], 0.5) * 1000, 1),
            "prompt_tokens_mean_on": round(sum(prompt_on) / max(1, len(prompt_on)), 1),
            "prompt_tokens_mean_off": round(sum(prompt_off) / max(1, len(prompt_off)), 1)}


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
                    "temperature": 0, "messages": [{"role": "user", "content": f"Client {c}, question {i}: what does VACUUM reclaim?"}],
                    "retrieval": False}  # the load levels measure the model and server, as on checkouts without retrieval
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
    ap.add_argument("--no-retrieval", action="store_true", help="skip the retrieval measurements (older checkouts: automatic)")
    ap.add_argument("--index-dir", default=str(Path(tempfile.gettempdir()) / "slmforge-bench-serve-index"),
                    help="run_dir the demo's index is built in (reused when it is already there)")
    ap.add_argument("--retrieval-rounds", type=int, default=20, help="times each demo question is searched in process")
    ap.add_argument("--overhead-rounds", type=int, default=1, help="times each demo question is sent with and without retrieval")
    ap.add_argument("--role", default="client", choices=["client", "server"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--serve-index", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "server":
        return run_server(args)

    retrieval = None
    if not args.no_retrieval:
        try:
            import slmforge.serve.retrieval  # noqa: F401
        except ImportError:
            print("this checkout serves no retrieval: retrieval not measured", flush=True)
            args.no_retrieval = True
    if not args.no_retrieval:
        alone = retrieval_alone(demo_retrieval(args.index_dir), demo_questions(), args.retrieval_rounds)
        retrieval = {"alone": alone}
        print(json.dumps({"retrieval_alone": alone}), flush=True)
    url, server = spawn("--role", "server", "--model", args.model, *([] if args.no_retrieval else ["--serve-index", args.index_dir]))
    try:
        asyncio.run(level(url, 2, 1, args.max_tokens))  # warm-up: first-call costs off the books
        levels = []
        for clients in (int(c) for c in args.clients.split(",")):
            levels.append(asyncio.run(level(url, clients, max(1, args.requests // clients), args.max_tokens)))
            print(json.dumps(levels[-1]), flush=True)
        if retrieval is not None:
            retrieval["per_request"] = asyncio.run(retrieval_overhead(url, demo_questions(), args.overhead_rounds, args.max_tokens))
            print(json.dumps({"retrieval_per_request": retrieval["per_request"]}), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    by = {lv["clients"]: lv for lv in levels}
    print(f"{'clients':>8}{'requests':>10}{'tok/s':>10}{'p50 s':>10}{'p95 s':>10}{'errors':>8}")
    for lv in levels:
        print(f"{lv['clients']:>8}{lv['requests']:>10}{lv['tokens_per_s']:>10}{lv['p50_s']:>10}{lv['p95_s']:>10}{lv['errors']:>8}")
    result = {"model": args.model, "max_tokens": args.max_tokens, "stream": True, "levels": levels,
              "speedup_8_vs_1": round(by[8]["tokens_per_s"] / by[1]["tokens_per_s"], 2) if 1 in by and 8 in by else None,
              "retrieval": retrieval,
              "pythonpath": os.environ.get("PYTHONPATH", "")}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
