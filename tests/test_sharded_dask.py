"""The scaled-out stages on real Dask clusters, through the Prefect flows.

* ``store tokenize-catalogue`` with ``inference.workers=2`` (4 shards) runs the flow on a
  local cluster started from the config and writes the same semantic IDs (every item,
  every code) as the in-process path;
* a cluster started the way users run one (``dask scheduler`` + two ``dask worker``
  processes on 127.0.0.1, connected by ``inference.address``): the same IDs in keep mode
  on a changed catalogue, and the same evaluation metrics;
* a worker SIGKILLed while it holds a shard: Dask reruns the shard on another worker and
  the run writes the same IDs; with no rerun allowed, the run fails naming the shard,
  the previous version stays current and the staging directory is gone.

Each test starts and stops its own cluster (a few minutes on a busy 2-core machine).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import pyarrow as pa
import pytest
from distributed import Client, LocalCluster

from flows.reporting import CatalogueSummary
from store_core import storage
from store_core.config import load_config
from store_core.errors import StoreError
from store_core.service_supervisor import free_port
from store_core.stages import catalogue_stage, evaluate_stage
from tests.conftest import (
    copy_workspace,
    current_id_table,
    store_eval_rows,
    write_changed_catalogue,
)
from tests.sharding_helpers import HoldFirstTask

#: The same numeric settings on both paths: 8-row read batches (6 batches -> 4 shards),
#: 4-user search batches, tracking off.
COMMON = ["tracking.enabled=false", "inference.batch_rows=8", "recommender.eval_batch_size=4"]


@pytest.fixture(autouse=True)
def _prefect_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flows (and the workers' Prefect clients) use a temporary Prefect home."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _overrides(workspace: Path, *extra: str) -> list[str]:
    return [f"workspace={workspace}", *COMMON, *extra]


def _in_process_ids(source: Path, target: Path, mode: str, *extra: str) -> pa.Table:
    workspace = copy_workspace(source, target)
    cfg = load_config("tiny", _overrides(workspace, *extra))
    catalogue_stage(cfg, mode=mode)
    return current_id_table(workspace)


def _store_cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    """``store <args>`` in its own process, as users run it: the temporary Prefect server
    its flow starts is that process's and stops when it exits."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "store_cli", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)


def _sharded(workspace: Path, mode: str, *extra: str) -> CatalogueSummary:
    from flows.pipeline import catalogue_flow

    return catalogue_flow("tiny", _overrides(workspace, *extra), None, mode)


def test_cli_verb_with_workers_runs_shards_on_a_local_cluster_with_the_in_process_ids(
    tiny_pipeline: Path, tmp_path: Path
) -> None:
    """``store tokenize-catalogue --set inference.workers=2``: the verb runs the flow, whose
    4 shard tasks run on a local cluster started from the config."""
    expected = _in_process_ids(tiny_pipeline, tmp_path / "here", "regenerate")
    workspace = copy_workspace(tiny_pipeline, tmp_path / "there")
    sets = [
        arg
        for item in _overrides(workspace, "inference.workers=2", "inference.shards=4")
        for arg in ("--set", item)
    ]
    result = _store_cli(["tokenize-catalogue", "-c", "tiny", *sets, "--mode", "regenerate"])
    assert result.returncode == 0, result.stdout + result.stderr
    flat = " ".join((result.stdout + result.stderr).split())  # rich wraps at the width
    assert "tokenize-catalogue: semantic-ID version 1 written (0 new, 0 changed" in flat
    assert "; regenerated 48 IDs," in flat
    assert storage.latest_version(str(workspace / "store.duckdb")) == 1
    got = current_id_table(workspace)
    assert got.num_rows == 48
    assert got.equals(expected)
    assert not (workspace / ".catalogue-staging").exists()


@pytest.fixture
def dask_cli_cluster(tmp_path: Path) -> Iterator[str]:
    """``dask scheduler`` and two ``dask worker --nthreads 1`` processes on 127.0.0.1, as
    users start them; stopped (and reaped) by the fixture, with everything they started."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask_cli = [str(Path(sys.executable).parent / "dask")]
    logs = tmp_path / "dask-logs"
    logs.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    commands = [
        [*dask_cli, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        *(
            [
                *dask_cli,
                "worker",
                address,
                "--nthreads",
                "1",
                "--no-dashboard",
                "--host",
                "127.0.0.1",
                "--name",
                f"w{i}",
            ]
            for i in range(2)
        ),
    ]
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for number, command in enumerate(commands):
            with (logs / f"{number}.log").open("wb") as log:
                processes.append(  # own process group: what they start goes with them
                    subprocess.Popen(
                        command,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            if number == 0:
                _wait_for_port(port, processes[0], logs / "0.log")
        with Client(address, timeout=120) as client:
            client.wait_for_workers(2, timeout=300)
        yield address
    finally:
        for process in reversed(processes):
            _signal_group(process, signal.SIGTERM)
        for process in reversed(processes):
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            # a worker's temporary Prefect server (it has no PREFECT_API_URL) is in its group
            _signal_group(process, signal.SIGKILL)


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Signal the process group a fixture process leads (started with a new session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"dask scheduler exited: {log.read_text()}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"dask scheduler did not listen on {port}: {log.read_text()}")


# ~80 s (a `dask scheduler` + two `dask worker` processes, then evaluate through the flow
# and its Prefect server): `make test-slow`. CI's suite keeps `inference.address` (the
# killed-worker tests below), the CLI verb on a cluster (above) and sharded evaluation's
# equality with one search (test_sharded_library.py).
@pytest.mark.slow
def test_cluster_by_address_gives_the_in_process_ids_and_metrics(
    tiny_pipeline: Path, tmp_path: Path, dask_cli_cluster: str
) -> None:
    changed = write_changed_catalogue(tmp_path / "changed-data")
    extra = [f"data.path={changed}", "evaluation.systems=[store]"]
    here = copy_workspace(tiny_pipeline, tmp_path / "here")
    there = copy_workspace(tiny_pipeline, tmp_path / "there")
    remote = [f"inference.address={dask_cli_cluster}", "inference.shards=4"]
    for workspace in (here, there):  # the changed catalogue, ingested (new + changed items)
        from store_core.ingest import run_ingest

        run_ingest(load_config("tiny", _overrides(workspace, *extra)))
    expected_cfg = load_config("tiny", _overrides(here, *extra))
    catalogue_stage(expected_cfg, mode="keep")
    with Client(dask_cli_cluster) as client:
        before = sum(client.run(_executed).values())
    result = _sharded(there, "keep", *extra, *remote)
    assert result.counts["new"] == 3 and result.counts["changed"] == 2
    assert current_id_table(there).equals(current_id_table(here))

    evaluate_stage(expected_cfg)
    sets = [arg for item in _overrides(there, *extra, *remote) for arg in ("--set", item)]
    result = _store_cli(["evaluate", "-c", "tiny", *sets])  # through the flow
    assert result.returncode == 0, result.stdout + result.stderr
    flat = " ".join((result.stdout + result.stderr).split())  # rich wraps at the width
    assert "Beginning flow run" in flat and "for flow 'evaluate'" in flat
    metrics = store_eval_rows(there)
    assert metrics == store_eval_rows(here)
    assert metrics["recall_at_10/kept"] >= 0 and metrics["users/kept"] > 8
    with Client(dask_cli_cluster) as client:  # the shards ran on the external workers
        after = client.run(_executed)
    user_shards = min(4, -(-int(metrics["users/kept"]) // 4))  # 4-user batches
    assert sum(after.values()) - before >= 1 + user_shards  # + the catalogue shard(s)


def _executed(dask_worker: Any) -> int:
    """Tasks a Dask worker has run (client.run calls it on every worker)."""
    return int(dask_worker.state.executed_count)


@pytest.fixture
def held_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[str, Path]]:
    """A 2-worker local cluster (worker processes under nannies) whose first task is held
    (:class:`tests.sharding_helpers.HoldFirstTask`); ``allowed_failures`` (indirect param):
    how many worker deaths a task survives."""
    allowed = int(request.param)
    marks = tmp_path / "marks"
    marks.mkdir()
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": allowed}),
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(HoldFirstTask(str(marks)))
        yield cluster.scheduler_address, marks
    _stop_orphans(tmp_path / "prefect-home", request.node.nodeid)


def _stop_orphans(prefect_home: Path, nodeid: str) -> None:
    """Stop what the cluster's workers left running: a worker with no PREFECT_API_URL
    starts a temporary Prefect server in its own process, and when the test SIGKILLs that
    worker the server is orphaned. Found by the test's PREFECT_HOME in its environment,
    or by the test's PYTEST_CURRENT_TEST (a worker can carry the Prefect settings an
    earlier test's flow left in this process, with another PREFECT_HOME). Never this
    process or its own descendants: an orphan has lost its parent, while this process's
    temporary Prefect server and multiprocessing resource tracker, when this test was the
    first to start them, carry its PYTEST_CURRENT_TEST too and serve the next tests."""
    import psutil

    ours = {os.getpid()} | {child.pid for child in psutil.Process().children(recursive=True)}
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
            started_here = env.get("PYTEST_CURRENT_TEST", "").startswith(f"{nodeid} ")
            if proc.pid not in ours and (
                env.get("PREFECT_HOME") == str(prefect_home) or started_here
            ):
                proc.kill()
                proc.wait(timeout=10)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue


def _kill_held_worker(marks: Path, killed: list[int]) -> threading.Thread:
    """SIGKILL the worker process that holds the first task, once it holds it."""

    def kill() -> None:
        held = marks / "held"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if held.exists() and held.read_text().strip():
                pid = int(held.read_text().split()[0])
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("held_cluster", [3], indirect=True)
def test_killed_worker_shard_runs_again_and_the_ids_are_the_same(
    tiny_pipeline: Path, tmp_path: Path, held_cluster: tuple[str, Path]
) -> None:
    address, marks = held_cluster
    expected = _in_process_ids(tiny_pipeline, tmp_path / "here", "regenerate")
    workspace = copy_workspace(tiny_pipeline, tmp_path / "there")
    killed: list[int] = []
    killer = _kill_held_worker(marks, killed)
    result = _sharded(workspace, "regenerate", f"inference.address={address}", "inference.shards=4")
    killer.join(timeout=5)
    assert len(killed) == 1
    held_pid, held_key = (marks / "held").read_text().split(maxsplit=1)
    starts = [line.split(maxsplit=1) for line in (marks / "started").read_text().splitlines()]
    reruns = [pid for pid, key in starts if key == held_key]
    assert len(reruns) == 2 and reruns[0] == held_pid != reruns[1]  # ran again elsewhere
    assert result.version == 1
    assert current_id_table(workspace).equals(expected)
    assert not (workspace / ".catalogue-staging").exists()


@pytest.mark.parametrize("held_cluster", [0], indirect=True)
def test_killed_worker_without_reruns_fails_the_run_and_keeps_the_old_version(
    tiny_pipeline: Path, tmp_path: Path, held_cluster: tuple[str, Path]
) -> None:
    address, marks = held_cluster
    workspace = copy_workspace(tiny_pipeline, tmp_path / "there")
    cfg = load_config("tiny", _overrides(workspace))
    catalogue_stage(cfg, mode="regenerate")  # version 1, in-process
    before = current_id_table(workspace)
    killed: list[int] = []
    killer = _kill_held_worker(marks, killed)
    with pytest.raises(StoreError, match=r"catalogue shard \d+ \(rows \d+-\d+\) failed"):
        _sharded(workspace, "regenerate", f"inference.address={address}", "inference.shards=4")
    killer.join(timeout=5)
    assert len(killed) == 1
    assert storage.latest_version(str(workspace / "store.duckdb")) == 1
    assert current_id_table(workspace).equals(before)
    assert not (workspace / ".catalogue-staging").exists()
