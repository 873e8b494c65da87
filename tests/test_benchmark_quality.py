"""benchmarks/quality.py: --resume continues a published table (no workspaces needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.quality import published_records, workspace_record

SETTINGS = {"recommender.transition_memory_weight": 0.0, "data.dataset": "x"}


def report(
    config: str, overrides: list[str], systems: list[str], settings: object = SETTINGS
) -> dict[str, object]:
    metrics = {"recall_at_10": 0.1, "ndcg_at_10": 0.05}
    return {
        "config": {
            "config": config,
            "overrides": overrides,
            "systems": systems,
            "settings": settings,
        },
        "seeds": [
            {
                "seed": seed,
                "workspace": f"/gone/ws-seed{seed}",
                "mlflow_run_id": f"run{seed}",
                "stage_seconds": {"total": 10.0 + seed},
                "results": [
                    {"system": "store", "seed": seed, "metrics": metrics},
                    {"system": "popularity", "seed": seed, "metrics": metrics},
                ],
                "extra": {"store": {"label": "STORE"}, "popularity": {}},
            }
            for seed in (0, 1)
        ],
    }


def test_published_seeds_are_reused_only_for_the_same_settings(tmp_path: Path) -> None:
    path = tmp_path / "quality_x.json"
    assert published_records(path, {"config": "a.yaml", "overrides": [], "systems": []}) == {}
    path.write_text(
        json.dumps(
            report("/elsewhere/infra/configs/x.yaml", ["workspace=/gone/ws", "a.b=1"], ["store"])
        )
    )
    key = {
        "config": "/here/infra/configs/x.yaml",
        "overrides": ["a.b=1"],
        "systems": ["store"],
        # a setting the schema gained after the table was made is not compared
        "settings": {**SETTINGS, "recommender.transition_memory_window": 1},
    }
    records = published_records(path, key)
    assert sorted(records) == [0, 1]
    assert records[1]["seed"] == 1 and records[1]["stage_seconds"] == {"total": 11.0}
    assert records[1]["config"] == key["config"]  # the record carries this run's key
    assert records[0]["results"][0]["extra"] == {"label": "STORE"}
    assert records[0]["results"][0]["metrics"]["recall_at_10"] == 0.1
    # Another config, other overrides, other systems or an edited config file (a decoding
    # setting changed): nothing is reused.
    for other in (
        {**key, "config": "/here/infra/configs/y.yaml"},
        {**key, "overrides": ["a.b=2"]},
        {**key, "systems": ["store", "sasrec"]},
        {**key, "settings": {**SETTINGS, "recommender.transition_memory_weight": 0.7}},
    ):
        assert published_records(path, other) == {}
    # A table made before settings were recorded is not reused either.
    path.write_text(json.dumps(report("x.yaml", ["a.b=1"], ["store"], settings=None)))
    assert published_records(path, key) == {}


def test_a_seed_workspace_resumes_from_another_checkout_of_the_same_config(
    tmp_path: Path,
) -> None:
    made = {
        "config": "/clone/infra/configs/x.yaml",
        "overrides": ["a.b=1"],
        "systems": ["store"],
        "settings": SETTINGS,
    }
    seed_file = tmp_path / "quality_results.json"
    seed_file.write_text(
        json.dumps({**made, "overrides": ["workspace=/runs/ws", "a.b=1"], "seed": 1, "results": []})
    )
    key = {**made, "config": "/main/infra/configs/x.yaml"}
    record = workspace_record(seed_file, key)
    assert record["seed"] == 1 and record["config"] == key["config"]
    for other in (
        {**key, "config": "/main/infra/configs/y.yaml"},
        {**key, "overrides": ["a.b=2"]},
        {**key, "systems": ["store", "tiger"]},
        {**key, "settings": {**SETTINGS, "data.dataset": "y"}},
    ):
        with pytest.raises(SystemExit, match="--resume"):
            workspace_record(seed_file, other)


def test_flat_settings_name_every_resolved_setting() -> None:
    from benchmarks.quality import flat_settings
    from store_core.config import load_config

    settings = flat_settings(load_config("ml-100k-quality", []))
    assert settings["recommender.transition_memory_window"] == 5
    assert settings["recommender.transition_memory_symmetric"] is True
    assert not any(key.startswith("workspace") for key in settings)
    json.dumps(settings)  # JSON values, as the results files hold them
