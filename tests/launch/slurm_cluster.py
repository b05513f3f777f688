"""A real SLURM cluster on this machine for tests: munged, slurmctld and one slurmd per node,
every node on 127.0.0.1 with its own port (Debian builds slurmd with multiple-slurmd support),
all state, sockets, logs and pid files under one directory.

Every daemon runs in the foreground as a child of the test process, so `stop()` ends each one by
its PID and reaps it. Everything the cluster starts carries `SLURM_CONF=<this cluster's conf>` in
its environment (daemons, job steps, torchrun and the workers, via sbatch's environment export);
`stop()` cancels the jobs and then kills any such process still alive, by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.launch.procs import alive, all_pids, environ, kill_pids, wait_for

BINARIES = (
    "munged",
    "slurmctld",
    "slurmd",
    "sbatch",
    "srun",
    "scontrol",
    "squeue",
    "scancel",
    "sinfo",
    "unshare",
)
# How long a requeued job waits before it may start again is the credential lifetime
# (slurm.conf(5), AuthInfo cred_expire, default 120 s); 5 s, the smallest slurmctld accepts,
# keeps the tests short.
CRED_EXPIRE_S = 5
PREEMPT_GRACE_S = 120


# Each node gets its own /dev/shm, as separate machines have: a job's processes on one node
# share mosaicml-streaming segments named after a per-node prefix, and two nodes picking the same
# prefix in one /dev/shm collide (FileExistsError: '/000001_locals'). The command runs in a new
# mount namespace (same PIDs, same network) with a fresh tmpfs on /dev/shm, then execs slurmd.
PRIVATE_SHM = [
    "unshare",
    "--mount",
    "--propagation",
    "private",
    "--",
    "sh",
    "-c",
    'mount -t tmpfs -o size=1g,mode=1777 megalite-test-shm /dev/shm && exec "$@"',
    "slurmd-with-private-shm",
]


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class SlurmCluster:
    root: Path
    nodes: tuple[str, ...] = ("n1", "n2")
    cpus_per_node: int = 1
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)
    # Processes stop() had to kill after the daemons were gone (a test may assert none).
    leftovers: list[int] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment for SLURM clients (and, through sbatch, for the jobs)."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    # -------------------------------------------------------------------------------- start
    def start(self) -> SlurmCluster:
        munge = self.root / "munge"
        munge.mkdir(parents=True, mode=0o755)
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir()
        key = munge / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        socket_path = munge / "munge.socket"
        # --force: munged refuses to run as root otherwise; the tests run as root.
        self._spawn(
            "munged",
            [
                _which("munged"),
                "--foreground",
                "--force",
                f"--socket={socket_path}",
                f"--key-file={key}",
                f"--log-file={munge / 'munged.log'}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--seed-file={munge / 'munged.seed'}",
            ],
        )
        wait_for(socket_path.exists, 20, "munged's socket")
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        self.conf.write_text(self._slurm_conf(socket_path, ctld_port, node_ports))
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)])
        for node in self.nodes:
            (self.root / "spool" / node).mkdir()
            slurmd = [_which("slurmd"), "-D", "-f", str(self.conf), "-N", node]
            self._spawn(f"slurmd-{node}", [*PRIVATE_SHM, *slurmd])
        try:
            wait_for(self._all_idle, 60, "every node to be idle in sinfo")
        except TimeoutError as e:
            raise RuntimeError(f"{e}\n{self.logs()}") from e
        return self

    def _slurm_conf(self, munge_socket: Path, ctld_port: int, node_ports: list[int]) -> str:
        r = self.root
        lines = [
            "ClusterName=megalite-test",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={munge_socket},cred_expire={CRED_EXPIRE_S}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            # Look at pending jobs every second (default 60 s / 30 s): a requeued job starts
            # as soon as its hold-off ends.
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "KillWait=5",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool' / '%n'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd-%n.log'}",
        ]
        for node, port in zip(self.nodes, node_ports):
            lines.append(
                f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
                f"CPUs={self.cpus_per_node} RealMemory=2000 State=UNKNOWN"
            )
        # Preemption as clusters set it up: a job in `urgent` (higher PriorityTier) preempts
        # jobs in `debug`, which get SIGTERM on their steps and PREEMPT_GRACE_S to end before
        # SIGKILL; CANCEL mode, so a preempted job comes back only if it requeues itself.
        nodes = ",".join(self.nodes)
        lines += [
            "PreemptType=preempt/partition_prio",
            "PreemptMode=CANCEL",
            f"PartitionName=debug Nodes={nodes} Default=YES PriorityTier=1 PreemptMode=CANCEL "
            f"GraceTime={PREEMPT_GRACE_S} MaxTime=INFINITE State=UP",
            f"PartitionName=urgent Nodes={nodes} PriorityTier=2 PreemptMode=OFF "
            "MaxTime=INFINITE State=UP",
        ]
        return "\n".join(lines) + "\n"

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.root / "log" / f"{name}.stdio", "wb") as log:
            self.daemons[name] = subprocess.Popen(
                argv,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )

    def _all_idle(self) -> bool:
        for name, proc in self.daemons.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.logs()}")
        res = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False)
        states = dict(line.split() for line in res.stdout.splitlines() if line.strip())
        return res.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes)

    # ------------------------------------------------------------------------------ clients
    def run(self, argv: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("env", self.env)
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60, **kwargs)
        if check and res.returncode != 0:
            raise RuntimeError(f"{argv} failed ({res.returncode}): {res.stderr}{res.stdout}")
        return res

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, Reason, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def logs(self) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            text = f.read_text(errors="replace").splitlines()[-15:]
            parts.append(f"--- {f.name}\n" + "\n".join(text))
        return "\n".join(parts)

    # --------------------------------------------------------------------------------- stop
    def stop(self) -> None:
        """Cancels every job, then ends each daemon by PID (SIGTERM, SIGKILL after 10 s), then
        kills by PID any process still carrying this cluster's SLURM_CONF."""
        if self.daemons.get("slurmctld") and self.daemons["slurmctld"].poll() is None:
            jobs = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
            if jobs:
                self.run(["scancel", *jobs], check=False)
                try:
                    wait_for(
                        lambda: (
                            not self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
                        ),
                        30,
                        "cancelled jobs to leave the queue",
                        interval=0.2,
                    )
                except TimeoutError:
                    pass  # the leftover processes are killed below
        for name in [*(n for n in self.daemons if n.startswith("slurmd")), "slurmctld", "munged"]:
            proc = self.daemons.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        marker = f"SLURM_CONF={self.conf}"
        leftovers = [
            p
            for p in all_pids()
            if p != os.getpid() and alive(p) and marker in _env_items(environ(p))
        ]
        kill_pids(leftovers)
        self.leftovers = leftovers


def _die_with_parent() -> None:
    """In the daemon, before exec: SIGTERM when the test process dies, so a killed pytest
    leaves no daemons behind (stop() is the normal way)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _env_items(env: dict[str, str]) -> set[str]:
    return {f"{k}={v}" for k, v in env.items()}
