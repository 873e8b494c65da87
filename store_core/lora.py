"""LoRA fine-tuning for Phase B (``recommender.finetune: lora``), through ``peft``.

The adapters go on the attention/MLP projections (``recommender.lora``). The semantic-ID
tokens are new, so their rows must learn under LoRA too: peft's trainable-token adapters
train exactly those rows of the input embedding AND of the output layer (the rest of both
matrices stays frozen; a test checks both). When training ends the adapters are merged,
so the checkpoint is a plain model that every later stage loads as usual.
"""

from __future__ import annotations

from collections.abc import Sequence

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from store_core.config import LoraSettings
from store_core.errors import StoreError


def _module_name(module: object, model: PreTrainedModel) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name.rsplit(".", 1)[-1]
    raise StoreError(f"{type(model).__name__}: embedding module not found by name")


def apply_lora(
    model: PreTrainedModel, settings: LoraSettings, new_token_ids: Sequence[int]
) -> PeftModel:
    """Wrap ``model`` with LoRA adapters; the ``new_token_ids`` rows stay trainable."""
    ids = sorted({int(i) for i in new_token_ids})
    if not ids:
        raise StoreError("LoRA: no semantic-ID tokens to train")
    token_modules = {_module_name(model.get_input_embeddings(), model): ids}
    output = model.get_output_embeddings()
    if output is not None and not model.config.tie_word_embeddings:
        token_modules[_module_name(output, model)] = ids
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        trainable_token_indices=token_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def merged(model: object) -> PreTrainedModel:
    """Plain weights: adapters merged in (a model without adapters is returned as is)."""
    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model  # type: ignore[return-value]
