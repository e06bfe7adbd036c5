"""A real Slurm cluster on this machine, for the tests: munged, slurmctld and two slurmd "nodes".

    with SlurmCluster(tmp_path / "cluster") as cluster:
        job_id = cluster.sbatch(["slurm/train.sbatch", "--config", "x.yaml"], cwd=work)
        info = cluster.wait_until_done(job_id, timeout=120)

Everything lives under one state directory named PREFIX<pid of the test process>-...: its own
munge key and socket, slurm.conf, spool, state, logs, and free ports picked per cluster, so
nothing is read from or written to /etc, /run or /var, and a concurrent cluster (another
checkout's tests) is never touched. Both nodes are this machine (NodeAddr 127.0.0.1), with
distinct slurmd ports; no cgroups (proctrack/linuxproc, task/none). Two partitions, `low` and
`high`, for preemption by partition priority with PreemptMode=REQUEUE; RequeueExit=75 (a run
stopped after a checkpoint is requeued); a 10 s credential lifetime, so that a requeued job
starts again in seconds instead of minutes.

Stopping cancels the jobs, stops the daemons it started, kills (by pid) any process still
carrying this cluster's SLURM_CONF (job steps, their tasks), checks that its ports are free
and removes the state directory, also when the code in the `with` block failed. Leftovers of
a test process that was killed outright are removed by the next start (remove_leftovers).

Needs root and the Debian packages slurmctld, slurmd, slurm-client and munge (22.05 measured).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PREFIX = "mnist-ddp-slurm-"
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel")
NODES = ("n1", "n2")
CPUS_PER_NODE = 2
CRED_EXPIRE_S = 10
GRACE_TIME_S = 20  # the low partition's preemption grace: SIGTERM, then this long to stop
FINAL_GRACE_S = 5  # a job seen in a final state is not requeued after this long
DONE_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY"})

SLURM_CONF = """\
ClusterName=mnistddp
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire={cred_expire}
MailProg=/bin/true
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
PlugStackConfig={root}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
RequeueExit=75
MpiDefault=none
KillWait=10
MinJobAge=600
SchedulerParameters=sched_interval=1,bf_interval=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
{nodes}
PartitionName=low Nodes=ALL Default=YES PriorityTier=1 GraceTime={grace_time} MaxTime=INFINITE State=UP
PartitionName=high Nodes=ALL PriorityTier=2 PreemptMode=OFF MaxTime=INFINITE State=UP
"""
NODE_LINE = "NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs={cpus} RealMemory=8000"


class ClusterError(RuntimeError):
    """A daemon died, or the cluster did not reach a state in time; the message carries the logs' tails."""


def missing_commands() -> list[str]:
    return [name for name in COMMANDS if shutil.which(name) is None]


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (held open together, so they are distinct)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def processes_of(conf: Path) -> list[int]:
    """Processes whose environment names `conf` as SLURM_CONF: a cluster's daemons, job steps and
    their tasks (sbatch passes the submitting environment on)."""
    needle = f"SLURM_CONF={conf}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:  # gone, or a kernel thread
            continue
        if needle in environ.split(b"\0"):
            found.append(int(proc.name))
    return found


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """The pids of `pids` still alive (not zombies) after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = [pid for pid in pids if alive(pid)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def remove_leftovers() -> list[Path]:
    """State directories (and the processes of their clusters) left by test processes that are gone."""
    removed = []
    for root in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        match = re.match(rf"{PREFIX}(\d+)-", root.name)
        if not match or Path(f"/proc/{match[1]}").exists():
            continue
        pids = processes_of(root / "slurm.conf")
        kill_all(pids)
        wait_gone(pids, timeout=10)
        shutil.rmtree(root, ignore_errors=True)
        removed.append(root)
    return removed


class SlurmCluster:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
        self.conf = self.root / "slurm.conf"
        self.ctld_port, *node_ports = free_ports(1 + len(NODES))
        self.node_ports = dict(zip(NODES, node_ports, strict=True))
        self.daemons: dict[str, subprocess.Popen[bytes]] = {}
        self._ports_handed_out: set[int] = set()

    # --- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> None:
        remove_leftovers()
        self._write_files()
        munge = self.root / "munge"
        self._spawn(
            "munged",
            ["munged", "--foreground", f"--key-file={munge}/munge.key", f"--socket={munge}/munge.socket",
             f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed"],
        )  # fmt: skip
        self.wait_for(lambda: (munge / "munge.socket").exists(), timeout, "munged's socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        self.wait_for(lambda: self.client("sinfo", "-h", check=False).returncode == 0, timeout, "slurmctld answering")
        for node in NODES:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node])
        self.wait_for(lambda: self.idle_nodes() == set(NODES), timeout, f"nodes {', '.join(NODES)} idle")

    def stop(self) -> None:
        """Cancel every job, stop the daemons, kill what is left of the jobs, free the ports, remove
        the state directory. Raises ClusterError when something could not be removed."""
        problems = []
        if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
            with contextlib.suppress(ClusterError, subprocess.TimeoutExpired):
                self.client("scancel", "--me", timeout=10)
                # jobs end within KillWait (10 s) after their SIGTERM
                self.wait_for(lambda: not self.client("squeue", "-h", check=False).stdout.strip(), 20, "no jobs")
        for daemon in reversed(self.daemons.values()):  # nodes, then slurmctld, then munged
            if daemon.poll() is None:
                daemon.terminate()
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:  # seen once from a slurmd: killed like any leftover below
                daemon.kill()
                daemon.wait(timeout=5)
        left = processes_of(self.conf)
        kill_all(left)
        still = wait_gone(left, timeout=10)
        if still:
            problems.append(f"processes of this cluster still alive after SIGKILL: {still}")
        busy = [port for port in (self.ctld_port, *self.node_ports.values()) if port_in_use(port)]
        logs = self.log_tails() if still or busy else ""
        shutil.rmtree(self.root, ignore_errors=True)
        if busy:
            problems.append(f"ports still in use: {busy}")
        if self.root.exists():
            problems.append(f"{self.root} could not be removed")
        if problems:
            raise ClusterError("; ".join(problems) + (f"\n{logs}" if logs else ""))

    def _write_files(self) -> None:
        for folder in ("munge", "state", "run", "log", *(f"spool/{node}" for node in NODES)):
            (self.root / folder).mkdir(parents=True)
        # munged refuses a socket directory that others cannot traverse, and a readable key.
        self.root.chmod(0o755)
        (self.root / "munge").chmod(0o755)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        (self.root / "plugstack.conf").write_text("")  # none of /etc/slurm's SPANK plugins
        nodes = "\n".join(
            NODE_LINE.format(name=node, port=port, cpus=CPUS_PER_NODE) for node, port in self.node_ports.items()
        )
        self.conf.write_text(
            SLURM_CONF.format(
                root=self.root,
                ctld_port=self.ctld_port,
                nodes=nodes,
                cred_expire=CRED_EXPIRE_S,
                grace_time=GRACE_TIME_S,
            )
        )

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "wb")  # noqa: SIM115 (the daemon holds it)
        with log:
            self.daemons[name] = subprocess.Popen(
                argv, env=self.env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.root
            )

    # --- clients --------------------------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        """This process's environment for this cluster: SLURM_CONF set, no variables of an
        enclosing Slurm job (a test run inside an allocation) or of sbatch/srun defaults."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra)
        return env

    def client(self, *argv: str, check: bool = True, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess[str]:
        kwargs.setdefault("env", self.env())
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and result.returncode != 0:
            raise ClusterError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def sbatch(self, argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> int:
        """Submit `sbatch --parsable ARGV` from `cwd`; the job's id."""
        result = self.client("sbatch", "--parsable", *argv, cwd=cwd, env=env or self.env())
        return int(result.stdout.strip().split(";")[0])

    def new_port(self) -> int:
        """A free port, never the same twice: for jobs that run side by side (their rendezvous)."""
        while (port := free_ports(1)[0]) in self._ports_handed_out | {self.ctld_port, *self.node_ports.values()}:
            pass
        self._ports_handed_out.add(port)
        return port

    def idle_nodes(self) -> set[str]:
        result = self.client("sinfo", "-h", "-N", "-t", "idle", "-o", "%N", check=False)
        return set(result.stdout.split()) if result.returncode == 0 else set()

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, NodeList, StdOut, ...)."""
        line = self.client("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def reconfigure(self, key: str, value: str | None) -> None:
        """Set (None: remove) one slurm.conf option and make the running daemons read it again."""
        lines = [line for line in self.conf.read_text().splitlines() if not line.startswith(f"{key}=")]
        self.conf.write_text("\n".join([*lines, *([f"{key}={value}"] if value is not None else [])]) + "\n")
        self.client("scontrol", "reconfigure")
        shown = "(null)" if value is None else value

        def applied() -> bool:
            config = self.client("scontrol", "show", "config").stdout
            return re.search(rf"^{key}\s*=\s*{re.escape(shown)}$", config, re.M) is not None

        self.wait_for(applied, 30, f"{key}={shown} in the running configuration")

    # --- waiting --------------------------------------------------------------------------

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
        """Poll `condition` until it holds; fail early when a daemon died, and after `timeout`."""
        deadline = time.monotonic() + timeout
        while not condition():
            dead = [name for name, daemon in self.daemons.items() if daemon.poll() is not None]
            if dead:
                raise ClusterError(f"waiting for {what}: {', '.join(dead)} exited\n{self.log_tails()}")
            if time.monotonic() > deadline:
                raise ClusterError(f"waiting for {what}: not within {timeout:.0f} s\n{self.log_tails()}")
            time.sleep(interval)

    def wait_until_done(self, job_id: int, timeout: float, restarts: int = 0) -> dict[str, str]:
        """The job once it has ended after `restarts` requeues, or ended with fewer and stayed so for
        FINAL_GRACE_S (then no requeue is coming: the caller's check of Restarts fails at once)."""
        info: dict[str, str] = {}
        ended_early: list[float] = []

        def done() -> bool:
            info.update(self.job(job_id))
            if info["JobState"] not in DONE_STATES:
                ended_early.clear()
                return False
            if int(info["Restarts"]) >= restarts:
                return True
            ended_early[:] = ended_early or [time.monotonic()]
            return time.monotonic() - ended_early[0] > FINAL_GRACE_S

        self.wait_for(done, timeout, f"job {job_id} to end (after {restarts} requeue(s))", interval=0.5)
        return info

    def wait_until_idle(self, timeout: float) -> None:
        """Until no job is pending or running."""
        self.wait_for(lambda: not self.client("squeue", "-h").stdout.strip(), timeout, "an empty queue", interval=0.5)

    def log_tails(self, lines: int = 15) -> str:
        tails = []
        for log in sorted((self.root / "log").glob("*")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            tails.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(tails)

    def job_processes(self, job_id: int) -> list[Process]:
        """The processes of job `job_id` (their environment says so): batch shell, srun, tasks and their children."""
        found = []
        for pid in processes_of(self.conf):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
            except OSError:  # gone
                continue
            env = dict(item.split("=", 1) for item in environ if "=" in item)
            if env.get("SLURM_JOB_ID") == str(job_id):
                found.append(Process(pid, argv, env))
        return found


@dataclass
class Process:
    pid: int
    argv: list[str]
    env: dict[str, str]
