"""Starting the training ranks: one process, or ``torchrun`` on one node inside the train job.

Data parallel runs inside one Snakemake job: the job asks for N GPUs (or, on a
CPU, N ranks) and starts its own ranks, so Snakemake and SLURM see one task.
The job's process *becomes* torchrun (``exec``), so killing the job kills the
launcher, and every rank dies with it (:func:`die_with_parent`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any, NoReturn

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def inside_launcher() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def ensure_dist_env() -> None:
    """A lone process gets the rendezvous variables DeepSpeed would otherwise look for through MPI."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))


def torchrun_command(ranks: int, call: dict[str, Any], *, master_port: int | None = None) -> list[str]:
    """One node, ``ranks`` processes of ``python -m snaketune.launch CALL`` (CALL: the train step's
    arguments as JSON)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(ranks),
            "--master_addr", "127.0.0.1", "--master_port", str(master_port or free_port()),
            "-m", "snaketune.launch", json.dumps(call)]


def relaunch(ranks: int, call: dict[str, Any]) -> NoReturn:
    """Become torchrun, running the train step once per rank (same arguments)."""
    cmd = torchrun_command(ranks, call)
    # The ranks import this very package, installed or not (a conda env installs only its dependencies).
    root = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    log.info("starting %d ranks: %s", ranks, " ".join(cmd))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)


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


def main(argv: list[str]) -> None:
    """What each rank runs under torchrun."""
    from . import steps
    from .joblog import job

    call = json.loads(argv[0])
    die_with_parent()
    with job(call.pop("log_file", None)):
        steps.train(**call)


if __name__ == "__main__":
    main(sys.argv[1:])
