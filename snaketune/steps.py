"""One function per workflow step, called by ``scripts/<rule>.py`` under Snakemake and by the CLI.

Each takes the files it reads and writes and its config section object, or,
where those are many (train, evaluate, report), one typed job holding them
all (:class:`TrainJob`, :class:`EvaluateJob`, :class:`ReportJob`). Nothing
here parses a command line or knows about Snakemake; the files' default
places are :class:`snaketune.config.Layout`'s.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .config import (
    DatasetConfig,
    EvaluationConfig,
    ExportConfig,
    GgufConfig,
    LoraConfig,
    MergeConfig,
    ModelConfig,
    Section,
    TrainConfig,
)
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


def replay_data(
    dataset: DatasetConfig,
    model_dir: PathLike,
    output: PathLike,
    *,
    trust_remote_code: bool = False,
    gpus: int | None = None,
) -> None:
    """The ``replay`` generator: the model's own greedy answers to the training part of a question
    set (self-distillation). Evaluation-only questions are never asked here. On the job's GPU when
    it was given one (``gpus``: its resources.gpu; None by hand: any visible), else the CPU."""
    from . import evalsets
    from .config import ReplaySpec
    from .data import DataError, replay_records, write_records
    from .devices import inference_device
    from .generation import generate_answers
    from .model import load_base, load_tokenizer

    spec = ReplaySpec.from_dict(dataset.spec, "spec")
    questions = evalsets.load(spec.questions, split="train")
    if not questions:
        raise DataError(
            evalsets.path_of(spec.questions),
            None,
            "split",
            "no question of split train",
            'mark the questions that may become training data with "split": "train"',
        )
    place = inference_device(gpus, model_dir)
    model = load_base(model_dir, place.dtype, trust_remote_code, quantization=spec.quantization, device=place.device)
    answers = generate_answers(
        model,
        load_tokenizer(model_dir, trust_remote_code),
        spec.template,
        [q.question for q in questions],
        system=spec.system,
        max_new_tokens=spec.max_new_tokens,
        batch_size=spec.batch_size,
    )
    records, counts = replay_records(
        ((a.prompt, a.answer, a.stopped) for a in answers), system=spec.system, unfinished=spec.unfinished
    )
    if not records:
        raise DataError(
            output, None, None, f"no usable answer ({counts})", "raise max_new_tokens or set unfinished: open"
        )
    write_records(records, output)
    log.info(
        "wrote %d replay records (%s) from %s's answers to %d questions of %s to %s",
        len(records),
        counts,
        model_dir,
        len(questions),
        spec.questions,
        output,
    )


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


def check_data(
    files: list[PathLike],
    model_dir: PathLike,
    output: PathLike,
    *,
    template: str,
    max_length: int,
    trust_remote_code: bool = False,
) -> None:
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
            failure = (
                report.errors[0]
                if report.errors
                else DataError(
                    file,
                    None,
                    None,
                    f"no record has a supervised token within max_length {max_length}",
                    "raise train.max_length, or shorten the records' inputs",
                )
            )
    for line in text.getvalue().splitlines():
        log.info("%s", line)
    if failure is not None:
        raise failure
    write_text(output, text.getvalue())


def fetch_model(model: ModelConfig, output: PathLike, cache_dir: PathLike) -> None:
    from .fetch import fetch_model as fetch

    fetch(model, output, cache_dir)


@dataclass
class TrainJob(Section):
    """What the train step reads, writes and trains with, as one object: built once from the rule
    (``scripts/train.py``) or from the command line (``snaketune train``), and handed whole to every
    rank through the relaunch (``asdict`` as JSON; :meth:`from_dict` rebuilds it)."""

    model_dir: str
    data_file: str
    work_dir: str  # checkpoints (iter_N.pth) and the per-step metrics
    summary: str  # written last: its presence means training finished
    train: TrainConfig
    model: ModelConfig
    metrics: str | None = None
    provenance: str | None = None
    record: dict[str, Any] | None = None  # what provenance.json records beside train and model
    mixture_sources: str | None = None  # mix_data's record of a mixture, for the provenance
    ranks: int = 1  # per node
    nodes: int = 1
    gpus: int | None = None  # the GPUs the job was given on each node (resources.gpu / nodes); None: by hand
    experiment_gpus: int | None = None  # the experiment's gpus, which the job's must equal
    threads: int | None = None  # CPU threads in all, shared among the ranks
    workflow_dir: str = "."
    log_file: str | None = None

    def __post_init__(self) -> None:
        # plain strings, whatever path type the caller had, so that the job is JSON as it is
        for name in (
            "model_dir",
            "data_file",
            "work_dir",
            "summary",
            "metrics",
            "provenance",
            "mixture_sources",
            "workflow_dir",
            "log_file",
        ):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, str(value))

    def per_rank(self) -> TrainJob:
        """The job as each rank runs it: the job's threads shared among its ranks."""
        if self.ranks <= 1:
            return self
        return replace(self, threads=max(1, (self.threads or 1) // self.ranks))


def train(job: TrainJob) -> None:
    """Train (on ``job.ranks`` ranks), then write the summary, metrics and provenance.

    With more than one rank, or a malloc to preload, this process becomes torchrun (or a fresh
    process of itself), which runs this same function with the same job once per rank; only rank 0
    writes the results. Over several nodes it starts one torchrun per node and waits for them
    (:func:`snaketune.launch.launch_nodes`). The summary is written last: its presence means training
    finished.
    """
    from .launch import allocator_env, inside_launcher, launch_nodes, relaunch
    from .train import train as run

    if not inside_launcher():
        take_gpus(job)
        env = allocator_env(job.train.allocator)
        if job.nodes > 1:
            launch_nodes(job.nodes, job.ranks, asdict(job.per_rank()), env)
            return
        if job.ranks > 1 or env:
            relaunch(job.ranks, asdict(job.per_rank()), env)
    training_summary = run(
        job.model_dir,
        job.data_file,
        job.work_dir,
        job.train,
        threads=job.threads,
        trust_remote_code=job.model.trust_remote_code,
    )
    if training_summary is None:  # not rank 0
        return
    _write_results(job, training_summary)


def take_gpus(job: TrainJob) -> None:
    """Before any rank starts: the job's own GPUs on a local run, and its ranks checked against
    them, the job's allocation and the experiment's gpus (:mod:`snaketune.devices`)."""
    from . import devices

    devices.assign_gpus(job.gpus)
    devices.check_ranks(
        job.ranks, job_gpus=job.gpus, experiment_gpus=job.experiment_gpus, cuda_devices=devices.cuda_device_count()
    )


def _write_results(job: TrainJob, training_summary: dict) -> None:
    """Rank 0, once training finished: the metrics' copy, the provenance, the summary, then the run's end."""
    from . import checkpoints
    from . import provenance as prov
    from .train import METRICS

    if job.metrics:
        Path(job.metrics).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(job.work_dir) / METRICS, job.metrics)
    if job.provenance:
        record = dict(job.record or {})
        if job.mixture_sources:
            record["mixture_sources"] = json.loads(Path(job.mixture_sources).read_text())
        prov.write(
            job.provenance,
            config={**record, "train": asdict(job.train), "model_entry": asdict(job.model)},
            data_file=job.data_file,
            model_dir=job.model_dir,
            workflow_dir=job.workflow_dir,
            seed=job.train.seed,
            world_size=training_summary["world_size"],
            nodes=training_summary["nodes"],
            hosts=training_summary["hosts"],
            runs=training_summary["runs"],
            device=training_summary["device"],
        )
    write_json(job.summary, training_summary)
    checkpoints.record_end(Path(job.work_dir), training_summary["runs"])


def checkpoint_of(summary_or_checkpoint: PathLike) -> Path:
    """The final checkpoint named by a training summary, or the checkpoint path itself."""
    path = Path(summary_or_checkpoint)
    if path.suffix == ".json":
        return Path(json.loads(path.read_text())["checkpoint"])
    return path


def pth_to_hf(checkpoint: PathLike, output: PathLike, lora: LoraConfig, export: ExportConfig, base_model: str) -> None:
    from .adapter import pth_to_hf as convert

    convert(checkpoint_of(checkpoint), output, lora, base_model, export)


def merge(
    base: PathLike,
    adapter: PathLike,
    output: PathLike,
    merge: MergeConfig,
    *,
    template: str,
    trust_remote_code: bool = False,
    device: str = "cpu",
    allow_pickle: bool = False,
) -> None:
    from .merge import merge as run

    run(
        base,
        adapter,
        output,
        template,
        merge,
        trust_remote_code=trust_remote_code,
        device=device,
        allow_pickle=allow_pickle,
    )


def gguf(
    merged: PathLike,
    base: PathLike,
    adapter: PathLike,
    output: PathLike,
    gguf: GgufConfig,
    *,
    name: str,
    template: str,
    system: str = "",
    allow_pickle: bool = False,
) -> None:
    """The experiment's GGUF files (:func:`snaketune.gguf_export.export`) into the directory ``output``."""
    from .gguf_export import export

    export(merged, base, adapter, output, gguf, name=name, template=template, system=system, allow_pickle=allow_pickle)


@dataclass
class EvaluateJob(Section):
    """The evaluate step's files and settings. The fields are the evaluate rule's input, output and
    params names, so its script builds the job from the rule as it is; ``snaketune evaluate`` fills
    it in from the experiment's layout."""

    model: str  # the base model
    adapter: str
    merged: str
    data: str | None  # the training data: which prompts were trained on, which held out
    answers: str
    markdown: str
    summary: str
    evaluation: EvaluationConfig
    template: str
    system: str = ""
    trust_remote_code: bool = False
    gpus: int | None = None  # the job's resources.gpu: answer on its GPU (None, by hand: any visible)


def evaluate(job: EvaluateJob) -> dict:
    from .evaluate import evaluate as run
    from .evaluate import training_prompts

    return run(
        job.model,
        job.adapter,
        job.merged,
        job.evaluation,
        template=job.template,
        system=job.system,
        trained_prompts=training_prompts(job.data) if job.data else set(),
        trust_remote_code=job.trust_remote_code,
        gpus=job.gpus,
        out_jsonl=job.answers,
        out_md=job.markdown,
        out_summary=job.summary,
    )


@dataclass
class ReportJob(Section):
    """The report's parts for one experiment: what they are made from and where they go. The fields
    are the report_experiment rule's input and output names (``title``: the experiment)."""

    title: str
    metrics: str
    evaluation: str  # the answers, one JSON line each
    evaluation_summary: str
    provenance: str
    benchmarks: list[str]
    curves: str
    evaluation_page: str
    provenance_page: str
    benchmarks_page: str


def report(job: ReportJob) -> None:
    from . import report as parts

    parts.training_curves(job.metrics, job.curves, title=f"{job.title}: training")
    parts.evaluation_page(
        job.evaluation, job.evaluation_summary, job.evaluation_page, title=f"{job.title}: base vs fine-tuned"
    )
    parts.provenance_page(job.provenance, job.provenance_page, title=f"{job.title}: provenance")
    parts.benchmarks_page(job.benchmarks, job.benchmarks_page, title=f"{job.title}: benchmarks")
