"""Every verb of ``store``, run in the wrong order and with bad values, ends in exactly
one ``error:`` line, a non-zero exit and no traceback, and writes nothing (issue 16,
item 6).

Two workspaces: a fresh one (nothing run) and one after ``store ingest`` only (no model
trained). A verb run before its inputs exist names the verb to run first
(``run `store <verb>` first``, :class:`store_core.errors.MissingInputError`'s wording).
Bad values (an option outside its choices, an unknown or badly typed ``--set``, a config
path that does not exist, a bad ``-k``) are refused before anything is read. The verbs
come from the app itself, so a new verb without a row here fails
:func:`test_every_verb_has_rows`. No training: a verb run before training needs none.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from store_cli.app import app
from store_cli.guard import guard
from store_core.ingest import run_ingest
from tests.conftest import REPO

runner = CliRunner()

#: The file an OS lock leaves behind (zero bytes); anything else would be a half-written output.
LOCK_FILE = ".store-writer.lock"


@dataclass(frozen=True)
class Case:
    """``store <argv> -c <config> --set workspace=... --set tracking.enabled=false``;
    ``expect`` is text the one error line holds; ``{tmp}`` in an argument is tmp_path."""

    argv: tuple[str, ...]
    expect: str
    exit_code: int = 1
    config: str = "tiny"


def first(verb: str) -> str:
    return f"run `store {verb}` first"


#: A fresh workspace: nothing has run.
BEFORE_INGEST = {
    "train": Case(("train",), first("ingest")),
    "train-tokenizer": Case(("train", "--phase", "tokenizer"), first("ingest")),
    "train-recommender": Case(
        ("train", "--phase", "recommender"), first("train --phase tokenizer")
    ),
    "tokenize-catalogue": Case(("tokenize-catalogue",), first("train")),
    "tokenize-catalogue-regenerate": Case(
        ("tokenize-catalogue", "--mode", "regenerate"), first("train")
    ),
    "evaluate": Case(("evaluate",), first("train")),
    "evaluate-tiger": Case(("evaluate", "--set", "evaluation.systems=[tiger]"), first("ingest")),
    "evaluate-sasrec": Case(("evaluate", "--set", "evaluation.systems=[sasrec]"), first("ingest")),
    "evaluate-popularity": Case(
        ("evaluate", "--set", "evaluation.systems=[popularity]"), first("ingest")
    ),
    "recommend-user": Case(("recommend", "--user", "0"), first("ingest")),
    "recommend-history": Case(("recommend", "--history", "0,1"), first("train")),
    "query": Case(("query", "SELECT count(*) FROM items"), first("ingest")),
}

#: After ``store ingest`` only: no model trained.
BEFORE_TRAINING = {
    "train-recommender": Case(
        ("train", "--phase", "recommender"), first("train --phase tokenizer")
    ),
    "tokenize-catalogue": Case(("tokenize-catalogue",), first("train")),
    "evaluate": Case(("evaluate",), first("train")),
    "evaluate-store-and-tiger": Case(
        ("evaluate", "--set", "evaluation.systems=[tiger, store]"), first("train")
    ),
    "recommend-user": Case(("recommend", "--user", "0"), first("train")),
    "recommend-history": Case(("recommend", "--history", "0,1", "-k", "3"), first("train")),
}

#: Bad values, on a fresh workspace: each is refused before any input is read.
BAD_VALUES = {
    "ingest-unknown-set-key": Case(("ingest", "--set", "data.kcorr=5"), "unknown key 'data.kcorr'"),
    "ingest-renamed-set-key": Case(
        ("ingest", "--set", "semantic_id.num_levels=3"),
        "--set semantic_id.num_levels: semantic_id.num_levels was renamed to "
        "semantic_id.cluster_levels",
    ),
    "ingest-bad-set-value": Case(
        ("ingest", "--set", "data.kcore=abc"), "--set data.kcore: Input should be a valid integer"
    ),
    "ingest-missing-config": Case(("ingest",), "does not exist", config="{tmp}/nope.yaml"),
    "ingest-unknown-option": Case(("ingest", "--kcore", "5"), "No such option: --kcore", 2),
    "train-bad-phase": Case(("train", "--phase", "both"), "'both' is not one of", 2),
    "train-bad-set-value": Case(
        ("train", "--set", "recommender_train.epochs=many"), "--set recommender_train.epochs:"
    ),
    "tokenize-catalogue-bad-mode": Case(
        ("tokenize-catalogue", "--mode", "fresh"), "'fresh' is not one of 'keep', 'regenerate'", 2
    ),
    "tokenize-catalogue-mode-as-set": Case(
        ("tokenize-catalogue", "--set", "catalogue.mode=regenerate"), "unknown key 'catalogue'"
    ),
    "evaluate-unknown-system": Case(
        ("evaluate", "--set", "evaluation.systems=[bert4rec]"), "--set evaluation.systems:"
    ),
    "evaluate-missing-config": Case(("evaluate",), "does not exist", config="nosuchconfig"),
    "recommend-k-zero": Case(("recommend", "--history", "0", "-k", "0"), "-k must be at least 1"),
    "recommend-k-too-many": Case(
        ("recommend", "--history", "0", "-k", "1001"), "-k must be at most 1000"
    ),
    "recommend-k-not-a-number": Case(
        ("recommend", "--history", "0", "-k", "ten"), "Invalid value for '-k'", 2
    ),
    "recommend-empty-history": Case(("recommend", "--history", " , "), "the history is empty"),
    "recommend-user-and-history": Case(
        ("recommend", "--user", "0", "--history", "1"), "exactly one of --user or --history", 2
    ),
    "recommend-neither": Case(("recommend",), "exactly one of --user or --history", 2),
    "run-bad-set-value": Case(("run", "--set", "data.kcore=abc"), "--set data.kcore:"),
    "run-missing-config": Case(("run", "--no-evaluate"), "does not exist", config="{tmp}/x.yaml"),
    "serve-port-zero": Case(("serve", "--prefect-port", "0"), "--prefect-port", 2),
    "serve-mlflow-port": Case(("serve", "--mlflow", "--mlflow-port", "70000"), "--mlflow-port", 2),
    "serve-bad-cron": Case(
        ("serve", "--set", "service.nightly_cron=0 3 * *"), "--set service.nightly_cron:"
    ),
    "query-write": Case(("query", "DELETE FROM items"), "SELECT"),
    "query-empty": Case(("query", ""), "holds none"),
    "config-show-bad-override": Case(("config", "show", "--set", "novalue"), "key.path=value"),
    "config-show-missing-config": Case(("config", "show"), "does not exist", config="{tmp}/n.yml"),
}

#: Verbs without a wrong order: ingest is the first stage, run runs every stage in order,
#: serve starts the service (its flows fail like the verbs above), config reads no workspace.
NO_PREREQUISITE = {"ingest", "run", "serve", "config"}


def params(cases: dict[str, Case]) -> list[object]:
    return [pytest.param(case, id=row) for row, case in cases.items()]


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def invoke(case: Case, ws: Path, tmp: Path) -> str:
    """Run ``case`` in process; assert the outcome; return the one error line."""
    argv = [a.replace("{tmp}", str(tmp)) for a in case.argv]
    argv += ["-c", case.config.replace("{tmp}", str(tmp))]
    argv += ["--set", f"workspace={ws}", "--set", "tracking.enabled=false"]
    result = runner.invoke(app, argv)
    output = result.output  # stdout and stderr
    assert isinstance(result.exception, SystemExit), f"{argv} raised {result.exception!r}"
    assert result.exit_code == case.exit_code, output
    assert "Traceback" not in output, output
    lines = error_lines(output)
    assert len(lines) == 1, output
    assert case.expect in lines[0], lines[0]
    return lines[0]


def files_under(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (relative path -> size, mtime in ns), the lock file left out."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace after ``store ingest`` of the tiny dataset, nothing trained."""
    from store_core.config import load_config

    ws = tmp_path_factory.mktemp("ingested") / "ws"
    run_ingest(load_config("tiny", [f"workspace={ws}", "tracking.enabled=false"]))
    return ws


@pytest.mark.parametrize("case", params(BEFORE_INGEST))
def test_verb_before_ingest(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    ws = tmp_path / "ws"
    line = invoke(case, ws, tmp_path)
    assert str(ws) in line  # names the missing input
    assert files_under(ws) == {}  # nothing written


@pytest.mark.parametrize("case", params(BEFORE_TRAINING))
def test_verb_before_training(
    case: Case, ingested: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    before = files_under(ingested)
    line = invoke(case, ingested, tmp_path)
    assert str(ingested / "models") in line  # names the missing model
    assert files_under(ingested) == before  # nothing written, nothing touched


@pytest.mark.parametrize("case", params(BAD_VALUES))
def test_bad_value(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    ws = tmp_path / "ws"
    line = invoke(case, ws, tmp_path)
    if "--set" in case.expect:  # a bad --set is the --set's fault, not the config file's
        assert "config file" not in line and "tiny.yaml" not in line, line
    assert not ws.exists()  # refused before the workspace was made


def test_a_bad_set_value_names_the_set_not_the_file(tmp_path: Path) -> None:
    """With a config file given, a bad ``--set`` value names the ``--set``; a bad value in
    the file names the file."""
    good = tmp_path / "good.yaml"
    good.write_text("data:\n  kcore: 3\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  kcore: many\n")
    ws = tmp_path / "ws"
    line = invoke(Case(("ingest", "--set", "data.kcore=abc"), "", config=str(good)), ws, tmp_path)
    assert line.startswith("error: --set data.kcore: Input should be a valid integer"), line
    assert str(good) not in line
    line = invoke(Case(("ingest",), "", config=str(bad)), ws, tmp_path)
    assert f"config file {bad}: 'data.kcore'" in line, line


def test_a_renamed_key_in_a_config_file_is_refused_naming_the_new_key(tmp_path: Path) -> None:
    """``semantic_id.num_levels`` (L before it became ``cluster_levels``) in a config file
    is refused, not read as the new key: one line naming the file, the old and new key."""
    old = tmp_path / "old.yaml"
    old.write_text("semantic_id:\n  num_levels: 2\n")
    ws = tmp_path / "ws"
    line = invoke(Case(("ingest",), "", config=str(old)), ws, tmp_path)
    assert line == (
        f"error: config file {old}: semantic_id.num_levels was renamed to "
        "semantic_id.cluster_levels"
    ), line
    assert not ws.exists()


def test_the_library_raises_one_kind_for_a_missing_input(tmp_path: Path) -> None:
    """Before ``store ingest``, the library's readers raise MissingInputError naming the
    verb (the CLI's guard prints it; a flow can tell it from a failure worth a retry)."""
    from store_core import storage
    from store_core.baselines.popularity import run_popularity
    from store_core.config import load_config
    from store_core.errors import MissingInputError
    from store_core.recommend_top_k import user_history
    from store_core.tasks import load_task_data

    cfg = load_config("tiny", [f"workspace={tmp_path / 'ws'}", "tracking.enabled=false"])
    calls = {
        "storage.query": lambda: storage.query(cfg.duckdb_path, "SELECT 1"),
        "user_history": lambda: user_history(cfg, "0"),
        "run_popularity": lambda: run_popularity(cfg.data_dir),
        "load_task_data": lambda: load_task_data(cfg.data_dir, {}),
    }
    for name, call in calls.items():
        with pytest.raises(MissingInputError) as info:
            call()
        assert info.value.verb == "ingest", name
        assert str(info.value).endswith(first("ingest")) and cfg.workspace in str(info.value)


def test_every_verb_has_rows() -> None:
    """Each verb that ``store --help`` lists has a bad-value row, and each verb with a
    prerequisite a wrong-order row."""
    verbs = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    assert {"ingest", "train", "tokenize-catalogue", "evaluate", "recommend", "query"} <= verbs
    ordered = {c.argv[0] for c in [*BEFORE_INGEST.values(), *BEFORE_TRAINING.values()]}
    assert ordered == verbs - NO_PREREQUISITE
    assert {c.argv[0] for c in BAD_VALUES.values()} == verbs


@pytest.mark.parametrize(
    ("error", "expect"),
    [
        (FileNotFoundError("/srv/ws/data/items.parquet"), "No such file or directory: /srv/ws"),
        (PermissionError("/srv/ws/models"), "Permission denied: /srv/ws/models"),
    ],
)
def test_os_errors_without_errno_read_as_words(
    error: OSError, expect: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """pyarrow and fsspec raise ``FileNotFoundError(path)`` without an errno: the line
    says what happened, not the class name."""

    def fail() -> None:
        raise error

    with pytest.raises(typer.Exit):
        guard(fail)
    (line,) = error_lines(capsys.readouterr().err)
    assert expect in line and "FileNotFoundError" not in line, line


def test_real_process_evaluate_before_training(tmp_path: Path) -> None:
    """Through a real ``python -m store_cli``: one line on stderr, exit 1, no traceback."""
    env = dict(os.environ, COLUMNS="400", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    argv = ["evaluate", "-c", "tiny", "--set", f"workspace={tmp_path / 'ws'}"]
    proc = subprocess.run(
        [sys.executable, "-m", "store_cli", *argv, "--set", "tracking.enabled=false"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    (line,) = error_lines(proc.stderr)
    assert first("train") in line
    assert proc.stdout == ""
