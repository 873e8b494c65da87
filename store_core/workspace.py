"""The workspace layout and atomic publication of output directories.

Every stage writes its outputs into a staging directory next to the target and swaps it
into place only when complete, so a failure (bad input, crash, full disk) never leaves a
half-written output behind: the previous complete output stays where it was.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import fsspec
from fsspec.implementations.local import LocalFileSystem

logger = logging.getLogger(__name__)


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def sha256_of(uri: str, chunk: int = 1 << 20) -> str:
    """Streaming sha256 of a file at any fsspec URI."""
    digest = hashlib.sha256()
    with fsspec.open(uri, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def staged_directory(target: str) -> Iterator[str]:
    """Yield a fresh staging directory; on success replace ``target`` with it.

    On any exception the staging directory is removed and ``target`` is left untouched.
    Local targets are swapped with two renames (the old copy is kept until the new one is
    in place); other filesystems get a remove + move.
    """
    fs, target_path = filesystem(target)
    parent = target_path.rstrip("/").rsplit("/", 1)[0]
    name = target_path.rstrip("/").rsplit("/", 1)[-1]
    staging = f"{parent}/.{name}.staging-{uuid.uuid4().hex[:8]}"
    fs.makedirs(staging, exist_ok=True)
    try:
        yield _unstrip(target, staging)
    except BaseException:
        fs.rm(staging, recursive=True)
        raise
    _publish(fs, staging, target_path)
    logger.debug("published %s", target)


def _unstrip(original: str, path: str) -> str:
    """Re-attach the protocol of ``original`` to a path inside its filesystem."""
    if "://" in original:
        protocol = original.split("://", 1)[0]
        return f"{protocol}://{path.lstrip('/') if protocol != 'memory' else path}"
    return path


def _publish(fs: fsspec.AbstractFileSystem, staging: str, target: str) -> None:
    if isinstance(fs, LocalFileSystem):
        old = None
        if os.path.exists(target):
            old = f"{target}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
        os.rename(staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return
    if fs.exists(target):
        fs.rm(target, recursive=True)
    fs.mv(staging, target, recursive=True)
