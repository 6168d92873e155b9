"""``pth_to_hf`` and ``merge``: a training checkpoint -> PEFT adapter -> merged model.

Conversion reads only the LoRA tensors from the checkpoint; it never loads the
base model (XTuner's ``pth_to_hf`` loads it, in 4-bit, twice).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from .config import ExportConfig, LoraConfig, MergeConfig
from .files import atomic_dir

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_INDEX = "adapter_model.safetensors.index.json"
_LORA_KEY = re.compile(r"^(?:llm\.)?(base_model\.model\..*\.lora_[AB])(?:\.default)?\.weight$")


def checkpoint_model_file(ckpt: Path) -> Path:
    """The file holding the weights: a DeepSpeed directory's model states, or a plain ``.pth`` file."""
    ckpt = Path(ckpt)
    if ckpt.is_dir():
        f = ckpt / "mp_rank_00_model_states.pt"
        if not f.is_file():
            raise FileNotFoundError(f"{ckpt} is a directory without mp_rank_00_model_states.pt: not a DeepSpeed checkpoint")
        return f
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
    return ckpt


def _value(x: Any) -> Any:
    from .safe_pickle import Placeholder

    return x.args[0] if isinstance(x, Placeholder) and x.args else x


def read_zero_fp32_state(ckpt: Path) -> dict[str, Any]:
    """The fp32 master weights of a ZeRO-1/2 checkpoint directory, gathered from every rank's partition.

    This is the authoritative copy (under bf16 training the module holds only
    bf16 weights), and what DeepSpeed's zero_to_fp32 and XTuner's pth_to_hf read.
    """
    import torch

    from .safe_pickle import load_checkpoint

    files = sorted(ckpt.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                   key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", f.name).group(1)))
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
    from .safe_pickle import load_checkpoint

    from .checkpoints import COMPLETE, verify

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


class NonFiniteWeights(ValueError):
    """A model or adapter holding NaN or infinity: a diverged training, or a damaged file."""


def check_finite(named_tensors, source: str) -> None:
    """Refuse weights with NaN or infinity, naming the first bad tensors."""
    import torch

    bad = [name for name, t in named_tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFiniteWeights(f"{source}: {len(bad)} tensor(s) hold NaN or infinity, e.g. {', '.join(bad[:3])}; "
                               "the training diverged or the file is damaged: retrain with a lower lr")


def check_adapter(state: dict[str, Any], source: str) -> None:
    """Fail loudly on an adapter that cannot have learned anything, or that holds NaN or infinity."""
    check_finite(state.items(), source)
    if not state:
        raise ValueError(f"{source}: no LoRA tensors found; was the checkpoint written by a LoRA training?")
    b = [t for k, t in state.items() if ".lora_B." in k]
    if not b or all(not t.any() for t in b):
        raise ValueError(f"{source}: every lora_B tensor is zero, so the adapter changes nothing "
                         "(training did not update it: check lr and that the loss had supervised tokens)")


def target_modules(state: dict[str, Any]) -> list[str]:
    return sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in state})


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
    split = split_torch_state_dict_into_shards(state, filename_pattern="adapter_model{suffix}.safetensors",
                                               max_shard_size=export.max_shard_size)
    with atomic_dir(out) as tmp:
        for filename, keys in split.filename_to_tensors.items():
            save_file({k: state[k] for k in keys}, tmp / filename, metadata={"format": "pt"})
        if split.is_sharded:
            (tmp / ADAPTER_INDEX).write_text(json.dumps(
                {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": split.tensor_to_filename}, indent=1))
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return sorted(split.filename_to_tensors)


def adapter_config(lora: LoraConfig, state: dict[str, Any], base_model: str) -> dict[str, Any]:
    from peft import LoraConfig as PeftLoraConfig

    from .model import lora_kwargs

    kw = lora_kwargs(lora)
    kw["target_modules"] = target_modules(state)
    cfg = PeftLoraConfig(task_type="CAUSAL_LM", bias="none", base_model_name_or_path=base_model,
                     inference_mode=True, **kw)
    return {k: sorted(v) if isinstance(v, set) else v for k, v in cfg.to_dict().items()}


def pth_to_hf(ckpt: str | os.PathLike, out: str | os.PathLike, lora: LoraConfig, base_model: str,
              export: ExportConfig) -> list[str]:
    """``xtuner convert pth_to_hf``: checkpoint -> adapter directory (checked before it is written)."""
    state = read_lora_state(ckpt)
    check_adapter(state, str(ckpt))
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


def merge(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out: str | os.PathLike, template: str,
          merge: MergeConfig, *, trust_remote_code: bool = False) -> None:
    """``xtuner convert merge``: base + adapter -> one model that plain transformers loads.

    Runs on the CPU (XTuner's default ``--device cuda`` runs out of memory on
    large models). The tokenizer gets a chat template and the generation config
    the stop tokens of the training template, so chat tools format and stop
    as in training.
    """
    from .encoding import encode_prompt, resolve_template, stop_token_ids
    from .model import load_base, load_peft_model, load_tokenizer
    from .templates import TOKENIZER_TEMPLATE

    tokenizer = load_tokenizer(base_dir, trust_remote_code)
    model = load_peft_model(load_base(base_dir, merge.dtype, trust_remote_code), adapter_dir).merge_and_unload()
    check_finite(model.state_dict().items(), f"merging {adapter_dir} into {base_dir}")
    tmpl = resolve_template(template)
    if tmpl != TOKENIZER_TEMPLATE:
        uses_bos = encode_prompt("x", tokenizer, tmpl)[0] != tokenizer.encode(
            tmpl.format_input("x"), add_special_tokens=False)[0]
        tokenizer.chat_template = tmpl.chat_template(bos=uses_bos)
    stops = stop_token_ids(tokenizer, tmpl)
    model.generation_config.eos_token_id = stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, max_shard_size=merge.max_shard_size)
        tokenizer.save_pretrained(tmp)
    log.info("merged model written to %s", out)
