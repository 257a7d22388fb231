"""Typed records that cross stage boundaries.

Each stage writes these as JSON lines (one object per line), which `datasets.load_dataset("json", ...)` reads
directly. The schemas are versioned: bump SCHEMA_VERSION when a field changes meaning, never silently.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class Rejection(Record):
    """A file or record a stage could not use, and why. Rejections are data: counted, listed, kept."""

    source: str
    reason: str
    detail: str = ""


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
    kind: str  # rephrase | qa | mcq | cloze | summary | preference
    chunk_id: str
    doc_id: str
    origin: str  # "extractive" (correct by construction) or the teacher that wrote it
    prompt: str
    answer: str
    choices: list[str] = Field(default_factory=list)
    answer_index: int | None = None
    rejected: str | None = None
    context: str = ""  # the grounding passage
