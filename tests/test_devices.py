"""Which devices a job uses (snaketune.devices), held on a CPU: only the device count and the free
memory, the two numbers a GPU would give, are set by the tests, at the one function that reads each."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from snaketune import devices, evalsets, steps
from snaketune.config import ModelConfig, TrainConfig, resolve
from snaketune.devices import DeviceError, Placement, check_ranks, inference_bytes, inference_placement
from snaketune.launch import free_port

from .helpers import ROOT, SNAKEMAKE, TINY, TINY_BASE, XTUNER, copy_workflow, run

# The shapes of the presets' models (their config.json on the hub), for the memory estimates.
INTERNLM2_1_8B = dict(
    hidden_size=2048,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=8,
    intermediate_size=8192,
    vocab_size=92544,
    tie_word_embeddings=False,
)
INTERNLM_7B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    intermediate_size=11008,
    vocab_size=103168,
    tie_word_embeddings=False,
)
SHAPES = {
    "Shanghai_AI_Laboratory/internlm2-1_8b": INTERNLM2_1_8B,
    "Shanghai_AI_Laboratory/internlm2-chat-1_8b": INTERNLM2_1_8B,
    "Shanghai_AI_Laboratory/internlm-chat-7b": INTERNLM_7B,
}
GiB = 2**30


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != devices.VISIBLE}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


@pytest.mark.slow
def test_ranks_seeing_different_free_memory_make_the_same_backward_calls(tmp_path):
    """Two gloo ranks under torchrun, ZeRO-2: rank 0 sees plenty of free memory (whole micro-batches
    per pass), rank 1 none (one row per pass). They agree on the least, make the same number of
    backward calls, and the training finishes; deciding alone, they fall out of step in a collective."""
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port()]
    cmd += [ROOT / "tests/rank_memory.py", work, XTUNER / "data.json", 1 << 50, 0]
    run(cmd, env=_env(), timeout=240)
    calls = [json.loads((work / f"backward_rank{r}.json").read_text())["backward"] for r in (0, 1)]
    # 16 records on 2 ranks, batches of 2: 4 micro-batches per rank, each now 2 passes of 1 row
    assert calls == [8, 8], calls
    assert (work / "iter_4.pth").is_dir()


def test_ranks_are_checked_against_the_gpus():
    check_ranks(2, job_gpus=2, experiment_gpus=2, cuda_devices=2)
    check_ranks(4, job_gpus=0, experiment_gpus=0, cuda_devices=0)  # CPU ranks (gloo): any number
    check_ranks(1, job_gpus=None, experiment_gpus=None, cuda_devices=1)  # by hand
    with pytest.raises(DeviceError, match=r"gpus: 4 but the job was given 1") as e:
        check_ranks(1, job_gpus=1, experiment_gpus=4, cuda_devices=1)
    assert "make them equal" in e.value.one_line()
    with pytest.raises(DeviceError, match=r"4 ranks, but this job sees 2 GPU\(s\)"):
        check_ranks(4, job_gpus=None, experiment_gpus=None, cuda_devices=2)
    with pytest.raises(DeviceError, match=r"4 ranks, but the job was given 2 GPU\(s\)"):
        check_ranks(4, job_gpus=2, experiment_gpus=0, cuda_devices=4)


def _job(tmp_path: Path, **over) -> steps.TrainJob:
    """A train job that fails at once if it gets past the device checks: its model does not exist,
    and no other malloc makes it relaunch (exec) the test's own process."""
    return steps.TrainJob(
        model_dir=tmp_path / "missing-model",
        data_file=XTUNER / "data.json",
        work_dir=tmp_path / "work",
        summary=tmp_path / "summary.json",
        train=TrainConfig.from_dict({**TINY, "allocator": "system"}),
        model=ModelConfig(source="local", path=str(TINY_BASE)),
        **over,
    )


def test_train_job_refuses_more_ranks_than_gpus_before_starting(tmp_path, monkeypatch):
    """The train step as a SLURM job with one GPU (CUDA_VISIBLE_DEVICES set, one device visible):
    four ranks, or an experiment of gpus: 4 cut to 1 by the profile, stop before any rank starts,
    naming both numbers; nothing is written."""
    monkeypatch.setenv(devices.VISIBLE, "0")
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 1)
    with pytest.raises(DeviceError, match=r"4 ranks, but this job sees 1 GPU\(s\) \(CUDA_VISIBLE_DEVICES=0\)"):
        steps.train(_job(tmp_path, ranks=4, gpus=1, experiment_gpus=1))
    with pytest.raises(DeviceError, match=r"gpus: 4 but the job was given 1"):
        steps.train(_job(tmp_path, ranks=1, gpus=1, experiment_gpus=4))
    assert not list(tmp_path.iterdir())


def test_a_job_given_no_gpu_sees_none(tmp_path, monkeypatch):
    """On a machine of two GPUs, the train and evaluate jobs of an experiment of gpus: 0 (resources
    gpu=0) hide the GPUs before anything touches CUDA, and so run on the CPU instead of on GPU 0,
    which a GPU job may hold; SLURM's CUDA_VISIBLE_DEVICES included. By hand every GPU stays visible."""
    monkeypatch.delenv(devices.VISIBLE, raising=False)
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 0 if os.environ.get(devices.VISIBLE) == "" else 2)
    steps.take_gpus(_job(tmp_path, ranks=1))
    assert devices.VISIBLE not in os.environ
    steps.take_gpus(_job(tmp_path, ranks=1, gpus=0, experiment_gpus=0))
    assert os.environ[devices.VISIBLE] == ""
    monkeypatch.setenv(devices.VISIBLE, "1")
    assert devices.inference_device(0) == Placement("cpu", "float32")
    assert os.environ[devices.VISIBLE] == ""


CLAIM = """
import os, sys, time
from pathlib import Path
from snaketune.devices import assign_gpus

assign_gpus(1, total=2)  # the device count: two GPUs
Path(sys.argv[1]).write_text(os.environ["CUDA_VISIBLE_DEVICES"])
deadline = time.time() + 60  # hold the GPU until the other job has taken one too
while len(list(Path(".").glob("*.gpu"))) < 2 and time.time() < deadline:
    time.sleep(0.05)
"""


@pytest.mark.slow
def test_two_gpu_jobs_of_a_local_run_get_different_devices(tmp_path):
    """Two jobs asking for resources gpu=1 run at once under Snakemake's local executor on a machine
    of two GPUs (--resources gpu=2): each sees a different one through CUDA_VISIBLE_DEVICES."""
    (tmp_path / "claim.py").write_text(CLAIM)
    (tmp_path / "Snakefile").write_text(
        'rule all:\n    input: "a.gpu", "b.gpu"\n\n'
        'rule job:\n    output: "{name}.gpu"\n    resources: gpu=1\n'
        f'    shell: "{sys.executable} claim.py {{output}}"\n'
    )
    run([*SNAKEMAKE, "--cores", "2", "--resources", "gpu=2"], cwd=tmp_path, env=_env(), timeout=120)
    got = sorted((tmp_path / f"{name}.gpu").read_text() for name in "ab")
    assert got == ["0", "1"], got


def test_a_gpu_held_by_another_job_is_not_given_twice(tmp_path, monkeypatch):
    """One process holds GPU 0; the next job gets GPU 1; with both held, a third waits, then fails
    naming the lock files. SLURM's (or a user's) CUDA_VISIBLE_DEVICES is left as it is."""
    monkeypatch.delenv(devices.VISIBLE, raising=False)
    locks = tmp_path / "locks"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from snaketune.devices import assign_gpus as a; import pathlib, time; "
            f"a(1, total=2, lock_dir=pathlib.Path({str(locks)!r})); print('held', flush=True); time.sleep(60)",
        ],
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert devices.assign_gpus(1, total=2, lock_dir=locks) == [1]
        assert os.environ[devices.VISIBLE] == "1"
        monkeypatch.delenv(devices.VISIBLE)
        with pytest.raises(DeviceError, match=r"needs 1 of this machine's 2 GPUs, and other jobs hold them"):
            devices.assign_gpus(1, total=2, lock_dir=locks, wait_s=0.2)
    finally:
        holder.kill()
        holder.wait()
    monkeypatch.setenv(devices.VISIBLE, "3")
    assert devices.assign_gpus(1, total=8, lock_dir=locks) is None and os.environ[devices.VISIBLE] == "3"


def test_answers_are_generated_on_the_jobs_gpu_in_half_precision():
    assert inference_placement(1, 1, True) == Placement("cuda", "bfloat16")
    assert inference_placement(1, 1, False) == Placement("cuda", "float16")  # V100, T4: no bf16
    assert inference_placement(1, 1, True, "float16") == Placement("cuda", "float16")  # a merged fp16 model as saved
    assert inference_placement(1, 1, False, "bfloat16") == Placement("cuda", "float16")
    assert inference_placement(1, 1, True, "float32") == Placement("cuda", "bfloat16")
    assert inference_placement(None, 2, True) == Placement("cuda", "bfloat16")  # by hand: any visible GPU
    assert inference_placement(0, 2, True) == Placement("cpu", "float32")  # the job was given none
    assert inference_placement(1, 0, True) == Placement("cpu", "float32")  # given one, none visible
    assert inference_placement(None, 0, False) == Placement("cpu", "float32")


def test_training_computes_in_bf16_only_on_a_gpu_that_has_it():
    """Besides the fp32 loss and LoRA weights: bf16 on a GPU that has it, fp32 on one that has not
    (fp16's gradients would need loss scaling) and on the CPU."""
    assert devices.training_dtype("cuda", True) == "bfloat16"
    assert devices.training_dtype("cuda", False) == "float32"  # V100, T4
    assert devices.training_dtype("cpu", True) == devices.training_dtype("cpu", False) == "float32"


def test_the_tiny_models_placement_here_is_the_cpu():
    assert devices.placement_here(None, TINY_BASE) == Placement("cpu", "float32")


@pytest.mark.parametrize("model", sorted(set(SHAPES) - {"Shanghai_AI_Laboratory/internlm2-1_8b"}))
def test_the_memory_estimate_counts_what_transformers_builds(model):
    """inference_bytes, which the profile test sizes jobs by: its weights are the parameters of the
    preset's model as transformers builds it (InternLM 7B has attention biases, the estimate none),
    and its KV cache is what a cached forward of a small model of the same kind keeps."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = SHAPES[model]
    with torch.device("meta"):
        built = LlamaForCausalLM(LlamaConfig(**shape, attention_bias="internlm-" in model))
    params = sum(p.numel() for p in built.parameters())
    assert inference_bytes(shape, 2, 0, 0) == pytest.approx(2 * params, rel=1e-3)

    small = dict(shape, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=50)
    if "num_key_value_heads" in shape:  # grouped as the preset's model
        small["num_key_value_heads"] = 4 * shape["num_key_value_heads"] // shape["num_attention_heads"]
    torch.manual_seed(0)
    with torch.no_grad():
        out = LlamaForCausalLM(LlamaConfig(**small)).eval()(input_ids=torch.zeros(3, 7, dtype=torch.long))
    cache = sum(
        t.numel() * t.element_size() for layer in out.past_key_values.layers for t in (layer.keys, layer.values)
    )
    assert inference_bytes(small, 4, 3, 7) - inference_bytes(small, 4, 0, 0) == cache


# A generous decode rate for a 7B model in bf16, batch <= 16, on any data-centre GPU of the last
# generations, and the rate a model's weights are read from disk: the evaluate job's time is
# estimated from these.
DECODE_STEPS_PER_S = 5
LOAD_BYTES_PER_S = 100e6
SMALLEST_GPU = 40 * GiB  # docs/gpu.md: the presets' evaluation needs a 40 GB card (the 7B: batches of 16)


def _dry_run_resources(tmp_path: Path, config: dict, *profile: str) -> dict[tuple[str, str], dict[str, str]]:
    """(rule, its first wildcard's value) -> the resources Snakemake gives each job of ``config``
    (through ``profile``: e.g. --workflow-profile profiles/slurm), from a dry run."""
    (tmp_path / "dry_run.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    wd = copy_workflow(tmp_path / "wd")
    cmd = [*SNAKEMAKE, "-n", "final_model", *profile, "--configfile", tmp_path / "dry_run.yaml"]
    res = run(cmd, cwd=wd, env=_env(), timeout=120)
    planned = {}
    for block in re.split(r"\n(?=\[.*\]\nrule )", res.stdout + res.stderr):
        rule, wildcard = re.search(r"rule (\w+):", block), re.search(r"wildcards: \w+=([^,\s]+)", block)
        found = re.search(r"resources: (.*)", block)
        if rule and wildcard and found:
            planned[rule.group(1), wildcard.group(1)] = dict(kv.split("=", 1) for kv in found.group(1).split(", "))
    return planned


def _planned_resources(tmp_path: Path) -> dict[tuple[str, str], dict[str, str]]:
    """(rule, experiment) -> the resources Snakemake gives each job of every preset through
    profiles/slurm, from one dry run of all the presets together."""
    config: dict = {"run": []}
    for preset in PRESETS:
        part = yaml.safe_load(preset.read_text())
        config["run"] += part["run"]
        for key in ("models", "datasets", "experiments"):
            config.setdefault(key, {}).update(part[key])
    return _dry_run_resources(tmp_path, config, "--workflow-profile", "profiles/slurm")


@pytest.mark.parametrize("gpus", [0, 1])
def test_every_job_that_runs_a_model_declares_its_gpu(tmp_path, gpus):
    """The default experiment, trained on the CPU or on one GPU of a local machine of two: train asks
    for its gpus, and evaluate and the replay generation (which loads a model, in NF4 when its spec says so) for one
    GPU exactly when the training has one; nothing else asks for a GPU."""
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    config["experiments"]["identity"]["gpus"] = gpus
    planned = _dry_run_resources(tmp_path, config, "--resources", "gpu=2")
    asking = {job: int(res["gpu"]) for job, res in planned.items() if int(res.get("gpu", 0))}
    expected = {("train", "identity"): gpus, ("evaluate", "identity"): gpus, ("replay_data", "general_replay"): gpus}
    assert asking == {job: n for job, n in expected.items() if n}, planned
    assert set(expected) <= set(planned), planned


PRESETS = sorted((ROOT / "config/presets").glob("*.yaml"))


def test_slurm_profile_fits_each_presets_jobs(tmp_path):
    """profiles/slurm's jobs for each preset, as Snakemake plans them: train asks for the
    experiment's gpus; evaluate for one GPU, host memory for the bf16 weights passing through, the
    weights and KV cache within the smallest GPU docs/gpu.md names, and a walltime covering the
    generation at a slow rate (the base, base + adapter and merged models)."""
    planned = _planned_resources(tmp_path)
    for preset in PRESETS:
        config = yaml.safe_load(preset.read_text())
        exp = resolve(config, config["run"][0])
        shape = SHAPES[exp.model.id]
        train, res = planned["train", exp.name], planned["evaluate", exp.name]
        assert int(train["gpu"]) == exp.gpus >= 1, (preset.name, train)
        assert int(res["gpu"]) == 1, (preset.name, res)
        # as xtuner convert merge: fp16 keeps LoRA updates that bf16 rounds away (docs/gpu.md)
        assert exp.merge.dtype == "float16", preset.name
        weights = inference_bytes(shape, 2, 0, 0)
        assert int(res["mem_mb"]) * 2**20 >= weights + 4 * GiB, (preset.name, weights / GiB, res["mem_mb"])
        ev = exp.evaluation
        longest = 512 + max(ev.max_new_tokens, ev.general_max_new_tokens)
        gpu = inference_bytes(shape, 2, ev.batch_size, longest)
        assert gpu <= 0.9 * SMALLEST_GPU, (preset.name, gpu / GiB)
        general = len(evalsets.load(ev.general_questions, split="eval")) if ev.general_questions else 0
        batches = -(-len(ev.prompts) // ev.batch_size)
        decode = 3 * batches * ev.max_new_tokens + 2 * -(-general // ev.batch_size) * ev.general_max_new_tokens
        minutes = (decode / DECODE_STEPS_PER_S + 3 * weights / LOAD_BYTES_PER_S) / 60
        assert int(res["runtime"]) >= minutes, (preset.name, res["runtime"], minutes)


def test_zero2_bucket_is_sized_from_the_trainable_parameters():
    """DeepSpeed's default bucket (5e8 elements: 2 GB of fp32 per rank) is allocated whatever the model
    trains; the recipe's holds the LoRA weights, within DeepSpeed's default at most."""
    from snaketune.train import deepspeed_config, training_autocast

    cfg = TrainConfig.from_dict(TINY)
    zero = deepspeed_config(cfg, 3_000_000)["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 3_000_000
    assert deepspeed_config(cfg, 10**10)["zero_optimization"]["reduce_bucket_size"] == 5 * 10**8
    assert not hasattr(training_autocast("cpu"), "fast_dtype")  # fp32 on the CPU, where bf16 is slow
