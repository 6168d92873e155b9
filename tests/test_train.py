"""The training loop's pieces, and a real interrupted-and-resumed run."""

import json
import math
import os
import signal
import subprocess

import pytest
import torch

from snaketune.batching import epoch_batches, pack
from snaketune.checkpoints import COMPLETE, complete_checkpoints, torn_checkpoints
from snaketune.config import LoraConfig, TrainConfig
from snaketune.encoding import Encoded
from snaketune.errors import ConfigError
from snaketune.lora_state import read_lora_state
from snaketune.train import lr_factor, window_ends

from .helpers import (
    TINY_BASE,
    XTUNER,
    assert_same_state,
    interrupted_copy,
    kill_at_checkpoint,
    read_jsonl,
    run,
    train_cmd,
)


def test_lr_schedule_is_xtuners_linear_warmup_then_cosine():
    total, ratio = 100, 0.1
    assert lr_factor(0, total, ratio) == pytest.approx(1e-5)
    assert lr_factor(5, total, ratio) == pytest.approx(1e-5 + (1 - 1e-5) * 0.5)
    assert lr_factor(10, total, ratio) == pytest.approx(1.0)
    assert lr_factor(55, total, ratio) == pytest.approx(0.5)
    assert lr_factor(99, total, ratio) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert lr_factor(3, 10, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))


def test_accumulation_windows_end_with_a_short_one():
    assert window_ends(10, 4) == [4, 8, 10]
    assert window_ends(8, 4) == [4, 8]
    assert window_ends(3, 1) == [1, 2, 3]


def test_sampler_shards_a_seeded_permutation_across_ranks():
    s = TrainConfig(template="default", batch_size=2, seed=3)
    one = [i for b in epoch_batches(10, 0, s, 0, 1) for i in b]
    assert sorted(one) == list(range(10))
    assert one == [i for b in epoch_batches(10, 0, s, 0, 1) for i in b]  # same seed, same order
    assert one != [i for b in epoch_batches(10, 1, s, 0, 1) for i in b]  # new epoch, new order
    r0 = [i for b in epoch_batches(10, 0, s, 0, 2) for i in b]
    r1 = [i for b in epoch_batches(10, 0, s, 1, 2) for i in b]
    assert sorted(r0 + r1) == list(range(10)) and len(r0) == len(r1) == 5


def test_packing_keeps_samples_whole_and_restarts_positions():
    samples = [Encoded([10 * k + i for i in range(n)], [-100] + [1] * (n - 1)) for k, n in enumerate((5, 7, 3, 9, 2))]
    rows = pack(samples, max_length=12, seed=0)
    assert all(len(r.input_ids) <= 12 for r in rows)
    runs = []
    for r in rows:
        starts = [i for i, p in enumerate(r.position_ids) if p == 0]
        for a, b in zip(starts, starts[1:] + [len(r.input_ids)]):
            runs.append(r.input_ids[a:b])
        assert r.position_ids == [p for a, b in zip(starts, starts[1:] + [len(r.input_ids)]) for p in range(b - a)]
    # every sample appears exactly once, whole, starting at position 0
    assert sorted(runs) == sorted(s.input_ids for s in samples)
    assert pack(samples, 12, seed=0) == rows and pack(samples, 12, seed=1) != rows


@pytest.mark.slow
def test_killed_training_resumes_from_newest_checkpoint_and_matches(reference_training, tmp_path):
    """SIGKILL the real process after a checkpoint; the re-run resumes and ends bit-identical."""
    ref_work, ref = reference_training.work, reference_training.summary
    assert ref["iterations"] == 24 and ref["resumed_from"] is None

    work, out, log = tmp_path / "run", tmp_path / "run.json", tmp_path / "train.log"
    cmd = train_cmd(work, out) + ["--log", str(log)]
    kill_at_checkpoint(cmd, work)
    assert not out.exists(), "the final output must appear only when training finished"
    k = complete_checkpoints(work)[-1][0]
    assert 4 <= k < 24

    run(cmd)
    summary = json.loads(out.read_text())
    assert summary["resumed_from"] == k
    assert f"resuming from {work / f'iter_{k}.pth'}: iteration {k} of 24" in log.read_text()
    a, b = read_lora_state(ref["checkpoint"]), read_lora_state(summary["checkpoint"])
    assert_same_state(a, b)
    # the metrics log has each optimizer step once, as in the uninterrupted run
    assert [r["iter"] for r in read_jsonl(work / "metrics.jsonl")] == [
        r["iter"] for r in read_jsonl(ref_work / "metrics.jsonl")
    ]
    assert [r["loss"] for r in read_jsonl(work / "metrics.jsonl")] == [
        r["loss"] for r in read_jsonl(ref_work / "metrics.jsonl")
    ]
    # save_total_limit=3: only the three newest checkpoints remain
    assert [n for n, _ in complete_checkpoints(work)] == [16, 20, 24]


@pytest.mark.slow
def test_torn_checkpoint_is_ignored(trained, tmp_path):
    work, out = interrupted_copy(trained, tmp_path)  # a one-epoch run, killed after its last checkpoint
    # A checkpoint directory whose writing never finished (no completion marker)
    torn = work / "iter_999.pth"
    torn.mkdir()
    (torn / "mp_rank_00_model_states.pt").write_bytes(b"\x80garbage")
    assert torn_checkpoints(work) == [torn]
    run(train_cmd(work, out, max_epochs=1) + ["--log", str(tmp_path / "l.log")])
    text = (tmp_path / "l.log").read_text()
    assert "ignoring" in text and "iter_999.pth" in text and "resuming from" in text
    assert json.loads(out.read_text())["resumed_from"] == 8


@pytest.mark.slow
def test_training_log_records_loss_lr_grad_norm_and_throughput(tmp_path):
    work, out = tmp_path / "w", tmp_path / "o.json"
    run(
        train_cmd(
            work,
            out,
            max_epochs=1,
            warmup_ratio=0.5,
            evaluation_inputs=["你是谁"],
            evaluation_freq=4,
            evaluation_max_new_tokens=4,
        )
    )
    rows = read_jsonl(work / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["supervised_tokens"] > 0 for r in rows)
    # 4 warm-up iterations of 8; the optimizer steps closing windows [0,2), [2,4), ... use the lr
    # of iterations 0, 2, 4, 6 (the window's first)
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 * lr_factor(i, 8, 0.5) for i in (0, 2, 4, 6)])
    assert rows[0]["lr"] < rows[1]["lr"] < rows[2]["lr"] and rows[3]["lr"] < rows[2]["lr"]
    evals = read_jsonl(work / "eval_outputs.jsonl")
    assert [e["iter"] for e in evals] == [0, 4, 8]  # before training, every evaluation_freq, at the end
    assert evals[0]["answers"][0]["prompt"] == "你是谁"


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match=r"train: unknown key\(s\) batchsize"):
        TrainConfig.from_dict({"template": "default", "batchsize": 2}, "train")


def test_packed_row_loss_equals_sum_of_its_samples(tokenizer):
    """Packed samples do not attend to each other: a packed row's loss is the sum of the
    samples' losses run one by one (fp32, tolerance 1e-4 relative)."""
    from transformers import AutoModelForCausalLM

    from snaketune.batching import as_rows, collate, encode_dataset
    from snaketune.data import read_records
    from snaketune.losses import token_loss_sum

    model = AutoModelForCausalLM.from_pretrained(TINY_BASE, dtype=torch.float32).eval()
    s = TrainConfig(template="internlm2_chat", max_length=256)
    samples, _ = encode_dataset(read_records(XTUNER / "data.json")[:5], tokenizer, s)
    assert len({len(x.input_ids) for x in samples}) > 1  # unequal lengths
    rows = pack(samples, 1024, seed=0)
    assert len(rows) == 1 and len(rows[0].input_ids) == sum(len(x.input_ids) for x in samples)
    with torch.no_grad():
        packed = token_loss_sum(model, *collate(rows, tokenizer.pad_token_id))
        one_by_one = sum(token_loss_sum(model, *collate([r], tokenizer.pad_token_id)) for r in as_rows(samples))
        # and the same row with no restart of positions (XTuner's packing) attends across samples
        leaky = rows[0].__class__(rows[0].input_ids, rows[0].labels, list(range(len(rows[0].input_ids))))
        crossed = token_loss_sum(model, *collate([leaky], tokenizer.pad_token_id))
    torch.testing.assert_close(packed, one_by_one, rtol=1e-5, atol=1e-3)
    # the tolerance is far below the effect of attending across samples
    assert (crossed - one_by_one).abs() > 50 * max((packed - one_by_one).abs(), torch.tensor(1e-3))


def test_kl_loss_is_the_divergence_from_the_base_model_at_a_kl_samples_answers(tokenizer):
    """A record with loss kl is trained on KL(base || model) + KL(model || base) at its supervised
    positions, summed over the vocabulary; the others on cross-entropy. Expected values: the two
    divergences written out, with the base model's logits from a separate plain load of the base
    (no adapter), detached."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from snaketune.batching import as_rows, collate, encode_dataset
    from snaketune.data import read_records
    from snaketune.losses import token_loss_sum
    from snaketune.model import load_for_training

    first, second = read_records(XTUNER / "data.json")[:2]
    samples, stats = encode_dataset(
        [first, {**second, "loss": "kl"}], tokenizer, TrainConfig(template="internlm2_chat", max_length=64)
    )
    assert stats["kl_samples"] == 1 and [s.kl for s in samples] == [False, True]
    torch.manual_seed(0)
    model = load_for_training(TINY_BASE, LoraConfig(r=8, alpha=16, dropout=0.0), quantization="none", device="cpu")
    for name, p in model.named_parameters():
        if "lora_B" in name:  # an adapter that changes the outputs
            torch.nn.init.normal_(p, std=0.05)
    base = AutoModelForCausalLM.from_pretrained(TINY_BASE, dtype=torch.float32).eval()
    ids, labels, pos, kl, teacher_ids, _ = collate(as_rows(samples), tokenizer.pad_token_id)
    assert teacher_ids is None  # nothing cached: the base model runs in the step
    assert kl is not None and kl[1, : len(samples[1].input_ids)].all() and not kl[0].any()

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    got = grads(token_loss_sum(model, ids, labels, pos, kl))
    logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits[:, :-1].float()
    with torch.no_grad():
        base_logits = base(input_ids=ids, position_ids=pos, use_cache=False).logits[:, :-1].float()
    targets = labels[:, 1:]
    ce_at, kl_at = targets[0] != -100, targets[1] != -100
    ce = F.cross_entropy(logits[0][ce_at], targets[0][ce_at], reduction="sum")
    p_base, p_model = base_logits[1][kl_at].softmax(-1), logits[1][kl_at].softmax(-1)
    divergence = (p_base * (p_base.log() - p_model.log())).sum() + (p_model * (p_model.log() - p_base.log())).sum()
    assert divergence > 1e-3  # the adapter moved the model away from the base
    want = grads(ce + divergence)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-4, atol=1e-6, msg=name)
    # packed into one row, the same loss (the kl marks travel with their sample's tokens)
    with torch.no_grad():
        packed = token_loss_sum(model, *collate(pack(samples, 1024, seed=0), tokenizer.pad_token_id))
    torch.testing.assert_close(packed, want[0], rtol=1e-4, atol=1e-4)


def test_kl_top_k_is_the_divergence_over_the_base_models_top_k_and_one_bucket_for_the_rest(tokenizer):
    """kl_top_k: the base model's top k at each distilled position, computed once before training
    and kept on the rows, replace its forward pass in the step. Expected values: the base model's
    top k from a separate plain load of the base, the two distributions coarsened by hand to those
    k tokens plus everything else, and KL both ways written out; with k = the whole vocabulary, the
    loss and gradients of the exact path (the base model run in the step)."""
    from transformers import AutoModelForCausalLM

    from snaketune.batching import as_rows, collate, encode_dataset
    from snaketune.data import read_records
    from snaketune.losses import token_loss_sum
    from snaketune.model import load_for_training
    from snaketune.train import cache_base_top_k

    records = read_records(XTUNER / "data.json")[:3]
    samples, _ = encode_dataset(
        [records[0], {**records[1], "loss": "kl"}, {**records[2], "loss": "kl"}],
        tokenizer,
        TrainConfig(template="internlm2_chat", max_length=64),
    )
    torch.manual_seed(0)
    model = load_for_training(TINY_BASE, LoraConfig(r=8, alpha=16, dropout=0.0), quantization="none", device="cpu")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    base = AutoModelForCausalLM.from_pretrained(TINY_BASE, dtype=torch.float32).eval()
    vocab = base.config.vocab_size

    def loss_and_grads(rows):
        model.zero_grad()
        loss = token_loss_sum(model, *collate(rows, tokenizer.pad_token_id))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    exact_rows = as_rows(samples)
    exact = loss_and_grads(exact_rows)
    # the same row twice: computed once, both get it
    rows = as_rows(samples) + as_rows(samples[1:2])
    cache_base_top_k(model, rows, vocab, 2, tokenizer.pad_token_id)
    assert rows[0].teacher is None and rows[1].teacher is rows[3].teacher is not None
    whole = loss_and_grads(rows[:3])
    torch.testing.assert_close(whole[0], exact[0], rtol=1e-5, atol=1e-5)
    for name in exact[1]:
        torch.testing.assert_close(whole[1][name], exact[1][name], rtol=1e-4, atol=1e-6, msg=name)

    # half the vocabulary: the random tiny model spreads its mass thin, so the bucket for the rest must
    # hold a large share for it to count
    k = vocab // 2
    rows = as_rows(samples[1:])  # the distilled rows alone: the loss is the divergence alone
    cache_base_top_k(model, rows, k, 2, tokenizer.pad_token_id)
    got = loss_and_grads(rows)
    ids, labels, pos, _, teacher_ids, _ = collate(rows, tokenizer.pad_token_id)
    assert teacher_ids.shape[1] == k
    # in float64: 1 - the sum of half a vocabulary's probabilities is exact enough only there
    logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits[:, :-1].double()
    with torch.no_grad():
        base_logits = base(input_ids=ids, position_ids=pos, use_cache=False).logits[:, :-1].double()
    targets = labels[:, 1:]
    want = without_rest = 0
    for r in (0, 1):
        at = targets[r] != -100
        p_base, p_model = base_logits[r][at].softmax(-1), logits[r][at].softmax(-1)
        top = p_base.topk(k, -1).indices
        q_b, q_m = p_base.gather(-1, top), p_model.gather(-1, top)
        without_rest = without_rest + ((q_b - q_m) * (q_b.log() - q_m.log())).sum()
        q_b = torch.cat([q_b, 1 - q_b.sum(-1, keepdim=True)], -1)
        q_m = torch.cat([q_m, 1 - q_m.sum(-1, keepdim=True)], -1)
        want = want + (q_b * (q_b.log() - q_m.log())).sum() + (q_m * (q_m.log() - q_b.log())).sum()
    assert want - without_rest > 1e-3 * want  # the bucket for the rest counts here
    model.zero_grad()
    want.backward()
    torch.testing.assert_close(got[0], want.detach().float(), rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        if p.requires_grad:
            # summed over half a vocabulary in float32: compared as a whole, to float64's rounding
            assert (got[1][name] - p.grad).norm() <= 1e-4 * p.grad.norm(), name


def test_evaluation_during_training_leaves_the_4bit_layers_trainable(tokenizer):
    """Generating (eval mode, no grad) between training steps must not change the gradients of
    the next step. bitsandbytes repacks 4-bit weights for inference on CPUs with AVX512-BF16,
    and the repacked path has no autograd; the trainer turns that off (found on such a CPU,
    where the default experiment stopped learning after its first evaluation)."""
    from snaketune.batching import as_rows, collate, encode_dataset
    from snaketune.data import read_records
    from snaketune.generation import generate_answers
    from snaketune.losses import token_loss_sum
    from snaketune.model import load_for_training

    torch.manual_seed(0)
    model = load_for_training(TINY_BASE, LoraConfig(r=8, alpha=16, dropout=0.0), device="cpu")
    samples, _ = encode_dataset(
        read_records(XTUNER / "data.json")[:2], tokenizer, TrainConfig(template="internlm2_chat", max_length=64)
    )
    batch = collate(as_rows(samples), tokenizer.pad_token_id)

    def lora_grads():
        model.zero_grad()
        model.train()
        token_loss_sum(model, *batch).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = lora_grads()
    generate_answers(model, tokenizer, "internlm2_chat", ["你是谁"], max_new_tokens=3)
    after = lora_grads()
    assert before.keys() == after.keys() and any("layers.0." in n for n in before)
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_kill_while_a_checkpoint_is_being_written_skips_it(reference_training, tmp_path):
    """SIGKILL lands between a checkpoint directory's creation and its completion marker;
    the re-run ignores that torn checkpoint and resumes from the one before."""
    for attempt in range(8):
        work, out = tmp_path / f"w{attempt}", tmp_path / f"o{attempt}.json"
        proc = subprocess.Popen(
            train_cmd(work, out, save_steps=2),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        torn = []
        while proc.poll() is None and not torn:
            if work.is_dir():
                torn = [p for p in work.glob("iter_*.pth") if not (p / COMPLETE).exists()]
        if torn:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if torn_checkpoints(work):
            break
    else:
        pytest.fail("no kill landed inside a checkpoint write in 8 tries")
    (bad,) = torn_checkpoints(work)
    before = [n for n, _ in complete_checkpoints(work)]
    log = tmp_path / "resume.log"
    run(train_cmd(work, out, save_steps=2) + ["--log", str(log)])
    text = log.read_text()
    assert f"ignoring {bad}: it was not completely written" in text
    resumed = json.loads(out.read_text())["resumed_from"]
    assert resumed == (before[-1] if before else None)
    # and ends bit-identical to a run that was never interrupted (and saved every 4 iterations, not 2:
    # when checkpoints are taken changes nothing)
    a = read_lora_state(reference_training.summary["checkpoint"])
    b = read_lora_state(json.loads(out.read_text())["checkpoint"])
    assert_same_state(a, b)
