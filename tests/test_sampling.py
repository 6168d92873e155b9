"""``snaketune chat --temperature T``: sampled answers, reproducible under ``--seed``, unlike greedy ones,
and drawn only from the ``--top-k`` and ``--top-p`` tokens of the model's own logits.

The model is tests/chat_model.py's talking model: its next-token distribution is spread over many
words, so a sampled answer parts from the greedy one within a few tokens, and a draw outside the top
few tokens is common unless sampling forbids it.
"""

import io
import sys

import pytest
import torch

from snaketune.cli import _chat, build_parser, main

from .chat_model import build_talking_model

MAX = 16


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_talking_model(tmp_path_factory.mktemp("sampling") / "base")


def chat_command(base, monkeypatch, capsys, *flags) -> str:
    """What ``snaketune chat BASE FLAGS`` prints for two questions piped in."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("Who are you?\nWhat do you like?\n"))
    main(["chat", str(base), "--prompt-template", "internlm2_chat", "--max-new-tokens", str(MAX), *flags])
    return capsys.readouterr().out


def test_a_seeded_chat_repeats_exactly_and_differs_from_greedy(base, monkeypatch, capsys):
    sampled = chat_command(base, monkeypatch, capsys, "--temperature", "1", "--seed", "7")
    assert len([line for line in sampled.splitlines() if line.strip()]) == 2, sampled  # two answers
    assert chat_command(base, monkeypatch, capsys, "--temperature", "1", "--seed", "7") == sampled
    assert chat_command(base, monkeypatch, capsys, "--temperature", "1", "--seed", "8") != sampled
    assert chat_command(base, monkeypatch, capsys) != sampled  # greedy, the default


def draws(base, *flags, question: str = "Who are you?") -> list[tuple[torch.Tensor, int]]:
    """Answer ``question`` in a chat made from ``snaketune chat`` FLAGS; every token drawn (but the
    last), with the logits of the model's forward pass that it was drawn from."""
    chat, _ = _chat(build_parser().parse_args(["chat", str(base), "--prompt-template", "internlm2_chat", *flags]))
    logits, fed = [], []

    def record(module, args, kwargs, output):
        fed.append(int(kwargs["input_ids"][0, -1]))
        logits.append(output.logits[0, -1].float())

    handle = chat.model.register_forward_hook(record, with_kwargs=True)
    try:
        chat.ask(question)
    finally:
        handle.remove()
    return list(zip(logits[:-1], fed[1:]))  # a pass's draw is the input of the next pass


def in_top_k(logits: torch.Tensor, token: int, k: int) -> bool:
    return token in logits.topk(k).indices.tolist()


def in_top_p(logits: torch.Tensor, token: int, p: float) -> bool:
    """The nucleus: the most likely tokens until their probabilities add up to ``p``; a token is in it
    when the tokens more likely than it hold less than ``p``."""
    probs = torch.softmax(logits, dim=-1)
    return probs[probs > probs[token]].sum().item() < p + 1e-6


def test_sampling_draws_only_from_the_top_k_tokens(base):
    k = 3
    steps = draws(base, "--temperature", "2", "--top-k", str(k), "--top-p", "1", "--max-new-tokens", "32")
    assert len(steps) >= 10
    assert all(in_top_k(logits, token, k) for logits, token in steps)
    # the check can fail: at this temperature without a top-k, tokens outside the top 3 are drawn
    free = draws(base, "--temperature", "2", "--top-k", "0", "--top-p", "1", "--max-new-tokens", "32")
    assert not all(in_top_k(logits, token, k) for logits, token in free)


def test_sampling_draws_only_from_the_top_p_nucleus(base):
    p = 0.3
    steps = draws(base, "--temperature", "1", "--top-k", "0", "--top-p", str(p), "--max-new-tokens", "32")
    assert len(steps) >= 10
    assert all(in_top_p(logits, token, p) for logits, token in steps)
    free = draws(base, "--temperature", "1", "--top-k", "0", "--top-p", "1", "--max-new-tokens", "32")
    assert not all(in_top_p(logits, token, p) for logits, token in free)
