"""The ``store`` pipeline flow: the stages as subflows, one MLflow parent run per flow run.

Stages: ingest, train-tokenizer (Phase A), train-recommender (Phase B), tokenize-catalogue,
evaluate. Tasks are thin
wrappers around ``store_core``; only I/O that can fail transiently (fetching the source)
is retried.
"""

from __future__ import annotations

from typing import Any

from store_core.telemetry import disable_telemetry

disable_telemetry()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.runtime import deployment, flow_run  # noqa: E402

from store_core import tracking  # noqa: E402
from store_core.config import load_config  # noqa: E402
from store_core.ingest import ResolvedSource, resolve_source  # noqa: E402
from store_core.stages import (  # noqa: E402
    catalogue_stage,
    evaluate_stage,
    ingest_stage,
    recommender_stage,
    tokenizer_stage,
)


@task(retries=2, retry_delay_seconds=[5, 30])
def fetch_source(config: str | None, overrides: list[str]) -> ResolvedSource:
    """Resolve (and for built-in datasets download) the source: network I/O, retried."""
    return resolve_source(load_config(config, overrides))


@flow(name="ingest")
def ingest_flow(
    config: str | None = None,
    overrides: list[str] | None = None,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Stage 1: source -> Parquet + manifest + DuckDB ``items``."""
    cfg = load_config(config, overrides)
    source = fetch_source(config, overrides or [])
    outcome = ingest_stage(cfg, parent_run_id, source)
    get_run_logger().info("ingest counts: %s", outcome.result.counts)
    return {
        "run_id": outcome.run_id,
        "files": outcome.result.files,
        "counts": outcome.result.counts,
        "catalog_changes": outcome.result.catalog_changes,
    }


@flow(name="train-tokenizer")
def tokenizer_flow(
    config: str | None = None,
    overrides: list[str] | None = None,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Stage 2a: Phase A training + clustering into unique semantic IDs."""
    cfg = load_config(config, overrides)
    outcome = tokenizer_stage(cfg, parent_run_id)
    result = outcome.result
    get_run_logger().info(
        "semantic tokenizer: collision rate %.4f, checkpoint %s",
        result.stats["collision_rate"],
        result.checkpoint_dir,
    )
    return {
        "run_id": outcome.run_id,
        "checkpoint_dir": result.checkpoint_dir,
        "codebook_version": result.codebook_version,
        "collision_rate": result.stats["collision_rate"],
    }


@flow(name="train-recommender")
def recommender_flow(
    config: str | None = None,
    overrides: list[str] | None = None,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Stage 2b: Phase B multi-task training with validation and early stopping."""
    cfg = load_config(config, overrides)
    outcome = recommender_stage(cfg, parent_run_id)
    metrics = outcome.result.metrics
    get_run_logger().info(
        "recommender: best validation NDCG@10 %s at epoch %s",
        metrics["best_val_ndcg_at_10"],
        metrics["best_epoch"],
    )
    return {
        "run_id": outcome.run_id,
        "checkpoint_dir": outcome.result.checkpoint_dir,
        "best_val_ndcg_at_10": metrics["best_val_ndcg_at_10"],
    }


@flow(name="tokenize-catalogue")
def catalogue_flow(
    config: str | None = None,
    overrides: list[str] | None = None,
    parent_run_id: str | None = None,
    mode: str = "keep",
) -> dict[str, Any]:
    """Stage 3: every item's semantic ID as a new DuckDB version (one transaction)."""
    cfg = load_config(config, overrides)
    outcome = catalogue_stage(cfg, parent_run_id, mode=mode).result
    get_run_logger().info("semantic-ID version %s: %s", outcome.version, outcome.counts)
    return {"version": outcome.version, "counts": outcome.counts}


@flow(name="evaluate")
def evaluate_flow(
    config: str | None = None,
    overrides: list[str] | None = None,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Stage 4: STORE vs the baselines on the test split; report + plot + eval_results."""
    cfg = load_config(config, overrides)
    outcome = evaluate_stage(cfg, parent_run_id)
    result = outcome.result
    return {"run_id": outcome.run_id, "report": result.report_path, "plot": result.plot_path}


@flow(name="store")
def store_pipeline(
    config: str | None = None, overrides: list[str] | None = None, evaluate: bool = True
) -> dict[str, Any]:
    """Run every stage in order, each as a subflow with its own nested MLflow run."""
    cfg = load_config(config, overrides)
    tags = {tracking.FLOW_RUN_TAG: str(flow_run.id or "")}
    if deployment.id:
        tags["prefect.deployment_id"] = str(deployment.id)
        tags["prefect.deployment_name"] = str(deployment.name)
    with tracking.pipeline_run(cfg, run_name=f"store-{flow_run.name or 'local'}", tags=tags) as run:
        ingest = ingest_flow(config, overrides, run.run_id)
        tokenizer = tokenizer_flow(config, overrides, run.run_id)
        recommender = recommender_flow(config, overrides, run.run_id)
        catalogue = catalogue_flow(config, overrides, run.run_id)
        evaluation = evaluate_flow(config, overrides, run.run_id) if evaluate else None
    summary = {
        "workspace": cfg.workspace,
        "data_dir": cfg.data_dir,
        "duckdb": cfg.duckdb_path,
        "mlflow_run_id": run.run_id,
        "mlflow_tracking_uri": tracking.tracking_uri(cfg) if cfg.tracking.enabled else None,
        "models_dir": cfg.models_dir,
        "stages": {
            "ingest": ingest,
            "train_tokenizer": tokenizer,
            "train_recommender": recommender,
            "tokenize_catalogue": catalogue,
            "evaluate": evaluation,
        },
    }
    get_run_logger().info("pipeline finished: outputs under %s", cfg.workspace)
    return summary
