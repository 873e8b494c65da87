from __future__ import annotations

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
