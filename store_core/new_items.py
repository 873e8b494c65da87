"""Text -> token for items the model has never seen: no retraining.

The Phase B model generates an ID from the item's text with the alignment prompt, each
level constrained to that level's valid codes. The disambiguation level then makes it
unique against every ID already issued under the codebook: a new item takes the next
free last code of its prefix. Among the beams (best first) the first whose next free
code has a token in the vocabulary wins; Phase B reserves spare disambiguation tokens so
this practically always holds on the first beam. Existing items keep their IDs.

An item's own ID is not a collision with itself: an item that already holds an ID under
the codebook (a changed item, a restored one, or any item under ``--mode regenerate``)
and whose generated prefix is its own ID's prefix keeps its own ID, so regenerating an
unchanged catalogue with the same model moves no ID and uses no disambiguation code.

The ID space never runs out silently: :class:`DisambiguationState` counts the items that
had to take a lower beam because their best prefix was full, and :meth:`~DisambiguationState.
report` says how many prefixes are full or low (at most :data:`LOW_SPARE_FRACTION` of the
codes left); :mod:`store_core.catalogue` logs a warning with these counts, and an item
with no prefix left is a StoreError naming it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from store_core.errors import StoreError
from store_core.generate import SemanticIdTrie, constrained_beam_search
from store_core.prompts import PromptBuilder

logger = logging.getLogger(__name__)


def generate_ids(
    model: torch.nn.Module,
    builder: PromptBuilder,
    level_ids: Sequence[Sequence[int]],
    texts: Sequence[str],
    *,
    beam_size: int = 10,
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """Beams of cluster codes for each text: codes [P, B, L] and scores [P, B]."""
    cluster_levels = len(level_ids) - 1
    prompts = [builder.alignment(text) for text in texts]
    result = constrained_beam_search(
        model,
        prompts,
        SemanticIdTrie.levelwise(level_ids[:cluster_levels]),
        beam_size=beam_size,
        pad_token_id=builder.pad_token_id,
        batch_size=batch_size,
    )
    return result.codes, result.scores


#: A prefix with at most this fraction of its disambiguation codes left is "low".
LOW_SPARE_FRACTION = 0.25


@dataclass(frozen=True)
class IdSpaceReport:
    """How much of the disambiguation level is left, after a run's assignments."""

    codes_per_prefix: int  # disambiguation codes per cluster prefix (K of the last level)
    prefixes: int  # cluster prefixes holding at least one issued ID
    full_prefixes: int  # prefixes with no code left: a new item there must take another
    low_prefixes: int  # prefixes with 1..LOW_SPARE_FRACTION of their codes left
    taken: int  # codes this run took (new IDs issued)
    own_kept: int  # items that generated their own ID's prefix and kept their ID
    fallbacks: int  # new IDs issued on a lower beam because a better prefix was full

    @property
    def pressure(self) -> bool:
        """True when a warning is due: some prefix full or low, or an item fell back."""
        return bool(self.full_prefixes or self.low_prefixes or self.fallbacks)

    def describe(self) -> str:
        return (
            f"{self.full_prefixes} of {self.prefixes} cluster prefixes have used all "
            f"{self.codes_per_prefix} disambiguation codes, {self.low_prefixes} more have "
            f"<= {LOW_SPARE_FRACTION:.0%} left; {self.fallbacks} new IDs took a lower beam "
            f"because a better prefix was full; {self.taken} codes taken this run, "
            f"{self.own_kept} items kept their own ID"
        )


class DisambiguationState:
    """Next free disambiguation code per cluster prefix, seeded from every issued ID.

    Incremental (O(1) per new item) so catalogue tokenization can stream; the rule is the
    one of :func:`store_core.quantizer.extend_disambiguation`: a prefix's next code is one
    past the largest ever used with it, so an ID once issued is never handed to another item.
    """

    def __init__(self, issued: np.ndarray, last_size: int) -> None:
        self.last_size = last_size
        self.next_free: dict[tuple[int, ...], int] = {}
        for row in np.asarray(issued, dtype=np.int64).tolist():
            prefix = tuple(row[:-1])
            self.next_free[prefix] = max(self.next_free.get(prefix, 0), row[-1] + 1)
        self.taken = 0
        self.own_kept = 0
        self.fallbacks = 0

    def peek(self, prefix: Sequence[int]) -> int:
        return self.next_free.get(tuple(int(c) for c in prefix), 0)

    def take(self, prefix: Sequence[int]) -> list[int]:
        key = tuple(int(c) for c in prefix)
        code = self.next_free.get(key, 0)
        self.next_free[key] = code + 1
        self.taken += 1
        return [*key, code]

    def report(self) -> IdSpaceReport:
        low_limit = self.last_size * LOW_SPARE_FRACTION
        spare = [self.last_size - used for used in self.next_free.values()]
        return IdSpaceReport(
            codes_per_prefix=self.last_size,
            prefixes=len(spare),
            full_prefixes=sum(1 for s in spare if s <= 0),
            low_prefixes=sum(1 for s in spare if 0 < s <= low_limit),
            taken=self.taken,
            own_kept=self.own_kept,
            fallbacks=self.fallbacks,
        )


def choose_ids(
    beams: np.ndarray,
    scores: np.ndarray,
    item_ids: Sequence[str],
    state: DisambiguationState,
    own: Sequence[Sequence[int] | None] | None = None,
) -> np.ndarray:
    """Pick each item's ID from its beams (best first) and reserve it in ``state``.

    beams: [P, B, L] generated prefixes; scores: [P, B]. ``own[i]``: item i's current ID
    (L+1 codes) under the codebook, or None: a beam equal to its prefix gives the item its
    own ID back (no code taken). Otherwise the first beam whose prefix has a free code
    takes it. Items are processed in item_id order so the result does not depend on batch
    composition within a call. StoreError naming the item when no beam has a code left.
    """
    out = np.empty((len(item_ids), beams.shape[2] + 1), dtype=np.int64)
    for index in sorted(range(len(item_ids)), key=lambda i: item_ids[i]):
        held = None if own is None else own[index]
        mine = None if held is None else [int(c) for c in held]
        chosen = None
        for beam in range(beams.shape[1]):
            if not np.isfinite(scores[index, beam]):
                break
            prefix = [int(c) for c in beams[index, beam]]
            if mine is not None and prefix == mine[:-1]:
                chosen = mine
                state.own_kept += 1
                break
            if state.peek(prefix) < state.last_size:
                chosen = state.take(prefix)
                state.fallbacks += int(beam > 0)
                break
        if chosen is None:
            raise StoreError(
                f"item {item_ids[index]}: every generated prefix has used all "
                f"{state.last_size} disambiguation codes ({state.report().describe()}); "
                "retrain (store train) to re-cluster"
            )
        out[index] = chosen
    return out


def tokenize_new_items(
    model: torch.nn.Module,
    builder: PromptBuilder,
    level_ids: Sequence[Sequence[int]],
    texts: Sequence[str],
    item_ids: Sequence[str],
    existing: np.ndarray,
    *,
    beam_size: int = 10,
    batch_size: int = 32,
) -> np.ndarray:
    """Unique semantic IDs [P, L+1] for new items, given every existing ID [M, L+1]."""
    if len(texts) != len(item_ids):
        raise ValueError("texts and item_ids differ in length")
    if not texts:
        return np.empty((0, len(level_ids)), dtype=np.int64)
    beams, scores = generate_ids(
        model, builder, level_ids, texts, beam_size=beam_size, batch_size=batch_size
    )
    state = DisambiguationState(existing, len(level_ids[-1]))
    return choose_ids(beams, scores, item_ids, state)
