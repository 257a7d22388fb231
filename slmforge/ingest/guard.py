"""Every reader runs inside a per-file guard: one file can only ever reject itself.

The readers run in one worker process (started on the first file that is not cached, reused for the rest) with an
address-space limit (`ingest.reader_memory_mb`) and a per-file time limit (`ingest.reader_timeout_s`). In the
worker any exception (RecursionError and MemoryError included) becomes a rejection with the file's name and the
reason; a worker that hangs or dies (a crash in a C extension, the kernel's OOM killer) is killed and replaced,
and only the file it was reading is rejected. A subprocess rather than signals in-process: SIGALRM cannot stop a
C parser mid-call and nothing in-process can bound one file's memory.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Callable

from slmforge.ingest.readers import ReadError, read_file
from slmforge.records import Document

STARTUP_TIMEOUT_S = 120.0  # for the reader process to start and say it is ready
RECURSION_LIMIT = 20_000  # deep but valid nesting (1,000 nested <div>s) is read; deeper nesting is rejected, not fatal


class TransientReadError(ReadError):
    """A rejection that may not recur (time limit, a killed worker): never cached, so the next run tries again."""


def _worker(conn, memory_mb: int, parent: int) -> None:
    import resource
    import threading

    from slmforge.procs import die_with_parent

    die_with_parent(parent)
    import logging

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # "EOF marker not found" and the like: the rejection says it
    stack = 256 << 20
    if memory_mb:  # the limit is on top of the reader thread's stack and malloc arena reservations
        limit = (memory_mb << 20) + stack + (256 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sys.setrecursionlimit(RECURSION_LIMIT)
    threading.stack_size(stack)  # the reader runs in a thread with a stack deep enough for the recursion limit

    reader = conn.recv()  # the reader function, pickled by reference
    conn.send(("ready",))  # start-up (interpreter, imports) is over: the per-file time limit starts with each file

    def one(job):
        path, root, fallback = job
        try:
            return "ok", reader(Path(path), Path(root), fallback).model_dump(mode="json")
        except ReadError as err:
            return "rejected", err.reason, err.detail
        except OSError as err:  # permissions and the like: may be fixed before the next run, so not cached
            return "transient", "unreadable file", str(err)
        except MemoryError:
            return "rejected", "reader out of memory", f"over ingest.reader_memory_mb ({memory_mb} MB)"
        except RecursionError:
            return "rejected", "nested too deeply", f"more than {RECURSION_LIMIT} levels"
        except Exception as err:  # noqa: BLE001 (any reader bug rejects only this file)
            return "rejected", "reader failed", f"{type(err).__name__}: {str(err)[:300]}"

    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        box: list = []
        t = threading.Thread(target=lambda: box.append(one(job)))
        t.start()
        t.join()
        try:
            conn.send(box[0] if box else ("rejected", "reader failed", "no result"))
        except MemoryError:
            conn.send(("rejected", "reader out of memory", f"over ingest.reader_memory_mb ({memory_mb} MB)"))


class GuardedReader:
    """`read(path, root, fallback) -> Document`, raising ReadError for anything that goes wrong with that file."""

    def __init__(self, timeout_s: float = 120.0, memory_mb: int = 4096, reader: Callable = read_file):
        self.timeout_s, self.memory_mb, self.reader = timeout_s, memory_mb, reader
        self.proc = None
        self.conn = None
        self.restarts = 0

    def __enter__(self) -> "GuardedReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        # a fresh interpreter (not multiprocessing's spawn, which re-runs the caller's __main__; not fork, which may
        # copy a lock another thread of the build holds), talking over a socket pair
        import socket
        import subprocess
        from multiprocessing.connection import Connection

        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "slmforge.ingest.guard", str(theirs.fileno()), str(os.getpid()), str(self.memory_mb)],
            pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.conn.send(self.reader)
        try:  # a loaded machine may take seconds to start Python: that must not count against the first file
            started = self.conn.poll(max(STARTUP_TIMEOUT_S, self.timeout_s)) and self.conn.recv() == ("ready",)
        except (EOFError, OSError):
            started = False
        if not started:
            code = self.proc.poll()
            self._kill()
            raise RuntimeError(f"the ingest reader process did not start ({'exit ' + str(code) if code is not None else 'no answer'}"
                               f" within {max(STARTUP_TIMEOUT_S, self.timeout_s):g} s)")

    def _alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.conn.close()
        self.proc = self.conn = None

    def close(self) -> None:
        if self.proc is not None:
            self.conn.close()  # EOF: the worker returns
            try:
                self.proc.wait(2)
            except Exception:  # noqa: BLE001
                self.proc.kill()
                self.proc.wait(2)
            self.proc = self.conn = None

    def read(self, path: Path, root: Path, fallback: bool = True) -> Document:
        if not self._alive():
            if self.proc is not None:
                self._kill()
            self._start()
        try:
            self.conn.send((str(path), str(root), fallback))
            ready = self.conn.poll(self.timeout_s)
            result = self.conn.recv() if ready else None
        except (EOFError, OSError, BrokenPipeError):
            result, ready = None, True
        if result is None:
            code = self.proc.wait(5) if ready else None
            self._kill()
            self.restarts += 1
            if not ready:
                raise TransientReadError("reader timed out", f"no result within ingest.reader_timeout_s ({self.timeout_s:g} s)")
            if code is not None and code < 0:
                raise TransientReadError("reader crashed", f"the reader process was killed by {signal.Signals(-code).name}")
            raise TransientReadError("reader crashed", f"the reader process exited ({code})")
        if result[0] == "ok":
            return Document.model_validate(result[1])
        if result[0] == "transient":
            raise TransientReadError(result[1], result[2])
        raise ReadError(result[1], result[2])


if __name__ == "__main__":  # the reader process: python -m slmforge.ingest.guard FD PARENT_PID MEMORY_MB
    from multiprocessing.connection import Connection

    _worker(Connection(int(sys.argv[1])), int(sys.argv[3]), int(sys.argv[2]))
