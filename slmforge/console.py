"""Shared terminal output: progress and messages on stderr (`console`), results on stdout (`results`), progress bars
with an ETA for long loops, and one switch that hides the libraries' own progress noise behind them."""

from __future__ import annotations

import os
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)  # progress, stage headers, warnings, errors
results = Console()  # what a run produced: the summary table, the comparison table, where the artifacts are
T = TypeVar("T")
_QUIETED = False


def quiet_libraries() -> None:
    """Hide transformers / datasets / huggingface_hub progress bars and info logs ("Loading weights", "Map",
    "Tokenizing train dataset", "Writing model shards"): slmforge's own bars report the same work. Once per process;
    warnings and errors still show. SLMFORGE_LIBRARY_LOGS=1 keeps them, for debugging."""
    global _QUIETED
    if _QUIETED or os.environ.get("SLMFORGE_LIBRARY_LOGS") == "1":
        return
    _QUIETED = True
    # environment first: libraries not imported yet read these at import, including in worker processes
    for var, value in (("TRANSFORMERS_VERBOSITY", "error"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
                       ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                       ("TQDM_DISABLE", "1")):
        os.environ.setdefault(var, value)
    import sys

    if "transformers" in sys.modules:
        from transformers.utils import logging as tf_logging

        tf_logging.set_verbosity_error()
        tf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity_error()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar (count, elapsed, ETA). Quiet when SLMFORGE_QUIET=1 (tests, CI logs)."""
    if os.environ.get("SLMFORGE_QUIET") == "1":
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)
