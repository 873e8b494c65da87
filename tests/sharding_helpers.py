"""A Dask worker plugin for the worker-kill tests (imported by the workers by name).

:class:`HoldFirstTask` records every task a worker starts (``<dir>/started``: pid and key
per line) and holds the first task the cluster starts: the worker that starts it writes
its pid to ``<dir>/held`` and stops there (its event loop blocked), so a test can SIGKILL
that worker while the task is certainly in flight. Later tasks, the held one's rerun
included, run normally.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin


class HoldFirstTask(WorkerPlugin):
    name = "store-hold-first-task"

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if finish != "executing":
            return
        folder = Path(self.directory)
        with (folder / "started").open("a") as log:
            log.write(f"{os.getpid()} {key}\n")
        try:
            handle = os.open(folder / "held", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(handle, f"{os.getpid()} {key}".encode())
        os.close(handle)
        while True:  # until the test kills this process
            time.sleep(0.05)
