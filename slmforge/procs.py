"""Child processes that never outlive the build, even when the build is killed with SIGKILL.

`die_with_parent()`   a worker asks the kernel for SIGKILL when its parent dies (Linux prctl PR_SET_PDEATHSIG).
`run_in_group(fn)`    runs fn in a forked child that leads its own process group; a thread in that child watches a
                      pipe from the build and kills the whole group when the build is gone. Libraries that start
                      their own processes (datatrove's forkserver pool, a multiprocess Manager) are covered without
                      changing them: everything they start stays in the child's group.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import traceback

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None, sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent exits (no-op off Linux)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


class ChildFailed(RuntimeError):
    def __init__(self, message: str, traceback_text: str = ""):
        super().__init__(message)
        self.traceback = traceback_text


def _watch(alive_r: int) -> None:
    try:
        while os.read(alive_r, 1):
            pass
    except OSError:
        pass
    os.killpg(0, signal.SIGKILL)  # the build is gone (EOF on its pipe): take every process of this group with us


def _own_forkserver() -> None:
    """A forkserver the build started earlier would fork our workers outside this group: start our own instead."""
    for name in ("multiprocessing.forkserver", "multiprocess.forkserver"):
        fs = getattr(sys.modules.get(name), "_forkserver", None)
        if fs is not None and fs._forkserver_pid is not None:
            if fs._forkserver_alive_fd is not None:
                os.close(fs._forkserver_alive_fd)
            fs._forkserver_address = fs._forkserver_alive_fd = fs._forkserver_pid = None
            fs._lock = threading.Lock()


def _child(fn, args, result_w, alive_r: int, alive_w: int, parent: int) -> None:
    os.close(alive_w)  # only the build holds the write end: its death is the EOF the watcher waits for
    os.setpgid(0, 0)
    _own_forkserver()
    # no PR_SET_PDEATHSIG here: its SIGKILL would win the race against the watcher, leaving the group orphaned
    threading.Thread(target=_watch, args=(alive_r,), daemon=True).start()
    if os.getppid() != parent:  # the build died before the watcher started
        os.killpg(0, signal.SIGKILL)
    try:
        fn(*args)
    except BaseException as err:  # noqa: BLE001 (reported to the parent, which raises it)
        result_w.send((f"{type(err).__name__}: {err}", traceback.format_exc()))
        result_w.close()
        os._exit(1)
    result_w.send(None)
    result_w.close()


def run_in_group(fn, *args, what: str = "child process") -> None:
    """Run fn(*args) in a forked child process group that dies with this process; re-raise its error here."""
    ctx = multiprocessing.get_context("fork")
    result_r, result_w = ctx.Pipe(duplex=False)
    alive_r, alive_w = os.pipe()
    proc = ctx.Process(target=_child, args=(fn, args, result_w, alive_r, alive_w, os.getpid()), name=what)
    proc.start()
    os.close(alive_r)
    result_w.close()
    try:
        outcome = result_r.recv() if result_r.poll(None) else None
    except EOFError:
        outcome = "no result"
    except BaseException:  # Ctrl-C or an error here: the child's whole group goes too
        _kill_group(proc.pid)
        raise
    finally:
        proc.join()
        os.close(alive_w)
        _kill_group(proc.pid)  # stragglers a library left behind in the group
    if outcome is None and proc.exitcode == 0:
        return
    if isinstance(outcome, tuple):
        raise ChildFailed(f"{what} failed: {outcome[0]}", outcome[1])
    code = proc.exitcode
    how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
    raise ChildFailed(f"{what} died ({how})")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
