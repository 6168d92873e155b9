"""Fixtures the whole test run shares. The helpers they are built on, and the tests' other shared
helpers, are in helpers.py."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from .helpers import TINY_BASE, run, train_cmd, train_exact

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer():
    from snaketune.model import load_tokenizer

    return load_tokenizer(TINY_BASE)


@pytest.fixture(scope="session")
def tiny_base() -> Path:
    return TINY_BASE


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """The work directory of one finished tiny training (helpers.TINY, one epoch: checkpoints iter_4.pth
    and iter_8.pth), made once for the whole run. Tests only read it; one that changes, resumes or
    retrains it works on a copy (helpers.interrupted_copy). Its summary: :func:`trained_summary`."""
    tmp = tmp_path_factory.mktemp("trained")
    run(train_cmd(tmp / "work", tmp / "training.json", max_epochs=1))
    return tmp / "work"


@pytest.fixture(scope="session")
def trained_summary(trained) -> dict:
    """The summary ``snaketune train`` wrote for :func:`trained` (its ``checkpoint``: iter_8.pth)."""
    return json.loads((trained.parent / "training.json").read_text())


@pytest.fixture(scope="session")
def reference_training(tmp_path_factory) -> SimpleNamespace:
    """One uninterrupted tiny training of helpers.TINY as it is (three epochs, 24 iterations), logged,
    started without LD_PRELOAD so that ``train.allocator: auto`` decides the malloc: ``work`` (its work
    directory), ``summary`` and ``log`` (the log's text). Read only."""
    tmp = tmp_path_factory.mktemp("reference")
    work, out, log = tmp / "work", tmp / "training.json", tmp / "train.log"
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    run(train_cmd(work, out) + ["--log", str(log)], env=env)
    return SimpleNamespace(work=work, summary=json.loads(out.read_text()), log=log.read_text())


@pytest.fixture(scope="session")
def exact_training(tmp_path_factory) -> tuple[Path, dict]:
    """helpers.train_exact on one rank, batches of 2 accumulated twice: its work directory and summary.
    Read only."""
    return train_exact(tmp_path_factory.mktemp("exact"), "one", ranks=1, batch_size=2, accumulative_counts=2)
