"""Training progress: one slmforge bar per stage (optimizer steps, ETA) and a tidy loss line, rank 0 only."""

from __future__ import annotations

import os


def progress_callback(description: str):
    """A TrainerCallback that advances a slmforge.console.track bar once per optimizer step (rank 0 only)."""
    from transformers import TrainerCallback

    from slmforge.console import console, track

    class Progress(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:
                self.bar = iter(track(range(state.max_steps), description, total=state.max_steps))
                for _ in range(state.global_step + 1):  # resumed runs start part-way
                    next(self.bar, None)

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                next(self.bar, None)

        def on_log(self, args, state, control, logs=None, **kw):
            if self.bar is not None and logs and "loss" in logs and os.environ.get("SLMFORGE_QUIET") != "1":
                console.print(f"  step {state.global_step}: loss {logs['loss']:.4f}, lr {logs.get('learning_rate', 0):.2e}",
                              highlight=False)

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                for _ in self.bar:  # exhaust: closes the bar
                    pass

    return Progress()
