"""Every Phase B prompt template, in one place, built directly as token ids.

Why token ids and not strings: a semantic ID is a sequence of dedicated vocabulary entries
(``<a_12><b_5>..``, one per level and code; see :mod:`store_core.semantic_ids`). Inserting
their ids directly means an ID is always exactly M tokens, whatever the tokenizer's merge
rules, and constrained decoding can rely on it. Item text (titles, descriptions) is
tokenized with ``split_special_tokens=True``, so a catalogue entry containing ``<s>`` or
``<a_3>`` becomes ordinary characters and cannot inject control or ID tokens.

The templates (what ``tokenizer.decode(prompt + completion)`` shows; ``<s>`` is the start
token, ``<sid>`` the M tokens of one semantic ID)::

    recommendation   <s>Recommend the next item. History:<sid1><sid2>..<sidN>         |  <sid>
    alignment        <s>Item: {text} Semantic ID:                                  |  <sid></s>
    reconstruction   <s>Semantic ID:<sid> Item:                                    |   {text}</s>
    title_history    <s>Recommend the next item. History: {title1}; {title2} Next: |  <sid></s>

The recommendation template is *prefix-closed*: the prompt is the header followed by the
history IDs and nothing else, and the completion is the M ID tokens with no ``</s>``. So
the tokens in front of any item of a rendered sequence ``header<sid1><sid2>..<sidK>`` are
exactly the prompt of that item with the items before it as history. That is what lets
Phase B label every item of a window in one pass (:mod:`store_core.tasks`, sequence mode)
while decoding reads the very context training saw. (Format 1, before sequence mode,
ended the prompt with ``" Next:"`` and the completion with ``</s>``; checkpoints record
:data:`PROMPT_FORMAT`.) ``title_history`` is prefix-only and keeps ``" Next:"``.

Whitespace rules (the same for every template):

* Semantic IDs are never surrounded by whitespace: consecutive IDs are glued
  (``<a_1><b_2><c_0><a_4>..``) and an ID follows a colon directly. IDs are
  self-delimiting (each starts at level ``a``), a separator would cost one extra token per
  history item, and a space before an added token is a lone space token that never occurs
  before a word in natural text. Above all, the completion of every ID task starts with
  the M ID tokens (then ``</s>`` for alignment and title_history, nothing for
  recommendation), so generation is exactly M constrained steps with no whitespace step
  in front.
* Text segments carry their own leading space (``" Next:"``, ``" Item:"``,
  ``" Semantic ID:"``, ``" {text}"``, ``" {title}"``), so byte-level BPE sees the usual
  ``Ġword`` tokens of running text and each segment tokenizes the same on its own as in
  the whole string. The reconstruction completion therefore starts with that space.
* Item text and each title are truncated to ``max_text_tokens`` tokens (counted with
  their leading space) before ``</s>`` / the next segment is appended.

The start token is ``bos``, or ``eos`` for tokenizers without one (Qwen), the same token
Phase A put at position 0 (:mod:`store_core.dense_tokens`), so the model meets every
sequence with the start it already knows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from transformers import PreTrainedTokenizerBase

from store_core.errors import StoreError
from store_core.semantic_ids import level_token

#: Version of the templates, written into every Phase B checkpoint and checked on load:
#: 2 = prefix-closed recommendation (no " Next:", no ``</s>`` after the target ID).
PROMPT_FORMAT = 2

#: Fixed text of the templates (see the module docstring for where each goes).
RECOMMEND_HEADER = "Recommend the next item. History:"
NEXT = " Next:"
ITEM_HEADER = "Item:"
ITEM = " Item:"
SID_HEADER = "Semantic ID:"
SID_AFTER_TEXT = " Semantic ID:"
TITLE_SEPARATOR = ";"


def start_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Token opening every sequence: bos, or eos where the tokenizer has no bos."""
    token_id = tokenizer.bos_token_id
    if token_id is None:
        token_id = tokenizer.eos_token_id
    if token_id is None:
        raise ValueError("tokenizer has neither a bos nor an eos token")
    return int(token_id)


def lookup_sid_tokens(
    tokenizer: PreTrainedTokenizerBase, level_sizes: Sequence[int]
) -> list[list[int]]:
    """``table[level][code]`` = id of ``level_token(level, code)`` in ``tokenizer``.

    Raises :class:`StoreError` naming the first missing token (the semantic-ID tokens were
    not added to this tokenizer, or for fewer codes).
    """
    vocab = tokenizer.get_vocab()
    table: list[list[int]] = []
    for level, size in enumerate(level_sizes):
        row: list[int] = []
        for code in range(size):
            token = level_token(level, code)
            if token not in vocab:
                raise StoreError(
                    f"tokenizer has no semantic-ID token {token}: add the semantic-ID "
                    "vocabulary before building prompts"
                )
            row.append(int(vocab[token]))
        table.append(row)
    return table


class PromptBuilder:
    """Renders the Phase B templates as token ids (layout in the module docstring).

    ``sid_token_ids[level][code]`` is the token id of ``<level_code>`` (see
    :func:`lookup_sid_tokens`); its length is M, the number of levels of every ID.
    Methods return prompts (everything before the first loss token) and completions
    (the loss tokens, ending with ``</s>``) as separate lists, so callers can mask the
    prompt and generation code can feed the prompt alone.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        sid_token_ids: Sequence[Sequence[int]],
        max_text_tokens: int,
    ) -> None:
        if not sid_token_ids or any(len(row) == 0 for row in sid_token_ids):
            raise ValueError("sid_token_ids needs at least one level with at least one code")
        if max_text_tokens < 1:
            raise ValueError(f"max_text_tokens must be >= 1, got {max_text_tokens}")
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no eos token")
        self.tokenizer = tokenizer
        self.sid_table: list[list[int]] = [[int(t) for t in row] for row in sid_token_ids]
        self.max_text_tokens = max_text_tokens
        self.start_id = start_token_id(tokenizer)
        self.eos_id = int(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else self.eos_id  # for collation
        self._text_cache: dict[str, list[int]] = {}  # text -> ids of " {text}", truncated
        fixed = self._encode(
            [RECOMMEND_HEADER, NEXT, ITEM_HEADER, ITEM, SID_HEADER, SID_AFTER_TEXT],
            truncate=False,
        )
        (
            self._recommend_header,
            self._next,
            self._item_header,
            self._item,
            self._sid_header,
            self._sid_after_text,
        ) = fixed
        self._title_separator = self._encode([TITLE_SEPARATOR], truncate=False)[0]

    @property
    def id_length(self) -> int:
        """M: tokens per semantic ID."""
        return len(self.sid_table)

    # ------------------------------------------------------------------ tokenization

    def _encode(self, texts: list[str], *, truncate: bool) -> list[list[int]]:
        """Token ids of each text: no special tokens added, special strings split."""
        if not texts:
            return []
        encoded = self.tokenizer(
            texts,
            add_special_tokens=False,
            split_special_tokens=True,
            truncation=truncate,
            max_length=self.max_text_tokens if truncate else None,
        )
        return [list(ids) for ids in encoded["input_ids"]]

    def prepare_texts(self, texts: Iterable[str]) -> None:
        """Tokenize many item texts/titles in one batched call (fills the cache).

        Optional: every method tokenizes on demand, but the catalogue renderers call this
        first, which is much faster than one tokenizer call per text.
        """
        missing = sorted({t for t in texts if t not in self._text_cache})
        for start in range(0, len(missing), 4096):
            chunk = missing[start : start + 4096]
            for text, ids in zip(
                chunk, self._encode([f" {t}" for t in chunk], truncate=True), strict=True
            ):
                self._text_cache[text] = ids

    def clear_text_cache(self) -> None:
        """Forget tokenized texts (streaming callers clear it per batch: flat memory)."""
        self._text_cache.clear()

    def text_token_ids(self, text: str) -> list[int]:
        """Ids of ``" {text}"`` truncated to ``max_text_tokens`` (a copy)."""
        ids = self._text_cache.get(text)
        if ids is None:
            ids = self._encode([f" {text}"], truncate=True)[0]
            self._text_cache[text] = ids
        return list(ids)

    def sid_token_ids(self, codes: Sequence[int]) -> list[int]:
        """The M token ids of the semantic ID ``codes`` (ValueError if malformed)."""
        if len(codes) != self.id_length:
            raise ValueError(
                f"semantic ID {list(codes)} has {len(codes)} codes, expected M={self.id_length}"
            )
        ids: list[int] = []
        for level, code in enumerate(codes):
            row = self.sid_table[level]
            if not 0 <= int(code) < len(row):
                raise ValueError(
                    f"code {code} at level {level} of semantic ID {list(codes)} is outside "
                    f"0..{len(row) - 1}"
                )
            ids.append(row[int(code)])
        return ids

    # ------------------------------------------------------------------ completions

    def sid_completion(self, codes: Sequence[int]) -> list[int]:
        """``<sid></s>``: the target of alignment and title_history."""
        return [*self.sid_token_ids(codes), self.eos_id]

    def recommendation_completion(self, codes: Sequence[int]) -> list[int]:
        """``<sid>``: the target of recommendation (no ``</s>``: prefix-closed format)."""
        return self.sid_token_ids(codes)

    def text_completion(self, text: str) -> list[int]:
        """``" {text}</s>"`` (text truncated): the target of reconstruction."""
        return [*self.text_token_ids(text), self.eos_id]

    # ------------------------------------------------------------------ prompts

    def recommendation(self, history_codes: Sequence[Sequence[int]]) -> list[int]:
        """``<s>Recommend the next item. History:<sid1>..<sidN>``.

        Uses every ID given, oldest first: callers pass the most recent ``history_len``.
        The same tokens open every training row that holds these items in this order
        (prefix-closed, module docstring).
        """
        return self.recommendation_from_tokens([self.sid_token_ids(c) for c in history_codes])

    def recommendation_from_tokens(self, history_sids: Iterable[Sequence[int]]) -> list[int]:
        """:meth:`recommendation` from IDs already turned into their M token ids each.

        For rendering many prompts: map every item to :meth:`sid_token_ids` once.
        """
        ids = [self.start_id, *self._recommend_header]
        for sid in history_sids:
            ids.extend(sid)
        return ids

    def alignment(self, text: str) -> list[int]:
        """``<s>Item: {text} Semantic ID:`` (text -> token)."""
        return [
            self.start_id,
            *self._item_header,
            *self.text_token_ids(text),
            *self._sid_after_text,
        ]

    def reconstruction(self, codes: Sequence[int]) -> list[int]:
        """``<s>Semantic ID:<sid> Item:`` (token -> text)."""
        return [self.start_id, *self._sid_header, *self.sid_token_ids(codes), *self._item]

    def title_history(self, titles: Sequence[str]) -> list[int]:
        """``<s>Recommend the next item. History: {title1}; {title2} Next:``.

        Each title is truncated to ``max_text_tokens``; callers pass the most recent
        ``history_len`` titles, oldest first.
        """
        ids = [self.start_id, *self._recommend_header]
        for index, title in enumerate(titles):
            if index:
                ids.extend(self._title_separator)
            ids.extend(self.text_token_ids(title))
        ids.extend(self._next)
        return ids
