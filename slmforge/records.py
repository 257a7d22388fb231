"""Typed records that cross stage boundaries.

Each stage writes these as JSON lines (one object per line), which `datasets.load_dataset("json", ...)` reads
directly. The schemas are versioned: each record type carries `schema_version`; bump it when a field changes
meaning, never silently. The version is written into the producing stage's manifest and checked when a later stage
reads the artifact (`slmforge.run.RunDir.read`), so an artifact written by an older slmforge is never misread.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1  # the version every record type starts at


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: ClassVar[int] = SCHEMA_VERSION

    @classmethod
    def schema_id(cls) -> str:
        """"Chunk/1": what a manifest records for an artifact of this type."""
        return f"{cls.__name__}/{cls.schema_version}"


class Section(Record):
    """A run of text under one heading path, e.g. ["Tutorial", "Creating a Table"]."""

    headings: list[str] = Field(default_factory=list)
    text: str


class Document(Record):
    """One source file after parsing, with its provenance."""

    id: str  # stable: derived from the path relative to the corpus root
    source: str  # path relative to the corpus root
    format: str  # txt | md | html | pdf | docx
    sha256: str  # of the raw file bytes
    title: str
    sections: list[Section]
    encoding: str | None = None  # set for text formats; "utf-8" unless a fallback decoder was needed

    @property
    def text(self) -> str:
        return "\n\n".join(s.text for s in self.sections)


class Chunk(Record):
    """A token-bounded piece of one document; the unit of curation and generation."""

    id: str  # "<doc_id>-<index:04d>"
    doc_id: str
    index: int
    source: str
    title: str
    headings: list[str]
    text: str
    n_tokens: int


class Passage(Record):
    """A retrieval unit: a sentence-aligned window of one chunk, small enough that a few fit a small model's prompt."""

    id: str  # "<chunk_id>-p<j>"
    chunk_id: str
    doc_id: str
    source: str
    title: str
    section: str  # the innermost specific heading (what a citation names)
    text: str

    @property
    def citation(self) -> str:
        """"[source § section]": how answers and the server cite a passage."""
        return f"[{self.source} § {self.section}]" if self.section else f"[{self.source}]"


class Rejection(Record):
    """A file or record a stage could not use, and why. Rejections are data: counted, listed, kept."""

    source: str
    reason: str
    detail: str = ""


ItemKind = Literal["rephrase", "qa", "mcq", "cloze", "summary", "preference"]
ITEM_KINDS: tuple[str, ...] = ItemKind.__args__  # the one list of item kinds


class Item(Record):
    """One generated or extracted example: training data, or a benchmark question when built from held-out chunks.

    Field use by kind (answer is always the reference / chosen output):
      rephrase    prompt = instruction,        answer = rewritten passage (pretraining text)
      qa          prompt = question,           answer = grounded answer
      mcq         prompt = question,           choices = 4 options, answer_index, answer = choices[answer_index]
      cloze       prompt = text before the gap, answer = the missing continuation
      summary     prompt = passage,            answer = summary
      preference  prompt = question,           answer = chosen (grounded), rejected = worse answer
    """

    id: str  # content hash: equal items get equal ids
    kind: ItemKind
    chunk_id: str
    doc_id: str
    origin: str  # "extractive" (correct by construction) or the teacher that wrote it
    prompt: str
    answer: str
    choices: list[str] = Field(default_factory=list)
    answer_index: int | None = None
    rejected: str | None = None
    context: str = ""  # the grounding passage


# ------------------------------------------------------------------------------------- training rows (generate -> train)
class Message(Record):
    role: Literal["system", "user", "assistant"]
    content: str


class PretrainRow(Record):
    """A text for continued pretraining: a rephrasing, a summary or a reading-comprehension passage."""

    text: str
    chunk_id: str = ""
    teacher: str = ""
    kind: str = ""


class SftRow(Record):
    """One conversation for supervised fine-tuning (TRL's `messages` column)."""

    messages: list[Message]
    chunk_id: str = ""
    teacher: str = ""
    kind: str = ""


class DpoRow(Record):
    """One preference pair in TRL's conversational format (`prompt`, `chosen`, `rejected`)."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    chunk_id: str = ""
    teacher: str = ""
    kind: str = Field("", description="preference (grounded over term-swapped or closed-book answer), raft, matching")


class GenerateRejection(Record):
    """A candidate item (or teacher request) the generate stage did not keep, and why."""

    kind: str
    chunk_id: str
    origin: str
    reason: str
    detail: str = ""
    unit: str = ""
    item: dict[str, Any] | None = None


class Prediction(Record):
    """One model's scores (and generation) on one benchmark item: a row of eval/predictions/<model>.jsonl."""

    model_config = ConfigDict(extra="allow", frozen=True)  # one field per metric of the benchmark

    bench: str
    id: str | None = None
