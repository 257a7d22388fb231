"""Score one model on the frozen benchmarks, with lm-evaluation-harness as the engine.

lm-eval computes every per-item number (log-likelihoods, acc, acc_norm, generations and our generation metrics via
the task's process_results); we add item counts, 95% confidence intervals and chance levels from its per-item
samples, which its own stderr (normal approximation, none for custom metrics) does not give.
"""

from __future__ import annotations

import functools
import math
import os
import random
import time
from pathlib import Path

from slmforge.evaluate.lm_eval_tasks import SPECS, task_name
from slmforge.evaluate.metrics import mean_ci


def offline_env() -> None:
    """lm-eval and datasets must never reach for a hub: every task here is local."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _quiet_lm_eval() -> None:
    import logging

    for name in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


@functools.cache  # one subclass (and one patch of lm-eval's task module) per process
def _quiet_hflm():
    """lm-eval's HFLM with its own progress bars off. The eval stage shows one bar of its own per model; lm-eval 0.4's
    evaluator calls the request methods with their `disable_tqdm` left at False (the bars go to stderr even when
    TQDM_DISABLE is set, since an explicit argument wins over tqdm's environment default), and its tasks' request
    building has a bar with no switch at all, so both are turned off here rather than shown beside ours."""
    import lm_eval.api.task as lm_eval_task
    from lm_eval.models.huggingface import HFLM
    from tqdm import tqdm

    lm_eval_task.tqdm = functools.partial(tqdm, disable=True)

    class QuietHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            # loglikelihood_rolling (perplexity) calls this with disable_tqdm=False written in, whatever it was given
            return super()._loglikelihood_tokens(requests, disable_tqdm=True, **kwargs)

    return QuietHFLM


def run_lm_eval(model, tokenizer, task_dir: Path, tasks: list[str], *, batch_size: int, device: str, seed: int,
                chat_template: bool = False) -> dict:
    """lm-eval's simple_evaluate on an already loaded model; returns its result dict (with per-item samples)."""
    offline_env()
    _quiet_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = _quiet_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    return simple_evaluate(lm, tasks=tasks, task_manager=manager, log_samples=True, bootstrap_iters=0,
                           apply_chat_template=chat_template, random_seed=seed, numpy_random_seed=seed,
                           torch_random_seed=seed, fewshot_random_seed=seed)


def _perplexity_ci(pairs: list[tuple[float, float]], iters: int = 1000, seed: int = 0) -> tuple[float, list[float]]:
    """exp(-sum loglik / sum units), and its 95% bootstrap interval over documents (lm-eval's weighted_perplexity)."""
    def ppl(sample):
        return math.exp(-sum(ll for ll, _ in sample) / max(1, sum(n for _, n in sample)))

    rng = random.Random(seed)
    boots = sorted(ppl(rng.choices(pairs, k=len(pairs))) for _ in range(iters))
    return ppl(pairs), [boots[int(0.025 * iters)], boots[min(iters - 1, int(0.975 * iters))]]


def summarize(bench: str, samples: list[dict], seed: int = 0) -> tuple[dict, list[dict]]:
    """Per-benchmark {metric: {value, ci, n}} and per-item rows (id, metrics, prediction) from lm-eval samples."""
    spec = SPECS[bench]
    samples = sorted(samples, key=lambda s: s["doc_id"])
    items = []
    for s in samples:
        doc = s["doc"]
        row = {"id": doc.get("id"), **{m: s[m] for m in spec.metrics if m in s}}
        if spec.output_type == "generate_until":
            row["prediction"] = s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"]
            row["prompt"], row["reference"] = doc.get("prompt", ""), doc.get("answer", "")
        elif spec.output_type == "multiple_choice":
            lls = [r[0] for r in s["filtered_resps"]]
            row["pred_index"] = max(range(len(lls)), key=lls.__getitem__)
            row["answer_index"] = doc.get("answer_index")
        items.append(row)
    out = {}
    for m in spec.metrics:
        if spec.output_type == "loglikelihood_rolling":
            value, ci = _perplexity_ci([tuple(s[m]) for s in samples], seed=seed)
            if m == "bits_per_byte":  # lm-eval: -sum(ll) / sum(bytes) / ln 2
                value, ci = math.log(value, 2), [math.log(c, 2) for c in ci]
            out[m] = {"value": value, "ci": ci, "n": len(samples)}
        else:
            out[m] = mean_ci([float(s[m]) for s in samples], binary=m in spec.binary, seed=seed)
    return out, items


def summarize_questions(scored: list[dict], rows: list[dict], seed: int = 0) -> tuple[dict, list[dict]]:
    """The questions benchmark's {metric: {value, ci, n}} and per-item rows from evaluate.questions.score_mcq."""
    from slmforge.evaluate.questions import answer_perplexity

    out = {m: mean_ci([s[m] for s in scored], binary=True, seed=seed) for m in ("acc_norm", "acc", "acc_norm_char")}
    # perplexity of the gold answers given their questions; CI by resampling items, as for document perplexity
    value, ci = _perplexity_ci([(-s["gold_nll"], s["gold_tokens"]) for s in scored], seed=seed)
    out["answer_ppl"] = {"value": answer_perplexity(scored), "ci": ci, "n": len(scored)}
    items = [{**{k: s[k] for k in ("id", "acc", "acc_norm", "acc_norm_char", "gold_nll", "gold_tokens", "pred_index")},
              "answer_index": r["answer_index"]} for s, r in zip(scored, rows)]
    return out, items


def score_model(name: str, spec: str, task_dir: Path, prefix: str, benches: list[str], *, batch_size: int, seed: int,
                chat: tuple[str, ...] = (), questions: dict[str, list[dict]] | None = None) -> dict:
    """Load one model (folder, HF id or 'default'), run every benchmark, return JSON-able scores and per-item rows.

    Benchmarks in `chat` are asked through the model's chat template (one more lm-eval pass on the same loaded model).
    `questions` ({benchmark: rows of evaluate.questions.mcq_items}, e.g. "questions", "doc_questions") are scored on the
    same loaded model by evaluate.questions.score_mcq.
    """
    from slmforge.models import device_defaults, load_causal_lm, load_tokenizer

    started = time.time()
    device = device_defaults()["device"]
    model, tokenizer = load_causal_lm(spec, device=device).eval(), load_tokenizer(spec)
    samples, engine_results = {}, {}
    for in_chat in (False, True):
        tasks = [task_name(prefix, b) for b in benches if (b in chat) == in_chat]
        if tasks:
            result = run_lm_eval(model, tokenizer, task_dir, tasks, batch_size=batch_size, device=device, seed=seed,
                                 chat_template=in_chat)
            samples.update(result["samples"])
            engine_results.update(result["results"])
    scores, items, engine = {}, {}, {}
    for bench in benches:
        task = task_name(prefix, bench)
        scores[bench], items[bench] = summarize(bench, samples[task], seed)
        engine[bench] = {k: v for k, v in engine_results[task].items() if isinstance(v, (int, float)) and "," in k}
    for bench, rows in (questions or {}).items():
        from slmforge.evaluate.questions import score_mcq

        contexts = [r["passages"] for r in rows] if rows and "passages" in rows[0] else None  # open book
        scored = score_mcq(model, tokenizer, rows, batch_size=batch_size, contexts=contexts)
        scores[bench], items[bench] = summarize_questions(scored, rows, seed)
    del model
    return {"model": name, "spec": spec, "scores": scores, "items": items, "lm_eval": engine,
            "seconds": round(time.time() - started, 2)}
