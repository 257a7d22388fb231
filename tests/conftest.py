"""Shared fixtures: small real corpora on disk and recipes pointing at them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("SLMFORGE_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DEMO_DOCS = REPO / "examples" / "postgres" / "docs"

# Distinct technical paragraphs (PostgreSQL-flavoured) so quality and relevance filters have real text to judge.
TOPICS = [
    ("Indexes", "An index lets the database server find and retrieve specific rows much faster than it could do without an index. "
                "Creating an index on a column used in a WHERE clause often turns a sequential scan into an index scan."),
    ("Transactions", "A transaction bundles multiple steps into a single, all-or-nothing operation. The intermediate states between "
                     "the steps are not visible to other concurrent transactions, and if some failure occurs the steps have no effect."),
    ("Vacuum", "The VACUUM command reclaims storage occupied by dead tuples. In normal operation, tuples that are deleted or obsoleted "
               "by an update are not physically removed from their table until a vacuum is done."),
    ("Data types", "The numeric type can store numbers with a very large number of digits and performs exact calculations. It is "
                   "recommended for storing monetary amounts and other quantities where exactness is required."),
    ("Joins", "Queries can access multiple tables at once, or access the same table in such a way that multiple rows of the table are "
              "being processed at the same time. A query that accesses multiple rows of the same or different tables is a join."),
    ("Constraints", "A check constraint is the most generic constraint type. It allows you to specify that the value in a certain "
                    "column must satisfy a Boolean expression, for instance that product prices must be positive."),
]


_TERMS = ("index", "table", "row", "column", "planner", "vacuum", "checkpoint", "replica", "transaction", "lock",
          "snapshot", "tuple", "page", "buffer", "query", "join", "schema", "trigger", "constraint", "sequence",
          "partition", "statistics", "cursor", "function", "view", "role", "tablespace", "segment", "backup", "log")
_VERBS = ("scans", "updates", "locks", "reads", "rewrites", "flushes", "validates", "splits", "merges", "estimates",
          "caches", "skips", "copies", "orders", "filters", "groups")
_TAILS = ("before the commit finishes", "when the cost estimate is low", "after the server restarts",
          "during a long running report", "while autovacuum is sleeping", "if the statistics are stale",
          "for every new session", "unless the setting is disabled", "as soon as the buffer is full",
          "whenever a replica falls behind")


def paragraph(i: int, n_sentences: int = 6) -> str:
    """A unique, realistic-looking paragraph: topic text plus varied detail sentences (no two paragraphs alike)."""
    import random

    rng = random.Random(i)
    title, text = TOPICS[i % len(TOPICS)]
    details = " ".join(
        f"The {rng.choice(_TERMS)} {rng.choice(_VERBS)} each {rng.choice(_TERMS)} of {rng.choice(_TERMS)} t{i}_{k} "
        f"{rng.choice(_TAILS)}, so the {rng.choice(_TERMS)} {rng.choice(_VERBS)} {rng.randint(2, 999)} {rng.choice(_TERMS)}s."
        for k in range(n_sentences)
    )
    return f"{text} {details}"


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A folder of 12 plain-text and markdown documents about one domain."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(8):
        (docs / f"note{i:02d}.txt").write_text(f"{TOPICS[i % 6][0]} notes {i}\n\n{paragraph(i)}\n\n{paragraph(i + 100)}\n")
    sub = docs / "guides"
    sub.mkdir()
    for i in range(4):
        (sub / f"guide{i}.md").write_text(
            f"# Guide {i}\n\nIntro {paragraph(200 + i, 3)}\n\n## Details\n\n{paragraph(300 + i)}\n\n```\nSELECT * FROM t{i};\n```\n"
        )
    return docs


def write_recipe(folder: Path, documents: Path, **sections) -> Path:
    data = {"name": "t", "documents": str(documents), "run_dir": str(folder / "runs"), **sections}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def recipe_file(tmp_path: Path, corpus: Path) -> Path:
    return write_recipe(tmp_path, corpus, curate={"heldout_fraction": 0.25})


_demo_curate: list[Path] = []


def demo_curate() -> Path:
    """The curate folder of the shipped demo corpus (ingest + curate), built once per test session (~10 s)."""
    if not _demo_curate:
        import tempfile

        from slmforge.curate.stage import CurateStage
        from slmforge.ingest.stage import IngestStage
        from slmforge.recipe import load_recipe
        from slmforge.run import RunDir

        runs = Path(tempfile.mkdtemp(prefix="slmforge-demo-curate-"))
        recipe = load_recipe(REPO / "examples" / "postgres" / "recipe.yaml", overrides=[f"run_dir={runs}"])
        run = RunDir(recipe.run_path)
        run.execute(IngestStage(), recipe)
        run.execute(CurateStage(), recipe)
        _demo_curate.append(recipe.run_path / "curate")
    return _demo_curate[0]
