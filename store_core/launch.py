"""Run a training phase as several ranks under the ``deepspeed`` launcher.

With ``launcher.kind: deepspeed`` the training stages (and so the Prefect flow) do not
train in their own process: they write the resolved config to
``<workspace>/launch/<phase>.yaml`` and run

    deepspeed [--hostfile H] [--num_gpus N] [--num_nodes M] --master_port P --no_local_rank \\
        --module store_cli train --phase <phase> --config <workspace>/launch/<phase>.yaml

The ranks train with DeepSpeed ZeRO; rank 0 writes the phase's outputs to the workspace
(which must be shared by every node), and the stage then reads them back and tracks them.
The child config has ``launcher.kind: inprocess`` (no recursion) and tracking off (the
stage tracks the outcome in its own MLflow run).

On one node the launcher gives the ranks ``MASTER_ADDR=127.0.0.1`` and their rendezvous
listens on loopback only (:mod:`store_core.distributed`); with a hostfile it is the first
host's address, as the user asked. The launcher does not inherit the rendezvous variables
an earlier in-process phase set here.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from store_core.config import StoreConfig
from store_core.errors import StoreError
from store_core.workspace import atomic_write_text

logger = logging.getLogger(__name__)


def launched(cfg: StoreConfig) -> bool:
    return cfg.launcher.kind == "deepspeed"


def launcher_executable() -> str:
    """The ``deepspeed`` script next to this Python, else the one on PATH."""
    beside = Path(sys.executable).parent / "deepspeed"
    if beside.exists():
        return str(beside)
    found = shutil.which("deepspeed")
    if found is None:
        raise StoreError("launcher.kind is 'deepspeed' but no `deepspeed` executable was found")
    return found


def child_config(cfg: StoreConfig, phase: str) -> Path:
    """The resolved config for the ranks, written atomically into the workspace (raises
    OSError when it cannot be written)."""
    data = cfg.model_dump(mode="json")
    data["launcher"] = {**data["launcher"], "kind": "inprocess"}
    data["tracking"] = {**data["tracking"], "enabled": False}
    target = Path(cfg.workspace) / "launch" / f"{phase}.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        target,
        f"# Written by store_core.launch for the deepspeed ranks of phase {phase}.\n"
        + yaml.safe_dump(data, sort_keys=False),
    )
    return target


def launch_command(cfg: StoreConfig, phase: str, config_path: Path, port: int) -> list[str]:
    launcher = cfg.launcher
    argv = [launcher_executable()]
    if launcher.hostfile:
        if not Path(launcher.hostfile).is_file():
            raise StoreError(f"launcher.hostfile {launcher.hostfile} does not exist")
        argv += ["--hostfile", launcher.hostfile]
    if launcher.num_nodes:
        argv += ["--num_nodes", str(launcher.num_nodes)]
    if launcher.num_gpus:
        argv += ["--num_gpus", str(launcher.num_gpus)]
    argv += ["--master_port", str(port), *launcher.extra_args, "--no_local_rank"]
    argv += ["--module", "store_cli", "train", "--phase", phase]
    return [*argv, "--config", str(config_path)]


def run_phase(cfg: StoreConfig, phase: str) -> None:
    """Train ``phase`` ("tokenizer" or "recommender") under the launcher; raises
    :class:`StoreError` with the launcher's exit status when any rank fails."""
    from store_core.distributed import variables_set_here
    from store_core.service_supervisor import clean_environ, free_port

    config_path = child_config(cfg, phase)
    port = cfg.launcher.master_port or free_port()
    argv = launch_command(cfg, phase, config_path, port)
    env = clean_environ()  # the launcher sets the rank variables itself
    for key, value in variables_set_here().items():  # e.g. GLOO_SOCKET_IFNAME=lo
        if env.get(key) == value:
            del env[key]
    repo_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH")) if p)
    logger.info("launching %s training: %s", phase, " ".join(argv))
    completed = subprocess.run(argv, env=env, check=False)
    if completed.returncode != 0:
        raise StoreError(
            f"{phase} training under the deepspeed launcher failed (exit status "
            f"{completed.returncode}); command: {' '.join(argv)}"
        )
