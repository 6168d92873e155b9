"""InternLM and InternLM2 hub checkpoints as native Llama directories.

Both families ship their architecture as remote code (``modeling_internlm*.py``)
that transformers 5 can no longer run cleanly, and InternLM2's remote tokenizer
loads as a fast tokenizer that drops spaces and newlines. Mathematically both
are Llamas: InternLM is Llama with biases on the attention projections, and
InternLM2 is Llama with renamed weights and a fused ``wqkv``. So instead of
running hub code we rewrite the checkpoint on disk once, as a
``LlamaForCausalLM`` directory with a ``tokenizer.json`` built from the
sentencepiece model. Everything downstream (packing, cached generation,
``save_pretrained``, merging adapters) then sees a plain transformers model.

Nothing here imports or executes a file from the source directory: configs are
read as JSON, weights with safetensors or ``torch.load(weights_only=True)``,
and ``tokenizer.model`` is parsed as protobuf data.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .files import atomic_dir

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, PreTrainedTokenizerFast

INTERNLM2 = "internlm2"
INTERNLM = "internlm"

# Buffers some older checkpoints saved; transformers recomputes them from the config.
_DERIVED_BUFFER = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

# Used only when the hub tokenizer_config.json carries no chat_template.
_CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# XTuner's ``internlm_chat`` strings: <|User|>:{input}<eoh>\n<|Bot|>:{output}<eoa>\n
_INTERNLM_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|System|>:' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|User|>:' + message['content'] + '<eoh>\n' }}"
    "{% else %}{{ '<|Bot|>:' + message['content'] + '<eoa>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|Bot|>:' }}{% endif %}"
)
_END_OF_TURN = {INTERNLM2: "<|im_end|>", INTERNLM: "<eoa>"}


def _family(config: Mapping[str, Any]) -> str | None:
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type == INTERNLM2 or "InternLM2ForCausalLM" in architectures:
        return INTERNLM2
    if model_type == INTERNLM or "InternLMForCausalLM" in architectures:
        return INTERNLM
    return None


def architecture(model_dir: str | os.PathLike) -> str | None:
    """``"internlm2"``, ``"internlm"`` or None, from the directory's config.json."""
    path = Path(model_dir) / "config.json"
    return _family(json.loads(path.read_text())) if path.is_file() else None


# --------------------------------------------------------------------------- config


def _required(config: Mapping[str, Any], key: str, where: str) -> Any:
    if config.get(key) is None:
        raise ValueError(f"{where}: missing {key!r}")
    return config[key]


def _rope_parameters(config: Mapping[str, Any], arch: str, where: str) -> dict[str, Any]:
    """RoPE settings in transformers 5's ``rope_parameters`` form.

    InternLM2 writes Llama-style ``rope_theta`` plus ``rope_scaling: {type, factor}``;
    InternLM writes ``rotary: {base, type, scaling_factor}``, where "origin" is plain
    RoPE. Both "dynamic" variants grow the base by the same NTK formula as
    transformers' "dynamic" type once the sequence outgrows max_position_embeddings.
    """
    if arch == INTERNLM:
        # Configs without the key get the InternLM config class's default: dynamic NTK, base 10000.
        rotary = config.get("rotary") or {"base": 10000, "type": "dynamic"}
        theta, kind, factor = rotary.get("base", 10000), rotary.get("type"), rotary.get("scaling_factor", 1.0)
        kind = {"origin": "default"}.get(kind, kind)
    else:
        scaling = config.get("rope_scaling") or {}
        theta = config.get("rope_theta", 10000)
        kind, factor = scaling.get("type", scaling.get("rope_type", "default")), scaling.get("factor")
    if kind == "default":
        return {"rope_type": "default", "rope_theta": float(theta)}
    if kind in ("dynamic", "linear") and factor is not None:
        return {"rope_type": kind, "factor": float(factor), "rope_theta": float(theta)}
    raise ValueError(f"{where}: unsupported rotary embedding settings (type {kind!r}, factor {factor!r})")


def llama_config(hub_config: Mapping[str, Any], where: str = "config.json") -> LlamaConfig:
    """The ``LlamaConfig`` equivalent of an InternLM or InternLM2 hub config.

    Missing keys take the defaults of the hub's own config classes (attention
    bias on, RMS eps 1e-6, untied head), since those are what the remote code
    would have used.
    """
    from transformers import LlamaConfig

    arch = _family(hub_config)
    if arch is None:
        raise ValueError(f"{where}: not an InternLM or InternLM2 config (model_type {hub_config.get('model_type')!r})")
    heads = _required(hub_config, "num_attention_heads", where)
    dtype = hub_config.get("torch_dtype") or hub_config.get("dtype")
    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=_required(hub_config, "vocab_size", where),
        hidden_size=_required(hub_config, "hidden_size", where),
        intermediate_size=_required(hub_config, "intermediate_size", where),
        num_hidden_layers=_required(hub_config, "num_hidden_layers", where),
        num_attention_heads=heads,
        num_key_value_heads=hub_config.get("num_key_value_heads") or heads,
        hidden_act=hub_config.get("hidden_act", "silu"),
        max_position_embeddings=hub_config.get("max_position_embeddings", 2048),
        initializer_range=hub_config.get("initializer_range", 0.02),
        rms_norm_eps=hub_config.get("rms_norm_eps", 1e-6),
        bos_token_id=hub_config.get("bos_token_id", 1),
        eos_token_id=hub_config.get("eos_token_id", 2),
        pad_token_id=hub_config.get("pad_token_id", 0),
        tie_word_embeddings=hub_config.get("tie_word_embeddings", False),
        attention_bias=hub_config.get("bias", True),
        rope_parameters=_rope_parameters(hub_config, arch, where),
        **({"dtype": dtype} if dtype else {}),
    )


# --------------------------------------------------------------------------- weights


class Checkpoint(dict):
    """A state dict that remembers which file each tensor came from, so errors can name it."""

    def __init__(self, files: list[Path]):
        super().__init__()
        self.files = files
        self.origin: dict[str, Path] = {}  # also keys an index promises but no file holds

    def where(self, key: str) -> str:
        if key in self.origin:
            return str(self.origin[key])
        return ", ".join(str(f) for f in self.files)


def load_checkpoint(model_dir: str | os.PathLike) -> Checkpoint:
    """All weights of a hub directory, from safetensors if present, else from ``.bin`` files.

    ``.bin`` files are read with ``weights_only=True``, which refuses pickled code
    (:func:`snaketune.safe_pickle.load_weights`).
    """
    model_dir = Path(model_dir)
    weight_map: dict[str, str] = {}
    for pattern, index_name in (
        ("model*.safetensors", "model.safetensors.index.json"),
        ("pytorch_model*.bin", "pytorch_model.bin.index.json"),
    ):
        index = model_dir / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({model_dir / name for name in weight_map.values()})
        else:
            files = sorted(model_dir.glob(pattern))
        if files:
            break
    else:
        raise ValueError(f"{model_dir}: no model*.safetensors or pytorch_model*.bin weights")
    state = Checkpoint(files)
    state.origin.update({key: model_dir / name for key, name in weight_map.items()})
    for file in files:
        if not file.is_file():
            raise ValueError(f"{file}: listed in the weight index but missing")
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            part = load_file(file)
        else:
            from .safe_pickle import load_weights

            part = load_weights(file)
        for key, tensor in part.items():
            state[key] = tensor
            state.origin[key] = file
    return state


def _where(state: Mapping[str, torch.Tensor], key: str) -> str:
    return state.where(key) if isinstance(state, Checkpoint) else "state dict"


def _take(state: Mapping[str, torch.Tensor], key: str, shape: tuple[int, ...], used: set[str]) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"{_where(state, key)}: missing weight {key!r}")
    tensor = state[key]
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{_where(state, key)}: {key!r} has shape {tuple(tensor.shape)}, expected {shape}")
    used.add(key)
    return tensor


def _check_all_used(state: Mapping[str, torch.Tensor], used: set[str]) -> None:
    # A weight we do not know how to place would silently vanish from the converted model.
    left = sorted(k for k in state if k not in used and not _DERIVED_BUFFER.search(k))
    if left:
        raise ValueError(f"{_where(state, left[0])}: unexpected weight(s) {left[:5]}")


def _dims(config: Mapping[str, Any]) -> tuple[int, int, int, int, int]:
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"config: hidden_size {hidden}, {heads} heads and {kv_heads} KV heads do not divide")
    return hidden, heads, kv_heads, hidden // heads, config["intermediate_size"]


def internlm2_to_llama_state(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename InternLM2 weights to Llama's and split the fused ``wqkv``.

    ``wqkv`` is not three stacked q/k/v blocks: its rows are grouped by KV head,
    each group holding that group's ``q_per_kv`` query heads, then its key head,
    then its value head, i.e. shape ``(kv_heads, q_per_kv + 2, head_dim, hidden)``.
    Query head ``g * q_per_kv + j`` attends with KV head ``g``, which is exactly
    the order Llama's grouped-query attention expects once the groups are
    concatenated, so no head permutation is needed beyond the split.
    """
    hidden, heads, kv_heads, head_dim, inter = _dims(config)
    group = heads // kv_heads
    vocab = config["vocab_size"]
    bias = config.get("bias", True)
    used: set[str] = set()
    out = {
        "model.embed_tokens.weight": _take(state, "model.tok_embeddings.weight", (vocab, hidden), used),
        "model.norm.weight": _take(state, "model.norm.weight", (hidden,), used),
    }
    if not config.get("tie_word_embeddings", False):
        out["lm_head.weight"] = _take(state, "output.weight", (vocab, hidden), used)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        # A bias is the weight without its input dimension, so both split the same way.
        # clone(), not contiguous(): with one KV head the slices are already contiguous views,
        # and safetensors refuses to save tensors that share storage.
        for suffix, tail in (("weight", (hidden,)), ("bias", ()))[: 2 if bias else 1]:
            wqkv = _take(state, f"{p}attention.wqkv.{suffix}", ((heads + 2 * kv_heads) * head_dim, *tail), used)
            grouped = wqkv.reshape(kv_heads, group + 2, head_dim, *tail)
            out[f"{p}self_attn.q_proj.{suffix}"] = grouped[:, :group].reshape(heads * head_dim, *tail).clone()
            out[f"{p}self_attn.k_proj.{suffix}"] = grouped[:, group].reshape(kv_heads * head_dim, *tail).clone()
            out[f"{p}self_attn.v_proj.{suffix}"] = grouped[:, group + 1].reshape(kv_heads * head_dim, *tail).clone()
            wo_shape = (hidden, heads * head_dim) if suffix == "weight" else (hidden,)
            out[f"{p}self_attn.o_proj.{suffix}"] = _take(state, f"{p}attention.wo.{suffix}", wo_shape, used)
        out[f"{p}mlp.gate_proj.weight"] = _take(state, f"{p}feed_forward.w1.weight", (inter, hidden), used)
        out[f"{p}mlp.up_proj.weight"] = _take(state, f"{p}feed_forward.w3.weight", (inter, hidden), used)
        out[f"{p}mlp.down_proj.weight"] = _take(state, f"{p}feed_forward.w2.weight", (hidden, inter), used)
        out[f"{p}input_layernorm.weight"] = _take(state, f"{p}attention_norm.weight", (hidden,), used)
        out[f"{p}post_attention_layernorm.weight"] = _take(state, f"{p}ffn_norm.weight", (hidden,), used)
    _check_all_used(state, used)
    return out


def internlm_to_llama_state(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Check and pass through InternLM (v1) weights, which already carry Llama's names.

    The checks matter because the names match: a missing bias or a truncated
    shard would otherwise load silently as freshly initialised weights.
    """
    hidden, heads, kv_heads, head_dim, inter = _dims(config)
    vocab = config["vocab_size"]
    bias = config.get("bias", True)
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        projections = {"q_proj": heads * head_dim, "k_proj": kv_heads * head_dim, "v_proj": kv_heads * head_dim}
        for name, rows in projections.items():
            shapes[f"{p}self_attn.{name}.weight"] = (rows, hidden)
            if bias:
                shapes[f"{p}self_attn.{name}.bias"] = (rows,)
        shapes[f"{p}self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        if bias:
            shapes[f"{p}self_attn.o_proj.bias"] = (hidden,)
        shapes[f"{p}mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{p}mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (hidden, inter)
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    used: set[str] = set()
    out = {key: _take(state, key, shape, used) for key, shape in shapes.items()}
    _check_all_used(state, used)
    return out


# --------------------------------------------------------------------------- tokenizer

# sentencepiece_model.proto: SentencePiece.Type and TrainerSpec.ModelType values.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_UNIGRAM, _BPE = 1, 2


@dataclass
class SentencePieceModel:
    """The parts of a sentencepiece ``ModelProto`` that decide how text becomes ids."""

    pieces: list[tuple[str, float, int]] = field(default_factory=list)  # (piece, score, type)
    model_type: int = _UNIGRAM
    byte_fallback: bool = False
    unk_id: int = 0
    treat_whitespace_as_suffix: bool = False
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


def read_sentencepiece(path: str | os.PathLike) -> SentencePieceModel:
    """Parse ``tokenizer.model`` with sentencepiece's own protobuf schema (nothing is executed)."""
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    path = Path(path)
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except DecodeError as err:
        raise ValueError(f"{path}: not a sentencepiece model ({err})") from None
    if not proto.pieces:
        raise ValueError(f"{path}: not a sentencepiece model (no pieces)")
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    return SentencePieceModel(
        pieces=[(p.piece, p.score, p.type) for p in proto.pieces],
        model_type=trainer.model_type,
        byte_fallback=trainer.byte_fallback,
        unk_id=trainer.unk_id,
        treat_whitespace_as_suffix=trainer.treat_whitespace_as_suffix,
        precompiled_charsmap=normalizer.precompiled_charsmap,
        add_dummy_prefix=normalizer.add_dummy_prefix,
        remove_extra_whitespaces=normalizer.remove_extra_whitespaces,
        escape_whitespaces=normalizer.escape_whitespaces,
    )


def _token_content(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def build_tokenizer(
    spm: SentencePieceModel, tokenizer_config: Mapping[str, Any], where: str = "tokenizer.model"
) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` that splits text exactly as sentencepiece does.

    The hub's chat specials (``<|im_start|>`` ...) are not in ``tokenizer.model``
    under their names: they occupy placeholder pieces there, and only
    ``tokenizer_config.json``'s ``added_tokens_decoder`` names them. Renaming
    those pieces in the vocabulary keeps their ids, which the embeddings were
    trained with.
    """
    from tokenizers import Tokenizer

    if spm.treat_whitespace_as_suffix or not spm.escape_whitespaces:
        raise ValueError(f"{where}: whitespace handling (suffix or unescaped) is not supported")
    names, declared = _named_pieces(spm, tokenizer_config, where)
    tokenizer = Tokenizer(_tokenizer_model(spm, names, declared, where))
    _set_normalizer_and_decoder(tokenizer, spm)
    tokenizer.add_tokens(_added_tokens(spm, names, declared))
    return tokenizer


def _named_pieces(
    spm: SentencePieceModel, tokenizer_config: Mapping[str, Any], where: str
) -> tuple[list[str], dict[int, dict]]:
    """The pieces' names, with those ``added_tokens_decoder`` renames, and its entries by id."""
    names = [piece for piece, _, _ in spm.pieces]
    declared = {}
    for key, entry in (tokenizer_config.get("added_tokens_decoder") or {}).items():
        index = int(key)
        if index >= len(names):
            raise ValueError(f"{where}: tokenizer_config.json names id {index}, beyond the {len(names)} pieces")
        if entry["content"] in names and names.index(entry["content"]) != index:
            raise ValueError(
                f"{where}: tokenizer_config.json gives id {index} the name of another piece, {entry['content']!r}"
            )
        names[index] = entry["content"]
        declared[index] = entry
    return names, declared


def _tokenizer_model(spm: SentencePieceModel, names: list[str], declared: dict[int, dict], where: str):
    from tokenizers.models import BPE, Unigram

    if spm.model_type == _UNIGRAM:
        scores = [(name, score) for name, (_, score, _) in zip(names, spm.pieces)]
        return Unigram(scores, unk_id=spm.unk_id, byte_fallback=spm.byte_fallback)
    if spm.model_type == _BPE:
        return BPE(
            vocab={name: i for i, name in enumerate(names)},
            merges=_bpe_merges(spm, set(declared)),
            unk_token=names[spm.unk_id],
            fuse_unk=True,
            byte_fallback=spm.byte_fallback,
        )
    raise ValueError(f"{where}: sentencepiece model type {spm.model_type} is neither unigram nor BPE")


def _set_normalizer_and_decoder(tokenizer: Tokenizer, spm: SentencePieceModel) -> None:
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers

    steps = []
    if spm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spm.precompiled_charsmap))
    if spm.remove_extra_whitespaces:
        # sentencepiece trims and squeezes ASCII spaces only (after its charsmap), not newlines.
        # Leading spaces become the dummy prefix itself rather than vanishing: Metaspace only
        # prepends to text that starts at offset 0, which deleting them would shift.
        steps += [
            normalizers.Replace(Regex(r"\A +(?=[^ ])"), "▁" if spm.add_dummy_prefix else ""),
            normalizers.Replace(Regex(r" +\z"), ""),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    if steps:
        tokenizer.normalizer = normalizers.Sequence(steps)
    # split=False: sentencepiece segments the whole escaped string, so "▁" must not cut words apart.
    prepend = "first" if spm.add_dummy_prefix else "never"
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spm.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)


def _added_tokens(spm: SentencePieceModel, names: list[str], declared: dict[int, dict]) -> list:
    """Pieces sentencepiece matches whole (user-defined) or never from text (control) become added tokens."""
    from tokenizers import AddedToken

    added = []
    for index, (name, (_, _, kind)) in enumerate(zip(names, spm.pieces)):
        entry = declared.get(index)
        if entry is not None:
            added.append(
                AddedToken(
                    name,
                    special=entry.get("special", True),
                    normalized=False,
                    lstrip=entry.get("lstrip", False),
                    rstrip=entry.get("rstrip", False),
                    single_word=entry.get("single_word", False),
                )
            )
        elif kind in (_CONTROL, _UNKNOWN, _USER_DEFINED):
            added.append(AddedToken(name, special=kind != _USER_DEFINED, normalized=False))
    return added


def _bpe_merges(spm: SentencePieceModel, renamed: set[int]) -> list[tuple[str, str]]:
    """Merges that replay sentencepiece's BPE: the highest-scoring piece is merged first.

    Only ordinary pieces take part; renamed placeholders must never be produced from text.
    """
    normal = {piece: i for i, (piece, _, kind) in enumerate(spm.pieces) if kind == _NORMAL and i not in renamed}
    ranked = []
    for piece, index in normal.items():
        score = spm.pieces[index][1]
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, index, normal[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def convert_tokenizer(src_dir: str | os.PathLike, arch: str) -> PreTrainedTokenizerFast:
    """The hub tokenizer as a ``PreTrainedTokenizerFast`` that needs no remote code."""
    from transformers import PreTrainedTokenizerFast

    src = Path(src_dir)
    model_path = src / "tokenizer.model"
    if not model_path.is_file():
        raise ValueError(f"{model_path}: missing; InternLM tokenizers are sentencepiece models")
    config: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        if (src / name).is_file():
            config.update(json.loads((src / name).read_text()))
    spm = read_sentencepiece(model_path)
    backend = build_tokenizer(spm, config, str(model_path))
    vocab = backend.get_vocab(with_added_tokens=True)

    specials = {
        "bos_token": _token_content(config.get("bos_token", "<s>")),
        "eos_token": _token_content(config.get("eos_token", "</s>")),
        "unk_token": _token_content(config.get("unk_token", spm.pieces[spm.unk_id][0])),
        "pad_token": _token_content(config.get("pad_token")),
    }
    for role, token in specials.items():
        if token is not None and token not in vocab:
            raise ValueError(f"{src / 'tokenizer_config.json'}: {role} {token!r} is not in {model_path.name}")
    template = config.get("chat_template") or (_CHATML_TEMPLATE if arch == INTERNLM2 else _INTERNLM_CHAT_TEMPLATE)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **{role: token for role, token in specials.items() if token is not None},
        add_bos_token=config.get("add_bos_token", True),
        add_eos_token=config.get("add_eos_token", False),
        clean_up_tokenization_spaces=False,
        chat_template=template,
    )


# --------------------------------------------------------------------------- directory


def convert(src_dir: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Write a native ``LlamaForCausalLM`` directory equivalent to an InternLM(2) hub directory.

    Everything is built in memory and written to a hidden sibling directory that
    is renamed into place at the end, so a failure never leaves a half-written
    ``out_dir`` that a later step would take for a finished model.
    """
    from huggingface_hub import save_torch_state_dict
    from transformers import GenerationConfig

    src, out = Path(src_dir), Path(out_dir)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{config_path}: missing")
    hub_config = json.loads(config_path.read_text())
    config = llama_config(hub_config, str(config_path))
    arch = _family(hub_config)
    to_llama = internlm2_to_llama_state if arch == INTERNLM2 else internlm_to_llama_state
    state = to_llama(load_checkpoint(src), hub_config)
    tokenizer = convert_tokenizer(src, arch)

    if (src / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(src)
    else:
        generation = GenerationConfig.from_model_config(config)
        # Chat checkpoints end a reply with an end-of-turn token, not </s>; stop on either.
        end_of_turn = tokenizer.convert_tokens_to_ids(_END_OF_TURN[arch])
        if end_of_turn != tokenizer.unk_token_id:
            eos = config.eos_token_id
            generation.eos_token_id = [*(eos if isinstance(eos, list) else [eos]), end_of_turn]

    with atomic_dir(out, replace=False) as tmp:
        save_torch_state_dict(state, tmp, max_shard_size="5GB")
        config.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
