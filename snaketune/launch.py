"""Starting the training ranks: one process, or ``torchrun`` on one node inside the train job.

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
"""

from __future__ import annotations

import ctypes.util
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any, NoReturn

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


def torchrun_command(ranks: int, job: dict[str, Any], *, master_port: int | None = None) -> list[str]:
    """One node, ``ranks`` processes of ``python -m snaketune.rank_main JOB`` (JOB: the train step's
    job, ``asdict`` of it, as JSON)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(ranks),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(master_port or free_port()),
        "-m",
        RANK_MODULE,
        json.dumps(job),
    ]


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
    from .config import ConfigError

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
    env = dict(env or os.environ)
    # The ranks import this very package, installed or not (a conda env installs only its dependencies).
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    if env.get("LD_PRELOAD") != os.environ.get("LD_PRELOAD"):
        log.info("allocator: LD_PRELOAD=%s", env["LD_PRELOAD"])
    log.info("starting %d rank%s: %s", ranks, "s" * (ranks > 1), " ".join(cmd))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, env)


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
