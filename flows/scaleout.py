"""The batch-inference stages on a Dask cluster, through Prefect's Dask task runner.

With ``inference.workers`` or ``inference.address`` set (:class:`store_core.config.
InferenceConfig`), tokenize-catalogue and evaluate cut their beam search into shards
(:mod:`store_core.sharding`) and run each shard as a Prefect task on Dask: a subflow
(``catalogue-shards`` / ``users-shards``) whose task runner is
:class:`prefect_dask.DaskTaskRunner`, either on a local cluster of ``workers``
single-thread worker processes started for the subflow, or on the running cluster at
``address``. Each shard is one task run in the Prefect UI (``catalogue-shard-3``), with
``inference.retries`` retries; a shard that still fails fails the stage with the shard
named (:class:`store_core.errors.StoreError`), before anything reaches DuckDB. A worker
that dies mid-shard is Dask's to handle: the scheduler runs the shard again on another
worker (up to ``distributed.scheduler.allowed-failures`` times, then ``KilledWorker``,
which fails the stage like any other shard failure).

Without either field nothing here runs and the stages stay in-process as before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from store_core.telemetry import disable_telemetry

disable_telemetry()

from prefect import Task, flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from store_core.config import StoreConfig  # noqa: E402
from store_core.errors import StoreError  # noqa: E402
from store_core.sharding import (  # noqa: E402
    ShardedBeams,
    ShardedSearch,
    ShardReport,
    ShardRunner,
    run_catalogue_shard,
    run_users_shard,
    summary,
)

if TYPE_CHECKING:
    from prefect_dask import DaskTaskRunner

logger = logging.getLogger(__name__)

S = TypeVar("S")
R = TypeVar("R")

#: What the shard tasks and subflows are called, per shard function.
_KINDS = {run_catalogue_shard.__name__: "catalogue", run_users_shard.__name__: "users"}


def task_runner(cfg: StoreConfig) -> DaskTaskRunner | None:
    """The Dask task runner ``cfg.inference`` asks for, or None (in-process). prefect-dask
    (and Dask) are imported only here, so in-process runs never load them."""
    inference = cfg.inference
    if not inference.scaled_out:
        return None
    from prefect_dask import DaskTaskRunner

    if inference.address is not None:
        return DaskTaskRunner(address=inference.address)
    cluster: dict[str, Any] = {
        "n_workers": inference.workers,
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": None,
        # import torch and the shard code while the worker starts, not in its first shard:
        # a worker still importing would leave the shards to the one that is ready
        "preload": ["store_core.sharding"],
    }
    api_url = _api_url()
    if api_url is not None:  # the local workers report to this run's Prefect API
        cluster["env"] = {"PREFECT_API_URL": api_url}
    return DaskTaskRunner(cluster_kwargs=cluster)


def _api_url() -> str | None:
    """The Prefect API the current flow run talks to (also the temporary server of a run
    without PREFECT_API_URL), so local workers need not start a server each; None
    outside a flow run."""
    from prefect.context import FlowRunContext

    client = getattr(FlowRunContext.get(), "client", None)
    url = getattr(client, "api_url", None)
    return str(url) if url else None


def prefect_runner(cfg: StoreConfig) -> ShardRunner[Any, Any]:
    """A :data:`store_core.sharding.ShardRunner` that runs the shards as Prefect tasks of a
    subflow on the configured Dask cluster, with ``inference.retries`` retries each.
    Raises StoreError naming the first shard that failed for good."""
    inference = cfg.inference

    def run(fn: Callable[[S], R], shards: Sequence[S]) -> list[R]:
        kind = _KINDS.get(fn.__name__, fn.__name__)
        shard_task: Task[[S], R] = task(
            name=f"{kind}-shard",
            retries=inference.retries,
            retry_delay_seconds=inference.retry_delay_s,
            cache_policy=NO_CACHE,
        )(fn)
        runner = task_runner(cfg)
        assert runner is not None, "prefect_runner needs inference.workers or address"

        @flow(name=f"{kind}-shards", task_runner=cast(Any, runner), validate_parameters=False)
        def shards_flow() -> list[R]:
            started = time.perf_counter()
            futures = [
                shard_task.with_options(task_run_name=f"{kind}-shard-{index}").submit(shard)
                for index, shard in enumerate(shards)
            ]
            results: list[R] = []
            for index, (shard, future) in enumerate(zip(shards, futures, strict=True)):
                try:
                    results.append(future.result())
                except BaseException as exc:
                    for rest in futures[index + 1 :]:
                        _cancel(rest)
                    describe = getattr(shard, "describe", None)
                    name = describe() if describe is not None else f"{kind} shard {index}"
                    raise StoreError(
                        f"{name} failed after {inference.retries + 1} attempt(s): "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
            _log_reports(kind, results, time.perf_counter() - started)
            return results

        return shards_flow()

    return run


def _log_reports(kind: str, results: Sequence[Any], seconds: float) -> None:
    """Each shard's report and the overall rate, in the subflow's log (Prefect UI)."""
    log = get_run_logger()
    reports = [r[1] if isinstance(r, tuple) else r for r in results]
    reports = [r for r in reports if isinstance(r, ShardReport)]
    for report in reports:
        log.info("%s", report.describe())
    rows = sum(r.generated for r in reports)
    totals = summary(reports)
    log.info(
        "%d %s shards on %d workers: %d rows in %.1f s, %.0f %s/s overall, "
        "largest worker peak RSS %.0f MiB",
        totals["shards"],
        kind,
        totals["workers"],
        rows,
        seconds,
        rows / max(seconds, 1e-9),
        "items" if kind == "catalogue" else "users",
        totals["worker_peak_rss_mb"],
    )


def _cancel(future: Any) -> None:
    """Stop a shard that is no longer needed (best effort: Dask futures can cancel)."""
    wrapped = getattr(future, "wrapped_future", None)
    cancel = getattr(wrapped, "cancel", None)
    if cancel is not None:
        cancel()


def remote_beams(cfg: StoreConfig) -> ShardedBeams | None:
    """The catalogue's :class:`store_core.catalogue.RemoteBeams` on the configured cluster,
    or None when the stage runs in-process."""
    if not cfg.inference.scaled_out:
        return None
    from store_core.recommender_training import recommender_dir

    return ShardedBeams(prefect_runner(cfg), cfg, recommender_dir(cfg), cfg.inference.shards)


def remote_search(cfg: StoreConfig) -> ShardedSearch | None:
    """Evaluation's :data:`store_core.evaluation.BeamSearch` on the configured cluster, or
    None when the stage runs in-process."""
    if not cfg.inference.scaled_out:
        return None
    return ShardedSearch(prefect_runner(cfg), cfg.inference.shards)
