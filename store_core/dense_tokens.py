"""Phase A of STORE: the LLM turns an item's text into L dense tokens, trained by reconstruction.

Why: a semantic ID should carry an item's meaning in a few discrete codes. STORE gets
them from the same causal LM that later recommends: L learnable query tokens
``<q_1>..<q_L>`` are appended to the item text; under the causal mask each query sees
the whole text and the queries before it (the paper's "cascaded" mask), and the
last-layer hidden states at the query positions are the item's dense tokens
``z [B, L, D]``. Clustering each position later turns z into codes.

What makes z meaningful is reconstruction (token -> text): a second pass of the SAME
model receives only z as ``inputs_embeds`` (then ``<s>`` and the text, teacher forced)
and must regenerate the text and ``</s>``. The text of the first pass is not visible to
the second, so everything the decoder knows about the item flows through the L vectors.
An optional diversity term (mean squared off-diagonal cosine similarity between an
item's L vectors) keeps them from collapsing into one vector, which would make the L
codes redundant.

Everything here works on a plain Hugging Face causal LM and on a DeepSpeed engine
wrapping one (ZeRO-2/3): the model is only ever called (``model(...)``) and its input
embedding is used as a module, never by indexing ``.weight``.

Batch layout (right padding; positions are HF's default ``0..T-1``, correct for every
real token because pads only come after them), for item i with n_i text tokens
(truncated to ``max_text_tokens``), L query tokens and ``s`` = bos (eos when the
tokenizer has no bos)::

    input_ids        [B, T]      s t_1 .. t_n q_1 .. q_L pad ..      T = 1 + max n + L
    attention_mask   [B, T]      1 for every non-pad position
    query_positions  [B, L]      1 + n_i + l  (l = 0..L-1): where q_{l+1} sits
    text_mask        [B, T]      True at t_1 .. t_n
    text_lengths     [B]         n_i
    recon_input_ids  [B, R - L]  s t_1 .. t_n </s> pad ..              R = L + 2 + max n
    recon_attention_mask [B, R]  over [z_1 .. z_L, recon_input_ids]
    recon_labels     [B, R]      -100 (z, s, pads); t_1 .. t_n </s> at the positions
                                 where those tokens sit (HF convention: the logits
                                 at position p predict the label at p + 1)
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from store_core.model import model_device, query_token_ids
from store_core.prompts import start_token_id

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

Batch = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- batching


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos token")
    return int(tokenizer.eos_token_id)


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id
    return int(pad) if pad is not None else _eos_id(tokenizer)


def tokenize_texts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_text_tokens: int
) -> list[list[int]]:
    """Token ids of each text, truncated, without special tokens.

    Special-token strings inside item text (``<s>``, ``<q_1>``, ...) are split into
    ordinary tokens, so a catalogue entry cannot inject control tokens.
    """
    if not texts:
        return []
    encoded = tokenizer(
        list(texts),
        add_special_tokens=False,
        truncation=True,
        max_length=max_text_tokens,
        split_special_tokens=True,
    )
    return [list(ids) for ids in encoded["input_ids"]]


def layout_batch(
    token_lists: Sequence[Sequence[int]],
    query_ids: Sequence[int],
    *,
    start_id: int,
    eos_id: int,
    pad_id: int,
) -> Batch:
    """Build the Phase A batch (layout in the module docstring) from tokenized texts."""
    batch_size = len(token_lists)
    num_queries = len(query_ids)
    lengths = [len(ids) for ids in token_lists]
    max_len = max(lengths, default=0)
    enc_len = 1 + max_len + num_queries  # T
    rec_len = 2 + max_len  # R - L

    input_ids = torch.full((batch_size, enc_len), pad_id, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((batch_size, enc_len), dtype=torch.long)  # [B, T]
    text_mask = torch.zeros((batch_size, enc_len), dtype=torch.bool)  # [B, T]
    query_positions = torch.zeros((batch_size, num_queries), dtype=torch.long)  # [B, L]
    recon_input_ids = torch.full((batch_size, rec_len), pad_id, dtype=torch.long)  # [B, R-L]
    recon_attention_mask = torch.zeros((batch_size, num_queries + rec_len), dtype=torch.long)
    recon_labels = torch.full((batch_size, num_queries + rec_len), IGNORE_INDEX, dtype=torch.long)
    queries = torch.tensor(list(query_ids), dtype=torch.long)  # [L]

    for i, ids in enumerate(token_lists):
        n = len(ids)
        text = torch.tensor(list(ids), dtype=torch.long)  # [n]
        input_ids[i, 0] = start_id
        input_ids[i, 1 : 1 + n] = text
        input_ids[i, 1 + n : 1 + n + num_queries] = queries
        attention_mask[i, : 1 + n + num_queries] = 1
        text_mask[i, 1 : 1 + n] = True
        query_positions[i] = torch.arange(1 + n, 1 + n + num_queries)

        recon_input_ids[i, 0] = start_id
        recon_input_ids[i, 1 : 1 + n] = text
        recon_input_ids[i, 1 + n] = eos_id
        recon_attention_mask[i, : num_queries + n + 2] = 1
        recon_labels[i, num_queries + 1 : num_queries + 1 + n] = text
        recon_labels[i, num_queries + 1 + n] = eos_id

    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "query_positions": query_positions,
        "text_mask": text_mask,
        "text_lengths": torch.tensor(lengths, dtype=torch.long),
        "recon_input_ids": recon_input_ids,
        "recon_attention_mask": recon_attention_mask,
        "recon_labels": recon_labels,
    }


def encode_texts(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_text_tokens: int,
    query_ids: Sequence[int],
) -> Batch:
    """Tokenize ``texts`` and lay them out as a Phase A batch (see the module docstring)."""
    return layout_batch(
        tokenize_texts(tokenizer, texts, max_text_tokens),
        query_ids,
        start_id=start_token_id(tokenizer),
        eos_id=_eos_id(tokenizer),
        pad_id=_pad_id(tokenizer),
    )


class PhaseABatchCollator:
    """DataLoader ``collate_fn``: a list of item texts -> a Phase A batch (picklable)."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, max_text_tokens: int, num_query_tokens: int
    ) -> None:
        self.tokenizer = tokenizer
        self.max_text_tokens = max_text_tokens
        self.num_query_tokens = num_query_tokens
        self.query_ids = query_token_ids(tokenizer, num_query_tokens)

    def __call__(self, texts: list[str]) -> Batch:
        return encode_texts(self.tokenizer, texts, self.max_text_tokens, self.query_ids)


# --------------------------------------------------------------------------- model passes


def _hf_model(model: Any) -> Any:
    """The Hugging Face model inside a DeepSpeed engine / DDP wrapper (or itself)."""
    return getattr(model, "module", model)


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def _encoder_hidden(model: Any, batch: Batch) -> torch.Tensor:
    """Last-layer hidden states of the first pass (after the final norm).  # [B, T, D]"""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        output_hidden_states=True,
        use_cache=False,
        logits_to_keep=1,  # the logits of this pass are not used
    )
    return cast(torch.Tensor, out.hidden_states[-1])


def _gather_queries(hidden: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
    """Hidden states at the query positions.  [B, T, D], [B, L] -> [B, L, D]"""
    index = query_positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])  # [B, L, D]
    return hidden.gather(1, index)


def dense_tokens(model: Any, batch: Batch) -> torch.Tensor:
    """The L dense tokens of each item in ``batch`` (differentiable).  # [B, L, D]"""
    batch = _to_device(batch, model_device(model))
    hidden = _encoder_hidden(model, batch)  # [B, T, D]
    return _gather_queries(hidden, batch["query_positions"])


def _reconstruction_logits(
    model: Any, batch: Batch, z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Second pass: z then ``s t_1..t_n </s>``; logits and targets at the N target tokens.

    Returns ``(logits [N, V] float32, targets [N])``. The pass sees no text token before
    the first target: its first L inputs are z, not token embeddings.
    """
    embed = _hf_model(model).get_input_embeddings()
    token_embeds = embed(batch["recon_input_ids"])  # [B, R-L, D]
    inputs_embeds = torch.cat([z.to(token_embeds.dtype), token_embeds], dim=1)  # [B, R, D]
    out = model(
        inputs_embeds=inputs_embeds,
        attention_mask=batch["recon_attention_mask"],
        use_cache=False,
    )
    logits = out.logits[:, :-1]  # [B, R-1, V]: position p predicts the label at p + 1
    targets = batch["recon_labels"][:, 1:]  # [B, R-1]
    keep = targets != IGNORE_INDEX  # [B, R-1]
    return logits[keep].float(), targets[keep]  # [N, V], [N]


def diversity_penalty(z: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine similarity between different dense tokens of the same item.

    ``z [B, L, D]`` -> scalar in [0, 1]: 1 when an item's L vectors are parallel, 0 when
    orthogonal; 0 for L = 1.
    """
    num_tokens = z.shape[1]
    if num_tokens < 2:
        return z.new_zeros((), dtype=torch.float32)
    unit = F.normalize(z.float(), dim=-1)  # [B, L, D]
    cos = unit @ unit.transpose(1, 2)  # [B, L, L]
    off_diagonal = ~torch.eye(num_tokens, dtype=torch.bool, device=z.device)  # [L, L]
    return cos.pow(2)[:, off_diagonal].mean()


def phase_a_loss(
    model: Any, batch: Batch, diversity_weight: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Reconstruction loss (+ weighted diversity term) of one Phase A batch.

    Returns ``(loss, metrics)``; metrics: ``recon_loss`` (mean cross-entropy per target
    token), ``diversity`` (see :func:`diversity_penalty`), ``tokens`` (target tokens in
    the batch: text tokens plus one ``</s>`` per item).
    """
    batch = _to_device(batch, model_device(model))
    z = _gather_queries(_encoder_hidden(model, batch), batch["query_positions"])  # [B, L, D]
    logits, targets = _reconstruction_logits(model, batch, z)  # [N, V], [N]
    recon = F.cross_entropy(logits, targets)
    diversity = diversity_penalty(z)
    loss = recon + diversity_weight * diversity if diversity_weight > 0 else recon
    metrics = {
        "recon_loss": float(recon.detach().item()),
        "diversity": float(diversity.detach().item()),
        "tokens": float(targets.numel()),
    }
    return loss, metrics


# --------------------------------------------------------------------------- inference


def _progress_enabled(progress: bool) -> bool:
    return progress and not os.environ.get("CI") and sys.stderr.isatty()


def _sorted_batches(token_lists: Sequence[Sequence[int]], batch_size: int) -> Iterator[list[int]]:
    """Index batches of items with similar length (less padding); longest first."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(token_lists)), key=lambda i: (-len(token_lists[i]), i))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _iter_batches(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_text_tokens: int,
    query_ids: Sequence[int],
    batch_size: int,
    progress: bool,
    desc: str,
) -> Iterator[tuple[list[int], Batch]]:
    """``(indices into texts, batch on the model's device)`` with the model in eval mode
    and gradients off; the model's training mode is restored afterwards."""
    token_lists = tokenize_texts(tokenizer, texts, max_text_tokens)
    device = model_device(model)
    start_id, eos_id, pad_id = start_token_id(tokenizer), _eos_id(tokenizer), _pad_id(tokenizer)
    was_training = model.training
    model.eval()
    try:
        with (
            torch.no_grad(),
            tqdm(
                total=len(texts), desc=desc, unit="item", disable=not _progress_enabled(progress)
            ) as bar,
        ):
            for indices in _sorted_batches(token_lists, batch_size):
                batch = layout_batch(
                    [token_lists[i] for i in indices],
                    query_ids,
                    start_id=start_id,
                    eos_id=eos_id,
                    pad_id=pad_id,
                )
                yield indices, _to_device(batch, device)
                bar.update(len(indices))
    finally:
        model.train(was_training)


def _map_batches(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    fn: Callable[[Batch], torch.Tensor],
    **kwargs: Any,
) -> np.ndarray:
    """``fn`` (batch -> ``[B, ...]``) over all texts: float32 array in the order of texts."""
    if not texts:
        raise ValueError("no texts to encode")
    result: np.ndarray | None = None
    for indices, batch in _iter_batches(model, tokenizer, texts, **kwargs):
        with torch.no_grad():
            values = fn(batch).float().cpu().numpy()
        if result is None:
            result = np.zeros((len(texts), *values.shape[1:]), dtype=np.float32)
        result[indices] = values
    assert result is not None
    return result


def extract_dense(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_text_tokens: int,
    num_query_tokens: int,
    batch_size: int = 64,
    progress: bool = True,
) -> np.ndarray:
    """Dense tokens of every text, in order: float32 ``[N, L, D]``.

    Batched by length internally; the result does not depend on ``batch_size``.
    """
    return _map_batches(
        model,
        tokenizer,
        texts,
        lambda batch: dense_tokens(model, batch),
        max_text_tokens=max_text_tokens,
        query_ids=query_token_ids(tokenizer, num_query_tokens),
        batch_size=batch_size,
        progress=progress,
        desc="dense tokens",
    )


def extract_text_embedding(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_text_tokens: int,
    num_query_tokens: int | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> np.ndarray:
    """One embedding per text: mean last-layer hidden state over its text tokens. ``[N, D]``

    The single vector the TIGER-style residual k-means baseline clusters. Query tokens
    come after the text and the mask is causal, so they cannot change the text's hidden
    states: they are not fed at all, and ``num_query_tokens`` (accepted for symmetry
    with :func:`extract_dense`) does not matter. An empty text gives a zero vector.
    """
    del num_query_tokens

    def mean_text_state(batch: Batch) -> torch.Tensor:
        hidden = _encoder_hidden(model, batch)  # [B, T, D]
        mask = batch["text_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        total = (hidden * mask).sum(dim=1)  # [B, D]
        return total / mask.sum(dim=1).clamp(min=1.0)  # [B, D]

    return _map_batches(
        model,
        tokenizer,
        texts,
        mean_text_state,
        max_text_tokens=max_text_tokens,
        query_ids=[],
        batch_size=batch_size,
        progress=progress,
        desc="text embeddings",
    )


def reconstruction_metrics(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_text_tokens: int,
    num_query_tokens: int,
    batch_size: int = 64,
) -> dict[str, float]:
    """Held-out reconstruction quality: ``recon_loss`` and teacher-forced ``token_accuracy``.

    Both are per target token (text tokens and ``</s>``), over all of ``texts``.
    """
    loss_sum, correct, count = 0.0, 0, 0
    for _, batch in _iter_batches(
        model,
        tokenizer,
        texts,
        max_text_tokens=max_text_tokens,
        query_ids=query_token_ids(tokenizer, num_query_tokens),
        batch_size=batch_size,
        progress=False,
        desc="reconstruction",
    ):
        with torch.no_grad():
            z = _gather_queries(_encoder_hidden(model, batch), batch["query_positions"])
            logits, targets = _reconstruction_logits(model, batch, z)  # [N, V], [N]
        loss_sum += float(F.cross_entropy(logits, targets, reduction="sum").item())
        correct += int((logits.argmax(dim=-1) == targets).sum().item())
        count += int(targets.numel())
    if count == 0:
        raise ValueError("no texts to evaluate")
    return {"recon_loss": loss_sum / count, "token_accuracy": correct / count}
