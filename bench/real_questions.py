"""Did the specialist learn its documents? Real FAQ questions, never trained on, base vs specialist.

For each dev domain this bench
1. fetches Debian documentation packages with `apt-get download` (after one `apt-get update` when a package is
   not found) and unpacks them with `dpkg-deb -x`, both cached under ~/.cache/slmforge/real_questions/ (`--cache`),
   never in the repository:
       r        r-doc-html: the R manuals are the corpus, R-FAQ.html is held out as the questions
       debian   debian-reference-en is the corpus, debian-faq (another package) gives the questions
       sqlite   sqlite3-doc: every page but faq.html is the corpus (optional, --domains sqlite)
       git      git-doc: the HTML pages but gitfaq.* are the corpus (optional, --domains git)
2. parses the FAQ into question/answer items (bench/faq_parsing.py says how per format, and the drop rules: headings
   that are not questions, empty answers, answers that only point elsewhere, too short, duplicates); kept items go to
   <cache>/<domain>/questions.jsonl, dropped ones with their reason to dropped.jsonl;
3. copies the corpus files into <cache>/<domain>/corpus/ and checks that no FAQ file is there (by name and by
   content hash): the FAQ never reaches training;
4. builds a specialist from that corpus alone with the default CPU recipe: what `slmforge init` writes, plus
   generate, dapt, sft and dpo enabled (demo preset; eval and export are not needed here), `slmforge build` in its
   own process; an unchanged rerun is skipped by slmforge's own cache, and build_s is the sum of the stages'
   manifest times either way;
5. scores the base model and the specialist (the last trained stage) on the FAQ items as 4-way multiple choice with
   slmforge.evaluate.questions (distractors are other FAQ answers, options cut to 30 words, log-likelihood of
   ` {option}` after `Question: {q}\\nAnswer:`), closed-book: the model sees the question only. The paired
   difference of acc_norm (per-token normalised accuracy) has a paired-bootstrap 95% CI and an exact McNemar p
   (slmforge.evaluate.paired); the gold answer's perplexity is compared per item too (NLL per token). Per-item
   scores go to <cache>/<domain>/scores/<specialist's content hash>/scores.json (open_book.json beside it), so
   the arms of an ablation keep their own.

It prints a readable table and ends with exactly one line
    RESULT {"domains": {NAME: {"n", "acc_norm_base", "acc_norm_specialist", "acc_norm_diff", "acc_norm_diff_ci95",
                               "answer_ppl_base", "answer_ppl_specialist", "lexical_reference",
                               "general_ppl_base", "general_ppl_specialist", "general_ppl_change_pct",
                               "general_ppl_change_pct_ci95", "build_s"}}}
lexical_reference is the no-model word-overlap accuracy (the option sharing most content words with the question).
general_ppl_* is forgetting: word perplexity on the eval stage's general-text paragraphs (52 MMLU explanations, not
domain text, never trained on), base vs specialist, the change in percent with a paired bootstrap 95% CI.

Usage:
    python bench/real_questions.py                              # r and debian
    python bench/real_questions.py --domains r,debian,sqlite,git
    python bench/real_questions.py --domains r --skip-build RUN_DIR   # score an existing run (runs/<name>)
    python bench/real_questions.py --set sft.max_steps=64       # recipe overrides for every build (ablations)
    python bench/real_questions.py --domains r --open-book      # also open-book: passages from the run's index
    python bench/real_questions.py --domains r --skip-build RUN_DIR --model OTHER_MODEL --open-book
    python bench/real_questions.py --domains r --skip-build RUN_DIR --open-book --open-book-k 4   # more passages
    python bench/real_questions.py --domains debian --skip-build RUN_DIR --merge   # merge candidates on the FAQ

With --open-book each model is also scored open-book: the run's retrieval index (slmforge's index stage: BM25 over
120-word passages of the corpus documents, the FAQ never among them) gives the top `index.k` passages for each question,
put before it ("Passages:\n[1] [source § section] text ...\n\nQuestion: ...\nAnswer:"). RESULT then adds
acc_norm_open_book_base, acc_norm_open_book_specialist, acc_norm_open_book_diff_ci95 (specialist open-book minus base
open-book), acc_norm_open_vs_closed_base_ci95 (specialist open-book minus base closed-book), answer_coverage (share of
the gold answer's content words found in the retrieved passages) and the run's recall@k of generated questions.

With --merge, the run's eval stage (benchmarks from its held-out documents) and merge stage (mergekit candidates:
the specialist interpolated with its base, TIES/DARE of the stage models; the one with the best held-out domain score
within merge.max_forgetting is kept) run on the built specialist (`slmforge eval` and `slmforge merge`, MERGE_OVERRIDES;
cached like every stage). The FAQ never takes part in that choice. Every candidate is then rebuilt from the mergekit
configuration the stage recorded and scored on the FAQ items like the specialist, with paired CIs against the unmerged
specialist and the base: RESULT adds "merge": {chosen, reason, candidates: {name: {domain_score, domain_gain,
forgetting, faq_acc_norm, faq_vs_specialist_ci95, faq_vs_base_ci95}}}.

With --served as well, both models are scored a second way, in the format `slmforge serve` sends: the chat template
around one user message (the question; or the passages, a blank line and `Question: …`), each option as the start of
the assistant's reply. RESULT adds served_{closed,open}_{base,specialist} and paired CIs of open specialist vs open
base, open specialist vs closed base, closed specialist vs closed base.
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import faq_parsing  # noqa: E402  (bench/faq_parsing.py, beside this file)

DEFAULT_CACHE = Path.home() / ".cache" / "slmforge" / "real_questions"
TRAINING_STAGES = ("ingest", "curate", "generate", "dapt", "sft", "dpo")


@dataclass(frozen=True)
class Domain:
    name: str
    packages: tuple[str, ...]
    corpus_globs: tuple[str, ...]  # relative to the unpacked root of the corpus package
    corpus_package: str
    faq_package: str
    faq_globs: tuple[str, ...]     # the FAQ files, relative to the unpacked root of the FAQ package
    holdout: tuple[str, ...]       # file-name patterns that must never be in the corpus
    parser: str                    # a function of faq_parsing
    require_question: bool = True  # heading-based FAQs: drop headings that are not questions
    faq_exclude: tuple[str, ...] = field(default=())


DOMAINS = {
    "r": Domain("r", ("r-doc-html",), ("usr/share/R/doc/manual/*.html",), "r-doc-html", "r-doc-html",
                ("usr/share/R/doc/manual/R-FAQ.html",), ("R-FAQ*",), "texinfo_html"),
    "debian": Domain("debian", ("debian-reference-en", "debian-faq"), ("usr/share/debian-reference/*.en.html",),
                     "debian-reference-en", "debian-faq", ("usr/share/doc/debian/FAQ/*.en.html",), ("*faq*", "*FAQ*"),
                     "docbook_html", faq_exclude=("index.en.html",)),  # index: the table of contents only
    "sqlite": Domain("sqlite", ("sqlite3-doc",), ("usr/share/doc/sqlite3/**/*.html",), "sqlite3-doc", "sqlite3-doc",
                     ("usr/share/doc/sqlite3/faq.html",), ("faq.html",), "sqlite_faq", require_question=False),
    "git": Domain("git", ("git-doc",), ("usr/share/doc/git-doc/**/*.html",), "git-doc", "git-doc",
                  ("usr/share/doc/git-doc/gitfaq.txt",), ("gitfaq.*",), "asciidoc_faq", require_question=False),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ fetch
def fetch_package(package: str, cache: Path) -> Path:
    """`apt-get download` the package's .deb into <cache>/debs (once) and unpack it to <cache>/unpacked/<package>."""
    debs, root = cache / "debs", cache / "unpacked" / package
    if (root / ".complete").is_file():
        return root
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    for attempt in ("download", "after apt-get update"):
        if found:
            break
        if attempt != "download":  # an empty or stale package list: refresh it once, then try again
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
        proc = subprocess.run(["apt-get", "download", package], cwd=debs, capture_output=True, text=True)
        found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        sys.exit(f"apt-get download {package} failed (is `apt-get update` possible here?):\n{proc.stderr[-2000:]}")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    subprocess.run(["dpkg-deb", "-x", str(found[-1]), str(root)], check=True)
    (root / ".complete").write_text(found[-1].name)
    return root


def _files(root: Path, patterns: tuple[str, ...], exclude: tuple[str, ...] = ()) -> list[Path]:
    out = sorted({Path(p) for pat in patterns for p in glob.glob(str(root / pat), recursive=True) if Path(p).is_file()})
    return [p for p in out if not any(fnmatch.fnmatch(p.name, x) for x in exclude)]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ questions
def parse_faq(domain: Domain, faq_files: list[Path], out_dir: Path) -> tuple[Path, dict]:
    """FAQ files -> <out_dir>/questions.jsonl (kept) and dropped.jsonl (with reasons); returns the path and counts."""
    parse = getattr(faq_parsing, domain.parser)
    items = []
    for path in faq_files:
        items += parse(path.read_text(encoding="utf-8", errors="strict"), path.name)
    kept, dropped = faq_parsing.screen(items, require_question=domain.require_question)
    if not kept:
        sys.exit(f"{domain.name}: no FAQ item kept from {', '.join(str(p) for p in faq_files)} "
                 f"({len(items)} parsed); the page format may have changed")
    out_dir.mkdir(parents=True, exist_ok=True)
    questions = out_dir / "questions.jsonl"
    with questions.open("w", encoding="utf-8") as fh:
        for item in kept:
            fh.write(json.dumps(item, ensure_ascii=False) + "\n")
    with (out_dir / "dropped.jsonl").open("w", encoding="utf-8") as fh:
        for item in dropped:
            fh.write(json.dumps(item, ensure_ascii=False) + "\n")
    reasons: dict[str, int] = {}
    for item in dropped:
        reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
    return questions, {"parsed": len(items), "kept": len(kept), "dropped": len(dropped), "dropped_by_reason": reasons}


# ------------------------------------------------------------------------------------------------ corpus
def build_corpus(domain: Domain, corpus_root: Path, faq_files: list[Path], out: Path) -> dict:
    """Copy the corpus files (relative paths kept) into `out`, then prove no FAQ file is among them."""
    files = _files(corpus_root, domain.corpus_globs, exclude=domain.holdout)
    if not files:
        sys.exit(f"{domain.name}: no corpus files match {domain.corpus_globs} under {corpus_root}")
    if out.exists():
        shutil.rmtree(out)
    for src in files:
        dst = out / src.relative_to(corpus_root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    assert_no_faq(out, faq_files, domain.holdout)
    return {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}


def assert_no_faq(corpus: Path, faq_files: list[Path], holdout: tuple[str, ...]) -> None:
    """Refuse a corpus folder holding an FAQ file: by name (the hold-out patterns) or by content (byte-identical)."""
    faq_hashes = {_sha256(p): p for p in faq_files}
    for path in corpus.rglob("*"):
        if not path.is_file():
            continue
        if any(fnmatch.fnmatch(path.name, pat) for pat in holdout):
            raise RuntimeError(f"FAQ file {path} is in the training corpus {corpus}; the FAQ must never be trained on")
        if (h := _sha256(path)) in faq_hashes:
            raise RuntimeError(f"{path} in the training corpus is a copy of the FAQ file {faq_hashes[h]}")


# ------------------------------------------------------------------------------------------------ build
def write_recipe(domain: Domain, corpus: Path, work: Path) -> Path:
    """`slmforge init` (the default starter recipe, which builds the whole pipeline) with eval and export turned off: the
    bench scores the specialist itself, and exporting it is not needed here."""
    recipe = work / "recipe.yaml"
    if recipe.exists():
        recipe.unlink()
    from slmforge.cli import init  # the `slmforge init` command itself

    init(recipe, documents=str(corpus), name=f"real-{domain.name}")
    return recipe


BUILD_OVERRIDES = ("eval.enabled=false", "export.enabled=false")  # passed to `slmforge build --set`


# the merge measurement: eval builds held-out benchmarks (extractive items, no teacher, so it stays a few minutes) and
# scores base and specialist once; merge scores every candidate on a seeded sample of them and the forgetting check
MERGE_OVERRIDES = ("budget=none", "eval.enabled=true", "eval.teacher=false", "eval.samples=0", "merge.enabled=true",
                   "merge.max_items=40", "merge.benchmarks=[mcq, qa, doc_questions]")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "SLMFORGE_QUIET": "1"}


def slmforge(command: str, recipe: Path, runs: Path, overrides, log_path: Path, mode: str = "w") -> float:
    """`slmforge <command> RECIPE --set run_dir=RUNS --set ...` in its own process, output to log_path (mode "a" adds to
    it); exits with the log's end when it fails. Returns its wall-clock seconds."""
    # -P: `python -m` would put the current directory first on sys.path, before PYTHONPATH (_env), so a bench run from
    # inside another checkout would build with that checkout's slmforge
    cmd = [sys.executable, "-P", "-m", "slmforge.cli", command, str(recipe), "--set", f"run_dir={runs}"]
    for item in overrides:
        cmd += ["--set", item]
    start = time.perf_counter()
    with log_path.open(mode, encoding="utf-8") as fh:
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env()).returncode
    if code != 0:
        sys.exit(f"{command} failed ({' '.join(cmd)}), exit {code}; the end of {log_path}:\n"
                 f"{log_path.read_text(encoding='utf-8', errors='replace')[-3000:]}")
    return time.perf_counter() - start


def build(recipe: Path, runs: Path, overrides: list[str], log_path: Path) -> float:
    return slmforge("build", recipe, runs, [*BUILD_OVERRIDES, *overrides], log_path)


def stage_seconds(run_dir: Path) -> dict[str, float]:
    """Each training stage's own time, from its manifest (so a cached rerun still reports what the build cost)."""
    out = {}
    for stage in TRAINING_STAGES:
        manifest = run_dir / stage / "manifest.json"
        if manifest.is_file():
            out[stage] = float(json.loads(manifest.read_text())["seconds"])
    return out


def specialist_of(run_dir: Path) -> tuple[str, Path]:
    from slmforge.run import RunDir

    trained = RunDir(run_dir).trained_models()
    if not trained:
        sys.exit(f"{run_dir}: no trained model (dapt/sft/dpo) finished in this run")
    stage = list(trained)[-1]
    return stage, trained[stage]


# ------------------------------------------------------------------------------------------------ scoring
def model_identity(spec: str) -> str:
    """sha256 of the model folder's config and weights: a retrained model never reuses an older model's scores."""
    from slmforge.models import resolve_model

    folder = Path(resolve_model(spec))
    h = hashlib.sha256()
    for path in sorted(folder.glob("*.json")) + sorted(folder.glob("*.safetensors")):
        h.update(path.name.encode())
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package.replace("_", "-"))


def score_model(spec: str, rows: list[dict], contexts, batch_size: int, cache: Path | None = None,
                prompts: list[str] | None = None) -> tuple[list[dict], float]:
    """score_mcq of one model on the rows; cached in `cache` by model content, rows, contexts and scoring code."""
    import inspect

    import torch

    from slmforge.evaluate import questions as questions_module
    from slmforge.evaluate.questions import score_mcq
    from slmforge.models import load_causal_lm, load_tokenizer

    code = [questions_module.PROMPT, inspect.getsource(questions_module.prompt_of), inspect.getsource(score_mcq)]
    extra = {"prompts": prompts} if prompts is not None else {}  # (keys of earlier caches unchanged)
    key = hashlib.sha256(json.dumps({"model": model_identity(spec), "rows": rows, "contexts": contexts, **extra,
                                     "batch_size": batch_size, "code": code, "lm_eval": _version("lm_eval"),
                                     "torch": _version("torch")}, sort_keys=True).encode()).hexdigest()[:24]
    cached = cache / f"{key}.json" if cache else None
    if cached and cached.is_file():
        data = json.loads(cached.read_text())
        return data["scores"], data["seconds"]
    start = time.perf_counter()
    model, tok = load_causal_lm(spec), load_tokenizer(spec)
    model.eval()
    with torch.no_grad():
        scored = score_mcq(model, tok, rows, batch_size=batch_size, contexts=contexts, prompts=prompts)
    del model
    seconds = time.perf_counter() - start
    if cached:
        from slmforge.run import atomic_write_json

        atomic_write_json(cached, {"spec": spec, "seconds": seconds, "scores": scored})
    return scored, seconds


GENERAL_TEXT = REPO / "slmforge" / "evaluate" / "data" / "general_text.jsonl"  # the eval stage's general_ppl texts


def general_text_nll(spec: str, cache: Path | None = None) -> list[list[float]]:
    """[[summed NLL, words, tokens] per paragraph] of the general-text paragraphs the eval stage's forgetting check
    uses (52 MMLU explanations, slmforge/evaluate/data/README.md), each scored whole after the tokenizer's BOS (or EOS)
    token, as lm-eval's loglikelihood_rolling does for texts this short; cached by model content and texts."""
    texts = [json.loads(line)["text"] for line in GENERAL_TEXT.read_text(encoding="utf-8").splitlines() if line.strip()]
    key = hashlib.sha256(json.dumps({"model": model_identity(spec), "texts": texts, "v": 1,
                                     "torch": _version("torch")}).encode()).hexdigest()[:24]
    cached = cache / f"general-{key}.json" if cache else None
    if cached and cached.is_file():
        return json.loads(cached.read_text())
    from slmforge.evaluate.questions import _single_loglik  # the summed log-probability the FAQ scoring uses
    from slmforge.models import load_causal_lm, load_tokenizer
    from slmforge.run import atomic_write_json

    model, tok = load_causal_lm(spec), load_tokenizer(spec)
    model.eval()
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    out = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        out.append([-_single_loglik(model, [prefix], ids, max_length=len(ids) + 1), len(text.split()), len(ids)])
    del model
    if cached:
        atomic_write_json(cached, out)
    return out


def general_perplexity(base: list[list[float]], spec: list[list[float]], iters: int = 2000, seed: int = 0) -> dict:
    """Word perplexity of both models on the general text (exp of summed NLL over summed words, lm-eval's
    word_perplexity) and the specialist's change in percent, with a paired bootstrap 95% CI over paragraphs."""
    import math
    import random

    def ppl(rows, idx):
        return math.exp(sum(rows[i][0] for i in idx) / sum(rows[i][1] for i in idx))

    n, rng = len(base), random.Random(seed)
    everything = range(n)
    change = lambda idx: 100.0 * (ppl(spec, idx) / ppl(base, idx) - 1.0)  # noqa: E731
    boots = sorted(change([rng.randrange(n) for _ in everything]) for _ in range(iters))
    return {"general_ppl_base": ppl(base, everything), "general_ppl_specialist": ppl(spec, everything),
            "general_ppl_change_pct": change(everything),
            "general_ppl_change_pct_ci95": [boots[int(0.025 * iters)], boots[min(iters - 1, int(0.975 * iters))]]}


def compare(rows: list[dict], base: list[dict], spec: list[dict]) -> dict:
    from slmforge.evaluate.paired import paired_diff
    from slmforge.evaluate.questions import answer_perplexity, item_nll, references

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    a, b = [s["acc_norm"] for s in base], [s["acc_norm"] for s in spec]
    acc = paired_diff(a, b, binary=True)
    nll = paired_diff(item_nll(base), item_nll(spec), higher_is_better=False)
    refs = references(rows)
    return {"n": len(rows), "acc_norm_base": mean(a), "acc_norm_specialist": mean(b), "acc_norm_diff": acc["diff"],
            "acc_norm_diff_ci95": acc["ci"], "acc_norm_verdict": acc["verdict"], "acc_norm_p_mcnemar": acc["p_mcnemar"],
            "acc_norm_flips": [acc["b_better"], acc["a_better"]],
            "acc_base": mean([s["acc"] for s in base]), "acc_specialist": mean([s["acc"] for s in spec]),
            "answer_ppl_base": answer_perplexity(base), "answer_ppl_specialist": answer_perplexity(spec),
            "answer_nll_diff": nll["diff"], "answer_nll_diff_ci95": nll["ci"], "answer_nll_verdict": nll["verdict"],
            "lexical_reference": refs["word_overlap"]["acc"], "chance": refs["chance"]["acc"],
            "longest_option": refs["longest_option"]["acc"]}


def open_book_contexts(run_dir: Path, rows: list[dict], questions, k: int | None = None) -> tuple[list[str], dict]:
    """Top-k passages of the run's index per question (k = the recipe's index.k, as serving uses, unless given), and
    retrieval facts."""
    from slmforge.artifacts import GENERATE_REPORT, INDEX
    from slmforge.evaluate.questions import content_words
    from slmforge.index import open_index
    from slmforge.index.bm25 import context_of
    from slmforge.run import RunDir

    run = RunDir(run_dir)
    try:
        index = open_index(run, deployed=True)
    except FileNotFoundError as err:
        sys.exit(f"{run_dir}: no retrieval index ({err}); build with the index stage enabled")
    k = k or (run.manifest(INDEX) or {}).get("config", {}).get("stage", {}).get("k", 2)
    answers = {q.id: q.answer for q in questions}
    hits = index.search_many([r["question"] for r in rows], k)
    coverage = []
    for row, h in zip(rows, hits):
        gold = content_words(answers[row["id"]])
        seen = set().union(*(content_words(x.passage.text) for x in h)) if h else set()
        coverage.append(len(gold & seen) / len(gold) if gold else 0.0)
    recall = run.read(GENERATE_REPORT).get("retrieval", {}) if run.has(GENERATE_REPORT) else {}
    return [context_of(h) for h in hits], {"open_book_k": k, "answer_coverage": sum(coverage) / len(coverage),
                                           "no_passage": sum(not h for h in hits), "generated_recall": recall}


def chat_prompts(rows: list[dict], contexts: list[str] | None) -> list[str]:
    """Each question as `slmforge serve` sends it to the model: the chat template around one user message, which is
    the question (closed book) or the retrieved passages, a blank line and `Question: …` (serve/retrieval.py)."""
    from slmforge.models import load_tokenizer

    tok = load_tokenizer("default")  # the specialist keeps its base's tokenizer files and chat template
    users = [f"{c}\n\nQuestion: {r['question']}" if c else r["question"] for r, c in zip(rows, contexts or [None] * len(rows))]
    return [tok.apply_chat_template([{"role": "user", "content": u}], add_generation_prompt=True, tokenize=False) for u in users]


def served(rows: list[dict], contexts: list[str], model_dir: Path, args, work: Path) -> dict:
    """Closed and open book in the served format (chat template), base and specialist: {served_*} results."""
    from slmforge.evaluate.paired import paired_diff

    out, scores = {}, {}
    for book, ctx in (("closed", None), ("open", contexts)):
        prompts = chat_prompts(rows, ctx)
        for name, spec in (("base", "default"), ("specialist", str(model_dir))):
            scores[book, name], _ = score_model(spec, rows, None, args.batch_size, work / "score_cache", prompts=prompts)
            out[f"served_{book}_{name}"] = sum(x["acc_norm"] for x in scores[book, name]) / len(rows)
    acc = lambda s: [x["acc_norm"] for x in s]  # noqa: E731
    for label, a, b in (("served_open_spec_vs_open_base", ("open", "base"), ("open", "specialist")),
                        ("served_open_spec_vs_closed_base", ("closed", "base"), ("open", "specialist")),
                        ("served_closed_spec_vs_closed_base", ("closed", "base"), ("closed", "specialist"))):
        d = paired_diff(acc(scores[a]), acc(scores[b]), binary=True)
        out[f"{label}_diff"], out[f"{label}_ci95"], out[f"{label}_verdict"] = d["diff"], d["ci"], d["verdict"]
    log(f"served format (chat template): " + ", ".join(f"{k} {v:.3f}" for k, v in out.items() if isinstance(v, float)))
    return out


def open_book(rows: list[dict], base_closed: list[dict], base_open: list[dict], spec_open: list[dict]) -> dict:
    from slmforge.evaluate.paired import paired_diff

    acc = lambda xs: [s["acc_norm"] for s in xs]  # noqa: E731
    vs_open = paired_diff(acc(base_open), acc(spec_open), binary=True)
    vs_closed = paired_diff(acc(base_closed), acc(spec_open), binary=True)
    base_gain = paired_diff(acc(base_closed), acc(base_open), binary=True)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"acc_norm_open_book_base": mean(acc(base_open)), "acc_norm_open_book_specialist": mean(acc(spec_open)),
            "acc_norm_open_book_diff": vs_open["diff"], "acc_norm_open_book_diff_ci95": vs_open["ci"],
            "acc_norm_open_book_verdict": vs_open["verdict"], "acc_norm_open_vs_closed_base": vs_closed["diff"],
            "acc_norm_open_vs_closed_base_ci95": vs_closed["ci"], "acc_norm_open_vs_closed_base_verdict": vs_closed["verdict"],
            "acc_norm_open_book_base_gain_ci95": base_gain["ci"]}


def merge_candidates(run_dir: Path, recipe: Path, rows: list[dict], base: list[dict], spec: list[dict], stage: str,
                     args, work: Path) -> dict:
    """Run eval and merge on the run, rebuild each candidate from its recorded mergekit configuration, score it on the
    FAQ closed-book and compare it with the unmerged specialist and the base (paired)."""
    from slmforge.evaluate.paired import paired_diff
    from slmforge.merge.candidates import run_merge
    from slmforge.merge.stage import _safe

    log_path = work / "merge.log"
    log_path.write_text("")
    overrides = [*MERGE_OVERRIDES, f"eval.models=[base, {stage}]", *(args.set or [])]
    for name in ("eval", "merge"):  # on the run as it is (its earlier stages untouched); cached like every stage
        log(f"[{run_dir.name}] slmforge {name} (log: {log_path})")
        slmforge(name, recipe, run_dir.parent, overrides, log_path, mode="a")
    doc = json.loads((run_dir / "merge" / "candidates.json").read_text())
    seed = json.loads((run_dir / "merge" / "manifest.json").read_text())["seed"]
    acc = lambda xs: [s["acc_norm"] for s in xs]  # noqa: E731
    out = {"chosen": doc["chosen"], "reason": doc["reason"], "max_forgetting": doc["max_forgetting"],
           "domain_benchmarks": doc["domain_benchmarks"], "items": doc["benchmarks"], "candidates": {}}
    for row in doc["candidates"]:
        name = row["name"]
        if name == doc["specialist"]:
            scores = spec
        elif name == "base":
            scores = base
        else:
            folder = work / "merge_candidates" / _safe(name)
            recorded = folder / "slmforge_merge_config.json"
            config = json.dumps(row["config"], sort_keys=True)
            if not (recorded.is_file() and recorded.read_text() == config and (folder / "config.json").is_file()):
                log(f"[{run_dir.name}] merging {name} again from the stage's recorded configuration")
                run_merge(row["config"], folder, str(run_dir / stage / "model"), seed)
                recorded.write_text(config)
            scores, seconds = score_model(str(folder), rows, None, args.batch_size, work / "score_cache")
            log(f"[{run_dir.name}] {name} scored in {seconds:.0f} s")
        vs_spec = paired_diff(acc(spec), acc(scores), binary=True)
        vs_base = paired_diff(acc(base), acc(scores), binary=True)
        out["candidates"][name] = {
            "domain_score": row["domain_score"], "domain_gain": row["domain_gain"], "forgetting": row["forgetting"],
            "within_limit": row.get("within_limit"), "chosen": row.get("chosen", False),
            "faq_acc_norm": sum(acc(scores)) / len(scores),
            "faq_vs_specialist": vs_spec["diff"], "faq_vs_specialist_ci95": vs_spec["ci"], "faq_vs_specialist_verdict": vs_spec["verdict"],
            "faq_vs_base": vs_base["diff"], "faq_vs_base_ci95": vs_base["ci"], "faq_vs_base_verdict": vs_base["verdict"]}
    return out


def print_merge_table(name: str, m: dict) -> None:
    lines = ["", f"merge candidates, {name} (held-out benchmarks: {', '.join(m['domain_benchmarks'])}; "
             f"items {m['items']}; FAQ closed-book, never used for the choice)",
             "| candidate | domain score | Δ vs specialist | forgetting | FAQ acc_norm | FAQ − specialist [95% CI] "
             "| FAQ − base [95% CI] | kept |", "|---|--:|--:|--:|--:|--:|--:|---|"]
    for cand, c in m["candidates"].items():
        (a, b), (x, y) = c["faq_vs_specialist_ci95"], c["faq_vs_base_ci95"]
        forgetting = "–" if c["forgetting"] is None else f"{c['forgetting']:+.1%}"
        lines.append(f"| {cand} | {c['domain_score']:.3f} | {c['domain_gain']:+.3f} | {forgetting} | {c['faq_acc_norm']:.3f} "
                     f"| {c['faq_vs_specialist']:+.3f} [{a:+.3f}, {b:+.3f}] | {c['faq_vs_base']:+.3f} [{x:+.3f}, {y:+.3f}] "
                     f"| {'**kept**' if c['chosen'] else ''} |")
    lines.append(f"kept {m['chosen']}: {m['reason']}")
    log("\n".join(lines))


RESULT_KEYS = ("n", "acc_norm_base", "acc_norm_specialist", "acc_norm_diff", "acc_norm_diff_ci95",
               "answer_ppl_base", "answer_ppl_specialist", "lexical_reference", "general_ppl_base",
               "general_ppl_specialist", "general_ppl_change_pct", "general_ppl_change_pct_ci95", "build_s")


SERVED_KEYS = tuple(f"served_{b}_{m}" for b in ("closed", "open") for m in ("base", "specialist")) + tuple(
    f"served_{x}_ci95" for x in ("open_spec_vs_open_base", "open_spec_vs_closed_base", "closed_spec_vs_closed_base"))
OPEN_BOOK_KEYS = ("acc_norm_open_book_base", "acc_norm_open_book_specialist", "acc_norm_open_book_diff_ci95",
                  "acc_norm_open_vs_closed_base_ci95", "answer_coverage", "generated_recall")


def _r(x, nd=4):
    """Floats rounded, inside lists and dicts too."""
    if isinstance(x, dict):
        return {k: _r(v, nd) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_r(v, nd) for v in x]
    return round(x, nd) if isinstance(x, float) else x


def print_table(results: dict) -> None:
    lines = ["", "| domain | n | base acc_norm | specialist acc_norm | paired diff [95% CI], McNemar p | verdict "
             "| answer ppl base → spec | item NLL/token diff [95% CI] | general ppl change % [95% CI] | word overlap "
             "| longest | chance | build s |", "|---|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|"]
    for name, r in results.items():
        lo, hi = r["acc_norm_diff_ci95"]
        nlo, nhi = r["answer_nll_diff_ci95"]
        glo, ghi = r["general_ppl_change_pct_ci95"]
        lines.append(
            f"| {name} | {r['n']} | {r['acc_norm_base']:.3f} | {r['acc_norm_specialist']:.3f} "
            f"| {r['acc_norm_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}], p={r['acc_norm_p_mcnemar']:.2f} "
            f"| {r['acc_norm_verdict']} | {r['answer_ppl_base']:.1f} → {r['answer_ppl_specialist']:.1f} "
            f"| {r['answer_nll_diff']:+.3f} [{nlo:+.3f}, {nhi:+.3f}] ({r['answer_nll_verdict']}) "
            f"| {r['general_ppl_change_pct']:+.1f} [{glo:+.1f}, {ghi:+.1f}] "
            f"| {r['lexical_reference']:.3f} | {r['longest_option']:.3f} | {r['chance']:.3f} | {r['build_s']:.0f} |")
    log("\n".join(lines))
    if any("acc_norm_open_book_base" in r for r in results.values()):
        lines = ["", "| domain | closed base | open base | open specialist | open spec − open base [95% CI] "
                 "| open spec − closed base [95% CI] | answer words in passages | word overlap |", "|---|--:|--:|--:|--:|--:|--:|--:|"]
        for name, r in results.items():
            if "acc_norm_open_book_base" not in r:
                continue
            (a, b), (c, d) = r["acc_norm_open_book_diff_ci95"], r["acc_norm_open_vs_closed_base_ci95"]
            lines.append(f"| {name} | {r['acc_norm_base']:.3f} | {r['acc_norm_open_book_base']:.3f} "
                         f"| {r['acc_norm_open_book_specialist']:.3f} | {r['acc_norm_open_book_diff']:+.3f} [{a:+.3f}, {b:+.3f}] "
                         f"({r['acc_norm_open_book_verdict']}) | {r['acc_norm_open_vs_closed_base']:+.3f} [{c:+.3f}, {d:+.3f}] "
                         f"({r['acc_norm_open_vs_closed_base_verdict']}) | {r['answer_coverage']:.2f} | {r['lexical_reference']:.3f} |")
        log("\n".join(lines))
    for name, r in results.items():
        f = r["faq"]
        log(f"{name}: FAQ items parsed {f['parsed']}, kept {f['kept']}, dropped {f['dropped']} {f['dropped_by_reason']}; "
            f"corpus {r['corpus']['files']} files, {r['corpus']['bytes'] / 1e6:.1f} MB; specialist = {r['specialist']}; "
            f"stage seconds {r['stage_s']}")


# ------------------------------------------------------------------------------------------------ main
def run_domain(domain: Domain, args) -> dict:
    cache, work = Path(args.cache), Path(args.cache) / domain.name
    roots = {p: fetch_package(p, cache) for p in domain.packages}
    faq_files = _files(roots[domain.faq_package], domain.faq_globs, exclude=domain.faq_exclude)
    if not faq_files:
        sys.exit(f"{domain.name}: no FAQ file matches {domain.faq_globs} in {domain.faq_package}")
    questions_path, faq_counts = parse_faq(domain, faq_files, work)
    log(f"[{domain.name}] FAQ: {faq_counts}")
    corpus = work / "corpus"
    corpus_counts = build_corpus(domain, roots[domain.corpus_package], faq_files, corpus)
    log(f"[{domain.name}] corpus: {corpus_counts['files']} files, {corpus_counts['bytes'] / 1e6:.1f} MB in {corpus}")

    if args.skip_build:
        run_dir = Path(args.skip_build)
        wall = None
    else:
        recipe = write_recipe(domain, corpus, work)
        log(f"[{domain.name}] building the specialist (log: {work / 'build.log'})")
        wall = build(recipe, Path(args.runs), args.set or [], work / "build.log")
        run_dir = Path(args.runs) / f"real-{domain.name}"
        log(f"[{domain.name}] build finished in {wall:.0f} s")
    stages = stage_seconds(run_dir)
    stage, model_dir = ("given", Path(args.model)) if args.model else specialist_of(run_dir)

    from slmforge.evaluate.questions import load_questions, mcq_items

    questions = load_questions(questions_path)
    rows = mcq_items(questions, seed=0, n_options=4, option_words=30)
    base, base_s = score_model("default", rows, None, args.batch_size, work / "score_cache")  # closed-book
    log(f"[{domain.name}] base scored in {base_s:.0f} s")
    spec, spec_s = score_model(str(model_dir), rows, None, args.batch_size, work / "score_cache")
    log(f"[{domain.name}] specialist ({stage}) scored in {spec_s:.0f} s")
    result = compare(rows, base, spec)
    scores_dir = work / "scores" / model_identity(str(model_dir))[:16]  # one folder per specialist: arms never overwrite
    scores_dir.mkdir(parents=True, exist_ok=True)
    result.update(general_perplexity(general_text_nll("default", work / "score_cache"),
                                     general_text_nll(str(model_dir), work / "score_cache")))
    if args.open_book:
        contexts, retrieval = open_book_contexts(run_dir, rows, questions, args.open_book_k)
        base_open, s1 = score_model("default", rows, contexts, args.batch_size, work / "score_cache")
        spec_open, s2 = score_model(str(model_dir), rows, contexts, args.batch_size, work / "score_cache")
        log(f"[{domain.name}] open-book scored in {s1:.0f} s (base) and {s2:.0f} s (specialist)")
        result.update(open_book(rows, base, base_open, spec_open), **retrieval)
        name = f"open_book_k{args.open_book_k}.json" if args.open_book_k else "open_book.json"  # an arm of its own
        (scores_dir / name).write_text(json.dumps({"contexts": contexts, "base": base_open, "specialist": spec_open}))
        if args.served:
            result.update(served(rows, contexts, model_dir, args, work))
    if args.merge:
        recipe_path = work / "recipe.yaml"
        if not recipe_path.is_file():
            sys.exit(f"--merge: {recipe_path} is missing (it is written by a build of this bench)")
        result["merge"] = merge_candidates(run_dir, recipe_path, rows, base, spec, stage, args, work)
    result.update(build_s=sum(stages.values()), build_wall_s=wall, stage_s=stages, specialist=f"{stage}: {model_dir}",
                  faq=faq_counts, corpus=corpus_counts, score_s=[round(base_s, 1), round(spec_s, 1)])
    (scores_dir / "scores.json").write_text(json.dumps({"result": result, "base": base, "specialist": spec}, indent=1))
    log(f"[{domain.name}] per-item scores: {scores_dir}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domains", default="r,debian", help=f"comma-separated, from {', '.join(DOMAINS)}")
    parser.add_argument("--skip-build", default=None, metavar="RUN_DIR", help="score this existing run (one domain)")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="packages, texts, corpus folders and scores")
    parser.add_argument("--runs", default=None, help="run directory for the builds (default: <cache>/runs)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="recipe override for every build")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--open-book", action="store_true", help="also score both models with retrieved passages")
    parser.add_argument("--open-book-k", type=int, default=None, metavar="K", help="with --open-book: passages per "
                        "question (default: the run's index.k, as serving uses)")
    parser.add_argument("--served", action="store_true", help="with --open-book: also score closed and open book in the "
                        "served format (the chat template around the question or the passages prompt, as `slmforge serve` sends it)")
    parser.add_argument("--model", default=None, metavar="MODEL_DIR", help="score this model as the specialist (with "
                        "--skip-build RUN_DIR, whose index gives the open-book passages), e.g. an older build's")
    parser.add_argument("--merge", action="store_true", help="also run eval and merge on the specialist's run and score "
                        "every merge candidate on the FAQ (paired CIs vs the unmerged specialist and the base)")
    args = parser.parse_args()
    from slmforge.console import quiet_libraries

    quiet_libraries()  # transformers' weight-loading bars, as in slmforge's own commands
    args.runs = args.runs or str(Path(args.cache) / "runs")
    names = [d.strip() for d in args.domains.split(",") if d.strip()]
    unknown = [d for d in names if d not in DOMAINS]
    if unknown or not names:
        parser.error(f"unknown domain(s) {unknown}; choose from {', '.join(DOMAINS)}")
    if args.skip_build and len(names) != 1:
        parser.error("--skip-build RUN_DIR scores one run: give exactly one domain with --domains")

    if args.served and not args.open_book:
        parser.error("--served needs --open-book")
    if args.merge and args.model:
        parser.error("--merge merges the run's own specialist: leave out --model")
    results = {name: run_domain(DOMAINS[name], args) for name in names}
    print_table(results)
    for name, r in results.items():
        if "merge" in r:
            print_merge_table(name, r["merge"])
    keys = RESULT_KEYS + (OPEN_BOOK_KEYS if args.open_book else ()) + (SERVED_KEYS if args.served else ())
    if args.merge:
        keys += ("merge",)
    print("RESULT " + json.dumps({"domains": {n: {k: _r(r[k]) for k in keys} for n, r in results.items()}}))


if __name__ == "__main__":
    main()
