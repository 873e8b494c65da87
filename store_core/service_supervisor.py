"""The supervisor of ``store serve``: starts and stops the processes a laptop user needs
to run the pipeline as a service (the deployments themselves are :mod:`flows.deployments`).

Starts, bound to 127.0.0.1, in this order and each only once the previous one is healthy:

1. a Prefect server (skipped when ``PREFECT_API_URL`` already points at one), with its
   database in ``<workspace>/prefect/prefect.db`` unless
   ``PREFECT_API_DATABASE_CONNECTION_URL`` is set: each workspace has its own runs;
2. optionally a lean MLflow server (one worker, no job execution) on the workspace's
   tracking store, for its UI; the experiment is created through it and its runs-table
   URL recorded (``urls["mlflow_runs"]``); the flow runs get the UI's URL
   (``STORE_MLFLOW_UI_URL``) to link their MLflow runs;
3. ``python -m flows.deployments``: the ``full-pipeline`` and ``nightly-retokenize``
   deployments of the flow ``store``, served (flow runs execute as its subprocesses).

Each runs in its own process group with its output in ``<workspace>/serve/<name>.log``.
A state file (``<workspace>/serve/serve.json``) records the supervisor and every process
so ``store serve --stop`` (another terminal) can stop them. Stopping goes in the reverse
order (deployments first: a runner whose server is gone hangs), SIGTERM then SIGKILL
after a grace period, and waits until no process of the group is left.

This module starts processes; it never imports prefect.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

from store_core.config import StoreConfig
from store_core.errors import StoreError
from store_core.telemetry import disable_telemetry
from store_core.tracking import UI_URL_ENV

logger = logging.getLogger(__name__)

STATE_FILE = "serve.json"
HOST = "127.0.0.1"
DEFAULT_PREFECT_PORT = 4200
DEFAULT_MLFLOW_PORT = 5000
STARTUP_TIMEOUT_S = 180.0
STOP_GRACE_S = 20.0
#: The deployments ``flows.deployments`` serves; that service is ready once the server
#: knows every one of them (``prefect.serve`` registers them one after another).
DEPLOYMENTS = ("store/full-pipeline", "store/nightly-retokenize")
MLFLOW_SERVICE = "mlflow-server"
#: The Prefect server's database, per workspace (unless the user configures one): runs
#: and artifact histories of two workspaces never mix in one UI.
PREFECT_DB_ENV = "PREFECT_API_DATABASE_CONNECTION_URL"


#: Stream flow-run logs out of the server, so ``prefect deployment run --watch`` shows
#: the run's log lines (stage progress), not only its state changes.
LOG_STREAMING = {
    "PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED": "true",
    "PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED": "true",
}


def prefect_database(cfg: StoreConfig) -> dict[str, str]:
    """``{PREFECT_API_DATABASE_CONNECTION_URL: sqlite+aiosqlite:///<workspace>/prefect/
    prefect.db}`` for the Prefect server ``store serve`` starts; empty when the user set
    the variable (their database wins)."""
    if os.environ.get(PREFECT_DB_ENV):
        return {}
    directory = Path(cfg.workspace).resolve() / "prefect"
    directory.mkdir(parents=True, exist_ok=True)
    return {PREFECT_DB_ENV: f"sqlite+aiosqlite:///{directory / 'prefect.db'}"}


def serve_dir(cfg: StoreConfig) -> Path:
    return Path(cfg.workspace) / "serve"


def free_port(preferred: int | None = None) -> int:
    """``preferred`` when it is free on 127.0.0.1, else any free port."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise StoreError("no free TCP port on 127.0.0.1")  # pragma: no cover


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return 200 <= int(response.status) < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass
class Service:
    """One child process: how to start it and how to tell it is ready (every URL of
    ``ready_urls`` answers 2xx)."""

    name: str
    argv: list[str]
    ready_urls: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    _log: IO[bytes] | None = None

    def start(self, logs: Path) -> None:
        self.log_path = logs / f"{self.name}.log"
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**clean_environ(), **self.env},
            cwd=self.cwd,
            start_new_session=True,  # its own process group: stopped as a whole
        )
        logger.info("started %s (pid %d), log %s", self.name, self.proc.pid, self.log_path)

    def wait_ready(self, timeout_s: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        waiting = list(self.ready_urls)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StoreError(
                    f"{self.name} exited with status {self.proc.returncode} while starting; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            waiting = [url for url in self.ready_urls if not http_ok(url)]
            if not waiting:
                return
            time.sleep(0.5)
        raise StoreError(
            f"{self.name} not ready at {', '.join(waiting)} after {timeout_s:.0f} s; "
            f"last lines of {self.log_path}:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        if self.proc is not None:
            stop_group(self.proc.pid, grace_s, self.name)
            self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


#: Rendezvous variables a process that trained in-process (torch.distributed) carries;
#: a child that inherited them would try to listen on the parent's port.
_RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _RANK_ENV}


def _group_members(pid: int) -> list[psutil.Process]:
    """The process and every descendant (flow runs, uvicorn workers) still alive."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_group(pid: int, grace_s: float = STOP_GRACE_S, name: str = "") -> None:
    """SIGTERM the process group led by ``pid`` (and any descendant that left it), then
    SIGKILL whatever is still alive after ``grace_s``."""
    members = _group_members(pid)
    if not members:
        return
    logger.info("stopping %s (pid %d, %d processes)", name or "process", pid, len(members))
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        for proc in members:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(sig)
        _, alive = psutil.wait_procs(members, timeout=wait_s)
        if not alive:
            return
        members = alive
    raise StoreError(f"could not stop {name or pid}: {[p.pid for p in members]} still alive")


class LocalStack:
    """The processes of one ``store serve``, started and stopped in order."""

    def __init__(
        self,
        cfg: StoreConfig,
        config: str | None,
        overrides: list[str],
        *,
        prefect_port: int | None = None,
        mlflow: bool = False,
        mlflow_port: int | None = None,
        schedule: bool = True,
    ) -> None:
        disable_telemetry()
        self.cfg = cfg
        self.dir = serve_dir(cfg)
        self.services: list[Service] = []
        self.urls: dict[str, str] = {}
        python = sys.executable
        repo_root = str(Path(__file__).resolve().parents[1])
        external = os.environ.get("PREFECT_API_URL")
        if external:
            self.api_url = external.rstrip("/")
            self.urls["prefect_api"] = self.api_url
            self.urls["prefect_ui"] = self.api_url.removesuffix("/api")
        else:
            port = free_port(prefect_port or DEFAULT_PREFECT_PORT)
            if prefect_port and port != prefect_port:
                raise StoreError(f"port {prefect_port} on {HOST} is in use (--prefect-port)")
            self.api_url = f"http://{HOST}:{port}/api"
            self.urls["prefect_ui"] = f"http://{HOST}:{port}"
            self.urls["prefect_api"] = self.api_url
            self.services.append(
                Service(
                    "prefect-server",
                    [
                        python,
                        "-m",
                        "prefect",
                        "server",
                        "start",
                        "--host",
                        HOST,
                        "--port",
                        f"{port}",
                    ],
                    (f"{self.api_url}/health",),
                    env={
                        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                        **LOG_STREAMING,
                        **prefect_database(cfg),
                    },
                )
            )
        deployments_env = {"PREFECT_API_URL": self.api_url, "PYTHONUNBUFFERED": "1"}
        if mlflow:
            self.services.append(self._mlflow_service(python, mlflow_port))
            deployments_env[UI_URL_ENV] = self.urls["mlflow_ui"]
        argv = [python, "-m", "flows.deployments"]
        argv += ["--config", config] if config else []
        for item in overrides:
            argv += ["--set", item]
        argv += [] if schedule else ["--no-schedule"]
        self.services.append(
            Service(
                "deployments",
                argv,
                tuple(f"{self.api_url}/deployments/name/{name}" for name in DEPLOYMENTS),
                env=deployments_env,
                cwd=repo_root,
            )
        )

    def _link_runs_view(self) -> None:
        """Create the experiment through the MLflow server (a classic ML experiment, see
        :func:`store_core.tracking.ensure_experiment`) and record its runs-table URL."""
        from store_core.tracking import ensure_experiment, experiment_url

        base = self.urls["mlflow_ui"]
        self.urls["mlflow_runs"] = experiment_url(base, ensure_experiment(self.cfg, base))

    def _mlflow_service(self, python: str, port: int | None) -> Service:
        from store_core.tracking import artifact_location, tracking_uri

        uri = tracking_uri(self.cfg)
        if not uri.startswith("sqlite:"):
            raise StoreError(
                f"--mlflow serves the workspace's SQLite tracking store; the tracking URI is "
                f"{uri}, which has its own server: open that instead"
            )
        chosen = free_port(port or DEFAULT_MLFLOW_PORT)
        if port and chosen != port:
            raise StoreError(f"port {port} on {HOST} is in use (--mlflow-port)")
        self.urls["mlflow_ui"] = f"http://{HOST}:{chosen}"
        return Service(
            MLFLOW_SERVICE,
            [
                *(python, "-m", "mlflow", "server", "--host", HOST, "--port", str(chosen)),
                *("--workers", "1", "--backend-store-uri", uri),
                *("--artifacts-destination", str(artifact_location(self.cfg))),
            ],
            (f"http://{HOST}:{chosen}/health",),
            env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )

    # -- lifecycle -------------------------------------------------------------------
    def start(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Start every service in order; on any failure stop what was started."""
        state = self.dir / STATE_FILE
        if state.exists():
            previous = json.loads(state.read_text())
            if _alive(previous.get("supervisor")):
                raise StoreError(
                    f"store serve is already running for {self.cfg.workspace} "
                    f"(pid {previous['supervisor']['pid']}); stop it with `store serve --stop`"
                )
            state.unlink()
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            for service in self.services:
                service.start(self.dir)
                service.wait_ready(timeout_s)
                if service.name == MLFLOW_SERVICE:
                    self._link_runs_view()
        except BaseException:
            self.stop()
            raise
        self._write_state()

    def _write_state(self) -> None:
        record = {
            "supervisor": _identity(os.getpid()),
            "urls": self.urls,
            "services": [
                {"name": s.name, **_identity(s.proc.pid), "log": str(s.log_path)}
                for s in self.services
                if s.proc is not None
            ],
        }
        tmp = self.dir / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(self.dir / STATE_FILE)

    def stop(self) -> None:
        """Stop in reverse start order: deployments, MLflow, the Prefect server."""
        for service in reversed(self.services):
            service.stop()
        (self.dir / STATE_FILE).unlink(missing_ok=True)

    def watch(self) -> int:
        """Block until SIGINT/SIGTERM (0) or until a service dies (1); then stop all."""
        stop_requested: list[int] = []

        def request_stop(signum: int, _frame: Any) -> None:
            stop_requested.append(signum)

        previous = {
            sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        status = 0
        try:
            while not stop_requested:
                dead = [
                    s for s in self.services if s.proc is not None and s.proc.poll() is not None
                ]
                if dead:
                    service = dead[0]
                    logger.error(
                        "%s exited with status %s; stopping the rest. Last lines of %s:\n%s",
                        service.name,
                        service.proc.returncode if service.proc else None,
                        service.log_path,
                        service.log_tail(),
                    )
                    status = 1
                    break
                time.sleep(0.5)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.stop()
        return status


def _identity(pid: int) -> dict[str, Any]:
    """A pid plus its start time, so a recycled pid is never mistaken for ours."""
    return {"pid": pid, "create_time": psutil.Process(pid).create_time()}


def _alive(identity: dict[str, Any] | None) -> bool:
    """Whether the process ``identity`` names still runs: a zombie (exited, not yet reaped
    by its parent) has stopped, so ``store serve --stop`` does not wait out its timeout
    for a supervisor whose parent reaps it late."""
    if not identity:
        return False
    try:
        proc = psutil.Process(int(identity["pid"]))
        same = abs(proc.create_time() - float(identity["create_time"])) < 1e-3
        return same and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop_running(cfg: StoreConfig, timeout_s: float = 60.0) -> bool:
    """``store serve --stop``: ask the running supervisor to stop (it stops its services
    in order); stop the services directly if the supervisor is gone. False when nothing
    was running."""
    state_path = serve_dir(cfg) / STATE_FILE
    if not state_path.exists():
        return False
    state = json.loads(state_path.read_text())
    supervisor = state.get("supervisor")
    if _alive(supervisor):
        os.kill(int(supervisor["pid"]), signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _alive(supervisor) and time.monotonic() < deadline:
            time.sleep(0.2)
    for service in reversed(state.get("services", [])):
        if _alive(service):
            stop_group(int(service["pid"]), STOP_GRACE_S, service["name"])
    state_path.unlink(missing_ok=True)
    return True
