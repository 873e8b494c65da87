"""The pipeline as a service, as a user runs it: ``store serve`` (a real Prefect server on
a free loopback port, the deployments served, an MLflow server), then
``prefect deployment run store/full-pipeline`` and ``store/nightly-retokenize`` through
the Prefect CLI, then ``store serve --stop``. Also what users see in the two UIs (issue
18): the printed runs-table link, the parent run's headline metrics and links, library
warnings and stage lines in the flow-run logs, per-stage artifacts, the ``@production``
alias, and a second workspace's server that shows none of these runs. Runs in the
default test run (~9 min on a busy 2-core machine: one full run, three nightly runs)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from store_core import storage, tracking
from store_core.service_supervisor import STATE_FILE, clean_environ, free_port
from tests.conftest import (
    ADDED_ITEMS,
    CHANGED_ITEMS,
    REMOVED_ITEM,
    REPO,
    TINY_DATA,
    write_changed_catalogue,
)

pytestmark = pytest.mark.service  # starts servers or CLI processes

BIN = Path(sys.executable).parent
EXPERIMENT = "store-tiny"
MODEL_NAME = "store-tiny-recommender"
NIGHTLY_CRON = "0 3 1 1 *"  # far from any test run, so the schedule never fires here
TIMEZONE = "Europe/Berlin"


@dataclass
class Served:
    proc: subprocess.Popen[str]
    workspace: Path
    data: Path
    env: dict[str, str]
    args: list[str]
    prefect_port: int
    mlflow_port: int
    log: Path
    watched: dict[str, str] = field(default_factory=dict)  # flow-run id -> --watch output

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def db(self) -> str:
        return str(self.workspace / "store.duckdb")

    @property
    def state(self) -> dict[str, Any]:
        return dict(json.loads((self.workspace / "serve" / STATE_FILE).read_text()))

    def store(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "store"), *argv, *self.args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
        )

    def run_deployment(self, name: str) -> str:
        """``prefect deployment run store/<name> --watch``; returns the flow-run id."""
        proc = subprocess.run(
            [str(BIN / "prefect"), "deployment", "run", f"store/{name}", "--watch"],
            env={**self.env, "PREFECT_API_URL": self.api},
            capture_output=True,
            text=True,
            timeout=600,
        )
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-4000:] + self.logs()
        assert "Completed" in output, output[-4000:]
        flow_run_id = next(
            line.split("UUID:")[1].strip() for line in output.splitlines() if "UUID:" in line
        )
        self.watched[flow_run_id] = output
        return flow_run_id

    def api_post(self, path: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(
            f"{self.api}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def api_get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.api}{path}", timeout=30) as response:
            return json.loads(response.read())

    def artifacts(self, flow_run_id: str) -> dict[str, str]:
        found = self.api_post(
            "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
        )
        return {a["key"]: a["data"] for a in found if a.get("key")}

    def subflow_runs(self, flow_run_id: str) -> dict[str, str]:
        """Subflow name -> flow-run id of the stages run by ``flow_run_id``."""
        found = self.api_post(
            "/flow_runs/filter",
            {"flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}}},
        )
        flows = {f["id"]: f["name"] for f in self.api_post("/flows/filter", {})}
        return {flows[r["flow_id"]]: r["id"] for r in found}

    def run_logs(self, flow_run_ids: list[str], min_level: int = 0) -> list[str]:
        """The messages of the flow runs' logs (``min_level`` and up), as the Prefect UI
        shows them."""
        messages: list[str] = []
        while True:  # the API pages by 200
            found = self.api_post(
                "/logs/filter",
                {
                    "logs": {"flow_run_id": {"any_": flow_run_ids}, "level": {"ge_": min_level}},
                    "sort": "TIMESTAMP_ASC",
                    "limit": 200,
                    "offset": len(messages),
                },
            )
            messages += [entry["message"] for entry in found]
            if len(found) < 200:
                return messages

    def mlflow(self) -> MlflowClient:
        return MlflowClient(tracking_uri=f"http://127.0.0.1:{self.mlflow_port}")

    def parent_run(self, flow_run_id: str) -> tuple[MlflowClient, str, Run]:
        """(client, experiment id, the one MLflow parent run tagged with the flow run)."""
        client = self.mlflow()
        experiment = client.get_experiment_by_name(EXPERIMENT)
        assert experiment is not None
        (parent,) = client.search_runs(
            [experiment.experiment_id], f"tags.`{tracking.FLOW_RUN_TAG}` = '{flow_run_id}'"
        )
        return client, experiment.experiment_id, parent

    def logs(self) -> str:
        parts = [f"\n--- {self.log.name}\n{self.log.read_text()[-3000:]}"]
        for path in sorted((self.workspace / "serve").glob("*.log")):
            parts.append(f"\n--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "".join(parts)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("served")
    data = root / "data"
    shutil.copytree(TINY_DATA, data)
    workspace = root / "ws"
    # As in a user's shell: no server preset, and none of the rendezvous variables that
    # earlier in-process training in this pytest process left behind.
    env = {
        k: v
        for k, v in clean_environ().items()
        if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")
    }
    env.update(PREFECT_HOME=str(root / "prefect-home"), PYTHONUNBUFFERED="1", COLUMNS="200")
    args = [
        "--config",
        "tiny",
        "--set",
        f"workspace={workspace}",
        "--set",
        f"data.path={data}",
        "--set",
        f"service.nightly_cron={NIGHTLY_CRON}",
        "--set",
        f"service.timezone={TIMEZONE}",
    ]
    prefect_port, mlflow_port = free_port(), free_port()
    log = root / "store-serve.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [
                str(BIN / "store"),
                "serve",
                *args,
                "--prefect-port",
                str(prefect_port),
                "--mlflow",
                "--mlflow-port",
                str(mlflow_port),
            ],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
        )
    stack = Served(proc, workspace, data, env, args, prefect_port, mlflow_port, log)
    deadline = time.monotonic() + 300
    while not (workspace / "serve" / STATE_FILE).exists():
        assert proc.poll() is None, "store serve exited while starting" + stack.logs()
        assert time.monotonic() < deadline, "store serve not ready in 300 s" + stack.logs()
        time.sleep(1)
    try:
        yield stack
    finally:
        if proc.poll() is None:
            stack.store("serve", "--stop")
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:  # pragma: no cover - last resort
                proc.kill()


@pytest.fixture(scope="module")
def full_run(served: Served) -> str:
    """The flow-run id of one ``store/full-pipeline`` run on the served stack, after a
    killed process left a RUNNING MLflow run behind (which the run's first MLflow run
    reaps, with a warning: a library warning that every such run logs)."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    client = served.mlflow()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    client.create_run(
        experiment.experiment_id,
        run_name="killed-earlier",
        tags={
            tracking.WORKSPACE_TAG: str(served.workspace.resolve()),
            tracking.HOST_TAG: socket.gethostname(),
            tracking.PID_TAG: str(dead.pid),
        },
    )
    return served.run_deployment("full-pipeline")


def test_serve_prints_urls_and_binds_loopback(served: Served) -> None:
    urls = served.state["urls"]
    assert urls["prefect_api"] == served.api
    assert urls["mlflow_ui"] == f"http://127.0.0.1:{served.mlflow_port}"
    listening = {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN
    }
    assert ("127.0.0.1", served.prefect_port) in listening
    assert ("127.0.0.1", served.mlflow_port) in listening
    assert not any(port == served.prefect_port and ip != "127.0.0.1" for ip, port in listening)
    output = served.log.read_text()
    assert f"export PREFECT_API_URL={served.api}" in output
    # The printed MLflow link opens the experiment's runs table: the URL asks for the
    # classic-ML workflow, and the experiment is marked as one (the UI reads both).
    experiment = served.mlflow().get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    runs_view = (
        f"http://127.0.0.1:{served.mlflow_port}/#/experiments/{experiment.experiment_id}"
        "/runs?workflowType=machine_learning"
    )
    assert urls["mlflow_runs"] == runs_view
    assert f"MLflow UI:    {runs_view}" in output
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    # This workspace's Prefect server keeps its runs in the workspace.
    assert (served.workspace / "prefect" / "prefect.db").is_file()
    # The nightly deployment carries the configured cron and time zone.
    nightly = served.api_get("/deployments/name/store/nightly-retokenize")
    (schedule,) = nightly["schedules"]
    assert schedule["schedule"]["cron"] == NIGHTLY_CRON
    assert schedule["schedule"]["timezone"] == TIMEZONE
    assert nightly["parameters"]["job"] == "retokenize"


def test_full_pipeline_deployment(served: Served, full_run: str) -> None:
    # DuckDB: every item has a semantic ID, and the version says which model made it.
    assert storage.query(served.db, "SELECT count(*) FROM current_semantic_ids")[1] == [(48,)]
    _, rows = storage.query(
        served.db, "SELECT model_uri, mlflow_run_id FROM semantic_id_versions WHERE version = 1"
    )
    ((model_uri, model_run),) = rows
    assert model_uri == f"models:/{MODEL_NAME}/1"

    # MLflow: a parent run tagged with this flow run and deployment, one nested run per stage.
    client, experiment_id, parent = served.parent_run(full_run)
    assert parent.data.tags[tracking.DEPLOYMENT_NAME_TAG] == "full-pipeline"
    children = client.search_runs(
        [experiment_id], f"tags.`{tracking.PARENT_TAG}` = '{parent.info.run_id}'"
    )
    stages = {r.data.tags[tracking.STAGE_TAG]: r for r in children}
    assert set(stages) == {
        "ingest",
        "train_tokenizer",
        "train_recommender",
        "tokenize_catalogue",
        "evaluate",
    }
    assert stages["train_recommender"].info.run_id == model_run
    assert stages["evaluate"].data.metrics["store/invalid_id_rate"] == 0.0

    # The model registry: version 1, from the training run, tagged with its codebook.
    version = client.get_model_version(MODEL_NAME, "1")
    assert version.run_id == model_run
    _, codebooks = storage.query(served.db, "SELECT codebook_version, model_uri FROM codebooks")
    assert codebooks == [(version.tags["codebook_version"], model_uri)]
    assert client.list_artifacts(model_run, "checkpoint")  # the weights the version points at

    # Prefect artifacts (keys scoped to the experiment): run summary, catalogue
    # summary, evaluation report.
    artifacts = served.artifacts(full_run)
    assert {
        "store-tiny-run-summary",
        "store-tiny-catalogue-summary",
        "store-tiny-evaluation",
    } <= set(artifacts)
    assert "| unchanged | 48 |" in artifacts["store-tiny-catalogue-summary"]
    assert "| STORE (multi-task, STORE quantizer) | 1 |" in artifacts["store-tiny-evaluation"]


def test_parent_run_carries_headline_metrics_and_links_prefect(
    served: Served, full_run: str
) -> None:
    client, experiment_id, parent = served.parent_run(full_run)
    metrics = parent.data.metrics
    assert metrics["catalogue_items"] == 48.0
    assert metrics["items_unchanged"] == 48.0 and metrics["items_new"] == 0.0
    assert metrics["semantic_id_version"] == 1.0
    assert 0.0 <= metrics["collision_rate"] <= 1.0
    assert 0.0 <= metrics["best_val_ndcg_at_10"] <= 1.0
    for system in ("store", "tiger", "sasrec", "popularity"):
        assert 0.0 <= metrics[f"{system}/recall_at_10"] <= 1.0
        assert 0.0 <= metrics[f"{system}/ndcg_at_10"] <= metrics[f"{system}/recall_at_10"]
    stages = ("ingest", "train_tokenizer", "train_recommender", "tokenize_catalogue", "evaluate")
    assert all(metrics[f"duration_s/{stage}"] > 0 for stage in stages)
    # The description (rendered Markdown) links the Prefect flow run.
    flow_run_url = f"http://127.0.0.1:{served.prefect_port}/runs/flow-run/{full_run}"
    description = parent.data.tags[tracking.DESCRIPTION_TAG]
    assert f"]({flow_run_url})" in description
    assert "- evaluate: Recall@10 / NDCG@10" in description
    # The evaluation as one table and one comparison figure, not one chart per number.
    (evaluate,) = client.search_runs(
        [experiment_id],
        f"tags.`{tracking.PARENT_TAG}` = '{parent.info.run_id}' "
        f"and tags.`{tracking.STAGE_TAG}` = 'evaluate'",
    )
    assert len(evaluate.data.metrics) <= 4 * 4
    for run_id in (evaluate.info.run_id, parent.info.run_id):
        files = {f.path for f in client.list_artifacts(run_id)}
        assert {"evaluation_table.json", "evaluation_comparison.png"} <= files
    table = json.loads(
        Path(
            client.download_artifacts(
                evaluate.info.run_id, "evaluation_table.json", str(served.data.parent)
            )
        ).read_text()
    )
    assert table["columns"][:3] == ["system", "seeds", "recall_at_1"]
    assert len(table["data"]) == 4
    # The Prefect run summary links the MLflow run.
    run_url = (
        f"http://127.0.0.1:{served.mlflow_port}/#/experiments/{experiment_id}"
        f"/runs/{parent.info.run_id}?workflowType=machine_learning"
    )
    assert f"]({run_url})" in served.artifacts(full_run)["store-tiny-run-summary"]


def test_flow_run_logs_show_library_warnings_and_stage_results(
    served: Served, full_run: str
) -> None:
    subflows = served.subflow_runs(full_run)
    assert set(subflows) == {
        "ingest",
        "train-tokenizer",
        "train-recommender",
        "tokenize-catalogue",
        "evaluate",
    }
    subflows_in_order = [
        "ingest",
        "train-tokenizer",
        "train-recommender",
        "tokenize-catalogue",
        "evaluate",
    ]
    logs = served.run_logs([full_run, *subflows.values()])
    text = "\n".join(logs)
    # The library's own records reach the run: its warnings and training progress.
    warnings = served.run_logs([full_run, *subflows.values()], min_level=30)
    assert any(w.startswith("marked 1 MLflow run(s) KILLED whose process") for w in warnings)
    assert any(" step " in line and "tokens/s" in line for line in logs), text[-3000:]
    assert any(line.startswith("validation round 1 (epoch ") for line in logs), text[-3000:]
    # One result line per stage, rounded, without Python containers.
    for stage in ("ingest", "train-tokenizer", "train-recommender", "tokenize-catalogue"):
        (line,) = [m for m in logs if m.startswith(f"{stage}: ")]
        assert "{" not in line and "[" not in line, line
    assert any(
        m.startswith("evaluate: Recall@10 / NDCG@10 on the test split: STORE ") for m in logs
    )
    assert (
        "tokenize-catalogue: semantic-ID version 1 written (0 new, 0 changed, 0 restored, "
        "0 removed, 48 unchanged against the IDs the tokenizer training assigned)"
    ) in logs
    assert "ingest: 48 items, 40 users" in text and "items table: 48 new" in text
    results = [m for m in logs if m.split(":")[0] in (*subflows, "evaluate")]
    assert len(results) == 5
    for line in results:  # floats rounded for people
        assert not any(len(n) > 4 for n in re.findall(r"\d+\.(\d+)", line)), line
    # `prefect deployment run --watch` shows each stage starting and ending.
    watched = served.watched[full_run]
    for position, stage in enumerate(subflows_in_order, 1):
        assert f"stage {position}/5 {stage} started" in watched, watched[-3000:]
        assert f"stage {position}/5 done in " in watched, watched[-3000:]
    # Each stage's artifact is on its own subflow run, published as the stage ended.
    for name, run_id in subflows.items():
        (key,) = served.artifacts(run_id)
        assert key == f"store-tiny-stage-{name}"


def test_full_pipeline_sets_the_production_alias(served: Served, full_run: str) -> None:
    client, experiment_id, parent = served.parent_run(full_run)
    version = client.get_model_version_by_alias(MODEL_NAME, "production")
    assert version.version == "1"
    assert version.tags["store.pipeline_run_id"] == parent.info.run_id
    assert version.tags[tracking.FLOW_RUN_TAG] == full_run
    pipeline_url = (
        f"http://127.0.0.1:{served.mlflow_port}/#/experiments/{experiment_id}"
        f"/runs/{parent.info.run_id}?workflowType=machine_learning"
    )
    assert f"]({pipeline_url})" in str(version.description)
    # The runs table's Models column: the training run and the parent row both list the
    # checkpoint the training run logged (the registered version's source).
    for run_id in (version.run_id, parent.info.run_id):
        (logged,) = json.loads(client.get_run(run_id).data.tags[tracking.LOGGED_MODELS_TAG])
        assert logged["run_id"] == version.run_id
        assert version.source.endswith("/" + logged["artifact_path"])


def _start_reader(served: Served, tmp: Path) -> tuple[subprocess.Popen[bytes], Path, Path]:
    stop, report = tmp / "stop", tmp / "reader.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "tests" / "duckdb_reader.py"),
            served.db,
            str(stop),
            str(report),
        ],
        env={**served.env, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )
    return proc, stop, report


def test_nightly_deployment_semantics_with_a_reader_running(
    served: Served, full_run: str, tmp_path: Path
) -> None:
    before = {
        i: s
        for i, s in storage.query(served.db, "SELECT item_id, sid FROM current_semantic_ids")[1]
    }
    write_changed_catalogue(served.data)  # 3 added, 2 changed, 1 removed, in place
    reader, stop, report = _start_reader(served, tmp_path)
    try:
        time.sleep(1.0)  # the reader sees version 1 before the run starts
        nightly = served.run_deployment("nightly-retokenize")
        time.sleep(1.0)  # ... and version 2 after it
    finally:
        stop.touch()
        reader.wait(timeout=180)
    assert reader.returncode == 0

    # The reader never failed and only ever saw complete versions.
    seen = json.loads(report.read_text())
    assert seen["errors"] == []
    assert seen["observations"], "the reader never got a snapshot"
    for version, row_count, item_count, rows_of_version, current_rows in seen["observations"]:
        assert rows_of_version == row_count, f"partial version {version} visible"
        assert current_rows == item_count
    assert {obs[0] for obs in seen["observations"]} == {1, 2}

    # New, changed, removed, unchanged.
    _, rows = storage.query(served.db, "SELECT counts FROM semantic_id_versions WHERE version = 2")
    counts = json.loads(rows[0][0])
    assert {k: counts[k] for k in ("new", "changed", "removed", "unchanged")} == {
        "new": 3,
        "changed": 2,
        "removed": 1,
        "unchanged": 45,
    }
    after = {
        i: s
        for i, s in storage.query(served.db, "SELECT item_id, sid FROM current_semantic_ids")[1]
    }
    untouched = set(before) - {*CHANGED_ITEMS, REMOVED_ITEM}
    assert {i: after[i] for i in untouched} == {i: before[i] for i in untouched}
    assert set(ADDED_ITEMS) <= set(after) and REMOVED_ITEM not in after
    assert len(set(after.values())) == len(after) == 50
    _, rows = storage.query(
        served.db,
        f"SELECT active FROM semantic_ids WHERE version = 2 AND item_id = '{REMOVED_ITEM}'",
    )
    assert rows == [(False,)]  # marked inactive, not deleted

    # The run summary reached MLflow and the Prefect UI.
    assert "| new | 3 |" in served.artifacts(nightly)["store-tiny-catalogue-summary"]
    # The model came through the registry alias.
    subflows = served.subflow_runs(nightly)
    logs = served.run_logs([nightly, *subflows.values()])
    resolved = f"model models:/{MODEL_NAME}@production resolves to version 1"
    assert any(line.startswith(resolved) for line in logs), logs
    assert (
        "tokenize-catalogue: semantic-ID version 2 written (3 new, 2 changed, 0 restored, "
        f"1 removed, 45 unchanged against version 1); model models:/{MODEL_NAME}@production "
        "(version 1)"
    ) in logs
    client, experiment_id, parent = served.parent_run(nightly)
    assert parent.data.tags[tracking.DEPLOYMENT_NAME_TAG] == "nightly-retokenize"
    (catalogue,) = client.search_runs(
        [experiment_id],
        f"tags.`{tracking.PARENT_TAG}` = '{parent.info.run_id}' "
        f"and tags.`{tracking.STAGE_TAG}` = 'tokenize_catalogue'",
    )
    assert catalogue.data.metrics["items_new"] == 3.0
    assert catalogue.data.metrics["items_removed"] == 1.0

    # Nothing changed since: a second nightly run writes no version, and says so.
    unchanged = served.run_deployment("nightly-retokenize")
    assert storage.latest_version(served.db) == 2
    artifacts = served.artifacts(unchanged)
    assert "unchanged, current semantic-ID version 2" in artifacts["store-tiny-run-summary"]
    assert artifacts["store-tiny-catalogue-summary"].startswith(
        "**Catalogue unchanged, current semantic-ID version 2**"
    )
    assert "None" not in artifacts["store-tiny-run-summary"]


def test_nightly_refuses_a_checkpoint_that_is_not_the_production_version(
    served: Served, full_run: str
) -> None:
    """Move ``@production`` to another version: the nightly job resolves it and fails
    with one line naming both versions, writing nothing."""
    client = served.mlflow()
    first = client.get_model_version(MODEL_NAME, "1")
    other = client.create_model_version(MODEL_NAME, str(first.source), run_id=first.run_id)
    client.set_registered_model_alias(MODEL_NAME, "production", other.version)
    latest = storage.latest_version(served.db)
    try:
        proc = subprocess.run(
            [str(BIN / "prefect"), "deployment", "run", "store/nightly-retokenize", "--watch"],
            env={**served.env, "PREFECT_API_URL": served.api},
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        client.set_registered_model_alias(MODEL_NAME, "production", "1")
    assert proc.returncode != 0, proc.stdout[-3000:]
    flow_run_id = next(
        line.split("UUID:")[1].strip() for line in proc.stdout.splitlines() if "UUID:" in line
    )
    state = served.api_get(f"/flow_runs/{flow_run_id}")["state"]
    assert state["type"] == "FAILED"
    assert (
        f"models:/{MODEL_NAME}@production is version {other.version}, but the workspace's "
        "checkpoint"
    ) in state["message"]
    assert storage.latest_version(served.db) == latest


@pytest.mark.slow  # a second Prefect server: ~80 s; the fast check is
# tests/test_service_supervisor.py::test_each_workspace_gets_its_own_prefect_database
def test_two_workspaces_runs_do_not_mix(served: Served, full_run: str, tmp_path: Path) -> None:
    """A second ``store serve`` for another workspace shows none of the first one's runs
    or artifacts (each workspace has its own Prefect database)."""
    assert served.api_post("/flow_runs/filter", {})  # the first workspace has runs
    port = free_port()
    other = tmp_path / "other-ws"
    args = ["--config", "tiny", "--set", f"workspace={other}", "--no-schedule"]
    log = tmp_path / "other.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [str(BIN / "store"), "serve", *args, "--prefect-port", str(port)],
            env=served.env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:
        deadline = time.monotonic() + 300
        while not (other / "serve" / STATE_FILE).exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(1)
        api = f"http://127.0.0.1:{port}/api"
        request = urllib.request.Request(
            f"{api}/flow_runs/filter", data=b"{}", headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.loads(response.read()) == []
        request = urllib.request.Request(
            f"{api}/artifacts/filter", data=b"{}", headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.loads(response.read()) == []
        assert (other / "prefect" / "prefect.db").is_file()
    finally:
        subprocess.run(
            [str(BIN / "store"), "serve", "--stop", *args[:4]],
            env=served.env,
            cwd=REPO,
            capture_output=True,
            timeout=120,
        )
        proc.wait(timeout=90)


def test_prefect_yaml_deploys_to_its_work_pools(served: Served, full_run: str) -> None:
    """``prefect deploy --all`` with the repo's prefect.yaml (runs after the served tests:
    it replaces the served deployments of the same names with work-pool ones)."""
    env = {**served.env, "PREFECT_API_URL": served.api}
    prefect = str(BIN / "prefect")
    template = str(REPO / "infra" / "k8s" / "gpu-job-template.json")
    for argv in (
        [prefect, "work-pool", "create", "store-process", "--type", "process"],
        [prefect, "work-pool", "create", "store-gpu", "--type", "kubernetes"],
        [prefect, "work-pool", "update", "store-gpu", "--base-job-template", template],
        [prefect, "--no-prompt", "deploy", "--all"],
    ):
        proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    full = served.api_get("/deployments/name/store/full-pipeline")
    nightly = served.api_get("/deployments/name/store/nightly-retokenize")
    gpu = served.api_get("/deployments/name/store/full-pipeline-gpu")
    assert (full["work_pool_name"], nightly["work_pool_name"]) == ("store-process",) * 2
    assert full["entrypoint"] == "flows/pipeline.py:store_pipeline"
    assert full["parameters"] == {
        "config": "ml-100k",
        "overrides": [],
        "evaluate": True,
        "job": "full",
    }
    assert nightly["parameters"]["job"] == "retokenize"
    (schedule,) = nightly["schedules"]
    assert (schedule["schedule"]["cron"], schedule["schedule"]["timezone"]) == ("0 3 * * *", "UTC")
    assert gpu["work_pool_name"] == "store-gpu"
    assert gpu["job_variables"]["gpus"] == 8
    assert "launcher.kind=deepspeed" in gpu["parameters"]["overrides"]
    assert gpu["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "/app"}}
    ]
    pool = served.api_get("/work_pools/store-gpu")
    assert "nvidia.com/gpu" in json.dumps(pool["base_job_template"])


def test_stop_leaves_no_process_behind(served: Served, full_run: str) -> None:
    state = served.state
    pids = [served.proc.pid] + [s["pid"] for s in state["services"]]
    family = {
        p.pid
        for pid in pids
        if psutil.pid_exists(pid)
        for p in psutil.Process(pid).children(recursive=True)
    }
    result = served.store("serve", "--stop")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stopped" in result.stdout
    assert served.proc.wait(timeout=90) == 0
    time.sleep(0.5)
    alive = [
        pid
        for pid in {*pids, *family}
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ]
    assert alive == []
    for port in (served.prefect_port, served.mlflow_port):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0
    assert not (served.workspace / "serve" / STATE_FILE).exists()
    # Stopping again is harmless.
    again = served.store("serve", "--stop")
    assert again.returncode == 0 and "no `store serve` running" in again.stdout
