"""A real one-node SLURM cluster on loopback (Debian's slurm-wlm and munge), for the tests.

Needs root and the packages (.ci/run installs them). Every daemon runs in the
foreground as a child of the test process and is stopped by its process id.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SLURM_CONF = Path("/etc/slurm/slurm.conf")  # srun inside a job reads the default path
GRES_CONF = Path("/etc/slurm/gres.conf")
MARK = "# written by snaketune's test suite\n"


class Cluster:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="snaketune-slurm-"))
        self.host = socket.gethostname().split(".")[0]
        self.procs: list[subprocess.Popen] = []

    def _conf(self) -> str:
        mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20) - 2048
        state, spool = self.root / "state", self.root / "spool"
        state.mkdir()
        spool.mkdir()
        return (
            MARK
            + "\n".join(
                [
                    "ClusterName=snaketune-test",
                    f"SlurmctldHost={self.host}(127.0.0.1)",
                    "SlurmctldPort=16817",
                    "SlurmdPort=16818",
                    "SlurmUser=root",
                    "AuthType=auth/munge",
                    f"StateSaveLocation={state}",
                    f"SlurmdSpoolDir={spool}",
                    f"SlurmctldPidFile={self.root}/slurmctld.pid",
                    f"SlurmdPidFile={self.root}/slurmd.pid",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core_Memory",
                    "AccountingStorageType=accounting_storage/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "MinJobAge=600",
                    # One GPU in name only (gres.conf: File=/dev/null): the profile's GPU request is scheduled as
                    # shipped; the job finds no CUDA device and trains on the CPU.
                    "GresTypes=gpu",
                    f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={mem_mb} Gres=gpu:1 "
                    "State=UNKNOWN",
                    f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
                ]
            )
            + "\n"
        )

    def start(self) -> Cluster:
        for conf in (SLURM_CONF, GRES_CONF):
            if conf.exists() and not conf.read_text().startswith(MARK):
                raise RuntimeError(f"{conf} exists and is not ours: not touching a real cluster's config")
        SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SLURM_CONF.write_text(self._conf())
        GRES_CONF.write_text(MARK + "Name=gpu File=/dev/null\n")
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True)
            key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
            Path(d).mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "munge", "munge")
        self._spawn(["/usr/sbin/munged", "-F", "--force"], user="munge")
        self._wait(lambda: subprocess.run(["munge", "-n"], capture_output=True).returncode == 0, "munged")
        self._spawn(["/usr/sbin/slurmctld", "-D", "-i"])
        self._spawn(["/usr/sbin/slurmd", "-D"])
        self._wait(self._node_idle, "the SLURM node to become idle")
        return self

    def _spawn(self, cmd: list[str], user: str | None = None) -> None:
        log = open(self.root / f"{Path(cmd[0]).name}.log", "w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, user=user))

    def _node_idle(self) -> bool:
        res = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
        return res.returncode == 0 and res.stdout.strip() in ("idle", "mix")

    def _wait(self, ready, what: str, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.time() > deadline:
                logs = "\n".join(f"--- {f.name}\n{f.read_text()[-2000:]}" for f in self.root.glob("*.log"))
                raise RuntimeError(f"waiting for {what} failed (exited: {dead})\n{logs}")
            time.sleep(0.5)

    def stop(self) -> None:
        # a failed test's jobs: their processes would outlive the daemons
        subprocess.run(["scancel", "--user", "root"], capture_output=True)
        deadline = time.time() + 60
        while (
            time.time() < deadline and subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip()
        ):
            time.sleep(1)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for conf in (SLURM_CONF, GRES_CONF):
            if conf.exists() and conf.read_text().startswith(MARK):
                conf.unlink()
        shutil.rmtree(self.root, ignore_errors=True)


def available() -> str | None:
    """Why the cluster cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    missing = [
        b
        for b in ("slurmctld", "slurmd", "munged", "sbatch", "squeue")
        if not shutil.which(b) and not Path("/usr/sbin", b).exists()
    ]
    return f"missing {', '.join(missing)} (apt-get install slurm-wlm munge)" if missing else None
