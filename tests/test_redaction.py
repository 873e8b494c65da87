"""Credentials in config URIs never reach MLflow or the logs (issue 14).

The end-to-end tests run the ingest stage under a pipeline run against a real local
MLflow store, with credentials in ``data.path`` (a real fsspec source), in other config
strings, in a run tag and, for the file store, in ``tracking.uri`` itself; then every
file MLflow wrote (params, tags, run metadata, the SQLite database, artifacts) and every
captured log record is searched for the secrets.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from store_core import tracking
from store_core.config import CONFIG_DIR, load_config
from store_core.redaction import RedactingFilter, redact, redact_value
from store_core.stages import ingest_stage
from tests.conftest import TINY_DATA

KEY_ID = "AKIAKEYID7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYsecret1"
PG_PASSWORD = "pgSecret-2"
QUERY_TOKEN = "tokSecret-3"
TAG_SECRET = "tagSecret-4"
TRACKING_SECRET = "trackSecret-5"
ALL_SECRETS = [KEY_ID, SECRET, PG_PASSWORD, QUERY_TOKEN, TAG_SECRET, TRACKING_SECRET]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("s3://AKIAKEY:secretvalue@bucket/x", "s3://***@bucket/x"),
        ("postgresql://user:pw@host/db", "postgresql://***@host/db"),
        ("postgresql+psycopg2://u:p@host:5432/db", "postgresql+psycopg2://***@host:5432/db"),
        ("https://ghp_token123@github.com/o/r.git", "https://***@github.com/o/r.git"),
        # AWS secrets hold '/', passwords may hold an unencoded '@': hidden whole
        (f"s3://{KEY_ID}:{SECRET}@bucket/path/f.csv", "s3://***@bucket/path/f.csv"),
        ("mysql://user:p@ss@db.example/x", "mysql://***@db.example/x"),
        ("https://h/p?a=1&token=abc&X-Amz-Signature=ff&sig=zz", None),
        ("http://h/x?password=pw&user=u", "http://h/x?password=***&user=u"),
        ("host=h password=pw dbname=d", "host=h password=*** dbname=d"),
        ("['--db-password=hunter2', '--x']", "['--db-password=***', '--x']"),
        ('{"uri": "s3://k:s@b/x", "email": "a@b.c"}', '{"uri": "s3://***@b/x", "email": "a@b.c"}'),
        (
            "MLflow run 12 at https://u:p@mlflow.example",
            "MLflow run 12 at https://***@mlflow.example",
        ),
    ],
)
def test_redact(text: str, expected: str | None) -> None:
    if expected is None:
        expected = "https://h/p?a=1&token=***&X-Amz-Signature=***&sig=***"
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "s3://bucket/path/user@example.com/file",
        "http://127.0.0.1:5000",
        "sqlite:////tmp/ws/mlflow/mlflow.db",
        "file:///tmp/x",
        "memory://src",
        "design=1&monkey=2&keyboard=3",
        "{title}. {description} Categories: {categories}.",
        "user@example.com",
    ],
)
def test_redact_keeps_what_is_not_a_secret(text: str) -> None:
    assert redact(text) == text


def test_every_shipped_config_value_survives_redaction() -> None:
    """Nothing in a real config is mistaken for a secret (params stay readable)."""
    paths = sorted(CONFIG_DIR.glob("*.yaml"))
    assert paths
    for path in paths:
        flat = tracking.flatten(load_config(path).model_dump(mode="json"))
        changed = {k: v for k, v in flat.items() if redact(str(v)) != str(v)}
        assert changed == {}, path


def test_redact_value_walks_nested_structures() -> None:
    value = {"a": ["s3://k:s@b/x", ("pw=1", 3)], "b": {"c": "password=x"}, "n": None}
    assert redact_value(value) == {
        "a": ["s3://***@b/x", ("pw=1", 3)],
        "b": {"c": "password=***"},
        "n": None,
    }


def test_redacting_filter_on_a_handler(tmp_path: Path) -> None:
    log_file = tmp_path / "log.txt"
    handler = logging.FileHandler(log_file)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    logger = logging.getLogger("some.library.module")
    logger.addHandler(handler)
    try:
        logger.warning("reading %s", f"s3://{KEY_ID}:{SECRET}@bucket/x")
        try:
            raise ValueError(f"cannot reach postgresql://u:{PG_PASSWORD}@h/db")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
        handler.close()
    text = log_file.read_text()
    assert "reading s3://***@bucket/x" in text and "postgresql://***@h/db" in text
    assert not any(secret in text for secret in ALL_SECRETS)


# --------------------------------------------------------------------------- end to end


@pytest.fixture
def secret_source(clean_memory_fs: None) -> Iterator[str]:
    """The tiny dataset behind a URI with credentials (a real fsspec source)."""
    uri = f"memory://{KEY_ID}:{SECRET}@bucket/tiny"
    fs = fsspec.filesystem("memory")
    for path in TINY_DATA.iterdir():
        fs.pipe(f"{uri}/{path.name}", path.read_bytes())
    yield uri


def _files_containing(root: Path, secrets: list[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits = [s for s in secrets if s.encode() in data]
            if hits:
                found[str(path)] = hits
    return found


@pytest.mark.parametrize("store", ["sqlite", "file-store-uri-with-credentials"])
def test_secrets_absent_from_mlflow_and_logs(
    store: str,
    secret_source: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow.tracking import MlflowClient

    ws = tmp_path / "ws"
    overrides = [
        f"workspace={ws}",
        f"data.path={secret_source}",
        f"launcher.extra_args=['--db=postgresql://dbuser:{PG_PASSWORD}@db.example/store', "
        f"'--mirror=https://mirror.example/x?a=1&token={QUERY_TOKEN}']",
    ]
    mlflow_root = ws / "mlflow"
    if store == "file-store-uri-with-credentials":
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow_root = tmp_path / "mlstore"
        overrides.append(
            f"tracking.uri=file://trackuser:{TRACKING_SECRET}@localhost{tmp_path}/mlstore/runs"
        )
        overrides.append(f"tracking.artifact_location={(tmp_path / 'mlstore' / 'art').as_uri()}")
    cfg = load_config("tiny", overrides)
    assert SECRET in str(cfg.data.path)  # the config itself keeps what the user wrote

    caplog.set_level(logging.DEBUG)
    log_text = io.StringIO()
    handler = logging.StreamHandler(log_text)  # as the CLI's handler, with the filter
    handler.addFilter(RedactingFilter())
    handler.setLevel(logging.DEBUG)
    logging.getLogger().addHandler(handler)
    tag = {"store.requested_by": f"https://ci:{TAG_SECRET}@ci.example/job/1"}
    try:
        with tracking.pipeline_run(cfg, tags=tag) as parent:
            outcome = ingest_stage(cfg, parent.run_id)
    finally:
        logging.getLogger().removeHandler(handler)
    assert outcome.result.counts["items"] == 48  # really read through the secret URI

    # What MLflow returns: params and tags hold the redacted forms.
    client = MlflowClient(tracking_uri=tracking.tracking_uri(cfg))
    params = client.get_run(parent.run_id or "").data.params
    assert params["data.path"] == "memory://***@bucket/tiny"
    assert "postgresql://***@db.example/store" in params["launcher.extra_args"]
    assert "token=***" in params["launcher.extra_args"]
    if store != "sqlite":
        assert params["tracking.uri"] == f"file://***@localhost{tmp_path}/mlstore/runs"
    assert client.get_run(parent.run_id or "").data.tags["store.requested_by"] == (
        "https://***@ci.example/job/1"
    )
    stage = client.get_run(outcome.run_id or "")
    assert stage.data.params["source"] == "memory://***@bucket/tiny"
    artifacts = {a.path for a in client.list_artifacts(parent.run_id or "")}
    assert "config.json" in artifacts

    # What MLflow stored: no file under the store or its artifacts holds a secret.
    assert mlflow_root.is_dir() and any(mlflow_root.rglob("*.json"))
    found = _files_containing(mlflow_root, ALL_SECRETS)
    if store != "sqlite":
        # MLflow's file store itself writes its root URI, as given, into the "Default"
        # experiment it creates (id 0); STORE's experiment and runs hold no secret.
        default_experiment = str(tmp_path / "mlstore" / "runs" / "0" / "meta.yaml")
        assert found.pop(default_experiment) == [TRACKING_SECRET]
    assert found == {}
    # What was logged. Tracking's own records are redacted at the source...
    own = [r.getMessage() for r in caplog.records if r.name == "store_core.tracking"]
    assert any(m.startswith("MLflow run") for m in own)
    assert [m for m in own if any(s in m for s in ALL_SECRETS)] == []
    # ...and a handler with RedactingFilter sees every record of every library redacted
    # (ingest and the readers log the source URI as given).
    logged = log_text.getvalue()
    assert "memory://***@bucket/tiny" in logged
    assert [s for s in ALL_SECRETS if s in logged] == []


def test_cli_never_prints_credentials_of_a_failing_source(tmp_path: Path) -> None:
    """The CLI's log handler and its error line both redact: a source URI with a key and
    secret that cannot be read fails with one line and neither value in the output."""
    from typer.testing import CliRunner

    from store_cli.app import app

    result = CliRunner().invoke(
        app,
        [
            "ingest",
            "-c",
            "tiny",
            "--set",
            f"workspace={tmp_path / 'ws'}",
            "--set",
            "tracking.enabled=false",
            "--set",
            "data.path=memory://AKIAKEY:topsecretvalue@bucket/missing",
        ],
    )
    assert result.exit_code == 1
    output = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert "error:" in output
    assert "topsecretvalue" not in output and "AKIAKEY" not in output


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("info: /KEY:SECRET@bucket/tiny", "info: /***@bucket/tiny"),  # fsspec's DEBUG line
        ("KEY:SECRET@bucket/x", "***@bucket/x"),
        ("open '/u:p@host/db'", "open '/***@host/db'"),
        ("time 12:30 at x@y", "time 12:30 at x@y"),
        ("mail john@example.com", "mail john@example.com"),
    ],
)
def test_redact_userinfo_with_the_scheme_stripped(text: str, expected: str) -> None:
    assert redact(text) == expected
