"""``snaketune STEP [--config FILE] [EXPERIMENT] [--set KEY=VALUE ...]``: every workflow step by hand.

Like ``xtuner train CONFIG --cfg-options`` and ``tune run … key=value``, a
step reads the experiment from the config (default ``config/config.yaml``,
first experiment under ``run``), applies ``--set`` overrides (``train.lr=1e-4``
is relative to the experiment; ``models.NAME.path=…`` to the top) and reads
and writes the workflow's own paths unless told others. ``pth_to_hf`` and
``merge`` also take explicit paths and settings for checkpoints made
without a snaketune config, as ``xtuner convert`` does.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from . import steps
from .config import (ConfigError, ExportConfig, Layout, LoraConfig, MergeConfig, from_dict, load,
                     resolve)
from .joblog import job

SCHEMA = Path(__file__).resolve().parents[1] / "config" / "schema.yaml"
log = logging.getLogger("snaketune")


def experiment_of(args: argparse.Namespace):
    """The experiment named on the command line, resolved from its config with overrides."""
    config, name = load(args.config, args.experiment, args.set)
    if SCHEMA.is_file():  # the checkout's schema: type checks and defaults, as the workflow does
        try:
            from snakemake.utils import validate
        except ImportError:  # a GPU box with only the training stack: the dataclasses still check keys
            log.warning("snakemake is not installed: %s is checked against the config dataclasses only",
                        args.config)
        else:
            try:
                validate(config, str(SCHEMA))
            except Exception as err:  # snakemake raises WorkflowError with the schema's message
                raise ConfigError(f"{args.config}: {err}") from None
    exp = resolve(config, name)
    return exp, Layout.of(exp)


def _yaml(text: str):
    return yaml.safe_load(Path(text[1:]).read_text() if text.startswith("@") else text)


# ---------------------------------------------------------------- steps


def cmd_generate_data(args) -> None:
    exp, layout = experiment_of(args)
    if not exp.dataset.generated:
        raise ConfigError(f"datasets.{exp.dataset_name} is converted, not generated: use convert-data")
    steps.generate_data(exp.dataset, args.output or layout.data_file)


def cmd_convert_data(args) -> None:
    exp, layout = experiment_of(args)
    if exp.dataset.generated:
        raise ConfigError(f"datasets.{exp.dataset_name} is generated, not converted: use generate-data")
    steps.convert_data(exp.dataset, args.output or layout.data_file)


def cmd_fetch_model(args) -> None:
    exp, layout = experiment_of(args)
    steps.fetch_model(exp.model, args.output or layout.model_dir, args.cache_dir)


def cmd_train(args) -> None:
    exp, layout = experiment_of(args)
    steps.train(model_dir=args.model or layout.model_dir, data_file=args.data or layout.data_file,
                work_dir=args.work_dir or layout.work_dir, summary=args.summary or layout.result("training.json"),
                metrics=args.metrics or layout.result("metrics.jsonl"),
                provenance=args.provenance or layout.result("provenance.json"),
                train=exp.train, model=exp.model, record=exp.provenance_record(),
                ranks=args.ranks or exp.ranks or max(1, exp.gpus), threads=args.threads,
                workflow_dir=Path(__file__).resolve().parents[1], log_file=args.log)


def cmd_pth_to_hf(args) -> None:
    paths = args.paths
    if args.lora is not None:  # a checkpoint with no snaketune config: everything on the command line
        if len(paths) != 2 or not args.base_model:
            raise ConfigError("with --lora give CHECKPOINT OUTPUT and --base-model")
        lora, export, base = from_dict(LoraConfig, args.lora, "--lora"), ExportConfig(), args.base_model
        checkpoint, output = paths
    else:
        if len(paths) in (1, 3):
            args.experiment, paths = paths[0], paths[1:]
        exp, layout = experiment_of(args)
        lora, export, base = exp.train.lora, exp.export, args.base_model or layout.model_dir
        checkpoint, output = paths or (layout.result("training.json"), layout.result("adapter"))
    if args.fp32:
        export.fp32 = True
    if args.max_shard_size:
        export.max_shard_size = args.max_shard_size
    steps.pth_to_hf(checkpoint, output, lora, export, base)


def cmd_merge(args) -> None:
    paths = args.paths
    if len(paths) in (1, 4):
        args.experiment, paths = paths[0], paths[1:]
    if args.template and len(paths) == 3:  # no config needed
        merge, trust = MergeConfig(), args.trust_remote_code
        template = args.template
    else:
        exp, layout = experiment_of(args)
        merge, trust, template = exp.merge, exp.model.trust_remote_code, args.template or exp.train.template
        paths = paths or (layout.model_dir, layout.result("adapter"), layout.result("merged"))
    if args.dtype:
        merge.dtype = args.dtype
    if args.max_shard_size:
        merge.max_shard_size = args.max_shard_size
    base, adapter, output = paths
    steps.merge(base, adapter, output, merge, template=template, trust_remote_code=trust)


def cmd_evaluate(args) -> None:
    exp, layout = experiment_of(args)
    steps.evaluate(args.base or layout.model_dir, args.adapter or layout.result("adapter"),
                   args.merged or layout.result("merged"), exp.evaluation, template=exp.train.template,
                   system=exp.train.SYSTEM, data_file=args.data or layout.data_file,
                   answers=layout.result("evaluation.jsonl"), markdown=layout.result("evaluation.md"),
                   trust_remote_code=exp.model.trust_remote_code)


def cmd_report(args) -> None:
    exp, layout = experiment_of(args)
    benchmarks = sorted(Path("benchmarks").glob(f"*/{exp.name}.tsv")) + [
        Path(f"benchmarks/fetch_model/{exp.model_name}.tsv"),
        Path(f"benchmarks/{'generate_data' if exp.dataset.generated else 'convert_data'}/{exp.dataset_name}.tsv")]
    steps.report(title=exp.name, metrics=layout.result("metrics.jsonl"), evaluation=layout.result("evaluation.jsonl"),
                 provenance=layout.result("provenance.json"), benchmarks=[b for b in benchmarks if b.exists()],
                 curves=layout.result("report/training_curves.svg"),
                 evaluation_page=layout.result("report/evaluation.html"),
                 provenance_page=layout.result("report/provenance.html"),
                 benchmarks_page=layout.result("report/benchmarks.html"))


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="snaketune", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn, help: str, *, experiment: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=fn, experiment=None)
        sp.add_argument("--config", default="config/config.yaml", help="the workflow config (default: %(default)s)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting: train.lr=1e-4 (of the experiment) or models.NAME.path=DIR")
        sp.add_argument("--log", help="also append the log to this file")
        if experiment:
            sp.add_argument("experiment", nargs="?", help="experiment name (default: the first under run)")
        return sp

    sp = add("generate-data", cmd_generate_data, "write the experiment's generated dataset (self-cognition)")
    sp.add_argument("--output", help="default: results/data/generated/DATASET.json")

    sp = add("convert-data", cmd_convert_data, "convert the experiment's dataset (alpaca/oasst1/openai/xtuner)")
    sp.add_argument("--output", help="default: results/data/converted/DATASET.json")

    sp = add("fetch-model", cmd_fetch_model, "link, download or import (GGUF) the experiment's base model")
    sp.add_argument("--output", help="default: resources/models/MODEL")
    sp.add_argument("--cache-dir", default="resources/downloads")

    sp = add("train", cmd_train, "QLoRA training with DeepSpeed ZeRO-2; resumes from the newest complete checkpoint")
    sp.add_argument("--model", help="Hugging Face model directory (default: resources/models/MODEL)")
    sp.add_argument("--data", help="dataset in XTuner's conversation format (default: the workflow's)")
    sp.add_argument("--work-dir", help="where iter_N.pth checkpoints go (default: work_dirs/EXPERIMENT)")
    sp.add_argument("--summary", help="training summary, written when training has finished "
                    "(default: results/EXPERIMENT/training.json)")
    sp.add_argument("--metrics", help="copy of the per-step metrics (default: results/EXPERIMENT/metrics.jsonl)")
    sp.add_argument("--provenance", help="default: results/EXPERIMENT/provenance.json")
    sp.add_argument("--threads", type=int, default=None, help="CPU threads in all (shared among ranks)")
    sp.add_argument("--ranks", type=int, default=None,
                    help="data-parallel processes (GPUs, or CPU ranks with gloo), started with torchrun "
                         "(default: the experiment's ranks, else one per GPU)")

    sp = add("pth_to_hf", cmd_pth_to_hf, "convert a checkpoint to a PEFT adapter (xtuner convert pth_to_hf)",
             experiment=False)
    sp.add_argument("paths", nargs="*", metavar="[EXPERIMENT] [CHECKPOINT OUTPUT]",
                    help="CHECKPOINT: iter_N.pth (DeepSpeed directory or .pth file) or a training summary JSON; "
                         "default: the experiment's final checkpoint and results/EXPERIMENT/adapter")
    sp.add_argument("--lora", type=_yaml, default=None,
                    help="for a checkpoint without a config: '{r: 64, alpha: 16, dropout: 0.1}' (YAML or @file)")
    sp.add_argument("--base-model", help="recorded as base_model_name_or_path (default: the experiment's model)")
    sp.add_argument("--fp32", action="store_true", help="save fp32 tensors (default fp16)")
    sp.add_argument("--max-shard-size", help="e.g. 2GB (default: the config's export.max_shard_size)")

    sp = add("merge", cmd_merge, "merge an adapter into its base model (xtuner convert merge)", experiment=False)
    sp.add_argument("paths", nargs="*", metavar="[EXPERIMENT] [BASE ADAPTER OUTPUT]")
    sp.add_argument("--template", help="prompt template for the saved chat template (default: the experiment's)")
    sp.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"])
    sp.add_argument("--max-shard-size")
    sp.add_argument("--trust-remote-code", action="store_true", help="with explicit paths: run the model's hub code")

    sp = add("evaluate", cmd_evaluate, "answer the evaluation prompts with the base and the fine-tuned model")
    sp.add_argument("--base", help="default: resources/models/MODEL")
    sp.add_argument("--adapter", help="default: results/EXPERIMENT/adapter")
    sp.add_argument("--merged", help="default: results/EXPERIMENT/merged")
    sp.add_argument("--data", help="training data, to mark which prompts were trained on")

    add("report", cmd_report, "the report's parts: training curves, evaluation, provenance, benchmarks")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    with job(args.log):
        args.func(args)


def by_hand(command: str) -> None:
    """``python scripts/<rule>.py ARGS`` is ``snaketune COMMAND ARGS``."""
    main([command, *sys.argv[1:]])


if __name__ == "__main__":
    main()
