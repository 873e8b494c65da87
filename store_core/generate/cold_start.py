"""Recommending cold-start items: a back-off from the model's score of their ID prefix.

A generative recommender only ever learns the IDs of items that were training targets.
An item no training sequence contains (a new catalogue item, or the cold-start holdout
of ``data.cold_start_fraction``) has a semantic ID from its text, but its last codes -
the capacity-assigned last cluster level and the disambiguation code, which carry its
identity rather than its meaning - were never a target, so the beam search practically
never reaches it: on Amazon Scientific with 5% of the items held out (seed 0), the top-10
beams matched a cold-start target's first 2 codes for 7.7% of its users (warm targets:
11.0%) and its first 3 for none.

What the codes do carry is meaning, and the model does score a prefix: the back-off
gives a cold-start item the log-probability of its first ``depth`` codes (a constrained
beam search over the distinct prefixes of the cold-start items, ``depth`` steps) plus
``log(weight / n)``, where ``n`` is the number of catalogue items that share the prefix:
its share of the prefix's probability mass if the mass were split evenly over the items
behind it (``weight`` = 1), scaled by ``weight``. The result is merged into the ordinary
beam by score (:func:`merge_beams`). This is the prefix-matching idea of TIGER's
cold-start experiment (Rajput et al., 2023, section 4.3: items matching the generated
prefix are added to the retrieved set), with the share of a prefix's mass as the score
instead of a fixed fraction of the slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from store_core.generate.beam import BeamResult, constrained_beam_search
from store_core.generate.trie import SemanticIdTrie


@dataclass(frozen=True)
class ColdStartBackoff:
    """The back-off candidates of one catalogue (build it with :meth:`build`).

    ``trie``: the distinct ``depth``-code prefixes of the cold-start items (its ``codes``
    row p is prefix p); ``members[p]``: the catalogue rows of the cold-start items behind
    prefix p; ``log_share[p]``: ``log(weight / n_p)``, ``n_p`` the catalogue items (cold
    or not) that share prefix p.
    """

    trie: SemanticIdTrie
    members: list[np.ndarray]
    log_share: np.ndarray  # [num_prefixes] float64

    @classmethod
    def build(
        cls,
        codes: np.ndarray,
        cold_rows: np.ndarray | Sequence[int],
        level_ids: Sequence[Sequence[int]],
        *,
        depth: int,
        weight: float,
    ) -> ColdStartBackoff | None:
        """``codes``: ``[N, M]`` the catalogue's IDs; ``cold_rows``: rows of the items no
        training sequence contains; ``level_ids``: ``[M][K_m]`` token ids of the codes.
        None when there is no cold-start item. ValueError unless ``1 <= depth < M`` and
        ``weight > 0``."""
        arr = np.asarray(codes, dtype=np.int64)
        if not 1 <= depth < arr.shape[1]:
            raise ValueError(f"the back-off depth must be 1..{arr.shape[1] - 1}, got {depth}")
        if weight <= 0:
            raise ValueError(f"the back-off weight must be > 0, got {weight}")
        rows = np.asarray(cold_rows, dtype=np.int64)
        if rows.size == 0:
            return None
        prefixes, inverse = np.unique(arr[rows, :depth], axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        order = np.argsort(inverse, kind="stable")  # cold rows grouped by prefix, O(n log n)
        members = np.split(rows[order], np.cumsum(np.bincount(inverse))[:-1])
        # items of the whole catalogue behind each prefix (>= its cold-start members)
        everyone, counts = np.unique(arr[:, :depth], axis=0, return_counts=True)
        found = {tuple(p): int(c) for p, c in zip(everyone.tolist(), counts.tolist(), strict=True)}
        sizes = np.array([found[tuple(p)] for p in prefixes.tolist()], dtype=np.float64)
        trie = SemanticIdTrie.from_codes(prefixes, list(level_ids)[:depth])
        return cls(trie, members, np.log(weight) - np.log(sizes))

    def search(
        self,
        model: torch.nn.Module,
        prompts: Sequence[Sequence[int]],
        *,
        beam_size: int,
        pad_token_id: int,
        batch_size: int = 32,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The cold-start candidates of each prompt: ``([P, C] catalogue rows, [P, C]
        back-off scores)``, best first, padded with row -1 and score -inf; ``C`` is
        ``beam_size`` prefixes times their largest member count."""
        found = constrained_beam_search(
            model,
            prompts,
            self.trie,
            beam_size=beam_size,
            pad_token_id=pad_token_id,
            batch_size=batch_size,
        )
        per_prompt: list[tuple[list[int], list[float]]] = []
        for prefix_rows, prefix_scores in zip(found.items, found.scores, strict=True):
            rows: list[int] = []
            scores: list[float] = []
            for p, score in zip(prefix_rows.tolist(), prefix_scores.tolist(), strict=True):
                if p < 0 or not np.isfinite(score):
                    continue
                for row in self.members[p].tolist():
                    rows.append(int(row))
                    scores.append(float(score + self.log_share[p]))
            per_prompt.append((rows, scores))
        width = max((len(rows) for rows, _ in per_prompt), default=0)
        out_rows = np.full((len(per_prompt), width), -1, dtype=np.int64)
        out_scores = np.full((len(per_prompt), width), -np.inf, dtype=np.float64)
        for i, (rows, scores) in enumerate(per_prompt):
            order = np.argsort(-np.asarray(scores), kind="stable")
            out_rows[i, : len(rows)] = np.asarray(rows, dtype=np.int64)[order]
            out_scores[i, : len(rows)] = np.asarray(scores)[order]
        return out_rows, out_scores


def merge_beams(
    result: BeamResult,
    rows: np.ndarray,
    scores: np.ndarray,
    codes: np.ndarray,
    beam_size: int,
) -> BeamResult:
    """The top ``beam_size`` of ``result``'s beams and the extra candidates ``rows`` /
    ``scores`` (``[P, C]``, row -1 = none), by score; an item in both keeps its higher
    score (ties keep the beam's). ``result.items`` must be rows of ``codes`` ``[N, M]``.
    Returns a :class:`BeamResult` of width ``beam_size`` (dead slots: item -1, codes -1,
    score -inf)."""
    num_prompts, id_length = len(result.items), codes.shape[1]
    items = np.full((num_prompts, beam_size), -1, dtype=np.int64)
    merged_scores = np.full((num_prompts, beam_size), -np.inf, dtype=np.float32)
    merged_codes = np.full((num_prompts, beam_size, id_length), -1, dtype=np.int64)
    for p in range(num_prompts):
        best: dict[int, float] = {}
        for row, score in zip(result.items[p].tolist(), result.scores[p].tolist(), strict=True):
            if row >= 0 and np.isfinite(score):
                best[row] = max(score, best.get(row, -np.inf))
        for row, score in zip(rows[p].tolist(), scores[p].tolist(), strict=True):
            if row >= 0 and np.isfinite(score) and score > best.get(row, -np.inf):
                best[row] = score
        ranked = sorted(best.items(), key=lambda kv: -kv[1])[:beam_size]
        for slot, (row, score) in enumerate(ranked):
            items[p, slot] = row
            merged_scores[p, slot] = score
            merged_codes[p, slot] = codes[row]
    return BeamResult(codes=merged_codes, scores=merged_scores, items=items)
