"""FSDP2 on CPU, side by side in one run: the same DAPT job of the real default base (SmolLM2-135M) on the demo's
documents, trained for a few steps by

    one     1 process, batch B
    ddp     2 processes (gloo), batch B/2 each: every rank holds the whole model, its gradients and AdamW state
    fsdp2   the shipped examples/accelerate/fsdp-8gpu.yaml resized to 2 CPU processes, batch B/2 each: torch's
            fully_shard per decoder layer (accelerate's FSDP2 path, enabled on CPU by slmforge.train.job)

All three see the same global batches in the same order (fp32, no dropout), so their loss curves should agree to
float-summation order. Reported per arm: the losses, the largest loss difference from `one`, the share of parameters
rank 0 holds, rank 0's peak resident memory while training (`ru_maxrss`, before the final gather) and the wall time
(not a speed claim: 2 processes share the machine's cores). The FSDP2 arm also resumes from its sharded step-2
checkpoint and must end with the same weights as its uninterrupted run. Ends with `RESULT {json}`.

    .venv/bin/python bench/fsdp_cpu.py [--steps 4] [--batch 4] [--max-length 256]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("SLMFORGE_QUIET", "1")

import yaml  # noqa: E402

from slmforge.models import DEFAULT_MODEL, resolve_model  # noqa: E402
from slmforge.run import atomic_write_jsonl  # noqa: E402
from slmforge.train import job as train_job  # noqa: E402
from slmforge.train.mixture import pack  # noqa: E402


def demo_texts() -> list[str]:
    docs = sorted((ROOT / "examples" / "postgres" / "docs").rglob("*"))
    return [p.read_text(errors="replace") for p in docs if p.is_file()]


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4, help="global batch (blocks per step); 2 processes take half each")
    ap.add_argument("--max-length", type=int, default=256)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fsdp-cpu-"))
    try:
        results = compare(args, tmp)
    finally:  # the arms' checkpoints hold optimizer state (about 8 GB for the 135M): removed after a failed run too
        shutil.rmtree(tmp, ignore_errors=True)
    print("RESULT " + json.dumps(results))


def compare(args, tmp: Path) -> dict:
    from transformers import AutoTokenizer

    model = resolve_model(DEFAULT_MODEL)
    tok = AutoTokenizer.from_pretrained(model)
    blocks = pack(demo_texts(), tok, args.max_length)[: args.steps * args.batch]
    data = tmp / "blocks.jsonl"
    atomic_write_jsonl(data, blocks)
    config = yaml.safe_load((ROOT / "examples" / "accelerate" / "fsdp-8gpu.yaml").read_text())
    config.update(num_processes=2, mixed_precision="no", use_cpu=True, main_process_port=train_job._free_port())
    config.pop("gpu_ids")
    fsdp_yaml = tmp / "fsdp-2cpu.yaml"
    fsdp_yaml.write_text(yaml.safe_dump(config))

    base = {"enabled": True, "max_steps": args.steps, "max_length": args.max_length, "save_steps": 2,
            "report_to": [], "precision": "fp32", "learning_rate": 5e-4}
    arms = {"one": {"batch_size": args.batch},
            "ddp": {"batch_size": args.batch // 2, "processes": 2},
            "fsdp2": {"batch_size": args.batch // 2, "accelerate_config": str(fsdp_yaml)}}
    results, final = {}, {}
    for name, extra in arms.items():
        cfg = train_job.SECTIONS["dapt"].model_validate({**base, **extra})
        out, ckpt = tmp / name / "out", tmp / name / "checkpoints"
        out.mkdir(parents=True)
        ckpt.mkdir()
        job = {"kind": "dapt", "model": model, "data": str(data), "output_dir": str(ckpt), "out": str(out),
               "config": cfg.model_dump(mode="json"), "seed": 0}
        started = time.time()
        train_job.launch(job, cfg, ckpt)
        wall = time.time() - started
        summary = json.loads((ckpt / "result.json").read_text())
        history = json.loads((out / "log_history.json").read_text())
        results[name] = {"losses": [round(h["loss"], 6) for h in history if "loss" in h],
                         "distributed": summary["distributed"],
                         "rank0_parameter_share": summary["rank0_parameter_share"],
                         "rank0_train_peak_rss_mb": summary["rank0_train_peak_rss_mb"], "wall_s": round(wall, 1)}
        final[name] = weights(out / "model")
        print(f"{name}: {results[name]}", flush=True)
        if name == "fsdp2":  # resume from the sharded step-2 checkpoint, as after a kill
            for step in sorted(ckpt.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[1:]:
                shutil.rmtree(step)
            (ckpt / "result.json").unlink()
            resumed_out = tmp / "fsdp2-resumed"
            resumed_out.mkdir()
            train_job.launch({**job, "out": str(resumed_out)}, cfg, ckpt)
            w = weights(resumed_out / "model")
            results[name]["resume_max_weight_diff"] = max((w[k] - final[name][k]).abs().max().item() for k in w)
            shutil.rmtree(resumed_out)
        shutil.rmtree(tmp / name)  # its checkpoints (GBs with optimizer state): one arm's on disk at a time
    ref = results["one"]["losses"]
    for name in ("ddp", "fsdp2"):
        r = results[name]
        r["max_loss_diff_vs_one"] = max(abs(a - b) for a, b in zip(ref, r["losses"]))
        r["max_weight_diff_vs_one"] = max((final[name][k] - final["one"][k]).abs().max().item() for k in final["one"])
    results["fsdp2_vs_ddp_rank0_peak_rss"] = round(results["fsdp2"]["rank0_train_peak_rss_mb"]
                                                   / results["ddp"]["rank0_train_peak_rss_mb"], 3)
    return results


if __name__ == "__main__":
    main()
