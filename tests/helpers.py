"""What the test modules share: the tiny model, one way to run a command, the tiny configs and trainings.

Test modules import from here (and from the model builders chat_model.py,
internlm_layout.py, slurm_cluster.py), never from each other. The pytest
fixtures built on these, such as the one trained checkpoint the whole run
shares, are in conftest.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
XTUNER = FIXTURES / "xtuner-0.2.0"
TINY_BASE = XTUNER / "base"  # 2-layer, 64-wide Llama, random weights, SmolLM2 tokenizer

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


# ---------------------------------------------------------------- running commands


def run(argv, *, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a command as a user would, in a fresh process, its output captured as text. With ``check``, a
    failure raises naming the command, with the end of what it printed."""
    argv = [str(a) for a in argv]
    res = subprocess.run(argv, capture_output=True, text=True, **kw)
    if check and res.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} failed (exit {res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
        )
    return res


def run_cli(*args, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """``snaketune ARGS``, in a fresh interpreter."""
    return run([sys.executable, "-m", "snaketune.cli", *args], check=check, **kw)


def snakemake(workdir: Path, *args, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """``snakemake --cores 2 ARGS`` in a workflow copy."""
    return run([*SNAKEMAKE, "--cores", "2", *args], cwd=workdir, check=check, **kw)


def planned_rules(res: subprocess.CompletedProcess) -> set[str]:
    """Rule names from the job-stats table of a dry run."""
    out = res.stdout + res.stderr
    if "Nothing to be done" in out:
        return set()
    table = out.split("Job stats:")[1].split("total")[0]
    return {line.split()[0] for line in table.splitlines()[3:] if line.strip()}


def missing(what: str) -> None:
    """A test's tool (a cluster, a browser, a library) is not installed: skip here, fail under CI (``CI``
    set, as .ci/run does), where every test must run."""
    if os.environ.get("CI"):
        pytest.fail(f"{what}: CI must run this test (.ci/run installs what it needs)")
    pytest.skip(what)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def assert_same_state(a: dict, b: dict) -> None:
    """Two state dicts (adapters, optimizer states, checkpoints) hold the same keys, at least one, and equal
    tensors under each: a comparison that cannot pass on nothing, nor on a subset."""
    import torch

    assert a, "the first state dict is empty: there is nothing to compare"
    assert a.keys() == b.keys(), (
        f"the keys differ: only in the first {sorted(a.keys() - b.keys())[:3]}, "
        f"only in the second {sorted(b.keys() - a.keys())[:3]}"
    )
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, f"{len(unequal)} of {len(a)} tensors differ, e.g. {unequal[0]}"


# ---------------------------------------------------------------- the workflow


# The tiny experiment through the workflow: identity data generated, the tiny model, 12 optimizer steps.
TINY_CONFIG = {
    "run": ["tiny"],
    "models": {"tiny_llama": {"source": "local", "path": str(TINY_BASE)}},
    "datasets": {
        "sc": {
            "generator": "self_cognition",
            "spec": {
                "name": "Snaky",
                "owner": "青松",
                "answers": {"zh": "我是{owner}的小助手{name}", "en": "I am {name}"},
                "copies": 2,
                "seed": 0,
            },
        }
    },
    "experiments": {
        "tiny": {
            "model": "tiny_llama",
            "dataset": "sc",
            "train": {
                "template": "internlm2_chat",
                "max_length": 64,
                "batch_size": 2,
                "accumulative_counts": 2,
                "max_epochs": 2,
                "lr": 1e-3,
                "save_steps": 4,
                "save_total_limit": 2,
                "evaluation_freq": 6,
                "evaluation_inputs": ["你是谁"],
                "evaluation_max_new_tokens": 4,
                "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
            },
            # a random 64-wide model will not learn to stop in 12 steps: that check is tested elsewhere
            "evaluation": {
                "prompts": ["你是谁", "Who are you?", "你是哪位？"],
                "identity_keywords": ["Snaky"],
                "max_new_tokens": 6,
                "require_stop": False,
            },
        }
    },
}


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


CONDA_STAND_IN = """#!/bin/sh
# Answers the three questions Snakemake asks conda before --containerize: version, channel
# priority and platform. Used only where no conda is installed (conda-forge is out of reach).
case "$*" in
  --version) echo "conda 25.1.1" ;;
  "config --get channel_priority --json") echo '{"get": {"channel_priority": "strict"}}' ;;
  "info --json") echo '{"platform": "linux-64", "conda_prefix": "/opt/conda"}' ;;
  *) echo "stand-in conda: $* is not supported" >&2; exit 1 ;;
esac
"""


def conda_on_path(tmp_path: Path) -> dict[str, str]:
    """The environment for a Snakemake command that asks conda about itself: the real conda where one is
    installed, else the stand-in above."""
    env = dict(os.environ)
    if not shutil.which("conda"):
        bindir = tmp_path / "bin"
        bindir.mkdir(exist_ok=True)
        (bindir / "conda").write_text(CONDA_STAND_IN)
        (bindir / "conda").chmod(0o755)
        env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
    return env


# ---------------------------------------------------------------- training by hand


# The tiny experiment's training: on XTuner's 16 fixture records, 8 iterations (4 optimizer steps) an epoch.
TINY = dict(
    template="internlm2_chat",
    max_length=64,
    batch_size=2,
    accumulative_counts=2,
    max_epochs=3,
    lr=1e-3,
    warmup_ratio=0.1,
    save_steps=4,
    save_total_limit=3,
    evaluation_freq=1000,
    lora={"r": 8, "alpha": 16, "dropout": 0.1},
)

# No dropout: ranks draw different random numbers, so dropout would make them differ for that reason alone.
# warmup_ratio 0.25 gives a whole number of warm-up iterations for 8 and 16 iterations alike.
EXACT = dict(
    lora={"r": 8, "alpha": 16, "dropout": 0.0}, max_epochs=2, save_steps=2, save_total_limit=5, warmup_ratio=0.25
)


def tiny_config(path: Path, *, train: dict | None = None, dataset: dict | None = None) -> str:
    """A config file whose one experiment, ``tiny``, trains the tiny model (default: on XTuner's fixture data)."""
    config = {
        "run": ["tiny"],
        "models": {"tiny": {"source": "local", "path": str(TINY_BASE)}},
        "datasets": {"data": dataset or {"format": "xtuner", "path": str(XTUNER / "data.json")}},
        "experiments": {"tiny": {"model": "tiny", "dataset": "data", "train": train or {"template": "internlm2_chat"}}},
    }
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return str(path)


def train_cmd(work: Path, out: Path, data: Path = XTUNER / "data.json", **over) -> list[str]:
    """``snaketune train`` on the tiny experiment (:data:`TINY`, changed by ``over``), as a user runs it by
    hand; every file in tmp."""
    config = tiny_config(work.parent / f"{work.name}.yaml", train={**TINY, **over})
    return [
        sys.executable,
        "-m",
        "snaketune.cli",
        "train",
        "--config",
        config,
        "tiny",
        "--model",
        str(TINY_BASE),
        "--data",
        str(data),
        "--work-dir",
        str(work),
        "--summary",
        str(out),
        "--metrics",
        str(out.with_suffix(".metrics.jsonl")),
        "--provenance",
        str(out.with_suffix(".prov.json")),
        "--threads",
        "1",
    ]


def train_exact(tmp_path: Path, name: str, ranks: int = 1, data: Path | None = None, **over) -> tuple[Path, dict]:
    """A training of :data:`EXACT` settings (default data: :func:`unequal_data`) on ``ranks`` ranks, two
    threads; its work directory and summary."""
    work, out = tmp_path / name, tmp_path / f"{name}.json"
    data = data or unequal_data(tmp_path / "unequal.json")
    run(train_cmd(work, out, data=data, **{**EXACT, **over}) + ["--ranks", str(ranks), "--threads", "2"])
    return work, json.loads(out.read_text())


def unequal_data(path: Path, n: int = 16) -> Path:
    """Conversations whose answers differ in length (1 to 19 words): a mean of per-batch means then
    differs from the loss over all supervised tokens. (XTuner's fixture data has one answer for all.)"""
    words = "the quick brown fox jumps over a lazy dog while seven small birds sing in the old oak tree".split()
    records = [
        {"conversation": [{"input": f"Question {i}?", "output": " ".join(words[: 1 + (7 * i) % 19])}]} for i in range(n)
    ]
    path.write_text(json.dumps(records))
    return path


def forget_the_end(work: Path) -> None:
    """The state a kill leaves between the final checkpoint and the end of the run: the run never ended."""
    runs = read_jsonl(work / "runs.jsonl")
    del runs[-1]["end"]
    (work / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))


def interrupted_copy(trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of a finished work directory as a kill after its last checkpoint leaves it (resumable); the
    copy and the summary path for its rerun."""
    work = tmp_path / "work"
    shutil.copytree(trained, work, symlinks=True)
    forget_the_end(work)
    return work, tmp_path / "out.json"


def kill_at_checkpoint(cmd: list[str], work: Path, iteration: int = 4, timeout: float = 300) -> None:
    """Start ``cmd`` in a session of its own and SIGKILL it with all its children (torchrun's ranks)
    as soon as ``work/iter_<iteration>.pth`` is complete."""
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
