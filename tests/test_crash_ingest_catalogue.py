"""Crash tests for ingest and tokenize-catalogue: SIGKILL and SIGTERM at fixed points.

Each case runs the real ``store`` verb in a child process (tests/crash_child.py) that
sends itself the signal at a named point, then reruns the verb here and checks that

* the killed run exited as expected (-9, or 143 after SIGTERM) at that point;
* after SIGTERM nothing is left behind even before the rerun (the run cleaned up);
* the rerun succeeds and the workspace equals the one an uninterrupted run leaves:
  same Parquet content and manifest, same DuckDB ``items`` rows and semantic-ID
  versions, and the same set of files (no staging directory, ``data.old-*``,
  ``tmp*.parquet``, DuckDB WAL or lock record left).

The counts (kills tried, reruns equal, leftovers found) are printed per stage.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch

from store_core import storage
from store_core.catalogue import tokenize_catalogue
from store_core.config import StoreConfig, load_config
from store_core.ingest import run_ingest
from store_core.recommender_training import recommender_dir
from store_core.storage import connect
from tests.conftest import REPO, TINY_DATA, copy_workspace, write_changed_catalogue
from tests.crash_child import POINTS

pytestmark = pytest.mark.service  # starts servers or CLI processes

SIGNALS = {"KILL": -9, "TERM": 143}


def config(ws: Path, data: Path) -> StoreConfig:
    return load_config("tiny", [f"workspace={ws}", f"data.path={data}", "tracking.enabled=false"])


def child_env() -> dict[str, str]:
    threads = str(torch.get_num_threads())  # same kernels as this process: same beams
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "STORE_WRITER_LOCK_TIMEOUT_S": "60",
    }


def run_killed(point: str, sig: str, verb: str, ws: Path, data: Path) -> None:
    argv = [sys.executable, str(REPO / "tests" / "crash_child.py"), point, sig, "--", verb]
    argv += ["-c", "tiny", "--set", f"workspace={ws}", "--set", f"data.path={data}"]
    argv += ["--set", "tracking.enabled=false"]
    proc = subprocess.run(argv, env=child_env(), cwd=REPO, capture_output=True, text=True)
    assert "crash_child: sending" in proc.stderr, proc.stderr[-3000:]  # it reached the point
    assert proc.returncode == SIGNALS[sig], (point, sig, proc.returncode, proc.stderr[-3000:])


def listing(ws: Path) -> list[str]:
    return sorted(str(p.relative_to(ws)) for p in ws.rglob("*"))


def snapshot(ws: Path) -> dict[str, Any]:
    """Everything a run is meant to produce, minus wall-clock timestamps."""
    snap: dict[str, Any] = {}
    for path in sorted((ws / "data").iterdir()):
        if path.suffix == ".parquet":
            snap[path.name] = pq.read_table(path).to_pylist()
        else:
            snap[path.name] = json.loads(path.read_text())
    with connect(str(ws / "store.duckdb"), read_only=True) as con:
        snap["items"] = con.sql(
            "SELECT * EXCLUDE (first_seen_at, updated_at) FROM items ORDER BY item_id"
        ).fetchall()
        if storage.latest_version(str(ws / "store.duckdb")) is not None:
            snap["semantic_ids"] = con.sql(
                "SELECT * EXCLUDE (created_at) FROM semantic_ids ORDER BY version, packed"
            ).fetchall()
            snap["versions"] = con.sql(
                "SELECT * EXCLUDE (created_at) FROM semantic_id_versions ORDER BY version"
            ).fetchall()
            snap["codebooks"] = con.sql("SELECT codebook_version FROM codebooks").fetchall()
    # Paths of the workspace (a version's model_uri) differ between copies, nothing else may.
    return json.loads(json.dumps(snap, default=str).replace(str(ws), "<workspace>"))


def crash_cases(
    prefix: str, verb: str, base: Path, data: Path, rerun: Any, tmp_path: Path
) -> dict[str, int]:
    """Kill ``verb`` at every point of ``prefix`` with both signals on a copy of ``base``,
    rerun, compare with an uninterrupted run; returns the counts."""
    reference = copy_workspace(base, tmp_path / f"{prefix}-reference")
    rerun(reference)
    expected, expected_files = snapshot(reference), listing(reference)
    counts = {"kills": 0, "reruns_equal": 0, "leftovers": 0, "leftovers_after_sigterm": 0}
    for point in [p for p in POINTS if p.startswith(prefix)]:
        for sig in SIGNALS:
            ws = copy_workspace(base, tmp_path / f"{point}-{sig}")
            if prefix == "catalogue":  # what releases before the staging directory left
                (ws / "tmpabcd1234.parquet").write_bytes(b"left by an older release")
            run_killed(point, sig, verb, ws, data)
            counts["kills"] += 1
            if sig == "TERM":
                extra = set(listing(ws)) - set(listing(base)) - set(expected_files)
                extra.discard("tmpabcd1234.parquet")
                counts["leftovers_after_sigterm"] += len(extra)
                assert not extra, (point, sorted(extra))
            rerun(ws)
            leftovers = sorted(set(listing(ws)) ^ set(expected_files))
            counts["leftovers"] += len(leftovers)
            assert not leftovers, (point, sig, leftovers)
            equal = snapshot(ws) == expected
            counts["reruns_equal"] += int(equal)
            assert equal, (point, sig)
            shutil.rmtree(ws)
    print(f"\n{prefix} crash counts: {counts}")
    return counts


def test_ingest_killed_at_every_point_reruns_to_the_same_workspace(tmp_path: Path) -> None:
    changed = write_changed_catalogue(tmp_path / "changed")
    base = tmp_path / "base"
    run_ingest(config(base, TINY_DATA))  # a re-ingest: the swap has an old data/ to move

    counts = crash_cases(
        "ingest",
        "ingest",
        base,
        changed,
        lambda ws: run_ingest(config(ws, changed)),
        tmp_path,
    )
    assert counts == {
        "kills": 12,
        "reruns_equal": 12,
        "leftovers": 0,
        "leftovers_after_sigterm": 0,
    }


# Every kill point of the catalogue write, like Phase A/B's (test_training_crash.py), is in
# `make test-slow` (~55 s); CI's suite keeps ingest's every-point test above and the SIGTERM
# inside the catalogue transaction (test_sigterm.py).
@pytest.mark.slow
def test_catalogue_killed_at_every_point_reruns_to_the_same_version(
    tiny_pipeline: Path, tmp_path: Path
) -> None:
    changed = write_changed_catalogue(tmp_path / "changed")
    base = copy_workspace(tiny_pipeline, tmp_path / "base")
    assert tokenize_catalogue(config(base, TINY_DATA), recommender_dir(config(base, TINY_DATA)))
    run_ingest(config(base, changed))  # 3 new, 2 changed, 1 removed: version 2 generates

    def rerun(ws: Path) -> None:
        cfg = config(ws, changed)
        tokenize_catalogue(cfg, recommender_dir(cfg))
        assert storage.latest_version(cfg.duckdb_path) == 2

    counts = crash_cases("catalogue", "tokenize-catalogue", base, changed, rerun, tmp_path)
    assert counts == {
        "kills": 8,
        "reruns_equal": 8,
        "leftovers": 0,
        "leftovers_after_sigterm": 0,
    }


def test_recovery_restores_data_moved_aside_and_removes_staging(tmp_path: Path) -> None:
    """The state a kill between the two renames leaves, built by hand: no ``data/``,
    the previous copy aside, a staging directory; the next ingest's recovery puts the
    previous copy back before anything else."""
    from store_core.ingest import recover_outputs

    ws = tmp_path / "ws"
    cfg = config(ws, TINY_DATA)
    run_ingest(cfg)
    before = snapshot(ws)
    (ws / "data").rename(ws / "data.old-1234abcd")
    (ws / ".data.staging-5678abcd").mkdir()
    (ws / ".data.staging-5678abcd" / "items.parquet").write_bytes(b"partial")
    done = recover_outputs(cfg)
    assert len(done) == 2 and "restored" in done[0]
    assert snapshot(ws) == before
    assert sorted(p.name for p in ws.iterdir()) == [".store-writer.lock", "data", "store.duckdb"]
