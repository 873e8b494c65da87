"""The ``store`` pipeline flow: the stages as subflows, one MLflow parent run per flow run.

Stages: ingest, train-tokenizer (Phase A), train-recommender (Phase B), tokenize-catalogue,
evaluate. ``job="full"`` runs them all (the ``full-pipeline`` deployment);
``job="retokenize"`` runs ingest + tokenize-catalogue in keep mode with the current model
(the ``nightly-retokenize`` deployment). Subflows are thin wrappers around ``store_core``;
only I/O that can fail transiently (fetching the source) is a retried task. Summaries are
published as Prefect artifacts (Markdown, visible in the UI) next to the MLflow runs.

The pipeline holds the workspace's writer lock (:mod:`store_core.locking`) from its first
stage to its last, so a nightly run cannot slip in between two stages of a full run; the
stages take the same lock again (re-entrant within the process). SIGTERM is Prefect's to
handle inside a flow run: its engine raises ``TerminationSignal``, which unwinds the
stages and marks their MLflow runs like any other failure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from store_core.telemetry import disable_telemetry

disable_telemetry()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.runtime import deployment, flow_run  # noqa: E402
from prefect.tasks import exponential_backoff  # noqa: E402

from flows.scaleout import remote_beams, remote_search  # noqa: E402
from store_core import tracking  # noqa: E402
from store_core.config import load_config  # noqa: E402
from store_core.ingest import ResolvedSource, resolve_source  # noqa: E402
from store_core.locking import workspace_writer  # noqa: E402
from store_core.redaction import redact  # noqa: E402
from store_core.stages import (  # noqa: E402
    catalogue_stage,
    evaluate_stage,
    ingest_stage,
    model_version_of,
    recommender_stage,
    tokenizer_stage,
)

Job = Literal["full", "retokenize"]

#: Prefect artifact keys (lowercase, digits, dashes): the latest of each is shown per key.
CATALOGUE_ARTIFACT = "store-catalogue-summary"
EVALUATION_ARTIFACT = "store-evaluation"
RUN_ARTIFACT = "store-run-summary"


@task(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_jitter_factor=0.5)
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
    registered = model_version_of(outcome.result.checkpoint_dir)
    return {
        "run_id": outcome.run_id,
        "checkpoint_dir": outcome.result.checkpoint_dir,
        "best_val_ndcg_at_10": metrics["best_val_ndcg_at_10"],
        "model_uri": registered["uri"] if registered else None,
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
    stage = catalogue_stage(cfg, parent_run_id, mode=mode, remote=remote_beams(cfg))
    outcome = stage.result
    get_run_logger().info("semantic-ID version %s: %s", outcome.version, outcome.counts)
    return {
        "run_id": stage.run_id,
        "version": outcome.version,
        "counts": outcome.counts,
        "summary_markdown": outcome.summary_markdown(mode),
    }


@flow(name="evaluate")
def evaluate_flow(
    config: str | None = None,
    overrides: list[str] | None = None,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Stage 4: STORE vs the baselines on the test split; report + plot + eval_results."""
    cfg = load_config(config, overrides)
    outcome = evaluate_stage(cfg, parent_run_id, remote_search(cfg))
    result = outcome.result
    return {"run_id": outcome.run_id, "report": result.report_path, "plot": result.plot_path}


@flow(name="store")
def store_pipeline(
    config: str | None = None,
    overrides: list[str] | None = None,
    evaluate: bool = True,
    job: Job = "full",
) -> dict[str, Any]:
    """``job="full"``: every stage in order, each as a subflow with its own nested MLflow
    run. ``job="retokenize"``: ingest the current catalogue, then give new and changed
    items semantic IDs with the current model (no training)."""
    cfg = load_config(config, overrides)
    tags = {tracking.FLOW_RUN_TAG: str(flow_run.id or ""), "store.job": job}
    if deployment.id:
        tags[tracking.DEPLOYMENT_ID_TAG] = str(deployment.id)
        tags[tracking.DEPLOYMENT_NAME_TAG] = str(deployment.name)
    stages: dict[str, Any] = {}
    name = f"store-{job}-{flow_run.name or 'local'}"
    with (
        workspace_writer(cfg.workspace, f"pipeline ({job})"),
        tracking.pipeline_run(cfg, run_name=name, tags=tags) as run,
    ):
        stages["ingest"] = ingest_flow(config, overrides, run.run_id)
        if job == "full":
            stages["train_tokenizer"] = tokenizer_flow(config, overrides, run.run_id)
            stages["train_recommender"] = recommender_flow(config, overrides, run.run_id)
        stages["tokenize_catalogue"] = catalogue_flow(config, overrides, run.run_id)
        if job == "full" and evaluate:
            stages["evaluate"] = evaluate_flow(config, overrides, run.run_id)
    summary = {
        "job": job,
        "workspace": cfg.workspace,
        "data_dir": cfg.data_dir,
        "duckdb": cfg.duckdb_path,
        "mlflow_run_id": run.run_id,
        "mlflow_tracking_uri": (
            redact(tracking.tracking_uri(cfg)) if cfg.tracking.enabled else None
        ),
        "models_dir": cfg.models_dir,
        "stages": stages,
    }
    publish_artifacts(summary)
    get_run_logger().info("pipeline finished: outputs under %s", cfg.workspace)
    return summary


def publish_artifacts(summary: dict[str, Any]) -> None:
    """Markdown artifacts on the flow run the user triggered (shown in the Prefect UI):
    the run summary, the catalogue changes and, after a full run, the evaluation."""
    create_markdown_artifact(
        run_summary_markdown(summary),
        key=RUN_ARTIFACT,
        description=f"store ({summary['job']}): where the outputs are",
    )
    create_markdown_artifact(
        summary["stages"]["tokenize_catalogue"]["summary_markdown"],
        key=CATALOGUE_ARTIFACT,
        description="New, changed, removed and unchanged items of this catalogue run",
    )
    evaluation = summary["stages"].get("evaluate")
    if evaluation:
        create_markdown_artifact(
            Path(evaluation["report"]).read_text(),
            key=EVALUATION_ARTIFACT,
            description="STORE vs the baselines on the test split (mean +- std over seeds)",
        )


def run_summary_markdown(summary: dict[str, Any]) -> str:
    """Where a run's outputs are, as the Markdown of the run-summary artifact."""
    catalogue = summary["stages"]["tokenize_catalogue"]
    lines = [
        f"# store ({summary['job']})",
        "",
        "| output | where |",
        "|---|---|",
        f"| workspace | `{summary['workspace']}` |",
        f"| Parquet | `{summary['data_dir']}` |",
        f"| DuckDB | `{summary['duckdb']}` (semantic-ID version {catalogue['version']}) |",
        f"| models | `{summary['models_dir']}` |",
        f"| MLflow run | `{summary['mlflow_run_id']}` at `{summary['mlflow_tracking_uri']}` |",
        "",
        "| items | count |",
        "|---|---:|",
        *(f"| {k} | {v} |" for k, v in catalogue["counts"].items()),
    ]
    recommender = summary["stages"].get("train_recommender")
    if recommender:
        lines += ["", f"Best validation NDCG@10: {recommender['best_val_ndcg_at_10']}"]
    evaluation = summary["stages"].get("evaluate")
    if evaluation:
        lines += ["", f"Evaluation report: `{evaluation['report']}`"]
    return "\n".join(lines) + "\n"
