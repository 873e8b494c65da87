"""Backbone building/loading, query tokens and checkpoint I/O (tiny models, no download)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from store_core.config import ModelConfig
from store_core.dense_tokens import extract_dense
from store_core.errors import StoreError
from store_core.model import (
    WEIGHTS_FILE,
    add_query_tokens,
    build_backbone,
    count_parameters,
    load_checkpoint,
    query_tokens,
    save_checkpoint,
    save_model_files,
    train_bpe_tokenizer,
)
from store_core.workspace import staged_directory

TEXTS = [
    f"title: Movie {i}; genres: {g}; year: {1980 + i % 40}; about {i % 5} heroes"
    for i, g in enumerate(["Action|Comedy", "Drama", "Sci-Fi|Thriller", "Horror"] * 10)
]
TINY = ModelConfig(
    vocab_size=300,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=64,
    max_text_tokens=24,
)
L = 3


def _weight(module: torch.nn.Module | None) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    assert isinstance(weight, torch.Tensor)
    return weight


def test_bpe_tokenizer_is_deterministic_with_special_tokens() -> None:
    first = train_bpe_tokenizer(TEXTS, 300)
    second = train_bpe_tokenizer(iter(TEXTS), 300)
    assert first.get_vocab() == second.get_vocab()
    assert first("title: Movie 7").input_ids == second("title: Movie 7").input_ids
    assert (first.pad_token, first.bos_token, first.eos_token) == ("<pad>", "<s>", "</s>")
    assert (first.pad_token_id, first.bos_token_id, first.eos_token_id) == (0, 1, 2)
    assert len(first) == 300
    text = "Amélie (2001) — ✓ unseen bytes"
    ids = first(text, add_special_tokens=False).input_ids
    assert first.decode(ids) == text  # byte-level: no unknown tokens, exact round trip
    assert 1 not in ids and 2 not in ids  # no bos/eos added implicitly


def test_query_tokens_are_contiguous_and_mean_initialised() -> None:
    assert query_tokens(3) == ["<q_1>", "<q_2>", "<q_3>"]
    tokenizer = train_bpe_tokenizer(TEXTS, 300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
    )
    old_in = _weight(model.get_input_embeddings()).detach().clone()
    old_out = _weight(model.get_output_embeddings()).detach().clone()
    ids = add_query_tokens(tokenizer, model, L)
    assert ids == [300, 301, 302]
    assert len(tokenizer) == 303
    new_in = _weight(model.get_input_embeddings()).detach()
    new_out = _weight(model.get_output_embeddings()).detach()
    assert new_in.shape == (303, 32) and new_out.shape == (303, 32)
    assert torch.equal(new_in[:300], old_in)
    assert torch.equal(new_out[:300], old_out)
    for i in ids:
        torch.testing.assert_close(new_in[i], old_in.mean(dim=0))
        torch.testing.assert_close(new_out[i], old_out.mean(dim=0))
    assert model.config.vocab_size == 303
    # special: never split, dropped by decode(skip_special_tokens=True)
    encoded = tokenizer("x<q_2>y", add_special_tokens=False).input_ids
    assert 301 in encoded
    assert tokenizer.decode(encoded, skip_special_tokens=True) == "xy"
    # idempotent
    assert add_query_tokens(tokenizer, model, L) == ids
    assert _weight(model.get_input_embeddings()).shape[0] == 303


def test_build_backbone_from_config_is_seeded() -> None:
    model, tokenizer = build_backbone(TINY, TEXTS, L, seed=3)
    again, _ = build_backbone(TINY, TEXTS, L, seed=3)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert model.config.tie_word_embeddings is False
    assert model.config.max_position_embeddings >= 2 * TINY.max_text_tokens + 64
    assert model.config.pad_token_id == tokenizer.pad_token_id == 0
    assert model.config.bos_token_id == 1 and model.config.eos_token_id == 2
    assert tokenizer.convert_tokens_to_ids(query_tokens(L)) == [300, 301, 302]
    for a, b in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        logits: torch.Tensor = model(input_ids=torch.tensor([ids])).logits
    return logits


def test_save_load_round_trip_safetensors_only(tmp_path: Path) -> None:
    model, tokenizer = build_backbone(TINY, TEXTS, L, seed=0)
    ids = [1, *tokenizer("title: Movie 3", add_special_tokens=False).input_ids, 300, 301, 302]
    expected = _logits(model, ids)
    target = tmp_path / "ckpt"
    save_checkpoint(model, tokenizer, target)

    files = sorted(p.name for p in target.iterdir())
    assert WEIGHTS_FILE in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    config = json.loads((target / "config.json").read_text())
    assert "auto_map" not in config  # nothing that would need trust_remote_code
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging leftovers

    loaded, loaded_tok = load_checkpoint(target)
    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=0, atol=0)
    assert loaded_tok.convert_tokens_to_ids(query_tokens(L)) == [300, 301, 302]
    assert loaded_tok.pad_token_id == 0 and loaded_tok.eos_token_id == 2
    assert loaded.get_input_embeddings().weight.dtype == torch.float32


def test_save_checkpoint_replaces_and_staging_keeps_old_on_error(tmp_path: Path) -> None:
    model, tokenizer = build_backbone(TINY, TEXTS, L, seed=0)
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    save_checkpoint(model, tokenizer, target)
    assert not (target / "stale.txt").exists()

    with staged_directory(str(target)) as staging:
        save_model_files(model, tokenizer, staging)
        (Path(staging) / "codebook.json").write_text("{}")
    assert (target / "codebook.json").exists() and (target / WEIGHTS_FILE).exists()

    with pytest.raises(RuntimeError), staged_directory(str(target)) as staging:
        (Path(staging) / "partial").write_text("x")
        raise RuntimeError("crash mid-write")
    assert (target / "codebook.json").exists()
    assert not (target / "partial").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_build_backbone_from_local_pretrained_path(tmp_path: Path) -> None:
    tokenizer = train_bpe_tokenizer(TEXTS, 300)
    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    )
    directory = tmp_path / "pretrained"
    base.save_pretrained(directory)  # plain HF, without query tokens
    tokenizer.save_pretrained(directory)

    cfg = TINY.model_copy(update={"name_or_path": str(directory)})
    model, loaded_tok = build_backbone(cfg, [], L, seed=0)
    assert loaded_tok.convert_tokens_to_ids(query_tokens(L)) == [300, 301, 302]
    assert _weight(model.get_input_embeddings()).shape[0] == 303
    torch.testing.assert_close(
        _weight(model.get_input_embeddings())[:300], _weight(base.get_input_embeddings())
    )
    dense = extract_dense(
        model, loaded_tok, TEXTS[:5], max_text_tokens=24, num_query_tokens=L, progress=False
    )
    assert dense.shape == (5, L, 32) and dense.dtype == np.float32
    assert np.isfinite(dense).all()


def test_missing_paths_raise_store_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(StoreError, match="no such directory"):
        build_backbone(TINY.model_copy(update={"name_or_path": str(missing)}), [], L, seed=0)
    with pytest.raises(StoreError, match="no such directory"):
        build_backbone(TINY.model_copy(update={"name_or_path": "./no-such-model"}), [], L, 0)
    with pytest.raises(StoreError):
        load_checkpoint(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StoreError):
        build_backbone(TINY.model_copy(update={"name_or_path": str(empty)}), [], L, seed=0)
