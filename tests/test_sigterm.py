"""SIGTERM (Prefect cancellation, Kubernetes eviction, ``scancel``) is handled like Ctrl-C.

Tracked training runs in a child ``store`` process with an MLflow SQLite store in the
workspace; once it has written its first checkpoint the test sends SIGTERM and checks:
exit status 143, no MLflow run left RUNNING (the stage run and, for the pipeline, its
parent end KILLED), no SQLite journal or temporary file left, the writer lock released,
and the newest checkpoint complete. The kill points of ingest and tokenize-catalogue are
in tests/test_crash_ingest_catalogue.py (SIGTERM and SIGKILL).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from store_core import signals, storage, tracking
from store_core.config import load_config
from store_core.ingest import run_ingest
from store_core.locking import HOLDER_FILE
from store_core.service_supervisor import clean_environ
from store_core.trainer import latest_step
from tests.conftest import REPO, copy_workspace

pytestmark = pytest.mark.service  # starts servers or CLI processes

#: What a cleanly stopped run may not leave anywhere in the workspace.
LEFTOVER_MARKERS = ("-journal", ".tmp", "staging", ".old-", HOLDER_FILE, ".wal")


def start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    # Without the rendezvous variables in-process training left in this process.
    env = {**clean_environ(), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "300"}
    env["PREFECT_HOME"] = str(log.parent / "prefect-home")
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "store_cli", *argv],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def terminate_after(proc: subprocess.Popen[bytes], marker: str, ws: Path, log: Path) -> int:
    """Wait until a file matching ``marker`` exists under ``ws`` (the run is well under
    way), send SIGTERM once, and return the exit status."""
    deadline = time.monotonic() + 600
    while not list(ws.glob(marker)):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{marker} never appeared"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()


def mlflow_runs(ws: Path) -> list[Any]:
    """Every MLflow run of the workspace's experiment (tiny config, local store)."""
    cfg = load_config("tiny", [f"workspace={ws}"])
    client = MlflowClient(tracking_uri=tracking.tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    assert experiment is not None
    return list(client.search_runs([experiment.experiment_id]))


def assert_stopped_cleanly(ws: Path, log: Path, status: int, checkpoints: str) -> None:
    output = log.read_text()
    assert status == signals.EXIT_TERMINATED, output[-3000:]
    assert "stopped: terminated by SIGTERM" in output
    runs = mlflow_runs(ws)
    assert runs and all(r.info.status != "RUNNING" for r in runs), [
        (r.info.run_name, r.info.status) for r in runs
    ]
    leftovers = [p for p in ws.rglob("*") if any(m in p.name for m in LEFTOVER_MARKERS)]
    assert leftovers == [], leftovers
    (directory,) = ws.glob(checkpoints)
    step = latest_step(str(directory))
    assert step is not None and step > 0  # the newest checkpoint is complete and readable


@pytest.mark.parametrize("phase", ["tokenizer", "recommender"])
def test_sigterm_during_tracked_training_marks_the_run_and_exits_143(
    phase: str, tiny_pipeline: Path, tmp_path: Path
) -> None:
    if phase == "tokenizer":
        ws = tmp_path / "ws"
        run_ingest(load_config("tiny", [f"workspace={ws}", "tracking.enabled=false"]))
        overrides = ["tokenizer_train.max_steps=100000"]
        checkpoints = "models/tokenizer-checkpoints/*"
    else:
        ws = copy_workspace(tiny_pipeline, tmp_path / "ws")
        for trained in (ws / "models").glob("recommender-*"):
            shutil.rmtree(trained)  # Phase A stays trained; Phase B starts from nothing
        overrides = ["recommender_train.epochs=1000", "recommender.early_stopping_patience=1000"]
        checkpoints = "models/recommender-*-checkpoints/*"
    argv = ["train", "--phase", phase, "-c", "tiny", "--set", f"workspace={ws}"]
    for override in overrides:
        argv += ["--set", override]
    log = tmp_path / "train.log"
    proc = start(argv, log)
    status = terminate_after(proc, f"{checkpoints}/step-*", ws, log)
    assert_stopped_cleanly(ws, log, status, checkpoints)
    (run,) = mlflow_runs(ws)
    assert run.info.run_name == f"train_{phase}" and run.info.status == "KILLED"


def test_sigterm_during_the_pipeline_marks_the_parent_and_stage_runs(tmp_path: Path) -> None:
    """``store run``: inside the flow run Prefect's own SIGTERM bridge raises (the flow
    runs end Crashed), then the CLI's handler; MLflow's parent run and the stage run
    both end KILLED, the finished ingest run stays FINISHED."""
    ws = tmp_path / "ws"
    argv = ["run", "-c", "tiny", "--set", f"workspace={ws}", "--no-evaluate"]
    argv += ["--set", "tokenizer_train.max_steps=100000"]
    log = tmp_path / "run.log"
    proc = start(argv, log)
    checkpoints = "models/tokenizer-checkpoints/*"
    status = terminate_after(proc, f"{checkpoints}/step-*", ws, log)
    assert_stopped_cleanly(ws, log, status, checkpoints)
    runs = {r.info.run_name: r.info.status for r in mlflow_runs(ws)}
    parent = next(name for name in runs if name.startswith("store-full-"))
    assert runs == {parent: "KILLED", "ingest": "FINISHED", "train_tokenizer": "KILLED"}
    assert "Crashed" in log.read_text()  # what the Prefect UI shows for the flow runs


@pytest.mark.parametrize(
    ("verb", "point"),
    [("ingest", "ingest-in-transaction"), ("tokenize-catalogue", "catalogue-in-transaction")],
)
def test_sigterm_inside_a_tracked_write_marks_the_run_and_writes_nothing(
    verb: str, point: str, tiny_pipeline: Path, tmp_path: Path
) -> None:
    """SIGTERM inside the DuckDB transaction of a tracked ingest / tokenize-catalogue:
    the transaction rolls back, the stage run ends KILLED, exit 143."""
    ws = copy_workspace(tiny_pipeline, tmp_path / "ws")
    db = str(ws / "store.duckdb")
    _, items_before = storage.query(db, "SELECT count(*) FROM items")
    argv = [sys.executable, str(REPO / "tests" / "crash_child.py"), point, "TERM", "--", verb]
    argv += ["-c", "tiny", "--set", f"workspace={ws}"]
    env = {**clean_environ(), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == signals.EXIT_TERMINATED, proc.stderr[-3000:]
    (run,) = mlflow_runs(ws)
    assert run.info.status == "KILLED"
    assert storage.latest_version(db) is None  # the catalogue's version 1 rolled back
    assert storage.query(db, "SELECT count(*) FROM items")[1] == items_before
    leftovers = [p for p in ws.rglob("*") if any(m in p.name for m in LEFTOVER_MARKERS)]
    assert leftovers == []
