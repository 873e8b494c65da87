"""Baselines: sequence data from splits.parquet, popularity ranks, SASRec learning, exclusion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from store_core.baselines.data import load_sequence_data, target_ranks, top_k_items
from store_core.baselines.popularity import (
    popularity_ranking,
    popularity_top_items,
    run_popularity,
)
from store_core.baselines.sasrec import (
    SASRecConfig,
    rank_users,
    recommend,
    run_sasrec,
    train_sasrec,
    training_windows,
)
from store_core.metrics import ranking_metrics
from store_core.schemas import ITEMS_SCHEMA, SPLITS_SCHEMA

Row = tuple[str, str, bool]  # (item_id, split, cold_start)


def write_data(data_dir: Path, sequences: dict[str, list[Row]], items: list[str]) -> str:
    """splits.parquet (+ a minimal items.parquet) as ``store ingest`` writes them."""
    data_dir.mkdir(parents=True, exist_ok=True)
    cols: dict[str, list[object]] = {name: [] for name in SPLITS_SCHEMA.names}
    for user, rows in sequences.items():
        for position, (item, split, cold) in enumerate(rows):
            cols["user_id"].append(user)
            cols["item_id"].append(item)
            cols["position"].append(position)
            cols["split"].append(split)
            cols["cold_start"].append(cold)
    # Rows shuffled on purpose: the reader must order by (user, position) itself.
    order = np.random.default_rng(0).permutation(len(cols["user_id"]))
    table = pa.Table.from_pydict(cols, schema=SPLITS_SCHEMA).take(pa.array(order))
    pq.write_table(table, data_dir / "splits.parquet")
    item_table = pa.Table.from_pydict(
        {
            "item_id": items,
            "title": items,
            "fields": [[("title", i)] for i in items],
            "text": items,
            "content_hash": items,
        },
        schema=ITEMS_SCHEMA,
    )
    pq.write_table(item_table, data_dir / "items.parquet")
    return str(data_dir)


def labelled(items: list[str], cold: frozenset[str] = frozenset()) -> list[Row]:
    """Leave-one-out labels for a chronological item list (cold train/valid -> excluded)."""
    n = len(items)
    labels = ["test"] if n == 1 else ["train"] * (n - 2) + ["valid", "test"]
    if n == 2:
        labels = ["train", "test"]
    return [
        (item, "excluded" if item in cold and label != "test" else label, item in cold)
        for item, label in zip(items, labels, strict=True)
    ]


# ---------------------------------------------------------------- hand-made dataset

ITEMS = ["A", "B", "C", "D", "E", "F", "G"]  # indices 1..7; G never interacted with
HAND = {
    # train counts: A 3, B 2, C 2, D 1 (+ excluded X-free), E 0, F 0
    "u1": labelled(["A", "B", "C", "E"]),  # train A B, valid C, test E
    "u2": labelled(["A", "C", "D", "B"]),  # train A C, valid D, test B
    "u3": labelled(["A", "B", "C", "D", "F"]),  # train A B C, valid D, test F
    "u4": labelled(["D", "A"]),  # train D, test A (no valid)
    "u5": labelled(["C"]),  # test C only
}


@pytest.fixture
def hand_dir(tmp_path: Path) -> str:
    return write_data(tmp_path / "hand", HAND, ITEMS)


def test_sequence_data_follows_the_split_rules(tmp_path: Path) -> None:
    seqs = {
        "u1": labelled(["A", "X", "B", "C", "D"], cold=frozenset({"X"})),
        "u2": labelled(["B", "X"], cold=frozenset({"X"})),  # cold test target
    }
    data = load_sequence_data(write_data(tmp_path / "d", seqs, ["A", "B", "C", "D", "X"]))
    index = data.item_index()
    assert data.item_ids == ("A", "B", "C", "D", "X")
    assert index == {"A": 1, "B": 2, "C": 3, "D": 4, "X": 5}
    assert data.num_items == 5
    assert data.train_sequences["u1"].tolist() == [1, 2]  # excluded X dropped
    assert data.valid_targets == {"u1": 3}
    assert data.test_targets == {"u1": 4, "u2": 5}
    assert data.cold_items == frozenset({5})
    assert data.history("u1", "valid").tolist() == [1, 2]
    assert data.history("u1", "test").tolist() == [1, 2, 3]  # + the validation item
    assert data.history("u1", "test", 2).tolist() == [2, 3]  # most recent, oldest first
    assert data.history("u2", "test").tolist() == [2]
    assert data.eval_users("test") == ["u1", "u2"]
    assert data.targets("test").tolist() == [4, 5]
    assert data.train_item_counts().tolist() == [0, 1, 2, 0, 0, 0]
    assert data.cold_mask("test").tolist() == [True, True]  # D in no train sequence; X held out
    with pytest.raises(ValueError, match="split"):
        data.history("u1", "train")  # type: ignore[arg-type]


def test_popularity_gives_the_expected_ranks(hand_dir: str) -> None:
    data = load_sequence_data(hand_dir)
    # Train counts A 3, B 2, C 2, D 1, E/F/G 0; ties by item_id -> A B C D E F G.
    top = popularity_top_items(data, "test", k=7)
    assert top.tolist() == [[1, 2, 3, 4, 5, 6, 7]] * 5
    # Test targets: u1 E, u2 B, u3 F, u4 A, u5 C.
    assert popularity_ranking(data, k=7).tolist() == [4, 1, 5, 0, 2]
    # Beyond the top k a target is a miss (-1).
    assert popularity_ranking(data, k=3).tolist() == [-1, 1, -1, 0, 2]
    # Validation users (u1 C, u2 D, u3 D) with valid histories.
    assert popularity_ranking(data, k=7, split="valid").tolist() == [2, 3, 3]


def test_popularity_history_exclusion(hand_dir: str) -> None:
    data = load_sequence_data(hand_dir)
    top = popularity_top_items(data, "test", k=4, exclude_history=True)
    # u1 history A B C -> D E F G; u2 A C D -> B E F G; u3 A B C D -> E F G (+ pad);
    # u4 D -> A B C E; u5 nothing -> A B C D.
    assert top.tolist() == [
        [4, 5, 6, 7],
        [2, 5, 6, 7],
        [5, 6, 7, 0],
        [1, 2, 3, 5],
        [1, 2, 3, 4],
    ]
    ranks = popularity_ranking(data, k=4, exclude_history=True)
    assert ranks.tolist() == [1, 0, 1, 0, 2]
    # Only the most recent history item excluded: u1 drops C only -> A B D E.
    recent = popularity_top_items(data, "test", k=4, exclude_history=True, excluded_history_len=1)
    assert recent[0].tolist() == [1, 2, 4, 5]
    result = run_popularity(hand_dir)
    assert result["test"]["recall_at_5"] == pytest.approx(4 / 5)  # ranks 4 1 0 2 < 5
    assert result["test_history_excluded"]["recall_at_1"] == pytest.approx(2 / 5)
    # E and F are in no train sequence: u1 (rank 4) and u3 (rank 5) are the cold-start users
    assert data.cold_mask("test").tolist() == [True, False, True, False, False]
    assert result["cold_users"] == 2
    assert result["test_cold"]["recall_at_5"] == pytest.approx(1 / 2)
    assert result["test_cold"]["recall_at_10"] == pytest.approx(1.0)


def test_ranking_helpers() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.4, 0.2, 0.8, 0.6]])
    top = top_k_items(scores.clone(), 3)
    assert top.tolist() == [[2, 3, 4], [3, 4, 1]]
    excluded = top_k_items(scores.clone(), 3, [np.array([2]), np.array([3, 4, 1])])
    assert excluded.tolist() == [[3, 4, 1], [2, 0, 0]]  # nothing left -> padding
    assert target_ranks(top, np.array([4, 2])).tolist() == [2, -1]


def test_training_windows_cover_every_prefix_once() -> None:
    seq = np.arange(1, 13)  # s_0 .. s_11 = items 1 .. 12; targets s_1 .. s_11
    rng = np.random.default_rng(0)
    for stride in (1, 3, 5):
        for _ in range(3):  # fresh random offsets
            inputs, labels = training_windows([seq, np.array([7])], 5, stride, rng)
            mask = labels != -100
            # every target exactly once per epoch, at most `stride` per window
            assert sorted((labels[mask] + 1).tolist()) == list(range(2, 13))
            assert (mask.sum(axis=1) <= stride).all()
            for row_in, row_lab in zip(inputs, labels, strict=True):
                length = int((row_in != 0).sum())
                assert (row_in[:length] != 0).all()  # left-aligned, padding after
                # contiguous slice of the sequence; position p predicts the next item
                assert (np.diff(row_in[:length]) == 1).all()
                for pos in np.flatnonzero(row_lab != -100):
                    assert pos < length
                    assert row_lab[pos] + 1 == row_in[pos] + 1
        if stride == 1:  # every target with its full (<= 5 item) history
            assert all(
                int((row_in != 0).sum()) == min(5, int(lab[lab != -100][0]))
                for row_in, lab in zip(inputs, labels, strict=True)
            )


# ---------------------------------------------------------------- SASRec on cycles

NUM_CYCLE_ITEMS = 24
CYCLE_ITEMS = [f"i{i:02d}" for i in range(NUM_CYCLE_ITEMS)]


def cyclic_sequences(users: int, length: int) -> dict[str, list[Row]]:
    """Each user walks the item cycle from a random start: the next item is deterministic."""
    rng = np.random.default_rng(1)
    out = {}
    for u in range(users):
        start = int(rng.integers(NUM_CYCLE_ITEMS))
        walk = [CYCLE_ITEMS[(start + t) % NUM_CYCLE_ITEMS] for t in range(length)]
        out[f"u{u:03d}"] = labelled(walk)
    return out


SMALL = SASRecConfig(
    history_len=6,
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    inner_size=64,
    hidden_dropout=0.1,
    attn_dropout=0.1,
    lr=5e-3,
    batch_size=32,
    max_epochs=40,
    patience=5,
)


@pytest.fixture(scope="module")
def cycle_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    # length 10 < 24 items: no target ever appears in its user's history.
    return write_data(tmp_path_factory.mktemp("cycle"), cyclic_sequences(120, 10), CYCLE_ITEMS)


def test_sasrec_learns_a_deterministic_next_item(cycle_dir: str) -> None:
    data = load_sequence_data(cycle_dir)
    model = train_sasrec(data, SMALL, seed=0)
    ranks = rank_users(model, data, "test", k=20)
    metrics = ranking_metrics(ranks)
    assert metrics["recall_at_1"] >= 0.95
    assert model.summary.valid_best_ndcg_at_10 >= 0.95
    assert 1 <= model.summary.best_epoch <= model.summary.epochs <= SMALL.max_epochs
    # History exclusion never recommends a history item and keeps the (new) target first.
    top = recommend(model, data, "test", k=20, exclude_history=True)
    for user, row in zip(data.eval_users("test"), top, strict=True):
        assert not set(row.tolist()) & set(data.history(user, "test").tolist())
    excluded = rank_users(model, data, "test", k=20, exclude_history=True)
    assert ranking_metrics(excluded)["recall_at_1"] >= 0.95
    # Top-k cut: ranks are -1 or < k.
    small_k = rank_users(model, data, "test", k=2)
    assert ((small_k == -1) | ((small_k >= 0) & (small_k < 2))).all()


def test_sasrec_history_exclusion_removes_a_top_item(tmp_path: Path) -> None:
    # Every user repeats the item they just saw: the model's top-1 is the last history item.
    seqs = {
        f"u{u:03d}": labelled([CYCLE_ITEMS[u % 8]] * 2 + [CYCLE_ITEMS[8 + u % 8]] * 4)
        for u in range(64)
    }
    data = load_sequence_data(write_data(tmp_path / "repeat", seqs, CYCLE_ITEMS))
    cfg = SMALL.model_copy(update={"max_epochs": 15})
    model = train_sasrec(data, cfg, seed=0)
    top = recommend(model, data, "test", k=5)
    last = np.array([data.history(u, "test")[-1] for u in data.eval_users("test")])
    assert (top[:, 0] == last).mean() >= 0.9  # the repeat is learnt ...
    assert (rank_users(model, data, "test", k=5) == 0).mean() >= 0.9  # ... and is the target
    top_ex = recommend(model, data, "test", k=5, exclude_history=True)
    assert not (top_ex == last[:, None]).any()  # ... but never shown once excluded
    ranks_ex = rank_users(model, data, "test", k=5, exclude_history=True)
    assert (ranks_ex == -1).all()  # the target is a history item here: always a miss


def test_sasrec_is_seeded_and_run_reports(cycle_dir: str) -> None:
    cfg = SMALL.model_copy(update={"max_epochs": 2, "patience": 1})
    first = run_sasrec(cycle_dir, cfg, seed=3)
    second = run_sasrec(cycle_dir, cfg, seed=3)
    assert first["test"] == second["test"]
    assert first["valid_best_ndcg_at_10"] == second["valid_best_ndcg_at_10"]
    assert set(first) >= {
        "test",
        "test_history_excluded",
        "test_cold",
        "cold_users",
        "valid_best_ndcg_at_10",
        "epochs",
        "seconds",
    }
    assert first["epochs"] <= 2
    history = first["history"]  # one row per epoch run, the best one's score is reported
    assert [row["epoch"] for row in history] == [float(e) for e in range(1, first["epochs"] + 1)]
    assert max(row["valid_ndcg_at_10"] for row in history) == first["valid_best_ndcg_at_10"]
    assert all(row["windows"] > 0 and row["loss"] > 0 for row in history)


def test_sasrec_config_is_validated() -> None:
    with pytest.raises(ValueError, match="divisible"):
        SASRecConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="train_stride"):
        SASRecConfig(history_len=5, train_stride=6)
    with pytest.raises(ValueError):
        SASRecConfig(unknown=1)  # type: ignore[call-arg]
    assert SASRecConfig().stride == 20
