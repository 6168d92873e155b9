"""The training speed levers change how fast a step runs, never what it computes.

Each lever is checked against the plain computation it replaces: the output head at supervised
positions only (same loss and LoRA gradients as the full head), batches grouped by length (every
sample once per epoch, the same samples per optimizer step however the global batch is split,
exact resume, less padding), gradient checkpointing decided by memory (same loss and gradients
as checkpointing on, and an activation estimate that covers what autograd really keeps), passes of
fewer rows (the same loss and gradients as the whole micro-batch, less padding; split before
checkpointing when memory is short), the fused optimizer inside ZeRO-2 (the same update as plain
AdamW), and the train step started on tcmalloc (the same training as on glibc's malloc).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from snaketune.checkpoints import complete_checkpoints
from snaketune.config import LoraConfig, TrainConfig
from snaketune.lora_state import read_lora_state

from .helpers import (
    TINY_BASE,
    assert_same_state,
    kill_at_checkpoint,
    missing,
    read_jsonl,
    run,
    train_cmd,
    train_exact,
    unequal_data,
)


@pytest.fixture(scope="module")
def batch(tokenizer):
    """Two conversations of unequal length, right-padded: some positions supervised, some prompt, some pad."""
    from snaketune.batching import as_rows, collate, encode_dataset

    samples, _ = encode_dataset(
        [
            {"conversation": [{"input": "Who are you?", "output": "A small test model."}]},
            {
                "conversation": [
                    {
                        "input": "Question 7, a longer one?",
                        "output": "the quick brown fox jumps over a lazy dog while seven small birds sing",
                    }
                ]
            },
        ],
        tokenizer,
        TrainConfig(template="internlm2_chat", max_length=64),
    )
    assert len({len(s.input_ids) for s in samples}) == 2
    return collate(as_rows(samples), tokenizer.pad_token_id)[:3]  # ids, labels, positions: no kl sample


def lora_model(dropout=0.0, gradient_checkpointing=False):
    """The tiny model in NF4 with LoRA whose B is random (at B = 0, A's gradient would be zero)."""
    from snaketune.model import load_for_training

    torch.manual_seed(0)
    model = load_for_training(
        TINY_BASE,
        LoraConfig(r=8, alpha=16, dropout=dropout),
        device="cpu",
        gradient_checkpointing=gradient_checkpointing,
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model.train()


def full_head_loss(model, ids, labels, pos):
    """The plain computation: logits at every position, cross-entropy ignoring unsupervised ones."""
    logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )


def loss_and_grads(model, loss_fn, batch, seed=1):
    model.zero_grad()
    torch.manual_seed(seed)  # the same dropout masks for both computations
    loss = loss_fn(model, *batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a, b, rtol=1e-5, atol=1e-7):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=0)
    assert grads_a.keys() == grads_b.keys() and any(g.abs().sum() > 0 for g in grads_a.values())
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=atol, msg=name)


# ---------------------------------------------------------------- output head at supervised positions


def test_head_at_supervised_positions_only_gives_the_full_heads_loss_and_gradients(batch):
    from snaketune.losses import token_loss_sum

    model = lora_model()
    rows = []
    hook = model.get_base_model().lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape))
    fast = loss_and_grads(model, token_loss_sum, batch)
    plain = loss_and_grads(model, full_head_loss, batch)
    hook.remove()
    assert_same(fast, plain)
    _, labels, _ = batch
    supervised = int((labels[:, 1:] != -100).any(0).sum())  # positions supervised in some row
    # the head ran at those positions alone, the full head at all of them
    assert rows[0] == (2, supervised, 64) and rows[1] == (*labels.shape, 64)
    assert supervised < 0.7 * labels.shape[1]


def test_a_model_without_logits_to_keep_gets_the_full_head(batch):
    from snaketune.losses import accepts_logits_to_keep, token_loss_sum

    class Plain(torch.nn.Module):  # a forward without logits_to_keep (older or hub code)
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, position_ids=None, use_cache=False):
            return self.inner(input_ids=input_ids, position_ids=position_ids, use_cache=use_cache)

    model = lora_model()
    wrapped = Plain(model.get_base_model())
    assert accepts_logits_to_keep(model) and not accepts_logits_to_keep(wrapped)
    with torch.no_grad():
        torch.testing.assert_close(token_loss_sum(wrapped, *batch), full_head_loss(model, *batch), rtol=1e-6, atol=0)


# ---------------------------------------------------------------- gradient checkpointing decided by memory


def test_without_checkpointing_loss_and_gradients_equal_checkpointing_on(batch):
    """With LoRA dropout on: checkpointing replays the random state, so the masks (and gradients) match."""
    from snaketune.losses import token_loss_sum

    on = lora_model(dropout=0.1, gradient_checkpointing=True)
    off = lora_model(dropout=0.1, gradient_checkpointing=False)
    assert on.get_base_model().is_gradient_checkpointing and not off.get_base_model().is_gradient_checkpointing
    assert_same(loss_and_grads(off, token_loss_sum, batch), loss_and_grads(on, token_loss_sum, batch))


def saved_activation_bytes(model, batch) -> int:
    """What autograd keeps for backward in one forward, parameters (and 4-bit weights) left out."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            nested = [state.state2.absmax, state.state2.code] if state.nested else []
            weights |= {t.untyped_storage().data_ptr() for t in [state.absmax, state.code, *nested]}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        full_head_loss(model, *batch)
    return sum(seen.values())


def test_activation_estimate_covers_what_autograd_keeps(batch):
    from snaketune.model import activation_bytes

    tokens = batch[0].numel()
    measured = {p: saved_activation_bytes(lora_model(dropout=p), batch) for p in (0.0, 0.1)}
    estimate = {p: activation_bytes(lora_model().config, tokens, p) for p in (0.0, 0.1)}
    for p in (0.0, 0.1):
        # above what is kept, and not far above: the estimate adds the head's two transient gradients
        # (logits-sized) of the start of backward, which dominate for this tiny model with a real vocabulary
        assert measured[p] <= estimate[p] <= 4 * measured[p]
    # LoRA dropout keeps each adapted layer's dropped input and mask: the estimate grows by as much
    assert measured[0.1] - measured[0.0] <= estimate[0.1] - estimate[0.0] <= 2 * (measured[0.1] - measured[0.0])


def test_auto_splits_the_micro_batch_then_checkpoints_only_when_memory_is_short(monkeypatch):
    """rows_per_pass and gradient_checkpointing auto: the whole micro-batch when its activations fit half
    the free memory, else the most rows that do, and checkpointing only when not even one row's fit."""
    from snaketune import model as model_module
    from snaketune.batching import Row
    from snaketune.train import Plan, fit_to_memory

    plan = Plan([Row([1] * 40, [1] * 40, list(range(40)), [])], {}, 1, 1, [1])
    config = lora_model().config
    need = {n: model_module.activation_bytes(config, n * 40, 0.1) for n in (1, 2, 3, 4)}
    cases = [  # (free memory, settings) -> (rows per pass, checkpointing)
        (100 * need[4], {}, (4, False)),
        (2 * need[4], {}, (4, False)),
        (2 * need[3], {}, (3, False)),
        (2 * need[2], {}, (2, False)),
        (2 * need[1], {}, (1, False)),
        (need[1], {}, (4, True)),
        (need[1], {"gradient_checkpointing": False}, (1, False)),
        (100 * need[4], {"gradient_checkpointing": True}, (4, True)),
        (100 * need[4], {"rows_per_pass": 2}, (2, False)),
        (2 * need[1], {"rows_per_pass": 2}, (2, True)),
        (need[1], {"rows_per_pass": 2, "gradient_checkpointing": False}, (2, False)),
    ]
    for free, settings, expected in cases:
        monkeypatch.setattr(model_module, "available_memory", lambda device, free=free: free)
        cfg = TrainConfig(
            template="internlm2_chat", batch_size=4, lora=LoraConfig(r=8, alpha=16, dropout=0.1), **settings
        )
        model = lora_model(dropout=0.1, gradient_checkpointing=cfg.gradient_checkpointing is True)
        rows = fit_to_memory(model, cfg, plan, "cpu")
        assert (rows, model.get_base_model().is_gradient_checkpointing) == expected, (free, settings)


# ---------------------------------------------------------------- batches grouped by length


def steps_of(lengths, epoch, *, batch_size, acc, world, seed=0):
    """The samples of each optimizer step, from each rank's micro-batches, as the trainer draws them."""
    from snaketune.batching import epoch_batches, iters_per_epoch

    cfg = TrainConfig(
        template="default", batch_size=batch_size, accumulative_counts=acc, seed=seed, group_by_length=True
    )
    per_rank = [epoch_batches(len(lengths), epoch, cfg, r, world, lengths) for r in range(world)]
    assert all(len(b) == iters_per_epoch(len(lengths), cfg, world) for b in per_rank)
    micro = [[i for b in per_rank for i in b[k]] for k in range(len(per_rank[0]))]  # one iteration, all ranks
    return [sorted(i for m in micro[k : k + acc] for i in m) for k in range(0, len(micro), acc)], per_rank


def padding(batches, lengths):
    return 1 - sum(lengths[i] for b in batches for i in b) / sum(len(b) * max(lengths[i] for i in b) for b in batches)


def test_length_groups_keep_each_step_the_same_however_the_global_batch_is_split():
    lengths = [(7 * i) % 23 + 5 for i in range(96)]
    for epoch in (0, 1):
        splits = [
            dict(batch_size=4, acc=2, world=1),
            dict(batch_size=4, acc=1, world=2),
            dict(batch_size=2, acc=2, world=2),
            dict(batch_size=1, acc=8, world=1),
            dict(batch_size=8, acc=1, world=1),
        ]
        steps = [steps_of(lengths, epoch, **s)[0] for s in splits]
        assert all(s == steps[0] for s in steps[1:])
        assert sorted(i for s in steps[0] for i in s) == list(range(96))  # every sample once per epoch
    assert (
        steps_of(lengths, 0, batch_size=4, acc=2, world=1)[0] != steps_of(lengths, 1, batch_size=4, acc=2, world=1)[0]
    )


def test_length_groups_are_seeded_and_cut_the_padding():
    from snaketune.batching import epoch_batches

    lengths = [(7 * i) % 23 + 5 for i in range(96)]
    on = TrainConfig(template="default", batch_size=4, accumulative_counts=1, group_by_length=True)
    off = TrainConfig(template="default", batch_size=4, accumulative_counts=1)
    grouped = epoch_batches(96, 0, on, 0, 1, lengths)
    assert grouped == epoch_batches(96, 0, on, 0, 1, lengths)  # seeded: a resumed run draws the same
    assert grouped != epoch_batches(
        96,
        0,
        TrainConfig(template="default", batch_size=4, accumulative_counts=1, group_by_length=True, seed=1),
        0,
        1,
        lengths,
    )
    plain = epoch_batches(96, 0, off, 0, 1, lengths)
    assert plain == epoch_batches(96, 0, off, 0, 1)  # off: the sampler as before, lengths or not
    assert sorted(i for b in grouped for i in b) == list(range(96))
    assert padding(grouped, lengths) < 0.03 and padding(plain, lengths) > 0.2
    # the global batches are shuffled: not longest first, not sorted through the epoch
    longest = [max(lengths[i] for i in b) for b in grouped]
    assert longest != sorted(longest, reverse=True) and longest != sorted(longest)


@pytest.mark.slow
def test_grouped_training_on_two_ranks_equals_one_rank_with_double_accumulation(exact_training, tmp_path):
    """test_parallel's guarantee with group_by_length on: the same samples per optimizer step."""
    w2, s2 = train_exact(tmp_path, "two", ranks=2, batch_size=2, accumulative_counts=1, group_by_length=True)
    w1, s1 = train_exact(tmp_path, "one", ranks=1, batch_size=2, accumulative_counts=2, group_by_length=True)
    m2, m1 = read_jsonl(w2 / "metrics.jsonl"), read_jsonl(w1 / "metrics.jsonl")
    assert [r["supervised_tokens"] for r in m2] == [r["supervised_tokens"] for r in m1]
    assert [r["loss"] for r in m2] == pytest.approx([r["loss"] for r in m1], rel=1e-5)
    a, b = read_lora_state(s2["checkpoint"]), read_lora_state(s1["checkpoint"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    # and grouping did its job: less padding than the same run without it
    mp = read_jsonl(exact_training[0] / "metrics.jsonl")  # the same run without grouping
    assert sum(r["tokens"] for r in m1) < sum(r["tokens"] for r in mp)
    assert sum(r["real_tokens"] for r in m1) == sum(r["real_tokens"] for r in mp)


@pytest.mark.slow
def test_killed_grouped_training_resumes_bit_identical(tmp_path):
    data = unequal_data(tmp_path / "unequal.json")
    over = dict(group_by_length=True, lora={"r": 8, "alpha": 16, "dropout": 0.1})
    ref_out = tmp_path / "ref.json"
    run(train_cmd(tmp_path / "ref", ref_out, data=data, **over))
    work, out = tmp_path / "run", tmp_path / "run.json"
    kill_at_checkpoint(train_cmd(work, out, data=data, **over), work)
    k = complete_checkpoints(work)[-1][0]
    run(train_cmd(work, out, data=data, **over))
    summary = json.loads(out.read_text())
    assert summary["resumed_from"] == k < summary["iterations"]
    a, b = read_lora_state(json.loads(ref_out.read_text())["checkpoint"]), read_lora_state(summary["checkpoint"])
    assert_same_state(a, b)
    assert [r["loss"] for r in read_jsonl(work / "metrics.jsonl")] == [
        r["loss"] for r in read_jsonl(tmp_path / "ref" / "metrics.jsonl")
    ]


# ---------------------------------------------------------------- passes of fewer rows


def test_passes_of_fewer_rows_give_the_whole_batchs_loss_and_gradients(tokenizer):
    from snaketune.batching import as_rows, collate, encode_dataset, passes
    from snaketune.losses import token_loss_sum

    answers = ["ok", "the quick brown fox jumps over a lazy dog", "seven small birds", "a b c d e f g h i j k l"]
    samples, _ = encode_dataset(
        [{"conversation": [{"input": f"Question {i}?", "output": a}]} for i, a in enumerate(answers)],
        tokenizer,
        TrainConfig(template="internlm2_chat", max_length=64),
    )
    rows = as_rows(samples)
    lengths = [len(r.input_ids) for r in rows]
    assert len(set(lengths)) == 4
    model = lora_model()

    def in_passes(k):
        def loss_fn(model, *_):
            return sum(token_loss_sum(model, *collate(p, tokenizer.pad_token_id)[:3]) for p in passes(rows, k))

        return loss_fn

    whole_loss, whole = loss_and_grads(model, token_loss_sum, collate(rows, tokenizer.pad_token_id)[:3])
    for k in (1, 2, 3):
        loss, grads = loss_and_grads(model, in_passes(k), ())
        torch.testing.assert_close(loss, whole_loss, rtol=1e-6, atol=0)
        # other matrix shapes sum in another order: equal to fp32 rounding of each tensor's scale
        # (measured: at most 4e-6 of it for passes of one row)
        for name, g in whole.items():
            assert (grads[name] - g).abs().max() <= 2e-5 * g.abs().max(), (k, name)
    # the passes hold every row once, shortest first, and pad to their own longest row only
    cut = passes(rows, 2)
    assert [[len(r.input_ids) for r in p] for p in cut] == [sorted(lengths)[:2], sorted(lengths)[2:]]
    padded = sum(len(p) * max(len(r.input_ids) for r in p) for p in cut)
    s = sorted(lengths)
    assert padded == 2 * s[1] + 2 * s[3] < 4 * s[3]
    assert passes(rows, 4) == [rows]  # one pass: the batch as it is


@pytest.mark.slow
def test_training_in_passes_of_one_row_equals_whole_micro_batches(tmp_path):
    """The same optimizer steps however a micro-batch is cut into passes; fewer padded tokens."""
    data = unequal_data(tmp_path / "unequal.json")
    runs = {}
    for k in (1, 4):
        out = tmp_path / f"rows{k}.json"
        run(
            train_cmd(
                tmp_path / f"rows{k}",
                out,
                data=data,
                batch_size=4,
                accumulative_counts=1,
                max_epochs=1,
                rows_per_pass=k,
                lora={"r": 8, "alpha": 16, "dropout": 0.0},
            )
        )
        runs[k] = json.loads(out.read_text()), read_jsonl(tmp_path / f"rows{k}" / "metrics.jsonl")
    (s1, m1), (s4, m4) = runs[1], runs[4]
    assert [r["supervised_tokens"] for r in m1] == [r["supervised_tokens"] for r in m4]
    assert [r["real_tokens"] for r in m1] == [r["real_tokens"] for r in m4]
    assert [r["loss"] for r in m1] == pytest.approx([r["loss"] for r in m4], rel=1e-5)
    assert sum(r["tokens"] for r in m1) == sum(r["real_tokens"] for r in m1) < sum(r["tokens"] for r in m4)
    a, b = read_lora_state(s1["checkpoint"]), read_lora_state(s4["checkpoint"])
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- the optimizer


@pytest.fixture
def process_group():
    """A one-process group in this process, gone afterwards with the rendezvous variables it set: a
    training started later from this process (a subprocess) must not inherit RANK or a taken port."""
    from snaketune.train import setup_distributed

    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in names}
    setup_distributed(1)
    yield
    torch.distributed.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_fused_adamw_in_zero2_makes_plain_adamws_update(batch, process_group):
    """build_engine's fused AdamW, run by ZeRO-2 over its flat partition, moves the LoRA weights as
    plain per-parameter AdamW of the same settings does, step after step."""
    from snaketune.losses import token_loss_sum
    from snaketune.model import load_for_training
    from snaketune.train import Plan, build_engine

    cfg = TrainConfig(
        template="internlm2_chat",
        batch_size=2,
        accumulative_counts=1,
        lr=1e-2,
        weight_decay=0.01,
        max_norm=1e9,
        warmup_ratio=0.0,
        gradient_checkpointing=False,
        lora=LoraConfig(r=8, alpha=16, dropout=0.0),
    )
    torch.manual_seed(0)
    engine, optimizer, _ = build_engine(TINY_BASE, cfg, Plan([], {}, 4, 4, [1, 2, 3, 4]), "cpu", False)
    assert optimizer.optimizer.param_groups[0]["fused"]
    plain_model = load_for_training(TINY_BASE, cfg.lora, device="cpu", gradient_checkpointing=False)
    trained = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    mine = {n: p for n, p in plain_model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in mine.items():
            p.copy_(trained[n])
    start = {n: p.detach().clone() for n, p in mine.items()}
    plain = torch.optim.AdamW(mine.values(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    engine.train()
    plain_model.train()
    n_sup = int((batch[1][:, 1:] != -100).sum())
    for _ in range(3):
        engine.backward(token_loss_sum(engine, *batch) / n_sup, scale_wrt_gas=False)
        plain.param_groups[0]["lr"] = optimizer.param_groups[0]["lr"]  # the schedule's lr of this step
        engine.step()
        plain.zero_grad()
        (token_loss_sum(plain_model, *batch) / n_sup).backward()
        plain.step()
        # Adam divides by sqrt(v): where a gradient is near zero, a last-bit difference of the fused
        # kernel's arithmetic moves that weight by up to lr; per tensor, the updates agree to 1e-4
        for n, p in mine.items():
            plain_update, engine_update = p.detach() - start[n], trained[n].detach() - start[n]
            assert (engine_update - plain_update).norm() <= 1e-4 * plain_update.norm() + 1e-12, n
    assert any("lora_B" in n and trained[n].abs().sum() > 0 for n in trained)


# ---------------------------------------------------------------- the allocator


@pytest.fixture(scope="module")
def tcmalloc():
    from snaketune.launch import find_tcmalloc

    lib = find_tcmalloc()
    if lib is None:
        missing("tcmalloc is not installed (Debian: libtcmalloc-minimal4)")
    return lib


def malloc_of_a_process(env):
    """What a fresh Python started in ``env`` runs on, read from its own memory map by this test."""
    code = "print(next((n for n in ('tcmalloc', 'jemalloc') if 'lib' + n in open('/proc/self/maps').read()), 'system'))"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
    ).stdout.strip()


def test_allocator_env_preloads_tcmalloc_once_and_fails_clearly_without_it(tcmalloc, monkeypatch):
    from snaketune import launch
    from snaketune.errors import ConfigError

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    env = launch.allocator_env("auto")
    assert env["LD_PRELOAD"] == tcmalloc and malloc_of_a_process(env) == "tcmalloc"
    assert env["TCMALLOC_RELEASE_RATE"] == "0"  # the user's own setting, when set, wins
    monkeypatch.setenv("TCMALLOC_RELEASE_RATE", "2")
    assert launch.allocator_env("auto")["TCMALLOC_RELEASE_RATE"] == "2"
    assert launch.allocator_env("tcmalloc")["LD_PRELOAD"] == tcmalloc
    assert launch.allocator_env("system") is None and malloc_of_a_process(dict(os.environ)) == "system"
    # a preload that was asked for but is not in this process: no second start (no exec loop)
    monkeypatch.setenv("LD_PRELOAD", tcmalloc)
    assert launch.allocator_env("auto") is None
    monkeypatch.delenv("LD_PRELOAD")
    with pytest.raises(ConfigError, match="train.allocator"):
        launch.allocator_env("jemalloc")
    # a machine without tcmalloc: auto falls back, an explicit request names the setting and the package
    monkeypatch.setattr(launch, "find_tcmalloc", lambda: None)
    assert launch.allocator_env("auto") is None
    with pytest.raises(ConfigError, match=r"train.allocator: tcmalloc.*libtcmalloc-minimal4"):
        launch.allocator_env("tcmalloc")


@pytest.mark.slow
def test_the_train_step_runs_on_tcmalloc_and_trains_exactly_as_on_glibc(reference_training, tmp_path, tcmalloc):
    """By hand, as the workflow's job runs it: auto restarts the step on tcmalloc (same pid, so a kill still
    reaches it); the losses and the LoRA weights are bit-identical to a run on glibc's malloc."""
    ref = reference_training  # train.allocator: auto (the default), started without LD_PRELOAD
    s_tc, m_tc, log_tc = ref.summary, read_jsonl(ref.work / "metrics.jsonl"), ref.log
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    out, log = tmp_path / "system.json", tmp_path / "system.log"
    run(train_cmd(tmp_path / "system", out, allocator="system") + ["--log", str(log)], env=env)
    s_sys, m_sys, log_sys = (
        json.loads(out.read_text()),
        read_jsonl(tmp_path / "system" / "metrics.jsonl"),
        log.read_text(),
    )
    assert s_tc["malloc"] == "tcmalloc" and s_sys["malloc"] == "system"
    assert f"LD_PRELOAD={tcmalloc}" in log_tc and "LD_PRELOAD" not in log_sys
    assert [r["loss"] for r in m_tc] == [r["loss"] for r in m_sys]
    a, b = read_lora_state(s_tc["checkpoint"]), read_lora_state(s_sys["checkpoint"])
    assert_same_state(a, b)
