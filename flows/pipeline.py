"""The ``store`` pipeline flow: the stages as subflows, one MLflow parent run per flow run.

Stages: ingest, train-tokenizer (Phase A), train-recommender (Phase B), tokenize-catalogue,
evaluate. ``job="full"`` runs them all (the ``full-pipeline`` deployment);
``job="retokenize"`` runs ingest + tokenize-catalogue in keep mode with the current model
(the ``nightly-retokenize`` deployment). Subflows are thin wrappers around ``store_core``;
only I/O that can fail transiently (fetching the source) is a retried task. Summaries are
published as Prefect artifacts (Markdown, visible in the UI) next to the MLflow runs.

What users see (:mod:`flows.reporting` builds it): each stage logs one result line to
its flow run and publishes a Markdown artifact on its own subflow run as it ends; the
library's own log records (``store_core.*``: warnings, training progress) reach the flow
run's logs too; the MLflow parent run gets each stage's headline metrics as the stage
ends, a Markdown description linking the Prefect flow run, and the Prefect summary
links the MLflow run. Artifact keys are scoped to the MLflow experiment. A full run
points the registered model's ``@production`` alias at its new version; the nightly job
resolves the model through that alias.

The pipeline holds the workspace's writer lock (:mod:`store_core.locking`) from its first
stage to its last, so a nightly run cannot slip in between two stages of a full run; the
stages take the same lock again (re-entrant within the process). SIGTERM is Prefect's to
handle inside a flow run: its engine raises ``TerminationSignal``, which unwinds the
stages and marks their MLflow runs like any other failure.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

from store_core.telemetry import disable_telemetry

disable_telemetry()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.context import FlowRunContext, TaskRunContext  # noqa: E402
from prefect.logging.handlers import APILogHandler  # noqa: E402
from prefect.runtime import deployment, flow_run  # noqa: E402
from prefect.tasks import exponential_backoff  # noqa: E402
from prefect.utilities.urls import url_for  # noqa: E402

from flows import reporting  # noqa: E402
from flows.reporting import (  # noqa: E402
    CatalogueSummary,
    EvaluationSummary,
    IngestSummary,
    PipelineSummary,
    RecommenderSummary,
    S,
    StageReport,
    StageSummary,
    TokenizerSummary,
)
from flows.scaleout import remote_beams, remote_search  # noqa: E402
from store_core import storage, tracking  # noqa: E402
from store_core.config import StoreConfig, load_config  # noqa: E402
from store_core.ingest import ResolvedSource, resolve_source  # noqa: E402
from store_core.locking import workspace_writer  # noqa: E402
from store_core.redaction import redact  # noqa: E402
from store_core.stages import (  # noqa: E402
    catalogue_stage,
    evaluate_stage,
    ingest_stage,
    model_version_of,
    recommender_stage,
    tokenizer_stage,
)

Job = Literal["full", "retokenize"]

#: Prefect artifact names (keys are ``<experiment>-<name>``, see
#: :func:`flows.reporting.artifact_key`): the latest of each key is shown per key.
CATALOGUE_ARTIFACT = "catalogue-summary"
EVALUATION_ARTIFACT = "evaluation"
RUN_ARTIFACT = "run-summary"
#: Each stage's own artifact: ``<experiment>-stage-<stage>``.
STAGE_ARTIFACT = "stage"


class _RunLogHandler(APILogHandler):
    """Prefect's API log handler, for records made inside a flow or task run only (the
    library also logs outside runs: the CLI, the serving process)."""

    def emit(self, record: logging.LogRecord) -> None:
        if FlowRunContext.get() or TaskRunContext.get() or getattr(record, "flow_run_id", None):
            super().emit(record)


def bridge_library_logs() -> None:
    """Send the library's log records (logger ``store_core``, INFO and up) to the Prefect
    run they happen in, like ``PREFECT_LOGGING_EXTRA_LOGGERS=store_core`` would (which
    is honoured too: its handler is not added twice)."""
    library = logging.getLogger("store_core")
    if library.getEffectiveLevel() > logging.INFO:
        library.setLevel(logging.INFO)
    if not any(isinstance(h, APILogHandler) for h in library.handlers):
        library.addHandler(_RunLogHandler())


bridge_library_logs()


@task(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_jitter_factor=0.5)
def fetch_source(config: str | None, overrides: list[str]) -> ResolvedSource:
    """Resolve (and for built-in datasets download) the source: network I/O, retried."""
    return resolve_source(load_config(config, overrides))


def publish_stage(cfg: StoreConfig, report: StageReport[S]) -> S:
    """Log the stage's result line and publish its artifact on the current (subflow) run;
    returns what the subflow returns: the stage's typed summary."""
    get_run_logger().info("%s", report.line)
    create_markdown_artifact(
        report.markdown,
        key=reporting.artifact_key(
            cfg.tracking.experiment, f"{STAGE_ARTIFACT}-{report.stage.replace('_', '-')}"
        ),
        description=report.line,
    )
    return report.summary


@flow(name="ingest")
def ingest_flow(
    config: str | None = None,
    overrides: list[str] | None = None,
    parent_run_id: str | None = None,
) -> IngestSummary:
    """Stage 1: source -> Parquet + manifest + DuckDB ``items``."""
    cfg = load_config(config, overrides)
    source = fetch_source(config, overrides or [])
    return publish_stage(cfg, reporting.ingest_report(ingest_stage(cfg, parent_run_id, source)))


@flow(name="train-tokenizer")
def tokenizer_flow(
    config: str | None = None,
    overrides: list[str] | None = None,
    parent_run_id: str | None = None,
) -> TokenizerSummary:
    """Stage 2a: Phase A training + clustering into unique semantic IDs."""
    cfg = load_config(config, overrides)
    return publish_stage(cfg, reporting.tokenizer_report(tokenizer_stage(cfg, parent_run_id)))


@flow(name="train-recommender")
def recommender_flow(
    config: str | None = None,
    overrides: list[str] | None = None,
    parent_run_id: str | None = None,
) -> RecommenderSummary:
    """Stage 2b: Phase B multi-task training with validation and early stopping."""
    cfg = load_config(config, overrides)
    outcome = recommender_stage(cfg, parent_run_id)
    assert outcome.result is not None  # the flow process is rank 0
    registered = model_version_of(outcome.result.checkpoint_dir)
    return publish_stage(cfg, reporting.recommender_report(outcome, registered))


@flow(name="tokenize-catalogue")
def catalogue_flow(
    config: str | None = None,
    overrides: list[str] | None = None,
    parent_run_id: str | None = None,
    mode: str = "keep",
    use_alias: bool = False,
) -> CatalogueSummary:
    """Stage 3: every item's semantic ID as a new DuckDB version (one transaction).
    With ``use_alias`` (the nightly job) the model is the registry's ``@production``
    version, which must be the workspace's checkpoint."""
    cfg = load_config(config, overrides)
    model = production_model(cfg) if use_alias else None
    before = storage.latest_version(cfg.duckdb_path)
    stage = catalogue_stage(cfg, parent_run_id, mode=mode, remote=remote_beams(cfg))
    written = stage.result.version
    report = reporting.catalogue_report(
        stage,
        mode,
        previous_version=before if written is None else base_version(cfg, written),
        current_version=storage.latest_version(cfg.duckdb_path),
        model=model,
    )
    return publish_stage(cfg, report)


def base_version(cfg: StoreConfig, written: int) -> int | None:
    """The version a just-written ``keep`` version was counted against: the newest
    earlier one of the same codebook (None: the tokenizer training's clustering IDs)."""
    _, rows = storage.query(
        cfg.duckdb_path,
        "SELECT max(b.version) FROM semantic_id_versions b JOIN semantic_id_versions v "
        f"ON b.codebook_version = v.codebook_version WHERE v.version = {int(written)} "
        f"AND b.version < {int(written)}",
    )
    return None if not rows or rows[0][0] is None else int(rows[0][0])


def production_model(cfg: StoreConfig) -> str | None:
    """``models:/<name>@production (version N)``: the version the alias points at, checked
    against the workspace's checkpoint (its ``mlflow_model.json``). None (with a warning)
    when tracking is off or no version has the alias yet; raises
    :class:`store_core.errors.StoreError` when the checkpoint is another version."""
    from store_core.errors import StoreError
    from store_core.recommender_training import recommender_dir

    logger = get_run_logger()
    found = tracking.model_by_alias(cfg, tracking.PRODUCTION_ALIAS)
    if found is None:
        if cfg.tracking.enabled:
            logger.warning(
                "no registered model %s@%s yet: using the workspace's checkpoint",
                tracking.registered_model_name(cfg),
                tracking.PRODUCTION_ALIAS,
            )
        return None
    local = model_version_of(recommender_dir(cfg))
    alias_uri = f"models:/{found.name}@{tracking.PRODUCTION_ALIAS}"
    if local is None or local.version != found.version:
        have = f"version {local.version}" if local else "an unregistered checkpoint"
        raise StoreError(
            f"{alias_uri} is version {found.version}, but the workspace's checkpoint "
            f"{recommender_dir(cfg)} is {have}: run the full pipeline or move the alias"
        )
    logger.info("model %s resolves to version %s (%s)", alias_uri, found.version, found.uri)
    return f"{alias_uri} (version {found.version})"


@flow(name="evaluate")
def evaluate_flow(
    config: str | None = None,
    overrides: list[str] | None = None,
    parent_run_id: str | None = None,
) -> EvaluationSummary:
    """Stage 4: STORE vs the baselines on the test split; report + plot + eval_results,
    and in MLflow the results as a table and a comparison figure."""
    cfg = load_config(config, overrides)
    outcome = evaluate_stage(cfg, parent_run_id, remote_search(cfg))
    results = outcome.result.results
    table = reporting.evaluation_table(results)
    figure = reporting.comparison_figure(results)
    try:
        for run in (tracking.attach(cfg, outcome.run_id), tracking.attach(cfg, parent_run_id)):
            run.log_table(table, "evaluation_table.json")
            run.log_figure(figure, "evaluation_comparison.png")
    finally:
        import matplotlib.pyplot as plt

        plt.close(figure)
    return publish_stage(cfg, reporting.evaluate_report(outcome))


class _Stages:
    """Runs the stage subflows of one pipeline run in order. As each starts and ends, the
    parent flow run logs a progress line (what ``prefect deployment run --watch`` shows)
    and the MLflow parent run gets the stage's duration and headline metrics (a later
    failure keeps them)."""

    def __init__(self, run: tracking.Run, planned: list[str]) -> None:
        self.run = run
        self.planned = planned
        self.results: dict[str, StageSummary] = {}

    def __call__(self, name: str, call: Callable[[], StageSummary]) -> StageSummary:
        logger = get_run_logger()
        position = f"{self.planned.index(name) + 1}/{len(self.planned)}"
        label = name.replace("_", "-")
        logger.info("stage %s %s started", position, label)
        started = time.monotonic()
        result = call()
        elapsed = time.monotonic() - started
        headline = {k: round(v, 4) for k, v in result.headline.items()}
        self.run.log_metrics({**headline, f"duration_s/{name}": round(elapsed, 1)})
        self.results[name] = result
        logger.info("stage %s done in %.0f s: %s", position, elapsed, result.line or label)
        return result


@flow(name="store")
def store_pipeline(
    config: str | None = None,
    overrides: list[str] | None = None,
    evaluate: bool = True,
    job: Job = "full",
) -> PipelineSummary:
    """``job="full"``: every stage in order, each as a subflow with its own nested MLflow
    run; at the end the registered model's ``@production`` alias points at the version
    this run trained. ``job="retokenize"``: ingest the current catalogue, then give new
    and changed items semantic IDs with the ``@production`` model (no training)."""
    cfg = load_config(config, overrides)
    tags = {tracking.FLOW_RUN_TAG: str(flow_run.id or ""), "store.job": job}
    if deployment.id:
        tags[tracking.DEPLOYMENT_ID_TAG] = str(deployment.id)
        tags[tracking.DEPLOYMENT_NAME_TAG] = str(deployment.name)
    name = f"store-{job}-{flow_run.name or 'local'}"
    prefect_url = url_for("flow-run", obj_id=flow_run.id) if flow_run.id else None
    planned = ["ingest"]
    planned += ["train_tokenizer", "train_recommender"] if job == "full" else []
    planned += ["tokenize_catalogue"] + (["evaluate"] if job == "full" and evaluate else [])
    with (
        workspace_writer(cfg.workspace, f"pipeline ({job})"),
        tracking.pipeline_run(cfg, run_name=name, tags=tags) as run,
    ):
        stage = _Stages(run, planned)
        run.set_description(parent_description(job, prefect_url, deployment.name, stage.results))
        try:
            stage("ingest", lambda: ingest_flow(config, overrides, run.run_id))
            if job == "full":
                stage("train_tokenizer", lambda: tokenizer_flow(config, overrides, run.run_id))
                stage("train_recommender", lambda: recommender_flow(config, overrides, run.run_id))
            stage(
                "tokenize_catalogue",
                lambda: catalogue_flow(
                    config, overrides, run.run_id, use_alias=job == "retokenize"
                ),
            )
            if job == "full":
                promote(cfg, run, prefect_url)
            if job == "full" and evaluate:
                stage("evaluate", lambda: evaluate_flow(config, overrides, run.run_id))
        finally:
            run.set_description(
                parent_description(job, prefect_url, deployment.name, stage.results)
            )
    summary = PipelineSummary(
        job=job,
        workspace=cfg.workspace,
        data_dir=cfg.data_dir,
        duckdb=cfg.duckdb_path,
        models_dir=cfg.models_dir,
        mlflow_run_id=run.run_id,
        mlflow_run_url=run.url(tracking.ui_url(cfg)),
        mlflow_tracking_uri=redact(tracking.tracking_uri(cfg)) if cfg.tracking.enabled else None,
        stages=dict(stage.results),
    )
    publish_artifacts(cfg, summary)
    get_run_logger().info("pipeline finished: outputs under %s", cfg.workspace)
    return summary


def promote(cfg: StoreConfig, run: tracking.Run, prefect_url: str | None) -> None:
    """Point ``@production`` at the version this run trained and link the version to the
    pipeline run (MLflow parent run, Prefect flow run) in its description and tags."""
    from store_core.recommender_training import recommender_dir

    registered = model_version_of(recommender_dir(cfg))
    if registered is None or run.run_id is None:
        return
    version = tracking.ModelVersion(
        registered.name, registered.version, registered.run_id, registered.source
    )
    base = tracking.ui_url(cfg)
    pipeline = run.url(base)
    lines = [
        f"Phase B recommender, codebook `{registered.tags.get('codebook_version')}`.",
        "",
        "Trained by the STORE pipeline run "
        + (f"[{run.run_id}]({pipeline})" if pipeline else f"`{run.run_id}`")
        + (f" (Prefect flow run [{flow_run.name}]({prefect_url}))." if prefect_url else "."),
        f"Set as `@{tracking.PRODUCTION_ALIAS}`: the nightly job tokenizes with it.",
    ]
    tracking.describe_model_version(
        cfg,
        version,
        "\n".join(lines),
        {"store.pipeline_run_id": run.run_id, tracking.FLOW_RUN_TAG: str(flow_run.id or "")},
    )
    tracking.set_alias(cfg, version, tracking.PRODUCTION_ALIAS)  # logs the move
    tracking.show_model_on(cfg, version, run.run_id)  # the parent row's Models column


def parent_description(
    job: str,
    prefect_url: str | None,
    deployment_name: str | None,
    stages: dict[str, StageSummary],
) -> str:
    """The MLflow parent run's description (Markdown): the Prefect flow run as a link,
    then each finished stage's result line."""
    where = f"[{flow_run.name}]({prefect_url})" if prefect_url else f"`{flow_run.id}`"
    lines = [
        f"**STORE pipeline ({job})**: Prefect flow run {where}"
        + (f", deployment `{deployment_name}`" if deployment_name else ""),
        "",
        *(f"- {stage.line}" for stage in stages.values() if stage.line),
    ]
    return "\n".join(lines) + "\n"


def publish_artifacts(cfg: StoreConfig, summary: PipelineSummary) -> None:
    """Markdown artifacts on the flow run the user triggered (shown in the Prefect UI):
    the run summary, the catalogue changes and, after a full run, the evaluation. Keys
    are scoped to the experiment (:func:`flows.reporting.artifact_key`)."""
    experiment = cfg.tracking.experiment
    create_markdown_artifact(
        run_summary_markdown(summary),
        key=reporting.artifact_key(experiment, RUN_ARTIFACT),
        description=f"store ({summary.job}): where the outputs are",
    )
    catalogue = summary.catalogue
    create_markdown_artifact(
        catalogue.summary_markdown,
        key=reporting.artifact_key(experiment, CATALOGUE_ARTIFACT),
        description=catalogue.line,
    )
    evaluation = summary.evaluation
    if evaluation is not None:
        with open(evaluation.report) as report:
            text = report.read()
        create_markdown_artifact(
            text,
            key=reporting.artifact_key(experiment, EVALUATION_ARTIFACT),
            description="STORE vs the baselines on the test split (mean +- std over seeds)",
        )


def run_summary_markdown(summary: PipelineSummary) -> str:
    """Where a run's outputs are, as the Markdown of the run-summary artifact."""
    catalogue = summary.catalogue
    if summary.mlflow_run_url:
        mlflow_cell = f"[{summary.mlflow_run_id}]({summary.mlflow_run_url})"
    elif summary.mlflow_run_id:
        mlflow_cell = f"`{summary.mlflow_run_id}` at `{summary.mlflow_tracking_uri}`"
    else:
        mlflow_cell = "tracking off"
    version = catalogue.current_version
    version_text = (
        f"semantic-ID version {version} written"
        if catalogue.written
        else f"unchanged, current semantic-ID version {version}"
    )
    lines = [
        f"# store ({summary.job})",
        "",
        "| output | where |",
        "|---|---|",
        f"| workspace | `{summary.workspace}` |",
        f"| Parquet | `{summary.data_dir}` |",
        f"| DuckDB | `{summary.duckdb}` ({version_text}) |",
        f"| models | `{summary.models_dir}` |",
        f"| MLflow run | {mlflow_cell} |",
        "",
        "| stage | result |",
        "|---|---|",
        *(
            f"| {name} | {stage.line.split(': ', 1)[-1]} |"
            for name, stage in summary.stages.items()
        ),
        "",
        "| items | count |",
        "|---|---:|",
        *(f"| {k} | {v} |" for k, v in catalogue.counts.items()),
    ]
    return "\n".join(lines) + "\n"
