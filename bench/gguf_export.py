"""GGUF export: each file's size and export time, and llama.cpp's speed against transformers' on this CPU.

For one model directory (default: the default experiment's base model as fetch-model imports it; a merged
model of it has the same shape, so the same sizes and speeds), each type is exported with
``snaketune.gguf_export.write_model``, then the same chat prompt is answered greedily, 64 new tokens (the end of
turn not stopping it), by transformers on the fp32 model (as ``snaketune chat`` runs it on a CPU, KV cache on)
and by llama.cpp's C library from the llama-cpp-cffi wheel (tests/llamacpp.py) on each file, both on the same
number of threads (default one: on a machine whose cores other work shares, a second thread of either waits
on the first, and the figures then say more about the neighbours than about the two). Reported: prompt
tokens per second (the prompt's one forward pass) and generated tokens per second (the 64 one-token steps
after it), each the fastest of --runs runs after a warm-up (the one least slowed by other work; every run's
times are in the result file), the load average before and after, and, for each file, how often llama.cpp's
next token on a held-out text is transformers'.

    python bench/gguf_export.py [--model DIR] [--threads 1] [--runs 5]

Writes bench/results/gguf_export.json and prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from trainer_vs_hf import load_average, result_header  # noqa: E402  (one description of the machine)

TYPES = ("f16", "q8_0", "q4_1", "q4_0")
NEW_TOKENS = 64
PROMPT = "<|im_start|>user\nWrite a short story about a river, a mill and a flood.<|im_end|>\n<|im_start|>assistant\n"
HELD_OUT = (
    "The river ran past the old mill, where the miller's daughter counted the sacks of flour before sunrise. "
    "In the spring flood the wheel broke, and the village spent three summers building a new one of oak and "
    "iron. 机器学习模型需要大量的数据来训练。我喜欢读书，也喜欢写代码。"
)


def transformers_speed(model_dir: Path, ids: list[int], runs: int) -> dict:
    """Prompt and generation tokens per second of greedy decoding with transformers' KV cache."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def once() -> tuple[float, float]:
        with torch.no_grad():
            start = time.perf_counter()
            out = model(torch.tensor([ids]), use_cache=True)
            prompt_s = time.perf_counter() - start
            past, token = out.past_key_values, int(out.logits[0, -1].argmax())
            start = time.perf_counter()
            for _ in range(NEW_TOKENS):
                out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
                past, token = out.past_key_values, int(out.logits[0, -1].argmax())
            return prompt_s, time.perf_counter() - start

    return rates([once() for _ in range(runs + 1)][1:], len(ids))


def llama_cpp_speed(gguf: Path, ids: list[int], runs: int, threads: int) -> dict:
    from tests.llamacpp import LlamaCpp

    with LlamaCpp(gguf, threads=threads) as llm:

        def once() -> tuple[float, float]:
            llm.lib.llama_kv_cache_clear(llm.ctx)
            start = time.perf_counter()
            llm._decode(ids)
            prompt_s = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(NEW_TOKENS):
                llm._decode([int(llm._row(-1).argmax())])
            return prompt_s, time.perf_counter() - start

        return rates([once() for _ in range(runs + 1)][1:], len(ids))


def rates(timings: list[tuple[float, float]], prompt_tokens: int) -> dict:
    prompt_s = min(t[0] for t in timings)
    generate_s = min(t[1] for t in timings)
    return {
        "prompt_tokens_per_s": round(prompt_tokens / prompt_s, 1),
        "generated_tokens_per_s": round(NEW_TOKENS / generate_s, 1),
        "median_generated_tokens_per_s": round(NEW_TOKENS / statistics.median(t[1] for t in timings), 1),
        "runs_s": [[round(a, 4), round(b, 3)] for a, b in timings],
    }


def agreement(model_dir: Path, files: dict[str, Path]) -> dict[str, float]:
    """Share of held-out positions where llama.cpp's top next token on each file is transformers'."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.llamacpp import LlamaCpp

    ids = AutoTokenizer.from_pretrained(model_dir)(HELD_OUT).input_ids
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy().argmax(1)
    out = {}
    for kind, path in files.items():
        with LlamaCpp(path) as llm:
            out[kind] = round(float((llm.logits(ids).argmax(1) == expected).mean()), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resources/models/smollm2_135m_instruct")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    import torch
    from transformers import AutoTokenizer

    from snaketune.gguf_export import write_model

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT).input_ids
    result = result_header(
        "GGUF export: file sizes, export time, llama.cpp vs transformers tokens/s",
        "python bench/gguf_export.py " + " ".join(sys.argv[1:]),
    )
    safetensors = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    result.update(model=args.model, safetensors_bytes=safetensors, threads=args.threads, load_average=load_average())
    result.update(prompt_tokens=len(ids))
    result.update(new_tokens=NEW_TOKENS, transformers=transformers_speed(model_dir, ids, args.runs), files={})
    with tempfile.TemporaryDirectory(prefix="snaketune-gguf-bench-") as tmp:
        files = {}
        for kind in TYPES:
            start = time.perf_counter()
            written = write_model(model_dir, Path(tmp) / f"{kind}.gguf", kind)
            files[kind] = written.path
            result["files"][kind] = {
                "bytes": written.bytes,
                "export_s": round(time.perf_counter() - start, 2),
                "tensor_types": written.types,
                "llama_cpp": llama_cpp_speed(written.path, ids, args.runs, args.threads),
            }
        for kind, share in agreement(model_dir, files).items():
            result["files"][kind]["top1_agreement_with_transformers"] = share
    result["load_average_after"] = load_average()
    out = ROOT / "bench" / "results" / "gguf_export.json"
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(table(result))


def table(result: dict) -> str:
    hf = result["transformers"]
    lines = [
        "| runs on | file size | prompt tokens/s | generated tokens/s | next token = transformers' |",
        "|---|---|---|---|---|",
        f"| transformers, fp32 | {result['safetensors_bytes'] / 1e6:.0f} MB (safetensors) | "
        f"{hf['prompt_tokens_per_s']} | {hf['generated_tokens_per_s']} | |",
    ]
    for kind, f in result["files"].items():
        lc = f["llama_cpp"]
        lines.append(
            f"| llama.cpp, {kind} | {f['bytes'] / 1e6:.0f} MB | {lc['prompt_tokens_per_s']} | "
            f"{lc['generated_tokens_per_s']} | {f['top1_agreement_with_transformers']:.1%} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
