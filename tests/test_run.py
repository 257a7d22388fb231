"""Run directory behaviour: skip unchanged stages, atomic writes, and kill -9 -> resume -> identical output."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slmforge.recipe import load_recipe
from slmforge.run import RunDir, atomic_write_bytes, sha256_file

from conftest import paragraph, write_recipe


def _stages():
    from slmforge.curate.stage import CurateStage
    from slmforge.ingest.stage import IngestStage

    return IngestStage(), CurateStage()


def test_unchanged_inputs_skip_and_changed_inputs_rerun(recipe_file, corpus):
    recipe = load_recipe(recipe_file)
    run = RunDir(recipe.run_path)
    ingest, curate = _stages()
    first = [run.execute(ingest, recipe), run.execute(curate, recipe)]
    assert not any(o.skipped for o in first)
    manifest = first[0].manifest
    assert manifest["versions"]["datatrove"] and manifest["seed"] == 0 and manifest["outputs"]["chunks.jsonl"]
    assert manifest["config"]["stage"]["chunk_tokens"] == recipe.ingest.chunk_tokens

    (corpus / "note00.txt").touch()  # same content, new mtime: still unchanged
    again = [run.execute(ingest, recipe), run.execute(curate, recipe)]
    assert all(o.skipped for o in again)

    (corpus / "note00.txt").write_text(paragraph(999))  # new content: both stages rerun
    changed = [run.execute(ingest, recipe), run.execute(curate, recipe)]
    assert not any(o.skipped for o in changed)

    other = load_recipe(recipe_file, overrides=["curate.heldout_fraction=0.5"])  # new settings: only curate reruns
    assert run.execute(ingest, other).skipped and not run.execute(curate, other).skipped


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    atomic_write_bytes(target, b"old")
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any file, not mkstemp's 0600

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temp file left behind


# A harness that makes one step hang, so the kill lands mid-stage deterministically.
HARNESS = r"""
import sys, time
mode = sys.argv[1]
if mode == "ingest":
    import slmforge.ingest.stage as ingest
    real, calls = ingest._parse_and_chunk, [0]
    def slow(*a, **k):
        calls[0] += 1
        if calls[0] > 40:
            time.sleep(600)
        return real(*a, **k)
    ingest._parse_and_chunk = slow
elif mode == "curate-workers":  # the hang must reach datatrove's pool workers, forked by its forkserver
    import multiprocess
    multiprocess.get_context("forkserver").set_forkserver_preload(["hang_buckets"])
elif mode == "curate":
    import datatrove.pipeline.dedup.minhash as minhash
    def hang(self, data=None, rank=0, world_size=1):
        time.sleep(600)
    minhash.MinhashDedupBuckets.run = hang
from slmforge.cli import app
sys.argv = ["slmforge", "build", *sys.argv[2:]]
app()
"""


def _cli(*args, harness: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "SLMFORGE_QUIET": "1"}
    cmd = [sys.executable, "-c", HARNESS, harness, *args] if harness else [sys.executable, "-m", "slmforge.cli", "build", *args]
    # own process group: kill -9 reaches any worker it forked too (no orphan left sleeping after the test)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(condition, proc, timeout=120):
    start = time.time()
    while not condition():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() - start < timeout, "timed out waiting for the stage to make progress"
        time.sleep(0.05)


def _outputs(run_root: Path) -> dict[str, str]:
    files = sorted(p for stage in ("ingest", "curate") for p in (run_root / stage).rglob("*.jsonl"))
    return {p.relative_to(run_root).as_posix(): sha256_file(p) for p in files}


def _numbered_docs(tmp_path: Path, n: int) -> Path:
    """n distinct two-paragraph text documents, d000.txt ..., for the kill -9 tests."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(n):
        (docs / f"d{i:03d}.txt").write_text(f"Doc {i}\n\n{paragraph(i, 4)}\n\n{paragraph(i + 1000, 4)}\n")
    return docs


def test_kill_9_then_resume_gives_identical_output(tmp_path):
    docs = _numbered_docs(tmp_path, 120)
    recipe_path = write_recipe(tmp_path, docs, ingest={"chunk_tokens": 128, "chunk_overlap": 16})

    reference = _cli(str(recipe_path), "--set", f"run_dir={tmp_path / 'reference'}")
    assert reference.wait(timeout=300) == 0, reference.stdout.read().decode()[-3000:]
    expected = _outputs(tmp_path / "reference" / "t")
    assert len(expected) >= 5

    run_root = tmp_path / "runs" / "t"
    # 1) killed in the middle of ingest, after 40 of 120 files were parsed and cached
    cache = run_root / "cache" / "ingest"
    proc = _cli(str(recipe_path), harness="ingest")
    _wait_for(lambda: cache.is_dir() and len(list(cache.rglob("*.json"))) >= 40, proc)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_root / "ingest" / "manifest.json").exists()
    cached = {p: p.stat().st_mtime_ns for p in cache.rglob("*.json")}
    assert len(cached) == 40

    # 2) the rerun resumes ingest, then is killed in the middle of curate (MinHash bucketing hangs)
    proc = _cli(str(recipe_path), harness="curate")
    done_marker = lambda: any(run_root.glob(".work/curate-*/scratch/logs/mh1/completions/*"))  # noqa: E731
    _wait_for(done_marker, proc)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (run_root / "ingest" / "manifest.json").exists() and not (run_root / "curate" / "manifest.json").exists()
    assert all(p.stat().st_mtime_ns == t for p, t in cached.items()), "resumed ingest re-parsed finished files"

    # 3) an unhindered rerun finishes from where curate stopped, with byte-identical artifacts
    proc = _cli(str(recipe_path))
    assert proc.wait(timeout=300) == 0, proc.stdout.read().decode()[-3000:]
    assert _outputs(run_root) == expected
    import json

    ingest_counts = json.loads((run_root / "ingest" / "manifest.json").read_text())["counts"]
    assert ingest_counts["files_from_cache"] == 40  # the parsed files of the killed attempt were reused
    curate_counts = json.loads((run_root / "curate" / "manifest.json").read_text())["counts"]
    assert {"exact1", "exact2", "exact3", "mh1"} <= set(curate_counts["resumed_steps"])  # finished steps not redone
    assert not list(run_root.glob(".work/curate-*")), "scratch space is cleaned up after success"


HANG_BUCKETS = """
import os, pathlib, time
import datatrove.pipeline.dedup.minhash as minhash
def hang(self, data=None, rank=0, world_size=1):
    pathlib.Path(os.environ["HANG_MARKS"], f"worker-{os.getpid()}").write_text("hanging")
    time.sleep(600)
minhash.MinhashDedupBuckets.run = hang
"""


def _marked(mark: str) -> list[int]:
    """Processes whose environment carries `mark`: the build and everything it started."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if mark.encode() in (proc / "environ").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_the_build_leaves_no_curate_worker_behind(tmp_path):
    import uuid

    docs = _numbered_docs(tmp_path, 30)
    recipe_path = write_recipe(tmp_path, docs, curate={"workers": 2, "tasks": 2})
    (tmp_path / "hang_buckets.py").write_text(HANG_BUCKETS)
    marks = tmp_path / "marks"
    marks.mkdir()
    mark = f"slmforge-test-{uuid.uuid4().hex}"
    env = {**os.environ, "SLMFORGE_QUIET": "1", "HANG_MARKS": str(marks), "SLMFORGE_TEST_MARK": mark,
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", ""), str(Path(__file__).parents[1])])}
    proc = subprocess.Popen([sys.executable, "-c", HARNESS, "curate-workers", str(recipe_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: any(marks.iterdir()), proc, timeout=240)  # a pool worker is inside the hanging step
        assert len(_marked(mark)) >= 3  # the build, its curate child, datatrove's forkserver / Manager / workers
        os.kill(proc.pid, signal.SIGKILL)  # the build alone, as `kill -9 <pid>` would: not its process group
        proc.wait()
        deadline = time.time() + 20
        while _marked(mark) and time.time() < deadline:
            time.sleep(0.2)
        left = _marked(mark)
        assert left == [], subprocess.run(["ps", "-o", "pid,ppid,pgid,stat,cmd", "-p", ",".join(map(str, left))],
                                          capture_output=True, text=True).stdout
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in _marked(mark):  # a failed run must not leave sleepers behind either
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_results_go_to_stdout_and_progress_to_stderr(recipe_file):
    from typer.testing import CliRunner

    from slmforge.cli import app

    result = CliRunner().invoke(app, ["build", str(recipe_file), "--until", "ingest"])
    assert result.exit_code == 0, result.output
    assert "slmforge summary" in result.stdout and "chunks / tokens" in result.stdout
    assert "▶ ingest" in result.stderr and "▶ ingest" not in result.stdout
    assert "slmforge summary" not in result.stderr


def test_library_progress_noise_is_hidden(tmp_path, capfd):
    import datasets
    from transformers import AutoModelForCausalLM

    from slmforge.console import quiet_libraries
    from test_export import tiny_model_folder

    folder = tiny_model_folder(tmp_path / "tiny")
    capfd.readouterr()
    quiet_libraries()
    AutoModelForCausalLM.from_pretrained(folder).save_pretrained(tmp_path / "again")
    datasets.Dataset.from_dict({"text": ["a", "b"] * 50}).map(lambda r: {"n": len(r["text"])})
    out, err = capfd.readouterr()
    for noise in ("Loading weights", "Map", "Writing model shards", "%|"):
        assert noise not in out + err, (noise, out + err)
