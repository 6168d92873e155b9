"""The LoRA tensors of a training checkpoint: ours, or XTuner's plain ``.pth`` or DeepSpeed directory.

Only the LoRA tensors are read; the base model is never loaded (XTuner's
``pth_to_hf`` loads it, in 4-bit, twice). Checkpoint files are untrusted
input, read through :mod:`snaketune.safe_pickle`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .checkpoints import COMPLETE, verify
from .safe_pickle import Placeholder, load_checkpoint

_LORA_KEY = re.compile(r"^(?:llm\.)?(base_model\.model\..*\.lora_[AB])(?:\.default)?\.weight$")


def checkpoint_model_file(ckpt: Path) -> Path:
    """The file holding the weights: a DeepSpeed directory's model states, or a plain ``.pth`` file."""
    ckpt = Path(ckpt)
    if ckpt.is_dir():
        f = ckpt / "mp_rank_00_model_states.pt"
        if not f.is_file():
            raise FileNotFoundError(
                f"{ckpt} is a directory without mp_rank_00_model_states.pt: not a DeepSpeed checkpoint"
            )
        return f
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
    return ckpt


def _value(x: Any) -> Any:
    return x.args[0] if isinstance(x, Placeholder) and x.args else x


def read_zero_fp32_state(ckpt: Path) -> dict[str, Any]:
    """The fp32 master weights of a ZeRO-1/2 checkpoint directory, gathered from every rank's partition.

    This is the authoritative copy (under bf16 training the module holds only
    bf16 weights), and what DeepSpeed's zero_to_fp32 and XTuner's pth_to_hf read.
    """
    import torch

    files = sorted(
        ckpt.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"),
        key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", f.name).group(1)),
    )
    if not files:
        raise FileNotFoundError(f"{ckpt}: no zero_pp_rank_*_mp_rank_00_optim_states.pt files")
    parts = [load_checkpoint(f)["optimizer_state_dict"] for f in files]
    # enums of DeepSpeed's (ZeroStageEnum) load as placeholders holding their value
    stage, world = (_value(parts[0].get(k)) for k in ("zero_stage", "partition_count"))
    if stage not in (1, 2):
        raise ValueError(f"{ckpt}: ZeRO stage {stage} checkpoints are not supported (stages 1 and 2 are)")
    counts = world if isinstance(world, int) else world[0]
    if counts != len(files):
        raise ValueError(f"{ckpt}: written by {counts} ranks but {len(files)} optimizer partitions are present")
    shapes = load_checkpoint(checkpoint_model_file(ckpt))["param_shapes"]
    state = {}
    for i, group_shapes in enumerate(shapes):
        flat = torch.cat([p["single_partition_of_fp32_groups"][i] for p in parts])
        offset = 0
        for name, shape in group_shapes.items():
            n = shape.numel()
            state[name] = flat.narrow(0, offset, n).view(shape).clone()
            offset += n
        if offset > flat.numel():
            raise ValueError(f"{ckpt}: parameter group {i} is shorter than its parameter shapes")
    return state


def read_lora_state(ckpt: str | os.PathLike) -> dict[str, Any]:
    """LoRA tensors of a checkpoint (ours, or XTuner's plain or DeepSpeed one), under PEFT's key names.

    The file is untrusted input: it is read with an unpickler that loads tensors
    and plain data only (see safe_pickle), without mmengine installed.
    """
    ckpt = Path(ckpt)
    if (ckpt / COMPLETE).is_file():  # written by snaketune: its files must be as they were written
        verify(ckpt)
    f = checkpoint_model_file(ckpt)
    if ckpt.is_dir():
        state = read_zero_fp32_state(ckpt)
    else:
        blob = load_checkpoint(f)
        state = blob.get("state_dict") if isinstance(blob, dict) else None
        if not isinstance(state, dict):
            raise ValueError(f"{f}: no 'state_dict' entry with weights: not an XTuner .pth checkpoint")
    lora = {}
    for key, tensor in state.items():
        m = _LORA_KEY.match(key)
        if m:
            lora[f"{m.group(1)}.weight"] = tensor
    return lora
