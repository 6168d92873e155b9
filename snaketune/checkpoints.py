"""Training checkpoints: finding, fingerprinting, marking complete, saving, pruning, resuming.

A checkpoint is ``work_dir/iter_N.pth``, a DeepSpeed directory in XTuner's
layout, plus one ``rng_state_R.pt`` per rank and a completion marker
(:data:`COMPLETE`) written by rank 0 after every rank finished writing. Only
marked checkpoints are ever resumed; a torn one (killed mid-write) is ignored.
The marker records the run's fingerprint (settings, data, model, ranks), so a
checkpoint of another run definition is set aside, never resumed, and the
SHA-256 of every file, verified before a checkpoint is resumed or converted:
a checkpoint that changed since it was written is moved aside and the one
before it is used. Checkpoint files are untrusted input: they are read by
:mod:`snaketune.safe_pickle`, so nothing in them can run code; symbolic links are
refused (a rerun would otherwise resume, and prune, outside the work directory).

``runs.jsonl`` is the progress record: one line per start of the training
(when, from which iteration, on how many ranks, and when it ended: stamped
once its results are written).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

from .config import TrainConfig
from .errors import CheckpointError, UnsafeCheckpoint
from .files import append_jsonl, read_jsonl, write_json, write_jsonl, write_text
from .safe_pickle import safe_load

log = logging.getLogger(__name__)

CKPT_RE = re.compile(r"^iter_(\d+)\.pth$")
COMPLETE = "snaketune_complete.json"
RUNS = "runs.jsonl"

# Settings that change what is logged or kept, not the weights: a checkpoint
# made under other values of these still resumes.
NOT_IN_FINGERPRINT = {
    "save_steps",
    "save_total_limit",
    "evaluation_freq",
    "evaluation_inputs",
    "evaluation_max_new_tokens",
    "SYSTEM",
}


def fingerprint(train: TrainConfig, data_file: Path, model_dir: Path, world: int) -> str:
    """What a checkpoint must have been made with to be resumed: settings, data, model weights, ranks."""
    return fingerprints(train, data_file, model_dir)(world)


def fingerprints(train: TrainConfig, data_file: Path, model_dir: Path) -> Callable[[int], str]:
    """:func:`fingerprint` for any world size, the files hashed once."""
    from .provenance import model_hash, sha256_file

    h = hashlib.sha256()
    h.update(
        json.dumps({k: v for k, v in asdict(train).items() if k not in NOT_IN_FINGERPRINT}, sort_keys=True).encode()
    )
    h.update(sha256_file(data_file).encode())
    h.update(model_hash(model_dir).encode())

    def at(world: int) -> str:
        g = h.copy()
        g.update(str(world).encode())
        return g.hexdigest()[:16]

    return at


def check_world(work_dir: Path, world: int, fingerprint_at: Callable[[int], str]) -> None:
    """Refuse, before training, to resume on another world size: a checkpoint of this very run definition
    made by another number of ranks holds ZeRO-2's optimizer state split by those ranks. A finished
    training (retrained on request) is exempt: its checkpoints are set aside as superseded."""
    runs = read_jsonl(work_dir / RUNS)
    if runs and "end" in runs[-1]:
        return
    for _, ckpt in reversed(complete_checkpoints(work_dir)):
        try:
            record = marker(ckpt)
        except CheckpointError:
            continue  # tidy's verification sets it aside
        other = record.get("world_size")
        if isinstance(other, int) and other != world and record.get("fingerprint") == fingerprint_at(other):
            raise CheckpointError(
                f"{ckpt} was written by a training of world size {other} ({other} rank{'s' * (other > 1)}); "
                f"this one has world size {world}: ZeRO-2 splits the optimizer state by rank, so it cannot resume "
                "on another number of ranks",
                hint=f"train on {other} ranks again (nodes x ranks per node), or move {work_dir} away to start over",
            )


def _checkpoint_dirs(work_dir: Path) -> list[tuple[int, Path]]:
    found = []
    if work_dir.is_dir():
        for p in work_dir.iterdir():
            m = CKPT_RE.match(p.name)
            if m:
                if p.is_symlink():
                    raise CheckpointError(
                        f"{p} is a symbolic link (to {os.readlink(p)}); snaketune never resumes from or deletes "
                        "through a link. Move it out of the work directory, or copy the checkpoint in its place."
                    )
                found.append((int(m.group(1)), p))
    return sorted(found)


def complete_checkpoints(work_dir: Path) -> list[tuple[int, Path]]:
    """Checkpoints whose writing finished (marker present), oldest first."""
    return [(n, p) for n, p in _checkpoint_dirs(work_dir) if (p / COMPLETE).is_file()]


def torn_checkpoints(work_dir: Path) -> list[Path]:
    return [p for _, p in _checkpoint_dirs(work_dir) if not (p / COMPLETE).is_file()]


def marker(ckpt: Path) -> dict:
    """The completion marker's record; a damaged marker is a damaged checkpoint (CheckpointError)."""
    path = ckpt / COMPLETE
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}): the completion marker is damaged") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{path} holds {type(record).__name__}, not the completion marker's record")
    return record


def move_aside(paths: list[Path], work_dir: Path, why: str) -> Path | None:
    """Move checkpoints to ``work_dir/<why>/<time>/`` (never delete them)."""
    if not paths:
        return None
    dest = work_dir / why / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    for p in paths:
        os.replace(p, dest / p.name)
    return dest


def set_aside(work_dir: Path, current: str) -> Path | None:
    """Move checkpoints of another run definition out of the way. One whose marker is damaged is left for
    :func:`tidy`'s verification, which moves it to ``corrupt/``: its run definition is unknown."""
    stale = []
    for _, p in complete_checkpoints(work_dir):
        try:
            if marker(p).get("fingerprint") != current:
                stale.append(p)
        except CheckpointError:
            continue
    return move_aside(stale, work_dir, "superseded")


def finished(work_dir: Path, total_iters: int) -> bool:
    """The newest checkpoint is the final one and the run that made it ended (its results were written):
    training was complete."""
    done, runs = complete_checkpoints(work_dir), read_jsonl(work_dir / RUNS)
    return bool(done) and done[-1][0] == total_iters and bool(runs) and "end" in runs[-1]


def tidy(work_dir: Path, current: str, total_iters: int) -> None:
    """Rank 0, before resuming: leave only checkpoints this run may resume from.

    Torn checkpoints are ignored; those of other run definitions are set aside;
    a training that had finished starts over (a rerun of a finished training is
    a request to retrain, e.g. ``--forcerun train``); a checkpoint whose files
    changed since they were written is moved aside, and the one before is used.
    """
    for torn in torn_checkpoints(work_dir):
        log.warning("ignoring %s: it was not completely written (no %s)", torn, COMPLETE)
    moved = set_aside(work_dir, current)
    if moved:
        log.warning(
            "checkpoints made with other settings, data, model or rank count moved to %s; "
            "training starts from iteration 0",
            moved,
        )
    if finished(work_dir, total_iters):
        moved = move_aside([p for _, p in complete_checkpoints(work_dir)], work_dir, "superseded")
        log.warning(
            "the training in %s had finished; training again from iteration 0 (its checkpoints moved to %s)",
            work_dir,
            moved,
        )
    for _, ckpt in reversed(complete_checkpoints(work_dir)):
        try:
            verify(ckpt)
            return
        except UnsafeCheckpoint:
            raise
        except CheckpointError as err:
            moved = move_aside([ckpt], work_dir, "corrupt")
            log.warning("not resuming from %s: %s; moved to %s, trying the checkpoint before it", ckpt, err, moved)


# ---------------------------------------------------------------- integrity


def _files(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.rglob("*") if (p.is_file() or p.is_symlink()) and p.name != COMPLETE)


def checksums(ckpt: Path) -> dict[str, str]:
    from .provenance import sha256_file

    return {str(p.relative_to(ckpt)): sha256_file(p) for p in _files(ckpt)}


def verify(ckpt: Path) -> None:
    """Every file the completion marker lists is there, a regular file, and unchanged."""
    from .provenance import sha256_file

    if ckpt.is_symlink():
        raise CheckpointError(f"{ckpt} is a symbolic link; refusing it")
    listed = marker(ckpt).get("files")
    if not listed:
        raise CheckpointError(f"{ckpt / COMPLETE} lists no file checksums (written by an older snaketune?)")
    for name, digest in listed.items():
        path = ckpt / name
        if path.is_symlink():
            raise CheckpointError(f"{path} is a symbolic link; refusing it")
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        if sha256_file(path) != digest:
            raise CheckpointError(f"{path} changed since it was written (checksum mismatch: truncated or corrupt)")


def all_finite(tensors) -> bool:
    """No NaN or infinity in any of the tensors (weights, gradients, a loss)."""
    import torch

    return all(bool(torch.isfinite(t).all()) for t in tensors)


def is_finite_number(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


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
    with _writing(work_dir / tag):
        engine.save_checkpoint(
            str(work_dir),
            tag=tag,
            client_state={"iteration": iteration, "world_size": world},
            exclude_frozen_parameters=True,
        )
        torch.save(rng_state(), work_dir / tag / f"rng_state_{rank}.pt")
    dist.barrier()
    if rank == 0:
        with _writing(work_dir / tag):  # the marker goes last: a checkpoint whose writing failed has none
            write_json(
                work_dir / tag / COMPLETE,
                {
                    "iteration": iteration,
                    "world_size": world,
                    "fingerprint": fingerprint,
                    "files": checksums(work_dir / tag),
                },
            )
            write_text(work_dir / "last_checkpoint", str((work_dir / tag).resolve()))
        done = complete_checkpoints(work_dir)
        for _, old in done[:-keep]:
            shutil.rmtree(old)
        log.info("saved %s", work_dir / tag)
    dist.barrier()


@contextlib.contextmanager
def _writing(ckpt: Path) -> Iterator[None]:
    """A failed write of ``ckpt`` becomes one line naming it and the reason. A full disk surfaces as
    OSError, or from torch's C++ writer as a RuntimeError that says only "basic_ios::clear"."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if getattr(err, "errno", None) == errno.ENOSPC or _no_space_left(ckpt.parent):
            reason = "no space left on device"
        elif isinstance(err, OSError) and err.strerror:
            reason = err.strerror
        else:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[-1]
        raise CheckpointError(
            f"writing checkpoint {ckpt} failed: {reason}; it is incomplete (no {COMPLETE}) and is never resumed",
            hint=f"free space under {ckpt.parent} (or point --work-dir elsewhere) and run again: training "
            "resumes from the last complete checkpoint",
        ) from None


def _no_space_left(directory: Path) -> bool:
    try:
        return shutil.disk_usage(directory).free < 1 << 20
    except OSError:
        return False


def load(engine, ckpt: Path) -> int:
    """Weights, optimizer, LR schedule and this rank's random state; returns the iteration."""
    import torch.distributed as dist

    engine.checkpoint_engine.load = safe_load  # DeepSpeed's own loader unpickles anything
    path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_module_strict=False)
    if path is None:
        raise CheckpointError(f"{ckpt}: DeepSpeed found no checkpoint to load there")
    rng_file = ckpt / f"rng_state_{dist.get_rank()}.pt"
    if rng_file.exists():
        set_rng_state(safe_load(rng_file))
    return int(CKPT_RE.match(ckpt.name).group(1))


# ---------------------------------------------------------------- progress record


def start_run(work_dir: Path, resumed_from: int | None, world: int) -> None:
    """Rank 0: a fresh start forgets earlier runs; a resume adds a line."""
    if resumed_from is None:
        (work_dir / RUNS).unlink(missing_ok=True)
    append_jsonl(work_dir / RUNS, {"start": now(), "resumed_from": resumed_from, "world_size": world})


def end_run(work_dir: Path) -> list[dict]:
    """Rank 0: every run of this training, the current one with its end time, for the results.
    The end goes into ``runs.jsonl`` only once they are written (:func:`record_end`)."""
    runs = read_jsonl(work_dir / RUNS)
    runs[-1]["end"] = now()
    return runs


def record_end(work_dir: Path, runs: list[dict]) -> None:
    """Rank 0, after the results are written: the run ended. Stamped any earlier, a run stopped between
    its last checkpoint and its results (Ctrl-C, a full disk) would look finished, and its rerun would
    train again from iteration 0 instead of resuming from the final checkpoint."""
    write_jsonl(work_dir / RUNS, runs)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
