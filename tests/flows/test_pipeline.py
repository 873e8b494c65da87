from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import fetch_source, store_pipeline
from store_core import tracking
from store_core.config import load_config
from store_core.storage import query


@pytest.fixture(scope="module", autouse=True)
def prefect_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_store_flow_runs_ingest_subflow_with_tracking(tmp_path: Path) -> None:
    overrides = [f"workspace={tmp_path / 'ws'}"]
    summary = store_pipeline("tiny", overrides)
    assert summary["data_dir"] == str(tmp_path / "ws" / "data")
    assert (tmp_path / "ws" / "data" / "items.parquet").exists()
    assert query(summary["duckdb"], "SELECT count(*) FROM items")[1] == [(48,)]
    assert summary["stages"]["ingest"]["counts"]["users"] == 40

    client = MlflowClient(tracking_uri=summary["mlflow_tracking_uri"])
    parent = client.get_run(summary["mlflow_run_id"])
    flow_run_id = parent.data.tags[tracking.FLOW_RUN_TAG]
    assert len(flow_run_id) == 36  # a real Prefect flow-run UUID
    child = client.get_run(summary["stages"]["ingest"]["run_id"])
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
    assert summary["stages"]["tokenize_catalogue"]["version"] == 1
    assert query(summary["duckdb"], "SELECT count(*) FROM current_semantic_ids")[1] == [(48,)]
    assert Path(summary["stages"]["evaluate"]["report"]).exists()
    evaluate_run = next(r for r in runs if r.data.tags[tracking.STAGE_TAG] == "evaluate")
    assert evaluate_run.data.metrics["store/invalid_id_rate"] == 0.0


def test_fetch_source_task_resolves_path(tmp_path: Path) -> None:
    source = fetch_source.fn("tiny", [f"workspace={tmp_path}"])
    assert source.path == load_config("tiny").data.path
    assert source.data.format == "lcrec"
