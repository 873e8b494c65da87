"""Shared fixtures: hermetic environment (no telemetry, temp Prefect home), dataset paths."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

#: One floating-point path for every test on every x86-64 machine, set before numpy or
#: torch load (they read these once, at load): one thread (a reduction split over N
#: threads sums in another order), and the kernels every x86-64 CPU has (torch's
#: non-vectorised ATen kernels, MKL's conditional-numerical-reproducibility mode, generic
#: OpenBLAS kernels, numpy without its AVX2/AVX-512 loops). Without them the tiny
#: pipeline's semantic IDs and metrics (tests/test_tiny_pinned.py) differ between an
#: AVX2 and an AVX-512 machine, and between 1 and 2 threads, with no code change.
REPRODUCIBLE_NUMERICS = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE",
    "OPENBLAS_CORETYPE": "Prescott",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "NPY_DISABLE_CPU_FEATURES": "X86_V3,X86_V4,AVX512_ICL,AVX512_SPR",
}
#: Numeric libraries already loaded when this module was imported: too late for the
#: settings above. Checked in :func:`pytest_configure`, i.e. only in the pytest process (a
#: Dask worker or a script that imports this module has loaded numpy long before).
_LOADED_TOO_EARLY = sorted({"numpy", "torch", "sklearn", "scipy"} & set(sys.modules))
if platform.machine() in ("x86_64", "AMD64"):
    os.environ.update(REPRODUCIBLE_NUMERICS)


def pytest_configure(config: pytest.Config) -> None:
    if _LOADED_TOO_EARLY and platform.machine() in ("x86_64", "AMD64"):
        raise pytest.UsageError(
            f"tests/conftest.py: {', '.join(_LOADED_TOO_EARLY)} loaded before the test "
            "numerics (REPRODUCIBLE_NUMERICS) were set: a pytest plugin imports it"
        )


os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "true"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ["PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"] = "ignore"
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("STORE_WORKSPACE_ROOT", None)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"
TINY_DATA = REPO / "tests" / "data" / "tiny"


def shared_dataset(name: str) -> Path:
    """Path of a shared dataset, skipping the test where ../shared is absent."""
    path = SHARED_DATASETS / name
    if not path.exists():
        pytest.skip(f"shared dataset {path} not present (only on the team's machines and CI)")
    return path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses the trained tiny workspace is a ``pipeline`` test (left out of
    ``make test-fast``) without having to say so."""
    for item in items:
        if "tiny_pipeline" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.pipeline)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    return tmp_path / "ws"


@pytest.fixture
def clean_memory_fs() -> Iterator[None]:
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")
    yield
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with the tiny dataset ingested and both training phases done (once per
    session). Tests that change it must copy it first (:func:`copy_workspace`)."""
    from store_core.config import load_config
    from store_core.ingest import run_ingest
    from store_core.item_tokenizer import train_semantic_tokenizer
    from store_core.recommender_training import train_recommender

    ws = tmp_path_factory.mktemp("tiny-pipeline") / "ws"
    cfg = load_config("tiny", [f"workspace={ws}", "tracking.enabled=false"])
    run_ingest(cfg)
    assert train_semantic_tokenizer(cfg) is not None
    assert train_recommender(cfg) is not None
    return ws


def copy_workspace(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


#: What :func:`write_changed_catalogue` does to the tiny catalogue.
CHANGED_ITEMS = ("0", "1")
REMOVED_ITEM = "47"
ADDED_ITEMS = ("new0", "new1", "new2")


def write_changed_catalogue(target: Path, source: Path = TINY_DATA) -> Path:
    """The tiny dataset with 3 items added, 2 changed and 1 removed, written to ``target``
    (interactions unchanged except that nobody references the removed item)."""
    import json

    target.mkdir(parents=True, exist_ok=True)
    items = json.loads((source / "Tiny.item.json").read_text())
    inters = json.loads((source / "Tiny.inter.json").read_text())
    del items[REMOVED_ITEM]
    inters = {u: [i for i in seq if i != REMOVED_ITEM] for u, seq in inters.items()}
    items["0"]["title"] = "Acme Beaker Pro"
    items["1"]["description"] = "A precision pipette for lab equipment work."
    titles = ["Acme Flask Mini", "Voltix Probe", "Sciplus Goggles XL"]
    for item, title in zip(ADDED_ITEMS, titles, strict=True):
        items[item] = {"title": title, "categories": "Industrial & Scientific,New"}
    (target / "Tiny.item.json").write_text(json.dumps(items))
    (target / "Tiny.inter.json").write_text(json.dumps(inters))
    return target


def current_id_table(workspace: Path) -> Any:
    """The current semantic-ID rows of ``workspace``'s DuckDB, sorted by item_id, the
    columns two runs must agree on (a pyarrow Table)."""
    from store_core import storage

    table = storage.current_ids(str(workspace / "store.duckdb")).sort_by("item_id")
    return table.select(["item_id", "codes", "sid", "packed", "content_hash", "method", "active"])


def store_eval_rows(workspace: Path) -> dict[str, float]:
    """metric/history rule -> value of the store system in ``eval_results``."""
    import duckdb

    with duckdb.connect(str(workspace / "store.duckdb"), read_only=True) as con:
        rows = con.execute(
            "SELECT metric || '/' || history_rule, value FROM eval_results "
            "WHERE system = 'store' ORDER BY 1"
        ).fetchall()
    return {str(name): float(value) for name, value in rows}
