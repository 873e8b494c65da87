"""Stage 4: offline evaluation with the protocol of docs/EVALUATION.md.

Generative systems (STORE and the TIGER-style RQ-KMeans variant) are scored from their
constrained beam (width ``recommender.beam_size``, default 20): the target's position in
the beam is its rank, not found = miss. Besides Recall/NDCG@{1,5,10,20} and MRR this
reports:

* ``invalid_id_rate``: returned beams whose ID maps to no item (must be exactly 0);
* ``coverage_at_10``: distinct items recommended in anyone's top 10 / catalogue size;
* ``cold_*``: the same metrics on users whose test target no training sequence contains
  (never a recommendation target or history item in training, cold-start holdout
  included);
* ``history_excluded_*``: the second rule of EVALUATION.md: each user's whole history
  (train items + validation item) removed from every system's ranking. A full-ranking
  system ranks the rest of the catalogue; a generative system decodes a second time with
  the history left out of the search (``constrained_beam_search(excluded=...)``, as
  ``store recommend --exclude-history`` serves it), so its beam holds ``beam_size`` items
  outside the history instead of what is left of a ``beam_size`` beam after filtering
  (on ml-100k that filtered beam had fewer than 10 entries for 19% of test users).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from store_core.bundle import RecommenderBundle
from store_core.config import StoreConfig
from store_core.data_files import trained_items
from store_core.errors import ConfigError, StoreError
from store_core.generate import BeamResult, SemanticIdTrie, constrained_beam_search
from store_core.generate.cold_start import ColdStartBackoff, merge_beams
from store_core.generate.transition_memory import (
    TransitionMemory,
    fuse_with_transition_memory,
    without_items,
)
from store_core.metrics import rank_of, ranking_metrics
from store_core.splits import EVAL_SAMPLE_SEED, seeded_subset
from store_core.tasks import EvalSplit, TaskData, eval_prompts, load_task_data

logger = logging.getLogger(__name__)


class BeamSearch(Protocol):
    """Runs the constrained beam search of a split's prompts elsewhere (e.g. user shards
    on a cluster, :class:`store_core.sharding.ShardedSearch`): the :class:`BeamResult`
    :func:`local_beam_search` returns for the same arguments."""

    def __call__(
        self,
        bundle: RecommenderBundle,
        prompts: list[list[int]],
        cfg: StoreConfig,
        excluded: Sequence[Sequence[int]] | None = None,
    ) -> BeamResult: ...


@dataclass
class SystemResult:
    """One system's metrics on one split (flat name -> value, MLflow-safe names)."""

    system: str
    seed: int
    metrics: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)


def _prefixed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in metrics.items()}


def summarize_ranks(
    ranks: np.ndarray,
    ranks_excluded: np.ndarray,
    cold_mask: np.ndarray,
) -> dict[str, float]:
    """The headline, history-excluded and cold-start metrics from per-user ranks."""
    out = ranking_metrics(ranks)
    out.update(_prefixed(ranking_metrics(ranks_excluded), "history_excluded_"))
    if cold_mask.any():
        out.update(_prefixed(ranking_metrics(ranks[cold_mask]), "cold_"))
    out["cold_users"] = float(cold_mask.sum())
    out["users"] = float(len(ranks))
    return out


def cold_users(data: TaskData, targets: Sequence[str]) -> np.ndarray:
    """Mask of users whose target appears in no training sequence."""
    seen = {item for seq in data.train_sequences.values() for item in seq}
    return np.array([t not in seen or t in data.cold_items for t in targets], dtype=bool)


@dataclass
class DecodedSplit:
    """The constrained beam search of one split's users with a bundle's model."""

    data: TaskData
    codes: np.ndarray  # [N, L+1] the bundle's item codes
    item_ids: list[str]  # row -> item id (rows of ``codes`` and ``result.items``)
    users: list[str]
    targets: list[str]  # the target item id per user
    result: BeamResult
    prompts: list[list[int]] = field(default_factory=list)  # token ids, one per user


def local_beam_search(
    bundle: RecommenderBundle,
    prompts: Sequence[Sequence[int]],
    cfg: StoreConfig,
    progress: bool = True,
    excluded: Sequence[Sequence[int]] | None = None,
) -> BeamResult:
    """:func:`constrained_beam_search` in this process over the catalogue trie of
    ``bundle``, with ``recommender.beam_size`` / ``eval_batch_size`` and the ID
    normalization the checkpoint was trained with: how :func:`decode_split` decodes.
    ``excluded``: per prompt, catalogue rows it may not get."""
    return constrained_beam_search(
        bundle.model,
        prompts,
        SemanticIdTrie.from_codes(bundle.codes(), bundle.level_ids),
        beam_size=cfg.recommender.beam_size,
        pad_token_id=bundle.builder.pad_token_id,
        batch_size=cfg.recommender.eval_batch_size,
        progress=progress,
        normalization=bundle.trained(cfg).id_normalization,
        excluded=excluded,
    )


def decode_split(
    bundle: RecommenderBundle,
    cfg: StoreConfig,
    split: EvalSplit = "test",
    max_users: int | None = None,
    progress: bool = True,
    search: BeamSearch | None = None,
    *,
    exclude_history: bool = False,
    inputs: DecodedSplit | None = None,
) -> DecodedSplit:
    """Constrained beam search for every user of ``split`` (a seeded sample of
    ``max_users`` when set), prompted with their last ``history_len`` items: the N the
    checkpoint was trained with (:meth:`RecommenderBundle.history_len`). ``search`` runs
    the search elsewhere (same result); None: here. With ``exclude_history`` each user's
    whole history (:meth:`TaskData.history`) is left out of their search and of the
    transition memory's candidates; the cold-start back-off's candidates are not
    filtered (an item in a history is a trained item, except a validation item no
    training sequence holds: the metrics' history filter removes that one). ``inputs``:
    an earlier decoding of the same split whose data, users and prompts are reused
    instead of read again (``split`` and ``max_users`` are then its)."""
    if inputs is None:
        codes = bundle.codes()
        item_ids: list[str] = bundle.semantic_ids.column("item_id").to_pylist()
        data = load_task_data(cfg.data_dir, dict(zip(item_ids, codes.tolist(), strict=True)))
        history_len = bundle.trained(cfg).history_len
        users, prompts, targets = eval_prompts(data, bundle.builder, history_len, split)
        if max_users is not None and len(users) > max_users:
            keep = seeded_subset(len(users), max_users, EVAL_SAMPLE_SEED)
            users = [users[i] for i in keep]
            prompts = [prompts[i] for i in keep]
            targets = [targets[i] for i in keep]
    else:
        data, codes, item_ids = inputs.data, inputs.codes, inputs.item_ids
        users, prompts, targets = inputs.users, inputs.prompts, inputs.targets
    excluded: list[list[int]] | None = None
    if exclude_history:
        row_of = {item: row for row, item in enumerate(item_ids)}
        excluded = [[row_of[i] for i in data.history(user, split) if i in row_of] for user in users]
    if search is not None:
        result = search(bundle, prompts, cfg, excluded)
    else:
        result = local_beam_search(bundle, prompts, cfg, progress=progress, excluded=excluded)
    if cfg.recommender.cold_start_backoff > 0:
        trained = trained_items(cfg.data_dir)
        cold_rows = [row for row, item in enumerate(item_ids) if item not in trained]
        result = with_cold_start_backoff(bundle, cfg, codes, cold_rows, prompts, result)
    if cfg.recommender.transition_memory_weight > 0:
        histories = [data.history(user, split) for user in users]
        train = data.train_sequences
        result = with_transition_memory(
            cfg, train, item_ids, codes, histories, result, exclude_history=exclude_history
        )
    return DecodedSplit(data, codes, item_ids, users, targets, result, prompts)


def memory_of(
    cfg: StoreConfig, sequences: Iterable[Sequence[int]], num_items: int
) -> TransitionMemory:
    """The transition memory of ``sequences`` (catalogue rows) with the config's
    ``recommender.transition_memory_window`` / ``_window_decay`` / ``_symmetric``."""
    rec = cfg.recommender
    return TransitionMemory.from_sequences(
        sequences,
        num_items,
        window=rec.transition_memory_window,
        window_decay=rec.transition_memory_window_decay,
        symmetric=rec.transition_memory_symmetric,
    )


def with_transition_memory(
    cfg: StoreConfig,
    train: Mapping[str, Sequence[str]],
    item_ids: Sequence[str],
    codes: np.ndarray,
    histories: Sequence[Sequence[str]],
    result: BeamResult,
    *,
    exclude_history: bool = False,
) -> BeamResult:
    """``result`` re-ranked with the transition memory of the ``train`` sequences (user
    -> item ids) when ``recommender.transition_memory_weight`` > 0, else ``result``
    itself (:mod:`store_core.generate.transition_memory`). ``item_ids`` / ``codes``
    ``[N, M]``: the catalogue, whose rows ``result.items`` index; ``histories``: one per
    prompt, item ids, oldest first; with ``exclude_history`` the memory names none of a
    prompt's own history items. Items outside ``item_ids`` take no part."""
    rec = cfg.recommender
    if rec.transition_memory_weight <= 0:
        return result
    row_of = {item: row for row, item in enumerate(item_ids)}
    memory = memory_of(
        cfg, ([row_of.get(i, -1) for i in seq] for seq in train.values()), len(item_ids)
    )
    probabilities = memory.next_item_probabilities(
        [[row_of.get(i, -1) for i in h] for h in histories],
        rec.transition_memory_depth,
        rec.transition_memory_decay,
    )
    if exclude_history:
        probabilities = without_items(
            probabilities, [[row_of[i] for i in h if i in row_of] for h in histories]
        )
    logger.info(
        "transition memory: %d item pairs, weight %g, depth %d, decay %g, window %d "
        "(decay %g), symmetric %s",
        memory.matrix.nnz,
        rec.transition_memory_weight,
        rec.transition_memory_depth,
        rec.transition_memory_decay,
        rec.transition_memory_window,
        rec.transition_memory_window_decay,
        rec.transition_memory_symmetric,
    )
    return fuse_with_transition_memory(
        result, probabilities, rec.transition_memory_weight, codes, result.items.shape[1]
    )


def with_cold_start_backoff(
    bundle: RecommenderBundle,
    cfg: StoreConfig,
    codes: np.ndarray,
    cold_rows: Sequence[int],
    prompts: Sequence[Sequence[int]],
    result: BeamResult,
) -> BeamResult:
    """``result`` with the cold-start back-off candidates merged in
    (:mod:`store_core.generate.cold_start`) when ``recommender.cold_start_backoff`` > 0,
    else ``result`` itself. ``codes``: ``[N, M]`` the rows ``result.items`` index;
    ``cold_rows``: the rows of items no training sequence contains. Runs in this process
    (a ``depth``-step search, cheaper than the ID search) even when the ID search ran on a
    cluster. ConfigError when ``recommender.cold_start_backoff_depth`` is not below M."""
    weight = cfg.recommender.cold_start_backoff
    if weight <= 0 or not cold_rows:
        return result
    id_length = codes.shape[1]
    depth = cfg.recommender.cold_start_backoff_depth or max(1, id_length - 2)
    if depth >= id_length:
        raise ConfigError(
            f"recommender.cold_start_backoff_depth {depth} must be below the ID length "
            f"{id_length} of this checkpoint"
        )
    backoff = ColdStartBackoff.build(
        codes, np.asarray(cold_rows), bundle.level_ids, depth=depth, weight=weight
    )
    assert backoff is not None  # cold_rows is not empty
    rows, scores = backoff.search(
        bundle.model,
        prompts,
        beam_size=cfg.recommender.beam_size,
        pad_token_id=bundle.builder.pad_token_id,
        batch_size=cfg.recommender.eval_batch_size,
    )
    logger.info(
        "cold-start back-off: %d items no training sequence contains, %d prefixes of %d "
        "codes, weight %g",
        len(cold_rows),
        len(backoff.members),
        depth,
        weight,
    )
    return merge_beams(result, rows, scores, codes, result.items.shape[1])


def evaluate_generative(
    bundle: RecommenderBundle,
    cfg: StoreConfig,
    *,
    system: str,
    split: EvalSplit = "test",
    max_users: int | None = None,
    progress: bool = True,
    search: BeamSearch | None = None,
) -> SystemResult:
    """Constrained beam search for every user of ``split`` with ``bundle``'s model
    (``search``: see :func:`decode_split`), twice: with history kept, and with each
    user's history left out of the search for the ``history_excluded_*`` metrics (module
    docstring). ``extra["seconds"]``: the two decodings' wall-clock seconds."""
    started = time.perf_counter()
    decoded = decode_split(bundle, cfg, split, max_users, progress, search)
    kept_seconds = time.perf_counter() - started
    started = time.perf_counter()
    excluded = decode_split(
        bundle, cfg, split, progress=progress, search=search, exclude_history=True, inputs=decoded
    )
    excluded_seconds = time.perf_counter() - started
    data, item_ids, users, targets = decoded.data, decoded.item_ids, decoded.users, decoded.targets
    result = decoded.result
    alive = np.isfinite(result.scores)  # [P, B]
    invalid = int((alive & (result.items < 0)).sum())
    returned = int(alive.sum())
    others_alive = excluded.result.alive  # [P, B]
    invalid += int((others_alive & (excluded.result.items < 0)).sum())
    row_of = {item: i for i, item in enumerate(item_ids)}
    ranks = np.empty(len(users), dtype=np.int64)
    ranks_excluded = np.empty(len(users), dtype=np.int64)
    top10: set[int] = set()
    for u, (user, target) in enumerate(zip(users, targets, strict=True)):
        beam = result.items[u][alive[u]]
        ranks[u] = rank_of(row_of[target], beam)
        history = {row_of[i] for i in data.history(user, split)}
        others = excluded.result.items[u][others_alive[u]]
        filtered = np.array([i for i in others.tolist() if i not in history], dtype=np.int64)
        ranks_excluded[u] = rank_of(row_of[target], filtered)
        top10.update(beam[:10].tolist())
    metrics = summarize_ranks(ranks, ranks_excluded, cold_users(data, targets))
    metrics["invalid_id_rate"] = invalid / max(returned + int(others_alive.sum()), 1)
    metrics["coverage_at_10"] = len(top10) / len(item_ids)
    metrics["returned_ids"] = float(returned)
    logger.info(
        "%s: recall@10 %.4f ndcg@10 %.4f, history excluded %.4f / %.4f, invalid-ID rate "
        "%.4f (%d users; decoding %.0f s kept, %.0f s history excluded)",
        system,
        metrics["recall_at_10"],
        metrics["ndcg_at_10"],
        metrics["history_excluded_recall_at_10"],
        metrics["history_excluded_ndcg_at_10"],
        metrics["invalid_id_rate"],
        len(users),
        kept_seconds,
        excluded_seconds,
    )
    seconds = {"decode_kept": kept_seconds, "decode_history_excluded": excluded_seconds}
    return SystemResult(system, cfg.recommender_train.seed, metrics, {"seconds": seconds})


# --------------------------------------------------------------------------------------
# side-by-side evaluation of every system
# --------------------------------------------------------------------------------------
SYSTEM_LABELS = {
    "store": "STORE (multi-task, STORE quantizer)",
    "tiger": "TIGER-style (RQ-KMeans, recommendation only)",
    "sasrec": "SASRec-CE",
    "popularity": "Popularity",
}


def generative_label(cfg: StoreConfig) -> str:
    """What a generative system's checkpoint is, e.g. STORE (recommendation only, STORE
    quantizer) when the ``store`` system is run with a recommendation-only mixture, with
    ", transition memory <w>" when decoding mixes in the transition memory."""
    from store_core.recommender_training import variant

    tasks = "multi-task" if variant(cfg) == "multitask" else "recommendation only"
    quantizer = {"store": "STORE", "rqkmeans": "RQ-KMeans"}.get(
        cfg.semantic_id.quantizer, cfg.semantic_id.quantizer
    )
    rec = cfg.recommender
    extra = ""
    if rec.transition_memory_weight > 0:
        extra = f", transition memory {rec.transition_memory_weight:g}"
        if rec.transition_memory_window > 1:
            extra += f" window {rec.transition_memory_window}"
        if rec.transition_memory_symmetric:
            extra += " symmetric"
    return f"STORE ({tasks}, {quantizer} quantizer{extra})"


def labels(results: Sequence[SystemResult]) -> dict[str, str]:
    """system -> its display label (a result's ``extra["label"]`` wins over the default)."""
    out = {r.system: SYSTEM_LABELS.get(r.system, r.system) for r in results}
    out.update({r.system: str(r.extra["label"]) for r in results if "label" in r.extra})
    return out


def tiger_config(cfg: StoreConfig) -> StoreConfig:
    """The TIGER-style variant of ``cfg``: RQ-KMeans IDs, the recommendation task only,
    decoded without the transition memory (TIGER as published)."""
    from store_core.config import TaskSpec

    return cfg.model_copy(
        update={
            "semantic_id": cfg.semantic_id.model_copy(update={"quantizer": "rqkmeans"}),
            "recommender": cfg.recommender.model_copy(
                update={
                    "mixture": [TaskSpec(task="recommendation", weight=1.0)],
                    "transition_memory_weight": 0.0,
                }
            ),
        }
    )


def _baseline_result(system: str, seed: int, out: dict[str, Any]) -> SystemResult:
    metrics = dict(out["test"])
    metrics.update(_prefixed(out["test_history_excluded"], "history_excluded_"))
    metrics.update(_prefixed(out.get("test_cold", {}), "cold_"))  # as summarize_ranks does
    metrics["cold_users"] = float(out.get("cold_users", 0))
    metrics["users"] = float(out.get("users", 0))
    parts = ("test", "test_history_excluded", "test_cold", "cold_users")
    extra = {k: v for k, v in out.items() if k not in parts}
    return SystemResult(system, seed, metrics, extra)


def run_systems(
    cfg: StoreConfig, *, train_missing: bool = True, search: BeamSearch | None = None
) -> list[SystemResult]:
    """Evaluate every configured system on the test split (trains TIGER-style if absent);
    ``search`` decodes the generative systems elsewhere (:func:`decode_split`)."""
    from store_core.bundle import load_bundle
    from store_core.checkpoint import has_metadata
    from store_core.item_tokenizer import train_semantic_tokenizer
    from store_core.recommender_training import recommender_dir, train_recommender

    results: list[SystemResult] = []
    ev = cfg.evaluation
    for system in ev.systems:  # a missing model is refused before any system spends time
        if system == "store" or (system == "tiger" and not train_missing):
            directory = recommender_dir(cfg if system == "store" else tiger_config(cfg))
            if not has_metadata(directory):
                raise StoreError(
                    f"no trained {system} recommender in {directory}: run `store train` "
                    "first (or leave that system out of evaluation.systems)"
                )
    for system in ev.systems:
        if system in ("store", "tiger"):
            sys_cfg = cfg if system == "store" else tiger_config(cfg)
            directory = recommender_dir(sys_cfg)
            if not has_metadata(directory):  # TIGER-style (checked above)
                logger.info("training the TIGER-style variant into %s", directory)
                train_semantic_tokenizer(sys_cfg)
                train_recommender(sys_cfg)
            bundle = load_bundle(directory)
            result = evaluate_generative(
                bundle, sys_cfg, system=system, max_users=ev.max_users, search=search
            )
            label = generative_label(sys_cfg)
            if system == "store" and label != SYSTEM_LABELS["store"]:
                result.extra["label"] = label
            results.append(result)
        elif system == "popularity":
            from store_core.baselines.popularity import run_popularity

            results.append(_baseline_result("popularity", 0, run_popularity(cfg.data_dir)))
        elif system == "sasrec":
            from store_core.baselines.sasrec import run_sasrec

            for seed in ev.sasrec_seeds:
                out = run_sasrec(cfg.data_dir, ev.sasrec, seed)
                results.append(_baseline_result("sasrec", seed, out))
    return results


def aggregate(results: Sequence[SystemResult]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """system -> metric -> (mean, sample std (ddof=1), n) over the seeds run."""
    grouped: dict[str, dict[str, list[float]]] = {}
    for result in results:
        for key, value in result.metrics.items():
            grouped.setdefault(result.system, {}).setdefault(key, []).append(value)
    return {
        system: {
            k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v))
            for k, v in metrics.items()
        }
        for system, metrics in grouped.items()
    }


REPORT_METRICS = (
    "recall_at_1",
    "recall_at_5",
    "recall_at_10",
    "recall_at_20",
    "ndcg_at_5",
    "ndcg_at_10",
    "ndcg_at_20",
    "mrr",
)


def markdown_report(results: Sequence[SystemResult], title: str, notes: Sequence[str] = ()) -> str:
    """A Markdown table per history rule: mean +- std over seeds for each system."""
    agg = aggregate(results)
    names = labels(results)
    lines = [f"# {title}", ""]
    for rule, prefix in (
        ("history items kept (headline)", ""),
        ("history excluded", "history_excluded_"),
    ):
        lines += [f"## {rule}", ""]
        lines.append(
            "| system | seeds | "
            + " | ".join(m.replace("_at_", "@") for m in REPORT_METRICS)
            + " |"
        )
        lines.append("|---|---|" + "---|" * len(REPORT_METRICS))
        for system, metrics in agg.items():
            cells = []
            for metric in REPORT_METRICS:
                mean, std, n = metrics.get(prefix + metric, (float("nan"), 0.0, 0))
                cells.append(f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}")
            seeds = max(v[2] for v in metrics.values())
            lines.append(f"| {names[system]} | {seeds} | " + " | ".join(cells) + " |")
        lines.append("")
    extras = []
    for system, metrics in agg.items():
        for key in ("invalid_id_rate", "coverage_at_10", "cold_users", "cold_recall_at_10"):
            if key in metrics:
                extras.append(f"- {names[system]}: {key} = {metrics[key][0]:.4f}")
    if extras:
        lines += ["## Generative-only checks", "", *extras, ""]
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def plot_metric_vs_k(results: Sequence[SystemResult], path: str) -> None:
    """Recall@K and NDCG@K against K, one line per system (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(results)
    names = labels(results)
    ks = (1, 5, 10, 20)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for system, metrics in agg.items():
        label = names[system]
        axes[0].plot(ks, [metrics[f"recall_at_{k}"][0] for k in ks], marker="o", label=label)
        axes[1].plot(ks, [metrics[f"ndcg_at_{k}"][0] for k in ks], marker="o", label=label)
    for ax, name in zip(axes, ("Recall@K", "NDCG@K"), strict=True):
        ax.set_xlabel("K")
        ax.set_title(name)
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def eval_rows(results: Sequence[SystemResult], run_id: str, dataset: str) -> list[dict[str, Any]]:
    """Rows for the DuckDB ``eval_results`` table."""
    rows = []
    for result in results:
        for metric, value in result.metrics.items():
            excluded = metric.startswith("history_excluded_")
            rows.append(
                {
                    "run_id": run_id,
                    "dataset": dataset,
                    "system": result.system,
                    "seed": result.seed,
                    "split": "test",
                    "metric": metric.removeprefix("history_excluded_"),
                    "value": float(value),
                    "history_rule": "excluded" if excluded else "kept",
                }
            )
    return rows
