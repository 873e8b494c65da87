"""Static checks of the deployment files under infra/ (Docker, Compose, Kubernetes, Helm).

Nothing here needs Docker, kubectl or helm: the files are parsed and cross-checked (names that
must match across files, placeholders a Prefect work pool would reject, loopback-only ports...).
"""

from __future__ import annotations

import fnmatch
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
DOCKERIGNORE = INFRA / "docker" / "Dockerfile.dockerignore"
COMPOSE_DIR = INFRA / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
INIT_SQL = COMPOSE_DIR / "init-db.sql"
K8S = INFRA / "k8s"
JOB_TEMPLATE = K8S / "gpu-job-template.json"
WORKER_VALUES = K8S / "values-prefect-worker.yaml"
HOSTFILE_CM = K8S / "deepspeed-hostfile.yaml"
WORKSPACE_PVC = K8S / "workspace-pvc.yaml"
DASK_VALUES = K8S / "values-dask.yaml"
PREFECT_YAML = REPO / "prefect.yaml"

TELEMETRY_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}
LONG_RUNNING = {"postgres", "prefect-server", "mlflow", "worker"}
OUR_IMAGE_SERVICES = {"mlflow", "worker", "deploy"}
# Filled in by Prefect's base job configuration itself (they are also declared in Prefect's
# default Kubernetes template, as they are in ours).
PREFECT_BUILTIN_VARIABLES = {"command", "env", "labels", "name"}
# Prefect's placeholder syntax (prefect.utilities.templating.PLACEHOLDER_CAPTURE_REGEX).
PLACEHOLDER = re.compile(r"{{\s*([\w\.\-\[\]$]+)\s*}}")

# (file, text its first line must contain): the command that uses the file.
FIRST_LINE_COMMANDS: dict[Path, str] = {
    DOCKERFILE: "docker build -f infra/docker/Dockerfile",
    DOCKERIGNORE: "docker build -f infra/docker/Dockerfile",
    COMPOSE_FILE: "docker compose -f infra/compose/compose.yaml up",
    INIT_SQL: "docker compose -f infra/compose/compose.yaml up",
    WORKER_VALUES: "helm install store-worker prefect/prefect-worker",
    HOSTFILE_CM: "kubectl apply -n store -f infra/k8s/deepspeed-hostfile.yaml",
    WORKSPACE_PVC: "kubectl apply -n store -f infra/k8s/workspace-pvc.yaml",
    DASK_VALUES: "helm install store-dask dask/dask -n store -f infra/k8s/values-dask.yaml",
}


# --------------------------------------------------------------------------- helpers


@cache
def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@cache
def _template() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(JOB_TEMPLATE.read_text())
    return data


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = _yaml(COMPOSE_FILE)
    return data


def _service(name: str) -> dict[str, Any]:
    service: dict[str, Any] = _compose()["services"][name]
    return service


def _env(service: dict[str, Any]) -> dict[str, str]:
    """A Compose service's environment, from either the mapping or the list form."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _command(service: dict[str, Any]) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else str(command)


def _volume_source(entry: str | dict[str, Any]) -> tuple[str, str]:
    """(source, target) of a Compose volume entry, short or long syntax."""
    if isinstance(entry, dict):
        return str(entry.get("source", "")), str(entry["target"])
    source, target = entry.split(":")[:2]
    return source, target


def _is_named_volume(source: str) -> bool:
    return bool(source) and not source.startswith((".", "/", "~", "$"))


def _pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = _template()["job_configuration"]["job_manifest"]["spec"]["template"][
        "spec"
    ]
    return spec


def _container() -> dict[str, Any]:
    container: dict[str, Any] = _pod_spec()["containers"][0]
    return container


def _pod_volume(name: str) -> dict[str, Any]:
    volumes = {volume["name"]: volume for volume in _pod_spec()["volumes"]}
    assert name in volumes, f"pod volume {name!r} missing; has {sorted(volumes)}"
    return volumes[name]


def _mount_path(volume_name: str) -> str:
    mounts = {m["name"]: m["mountPath"] for m in _container()["volumeMounts"]}
    assert volume_name in mounts, f"volume {volume_name!r} is not mounted"
    return mounts[volume_name]


def _variables() -> dict[str, Any]:
    properties: dict[str, Any] = _template()["variables"]["properties"]
    return properties


def _first_line(path: Path) -> str:
    return path.read_text().splitlines()[0]


def _dockerfile_instructions() -> list[str]:
    """Dockerfile instructions, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [
        line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")
    ]


def _dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _match_parts(pattern: list[str], path: list[str]) -> bool:
    if not pattern:
        return not path
    if pattern[0] == "**":
        return any(_match_parts(pattern[1:], path[i:]) for i in range(len(path) + 1))
    return (
        bool(path)
        and fnmatch.fnmatchcase(path[0], pattern[0])
        and _match_parts(pattern[1:], path[1:])
    )


def _docker_ignores(rel_path: str) -> bool:
    """Whether the .dockerignore rules exclude ``rel_path`` (Docker semantics: a rule matching a
    parent directory excludes everything below it; the last matching rule wins)."""
    parts = rel_path.split("/")
    ignored = False
    for rule in _dockerignore_patterns():
        negate = rule.startswith("!")
        pattern = rule.removeprefix("!").strip("/").split("/")
        if any(_match_parts(pattern, parts[:depth]) for depth in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


# --------------------------------------------------------------------------- all files


def test_every_yaml_and_json_file_parses() -> None:
    files = sorted(
        path
        for folder in (COMPOSE_DIR, K8S)
        for path in folder.iterdir()
        if path.suffix in {".yaml", ".yml", ".json"}
    )
    assert {COMPOSE_FILE, JOB_TEMPLATE, WORKER_VALUES, HOSTFILE_CM, WORKSPACE_PVC} <= set(files)
    for path in files:
        if path.suffix == ".json":
            documents = [json.loads(path.read_text())]
        else:
            documents = list(yaml.safe_load_all(path.read_text()))
        assert documents, f"{path} is empty"
        assert all(isinstance(doc, dict) and doc for doc in documents), f"{path}: not a mapping"


@pytest.mark.parametrize(
    ("path", "command"), FIRST_LINE_COMMANDS.items(), ids=lambda p: getattr(p, "name", "")
)
def test_first_line_is_the_command_that_uses_the_file(path: Path, command: str) -> None:
    line = _first_line(path)
    assert line.startswith(("#", "--")), f"{path.name}: first line is not a comment: {line!r}"
    assert command in line, f"{path.name}: first line {line!r} lacks {command!r}"


def test_every_commentable_infra_file_is_checked_for_its_command() -> None:
    files = {
        path
        for folder in (INFRA / "docker", COMPOSE_DIR, K8S)
        for path in folder.iterdir()
        if path.is_file() and path.suffix != ".json"  # JSON has no comments: see infra/README.md
    }
    assert files == set(FIRST_LINE_COMMANDS), "add new infra files to FIRST_LINE_COMMANDS"


def test_readme_documents_every_file() -> None:
    readme = (INFRA / "README.md").read_text()
    for path in [*FIRST_LINE_COMMANDS, JOB_TEMPLATE]:
        assert path.name in readme, f"infra/README.md does not mention {path.name}"
    assert (
        "prefect work-pool create store-gpu --type kubernetes "
        "--base-job-template infra/k8s/gpu-job-template.json" in readme
    )
    assert "prefect deployment run store/full-pipeline" in readme
    assert "prefect deployment run store/full-pipeline-gpu" in readme


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_pins_cpu_torch_by_default() -> None:
    instructions = _dockerfile_instructions()
    args = dict(
        line.removeprefix("ARG ").split("=", 1) for line in instructions if line.startswith("ARG ")
    )
    assert args["TORCH_SPEC"] == "torch==2.13.0"
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    # A CUDA index only ever appears in comments (the GPU build instructions).
    assert not any(re.search(r"whl/cu\d", line) for line in instructions)
    torch_install = next(i for i, line in enumerate(instructions) if '"$TORCH_SPEC"' in line)
    assert '--index-url "$TORCH_INDEX"' in instructions[torch_install]
    project_install = next(i for i, line in enumerate(instructions) if "pip install -e ." in line)
    assert torch_install < project_install, "torch must be installed before the project"


def test_dockerfile_image_layout() -> None:
    instructions = _dockerfile_instructions()
    assert instructions[0] == "FROM python:3.11-slim"
    assert "WORKDIR /app" in instructions
    assert "COPY . ." in instructions
    assert any("psycopg2-binary" in line and "pip install" in line for line in instructions)
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1] not in {"root", "0"}, "the image must end as a non-root user"
    env_text = " ".join(line for line in instructions if line.startswith("ENV "))
    for key, value in TELEMETRY_ENV.items():
        assert f"{key}={value}" in env_text


def test_dockerignore_drops_local_state_and_keeps_the_source() -> None:
    for rel in [
        ".venv/bin/python",
        ".git/HEAD",
        "workspace/ml-100k/items.parquet",
        "workspace-bench/x",
        "mlruns/0/meta.yaml",
        "store_core/__pycache__/config.cpython-311.pyc",
    ]:
        assert _docker_ignores(rel), f"{rel} would be sent to the Docker build"
    for rel in [
        "pyproject.toml",
        "README.md",
        "prefect.yaml",
        "store_core/workspace.py",
        "store_cli/app.py",
        "flows/pipeline.py",
        "infra/configs/ml-100k.yaml",
        "infra/deepspeed/zero2.json",
    ]:
        assert not _docker_ignores(rel), f"{rel} would be missing from the image"


# --------------------------------------------------------------------------- Compose


def test_compose_has_the_services() -> None:
    assert set(_compose()["services"]) >= LONG_RUNNING | {"deploy"}


def test_compose_dependencies_exist_and_wait_for_health() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        depends_on = service.get("depends_on") or {}
        if isinstance(depends_on, list):
            depends_on = {target: {} for target in depends_on}
        for target, spec in depends_on.items():
            assert target in services, f"{name} depends on unknown service {target}"
            if "healthcheck" in services[target]:
                assert spec.get("condition") == "service_healthy", f"{name} -> {target}"
    assert _service("worker")["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    assert _service("deploy")["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    assert _service("mlflow")["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_named_volumes_are_declared() -> None:
    declared = set(_compose().get("volumes") or {})
    used = {
        source
        for service in _compose()["services"].values()
        for entry in service.get("volumes", [])
        if _is_named_volume(source := _volume_source(entry)[0])
    }
    assert used, "no named volumes at all?"
    assert used <= declared, f"undeclared volumes: {sorted(used - declared)}"


def test_compose_bind_mounts_exist() -> None:
    for service in _compose()["services"].values():
        for entry in service.get("volumes", []):
            source = _volume_source(entry)[0]
            if source.startswith("."):
                assert (COMPOSE_DIR / source).exists(), f"bind mount {source} missing"


def test_compose_ports_are_loopback_only() -> None:
    published = []
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port}"
            else:
                assert isinstance(port, str), f"{name}: quote ports, got {port!r}"
                assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
            published.append(port)
    assert "127.0.0.1:4200:4200" in published
    assert "127.0.0.1:5000:5000" in published


@pytest.mark.parametrize("name", ["prefect-server", "worker", "mlflow", "deploy"])
def test_compose_services_switch_telemetry_off(name: str) -> None:
    env = _env(_service(name))
    for key, value in TELEMETRY_ENV.items():
        assert env.get(key) == value, f"{name}: {key}={env.get(key)!r}"


def test_compose_builds_use_the_project_dockerfile() -> None:
    for name in OUR_IMAGE_SERVICES:
        build = _service(name)["build"]
        context = (COMPOSE_DIR / build["context"]).resolve()
        assert context == REPO, f"{name}: build context must be the repo root"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    assert DOCKERFILE.is_file()
    images = {_service(name)["image"] for name in OUR_IMAGE_SERVICES}
    assert len(images) == 1, f"one project image expected, got {images}"
    assert "cu" not in _service("mlflow")["build"]["args"]["TORCH_INDEX"].rsplit("/", 1)[-1]


def test_compose_postgres_backends_and_init_sql() -> None:
    sql = INIT_SQL.read_text()
    for database in ("prefect", "mlflow"):
        assert re.search(rf"CREATE DATABASE {database};", sql)
    postgres = _service("postgres")
    assert postgres["image"].startswith("postgres:16")
    assert "healthcheck" in postgres
    targets = [_volume_source(v)[1] for v in postgres["volumes"]]
    assert any(t.startswith("/docker-entrypoint-initdb.d/") for t in targets)
    assert _env(postgres)["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD")
    db_url = _env(_service("prefect-server"))["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert db_url.startswith("postgresql+asyncpg://")
    assert "${POSTGRES_PASSWORD" in db_url and db_url.endswith("@postgres:5432/prefect")


def test_compose_prefect_server() -> None:
    server = _service("prefect-server")
    assert server["image"] == "prefecthq/prefect:3-python3.11"
    assert _command(server) == "prefect server start --host 0.0.0.0 --port 4200"
    assert "http://localhost:4200/api/health" in _command(
        {"command": server["healthcheck"]["test"]}
    )


def test_compose_mlflow_server() -> None:
    mlflow = _service("mlflow")
    command = [str(part) for part in mlflow["command"]]
    assert command[:2] == ["mlflow", "server"]

    def option(flag: str) -> str:
        assert flag in command, f"mlflow server lacks {flag}"
        return command[command.index(flag) + 1]

    assert option("--workers") == "1"
    assert "--serve-artifacts" in command
    assert option("--backend-store-uri").startswith("postgresql://")
    assert option("--backend-store-uri").endswith("@postgres:5432/mlflow")
    artifacts = option("--artifacts-destination")
    mounts = dict(_volume_source(v)[::-1] for v in mlflow["volumes"])
    assert _is_named_volume(mounts.get(artifacts, "")), "artifacts must be on a named volume"
    allowed_hosts = option("--allowed-hosts").split(",")
    assert "mlflow:*" in allowed_hosts, "the worker reaches MLflow as mlflow:5000"
    assert _env(mlflow)["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert "http://localhost:5000/health" in _command({"command": mlflow["healthcheck"]["test"]})


def test_compose_worker() -> None:
    worker = _service("worker")
    command = _command(worker)
    assert "prefect work-pool create store-process --type process" in command
    assert "prefect worker start --pool store-process --type process" in command
    env = _env(worker)
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["STORE_WORKSPACE_ROOT"] == "/workspace"
    mounts = {target: source for source, target in map(_volume_source, worker["volumes"])}
    assert _is_named_volume(mounts.get("/workspace", "")), "workspace volume not at /workspace"
    assert worker["depends_on"]["mlflow"]["condition"] == "service_healthy"


def test_compose_deploy_is_one_shot_from_app() -> None:
    deploy = _service("deploy")
    assert deploy["working_dir"] == "/app"
    assert str(deploy.get("restart", "no")) == "no"
    assert _env(deploy)["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    command = _command(deploy)
    assert "prefect --no-prompt deploy" in command
    names = re.findall(r"--name (\S+)", command)
    assert names, "deploy registers no deployment"
    if PREFECT_YAML.exists():
        pools = {d["name"]: d["work_pool"]["name"] for d in _yaml(PREFECT_YAML)["deployments"]}
        for name in names:
            assert pools.get(name) == "store-process", f"{name} is not on pool store-process"


# --------------------------------------------------------------------------- Kubernetes


def test_k8s_manifests_have_identity() -> None:
    manifests = [p for p in K8S.glob("*.yaml") if p not in (WORKER_VALUES, DASK_VALUES)]
    assert {HOSTFILE_CM, WORKSPACE_PVC} <= set(manifests)
    for path in manifests:
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc.get("apiVersion"), f"{path.name}: no apiVersion"
            assert doc.get("kind"), f"{path.name}: no kind"
            assert doc.get("metadata", {}).get("name"), f"{path.name}: no metadata.name"


def test_job_template_has_prefect_sections() -> None:
    template = _template()
    assert set(template) == {"job_configuration", "variables"}
    assert template["variables"]["type"] == "object"
    manifest = template["job_configuration"]["job_manifest"]
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job")


def test_job_template_placeholders_are_declared() -> None:
    used = set(PLACEHOLDER.findall(json.dumps(_template()["job_configuration"])))
    undeclared = used - set(_variables()) - PREFECT_BUILTIN_VARIABLES
    assert not undeclared, f"placeholders without a variable: {sorted(undeclared)}"
    unused = set(_variables()) - used
    assert not unused, f"variables no placeholder uses: {sorted(unused)}"


def test_job_template_passes_prefects_own_validation() -> None:
    from prefect.server.schemas.actions import validate_base_job_template

    validate_base_job_template(_template())  # raises ValueError on undeclared placeholders


def test_job_template_renders_a_gpu_job_with_the_defaults() -> None:
    from prefect.utilities.templating import apply_values

    defaults = {k: v["default"] for k, v in _variables().items() if "default" in v}
    rendered = apply_values(_template()["job_configuration"], defaults)
    assert "{{" not in json.dumps(rendered)
    pod = rendered["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
    assert container["resources"]["requests"] == {"nvidia.com/gpu": 8}
    assert container["image"] == "store:gpu"
    assert rendered["job_manifest"]["metadata"]["namespace"] == "store"
    assert pod["nodeSelector"] and pod["tolerations"]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_job_pod_requests_gpus() -> None:
    resources = _container()["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert resources["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    gpus = _variables()["gpus"]
    assert gpus["type"] == "integer" and gpus["default"] == 8


def test_job_pod_runs_prefects_command() -> None:
    assert _template()["job_configuration"]["command"] == "{{ command }}"
    assert _container()["args"] == "{{ command }}"
    assert _container()["name"] == "prefect-job"  # required by Prefect's Kubernetes worker
    assert _pod_spec()["restartPolicy"] == "Never"


def test_job_pod_mounts_the_hostfile_configmap() -> None:
    configmap = _yaml(HOSTFILE_CM)
    assert configmap["kind"] == "ConfigMap"
    volume = _pod_volume("deepspeed-hostfile")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    keys = {item["key"]: item["path"] for item in volume["configMap"].get("items", [])}
    assert keys in ({}, {"hostfile": "hostfile"})
    assert "hostfile" in configmap["data"]
    assert _mount_path("deepspeed-hostfile") == "/etc/deepspeed"  # -> /etc/deepspeed/hostfile


def test_job_pod_mounts_the_workspace_pvc() -> None:
    pvc = _yaml(WORKSPACE_PVC)
    assert pvc["kind"] == "PersistentVolumeClaim"
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    volume = _pod_volume("workspace")
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert _mount_path("workspace") == "/workspace"
    assert _pod_spec()["securityContext"]["fsGroup"] == 1000  # the image's uid/gid


def test_job_pod_has_memory_backed_dev_shm() -> None:
    assert _pod_volume("dshm")["emptyDir"]["medium"] == "Memory"
    assert _mount_path("dshm") == "/dev/shm"


def test_job_pod_env() -> None:
    env = {item["name"]: item.get("value") for item in _container()["env"]}
    for key, value in TELEMETRY_ENV.items():
        assert env.get(key) == value
    assert env["MLFLOW_TRACKING_URI"] == "{{ mlflow_tracking_uri }}"
    assert env["STORE_WORKSPACE_ROOT"] == "/workspace"  # where the PVC is mounted


def test_job_pod_targets_gpu_nodes() -> None:
    assert _pod_spec()["nodeSelector"] == "{{ node_selector }}"
    assert _pod_spec()["tolerations"] == "{{ tolerations }}"
    tolerations = _variables()["tolerations"]["default"]
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)


def test_hostfile_slots_match_the_gpu_request() -> None:
    hostfile = _yaml(HOSTFILE_CM)["data"]["hostfile"]
    lines = [line.strip() for line in hostfile.splitlines() if line.strip()]
    hosts = [line for line in lines if not line.startswith("#")]
    assert hosts == [re.sub(r"\s+", " ", h) for h in hosts]
    parsed = [re.fullmatch(r"(\S+) slots=(\d+)", line) for line in hosts]
    assert all(parsed), f"not '<host> slots=<n>': {hosts}"
    assert [(m[1], int(m[2])) for m in parsed if m] == [
        ("localhost", _variables()["gpus"]["default"])
    ]


def test_worker_values_embed_the_job_template() -> None:
    worker = _yaml(WORKER_VALUES)["worker"]
    embedded = json.loads(worker["config"]["baseJobTemplate"]["configuration"])
    assert embedded == _template(), "values-prefect-worker.yaml and gpu-job-template.json differ"


def test_worker_values_connect_to_the_gpu_pool() -> None:
    worker = _yaml(WORKER_VALUES)["worker"]
    assert worker["config"]["workPool"] == "store-gpu"
    assert worker["config"]["type"] == "kubernetes"
    assert worker["apiConfig"] == "selfHostedServer"
    assert worker["selfHostedServerApiConfig"]["apiUrl"].endswith("/api")
    env = {item["name"]: item["value"] for item in worker["extraEnvVars"]}
    assert env == TELEMETRY_ENV
    if PREFECT_YAML.exists():
        pools = {d["name"]: d["work_pool"]["name"] for d in _yaml(PREFECT_YAML)["deployments"]}
        assert pools.get("full-pipeline-gpu") == "store-gpu"
