"""``results/<exp>/provenance.json``: what a fine-tuned model was made from and with."""

from __future__ import annotations

import functools
import hashlib
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from .files import write_json

PACKAGES = (
    "snaketune",
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "deepspeed",
    "datasets",
    "accelerate",
    "safetensors",
    "snakemake",
)


def sha256_file(path: str | Path) -> str:
    path = Path(path).resolve()
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """Content hash, computed once per process for a file of this size and modification time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def model_hash(model_dir: str | Path) -> str:
    """What identifies a model: config.json and the content of every weight file (another import or
    quantisation of the same architecture has the same config but other weights)."""
    model_dir = Path(model_dir).resolve()
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(p for p in model_dir.iterdir() if p.name.endswith(WEIGHT_SUFFIXES) and p.is_file()):
        h.update(f"{f.name}:{sha256_file(f)}".encode())
    return h.hexdigest()


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(directory: str | Path) -> dict[str, Any]:
    """The workflow's commit, whether tracked files changed since (results and logs are untracked, not a
    change), and if so the SHA-256 of those changes (``git diff HEAD``): two runs from one commit with
    different edits are told apart."""

    def git(*args: str) -> bytes | None:
        try:
            res = subprocess.run(["git", "-C", str(directory), *args], capture_output=True)
        except FileNotFoundError:  # no git on this machine: the commit is unknown, not an error
            return None
        return res.stdout if res.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {"commit": None, "dirty": None}
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    record: dict[str, Any] = {"commit": commit.decode().strip(), "dirty": dirty}
    if record["dirty"]:
        diff = git("diff", "HEAD", "--binary", "--no-ext-diff", "--no-textconv")
        record["diff_sha256"] = None if diff is None else hashlib.sha256(diff).hexdigest()
    return record


def write(
    path: str | Path,
    *,
    config: dict,
    data_file: str | Path,
    model_dir: str | Path,
    workflow_dir: str | Path,
    seed: int,
    world_size: int,
    runs: list[dict],
    device: str,
    nodes: int = 1,
    hosts: list[str] | None = None,
) -> dict:
    record = {
        "config": config,
        "data": {"path": str(data_file), "sha256": sha256_file(data_file)},
        "model": {"path": str(model_dir), "resolved": str(Path(model_dir).resolve()), "sha256": model_hash(model_dir)},
        "packages": package_versions(),
        "platform": {"system": platform.platform(), "machine": platform.machine(), "device": device},
        "workflow": git_commit(workflow_dir),
        "seed": seed,
        "world_size": world_size,
        "nodes": nodes,
        "ranks_per_node": world_size // nodes,
        "hosts": hosts or [],  # each rank's host, by rank
        "runs": runs,
        "resumed_from": [r["resumed_from"] for r in runs if r.get("resumed_from") is not None],
    }
    write_json(path, record)
    return record
