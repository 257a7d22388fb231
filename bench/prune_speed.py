"""Size and llama.cpp generation speed of the pruned specialist (merge.prune) against the unpruned one, side by side.

Both HF folders are converted to GGUF (f16 and q8_0 by default) with llama.cpp's own converter (slmforge/export/gguf.py),
then every GGUF is loaded in llama.cpp (llama-cpp-python) and asked the same prompts, greedy, for a fixed number of new
tokens (end-of-generation ignored, so every call makes exactly --new-tokens). Calls are interleaved: per repetition and
prompt, unpruned and pruned run back to back, the order alternating between repetitions (A B, B A, ...), so machine
noise and turbo drift hit both alike. Decode tokens/s = (new tokens - 1) / (time from the first to the last token);
prompt processing is reported apart.

    .venv/bin/python bench/prune_speed.py --run runs/postgres-demo     # <run>/dpo/model vs <run>/merge/model
    .venv/bin/python bench/prune_speed.py --unpruned DIR --pruned DIR  # any two HF folders of one architecture
    .venv/bin/python bench/prune_speed.py --run R --prune examples/postgres/recipe.yaml --set run_dir=...
        # no merge stage ran: prune <run>/dpo/model into <run>/prune-speed/pruned with the merge stage's own code
        # (slmforge.merge.prune.prune_and_recover, the recipe's merge.prune settings), then measure
Needs the compiled llama-cpp-python (pip install 'slmforge[llamacpp]'). Ends with one line: RESULT {json}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("SLMFORGE_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = (
    "What does VACUUM do in PostgreSQL?",
    "Explain what a B-tree index is good for.",
    "How do I create a role that can log in?",
    "What is the difference between DELETE and TRUNCATE?",
)


def specialist(run: Path) -> Path:
    """The unpruned specialist: the last trained stage's model (what the merge stage calls '<stage> (unmerged)')."""
    for stage in ("dpo", "sft", "dapt"):
        if (run / stage / "model" / "config.json").is_file():
            return run / stage / "model"
    sys.exit(f"no trained model in {run} (dpo/, sft/ or dapt/model): pass --unpruned")


def params(folder: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                n += math.prod(shape)
    return n


def to_gguf(folder: Path, label: str, outtype: str, out_dir: Path, converter: Path) -> Path:
    """<out_dir>/<label>-<weights hash>-<type>.gguf, converted once per weights."""
    from slmforge.export.gguf import convert
    from slmforge.lm.identity import weights_hash

    out = out_dir / f"{label}-{weights_hash(folder)[:12]}-{outtype}.gguf"
    if not out.is_file():
        print(f"converting {folder} → {out.name}", flush=True)
        convert(folder, out, outtype, converter, out_dir / "convert.log")
    return out


def prune_here(recipe_path: str, overrides: list[str], src: Path, dest: Path) -> dict:
    """What the merge stage does to its kept model (prune_and_recover, in place), on a copy of `src` in `dest`."""
    import shutil

    from slmforge.recipe import load_recipe
    from slmforge.run import RunDir, StageContext
    from slmforge.merge.prune import prune_and_recover

    recipe = load_recipe(recipe_path, overrides)
    run = RunDir(Path(recipe.run_dir) / recipe.name)
    if not (dest / "config.json").is_file() or not (dest / "PRUNED.json").is_file():
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns("manifest.json", "SOURCE"))
        ctx = StageContext(recipe=recipe, run=run, out=dest.parent / "out", scratch=dest.parent / "scratch")
        info = prune_and_recover(ctx, dest, dest.parent / "scratch" / "pruned", recipe.merge.prune, recipe)
        (dest / "PRUNED.json").write_text(json.dumps(info, indent=1))
    return json.loads((dest / "PRUNED.json").read_text())


def timed_generate(llm, ids: list[int], new_tokens: int) -> tuple[float, float]:
    """(prompt seconds, decode seconds) of one greedy generation of exactly `new_tokens` tokens from a clean context."""
    llm.reset()  # no prefix reuse between calls: every call processes its whole prompt
    started = time.perf_counter()
    first = None
    n = 0
    for _ in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        n += 1
        if first is None:
            first = time.perf_counter()
        if n == new_tokens:
            break
    return first - started, time.perf_counter() - first


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=str(ROOT / "runs" / "postgres-demo"), help="a run whose merge stage pruned its model")
    ap.add_argument("--unpruned", default="", help="HF folder ('' = the run's last trained model)")
    ap.add_argument("--pruned", default="", help="HF folder ('' = <run>/merge/model)")
    ap.add_argument("--types", nargs="+", default=["f16", "q8_0"], help="GGUF types (the converter's: f32 f16 bf16 q8_0)")
    ap.add_argument("--out", default="", help="where the GGUF files go ('' = <run>/prune-speed)")
    ap.add_argument("--reps", type=int, default=6, help="repetitions of every prompt per model")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prune", default="", help="a recipe: prune the unpruned model here, as the merge stage would")
    ap.add_argument("--set", action="append", default=[], help="recipe override for --prune (repeatable)")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from slmforge.export.gguf import chat_inputs, find_converter

    run = Path(args.run)
    folders = {"unpruned": Path(args.unpruned) if args.unpruned else specialist(run),
               "pruned": Path(args.pruned) if args.pruned else run / "merge" / "model"}
    for name, f in folders.items():
        if not args.prune and not (f / "config.json").is_file():
            sys.exit(f"--{name}: {f} is not a model folder (build the run with merge.prune.enabled=true, or pass --prune)")
    out_dir = Path(args.out) if args.out else run / "prune-speed"
    out_dir.mkdir(parents=True, exist_ok=True)
    prune_info = None
    if args.prune:
        folders["pruned"] = Path(args.pruned) if args.pruned else out_dir / "pruned"
        prune_info = prune_here(args.prune, args.set, folders["unpruned"], folders["pruned"])
        print("pruned: " + json.dumps(prune_info), flush=True)
    converter = find_converter("auto")
    result: dict = {"folders": {k: str(v) for k, v in folders.items()}, "threads": args.threads, "reps": args.reps,
                    "new_tokens": args.new_tokens, "prompts": len(PROMPTS), "params": {}, "gguf_mib": {}, "tokens_per_s": {}}
    for name, f in folders.items():
        cfg = json.loads((f / "config.json").read_text())
        result["params"][name] = params(f)
        result.setdefault("intermediate_size", {})[name] = cfg.get("intermediate_size")
    result["prune"] = prune_info
    result["params"]["share"] = round(result["params"]["pruned"] / result["params"]["unpruned"], 4)

    ggufs = {(name, t): to_gguf(f, name, t, out_dir, converter) for t in args.types for name, f in folders.items()}
    for (name, t), path in ggufs.items():
        result["gguf_mib"].setdefault(t, {})[name] = round(path.stat().st_size / 2**20, 1)
    for t in args.types:
        result["gguf_mib"][t]["share"] = round(result["gguf_mib"][t]["pruned"] / result["gguf_mib"][t]["unpruned"], 4)

    try:
        from llama_cpp import Llama
    except ImportError:
        print("RESULT " + json.dumps(result))
        sys.exit("llama-cpp-python is not installed (pip install 'slmforge[llamacpp]'): sizes only, no tokens/s")

    tok = AutoTokenizer.from_pretrained(folders["unpruned"])  # pruning keeps the tokenizer: the same ids go to both
    inputs = chat_inputs(tok, list(PROMPTS))
    n_ctx = max(map(len, inputs)) + args.new_tokens + 8
    llms = {key: Llama(model_path=str(p), n_ctx=n_ctx, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
            for key, p in ggufs.items()}
    for key, llm in llms.items():  # warm-up: page the weights in, first-call costs off the books
        timed_generate(llm, inputs[0], 8)

    decode = {key: [] for key in llms}
    prompt = {key: [] for key in llms}
    for rep in range(args.reps):
        order = ("unpruned", "pruned") if rep % 2 == 0 else ("pruned", "unpruned")
        for ids in inputs:
            for t in args.types:
                for name in order:
                    p, d = timed_generate(llms[(name, t)], ids, args.new_tokens)
                    prompt[(name, t)].append(len(ids) / p)
                    decode[(name, t)].append((args.new_tokens - 1) / d)

    print(f"{'gguf':<8}{'model':<10}{'params':>13}{'MiB':>8}{'decode tok/s':>14}{'prompt tok/s':>14}")
    for t in args.types:
        row = {}
        for name in ("unpruned", "pruned"):
            d, p = decode[(name, t)], prompt[(name, t)]
            row[name] = {"decode_median": round(statistics.median(d), 1), "decode_mean": round(statistics.mean(d), 1),
                         "decode_min": round(min(d), 1), "decode_max": round(max(d), 1),
                         "prompt_median": round(statistics.median(p), 1)}
            print(f"{t:<8}{name:<10}{result['params'][name]:>13,}{result['gguf_mib'][t][name]:>8.1f}"
                  f"{row[name]['decode_median']:>14.1f}{row[name]['prompt_median']:>14.1f}")
        pairs = [b / a for a, b in zip(decode[("unpruned", t)], decode[("pruned", t)])]  # same rep, same prompt
        row["ratio_median_of_pairs"] = round(statistics.median(pairs), 3)
        row["ratio_pairs_min_max"] = [round(min(pairs), 3), round(max(pairs), 3)]
        row["ratio_of_medians"] = round(row["pruned"]["decode_median"] / row["unpruned"]["decode_median"], 3)
        row["prompt_ratio_of_medians"] = round(row["pruned"]["prompt_median"] / row["unpruned"]["prompt_median"], 3)
        row["pairs"] = len(pairs)
        result["tokens_per_s"][t] = row
        print(f"{t:<8}pruned / unpruned decode tok/s: median of {len(pairs)} pairs {row['ratio_median_of_pairs']:.3f} "
              f"(range {row['ratio_pairs_min_max'][0]:.3f}–{row['ratio_pairs_min_max'][1]:.3f}); "
              f"prompt {row['prompt_ratio_of_medians']:.3f}")
    for llm in llms.values():
        llm.close()
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
