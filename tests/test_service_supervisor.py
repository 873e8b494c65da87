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
from store_core.config import load_config
from store_core.errors import StoreError

pytestmark = pytest.mark.service  # starts servers or CLI processes


def cfg_for(tmp_path: Path, *extra: str) -> object:
    return load_config("tiny", [f"workspace={tmp_path / 'ws'}", *extra])


def test_external_prefect_server_is_used_not_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://10.0.0.5:4200/api/")
    stack = service_supervisor.LocalStack(cfg_for(tmp_path), "tiny", [], schedule=False)  # type: ignore[arg-type]
    assert [s.name for s in stack.services] == ["deployments"]
    deployments = stack.services[0]
    assert deployments.env["PREFECT_API_URL"] == "http://10.0.0.5:4200/api"
    assert "--no-schedule" in deployments.argv
    assert deployments.ready_url == "http://10.0.0.5:4200/api/deployments/name/store/full-pipeline"
    assert stack.urls["prefect_ui"] == "http://10.0.0.5:4200"


def test_local_stack_binds_loopback_in_start_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    port = service_supervisor.free_port()
    stack = service_supervisor.LocalStack(
        cfg_for(tmp_path), "tiny", [], prefect_port=port, mlflow=True
    )  # type: ignore[arg-type]
    assert [s.name for s in stack.services] == ["prefect-server", "mlflow-server", "deployments"]
    server, mlflow, _ = stack.services
    assert server.argv[-4:] == ["--host", "127.0.0.1", "--port", str(port)]
    assert mlflow.argv[mlflow.argv.index("--host") + 1] == "127.0.0.1"
    assert mlflow.argv[mlflow.argv.index("--workers") + 1] == "1"
    assert mlflow.env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert stack.urls["prefect_api"] == f"http://127.0.0.1:{port}/api"


def test_busy_port_and_remote_mlflow_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(StoreError, match=f"port {port} on 127.0.0.1 is in use"):
            service_supervisor.LocalStack(cfg_for(tmp_path), "tiny", [], prefect_port=port)  # type: ignore[arg-type]
        assert service_supervisor.free_port(port) != port  # the default falls back to a free one
    remote = cfg_for(tmp_path, "tracking.uri=http://mlflow.internal:5000")
    with pytest.raises(StoreError, match="has its own server"):
        service_supervisor.LocalStack(remote, "tiny", [], mlflow=True)  # type: ignore[arg-type]


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
    assert service_supervisor.stop_running(cfg) is False  # type: ignore[arg-type]
    # A state file left by a serve that died: its pids are gone (or recycled): cleaned up.
    state_dir = service_supervisor.serve_dir(cfg)  # type: ignore[arg-type]
    state_dir.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = {"pid": dead.pid, "create_time": 0.0}
    (state_dir / service_supervisor.STATE_FILE).write_text(
        json.dumps({"supervisor": record, "services": [{"name": "x", **record}]})
    )
    assert service_supervisor.stop_running(cfg) is True  # type: ignore[arg-type]
    assert not (state_dir / service_supervisor.STATE_FILE).exists()
