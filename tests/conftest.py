import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
XTUNER = FIXTURES / "xtuner-0.2.0"
TINY_BASE = XTUNER / "base"  # 2-layer, 64-wide Llama, random weights, SmolLM2 tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer():
    from snaketune.model import load_tokenizer

    return load_tokenizer(TINY_BASE)


@pytest.fixture(scope="session")
def tiny_base() -> Path:
    return TINY_BASE


def run_cli(*args, check=True, **kw) -> subprocess.CompletedProcess:
    """Run ``snaketune`` as a user would, in a fresh interpreter."""
    res = subprocess.run([sys.executable, "-m", "snaketune.cli", *map(str, args)], capture_output=True, text=True, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"snaketune {' '.join(map(str, args))} failed:\n{res.stderr[-4000:]}")
    return res


def tiny_config(path: Path, *, train: dict | None = None, dataset: dict | None = None) -> str:
    """A config file whose one experiment, ``tiny``, trains the tiny model (default: on XTuner's fixture data)."""
    config = {"run": ["tiny"], "models": {"tiny": {"source": "local", "path": str(TINY_BASE)}},
              "datasets": {"data": dataset or {"format": "xtuner", "path": str(XTUNER / "data.json")}},
              "experiments": {"tiny": {"model": "tiny", "dataset": "data",
                                       "train": train or {"template": "internlm2_chat"}}}}
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return str(path)


def unequal_data(path: Path, n: int = 16) -> Path:
    """Conversations whose answers differ in length (1 to 19 words): a mean of per-batch means then
    differs from the loss over all supervised tokens. (XTuner's fixture data has one answer for all.)"""
    words = "the quick brown fox jumps over a lazy dog while seven small birds sing in the old oak tree".split()
    records = [{"conversation": [{"input": f"Question {i}?", "output": " ".join(words[: 1 + (7 * i) % 19])}]}
               for i in range(n)]
    path.write_text(json.dumps(records))
    return path


def copy_workflow(dest: Path) -> Path:
    """A user's checkout of the workflow: Snakefile, rules, scripts, config, envs, profiles, report captions."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "rules", "scripts", "config", "envs", "profiles", "report"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name)
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def kill_at_checkpoint(cmd: list[str], work: Path, iteration: int = 4, timeout: float = 300) -> None:
    """Start ``cmd`` in a session of its own and SIGKILL it with all its children (torchrun's ranks)
    as soon as ``work/iter_<iteration>.pth`` is complete."""
    import signal
    import time

    from snaketune.checkpoints import COMPLETE

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while not (work / f"iter_{iteration}.pth" / COMPLETE).exists():
            assert proc.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
