"""Error types: all in snaketune/errors.py under one base class, and the job log's one line with a hint."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from snaketune import errors
from snaketune.joblog import job

PACKAGE = Path(errors.__file__).parent


def test_every_error_type_of_the_package_is_in_errors_and_derives_from_the_base():
    ours = {n for n, t in vars(errors).items() if isinstance(t, type) and issubclass(t, Exception)}

    def an_error(base: ast.expr) -> bool:  # Error, Exception, or one of ours (UnsafeCheckpoint), bare or dotted
        name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else ""
        return name.endswith(("Error", "Exception")) or name in ours

    defined_elsewhere = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and name != "errors.py" and any(an_error(b) for b in node.bases):
                defined_elsewhere.append(f"{name}.{node.name}")
    assert defined_elsewhere == []
    types = [t for t in vars(errors).values() if isinstance(t, type) and issubclass(t, Exception)]
    assert len(types) >= 9 and all(issubclass(t, errors.SnaketuneError) for t in types)


def test_a_snaketune_error_is_one_line_and_its_hint(capsys):
    with pytest.raises(SystemExit) as exit, job(None):
        raise errors.CheckFailed(
            "evaluation checks failed:\n- identity 50% below 90%\n- leakage 9% above 5%", hint="see the log"
        )
    assert exit.value.code == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].endswith(
        "ERROR snaketune: CheckFailed: evaluation checks failed: identity 50% below 90%; leakage 9% above 5% "
        "Hint: see the log"
    )


def test_a_hint_already_in_the_message_is_not_repeated():
    err = errors.DataError("d.json", 3, "conversation", "missing", "add the field")
    assert err.one_line() == "d.json, record 3, field 'conversation': missing. Fix: add the field"
    assert err.hint == "add the field" and isinstance(err, ValueError)


def test_any_other_error_keeps_its_traceback(capsys):
    with pytest.raises(KeyError), job(None):
        raise KeyError("x")
    err = capsys.readouterr().err
    assert "unexpected error" in err and "Traceback (most recent call last)" in err


def test_ctrl_c_in_a_command_is_one_line_and_the_sigint_exit_status(capsys):
    """Ctrl-C while a command works (e.g. while `snaketune chat` loads the model) is the user's stop:
    no traceback, exit 130 as a shell reports SIGINT."""
    with pytest.raises(SystemExit) as exit, job(None):
        raise KeyboardInterrupt
    assert exit.value.code == 130
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].endswith("ERROR snaketune: interrupted")
