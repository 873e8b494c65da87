"""Every bad input the suite knows ends in ONE line ``error: ...`` and a non-zero exit,
never a traceback (issue 15, item 4).

One table, run through the real CLI (typer's CliRunner, in process; one subprocess test
below shows the same for a real ``python -m store_cli``). Each row builds its input
in ``tmp_path`` and names the command line to run and a piece of text the error line must
hold. Config rows are refused at load time, before any stage starts: values that used to
be accepted and fail only inside training or evaluation (``semantic_id.pca_dim=-1``,
``model.hidden_size`` not divisible by ``model.num_heads``, ...).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from store_cli.app import app

runner = CliRunner()


@dataclass(frozen=True)
class Case:
    """One bad input: ``build(tmp_path)`` makes the files and returns the CLI arguments;
    ``expect`` is text the one error line must contain."""

    build: Callable[[Path], list[str]]
    expect: str
    exit_code: int | None = None  # None: any non-zero status
    env: tuple[tuple[str, str], ...] = ()  # environment variables set for the run


def tiny(*args: str) -> Callable[[Path], list[str]]:
    """``<args> -c tiny`` with a workspace in tmp_path and tracking off; ``{tmp}`` in an
    argument is replaced by tmp_path."""

    def build(tmp: Path) -> list[str]:
        argv = [a.replace("{tmp}", str(tmp)) for a in args]
        return [
            *argv,
            "-c",
            "tiny",
            "--set",
            f"workspace={tmp}/ws",
            "--set",
            "tracking.enabled=false",
        ]

    return build


def show(*overrides: str) -> Callable[[Path], list[str]]:
    """``store config show -c tiny --set ...``: the config alone is validated."""
    return tiny("config", "show", *[x for o in overrides for x in ("--set", o)])


def on_source(
    fmt: str, write: Callable[[Path], None], verb: str = "ingest", **data: str
) -> Callable[[Path], list[str]]:
    """Ingest a source directory that ``write`` fills, read as ``data.format=fmt``."""

    def build(tmp: Path) -> list[str]:
        source = tmp / "source"
        source.mkdir()
        write(source)
        sets = [f"data.format={fmt}", f"data.path={source}", "data.text_template=null"]
        sets += [f"data.{k}={v}" for k, v in data.items()]
        return tiny(verb, *[x for s in sets for x in ("--set", s)])(tmp)

    return build


# --------------------------------------------------------------------------- builders


def workspace_is_a_file(tmp: Path) -> list[str]:
    (tmp / "ws").write_text("not a directory\n")
    return tiny("ingest")(tmp)


def workspace_parent_is_a_file(tmp: Path) -> list[str]:
    (tmp / "file").write_text("x\n")
    return [*tiny("ingest")(tmp), "--set", f"workspace={tmp}/file/ws"]


def workspace_symlink_loop(tmp: Path) -> list[str]:
    os.symlink(tmp / "b", tmp / "a")
    os.symlink(tmp / "a", tmp / "b")
    return [*tiny("ingest")(tmp), "--set", f"workspace={tmp}/a"]


def database(content: Callable[[Path], bytes], *verb: str) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        (tmp / "ws").mkdir()
        (tmp / "ws" / "store.duckdb").write_bytes(content(tmp))
        return tiny(*verb)(tmp)

    return build


def random_bytes(tmp: Path) -> bytes:
    return os.urandom(1 << 14)


def truncated_database(tmp: Path) -> bytes:
    import duckdb

    path = tmp / "whole.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE t AS SELECT range AS i FROM range(200000)")
    con.close()
    data = path.read_bytes()
    return data[: len(data) // 2]


def database_is_a_directory(tmp: Path) -> list[str]:
    (tmp / "ws" / "store.duckdb").mkdir(parents=True)
    return tiny("ingest")(tmp)


def foreign_database(tmp: Path) -> bytes:
    """A valid DuckDB file of another application with a table named like ours."""
    import duckdb

    path = tmp / "foreign.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE codebooks (y VARCHAR)")
    con.close()
    return path.read_bytes()


def config_file(text: str) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        path = tmp / "bad.yaml"
        path.write_text(text)
        return ["config", "show", "-c", str(path)]

    return build


def config_directory(tmp: Path) -> list[str]:
    (tmp / "conf.yaml").mkdir()
    return ["config", "show", "-c", str(tmp / "conf.yaml")]


def config_not_utf8(tmp: Path) -> list[str]:
    (tmp / "latin.yaml").write_bytes("workspace: caf\xe9\n".encode("latin-1"))
    return ["config", "show", "-c", str(tmp / "latin.yaml")]


def artifacts_under_a_file(tmp: Path) -> list[str]:
    (tmp / "file").write_text("x\n")
    return with_tracking("config", "show", "--set", f"tracking.artifact_location={tmp}/file/a")(tmp)


def with_tracking(*args: str) -> Callable[[Path], list[str]]:
    """Like :func:`tiny` with tracking left on."""

    def build(tmp: Path) -> list[str]:
        argv = tiny(*args)(tmp)
        return argv[: argv.index("tracking.enabled=false") - 1]

    return build


def deepspeed_file(content: str | None) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        path = tmp / "ds.json"
        if content is not None:
            path.write_text(content)
        return show(f"recommender_train.deepspeed.config_file={path}")(tmp)

    return build


def lcrec_huge_integer_id(root: Path) -> None:
    huge = "9" * 5000
    (root / "Bad.item.json").write_text(json.dumps({"1": {"title": "A"}, "2": {"title": "B"}}))
    (root / "Bad.inter.json").write_text('{"u1": ["1", "2", ' + huge + "]}")


def amazon_huge_integer_id(root: Path) -> None:
    (root / "meta_Bad.json").write_text('{"asin": "P1", "title": "A"}\n')
    (root / "reviews_Bad.json").write_text(
        '{"reviewerID": "A1", "asin": "P1", "unixReviewTime": 1400000000}\n'
        '{"reviewerID": ' + "9" * 5000 + ', "asin": "P1", "unixReviewTime": 1400000001}\n'
    )


def movielens_huge_timestamp(root: Path) -> None:
    (root / "u.data").write_text("1\t10\t5\t881250949\n1\t20\t4\t99999999999999999999\n")
    flags = "|".join(["0"] * 19)
    (root / "u.item").write_text(f"10|Toy|||http://x|{flags}\n20|Heat|||http://x|{flags}\n")


def recbole_huge_float_timestamp(root: Path) -> None:
    (root / "Bad.inter").write_text(
        "user_id:token\titem_id:token\ttimestamp:float\nu1\ti1\t1400000000\nu1\ti2\t1e30\n"
    )
    (root / "Bad.item").write_text("item_id:token\ttitle:token_seq\ni1\tA\ni2\tB\n")


def tabular_uint64_timestamp(root: Path) -> None:
    inter = pa.table(
        {
            "user_id": ["u1", "u1"],
            "item_id": ["i1", "i2"],
            "timestamp": pa.array([1, 2**64 - 1], type=pa.uint64()),
        }
    )
    pq.write_table(inter, root / "interactions.parquet")
    pq.write_table(pa.table({"item_id": ["i1", "i2"], "title": ["A", "B"]}), root / "items.parquet")


def data_path_symlink_loop(tmp: Path) -> list[str]:
    os.symlink(tmp / "loop-b", tmp / "loop-a")
    os.symlink(tmp / "loop-a", tmp / "loop-b")
    return tiny("ingest", "--set", f"data.path={tmp}/loop-a")(tmp)


# --------------------------------------------------------------------------- the table

CASES: dict[str, Case] = {
    # Config values refused at load time (they used to fail inside training/evaluation).
    "pca_dim-negative": Case(
        tiny("train", "--set", "semantic_id.pca_dim=-1"), "--set semantic_id.pca_dim"
    ),
    "pca_dim-zero": Case(show("semantic_id.pca_dim=0"), "semantic_id.pca_dim"),
    "heads-do-not-divide-hidden": Case(
        tiny("train", "--set", "model.num_heads=3"), "not divisible by num_heads 3"
    ),
    "odd-head-width": Case(show("model.hidden_size=30"), "even head width"),
    "codebook-too-big-for-packed-ids": Case(
        show("semantic_id.cluster_levels=8", "semantic_id.codebook_size=256"), "at most 128"
    ),
    "template-unclosed": Case(show("data.text_template='{title'"), "format template"),
    "template-positional": Case(show("data.text_template='{0} {title}'"), "positional"),
    "template-attribute": Case(show("data.text_template='{title.upper}'"), "plain field names"),
    "template-index": Case(show("data.text_template='{title[0]}'"), "plain field names"),
    "template-bad-spec": Case(show("data.text_template='{title:d}'"), "format template"),
    "mixture-empty": Case(show("recommender.mixture=[]"), "nothing to train"),
    "mixture-all-zero": Case(
        show("recommender.mixture=[{task: recommendation, weight: 0}]"), "nothing to train"
    ),
    "mixture-unknown-task": Case(
        show("recommender.mixture=[{task: ranking}]"), "recommender.mixture.0.task"
    ),
    "lora-no-target-modules": Case(show("recommender.lora.target_modules=[]"), "target_modules"),
    "lora-unknown-target": Case(
        show("recommender.finetune=lora", "recommender.lora.target_modules=[nope]"),
        "--set recommender.lora.target_modules: recommender.lora.target_modules ['nope']",
    ),
    "lora-embedding-target": Case(
        show("recommender.finetune=lora", "recommender.lora.target_modules=[embed_tokens]"),
        "no such linear layer",
    ),
    "lora-dropout-one": Case(show("recommender.lora.dropout=1.0"), "recommender.lora.dropout"),
    "history-len-zero": Case(show("recommender.history_len=0"), "recommender.history_len"),
    "beam-size-zero": Case(show("recommender.beam_size=0"), "recommender.beam_size"),
    "beam-below-validation-cutoff": Case(
        show("recommender.beam_size=5"), "greater than or equal to 10"
    ),
    "negative-seed": Case(show("data.seed=-1"), "data.seed"),
    "seed-past-kmeans-range": Case(show("tokenizer_train.seed=4294967296"), "less than or equal"),
    "negative-sasrec-seed": Case(show("evaluation.sasrec_seeds=[-3]"), "sasrec_seeds.0"),
    "no-systems": Case(show("evaluation.systems=[]"), "no system to evaluate"),
    "system-twice": Case(show("evaluation.systems=[store, store]"), "listed twice"),
    "sasrec-without-seeds": Case(show("evaluation.sasrec_seeds=[]"), "sasrec_seeds is empty"),
    "sasrec-seed-twice": Case(show("evaluation.sasrec_seeds=[1, 1]"), "listed twice"),
    "sasrec-heads": Case(show("evaluation.sasrec.num_heads=3"), "not divisible"),
    "sasrec-stride": Case(show("evaluation.sasrec.train_stride=50"), "exceeds history_len"),
    "nodes-without-hostfile": Case(show("launcher.num_nodes=2"), "needs a hostfile"),
    "missing-hostfile": Case(
        show("launcher.kind=deepspeed", "launcher.hostfile=/no/such/hostfile"), "does not exist"
    ),
    "launcher-option-twice": Case(
        show("launcher.extra_args=[--master_port=1234]"), "use launcher.master_port"
    ),
    "master-port-out-of-range": Case(show("launcher.master_port=70000"), "launcher.master_port"),
    "missing-deepspeed-json": Case(deepspeed_file(None), "does not exist"),
    "deepspeed-json-not-object": Case(deepspeed_file("[1, 2]"), "JSON object"),
    "deepspeed-json-invalid": Case(deepspeed_file("{nope"), "not valid JSON"),
    "int-beyond-int64": Case(
        show("tokenizer_train.batch_size=100000000000000000000"), "does not fit in a 64-bit"
    ),
    "text-tokens-too-many": Case(show("model.max_text_tokens=100000"), "less than or equal"),
    "infinite-lr": Case(show("tokenizer_train.lr=.inf"), "finite number"),
    "nan-epochs": Case(show("recommender_train.epochs=.nan"), "finite number"),
    "infinite-min-rating": Case(show("data.min_rating=.inf"), "finite number"),
    "empty-experiment": Case(show("tracking.experiment="), "tracking.experiment"),
    "cold-start-one": Case(show("data.cold_start_fraction=1.0"), "data.cold_start_fraction"),
    "bad-cron": Case(show("service.nightly_cron=0 3 * *"), "5-field cron"),
    "cron-hour-25": Case(show("service.nightly_cron=0 25 * * *"), "25 is outside 0..23"),
    "cron-words": Case(show("service.nightly_cron=a b c d e"), "minute field 'a'"),
    "cron-step-zero": Case(show("service.nightly_cron=*/0 3 * * *"), "not a positive number"),
    "tracking-uri-unknown-scheme": Case(
        with_tracking("config", "show", "--set", "tracking.uri=foo://x"), "no tracking store"
    ),
    "tracking-uri-file-store": Case(
        with_tracking("config", "show", "--set", "tracking.uri=/tmp/mlruns"), "file store"
    ),
    "artifacts-under-a-file": Case(artifacts_under_a_file, "not a directory"),
    "env-tracking-uri-unknown": Case(
        with_tracking("ingest"), "MLflow tracking", env=(("MLFLOW_TRACKING_URI", "foo://x"),)
    ),
    "columns-the-same": Case(show("data.columns.item_id=user_id"), "different columns"),
    "column-empty": Case(show("data.columns.user_id="), "names no column"),
    "bad-timezone": Case(show("service.timezone=Mars/Olympus"), "unknown time zone"),
    "unknown-key": Case(show("data.kcorr=5"), "unknown key 'data.kcorr'"),
    # A bad --set names the --set; a bad file value names the file.
    "bad-set-value": Case(
        show("model.hidden_size=abc"), "--set model.hidden_size: Input should be"
    ),
    "bad-set-syntax": Case(show("novalue"), "key.path=value"),
    "bad-file-value": Case(
        config_file("semantic_id:\n  pca_dim: -1\n"), "bad.yaml: 'semantic_id.pca_dim'"
    ),
    "file-not-a-mapping": Case(config_file("- a\n- b\n"), "top level must be a mapping"),
    "invalid-yaml": Case(config_file("data: [\n"), "invalid YAML at line 2, column 1"),
    "config-is-a-directory": Case(config_directory, "cannot read it"),
    "config-not-utf8": Case(config_not_utf8, "not UTF-8"),
    "missing-config": Case(
        lambda tmp: ["config", "show", "-c", str(tmp / "nope.yaml")], "does not exist"
    ),
    # Workspace and database.
    "workspace-is-a-file": Case(workspace_is_a_file, "not a directory"),
    "workspace-parent-is-a-file": Case(workspace_parent_is_a_file, "not a directory"),
    "workspace-symlink-loop": Case(workspace_symlink_loop, "cannot resolve"),
    "data-path-unknown-protocol": Case(show("data.path=nosuch://x"), "no protocol 'nosuch'"),
    "data-path-backend-missing": Case(show("data.path=oci://KEY:SECRET@b/x"), "needs a package"),
    "workspace-on-s3": Case(
        lambda tmp: [*show()(tmp), "--set", "workspace=s3://bucket/ws"], "not on the local"
    ),
    "database-random-bytes-query": Case(
        database(random_bytes, "query", "SELECT 1"), "damaged or not a DuckDB"
    ),
    "database-random-bytes-ingest": Case(
        database(random_bytes, "ingest"), "damaged or not a DuckDB"
    ),
    "database-truncated": Case(
        database(truncated_database, "query", "SELECT 1"), "damaged or not a DuckDB"
    ),
    "database-is-a-directory": Case(database_is_a_directory, "is a directory"),
    "database-of-another-application": Case(
        database(foreign_database, "ingest"), "not a STORE workspace database"
    ),
    "query-before-ingest": Case(tiny("query", "SELECT 1"), "run `store ingest` first"),
    # Command lines.
    "mode-fresh": Case(
        tiny("tokenize-catalogue", "--mode", "fresh"),
        "'fresh' is not one of 'keep', 'regenerate'",
        2,
    ),
    "phase-unknown": Case(
        tiny("train", "--phase", "bogus"), "is not one of 'tokenizer', 'recommender'", 2
    ),
    "unknown-option": Case(tiny("ingest", "--bogus"), "No such option: --bogus", 2),
    "unknown-verb": Case(lambda tmp: ["nosuchverb"], "No such command", 2),
    "serve-port-out-of-range": Case(tiny("serve", "--prefect-port", "70000"), "--prefect-port", 2),
    "query-missing-sql": Case(tiny("query"), "Missing argument", 2),
    "train-before-ingest": Case(tiny("train", "--phase", "tokenizer"), "run `store ingest` first"),
    "recommender-before-tokenizer": Case(tiny("train", "--phase", "recommender"), "first"),
    "tokenize-before-train": Case(tiny("tokenize-catalogue"), "run `store train` first"),
    "evaluate-before-train": Case(tiny("evaluate"), "run `store train` first"),
    "evaluate-popularity-before-ingest": Case(
        tiny("evaluate", "--set", "evaluation.systems=[popularity]"), "ingest"
    ),
    # Readers (guarded in store_core/readers): the message names the file.
    "lcrec-5000-digit-id": Case(
        on_source("lcrec", lcrec_huge_integer_id, name="Bad"), "Bad.inter.json"
    ),
    "amazon-5000-digit-id": Case(on_source("amazon", amazon_huge_integer_id), "reviews_Bad.json"),
    "movielens-timestamp-beyond-int64": Case(
        on_source("movielens", movielens_huge_timestamp), "u.data"
    ),
    "recbole-float-timestamp-1e30": Case(
        on_source("recbole", recbole_huge_float_timestamp, name="Bad"), "Bad.inter"
    ),
    "tabular-uint64-timestamp": Case(
        on_source("tabular", tabular_uint64_timestamp), "interactions.parquet"
    ),
    "data-path-symlink-loop": Case(data_path_symlink_loop, "loop-a"),
    # The machine's files: one line naming the path (OSError).
    "workspace-cannot-be-made": Case(
        lambda tmp: [*tiny("ingest")(tmp), "--set", "workspace=/proc/store-ws"], "/proc/store-ws"
    ),
    "recommend-before-ingest": Case(tiny("recommend", "--user", "0"), "interactions.parquet"),
}

PARAMS = [pytest.param(case, id=row) for row, case in CASES.items()]


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("case", PARAMS)
def test_bad_input_is_one_error_line(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setenv("COLUMNS", "400")
    for name, value in case.env:
        monkeypatch.setenv(name, value)
    argv = case.build(tmp_path)
    result = runner.invoke(app, argv)
    output = result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{argv} raised {result.exception!r}:\n{output}"
    )
    assert result.exit_code != 0, output
    if case.exit_code is not None:
        assert result.exit_code == case.exit_code, output
    assert "Traceback" not in output, output
    lines = error_lines(output)
    assert len(lines) == 1, output
    assert case.expect in lines[0], lines[0]
    # One line: nothing after it (a multi-line message would continue below it).
    assert output.rstrip("\n").splitlines()[-1] == lines[0], output


def test_real_process_prints_one_line(tmp_path: Path) -> None:
    """The same through a real ``python -m store_cli``: a corrupt database and an
    impossible config, each one ``error:`` line on stderr, no traceback, exit 1."""
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "store.duckdb").write_bytes(os.urandom(4096))
    env = dict(os.environ, COLUMNS="400", OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    settings = ["--set", f"workspace={tmp_path / 'ws'}", "--set", "tracking.enabled=false"]
    for args in (
        ["query", "SELECT 1"],
        ["train", "--set", "semantic_id.pca_dim=-1"],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "store_cli", *args, "-c", "tiny", *settings],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        assert len(error_lines(proc.stderr)) == 1, proc.stderr
        assert proc.stdout == ""


@pytest.mark.service
def test_store_run_prints_no_traceback_for_a_user_error(tmp_path: Path) -> None:
    """``store run``: Prefect's engine logs a failed flow run's exception with its
    traceback; for a user error (a StoreError) the terminal shows the log line without
    it, then the one ``error:`` line."""
    env = dict(os.environ, COLUMNS="400", OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    sets = [f"workspace={tmp_path / 'ws'}", "tracking.enabled=false"]
    sets.append(f"data.path={tmp_path / 'missing'}")
    proc = subprocess.run(
        [sys.executable, "-m", "store_cli", "run", "-c", "tiny", "--no-evaluate"]
        + [x for s in sets for x in ("--set", s)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "Traceback" not in output, output
    (line,) = error_lines(proc.stderr)
    assert "missing" in line and "file not found" in line


def test_yaml_on_off_reads_as_the_bf16_setting(tmp_path: Path) -> None:
    """YAML 1.1 reads a bare ``on``/``off`` as a boolean; ``bf16: on`` (file or --set)
    means "on", where it used to be refused as "should be 'auto', 'on' or 'off'"."""
    from store_core.config import load_config

    path = tmp_path / "bf16.yaml"
    path.write_text("tokenizer_train:\n  bf16: on\nrecommender_train:\n  bf16: off\n")
    cfg = load_config(path, ["recommender_train.bf16=on"])
    assert (cfg.tokenizer_train.bf16, cfg.recommender_train.bf16) == ("on", "on")
    assert load_config(path).recommender_train.bf16 == "off"


def test_a_number_for_a_text_field_is_text() -> None:
    """YAML reads ``2023`` as an int; a text field takes it as "2023" (it was refused as
    "Input should be a valid string")."""
    from store_core.config import load_config

    cfg = load_config("tiny", ["data.name=2023", "tracking.experiment=2024"])
    assert (cfg.data.name, cfg.tracking.experiment) == ("2023", "2024")


@pytest.mark.parametrize(
    ("error", "expect"),
    [
        (MemoryError(), "out of memory"),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 4 TB"), "4 TB"),
        (PermissionError(13, "Permission denied", "/srv/ws"), "Permission denied: /srv/ws"),
        (OSError(28, "No space left on device", "/srv/ws/data"), "No space left on device"),
    ],
)
def test_machine_errors_are_one_line(
    error: BaseException, expect: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """What the machine refuses (memory, permissions, a full disk) is one error line from
    any verb, not a traceback (the real allocation is not attempted here: with memory
    overcommit a huge one can succeed and the kernel kill the test later)."""
    import typer

    from store_cli.guard import guard

    def fail() -> None:
        raise error

    with pytest.raises(typer.Exit) as info:
        guard(fail)
    assert info.value.exit_code == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert expect in line


def test_bugs_still_raise() -> None:
    """Anything else is a bug and keeps its traceback."""
    from store_cli.guard import guard

    def fail() -> None:
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        guard(fail)
