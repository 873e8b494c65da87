"""The Dask cluster pieces of infra/: the Compose services and the Helm values run the
project's image with single-thread workers that see the workspace where the flow runs see
it and report to the Prefect server, and the config accepts the address they serve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from store_core.config import load_config
from store_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "infra" / "compose" / "compose.yaml"
VALUES = REPO / "infra" / "k8s" / "values-dask.yaml"


def _services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]
    return services


def _env(entries: list[dict[str, str]]) -> dict[str, str]:
    return {entry["name"]: entry["value"] for entry in entries}


def test_compose_dask_cluster_serves_the_documented_address() -> None:
    services = _services()
    scheduler, worker = services["dask-scheduler"], services["dask-worker"]
    assert scheduler["image"] == worker["image"] == services["worker"]["image"]
    assert scheduler["command"][:2] == ["dask", "scheduler"]
    assert "8786" in scheduler["command"]
    assert "8786" in scheduler["healthcheck"]["test"][-1]
    command = [str(part) for part in worker["command"]]
    assert command[:3] == ["dask", "worker", "tcp://dask-scheduler:8786"]
    assert command[command.index("--nthreads") + 1] == "1"
    assert worker["depends_on"]["dask-scheduler"]["condition"] == "service_healthy"
    # the workers see the workspace and the Prefect/MLflow servers as the flow runs do
    assert worker["volumes"] == services["worker"]["volumes"]
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "STORE_WORKSPACE_ROOT"):
        assert worker["environment"][key] == services["worker"]["environment"][key]
    assert worker["environment"]["DO_NOT_TRACK"] == "true"
    cfg = load_config("tiny", ["inference.address=tcp://dask-scheduler:8786"])
    assert cfg.inference.scaled_out


def test_helm_values_mount_the_workspace_pvc_single_thread() -> None:
    values = yaml.safe_load(VALUES.read_text())
    worker = values["worker"]
    assert worker["threads_per_worker"] == 1
    claims = [v["persistentVolumeClaim"]["claimName"] for v in worker["mounts"]["volumes"]]
    pvc = yaml.safe_load((REPO / "infra" / "k8s" / "workspace-pvc.yaml").read_text())
    assert claims == [pvc["metadata"]["name"]]
    assert worker["mounts"]["volumeMounts"][0]["mountPath"] == "/workspace"
    env = _env(worker["env"])
    assert env["STORE_WORKSPACE_ROOT"] == "/workspace"
    assert env["PREFECT_API_URL"].endswith(":4200/api")
    assert values["scheduler"]["servicePort"] == 8786
    assert values["jupyter"]["enabled"] is False
    assert worker["resources"]["limits"]["cpu"] == 1  # the chart sets --nthreads only then
    extra = worker["extraArgs"]
    assert extra[extra.index("--preload") + 1] == "store_core.sharding"
    assert worker["image"]["dask_worker"] == "dask-worker"


ALIASES = REPO / "infra" / "docker" / "dask-aliases"


@pytest.mark.parametrize(
    ("alias", "verb"), [("dask-scheduler", "scheduler"), ("dask-worker", "worker")]
)
def test_image_aliases_run_the_dask_cli_the_chart_expects(alias: str, verb: str) -> None:
    """The chart starts ``dask-scheduler`` / ``dask-worker``; distributed >= 2026.6 only
    installs ``dask scheduler`` / ``dask worker``: the image's aliases run those."""
    import os
    import subprocess
    import sys

    dockerfile = (REPO / "infra" / "docker" / "Dockerfile").read_text()
    assert f"infra/docker/dask-aliases/{alias}" in dockerfile
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        [str(ALIASES / alias), "--help"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"Usage: dask {verb} [OPTIONS]")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["inference.address=http://host:8786"], "not a Dask scheduler address"),
        (["inference.workers=2", "inference.address=tcp://h:1"], "either workers"),
        (["inference.workers=0"], "inference.workers"),
        (["inference.shards=0"], "inference.shards"),
    ],
)
def test_inference_config_refuses_what_cannot_run(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)


def test_inference_defaults_to_in_process() -> None:
    assert not load_config("tiny").inference.scaled_out
