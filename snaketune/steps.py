"""One function per workflow step, called by ``scripts/<rule>.py`` under Snakemake and by the CLI.

Each takes the files it reads and writes and its config section object;
nothing here parses a command line or knows about Snakemake.
"""

from __future__ import annotations

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


def fetch_model(model: ModelConfig, output: PathLike, cache_dir: PathLike) -> None:
    from .fetch import fetch_model as fetch

    fetch(model, output, cache_dir)


def train(*, model_dir: PathLike, data_file: PathLike, work_dir: PathLike, summary: PathLike,
          train: TrainConfig | dict, model: ModelConfig | dict, record: dict | None = None,
          metrics: PathLike | None = None, provenance: PathLike | None = None, ranks: int = 1,
          threads: int | None = None, workflow_dir: PathLike = ".", log_file: str | None = None) -> None:
    """Train (on ``ranks`` ranks), then write the summary, metrics and provenance.

    With more than one rank this process becomes torchrun, which runs this
    same function once per rank; only rank 0 writes the results. The summary
    is written last: its presence means training finished.
    """
    from . import provenance as prov
    from .config import from_dict
    from .launch import inside_launcher, relaunch
    from .train import METRICS, train as run

    cfg, model = from_dict(TrainConfig, train, "train"), from_dict(ModelConfig, model, "model")
    if ranks > 1 and not inside_launcher():
        call = dict(model_dir=str(model_dir), data_file=str(data_file), work_dir=str(work_dir), summary=str(summary),
                    train=asdict(cfg), model=asdict(model), record=record,
                    metrics=metrics and str(metrics), provenance=provenance and str(provenance), ranks=ranks,
                    threads=max(1, (threads or 1) // ranks), workflow_dir=str(workflow_dir), log_file=log_file)
        relaunch(ranks, call)
    training_summary = run(model_dir, data_file, work_dir, cfg, threads=threads, trust_remote_code=model.trust_remote_code)
    if training_summary is None:  # not rank 0
        return
    if metrics:
        Path(metrics).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(work_dir) / METRICS, metrics)
    if provenance:
        prov.write(provenance, config={**(record or {}), "train": asdict(cfg), "model_entry": asdict(model)},
                   data_file=data_file, model_dir=model_dir, workflow_dir=workflow_dir, seed=cfg.seed,
                   world_size=training_summary["world_size"], runs=training_summary["runs"],
                   device=training_summary["device"])
    write_json(summary, training_summary)


def checkpoint_of(summary_or_checkpoint: PathLike) -> Path:
    """The final checkpoint named by a training summary, or the checkpoint path itself."""
    import json

    path = Path(summary_or_checkpoint)
    if path.suffix == ".json":
        return Path(json.loads(path.read_text())["checkpoint"])
    return path


def pth_to_hf(checkpoint: PathLike, output: PathLike, lora: LoraConfig, export: ExportConfig,
              base_model: str) -> None:
    from .export import pth_to_hf as convert

    convert(checkpoint_of(checkpoint), output, lora, base_model, export)


def merge(base: PathLike, adapter: PathLike, output: PathLike, merge: MergeConfig, *, template: str,
          trust_remote_code: bool = False) -> None:
    from .export import merge as run

    run(base, adapter, output, template, merge, trust_remote_code=trust_remote_code)


def evaluate(base: PathLike, adapter: PathLike, merged: PathLike, evaluation: EvaluationConfig, *,
             template: str, system: str, data_file: PathLike | None, answers: PathLike, markdown: PathLike,
             trust_remote_code: bool = False) -> None:
    from .evaluate import evaluate as run, training_prompts

    run(base, adapter, merged, evaluation, template=template, system=system,
        trained_prompts=training_prompts(data_file) if data_file else set(),
        trust_remote_code=trust_remote_code, out_jsonl=answers, out_md=markdown)


def report(*, title: str, metrics: PathLike, evaluation: PathLike, provenance: PathLike, benchmarks: list[PathLike],
           curves: PathLike, evaluation_page: PathLike, provenance_page: PathLike, benchmarks_page: PathLike) -> None:
    from . import report as parts

    parts.training_curves(metrics, curves, title=f"{title}: training")
    parts.evaluation_page(evaluation, evaluation_page, title=f"{title}: base vs fine-tuned")
    parts.provenance_page(provenance, provenance_page, title=f"{title}: provenance")
    parts.benchmarks_page(benchmarks, benchmarks_page, title=f"{title}: benchmarks")
