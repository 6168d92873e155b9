"""One function per workflow step, called by ``scripts/<rule>.py`` under Snakemake and by the CLI.

Each takes the files it reads and writes and its config section object;
nothing here parses a command line or knows about Snakemake.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from .config import DatasetConfig, EvaluationConfig, ExportConfig, LoraConfig, MergeConfig, ModelConfig, TrainConfig
from .files import write_json

log = logging.getLogger("snaketune")

PathLike = str | os.PathLike


def generate_data(dataset: DatasetConfig, output: PathLike) -> None:
    from .data import GENERATORS, write_records

    records = GENERATORS[dataset.generator](**(dataset.spec or {}))
    write_records(records, output)
    log.info("wrote %d %s records to %s", len(records), dataset.generator, output)


def convert_data(dataset: DatasetConfig, output: PathLike) -> None:
    from .data import convert_file

    n = convert_file(dataset.source, dataset.format, output, split=dataset.split)
    log.info("converted %d records from %s (%s) to %s", n, dataset.source, dataset.format, output)


def replay_data(dataset: DatasetConfig, model_dir: PathLike, output: PathLike, *,
                trust_remote_code: bool = False) -> None:
    """The ``replay`` generator: the model's own greedy answers to the training part of a question
    set (self-distillation). Evaluation-only questions are never asked here."""
    from . import evalsets
    from .config import ReplaySpec
    from .data import DataError, replay_records, write_records
    from .generation import generate_answers
    from .model import load_base, load_tokenizer

    spec = ReplaySpec.from_dict(dataset.spec, "spec")
    questions = evalsets.load(spec.questions, split="train")
    if not questions:
        raise DataError(evalsets.path_of(spec.questions), None, "split", "no question of split train",
                        'mark the questions that may become training data with "split": "train"')
    model = load_base(model_dir, "float32", trust_remote_code, quantization=spec.quantization)
    answers = generate_answers(model, load_tokenizer(model_dir, trust_remote_code), spec.template,
                               [q.question for q in questions], system=spec.system,
                               max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size)
    records, counts = replay_records(((a.prompt, a.answer, a.stopped) for a in answers), system=spec.system,
                                     unfinished=spec.unfinished)
    if not records:
        raise DataError(output, None, None, f"no usable answer ({counts})",
                        "raise max_new_tokens or set unfinished: open")
    write_records(records, output)
    log.info("wrote %d replay records (%s) from %s's answers to %d questions of %s to %s", len(records), counts,
             model_dir, len(questions), spec.questions, output)


def mix_data(parts: list[dict], output: PathLike, sources: PathLike, *, seed: int = 0) -> None:
    """Concatenate an experiment's datasets (``parts``: name, file, repeat, loss) into one training file,
    and record what went in (file, hash, records, repeat, loss) for provenance. The records of a part
    with loss kl are marked so (``data.LOSS_KEY``)."""
    from .data import LOSS_KEY, mix, read_records, validate_conversation, write_records
    from .provenance import sha256_file

    def records(part: dict) -> list[dict]:
        recs = [validate_conversation(r, part["file"], i) for i, r in enumerate(read_records(part["file"]))]
        return [{**r, LOSS_KEY: "kl"} for r in recs] if part.get("loss") == "kl" else recs

    loaded = [(p["name"], records(p), p["repeat"]) for p in parts]
    records, counts = mix(loaded, seed)
    write_records(records, output)
    for part, count in zip(parts, counts):
        count.update(loss=part.get("loss", "ce"), file=str(part["file"]), sha256=sha256_file(part["file"]))
        log.info("%s: %d records x %g -> %d", count["name"], count["records"], count["repeat"], count["used"])
    write_json(sources, {"records": len(records), "seed": seed, "datasets": counts})
    log.info("wrote %d mixed records to %s", len(records), output)


def check_data(files: list[PathLike], model_dir: PathLike, output: PathLike, *, template: str, max_length: int,
               trust_remote_code: bool = False) -> None:
    """``check-custom-dataset`` on an experiment's dataset files before training: every record valid, token
    lengths under ``template`` and ``max_length``. Writes the report; raises on bad data (nothing written)."""
    import io

    from .data import DataError, read_records
    from .datatools import Source, check_dataset, print_report
    from .files import write_text
    from .model import load_tokenizer

    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    text, failure = io.StringIO(), None
    for file in files:
        report = check_dataset(Source(str(file), "xtuner", read_records(file)), tokenizer, template, max_length)
        print_report(report, text, tokens_from=str(model_dir), template=template, max_length=max_length)
        if not report.ok and failure is None:
            failure = report.errors[0] if report.errors else DataError(
                file, None, None, f"no record has a supervised token within max_length {max_length}",
                "raise train.max_length, or shorten the records' inputs")
    for line in text.getvalue().splitlines():
        log.info("%s", line)
    if failure is not None:
        raise failure
    write_text(output, text.getvalue())


def fetch_model(model: ModelConfig, output: PathLike, cache_dir: PathLike) -> None:
    from .fetch import fetch_model as fetch

    fetch(model, output, cache_dir)


def train(*, model_dir: PathLike, data_file: PathLike, work_dir: PathLike, summary: PathLike,
          train: TrainConfig | dict, model: ModelConfig | dict, record: dict | None = None,
          metrics: PathLike | None = None, provenance: PathLike | None = None, ranks: int = 1,
          threads: int | None = None, workflow_dir: PathLike = ".", log_file: str | None = None,
          mixture_sources: PathLike | None = None) -> None:
    """Train (on ``ranks`` ranks), then write the summary, metrics and provenance.

    With more than one rank this process becomes torchrun, which runs this
    same function once per rank; only rank 0 writes the results. The summary
    is written last: its presence means training finished. ``mixture_sources`` (written by
    :func:`mix_data`) goes into the provenance when the data is a mixture.
    """
    from . import provenance as prov
    from .config import from_dict
    from .launch import allocator_env, inside_launcher, relaunch
    from .train import METRICS, train as run

    cfg, model = from_dict(TrainConfig, train, "train"), from_dict(ModelConfig, model, "model")
    env = None if inside_launcher() else allocator_env(cfg.allocator)
    if (ranks > 1 or env) and not inside_launcher():
        call = dict(model_dir=str(model_dir), data_file=str(data_file), work_dir=str(work_dir), summary=str(summary),
                    train=asdict(cfg), model=asdict(model), record=record,
                    metrics=metrics and str(metrics), provenance=provenance and str(provenance), ranks=ranks,
                    threads=max(1, (threads or 1) // ranks) if ranks > 1 else threads,
                    workflow_dir=str(workflow_dir), log_file=log_file,
                    mixture_sources=mixture_sources and str(mixture_sources))
        relaunch(ranks, call, env)
    training_summary = run(model_dir, data_file, work_dir, cfg, threads=threads, trust_remote_code=model.trust_remote_code)
    if training_summary is None:  # not rank 0
        return
    if metrics:
        Path(metrics).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(work_dir) / METRICS, metrics)
    if provenance:
        if mixture_sources:
            record = {**(record or {}), "mixture_sources": json.loads(Path(mixture_sources).read_text())}
        prov.write(provenance, config={**(record or {}), "train": asdict(cfg), "model_entry": asdict(model)},
                   data_file=data_file, model_dir=model_dir, workflow_dir=workflow_dir, seed=cfg.seed,
                   world_size=training_summary["world_size"], runs=training_summary["runs"],
                   device=training_summary["device"])
    write_json(summary, training_summary)


def checkpoint_of(summary_or_checkpoint: PathLike) -> Path:
    """The final checkpoint named by a training summary, or the checkpoint path itself."""
    path = Path(summary_or_checkpoint)
    if path.suffix == ".json":
        return Path(json.loads(path.read_text())["checkpoint"])
    return path


def pth_to_hf(checkpoint: PathLike, output: PathLike, lora: LoraConfig, export: ExportConfig,
              base_model: str) -> None:
    from .adapter import pth_to_hf as convert

    convert(checkpoint_of(checkpoint), output, lora, base_model, export)


def merge(base: PathLike, adapter: PathLike, output: PathLike, merge: MergeConfig, *, template: str,
          trust_remote_code: bool = False) -> None:
    from .merge import merge as run

    run(base, adapter, output, template, merge, trust_remote_code=trust_remote_code)


def evaluate(base: PathLike, adapter: PathLike, merged: PathLike, evaluation: EvaluationConfig, *,
             template: str, system: str, data_file: PathLike | None, answers: PathLike, markdown: PathLike,
             summary: PathLike, trust_remote_code: bool = False) -> dict:
    from .evaluate import evaluate as run, training_prompts

    return run(base, adapter, merged, evaluation, template=template, system=system,
               trained_prompts=training_prompts(data_file) if data_file else set(),
               trust_remote_code=trust_remote_code, out_jsonl=answers, out_md=markdown, out_summary=summary)


def report(*, title: str, metrics: PathLike, evaluation: PathLike, evaluation_summary: PathLike,
           provenance: PathLike, benchmarks: list[PathLike], curves: PathLike, evaluation_page: PathLike,
           provenance_page: PathLike, benchmarks_page: PathLike) -> None:
    from . import report as parts

    parts.training_curves(metrics, curves, title=f"{title}: training")
    parts.evaluation_page(evaluation, evaluation_summary, evaluation_page, title=f"{title}: base vs fine-tuned")
    parts.provenance_page(provenance, provenance_page, title=f"{title}: provenance")
    parts.benchmarks_page(benchmarks, benchmarks_page, title=f"{title}: benchmarks")
