"""Greedy answers to evaluation prompts, formatted exactly as in training."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .encoding import encode_prompt, stop_token_ids


@dataclass
class Answer:
    prompt: str
    answer: str
    stopped: bool  # ended on a stop token rather than running into max_new_tokens
    new_tokens: int


def generate_answers(model, tokenizer, template, prompts: list[str], *, system: str = "",
                     max_new_tokens: int = 64) -> list[Answer]:
    """Greedy decoding, one prompt at a time (no padding to get wrong)."""
    import torch

    stops = stop_token_ids(tokenizer, template)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    answers = []
    try:
        with torch.no_grad():
            for prompt in prompts:
                ids = torch.tensor([encode_prompt(prompt, tokenizer, template, system)], device=device)
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=max_new_tokens, eos_token_id=stops,
                                     pad_token_id=tokenizer.pad_token_id, use_cache=True)
                new = out[0, ids.shape[1]:].tolist()
                stopped = bool(new) and new[-1] in stops
                text = tokenizer.decode(new[:-1] if stopped else new, skip_special_tokens=False)
                answers.append(Answer(prompt, text.strip(), stopped, len(new)))
    finally:
        model.train(was_training)
    return answers


def as_dicts(answers: list[Answer]) -> list[dict]:
    return [asdict(a) for a in answers]
