"""A tiny model that talks: for the chat and web tests.

The fixture model of tests/conftest.py answers every prompt with newlines,
so an answer could not tell one prompt (or history) from another. This one
has random weights (seed 0, untied output head) whose output head is zero
except for plain lowercase words and the EOS: greedy answers are a dozen
words that change with every token of the conversation, and a browser shows
them as they are (no Markdown in them). The EOS row is scaled so that some
answers stop on it before ``max_new_tokens`` and others do not; with
``ends=False`` it is zero, so no answer ever ends before ``max_new_tokens``
(a generation that a Stop can always interrupt, however fast the machine).

Also the expected values the chat and web tests compare with: XTuner's
internlm2_chat encoding typed out, and greedy decoding by hand.
"""

from __future__ import annotations

import re
from pathlib import Path

from .helpers import TINY_BASE

BOS, EOS = 0, 2  # the fixture tokenizer's <|endoftext|>, <|im_end|>


def build_talking_model(out: Path, *, ends: bool = True) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from snaketune.model import load_tokenizer

    tok = load_tokenizer(TINY_BASE)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024 if ends else 8192,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=EOS,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    words = torch.zeros(len(tok), dtype=torch.bool)
    words[[i for s, i in tok.get_vocab().items() if re.fullmatch("Ġ[a-z]{3,8}", s)] + [EOS]] = True
    with torch.no_grad():
        model.lm_head.weight[~words] = 0
        # a zero row ties with the zeroed non-words, and greedy decoding takes the lowest id of a tie
        model.lm_head.weight[EOS] *= 3 if ends else 0
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_adapter(base: Path, out: Path) -> Path:
    """A LoRA adapter with random (non-zero) A and B on every linear layer but the head."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    model.save_pretrained(out)
    return out


def chatml(system: str, turns: list[tuple[str, str | None]], enc) -> list[int]:
    """XTuner's internlm2_chat encoding, typed out: BOS, system on turn 0, answer + <|im_end|>, "\\n"."""
    ids = [BOS]
    for i, (question, answer) in enumerate(turns):
        ids += enc(
            (f"<|im_start|>system\n{system}<|im_end|>\n" if i == 0 and system else "")
            + f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        )
        if answer is not None:
            ids += enc(answer + "<|im_end|>") + enc("\n")
    return ids


def argmax_answer(model, tok, ids: list[int], max_new_tokens: int = 16, stops=(EOS,)) -> str:
    """Greedy decoding by hand: the most likely next token until a stop token, no cache, no generate()."""
    import torch

    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if token in stops:
                break
            new.append(token)
    return tok.decode(new).strip()
