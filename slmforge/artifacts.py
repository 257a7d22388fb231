"""Every artifact a stage makes, declared once: owning stage, file (or folder) name, record type and role.

This is the contract between stages. A stage lists what it `needs` (and `uses`, when present) and what it `makes`
from these constants; the run derives input hashes and the stage order from those lists, and hands `run()` typed
reads and writes (`StageContext.read` / `write`). Nothing else in the package spells a stage folder or an artifact
file name: code that wants a file asks the run for the artifact (`RunDir.path(ARTIFACT)`).

Roles:
    train    training data: every benchmark is decontaminated against these
    eval     held out: read only to build and score benchmarks, never trained on
    data     intermediate records (documents, chunks, items) that feed later stages
    model    a model folder (safetensors + tokenizer) or model files
    report   what people read: reports, tables, rejection lists
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from slmforge.records import (Chunk, Document, DpoRow, GenerateRejection, Item, Passage, PretrainRow, Rejection, Record,
                              SftRow)

Role = Literal["train", "eval", "data", "model", "report"]

# The stages, by the name of their folder in runs/<name>/ and of their recipe section. Each stage class in
# slmforge/stages.py takes its name from here; the pipeline order is derived from what each stage needs.
INGEST, CURATE, GENERATE, DAPT, SFT, DPO, EVAL, EXPORT = "ingest", "curate", "generate", "dapt", "sft", "dpo", "eval", "export"
INDEX = "index"
TRAIN_STAGES = (DAPT, SFT, DPO)
MERGE = "merge"  # after the training stages and eval (it scores on eval's benchmarks), before export (which takes its model)
STAGES = (INGEST, CURATE, INDEX, GENERATE, DAPT, SFT, DPO, EVAL, MERGE, EXPORT)  # the built-in stages (slmforge/stages.py runs them)
RUN = ""  # artifacts that belong to the run as a whole (the report), not to one stage


@dataclass(frozen=True)
class Artifact:
    """One output of one stage. `record` is the row type of a .jsonl file (None for JSON, text, binary files and folders)."""

    stage: str
    name: str
    role: Role
    record: type[Record] | None = None
    folder: bool = False
    description: str = ""

    @property
    def label(self) -> str:
        """"curate/train.jsonl": how manifests, reports and errors name it."""
        return f"{self.stage}/{self.name}" if self.stage else self.name

    def __str__(self) -> str:
        return self.label


# ------------------------------------------------------------------------------------------------ ingest
DOCUMENTS = Artifact(INGEST, "documents.jsonl", "data", Document, description="every parsed document, with provenance")
CHUNKS = Artifact(INGEST, "chunks.jsonl", "data", Chunk, description="token-bounded chunks of every document")
INGEST_REJECTED = Artifact(INGEST, "rejected.jsonl", "report", Rejection, description="files that could not be read, and why")
INGEST_REPORT = Artifact(INGEST, "report.json", "report")

# ------------------------------------------------------------------------------------------------ curate
TRAIN_CHUNKS = Artifact(CURATE, "train.jsonl", "train", Chunk, description="curated chunks of the training documents")
HELDOUT_CHUNKS = Artifact(CURATE, "heldout.jsonl", "eval", Chunk, description="curated chunks of the held-out documents")
HELDOUT_DOCUMENTS = Artifact(CURATE, "heldout_documents.jsonl", "eval", Document, description="the held-out documents")
CURATE_REMOVED = Artifact(CURATE, "removed", "report", folder=True, description="removed/<filter>.jsonl: dropped chunks")
CURATE_REPORT = Artifact(CURATE, "report.json", "report")

# ------------------------------------------------------------------------------------------------ index
PASSAGES = Artifact(INDEX, "passages.jsonl", "data", Passage, description="retrieval passages of the training chunks")
HELDOUT_PASSAGES = Artifact(INDEX, "heldout_passages.jsonl", "eval", Passage,
                            description="retrieval passages of the held-out chunks (open-book evaluation, serving)")
BM25_TRAIN = Artifact(INDEX, "bm25_train", "data", folder=True, description="BM25 index of the training passages")
BM25_ALL = Artifact(INDEX, "bm25_all", "eval", folder=True,
                    description="BM25 index of training + held-out passages: what a deployed specialist searches")
DENSE_TRAIN = Artifact(INDEX, "dense_train", "data", folder=True,
                      description="MiniLM embeddings of the training passages (index.retriever dense or hybrid)")
DENSE_ALL = Artifact(INDEX, "dense_all", "eval", folder=True,
                     description="MiniLM embeddings of training + held-out passages (index.retriever dense or hybrid)")
INDEX_REPORT = Artifact(INDEX, "report.json", "report")

# ------------------------------------------------------------------------------------------------ generate
ITEMS = Artifact(GENERATE, "items.jsonl", "data", Item, description="every accepted generated or extracted item")
PRETRAIN_ROWS = Artifact(GENERATE, "pretrain.jsonl", "train", PretrainRow, description="texts for continued pretraining")
SFT_ROWS = Artifact(GENERATE, "sft.jsonl", "train", SftRow, description="conversations for SFT")
DPO_ROWS = Artifact(GENERATE, "dpo.jsonl", "train", DpoRow, description="preference pairs for DPO")
GENERATE_REJECTED = Artifact(GENERATE, "rejected.jsonl", "report", GenerateRejection)
GENERATE_REPORT = Artifact(GENERATE, "report.json", "report")


# ------------------------------------------------------------------------------------------------ dapt, sft, dpo
def trained_model(stage: str) -> Artifact:
    """The model folder a training stage makes (LoRA merged; the base's tokenizer and chat template)."""
    return Artifact(stage, "model", "model", folder=True, description=f"the {stage} model (safetensors + tokenizer)")


def adapter(stage: str) -> Artifact:
    return Artifact(stage, "adapter", "model", folder=True, description="the LoRA adapter (method: lora)")


def log_history(stage: str) -> Artifact:
    return Artifact(stage, "log_history.json", "report", description="the Trainer's log (loss per step)")


def tensorboard(stage: str) -> Artifact:
    return Artifact(stage, "tensorboard", "report", folder=True)


def training_outputs(stage: str) -> tuple[Artifact, ...]:
    return trained_model(stage), adapter(stage), log_history(stage), tensorboard(stage)


# ------------------------------------------------------------------------------------------------ eval
BENCHMARKS = Artifact(EVAL, "benchmarks", "eval", folder=True, description="benchmarks/<bench>.jsonl: the frozen items")
DECONTAMINATION = Artifact(EVAL, "decontamination.json", "report")
LM_EVAL_TASKS = Artifact(EVAL, "lm_eval", "eval", folder=True, description="every benchmark as an lm-eval task")
PREDICTIONS = Artifact(EVAL, "predictions", "report", folder=True, description="predictions/<model>.jsonl")
RESULTS = Artifact(EVAL, "results.json", "report", description="scores, CIs and paired differences of every model")
TABLE = Artifact(EVAL, "table.md", "report", description="the comparison table (pasted into the model card)")


def benchmark_file(bench: str) -> str:
    """Name of a frozen benchmark's file inside BENCHMARKS."""
    return f"{bench}.jsonl"


def predictions_file(model: str) -> str:
    return f"{model}.jsonl"


# ------------------------------------------------------------------------------------------------ merge
MERGED_MODEL = Artifact(MERGE, "model", "model", folder=True, description="the chosen merge candidate (or pruned model): "
                        "what export and serve take when the merge stage ran")
MERGE_CANDIDATES = Artifact(MERGE, "candidates.json", "report", description="every candidate's scores, forgetting, paired "
                            "differences from the unmerged specialist, and the choice with its reason")
MERGE_TABLE = Artifact(MERGE, "candidates.md", "report", description="the candidates table")
MERGE_PLOT = Artifact(MERGE, "candidates.png", "report", description="domain gain vs forgetting per candidate")

# ------------------------------------------------------------------------------------------------ export
EXPORTED_MODEL = Artifact(EXPORT, "model", "model", folder=True, description="merged safetensors folder with its model card")
GGUF = Artifact(EXPORT, "gguf", "model", folder=True, description="GGUF files for llama.cpp / Ollama")
MODELFILE = Artifact(EXPORT, "Modelfile", "model", description="for `ollama create`")
MODEL_CARD = Artifact(EXPORT, "model/README.md", "report", description="the model card, inside the model folder (a hub repo)")
VERIFY = Artifact(EXPORT, "verify.json", "report", description="greedy outputs of the HF folder and every GGUF")


def gguf_file(run_name: str, gguf_type: str) -> str:
    """Name of one exported GGUF file inside GGUF."""
    return f"{run_name}-{gguf_type}.gguf"


# ------------------------------------------------------------------------------------------------ the run
REPORT = Artifact(RUN, "report.html", "report", description="the self-contained run report")
BUILD_PLAN = Artifact(RUN, "budget.json", "report", description="the build's probe figures, precision choice and budget "
                      "plan, with planned and actual seconds per stage")
