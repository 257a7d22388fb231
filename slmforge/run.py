"""The run directory: stage folders, atomic writes, manifests, content-hash skip and resume.

Layout of runs/<name>/:
    <stage>/            finished output of a stage, with manifest.json (appears atomically, by rename)
    .work/<stage>-<key>/ a stage in progress; kept after a crash so the rerun resumes from it
    cache/              content-addressed caches shared across reruns (e.g. one parsed file per hash)

A stage's key hashes its code version, its recipe slice and the content of its inputs. A finished stage with
the same key is skipped; a different key reruns it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from pydantic import BaseModel

from slmforge.recipe import Recipe

MANIFEST = "manifest.json"
TRACKED_PACKAGES = ("slmforge", "torch", "transformers", "tokenizers", "datatrove", "trl", "peft", "accelerate", "datasets")


# ------------------------------------------------------------------------------------------ atomic I/O
_UMASK = os.umask(0)
os.umask(_UMASK)

def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts are meant to be shared like any file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def _row(r: BaseModel | dict) -> dict:
    return r.model_dump(mode="json") if isinstance(r, BaseModel) else r


def atomic_write_jsonl(path: Path, rows: Iterable[BaseModel | dict]) -> int:
    """JSON lines, one record per line, as `datasets.load_dataset("json")` reads them. Returns the row count."""
    lines = [json.dumps(_row(r), ensure_ascii=False) for r in rows]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_jsonl(path: Path, model: type[BaseModel] | None = None) -> list:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [model.model_validate(r) for r in rows] if model else rows


# ------------------------------------------------------------------------------------------ hashing
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Content hash of a file; remembered per (path, inode, size, mtime) so a run hashes each input once. A file changed
    in the last 2 s is always read (git's "racy clean" rule: a same-size rewrite within one mtime tick looks unchanged)."""
    st = os.stat(path)
    if time.time_ns() - st.st_mtime_ns < 2_000_000_000:
        return _sha256_file.__wrapped__(path, st.st_ino, st.st_size, st.st_mtime_ns)
    return _sha256_file(os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=1 << 16)
def _sha256_file(path: str, ino: int, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hash_obj(obj: Any) -> str:
    """Hash of a JSON-able object with sorted keys, so equal content gives an equal hash."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str, ensure_ascii=False).encode())


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


# ------------------------------------------------------------------------------------------ stages
@dataclass
class StageContext:
    """What a stage's `run` gets: where to write, where to keep resumable partial work, and the recipe."""

    recipe: Recipe
    run: "RunDir"
    out: Path  # write final artifacts here (becomes runs/<name>/<stage>/ on success)
    scratch: Path  # partial work that survives a crash, for resume; deleted on success
    counts: dict[str, Any] = field(default_factory=dict)  # stage fills it: lands in the manifest and summary


class Stage:
    """A pipeline stage. Subclasses set `name` and `version`, and write `inputs` and `run`."""

    name: str = ""
    version: str = "1"  # bump when the stage's output format or logic changes: invalidates old runs

    def inputs(self, recipe: Recipe, run: "RunDir") -> dict[str, str]:
        """{label: content hash} of everything this stage reads besides the recipe."""
        raise NotImplementedError

    def run(self, ctx: StageContext) -> None:
        raise NotImplementedError

    def summary_rows(self, counts: dict) -> list[tuple[str, str]]:
        """Rows (what, value) for the summary table printed after a run."""
        return []


@dataclass
class StageOutcome:
    stage: str
    skipped: bool
    manifest: dict


class RunDir:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def cache_dir(self, kind: str) -> Path:
        d = self.root / "cache" / kind
        d.mkdir(parents=True, exist_ok=True)
        return d

    def manifest(self, stage: str) -> dict | None:
        path = self.stage_dir(stage) / MANIFEST
        return json.loads(path.read_text()) if path.is_file() else None

    def require(self, stage: str, artifact: str) -> Path:
        """Path of a finished artifact of an earlier stage, or a clear error telling what to run first."""
        path = self.stage_dir(stage) / artifact
        if self.manifest(stage) is None or not path.exists():
            raise FileNotFoundError(f"{path} is missing: run `slmforge {stage}` first (or `slmforge build`)")
        return path

    def artifact_hash(self, stage: str, artifact: str) -> str:
        """Content hash of a finished stage's artifact (from its manifest): what a later stage's `inputs` returns."""
        self.require(stage, artifact)
        return self.manifest(stage)["outputs"][artifact]

    def trained_models(self) -> dict[str, Path]:
        """Finished training stages' model folders, in pipeline order: {"dapt": .../dapt/model, "sft": ..., "dpo": ...}."""
        out = {}
        for stage in ("dapt", "sft", "dpo"):
            folder = self.stage_dir(stage) / "model"
            if self.manifest(stage) is not None and (folder / "config.json").is_file():
                out[stage] = folder
        return out

    def execute(self, stage: Stage, recipe: Recipe, *, force: bool = False) -> StageOutcome:
        inputs = stage.inputs(recipe, self)
        config = recipe.stage_config(stage.name)
        key = hash_obj({"stage": stage.name, "version": stage.version, "config": config, "inputs": inputs})
        done = self.manifest(stage.name)
        if done and done.get("key") == key and not force and not done.get("counts", {}).get("incomplete"):
            return StageOutcome(stage.name, True, done)

        work = self.root / ".work" / f"{stage.name}-{key[:16]}"
        out, scratch = work / "out", work / "scratch"
        if out.exists():  # a crashed attempt's final-artifact folder: rebuilt from scratch (resumable parts live in scratch)
            shutil.rmtree(out)
        out.mkdir(parents=True)
        scratch.mkdir(parents=True, exist_ok=True)
        ctx = StageContext(recipe=recipe, run=self, out=out, scratch=scratch)
        started = time.time()
        stage.run(ctx)
        manifest = {
            "stage": stage.name,
            "key": key,
            "stage_version": stage.version,
            "config": config,
            "inputs": inputs,
            "outputs": {p.relative_to(out).as_posix(): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()},
            "counts": ctx.counts,
            "seed": recipe.seed,
            "versions": versions(),
            "command": sys.argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "seconds": round(time.time() - started, 3),
        }
        atomic_write_json(out / MANIFEST, manifest)
        self._publish(stage.name, out)
        shutil.rmtree(work, ignore_errors=True)
        return StageOutcome(stage.name, False, manifest)

    def _publish(self, name: str, out: Path) -> None:
        """Swap the finished folder into place. The old one is moved aside first, so a crash leaves either."""
        final = self.stage_dir(name)
        trash = self.root / ".work" / f"{name}.old"
        shutil.rmtree(trash, ignore_errors=True)
        if final.exists():
            os.replace(final, trash)
        os.replace(out, final)
        shutil.rmtree(trash, ignore_errors=True)


# ------------------------------------------------------------------------------------------ resumable units
def cached_unit(cache: Path, key: str, compute: Callable[[], Any], stats: dict | None = None) -> Any:
    """Return the JSON result for `key`, computing and storing it atomically on a miss.

    The building block of resume: a stage that processes many units (files, chunks, requests) wraps each in this,
    so a rerun after a kill recomputes only the units that had not finished. `stats` counts "cache_hits"/"computed".
    """
    path = cache / key[:2] / f"{key}.json"
    if path.is_file():
        if stats is not None:
            stats["cache_hits"] = stats.get("cache_hits", 0) + 1
        return json.loads(path.read_text(encoding="utf-8"))
    result = compute()
    atomic_write_json(path, result)
    if stats is not None:
        stats["computed"] = stats.get("computed", 0) + 1
    return result


def iter_files(root: Path, include: list[str], exclude: list[str]) -> Iterator[Path]:
    """Files under root matching any include pattern (by name) and no exclude pattern (by relative path), sorted."""
    seen = set()
    for pattern in include:
        for p in root.rglob(pattern):
            if p.is_file() and p not in seen:
                seen.add(p)
    for p in sorted(seen):
        rel = p.relative_to(root)
        if any(rel.match(x) or p.name == x for x in exclude):
            continue
        if any(part.startswith(".") for part in rel.parts):
            continue  # hidden files and folders (.git, editor swap files)
        yield p
