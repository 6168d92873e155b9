"""The chat template that merge saves renders a conversation exactly as training encoded it.

For every template and three kinds of BOS, the real ``merge`` writes a model
directory; its tokenizer's ``apply_chat_template`` on a 3-turn conversation
with a system prompt must give the token ids of
``snaketune.encoding.encode_conversation`` (itself checked against XTuner's
strings in test_encoding.py), and the generation prompt of turn 3 must be
the training ids up to that turn's answer.
"""

import pytest

from snaketune.config import MergeConfig
from snaketune.encoding import IGNORE_INDEX, encode_conversation
from snaketune.merge import merge
from snaketune.model import load_tokenizer
from snaketune.templates import TEMPLATES

from .helpers import TINY_BASE, XTUNER

ADAPTER = XTUNER / "adapter_plain"  # XTuner's own pth_to_hf output for the tiny model
CONVERSATION = [
    {"system": "You are Snaky.", "input": "Who are you?", "output": "I am Snaky!"},
    {"input": "你叫什么名字", "output": "我是Snaky。"},
    {"input": "And then?", "output": "Nothing, really."},
]
MESSAGES = [{"role": "system", "content": "You are Snaky."}] + [
    m
    for t in CONVERSATION
    for m in ({"role": "user", "content": t["input"]}, {"role": "assistant", "content": t["output"]})
]
# What the model families' own tokenizers hold as single special tokens. Where they are plain text
# (as in the fixture's SmolLM2 tokenizer), "…<|eot_id|>" + "<|start_header_id|>…" tokenizes
# differently in one string than in the encoder's separate segments.
FAMILY_SPECIALS = {
    "llama3_chat": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "internlm_chat": ["<eoh>", "<eoa>"],
}
# Llama 3's pre-tokenizer (its tokenizer.json): a run of newlines is one piece whatever follows. The
# fixture's GPT-2 split makes "\n\n" before a word two pieces but one at the end of a segment, so
# llama3_chat's "<|end_header_id|>\n\n" + answer differs between one string and the encoder's segments.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The fixture's BOS (<|endoftext|>, XTuner's case), SmolLM2's GGUF BOS (<|im_start|>: a ChatML
# prompt starts with it, the encoder adds none) and none at all (Qwen).
BOS = {"endoftext": "<|endoftext|>", "im_start": "<|im_start|>", "none": None}


def base_with_tokenizer(path, template: str, bos: str | None):
    """The tiny base model (weights linked) with a tokenizer of the given BOS and the family's specials."""
    path.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (path / name).symlink_to(TINY_BASE / name)
    tok = load_tokenizer(TINY_BASE)
    tok.bos_token = bos
    if template in FAMILY_SPECIALS:
        tok.add_special_tokens({"additional_special_tokens": FAMILY_SPECIALS[template]})
    if template == "llama3_chat":
        from tokenizers import Regex, pre_tokenizers

        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.save_pretrained(path)
    return path


def rendered_ids(tokenizer, messages, **kw) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kw)
    return out if isinstance(out, list) else out["input_ids"]


@pytest.mark.parametrize("bos", BOS)
@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_saved_chat_template_renders_what_training_encoded(template, bos, tmp_path):
    from transformers import AutoTokenizer

    base = base_with_tokenizer(tmp_path / "base", template, BOS[bos])
    merge(base, ADAPTER, tmp_path / "merged", template, MergeConfig())
    saved = AutoTokenizer.from_pretrained(tmp_path / "merged")  # as any chat tool loads it
    train = encode_conversation(CONVERSATION, load_tokenizer(base), template, max_length=10_000)
    assert train.truncated == 0

    got = rendered_ids(saved, MESSAGES)
    assert saved.decode(got) == saved.decode(train.input_ids)
    assert got == train.input_ids

    # the prompt for turn 3 (what a chat tool sends) is the training ids up to turn 3's answer
    answer_starts = [
        i
        for i, label in enumerate(train.labels)
        if label != IGNORE_INDEX and (i == 0 or train.labels[i - 1] == IGNORE_INDEX)
    ]
    assert len(answer_starts) == 3
    assert rendered_ids(saved, MESSAGES[:-1], add_generation_prompt=True) == train.input_ids[: answer_starts[2]]


def test_default_template_text_is_xtuners_with_eos_and_bos_between_turns(tmp_path):
    """Typed out from XTuner's default template and encode_fn: answer + EOS (the suffix is empty), SEP,
    then BOS before the next turn."""
    from transformers import AutoTokenizer

    merge(
        base_with_tokenizer(tmp_path / "base", "default", "<|endoftext|>"),
        ADAPTER,
        tmp_path / "merged",
        "default",
        MergeConfig(),
    )
    saved = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert saved.apply_chat_template(MESSAGES, tokenize=False) == (
        "<|endoftext|><|System|>:You are Snaky.\n<|User|>:Who are you?\n<|Bot|>:I am Snaky!<|im_end|>\n"
        "<|endoftext|><|User|>:你叫什么名字\n<|Bot|>:我是Snaky。<|im_end|>\n"
        "<|endoftext|><|User|>:And then?\n<|Bot|>:Nothing, really.<|im_end|>\n"
    )
