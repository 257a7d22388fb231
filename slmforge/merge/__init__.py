"""Merge stage: weight interpolations of the specialist with its base and task-vector merges of the stage models
(mergekit), each scored on eval's held-out benchmarks and the forgetting check; optional structured pruning."""

from __future__ import annotations

from pathlib import Path

from slmforge.artifacts import MERGE, MERGED_MODEL, TRAIN_STAGES, trained_model


def merged_model(run) -> Path | None:
    """This run's merge/model when the merge stage finished and the trained models it was made from are unchanged
    since (a retrained specialist makes an old merge stale: then None, and export takes the trained model)."""
    folder = run.path(MERGED_MODEL)
    manifest = run.manifest(MERGE)
    if manifest is None or not (folder / "config.json").is_file():
        return None
    inputs = manifest.get("inputs", {})
    for stage in TRAIN_STAGES:
        label = trained_model(stage).label
        if label in inputs and (not run.has(trained_model(stage)) or run.hash(trained_model(stage)) != inputs[label]):
            return None
    return folder
