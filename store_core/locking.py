"""One writer at a time per workspace.

Two writers on one workspace corrupt each other quietly: two ``tokenize-catalogue`` runs
both read version N as their base and both commit, the second a duplicate of the first
with wrong change counts; an ingest that swaps ``data/`` under a running training mixes
two catalogues. So every verb that writes into a workspace (ingest, both training
phases, tokenize-catalogue, and the pipeline flow around them) holds the workspace's
writer lock for as long as it reads its base and writes:

* ``<workspace>/.store-writer.lock``: an OS lock (``flock`` through the ``filelock``
  library). The kernel drops it when its holder dies, SIGKILL included, so a killed
  writer never wedges the workspace and there is nothing to clean up.
* ``<workspace>/.store-writer.json``: who holds it (pid, verb, host, start time), written
  atomically once the lock is taken and removed before it is released, so a second
  writer can say whom it waits for.

A second writer waits up to ``timeout_s`` (argument, else ``$STORE_WRITER_LOCK_TIMEOUT_S``,
else :data:`DEFAULT_TIMEOUT_S`) and then fails with :class:`WorkspaceLocked`, one line
naming the holder. The lock is re-entrant within a process (the pipeline flow holds it
around its stages, which take it again), and a process started by the holder for the
same work (the deepspeed ranks of a launched training phase) finds it through
``$STORE_WRITER_LOCK_HELD`` and does not wait for its own parent.

Readers (``store query``, ``recommend``, serving, evaluation) take no lock: DuckDB
versions are transactions, and Parquet outputs are swapped in whole.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil
from filelock import FileLock, Timeout

from store_core.errors import StoreError
from store_core.workspace import atomic_write_text, remove_stale_temporaries

logger = logging.getLogger(__name__)

LOCK_FILE = ".store-writer.lock"
HOLDER_FILE = ".store-writer.json"
TIMEOUT_ENV = "STORE_WRITER_LOCK_TIMEOUT_S"
HELD_ENV = "STORE_WRITER_LOCK_HELD"
#: How long a second writer waits by default (the same as for DuckDB's own file lock).
DEFAULT_TIMEOUT_S = 60.0


class WorkspaceLocked(StoreError):
    """Another process is writing into the workspace and did not finish in time."""


@dataclass(frozen=True)
class Holder:
    """Who holds a workspace's writer lock (the content of :data:`HOLDER_FILE`)."""

    pid: int
    verb: str  # what it runs: "ingest", "tokenize-catalogue", "pipeline (full)", ...
    host: str
    started_at: str  # ISO 8601, UTC, seconds

    def describe(self) -> str:
        return f"pid {self.pid} ({self.verb}) on {self.host}, started {self.started_at}"


@dataclass
class _Held:
    lock: FileLock
    depth: int


_held: dict[str, _Held] = {}
_registry = threading.Lock()


def _local_dir(workspace: str) -> str | None:
    if "://" in workspace and not workspace.startswith("file://"):
        return None
    return os.path.abspath(workspace.removeprefix("file://"))


def lock_timeout_s(timeout_s: float | None = None) -> float:
    """``timeout_s``, else ``$STORE_WRITER_LOCK_TIMEOUT_S``, else the default.

    Raises :class:`StoreError` when the variable is not a number.
    """
    if timeout_s is not None:
        return timeout_s
    raw = os.environ.get(TIMEOUT_ENV)
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        return float(raw)
    except ValueError:
        raise StoreError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds") from None


def read_holder(workspace: str) -> Holder | None:
    """The recorded holder of the workspace's writer lock, None when there is none, the
    record is unreadable, or its process is gone (a record a killed writer left)."""
    local = _local_dir(workspace)
    if local is None:
        return None
    try:
        record = json.loads(Path(local, HOLDER_FILE).read_text(encoding="utf-8"))
        holder = Holder(**record)
    except (OSError, ValueError, TypeError):
        return None
    if holder.host == socket.gethostname() and not psutil.pid_exists(holder.pid):
        return None
    return holder


def _inherited(lock_path: str) -> bool:
    """Whether an ancestor of this process holds ``lock_path`` on this process's behalf."""
    raw = os.environ.get(HELD_ENV, "")
    pid_text, _, path = raw.partition(":")
    if path != lock_path or not pid_text.isdigit():
        return False
    try:
        return int(pid_text) in {p.pid for p in psutil.Process().parents()}
    except psutil.Error:
        return False


def _describe_holder(workspace: str) -> str:
    holder = read_holder(workspace)
    return holder.describe() if holder else "another process (it has not recorded itself)"


def _acquire(lock: FileLock, workspace: str, verb: str, timeout_s: float) -> None:
    try:
        lock.acquire(timeout=0)
        return
    except Timeout:
        pass
    logger.warning(
        "workspace %s is being written by %s; %s waits up to %g s",
        workspace,
        _describe_holder(workspace),
        verb,
        timeout_s,
    )
    started = time.monotonic()
    try:
        lock.acquire(timeout=timeout_s)
    except Timeout:
        raise WorkspaceLocked(
            f"workspace {workspace} is locked by another writer: {_describe_holder(workspace)}; "
            f"{verb} waited {time.monotonic() - started:.0f} s (set {TIMEOUT_ENV} to wait "
            "longer)"
        ) from None


@contextmanager
def workspace_writer(
    workspace: str, verb: str, *, timeout_s: float | None = None
) -> Iterator[None]:
    """Hold the writer lock of ``workspace`` for the block (see the module docstring).

    Workspaces that are not on the local filesystem are not locked. Raises
    :class:`WorkspaceLocked` when another writer keeps the lock for longer than the
    timeout, :class:`StoreError` for a malformed ``$STORE_WRITER_LOCK_TIMEOUT_S``, and
    OSError when the workspace directory cannot be created.
    """
    local = _local_dir(workspace)
    if local is None:
        logger.debug("workspace %s is not local: no writer lock", workspace)
        yield
        return
    lock_path = os.path.join(local, LOCK_FILE)
    with _registry:
        held = _held.get(lock_path)
        if held is not None:
            held.depth += 1
    if held is not None:
        try:
            yield
        finally:
            with _registry:
                held.depth -= 1
        return
    if _inherited(lock_path):
        yield
        return
    wait = lock_timeout_s(timeout_s)
    os.makedirs(local, exist_ok=True)
    lock = FileLock(lock_path, thread_local=False)
    _acquire(lock, local, verb, wait)
    previous_env = os.environ.get(HELD_ENV)
    try:
        holder = Holder(
            os.getpid(),
            verb,
            socket.gethostname(),
            datetime.now(UTC).isoformat(timespec="seconds"),
        )
        remove_stale_temporaries(local, HOLDER_FILE)
        atomic_write_text(os.path.join(local, HOLDER_FILE), json.dumps(asdict(holder)) + "\n")
        with _registry:
            _held[lock_path] = _Held(lock, 1)
        os.environ[HELD_ENV] = f"{os.getpid()}:{lock_path}"
        logger.debug("writer lock of %s taken by %s", local, holder.describe())
        yield
    finally:
        with _registry:
            _held.pop(lock_path, None)
        if previous_env is None:
            os.environ.pop(HELD_ENV, None)
        else:
            os.environ[HELD_ENV] = previous_env
        try:
            os.unlink(os.path.join(local, HOLDER_FILE))
        except FileNotFoundError:
            pass
        finally:
            lock.release()
