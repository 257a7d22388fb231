"""Ablation on a real FAQ: several builds of one domain (one idea changed each), every specialist against the first.

    python bench/real_questions.py --domains debian --runs RUNS_A                       # arm A (the reference)
    python bench/real_questions.py --domains debian --runs RUNS_B --set budget=none \\
        --set dapt.max_steps=80 ... --set sft.selection.method=loss                     # arm B: A's planned steps, one change
    python bench/ablation.py --domain debian --arm A=RUNS_A/real-debian --arm B=RUNS_B/real-debian
    python bench/ablation.py --domain debian --arm SFT=RUNS_A/real-debian@sft --arm DPO=RUNS_A/real-debian   # one
                                                                  # build's stages: what its last stage added

Each specialist is scored (cached, as bench/real_questions.py scores it) on the domain's held-out FAQ, closed book; the
table gives each arm's MCQ acc_norm and gold-answer NLL/token with paired 95% CIs against the first arm and against
the base, and the tokens each training stage saw (an arm at equal tokens must match the reference there). Ends with
`RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_questions as rq  # noqa: E402

TOKENS = ("dapt", "sft", "dpo")


def tokens_seen(run_dir: Path) -> dict[str, int]:
    out = {}
    for stage in TOKENS:
        manifest = run_dir / stage / "manifest.json"
        if manifest.is_file():
            out[stage] = int(json.loads(manifest.read_text())["counts"].get("tokens_seen", 0))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domain", required=True, choices=sorted(rq.DOMAINS))
    parser.add_argument("--arm", action="append", required=True, metavar="NAME=RUN_DIR[@STAGE]",
                        help="first = the reference; @STAGE scores that stage's model (default: the last trained)")
    parser.add_argument("--cache", default=str(rq.DEFAULT_CACHE))
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    from slmforge.evaluate.paired import paired_diff
    from slmforge.evaluate.questions import answer_perplexity, item_nll, load_questions, mcq_items

    work = Path(args.cache) / args.domain
    questions_path = work / "questions.jsonl"
    if not questions_path.is_file():
        sys.exit(f"{questions_path} is missing: run bench/real_questions.py --domains {args.domain} first")
    rows = mcq_items(load_questions(questions_path), seed=0, n_options=4, option_words=30)
    base, _ = rq.score_model("default", rows, None, args.batch_size, work / "score_cache")
    arms = []
    for item in args.arm:
        name, _, run = item.partition("=")
        run, _, only = run.partition("@")  # RUN_DIR@sft: that stage's model instead of the last trained one
        if only:
            from slmforge.run import RunDir

            trained = RunDir(Path(run)).trained_models()
            if only not in trained:
                sys.exit(f"{run}: no {only} model (trained: {', '.join(trained) or 'none'})")
            stage, model_dir = only, trained[only]
        else:
            stage, model_dir = rq.specialist_of(Path(run))
        scores, _ = rq.score_model(str(model_dir), rows, None, args.batch_size, work / "score_cache")
        arms.append((name, Path(run), stage, scores))

    def diff(a, b) -> dict:
        acc = paired_diff([s["acc_norm"] for s in a], [s["acc_norm"] for s in b], binary=True)
        nll = paired_diff(item_nll(a), item_nll(b), higher_is_better=False)
        return {"acc_norm": [round(acc["diff"], 4), [round(x, 4) for x in acc["ci"]], acc["verdict"]],
                "nll": [round(nll["diff"], 4), [round(x, 4) for x in nll["ci"]], nll["verdict"]]}

    ref = arms[0][3]
    result = {"domain": args.domain, "n": len(rows), "acc_norm_base": round(sum(s["acc_norm"] for s in base) / len(rows), 4),
              "answer_ppl_base": round(answer_perplexity(base), 3), "arms": {}}
    print(f"| arm | specialist | acc_norm | vs {arms[0][0]} [95% CI] | vs base [95% CI] | answer ppl | NLL/token vs "
          f"{arms[0][0]} [95% CI] | tokens seen (dapt / sft / dpo) |")
    print("|---|---|--:|--:|--:|--:|--:|---|")
    print(f"| base | – | {result['acc_norm_base']:.3f} | | | {result['answer_ppl_base']:.1f} | | |")
    for name, run, stage, scores in arms:
        vs_ref, vs_base = diff(ref, scores), diff(base, scores)
        acc = sum(s["acc_norm"] for s in scores) / len(rows)
        seen = tokens_seen(run)
        result["arms"][name] = {"run": str(run), "specialist": stage, "acc_norm": round(acc, 4), "vs_reference": vs_ref,
                                "vs_base": vs_base, "answer_ppl": round(answer_perplexity(scores), 3), "tokens_seen": seen}
        fmt = lambda d: f"{d[0]:+.3f} [{d[1][0]:+.3f}, {d[1][1]:+.3f}]"  # noqa: E731
        print(f"| {name} | {stage} | {acc:.3f} | {fmt(vs_ref['acc_norm']) if name != arms[0][0] else '–'} | "
              f"{fmt(vs_base['acc_norm'])} | {answer_perplexity(scores):.1f} | "
              f"{fmt(vs_ref['nll']) if name != arms[0][0] else '–'} | "
              f"{' / '.join(f'{seen.get(s, 0):,}' for s in TOKENS)} |")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
