"""Files opened for pyarrow as native (C++) files, never as Python file objects.

pyarrow wraps a Python file object (an ``fsspec`` handle) in a ``PyReadableFile`` whose
destructor takes the GIL. The dataset scanner behind ``pq.read_table`` hands its file
fragments to Arrow's own thread pool, which may drop the last reference to one while the
interpreter is finalizing; taking the GIL then ends that thread through a forced unwind
inside a ``noexcept`` destructor, and a process whose work was done aborts at exit with
"terminate called without an active exception" (status 134 / -6). Measured here: 1 in
~15-25 runs of ``store recommend`` (gdb backtrace: ``OwnedRefNoGIL::~OwnedRefNoGIL`` <-
``PyReadableFile::~PyReadableFile`` <- ``ParquetFileFragment::~ParquetFileFragment`` on an
Arrow thread during exit). Upstream: apache/arrow#39162 (the same message after
``read_table`` through fsspec), apache/arrow#50482 (exit hangs after ``read_table`` of a
Python file object). Every Arrow read of a file in this project goes through
:func:`open_arrow_input`, so no Python object is ever owned by Arrow's threads.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager

import fsspec
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import infer_compression

#: Bytes per read when a non-local file is copied into Arrow memory.
CHUNK_BYTES = 16 << 20


@contextmanager
def open_arrow_input(uri: str, *, compression: str | None = None) -> Iterator[pa.NativeFile]:
    """``uri`` open for reading as a native Arrow file.

    A local file without ``compression`` is opened by Arrow itself (``pa.OSFile``, random
    access, nothing copied). Anything else (``s3://``, ``memory://``, a ``.gz`` with
    ``compression="infer"``) is read through fsspec, decompressed as fsspec does, into a
    buffer Arrow allocates and owns (``pa.BufferReader``): the whole file in memory, as
    the callers' full-table reads hold it anyway. ``compression``: None, a codec name
    fsspec knows, or ``"infer"`` (from the suffix; a plain local file stays native).

    Raises what opening the file raises: FileNotFoundError, IsADirectoryError (also for a
    local directory), PermissionError or another OSError, and fsspec's decompression
    errors (EOFError, zlib.error) for a broken archive.
    """
    if compression == "infer":
        compression = infer_compression(uri)  # by suffix, as fsspec.open does
    fs, path = fsspec.core.url_to_fs(uri)
    if compression is None and isinstance(fs, LocalFileSystem):
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), uri)
        native: pa.NativeFile = pa.OSFile(path, "rb")
    else:
        sink = pa.BufferOutputStream()
        with fsspec.open(uri, "rb", compression=compression) as handle:
            while chunk := handle.read(CHUNK_BYTES):
                sink.write(chunk)  # copied into Arrow-owned memory
        native = pa.BufferReader(sink.getvalue())
    with native:
        yield native
