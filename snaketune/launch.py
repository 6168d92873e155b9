"""Starting the training ranks: one process, ``torchrun`` on one node inside the train job, or one
``torchrun`` per node for a training that spans nodes.

Data parallel runs inside one Snakemake job: the job asks for N GPUs (or, on a
CPU, N ranks) and starts its own ranks, so Snakemake and SLURM see one task.
The job's process *becomes* torchrun (``exec``), so killing the job kills the
launcher, and every rank dies with it (:func:`die_with_parent`).

The memory allocator is chosen here too (``train.allocator``): glibc's malloc keeps
much of the memory a training step frees in its arenas, where tcmalloc (gperftools)
reuses it (docs/benchmarks.md compares the two). A preload must be in place when a
process starts, so a one-rank job that should run on tcmalloc also becomes a fresh
process (same pid) with ``LD_PRELOAD`` set.

Each rank runs :mod:`snaketune.rank_main` (:data:`RANK_MODULE`), which this module
names but never imports: the launcher stays below the steps it starts.

Several nodes (``nodes`` > 1) start in one of two ways. Inside a SLURM allocation over
the nodes, the job runs ``srun`` with one task per node; each task runs torchrun, and
the nodes meet through torchrun's c10d rendezvous on the allocation's first node, at a
port derived from the job id (two trainings on one head node never share a port).
``--kill-on-bad-exit`` ends every node's ranks as soon as one node's stop, so a node
that dies fails the job at once instead of leaving the others waiting in a collective.
By hand, XTuner's way: the same command on each machine with ``NNODES``, ``NODE_RANK``,
``ADDR``, ``PORT`` (and ``NPROC_PER_NODE``) set; torchrun then meets at ``ADDR:PORT``
with node 0 as the host. There a dead node is noticed by the others only when their
next collective times out (torch.distributed's default, 30 minutes).
"""

from __future__ import annotations

import ctypes.util
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

from .errors import ConfigError, LaunchError

log = logging.getLogger(__name__)

TCMALLOC = "libtcmalloc_minimal.so.4"  # gperftools' malloc without its profilers
# What each rank runs: ``python -m snaketune.rank_main JOB`` (JOB: the train step's job as JSON).
RANK_MODULE = "snaketune.rank_main"
ALLOCATORS = ("auto", "tcmalloc", "system")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def inside_launcher() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def ensure_dist_env() -> None:
    """A lone process gets the rendezvous variables DeepSpeed would otherwise look for through MPI."""
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )


def torchrun_command(
    ranks: int,
    job: dict[str, Any],
    *,
    master_port: int | None = None,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
) -> list[str]:
    """``ranks`` processes of ``python -m snaketune.rank_main JOB`` on this node (JOB: the train step's
    job, ``asdict`` of it, as JSON), node ``node_rank`` of ``nnodes`` meeting at the master's address."""
    meet = [
        "--node_rank",
        str(node_rank),
        "--master_addr",
        master_addr,
        "--master_port",
        str(master_port or free_port()),
    ]
    return _torchrun(nnodes, ranks, meet, job)


def _torchrun(nnodes: int | str, ranks: int, rendezvous: list[str], job: dict[str, Any]) -> list[str]:
    """torchrun for this node's ``ranks`` of ``nnodes``, meeting the others as ``rendezvous`` says."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(nnodes),
        "--nproc_per_node",
        str(ranks),
        *rendezvous,
        "-m",
        RANK_MODULE,
        json.dumps(job),
    ]


# XTuner's variables for a training started by hand on each node (``NNODES=2 NODE_RANK=0 ADDR=... PORT=...``)
NODE_VARIABLES = ("NNODES", "NODE_RANK", "ADDR", "PORT")
RDZV_PORTS = (20000, 10000)  # a SLURM job's rendezvous port: first + job id modulo count


def rendezvous_port(job_id: str | int) -> int:
    first, count = RDZV_PORTS
    return first + int(job_id) % count


def by_hand_nodes() -> dict[str, str] | None:
    """XTuner's node variables when this process was started with them (all four, or a ConfigError)."""
    present = {name: os.environ[name] for name in NODE_VARIABLES if os.environ.get(name)}
    if not present:
        return None
    missing = [name for name in NODE_VARIABLES if name not in present]
    if missing:
        raise ConfigError(
            f"{', '.join(sorted(present))} set but not {', '.join(missing)}: a training started by hand on each "
            "node needs NNODES, NODE_RANK, ADDR and PORT (docs/cluster.md)"
        )
    for name in ("NNODES", "NODE_RANK", "PORT"):
        if not present[name].isdigit():
            raise ConfigError(f"{name}={present[name]!r}: must be a whole number")
    if int(present["NODE_RANK"]) >= int(present["NNODES"]):
        raise ConfigError(f"NODE_RANK={present['NODE_RANK']} with NNODES={present['NNODES']}: ranks are 0..NNODES-1")
    return present


def in_slurm_allocation() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID")) and shutil.which("srun") is not None


def nodes_command(nodes: int, ranks: int, job: dict[str, Any]) -> list[str]:
    """The command that starts a training over ``nodes`` nodes of ``ranks`` ranks each, from here:
    srun inside a SLURM allocation, or this node's torchrun when started by hand with XTuner's variables."""
    by_hand = by_hand_nodes()
    if by_hand is not None:
        if int(by_hand["NNODES"]) != nodes:
            raise ConfigError(f"NNODES={by_hand['NNODES']} but the experiment's nodes is {nodes}: set both alike")
        per_node = os.environ.get("NPROC_PER_NODE")
        if per_node and per_node != str(ranks):
            raise ConfigError(
                f"NPROC_PER_NODE={per_node} but this node starts {ranks} rank{'s' * (ranks > 1)} (the experiment's "
                "ranks or gpus): every node must start as many; set them alike"
            )
        return torchrun_command(
            ranks,
            job,
            nnodes=nodes,
            node_rank=int(by_hand["NODE_RANK"]),
            master_addr=by_hand["ADDR"],
            master_port=int(by_hand["PORT"]),
        )
    if in_slurm_allocation():
        return [
            "srun",
            f"--nodes={nodes}",
            f"--ntasks={nodes}",
            "--ntasks-per-node=1",
            "--kill-on-bad-exit=1",
            sys.executable,
            "-m",
            RANK_MODULE,
            "--node",
            json.dumps({"ranks": ranks, "job": job}),
        ]
    raise ConfigError(
        f"nodes: {nodes}, but this training runs on one machine: run the workflow through the SLURM profile "
        "(--workflow-profile profiles/slurm), or start it on each node with NNODES, NODE_RANK, ADDR and PORT set "
        "(docs/cluster.md)"
    )


def node_torchrun(spec: dict[str, Any]) -> list[str]:
    """Under srun, on each node of the allocation: torchrun for this node's ranks, meeting the other
    nodes at the allocation's first node. The SLURM variables are read here, where srun sets them."""
    job_id = os.environ["SLURM_JOB_ID"]
    hosts = subprocess.run(
        ["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    meet = ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"{hosts[0]}:{rendezvous_port(job_id)}", "--rdzv_id", job_id]
    return _torchrun(os.environ["SLURM_NNODES"], spec["ranks"], meet, spec["job"])


def launch_nodes(nodes: int, ranks: int, job: dict[str, Any], env: dict[str, str] | None = None) -> None:
    """Run the training over ``nodes`` nodes and wait for it; a node whose ranks stopped fails it, named."""
    cmd = nodes_command(nodes, ranks, job)
    env = _rank_env(env)
    log.info("starting %d nodes x %d rank%s: %s", nodes, ranks, "s" * (ranks > 1), " ".join(cmd[:-1]))
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise LaunchError(
            f"the training across {nodes} nodes stopped (exit status {rc}): the ranks of at least one node "
            "ended before the others",
            hint="each rank's log lies beside the job's log (<log>.rank<N>.log); a rerun resumes from the newest "
            "complete checkpoint on the same number of nodes and ranks",
        )


def find_tcmalloc() -> str | None:
    """tcmalloc's library: the environment's own (conda's gperftools), else the system's (Debian's
    libtcmalloc-minimal4, found through the dynamic linker's cache); None when neither is installed."""
    for prefix in dict.fromkeys(p for p in (os.environ.get("CONDA_PREFIX"), sys.prefix) if p):
        path = Path(prefix, "lib", TCMALLOC)
        if path.is_file():
            return str(path)
    return ctypes.util.find_library("tcmalloc_minimal")


def malloc_in_use() -> str:
    """The malloc this process runs on, read from its memory map: tcmalloc, jemalloc or the C library's."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    return next((name for name in ("tcmalloc", "jemalloc") if f"lib{name}" in maps), "system")


def allocator_env(setting: str) -> dict[str, str] | None:
    """The environment a training process should start with for ``train.allocator`` (auto, tcmalloc or
    system), or None when this process's own will do: system; tcmalloc already loaded; auto and no
    tcmalloc installed (logged); a preload already asked for that did not load (warned: no loop)."""
    if setting not in ALLOCATORS:
        raise ConfigError(f"train.allocator: {setting!r} is not one of {', '.join(ALLOCATORS)}")
    if setting == "system" or malloc_in_use() == "tcmalloc":
        return None
    lib = find_tcmalloc()
    if lib is None:
        if setting == "tcmalloc":
            raise ConfigError(
                f"train.allocator: tcmalloc, but {TCMALLOC} is not installed (conda: gperftools, "
                "envs/train.yaml has it; Debian/Ubuntu: apt install libtcmalloc-minimal4)"
            )
        log.info("allocator: glibc malloc (%s not installed; train.allocator auto)", TCMALLOC)
        return None
    preload = os.environ.get("LD_PRELOAD", "")
    if lib in preload.replace(":", " ").split():
        log.warning("allocator: LD_PRELOAD names %s but it did not load; training on %s", lib, malloc_in_use())
        return None
    return {  # a training's memory stays in use to its end: handing freed pages back to the system only to
        # fault them in again at the next step costs CPU time and saves no peak memory
        "TCMALLOC_RELEASE_RATE": "0",
        **os.environ,
        "LD_PRELOAD": " ".join(p for p in (lib, preload) if p),
        # tcmalloc reports every allocation over 1 GiB on stderr (a 7B model's load makes many)
        "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40),
    }


def relaunch(ranks: int, job: dict[str, Any], env: dict[str, str] | None = None) -> NoReturn:
    """Become torchrun, running the train step's ``job`` once per rank, or, for one rank, become a
    fresh process of it in ``env`` (the allocator's preload)."""
    cmd = torchrun_command(ranks, job) if ranks > 1 else [sys.executable, "-m", RANK_MODULE, json.dumps(job)]
    env = _rank_env(env)
    if env.get("LD_PRELOAD") != os.environ.get("LD_PRELOAD"):
        log.info("allocator: LD_PRELOAD=%s", env["LD_PRELOAD"])
    log.info("starting %d rank%s: %s", ranks, "s" * (ranks > 1), " ".join(cmd))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, env)


def _rank_env(env: dict[str, str] | None) -> dict[str, str]:
    """The ranks' environment: ``env`` (or this process's), with this package importable."""
    env = dict(env or os.environ)
    # The ranks import this very package, installed or not (a conda env installs only its dependencies).
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def die_with_parent() -> None:
    """Linux: SIGKILL this rank when its launcher dies.

    torchrun starts each worker in a session of its own, so killing torchrun
    (a walltime kill, Ctrl-C, SIGKILL) would leave the ranks training on,
    unseen, and racing a resumed run for the same work directory.
    """
    import ctypes
    import signal

    parent = os.getppid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return  # not Linux/glibc: nothing to ask for
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)
