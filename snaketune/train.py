"""The QLoRA training loop: DeepSpeed ZeRO-2, XTuner's schedule, resumable checkpoints.

Read top to bottom: settings, data, schedule, checkpoints, then ``train``.

Iterations count micro-batches, as in XTuner: ``iter_N.pth``, ``save_steps``
and ``evaluation_freq`` are in iterations. The optimizer steps once per
window of ``accumulative_counts`` iterations (the last window may be
shorter), and checkpoints are taken at window ends only, so a checkpoint
never holds half-accumulated gradients.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .encoding import IGNORE_INDEX, Encoded, encode_conversation
from .generation import as_dicts, generate_answers

log = logging.getLogger(__name__)

CKPT_RE = re.compile(r"^iter_(\d+)\.pth$")
COMPLETE = "snaketune_complete.json"


# ---------------------------------------------------------------- settings


@dataclass
class TrainSettings:
    """Hyper-parameters under XTuner's names (see config/schema.yaml for each)."""

    template: str
    max_length: int = 2048
    pack_to_max_length: bool = False
    batch_size: int = 1
    accumulative_counts: int = 16
    max_epochs: int = 3
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    max_norm: float = 1.0
    warmup_ratio: float = 0.03
    save_steps: int = 500
    save_total_limit: int = 2
    evaluation_freq: int = 500
    SYSTEM: str = ""
    evaluation_inputs: list[str] = field(default_factory=list)
    evaluation_max_new_tokens: int = 50
    seed: int = 0
    lora: dict[str, Any] = field(default_factory=lambda: {"r": 64, "alpha": 16, "dropout": 0.1})
    quantization: str = "nf4"
    gradient_checkpointing: bool = True
    trust_remote_code: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainSettings":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(sorted(unknown))}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


# ---------------------------------------------------------------- data


@dataclass
class Row:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]


def encode_dataset(records: list[dict], tokenizer, s: TrainSettings) -> tuple[list[Encoded], dict]:
    """Encode every record; drop those with nothing to learn, as XTuner does; count truncation."""
    kept, dropped, truncated_samples, truncated_tokens = [], 0, 0, 0
    for rec in records:
        enc = encode_conversation(rec["conversation"], tokenizer, s.template, s.max_length)
        if all(lab == IGNORE_INDEX for lab in enc.labels):
            dropped += 1
            continue
        if enc.truncated:
            truncated_samples += 1
            truncated_tokens += enc.truncated
        kept.append(enc)
    stats = dict(samples=len(kept), dropped_no_labels=dropped, truncated_samples=truncated_samples,
                 truncated_tokens=truncated_tokens)
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
    if cur.input_ids:
        rows.append(cur)
    return rows


def as_rows(samples: list[Encoded]) -> list[Row]:
    return [Row(s.input_ids, s.labels, list(range(len(s.input_ids)))) for s in samples]


def collate(rows: list[Row], pad_id: int):
    """Right-pad; pads get their own position ids so they form a separate (unsupervised) block."""
    import torch

    width = max(len(r.input_ids) for r in rows)
    ids, labels, pos = [], [], []
    for r in rows:
        n = width - len(r.input_ids)
        ids.append(r.input_ids + [pad_id] * n)
        labels.append(r.labels + [IGNORE_INDEX] * n)
        pos.append(r.position_ids + list(range(n)))
    return torch.tensor(ids), torch.tensor(labels), torch.tensor(pos)


def token_loss_sum(model, ids, labels, position_ids):
    """Summed cross-entropy over supervised tokens.

    No attention mask is passed: transformers then builds a causal mask that is
    block-diagonal wherever the position ids restart, but only when no KV cache
    is in play, hence ``use_cache=False`` (with a cache, packed samples would
    silently attend to each other).
    """
    import torch.nn.functional as F

    logits = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def epoch_batches(n_rows: int, epoch: int, s: TrainSettings, rank: int, world: int) -> list[list[int]]:
    """Row indices of each of this rank's micro-batches in ``epoch``.

    Like mmengine's DefaultSampler: a seeded permutation per epoch, padded by
    repetition to a multiple of the world size, every ``world``-th index per
    rank; the last batch may be short.
    """
    import torch

    g = torch.Generator()
    g.manual_seed(s.seed + epoch)
    perm = torch.randperm(n_rows, generator=g).tolist()
    total = math.ceil(n_rows / world) * world
    perm = (perm * math.ceil(total / n_rows))[:total]
    mine = perm[rank:total:world]
    return [mine[i:i + s.batch_size] for i in range(0, len(mine), s.batch_size)]


def iters_per_epoch(n_rows: int, s: TrainSettings, world: int) -> int:
    return math.ceil(math.ceil(n_rows / world) / s.batch_size)


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


# ---------------------------------------------------------------- checkpoints


# Settings that change what is logged or kept, not the weights: a checkpoint
# made under other values of these still resumes.
_NOT_IN_FINGERPRINT = {"save_steps", "save_total_limit", "evaluation_freq", "evaluation_inputs",
                       "evaluation_max_new_tokens", "SYSTEM"}


def run_fingerprint(s: TrainSettings, data_file: Path, model_dir: Path, world: int) -> str:
    """What a checkpoint must have been made with to be resumed: settings, data, model, ranks."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in asdict(s).items() if k not in _NOT_IN_FINGERPRINT},
                        sort_keys=True).encode())
    h.update(Path(data_file).read_bytes())
    h.update((Path(model_dir) / "config.json").read_bytes())
    h.update(str(world).encode())
    return h.hexdigest()[:16]


def checkpoint_fingerprint(ckpt: Path) -> str | None:
    return json.loads((ckpt / COMPLETE).read_text()).get("fingerprint")


def set_aside(work_dir: Path, fingerprint: str) -> Path | None:
    """Move checkpoints of another run definition out of the way (never delete them)."""
    stale = [p for _, p in complete_checkpoints(work_dir) if checkpoint_fingerprint(p) != fingerprint]
    if not stale:
        return None
    dest = work_dir / "superseded" / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True)
    for p in stale:
        os.replace(p, dest / p.name)
    return dest


def complete_checkpoints(work_dir: Path) -> list[tuple[int, Path]]:
    """Checkpoints whose writing finished (marker present), oldest first."""
    found = []
    if work_dir.is_dir():
        for p in work_dir.iterdir():
            m = CKPT_RE.match(p.name)
            if m and (p / COMPLETE).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def torn_checkpoints(work_dir: Path) -> list[Path]:
    if not work_dir.is_dir():
        return []
    return sorted(p for p in work_dir.iterdir() if CKPT_RE.match(p.name) and not (p / COMPLETE).is_file())


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rng_state() -> dict:
    import torch

    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])


# ---------------------------------------------------------------- distributed


def ensure_dist_env() -> None:
    """A lone process gets the rendezvous variables DeepSpeed would otherwise look for through MPI."""
    from .launch import free_port

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))


def deepspeed_config(s: TrainSettings) -> dict:
    return {
        "train_micro_batch_size_per_gpu": s.batch_size,
        "gradient_accumulation_steps": s.accumulative_counts,
        # We own the accumulation window: backward() only accumulates and
        # step() is the boundary, so a short last window still steps.
        "managed_gradient_accumulation": False,
        "gradient_clipping": s.max_norm,
        "zero_optimization": {"stage": 2, "overlap_comm": False},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
    }


# ---------------------------------------------------------------- the loop


def train(model_dir: str | os.PathLike, data_file: str | os.PathLike, work_dir: str | os.PathLike,
          settings: TrainSettings, *, result: str | os.PathLike, threads: int | None = None,
          provenance: str | os.PathLike | None = None, config_record: dict | None = None,
          workflow_dir: str | os.PathLike = ".") -> dict:
    """Train (or resume) and return the summary written to ``result`` (and ``provenance``)."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from .data import read_records
    from .model import load_for_training, load_tokenizer, pick_device

    s = settings
    work_dir, result = Path(work_dir), Path(result)
    if threads:
        torch.set_num_threads(threads)
    ensure_dist_env()
    device = pick_device()
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    main = rank == 0
    work_dir.mkdir(parents=True, exist_ok=True)
    metrics_path, evals_path = work_dir / "metrics.jsonl", work_dir / "eval_outputs.jsonl"
    runs_path = work_dir / "runs.jsonl"  # one line per start of this training, for provenance

    random.seed(s.seed)
    torch.manual_seed(s.seed)

    tokenizer = load_tokenizer(model_dir, s.trust_remote_code)
    samples, data_stats = encode_dataset(read_records(data_file), tokenizer, s)
    if not samples:
        raise ValueError(f"{data_file}: no record has a supervised token after encoding")
    rows = pack(samples, s.max_length, s.seed) if s.pack_to_max_length else as_rows(samples)
    n_tokens = sum(len(r.input_ids) for r in rows)
    ipe = iters_per_epoch(len(rows), s, world)
    total_iters = ipe * s.max_epochs
    ends = window_ends(total_iters, s.accumulative_counts)
    if main:
        log.info("data: %s; %d rows of %d tokens (packing %s); %d ranks; %d iterations/epoch, %d in all, "
                 "%d optimizer steps", data_stats, len(rows), n_tokens, "on" if s.pack_to_max_length else "off",
                 world, ipe, total_iters, len(ends))
        real = sum(len(rows[i].input_ids) for b in epoch_batches(len(rows), 0, s, rank, world) for i in b)
        padded = sum(len(b) * max(len(rows[i].input_ids) for i in b) for b in epoch_batches(len(rows), 0, s, rank, world))
        log.info("epoch 0 on rank %d: %d real tokens, padding fraction %.3f, %.0f tokens per optimizer step",
                 rank, real, 1 - real / padded, real * world / math.ceil(ipe / s.accumulative_counts))
        if data_stats["truncated_samples"]:
            log.warning("%d samples were longer than max_length=%d: %d tokens cut off",
                        data_stats["truncated_samples"], s.max_length, data_stats["truncated_tokens"])

    model = load_for_training(model_dir, s.lora, quantization=s.quantization,
                              trust_remote_code=s.trust_remote_code,
                              gradient_checkpointing=s.gradient_checkpointing, device=device)
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
    # The step that closes a window uses the LR of the window's first iteration, so the LR per
    # optimizer step does not depend on how a global batch is split into accumulation and ranks
    # (XTuner samples the window's last iteration: acc-1 iterations later).
    starts = [0, *ends[:-1]]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(starts[min(step, len(starts) - 1)], total_iters, s.warmup_ratio))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(s))

    # ---- resume
    iteration, resumed_from = 0, None
    fingerprint = run_fingerprint(s, Path(data_file), Path(model_dir), world)
    if main:
        for torn in torn_checkpoints(work_dir):
            log.warning("ignoring %s: it was not completely written (no %s)", torn, COMPLETE)
        moved = set_aside(work_dir, fingerprint)
        if moved:
            log.warning("checkpoints made with other settings, data, model or rank count moved to %s; "
                        "training starts from iteration 0", moved)
    dist.barrier()
    done = complete_checkpoints(work_dir)
    if done:
        iteration, ckpt = done[-1]
        engine.load_checkpoint(str(work_dir), tag=ckpt.name, load_module_strict=False)
        rng_file = ckpt / f"rng_state_{rank}.pt"
        if rng_file.exists():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        resumed_from = iteration
        if main:
            log.info("resuming from %s: iteration %d of %d", ckpt, iteration, total_iters)
            _truncate_jsonl(metrics_path, lambda r: r["iter"] <= iteration)
            _truncate_jsonl(evals_path, lambda r: r["iter"] <= iteration)
    elif main:
        for p in (metrics_path, evals_path, runs_path):
            p.unlink(missing_ok=True)
    if main:
        with runs_path.open("a") as f:
            f.write(json.dumps({"start": _now(), "resumed_from": resumed_from, "world_size": world}) + "\n")

    def evaluate(at: int) -> None:
        if main and s.evaluation_inputs:
            t0 = time.time()
            answers = generate_answers(engine.module, tokenizer, s.template, s.evaluation_inputs,
                                       system=s.SYSTEM, max_new_tokens=s.evaluation_max_new_tokens)
            with evals_path.open("a") as f:
                f.write(json.dumps({"iter": at, "answers": as_dicts(answers)}, ensure_ascii=False) + "\n")
            for a in answers:
                log.info("eval iter %d | %s -> %s", at, a.prompt, a.answer)
            log.info("evaluation took %.1f s", time.time() - t0)
        dist.barrier()

    def save(at: int) -> None:
        tag = f"iter_{at}.pth"
        engine.save_checkpoint(str(work_dir), tag=tag, client_state={"iteration": at, "world_size": world},
                               exclude_frozen_parameters=True)
        torch.save(_rng_state(), work_dir / tag / f"rng_state_{rank}.pt")
        dist.barrier()
        if main:
            _atomic_write(work_dir / tag / COMPLETE,
                          json.dumps({"iteration": at, "world_size": world, "fingerprint": fingerprint}))
            _atomic_write(work_dir / "last_checkpoint", str((work_dir / tag).resolve()))
            keep = {p for _, p in complete_checkpoints(work_dir)[-s.save_total_limit:]}
            for _, p in complete_checkpoints(work_dir):
                if p not in keep:
                    shutil.rmtree(p)
            log.info("saved %s", work_dir / tag)
        dist.barrier()

    if iteration == 0:
        evaluate(0)
    engine.train()
    t_start = time.time()
    batches_cache: dict[int, list[list[int]]] = {}
    for step, (start, end) in enumerate(zip([0, *ends[:-1]], ends), start=1):
        if end <= iteration:
            continue
        t0 = time.time()
        window, real_tokens = [], 0
        for it in range(start, end):
            epoch, k = divmod(it, ipe)
            if epoch not in batches_cache:
                batches_cache = {epoch: epoch_batches(len(rows), epoch, s, rank, world)}
            batch = [rows[i] for i in batches_cache[epoch][k]]
            real_tokens += sum(len(r.input_ids) for r in batch)
            window.append(collate(batch, tokenizer.pad_token_id))
        counts = torch.tensor([float(sum((lab[:, 1:] != IGNORE_INDEX).sum() for _, lab, _ in window)),
                               float(sum(ids.numel() for ids, _, _ in window)), float(real_tokens)])
        dist.all_reduce(counts)
        n_sup, n_tok, n_real = counts.tolist()
        loss_total = torch.zeros(())
        for ids, labels, pos in window:
            ids, labels, pos = ids.to(engine.device), labels.to(engine.device), pos.to(engine.device)
            loss_sum = token_loss_sum(engine, ids, labels, pos)
            # Normalise by the supervised tokens of the whole window on all
            # ranks (not a mean of per-batch means); ZeRO averages gradients
            # over ranks, hence the factor world.
            engine.backward(loss_sum * world / n_sup, scale_wrt_gas=False)
            loss_total += loss_sum.detach().cpu()
        lr = optimizer.param_groups[0]["lr"]
        engine.step()
        grad_norm = engine.get_global_grad_norm()
        dist.all_reduce(loss_total)
        iteration = end
        dt = time.time() - t0
        if main:
            row = {"iter": iteration, "epoch": (iteration - 1) // ipe, "step": step,
                   "loss": loss_total.item() / n_sup, "lr": lr,
                   "grad_norm": float(grad_norm) if grad_norm is not None else None,
                   "tokens": int(n_tok), "real_tokens": int(n_real), "padding_fraction": 1 - n_real / n_tok,
                   "supervised_tokens": int(n_sup), "tokens_per_s": n_real / dt,
                   "time_s": dt}
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            log.info("iter %d/%d step %d loss %.4f lr %.3g grad_norm %s %.0f tok/s", iteration, total_iters,
                     row["step"], row["loss"], lr, row["grad_norm"], row["tokens_per_s"])
        # A multiple of save_steps (evaluation_freq) inside this window is
        # honoured at the window's end: checkpoints fall on optimizer steps.
        if end == total_iters or end // s.save_steps > start // s.save_steps:
            save(end)
        if end == total_iters or end // s.evaluation_freq > start // s.evaluation_freq:
            evaluate(end)

    summary = {}
    if main:
        final = work_dir / f"iter_{total_iters}.pth"
        summary = {"checkpoint": str(final), "iterations": total_iters, "optimizer_steps": len(ends),
                   "world_size": world, "resumed_from": resumed_from, "data": data_stats, "rows": len(rows),
                   "tokens_per_epoch": n_tokens, "train_seconds_this_run": time.time() - t_start,
                   "settings": asdict(s)}
        runs = [json.loads(line) for line in runs_path.read_text().splitlines() if line.strip()]
        runs[-1]["end"] = _now()
        _atomic_write(runs_path, "".join(json.dumps(r) + "\n" for r in runs))
        summary["runs"] = runs
        if provenance:
            from . import provenance as prov

            prov.write(provenance, config=config_record or {"train": asdict(s)}, data_file=data_file,
                       model_dir=model_dir, workflow_dir=workflow_dir, seed=s.seed, world_size=world, runs=runs,
                       device=device)
        result.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(result, json.dumps(summary, indent=1, ensure_ascii=False))
    dist.barrier()
    return summary


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _truncate_jsonl(path: Path, keep) -> None:
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        _atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows if keep(r)))
