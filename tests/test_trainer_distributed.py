"""Two ranks through the real ``deepspeed`` launcher on CPU (gloo), ZeRO-2 and ZeRO-3."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from store_core.service_supervisor import free_port

pytestmark = pytest.mark.pipeline  # trains the tiny models

REPO = Path(__file__).resolve().parents[1]


# ZeRO-3 across two processes is in `make test-slow` (~30 s); CI's suite keeps ZeRO-2 here,
# both phases as two ranks (test_launch.py) and ZeRO-3 in one process (test_trainer.py).
@pytest.mark.parametrize("stage", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_two_process_zero_run_via_launcher(stage: int, tmp_path: Path) -> None:
    launcher = Path(sys.executable).parent / "deepspeed"
    if not launcher.exists():
        launcher = Path(shutil.which("deepspeed") or "deepspeed")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(
        [
            str(launcher),
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            str(REPO / "tests" / "distributed_script.py"),
            str(tmp_path),
            str(stage),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["world_size"] == 2
    assert report["changed"] is True
    assert report["losses"][-1] < report["losses"][0] - 0.3
    # One node: the launcher's MASTER_ADDR is 127.0.0.1, so every rank listens there only.
    for r in range(2):
        listening = json.loads((tmp_path / f"listening-rank{r}.json").read_text())
        assert listening and set(listening) <= {"127.0.0.1", "::1"}, (r, listening)
