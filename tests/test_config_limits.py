"""Config loading is bounded: alias bombs, huge files and huge ``--set`` values fail fast
with one clear line naming the file or key (issue 14)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from store_cli.app import app
from store_core.config import (
    MAX_CONFIG_BYTES,
    MAX_OVERRIDE_BYTES,
    MAX_YAML_NODES,
    load_config,
    load_yaml,
)
from store_core.errors import ConfigError
from tests.conftest import REPO

runner = CliRunner()


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """'Billion laughs': each level a mapping holding the previous one ``width`` times, so
    ~720 bytes expand to 9^9 (~387M) values. Unknown keys are fine: an unbounded loader
    expands them before validation looks at a key (1.5 GB in 8 s before the bound)."""
    names = "abcdefghijklmnop"[:levels]
    lines = ["a: &a {" + ", ".join(f"a{j}: lol" for j in range(width)) + "}"]
    for i, name in enumerate(names[1:], start=1):
        refs = ", ".join(f"{name}{j}: *{names[i - 1]}" for j in range(width))
        lines.append(f"{name}: &{name} {{{refs}}}")
    return "\n".join(lines) + "\n"


def inline_bomb() -> str:
    """The same bomb as one flow-style line, for ``--set key=value``."""
    levels = ['&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        levels.append(f"&{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "[" + ", ".join(levels) + "]"


@pytest.fixture
def bomb_file(tmp_path: Path) -> Path:
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    assert path.stat().st_size < 1000
    return path


def test_alias_bomb_file_fails_fast_naming_the_file(bomb_file: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_config(bomb_file)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"took {elapsed:.2f} s"
    message = str(info.value)
    assert str(bomb_file) in message and "aliases" in message and "\n" not in message


def test_alias_bomb_override_fails_fast_naming_the_key() -> None:
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"override 'launcher\.extra_args'.*aliases"):
        load_config("tiny", [f"launcher.extra_args={inline_bomb()}"])
    assert time.perf_counter() - start < 2.0


def test_alias_bomb_through_the_cli_is_one_line(bomb_file: Path) -> None:
    start = time.perf_counter()
    result = runner.invoke(app, ["config", "show", "-c", str(bomb_file)])
    elapsed = time.perf_counter() - start
    assert result.exit_code == 1 and elapsed < 2.0, (result.output, elapsed)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: config file "), result.output
    result = runner.invoke(app, ["config", "show", "--set", f"data.text_fields={inline_bomb()}"])
    assert result.exit_code == 1 and "override 'data.text_fields'" in result.output


def test_alias_bomb_in_a_memory_capped_process(bomb_file: Path) -> None:
    """A real process with 1 GiB of address space: refused, not killed, under 2 s."""
    script = textwrap.dedent(
        f"""
        import resource, sys, time
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from store_core.config import load_config
        from store_core.errors import ConfigError
        start = time.perf_counter()
        try:
            load_config({str(bomb_file)!r})
        except ConfigError as exc:
            print(f"{{time.perf_counter() - start:.4f}}", exc)
            sys.exit(3)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=60,
    )
    assert proc.returncode == 3, proc.stderr
    seconds, message = proc.stdout.split(" ", 1)
    assert float(seconds) < 2.0 and "aliases" in message


def test_anchors_within_the_bound_still_work(tmp_path: Path) -> None:
    path = tmp_path / "anchors.yaml"
    path.write_text(
        "workspace: ws\n"
        "tokenizer_train: &train {epochs: 2, batch_size: 4}\n"
        "recommender_train: {<<: *train, epochs: 3}\n"
    )
    cfg = load_config(path)
    assert cfg.tokenizer_train.epochs == 2 and cfg.tokenizer_train.batch_size == 4
    assert cfg.recommender_train.epochs == 3 and cfg.recommender_train.batch_size == 4
    assert load_yaml("a: &x [1, 2]\nb: [*x, *x]", "t") == {"a": [1, 2], "b": [[1, 2], [1, 2]]}


def test_the_bound_counts_expanded_values() -> None:
    width = 10
    fits = "a: &a [" + ", ".join(["1"] * width) + "]\nb: [" + ", ".join(["*a"] * 100) + "]"
    assert len(load_yaml(fits, "t")["b"]) == 100  # ~1,100 values
    many = ", ".join(["*a"] * (MAX_YAML_NODES // width + 1))
    with pytest.raises(ConfigError, match="expands to more than"):
        load_yaml(f"a: &a [{', '.join(['1'] * width)}]\nb: [{many}]", "t")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a: &a [1, *a]", "recursive alias"),
        ("a: &a {b: *a}", "recursive alias"),
        ("[" * 60 + "]" * 60, "nests deeper than"),
        ("[" * 100_000, "nests deeper than"),
    ],
    ids=["recursive-sequence", "recursive-mapping", "deep", "very-deep"],
)
def test_recursive_and_deep_yaml_refused(text: str, match: str) -> None:
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=match):
        load_yaml(text, "config file x.yaml")
    assert time.perf_counter() - start < 2.0


def test_oversized_file_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("# padding\n" * (MAX_CONFIG_BYTES // 10 + 1) + "workspace: ws\n")
    with pytest.raises(ConfigError, match=f"config file {path} is larger than 1 MiB"):
        load_config(path)


def test_endless_file_refused_without_reading_it_all() -> None:
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="config file /dev/zero is larger than 1 MiB"):
        load_config("/dev/zero")
    assert time.perf_counter() - start < 2.0


def test_unreadable_and_binary_files_are_config_errors(tmp_path: Path) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"workspace: \xff\xfe\n")
    with pytest.raises(ConfigError, match=f"config file {binary}: not UTF-8"):
        load_config(binary)
    with pytest.raises(ConfigError, match=f"config file {tmp_path}: cannot read it"):
        load_config(tmp_path)  # a directory


def test_oversized_override_refused_naming_the_key() -> None:
    value = "x" * (MAX_OVERRIDE_BYTES + 1)
    with pytest.raises(ConfigError, match=r"override 'tracking\.experiment': the value is"):
        load_config("tiny", [f"tracking.experiment={value}"])
    assert load_config("tiny", ["tracking.experiment=" + "x" * 100]).tracking.experiment == (
        "x" * 100
    )
