"""``results/<exp>/provenance.json``: what a fine-tuned model was made from and with."""

from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from .files import write_json

PACKAGES = ("snaketune", "torch", "transformers", "peft", "bitsandbytes", "deepspeed", "datasets", "accelerate",
            "safetensors", "snakemake")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def model_hash(model_dir: str | Path) -> str:
    """config.json plus the weights index (the index file, or each weight file's name and size)."""
    model_dir = Path(model_dir).resolve()
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    indexes = sorted(model_dir.glob("*.index.json"))
    if indexes:
        for index in indexes:
            h.update(index.read_bytes())
    else:
        for f in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
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
    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True)
        except FileNotFoundError:  # no git on this machine: the commit is unknown, not an error
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    return {"commit": commit, "dirty": bool(git("status", "--porcelain")) if commit else None}


def write(path: str | Path, *, config: dict, data_file: str | Path, model_dir: str | Path, workflow_dir: str | Path,
          seed: int, world_size: int, runs: list[dict], device: str) -> dict:
    record = {
        "config": config,
        "data": {"path": str(data_file), "sha256": sha256_file(data_file)},
        "model": {"path": str(model_dir), "resolved": str(Path(model_dir).resolve()), "sha256": model_hash(model_dir)},
        "packages": package_versions(),
        "platform": {"system": platform.platform(), "machine": platform.machine(), "device": device},
        "workflow": git_commit(workflow_dir),
        "seed": seed,
        "world_size": world_size,
        "runs": runs,
        "resumed_from": [r["resumed_from"] for r in runs if r.get("resumed_from") is not None],
    }
    write_json(path, record)
    return record
