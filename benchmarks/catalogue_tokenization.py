"""Catalogue tokenization: items/s and peak memory of ``tokenize_catalogue(mode="regenerate")``
as the catalogue grows (it streams ``items.parquet`` in record batches, so memory should
stay flat).

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.catalogue_tokenization \\
        --sizes 2000 8000 32000

First a trained workspace: by default the ``tiny`` config is ingested and both training
phases run in a temporary directory (about 15 s); ``--workspace`` (with ``--config``) uses
an existing trained one instead. Then, for each size, a synthetic ``items.parquet``
(``ITEMS_SCHEMA``, written like ``store ingest`` writes it: zstd, one row group up to 1Mi
rows; ``--row-group-size`` to change that) goes into a copy of the workspace's data dir
with a fresh DuckDB file: item ``i``'s fields are taken from different catalogue items
(one source item per field, with different strides) and its title gets `` #i``, so every
text differs; text and ``content_hash`` are rendered with the config's template, as ingest
does. ``tokenize_catalogue`` runs on it in a fresh subprocess per size, which reports its
own memory from ``/proc/self/status`` (``VmHWM``; not ``ru_maxrss``, which on Linux keeps
the forked parent's high-water mark across exec): ``peak_rss_mib`` is the child's whole
peak, imports included; ``rss_at_start_mib`` its RSS after the imports (torch and the
rest; the run itself loads the checkpoint). The peak is then reset
(``/proc/self/clear_refs``), so ``run_peak_rss_mib`` is the peak of the
``tokenize_catalogue`` call alone and ``growth_mib`` = run peak - RSS at start. The
growth is split at the commit (``storage.write_semantic_id_version`` is wrapped to read
and reset the peak): ``streaming_growth_mib`` (checkpoint load, generation, the Parquet
spool: what streaming should keep flat) and ``commit_growth_mib`` (the DuckDB
transaction: validation, ``ORDER BY packed``, the indexes; over the RSS the commit
started from).

The disambiguation level of the loaded checkpoint is widened (``--widen``, on by
default) to ``2**pack_bits`` codes in the child, and the codebook row gets the matching
``level_sizes``: the tiny codebook (K=8, L=3, 4 + 4 spare disambiguation codes) can hold
at most 4,096 IDs, and the tiny model puts most synthetic texts on a handful of prefixes,
so unwidened the run stops with "every generated prefix has used all 8 disambiguation
codes" after under a hundred items. Widening changes only how many items a prefix may
take: generation (which never emits disambiguation tokens), streaming, the Parquet
spool and the DuckDB write are the library's, unchanged. ``--no-widen`` runs the
checkpoint as it is.

Prints the machine and config, then per size: items, seconds (``CatalogueOutcome``:
checkpoint load, generation, DuckDB commit), items/s and peak RSS; writes
benchmarks/results/catalogue_tokenization.json (``--output``). ``--repeats`` > 1 keeps
the best time and the largest peak of each size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.machine import machine_info, write_results

if TYPE_CHECKING:
    from store_core.checkpoint import RecommenderMetadata

REPO = Path(__file__).resolve().parents[1]
BASE_OVERRIDES = ("tracking.enabled=false",)


def _status_mib(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process from /proc/self/status, in MiB.

    Not ``ru_maxrss``: Linux carries the high-water mark of the pre-exec memory (the
    forked copy of the parent) into the child's ``ru_maxrss`` across exec, so a child's
    ``ru_maxrss`` is at least the parent's RSS; ``VmHWM`` belongs to the child's own
    address space. Falls back to ``ru_maxrss`` where /proc is absent.
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def build_workspace(config: str, workspace: Path, overrides: list[str]) -> float:
    """Ingest and train both phases into ``workspace``; returns the seconds it took."""
    from store_core.config import load_config
    from store_core.ingest import run_ingest
    from store_core.item_tokenizer import train_semantic_tokenizer
    from store_core.recommender_training import train_recommender

    started = time.perf_counter()
    cfg = load_config(config, [f"workspace={workspace}", *BASE_OVERRIDES, *overrides])
    run_ingest(cfg)
    if train_semantic_tokenizer(cfg) is None or train_recommender(cfg) is None:
        raise RuntimeError("training returned no outcome (not rank 0?)")
    return time.perf_counter() - started


def synthetic_items(
    source: pa.Table, num_items: int, template: str | None, max_chars: int
) -> pa.Table:
    """``num_items`` distinct items recombined from ``source``'s fields (ITEMS_SCHEMA)."""
    from store_core.schemas import ITEMS_SCHEMA
    from store_core.textrender import content_hash, render_text

    records = [dict(pairs) for pairs in source.column("fields").to_pylist()]
    m = len(records)
    keys = list(records[0])
    strides = {key: 1 + 2 * k for k, key in enumerate(keys)}  # 1, 3, 5, ...: mixes fields
    title_key = "title" if "title" in keys else keys[0]
    columns: dict[str, list[Any]] = {name: [] for name in ITEMS_SCHEMA.names}
    for i in range(num_items):
        fields: dict[str, str] = {}
        for k, key in enumerate(keys):
            fields[key] = records[(i * strides[key] + k + i // m) % m].get(key, "")
        fields[title_key] = f"{fields[title_key]} #{i}"
        text = render_text(fields, template, max_chars)
        columns["item_id"].append(f"syn{i:07d}")
        columns["title"].append(fields.get("title") or None)
        columns["fields"].append(list(fields.items()))
        columns["text"].append(text)
        columns["content_hash"].append(content_hash(fields, text))
    return pa.Table.from_pydict(columns, schema=ITEMS_SCHEMA)


# --------------------------------------------------------------------------- child


def widen_disambiguation(metadata: RecommenderMetadata) -> dict[str, Any]:
    """Make every later :func:`store_core.catalogue.load_bundle` in this process report a
    disambiguation level of ``2**pack_bits`` codes (the tiny codebook holds only a few
    thousand IDs) and return the ``extra`` semantic-ID version metadata recording the
    widened sizes. Only ``len()`` of the last level matters to tokenize_catalogue (the
    capacity of a prefix); generation never emits disambiguation tokens."""
    from store_core import catalogue
    from store_core.bundle import RecommenderBundle

    wide = 1 << metadata.pack_bits
    load = catalogue.load_bundle

    def load_widened(directory: str, device: Any = None) -> RecommenderBundle:
        bundle = load(directory, device)
        last = list(bundle.level_ids[-1])
        bundle.level_ids = [*bundle.level_ids[:-1], last + [last[-1]] * (wide - len(last))]
        return bundle

    catalogue.load_bundle = load_widened
    return {"level_sizes": [*metadata.level_sizes[:-1], wide]}


def _child(spec_path: str) -> None:
    """One measured run (in its own process): tokenize the catalogue, report to JSON."""
    spec = json.loads(Path(spec_path).read_text())
    import torch

    from store_core import catalogue, storage
    from store_core.checkpoint import read_recommender_metadata
    from store_core.config import load_config

    if spec["threads"] is not None:
        torch.set_num_threads(int(spec["threads"]))
    cfg = load_config(spec["config"], spec["overrides"])
    checkpoint: str = spec["checkpoint"]
    metadata = read_recommender_metadata(checkpoint)
    bits = metadata.pack_bits
    extra: dict[str, Any] | None = None
    if spec["widen"]:
        extra = widen_disambiguation(metadata)
    # Split the run's peak at the commit: streaming (checkpoint load, generation, the
    # Parquet spool) before it, the DuckDB transaction (validation, ORDER BY, indexes) in it.
    phases: dict[str, float] = {}
    write = storage.write_semantic_id_version

    def write_measured(*args: Any, **kwargs: Any) -> int:
        phases["streaming_peak_mib"] = _status_mib("VmHWM")
        phases["rss_before_commit_mib"] = _status_mib("VmRSS")
        _reset_peak()
        version = write(*args, **kwargs)
        phases["commit_peak_mib"] = _status_mib("VmHWM")
        return version

    storage.write_semantic_id_version = write_measured
    import_peak = _status_mib("VmHWM")
    rss_before = _status_mib("VmRSS")
    reset = _reset_peak()
    started = time.perf_counter()
    outcome = catalogue.tokenize_catalogue(
        cfg,
        checkpoint,
        mode="regenerate",
        batch_size=spec["batch_size"],
        extra_codebook_fields=extra,
    )
    wall = time.perf_counter() - started
    run_peak = max(_status_mib("VmHWM"), phases.get("streaming_peak_mib", 0.0))
    with storage.connect_read_only_with_retry(cfg.duckdb_path) as con:
        row = con.execute(
            f"""
            SELECT count(*), count(DISTINCT packed >> {bits}), max(codes[len(codes)])
            FROM current_semantic_ids
            """
        ).fetchall()[0]
    result = {
        "version": outcome.version,
        "counts": outcome.counts,
        "seconds": outcome.seconds,
        "items_per_s": outcome.items_per_s,
        "wall_s": wall,
        "rss_before_mib": rss_before,
        "import_peak_mib": import_peak,
        "peak_rss_mib": max(run_peak, import_peak) if reset else run_peak,
        "run_peak_rss_mib": run_peak if reset else None,
        **(phases if reset else {}),
        "active_ids": int(row[0]),
        "distinct_cluster_prefixes": int(row[1]),
        "max_disambiguation_code": int(row[2]),
        "torch_threads": torch.get_num_threads(),
    }
    Path(spec["result"]).write_text(json.dumps(result))


# --------------------------------------------------------------------------- parent


def run_size(
    num_items: int,
    args: argparse.Namespace,
    trained: Path,
    checkpoint: str,
    source: pa.Table,
    scratch: Path,
) -> dict[str, Any]:
    from store_core.config import load_config
    from store_core.data_files import ITEMS_FILE

    workspace = scratch / f"size-{num_items}"
    overrides = [f"workspace={workspace}", *BASE_OVERRIDES, *args.overrides]
    cfg = load_config(args.config, overrides)
    runs: list[dict[str, Any]] = []
    parquet_bytes = 0
    for _ in range(args.repeats):
        shutil.rmtree(workspace, ignore_errors=True)
        shutil.copytree(trained / "data", cfg.data_dir)
        items = synthetic_items(source, num_items, cfg.data.text_template, cfg.data.max_text_chars)
        items_path = Path(cfg.data_dir) / ITEMS_FILE
        pq.write_table(items, items_path, compression="zstd", row_group_size=args.row_group_size)
        parquet_bytes = items_path.stat().st_size
        del items
        spec = {
            "config": args.config,
            "overrides": overrides,
            "checkpoint": checkpoint,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "widen": args.widen,
            "result": str(workspace / "result.json"),
        }
        spec_path = workspace / "spec.json"
        spec_path.write_text(json.dumps(spec))
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "benchmarks.catalogue_tokenization", "--child", str(spec_path)],
            cwd=REPO,
            check=True,
        )
        child_wall = time.perf_counter() - started
        run = json.loads((workspace / "result.json").read_text())
        run["process_wall_s"] = child_wall
        runs.append(run)
        print(
            f"  {num_items} items: {run['seconds']:.2f} s, {run['items_per_s']:.0f} items/s, "
            f"peak RSS {run['peak_rss_mib']:.0f} MiB (at start {run['rss_before_mib']:.0f}, "
            f"import peak {run['import_peak_mib']:.0f})",
            flush=True,
        )
    if not args.keep:
        shutil.rmtree(workspace, ignore_errors=True)
    best = min(runs, key=lambda r: r["seconds"])
    peak = max(r["peak_rss_mib"] for r in runs)
    before = max(r["rss_before_mib"] for r in runs)

    def largest(key: str, minus: str) -> float | None:
        values = [r[key] - r[minus] for r in runs if r.get(key) is not None]
        return round(max(values), 1) if values else None

    run_peaks = [r["run_peak_rss_mib"] for r in runs if r["run_peak_rss_mib"] is not None]
    return {
        "items": num_items,
        "seconds": round(best["seconds"], 3),
        "items_per_s": round(num_items / best["seconds"], 1),
        "peak_rss_mib": round(peak, 1),
        "run_peak_rss_mib": round(max(run_peaks), 1) if run_peaks else None,
        "rss_at_start_mib": round(before, 1),
        "growth_mib": largest("run_peak_rss_mib", "rss_before_mib"),
        "streaming_growth_mib": largest("streaming_peak_mib", "rss_before_mib"),
        "commit_growth_mib": largest("commit_peak_mib", "rss_before_commit_mib"),
        "items_parquet_bytes": parquet_bytes,
        "counts": best["counts"],
        "active_ids": best["active_ids"],
        "distinct_cluster_prefixes": best["distinct_cluster_prefixes"],
        "max_disambiguation_code": best["max_disambiguation_code"],
        "runs": [
            {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in runs
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 32000])
    parser.add_argument("--config", default="tiny", help="config name or path (default tiny)")
    parser.add_argument(
        "--workspace", default=None, help="an existing trained workspace (default: train one)"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--batch-size", type=int, default=256, help="record batch (items)")
    parser.add_argument(
        "--row-group-size",
        type=int,
        default=None,
        help="rows per row group of the synthetic items.parquet (default: one row group up "
        "to 1Mi rows, as ingest writes it)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per size; the best counts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the child")
    parser.add_argument(
        "--widen",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="widen the disambiguation level to 2**pack_bits codes (see above)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch workspaces")
    parser.add_argument("--output", default="catalogue_tokenization.json", help="file in results/")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        _child(args.child)
        return

    import torch

    from store_core.checkpoint import has_metadata, read_recommender_metadata
    from store_core.config import load_config
    from store_core.data_files import read_items
    from store_core.recommender_training import recommender_dir

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    scratch = Path(tempfile.mkdtemp(prefix="store-bench-catalogue-"))
    try:
        build_s = None
        if args.workspace is None:
            trained = scratch / "trained"
            print(f"training a {args.config} workspace in {trained} ...", flush=True)
            build_s = build_workspace(args.config, trained, args.overrides)
        else:
            trained = Path(args.workspace).resolve()
        cfg = load_config(args.config, [f"workspace={trained}", *BASE_OVERRIDES, *args.overrides])
        checkpoint = recommender_dir(cfg)
        if not has_metadata(checkpoint):
            raise SystemExit(f"{checkpoint}: not a trained recommender (run `store train`)")
        metadata = read_recommender_metadata(checkpoint)
        source = read_items(cfg.data_dir, ["fields"])
        report: dict[str, Any] = {
            "machine": machine_info(),
            "config": {
                "config": args.config,
                "overrides": args.overrides,
                "workspace": str(args.workspace) if args.workspace else "trained (temporary)",
                "build_workspace_s": None if build_s is None else round(build_s, 1),
                "checkpoint": Path(checkpoint).name,
                "source_items": source.num_rows,
                "level_sizes": metadata.level_sizes,
                "pack_bits": metadata.pack_bits,
                "widen_disambiguation_to": (1 << metadata.pack_bits) if args.widen else None,
                "mode": "regenerate",
                "record_batch_size": args.batch_size,
                "items_row_group_size": args.row_group_size,
                "generation_batch_size": cfg.recommender.eval_batch_size,
                "sizes": args.sizes,
                "repeats": args.repeats,
                "child_torch_threads": args.threads,
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                "model": {
                    "hidden": cfg.model.hidden_size,
                    "layers": cfg.model.num_layers,
                    "vocab": cfg.model.vocab_size,
                },
            },
        }
        print(json.dumps(report, indent=2), flush=True)
        rows = []
        for size in args.sizes:
            rows.append(run_size(size, args, trained, checkpoint, source, scratch))
        report["sizes"] = rows
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            print(f"scratch kept in {scratch}")

    print(
        f"\n{'items':>8} {'seconds':>8} {'items/s':>8} {'peak RSS MiB':>13} "
        f"{'growth':>7} {'streaming':>10} {'commit':>7}"
    )
    nan = float("nan")
    for row in rows:
        print(
            f"{row['items']:>8} {row['seconds']:>8.2f} {row['items_per_s']:>8.0f} "
            f"{row['peak_rss_mib']:>13.0f} {row['growth_mib'] or nan:>7.0f} "
            f"{row['streaming_growth_mib'] or nan:>10.0f} {row['commit_growth_mib'] or nan:>7.0f}"
        )
    first, last = rows[0], rows[-1]
    report["summary"] = {
        "items_ratio": round(last["items"] / first["items"], 2),
        "peak_rss_ratio": round(last["peak_rss_mib"] / first["peak_rss_mib"], 3),
        "growth_delta_mib": (
            round(last["growth_mib"] - first["growth_mib"], 1)
            if last["growth_mib"] is not None and first["growth_mib"] is not None
            else None
        ),
    }
    print(
        f"{report['summary']['items_ratio']}x the items: peak RSS x"
        f"{report['summary']['peak_rss_ratio']}, growth during the run "
        f"{first['growth_mib']} -> {last['growth_mib']} MiB"
    )
    write_results(report, args.output)


if __name__ == "__main__":
    main()
