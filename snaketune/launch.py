"""Starting the training ranks: one process, ``torchrun`` on one node, or (planned) several nodes.

Data parallel runs inside one Snakemake job: the job asks for N GPUs (or, on a
CPU, N ranks) and starts its own ranks, so Snakemake and SLURM see one task.
"""

from __future__ import annotations

import os
import socket
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(ranks: int, module_args: list[str], *, master_port: int | None = None) -> list[str]:
    """One node, ``ranks`` processes of ``python -m snaketune.cli <module_args>``."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(ranks),
            "--master_addr", "127.0.0.1", "--master_port", str(master_port or free_port()),
            "-m", "snaketune.cli", *module_args]


def slurm_multinode_command(env: dict[str, str], ranks_per_node: int, module_args: list[str],
                            *, port: int = 29500) -> list[str]:
    """The command each node of a multi-node SLURM job runs (through ``srun``), with torchrun's
    c10d rendezvous on the job's first node. Generated and tested; not yet used by the rules."""
    nodes = int(env["SLURM_NNODES"])
    first = env.get("SNAKETUNE_MASTER_ADDR") or _first_host(env["SLURM_JOB_NODELIST"])
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes),
            "--nproc_per_node", str(ranks_per_node), "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"{first}:{port}", "--rdzv_id", env["SLURM_JOB_ID"],
            "-m", "snaketune.cli", *module_args]


def _first_host(nodelist: str) -> str:
    """First host of a SLURM node list such as ``gpu[03-05,07],cpu01`` (what ``scontrol show hostnames`` prints first)."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist[: nodelist.index("]") + 1]
    if "[" not in head:
        return head
    prefix, ranges = head[: head.index("[")], head[head.index("[") + 1: head.index("]")]
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}"


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


def inside_launcher() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    return int(os.environ.get("RANK", "0"))
