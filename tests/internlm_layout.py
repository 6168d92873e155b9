"""Tiny InternLM2 / InternLM checkpoints in the hub's on-disk layout, built without downloads.

Each builder starts from a random native ``LlamaForCausalLM`` (the reference the
converted model must reproduce), writes its weights under the hub's names with
an inverse mapping written here independently of ``snaketune.internlm``, adds a
hub-style config.json and a sentencepiece model trained on the spot, and plants
remote-code files that leave a marker if anything ever imports them.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

MARKER = "HUB_CODE_RAN"

# Mixed English/Chinese text with digits and repeated words, enough for a few hundred merges.
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A user asks a question and the assistant answers it politely.",
    "Fine-tuning a chat model with QLoRA keeps the base weights frozen in 4 bits.",
    "Please summarise the following paragraph in three sentences.",
    "The year 2024 had 366 days, and 12 months, and 52 weeks.",
    "Snakemake runs each rule once its inputs are ready.",
    "what is the capital of France? Paris is the capital of France.",
    "Translate the sentence into Chinese, then explain the grammar.",
    "用户提出问题，助手礼貌地回答。",
    "今天天气很好，我们去公园散步吧。",
    "上海是中国最大的城市之一，人口超过两千万。",
    "请把下面这段话翻译成英文，并解释其中的语法。",
    "机器学习模型需要大量的数据来训练。",
    "我喜欢读书，也喜欢写代码。",
    "书山有路勤为径，学海无涯苦作舟。",
    "他说：你好，世界！我们一起学习人工智能。",
] * 20

# InternLM2's chat specials, counted back from the end of tokenizer.model
# (92538 <|plugin|> ... 92543 <|im_start|> in internlm2-chat's 92544 pieces).
INTERNLM2_SPECIALS = {
    "<|plugin|>": -6,
    "<|interpreter|>": -5,
    "<|action_end|>": -4,
    "<|action_start|>": -3,
    "<|im_end|>": -2,
    "<|im_start|>": -1,
}

# The hub's tokenizer_config.json ships a ChatML template; any equivalent one will do here.
CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class HubCheckpoint:
    path: Path
    native: LlamaForCausalLM  # the model the hub files encode
    tokenizer_model: Path
    specials: dict[str, int]  # chat specials -> their hub ids


def train_sentencepiece(path: Path, sentences: list[str], *, trailing: list[str], **options) -> Path:
    """Train on ``sentences``, then append ``trailing`` user-defined pieces so they take the LAST ids.

    sentencepiece itself puts user-defined symbols right after <unk>/<s>/</s>; the hub
    models keep their chat placeholders at the end, which this reproduces.
    """
    from sentencepiece import sentencepiece_model_pb2

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
        **options,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    for piece in trailing:
        proto.pieces.add(piece=piece, score=0.0, type=sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED)
    path.write_bytes(proto.SerializeToString())
    return path


def _randomise(model: LlamaForCausalLM, seed: int) -> LlamaForCausalLM:
    # Default init (std 0.02) gives logits so small that a wrong rotary base would hide under 1e-5.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.3 * noise)
    return model.eval()


def llama_to_internlm2_state(native: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The hub's names and fused, per-KV-group ``wqkv`` for a native Llama's weights."""
    cfg = native.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_group = cfg.num_attention_heads // cfg.num_key_value_heads
    sd = native.state_dict()
    out = {
        "model.tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "model.norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        q, k, v = (sd[f"{p}self_attn.{n}_proj.weight"] for n in "qkv")
        rows = []
        for g in range(cfg.num_key_value_heads):
            for j in range(per_group):
                head = g * per_group + j
                rows.append(q[head * head_dim : (head + 1) * head_dim])
            rows.append(k[g * head_dim : (g + 1) * head_dim])
            rows.append(v[g * head_dim : (g + 1) * head_dim])
        out[f"{p}attention.wqkv.weight"] = torch.cat(rows)
        out[f"{p}attention.wo.weight"] = sd[f"{p}self_attn.o_proj.weight"]
        out[f"{p}feed_forward.w1.weight"] = sd[f"{p}mlp.gate_proj.weight"]
        out[f"{p}feed_forward.w3.weight"] = sd[f"{p}mlp.up_proj.weight"]
        out[f"{p}feed_forward.w2.weight"] = sd[f"{p}mlp.down_proj.weight"]
        out[f"{p}attention_norm.weight"] = sd[f"{p}input_layernorm.weight"]
        out[f"{p}ffn_norm.weight"] = sd[f"{p}post_attention_layernorm.weight"]
    return {k: v.clone().contiguous() for k, v in out.items()}


def _plant_remote_code(dest: Path, names: list[str]) -> None:
    for name in names:
        (dest / name).write_text(
            "from pathlib import Path\n"
            f"Path(__file__).with_name({MARKER!r}).write_text(__name__)\n"
            "raise RuntimeError('hub remote code was executed')\n"
        )


def _added(content: str) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def build_internlm2(dest: Path, seed: int = 0) -> HubCheckpoint:
    """internlm2-chat-1_8b in miniature: GQA (4 heads, 2 KV heads), rope_theta 1e6, dynamic NTK x2."""
    dest.mkdir(parents=True)
    # Multi-line samples make "\n" an ordinary piece, as in the hub model (id 364 there).
    paragraphs = [f"{a}\n{b}\n\n" for a, b in zip(CORPUS[::2], CORPUS[1::2])]
    tok_path = train_sentencepiece(
        dest / "tokenizer.model",
        paragraphs,
        trailing=[f"[UNUSED_TOKEN_{n}]" for n in range(141, 147)],
        model_type="bpe",
        vocab_size=800,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        allow_whitespace_only_pieces=True,
    )
    vocab = spm.SentencePieceProcessor(model_file=str(tok_path)).get_piece_size()
    specials = {name: vocab + offset for name, offset in INTERNLM2_SPECIALS.items()}

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6},
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    native = _randomise(LlamaForCausalLM(config), seed)

    # Two shards and an index, as the hub ships larger models.
    state = llama_to_internlm2_state(native)
    keys = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, dest / name, metadata={"format": "pt"})
    (dest / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}})
    )

    (dest / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["InternLM2ForCausalLM"],
                "auto_map": {
                    "AutoConfig": "configuration_internlm2.InternLM2Config",
                    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
                },
                "attn_implementation": "eager",
                "bias": False,
                "bos_token_id": 1,
                "eos_token_id": 2,
                "pad_token_id": 2,
                "hidden_act": "silu",
                "hidden_size": 64,
                "initializer_range": 0.02,
                "intermediate_size": 128,
                "max_position_embeddings": 16,
                "model_type": "internlm2",
                "num_attention_heads": 4,
                "num_hidden_layers": 2,
                "num_key_value_heads": 2,
                "rms_norm_eps": 1e-05,
                "rope_scaling": {"factor": 2.0, "type": "dynamic"},
                "rope_theta": 1000000,
                "tie_word_embeddings": False,
                "torch_dtype": "float32",
                "transformers_version": "4.41.0",
                "use_cache": True,
                "vocab_size": vocab,
            },
            indent=2,
        )
    )
    decoder = {"0": _added("<unk>"), "1": _added("<s>"), "2": _added("</s>")}
    decoder.update({str(i): _added(name) for name, i in specials.items()})
    (dest / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": True,
                "add_eos_token": False,
                "added_tokens_decoder": decoder,
                "additional_special_tokens": list(specials)[::-1],
                "auto_map": {
                    "AutoTokenizer": [
                        "tokenization_internlm2.InternLM2Tokenizer",
                        "tokenization_internlm2_fast.InternLM2TokenizerFast",
                    ]
                },
                "bos_token": "<s>",
                "chat_template": CHATML,
                "clean_up_tokenization_spaces": False,
                "eos_token": "</s>",
                "pad_token": "</s>",
                "tokenizer_class": "InternLM2Tokenizer",
                "unk_token": "<unk>",
            },
            indent=2,
        )
    )
    (dest / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": [2, specials["<|im_end|>"]], "pad_token_id": 2})
    )
    _plant_remote_code(
        dest,
        [
            "configuration_internlm2.py",
            "modeling_internlm2.py",
            "tokenization_internlm2.py",
            "tokenization_internlm2_fast.py",
        ],
    )
    return HubCheckpoint(dest, native, tok_path, specials)


def build_internlm(dest: Path, seed: int = 1) -> HubCheckpoint:
    """internlm-chat-7b in miniature: Llama names, biases on q/k/v/o, `rotary` dict, one .bin file.

    Its tokenizer differs from InternLM2's on every axis the converter reads
    (unigram, NFKC charsmap, dummy prefix, whitespace squeezing) so both paths are exercised.
    """
    dest.mkdir(parents=True)
    tok_path = train_sentencepiece(
        dest / "tokenizer.model",
        CORPUS,
        trailing=["<eoa>", "<eoh>"],
        model_type="unigram",
        vocab_size=700,
        add_dummy_prefix=True,
        remove_extra_whitespaces=True,
        normalization_rule_name="nmt_nfkc",
    )
    sp = spm.SentencePieceProcessor(model_file=str(tok_path))
    vocab = sp.get_piece_size()
    specials = {"<eoh>": sp.piece_to_id("<eoh>"), "<eoa>": sp.piece_to_id("<eoa>")}

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "dynamic", "factor": 1.0, "rope_theta": 10000.0},
        attention_bias=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    native = _randomise(LlamaForCausalLM(config), seed)
    state = {k: v.clone() for k, v in native.state_dict().items()}
    # Checkpoints saved by transformers 4.3x pickled the rotary buffer along with the weights.
    head_dim = config.hidden_size // config.num_attention_heads
    for i in range(config.num_hidden_layers):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(head_dim // 2)
    torch.save(state, dest / "pytorch_model.bin")

    (dest / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["InternLMForCausalLM"],
                "auto_map": {
                    "AutoConfig": "configuration_internlm.InternLMConfig",
                    "AutoModel": "modeling_internlm.InternLMForCausalLM",
                    "AutoModelForCausalLM": "modeling_internlm.InternLMForCausalLM",
                },
                "bias": True,
                "bos_token_id": 1,
                "eos_token_id": 2,
                "hidden_act": "silu",
                "hidden_size": 64,
                "initializer_range": 0.02,
                "intermediate_size": 128,
                "max_position_embeddings": 16,
                "model_type": "internlm",
                "num_attention_heads": 4,
                "num_hidden_layers": 2,
                "pad_token_id": 0,
                "rms_norm_eps": 1e-06,
                "rotary": {"base": 10000, "type": "dynamic"},
                "tie_word_embeddings": False,
                "torch_dtype": "float32",
                "transformers_version": "4.33.2",
                "use_cache": True,
                "vocab_size": vocab,
            },
            indent=2,
        )
    )
    (dest / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "auto_map": {"AutoTokenizer": ["tokenization_internlm.InternLMTokenizer", None]},
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "tokenizer_class": "InternLMTokenizer",
            },
            indent=2,
        )
    )
    _plant_remote_code(dest, ["configuration_internlm.py", "modeling_internlm.py", "tokenization_internlm.py"])
    return HubCheckpoint(dest, native, tok_path, specials)
