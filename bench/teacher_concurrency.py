"""The generate stage against a served teacher at 1, 8 and 32 requests in flight, side by side in one run.

A real local OpenAI-compatible server (`slmforge serve`'s app with its continuous-batching transformers engine, started
as in bench/serve.py) answers the teacher's requests; the stage runs with `generate.teacher.backend: openai` and
`generate.teacher.concurrency` = each level, each level in a fresh run folder (empty cache), over the same chunks of
the demo's curate output. This is the code path a vLLM endpoint takes: only `base_url` and `model` change. Then the
last level runs again (`--force`) on its own cache: every request must be a cache hit, none may reach the server.

    .venv/bin/python bench/teacher_concurrency.py                   # tiny random 2-layer Llama served (server overhead)
    .venv/bin/python bench/teacher_concurrency.py --model default   # SmolLM2-135M-Instruct served (slow on 2 cores)

Per level: teacher requests/s, its ratio to concurrency 1, accepted items, retries (backoffs taken by the HTTP
client), server-side requests (from its /metrics) and cache hits. Ends with one line: RESULT {json}
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("SLMFORGE_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve import spawn  # noqa: E402  (bench/serve.py: a served model on a free port, once /health answers)


def demo_curate(runs: Path) -> Path:
    """The demo's ingest + curate in `runs` (about a minute); the generate levels adopt its train/held-out chunks."""
    from slmforge.curate.stage import CurateStage
    from slmforge.ingest.stage import IngestStage
    from slmforge.recipe import load_recipe
    from slmforge.run import RunDir

    recipe = load_recipe(ROOT / "examples" / "postgres" / "recipe.yaml", overrides=[f"run_dir={runs}"])
    run = RunDir(recipe.run_path)
    run.execute(IngestStage(), recipe)
    run.execute(CurateStage(), recipe)
    return recipe.run_path / "curate"


def served_requests(url: str) -> int:
    """Chat/completion requests the server has answered so far (its Prometheus counter)."""
    import httpx

    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=10).text
    return int(sum(float(v) for ep, v in re.findall(r'^slmforge_requests_total\{endpoint="([^"]*)"[^}]*\} (\S+)', text, re.M)
                   if ep != "models"))


class RetryCounter:
    """Counts the backoffs the teacher's HTTP client takes (one per retried request attempt)."""

    def __init__(self):
        from slmforge.lm import http

        self.n, self._orig, self._cls = 0, http.HTTPClient._backoff, http.HTTPClient
        counter = self

        async def counted(client, attempt):
            counter.n += 1
            return await counter._orig(client, attempt)

        http.HTTPClient._backoff = counted


def level(curate: Path, folder: Path, url: str, concurrency: int, args, retries: RetryCounter, force: bool = False) -> dict:
    from slmforge import artifacts as art
    from slmforge.generate.stage import GenerateStage
    from slmforge.recipe import build_recipe
    from slmforge.records import Chunk
    from slmforge.run import RunDir, read_jsonl

    recipe = build_recipe({
        "name": "teacher-bench", "documents": str(ROOT / "examples" / "postgres" / "docs"), "run_dir": str(folder),
        "generate": {"enabled": True, "kinds": ["qa", "summary", "rephrase"], "teacher_kinds": ["qa", "summary", "rephrase"],
                     "max_chunks": args.chunks,
                     "teacher": {"backend": "openai", "base_url": url, "model": "bench", "concurrency": concurrency,
                                 "max_new_tokens": args.max_new_tokens, "timeout_s": 600, "max_retries": 3}},
    })
    run = RunDir(recipe.run_path)
    if run.manifest(art.CURATE) is None:
        run.adopt(art.CURATE, {art.TRAIN_CHUNKS: read_jsonl(curate / "train.jsonl", Chunk),
                               art.HELDOUT_CHUNKS: read_jsonl(curate / "heldout.jsonl", Chunk)})
    served0, retries0 = served_requests(url), retries.n
    started = time.perf_counter()
    outcome = run.execute(GenerateStage(), recipe, force=force)
    seconds = time.perf_counter() - started
    counts = outcome.manifest["counts"]
    served = served_requests(url) - served0
    asked = counts["teacher_requests"]
    return {"concurrency": concurrency, "seconds": round(seconds, 2), "teacher_requests": asked,
            "requests_per_s": round(asked / seconds, 3), "items": counts["items"],
            "failures": counts["teacher_failures"], "retries": retries.n - retries0, "served_requests": served,
            "cache_hits": asked - served}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", help="'tiny' (random 2-layer Llama) or any slmforge model spec, e.g. default")
    ap.add_argument("--levels", default="1,8,32", help="generate.teacher.concurrency values")
    ap.add_argument("--chunks", type=int, default=24, help="generate.max_chunks: chunks sent to the teacher")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--curate", type=Path, help="a finished curate folder (default: build the demo's in a temp folder)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="slmforge-teacher-bench-"))
    curate = args.curate or demo_curate(tmp / "demo")
    url, server = spawn("--role", "server", "--model", args.model, script=str(ROOT / "bench" / "serve.py"))
    retries = RetryCounter()
    rows = []
    try:
        for c in [int(x) for x in args.levels.split(",")]:
            rows.append(level(curate, tmp / f"c{c}", url, c, args, retries))
            print(json.dumps(rows[-1]), flush=True)
        again = level(curate, tmp / f"c{rows[-1]['concurrency']}", url, rows[-1]["concurrency"], args, retries, force=True)
        again["rerun_on_cache"] = True
        print(json.dumps(again), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    base = rows[0]["requests_per_s"]
    for r in rows:
        r["ratio_to_sequential"] = round(r["requests_per_s"] / base, 2) if base else None
    print(f"{'concurrency':>11} {'requests':>8} {'seconds':>8} {'req/s':>7} {'vs 1':>5} {'items':>5} {'retries':>7} {'cache hits':>10}")
    for r in rows + [again]:
        print(f"{r['concurrency']:>11} {r['teacher_requests']:>8} {r['seconds']:>8.1f} {r['requests_per_s']:>7.2f} "
              f"{r.get('ratio_to_sequential') or '':>5} {r['items']:>5} {r['retries']:>7} {r['cache_hits']:>10}"
              f"{'  (rerun on the cache)' if r.get('rerun_on_cache') else ''}")
    print("RESULT " + json.dumps({"bench": "teacher_concurrency", "model": args.model, "max_new_tokens": args.max_new_tokens,
                                  "levels": rows, "rerun_on_cache": again}))


if __name__ == "__main__":
    main()
