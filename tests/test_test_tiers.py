"""The test tiers: the markers the Makefile's targets select by are registered (pytest
takes an unknown name in ``-m`` silently and would run everything), and ``make test``
stays the suite CI runs."""

from __future__ import annotations

import re
import tomllib

from tests.conftest import REPO


def registered_markers() -> set[str]:
    options = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]
    return {line.split(":", 1)[0] for line in options["ini_options"]["markers"]}


def pytest_lines() -> dict[str, str]:
    """make target -> the pytest command line it runs."""
    makefile = (REPO / "Makefile").read_text()
    return dict(re.findall(r"^(test[\w-]*):.*\n\t\$\(BIN\)/pytest (.*)$", makefile, re.M))


def test_every_tier_selects_by_registered_markers() -> None:
    lines = pytest_lines()
    assert set(lines) == {"test", "test-fast", "test-slow"}
    markers = registered_markers()
    assert {"slow", "pipeline", "service"} <= markers
    for target, line in lines.items():
        expression = re.search(r"-m (\"[^\"]*\"|\S+)", line)
        if expression is None:
            continue
        names = set(re.findall(r"\w+", expression.group(1))) - {"not", "and", "or"}
        assert names and names <= markers, (target, names - markers)
    assert "-m" not in lines["test"]  # the whole suite CI runs: addopts' `-m 'not slow'`
    assert lines["test-fast"].count("not ") == 3


def test_ci_runs_make_test_with_strict_markers() -> None:
    options = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]
    addopts = options["ini_options"]["addopts"]
    assert "--strict-markers" in addopts and "-m 'not slow'" in addopts
    assert (REPO / ".ci" / "run").read_text().strip().endswith("make test")
