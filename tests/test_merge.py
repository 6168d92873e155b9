"""merge, shard by shard: equal to PEFT's merge_and_unload, in bounded memory, refusing what does not fit.

The adapter is XTuner's own conversion of a real checkpoint (tests/fixtures/xtuner-0.2.0, r=8);
the large model is written here with random weights, straight to safetensors shards.
"""

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from snaketune.adapter import adapter_config, save_adapter
from snaketune.config import ExportConfig, LoraConfig, MergeConfig
from snaketune.errors import CheckpointError, ConfigError
from snaketune.merge import merge

from .helpers import ROOT, TINY_BASE, XTUNER, run_cli

ADAPTER = XTUNER / "adapter_plain"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def merged_state(directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(directory.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def peft_merged(base, adapter, dtype) -> dict[str, torch.Tensor]:
    """The reference: transformers loads the whole base, PEFT merges the adapter into it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {
        k: v for k, v in merged.state_dict().items() if not (k == "lm_head.weight" and model.config.tie_word_embeddings)
    }


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_merge_equals_peft_merge_and_unload(tmp_path, dtype):
    """On the CPU both add the same fp32 delta (B @ A * alpha/r) to the weight in its dtype, rounding
    once: the merged weights are identical, not merely close, in fp32, fp16 and bf16."""
    out = tmp_path / "merged"
    merge(TINY_BASE, ADAPTER, out, "internlm2_chat", MergeConfig(dtype=dtype))
    ours, reference = merged_state(out), peft_merged(TINY_BASE, ADAPTER, getattr(torch, dtype))
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours), [
        k for k in ours if not torch.equal(ours[k], reference[k])
    ]
    assert {t.dtype for t in ours.values()} == {getattr(torch, dtype)}
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype


def test_an_adapter_peft_wrote_with_an_embedding_lora_merges_as_peft_merges_it(tmp_path):
    """PEFT's own adapter with LoRA on the (tied) embedding, which it saves with the embedding whole,
    and on q_proj with another rank and alpha (rank_pattern, alpha_pattern), random B: the merged
    weights equal merge_and_unload's."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY_BASE, dtype=torch.float32)
    config = PeftLoraConfig(
        r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False,
        rank_pattern={"q_proj": 2}, alpha_pattern={"q_proj": 3},
    )  # fmt: skip
    get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    merge(TINY_BASE, tmp_path / "adapter", tmp_path / "merged", "internlm2_chat", MergeConfig())
    ours, reference = merged_state(tmp_path / "merged"), peft_merged(TINY_BASE, tmp_path / "adapter", torch.float32)
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["rank_pattern"] == {"q_proj": 2}


def tiny_llama(path, hidden: int) -> None:
    """A 2-layer Llama of another width, with the tiny model's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(TINY_BASE / name, path / name)


def test_an_adapter_for_another_model_is_refused_before_anything_is_written(tmp_path):
    other = tmp_path / "other"
    tiny_llama(other, hidden=32)
    out = tmp_path / "new" / "merged"  # writing would begin by making its directory
    with pytest.raises(CheckpointError) as err:
        merge(other, ADAPTER, out, "internlm2_chat", MergeConfig())
    message = err.value.one_line()
    assert "model.layers.0.mlp.down_proj's LoRA update is [64, 128]" in message, message
    assert f"{other}'s model.layers.0.mlp.down_proj.weight is [32, 64]" in message
    assert "adapter_config.json names ./base" in message
    assert not out.parent.exists()


def test_another_name_with_fitting_shapes_merges_with_a_warning(tmp_path, caplog):
    renamed = tmp_path / "renamed"
    shutil.copytree(TINY_BASE, renamed)
    with caplog.at_level(logging.WARNING, logger="snaketune.merge"):
        merge(TINY_BASE, ADAPTER, tmp_path / "same", "internlm2_chat", MergeConfig())
        assert not caplog.records  # ./base is the tiny model's directory name: no warning
        merge(renamed, ADAPTER, tmp_path / "merged", "internlm2_chat", MergeConfig())
    assert [r.getMessage() for r in caplog.records] == [
        f"{ADAPTER} was made for ./base; merging it into {renamed}, whose shapes fit"
    ]
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_an_adapter_whose_config_says_another_rank_is_refused(tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(ADAPTER, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 16}))
    with pytest.raises(
        CheckpointError, match=r"adapter_config.json says r=16 but .*down_proj.lora_A.weight is \[8, 128\] \(rank 8\)"
    ):
        merge(TINY_BASE, adapter, tmp_path / "merged", "internlm2_chat", MergeConfig())
    assert not (tmp_path / "merged").exists()


def test_a_base_with_only_pickled_weights_needs_allow_pickle(tmp_path):
    from safetensors.torch import load_file

    base = tmp_path / "base"
    shutil.copytree(TINY_BASE, base)
    torch.save(load_file(base / "model.safetensors"), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"pytorch_model.bin: the base model's weights are pickled .* --allow-pickle"):
        merge(base, ADAPTER, tmp_path / "refused", "internlm2_chat", MergeConfig())
    assert not (tmp_path / "refused").exists()
    merge(base, ADAPTER, tmp_path / "merged", "internlm2_chat", MergeConfig(), allow_pickle=True)
    merge(TINY_BASE, ADAPTER, tmp_path / "reference", "internlm2_chat", MergeConfig())
    assert merged_state(tmp_path / "merged").keys() == merged_state(tmp_path / "reference").keys()
    assert all(
        torch.equal(merged_state(tmp_path / "merged")[k], v) for k, v in merged_state(tmp_path / "reference").items()
    )


def test_allow_pickle_trusts_a_bin_to_hold_weights_not_to_run_code(tmp_path):
    from safetensors.torch import load_file

    ran = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(ran),))

    base = tmp_path / "base"
    shutil.copytree(TINY_BASE, base)
    torch.save({**load_file(base / "model.safetensors"), "payload": Payload()}, base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    out = tmp_path / "merged"
    res = run_cli("merge", base, ADAPTER, out, "--template", "internlm2_chat", "--allow-pickle", check=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    line = res.stderr.strip().splitlines()[-1]
    assert f"RefusedPickle: {base / 'pytorch_model.bin'}: refused to load: it holds more than tensors" in line, line
    assert "GLOBAL posix.mkdir" in line and not ran.exists() and not out.exists()


def test_cli_usage_errors_and_local_paths_never_go_to_a_hub(tmp_path):
    res = run_cli("merge", "a", "b", check=False, cwd=tmp_path)
    assert res.returncode == 2 and "OUTPUT is missing" in res.stderr.splitlines()[-1]
    res = run_cli("merge", "a", "b", "c", check=False, cwd=tmp_path)  # no config here to take a template from
    assert (
        res.returncode == 2
        and "give --template NAME with BASE ADAPTER OUTPUT: there is no config" in res.stderr.splitlines()[-1]
    )
    start = time.monotonic()
    res = run_cli("merge", "a", "b", "c", "--template", "internlm2_chat", check=False, cwd=tmp_path)
    assert res.returncode == 1 and "no such model directory: a" in res.stderr
    assert "Traceback" not in res.stderr and "huggingface" not in res.stderr.lower()
    assert time.monotonic() - start < 60 and not (tmp_path / "c").exists()


def test_cli_writes_shards_of_max_shard_size_that_transformers_loads(tmp_path):
    """Shards of at most 50 kB of tensors (a larger tensor alone in its own, as transformers splits),
    their index, and the same weights as one unsharded merge; transformers loads them."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    sharded, whole = tmp_path / "sharded", tmp_path / "whole"
    options = ("--template", "internlm2_chat", "--max-shard-size", "50kB", "--device", "cpu")
    run_cli("merge", TINY_BASE, ADAPTER, sharded, *options)
    merge(TINY_BASE, ADAPTER, whole, "internlm2_chat", MergeConfig())
    files = sorted(sharded.glob("model-*.safetensors"))
    assert len(files) > 2 and not (sharded / "model.safetensors").exists()
    for f in files:
        with safe_open(f, "pt") as shard:
            sizes = [shard.get_tensor(k).nbytes for k in shard.keys()]
        assert len(sizes) == 1 or sum(sizes) <= 50_000, (f.name, sizes)
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(set(weight_map.values())) == [f.name for f in files]
    ours, reference = merged_state(sharded), merged_state(whole)
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)
    loaded = AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in ours.items())


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: tests/test_gpu.py merges on it")
def test_device_cuda_without_a_gpu_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "new" / "merged"
    res = run_cli("merge", TINY_BASE, ADAPTER, out, "--template", "internlm2_chat", "--device", "cuda", check=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "--device cuda: no CUDA GPU is available here; use --device cpu" in res.stderr.strip().splitlines()[-1]
    assert not out.parent.exists()


def test_stale_temporary_directories_of_this_output_are_removed(tmp_path):
    import fcntl

    out = tmp_path / "merged"
    stale, busy = tmp_path / ".merged.k1lled_1.tmp", tmp_path / ".merged.running1.tmp"
    others = [
        tmp_path / ".merged.v2.abcdefgh.tmp",
        tmp_path / ".merged2.abcdefgh.tmp",
        tmp_path / ".adapter.abcdefgh.tmp",
    ]
    for d in [stale, busy, *others]:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    lock = os.open(busy, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)  # a writer that is still alive
    try:
        merge(TINY_BASE, ADAPTER, out, "internlm2_chat", MergeConfig())
    finally:
        os.close(lock)
    assert not stale.exists() and busy.exists() and all(d.exists() for d in others)
    assert (out / "model.safetensors").is_file()


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    """The output on a 4 MiB tmpfs (mounted in a user and mount namespace of the test's own, as
    test_faults does), too small for the 13 MB merged model: one line naming the output and the
    reason; neither the output nor its temporary directory is left."""
    from .helpers import missing

    if not shutil.which("unshare") or subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode:
        missing("unshare -Urm (user and mount namespaces) to mount a small tmpfs without root")
    small = tmp_path / "small"
    small.mkdir()
    mount_and_merge = 'mount -t tmpfs -o size=4m tmpfs "$0" || exit 99; "$@"; rc=$?; ls -A "$0" >"$0.files"; exit $rc'
    merge_cmd = [sys.executable, "-m", "snaketune.cli", "merge", TINY_BASE, ADAPTER, small / "merged", "--template", "internlm2_chat"]  # fmt: skip
    res = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", mount_and_merge, small, *merge_cmd], capture_output=True, text=True
    )
    assert res.returncode == 1, res.stderr[-3000:]
    assert f"CheckpointError: writing {small / 'merged'} failed: no space left on device" in res.stderr.splitlines()[-1]
    assert "Traceback" not in res.stderr and (tmp_path / "small.files").read_text() == ""


# ---------------------------------------------------------------- a model of over 1 GB in 5 shards

WIDE = dict(hidden=2048, intermediate=5504, layers=7, vocab=49152)


@pytest.fixture(scope="module")
def large_model(tmp_path_factory):
    return write_large_model(tmp_path_factory.mktemp("large"))


def write_large_model(root):
    """A Llama of 555 M parameters in fp16 (1.11 GB) in 5 shards of at most 300 MB, random weights
    written straight to safetensors, and a random r=8 adapter on all its linear layers."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    base, adapter = root / "base", root / "adapter"
    h, i, n, v = WIDE["hidden"], WIDE["intermediate"], WIDE["layers"], WIDE["vocab"]
    config = LlamaConfig(
        vocab_size=v, hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=16,
        num_key_value_heads=16, tie_word_embeddings=False, dtype="float16",
    )  # fmt: skip
    config.save_pretrained(base)
    for name in TOKENIZER_FILES:
        shutil.copy(TINY_BASE / name, base / name)
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    linear = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}  # fmt: skip
    for layer in range(n):
        shapes.update({f"model.layers.{layer}.{m}.weight": s for m, s in linear.items()})
        shapes.update(
            {f"model.layers.{layer}.{m}.weight": (h,) for m in ("input_layernorm", "post_attention_layernorm")}
        )
    gen = torch.Generator().manual_seed(0)
    pool = torch.empty(1 << 25, dtype=torch.float16).uniform_(-0.02, 0.02, generator=gen)

    def weight(shape):  # the pool from a random offset, repeated: each tensor differs, and it is quick
        n = math.prod(shape)
        shift = int(torch.randint(len(pool), (), generator=gen))
        return pool.roll(shift).repeat(-(-n // len(pool)))[:n].view(shape)

    meta = {k: torch.empty(s, dtype=torch.float16, device="meta") for k, s in shapes.items()}
    split = split_torch_state_dict_into_shards(meta, max_shard_size="300MB")
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: weight(shapes[k]) for k in keys}, base / filename)
    index = {"metadata": {"total_size": sum(t.nbytes for t in meta.values())}, "weight_map": split.tensor_to_filename}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    lora = {}
    for key, (out_features, in_features) in ((k, s) for k, s in shapes.items() if len(s) == 2 and "layers" in k):
        module = f"base_model.model.{key.removesuffix('.weight')}"
        lora[f"{module}.lora_A.weight"] = torch.randn(8, in_features, generator=gen) * 0.01
        lora[f"{module}.lora_B.weight"] = torch.randn(out_features, 8, generator=gen) * 0.01
    lora_config = LoraConfig(r=8, alpha=16, dropout=0.0, target_modules="all-linear")
    save_adapter(lora, adapter, adapter_config(lora_config, lora, str(base)), ExportConfig())
    shard_sizes = [f.stat().st_size for f in base.glob("*.safetensors")]
    assert sum(shard_sizes) > 1.1e9 and len(shard_sizes) >= 4
    return base, adapter, max(shard_sizes), sum(f.stat().st_size for f in adapter.iterdir())


# The peak RSS of this program (VmHWM): ru_maxrss would also count the parent's memory at the fork.
MERGE_AND_REPORT_PEAK = """
import re, sys
from pathlib import Path
from snaketune.config import MergeConfig
from snaketune.merge import merge
merge(sys.argv[1], sys.argv[2], sys.argv[3], "internlm2_chat", MergeConfig())
print(int(re.search(r"VmHWM:\\s*(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024)
"""


@pytest.mark.slow
def test_a_large_model_merges_in_bounded_memory_equal_to_peft_and_survives_a_kill(large_model, tmp_path):
    """Killed while writing, a merge leaves no output (only its temporary directory, which the rerun
    removes); the rerun's peak RSS stays within the largest shard x 2 + the adapter + 400 MB, whatever
    the model's size, and its weights equal PEFT's merge_and_unload (of the first layer, the embedding,
    the norm and the head: the other layers are merged by the same code)."""
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    base, adapter, largest, adapter_bytes = large_model
    out = tmp_path / "merged"
    argv = [sys.executable, "-c", MERGE_AND_REPORT_PEAK, base, adapter, out]
    killed = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".merged.*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not out.exists() and len(list(tmp_path.glob(".merged.*.tmp"))) == 1

    res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True)
    peak = int(res.stdout.split()[-1])
    assert peak <= 2 * largest + adapter_bytes + 400e6, (peak, largest)
    assert not list(tmp_path.glob(".merged.*.tmp"))
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) >= 4

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16, num_hidden_layers=1)
    reference = PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    assert len(reference) == 12 and sum(".layers.0." in k for k in reference) == 9
    for key, tensor in reference.items():
        with safe_open(out / weight_map[key], "pt") as f:
            assert torch.equal(f.get_tensor(key), tensor), key
