from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from store_cli.app import app

runner = CliRunner()


def test_ingest_then_query(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    result = runner.invoke(app, ["ingest", "-c", "tiny", "--set", f"workspace={ws}"])
    assert result.exit_code == 0, result.output
    assert "users" in result.output and "40" in result.output
    assert str(ws / "data") in result.output.replace("\n", "")
    result = runner.invoke(
        app,
        [
            "query",
            "SELECT count(*) AS n FROM items",
            "-c",
            "tiny",
            "--set",
            f"workspace={ws}",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"n": 48}


def test_query_is_read_only(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    runner.invoke(
        app, ["ingest", "-c", "tiny", "--set", f"workspace={ws}", "--set", "tracking.enabled=false"]
    )
    result = runner.invoke(
        app, ["query", "DELETE FROM items", "-c", "tiny", "--set", f"workspace={ws}"]
    )
    assert result.exit_code == 1
    assert "read-only" in result.output.lower()


def test_config_show_applies_overrides() -> None:
    result = runner.invoke(app, ["config", "show", "-c", "tiny", "--set", "data.kcore=3"])
    assert result.exit_code == 0
    assert json.loads(result.output)["data"]["kcore"] == 3


def test_bad_input_exits_nonzero_without_traceback(tmp_path: Path) -> None:
    """Through a real subprocess: the user sees one error line, no traceback, exit 1."""
    ws = tmp_path / "ws"
    env = dict(os.environ, COLUMNS="200")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "store_cli",
            "ingest",
            "-c",
            "tiny",
            "--set",
            f"workspace={ws}",
            "--set",
            f"data.path={tmp_path / 'missing'}",
            "--set",
            "tracking.enabled=false",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "error:" in proc.stderr
    assert "Tiny" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (ws / "data").exists()


def test_unknown_config_key_exits_nonzero(tmp_path: Path) -> None:
    result = runner.invoke(app, ["ingest", "-c", "tiny", "--set", "data.colour=red"])
    assert result.exit_code == 1
    assert "unknown key 'data.colour'" in result.output


def test_recommend_for_a_user_and_an_adhoc_history(tiny_pipeline: Path) -> None:
    base = ["-c", "tiny", "--set", f"workspace={tiny_pipeline}", "--set", "tracking.enabled=false"]
    result = runner.invoke(app, ["recommend", "--user", "0", "-k", "5", "--json", *base])
    assert result.exit_code == 0, result.output
    recs = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["rank"] for r in recs] == [1, 2, 3, 4, 5]
    scores = [r["score"] for r in recs]
    assert scores == sorted(scores, reverse=True)
    items = json.loads((Path(__file__).parent / "data/tiny/Tiny.item.json").read_text())
    assert all(r["item_id"] in items and r["title"] == items[r["item_id"]]["title"] for r in recs)
    again = runner.invoke(app, ["recommend", "--user", "0", "-k", "5", "--json", *base])
    assert again.stdout == result.stdout  # a fixed model gives a fixed answer

    adhoc = runner.invoke(
        app,
        ["recommend", "--history", "1,2,3", "-k", "3", "--exclude-history", "--json", *base],
    )
    assert adhoc.exit_code == 0, adhoc.output
    got = [json.loads(line)["item_id"] for line in adhoc.stdout.splitlines()]
    assert len(got) == 3 and not {"1", "2", "3"} & set(got)

    bad = runner.invoke(app, ["recommend", "--user", "nobody", *base])
    assert bad.exit_code == 1 and "no interactions" in bad.output
