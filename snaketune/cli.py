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
import os
import sys
from pathlib import Path

import yaml

from . import steps
from .config import (
    LAYOUT,
    ConfigError,
    ExportConfig,
    Layout,
    LoraConfig,
    MergeConfig,
    from_dict,
    load,
    resolve,
    validate_schema,
    yaml_problem,
)
from .fetch import check_link
from .joblog import job

SCHEMA = Path(__file__).resolve().parents[1] / "config" / "schema.yaml"
log = logging.getLogger("snaketune")
# The workflow's paths as the help names them (results/EXPERIMENT/adapter).
HELP_PATHS = LAYOUT.format(exp="EXPERIMENT", model="MODEL", dataset="DATASET")


def experiment_of(args: argparse.Namespace):
    """The experiment named on the command line, resolved from its config with overrides."""
    config, name = load(args.config, args.experiment, args.set)
    if SCHEMA.is_file():  # the checkout's schema: type checks and defaults, as the workflow does
        try:
            validate_schema(config, SCHEMA, args.config, args.set, name)
        except ImportError:  # a GPU box with only the training stack: the dataclasses still check keys
            log.warning("snakemake is not installed: %s is checked against the config dataclasses only", args.config)
    exp = resolve(config, name)
    if args.func is not cmd_fetch_model:  # fetch-model links the configured path anew
        check_link(exp.model, Layout.of(exp).model_dir)
    return exp, Layout.of(exp)


def _yaml(text: str):
    """``--lora`` as YAML, or ``@FILE``: a bad value is argparse's one-line usage error."""
    try:
        return yaml.safe_load(Path(text[1:]).read_text() if text.startswith("@") else text)
    except OSError as err:
        raise argparse.ArgumentTypeError(f"{text[1:]}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {yaml_problem(err)}") from None


# ---------------------------------------------------------------- steps


def _datasets_made_by(exp, step: str, output: str | None) -> list[tuple[str, object, str]]:
    """(name, entry, output file) of each dataset of the experiment that ``step`` makes."""
    from .config import dataset_file

    made = [(name, ds, dataset_file(name, ds)) for name, ds in exp.datasets.items() if ds.step == step]
    if not made:
        kinds = ", ".join(f"{name}: {ds.step.replace('_', '-')}" for name, ds in exp.datasets.items())
        raise ConfigError(f"experiment {exp.name} has no dataset made by {step.replace('_', '-')} ({kinds})")
    if output:
        if len(made) > 1:
            raise ConfigError(f"--output: experiment {exp.name} has {len(made)} such datasets; leave --output out")
        made = [(made[0][0], made[0][1], output)]
    return made


def cmd_generate_data(args) -> None:
    exp, _ = experiment_of(args)
    for _, dataset, output in _datasets_made_by(exp, "generate_data", args.output):
        steps.generate_data(dataset, output)


def cmd_convert_data(args) -> None:
    exp, _ = experiment_of(args)
    for _, dataset, output in _datasets_made_by(exp, "convert_data", args.output):
        steps.convert_data(dataset, output)


def cmd_replay_data(args) -> None:
    from .config import ReplaySpec

    config, _ = load(args.config, args.experiment, args.set)
    exp, _ = experiment_of(args)
    for name, dataset, output in _datasets_made_by(exp, "replay_data", args.output):
        spec = ReplaySpec.from_dict(dataset.spec, f"datasets.{name}.spec")
        trust = bool(config["models"][spec.model].get("trust_remote_code", False))
        model = args.model or LAYOUT.format(model=spec.model).model_dir
        steps.replay_data(dataset, model, output, trust_remote_code=trust)


def cmd_mix_data(args) -> None:
    exp, layout = experiment_of(args)
    if not exp.mixed:
        raise ConfigError(f"experiment {exp.name} trains on one dataset ({exp.mixture[0].name}): nothing to mix")
    steps.mix_data(
        exp.mixture_parts(), args.output or layout.mixture, args.sources or layout.mixture_sources, seed=exp.train.seed
    )


def cmd_fetch_model(args) -> None:
    exp, layout = experiment_of(args)
    steps.fetch_model(exp.model, args.output or layout.model_dir, args.cache_dir)


def cmd_train(args) -> None:
    exp, layout = experiment_of(args)
    for flag, name in (("nnodes", "NNODES"), ("node_rank", "NODE_RANK"), ("addr", "ADDR"), ("port", "PORT")):
        if getattr(args, flag) is not None:
            os.environ[name] = str(getattr(args, flag))
    per_node = os.environ.get("NPROC_PER_NODE")
    steps.train(
        steps.TrainJob(
            model_dir=args.model or layout.model_dir,
            data_file=args.data or exp.data_file,
            work_dir=args.work_dir or layout.work_dir,
            summary=args.summary or layout.summary,
            metrics=args.metrics or layout.metrics,
            provenance=args.provenance or layout.provenance,
            train=exp.train,
            model=exp.model,
            record=exp.provenance_record(),
            mixture_sources=layout.mixture_sources if exp.mixed and not args.data else None,
            ranks=args.ranks or (int(per_node) if per_node else None) or exp.ranks or max(1, exp.gpus),
            nodes=int(os.environ.get("NNODES") or exp.nodes),
            threads=args.threads,
            workflow_dir=Path(__file__).resolve().parents[1],
            log_file=args.log,
        )
    )


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
        checkpoint, output = paths or (layout.summary, layout.adapter)
    if args.fp32:
        export.fp32 = True
    if args.max_shard_size:
        export.max_shard_size = args.max_shard_size
    steps.pth_to_hf(checkpoint, output, lora, export, base)


def cmd_merge(args) -> None:
    paths = args.paths
    if len(paths) not in (0, 1, 3, 4):
        args.usage_error(
            "OUTPUT is missing: give BASE ADAPTER OUTPUT (or an EXPERIMENT alone)"
            if len(paths) in (2, 5)
            else f"{len(paths)} paths: give [EXPERIMENT] BASE ADAPTER OUTPUT"
        )
    if len(paths) in (1, 4):
        args.experiment, paths = paths[0], paths[1:]
    if len(paths) == 3 and not args.template and not Path(args.config).is_file():
        args.usage_error(
            f"give --template NAME with BASE ADAPTER OUTPUT: there is no config to take it from ({args.config} not found)"
        )
    if args.template and len(paths) == 3:  # no config needed
        merge, trust = MergeConfig(), args.trust_remote_code
        template = args.template
    else:
        exp, layout = experiment_of(args)
        merge, trust, template = exp.merge, exp.model.trust_remote_code, args.template or exp.train.template
        paths = paths or (layout.model_dir, layout.adapter, layout.merged)
    if args.dtype:
        merge.dtype = args.dtype
    if args.max_shard_size:
        merge.max_shard_size = args.max_shard_size
    base, adapter, output = paths
    steps.merge(
        base,
        adapter,
        output,
        merge,
        template=template,
        trust_remote_code=trust,
        device=args.device,
        allow_pickle=args.allow_pickle,
    )


def cmd_gguf(args) -> None:
    """``gguf [EXPERIMENT]``, ``gguf export MODEL OUTPUT``, ``gguf adapter ADAPTER BASE OUTPUT``."""
    from . import gguf_export

    word, paths = (args.paths[0], args.paths[1:]) if args.paths else (None, [])
    if word == "export":
        if len(paths) != 2:
            args.usage_error("gguf export takes MODEL OUTPUT (a model directory and the .gguf file to write)")
        gguf_export.write_model(paths[0], paths[1], args.type or "f16", name=args.name, allow_pickle=args.allow_pickle)
        if args.template:
            gguf_export.write_modelfile(paths[0], paths[1], args.template, args.system or "")
    elif word == "adapter":
        if len(paths) != 3:
            args.usage_error("gguf adapter takes ADAPTER BASE OUTPUT (the PEFT adapter, its base model, the .gguf)")
        gguf_export.write_adapter(*paths, name=args.name, allow_pickle=args.allow_pickle)
    else:
        if len(args.paths) > 1:
            args.usage_error(f"{' '.join(args.paths)}: give an EXPERIMENT, or export MODEL OUTPUT, or adapter ...")
        args.experiment = word
        exp, layout = experiment_of(args)
        if args.type:
            exp.gguf.types = [args.type]
        steps.gguf(
            layout.merged,
            layout.model_dir,
            layout.adapter,
            args.output or layout.gguf,
            exp.gguf,
            name=exp.name,
            template=args.template or exp.train.template,
            system=exp.train.SYSTEM if args.system is None else args.system,
            allow_pickle=args.allow_pickle,
        )


def cmd_evaluate(args) -> None:
    exp, layout = experiment_of(args)
    steps.evaluate(
        steps.EvaluateJob(
            model=args.base or layout.model_dir,
            adapter=args.adapter or layout.adapter,
            merged=args.merged or layout.merged,
            data=args.data or exp.data_file,
            answers=layout.answers,
            markdown=layout.evaluation,
            summary=layout.evaluation_summary,
            evaluation=exp.evaluation,
            template=exp.train.template,
            system=exp.train.SYSTEM,
            trust_remote_code=exp.model.trust_remote_code,
        )
    )


def cmd_report(args) -> None:
    exp, layout = experiment_of(args)
    benchmarks = sorted(Path().glob(LAYOUT.benchmark("*", exp.name))) + [
        Path(LAYOUT.benchmark("fetch_model", exp.model_name)),
        *(Path(LAYOUT.benchmark(rule, name)) for rule, name in exp.data_jobs()),
    ]
    steps.report(
        steps.ReportJob(
            title=exp.name,
            metrics=layout.metrics,
            evaluation=layout.answers,
            evaluation_summary=layout.evaluation_summary,
            provenance=layout.provenance,
            benchmarks=[str(b) for b in benchmarks if b.exists()],
            curves=layout.curves,
            evaluation_page=layout.evaluation_page,
            provenance_page=layout.provenance_page,
            benchmarks_page=layout.benchmarks_page,
        )
    )


# ---------------------------------------------------------------- chat, web page, XTuner's config and dataset tools


def _chat(args):
    """(Chat, what it talks to) for MODEL: a model directory (a base model with --adapter), or an
    experiment's merged model (its base model with --adapter) with the experiment's template and SYSTEM."""
    import torch

    from .chat import Chat, GenerationSettings, load_model
    from .templates import SYSTEM_TEMPLATES, TOKENIZER_TEMPLATE

    template, system, trust = args.prompt_template, "", args.trust_remote_code
    if args.model and Path(args.model).is_dir():
        model_dir = args.model
    elif args.model and "/" in args.model:
        raise ConfigError(f"{args.model}: no such model directory")
    else:
        args.experiment = args.model
        exp, layout = experiment_of(args)
        model_dir = layout.model_dir if args.adapter else layout.merged
        if not Path(model_dir).is_dir():
            raise ConfigError(
                f"{model_dir} does not exist: build it with `snakemake final_model`, or name a model directory"
            )
        template, system, trust = template or exp.train.template, exp.train.SYSTEM, trust or exp.model.trust_remote_code
    if args.system is not None:
        system = args.system
    elif args.system_template:
        system = SYSTEM_TEMPLATES[args.system_template]
    model, tokenizer = load_model(model_dir, adapter=args.adapter, bits=args.bits, trust_remote_code=trust)
    if template is None:  # a merged model's saved chat template renders the training format
        if not tokenizer.chat_template:
            raise ConfigError(f"{model_dir} has no chat template: give --prompt-template")
        template = TOKENIZER_TEMPLATE
    torch.manual_seed(args.seed)
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k
    )
    where = model_dir + (f" + {args.adapter}" if args.adapter else "")
    return Chat(model, tokenizer, template, system=system, settings=settings), where


def cmd_chat(args) -> None:
    from .chat import COMMANDS, repl, terminal_reader

    chat, where = _chat(args)
    interactive = sys.stdin.isatty()
    print(
        f"{where}, template {getattr(chat.template, 'name', chat.template)}, "
        f"{'greedy' if args.temperature <= 0 else f'temperature {args.temperature}'}; {COMMANDS}",
        file=sys.stderr,
        flush=True,
    )
    repl(
        chat,
        terminal_reader(interactive),
        sys.stdout,
        stream=interactive and sys.stdout.isatty() and not args.no_streaming,
    )


def cmd_web(args) -> None:
    from .web import build_app, check_address, login, serve, warn_if_open

    auth = login(args.auth)
    warn_if_open(args.host, auth)
    check_address(args.host, args.port)  # before the model loads, which may take minutes
    chat, where = _chat(args)
    serve(
        build_app(chat.model, chat.tokenizer, chat.template, system=chat.system, settings=chat.settings, title=where),
        args.host,
        args.port,
        auth,
    )


def cmd_list_cfg(args) -> None:
    from .datatools import list_presets

    print("\n".join(list_presets(args.pattern)))


def cmd_copy_cfg(args) -> None:
    from .datatools import copy_preset

    print(copy_preset(args.name, args.dir))


def _dataset_of(args):
    from . import datatools
    from .model import load_tokenizer

    exp, layout = experiment_of(args)
    sources = datatools.dataset_sources(exp, args.data, args.format)
    where = datatools.tokenizer_dir(exp, layout, args.model)
    tokenizer = load_tokenizer(where, exp.model.trust_remote_code) if where else None
    return exp, sources, where, tokenizer


def cmd_check_custom_dataset(args) -> None:
    from .datatools import check_dataset, print_report

    exp, sources, where, tokenizer = _dataset_of(args)
    ok = True
    for source in sources:
        report = check_dataset(source, tokenizer, exp.train.template, exp.train.max_length)
        print_report(
            report, sys.stdout, tokens_from=where, template=exp.train.template, max_length=exp.train.max_length
        )
        ok = ok and report.ok
    if not ok:
        raise SystemExit(1)


def cmd_log_dataset(args) -> None:
    from .datatools import log_samples

    exp, sources, _, tokenizer = _dataset_of(args)
    if tokenizer is None:
        raise ConfigError("log-dataset needs the model's tokenizer: run `snaketune fetch-model` or give --model DIR")
    log_samples(sources, tokenizer, exp.train.template, exp.train.max_length, args.n, args.show, sys.stdout)


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="snaketune",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    add = _subcommands(sub)
    for group in (
        _data_and_model_commands,
        _train_command,
        _export_commands,
        _gguf_command,
        _evaluation_commands,
        _chat_commands,
        _preset_commands,
        _dataset_tool_commands,
        _replay_and_mix_commands,
    ):
        group(add)
    _convert_command(sub)
    return p


def _subcommands(sub):
    """``add(name, fn, help)``: a subcommand with the options every step shares."""

    def add(name: str, fn, help: str, *, experiment: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=fn, experiment=None)
        sp.add_argument("--config", default="config/config.yaml", help="the workflow config (default: %(default)s)")
        sp.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a setting: train.lr=1e-4 (of the experiment) or models.NAME.path=DIR",
        )
        sp.add_argument("--log", help="also append the log to this file")
        if experiment:
            sp.add_argument("experiment", nargs="?", help="experiment name (default: the first under run)")
        return sp

    return add


def _data_and_model_commands(add) -> None:
    sp = add("generate-data", cmd_generate_data, "write the experiment's generated dataset (self-cognition)")
    sp.add_argument("--output", help=f"default: {HELP_PATHS.generated_data}")

    sp = add("convert-data", cmd_convert_data, "convert the experiment's dataset (alpaca/oasst1/openai/xtuner)")
    sp.add_argument("--output", help=f"default: {HELP_PATHS.converted_data}")

    sp = add("fetch-model", cmd_fetch_model, "link, download or import (GGUF) the experiment's base model")
    sp.add_argument("--output", help=f"default: {HELP_PATHS.model_dir}")
    sp.add_argument("--cache-dir", default=LAYOUT.downloads)


def _train_command(add) -> None:
    sp = add("train", cmd_train, "QLoRA training with DeepSpeed ZeRO-2; resumes from the newest complete checkpoint")
    sp.add_argument("--model", help=f"Hugging Face model directory (default: {HELP_PATHS.model_dir})")
    sp.add_argument("--data", help="dataset in XTuner's conversation format (default: the workflow's)")
    sp.add_argument("--work-dir", help=f"where iter_N.pth checkpoints go (default: {HELP_PATHS.work_dir})")
    sp.add_argument(
        "--summary", help=f"training summary, written when training has finished (default: {HELP_PATHS.summary})"
    )
    sp.add_argument("--metrics", help=f"copy of the per-step metrics (default: {HELP_PATHS.metrics})")
    sp.add_argument("--provenance", help=f"default: {HELP_PATHS.provenance}")
    sp.add_argument("--threads", type=int, default=None, help="CPU threads in all (shared among ranks)")
    sp.add_argument(
        "--ranks",
        type=int,
        default=None,
        help="data-parallel processes per node (GPUs, or CPU ranks with gloo), started with torchrun "
        "(default: NPROC_PER_NODE, else the experiment's ranks, else one per GPU)",
    )
    # XTuner's launch over several machines: the same command on each node, these set alike but NODE_RANK
    nodes = sp.add_argument_group("several nodes (XTuner's variables; a flag overrides its variable)")
    nodes.add_argument("--nnodes", type=int, help="machines in the training (NNODES)")
    nodes.add_argument("--node-rank", type=int, help="this machine's number, 0 .. nnodes-1 (NODE_RANK)")
    nodes.add_argument("--addr", help="node 0's address, where the ranks meet (ADDR)")
    nodes.add_argument("--port", type=int, help="a free port on node 0 (PORT)")


def _export_commands(add) -> None:
    sp = add(
        "pth_to_hf",
        cmd_pth_to_hf,
        "convert a checkpoint to a PEFT adapter (xtuner convert pth_to_hf)",
        experiment=False,
    )
    sp.add_argument(
        "paths",
        nargs="*",
        metavar="[EXPERIMENT] [CHECKPOINT OUTPUT]",
        help="CHECKPOINT: iter_N.pth (DeepSpeed directory or .pth file) or a training summary JSON; "
        f"default: the experiment's final checkpoint and {HELP_PATHS.adapter}",
    )
    sp.add_argument(
        "--lora",
        type=_yaml,
        default=None,
        help="for a checkpoint without a config: '{r: 64, alpha: 16, dropout: 0.1}' (YAML or @file)",
    )
    sp.add_argument("--base-model", help="recorded as base_model_name_or_path (default: the experiment's model)")
    sp.add_argument("--fp32", action="store_true", help="save fp32 tensors (default fp16)")
    sp.add_argument("--max-shard-size", help="e.g. 2GB (default: the config's export.max_shard_size)")

    sp = add("merge", cmd_merge, "merge an adapter into its base model (xtuner convert merge)", experiment=False)
    sp.add_argument("paths", nargs="*", metavar="[EXPERIMENT] [BASE ADAPTER OUTPUT]")
    sp.add_argument("--template", help="prompt template for the saved chat template (default: the experiment's)")
    sp.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"])
    sp.add_argument("--max-shard-size", help="largest output shard, e.g. 2GB (never larger than the base's largest)")
    sp.add_argument("--trust-remote-code", action="store_true", help="with explicit paths: run the model's hub code")
    sp.add_argument(
        "--device",
        default="cpu",
        help="where the LoRA deltas are computed and added: cpu (default), cuda, cuda:N or auto",
    )
    sp.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read a base model that has only pickled pytorch_model*.bin weights (tensors only, weights_only)",
    )
    sp.set_defaults(usage_error=sp.error)


def _gguf_command(add) -> None:
    from .gguf_export import TYPES
    from .templates import TEMPLATES, TOKENIZER_TEMPLATE

    sp = add(
        "gguf",
        cmd_gguf,
        "GGUF files for llama.cpp and Ollama: an experiment's (merged model per gguf.types, Modelfiles, LoRA), "
        "or `export MODEL OUTPUT` (one model file), or `adapter ADAPTER BASE OUTPUT` (llama.cpp's LoRA GGUF)",
        experiment=False,
    )
    sp.add_argument("paths", nargs="*", metavar="[EXPERIMENT | export MODEL OUTPUT | adapter ADAPTER BASE OUTPUT]")
    sp.add_argument(
        "--type", choices=list(TYPES), help="weights of the model file (default: f16; an experiment's: gguf.types)"
    )
    sp.add_argument("--output", help=f"an experiment's directory (default: {HELP_PATHS.gguf})")
    sp.add_argument("--name", help="general.name in the file (default: the experiment's or the directory's name)")
    sp.add_argument(
        "--template",
        choices=sorted([*TEMPLATES, TOKENIZER_TEMPLATE]),
        help="the chat format of the Modelfile (default: the experiment's; with export, a Modelfile only if given)",
    )
    sp.add_argument("--system", help="the Modelfile's SYSTEM prompt (default: the experiment's SYSTEM)")
    sp.add_argument(
        "--allow-pickle", action="store_true", help="read pickled pytorch_model*.bin weights (tensors only)"
    )
    sp.set_defaults(usage_error=sp.error)


def _convert_command(sub) -> None:
    """``snaketune convert pth_to_hf|merge ...``: XTuner's spellings of the two commands, the same parsers."""
    sp = sub.add_parser(
        "convert",
        help="XTuner's spelling: convert pth_to_hf|merge ... are the pth_to_hf and merge commands",
        description="xtuner convert's spellings: `snaketune convert pth_to_hf ARGS` is `snaketune pth_to_hf ARGS`, "
        "`snaketune convert merge ARGS` is `snaketune merge ARGS`",
    )
    add = _subcommands(sp.add_subparsers(dest="conversion", required=True))
    _export_commands(add)
    sp = add(
        "split",
        cmd_split,
        "xtuner convert split: not needed (pth_to_hf and merge save in shards of --max-shard-size)",
        experiment=False,
    )
    sp.add_argument("paths", nargs="*", metavar="ARGS")


def cmd_split(args) -> None:
    raise ConfigError(
        "snaketune has no `convert split`: pth_to_hf and merge already save in shards of at most "
        "--max-shard-size (the config's export.max_shard_size and merge.max_shard_size)"
    )


def _evaluation_commands(add) -> None:
    sp = add("evaluate", cmd_evaluate, "answer the evaluation prompts with the base and the fine-tuned model")
    sp.add_argument("--base", help=f"default: {HELP_PATHS.model_dir}")
    sp.add_argument("--adapter", help=f"default: {HELP_PATHS.adapter}")
    sp.add_argument("--merged", help=f"default: {HELP_PATHS.merged}")
    sp.add_argument("--data", help="training data, to mark which prompts were trained on")

    add("report", cmd_report, "the report's parts: training curves, evaluation, provenance, benchmarks")


def _chat_arguments(sp: argparse.ArgumentParser) -> None:
    from .templates import SYSTEM_TEMPLATES, TEMPLATES, TOKENIZER_TEMPLATE

    sp.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        help="a model directory (merged, or a base model with --adapter), or an experiment name: "
        f"its {HELP_PATHS.merged} with its template and SYSTEM (default: the first under run)",
    )
    sp.add_argument("--adapter", help="a PEFT adapter directory to put on MODEL (an experiment's: its base model)")
    sp.add_argument(
        "--prompt-template",
        choices=sorted([*TEMPLATES, TOKENIZER_TEMPLATE]),
        help="default: the experiment's; for a directory, its tokenizer's chat template "
        "(a merged model's renders the training format)",
    )
    system = sp.add_mutually_exclusive_group()
    system.add_argument("--system", help="system prompt (default: the experiment's SYSTEM)")
    system.add_argument("--system-template", choices=sorted(SYSTEM_TEMPLATES), help="one of XTuner's system prompts")
    sp.add_argument("--max-new-tokens", type=int, default=512)
    sp.add_argument(
        "--temperature", type=float, default=0.0, help="0 (default): greedy, reproducible; XTuner samples at 0.1"
    )
    sp.add_argument("--top-p", type=float, default=0.75, help="when sampling (default: %(default)s, XTuner's)")
    sp.add_argument("--top-k", type=int, default=40, help="when sampling (default: %(default)s, XTuner's)")
    sp.add_argument("--seed", type=int, default=0, help="torch seed, set once at start (default: %(default)s)")
    sp.add_argument("--bits", type=int, choices=[4], help="4: load in NF4 with bitsandbytes (CUDA GPU only)")
    sp.add_argument("--trust-remote-code", action="store_true", help="run the model directory's hub code")


def _chat_commands(add) -> None:
    sp = add(
        "chat",
        cmd_chat,
        "chat in the terminal (xtuner chat): multi-turn, streamed, in the training format; "
        "reads prompts from stdin when it is not a terminal",
        experiment=False,
    )
    _chat_arguments(sp)
    sp.add_argument("--no-streaming", action="store_true", help="print each answer when it is complete")

    sp = add("web", cmd_web, "the chat as a web page (Gradio)", experiment=False)
    _chat_arguments(sp)
    sp.add_argument("--host", default="127.0.0.1", help="default: %(default)s (this machine only)")
    sp.add_argument("--port", type=int, default=7860)
    sp.add_argument(
        "--auth",
        metavar="USER:PASS",
        help="require this login on the page (default: $SNAKETUNE_WEB_AUTH); without one, anyone who reaches "
        "the port can use the model",
    )


def _preset_commands(add) -> None:
    sp = add("list-cfg", cmd_list_cfg, "list the presets in config/presets (xtuner list-cfg)", experiment=False)
    sp.add_argument("-p", "--pattern", help="only names containing this (case-insensitive)")

    sp = add(
        "copy-cfg",
        cmd_copy_cfg,
        "copy a preset to DIR/NAME.yaml, never overwriting (xtuner copy-cfg)",
        experiment=False,
    )
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("dir", metavar="DIR")


def _dataset_arguments(sp: argparse.ArgumentParser) -> None:
    from .data import CONVERTERS

    sp.add_argument("--data", help="read this file instead of the experiment's dataset")
    sp.add_argument("--format", choices=sorted(CONVERTERS), help="format of --data (default: the dataset's)")
    sp.add_argument("--model", help="tokenizer directory (default: the experiment's model)")


def _dataset_tool_commands(add) -> None:
    from .datatools import SHOW

    sp = add(
        "check-custom-dataset",
        cmd_check_custom_dataset,
        "validate the experiment's dataset: every record, "
        "token lengths, truncation, records with nothing to learn; exits 1 on bad data",
    )
    _dataset_arguments(sp)

    sp = add(
        "log-dataset",
        cmd_log_dataset,
        "print the first samples as training encodes them, supervised tokens marked ⟦like this⟧",
    )
    _dataset_arguments(sp)
    sp.add_argument("-n", type=int, default=1, help="how many samples (default: %(default)s)")
    sp.add_argument(
        "--show",
        choices=SHOW,
        default="masked_text",
        help="masked_text (default): the text, supervised tokens between ⟦ and ⟧; text; input_ids; labels; all",
    )


def _replay_and_mix_commands(add) -> None:
    sp = add(
        "replay-data",
        cmd_replay_data,
        "write the experiment's replay dataset(s): the model's own greedy "
        "answers to the training part of a general question set",
    )
    sp.add_argument("--model", help=f"the model answering (default: {HELP_PATHS.model_dir} of the replay spec)")
    sp.add_argument("--output", help=f"default: {HELP_PATHS.replay_data}")

    sp = add("mix-data", cmd_mix_data, "concatenate the experiment's datasets, each repeated, into one training file")
    sp.add_argument("--output", help=f"default: {HELP_PATHS.mixture}")
    sp.add_argument("--sources", help=f"what went in, for provenance (default: {HELP_PATHS.mixture_sources})")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("snaketune")
    except PackageNotFoundError:  # a checkout used without `pip install -e .`
        return "unknown (not installed)"


def _suggest(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """A mistyped command gets the closest real one, as git and pip answer, instead of argparse's list."""
    import difflib

    commands = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    word = argv[0] if argv else ""
    if not word or word.startswith("-") or word in commands:
        return
    close = difflib.get_close_matches(word, list(commands), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    parser.exit(2, f"snaketune: '{word}' is not a command.{hint} See 'snaketune --help'.\n")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    _suggest(parser, argv)
    args = parser.parse_args(argv)
    with job(args.log):
        args.func(args)


def by_hand(command: str) -> None:
    """``python scripts/<rule>.py ARGS`` is ``snaketune COMMAND ARGS``."""
    main([command, *sys.argv[1:]])


if __name__ == "__main__":
    main()
