"""Data parallel ranks (gloo on the CPU), loss normalisation, determinism, multi-node launch command."""

import json
import re

import pytest
import torch

from snaketune.adapter import pth_to_hf
from snaketune.checkpoints import complete_checkpoints
from snaketune.config import ExportConfig, LoraConfig
from snaketune.launch import torchrun_command
from snaketune.lora_state import read_lora_state
from snaketune.safe_pickle import load_checkpoint

from .helpers import (
    EXACT,
    TINY,
    TINY_BASE,
    assert_same_state,
    kill_at_checkpoint,
    read_jsonl,
    run,
    train_cmd,
    train_exact,
    unequal_data,
)


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_double_accumulation(exact_training, tmp_path):
    """Global batch = batch_size x accumulative_counts x ranks: 2 ranks x acc 1 == 1 rank x acc 2.
    Same samples per optimizer step, so the same losses (rtol 1e-5) and adapters (atol 1e-6)."""
    w2, s2 = train_exact(tmp_path, "two", ranks=2, batch_size=2, accumulative_counts=1)
    w1, s1 = exact_training  # one rank, batch_size 2, accumulative_counts 2
    assert s2["world_size"] == 2 and s1["world_size"] == 1
    m2, m1 = read_jsonl(w2 / "metrics.jsonl"), read_jsonl(w1 / "metrics.jsonl")
    assert [r["iter"] * 2 for r in m2] == [r["iter"] for r in m1]  # iterations count per-rank micro-batches
    assert [r["supervised_tokens"] for r in m2] == [r["supervised_tokens"] for r in m1]
    assert [r["loss"] for r in m2] == pytest.approx([r["loss"] for r in m1], rel=1e-5)
    a, b = read_lora_state(s2["checkpoint"]), read_lora_state(s1["checkpoint"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    # ZeRO-2 sharded the optimizer state: one partition per rank
    ckpt = w2 / f"iter_{s2['iterations']}.pth"
    assert sorted(p.name for p in ckpt.glob("zero_pp_rank_*")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    # only rank 0 wrote the logs
    assert len(read_jsonl(w2 / "runs.jsonl")) == 1


@pytest.mark.slow
def test_two_rank_checkpoint_converts_and_resumes_on_two_ranks(tmp_path):
    work, out = tmp_path / "w", tmp_path / "o.json"
    data = unequal_data(tmp_path / "unequal.json")  # the data train_exact() gives the reference below
    cmd = train_cmd(work, out, data=data, **EXACT, batch_size=1, accumulative_counts=1)
    cmd += ["--ranks", "2", "--threads", "2"]
    kill_at_checkpoint(cmd, work)  # torchrun and both ranks
    k, ckpt = complete_checkpoints(work)[-1]
    # the 2-rank checkpoint converts: the gathered fp32 partitions are the trained weights
    module = {key: v for key, v in load_checkpoint(ckpt / "mp_rank_00_model_states.pt")["module"].items()}
    lora = read_lora_state(ckpt)
    for key, v in lora.items():
        assert torch.equal(v, module[key.replace(".weight", ".default.weight")])
    pth_to_hf(ckpt, tmp_path / "adapter", LoraConfig(r=8, alpha=16, dropout=0.0), str(TINY_BASE), ExportConfig())
    run(cmd)
    summary = json.loads(out.read_text())
    assert summary["resumed_from"] == k and summary["world_size"] == 2
    _, ref = train_exact(tmp_path, "ref", ranks=2, data=data, batch_size=1, accumulative_counts=1)
    a, b = read_lora_state(summary["checkpoint"]), read_lora_state(ref["checkpoint"])
    assert_same_state(a, b)


@pytest.mark.slow
def test_loss_is_normalised_over_the_whole_accumulation_window(tmp_path):
    """batch 4 x acc 1 and batch 1 x acc 4 on answers of unequal length: same loss and gradient norm at
    every step (rtol 1e-5); and the first step's loss is the sum of token losses over its four samples
    divided by their supervised tokens, computed here by hand, which a mean of per-sample means misses."""
    from transformers import AutoModelForCausalLM

    from snaketune.batching import encode_dataset, epoch_batches
    from snaketune.config import TrainConfig
    from snaketune.data import read_records
    from snaketune.model import load_tokenizer

    data = unequal_data(tmp_path / "unequal.json")
    # unquantised, so that the first step (LoRA B = 0: the base model alone) can be recomputed exactly
    over = dict(max_epochs=1, max_norm=1e9, quantization="none")
    wa, _ = train_exact(tmp_path, "b4", data=data, batch_size=4, accumulative_counts=1, **over)
    wb, _ = train_exact(tmp_path, "b1", data=data, batch_size=1, accumulative_counts=4, **over)
    ma, mb = read_jsonl(wa / "metrics.jsonl"), read_jsonl(wb / "metrics.jsonl")
    assert len(ma) == len(mb) == 4
    assert [r["loss"] for r in ma] == pytest.approx([r["loss"] for r in mb], rel=1e-5)
    assert [r["grad_norm"] for r in ma] == pytest.approx([r["grad_norm"] for r in mb], rel=1e-5)

    cfg = TrainConfig(**{**TINY, **EXACT, "lora": {}, "batch_size": 1, "accumulative_counts": 4})
    samples, _ = encode_dataset(read_records(data), load_tokenizer(TINY_BASE), cfg)
    first_step = [samples[b[0]] for b in epoch_batches(len(samples), 0, cfg, 0, 1)[:4]]
    model = AutoModelForCausalLM.from_pretrained(TINY_BASE, dtype=torch.float32).eval()
    sums, counts = [], []
    with torch.no_grad():
        for smp in first_step:
            logits = model(torch.tensor([smp.input_ids])).logits[0, :-1]
            labels = torch.tensor(smp.labels[1:])
            keep = labels != -100
            sums.append(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item())
            counts.append(int(keep.sum()))
    assert len(set(counts)) > 1  # unequal supervised lengths
    expected = sum(sums) / sum(counts)
    mean_of_means = sum(s / c for s, c in zip(sums, counts)) / len(sums)
    assert mb[0]["loss"] == pytest.approx(expected, rel=1e-5)
    # a random model's token losses are all near ln(vocab), so the two differ by little, yet 20 times
    # the tolerance above: a trainer averaging per-sample means would fail the assertion before
    assert abs(mean_of_means - expected) > 20 * 1e-5 * expected


@pytest.mark.slow
def test_two_clean_runs_give_identical_adapters(tmp_path):
    _, a = train_exact(tmp_path, "a", lora={"r": 8, "alpha": 16, "dropout": 0.1})
    _, b = train_exact(tmp_path, "b", lora={"r": 8, "alpha": 16, "dropout": 0.1})
    sa, sb = read_lora_state(a["checkpoint"]), read_lora_state(b["checkpoint"])
    assert_same_state(sa, sb)


def test_torchrun_runs_the_train_step_once_per_rank():
    call = {"model_dir": "m", "ranks": 2}
    cmd = torchrun_command(2, call, master_port=1234)
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2" and cmd[cmd.index("--master_port") + 1] == "1234"
    assert cmd[-3:-1] == ["-m", "snaketune.rank_main"] and json.loads(cmd[-1]) == call


@pytest.mark.slow
def test_two_launchers_started_by_hand_train_as_one_like_xtuners_nnodes(tmp_path):
    """XTuner's launch over machines: the same `snaketune train` started on each node with NNODES, NODE_RANK,
    ADDR and PORT (here two launchers on 127.0.0.1, one rank each) is one training of world size 2, equal
    bit for bit to 2 ranks on one node; each node's rank logs beside the job's log."""
    import os
    import subprocess

    from snaketune.launch import free_port

    data = unequal_data(tmp_path / "unequal.json")  # the data train_exact() gives the reference below
    work, out, log = tmp_path / "w", tmp_path / "o.json", tmp_path / "train.log"
    cmd = train_cmd(work, out, data=data, **EXACT, batch_size=1, accumulative_counts=1) + ["--log", str(log)]
    nodes = {"NNODES": "2", "ADDR": "127.0.0.1", "PORT": str(free_port()), "NPROC_PER_NODE": "1"}
    procs = [
        subprocess.Popen(cmd, env={**os.environ, **nodes, "NODE_RANK": str(rank)}, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    summary = json.loads(out.read_text())
    assert (summary["world_size"], summary["nodes"], summary["ranks_per_node"]) == (2, 2, 1)
    assert len(summary["hosts"]) == 2
    prov = json.loads(out.with_suffix(".prov.json").read_text())
    assert (prov["world_size"], prov["nodes"], prov["ranks_per_node"]) == (2, 2, 1)
    assert "rank1" in (tmp_path / "train.rank1.log").read_text()
    _, ref = train_exact(tmp_path, "ref", ranks=2, data=data, batch_size=1, accumulative_counts=1)
    assert_same_state(read_lora_state(summary["checkpoint"]), read_lora_state(ref["checkpoint"]))


@pytest.mark.parametrize(
    "env, message",
    [
        ({"NNODES": "2", "NODE_RANK": "0"}, "NNODES, NODE_RANK set but not ADDR, PORT"),
        ({"NNODES": "2", "NODE_RANK": "2", "ADDR": "h", "PORT": "1"}, "NODE_RANK=2 with NNODES=2"),
        ({"NNODES": "two", "NODE_RANK": "0", "ADDR": "h", "PORT": "1"}, "NNODES='two': must be a whole number"),
        ({"NNODES": "3", "NODE_RANK": "0", "ADDR": "h", "PORT": "1"}, "NNODES=3 but the experiment's nodes is 2"),
        (
            {"NNODES": "2", "NODE_RANK": "0", "ADDR": "h", "PORT": "1", "NPROC_PER_NODE": "4"},
            "NPROC_PER_NODE=4 but this node starts 1 rank",
        ),
        ({}, "nodes: 2, but this training runs on one machine"),
    ],
)
def test_bad_node_settings_are_one_line_naming_them(monkeypatch, env, message):
    from snaketune.errors import ConfigError
    from snaketune.launch import NODE_VARIABLES, nodes_command

    for name in (*NODE_VARIABLES, "NPROC_PER_NODE", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=re.escape(message)):
        nodes_command(2, 1, {})
