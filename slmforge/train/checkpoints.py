"""Resume from the newest complete checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def last_checkpoint(output_dir: Path) -> str | None:
    """The newest *complete* checkpoint. transformers' get_last_checkpoint takes the highest-numbered folder, but a
    kill while the Trainer is saving leaves a folder without (or with a truncated) trainer_state.json, which the Trainer
    writes last and not atomically; such folders are removed so the rerun saves that step again."""
    if not output_dir.is_dir():
        return None
    folders = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    for folder in sorted(folders, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        try:
            json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]
            return str(folder)
        except (OSError, ValueError, KeyError, TypeError):
            shutil.rmtree(folder, ignore_errors=True)
    return None
