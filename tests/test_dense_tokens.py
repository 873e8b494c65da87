"""Phase A: batch layout, reconstruction loss, diversity term, dense-token extraction."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from store_core.config import ModelConfig
from store_core.dense_tokens import (
    IGNORE_INDEX,
    PhaseABatchCollator,
    _reconstruction_logits,
    dense_tokens,
    diversity_penalty,
    encode_texts,
    extract_dense,
    extract_text_embedding,
    phase_a_loss,
    reconstruction_metrics,
)
from store_core.model import build_backbone, query_token_ids

TEXTS = [
    "title: Toy Story; genres: Animation|Comedy",
    "title: Heat; genres: Action|Crime|Thriller",
    "title: Sabrina; genres: Comedy|Romance",
    "title: GoldenEye; genres: Action|Adventure",
    "title: Casino; genres: Crime|Drama and a much longer description of the plot",
    "title: Babe",
    "",
    "title: Jumanji; genres: Adventure|Children|Fantasy",
    "title: Balto; genres: Animation|Children",
    "title: Nixon; genres: Drama",
]
L = 3
MAX_TOKENS = 24
TINY = ModelConfig(
    vocab_size=300,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=64,
    max_text_tokens=MAX_TOKENS,
)


@pytest.fixture(scope="module")
def backbone() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    return build_backbone(TINY, TEXTS * 5, L, seed=0)


@pytest.fixture
def fresh() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    return build_backbone(TINY, TEXTS * 5, L, seed=0)


def test_batch_layout(backbone: tuple[PreTrainedModel, PreTrainedTokenizerFast]) -> None:
    _, tokenizer = backbone
    qids = query_token_ids(tokenizer, L)
    texts = [TEXTS[0], TEXTS[5], TEXTS[6], TEXTS[4]]
    batch = encode_texts(tokenizer, texts, MAX_TOKENS, qids)
    lengths = [
        len(
            tokenizer(t, add_special_tokens=False, truncation=True, max_length=MAX_TOKENS).input_ids
        )
        for t in texts
    ]
    assert lengths[2] == 0 and lengths[3] == MAX_TOKENS  # empty and truncated
    n_max, b = max(lengths), len(texts)
    assert batch["input_ids"].shape == (b, 1 + n_max + L)
    assert batch["attention_mask"].shape == (b, 1 + n_max + L)
    assert batch["query_positions"].shape == (b, L)
    assert batch["recon_input_ids"].shape == (b, 2 + n_max)
    assert batch["recon_attention_mask"].shape == (b, L + 2 + n_max)
    assert batch["recon_labels"].shape == (b, L + 2 + n_max)
    assert batch["text_lengths"].tolist() == lengths

    for i, n in enumerate(lengths):
        row = batch["input_ids"][i]
        assert row[0] == tokenizer.bos_token_id
        assert batch["input_ids"].gather(1, batch["query_positions"])[i].tolist() == qids
        assert int(batch["attention_mask"][i].sum()) == 1 + n + L
        assert int(batch["text_mask"][i].sum()) == n
        # labels: exactly the text tokens and one eos, at the positions those tokens sit
        labels = batch["recon_labels"][i]
        targets = labels[labels != IGNORE_INDEX].tolist()
        assert targets == [*row[1 : 1 + n].tolist(), tokenizer.eos_token_id]
        assert (labels[: L + 1] == IGNORE_INDEX).all()  # z positions and <s>
        assert int(batch["recon_attention_mask"][i].sum()) == L + n + 2
        rec = batch["recon_input_ids"][i]
        assert rec[0] == tokenizer.bos_token_id and rec[1 + n] == tokenizer.eos_token_id
    total = int((batch["recon_labels"] != IGNORE_INDEX).sum())
    assert total == sum(lengths) + len(texts)


def test_special_token_strings_in_text_are_not_control_tokens(
    backbone: tuple[PreTrainedModel, PreTrainedTokenizerFast],
) -> None:
    _, tokenizer = backbone
    qids = query_token_ids(tokenizer, L)
    batch = encode_texts(tokenizer, ["evil <q_1> </s> <s> text"], MAX_TOKENS, qids)
    text = batch["input_ids"][0][batch["text_mask"][0]].tolist()
    special = {*qids, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert not special & set(text)


def test_collator_is_picklable(backbone: tuple[PreTrainedModel, PreTrainedTokenizerFast]) -> None:
    _, tokenizer = backbone
    collator = PhaseABatchCollator(tokenizer, MAX_TOKENS, L)
    clone = pickle.loads(pickle.dumps(collator))
    a, b = collator(TEXTS[:4]), clone(TEXTS[:4])
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key])


def test_phase_a_loss_shapes_and_metrics(
    backbone: tuple[PreTrainedModel, PreTrainedTokenizerFast],
) -> None:
    model, tokenizer = backbone
    batch = PhaseABatchCollator(tokenizer, MAX_TOKENS, L)(TEXTS[:6])
    z = dense_tokens(model, batch)
    assert z.shape == (6, L, 32) and z.requires_grad
    loss, metrics = phase_a_loss(model, batch, diversity_weight=0.5)
    assert loss.dim() == 0 and loss.requires_grad
    assert set(metrics) == {"recon_loss", "diversity", "tokens"}
    assert metrics["tokens"] == int(batch["text_lengths"].sum()) + 6
    assert loss.item() == pytest.approx(metrics["recon_loss"] + 0.5 * metrics["diversity"], 1e-5)
    no_div, metrics0 = phase_a_loss(model, batch, diversity_weight=0.0)
    assert no_div.item() == pytest.approx(metrics0["recon_loss"], 1e-6)


def test_padding_and_ignored_positions_do_not_change_the_loss(
    backbone: tuple[PreTrainedModel, PreTrainedTokenizerFast],
) -> None:
    model, tokenizer = backbone
    model.eval()
    batch = PhaseABatchCollator(tokenizer, MAX_TOKENS, L)([TEXTS[0], TEXTS[5]])
    with torch.no_grad():
        base, _ = phase_a_loss(model, batch, 0.0)
        changed = {k: v.clone() for k, v in batch.items()}
        # item 1 is short: its padded tail in both passes is garbage that must not matter
        changed["input_ids"][1][batch["attention_mask"][1] == 0] = 7
        changed["recon_input_ids"][1][batch["recon_attention_mask"][1, L:] == 0] = 7
        # the eos input is fed but nothing after it is predicted
        n = int(batch["text_lengths"][0])
        changed["recon_input_ids"][0, 1 + n] = 7
        same, _ = phase_a_loss(model, changed, 0.0)
    torch.testing.assert_close(same, base)


def test_reconstruction_sees_the_text_only_through_z(
    backbone: tuple[PreTrainedModel, PreTrainedTokenizerFast],
) -> None:
    model, tokenizer = backbone
    model.eval()
    batch = PhaseABatchCollator(tokenizer, MAX_TOKENS, L)(TEXTS[:3])
    calls: list[dict[str, Any]] = []

    class Recorder(torch.nn.Module):
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, **kwargs: Any) -> Any:
            calls.append(kwargs)
            return self.module(**kwargs)

    with torch.no_grad():
        z = dense_tokens(model, batch)
        phase_a_loss(Recorder(model), batch, 0.0)
        assert len(calls) == 2
        second = calls[1]
        assert second.get("input_ids") is None  # only embeddings, starting with z
        torch.testing.assert_close(second["inputs_embeds"][:, :L], z)
        bos = model.get_input_embeddings()(torch.tensor([tokenizer.bos_token_id]))
        torch.testing.assert_close(second["inputs_embeds"][:, L], bos.expand(3, -1))

        # the first-pass text matters, and only via z: same z -> same reconstruction
        perturbed = {k: v.clone() for k, v in batch.items()}
        perturbed["input_ids"][:, 1:3] = 42
        z2 = dense_tokens(model, perturbed)
        assert not torch.allclose(z, z2)
        logits_a, _ = _reconstruction_logits(model, batch, z)
        logits_b, _ = _reconstruction_logits(model, perturbed, z)
        torch.testing.assert_close(logits_a, logits_b)


def test_diversity_penalty() -> None:
    v = torch.randn(4, 1, 16)
    assert diversity_penalty(v.expand(4, 3, 16)).item() == pytest.approx(1.0, abs=1e-5)
    assert diversity_penalty(-v.expand(4, 2, 16)).item() == pytest.approx(1.0, abs=1e-5)
    eye = torch.eye(3, 16).unsqueeze(0).expand(5, 3, 16) * 7.0
    assert diversity_penalty(eye).item() == pytest.approx(0.0, abs=1e-7)
    assert diversity_penalty(torch.randn(2, 1, 16)).item() == 0.0


def test_a_few_adamw_steps_lower_the_loss(
    fresh: tuple[PreTrainedModel, PreTrainedTokenizerFast],
) -> None:
    model, tokenizer = fresh
    batch = PhaseABatchCollator(tokenizer, MAX_TOKENS, L)(TEXTS[:8])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(8):
        loss, _ = phase_a_loss(model, batch, diversity_weight=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    # gradients reach the query-token embeddings (through z into the second pass)
    qids = query_token_ids(tokenizer, L)
    grad = model.get_input_embeddings().weight.grad
    assert isinstance(grad, torch.Tensor) and grad[qids].abs().sum() > 0


def test_works_through_an_engine_like_wrapper(
    backbone: tuple[PreTrainedModel, PreTrainedTokenizerFast],
) -> None:
    model, tokenizer = backbone
    model.eval()

    class Engine(torch.nn.Module):  # DeepSpeed-like: __call__ forwards to .module
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return self.module(*args, **kwargs)

    batch = PhaseABatchCollator(tokenizer, MAX_TOKENS, L)(TEXTS[:4])
    with torch.no_grad():
        direct, _ = phase_a_loss(model, batch, 0.1)
        wrapped, _ = phase_a_loss(Engine(model), batch, 0.1)
    torch.testing.assert_close(direct, wrapped)


def test_extract_dense_is_deterministic_ordered_and_batch_independent(
    backbone: tuple[PreTrainedModel, PreTrainedTokenizerFast],
) -> None:
    model, tokenizer = backbone
    model.train()
    kwargs: dict[str, Any] = {"max_text_tokens": MAX_TOKENS, "num_query_tokens": L}
    small = extract_dense(model, tokenizer, TEXTS, batch_size=2, progress=False, **kwargs)
    large = extract_dense(model, tokenizer, TEXTS, batch_size=8, progress=False, **kwargs)
    again = extract_dense(model, tokenizer, TEXTS, batch_size=8, progress=False, **kwargs)
    assert model.training  # mode restored
    assert small.shape == (len(TEXTS), L, 32) and small.dtype == np.float32
    np.testing.assert_array_equal(large, again)
    np.testing.assert_allclose(small, large, rtol=1e-4, atol=1e-5)
    one = extract_dense(model, tokenizer, [TEXTS[4]], batch_size=1, progress=False, **kwargs)
    np.testing.assert_allclose(one[0], large[4], rtol=1e-4, atol=1e-5)
    reversed_ = extract_dense(model, tokenizer, TEXTS[::-1], progress=False, **kwargs)
    np.testing.assert_allclose(reversed_[::-1], large, rtol=1e-4, atol=1e-5)
    assert not np.allclose(large[0], large[1])  # different items, different tokens


def test_extract_text_embedding(
    backbone: tuple[PreTrainedModel, PreTrainedTokenizerFast],
) -> None:
    model, tokenizer = backbone
    emb = extract_text_embedding(
        model, tokenizer, TEXTS, max_text_tokens=MAX_TOKENS, batch_size=3, progress=False
    )
    assert emb.shape == (len(TEXTS), 32) and emb.dtype == np.float32
    np.testing.assert_array_equal(emb[6], np.zeros(32, dtype=np.float32))  # empty text
    ids = tokenizer(TEXTS[1], add_special_tokens=False).input_ids
    model.eval()
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor([[tokenizer.bos_token_id, *ids]]), output_hidden_states=True
        )
    expected = out.hidden_states[-1][0, 1:].mean(dim=0).numpy()
    np.testing.assert_allclose(emb[1], expected, rtol=1e-4, atol=1e-5)


def test_reconstruction_metrics(backbone: tuple[PreTrainedModel, PreTrainedTokenizerFast]) -> None:
    model, tokenizer = backbone
    metrics = reconstruction_metrics(
        model, tokenizer, TEXTS[:6], max_text_tokens=MAX_TOKENS, num_query_tokens=L, batch_size=4
    )
    assert set(metrics) == {"recon_loss", "token_accuracy"}
    assert 0.0 <= metrics["token_accuracy"] <= 1.0
    model.eval()
    with torch.no_grad():
        _, single = phase_a_loss(model, PhaseABatchCollator(tokenizer, MAX_TOKENS, L)(TEXTS[:6]), 0)
    assert metrics["recon_loss"] == pytest.approx(single["recon_loss"], rel=1e-4)
