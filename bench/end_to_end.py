"""The demo build, stage by stage: wall time and peak memory (RSS) of each, from a cold start.

Each stage runs as its own `slmforge build --from S --until S` process, so its peak RSS is its own (os.wait4).
A fresh SLMFORGE_CACHE makes the GGUF -> safetensors conversion of the base model part of the measurement.
Usage: python bench/end_to_end.py [--recipe examples/postgres/recipe.yaml] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("ingest", "curate", "generate", "dapt", "sft", "dpo", "eval", "export")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default=str(REPO / "examples/postgres/recipe.yaml"))
    parser.add_argument("--keep", default=None, help="keep the run directory here instead of a temp folder")
    args = parser.parse_args()

    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-e2e-"))
    env = {**os.environ, "SLMFORGE_CACHE": str(work / "cache"), "SLMFORGE_QUIET": "1"}
    sys.path.insert(0, str(REPO))
    from slmforge.recipe import load_recipe

    enabled = load_recipe(args.recipe).enabled_stages()
    per_stage, total_start = {}, time.perf_counter()
    for stage in [s for s in STAGES if s in enabled]:
        cmd = [sys.executable, "-m", "slmforge.cli", "build", args.recipe, "--set", f"run_dir={work / 'runs'}",
               "--from", stage, "--until", stage]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"stage {stage} failed:\n{proc.stderr.read().decode()[-3000:]}")
        per_stage[stage] = {"wall_s": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024)}
        print(f"{stage:<9} {seconds:7.1f} s   peak RSS {usage.ru_maxrss / 1024:7.0f} MB", file=sys.stderr)
    total = time.perf_counter() - total_start

    run = work / "runs" / load_recipe(args.recipe).name
    table = (run / "eval" / "table.md").read_text() if (run / "eval" / "table.md").exists() else ""
    print(table, file=sys.stderr)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    result = {"total_wall_s": round(total, 1), "budget_s": 1200, "within_budget": total <= 1200,
              "peak_rss_mb": max(v["peak_rss_mb"] for v in per_stage.values()), "stages": per_stage}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
