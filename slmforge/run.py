"""The run directory: stage folders, atomic writes, manifests, content-hash skip and resume.

Layout of runs/<name>/:
    <stage>/            finished output of a stage, with manifest.json (appears atomically, by rename)
    .work/<stage>-<key>/ a stage in progress; kept after a crash so the rerun resumes from it
    cache/              content-addressed caches shared across reruns (e.g. one parsed file per hash)

A stage's key hashes its code (the source of its package and of every slmforge module it imports), its recipe slice,
the content of the artifacts it needs and the keys of the stages that made them. A finished stage with the same key
is skipped; a different key reruns it, and so every stage after it.
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
from typing import Any, Callable, Iterable

from pydantic import BaseModel

from slmforge.artifacts import TRAIN_STAGES, Artifact, trained_model
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
    """Rows of a JSON-lines file, validated as `model` when given; a bad row is an error naming the file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append(model.model_validate(row) if model else row)
            except ValueError as err:
                what = f"not a valid {model.__name__}" if model and not isinstance(err, json.JSONDecodeError) else "not valid JSON"
                raise ValueError(f"{path}:{n}: {what}: {err}") from None
    return rows


# ------------------------------------------------------------------------------------------ hashing
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Content hash of a file; remembered per (path, inode, size, mtime) so a run hashes each input once. A file changed
    in the last 2 s is always read (git's "racy clean" rule: a same-size rewrite within one mtime tick looks unchanged)."""
    st = os.stat(path)
    if time.time_ns() - st.st_mtime_ns < 2_000_000_000:
        return _hash_contents(path)
    return _sha256_file(os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)


_BIG_FILE = 32 << 20  # model weights: their hashes are also remembered on disk, across runs and processes


@functools.lru_cache(maxsize=1 << 16)
def _sha256_file(path: str, ino: int, size: int, mtime_ns: int) -> str:
    if size < _BIG_FILE:
        return _hash_contents(path)
    memo = Path(os.environ.get("SLMFORGE_CACHE", Path.home() / ".cache" / "slmforge")) / "file-hashes"
    memo = memo / f"{sha256_bytes(f'{path}|{ino}|{size}|{mtime_ns}'.encode())}.txt"
    try:
        return memo.read_text().strip()
    except OSError:
        digest = _hash_contents(path)
        try:
            atomic_write_text(memo, digest)
        except OSError:  # a read-only cache only costs time
            pass
        return digest


def _hash_contents(path) -> str:
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


# ------------------------------------------------------------------------------------------ code identity
_PACKAGE = Path(__file__).resolve().parent


def _module_file(name: str) -> Path | None:
    """Source file of a module, found on disk (nothing is imported); None for names that are not modules."""
    parts = name.split(".")
    if parts[0] == "slmforge":
        base = _PACKAGE.joinpath(*parts[1:])
        for candidate in ((base / "__init__.py",) if len(parts) == 1 else (base.with_suffix(".py"), base / "__init__.py")):
            if candidate.is_file():
                return candidate
        return None
    module = sys.modules.get(name)  # a stage defined outside the package (a user's or a test's)
    origin = getattr(module, "__file__", None)
    return Path(origin) if origin and origin.endswith(".py") else None


def _imports(path: Path, package: str) -> set[str]:
    """slmforge modules a source file imports (anywhere in it, lazily imported ones included)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against this file's package
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return {n for n in names if n.split(".")[0] == "slmforge"}


def _package_files(module: str) -> list[Path]:
    """The module's file, and when it is a package's own module, the data files shipped beside it."""
    path = _module_file(module)
    if path is None:
        return []
    files = [path]
    if path.name == "__init__.py":  # data files beside the modules, and in folders that are not packages themselves
        def data(folder: Path):
            for f in sorted(folder.iterdir()):
                if f.is_file():  # the package's own .py files are modules, covered by the import walk
                    if f.suffix != ".pyc" and not (folder == path.parent and f.suffix == ".py"):
                        yield f
                elif f.name != "__pycache__" and not (f / "__init__.py").exists():
                    yield from data(f)
        files += list(data(path.parent))
    return files


@functools.lru_cache(maxsize=None)
def code_hash(module: str) -> str:
    """Hash of the source a stage runs: every file of its own package, and every slmforge module it imports, transitively
    (the shared core included), with the data files shipped in those packages. A change to any of them changes the
    stage's cache key, so an upgraded slmforge never reuses a result its old code made."""
    return hash_obj(code_files(module))


def code_files(module: str) -> dict[str, str]:
    """{file: sha256} of the source `code_hash` covers (paths relative to the repository, or bare names outside it)."""
    own = _module_file(module)
    todo = [module]
    if own is not None and own.parent.joinpath("__init__.py").is_file():
        pkg = module.rsplit(".", 1)[0]
        todo += [f"{pkg}.{f.stem}" for f in sorted(own.parent.glob("*.py")) if f.stem != "__init__"] + [pkg]
    seen: set[str] = set()
    files: dict[str, str] = {}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for f in _package_files(name):
            files[f.as_posix()] = sha256_file(f)
        path = _module_file(name)
        if path is not None:
            package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
            todo += sorted(_imports(path, package) - seen)
    root = _PACKAGE.parent
    return {(Path(f).relative_to(root).as_posix() if Path(f).is_relative_to(root) else Path(f).name): h
            for f, h in sorted(files.items())}


# ------------------------------------------------------------------------------------------ stages
class ArtifactError(FileNotFoundError):
    """An artifact a stage needs is missing, stale or of another schema; says what to run."""


@dataclass
class StageContext:
    """What a stage's `run` gets: typed reads of what it declared it needs, typed writes of what it makes."""

    recipe: Recipe
    run: "RunDir"
    out: Path  # final artifacts are written here (becomes runs/<name>/<stage>/ on success)
    scratch: Path  # partial work that survives a crash, for resume; deleted on success
    counts: dict[str, Any] = field(default_factory=dict)  # stage fills it: lands in the manifest and summary
    stage: "Stage | None" = None

    def _declared(self, art: Artifact, where: str) -> None:
        if self.stage is None:
            return
        allowed = self.stage.makes if where == "makes" else (*self.stage.needs_for(self.recipe), *self.stage.uses_for(self.recipe))
        if art not in allowed:
            raise RuntimeError(f"stage {self.stage.name} {'writes' if where == 'makes' else 'reads'} {art.label}, which it does "
                               f"not declare in `{'makes' if where == 'makes' else 'needs/uses'}`")

    def read(self, art: Artifact) -> list:
        """Rows of a .jsonl artifact as its record type (or the parsed JSON of a .json one), schema checked."""
        self._declared(art, "needs")
        return self.run.read(art)

    def input(self, art: Artifact) -> Path:
        """Path of a finished artifact this stage needs (for folders and files read by libraries)."""
        self._declared(art, "needs")
        return self.run.require(art)

    def path(self, art: Artifact) -> Path:
        """Where this stage writes `art` (created for folders)."""
        self._declared(art, "makes")
        path = self.out / art.name
        if art.folder:
            path.mkdir(parents=True, exist_ok=True)
        return path

    def write(self, art: Artifact, rows: Iterable[BaseModel | dict]) -> int:
        """Validate rows against the artifact's record type, then write them as JSON lines. Returns the row count."""
        rows = list(rows)
        if art.record is not None:
            for i, r in enumerate(rows):
                if isinstance(r, dict):
                    try:
                        art.record.model_validate(r)
                    except ValueError as err:
                        raise ValueError(f"{art.label} row {i + 1} is not a valid {art.record.__name__}: {err}") from None
                elif not isinstance(r, art.record):
                    raise TypeError(f"{art.label} row {i + 1} is a {type(r).__name__}, not a {art.record.__name__}")
        return atomic_write_jsonl(self.path(art), rows)

    def write_json(self, art: Artifact, obj: Any) -> None:
        atomic_write_json(self.path(art), obj)

    def write_text(self, art: Artifact, text: str) -> None:
        atomic_write_text(self.path(art), text)


class Stage:
    """A pipeline stage: declares what it needs and makes, and writes `run`. The run does the rest (input hashes, cache
    key, skip, resume folder, atomic publish, manifest). See tests/test_extension.py for a whole stage in ten lines.

        needs   artifacts that must exist (an error says which stage to run first)
        uses    artifacts read when present (e.g. generate's rephrasings for DAPT)
        makes   artifacts this stage writes; the manifest records their hashes and record schemas
        external_inputs  what else the output depends on besides the recipe slice (documents, model weights)
    """

    name: str = ""
    needs: tuple[Artifact, ...] = ()
    uses: tuple[Artifact, ...] = ()
    makes: tuple[Artifact, ...] = ()

    def needs_for(self, recipe: Recipe) -> tuple[Artifact, ...]:
        """What this stage needs under this recipe (override when it depends on which stages are enabled)."""
        return self.needs

    def uses_for(self, recipe: Recipe) -> tuple[Artifact, ...]:
        return self.uses

    def external_inputs(self, recipe: Recipe, run: "RunDir") -> dict[str, str]:
        """{label: content hash} of what the stage reads from outside the run (documents, base model weights)."""
        return {}

    def run(self, ctx: StageContext) -> None:
        raise NotImplementedError

    def summary_rows(self, counts: dict) -> list[tuple[str, str]]:
        """Rows (what, value) for the summary table printed after a run."""
        return []


def pipeline_order(stages: Iterable[Stage]) -> list[Stage]:
    """Stages in an order where each comes after every stage whose artifacts it needs or uses (stable otherwise)."""
    pending = list(stages)
    makers = {a.stage for s in pending for a in s.makes}
    done: list[Stage] = []
    placed: set[str] = set()
    while pending:
        for s in pending:
            deps = {a.stage for a in (*s.needs, *s.uses) if a.stage in makers and a.stage != s.name}
            if deps <= placed:
                done.append(s)
                placed.add(s.name)
                pending.remove(s)
                break
        else:
            raise ValueError(f"stages depend on each other in a cycle: {', '.join(s.name for s in pending)}")
    return done


@dataclass
class StageOutcome:
    stage: str
    skipped: bool
    manifest: dict


class RunDir:
    def __init__(self, root: Path):
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunDirError(f"run_dir: cannot create {self.root}: {err.strerror or err}") from None

    # ---------------------------------------------------------------------------------------- artifacts
    def path(self, art: Artifact) -> Path:
        """Where a finished artifact lives (whether or not it exists yet)."""
        return self.root / art.stage / art.name if art.stage else self.root / art.name

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def cache_dir(self, kind: str) -> Path:
        d = self.root / "cache" / kind
        d.mkdir(parents=True, exist_ok=True)
        return d

    def manifest(self, stage: str) -> dict | None:
        path = self.stage_dir(stage) / MANIFEST
        return json.loads(path.read_text()) if path.is_file() else None

    def has(self, art: Artifact) -> bool:
        """Whether the artifact's stage finished and the artifact exists."""
        return (not art.stage or self.manifest(art.stage) is not None) and self.path(art).exists()

    def require(self, art: Artifact) -> Path:
        """Path of a finished artifact of an earlier stage, or a clear error telling what to run first."""
        path = self.path(art)
        if not self.has(art):
            raise ArtifactError(f"{path} is missing: run `slmforge {art.stage}` first (or `slmforge build`)")
        return path

    def read(self, art: Artifact) -> list | dict:
        """A finished .jsonl artifact as rows of its record type, after checking the schema its manifest recorded."""
        path = self.require(art)
        if art.record is None:
            return json.loads(path.read_text(encoding="utf-8")) if path.suffix == ".json" else read_jsonl(path)
        written = (self.manifest(art.stage) or {}).get("schemas", {}).get(art.name)
        if written is not None and written != art.record.schema_id():
            raise ArtifactError(f"{path} holds {written}, this slmforge reads {art.record.schema_id()}: "
                                f"rerun `slmforge {art.stage} --force`")
        return read_jsonl(path, art.record)  # no schema recorded (rows made elsewhere): every row is validated

    def hash(self, art: Artifact) -> str:
        """Content hash of a finished artifact, from its stage's manifest (a folder: of every file under it)."""
        self.require(art)
        outputs = self.manifest(art.stage)["outputs"]
        if art.folder:
            return hash_obj({k: v for k, v in outputs.items() if k.startswith(art.name + "/")})
        return outputs[art.name]

    def trained_models(self) -> dict[str, Path]:
        """Finished training stages' model folders, in pipeline order: {dapt: .../model, sft: ..., dpo: ...}."""
        out = {}
        for stage in TRAIN_STAGES:
            folder = self.path(trained_model(stage))
            if self.manifest(stage) is not None and (folder / "config.json").is_file():
                out[stage] = folder
        return out

    def adopt(self, stage: str, files: dict[Artifact, list]) -> None:
        """Publish rows made elsewhere as a finished stage (bring your own SFT data; test fixtures), manifest included."""
        folder = self.stage_dir(stage)
        for art, rows in files.items():
            atomic_write_jsonl(folder / art.name, rows)
        atomic_write_json(folder / MANIFEST, {
            "stage": stage, "key": hash_obj({a.name: sha256_file(folder / a.name) for a in files}), "adopted": True,
            "outputs": {a.name: sha256_file(folder / a.name) for a in files},
            "schemas": {a.name: a.record.schema_id() for a in files if a.record is not None}})

    # ---------------------------------------------------------------------------------------- running a stage
    def input_hashes(self, stage: Stage, recipe: Recipe) -> dict[str, str]:
        """What the stage's output depends on besides its recipe slice: every artifact it needs (and uses, when present)
        by content, the key of the stage that made it (so a stage whose code changed reruns everything after it), and
        its external inputs."""
        out: dict[str, str] = {}
        needed = stage.needs_for(recipe)
        for art in (*needed, *(a for a in stage.uses_for(recipe) if self.has(a))):
            out[art.label] = self.hash(art)
            out[f"{art.stage}:key"] = (self.manifest(art.stage) or {}).get("key", "")
        out.update(stage.external_inputs(recipe, self))
        return out

    def execute(self, stage: Stage, recipe: Recipe, *, force: bool = False, notes: dict | None = None) -> StageOutcome:
        """Run `stage` unless a finished one has the same key. `notes` (e.g. the build's planned seconds) join the
        manifest as "build"; they are not part of the key."""
        inputs = self.input_hashes(stage, recipe)
        config = recipe.stage_config(stage.name)
        code = code_hash(type(stage).__module__)
        key = hash_obj({"stage": stage.name, "code": code, "config": config, "inputs": inputs})
        done = self.manifest(stage.name)
        if done and done.get("key") == key and not force and not done.get("counts", {}).get("incomplete"):
            return StageOutcome(stage.name, True, done)

        work = self.root / ".work" / f"{stage.name}-{key[:16]}"
        out, scratch = work / "out", work / "scratch"
        if out.exists():  # a crashed attempt's final-artifact folder: rebuilt from scratch (resumable parts live in scratch)
            shutil.rmtree(out)
        out.mkdir(parents=True)
        scratch.mkdir(parents=True, exist_ok=True)
        ctx = StageContext(recipe=recipe, run=self, out=out, scratch=scratch, stage=stage)
        started = time.time()
        stage.run(ctx)
        manifest = {
            "stage": stage.name,
            "key": key,
            "code": code,
            "config": config,
            "inputs": inputs,
            "outputs": {p.relative_to(out).as_posix(): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()},
            "schemas": {a.name: a.record.schema_id() for a in stage.makes if a.record is not None and (out / a.name).exists()},
            "counts": ctx.counts,
            "seed": recipe.seed,
            "versions": versions(),
            "command": sys.argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "seconds": round(time.time() - started, 3),
        }
        if notes:
            manifest["build"] = notes
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


class RunDirError(OSError):
    """run_dir cannot be used (not creatable, not a folder, not writable); phrased for the recipe's author."""


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

