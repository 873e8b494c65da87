"""store_core.signals in-process: SIGTERM raises Terminated, deferred() holds it back."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import pytest

from store_core import signals


@pytest.fixture(autouse=True)
def default_sigterm() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_handle_sigterm_raises_terminated_once_and_restores_the_default() -> None:
    unwound: list[str] = []
    with pytest.raises(signals.Terminated) as info, signals.handle_sigterm():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            pytest.fail("SIGTERM did not interrupt")
        finally:
            unwound.append("finally ran")
            os.kill(os.getpid(), signal.SIGTERM)  # a repeat during cleanup is ignored
    assert unwound == ["finally ran"]
    assert isinstance(info.value, KeyboardInterrupt)  # every Ctrl-C path applies
    assert signals.exit_status(info.value) == 143
    assert signals.exit_status(KeyboardInterrupt()) == 130
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_handle_sigterm_leaves_an_existing_handler_alone() -> None:
    seen: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    with signals.handle_sigterm():
        os.kill(os.getpid(), signal.SIGTERM)
    assert seen == [signal.SIGTERM]


def test_handle_sigterm_outside_the_main_thread_changes_nothing() -> None:
    handlers: list[object] = []

    def body() -> None:
        with signals.handle_sigterm():
            handlers.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert handlers == [signal.SIG_DFL]


def test_deferred_delivers_the_signal_after_the_critical_section() -> None:
    steps: list[str] = []
    with pytest.raises(signals.Terminated), signals.handle_sigterm():
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            steps.append("first rename")
            steps.append("second rename")
        steps.append("after the section")  # not reached: delivered on leaving it
    assert steps == ["first rename", "second rename"]
