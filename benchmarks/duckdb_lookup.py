"""DuckDB lookup latency on a catalogue of 1M synthetic semantic IDs: full-ID and prefix
lookups through the packed column and the stored macros, against a ``LIKE`` baseline.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.duckdb_lookup --items 1000000

Builds ``--items`` random unique IDs of L=3 levels x K=256 plus a disambiguation level
(uniform cluster codes; items sharing their three codes get 0, 1, ... so the last level
has as many codes as the largest collision group), packed with
``item_tokenizer.pack_bits(4)`` (15) bits per level, spools them to Parquet and writes them
with ``storage.write_semantic_id_version`` (plus a ``codebooks`` row) into a DuckDB file in
a temporary directory; ``--versions`` > 1 writes the same rows again as newer versions
(a database after some nightly runs). That write is timed, and its peak RSS
(``VmHWM``, reset just before) recorded next to the RSS it started from.

Then, on one read-only connection, ``--lookups`` random items (default 200), each query
warmed up first and the kinds interleaved per item (other jobs on the machine then slow
every kind alike), median and p95 in ms of:

* full ID: ``packed = ?`` on ``current_semantic_ids``; ``sid_of(item)``; ``item_of(sid)``;
  and ``sid_of`` through ``storage.query`` (opening the file per query, as the
  ``store query`` CLI and short-lived readers do);
* prefix of n = 1, 2, 3 codes of the item's ID: ``packed BETWEEN lo AND hi`` with
  ``semantic_ids.prefix_range``; the macros ``items_with_codes([..])``,
  ``neighbours(item, n)`` and ``items_with_prefix('<a_..>...')``; and the naive
  baseline ``sid LIKE prefix || '%'``, reported as its ratio to ``BETWEEN``.

Every prefix query must return the same rows as ``BETWEEN`` (``neighbours`` one fewer:
the item itself); mismatches are counted and reported. Prints the machine and config and
a table; writes benchmarks/results/duckdb_lookup.json (``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.catalogue_tokenization import _reset_peak, _status_mib
from benchmarks.machine import machine_info, write_results
from store_core import storage
from store_core.item_tokenizer import pack_bits
from store_core.semantic_ids import format_sid, pack_codes, prefix_range

LEVELS, CODEBOOK = 3, 256
PREFIXES = (1, 2, 3)


def random_ids(num_items: int, rng: np.random.Generator) -> np.ndarray:
    """``[N, LEVELS + 1]`` unique IDs: uniform cluster codes + rank within their group."""
    clusters = rng.integers(0, CODEBOOK, (num_items, LEVELS), dtype=np.int64)  # [N, L]
    key = pack_codes(clusters, bits=8)  # [N]
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    starts = np.concatenate([[True], sorted_key[1:] != sorted_key[:-1]])  # [N]
    index = np.arange(num_items)
    group_start = np.maximum.accumulate(np.where(starts, index, 0))
    rank = np.empty(num_items, dtype=np.int64)
    rank[order] = index - group_start
    return np.concatenate([clusters, rank[:, None]], axis=1)


def build_rows(codes: np.ndarray, bits: int, rng: np.random.Generator) -> pa.Table:
    n, m = codes.shape
    a, b, c, d = (codes[:, level].tolist() for level in range(codes.shape[1]))
    sids = [
        f"<a_{x}><b_{y}><c_{z}><d_{w}>" for x, y, z, w in zip(a, b, c, d, strict=True)
    ]  # == format_sid, checked by write_semantic_id_version
    hashes = rng.bytes(32 * n).hex()
    return pa.Table.from_pydict(
        {
            "item_id": [f"item{i}" for i in range(n)],
            "codes": pa.ListArray.from_arrays(
                pa.array(np.arange(0, (n + 1) * m, m, dtype=np.int32)),
                pa.array(codes.astype(np.int32).ravel()),
            ),
            "sid": sids,
            "packed": pack_codes(codes, bits=bits),
            "method": ["cluster"] * n,
            "active": np.ones(n, dtype=bool),
            "content_hash": [hashes[64 * i : 64 * (i + 1)] for i in range(n)],
        },
        schema=storage.SEMANTIC_ID_ROWS_SCHEMA,
    )


def summary_ms(times: list[float]) -> dict[str, float]:
    ms = np.array(times) * 1000
    return {
        "median_ms": round(float(np.median(ms)), 3),
        "p95_ms": round(float(np.percentile(ms, 95)), 3),
        "mean_ms": round(float(ms.mean()), 3),
        "min_ms": round(float(ms.min()), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--lookups", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs of each query")
    parser.add_argument("--versions", type=int, default=1, help="versions written (same rows)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--duckdb-threads", type=int, default=None, help="default: DuckDB's")
    parser.add_argument("--keep", default=None, help="keep the database at this path")
    parser.add_argument("--output", default="duckdb_lookup.json", help="file in results/")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    bits = pack_bits(LEVELS + 1)
    scratch = Path(tempfile.mkdtemp(prefix="store-bench-duckdb-"))
    db = str(scratch / "store.duckdb")
    try:
        started = time.perf_counter()
        codes = random_ids(args.items, rng)
        level_sizes = [CODEBOOK] * LEVELS + [int(codes[:, -1].max()) + 1]
        rows = build_rows(codes, bits, rng)
        spool = scratch / "rows.parquet"
        pq.write_table(rows, spool, compression="zstd")
        generate_s = time.perf_counter() - started
        codebook_row = {
            "codebook_version": "bench-synthetic",
            "quantizer": "synthetic",
            "cluster_levels": LEVELS,
            "codebook_size": CODEBOOK,
            "level_sizes": level_sizes,
            "pack_bits": bits,
        }
        write_s = []
        rss_before_write = _status_mib("VmRSS")
        reset = _reset_peak()
        for v in range(args.versions):
            t0 = time.perf_counter()
            storage.write_semantic_id_version(
                db, codebook_row, str(spool), {"new": args.items}, f"benchmark v{v + 1}"
            )
            write_s.append(time.perf_counter() - t0)
        write_peak = _status_mib("VmHWM") if reset else None
        report: dict[str, Any] = {
            "machine": machine_info(),
            "config": {
                "items": args.items,
                "levels": LEVELS,
                "codebook_size": CODEBOOK,
                "level_sizes": level_sizes,
                "pack_bits": bits,
                "versions": args.versions,
                "lookups": args.lookups,
                "warmup": args.warmup,
                "seed": args.seed,
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            },
            "build": {
                "generate_rows_s": round(generate_s, 2),
                "write_version_s": [round(t, 2) for t in write_s],
                "db_mib": round(os.path.getsize(db) / 2**20, 1),
                "rss_before_write_mib": round(rss_before_write, 1),
                "write_peak_rss_mib": None if write_peak is None else round(write_peak, 1),
            },
        }
        del rows

        item_ids = [f"item{i}" for i in range(args.items)]
        sample = rng.choice(args.items, size=args.lookups, replace=False).tolist()
        with storage.connect_read_only_with_retry(db) as con:
            if args.duckdb_threads is not None:
                con.execute(f"SET threads = {int(args.duckdb_threads)}")
            threads = con.execute("SELECT current_setting('threads')").fetchall()[0][0]
            report["config"]["duckdb_threads"] = int(threads)
            report["config"]["duckdb_version"] = con.execute("PRAGMA version").fetchall()[0][0]
            print(json.dumps(report, indent=2), flush=True)

            def run(sql: str, params: list[Any]) -> Callable[[], list[tuple[Any, ...]]]:
                return lambda: con.execute(sql, params).fetchall()

            def queries(i: int) -> dict[str, Callable[[], Any]]:
                item, row = item_ids[i], codes[i]
                sid = format_sid(row)
                packed = int(pack_codes(row[None, :], bits=bits)[0])
                out: dict[str, Callable[[], Any]] = {
                    "full_id/packed_eq": run(
                        "SELECT item_id FROM current_semantic_ids WHERE packed = ?", [packed]
                    ),
                    "full_id/sid_of": run("SELECT sid_of(?)", [item]),
                    "full_id/item_of": run("SELECT item_of(?)", [sid]),
                }
                for n in PREFIXES:
                    prefix = [int(c) for c in row[:n]]
                    lo, hi = prefix_range(prefix, LEVELS + 1, bits)
                    text = format_sid(prefix)
                    out[f"prefix{n}/packed_between"] = run(
                        "SELECT item_id, sid FROM current_semantic_ids "
                        "WHERE packed BETWEEN ? AND ? ORDER BY packed",
                        [lo, hi],
                    )
                    out[f"prefix{n}/items_with_codes"] = run(
                        "SELECT item_id, sid FROM items_with_codes(?::INTEGER[])", [prefix]
                    )
                    out[f"prefix{n}/neighbours"] = run(
                        "SELECT item_id, sid FROM neighbours(?, ?)", [item, n]
                    )
                    out[f"prefix{n}/items_with_prefix"] = run(
                        "SELECT item_id, sid FROM items_with_prefix(?)", [text]
                    )
                    out[f"prefix{n}/like"] = run(
                        "SELECT item_id, sid FROM current_semantic_ids "
                        "WHERE sid LIKE ? || '%' ORDER BY packed",
                        [text],
                    )
                return out

            names = list(queries(sample[0]))
            for i in sample[: args.warmup]:
                for fn in queries(i).values():
                    fn()
            times: dict[str, list[float]] = {name: [] for name in names}
            returned: dict[str, list[int]] = {name: [] for name in names}
            mismatches: dict[str, int] = {name: 0 for name in names}
            for i in sample:
                results: dict[str, Any] = {}
                for name, fn in queries(i).items():
                    t0 = time.perf_counter()
                    results[name] = fn()
                    times[name].append(time.perf_counter() - t0)
                    returned[name].append(len(results[name]))
                item, sid = item_ids[i], format_sid(codes[i])
                expect_full = {
                    "full_id/packed_eq": [(item,)],
                    "full_id/sid_of": [(sid,)],
                    "full_id/item_of": [(item,)],
                }
                for name, expected in expect_full.items():
                    mismatches[name] += results[name] != expected
                for n in PREFIXES:
                    reference = results[f"prefix{n}/packed_between"]
                    for kind in ("items_with_codes", "items_with_prefix", "like"):
                        mismatches[f"prefix{n}/{kind}"] += results[f"prefix{n}/{kind}"] != reference
                    without = [r for r in reference if r[0] != item]
                    mismatches[f"prefix{n}/neighbours"] += (
                        results[f"prefix{n}/neighbours"] != without
                    )

        # One query per connection (the `store query` CLI, short-lived readers): measured
        # with the long-lived connection above closed, so every open really opens the file.
        name = "full_id/sid_of_fresh_connection"
        names.append(name)
        times[name], returned[name], mismatches[name] = [], [], 0
        for i in sample[: args.warmup]:
            storage.query(db, f"SELECT sid_of('{item_ids[i]}')")
        for i in sample:
            t0 = time.perf_counter()
            got = storage.query(db, f"SELECT sid_of('{item_ids[i]}')")[1]
            times[name].append(time.perf_counter() - t0)
            returned[name].append(len(got))
            mismatches[name] += got != [(format_sid(codes[i]),)]

        lookups: dict[str, Any] = {}
        for name in names:
            lookups[name] = {
                **summary_ms(times[name]),
                "rows_mean": round(float(np.mean(returned[name])), 1),
                "mismatches": mismatches[name],
            }
        report["lookups"] = lookups
        report["like_vs_between"] = {
            f"prefix{n}": {
                "like_median_ms": lookups[f"prefix{n}/like"]["median_ms"],
                "between_median_ms": lookups[f"prefix{n}/packed_between"]["median_ms"],
                "ratio": round(
                    lookups[f"prefix{n}/like"]["median_ms"]
                    / lookups[f"prefix{n}/packed_between"]["median_ms"],
                    1,
                ),
            }
            for n in PREFIXES
        }
        if args.keep:
            shutil.copy(db, args.keep)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    build = report["build"]
    print(
        f"\nwrite {args.items} rows: {', '.join(f'{t:.1f} s' for t in write_s)}; RSS "
        f"{build['rss_before_write_mib']:.0f} MiB before, peak {build['write_peak_rss_mib']} MiB"
    )
    print(f"{'query':<36} {'median ms':>10} {'p95 ms':>8} {'rows':>8} {'bad':>4}")
    for name, row in lookups.items():
        print(
            f"{name:<36} {row['median_ms']:>10.3f} {row['p95_ms']:>8.3f} "
            f"{row['rows_mean']:>8.1f} {row['mismatches']:>4}"
        )
    for n, row in report["like_vs_between"].items():
        print(f"{n}: LIKE / BETWEEN = {row['ratio']}x")
    write_results(report, args.output)


if __name__ == "__main__":
    main()
