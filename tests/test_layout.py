"""The stage contract is declared once: no stage folder or artifact file name is spelled outside slmforge/artifacts.py.

Counted from the source (AST): a string literal equal to a declared artifact file name (e.g. "train.jsonl"), or a stage
name / artifact folder name used to build a path (an operand of `/`, or an argument of stage_dir / manifest / require /
path / cache_dir / joinpath). `python tests/test_layout.py [PACKAGE_DIR]` prints the counts for any checkout.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "slmforge"
STAGE_NAMES = {"ingest", "curate", "generate", "dapt", "sft", "dpo", "eval", "export"}
FILE_NAMES = {"documents.jsonl", "chunks.jsonl", "rejected.jsonl", "report.json", "train.jsonl", "heldout.jsonl",
              "heldout_documents.jsonl", "items.jsonl", "pretrain.jsonl", "sft.jsonl", "dpo.jsonl", "log_history.json",
              "decontamination.json", "results.json", "table.md", "verify.json", "Modelfile", "report.html"}
FOLDER_NAMES = {"model", "adapter", "tensorboard", "benchmarks", "lm_eval", "predictions", "gguf", "removed"}
PATH_CALLS = {"stage_dir", "manifest", "require", "artifact_hash", "path", "cache_dir", "joinpath", "has"}


def literals(package: Path = PACKAGE) -> Counter:
    """(file, literal) -> count of contract names spelled outside their declaration."""
    found: Counter = Counter()
    for path in sorted(package.rglob("*.py")):
        if path.name == "artifacts.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        path_args = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
                path_args.update(id(n) for n in (node.left, node.right))
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in PATH_CALLS:
                path_args.update(id(a) for a in node.args)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                v = node.value
                if v in FILE_NAMES or (v in STAGE_NAMES | FOLDER_NAMES and id(node) in path_args):
                    found[(path.relative_to(package.parent).as_posix(), v)] += 1
    return found


def test_no_stage_folder_or_artifact_file_name_outside_its_declaration():
    found = literals()
    assert not found, "spelled outside slmforge/artifacts.py:\n" + "\n".join(f"  {f}: {v!r} x{n}" for (f, v), n in found.items())


def test_the_built_in_pipeline_order_is_derived_from_what_stages_need():
    from slmforge.artifacts import STAGES
    from slmforge.stages import BUILTIN, ordered

    assert [s.name for s in ordered(list(BUILTIN)[::-1])] == list(STAGES)


if __name__ == "__main__":
    counts = literals(Path(sys.argv[1]) if len(sys.argv) > 1 else PACKAGE)
    for (f, v), n in sorted(counts.items()):
        print(f"{f}: {v!r} x{n}")
    print(f"total {sum(counts.values())} in {len({f for f, _ in counts})} files")
