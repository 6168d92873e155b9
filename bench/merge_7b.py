"""Merging a 7B model on the CPU: peak memory and time of ``snaketune merge``.

Writes a model of Llama-7B's shapes (InternLM-7B's too, but for its larger vocabulary) with random
fp16 weights in shards of ``--shard-size`` (about 13.5 GB in all), a random LoRA adapter of rank
``--r`` on every linear layer, then runs ``snaketune merge`` on them under ``/usr/bin/time`` and
records its peak RSS and wall time. Needs about 28 GB of free disk under ``--dir`` (the model and
the merged copy), which it deletes afterwards unless ``--keep``.

    python bench/merge_7b.py --dir /var/tmp
Writes bench/results/merge_7b.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from trainer_vs_hf import cpu_model  # noqa: E402  (one description of the machine for every benchmark)

LLAMA_7B = dict(vocab=32000, hidden=4096, intermediate=11008, layers=32, heads=32)
TOKENIZER = ROOT / "tests/fixtures/xtuner-0.2.0/base"  # any tokenizer: merge copies it


def shapes(vocab: int, hidden: int, intermediate: int, layers: int, heads: int) -> dict[str, tuple[int, ...]]:
    h, i = hidden, intermediate
    out = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
    linear = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}  # fmt: skip
    for n in range(layers):
        out.update({f"model.layers.{n}.{m}.weight": s for m, s in linear.items()})
        out.update({f"model.layers.{n}.{m}.weight": (h,) for m in ("input_layernorm", "post_attention_layernorm")})
    return out


def write_model(base: Path, adapter: Path, shard_size: str, r: int) -> None:
    """Random fp16 weights (a random pool from a random offset per tensor: quick to make), and a
    random rank-``r`` adapter written as ``pth_to_hf`` writes one."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from snaketune.adapter import adapter_config, save_adapter
    from snaketune.config import ExportConfig, LoraConfig

    c = LLAMA_7B
    LlamaConfig(
        vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["intermediate"],
        num_hidden_layers=c["layers"], num_attention_heads=c["heads"], num_key_value_heads=c["heads"],
        tie_word_embeddings=False, dtype="float16",
    ).save_pretrained(base)  # fmt: skip
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(TOKENIZER / name, base / name)
    gen = torch.Generator().manual_seed(0)
    pool = torch.empty(1 << 26, dtype=torch.float16).uniform_(-0.02, 0.02, generator=gen)

    def weight(shape):
        n = math.prod(shape)
        return pool.roll(int(torch.randint(len(pool), (), generator=gen))).repeat(-(-n // len(pool)))[:n].view(shape)

    sizes = shapes(**c)
    meta = {k: torch.empty(s, dtype=torch.float16, device="meta") for k, s in sizes.items()}
    split = split_torch_state_dict_into_shards(meta, max_shard_size=shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: weight(sizes[k]) for k in keys}, base / filename, metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.nbytes for t in meta.values())}, "weight_map": split.tensor_to_filename}
    (base / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    lora = {}
    for key, (rows, cols) in ((k, s) for k, s in sizes.items() if len(s) == 2 and ".layers." in k):
        module = f"base_model.model.{key.removesuffix('.weight')}"
        lora[f"{module}.lora_A.weight"] = torch.randn(r, cols, generator=gen) * 0.01
        lora[f"{module}.lora_B.weight"] = torch.randn(rows, r, generator=gen) * 0.01
    lora_config = LoraConfig(r=r, alpha=16, dropout=0.1)
    save_adapter(lora, adapter, adapter_config(lora_config, lora, str(base)), ExportConfig())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the model is written (about 28 GB)")
    p.add_argument("--shard-size", default="2GB", help="the base model's shards (default: %(default)s)")
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench/results/merge_7b.json"))
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="merge_7b.", dir=args.dir))
    base, adapter, merged = work / "base", work / "adapter", work / "merged"
    try:
        start = time.monotonic()
        write_model(base, adapter, args.shard_size, args.r)
        made_s = time.monotonic() - start
        merge = ["merge", str(base), str(adapter), str(merged), "--template", "internlm2_chat"]
        argv = ["/usr/bin/time", "-f", "%M %e", sys.executable, "-m", "snaketune.cli", *merge]
        res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(f"merge failed:\n{res.stderr[-3000:]}")
        peak_kb, wall_s = res.stderr.strip().splitlines()[-1].split()
        shards = sorted(base.glob("*.safetensors"))
        result = {
            "what": f"snaketune merge of a Llama-7B-shaped fp16 model (random weights) with a rank-{args.r} adapter",
            "command": "snaketune merge BASE ADAPTER OUT --template internlm2_chat",
            "machine": f"{cpu_model()}, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1e9:.0f} GB",
            "date": date.today().isoformat(),
            "commit": subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
            ).stdout.strip(),
            "model_bytes": sum(f.stat().st_size for f in shards),
            "base_shards": len(shards),
            "largest_shard_bytes": max(f.stat().st_size for f in shards),
            "adapter_bytes": sum(f.stat().st_size for f in adapter.iterdir()),
            "merged_shards": len(list(merged.glob("*.safetensors"))),
            "peak_rss_bytes": int(peak_kb) * 1024,
            "merge_wall_s": float(wall_s),
            "model_written_s": round(made_s, 1),
        }
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
