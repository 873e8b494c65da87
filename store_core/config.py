"""Typed, validated configuration.

Precedence: code defaults < YAML file < ``--set a.b=c`` overrides (CLI or deployment
parameters). Every model is frozen and rejects unknown keys; load errors name the file
and the offending key, or the ``--set`` that gave the value.

Everything a config can say is checked when it loads, so an impossible value or
combination fails in one line before any stage starts, not inside training or
evaluation: ranges, rules across the fields of a section (heads vs hidden size, codebook
size vs the packed-ID bits, launcher options) and across sections (LoRA targets vs the
built model), and the things a config points at that must already exist (DeepSpeed JSON,
hostfile, fsspec protocols, a local workspace directory).
"""

from __future__ import annotations

import json
import os
import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from store_core.errors import ConfigError

#: Directory holding the shipped YAML configs (``infra/configs`` in a source checkout).
CONFIG_DIR = Path(__file__).resolve().parent.parent / "infra" / "configs"

#: The largest seed accepted: numpy's generators refuse negative seeds and scikit-learn's
#: k-means a ``random_state`` past 2**32 - 1 (level l clusters with ``seed + l``).
MAX_SEED = 2**31 - 1

#: A random seed (0 .. :data:`MAX_SEED`).
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]

DataFormat = Literal["movielens", "lcrec", "recbole", "p5", "amazon", "tabular"]


def check_heads(hidden_size: int, num_heads: int) -> None:
    """Raise ValueError unless ``num_heads`` splits ``hidden_size`` into equal heads of an
    even width (rotary position embeddings rotate pairs of dimensions)."""
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if (hidden_size // num_heads) % 2:
        raise ValueError(
            f"hidden_size {hidden_size} / num_heads {num_heads} = {hidden_size // num_heads} "
            "per head; rotary position embeddings need an even head width"
        )


def packed_bits_per_code(cluster_levels: int) -> int:
    """Bits per code in the packed semantic-ID column: ``cluster_levels`` (L) cluster codes
    plus the disambiguation code share 63 bits, at most 16 each (as
    :func:`store_core.item_tokenizer.pack_bits` packs the ``id_length`` = L + 1 codes)."""
    return min(16, 63 // (cluster_levels + 1))


#: Config keys a release renamed -> their new name. The old key is refused (never read as
#: the new one), with a message naming the new key.
RENAMED_KEYS: dict[str, str] = {"semantic_id.num_levels": "semantic_id.cluster_levels"}


class _AnyField(dict[str, str]):
    """Every field name maps to one value (used to try a template before any item)."""

    def __init__(self, value: str) -> None:
        super().__init__()
        self._value = value

    def __missing__(self, key: str) -> str:
        return self._value


def check_text_template(template: str) -> None:
    """Raise ValueError unless ``template`` renders with plain named fields only, both
    when a field is missing (renders empty) and when it holds text."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template)]
        if any(name is not None and (name == "" or name.isdigit()) for name in names):
            raise IndexError("positional fields ({} or {0}); name a field, e.g. {title}")
        if any(name and ("." in name or "[" in name) for name in names):
            raise AttributeError("only plain field names ({title}), no .attribute or [index]")
        for value in ("", "x"):
            template.format_map(_AnyField(value))
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as exc:
        raise ValueError(f"not a usable format template {template!r}: {exc}") from None


def check_fsspec_protocols(uri: str) -> None:
    """Raise ValueError unless fsspec knows every protocol of ``uri`` (``s3://``,
    ``simplecache::s3://``...) and the package implementing it is installed. The message
    names the protocol, not the URI (which may hold credentials)."""
    import fsspec

    if "://" not in uri:
        return
    for part in uri.split("::"):
        protocol = part.split("://", 1)[0] if "://" in part else part
        try:
            fsspec.get_filesystem_class(protocol)
        except ValueError:
            raise ValueError(f"fsspec knows no protocol {protocol!r}") from None
        except ImportError as exc:
            raise ValueError(f"protocol {protocol!r} needs a package: {exc}") from None


def check_json_object_file(path: str, what: str) -> None:
    """Raise ValueError unless ``path`` is a readable file holding one JSON object."""
    file = Path(path)  # as store_core.trainer opens it
    try:
        if not file.is_file():
            raise ValueError(f"{what} {path} does not exist or is not a file")
        if file.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"{what} {path} is larger than {MAX_CONFIG_BYTES} bytes")
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{what} {path}: cannot read it: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what} {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must hold a JSON object")


def _choices(kind: Any) -> str:
    return ", ".join(repr(v) for v in get_args(kind))


def _refuse_repeats(values: list[Any], what: str) -> None:
    seen: set[Any] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"{what} {value!r} is listed twice")
        seen.add(value)


#: MLflow tracking-store URI schemes (mlflow's tracking store registry); a plain path or
#: ``file:`` is MLflow's file store, which it refuses unless MLFLOW_ALLOW_FILE_STORE is set.
_TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")
_TRACKING_NAMES = ("databricks", "databricks-uc", "uc")


def check_tracking_uri(uri: str) -> None:
    """Raise ValueError unless MLflow can open a tracking store at ``uri``."""
    if uri in _TRACKING_NAMES:
        return
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    if scheme in ("", "file"):
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true"):
            return
        raise ValueError(
            f"{uri!r} is MLflow's file store, which this MLflow refuses; use a database "
            "URI such as sqlite:///path/to/mlflow.db, or an http(s):// tracking server"
        )
    if scheme not in _TRACKING_SCHEMES and not scheme.startswith("databricks"):
        raise ValueError(
            f"{uri!r}: MLflow has no tracking store for scheme '{scheme}' (use one of "
            + ", ".join(_TRACKING_SCHEMES)
            + ")"
        )


#: (name, lowest, highest) of the five cron fields; day-of-week 7 is Sunday like 0.
_CRON_FIELDS = (
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day-of-month", 1, 31),
    ("month", 1, 12),
    ("day-of-week", 0, 7),
)
_CRON_NAMES = {
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    "sun", "mon", "tue", "wed", "thu", "fri", "sat",
}  # fmt: skip


def _cron_field_problem(field: str, low: int, high: int) -> str | None:
    """Why one cron field is not a list of ``*``, ``N``, ``N-M`` or names, each with an
    optional ``/step``, numbers within ``low..high``; None when it is. A light check
    (Prefect parses the schedule when ``store serve`` deploys it): it catches typos and
    out-of-range numbers at load time."""
    for item in field.split(","):
        base, _, step = item.partition("/")
        if step and not (step.isdigit() and int(step) >= 1):
            return f"step {step!r} is not a positive number"
        if base in ("*", "?"):
            continue
        for bound in base.split("-", 1):
            if bound.lower() in _CRON_NAMES or any(c in bound.upper() for c in "LW#"):
                continue  # month/day names; croniter's L (last), W (weekday), # (nth)
            if not bound.isdigit():
                return f"{bound!r} is not a number, a name or *"
            if not low <= int(bound) <= high:
                return f"{bound} is outside {low}..{high}"
    return None


def _local_problem(path: str) -> str | None:
    from store_core.workspace import local_directory_problem

    return local_directory_problem(path)


class StrictModel(BaseModel):
    """Frozen model that rejects unknown keys and non-finite floats (``.inf``, ``.nan``).
    A number given for a text field is read as text (YAML reads ``name: 2023`` as an
    int)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, allow_inf_nan=False, coerce_numbers_to_str=True
    )

    @field_validator("*", mode="after")
    @classmethod
    def _int64(cls, value: Any) -> Any:
        """Integers (alone or in a list) must fit in 64 bits: every one ends up in a C
        library (tokenizers, torch, numpy, scikit-learn) that overflows past that."""
        for number in value if isinstance(value, list) else [value]:
            if isinstance(number, int) and not -(2**63) <= number < 2**63:
                raise ValueError(f"{number} does not fit in a 64-bit integer")
        return value


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

    @model_validator(mode="after")
    def _distinct_columns(self) -> ColumnMapping:
        named = {"user_id": self.user_id, "item_id": self.item_id}
        if self.timestamp is not None:
            named["timestamp"] = self.timestamp
        for key, column in named.items():
            if not column:
                raise ValueError(f"{key} names no column (empty)")
        if len(set(named.values())) < len(named):
            raise ValueError(f"user_id, item_id and timestamp must be different columns: {named}")
        return self


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
    seed: Seed = Field(0, description="Seed for the cold-start item sample.")

    @field_validator("path")
    @classmethod
    def _readable_protocol(cls, value: str | None) -> str | None:
        if value is not None:
            check_fsspec_protocols(value)
        return value

    @field_validator("text_template")
    @classmethod
    def _renderable_template(cls, value: str | None) -> str | None:
        if value is not None:
            check_text_template(value)
        return value


class TrackingConfig(StrictModel):
    """MLflow tracking."""

    enabled: bool = Field(True, description="Log runs to MLflow.")
    uri: str | None = Field(
        None,
        description="MLflow tracking URI. Default: MLFLOW_TRACKING_URI if set, else a SQLite "
        "file in the workspace (<workspace>/mlflow/mlflow.db).",
    )
    experiment: str = Field("store", min_length=1, description="MLflow experiment name.")
    artifact_location: str | None = Field(
        None,
        description="Artifact root for a newly created experiment. Default: "
        "<workspace>/mlflow/artifacts.",
    )
    registered_model: str | None = Field(
        None,
        min_length=1,
        description="MLflow model-registry name the trained recommender is registered under "
        "(a new version per training run). Default: '<experiment>-recommender'.",
    )

    @model_validator(mode="after")
    def _usable_store(self) -> TrackingConfig:
        if self.enabled and self.uri is not None:
            check_tracking_uri(self.uri)
        if self.enabled and self.artifact_location is not None:
            location = self.artifact_location.removeprefix("file://")
            if "://" not in location:
                problem = _local_problem(os.path.expanduser(location))
                if problem is not None:
                    raise ValueError(f"artifact_location must be a directory: {problem}")
        return self


#: The most tokens of one item's text: the built model sizes its position table from it.
MAX_TEXT_TOKENS = 1 << 16


class ModelConfig(StrictModel):
    """The backbone causal LM: a local/hub pretrained model, or a small one built here."""

    name_or_path: str | None = Field(
        None,
        description="Hugging Face model directory or hub name (e.g. Qwen/Qwen2.5-0.5B). "
        "None builds a small Llama-architecture model from the fields below, with a "
        "byte-level BPE tokenizer trained on the catalogue text (no download).",
    )
    vocab_size: int = Field(
        4096, gt=256, description="BPE vocabulary size of the tokenizer trained here."
    )
    hidden_size: int = Field(128, gt=0, description="Hidden size of the built model.")
    num_layers: int = Field(4, gt=0, description="Transformer layers of the built model.")
    num_heads: int = Field(
        4,
        gt=0,
        description="Attention heads of the built model; must split hidden_size into heads "
        "of an even width (rotary position embeddings).",
    )
    intermediate_size: int = Field(384, gt=0, description="MLP width of the built model.")
    max_text_tokens: int = Field(
        96,
        gt=4,
        le=MAX_TEXT_TOKENS,
        description="Item text is truncated to this many tokens for the LLM (at most 65536; "
        "the text itself is cut at data.max_text_chars first).",
    )

    @model_validator(mode="after")
    def _buildable(self) -> ModelConfig:
        if self.name_or_path is None:  # the fields below shape the model built here
            check_heads(self.hidden_size, self.num_heads)
        return self


class SemanticIdConfig(StrictModel):
    """How items become semantic IDs (Phase A dense tokens + clustering)."""

    cluster_levels: int = Field(
        3,
        ge=1,
        le=8,
        description="L: cluster levels, the dense tokens per item and the cluster codes of "
        "its semantic ID (the ID has L + 1 codes: the disambiguation code last).",
    )
    codebook_size: int = Field(
        256,
        ge=2,
        description="K: codes per level (capped for small catalogues); at most "
        "2^min(16, 63 // (cluster_levels + 1)), the bits each code gets in the packed ID column.",
    )
    quantizer: Literal["store", "rqkmeans"] = Field(
        "store",
        description="'store': per-position PCA + k-means on the L dense tokens (the paper); "
        "'rqkmeans': residual k-means over one text embedding (TIGER-style baseline).",
    )
    pca_dim: int | None = Field(
        32, ge=1, description="PCA components before k-means (None: no PCA)."
    )
    diversity_weight: float = Field(
        0.1,
        ge=0.0,
        description="Weight of the term keeping an item's L dense tokens apart (0 = off).",
    )
    kmeans_n_init: int = Field(4, ge=1, description="k-means restarts per level.")
    last_level_assignment: Literal["nearest", "capacity"] = Field(
        "capacity",
        description="How the catalogue's last cluster level is chosen. 'nearest': every "
        "level takes its nearest centroid, so similar items often share all L codes and "
        "only the meaningless disambiguation code tells them apart (34% of Amazon "
        "Scientific items). 'capacity': levels 1..L-1 stay nearest; inside each group of "
        "items with equal first L-1 codes, each last code holds at most "
        "`last_level_capacity` items, chosen at least total distance (exact assignment, "
        "LC-Rec's collision handling; store_core.last_level_assignment).",
    )
    last_level_capacity: int = Field(
        1,
        ge=1,
        description="Items per last code inside a group of equal first L-1 codes under "
        "'capacity' (1 = no two items share their L codes while a group fits in K).",
    )

    @model_validator(mode="after")
    def _fits_packed_ids(self) -> SemanticIdConfig:
        bits = packed_bits_per_code(self.cluster_levels)
        if self.codebook_size > 1 << bits:
            raise ValueError(
                f"codebook_size {self.codebook_size} does not fit the packed semantic-ID "
                f"column: with cluster_levels {self.cluster_levels} each of the "
                f"{self.cluster_levels + 1} "
                f"codes gets {bits} bits, so codebook_size may be at most {1 << bits}"
            )
        return self


class DeepSpeedSettings(StrictModel):
    """DeepSpeed ZeRO (the default training engine)."""

    enabled: bool = Field(
        True, description="Train through DeepSpeed ZeRO; false runs the same loop in plain torch."
    )
    stage: Literal[2, 3] = Field(2, description="ZeRO stage; picks infra/deepspeed/zero<N>.json.")
    config_file: str | None = Field(
        None, description="A DeepSpeed JSON to use instead of the shipped one for `stage`."
    )

    @model_validator(mode="after")
    def _readable_config_file(self) -> DeepSpeedSettings:
        if self.enabled and self.config_file is not None:
            check_json_object_file(self.config_file, "config_file")
        return self


class TrainConfig(StrictModel):
    """One training phase of the shared trainer."""

    epochs: float = Field(1.0, gt=0, description="Passes over the training samples.")
    max_steps: int | None = Field(
        None, gt=0, description="Stop after this many optimizer steps (overrides epochs)."
    )
    batch_size: int = Field(32, gt=0, description="Micro-batch size per process.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps, then cosine decay.")
    grad_clip: float = Field(1.0, ge=0, description="Gradient norm clipping (0 = off).")
    bf16: Literal["auto", "on", "off"] = Field(
        "auto", description="bf16 mixed precision: auto = on where a GPU supports it."
    )
    seed: Seed = Field(0, description="Seed for init, data order and clustering.")
    checkpoint_every: int = Field(
        200, gt=0, description="Save a resumable checkpoint every N optimizer steps."
    )
    log_every: int = Field(10, gt=0, description="Log metrics every N optimizer steps.")
    eval_every: int | None = Field(
        None,
        gt=0,
        description="Validate (and early-stop) every N optimizer steps instead of at each "
        "epoch end (phases with validation only); each validation is a round, recorded "
        "with its fractional epoch.",
    )
    group_by_length: bool = Field(
        True,
        description="Batch samples of similar length together (each epoch's shuffled order "
        "is sorted by length inside mega-batches of 50 batches, then the batches are "
        "shuffled: transformers' length-grouped sampler), so short catalogue samples are "
        "not padded to long recommendation windows. Phases that pass sample lengths only.",
    )
    deepspeed: DeepSpeedSettings = Field(
        default_factory=DeepSpeedSettings, description="DeepSpeed ZeRO settings."
    )

    @field_validator("bf16", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        if isinstance(value, bool):  # YAML 1.1 reads a bare on/off as true/false
            return "on" if value else "off"
        return value


#: The cutoff of the validation metric (NDCG@10) that picks the best epoch.
VALIDATION_CUTOFF = 10

TaskName = Literal["recommendation", "alignment", "reconstruction", "title_history"]
LossNormalization = Literal["token", "target"]
RecSamples = Literal["sequence", "prefix"]
IdNormalization = Literal["level", "trie"]


class TaskSpec(StrictModel):
    """One entry of the task mixture."""

    task: TaskName = Field(description="Which task renders the samples.")
    weight: float = Field(
        1.0,
        ge=0.0,
        description="Multiplier on the task's natural sample count: 2 = every sample twice, "
        "0.5 = a seeded half, 0 = off.",
    )


class LoraSettings(StrictModel):
    """LoRA adapters for Phase B (``recommender.finetune: lora``, through ``peft``)."""

    r: int = Field(16, gt=0, description="Adapter rank.")
    alpha: int = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        description="Module names that get adapters (e.g. [q_proj, v_proj]); None = peft's "
        "default for the architecture (Llama: q_proj, v_proj).",
    )


class RecommenderConfig(StrictModel):
    """Phase B: multi-task generative training of the same LLM."""

    mixture: list[TaskSpec] = Field(
        default_factory=lambda: [
            TaskSpec(task="recommendation", weight=1.0),
            TaskSpec(task="alignment", weight=1.0),
            TaskSpec(task="reconstruction", weight=1.0),
        ],
        description="The task mixture: a plain list of {task, weight}.",
    )
    finetune: Literal["full", "lora"] = Field(
        "full",
        description="'full': every weight trains; 'lora': LoRA adapters (peft) plus the "
        "semantic-ID tokens' input and output rows (the rest of both matrices frozen), "
        "merged into plain weights when training ends.",
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA settings.")
    loss_normalization: LossNormalization = Field(
        "target",
        description="How completion-token losses are averaged: 'token' = over every "
        "completion token of the batch (long reconstruction texts weigh more); 'target' = "
        "per target first (one recommendation target, one catalogue item), summed, then "
        "divided by the mixture's expected targets per batch, so every target weighs the "
        "same over an epoch and the mixture weights are the tasks' shares in either "
        "rec_samples form. 'sample' is read as 'target' (its name before sequence mode).",
    )
    id_normalization: IdNormalization = Field(
        "level",
        description="What a recommendation target's semantic-ID token is normalized over, in "
        "Phase B's loss and in decoding: 'level' = the softmax over its level's K codes; "
        "'trie' = over the codes that continue a catalogue item's ID from the target's "
        "prefix, so a target's loss is -log p(item) under one softmax over the catalogue's "
        "items factorized along the ID (the objective SASRec-CE trains). Fixed at training "
        "time: decoding uses the checkpoint's.",
    )
    rec_samples: RecSamples = Field(
        "sequence",
        description="How recommendation targets are rendered: 'sequence' = one row per "
        "window of a user's train sequence with every target of the window labelled (one "
        "pass teaches up to history_len targets); 'prefix' = one row per target (the "
        "per-prefix form, for the ablation). Same targets and histories of at least "
        "history_len/2 items either way (store_core.tasks).",
    )
    hidden_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Phase B training only: dropout on the token embeddings and on each "
        "decoder block's attention and MLP output before the residual add (store_core."
        "dropout). Not stored in the weights; decoding never drops.",
    )
    attention_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Phase B training only: dropout on the attention weights.",
    )
    history_len: int = Field(20, gt=0, description="N: most recent history items in a prompt.")
    beam_size: int = Field(
        20,
        ge=VALIDATION_CUTOFF,
        description="Constrained beam width for validation/eval; at least 10, the cutoff of "
        "the validation NDCG@10 that early stopping reads (metrics at cutoffs past the beam, "
        "such as @20 with a beam of 10, only count the beam's items).",
    )
    cold_start_backoff: float = Field(
        0.0,
        ge=0.0,
        description="Decoding (evaluation and store recommend): weight of the cold-start "
        "back-off, 0 = off. Items no training sequence contains are scored by the model's "
        "log-probability of their first cold_start_backoff_depth codes plus "
        "log(weight / items sharing that prefix) and merged into the beam "
        "(store_core.generate.cold_start).",
    )
    cold_start_backoff_depth: int | None = Field(
        None,
        ge=1,
        description="Codes of the prefix the back-off scores; None = the cluster levels "
        "before the last (L - 1), the codes that carry meaning rather than identity.",
    )
    transition_memory_weight: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Decoding (evaluation and store recommend): weight w of the transition "
        "memory, 0 = off. Each item's probability becomes (1 - w) * the model's + w * the "
        "share of the training transitions out of the user's recent items that go to it "
        "(store_core.generate.transition_memory; kNN-LM-style interpolation). Not used by "
        "Phase B's validation.",
    )
    transition_memory_depth: int = Field(
        2,
        ge=1,
        description="D: the most recent history items whose training transitions the memory reads.",
    )
    transition_memory_decay: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="The weight of the k-th most recent history item in the memory is "
        "decay^(k-1), normalized over the D items.",
    )
    transition_memory_window: int = Field(
        1,
        ge=1,
        description="W: the memory counts item pairs up to W positions apart in the "
        "training sequences (1 = consecutive items only, a first-order chain).",
    )
    transition_memory_window_decay: float = Field(
        0.7,
        gt=0.0,
        le=1.0,
        description="A pair g positions apart counts window_decay^(g-1) (used when W > 1).",
    )
    transition_memory_symmetric: bool = Field(
        False,
        description="Count every pair in both directions: for data whose order inside a "
        "session is not informative (e.g. MovieLens, many ratings in the same second).",
    )
    val_max_users: int | None = Field(
        1000, gt=0, description="Validate on at most this many users (seeded sample)."
    )
    early_stopping_patience: int = Field(
        3,
        ge=1,
        description="Stop after this many validation rounds (epoch ends, or every "
        "eval_every steps) without a better validation NDCG@10.",
    )
    eval_batch_size: int = Field(32, gt=0, description="Users per decoding batch.")

    @field_validator("loss_normalization", mode="before")
    @classmethod
    def _old_name(cls, value: Any) -> Any:
        return "target" if value == "sample" else value

    @field_validator("mixture")
    @classmethod
    def _something_to_train(cls, value: list[TaskSpec]) -> list[TaskSpec]:
        if not any(spec.weight > 0 for spec in value):
            raise ValueError(
                "the task mixture has no task with weight > 0, so Phase B has nothing to train"
            )
        return value


class SASRecConfig(StrictModel):
    """SASRec-CE hyper-parameters.

    Defaults are RecBole 1.2.1's SASRec (hidden 64, 2 layers, 2 heads, inner 256, dropout
    0.5/0.5, Adam lr 1e-3, no weight decay, early-stopping patience 10) with history 20;
    only the batching differs, because training here is seq2seq (module docstring).
    """

    history_len: int = Field(20, gt=0, description="L: most recent history items fed.")
    hidden_size: int = Field(64, gt=0, description="Embedding and hidden size H.")
    num_layers: int = Field(2, gt=0, description="Transformer blocks.")
    num_heads: int = Field(2, gt=0, description="Attention heads (must divide hidden_size).")
    inner_size: int = Field(256, gt=0, description="Feed-forward width.")
    hidden_dropout: float = Field(0.5, ge=0.0, lt=1.0, description="Embedding/residual dropout.")
    attn_dropout: float = Field(0.5, ge=0.0, lt=1.0, description="Attention-weight dropout.")
    layer_norm_eps: float = Field(1e-12, gt=0.0, description="LayerNorm epsilon.")
    init_std: float = Field(0.02, gt=0.0, description="Std of the normal weight init.")
    lr: float = Field(1e-3, gt=0.0, description="Adam learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="Adam weight decay.")
    batch_size: int = Field(
        64,
        gt=0,
        description="Training windows per optimizer step (each labels up to train_stride "
        "targets). 64 matched RecBole on ml-100k and scientific; 256 under-trains ml-100k.",
    )
    train_stride: int | None = Field(
        None,
        gt=0,
        description="Targets between consecutive training windows (1 .. history_len). None "
        "= history_len: seq2seq training; 1 = every target with its full history.",
    )
    max_epochs: int = Field(200, gt=0, description="Upper bound on training epochs.")
    patience: int = Field(
        10, ge=1, description="Stop after this many epochs without a better validation NDCG@10."
    )
    eval_batch_size: int = Field(1024, gt=0, description="Users per scoring batch.")

    @model_validator(mode="after")
    def _check(self) -> SASRecConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.train_stride is not None and self.train_stride > self.history_len:
            raise ValueError(
                f"train_stride {self.train_stride} exceeds history_len {self.history_len}"
            )
        return self

    @property
    def stride(self) -> int:
        return self.train_stride or self.history_len


SystemName = Literal["store", "tiger", "sasrec", "popularity"]


class EvaluationConfig(StrictModel):
    """What ``store evaluate`` runs, side by side on the same split."""

    systems: list[SystemName] = Field(
        default_factory=lambda: list(get_args(SystemName)),
        description="store = this pipeline; tiger = RQ-KMeans IDs + recommendation task only "
        "(trained on demand); sasrec = SASRec with cross-entropy over all items; popularity.",
    )
    sasrec_seeds: list[Seed] = Field(
        default_factory=lambda: [2020], description="SASRec is trained once per seed."
    )
    sasrec: SASRecConfig = Field(
        default_factory=lambda: SASRecConfig(), description="SASRec-CE hyper-parameters."
    )
    max_users: int | None = Field(
        None, gt=0, description="Evaluate generative systems on a seeded sample of users."
    )

    @field_validator("systems")
    @classmethod
    def _some_systems(cls, value: list[SystemName]) -> list[SystemName]:
        if not value:
            raise ValueError("no system to evaluate; name at least one of " + _choices(SystemName))
        _refuse_repeats(value, "system")
        return value

    @field_validator("sasrec_seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int]) -> list[int]:
        _refuse_repeats(value, "seed")
        return value

    @model_validator(mode="after")
    def _seeds_for_sasrec(self) -> EvaluationConfig:
        if "sasrec" in self.systems and not self.sasrec_seeds:
            raise ValueError("systems includes 'sasrec' but sasrec_seeds is empty")
        return self


class LauncherConfig(StrictModel):
    """How the training stages run: in this process, or as several ranks started by the
    ``deepspeed`` launcher (several GPUs, several nodes via a hostfile)."""

    kind: Literal["inprocess", "deepspeed"] = Field(
        "inprocess",
        description="'deepspeed': each training phase runs `deepspeed ... --module "
        "store_cli train --phase <phase>` and the stage reads its outputs.",
    )
    hostfile: str | None = Field(
        None, description="DeepSpeed hostfile ('<host> slots=<gpus>' per line)."
    )
    num_gpus: int | None = Field(
        None, ge=1, description="Ranks per node (--num_gpus); default: every visible GPU."
    )
    num_nodes: int | None = Field(None, ge=1, description="Nodes of the hostfile to use.")
    master_port: int | None = Field(
        None, ge=1, le=65535, description="Rendezvous port; default: a free one."
    )
    extra_args: list[str] = Field(
        default_factory=list, description="More launcher arguments, e.g. ['--include', 'a:0,1']."
    )

    @model_validator(mode="after")
    def _launchable(self) -> LauncherConfig:
        if self.num_nodes is not None and self.num_nodes > 1 and self.hostfile is None:
            raise ValueError(
                f"num_nodes {self.num_nodes} needs a hostfile naming the nodes (launcher.hostfile)"
            )
        hostfile = self.hostfile if self.kind == "deepspeed" else None
        if hostfile is not None and not Path(hostfile).is_file():  # as launch opens it
            raise ValueError(f"hostfile {self.hostfile} does not exist or is not a file")
        for arg in self.extra_args:
            option = arg.split("=", 1)[0]
            if option in _LAUNCHER_OWN_OPTIONS:
                field = _LAUNCHER_OWN_OPTIONS[option]
                instead = f" (use launcher.{field})" if field else ""
                raise ValueError(f"extra_args {arg!r}: STORE passes {option} itself{instead}")
        return self


#: deepspeed launcher options that store_core.launch passes itself (the field that sets
#: each, or "" when none does): repeating one in ``extra_args`` fails the launch.
_LAUNCHER_OWN_OPTIONS = {
    "--hostfile": "hostfile",
    "--num_gpus": "num_gpus",
    "--num_nodes": "num_nodes",
    "--master_port": "master_port",
    "--no_local_rank": "",
    "--module": "",
}

#: A relative ``workspace`` is resolved against this directory when it is set (else the
#: current directory): containers and pods set it to their data volume.
WORKSPACE_ROOT_ENV = "STORE_WORKSPACE_ROOT"


class ServiceConfig(StrictModel):
    """The deployments ``store serve`` and ``prefect.yaml`` define."""

    nightly_cron: str = Field(
        "0 3 * * *", description="Cron schedule of the nightly-retokenize deployment."
    )
    timezone: str = Field("UTC", description="IANA time zone the cron schedule is read in.")

    @field_validator("nightly_cron")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        fields = value.split()
        if len(fields) != 5:
            raise ValueError(f"expected a 5-field cron expression, got {value!r}")
        for field, (name, low, high) in zip(fields, _CRON_FIELDS, strict=True):
            problem = _cron_field_problem(field, low, high)
            if problem is not None:
                raise ValueError(f"cron {value!r}: {name} field {field!r}: {problem}")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name)") from None
        return value


_DASK_ADDRESS = re.compile(r"(tcp|tls|inproc|ucx)://[^\s/]+(:[0-9]{1,5})?")


class InferenceConfig(StrictModel):
    """Where the batch-inference stages (tokenize-catalogue, evaluate) run: in this
    process (neither field set, the default), on a local Dask cluster of ``workers``
    single-thread worker processes, or on a running Dask cluster at ``address``. The
    scaled-out stages run through the Prefect flows (``store run``, the deployments)."""

    workers: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Start a local Dask cluster of N single-thread worker processes for the "
        "stage (one model copy per worker); null = no local cluster.",
    )
    address: str | None = Field(
        None,
        description="Scheduler address of a running Dask cluster, e.g. tcp://dask-scheduler:8786 "
        "(its workers need the workspace at the same path and PREFECT_API_URL).",
    )
    shards: int = Field(
        8,
        ge=1,
        le=100_000,
        description="Shard tasks per stage (row ranges of items.parquet / groups of users); "
        "more shards than workers balance load and make a retried shard cheaper.",
    )
    batch_rows: int = Field(
        256,
        ge=1,
        le=1_000_000,
        description="Catalogue rows read per batch: the unit shards are cut in, and the "
        "group within which new IDs are assigned in item-id order (same in every mode).",
    )
    retries: int = Field(2, ge=0, le=100, description="Prefect retries of a failed shard task.")
    retry_delay_s: float = Field(
        2.0, ge=0, le=3600, description="Seconds between the retries of a shard task."
    )

    @field_validator("address")
    @classmethod
    def _scheduler_address(cls, value: str | None) -> str | None:
        if value is not None and not _DASK_ADDRESS.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a Dask scheduler address (expected e.g. tcp://host:8786)"
            )
        return value

    @model_validator(mode="after")
    def _one_engine(self) -> InferenceConfig:
        if self.workers is not None and self.address is not None:
            raise ValueError(
                "set either workers (start a local cluster) or address (connect to one), not both"
            )
        return self

    @property
    def scaled_out(self) -> bool:
        """True when the stages run on a Dask cluster (local or by address)."""
        return self.workers is not None or self.address is not None


#: The linear layers of the Llama built from ``model`` (store_core.model) that LoRA can
#: adapt; the embedding and output matrices train their semantic-ID rows instead.
BUILT_MODEL_LORA_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


class StoreConfig(StrictModel):
    """The whole pipeline's configuration (one YAML file)."""

    workspace: str = Field(
        "./workspace",
        description="Local directory where data/, models/, store.duckdb and the MLflow store "
        "live. A relative path is resolved against $STORE_WORKSPACE_ROOT when set, else the "
        "current directory.",
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Ingestion.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Backbone LLM.")
    semantic_id: SemanticIdConfig = Field(
        default_factory=SemanticIdConfig, description="Semantic-ID construction."
    )
    tokenizer_train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=20.0, lr=2e-3),
        description="Phase A training (dense tokenizer with reconstruction).",
    )
    recommender: RecommenderConfig = Field(
        default_factory=RecommenderConfig, description="Phase B tasks and validation."
    )
    evaluation: EvaluationConfig = Field(
        default_factory=EvaluationConfig, description="Offline evaluation."
    )
    recommender_train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=10.0, lr=1e-3),
        description="Phase B training (multi-task generative recommendation).",
    )
    service: ServiceConfig = Field(
        default_factory=ServiceConfig, description="Deployments and their schedules."
    )
    launcher: LauncherConfig = Field(
        default_factory=LauncherConfig, description="How the training phases are launched."
    )
    inference: InferenceConfig = Field(
        default_factory=InferenceConfig,
        description="Where tokenize-catalogue and evaluate run (in-process or on Dask).",
    )

    @model_validator(mode="after")
    def _lora_targets_exist(self) -> StoreConfig:
        targets = self.recommender.lora.target_modules
        if self.recommender.finetune != "lora" or self.model.name_or_path or targets is None:
            return self
        unknown = [t for t in targets if t not in BUILT_MODEL_LORA_TARGETS]
        if unknown:
            raise ValueError(
                f"recommender.lora.target_modules {unknown}: the model built here "
                "(model.name_or_path null) has no such linear layer; choose from "
                + ", ".join(BUILT_MODEL_LORA_TARGETS)
            )
        return self

    @field_validator("workspace")
    @classmethod
    def _expand_workspace(cls, value: str) -> str:
        if "://" in value and not value.startswith("file://"):
            raise ValueError(
                f"{value!r} is not on the local filesystem; the workspace must be a local "
                "directory (a mounted volume): it holds store.duckdb, which DuckDB opens only "
                "locally, and the writer lock (data.path may be a remote URI)"
            )
        if "://" in value:  # file://
            problem = _local_problem(value.removeprefix("file://"))
            if problem is not None:
                raise ValueError(f"the workspace must be a directory: {problem}")
            return value
        path = Path(os.path.expanduser(value))
        root = os.environ.get(WORKSPACE_ROOT_ENV)
        if root and not path.is_absolute():
            path = Path(os.path.expanduser(root)) / path
        try:
            resolved = str(path.resolve())
        except (OSError, RuntimeError) as exc:  # e.g. a symlink loop
            raise ValueError(f"cannot resolve {value!r}: {exc}") from None
        problem = _local_problem(resolved)
        if problem is not None:
            raise ValueError(f"the workspace must be a directory: {problem}")
        return resolved

    # Derived locations -------------------------------------------------------------
    @property
    def data_dir(self) -> str:
        return f"{self.workspace}/data"

    @property
    def duckdb_path(self) -> str:
        return f"{self.workspace}/store.duckdb"

    @property
    def models_dir(self) -> str:
        return f"{self.workspace}/models"


#: The largest config file accepted, in bytes.
MAX_CONFIG_BYTES = 1 << 20
#: The largest ``--set`` value accepted, in bytes.
MAX_OVERRIDE_BYTES = 64 << 10
#: The most YAML nodes a document may expand to, each use of an alias counting its whole
#: subtree again (the shipped configs have a few hundred). Bounds "billion laughs" alias
#: bombs, whose few hundred bytes expand to ~10^9 nodes.
MAX_YAML_NODES = 100_000
#: The deepest nesting of YAML collections accepted (the shipped configs use 3).
MAX_YAML_DEPTH = 50


class _DepthBoundLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that stops composing past :data:`MAX_YAML_DEPTH` levels (PyYAML
    composes recursively and scans each token in time linear in the depth)."""

    def __init__(self, text: str, source: str) -> None:
        super().__init__(text)
        self._source = source
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise ConfigError(f"{self._source}: YAML nests deeper than {MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _yaml_children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expansion(root: yaml.Node, source: str) -> None:
    """Refuse a composed YAML graph that expands to too many nodes, nests too deeply or
    holds a recursive alias. Iterative, and linear in the *composed* (not expanded) size:
    each node's expanded size is computed once and reused at every alias of it."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in _yaml_children(node))
            if sizes[key] > MAX_YAML_NODES:
                raise ConfigError(
                    f"{source}: YAML expands to more than {MAX_YAML_NODES} values through "
                    "aliases (*name); write the values out instead of nesting aliases"
                )
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise ConfigError(f"{source}: YAML holds a recursive alias (*name inside &name)")
        if len(on_path) >= MAX_YAML_DEPTH:
            raise ConfigError(f"{source}: YAML nests deeper than {MAX_YAML_DEPTH} levels")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _yaml_children(node) if id(c) not in sizes)


def load_yaml(text: str, source: str) -> Any:
    """Parse one YAML document safely (``yaml.SafeLoader``) and boundedly.

    Anchors and aliases are allowed, but the document may expand to at most
    :data:`MAX_YAML_NODES` values and nest at most :data:`MAX_YAML_DEPTH` levels; the
    check runs on the composed node graph, before any Python object is built.

    Raises :class:`ConfigError` (naming ``source``) when a bound is passed or an alias is
    recursive; ``yaml.YAMLError`` when ``text`` is not valid YAML.
    """
    loader = _DepthBoundLoader(text, source)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _parse_value(key: str, raw: str) -> Any:
    """Parse the right-hand side of ``--set key=value`` as YAML (numbers, bools, lists);
    text that is not valid YAML stays a string.

    Raises :class:`ConfigError` when the value is longer than :data:`MAX_OVERRIDE_BYTES`
    or expands past the YAML bounds of :func:`load_yaml`.
    """
    if raw == "":
        return ""
    size = len(raw.encode("utf-8", "surrogatepass"))
    if size > MAX_OVERRIDE_BYTES:
        raise ConfigError(
            f"override '{key}': the value is {size} bytes; the limit is {MAX_OVERRIDE_BYTES}"
        )
    try:
        return load_yaml(raw, f"override '{key}'")
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to a nested dict (returns a new dict).

    Raises :class:`ConfigError` when an override is not ``key.path=value``, its path runs
    through a non-section, or its value is too large (see :func:`_parse_value`).
    """
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
        node[parts[-1]] = _parse_value(".".join(parts), raw)
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


def _read_config_text(path: Path) -> str:
    """The file's text, reading at most :data:`MAX_CONFIG_BYTES` + 1 bytes (so a huge file,
    a device or a FIFO cannot exhaust memory)."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"config file {path} is larger than {MAX_CONFIG_BYTES // (1 << 20)} MiB; "
            "a config is a few KiB"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path}: not UTF-8 text (byte {exc.start}: {exc.reason})"
        ) from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A one-line account of a YAML error: where, then what (PyYAML's own text spans
    several lines and quotes the source)."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return f": {' '.join(str(exc).split())}"
    mark = exc.problem_mark or exc.context_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    what = "; ".join(part for part in (exc.context, exc.problem) if part)
    return f"{where}: {what}" if what else where


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None
) -> StoreConfig:
    """Load a YAML config, apply overrides, validate.

    Relative ``data.path`` values in the file are resolved against the file's directory, so
    a config works from any current directory.

    Raises :class:`ConfigError` (naming the file and key) when the file is missing,
    unreadable, larger than :data:`MAX_CONFIG_BYTES`, not UTF-8, not valid YAML, expands
    past the bounds of :func:`load_yaml`, or does not validate; likewise for overrides.
    """
    config_path = resolve_config_path(path)
    source = f"config file {config_path}"
    try:
        raw = load_yaml(_read_config_text(config_path), source) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML{_yaml_problem(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {config_path}: top level must be a mapping")
    data_section = raw.get("data")
    if isinstance(data_section, dict):
        rel = data_section.get("path")
        if isinstance(rel, str) and "://" not in rel and not os.path.isabs(rel):
            data_section["path"] = str((config_path.parent / rel).resolve())
    merged = apply_overrides(raw, overrides or [])
    return validate_config(merged, source=str(config_path), overrides=overrides or [])


def validate_config(
    data: dict[str, Any], source: str = "<config>", overrides: list[str] | None = None
) -> StoreConfig:
    """Validate a dict into a :class:`StoreConfig`, with errors naming the source and key.

    A problem in a value that a ``--set key=value`` in ``overrides`` gave (or in the
    section holding it, for rules across fields) names that ``--set``, not the file.
    """
    try:
        return StoreConfig.model_validate(data)
    except ValidationError as exc:
        from_file: list[str] = []
        from_overrides: list[str] = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"]]
            key = ".".join(loc)
            if err["type"] == "extra_forbidden" and key in RENAMED_KEYS:
                line = f"{key} was renamed to {RENAMED_KEYS[key]}"
            elif err["type"] == "extra_forbidden":
                line = f"unknown key '{key}'"
            else:
                message = str(err["msg"]).removeprefix("Value error, ")
                line = f"'{key}': {message}" if key else message
            override = _override_for(loc, overrides or [], line)
            if override is None:
                from_file.append(line)
            elif override == key and err["type"] != "extra_forbidden":
                from_overrides.append(f"--set {override}: {line.split(': ', 1)[1]}")
            else:
                from_overrides.append(f"--set {override}: {line}")
        if not from_file:
            raise ConfigError("; ".join(from_overrides)) from None
        raise ConfigError(
            f"config file {source}: " + "; ".join(from_file + from_overrides)
        ) from None


def _override_for(loc: list[str], overrides: list[str], line: str) -> str | None:
    """The keys of the overrides that set the value at ``loc``, a value inside it, or a
    value of the section ``loc`` names (a rule across its fields), joined by ``, --set``;
    for a rule across sections (``loc`` empty) the overrides whose key ``line`` names.
    None when the value came from the file. Values are left out: one may be a credential."""
    keys: list[str] = []
    for item in overrides:
        parts = [p for p in item.split("=", 1)[0].strip().split(".") if p]
        n = min(len(parts), len(loc))
        key = ".".join(parts)
        related = parts[:n] == loc[:n] if loc else key in line
        if parts and related and key not in keys:
            keys.append(key)
    return ", --set ".join(keys) if keys else None
