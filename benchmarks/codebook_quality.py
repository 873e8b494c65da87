"""Cluster-only quality of semantic IDs: each last-level assignment on the same dense tokens.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.codebook_quality \\
        --config scientific-quality --set workspace=/path/to/workspace --seeds 0 1 2

Needs Phase A done in the workspace (``store train --phase tokenizer``): loads the model
of ``<workspace>/models/tokenizer-store``, extracts every item's dense tokens once (and
the mean text embedding for the TIGER-style rows), then for each k-means seed fits the
codebook and compares, side by side on the very same vectors:

- ``nearest``: every level takes its nearest centroid (the method before issue 13);
- ``capacity`` / ``capacity-2``: the last level chosen under a per-prefix capacity of 1
  / 2 items per code (:mod:`store_core.last_level_assignment`, exact assignment per
  group of equal first L-1 codes);
- ``sinkhorn``: LC-Rec's own recipe (Zheng et al., ICDE 2024, sec. III-A-2): the items
  that still collide get their last code from a Sinkhorn-Knopp balanced soft assignment
  over all K codes (epsilon 0.003 on min-max-centred distances, 50 iterations, as in
  LC-Rec's released RQ-VAE), repeated on the remaining colliding items up to 20 rounds;
- ``rqkmeans-nearest`` / ``rqkmeans-capacity``: the residual k-means baseline (mean
  text embedding), the same two rules;
- ``rqdense-nearest`` / ``rqdense-capacity``: "each level clusters the residual of the
  previous ones" on STORE's own dense tokens: residual k-means over the L dense tokens
  concatenated ([N, L*D]), the same two rules.

Per method: the share of items whose first L codes are shared (``collision_rate``), the
largest such group, codes used and perplexity per level (:func:`codebook_stats`), the
first-code coherence (:func:`semantic_coherence`: leaf-category match and TF-IDF text
similarity of item pairs sharing the first code vs random pairs, as ``stats.json``
reports it), the same on the last code alone (does it still mean something after
reassignment?), and how far the last level moved from the nearest centroids (share of
items moved, mean squared distance / mean nearest squared distance). Writes
benchmarks/results/codebook_quality_<config>.json (or <--name>.json) and prints a table.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import command_line, machine_info, write_results
from store_core import quantizer as q
from store_core.codebook_stats import codebook_stats
from store_core.coherence import semantic_coherence
from store_core.last_level_assignment import assign_codes, level_distances

logger = logging.getLogger(__name__)

#: LC-Rec's released settings for the last level's Sinkhorn step (rqvae sk_epsilons[-1],
#: sk_iters) and its cap on collision-resolving rounds.
SINKHORN_EPSILON = 0.003
SINKHORN_ITERS = 50
SINKHORN_ROUNDS = 20


def sinkhorn_balanced(distances: np.ndarray, epsilon: float, iters: int) -> np.ndarray:
    """LC-Rec's Sinkhorn-Knopp step: [M, K] distances -> [M] codes of a balanced plan.

    Distances are min-max centred to [-0.5, 0.5] first, then the plan exp(-d / eps) is
    rescaled alternately to K columns of mass 1/K and M rows of mass 1/M (log domain);
    each row's code is its argmax.
    """
    d = distances - (distances.max() + distances.min()) / 2
    d = d / max(float(distances.max() - distances.min()), 1e-12)
    log_q = -d / epsilon  # [M, K]
    m, k = log_q.shape
    for _ in range(iters):
        log_q -= np.logaddexp.reduce(log_q, axis=0, keepdims=True) + np.log(k)
        log_q -= np.logaddexp.reduce(log_q, axis=1, keepdims=True) + np.log(m)
    return np.argmax(log_q, axis=1).astype(np.int64)


def sinkhorn_codes(codebook: q.Codebook, x: np.ndarray) -> np.ndarray:
    """Codes [N, L]: nearest, then LC-Rec's Sinkhorn rounds on the colliding items' last level."""
    codes = q.assign(codebook, x)  # [N, L]
    last = codebook.cluster_levels - 1
    dist = level_distances(codebook, x, codes, last)  # [N, K]
    for _ in range(SINKHORN_ROUNDS):
        _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
        colliding = np.flatnonzero(counts[inverse.reshape(-1)] > 1)
        if colliding.size == 0:
            break
        codes[colliding, last] = sinkhorn_balanced(
            dist[colliding], SINKHORN_EPSILON, SINKHORN_ITERS
        )
    return codes


def method_report(
    codebook: q.Codebook,
    x: np.ndarray,
    codes: np.ndarray,
    texts: Sequence[str],
    categories: Sequence[frozenset[str]] | None,
    seed: int,
) -> dict[str, Any]:
    """Collision, usage, coherence and distortion figures of one set of codes [N, L]."""
    stats = codebook_stats(codes, codebook.codebook_size)
    last = codebook.cluster_levels - 1
    dist = level_distances(codebook, x, codes, last)  # [N, K]
    rows = np.arange(len(codes))
    nearest = dist.min(axis=1)
    first = semantic_coherence(texts, categories, codes, prefix_len=1, seed=seed)
    last_code = semantic_coherence(texts, categories, codes[:, last:], prefix_len=1, seed=seed)
    keep = (
        "same_prefix_category_match",
        "random_category_match",
        "category_match_ratio",
        "same_prefix_text_sim",
        "random_text_sim",
        "text_sim_ratio",
    )
    return {
        "items_sharing_group": stats["collision_rate"],
        "largest_group": stats["max_items_per_id"],
        "code_groups": stats["unique_ids_before_disambiguation"],
        "levels": stats["levels"],
        "perplexity": [round(lv["perplexity"], 1) for lv in stats["levels"]],
        "first_code": {key: first[key] for key in keep if key in first},
        "last_code": {key: last_code[key] for key in keep if key in last_code},
        "last_level_moved": float((codes[:, last] != dist.argmin(axis=1)).mean()),
        "last_level_distortion": float(dist[rows, codes[:, last]].mean() / nearest.mean()),
    }


def extract_vectors(cfg: Any, cache: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """Dense tokens [N, L, D] and text embeddings [N, D] of the catalogue (cached as .npz)."""
    if cache is not None and cache.is_file():
        with np.load(cache) as data:
            return data["dense"], data["embedding"]
    from store_core.dense_tokens import extract_dense, extract_text_embedding
    from store_core.item_tokenizer import checkpoint_dir
    from store_core.model import load_checkpoint

    store_cfg = cfg.model_copy(
        update={"semantic_id": cfg.semantic_id.model_copy(update={"quantizer": "store"})}
    )
    model, tokenizer = load_checkpoint(checkpoint_dir(store_cfg))
    model.eval()
    texts = _items(cfg)[1]
    extract = {
        "max_text_tokens": cfg.model.max_text_tokens,
        "num_query_tokens": cfg.semantic_id.cluster_levels,
        "progress": False,
    }
    dense = extract_dense(model, tokenizer, texts, **extract)
    embedding = extract_text_embedding(model, tokenizer, texts, **extract)
    if cache is not None:
        np.savez(cache, dense=dense, embedding=embedding)
    return dense, embedding


def _items(cfg: Any) -> tuple[list[str], list[str], list[frozenset[str]] | None]:
    from store_core.coherence import category_sets
    from store_core.data_files import read_items

    items = read_items(cfg.data_dir)
    fields = [dict(pairs) for pairs in items.column("fields").to_pylist()]
    cats = category_sets(fields)
    return (
        items.column("item_id").to_pylist(),
        items.column("text").to_pylist(),
        cats if any(cats) else None,
    )


Method = Callable[[q.Codebook, np.ndarray], np.ndarray]
METHODS: dict[str, tuple[str, Method]] = {
    "nearest": ("store", lambda cb, x: assign_codes(cb, x, "nearest")),
    "capacity": ("store", lambda cb, x: assign_codes(cb, x, "capacity")),
    "capacity-2": ("store", lambda cb, x: assign_codes(cb, x, "capacity", capacity=2)),
    "sinkhorn": ("store", sinkhorn_codes),
    "rqkmeans-nearest": ("rqkmeans", lambda cb, x: assign_codes(cb, x, "nearest")),
    "rqkmeans-capacity": ("rqkmeans", lambda cb, x: assign_codes(cb, x, "capacity")),
    "rqdense-nearest": ("rqdense", lambda cb, x: assign_codes(cb, x, "nearest")),
    "rqdense-capacity": ("rqdense", lambda cb, x: assign_codes(cb, x, "capacity")),
}


def compare(
    cfg: Any,
    dense: np.ndarray,
    embedding: np.ndarray,
    seeds: Sequence[int],
    methods: Sequence[str],
) -> dict[str, Any]:
    """Every method's :func:`method_report` for every k-means seed: {seed: {method: ...}}."""
    _, texts, categories = _items(cfg)
    sid = cfg.semantic_id
    vectors = {"store": dense, "rqkmeans": embedding, "rqdense": dense.reshape(len(dense), -1)}
    kinds = {METHODS[m][0] for m in methods}
    out: dict[str, Any] = {}
    for seed in seeds:
        books: dict[str, q.Codebook] = {}
        if "store" in kinds:
            books["store"] = q.fit_store(
                dense, sid.codebook_size, sid.pca_dim, sid.kmeans_n_init, seed
            )
        for kind in kinds - {"store"}:
            books[kind] = q.fit_rqkmeans(
                vectors[kind],
                sid.cluster_levels,
                sid.codebook_size,
                sid.pca_dim,
                sid.kmeans_n_init,
                seed,
            )
        out[str(seed)] = {}
        for name in methods:
            kind, method = METHODS[name]
            x = vectors[kind]
            started = time.perf_counter()
            codes = method(books[kind], x)
            seconds = time.perf_counter() - started
            report = method_report(books[kind], x, codes, texts, categories, seed)
            out[str(seed)][name] = {"assign_seconds": round(seconds, 3), **report}
    return out


def summary_table(results: dict[str, Any]) -> str:
    """Markdown table: one row per seed and method."""
    lines = [
        "| seed | method | items sharing group | largest group | perplexity per level "
        "| first-code leaf match (random) | last-code leaf match | last level moved |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for seed, methods in results.items():
        for name, r in methods.items():
            first, last = r["first_code"], r["last_code"]
            lines.append(
                f"| {seed} | {name} | {r['items_sharing_group']:.3f} | {r['largest_group']} "
                f"| {' / '.join(str(p) for p in r['perplexity'])} "
                f"| {first.get('same_prefix_category_match', float('nan')):.3f} "
                f"({first.get('random_category_match', float('nan')):.3f}) "
                f"| {last.get('same_prefix_category_match', float('nan')):.3f} "
                f"| {r['last_level_moved']:.3f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="scientific-quality", help="config name or path")
    parser.add_argument("--name", default=None, help="results file stem")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="k-means seeds")
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods"
    )
    parser.add_argument("--cache", type=Path, default=None, help=".npz cache of the vectors")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="key=value (repeatable)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from store_core.config import load_config

    cfg = load_config(args.config, args.overrides)
    dense, embedding = extract_vectors(cfg, args.cache)
    results = compare(cfg, dense, embedding, args.seeds, args.methods)
    table = summary_table(results)
    report: dict[str, Any] = {
        "machine": machine_info(),
        "config": args.config,
        "overrides": args.overrides,
        "command": command_line("benchmarks.codebook_quality"),
        "num_items": int(dense.shape[0]),
        "cluster_levels": int(cfg.semantic_id.cluster_levels),
        "codebook_size": int(cfg.semantic_id.codebook_size),
        "results": results,
        "table": table,
    }
    print(table, flush=True)
    write_results(report, f"{args.name or 'codebook_quality_' + Path(args.config).stem}.json")


if __name__ == "__main__":
    main()
