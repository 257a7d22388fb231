"""Are two builds of the same recipe the same? Frozen benchmark hashes, generated item counts, training-data and model
bytes, and every eval score, side by side: how a refactor shows it changed no behaviour.

    python bench/compare_runs.py RUN_A RUN_B      # e.g. runs/postgres-demo built at two commits
Ends with one line `RESULT {json}`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STAGES = ("ingest", "curate", "generate", "dapt", "sft", "dpo")


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def compare(a: Path, b: Path) -> dict:
    out: dict = {"outputs": {}, "benchmarks": {}, "scores": {"same": 0, "different": [], "only_in_a": []}}
    for stage in STAGES:  # every output file but the human-readable report.json
        oa, ob = _json(a / stage / "manifest.json").get("outputs", {}), _json(b / stage / "manifest.json").get("outputs", {})
        files = [k for k in oa if k != "report.json" and not k.startswith("tensorboard/") and k != "log_history.json"]
        if files:
            out["outputs"][stage] = {"same": sum(oa[k] == ob.get(k) for k in files), "of": len(files),
                                     "different": [k for k in files if oa[k] != ob.get(k)]}
    ga, gb = (_json(r / "generate" / "manifest.json").get("counts", {}) for r in (a, b))
    out["generated_items_same"] = ga.get("by_kind") == gb.get("by_kind")
    out["generated_items"] = {"a": ga.get("by_kind"), "b": gb.get("by_kind")}
    ra, rb = _json(a / "eval" / "results.json"), _json(b / "eval" / "results.json")
    for bench, meta in ra.get("benchmarks", {}).items():
        other = rb.get("benchmarks", {}).get(bench, {})
        out["benchmarks"][bench] = {"n": meta["n"], "sha256_same": other.get("sha256") == meta["sha256"]}
    out["benchmarks_only_in_b"] = sorted(set(rb.get("benchmarks", {})) - set(ra.get("benchmarks", {})))
    for model, benches in ra.get("scores", {}).items():
        for bench, metrics in benches.items():
            for metric, s in metrics.items():
                t = rb.get("scores", {}).get(model, {}).get(bench, {}).get(metric)
                if t is None:
                    out["scores"]["only_in_a"].append(f"{model}/{bench}/{metric}")
                elif abs(t["value"] - s["value"]) < 1e-9:
                    out["scores"]["same"] += 1
                else:
                    out["scores"]["different"].append({"cell": f"{model}/{bench}/{metric}", "a": s["value"], "b": t["value"]})
    return out


if __name__ == "__main__":
    result = compare(Path(sys.argv[1]), Path(sys.argv[2]))
    for stage, o in result["outputs"].items():
        print(f"{stage:9s} outputs byte-identical: {o['same']}/{o['of']}" + (f"  different: {o['different']}" if o["different"] else ""))
    print(f"generated items by kind identical: {result['generated_items_same']}")
    for bench, o in result["benchmarks"].items():
        print(f"benchmark {bench:12s} n={o['n']:4d} frozen file identical: {o['sha256_same']}")
    print(f"score cells identical: {result['scores']['same']}, different: {len(result['scores']['different'])}, "
          f"missing in B: {len(result['scores']['only_in_a'])}; benchmarks only in B: {result['benchmarks_only_in_b']}")
    print("RESULT " + json.dumps(result))
