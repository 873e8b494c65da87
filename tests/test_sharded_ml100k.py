"""The scaled-out stages on MovieLens 100K (issue 17): a local Dask cluster of 2 workers and
4 shards writes exactly the in-process semantic IDs of all 1,682 items and the same
evaluation metrics over all 943 test users.

The model is the ``ml-100k`` config with both training phases cut short (Phase A 100
steps, Phase B 300 steps): equality of the two paths does not depend on how well it is
trained. The catalogue stage runs in ``keep`` mode, as the nightly job does, on the
catalogue with every 6th title changed (281 items): those get generated IDs from the
shards, the others keep theirs, and every row of the new version is compared.
(``regenerate`` of all 1,682 items needs a better-trained model: this one's text -> ID
beams pile onto a few prefixes and exhaust their disambiguation codes, which the stage
reports as a clean StoreError on either path.) Marked ``slow`` (several minutes on 2
cores, most of it the two beam searches over 943 users): run it with ``make test-slow``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from store_core.config import load_config
from store_core.stages import catalogue_stage, evaluate_stage
from tests.conftest import copy_workspace, current_id_table, shared_dataset, store_eval_rows

pytestmark = pytest.mark.slow

#: The same numeric settings on both paths (tracking off, the store system only).
COMMON = [
    "data.dataset=null",
    "data.format=movielens",
    "tracking.enabled=false",
    "tokenizer_train.max_steps=100",
    "recommender_train.max_steps=300",
    "recommender.val_max_users=50",
    "evaluation.systems=[store]",
]
SCALE_OUT = ["inference.workers=2", "inference.shards=4"]


@pytest.fixture(autouse=True)
def _prefect_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flows (and the workers' Prefect clients) use a temporary Prefect home."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


#: Every 6th item of ml-100k gets a changed title in :func:`_changed_catalogue`.
CHANGE_EVERY = 6


def _overrides(workspace: Path, *extra: str, data: Path | None = None) -> list[str]:
    path = data or shared_dataset("ml-100k")
    return [f"workspace={workspace}", f"data.path={path}", *COMMON, *extra]


def _changed_catalogue(target: Path) -> tuple[Path, int]:
    """ml-100k with the title of every :data:`CHANGE_EVERY`-th item changed; returns the
    directory and how many items changed."""
    source = shared_dataset("ml-100k")
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file():
            shutil.copy(path, target / path.name)
    lines = (source / "u.item").read_text(encoding="latin-1").splitlines()
    changed = 0
    for number, line in enumerate(lines):
        fields = line.split("|")
        if number % CHANGE_EVERY == 0:
            fields[1] = f"{fields[1]} (director's cut)"
            changed += 1
        lines[number] = "|".join(fields)
    (target / "u.item").write_text("\n".join(lines) + "\n", encoding="latin-1")
    return target, changed


@pytest.fixture(scope="module")
def ml100k_trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with MovieLens 100K ingested and both phases trained (briefly)."""
    from store_core.ingest import run_ingest
    from store_core.item_tokenizer import train_semantic_tokenizer
    from store_core.recommender_training import train_recommender

    workspace = tmp_path_factory.mktemp("ml100k") / "ws"
    cfg = load_config("ml-100k", _overrides(workspace))
    run_ingest(cfg)
    assert train_semantic_tokenizer(cfg) is not None
    assert train_recommender(cfg) is not None
    return workspace


def test_ml100k_two_workers_write_the_in_process_ids_and_metrics(
    ml100k_trained: Path, tmp_path: Path
) -> None:
    from flows.pipeline import catalogue_flow, evaluate_flow
    from store_core.ingest import run_ingest

    data, changed = _changed_catalogue(tmp_path / "changed-data")
    assert changed == 281
    here = copy_workspace(ml100k_trained, tmp_path / "here")
    there = copy_workspace(ml100k_trained, tmp_path / "there")
    for workspace in (here, there):
        run_ingest(load_config("ml-100k", _overrides(workspace, data=data)))

    cfg = load_config("ml-100k", _overrides(here, data=data))
    catalogue_stage(cfg, mode="keep")
    result = catalogue_flow("ml-100k", _overrides(there, *SCALE_OUT, data=data), None, "keep")
    counts = result.counts
    assert counts["changed"] == changed and counts["unchanged"] == 1682 - changed
    expected, got = current_id_table(here), current_id_table(there)
    assert got.num_rows == expected.num_rows == 1682
    assert got.equals(expected)  # every item, every code, the packed form and the SID string
    methods = got.column("method").to_pylist()
    assert methods.count("generated") == changed  # the shards' IDs; the rest kept theirs

    evaluate_stage(cfg)
    evaluate_flow("ml-100k", _overrides(there, *SCALE_OUT, data=data), None)
    metrics = store_eval_rows(there)
    assert metrics == store_eval_rows(here)
    assert metrics["users/kept"] == 943
    assert metrics["invalid_id_rate/kept"] == 0.0
    assert 0.0 < metrics["recall_at_20/kept"] <= 1.0
