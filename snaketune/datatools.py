"""XTuner's config and dataset habits: ``list-cfg``, ``copy-cfg``, ``check-custom-dataset``, ``log-dataset``.

The dataset tools read an experiment's dataset where the workflow reads it
(a local file in its ``format``, a hub dataset, or the self-cognition
generator), check every record with :mod:`snaketune.data`'s converters and
validators, and encode it with the training encoder, so what they report is
what ``train`` will see.
"""

from __future__ import annotations

import functools
import logging
import os
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from .config import Experiment, Layout, dataset_file
from .data import CONVERTERS, GENERATORS, load_hub_dataset, read_records, validate_conversation
from .encoding import IGNORE_INDEX, Encoded, encode_conversation
from .errors import ConfigError, DataError

PRESETS = Path(__file__).resolve().parents[1] / "config" / "presets"
SUPERVISED = ("⟦", "⟧")  # how log-dataset marks the tokens the loss is computed on
SHOW = ("text", "masked_text", "input_ids", "labels", "all")

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- presets


def list_presets(pattern: str | None = None, presets: Path = PRESETS) -> list[str]:
    """Preset names (``config/presets/NAME.yaml``) containing ``pattern`` (case-insensitive)."""
    names = sorted(p.stem for p in presets.glob("*.yaml"))
    return [n for n in names if not pattern or pattern.lower() in n.lower()]


def copy_preset(name: str, dest_dir: str | os.PathLike, presets: Path = PRESETS) -> Path:
    """Copy preset ``name`` to ``dest_dir/NAME.yaml``; never overwrites, nor writes through a link there.

    ``name`` must be one of :func:`list_presets`' names: a path (``../config``) names no preset.
    """
    name = name.removesuffix(".yaml")
    known = list_presets(presets=presets)
    if name not in known:
        raise ConfigError(f"no preset named {name!r}; known: {', '.join(known)}")
    src, dest = presets / f"{name}.yaml", Path(dest_dir) / f"{name}.yaml"
    if os.path.lexists(dest):  # a dangling link too: writing would create its target, wherever it points
        raise ConfigError(f"{dest} exists; remove it or copy to another directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    except FileExistsError:  # made between the check and here
        raise ConfigError(f"{dest} exists; remove it or copy to another directory") from None
    with os.fdopen(fd, "wb") as out:
        out.write(src.read_bytes())
    return dest


# ---------------------------------------------------------------- reading an experiment's dataset


@dataclass
class Source:
    """Raw records and the format their converter expects."""

    name: str
    format: str
    records: list


def dataset_sources(exp: Experiment, data: str | None = None, fmt: str | None = None) -> list[Source]:
    """The records the data steps read for each dataset of the experiment (or ``data``, a file in ``fmt``).

    A generated dataset is its file when made, else the generator's records; one whose generator
    needs a model (replay) and is not made yet is left out, with a warning.
    """
    if data:
        return [Source(data, fmt or "xtuner", read_records(data))]
    sources = []
    for part in exp.mixture:
        ds, made = exp.datasets[part.name], dataset_file(part.name, exp.datasets[part.name])
        if (ds.generated or ds.hub and not ds.path) and Path(made).is_file():
            sources.append(Source(made, "xtuner", read_records(made)))
        elif ds.generator in GENERATORS:
            sources.append(
                Source(f"datasets.{part.name} ({ds.generator})", "xtuner", GENERATORS[ds.generator](**(ds.spec or {})))
            )
        elif ds.generated:
            log.warning(
                "datasets.%s: %s is not made yet (run `snaketune %s`); not checked",
                part.name,
                made,
                ds.step.replace("_", "-"),
            )
        elif ds.path:
            sources.append(Source(ds.path, ds.format, read_records(ds.path)))
        else:
            sources.append(Source(f"hub dataset {ds.hub}", ds.format, load_hub_dataset(ds.hub, split=ds.split)))
    return sources


def conversations(source: Source) -> Iterator[tuple[int, list[dict] | None, DataError | None]]:
    """(record index, its conversation or None when the format drops it, its error)."""
    try:
        convert = CONVERTERS[source.format]
    except KeyError:
        raise ConfigError(f"unknown dataset format {source.format!r}; known: {', '.join(CONVERTERS)}") from None
    for index, rec in enumerate(source.records):
        try:
            turns = convert(rec, source.name, index)
            yield (
                index,
                (validate_conversation({"conversation": turns}, source.name, index)["conversation"] if turns else None),
                None,
            )
        except DataError as err:
            yield index, None, err


def tokenizer_dir(exp: Experiment, layout: Layout, model: str | None = None) -> str | None:
    """Where the experiment's tokenizer is: ``model``, the fetched model, or a local model's own path."""
    for candidate in (model, layout.model_dir, exp.model.path if exp.model.source == "local" else None):
        if candidate and Path(candidate).is_dir():
            return str(candidate)
    return None


# ---------------------------------------------------------------- check-custom-dataset


@dataclass
class DatasetReport:
    source: str
    records: int = 0
    dropped_by_format: int = 0
    errors: list[DataError] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # tokens per valid record, before truncation
    truncated: int = 0
    nothing_to_learn: int = 0

    @property
    def valid(self) -> int:
        return self.records - self.dropped_by_format - len(self.errors)

    @property
    def ok(self) -> bool:
        """Bad data: an invalid record, or nothing at all to train on."""
        return not self.errors and self.valid - self.nothing_to_learn > 0


def check_dataset(source: Source, tokenizer=None, template: str = "", max_length: int = 0) -> DatasetReport:
    """Validate every record; with a tokenizer, also their token lengths under ``template`` and ``max_length``."""
    report = DatasetReport(source.name, records=len(source.records))
    for _, turns, error in conversations(source):
        if error:
            report.errors.append(error)
        elif turns is None:
            report.dropped_by_format += 1
        elif tokenizer is not None:
            enc = encode_conversation(turns, tokenizer, template, max_length)
            report.lengths.append(len(enc.input_ids) + enc.truncated)
            report.truncated += enc.truncated > 0
            report.nothing_to_learn += all(label == IGNORE_INDEX for label in enc.labels)
    return report


def histogram(values: list[int], bins: int = 10, width: int = 40) -> list[str]:
    """A text histogram: one line per bin, ``lo-hi | #### count``."""
    lo, hi = min(values), max(values)
    step = max(1, -(-(hi - lo + 1) // bins))
    counts: dict[int, int] = {}
    for v in values:
        counts[(v - lo) // step] = counts.get((v - lo) // step, 0) + 1
    top = max(counts.values())
    digits = len(str(hi))
    lines = []
    for b in range(max(counts) + 1):
        n = counts.get(b, 0)
        bar = "#" * (round(n / top * width) if n else 0)
        lines.append(f"{lo + b * step:>{digits}}-{lo + (b + 1) * step - 1:<{digits}} | {bar} {n}")
    return lines


def print_report(
    report: DatasetReport, out: TextIO, *, tokens_from: str | None, template: str, max_length: int, max_errors: int = 20
) -> None:
    p = functools.partial(print, file=out)
    p(
        f"{report.source}: {report.records} records, {report.valid} valid, {len(report.errors)} invalid"
        + (f", {report.dropped_by_format} dropped by the format's map function" if report.dropped_by_format else "")
    )
    for err in report.errors[:max_errors]:
        p(f"  INVALID {err}")
    if len(report.errors) > max_errors:
        p(f"  ... and {len(report.errors) - max_errors} more invalid records")
    if tokens_from is None:
        p("token lengths: skipped, the model is not fetched yet (run `snaketune fetch-model`, or give --model DIR)")
    elif report.lengths:
        n, lengths = len(report.lengths), report.lengths
        p(
            f"token lengths (tokenizer {tokens_from}, template {template}):"
            f" min {min(lengths)}, median {statistics.median(lengths):g}, mean {statistics.mean(lengths):.1f},"
            f" max {max(lengths)}"
        )
        for line in histogram(lengths):
            p(f"  {line}")
        p(f"{report.truncated} of {n} records are longer than max_length {max_length} and would be truncated")
        p(
            f"{report.nothing_to_learn} of {n} records have nothing to learn (no supervised token within "
            f"max_length {max_length}); training drops them"
        )
    p("OK" if report.ok else "BAD DATA: fix the records above" if report.errors else "BAD DATA: nothing to train on")


# ---------------------------------------------------------------- log-dataset


def marked_text(enc: Encoded, tokenizer) -> str:
    """The decoded sample with every run of supervised tokens between ⟦ and ⟧."""
    out, run, supervised = [], [], None
    for token, label in [*zip(enc.input_ids, enc.labels), (None, None)]:
        is_sup = label is not None and label != IGNORE_INDEX
        if run and (token is None or is_sup != supervised):
            text = tokenizer.decode(run, skip_special_tokens=False)
            out.append(f"{SUPERVISED[0]}{text}{SUPERVISED[1]}" if supervised else text)
            run = []
        run.append(token)
        supervised = is_sup
    return "".join(out)


def log_samples(
    sources: list[Source], tokenizer, template: str, max_length: int, n: int, show: str, out: TextIO
) -> int:
    """Print the first ``n`` valid records as training encodes them; returns how many were printed."""
    if show not in SHOW:
        raise ConfigError(f"--show {show!r}: choose one of {', '.join(SHOW)}")
    shown = 0
    for source in sources:
        for index, turns, error in conversations(source):
            if shown == n:
                return shown
            if error:
                raise error
            if turns is None:
                continue
            enc = encode_conversation(turns, tokenizer, template, max_length)
            cut = f", {enc.truncated} cut off at max_length {max_length}" if enc.truncated else ""
            print(f"{'#' * 20} {source.name}, record {index} ({len(enc.input_ids)} tokens{cut}) {'#' * 20}", file=out)
            views = {
                "text": tokenizer.decode(enc.input_ids, skip_special_tokens=False),
                "masked_text": marked_text(enc, tokenizer),
                "input_ids": str(enc.input_ids),
                "labels": str(enc.labels),
            }
            for name, view in views.items():
                if show in (name, "all"):
                    print(f"{'-' * 8} {name} {'-' * 8}", file=out)
                    print(view, file=out)
            shown += 1
    return shown
