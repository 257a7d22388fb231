"""Router overhead of `slmforge serve`: the same requests straight to an OpenAI-compatible backend and through an
slmforge server in router mode (serve.backend_url) in front of it, interleaved in one run, on 127.0.0.1.
Backend, router and client are three processes (no shared GIL), as in a deployment.

    .venv/bin/python bench/serve_router.py                      # backend = tiny random Llama (the overhead is most visible)
    .venv/bin/python bench/serve_router.py --model default      # backend = SmolLM2-135M-Instruct in process
Ends with one line: RESULT {json}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("SLMFORGE_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve as serve_bench  # noqa: E402  (bench/serve.py: the same server start-up, tiny model and percentile)
from serve import pct, tiny_model  # noqa: E402


def spawn(*args: str) -> tuple[str, subprocess.Popen]:
    """Start this script as a server process (bench/serve.py's helper); return its /v1 URL once /health answers."""
    return serve_bench.spawn(*args, script=__file__)


def run_server(args) -> None:
    import uvicorn

    from slmforge.models import load_causal_lm, load_tokenizer
    from slmforge.recipe import ServeConfig
    from slmforge.serve.app import create_app
    from slmforge.lm.hf import TransformersLM
    from slmforge.lm.http import OpenAILM

    if args.role == "backend":
        model, tok = tiny_model() if args.model == "tiny" else (load_causal_lm(args.model), load_tokenizer(args.model))
        app = create_app(TransformersLM(model, tok, "backend"), ServeConfig())
    else:
        app = create_app(OpenAILM(args.backend_url, "backend", name="router"), ServeConfig(), model_name="router")
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", help="'tiny' (random 2-layer Llama) or any slmforge model spec")
    ap.add_argument("--requests", type=int, default=100, help="per path")
    ap.add_argument("--max-tokens", type=int, default=1, help="1 = the backend does least work, so the hop shows")
    ap.add_argument("--stream", action="store_true", help="time streamed responses (to the last byte)")
    ap.add_argument("--role", default="client", choices=["client", "backend", "router"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--backend-url", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.role != "client":
        return run_server(args)
    import httpx

    backend_url, backend = spawn("--role", "backend", "--model", args.model)
    router_url, router = spawn("--role", "router", "--backend-url", backend_url)

    client = httpx.Client(timeout=300)

    def call(url: str, i: int) -> float:
        body = {"model": "x", "max_tokens": args.max_tokens, "stream": args.stream,
                "messages": [{"role": "user", "content": f"Request {i}: what does VACUUM reclaim?"}]}
        t = time.perf_counter()
        with client.stream("POST", f"{url}/chat/completions", json=body) as r:
            r.read()
            assert r.status_code == 200, r.text
        return time.perf_counter() - t

    for i in range(3):  # warm-up: first-call costs (thread pools, connections) off the books
        call(backend_url, i), call(router_url, i)
    direct, routed = [], []
    for i in range(args.requests):  # interleaved, alternating order, so machine noise hits both paths alike
        first, second = ((backend_url, direct), (router_url, routed)) if i % 2 == 0 else ((router_url, routed), (backend_url, direct))
        first[1].append(call(first[0], i))
        second[1].append(call(second[0], i))
    for proc in (router, backend):
        proc.terminate()
        proc.wait(timeout=30)

    ms = lambda x: round(1000 * x, 2)  # noqa: E731
    result = {
        "backend_model": args.model, "requests_per_path": args.requests, "max_tokens": args.max_tokens, "stream": args.stream,
        "direct_p50_ms": ms(pct(direct, 0.5)), "direct_p95_ms": ms(pct(direct, 0.95)),
        "router_p50_ms": ms(pct(routed, 0.5)), "router_p95_ms": ms(pct(routed, 0.95)),
        "overhead_p50_ms": ms(pct(routed, 0.5) - pct(direct, 0.5)), "overhead_p95_ms": ms(pct(routed, 0.95) - pct(direct, 0.95)),
        "overhead_mean_ms": ms(statistics.mean(r - d for r, d in zip(routed, direct))),
    }
    print(f"{'path':<10}{'p50 ms':>10}{'p95 ms':>10}")
    print(f"{'direct':<10}{result['direct_p50_ms']:>10}{result['direct_p95_ms']:>10}")
    print(f"{'router':<10}{result['router_p50_ms']:>10}{result['router_p95_ms']:>10}")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
