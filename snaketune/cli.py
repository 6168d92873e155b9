"""``snaketune SUBCOMMAND``: every workflow step, runnable by hand as ``xtuner`` users expect.

The scripts in ``scripts/`` call :func:`script` so each step runs the same way
under Snakemake (reading ``snakemake.input``/``output``/``params``/``log``)
and from a shell (``python scripts/train.py --help``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml


def _json_arg(text: str) -> Any:
    """A JSON/YAML value given inline, or @FILE to read one."""
    if text.startswith("@"):
        text = Path(text[1:]).read_text(encoding="utf-8")
    return yaml.safe_load(text)


def setup_logging(log_file: str | None) -> None:
    """Rank 0 (or a lone process) logs to the file; other ranks print warnings only."""
    from .launch import rank

    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if rank() != 0:
        logging.basicConfig(level=logging.WARNING, handlers=handlers, force=True,
                            format=f"%(asctime)s rank{rank()} %(levelname)s %(name)s: %(message)s")
        return
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="a", encoding="utf-8"))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)


# ---------------------------------------------------------------- steps


def cmd_generate_data(a) -> None:
    from .data import self_cognition, write_records

    spec = dict(a.spec)
    records = self_cognition(**spec)
    write_records(records, a.output)
    logging.getLogger("snaketune").info("wrote %d self-cognition records to %s", len(records), a.output)


def cmd_convert_data(a) -> None:
    from .data import convert_file

    n = convert_file(a.source, a.format, a.output, split=a.split, revision=a.revision)
    logging.getLogger("snaketune").info("converted %d records from %s (%s) to %s", n, a.source, a.format, a.output)


def cmd_fetch_model(a) -> None:
    from .model import fetch_model

    fetch_model(a.spec, a.output, a.cache_dir)


def cmd_train(a, argv: list[str]) -> None:
    from .launch import die_with_parent, inside_launcher, torchrun_command
    from .train import TrainSettings, train

    if a.ranks > 1 and not inside_launcher():
        # Become torchrun (exec: same process, so killing the job kills the launcher, and the
        # ranks die with it), running this very command once per rank, threads shared out.
        args = _without(argv, "--ranks", "--threads") + ["--threads", str(max(1, (a.threads or 1) // a.ranks))]
        cmd = torchrun_command(a.ranks, args)
        logging.getLogger("snaketune").info("starting %d ranks: %s", a.ranks, " ".join(cmd))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(cmd[0], cmd)
    if inside_launcher():
        die_with_parent()
    train(a.model, a.data, a.work_dir, TrainSettings.from_dict(a.settings), result=a.output, threads=a.threads,
          provenance=a.provenance, config_record=a.config_record, workflow_dir=a.workflow_dir)


def _without(argv: list[str], *options: str) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in options)):
            out.append(arg)
    return out


def cmd_pth_to_hf(a) -> None:
    from .export import pth_to_hf

    ckpt = a.checkpoint
    if ckpt.endswith(".json"):  # the train rule's summary names the final checkpoint
        ckpt = json.loads(Path(ckpt).read_text())["checkpoint"]
    pth_to_hf(ckpt, a.output, a.lora, a.base_model, fp32=a.fp32, max_shard_size=a.max_shard_size)


def cmd_merge(a) -> None:
    from .export import merge

    merge(a.base, a.adapter, a.output, a.template, dtype=a.dtype, max_shard_size=a.max_shard_size,
          trust_remote_code=a.trust_remote_code)


def cmd_evaluate(a) -> None:
    from .evaluate import evaluate, training_prompts

    spec = dict(a.spec)
    evaluate(a.base, a.adapter, a.merged, template=a.template, system=a.system,
             trained_prompts=training_prompts(a.data) if a.data else set(),
             trust_remote_code=a.trust_remote_code, out_jsonl=a.output, out_md=a.markdown, **spec)


def cmd_report(a) -> None:
    from . import report

    report.training_curves(report.metrics_beside(a.training), a.curves, title=f"{a.title}: training")
    report.evaluation_page(a.evaluation, a.evaluation_page, title=f"{a.title}: base vs fine-tuned")
    report.provenance_page(a.provenance, a.provenance_page, title=f"{a.title}: provenance")
    report.benchmarks_page(a.benchmarks, a.benchmarks_page, title=f"{a.title}: benchmarks")


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="snaketune", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=fn)
        sp.add_argument("--log", help="also append the log to this file")
        return sp

    sp = add("generate-data", cmd_generate_data, "write a self-cognition dataset in XTuner's conversation format")
    sp.add_argument("--spec", type=_json_arg, required=True,
                    help='JSON/YAML: {"name", "owner", "answers": {lang: text}, "questions", "copies", "seed"}')
    sp.add_argument("output", help="the .json or .jsonl file to write")

    sp = add("convert-data", cmd_convert_data, "convert alpaca/oasst1/openai/xtuner records to XTuner's format")
    sp.add_argument("--format", required=True, choices=["alpaca", "oasst1", "openai", "xtuner"])
    sp.add_argument("--split", default="train", help="split of a hub dataset")
    sp.add_argument("--revision", default=None, help="revision of a hub dataset")
    sp.add_argument("source", help="a local .json/.jsonl file, or a hub dataset name (needs the internet)")
    sp.add_argument("output")

    sp = add("fetch-model", cmd_fetch_model, "link, download or import (GGUF) a base model")
    sp.add_argument("--spec", type=_json_arg, required=True, help="the model's entry of the config, as JSON/YAML")
    sp.add_argument("--cache-dir", default="resources/downloads")
    sp.add_argument("output", help="the model directory to create")

    sp = add("train", cmd_train, "QLoRA training with DeepSpeed ZeRO-2; resumes from the newest complete checkpoint")
    sp.add_argument("--model", required=True, help="Hugging Face model directory")
    sp.add_argument("--data", required=True, help="dataset in XTuner's conversation format")
    sp.add_argument("--work-dir", required=True, help="where iter_N.pth checkpoints go")
    sp.add_argument("--settings", type=_json_arg, required=True, help="training settings (XTuner names), JSON/YAML or @file")
    sp.add_argument("--threads", type=int, default=None, help="CPU threads in all (shared among ranks)")
    sp.add_argument("--ranks", type=int, default=1,
                    help="data-parallel processes (GPUs, or CPU ranks with gloo), started with torchrun")
    sp.add_argument("--provenance", help="also write provenance.json here")
    sp.add_argument("--config-record", type=_json_arg, default=None,
                    help="the resolved experiment config to record in the provenance")
    sp.add_argument("--workflow-dir", default=".", help="whose git commit the provenance records")
    sp.add_argument("output", help="summary JSON written when training has finished")

    sp = add("pth_to_hf", cmd_pth_to_hf, "convert a checkpoint to a PEFT adapter (xtuner convert pth_to_hf)")
    sp.add_argument("--lora", type=_json_arg, required=True, help='{"r": .., "alpha": .., "dropout": ..}')
    sp.add_argument("--base-model", required=True, help="recorded as base_model_name_or_path")
    sp.add_argument("--fp32", action="store_true", help="save fp32 tensors (default fp16)")
    sp.add_argument("--max-shard-size", default="2GB")
    sp.add_argument("checkpoint", help="iter_N.pth (DeepSpeed directory or .pth file), or the train summary JSON")
    sp.add_argument("output", help="adapter directory")

    sp = add("merge", cmd_merge, "merge an adapter into its base model (xtuner convert merge)")
    sp.add_argument("--template", required=True)
    sp.add_argument("--dtype", default="auto", help="auto (the base's), float32, float16 or bfloat16")
    sp.add_argument("--max-shard-size", default="2GB")
    sp.add_argument("--trust-remote-code", action="store_true")
    sp.add_argument("base")
    sp.add_argument("adapter")
    sp.add_argument("output")

    sp = add("evaluate", cmd_evaluate, "answer evaluation prompts with the base and the fine-tuned model")
    sp.add_argument("--template", required=True)
    sp.add_argument("--system", default="")
    sp.add_argument("--spec", type=_json_arg, required=True,
                    help='{"prompts": [...], "identity_keywords": [..], "max_new_tokens": .., "require_stop": ..}')
    sp.add_argument("--data", help="training data, to mark which prompts were trained on")
    sp.add_argument("--trust-remote-code", action="store_true")
    sp.add_argument("--markdown", required=True, help="side-by-side table to write")
    sp.add_argument("base")
    sp.add_argument("adapter")
    sp.add_argument("merged")
    sp.add_argument("output", help="JSONL of answers")

    sp = add("report", cmd_report, "the report's parts: training curves, evaluation, provenance, benchmarks")
    sp.add_argument("--title", default="experiment")
    sp.add_argument("--training", required=True, help="the train summary JSON (its checkpoint's metrics.jsonl is plotted)")
    sp.add_argument("--evaluation", required=True, help="evaluation JSONL")
    sp.add_argument("--provenance", required=True, help="provenance.json")
    sp.add_argument("--curves", required=True, help="SVG to write: loss, lr and grad norm per step")
    sp.add_argument("--evaluation-page", required=True, help="HTML to write")
    sp.add_argument("--provenance-page", required=True, help="HTML to write")
    sp.add_argument("--benchmarks-page", required=True, help="HTML to write")
    sp.add_argument("benchmarks", nargs="*", help="Snakemake benchmark TSVs (benchmarks/<rule>/<name>.tsv)")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    setup_logging(args.log)
    if args.func is cmd_train:
        cmd_train(args, argv)
    else:
        args.func(args)


def script(command: str, smk: Any, to_argv) -> None:
    """Entry point of ``scripts/*.py``: under Snakemake build the argv from the job, else use the shell's."""
    if smk is None:
        main([command, *sys.argv[1:]])
        return
    argv = [command, "--log", str(smk.log[0]), *to_argv(smk)]
    main([str(x) for x in argv])


if __name__ == "__main__":
    main()
