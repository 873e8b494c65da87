"""What every benchmark prints first: the machine and library versions it ran on."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """The command that reruns this benchmark as it was started (``python -m <module>``
    and ``argv``, default this process's arguments), for its report."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def machine_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/meminfo") as handle:
            info["mem_total_gib"] = round(int(handle.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


RESULTS = Path(__file__).resolve().parent / "results"


def write_results(report: dict[str, Any], file_name: str, directory: Path = RESULTS) -> Path:
    """Write a benchmark report to ``<directory>/<file_name>`` (default
    ``benchmarks/results``) and say where."""
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / file_name
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return out
