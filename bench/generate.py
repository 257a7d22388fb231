"""Bench: teacher throughput, sequential (batch 1) vs batched, on the same requests; acceptance per generator.

    .venv/bin/python bench/generate.py [--n 8] [--max-new-tokens 32] [--chunks 8]

Uses the real default teacher (SmolLM2-135M-Instruct, in process) and the PostgreSQL demo run's curate split.
Ends with one line `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slmforge.generate import make_items  # noqa: E402
from slmforge.generate.stage import acceptance  # noqa: E402
from slmforge.generate.teachers import teacher_request  # noqa: E402
from slmforge.lm.hf import TransformersLM  # noqa: E402
from slmforge.generate.writers import plan_units  # noqa: E402
from slmforge.recipe import GenerateConfig  # noqa: E402
from slmforge.records import Chunk  # noqa: E402
from slmforge.run import read_jsonl  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8, help="requests in the throughput comparison")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--chunks", type=int, default=8, help="chunks sent to the teacher in the acceptance run")
    ap.add_argument("--run", default=str(ROOT / "runs/postgres-demo"))
    args = ap.parse_args()

    train = read_jsonl(Path(args.run) / "curate/train.jsonl", Chunk)
    heldout = read_jsonl(Path(args.run) / "curate/heldout.jsonl", Chunk)
    cfg = GenerateConfig(max_passage_words=120, max_chunks=args.chunks,
                         teacher={"max_new_tokens": args.max_new_tokens, "batch_size": args.n})
    step = max(1, len(train) // args.n)
    requests = [teacher_request(u.request) for u in plan_units(train[::step][: args.n], {"qa"}, cfg, seed=0)]

    t0 = time.time()
    teacher = TransformersLM.load("default", name="transformers:SmolLM2-135M-Instruct", batch_hint=args.n)
    load_s = time.time() - t0
    teacher.generate(requests[:1])  # warm-up
    t0 = time.time()
    sequential = [teacher.generate([r])[0].text for r in requests]
    seq_s = time.time() - t0
    t0 = time.time()
    batched = [r.text for r in teacher.generate(requests)]
    bat_s = time.time() - t0
    same = sum(a == b for a, b in zip(sequential, batched))
    print(f"{len(requests)} requests x {args.max_new_tokens} new tokens: sequential {seq_s:.1f}s, batched {bat_s:.1f}s "
          f"({seq_s / bat_s:.2f}x); identical greedy outputs {same}/{len(requests)}", flush=True)

    t0 = time.time()
    with tempfile.TemporaryDirectory() as cache:
        items, rejected = make_items(train, cfg.kinds, cfg, teacher=teacher, cache_dir=Path(cache), seed=0,
                                     avoid_texts=[c.text for c in heldout])
    gen_s = time.time() - t0
    per = acceptance(items, rejected)
    for k, v in per.items():
        print(f"  {k:55s} {v['accepted']:5d}/{v['candidates']:<5d} {v['rate']:.0%}  {v['reasons']}")
    samples = [i.model_dump(exclude={"context", "id", "doc_id"}) for i in items if i.origin != "extractive"][:6]
    print(json.dumps(samples, indent=1, ensure_ascii=False)[:6000])
    result = {
        "teacher": teacher.name, "requests": len(requests), "max_new_tokens": args.max_new_tokens, "load_s": round(load_s, 1),
        "sequential_items_per_s": round(len(requests) / seq_s, 3), "batched_items_per_s": round(len(requests) / bat_s, 3),
        "batched_vs_sequential": round(seq_s / bat_s, 2), "identical_outputs": same,
        "acceptance": {k: v["rate"] for k, v in per.items()},
        "accepted": {k: f"{v['accepted']}/{v['candidates']}" for k, v in per.items()},
        "make_items_s": round(gen_s, 1), "teacher_chunks": args.chunks,
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
