"""Packing vs no packing on the default experiment: wall time, throughput, padding, final loss.

Run after the default workflow (it needs its model and data):
    snakemake --cores all final_model && python bench/packing.py
Writes bench/results/packing.json and prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from snaketune.config import resolve

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from trainer_vs_hf import cpu_model  # noqa: E402  (one description of the machine for every benchmark)


def run(experiment: str, pack: bool, model: Path, data: Path, work: Path, threads: int) -> dict:
    """Train the experiment from the workflow's config with packing on or off (evaluation off)."""
    out = work / "summary.json"
    cmd = [
        sys.executable,
        "-m",
        "snaketune.cli",
        "train",
        "--config",
        str(ROOT / "config/config.yaml"),
        experiment,
        "--set",
        f"train.pack_to_max_length={str(pack).lower()}",
        "--set",
        "train.evaluation_inputs=[]",
        "--model",
        str(model),
        "--data",
        str(data),
        "--work-dir",
        str(work / "ckpt"),
        "--summary",
        str(out),
        "--metrics",
        str(work / "metrics.jsonl"),
        "--provenance",
        str(work / "provenance.json"),
        "--threads",
        str(threads),
    ]
    t0 = time.time()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.time() - t0
    summary = json.loads(out.read_text())
    metrics = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    steps_time = sum(m["time_s"] for m in metrics)
    return {
        "pack_to_max_length": pack,
        "wall_s": round(wall, 1),
        "train_steps_s": round(steps_time, 1),
        "rows": summary["rows"],
        "optimizer_steps": summary["optimizer_steps"],
        "real_tokens_per_s": round(sum(m["real_tokens"] for m in metrics) / steps_time, 1),
        "padding_fraction": round(
            sum(m["tokens"] - m["real_tokens"] for m in metrics) / sum(m["tokens"] for m in metrics), 3
        ),
        "final_loss": round(metrics[-1]["loss"], 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="identity")
    p.add_argument("--model", default="resources/models/smollm2_135m_instruct")
    p.add_argument("--data", default="results/data/generated/self_cognition.json")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench/results/packing.json"))
    args = p.parse_args()
    train = resolve(yaml.safe_load((ROOT / "config/config.yaml").read_text()), args.experiment).train
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for pack in (False, True):
            rows.append(
                run(args.experiment, pack, Path(args.model), Path(args.data), Path(tmp) / f"pack_{pack}", args.threads)
            )
    record = {
        "experiment": args.experiment,
        "max_length": train.max_length,
        "batch_size": train.batch_size,
        "threads": args.threads,
        "machine": f"{platform.machine()}, {cpu_model()}",
        "date": time.strftime("%Y-%m-%d"),
        "runs": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
