"""Templates and encoding, with exact token and label expectations (XTuner's encode_fn rules).

The expected strings are typed out here from XTuner's templates.py, not taken
from snaketune.templates, so a wrong template string fails these tests.
"""

import pytest

from snaketune.encoding import IGNORE_INDEX, encode_conversation, encode_prompt, stop_token_ids
from snaketune.templates import TEMPLATES, get_template

X = IGNORE_INDEX
BOS, EOS = 0, 2  # fixture tokenizer: <|endoftext|>, <|im_end|>


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def expect(tok, parts):
    """parts: (text | token id list, supervised) -> (ids, labels)."""
    ids, labels = [], []
    for part, sup in parts:
        t = part if isinstance(part, list) else enc(tok, part)
        ids += t
        labels += t if sup else [X] * len(t)
    return ids, labels


ONE = [{"system": "SYS", "input": "Hi?", "output": "Hello!"}]
TWO = [{"system": "SYS", "input": "Q1", "output": "A1"}, {"input": "Q2", "output": "A2"}]


def test_internlm2_chat_single_turn_is_chatml_with_suffix_supervised(tokenizer):
    got = encode_conversation(ONE, tokenizer, "internlm2_chat", 512)
    want = expect(
        tokenizer,
        [
            ([BOS], False),
            ("<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n", False),
            ("Hello!<|im_end|>", True),
            ("\n", False),
        ],
    )
    assert (got.input_ids, got.labels) == want
    # <|im_end|> is the EOS here: it is supervised exactly once, at the end of the answer
    sup = [t for t in got.labels if t != X]
    assert sup[-1] == EOS and sup.count(EOS) == 1
    assert got.truncated == 0


def test_internlm2_chat_multi_turn_has_bos_only_once(tokenizer):
    got = encode_conversation(TWO, tokenizer, "internlm2_chat", 512)
    want = expect(
        tokenizer,
        [
            ([BOS], False),
            ("<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n", False),
            ("A1<|im_end|>", True),
            ("\n", False),
            ("<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n", False),
            ("A2<|im_end|>", True),
            ("\n", False),
        ],
    )
    assert (got.input_ids, got.labels) == want
    assert got.input_ids.count(BOS) == 1


def test_default_template_appends_supervised_eos_and_bos_every_turn(tokenizer):
    got = encode_conversation(TWO, tokenizer, "default", 512)
    want = expect(
        tokenizer,
        [
            ([BOS], False),
            ("<|System|>:SYS\n<|User|>:Q1\n<|Bot|>:", False),
            ("A1", True),
            ([EOS], True),
            ("\n", False),
            ([BOS], False),
            ("<|User|>:Q2\n<|Bot|>:", False),
            ("A2", True),
            ([EOS], True),
            ("\n", False),
        ],
    )
    assert (got.input_ids, got.labels) == want


def test_internlm_chat_suffix_is_the_eos(tokenizer):
    got = encode_conversation(ONE, tokenizer, "internlm_chat", 512)
    want = expect(
        tokenizer,
        [
            ([BOS], False),
            ("<|System|>:SYS\n<|User|>:Hi?<eoh>\n<|Bot|>:", False),
            ("Hello!<eoa>", True),
            ("\n", False),
        ],
    )
    assert (got.input_ids, got.labels) == want
    assert EOS not in got.input_ids


def test_llama3_chat_has_no_separator(tokenizer):
    got = encode_conversation(ONE, tokenizer, "llama3_chat", 512)
    want = expect(
        tokenizer,
        [
            ([BOS], False),
            (
                "<|start_header_id|>system<|end_header_id|>\n\nSYS<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nHi?<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n",
                False,
            ),
            ("Hello!<|eot_id|>", True),
        ],
    )
    assert (got.input_ids, got.labels) == want


def test_zephyr_and_qwen_strings():
    z, q = get_template("zephyr"), get_template("qwen_chat")
    assert z.format_input("Q", "S") == "<|system|>\nS\n<|user|>\nQ\n<|assistant|>\n"
    assert z.format_output("A") == "A" and not z.suffix_as_eos
    assert q.format_input("Q", "S") == get_template("internlm2_chat").format_input("Q", "S")
    assert q.stop_words == ("<|im_end|>", "<|endoftext|>")


def test_output_with_loss_false_masks_that_turn(tokenizer):
    conv = [{"input": "Q1", "output": "A1", "output_with_loss": False}, {"input": "Q2", "output": "A2"}]
    got = encode_conversation(conv, tokenizer, "internlm2_chat", 512)
    supervised = [t for t in got.labels if t != X]
    assert supervised == enc(tokenizer, "A2<|im_end|>")


def test_no_system_means_no_system_block(tokenizer):
    got = encode_conversation([{"input": "Q", "output": "A"}], tokenizer, "internlm2_chat", 512)
    assert got.input_ids[:1] == [BOS]
    assert tokenizer.decode(got.input_ids[1:]).startswith("<|im_start|>user\nQ")


def test_truncation_cuts_at_max_length_and_counts(tokenizer):
    full = encode_conversation(ONE, tokenizer, "internlm2_chat", 512)
    cut = encode_conversation(ONE, tokenizer, "internlm2_chat", 10)
    assert cut.input_ids == full.input_ids[:10] and cut.labels == full.labels[:10]
    assert cut.truncated == len(full.input_ids) - 10


def test_bos_not_doubled_when_template_starts_with_it(tokenizer):
    """A ChatML tokenizer whose BOS is <|im_start|> (SmolLM2's GGUF) must not see it twice."""
    tokenizer.bos_token = "<|im_start|>"
    try:
        got = encode_conversation(ONE, tokenizer, "internlm2_chat", 512)
        assert got.input_ids[:2] == [1, *enc(tokenizer, "system")[:1]]
        assert (
            encode_prompt("Hi?", tokenizer, "internlm2_chat", "SYS")
            == got.input_ids[
                : len(
                    enc(
                        tokenizer,
                        "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n",
                    )
                )
            ]
        )
    finally:
        tokenizer.bos_token = "<|endoftext|>"


def test_prompt_encoding_matches_training_prefix(tokenizer):
    train = encode_conversation(ONE, tokenizer, "internlm2_chat", 512)
    prompt = encode_prompt("Hi?", tokenizer, "internlm2_chat", "SYS")
    assert train.input_ids[: len(prompt)] == prompt
    assert train.labels[len(prompt)] != X and train.labels[len(prompt) - 1] == X


def test_tokenizer_chat_template_mode_masks_prompts(tokenizer):
    chatml = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    tokenizer.chat_template = chatml
    try:
        got = encode_conversation(TWO, tokenizer, "tokenizer", 512)
        want = expect(
            tokenizer,
            [
                ("<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n", False),
                ("A1<|im_end|>\n", True),
                ("<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n", False),
                ("A2<|im_end|>\n", True),
            ],
        )
        assert (got.input_ids, got.labels) == want
    finally:
        tokenizer.chat_template = None


def test_stop_tokens_include_template_stop_word(tokenizer):
    assert stop_token_ids(tokenizer, "internlm2_chat") == [EOS]
    assert stop_token_ids(tokenizer, "default") == [EOS]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_saved_chat_template_renders_like_training(tokenizer, name):
    """The chat_template written next to the merged model reproduces the training text: where the
    suffix is not the EOS, the encoder appends the EOS to the answer (multi-turn and token ids:
    tests/test_templates.py)."""
    t = get_template(name)
    tokenizer.chat_template = t.chat_template()
    try:
        msgs = [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "A"},
        ]
        rendered = tokenizer.apply_chat_template(msgs, tokenize=False)
        eos = "" if t.suffix_as_eos else "<|im_end|>"  # the fixture tokenizer's EOS
        assert rendered == t.format_input("Q", "S") + t.format_output("A") + eos + t.sep
    finally:
        tokenizer.chat_template = None


def test_unknown_template_lists_known():
    with pytest.raises(ValueError, match="internlm2_chat"):
        get_template("internlm3")
