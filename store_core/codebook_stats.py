"""Codebook health: collisions, per-level usage and perplexity, and the usage plot.

Other generative-recommendation projects' codebooks "collapse or collide silently"
(docs/EVALUATION.md); these statistics are computed and logged on every clustering so
that never goes unnoticed here.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import fsspec
import numpy as np

from store_core.quantizer import _check_codes

logger = logging.getLogger(__name__)

#: codebook_stats warns when a level uses less than this fraction of its K codes ...
COLLAPSE_USAGE_FRACTION = 0.5
#: ... or when more than this fraction of items share their L-code tuple with another.
COLLISION_WARN_RATE = 0.1


def codebook_stats(codes: np.ndarray, k: int) -> dict[str, Any]:
    """Collision and usage statistics of cluster codes [N, L] (before disambiguation).

    Returns plain ints/floats (JSON-serialisable):

    - ``collision_rate``: fraction of items whose L-code tuple is shared with another item.
    - ``colliding_ids``: number of distinct L-code tuples held by 2 or more items.
    - ``max_items_per_id``, ``unique_ids_before_disambiguation``.
    - ``disambiguation_levels_needed``: codes the last level needs (its max code + 1 after
      :func:`disambiguate`), equal to ``max_items_per_id``.
    - ``levels``: per level ``codes_used``, ``usage_fraction`` (= used / K) and
      ``perplexity`` (exp of the entropy of the code distribution: K for a uniform level,
      1 for a collapsed one).

    Logs a warning when a level uses under :data:`COLLAPSE_USAGE_FRACTION` of its codes or
    the collision rate exceeds :data:`COLLISION_WARN_RATE`.
    """
    arr = _check_codes(codes, "codes")  # [N, L]
    n, cluster_levels = arr.shape
    if n == 0:
        raise ValueError("codebook_stats needs at least one item")
    if arr.max() >= k:
        raise ValueError(f"codes must be < K={k}, found {int(arr.max())}")
    _, inverse, counts = np.unique(arr, axis=0, return_inverse=True, return_counts=True)
    shared = counts[inverse.reshape(-1)] > 1  # [N]
    levels: list[dict[str, Any]] = []
    for level in range(cluster_levels):
        freq = np.bincount(arr[:, level], minlength=k)  # [K]
        p = freq[freq > 0] / n
        entropy = float(-(p * np.log(p)).sum())
        used = int((freq > 0).sum())
        levels.append(
            {
                "level": level,
                "codes_used": used,
                "usage_fraction": used / k,
                "perplexity": float(np.exp(entropy)),
            }
        )
    stats: dict[str, Any] = {
        "num_items": int(n),
        "cluster_levels": int(cluster_levels),
        "codebook_size": int(k),
        "collision_rate": float(shared.mean()),
        "colliding_ids": int((counts > 1).sum()),
        "max_items_per_id": int(counts.max()),
        "unique_ids_before_disambiguation": len(counts),
        "disambiguation_levels_needed": int(counts.max()),
        "levels": levels,
    }
    for lv in levels:
        if lv["usage_fraction"] < COLLAPSE_USAGE_FRACTION:
            logger.warning(
                "codebook level %d collapsed: uses %d of %d codes (perplexity %.1f)",
                lv["level"],
                lv["codes_used"],
                k,
                lv["perplexity"],
            )
    if stats["collision_rate"] > COLLISION_WARN_RATE:
        logger.warning(
            "codebook collisions: %.1f%% of items share their %d codes (up to %d per ID)",
            100 * stats["collision_rate"],
            cluster_levels,
            stats["max_items_per_id"],
        )
    return stats


def stats_metrics(stats: dict[str, Any]) -> dict[str, float]:
    """Flatten :func:`codebook_stats` into ``name -> number`` (e.g. for MLflow metrics)."""
    flat = {key: float(value) for key, value in stats.items() if key != "levels"}
    for lv in stats["levels"]:
        for key in ("codes_used", "usage_fraction", "perplexity"):
            flat[f"level_{lv['level']}_{key}"] = float(lv[key])
    return flat


def plot_usage(codes: np.ndarray, k: int, path: str | Path) -> None:
    """Write a PNG with one bar chart per level: code frequencies, most used first.

    codes: [N, L]. A flat bar chart is a healthy level; a few tall bars then zeros is a
    collapsed one. ``path`` is a local path or fsspec URI.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    arr = _check_codes(codes, "codes")
    cluster_levels = arr.shape[1]
    fig = Figure(figsize=(4.0 * cluster_levels, 3.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, cluster_levels, squeeze=False)[0]
    for level, ax in enumerate(axes):
        freq = np.sort(np.bincount(arr[:, level], minlength=k))[::-1]
        p = freq[freq > 0] / max(1, arr.shape[0])
        perplexity = float(np.exp(-(p * np.log(p)).sum())) if p.size else 0.0
        ax.bar(np.arange(len(freq)), freq, width=1.0)
        ax.set_title(
            f"level {level}: {int((freq > 0).sum())}/{k} codes, ppl {perplexity:.1f}", fontsize=9
        )
        ax.set_xlabel("code (sorted by frequency)")
        ax.set_ylabel("items")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    with fsspec.open(str(path), "wb") as handle:
        handle.write(buffer.getvalue())
    logger.info("wrote codebook usage plot %s", path)


# --------------------------------------------------------------------------- persistence
