"""The quantizer: clustering, determinism, assignment, disambiguation, stats, persistence."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from store_core.codebook_stats import codebook_stats, plot_usage, stats_metrics
from store_core.errors import DataError
from store_core.quantizer import (
    Codebook,
    assign,
    disambiguate,
    effective_k,
    extend_disambiguation,
    fit_rqkmeans,
    fit_store,
    load_codebook,
    save_codebook,
)


def _clustered(
    n: int = 240, levels: int = 2, dim: int = 16, clusters: int = 6, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """dense [N, L, D] with well-separated clusters; truth [N, L] (independent per level)."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, clusters, size=(n, levels))
    centres = rng.normal(scale=10.0, size=(levels, clusters, dim))
    dense = np.stack([centres[lv, truth[:, lv]] for lv in range(levels)], axis=1)
    return dense + rng.normal(scale=0.1, size=dense.shape), truth


def test_fit_store_recovers_clusters() -> None:
    dense, truth = _clustered()
    cb = fit_store(dense, k=6, pca_dim=4, n_init=2, seed=0)
    assert cb.kind == "store" and cb.cluster_levels == 2 and cb.codebook_size == 6
    codes = assign(cb, dense)
    assert codes.shape == (240, 2) and codes.dtype == np.int64
    for lv in range(2):
        assert adjusted_rand_score(truth[:, lv], codes[:, lv]) == 1.0


def test_same_seed_same_codes_and_order_invariance() -> None:
    rng = np.random.default_rng(3)
    dense = rng.normal(size=(300, 2, 12))  # no cluster structure: init decides everything
    a = fit_store(dense, k=8, pca_dim=6, n_init=1, seed=5)
    b = fit_store(dense, k=8, pca_dim=6, n_init=1, seed=5)
    assert a.version == b.version
    assert np.array_equal(assign(a, dense), assign(b, dense))
    # Another order of the same catalogue: the very same codebook.
    perm = rng.permutation(300)
    c = fit_store(dense[perm], k=8, pca_dim=6, n_init=1, seed=5)
    assert c.version == a.version
    assert np.array_equal(assign(c, dense[perm]), assign(a, dense)[perm])
    # rqkmeans too.
    r1 = fit_rqkmeans(dense[:, 0], cluster_levels=2, k=8, pca_dim=6, n_init=1, seed=5)
    r2 = fit_rqkmeans(dense[perm, 0], cluster_levels=2, k=8, pca_dim=6, n_init=1, seed=5)
    assert r1.version == r2.version
    # A different seed is allowed to (and here does) give another codebook.
    assert fit_store(dense, k=8, pca_dim=6, n_init=1, seed=6).version != a.version


def test_assign_equals_fit_codes(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(4)
    dense = rng.normal(size=(200, 3, 10))
    with caplog.at_level(logging.DEBUG, logger="store_core.quantizer"):
        cb = fit_store(dense, k=16, pca_dim=5, n_init=2, seed=0)
        fit_rqkmeans(dense[:, 0], cluster_levels=3, k=16, pca_dim=None, n_init=2, seed=0)
    # fit compares k-means' own training labels with the assign rule: no differences.
    assert not [r for r in caplog.records if "labels differ" in r.getMessage()]
    codes = assign(cb, dense)
    # Each code is the nearest centroid in the projected space (brute force).
    assert cb.pca_means is not None and cb.pca_components is not None
    for lv in range(3):
        points = (dense[:, lv] - cb.pca_means[lv]) @ cb.pca_components[lv].T
        dist = ((points[:, None, :] - cb.centroids[lv][None]) ** 2).sum(-1)
        assert np.array_equal(codes[:, lv], dist.argmin(axis=1))
    # Rows are independent: any subset/order gets the same codes.
    perm = rng.permutation(200)[:50]
    assert np.array_equal(assign(cb, dense[perm]), codes[perm])
    assert assign(cb, dense[:0]).shape == (0, 3)
    with pytest.raises(ValueError, match="expects"):
        assign(cb, dense[:, :2])


def test_effective_k_cap() -> None:
    assert effective_k(4344, 256) == 256
    assert effective_k(1682, 256) == 256
    assert effective_k(100, 256) == 25
    assert effective_k(5, 256) == 2
    assert effective_k(2, 256) == 2
    with pytest.raises(ValueError):
        effective_k(1, 256)
    rng = np.random.default_rng(0)
    cb = fit_store(rng.normal(size=(40, 2, 8)), k=256, pca_dim=32, n_init=1)
    assert cb.codebook_size == 10
    assert cb.pca_components is not None and cb.pca_components[0].shape == (8, 8)  # P capped
    assert cb.centroids[0].shape == (10, 8)


def test_rqkmeans_levels_reduce_residual() -> None:
    rng = np.random.default_rng(7)
    emb = rng.normal(size=(400, 24))
    cb = fit_rqkmeans(emb, cluster_levels=3, k=16, pca_dim=12, n_init=2, seed=0)
    assert cb.kind == "rqkmeans" and cb.pca_means is not None and len(cb.pca_means) == 1
    codes = assign(cb, emb)
    assert cb.pca_components is not None
    residual = (emb - cb.pca_means[0]) @ cb.pca_components[0].T
    norms = [float(np.linalg.norm(residual, axis=1).mean())]
    for lv in range(3):
        residual = residual - cb.centroids[lv][codes[:, lv]]
        norms.append(float(np.linalg.norm(residual, axis=1).mean()))
    assert norms == sorted(norms, reverse=True) and norms[-1] < 0.9 * norms[0], norms


def test_disambiguate_unique_and_ordered() -> None:
    codes = np.array([[1, 2], [1, 2], [3, 4], [1, 2], [3, 5]])
    ids = ["c", "a", "x", "b", "y"]
    sids = disambiguate(codes, ids)
    assert sids.tolist() == [[1, 2, 2], [1, 2, 0], [3, 4, 0], [1, 2, 1], [3, 5, 0]]
    assert len({tuple(r) for r in sids.tolist()}) == 5
    # Item ids are compared as strings: "10" < "9".
    assert disambiguate(np.array([[0], [0]]), ["9", "10"])[:, 1].tolist() == [1, 0]
    with pytest.raises(ValueError, match="unique"):
        disambiguate(codes, ["a", "a", "b", "c", "d"])
    with pytest.raises(ValueError):
        disambiguate(codes, ids[:3])


def test_disambiguate_random_rows_unique() -> None:
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 3, size=(500, 2))
    sids = disambiguate(codes, [f"i{n}" for n in range(500)])
    assert len(np.unique(sids, axis=0)) == 500
    assert np.array_equal(sids[:, :2], codes)
    stats = codebook_stats(codes, 3)
    assert stats["disambiguation_levels_needed"] == int(sids[:, -1].max()) + 1


def test_extend_disambiguation_next_free() -> None:
    existing = np.array([[1, 2, 0], [1, 2, 1], [1, 2, 5], [3, 4, 0]])
    new = np.array([[1, 2], [7, 7], [3, 4], [1, 2]])
    out = extend_disambiguation(existing, new, ["n2", "n1", "n3", "n0"])
    assert out.tolist() == [[1, 2, 7], [7, 7, 0], [3, 4, 1], [1, 2, 6]]
    union = np.concatenate([existing, out])
    assert len(np.unique(union, axis=0)) == len(union)
    assert extend_disambiguation(existing, new[:0], []).shape == (0, 3)
    with pytest.raises(ValueError, match="levels"):
        extend_disambiguation(existing[:, :2], new, ["a", "b", "c", "d"])


def test_codebook_stats_hand_made(caplog: pytest.LogCaptureFixture) -> None:
    codes = np.array([[0, 0], [0, 0], [1, 0], [1, 0], [2, 1], [2, 1], [3, 2], [3, 3]])
    stats = codebook_stats(codes, 4)
    json.dumps(stats)  # plain types only
    assert stats["collision_rate"] == 0.75
    assert stats["colliding_ids"] == 3
    assert stats["max_items_per_id"] == 2
    assert stats["unique_ids_before_disambiguation"] == 5
    assert stats["disambiguation_levels_needed"] == 2
    lv0, lv1 = stats["levels"]
    assert lv0["codes_used"] == 4 and lv0["usage_fraction"] == 1.0
    assert lv0["perplexity"] == pytest.approx(4.0, rel=1e-12)  # uniform level: exactly K
    assert lv1["perplexity"] == pytest.approx(2**1.75, rel=1e-12)
    flat = stats_metrics(stats)
    assert flat["level_1_codes_used"] == 4.0 and flat["collision_rate"] == 0.75
    # A collapsed level is reported and warned about, not silent.
    with caplog.at_level(logging.WARNING, logger="store_core.codebook_stats"):
        collapsed = codebook_stats(np.array([[0, 1], [0, 2], [0, 3], [0, 0]]), 8)
    assert collapsed["levels"][0]["perplexity"] == 1.0
    assert collapsed["levels"][0]["codes_used"] == 1
    assert collapsed["collision_rate"] == 0.0
    assert any("collapsed" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError):
        codebook_stats(np.array([[0, 4]]), 4)


def test_save_load_round_trip(tmp_path: Path) -> None:
    dense, _ = _clustered(n=120, levels=3, dim=10)
    for cb, x in (
        (fit_store(dense, k=6, pca_dim=4, n_init=1), dense),
        (fit_store(dense, k=6, pca_dim=None, n_init=1), dense),
        (fit_rqkmeans(dense[:, 0], cluster_levels=2, k=6, pca_dim=4, n_init=1), dense[:, 0]),
    ):
        target = tmp_path / cb.version
        save_codebook(cb, target)
        assert sorted(p.name for p in target.iterdir()) == ["codebook.json", "codebook.safetensors"]
        loaded = load_codebook(target)
        assert loaded.version == cb.version
        assert (loaded.kind, loaded.cluster_levels, loaded.codebook_size) == (
            cb.kind,
            cb.cluster_levels,
            cb.codebook_size,
        )
        assert np.array_equal(assign(loaded, x), assign(cb, x))
        for name, array in cb.arrays().items():
            assert np.array_equal(loaded.arrays()[name], array)


def test_load_reads_a_header_written_before_the_rename(tmp_path: Path) -> None:
    """Codebooks of older releases name L ``num_levels`` in ``codebook.json``: they load."""
    dense, _ = _clustered(n=60, levels=2, dim=6)
    cb = fit_store(dense, k=4, pca_dim=3, n_init=1)
    save_codebook(cb, tmp_path / "cb")
    path = tmp_path / "cb" / "codebook.json"
    header = json.loads(path.read_text())
    header["num_levels"] = header.pop("cluster_levels")
    path.write_text(json.dumps(header))
    loaded = load_codebook(tmp_path / "cb")
    assert (loaded.version, loaded.cluster_levels) == (cb.version, 2)


def test_load_rejects_broken(tmp_path: Path, clean_memory_fs: None) -> None:
    dense, _ = _clustered(n=60, levels=2, dim=6)
    cb = fit_store(dense, k=4, pca_dim=3, n_init=1)
    save_codebook(cb, "memory://cb")  # fsspec URIs work too
    assert load_codebook("memory://cb").version == cb.version
    with pytest.raises(DataError, match="missing"):
        load_codebook(tmp_path / "nowhere")
    save_codebook(cb, tmp_path / "cb")
    header = json.loads((tmp_path / "cb" / "codebook.json").read_text())
    header["version"] = "0" * 16
    (tmp_path / "cb" / "codebook.json").write_text(json.dumps(header))
    with pytest.raises(DataError, match="hash"):
        load_codebook(tmp_path / "cb")


def test_codebook_is_immutable() -> None:
    dense, _ = _clustered(n=60, levels=1, dim=6)
    cb = fit_store(dense, k=4, pca_dim=3, n_init=1)
    with pytest.raises(ValueError):
        cb.centroids[0][0, 0] = 1.0
    with pytest.raises(ValueError, match="centroids"):
        Codebook("store", 1, 5, 6, cb.pca_means, cb.pca_components, cb.centroids)


def test_plot_usage(tmp_path: Path) -> None:
    codes = np.random.default_rng(0).integers(0, 8, size=(100, 3))
    path = tmp_path / "usage.png"
    plot_usage(codes, 8, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="3-D"):
        fit_store(np.zeros((10, 4)), k=2)
    with pytest.raises(ValueError, match="NaN"):
        fit_store(np.full((10, 2, 3), np.nan), k=2)
    with pytest.raises(ValueError):
        fit_rqkmeans(np.zeros((10, 4)), cluster_levels=0, k=2)


def test_minibatch_above_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    import store_core.quantizer as quantizer

    monkeypatch.setattr(quantizer, "MINIBATCH_THRESHOLD", 100)
    dense, truth = _clustered(n=400, levels=1, dim=8, clusters=5)
    cb = fit_store(dense, k=5, pca_dim=4, n_init=2, seed=0)
    codes = assign(cb, dense)
    assert adjusted_rand_score(truth[:, 0], codes[:, 0]) == 1.0
    assert cb.version == fit_store(dense[::-1], k=5, pca_dim=4, n_init=2, seed=0).version
