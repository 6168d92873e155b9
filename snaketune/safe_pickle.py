"""Every pickled file snaketune reads is untrusted input, and is read here: nothing in one runs.

Three loaders, one per kind of file:

- :func:`safe_load` (resuming our own training): ``torch.load(weights_only=True)``
  with the three DeepSpeed classes its optimizer state holds
  (:data:`DEEPSPEED_GLOBALS`); anything more is refused with
  :class:`~snaketune.errors.UnsafeCheckpoint`.
- :func:`load_checkpoint` (converting a checkpoint, ours or XTuner's): XTuner's
  checkpoints pickle mmengine objects (``ConfigDict``, the message hub's
  ``HistoryBuffer``), so ``weights_only`` refuses them and a full ``torch.load``
  needs mmengine and would run whatever a file asks for. Here tensors, storages,
  dtypes, ``OrderedDict`` and numpy arrays load as usual; classes of the
  libraries listed in ``PLACEHOLDER_MODULES`` become inert placeholders (never
  imported); everything else is refused.
- :func:`load_weights` (a hub model's ``pytorch_model*.bin``): tensors only
  (``weights_only``), memory-mapped.
"""

from __future__ import annotations

import collections
import importlib
import os
import pickle
import types
from typing import Any

from .errors import CheckpointError, RefusedPickle, UnsafeCheckpoint

PLACEHOLDER_MODULES = ("mmengine.", "deepspeed.")

# What DeepSpeed pickles beside tensors into a ZeRO-2 optimizer state: plain-data classes.
DEEPSPEED_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


def safe_load(path: str | os.PathLike, map_location=None):
    """``torch.load`` of a checkpoint file that refuses anything but tensors, plain data and
    :data:`DEEPSPEED_GLOBALS` (``weights_only``): no file can run code on resume."""
    import torch

    allowed = [getattr(importlib.import_module(module), name) for module, name in DEEPSPEED_GLOBALS]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsafeCheckpoint(
            f"{path}: refused to load: it holds more than tensors and plain data ({first})"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None


def load_weights(path: str | os.PathLike) -> dict[str, Any]:
    """A hub model's ``.bin`` weights file: tensors and plain data only, memory-mapped, on the CPU.
    ``--allow-pickle`` trusts the file to hold weights, not to run code: anything more is refused."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        what = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else type(err).__name__)
        raise RefusedPickle(f"{path}: refused to load: it holds more than tensors and plain data ({what})") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None


class Placeholder(dict):
    """An object of a class we do not import; keeps its pickled state as data."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __reduce__(self):  # never re-pickled as anything executable
        return (dict, (dict(self),))


def _placeholder_class(module: str, name: str) -> type:
    return type(name, (Placeholder,), {"__module__": module, "__placeholder__": True})


def _guarded_getattr(obj: Any, name: str) -> Any:
    """Pickles made by mmengine ask for methods of its classes; hand back a label, nothing callable."""
    if isinstance(obj, type) and getattr(obj, "__placeholder__", False):
        return f"{obj.__module__}.{obj.__qualname__}.{name}"
    raise pickle.UnpicklingError(f"refusing getattr({obj!r}, {name!r}) in a checkpoint")


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r} in a checkpoint")
    return text.encode("latin1")


def _allowed(module: str, name: str) -> Any:
    import numpy
    import torch

    if (module, name) == ("collections", "OrderedDict"):
        return collections.OrderedDict
    if module in ("builtins", "__builtin__") and name == "getattr":
        return _guarded_getattr
    if module in ("builtins", "__builtin__") and name in ("set", "frozenset", "slice", "complex"):
        return getattr(__import__("builtins"), name)
    if (module, name) == ("_codecs", "encode"):  # how protocol-2 pickles carry numpy's raw bytes
        return _latin1_encode
    if module == "torch._utils" and name in (
        "_rebuild_tensor_v2",
        "_rebuild_parameter",
        "_rebuild_parameter_with_state",
    ):
        return getattr(torch._utils, name)
    if module == "torch":
        obj = getattr(torch, name, None)
        if (
            isinstance(obj, torch.dtype)
            or (isinstance(obj, type) and name.endswith("Storage"))
            or name in ("Size", "device")
        ):
            return obj
    if module in ("numpy._core.multiarray", "numpy.core.multiarray") and name in ("_reconstruct", "scalar"):
        return numpy._core.multiarray._reconstruct if name == "_reconstruct" else numpy._core.multiarray.scalar
    if module == "numpy" and name in ("ndarray", "dtype"):
        return getattr(numpy, name)
    if module.startswith("numpy.dtypes") and name.endswith("DType"):
        return getattr(numpy.dtypes, name)
    if module.startswith(PLACEHOLDER_MODULES):
        return _placeholder_class(module, name)
    raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint (not a tensor or plain data)")


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return _allowed(module, name)


# torch.load(pickle_module=...) wants a module with Unpickler and load.
restricted = types.SimpleNamespace(
    Unpickler=RestrictedUnpickler,
    load=lambda f, **kw: RestrictedUnpickler(f, **kw).load(),
    __name__="snaketune.safe_pickle.restricted",
)


def load_checkpoint(path) -> Any:
    """``torch.load`` of an untrusted checkpoint file, on the CPU; a refusal names the file.

    A file in torch's zip format is memory-mapped: only the tensors a caller touches are read
    (the LoRA weights, not the optimizer's moments beside them).
    """
    import zipfile

    import torch

    try:
        return torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=restricted, mmap=zipfile.is_zipfile(path)
        )
    except pickle.UnpicklingError as err:
        raise RefusedPickle(f"{path}: refused to load: {err}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: unreadable as a checkpoint ({first})") from None
