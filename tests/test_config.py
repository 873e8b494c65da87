from __future__ import annotations

from pathlib import Path

import pytest

from store_core.config import CONFIG_DIR, StoreConfig, apply_overrides, load_config
from store_core.errors import ConfigError

SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def test_required_configs_are_shipped() -> None:
    names = {p.stem for p in SHIPPED}
    assert {"ml-100k", "scientific", "tiny"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, StoreConfig)
    assert Path(cfg.workspace).is_absolute()
    # The header names the command that uses the file.
    assert "store " in path.read_text().splitlines()[1]


def test_default_config_is_movielens() -> None:
    cfg = load_config(None)
    assert cfg.data.dataset == "movielens-100k"


def test_relative_data_path_resolves_against_the_config_file() -> None:
    cfg = load_config("tiny")
    assert cfg.data.path is not None
    assert Path(cfg.data.path) == (CONFIG_DIR / "../../tests/data/tiny").resolve()


def test_overrides_parse_yaml_values_and_nest() -> None:
    cfg = load_config(
        "tiny",
        ["data.kcore=5", "data.cold_start_fraction=0.1", "tracking.enabled=false", "workspace=/x"],
    )
    assert cfg.data.kcore == 5
    assert cfg.data.cold_start_fraction == pytest.approx(0.1)
    assert cfg.tracking.enabled is False
    assert cfg.workspace == "/x"


def test_unknown_key_names_the_key_and_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  format: lcrec\n  kcorr: 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert "data.kcorr" in str(info.value)
    assert str(bad) in str(info.value)


def test_unknown_override_key_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'data\.nope'"):
        load_config("tiny", ["data.nope=1"])


def test_wrong_type_is_reported_with_its_key() -> None:
    with pytest.raises(ConfigError, match=r"data\.kcore"):
        load_config("tiny", ["data.kcore=many"])


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        apply_overrides({}, ["novalue"])


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/no/such/config.yaml")


def test_config_is_frozen() -> None:
    cfg = load_config("tiny")
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError
        cfg.workspace = "/elsewhere"  # type: ignore[misc]


def test_relative_workspace_resolves_against_the_workspace_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORE_WORKSPACE_ROOT", str(tmp_path))
    assert load_config("scientific").workspace == str(tmp_path / "workspace-scientific")
    assert load_config("tiny", ["workspace=/abs/ws"]).workspace == "/abs/ws"
    monkeypatch.delenv("STORE_WORKSPACE_ROOT")
    monkeypatch.chdir(tmp_path / "..")
    assert load_config("tiny").workspace == str((tmp_path / ".." / "workspace-tiny").resolve())


def test_service_schedule_is_validated() -> None:
    cfg = load_config("tiny", ["service.nightly_cron=30 2 * * 1-5", "service.timezone=Asia/Tokyo"])
    assert (cfg.service.nightly_cron, cfg.service.timezone) == ("30 2 * * 1-5", "Asia/Tokyo")
    with pytest.raises(ConfigError, match=r"service\.nightly_cron"):
        load_config("tiny", ["service.nightly_cron=0 3 * *"])
    with pytest.raises(ConfigError, match="unknown time zone 'Mars/Olympus'"):
        load_config("tiny", ["service.timezone=Mars/Olympus"])
