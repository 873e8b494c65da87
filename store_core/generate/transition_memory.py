"""A transition memory for decoding: the item-to-item transitions of the training sequences,
mixed into the model's item probabilities after the constrained beam search.

Why (README, "Where STORE loses"): STORE's semantic-ID tokens are shared by many items,
and the model recalls a transition it was trained on once for 23% of users in that very
context, where SASRec-CE's per-item embeddings recall 39%; on the 90% of test users whose
transition no training sequence holds, STORE is ahead. A count table of the training
transitions is the memory the shared codes lack. The mixture is the kNN-LM recipe
(Khandelwal et al., "Generalization through Memorization: Nearest Neighbor Language
Models", ICLR 2020, eq. 2) with a first-order Markov chain over items as the memory:

    p(j | history) = (1 - w) * p_model(j | history) + w * p_M(j | history)
    p_M(j | history) = sum_k d^(k-1) * P(j | h_-k) / sum_k d^(k-1),  k = 1 .. min(D, |history|)

where ``P(j | i)`` is the share of the training transitions out of item ``i`` that go to
``j`` (0 for an item never followed in training), ``h_-k`` the k-th most recent history
item, ``w`` = ``recommender.transition_memory_weight``, ``D`` =
``recommender.transition_memory_depth`` and ``d`` = ``recommender.transition_memory_decay``.
With ``recommender.transition_memory_window`` W > 1, ``P(j | i)`` counts the pairs up to W
positions apart (weight ``transition_memory_window_decay^(gap - 1)``), and with
``transition_memory_symmetric`` in both directions (:meth:`TransitionMemory.from_sequences`):
the item co-occurrence of session kNN (Ludewig & Jannach, "Evaluation of session-based
recommendation algorithms", UMUAI 2018), for data whose order inside a session carries
little. ``p_model`` is ``exp`` of the beam score (the sum of the ID's token log-probabilities); an
item outside the beam is given ``p_model = 0`` (its true probability is below the beam's
last), so the fused candidates are the beam's items and every item ``p_M`` names.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from store_core.generate.beam import BeamResult


@dataclass(frozen=True)
class TransitionMemory:
    """Row-normalized counts of the training transitions between catalogue rows."""

    matrix: sparse.csr_array
    """``[N, N]`` float64: row ``i`` is ``P(next = j | current = i)`` over the training
    transitions out of ``i``; an all-zero row for an item never followed in training."""

    @classmethod
    def from_sequences(
        cls,
        sequences: Iterable[Sequence[int]],
        num_items: int,
        *,
        window: int = 1,
        window_decay: float = 1.0,
        symmetric: bool = False,
    ) -> TransitionMemory:
        """Count the item pairs of ``sequences`` (catalogue rows, oldest first; -1 = an item
        outside the catalogue, whose pairs are skipped) and normalize each row.

        ``window`` = 1 (default): every consecutive pair ``(s[t], s[t + 1])``, the
        first-order chain. ``window`` = W > 1 also counts ``(s[t], s[t + j])`` for
        ``j <= W`` with weight ``window_decay^(j - 1)`` (the skip-gram co-occurrence of
        item2vec / session kNN). ``symmetric`` counts every pair in both directions, for
        data whose order inside a session is not informative (MovieLens rates many
        movies in the same second; ties are ordered by file position). ValueError for a
        row at or past ``num_items``, ``window`` < 1 or ``window_decay`` outside (0, 1]."""
        if window < 1 or not 0.0 < window_decay <= 1.0:
            raise ValueError(
                f"window must be >= 1 and window_decay in (0, 1], got {window}, {window_decay}"
            )
        sources: list[np.ndarray] = []
        targets: list[np.ndarray] = []
        weights: list[np.ndarray] = []
        for sequence in sequences:
            rows = np.asarray(sequence, dtype=np.int64)
            for gap in range(1, min(window, rows.size - 1) + 1):
                pairs = (rows[:-gap], rows[gap:])
                weight = np.full(rows.size - gap, window_decay ** (gap - 1))
                for src_, dst_ in (pairs, pairs[::-1]) if symmetric else (pairs,):
                    sources.append(src_)
                    targets.append(dst_)
                    weights.append(weight)
        src = np.concatenate(sources) if sources else np.zeros(0, np.int64)
        dst = np.concatenate(targets) if targets else np.zeros(0, np.int64)
        val = np.concatenate(weights) if weights else np.zeros(0)
        if src.size and max(src.max(), dst.max()) >= num_items:
            raise ValueError(f"a transition row is at or past the catalogue's {num_items}")
        known = (src >= 0) & (dst >= 0)
        counts = sparse.csr_array(
            (val[known], (src[known], dst[known])), shape=(num_items, num_items)
        )  # duplicate pairs are summed
        totals = np.asarray(counts.sum(axis=1)).ravel()
        inverse = np.divide(1.0, totals, out=np.zeros_like(totals), where=totals > 0)
        return cls(sparse.csr_array(sparse.diags_array(inverse) @ counts))

    @property
    def num_items(self) -> int:
        """N: catalogue rows."""
        return int(self.matrix.shape[0])

    def next_item_probabilities(
        self, histories: Sequence[Sequence[int]], depth: int, decay: float
    ) -> sparse.csr_array:
        """``[P, N]`` ``p_M(j | history)`` for each history (catalogue rows, oldest first;
        module docstring). An empty history gives an all-zero row; a -1 (an item outside
        the catalogue) keeps its share of the weights and contributes nothing.
        ValueError unless ``depth >= 1`` and ``0 < decay <= 1``."""
        if depth < 1 or not 0.0 < decay <= 1.0:
            raise ValueError(f"depth must be >= 1 and decay in (0, 1], got {depth}, {decay}")
        rows: list[int] = []
        cols: list[int] = []
        weights: list[float] = []
        for p, history in enumerate(histories):
            recent = list(history)[-depth:][::-1]  # h_-1, h_-2, ... (-1: no row, no memory)
            norm = sum(decay**k for k in range(len(recent)))
            for k, item in enumerate(recent):
                if item < 0:
                    continue
                rows.append(p)
                cols.append(int(item))
                weights.append(decay**k / norm)
        pick = sparse.csr_array(
            (np.asarray(weights), (np.asarray(rows, dtype=np.int64), np.asarray(cols))),
            shape=(len(histories), self.num_items),
        )
        return sparse.csr_array(pick @ self.matrix)


def without_items(
    probabilities: sparse.csr_array, rows: Sequence[Sequence[int]]
) -> sparse.csr_array:
    """``probabilities`` ``[P, N]`` with row ``p``'s entries at the catalogue rows
    ``rows[p]`` removed (e.g. the user's history under the history-excluded rule), so
    the memory names none of them. ValueError when ``rows`` has not P lists."""
    if len(rows) != probabilities.shape[0]:
        raise ValueError(f"{len(rows)} row lists for {probabilities.shape[0]} prompts")
    prompt_of = [p for p, items in enumerate(rows) for _ in items]
    columns = [row for items in rows for row in items]
    mask = sparse.csr_array(
        (np.ones(len(columns)), (prompt_of, columns)), shape=probabilities.shape
    )  # [P, N]; a repeated row sums above 1, and only > 0 matters
    kept = sparse.csr_array(probabilities - probabilities.multiply(mask > 0))
    kept.eliminate_zeros()
    return kept


def fuse_with_transition_memory(
    result: BeamResult,
    memory: sparse.csr_array,
    weight: float,
    codes: np.ndarray,
    beam_size: int,
) -> BeamResult:
    """The beams re-ranked by ``log((1 - weight) * exp(score) + weight * p_M(item))``.

    ``result``: ``[P, B]`` beams whose ``items`` are rows of ``codes`` ``[N, M]``;
    ``memory``: ``[P, N]`` ``p_M`` over the same rows
    (:meth:`TransitionMemory.next_item_probabilities`); ``weight`` in ``[0, 1)``. The
    candidates of prompt ``p`` are its live beam items (``p_model = exp(score)``) and the
    items with ``p_M > 0`` (``p_model = 0`` when outside the beam). Returns a
    :class:`BeamResult` of width ``beam_size``, best first (dead slots: item -1, codes -1,
    score -inf); ``weight = 0`` returns ``result``'s beams unchanged. ValueError on a
    weight outside ``[0, 1)`` or on shapes that disagree.
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"the transition memory weight must be in [0, 1), got {weight}")
    num_prompts, id_length = len(result.items), codes.shape[1]
    if memory.shape != (num_prompts, codes.shape[0]):
        raise ValueError(
            f"memory is {memory.shape}, expected ({num_prompts}, {codes.shape[0]}) "
            "(prompts x catalogue rows)"
        )
    items = np.full((num_prompts, beam_size), -1, dtype=np.int64)
    fused_scores = np.full((num_prompts, beam_size), -np.inf, dtype=np.float32)
    fused_codes = np.full((num_prompts, beam_size, id_length), -1, dtype=np.int64)
    memory = sparse.csr_array(memory)
    with np.errstate(divide="ignore"):
        for p in range(num_prompts):
            alive = (result.items[p] >= 0) & np.isfinite(result.scores[p])
            beam_rows = result.items[p][alive]
            start, end = memory.indptr[p], memory.indptr[p + 1]
            mem_rows, mem_probs = memory.indices[start:end], memory.data[start:end]
            rows = np.union1d(beam_rows, mem_rows)
            mixed = np.zeros(rows.size)
            mixed[np.searchsorted(rows, beam_rows)] += (1.0 - weight) * np.exp(
                result.scores[p][alive].astype(np.float64)
            )
            mixed[np.searchsorted(rows, mem_rows)] += weight * mem_probs
            # best first; ties by the row order of the beam (stable on -mixed)
            order = np.argsort(-mixed, kind="stable")[:beam_size]
            order = order[mixed[order] > 0]
            items[p, : order.size] = rows[order]
            fused_scores[p, : order.size] = np.log(mixed[order])
            fused_codes[p, : order.size] = codes[rows[order]]
    return BeamResult(codes=fused_codes, scores=fused_scores, items=items)
