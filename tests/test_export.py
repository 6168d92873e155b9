"""pth_to_hf and merge on a real checkpoint of the tiny model."""

import json
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from snaketune.adapter import ADAPTER_INDEX, ADAPTER_WEIGHTS, check_adapter, pth_to_hf
from snaketune.config import ExportConfig, LoraConfig, MergeConfig
from snaketune.lora_state import read_lora_state
from snaketune.merge import merge
from snaketune.model import load_peft_model

from .helpers import TINY_BASE, XTUNER, assert_same_state, run_cli

LORA = LoraConfig(r=8, alpha=16, dropout=0.1)


@pytest.fixture(scope="module")
def checkpoint(trained_summary):
    """The run's shared tiny training's last checkpoint (read only)."""
    return trained_summary["checkpoint"]


def base_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TINY_BASE, dtype=torch.float32)


def logits(model, ids=((0, 1, 4093, 198, 6004, 2, 198, 1, 520, 9531),)):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits


def test_pth_to_hf_writes_a_peft_adapter_that_peft_loads(checkpoint, tmp_path):
    from peft import PeftModel

    out = tmp_path / "adapter"
    files = pth_to_hf(checkpoint, out, LORA, str(TINY_BASE), ExportConfig(fp32=True))
    assert files == [ADAPTER_WEIGHTS]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["peft_type"]) == (8, 16, "LORA")
    assert sorted(cfg["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )  # all linear but lm_head
    model = PeftModel.from_pretrained(base_model(), out)
    state = read_lora_state(checkpoint)
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert_same_state(loaded, {k: v.float() for k, v in state.items()})
    assert not torch.allclose(logits(model), logits(base_model()))  # the adapter changes the model


def test_default_is_fp16_and_shards_respect_max_shard_size(checkpoint, tmp_path):
    from safetensors import safe_open

    one, many = tmp_path / "one", tmp_path / "many"
    pth_to_hf(checkpoint, one, LORA, str(TINY_BASE), ExportConfig())
    with safe_open(one / ADAPTER_WEIGHTS, "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    files = pth_to_hf(checkpoint, many, LORA, str(TINY_BASE), ExportConfig(max_shard_size="20KB"))
    assert len(files) > 1
    for name in files:  # tensor bytes per shard (the safetensors header comes on top)
        with safe_open(many / name, "pt") as f:
            assert sum(f.get_tensor(k).numel() * 2 for k in f.keys()) <= 20_000
    index = json.loads((many / ADAPTER_INDEX).read_text())
    assert sorted(set(index["weight_map"].values())) == files
    a = logits(load_peft_model(base_model(), one))
    b = logits(load_peft_model(base_model(), many))
    assert torch.equal(a, b)


def test_merged_model_equals_base_plus_adapter(checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    pth_to_hf(checkpoint, adapter, LORA, str(TINY_BASE), ExportConfig(fp32=True))
    merge(TINY_BASE, adapter, merged, "internlm2_chat", MergeConfig(max_shard_size="5MB"))
    assert len(list(merged.glob("model-*.safetensors"))) > 1  # sharded as asked
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    assert not any("lora" in k for k in plain.state_dict())
    torch.testing.assert_close(logits(plain), logits(load_peft_model(base_model(), adapter)), atol=1e-5, rtol=1e-5)
    tok = AutoTokenizer.from_pretrained(merged)
    text = tok.apply_chat_template([{"role": "user", "content": "Q"}], tokenize=False)
    assert text == "<|endoftext|><|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    assert (
        2 in plain.generation_config.eos_token_id
        if isinstance(plain.generation_config.eos_token_id, list)
        else plain.generation_config.eos_token_id == 2
    )


def test_all_zero_or_empty_adapter_fails_loudly(checkpoint):
    state = read_lora_state(checkpoint)
    zeroed = {k: (torch.zeros_like(v) if ".lora_B." in k else v) for k, v in state.items()}
    with pytest.raises(ValueError, match="every lora_B tensor is zero"):
        check_adapter(zeroed, "x")
    with pytest.raises(ValueError, match="no LoRA tensors"):
        check_adapter({}, "x")


def test_cli_reads_the_train_summary_and_refuses_a_missing_checkpoint(checkpoint, tmp_path):
    summary = tmp_path / "training.json"
    summary.write_text(json.dumps({"checkpoint": checkpoint}))
    run_cli("pth_to_hf", "--lora", json.dumps(asdict(LORA)), "--base-model", TINY_BASE, summary, tmp_path / "a")
    assert (tmp_path / "a" / ADAPTER_WEIGHTS).exists()
    res = run_cli(
        "pth_to_hf",
        "--lora",
        json.dumps(asdict(LORA)),
        "--base-model",
        TINY_BASE,
        tmp_path / "nope.pth",
        tmp_path / "b",
        check=False,
    )
    assert res.returncode != 0 and "nope.pth does not exist" in res.stderr
    assert not (tmp_path / "b").exists()


def test_lora_settings_the_checkpoint_contradicts_are_refused_before_writing(tmp_path):
    """XTuner's checkpoint was trained with r=8: `--lora '{r: 16}'` would write an adapter that says
    r=16 and holds rank-8 tensors. Refused on one line naming both ranks; nothing is written."""
    out = tmp_path / "adapter"
    res = run_cli(
        "pth_to_hf",
        XTUNER / "work_plain/iter_16.pth",
        out,
        "--lora",
        "{r: 16, alpha: 16, dropout: 0.1}",
        "--base-model",
        TINY_BASE,
        check=False,
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert "iter_16.pth: trained with LoRA r=8" in line and "the LoRA settings say r=16: set r: 8" in line, line
    assert not out.exists() and not list(tmp_path.glob(".adapter.*"))


def test_a_pickle_in_a_plain_pth_is_refused_naming_the_file(tmp_path, capsys):
    import pickle

    from snaketune.errors import SnaketuneError

    class Payload:
        def __reduce__(self):
            return (print, ("the payload ran",))

    ckpt = tmp_path / "iter_1.pth"
    ckpt.write_bytes(pickle.dumps({"state_dict": {}, "meta": Payload()}))
    with pytest.raises(SnaketuneError) as err:
        pth_to_hf(ckpt, tmp_path / "adapter", LORA, str(TINY_BASE), ExportConfig())
    assert err.value.one_line().startswith(f"{ckpt}: ")
    assert not (tmp_path / "adapter").exists() and "the payload ran" not in capsys.readouterr().out


def test_pth_to_hf_removes_what_a_killed_conversion_of_the_same_output_left(tmp_path):
    stale, other = tmp_path / ".adapter.abcd1234.tmp", tmp_path / ".adapter2.abcd1234.tmp"
    for d in (stale, other):
        d.mkdir()
        (d / ADAPTER_WEIGHTS).write_bytes(b"half")
    pth_to_hf(XTUNER / "work_plain/iter_16.pth", tmp_path / "adapter", LORA, str(TINY_BASE), ExportConfig())
    assert not stale.exists() and other.exists() and (tmp_path / "adapter" / ADAPTER_WEIGHTS).is_file()


# pth_to_hf in a fresh process, which prints its peak RSS (VmHWM)
CONVERT_AND_REPORT_PEAK = """
import re, sys
from pathlib import Path
from snaketune.adapter import pth_to_hf
from snaketune.config import ExportConfig, LoraConfig
pth_to_hf(sys.argv[1], sys.argv[2], LoraConfig(r=8, alpha=16, dropout=0.1), "base", ExportConfig())
print(int(re.search(r"VmHWM:\\s*(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024)
"""


@pytest.mark.slow
def test_pth_to_hf_reads_the_lora_tensors_and_not_the_optimizer_states(tmp_path):
    """XTuner's checkpoint's LoRA weights saved beside 400 MB of Adam moments (a 7B's optimizer states
    are many times its LoRA's): converting that peaks less than 50 MB above converting the checkpoint
    as it is, and writes the same adapter."""
    from snaketune.safe_pickle import load_checkpoint

    small, large = XTUNER / "work_plain/iter_16.pth", tmp_path / "iter_16.pth"
    moments = torch.ones(2, 50_000_000)
    state = {i: {"exp_avg": moments[0], "exp_avg_sq": moments[1]} for i in range(28)}  # one storage, saved once
    blob = {"state_dict": load_checkpoint(small)["state_dict"], "optimizer": {"state": state, "param_groups": []}}
    torch.save(blob, large)
    del blob, moments
    assert large.stat().st_size > 400e6
    peaks = {}
    for ckpt, out in ((small, tmp_path / "small"), (large, tmp_path / "large")):
        argv = [sys.executable, "-c", CONVERT_AND_REPORT_PEAK, ckpt, out]
        peaks[out.name] = int(subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()[-1])
    assert peaks["large"] - peaks["small"] < 50e6, peaks
    assert (tmp_path / "small" / ADAPTER_WEIGHTS).read_bytes() == (tmp_path / "large" / ADAPTER_WEIGHTS).read_bytes()
