"""The built-in stages, imported only when they run (so `slmforge --help` stays fast). Their order is not written down
here: `pipeline_order` derives it from what each stage declares it needs and makes (slmforge/artifacts.py).

To add a stage: subclass `slmforge.run.Stage` (name, needs, makes, run) — tests/test_extension.py is a whole one — and
run it with `RunDir.execute`, or add it here and give it a recipe section to enable it.
"""

from __future__ import annotations

import importlib

from slmforge.artifacts import CURATE, DAPT, DPO, EVAL, EXPORT, GENERATE, INDEX, INGEST, MERGE, SFT, STAGES
from slmforge.run import Stage, pipeline_order

BUILTIN = {
    INGEST: "slmforge.ingest.stage:IngestStage",
    CURATE: "slmforge.curate.stage:CurateStage",
    INDEX: "slmforge.index.stage:IndexStage",
    GENERATE: "slmforge.generate.stage:GenerateStage",
    DAPT: "slmforge.train.dapt:DaptStage",
    SFT: "slmforge.train.sft:SftStage",
    DPO: "slmforge.train.dpo:DpoStage",
    EVAL: "slmforge.evaluate.stage:EvalStage",
    MERGE: "slmforge.merge.stage:MergeStage",
    EXPORT: "slmforge.export.stage:ExportStage",
}
assert tuple(BUILTIN) == STAGES


def load(name: str) -> Stage:
    module, cls = BUILTIN[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def ordered(names, extra=()) -> list[Stage]:
    """The named built-in stages and any extra Stage objects, each after every stage it needs or uses."""
    return pipeline_order([load(n) for n in names] + list(extra))
