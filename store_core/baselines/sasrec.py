"""SASRec (Kang & McAuley, 2018) with cross-entropy over all items, in plain torch.

Why our own: the ID-based baseline STORE must beat, run on exactly the split and histories
the generative model sees (:mod:`store_core.baselines.data`), with no RecBole dependency.
The architecture follows RecBole 1.2.1's SASRec, whose numbers docs/EVALUATION.md quotes:
item + learned positional embeddings -> LayerNorm -> dropout -> post-LN causal transformer
blocks (attention, residual, LayerNorm; GELU feed-forward, residual, LayerNorm), and the
score of item ``i`` is ``hidden . E[i]`` with the input embedding table ``E`` (tied).

Training ("all prefixes" through sequence-to-sequence targets): a train sequence
``s_0 .. s_{n-1}`` is cut into windows of at most ``history_len`` inputs; a window ending
at target index ``e`` feeds ``s_a .. s_{e-1}`` (``a = max(0, e - L)``, left-aligned,
padding on the right) and every position ``p`` predicts ``s_{a+p+1}``. Consecutive
windows are ``train_stride`` targets apart and each target is labelled in exactly one
window per epoch, so every prefix ``s_0 .. s_{t-1} -> s_t`` (t >= 1) is a training
sample once per epoch. ``train_stride = history_len`` (default) is classic SASRec
seq2seq training; ``train_stride = 1`` gives every target its full ``L``-item history, as
RecBole's prefix augmentation does, at ``L`` times the encoder cost. The window grid gets
a fresh seeded offset each epoch. The loss is the mean cross-entropy over all N items of
the labelled positions. Validation and test histories are never trained on.

Evaluation: full ranking over all N items from the hidden state at the last history
position; NDCG@10 on the validation split drives early stopping (best weights restored),
then the test split is ranked with history items included (headline) and excluded.

Shapes: B windows or users, L = history_len, H = hidden_size, N items (index 0 = pad).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from store_core.baselines.data import (
    PAD,
    EvalSplit,
    SequenceData,
    load_sequence_data,
    target_ranks,
    top_k_items,
)
from store_core.config import SASRecConfig
from store_core.metrics import ranking_metrics
from store_core.progress import progress
from store_core.splits import recent_history

logger = logging.getLogger(__name__)

IGNORE = -100


@dataclass
class TrainSummary:
    """What :func:`train_sasrec` did, for reports and tracking."""

    epochs: int = 0
    best_epoch: int = 0
    valid_best_ndcg_at_10: float = -1.0
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch


class _Block(nn.Module):
    """Post-LN transformer block with causal self-attention (RecBole's TransformerLayer)."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.attn_dropout = cfg.attn_dropout
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.drop_attn_out = nn.Dropout(cfg.hidden_dropout)
        self.norm_attn = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ff_in = nn.Linear(cfg.hidden_size, cfg.inner_size)
        self.ff_out = nn.Linear(cfg.inner_size, cfg.hidden_size)
        self.drop_ff = nn.Dropout(cfg.hidden_dropout)
        self.norm_ff = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, H] -> [B, L, H]
        b, length, h = x.shape
        qkv = self.qkv(x).view(b, length, 3, self.num_heads, h // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, L, H / heads]
        # Left-aligned inputs: with a causal mask a real position never sees the padding
        # after it, so no key-padding mask is needed (a pad-only row attends to itself).
        attn = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_dropout if self.training else 0.0, is_causal=True
        )  # [B, heads, L, H / heads]
        attn = attn.transpose(1, 2).reshape(b, length, h)
        x = self.norm_attn(x + self.drop_attn_out(self.out(attn)))
        ff = self.ff_out(F.gelu(self.ff_in(x)))
        return self.norm_ff(x + self.drop_ff(ff))


class SASRecModel(nn.Module):
    """Self-attentive sequential recommender; scores all N items from a history."""

    def __init__(self, num_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        if num_items < 1:
            raise ValueError("SASRec needs at least one item")
        self.cfg = cfg
        self.num_items = num_items
        self.item_embedding = nn.Embedding(num_items + 1, cfg.hidden_size, padding_idx=PAD)
        self.position_embedding = nn.Embedding(cfg.history_len, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.num_layers))
        self.summary = TrainSummary()
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, items: torch.Tensor) -> torch.Tensor:  # [B, L'] -> [B, L', H]
        """Hidden state at every position of left-aligned item-index inputs (L' <= L)."""
        positions = torch.arange(items.shape[1], device=items.device)  # [L']
        x = self.item_embedding(items) + self.position_embedding(positions)[None]
        x = self.dropout(self.norm(x))
        for block in self.blocks:
            x = block(x)
        return x

    def item_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., N]
        """Scores of items 1..N (column j is item j + 1; padding is never scored)."""
        return hidden @ self.item_embedding.weight[1:].T

    def encode(self, histories: Sequence[np.ndarray]) -> torch.Tensor:  # -> [B, H]
        """Hidden state after the last item of each history (the most recent L are used)."""
        length = self.cfg.history_len
        batch = np.zeros((len(histories), length), dtype=np.int64)  # [B, L], right padding
        last = np.zeros(len(histories), dtype=np.int64)
        for row, history in enumerate(histories):
            recent = recent_history(history, length)
            batch[row, : len(recent)] = recent
            last[row] = max(len(recent), 1) - 1  # an empty history reads the pad position
        hidden = self(torch.from_numpy(batch))  # [B, L, H]
        return hidden[torch.arange(len(histories)), torch.from_numpy(last)]


def training_windows(
    sequences: Sequence[np.ndarray], length: int, stride: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, labels)`` int64 [W, L] for one epoch (rules in the module docstring).

    ``inputs`` holds item indices, left-aligned, 0-padded; ``labels`` the next item's
    column (index - 1) at labelled positions and :data:`IGNORE` elsewhere.
    """
    if not 1 <= stride <= length:
        raise ValueError(f"stride must be in 1..{length}, got {stride}")
    inputs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for seq in sequences:
        last = len(seq) - 1  # targets are s_1 .. s_last
        if last < 1:
            continue
        top = int(rng.integers(1, stride + 1))  # targets labelled by the newest window
        ends = [last, *range(last - top, 0, -stride)]
        for end, below in zip(ends, [*ends[1:], 0], strict=True):
            start = max(0, end - length)
            row_in = np.zeros(length, dtype=np.int64)
            row_in[: end - start] = seq[start:end]
            row_lab = np.full(length, IGNORE, dtype=np.int64)
            first = below + 1  # first target index labelled here
            row_lab[first - start - 1 : end - start] = seq[first : end + 1] - 1
            inputs.append(row_in)
            labels.append(row_lab)
    if not inputs:
        raise ValueError("no training sequence has two items: nothing to train on")
    return np.stack(inputs), np.stack(labels)


@torch.no_grad()
def top_k_for_histories(
    model: SASRecModel,
    histories: Sequence[np.ndarray],
    k: int = 20,
    exclude: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """int64 [U, k] top item indices (1-based) after each history (int64 item indices,
    oldest first; the model reads its most recent ``history_len``), in batches of
    ``eval_batch_size``. ``exclude`` (one array of item indices per history) removes
    those items from the ranking."""
    was_training = model.training
    model.eval()
    blocks = []
    size = model.cfg.eval_batch_size
    for start in range(0, len(histories), size):
        scores = model.item_logits(model.encode(histories[start : start + size]))  # [B, N]
        excluded = None if exclude is None else exclude[start : start + size]
        blocks.append(top_k_items(scores, k, excluded))
    model.train(was_training)
    return np.concatenate(blocks) if blocks else np.zeros((0, k), dtype=np.int64)


def recommend(
    model: SASRecModel,
    data: SequenceData,
    split: EvalSplit,
    k: int = 20,
    exclude_history: bool = False,
    excluded_history_len: int | None = None,
) -> np.ndarray:
    """int64 [U, k] top item indices for :meth:`SequenceData.eval_users` of ``split``.

    The model reads the ``history_len`` most recent history items. ``exclude_history``
    removes the user's history items from the ranking: all of them, or the
    ``excluded_history_len`` most recent.
    """
    histories = data.histories(split, model.cfg.history_len)
    exclude = data.histories(split, excluded_history_len) if exclude_history else None
    return top_k_for_histories(model, histories, k, exclude)


def rank_users(
    model: SASRecModel,
    data: SequenceData,
    split: EvalSplit,
    k: int = 20,
    exclude_history: bool = False,
    excluded_history_len: int | None = None,
) -> np.ndarray:
    """int64 [U] 0-based rank of each eval user's target in the top ``k`` (-1: a miss)."""
    top = recommend(model, data, split, k, exclude_history, excluded_history_len)
    return target_ranks(top, data.targets(split))


def train_sasrec(data: SequenceData, cfg: SASRecConfig, seed: int) -> SASRecModel:
    """Train on the train sequences with early stopping on validation NDCG@10.

    Returns the model with the best validation epoch's weights; ``model.summary`` says
    how many epochs ran and the per-epoch loss and validation metrics.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = SASRecModel(data.num_items, cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sequences = [data.train_sequences[u] for u in sorted(data.train_sequences)]
    has_valid = bool(data.valid_targets)
    summary = model.summary
    best_state: dict[str, torch.Tensor] | None = None
    stale = 0
    started = time.perf_counter()
    bar = progress(total=cfg.max_epochs, desc="SASRec", unit="epoch")
    for epoch in range(1, cfg.max_epochs + 1):
        epoch_started = time.perf_counter()
        inputs, labels = training_windows(sequences, cfg.history_len, cfg.stride, rng)
        order = rng.permutation(len(inputs))
        model.train()
        total_loss, total_targets = 0.0, 0
        for start in range(0, len(order), cfg.batch_size):
            rows = order[start : start + cfg.batch_size]
            batch_in = torch.from_numpy(inputs[rows])  # [B, L]
            batch_lab = torch.from_numpy(labels[rows])  # [B, L]
            mask = batch_lab != IGNORE  # [B, L]
            hidden = model(batch_in)[mask]  # [T, H], T labelled positions
            loss = F.cross_entropy(model.item_logits(hidden), batch_lab[mask])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            count = int(mask.sum())
            total_loss += loss.item() * count
            total_targets += count
        row: dict[str, float] = {
            "epoch": float(epoch),
            "loss": total_loss / max(total_targets, 1),
            "windows": float(len(inputs)),
        }
        if has_valid:
            val = ranking_metrics(rank_users(model, data, "valid", k=20))
            row.update({f"valid_{name}": value for name, value in val.items()})
            score = val["ndcg_at_10"]
        else:  # nothing to select on: keep the last epoch
            score = float(epoch)
        row["seconds"] = time.perf_counter() - epoch_started
        summary.history.append(row)
        summary.epochs = epoch
        improved = score > summary.valid_best_ndcg_at_10
        if improved:
            summary.valid_best_ndcg_at_10 = score
            summary.best_epoch = epoch
            best_state = copy.deepcopy(model.state_dict())
            stale = 0
        else:
            stale += 1
        logger.info(
            "SASRec epoch %d: loss %.4f, valid N@10 %.4f R@10 %.4f%s (%.1f s)",
            epoch,
            row["loss"],
            row.get("valid_ndcg_at_10", math.nan),
            row.get("valid_recall_at_10", math.nan),
            " *" if improved else "",
            row["seconds"],
        )
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", n10=f"{row.get('valid_ndcg_at_10', 0):.4f}")
        if stale >= cfg.patience:
            logger.info(
                "SASRec: no better validation NDCG@10 for %d epochs; best epoch %d (%.4f)",
                stale,
                summary.best_epoch,
                summary.valid_best_ndcg_at_10,
            )
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    if not has_valid:
        summary.valid_best_ndcg_at_10 = math.nan
    summary.seconds = time.perf_counter() - started
    model.eval()
    return model


def run_sasrec(
    data_dir: str, cfg: SASRecConfig | None = None, seed: int = 2020, k: int = 20
) -> dict[str, Any]:
    """Train on ``data_dir`` and rank the test split: metrics with and without history items.

    ``test`` keeps history items in the ranking (the headline protocol); in
    ``test_history_excluded`` each user's whole history (train items + validation item)
    is removed before the top ``k`` is taken.
    """
    cfg = cfg or SASRecConfig()
    started = time.perf_counter()
    data = load_sequence_data(data_dir)
    model = train_sasrec(data, cfg, seed)
    ranks = rank_users(model, data, "test", k)
    test = ranking_metrics(ranks)
    excluded = ranking_metrics(rank_users(model, data, "test", k, exclude_history=True))
    cold = data.cold_mask("test")
    seconds = time.perf_counter() - started
    summary = model.summary
    logger.info(
        "SASRec test: R@10 %.4f N@10 %.4f (history excluded: R@10 %.4f N@10 %.4f); "
        "%d epochs, best %d, %.1f s",
        test["recall_at_10"],
        test["ndcg_at_10"],
        excluded["recall_at_10"],
        excluded["ndcg_at_10"],
        summary.epochs,
        summary.best_epoch,
        seconds,
    )
    return {
        "test": test,
        "test_history_excluded": excluded,
        "test_cold": ranking_metrics(ranks[cold]) if cold.any() else {},
        "cold_users": int(cold.sum()),
        "valid_best_ndcg_at_10": summary.valid_best_ndcg_at_10,
        "epochs": summary.epochs,
        "best_epoch": summary.best_epoch,
        "history": summary.history,
        "seconds": seconds,
        "train_seconds": summary.seconds,
        "users": len(data.test_targets),
        "items": data.num_items,
        "seed": seed,
        "config": cfg.model_dump(),
    }
