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
from store_core.quantizer import extend_disambiguation

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
    last_size = len(level_ids[-1])
    issued = np.asarray(existing, dtype=np.int64).reshape(-1, len(level_ids))
    out = np.empty((len(texts), len(level_ids)), dtype=np.int64)
    # One item at a time (in item_id order) so items sharing a prefix get distinct codes.
    for index in sorted(range(len(texts)), key=lambda i: item_ids[i]):
        chosen = None
        for beam in range(beams.shape[1]):
            if not np.isfinite(scores[index, beam]):
                break
            candidate = extend_disambiguation(
                issued, beams[index, beam][None, :], [item_ids[index]]
            )
            if candidate[0, -1] < last_size:
                chosen = candidate[0]
                break
        if chosen is None:
            raise StoreError(
                f"item {item_ids[index]}: every generated prefix has used all {last_size} "
                "disambiguation codes; retrain (store train) to re-cluster the catalogue"
            )
        out[index] = chosen
        issued = np.vstack([issued, chosen[None, :]])
    return out
