"""Batch inference cut into shards that run anywhere: the library half of the scale-out.

Catalogue tokenization (:func:`store_core.catalogue.tokenize_catalogue`) and evaluation
(:func:`store_core.evaluation.decode_split`) spend their time in the constrained beam
search. This module cuts that work into shards, runs each shard with a function that any
process can call (:func:`run_catalogue_shard`, :func:`run_users_shard`: a worker loads the
checkpoint once and keeps it, :func:`worker_bundle`) and hands the results back to the
central part, which does everything order-dependent exactly as the in-process run does:

* catalogue: shards are contiguous runs of the catalogue's read batches
  (:func:`store_core.catalogue.plan_batches`); a shard generates the beams of its rows that
  need a new ID, batch by batch as the in-process run would, and writes them to a Parquet
  file in the run's staging directory. :class:`ShardedBeams` reads them back in order, and
  the central run chooses the disambiguation codes against every ID ever issued and
  commits one DuckDB version, as before. A failed shard fails the run before anything
  reaches DuckDB; the staging directory goes with the run.
* evaluation: the users are sorted by prompt length as :func:`store_core.generate.
  constrained_beam_search` sorts them, and cut at multiples of its batch size, so every
  shard searches exactly the batches the in-process search would; :class:`ShardedSearch`
  puts the beams back in user order and the metrics are computed once, centrally.

So the sharded stages write the same IDs and metrics as the in-process ones (given the
same numeric settings, e.g. ``OMP_NUM_THREADS``, on every process). How shards are run is
a :data:`ShardRunner`: :func:`run_here` in this process, or Prefect tasks on a Dask
cluster (:mod:`flows.scaleout`, which adds retries and names a failed shard). The shards
read the workspace by path: every worker must see it at the same path.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import resource
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from store_core.bundle import RecommenderBundle, load_bundle
from store_core.catalogue import BatchPlan
from store_core.checkpoint import metadata_mtime
from store_core.config import StoreConfig
from store_core.errors import StoreError
from store_core.generate import BeamResult, SemanticIdTrie, constrained_beam_search
from store_core.new_items import generate_ids

logger = logging.getLogger(__name__)

S = TypeVar("S")
R = TypeVar("R")
#: Runs ``fn`` on every shard and returns the results in shard order; raises (naming the
#: shard) when a shard fails for good.
ShardRunner = Callable[[Callable[[S], R], Sequence[S]], list[R]]


def run_here(fn: Callable[[S], R], shards: Sequence[S]) -> list[R]:
    """The :data:`ShardRunner` of this process: the shards one after the other."""
    return [fn(shard) for shard in shards]


# --------------------------------------------------------------------------- workers


@functools.lru_cache(maxsize=2)
def _cached_bundle(directory: str, stamp: float) -> RecommenderBundle:
    logger.info("worker %d loads %s", os.getpid(), directory)
    return load_bundle(directory)


def worker_bundle(directory: str) -> RecommenderBundle:
    """The checkpoint in ``directory``, loaded once per process (reloaded when its
    ``metadata.json`` changes, i.e. after retraining). Raises what
    :func:`store_core.bundle.load_bundle` raises."""
    return _cached_bundle(directory, metadata_mtime(directory))


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux ``ru_maxrss`` is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass(frozen=True)
class ShardReport:
    """What a shard did: where it ran, how much, how fast."""

    index: int
    output: str | None  # the shard's Parquet file (catalogue shards)
    rows: int  # rows (items or users) the shard covered
    generated: int  # rows it ran the beam search for
    seconds: float
    pid: int
    peak_rss_mb: float

    def describe(self) -> str:
        rate = self.generated / max(self.seconds, 1e-9)
        return (
            f"shard {self.index}: {self.generated}/{self.rows} rows in {self.seconds:.1f} s "
            f"({rate:.0f}/s) on pid {self.pid}, peak RSS {self.peak_rss_mb:.0f} MiB"
        )


# --------------------------------------------------------------------------- catalogue

_BEAMS_META = b"store.beams_shape"


@dataclass(frozen=True)
class CatalogueShard:
    """Rows ``start .. start + rows - 1`` of ``items.parquet``: consecutive read batches
    numbered from ``first_batch``, each (rows, positions to generate)."""

    index: int
    items_path: str
    checkpoint: str
    start: int
    first_batch: int
    batches: tuple[BatchPlan, ...]
    eval_batch_size: int
    output: str

    @property
    def rows(self) -> int:
        return sum(rows for rows, _ in self.batches)

    def describe(self) -> str:
        return f"catalogue shard {self.index} (rows {self.start}-{self.start + self.rows - 1})"


def cut_catalogue(
    plan: Sequence[BatchPlan],
    shards: int,
    *,
    items_path: str,
    checkpoint: str,
    eval_batch_size: int,
    directory: Path,
) -> list[CatalogueShard]:
    """At most ``shards`` contiguous runs of the plan's batches with about equal numbers of
    rows to generate (batches with none ride along); none when nothing is generated."""
    work = np.array([len(todo) for _, todo in plan], dtype=np.int64)  # [batches]
    total = int(work.sum())
    if total == 0:
        return []
    cumulative = np.cumsum(work)
    # the batch after which shard k ends: where the cumulative work passes k/shards of it
    ends = sorted({int(np.searchsorted(cumulative, total * k / shards)) for k in range(1, shards)})
    bounds = [0, *(end + 1 for end in ends if end + 1 < len(plan)), len(plan)]
    out: list[CatalogueShard] = []
    start = 0
    for lo, hi in itertools.pairwise(bounds):
        batches = tuple((rows, list(todo)) for rows, todo in plan[lo:hi])
        if not any(todo for _, todo in batches):  # nothing to generate: no shard
            start += sum(rows for rows, _ in batches)
            continue
        index = len(out)
        out.append(
            CatalogueShard(
                index=index,
                items_path=items_path,
                checkpoint=checkpoint,
                start=start,
                first_batch=lo,
                batches=batches,
                eval_batch_size=eval_batch_size,
                output=str(directory / f"shard-{index:05d}.parquet"),
            )
        )
        start += sum(rows for rows, _ in batches)
    return out


def _read_texts(items_path: str, start: int, stop: int) -> list[str]:
    """The ``text`` of rows ``start .. stop - 1``, reading only the row groups they span."""
    from store_core.data_files import open_parquet

    parquet = open_parquet(items_path)
    groups, offset, first = [], 0, None
    for group in range(parquet.metadata.num_row_groups):
        size = parquet.metadata.row_group(group).num_rows
        if offset < stop and offset + size > start:
            groups.append(group)
            first = offset if first is None else first
        offset += size
    if first is None:
        return []
    table = parquet.read_row_groups(groups, columns=["text"])
    texts: list[str] = table.column("text").slice(start - first, stop - start).to_pylist()
    return texts


def run_catalogue_shard(shard: CatalogueShard) -> ShardReport:
    """Generate the beams of the shard's rows that need a new ID, batch by batch as the
    in-process run does (:func:`store_core.new_items.generate_ids`), into ``shard.output``
    (written to a temporary name, then renamed: a killed shard leaves no partial file
    under that name). Raises OSError when the staging directory is gone (its run ended)."""
    started = time.perf_counter()
    bundle = worker_bundle(shard.checkpoint)
    texts = _read_texts(shard.items_path, shard.start, shard.start + shard.rows)
    numbers: list[int] = []
    beams_out: list[np.ndarray] = []
    scores_out: list[np.ndarray] = []
    offset = 0
    for number, (rows, todo) in enumerate(shard.batches, start=shard.first_batch):
        if todo:
            beams, scores = generate_ids(
                bundle.model,
                bundle.builder,
                bundle.level_ids,
                [texts[offset + i] for i in todo],
                batch_size=shard.eval_batch_size,
            )
            numbers.extend([number] * len(todo))
            beams_out.append(beams)
            scores_out.append(scores)
            bundle.builder.clear_text_cache()
        offset += rows
    beams = np.concatenate(beams_out)  # [P, B, L]
    scores = np.concatenate(scores_out)  # [P, B]
    table = pa.table(
        {
            "batch": pa.array(numbers, pa.int64()),
            "beams": pa.array(list(beams.reshape(len(beams), -1)), pa.list_(pa.int64())),
            "scores": pa.array(list(scores.astype(np.float32)), pa.list_(pa.float32())),
        }
    ).replace_schema_metadata({_BEAMS_META: json.dumps(list(beams.shape[1:])).encode()})
    partial = f"{shard.output}.{os.getpid()}-{uuid.uuid4().hex[:6]}.partial"
    pq.write_table(table, partial)
    os.replace(partial, shard.output)
    return ShardReport(
        index=shard.index,
        output=shard.output,
        rows=shard.rows,
        generated=len(numbers),
        seconds=time.perf_counter() - started,
        pid=os.getpid(),
        peak_rss_mb=peak_rss_mb(),
    )


class ShardedBeams:
    """:class:`store_core.catalogue.RemoteBeams` from catalogue shards run by ``runner``.

    ``shards``: how many shards to cut the catalogue into (fewer when it has fewer read
    batches). After :meth:`start`, :attr:`reports` holds each shard's
    :class:`ShardReport`. Raises :class:`store_core.errors.StoreError` naming the shard
    whose file is missing or does not hold the rows its plan asked for.
    """

    def __init__(
        self,
        runner: ShardRunner[CatalogueShard, ShardReport],
        cfg: StoreConfig,
        checkpoint: str,
        shards: int,
    ) -> None:
        from store_core.data_files import items_path

        self.runner = runner
        self.items_path = items_path(cfg.data_dir)
        self.checkpoint = checkpoint
        self.shards = shards
        self.eval_batch_size = cfg.recommender.eval_batch_size
        self.reports: list[ShardReport] = []
        self.seconds = 0.0
        self._groups: Iterator[tuple[int, np.ndarray, np.ndarray]] = iter(())

    def start(self, plan: list[BatchPlan], staging: Path) -> None:
        started = time.perf_counter()
        directory = staging / f"shards-{uuid.uuid4().hex[:8]}"
        directory.mkdir(parents=True)
        cut = cut_catalogue(
            plan,
            self.shards,
            items_path=self.items_path,
            checkpoint=self.checkpoint,
            eval_batch_size=self.eval_batch_size,
            directory=directory,
        )
        self.reports = self.runner(run_catalogue_shard, cut) if cut else []
        self.seconds = time.perf_counter() - started
        for shard, report in zip(cut, self.reports, strict=True):
            expected = sum(len(todo) for _, todo in shard.batches)
            if report.generated != expected or not Path(shard.output).is_file():
                raise StoreError(
                    f"{shard.describe()} wrote {report.generated} rows to {shard.output}, "
                    f"expected {expected}"
                )
            logger.info("%s", report.describe())
        generated = sum(r.generated for r in self.reports)
        logger.info(
            "%d catalogue shards generated %d IDs in %.1f s (%.0f items/s)",
            len(cut),
            generated,
            self.seconds,
            generated / max(self.seconds, 1e-9),
        )
        self._groups = self._read([shard.output for shard in cut])

    @staticmethod
    def _read(paths: list[str]) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(batch number, beams [P, B, L], scores [P, B]) per batch, shard after shard."""
        for path in paths:
            table = pq.read_table(path)
            shape = json.loads((table.schema.metadata or {})[_BEAMS_META])
            numbers = table.column("batch").to_numpy()
            flat = table.column("beams").combine_chunks().flatten().to_numpy()
            beams = flat.astype(np.int64).reshape(len(numbers), *shape)
            flat_scores = table.column("scores").combine_chunks().flatten().to_numpy()
            scores = flat_scores.astype(np.float32).reshape(len(numbers), shape[0])
            cuts = np.flatnonzero(np.diff(numbers)) + 1
            for lo, hi in zip([0, *cuts], [*cuts, len(numbers)], strict=True):
                yield int(numbers[lo]), beams[lo:hi], scores[lo:hi]

    def beams(self, batch: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
        number, beams, scores = next(self._groups, (-1, np.empty(0), np.empty(0)))
        if number != batch or len(beams) != rows:
            raise StoreError(
                f"the catalogue shards hold {len(beams)} rows for batch {number}, "
                f"expected {rows} for batch {batch} (catalogue changed during the run?)"
            )
        return beams, scores


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class UsersShard:
    """Prompts of consecutive users in the search's length order (see module doc)."""

    index: int
    checkpoint: str
    prompts: list[list[int]]
    beam_size: int
    batch_size: int
    excluded: list[list[int]] | None = None  # per prompt, catalogue rows it may not get

    def describe(self) -> str:
        return f"users shard {self.index} ({len(self.prompts)} users)"


def cut_users(
    prompts: Sequence[Sequence[int]],
    shards: int,
    *,
    checkpoint: str,
    beam_size: int,
    batch_size: int,
    excluded: Sequence[Sequence[int]] | None = None,
) -> tuple[list[UsersShard], list[list[int]]]:
    """At most ``shards`` shards of whole search batches, and each shard's input rows
    (``excluded``: per prompt, the catalogue rows it may not get, carried with it).

    The order is :func:`store_core.generate.constrained_beam_search`'s (stable sort by
    prompt length) and every shard starts at a multiple of ``batch_size`` in it, so the
    shards search exactly the batches one search over all prompts would."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = -(-len(order) // batch_size)
    per_shard = -(-batches // max(1, min(shards, batches))) * batch_size if batches else 1
    out: list[UsersShard] = []
    rows: list[list[int]] = []
    for lo in range(0, len(order), per_shard):
        chunk = order[lo : lo + per_shard]
        out.append(
            UsersShard(
                index=len(out),
                checkpoint=checkpoint,
                prompts=[list(prompts[i]) for i in chunk],
                beam_size=beam_size,
                batch_size=batch_size,
                excluded=None if excluded is None else [list(excluded[i]) for i in chunk],
            )
        )
        rows.append(chunk)
    return out, rows


def run_users_shard(shard: UsersShard) -> tuple[BeamResult, ShardReport]:
    """The constrained beam search of the shard's prompts over the checkpoint's items (the
    trie :func:`store_core.evaluation.decode_split` builds), and its report."""
    started = time.perf_counter()
    bundle = worker_bundle(shard.checkpoint)
    result = constrained_beam_search(
        bundle.model,
        shard.prompts,
        SemanticIdTrie.from_codes(bundle.codes(), bundle.level_ids),
        beam_size=shard.beam_size,
        pad_token_id=bundle.builder.pad_token_id,
        batch_size=shard.batch_size,
        normalization=bundle.metadata.id_normalization,
        excluded=shard.excluded,
    )
    report = ShardReport(
        index=shard.index,
        output=None,
        rows=len(shard.prompts),
        generated=len(shard.prompts),
        seconds=time.perf_counter() - started,
        pid=os.getpid(),
        peak_rss_mb=peak_rss_mb(),
    )
    return result, report


class ShardedSearch:
    """:data:`store_core.evaluation.BeamSearch` over user shards run by ``runner``: the
    same :class:`BeamResult` as one search in this process, in the users' order."""

    def __init__(
        self, runner: ShardRunner[UsersShard, tuple[BeamResult, ShardReport]], shards: int
    ) -> None:
        self.runner = runner
        self.shards = shards
        self.reports: list[ShardReport] = []

    def __call__(
        self,
        bundle: RecommenderBundle,
        prompts: list[list[int]],
        cfg: StoreConfig,
        excluded: Sequence[Sequence[int]] | None = None,
    ) -> BeamResult:
        started = time.perf_counter()
        beam_size, id_length = cfg.recommender.beam_size, len(bundle.level_ids)
        codes = np.full((len(prompts), beam_size, id_length), -1, dtype=np.int64)  # [P, B, M]
        scores = np.full((len(prompts), beam_size), -np.inf, dtype=np.float32)  # [P, B]
        items = np.full((len(prompts), beam_size), -1, dtype=np.int64)  # [P, B]
        shards, rows = cut_users(
            prompts,
            self.shards,
            checkpoint=bundle.directory,
            beam_size=beam_size,
            batch_size=cfg.recommender.eval_batch_size,
            excluded=excluded,
        )
        outputs = self.runner(run_users_shard, shards) if shards else []
        self.reports = [report for _, report in outputs]
        for (result, report), chunk in zip(outputs, rows, strict=True):
            codes[chunk], scores[chunk], items[chunk] = result.codes, result.scores, result.items
            logger.info("%s", report.describe())
        seconds = time.perf_counter() - started
        logger.info(
            "%d users shards decoded %d users in %.1f s (%.0f users/s)",
            len(shards),
            len(prompts),
            seconds,
            len(prompts) / max(seconds, 1e-9),
        )
        return BeamResult(codes=codes, scores=scores, items=items)


def summary(reports: Sequence[ShardReport]) -> dict[str, Any]:
    """Totals of a stage's shard reports for logs and MLflow: shards, workers (distinct
    pids), rows generated, the largest peak RSS of a worker (MiB)."""
    return {
        "shards": len(reports),
        "workers": len({r.pid for r in reports}),
        "generated": sum(r.generated for r in reports),
        "worker_peak_rss_mb": max((r.peak_rss_mb for r in reports), default=0.0),
    }
