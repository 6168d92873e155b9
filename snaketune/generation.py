"""Greedy answers to prompts, formatted exactly as in training, and their likelihood under a model."""

from __future__ import annotations

from dataclasses import dataclass, field

from .encoding import encode_prompt, stop_token_ids


@dataclass
class Answer:
    prompt: str
    answer: str
    stopped: bool  # ended on a stop token rather than running into max_new_tokens
    new_tokens: int
    token_ids: list[int] = field(default_factory=list)  # what was generated, the stop token included


def forget_long_contexts(model) -> None:
    """Put dynamically scaled rotary embeddings (``rope_type: dynamic``, InternLM2's) back to their
    original frequencies.

    transformers rescales them once a sequence outgrows ``max_position_embeddings`` and keeps the
    rescaled frequencies for every shorter sequence after it, so without this an answer would depend
    on how long the sequences the model saw before were (the base + adapter model answering after
    the base model's long answers would not match a freshly loaded merged model).
    """
    for module in model.modules():
        original = getattr(module, "original_inv_freq", None)
        if original is not None and hasattr(module, "original_max_seq_len"):
            module.register_buffer("inv_freq", original.clone(), persistent=False)
            module.max_seq_len_cached = module.original_max_seq_len


def generate_answers(
    model, tokenizer, template, prompts: list[str], *, system: str = "", max_new_tokens: int = 64, batch_size: int = 1
) -> list[Answer]:
    """Greedy decoding, ``batch_size`` prompts at a time.

    A batch is left-padded with an attention mask, so every prompt ends where
    its answer starts and the model gives each prompt's positions from its
    first real token (tests/test_evaluate.py checks batched answers equal
    one-at-a-time ones). A row stops at its first stop token; what the model
    pads finished rows with afterwards is cut off.
    """
    import torch

    stops = stop_token_ids(tokenizer, template)
    pad = tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    forget_long_contexts(model)
    device = next(model.parameters()).device
    answers = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                encoded = [encode_prompt(prompt, tokenizer, template, system) for prompt in chunk]
                width = max(len(ids) for ids in encoded)
                ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
                mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=stops,
                    pad_token_id=pad,
                    use_cache=True,
                )
                for prompt, row in zip(chunk, out[:, width:].tolist()):
                    end = next((i for i, tok in enumerate(row) if tok in stops), None)
                    new = row if end is None else row[: end + 1]
                    text = tokenizer.decode(new if end is None else new[:-1], skip_special_tokens=False)
                    answers.append(Answer(prompt, text.strip(), end is not None, len(new), new))
    finally:
        model.train(was_training)
    return answers


def answer_nll(
    model, tokenizer, template, answers: list[Answer], *, system: str = "", batch_size: int = 16
) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, token count) of each answer's tokens after its prompt.

    Teacher forcing on the generated token ids (not a re-tokenised text), the
    stop token included, so the figure is that of exactly what was generated.
    Rows are right-padded: the padding comes after every scored token.
    """
    import torch

    pad = tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    forget_long_contexts(model)
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = []
    try:
        with torch.no_grad():
            for start in range(0, len(answers), batch_size):
                chunk = answers[start : start + batch_size]
                prompts = [encode_prompt(a.prompt, tokenizer, template, system) for a in chunk]
                seqs = [p + a.token_ids for p, a in zip(prompts, chunk)]
                width = max(len(s) for s in seqs)
                ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
                mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
                logits = model(input_ids=ids, attention_mask=mask).logits
                for row, (prompt, answer) in enumerate(zip(prompts, chunk)):
                    n = len(answer.token_ids)
                    # the logits at position i predict token i + 1; normalised only where an answer token
                    # is scored, not over the prompt's and the padding's positions
                    logp = torch.log_softmax(logits[row, len(prompt) - 1 : len(prompt) - 1 + n].float(), dim=-1)
                    targets = torch.tensor(answer.token_ids, device=device, dtype=torch.long)
                    out.append((-logp[torch.arange(n, device=device), targets].sum().item(), n))
    finally:
        model.train(was_training)
    return out


def as_dicts(answers: list[Answer]) -> list[dict]:
    """What the training log keeps of each answer (not the token ids)."""
    return [{"prompt": a.prompt, "answer": a.answer, "stopped": a.stopped, "new_tokens": a.new_tokens} for a in answers]
