"""The semantic tokenizer stage end to end on the tiny dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from store_core.checkpoint import (
    FORMAT_VERSION,
    METADATA_FILE,
    SEMANTIC_IDS_FILE,
    STATS_FILE,
    read_semantic_ids,
    read_tokenizer_metadata,
)
from store_core.config import StoreConfig, load_config
from store_core.dense_tokens import extract_dense
from store_core.ingest import run_ingest
from store_core.item_tokenizer import train_semantic_tokenizer
from store_core.last_level_assignment import assign_codes
from store_core.model import load_checkpoint, train_bpe_tokenizer
from store_core.quantizer import disambiguate, load_codebook
from store_core.semantic_ids import parse_sid

pytestmark = pytest.mark.pipeline  # trains the tiny models


def tiny(ws: Path, *overrides: str) -> StoreConfig:
    cfg = load_config("tiny", [f"workspace={ws}", "tracking.enabled=false", *overrides])
    run_ingest(cfg)
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[StoreConfig, Path]:
    cfg = tiny(tmp_path_factory.mktemp("tok") / "ws")
    outcome = train_semantic_tokenizer(cfg)
    assert outcome is not None
    return cfg, Path(outcome.checkpoint_dir)


def test_every_item_gets_a_unique_semantic_id(trained: tuple[StoreConfig, Path]) -> None:
    cfg, ckpt = trained
    table = read_semantic_ids(str(ckpt))
    assert table.num_rows == 48
    sids = table.column("sid").to_pylist()
    assert len(set(sids)) == 48
    codes = table.column("codes").to_pylist()
    assert all(parse_sid(s) == c for s, c in zip(sids, codes, strict=True))
    assert all(len(c) == cfg.semantic_id.cluster_levels + 1 for c in codes)
    packed = table.column("packed").to_pylist()
    assert len(set(packed)) == 48


def test_artifacts_and_stats(trained: tuple[StoreConfig, Path]) -> None:
    _, ckpt = trained
    names = {p.name for p in ckpt.iterdir()}
    assert {
        "model.safetensors",
        "codebook.safetensors",
        "codebook.json",
        METADATA_FILE,
        STATS_FILE,
        SEMANTIC_IDS_FILE,
        "codebook_usage.png",
        "tokenizer.json",
    } <= names
    assert not [n for n in names if n.endswith((".bin", ".pkl", ".pt"))]
    stats = json.loads((ckpt / STATS_FILE).read_text())
    assert 0.0 <= stats["collision_rate"] <= 1.0
    assert len(stats["levels"]) == 3
    assert all(lv["perplexity"] >= 1.0 for lv in stats["levels"])
    assert stats["train_steps"] == 20
    assert "token_accuracy" in stats["heldout_reconstruction"]
    coherence = stats["coherence_first_code"]
    assert coherence["same_prefix_category_match"] >= coherence["random_category_match"]
    meta = read_tokenizer_metadata(ckpt)
    assert meta.format_version == FORMAT_VERSION
    assert meta.codebook_version == stats["codebook_version"]
    assert meta.cluster_levels == 3
    assert len(meta.data_manifest_items_sha256) == 64


def test_reloaded_checkpoint_reproduces_the_ids(trained: tuple[StoreConfig, Path]) -> None:
    cfg, ckpt = trained
    model, tokenizer = load_checkpoint(str(ckpt))
    items = pq.read_table(Path(cfg.data_dir) / "items.parquet")
    dense = extract_dense(
        model,
        tokenizer,
        items.column("text").to_pylist(),
        max_text_tokens=cfg.model.max_text_tokens,
        num_query_tokens=cfg.semantic_id.cluster_levels,
    )
    codebook = load_codebook(ckpt)
    sid_cfg = cfg.semantic_id
    codes = assign_codes(
        codebook, dense, sid_cfg.last_level_assignment, sid_cfg.last_level_capacity
    )
    sids = disambiguate(codes, items.column("item_id").to_pylist())
    table = read_semantic_ids(str(ckpt))
    assert sids.tolist() == table.column("codes").to_pylist()


def test_same_seed_same_ids_and_rerun_resumes(
    trained: tuple[StoreConfig, Path], tmp_path: Path
) -> None:
    cfg, ckpt = trained
    first = read_semantic_ids(str(ckpt)).column("sid").to_pylist()
    again = train_semantic_tokenizer(cfg)  # same workspace: resumes the finished training
    assert again is not None and again.train_steps == 20
    assert read_semantic_ids(again.checkpoint_dir).column("sid").to_pylist() == first
    other = train_semantic_tokenizer(tiny(tmp_path / "ws2"))  # fresh run, same seed
    assert other is not None
    assert read_semantic_ids(other.checkpoint_dir).column("sid").to_pylist() == first


def test_rqkmeans_quantizer(trained: tuple[StoreConfig, Path]) -> None:
    cfg, _ = trained
    rq_cfg = cfg.model_copy(
        update={"semantic_id": cfg.semantic_id.model_copy(update={"quantizer": "rqkmeans"})}
    )
    outcome = train_semantic_tokenizer(rq_cfg)
    assert outcome is not None
    assert outcome.checkpoint_dir.endswith("tokenizer-rqkmeans")
    assert outcome.stats["quantizer"] == "rqkmeans"
    table = read_semantic_ids(outcome.checkpoint_dir)
    assert len(set(table.column("sid").to_pylist())) == 48


def test_pretrained_model_loaded_by_path(tmp_path: Path) -> None:
    """The route of a user with a pretrained Qwen/Llama: a local model directory."""
    cfg0 = tiny(tmp_path / "ws")
    texts = pq.read_table(Path(cfg0.data_dir) / "items.parquet").column("text").to_pylist()
    tokenizer = train_bpe_tokenizer(texts, 400)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
    )
    pretrained = tmp_path / "my-pretrained-llm"
    model.save_pretrained(pretrained)
    tokenizer.save_pretrained(pretrained)
    cfg = load_config(
        "tiny",
        [
            f"workspace={tmp_path / 'ws'}",
            "tracking.enabled=false",
            f"model.name_or_path={pretrained}",
            "tokenizer_train.max_steps=4",
        ],
    )
    outcome = train_semantic_tokenizer(cfg)
    assert outcome is not None
    assert read_tokenizer_metadata(outcome.checkpoint_dir).backbone == str(pretrained)
    reloaded, tok = load_checkpoint(outcome.checkpoint_dir)
    assert len(tok) == len(tokenizer) + 3  # the three query tokens were added
    assert reloaded.get_input_embeddings().weight.shape[0] >= len(tok)
    assert len(set(read_semantic_ids(outcome.checkpoint_dir).column("sid").to_pylist())) == 48
    assert np.isfinite(outcome.stats["final_train_loss"])
