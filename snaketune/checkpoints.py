"""Training checkpoints: finding, fingerprinting, marking complete, saving, pruning, resuming.

A checkpoint is ``work_dir/iter_N.pth``, a DeepSpeed directory in XTuner's
layout, plus one ``rng_state_R.pt`` per rank and a completion marker
(:data:`COMPLETE`) written by rank 0 after every rank finished writing. Only
marked checkpoints are ever resumed; a torn one (killed mid-write) is ignored.
The marker records the run's fingerprint (settings, data, model, ranks), so a
checkpoint of another run definition is set aside, never resumed.

``runs.jsonl`` is the progress record: one line per start of the training
(when, from which iteration, on how many ranks, and when it ended).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from .config import TrainConfig
from .files import append_jsonl, read_jsonl, write_json, write_jsonl, write_text

log = logging.getLogger(__name__)

CKPT_RE = re.compile(r"^iter_(\d+)\.pth$")
COMPLETE = "snaketune_complete.json"
RUNS = "runs.jsonl"

# Settings that change what is logged or kept, not the weights: a checkpoint
# made under other values of these still resumes.
NOT_IN_FINGERPRINT = {"save_steps", "save_total_limit", "evaluation_freq", "evaluation_inputs",
                      "evaluation_max_new_tokens", "SYSTEM"}


def fingerprint(train: TrainConfig, data_file: Path, model_dir: Path, world: int) -> str:
    """What a checkpoint must have been made with to be resumed: settings, data, model, ranks."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in asdict(train).items() if k not in NOT_IN_FINGERPRINT},
                        sort_keys=True).encode())
    h.update(Path(data_file).read_bytes())
    h.update((Path(model_dir) / "config.json").read_bytes())
    h.update(str(world).encode())
    return h.hexdigest()[:16]


def complete_checkpoints(work_dir: Path) -> list[tuple[int, Path]]:
    """Checkpoints whose writing finished (marker present), oldest first."""
    found = []
    if work_dir.is_dir():
        for p in work_dir.iterdir():
            m = CKPT_RE.match(p.name)
            if m and (p / COMPLETE).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def torn_checkpoints(work_dir: Path) -> list[Path]:
    if not work_dir.is_dir():
        return []
    return sorted(p for p in work_dir.iterdir() if CKPT_RE.match(p.name) and not (p / COMPLETE).is_file())


def marker(ckpt: Path) -> dict:
    return json.loads((ckpt / COMPLETE).read_text())


def set_aside(work_dir: Path, current: str) -> Path | None:
    """Move checkpoints of another run definition out of the way (never delete them)."""
    stale = [p for _, p in complete_checkpoints(work_dir) if marker(p).get("fingerprint") != current]
    if not stale:
        return None
    dest = work_dir / "superseded" / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True)
    for p in stale:
        os.replace(p, dest / p.name)
    return dest


def tidy(work_dir: Path, current: str) -> None:
    """Rank 0, before resuming: report torn checkpoints and set aside those of other runs."""
    for torn in torn_checkpoints(work_dir):
        log.warning("ignoring %s: it was not completely written (no %s)", torn, COMPLETE)
    moved = set_aside(work_dir, current)
    if moved:
        log.warning("checkpoints made with other settings, data, model or rank count moved to %s; "
                    "training starts from iteration 0", moved)


# ---------------------------------------------------------------- random state


def rng_state() -> dict:
    import torch

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device: dropout masks on the GPU
    return state


def set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------- save and load


def save(engine, work_dir: Path, iteration: int, *, fingerprint: str, keep: int) -> None:
    """Every rank writes its part; then rank 0 marks the checkpoint complete and prunes old ones."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    tag = f"iter_{iteration}.pth"
    engine.save_checkpoint(str(work_dir), tag=tag, client_state={"iteration": iteration, "world_size": world},
                           exclude_frozen_parameters=True)
    torch.save(rng_state(), work_dir / tag / f"rng_state_{rank}.pt")
    dist.barrier()
    if rank == 0:
        write_json(work_dir / tag / COMPLETE, {"iteration": iteration, "world_size": world,
                                               "fingerprint": fingerprint}, indent=None)
        write_text(work_dir / "last_checkpoint", str((work_dir / tag).resolve()))
        done = complete_checkpoints(work_dir)
        for _, old in done[:-keep]:
            shutil.rmtree(old)
        log.info("saved %s", work_dir / tag)
    dist.barrier()


def load(engine, ckpt: Path) -> int:
    """Weights, optimizer, LR schedule and this rank's random state; returns the iteration."""
    import torch
    import torch.distributed as dist

    engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_module_strict=False)
    rng_file = ckpt / f"rng_state_{dist.get_rank()}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return int(CKPT_RE.match(ckpt.name).group(1))


# ---------------------------------------------------------------- progress record


def start_run(work_dir: Path, resumed_from: int | None, world: int) -> None:
    """Rank 0: a fresh start forgets earlier runs; a resume adds a line."""
    if resumed_from is None:
        (work_dir / RUNS).unlink(missing_ok=True)
    append_jsonl(work_dir / RUNS, {"start": now(), "resumed_from": resumed_from, "world_size": world})


def end_run(work_dir: Path) -> list[dict]:
    """Rank 0: stamp the current run's end; return every run of this training."""
    runs = read_jsonl(work_dir / RUNS)
    runs[-1]["end"] = now()
    write_jsonl(work_dir / RUNS, runs)
    return runs


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
