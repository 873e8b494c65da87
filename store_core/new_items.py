"""Text -> token for items the model has never seen: no retraining.

The Phase B model generates an ID from the item's text with the alignment prompt, each
level constrained to that level's valid codes. The disambiguation level then makes it
unique against every ID already issued under the codebook: a new item takes the next
free last code of its prefix. Among the beams (best first) the first whose next free
code has a token in the vocabulary wins; Phase B reserves spare disambiguation tokens so
this practically always holds on the first beam. Existing items keep their IDs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

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
    num_levels = len(level_ids) - 1
    prompts = [builder.alignment(text) for text in texts]
    result = constrained_beam_search(
        model,
        prompts,
        SemanticIdTrie.levelwise(level_ids[:num_levels]),
        beam_size=beam_size,
        pad_token_id=builder.pad_token_id,
        batch_size=batch_size,
    )
    return result.codes, result.scores


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

    def peek(self, prefix: Sequence[int]) -> int:
        return self.next_free.get(tuple(int(c) for c in prefix), 0)

    def take(self, prefix: Sequence[int]) -> list[int]:
        key = tuple(int(c) for c in prefix)
        code = self.next_free.get(key, 0)
        self.next_free[key] = code + 1
        return [*key, code]


def choose_ids(
    beams: np.ndarray, scores: np.ndarray, item_ids: Sequence[str], state: DisambiguationState
) -> np.ndarray:
    """Pick each item's ID from its beams (best first) and reserve it in ``state``.

    beams: [P, B, L] generated prefixes; scores: [P, B]. Items are processed in item_id
    order so the result does not depend on batch composition within a call.
    """
    out = np.empty((len(item_ids), beams.shape[2] + 1), dtype=np.int64)
    for index in sorted(range(len(item_ids)), key=lambda i: item_ids[i]):
        chosen = None
        for beam in range(beams.shape[1]):
            if not np.isfinite(scores[index, beam]):
                break
            if state.peek(beams[index, beam]) < state.last_size:
                chosen = state.take(beams[index, beam])
                break
        if chosen is None:
            raise StoreError(
                f"item {item_ids[index]}: every generated prefix has used all "
                f"{state.last_size} disambiguation codes; retrain (store train) to re-cluster"
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
