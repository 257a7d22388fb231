"""Real engines on this one machine, for the scale tests: a single-node Slurm cluster (munge + slurmctld + slurmd from
Debian's `slurm-wlm`) and a 2-node Ray cluster (a head and a worker started with `ray start`).

Every daemon runs in the foreground as our own child, in its own session, with its state, sockets, logs and ports in a
temporary folder (nothing under /etc, /run or /var), and is stopped when the `with` block ends, on failure too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")


def missing_slurm() -> list[str]:
    return [b for b in SLURM_BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _bin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_resources() -> tuple[int, int]:
    """CPUs and memory (MB) of this machine as `slurmd -C` reports them (what slurmd will register with)."""
    out = subprocess.run([_bin("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
    return int(fields["CPUs"]), int(fields["RealMemory"])


SLURM_CONF = """\
# A one-node cluster on localhost, for tests (written by tests/clusters.py)
ClusterName=slmforge-test
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge.socket
SlurmUser={user}
SlurmdUser=root
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MinJobAge=300
KillWait=5
InactiveLimit=0
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName={partition} Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


class SlurmCluster:
    """`with SlurmCluster(tmp) as slurm:` munged + slurmctld + slurmd on localhost; `slurm.env` for sbatch/squeue."""

    def __init__(self, folder: Path, partition: str = "cpu"):
        self.dir = Path(folder)
        self.partition = partition
        self.procs: list[subprocess.Popen] = []
        self.conf = self.dir / "slurm.conf"

    @property
    def env(self) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def __enter__(self) -> "SlurmCluster":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.dir / f"{name}.out", "wb")
        self.procs.append(subprocess.Popen([_bin(name), *args], stdout=log, stderr=subprocess.STDOUT,
                                           env=self.env, start_new_session=True))

    def _start(self) -> None:
        d = self.dir
        for sub in ("state", "spool"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        # --force: the socket lives in a temp folder, which munged would otherwise call insecure
        self._spawn("munged", "-F", "--force", f"--socket={d}/munge.socket", f"--key-file={key}",
                    f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed")
        self._wait(lambda: (d / "munge.socket").exists(), "munged to open its socket", "munged.log")
        cpus, mem = _node_resources()
        import getpass

        self.host = socket.gethostname().split(".")[0]
        self.conf.write_text(SLURM_CONF.format(host=self.host, ctld_port=free_port(), slurmd_port=free_port(), dir=d,
                                               user=getpass.getuser(), cpus=cpus, mem=mem, partition=self.partition))
        self.cpus = cpus
        self._spawn("slurmctld", "-D", "-i", "-f", str(self.conf))
        self._wait(lambda: self._ok("scontrol", "ping") and "UP" in self._out("scontrol", "ping"), "slurmctld to answer", "slurmctld.log")
        self._spawn("slurmd", "-D", "-f", str(self.conf), "-N", self.host)
        self._wait(lambda: self._out("sinfo", "-h", "-o", "%T").strip() in ("idle", "mixed", "allocated"),
                   "the node to become idle", "slurmd.log")

    def _out(self, *cmd: str) -> str:
        return subprocess.run([_bin(cmd[0]), *cmd[1:]], capture_output=True, text=True, env=self.env).stdout

    def _ok(self, *cmd: str) -> bool:
        return subprocess.run([_bin(cmd[0]), *cmd[1:]], capture_output=True, env=self.env).returncode == 0

    def _wait(self, ready, what: str, log: str, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                return
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                break
            time.sleep(0.3)
        logs = "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-1500:]}" for f in sorted(self.dir.glob("*.out")) + [self.dir / log] if f.exists())
        raise RuntimeError(f"timed out waiting for {what}\n{logs}")

    def jobs(self) -> list[str]:
        return self._out("squeue", "-h", "-o", "%i %T %r").splitlines()

    def stop(self) -> None:
        """Cancel every job, let their steps end, then stop slurmd, slurmctld and munged (SIGTERM, then SIGKILL)."""
        if any(p.poll() is None for p in self.procs) and self.conf.exists():
            subprocess.run([_bin("scancel"), "--full", "-u", str(os.getuid())], env=self.env, capture_output=True)
            deadline = time.time() + 15
            while time.time() < deadline and self.jobs():
                time.sleep(0.3)
        for proc in reversed(self.procs):  # slurmd, slurmctld, then munged
            _stop(proc)
        self.procs.clear()


def _stop(proc: subprocess.Popen, grace: float = 10) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # and anything it left in its session
    proc.wait()


# ------------------------------------------------------------------------------------------------------------ Ray
def ray_cli() -> str | None:
    """The `ray` command beside this Python, when ray[default] is installed."""
    try:
        import ray  # noqa: F401
        import ray.dashboard  # noqa: F401  (part of ray[default]; `ray start` needs it)
    except ImportError:
        return None
    cli = Path(sys.executable).parent / "ray"
    return str(cli) if cli.exists() else shutil.which("ray")


class RayCluster:
    """`with RayCluster(tmp) as ray_:` a head node and a second worker node on this machine, one CPU each, each with
    its own temp folder and a custom resource naming it; `ray_.address` is what clients pass to `ray.init`."""

    def __init__(self, folder: Path, cpus_per_node: int = 1):
        self.dir = Path(folder)
        self.cpus = cpus_per_node
        self.cli = ray_cli()
        self.address = None

    def _ray(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_DOCKER_CPU_WARNING": "1"}
        proc = subprocess.run([self.cli, *args], capture_output=True, text=True, env=env, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"`ray {' '.join(args)}` failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        return proc

    def __enter__(self) -> "RayCluster":
        port = free_port()
        # short paths: Ray's unix sockets live in the temp dir and must stay under 107 characters
        self.head_tmp = Path(f"/tmp/rayh-{port}")
        self.worker_tmp = Path(f"/tmp/rayw-{port}")
        self.address = f"127.0.0.1:{port}"
        try:
            self._ray("start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus}",
                      "--resources={\"head\": 1}", f"--temp-dir={self.head_tmp}", "--include-dashboard=false",
                      "--disable-usage-stats")
            # a second raylet on the same machine: a node of its own as far as Ray is concerned
            self._ray("start", f"--address={self.address}", "--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus}",
                      "--resources={\"worker\": 1}", f"--temp-dir={self.worker_tmp}",
                      f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                      f"--min-worker-port={free_port()}", "--max-worker-port=0", "--disable-usage-stats")
            self._wait_nodes(2)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_nodes(self, n: int, timeout: float = 60) -> None:
        code = ("import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
                "print(sum(1 for x in ray.nodes() if x['Alive']))")
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run([sys.executable, "-c", code, self.address], capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]:
                return
            time.sleep(1)
        raise RuntimeError(f"the Ray cluster at {self.address} did not reach {n} alive nodes: {out.stdout[-500:]} {out.stderr[-1500:]}")

    def nodes_used(self) -> set[str]:
        """Which nodes ran datatrove tasks ("head", "worker"): each node's worker logs name the actors it ran."""
        used = set()
        for name, tmp in (("head", self.head_tmp), ("worker", self.worker_tmp)):
            for log in tmp.glob("session_*/logs/worker-*"):
                with contextlib.suppress(OSError):
                    if "RankWorker" in log.read_text(errors="replace"):
                        used.add(name)
        return used

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """`ray stop` only stops what was started with *its* temp dir here, so pass each node's; then remove both."""
        for tmp in (getattr(self, "worker_tmp", None), getattr(self, "head_tmp", None)):
            if tmp is not None:
                self._stop_node(tmp)
                shutil.rmtree(tmp, ignore_errors=True)

    def _stop_node(self, tmp: Path) -> None:
        """Kill the processes of one node: every process whose command line names its temp folder (raylet, GCS,
        workers, log monitor are all started with it), SIGTERM then SIGKILL."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = _pids_mentioning(str(tmp))
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.time() + 10
            while pids and time.time() < deadline:
                pids = [p for p in pids if Path(f"/proc/{p}").exists() and _state(p) != "Z"]
                time.sleep(0.2)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def _pids_mentioning(text: str) -> list[int]:
    me, found = os.getpid(), []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(int(proc.name))
    return found
