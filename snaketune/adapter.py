"""A PEFT adapter directory: written from a training checkpoint (``pth_to_hf``), checked, read back.

The adapter is what PEFT's ``save_pretrained`` writes: ``adapter_config.json``
and ``adapter_model.safetensors``, or several shards and an index when the
tensors exceed ``export.max_shard_size``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from .config import ExportConfig, LoraConfig
from .errors import ConfigError, NonFiniteWeights
from .files import atomic_dir, remove_stale_tmp_dirs
from .lora_state import read_lora_state

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_INDEX = "adapter_model.safetensors.index.json"


def lora_kwargs(lora: LoraConfig) -> dict[str, Any]:
    """Config keys (XTuner's names) -> ``peft.LoraConfig`` arguments."""
    return dict(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules)


def all_finite(t, chunk: int = 1 << 22) -> bool:
    """No NaN or infinity in ``t``, checked a slice at a time: ``isfinite`` of a whole embedding
    would allocate several times its size."""
    import torch

    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def check_finite(named_tensors, source: str) -> None:
    """Refuse weights with NaN or infinity, naming the first bad tensors."""
    bad = [name for name, t in named_tensors if t.is_floating_point() and not all_finite(t)]
    if bad:
        raise NonFiniteWeights(
            f"{source}: {len(bad)} tensor(s) hold NaN or infinity, e.g. {', '.join(bad[:3])}; "
            "the training diverged or the file is damaged: retrain with a lower lr"
        )


def check_adapter(state: dict[str, Any], source: str) -> None:
    """Fail loudly on an adapter that cannot have learned anything, or that holds NaN or infinity."""
    check_finite(state.items(), source)
    if not state:
        raise ValueError(f"{source}: no LoRA tensors found; was the checkpoint written by a LoRA training?")
    b = [t for k, t in state.items() if ".lora_B." in k]
    if not b or all(not t.any() for t in b):
        raise ValueError(
            f"{source}: every lora_B tensor is zero, so the adapter changes nothing "
            "(training did not update it: check lr and that the loss had supervised tokens)"
        )


def target_modules(state: dict[str, Any]) -> list[str]:
    return sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in state})


def check_lora_settings(state: dict[str, Any], lora: LoraConfig, source: str) -> None:
    """Refuse a LoRA rank the checkpoint's tensors contradict, and tensors that do not pair up: the
    adapter written would say one thing and hold another. (Target modules are read off the tensors.)"""
    ranks = {}
    for module in sorted({k.split(".lora_")[0] for k in state}):
        a, b = state.get(f"{module}.lora_A.weight"), state.get(f"{module}.lora_B.weight")
        if a is None or b is None or a.shape[0] != b.shape[-1]:
            shapes = [list(t.shape) if t is not None else "missing" for t in (a, b)]
            raise ValueError(f"{source}: {module}'s lora_A and lora_B do not pair up ({shapes[0]} and {shapes[1]})")
        ranks[module] = list(a.shape)
    wrong = next((m for m, shape in ranks.items() if shape[0] != lora.r), None)
    if wrong:
        r = ranks[wrong][0]
        raise ConfigError(
            f"{source}: trained with LoRA r={r} ({wrong}.lora_A.weight is {ranks[wrong]}) but the LoRA "
            f"settings say r={lora.r}: set r: {r} (in --lora, or the experiment's train.lora.r)"
        )


def save_adapter(state: dict[str, Any], out: Path, config: dict[str, Any], export: ExportConfig) -> list[str]:
    """Write ``adapter_config.json`` and safetensors shards of at most ``max_shard_size``.

    One shard is named ``adapter_model.safetensors`` (what PEFT loads); more get
    an index, as ``save_pretrained`` writes for models.
    """
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    dtype = torch.float32 if export.fp32 else torch.float16
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="adapter_model{suffix}.safetensors", max_shard_size=export.max_shard_size
    )
    with atomic_dir(out) as tmp:
        for filename, keys in split.filename_to_tensors.items():
            save_file({k: state[k] for k in keys}, tmp / filename, metadata={"format": "pt"})
        if split.is_sharded:
            (tmp / ADAPTER_INDEX).write_text(
                json.dumps(
                    {
                        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                        "weight_map": split.tensor_to_filename,
                    },
                    indent=1,
                )
            )
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return sorted(split.filename_to_tensors)


def adapter_config(lora: LoraConfig, state: dict[str, Any], base_model: str) -> dict[str, Any]:
    from peft import LoraConfig as PeftLoraConfig

    kw = lora_kwargs(lora)
    kw["target_modules"] = target_modules(state)
    cfg = PeftLoraConfig(
        task_type="CAUSAL_LM", bias="none", base_model_name_or_path=base_model, inference_mode=True, **kw
    )
    return {k: sorted(v) if isinstance(v, set) else v for k, v in cfg.to_dict().items()}


def pth_to_hf(
    ckpt: str | os.PathLike, out: str | os.PathLike, lora: LoraConfig, base_model: str, export: ExportConfig
) -> list[str]:
    """``xtuner convert pth_to_hf``: checkpoint -> adapter directory (checked before it is written)."""
    state = read_lora_state(ckpt)
    check_adapter(state, str(ckpt))
    check_lora_settings(state, lora, str(ckpt))
    remove_stale_tmp_dirs(out)
    files = save_adapter(state, Path(out), adapter_config(lora, state, base_model), export)
    log.info("wrote %d LoRA tensors to %s in %d file(s)", len(state), out, len(files))
    return files


def read_adapter_weights(adapter_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    index = adapter_dir / ADAPTER_INDEX
    if not index.exists():
        return load_file(adapter_dir / ADAPTER_WEIGHTS)
    state = {}
    for filename in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        state.update(load_file(adapter_dir / filename))
    return state
