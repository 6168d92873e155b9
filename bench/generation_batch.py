"""Greedy generation at several batch sizes: the replay step's and the evaluation's answers.

The default model answers the evaluation-only part of the general question set the way the
`replay_data` step asks it (NF4, as QLoRA training sees the model, at most 64
new tokens) and the way `evaluate` asks it (fp32, at most 48), once per batch
size, the batch sizes alternating over rounds. Records each setting's seconds,
and how many answers differ from those of the first batch size (left padding
with an attention mask should change none beyond float rounding).
    python bench/generation_batch.py [--sizes 16 64] [--rounds 1]
Needs the default run's model (resources/models/smollm2_135m_instruct).
Writes bench/results/generation_batch.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from trainer_vs_hf import load_average, result_header  # noqa: E402

MODEL = ROOT / "resources/models/smollm2_135m_instruct"
SETTINGS = {  # as config/config.yaml's default experiment asks
    "replay (nf4, 64 new tokens)": {"quantization": "nf4", "max_new_tokens": 64},
    "evaluate (fp32, 48 new tokens)": {"quantization": "none", "max_new_tokens": 48},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()

    import torch

    from snaketune import evalsets
    from snaketune.generation import generate_answers
    from snaketune.model import load_base, load_tokenizer

    if not MODEL.is_dir():
        sys.exit(f"{MODEL.relative_to(ROOT)}: no model; run `snakemake --cores all final_model` first")
    tokenizer = load_tokenizer(MODEL)
    questions = [q.question for q in evalsets.load("general", split="eval")]
    result = {
        **result_header(
            "generate_answers on the general question set, per batch size",
            "python bench/generation_batch.py " + " ".join(sys.argv[1:]),
        ),
        "torch_threads": torch.get_num_threads(),
        "questions": len(questions),
        "load_average_at_start": load_average(),
        "settings": {},
    }
    for name, setting in SETTINGS.items():
        model = load_base(MODEL, "float32", quantization=setting["quantization"], device="cpu")
        runs: dict[int, list[float]] = {size: [] for size in args.sizes}
        answers: dict[int, list[str]] = {}
        for _ in range(args.rounds):
            for size in args.sizes:
                start = time.perf_counter()
                out = generate_answers(
                    model,
                    tokenizer,
                    "internlm2_chat",
                    questions,
                    max_new_tokens=setting["max_new_tokens"],
                    batch_size=size,
                )
                runs[size].append(round(time.perf_counter() - start, 2))
                answers[size] = [a.answer for a in out]
                print(f"{name}: batch {size}: {runs[size][-1]} s", flush=True)
        first = answers[args.sizes[0]]
        result["settings"][name] = {
            str(size): {
                "s": runs[size],
                "min_s": min(runs[size]),
                "answers_differing_from_first_size": sum(a != b for a, b in zip(first, answers[size])),
            }
            for size in args.sizes
        }
        del model
    out = ROOT / "bench/results/generation_batch.json"
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps(result["settings"], indent=1, ensure_ascii=False))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
