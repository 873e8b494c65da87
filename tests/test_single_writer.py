"""One writer per workspace: the writer lock across real processes, and the base of a
semantic-ID version re-checked inside the writing transaction."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from store_core import catalogue, locking, storage
from store_core.catalogue import tokenize_catalogue
from store_core.config import StoreConfig, load_config
from store_core.ingest import run_ingest
from store_core.locking import HOLDER_FILE, LOCK_FILE, WorkspaceLocked, workspace_writer
from store_core.recommender_training import recommender_dir
from tests.conftest import REPO, TINY_DATA, copy_workspace, write_changed_catalogue

pytestmark = pytest.mark.service  # starts servers or CLI processes


def config(ws: Path, data: Path = TINY_DATA) -> StoreConfig:
    return load_config("tiny", [f"workspace={ws}", f"data.path={data}", "tracking.enabled=false"])


def env(**extra: str) -> dict[str, str]:
    base = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "300"}
    return {**os.environ, **base, **extra}


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


HOLDER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from store_core.locking import workspace_writer
    ws, go = sys.argv[1], Path(sys.argv[2])
    with workspace_writer(ws, "test-holder"):
        (go.parent / "holding").write_text("yes")
        while not go.exists():
            time.sleep(0.05)
    """
)


@contextmanager
def holder_process(ws: Path, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    go = tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER_SCRIPT, str(ws), str(go)], env=env())
    try:
        wait_for(lambda: (tmp_path / "holding").exists(), "the holder to take the lock", 60)
        yield proc
    finally:
        go.touch()
        proc.wait(timeout=60)


def test_lock_is_reentrant_records_its_holder_and_cleans_up(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    with workspace_writer(str(ws), "outer"):
        holder = locking.read_holder(str(ws))
        assert holder is not None and holder.pid == os.getpid() and holder.verb == "outer"
        with workspace_writer(str(ws), "inner"):  # the pipeline around its stages
            assert locking.read_holder(str(ws)) == holder
        assert (ws / HOLDER_FILE).exists()
        assert os.environ[locking.HELD_ENV] == f"{os.getpid()}:{ws / LOCK_FILE}"
    assert locking.read_holder(str(ws)) is None
    assert locking.HELD_ENV not in os.environ
    # The lock file stays (waiters share its inode); the holder record goes.
    assert sorted(p.name for p in ws.iterdir()) == [LOCK_FILE]


def test_second_writer_fails_naming_the_holder_then_gets_the_lock(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    with holder_process(ws, tmp_path) as proc:
        started = time.monotonic()
        with pytest.raises(WorkspaceLocked) as info, workspace_writer(str(ws), "me", timeout_s=0.5):
            pass
        assert time.monotonic() - started >= 0.5
        message = str(info.value)
        assert "\n" not in message
        assert f"pid {proc.pid} (test-holder) on {socket.gethostname()}, started 20" in message
        assert "STORE_WRITER_LOCK_TIMEOUT_S" in message
    with workspace_writer(str(ws), "me", timeout_s=0):
        pass


def test_a_killed_holder_never_wedges_the_workspace(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    go = tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER_SCRIPT, str(ws), str(go)], env=env())
    wait_for(lambda: (tmp_path / "holding").exists(), "the holder to take the lock", 60)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert (ws / HOLDER_FILE).exists()  # its record stays behind ...
    assert locking.read_holder(str(ws)) is None  # ... and is recognised as stale
    with workspace_writer(str(ws), "next", timeout_s=0):  # the kernel dropped the lock
        assert locking.read_holder(str(ws)).verb == "next"  # type: ignore[union-attr]
    assert not (ws / HOLDER_FILE).exists()


def test_a_child_of_the_holder_does_not_wait_for_its_parent(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    child = "from store_core.locking import workspace_writer\n"
    child += f"with workspace_writer({str(ws)!r}, 'rank 0', timeout_s=0): print('ok')"
    with workspace_writer(str(ws), "launcher"):
        proc = subprocess.run([sys.executable, "-c", child], env=env(), capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout.decode().strip() == "ok"


@pytest.fixture
def changed_workspace(tiny_pipeline: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Version 1 written, then a catalogue with 3 new, 2 changed and 1 removed items
    ingested: the next tokenize-catalogue writes version 2."""
    changed = write_changed_catalogue(tmp_path / "changed")
    ws = copy_workspace(tiny_pipeline, tmp_path / "ws")
    assert tokenize_catalogue(config(ws), recommender_dir(config(ws))).version == 1
    run_ingest(config(ws, changed))
    return ws, changed


def catalogue_argv(ws: Path, changed: Path) -> list[str]:
    return [
        "tokenize-catalogue",
        "-c",
        "tiny",
        "--set",
        f"workspace={ws}",
        "--set",
        f"data.path={changed}",
        "--set",
        "tracking.enabled=false",
    ]


def test_two_concurrent_catalogue_runs_write_one_version(
    changed_workspace: tuple[Path, Path], tmp_path: Path
) -> None:
    """The second run waits for the first, then starts from the version the first wrote:
    it finds nothing changed and writes nothing (before the lock it wrote a duplicate
    version 3 with the counts of version 2)."""
    ws, changed = changed_workspace
    hold = tmp_path / "hold"
    hold.mkdir()
    child = [sys.executable, str(REPO / "tests" / "crash_child.py")]
    first = subprocess.Popen(
        [*child, "hold", "-", str(hold), "--", *catalogue_argv(ws, changed)],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    wait_for(lambda: (hold / "holding").exists(), "the first run to hold the lock")
    second_log = tmp_path / "second.log"
    with second_log.open("wb") as log:
        second = subprocess.Popen(
            [sys.executable, "-m", "store_cli", *catalogue_argv(ws, changed)],
            env=env(STORE_WRITER_LOCK_TIMEOUT_S="300"),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_for(lambda: b"is being written by" in second_log.read_bytes(), "the second to wait")
        (hold / "go").touch()
        first_out = first.communicate(timeout=300)[0].decode()
        second.wait(timeout=300)
    second_out = second_log.read_text()
    assert first.returncode == 0, first_out[-3000:]
    assert second.returncode == 0, second_out[-3000:]
    waited = " ".join(second_out.split())
    assert f"pid {first.pid} (tokenize-catalogue)" in waited
    assert "semantic-ID version 2 written" in first_out
    assert "no new version written" in second_out
    _, rows = storage.query(
        str(ws / "store.duckdb"), "SELECT version, counts FROM semantic_id_versions ORDER BY 1"
    )
    assert [v for v, _ in rows] == [1, 2]
    assert '"changed": 2' in rows[1][1] and '"new": 3' in rows[1][1]
    assert '"removed": 1' in rows[1][1] and '"unchanged": 45' in rows[1][1]


def test_second_writer_verbs_fail_with_one_line_naming_the_holder(
    tmp_path: Path,
) -> None:
    ws = tmp_path / "ws"
    run_ingest(config(ws))
    with holder_process(ws, tmp_path) as proc:
        argv = [sys.executable, "-m", "store_cli", "ingest", "-c", "tiny"]
        argv += ["--set", f"workspace={ws}", "--set", "tracking.enabled=false"]
        out = subprocess.run(
            argv,
            env=env(STORE_WRITER_LOCK_TIMEOUT_S="1"),
            capture_output=True,
            text=True,
        )
    assert out.returncode == 1
    error = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, out.stderr
    assert f"is locked by another writer: pid {proc.pid} (test-holder)" in error[0]
    assert "started 20" in error[0] and "ingest waited 1 s" in error[0]


def test_base_is_rechecked_inside_the_writing_transaction(
    changed_workspace: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that ignores the lock commits between this run's base read and its
    commit: the run refuses to write from its stale base and writes nothing."""
    ws, changed = changed_workspace
    cfg = config(ws, changed)
    db = cfg.duckdb_path
    real = catalogue._base_rows

    def base_then_an_intruder_commits(*args: object) -> object:
        result = real(*args)  # type: ignore[arg-type]
        (codebook,) = storage.codebook_rows(db)
        current = storage.current_rows(db, codebook["codebook_version"])
        assert current is not None
        rows = current.select(storage.SEMANTIC_ID_ROWS_SCHEMA.names)
        storage.write_semantic_id_version(
            db, codebook, rows.cast(storage.SEMANTIC_ID_ROWS_SCHEMA), {}, "intruder"
        )
        return result

    monkeypatch.setattr(catalogue, "_base_rows", base_then_an_intruder_commits)
    with pytest.raises(storage.StaleBaseError, match="committed after this run read version 1"):
        tokenize_catalogue(cfg, recommender_dir(cfg))
    _, rows = storage.query(db, "SELECT version, note FROM semantic_id_versions ORDER BY 1")
    assert rows == [(1, "tokenize-catalogue (keep)"), (2, "intruder")]
    assert not (ws / catalogue.STAGING_DIR).exists()
    monkeypatch.setattr(catalogue, "_base_rows", real)
    assert tokenize_catalogue(cfg, recommender_dir(cfg)).version == 3  # from the new base
