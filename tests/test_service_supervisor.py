"""``store serve`` process management without starting servers (the end-to-end run is
tests/flows/test_service.py)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from store_core import service_supervisor
from store_core.config import StoreConfig, load_config
from store_core.errors import StoreError

pytestmark = pytest.mark.service  # starts servers or CLI processes


def cfg_for(tmp_path: Path, *extra: str) -> StoreConfig:
    return load_config("tiny", [f"workspace={tmp_path / 'ws'}", *extra])


def test_external_prefect_server_is_used_not_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://10.0.0.5:4200/api/")
    stack = service_supervisor.LocalStack(cfg_for(tmp_path), "tiny", [], schedule=False)
    assert [s.name for s in stack.services] == ["deployments"]
    deployments = stack.services[0]
    assert deployments.env["PREFECT_API_URL"] == "http://10.0.0.5:4200/api"
    assert "--no-schedule" in deployments.argv
    assert deployments.ready_urls == (
        "http://10.0.0.5:4200/api/deployments/name/store/full-pipeline",
        "http://10.0.0.5:4200/api/deployments/name/store/nightly-retokenize",
    )
    assert stack.urls["prefect_ui"] == "http://10.0.0.5:4200"


def test_local_stack_binds_loopback_in_start_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    port = service_supervisor.free_port()
    stack = service_supervisor.LocalStack(
        cfg_for(tmp_path), "tiny", [], prefect_port=port, mlflow=True
    )
    assert [s.name for s in stack.services] == ["prefect-server", "mlflow-server", "deployments"]
    server, mlflow, _ = stack.services
    assert server.argv[-4:] == ["--host", "127.0.0.1", "--port", str(port)]
    assert mlflow.argv[mlflow.argv.index("--host") + 1] == "127.0.0.1"
    assert mlflow.argv[mlflow.argv.index("--workers") + 1] == "1"
    assert mlflow.env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert stack.urls["prefect_api"] == f"http://127.0.0.1:{port}/api"


def test_each_workspace_gets_its_own_prefect_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Prefect server of two workspaces' ``store serve`` gets two databases, each in
    its workspace; a database the user configured wins (the server inherits it). The
    end-to-end check, two servers, is the `slow`
    tests/flows/test_service.py::test_two_workspaces_runs_do_not_mix."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv(service_supervisor.PREFECT_DB_ENV, raising=False)
    urls = []
    for name in ("a", "b"):
        cfg = load_config("tiny", [f"workspace={tmp_path / name}"])
        stack = service_supervisor.LocalStack(cfg, "tiny", [], schedule=False)
        server = stack.services[0]
        assert server.name == "prefect-server"
        urls.append(server.env[service_supervisor.PREFECT_DB_ENV])
        assert (tmp_path / name / "prefect").is_dir()
    assert urls == [
        f"sqlite+aiosqlite:///{(tmp_path / name).resolve() / 'prefect' / 'prefect.db'}"
        for name in ("a", "b")
    ]
    monkeypatch.setenv(service_supervisor.PREFECT_DB_ENV, "postgresql+asyncpg://db/prefect")
    cfg = load_config("tiny", [f"workspace={tmp_path / 'c'}"])
    server = service_supervisor.LocalStack(cfg, "tiny", []).services[0]
    assert service_supervisor.PREFECT_DB_ENV not in server.env  # inherited as the user set it
    assert not (tmp_path / "c" / "prefect").exists()


def test_a_service_is_ready_only_once_every_ready_url_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deployments process registers ``full-pipeline`` before ``nightly-retokenize``;
    ``store serve`` must not report ready (write its state file) in between (a CI run
    once read the state file and found no nightly deployment)."""
    full, nightly = "http://h/full", "http://h/nightly"
    polls: list[str] = []

    def fake_http_ok(url: str, timeout_s: float = 2.0) -> bool:
        polls.append(url)
        return url == full or polls.count(nightly) >= 3  # nightly answers from its 3rd poll

    monkeypatch.setattr(service_supervisor, "http_ok", fake_http_ok)
    monkeypatch.setattr(service_supervisor.time, "sleep", lambda _s: None)
    service = service_supervisor.Service("deployments", ["sleep", "30"], (full, nightly))
    service.start(tmp_path)
    try:
        service.wait_ready(timeout_s=30)
        assert polls.count(nightly) == 3 and polls[-1] == nightly
        monkeypatch.setattr(service_supervisor, "http_ok", lambda url, timeout_s=2.0: url == full)
        with pytest.raises(StoreError, match=f"deployments not ready at {nightly} after 0 s"):
            service.wait_ready(timeout_s=0.2)
    finally:
        service.stop(grace_s=5)


def test_busy_port_and_remote_mlflow_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(StoreError, match=f"port {port} on 127.0.0.1 is in use"):
            service_supervisor.LocalStack(cfg_for(tmp_path), "tiny", [], prefect_port=port)
        assert service_supervisor.free_port(port) != port  # the default falls back to a free one
    remote = cfg_for(tmp_path, "tracking.uri=http://mlflow.internal:5000")
    with pytest.raises(StoreError, match="has its own server"):
        service_supervisor.LocalStack(remote, "tiny", [], mlflow=True)


def test_children_do_not_inherit_rendezvous_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("STORE_KEEP_ME", "yes")
    env = service_supervisor.clean_environ()
    assert "MASTER_PORT" not in env and "WORLD_SIZE" not in env
    assert env["STORE_KEEP_ME"] == "yes"


STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(child.pid, flush=True)
time.sleep(600)
"""


def test_stop_group_kills_a_process_tree_that_ignores_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    started = time.monotonic()
    service_supervisor.stop_group(proc.pid, grace_s=1.0, name="stubborn")
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 10  # SIGTERM was ignored for the grace period, then SIGKILL
    proc.wait(timeout=10)  # (already reaped by stop_group's wait)
    assert not psutil.pid_exists(proc.pid)
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


def test_stop_without_a_running_serve(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path)
    assert service_supervisor.stop_running(cfg) is False
    # A state file left by a serve that died: its pids are gone (or recycled): cleaned up.
    state_dir = service_supervisor.serve_dir(cfg)
    state_dir.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = {"pid": dead.pid, "create_time": 0.0}
    (state_dir / service_supervisor.STATE_FILE).write_text(
        json.dumps({"supervisor": record, "services": [{"name": "x", **record}]})
    )
    assert service_supervisor.stop_running(cfg) is True
    assert not (state_dir / service_supervisor.STATE_FILE).exists()


def test_stop_returns_once_the_supervisor_exits_even_before_its_parent_reaps_it(
    tmp_path: Path,
) -> None:
    """A supervisor that exited on SIGTERM but whose parent (here this test, in CI pytest)
    has not reaped it yet is a zombie: ``store serve --stop`` is done, it does not wait
    out its timeout (it used to: 60 s per stop in tests/flows/test_service.py)."""
    cfg = cfg_for(tmp_path)
    supervisor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    state_dir = service_supervisor.serve_dir(cfg)
    state_dir.mkdir(parents=True)
    record = {"pid": supervisor.pid, "create_time": psutil.Process(supervisor.pid).create_time()}
    (state_dir / service_supervisor.STATE_FILE).write_text(
        json.dumps({"supervisor": record, "services": []})
    )
    try:
        started = time.monotonic()
        assert service_supervisor.stop_running(cfg, timeout_s=30.0) is True
        elapsed = time.monotonic() - started
        assert psutil.Process(supervisor.pid).status() == psutil.STATUS_ZOMBIE  # not reaped
    finally:
        supervisor.kill()
        supervisor.wait(timeout=10)
    assert elapsed < 5.0
    assert not (state_dir / service_supervisor.STATE_FILE).exists()
