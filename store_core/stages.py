"""Stage entry points with tracking: what the CLI verbs and the Prefect subflows call.

Each function takes the validated config (and optionally the parent MLflow run id), runs
the library code for its stage, logs counts/artifacts to a nested MLflow run and returns
a :class:`StageOutcome` whose ``result`` is the stage's typed result:
:class:`~store_core.ingest.IngestResult`, :class:`~store_core.item_tokenizer.
TokenizerOutcome`, :class:`~store_core.recommender_training.RecommenderOutcome`,
:class:`~store_core.catalogue.CatalogueOutcome` and :class:`EvaluationOutcome`.

Every stage handles SIGTERM like Ctrl-C (:func:`store_core.signals.handle_sigterm`,
where no one else handles it already), so a cancelled stage unwinds and its MLflow run
is marked instead of staying RUNNING. The stages that write into the workspace hold its
writer lock (:mod:`store_core.locking`): ingest and tokenize-catalogue in their library
functions, the two training phases here (rank 0, for the whole phase).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from store_core import checkpoint as ckpt
from store_core import launch, signals, tracking
from store_core.config import StoreConfig
from store_core.errors import ConfigError
from store_core.ingest import IngestResult, ResolvedSource, recover_outputs, run_ingest
from store_core.locking import workspace_writer

if TYPE_CHECKING:
    from store_core.catalogue import CatalogueOutcome
    from store_core.evaluation import SystemResult
    from store_core.item_tokenizer import TokenizerOutcome
    from store_core.recommender_training import RecommenderOutcome

logger = logging.getLogger(__name__)

R = TypeVar("R")


@dataclass(frozen=True)
class StageOutcome(Generic[R]):
    """A stage's typed result plus the MLflow run that recorded it."""

    run_id: str | None
    result: R


def ingest_stage(
    cfg: StoreConfig,
    parent_run_id: str | None = None,
    source: ResolvedSource | None = None,
) -> StageOutcome[IngestResult]:
    """Ingest, then log counts as metrics and the manifest as an artifact.

    Raises what :func:`store_core.ingest.run_ingest` raises.
    """
    with signals.handle_sigterm(), tracking.stage_run(cfg, "ingest", parent_run_id) as run:
        result = run_ingest(cfg, source)
        run.log_params({"format": result.manifest["format"], "source": result.manifest["source"]})
        run.log_metrics({k: float(v) for k, v in result.counts.items()})
        run.log_metrics({f"catalog_{k}": float(v) for k, v in result.catalog_changes.items()})
        run.log_dict(result.manifest, "manifest.json")
        return StageOutcome(run.run_id, result)


def tokenizer_stage(
    cfg: StoreConfig, parent_run_id: str | None = None
) -> StageOutcome[TokenizerOutcome | None]:
    """Phase A + clustering; logs params, losses, stats, the usage plot and the checkpoint.

    Under a multi-process launcher only rank 0 tracks and returns an outcome (others
    return an outcome whose result is None). Rank 0 holds the workspace's writer lock
    for the whole phase: :class:`store_core.locking.WorkspaceLocked` when another writer
    keeps it longer than the lock timeout; :class:`store_core.errors.StoreError` for
    a failed launched run.
    """
    from store_core import item_tokenizer
    from store_core.codebook_stats import stats_metrics
    from store_core.item_tokenizer import checkpoint_dir, train_semantic_tokenizer
    from store_core.trainer import rank

    if rank() != 0:
        with signals.handle_sigterm():
            return StageOutcome(None, train_semantic_tokenizer(cfg))
    params = {
        "model": cfg.model.model_dump(mode="json"),
        "semantic_id": cfg.semantic_id.model_dump(mode="json"),
        "train": cfg.tokenizer_train.model_dump(mode="json"),
    }
    with _training_run(cfg, "train_tokenizer", parent_run_id, params) as run:
        if launch.launched(cfg):
            marker = f"{checkpoint_dir(cfg)}/{ckpt.STATS_FILE}"
            outcome: TokenizerOutcome | None = _launched(
                cfg, "tokenizer", marker, item_tokenizer.load_outcome
            )
        else:
            outcome = train_semantic_tokenizer(cfg, run)
        assert outcome is not None
        stats = outcome.stats
        metrics = stats_metrics({k: v for k, v in stats.items() if _numeric_or_levels(k, v)})
        metrics.update({f"recon_{k}": v for k, v in stats["heldout_reconstruction"].items()})
        metrics.update({f"coherence_{k}": v for k, v in stats["coherence_first_code"].items()})
        run.log_metrics(metrics)
        run.set_tags({"store.codebook_version": outcome.codebook_version})
        directory = outcome.checkpoint_dir
        for name in (ckpt.STATS_FILE, ckpt.METADATA_FILE, ckpt.USAGE_PLOT):
            run.log_artifact(f"{directory}/{name}")
        run.log_artifacts(directory, "checkpoint")
        return StageOutcome(run.run_id, outcome)


@contextmanager
def _training_run(
    cfg: StoreConfig, stage: str, parent_run_id: str | None, params: dict[str, Any]
) -> Iterator[tracking.Run]:
    """Rank 0's frame around a training phase: SIGTERM unwinds like Ctrl-C, the
    workspace's writer lock is held, the stage run is open, a killed run's leftovers are
    repaired, and ``params`` are logged (flattened)."""
    with (
        signals.handle_sigterm(),
        workspace_writer(cfg.workspace, stage.replace("_", "-")),
        tracking.stage_run(cfg, stage, parent_run_id) as run,
    ):
        recover_outputs(cfg)
        run.log_params(tracking.flatten(params))
        yield run


T = TypeVar("T")


def _launched(cfg: StoreConfig, phase: str, marker: str, load: Callable[[StoreConfig], T]) -> T:
    """Train ``phase`` under the deepspeed launcher, then read what its rank 0 wrote with
    ``load`` (``marker`` must be rewritten by that run, or the outputs are someone
    else's)."""
    import os
    import time

    from store_core.errors import StoreError

    started = time.time()
    launch.run_phase(cfg, phase)
    if not os.path.exists(marker) or os.path.getmtime(marker) < started - 1.0:
        raise StoreError(f"the launched {phase} training finished but did not write {marker}")
    return load(cfg)


def _is_number(value: Any) -> bool:
    """Whether ``value`` can be an MLflow metric: an int or float, not a bool (or None)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _numeric_or_levels(key: str, value: Any) -> bool:
    return key == "levels" or _is_number(value)


def recommender_stage(
    cfg: StoreConfig, parent_run_id: str | None = None
) -> StageOutcome[RecommenderOutcome | None]:
    """Phase B: multi-task training with validation; logs per-task losses (step metrics),
    validation metrics per validation round, agreement, and the checkpoint.

    Rank 0 holds the workspace's writer lock for the whole phase:
    :class:`store_core.locking.WorkspaceLocked` when another writer keeps it longer than
    the lock timeout; :class:`store_core.errors.StoreError` for a failed launched run.
    """
    from store_core import recommender_training
    from store_core.recommender_training import recommender_dir, train_recommender
    from store_core.trainer import rank

    if rank() != 0:
        with signals.handle_sigterm():
            return StageOutcome(None, train_recommender(cfg))
    params = {
        "recommender": cfg.recommender.model_dump(mode="json"),
        "train": cfg.recommender_train.model_dump(mode="json"),
        "quantizer": cfg.semantic_id.quantizer,
    }
    with _training_run(cfg, "train_recommender", parent_run_id, params) as run:
        if launch.launched(cfg):
            marker = f"{recommender_dir(cfg)}/{ckpt.METRICS_FILE}"
            outcome: RecommenderOutcome | None = _launched(
                cfg, "recommender", marker, recommender_training.load_outcome
            )
        else:
            outcome = train_recommender(cfg, run)
        assert outcome is not None
        metrics = outcome.metrics
        run.log_metrics({k: float(v) for k, v in metrics.items() if _is_number(v)})
        for name in (ckpt.METRICS_FILE, ckpt.METADATA_FILE):
            run.log_artifact(f"{outcome.checkpoint_dir}/{name}")
        run.log_artifacts(outcome.checkpoint_dir, "checkpoint")
        record_model_version(cfg, run, outcome.checkpoint_dir, metrics)
        return StageOutcome(run.run_id, outcome)


def record_model_version(
    cfg: StoreConfig, run: tracking.Run, checkpoint_dir: str, metrics: dict[str, Any]
) -> tracking.ModelVersion | None:
    """Register the logged checkpoint as a new model version (tagged with the codebook
    version it produced) and record it next to the checkpoint
    (:func:`store_core.checkpoint.write_model_version`), so later catalogue runs (the
    nightly job) can point at it."""
    meta = ckpt.read_recommender_metadata(checkpoint_dir)
    tags = {
        "codebook_version": meta.codebook_version,
        "quantizer": meta.quantizer,
        "variant": str(metrics.get("variant", "")),
        "best_val_ndcg_at_10": str(metrics.get("best_val_ndcg_at_10")),
    }
    version = tracking.register_model(
        cfg,
        run,
        "checkpoint",
        tags=tags,
        description=f"Phase B recommender, codebook {tags['codebook_version']}",
    )
    if version is None:
        ckpt.write_model_version(checkpoint_dir, None)  # no registry entry describes these
        return None
    record = ckpt.RegisteredVersion.from_json(
        {**version.to_json(), "tags": tags}, meta.checkpoint_id
    )
    ckpt.write_model_version(checkpoint_dir, record)
    run.set_tags({"store.model_uri": version.uri})
    return version


def model_version_of(checkpoint_dir: str) -> ckpt.RegisteredVersion | None:
    """The registry entry :func:`record_model_version` recorded for a checkpoint, if any."""
    return ckpt.read_model_version(checkpoint_dir)


#: The ``mode`` values of :func:`catalogue_stage` (``store tokenize-catalogue --mode``).
CATALOGUE_MODES = ("keep", "regenerate")


def catalogue_stage(
    cfg: StoreConfig,
    parent_run_id: str | None = None,
    *,
    mode: str = "keep",
    remote: Any = None,
) -> StageOutcome[CatalogueOutcome]:
    """Tokenize the catalogue into a new DuckDB version; logs counts, items/s and the
    exported version (Parquet) as an artifact. ``remote``: a
    :class:`store_core.catalogue.RemoteBeams` generating the new IDs' beams elsewhere
    (shard tasks on a cluster, :mod:`flows.scaleout`); None: in this process.

    Raises :class:`store_core.errors.ConfigError` for an unknown ``mode``, and what
    :func:`store_core.catalogue.tokenize_catalogue` raises.
    """
    import tempfile
    from pathlib import Path

    import pyarrow.parquet as pq

    from store_core import storage
    from store_core.catalogue import tokenize_catalogue
    from store_core.recommender_training import recommender_dir

    if mode not in CATALOGUE_MODES:
        raise ConfigError(f"mode must be one of {', '.join(CATALOGUE_MODES)}, got {mode!r}")
    checkpoint = recommender_dir(cfg)
    registered = model_version_of(checkpoint)
    lineage: dict[str, Any] = {"mlflow_run_id": parent_run_id}
    if registered is not None:
        lineage = {"model_uri": registered.uri, "mlflow_run_id": registered.run_id}
    with (
        signals.handle_sigterm(),
        tracking.stage_run(cfg, "tokenize_catalogue", parent_run_id) as run,
    ):
        _warn_in_process(cfg, remote)
        outcome = tokenize_catalogue(
            cfg,
            checkpoint,
            mode=mode,  # type: ignore[arg-type]
            extra_codebook_fields=lineage,
            batch_size=cfg.inference.batch_rows,
            remote=remote,
        )
        run.log_params({"mode": mode, "checkpoint": checkpoint, **lineage})
        run.log_params(inference_params(cfg))
        run.log_metrics({f"items_{k}": float(v) for k, v in outcome.counts.items()})
        run.log_metrics({"items_per_s": outcome.items_per_s, "seconds": outcome.seconds})
        if getattr(remote, "reports", None):
            run.log_metrics(shard_metrics(remote.reports))
        run.log_text(outcome.summary_markdown(mode, lineage.get("model_uri")), "summary.md")
        if outcome.version is not None:
            run.log_metrics({"semantic_id_version": float(outcome.version)})
            with tempfile.TemporaryDirectory() as tmp:
                export = Path(tmp) / f"semantic_ids_v{outcome.version}.parquet"
                pq.write_table(storage.current_ids(cfg.duckdb_path), export)
                run.log_artifact(str(export))
        return StageOutcome(run.run_id, outcome)


#: The evaluation metrics logged as MLflow metrics (one chart each); all of them go to
#: the results table the flow logs (:func:`flows.reporting.evaluation_table`).
_HEADLINE = ("recall_at_10", "ndcg_at_10", "mrr", "invalid_id_rate")


@dataclass(frozen=True)
class EvaluationOutcome:
    """The evaluation stage's Markdown report, its plot, and every system's metrics."""

    report_path: str
    plot_path: str
    results: list[SystemResult]


def inference_params(cfg: StoreConfig) -> dict[str, Any]:
    """Where a batch-inference stage ran, as MLflow params (``inference.*``)."""
    inference = cfg.inference
    engine = "dask-address" if inference.address else "dask-local" if inference.workers else ""
    params = {
        "inference.engine": engine or "inprocess",
        "inference.workers": inference.workers,
        "inference.address": inference.address,
        "inference.shards": inference.shards if engine else None,
    }
    return {key: value for key, value in params.items() if value is not None}


def _warn_in_process(cfg: StoreConfig, remote: Any) -> None:
    if cfg.inference.scaled_out and remote is None:
        logger.warning(
            "inference.workers / inference.address apply to the Prefect flows (store run, "
            "store tokenize-catalogue, store evaluate, the deployments); this library call "
            "runs in-process"
        )


def shard_metrics(reports: list[Any]) -> dict[str, float]:
    """MLflow metrics of a scaled-out stage's :class:`store_core.sharding.ShardReport` s:
    shards, workers used, rows generated, largest worker peak RSS (MiB)."""
    from store_core.sharding import summary

    return {f"shard_{key}": float(value) for key, value in summary(reports).items()}


def evaluate_stage(
    cfg: StoreConfig, parent_run_id: str | None = None, search: Any = None
) -> StageOutcome[EvaluationOutcome]:
    """Every configured system on the test split: metrics to MLflow (``<system>/<metric>``,
    mean over seeds), rows to DuckDB ``eval_results``, a Markdown report and a plot.
    ``search``: a :data:`store_core.evaluation.BeamSearch` decoding the users elsewhere
    (user shards on a cluster); None: in this process."""
    import time
    from pathlib import Path

    from store_core import storage
    from store_core.evaluation import (
        aggregate,
        eval_rows,
        markdown_report,
        plot_metric_vs_k,
        run_systems,
    )

    with signals.handle_sigterm(), tracking.stage_run(cfg, "evaluate", parent_run_id) as run:
        _warn_in_process(cfg, search)
        run.log_params({"systems": ",".join(cfg.evaluation.systems)})
        run.log_params(inference_params(cfg))
        results = run_systems(cfg, search=search)
        if getattr(search, "reports", None):
            run.log_metrics(shard_metrics(search.reports))
        for system, metrics in aggregate(results).items():  # the rest: flows' table
            run.log_metrics(
                {f"{system}/{k}": mean for k, (mean, _, _) in metrics.items() if k in _HEADLINE}
            )
        stamp = time.strftime("%Y%m%d-%H%M%S")
        reports = Path(cfg.workspace) / "reports"
        reports.mkdir(parents=True, exist_ok=True)
        dataset = Path(cfg.data.path or cfg.data.dataset or "dataset").name
        report = reports / f"eval-{stamp}.md"
        plot = reports / f"eval-{stamp}.png"
        plot_metric_vs_k(results, str(plot))
        report.write_text(
            markdown_report(
                results,
                f"Evaluation on {dataset} (test split, full ranking)",
                [f"plot: {plot.name}", f"MLflow run: {run.run_id}"],
            )
        )
        run_id = run.run_id or f"local-{stamp}"
        storage.write_eval_results(cfg.duckdb_path, eval_rows(results, run_id, dataset))
        run.log_artifact(str(report))
        run.log_artifact(str(plot))
        return StageOutcome(run.run_id, EvaluationOutcome(str(report), str(plot), results))
