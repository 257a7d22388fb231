"""Ingest + curate throughput on the demo corpus, and slmforge's overhead over the bare datatrove blocks.

Side by side in one process, alternating, `--rounds` times (median):
  full      slmforge ingest + curate stages from a cold run directory (parse, chunk, curate, manifests)
  stage     slmforge's curate stage alone (hashing, sharding, collecting, manifest around datatrove)
  direct    the same datatrove executors built by `build_pipeline`, run bare on the same chunks
overhead = stage / direct.  Usage: python bench/ingest_curate.py [--recipe examples/postgres/recipe.yaml] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("SLMFORGE_QUIET", "1")

from slmforge.curate.blocks import heldout_documents  # noqa: E402
from slmforge.curate.stage import CurateStage, build_pipeline  # noqa: E402
from slmforge.ingest.stage import IngestStage  # noqa: E402
from slmforge.recipe import load_recipe  # noqa: E402
from slmforge.records import Chunk  # noqa: E402
from slmforge.run import RunDir, read_jsonl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default=str(Path(__file__).resolve().parents[1] / "examples/postgres/recipe.yaml"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-curate-"))
    full, stage, direct = [], [], []
    counts = {}
    try:
        for r in range(args.rounds):
            recipe = load_recipe(args.recipe, overrides=[f"run_dir={tmp / f'full{r}'}"])
            run = RunDir(recipe.run_path)
            t = time.perf_counter()
            ingest = run.execute(IngestStage(), recipe)
            cur = run.execute(CurateStage(), recipe)
            full.append(time.perf_counter() - t)
            counts = {"documents": ingest.manifest["counts"]["documents"], "chunks": ingest.manifest["counts"]["chunks"],
                      "kept_chunks": cur.manifest["counts"]["train_chunks"] + cur.manifest["counts"]["heldout_chunks"]}

            # curate stage alone, on a fresh copy of the finished ingest
            fresh = tmp / f"stage{r}" / recipe.name
            shutil.copytree(recipe.run_path / "ingest", fresh / "ingest")
            recipe2 = load_recipe(args.recipe, overrides=[f"run_dir={tmp / f'stage{r}'}"])
            t = time.perf_counter()
            RunDir(fresh).execute(CurateStage(), recipe2)
            stage.append(time.perf_counter() - t)

            # the same datatrove blocks, bare
            chunks = read_jsonl(recipe.run_path / "ingest" / "chunks.jsonl", Chunk)
            docs = read_jsonl(recipe.run_path / "ingest" / "documents.jsonl")
            heldout = heldout_documents([d["id"] for d in docs], recipe.curate.heldout_fraction, recipe.seed)
            t = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()):
                build_pipeline(recipe.curate, recipe.seed, chunks, heldout, tmp / f"direct{r}").run()
            direct.append(time.perf_counter() - t)
            print(f"round {r}: full {full[-1]:.2f}s  curate stage {stage[-1]:.2f}s  bare datatrove {direct[-1]:.2f}s",
                  file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in (("full_s", full), ("stage_s", stage), ("direct_s", direct))}
    result = {
        **counts,
        "rounds": args.rounds,
        **{k: round(v, 3) for k, v in med.items()},
        "documents_per_s": round(counts["documents"] / med["full_s"], 2),
        "chunks_per_s_curate": round(counts["chunks"] / med["stage_s"], 1),
        "curate_overhead_ratio": round(med["stage_s"] / med["direct_s"], 3),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
