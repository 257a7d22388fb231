"""Shared terminal output: progress and messages on stderr (`console`), results on stdout (`results`), progress bars
with an ETA for long loops, and one switch that hides the libraries' own progress noise behind them."""

from __future__ import annotations

import os
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text

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
    import warnings

    # a deprecation inside transformers that TRL's DPOTrainer triggers (transformers 5.x, trl 1.x): addressed to TRL's
    # maintainers, not something a user of the build can act on
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
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


class BuildClock:
    """The whole build's ETA: planned seconds of the stages still to run, the running one at its observed pace."""

    def __init__(self, planned: dict[str, float], budget_s: float | None = None):
        import time

        self.now = time.time
        self.planned, self.budget_s = dict(planned), budget_s
        self.started = self.now()
        self.stage: str | None = None
        self.stage_started = self.started
        self.done: set[str] = set()
        self.deadline: float | None = None  # when the running stage must end for the build to keep its budget

    def begin(self, stage: str) -> None:
        self.stage, self.stage_started = stage, self.now()

    def end(self, stage: str) -> None:
        self.done.add(stage)
        self.stage, self.deadline = None, None

    def remaining(self, fraction: float | None = None) -> float:
        """Seconds left: the stages not started at their planned seconds, plus the running one's plan less the time it
        has run, or more when its bar's pace says so (a stage may run several bars: a finished one says nothing)."""
        left = sum(v for k, v in self.planned.items() if k not in self.done and k != self.stage)
        if self.stage is not None:
            ran = self.now() - self.stage_started
            current = max(0.0, self.planned.get(self.stage, 0.0) - ran)
            if fraction and 0.05 <= fraction < 1:
                current = max(current, ran * (1 - fraction) / fraction)
            left += current
        return left

    def line(self) -> str:
        elapsed = self.now() - self.started
        out = f"build {_clock(elapsed)} elapsed, eta {_clock(self.remaining())}"
        return out + (f" (budget {_clock(self.budget_s)})" if self.budget_s else "")


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


build_clock: BuildClock | None = None  # set by the build (slmforge.budget.build); every bar then shows its ETA


class BuildEtaColumn(ProgressColumn):
    def render(self, task) -> Text:
        clock = build_clock
        if clock is None:
            return Text("")
        fraction = task.completed / task.total if task.total else None
        return Text(f"build eta {_clock(clock.remaining(fraction))}", style="cyan")


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
        *((BuildEtaColumn(),) if build_clock is not None else ()),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)
