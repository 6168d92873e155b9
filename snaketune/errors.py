"""Every error snaketune raises on purpose, at the bottom of the package: any module may import it.

Each derives from :class:`SnaketuneError`, whose message says what is wrong
(the file, the record, the key) and whose ``hint`` says what to do about it.
A step's job log (:mod:`snaketune.joblog`), which the CLI runs every command
in, turns one into a single line plus the hint, without a traceback. Each
also derives from the built-in error it refines (``ValueError`` for bad
input, ``RuntimeError`` for a run that cannot go on), so callers catching
those keep working.

This module imports nothing from snaketune.
"""

from __future__ import annotations

import os
import pickle


class SnaketuneError(Exception):
    """An error whose message (and ``hint``) says all a user needs: no traceback is shown for it."""

    hint: str | None = None

    def __init__(self, *args, hint: str | None = None):
        super().__init__(*args)
        if hint is not None:
            self.hint = hint

    def one_line(self) -> str:
        """The message on one line, then the hint unless the message already gives it."""
        head, *items = [line.strip() for line in str(self).splitlines() if line.strip()] or [""]
        # a list of problems ("config errors:" then one per line) becomes "head a; b"
        text = " ".join([head, "; ".join(item.removeprefix("- ") for item in items)]) if items else head
        if self.hint and self.hint not in text:
            text += f" Hint: {self.hint}"
        return text


class ConfigError(SnaketuneError, ValueError):
    """A config problem, naming the key path (``experiments.identity.train.lr``) and the fix."""


class DeviceError(ConfigError):
    """A job's ranks or GPUs that do not match what it was given or what it can see."""


class DataError(SnaketuneError, ValueError):
    """A malformed record: says which file, which record, which field, and the fix."""

    def __init__(self, path: str | os.PathLike, index: int | None, field: str | None, problem: str, fix: str):
        where = str(path)
        if index is not None:
            where += f", record {index}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {problem}. Fix: {fix}", hint=fix)
        self.path, self.index, self.field = str(path), index, field


class CheckpointError(SnaketuneError, RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what is wrong with it."""


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint file that asks to run code (or import anything but tensors and plain data)."""


class RefusedPickle(UnsafeCheckpoint, pickle.UnpicklingError):
    """A checkpoint the restricted unpickler refused, named; still an ``UnpicklingError`` to callers."""


class NonFiniteWeights(SnaketuneError, ValueError):
    """A model or adapter holding NaN or infinity: a diverged training, or a damaged file."""


class TrainingDiverged(SnaketuneError, RuntimeError):
    """The loss, the gradient norm or a trainable weight stopped being a finite number."""


class LaunchError(SnaketuneError, RuntimeError):
    """A training across nodes that could not start where it runs, or whose ranks on some node stopped."""


class CheckFailed(SnaketuneError, RuntimeError):
    """An evaluation threshold the config sets was not met."""


class OfflineError(SnaketuneError, RuntimeError):
    """A model hub that cannot be reached, or a download the offline settings forbid."""


class ConversationTooLong(SnaketuneError, ValueError):
    """The conversation fills the model's context: /reset it."""
