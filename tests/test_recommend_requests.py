"""``store recommend`` requests (issue 15, item 6): the whole history is excluded inside
decoding, ``k`` and the history are validated with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from store_cli.app import app
from store_core.bundle import RecommenderBundle, load_bundle
from store_core.config import StoreConfig, load_config
from store_core.errors import StoreError
from store_core.recommend_top_k import MAX_K, recommend, user_history
from store_core.recommender_training import recommender_dir

runner = CliRunner()
CATALOGUE = 48  # items in tests/data/tiny
NINE = ("8", "9", "13", "20", "26")  # tiny users with 9 interactions (history_len is 5)
EMPTY = "error: the history is empty: give at least one item id"


@pytest.fixture(scope="module")
def trained(tiny_pipeline: Path) -> tuple[StoreConfig, RecommenderBundle]:
    cfg = load_config("tiny", [f"workspace={tiny_pipeline}", "tracking.enabled=false"])
    return cfg, load_bundle(recommender_dir(cfg))


def cli(ws: Path, *args: str) -> list[str]:
    base = ["-c", "tiny", "--set", f"workspace={ws}", "--set", "tracking.enabled=false"]
    result = runner.invoke(app, ["recommend", *args, "--json", *base])
    assert result.exit_code == 0, result.output
    return [json.loads(line)["item_id"] for line in result.stdout.splitlines()]


def test_exclude_history_excludes_the_whole_history(
    trained: tuple[StoreConfig, RecommenderBundle], tiny_pipeline: Path
) -> None:
    cfg, bundle = trained
    assert cfg.recommender.history_len == bundle.metadata.history_len == 5
    older_items_recommended = 0
    for user in NINE:
        history = user_history(cfg, user)
        assert len(history) == 9
        older = set(history[:-5])  # outside the prompt: what the old rule let through
        plain = [r.item_id for r in recommend(cfg, bundle, history, 10)]
        older_items_recommended += len(older & set(plain))
        got = recommend(cfg, bundle, history, 10, exclude_history=True)
        assert [r.rank for r in got] == list(range(1, 11))  # k items, not fewer
        assert not set(history) & {r.item_id for r in got}
        scores = [r.score for r in got]
        assert scores == sorted(scores, reverse=True)
    # The case is real: without exclusion these users get back items of their history
    # that lie before the last history_len (the old rule excluded only the last 5).
    assert older_items_recommended > 0
    # Through the CLI, for the user of the report.
    history = set(user_history(cfg, NINE[0]))
    got_cli = cli(tiny_pipeline, "--user", NINE[0], "-k", "10", "--exclude-history")
    assert len(got_cli) == 10 and not history & set(got_cli)


def test_every_non_history_item_comes_back_when_k_asks_for_them(
    trained: tuple[StoreConfig, RecommenderBundle],
) -> None:
    cfg, bundle = trained
    history = user_history(cfg, NINE[0])
    others = CATALOGUE - len(set(history))
    got = recommend(cfg, bundle, history, others, exclude_history=True)
    assert len(got) == others
    assert {r.item_id for r in got}.isdisjoint(history)
    assert len({r.item_id for r in got}) == others
    # k above what exists: capped, the whole remaining catalogue ranked.
    assert [r.item_id for r in recommend(cfg, bundle, history, MAX_K, exclude_history=True)] == [
        r.item_id for r in got
    ]
    whole = recommend(cfg, bundle, history, MAX_K)
    assert len(whole) == CATALOGUE and len({r.item_id for r in whole}) == CATALOGUE


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--user", "8", "-k", "0"], "error: -k must be at least 1, got 0"),
        (["--user", "8", "-k", "-1"], "error: -k must be at least 1, got -1"),
        (
            ["--user", "8", "-k", "1000000"],
            "error: -k must be at most 1000 (store_core.recommend_top_k.MAX_K), got 1000000",
        ),
        (["--history", "", "-k", "5"], EMPTY),
        (["--history", " , ,", "-k", "5"], EMPTY),
    ],
)
def test_invalid_requests_are_one_line_errors(
    tiny_pipeline: Path, args: list[str], message: str
) -> None:
    base = ["-c", "tiny", "--set", f"workspace={tiny_pipeline}", "--set", "tracking.enabled=false"]
    result = runner.invoke(app, ["recommend", *args, *base])
    assert result.exit_code == 1
    assert result.output.strip() == message
    assert "Traceback" not in result.output


def test_library_checks_the_request_too(trained: tuple[StoreConfig, RecommenderBundle]) -> None:
    cfg, bundle = trained
    for k in (0, -1, MAX_K + 1, 1_000_000):
        with pytest.raises(StoreError, match="-k must be"):
            recommend(cfg, bundle, ["1"], k)
    with pytest.raises(StoreError, match="history is empty"):
        recommend(cfg, bundle, [], 5)
