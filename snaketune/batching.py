"""Training data as the trainer takes it: records encoded, packed into rows, ordered into micro-batches.

Pure functions of the records, the tokenizer and the settings (no model), so
they are tested without one. Iterations count micro-batches, as in XTuner;
each rank takes every ``world``-th row of an epoch's order (:func:`epoch_order`).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

from .config import TrainConfig
from .data import LOSS_KEY
from .encoding import IGNORE_INDEX, Encoded, encode_conversation


@dataclass
class Row:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    kl: list[int] = field(default_factory=list)  # per token, 1 in a sample trained with loss kl; [] when none is
    # the base model's top-k next tokens and log-probabilities at each distilled position, in order
    # (losses.base_top_k, computed once before training: train.cache_base_top_k); None: computed at each step
    teacher: tuple | None = field(default=None, compare=False, repr=False)


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
    stats = dict(
        samples=len(kept),
        dropped_no_labels=dropped,
        truncated_samples=truncated_samples,
        truncated_tokens=truncated_tokens,
        kl_samples=kl,
    )
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
    return [
        Row(
            smp.input_ids,
            smp.labels,
            list(range(len(smp.input_ids))),
            [1] * len(smp.input_ids) if getattr(smp, "kl", False) else [],
        )
        for smp in samples
    ]


def collate(rows: list[Row], pad_id: int):
    """Right-pad; pads get their own position ids so they form a separate (unsupervised) block.
    Returns ids, labels, position ids, the kl marks (None when no row has a kl sample) and the base
    model's top-k ids and log-probabilities at the distilled positions (None when not cached)."""
    import torch

    width = max(len(r.input_ids) for r in rows)
    ids, labels, pos = [], [], []
    for r in rows:
        n = width - len(r.input_ids)
        ids.append(r.input_ids + [pad_id] * n)
        labels.append(r.labels + [IGNORE_INDEX] * n)
        pos.append(r.position_ids + list(range(n)))
    marks = teacher_ids = teacher_logp = None
    if any(r.kl for r in rows):
        marks = torch.tensor(
            [(r.kl or [0] * len(r.input_ids)) + [0] * (width - len(r.input_ids)) for r in rows], dtype=torch.bool
        )
        cached = [r.teacher for r in rows if r.kl]
        if all(t is not None for t in cached):
            teacher_ids, teacher_logp = (torch.cat(parts) for parts in zip(*cached))
    return torch.tensor(ids), torch.tensor(labels), torch.tensor(pos), marks, teacher_ids, teacher_logp


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
        ranked = sorted(order[start : start + block], key=lambda i: -lengths[i])  # stable: ties stay shuffled
        full = len(ranked) // global_batch * global_batch
        batches = [ranked[i : i + global_batch] for i in range(0, full, global_batch)]
        for k in torch.randperm(len(batches), generator=generator).tolist():
            out += batches[k]
        out += ranked[full:]
    return out


def epoch_batches(
    n_rows: int, epoch: int, cfg: TrainConfig, rank: int, world: int, lengths: list[int] | None = None
) -> list[list[int]]:
    """Row indices of each of this rank's micro-batches in ``epoch`` (see :func:`epoch_order`):
    every ``world``-th index of the epoch's order, in batches; the last batch may be short."""
    mine = epoch_order(n_rows, epoch, cfg, world, lengths)[rank::world]
    return [mine[i : i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]


def passes(batch: list[Row], rows: int) -> list[list[Row]]:
    """A micro-batch's forward/backward passes: its rows sorted by length, ``rows`` at a time (each
    pass is padded to its own longest row), or the batch as it is when one pass takes it all."""
    if rows >= len(batch):
        return [batch]
    ranked = sorted(batch, key=lambda r: len(r.input_ids))  # stable: a resumed run cuts the same passes
    return [ranked[i : i + rows] for i in range(0, len(ranked), rows)]


def iters_per_epoch(n_rows: int, cfg: TrainConfig, world: int) -> int:
    return math.ceil(math.ceil(n_rows / world) / cfg.batch_size)


class Batches:
    """This rank's micro-batches by iteration, one epoch's order in memory at a time."""

    def __init__(
        self, rows: list[Row], iters_per_epoch: int, cfg: TrainConfig, pad_id: int, rank: int, world: int, rows_per: int
    ):
        self.rows, self.iters_per_epoch, self.cfg, self.pad_id = rows, iters_per_epoch, cfg, pad_id
        self.rank, self.world, self.rows_per = rank, world, rows_per
        self.lengths = [len(r.input_ids) for r in rows]
        self.epoch, self.order = -1, []

    def window(self, start: int, end: int) -> tuple[list[tuple], int]:
        """The collated passes of iterations [start, end) and their real (unpadded) tokens."""
        out, real = [], 0
        for it in range(start, end):
            epoch, k = divmod(it, self.iters_per_epoch)
            if epoch != self.epoch:
                self.epoch = epoch
                self.order = epoch_batches(len(self.rows), epoch, self.cfg, self.rank, self.world, self.lengths)
            batch = [self.rows[i] for i in self.order[k]]
            real += sum(len(r.input_ids) for r in batch)
            out += [collate(p, self.pad_id) for p in passes(batch, self.rows_per)]
        return out, real
