"""The tokenizer of a Hugging Face model directory as GGUF metadata: llama.cpp's tokenizer model and pre-tokenizer
name, every token with its type (and, for sentencepiece, its score), the merges, the special ids and the chat
template, read from ``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja`` and
``generation_config.json`` (as data: nothing of the directory is imported or run).

llama.cpp does not read a pre-tokenizer from the file: it knows a fixed list of them by name
(``tokenizer.ggml.pre``) and splits text with its own copy of each. The name is chosen here by comparing the
directory's pre-tokenizer with the definitions of the ones named in :data:`PRE_TOKENIZERS`; a tokenizer that
matches none is refused, as llama.cpp would split its text otherwise than training did.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

log = logging.getLogger(__name__)

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
# llama.cpp's name -> the tokenizers pre-tokenizer it splits text as (offsets aside, which ids do not depend on)
PRE_TOKENIZERS: dict[str, dict] = {
    "gpt-2": _BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
}
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class Vocab:
    """What the GGUF file says of the tokenizer."""

    model: str  # gpt2 (byte-level BPE) or llama (sentencepiece)
    pre: str
    tokens: list[str]
    types: list[int]  # gguf.TokenType values
    special: Any  # gguf.SpecialVocab: merges, special ids, add_bos/add_eos, chat template
    scores: list[float] | None = None
    add_space_prefix: bool = False
    stops: list[str] = field(default_factory=list)  # the texts of the tokens that end an answer


def _canonical(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _canonical(v) for k, v in node.items() if k != "trim_offsets"}
    if isinstance(node, list):
        return [_canonical(v) for v in node]
    return node


def tokenizer_kind(tokenizer: dict, where: Path) -> tuple[str, str, bool]:
    """(llama.cpp's tokenizer model, its pre-tokenizer name, add_space_prefix) for a tokenizer.json."""
    model, pre, normalizer = tokenizer.get("model") or {}, tokenizer.get("pre_tokenizer"), tokenizer.get("normalizer")
    decoder = (tokenizer.get("decoder") or {}).get("type")
    if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder == "ByteLevel":
        named = [n for n, d in PRE_TOKENIZERS.items() if _canonical(pre) == _canonical(d)]
        if named and normalizer is None and not model.get("ignore_merges"):
            return "gpt2", named[0], False
    metaspace = {"type": "Metaspace", "replacement": "▁", "split": False}
    if model.get("type") == "BPE" and model.get("byte_fallback") and normalizer is None and isinstance(pre, dict):
        prepend = pre.get("prepend_scheme")
        if {k: v for k, v in pre.items() if k != "prepend_scheme"} == metaspace and prepend in ("first", "never"):
            return "llama", "default", prepend == "first"
    summary = json.dumps({"model": model.get("type"), "normalizer": normalizer, "pre_tokenizer": pre})
    raise ConfigError(
        f"{where}: llama.cpp has no name known here for this tokenizer ({summary[:300]}), so it would split text "
        f"otherwise than training did; supported: byte-level BPE with the pre-tokenizer of "
        f"{' or '.join(PRE_TOKENIZERS)}, and sentencepiece BPE as fetch-model's InternLM2 conversion writes it"
    )


def _added(tokenizer: dict) -> dict[int, dict]:
    return {entry["id"]: entry for entry in tokenizer.get("added_tokens") or []}


def gpt2_tokens(model_dir: Path, tokenizer: dict) -> tuple[list[str], list[int]]:
    """Tokens in id order (GPT-2's byte alphabet) and their types: added special tokens are control tokens,
    other added tokens user-defined (llama.cpp matches both whole in text, as tokenizers does)."""
    import gguf

    tokens = [
        text.decode() if isinstance(text, bytes) else text for text, _, _ in gguf.vocab.BpeVocab(model_dir).all_tokens()
    ]
    types = [gguf.TokenType.NORMAL] * len(tokens)
    for index, entry in _added(tokenizer).items():
        types[index] = gguf.TokenType.CONTROL if entry.get("special") else gguf.TokenType.USER_DEFINED
    return tokens, [int(t) for t in types]


def spm_tokens(tokenizer: dict, where: Path) -> tuple[list[str], list[int], list[float]]:
    """Tokens (sentencepiece's ▁ for a space), types and scores. llama.cpp's sentencepiece tokenizer merges the
    pair whose joined piece scores highest; a piece's score here is minus the rank of the first merge that makes
    it, so it merges in the order of the BPE merges."""
    import gguf

    model = tokenizer["model"]
    added = _added(tokenizer)
    size = max([*model["vocab"].values(), *added]) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for text, index in model["vocab"].items():
        tokens[index] = text
    for index, entry in added.items():
        tokens[index] = entry["content"]
    rank: dict[str, int] = {}
    for i, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, i)
    scores = [-float(rank[t]) if t in rank else 0.0 for t in tokens]
    types = []
    for index, text in enumerate(tokens):
        if index in added:
            types.append(gguf.TokenType.CONTROL if added[index].get("special") else gguf.TokenType.USER_DEFINED)
        elif text == model.get("unk_token"):
            types.append(gguf.TokenType.UNKNOWN)
        elif BYTE_TOKEN.fullmatch(text):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types], scores


def read_vocab(model_dir: Path, n_vocab: int) -> Vocab:
    """The directory's tokenizer as GGUF metadata, for a model with ``n_vocab`` embedding rows."""
    import gguf

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"{path}: missing; the GGUF export reads the tokenizer from tokenizer.json")
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    kind, pre, space_prefix = tokenizer_kind(tokenizer, path)
    strips = [e["content"] for e in tokenizer.get("added_tokens") or [] if e.get("lstrip") or e.get("rstrip")]
    if strips:
        log.warning("%s: llama.cpp does not strip spaces around %s as tokenizers does", path, ", ".join(strips))
    scores = None
    if kind == "gpt2":
        tokens, types = gpt2_tokens(model_dir, tokenizer)
    else:
        tokens, types, scores = spm_tokens(tokenizer, path)
    if len(tokens) > n_vocab:
        raise ConfigError(f"{path}: {len(tokens)} tokens, but the model's embedding has {n_vocab} rows")
    for index in range(len(tokens), n_vocab):  # embedding rows no token uses: llama.cpp wants one token a row
        tokens.append(f"[PAD{index}]")
        types.append(int(gguf.TokenType.UNUSED))
        if scores is not None:
            scores.append(0.0)
    special = gguf.SpecialVocab(model_dir, load_merges=kind == "gpt2", n_vocab=n_vocab)
    # tokenizers adds a BOS or EOS only where its post-processor or config says so: say it either way
    for typ in ("bos", "eos"):
        special.add_special_token.setdefault(typ, False)
    vocab = Vocab(kind, pre, tokens, types, special, scores, space_prefix)
    end_of_turn(vocab, model_dir)
    return vocab


def end_of_turn(vocab: Vocab, model_dir: Path) -> None:
    """The tokens that end an answer (the generation config's, which merge writes from the training template):
    the one the chat template writes after an answer becomes llama.cpp's end-of-turn, and its end-of-text too
    when the tokenizer's own is none of them, so that llama.cpp and Ollama stop there."""
    ids = vocab.special.special_token_ids
    path = model_dir / "generation_config.json"
    stops = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    stops = [s for s in (stops if isinstance(stops, list) else [stops]) if isinstance(s, int) and s < len(vocab.tokens)]
    if not stops and "eos" in ids:
        stops = [ids["eos"]]
    template = vocab.special.chat_template if isinstance(vocab.special.chat_template, str) else ""
    if not template:
        log.warning("%s has no chat template: llama.cpp and Ollama will not know the chat format", model_dir)
    if not stops:
        log.warning("%s names no end-of-text token: llama.cpp may not stop at the end of an answer", model_dir)
        return
    turn = next((s for s in stops if vocab.tokens[s] in template), stops[0])
    ids["eot"] = turn
    if ids.get("eos") not in stops:
        ids["eos"] = turn
    vocab.stops = [vocab.tokens[s] for s in stops]


def add_vocab(writer, vocab: Vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.model == "llama":
        writer.add_add_space_prefix(vocab.add_space_prefix)
    vocab.special.add_to_gguf(writer, quiet=True)
