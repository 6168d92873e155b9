"""``merge``: a base model and an adapter -> one model that plain transformers loads, shard by shard.

XTuner's ``convert merge`` and PEFT's ``merge_and_unload`` hold the whole base model in memory, more
than many machines have for a 7B. Here each base weight is read from its shard, gets its LoRA delta
(computed as PEFT's ``merge`` computes it), and goes into the output shard being written, which is
freed once it is on disk. Memory holds one output shard, the tensor being merged and the adapter:
output shards are at most ``max_shard_size`` and at most the size of the base's largest shard.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapter import check_finite, read_adapter_weights
from .config import MergeConfig
from .errors import CheckpointError, ConfigError
from .files import atomic_dir, remove_stale_tmp_dirs

log = logging.getLogger(__name__)

# (index, single file, pickled): the weight layouts transformers writes, safetensors first
WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors", False),
    ("pytorch_model.bin.index.json", "pytorch_model.bin", True),
)
PEFT_PREFIX = "base_model.model."


def looks_local(name: str) -> bool:
    """A name that can only mean a directory here: anything but a hub id ``org/name`` whose ``org`` is
    no local directory. Such a name never goes to a hub."""
    org, _, model = name.partition("/")
    hub_id = name.count("/") == 1 and org and model and not name.startswith((".", "~")) and "\\" not in name
    return not hub_id or Path(org).exists()


def model_directory(name: str | os.PathLike, what: str = "model") -> Path:
    """The local directory of a model: ``name`` itself, or a hub id's snapshot (safetensors, config,
    tokenizer and code files; the hub's own offline settings apply)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if looks_local(str(name)):
        raise ConfigError(f"no such {what} directory: {name}")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.py", "*.txt", "*.jinja", "*.tiktoken"]
    return Path(snapshot_download(str(name), allow_patterns=patterns))


@dataclass
class BaseTensor:
    file: Path
    shape: list[int]
    dtype: Any  # torch.dtype as stored


def base_tensors(base: Path, allow_pickle: bool = False) -> dict[str, BaseTensor]:
    """Every weight of the base model, where it lies, its shape and dtype, from the files' headers."""
    for index, single, pickled in WEIGHT_LAYOUTS:
        if (base / index).is_file():
            files = sorted({base / f for f in json.loads((base / index).read_text())["weight_map"].values()})
        elif (base / single).is_file():
            files = [base / single]
        else:
            continue
        if pickled and not allow_pickle:
            raise ConfigError(
                f"{files[0]}: the base model's weights are pickled (.bin), and a pickle can run code: "
                "save the model as safetensors first, or pass --allow-pickle if you trust the file "
                "(it is then read with torch.load(weights_only=True))"
            )
        return {key: t for f in files for key, t in _headers(f).items()}
    raise ConfigError(f"{base}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin weights")


def _headers(file: Path) -> dict[str, BaseTensor]:
    if file.suffix == ".bin":
        from .safe_pickle import load_weights

        return {k: BaseTensor(file, list(t.shape), t.dtype) for k, t in load_weights(file).items()}
    from safetensors import safe_open
    from safetensors.torch import _TYPES

    with safe_open(file, "pt") as f:
        return {k: BaseTensor(file, f.get_slice(k).get_shape(), _TYPES[f.get_slice(k).get_dtype()]) for k in f.keys()}


def read_tensor(key: str, where: BaseTensor):
    """One weight, read on its own: a safetensors file is mapped only while it is read."""
    if where.file.suffix == ".bin":
        from .safe_pickle import load_weights

        return load_weights(where.file)[key]
    from safetensors import safe_open

    with safe_open(where.file, "pt") as f:
        return f.get_tensor(key)


@dataclass
class Lora:
    """The LoRA pair adapting one base weight, and how PEFT scales it (``LoraLayer.get_delta_weight``)."""

    A: Any
    B: Any
    scaling: float
    fan_in_fan_out: bool  # the base weight is stored (in, out), as GPT-2's Conv1D
    embedding: bool  # lora_embedding_A/B: the delta is (B @ A) transposed

    def delta(self, device: str):
        """``transpose(B @ A, fan_in_fan_out) * scaling`` with A and B in fp32, as PEFT computes it
        (``PeftModel`` loads adapter weights in fp32 whatever the base's dtype)."""
        import torch

        a, b = (t.to(device=device, dtype=torch.float32) for t in (self.A, self.B))
        d = b @ a
        return (d.T if self.fan_in_fan_out or self.embedding else d) * self.scaling

    def shape(self) -> list[int]:
        out, inp = self.B.shape[0], self.A.shape[1]
        return [inp, out] if self.fan_in_fan_out or self.embedding else [out, inp]


def _pattern_value(pattern: dict, module: str, default):
    if not pattern:
        return default
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(list(pattern), module)
    return pattern.get(key, default)


def adapter_changes(adapter: Path, base: dict[str, BaseTensor], base_dir: Path) -> tuple[dict[str, Lora], dict]:
    """The adapter as changes to base weights: LoRA pairs, and whole tensors that replace a base
    weight (``modules_to_save``, trained biases). Refused, naming the tensor, when a change does not
    fit the base; nothing has been written yet."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    unsupported = [
        f"{k}: {config[k]}"
        for k, ok in (("peft_type", "LORA"), ("use_dora", False), ("lora_bias", False))
        if config.get(k, ok) not in (ok, None)
    ]
    if unsupported:
        raise CheckpointError(
            f"{adapter}/adapter_config.json: {', '.join(unsupported)} is not a plain LoRA adapter, "
            "which is what merge merges: merge it with PEFT's merge_and_unload()"
        )
    state = read_adapter_weights(adapter)
    check_finite(state.items(), str(adapter))
    loras: dict[str, dict[str, Any]] = {}
    whole = {}
    for key, tensor in state.items():
        name = key.removeprefix(PEFT_PREFIX)
        for part, module_end in (
            (".lora_A.weight", "A"),
            (".lora_B.weight", "B"),
            (".lora_embedding_A", "eA"),
            (".lora_embedding_B", "eB"),
        ):
            if name.endswith(part):
                loras.setdefault(name.removesuffix(part), {})[module_end] = (key, tensor)
                break
        else:
            whole[name.replace(".base_layer.", ".")] = (key, tensor)  # e.g. an embedding PEFT saved whole
    changes = {}
    for module, pair in sorted(loras.items()):
        changes[f"{module}.weight"] = _lora(adapter, config, module, pair)
    _check_fit(adapter, config, base, base_dir, changes, whole)
    return changes, {name: t for name, (_, t) in whole.items()}


def _lora(adapter: Path, config: dict, module: str, pair: dict) -> Lora:
    embedding = "eA" in pair or "eB" in pair
    (ka, a), (_, b) = (pair.get(k, (None, None)) for k in (("eA", "eB") if embedding else ("A", "B")))
    if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        shapes = [list(t.shape) if t is not None else "missing" for t in (a, b)]
        raise CheckpointError(f"{adapter}: {module}'s LoRA A and B do not pair up ({shapes[0]} and {shapes[1]})")
    r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    if a.shape[0] != r:
        raise CheckpointError(
            f"{adapter}: adapter_config.json says r={r} but {ka} is {list(a.shape)} (rank {a.shape[0]}): "
            "the adapter was written with the wrong LoRA settings; convert the checkpoint again with its r"
        )
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return Lora(a, b, scaling, bool(config.get("fan_in_fan_out")) and not embedding, embedding)


def _check_fit(adapter: Path, config: dict, base: dict, base_dir: Path, changes: dict, whole: dict) -> None:
    named = config.get("base_model_name_or_path")
    made_for = f" (adapter_config.json names {named})" if named else ""
    wanted = {name: (lora.shape(), f"{name.removesuffix('.weight')}'s LoRA update") for name, lora in changes.items()}
    wanted.update({name: (list(t.shape), key) for name, (key, t) in whole.items()})
    for name, (shape, what) in wanted.items():
        if name not in base:
            raise CheckpointError(
                f"{adapter}: {what} changes {name}, which the base model {base_dir} does not have: "
                f"the adapter was made for another model{made_for}"
            )
        if list(base[name].shape) != list(shape):
            raise CheckpointError(
                f"{adapter}: {what} is {list(shape)} but {base_dir}'s {name} is {list(base[name].shape)}: "
                f"the adapter was made for another model{made_for}"
            )
    if named and not _same_model(named, base_dir):
        log.warning("%s was made for %s; merging it into %s, whose shapes fit", adapter, named, base_dir)


def _same_model(named: str, base_dir: Path) -> bool:
    path = Path(named).expanduser()
    if path.exists():
        return path.resolve() == base_dir.resolve()
    return _last_name(named) == _last_name(str(base_dir.resolve()))


def _last_name(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1].lower().replace("-", "_")


def output_dtypes(base: dict[str, BaseTensor], merge: MergeConfig, config) -> dict[str, Any]:
    """Each weight's dtype in the merged model: ``merge.dtype``, or with ``auto`` the config's dtype
    (as transformers loads it), else as stored. Integer buffers keep theirs."""
    import torch

    target = config.dtype if merge.dtype == "auto" else getattr(torch, merge.dtype)
    if isinstance(target, str):
        target = getattr(torch, target)
    return {k: target if target is not None and t.dtype.is_floating_point else t.dtype for k, t in base.items()}


def shard_plan(base: dict[str, BaseTensor], dtypes: dict[str, Any], limit: int):
    """The output shards, split as transformers' ``save_pretrained`` splits (huggingface_hub's
    ``split_torch_state_dict_into_shards``, on shapes alone), and their index."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards

    order = sorted(base, key=lambda k: (str(base[k].file), k))
    meta = {k: torch.empty(base[k].shape, dtype=dtypes[k], device="meta") for k in order}
    split = split_torch_state_dict_into_shards(meta, max_shard_size=limit)
    index = {
        "metadata": {
            "total_parameters": sum(t.numel() for t in meta.values()),
            "total_size": sum(t.numel() * t.element_size() for t in meta.values()),
        },
        "weight_map": dict(sorted(split.tensor_to_filename.items())),
    }
    return split, index


def merged_tensor(key: str, base: BaseTensor, dtype, lora: Lora | None, replacement, device: str):
    """One weight of the merged model: the base's (or the adapter's replacement), plus its LoRA delta."""
    w = (replacement if replacement is not None else read_tensor(key, base)).to(device=device, dtype=dtype)
    if lora is not None:
        w += lora.delta(device)  # in place, in the weight's dtype, as PEFT's merge adds it
    return w.cpu().contiguous()


def return_freed_memory_to_the_system() -> None:
    """Make glibc give each freed tensor's memory back at once. After the first large block is freed,
    glibc serves blocks of up to that size from its heap (its dynamic mmap threshold), and a heap that
    held one shard's tensors does not shrink: the merge would grow by a shard's worth at each shard."""
    import ctypes
    import ctypes.util

    libc = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(libc), "mallopt", None) if libc else None
    if mallopt is not None:
        mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD: fixed at 128 KiB, glibc's initial value


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    return device


def merge(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out: str | os.PathLike,
    template: str,
    merge: MergeConfig,
    *,
    trust_remote_code: bool = False,
    device: str = "cpu",
    allow_pickle: bool = False,
) -> None:
    """``xtuner convert merge``: base + adapter -> one model that plain transformers loads.

    Streams the base shard by shard (module docstring); on the CPU by default, where a 7B fits
    (XTuner's default ``--device cuda`` runs out of memory on large models). Everything is checked
    before anything is written, and the output appears whole or not at all. The tokenizer gets a chat
    template and the generation config the stop tokens of the training template, so chat tools format
    and stop as in training.
    """
    from huggingface_hub.serialization._base import parse_size_to_int
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from .model import check_remote_code

    base_path = model_directory(base_dir)
    adapter = model_directory(adapter_dir, "adapter")
    device = resolve_device(device)
    check_remote_code(base_path, trust_remote_code)
    base = base_tensors(base_path, allow_pickle)
    changes, whole = adapter_changes(adapter, base, base_path)
    config = AutoConfig.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    dtypes = output_dtypes(base, merge, config)
    largest = max(f.stat().st_size for f in {t.file for t in base.values()})
    limit = min(parse_size_to_int(merge.max_shard_size), largest)
    tokenizer, generation = chat_files(base_path, config, template, trust_remote_code)
    if merge.dtype != "auto":
        config.dtype = merge.dtype
    source = f"merging {adapter_dir} into {base_dir}"
    remove_stale_tmp_dirs(out)
    split, index = shard_plan(base, dtypes, limit)
    return_freed_memory_to_the_system()
    with no_space_named(out), atomic_dir(out) as tmp:
        for filename, keys in split.filename_to_tensors.items():  # one output shard in memory at a time
            tensors = {k: merged_tensor(k, base[k], dtypes[k], changes.get(k), whole.get(k), device) for k in keys}
            check_finite(tensors.items(), source)
            save_file(tensors, tmp / filename, metadata={"format": "pt"})
            del tensors
        if split.is_sharded:
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if getattr(config, "auto_map", None):  # the model's own code, as save_pretrained copies it
            for f in base_path.glob("*.py"):
                shutil.copy2(f, tmp / f.name)
    log.info("merged model written to %s (%d LoRA weights merged)", out, len(changes))


def chat_files(base_path: Path, config, template: str, trust_remote_code: bool):
    """The base's tokenizer with the training template as its chat template, and a generation config
    that stops at the template's end-of-turn, so chat tools format and stop as in training."""
    from transformers import GenerationConfig

    from .encoding import resolve_template, stop_token_ids
    from .model import load_tokenizer

    tokenizer = load_tokenizer(base_path, trust_remote_code)
    set_chat_template(tokenizer, template)
    generation = (
        GenerationConfig.from_pretrained(base_path)
        if (base_path / "generation_config.json").is_file()
        else GenerationConfig.from_model_config(config)
    )
    generation.eos_token_id = stop_token_ids(tokenizer, resolve_template(template))
    generation.pad_token_id = tokenizer.pad_token_id
    return tokenizer, generation


@contextlib.contextmanager
def no_space_named(out: str | os.PathLike) -> Iterator[None]:
    """A full disk while writing ``out`` becomes one line naming it (safetensors reports it as
    "os error 28" inside a message of its own); by then atomic_dir has removed what was written."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as err:
        if getattr(err, "errno", None) != errno.ENOSPC and "(os error 28)" not in str(err):
            raise
        raise CheckpointError(
            f"writing {out} failed: no space left on device; nothing of it was kept",
            hint=f"free space under {Path(out).parent} (or write the merged model elsewhere) and run again",
        ) from None


def set_chat_template(tokenizer, template: str) -> None:
    """The training template as the tokenizer's chat template (unless the template is the tokenizer's own)."""
    from .encoding import encode_prompt, resolve_template
    from .templates import TOKENIZER_TEMPLATE

    tmpl = resolve_template(template)
    if tmpl != TOKENIZER_TEMPLATE:
        uses_bos = (
            encode_prompt("x", tokenizer, tmpl)[0]
            != tokenizer.encode(tmpl.format_input("x"), add_special_tokens=False)[0]
        )
        tokenizer.chat_template = tmpl.chat_template(bos=uses_bos)
