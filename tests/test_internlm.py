"""InternLM2 / InternLM hub checkpoints become native Llama directories that need no hub code.

The hub-layout checkpoints are built in the test from random native Llamas
(tests/internlm_layout.py), so "converted == native" checks the weight mapping,
the config translation and the tokenizer against references that do not share
code with snaketune.internlm.
"""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from snaketune import internlm

from .internlm_layout import MARKER, build_internlm, build_internlm2, llama_to_internlm2_state

TEXTS = [
    "Hello world",
    "two  spaces and a tab\there",
    " leading space",
    "   ",
    "line one\nline two\n\nafter a blank line\n",
    "上海是中国最大的城市之一。",
    "Mixed 中文 and English, 2024年12月31日",
    "digits 3.14159 and 1234567890",
    "emoji 😀🚀 and rare 龘 fall back to bytes",
    "Ｆｕｌｌｗｉｄｔｈ ① ligatures ﬁ",
    "",
]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Both hub checkpoints and their conversions, built once for the module."""
    root = tmp_path_factory.mktemp("internlm")
    built = {"internlm2": build_internlm2(root / "internlm2-chat"), "internlm": build_internlm(root / "internlm-chat")}
    for arch, ckpt in built.items():
        internlm.convert(ckpt.path, root / f"{arch}-llama")
    return root, built


def converted(hub, arch: str) -> Path:
    return hub[0] / f"{arch}-llama"


def load_model(path: Path) -> LlamaForCausalLM:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# --------------------------------------------------------------------------- model


@pytest.mark.parametrize("arch", ["internlm2", "internlm"])
def test_converted_logits_equal_the_native_models(hub, arch):
    ckpt = hub[1][arch]
    model = load_model(converted(hub, arch))
    assert type(model) is LlamaForCausalLM
    # not the hub config's eager: attention runs through SDPA (its fused kernels on a GPU)
    assert model.config._attn_implementation == "sdpa"
    gen = torch.Generator().manual_seed(0)
    # 24 positions run past max_position_embeddings (16), where dynamic NTK changes the rotary base.
    for length in (9, 24):
        ids = torch.randint(3, ckpt.native.config.vocab_size, (3, length), generator=gen)
        with torch.no_grad():
            want = ckpt.native(ids).logits
            got = model(ids).logits
        assert (got - want).abs().max().item() < 1e-5, f"{arch}, {length} tokens"


def test_internlm2_wqkv_is_split_per_kv_group(hub):
    """A contiguous q|k|v split (the natural mistake) must not pass the logits test."""
    ckpt = hub[1]["internlm2"]
    cfg = ckpt.native.config
    hub_state = llama_to_internlm2_state(ckpt.native)
    ours = internlm.internlm2_to_llama_state(hub_state, json.loads((ckpt.path / "config.json").read_text()))
    for name, tensor in ckpt.native.state_dict().items():
        assert torch.equal(ours[name], tensor), name

    q_rows = cfg.num_attention_heads * cfg.head_dim
    wqkv = hub_state["model.layers.0.attention.wqkv.weight"]
    assert not torch.equal(wqkv[:q_rows], ckpt.native.state_dict()["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1), (6, 2)])
def test_wqkv_split_inverts_the_hub_packing_for_any_grouping(heads, kv_heads, tmp_path):
    config = LlamaConfig(
        vocab_size=11,
        hidden_size=12 * heads,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
    )
    native = LlamaForCausalLM(config)
    hub_config = {
        "hidden_size": 12 * heads,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "vocab_size": 11,
        "bias": False,
    }
    ours = internlm.internlm2_to_llama_state(llama_to_internlm2_state(native), hub_config)
    assert ours.keys() == native.state_dict().keys()
    for name, tensor in native.state_dict().items():
        assert torch.equal(ours[name], tensor), name
    save_torch_state_dict(ours, tmp_path)  # what convert() uses; refuses views sharing wqkv's storage


def test_converted_configs_carry_rope_norm_and_head_settings(hub):
    v2 = json.loads((converted(hub, "internlm2") / "config.json").read_text())
    assert v2["model_type"] == "llama" and v2["architectures"] == ["LlamaForCausalLM"]
    assert v2["rope_parameters"] == {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}
    assert v2["rms_norm_eps"] == 1e-5
    assert v2["tie_word_embeddings"] is False
    assert (v2["num_attention_heads"], v2["num_key_value_heads"]) == (4, 2)
    assert v2["attention_bias"] is False

    v1 = json.loads((converted(hub, "internlm") / "config.json").read_text())
    assert v1["rope_parameters"] == {"rope_type": "dynamic", "factor": 1.0, "rope_theta": 10000.0}
    assert v1["attention_bias"] is True and v1["rms_norm_eps"] == 1e-6

    for arch in ("internlm2", "internlm"):
        out = converted(hub, arch)
        assert "auto_map" not in json.loads((out / "config.json").read_text())
        assert not list(out.glob("*.py"))
        loaded = load_model(out)
        # Untied: the head is its own tensor, not the embedding.
        assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()
        assert torch.equal(loaded.lm_head.weight, hub[1][arch].native.lm_head.weight)


def test_rope_settings_of_the_real_hub_configs():
    base = {
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 1,
        "intermediate_size": 8,
        "vocab_size": 10,
    }
    v2 = internlm.llama_config(
        {**base, "model_type": "internlm2", "rope_theta": 1000000, "rope_scaling": {"type": "dynamic", "factor": 2.0}}
    )
    assert v2.rope_parameters == {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}
    plain = internlm.llama_config({**base, "model_type": "internlm2", "rope_theta": 50000000, "rope_scaling": None})
    assert plain.rope_parameters == {"rope_type": "default", "rope_theta": 5e7}
    origin = internlm.llama_config({**base, "model_type": "internlm", "rotary": {"base": 10000, "type": "origin"}})
    assert origin.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    # The InternLM config class defaults `rotary` to dynamic NTK; old configs omit the key.
    implicit = internlm.llama_config({**base, "model_type": "internlm"})
    assert implicit.rope_parameters == {"rope_type": "dynamic", "factor": 1.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="unsupported rotary"):
        internlm.llama_config({**base, "model_type": "internlm2", "rope_scaling": {"type": "yarn", "factor": 4}})


@pytest.mark.parametrize("arch", ["internlm2", "internlm"])
def test_cached_greedy_generation_equals_uncached(hub, arch):
    ckpt = hub[1][arch]
    model = load_model(converted(hub, arch))
    prompt = torch.randint(3, ckpt.native.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    # 6 + 8 tokens stay within max_position_embeddings: past it dynamic NTK rescales the
    # rotary base, which by design makes cached keys differ from recomputed ones.
    kw = {"max_new_tokens": 8, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    cached = model.generate(prompt, use_cache=True, **kw)
    uncached = model.generate(prompt, use_cache=False, **kw)
    native = ckpt.native.generate(prompt, use_cache=True, **kw)
    assert cached.shape[1] == 14
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, native)


@pytest.mark.parametrize("arch", ["internlm2", "internlm"])
def test_packed_rows_do_not_see_each_other(hub, arch):
    """The training route: restarting position_ids (no cache) make the mask block-diagonal."""
    model = load_model(converted(hub, arch))
    gen = torch.Generator().manual_seed(2)
    a, b = (torch.randint(3, model.config.vocab_size, (1, n), generator=gen) for n in (5, 7))
    position_ids = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), position_ids=position_ids, use_cache=False).logits
        alone = torch.cat([model(a).logits, model(b).logits], 1)
    assert (packed - alone).abs().max().item() < 1e-4


# --------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("arch", ["internlm2", "internlm"])
def test_tokenizer_ids_equal_sentencepiece(hub, arch):
    sp = spm.SentencePieceProcessor(model_file=str(hub[1][arch].tokenizer_model))
    tok = AutoTokenizer.from_pretrained(converted(hub, arch))
    assert tok.bos_token_id == sp.bos_id() == 1
    for text in TEXTS:
        ids = tok(text).input_ids
        assert ids == [sp.bos_id()] + sp.encode(text), repr(text)
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(sp.encode(text)), repr(text)
    if arch == "internlm2":  # identity normaliser, no dummy prefix: decoding gives the text back exactly
        for text in TEXTS:
            assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


def test_internlm2_chat_specials_keep_their_hub_ids(hub):
    ckpt = hub[1]["internlm2"]
    sp = spm.SentencePieceProcessor(model_file=str(ckpt.tokenizer_model))
    tok = AutoTokenizer.from_pretrained(converted(hub, "internlm2"))
    n = sp.get_piece_size()
    assert sorted(ckpt.specials.values()) == list(range(n - 6, n))
    assert sp.id_to_piece(n - 1) == "[UNUSED_TOKEN_146]"  # the name only tokenizer_config.json overrides
    for name, hub_id in ckpt.specials.items():
        assert tok.convert_tokens_to_ids(name) == hub_id
        assert tok(name, add_special_tokens=False).input_ids == [hub_id]

    assert tok("<|im_start|>user\n").input_ids == [1, ckpt.specials["<|im_start|>"]] + sp.encode("user\n")
    turn = "<|im_start|>user\nHi there<|im_end|>\n"
    ids = tok(turn).input_ids
    assert ids == [
        1,
        ckpt.specials["<|im_start|>"],
        *sp.encode("user\nHi there"),
        ckpt.specials["<|im_end|>"],
        *sp.encode("\n"),
    ]
    assert tok.decode(ids) == "<s>" + turn
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHi there\n"

    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hello!"}]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert rendered == "<s><|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    assert tok.eos_token == "</s>" and tok.pad_token == "</s>"

    generation = json.loads((converted(hub, "internlm2") / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, ckpt.specials["<|im_end|>"]]


def test_internlm_v1_eoh_eoa_are_single_tokens(hub):
    ckpt = hub[1]["internlm"]
    sp = spm.SentencePieceProcessor(model_file=str(ckpt.tokenizer_model))
    tok = AutoTokenizer.from_pretrained(converted(hub, "internlm"))
    for name, hub_id in ckpt.specials.items():
        assert tok.convert_tokens_to_ids(name) == hub_id == sp.piece_to_id(name)
        assert tok(name, add_special_tokens=False).input_ids == [hub_id]
    # Around sentencepiece's own user-defined pieces the two agree too.
    text = "What is 2+2?<eoh>\nThe answer is 4.<eoa>"
    assert tok(text).input_ids == [1] + sp.encode(text)

    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<s><|User|>:hi<eoh>\n<|Bot|>:"
    generation = json.loads((converted(hub, "internlm") / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, ckpt.specials["<eoa>"]]


# --------------------------------------------------------------------------- safety and failures


def test_architecture_reads_config_json(hub, tmp_path):
    assert internlm.architecture(hub[1]["internlm2"].path) == "internlm2"
    assert internlm.architecture(hub[1]["internlm"].path) == "internlm"
    assert internlm.architecture(converted(hub, "internlm2")) is None  # already native
    assert internlm.architecture(tmp_path) is None  # no config.json


def test_conversion_never_executes_hub_code(hub):
    for ckpt in hub[1].values():
        assert list(ckpt.path.glob("*.py")), "the trap files are missing"
        assert not (ckpt.path / MARKER).exists()


def test_the_remote_code_trap_fires_when_run(hub, tmp_path):
    """Guards the test above: importing a planted file does leave the marker."""
    trap = tmp_path / "modeling_internlm2.py"
    shutil.copy(hub[1]["internlm2"].path / "modeling_internlm2.py", trap)
    with pytest.raises(RuntimeError, match="remote code"):
        runpy.run_path(str(trap))
    assert (tmp_path / MARKER).exists()


def _copy_hub(hub, arch: str, dest: Path) -> Path:
    shutil.copytree(hub[1][arch].path, dest)
    return dest


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_missing_weight_names_file_and_key(hub, tmp_path):
    src = _copy_hub(hub, "internlm2", tmp_path / "src")
    key = "model.layers.1.attention.wqkv.weight"
    shard = src / json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][key]
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard, metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"{shard.name}: missing weight '{key}'"):
        internlm.convert(src, out)
    _assert_nothing_written(out)


def test_wrong_shape_names_file_and_key(hub, tmp_path):
    src = _copy_hub(hub, "internlm", tmp_path / "src")
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    key = "model.layers.0.self_attn.o_proj.bias"
    state[key] = state[key][:-1]
    torch.save(state, src / "pytorch_model.bin")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"pytorch_model.bin: '{key}' has shape \(63,\), expected \(64,\)"):
        internlm.convert(src, out)
    _assert_nothing_written(out)


def test_unknown_weight_is_an_error_not_silently_dropped(hub, tmp_path):
    src = _copy_hub(hub, "internlm", tmp_path / "src")
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    state["model.layers.0.self_attn.extra_gate.weight"] = torch.zeros(2)
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(ValueError, match="unexpected weight.*extra_gate"):
        internlm.convert(src, tmp_path / "out")


def test_failure_while_writing_leaves_no_output(hub, tmp_path, monkeypatch):
    from transformers import GenerationConfig

    out = tmp_path / "out"
    out_existed = []

    def fail(*args, **kwargs):
        # Even a crash that skips all cleanup must not leave `out` looking finished.
        out_existed.append(out.exists())
        raise OSError("disk full")

    monkeypatch.setattr(GenerationConfig, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        internlm.convert(hub[1]["internlm2"].path, out)
    assert out_existed == [False]
    _assert_nothing_written(out)


def test_existing_output_is_not_overwritten(hub, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FileExistsError):
        internlm.convert(hub[1]["internlm2"].path, out)


# --------------------------------------------------------------------------- in the workflow


def test_packed_loss_equals_the_per_sample_sum_on_converted_internlm2(hub):
    """The trainer's packing on a converted InternLM2: a packed row's loss is the sum of its
    samples' losses run one by one (the hub code would let packed samples attend to each other)."""
    from snaketune.batching import as_rows, collate, encode_dataset, pack
    from snaketune.config import TrainConfig
    from snaketune.losses import token_loss_sum
    from snaketune.model import load_tokenizer

    from .helpers import XTUNER

    out = converted(hub, "internlm2")
    tokenizer, model = load_tokenizer(out), load_model(out)
    records = json.loads((XTUNER / "data.json").read_text())[:4]
    samples, _ = encode_dataset(records, tokenizer, TrainConfig(template="internlm2_chat", max_length=512))
    assert len({len(s.input_ids) for s in samples}) > 1
    rows = pack(samples, 4096, seed=0)
    assert len(rows) == 1
    with torch.no_grad():
        packed = token_loss_sum(model, *collate(rows, tokenizer.pad_token_id))
        one_by_one = sum(token_loss_sum(model, *collate([r], tokenizer.pad_token_id)) for r in as_rows(samples))
        leaky = rows[0].__class__(rows[0].input_ids, rows[0].labels, list(range(len(rows[0].input_ids))))
        crossed = token_loss_sum(model, *collate([leaky], tokenizer.pad_token_id))
    torch.testing.assert_close(packed, one_by_one, rtol=1e-5, atol=1e-3)
    assert (crossed - one_by_one).abs() > 50 * max((packed - one_by_one).abs(), torch.tensor(1e-3))


def test_fetch_model_converts_internlm2_unless_hub_code_is_trusted(hub, tmp_path):
    from snaketune.config import ModelConfig
    from snaketune.fetch import fetch_model

    src = hub[1]["internlm2"].path
    out = tmp_path / "models/internlm2"
    fetch_model(ModelConfig(source="local", path=str(src)), out, tmp_path / "cache")
    assert out.is_dir() and not out.is_symlink()
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert not list(out.glob("*.py"))
    linked = tmp_path / "models/hub-code"
    fetch_model(ModelConfig(source="local", path=str(src), trust_remote_code=True), linked, tmp_path / "cache")
    assert linked.is_symlink() and linked.resolve() == src.resolve()  # the opt-in: the hub's files as they are


@pytest.mark.slow
def test_workflow_end_to_end_on_a_tiny_internlm2_with_packing(hub, tmp_path):
    """fetch (convert), train with packing, pth_to_hf, merge and evaluate through snakemake; the merged
    model loads in plain transformers without trust_remote_code and equals base + adapter."""
    import yaml

    from snaketune.files import read_jsonl

    from .helpers import TINY_CONFIG, copy_workflow, snakemake

    wd = copy_workflow(tmp_path / "wf")
    config = json.loads(json.dumps(TINY_CONFIG))
    config["models"] = {"internlm2_tiny": {"source": "local", "path": str(hub[1]["internlm2"].path)}}
    exp = config["experiments"]["tiny"]
    exp["model"] = "internlm2_tiny"
    exp["train"].update(pack_to_max_length=True, max_length=128, max_epochs=2)
    (wd / "config/config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    snakemake(wd, "final_model")
    model_dir = wd / "resources/models/internlm2_tiny"
    assert not model_dir.is_symlink() and (model_dir / "tokenizer.json").exists()
    summary = json.loads((wd / "results/tiny/training.json").read_text())
    assert summary["rows"] < summary["data"]["samples"]  # packed: fewer rows than samples
    merged = wd / "results/tiny/merged"
    assert json.loads((merged / "config.json").read_text())["model_type"] == "llama"
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)  # no trust_remote_code
    assert type(plain) is LlamaForCausalLM
    rows = read_jsonl(wd / "results/tiny/evaluation.jsonl")
    identity = [r for r in rows if r["set"] == "identity"]  # the export check's prompts
    assert identity and all(r["finetuned"] == r["base_plus_adapter"] for r in identity)
    text = AutoTokenizer.from_pretrained(merged).apply_chat_template(
        [{"role": "user", "content": "Q"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n")
