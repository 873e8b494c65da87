"""Phase B tasks: data loading, prefix expansion, mixture weights, collation, loss, eval prompts."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from store_core.config import TaskName, TaskSpec, load_config
from store_core.errors import DataError, StoreError
from store_core.ingest import run_ingest
from store_core.model import train_bpe_tokenizer
from store_core.prompts import PromptBuilder, lookup_sid_tokens
from store_core.schemas import ITEMS_SCHEMA, SPLITS_SCHEMA
from store_core.semantic_ids import vocabulary
from store_core.tasks import (
    IGNORE_INDEX,
    TASK_ORDER,
    TASKS,
    IdVocabulary,
    RenderSettings,
    Sample,
    SampleCollator,
    TaskData,
    build_mixture,
    eval_prompts,
    load_task_data,
    multitask_loss,
    padded_tokens,
    sequence_windows,
    targets_per_batch,
    token_losses,
)

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
LEVELS = [4, 4, 4]
N = 3  # history_len in the hand-made tests
PREFIX = RenderSettings(N, "prefix")
SEQUENCE = RenderSettings(N, "sequence")

# item -> (title, text); G has no title, Z has no semantic ID, X is a cold-start item.
ITEMS = {
    "A": ("Alien", "title: Alien; genres: Horror"),
    "B": ("Babe", "title: Babe; genres: Children"),
    "C": ("Casino", "title: Casino; genres: Crime"),
    "D": ("Dune", "title: Dune; genres: Sci-Fi"),
    "E": ("Emma", "title: Emma; genres: Drama"),
    "F": ("Fargo", "title: Fargo; genres: Crime"),
    "G": (None, "genres: Documentary"),
    "H": ("Heat", "title: Heat; genres: Action"),
    "X": ("Xanadu", "title: Xanadu; genres: Musical"),
    "Z": ("Zelig", "title: Zelig; genres: Comedy"),
}
CODES = {item: [i % 4, (i // 4) % 4, i % 3] for i, item in enumerate(sorted(ITEMS)) if item != "Z"}
# user -> [(item, split, cold_start)] in chronological order.
SEQUENCES = {
    "u1": [
        ("A", "train", False),
        ("B", "train", False),
        ("C", "train", False),
        ("D", "valid", False),
        ("E", "test", False),
    ],
    "u2": [("F", "train", False), ("A", "test", False)],  # 1 train row: no sample
    "u3": [("B", "test", False)],  # only a test row
    "u4": [
        ("A", "train", False),
        ("X", "excluded", True),
        *[(i, "train", False) for i in "BCDEFG"],
        ("H", "valid", False),
        ("A", "test", False),
    ],
    "u5": [("C", "train", False), ("D", "train", False), ("X", "test", True)],
}
TRAIN = {
    user: [item for item, split, _ in rows if split == "train"] for user, rows in SEQUENCES.items()
}


def write_dataset(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    items = pa.Table.from_pydict(
        {
            "item_id": sorted(ITEMS),
            "title": [ITEMS[i][0] for i in sorted(ITEMS)],
            "fields": [[] for _ in ITEMS],
            "text": [ITEMS[i][1] for i in sorted(ITEMS)],
            "content_hash": ["h"] * len(ITEMS),
        },
        schema=ITEMS_SCHEMA,
    )
    rows = [
        (user, item, position, split, cold)
        for user, seq in SEQUENCES.items()
        for position, (item, split, cold) in enumerate(seq)
    ]
    rows.reverse()  # the loader must order by position, not by file order
    splits = pa.Table.from_pylist(
        [dict(zip(SPLITS_SCHEMA.names, row, strict=True)) for row in rows], schema=SPLITS_SCHEMA
    )
    pq.write_table(items, directory / "items.parquet")
    pq.write_table(splits, directory / "splits.parquet")
    return directory


def make_tokenizer(levels: list[int]) -> PreTrainedTokenizerFast:
    texts = [text for _, text in ITEMS.values()] + ["Recommend the next item. History: Next:"]
    tokenizer = train_bpe_tokenizer(texts * 3, vocab_size=300)
    tokenizer.add_tokens(vocabulary(levels), special_tokens=True)
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer(LEVELS)


@pytest.fixture(scope="module")
def builder(tokenizer: PreTrainedTokenizerFast) -> PromptBuilder:
    return PromptBuilder(tokenizer, lookup_sid_tokens(tokenizer, LEVELS), max_text_tokens=32)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> TaskData:
    return load_task_data(str(write_dataset(tmp_path_factory.mktemp("data"))), CODES)


def expected_count(sequences: dict[str, list[str]]) -> int:
    return sum(max(0, len(s) - 1) for s in sequences.values())


# --------------------------------------------------------------------------- data


def test_load_task_data(data: TaskData) -> None:
    assert data.item_ids == sorted(ITEMS)
    assert data.train_sequences == TRAIN  # ordered by position; 'excluded' dropped
    assert data.valid_targets == {"u1": "D", "u4": "H"}
    assert data.test_targets == {"u1": "E", "u2": "A", "u3": "B", "u4": "A", "u5": "X"}
    assert data.cold_items == frozenset({"X"})
    assert data.titles["G"] is None and data.display_title("G") == "genres: Documentary"
    assert data.catalogue_items() == ["A", "B", "C", "D", "E", "F", "G", "H"]  # no X, no Z


def test_load_task_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"items\.parquet"):
        load_task_data(str(tmp_path / "nowhere"), CODES)
    directory = write_dataset(tmp_path / "data")
    codes = {k: v for k, v in CODES.items() if k != "H"}
    with pytest.raises(StoreError, match=r"1 items .* no semantic ID .*'H'"):
        load_task_data(str(directory), codes)


def test_every_task_name_has_a_renderer() -> None:
    assert get_args(TaskName) == TASK_ORDER
    assert set(TASKS) == set(TASK_ORDER)


# --------------------------------------------------------------------------- tasks


def test_recommendation_expands_every_train_prefix(data: TaskData, builder: PromptBuilder) -> None:
    samples = TASKS["recommendation"](data, builder, PREFIX)
    assert len(samples) == expected_count(TRAIN) == 2 + 0 + 0 + 6 + 1
    expected = []
    for user in sorted(TRAIN):
        seq = TRAIN[user]
        for t in range(1, len(seq)):
            expected.append((seq[max(0, t - N) : t], seq[t]))
    for sample, (history, target) in zip(samples, expected, strict=True):
        assert sample.task == "recommendation"
        assert sample.prompt == builder.recommendation([CODES[i] for i in history])
        assert sample.completion == builder.recommendation_completion(CODES[target])
    # u4 (train A B C D E F G; X excluded): histories grow to N, then slide.
    assert expected[3] == (["A", "B"], "C")
    assert expected[6] == (["C", "D", "E"], "F")
    assert expected[-2] == (["D", "E", "F"], "G")
    targets = {target for _, target in expected}
    assert "H" not in targets and "D" in targets  # D is u4's train item, u1's valid item
    assert len(expected[-2][0]) == N


def test_catalogue_tasks_one_sample_per_item(
    data: TaskData, builder: PromptBuilder, tokenizer: PreTrainedTokenizerFast
) -> None:
    alignment = TASKS["alignment"](data, builder, PREFIX)
    reconstruction = TASKS["reconstruction"](data, builder, PREFIX)
    catalogue = ["A", "B", "C", "D", "E", "F", "G", "H"]
    assert len(alignment) == len(reconstruction) == len(catalogue)
    for item, a, r in zip(catalogue, alignment, reconstruction, strict=True):
        assert a == Sample("alignment", builder.alignment(ITEMS[item][1]), a.completion)
        assert a.completion == builder.sid_completion(CODES[item])
        assert r.prompt == builder.reconstruction(CODES[item])
        assert r.completion == builder.text_completion(ITEMS[item][1])
    assert tokenizer.decode(alignment[0].prompt + alignment[0].completion) == (
        "<s>Item: title: Alien; genres: Horror Semantic ID:<a_0><b_0><c_0></s>"
    )
    assert tokenizer.decode(reconstruction[1].prompt + reconstruction[1].completion) == (
        "<s>Semantic ID:<a_1><b_0><c_1> Item: title: Babe; genres: Children</s>"
    )


def test_title_history_uses_titles_with_text_fallback(
    data: TaskData, builder: PromptBuilder, tokenizer: PreTrainedTokenizerFast
) -> None:
    samples = TASKS["title_history"](data, builder, PREFIX)
    recommendation = TASKS["recommendation"](data, builder, PREFIX)
    assert len(samples) == len(recommendation)
    assert [s.completion[:-1] for s in samples] == [s.completion for s in recommendation]
    # u4's last prefix: history D, E, F -> G.
    last_u4 = samples[-2]
    assert tokenizer.decode(last_u4.prompt + last_u4.completion) == (
        "<s>Recommend the next item. History: Dune; Emma; Fargo Next:<a_2><b_1><c_0></s>"
    )
    u5 = samples[-1]
    assert tokenizer.decode(u5.prompt) == "<s>Recommend the next item. History: Casino Next:"
    with_g = builder.title_history(["Emma", "Fargo", data.display_title("G")])
    assert tokenizer.decode(with_g) == (
        "<s>Recommend the next item. History: Emma; Fargo; genres: Documentary Next:"
    )


def test_golden_recommendation_sample(
    data: TaskData, builder: PromptBuilder, tokenizer: PreTrainedTokenizerFast
) -> None:
    first = TASKS["recommendation"](data, builder, PREFIX)[1]  # u1: A, B -> C
    assert tokenizer.decode(first.prompt + first.completion) == (
        "<s>Recommend the next item. History:<a_0><b_0><c_0><a_1><b_0><c_1><a_2><b_0><c_2>"
    )


@pytest.mark.skipif(
    not (SHARED_DATASETS / "ml-100k").exists(), reason="shared ml-100k dataset not present"
)
def test_ml100k_prefix_count(tmp_path: Path) -> None:
    path = SHARED_DATASETS / "ml-100k"
    cfg = load_config(
        None,
        [
            f"workspace={tmp_path}",
            "data.dataset=null",
            "data.format=movielens",
            f"data.path={path}",
            "tracking.enabled=false",
        ],
    )
    run_ingest(cfg)
    items = pq.read_table(f"{cfg.data_dir}/items.parquet").column("item_id").to_pylist()
    levels = [8, 8, 27]
    codes = {item: [i % 8, (i // 8) % 8, i // 64] for i, item in enumerate(items)}
    data = load_task_data(cfg.data_dir, codes)
    assert sum(len(s) for s in data.train_sequences.values()) == 98114
    tokenizer = make_tokenizer(levels)
    builder = PromptBuilder(tokenizer, lookup_sid_tokens(tokenizer, levels), max_text_tokens=32)
    samples = TASKS["recommendation"](data, builder, RenderSettings(20, "prefix"))
    assert len(samples) == expected_count(data.train_sequences) == 98114 - 943 == 97171
    longest = max(len(s.prompt) for s in samples)
    assert longest == len(builder.recommendation([[0, 0, 0]] * 20))
    windows = TASKS["recommendation"](data, builder, RenderSettings(20, "sequence"))
    assert sum(w.num_targets for w in windows) == 97171  # the same targets, once each
    assert len(windows) == sum(
        len(sequence_windows(len(s), 20)) for s in data.train_sequences.values()
    )
    assert len(windows) < 97171 / 8  # ml-100k users are long: ~10 targets per row
    assert max(len(w.prompt) + len(w.completion) for w in windows) == len(
        builder.recommendation([[0, 0, 0]] * 21)
    )


# --------------------------------------------------------------------------- mixture


def test_mixture_weights(data: TaskData, builder: PromptBuilder) -> None:
    n_rec = expected_count(TRAIN)  # 9
    n_items = 8

    def counts(specs: list[TaskSpec], seed: int = 0) -> Counter[str]:
        return Counter(s.task for s in build_mixture(specs, data, builder, N, seed, "prefix"))

    one = [TaskSpec(task="recommendation"), TaskSpec(task="alignment")]
    assert counts(one) == {"recommendation": n_rec, "alignment": n_items}
    doubled = [TaskSpec(task="recommendation", weight=2.0), TaskSpec(task="alignment")]
    assert counts(doubled) == {"recommendation": 2 * n_rec, "alignment": n_items}
    halved = [TaskSpec(task="recommendation"), TaskSpec(task="alignment", weight=0.5)]
    assert counts(halved) == {"recommendation": n_rec, "alignment": n_items // 2}
    dropped = [TaskSpec(task="recommendation"), TaskSpec(task="reconstruction", weight=0.0)]
    assert counts(dropped) == {"recommendation": n_rec}
    twice = [TaskSpec(task="alignment"), TaskSpec(task="alignment")]
    assert counts(twice) == {"alignment": 2 * n_items}
    mixed = [TaskSpec(task="alignment", weight=1.5), TaskSpec(task="title_history", weight=0.25)]
    assert counts(mixed) == {"alignment": 12, "title_history": round(0.25 * n_rec)}
    # Sequence mode (the default): 5 windows (u1 1, u4 3, u5 1) hold the same 9 targets.
    windows = build_mixture(one, data, builder, N, 0)
    assert Counter(s.task for s in windows) == {"recommendation": 5, "alignment": n_items}
    assert sum(s.num_targets for s in windows if s.task == "recommendation") == n_rec


def test_mixture_subsets_are_seeded_and_without_replacement(
    data: TaskData, builder: PromptBuilder
) -> None:
    natural = TASKS["alignment"](data, builder, PREFIX)
    spec = [TaskSpec(task="alignment", weight=0.5)]
    first = build_mixture(spec, data, builder, N, seed=1)
    assert first == build_mixture(spec, data, builder, N, seed=1)  # deterministic
    subsets = {
        tuple(natural.index(s) for s in build_mixture(spec, data, builder, N, seed))
        for seed in range(10)
    }
    assert len(subsets) > 1  # the seed matters
    for subset in subsets:
        assert len(set(subset)) == len(subset) == 4  # no sample drawn twice
    with_whole = build_mixture([TaskSpec(task="alignment", weight=2.5)], data, builder, N, 1)
    assert with_whole[: 2 * len(natural)] == natural * 2
    assert with_whole[2 * len(natural) :] == first


# --------------------------------------------------------------------------- collation


def test_collator_masks_prompt_and_padding() -> None:
    samples = [
        Sample("recommendation", [1, 10, 11, 12], [20, 21, 2]),
        Sample("reconstruction", [1, 13], [22, 2]),
    ]
    batch = SampleCollator(pad_token_id=0)(samples)
    assert batch["input_ids"].tolist() == [[1, 10, 11, 12, 20, 21, 2], [1, 13, 22, 2, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 7, [1, 1, 1, 1, 0, 0, 0]]
    m = IGNORE_INDEX
    assert batch["labels"].tolist() == [[m, m, m, m, 20, 21, 2], [m, m, 22, 2, m, m, m]]
    assert batch["task_ids"].tolist() == [
        TASK_ORDER.index("recommendation"),
        TASK_ORDER.index("reconstruction"),
    ]


def test_collator_truncates_the_prompt_from_the_left() -> None:
    sample = Sample("recommendation", [1, 10, 11, 12, 13, 14], [20, 21, 2])
    plain = SampleCollator(pad_token_id=0, max_length=5)([sample])
    assert plain["input_ids"].tolist() == [[13, 14, 20, 21, 2]]
    assert plain["labels"].tolist()[0][2:] == [20, 21, 2]
    keep_start = SampleCollator(pad_token_id=0, max_length=5, start_token_id=1)([sample])
    assert keep_start["input_ids"].tolist() == [[1, 14, 20, 21, 2]]
    assert keep_start["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 20, 21, 2]]
    short = Sample("alignment", [1, 10], [20, 2])
    assert SampleCollator(0, 5, start_token_id=1)([short])["input_ids"].tolist() == [[1, 10, 20, 2]]
    with pytest.raises(ValueError, match="does not fit"):
        SampleCollator(pad_token_id=0, max_length=3)([sample])


# --------------------------------------------------------------------------- loss


def tiny_model(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


class EngineLike(torch.nn.Module):
    """Stands in for a DeepSpeed engine: wraps the model in ``.module`` and forwards calls."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, **kwargs: Any) -> Any:
        return self.module(**kwargs)


def test_multitask_loss_equals_hand_computed_cross_entropy(
    data: TaskData, builder: PromptBuilder, tokenizer: PreTrainedTokenizerFast
) -> None:
    samples = [
        *TASKS["recommendation"](data, builder, PREFIX)[:2],
        TASKS["alignment"](data, builder, PREFIX)[0],
        TASKS["reconstruction"](data, builder, PREFIX)[3],
    ]
    batch = SampleCollator(pad_token_id=int(tokenizer.pad_token_id))(samples)
    model = tiny_model(len(tokenizer))
    loss, metrics = multitask_loss(model, batch)

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    log_probs = F.log_softmax(logits.float(), dim=-1)  # [B, T, V]
    per_task: dict[str, list[float]] = {}
    for row, sample in enumerate(samples):
        start = len(sample.prompt)
        for offset, token in enumerate(sample.completion):
            # The logits one position earlier predict each completion token.
            nll = -log_probs[row, start + offset - 1, token]
            per_task.setdefault(sample.task, []).append(float(nll))
    everything = [v for values in per_task.values() for v in values]
    assert loss.item() == pytest.approx(sum(everything) / len(everything), rel=1e-5)
    assert metrics["tokens"] == len(everything) == sum(len(s.completion) for s in samples)
    assert metrics["targets"] == 4.0
    assert set(metrics) == {
        "tokens",
        "targets",
        "loss_recommendation",
        "loss_alignment",
        "loss_reconstruction",
    }
    for task, values in per_task.items():
        assert metrics[f"loss_{task}"] == pytest.approx(sum(values) / len(values), rel=1e-5)

    # The same through an engine-like wrapper; gradients reach the parameters.
    wrapped_loss, wrapped_metrics = multitask_loss(EngineLike(model), batch)
    assert wrapped_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    assert wrapped_metrics == pytest.approx(metrics)
    wrapped_loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_multitask_loss_single_task_and_empty_batch(tokenizer: PreTrainedTokenizerFast) -> None:
    """Keys only for the tasks present; the loss depends on the completion; no target fails."""
    model = tiny_model(len(tokenizer))
    collate = SampleCollator(pad_token_id=0)
    base = collate([Sample("alignment", [1, 5, 6, 7], [8, 2])])
    other_completion = collate([Sample("alignment", [1, 5, 6, 7], [9, 2])])
    loss, metrics = multitask_loss(model, base)
    assert metrics["tokens"] == 2.0 and set(metrics) == {"tokens", "targets", "loss_alignment"}
    assert multitask_loss(model, other_completion)[0].item() != pytest.approx(loss.item())
    with pytest.raises(ValueError, match="no completion tokens"):
        multitask_loss(model, {**base, "labels": torch.full_like(base["labels"], -100)})


# --------------------------------------------------------------------------- evaluation


def test_eval_prompts(data: TaskData, builder: PromptBuilder) -> None:
    users, prompts, targets = eval_prompts(data, builder, N, "valid")
    assert users == ["u1", "u4"] and targets == ["D", "H"]
    assert prompts[0] == builder.recommendation([CODES[i] for i in ["A", "B", "C"]])
    assert prompts[1] == builder.recommendation([CODES[i] for i in ["E", "F", "G"]])

    users, prompts, targets = eval_prompts(data, builder, N, "test")
    assert users == ["u1", "u2", "u3", "u4", "u5"]
    assert targets == ["E", "A", "B", "A", "X"]
    histories = [["B", "C", "D"], ["F"], [], ["F", "G", "H"], ["C", "D"]]
    for prompt, history in zip(prompts, histories, strict=True):
        assert prompt == builder.recommendation([CODES[i] for i in history])
    with pytest.raises(ValueError, match="split"):
        eval_prompts(data, builder, N, "train")  # type: ignore[arg-type]


def test_target_normalization_on_a_hand_made_batch(
    data: TaskData, builder: PromptBuilder, tokenizer: PreTrainedTokenizerFast
) -> None:
    """'target' = mean over the batch's targets of each target's mean token loss, whether
    the target sits in a sequence window with others or alone; 'token' differs."""
    window = TASKS["recommendation"](data, builder, SEQUENCE)[1]  # u4: A B C D, 3 targets
    reconstruction = TASKS["reconstruction"](data, builder, PREFIX)[3]  # 1 long target
    samples = [window, reconstruction]
    assert window.num_targets == 3 and window.spans == (3, 3, 3)
    assert len(reconstruction.completion) > 2 * 3  # lengths differ
    batch = SampleCollator(pad_token_id=int(tokenizer.pad_token_id))(samples)
    p = len(window.prompt)
    assert batch["target_ids"][0, p : p + 9].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert set(batch["target_ids"][1].tolist()) == {-1, 3}
    model = tiny_model(len(tokenizer))
    with torch.no_grad():  # peaked outputs, so the token losses differ from one another
        model.lm_head.weight.mul_(200.0)
    loss, metrics = multitask_loss(model, batch, normalization="target")
    token_loss, token_metrics = multitask_loss(model, batch, normalization="token")

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    log_probs = F.log_softmax(logits.float(), dim=-1)
    per_target: list[float] = []
    every_token: list[float] = []
    for row, sample in enumerate(samples):
        start = len(sample.prompt)
        nll = [
            -float(log_probs[row, start + offset - 1, token])
            for offset, token in enumerate(sample.completion)
        ]
        every_token += nll
        offset = 0
        for length in sample.spans:
            per_target.append(sum(nll[offset : offset + length]) / length)
            offset += length
    assert len(per_target) == 4 and metrics["targets"] == 4.0
    assert loss.item() == pytest.approx(sum(per_target) / 4, rel=1e-5)
    # With the mixture's expected targets per batch, every target weighs 1 / that constant
    # whatever batch it is in: a batch with fewer targets pulls less.
    scaled, _ = multitask_loss(model, batch, "target", targets_per_batch=10.0)
    assert scaled.item() == pytest.approx(sum(per_target) / 10.0, rel=1e-5)
    mixture = [window, reconstruction, reconstruction, reconstruction]  # 3 + 1 + 1 + 1
    assert targets_per_batch(mixture, batch_size=2) == pytest.approx(6 / 4 * 2)
    assert token_loss.item() == pytest.approx(sum(every_token) / len(every_token), rel=1e-5)
    assert token_loss.item() != pytest.approx(loss.item(), rel=1e-3)
    assert metrics == pytest.approx(token_metrics)  # the per-task means do not change
    loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown loss normalization"):
        multitask_loss(model, batch, normalization="batch")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- sequence mode


@pytest.mark.parametrize("history_len", [1, 2, 3, 5, 20, 50])
def test_sequence_windows_label_every_target_once(history_len: int) -> None:
    minimum = -(-history_len // 2)  # ceil(N/2)
    for length in range(0, 130):
        windows = sequence_windows(length, history_len)
        labelled = [t for _, first, end in windows for t in range(first, end + 1)]
        assert labelled == list(range(1, length))  # each target once, in order
        for start, first, end in windows:
            assert 0 <= start < first <= end < length
            assert end - start <= history_len  # at most N items before any target
            for t in range(first, end + 1):
                assert t - start >= min(t, minimum)  # at least N/2 (or all it has)
        if length > 1:
            assert windows[0] == (0, 1, min(history_len, length - 1))


def test_sequence_rows_are_prefix_closed(
    data: TaskData, builder: PromptBuilder, tokenizer: PreTrainedTokenizerFast
) -> None:
    """Before each target a window holds exactly the prefix prompt of that history, and a
    whole row is the prompt a user with that history is decoded from."""
    windows = TASKS["recommendation"](data, builder, SEQUENCE)
    assert [w.num_targets for w in windows] == [2, 3, 2, 1, 1]  # u1; u4 x3; u5
    # u4 = A B C D E F G; stride 2: rows A-D (B C D), C-F (E F), D-G (G).
    expected_rows = [["A", "B", "C"], ["A", "B", "C", "D"], ["C", "D", "E", "F"]]
    expected_rows += [["D", "E", "F", "G"], ["C", "D"]]
    for window, items in zip(windows, expected_rows, strict=True):
        tokens = window.prompt + window.completion
        assert tokens == builder.recommendation([CODES[i] for i in items])
        first = len(items) - window.num_targets
        position = len(window.prompt)
        for index, length in zip(range(first, len(items)), window.spans, strict=True):
            history = items[:index]
            assert tokens[:position] == builder.recommendation([CODES[i] for i in history])
            target = tokens[position : position + length]
            assert target == builder.recommendation_completion(CODES[items[index]])
            position += length
    # Golden strings: u4's second window, and u1's row = u1's validation prompt.
    assert tokenizer.decode(windows[2].prompt) == (
        "<s>Recommend the next item. History:<a_2><b_0><c_2><a_3><b_0><c_0>"
    )
    assert tokenizer.decode(windows[2].completion) == "<a_0><b_1><c_1><a_1><b_1><c_2>"
    users, prompts, _ = eval_prompts(data, builder, N, "valid")
    assert users[0] == "u1"
    assert prompts[0] == windows[0].prompt + windows[0].completion
    assert tokenizer.decode(prompts[0]) == (
        "<s>Recommend the next item. History:<a_0><b_0><c_0><a_1><b_0><c_1><a_2><b_0><c_2>"
    )


def test_sequence_target_loss_equals_prefix_sample_loss(
    data: TaskData, builder: PromptBuilder, tokenizer: PreTrainedTokenizerFast
) -> None:
    """Same weights: each target's loss in a window = its loss as a prefix sample with the
    same history (what makes one window worth its targets' prefix samples)."""
    windows = TASKS["recommendation"](data, builder, SEQUENCE)
    prefix_samples: list[Sample] = []
    for window in windows:
        position = len(window.prompt)
        for length in window.spans:
            tokens = window.prompt + window.completion
            prefix_samples.append(
                Sample("recommendation", tokens[:position], tokens[position : position + length])
            )
            position += length
    model = tiny_model(len(tokenizer)).eval()
    collate = SampleCollator(pad_token_id=int(tokenizer.pad_token_id))
    ids = IdVocabulary(builder.sid_table)
    with torch.no_grad():
        in_windows = token_losses(model, collate(windows), ids).per_target()
        alone = token_losses(model, collate(prefix_samples), ids).per_target()
    assert in_windows.shape == alone.shape == (9,)
    torch.testing.assert_close(in_windows, alone, rtol=1e-5, atol=1e-6)


def test_id_tokens_are_scored_over_their_level_text_over_the_vocabulary(
    data: TaskData, builder: PromptBuilder, tokenizer: PreTrainedTokenizerFast
) -> None:
    """With the ID vocabulary, an ID token's loss is -log softmax over its level's codes
    (what constrained decoding scores); text and </s> keep the full vocabulary."""
    samples = [
        TASKS["recommendation"](data, builder, SEQUENCE)[1],
        TASKS["alignment"](data, builder, PREFIX)[2],  # <sid></s>
        TASKS["reconstruction"](data, builder, PREFIX)[0],  # text</s>
    ]
    batch = SampleCollator(pad_token_id=int(tokenizer.pad_token_id))(samples)
    model = tiny_model(len(tokenizer))
    ids = IdVocabulary(builder.sid_table)
    losses = token_losses(model, batch, ids)
    baseline = token_losses(model, batch, ids, gather=False)  # full logits, then columns
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected: list[float] = []
    for row, sample in enumerate(samples):
        start = len(sample.prompt)
        for offset, token in enumerate(sample.completion):
            scores = logits[row, start + offset - 1].float()  # [V]
            levels = [lv for lv, r in enumerate(builder.sid_table) if token in r]
            if levels:
                level_ids = builder.sid_table[levels[0]]
                level_scores = F.log_softmax(scores[level_ids], dim=-1)
                expected.append(-float(level_scores[level_ids.index(token)]))
            else:
                expected.append(-float(F.log_softmax(scores, dim=-1)[token]))
    assert losses.per_token.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert baseline.per_token.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    full_vocabulary = token_losses(model, batch)  # no ID vocabulary: every token over V
    assert full_vocabulary.per_token[0].item() > losses.per_token[0].item()  # fewer rivals
    losses.per_target().mean().backward()
    grad = model.lm_head.weight.grad
    assert grad is not None
    assert grad[builder.sid_table[0]].abs().sum() > 0  # level rows trained
    text_token = samples[2].completion[0]
    assert grad[text_token].abs().sum() > 0  # text rows from the reconstruction


def test_length_grouping_saves_padding(data: TaskData, builder: PromptBuilder) -> None:
    specs = [TaskSpec(task=t) for t in ("recommendation", "alignment", "reconstruction")]
    samples = build_mixture(specs, data, builder, N, 0)
    from store_core.trainer import DataPlan

    lengths = tuple(s.num_tokens for s in samples)
    grouped = DataPlan(len(samples), 2, 0, 0, 1, lengths)
    shuffled = DataPlan(len(samples), 2, 0, 0, 1)
    assert sorted(grouped.order(0).tolist()) == list(range(len(samples)))  # a permutation
    assert (
        grouped.order(0).tolist() == DataPlan(len(samples), 2, 0, 0, 1, lengths).order(0).tolist()
    )
    assert grouped.order(1).tolist() != grouped.order(0).tolist()  # reshuffled per epoch
    real = sum(lengths)
    assert padded_tokens(samples, 2, grouped.order(0).tolist()) - real < (
        padded_tokens(samples, 2, shuffled.order(0).tolist()) - real
    )


def _one_prompt_every_target(builder: PromptBuilder, history: list[str]) -> list[Sample]:
    prompt = builder.recommendation([CODES[i] for i in history])
    return [
        Sample("recommendation", prompt, builder.recommendation_completion(CODES[item]))
        for item in sorted(CODES)
    ]


def _summed_target_losses(losses: Any) -> torch.Tensor:
    count = int(losses.target.max()) + 1
    return torch.zeros(count).index_add_(0, losses.target, losses.per_token)  # [targets]


def test_trie_normalization_makes_a_target_loss_one_softmax_over_the_catalogue(
    builder: PromptBuilder, tokenizer: PreTrainedTokenizerFast
) -> None:
    """recommender.id_normalization "trie": for one history, the targets' summed losses are
    -log p(item) of a distribution over the catalogue's items (probabilities add up to 1,
    as SASRec-CE's softmax over items); the level softmax leaks mass to IDs no item has.
    Beam search with the same normalization scores every item with the same log p(item)."""
    from store_core.generate import SemanticIdTrie, constrained_beam_search

    samples = _one_prompt_every_target(builder, ["A", "B"])
    batch = SampleCollator(pad_token_id=int(tokenizer.pad_token_id))(samples)
    model = tiny_model(len(tokenizer)).eval()
    ids = IdVocabulary(builder.sid_table)
    codes = [CODES[item] for item in sorted(CODES)]
    trie = SemanticIdTrie.from_codes(np.array(codes), builder.sid_table)
    with torch.no_grad():
        by_trie = _summed_target_losses(token_losses(model, batch, ids, catalogue=trie))
        by_level = _summed_target_losses(token_losses(model, batch, ids))
    assert float(torch.exp(-by_trie).sum()) == pytest.approx(1.0, abs=1e-5)
    assert float(torch.exp(-by_level).sum()) < 0.5  # 9 of the 64 IDs hold an item
    assert bool((by_trie < by_level).all())  # fewer rivals for every target
    result = constrained_beam_search(
        model,
        [samples[0].prompt],
        trie,
        beam_size=len(codes),
        pad_token_id=int(tokenizer.pad_token_id),
        normalization="trie",
    )
    scores = dict(zip(result.items[0].tolist(), result.scores[0].tolist(), strict=True))
    assert sorted(scores) == list(range(len(codes)))  # every item, exactly ranked
    expected = (-by_trie).tolist()
    assert [scores[row] for row in range(len(codes))] == pytest.approx(expected, abs=1e-4)
    level_search = constrained_beam_search(
        model,
        [samples[0].prompt],
        trie,
        beam_size=len(codes),
        pad_token_id=int(tokenizer.pad_token_id),
    )
    rows, values = level_search.items[0].tolist(), level_search.scores[0].tolist()
    level_scores = dict(zip(rows, values, strict=True))
    assert [level_scores[r] for r in range(len(codes))] == pytest.approx(
        (-by_level).tolist(), abs=1e-4
    )


def test_trie_normalization_leaves_the_catalogue_tasks_on_the_level_softmax(
    data: TaskData, builder: PromptBuilder, tokenizer: PreTrainedTokenizerFast
) -> None:
    """Only recommendation targets are renormalized over the trie: text -> ID (alignment)
    must also emit IDs of new items, so it keeps the level softmax."""
    from store_core.generate import SemanticIdTrie

    samples = [
        TASKS["recommendation"](data, builder, SEQUENCE)[1],
        TASKS["alignment"](data, builder, PREFIX)[2],
    ]
    batch = SampleCollator(pad_token_id=int(tokenizer.pad_token_id))(samples)
    model = tiny_model(len(tokenizer)).eval()
    ids = IdVocabulary(builder.sid_table)
    trie = SemanticIdTrie.from_codes(
        np.array([CODES[item] for item in sorted(CODES)]), builder.sid_table
    )
    with torch.no_grad():
        by_trie = token_losses(model, batch, ids, catalogue=trie)
        by_level = token_losses(model, batch, ids)
    recommendation = by_trie.task == TASK_ORDER.index("recommendation")
    alignment = by_trie.task == TASK_ORDER.index("alignment")
    torch.testing.assert_close(by_trie.per_token[alignment], by_level.per_token[alignment])
    trie_losses = by_trie.per_token[recommendation]
    level_losses = by_level.per_token[recommendation]
    assert bool((trie_losses <= level_losses + 1e-6).all())
    assert bool((trie_losses < level_losses).any())
