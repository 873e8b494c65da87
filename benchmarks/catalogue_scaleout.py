"""Catalogue tokenization scaled out on Dask: items/s in-process vs 1 vs N workers.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.catalogue_scaleout \\
        --items 200000 --workers 1 2

A trained ``tiny`` workspace is built in a temporary directory (ingest + both training
phases, as :mod:`benchmarks.catalogue_tokenization` does), then a synthetic catalogue of
``--items`` items (:func:`benchmarks.catalogue_tokenization.synthetic_items`: every text
differs) is written as ``items.parquet`` and tokenized in ``regenerate`` mode (every item
generated) once per engine, each in a fresh subprocess with a fresh DuckDB file:

* ``inprocess``: :func:`store_core.catalogue.tokenize_catalogue` as ``store
  tokenize-catalogue`` runs it;
* ``workers=N``: the same call with the shards run as Prefect tasks on a local Dask
  cluster of N single-thread worker processes (:mod:`flows.scaleout`,
  ``inference.workers: N``, ``--shards-per-worker`` shards per worker).

As in :mod:`benchmarks.catalogue_tokenization`, the checkpoint's disambiguation level is
widened in the central process to ``2**pack_bits`` codes (the tiny codebook holds only a
few thousand IDs; generation never emits disambiguation tokens, so the workers need no
widening).

Reported per engine: ``seconds`` (the whole call: checkpoint load, plan, shards, assignment,
commit), ``items_per_s`` (items / seconds), ``shard_phase_s`` (cutting, cluster start,
the shards, gathering), ``worker_items_per_s`` (items / the busiest worker's summed shard
time: the rate without cluster start-up), ``commit_s`` (the central DuckDB transaction,
``storage.write_semantic_id_version``), ``central_s`` (seconds - shard phase - commit: plan,
assignment of the disambiguation codes, staging), ``peak_rss_mib`` of the central process
and ``worker_peak_rss_mib`` (largest ``ru_maxrss`` among the workers); ``worker_busy_s`` and
``worker_items`` per worker pid show how Dask spread the shards. Writes
benchmarks/results/catalogue_scaleout.json (``--output``).

Cost per million items per worker (the README's formula): with N workers,
``r = worker_items_per_s(N) / N`` items/s per worker, a million items take
``1e6 / r / 3600`` worker-hours; times the price of one worker-hour (one core and its
``worker_peak_rss_mib`` of memory) that is the cost per million items.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from benchmarks.catalogue_tokenization import (
    BASE_OVERRIDES,
    build_workspace,
    synthetic_items,
    widen_disambiguation,
)
from benchmarks.machine import machine_info, write_results

REPO = Path(__file__).resolve().parents[1]


def _status_mib(field: str) -> float:
    """``VmHWM`` / ``VmRSS`` of this process from /proc/self/status, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _child(spec_path: str) -> None:
    """One measured run in its own process; writes the result JSON."""
    spec = json.loads(Path(spec_path).read_text())
    from store_core import catalogue, storage
    from store_core.checkpoint import read_recommender_metadata
    from store_core.config import load_config

    cfg = load_config(spec["config"], spec["overrides"])
    checkpoint: str = spec["checkpoint"]
    metadata = read_recommender_metadata(checkpoint)
    extra = widen_disambiguation(metadata)
    timing: dict[str, float] = {}
    write = storage.write_semantic_id_version

    def write_timed(*args: Any, **kwargs: Any) -> int:
        started = time.perf_counter()
        version = write(*args, **kwargs)
        timing["commit_s"] = time.perf_counter() - started
        return version

    storage.write_semantic_id_version = write_timed
    from prefect import flow

    from flows.scaleout import prefect_runner
    from store_core.sharding import ShardedBeams

    runs: dict[str, Any] = {}

    @flow(name="benchmark-catalogue-scaleout")
    def measured() -> None:
        # inside a flow run, as the pipeline's tokenize-catalogue subflow runs the stage:
        # local workers report to this run's Prefect API instead of starting their own
        remote = None
        if cfg.inference.scaled_out:
            remote = ShardedBeams(prefect_runner(cfg), cfg, checkpoint, cfg.inference.shards)
        started = time.perf_counter()
        runs["outcome"] = catalogue.tokenize_catalogue(
            cfg,
            checkpoint,
            mode="regenerate",
            batch_size=cfg.inference.batch_rows,
            extra_codebook_fields=extra,
            remote=remote,
        )
        runs["seconds"] = time.perf_counter() - started
        runs["remote"] = remote

    measured()
    outcome, seconds, remote = runs["outcome"], runs["seconds"], runs["remote"]
    result: dict[str, Any] = {
        "items": outcome.counts["generated"],
        "seconds": seconds,
        "items_per_s": outcome.counts["generated"] / seconds,
        "commit_s": timing.get("commit_s"),
        "peak_rss_mib": _status_mib("VmHWM"),
    }
    if remote is not None:
        busy: dict[int, float] = {}
        rss: dict[int, float] = {}
        rows: dict[int, int] = {}
        for report in remote.reports:
            busy[report.pid] = busy.get(report.pid, 0.0) + report.seconds
            rows[report.pid] = rows.get(report.pid, 0) + report.generated
            rss[report.pid] = max(rss.get(report.pid, 0.0), report.peak_rss_mb)
        result.update(
            shards=len(remote.reports),
            workers_used=len(busy),
            shard_phase_s=remote.seconds,
            worker_busy_s={str(pid): s for pid, s in busy.items()},
            worker_items={str(pid): n for pid, n in rows.items()},
            worker_items_per_s=outcome.counts["generated"] / max(busy.values()),
            worker_peak_rss_mib=max(rss.values()),
            central_s=seconds - remote.seconds - timing.get("commit_s", 0.0),
        )
    else:
        result["central_s"] = seconds - timing.get("commit_s", 0.0)
    Path(spec["result"]).write_text(json.dumps(result))


def run_engine(
    name: str, extra: list[str], args: argparse.Namespace, trained: Path, scratch: Path
) -> dict[str, Any]:
    """Tokenize the synthetic catalogue with one engine in a fresh subprocess."""
    from store_core.config import load_config
    from store_core.data_files import ITEMS_FILE
    from store_core.recommender_training import recommender_dir

    workspace = scratch / name
    shutil.rmtree(workspace, ignore_errors=True)
    overrides = [
        f"workspace={workspace}",
        *BASE_OVERRIDES,
        f"inference.batch_rows={args.batch_size}",
        *extra,
    ]
    cfg = load_config("tiny", overrides)
    shutil.copytree(trained / "data", cfg.data_dir)
    shutil.copy(scratch / ITEMS_FILE, Path(cfg.data_dir) / ITEMS_FILE)
    trained_cfg = load_config("tiny", [f"workspace={trained}", *BASE_OVERRIDES])
    spec = {
        "config": "tiny",
        "overrides": overrides,
        "checkpoint": recommender_dir(trained_cfg),
        "result": str(workspace / "result.json"),
    }
    spec_path = workspace / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PREFECT_HOME": str(scratch / "prefect-home"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    log = workspace / "run.log"
    with log.open("wb") as out:
        code = subprocess.call(
            [sys.executable, "-m", "benchmarks.catalogue_scaleout", "--child", str(spec_path)],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    if code != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{name} failed (exit {code}); end of its log:\n{tail}")
    result: dict[str, Any] = json.loads((workspace / "result.json").read_text())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=200_000, help="synthetic catalogue size")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shards-per-worker", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=256, help="inference.batch_rows")
    parser.add_argument("--no-inprocess", action="store_true", help="skip the in-process run")
    parser.add_argument("--output", default="catalogue_scaleout.json")
    parser.add_argument(
        "--trained", help="an already trained tiny workspace to use (default: train one)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child)
        return
    from store_core.config import load_config
    from store_core.data_files import ITEMS_FILE, read_items

    scratch = Path(tempfile.mkdtemp(prefix="store-scaleout-"))
    try:
        trained = Path(args.trained) if args.trained else scratch / "trained"
        build_s = 0.0 if args.trained else build_workspace("tiny", trained, [])
        cfg = load_config("tiny", [f"workspace={trained}", *BASE_OVERRIDES])
        source = read_items(cfg.data_dir)
        items = synthetic_items(source, args.items, cfg.data.text_template, cfg.data.max_text_chars)
        pq.write_table(items, scratch / ITEMS_FILE, compression="zstd", row_group_size=1 << 20)
        engines: list[tuple[str, list[str]]] = [] if args.no_inprocess else [("inprocess", [])]
        for n in args.workers:
            shards = n * args.shards_per_worker
            engines.append(
                (f"workers={n}", [f"inference.workers={n}", f"inference.shards={shards}"])
            )
        results: dict[str, Any] = {}
        for name, extra in engines:
            results[name] = run_engine(name, extra, args, trained, scratch)
            print(name, json.dumps(results[name]), flush=True)
        report = {
            "machine": machine_info(),
            "items": args.items,
            "batch_rows": args.batch_size,
            "shards_per_worker": args.shards_per_worker,
            "build_workspace_s": build_s,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "engines": results,
        }
        one = results.get("workers=1", {}).get("worker_items_per_s")
        for result in results.values():
            rate = result.get("worker_items_per_s")
            if one and rate:
                result["speedup_vs_1_worker"] = rate / one
        write_results(report, args.output)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
