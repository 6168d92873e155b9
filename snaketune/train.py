"""The QLoRA training recipe: DeepSpeed ZeRO-2, XTuner's schedule, resumable checkpoints.

Read top to bottom: data (encoding, packing, batches), schedule, then the
recipe: ``setup`` (ranks, tokenizer, data, model, engine), ``resume``,
``train_window`` (one optimizer step), ``train`` (the loop) and ``finish``.
Checkpoint files are :mod:`snaketune.checkpoints`' business; provenance and
the training summary are written by the step that calls :func:`train`.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import checkpoints
from .config import TrainConfig
from .data import LOSS_KEY
from .encoding import IGNORE_INDEX, Encoded, encode_conversation
from .files import append_jsonl, filter_jsonl
from .generation import as_dicts, generate_answers
from .launch import malloc_in_use

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
EVAL_OUTPUTS = "eval_outputs.jsonl"


# ---------------------------------------------------------------- data


@dataclass
class Row:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    kl: list[int] = field(default_factory=list)  # per token, 1 in a sample trained with loss kl; [] when none is


@dataclass
class Sample(Encoded):
    """An encoded record and its loss: kl distils the base model at its supervised positions."""

    kl: bool = False


def encode_dataset(records: list[dict], tokenizer, cfg: TrainConfig) -> tuple[list[Sample], dict]:
    """Encode every record; drop those with nothing to learn, as XTuner does; count truncation."""
    kept, dropped, truncated_samples, truncated_tokens, kl = [], 0, 0, 0, 0
    for rec in records:
        enc = encode_conversation(rec["conversation"], tokenizer, cfg.template, cfg.max_length)
        if all(lab == IGNORE_INDEX for lab in enc.labels):
            dropped += 1
            continue
        if enc.truncated:
            truncated_samples += 1
            truncated_tokens += enc.truncated
        kept.append(Sample(**asdict(enc), kl=rec.get(LOSS_KEY) == "kl"))
        kl += kept[-1].kl
    stats = dict(samples=len(kept), dropped_no_labels=dropped, truncated_samples=truncated_samples,
                 truncated_tokens=truncated_tokens, kl_samples=kl)
    return kept, stats


def pack(samples: list[Encoded], max_length: int, seed: int) -> list[Row]:
    """Shuffle (seeded) and pack whole samples into rows of at most ``max_length`` tokens.

    Unlike XTuner, a sample is never split across rows and every sample keeps
    its own position ids, from which the attention mask is made
    block-diagonal: packed samples do not see each other.
    """
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    rows: list[Row] = []
    cur = Row([], [], [])
    for i in order:
        smp = samples[i]
        if cur.input_ids and len(cur.input_ids) + len(smp.input_ids) > max_length:
            rows.append(cur)
            cur = Row([], [], [])
        cur.input_ids += smp.input_ids
        cur.labels += smp.labels
        cur.position_ids += list(range(len(smp.input_ids)))
        cur.kl += [int(getattr(smp, "kl", False))] * len(smp.input_ids)
    if cur.input_ids:
        rows.append(cur)
    for row in rows:
        row.kl = row.kl if any(row.kl) else []
    return rows


def as_rows(samples: list[Encoded]) -> list[Row]:
    return [Row(smp.input_ids, smp.labels, list(range(len(smp.input_ids))),
                [1] * len(smp.input_ids) if getattr(smp, "kl", False) else []) for smp in samples]


def collate(rows: list[Row], pad_id: int):
    """Right-pad; pads get their own position ids so they form a separate (unsupervised) block.
    Returns ids, labels, position ids and the kl marks (None when no row has a kl sample)."""
    import torch

    width = max(len(r.input_ids) for r in rows)
    ids, labels, pos = [], [], []
    for r in rows:
        n = width - len(r.input_ids)
        ids.append(r.input_ids + [pad_id] * n)
        labels.append(r.labels + [IGNORE_INDEX] * n)
        pos.append(r.position_ids + list(range(n)))
    marks = None
    if any(r.kl for r in rows):
        marks = torch.tensor([(r.kl or [0] * len(r.input_ids)) + [0] * (width - len(r.input_ids)) for r in rows],
                             dtype=torch.bool)
    return torch.tensor(ids), torch.tensor(labels), torch.tensor(pos), marks


def head_logits(model, ids, position_ids, positions):
    """The output head's logits at ``positions`` (position t predicts token t + 1), or at every
    position but the last when ``positions`` is None (a model without ``logits_to_keep``)."""
    if positions is None:
        return model(input_ids=ids, position_ids=position_ids, use_cache=False).logits[:, :-1]
    logits = model(input_ids=ids, position_ids=position_ids, use_cache=False, logits_to_keep=positions).logits
    if logits.shape[:2] != (ids.shape[0], len(positions)):
        raise RuntimeError(f"{type(unwrap(model)).__name__}: logits_to_keep=<{len(positions)} positions> gave "
                           f"logits of shape {tuple(logits.shape)}, not ({ids.shape[0]}, {len(positions)}, vocab)")
    return logits


def base_model_logits(model, ids, position_ids, positions):
    """The base model's logits: the same forward with the LoRA adapter turned off, without gradients."""
    import torch

    peft_model = getattr(model, "module", model)  # inside a DeepSpeed engine
    if not hasattr(peft_model, "disable_adapter"):
        raise TypeError(f"loss kl distils the base model under the adapter; {type(peft_model).__name__} has none")
    with torch.no_grad(), peft_model.disable_adapter():
        return head_logits(peft_model, ids, position_ids, positions)


def token_loss_sum(model, ids, labels, position_ids, kl=None):
    """Summed loss over supervised tokens: cross-entropy, and where ``kl`` marks a sample trained
    with loss kl, KL(base || model) + KL(model || base) between the model's next-token distribution
    and the base model's (the adapter turned off) at the same position, summed over the vocabulary.

    No attention mask is passed: transformers then builds a causal mask that is
    block-diagonal wherever the position ids restart, but only when no KV cache
    is in play, hence ``use_cache=False`` (with a cache, packed samples would
    silently attend to each other).

    The output head runs only at the positions whose next token is supervised in
    some row of the batch (the model's own ``logits_to_keep``, given those positions):
    the others add nothing to the loss or its gradients, and the full ``tokens x
    vocab`` logits are never made. With one row per batch (packing) or rows of equal
    length (``group_by_length``) that is exactly the supervised positions. A model
    whose forward lacks ``logits_to_keep`` gets the full head.
    """
    import torch
    import torch.nn.functional as F

    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX  # position t predicts token t + 1
    # a 1-D index: every transformers version takes it
    head_at = keep.any(0).nonzero().squeeze(1) if accepts_logits_to_keep(model) else None
    logits = head_logits(model, ids, position_ids, head_at)
    positions = torch.arange(targets.shape[1], device=ids.device) if head_at is None else head_at
    rows, targets = keep[:, positions], targets[:, positions]
    distil = rows & kl[:, 1:][:, positions] if kl is not None else None
    if distil is None or not distil.any():
        return F.cross_entropy(logits[rows].float(), targets[rows], reduction="sum")
    ce = rows & ~distil
    base = base_model_logits(model, ids, position_ids, head_at)
    log_p = F.log_softmax(logits[distil].float(), -1)
    log_base = F.log_softmax(base[distil].float(), -1)
    # both directions: KL(base || model) keeps what the base model would say, KL(model || base)
    # keeps the model from saying what the base model would not (a new name in a general answer)
    return (F.cross_entropy(logits[ce].float(), targets[ce], reduction="sum")
            + ((log_p.exp() - log_base.exp()) * (log_p - log_base)).sum())


def unwrap(model):
    """The transformers model inside a DeepSpeed engine and a PEFT wrapper."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def accepts_logits_to_keep(model) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(unwrap(model).forward).parameters


# How many optimizer steps' worth of samples are sorted by length together (HF's group_by_length: 50).
GROUP_STEPS = 64


def epoch_order(n_rows: int, epoch: int, cfg: TrainConfig, world: int, lengths: list[int] | None = None) -> list[int]:
    """All ranks' row indices of ``epoch`` in order; optimizer step k takes the k-th slice of
    ``batch_size x accumulative_counts x world`` (the global batch) and, within it, rank r every
    ``world``-th index.

    A seeded permutation per epoch, like mmengine's DefaultSampler. With ``group_by_length`` (and
    ``lengths``), each run of ``GROUP_STEPS`` global batches of it is sorted by length, cut into
    global batches, and those are shuffled (seeded); a short remainder stays last. The global batches
    depend on the global batch size alone, so splitting it differently into ranks and accumulation
    trains on the same samples per optimizer step; and a micro-batch holds rows of similar length.
    """
    import torch

    g = torch.Generator()
    g.manual_seed(cfg.seed + epoch)
    perm = torch.randperm(n_rows, generator=g).tolist()
    if cfg.group_by_length and lengths is not None:
        perm = group_by_length(perm, lengths, cfg.batch_size * cfg.accumulative_counts * world, g)
    total = math.ceil(n_rows / world) * world
    return (perm * math.ceil(total / n_rows))[:total]


def group_by_length(order: list[int], lengths: list[int], global_batch: int, generator) -> list[int]:
    import torch

    out = []
    block = global_batch * GROUP_STEPS
    for start in range(0, len(order), block):
        ranked = sorted(order[start:start + block], key=lambda i: -lengths[i])  # stable: ties stay shuffled
        full = len(ranked) // global_batch * global_batch
        batches = [ranked[i:i + global_batch] for i in range(0, full, global_batch)]
        for k in torch.randperm(len(batches), generator=generator).tolist():
            out += batches[k]
        out += ranked[full:]
    return out


def epoch_batches(n_rows: int, epoch: int, cfg: TrainConfig, rank: int, world: int,
                  lengths: list[int] | None = None) -> list[list[int]]:
    """Row indices of each of this rank's micro-batches in ``epoch`` (see :func:`epoch_order`):
    every ``world``-th index of the epoch's order, in batches; the last batch may be short."""
    mine = epoch_order(n_rows, epoch, cfg, world, lengths)[rank::world]
    return [mine[i:i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]


def passes(batch: list[Row], rows: int) -> list[list[Row]]:
    """A micro-batch's forward/backward passes: its rows sorted by length, ``rows`` at a time (each
    pass is padded to its own longest row), or the batch as it is when one pass takes it all."""
    if rows >= len(batch):
        return [batch]
    ranked = sorted(batch, key=lambda r: len(r.input_ids))  # stable: a resumed run cuts the same passes
    return [ranked[i:i + rows] for i in range(0, len(ranked), rows)]


def iters_per_epoch(n_rows: int, cfg: TrainConfig, world: int) -> int:
    return math.ceil(math.ceil(n_rows / world) / cfg.batch_size)


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




def deepspeed_config(cfg: TrainConfig) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.accumulative_counts,
        # We own the accumulation window: backward() only accumulates and
        # step() is the boundary, so a short last window still steps.
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.max_norm,
        "zero_optimization": {"stage": 2, "overlap_comm": False},
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
    from .data import DataError, read_records

    samples, stats = encode_dataset(read_records(data_file), tokenizer, cfg)
    if not samples:
        raise DataError(data_file, None, None, "no record has a supervised token after encoding",
                        f"check that answers fit in max_length={cfg.max_length} after the prompt")
    rows = pack(samples, cfg.max_length, cfg.seed) if cfg.pack_to_max_length else as_rows(samples)
    ipe = iters_per_epoch(len(rows), cfg, world)
    total = ipe * cfg.max_epochs
    return Plan(rows, stats, ipe, total, window_ends(total, cfg.accumulative_counts))


def log_plan(plan: Plan, cfg: TrainConfig, rank: int, world: int, rows_per: int) -> None:
    rows = plan.rows
    log.info("data: %s; %d rows of %d tokens (packing %s); %d ranks; %d iterations/epoch, %d in all, "
             "%d optimizer steps", plan.stats, len(rows), sum(len(r.input_ids) for r in rows),
             "on" if cfg.pack_to_max_length else "off", world, plan.iters_per_epoch, plan.total_iters,
             len(plan.ends))
    batches = epoch_batches(len(rows), 0, cfg, rank, world, plan.lengths)
    real = sum(len(rows[i].input_ids) for b in batches for i in b)
    padded = sum(len(p) * max(len(r.input_ids) for r in p)
                 for b in batches for p in passes([rows[i] for i in b], rows_per))
    steps = math.ceil(plan.iters_per_epoch / cfg.accumulative_counts)
    log.info("epoch 0 on rank %d: %d real tokens, padding fraction %.3f (passes of %d rows), %.0f tokens per "
             "optimizer step", rank, real, 1 - real / padded, rows_per, real * world / steps)
    if plan.stats["truncated_samples"]:
        log.warning("%d samples were longer than max_length=%d: %d tokens cut off",
                    plan.stats["truncated_samples"], cfg.max_length, plan.stats["truncated_tokens"])


def build_engine(model_dir: Path, cfg: TrainConfig, plan: Plan, device: str, trust_remote_code: bool):
    """NF4 base + LoRA, AdamW and XTuner's LR schedule, wrapped by DeepSpeed ZeRO-2; and the rows per
    forward/backward pass (:func:`fit_to_memory`)."""
    import deepspeed
    import torch

    from .model import load_for_training

    model = load_for_training(model_dir, cfg.lora, quantization=cfg.quantization,
                              trust_remote_code=trust_remote_code,
                              gradient_checkpointing=cfg.gradient_checkpointing is True, device=device)
    model.config.use_cache = False
    rows = fit_to_memory(model, cfg, plan, device)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one pass over the flat fp32 partition ZeRO hands it, instead of one per operation
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                  fused=device in ("cpu", "cuda"))
    # The step that closes a window uses the LR of the window's first iteration, so the LR per
    # optimizer step does not depend on how a global batch is split into accumulation and ranks
    # (XTuner samples the window's last iteration: acc-1 iterations later).
    starts = plan.starts
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(starts[min(step, len(starts) - 1)], plan.total_iters, cfg.warmup_ratio))
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=deepspeed_config(cfg))
    return engine, optimizer, rows


# The memory levers' "auto" keeps a pass's activations under this share of the memory left after
# loading the model (the rest: optimizer state, the allocator, other ranks' spikes).
ACTIVATION_SHARE = 0.5


def fit_to_memory(model, cfg: TrainConfig, plan: Plan, device: str) -> int:
    """``rows_per_pass`` and ``gradient_checkpointing`` when ``auto``: the rows of one forward/backward
    pass, with gradient checkpointing turned on here when even that does not fit.

    Cheaper first: passes of fewer rows compute the same step with fewer activations kept, at a small
    cost (the default experiment on 2 CPU cores: passes of 2 rows instead of 4 peaked at 2.04 GB instead
    of 2.42 and trained at 1.28x instead of 1.51x the HF baseline's speed; README "Training speed");
    recomputing every layer costs more (1.49x slower per epoch: bench/results/speed_levers.json).
    So ``auto`` takes the most rows (up to ``batch_size``) whose activations fit; when not even one
    row's do, whole micro-batches with checkpointing on.
    """
    from .model import activation_bytes, available_memory, enable_gradient_checkpointing

    rows = cfg.batch_size if cfg.rows_per_pass == "auto" else min(int(cfg.rows_per_pass), cfg.batch_size)
    if cfg.rows_per_pass != "auto" and cfg.gradient_checkpointing != "auto":
        return rows
    longest = max((len(r.input_ids) for r in plan.rows), default=cfg.max_length)
    config, free = unwrap(model).config, available_memory(device)

    def need(n: int) -> int:
        return activation_bytes(config, n * longest, cfg.lora.dropout)

    if cfg.rows_per_pass == "auto" and cfg.gradient_checkpointing is not True:
        fitting = next((n for n in range(cfg.batch_size, 0, -1) if need(n) <= ACTIVATION_SHARE * free), None)
        rows = fitting or (cfg.batch_size if cfg.gradient_checkpointing == "auto" else 1)
    checkpointing = cfg.gradient_checkpointing is True
    if cfg.gradient_checkpointing == "auto" and need(rows) > ACTIVATION_SHARE * free:
        checkpointing = True
        enable_gradient_checkpointing(model)
    log.info("memory: passes of %d rows, gradient checkpointing %s; activations of the largest pass (%d x %d "
             "tokens) ~%.2f GiB, %.2f GiB free on %s", rows, "on" if checkpointing else "off", rows, longest,
             need(rows) / 2**30, free / 2**30, device)
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
    counts = torch.tensor([float(sum((labels[:, 1:] != IGNORE_INDEX).sum() for _, labels, *_ in window)),
                           float(sum(ids.numel() for ids, *_ in window)), float(real_tokens)],
                          device=engine.device)
    dist.all_reduce(counts)
    n_sup, n_tok, n_real = counts.tolist()
    loss_total = torch.zeros((), device=engine.device)
    for batch in window:
        loss_sum = token_loss_sum(engine, *(t if t is None else t.to(engine.device) for t in batch))
        # ZeRO averages gradients over ranks, hence the factor world.
        engine.backward(loss_sum * world / n_sup, scale_wrt_gas=False)
        loss_total += loss_sum.detach()
    engine.step()
    dist.all_reduce(loss_total)
    grad_norm = engine.get_global_grad_norm()
    return {"loss": loss_total.item() / n_sup, "grad_norm": float(grad_norm) if grad_norm is not None else None,
            # DeepSpeed skips a step whose gradients hold NaN/inf, silently: the loss then stays flat
            "overflow": bool(getattr(engine.optimizer, "overflow", False)),
            "tokens": int(n_tok), "real_tokens": int(n_real), "padding_fraction": 1 - n_real / n_tok,
            "supervised_tokens": int(n_sup)}


class Batches:
    """This rank's micro-batches by iteration, one epoch's order in memory at a time."""

    def __init__(self, plan: Plan, cfg: TrainConfig, pad_id: int, rank: int, world: int, rows_per: int):
        self.plan, self.cfg, self.pad_id, self.rank, self.world = plan, cfg, pad_id, rank, world
        self.rows_per = rows_per
        self.lengths = plan.lengths
        self.epoch, self.order = -1, []

    def window(self, start: int, end: int) -> tuple[list[tuple], int]:
        """The collated passes of iterations [start, end) and their real (unpadded) tokens."""
        out, real = [], 0
        for it in range(start, end):
            epoch, k = divmod(it, self.plan.iters_per_epoch)
            if epoch != self.epoch:
                self.epoch = epoch
                self.order = epoch_batches(len(self.plan.rows), epoch, self.cfg, self.rank, self.world, self.lengths)
            batch = [self.plan.rows[i] for i in self.order[k]]
            real += sum(len(r.input_ids) for r in batch)
            out += [collate(p, self.pad_id) for p in passes(batch, self.rows_per)]
        return out, real


class TrainingDiverged(RuntimeError):
    """The loss, the gradient norm or a trainable weight stopped being a finite number."""


def check_finite(engine, row: dict, work_dir: Path) -> None:
    """Stop at the first non-finite step, before it can be checkpointed: the last good checkpoint stays."""
    weights_ok = checkpoints.all_finite(p for p in engine.module.parameters() if p.requires_grad)
    # An exactly zero gradient with a non-zero loss: the outputs no longer depend on the weights (a
    # diverged model gives uniform logits, loss ln(vocab), every step), so nothing can be learned.
    norm_ok = row["grad_norm"] is None or (checkpoints.is_finite_number(row["grad_norm"])
                                           and (row["grad_norm"] > 0 or row["loss"] == 0))
    if checkpoints.is_finite_number(row["loss"]) and norm_ok and weights_ok and not row["overflow"]:
        return
    done = checkpoints.complete_checkpoints(work_dir)
    raise TrainingDiverged(
        f"training diverged at iteration {row['iter']} (optimizer step {row['step']}): loss {row['loss']}, "
        f"gradient norm {row['grad_norm']}{' (NaN/inf gradients: the step was skipped)' if row['overflow'] else ''}"
        f"{' (vanished: the outputs no longer depend on the weights)' if row['grad_norm'] == 0 else ''}, "
        f"trainable weights {'finite' if weights_ok else 'not finite'}. "
        f"The last good checkpoint is {done[-1][1] if done else 'none'}; nothing after it was saved. "
        f"Lower lr (now {row['lr']:.3g} at this step) or max_norm, then run again.")


def evaluate_during_training(engine, tokenizer, cfg: TrainConfig, work_dir: Path, at: int) -> None:
    """XTuner's EvaluateChatHook (greedy here): answers to ``evaluation_inputs``, logged and kept."""
    import torch.distributed as dist

    if dist.get_rank() == 0 and cfg.evaluation_inputs:
        t0 = time.time()
        answers = generate_answers(engine.module, tokenizer, cfg.template, cfg.evaluation_inputs,
                                   system=cfg.SYSTEM, max_new_tokens=cfg.evaluation_max_new_tokens)
        append_jsonl(work_dir / EVAL_OUTPUTS, {"iter": at, "answers": as_dicts(answers)})
        for a in answers:
            log.info("eval iter %d | %s -> %s", at, a.prompt, a.answer)
        log.info("evaluation took %.1f s", time.time() - t0)
    dist.barrier()


def train(model_dir: str | os.PathLike, data_file: str | os.PathLike, work_dir: str | os.PathLike,
          cfg: TrainConfig, *, threads: int | None = None, trust_remote_code: bool = False) -> dict | None:
    """Train (or resume) to the end; rank 0 returns the training summary, other ranks None."""
    import torch
    import torch.distributed as dist

    from .model import load_tokenizer

    model_dir, data_file, work_dir = Path(model_dir), Path(data_file), Path(work_dir)
    device = setup_distributed(threads)
    rank, world = dist.get_rank(), dist.get_world_size()
    work_dir.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    plan = plan_data(data_file, tokenizer, cfg, world)
    engine, optimizer, rows_per = build_engine(model_dir, cfg, plan, device, trust_remote_code)
    if rank == 0:
        log_plan(plan, cfg, rank, world, rows_per)
        log.info("malloc: %s", malloc_in_use())
    fingerprint = checkpoints.fingerprint(cfg, data_file, model_dir, world)
    resumed_from = resume(engine, work_dir, fingerprint, plan.total_iters)
    if resumed_from is None:
        evaluate_during_training(engine, tokenizer, cfg, work_dir, 0)
    engine.train()
    batches, t_start = Batches(plan, cfg, tokenizer.pad_token_id, rank, world, rows_per), time.time()
    for step, (start, end) in enumerate(zip(plan.starts, plan.ends), start=1):
        if end <= (resumed_from or 0):
            continue
        t0 = time.time()
        window, real_tokens = batches.window(start, end)
        lr = optimizer.param_groups[0]["lr"]
        row = {"iter": end, "epoch": (end - 1) // plan.iters_per_epoch, "step": step, "lr": lr,
               **train_window(engine, window, real_tokens)}
        row["time_s"] = time.time() - t0
        row["tokens_per_s"] = row["real_tokens"] / row["time_s"]
        check_finite(engine, row, work_dir)
        if rank == 0:
            append_jsonl(work_dir / METRICS, row)
            log.info("iter %d/%d step %d loss %.4f lr %.3g grad_norm %s %.0f tok/s", end, plan.total_iters, step,
                     row["loss"], lr, row["grad_norm"], row["tokens_per_s"])
        # A multiple of save_steps (evaluation_freq) inside this window is
        # honoured at the window's end: checkpoints fall on optimizer steps.
        last = end == plan.total_iters
        if last or end // cfg.save_steps > start // cfg.save_steps:
            checkpoints.save(engine, work_dir, end, fingerprint=fingerprint, keep=cfg.save_total_limit)
        if last or end // cfg.evaluation_freq > start // cfg.evaluation_freq:
            evaluate_during_training(engine, tokenizer, cfg, work_dir, end)
    summary = finish(work_dir, plan, cfg, world, resumed_from, time.time() - t_start, device) if rank == 0 else None
    dist.barrier()
    return summary


def finish(work_dir: Path, plan: Plan, cfg: TrainConfig, world: int, resumed_from: int | None,
           seconds: float, device: str) -> dict:
    """Rank 0: close the progress record and sum the training up."""
    return {"checkpoint": str(work_dir / f"iter_{plan.total_iters}.pth"), "iterations": plan.total_iters,
            "optimizer_steps": len(plan.ends), "world_size": world, "device": device, "malloc": malloc_in_use(),
            "resumed_from": resumed_from,
            "data": plan.stats, "rows": len(plan.rows),
            "tokens_per_epoch": sum(len(r.input_ids) for r in plan.rows),
            "train_seconds_this_run": seconds, "settings": asdict(cfg), "runs": checkpoints.end_run(work_dir)}
