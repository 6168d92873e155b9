"""snaketune's trainer vs a plain Hugging Face Trainer + PEFT QLoRA baseline, side by side.

Both arms train the same encoded samples (snaketune's encoding of the experiment's data file) with
the same settings: NF4 + double quantization, LoRA r / alpha / dropout on all linear layers, AdamW
with the same lr, betas, weight decay and gradient clipping, linear warm-up then cosine, batch size,
accumulation, epochs and seed; fp32 compute on a CPU, bf16 on a GPU (CUDA NF4). Runs alternate
A B A B ... (each a fresh process), so both arms see the same machine conditions.

- **snaketune**: ``snaketune.train.train``, the function the workflow's train step runs (DeepSpeed
  ZeRO-2, checkpoints, everything), with the experiment's settings (evaluation during training off).
- **hf**: written the way the transformers / PEFT documentation shows QLoRA:
  ``BitsAndBytesConfig`` -> ``from_pretrained`` -> ``prepare_model_for_kbit_training`` (gradient
  checkpointing on, PEFT's default) -> ``get_peft_model(LoraConfig(...))`` -> ``Trainer`` with
  ``DataCollatorForSeq2Seq`` (pads each batch to its longest sample), ``lr_scheduler_type="cosine"``
  and the same number of warm-up steps, default optimizer (fused AdamW), no checkpoints.
- **hf_no_checkpointing**: the same, with ``prepare_model_for_kbit_training(model,
  use_gradient_checkpointing=False)``: what a user who knows the activations fit would run.

The data file's ``loss: kl`` marks are removed, so every arm trains cross-entropy on every record;
with ``--kl`` snaketune trains its replay rows with loss kl as the workflow does (the baselines have
no such term), which is the trainer's speed on the default mixture as it ships.

Figures per run: training seconds (the optimizer steps: batch making, forward, backward, optimizer;
not model loading, checkpoint writing or evaluation), real (unpadded) tokens per second, the padding
share of the batches, peak memory (the process's peak RSS up to the end of training, model loading
included; on a GPU ``torch.cuda.max_memory_allocated``), the last step's loss, and the final model's
loss on all training samples (both arms computed the same way after training: the fair "final loss").

    python bench/trainer_vs_hf.py                         # the default experiment (after its data and model exist)
    python bench/trainer_vs_hf.py --kl                    # snaketune with its kl rows
    python bench/trainer_vs_hf.py --runs 3 --set train.gradient_checkpointing=true   # one lever off
    python bench/trainer_vs_hf.py --gpu                   # on a GPU: InternLM2-1.8B shapes, 2048-token packed rows
    python bench/trainer_vs_hf.py --gpu --tiny --runs 1   # the GPU mode's code path on any machine

Writes bench/results/trainer_vs_hf.json (``--gpu``: trainer_vs_hf_gpu.json; under $OUT when set)
and prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout that is not installed (the GPU machine)
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# hf: the documented recipe (gradient checkpointing on, as prepare_model_for_kbit_training sets it);
# hf_no_checkpointing: the same with use_gradient_checkpointing=False, as a user who knows the
# activations fit would run it
ARMS = ("snaketune", "hf", "hf_no_checkpointing")
# Not run by default: the baseline on the allocator snaketune's train step preloads (train.allocator),
# to show what the allocator alone does for it (--arms snaketune,hf,hf_tcmalloc).
EXTRA_ARMS = ("hf_tcmalloc",)


# ---------------------------------------------------------------- machine and memory


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, and whether it has AVX-512 (it changes the speed)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = "with AVX512-BF16" if "avx512_bf16" in info else "with AVX-512" if "avx512f" in info else "without AVX-512"
    return f"{name or 'unknown CPU'}, {os.cpu_count()} cores, {flags}"


def result_header(what: str, command: str) -> dict:
    """What every result file starts with: what was measured, how, where, when, at which commit."""
    from datetime import date

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {
        "what": what,
        "command": command,
        "machine": cpu_model(),
        "date": date.today().isoformat(),
        "commit": commit.stdout.strip(),
    }


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def busiest_processes(n: int = 4) -> list[str]:
    """What else used the CPU when a run started (ps, highest %CPU first), to judge the figures."""
    try:
        out = subprocess.run(
            ["ps", "-eo", "pcpu,comm", "--sort=-pcpu"], check=False, capture_output=True, text=True
        ).stdout
    except OSError:
        return []
    return [" ".join(line.split()) for line in out.splitlines()[1 : n + 1]]


# ---------------------------------------------------------------- what both arms train on


def encoded_samples(data_file: Path, tokenizer, cfg):
    from snaketune.batching import encode_dataset
    from snaketune.data import read_records

    samples, _ = encode_dataset(read_records(data_file), tokenizer, cfg)
    return samples


def hf_rows(spec: dict, tokenizer, cfg) -> list[dict]:
    """The samples the HF arm trains on: snaketune's encoding; with packing, snaketune's packed rows
    (position ids restart per sample: transformers then attends block-diagonally, as in snaketune)."""
    from snaketune.batching import as_rows, pack

    samples = encoded_samples(Path(spec["data_file"]), tokenizer, cfg)
    rows = pack(samples, cfg.max_length, cfg.seed) if cfg.pack_to_max_length else as_rows(samples)
    if cfg.pack_to_max_length:
        return [{"input_ids": r.input_ids, "labels": r.labels, "position_ids": r.position_ids} for r in rows]
    return [{"input_ids": r.input_ids, "labels": r.labels} for r in rows]


def final_data_loss(model, samples, pad_id: int, device: str, batch_size: int = 8) -> float:
    """Token-weighted loss of the trained model on every training sample (eval mode, no dropout),
    the same computation for both arms."""
    import torch
    import torch.nn.functional as F

    from snaketune.model import keep_4bit_weights_trainable

    keep_4bit_weights_trainable(model)  # the same 4-bit path as training (no CPU inference repacking)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            chunk = samples[i : i + batch_size]
            width = max(len(s.input_ids) for s in chunk)
            ids = torch.tensor([s.input_ids + [pad_id] * (width - len(s.input_ids)) for s in chunk], device=device)
            labels = torch.tensor([s.labels + [-100] * (width - len(s.labels)) for s in chunk], device=device)
            mask = torch.tensor(
                [[1] * len(s.input_ids) + [0] * (width - len(s.input_ids)) for s in chunk], device=device
            )
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            total += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
            ).item()
            count += int((labels[:, 1:] != -100).sum())
    return total / count


# ---------------------------------------------------------------- the arms (each in its own process)


def run_snaketune(spec: dict) -> dict:
    import torch

    from snaketune import train as snaketune_train
    from snaketune.config import TrainConfig
    from snaketune.lora_state import read_lora_state
    from snaketune.model import load_for_training, load_tokenizer
    from snaketune.train import train

    cfg = TrainConfig.from_dict(spec["train"])
    work = Path(spec["work_dir"])
    loaded = {}
    build_engine = snaketune_train.build_engine

    def build_and_measure(*args, **kwargs):  # the peak of loading, before the first step
        out = build_engine(*args, **kwargs)
        loaded["rss"] = peak_rss_bytes()
        return out

    snaketune_train.build_engine = build_and_measure
    summary = train(spec["model_dir"], spec["data_file"], work, cfg, threads=spec["threads"])
    peak_rss = peak_rss_bytes()
    peak_gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    metrics = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    seconds = sum(m["time_s"] for m in metrics)
    tokens, real = sum(m["tokens"] for m in metrics), sum(m["real_tokens"] for m in metrics)

    from peft import set_peft_model_state_dict

    tok = load_tokenizer(spec["model_dir"])
    model = load_for_training(
        spec["model_dir"],
        cfg.lora,
        quantization=cfg.quantization,
        gradient_checkpointing=False,
        device=summary["device"],
    )
    set_peft_model_state_dict(model, read_lora_state(summary["checkpoint"]))
    samples = encoded_samples(Path(spec["data_file"]), tok, cfg)
    return {
        "train_s": seconds,
        "step_s": [round(m["time_s"], 4) for m in metrics],
        "optimizer_steps": len(metrics),
        "real_tokens": real,
        "tokens": tokens,
        "padding": 1 - real / tokens,
        "peak_rss": peak_rss,
        "peak_rss_loaded": loaded["rss"],
        "peak_gpu": peak_gpu,
        "final_step_loss": metrics[-1]["loss"],
        "final_data_loss": final_data_loss(model, samples, tok.pad_token_id, summary["device"]),
        "device": summary["device"],
    }


def run_hf(spec: dict) -> dict:
    """The baseline, as the transformers and PEFT docs write QLoRA fine-tuning."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    from snaketune.config import TrainConfig

    cfg = TrainConfig.from_dict(spec["train"])
    torch.set_num_threads(spec["threads"])
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    dtype = (torch.bfloat16 if bf16 else torch.float16) if cuda else torch.float32
    set_seed(cfg.seed)

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"], padding_side="right")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = hf_rows(spec, tokenizer, cfg)

    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    model = AutoModelForCausalLM.from_pretrained(
        spec["model_dir"], quantization_config=bnb_config, dtype=dtype, device_map={"": 0} if cuda else "cpu"
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec["hf_checkpointing"])
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    peak_rss_loaded = peak_rss_bytes()

    counts = {"real": 0, "tokens": 0}
    base_collator = (
        default_data_collator
        if cfg.pack_to_max_length
        else DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    )

    def collator(features):  # counts the padding; the batch is the documented collator's
        batch = base_collator(features)
        counts["real"] += sum(len(f["input_ids"]) for f in features)
        counts["tokens"] += batch["input_ids"].numel()
        return batch

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.t = [], None

        def on_train_begin(self, args, state, control, **kwargs):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            self.times.append(now - self.t)
            self.t = now

    # snaketune's warm-up: int(warmup_ratio x iterations) iterations, in optimizer steps
    iterations = -(-len(rows) // cfg.batch_size) * cfg.max_epochs
    warmup_steps = int(cfg.warmup_ratio * iterations) // cfg.accumulative_counts
    args = TrainingArguments(
        output_dir=spec["work_dir"],
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.accumulative_counts,
        num_train_epochs=cfg.max_epochs,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.betas[0],
        adam_beta2=cfg.betas[1],
        max_grad_norm=cfg.max_norm,
        lr_scheduler_type="cosine",
        warmup_steps=warmup_steps,
        seed=cfg.seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=bf16,
        fp16=cuda and not bf16,
        use_cpu=not cuda,
        dataloader_num_workers=0,
    )
    timer = StepTimes()
    try:
        from datasets import Dataset

        dataset = Dataset.from_list(rows)
    except ImportError:  # the GPU machine has no `datasets`: a list is a map-style dataset too
        dataset = rows
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[timer])
    trainer.train()
    peak_rss = peak_rss_bytes()
    peak_gpu = torch.cuda.max_memory_allocated() if cuda else None
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    samples = encoded_samples(Path(spec["data_file"]), tokenizer, cfg)
    return {
        "train_s": sum(timer.times),
        "step_s": [round(t, 4) for t in timer.times],
        "optimizer_steps": len(timer.times),
        "real_tokens": counts["real"],
        "tokens": counts["tokens"],
        "padding": 1 - counts["real"] / counts["tokens"],
        "peak_rss": peak_rss,
        "peak_rss_loaded": peak_rss_loaded,
        "peak_gpu": peak_gpu,
        "final_step_loss": losses[-1],
        "final_data_loss": final_data_loss(model, samples, tokenizer.pad_token_id, "cuda" if cuda else "cpu"),
        "device": "cuda" if cuda else "cpu",
    }


def child(arm: str, spec_file: Path, result_file: Path) -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    spec = json.loads(spec_file.read_text())
    from snaketune.launch import malloc_in_use

    result = (run_snaketune if arm == "snaketune" else run_hf)(spec)
    result["malloc"] = malloc_in_use()
    result_file.write_text(json.dumps(result))


# ---------------------------------------------------------------- the workloads


def experiment_workload(args, tmp: Path) -> dict:
    """The workflow's experiment: its settings, model directory and data file."""
    from snaketune.config import Layout, load, resolve
    from snaketune.data import LOSS_KEY, read_records, write_records

    config, name = load(args.config, args.experiment, args.set)
    exp = resolve(config, name)
    layout = Layout.of(exp)
    model_dir = Path(args.model or ROOT / layout.model_dir)
    data_file = Path(args.data or ROOT / exp.data_file)
    for path, made_by in ((model_dir, "fetch_model"), (data_file, "the data rules")):
        if not path.exists():
            raise SystemExit(
                f"{path} does not exist: run the workflow first (snakemake --cores all final_model), "
                f"or the {made_by} step by hand"
            )
    train = replace(exp.train, evaluation_inputs=[])
    name = f"experiment {name}"
    records, data_file_kl = read_records(data_file), None
    if any(LOSS_KEY in r for r in records):  # the baselines have no distillation term: they train
        if getattr(args, "kl", False):  # cross-entropy at every record's answers
            data_file_kl = str(data_file)
            name += " (snaketune: its replay rows with loss kl; the baselines: cross-entropy on every record)"
        else:
            name += " (loss kl marks removed: cross-entropy on every record in every arm)"
        data_file = tmp / "data_ce.json"
        write_records([{k: v for k, v in r.items() if k != LOSS_KEY} for r in records], data_file)
    return {
        "name": name,
        "model_dir": str(model_dir),
        "data_file": str(data_file),
        "data_file_kl": data_file_kl,
        "train": asdict(train),
        "params": None,
    }


def gpu_workload(args, tmp: Path) -> dict:
    """InternLM2-chat-1.8B's shapes with random weights (built here: no download), the SmolLM2 tokenizer
    of the test fixtures, and synthetic conversations packed into rows of 2048 tokens."""
    from gpu_bench import INTERNLM2_CHAT_1_8B, TINY, build_random_model

    from snaketune.config import LoraConfig, TrainConfig
    from snaketune.model import pick_device

    device = pick_device()
    model_dir = tmp / "model"
    fixture = ROOT / "tests/fixtures/xtuner-0.2.0/base"
    hub = INTERNLM2_CHAT_1_8B
    if args.tiny:  # tiny layers, but every id of the fixture's tokenizer must have an embedding
        hub = {**TINY, "vocab_size": json.loads((fixture / "config.json").read_text())["vocab_size"]}
    counts = build_random_model(hub, model_dir, device)
    for f in fixture.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, model_dir / f.name)
    # conversations of 60 to 900 tokens, about a third of them the answer (alpaca-like lengths)
    rnd = random.Random(0)
    words = "the of and to in is was for on that with as by at from it an be this are or which".split()
    seq = 128 if args.tiny else 2048
    n_rows = args.steps * args.acc
    records, total = [], 0
    while total < n_rows * seq * 0.97:
        q, a = rnd.randint(20, 300), rnd.randint(20, 600)
        if args.tiny:
            q, a = q // 16 + 2, a // 16 + 2
        records.append(
            {
                "conversation": [
                    {"input": " ".join(rnd.choices(words, k=q)), "output": " ".join(rnd.choices(words, k=a))}
                ]
            }
        )
        total += q + a + 12
    data_file = tmp / "conversations.json"
    data_file.write_text(json.dumps(records))
    train = TrainConfig(
        template="internlm2_chat",
        max_length=seq,
        pack_to_max_length=True,
        batch_size=1,
        accumulative_counts=args.acc,
        max_epochs=1,
        lr=2e-4,
        warmup_ratio=0.03,
        save_steps=10**9,
        lora=LoraConfig(r=64, alpha=16, dropout=0.1),
    )
    if args.set:  # the same KEY=VALUE overrides, applied to this synthetic experiment
        config, _ = load_dict({"run": ["gpu"], "experiments": {"gpu": {"train": asdict(train)}}}, args.set)
        train = TrainConfig.from_dict(config["experiments"]["gpu"]["train"])
    return {
        "name": ("tiny shapes (test of the GPU mode)" if args.tiny else "InternLM2-chat-1.8B shapes")
        + f", random weights, {seq}-token packed rows",
        "model_dir": str(model_dir),
        "data_file": str(data_file),
        "train": asdict(train),
        "params": counts,
    }


def load_dict(config: dict, sets: list[str]) -> tuple[dict, str]:
    """snaketune.config.load's overrides on a config that is not a file."""
    from snaketune.config import load

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        json.dump(config, f)
        f.flush()
        return load(f.name, None, sets)


# ---------------------------------------------------------------- runs, table


def arm_env(arm: str, workload: dict) -> dict[str, str]:
    """snaketune's arm starts in the environment its train step would give it (the allocator's preload,
    ``snaketune.launch.allocator_env``); the baseline in this one, as a user would start it."""
    from snaketune.launch import allocator_env

    setting = {"snaketune": workload["train"]["allocator"], "hf_tcmalloc": "tcmalloc"}.get(arm, "system")
    return allocator_env(setting) or dict(os.environ)


def one_run(arm: str, workload: dict, threads: int, tmp: Path, k: int) -> dict:
    work = tmp / f"{arm}_{k}"
    work.mkdir()
    spec = {
        **workload,
        "work_dir": str(work),
        "threads": threads,
        "hf_checkpointing": arm != "hf_no_checkpointing",
        # --kl: snaketune trains the mixture as the workflow does, its replay rows with loss kl
        "data_file": workload["data_file_kl"]
        if arm == "snaketune" and workload.get("data_file_kl")
        else workload["data_file"],
    }
    (work / "spec.json").write_text(json.dumps(spec))
    started = {"load_average": load_average(), "busiest": busiest_processes()}
    t0 = time.time()
    with open(work / "log.txt", "w") as log:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", arm, str(work / "spec.json"), str(work / "result.json")],
            check=False,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**arm_env(arm, workload), "TOKENIZERS_PARALLELISM": "false"},
        )
    if proc.returncode:
        raise SystemExit(f"{arm} run {k} failed; its log:\n{(work / 'log.txt').read_text()[-4000:]}")
    result = json.loads((work / "result.json").read_text())
    return {
        "arm": arm,
        "run": k,
        "wall_s": time.time() - t0,
        **started,
        **result,
        "real_tokens_per_s": result["real_tokens"] / result["train_s"],
    }


def summarize(runs: list[dict], arm: str) -> dict:
    mine = [r for r in runs if r["arm"] == arm]
    secs = [r["train_s"] for r in mine]
    med = statistics.median(secs)
    return {
        "runs": len(mine),
        "train_s_min": min(secs),
        "train_s_median": med,
        "real_tokens_per_s": statistics.median(r["real_tokens"] for r in mine) / med,
        "padding": mine[0]["padding"],
        "peak_rss_gb": max(r["peak_rss"] for r in mine) / 1e9,
        "peak_rss_loaded_gb": max(r["peak_rss_loaded"] for r in mine) / 1e9,
        "peak_gpu_gib": (max(r["peak_gpu"] for r in mine) / 2**30) if mine[0]["peak_gpu"] else None,
        "final_step_loss": statistics.median(r["final_step_loss"] for r in mine),
        "final_data_loss": statistics.median(r["final_data_loss"] for r in mine),
        "optimizer_steps": mine[0]["optimizer_steps"],
        "malloc": sorted({r["malloc"] for r in mine}),
    }


def mfu(summary: dict, params: int | None, card: str | None) -> float | None:
    from gpu_bench import peak_tflops

    peak = peak_tflops(card) if card else None
    if not (peak and params):
        return None
    return 6 * params * summary["real_tokens_per_s"] / (peak * 1e12)


def table(record: dict) -> str:
    s = record["summary"]
    gpu = record["device"] == "cuda"
    head = (
        "| arm | training s (min / median) | real tokens/s | padding | "
        + ("peak GPU memory (GiB) | MFU |" if gpu else "peak RSS (GB) |")
        + " final loss: last step / all data |"
    )
    lines = [head, "|---|---:|---:|---:|" + ("---:|---:|" if gpu else "---:|") + "---:|"]
    for arm in [a for a in ARMS + EXTRA_ARMS if a in s]:
        x = s[arm]
        mem = (
            (
                f"{x['peak_gpu_gib']:.2f} | {x['mfu']:.1%} |"
                if x.get("mfu") is not None
                else f"{x['peak_gpu_gib']:.2f} | n/a |"
            )
            if gpu
            else f"{x['peak_rss_gb']:.2f} |"
        )
        lines.append(
            f"| {arm} ({', '.join(x['malloc'])}) | {x['train_s_min']:.1f} / {x['train_s_median']:.1f} | {x['real_tokens_per_s']:.1f} | "
            f"{x['padding']:.1%} | {mem} {x['final_step_loss']:.4g} / {x['final_data_loss']:.4g} |"
        )
    for baseline in ("hf", "hf_no_checkpointing"):
        if f"speedup_over_{baseline}" in record:
            lines.append(f"\nsnaketune / {baseline} real tokens/s: **{record[f'speedup_over_{baseline}']:.2f}x**")
    lines.append(
        f"\n({record['machine']}; {record['runs_per_arm']} runs per arm, alternated; load averages at the "
        f"starts: {record['load_averages']})"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", nargs=3, metavar=("ARM", "SPEC", "RESULT"), help=argparse.SUPPRESS)
    p.add_argument("--config", default=str(ROOT / "config/config.yaml"))
    p.add_argument("--experiment", help="default: the first under run")
    p.add_argument("--model", help="default: the experiment's model directory")
    p.add_argument("--data", help="default: the experiment's data file")
    p.add_argument("--set", action="append", default=[], help="override a setting, as snaketune --set")
    p.add_argument("--runs", type=int, default=3, help="runs per arm, alternated (default %(default)s)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"default: %(default)s; also: {', '.join(EXTRA_ARMS)}")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument(
        "--kl",
        action="store_true",
        help="snaketune trains the replay rows with loss kl, as the workflow does (the baselines: cross-entropy)",
    )
    p.add_argument("--gpu", action="store_true", help="InternLM2-1.8B shapes, 2048-token packed rows")
    p.add_argument("--tiny", action="store_true", help="with --gpu: tiny shapes, any machine")
    p.add_argument("--steps", type=int, default=12, help="--gpu: optimizer steps per run (default %(default)s)")
    p.add_argument("--acc", type=int, default=1, help="--gpu: rows per optimizer step (default %(default)s)")
    p.add_argument("--out", help="JSON output (default: bench/results/trainer_vs_hf[_gpu].json, or under $OUT)")
    args = p.parse_args(argv)
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return None

    import torch

    name = "trainer_vs_hf_gpu.json" if args.gpu else "trainer_vs_hf.json"
    out = (
        Path(args.out)
        if args.out
        else (Path(os.environ["OUT"]) / name if os.environ.get("OUT") else ROOT / "bench/results" / name)
    )
    arms = [a for a in args.arms.split(",") if a]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    card = torch.cuda.get_device_name() if device == "cuda" else None
    with tempfile.TemporaryDirectory(prefix="trainer_vs_hf_") as tmp_name:
        tmp = Path(tmp_name)
        workload = gpu_workload(args, tmp) if args.gpu else experiment_workload(args, tmp)
        runs = []
        for k in range(args.runs):
            for arm in arms:
                runs.append(one_run(arm, workload, args.threads, tmp, k))
                r = runs[-1]
                print(
                    f"{arm} run {k + 1}: {r['train_s']:.1f} s, {r['real_tokens_per_s']:.1f} real tokens/s, "
                    f"padding {r['padding']:.1%}, peak RSS {r['peak_rss'] / 1e9:.2f} GB, "
                    f"loss {r['final_step_loss']:.4g} / data {r['final_data_loss']:.4g}, "
                    f"load {r['load_average']}",
                    flush=True,
                )
    summary = {arm: summarize(runs, arm) for arm in arms}
    params = (workload["params"] or {}).get("params")
    for arm in arms:
        summary[arm]["mfu"] = mfu(summary[arm], params, card) if device == "cuda" else None
    record = {
        "benchmark": __doc__.splitlines()[0],
        "workload": workload["name"],
        "settings": workload["train"],
        "model_params": workload["params"],
        "overrides": args.set,
        "device": device,
        "card": card,
        "machine": f"{platform.machine()}, {cpu_model()}" + (f", {card}" if card else ""),
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "runs_per_arm": args.runs,
        "load_averages": [r["load_average"][0] for r in runs],
        "summary": summary,
        "runs": runs,
    }
    for baseline in ("hf", "hf_no_checkpointing"):
        if {"snaketune", baseline} <= set(arms):
            record[f"speedup_over_{baseline}"] = (
                summary["snaketune"]["real_tokens_per_s"] / summary[baseline]["real_tokens_per_s"]
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(table(record))
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
