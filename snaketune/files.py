"""Writing files and directories so that a crash never leaves half of one, and JSON-lines logs.

Every output is written under a temporary name beside its destination and
renamed into place (``os.replace`` is atomic on one file system), so a reader,
a re-run or Snakemake sees either the old file or the whole new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary file beside ``path`` (its directory made); once the block is done it
    becomes ``path``. On failure it is removed and an earlier ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, creating its directory."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 1) -> None:
    write_text(path, json.dumps(data, indent=indent, ensure_ascii=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``out``; on success it becomes ``out``.

    With ``replace`` an existing ``out`` is removed only once the new one is
    complete; without it an existing ``out`` is an error (nothing is touched).
    On failure the temporary directory is removed and ``out`` is left as it was.
    """
    out = Path(out)
    if not replace and (out.exists() or out.is_symlink()):
        raise FileExistsError(f"{out} already exists; remove it to make it again")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's private 0700 would outlive the rename
    lock = os.open(tmp, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)  # held while it is written: remove_stale_tmp_dirs leaves it alone
    try:
        yield tmp
        if out.is_symlink() or out.is_file():
            out.unlink()
        elif out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)


def remove_stale_tmp_dirs(out: str | os.PathLike) -> list[Path]:
    """Remove the temporary directories that killed writers of ``out`` left beside it.

    Only :func:`atomic_dir`'s own names for this ``out`` (``.NAME.XXXXXXXX.tmp``) are candidates,
    and only those no living writer holds locked; another output's are never touched.
    """
    out = Path(out)
    own = re.compile(rf"\.{re.escape(out.name)}\.[a-z0-9_]{{8}}\.tmp")
    removed = []
    for tmp in out.parent.iterdir() if out.parent.is_dir() else ():
        if not own.fullmatch(tmp.name) or tmp.is_symlink() or not tmp.is_dir():
            continue
        fd = os.open(tmp, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # being written now
        finally:
            os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


# ---------------------------------------------------------------- JSON lines


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """One line per event (a training step, an evaluation); a crash loses at most the line being written."""
    with Path(path).open("a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")


def filter_jsonl(path: str | os.PathLike, keep: Callable[[dict], bool]) -> None:
    """Keep only the rows for which ``keep`` is true (e.g. the steps before a resume point)."""
    if Path(path).exists():
        write_jsonl(path, [r for r in read_jsonl(path) if keep(r)])
