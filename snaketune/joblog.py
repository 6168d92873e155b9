"""Logging for a step: to its job's log file (rank 0) and stderr, failures included.

Snakemake points a failing job's user at its log file, so the error goes
there: one clear line and its hint for the errors snaketune raises on purpose
(:class:`~snaketune.errors.SnaketuneError`: bad data, bad config, no network,
a failed check), the full traceback for anything else.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from .dist import rank
from .errors import SnaketuneError

log = logging.getLogger("snaketune")


def rank_log(log_file: str | Path, rank_: int) -> Path:
    """Where rank ``rank_`` (not 0) of a training logs: beside the job's log, ``<name>.rank<N>.log``."""
    path = Path(log_file)
    return path.with_name(f"{path.stem}.rank{rank_}{path.suffix or '.log'}")


def setup(log_file: str | None) -> None:
    """Rank 0 (or a lone process) logs to the file; every other rank to its own file beside it
    (:func:`rank_log`), printing only warnings."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if rank() != 0:
        handlers[0].setLevel(logging.WARNING)
        if log_file:
            handlers.append(logging.FileHandler(rank_log(log_file, rank()), mode="a", encoding="utf-8"))
        logging.basicConfig(
            level=logging.INFO,
            handlers=handlers,
            force=True,
            format=f"%(asctime)s rank{rank()} %(levelname)s %(name)s: %(message)s",
        )
        return
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="a", encoding="utf-8"))
    logging.basicConfig(
        level=logging.INFO, handlers=handlers, force=True, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.captureWarnings(True)


# Errors of the user's making outside snaketune's own: their message names the path.
EXPECTED_OS_ERRORS = (FileNotFoundError, FileExistsError)


def one_line(err: BaseException) -> str:
    """``Type: message`` on one line, plus the hint of an error that carries one."""
    text = err.one_line() if isinstance(err, SnaketuneError) else str(err)
    return f"{type(err).__name__}: {text}"


@contextlib.contextmanager
def job(log_file: str | None) -> Iterator[None]:
    """Run a step with logging set up; a failure is logged, then exits non-zero."""
    setup(log_file)
    try:
        yield
    except (SnaketuneError, *EXPECTED_OS_ERRORS) as err:
        log.error("%s", one_line(err))
        logging.shutdown()
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        # Ctrl-C is the user's own stop, not a fault: one line, and the shell's exit status for SIGINT.
        log.error("interrupted")
        logging.shutdown()
        raise SystemExit(130) from None
    except Exception:
        log.exception("unexpected error")
        logging.shutdown()
        raise
