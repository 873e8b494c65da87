"""Constrained beam search over the valid semantic IDs: every generated ID is a real item.

The recommender (and the item tokenizer, for new items) answers by *generating* a semantic
ID: M tokens, one per level (L cluster levels + the disambiguation level), e.g.
``<a_12><b_5><c_200><d_0>``. Decoding must never produce an ID that names no item (the
invalid-ID rate is part of the evaluation and must be exactly 0), so each step may only
extend a beam with a code that keeps it a prefix of some valid ID.

Why it is built this way rather than with Hugging Face's ``generate``:

* **Tensor masks, not a Python callback per beam.** ``generate(num_beams=..,
  prefix_allowed_tokens_fn=..)`` calls Python once per beam per step and builds the mask
  row by row. Here the prefix trie of valid IDs is held as per-level tensors
  (:class:`SemanticIdTrie`): the allowed continuations of every beam of every prompt are
  one gather (dense levels) or one ``searchsorted`` (sparse levels) per step.
* **Batched, with the KV cache.** Prompts are LEFT-padded into a batch with an explicit
  ``attention_mask`` and ``position_ids`` and run once; every later step feeds one token
  per beam against the cache. By default the beams of a prompt share ONE copy of its
  cache (their tokens are appended as extra positions and a 4D mask shows each beam only
  its ancestors); the textbook layout - the cache repeated to every beam and reordered
  after each step - is kept as ``strategy="expand"`` for attention implementations that
  cannot take a custom mask. On CPU, copying the repeated cache dominated decoding time.
* **Exactly M steps.** IDs have a fixed length, so there is no EOS, no bookkeeping of
  finished hypotheses and no length penalty: after M steps the live beams are the answer,
  and a beam's score is the sum of its M token log-probabilities.
* **Scored as Phase B trains.** Each step takes ``log_softmax`` over the current level's
  codes only (in float32): an ID token's probability is normalized over its level's
  codes in training too (:class:`store_core.tasks.IdVocabulary`), since decoding never
  compares a code with anything but codes of the same level. Invalid transitions are set
  to -inf and the top ``beam_size`` of (beam, code) per prompt are kept.
  :func:`hf_reference_search` (the slow baseline, kept for tests and benchmarks) runs
  ``generate`` with ``length_penalty=0.0`` and a logits processor that renormalizes the
  same way, and returns the same beams.

Ties: ``torch.topk`` on a contiguous tensor is deterministic, but two candidates with
exactly equal scores may come out in a different order than in ``generate`` (which ranks a
``[beams x vocab]`` row rather than our ``[beams x level codes]`` row).
"""

from store_core.generate.beam import (
    BeamResult,
    Strategy,
    constrained_beam_search,
)
from store_core.generate.reference import hf_reference_search
from store_core.generate.trie import (
    DENSE_LIMIT_BYTES,
    SemanticIdTrie,
    level_token_ids_from_tokenizer,
)

__all__ = [
    "DENSE_LIMIT_BYTES",
    "BeamResult",
    "SemanticIdTrie",
    "Strategy",
    "constrained_beam_search",
    "hf_reference_search",
    "level_token_ids_from_tokenizer",
]
