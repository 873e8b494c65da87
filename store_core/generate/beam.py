"""Batched constrained beam search with a shared-prefix KV cache (see the package docstring)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from store_core.config import IdNormalization
from store_core.generate.trie import SemanticIdTrie
from store_core.progress import progress as progress_bar


@dataclass
class BeamResult:
    """Top beams per prompt, best first. Dead slots: codes -1, score -inf, item -1."""

    codes: np.ndarray  # [P, B, M] int64
    scores: np.ndarray  # [P, B] float32: sum of the M token log-probabilities
    items: np.ndarray  # [P, B] int64: row in the trie's codes (-1 dead or levelwise)

    @property
    def alive(self) -> np.ndarray:
        """``[P, B]`` bool: the slot holds a valid ID."""
        return np.isfinite(self.scores)


#: How the beams of a prompt share its KV cache (see :func:`constrained_beam_search`).
Strategy = Literal["auto", "shared_prefix", "expand"]

#: Attention implementations that apply a custom 4D float mask as given (shared_prefix).
_MASKABLE_ATTENTION = frozenset({"sdpa", "eager"})


def constrained_beam_search(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    trie: SemanticIdTrie,
    *,
    beam_size: int = 20,
    pad_token_id: int,
    batch_size: int = 32,
    progress: bool = False,
    strategy: Strategy = "auto",
    normalization: IdNormalization = "level",
    excluded: Sequence[Sequence[int]] | None = None,
) -> BeamResult:
    """Top ``beam_size`` valid semantic IDs per prompt, by batched beam search in M steps.

    ``model`` is any Hugging Face causal LM module (called with ``input_ids``,
    ``attention_mask``, ``position_ids``, the cache and ``use_cache=True``); it runs under
    ``torch.no_grad()`` in eval mode and gets its previous mode back. The number of
    forwards depends only on ``len(prompts)``, ``batch_size`` and M, so ranks of a
    ZeRO-3 job calling this on equal-sized shards stay in step.

    ``prompts`` are token-id lists (any lengths); they are grouped by length into batches of
    ``batch_size`` (less padding) and the results returned in the input order. Every step
    feeds one token per beam; ``strategy`` decides how the beams share the prompt's cache:

    * ``"expand"``: the textbook layout, valid for any Hugging Face causal LM. The prompt
      cache is repeated to ``batch_size x beam_size`` rows
      (``DynamicCache.batch_repeat_interleave``) and reordered after every step
      (``reorder_cache``); each step copies the whole cache twice (reorder, append), which
      dominates the time on CPU.
    * ``"shared_prefix"``: the cache keeps ONE copy of each prompt; the B tokens of a step
      are appended as B extra positions of the prompt's row, and a 4D attention mask lets
      each beam see the prompt and only its own ancestors (tree attention). Nothing is
      reordered or replicated: the cache is ``longest prompt + B x (M - 1)`` positions per
      prompt instead of ``B x (longest prompt + M)``. Needs an attention implementation
      that applies a custom 4D mask (``sdpa`` or ``eager``, as Llama/Qwen2/Mistral have).
    * ``"auto"`` (default): ``shared_prefix`` when ``model.config._attn_implementation`` is
      ``sdpa`` or ``eager``, else ``expand``.

    Both give the same beams (the tests check each against :func:`hf_reference_search`).

    ``normalization`` (the checkpoint's ``recommender.id_normalization``): ``"level"``
    scores each code by the softmax over its level's ``K_l`` codes; ``"trie"`` by the
    softmax over the codes that continue the beam's prefix in ``trie``, so a full ID's
    score is ``log p(item)`` under the item-level softmax over the trie's items (the
    search is then exact when ``beam_size`` covers the catalogue). A levelwise trie
    (every code valid) gives the same scores either way. ValueError on an unknown one.

    ``excluded``: one list per prompt of item rows (in the trie's ``codes``) that prompt
    may not get, e.g. the user's history under EVALUATION.md's history-excluded rule. They
    are left out inside the search (:meth:`SemanticIdTrie.excluded_nodes`: a prefix whose
    every item is excluded is never extended), so the beam holds ``beam_size`` other
    items whenever the catalogue has them; the beams are those of a trie built without
    the excluded items, scores included under either normalization. ValueError when its
    length is not ``len(prompts)`` or the trie is levelwise.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {index} is empty")
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if strategy == "auto":
        strategy = "shared_prefix" if attention in _MASKABLE_ATTENTION else "expand"
    elif strategy == "shared_prefix" and attention not in _MASKABLE_ATTENTION:
        raise ValueError(
            f"strategy 'shared_prefix' needs sdpa or eager attention, the model uses {attention}"
        )
    elif strategy not in ("shared_prefix", "expand"):
        raise ValueError(f"unknown strategy {strategy!r}")
    num_prompts, id_length = len(prompts), trie.id_length
    codes = np.full((num_prompts, beam_size, id_length), -1, dtype=np.int64)  # [P, B, M]
    scores = np.full((num_prompts, beam_size), -np.inf, dtype=np.float32)  # [P, B]
    items = np.full((num_prompts, beam_size), -1, dtype=np.int64)  # [P, B]
    device = next(model.parameters()).device
    if normalization not in ("level", "trie"):
        raise ValueError(f"unknown normalization {normalization!r}")
    if excluded is not None and len(excluded) != num_prompts:
        raise ValueError(f"excluded has {len(excluded)} lists for {num_prompts} prompts")
    trie = trie.to(device)
    search = _BatchSearch(model, trie, beam_size, pad_token_id, strategy, normalization == "trie")
    order = sorted(range(num_prompts), key=lambda i: len(prompts[i]))  # by length
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            starts = range(0, num_prompts, batch_size)
            bar = progress_bar(starts, desc="beam search", unit="batch", disable=not progress)
            for start in bar:
                rows = order[start : start + batch_size]
                banned = (
                    None if excluded is None else trie.excluded_nodes([excluded[i] for i in rows])
                )
                chunk_codes, chunk_scores, chunk_items = search.run(
                    [prompts[i] for i in rows], banned
                )
                codes[rows] = chunk_codes.cpu().numpy()
                scores[rows] = chunk_scores.cpu().numpy()
                items[rows] = chunk_items.cpu().numpy()
    finally:
        model.train(was_training)
    return BeamResult(codes=codes, scores=scores, items=items)


def left_padded(
    sequences: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, position_ids)``, each ``[B, T]`` int64 on ``device``:
    the token-id lists left-padded to the longest (every row ends at column T - 1, so the
    last position of each row is its next-token prediction), positions counted from each
    row's first real token. ValueError when ``sequences`` is empty."""
    if not sequences:
        raise ValueError("no sequences to pad")
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, width - len(sequence) :] = torch.as_tensor(list(sequence), dtype=torch.long)
        mask[row, width - len(sequence) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids.to(device), mask.to(device), positions.to(device)


class _BatchSearch:
    """Beam search over one batch of prompts at a time (see :func:`constrained_beam_search`)."""

    def __init__(
        self,
        model: torch.nn.Module,
        trie: SemanticIdTrie,
        beam_size: int,
        pad_token_id: int,
        strategy: str,
        trie_softmax: bool = False,
    ) -> None:
        self.model = model
        self.trie = trie
        self.beam_size = beam_size
        self.pad_token_id = pad_token_id
        self.shared = strategy == "shared_prefix"
        params = inspect.signature(model.forward).parameters
        self.keep_logits = "logits_to_keep" in params
        # transformers 5.x renamed the cache argument ``past_key_values`` -> ``cache``.
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.dtype = next(model.parameters()).dtype
        self.trie_softmax = trie_softmax  # normalize over the prefix's children, not the level

    def run(
        self, prompts: Sequence[Sequence[int]], banned: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes ``[P, B, M]``, scores ``[P, B]`` (best first) and items ``[P, B]``;
        ``banned``: per level the keys of :meth:`SemanticIdTrie.excluded_nodes`."""
        trie, beams = self.trie, self.beam_size
        device = trie.device
        num_prompts, id_length = len(prompts), trie.id_length
        input_ids, prompt_mask, position_ids = left_padded(prompts, self.pad_token_id, device)
        width = input_ids.shape[1]  # T
        lengths = prompt_mask.sum(-1)  # [P]
        extra: dict[str, Any] = {"logits_to_keep": 1} if self.keep_logits else {}
        out = self.model(
            input_ids=input_ids,
            attention_mask=prompt_mask,
            position_ids=position_ids,
            use_cache=True,
            **extra,
        )
        cache = _output_cache(out)
        if cache is None or not hasattr(cache, "reorder_cache"):
            raise TypeError(f"{type(self.model).__name__} returned no reorderable KV cache")
        logits = out.logits[:, -1, :].float()  # [P, V]
        del out

        # Step 0 has one live beam per prompt (so no duplicate beams), later steps B.
        width_beams = 1
        beam_scores = torch.zeros((num_prompts, 1), device=device)  # [P, 1]
        node = torch.zeros((num_prompts, 1), dtype=torch.long, device=device)  # [P, 1]
        codes = torch.full((num_prompts, 1, id_length), -1, dtype=torch.long, device=device)
        prompt_offset = torch.arange(num_prompts, device=device).unsqueeze(1)  # [P, 1]
        # shared_prefix: cache column of each beam's generated tokens so far.
        ancestors = torch.zeros((num_prompts, 1, 0), dtype=torch.long, device=device)
        mask_2d = prompt_mask  # expand: [P*B, T + level + 1] once expanded
        for level in range(id_length):
            tokens = trie.token_ids(level)  # [K]
            size = tokens.numel()
            # An ID token's log-probability is normalized over its level's codes (as Phase B
            # trains it: tasks.token_losses), not over the whole vocabulary; with
            # normalization "trie" over the codes that continue the beam's prefix.
            child = trie.children(level, node.view(-1)).view(num_prompts, width_beams, size)
            if banned is not None and banned[level].numel():  # excluded items' prefixes
                nodes_next = trie.nodes_per_depth[level + 1]
                key = prompt_offset.unsqueeze(-1) * nodes_next + child  # [P, b, K]
                child = child.masked_fill(torch.isin(key, banned[level]) & (child >= 0), -1)
            level_logits = logits.index_select(1, tokens).view(num_prompts, width_beams, size)
            if self.trie_softmax:
                level_logits = level_logits.masked_fill(child < 0, -math.inf)
            level_lp = torch.log_softmax(level_logits, dim=-1)  # [P, b, K]; NaN: no child
            candidates = (beam_scores.unsqueeze(-1) + level_lp).masked_fill(child < 0, -math.inf)
            flat = candidates.reshape(num_prompts, width_beams * size)  # [P, b*K] contiguous
            if torch.isnan(flat).any():
                raise RuntimeError(f"the model produced NaN log-probabilities at level {level}")
            keep = min(beams, flat.shape[1])
            top_scores, top_index = torch.topk(flat, keep, dim=1)  # [P, k] best first
            top_node = child.reshape(num_prompts, -1).gather(1, top_index)  # [P, k]
            if keep < beams:  # fewer (beam, code) pairs than beams: pad with dead slots
                pad = beams - keep
                top_scores = torch.cat(
                    [top_scores, top_scores.new_full((num_prompts, pad), -math.inf)], 1
                )
                top_index = torch.cat([top_index, top_index.new_zeros((num_prompts, pad))], 1)
                top_node = torch.cat([top_node, top_node.new_zeros((num_prompts, pad))], 1)
            source = top_index // size  # [P, B] beam each candidate extends
            code = top_index % size  # [P, B]
            alive = top_scores > -math.inf  # [P, B]
            beam_scores = top_scores  # [P, B]
            node = torch.where(alive, top_node, 0)  # [P, B]
            codes = codes.gather(1, source.unsqueeze(-1).expand(-1, -1, id_length))
            codes[:, :, level] = torch.where(alive, code, -1)  # [P, B, M]
            if level == id_length - 1:
                break
            # Feed the chosen token of every beam (dead beams feed a harmless valid token).
            step_tokens = tokens[code]  # [P, B]
            if self.shared:
                # New tokens go to columns T + B*level + b of their prompt's row.
                own = width + beams * level + torch.arange(beams, device=device)  # [B]
                ancestors = torch.cat(
                    [
                        ancestors.gather(1, source.unsqueeze(-1).expand(-1, -1, level)),
                        own.expand(num_prompts, -1).unsqueeze(-1),
                    ],
                    dim=2,
                )  # [P, B, level + 1]
                visible = torch.zeros(
                    (num_prompts, beams, width + beams * (level + 1)),
                    dtype=torch.bool,
                    device=device,
                )  # [P, B, T + B*(level+1)]
                visible[:, :, :width] = prompt_mask.bool().unsqueeze(1)
                visible.scatter_(2, ancestors, True)
                mask = torch.zeros(visible.shape, dtype=self.dtype, device=device)
                mask = mask.masked_fill(~visible, torch.finfo(self.dtype).min).unsqueeze(1)
                out = self.model(
                    input_ids=step_tokens,  # [P, B]
                    attention_mask=mask,  # [P, 1, B, T + B*(level+1)] additive
                    position_ids=(lengths + level).unsqueeze(1).expand(-1, beams),  # [P, B]
                    use_cache=True,
                    **{self.cache_arg: cache},
                )
                step_logits = out.logits.reshape(num_prompts * beams, -1)  # [P*B, V]
            else:
                if width_beams == 1:
                    cache.batch_repeat_interleave(beams)
                    mask_2d = mask_2d.repeat_interleave(beams, dim=0)  # [P*B, T]
                else:
                    cache.reorder_cache((source + prompt_offset * width_beams).view(-1))
                mask_2d = torch.cat([mask_2d, mask_2d.new_ones((mask_2d.shape[0], 1))], 1)
                out = self.model(
                    input_ids=step_tokens.view(-1, 1),  # [P*B, 1]
                    attention_mask=mask_2d,  # [P*B, T + level + 1]
                    position_ids=(lengths + level).repeat_interleave(beams).unsqueeze(1),
                    use_cache=True,
                    **{self.cache_arg: cache},
                )
                step_logits = out.logits[:, -1, :]  # [P*B, V]
            cache = _output_cache(out)
            logits = step_logits.float()  # [P*B, V]
            del out, step_logits
            width_beams = beams
        alive = beam_scores > -math.inf  # [P, B]
        codes = torch.where(alive.unsqueeze(-1), codes, -1)  # [P, B, M]
        items = torch.where(alive, trie.leaf_items[node], -1)  # [P, B]
        return codes, beam_scores, items


def _output_cache(out: Any) -> Any:
    """The KV cache of a forward's output (``cache`` in transformers 5.x, else the old name)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)
