"""Progress bars for loops a person waits on; silent when not a terminal or under CI."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_enabled() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


def progress(iterable: Iterable[T] | None = None, **kwargs: Any) -> tqdm[T]:
    """``tqdm`` with the project's defaults (disabled off-terminal, dynamic width)."""
    kwargs.setdefault("disable", not progress_enabled())
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
