"""QLoRA on the CPU: one training step (forward and backward) with NF4 computing in bf16 vs fp32.

The default model loaded as the train step loads it (NF4, double quantization,
LoRA r=16 on every linear layer), once per compute dtype, then timed on the
same batch of 4 rows x 96 tokens: one warm-up step, then --steps steps, the
two dtypes alternating.
    python bench/cpu_dtype.py [--steps 3]
Needs the default run's model (resources/models/smollm2_135m_instruct).
Writes bench/results/cpu_dtype.json.
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


def load(dtype):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from snaketune.model import nf4_config

    model = AutoModelForCausalLM.from_pretrained(
        MODEL, dtype=dtype, device_map={"": "cpu"}, quantization_config=nf4_config(dtype)
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(
        model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    )


def step(model, ids) -> float:
    start = time.perf_counter()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    import torch

    if not MODEL.is_dir():
        sys.exit(f"{MODEL.relative_to(ROOT)}: no model; run `snakemake --cores all final_model` first")
    torch.manual_seed(0)
    ids = torch.randint(100, 40000, (4, 96))
    models = {"float32": load(torch.float32), "bfloat16": load(torch.bfloat16)}
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        step(model, ids)  # warm-up
    for _ in range(args.steps):
        for name, model in models.items():
            times[name].append(round(step(model, ids), 2))
            print(f"{name}: {times[name][-1]} s", flush=True)
    result = {
        **result_header(
            "one QLoRA training step (forward + backward, 4 x 96 tokens) per NF4 compute dtype",
            "python bench/cpu_dtype.py " + " ".join(sys.argv[1:]),
        ),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load_average(),
        "step_s": times,
        "median_s": {name: sorted(t)[len(t) // 2] for name, t in times.items()},
    }
    out = ROOT / "bench/results/cpu_dtype.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["median_s"]))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
