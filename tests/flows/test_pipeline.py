from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from prefect import get_client
from prefect.testing.utilities import prefect_test_harness

from flows import pipeline
from flows.pipeline import fetch_source, store_pipeline
from flows.reporting import IngestSummary, PipelineSummary, RecommenderSummary
from store_core import recommender_training, tracking
from store_core.config import load_config
from store_core.storage import query
from tests.conftest import copy_workspace

pytestmark = pytest.mark.pipeline  # trains the tiny models


@pytest.fixture(scope="module", autouse=True)
def prefect_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_store_flow_runs_ingest_subflow_with_tracking(tmp_path: Path) -> None:
    overrides = [f"workspace={tmp_path / 'ws'}"]
    summary = store_pipeline("tiny", overrides)
    assert summary.data_dir == str(tmp_path / "ws" / "data")
    assert (tmp_path / "ws" / "data" / "items.parquet").exists()
    assert query(summary.duckdb, "SELECT count(*) FROM items")[1] == [(48,)]
    ingest = summary.stage("ingest", IngestSummary)
    assert isinstance(summary, PipelineSummary) and ingest is not None
    assert ingest.counts["users"] == 40

    client = MlflowClient(tracking_uri=summary.mlflow_tracking_uri)
    parent = client.get_run(summary.mlflow_run_id)
    flow_run_id = parent.data.tags[tracking.FLOW_RUN_TAG]
    assert len(flow_run_id) == 36  # a real Prefect flow-run UUID
    child = client.get_run(ingest.run_id or "")
    assert child.data.tags[tracking.PARENT_TAG] == parent.info.run_id
    assert child.data.metrics["items"] == 48

    # Every stage ran as a subflow with its own nested MLflow run.
    experiment = client.get_experiment_by_name("store-tiny")
    assert experiment is not None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent.info.run_id}'",
    )
    stages = {r.data.tags[tracking.STAGE_TAG] for r in runs}
    assert {"ingest", "train_tokenizer", "train_recommender", "tokenize_catalogue"} <= stages
    assert "evaluate" in stages
    assert summary.catalogue.version == 1
    assert query(summary.duckdb, "SELECT count(*) FROM current_semantic_ids")[1] == [(48,)]
    assert summary.evaluation is not None and Path(summary.evaluation.report).exists()
    evaluate_run = next(r for r in runs if r.data.tags[tracking.STAGE_TAG] == "evaluate")
    assert evaluate_run.data.metrics["store/invalid_id_rate"] == 0.0


def test_fetch_source_task_resolves_path(tmp_path: Path) -> None:
    source = fetch_source.fn("tiny", [f"workspace={tmp_path}"])
    assert source.path == load_config("tiny").data.path
    assert source.data.format == "lcrec"


def test_fetch_source_retries_with_backoff(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert fetch_source.retries == 3
    delays = list(fetch_source.retry_delay_seconds)  # type: ignore[arg-type]
    assert delays == sorted(delays) and delays[0] < delays[-1]  # exponential backoff
    calls: list[int] = []
    real = pipeline.resolve_source

    def flaky(cfg: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("mirror unreachable")
        return real(cfg)

    monkeypatch.setattr(pipeline, "resolve_source", flaky)
    source = fetch_source.with_options(retry_delay_seconds=0)("tiny", [f"workspace={tmp_path}"])
    assert len(calls) == 2
    assert source.data.format == "lcrec"


def test_failed_stage_fails_the_flow_and_a_rerun_resumes_training(
    tiny_pipeline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = copy_workspace(tiny_pipeline, tmp_path / "ws")
    for trained in (ws / "models").glob("recommender-*"):
        shutil.rmtree(trained)  # Phase A stays trained; Phase B starts from nothing
    overrides = [f"workspace={ws}"]
    real = recommender_training.multitask_loss
    calls: list[int] = []

    def crash_after_25_steps(engine: Any, batch: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) > 25:
            raise RuntimeError("simulated crash in Phase B")
        return real(engine, batch, **kwargs)

    monkeypatch.setattr(recommender_training, "multitask_loss", crash_after_25_steps)
    state = store_pipeline("tiny", overrides, evaluate=False, return_state=True)
    assert state.is_failed()
    assert "simulated crash in Phase B" in str(state.message)
    with get_client(sync_client=True) as client:  # what the Prefect UI shows
        stored = client.read_flow_run(state.state_details.flow_run_id)
    assert stored.state is not None and stored.state.is_failed()
    assert "simulated crash in Phase B" in str(stored.state.message)

    monkeypatch.setattr(recommender_training, "multitask_loss", real)
    summary = store_pipeline("tiny", overrides, evaluate=False)
    trained = summary.stage("train_recommender", RecommenderSummary)
    assert trained is not None
    checkpoint = trained.checkpoint_dir
    metrics = json.loads((Path(checkpoint) / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 20  # tiny: a checkpoint every 20 steps
    assert metrics["train_steps"] > 25
