"""Capacity-constrained assignment of the last cluster level: IDs that tell items apart.

With the plain rule (every level takes its nearest centroid) the L cluster codes of
similar items often coincide: on Amazon Scientific 37% of the items share all L codes
with another item, up to 59 in one group (benchmarks/codebook_quality.py), and the
disambiguation code that then tells them apart (0, 1, 2, ... in item_id order) carries
no meaning. The recommender finds the right group but cannot know which member is meant.

The fix keeps levels 1..L-1 exactly as the codebook assigns them (so the first codes -
and the category coherence measured on them - do not change) and chooses the last code
under a capacity: inside each group of items sharing the first L-1 codes, every last
code may hold at most ``capacity`` items. Among all such choices it takes the one of
least total squared distance to the chosen centroids, an assignment problem solved
exactly, per group, by :func:`scipy.optimize.linear_sum_assignment` (each code's column
repeated ``capacity`` times). Items leave their nearest code only where the capacity
forces it, for the least total extra distance, so the last code is still a nearby
cluster and keeps part of its meaning (on scientific, pairs sharing it match leaf
categories 7x as often as random pairs, against 19x under the plain rule, where it mostly
repeated the first codes). With ``capacity=1`` and groups no larger than K no two items
share their L codes and the disambiguation level is always 0.

This is the collision handling of LC-Rec (Zheng et al., "Adapting Large Language Models
by Integrating Collaborative Semantics for Recommendation", ICDE 2024, section III-A,
"Mitigating Conflicts via Uniform Semantic Mapping"), which redistributes colliding
items over the last level's codes with a Sinkhorn-Knopp balanced assignment. Here the
constraint sits where collisions are defined (within each prefix group) and is solved
exactly, not by entropic relaxation: Sinkhorn pays off where the exact problem is too
large, and prefix groups hold a handful of items. The same constrained assignment is
the assignment step of balanced k-means (Malinen & Fraenti, "Balanced K-Means for
Clustering", S+SSPR 2014), applied to one level.

Cost: one assignment problem per prefix group of n items against K * capacity columns
(about n^2 * K operations); groups hold a handful of items when L >= 2. With L = 1 the
whole catalogue is one group, which is only practical for catalogues of a few thousand
items.

The codebook itself (PCA and centroids) is unchanged: :func:`store_core.quantizer.assign`
still gives nearest-centroid codes for new vectors, and the training codes, which the
recommender learns, are stored in ``semantic_ids.parquet``. :func:`assign_codes`
recomputes them deterministically from the codebook and the vectors.
"""

from __future__ import annotations

import logging
import math
from typing import Literal, get_args

import numpy as np
from scipy.optimize import linear_sum_assignment

from store_core.quantizer import (
    Codebook,
    _canonical_order,
    _check_codes,
    _project,
    _transform,
    assign,
)

logger = logging.getLogger(__name__)

LastLevelAssignment = Literal["nearest", "capacity"]


def level_distances(codebook: Codebook, x: np.ndarray, codes: np.ndarray, level: int) -> np.ndarray:
    """Squared distance of every item to every centroid of ``level``: [N, K] float64.

    x: [N, L, D] dense tokens (``store``) or [N, D] embeddings (``rqkmeans``); codes: [N, L]
    the items' codes (for ``rqkmeans`` the levels before ``level`` define the residual that
    is measured, exactly as in :func:`store_core.quantizer.assign`). Raises ValueError on
    shapes that do not match the codebook.
    """
    cb = codebook
    if not 0 <= level < cb.cluster_levels:
        raise ValueError(f"level must be in 0..{cb.cluster_levels - 1}, got {level}")
    arr = np.asarray(x)
    expected = (cb.cluster_levels, cb.input_dim) if cb.kind == "store" else (cb.input_dim,)
    if arr.shape[1:] != expected or len(arr) != len(codes):
        raise ValueError(f"x has shape {arr.shape}, expected [{len(codes)}, {expected}]")
    if cb.kind == "store":
        points = _project(arr[:, level], *_transform(cb, level))  # [N, P]
    else:
        points = _project(arr, *_transform(cb, 0))  # [N, P]
        for lv in range(level):
            points = points - cb.centroids[lv][codes[:, lv]]
    cent = cb.centroids[level]  # [K, P]
    dist = (
        np.einsum("np,np->n", points, points)[:, None]
        - 2.0 * (points @ cent.T)
        + np.einsum("kp,kp->k", cent, cent)[None, :]
    )  # [N, K]
    return np.maximum(dist, 0.0)


def capacity_last_codes(
    distances: np.ndarray, prefixes: np.ndarray, capacity: int = 1
) -> np.ndarray:
    """Last codes [N] that respect a per-prefix capacity at least total distance.

    distances: [N, K] cost of giving item n code k (squared distance to the centroid);
    prefixes: [N, P] the codes of the levels before (P may be 0: one group of all items).
    Inside each group of equal prefixes every code holds at most
    ``max(capacity, ceil(group size / K))`` items (the bound is raised only for groups too
    large to fit, so some items always get a code). Exact optimum per group
    (:func:`scipy.optimize.linear_sum_assignment`); a group of one item takes its nearest
    code. Deterministic: groups are solved with their rows in a canonical order (by the
    bytes of their distance rows), so the result does not depend on the input order.
    Raises ValueError for capacity < 1 or mismatched shapes.
    """
    dist = np.asarray(distances, dtype=np.float64)
    if dist.ndim != 2 or dist.shape[1] < 1:
        raise ValueError(f"distances must be a 2-D [N, K] array, got shape {dist.shape}")
    pre = _check_codes(prefixes, "prefixes")  # [N, P]
    if pre.shape[0] != dist.shape[0]:
        raise ValueError(f"{pre.shape[0]} prefixes for {dist.shape[0]} rows of distances")
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    n, k = dist.shape
    out = np.argmin(dist, axis=1).astype(np.int64)  # [N] nearest code (ties -> lower)
    if n == 0:
        return out
    if pre.shape[1]:
        _, group = np.unique(pre, axis=0, return_inverse=True)
        group = group.reshape(-1)
    else:
        group = np.zeros(n, dtype=np.int64)
    members = np.argsort(group, kind="stable")
    bounds = np.flatnonzero(np.diff(group[members])) + 1
    moved = 0
    for rows in np.split(members, bounds):
        cap = max(capacity, math.ceil(len(rows) / k))
        if np.bincount(out[rows], minlength=k).max() <= cap:
            continue  # nearest codes already fit
        rows = rows[_canonical_order(dist[rows])]
        cost = np.repeat(dist[rows], cap, axis=1)  # [n_g, K * cap]: column j is code j // cap
        row_ind, col_ind = linear_sum_assignment(cost)
        chosen = col_ind[np.argsort(row_ind)] // cap
        moved += int((chosen != out[rows]).sum())
        out[rows] = chosen
    logger.info(
        "capacity %d on the last level: %d of %d items left their nearest code", capacity, moved, n
    )
    return out


def assign_codes(
    codebook: Codebook,
    x: np.ndarray,
    method: LastLevelAssignment = "capacity",
    capacity: int = 1,
) -> np.ndarray:
    """Cluster codes [N, L] int64 of a catalogue: levels 1..L-1 nearest, the last by ``method``.

    x: [N, L, D] dense tokens (``store``) or [N, D] embeddings (``rqkmeans``). 'nearest' is
    :func:`store_core.quantizer.assign`; 'capacity' reassigns the last level with
    :func:`capacity_last_codes` inside each group of equal first L-1 codes (all items form
    one group when L = 1). Codes are always in 0..K-1. Raises ValueError for an unknown
    method or bad shapes.
    """
    if method not in get_args(LastLevelAssignment):
        raise ValueError(f"method must be one of {get_args(LastLevelAssignment)}, got {method!r}")
    codes = assign(codebook, x)  # [N, L]
    if method == "nearest" or codes.shape[0] == 0:
        return codes
    last = codebook.cluster_levels - 1
    dist = level_distances(codebook, x, codes, last)  # [N, K]
    codes[:, last] = capacity_last_codes(dist, codes[:, :last], capacity)
    return codes
