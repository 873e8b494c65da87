"""The slow baseline: Hugging Face ``generate`` with ``prefix_allowed_tokens_fn``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from store_core.generate.beam import BeamResult
from store_core.generate.trie import SemanticIdTrie

#: ``generate`` starts every beam but the first at -1e9 and may return such filler beams
#: when fewer than ``beam_size`` IDs are valid; any score at or below this is "dead".
_HF_DEAD_SCORE: float = -1e8


class _LevelConstraint(LogitsProcessor):
    """Per level: renormalize the level's codes (log-softmax over them alone, as
    :func:`constrained_beam_search` scores), then keep only the beam's allowed codes.

    Applied by ``generate`` to its full-vocabulary log-probabilities; the log-softmax over
    a subset of those equals the log-softmax over that subset's logits.
    """

    def __init__(self, prompt_len: int, level_tokens: list[torch.Tensor], allowed: Any) -> None:
        self.prompt_len = prompt_len
        self.level_tokens = level_tokens
        self.allowed = allowed

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        depth = input_ids.shape[1] - self.prompt_len
        tokens = self.level_tokens[depth].to(scores.device)  # [K]
        level = torch.log_softmax(scores.index_select(1, tokens), dim=-1)  # [beams, K]
        out = torch.full_like(scores, -math.inf)
        for row in range(scores.shape[0]):
            keep = torch.tensor(self.allowed(row, input_ids[row]), dtype=torch.long)
            column = torch.isin(tokens, keep.to(tokens.device))
            out[row, tokens[column]] = level[row, column]
        return cast(torch.FloatTensor, out)


def hf_reference_search(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    trie: SemanticIdTrie,
    *,
    beam_size: int,
    pad_token_id: int,
    eos_token_id: int,
) -> BeamResult:
    """The slow baseline: Hugging Face ``generate`` with ``prefix_allowed_tokens_fn``.

    One prompt at a time (batch 1), the allowed tokens found by walking nested Python
    dicts once per beam per step. Each step's log-probabilities are renormalized over the
    level's codes before the constraint (:class:`_LevelConstraint`, a logits processor,
    in place of ``prefix_allowed_tokens_fn``, which would mask before renormalizing).
    With ``length_penalty=0.0`` a sequence's score is the sum of its token
    log-probabilities, comparable with :func:`constrained_beam_search`.

    Fewer valid IDs than ``beam_size``: ``generate`` starts beams 1..B-1 at -1e9 and keeps
    filler beams (repeats of valid prefixes) at about -1e9, or -inf; those slots are
    returned dead (codes -1, score -inf, item -1), like ours. Model-level generation
    settings that ``generate`` would merge in (e.g. ``suppress_tokens``) are not reset,
    except ``repetition_penalty`` and ``no_repeat_ngram_size``.
    """
    id_length = trie.id_length
    level_tensors = [trie.token_ids(level).cpu() for level in range(id_length)]
    level_lists = [tokens.tolist() for tokens in level_tensors]
    token_code = [{tok: code for code, tok in enumerate(lst)} for lst in level_lists]
    root = trie.python_trie()
    device = next(model.parameters()).device
    codes = np.full((len(prompts), beam_size, id_length), -1, dtype=np.int64)  # [P, B, M]
    scores = np.full((len(prompts), beam_size), -np.inf, dtype=np.float32)  # [P, B]
    was_training = model.training
    model.eval()
    try:
        for index, prompt in enumerate(prompts):
            prompt_len = len(prompt)

            def allowed(
                batch_id: int, sent: torch.Tensor, prompt_len: int = prompt_len
            ) -> list[int]:
                generated = sent[prompt_len:].tolist()
                depth = len(generated)
                if trie.is_levelwise:
                    return level_lists[depth]
                node: dict[int, Any] | None = root
                for token in generated:
                    node = node.get(token) if node is not None else None
                # A prefix off the trie belongs to a -inf filler beam: anything of the level.
                return list(node) if node else level_lists[depth]

            input_ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
            with torch.no_grad():
                # Any Hugging Face causal LM (GenerationMixin); typed as a plain Module.
                out = cast(Any, model).generate(
                    input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    num_beams=beam_size,
                    num_return_sequences=beam_size,
                    max_new_tokens=id_length,
                    logits_processor=LogitsProcessorList(
                        [_LevelConstraint(prompt_len, level_tensors, allowed)]
                    ),
                    do_sample=False,
                    early_stopping=True,
                    length_penalty=0.0,
                    repetition_penalty=1.0,
                    no_repeat_ngram_size=0,
                    output_scores=True,
                    return_dict_in_generate=True,
                    pad_token_id=pad_token_id,
                    eos_token_id=eos_token_id,
                )
            sequences = out.sequences[:, prompt_len:].tolist()  # [B, <=M]
            sequence_scores = out.sequences_scores.float().tolist()  # [B]
            slot = 0
            for tokens, score in sorted(
                zip(sequences, sequence_scores, strict=True), key=lambda pair: -pair[1]
            ):
                if not math.isfinite(score) or score <= _HF_DEAD_SCORE:
                    continue
                if len(tokens) != id_length:
                    raise RuntimeError(f"generate returned {len(tokens)} tokens, not {id_length}")
                row = [token_code[level].get(tok, -1) for level, tok in enumerate(tokens)]
                if min(row) < 0:
                    raise RuntimeError(f"generate returned tokens off the constraint: {tokens}")
                codes[index, slot] = row
                scores[index, slot] = score
                slot += 1
    finally:
        model.train(was_training)
    alive = np.isfinite(scores)  # [P, B]
    items = np.full(scores.shape, -1, dtype=np.int64)  # [P, B]
    if alive.any():
        items[alive] = trie.lookup(codes[alive])
    return BeamResult(codes=codes, scores=scores, items=items)
