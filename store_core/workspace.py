"""The workspace layout, atomic publication of output directories and atomic files.

Every stage writes its outputs into a staging directory next to the target and swaps it
into place only when complete, so a failure (bad input, crash, full disk) never leaves a
half-written output behind: the previous complete output stays where it was.

A process killed with SIGKILL (or a power cut) runs no cleanup, so the swap is also made
recoverable: :func:`recover_directory`, called by the stage on its next start while it
holds the workspace's writer lock (:mod:`store_core.locking`), removes stale staging
directories and, when the kill fell between the two renames of a local swap (the target
moved aside, the new copy not yet in place), puts the previous output back. Files are
fsynced before they are renamed into place, so a rename never publishes data that a
crash could still lose. Small state files (pointers, records) go through
:func:`atomic_write_text`: a temporary file, fsync, rename, fsync of the directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from store_core.signals import deferred

logger = logging.getLogger(__name__)


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def local_directory_problem(path: str) -> str | None:
    """Why the local path ``path`` cannot be (or become) a directory, or None: it, or the
    nearest of its parents that exists, is a file (or other non-directory)."""
    candidate = Path(path)
    while not candidate.exists():
        if candidate.is_symlink():
            return f"{candidate} is a dangling symbolic link"
        if candidate.parent == candidate:
            return None
        candidate = candidate.parent
    if candidate.is_dir():
        return None
    if str(candidate) == str(Path(path)):
        return f"{path} exists and is not a directory"
    return f"{candidate} (a parent of {path}) exists and is not a directory"


def sha256_of(uri: str, chunk: int = 1 << 20) -> str:
    """Streaming sha256 of a file at any fsspec URI."""
    digest = hashlib.sha256()
    with fsspec.open(uri, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


STAGING_INFIX = ".staging-"
OLD_INFIX = ".old-"


def _split(target_path: str) -> tuple[str, str]:
    """(parent, name) of a path inside its filesystem."""
    stripped = target_path.rstrip("/")
    return stripped.rsplit("/", 1)[0], stripped.rsplit("/", 1)[-1]


@contextmanager
def staged_directory(target: str) -> Iterator[str]:
    """Yield a fresh staging directory; on success replace ``target`` with it.

    On any exception (Ctrl-C and SIGTERM included) the staging directory is removed and
    ``target`` is left untouched. Local targets: every staged file is fsynced, then the
    swap is two renames (the old copy moved aside to ``<target>.old-<hex>`` until the new
    one is in place, then deleted); other filesystems get a remove + move. A kill that
    leaves staging or old copies behind is repaired by :func:`recover_directory`.
    """
    fs, target_path = filesystem(target)
    parent, name = _split(target_path)
    staging = f"{parent}/.{name}{STAGING_INFIX}{uuid.uuid4().hex[:8]}"
    fs.makedirs(staging, exist_ok=True)
    try:
        yield _unstrip(target, staging)
        if isinstance(fs, LocalFileSystem):
            _fsync_tree(staging)
        _publish(fs, staging, target_path)
    except BaseException:
        if fs.exists(staging):
            fs.rm(staging, recursive=True)
        raise
    logger.debug("published %s", target)


def recover_directory(target: str) -> list[str]:
    """Repair what a killed :func:`staged_directory` left around ``target``; returns what
    was done, one line per action.

    Stale staging directories and old copies are removed; when ``target`` is missing and
    an old copy exists (a kill between the two renames of a local swap), the newest old
    copy is renamed back to ``target`` first, so the previous complete output is current
    again. Call it only while holding the workspace's writer lock: a staging directory
    of a writer that is still running would be deleted under it. Raises OSError when a
    leftover cannot be removed.
    """
    fs, target_path = filesystem(target)
    parent, name = _split(target_path)
    if not fs.exists(parent):
        return []
    done: list[str] = []
    olds = sorted(
        fs.glob(f"{parent}/{name}{OLD_INFIX}*"),
        key=lambda p: fs.info(p).get("mtime") or 0.0,
        reverse=True,
    )
    if olds and not fs.exists(target_path):
        fs.mv(olds[0], target_path, recursive=True)
        if isinstance(fs, LocalFileSystem):
            fsync_path(parent)
        done.append(f"restored {target_path} from {olds[0]} (an interrupted publish)")
        olds = olds[1:]
    for leftover in [*olds, *fs.glob(f"{parent}/.{name}{STAGING_INFIX}*")]:
        fs.rm(leftover, recursive=True)
        done.append(f"removed {leftover} (left by an interrupted run)")
    for line in done:
        logger.warning("%s", line)
    return done


def _unstrip(original: str, path: str) -> str:
    """Re-attach the protocol of ``original`` to a path inside its filesystem."""
    if "://" in original:
        protocol = original.split("://", 1)[0]
        return f"{protocol}://{path.lstrip('/') if protocol != 'memory' else path}"
    return path


def _publish(fs: fsspec.AbstractFileSystem, staging: str, target: str) -> None:
    if isinstance(fs, LocalFileSystem):
        with deferred():  # SIGTERM / Ctrl-C wait until the swap is complete
            _swap_local(staging, target)
        return
    if fs.exists(target):
        fs.rm(target, recursive=True)
    fs.mv(staging, target, recursive=True)


def _swap_local(staging: str, target: str) -> None:
    old = f"{target}{OLD_INFIX}{uuid.uuid4().hex[:8]}"
    moved = False
    try:
        if os.path.exists(target):
            os.rename(target, old)
            moved = True
        os.rename(staging, target)
    except BaseException:
        # An error between the renames: put the previous output back.
        if moved and not os.path.exists(target):
            os.rename(old, target)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_path(os.path.dirname(target) or ".")
    if moved:
        shutil.rmtree(old, ignore_errors=True)


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file, or a directory so renames and new entries in it survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    """fsync every file under ``root`` and every directory, ``root`` last."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_path(directory)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to the local file ``path`` so that a reader (or the next run after a
    kill) sees either the old content or the new, never a truncated file.

    A temporary file in the same directory is written, fsynced and renamed over ``path``,
    then the directory is fsynced. Raises OSError when the directory is not writable.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_path(str(target.parent))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temporaries(directory: str | os.PathLike[str], target_name: str) -> list[str]:
    """Remove the temporaries :func:`atomic_write_bytes` left for ``target_name`` in
    ``directory`` when killed; returns the removed paths. Call it only where no other
    process writes that file (under the workspace's writer lock)."""
    removed = []
    for tmp in Path(directory).glob(f".{target_name}.tmp-*"):
        tmp.unlink(missing_ok=True)
        removed.append(str(tmp))
    return removed
