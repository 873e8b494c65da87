from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from store_core import tracking
from store_core.config import load_config
from store_core.errors import DataError
from store_core.stages import ingest_stage


def test_ingest_stage_logs_nested_run_with_metrics_and_manifest(tmp_path: Path) -> None:
    cfg = load_config("tiny", [f"workspace={tmp_path / 'ws'}"])
    with tracking.pipeline_run(cfg, tags={tracking.FLOW_RUN_TAG: "flow-123"}) as parent:
        outcome = ingest_stage(cfg, parent.run_id)
    uri = tracking.tracking_uri(cfg)
    assert uri == f"sqlite:///{tmp_path / 'ws' / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    parent_run = client.get_run(parent.run_id or "")
    assert parent_run.data.tags[tracking.FLOW_RUN_TAG] == "flow-123"
    assert parent_run.data.params["data.format"] == "lcrec"
    assert parent_run.info.status == "FINISHED"

    stage = client.get_run(outcome.run_id or "")
    assert stage.data.tags[tracking.PARENT_TAG] == parent.run_id
    assert stage.data.tags[tracking.STAGE_TAG] == "ingest"
    assert stage.data.metrics["users"] == 40
    assert stage.data.metrics["items"] == 48
    assert stage.data.metrics["interactions"] == outcome.result.counts["interactions"]
    assert stage.data.metrics["catalog_new"] == 48
    artifacts = [a.path for a in client.list_artifacts(stage.info.run_id)]
    assert "manifest.json" in artifacts
    local = client.download_artifacts(stage.info.run_id, "manifest.json", str(tmp_path))
    assert '"users": 40' in Path(local).read_text()
    # Artifacts live in the workspace, not in ./mlruns of the current directory.
    assert (tmp_path / "ws" / "mlflow" / "artifacts").is_dir()


def test_failed_stage_marks_run_failed(tmp_path: Path) -> None:
    cfg = load_config("tiny", [f"workspace={tmp_path / 'ws'}", f"data.path={tmp_path}/none"])
    with pytest.raises(DataError):
        ingest_stage(cfg)
    client = MlflowClient(tracking_uri=tracking.tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_disabled_tracking_writes_nothing(tmp_path: Path) -> None:
    cfg = load_config("tiny", [f"workspace={tmp_path / 'ws'}", "tracking.enabled=false"])
    outcome = ingest_stage(cfg)
    assert outcome.run_id is None
    assert not (tmp_path / "ws" / "mlflow").exists()


def test_flatten() -> None:
    assert tracking.flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {
        "a.b": 1,
        "a.c.d": 2,
        "e": 3,
    }


def test_tracking_disabled_runs_stages_without_importing_mlflow(tmp_path: Path) -> None:
    """A run with tracking off must not need mlflow (a bare GPU box has torch alone)."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from store_core.config import load_config\n"
        "from store_core.stages import ingest_stage\n"
        f"cfg = load_config('tiny', ['workspace={tmp_path / 'ws'}', 'tracking.enabled=false'])\n"
        "outcome = ingest_stage(cfg, None)\n"
        "assert outcome.run_id is None, outcome.run_id\n"
        "print(outcome.result.counts['users'], 'mlflow' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["40", "False"]
    assert not (tmp_path / "ws" / "mlflow").exists()
