"""Retrieval quality of bm25, dense (MiniLM) and hybrid (RRF) on a finished run's own passages, without changing the run.

Reads the run's index-stage passages (training, held-out) and generate-stage items; builds each retriever's index in a
temporary folder (saved and loaded back, as the index stage and its readers do) and measures:
  - recall@1/2/5/10 of each generated question's source chunk (items of kind qa), on the training index, as the
    generate stage's RAFT data measures it (slmforge.index.bm25.recall_from_hits);
  - with --questions (e.g. a real FAQ, or the recipe's eval.questions): answer coverage, the share of the gold answer's
    content words present in the top-k passages of the deployed index (training + held-out), as
    bench/real_questions.py:open_book_contexts computes it (k = the run's index.k), and at k=5;
  - each retriever against bm25, paired over the same questions (difference, bootstrap 95% CI, verdict);
  - the time to embed the passages, and the single-query search latency (p50 over up to 50 questions).

    .venv/bin/python bench/retrieval.py RUN_DIR [--questions FILE] [--retrievers bm25,dense,hybrid] [--embeddings-cache DIR]
Ends with one line: RESULT {json}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("SLMFORGE_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KS = (1, 2, 5, 10)


def coverages(hits, answers: list[str]) -> list[float]:
    """Per question: the share of the gold answer's content words found in its hits' passages (the mean is
    open_book_contexts' answer_coverage)."""
    from slmforge.evaluate.questions import content_words

    shares = []
    for h, answer in zip(hits, answers):
        gold = content_words(answer)
        seen = set().union(*(content_words(x.passage.text) for x in h)) if h else set()
        shares.append(len(gold & seen) / len(gold) if gold else 0.0)
    return shares


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def versus(a: list[float], b: list[float], binary: bool) -> dict:
    """b minus a, paired over the same questions: difference, bootstrap 95% CI, verdict (slmforge.evaluate.paired)."""
    from slmforge.evaluate.paired import paired_diff

    d = paired_diff(a, b, binary=binary)
    return {"diff": round(d["diff"], 4), "ci95": [round(x, 4) for x in d["ci"]], "verdict": d["verdict"]}


def latency_ms(index, queries: list[str]) -> float:
    ms = []
    for q in queries[:50]:
        start = time.perf_counter()
        index.search(q, 2)
        ms.append((time.perf_counter() - start) * 1000)
    return statistics.median(ms) if ms else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run whose index (and generate) stages are done; only read")
    parser.add_argument("--questions", type=Path, default=None, help="questions file (question, answer) for answer coverage")
    parser.add_argument("--retrievers", default="bm25,dense,hybrid")
    parser.add_argument("--embeddings-cache", type=Path, default=None, metavar="DIR",
                        help="reuse passage vectors embedded before under DIR (as the index stage does); the embedding "
                             "time is then that of the cache misses only")
    args = parser.parse_args()

    from slmforge.artifacts import GENERATE, HELDOUT_PASSAGES, INDEX, ITEMS, PASSAGES
    from slmforge.console import quiet_libraries
    from slmforge.evaluate.questions import load_questions
    from slmforge.index.bm25 import Bm25Index, recall_from_hits
    from slmforge.index.dense import DenseIndex, Encoder, HybridIndex
    from slmforge.run import RunDir

    quiet_libraries()
    run = RunDir(args.run_dir)
    settings = (run.manifest(INDEX) or {}).get("config", {}).get("stage", {})
    k = settings.get("k", 2)
    stemmer, stopwords = settings.get("stemmer", "english"), settings.get("stopwords", "en")
    train, heldout = list(run.read(PASSAGES)), list(run.read(HELDOUT_PASSAGES))
    items = [it for it in run.read(ITEMS) if it.kind == "qa"] if run.manifest(GENERATE) else []
    faq = load_questions(args.questions) if args.questions else []
    wanted = args.retrievers.split(",")
    print(f"{args.run_dir}: {len(train)} training + {len(heldout)} held-out passages, {len(items)} generated questions, "
          f"{len(faq)} questions with answers; k={k}", flush=True)

    timings: dict[str, float] = {}
    indexes: dict[str, tuple] = {}  # retriever -> (training index, deployed index)
    with tempfile.TemporaryDirectory(prefix="slmforge-retrieval-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        Bm25Index.build(train, stemmer, stopwords).save(tmp / "bm25_train")
        Bm25Index.build(train + heldout, stemmer, stopwords).save(tmp / "bm25_all")
        bm25 = (Bm25Index.load(tmp / "bm25_train", train), Bm25Index.load(tmp / "bm25_all", train + heldout))
        timings["bm25_build_s"] = time.perf_counter() - start
        indexes["bm25"] = bm25
        if {"dense", "hybrid"} & set(wanted):
            start = time.perf_counter()
            model = Encoder()
            timings["model_load_s"] = time.perf_counter() - start
            start = time.perf_counter()
            dense_train = DenseIndex.build(train, model, progress=None, cache=args.embeddings_cache)
            timings["embed_train_s"] = time.perf_counter() - start
            start = time.perf_counter()
            dense_train.extended(heldout, progress=None, cache=args.embeddings_cache).save(tmp / "dense_all")
            timings["embed_heldout_s"] = time.perf_counter() - start
            dense_train.save(tmp / "dense_train")
            dense = (DenseIndex.load(tmp / "dense_train", train), DenseIndex.load(tmp / "dense_all", train + heldout))
            for d in dense:
                d._model = model
            timings["embed_dtype"] = model.dtype
            indexes["dense"] = dense
            indexes["hybrid"] = (HybridIndex(bm25[0], dense[0]), HybridIndex(bm25[1], dense[1]))
            print(f"embedded {len(train) + len(heldout)} passages in "
                  f"{timings['embed_train_s'] + timings['embed_heldout_s']:.1f} s ({model.dtype}); model load "
                  f"{timings['model_load_s']:.1f} s", flush=True)

        results, per_question = {}, {}
        for name in wanted:
            training, deployed = indexes[name]
            r: dict = {}
            mine = per_question[name] = {}
            if items:
                hits = training.search_many([it.prompt for it in items], max(KS))
                r["generated_recall"] = recall_from_hits(hits, [it.chunk_id for it in items], KS)
                for x in (1, 5):
                    mine[f"recall@{x}"] = [float(any(h.passage.chunk_id == it.chunk_id for h in hs[:x])) for hs, it in zip(hits, items)]
            if faq:
                answers = [q.answer for q in faq]
                hits = deployed.search_many([q.question for q in faq], max(k, 5))
                for x in (k, 5):
                    mine[f"answer_coverage@{x}"] = coverages([h[:x] for h in hits], answers)
                    r[f"answer_coverage@{x}"] = round(mean(mine[f"answer_coverage@{x}"]), 4)
            r["query_ms_p50"] = round(latency_ms(deployed, [it.prompt for it in items] or [q.question for q in faq]), 2)
            results[name] = r
        if "bm25" in per_question:  # each other retriever against bm25, paired over the same questions
            for name in results:
                if name != "bm25":
                    results[name]["vs_bm25"] = {m: versus(per_question["bm25"][m], v, m.startswith("recall"))
                                                for m, v in per_question[name].items()}

    head = "| retriever | " + " | ".join(f"recall@{x}" for x in KS) + (f" | answer coverage@{k} | @5" if faq else "") + " | query ms p50 |"
    lines = ["", head, "|---" + "|--:" * (head.count("|") - 2) + "|"]
    for name, r in results.items():
        rec = r.get("generated_recall", {})
        cells = [f"{rec.get(str(x), float('nan')):.3f}" for x in KS]
        if faq:
            cells += [f"{r[f'answer_coverage@{k}']:.3f}", f"{r['answer_coverage@5']:.3f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['query_ms_p50']:.1f} |")
    for name, r in results.items():
        for m, d in r.get("vs_bm25", {}).items():
            lines.append(f"{name} - bm25, {m}: {d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] ({d['verdict']})")
    print("\n".join(lines))
    out = {"run": str(args.run_dir), "passages": len(train), "heldout_passages": len(heldout),
           "generated_questions": len(items), "questions": len(faq), "k": k, "results": results,
           **{key: round(v, 2) if isinstance(v, float) else v for key, v in timings.items()}}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
