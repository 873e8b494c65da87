"""Run ``store`` and SIGKILL itself at a named point of training: the child of
tests/test_training_crash.py.

    python tests/training_crash_child.py POINT N -- store-args...

POINT names a place in the trainer's checkpointing or a training phase (see
:data:`POINTS`); the kill lands at its N-th occurrence, at the same place on every run
(no sleeps, no races). The process sends SIGKILL to itself: no cleanup code runs.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from store_core import recommender_training, training_checkpoints, workspace


def _die() -> None:
    sys.stderr.write("training_crash_child: SIGKILL to myself\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _counted(
    target: Any, name: str, n: int, *, after: bool = False, when: Callable[..., bool] | None = None
) -> None:
    """Kill at the ``n``-th call of ``target.name`` (that ``when`` accepts), before it
    runs or, with ``after``, once it returned."""
    real: Callable[..., Any] = getattr(target, name)
    seen = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if when is not None and not when(*args, **kwargs):
            return real(*args, **kwargs)
        seen[0] += 1
        if seen[0] == n and not after:
            _die()
        result = real(*args, **kwargs)
        if seen[0] == n:
            _die()
        return result

    setattr(target, name, wrapper)


def _is_pointer(src: Any, dst: Any) -> bool:
    return Path(dst).name == training_checkpoints.LATEST


POINTS: dict[str, Callable[[int], None]] = {
    # inside DeepSpeed's write of a checkpoint (model states written, optimizer not)
    "torch-save": lambda n: _counted(torch, "save", n),
    # every rank's files written, before the manifest and the rename
    "before-publish": lambda n: _counted(training_checkpoints, "_publish", n),
    # the checkpoint directory published, the pointer not yet rewritten
    "before-pointer": lambda n: _counted(training_checkpoints, "atomic_write_text", n),
    # inside the pointer's atomic write: temporary file fsynced, not yet renamed
    "pointer-replace": lambda n: _counted(os, "replace", n, when=_is_pointer),
    # training steps since the last checkpoint done, the next one not started
    "before-save": lambda n: _counted(training_checkpoints, "save", n),
    # the new best weights written, their checkpoint not yet published
    "best-written": lambda n: _counted(training_checkpoints, "atomic_write_bytes", n, after=True),
    # during a Phase B validation
    "validation": lambda n: _counted(recommender_training, "evaluate_split", n),
    # the phase's output directory staged and fsynced, not yet swapped in
    "output-staged": lambda n: _counted(workspace, "_publish", n),
}


def main(argv: list[str]) -> None:
    split = argv.index("--")
    point, n = argv[:split]
    POINTS[point](int(n))
    from store_cli.app import app

    app(argv[split + 1 :], prog_name="store")


if __name__ == "__main__":
    main(sys.argv[1:])
