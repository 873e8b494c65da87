"""Keep every byte on this machine: switch off the usage telemetry of MLflow and Prefect.

Called before mlflow or prefect is imported (the CLI, tracking and flows do). Only sets
variables the user has not set, so an explicit opt-in still wins.
"""

from __future__ import annotations

import os

_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}


def disable_telemetry() -> None:
    for key, value in _DEFAULTS.items():
        os.environ.setdefault(key, value)
