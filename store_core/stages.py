"""Stage entry points with tracking: what the CLI verbs and the Prefect subflows call.

Each function takes the validated config (and optionally the parent MLflow run id), runs
the library code for its stage, logs counts/artifacts to a nested MLflow run and returns
plain data (paths, ids, counts) for the next stage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from store_core import tracking
from store_core.config import StoreConfig
from store_core.ingest import IngestResult, ResolvedSource, run_ingest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageOutcome:
    """A stage's result plus the MLflow run that recorded it."""

    run_id: str | None
    result: IngestResult


def ingest_stage(
    cfg: StoreConfig,
    parent_run_id: str | None = None,
    source: ResolvedSource | None = None,
) -> StageOutcome:
    """Ingest, then log counts as metrics and the manifest as an artifact."""
    with tracking.stage_run(cfg, "ingest", parent_run_id) as run:
        result = run_ingest(cfg, source)
        run.log_params({"format": result.manifest["format"], "source": result.manifest["source"]})
        run.log_metrics({k: float(v) for k, v in result.counts.items()})
        run.log_metrics({f"catalog_{k}": float(v) for k, v in result.catalog_changes.items()})
        run.log_dict(result.manifest, "manifest.json")
        return StageOutcome(run.run_id, result)
