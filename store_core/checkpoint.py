"""The trained-checkpoint contract: file names, typed metadata, stats, registry record, IDs.

Both training phases write one checkpoint directory, and everything after them
(recommender training, catalogue tokenization, evaluation, ``store recommend``, the
stages and the nightly job) reads it through this module only:

    <workspace>/models/tokenizer-<quantizer>/                  Phase A
        model.safetensors, config.json, tokenizer files        (store_core.model)
        codebook files                                         (store_core.quantizer)
        metadata.json                                          :class:`TokenizerMetadata`
        semantic_ids.parquet                                   :func:`write_semantic_ids`
        stats.json, codebook_usage.png                         collisions, usage, coherence
    <workspace>/models/recommender-<quantizer>-<variant>/      Phase B
        the same files (codebook, IDs and stats.json copied from Phase A at publish)
        metadata.json                                          :class:`RecommenderMetadata`
        metrics.json                                           validation curve, agreement
    <workspace>/models/recommender-<quantizer>-<variant>.mlflow_model.json
        the MLflow model version registered for that checkpoint (:func:`write_model_version`)

``metadata.json`` carries every setting that shaped what the model saw (``history_len``,
``max_text_tokens``, the prompt format, ``rec_samples``, the levels and codebook sizes,
...). Consumers take these from the checkpoint, never from the current config; a config
that says otherwise is named in a warning (:func:`warn_overrides`). The file has a
``format_version`` (:data:`FORMAT_VERSION`); metadata without one (written before it
existed, format 1) and format-2 metadata load when they hold the same fields (a field a
later format renamed is read under its old name, :data:`RENAMED_FIELDS`), else reading
it raises a one-line :class:`~store_core.errors.StoreError` that says to retrain.

A checkpoint directory is published atomically by
:func:`store_core.workspace.staged_directory` (the one directory publish; ingest's
``data/`` uses it too): readers see the old complete checkpoint or the new complete one.
The resumable trainer checkpoints (``step-N`` directories that several ranks write into
under a name they all know, sealed by ``complete.json``) are a different contract, owned
by :mod:`store_core.training_checkpoints`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, ValidationError

from store_core.config import (
    IdNormalization,
    LossNormalization,
    RecSamples,
    StoreConfig,
    TaskSpec,
)
from store_core.errors import MissingInputError, StoreError
from store_core.schemas import SEMANTIC_ID_ROW_SCHEMA
from store_core.semantic_ids import format_sid, pack_codes
from store_core.workspace import atomic_write_text

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------
# file names (each defined here only)
# --------------------------------------------------------------------------------------
METADATA_FILE = "metadata.json"
STATS_FILE = "stats.json"
SEMANTIC_IDS_FILE = "semantic_ids.parquet"
USAGE_PLOT = "codebook_usage.png"
METRICS_FILE = "metrics.json"
#: Suffix of the registry record written next to a Phase B checkpoint directory.
MODEL_VERSION_SUFFIX = ".mlflow_model.json"
#: Where format-1 checkpoints kept that record (inside the directory); read, never written.
LEGACY_MODEL_VERSION_FILE = "mlflow_model.json"

#: The ``format_version`` this release writes. 1: metadata without the field (older
#: releases); 2: the field, ``checkpoint_id``, Phase B's own copy of ``stats.json``, the
#: registry record next to the directory, ``method``/``active`` in ``semantic_ids.parquet``;
#: 3: ``cluster_levels`` (L) where formats 1 and 2 wrote ``num_levels``.
FORMAT_VERSION = 3

#: Metadata fields renamed by a format -> (the format that renamed it, the new name).
#: Reading older metadata maps the old name to the new one.
RENAMED_FIELDS: dict[str, tuple[int, str]] = {"num_levels": (3, "cluster_levels")}


# --------------------------------------------------------------------------------------
# metadata
# --------------------------------------------------------------------------------------
class TokenizerMetadata(BaseModel):
    """``metadata.json`` of a Phase A checkpoint: what the semantic IDs were made with."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    format_version: int = FORMAT_VERSION
    codebook_version: str
    quantizer: str
    last_level_assignment: str
    last_level_capacity: int
    cluster_levels: int  # L: cluster levels (an ID has L + 1 codes)
    codebook_size: int  # K
    disambiguation_size: int  # codes of the last level in use at training time
    data_manifest_items_sha256: str
    training_hash: str
    backbone: str
    max_text_tokens: int
    pack_bits: int  # bits per level in the packed integer


class RecommenderMetadata(TokenizerMetadata):
    """``metadata.json`` of a Phase B checkpoint: Phase A's fields plus how it was trained."""

    level_sizes: list[int]  # tokens per level, every level of an ID (disambiguation last)
    history_len: int
    prompt_format: int = 1  # absent: format 1, written before sequence mode
    rec_samples: RecSamples
    mixture: list[TaskSpec]
    loss_normalization: LossNormalization
    id_normalization: IdNormalization = "level"  # absent: trained before the option
    finetune: Literal["full", "lora"]
    variant: str
    phase_a_checkpoint: str  # where the IDs came from (provenance; nothing is read there)
    checkpoint_id: str | None = None  # None: format 1; matches the registry record


M = TypeVar("M", bound=TokenizerMetadata)


def weights_id(directory: str | Path) -> str:
    """The identity of the weights in ``directory`` (a Phase B checkpoint's
    ``checkpoint_id``; the registry record names it): the first 32 hex digits of the
    sha256 of ``model.safetensors``, so the same weights always get the same id and
    retrained, different weights another."""
    from store_core.model import WEIGHTS_FILE  # torch: only when weights are written
    from store_core.workspace import sha256_of

    return sha256_of(str(Path(directory) / WEIGHTS_FILE))[:32]


def write_metadata(directory: str | Path, metadata: TokenizerMetadata) -> None:
    """Write ``metadata.json`` into ``directory`` (a staging directory: not atomic)."""
    payload = metadata.model_dump(mode="json")
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    (Path(directory) / METADATA_FILE).write_text(text, encoding="utf-8")


def metadata_mtime(directory: str | Path) -> float:
    """Modification time (s since the epoch) of a checkpoint's metadata: changes when the
    checkpoint is republished (retrained). Raises OSError when there is none."""
    return (Path(directory) / METADATA_FILE).stat().st_mtime


def has_metadata(directory: str | Path) -> bool:
    """Whether ``directory`` holds a published checkpoint (its ``metadata.json``)."""
    return (Path(directory) / METADATA_FILE).is_file()


def _read(directory: str | Path, kind: type[M], missing: str) -> M:
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise StoreError(missing)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path}: unreadable checkpoint metadata ({exc})") from None
    if not isinstance(raw, dict):
        raise StoreError(f"{path}: checkpoint metadata is not a JSON object")
    version = raw.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise StoreError(
            f"{path}: checkpoint format {version!r} is newer than this release reads "
            f"({FORMAT_VERSION}): upgrade STORE or retrain with `store train`"
        )
    for old_name, (renamed_in, new_name) in RENAMED_FIELDS.items():
        if version < renamed_in and old_name in raw and new_name not in raw:
            raw[new_name] = raw.pop(old_name)
    try:
        return kind.model_validate({**raw, "format_version": version})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "?"
        raise StoreError(
            f"{path}: checkpoint metadata (format {version}) field '{field}': {first['msg']}; "
            "this checkpoint predates what this release reads: retrain with `store train`"
        ) from None


def read_tokenizer_metadata(directory: str | Path) -> TokenizerMetadata:
    """The metadata of a Phase A (or Phase B) checkpoint. StoreError (one line) when it is
    missing, unreadable, or from an incompatible release."""
    return _read(
        directory,
        TokenizerMetadata,
        f"{directory} has no Phase A checkpoint: run `store train --phase tokenizer` first",
    )


def read_recommender_metadata(directory: str | Path) -> RecommenderMetadata:
    """The metadata of a Phase B checkpoint. StoreError (one line) when it is missing, a
    Phase A checkpoint, unreadable, or from an incompatible release."""
    missing = f"{directory} is not a trained recommender: run `store train` first"
    raw_path = Path(directory) / METADATA_FILE
    if raw_path.is_file():
        try:
            is_phase_a = "level_sizes" not in json.loads(raw_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            is_phase_a = False  # _read names the problem
        if is_phase_a:
            raise StoreError(f"{directory} is a Phase A checkpoint; run `store train` (Phase B)")
    return _read(directory, RecommenderMetadata, missing)


# --------------------------------------------------------------------------------------
# training-time settings against the current config
# --------------------------------------------------------------------------------------
#: Config keys whose value a checkpoint fixed at training time -> (how to read it from a
#: config, the metadata field holding the trained value). Consumers use the metadata's
#: value; a Phase A checkpoint has the fields its phase fixed (not ``history_len``, ...).
TRAINED_SETTINGS: dict[str, tuple[Callable[[StoreConfig], object], str]] = {
    "recommender.history_len": (lambda c: c.recommender.history_len, "history_len"),
    "recommender.rec_samples": (lambda c: c.recommender.rec_samples, "rec_samples"),
    "recommender.id_normalization": (
        lambda c: c.recommender.id_normalization,
        "id_normalization",
    ),
    "model.max_text_tokens": (lambda c: c.model.max_text_tokens, "max_text_tokens"),
    "semantic_id.cluster_levels": (lambda c: c.semantic_id.cluster_levels, "cluster_levels"),
}
# Not semantic_id.codebook_size: the quantizer caps K for small catalogues, so the
# checkpoint's K (``codebook_size``, ``level_sizes``) legitimately differs from the config.


def config_overrides(
    metadata: TokenizerMetadata, cfg: StoreConfig
) -> list[tuple[str, object, object]]:
    """(key, configured, trained) for every training-time setting ``cfg`` sets otherwise
    than the checkpoint whose ``metadata`` this is."""
    out: list[tuple[str, object, object]] = []
    for key, (configured_of, name) in TRAINED_SETTINGS.items():
        if name not in type(metadata).model_fields:
            continue
        configured, trained = configured_of(cfg), getattr(metadata, name)
        if configured != trained:
            out.append((key, configured, trained))
    return out


def warn_overrides(
    metadata: TokenizerMetadata,
    cfg: StoreConfig,
    directory: str,
    already: set[str] | None = None,
) -> list[str]:
    """Log one warning per training-time setting ``cfg`` sets differently from the
    checkpoint in ``directory`` (the checkpoint's value is what is used); returns the
    keys. Keys in ``already`` are not repeated (and are added to it)."""
    keys: list[str] = []
    for key, configured, trained in config_overrides(metadata, cfg):
        keys.append(key)
        if already is not None:
            if key in already:
                continue
            already.add(key)
        logger.warning(  # not "key=value": the redaction filter would hide *_tokens=...
            "%s in the config (%s) differs from the %s this checkpoint was trained with: "
            "the checkpoint's %s is used (%s)",
            key,
            configured,
            trained,
            trained,
            directory,
        )
    return keys


# --------------------------------------------------------------------------------------
# stats, publish, registry record
# --------------------------------------------------------------------------------------
def write_stats(directory: str | Path, stats: dict[str, Any]) -> None:
    """Write Phase A's ``stats.json`` into ``directory`` (a staging directory)."""
    text = json.dumps(stats, indent=2, sort_keys=True) + "\n"
    (Path(directory) / STATS_FILE).write_text(text, encoding="utf-8")


def read_stats(directory: str | Path) -> dict[str, Any] | None:
    """The clustering's ``stats.json`` of a checkpoint (Phase B keeps a copy), or None.

    A format-1 Phase B checkpoint has no copy; its Phase A directory is read then."""
    path = Path(directory) / STATS_FILE
    if not path.is_file():
        meta = Path(directory) / METADATA_FILE
        if not meta.is_file():
            return None
        raw = json.loads(meta.read_text(encoding="utf-8"))
        if raw.get("format_version", 1) != 1 or not raw.get("phase_a_checkpoint"):
            return None
        path = Path(str(raw["phase_a_checkpoint"])) / STATS_FILE
        if not path.is_file():
            return None
    stats: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return stats


def copy_from_phase_a(source: str | Path, staging: str | Path) -> None:
    """Copy what a Phase B checkpoint keeps of its Phase A one (codebook, semantic IDs,
    stats) from ``source`` into ``staging``, so it never reads ``source`` again."""
    import shutil

    from store_core.quantizer import ARRAYS_FILE, HEADER_FILE  # the codebook's files

    for name in (ARRAYS_FILE, HEADER_FILE, SEMANTIC_IDS_FILE, STATS_FILE):
        shutil.copy2(Path(source) / name, Path(staging) / name)


def model_version_path(directory: str | Path) -> Path:
    """Where the registry record of the checkpoint ``directory`` lives (next to it)."""
    path = Path(directory)
    return path.with_name(path.name + MODEL_VERSION_SUFFIX)


@dataclass(frozen=True)
class RegisteredVersion:
    """The MLflow model version a Phase B checkpoint was registered as."""

    name: str
    version: str
    run_id: str
    source: str
    uri: str  # models:/<name>/<version>
    tags: dict[str, str]
    checkpoint_id: str | None  # the checkpoint's, at registration (None: format 1)

    @classmethod
    def from_json(cls, raw: dict[str, Any], checkpoint_id: str | None) -> RegisteredVersion:
        return cls(
            name=str(raw["name"]),
            version=str(raw["version"]),
            run_id=str(raw["run_id"]),
            source=str(raw["source"]),
            uri=str(raw["uri"]),
            tags={str(k): str(v) for k, v in dict(raw.get("tags", {})).items()},
            checkpoint_id=checkpoint_id,
        )


def write_model_version(directory: str | Path, record: RegisteredVersion | None) -> None:
    """Record which MLflow model version the checkpoint in ``directory`` is, next to it
    (:func:`model_version_path`); None: none is, and any earlier record is removed. The
    record names the checkpoint's ``checkpoint_id``, so it stops applying once the
    directory is retrained."""
    target = model_version_path(directory)
    if record is None:
        target.unlink(missing_ok=True)
        return
    atomic_write_text(target, json.dumps(asdict(record), indent=2))


def read_model_version(directory: str | Path) -> RegisteredVersion | None:
    """The registry record of the checkpoint in ``directory``, or None when it has none
    (or the record belongs to weights that have since been retrained). Format-1
    checkpoints kept the record inside the directory; it is read from there."""
    if not has_metadata(directory):
        return None
    current = read_recommender_metadata(directory).checkpoint_id
    target = model_version_path(directory)
    if current is not None:
        if not target.is_file():
            return None
        raw = json.loads(target.read_text(encoding="utf-8"))
        return (
            RegisteredVersion.from_json(raw, current)
            if raw.get("checkpoint_id") == current
            else None
        )
    legacy = Path(directory) / LEGACY_MODEL_VERSION_FILE
    if legacy.is_file():
        return RegisteredVersion.from_json(json.loads(legacy.read_text(encoding="utf-8")), None)
    return None


# --------------------------------------------------------------------------------------
# semantic IDs
# --------------------------------------------------------------------------------------
def semantic_id_rows(
    item_ids: Sequence[str],
    codes: np.ndarray,
    hashes: Sequence[str | None],
    bits: int,
    methods: Sequence[str],
    active: Sequence[bool],
) -> pa.Table:
    """Rows of :data:`store_core.schemas.SEMANTIC_ID_ROW_SCHEMA`: ``codes`` [N, L+1]
    (every level), ``sid`` and ``packed`` (``bits`` per level) derived from them."""
    return pa.Table.from_pydict(
        {
            "item_id": list(item_ids),
            "codes": codes.astype(np.int32).tolist(),
            "sid": [format_sid(row) for row in codes.tolist()],
            "packed": pack_codes(codes, bits=bits),
            "method": list(methods),
            "active": list(active),
            "content_hash": list(hashes),
        },
        schema=SEMANTIC_ID_ROW_SCHEMA,
    )


#: ``method`` of the IDs the clustering gave the trained catalogue.
METHOD_CLUSTER = "cluster"


def write_semantic_ids(
    directory: str | Path, item_ids: list[str], codes: np.ndarray, hashes: list[str], bits: int
) -> None:
    """Write the clustering's IDs (``codes`` [N, L+1]) as ``semantic_ids.parquet``."""
    n = len(item_ids)
    table = semantic_id_rows(item_ids, codes, hashes, bits, [METHOD_CLUSTER] * n, [True] * n)
    pq.write_table(table, Path(directory) / SEMANTIC_IDS_FILE, compression="zstd")


def read_semantic_ids(directory: str | Path) -> pa.Table:
    """The item_id -> semantic ID table of a checkpoint, as
    :data:`store_core.schemas.SEMANTIC_ID_ROW_SCHEMA` (files of format 1 lack ``method``
    and ``active``: every row is a clustered, active one). StoreError when missing."""
    path = Path(directory) / SEMANTIC_IDS_FILE
    if not path.exists():
        raise MissingInputError(str(path), "train --phase tokenizer")
    table = pq.read_table(path)
    n = table.num_rows
    if "method" not in table.column_names:
        table = table.append_column("method", pa.array([METHOD_CLUSTER] * n, pa.string()))
    if "active" not in table.column_names:
        table = table.append_column("active", pa.array([True] * n, pa.bool_()))
    return table.select(SEMANTIC_ID_ROW_SCHEMA.names).cast(SEMANTIC_ID_ROW_SCHEMA)
