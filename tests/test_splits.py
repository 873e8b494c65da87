from __future__ import annotations

import numpy as np
import pytest

from store_core.splits import (
    Interaction,
    group_splits,
    kcore,
    sample_cold_items,
    sequences,
    split_labels,
)


def test_order_by_time_then_source_position_then_item_id() -> None:
    rows = [
        Interaction("u", "c", 100, 5),
        Interaction("u", "a", 100, 2),  # same time: earlier in the source first
        Interaction("u", "z", 50, 9),
        Interaction("u", "y", 100, 2),  # same time and position: item_id breaks the tie
    ]
    assert [r.item_id for r in sequences(rows)["u"]] == ["z", "a", "y", "c"]


def test_null_timestamps_follow_source_order_after_dated_rows() -> None:
    rows = [
        Interaction("u", "n2", None, 3),
        Interaction("u", "n1", None, 1),
        Interaction("u", "d", 10, 7),
    ]
    assert [r.item_id for r in sequences(rows)["u"]] == ["d", "n1", "n2"]


def test_users_are_sorted() -> None:
    rows = [Interaction("b", "x", 1, 0), Interaction("a", "x", 1, 1)]
    assert list(sequences(rows)) == ["a", "b"]


def test_split_labels() -> None:
    assert split_labels(1) == ["test"]
    assert split_labels(2) == ["train", "test"]
    assert split_labels(3) == ["train", "valid", "test"]
    assert split_labels(5) == ["train", "train", "train", "valid", "test"]
    assert split_labels(0) == []


def test_kcore_is_iterative() -> None:
    # u3 has 1 interaction -> dropped; then item "c" falls to 1 -> dropped; u2 then has 1.
    rows = [
        Interaction("u1", "a", 1, 0),
        Interaction("u1", "b", 2, 1),
        Interaction("u2", "a", 1, 2),
        Interaction("u2", "b", 2, 3),
        Interaction("u2", "c", 3, 4),
        Interaction("u3", "c", 1, 5),
    ]
    kept = kcore(rows, 2)
    assert {(r.user_id, r.item_id) for r in kept} == {
        ("u1", "a"),
        ("u1", "b"),
        ("u2", "a"),
        ("u2", "b"),
    }
    assert kcore(rows, 0) == rows


def test_cold_sample_is_seeded_and_sized() -> None:
    items = [str(i) for i in range(100)]
    first = sample_cold_items(items, 0.1, seed=3)
    assert len(first) == 10
    assert first == sample_cold_items(list(reversed(items)), 0.1, seed=3)
    assert first != sample_cold_items(items, 0.1, seed=4)
    assert sample_cold_items(items, 0.0, seed=3) == set()


def test_group_splits_orders_by_position_and_drops_excluded() -> None:
    grouped = group_splits(
        ["b", "a", "a", "a", "a", "b"],
        ["x", "t", "p", "q", "r", "y"],
        [1, 3, 0, 1, 2, 0],
        ["test", "test", "train", "excluded", "valid", "train"],
        [False, False, False, True, False, False],
    )
    assert grouped.train == {"a": ["p"], "b": ["y"]}
    assert grouped.valid == {"a": "r"}
    assert grouped.test == {"a": "t", "b": "x"}
    assert grouped.cold == frozenset({"q"})


# --------------------------------------------------------------------------- history rule


def test_history_before_keeps_the_last_n_items_before_the_target() -> None:
    """The one truncation rule (store_core.splits.history_before) on a hand-made sequence."""
    from store_core.splits import history_before, recent_history

    seq = ["a", "b", "c", "d", "e"]
    assert history_before(seq, 0, 3) == []  # target at position 0: nothing before it
    assert history_before(seq, 2, 3) == ["a", "b"]  # shorter than N: kept whole
    assert history_before(seq, 3, 3) == ["a", "b", "c"]  # exactly N
    assert history_before(seq, 4, 3) == ["b", "c", "d"]  # longer: the last N
    assert history_before(seq, 5, 3) == ["c", "d", "e"]  # the target just past the end
    assert history_before(seq, 4, None) == ["a", "b", "c", "d"]  # no limit
    assert recent_history(seq, 2) == ["d", "e"] and recent_history(seq, 9) == seq
    arr = np.array([10, 20, 30], dtype=np.int64)
    out = recent_history(arr, 2)
    assert isinstance(out, np.ndarray) and out.tolist() == [20, 30]  # same type back
    for bad in ((seq, 1, 0), (seq, -1, 2), (seq, 6, 2)):
        with pytest.raises(ValueError):
            history_before(*bad)


def test_split_history_appends_the_validation_item_for_test_only() -> None:
    from store_core.splits import split_history

    assert split_history(["a", "b"], "c", "valid") == ["a", "b"]
    assert split_history(["a", "b"], "c", "test") == ["a", "b", "c"]
    assert split_history([], None, "test") == []  # a user with one interaction
    with pytest.raises(ValueError, match="split"):
        split_history(["a"], None, "train")  # type: ignore[arg-type]


def test_every_history_reader_uses_the_one_rule() -> None:
    """Prompts (training and evaluation), the baselines and ``store recommend`` agree
    on a user's history: the same items for the same target and N."""
    from store_core.baselines.data import SequenceData
    from store_core.tasks import TaskData, _prefixes

    data = TaskData(
        item_ids=["a", "b", "c", "d", "e"],
        texts={i: i for i in "abcde"},
        titles={},
        codes={},
        train_sequences={"u": ["a", "b", "c", "d"]},
        valid_targets={"u": "e"},
        test_targets={"u": "a"},
    )
    assert _prefixes(data, 2) == [(["a"], "b"), (["a", "b"], "c"), (["b", "c"], "d")]
    assert data.history("u", "test") == ["a", "b", "c", "d", "e"]
    seqs = SequenceData(
        item_ids=("a", "b", "c", "d", "e"),
        train_sequences={"u": np.array([1, 2, 3, 4])},
        valid_targets={"u": 5},
        test_targets={"u": 1},
    )
    assert seqs.history("u", "test", 2).tolist() == [4, 5]
    assert seqs.history("u", "valid", None).tolist() == [1, 2, 3, 4]


def test_one_seeded_rule_samples_validation_and_test_users() -> None:
    """store_core.splits.seeded_subset: the rule validation (``val_max_users``, training
    seed) and evaluation (``evaluation.max_users``, EVAL_SAMPLE_SEED) both sample by."""
    from store_core.splits import EVAL_SAMPLE_SEED, seeded_subset

    assert seeded_subset(5, None, 3) == [0, 1, 2, 3, 4]
    assert seeded_subset(5, 5, 3) == [0, 1, 2, 3, 4]  # no more than there are
    picked = seeded_subset(100, 10, EVAL_SAMPLE_SEED)
    assert picked == sorted(set(picked)) and len(picked) == 10
    assert picked == seeded_subset(100, 10, EVAL_SAMPLE_SEED)  # the same seed, the same users
    assert picked == sorted(
        np.random.default_rng(0).choice(100, size=10, replace=False).tolist()
    )  # the rule as both samplers drew it before they were one function
    assert seeded_subset(100, 10, 1) != picked
