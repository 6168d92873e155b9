"""The recipe on a CUDA GPU: NF4 layers with bf16 compute, a training by hand, and a bit-identical
resume after SIGKILL with LoRA dropout on (which needs the CUDA random state restored).

Every test here is marked ``gpu`` and skipped where ``torch.cuda.is_available()`` is false, so CI
(no GPU) collects and skips them. On a GPU machine they run through
``bash bench/gpu_check.sh`` (see its header and docs/gpu.md). Training runs are the by-hand command of
tests/test_train.py (``snaketune train``), in fresh processes, as a user runs it.
"""

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from snaketune.checkpoints import COMPLETE, complete_checkpoints
from snaketune.config import LoraConfig
from snaketune.launch import free_port

from .helpers import ROOT, TINY_BASE, XTUNER, read_jsonl, train_cmd

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# tests/test_train.py's tiny experiment, one epoch longer: 32 iterations (16 optimizer steps),
# a checkpoint every 4, so a kill after the first one leaves plenty of training to resume.
# LoRA dropout > 0: its masks come from the CUDA generator.
GPU_TINY = {"max_epochs": 4, "lora": {"r": 8, "alpha": 16, "dropout": 0.1}}
TOTAL_ITERS = 32
RUN_TIMEOUT = 240  # seconds for one training process (tens of seconds expected on a GPU)
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


def _env(tmp: Path) -> dict[str, str]:
    """The environment of a training process: the checkout importable without installing it. (The GPU
    machine has no snakemake and may have no git: the CLI then checks the config against the config
    dataclasses only, and provenance records no commit.)"""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _run(cmd: list[str], env: dict[str, str]) -> None:
    res = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    if res.returncode != 0:
        raise AssertionError(f"training failed ({res.returncode}):\n{res.stderr[-6000:]}")


def _lora(summary: Path) -> dict[str, torch.Tensor]:
    from snaketune.lora_state import read_lora_state

    return read_lora_state(json.loads(summary.read_text())["checkpoint"])


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n].float() - b[n].float()).abs().max()) for n in a)


def _drop_cuda_rng_state(ckpt: Path) -> None:
    """Remove the CUDA random state from a complete checkpoint, keeping it otherwise valid: where the
    completion marker lists file checksums, the rewritten file's is updated."""
    rng_file = ckpt / "rng_state_0.pt"
    state = torch.load(rng_file, weights_only=True)
    assert "cuda" in state, "the checkpoint holds no CUDA random state"
    del state["cuda"]
    torch.save(state, rng_file)
    marker = json.loads((ckpt / COMPLETE).read_text())
    if isinstance(marker.get("files"), dict) and rng_file.name in marker["files"]:
        marker["files"][rng_file.name] = hashlib.sha256(rng_file.read_bytes()).hexdigest()
        (ckpt / COMPLETE).write_text(json.dumps(marker))


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    return _env(tmp_path_factory.mktemp("env"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env) -> tuple[Path, Path]:
    """One uninterrupted training by hand on the GPU: its work directory and summary."""
    tmp = tmp_path_factory.mktemp("reference")
    work, out = tmp / "ref", tmp / "ref.json"
    _run(train_cmd(work, out, **GPU_TINY), env)
    return work, out


def test_training_model_is_nf4_on_cuda_with_bf16_compute(monkeypatch):
    """load_for_training on the GPU: every linear layer of the blocks is a bitsandbytes
    Linear4bit holding NF4 weights (double quantized) on the GPU, the 4-bit matmuls run in
    bfloat16, the LoRA weights are fp32 master weights, and a few steps lower the loss."""
    import bitsandbytes as bnb

    from snaketune.batching import as_rows, collate, encode_dataset
    from snaketune.config import TrainConfig
    from snaketune.data import read_records
    from snaketune.losses import token_loss_sum
    from snaketune.model import compute_dtype, load_for_training, load_tokenizer

    assert torch.cuda.is_bf16_supported(), "this GPU has no bf16: the recipe falls back to fp16"
    assert compute_dtype("cuda") is torch.bfloat16
    torch.manual_seed(0)
    model = load_for_training(TINY_BASE, LoraConfig(r=8, alpha=16, dropout=0.1), device="cuda")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    # 2 decoder layers x (q, k, v, o, gate, up, down); the (tied) output layer stays unquantized
    assert len(layers) == 2 * 7, [n for n, _ in layers]
    for name, m in layers:
        assert m.weight.device.type == "cuda", name
        assert m.weight.quant_type == "nf4" and m.weight.quant_state.quant_type == "nf4", name
        assert m.weight.quant_state.nested, f"{name}: no double quantization"
        assert m.compute_dtype is torch.bfloat16, name
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype is torch.float32 and p.device.type == "cuda" for p in trainable.values())
    from snaketune.train import training_autocast

    assert training_autocast("cuda").fast_dtype is torch.bfloat16  # the rest of the forward pass

    seen = []
    matmul_4bit = bnb.matmul_4bit

    def spy(A, B, *args, **kwargs):
        seen.append((A.dtype, A.device.type))
        return matmul_4bit(A, B, *args, **kwargs)

    monkeypatch.setattr(bnb, "matmul_4bit", spy)
    tokenizer = load_tokenizer(TINY_BASE)
    samples, _ = encode_dataset(
        read_records(XTUNER / "data.json")[:4], tokenizer, TrainConfig(template="internlm2_chat", max_length=64)
    )
    ids, labels, pos, _ = (t if t is None else t.cuda() for t in collate(as_rows(samples), tokenizer.pad_token_id))
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=1e-3)
    model.train()
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = token_loss_sum(model, ids, labels, pos) / (labels[:, 1:] != -100).sum()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable.values())
        optimizer.step()
        losses.append(loss.item())
    assert seen and set(seen) == {(torch.bfloat16, "cuda")}, set(seen)
    # 7 quantized layers x 2 blocks, forward and (for input gradients) backward recomputation
    assert len(seen) >= 8 * 14
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.05, losses


def test_training_by_hand_runs_on_cuda_and_the_loss_falls(reference):
    """`snaketune train` on the GPU: the summary and provenance say cuda, every step's loss and
    gradient norm are finite, the loss falls, and each checkpoint keeps the CUDA random state."""
    work, out = reference
    summary = json.loads(out.read_text())
    assert summary["device"] == "cuda"
    assert summary["iterations"] == TOTAL_ITERS and summary["resumed_from"] is None
    assert summary["world_size"] == 1
    assert json.loads(out.with_suffix(".prov.json").read_text())["platform"]["device"] == "cuda"
    rows = read_jsonl(work / "metrics.jsonl")
    assert [r["iter"] for r in rows] == list(range(2, TOTAL_ITERS + 1, 2))
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(x) for x in losses)
    assert all(r["grad_norm"] is not None and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in rows)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.05, losses
    ckpt = complete_checkpoints(work)[-1][1]
    state = torch.load(ckpt / "rng_state_0.pt", weights_only=True)
    assert "cuda" in state and state["cuda"].numel() > 0, "the checkpoint holds no CUDA random state"


def test_killed_training_resumes_bit_identical_on_cuda(reference, env, tmp_path):
    """SIGKILL after the first complete checkpoint; the rerun resumes and its final adapter is
    bit-identical to the uninterrupted run's (LoRA dropout 0.1 on the GPU). A control resume from a
    copy of the same checkpoint whose saved CUDA random state was removed must NOT match, which
    shows the comparison would catch a missing CUDA RNG restore."""
    ref_work, ref_out = reference
    work, out, log = tmp_path / "run", tmp_path / "run.json", tmp_path / "train.log"
    cmd = train_cmd(work, out, **GPU_TINY) + ["--log", str(log)]
    stderr = tmp_path / "killed.stderr"
    with open(stderr, "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    deadline = time.time() + RUN_TIMEOUT
    try:
        while not (work / "iter_4.pth" / COMPLETE).exists():
            if proc.poll() is not None:
                pytest.fail(
                    f"training ended ({proc.returncode}) before its first checkpoint:\n{stderr.read_text()[-6000:]}"
                )
            assert time.time() < deadline, "no checkpoint within the time limit"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not out.exists(), "the kill came after the end of training: nothing was resumed"
    k = complete_checkpoints(work)[-1][0]
    assert 4 <= k < TOTAL_ITERS

    control = tmp_path / "control"
    shutil.copytree(work, control)
    _drop_cuda_rng_state(control / f"iter_{k}.pth")

    _run(cmd, env)
    summary = json.loads(out.read_text())
    assert summary["resumed_from"] == k and summary["device"] == "cuda"
    assert f"resuming from {work / f'iter_{k}.pth'}: iteration {k} of {TOTAL_ITERS}" in log.read_text()
    ref_rows, rows = read_jsonl(ref_work / "metrics.jsonl"), read_jsonl(work / "metrics.jsonl")
    assert [r["iter"] for r in rows] == [r["iter"] for r in ref_rows]

    ref, got = _lora(ref_out), _lora(out)
    assert ref.keys() == got.keys() and ref
    if not all(torch.equal(ref[n], got[n]) for n in ref):
        # Tell a missing RNG restore apart from a GPU that is not deterministic run to run.
        again_work, again_out = tmp_path / "again", tmp_path / "again.json"
        _run(train_cmd(again_work, again_out, **GPU_TINY), env)
        noise = _max_diff(ref, _lora(again_out))
        pytest.fail(
            f"resumed adapter differs from the uninterrupted run's by up to {_max_diff(ref, got):.3g}; "
            f"a second uninterrupted run differs by {noise:.3g} "
            f"({'training on this GPU is not deterministic' if noise else 'training is deterministic: resume is broken'})"
        )
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]

    control_out, control_log = tmp_path / "control.json", tmp_path / "control.log"
    _run(train_cmd(control, control_out, **GPU_TINY) + ["--log", str(control_log)], env)
    assert json.loads(control_out.read_text())["resumed_from"] == k, (
        f"the control run did not resume from iteration {k}:\n{control_log.read_text()[-3000:]}"
    )
    assert not all(torch.equal(a, b) for a, b in zip(ref.values(), _lora(control_out).values())), (
        "a resume that restarts the CUDA random state still matched: dropout did not draw from the "
        "CUDA generator, so this test does not exercise the CUDA RNG restore"
    )


def _steps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of their dtype lie between a and b, element by element."""
    ints = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
    magnitude = (1 << (8 * a.element_size() - 1)) - 1

    def on_a_line(x):  # sign and magnitude -> one ordered integer line, +0 and -0 the same point
        i = x.view(ints).long()
        return torch.where(i < 0, -(i & magnitude), i)

    return (on_a_line(a) - on_a_line(b)).abs()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_merge_on_the_gpu_is_within_one_step_of_peft_on_the_cpu(tmp_path, dtype):
    """`merge --device cuda` computes each LoRA delta on the GPU, whose matrix product may round
    otherwise than the CPU's: every merged weight is at most one step of its dtype from PEFT's
    merge_and_unload() on the CPU (docs/xtuner.md), and the LoRA weights did change the model."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from snaketune.config import MergeConfig
    from snaketune.merge import merge

    adapter = XTUNER / "adapter_plain"
    merge(TINY_BASE, adapter, tmp_path / "merged", "internlm2_chat", MergeConfig(dtype=dtype), device="cuda")
    ours = load_file(tmp_path / "merged" / "model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(TINY_BASE, dtype=getattr(torch, dtype))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    reference = PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()
    assert ours.keys() <= reference.keys() and any(not torch.equal(before[k], v) for k, v in ours.items())
    far = {k: int(_steps_apart(v, reference[k]).max()) for k, v in ours.items()}
    assert max(far.values()) <= 1, far


@two_gpus
def test_two_ranks_on_two_gpus_that_see_different_free_memory_agree_and_finish(env, tmp_path):
    """tests/test_devices.py's two-rank check with NCCL on two GPUs: rank 1 sees no free memory,
    rank 0 plenty; both make the same backward calls and the training finishes."""
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    _run(cmd + [str(ROOT / "tests/rank_memory.py"), str(work), str(XTUNER / "data.json"), str(1 << 50), "0"], env)
    calls = [json.loads((work / f"backward_rank{r}.json").read_text())["backward"] for r in (0, 1)]
    assert calls == [8, 8], calls


@two_gpus
def test_training_by_hand_on_two_gpus(env, tmp_path):
    """`snaketune train --ranks 2`: one rank per GPU (NCCL, ZeRO-2), the loss falls."""
    work, out = tmp_path / "work", tmp_path / "out.json"
    _run(train_cmd(work, out, **GPU_TINY) + ["--ranks", "2"], env)
    summary = json.loads(out.read_text())
    assert summary["world_size"] == 2 and summary["device"] == "cuda"
    losses = [r["loss"] for r in read_jsonl(work / "metrics.jsonl")]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
