"""Capacity-constrained last level: fewer shared code groups, same first codes, exact optimum."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from store_core.codebook_stats import codebook_stats
from store_core.config import SemanticIdConfig
from store_core.last_level_assignment import assign_codes, capacity_last_codes, level_distances
from store_core.quantizer import assign, disambiguate, fit_rqkmeans, fit_store


def _colliding(n: int = 120, seed: int = 0) -> np.ndarray:
    """dense [N, 3, 8]: 6 topics; every position of an item is the same vector (+ tiny noise).

    The three positions carry the same information, so with nearest centroids items
    that fall in one cluster at level 1 fall in one cluster at every level and share all
    three codes: a deliberately colliding catalogue (as Phase A's correlated positions).
    """
    rng = np.random.default_rng(seed)
    topics = rng.normal(scale=10.0, size=(6, 8))
    item = topics[rng.integers(0, 6, size=n)] + rng.normal(size=(n, 8))  # [N, 8]
    dense = np.repeat(item[:, None, :], 3, axis=1)  # [N, 3, 8]
    return dense + rng.normal(scale=0.01, size=dense.shape)


def test_nearest_collides_capacity_does_not() -> None:
    dense = _colliding()
    cb = fit_store(dense, k=30, pca_dim=4, n_init=2, seed=0)
    nearest = assign_codes(cb, dense, "nearest")
    assert np.array_equal(nearest, assign(cb, dense))
    assert codebook_stats(nearest, cb.codebook_size)["collision_rate"] > 0.5
    codes = assign_codes(cb, dense, "capacity")
    stats = codebook_stats(codes, cb.codebook_size)
    assert stats["collision_rate"] == 0.0 and stats["max_items_per_id"] == 1
    assert codes.dtype == np.int64 and codes.min() >= 0 and codes.max() < cb.codebook_size
    # The first L-1 levels are untouched, and so the IDs need no disambiguation.
    assert np.array_equal(codes[:, :2], nearest[:, :2])
    assert disambiguate(codes, [f"i{i}" for i in range(len(codes))])[:, 3].max() == 0


def test_capacity_is_exact_optimum_and_respected() -> None:
    rng = np.random.default_rng(1)
    dist = rng.random(size=(5, 4))  # one group of 5 items, K = 4
    dist[:, 0] = 0.0  # everyone's nearest code is 0
    prefixes = np.zeros((5, 0), dtype=np.int64)
    codes = capacity_last_codes(dist, prefixes, capacity=2)
    assert np.bincount(codes, minlength=4).max() <= 2
    best = min(
        sum(dist[i, c] for i, c in enumerate(choice))
        for choice in itertools.product(range(4), repeat=5)
        if np.bincount(choice, minlength=4).max() <= 2
    )
    assert dist[np.arange(5), codes].sum() == pytest.approx(best)


def test_groups_are_independent_and_oversized_groups_still_assigned() -> None:
    dist = np.tile(np.array([0.0, 1.0, 2.0]), (7, 1))  # all prefer code 0, K = 3
    prefixes = np.array([[0], [0], [1], [1], [1], [1], [1]])
    codes = capacity_last_codes(dist, prefixes, capacity=1)
    assert sorted(codes[:2].tolist()) == [0, 1]  # group 0: two items, two codes
    # Group 1 has 5 items for 3 codes: the capacity rises to ceil(5 / 3) = 2.
    assert np.bincount(codes[2:], minlength=3).tolist() == [2, 2, 1]


def test_unique_items_keep_nearest_codes() -> None:
    rng = np.random.default_rng(2)
    dist = rng.random(size=(10, 16))
    prefixes = np.arange(10)[:, None]  # every item alone in its group
    assert np.array_equal(capacity_last_codes(dist, prefixes), dist.argmin(axis=1))


def test_deterministic_and_independent_of_row_order() -> None:
    dense = _colliding(seed=3)
    cb = fit_store(dense, k=30, pca_dim=4, n_init=1, seed=5)
    a = assign_codes(cb, dense, "capacity")
    assert np.array_equal(a, assign_codes(cb, dense, "capacity"))
    perm = np.random.default_rng(4).permutation(len(dense))
    assert np.array_equal(assign_codes(cb, dense[perm], "capacity"), a[perm])


def test_level_distances_match_assign_for_both_quantizers() -> None:
    dense = _colliding(seed=6)
    store = fit_store(dense, k=12, pca_dim=4, n_init=1)
    rq = fit_rqkmeans(dense[:, 0], cluster_levels=3, k=12, pca_dim=4, n_init=1)
    for cb, x in ((store, dense), (rq, dense[:, 0])):
        codes = assign(cb, x)
        for level in range(3):
            dist = level_distances(cb, x, codes, level)
            assert dist.shape == (len(x), 12) and (dist >= 0).all()
            assert np.array_equal(dist.argmin(axis=1), codes[:, level])
    rq_codes = assign_codes(rq, dense[:, 0], "capacity")
    assert codebook_stats(rq_codes, 12)["collision_rate"] == 0.0


def test_bad_arguments_raise() -> None:
    dense = _colliding(n=40)
    cb = fit_store(dense, k=5, pca_dim=3, n_init=1)
    with pytest.raises(ValueError, match="method"):
        assign_codes(cb, dense, "balanced")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="capacity"):
        capacity_last_codes(np.zeros((3, 2)), np.zeros((3, 1), dtype=np.int64), capacity=0)
    with pytest.raises(ValueError, match="prefixes"):
        capacity_last_codes(np.zeros((3, 2)), np.zeros((2, 1), dtype=np.int64))
    with pytest.raises(ValueError, match="level"):
        level_distances(cb, dense, assign(cb, dense), 3)
    with pytest.raises(ValueError, match="shape"):
        level_distances(cb, dense[:, :2], assign(cb, dense), 0)


def test_config_default_and_validation() -> None:
    cfg = SemanticIdConfig()
    assert cfg.last_level_assignment == "capacity" and cfg.last_level_capacity == 1
    with pytest.raises(ValueError):
        SemanticIdConfig(last_level_capacity=0)
    with pytest.raises(ValueError):
        SemanticIdConfig.model_validate({"last_level_assignment": "sinkhorn"})
