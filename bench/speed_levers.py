"""Each training-speed lever on its own, on the default experiment: one model, levers switched per epoch.

One process builds the experiment's training engine once (snaketune.train.build_engine), then
trains whole epochs of the real data with train_window, each epoch under one combination of the
levers; combinations alternate round after round, so every one sees the same machine conditions:

- ``before``: the recipe as it was: gradient checkpointing on, the output head at every position,
  batches in plain shuffled order, per-operation AdamW, one LoRA dropout mask per adapted layer;
- ``+ <lever>``: ``before`` with that one lever on;
- ``after``: every lever on, as the trainer now runs the experiment.

Levers: no gradient checkpointing (what ``gradient_checkpointing: auto`` decides when the
activations fit), the output head at supervised positions only, batches grouped by length, fused
AdamW, and LoRA dropout (``lora.dropout 0``: none at all). Figures: seconds per epoch (min and
median over rounds), real tokens/s, padding share, and the speed-up over ``before``.

    python bench/speed_levers.py                 # after the default workflow made its model and data
    python bench/speed_levers.py --rounds 3 --data results/data/generated/self_cognition.json

Writes bench/results/speed_levers.json and prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

BEFORE = {
    "checkpointing": True,
    "supervised_head": False,
    "group_by_length": False,
    "fused_adamw": False,
    "dropout": True,
}
LEVERS = {
    "no checkpointing": {"checkpointing": False},
    "supervised head": {"supervised_head": True},
    "length groups": {"group_by_length": True},
    "fused AdamW": {"fused_adamw": True},
    "no LoRA dropout": {"dropout": False},
    "shared dropout masks": {"dropout": "shared"},
}


def variants(dropout_after: bool) -> dict[str, dict]:
    out = {"before": BEFORE}
    out.update({f"+ {name}": {**BEFORE, **lever} for name, lever in LEVERS.items()})
    out["after"] = {
        "checkpointing": False,
        "supervised_head": True,
        "group_by_length": True,
        "fused_adamw": True,
        "dropout": dropout_after,
    }
    return out


class Switches:
    """Turns the levers on the one engine."""

    def __init__(self, engine):
        import torch

        self.engine = engine
        self.dropouts = {}  # LoRA layer -> its dropout module, to put back after "no dropout"
        for module in engine.module.modules():
            if hasattr(module, "lora_dropout") and "default" in module.lora_dropout:
                self.dropouts[module] = module.lora_dropout["default"]
        self.identity = torch.nn.Identity()
        memo = {}
        self.shared = {layer: SharedDropout(d.p, memo) for layer, d in self.dropouts.items()}

    def apply(self, v: dict) -> None:
        from snaketune import losses
        from snaketune.model import enable_gradient_checkpointing

        base = losses.unwrap(self.engine)
        if v["checkpointing"]:
            enable_gradient_checkpointing(self.engine.module)
        else:
            base.gradient_checkpointing_disable()
        losses.accepts_logits_to_keep = ACCEPTS if v["supervised_head"] else (lambda model: False)
        self.engine.optimizer.optimizer.param_groups[0]["fused"] = v["fused_adamw"]
        for layer, dropout in self.dropouts.items():
            layer.lora_dropout["default"] = (
                self.shared[layer] if v["dropout"] == "shared" else dropout if v["dropout"] else self.identity
            )


def SharedDropout(p, memo):  # noqa: N802  (prototype: one mask per input tensor shared by sibling layers)
    import weakref

    import torch

    class _Shared(torch.nn.Dropout):
        def forward(self, x):
            last = memo.get("input")
            if last is not None and last() is x:
                return memo["output"]
            out = super().forward(x)
            memo.update(input=weakref.ref(x), output=out)
            return out

    return _Shared(p)


ACCEPTS = None


def main(argv: list[str] | None = None) -> dict:
    global ACCEPTS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "config/config.yaml"))
    p.add_argument("--experiment")
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "bench/results/speed_levers.json"))
    args = p.parse_args(argv)

    import torch
    from trainer_vs_hf import busiest_processes, cpu_model, experiment_workload, load_average

    from snaketune import batching, losses, train
    from snaketune.config import TrainConfig
    from snaketune.model import load_tokenizer

    ACCEPTS = losses.accepts_logits_to_keep
    workload = experiment_workload(args, None)
    cfg = replace(TrainConfig.from_dict(workload["train"]), gradient_checkpointing=False)
    device = train.setup_distributed(args.threads)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(workload["model_dir"])
    plan = train.plan_data(Path(workload["data_file"]), tokenizer, cfg, 1)
    engine, _, _ = train.build_engine(Path(workload["model_dir"]), cfg, plan, device, False)
    engine.train()
    switches = Switches(engine)
    todo = variants(cfg.lora.dropout > 0)
    if cfg.lora.dropout == 0:
        todo = {k: v for k, v in todo.items() if k != "+ no LoRA dropout"}
    runs = []
    for rnd in range(args.rounds):
        for name, v in todo.items():
            switches.apply(v)
            vcfg = replace(cfg, group_by_length=v["group_by_length"])
            batches = batching.Batches(
                plan.rows, plan.iters_per_epoch, vcfg, tokenizer.pad_token_id, 0, 1, vcfg.batch_size
            )  # whole micro-batches
            load = load_average()
            t0 = time.perf_counter()
            tokens = real = 0
            # one epoch: its windows (the first epoch's order; the LR schedule runs on, which costs nothing)
            for start in range(0, plan.iters_per_epoch, cfg.accumulative_counts):
                window, n_real = batches.window(start, min(start + cfg.accumulative_counts, plan.iters_per_epoch))
                row = train.train_window(engine, window, n_real)
                tokens, real = tokens + row["tokens"], real + row["real_tokens"]
            seconds = time.perf_counter() - t0
            runs.append(
                {
                    "variant": name,
                    "round": rnd,
                    "seconds": seconds,
                    "tokens": tokens,
                    "real_tokens": real,
                    "load_average": load,
                    "busiest": busiest_processes(3),
                }
            )
            print(
                f"round {rnd + 1} {name}: {seconds:.1f} s, {real / seconds:.1f} real tokens/s, "
                f"padding {1 - real / tokens:.1%}, load {load}",
                flush=True,
            )
    summary = {}
    for name in todo:
        mine = [r for r in runs if r["variant"] == name]
        med = statistics.median(r["seconds"] for r in mine)
        summary[name] = {
            "epoch_s_min": min(r["seconds"] for r in mine),
            "epoch_s_median": med,
            "real_tokens_per_s": mine[0]["real_tokens"] / med,
            "padding": 1 - mine[0]["real_tokens"] / mine[0]["tokens"],
        }
    for name in todo:
        summary[name]["speedup"] = summary["before"]["epoch_s_median"] / summary[name]["epoch_s_median"]
    record = {
        "benchmark": __doc__.splitlines()[0],
        "workload": workload["name"],
        "data": workload["data_file"],
        "samples": len(plan.rows),
        "overrides": args.set,
        "machine": cpu_model(),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "variants": todo,
        "summary": summary,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print("| variant | s per epoch (min / median) | real tokens/s | padding | speed-up |\n|---|---:|---:|---:|---:|")
    for name, s in summary.items():
        print(
            f"| {name} | {s['epoch_s_min']:.1f} / {s['epoch_s_median']:.1f} | {s['real_tokens_per_s']:.1f} | "
            f"{s['padding']:.1%} | {s['speedup']:.2f}x |"
        )
    print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()
