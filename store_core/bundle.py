"""A trained recommender checkpoint loaded with everything decoding needs.

Catalogue tokenization, evaluation and ``store recommend`` all start from the same
bundle: the model and tokenizer, the semantic-ID token table per level, the prompt
builder, the checkpoint metadata and the item -> semantic ID table it was trained on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from store_core import checkpoint as ckpt
from store_core.config import StoreConfig
from store_core.errors import StoreError
from store_core.model import default_device, load_checkpoint
from store_core.prompts import PROMPT_FORMAT, PromptBuilder, lookup_sid_tokens

logger = logging.getLogger(__name__)


@dataclass
class RecommenderBundle:
    directory: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    metadata: ckpt.RecommenderMetadata
    level_ids: list[list[int]]  # [M][K_m] token id of code c at level m
    builder: PromptBuilder
    semantic_ids: pa.Table  # SEMANTIC_ID_ROW_SCHEMA: the training-time IDs
    _warned: set[str] = field(default_factory=set, repr=False)

    @property
    def cluster_levels(self) -> int:
        """L: cluster levels (the ID has L + 1 codes)."""
        return self.metadata.cluster_levels

    @property
    def codebook_version(self) -> str:
        return self.metadata.codebook_version

    @property
    def pack_bits(self) -> int:
        return self.metadata.pack_bits

    def trained(self, cfg: StoreConfig) -> ckpt.RecommenderMetadata:
        """The training-time settings every consumer uses (the checkpoint's, not ``cfg``'s).

        Each setting of :data:`store_core.checkpoint.TRAINED_SETTINGS` that ``cfg`` sets
        otherwise (e.g. ``--set recommender.history_len=5`` on a model trained on 20-item
        prompts) is named in a warning, once per bundle, saying the checkpoint's value is
        used: prompts of another shape are not what the model learned.
        """
        ckpt.warn_overrides(self.metadata, cfg, self.directory, self._warned)
        return self.metadata

    def codes(self) -> np.ndarray:
        """[N, L+1] training-time IDs in the order of :attr:`semantic_ids`."""
        return np.array(self.semantic_ids.column("codes").to_pylist(), dtype=np.int64)


def load_bundle(directory: str, device: torch.device | str | None = None) -> RecommenderBundle:
    """Load a Phase B checkpoint directory (``models/recommender-*``), its model on
    ``device`` (default: the GPU where there is one, else the CPU). Every consumer decodes
    through the constrained beam search, which runs where the model is.

    StoreError (one line) when ``directory`` holds no Phase B checkpoint, or one this
    release cannot decode (metadata of an incompatible format, another prompt format).
    """
    metadata = ckpt.read_recommender_metadata(directory)
    if metadata.prompt_format != PROMPT_FORMAT:
        raise StoreError(
            f"{directory} was trained with prompt format {metadata.prompt_format}, this "
            f"version decodes format {PROMPT_FORMAT} (prefix-closed recommendation prompts): "
            "retrain Phase B with `store train --phase recommender`"
        )
    model, tokenizer = load_checkpoint(directory)
    module: torch.nn.Module = model
    module.to(device if device is not None else default_device()).eval()
    level_ids = lookup_sid_tokens(tokenizer, metadata.level_sizes)
    builder = PromptBuilder(tokenizer, level_ids, metadata.max_text_tokens)
    return RecommenderBundle(
        directory=directory,
        model=model,
        tokenizer=tokenizer,
        metadata=metadata,
        level_ids=level_ids,
        builder=builder,
        semantic_ids=ckpt.read_semantic_ids(directory),
    )
