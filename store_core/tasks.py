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

The natural samples of each task (all rendered, deterministically, users sorted by id):

* ``recommendation``: for a train sequence ``s_0 .. s_{n-1}`` and each ``t`` in
  ``1 .. n-1``, the target ``s_t`` with history ``s_{max(0, t-N)} .. s_{t-1}`` (the most
  recent N = ``history_len`` items, oldest first). A user contributes ``max(0, n - 1)``
  samples: the first train item is never a target (no history) and the validation item is
  never a target either - it is held out for early stopping and becomes the last history
  item of the test prompt (:func:`eval_prompts`).
* ``alignment`` (text -> ID) and ``reconstruction`` (ID -> text): one sample per catalogue
  item that has a semantic ID and is not a cold-start item, in item_id order.
* ``title_history``: the same prefixes as ``recommendation`` with each history item shown
  by its title (its text when the title is null).

The mixture (:func:`build_mixture`) is a plain list of ``TaskSpec(task, weight)``: each
entry contributes its task's samples ``floor(weight)`` times plus a seeded subset (without
replacement) of ``round(frac(weight) * n)`` of them. A task listed twice counts twice.

Batches (:class:`SampleCollator`, right padding, per row ``P`` prompt and ``C``
completion tokens)::

    input_ids       [B, T]  prompt + completion, then pad
    attention_mask  [B, T]  1 on prompt and completion
    labels          [B, T]  -100 on prompt and pad; the completion ids where they sit
                            (HF convention: the model's logits at p predict labels[p + 1])
    task_ids        [B]     index into TASK_ORDER

Too long a row loses tokens from the LEFT of its prompt (the oldest history); the start
token and the completion are kept.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from store_core.config import LossNormalization, TaskName, TaskSpec
from store_core.errors import DataError, StoreError
from store_core.model import model_device
from store_core.prompts import PromptBuilder
from store_core.splits import group_splits

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

#: Fixed task order: ``task_ids`` in a batch index into it.
TASK_ORDER: tuple[str, ...] = get_args(TaskName)

ITEMS_FILE = "items.parquet"
SPLITS_FILE = "splits.parquet"

Batch = dict[str, torch.Tensor]

#: The held-out splits :func:`eval_prompts` renders.
EvalSplit = Literal["valid", "test"]


@dataclass(frozen=True)
class Sample:
    """One training example: the loss is on ``completion`` only."""

    task: str  # a name in TASK_ORDER
    prompt: list[int]  # token ids the model reads
    completion: list[int]  # token ids the model learns to produce (ends with eos)


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


def _read_table(uri: str, columns: list[str]) -> dict[str, list[Any]]:
    try:
        with fsspec.open(uri, "rb") as handle:
            table = pq.read_table(handle, columns=columns)
    except FileNotFoundError:
        raise DataError("not found: run the ingest stage first", file=uri) from None
    except (KeyError, ValueError) as exc:  # missing column, not Parquet
        raise DataError(f"cannot read columns {columns}: {exc}", file=uri) from exc
    return {name: table.column(name).to_pylist() for name in columns}


def load_task_data(data_dir: str, codes: Mapping[str, Sequence[int]]) -> TaskData:
    """Read ``items.parquet`` and ``splits.parquet`` from ``data_dir`` (any fsspec URI).

    Every item of a train/valid/test row must have codes (:class:`StoreError` otherwise:
    the semantic IDs are older than the data).
    """
    items = _read_table(f"{data_dir}/{ITEMS_FILE}", ["item_id", "title", "text"])
    rows = _read_table(
        f"{data_dir}/{SPLITS_FILE}", ["user_id", "item_id", "position", "split", "cold_start"]
    )
    grouped = group_splits(
        rows["user_id"], rows["item_id"], rows["position"], rows["split"], rows["cold_start"]
    )
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

TaskRenderer = Callable[[TaskData, PromptBuilder, int], list[Sample]]


def _prefixes(data: TaskData, history_len: int) -> list[tuple[list[str], str]]:
    """``(history, target)`` for every prefix rule in the module docstring."""
    if history_len < 1:
        raise ValueError(f"history_len must be >= 1, got {history_len}")
    pairs: list[tuple[list[str], str]] = []
    for user in sorted(data.train_sequences):
        sequence = data.train_sequences[user]
        for t in range(1, len(sequence)):
            pairs.append((sequence[max(0, t - history_len) : t], sequence[t]))
    return pairs


def render_recommendation(data: TaskData, builder: PromptBuilder, history_len: int) -> list[Sample]:
    """History of semantic IDs -> next semantic ID, for every train prefix."""
    sid = {item: builder.sid_token_ids(c) for item, c in data.codes.items()}
    return [
        Sample(
            "recommendation",
            builder.recommendation_from_tokens([sid[i] for i in history]),
            [*sid[target], builder.eos_id],
        )
        for history, target in _prefixes(data, history_len)
    ]


def render_alignment(data: TaskData, builder: PromptBuilder, history_len: int) -> list[Sample]:
    """Item text -> its semantic ID, one per catalogue item."""
    items = data.catalogue_items()
    builder.prepare_texts(data.texts[i] for i in items)
    return [
        Sample("alignment", builder.alignment(data.texts[i]), builder.sid_completion(data.codes[i]))
        for i in items
    ]


def render_reconstruction(data: TaskData, builder: PromptBuilder, history_len: int) -> list[Sample]:
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


def render_title_history(data: TaskData, builder: PromptBuilder, history_len: int) -> list[Sample]:
    """History of titles -> next semantic ID, for every train prefix."""
    pairs = _prefixes(data, history_len)
    builder.prepare_texts({data.display_title(i) for h, _ in pairs for i in h})
    return [
        Sample(
            "title_history",
            builder.title_history([data.display_title(i) for i in history]),
            builder.sid_completion(data.codes[target]),
        )
        for history, target in pairs
    ]


#: Every task by name: ``renderer(data, builder, history_len) -> all its natural samples``.
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
) -> list[Sample]:
    """The training samples of a task mixture (rule in the module docstring).

    Entries keep the list order; within an entry, full copies come first, then the
    fractional subset in natural order (the trainer shuffles). Each entry draws its subset
    from its own stream ``(seed, entry index)``, so a task listed twice with weight 0.5
    gets two independent halves and editing one entry leaves the others' subsets alone.
    """
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
            rendered[spec.task] = TASKS[spec.task](data, builder, history_len)
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
    logger.info("mixture: %d samples in total", len(mixture))
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
        history = list(data.train_sequences.get(user, []))
        if split == "test" and user in data.valid_targets:
            history.append(data.valid_targets[user])
        recent = history[max(0, len(history) - history_len) :]
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
        task_ids = torch.empty(size, dtype=torch.long)  # [B]
        for row, (prompt, sample) in enumerate(zip(prompts, samples, strict=True)):
            if sample.task not in TASK_ORDER:
                raise ValueError(f"unknown task {sample.task!r}")
            p, c = len(prompt), len(sample.completion)
            input_ids[row, :p] = torch.tensor(prompt, dtype=torch.long)
            completion = torch.tensor(sample.completion, dtype=torch.long)
            input_ids[row, p : p + c] = completion
            labels[row, p : p + c] = completion
            attention_mask[row, : p + c] = 1
            task_ids[row] = TASK_ORDER.index(sample.task)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "task_ids": task_ids,
        }


# --------------------------------------------------------------------------- loss


def multitask_loss(
    model: Any, batch: Batch, normalization: LossNormalization = "token"
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy on the completion tokens of the batch, plus per-task means.

    ``normalization`` says how the token losses are averaged: ``"token"`` = the mean over
    every completion token of the batch (a sample weighs as many tokens as its completion
    has, so a 60-token reconstruction counts 15 times a 4-token recommendation);
    ``"sample"`` = each sample's mean first, then the mean over samples (every sample
    weighs the same, so the mixture weights are the tasks' shares of the gradient).

    Works on a Hugging Face causal LM and on a DeepSpeed engine wrapping one (it is only
    called). Logits are requested only from the first column holding a target onwards
    (``logits_to_keep``), and only the target positions are upcast to float32, which
    keeps the ``[B, T, V]`` logits of a large vocabulary out of memory where possible.
    Metrics: ``loss_<task>`` (mean per completion token of that task's rows) for each task
    present, and ``tokens`` (completion tokens in the batch).
    """
    device = model_device(model)
    input_ids = batch["input_ids"].to(device)  # [B, T]
    attention_mask = batch["attention_mask"].to(device)  # [B, T]
    targets = batch["labels"].to(device)[:, 1:]  # [B, T-1]: logits at p predict labels[p+1]
    task_ids = batch["task_ids"].to(device)  # [B]
    has_target = targets != IGNORE_INDEX  # [B, T-1]
    columns = has_target.any(dim=0).nonzero()
    if columns.numel() == 0:
        raise ValueError("batch has no completion tokens")
    first = int(columns[0, 0])
    keep = input_ids.shape[1] - first  # logits at positions first .. T-1
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep
    )
    logits = cast(torch.Tensor, out.logits)[:, -keep:][:, :-1]  # [B, T-1-first, V]
    targets, has_target = targets[:, first:], has_target[:, first:]  # [B, T-1-first]
    per_token = F.cross_entropy(
        logits[has_target].float(), targets[has_target], reduction="none"
    )  # [N]
    rows = torch.arange(targets.shape[0], device=device).unsqueeze(1).expand_as(targets)
    token_row = rows[has_target]  # [N]
    if normalization == "token":
        loss = per_token.mean()
    elif normalization == "sample":
        lengths = has_target.sum(dim=1)  # [B]
        present = lengths > 0  # [B]
        loss = (per_token / lengths[token_row]).sum() / present.sum()
    else:
        raise ValueError(f"unknown loss normalization {normalization!r}")
    token_task = task_ids[token_row]  # [N]
    sums = torch.zeros(len(TASK_ORDER), device=device).index_add_(
        0, token_task, per_token.detach()
    )  # [tasks]
    counts = torch.bincount(token_task, minlength=len(TASK_ORDER))  # [tasks]
    metrics = {"tokens": float(per_token.numel())}
    for name, total, count in zip(TASK_ORDER, sums.tolist(), counts.tolist(), strict=True):
        if count:
            metrics[f"loss_{name}"] = total / count
    return loss, metrics
