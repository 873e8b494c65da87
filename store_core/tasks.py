"""Phase B tasks: what the samples are, how a mixture is drawn, how it is batched and scored.

Why one module: a task is only a renderer from the ingested data to prompt/completion token
ids (:mod:`store_core.prompts` owns the wording). Everything downstream - the mixture, the
collator, the loss - is task-agnostic except for a task index used to report a loss per
task.

Data read (:func:`load_task_data`): ``items.parquet`` and ``splits.parquet`` of the
ingested workspace, plus the semantic IDs (``item_id -> codes``). A user's *train
sequence* is their ``train`` rows ordered by ``position``; ``excluded`` rows (cold-start
items) are dropped. Cold-start items are held out of every task: no training step ever
sees them (docs/EVALUATION.md), so they are not rendered by the catalogue tasks either.

A *target* is one thing the model learns to produce: one recommendation target (the M
tokens of one item's semantic ID), or one catalogue item's completion. A *sample* is one
training row: a prompt the model only reads, then a completion holding one or more
targets back to back (:attr:`Sample.target_lengths`).

The natural samples of each task (all rendered, deterministically, users sorted by id):

* ``recommendation``: the targets of a train sequence ``s_0 .. s_{n-1}`` are ``s_1 ..
  s_{n-1}``: the first train item is never a target (no history) and the validation item
  is never one either - it is held out for early stopping and becomes the last history
  item of the test prompt (:func:`eval_prompts`). Two renderings
  (``recommender.rec_samples``), the same targets:

  - ``sequence`` (default): one row per window of the sequence (:func:`sequence_windows`),
    the prompt header followed by the window's items' IDs in order, with every target of
    the window labelled. With N = ``history_len`` and stride ``S = N // 2 + 1``, the
    first window holds ``s_0 .. s_e`` (``e = min(N, n-1)``) and labels ``s_1 .. s_e``
    (target ``s_t`` sees ``s_0 .. s_{t-1}``: t items, all it has); each next window ends
    S items later (or at ``s_{n-1}``), holds the N items before its end item too, and
    labels the targets the previous window did not. So every target is labelled exactly
    once per epoch, with its most recent history: the first ``min(N, n-1)`` targets with
    all of it, every later one with between ``N - S + 1 = ceil(N/2)`` and N items. A
    user yields ``1 + ceil(max(0, n - 1 - N) / S)`` rows (0 if ``n < 2``).
  - ``prefix``: one row per target ``s_t`` with history ``s_{max(0, t-N)} .. s_{t-1}``
    (``max(0, n - 1)`` rows per user): the per-prefix form, kept for the ablation.

  The recommendation prompt is prefix-closed (:mod:`store_core.prompts`), so the tokens
  in front of a target in a sequence row are exactly the prompt of the prefix sample with
  the same history, and exactly the test prompt of a user whose history that is.
* ``alignment`` (text -> ID) and ``reconstruction`` (ID -> text): one sample per catalogue
  item that has a semantic ID and is not a cold-start item, in item_id order.
* ``title_history`` (prefix-only): the same targets as ``prefix`` recommendation with each
  history item shown by its title (its text when the title is null).

The mixture (:func:`build_mixture`) is a plain list of ``TaskSpec(task, weight)``: each
entry contributes its task's samples ``floor(weight)`` times plus a seeded subset (without
replacement) of ``round(frac(weight) * n)`` of them. A task listed twice counts twice.
In sequence mode a recommendation window counts as one sample, so weight 0.5 keeps a
seeded half of the windows (about half of the targets).

Batches (:class:`SampleCollator`, right padding, per row ``P`` prompt and ``C``
completion tokens)::

    input_ids       [B, T]  prompt + completion, then pad
    attention_mask  [B, T]  1 on prompt and completion
    labels          [B, T]  -100 on prompt and pad; the completion ids where they sit
                            (HF convention: the model's logits at p predict labels[p + 1])
    target_ids      [B, T]  -1 off the completion; on it, the batch-wide index of the
                            target the token belongs to (0 .. targets in batch - 1)
    task_ids        [B]     index into TASK_ORDER

Too long a row loses tokens from the LEFT of its prompt (the oldest history); the start
token and the completion are kept.

The loss (:func:`multitask_loss`) runs the output projection only on the hidden states of
labelled positions (:func:`token_losses`) and averages either per token or per target;
``target`` averaging keeps the mixture weights meaningful in sequence mode (see there).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast, get_args

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from store_core.config import LossNormalization, RecSamples, TaskName, TaskSpec
from store_core.data_files import SPLITS_FILE, read_items, read_user_splits
from store_core.errors import StoreError
from store_core.model import model_device
from store_core.prompts import PromptBuilder
from store_core.splits import (
    EvalSplit,
    history_before,
    recent_history,
    split_history,
)

if TYPE_CHECKING:
    from store_core.generate.trie import SemanticIdTrie

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

#: Fixed task order: ``task_ids`` in a batch index into it.
TASK_ORDER: tuple[str, ...] = get_args(TaskName)


Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Sample:
    """One training row: the model reads ``prompt + completion``; the loss is on
    ``completion`` only, which holds ``len(target_lengths)`` targets back to back.

    ``target_lengths`` empty (the default) means one target: the whole completion.
    Raises ValueError when the lengths do not add up to the completion's length.
    """

    task: str  # a name in TASK_ORDER
    prompt: list[int]  # token ids the model reads
    completion: list[int]  # token ids the model learns to produce
    target_lengths: tuple[int, ...] = ()  # tokens per target, in order; () = one target

    def __post_init__(self) -> None:
        if self.target_lengths and (
            sum(self.target_lengths) != len(self.completion) or min(self.target_lengths) < 1
        ):
            raise ValueError(
                f"{self.task} sample: target lengths {list(self.target_lengths)} do not "
                f"split its {len(self.completion)} completion tokens"
            )

    @property
    def spans(self) -> tuple[int, ...]:
        """Tokens per target (one entry per target, summing to ``len(completion)``)."""
        return self.target_lengths or (len(self.completion),)

    @property
    def num_targets(self) -> int:
        return len(self.spans)

    @property
    def num_tokens(self) -> int:
        """Tokens of the row before any truncation (prompt + completion)."""
        return len(self.prompt) + len(self.completion)


@dataclass(frozen=True)
class TaskData:
    """Everything the task renderers read (see :func:`load_task_data`)."""

    item_ids: list[str]
    """Every catalogue item, sorted by id (the order of items.parquet)."""
    texts: dict[str, str]
    """item_id -> rendered item text."""
    titles: dict[str, str | None]
    """item_id -> title, None where the source has none."""
    codes: dict[str, list[int]]
    """item_id -> semantic-ID codes (M each)."""
    train_sequences: dict[str, list[str]]
    """user_id -> train item ids in chronological order (every user, maybe empty)."""
    valid_targets: dict[str, str]
    """user_id -> the validation item (users with one)."""
    test_targets: dict[str, str]
    """user_id -> the test item."""
    cold_items: frozenset[str] = frozenset()
    """Cold-start items: held out of every training task."""

    def __post_init__(self) -> None:
        lengths = {len(c) for c in self.codes.values()}
        if len(lengths) > 1:
            raise ValueError(f"semantic IDs have different lengths {sorted(lengths)}")

    def catalogue_items(self) -> list[str]:
        """Items rendered by the catalogue tasks: with codes, not cold-start, in id order."""
        return [i for i in self.item_ids if i in self.codes and i not in self.cold_items]

    def display_title(self, item_id: str) -> str:
        """The item's title, or its text when the title is null or empty."""
        return self.titles.get(item_id) or self.texts[item_id]

    def history(self, user: str, split: EvalSplit) -> list[str]:
        """The user's whole history before their ``split`` target, oldest first
        (:func:`store_core.splits.split_history`)."""
        return split_history(
            self.train_sequences.get(user, []), self.valid_targets.get(user), split
        )


def _columns(table: pa.Table) -> dict[str, list[Any]]:
    return {name: table.column(name).to_pylist() for name in table.column_names}


def load_task_data(data_dir: str, codes: Mapping[str, Sequence[int]]) -> TaskData:
    """Read ``items.parquet`` and ``splits.parquet`` from ``data_dir`` (any fsspec URI).

    Every item of a train/valid/test row must have codes (:class:`StoreError` otherwise:
    the semantic IDs are older than the data).
    """
    items = _columns(read_items(data_dir, ["item_id", "title", "text"]))
    grouped = read_user_splits(data_dir)
    train, valid, test, cold = grouped.train, grouped.valid, grouped.test, grouped.cold
    table = {str(k): [int(c) for c in v] for k, v in codes.items()}
    used = {i for s in train.values() for i in s} | set(valid.values()) | set(test.values())
    missing = sorted(used - table.keys())
    if missing:
        raise StoreError(
            f"{len(missing)} items of {data_dir}/{SPLITS_FILE} have no semantic ID (e.g. "
            f"{missing[0]!r}): the semantic IDs are older than the data; re-run the "
            "tokenizer stage"
        )
    data = TaskData(
        item_ids=list(items["item_id"]),
        texts=dict(zip(items["item_id"], items["text"], strict=True)),
        titles=dict(zip(items["item_id"], items["title"], strict=True)),
        codes=table,
        train_sequences=train,
        valid_targets=valid,
        test_targets=test,
        cold_items=frozenset(cold),
    )
    logger.info(
        "task data: %d items (%d cold-start), %d users, %d train interactions",
        len(data.item_ids),
        len(cold),
        len(train),
        sum(len(s) for s in train.values()),
    )
    return data


# --------------------------------------------------------------------------- renderers


@dataclass(frozen=True)
class RenderSettings:
    """What the renderers need besides the data: the history length N and the form of the
    recommendation samples (module docstring)."""

    history_len: int
    rec_samples: RecSamples = "sequence"

    def __post_init__(self) -> None:
        if self.history_len < 1:
            raise ValueError(f"history_len must be >= 1, got {self.history_len}")
        if self.rec_samples not in ("sequence", "prefix"):
            raise ValueError(
                f"rec_samples must be 'sequence' or 'prefix', got {self.rec_samples!r}"
            )


TaskRenderer = Callable[[TaskData, PromptBuilder, RenderSettings], list[Sample]]


def sequence_windows(length: int, history_len: int) -> list[tuple[int, int, int]]:
    """The sequence-mode windows of a train sequence of ``length`` items.

    Returns ``(start, first_target, end)`` per window (indices into the sequence, ``end``
    inclusive): the row holds items ``start .. end`` and labels ``first_target .. end``.
    Rule and history lengths in the module docstring; every index ``1 .. length-1`` is a
    target of exactly one window, each target has at most ``history_len`` items before it
    in its row, and at least ``ceil(history_len / 2)`` where it has that many.
    """
    if history_len < 1:
        raise ValueError(f"history_len must be >= 1, got {history_len}")
    if length < 2:
        return []
    stride = history_len // 2 + 1
    end = min(history_len, length - 1)
    windows = [(0, 1, end)]
    while end < length - 1:
        next_end = min(end + stride, length - 1)
        windows.append((next_end - history_len, end + 1, next_end))
        end = next_end
    return windows


def _prefixes(data: TaskData, history_len: int) -> list[tuple[list[str], str]]:
    """``(history, target)`` for every train target, prefix form (module docstring)."""
    if history_len < 1:
        raise ValueError(f"history_len must be >= 1, got {history_len}")
    pairs: list[tuple[list[str], str]] = []
    for user in sorted(data.train_sequences):
        sequence = data.train_sequences[user]
        for t in range(1, len(sequence)):
            pairs.append((history_before(sequence, t, history_len), sequence[t]))
    return pairs


def render_recommendation(
    data: TaskData, builder: PromptBuilder, settings: RenderSettings
) -> list[Sample]:
    """History of semantic IDs -> next semantic ID, for every train target: one row per
    window (``sequence``) or per target (``prefix``)."""
    sid = {item: builder.sid_token_ids(c) for item, c in data.codes.items()}
    if settings.rec_samples == "prefix":
        return [
            Sample(
                "recommendation",
                builder.recommendation_from_tokens([sid[i] for i in history]),
                list(sid[target]),
            )
            for history, target in _prefixes(data, settings.history_len)
        ]
    samples: list[Sample] = []
    for user in sorted(data.train_sequences):
        sequence = data.train_sequences[user]
        for start, first, end in sequence_windows(len(sequence), settings.history_len):
            targets = [sid[i] for i in sequence[first : end + 1]]
            samples.append(
                Sample(
                    "recommendation",
                    builder.recommendation_from_tokens([sid[i] for i in sequence[start:first]]),
                    [token for ids in targets for token in ids],
                    tuple(len(ids) for ids in targets),
                )
            )
    return samples


def render_alignment(
    data: TaskData, builder: PromptBuilder, settings: RenderSettings
) -> list[Sample]:
    """Item text -> its semantic ID, one per catalogue item."""
    items = data.catalogue_items()
    builder.prepare_texts(data.texts[i] for i in items)
    return [
        Sample("alignment", builder.alignment(data.texts[i]), builder.sid_completion(data.codes[i]))
        for i in items
    ]


def render_reconstruction(
    data: TaskData, builder: PromptBuilder, settings: RenderSettings
) -> list[Sample]:
    """Semantic ID -> the item's text, one per catalogue item."""
    items = data.catalogue_items()
    builder.prepare_texts(data.texts[i] for i in items)
    return [
        Sample(
            "reconstruction",
            builder.reconstruction(data.codes[i]),
            builder.text_completion(data.texts[i]),
        )
        for i in items
    ]


def render_title_history(
    data: TaskData, builder: PromptBuilder, settings: RenderSettings
) -> list[Sample]:
    """History of titles -> next semantic ID, for every train target (prefix form only:
    titles of different lengths make no fixed-width window)."""
    pairs = _prefixes(data, settings.history_len)
    builder.prepare_texts({data.display_title(i) for h, _ in pairs for i in h})
    return [
        Sample(
            "title_history",
            builder.title_history([data.display_title(i) for i in history]),
            builder.sid_completion(data.codes[target]),
        )
        for history, target in pairs
    ]


#: Every task by name: ``renderer(data, builder, settings) -> all its natural samples``.
TASKS: dict[str, TaskRenderer] = {
    "recommendation": render_recommendation,
    "alignment": render_alignment,
    "reconstruction": render_reconstruction,
    "title_history": render_title_history,
}


def build_mixture(
    specs: Sequence[TaskSpec],
    data: TaskData,
    builder: PromptBuilder,
    history_len: int,
    seed: int,
    rec_samples: RecSamples = "sequence",
) -> list[Sample]:
    """The training samples of a task mixture (rule in the module docstring).

    Entries keep the list order; within an entry, full copies come first, then the
    fractional subset in natural order (the trainer shuffles). Each entry draws its subset
    from its own stream ``(seed, entry index)``, so a task listed twice with weight 0.5
    gets two independent halves and editing one entry leaves the others' subsets alone.
    """
    settings = RenderSettings(history_len, rec_samples)
    rendered: dict[str, list[Sample]] = {}
    mixture: list[Sample] = []
    counts: dict[str, int] = {}
    for index, spec in enumerate(specs):
        if spec.task not in TASKS:
            raise ValueError(f"unknown task {spec.task!r}; known: {', '.join(TASK_ORDER)}")
        if spec.weight < 0:
            raise ValueError(f"task {spec.task}: weight must be >= 0, got {spec.weight}")
        if spec.weight == 0:
            continue
        if spec.task not in rendered:
            rendered[spec.task] = TASKS[spec.task](data, builder, settings)
        samples = rendered[spec.task]
        whole = math.floor(spec.weight)
        extra = round((spec.weight - whole) * len(samples))
        chosen = samples * whole
        if extra:
            rng = np.random.default_rng([seed, index])
            picked = np.sort(rng.choice(len(samples), size=extra, replace=False))
            chosen += [samples[i] for i in picked.tolist()]
        mixture.extend(chosen)
        counts[spec.task] = counts.get(spec.task, 0) + len(chosen)
    for task, count in counts.items():
        logger.info("mixture: %s %d samples (%d natural)", task, count, len(rendered.get(task, [])))
    logger.info(
        "mixture: %d samples, %d targets in total",
        len(mixture),
        sum(sample.num_targets for sample in mixture),
    )
    return mixture


def eval_prompts(
    data: TaskData,
    builder: PromptBuilder,
    history_len: int,
    split: EvalSplit,
) -> tuple[list[str], list[list[int]], list[str]]:
    """``(user_ids, prompt ids, target item ids)`` of the recommendation task for ``split``.

    Only users with a target in ``split``, sorted by id. valid: the history is the train
    sequence. test: the train sequence followed by the validation item (where the user
    has one). Both keep the last ``history_len`` items.
    """
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    targets = data.valid_targets if split == "valid" else data.test_targets
    users = sorted(targets)
    prompts = []
    for user in users:
        recent = recent_history(data.history(user, split), history_len)
        prompts.append(builder.recommendation([data.codes[i] for i in recent]))
    return users, prompts, [targets[u] for u in users]


# --------------------------------------------------------------------------- batches


class SampleCollator:
    """DataLoader ``collate_fn``: samples -> a padded batch (layout in the module docstring).

    ``max_length`` caps T: longer rows drop prompt tokens from the left, keeping the
    completion whole and, when the prompt starts with ``start_token_id``, that first
    token. A completion that leaves no room for one prompt token raises ValueError.
    """

    def __init__(
        self, pad_token_id: int, max_length: int | None = None, *, start_token_id: int | None = None
    ) -> None:
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self.start_token_id = start_token_id

    def _fit(self, sample: Sample) -> list[int]:
        """The prompt, left-truncated so that prompt + completion fits ``max_length``."""
        prompt = sample.prompt
        if not prompt:
            raise ValueError(f"{sample.task} sample has an empty prompt")
        if self.max_length is None or len(prompt) + len(sample.completion) <= self.max_length:
            return prompt
        room = self.max_length - len(sample.completion)
        if room < 1:
            raise ValueError(
                f"{sample.task} completion of {len(sample.completion)} tokens does not fit "
                f"max_length={self.max_length} with a prompt token"
            )
        keep_start = self.start_token_id is not None and prompt[0] == self.start_token_id
        if keep_start and room >= 2:
            return [prompt[0], *prompt[len(prompt) - (room - 1) :]]
        return prompt[len(prompt) - room :]

    def __call__(self, samples: list[Sample]) -> Batch:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        prompts = [self._fit(s) for s in samples]
        width = max(len(p) + len(s.completion) for p, s in zip(prompts, samples, strict=True))
        size = len(samples)
        input_ids = torch.full((size, width), self.pad_token_id, dtype=torch.long)  # [B, T]
        attention_mask = torch.zeros((size, width), dtype=torch.long)  # [B, T]
        labels = torch.full((size, width), IGNORE_INDEX, dtype=torch.long)  # [B, T]
        target_ids = torch.full((size, width), -1, dtype=torch.long)  # [B, T]
        task_ids = torch.empty(size, dtype=torch.long)  # [B]
        next_target = 0
        for row, (prompt, sample) in enumerate(zip(prompts, samples, strict=True)):
            if sample.task not in TASK_ORDER:
                raise ValueError(f"unknown task {sample.task!r}")
            p, c = len(prompt), len(sample.completion)
            input_ids[row, :p] = torch.tensor(prompt, dtype=torch.long)
            completion = torch.tensor(sample.completion, dtype=torch.long)
            input_ids[row, p : p + c] = completion
            labels[row, p : p + c] = completion
            spans = torch.tensor(sample.spans, dtype=torch.long)
            target_ids[row, p : p + c] = next_target + torch.repeat_interleave(
                torch.arange(len(spans)), spans
            )
            next_target += len(spans)
            attention_mask[row, : p + c] = 1
            task_ids[row] = TASK_ORDER.index(sample.task)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "target_ids": target_ids,
            "task_ids": task_ids,
        }


def padded_tokens(samples: Sequence[Sample], batch_size: int, order: Sequence[int]) -> int:
    """Tokens the collator would feed (``[B, T]`` summed over batches) for ``samples``
    batched ``batch_size`` at a time in ``order``: the cost that padding inflates."""
    total = 0
    for start in range(0, len(order), batch_size):
        lengths = [samples[i].num_tokens for i in order[start : start + batch_size]]
        total += max(lengths) * len(lengths)
    return total


# --------------------------------------------------------------------------- loss


#: Config fields of models whose causal-LM head does more than the output projection
#: (logit scaling or soft-capping): :func:`token_losses` asks those for full logits.
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


def _causal_lm(model: Any) -> Any:
    """The Hugging Face causal LM inside a DeepSpeed engine and/or a peft wrapper."""
    inner = getattr(model, "module", model)  # DeepSpeed engine -> its module
    get_base = getattr(inner, "get_base_model", None)  # peft -> the (adapted) base model
    return get_base() if callable(get_base) else inner


class IdVocabulary:
    """Which vocabulary entries are semantic-ID tokens, by level.

    Built from ``table[level][code] = token id`` (:func:`store_core.prompts.lookup_sid_tokens`).
    An ID token's probability is normalized over its own level's codes, in training
    (:func:`token_losses`) and in decoding (:mod:`store_core.generate`): constrained
    decoding only ever compares codes of one level, so the softmax runs over those
    ``K_l`` rows of the output projection instead of all ``V`` (the text tokens never
    compete with a code). For an ``[N, D]`` batch of ID positions that is ``N x D x K_l``
    instead of ``N x D x V`` multiply-adds.
    """

    def __init__(self, table: Sequence[Sequence[int]]) -> None:
        if not table:
            raise ValueError("an ID vocabulary needs at least one level")
        self.level_tokens = [torch.tensor(list(row), dtype=torch.long) for row in table]
        size = max(int(t.max()) for t in self.level_tokens) + 1
        level = torch.full((size,), -1, dtype=torch.long)  # token id -> level
        code = torch.full((size,), -1, dtype=torch.long)  # token id -> code
        for index, tokens in enumerate(self.level_tokens):
            level[tokens] = index
            code[tokens] = torch.arange(len(tokens))
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]]
        self._tables = {level.device: (level, code, self.level_tokens)}

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """``(level of token id [V'], code of token id [V'], level tokens [K_l] each)`` on
        ``device``, copied there once."""
        if device not in self._tables:
            level, code, tokens = next(iter(self._tables.values()))
            self._tables[device] = (
                level.to(device),
                code.to(device),
                [t.to(device) for t in tokens],
            )
        return self._tables[device]

    def classify(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(level, code)`` of each token id in ``tokens`` (``[N]``); -1 for text tokens."""
        table_level, table_code, _ = self.on(tokens.device)
        inside = tokens < len(table_level)
        index = torch.where(inside, tokens, 0)
        return (
            torch.where(inside, table_level[index], -1),
            torch.where(inside, table_code[index], -1),
        )


def labelled_hidden(model: Any, batch: Batch, select: torch.Tensor) -> torch.Tensor:
    """Final hidden states (after the last norm) at the positions ``select`` marks.

    ``select`` is ``[B, T-1]`` bool over predicting positions (position p predicts token
    p + 1). The model runs once, through the engine/wrapper it is given (so DeepSpeed and
    peft hooks fire), with its own head restricted to one position (``logits_to_keep=1``).
    Returns ``[N, D]``, rows in ``select``'s row-major order.
    """
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        use_cache=False,
        logits_to_keep=1,
        output_hidden_states=True,
    )
    return cast(torch.Tensor, out.hidden_states[-1])[:, :-1][select]


def _head_extras(model: Any) -> bool:
    config = getattr(_causal_lm(model), "config", None)
    return any(getattr(config, name, None) not in (None, 1, 1.0) for name in _HEAD_EXTRAS)


def _full_logits(model: Any, batch: Batch, select: torch.Tensor) -> torch.Tensor:
    """``[N, V]`` logits at ``select`` from a plain forward (full ``[B, T, V]`` logits)."""
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    )
    return cast(torch.Tensor, out.logits)[:, :-1][select]


def _level_logits(head: Any, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``[n, K]`` logits of the rows ``tokens`` of ``head`` only. A head that is not a
    plain ``nn.Linear`` with its weight in place (peft's trainable-token wrapper, a ZeRO-3
    partitioned weight that only the module's forward gathers) runs whole, then the
    columns are taken."""
    weight = head.weight if isinstance(head, torch.nn.Linear) else None
    if weight is None or weight.numel() == 0 or hasattr(weight, "ds_id"):
        return cast(torch.Tensor, head(hidden)).index_select(1, tokens)
    bias = head.bias.index_select(0, tokens) if head.bias is not None else None
    return F.linear(hidden, weight.index_select(0, tokens), bias)


@dataclass(frozen=True)
class TokenLosses:
    """Cross-entropy of every completion token of a batch, with what it belongs to."""

    per_token: torch.Tensor  # [N] float32, row-major over the batch's completion tokens
    target: torch.Tensor  # [N] batch-wide target index (collator's target_ids)
    task: torch.Tensor  # [N] index into TASK_ORDER

    def per_target(self) -> torch.Tensor:
        """``[targets]`` mean token loss of each target of the batch, in target order."""
        count = int(self.target.max()) + 1
        sums = torch.zeros(count, device=self.per_token.device).index_add_(
            0, self.target, self.per_token
        )
        sizes = torch.bincount(self.target, minlength=count).clamp_min(1)
        return sums / sizes


def token_losses(
    model: Any,
    batch: Batch,
    ids: IdVocabulary | None = None,
    *,
    gather: bool = True,
    catalogue: SemanticIdTrie | None = None,
) -> TokenLosses:
    """Per-token cross-entropy on the completion tokens of ``batch`` (collator layout).

    The output projection runs only on the final hidden states of labelled positions
    (:func:`labelled_hidden`): ``[N, D] @ [D, V]`` instead of ``[B, T, D] @ [D, V]``. With
    ``ids``, a semantic-ID token's cross-entropy is over its level's codes only
    (:class:`IdVocabulary`: ``K_l`` rows of the projection); every other token's (text,
    ``</s>``) is over the whole vocabulary; without, every token's is. ``gather=False``
    (the baseline of benchmarks/rec_samples_throughput.py), and models whose head scales
    or caps logits (``_HEAD_EXTRAS``), compute full ``[B, T, V]`` logits and take the same
    rows and columns.

    ``catalogue`` (with ``ids``; ``recommender.id_normalization: trie``): the ID tokens of
    recommendation targets are normalized over the codes that continue a catalogue item's
    ID from the target's prefix (the trie's children) instead of all ``K_l`` codes of the
    level, so a target's summed loss is ``-log p(item)`` under the item-level softmax
    over the whole catalogue factorized along the trie, the objective SASRec-CE trains
    with one softmax over items. A target whose prefix leaves the trie keeps the level
    softmax. Raises ValueError when the batch has no completion token.
    """
    device = model_device(model)
    batch = {k: v.to(device) for k, v in batch.items()}
    targets = batch["labels"][:, 1:]  # [B, T-1]: logits at p predict labels[p+1]
    select = targets != IGNORE_INDEX  # [B, T-1]
    if not bool(select.any()):
        raise ValueError("batch has no completion tokens")
    wanted = targets[select]  # [N]
    rows_of = torch.arange(targets.shape[0], device=device).unsqueeze(1).expand_as(targets)
    target = batch["target_ids"][:, 1:][select]  # [N]
    task = batch["task_ids"][rows_of[select]]  # [N]
    groups: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []  # mask, rows, labels
    node: torch.Tensor | None = None  # [N] trie node before each token, -1 = level softmax
    if ids is None:
        groups.append((torch.ones_like(wanted, dtype=torch.bool), None, wanted))
    else:
        level, code = ids.classify(wanted)  # [N], [N]
        groups.append((level < 0, None, wanted))
        groups += [(level == i, rows, code) for i, rows in enumerate(ids.on(device)[2])]
        if catalogue is not None:
            catalogue = catalogue.to(device)
            node = _catalogue_nodes(catalogue, level, code, target, task)
    if _head_extras(model) or not gather:
        full = _full_logits(model, batch, select)  # [N, V]

        def logits_of(mask: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
            return full[mask] if rows is None else full[mask].index_select(1, rows)
    else:
        hidden = labelled_hidden(model, batch, select)  # [N, D]
        head = _causal_lm(model).get_output_embeddings()

        def logits_of(mask: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
            if rows is None:
                return cast(torch.Tensor, head(hidden[mask]))
            return _level_logits(head, hidden[mask], rows)

    per_token = torch.empty(wanted.shape, dtype=torch.float32, device=device)  # [N]
    for index, (mask, rows, labels) in enumerate(groups):
        if bool(mask.any()):
            logits = logits_of(mask, rows).float()  # [n, V] or [n, K_l]
            if node is not None and rows is not None and catalogue is not None:
                logits = _trie_masked(logits, catalogue, index - 1, node[mask])
            per_token[mask] = F.cross_entropy(logits, labels[mask], reduction="none")
    return TokenLosses(per_token=per_token, target=target, task=task)


_RECOMMENDATION = TASK_ORDER.index("recommendation")


def _catalogue_nodes(
    catalogue: SemanticIdTrie,
    level: torch.Tensor,
    code: torch.Tensor,
    target: torch.Tensor,
    task: torch.Tensor,
) -> torch.Tensor:
    """``[N]`` trie node each recommendation ID token continues (its target's prefix before
    it), -1 for every other token and for targets whose prefix is not in the trie."""
    chosen = (level >= 0) & (task == _RECOMMENDATION)  # [N]
    node = torch.full_like(level, -1)
    if not bool(chosen.any()):
        return node
    count = int(target.max()) + 1
    codes = torch.full((count, catalogue.id_length), -1, dtype=torch.long, device=level.device)
    codes[target[chosen], level[chosen]] = code[chosen]  # [targets, M]
    prefix = catalogue.prefix_nodes(codes)  # [targets, M]
    node[chosen] = prefix[target[chosen], level[chosen]]
    return node


def _trie_masked(
    logits: torch.Tensor, catalogue: SemanticIdTrie, level: int, node: torch.Tensor
) -> torch.Tensor:
    """``logits`` ``[n, K_l]`` with the codes that do not continue ``node`` (``[n]``; -1:
    leave the row as is) at ``-inf``."""
    inside = node >= 0
    if not bool(inside.any()):
        return logits
    invalid = catalogue.children(level, node.clamp(min=0)) < 0  # [n, K_l]
    return logits.masked_fill(invalid & inside.unsqueeze(1), -math.inf)


def targets_per_batch(samples: Sequence[Sample], batch_size: int) -> float:
    """Expected targets in a micro-batch of ``batch_size`` samples drawn from ``samples``:
    the constant ``"target"`` loss averaging divides by (:func:`multitask_loss`)."""
    if not samples:
        raise ValueError("no samples")
    return sum(sample.num_targets for sample in samples) / len(samples) * batch_size


def multitask_loss(
    model: Any,
    batch: Batch,
    normalization: LossNormalization = "token",
    ids: IdVocabulary | None = None,
    targets_per_batch: float | None = None,
    catalogue: SemanticIdTrie | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy on the completion tokens of the batch, plus per-task means.

    ``ids``: the semantic-ID vocabulary, so ID tokens are scored over their level's codes
    as decoding scores them (Phase B always passes it; :func:`token_losses`).
    ``catalogue``: the trie of the catalogue's IDs, to normalize recommendation targets'
    ID tokens over its valid continuations (``recommender.id_normalization: trie``).

    ``normalization`` says how the token losses are averaged:

    * ``"token"``: the mean over every completion token of the batch (a target weighs as
      many tokens as it has, so a 60-token reconstruction counts 15 times a 4-token
      recommendation target);
    * ``"target"``: each target's mean token loss first, then their sum divided by
      ``targets_per_batch``, a constant: the mixture's targets per sample times the batch
      size (:func:`targets_per_batch`). Every target weighs the same across the epoch -
      one recommendation target, one alignment item, one reconstruction item - whether
      it sits alone in a prefix row or with 19 others in a sequence window, and whatever
      the batch it lands in: a batch of 32 windows (~370 targets) pulls ~11 times as hard
      as a batch of 32 catalogue rows (32 targets). So a task's share of the gradient
      over an epoch is its share of the targets, which is what the mixture weights set
      (weight 2 = twice the targets), in either recommendation form. (Dividing by the
      batch's own target count instead would give a length-grouped batch of catalogue
      rows the pull of a batch of windows.) Without ``targets_per_batch`` the batch's
      own count is used: the mean over the batch's targets.

    Works on a Hugging Face causal LM and on a DeepSpeed engine or peft model wrapping one
    (it is only called). Logits are computed only where there are labels
    (:func:`token_losses`) and upcast to float32 there. Metrics: ``loss_<task>`` (mean
    per completion token of that task's rows) for each task present, ``tokens``
    (completion tokens) and ``targets`` (targets) in the batch.
    """
    losses = token_losses(model, batch, ids, catalogue=catalogue)
    if normalization == "token":
        loss = losses.per_token.mean()
    elif normalization == "target":
        per_target = losses.per_target()
        loss = per_target.sum() / (targets_per_batch or per_target.numel())
    else:
        raise ValueError(f"unknown loss normalization {normalization!r}")
    device = losses.per_token.device
    sums = torch.zeros(len(TASK_ORDER), device=device).index_add_(
        0, losses.task, losses.per_token.detach()
    )  # [tasks]
    counts = torch.bincount(losses.task, minlength=len(TASK_ORDER))  # [tasks]
    metrics = {
        "tokens": float(losses.per_token.numel()),
        "targets": float(int(losses.target.max()) + 1),
    }
    for name, total, count in zip(TASK_ORDER, sums.tolist(), counts.tolist(), strict=True):
        if count:
            metrics[f"loss_{name}"] = total / count
    return loss, metrics
