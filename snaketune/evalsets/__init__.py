"""Question sets shipped with snaketune, and a user's own in the same format.

``general.jsonl`` holds short general questions (not about identity) written
for this project, in Chinese and English: facts, arithmetic, instructions and
translation, each with the answer words accepted as correct (none where an
answer has no key, e.g. "Write one sentence about spring."). A line is
``{"question", "answers", "split", "kind", "lang"}``; ``split`` says what a
question may be used for: ``train`` questions may become training data (the
``replay`` generator answers them), ``eval`` questions are only ever asked by
the evaluation and never enter training data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "eval")
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Question:
    question: str
    answers: tuple[str, ...] = ()  # accepted answer words; empty: no answer key
    split: str = "eval"
    kind: str = ""
    lang: str = ""


def shipped() -> list[str]:
    """Names of the question sets shipped with snaketune."""
    return sorted(p.stem for p in HERE.glob("*.jsonl"))


def path_of(name_or_path: str | os.PathLike) -> Path:
    """A shipped set's file by name (``general``), else the path itself."""
    name = str(name_or_path)
    return HERE / f"{name}.jsonl" if name in shipped() else Path(name)


def load(name_or_path: str | os.PathLike, split: str | None = None) -> list[Question]:
    """The questions of a set (all, or one split); a line without ``split`` is evaluation-only."""
    from .. import data

    path = path_of(name_or_path)
    if not path.exists():
        raise data.DataError(
            path,
            None,
            None,
            "no such question set",
            f"name one shipped with snaketune ({', '.join(shipped())}) or a .jsonl file",
        )
    questions = []
    for index, rec in enumerate(data.read_records(path)):
        fix = 'write {"question": "...", "answers": ["accepted", ...], "split": "train" or "eval"}'
        if not isinstance(rec, dict) or not isinstance(rec.get("question"), str) or not rec["question"].strip():
            raise data.DataError(path, index, "question", "missing or not a non-empty string", fix)
        answers = rec.get("answers") or []
        if not isinstance(answers, list) or not all(isinstance(a, str) and a.strip() for a in answers):
            raise data.DataError(path, index, "answers", "not a list of non-empty strings", fix)
        if rec.get("split", "eval") not in SPLITS:
            raise data.DataError(path, index, "split", f"is {rec['split']!r}", fix)
        questions.append(
            Question(
                rec["question"], tuple(answers), rec.get("split", "eval"), rec.get("kind", ""), rec.get("lang", "")
            )
        )
    return [q for q in questions if split is None or q.split == split]
