"""STORE and SASRec-CE, each alone and each with the same transition memory, one seed.

    python -m benchmarks.transition_memory --config scientific-quality \\
        --set workspace=/path/to/workspace-scientific-quality-seed0 --seed 0
    python -m benchmarks.transition_memory --combine \\
        benchmarks/results/transition_memory_scientific-quality_seed{0,1,2}.json

The memory (``store_core.generate.transition_memory``) mixes the share of the training
transitions out of a user's recent items into a model's item probabilities: ``(1 - w) *
p_model + w * p_M``. It is a decoding-time component, so the fair question is not only
"does STORE + memory beat SASRec-CE" but "does it beat SASRec-CE + the same memory"; this
script answers both on one seed, under docs/EVALUATION.md's protocol (leave-one-out,
full ranking, test split, history kept and history excluded):

1. STORE decodes the validation and test splits with ``store evaluate``'s own
   constrained beam (``evaluation.decode_split``, memory off, beam
   ``recommender.beam_size``), once with history kept and once with it excluded from the
   search (the history-excluded rule, as ``store evaluate`` scores it);
   ``fuse_with_transition_memory`` then re-ranks those beams for every point of the
   grid (``--weights`` x ``--depths`` x the memory variants ``--windows`` x
   ``--directions``; decay ``--decay`` for depths > 1, ``--window-decay`` for windows
   > 1; point keys ``w<w>_d<D>``, plus ``_k<W>`` and ``s`` for symmetric), exactly as
   ``recommender.transition_memory_weight`` does in decoding (with history excluded, the
   memory names no history item either).
2. SASRec-CE (``evaluation.sasrec``, seed ``--seed``) is trained here and its softmax
   over all items is mixed with the same memory (same train transitions, same grid).
3. "Memory, popularity after": the memory alone, items it does not name ordered by
   training popularity: how much of the gain needs a model at all.

Each system's grid point is chosen on the validation split (NDCG@10, all validation
users), then read on the test split once: per seed, and (``--combine``) as one point for
all seeds, the best mean validation NDCG@10 over the seeds, which is how a config ships
it. ``--fixed W D`` also reports one fixed point
for every system (the setting a config ships). Writes
benchmarks/results/transition_memory_<config stem>_seed<seed>.{json,md}; ``--combine``
writes the mean +- std over seeds (``--name``, default transition_memory_<config stem>).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from benchmarks.machine import RESULTS, command_line, machine_info, write_results

logger = logging.getLogger("benchmarks.transition_memory")

SPLITS: tuple[Literal["valid", "test"], ...] = ("valid", "test")
#: Metric keys reported per system and rule.
KEYS = ("recall_at_10", "ndcg_at_10")


class Point(NamedTuple):
    """One grid point: the memory's weight w, depth D, window W and direction."""

    weight: float
    depth: int
    window: int = 1
    symmetric: bool = False

    @property
    def variant(self) -> tuple[int, bool]:
        """The memory this point reads (one count table per variant)."""
        return (self.window, self.symmetric)


def grid(
    weights: Sequence[float],
    depths: Sequence[int],
    variants: Sequence[tuple[int, bool]] = ((1, False),),
) -> list[Point]:
    """Every (weight, depth, memory variant) point; weight 0 (the model alone) first."""
    return [Point(0.0, 1)] + [
        Point(w, d, window, sym)
        for window, sym in variants
        for w in weights
        if w > 0
        for d in depths
    ]


def memories(
    sequences: Sequence[Sequence[int]],
    num_items: int,
    points: Sequence[Point],
    window_decay: float,
) -> dict[tuple[int, bool], Any]:
    """One :class:`TransitionMemory` per variant the grid reads, of the training
    ``sequences`` (catalogue rows, oldest first)."""
    from store_core.generate.transition_memory import TransitionMemory

    return {
        variant: TransitionMemory.from_sequences(
            sequences,
            num_items,
            window=variant[0],
            window_decay=window_decay,
            symmetric=variant[1],
        )
        for variant in dict.fromkeys(p.variant for p in points)
    }


def _metrics(kept: np.ndarray, excluded: np.ndarray) -> dict[str, float]:
    from store_core.metrics import ndcg_at_k, recall_at_k

    return {
        "recall_at_10": recall_at_k(kept, 10),
        "ndcg_at_10": ndcg_at_k(kept, 10),
        "history_excluded_recall_at_10": recall_at_k(excluded, 10),
        "history_excluded_ndcg_at_10": ndcg_at_k(excluded, 10),
    }


def ranked_ranks(
    ranked: np.ndarray, targets: np.ndarray, histories: Sequence[Sequence[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """0-based rank of each target in its row of ``ranked`` ``[U, K]`` (-1 dead slots),
    with history kept and with the user's history items removed first (-1: a miss)."""
    from store_core.metrics import rank_of

    kept = np.full(len(targets), -1, dtype=np.int64)
    excluded = np.full(len(targets), -1, dtype=np.int64)
    for u, target in enumerate(targets.tolist()):
        row = ranked[u][ranked[u] >= 0]
        kept[u] = rank_of(target, row)
        seen = set(histories[u])
        excluded[u] = rank_of(target, [i for i in row.tolist() if i not in seen])
    return kept, excluded


def dense_ranks(
    scores: np.ndarray, targets: np.ndarray, histories: Sequence[Sequence[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Ranks of each target under full-catalogue ``scores`` ``[U, N]`` (items with a higher
    score; ties in the target's favour, as ``torch.topk`` is not asked), history kept and
    excluded; a rank is kept only inside the top 20 (-1 otherwise), like a beam of 20."""
    kept = np.full(len(targets), -1, dtype=np.int64)
    excluded = np.full(len(targets), -1, dtype=np.int64)
    for u, target in enumerate(targets.tolist()):
        row = scores[u]
        above = row > row[target]
        rank = int(above.sum())
        kept[u] = rank if rank < 20 else -1
        history = np.asarray(sorted(set(histories[u]) - {target}), dtype=np.int64)
        rank_ex = rank - int(above[history].sum()) if history.size else rank
        excluded[u] = rank_ex if rank_ex < 20 else -1
    return kept, excluded


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def store_side(cfg: Any, points: list[Point], decay: float, window_decay: float) -> dict[str, Any]:
    """STORE's metrics per split and grid point (module docstring, step 1)."""
    from store_core.bundle import load_bundle
    from store_core.evaluation import decode_split
    from store_core.generate.transition_memory import (
        fuse_with_transition_memory,
        without_items,
    )
    from store_core.recommender_training import recommender_dir

    off = cfg.model_copy(
        update={"recommender": cfg.recommender.model_copy(update={"transition_memory_weight": 0.0})}
    )
    bundle = load_bundle(recommender_dir(off))
    out: dict[str, Any] = {}
    memory = None
    for split in SPLITS:
        started = time.perf_counter()
        decoded = decode_split(bundle, off, split, progress=False)
        others = decode_split(
            bundle, off, split, progress=False, exclude_history=True, inputs=decoded
        )
        row_of = {item: r for r, item in enumerate(decoded.item_ids)}
        if memory is None:
            train = [[row_of[i] for i in seq] for seq in decoded.data.train_sequences.values()]
            memory = memories(train, len(decoded.item_ids), points, window_decay)
        histories = [[row_of[i] for i in decoded.data.history(u, split)] for u in decoded.users]
        targets = np.array([row_of[t] for t in decoded.targets], dtype=np.int64)
        logger.info("STORE %s: decoded in %.0f s", split, time.perf_counter() - started)
        per_point = {}
        width = decoded.result.items.shape[1]
        # one memory read per (variant, depth), shared by its weights
        for variant, depth in dict.fromkeys((p.variant, p.depth) for p in points):
            probs = memory[variant].next_item_probabilities(histories, depth, decay)
            probs_excluded = without_items(probs, histories)  # the history-excluded rule
            for point in (p for p in points if (p.variant, p.depth) == (variant, depth)):
                fused = fuse_with_transition_memory(
                    decoded.result, probs, point.weight, decoded.codes, width
                )
                kept, _ = ranked_ranks(fused.items, targets, histories)
                fused = fuse_with_transition_memory(
                    others.result, probs_excluded, point.weight, decoded.codes, width
                )
                _, excluded = ranked_ranks(fused.items, targets, histories)
                per_point[_key(point)] = _metrics(kept, excluded)
        out[split] = {_key(p): per_point[_key(p)] for p in points}  # grid order: ties
    return out


def sasrec_side(
    cfg: Any, seed: int, points: list[Point], decay: float, window_decay: float
) -> dict[str, Any]:
    """SASRec-CE's and the memory-with-popularity metrics (module docstring, steps 2-3)."""
    import torch

    from store_core.baselines.data import load_sequence_data
    from store_core.baselines.sasrec import train_sasrec

    data = load_sequence_data(cfg.data_dir)
    started = time.perf_counter()
    model = train_sasrec(data, cfg.evaluation.sasrec, seed)
    model.eval()
    logger.info("SASRec-CE trained in %.0f s", time.perf_counter() - started)
    n = data.num_items  # rows here are item index - 1
    train = [(np.asarray(s) - 1).tolist() for s in data.train_sequences.values()]
    memory = memories(train, n, points, window_decay)
    popularity = data.train_item_counts()[1:].astype(np.float64)
    popularity /= max(popularity.max(), 1.0)
    out: dict[str, Any] = {"sasrec": {}, "memory_popularity": {}, "epochs": model.summary.epochs}
    for split in SPLITS:
        full = [(h - 1).tolist() for h in data.histories(split)]
        recent = data.histories(split, model.cfg.history_len)
        targets = data.targets(split) - 1
        probs = np.zeros((len(targets), n), dtype=np.float64)
        with torch.no_grad():
            for part in _batches(len(targets), 512):
                logits = model.item_logits(model.encode(recent[part]))
                probs[part] = torch.softmax(logits.double(), dim=-1).numpy()
        per_point = {}
        baseline = {}
        per_point[_key(points[0])] = _metrics(*dense_ranks(probs, targets, full))  # alone
        # one dense [U, N] memory at a time
        for variant, depth in dict.fromkeys((p.variant, p.depth) for p in points[1:]):
            dense = memory[variant].next_item_probabilities(full, depth, decay).toarray()
            for point in (p for p in points[1:] if (p.variant, p.depth) == (variant, depth)):
                mixed = (1.0 - point.weight) * probs + point.weight * dense
                per_point[_key(point)] = _metrics(*dense_ranks(mixed, targets, full))
            scores = dense + 1e-9 * popularity[None, :]  # the memory first
            alone = Point(1.0, depth, *variant)
            baseline[_key(alone)] = _metrics(*dense_ranks(scores, targets, full))
        out["sasrec"][split] = per_point
        out["memory_popularity"][split] = baseline
    return out


def _key(point: Point) -> str:
    """``w<weight>_d<depth>``, then ``_k<window>`` (and ``s`` when symmetric) for any memory
    but the first-order forward one, whose keys are those of the earlier reports."""
    key = f"w{point.weight:g}_d{point.depth}"
    if point.variant != (1, False):
        key += f"_k{point.window}" + ("s" if point.symmetric else "")
    return key


def choose(per_split: dict[str, Any]) -> dict[str, Any]:
    """The grid point with the best validation NDCG@10, and its test metrics."""
    valid = per_split["valid"]
    best = max(valid, key=lambda k: valid[k]["ndcg_at_10"])
    return {"point": best, "valid": valid[best], "test": per_split["test"][best]}


def choose_for_config(reports: Sequence[dict[str, Any]], system: str) -> dict[str, Any]:
    """One grid point for every seed, as a config ships it: the best mean over seeds of
    the validation NDCG@10 (ties: the earlier grid point), and each seed's test metrics
    there. KeyError when a report lacks ``system`` or the point."""
    points = reports[0]["grid"]
    mean_valid = {
        point: float(np.mean([r["systems"][system]["valid"][point]["ndcg_at_10"] for r in reports]))
        for point in points
    }
    best = max(points, key=lambda point: mean_valid[point])
    return {
        "point": best,
        "mean_valid_ndcg_at_10": mean_valid[best],
        "test": [r["systems"][system]["test"][best] for r in reports],
    }


def report_for_seed(args: argparse.Namespace) -> dict[str, Any]:
    from store_core.config import load_config

    cfg = load_config(args.config, args.overrides)
    seed = cfg.evaluation.sasrec_seeds[0] if args.seed is None else args.seed
    points = grid(args.weights, args.depths, variants(args))
    started = time.perf_counter()
    store = store_side(cfg, points, args.decay, args.window_decay)
    store_seconds = time.perf_counter() - started
    other = sasrec_side(cfg, seed, points, args.decay, args.window_decay)
    systems = {
        "store": store,
        "sasrec": other["sasrec"],
        "memory_popularity": other["memory_popularity"],
    }
    summary: dict[str, Any] = {}
    for name in ("store", "sasrec"):
        summary[f"{name}_alone"] = {
            "point": _key(points[0]),
            "test": systems[name]["test"][_key(points[0])],
        }
        summary[f"{name}_memory"] = choose(systems[name])
        if args.fixed:
            point = _key(Point(float(args.fixed[0]), int(args.fixed[1])))
            summary[f"{name}_memory_fixed"] = {"point": point, "test": systems[name]["test"][point]}
    summary["memory_popularity"] = choose(systems["memory_popularity"])
    return {
        "machine": machine_info(),
        "command": command_line("benchmarks.transition_memory"),
        "config": args.config,
        "overrides": args.overrides,
        "seed": seed,
        "decay": args.decay,
        "window_decay": args.window_decay,
        "grid": [_key(p) for p in points],
        "sasrec_epochs": other["epochs"],
        "seconds": {"store": store_seconds, "all": time.perf_counter() - started},
        "summary": summary,
        "systems": systems,
    }


ROWS = (
    ("store_alone", "STORE"),
    ("store_memory", "STORE + memory"),
    ("store_memory_config", "STORE + memory (one point, mean validation)"),
    ("store_memory_fixed", "STORE + memory (fixed)"),
    ("sasrec_alone", "SASRec-CE"),
    ("sasrec_memory", "SASRec-CE + memory"),
    ("sasrec_memory_config", "SASRec-CE + memory (one point, mean validation)"),
    ("sasrec_memory_fixed", "SASRec-CE + memory (fixed)"),
    ("memory_popularity", "memory, popularity after"),
)


def _mean_std(tests: Sequence[dict[str, float]]) -> dict[str, Any]:
    return {
        key: (
            float(np.mean([t[key] for t in tests])),
            float(np.std([t[key] for t in tests], ddof=1)) if len(tests) > 1 else 0.0,
        )
        for key in tests[0]
    }


def combine(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample std over seeds of every summary row's test metrics; the rows
    ``<system>_memory_config`` hold :func:`choose_for_config`'s one point for all seeds
    (reports without per-point ``systems`` skip them)."""
    rows: dict[str, Any] = {}
    for row, _ in ROWS:
        system = row.removesuffix("_memory_config")
        if row != system:
            if not all(system in r.get("systems", {}) for r in reports):
                continue
            chosen = choose_for_config(reports, system)
            rows[row] = _mean_std(chosen["test"])
            rows[row]["points"] = [chosen["point"]]
            continue
        if not all(row in r["summary"] for r in reports):
            continue
        rows[row] = _mean_std([r["summary"][row]["test"] for r in reports])
        rows[row]["points"] = [r["summary"][row]["point"] for r in reports]
    return {"seeds": [r["seed"] for r in reports], "rows": rows}


def markdown(combined: dict[str, Any], title: str) -> str:
    lines = [
        f"# {title}",
        "",
        f"Seeds {combined['seeds']}; test split; mean +- std over seeds; grid point per seed "
        'chosen on validation NDCG@10 ("one point" rows: one point for all seeds, the best '
        "mean validation NDCG@10).",
        "",
        "| system | R@10 kept | N@10 kept | R@10 excluded | N@10 excluded | points |",
        "|---|---|---|---|---|---|",
    ]
    for row, label in ROWS:
        if row not in combined["rows"]:
            continue
        m = combined["rows"][row]
        cells = [
            f"{m[k][0]:.4f} ± {m[k][1]:.4f}"
            for k in (
                "recall_at_10",
                "ndcg_at_10",
                "history_excluded_recall_at_10",
                "history_excluded_ndcg_at_10",
            )
        ]
        lines.append(f"| {label} | {' | '.join(cells)} | {', '.join(m['points'])} |")
    return "\n".join(lines) + "\n"


def variants(args: argparse.Namespace) -> list[tuple[int, bool]]:
    """The memory variants of the grid: (window, symmetric) for every --windows x
    --directions (window 1 forward is the first-order chain)."""
    return [(w, d == "symmetric") for w in args.windows for d in args.directions]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="scientific-quality", help="config name or path")
    parser.add_argument("--seed", type=int, default=None, help="SASRec-CE seed")
    parser.add_argument(
        "--weights",
        type=float,
        nargs="+",
        default=[0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.99],
        help="memory weights w of the grid",
    )
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3], help="depths D")
    parser.add_argument("--decay", type=float, default=0.5, help="decay d for depths > 1")
    parser.add_argument(
        "--windows", type=int, nargs="+", default=[1], help="memory windows W of the grid"
    )
    parser.add_argument(
        "--directions",
        nargs="+",
        choices=["forward", "symmetric"],
        default=["forward"],
        help="count pairs forward only and/or in both directions",
    )
    parser.add_argument(
        "--window-decay", type=float, default=0.7, help="weight decay per gap when W > 1"
    )
    parser.add_argument(
        "--fixed", nargs=2, metavar=("W", "D"), default=None, help="also report this point"
    )
    parser.add_argument("--combine", nargs="+", type=Path, default=None, help="seed reports")
    parser.add_argument("--name", default=None, help="results file stem")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where to write")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="key=value (repeatable)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run one seed, or combine seed reports (module docstring); returns what it wrote."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stem_config = Path(args.config).stem
    if args.combine:
        reports = [json.loads(path.read_text()) for path in args.combine]
        report = combine(reports)
        stem = args.name or f"transition_memory_{stem_config}"
    else:
        if args.fixed and _key(Point(float(args.fixed[0]), int(args.fixed[1]))) not in [
            _key(p) for p in grid(args.weights, args.depths, variants(args))
        ]:
            raise SystemExit("--fixed must be a point of the grid (--weights x --depths)")
        report = report_for_seed(args)
        stem = args.name or f"transition_memory_{stem_config}_seed{report['seed']}"
        report["combined"] = combine([report])
    text = markdown(report.get("combined", report), stem)
    write_results(report, f"{stem}.json", args.results_dir)
    (args.results_dir / f"{stem}.md").write_text(text, encoding="utf-8")
    print(text, flush=True)
    return report


if __name__ == "__main__":
    main()
