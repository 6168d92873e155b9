"""QLoRA training throughput, peak GPU memory and MFU for InternLM2-chat-1.8B's shapes, on one GPU.

No model can be downloaded on the GPU machine, so this builds a random-weight Llama with the
shapes InternLM2-chat-1.8B has after snaketune's conversion to Llama (``snaketune.internlm.
llama_config`` of the hub config below), saves it, and trains it with the recipe's own pieces:

- ``snaketune.train.setup_distributed`` (one rank; NCCL on a GPU, gloo on a CPU),
- ``snaketune.train.build_engine``: ``snaketune.model.load_for_training`` (4-bit NF4 with double
  quantization, bf16 compute on the GPU, LoRA on all linear layers, gradient checkpointing) wrapped
  in DeepSpeed ZeRO-2 with AdamW and the recipe's LR schedule,
- ``snaketune.train.train_window``: one optimizer step over ``--acc`` micro-batches.

The rows are random token ids, ``--seq`` tokens each (2048, XTuner's max_length), every token
supervised, no padding: the tokenizer plays no part in the speed. Times are wall-clock per optimizer
step (each step ends with ``.item()``, so the GPU has finished), after ``--warmup-steps`` untimed
steps.

MFU = 6 * N * tokens_per_s / peak, N = the base model's parameter count (embedding and untied output
layer included, LoRA weights not), peak = the card's dense bf16 rate from the vendor's datasheet
(H100 SXM / H200: 989 TFLOP/s). Attention's own FLOPs are not counted. For QLoRA with gradient
checkpointing 6N also happens to be roughly the work done: forward 2N, recomputed forward 2N,
backward to the inputs 2N (no weight gradients for the frozen 4-bit base).
The rate of a plain 8192^3 bf16 matmul on the same card is measured too, as a practical ceiling.

    python bench/gpu_bench.py                 # on the GPU machine (bench/gpu_check.sh runs it)
    python bench/gpu_bench.py --tiny          # tiny shapes, any machine (CPU: fp32 compute)

Writes JSON to --out (default $OUT/gpu_bench.json where OUT is set, else
bench/results/gpu_bench.json; with --tiny the file is named gpu_bench_tiny.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout that is not installed
    sys.path.insert(0, str(ROOT))

# internlm/internlm2-chat-1_8b's config.json (the fields the conversion reads).
INTERNLM2_CHAT_1_8B = {
    "architectures": ["InternLM2ForCausalLM"],
    "model_type": "internlm2",
    "bias": False,
    "hidden_size": 2048,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "intermediate_size": 8192,
    "vocab_size": 92544,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000,
    "rope_scaling": {"type": "dynamic", "factor": 2.0},
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "initializer_range": 0.02,
    "torch_dtype": "bfloat16",
}
# The same family, scaled down: to test this script's path on any machine.
TINY = {
    **INTERNLM2_CHAT_1_8B,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 256,
    "vocab_size": 1024,
    "max_position_embeddings": 512,
}

# Dense bf16 tensor-core peak (no sparsity), TFLOP/s, by the vendors' datasheets. First match wins.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L4", 121.0),
]


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value
    return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_out(tiny: bool) -> Path:
    name = "gpu_bench_tiny.json" if tiny else "gpu_bench.json"
    return Path(os.environ["OUT"]) / name if os.environ.get("OUT") else ROOT / "bench" / "results" / name


def versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "deepspeed", "accelerate"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def matmul_tflops(device: str) -> float | None:
    """bf16 8192^3 matmul rate on random data (median of 10 after 3 warm-ups), GPU only."""
    import torch

    if device != "cuda":
        return None
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e12


def autocast_dtype(device: str) -> str | None:
    """What :func:`snaketune.train.training_autocast` gives this device: the dtype, or None (fp32)."""
    from snaketune.train import training_autocast

    ctx = training_autocast(device)
    return str(ctx.fast_dtype).replace("torch.", "") if hasattr(ctx, "fast_dtype") else None


def build_random_model(hub_config: dict, model_dir: Path, device: str) -> dict[str, int]:
    """Save a random-weight Llama of the converted shapes (in the compute dtype); its parameter counts."""
    import torch
    from transformers import AutoModelForCausalLM

    from snaketune.internlm import llama_config
    from snaketune.model import compute_dtype

    config = llama_config(hub_config)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: seconds instead of minutes on the CPU
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype(device))
    counts = {
        "params": sum(p.numel() for p in model.parameters()),
        "embedding_params": model.get_input_embeddings().weight.numel(),
        "output_layer_params": model.get_output_embeddings().weight.numel(),
    }
    model.save_pretrained(model_dir)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return counts


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes (any machine, CPU included)")
    p.add_argument("--out", type=Path, help="JSON output (default: $OUT/gpu_bench.json or bench/results/)")
    p.add_argument("--seq", type=int, help="tokens per row (default 2048; tiny 128)")
    p.add_argument("--batch-size", type=int, default=1, help="rows per micro-batch (default %(default)s)")
    p.add_argument("--acc", type=int, default=4, help="micro-batches per optimizer step (default %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=1, help="untimed optimizer steps (default %(default)s)")
    p.add_argument("--steps", type=int, help="timed optimizer steps (default 5; tiny 2)")
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--model-dir", type=Path, help="where the random model is saved (default: a temporary dir)")
    args = p.parse_args(argv)
    seq = args.seq or (128 if args.tiny else 2048)
    steps = args.steps or (2 if args.tiny else 5)
    out = args.out or default_out(args.tiny)
    hub = TINY if args.tiny else INTERNLM2_CHAT_1_8B
    t_start = time.time()

    import torch
    import torch.distributed as dist

    from snaketune.config import LoraConfig, TrainConfig
    from snaketune.devices import training_dtype
    from snaketune.train import (
        Plan,
        build_engine,
        setup_distributed,
        train_window,
        window_ends,
    )

    device = setup_distributed(args.threads)
    card = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    peak = peak_tflops(card) if device == "cuda" else None
    print(f"device: {device} ({card}); versions: {versions()}", flush=True)
    ceiling = matmul_tflops(device)

    # Rank 0 builds the model (under torchrun the ranks share it) and says where and how big.
    tmp = None
    model_dir = args.model_dir
    if model_dir is None and dist.get_rank() == 0:
        tmp = Path(tempfile.mkdtemp(prefix="gpu_bench_model_"))
        model_dir = tmp / "model"
    t0 = time.time()
    counts = build_random_model(hub, model_dir, device) if dist.get_rank() == 0 else None
    shared = [model_dir, counts]
    dist.broadcast_object_list(shared, src=0)
    model_dir, counts = shared
    build_s = time.time() - t0

    total_iters = (args.warmup_steps + steps) * args.acc
    cfg = TrainConfig(
        template="internlm2_chat",
        max_length=seq,
        batch_size=args.batch_size,
        accumulative_counts=args.acc,
        max_epochs=1,
        lr=2e-4,
        warmup_ratio=0.0,
        lora=LoraConfig(r=args.r, alpha=args.alpha, dropout=args.dropout, target_modules="all-linear"),
        quantization="nf4",
        gradient_checkpointing=not args.no_gradient_checkpointing,
    )
    plan = Plan(
        rows=[], stats={}, iters_per_epoch=total_iters, total_iters=total_iters, ends=window_ends(total_iters, args.acc)
    )
    t0 = time.time()
    engine, _, _ = build_engine(model_dir, cfg, plan, device, trust_remote_code=False)
    load_s = time.time() - t0
    dist.barrier()  # every rank has loaded it
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    trainable = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
    import bitsandbytes as bnb

    n4bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in engine.module.modules())
    # What stays unquantized (embedding, output layer, norms) and in which dtype: peft's
    # prepare_model_for_kbit_training casts it to fp32, which sets the dtype of the residual stream.
    other_dtypes: dict[str, int] = {}
    for prm in engine.module.parameters():
        if not prm.requires_grad and not isinstance(prm, bnb.nn.Params4bit):
            key = str(prm.dtype).replace("torch.", "")
            other_dtypes[key] = other_dtypes.get(key, 0) + prm.numel()
    if device == "cuda":
        load_peak = torch.cuda.max_memory_allocated()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        after_load = torch.cuda.memory_allocated()

    gen = torch.Generator().manual_seed(0)
    vocab = hub["vocab_size"]

    def micro_batch():
        ids = torch.randint(0, vocab, (args.batch_size, seq), generator=gen)
        return ids, ids.clone(), torch.arange(seq).expand(args.batch_size, seq).contiguous()

    tokens_per_step = args.batch_size * seq * args.acc
    engine.train()
    step_rows = []
    for step in range(args.warmup_steps + steps):
        window = [micro_batch() for _ in range(args.acc)]
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        row = train_window(engine, window, tokens_per_step)  # ends in .item(): the step has finished
        dt = time.perf_counter() - t0
        step_rows.append(
            {
                "step": step + 1,
                "timed": step >= args.warmup_steps,
                "seconds": dt,
                "tokens_per_s": tokens_per_step / dt,
                "loss": row["loss"],
                "grad_norm": row["grad_norm"],
            }
        )
        print(
            f"step {step + 1}{' (warm-up)' if step < args.warmup_steps else ''}: {dt:.3f} s, "
            f"{tokens_per_step / dt:.0f} tok/s, loss {row['loss']:.4f}",
            flush=True,
        )
    timed = [r for r in step_rows if r["timed"]]
    seconds = sum(r["seconds"] for r in timed)
    tok_s = tokens_per_step * len(timed) / seconds
    flops_per_token = 6 * counts["params"]
    achieved = flops_per_token * tok_s / 1e12

    result = {
        "benchmark": "QLoRA training step (snaketune recipe: NF4 + LoRA + DeepSpeed ZeRO-2), random weights",
        "shapes": "InternLM2-chat-1.8B converted to Llama" if not args.tiny else "tiny (test of this script)",
        "device": device,
        "card": card,
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability())) if device == "cuda" else None,
        "versions": versions(),
        "settings": {
            "hub_config": hub,
            "seq_len": seq,
            "batch_size": args.batch_size,
            "accumulative_counts": args.acc,
            "tokens_per_optimizer_step": tokens_per_step,
            "warmup_steps": args.warmup_steps,
            "timed_steps": steps,
            "quantization": "nf4 + double quantization",
            # the 4-bit matmuls' (snaketune.devices.training_dtype)
            "compute_dtype": training_dtype(device, device == "cuda" and torch.cuda.is_bf16_supported()),
            # the forward pass outside the 4-bit matmuls (snaketune.train.training_autocast)
            "autocast": autocast_dtype(device),
            "attention_implementation": getattr(engine.module.config, "_attn_implementation", None),
            "reduce_bucket_elements": engine.zero_reduce_bucket_size(),
            "lora": {"r": args.r, "alpha": args.alpha, "dropout": args.dropout, "target_modules": "all-linear"},
            "gradient_checkpointing": not args.no_gradient_checkpointing,
            "optimizer": "torch AdamW (fp32 LoRA weights)",
            "zero_stage": 2,
            "world_size": dist.get_world_size(),
            "attention": "sdpa, causal, no padding",
        },
        "model": {
            **counts,
            "trainable_lora_params": trainable,
            "linear4bit_layers": n4bit,
            "unquantized_frozen_params_by_dtype": other_dtypes,
        },
        "figures": {
            "tokens_per_s": tok_s,
            "seconds_per_optimizer_step": seconds / len(timed),
            "peak_memory_train_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
            "peak_memory_train_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
            "peak_memory_build_and_load_gib": load_peak / 2**30 if device == "cuda" else None,
            "memory_after_load_gib": after_load / 2**30 if device == "cuda" else None,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if device == "cuda" else None,
            "peak_rss_gib_cpu_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "model_tflops_per_s": achieved,
            "mfu": achieved / peak if peak else None,
            "mfu_formula": "6 * params * tokens_per_s / peak_bf16_dense (params: base model incl. embedding and "
            "output layer; attention FLOPs not counted)",
            "peak_bf16_dense_tflops": peak,
            "measured_bf16_matmul_tflops": ceiling,
            "fraction_of_measured_matmul": achieved / ceiling if ceiling else None,
            "build_model_s": build_s,
            "load_quantize_s": load_s,
            "total_s": time.time() - t_start,
        },
        "steps": step_rows,
    }
    if dist.get_rank() != 0:  # on several ranks (torchrun) the figures are per rank, and rank 0's are written
        dist.barrier()
        dist.destroy_process_group()
        return result
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    f = result["figures"]
    print(
        f"\n{card}: {counts['params'] / 1e6:.1f} M params, {trainable / 1e6:.2f} M LoRA params, "
        f"{n4bit} Linear4bit layers"
    )
    print(
        f"tokens/s {tok_s:.0f} | s/step {f['seconds_per_optimizer_step']:.3f} ({tokens_per_step} tokens) | "
        f"model TFLOP/s {achieved:.1f} | MFU {f['mfu'] if f['mfu'] is None else format(f['mfu'], '.1%')} | "
        f"peak mem {f['peak_memory_train_gib'] and format(f['peak_memory_train_gib'], '.2f')} GiB | "
        f"matmul ceiling {ceiling and format(ceiling, '.0f')} TFLOP/s | total {f['total_s']:.0f} s"
    )
    print(f"wrote {out}")
    if any(not (r["loss"] == r["loss"]) for r in step_rows):  # NaN
        raise SystemExit("a loss was NaN")
    dist.barrier()
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
