"""Each rule's environment as tests/test_envs.py builds it: build time and installed size.

For every envs/<rule>.yaml, a fresh virtual environment holding exactly its pip
packages (`uv venv --seed` and `uv pip install`, uv's cache shared, torch from
the CPU wheel in pip's find-links), then `du` of that environment alone.
    python bench/envs.py            # uv's cache as it is (warm after one run)
    python bench/envs.py --cold     # a fresh, empty uv cache: downloads and the DeepSpeed build included
Writes bench/results/envs.json and prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from trainer_vs_hf import cpu_model  # noqa: E402  (one description of the machine for every benchmark)


def find_links() -> str:
    links = (
        os.environ.get("PIP_FIND_LINKS")
        or subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", "global.find-links"], capture_output=True, text=True
        ).stdout
    )
    return links.strip()


def build(env: Path, dest: Path, uv: str, links: str, cache: dict) -> float:
    spec = yaml.safe_load(env.read_text())
    python = next(d.split("=", 1)[1] for d in spec["dependencies"] if isinstance(d, str) and d.startswith("python="))
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))
    started = time.monotonic()
    subprocess.run([uv, "venv", "--quiet", "--seed", "--python", python, str(dest)], check=True, env=cache)
    subprocess.run(
        [
            uv,
            "pip",
            "install",
            "--quiet",
            "--python",
            str(dest / "bin" / "python"),
            *(["--find-links", links] if links else []),
            *pip,
        ],
        check=True,
        env=cache,
    )
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cold", action="store_true", help="build from an empty uv cache")
    args = parser.parse_args()
    uv = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    links = find_links()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = dict(os.environ, **({"UV_CACHE_DIR": f"{tmp}/cache"} if args.cold else {}))
        for env in sorted((ROOT / "envs").glob("*.yaml")):
            seconds = build(env, Path(tmp) / env.stem, uv, links, cache)
            kib = int(
                subprocess.run(
                    ["du", "-sk", str(Path(tmp) / env.stem)], capture_output=True, text=True, check=True
                ).stdout.split()[0]
            )
            rows.append({"env": env.name, "build_s": round(seconds, 1), "size_mb": round(kib / 1024)})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    result = {
        "uv_cache": "cold" if args.cold else "as found",
        "find_links": bool(links),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit.strip(),
        "envs": rows,
        "total_build_s": round(sum(r["build_s"] for r in rows), 1),
        "total_size_mb": sum(r["size_mb"] for r in rows),
    }
    out = ROOT / "bench" / "results" / ("envs_cold.json" if args.cold else "envs.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("| env | build (s) | size (MB) |\n|---|---:|---:|")
    for r in rows:
        print(f"| `{r['env']}` | {r['build_s']} | {r['size_mb']} |")
    print(f"| all | {result['total_build_s']} | {result['total_size_mb']} |")


if __name__ == "__main__":
    main()
