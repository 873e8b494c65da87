"""The layers: ``store_core`` (the library) imports neither Prefect nor ``flows`` nor the
command line; ``store_cli`` imports ``flows`` (and so Prefect) only when ``store run``
runs. Checked in a fresh interpreter, over every module of the library."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys

import store_core
from tests.conftest import REPO

#: Every module of the library, found on disk (a new module is checked without a list).
LIBRARY_MODULES = sorted(
    info.name for info in pkgutil.walk_packages(store_core.__path__, prefix="store_core.")
)


def imported_after(modules: list[str]) -> set[str]:
    """The top-level packages in ``sys.modules`` after a fresh interpreter imports
    ``modules``."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_the_library_imports_no_prefect_no_flows_no_cli() -> None:
    assert len(LIBRARY_MODULES) > 40  # the walk found the library, subpackages included
    assert {"store_core.storage.versions", "store_core.baselines.data"} <= set(LIBRARY_MODULES)
    loaded = imported_after(LIBRARY_MODULES)
    assert "store_core" in loaded and "torch" in loaded  # the imports did run
    assert loaded & {"prefect", "flows", "store_cli"} == set()


def test_the_cli_imports_prefect_only_to_run_the_pipeline() -> None:
    loaded = imported_after(["store_cli.app"])
    assert "typer" in loaded
    assert loaded & {"prefect", "flows"} == set()
