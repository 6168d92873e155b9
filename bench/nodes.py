"""One training over two nodes against the same training on two ranks of one node.

The tiny test experiment (a 2-layer model, so that start-up and communication show rather than
compute) trained twice on the same data and settings, one rank per node with one thread each:
2 ranks on this machine through `snakemake --cores 2` (local executor), and 2 nodes x 1 rank
through profiles/slurm on a real two-node SLURM cluster started on this machine (two slurmd
daemons, tests/slurm_cluster.py; needs root, slurm-wlm and munge). Both nodes share this
machine's cores, so the figures show the cost of the launch (sbatch, srun, the c10d rendezvous),
not a speed-up. Reported: the train job's wall time (Snakemake's benchmark file), the training
loop's own time (training.json), and the whole snakemake command's wall time; the two trainings'
LoRA weights are compared bit for bit.
    python bench/nodes.py [--epochs N]
Writes bench/results/nodes.json.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from trainer_vs_hf import result_header  # noqa: E402

from tests.helpers import TINY, TINY_CONFIG, copy_workflow  # noqa: E402
from tests.slurm_cluster import Cluster, cpu_node_profile  # noqa: E402

SUMMARY = "results/tiny/training.json"


def workflow(path: Path, *, nodes: int, ranks: int | None, epochs: int) -> Path:
    wd = copy_workflow(path)
    config = copy.deepcopy(TINY_CONFIG)
    config["experiments"]["tiny"].update(nodes=nodes, ranks=ranks)
    config["experiments"]["tiny"]["train"].update({**TINY, "max_epochs": epochs, "save_steps": 10**6})
    (wd / "config/config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    profile = cpu_node_profile(wd, gpu=nodes)
    profile["set-threads"]["train"] = ranks or 1
    (wd / "profiles/slurm/config.yaml").write_text(yaml.safe_dump(profile))
    return wd


def timed(cmd: list[str], wd: Path) -> dict:
    t0 = time.time()
    subprocess.run(cmd, cwd=wd, check=True, capture_output=True)
    wall = time.time() - t0
    with (wd / "benchmarks/train/tiny.tsv").open() as f:
        job = next(csv.DictReader(f, delimiter="\t"))
    summary = json.loads((wd / SUMMARY).read_text())
    return {
        "snakemake_wall_s": round(wall, 1),
        "train_job_s": float(job["s"]),
        "training_loop_s": round(summary["train_seconds_this_run"], 1),
        "optimizer_steps": summary["optimizer_steps"],
        "world_size": summary["world_size"],
        "nodes": summary["nodes"],
        "hosts": summary["hosts"],
        "checkpoint": str(wd / summary["checkpoint"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args()
    from snaketune.lora_state import read_lora_state

    snakemake = [sys.executable, "-m", "snakemake"]
    with tempfile.TemporaryDirectory(prefix="snaketune-nodes-") as tmp:
        one = workflow(Path(tmp, "one"), nodes=1, ranks=2, epochs=args.epochs)
        local = timed([*snakemake, SUMMARY, "--cores", "2", "--set-threads", "train=2"], one)
        cluster = Cluster(nodes=2).start()
        try:
            two = workflow(Path(tmp, "two"), nodes=2, ranks=None, epochs=args.epochs)
            slurm = timed([*snakemake, SUMMARY, "--workflow-profile", "profiles/slurm"], two)
        finally:
            cluster.stop()
        a, b = read_lora_state(local.pop("checkpoint")), read_lora_state(slurm.pop("checkpoint"))
        equal = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    result = {
        **result_header(
            "the tiny experiment on 2 ranks of one node (local) and on 2 nodes x 1 rank (SLURM, both nodes on "
            "this machine); one thread per rank",
            f"python bench/nodes.py --epochs {args.epochs}",
        ),
        "one_node_two_ranks": local,
        "two_nodes_one_rank_each": slurm,
        "lora_weights_bit_identical": equal,
    }
    out = ROOT / "bench/results/nodes.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
