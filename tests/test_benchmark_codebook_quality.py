"""benchmarks/codebook_quality.py: the candidates side by side on the same vectors."""

from __future__ import annotations

import numpy as np

from benchmarks.codebook_quality import (
    method_report,
    sinkhorn_balanced,
    sinkhorn_codes,
    summary_table,
)
from store_core.last_level_assignment import assign_codes
from store_core.quantizer import fit_store


def _catalogue(n: int = 96, seed: int = 0) -> tuple[np.ndarray, list[str], list[frozenset[str]]]:
    """dense [N, 2, 6] from 4 topics (same vector at both positions), texts and categories."""
    rng = np.random.default_rng(seed)
    topic = rng.integers(0, 4, size=n)
    item = rng.normal(scale=8.0, size=(4, 6))[topic] + rng.normal(size=(n, 6))
    dense = np.repeat(item[:, None, :], 2, axis=1) + rng.normal(scale=0.01, size=(n, 2, 6))
    words = ["resistor ohm", "beaker glass", "caliper steel", "pipette tip"]
    texts = [f"{words[t]} item {i}" for i, t in enumerate(topic.tolist())]
    return dense, texts, [frozenset({f"topic{t}"}) for t in topic.tolist()]


def test_sinkhorn_balanced_spreads_items_over_codes() -> None:
    dist = np.random.default_rng(0).random(size=(40, 8))
    dist[:, 0] -= 1.0  # every item's nearest code is 0
    codes = sinkhorn_balanced(dist, epsilon=0.003, iters=50)
    assert np.bincount(codes, minlength=8).max() <= 10  # ~5 per code, not 40 on code 0


def test_reports_side_by_side() -> None:
    dense, texts, cats = _catalogue()
    cb = fit_store(dense, k=24, pca_dim=3, n_init=1, seed=0)
    reports = {
        "nearest": method_report(cb, dense, assign_codes(cb, dense, "nearest"), texts, cats, 0),
        "capacity": method_report(cb, dense, assign_codes(cb, dense, "capacity"), texts, cats, 0),
        "sinkhorn": method_report(cb, dense, sinkhorn_codes(cb, dense), texts, cats, 0),
    }
    near, cap = reports["nearest"], reports["capacity"]
    assert near["items_sharing_group"] > 0.3 and near["last_level_moved"] == 0.0
    assert cap["items_sharing_group"] == 0.0 and cap["largest_group"] == 1
    assert reports["sinkhorn"]["items_sharing_group"] < near["items_sharing_group"]
    assert cap["first_code"] == near["first_code"]  # first level untouched
    assert cap["last_level_distortion"] >= 1.0 and 0 < cap["last_level_moved"] < 1
    assert len(cap["perplexity"]) == 2
    table = summary_table({"0": reports})
    assert table.count("\n") == 4 and "| 0 | capacity | 0.000 | 1 |" in table
