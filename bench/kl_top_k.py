"""How much of the base model's next-token mass the top K tokens leave out, on the default replay data.

``train.kl_top_k: K`` keeps, for each distilled answer token, the base model's K most likely tokens
and one bucket for the rest of the vocabulary (docs/evaluation.md). The divergence cannot see mass
moving inside that bucket, so the rest's share is what K is chosen by. This runs the base model as
training sees it (the experiment's quantization, the adapter off) over every distinct ``loss: kl``
row of the experiment's mixture and reports, for each K, the rest's share per position: mean, 90th
percentile and largest.

    python bench/kl_top_k.py                  # after the default workflow made its model and data
    python bench/kl_top_k.py --k 16 64 256 1024 4096

Writes bench/results/kl_top_k.json and prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "config/config.yaml"))
    p.add_argument("--experiment")
    p.add_argument("--k", type=int, nargs="+", default=[16, 64, 256, 1024])
    p.add_argument("--rows-per-pass", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "bench/results/kl_top_k.json"))
    args = p.parse_args(argv)

    import torch
    from trainer_vs_hf import result_header

    from snaketune import train
    from snaketune.batching import collate
    from snaketune.config import Layout, load, resolve
    from snaketune.losses import base_top_k
    from snaketune.model import load_for_training, load_tokenizer

    config, name = load(args.config, args.experiment, [])
    exp = resolve(config, name)
    model_dir, data_file = ROOT / Layout.of(exp).model_dir, ROOT / exp.data_file
    if not model_dir.exists() or not data_file.exists():
        raise SystemExit(f"{model_dir} or {data_file} is missing: run `snakemake --cores all final_model` first")
    tokenizer = load_tokenizer(model_dir)
    plan = train.plan_data(data_file, tokenizer, exp.train, 1)
    distinct = list({(tuple(r.input_ids), tuple(r.labels)): r for r in plan.rows if r.kl}.values())
    model = load_for_training(model_dir, exp.train.lora, quantization=exp.train.quantization, device="cpu").eval()
    rest: dict[int, list] = {k: [] for k in args.k}
    with torch.no_grad():
        for i in range(0, len(distinct), args.rows_per_pass):
            batch = collate(distinct[i : i + args.rows_per_pass], tokenizer.pad_token_id)[:4]
            # what the trainer caches (train.cache_base_top_k), at the largest K: its first k columns
            # are the top k, most likely first
            _, log_top, _ = base_top_k(model, *batch, max(args.k))
            for k in args.k:
                rest[k].append(1 - log_top[:, :k].exp().sum(-1))
    summary = {}
    for k, parts in rest.items():
        share = torch.cat(parts).clamp_min(0)
        summary[k] = {
            "mean": share.mean().item(),
            "p90": share.quantile(0.9).item(),
            "max": share.max().item(),
            "cache_bytes_per_position": k * 8,
        }
    record = {
        **result_header(__doc__.splitlines()[0], "python bench/kl_top_k.py " + " ".join(argv or sys.argv[1:])),
        "experiment": name,
        "distinct_rows": len(distinct),
        "positions": sum(len(x) for x in rest[args.k[0]]),
        "rest_share": summary,
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"{record['positions']} distilled positions of {len(distinct)} distinct rows")
    print("| K | rest: mean | rest: 90th percentile | rest: largest | cache per position |\n|---:|---:|---:|---:|---:|")
    for k, s in summary.items():
        print(f"| {k} | {s['mean']:.1%} | {s['p90']:.1%} | {s['max']:.1%} | {s['cache_bytes_per_position']} B |")
    print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()
