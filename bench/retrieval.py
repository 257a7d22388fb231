"""Retrieval quality of bm25, dense (MiniLM) and hybrid (RRF) on a finished run's own passages, without changing the run.

Reads the run's index-stage passages (training, held-out) and generate-stage items; builds each retriever's index in a
temporary folder (saved and loaded back, as the index stage and its readers do) and measures:
  - recall@1/2/5/10 of each generated question's source chunk (items of kind qa), on the training index, as the
    generate stage's RAFT data measures it (slmforge.index.bm25.recall_from_hits);
  - with --questions (e.g. a real FAQ, or the recipe's eval.questions): answer coverage, the share of the gold answer's
    content words present in the top-k passages of the deployed index (training + held-out), as
    bench/real_questions.py:open_book_contexts computes it (k = the run's index.k), and at k=5;
  - the time to embed the passages, and the single-query search latency (p50 over up to 50 questions).

    .venv/bin/python bench/retrieval.py RUN_DIR [--questions FILE] [--retrievers bm25,dense,hybrid]
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


def coverage(hits, answers: list[str]) -> float:
    """Mean share of each gold answer's content words found in its hits' passages (open_book_contexts' figure)."""
    from slmforge.evaluate.questions import content_words

    shares = []
    for h, answer in zip(hits, answers):
        gold = content_words(answer)
        seen = set().union(*(content_words(x.passage.text) for x in h)) if h else set()
        shares.append(len(gold & seen) / len(gold) if gold else 0.0)
    return sum(shares) / len(shares) if shares else float("nan")


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
            dense_train = DenseIndex.build(train, model, progress=None)
            timings["embed_train_s"] = time.perf_counter() - start
            start = time.perf_counter()
            dense_train.extended(heldout, progress=None).save(tmp / "dense_all")
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

        results = {}
        for name in wanted:
            training, deployed = indexes[name]
            r: dict = {}
            if items:
                hits = training.search_many([it.prompt for it in items], max(KS))
                r["generated_recall"] = recall_from_hits(hits, [it.chunk_id for it in items], KS)
            if faq:
                answers = [q.answer for q in faq]
                hits = deployed.search_many([q.question for q in faq], max(k, 5))
                r[f"answer_coverage@{k}"] = round(coverage([h[:k] for h in hits], answers), 4)
                r["answer_coverage@5"] = round(coverage([h[:5] for h in hits], answers), 4)
            r["query_ms_p50"] = round(latency_ms(deployed, [it.prompt for it in items] or [q.question for q in faq]), 2)
            results[name] = r

    head = "| retriever | " + " | ".join(f"recall@{x}" for x in KS) + (f" | answer coverage@{k} | @5" if faq else "") + " | query ms p50 |"
    lines = ["", head, "|---" + "|--:" * (head.count("|") - 2) + "|"]
    for name, r in results.items():
        rec = r.get("generated_recall", {})
        cells = [f"{rec.get(str(x), float('nan')):.3f}" for x in KS]
        if faq:
            cells += [f"{r[f'answer_coverage@{k}']:.3f}", f"{r['answer_coverage@5']:.3f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['query_ms_p50']:.1f} |")
    print("\n".join(lines))
    out = {"run": str(args.run_dir), "passages": len(train), "heldout_passages": len(heldout),
           "generated_questions": len(items), "questions": len(faq), "k": k, "results": results,
           **{key: round(v, 2) if isinstance(v, float) else v for key, v in timings.items()}}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
