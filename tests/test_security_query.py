"""`store query` is a sandbox: one read-only SELECT on the workspace database, nothing else.

Every escape found when the query path was attacked (issue 14) and its variants goes
through the real CLI entry point; each must be refused with exactly one ``error:`` line,
exit status 1, no traceback, and nothing written anywhere: no file created, the
workspace's and another workspace's databases byte-for-byte unchanged. The views and
macros users query keep working through the same path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from store_cli.app import app
from store_core import storage
from store_core.errors import StoreError
from store_core.workspace import sha256_of
from tests.conftest import REPO
from tests.test_storage import codebook, sid_rows

runner = CliRunner()

IDS = [("1", (1, 2, 3, 0)), ("2", (1, 2, 4, 0)), ("3", (2, 0, 0, 0))]


@dataclass(frozen=True)
class Workspaces:
    root: Path
    mine: Path  # the workspace queried
    other: Path  # another workspace an attacker would like to empty

    @property
    def db(self) -> Path:
        return self.mine / "store.duckdb"

    @property
    def other_db(self) -> Path:
        return self.other / "store.duckdb"

    @property
    def out(self) -> Path:
        """Where escapes try to write (must stay empty)."""
        return self.root / "out"


@pytest.fixture(scope="module")
def spaces(tmp_path_factory: pytest.TempPathFactory) -> Workspaces:
    root = tmp_path_factory.mktemp("query-sandbox")
    mine = root / "ws"
    result = runner.invoke(
        app,
        ["ingest", "-c", "tiny", "--set", f"workspace={mine}", "--set", "tracking.enabled=false"],
    )
    assert result.exit_code == 0, result.output
    storage.write_semantic_id_version(
        str(mine / "store.duckdb"), codebook(), sid_rows(IDS), {"new": 3}
    )
    other = root / "other"
    other.mkdir()
    shutil.copy(mine / "store.duckdb", other / "store.duckdb")
    (root / "out").mkdir()
    return Workspaces(root, mine, other)


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``root``: size and sha256."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, sha256_of(str(p)))
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run_query(spaces: Workspaces, sql: str) -> tuple[int, str]:
    """``store query -c tiny --set workspace=... -- SQL`` (``--``: SQL may start with ``--``)."""
    args = ["query", "-c", "tiny", "--set", f"workspace={spaces.mine}", "--", sql]
    result = runner.invoke(app, args)
    return result.exit_code, result.output


# Each escape: (id, SQL built from the workspaces). Paths outside the temp tree are the
# real targets of the report (the password file, /root); written paths stay in out/.
ESCAPES: list[tuple[str, Callable[[Workspaces], str]]] = [
    ("copy-to", lambda w: f"COPY (SELECT 1) TO '{w.out}/x.csv'"),
    ("copy-table-to", lambda w: f"COPY items TO '{w.out}/items.parquet' (FORMAT parquet)"),
    ("copy-over-own-data", lambda w: f"COPY items TO '{w.mine}/data/items.parquet'"),
    ("copy-lowercase", lambda w: f"copy (select 1) to '{w.out}/x.csv'"),
    ("copy-comment-first", lambda w: f"/* harmless */ COPY (SELECT 1) TO '{w.out}/x.csv'"),
    ("copy-line-comment", lambda w: f"-- SELECT 1\nCOPY (SELECT 1) TO '{w.out}/x.csv'"),
    ("copy-whitespace", lambda w: f"  \n\t COPY (SELECT 1) TO '{w.out}/x.csv' ;  "),
    ("copy-from", lambda w: "COPY items FROM '/etc/passwd'"),
    ("export-database", lambda w: f"EXPORT DATABASE '{w.out}/d'"),
    ("export-lowercase", lambda w: f"export database '{w.out}/d' (format parquet)"),
    ("import-database", lambda w: f"IMPORT DATABASE '{w.out}/d'"),
    ("attach-read-write", lambda w: f"ATTACH '{w.other_db}' AS o (READ_WRITE)"),
    ("attach-plain", lambda w: f"ATTACH '{w.other_db}' AS o"),
    ("attach-read-only", lambda w: f"ATTACH '{w.other_db}' AS o (READ_ONLY)"),
    ("attach-lowercase", lambda w: f"attach database '{w.other_db}' as o"),
    ("attach-memory", lambda w: "ATTACH ':memory:' AS m"),
    ("attach-new-file", lambda w: f"ATTACH '{w.out}/new.duckdb' AS n"),
    (
        "attach-then-delete",
        lambda w: f"ATTACH '{w.other_db}' AS o (READ_WRITE); DELETE FROM o.items",
    ),
    ("delete-other-unattached", lambda w: "DELETE FROM o.items"),
    ("detach", lambda w: "DETACH ws"),
    ("use", lambda w: "USE memory"),
    ("read-csv-passwd", lambda w: "SELECT * FROM read_csv('/etc/passwd', sep = ':')"),
    ("read-csv-auto", lambda w: "select * from read_csv_auto('/etc/passwd')"),
    ("read-csv-other-db", lambda w: f"SELECT * FROM read_csv('{w.other_db}')"),
    ("read-text", lambda w: "SELECT content FROM read_text('/etc/passwd')"),
    ("read-blob", lambda w: "SELECT content FROM read_blob('/etc/hostname')"),
    ("sniff-csv", lambda w: "SELECT * FROM sniff_csv('/etc/passwd')"),
    ("read-parquet", lambda w: f"SELECT * FROM read_parquet('{w.mine}/data/items.parquet')"),
    ("read-parquet-glob", lambda w: f"SELECT count(*) FROM read_parquet('{w.mine}/data/*')"),
    (
        "parquet-metadata",
        lambda w: f"SELECT * FROM parquet_metadata('{w.mine}/data/items.parquet')",
    ),
    ("read-json", lambda w: "SELECT * FROM read_json('/etc/passwd')"),
    ("read-json-objects", lambda w: "SELECT * FROM read_json_objects('/etc/hostname')"),
    ("replacement-scan-file", lambda w: f"SELECT * FROM '{w.mine}/data/items.parquet'"),
    ("glob-root", lambda w: "SELECT * FROM glob('/root/*')"),
    ("glob-home", lambda w: "SELECT * FROM glob('~/*')"),
    ("glob-workspace", lambda w: f"SELECT * FROM glob('{w.root}/**')"),
    ("glob-upper", lambda w: "SELECT FILE FROM GLOB('/etc/*')"),
    ("http-read", lambda w: "SELECT * FROM read_parquet('https://example.com/x.parquet')"),
    ("s3-read", lambda w: "SELECT * FROM read_csv('s3://bucket/x.csv')"),
    ("query-fn-copy", lambda w: f"SELECT * FROM query('COPY (SELECT 1) TO ''{w.out}/q.csv''')"),
    ("query-fn-read", lambda w: "SELECT * FROM query('SELECT * FROM read_csv(''/etc/passwd'')')"),
    ("install-httpfs", lambda w: "INSTALL httpfs"),
    ("install-lowercase", lambda w: "install httpfs from core"),
    ("load-httpfs", lambda w: "LOAD httpfs"),
    ("load-file", lambda w: f"LOAD '{w.out}/evil.duckdb_extension'"),
    ("force-install", lambda w: "FORCE INSTALL httpfs"),
    ("update-extensions", lambda w: "UPDATE EXTENSIONS"),
    ("extension-autoload", lambda w: "SELECT * FROM sqlite_scan('/etc/passwd', 't')"),
    ("set-external-access", lambda w: "SET enable_external_access = true"),
    ("set-lowercase", lambda w: "set enable_external_access=true"),
    ("set-global", lambda w: "SET GLOBAL enable_external_access = true"),
    ("reset-external-access", lambda w: "RESET enable_external_access"),
    ("reset-all", lambda w: "RESET ALL"),
    ("set-lock", lambda w: "SET lock_configuration = false"),
    ("set-variable", lambda w: "SET VARIABLE v = 1"),
    ("pragma", lambda w: "PRAGMA enable_external_access"),
    ("pragma-lowercase", lambda w: "pragma database_list"),
    ("call", lambda w: "CALL pragma_version()"),
    ("checkpoint", lambda w: "CHECKPOINT"),
    ("two-selects", lambda w: "SELECT 1; SELECT 2"),
    ("two-selects-no-space", lambda w: "SELECT 1;SELECT 2;"),
    ("select-then-delete", lambda w: "SELECT 1; DELETE FROM items"),
    ("select-comment-delete", lambda w: "SELECT 1 /* ; */; DELETE FROM items -- ;"),
    ("create-table", lambda w: "CREATE TABLE t AS SELECT 1 AS x"),
    ("create-temp-table", lambda w: "CREATE TEMP TABLE t AS SELECT 1 AS x"),
    ("create-temporary-lower", lambda w: "create temporary table t (x int)"),
    ("create-temp-view", lambda w: "CREATE TEMP VIEW v AS SELECT 1"),
    ("create-macro", lambda w: "CREATE OR REPLACE MACRO sid_of(x) AS 1"),
    ("create-temp-macro", lambda w: "CREATE TEMP MACRO m(x) AS x"),
    ("create-secret", lambda w: "CREATE SECRET (TYPE s3, KEY_ID 'k', SECRET 's')"),
    ("create-sequence", lambda w: "CREATE SEQUENCE s"),
    ("insert", lambda w: "INSERT INTO items (item_id) VALUES ('x')"),
    ("delete", lambda w: "DELETE FROM items"),
    ("delete-lowercase", lambda w: "  delete from items where true"),
    ("update", lambda w: "UPDATE items SET title = 'x'"),
    ("drop", lambda w: "DROP TABLE items"),
    ("drop-view", lambda w: "DROP VIEW current_semantic_ids"),
    ("alter", lambda w: "ALTER TABLE items RENAME TO gone"),
    ("comment-on", lambda w: "COMMENT ON TABLE items IS 'x'"),
    ("truncate", lambda w: "TRUNCATE items"),
    ("merge", lambda w: "MERGE INTO items USING items s ON false WHEN MATCHED THEN DELETE"),
    ("begin", lambda w: "BEGIN TRANSACTION"),
    ("vacuum", lambda w: "VACUUM"),
    ("analyze", lambda w: "ANALYZE"),
    ("explain-analyze", lambda w: f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{w.out}/e.csv'"),
    ("prepare", lambda w: "PREPARE p AS SELECT 1"),
    ("pivot-statement", lambda w: "PIVOT items ON active"),
    ("duckdb-secrets", lambda w: "SELECT * FROM duckdb_secrets()"),
    ("empty", lambda w: "  -- nothing here\n"),
]


@pytest.mark.parametrize("sql_of", [e[1] for e in ESCAPES], ids=[e[0] for e in ESCAPES])
def test_escape_is_refused_with_one_line_and_writes_nothing(
    spaces: Workspaces, sql_of: Callable[[Workspaces], str]
) -> None:
    sql = sql_of(spaces)
    before = snapshot(spaces.root)
    code, output = run_query(spaces, sql)
    assert code == 1, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert "Traceback" not in output
    assert "root:" not in output  # nothing of the password file leaked into the message
    assert snapshot(spaces.root) == before  # no file created, changed or removed
    assert not any(spaces.out.iterdir())


def test_other_workspace_survives_attach_then_delete(spaces: Workspaces) -> None:
    """The report's attack, one statement at a time: the second workspace keeps its rows."""
    count = storage.query(str(spaces.other_db), "SELECT count(*) FROM items")[1]
    for sql in (f"ATTACH '{spaces.other_db}' AS o (READ_WRITE)", "DELETE FROM o.items"):
        assert run_query(spaces, sql)[0] == 1
    assert storage.query(str(spaces.other_db), "SELECT count(*) FROM items")[1] == count
    assert count[0][0] > 0


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT count(*) AS n FROM items", [(48,)]),
        ("  -- a comment first\n  select count(*) from items ;  ", [(48,)]),
        ("SELECT ';' AS s, 'DELETE FROM items; COPY' AS t", [(";", "DELETE FROM items; COPY")]),
        ("WITH x AS (SELECT 2 AS v) SELECT v FROM x", [(2,)]),
        ("FROM items SELECT count(*)", [(48,)]),
        ("SELECT sid_of('1'), item_of('<a_1><b_2><c_4><d_0>')", [("<a_1><b_2><c_3><d_0>", "2")]),
        ("SELECT item_id FROM neighbours('1', 2) ORDER BY 1", [("2",)]),
        ("SELECT item_id FROM items_with_codes([1, 2]) ORDER BY 1", [("1",), ("2",)]),
        ("SELECT item_id FROM items_with_prefix('<a_2>')", [("3",)]),
        ("SELECT count(*) FROM current_semantic_ids", [(3,)]),
        ("SELECT codebook_version FROM current_codebook", [("cb1",)]),
        ("SELECT version FROM current_semantic_id_version", [(1,)]),
        ("SELECT current_setting('enable_external_access')", [(False,)]),
    ],
)
def test_read_only_selects_and_the_macros_work(
    spaces: Workspaces, sql: str, expected: list[tuple[object, ...]]
) -> None:
    assert storage.query(str(spaces.db), sql)[1] == expected


def test_cli_prints_select_results(spaces: Workspaces) -> None:
    args = ["query", "SELECT sid_of('1') AS sid", "--json", "-c", "tiny"]
    result = runner.invoke(app, [*args, "--set", f"workspace={spaces.mine}"])
    assert result.exit_code == 0, result.output
    assert "<a_1><b_2><c_3><d_0>" in result.output


def test_library_query_refuses_the_same_way(spaces: Workspaces) -> None:
    with pytest.raises(StoreError, match="exactly one read-only SELECT statement, not 2"):
        storage.query(str(spaces.db), "SELECT 1; SELECT 2")
    with pytest.raises(StoreError, match="SELECT statement, not COPY"):
        storage.query(str(spaces.db), f"COPY items TO '{spaces.out}/x.csv'")
    with pytest.raises(StoreError, match=r"query refused: .*disabled by configuration"):
        storage.query(str(spaces.db), "SELECT * FROM read_csv('/etc/passwd')")
    assert not any(spaces.out.iterdir())


def test_sandbox_fails_closed_when_the_file_is_open_unsandboxed(spaces: Workspaces) -> None:
    """DuckDB shares one instance per file in a process: the query refuses to run on an
    instance opened without the sandbox settings instead of inheriting it."""
    with (
        storage.connect_read_only_with_retry(str(spaces.db)),
        pytest.raises(StoreError, match="different configuration"),
    ):
        storage.query(str(spaces.db), "SELECT 1")
    assert storage.query(str(spaces.db), "SELECT 1")[1] == [(1,)]


def test_refusal_in_a_real_process_is_one_line(spaces: Workspaces) -> None:
    """Through a subprocess (the user's view): one error line on stderr, exit 1."""
    env = dict(os.environ, COLUMNS="80")
    target = spaces.out / "sub.csv"
    args = ["query", f"COPY items TO '{target}'", "-c", "tiny", "--set", f"workspace={spaces.mine}"]
    proc = subprocess.run(
        [sys.executable, "-m", "store_cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")
    assert not target.exists()


def test_markup_in_names_and_values_is_printed_literally(spaces: Workspaces) -> None:
    """Errors quote user SQL and results hold any text: rich must not parse either."""
    code, output = run_query(spaces, 'SELECT * FROM "[/]"')
    assert code == 1 and output.count("\n") == 1 and "[/]" in output, output
    code, output = run_query(spaces, "SELECT '[/]' AS \"[bold]c\", '[red]x[/red]' AS v")
    assert code == 0, output
    assert "[/]" in output and "[bold]c" in output and "[red]x[/red]" in output
