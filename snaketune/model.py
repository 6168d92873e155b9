"""Loading a model directory: tokenizer, the 4-bit NF4 + LoRA training model, the base and adapters."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .adapter import ADAPTER_INDEX, check_finite, lora_kwargs, read_adapter_weights
from .config import LoraConfig
from .devices import training_dtype


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(device: str):
    """bf16 where the GPU has it; fp32 on a CPU, where bf16 is native on some models only: every CPU
    computes at the same precision (docs/benchmarks.md times a step both ways)."""
    import torch

    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def device_map(device: str):
    """transformers' ``device_map`` for ``device``: on a GPU the process's current one (each rank and job
    has set its own), since "cuda" alone would mean GPU 0 for every rank."""
    import torch

    return {"": torch.cuda.current_device()} if device == "cuda" else device


def check_remote_code(model_dir: str | os.PathLike, trust_remote_code: bool) -> None:
    """A model that exists only as its repository's own Python code needs the user's say-so, in our words."""
    import json

    from transformers import CONFIG_MAPPING

    from .errors import ConfigError

    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    model_type = config.get("model_type")
    if not trust_remote_code and model_type not in CONFIG_MAPPING and config.get("auto_map"):
        raise ConfigError(
            f"{path}: model_type {model_type!r} is defined only by Python files in the model's repository "
            "(config.json's auto_map), and snaketune runs no such code unless told to: set "
            "`trust_remote_code: true` on this model's entry under `models:` if you trust its authors"
        )


def load_tokenizer(model_dir: str | os.PathLike, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    check_remote_code(model_dir, trust_remote_code)
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code, padding_side="right")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def nf4_config(compute_dtype):
    """QLoRA's quantization: 4-bit NF4 with double quantization, computing in ``compute_dtype``."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_threshold=6.0,
    )


def load_for_training(
    model_dir: str | os.PathLike,
    lora: LoraConfig,
    *,
    quantization: str = "nf4",
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = True,
    device: str | None = None,
):
    """Base model in 4-bit NF4 (double quantization) with trainable LoRA adapters on all linear layers,
    computing in :func:`snaketune.devices.training_dtype`."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    device = device or pick_device()
    dtype = getattr(torch, training_dtype(device, device == "cuda" and torch.cuda.is_bf16_supported()))
    kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=trust_remote_code, device_map=device_map(device))
    if quantization == "nf4":
        kwargs["quantization_config"] = nf4_config(dtype)
    elif quantization != "none":
        raise ValueError(f"unknown quantization {quantization!r}: use nf4 or none")
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if quantization == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    config = PeftLoraConfig(task_type="CAUSAL_LM", bias="none", **lora_kwargs(lora))
    model = get_peft_model(model, config)
    if quantization == "nf4":
        keep_4bit_weights_trainable(model)
    # LoRA weights stay fp32 (master weights) whatever the compute dtype.
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.float32)
    return model


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations during backward instead of keeping them.

    Non-reentrant checkpointing: the inputs need not require grad, and the random state is
    replayed, so LoRA dropout draws the same masks again and the gradients are unchanged.
    Works on a PEFT model too (after ``get_peft_model``).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def activation_bytes(config, tokens: int, lora_dropout: float) -> int:
    """What backward keeps of one micro-batch of ``tokens`` tokens without gradient checkpointing
    (an upper estimate for a Llama-shaped decoder with LoRA on all linear layers).

    Per token and layer, in fp32 (the residual stream is fp32 after prepare_model_for_kbit_training):
    about 12 hidden-size and 2 intermediate-size vectors (norm inputs, attention, MLP), taken as
    14 and 3; LoRA dropout adds the dropped input and its mask for each adapted layer (six
    hidden-size inputs and one intermediate-size, taken as 1.5x). The output head keeps at most
    3 vocabulary-size vectors per position (logits, log-softmax, its gradient). Checked against the
    tensors autograd really saves in tests/test_speed_levers.py.
    """
    h, i = config.hidden_size, config.intermediate_size
    per_layer = 14 * h + 3 * i + (1.5 * (6 * h + i) if lora_dropout > 0 else 0)
    if getattr(config, "_attn_implementation", None) == "eager":  # attention probabilities: quadratic
        per_layer += config.num_attention_heads * tokens
    return int(4 * tokens * (config.num_hidden_layers * per_layer + 3 * config.vocab_size))


def available_memory(device: str) -> int:
    """Bytes free for this rank now: the GPU's free memory, or the host's available memory shared
    by the ranks on this host (psutil comes with DeepSpeed)."""
    import torch

    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def keep_4bit_weights_trainable(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference inside a training model.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a ``Linear4bit`` weight
    the first time the layer runs in eval mode without gradients (the evaluation
    during training does exactly that) and from then on multiplies through
    ``gemv_4bit``, which has no autograd: later training steps would silently stop
    back-propagating through the frozen base layers, and the loss barely falls.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_base(
    model_dir: str | os.PathLike,
    dtype: Any = "auto",
    trust_remote_code: bool = False,
    *,
    quantization: str = "none",
    device: str | None = None,
):
    """The base model for inference on ``device`` (default: the CPU, or for ``nf4`` the GPU when there
    is one): unquantised in ``dtype`` (a torch dtype, its name, or "auto"), or ``nf4`` as QLoRA
    training loads it (4-bit NF4, double quantization, computing in the device's compute dtype)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    device = device or (pick_device() if quantization == "nf4" else "cpu")
    kwargs: dict[str, Any] = dict(dtype=torch_dtype, device_map=device_map(device), trust_remote_code=trust_remote_code)
    if quantization == "nf4":
        compute = compute_dtype(device)
        kwargs.update(dtype=compute, quantization_config=nf4_config(compute))
    elif quantization != "none":
        raise ValueError(f"unknown quantization {quantization!r}: use nf4 or none")
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)


def load_peft_model(base, adapter_dir: str | os.PathLike):
    """``PeftModel.from_pretrained``, also for an adapter written in several shards; refuses NaN/inf."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model, set_peft_model_state_dict

    adapter_dir = Path(adapter_dir)
    check_finite(read_adapter_weights(adapter_dir).items(), str(adapter_dir))
    if not (adapter_dir / ADAPTER_INDEX).exists():
        return PeftModel.from_pretrained(base, adapter_dir)
    model = get_peft_model(base, PeftLoraConfig.from_pretrained(adapter_dir))
    result = set_peft_model_state_dict(model, read_adapter_weights(adapter_dir))
    if result.unexpected_keys:
        raise ValueError(f"{adapter_dir}: weights that match no LoRA layer: {result.unexpected_keys[:5]}")
    return model.eval()  # as from_pretrained leaves it: no LoRA dropout at inference
