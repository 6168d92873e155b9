"""The README's main job as a new user runs it: wall time, each job's time and memory, and what the
model learned and kept.

A fresh copy of the workflow (no results, no downloaded model) in a temporary directory, then
`snakemake --cores all final_model` there, timed; pip's download cache is used as it is (warm
after one run). Each job's time and peak memory come from the benchmark file Snakemake writes for
it; the evaluation figures (identity, leakage overall and per language, retention, drift) from
results/identity/evaluation.json.
    python bench/default_run.py
Writes bench/results/default_run.json and prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import csv
import json
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

WORKFLOW = ("Snakefile", "rules", "scripts", "config", "envs", "profiles", "report")
COMMAND = ["snakemake", "--cores", "all", "final_model"]


def copy_workflow(dest: Path) -> None:
    for name in WORKFLOW:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name)
        elif src.exists():
            shutil.copy2(src, dest / name)


def jobs(workdir: Path) -> dict[str, dict[str, float]]:
    """rule/name -> seconds and peak RSS (MB), from Snakemake's benchmark files."""
    out = {}
    for tsv in sorted((workdir / "benchmarks").glob("*/*.tsv")):
        with tsv.open() as f:
            row = next(csv.DictReader(f, delimiter="\t"))
        out[f"{tsv.parent.name}/{tsv.stem}"] = {"s": float(row["s"]), "max_rss_mb": float(row["max_rss"])}
    return out


def figures(summary: dict) -> dict:
    return {
        "identity_trained": summary["identity_trained"],
        "identity_heldout": summary["identity_heldout"],
        "leakage": summary["leakage"],
        "leakage_by_language": summary.get("leakage_by_language"),
        "retention": {k: summary["retention"][k] for k in ("finetuned", "kept", "of")},
        "nll_drift": summary["nll"]["drift"],
        "thresholds": {t["metric"]: t["passed"] for t in summary["thresholds"]},
    }


def main() -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    with tempfile.TemporaryDirectory(prefix="snaketune-default-run-") as tmp:
        workdir = Path(tmp)
        copy_workflow(workdir)
        start = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", *COMMAND], cwd=workdir, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if res.returncode != 0:
            sys.exit(f"the default run failed:\n{res.stderr[-4000:]}")
        summary = json.loads((workdir / "results/identity/evaluation.json").read_text())
        result = {
            "what": "the default run from a fresh copy of the workflow, pip's download cache warm",
            "command": " ".join(COMMAND),
            "machine": cpu_model(),
            "date": date.today().isoformat(),
            "commit": commit.stdout.strip(),
            "wall_s": round(wall, 1),
            "jobs": jobs(workdir),
            "evaluation": figures(summary),
        }
    out = ROOT / "bench/results/default_run.json"
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"| job | s | peak RSS MB |\n|---|---|---|\n| all (wall) | {wall:.0f} | |")
    for name, job in result["jobs"].items():
        print(f"| {name} | {job['s']:.1f} | {job['max_rss_mb']:.0f} |")
    print(json.dumps(result["evaluation"], indent=1, ensure_ascii=False))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
