"""Datasets in XTuner's ``conversation`` format: readers, converters, validation.

A record is ``{"conversation": [turn, ...]}`` and a turn is
``{"system": str (optional), "input": str, "output": str,
"output_with_loss": bool (optional), "end_of_turn": bool (optional; false
on the last turn: the output was cut off, no end-of-turn is trained)}``. Converters from other formats follow
XTuner's dataset map functions (``xtuner/dataset/map_fns``), so a user's
alpaca, oasst1 or OpenAI ``messages`` file gives the same conversations here
as there.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import DataError
from .files import write_json, write_jsonl

Record = dict[str, Any]


# A record's optional training loss: "ce" (the default) or "kl" (mix_data writes it for a mixture
# part with loss: kl; snaketune.train distils the base model's next-token distribution there).
LOSS_KEY = "loss"
LOSSES = ("ce", "kl")  # also what a mixture part's loss may be (config.DatasetPart.loss)


# ---------------------------------------------------------------- reading


class _Object(dict):
    """A JSON object that held a key twice: ``json`` alone would keep the last value without a word."""

    duplicate: str


def _duplicate_key(value: Any) -> str | None:
    """Where in ``value`` an object holds a key twice (``conversation[0].input``), or None; a walk
    with a stack, since a record may nest deeper than Python's recursion limit allows."""
    stack = [(value, "")]
    while stack:
        node, where = stack.pop()
        if isinstance(node, _Object):
            return f"{where}.{node.duplicate}".lstrip(".")
        if isinstance(node, dict):
            stack += [(child, f"{where}.{key}") for key, child in node.items()]
        elif isinstance(node, list):
            stack += [(child, f"{where}[{i}]") for i, child in enumerate(node)]
    return None


def _parse(text: str, path: Path, index: int | None, where: str) -> Any:
    """One JSON document (a file, or a line of a JSON-lines file) with duplicate keys and nesting
    deeper than the parser can follow reported as a bad record, never as a traceback or a silent choice."""
    duplicates = []

    def keep_duplicates(pairs: list[tuple[str, Any]]) -> dict:
        obj = dict(pairs)
        if len(obj) < len(pairs):
            obj, seen = _Object(obj), set()
            obj.duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
            duplicates.append(obj)
        return obj

    try:
        data = json.loads(text, object_pairs_hook=keep_duplicates)
    except json.JSONDecodeError as err:
        if index is None:
            problem = f"not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
            fix = "the file must hold a JSON list of records, or be a .jsonl file with one record per line"
        else:
            problem, fix = f"{where} is not valid JSON ({err.msg})", "write one JSON object per line"
        raise DataError(path, index, None, problem, fix) from None
    except RecursionError:
        raise DataError(
            path,
            index,
            None,
            f"{where} nests arrays or objects too deeply to read",
            "a record needs a few levels only (a list of turns of strings): remove the deep nesting",
        ) from None
    if duplicates:
        records = data if index is None and isinstance(data, list) else [data]
        i, key = next((i, key) for i, rec in enumerate(records) if (key := _duplicate_key(rec)))
        raise DataError(
            path, i if index is None else index, key, "appears twice in one object", "keep one of the two values"
        )
    return data


def read_records(path: str | os.PathLike) -> list[Record]:
    """Read a local JSON list or JSON-lines file; errors name the line or record."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, None, "file not found", "check the dataset's 'path' in the config")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(
            path, None, None, f"not UTF-8 text (byte {err.start}, line {line}: {err.reason})", "save the file as UTF-8"
        ) from None
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                records.append(_parse(line, path, len(records), f"line {lineno}"))
        return records
    data = _parse(text, path, None, "the file")
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(path, None, None, f"top level is a {type(data).__name__}", "make it a JSON list of records")
    return data


def load_hub_dataset(name: str, split: str = "train", revision: str | None = None) -> list[Record]:
    """Load a dataset by hub name through ``datasets`` (needs the internet)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split, revision=revision)
    except Exception as err:  # the hub client raises many types for "offline"
        raise RuntimeError(
            f"could not load dataset {name!r} from the hub ({type(err).__name__}: {err}). "
            "Offline, download it once elsewhere and set the dataset's 'path' to the local file."
        ) from err
    return [dict(r) for r in ds]


def write_records(records: Iterable[Record], path: str | os.PathLike) -> None:
    """Write JSON or JSON lines (by suffix) atomically: a failure leaves no half file."""
    if Path(path).suffix == ".jsonl":
        write_jsonl(path, records)
    else:
        write_json(path, list(records))


# ---------------------------------------------------------------- checks


def _need_str(rec: dict, key: str, path, index: int, field: str, fix: str, *, optional: bool = False) -> str:
    if key not in rec or rec[key] is None:
        if optional:
            return ""
        raise DataError(path, index, field, "missing", fix)
    value = rec[key]
    if not isinstance(value, str):
        raise DataError(path, index, field, f"is a {type(value).__name__}, not a string", fix)
    return value


def _need_dict(rec: Any, path, index: int, field: str | None, what: str) -> dict:
    if not isinstance(rec, dict):
        raise DataError(
            path, index, field, f"is a {type(rec).__name__}, not an object", f"make it a JSON object ({what})"
        )
    return rec


def _validate_turn(turn: Any, t: int, n_turns: int, path, index: int) -> dict:
    """One turn of a ``conversation``: string fields, boolean flags, and only the last one cut off."""
    field = f"conversation[{t}]"
    turn = _need_dict(turn, path, index, field, '{"input": ..., "output": ...}')
    fix = "give every turn string 'input' and 'output' fields (and optionally 'system')"
    clean = {
        "system": _need_str(turn, "system", path, index, f"{field}.system", fix, optional=True),
        "input": _need_str(turn, "input", path, index, f"{field}.input", fix),
        "output": _need_str(turn, "output", path, index, f"{field}.output", fix),
    }
    if not clean["input"].strip() and not clean["output"].strip():
        raise DataError(
            path, index, field, "input and output are both empty", "write the turn's text, or delete the turn"
        )
    for key in ("output_with_loss", "end_of_turn"):
        if key in turn:
            flag = turn[key]
            if not isinstance(flag, bool):
                raise DataError(path, index, f"{field}.{key}", f"is {flag!r}", "use true or false")
            clean[key] = flag
    if clean.get("end_of_turn") is False and t != n_turns - 1:
        raise DataError(
            path,
            index,
            f"{field}.end_of_turn",
            "is false on a turn that another turn follows",
            "only a conversation's last answer may be cut off",
        )
    return clean


def validate_conversation(rec: Any, path, index: int) -> Record:
    """Check one XTuner ``conversation`` record; return it normalised."""
    rec = _need_dict(rec, path, index, None, '{"conversation": [...]}')
    if "conversation" not in rec:
        raise DataError(
            path,
            index,
            "conversation",
            "missing",
            'each record needs "conversation": a list of {"input", "output"} turns '
            "(for alpaca, oasst1 or OpenAI files set the dataset's 'format')",
        )
    turns = rec["conversation"]
    if not isinstance(turns, list) or not turns:
        raise DataError(
            path,
            index,
            "conversation",
            "must be a non-empty list of turns",
            'write [{"input": "...", "output": "..."}]',
        )
    out = [_validate_turn(turn, t, len(turns), path, index) for t, turn in enumerate(turns)]
    if not any(t.get("output_with_loss", True) for t in out):
        raise DataError(
            path,
            index,
            "conversation",
            "no turn is trained on (all output_with_loss are false)",
            "drop the record or set output_with_loss true on one turn",
        )
    if LOSS_KEY not in rec:
        return {"conversation": out}
    if rec[LOSS_KEY] not in LOSSES:
        raise DataError(
            path,
            index,
            LOSS_KEY,
            f"is {rec[LOSS_KEY]!r}",
            'use "ce" (cross-entropy on the answers) or "kl" (distil the base model at the answers)',
        )
    return {"conversation": out, LOSS_KEY: rec[LOSS_KEY]}


# ---------------------------------------------------------------- converters
# Each takes one raw record and returns a conversation list (possibly empty,
# meaning "drop this record", as XTuner's map functions do).


def from_xtuner(rec, path, index):
    return validate_conversation(rec, path, index)["conversation"]


def from_alpaca(rec, path, index):
    rec = _need_dict(rec, path, index, None, "an alpaca record")
    fix = "alpaca records need string 'instruction' and 'output' fields and an optional 'input'"
    instruction = _need_str(rec, "instruction", path, index, "instruction", fix)
    inp = _need_str(rec, "input", path, index, "input", fix, optional=True)
    output = _need_str(rec, "output", path, index, "output", fix)
    if output == "<nooutput>":
        return []
    return [{"system": "", "input": f"{instruction}\n{inp}", "output": output}]


def from_oasst1(rec, path, index):
    rec = _need_dict(rec, path, index, None, "an openassistant-guanaco record")
    text = _need_str(
        rec, "text", path, index, "text", "oasst1 records need a 'text' field with '### Human: ... ### Assistant: ...'"
    )
    parts = []
    for sentence in text.strip().split("###"):
        sentence = sentence.strip()
        if sentence.startswith("Human:"):
            parts.append(sentence[len("Human:") :].strip())
        elif sentence.startswith("Assistant:"):
            parts.append(sentence[len("Assistant:") :].strip())
    if len(parts) % 2:
        parts.pop()  # a last human turn has no answer to learn from
    return [{"system": "", "input": parts[i], "output": parts[i + 1]} for i in range(0, len(parts), 2)]


def from_openai(rec, path, index):
    rec = _need_dict(rec, path, index, None, '{"messages": [...]}')
    messages = rec.get("messages")
    if not isinstance(messages, list):
        raise DataError(
            path,
            index,
            "messages",
            "missing or not a list",
            'write "messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]',
        )
    i = 0
    while i < len(messages) and isinstance(messages[i], dict) and messages[i].get("role") == "assistant":
        i += 1
    conversation, system, inp = [], "", ""
    for m in range(i, len(messages)):
        field = f"messages[{m}]"
        msg = _need_dict(messages[m], path, index, field, '{"role": ..., "content": ...}')
        content = _need_str(msg, "content", path, index, f"{field}.content", "every message needs a string 'content'")
        role = msg.get("role")
        if role == "system":
            system = content
        elif role == "user":
            inp += content
        elif role == "assistant":
            turn = {"system": system, "input": inp, "output": content}
            if "loss" in msg:
                turn["output_with_loss"] = str(msg["loss"]).lower() == "true"
            conversation.append(turn)
            system, inp = "", ""
        else:
            raise DataError(path, index, f"{field}.role", f"unknown role {role!r}", "use system, user or assistant")
    return conversation


CONVERTERS: dict[str, Callable[[Any, Any, int], list]] = {
    "xtuner": from_xtuner,
    "alpaca": from_alpaca,
    "oasst1": from_oasst1,
    "openai": from_openai,
}


def convert(records: Iterable[Any], fmt: str, path: str | os.PathLike) -> Iterator[Record]:
    """Convert raw records of format ``fmt``; validate each result; drop empty ones."""
    try:
        fn = CONVERTERS[fmt]
    except KeyError:
        raise ValueError(f"unknown dataset format {fmt!r}; known: {', '.join(CONVERTERS)}") from None
    for index, rec in enumerate(records):
        conversation = fn(rec, path, index)
        if conversation:
            yield validate_conversation({"conversation": conversation}, path, index)


def convert_file(
    source: str, fmt: str, out: str | os.PathLike, *, split: str = "train", revision: str | None = None
) -> int:
    """Read ``source`` (a local file, else a hub dataset name), convert, write ``out``."""
    if Path(source).exists() or Path(source).suffix in {".json", ".jsonl"}:
        raw = read_records(source)
    else:
        raw = load_hub_dataset(source, split=split, revision=revision)
    records = list(convert(raw, fmt, source))
    if not records:
        raise DataError(source, None, None, "no usable record after conversion", "check the dataset's 'format'")
    write_records(records, out)
    return len(records)


# ---------------------------------------------------------------- self-cognition

DEFAULT_QUESTIONS = {
    "zh": ["你是谁", "请你介绍一下你自己", "你叫什么名字"],
    "en": ["Who are you?", "Introduce yourself", "What is your name?"],
}


def self_cognition(
    *,
    name: str,
    owner: str,
    answers: dict[str, str],
    questions: dict[str, list[str]] | None = None,
    copies: int = 1,
    system: str = "",
    seed: int = 0,
) -> list[Record]:
    """The tutorial's "XXX的小助手" dataset: every question, ``copies`` times, shuffled.

    ``answers`` maps a language to an answer text that may use ``{name}`` and
    ``{owner}``; each question is answered in its own language.
    """
    questions = questions or DEFAULT_QUESTIONS
    if copies < 1:
        raise ValueError(f"copies must be at least 1, got {copies}")
    records = []
    for lang, qs in questions.items():
        if lang not in answers:
            raise ValueError(f"questions in language {lang!r} but no answer for it; add answers.{lang}")
        answer = answers[lang].format(name=name, owner=owner)
        for q in qs:
            records.append({"conversation": [{"system": system, "input": q, "output": answer}]})
    records = records * copies
    random.Random(seed).shuffle(records)
    return records


GENERATORS: dict[str, Callable[..., list[Record]]] = {"self_cognition": self_cognition}


# ---------------------------------------------------------------- replay (self-distillation)


def replay_records(
    answers: Iterable[tuple[str, str, bool]], *, system: str = "", unfinished: str = "open"
) -> tuple[list[Record], dict[str, int]]:
    """Records from a model's own (question, answer, stopped) triples, and how many of each kind.

    An answer that ran into max_new_tokens is kept ``open`` (``end_of_turn:
    false``: trained as the start of an answer, without an end-of-turn, so it
    teaches neither a stop there nor a shorter answer) or dropped. An empty
    answer is dropped.
    """
    if unfinished not in ("open", "drop"):
        raise ValueError(f"unfinished must be open or drop, got {unfinished!r}")
    records, counts = [], {"stopped": 0, "open": 0, "dropped": 0}
    for question, answer, stopped in answers:
        if not answer.strip() or not (stopped or unfinished == "open"):
            counts["dropped"] += 1
            continue
        turn = {"system": system, "input": question, "output": answer}
        if not stopped:
            turn["end_of_turn"] = False
        counts["stopped" if stopped else "open"] += 1
        records.append({"conversation": [turn]})
    return records, counts


# ---------------------------------------------------------------- mixtures


def mix(parts: list[tuple[str, list[Record], float]], seed: int = 0) -> tuple[list[Record], list[dict]]:
    """Concatenate datasets, each ``repeat`` times, as XTuner's ConcatDataset does (training shuffles).

    ``repeat`` 2 puts every record in twice; a fraction takes that share of
    the records once more, chosen with ``seed`` (0.5: a seeded half). Returns
    the records and, per dataset, how many it had and how many went in.
    """
    out, counts = [], []
    for i, (name, records, repeat) in enumerate(parts):
        whole = int(repeat)
        extra = round((repeat - whole) * len(records))
        chosen = sorted(random.Random(f"{seed}/{i}/{name}").sample(range(len(records)), extra))
        taken = records * whole + [records[j] for j in chosen]
        out += taken
        counts.append({"name": name, "repeat": repeat, "records": len(records), "used": len(taken)})
    return out, counts
