"""benchmarks/target_frequency.py: STORE vs SASRec-CE by target frequency, and STORE's
teacher-forced code ranks, on the tiny workspace and on hand values."""

from __future__ import annotations

import json
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import pytest
import torch

from benchmarks import target_frequency
from store_core.errors import StoreError

if TYPE_CHECKING:
    from store_core.prompts import PromptBuilder


def test_buckets_from_inclusive_upper_edges() -> None:
    assert target_frequency.bucket_labels([0, 2, 5, 50]) == ["0", "1-2", "3-5", "6-50", ">50"]
    counts = np.array([0, 1, 2, 3, 5, 6, 50, 51, 400])
    assert target_frequency.bucket_of(counts, [0, 2, 5, 50]).tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4]
    with pytest.raises(ValueError, match="increasing"):
        target_frequency.bucket_labels([0, 5, 5])


def test_bucket_table_and_overlap_hand_values() -> None:
    counts = np.array([0, 1, 1, 7, 9])
    store = np.array([0, -1, 12, 3, -1])  # hits: users 0, 3
    sasrec = np.array([-1, 2, -1, 9, 0])  # hits: users 1, 3, 4
    rows = target_frequency.bucket_table(counts, store, sasrec, [0, 2])
    assert [(r["bucket"], r["users"]) for r in rows] == [("0", 1), ("1-2", 2), (">2", 2)]
    assert rows[0]["store_recall_at_10"] == 1.0 and rows[0]["sasrec_recall_at_10"] == 0.0
    assert rows[1]["store_recall_at_10"] == 0.0 and rows[1]["sasrec_recall_at_10"] == 0.5
    assert rows[1]["sasrec_ndcg_at_10"] == pytest.approx(0.5 / np.log2(4))
    assert rows[2]["store_ndcg_at_10"] == pytest.approx(0.5 / np.log2(5))
    overlap = target_frequency.hit_overlap(store, sasrec)
    assert overlap == {"both": 0.2, "only_store": 0.2, "only_sasrec": 0.4, "neither": 0.2}
    empty = target_frequency.bucket_table(counts, store, sasrec, [0, 2, 5])
    assert empty[2] == {
        "bucket": "3-5",
        "users": 0,
        "store_recall_at_10": None,
        "store_ndcg_at_10": None,
        "sasrec_recall_at_10": None,
        "sasrec_ndcg_at_10": None,
    }


def test_transition_counts_are_consecutive_train_pairs() -> None:
    train = {"u1": ["a", "b", "c", "b"], "u2": ["a", "b"], "u3": ["c"]}
    counts = target_frequency.transition_counts(
        train, ["a", "b", "c", "b", None], ["b", "c", "b", "a", "a"]
    )
    # a->b twice (u1, u2), b->c and c->b once each, b->a never, no last item never.
    assert counts.tolist() == [2, 1, 1, 0, 0]


class _Builder:
    """Renders a recommendation prompt as its history's codes, flattened."""

    def recommendation(self, history: list[list[int]]) -> list[int]:
        return [code for codes in history for code in codes]


def test_train_fit_prompts_hand_values() -> None:
    from store_core.tasks import TaskData

    items = ["a", "b", "c", "d"]
    data = TaskData(
        item_ids=items,
        texts={i: i for i in items},
        titles={i: None for i in items},
        codes={"a": [1, 0], "b": [2, 0], "c": [3, 0], "d": [4, 0]},
        train_sequences={
            "u1": ["a", "b", "c", "b"],
            "u2": ["c", "b"],
            "u3": ["d"],
            "u4": ["a", "d"],
        },
        valid_targets={},
        test_targets={},
    )
    builder = cast("PromptBuilder", _Builder())
    users, prompts, targets, others = target_frequency.train_fit_prompts(
        data, builder, history_len=2, users=10
    )
    assert users == ["u1", "u2", "u4"]  # u3 has one train item: nothing to decode
    assert prompts == [[2, 0, 3, 0], [3, 0], [1, 0]]  # the last 2 items before the target
    assert targets == ["b", "b", "d"]
    # c->b: u1 and u2, so one other occurrence each; a->d only u4's own.
    assert others.tolist() == [1, 1, 0]
    sample, *_ = target_frequency.train_fit_prompts(data, builder, history_len=2, users=2)
    assert len(sample) == 2 and set(sample) <= {"u1", "u2", "u4"}


def test_users_are_matched_by_id_and_must_agree() -> None:
    ranks = target_frequency.match_users(
        ["a", "b"], ["x", "y"], ["b", "a"], ["y", "x"], np.array([5, 7])
    )
    assert ranks.tolist() == [7, 5]
    with pytest.raises(StoreError, match="1 only in STORE's"):
        target_frequency.match_users(["a", "c"], ["x", "y"], ["a", "b"], ["x", "y"], np.zeros(2))
    with pytest.raises(StoreError, match="test user 'b'"):
        target_frequency.match_users(["a", "b"], ["x", "y"], ["a", "b"], ["x", "z"], np.zeros(2))


def test_sasrec_train_fit_needs_the_same_train_sequences() -> None:
    from store_core.baselines.data import SequenceData
    from store_core.baselines.sasrec import SASRecModel
    from store_core.config import SASRecConfig

    sequences = SequenceData(
        item_ids=("x", "y", "z"),
        train_sequences={"a": np.array([1, 2, 3]), "b": np.array([3, 1])},
        valid_targets={},
        test_targets={"a": 1, "b": 2},
    )
    torch.manual_seed(0)
    model = SASRecModel(3, SASRecConfig(history_len=4, hidden_size=8, num_heads=2))
    ranks = target_frequency.sasrec_train_fit_ranks(model, sequences, ["a", "b"], ["z", "x"])
    assert ranks.shape == (2,) and set(ranks.tolist()) <= {0, 1, 2}  # 3 items: all ranked
    with pytest.raises(StoreError, match="user 'b': last train item 'y' for STORE, 'x' for"):
        target_frequency.sasrec_train_fit_ranks(model, sequences, ["a", "b"], ["z", "y"])


def test_report_on_the_tiny_workspace(tiny_pipeline: Path, tmp_path: Path) -> None:
    from store_core.baselines.sasrec import run_sasrec
    from store_core.bundle import load_bundle
    from store_core.config import load_config
    from store_core.evaluation import decode_split
    from store_core.generate import SemanticIdTrie
    from store_core.metrics import ranking_metrics
    from store_core.recommender_training import recommender_dir
    from store_core.splits import EVAL_SAMPLE_SEED, seeded_subset
    from store_core.tasks import eval_prompts

    sets = [f"workspace={tiny_pipeline}", "tracking.enabled=false"]
    out = tmp_path / "results"
    argv = ["--config", "tiny", "--users", "10", "--train-fit", "12", "--results-dir", str(out)]
    target_frequency.main([*argv, *(arg for s in sets for arg in ("--set", s))])

    report = json.loads((out / "target_frequency_tiny_seed0.json").read_text())
    text = (out / "target_frequency_tiny_seed0.md").read_text()
    for key in ("machine", "command", "seed", "edges", "users", "store", "sasrec", "overlap"):
        assert key in report
    assert report["seed"] == 0 and report["edges"] == [0, 2, 5, 10, 20, 50]
    assert [row["bucket"] for row in report["buckets"]] == [
        "0", "1-2", "3-5", "6-10", "11-20", "21-50", ">50"
    ]  # fmt: skip
    assert "| 1-2 |" in text and "--users 10" in report["command"]
    assert [row["bucket"] for row in report["transitions"]] == ["0", "1", "2-3", ">3"]
    assert "transition seen in train" in text

    # Every test user is in exactly one bucket; the buckets hold the overall hits.
    cfg = load_config("tiny", sets)
    bundle = load_bundle(recommender_dir(cfg))
    decoded = decode_split(bundle, cfg, "test", progress=False)
    users = len(decoded.users)
    assert report["users"] == users == sum(row["users"] for row in report["buckets"]) == 40
    assert sum(row["users"] for row in report["transitions"]) == users
    last = [decoded.data.history(u, "test")[-1] for u in decoded.users]
    pairs = Counter(p for seq in decoded.data.train_sequences.values() for p in pairwise(seq))
    seen_once = sum(pairs[(a, t)] == 1 for a, t in zip(last, decoded.targets, strict=True))
    assert report["transitions"][1]["users"] == seen_once
    for system in ("store", "sasrec"):
        hits = sum(row["users"] * (row[f"{system}_recall_at_10"] or 0) for row in report["buckets"])
        assert hits == pytest.approx(report[system]["recall_at_10"] * users)
    overlap = report["overlap"]
    assert overlap["both"] + overlap["only_store"] == pytest.approx(report["store"]["recall_at_10"])
    assert sum(overlap.values()) == pytest.approx(1.0)

    # STORE's and SASRec-CE's overall metrics are store evaluate's.
    row_of = {item: i for i, item in enumerate(decoded.item_ids)}
    ranks = [
        rank_of_beam(decoded.result.items[u], decoded.result.alive[u], row_of[target])
        for u, target in enumerate(decoded.targets)
    ]
    expected = ranking_metrics(ranks)
    assert report["store"]["recall_at_10"] == pytest.approx(expected["recall_at_10"])
    assert report["store"]["ndcg_at_10"] == pytest.approx(expected["ndcg_at_10"])
    sasrec = run_sasrec(cfg.data_dir, cfg.evaluation.sasrec, 0)["test"]
    assert report["sasrec"]["recall_at_10"] == pytest.approx(sasrec["recall_at_10"])

    # Code ranks by hand: one unpadded full-vocabulary forward per user and level, the
    # target's code ranked among the codes that continue its prefix in the catalogue.
    codes = decoded.codes  # [N, M]
    user_ids, prompts, targets = eval_prompts(
        decoded.data, bundle.builder, bundle.metadata.history_len, "test"
    )
    keep = seeded_subset(len(user_ids), 10, EVAL_SAMPLE_SEED)
    assert len({len(prompts[i]) for i in keep}) > 1  # the batch is padded
    levels = codes.shape[1] - 1
    sample_codes = codes[[row_of[targets[i]] for i in keep]]  # [n, M]
    padded = target_frequency.teacher_forced_logits(
        bundle.model.eval(), bundle.builder, [prompts[i] for i in keep], sample_codes
    )  # [n, M - 1, V], one left-padded batch
    hand = np.zeros((len(keep), levels), dtype=np.int64)  # [n, M - 1] ranks, 0 = first
    argmax_first = np.zeros(len(keep), dtype=bool)  # level 0: the argmax is the target's
    for row, i in enumerate(keep):
        target = sample_codes[row]
        tokens = bundle.builder.recommendation_completion(target.tolist())
        for level in range(levels):
            ids = torch.tensor([[*prompts[i], *tokens[:level]]])
            with torch.no_grad():
                logits = bundle.model(input_ids=ids).logits[0, -1]  # [V]
            torch.testing.assert_close(padded[row, level], logits, atol=1e-4, rtol=1e-4)
            same_prefix = (codes[:, :level] == target[:level]).all(axis=1)
            valid = sorted(set(codes[same_prefix, level].tolist()))
            scores = {c: float(logits[bundle.level_ids[level][c]]) for c in valid}
            if level == 0:
                argmax_first[row] = max(valid, key=scores.__getitem__) == target[0]
            hand[row, level] = sum(s > scores[int(target[level])] for s in scores.values())
    # The batched, left-padded forward gives every user's ranks exactly.
    batched, valid_codes = target_frequency.code_ranks(
        bundle.model,
        bundle.builder,
        SemanticIdTrie.from_codes(codes, bundle.level_ids),
        [prompts[i] for i in keep],
        sample_codes,
        batch_size=4,
    )
    assert batched.tolist() == hand.tolist()
    assert valid_codes[:, 0].tolist() == [len(set(codes[:, 0].tolist()))] * len(keep)
    got = report["code_ranks"]
    assert got["users"] == 10
    assert got["all"][0]["top1"] == pytest.approx(float(argmax_first.mean()))
    for level, summary in enumerate(got["all"]):
        assert summary["top1"] == pytest.approx(float((hand[:, level] == 0).mean()))
        assert summary["top5"] == pytest.approx(float((hand[:, level] < 5).mean()))
        assert summary["median_rank"] == pytest.approx(float(np.median(hand[:, level])))
    counts = Counter(item for seq in decoded.data.train_sequences.values() for item in seq)
    freq = np.array([counts[targets[i]] for i in keep])
    for index, bucket in enumerate(got["buckets"]):
        members = target_frequency.bucket_of(freq, report["edges"]) == index
        assert bucket["users"] == int(members.sum())
        if members.any():
            top1 = float((hand[members, 0] == 0).mean())
            assert bucket["levels"][0]["top1"] == pytest.approx(top1)

    # Train fit: the last train item of 12 users, decoded from the items before it.
    from store_core.evaluation import local_beam_search
    from store_core.splits import recent_history

    fit = report["train_fit"]
    assert fit["users"] == 12 == sum(row["users"] for row in fit["buckets"])
    assert [row["bucket"] for row in fit["buckets"]] == ["0", "1", "2-3", ">3"]
    assert "Each system on its own training transitions (12 sampled users" in text
    train = decoded.data.train_sequences
    eligible = sorted(u for u, seq in train.items() if len(seq) >= 2)
    chosen = [eligible[i] for i in seeded_subset(len(eligible), 12, EVAL_SAMPLE_SEED)]
    hand_prompts = [
        bundle.builder.recommendation(
            [
                decoded.data.codes[i]
                for i in recent_history(train[u][:-1], bundle.metadata.history_len)
            ]
        )
        for u in chosen
    ]
    beams = local_beam_search(bundle, hand_prompts, cfg, progress=False)
    fit_ranks = [
        rank_of_beam(beams.items[k], beams.alive[k], row_of[train[u][-1]])
        for k, u in enumerate(chosen)
    ]
    assert fit["store"]["recall_at_10"] == pytest.approx(ranking_metrics(fit_ranks)["recall_at_10"])
    others = [pairs[(train[u][-2], train[u][-1])] - 1 for u in chosen]
    assert fit["buckets"][0]["users"] == sum(o == 0 for o in others)

    # SASRec-CE's train fit by hand: the same seed's model (deterministic), one unbatched
    # forward per user over the train items before the last, every item ranked.
    from store_core.baselines.data import load_sequence_data
    from store_core.baselines.sasrec import train_sasrec

    sequences = load_sequence_data(cfg.data_dir)
    model = train_sasrec(sequences, cfg.evaluation.sasrec, report["seed"]).eval()
    sasrec_fit = []
    for u in chosen:
        seq = sequences.train_sequences[u]
        with torch.no_grad():
            item_scores = model.item_logits(model.encode([seq[:-1]]))[0]  # [N], column j: item j+1
        position = int((item_scores > item_scores[int(seq[-1]) - 1]).sum())
        sasrec_fit.append(position if position < 20 else -1)
    expected_fit = ranking_metrics(sasrec_fit)
    assert fit["sasrec"]["recall_at_10"] == pytest.approx(expected_fit["recall_at_10"])
    assert fit["sasrec"]["ndcg_at_10"] == pytest.approx(expected_fit["ndcg_at_10"])
    hits = sum(row["users"] * (row["sasrec_recall_at_10"] or 0) for row in fit["buckets"])
    assert hits == pytest.approx(expected_fit["recall_at_10"] * 12)
    assert "SASRec-CE R@10" in text.split("Each system on its own training transitions")[1]


def rank_of_beam(items: np.ndarray, alive: np.ndarray, target: int) -> int:
    beam = [i for i, a in zip(items, alive, strict=True) if a]
    return beam.index(target) if target in beam else -1
