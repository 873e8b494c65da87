"""A trained recommender checkpoint loaded with everything decoding needs.

Catalogue tokenization, evaluation and ``store recommend`` all start from the same
bundle: the model and tokenizer, the semantic-ID token table per level, the prompt
builder, the checkpoint metadata and the item -> semantic ID table it was trained on.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from store_core.errors import StoreError
from store_core.item_tokenizer import METADATA_FILE, load_semantic_ids
from store_core.model import default_device, load_checkpoint
from store_core.prompts import PROMPT_FORMAT, PromptBuilder, lookup_sid_tokens

logger = logging.getLogger(__name__)


@dataclass
class RecommenderBundle:
    directory: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    metadata: dict[str, Any]
    level_ids: list[list[int]]  # [M][K_m] token id of code c at level m
    builder: PromptBuilder
    semantic_ids: pa.Table  # item_id, codes, sid, packed, content_hash (training-time IDs)

    @property
    def num_levels(self) -> int:
        """L: cluster levels (the ID has L + 1 codes)."""
        return int(self.metadata["num_levels"])

    @property
    def codebook_version(self) -> str:
        return str(self.metadata["codebook_version"])

    @property
    def pack_bits(self) -> int:
        return int(self.metadata["pack_bits"])

    def history_len(self, configured: int) -> int:
        """N the model was trained with (``metadata.json``), which every consumer uses.

        ``configured`` is the config's ``recommender.history_len``; when it differs from
        the trained value a warning says it is overridden by the checkpoint (prompts of
        another length are not what the model learned). Checkpoints without the field
        (none written since Phase B records it) fall back to ``configured``.
        """
        trained = self.metadata.get("history_len")
        if trained is None:
            return configured
        if int(trained) != configured:
            logger.warning(
                "recommender.history_len=%d in the config differs from the %d this "
                "checkpoint was trained with: prompts use the checkpoint's %d",
                configured,
                int(trained),
                int(trained),
            )
        return int(trained)

    def codes(self) -> np.ndarray:
        """[N, L+1] training-time IDs in the order of :attr:`semantic_ids`."""
        return np.array(self.semantic_ids.column("codes").to_pylist(), dtype=np.int64)


def load_bundle(directory: str, device: torch.device | str | None = None) -> RecommenderBundle:
    """Load a Phase B checkpoint directory (``models/recommender-*``), its model on
    ``device`` (default: the GPU where there is one, else the CPU). Every consumer decodes
    through the constrained beam search, which runs where the model is."""
    meta_path = Path(directory) / METADATA_FILE
    if not meta_path.exists():
        raise StoreError(f"{directory} is not a trained recommender: run `store train` first")
    metadata = json.loads(meta_path.read_text())
    if "level_sizes" not in metadata:
        raise StoreError(f"{directory} is a Phase A checkpoint; run `store train` (Phase B)")
    trained_format = int(metadata.get("prompt_format", 1))
    if trained_format != PROMPT_FORMAT:
        raise StoreError(
            f"{directory} was trained with prompt format {trained_format}, this version "
            f"decodes format {PROMPT_FORMAT} (prefix-closed recommendation prompts): "
            "retrain Phase B with `store train --phase recommender`"
        )
    model, tokenizer = load_checkpoint(directory)
    module: torch.nn.Module = model
    module.to(device if device is not None else default_device()).eval()
    level_ids = lookup_sid_tokens(tokenizer, metadata["level_sizes"])
    builder = PromptBuilder(tokenizer, level_ids, int(metadata["max_text_tokens"]))
    return RecommenderBundle(
        directory=directory,
        model=model,
        tokenizer=tokenizer,
        metadata=metadata,
        level_ids=level_ids,
        builder=builder,
        semantic_ids=load_semantic_ids(directory),
    )
