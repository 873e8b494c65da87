"""Phase B dropout: active in training mode only, gone after remove(), bad rates refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from store_core.config import RecommenderConfig
from store_core.dropout import add_dropout, decoder_layers
from store_core.errors import StoreError


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


def _two_passes(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = torch.arange(1, 13).reshape(2, 6)
    with torch.no_grad():
        return model(input_ids=inputs).logits, model(input_ids=inputs).logits


def test_hidden_dropout_only_while_training_and_removed_cleanly() -> None:
    model = _model()
    model.train()
    before, _ = _two_passes(model)
    added = add_dropout(model, hidden=0.3, attention=0.0)
    # 1 embedding hook + attention and MLP hooks on each of the 2 blocks
    assert len(added.handles) == 1 + 2 * 2
    first, second = _two_passes(model)
    assert not torch.equal(first, second)
    model.eval()
    first, second = _two_passes(model)
    assert torch.equal(first, second)
    assert torch.allclose(first, before, atol=1e-6)
    model.train()
    added.remove()
    first, second = _two_passes(model)
    assert torch.equal(first, second)
    assert torch.allclose(first, before, atol=1e-6)


def test_attention_dropout_sets_and_restores_the_rate() -> None:
    model = _model()
    rates = [layer.self_attn.attention_dropout for layer in decoder_layers(model)]
    assert rates == [0.0, 0.0]
    added = add_dropout(model, hidden=0.0, attention=0.25)
    assert [layer.self_attn.attention_dropout for layer in decoder_layers(model)] == [0.25, 0.25]
    assert added.handles == []
    model.train()
    first, second = _two_passes(model)
    assert not torch.equal(first, second)
    added.remove()
    assert [layer.self_attn.attention_dropout for layer in decoder_layers(model)] == [0.0, 0.0]


def test_zero_rates_add_nothing_even_without_blocks() -> None:
    added = add_dropout(nn.Linear(3, 3), hidden=0.0, attention=0.0)
    assert added.handles == [] and added.attention_rates == []


@pytest.mark.parametrize(
    ("hidden", "attention", "message"),
    [
        (1.0, 0.0, "recommender.hidden_dropout must be in [0, 1), got 1.0"),
        (0.0, -0.1, "recommender.attention_dropout must be in [0, 1), got -0.1"),
    ],
)
def test_bad_rates_are_refused(hidden: float, attention: float, message: str) -> None:
    with pytest.raises(StoreError, match=message.replace("[", r"\[").replace(")", r"\)")):
        add_dropout(_model(), hidden=hidden, attention=attention)


def test_model_without_blocks_is_refused() -> None:
    with pytest.raises(StoreError, match="no decoder blocks"):
        add_dropout(nn.Linear(3, 3), hidden=0.1, attention=0.0)


def test_config_validates_rates_at_load() -> None:
    assert RecommenderConfig(hidden_dropout=0.2).hidden_dropout == 0.2
    with pytest.raises(ValueError, match="hidden_dropout"):
        RecommenderConfig(hidden_dropout=1.5)
