"""The two deployments of the ``store`` flow, served from this process (the process
:mod:`store_core.service_supervisor` starts for ``store serve``).

    python -m flows.deployments --config ml-100k [--set key=value ...]

``full-pipeline`` (on demand, every stage) and ``nightly-retokenize`` (cron from the
config's ``service`` section: ingest + tokenize new/changed items with the current model).
Needs ``PREFECT_API_URL``; ``store serve`` starts a local server and this process for you.
Flow runs execute in subprocesses of this one; stop it with SIGTERM/Ctrl-C.
"""

from __future__ import annotations

import argparse
from typing import Any, cast

from store_core.telemetry import disable_telemetry

disable_telemetry()

from prefect import serve  # noqa: E402
from prefect.deployments.runner import RunnerDeployment  # noqa: E402
from prefect.schedules import Cron  # noqa: E402

from flows.pipeline import store_pipeline  # noqa: E402
from store_core.config import load_config, resolve_config_path  # noqa: E402

FULL_PIPELINE = "full-pipeline"
NIGHTLY = "nightly-retokenize"


def deployment_parameters(config: str | None, overrides: list[str]) -> dict[str, Any]:
    """Flow parameters that mean the same in any working directory: the config as an
    absolute path and the workspace pinned."""
    cfg = load_config(config, overrides)
    path = str(resolve_config_path(config).resolve()) if config else None
    kept = [item for item in overrides if not item.startswith("workspace=")]
    return {"config": path, "overrides": [*kept, f"workspace={cfg.workspace}"]}


def build_deployments(
    config: str | None, overrides: list[str], *, schedule: bool = True
) -> list[RunnerDeployment]:
    """The ``full-pipeline`` and ``nightly-retokenize`` deployments for one config."""
    cfg = load_config(config, overrides)
    params = deployment_parameters(config, overrides)
    full = store_pipeline.to_deployment(
        name=FULL_PIPELINE,
        parameters={**params, "evaluate": True, "job": "full"},
        description="Every stage: ingest, Phase A + B training, catalogue tokenization, "
        "evaluation.",
        tags=["store"],
    )
    nightly = store_pipeline.to_deployment(
        name=NIGHTLY,
        parameters={**params, "evaluate": False, "job": "retokenize"},
        schedules=[Cron(cfg.service.nightly_cron, timezone=cfg.service.timezone)]
        if schedule
        else None,
        description="Ingest the current catalogue, then give new and changed items "
        "semantic IDs with the current model (no retraining).",
        tags=["store"],
    )
    return [cast(RunnerDeployment, full), cast(RunnerDeployment, nightly)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", "-c", default=None, help="config name or YAML path")
    parser.add_argument("--set", "-s", dest="overrides", action="append", default=[])
    parser.add_argument(
        "--no-schedule", action="store_true", help="serve nightly-retokenize without its cron"
    )
    args = parser.parse_args(argv)
    serve(
        *build_deployments(args.config, args.overrides, schedule=not args.no_schedule),
        print_starting_message=True,
    )


if __name__ == "__main__":
    main()
