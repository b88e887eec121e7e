"""A real SLURM cluster on this machine, for tests: munge, one slurmctld and two slurmd emulating nodes n1 and n2.

Debian's packages (`slurmctld`, `slurmd`, `slurm-client`, `munge`) run as plain root daemons in the foreground; all
configuration, state, spool, sockets and logs live in one folder, and the daemons are stopped by their PIDs. See
/work/shared/notes/local-slurm.md for what is known to work and the catches.

By hand: `python tests/slurm/local_slurm.py /tmp/slurm` starts a cluster and prints `export SLURM_CONF=...`; Ctrl-C
(or `kill <pid>`) stops it.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo", "munged", "mungekey")
APT_TIMEOUT_S = 300


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def ensure_installed(timeout_s: float = APT_TIMEOUT_S) -> str | None:
    """Install the Debian SLURM packages when missing (quietly, with a timeout). Returns why not, or None if ready."""
    if not missing_binaries():
        return None
    if os.geteuid() != 0:
        return f"SLURM binaries {missing_binaries()} are missing and installing them needs root"
    if shutil.which("apt-get") is None:
        return f"SLURM binaries {missing_binaries()} are missing and there is no apt-get to install {PACKAGES}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    deadline = time.monotonic() + timeout_s
    log = []
    for cmd in (install, ["apt-get", "update", "-q"], install):  # try the cached package lists first
        left = deadline - time.monotonic()
        if left <= 0:
            return f"installing {PACKAGES} with apt-get took longer than {timeout_s:.0f} s"
        try:
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` took longer than {timeout_s:.0f} s"
        log.append(f"$ {' '.join(cmd)} -> {out.returncode}\n{out.stderr[-1500:]}")
        if cmd is install and out.returncode == 0 and not missing_binaries():
            return None
    return f"could not install {PACKAGES} with apt-get:\n" + "\n".join(log[-2:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """Start with `start()`, stop with `stop()` (idempotent). `env` holds SLURM_CONF for sbatch/srun/scontrol."""

    def __init__(self, root: Path, nodes: tuple[str, ...] = ("n1", "n2"), partition: str = "debug"):
        self.root = Path(root)
        self.nodes = nodes
        self.partition = partition
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: dict[str, subprocess.Popen] = {}

    # ---- set-up -------------------------------------------------------------------------------------------
    def write_config(self) -> None:
        r = self.root
        for sub in ("state", "spool", "munge", "log"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        (r / "munge").chmod(0o755)  # munged refuses a socket folder of mode 700
        host = socket.gethostname().split(".")[0]
        cpus = os.cpu_count() or 1
        mem_mb = max(256, _available_mb() // (2 * len(self.nodes)))
        node_lines = [f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={free_port()} CPUs={cpus} "
                      f"RealMemory={mem_mb} State=UNKNOWN" for n in self.nodes]
        lines = [
            "ClusterName=csdmtest", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={free_port()}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={r / 'munge' / 'munge.socket.2'}",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool' / '%n'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'log' / 'slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none", "SwitchType=switch/none",
            "MpiDefault=none", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "ReturnToService=2",
            "MailProg=/bin/true", "SchedulerParameters=batch_sched_delay=0", "KillWait=5", "InactiveLimit=0",
            "MinJobAge=600", "SlurmdTimeout=300", "JobRequeue=1",
            *node_lines,
            f"PartitionName={self.partition} Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout_s: float = 60) -> None:
        """Start munged, slurmctld and one slurmd per node; return once every node is idle (else RuntimeError)."""
        self.write_config()
        m = self.root / "munge"
        key = m / "munge.key"
        self._check(["mungekey", "-c", "-k", str(key)])
        self._spawn("munged", ["munged", "-F", "-f", "-S", str(m / "munge.socket.2"), "--key-file", str(key),
                               "--pid-file", str(m / "munged.pid"), "--log-file", str(self.root / "log" / "munged.log"),
                               "--seed-file", str(m / "munged.seed")])
        self._wait(lambda: (m / "munge.socket.2").exists(), 10, "munged did not create its socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for n in self.nodes:
            (self.root / "spool" / n).mkdir(parents=True, exist_ok=True)
            self._spawn(f"slurmd-{n}", ["slurmd", "-D", "-N", n, "-f", str(self.conf)])
        self._wait(self._all_idle, timeout_s, "the nodes did not become idle")

    def _all_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True, text=True)
        states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
        return out.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def _wait(self, ok, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            if dead:
                raise RuntimeError(f"{what}: {dead} exited early\n{self.logs()}")
            if ok():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{what} within {timeout_s:.0f} s\n{self.logs()}")

    def _check(self, cmd: list[str]) -> None:
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=30)
        if out.returncode:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({out.returncode}): {out.stderr.strip()}")

    def logs(self, lines: int = 15) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts)

    # ---- use ----------------------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        out = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({out.returncode}): {out.stderr.strip()}")
        return out

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once the job is forgotten."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        if out.returncode:
            return {}
        return dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)

    def controller_log(self, job_id: str) -> str:
        """The lines of slurmctld's log that name this job."""
        path = self.root / "log" / "slurmctld.log"
        text = path.read_text(errors="replace") if path.is_file() else ""
        return "\n".join(line for line in text.splitlines() if re.search(rf"\b(JobId=|job ){job_id}\b", line))

    def jobs(self) -> list[str]:
        out = self.run("squeue", "-h", "-o", "%i", check=False)
        return out.stdout.split()

    # ---- tear-down ----------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel every job, then stop the daemons by PID (TERM, then KILL after 10 s)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            jobs = self.jobs()
            if jobs:
                self.run("scancel", *jobs, check=False)
                deadline = time.monotonic() + 15
                while self.jobs() and time.monotonic() < deadline:
                    time.sleep(0.3)
        for name in reversed(list(self.procs)):  # slurmd, slurmctld, then munged
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        self.procs.clear()


def _available_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 4096


if __name__ == "__main__":
    import sys

    reason = ensure_installed()
    if reason:
        sys.exit(reason)
    cluster = LocalSlurm(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/csdm-slurm"))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill <pid>` stops the daemons too
    try:
        t0 = time.monotonic()
        cluster.start()
        print(f"cluster up in {time.monotonic() - t0:.1f} s\nexport SLURM_CONF={cluster.conf}", flush=True)
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        cluster.stop()
