"""How long `slmforge eval` takes for base + 3 stage models with the demo preset (target: ~3 minutes on 2 cores).

Copies the demo run's ingest + curate outputs to a temp folder, adds stand-in dapt/sft/dpo stages whose model/ folders
link to the base weights (real trained models cost the same to score: same architecture and size), and runs the eval
stage from a cold score cache. Needs `slmforge build examples/postgres/recipe.yaml --until curate` to have run.

    .venv/bin/python bench/eval_models.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("SLMFORGE_QUIET", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", type=Path, help="build the run here and keep it (default: a temp folder, removed)")
    args = ap.parse_args()
    from slmforge.cli import run_stages
    from slmforge.models import resolve_model
    from slmforge.run import RunDir, atomic_write_json, hash_obj

    src = REPO / "runs" / "postgres-demo"
    if not (src / "curate" / "manifest.json").is_file():
        sys.exit(f"{src}/curate is missing: run `slmforge build examples/postgres/recipe.yaml --until curate` first")
    root = args.keep or Path(tempfile.mkdtemp(prefix="slmforge-eval-bench-"))
    run_root = root / "postgres-demo"
    shutil.rmtree(run_root, ignore_errors=True)
    run_root.mkdir(parents=True)
    for stage in ("ingest", "curate"):
        shutil.copytree(src / stage, run_root / stage)
    run = RunDir(run_root)
    base = Path(resolve_model("default"))
    for stage in ("dapt", "sft", "dpo"):
        folder = run.stage_dir(stage) / "model"
        folder.mkdir(parents=True)
        for f in base.iterdir():
            if f.is_file():
                os.symlink(f, folder / f.name)
        atomic_write_json(run.stage_dir(stage) / "manifest.json", {"stage": stage, "key": hash_obj(f"stand-in {stage}"), "outputs": {}})
    started = time.time()
    outcome = run_stages(REPO / "examples" / "postgres" / "recipe.yaml", ["eval"], [f"run_dir={root}"])[0]
    total = time.time() - started
    counts = outcome.manifest["counts"]
    result = {
        "models": len(counts["models"]), "items_total": sum(counts["benchmarks"].values()), "benchmarks": counts["benchmarks"],
        "seconds_total": round(total, 1), "seconds_per_model": counts["model_seconds"],
        "seconds_benchmark_build": json.loads((run.stage_dir("eval") / "results.json").read_text())["seconds"]["benchmarks"],
        "load_avg_1m": os.getloadavg()[0], "cpus": len(os.sched_getaffinity(0)),
    }
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
