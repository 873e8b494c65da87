"""The guard between the ``store`` verbs and the terminal: an error is one ``error:``
line, no traceback, a non-zero exit status.

- usage errors (unknown option, invalid choice, bad number): :func:`one_line_usage_errors`
  through :class:`OneLineErrorsGroup`, exit status 2;
- user errors (:class:`store_core.errors.StoreError`), the machine's files, disk, network
  and memory, and the MLflow tracking backend: :func:`guard`, exit status 1;
- SIGTERM and Ctrl-C: :func:`guard`, exit status 143 or 130 once the verb cleaned up;
- log records that carry a user error lose their traceback (:class:`NoUserErrorTracebacks`,
  installed by :func:`setup_logging` unless ``--verbose``).

Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from typer._click.exceptions import NoArgsIsHelpError, UsageError  # typer vendors click
from typer.core import TyperGroup

from store_core import signals
from store_core.errors import StoreError
from store_core.redaction import RedactingFilter, redact

#: stderr: error lines, log records, progress.
err = Console(stderr=True, soft_wrap=True)


@contextmanager
def one_line_usage_errors() -> Iterator[None]:
    """Print a command-line usage error (unknown option, invalid choice, bad number) as
    one ``error:`` line, exit status 2, instead of click's usage box."""
    try:
        yield
    except NoArgsIsHelpError:
        raise  # `store` alone prints the help
    except UsageError as exc:
        message = " ".join(exc.format_message().split()).replace("Value error, ", "")
        if exc.ctx is not None and exc.ctx.command_path:
            message = f"{exc.ctx.command_path}: {message}"
        err.print(f"[bold red]error:[/] {escape(redact(message))}", highlight=False)
        raise typer.Exit(exc.exit_code) from None


class OneLineErrorsGroup(TyperGroup):
    """The ``store`` group: usage errors of the group and of every verb are one line."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: Any = None,
        **extra: Any,
    ) -> Any:
        with one_line_usage_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: Any) -> Any:
        with one_line_usage_errors():
            return super().invoke(ctx)


T = TypeVar("T")


class NoUserErrorTracebacks(logging.Filter):
    """Drops the traceback from a record that carries a user error (a StoreError, which
    Prefect's engine logs with its traceback when a flow of `store run` fails): the
    ``error:`` line says what is wrong. Not installed under ``--verbose``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], StoreError):
            record.exc_info, record.exc_text = None, None
        return True


#: Loggers whose records bypass the root handler: Prefect's run loggers (its own console
#: and API handlers).
PREFECT_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


def setup_logging(verbose: bool) -> None:
    handler = RichHandler(console=err, show_path=False, rich_tracebacks=False)
    handler.addFilter(RedactingFilter())  # credentials in URIs never reach the terminal
    if not verbose:
        quiet = NoUserErrorTracebacks()
        handler.addFilter(quiet)
        for name in PREFECT_RUN_LOGGERS:
            run_logger = logging.getLogger(name)
            for old in [f for f in run_logger.filters if isinstance(f, NoUserErrorTracebacks)]:
                run_logger.removeFilter(old)
            run_logger.addFilter(quiet)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[handler],
        force=True,
    )
    for noisy in ("httpx", "alembic", "urllib3", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def guard(fn: Callable[[], T]) -> T:
    """Run ``fn``; print user errors (StoreError, OSError from the machine's files, disk
    or network, running out of memory, errors of the MLflow tracking backend) as one line
    and exit 1; after SIGTERM or Ctrl-C (once ``fn`` has cleaned up) exit 143 or 130."""
    try:
        return fn()
    except StoreError as exc:
        err.print(f"[bold red]error:[/] {escape(redact(one_line(exc)))}", highlight=False)
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt as exc:
        err.print(f"[bold red]stopped:[/] {exc or 'interrupted'}", highlight=False)
        raise typer.Exit(code=signals.exit_status(exc)) from None
    except OSError as exc:
        # The machine's files, disk or network (missing, not permitted, full, read-only,
        # unreachable), not a bug here: one line naming the path; --verbose logs the
        # traceback.
        logging.getLogger(__name__).debug("OS error", exc_info=True)
        err.print(f"[bold red]error:[/] {escape(redact(os_error(exc)))}", highlight=False)
        raise typer.Exit(code=1) from None
    except Exception as exc:
        if out_of_memory(exc):
            logging.getLogger(__name__).debug("out of memory", exc_info=True)
            message = f"out of memory: {one_line(exc)} (lower the batch size or model size)"
            err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
            raise typer.Exit(code=1) from None
        if not type(exc).__module__.startswith("mlflow"):
            raise
        # The tracking backend (unreachable server, refused URI, broken store) is the
        # environment, not a bug here: one line; --verbose logs the traceback.
        logging.getLogger(__name__).debug("MLflow error", exc_info=True)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        err.print(f"[bold red]error:[/] MLflow tracking: {escape(redact(first))}", highlight=False)
        raise typer.Exit(code=1) from None


def one_line(exc: BaseException) -> str:
    """The error's text on one line (continuation lines joined with spaces)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def out_of_memory(exc: BaseException) -> bool:
    """A failed allocation: torch's OutOfMemoryError (GPU), its CPU allocator's
    RuntimeError, or MemoryError. What fits is the machine's, not a bug here."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


#: The words of an OSError raised without an errno (pyarrow, fsspec: ``FileNotFoundError(path)``).
OS_ERROR_WORDS: dict[type[OSError], int] = {
    FileNotFoundError: errno.ENOENT,
    PermissionError: errno.EACCES,
    IsADirectoryError: errno.EISDIR,
    NotADirectoryError: errno.ENOTDIR,
    FileExistsError: errno.EEXIST,
}


def os_error(exc: OSError) -> str:
    """``<what went wrong>: <path>`` on one line."""
    if exc.strerror:
        paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
        return f"{exc.strerror}: {' -> '.join(paths)}" if paths else exc.strerror
    for kind, code in OS_ERROR_WORDS.items():
        if isinstance(exc, kind):
            return f"{os.strerror(code)}: {one_line(exc)}"
    return f"{type(exc).__name__}: {one_line(exc)}"
