"""A real SLURM cluster on loopback (Debian's slurm-wlm and munge), for the tests: one node, or
several nodes on one host.

Needs root and the packages (.ci/run installs them). Every daemon runs in the
foreground as a child of the test process and is stopped by its process id.
Several nodes are several slurmd daemons (Debian builds SLURM with multiple-slurmd
support), each on its own port and in its own UTS namespace, so that a job's
processes on each node see that node's host name; the node names resolve to
127.0.0.1 through /etc/hosts lines the cluster adds and removes again.
"""

from __future__ import annotations

import copy
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SLURM_CONF = Path("/etc/slurm/slurm.conf")  # srun inside a job reads the default path
GRES_CONF = Path("/etc/slurm/gres.conf")
HOSTS = Path("/etc/hosts")
MARK = "# written by snaketune's test suite\n"
HOSTS_MARK = "# snaketune test cluster"


class Cluster:
    def __init__(self, nodes: int = 1) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="snaketune-slurm-"))
        self.host = socket.gethostname().split(".")[0]
        self.nodes = [self.host] if nodes == 1 else [f"stnode{i}" for i in range(1, nodes + 1)]
        self.procs: list[subprocess.Popen] = []

    def _node_lines(self, mem_mb: int) -> list[str]:
        """One node: this host itself. Several: one name each, its own slurmd port, the host's memory shared."""
        gres = "Gres=gpu:1 State=UNKNOWN"
        if len(self.nodes) == 1:
            return [f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={mem_mb} {gres}"]
        share = mem_mb // len(self.nodes)
        return [
            f"NodeName={name} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={17001 + i} CPUs={os.cpu_count()} "
            f"RealMemory={share} {gres}"
            for i, name in enumerate(self.nodes)
        ]

    def _conf(self) -> str:
        mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20) - 2048
        state, spool = self.root / "state", self.root / "spool"
        state.mkdir()
        spool.mkdir()
        for name in self.nodes:
            (spool / name).mkdir()
        several = len(self.nodes) > 1
        return (
            MARK
            + "\n".join(
                [
                    "ClusterName=snaketune-test",
                    f"SlurmctldHost={self.host}(127.0.0.1)",
                    f"SlurmctldPort={16827 if several else 16817}",
                    "SlurmdPort=16818",
                    "SlurmUser=root",
                    "AuthType=auth/munge",
                    f"StateSaveLocation={state}",
                    f"SlurmdSpoolDir={spool}/%n",
                    f"SlurmctldPidFile={self.root}/slurmctld.pid",
                    f"SlurmdPidFile={self.root}/slurmd-%n.pid",
                    f"SlurmdLogFile={self.root}/slurmd-%n.log",
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
                    *self._node_lines(mem_mb),
                    f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP",
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
        if len(self.nodes) == 1:
            self._spawn(["/usr/sbin/slurmd", "-D"])
        else:
            self._add_hosts()
            for name in self.nodes:
                cmd = ["unshare", "--uts", "sh", "-c", f"hostname {name} && exec /usr/sbin/slurmd -D -N {name}"]
                self._spawn(cmd, name=f"slurmd-{name}-stdout")
        self._wait(self._node_idle, f"the SLURM node{'s' * (len(self.nodes) > 1)} to become idle")
        return self

    def _add_hosts(self) -> None:
        """The node names resolve to 127.0.0.1 (torchrun's rendezvous looks the head node up by name)."""
        text = HOSTS.read_text() if HOSTS.exists() else ""
        line = f"127.0.0.1 {' '.join(self.nodes)} {HOSTS_MARK}\n"
        HOSTS.write_text(text + ("" if text.endswith("\n") or not text else "\n") + line)

    def _remove_hosts(self) -> None:
        if HOSTS.exists():
            lines = HOSTS.read_text().splitlines(keepends=True)
            HOSTS.write_text("".join(line for line in lines if HOSTS_MARK not in line))

    def _spawn(self, cmd: list[str], user: str | None = None, name: str | None = None) -> None:
        log = open(self.root / f"{name or Path(cmd[0]).name}.log", "w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, user=user))

    def _node_idle(self) -> bool:
        res = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True)
        states = res.stdout.split()
        return res.returncode == 0 and len(states) == len(self.nodes) and set(states) <= {"idle", "mix"}

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
        self._remove_hosts()
        shutil.rmtree(self.root, ignore_errors=True)


def available() -> str | None:
    """Why the cluster cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    missing = [
        b
        for b in ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "unshare")
        if not shutil.which(b) and not Path("/usr/sbin", b).exists()
    ]
    return f"missing {', '.join(missing)} (apt-get install slurm-wlm munge)" if missing else None


SHIPPED = yaml.safe_load((ROOT / "profiles/slurm/config.yaml").read_text())  # profiles/slurm as shipped


def cpu_node_profile(wd, **train):
    """profiles/slurm as shipped, changing only what the 2-core test node lacks: a real partition name,
    an account (none), an accounting database (status through squeue), and sizes it can hold (8 CPUs
    per GPU, 64 / 32 GB). The GPU request, one task per job, the walltime and its retry stay."""
    profile = copy.deepcopy(SHIPPED)
    profile["default-resources"].update(slurm_partition="debug", mem_mb=3000, cpus_per_task=1)
    profile["set-resources"]["train"].update(cpus_per_gpu=2, mem_mb=4000, **train)
    for rule in ("merge", "evaluate"):
        profile["set-resources"][rule]["mem_mb"] = 4000
    profile.update(
        {
            "slurm-no-account": True,
            "slurm-status-command": "squeue",
            "latency-wait": 5,
            "jobs": 2,
            "slurm-init-seconds-before-status-checks": 1,
            "seconds-between-status-checks": 2,
        }
    )
    (wd / "profiles/slurm/config.yaml").write_text(yaml.safe_dump(profile))
    return profile
