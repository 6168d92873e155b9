"""The QLoRA training recipe: DeepSpeed ZeRO-2, XTuner's schedule, resumable checkpoints.

Read top to bottom: the schedule, then the recipe: ``setup`` (ranks,
tokenizer, data, model, engine), ``resume``, ``train_window`` (one optimizer
step), ``train`` (the loop) and ``finish``. The data's encoding, packing and
micro-batches are :mod:`snaketune.batching`'s, the loss
:mod:`snaketune.losses`', checkpoint files :mod:`snaketune.checkpoints`';
provenance and the training summary are written by the step that calls
:func:`train`.

Iterations count micro-batches, as in XTuner: ``iter_N.pth``, ``save_steps``
and ``evaluation_freq`` are in iterations. The optimizer steps once per
window of ``accumulative_counts`` iterations (the last window may be
shorter), and checkpoints are taken at window ends only, so a checkpoint
never holds half-accumulated gradients.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import checkpoints
from .batching import Batches, Row, as_rows, collate, encode_dataset, epoch_batches, iters_per_epoch, pack, passes
from .config import TrainConfig
from .devices import agreed_minimum, reduce_bucket_elements, training_dtype
from .encoding import IGNORE_INDEX
from .errors import TrainingDiverged
from .files import append_jsonl, filter_jsonl
from .generation import as_dicts, generate_answers
from .launch import malloc_in_use
from .losses import token_loss_sum, unwrap

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
EVAL_OUTPUTS = "eval_outputs.jsonl"


# ---------------------------------------------------------------- schedule


def lr_factor(iteration: int, total_iters: int, warmup_ratio: float) -> float:
    """XTuner's LinearLR(start_factor=1e-5) warm-up, then CosineAnnealingLR to 0, per iteration."""
    warmup = int(warmup_ratio * total_iters)
    if iteration < warmup:
        return 1e-5 + (1 - 1e-5) * iteration / warmup
    span = total_iters - warmup
    if span <= 0:
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (iteration - warmup) / span))


def window_ends(total_iters: int, acc: int) -> list[int]:
    """The (exclusive) iteration at which each optimizer step happens."""
    return [min(e, total_iters) for e in range(acc, total_iters + acc, acc)]


def deepspeed_config(cfg: TrainConfig, trainable: int) -> dict:
    """ZeRO-2 for a model of ``trainable`` trainable parameters (the LoRA weights), fp32 master weights.

    DeepSpeed's own bf16/fp16 modes stay off: they would keep the trainable weights in half
    precision; the forward pass runs under autocast instead (:func:`training_autocast`).
    """
    bucket = reduce_bucket_elements(trainable)
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.accumulative_counts,
        # We own the accumulation window: backward() only accumulates and
        # step() is the boundary, so a short last window still steps.
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.max_norm,
        "zero_optimization": {
            "stage": 2,
            "overlap_comm": False,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
        },
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
    }


# ---------------------------------------------------------------- the recipe


@dataclass
class Plan:
    """The encoded data and the schedule it gives on this many ranks."""

    rows: list[Row]
    stats: dict[str, int]
    iters_per_epoch: int
    total_iters: int
    ends: list[int]  # the iteration after which each optimizer step happens

    @property
    def starts(self) -> list[int]:
        return [0, *self.ends[:-1]]

    @property
    def lengths(self) -> list[int]:
        return [len(r.input_ids) for r in self.rows]


def setup_distributed(threads: int | None) -> str:
    """Join (or, alone, form) the process group; returns the device: cuda on a GPU, else cpu."""
    import deepspeed
    import torch

    from .launch import ensure_dist_env
    from .model import pick_device

    if threads:
        torch.set_num_threads(threads)
    ensure_dist_env()
    device = pick_device()
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    return device


def plan_data(data_file: Path, tokenizer, cfg: TrainConfig, world: int) -> Plan:
    from .data import read_records
    from .errors import DataError

    samples, stats = encode_dataset(read_records(data_file), tokenizer, cfg)
    if not samples:
        raise DataError(
            data_file,
            None,
            None,
            "no record has a supervised token after encoding",
            f"check that answers fit in max_length={cfg.max_length} after the prompt",
        )
    rows = pack(samples, cfg.max_length, cfg.seed) if cfg.pack_to_max_length else as_rows(samples)
    ipe = iters_per_epoch(len(rows), cfg, world)
    total = ipe * cfg.max_epochs
    return Plan(rows, stats, ipe, total, window_ends(total, cfg.accumulative_counts))


def log_plan(plan: Plan, cfg: TrainConfig, rank: int, world: int, rows_per: int) -> None:
    rows = plan.rows
    log.info(
        "data: %s; %d rows of %d tokens (packing %s); %d ranks; %d iterations/epoch, %d in all, %d optimizer steps",
        plan.stats,
        len(rows),
        sum(len(r.input_ids) for r in rows),
        "on" if cfg.pack_to_max_length else "off",
        world,
        plan.iters_per_epoch,
        plan.total_iters,
        len(plan.ends),
    )
    batches = epoch_batches(len(rows), 0, cfg, rank, world, plan.lengths)
    real = sum(len(rows[i].input_ids) for b in batches for i in b)
    padded = sum(
        len(p) * max(len(r.input_ids) for r in p) for b in batches for p in passes([rows[i] for i in b], rows_per)
    )
    steps = math.ceil(plan.iters_per_epoch / cfg.accumulative_counts)
    log.info(
        "epoch 0 on rank %d: %d real tokens, padding fraction %.3f (passes of %d rows), %.0f tokens per optimizer step",
        rank,
        real,
        1 - real / padded,
        rows_per,
        real * world / steps,
    )
    if plan.stats["truncated_samples"]:
        log.warning(
            "%d samples were longer than max_length=%d: %d tokens cut off",
            plan.stats["truncated_samples"],
            cfg.max_length,
            plan.stats["truncated_tokens"],
        )


def build_engine(model_dir: Path, cfg: TrainConfig, plan: Plan, device: str, trust_remote_code: bool):
    """NF4 base + LoRA, AdamW and XTuner's LR schedule, wrapped by DeepSpeed ZeRO-2; and the rows per
    forward/backward pass (:func:`fit_to_memory`)."""
    import deepspeed
    import torch

    from .model import load_for_training

    model = load_for_training(
        model_dir,
        cfg.lora,
        quantization=cfg.quantization,
        trust_remote_code=trust_remote_code,
        gradient_checkpointing=cfg.gradient_checkpointing is True,
        device=device,
    )
    model.config.use_cache = False
    rows = fit_to_memory(model, cfg, plan, device)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one pass over the flat fp32 partition ZeRO hands it, instead of one per operation
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=device in ("cpu", "cuda")
    )
    # The step that closes a window uses the LR of the window's first iteration, so the LR per
    # optimizer step does not depend on how a global batch is split into accumulation and ranks
    # (XTuner samples the window's last iteration: acc-1 iterations later).
    starts = plan.starts
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(starts[min(step, len(starts) - 1)], plan.total_iters, cfg.warmup_ratio)
    )
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, sum(p.numel() for p in params)),
    )
    return engine, optimizer, rows


# The memory levers' "auto" keeps a pass's activations under this share of the memory left after
# loading the model (the rest: optimizer state, the allocator, other ranks' spikes).
ACTIVATION_SHARE = 0.5


def fit_to_memory(model, cfg: TrainConfig, plan: Plan, device: str) -> int:
    """``rows_per_pass`` and ``gradient_checkpointing`` when ``auto``: the rows of one forward/backward
    pass, with gradient checkpointing turned on here when even that does not fit.

    Cheaper first: passes of fewer rows compute the same step with fewer activations kept, at a small
    cost in speed; recomputing every layer costs more (docs/benchmarks.md has both measured).
    So ``auto`` takes the most rows (up to ``batch_size``) whose activations fit; when not even one
    row's do, whole micro-batches with checkpointing on.
    """
    from .model import activation_bytes, available_memory, enable_gradient_checkpointing

    rows = cfg.batch_size if cfg.rows_per_pass == "auto" else min(int(cfg.rows_per_pass), cfg.batch_size)
    if cfg.rows_per_pass != "auto" and cfg.gradient_checkpointing != "auto":
        return rows
    longest = max((len(r.input_ids) for r in plan.rows), default=cfg.max_length)
    # every rank must choose the same passes (agreed_minimum says why): the least free memory decides
    config, free = unwrap(model).config, agreed_minimum(available_memory(device), device)

    def need(n: int) -> int:
        return activation_bytes(config, n * longest, cfg.lora.dropout)

    if cfg.rows_per_pass == "auto" and cfg.gradient_checkpointing is not True:
        fitting = next((n for n in range(cfg.batch_size, 0, -1) if need(n) <= ACTIVATION_SHARE * free), None)
        rows = fitting or (cfg.batch_size if cfg.gradient_checkpointing == "auto" else 1)
    checkpointing = cfg.gradient_checkpointing is True
    if cfg.gradient_checkpointing == "auto" and need(rows) > ACTIVATION_SHARE * free:
        checkpointing = True
        enable_gradient_checkpointing(model)
    log.info(
        "memory: passes of %d rows, gradient checkpointing %s; activations of the largest pass (%d x %d "
        "tokens) ~%.2f GiB, %.2f GiB free on %s",
        rows,
        "on" if checkpointing else "off",
        rows,
        longest,
        need(rows) / 2**30,
        free / 2**30,
        device,
    )
    return rows


def resume(engine, work_dir: Path, fingerprint: str, total_iters: int) -> int | None:
    """Load the newest complete checkpoint of this run definition; its iteration, or None for a fresh start."""
    import torch.distributed as dist

    main = dist.get_rank() == 0
    if main:
        checkpoints.tidy(work_dir, fingerprint, total_iters)
    dist.barrier()
    done = checkpoints.complete_checkpoints(work_dir)
    resumed_from = checkpoints.load(engine, done[-1][1]) if done else None
    if main:
        if resumed_from is not None:
            log.info("resuming from %s: iteration %d of %d", done[-1][1], resumed_from, total_iters)
            for name in (METRICS, EVAL_OUTPUTS):
                filter_jsonl(work_dir / name, lambda r: r["iter"] <= resumed_from)
        else:
            for name in (METRICS, EVAL_OUTPUTS):
                (work_dir / name).unlink(missing_ok=True)
        checkpoints.start_run(work_dir, resumed_from, dist.get_world_size())
    return resumed_from


def train_window(engine, window: list[tuple], real_tokens: int) -> dict[str, float]:
    """One optimizer step over a window of micro-batches; returns this step's counts and loss.

    The loss is normalised by the supervised tokens of the whole window on all
    ranks (not a mean of per-batch means). Every tensor handed to a collective
    lives on the engine's device: NCCL accepts only CUDA tensors.
    """
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    counts = torch.tensor(
        [
            float(sum((labels[:, 1:] != IGNORE_INDEX).sum() for _, labels, *_ in window)),
            float(sum(ids.numel() for ids, *_ in window)),
            float(real_tokens),
        ],
        device=engine.device,
    )
    dist.all_reduce(counts)
    n_sup, n_tok, n_real = counts.tolist()
    loss_total = torch.zeros((), device=engine.device)
    for batch in window:
        with training_autocast(engine.device.type):
            loss_sum = token_loss_sum(engine, *(t if t is None else t.to(engine.device) for t in batch))
        # ZeRO averages gradients over ranks, hence the factor world.
        engine.backward(loss_sum * world / n_sup, scale_wrt_gas=False)
        loss_total += loss_sum.detach()
    engine.step()
    dist.all_reduce(loss_total)
    grad_norm = engine.get_global_grad_norm()
    return {
        "loss": loss_total.item() / n_sup,
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        # DeepSpeed skips a step whose gradients hold NaN/inf, silently: the loss then stays flat
        "overflow": bool(getattr(engine.optimizer, "overflow", False)),
        "tokens": int(n_tok),
        "real_tokens": int(n_real),
        "padding_fraction": 1 - n_real / n_tok,
        "supervised_tokens": int(n_sup),
    }


def training_autocast(device_type: str):
    """The forward pass's precision (:func:`snaketune.devices.training_dtype`): bf16 autocast on a GPU
    that has bf16 (attention, the LoRA and output-layer matmuls on its bf16 units; the loss, the LoRA
    master weights and their gradients stay fp32); fp32 elsewhere."""
    import contextlib

    import torch

    dtype = training_dtype(device_type, device_type == "cuda" and torch.cuda.is_bf16_supported())
    return contextlib.nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=getattr(torch, dtype))


def check_finite(engine, row: dict, work_dir: Path) -> None:
    """Stop at the first non-finite step, before it can be checkpointed: the last good checkpoint stays."""
    weights_ok = checkpoints.all_finite(p for p in engine.module.parameters() if p.requires_grad)
    # An exactly zero gradient with a non-zero loss: the outputs no longer depend on the weights (a
    # diverged model gives uniform logits, loss ln(vocab), every step), so nothing can be learned.
    norm_ok = row["grad_norm"] is None or (
        checkpoints.is_finite_number(row["grad_norm"]) and (row["grad_norm"] > 0 or row["loss"] == 0)
    )
    if checkpoints.is_finite_number(row["loss"]) and norm_ok and weights_ok and not row["overflow"]:
        return
    done = checkpoints.complete_checkpoints(work_dir)
    raise TrainingDiverged(
        f"training diverged at iteration {row['iter']} (optimizer step {row['step']}): loss {row['loss']}, "
        f"gradient norm {row['grad_norm']}{' (NaN/inf gradients: the step was skipped)' if row['overflow'] else ''}"
        f"{' (vanished: the outputs no longer depend on the weights)' if row['grad_norm'] == 0 else ''}, "
        f"trainable weights {'finite' if weights_ok else 'not finite'}. "
        f"The last good checkpoint is {done[-1][1] if done else 'none'}; nothing after it was saved. "
        f"Lower lr (now {row['lr']:.3g} at this step) or max_norm, then run again."
    )


def evaluate_during_training(engine, tokenizer, cfg: TrainConfig, work_dir: Path, at: int) -> None:
    """XTuner's EvaluateChatHook (greedy here): answers to ``evaluation_inputs``, logged and kept."""
    import torch.distributed as dist

    if dist.get_rank() == 0 and cfg.evaluation_inputs:
        t0 = time.time()
        answers = generate_answers(
            engine.module,
            tokenizer,
            cfg.template,
            cfg.evaluation_inputs,
            system=cfg.SYSTEM,
            max_new_tokens=cfg.evaluation_max_new_tokens,
        )
        append_jsonl(work_dir / EVAL_OUTPUTS, {"iter": at, "answers": as_dicts(answers)})
        for a in answers:
            log.info("eval iter %d | %s -> %s", at, a.prompt, a.answer)
        log.info("evaluation took %.1f s", time.time() - t0)
    dist.barrier()


def train(
    model_dir: str | os.PathLike,
    data_file: str | os.PathLike,
    work_dir: str | os.PathLike,
    cfg: TrainConfig,
    *,
    threads: int | None = None,
    trust_remote_code: bool = False,
) -> dict | None:
    """Train (or resume) to the end; rank 0 returns the training summary, other ranks None."""
    import torch
    import torch.distributed as dist

    from .model import load_tokenizer

    model_dir, data_file, work_dir = Path(model_dir), Path(data_file), Path(work_dir)
    device = setup_distributed(threads)
    rank, world = dist.get_rank(), dist.get_world_size()
    work_dir.mkdir(parents=True, exist_ok=True)
    fingerprint_at = checkpoints.fingerprints(cfg, data_file, model_dir)
    checkpoints.check_world(work_dir, world, fingerprint_at)  # every rank, before the model loads
    fingerprint = fingerprint_at(world)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    plan = plan_data(data_file, tokenizer, cfg, world)
    engine, optimizer, rows_per = build_engine(model_dir, cfg, plan, device, trust_remote_code)
    if rank == 0:
        log_plan(plan, cfg, rank, world, rows_per)
        log.info("malloc: %s", malloc_in_use())
    if cfg.kl_top_k:
        cache_base_top_k(engine, plan.rows, cfg.kl_top_k, rows_per, tokenizer.pad_token_id)
    resumed_from = resume(engine, work_dir, fingerprint, plan.total_iters)
    if resumed_from is None:
        evaluate_during_training(engine, tokenizer, cfg, work_dir, 0)
    engine.train()
    batches, t_start = (
        Batches(plan.rows, plan.iters_per_epoch, cfg, tokenizer.pad_token_id, rank, world, rows_per),
        time.time(),
    )
    for step, (start, end) in enumerate(zip(plan.starts, plan.ends), start=1):
        if end <= (resumed_from or 0):
            continue
        optimizer_step(engine, optimizer, batches, plan, step, start, end, work_dir)
        # A multiple of save_steps (evaluation_freq) inside this window is
        # honoured at the window's end: checkpoints fall on optimizer steps.
        last = end == plan.total_iters
        if last or end // cfg.save_steps > start // cfg.save_steps:
            checkpoints.save(engine, work_dir, end, fingerprint=fingerprint, keep=cfg.save_total_limit)
        if last or end // cfg.evaluation_freq > start // cfg.evaluation_freq:
            evaluate_during_training(engine, tokenizer, cfg, work_dir, end)
    hosts = rank_hosts()
    summary = finish(work_dir, plan, cfg, hosts, resumed_from, time.time() - t_start, device) if rank == 0 else None
    dist.barrier()
    return summary


def cache_base_top_k(engine, rows: list, k: int, rows_per: int, pad_id: int) -> None:
    """The base model's top-k at every distilled position of every row with a ``loss: kl`` sample,
    computed once (:func:`snaketune.losses.base_top_k`) and kept on the rows, so that training steps
    run no forward pass of the base model: the base is frozen, its distributions never change, and
    a replayed record repeated in the mixture is computed once. Every rank computes every row in the
    same passes (in order of first appearance), so the figures do not depend on ranks or on where a
    resumed run starts."""
    import torch

    from .losses import base_top_k

    t0 = time.time()
    distinct: dict[tuple, list] = {}
    for row in rows:
        if row.kl:
            distinct.setdefault((tuple(row.input_ids), tuple(row.labels), tuple(row.kl)), []).append(row)
    groups = list(distinct.values())
    positions = 0
    engine.eval()
    with torch.no_grad(), training_autocast(engine.device.type):
        for i in range(0, len(groups), rows_per):
            chunk = groups[i : i + rows_per]
            ids, labels, pos, kl, *_ = (t.to(engine.device) for t in collate([g[0] for g in chunk], pad_id)[:4])
            top, logp, counts = base_top_k(engine, ids, labels, pos, kl, k)
            for same, teacher in zip(chunk, zip(top.cpu().split(counts), logp.cpu().split(counts))):
                for row in same:
                    row.teacher = teacher
            positions += sum(counts)
    engine.train()
    log.info(
        "kl: the base model's top %d at %d positions of %d distinct rows (%d rows), once: %.1f s",
        k,
        positions,
        len(groups),
        sum(len(g) for g in groups),
        time.time() - t0,
    )


def rank_hosts() -> list[str]:
    """Each rank's host name, by rank (every rank must call it: it is a collective)."""
    import socket

    import torch.distributed as dist

    hosts: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    return [str(h) for h in hosts]


def optimizer_step(
    engine, optimizer, batches: Batches, plan: Plan, step: int, start: int, end: int, work_dir: Path
) -> None:
    """Train on iterations ``start..end`` (one optimizer step); rank 0 appends and logs its metrics."""
    import torch.distributed as dist

    t0 = time.time()
    window, real_tokens = batches.window(start, end)
    lr = optimizer.param_groups[0]["lr"]
    row = {
        "iter": end,
        "epoch": (end - 1) // plan.iters_per_epoch,
        "step": step,
        "lr": lr,
        **train_window(engine, window, real_tokens),
    }
    row["time_s"] = time.time() - t0
    row["tokens_per_s"] = row["real_tokens"] / row["time_s"]
    check_finite(engine, row, work_dir)
    if dist.get_rank() == 0:
        append_jsonl(work_dir / METRICS, row)
        log.info(
            "iter %d/%d step %d loss %.4f lr %.3g grad_norm %s %.0f tok/s",
            end,
            plan.total_iters,
            step,
            row["loss"],
            lr,
            row["grad_norm"],
            row["tokens_per_s"],
        )


def finish(
    work_dir: Path,
    plan: Plan,
    cfg: TrainConfig,
    hosts: list[str],
    resumed_from: int | None,
    seconds: float,
    device: str,
) -> dict:
    """Rank 0: close the progress record and sum the training up (``hosts``: each rank's, by rank)."""
    world = len(hosts)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # torchrun's ranks on this node
    return {
        "checkpoint": str(work_dir / f"iter_{plan.total_iters}.pth"),
        "iterations": plan.total_iters,
        "optimizer_steps": len(plan.ends),
        "world_size": world,
        "nodes": world // per_node,
        "ranks_per_node": per_node,
        "hosts": hosts,
        "device": device,
        "malloc": malloc_in_use(),
        "resumed_from": resumed_from,
        "data": plan.stats,
        "rows": len(plan.rows),
        "tokens_per_epoch": sum(len(r.input_ids) for r in plan.rows),
        "train_seconds_this_run": seconds,
        "settings": asdict(cfg),
        "runs": checkpoints.end_run(work_dir),
    }
