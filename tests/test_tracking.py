from __future__ import annotations

import os
import signal
import subprocess
import sys
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


_KILLED_CHILD = """
import os, signal, sys
from store_core import tracking
from store_core.config import load_config
overrides = [f"workspace={sys.argv[1]}"] + [f"tracking.uri={uri}" for uri in sys.argv[2:]]
cfg = load_config("tiny", overrides)
with tracking.stage_run(cfg, "train_recommender") as run:
    print(run.run_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _sigkilled_run(workspace: Path, *tracking_uri: str) -> str:
    """A tracked stage run whose process is SIGKILLed inside it: left RUNNING."""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_CHILD, str(workspace), *tracking_uri],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(repo)},
        cwd=repo,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    return proc.stdout.split()[0]


@pytest.mark.service
def test_runs_of_sigkilled_processes_are_reaped_on_the_next_run(tmp_path: Path) -> None:
    ws, other = tmp_path / "ws", tmp_path / "other"
    cfg = load_config("tiny", [f"workspace={ws}"])
    orphan = _sigkilled_run(ws)
    client = MlflowClient(tracking_uri=tracking.tracking_uri(cfg))
    assert client.get_run(orphan).info.status == "RUNNING"
    assert client.get_run(orphan).data.tags[tracking.WORKSPACE_TAG] == str(ws.resolve())
    # another workspace's orphan in the same tracking store is not this workspace's to end
    foreign = _sigkilled_run(other, tracking.tracking_uri(cfg))
    with tracking.stage_run(cfg, "ingest") as run:
        pass
    reaped = client.get_run(orphan)
    assert reaped.info.status == "KILLED"
    assert reaped.data.tags[tracking.ENDED_BY_TAG].startswith("reaped: process ")
    assert client.get_run(run.run_id or "").info.status == "FINISHED"
    assert client.get_run(foreign).info.status == "RUNNING"


def test_ctrl_c_inside_a_run_ends_it_killed(tmp_path: Path) -> None:
    cfg = load_config("tiny", [f"workspace={tmp_path / 'ws'}"])
    with pytest.raises(KeyboardInterrupt), tracking.stage_run(cfg, "ingest") as run:
        raise KeyboardInterrupt
    client = MlflowClient(tracking_uri=tracking.tracking_uri(cfg))
    assert client.get_run(run.run_id or "").info.status == "KILLED"


def test_a_sigterm_during_an_mlflow_call_stops_the_run_after_that_call(tmp_path: Path) -> None:
    """SIGTERM arriving inside an MLflow call (here: while it writes a metric) takes effect
    when the call returns: the metric is stored whole and the run ends KILLED. Raised
    mid-call, it once left SQLite's transaction open and the KILLED mark failed with
    "database is locked"."""
    from store_core import signals

    cfg = load_config("tiny", [f"workspace={tmp_path / 'ws'}"])
    steps: list[str] = []
    previous = signal.getsignal(signal.SIGTERM)
    signals.install()  # as the CLI does (fresh: an earlier test may have left a handler)
    try:
        with pytest.raises(signals.Terminated), tracking.stage_run(cfg, "ingest") as run:
            assert isinstance(run.client, tracking.SignalSafeClient)
            inner = run.client._client
            original = inner.log_metric

            def log_metric_hit_by_sigterm(*args: object, **kwargs: object) -> None:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives before the write
                steps.append("write started")
                original(*args, **kwargs)
                steps.append("write done")

            inner.log_metric = log_metric_hit_by_sigterm  # type: ignore[method-assign]
            run.log_metrics({"rows": 3.0})
            steps.append("after the call")  # not reached: the stop lands on return
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert steps == ["write started", "write done"]
    stored = MlflowClient(tracking_uri=tracking.tracking_uri(cfg)).get_run(run.run_id or "")
    assert stored.info.status == "KILLED"
    assert stored.data.metrics == {"rows": 3.0}
