"""Serving speed and quality of the two in-process engines on the same requests: transformers (the exported HF folder,
fp32) vs llama.cpp (each exported GGUF), greedy, round-robin per request in one run. The requests are the run's
held-out QA and summary benchmark items, asked in chat as the eval stage asks them, and scored with the eval's metrics
(token F1, ROUGE-L), so a quantization that costs domain quality shows. Also: how often each GGUF's greedy answer is
the same text as transformers'.

    .venv/bin/python bench/serve_engines.py                          # the demo run's export (model/ + gguf/*.gguf)
    .venv/bin/python bench/serve_engines.py --hf default --gguf PATH  # any HF spec vs any GGUF files
Needs the compiled llama-cpp-python (pip install 'slmforge[llamacpp]'). Ends with one line: RESULT {json}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("SLMFORGE_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = {"qa": "token_f1", "summary": "rouge_l"}  # the open-answer benchmarks, asked in chat as the eval stage asks them


def workload(run: Path, max_tokens: dict[str, int]):
    """(kind, request, item) for every held-out QA and summary item of the run's frozen benchmarks."""
    from slmforge.evaluate.lm_eval_tasks import SPECS
    from slmforge.serve.protocol import GenRequest

    out = []
    for kind in KINDS:
        spec = SPECS[kind]
        for line in (run / "eval" / "benchmarks" / f"{kind}.jsonl").read_text(encoding="utf-8").splitlines():
            item = json.loads(line)
            text = spec.chat_template.replace("{{prompt}}", item["prompt"])
            out.append((kind, GenRequest(messages=[{"role": "user", "content": text}], max_tokens=max_tokens[kind],
                                         stop=list(spec.until)), item))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=str(ROOT / "runs" / "postgres-demo"), help="a run whose export/ holds model/ and gguf/")
    ap.add_argument("--hf", default="", help="transformers model spec ('' = <run>/export/model)")
    ap.add_argument("--gguf", nargs="*", default=None, help="GGUF files (default: <run>/export/gguf/*.gguf)")
    ap.add_argument("--base", default="default", help="base model served by transformers as the quality floor ('' = none)")
    ap.add_argument("--qa-tokens", type=int, default=40, help="max tokens per QA answer (the demo eval's)")
    ap.add_argument("--summary-tokens", type=int, default=64, help="max tokens per summary (the demo eval's)")
    args = ap.parse_args()

    from slmforge.models import cpu_threads, load_causal_lm, load_tokenizer
    from slmforge.lm.hf import TransformersLM
    from slmforge.lm.llamacpp import LlamaCppLM

    export = Path(args.run) / "export"
    hf = args.hf or str(export / "model")
    ggufs = [Path(p) for p in args.gguf] if args.gguf is not None else sorted((export / "gguf").glob("*.gguf"))
    if not ggufs:
        sys.exit(f"no GGUF files: pass --gguf or build the demo with export first ({export / 'gguf'})")
    engines = {"transformers": TransformersLM(load_causal_lm(hf), load_tokenizer(hf), "transformers")}
    for path in ggufs:
        engines[f"llama.cpp {path.stem.rsplit('-', 1)[-1]}"] = LlamaCppLM(path, path.name, n_ctx=1024)
    if args.base:
        engines["base (transformers)"] = TransformersLM(load_causal_lm(args.base), load_tokenizer(args.base), "base")
    from slmforge.evaluate import metrics

    items = workload(Path(args.run), {"qa": args.qa_tokens, "summary": args.summary_tokens})
    for engine in engines.values():  # warm-up: first-call costs off the books
        engine.answer(items[0][1])

    seconds = {name: 0.0 for name in engines}
    tokens = {name: 0 for name in engines}
    texts: dict[str, list[str]] = {name: [] for name in engines}
    scores: dict[str, dict[str, list[float]]] = {name: {k: [] for k in KINDS} for name in engines}
    for kind, req, item in items:  # round-robin per request: machine noise hits every engine alike
        for name, engine in engines.items():
            started = time.perf_counter()
            g = engine.answer(req)
            seconds[name] += time.perf_counter() - started
            tokens[name] += g.completion_tokens
            texts[name].append(g.text)
            scores[name][kind].append(getattr(metrics, f"process_{kind}")(item, [g.text])[KINDS[kind]])

    base = tokens["transformers"] / seconds["transformers"]
    result = {"hf": hf, "requests_per_engine": len(items), "threads": cpu_threads(), "engines": {}}
    print(f"{'engine':<22}{'MiB':>7}{'tok/s':>8}{'speedup':>9}{'same text':>11}{'qa F1':>8}{'summary RL':>12}")
    for name in engines:
        rate = tokens[name] / seconds[name]
        same = sum(a == b for a, b in zip(texts[name], texts["transformers"]))
        path = getattr(engines[name], "path", None)  # a GGUF file; the HF folder's safetensors otherwise
        size = (Path(path).stat().st_size if path else sum(f.stat().st_size for f in Path(hf).glob("*.safetensors"))) / 2**20
        mean = {k: round(statistics.mean(v), 3) for k, v in scores[name].items()}
        result["engines"][name] = {"mib": round(size, 1), "tokens_per_s": round(rate, 1), "speedup": round(rate / base, 2),
                                   "same_text": f"{same}/{len(texts[name])}", "qa_token_f1": mean["qa"],
                                   "summary_rouge_l": mean["summary"]}
        print(f"{name:<22}{size:>7.1f}{rate:>8.1f}{rate / base:>9.2f}{same:>6}/{len(texts[name]):<4}{mean['qa']:>8.3f}"
              f"{mean['summary']:>12.3f}")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
