"""Clustering dense vectors into discrete codes: the codebook behind every semantic ID.

Two quantizers share one :class:`Codebook` format:

- ``store`` (the paper): the LLM's L dense tokens z1..zL of an item are clustered
  independently per position - PCA, then k-means into K codes - giving codes c1..cL.
- ``rqkmeans`` (TIGER-style baseline): one text embedding, PCA once, then residual
  k-means: level 1 clusters x, level 2 clusters x - centroid(level 1), and so on.

Why scikit-learn rather than our own k-means or faiss: its ``PCA``/``KMeans`` are
well-kept and well-tested, k-means++ with ``n_init`` restarts is the standard recipe, and
with a fixed ``random_state`` the result is deterministic. We never pickle the estimators:
a codebook is just arrays (PCA mean and components, centroids) that we save ourselves with
safetensors plus a JSON header, so a codebook can be read without scikit-learn, without
executing code, and by any later version of this project. ``MiniBatchKMeans`` is used
automatically above :data:`MINIBATCH_THRESHOLD` points, where full Lloyd iterations
with restarts get slow on a CPU.

Determinism and one definition of a code:

- Inputs are put into a canonical row order (by their bytes) before PCA and k-means, so
  the codebook - and its :attr:`Codebook.version` - depends on the *set* of vectors and
  the seed, not on the order the catalogue happened to be read in.
- An item's code is always the nearest centroid computed by :func:`assign` (ties go to
  the lower code). ``fit_*`` derive the training codes, and for ``rqkmeans`` the
  residuals of the next level, with the very same function, so ``assign`` on the training
  data reproduces exactly the codes the codebook was fitted with.

After clustering, :func:`disambiguate` appends the last level that makes every semantic ID
unique, and :mod:`store_core.codebook_stats` reports collisions and per-level usage: a
codebook that collapses (few codes used) or collides (many items per ID) must be visible in every
run's metrics, never silent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args

import fsspec
import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning

from store_core.errors import DataError

logger = logging.getLogger(__name__)

QuantizerKind = Literal["store", "rqkmeans"]

#: Above this many points per level, k-means runs as MiniBatchKMeans.
MINIBATCH_THRESHOLD = 50_000
#: Rows per block when projecting / finding nearest centroids (bounds temporary memory).
_CHUNK = 65_536
#: Files of a saved codebook.
ARRAYS_FILE = "codebook.safetensors"
HEADER_FILE = "codebook.json"
_FORMAT = 1


@dataclass(frozen=True, eq=False)
class Codebook:
    """A fitted quantizer: arrays only, no estimator objects.

    ``store`` has one PCA transform per level; ``rqkmeans`` has a single transform shared
    by all levels. Arrays are float64, C-contiguous and read-only.
    """

    kind: QuantizerKind
    """'store' (per-position PCA + k-means) or 'rqkmeans' (residual k-means)."""
    cluster_levels: int
    """L: cluster levels (codes per item before disambiguation)."""
    codebook_size: int
    """K actually used (after :func:`effective_k`): codes per level."""
    input_dim: int
    """D: dimension of the input vectors."""
    pca_means: tuple[np.ndarray, ...] | None
    """Per transform: [D] mean subtracted before projection; None when PCA is off."""
    pca_components: tuple[np.ndarray, ...] | None
    """Per transform: [P, D] principal axes (rows); None when PCA is off (P = D)."""
    centroids: tuple[np.ndarray, ...]
    """Per level: [K, P] cluster centres in the projected space."""
    version: str = field(init=False)
    """Content hash: first 16 hex chars of sha256 over kind, sizes and every array."""

    def __post_init__(self) -> None:
        if self.kind not in get_args(QuantizerKind):
            raise ValueError(f"kind must be one of {get_args(QuantizerKind)}, got {self.kind!r}")
        if self.cluster_levels < 1 or self.codebook_size < 1 or self.input_dim < 1:
            raise ValueError("cluster_levels, codebook_size and input_dim must be >= 1")
        if len(self.centroids) != self.cluster_levels:
            raise ValueError(
                f"{len(self.centroids)} centroid arrays for {self.cluster_levels} levels"
            )
        if (self.pca_means is None) != (self.pca_components is None):
            raise ValueError("pca_means and pca_components must both be set or both be None")
        transforms = self.cluster_levels if self.kind == "store" else 1
        proj_dims = [self.input_dim] * transforms
        if self.pca_means is not None and self.pca_components is not None:
            if len(self.pca_means) != transforms or len(self.pca_components) != transforms:
                raise ValueError(f"a {self.kind!r} codebook needs {transforms} PCA transform(s)")
            means = tuple(_frozen(m) for m in self.pca_means)
            comps = tuple(_frozen(c) for c in self.pca_components)
            for mean, comp in zip(means, comps, strict=True):
                if mean.shape != (self.input_dim,) or comp.ndim != 2:
                    raise ValueError(f"PCA mean {mean.shape} / components {comp.shape} bad")
                if comp.shape[1] != self.input_dim:
                    raise ValueError(f"PCA components {comp.shape} do not match D")
            proj_dims = [c.shape[0] for c in comps]
            object.__setattr__(self, "pca_means", means)
            object.__setattr__(self, "pca_components", comps)
        cents = tuple(_frozen(c) for c in self.centroids)
        for level, cent in enumerate(cents):
            dim = proj_dims[level if self.kind == "store" else 0]
            if cent.shape != (self.codebook_size, dim):
                raise ValueError(
                    f"level {level} centroids have shape {cent.shape}, "
                    f"expected ({self.codebook_size}, {dim})"
                )
        object.__setattr__(self, "centroids", cents)
        object.__setattr__(self, "version", _content_hash(self))

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array by its saved name (``pca_mean.i``, ``pca_components.i``, ``centroids.l``)."""
        out: dict[str, np.ndarray] = {}
        if self.pca_means is not None and self.pca_components is not None:
            for i, (mean, comp) in enumerate(zip(self.pca_means, self.pca_components, strict=True)):
                out[f"pca_mean.{i}"] = mean
                out[f"pca_components.{i}"] = comp
        for level, cent in enumerate(self.centroids):
            out[f"centroids.{level}"] = cent
        return out


def _frozen(array: np.ndarray) -> np.ndarray:
    out = np.array(array, dtype=np.float64, order="C", copy=True)
    out.setflags(write=False)
    return out


def _content_hash(cb: Codebook) -> str:
    digest = hashlib.sha256()
    header = [cb.kind, cb.cluster_levels, cb.codebook_size, cb.input_dim]
    digest.update(json.dumps(header).encode())
    for name, array in sorted(cb.arrays().items()):
        digest.update(f"{name}|{array.dtype.str}|{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- fitting


def effective_k(n_items: int, k: int) -> int:
    """K capped for small catalogues: ``min(K, max(2, n_items // 4))``.

    Each code should hold about four items or more on average: with one code per item the
    codes carry no shared meaning (neighbours never share a prefix) and each code token is
    seen too rarely to be learned. The floor of 2 keeps a level informative for tiny test
    catalogues. Needs ``n_items >= 2`` (k-means needs at least K points).
    """
    if n_items < 2:
        raise ValueError(f"need at least 2 items to build a codebook, got {n_items}")
    if k < 2:
        raise ValueError(f"codebook size K must be >= 2, got {k}")
    return min(k, max(2, n_items // 4))


def fit_store(
    dense: np.ndarray, k: int, pca_dim: int | None = 32, n_init: int = 4, seed: int = 0
) -> Codebook:
    """STORE's quantizer: per position l, PCA to ``pca_dim`` then k-means into K codes.

    dense: [N, L, D] the L dense tokens of every item. K is capped by :func:`effective_k`
    and ``pca_dim`` by N and D (None: no PCA). Level l uses seed ``seed + l``.
    """
    x = _check_input(dense, ndim=3, what="dense")  # [N, L, D]
    n, cluster_levels, dim = x.shape
    k_eff = _effective_k_logged(n, k)
    order = _canonical_order(x.reshape(n, -1))  # [N]
    means: list[np.ndarray] = []
    comps: list[np.ndarray] = []
    centroids: list[np.ndarray] = []
    for level in range(cluster_levels):
        pca = _fit_pca(x[order, level], pca_dim, seed + level)
        if pca is not None:
            means.append(pca[0])
            comps.append(pca[1])
        mean, comp = pca if pca is not None else (None, None)
        points = _project(x[:, level], mean, comp)  # [N, P]
        cent = _fit_kmeans(points[order], k_eff, n_init, seed + level, level)
        centroids.append(cent)
    codebook = Codebook(
        kind="store",
        cluster_levels=cluster_levels,
        codebook_size=k_eff,
        input_dim=dim,
        pca_means=tuple(means) if pca_dim is not None else None,
        pca_components=tuple(comps) if pca_dim is not None else None,
        centroids=tuple(centroids),
    )
    logger.info(
        "fitted store codebook %s: N=%d L=%d K=%d", codebook.version, n, cluster_levels, k_eff
    )
    return codebook


def fit_rqkmeans(
    emb: np.ndarray,
    cluster_levels: int,
    k: int,
    pca_dim: int | None = 32,
    n_init: int = 4,
    seed: int = 0,
) -> Codebook:
    """TIGER-style residual k-means: PCA once, then level l clusters the residual.

    emb: [N, D] one embedding per item. Level 0 clusters the projected x, level l > 0
    clusters x - sum of the centroids chosen at the levels before. Level l uses seed
    ``seed + l``; K is capped by :func:`effective_k`.
    """
    if cluster_levels < 1:
        raise ValueError(f"cluster_levels must be >= 1, got {cluster_levels}")
    x = _check_input(emb, ndim=2, what="emb")  # [N, D]
    n, dim = x.shape
    k_eff = _effective_k_logged(n, k)
    order = _canonical_order(x)  # [N]
    pca = _fit_pca(x[order], pca_dim, seed)
    mean, comp = pca if pca is not None else (None, None)
    residual = _project(x, mean, comp)  # [N, P]
    centroids: list[np.ndarray] = []
    for level in range(cluster_levels):
        cent = _fit_kmeans(residual[order], k_eff, n_init, seed + level, level)
        centroids.append(cent)
        residual = residual - cent[_nearest(residual, cent)]
        logger.info("rqkmeans level %d: mean residual norm %.4f", level, _mean_norm(residual))
    codebook = Codebook(
        kind="rqkmeans",
        cluster_levels=cluster_levels,
        codebook_size=k_eff,
        input_dim=dim,
        pca_means=(pca[0],) if pca is not None else None,
        pca_components=(pca[1],) if pca is not None else None,
        centroids=tuple(centroids),
    )
    logger.info(
        "fitted rqkmeans codebook %s: N=%d L=%d K=%d", codebook.version, n, cluster_levels, k_eff
    )
    return codebook


def assign(codebook: Codebook, x: np.ndarray) -> np.ndarray:
    """Codes of new vectors: [N, L] int64.

    x: [N, L, D] dense tokens for a ``store`` codebook, [N, D] embeddings for ``rqkmeans``.
    Same projection and nearest-centroid rule as at fit time, so the training data gets
    back exactly its training codes.
    """
    cb = codebook
    if cb.kind == "store":
        arr = _check_input(x, ndim=3, what="x", allow_empty=True)  # [N, L, D]
        if arr.shape[1:] != (cb.cluster_levels, cb.input_dim):
            raise ValueError(
                f"x has shape {arr.shape}, codebook expects "
                f"[N, {cb.cluster_levels}, {cb.input_dim}]"
            )
        codes = np.empty((arr.shape[0], cb.cluster_levels), dtype=np.int64)  # [N, L]
        for level in range(cb.cluster_levels):
            points = _project(arr[:, level], *_transform(cb, level))  # [N, P]
            codes[:, level] = _nearest(points, cb.centroids[level])
        return codes
    arr = _check_input(x, ndim=2, what="x", allow_empty=True)  # [N, D]
    if arr.shape[1] != cb.input_dim:
        raise ValueError(f"x has shape {arr.shape}, codebook expects [N, {cb.input_dim}]")
    residual = _project(arr, *_transform(cb, 0))  # [N, P]
    codes = np.empty((arr.shape[0], cb.cluster_levels), dtype=np.int64)
    for level, cent in enumerate(cb.centroids):
        codes[:, level] = _nearest(residual, cent)
        residual = residual - cent[codes[:, level]]
    return codes


def _transform(cb: Codebook, level: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    if cb.pca_means is None or cb.pca_components is None:
        return None, None
    index = level if cb.kind == "store" else 0
    return cb.pca_means[index], cb.pca_components[index]


def _check_input(x: np.ndarray, *, ndim: int, what: str, allow_empty: bool = False) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != ndim:
        raise ValueError(f"{what} must be a {ndim}-D array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} must be numeric, got dtype {arr.dtype}")
    if arr.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{what} has no rows")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    return arr


def _effective_k_logged(n: int, k: int) -> int:
    k_eff = effective_k(n, k)
    if k_eff < k:
        logger.info("codebook size capped from K=%d to %d for %d items", k, k_eff, n)
    return k_eff


def _canonical_order(rows: np.ndarray) -> np.ndarray:
    """A row order that depends only on the rows' values (stable sort of their bytes)."""
    flat = np.ascontiguousarray(rows.reshape(rows.shape[0], -1), dtype=np.float64)  # [N, F]
    keys = flat.view(np.dtype((np.void, flat.dtype.itemsize * flat.shape[1]))).ravel()
    return np.argsort(keys, kind="stable")


def _fit_pca(x: np.ndarray, pca_dim: int | None, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Mean [D] and components [P, D] of PCA on x [N, D], P = min(pca_dim, N, D)."""
    if pca_dim is None:
        return None
    if pca_dim < 1:
        raise ValueError(f"pca_dim must be >= 1 or None, got {pca_dim}")
    n, dim = x.shape
    p = min(pca_dim, n, dim)
    if p < pca_dim:
        logger.info("PCA dimension capped from %d to %d (N=%d, D=%d)", pca_dim, p, n, dim)
    pca = PCA(n_components=p, random_state=seed).fit(x)
    return np.asarray(pca.mean_, dtype=np.float64), np.asarray(pca.components_, dtype=np.float64)


def _project(x: np.ndarray, mean: np.ndarray | None, comps: np.ndarray | None) -> np.ndarray:
    """(x - mean) @ comps.T in float64, blockwise: [N, D] -> [N, P] (identity without PCA)."""
    if mean is None or comps is None:
        return np.array(x, dtype=np.float64)
    out = np.empty((x.shape[0], comps.shape[0]), dtype=np.float64)
    for start in range(0, x.shape[0], _CHUNK):
        block = np.asarray(x[start : start + _CHUNK], dtype=np.float64) - mean
        out[start : start + _CHUNK] = block @ comps.T
    return out


def _nearest(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (squared L2, ties -> lower index): [N, P] -> [N]."""
    out = np.empty(points.shape[0], dtype=np.int64)
    c_sq = np.einsum("kp,kp->k", centroids, centroids)  # [K]
    for start in range(0, points.shape[0], _CHUNK):
        block = points[start : start + _CHUNK]  # [B, P]
        dist = c_sq[None, :] - 2.0 * (block @ centroids.T)  # [B, K] (||x||^2 dropped)
        out[start : start + _CHUNK] = np.argmin(dist, axis=1)
    return out


def _mean_norm(x: np.ndarray) -> float:
    return float(np.linalg.norm(x, axis=1).mean()) if x.shape[0] else 0.0


def _fit_kmeans(points: np.ndarray, k: int, n_init: int, seed: int, level: int) -> np.ndarray:
    """Centroids [K, P] of k-means on points [N, P] (MiniBatchKMeans for large N)."""
    n = points.shape[0]
    start = time.perf_counter()
    model: KMeans | MiniBatchKMeans
    if n > MINIBATCH_THRESHOLD:
        model = MiniBatchKMeans(
            n_clusters=k, n_init=n_init, random_state=seed, batch_size=min(4096, n)
        )
    else:
        model = KMeans(n_clusters=k, n_init=n_init, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(points)
    for warning in caught:
        logger.warning("level %d k-means: %s", level, warning.message)
    centroids = np.asarray(model.cluster_centers_, dtype=np.float64)  # [K, P]
    mismatched = int((_nearest(points, centroids) != model.labels_).sum())
    if mismatched:
        # Only near-ties can differ; the codebook's rule (assign) defines the codes.
        logger.debug("level %d: %d k-means labels differ from nearest centroid", level, mismatched)
    logger.info(
        "level %d: %s K=%d on %d points in %.2fs (inertia %.4g)",
        level,
        type(model).__name__,
        k,
        n,
        time.perf_counter() - start,
        float(model.inertia_),
    )
    return centroids


# --------------------------------------------------------------------------- disambiguation


def disambiguate(codes: np.ndarray, item_ids: Sequence[str]) -> np.ndarray:
    """Append the disambiguation level: codes [N, L] -> semantic IDs [N, L+1] int64.

    Items sharing the same L codes get last codes 0, 1, 2, ... in item_id order (string
    order); an item whose codes are unique gets 0. Every row of the result is unique.
    Same as :func:`extend_disambiguation` against an empty set of existing IDs.
    """
    arr = _check_codes(codes, "codes")
    empty = np.empty((0, arr.shape[1] + 1), dtype=np.int64)
    return extend_disambiguation(empty, arr, item_ids)


def extend_disambiguation(
    existing: np.ndarray, codes: np.ndarray, item_ids: Sequence[str]
) -> np.ndarray:
    """Semantic IDs [N, L+1] for NEW items, unique against ``existing`` IDs [M, L+1].

    For each L-code prefix the new items get the next free last codes, i.e. from
    ``max(last code already used with that prefix) + 1`` upwards (0 for a fresh prefix),
    several new items with one prefix in item_id order. Gaps are never reused, so an ID
    that once named an item (which the recommender may have learned) is never handed to a
    different one - provided ``existing`` holds every ID issued under this codebook
    version (e.g. all rows of ``semantic_ids`` for that version, removed items included).
    ``item_ids`` must be unique and not already present in ``existing``'s items.
    """
    new = _check_codes(codes, "codes")  # [N, L]
    n, cluster_levels = new.shape
    if len(item_ids) != n:
        raise ValueError(f"{len(item_ids)} item_ids for {n} rows of codes")
    ids = np.asarray([str(i) for i in item_ids], dtype=object)
    if len(set(ids.tolist())) != n:
        raise ValueError("item_ids must be unique")
    old = _check_codes(existing, "existing")  # [M, L+1]
    if old.shape[1] != cluster_levels + 1:
        raise ValueError(f"existing IDs have {old.shape[1]} levels, expected {cluster_levels + 1}")
    out = np.empty((n, cluster_levels + 1), dtype=np.int64)
    out[:, :cluster_levels] = new
    if n == 0:
        return out
    id_rank = np.empty(n, dtype=np.int64)
    id_rank[np.argsort(ids.astype(str), kind="stable")] = np.arange(n)
    # Sort by (c0, ..., c_{L-1}, item_id): np.lexsort takes the primary key last.
    order = np.lexsort((id_rank, *(new[:, lv] for lv in reversed(range(cluster_levels)))))
    sorted_codes = new[order]  # [N, L]
    starts = np.ones(n, dtype=bool)
    starts[1:] = (sorted_codes[1:] != sorted_codes[:-1]).any(axis=1)
    group = np.cumsum(starts) - 1  # [N] group index per sorted row
    first = np.flatnonzero(starts)  # [G] first sorted row of each group
    within = np.arange(n) - first[group]  # [N] 0, 1, 2, ... inside a group
    offset = np.zeros(len(first), dtype=np.int64)  # [G] next free last code per group
    if old.shape[0]:
        next_free: dict[tuple[int, ...], int] = {}
        for row in old.tolist():
            prefix = tuple(row[:cluster_levels])
            next_free[prefix] = max(next_free.get(prefix, 0), row[cluster_levels] + 1)
        for g, row_index in enumerate(first):
            offset[g] = next_free.get(tuple(sorted_codes[row_index].tolist()), 0)
    out[order, cluster_levels] = offset[group] + within
    return out


def _check_codes(codes: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(codes)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D [N, L] array, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} must be integers, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{what} contains negative codes")
    return arr.astype(np.int64, copy=False)


# --------------------------------------------------------------------------- statistics


def save_codebook(codebook: Codebook, directory: str | Path) -> None:
    """Write ``codebook.safetensors`` (arrays) and ``codebook.json`` (header) to ``directory``.

    ``directory`` is a local path or fsspec URI; it is created if missing. No pickle.
    """
    uri = str(directory).rstrip("/")
    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(path, exist_ok=True)
    arrays = codebook.arrays()
    blob = save_safetensors(dict(arrays), metadata={"version": codebook.version})
    with fsspec.open(f"{uri}/{ARRAYS_FILE}", "wb") as handle:
        handle.write(blob)
    header = {
        "format": _FORMAT,
        "kind": codebook.kind,
        "cluster_levels": codebook.cluster_levels,
        "codebook_size": codebook.codebook_size,
        "input_dim": codebook.input_dim,
        "pca": codebook.pca_means is not None,
        "version": codebook.version,
        "arrays": {name: list(array.shape) for name, array in arrays.items()},
    }
    with fsspec.open(f"{uri}/{HEADER_FILE}", "w") as handle:
        handle.write(json.dumps(header, indent=2) + "\n")
    logger.info("saved codebook %s to %s", codebook.version, uri)


#: The header key older releases wrote for ``cluster_levels`` (read, never written).
_LEGACY_LEVELS_KEY = "num_levels"


def _levels_key(header: dict[str, Any]) -> str:
    """The header key holding L: ``cluster_levels``, or the name older releases wrote."""
    return "cluster_levels" if "cluster_levels" in header else _LEGACY_LEVELS_KEY


def load_codebook(directory: str | Path) -> Codebook:
    """Read a codebook written by :func:`save_codebook`; DataError if missing or corrupt."""
    uri = str(directory).rstrip("/")
    header_uri, arrays_uri = f"{uri}/{HEADER_FILE}", f"{uri}/{ARRAYS_FILE}"
    try:
        with fsspec.open(header_uri, "r") as handle:
            header = json.loads(handle.read())
        with fsspec.open(arrays_uri, "rb") as handle:
            arrays = load_safetensors(handle.read())
    except FileNotFoundError as exc:
        raise DataError(f"codebook file missing ({exc})", file=uri) from None
    except (json.JSONDecodeError, OSError) as exc:
        raise DataError(f"unreadable codebook: {exc}", file=uri) from None
    try:
        if header.get("format") != _FORMAT:
            raise DataError(f"unknown codebook format {header.get('format')!r}", file=header_uri)
        cluster_levels = int(header[_levels_key(header)])
        transforms = cluster_levels if header["kind"] == "store" else 1
        pca = bool(header["pca"])
        codebook = Codebook(
            kind=cast(QuantizerKind, header["kind"]),
            cluster_levels=cluster_levels,
            codebook_size=int(header["codebook_size"]),
            input_dim=int(header["input_dim"]),
            pca_means=tuple(arrays[f"pca_mean.{i}"] for i in range(transforms)) if pca else None,
            pca_components=(
                tuple(arrays[f"pca_components.{i}"] for i in range(transforms)) if pca else None
            ),
            centroids=tuple(arrays[f"centroids.{lv}"] for lv in range(cluster_levels)),
        )
    except KeyError as exc:
        raise DataError(f"codebook lacks {exc}", file=uri) from None
    except ValueError as exc:
        raise DataError(f"invalid codebook: {exc}", file=uri) from None
    if codebook.version != header.get("version"):
        raise DataError(
            f"arrays hash to version {codebook.version}, header says {header.get('version')!r} "
            "(files from different codebooks, or corrupted)",
            file=arrays_uri,
        )
    return codebook
