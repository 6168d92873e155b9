"""``gguf``: a merged model as the GGUF files llama.cpp, Ollama and LM Studio run, and a PEFT adapter as
llama.cpp's LoRA GGUF (``--lora``), written with the ``gguf`` package's writer and numpy quantizers.

A model file holds the weights (F32, F16, BF16, Q8_0, Q4_0 or Q4_1), the shape of the model, the tokenizer
(tokens, their types, merges or scores, special ids, the pre-tokenizer's name) and the chat template, with the
training template's end-of-turn token as llama.cpp's end-of-turn and end-of-text, so that llama.cpp and
Ollama format a chat as training did and stop where the answer ends. Weights are read one tensor at a time
from the safetensors shards (pickled weights only with ``allow_pickle``, read as tensors only) and written
at once, so memory holds one tensor, never the model. An Ollama Modelfile goes beside each model file.

Supported: ``LlamaForCausalLM`` with a byte-level BPE tokenizer (SmolLM2) or a sentencepiece BPE tokenizer as
fetch-model's native InternLM2 / InternLM conversion writes it. Anything else is refused, naming what.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import GgufConfig
from .errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

# name -> (ggml type of the 2-D weights, llama.cpp's file type)
TYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
}
SUPPORTED = (
    "LlamaForCausalLM (SmolLM2 and other Llama-family models with a byte-level BPE tokenizer, and InternLM2 / "
    "InternLM after fetch-model's native conversion)"
)
# In a 4-bit file the token embedding and the output head, which every token goes through, stay at Q8_0, as
# llama.cpp's own quantizer keeps the output head above the file's type.
KEEP_Q8_IN_Q4 = ("token_embd.weight", "output.weight")
ARCH = "llama"


# ---------------------------------------------------------------- the model's shape


@dataclass
class LlamaShape:
    """What llama.cpp's Llama loader needs to know of the model, from its config.json."""

    n_vocab: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    context_length: int
    rope_theta: float
    rms_eps: float
    tied: bool


def llama_shape(model_dir: Path) -> LlamaShape:
    """The model's shape; a model llama.cpp's Llama architecture cannot run as it is, refused by name."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: missing; give a Hugging Face model directory (the merged model)")
    config = json.loads(path.read_text())
    archs = config.get("architectures") or [config.get("model_type", "unknown")]
    if "LlamaForCausalLM" not in archs:
        raise ConfigError(
            f"{path}: architecture {', '.join(map(str, archs))} cannot be written as GGUF here; supported: {SUPPORTED}"
        )
    if config.get("mlp_bias"):
        raise ConfigError(f"{path}: mlp_bias: true, which llama.cpp's Llama architecture has no tensors for")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type")) or "default"
    if kind not in ("default", "dynamic"):
        raise ConfigError(f"{path}: rope type {kind!r}: only the plain rotary embedding is written here")
    if kind == "dynamic":
        log.warning(
            "%s: dynamic NTK rope scaling changes the rotary embedding only past max_position_embeddings "
            "(%s), which the GGUF file gives as its context length: within it the two agree",
            path,
            config["max_position_embeddings"],
        )
    n_head = config["num_attention_heads"]
    return LlamaShape(
        n_vocab=config["vocab_size"],
        n_embd=config["hidden_size"],
        n_ff=config["intermediate_size"],
        n_layer=config["num_hidden_layers"],
        n_head=n_head,
        n_head_kv=config.get("num_key_value_heads") or n_head,
        head_dim=config.get("head_dim") or config["hidden_size"] // n_head,
        context_length=config["max_position_embeddings"],
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        rms_eps=float(config["rms_norm_eps"]),
        tied=bool(config.get("tie_word_embeddings", False)),
    )


def add_shape(writer, shape: LlamaShape, name: str) -> None:
    writer.add_name(name)
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_vocab_size(shape.n_vocab)
    if shape.head_dim * shape.n_head != shape.n_embd:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)


def unrotate(w, n_heads: int):
    """q_proj / k_proj rows (or bias) from Hugging Face's rotary layout (each head's first half of dimensions,
    then its second half) to the interleaved pairs llama.cpp's Llama rotates: (heads, 2, half) -> (heads, half, 2)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def heads_of(gguf_name: str, shape: LlamaShape) -> int | None:
    """The heads whose rows a tensor holds, for the q and k projections (and their LoRA B)."""
    if ".attn_q." in gguf_name:
        return shape.n_head
    if ".attn_k." in gguf_name:
        return shape.n_head_kv
    return None


# ---------------------------------------------------------------- the tensors


@dataclass
class Planned:
    """One tensor of the file: where it comes from, its GGUF name, and how it is stored."""

    key: str
    source: Any  # merge.BaseTensor
    name: str
    shape: tuple[int, ...]
    qtype: str  # a GGMLQuantizationType name
    heads: int | None = None


def plan_tensors(model_dir: Path, shape: LlamaShape, kind: str, allow_pickle: bool = False) -> list[Planned]:
    """Every tensor the file will hold, in the checkpoint's order; a tensor with no GGUF name is refused."""
    import gguf

    from .merge import base_tensors

    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, shape.n_layer)
    planned = []
    for key, where in base_tensors(model_dir, allow_pickle).items():
        if key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and shape.tied):
            continue  # recomputed by llama.cpp; a tied head is the embedding itself
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise CheckpointError(f"{model_dir}: tensor {key} has no place in llama.cpp's Llama architecture")
        dims = tuple(where.shape)
        planned.append(Planned(key, where, name, dims, storage(name, dims, kind), heads_of(name, shape)))
    return planned


def storage(name: str, dims: tuple[int, ...], kind: str) -> str:
    """How a tensor is stored in a file of type ``kind``: 1-D tensors (norms, biases) in F32; a row length
    the type's blocks do not divide falls back to F16 (logged)."""
    import gguf

    qtype = TYPES[kind][0]
    if len(dims) < 2:
        return "F32"
    if kind in ("q4_0", "q4_1") and name in KEEP_Q8_IN_Q4:
        qtype = "Q8_0"
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]
    if dims[-1] % block:
        log.warning("%s: rows of %d are not whole %s blocks of %d: written as F16", name, dims[-1], qtype, block)
        return "F16"
    return qtype


def stored(array, qtype: str):
    """``array`` (float32) in the file's bytes for ``qtype``: float32 / float16 arrays, else uint8 blocks."""
    import gguf

    return gguf.quants.quantize(array, gguf.GGMLQuantizationType[qtype])


def add_tensor_info(writer, name: str, dims: tuple[int, ...], qtype: str) -> None:
    import gguf
    import numpy as np

    ggml = gguf.GGMLQuantizationType[qtype]
    n = int(np.prod(dims))
    if qtype in ("F32", "F16"):
        dtype = np.float32 if qtype == "F32" else np.float16
        writer.add_tensor_info(name, dims, np.dtype(dtype), n * np.dtype(dtype).itemsize, raw_dtype=ggml)
    else:
        byte_dims = gguf.quants.quant_shape_to_byte_shape(dims, ggml)
        writer.add_tensor_info(name, byte_dims, np.dtype(np.uint8), int(np.prod(byte_dims)), raw_dtype=ggml)


def tensor_data(item: Planned):
    """One tensor, read, in llama.cpp's layout, stored as planned."""
    import torch

    from .merge import read_tensor

    array = read_tensor(item.key, item.source).to(torch.float32).numpy()
    if item.heads:
        array = unrotate(array, item.heads)
    return stored(array, item.qtype)


# ---------------------------------------------------------------- writing a file


@contextlib.contextmanager
def gguf_file(out: Path):
    """A GGUF writer on a temporary file beside ``out``, which becomes ``out`` once the writer is done; on any
    failure it is removed and an earlier ``out`` is left as it was."""
    import gguf

    from .files import atomic_file

    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        try:
            yield writer
        finally:
            writer.close()


def write_tensors(writer, planned: list[Planned], data) -> None:
    """Header, metadata and tensor table first, then each tensor's data as ``data(item)`` makes it."""
    for item in planned:
        add_tensor_info(writer, item.name, item.shape, item.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for item in planned:
        writer.write_tensor_data(data(item))


@dataclass
class Written:
    """What one export wrote: the file, its size, and the storage of its tensors (counted by type)."""

    path: Path
    bytes: int
    types: dict[str, int] = field(default_factory=dict)


def write_model(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    kind: str = "f16",
    *,
    name: str | None = None,
    allow_pickle: bool = False,
) -> Written:
    """``model_dir`` (a Hugging Face Llama directory: the merged model) as one GGUF model file of type ``kind``."""
    import gguf

    from .gguf_vocab import add_vocab, read_vocab

    model_dir, out = Path(model_dir), Path(out)
    if kind not in TYPES:
        raise ConfigError(f"GGUF type {kind!r}: choose one of {', '.join(TYPES)}")
    shape = llama_shape(model_dir)
    vocab = read_vocab(model_dir, shape.n_vocab)  # a tokenizer it cannot name is refused before anything is read
    planned = plan_tensors(model_dir, shape, kind, allow_pickle)
    with gguf_file(out) as writer:
        add_shape(writer, shape, name or model_dir.resolve().name)
        writer.add_file_type(gguf.LlamaFileType[TYPES[kind][1]])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_vocab(writer, vocab)
        write_tensors(writer, planned, tensor_data)
    types: dict[str, int] = {}
    for item in planned:
        types[item.qtype] = types.get(item.qtype, 0) + 1
    log.info("wrote %s (%s, %d tensors: %s)", out, kind, len(planned), types)
    return Written(out, out.stat().st_size, types)


# ---------------------------------------------------------------- the adapter: llama.cpp's LoRA GGUF


def lora_tensors(adapter_dir: Path, base_dir: Path, shape: LlamaShape, allow_pickle: bool = False):
    """(name, array) of every LoRA tensor of the adapter and the alpha to write: ``<weight>.lora_a`` (PEFT's
    lora_A, r x in) and ``<weight>.lora_b`` (lora_B, out x r, in llama.cpp's row order for q and k). llama.cpp
    scales a pair by alpha / r; where PEFT's scaling differs from that (rsLoRA, alpha_pattern), lora_b carries
    the difference, so the product is PEFT's delta either way."""
    import gguf

    from .merge import adapter_changes, base_tensors

    changes, whole = adapter_changes(adapter_dir, base_tensors(base_dir, allow_pickle), base_dir)
    if whole:
        raise CheckpointError(
            f"{adapter_dir}: {', '.join(sorted(whole))} replaced whole (modules_to_save or a trained bias), which "
            "llama.cpp's LoRA format cannot hold: use the merged model's GGUF file"
        )
    alpha = float(json.loads((adapter_dir / "adapter_config.json").read_text())["lora_alpha"])
    if alpha <= 0:
        raise CheckpointError(f"{adapter_dir}/adapter_config.json: lora_alpha {alpha:g}; llama.cpp scales by alpha / r")
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, shape.n_layer)
    tensors = []
    for key, lora in changes.items():
        name = names.get_name(key, try_suffixes=(".weight",))
        if name is None or lora.embedding or lora.fan_in_fan_out:
            raise CheckpointError(f"{adapter_dir}: the LoRA on {key} has no place in llama.cpp's LoRA format")
        a = lora.A.float().numpy()
        b = lora.B.float().numpy() * (lora.scaling * a.shape[0] / alpha)
        heads = heads_of(name, shape)
        tensors += [(f"{name}.lora_a", a), (f"{name}.lora_b", unrotate(b, heads) if heads else b)]
    return tensors, alpha


def write_adapter(
    adapter_dir: str | os.PathLike,
    base_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    name: str | None = None,
    allow_pickle: bool = False,
) -> Written:
    """A PEFT LoRA adapter as llama.cpp's LoRA GGUF (``llama-cli -m BASE.gguf --lora OUT``), in F32. ``base_dir``:
    the base model it was trained on (its shape; its GGUF file is the one to run it on)."""
    import gguf
    import numpy as np

    adapter_dir, base_dir, out = Path(adapter_dir), Path(base_dir), Path(out)
    shape = llama_shape(base_dir)
    tensors, alpha = lora_tensors(adapter_dir, base_dir, shape, allow_pickle)
    with gguf_file(out) as writer:
        writer.add_type("adapter")
        writer.add_name(name or adapter_dir.resolve().name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for tensor_name, array in tensors:
            writer.add_tensor(tensor_name, np.ascontiguousarray(array, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    log.info("wrote %s (%d LoRA pairs, alpha %g)", out, len(tensors) // 2, alpha)
    return Written(out, out.stat().st_size, {"F32": len(tensors)})


# ---------------------------------------------------------------- Ollama's Modelfile


def go_template(template: str, eos: str, bos: str = "") -> str | None:
    """The training template as an Ollama (Go) template over ``.Messages``, rendering a conversation as the
    merged model's chat template does (``bos``: the text it starts with, where it starts with the BOS); None for
    ``tokenizer`` (Ollama then reads the GGUF file's template)."""
    from .encoding import resolve_template
    from .templates import TOKENIZER_TEMPLATE

    tmpl = resolve_template(template)
    if tmpl == TOKENIZER_TEMPLATE:
        return None
    sys_pre, sys_post = tmpl.system.split("{system}")
    ins_pre, ins_post = tmpl.instruction.split("{input}")
    answer_end = tmpl.suffix + ("" if tmpl.suffix_as_eos else eos) + tmpl.sep
    literal = sys_pre + sys_post + ins_pre + ins_post + answer_end
    if "{{" in literal or '"""' in literal or "{round}" in literal:
        raise ConfigError(f"template {tmpl.name}: its text cannot be written as an Ollama template")
    return (
        bos + "{{- range .Messages }}"
        f'{{{{ if eq .Role "system" }}}}{sys_pre}{{{{ .Content }}}}{sys_post}'
        f'{{{{ else if eq .Role "user" }}}}{ins_pre}{{{{ .Content }}}}{ins_post}'
        f'{{{{ else if eq .Role "assistant" }}}}{{{{ .Content }}}}{answer_end}'
        "{{ end }}{{ end }}"
    )


def modelfile(model_file: str, template: str, vocab, system: str = "") -> str:
    """An Ollama Modelfile for ``model_file`` (beside it): the chat format, the system prompt training used,
    the stop strings (the template's and the end-of-turn tokens'), and greedy answers as snaketune's chat and
    evaluation give. ``vocab``: the model's :class:`snaketune.gguf_vocab.Vocab`."""
    from .encoding import resolve_template
    from .templates import TOKENIZER_TEMPLATE

    tmpl = resolve_template(template)
    words = [] if tmpl == TOKENIZER_TEMPLATE else list(tmpl.stop_words)
    ids = vocab.special.special_token_ids
    lines = [
        f"# Ollama: ollama create NAME -f {Path(model_file).with_suffix('.Modelfile').name} && ollama run NAME",
        f"FROM ./{model_file}",
    ]
    # merge writes a chat template that starts with the BOS where the training encoder put one there
    starts_with_bos = str(vocab.special.chat_template or "").startswith("{{ bos_token }}") and "bos" in ids
    go = go_template(
        template, vocab.tokens[ids["eos"]] if "eos" in ids else "", vocab.tokens[ids["bos"]] if starts_with_bos else ""
    )
    if go is None:
        lines.append("# no TEMPLATE: Ollama takes the chat template from the GGUF file")
    else:
        lines.append(f'TEMPLATE """{go}"""')
    if system:
        if '"""' in system:
            raise ConfigError('the system prompt holds """, which a Modelfile cannot quote')
        lines.append(f'SYSTEM """{system}"""')
    for stop in dict.fromkeys(words + vocab.stops):
        lines.append(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}")
    lines.append("# greedy, as `snaketune chat` and the evaluation answer; remove it to sample")
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def write_modelfile(
    model_dir: str | os.PathLike, model_file: str | os.PathLike, template: str, system: str = ""
) -> Path:
    """The Modelfile of ``model_file`` (a GGUF file written from ``model_dir``), beside it."""
    from .files import write_text
    from .gguf_vocab import read_vocab

    model_dir, model_file = Path(model_dir), Path(model_file)
    vocab = read_vocab(model_dir, llama_shape(model_dir).n_vocab)
    out = model_file.with_suffix(".Modelfile")
    write_text(out, modelfile(model_file.name, template, vocab, system))
    return out


# ---------------------------------------------------------------- an experiment's files


def export(
    merged: str | os.PathLike,
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    gguf: GgufConfig,
    *,
    name: str,
    template: str,
    system: str = "",
    allow_pickle: bool = False,
) -> list[Written]:
    """What the export_gguf rule writes into ``out`` (an experiment's ``Layout.gguf``): the merged model as one
    GGUF file per type in ``gguf.types``, a Modelfile beside each, and, with ``gguf.adapter``, the adapter as
    llama.cpp's LoRA GGUF for ``base``'s GGUF file. ``out`` appears whole or not at all."""
    from .config import LAYOUT
    from .files import atomic_dir, write_text
    from .gguf_vocab import read_vocab

    unknown = [kind for kind in gguf.types if kind not in TYPES]
    if unknown or not gguf.types:
        raise ConfigError(f"gguf.types: {unknown or 'none'}; choose from {', '.join(TYPES)}")
    merged, files = Path(merged), LAYOUT.format(exp=name)
    vocab = read_vocab(merged, llama_shape(merged).n_vocab)
    written = []
    with atomic_dir(out) as tmp:
        for kind in gguf.types:
            model_file = Path(files.gguf_model.format(type=kind)).name
            written.append(write_model(merged, tmp / model_file, kind, name=name, allow_pickle=allow_pickle))
            text = modelfile(model_file, template, vocab, system)
            write_text(tmp / Path(files.gguf_modelfile.format(type=kind)).name, text)
        if gguf.adapter:
            lora = tmp / Path(files.gguf_adapter).name
            written.append(write_adapter(adapter, base, lora, name=f"{name}-lora", allow_pickle=allow_pickle))
    for item in written:
        item.path = Path(out) / item.path.name
        log.info("%s: %.1f MB %s", item.path, item.bytes / 1e6, item.types)
    return written
