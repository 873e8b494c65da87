"""Phase B end to end on tiny data: vocabulary, training, overfitting, new items."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from store_core.bundle import load_bundle
from store_core.checkpoint import (
    METADATA_FILE,
    METRICS_FILE,
    read_recommender_metadata,
    read_semantic_ids,
)
from store_core.config import StoreConfig, load_config
from store_core.errors import StoreError
from store_core.generate import SemanticIdTrie, constrained_beam_search
from store_core.ingest import run_ingest
from store_core.item_tokenizer import train_semantic_tokenizer
from store_core.model import load_checkpoint
from store_core.new_items import tokenize_new_items
from store_core.prompts import PROMPT_FORMAT, PromptBuilder
from store_core.quantizer import load_codebook
from store_core.recommender_training import (
    add_semantic_id_tokens,
    level_sizes,
    recommender_dir,
    train_recommender,
    training_key,
)
from store_core.semantic_ids import level_token
from store_core.tasks import TASKS, RenderSettings, load_task_data
from tests.conftest import copy_workspace

pytestmark = pytest.mark.pipeline  # trains the tiny models


def prepared(ws: Path, *overrides: str) -> StoreConfig:
    cfg = load_config("tiny", [f"workspace={ws}", "tracking.enabled=false", *overrides])
    run_ingest(cfg)
    assert train_semantic_tokenizer(cfg) is not None
    return cfg


@pytest.fixture(scope="module")
def tiny_trained(tiny_pipeline: Path) -> tuple[StoreConfig, Path]:
    cfg = load_config("tiny", [f"workspace={tiny_pipeline}", "tracking.enabled=false"])
    return cfg, Path(recommender_dir(cfg))


def test_checkpoint_and_metrics(tiny_trained: tuple[StoreConfig, Path]) -> None:
    cfg, ckpt = tiny_trained
    assert ckpt == Path(recommender_dir(cfg))
    assert ckpt.name == "recommender-store-multitask"
    metrics = json.loads((ckpt / METRICS_FILE).read_text())
    assert set(metrics["samples_per_task"]) == {"recommendation", "alignment", "reconstruction"}
    assert metrics["samples_per_task"]["alignment"] == 48
    assert len(metrics["validation"]) >= 1
    assert 0.0 <= metrics["best_val_ndcg_at_10"] <= 1.0
    assert 0.0 <= metrics["agreement_full_id"] <= metrics["agreement_first_code"] <= 1.0
    meta = read_recommender_metadata(ckpt)
    assert meta.level_sizes[:3] == [8, 8, 8]
    _, tokenizer = load_checkpoint(str(ckpt))
    assert level_token(0, 7) in tokenizer.get_vocab()
    assert level_token(3, meta.level_sizes[3] - 1) in tokenizer.get_vocab()
    # What shaped the prompts is recorded; sequence mode labelled every target once.
    assert meta.prompt_format == PROMPT_FORMAT == 2 and meta.rec_samples == "sequence"
    assert metrics["targets_per_task"]["recommendation"] == 156  # tiny's train targets
    assert metrics["samples_per_task"]["recommendation"] == 46  # in 46 windows
    assert metrics["train_targets_per_s"] > 0


def test_checkpoint_of_an_older_prompt_format_is_refused(
    tiny_trained: tuple[StoreConfig, Path], tmp_path: Path
) -> None:
    _, ckpt = tiny_trained
    old = copy_workspace(ckpt, tmp_path / "old")
    meta = json.loads((old / METADATA_FILE).read_text())
    del meta["prompt_format"]  # written before sequence mode: format 1
    (old / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"prompt format 1.*retrain Phase B"):
        load_bundle(str(old))


def test_new_token_rows_change_during_training(tiny_trained: tuple[StoreConfig, Path]) -> None:
    cfg, ckpt = tiny_trained
    phase_a = Path(cfg.models_dir) / "tokenizer-store"
    model, tokenizer = load_checkpoint(str(phase_a))
    codes = np.array(read_semantic_ids(str(phase_a)).column("codes").to_pylist())
    codebook = load_codebook(phase_a)
    level_ids = add_semantic_id_tokens(model, tokenizer, codebook, level_sizes(codes, codebook))
    trained, trained_tok = load_checkpoint(str(ckpt))
    assert len(trained_tok) == len(tokenizer)
    used = sorted({level_ids[lv][c] for row in codes for lv, c in enumerate(row)})
    index = torch.tensor(used)
    before_in = model.get_input_embeddings().weight[index]
    after_in = trained.get_input_embeddings().weight[index]
    before_out = model.get_output_embeddings().weight[index]
    after_out = trained.get_output_embeddings().weight[index]
    # Every semantic-ID token that occurs in the data moved, in both matrices.
    assert bool(((before_in - after_in).abs().sum(dim=1) > 0).all())
    assert bool(((before_out - after_out).abs().sum(dim=1) > 0).all())


def test_untrained_constraint_gives_only_valid_ids(tiny_trained: tuple[StoreConfig, Path]) -> None:
    _, ckpt = tiny_trained
    model, tokenizer = load_checkpoint(str(ckpt))
    meta = read_recommender_metadata(ckpt)
    table = read_semantic_ids(str(ckpt))
    codes = np.array(table.column("codes").to_pylist())
    level_ids = [
        [int(tokenizer.convert_tokens_to_ids(level_token(lv, c))) for c in range(size)]
        for lv, size in enumerate(meta.level_sizes)
    ]
    builder = PromptBuilder(tokenizer, level_ids, 32)
    prompts = [builder.alignment(f"some new gadget number {i}") for i in range(5)]
    result = constrained_beam_search(
        model, prompts, SemanticIdTrie.from_codes(codes, level_ids), beam_size=10,
        pad_token_id=builder.pad_token_id,
    )  # fmt: skip
    valid = {tuple(row) for row in codes.tolist()}
    for p in range(len(prompts)):
        for b in range(10):
            if result.items[p, b] >= 0:
                assert tuple(result.codes[p, b].tolist()) in valid


def test_text_to_token_for_new_items_without_retraining(
    tiny_trained: tuple[StoreConfig, Path],
) -> None:
    _, ckpt = tiny_trained
    model, tokenizer = load_checkpoint(str(ckpt))
    meta = read_recommender_metadata(ckpt)
    existing = np.array(read_semantic_ids(str(ckpt)).column("codes").to_pylist())
    level_ids = [
        [int(tokenizer.convert_tokens_to_ids(level_token(lv, c))) for c in range(size)]
        for lv, size in enumerate(meta.level_sizes)
    ]
    builder = PromptBuilder(tokenizer, level_ids, 32)
    texts = [
        "Acme Beaker XL. A beaker for lab equipment work.",
        "Acme Beaker XL. A beaker for lab equipment work.",  # same text twice
        "Voltix Probe. A probe for electronics work.",
    ]
    new = tokenize_new_items(model, builder, level_ids, texts, ["n1", "n2", "n3"], existing)
    assert new.shape == (3, 4)
    all_ids = {tuple(r) for r in existing.tolist()} | {tuple(r) for r in new.tolist()}
    assert len(all_ids) == len(existing) + 3  # unique against the catalogue and each other
    for row in new.tolist():
        assert all(0 <= c < size for c, size in zip(row, meta.level_sizes, strict=True))
    # Same text -> same generated prefix, distinct disambiguation codes.
    assert new[0, :3].tolist() == new[1, :3].tolist()
    assert new[0, 3] != new[1, 3]


def test_tiny_model_overfits_to_the_right_next_id(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    items = {str(i): {"title": f"Thing {i}", "categories": f"Cat {i % 2}"} for i in range(8)}
    users = {f"u{u}": [str((u + k) % 8) for k in range(6)] for u in range(8)}
    (src / "Toy.item.json").write_text(json.dumps(items))
    (src / "Toy.inter.json").write_text(json.dumps(users))
    cfg = prepared(
        tmp_path / "ws",
        f"data.path={src}",
        "data.name=Toy",
        "semantic_id.codebook_size=2",
        "recommender.mixture=[{task: recommendation, weight: 4}]",
        "recommender_train.epochs=360",  # 8 windows x 4 a pass: 720 steps, as 24 prefixes
        "recommender_train.eval_every=720",
        "recommender_train.lr=0.01",
        "recommender.early_stopping_patience=5",
    )
    outcome = train_recommender(cfg)
    assert outcome is not None
    assert outcome.metrics["final_train_loss"] < 0.1
    # Memorised: for every training prefix the top beam is the right next item.
    bundle = load_bundle(outcome.checkpoint_dir)
    codes = bundle.codes()
    item_ids = bundle.semantic_ids.column("item_id").to_pylist()
    data = load_task_data(cfg.data_dir, dict(zip(item_ids, codes.tolist(), strict=True)))
    # Trained in sequence mode (one window per user); checked per prefix.
    settings = RenderSettings(cfg.recommender.history_len, "prefix")
    samples = TASKS["recommendation"](data, bundle.builder, settings)
    assert len(samples) == 8 * 3
    trie = SemanticIdTrie.from_codes(codes, bundle.level_ids)

    def codes_of(token_ids: list[int]) -> list[int]:
        return [bundle.level_ids[lv].index(t) for lv, t in enumerate(token_ids)]

    targets = trie.lookup(np.array([codes_of(s.completion) for s in samples]))
    result = constrained_beam_search(
        bundle.model, [s.prompt for s in samples], trie, beam_size=4,
        pad_token_id=bundle.builder.pad_token_id,
    )  # fmt: skip
    assert result.items[:, 0].tolist() == targets.tolist()


def test_training_key_separates_runs_that_must_not_share_checkpoints() -> None:
    """Another mixture, loss, budget or set of IDs gets its own resumable checkpoints."""
    cfg = load_config("tiny")
    item_ids = ["a", "b"]
    codes = np.array([[0, 1, 0], [0, 1, 1]])
    key = training_key(cfg, item_ids, codes)
    assert key == training_key(load_config("tiny"), list(item_ids), codes.copy())
    others = [
        training_key(
            load_config("tiny", ["recommender.loss_normalization=token"]), item_ids, codes
        ),
        training_key(load_config("tiny", ["recommender.rec_samples=prefix"]), item_ids, codes),
        training_key(
            load_config("tiny", ["recommender.mixture=[{task: recommendation, weight: 1}]"]),
            item_ids,
            codes,
        ),
        training_key(load_config("tiny", ["recommender_train.lr=0.1"]), item_ids, codes),
        training_key(cfg, item_ids, np.array([[0, 1, 0], [1, 1, 0]])),
        training_key(cfg, ["a", "c"], codes),
    ]
    assert len({key, *others}) == 7
    # The old name of 'target' averaging is read as 'target': the same training.
    old_name = load_config("tiny", ["recommender.loss_normalization=sample"])
    assert old_name.recommender.loss_normalization == "target"
    assert training_key(old_name, item_ids, codes) == key
    # decoding-only settings share the checkpoints of the same training
    decoding = ["recommender.cold_start_backoff=1", "recommender.cold_start_backoff_depth=1"]
    memory = ("weight=0.5", "depth=3", "decay=1", "window=3", "window_decay=0.5", "symmetric=true")
    decoding += [f"recommender.transition_memory_{setting}" for setting in memory]
    assert training_key(load_config("tiny", decoding), item_ids, codes) == key
    # id_normalization trains differently; at its default ("level") the key is the one
    # checkpoints had before the option existed (computed at 75e7c49), so they resume.
    trie = load_config("tiny", ["recommender.id_normalization=trie"])
    assert training_key(trie, item_ids, codes) not in {key, *others}
    pinned_codes = np.array([[0, 1, 2, 0], [1, 1, 2, 0]])
    assert training_key(load_config("tiny"), item_ids, pinned_codes) == "41f3d6bcd097"


def test_lora_trains_the_new_token_rows_and_saves_plain_weights(
    tiny_pipeline: Path, tmp_path: Path
) -> None:
    """finetune=lora: adapters + the semantic-ID rows of both matrices train, the rest of
    both matrices and every non-adapted weight stay frozen; the checkpoint is merged."""
    ws = copy_workspace(tiny_pipeline, tmp_path / "ws")
    cfg = load_config(
        "tiny",
        [
            f"workspace={ws}",
            "tracking.enabled=false",
            "recommender.finetune=lora",
            "recommender.lora.r=4",
            "recommender.lora.target_modules=[q_proj, v_proj]",
            "recommender_train.max_steps=30",
            "recommender_train.lr=0.01",
        ],
    )
    outcome = train_recommender(cfg)
    assert outcome is not None
    phase_a = Path(cfg.models_dir) / "tokenizer-store"
    base, tokenizer = load_checkpoint(str(phase_a))
    codes = np.array(read_semantic_ids(str(phase_a)).column("codes").to_pylist())
    codebook = load_codebook(phase_a)
    level_ids = add_semantic_id_tokens(base, tokenizer, codebook, level_sizes(codes, codebook))
    trained, _ = load_checkpoint(outcome.checkpoint_dir)  # plain Llama: no adapter keys
    assert not any("lora" in name for name, _ in trained.named_parameters())
    assert outcome.metrics["finetune"] == "lora"
    total = sum(p.numel() for p in trained.parameters())
    assert 0 < outcome.metrics["trainable_parameters"] < total / 4

    used = sorted({level_ids[lv][c] for row in codes for lv, c in enumerate(row)})
    old = torch.arange(min(t for ids in level_ids for t in ids))  # rows before the new ones
    for get in ("get_input_embeddings", "get_output_embeddings"):
        before, after = getattr(base, get)().weight, getattr(trained, get)().weight
        moved = (before[used] - after[used]).abs().sum(dim=1) > 0
        assert bool(moved.all()), get  # every semantic-ID token that occurs moved
        assert torch.equal(before[old], after[old]), get  # the old vocabulary is frozen
    layer_before, layer_after = base.model.layers[0], trained.model.layers[0]
    assert not torch.equal(
        layer_before.self_attn.q_proj.weight, layer_after.self_attn.q_proj.weight
    )
    assert torch.equal(layer_before.self_attn.k_proj.weight, layer_after.self_attn.k_proj.weight)
    assert torch.equal(layer_before.mlp.down_proj.weight, layer_after.mlp.down_proj.weight)
