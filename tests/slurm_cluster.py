"""A real one-node SLURM cluster for tests (Debian's slurm-wlm + munge), started and stopped by the test itself.

Facts from ../shared/spec/CLUSTER.md: linuxproc proctrack, no task plugin, cons_tres with core+memory, a default
memory per CPU (else one job takes the whole node), no accounting database (status via squeue), MinJobAge long
enough for the executor's status checks, and stand-in GPUs as gres character devices (mknod c 195 N) so that
`--gpus=N` jobs get CUDA_VISIBLE_DEVICES. Only the daemons started here are stopped at teardown.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


def slurm_available() -> str | None:
    """None when a local cluster can be started here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd needs root"
    missing = [d for d in DAEMONS + ("sbatch", "squeue", "scontrol") if not shutil.which(d) and
               not Path(f"/usr/sbin/{d}").exists()]
    if missing:
        return f"SLURM/munge not installed ({', '.join(missing)}): run scripts/install_slurm.sh"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _which(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalSlurm:
    def __init__(self, workdir: Path, gpus: int = 2):
        self.dir = Path(workdir)
        self.gpus = gpus
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.dir / "slurm.conf"))

    # ------------------------------------------------------------------ configuration
    def _write_conf(self) -> None:
        d = self.dir
        for sub in ("state", "spool", "log", "dev"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        cpus = os.cpu_count() or 2
        mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
        ctl_port, d_port = _free_port(), _free_port()
        (d / "slurm.conf").write_text(f"""\
ClusterName=morphfuse-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctl_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=3600
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MessageTimeout=20
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} Gres=gpu:{self.gpus} State=UNKNOWN
PartitionName=main Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=localhost MaxTime=INFINITE State=UP
""")
        lines = ["AutoDetect=off"]
        for i in range(self.gpus):
            dev = d / "dev" / f"nvidia{i}"
            if not dev.exists():
                os.mknod(dev, 0o666 | 0o020000, os.makedev(195, i))  # character device: a stand-in GPU
            lines.append(f"Name=gpu File={dev}")
        (d / "gres.conf").write_text("\n".join(lines) + "\n")
        (d / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")

    # ------------------------------------------------------------------ lifecycle
    def _start(self, argv: list[str], user: str | None = None) -> None:
        if user:
            argv = ["runuser", "-u", user, "--"] + argv
        name = Path(argv[4] if user else argv[0]).name
        log = open(self.dir / "log" / f"{name}.out", "ab")
        self.procs.append(subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def _srun_shim(self) -> None:
        """Inside a job, Snakemake's jobstep executor drops every SLURM_* variable (SLURM_CONF included) before it
        calls srun. A real cluster's clients find /etc/slurm/slurm.conf; ours lives in a temp folder, so a shim
        first on PATH (exported to jobs) points the real srun at it instead of writing into /etc."""
        bin_dir = self.dir / "bin"
        bin_dir.mkdir(exist_ok=True)
        shim = bin_dir / "srun"
        shim.write_text(f"#!/bin/sh\nSLURM_CONF={self.dir / 'slurm.conf'} exec {_which('srun')} \"$@\"\n")
        shim.chmod(0o755)
        self.env["PATH"] = f"{bin_dir}:{self.env.get('PATH', '')}"

    def start(self, timeout: float = 60) -> "LocalSlurm":
        self._write_conf()
        self._srun_shim()
        # munge: our own daemon on our own socket, so nothing of the machine's is touched or stopped.
        # munged runs as user munge, which cannot enter root's 0700 temp folders: give it its own folder in /tmp.
        self.munge_dir = Path(tempfile.mkdtemp(prefix="morphfuse-munge-"))
        self.munge_dir.chmod(0o755)
        sock = self.munge_dir / "munge.socket"
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run([_which("mungekey"), "--create", "--keyfile", str(key)], check=True)
            shutil.chown(key, "munge", "munge")
            key.chmod(0o400)
        shutil.chown(self.munge_dir, "munge", "munge")
        m = self.munge_dir
        self._start([_which("munged"), "--foreground", "--force", f"--socket={sock}",
                     f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"],
                    user="munge")
        self.env["MUNGE_SOCKET"] = str(sock)  # not read by slurm: it uses AuthInfo below
        with open(self.dir / "slurm.conf", "a") as f:
            f.write(f"AuthInfo=socket={sock}\n")
        self._wait(lambda: sock.exists(), timeout, "munged socket")
        self._start([_which("slurmctld"), "-D", "-i", "-f", str(self.dir / "slurm.conf")])
        self._wait(lambda: self._run(["scontrol", "ping"]).returncode == 0, timeout, "slurmctld")
        self._start([_which("slurmd"), "-D", "-N", "localhost", "-f", str(self.dir / "slurm.conf")])
        self._wait(lambda: self._run(["sinfo", "-h", "-N", "-n", "localhost", "-o", "%T"]).stdout.strip()
                   .startswith("idle"), timeout, "node idle")
        return self

    def _run(self, argv, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, **kw)

    def _wait(self, cond, timeout: float, what: str) -> None:
        end = time.time() + timeout
        while time.time() < end:
            dead = [p.args for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead[0]} exited early; logs in {self.dir}/log:\n{self.logs()}")
            if cond():
                return
            time.sleep(0.5)
        raise TimeoutError(f"{what} not ready after {timeout:.0f} s; logs in {self.dir}/log:\n{self.logs()}")

    def logs(self) -> str:
        out = []
        for p in sorted((self.dir / "log").glob("*")) + sorted(getattr(self, "munge_dir", self.dir).glob("*.log")):
            out.append(f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:])
        return "\n".join(out)

    def jobs(self) -> list[dict]:
        """Every job SLURM knows of (MinJobAge keeps finished ones), from scontrol's own records."""
        r = self._run(["scontrol", "show", "job", "-o"])
        jobs = []
        for line in r.stdout.splitlines():
            if not line.strip() or line.startswith("No jobs"):
                continue
            fields = {}
            for tok in line.split():
                if "=" in tok:
                    k, v = tok.split("=", 1)
                    fields[k] = v
            jobs.append(fields)
        return jobs

    def cancel_all(self) -> None:
        self._run(["scancel", "--user", "root"])

    def stop(self) -> None:
        self.cancel_all()
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()
        if getattr(self, "munge_dir", None):
            shutil.rmtree(self.munge_dir, ignore_errors=True)
