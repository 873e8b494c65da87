"""SIGTERM handled like Ctrl-C.

Prefect cancellation, Kubernetes eviction and Slurm's ``scancel`` stop a process with
SIGTERM, whose default action ends it on the spot: no ``finally`` runs, so MLflow runs
stay RUNNING, an SQLite journal is left behind and half-written files stay where they
are. Ctrl-C raises :class:`KeyboardInterrupt` instead, which unwinds every context
manager (MLflow runs are marked, DuckDB transactions rolled back, staging directories
removed). :func:`handle_sigterm` makes SIGTERM do the same: the handler raises
:class:`Terminated`, a :class:`KeyboardInterrupt`, in the main thread.

The CLI installs it for every verb (:func:`install`) and exits with
:data:`EXIT_TERMINATED` (143, 128 + SIGTERM, what a shell reports for a process killed by
SIGTERM); stage entry points use :func:`handle_sigterm`, which leaves an existing handler
alone (Prefect's flow engine installs its own, which raises its ``TerminationSignal`` and
reports the cancellation to the Prefect API; that unwinds the same way).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

logger = logging.getLogger(__name__)

#: Exit status after SIGTERM (128 + 15).
EXIT_TERMINATED = 128 + signal.SIGTERM
#: Exit status after Ctrl-C (128 + 2).
EXIT_INTERRUPTED = 128 + signal.SIGINT


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


_stopping = False


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    global _stopping
    if _stopping:
        # A second SIGTERM (a supervisor repeating itself) must not interrupt the cleanup
        # the first one started; SIGKILL remains for a process that does not stop.
        logger.warning("%s again: already stopping", signal.Signals(signum).name)
        return
    _stopping = True
    logger.warning(
        "%s received: stopping as on Ctrl-C (runs are marked, partial outputs removed)",
        signal.Signals(signum).name,
    )
    raise Terminated(signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def install() -> bool:
    """Make SIGTERM raise :class:`Terminated` in the main thread from now on.

    Returns False (and changes nothing) when called outside the main thread, where Python
    cannot install signal handlers.
    """
    global _stopping
    if not _in_main_thread():
        return False
    _stopping = False
    signal.signal(signal.SIGTERM, _raise_terminated)
    return True


@contextmanager
def handle_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` unless someone else already
    handles it (the CLI, Prefect's flow engine) or this is not the main thread; the
    previous handler is restored afterwards."""
    global _stopping
    if not _in_main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    _stopping = False
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGTERM and SIGINT back for a short critical section (a directory swap, a
    cleanup) and act on them when it ends, so the section is never left half done by
    anything short of SIGKILL.

    A signal that arrives meanwhile is recorded; on exit the previous handlers are put
    back and the first recorded signal is delivered again to this process. Outside the
    main thread the block runs unprotected.
    """
    if not _in_main_thread():
        yield
        return
    received: list[int] = []

    def record(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, record) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            os.kill(os.getpid(), received[0])


def exit_status(exc: KeyboardInterrupt) -> int:
    """The exit status for an interruption: 143 after SIGTERM, 130 after Ctrl-C."""
    return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
