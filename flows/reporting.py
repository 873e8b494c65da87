"""What each stage shows its users: the one place that reads the stages' results.

For every stage, :class:`StageReport` holds a Markdown summary (the Prefect artifact on
the stage's subflow run) and the typed :class:`StageSummary` the stage's subflow returns:
its one result line (the Prefect flow-run log), headline metrics (logged on the MLflow
parent run, so pipeline runs compare in the runs table) and the stage's own fields
(:class:`IngestSummary`, ...). The flow ``store`` returns a :class:`PipelineSummary`.
Floats are rounded for people (4 significant decimals); no Python dict or list reaches a
line.

Sources: :mod:`store_core.stages` (the outcomes), :mod:`store_core.evaluation` (the
aggregation over seeds and the system labels).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from store_core.catalogue import COUNT_KEYS, CatalogueOutcome
from store_core.checkpoint import RegisteredVersion
from store_core.evaluation import REPORT_METRICS, aggregate, labels
from store_core.ingest import IngestResult
from store_core.item_tokenizer import TokenizerOutcome
from store_core.recommender_training import RecommenderOutcome
from store_core.stages import EvaluationOutcome, StageOutcome

#: The item categories both ingest (the ``items`` table) and tokenize-catalogue count.
ITEM_CATEGORIES = ("new", "changed", "restored", "removed", "unchanged")
#: The evaluation metrics that go on the parent run, per system.
HEADLINE_METRICS = ("recall_at_10", "ndcg_at_10")


@dataclass(frozen=True)
class StageSummary:
    """What a stage's subflow returns: ``stage`` (its name in the pipeline), ``run_id``
    (its MLflow run; None with tracking off), ``line`` (its one log line) and
    ``headline`` (metric name -> value for the parent run)."""

    stage: str
    run_id: str | None
    line: str
    headline: dict[str, float]


@dataclass(frozen=True)
class IngestSummary(StageSummary):
    files: dict[str, str]  # output name -> path
    counts: dict[str, int]  # items, users, interactions, ...
    catalog_changes: dict[str, int]  # the items table: new, changed, ...


@dataclass(frozen=True)
class TokenizerSummary(StageSummary):
    checkpoint_dir: str
    codebook_version: str
    collision_rate: float


@dataclass(frozen=True)
class RecommenderSummary(StageSummary):
    checkpoint_dir: str
    best_val_ndcg_at_10: float | None
    model_uri: str | None  # the registered model version; None when not registered


@dataclass(frozen=True)
class CatalogueSummary(StageSummary):
    version: int | None  # the version written; None when the catalogue was unchanged
    current_version: int | None
    written: bool
    counts: dict[str, int]
    model: str | None  # how the model was chosen (the nightly job's alias)
    summary_markdown: str


@dataclass(frozen=True)
class EvaluationSummary(StageSummary):
    report: str  # the Markdown report's path
    plot: str


S = TypeVar("S", bound=StageSummary)


@dataclass(frozen=True)
class PipelineSummary:
    """What the flow ``store`` returns: where the outputs are and each stage's summary
    (``stages``: stage name -> summary, in the order they ran)."""

    job: str
    workspace: str
    data_dir: str
    duckdb: str
    models_dir: str
    mlflow_run_id: str | None
    mlflow_run_url: str | None
    mlflow_tracking_uri: str | None  # credentials redacted
    stages: dict[str, StageSummary]

    def stage(self, name: str, kind: type[S]) -> S | None:
        """The summary of stage ``name`` (None when it did not run); TypeError when it is
        not a ``kind``."""
        found = self.stages.get(name)
        if found is not None and not isinstance(found, kind):
            raise TypeError(f"stage {name} returned a {type(found).__name__}, not {kind}")
        return found

    @property
    def catalogue(self) -> CatalogueSummary:
        """The tokenize-catalogue stage's summary (every job runs it)."""
        found = self.stage("tokenize_catalogue", CatalogueSummary)
        if found is None:
            raise KeyError("the pipeline did not run tokenize_catalogue")
        return found

    @property
    def evaluation(self) -> EvaluationSummary | None:
        """The evaluation's summary; None when it did not run."""
        return self.stage("evaluate", EvaluationSummary)


@dataclass(frozen=True)
class StageReport(Generic[S]):
    """What one stage shows: ``markdown`` (its artifact) and ``summary`` (what its
    subflow returns, with the log line and headline metrics)."""

    markdown: str
    summary: S

    @property
    def stage(self) -> str:
        return self.summary.stage

    @property
    def line(self) -> str:
        return self.summary.line

    @property
    def headline(self) -> dict[str, float]:
        return self.summary.headline


def fmt(value: Any) -> str:
    """A number for people: ints as they are, floats to 4 decimals (``n/a`` for None)."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def counts_text(counts: Mapping[str, Any], keys: Sequence[str] = ITEM_CATEGORIES) -> str:
    """``3 new, 2 changed, 0 restored, ...``: the counts in a fixed order."""
    return ", ".join(f"{int(counts.get(key, 0))} {key}" for key in keys)


def artifact_key(experiment: str, name: str) -> str:
    """A Prefect artifact key scoped to the MLflow experiment (one per config), so the
    artifact histories of two experiments never mix: lowercase letters, digits, dashes."""
    slug = re.sub(r"[^a-z0-9-]+", "-", experiment.lower()).strip("-") or "store"
    return f"{slug}-{name}"


def ingest_report(outcome: StageOutcome[IngestResult]) -> StageReport[IngestSummary]:
    result = outcome.result
    counts, changes = result.counts, result.catalog_changes
    line = (
        f"ingest: {counts['items']} items, {counts['users']} users, "
        f"{counts['interactions']} interactions; items table: {counts_text(changes)}"
    )
    markdown = "\n".join(
        [
            "# Ingest",
            "",
            "| counted | value |",
            "|---|---:|",
            *(f"| {key} | {value} |" for key, value in counts.items()),
            "",
            "Items table (item text against the last ingest):",
            "",
            "| items | count |",
            "|---|---:|",
            *(f"| {key} | {int(changes.get(key, 0))} |" for key in ITEM_CATEGORIES),
            "",
        ]
    )
    headline = {
        "catalogue_items": float(counts["items"]),
        "users": float(counts["users"]),
        "interactions": float(counts["interactions"]),
    }
    summary = IngestSummary(
        "ingest",
        outcome.run_id,
        line,
        headline,
        files=dict(result.files),
        counts=dict(counts),
        catalog_changes=dict(changes),
    )
    return StageReport(markdown, summary)


def tokenizer_report(
    outcome: StageOutcome[TokenizerOutcome | None],
) -> StageReport[TokenizerSummary]:
    result = outcome.result
    assert result is not None  # the flow process is rank 0
    stats = result.stats
    rate = result.collision_rate
    line = (
        f"train-tokenizer: collision rate {100 * rate:.1f}% before disambiguation "
        f"(at most {stats.get('max_items_per_id', 'n/a')} item(s) per ID), "
        f"codebook {result.codebook_version}"
    )
    markdown = "\n".join(
        [
            "# Semantic tokenizer (Phase A)",
            "",
            "| | |",
            "|---|---|",
            f"| codebook version | `{result.codebook_version}` |",
            f"| collision rate (before disambiguation) | {fmt(rate)} |",
            f"| items sharing an ID at most | {stats.get('max_items_per_id', 'n/a')} |",
            f"| checkpoint | `{result.checkpoint_dir}` |",
            "",
        ]
    )
    summary = TokenizerSummary(
        "train_tokenizer",
        outcome.run_id,
        line,
        {"collision_rate": rate},
        checkpoint_dir=str(result.checkpoint_dir),
        codebook_version=result.codebook_version,
        collision_rate=rate,
    )
    return StageReport(markdown, summary)


def recommender_report(
    outcome: StageOutcome[RecommenderOutcome | None], registered: RegisteredVersion | None
) -> StageReport[RecommenderSummary]:
    result = outcome.result
    assert result is not None  # the flow process is rank 0
    best = result.best_val_ndcg_at_10
    model_uri = registered.uri if registered else None
    line = f"train-recommender: best validation NDCG@10 {fmt(best)} at {result.best_when()}" + (
        f"; registered {model_uri}" if model_uri else ""
    )
    markdown = "\n".join(
        [
            "# Recommender (Phase B)",
            "",
            "| | |",
            "|---|---|",
            f"| best validation NDCG@10 | {fmt(best)} |",
            f"| best validation round | {result.best_validation_round} |",
            f"| its epoch | {result.best_epoch} |",
            f"| registered model | `{model_uri or 'not registered (tracking off)'}` |",
            f"| checkpoint | `{result.checkpoint_dir}` |",
            "",
        ]
    )
    headline = {"best_val_ndcg_at_10": float(best)} if best is not None else {}
    summary = RecommenderSummary(
        "train_recommender",
        outcome.run_id,
        line,
        headline,
        checkpoint_dir=str(result.checkpoint_dir),
        best_val_ndcg_at_10=best,
        model_uri=model_uri,
    )
    return StageReport(markdown, summary)


def catalogue_report(
    outcome: StageOutcome[CatalogueOutcome],
    mode: str,
    *,
    previous_version: int | None,
    current_version: int | None,
    model: str | None,
) -> StageReport[CatalogueSummary]:
    """``previous_version``: the newest version before this run (None: none yet);
    ``current_version``: the newest after it; ``model``: how the model was chosen (e.g.
    ``models:/name@production (version 3)``)."""
    result = outcome.result
    counts = result.counts
    against = (
        f"against version {previous_version}"
        if previous_version is not None
        else "against the IDs the tokenizer training assigned"
    )
    if result.version is None:
        headline_text = f"catalogue unchanged, current semantic-ID version {current_version}"
    else:
        headline_text = f"semantic-ID version {result.version} written"
    line = f"tokenize-catalogue: {headline_text} ({counts_text(counts)} {against}"
    if mode == "regenerate":  # every item's ID is generated: the categories do not say so
        generated, reassigned = int(counts.get("generated", 0)), int(counts.get("reassigned", 0))
        line += f"; regenerated {generated} IDs, {reassigned} of them changed"
    line += ")"
    if model:
        line += f"; model {model}"
    markdown = (
        f"**{headline_text[0].upper()}{headline_text[1:]}** (counts {against}).\n\n"
        + result.summary_markdown(mode, model)
    )
    headline = {f"items_{key}": float(counts.get(key, 0)) for key in ITEM_CATEGORIES}
    if current_version is not None:
        headline["semantic_id_version"] = float(current_version)
    summary = CatalogueSummary(
        "tokenize_catalogue",
        outcome.run_id,
        line,
        headline,
        version=result.version,
        current_version=current_version,
        written=result.version is not None,
        counts={key: int(counts.get(key, 0)) for key in COUNT_KEYS},
        model=model,
        summary_markdown=markdown,
    )
    return StageReport(markdown, summary)


def evaluation_table(results: Sequence[Any]) -> dict[str, list[Any]]:
    """Column -> values, one row per system: the mean over seeds of each reported
    metric (history kept), rounded to 4 decimals, and the number of seeds."""
    agg = aggregate(results)
    names = labels(results)
    table: dict[str, list[Any]] = {"system": [], "seeds": []}
    for metric in REPORT_METRICS:
        table[metric] = []
    for system, metrics in agg.items():
        table["system"].append(names[system])
        table["seeds"].append(max(v[2] for v in metrics.values()))
        for metric in REPORT_METRICS:
            mean = metrics.get(metric, (float("nan"), 0.0, 0))[0]
            table[metric].append(round(mean, 4))
    return table


def comparison_figure(results: Sequence[Any]) -> Any:
    """A grouped bar chart: Recall@10 and NDCG@10 per system (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = evaluation_table(results)
    systems = table["system"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(systems)), 4))
    width = 0.38
    for offset, metric, title in (
        (-0.5, "recall_at_10", "Recall@10"),
        (0.5, "ndcg_at_10", "NDCG@10"),
    ):
        positions = [i + offset * width for i in range(len(systems))]
        bars = ax.bar(positions, table[metric], width, label=title)
        ax.bar_label(bars, fmt="%.4f", fontsize=7)
    ax.set_xticks(range(len(systems)), [s.split(" (")[0] for s in systems])
    ax.set_title("Test split, full ranking (mean over seeds)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def evaluate_report(outcome: StageOutcome[EvaluationOutcome]) -> StageReport[EvaluationSummary]:
    result = outcome.result
    results = result.results
    table = evaluation_table(results)
    agg = aggregate(results)
    headline = {
        f"{system}/{metric}": metrics[metric][0]
        for system, metrics in agg.items()
        for metric in HEADLINE_METRICS
        if metric in metrics
    }
    pairs = ", ".join(
        f"{name.split(' (')[0]} {fmt(r)} / {fmt(n)}"
        for name, r, n in zip(
            table["system"], table["recall_at_10"], table["ndcg_at_10"], strict=True
        )
    )
    line = f"evaluate: Recall@10 / NDCG@10 on the test split: {pairs}"
    markdown = Path(result.report_path).read_text()
    summary = EvaluationSummary(
        "evaluate",
        outcome.run_id,
        line,
        headline,
        report=str(result.report_path),
        plot=str(result.plot_path),
    )
    return StageReport(markdown, summary)
