"""Typed, validated configuration.

Precedence: code defaults < YAML file < ``--set a.b=c`` overrides (CLI or deployment
parameters). Every model is frozen and rejects unknown keys; load errors name the file
and the offending key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from store_core.errors import ConfigError

#: Directory holding the shipped YAML configs (``infra/configs`` in a source checkout).
CONFIG_DIR = Path(__file__).resolve().parent.parent / "infra" / "configs"

DataFormat = Literal["movielens", "lcrec", "recbole", "p5", "amazon", "tabular"]


class StrictModel(BaseModel):
    """Frozen model that rejects unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ColumnMapping(StrictModel):
    """Column names of a generic Parquet/CSV source (format ``tabular``)."""

    user_id: str = Field("user_id", description="Interactions column holding the user id.")
    item_id: str = Field("item_id", description="Column holding the item id (both files).")
    timestamp: str | None = Field(
        "timestamp", description="Interactions column with unix seconds; null if absent."
    )
    text_fields: list[str] | None = Field(
        None, description="Items columns kept as text fields; default: every other column."
    )


class DataConfig(StrictModel):
    """Where the catalogue and interactions come from and how they are turned into Parquet."""

    dataset: Literal["movielens-100k"] | None = Field(
        None,
        description="A built-in dataset fetched automatically (checksum-verified, cached in "
        "the workspace). When set, `format` and `path` are ignored.",
    )
    format: DataFormat = Field("movielens", description="Source format (one reader each).")
    path: str | None = Field(
        None, description="fsspec URI of the source directory (local path, memory://, s3://...)."
    )
    name: str | None = Field(
        None,
        description="File name prefix inside `path` for lcrec/recbole (e.g. 'Scientific' for "
        "Scientific.inter.json); inferred when the directory holds exactly one dataset.",
    )
    interactions_file: str | None = Field(
        None,
        description="Interactions file name inside `path` (p5: user_sequence.txt; amazon: the "
        "review JSON lines; tabular: the Parquet/CSV). Default per format.",
    )
    items_file: str | None = Field(
        None,
        description="Item metadata file name inside `path` (p5/amazon/tabular). Default per "
        "format.",
    )
    columns: ColumnMapping = Field(
        default_factory=ColumnMapping, description="Column mapping for format `tabular`."
    )
    min_rating: float | None = Field(
        None, description="Keep only interactions with rating >= this (formats with ratings)."
    )
    kcore: int = Field(0, ge=0, description="Iterative k-core filter on users and items (0 = off).")
    text_template: str | None = Field(
        None,
        description="Python format string rendering an item's `text` from its fields, e.g. "
        "'{title}. {categories}'. Missing fields render empty. Default: 'name: value' for "
        "each non-empty field, joined with '; '.",
    )
    max_text_chars: int = Field(
        2000, gt=0, description="Rendered text is truncated to this many characters."
    )
    missing_items: Literal["drop", "fail"] = Field(
        "drop",
        description="Interactions whose item has no metadata: drop them (counted in the "
        "manifest) or fail.",
    )
    cold_start_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Fraction of items held out of all training (train/valid rows removed) "
        "to measure cold-start recommendation.",
    )
    seed: int = Field(0, description="Seed for the cold-start item sample.")


class TrackingConfig(StrictModel):
    """MLflow tracking."""

    enabled: bool = Field(True, description="Log runs to MLflow.")
    uri: str | None = Field(
        None,
        description="MLflow tracking URI. Default: MLFLOW_TRACKING_URI if set, else a SQLite "
        "file in the workspace (<workspace>/mlflow/mlflow.db).",
    )
    experiment: str = Field("store", description="MLflow experiment name.")
    artifact_location: str | None = Field(
        None,
        description="Artifact root for a newly created experiment. Default: "
        "<workspace>/mlflow/artifacts.",
    )


class StoreConfig(StrictModel):
    """The whole pipeline's configuration (one YAML file)."""

    workspace: str = Field(
        "./workspace",
        description="Directory where data/, models/, store.duckdb and the MLflow store live.",
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Ingestion.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow.")

    @field_validator("workspace")
    @classmethod
    def _expand_workspace(cls, value: str) -> str:
        if "://" in value:
            return value
        return str(Path(os.path.expanduser(value)).resolve())

    # Derived locations -------------------------------------------------------------
    @property
    def data_dir(self) -> str:
        return f"{self.workspace}/data"

    @property
    def duckdb_path(self) -> str:
        return f"{self.workspace}/store.duckdb"


def _parse_value(raw: str) -> Any:
    """Parse the right-hand side of ``--set key=value`` as YAML (numbers, bools, lists)."""
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to a nested dict (returns a new dict)."""
    result: dict[str, Any] = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.path=value")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override '{item}' has an empty key")
        node = result
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
                node[part] = child
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
            node = child
        node[parts[-1]] = _parse_value(raw)
    return result


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def resolve_config_path(path: str | os.PathLike[str] | None) -> Path:
    """A config path as given, or a shipped config by name (``tiny`` -> infra/configs/tiny.yaml)."""
    if path is None:
        return CONFIG_DIR / "ml-100k.yaml"
    candidate = Path(path)
    if candidate.exists():
        return candidate
    shipped = CONFIG_DIR / f"{path}.yaml"
    if shipped.exists():
        return shipped
    raise ConfigError(f"config file {path} does not exist (nor is it a shipped config name)")


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None
) -> StoreConfig:
    """Load a YAML config, apply overrides, validate.

    Relative ``data.path`` values in the file are resolved against the file's directory, so
    a config works from any current directory.
    """
    config_path = resolve_config_path(path)
    try:
        raw = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {config_path}: invalid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {config_path}: top level must be a mapping")
    data_section = raw.get("data")
    if isinstance(data_section, dict):
        rel = data_section.get("path")
        if isinstance(rel, str) and "://" not in rel and not os.path.isabs(rel):
            data_section["path"] = str((config_path.parent / rel).resolve())
    merged = apply_overrides(raw, overrides or [])
    return validate_config(merged, source=str(config_path))


def validate_config(data: dict[str, Any], source: str = "<config>") -> StoreConfig:
    """Validate a dict into a :class:`StoreConfig`, with errors naming the source and key."""
    try:
        return StoreConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                lines.append(f"unknown key '{key}'")
            else:
                lines.append(f"'{key}': {err['msg']}")
        raise ConfigError(f"config file {source}: " + "; ".join(lines)) from None
