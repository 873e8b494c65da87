"""Settings that shaped what the model saw come from the checkpoint, never silently from
the config (issue #16): `store evaluate` and `store recommend` with
`--set recommender.history_len=2` on a model trained with tiny's 5 use 5 and say so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from store_cli.app import app
from store_core import storage
from store_core.bundle import load_bundle
from store_core.checkpoint import config_overrides
from store_core.config import load_config
from store_core.evaluation import decode_split
from store_core.generate import SemanticIdTrie, constrained_beam_search
from store_core.recommender_training import recommender_dir, train_recommender
from store_core.tasks import eval_prompts
from tests.conftest import REPO, copy_workspace
from tests.test_tiny_pinned import PINNED_METRICS

TRAINED = 5  # tiny's recommender.history_len (infra/configs/tiny.yaml)
SAID = (
    f"recommender.history_len in the config (2) differs from the {TRAINED} this checkpoint "
    f"was trained with: the checkpoint's {TRAINED} is used"
)
USER = "8"  # 9 interactions: a 2-item and a 5-item prompt differ


def _base(ws: Path) -> list[str]:
    return ["-c", "tiny", "--set", f"workspace={ws}", "--set", "tracking.enabled=false"]


def test_tiny_trains_with_the_pinned_history_len(tiny_pipeline: Path) -> None:
    cfg = load_config("tiny", [f"workspace={tiny_pipeline}", "tracking.enabled=false"])
    assert cfg.recommender.history_len == TRAINED
    bundle = load_bundle(recommender_dir(cfg))
    assert bundle.metadata.history_len == TRAINED
    other = load_config("tiny", [f"workspace={tiny_pipeline}", "recommender.history_len=2"])
    assert config_overrides(bundle.metadata, other) == [("recommender.history_len", 2, TRAINED)]
    assert config_overrides(bundle.metadata, cfg) == []


def test_store_evaluate_uses_the_trained_history_len_and_says_so(
    tiny_pipeline: Path, tmp_path: Path
) -> None:
    ws = copy_workspace(tiny_pipeline, tmp_path / "ws")
    args = [*_base(ws), "--set", "evaluation.systems=[store]"]
    result = CliRunner().invoke(
        app, ["evaluate", *args, "--set", "recommender.history_len=2"], env={"COLUMNS": "300"}
    )
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())  # the log handler may wrap the line
    assert said.count(SAID) == 1, result.stderr
    # The metrics are those of 5-item prompts: the pinned evaluation of the trained model.
    _, rows = storage.query(
        str(ws / "store.duckdb"),
        "SELECT metric, value FROM eval_results WHERE system = 'store' AND history_rule = 'kept'",
    )
    got = dict(rows)
    assert got == pytest.approx({k: v for k, v in PINNED_METRICS.items() if k in got}, abs=1e-9)
    assert got["ndcg_at_10"] == pytest.approx(PINNED_METRICS["ndcg_at_10"], abs=1e-9)


def _recommend(ws: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`store recommend` as a user runs it (a real process: its stderr is the terminal's)."""
    command = [sys.executable, "-m", "store_cli", "recommend", "--user", USER, "--json"]
    return subprocess.run(
        [*command, *_base(ws), *extra],
        capture_output=True,
        text=True,
        env=dict(os.environ, COLUMNS="300", PYTHONPATH=str(REPO)),
        timeout=600,
        check=False,
    )


def test_store_recommend_uses_the_trained_history_len_and_says_so(tiny_pipeline: Path) -> None:
    plain = _recommend(tiny_pipeline)
    assert plain.returncode == 0, plain.stderr
    assert "differs from" not in plain.stderr
    overridden = _recommend(tiny_pipeline, "--set", "recommender.history_len=2")
    assert overridden.returncode == 0, overridden.stderr
    assert " ".join(overridden.stderr.split()).count(SAID) == 1, overridden.stderr
    items = [json.loads(line)["item_id"] for line in overridden.stdout.splitlines()]
    assert len(items) == 10
    assert overridden.stdout == plain.stdout  # the same 5-item prompt, the same ranking


def test_tokenize_catalogue_names_a_disagreeing_setting_and_uses_the_trained_one(
    tiny_pipeline: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from store_core.catalogue import tokenize_catalogue

    generated = []
    for name, extra in (("plain", []), ("overridden", ["model.max_text_tokens=16"])):
        ws = copy_workspace(tiny_pipeline, tmp_path / name)
        cfg = load_config("tiny", [f"workspace={ws}", "tracking.enabled=false", *extra])
        caplog.clear()
        with caplog.at_level("WARNING", logger="store_core.checkpoint"):
            tokenize_catalogue(cfg, recommender_dir(cfg), mode="regenerate")
        said = (
            "model.max_text_tokens in the config (16) differs from the 32 this checkpoint was "
            "trained with: the checkpoint's 32 is used"
        )
        assert (said in caplog.text) == bool(extra)
        ids = storage.current_ids(cfg.duckdb_path)
        items, sids = ids.column("item_id").to_pylist(), ids.column("sid").to_pylist()
        generated.append(dict(zip(items, sids, strict=True)))
    # Every ID generated from the item texts as the model was trained to read them.
    assert generated[0] == generated[1]


def test_a_model_trained_with_trie_normalization_is_decoded_with_it(
    tiny_pipeline: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """recommender.id_normalization is fixed at training time: Phase B records it, and
    evaluation decodes with the checkpoint's value (saying so) when the config differs."""

    ws = copy_workspace(tiny_pipeline, tmp_path / "ws")
    base = [f"workspace={ws}", "tracking.enabled=false"]
    trained_cfg = load_config("tiny", [*base, "recommender.id_normalization=trie"])
    outcome = train_recommender(trained_cfg)
    assert outcome is not None and outcome.metrics["id_normalization"] == "trie"
    bundle = load_bundle(recommender_dir(trained_cfg))
    assert bundle.metadata.id_normalization == "trie"
    cfg = load_config("tiny", base)  # the default, "level"
    assert config_overrides(bundle.metadata, cfg) == [
        ("recommender.id_normalization", "level", "trie")
    ]
    decoded = decode_split(bundle, cfg, "test", progress=False)
    assert "recommender.id_normalization in the config (level) differs" in caplog.text
    trie = SemanticIdTrie.from_codes(bundle.codes(), bundle.level_ids)
    _, prompts, _ = eval_prompts(decoded.data, bundle.builder, TRAINED, "test")
    assert len(prompts) == len(decoded.targets)

    def search(normalization: str) -> np.ndarray:
        return constrained_beam_search(
            bundle.model,
            prompts,
            trie,
            beam_size=cfg.recommender.beam_size,
            pad_token_id=bundle.builder.pad_token_id,
            normalization=normalization,  # type: ignore[arg-type]
        ).scores

    np.testing.assert_allclose(decoded.result.scores, search("trie"), rtol=1e-5, atol=1e-5)
    assert not np.allclose(search("level"), search("trie"))  # level leaks mass: lower
