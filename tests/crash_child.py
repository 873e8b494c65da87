"""Run a ``store`` verb and kill itself at a named point: the child of the crash tests.

    python tests/crash_child.py POINT SIGNAL [HOLD_DIR] -- store-args...

POINT names a place in ingest or tokenize-catalogue (see :data:`POINTS`); SIGNAL is
``KILL`` or ``TERM``. At the point the process sends itself the signal, so every kill
lands at the same place on every run (no sleeps, no races). POINT ``hold`` instead
stops inside tokenize-catalogue's writing section (the writer lock held) until the file
``HOLD_DIR/go`` exists, after writing ``HOLD_DIR/holding``: the concurrency tests use
it to keep a first writer busy while a second one starts.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from store_core import workspace

SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM}


def _die(sig: signal.Signals) -> None:
    sys.stderr.write(f"crash_child: sending {sig.name} to myself\n")
    sys.stderr.flush()
    os.kill(os.getpid(), sig)
    time.sleep(0.5)  # SIGTERM is raised at the next bytecode; SIGKILL never returns


def _after(module: str, name: str, sig: signal.Signals, calls: int = 1) -> None:
    """Kill right after the ``calls``-th call of ``module.name`` returned (modules are
    imported here, so an ingest child never imports torch)."""
    target = importlib.import_module(module)
    real: Callable[..., Any] = getattr(target, name)
    seen = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        seen[0] += 1
        if seen[0] == calls:
            _die(sig)
        return result

    setattr(target, name, wrapper)


def _before(module: str, name: str, sig: signal.Signals) -> None:
    """Kill when ``module.name`` is called, before it runs."""
    target = importlib.import_module(module)
    real: Callable[..., Any] = getattr(target, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _die(sig)
        return real(*args, **kwargs)

    setattr(target, name, wrapper)


def _during_swap(sig: signal.Signals, when: str) -> None:
    """Kill inside the local directory swap: after the target was moved aside
    (``between-renames``) or once the new copy is in place, before the old one is
    deleted (``before-old-removed``)."""
    real_swap = workspace._swap_local

    def swap(staging: str, target: str) -> None:
        real_rename, real_rmtree = os.rename, workspace.shutil.rmtree

        def rename(src: str, dst: str) -> None:
            real_rename(src, dst)
            if when == "between-renames" and workspace.OLD_INFIX in dst:
                _die(sig)

        def rmtree(path: str, *args: Any, **kwargs: Any) -> None:
            if when == "before-old-removed" and workspace.OLD_INFIX in path:
                _die(sig)
            real_rmtree(path, *args, **kwargs)

        workspace.os.rename = rename  # type: ignore[assignment]
        workspace.shutil.rmtree = rmtree  # type: ignore[assignment]
        try:
            real_swap(staging, target)
        finally:
            workspace.os.rename = real_rename
            workspace.shutil.rmtree = real_rmtree

    workspace._swap_local = swap


def _in_write_transaction(sig: signal.Signals) -> None:
    """Kill inside tokenize-catalogue's DuckDB transaction, every row inserted, before
    the version row and COMMIT (the ``before_commit`` hook)."""
    from store_core import storage

    real = storage.write_semantic_id_version

    def write(*args: Any, **kwargs: Any) -> int:
        return real(*args, **kwargs, before_commit=lambda version: _die(sig))

    storage.write_semantic_id_version = write


def _hold(hold_dir: Path) -> None:
    from store_core import catalogue

    real = catalogue._base_rows

    def base_rows(*args: Any, **kwargs: Any) -> Any:
        (hold_dir / "holding").write_text(str(os.getpid()))
        while not (hold_dir / "go").exists():
            time.sleep(0.05)
        return real(*args, **kwargs)

    catalogue._base_rows = base_rows


POINTS: dict[str, Callable[[signal.Signals], None]] = {
    # ingest: staging half written, staging complete, the swap, DuckDB items
    "ingest-parquet-written": lambda s: _after("store_core.ingest", "_write_parquet", s, calls=2),
    "ingest-staged": lambda s: _before("store_core.workspace", "_publish", s),
    "ingest-between-renames": lambda s: _during_swap(s, "between-renames"),
    "ingest-before-old-removed": lambda s: _during_swap(s, "before-old-removed"),
    "ingest-in-transaction": lambda s: _after("store_core.storage.items", "_counts", s),
    "ingest-after-commit": lambda s: _after("store_core.storage", "upsert_items", s),
    # tokenize-catalogue: rows being staged, rows staged, inside the transaction,
    # committed (staging not yet removed)
    "catalogue-first-batch": lambda s: _after("store_core.catalogue", "semantic_id_rows", s),
    "catalogue-rows-staged": lambda s: _before(
        "store_core.storage", "write_semantic_id_version", s
    ),
    "catalogue-in-transaction": _in_write_transaction,
    "catalogue-after-commit": lambda s: _after(
        "store_core.storage", "write_semantic_id_version", s
    ),
}


def main(argv: list[str]) -> None:
    split = argv.index("--")
    point, sig_name, *rest = argv[:split]
    if point == "hold":
        _hold(Path(rest[0]))
    else:
        POINTS[point](SIGNALS[sig_name])
    from store_cli.app import app

    app(argv[split + 1 :], prog_name="store")


if __name__ == "__main__":
    main(sys.argv[1:])
