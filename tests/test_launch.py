"""Training stages under the real ``deepspeed`` launcher (two CPU ranks, gloo), as the GPU
deployment runs them with a hostfile."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from store_core import launch, tracking
from store_core.config import load_config
from store_core.errors import ConfigError, StoreError
from store_core.ingest import run_ingest
from store_core.stages import recommender_stage, tokenizer_stage


def test_command_and_child_config(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    cfg = load_config(
        "tiny",
        [
            f"workspace={tmp_path / 'ws'}",
            "launcher.kind=deepspeed",
            f"launcher.hostfile={hostfile}",
            "launcher.extra_args=[--include, 'localhost:0,1']",
        ],
    )
    child = launch.child_config(cfg, "tokenizer")
    argv = launch.launch_command(cfg, "tokenizer", child, 29500)
    assert argv[0].endswith("deepspeed")
    assert argv[1:] == [
        *("--hostfile", str(hostfile), "--master_port", "29500"),
        *("--include", "localhost:0,1", "--no_local_rank"),
        *("--module", "store_cli", "train", "--phase", "tokenizer"),
        *("--config", str(child)),
    ]
    # The ranks get the same config, except that they train in-process and do not track.
    loaded = load_config(str(child))
    assert loaded.launcher.kind == "inprocess" and loaded.tracking.enabled is False
    assert loaded.workspace == cfg.workspace
    assert loaded.model_dump(exclude={"launcher", "tracking"}) == cfg.model_dump(
        exclude={"launcher", "tracking"}
    )
    # A missing hostfile is refused when the config loads, and again at launch (it may
    # have gone since).
    with pytest.raises(ConfigError, match="/nope/hosts does not exist"):
        load_config("tiny", ["launcher.kind=deepspeed", "launcher.hostfile=/nope/hosts"])
    gone = cfg.launcher.model_copy(update={"hostfile": "/nope/hosts"})
    missing = cfg.model_copy(update={"launcher": gone})
    with pytest.raises(StoreError, match="/nope/hosts does not exist"):
        launch.launch_command(missing, "tokenizer", child, 29500)


@pytest.mark.pipeline
def test_both_phases_train_as_two_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = load_config(
        "tiny",
        [
            f"workspace={tmp_path / 'ws'}",
            "launcher.kind=deepspeed",
            "launcher.num_gpus=2",
            "recommender_train.epochs=1",
        ],
    )
    run_ingest(cfg)
    phase_a = tokenizer_stage(cfg)
    stats = phase_a.result.stats
    assert stats["train_world_size"] == 2
    assert stats["num_items"] == 48
    phase_b = recommender_stage(cfg)
    metrics = phase_b.result.metrics
    assert metrics["train_world_size"] == 2
    assert metrics["best_val_ndcg_at_10"] is not None
    # The parent stage tracked what the ranks produced, and registered the model.
    client = MlflowClient(tracking.tracking_uri(cfg))
    run = client.get_run(phase_b.run_id)
    assert run.data.metrics["train_world_size"] == 2.0
    assert client.get_model_version("store-tiny-recommender", "1").run_id == phase_b.run_id
    assert client.get_run(phase_a.run_id).data.metrics["train_world_size"] == 2.0


@pytest.mark.service
def test_failed_launch_names_the_phase(tmp_path: Path) -> None:
    cfg = load_config("tiny", [f"workspace={tmp_path / 'ws'}", "launcher.kind=deepspeed"])
    # Nothing ingested: every rank fails, the stage reports the launcher's failure.
    with pytest.raises(StoreError, match="tokenizer training under the deepspeed launcher"):
        tokenizer_stage(cfg)
