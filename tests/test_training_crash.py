"""kill -9 during Phase A and Phase B training (tiny config, DeepSpeed ZeRO-2 on CPU), then
``store train`` again: the rerun succeeds, its weights, semantic IDs and metrics equal an
uninterrupted run's bit for bit, and the workspace holds exactly the files an
uninterrupted run leaves (no partial checkpoint, temporary file or staging directory).

Each kill lands at a named point (tests/training_crash_child.py), the N-th time the
process gets there: inside DeepSpeed's write of a checkpoint, before a checkpoint is
published, between publishing it and rewriting the ``latest`` pointer, inside the
pointer's atomic write, between checkpoints, after new best weights were written,
during validation, and with the phase's output staged but not swapped in. Some
scenarios then damage the pointer the way the old non-atomic write could (empty,
garbled). The counts of the whole module are printed at its end (``-s``).

The default run takes one scenario (~60 s); the full matrix is ``slow`` (5-7 min on 2 busy cores).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from store_core.service_supervisor import clean_environ
from tests.conftest import REPO

pytestmark = pytest.mark.pipeline  # trains the tiny models

BIN = Path(sys.executable).parent
CHILD = REPO / "tests" / "training_crash_child.py"
TOKENIZER_OUT = "models/tokenizer-store"
RECOMMENDER_OUT = "models/recommender-store-multitask"
#: Metrics that measure time, not the result.
TIMING = {
    "train_seconds",
    "train_tokens_per_s",
    "train_targets_per_s",
    "extract_items_per_s",
    "resumed_from_step",
}
COUNTS = {"kills": 0, "partial_files_after_kill": 0, "reruns_equal": 0, "leftovers": 0}
COUNTS["failures"] = 0
#: Names of what a kill can leave: partial checkpoints, temporary files, staging copies.
PARTIAL = (".partial-", ".tmp-", ".staging-", ".old-", ".replaced-")


def environ() -> dict[str, str]:
    env = {k: v for k, v in clean_environ().items() if not k.endswith("SOCKET_IFNAME")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO), COLUMNS="200")
    return env


def store(ws: Path, *verb: str, point: str | None = None) -> subprocess.CompletedProcess[str]:
    args = [*verb, "--config", "tiny", "--set", f"workspace={ws}"]
    args += ["--set", "tracking.enabled=false"]
    if point is None:
        argv = [str(BIN / "store"), *args]
    else:
        name, n = point.split(":")
        argv = [sys.executable, str(CHILD), name, n, "--", *args]
    return subprocess.run(
        argv, cwd=REPO, env=environ(), capture_output=True, text=True, timeout=600
    )


def ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def files(ws: Path) -> set[str]:
    return {str(p.relative_to(ws)) for p in ws.rglob("*") if p.is_file()}


@pytest.fixture(scope="module", autouse=True)
def counts() -> Iterator[dict[str, int]]:
    yield COUNTS
    print(f"\ntraining kill tests: {json.dumps(COUNTS)}")


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = tmp_path_factory.mktemp("crash-ingested") / "ws"
    ok(store(ws, "ingest"))
    return ws


@pytest.fixture(scope="module")
def phase_a_baseline(ingested: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = shutil.copytree(ingested, tmp_path_factory.mktemp("crash-a") / "ws")
    ok(store(ws, "train", "--phase", "tokenizer"))
    return ws


@pytest.fixture(scope="module")
def phase_b_baseline(phase_a_baseline: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = shutil.copytree(phase_a_baseline, tmp_path_factory.mktemp("crash-b") / "ws")
    ok(store(ws, "train", "--phase", "recommender"))
    return ws


def _json(path: Path, ws: Path) -> object:
    record = json.loads(path.read_text().replace(str(ws), "<ws>"))
    if isinstance(record, dict):
        return {k: v for k, v in record.items() if k not in TIMING}
    return record


def differences(baseline: Path, ws: Path, output: str) -> list[str]:
    """What differs between two workspaces' outputs of one phase (empty: bit-equal)."""
    found = []
    a = load_file(str(baseline / output / "model.safetensors"))
    b = load_file(str(ws / output / "model.safetensors"))
    if a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a):
        found.append(f"{output}/model.safetensors")
    if not pq.read_table(baseline / output / "semantic_ids.parquet").equals(
        pq.read_table(ws / output / "semantic_ids.parquet")
    ):
        found.append(f"{output}/semantic_ids.parquet")
    for name in ("stats.json", "metrics.json", "metadata.json"):
        if (baseline / output / name).exists() and _json(baseline / output / name, baseline) != (
            _json(ws / output / name, ws)
        ):
            found.append(f"{output}/{name}")
    for state in sorted(baseline.glob("models/*-checkpoints/*/step-*/trainer_state.json")):
        theirs = ws / state.relative_to(baseline)
        mine_losses = [h["loss"] for h in json.loads(state.read_text())["history"]]
        if not theirs.exists() or mine_losses != [
            h["loss"] for h in json.loads(theirs.read_text())["history"]
        ]:
            found.append(str(state.relative_to(baseline)))
    return found


def _pointer(ws: Path, text: str) -> None:
    for pointer in ws.glob("models/*-checkpoints/*/latest"):
        pointer.write_text(text)


def empty_pointer(ws: Path) -> None:
    """The state the old non-atomic pointer write left after a kill (``int('')``)."""
    _pointer(ws, "")


def garbled_pointer(ws: Path) -> None:
    _pointer(ws, "step-99999\x00\xff")


def crash_and_rerun(
    start: Path,
    baseline: Path,
    tmp_path: Path,
    phase: str,
    point: str,
    damage: Callable[[Path], None] | None = None,
) -> None:
    """Copy ``start``, train ``phase`` killed at ``point``, apply ``damage``, train again;
    compare with ``baseline`` (``start`` trained without interruption)."""
    output = TOKENIZER_OUT if phase == "tokenizer" else RECOMMENDER_OUT
    ws = shutil.copytree(start, tmp_path / "ws")
    killed = store(ws, "train", "--phase", phase, point=point)
    COUNTS["kills"] += 1
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    COUNTS["partial_files_after_kill"] += sum(
        any(mark in part for mark in PARTIAL for part in Path(p).parts) for p in files(ws)
    )
    if damage is not None:
        damage(ws)
    rerun = store(ws, "train", "--phase", phase)
    if rerun.returncode != 0:
        COUNTS["failures"] += 1
    ok(rerun)
    diff = differences(baseline, ws, output)
    if not diff:
        COUNTS["reruns_equal"] += 1
    extra, missing = files(ws) - files(baseline), files(baseline) - files(ws)
    COUNTS["leftovers"] += len(extra)
    assert diff == []
    assert extra == set(), "left behind"
    assert missing == set()


def test_kill_inside_the_pointer_write_then_an_empty_pointer(
    ingested: Path, phase_a_baseline: Path, tmp_path: Path
) -> None:
    # The wedge: a kill while `latest` is rewritten. The pointer now goes through
    # a temporary file (left behind here), and even an empty pointer falls back.
    crash_and_rerun(
        ingested, phase_a_baseline, tmp_path, "tokenizer", "pointer-replace:2", empty_pointer
    )


PHASE_A = [
    ("torch-save:2", None),  # step-10: model states written, optimizer states not
    ("before-publish:2", None),  # step-20 complete in .partial-step-20, not renamed
    ("before-pointer:1", None),  # step-10 published, no pointer yet
    ("before-save:2", empty_pointer),  # 10 steps after step-10 lost; pointer emptied
    ("pointer-replace:1", garbled_pointer),
    ("output-staged:1", None),  # models/tokenizer-store staged, not swapped in
]
PHASE_B = [
    ("torch-save:4", None),  # the step-18 checkpoint half written
    ("best-written:1", None),  # best/step-9 written, its checkpoint not published
    ("validation:2", None),  # during the epoch-2 validation
    ("before-pointer:3", None),  # step-20 published, the pointer still at step-18
    ("pointer-replace:4", empty_pointer),  # the final checkpoint's pointer
    ("output-staged:1", None),
]


@pytest.mark.slow
@pytest.mark.parametrize(("point", "damage"), PHASE_A, ids=[p for p, _ in PHASE_A])
def test_phase_a_kill_then_rerun_equals_uninterrupted(
    ingested: Path,
    phase_a_baseline: Path,
    tmp_path: Path,
    point: str,
    damage: Callable[[Path], None] | None,
) -> None:
    crash_and_rerun(ingested, phase_a_baseline, tmp_path, "tokenizer", point, damage)


@pytest.mark.slow
@pytest.mark.parametrize(("point", "damage"), PHASE_B, ids=[p for p, _ in PHASE_B])
def test_phase_b_kill_then_rerun_equals_uninterrupted(
    phase_a_baseline: Path,
    phase_b_baseline: Path,
    tmp_path: Path,
    point: str,
    damage: Callable[[Path], None] | None,
) -> None:
    crash_and_rerun(phase_a_baseline, phase_b_baseline, tmp_path, "recommender", point, damage)
