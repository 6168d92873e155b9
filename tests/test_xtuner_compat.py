"""Checkpoints written by XTuner 0.2.0 itself convert to XTuner's own adapters, tensor for tensor."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file

from snaketune.adapter import pth_to_hf
from snaketune.config import ExportConfig, LoraConfig
from snaketune.safe_pickle import load_checkpoint

from .helpers import XTUNER, assert_same_state

LORA = LoraConfig(r=8, alpha=16, dropout=0.1)  # XTuner's config.py beside the checkpoints


def test_mmengine_is_not_installed():
    with pytest.raises(ImportError):
        import mmengine  # noqa: F401


def convert(tmp_path, ckpt, fp32):
    out = tmp_path / ("fp32" if fp32 else "fp16")
    pth_to_hf(XTUNER / ckpt, out, LORA, "./base", ExportConfig(fp32=fp32))
    return out, load_file(out / "adapter_model.safetensors")


def test_plain_xtuner_checkpoint_converts_exactly_like_xtuner(tmp_path):
    out, ours = convert(tmp_path, "work_plain/iter_16.pth", fp32=True)
    theirs = load_file(XTUNER / "adapter_plain/adapter_model.safetensors")
    assert_same_state(ours, theirs)
    assert {v.dtype for v in ours.values()} == {torch.float32}
    a = json.loads((out / "adapter_config.json").read_text())
    b = json.loads((XTUNER / "adapter_plain/adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "lora_dropout", "bias", "task_type", "peft_type"):
        assert a[key] == b[key], key
    assert sorted(a["target_modules"]) == sorted(b["target_modules"])


def test_deepspeed_xtuner_checkpoint_converts_like_xtuner(tmp_path):
    """XTuner reads ZeRO checkpoints through fp16 even with --fp32; we read the fp32 master weights.
    Our fp16 adapter (the default) equals XTuner's tensor for tensor; our fp32 one rounds to it."""
    theirs = load_file(XTUNER / "adapter_deepspeed/adapter_model.safetensors")
    _, ours16 = convert(tmp_path, "work_deepspeed/iter_16.pth", fp32=False)
    assert_same_state(ours16, {k: v.half() for k, v in theirs.items()})
    assert {v.dtype for v in ours16.values()} == {torch.float16}
    _, ours32 = convert(tmp_path, "work_deepspeed/iter_16.pth", fp32=True)
    assert_same_state({k: v.half().float() for k, v in ours32.items()}, theirs)
    assert not all(torch.equal(ours32[k], theirs[k]) for k in theirs)  # ours kept the fp32 bits


def test_checkpoint_reader_refuses_code(tmp_path):
    """A checkpoint that would run a command when unpickled is refused, and the command never runs."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "meta": Evil()}, path)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load (posix|os).system"):
        load_checkpoint(path)
    assert not marker.exists()


def test_xtuner_metadata_loads_as_inert_placeholders():
    blob = load_checkpoint(XTUNER / "work_plain/iter_16.pth")
    hub = blob["message_hub"]
    assert isinstance(
        blob["state_dict"]["llm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"], torch.Tensor
    )
    assert "mmengine" not in __import__("sys").modules
    assert hub is not None
