"""The ``store`` command line: one verb per stage plus the whole pipeline.

It lives outside the library: ``store_core`` never imports it, nor ``flows`` (Prefect);
``flows.pipeline`` is imported only when a verb runs a flow: ``run``, and
``tokenize-catalogue`` / ``evaluate`` when ``inference.workers`` or ``inference.address``
is set (their shard tasks then run on that Dask cluster, through the same flows the
deployments run).

Every verb takes ``--config`` (a YAML path or a shipped config name such as ``tiny``) and
repeatable ``--set key.path=value`` overrides. User errors are printed without a
traceback and exit with status 1. SIGTERM (Prefect cancellation, Kubernetes eviction,
``scancel``) stops a verb the way Ctrl-C does (:mod:`store_core.signals`): MLflow runs
are marked, partial outputs removed, and the exit status is 143 (130 after Ctrl-C).
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from store_cli.guard import OneLineErrorsGroup, err, guard, setup_logging
from store_core import signals
from store_core.config import StoreConfig, load_config
from store_core.redaction import redact
from store_core.telemetry import disable_telemetry

disable_telemetry()

out = Console()

app = typer.Typer(
    name="store",
    cls=OneLineErrorsGroup,
    help="STORE: one LLM for semantic tokenization and generative recommendation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

ConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--config", "-c", help="YAML config path or shipped name (ml-100k, scientific, tiny)."
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: --set data.kcore=5 (repeatable)."),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]


@app.callback()
def _entry() -> None:
    """STORE: one LLM for semantic tokenization and generative recommendation."""
    signals.install()  # SIGTERM unwinds like Ctrl-C in every verb


def _load(config: str | None, overrides: list[str] | None) -> StoreConfig:
    return guard(lambda: load_config(config, overrides or []))


@app.command()
def ingest(config: ConfigOpt = None, set_: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """Read the source into Parquet (items, interactions, splits, manifest) and DuckDB."""
    setup_logging(verbose)
    cfg = _load(config, set_)
    from store_core.stages import ingest_stage

    outcome = guard(lambda: ingest_stage(cfg))
    result = outcome.result
    table = Table(title="ingest", show_header=False)
    for key, value in result.counts.items():
        table.add_row(key, str(value))
    out.print(table)
    out.print(f"Parquet:  {result.data_dir}")
    out.print(f"DuckDB:   {cfg.duckdb_path}  (items: {result.catalog_changes})")
    if outcome.run_id:
        from store_core.tracking import tracking_uri

        out.print(f"MLflow:   run {outcome.run_id} at {redact(tracking_uri(cfg))}")


class Phase(StrEnum):
    tokenizer = "tokenizer"
    recommender = "recommender"


@app.command()
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    phase: Annotated[
        Phase | None,
        typer.Option(help="Train one phase only (default: every phase in order)."),
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Train the LLM: Phase A (tokenizer) = dense tokens with reconstruction + clustering
    into semantic IDs; Phase B (recommender) = multi-task generative training of the same
    model. Runs under `deepspeed`/`torchrun` launchers for several processes."""
    setup_logging(verbose)
    cfg = _load(config, set_)
    from store_core.stages import recommender_stage, tokenizer_stage

    phases = [phase] if phase else list(Phase)
    for selected in phases:
        if selected is Phase.tokenizer:
            outcome = guard(lambda: tokenizer_stage(cfg))
            if outcome.result is None:  # a non-zero rank under a launcher
                continue
            phase_a = outcome.result
            out.print(f"semantic IDs: {phase_a.num_items} items, all unique")
            out.print(
                f"collision rate before disambiguation: {phase_a.collision_rate:.4f}; "
                f"perplexity per level: " + ", ".join(f"{p:.1f}" for p in phase_a.perplexities)
            )
            out.print(f"checkpoint: {outcome.result.checkpoint_dir}")
            if outcome.run_id:
                out.print(f"MLflow run: {outcome.run_id}")
        else:
            rec = guard(lambda: recommender_stage(cfg))
            if rec.result is None:
                continue
            m = rec.result
            out.print(
                f"recommender ({m.variant}): best validation NDCG@10 "
                f"{m.best_val_ndcg_at_10 or float('nan'):.4f} at {m.best_when()}; "
                f"text->token agreement {m.agreement_full_id:.3f} (first code "
                f"{m.agreement_first_code:.3f})"
            )
            out.print(f"checkpoint: {rec.result.checkpoint_dir}")
            if rec.run_id:
                out.print(f"MLflow run: {rec.run_id}")


class CatalogueMode(StrEnum):
    """``store tokenize-catalogue --mode`` (store_core.stages.CATALOGUE_MODES)."""

    keep = "keep"
    regenerate = "regenerate"


@app.command("tokenize-catalogue")
def tokenize_catalogue(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    mode: Annotated[
        CatalogueMode,
        typer.Option(
            help="keep: unchanged items keep their IDs, new/changed get generated ones; "
            "regenerate: generate every item's ID from its text."
        ),
    ] = CatalogueMode.keep,
    verbose: VerboseOpt = False,
) -> None:
    """Write a new version of every item's semantic ID into DuckDB (one transaction).
    With ``inference.workers`` / ``inference.address`` set, the shards run on Dask."""
    setup_logging(verbose)
    cfg = _load(config, set_)
    if cfg.inference.scaled_out:  # shard tasks on the Dask cluster, through the flow
        from flows.pipeline import catalogue_flow

        summary = guard(lambda: catalogue_flow(config, set_ or [], None, mode.value))
        out.print(summary.line)
        out.print(f"DuckDB: {cfg.duckdb_path}")
        return
    from store_core.stages import catalogue_stage

    outcome = guard(lambda: catalogue_stage(cfg, mode=mode.value)).result
    counts = ", ".join(f"{k} {v}" for k, v in outcome.counts.items())
    if outcome.version is None:
        out.print(f"catalogue unchanged ({counts}): no new version written")
    else:
        out.print(f"semantic-ID version {outcome.version} written ({counts})")
    out.print(f"{outcome.items_per_s:.1f} items/s; DuckDB: {cfg.duckdb_path}")


@app.command()
def evaluate(config: ConfigOpt = None, set_: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """Evaluate STORE against TIGER-style, SASRec-CE and popularity on the test split.
    With ``inference.workers`` / ``inference.address`` set, user shards run on Dask."""
    setup_logging(verbose)
    cfg = _load(config, set_)
    if cfg.inference.scaled_out:  # user shards on the Dask cluster, through the flow
        from flows.pipeline import evaluate_flow

        summary = guard(lambda: evaluate_flow(config, set_ or [], None))
        report_path, plot_path = summary.report, summary.plot
    else:
        from store_core.stages import evaluate_stage

        outcome = guard(lambda: evaluate_stage(cfg)).result
        report_path, plot_path = outcome.report_path, outcome.plot_path
    out.print(Path(report_path).read_text(encoding="utf-8"))
    out.print(f"report: {report_path}\nplot:   {plot_path}")


@app.command()
def recommend(
    user: Annotated[str | None, typer.Option("--user", "-u", help="A user id.")] = None,
    history: Annotated[
        str | None, typer.Option(help="An ad-hoc history: comma-separated item ids, oldest first.")
    ] = None,
    k: Annotated[
        int,
        typer.Option("-k", help="How many items: 1 to 1000 (store_core.recommend_top_k.MAX_K)."),
    ] = 10,
    exclude_history: Annotated[
        bool, typer.Option(help="Never recommend an item from the (whole) history.")
    ] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines output.")] = False,
) -> None:
    """Top-K items for a user (their whole history) or an ad-hoc history."""
    cfg = _load(config, set_)
    if (user is None) == (history is None):
        err.print("[bold red]error:[/] give exactly one of --user or --history")
        raise typer.Exit(code=2)
    from store_core.bundle import load_bundle
    from store_core.recommend_top_k import check_request, user_history
    from store_core.recommend_top_k import recommend as run_recommend
    from store_core.recommender_training import recommender_dir

    def go() -> list[Any]:
        items = user_history(cfg, user) if user is not None else (history or "").split(",")
        items = [i.strip() for i in items if i.strip()]
        check_request(items, k)  # before the model is loaded
        bundle = load_bundle(recommender_dir(cfg))
        return run_recommend(cfg, bundle, items, k, exclude_history=exclude_history)

    recs = guard(go)
    if as_json:
        for rec in recs:
            sys.stdout.write(json.dumps(rec.__dict__) + "\n")
        return
    table = Table("rank", "item_id", "title", "score", "semantic ID")
    for rec in recs:
        table.add_row(str(rec.rank), rec.item_id, rec.title or "", f"{rec.score:.3f}", rec.sid)
    out.print(table)


@app.command()
def run(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    evaluate: Annotated[
        bool, typer.Option(help="Run the evaluation stage (STORE vs the baselines).")
    ] = True,
    verbose: VerboseOpt = False,
) -> None:
    """Run the whole pipeline as the Prefect flow ``store`` (a local temporary server is
    started when PREFECT_API_URL is not set)."""
    setup_logging(verbose)
    cfg = _load(config, set_)
    from flows.pipeline import store_pipeline

    summary = guard(lambda: store_pipeline(config, set_ or [], evaluate))
    out.print("[bold green]pipeline finished[/]")
    out.print(f"Workspace: {cfg.workspace}")
    out.print(f"Parquet:   {summary.data_dir}")
    out.print(f"DuckDB:    {summary.duckdb}")
    out.print(f"Models:    {summary.models_dir}")
    catalogue = summary.catalogue
    out.print(f"Semantic IDs: {catalogue.line.removeprefix('tokenize-catalogue: ')}")
    if summary.evaluation is not None:
        out.print(f"Report:    {summary.evaluation.report}")
    if summary.mlflow_run_id:
        uri = redact(str(summary.mlflow_tracking_uri))
        out.print(
            f"MLflow:    run {summary.mlflow_run_url}"
            if summary.mlflow_run_url
            else f"MLflow:    run {summary.mlflow_run_id} at {uri}"
            f"  (UI: mlflow ui --backend-store-uri {uri})"
        )


@app.command()
def serve(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    stop: Annotated[
        bool, typer.Option("--stop", help="Stop the `store serve` running for this workspace.")
    ] = False,
    prefect_port: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=65535,
            help="Prefect server port on 127.0.0.1 (default 4200, else a free one).",
        ),
    ] = None,
    mlflow: Annotated[
        bool, typer.Option("--mlflow", help="Also serve the MLflow UI on the workspace store.")
    ] = False,
    mlflow_port: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=65535,
            help="MLflow server port on 127.0.0.1 (default 5000, else a free one).",
        ),
    ] = None,
    schedule: Annotated[
        bool, typer.Option(help="Schedule nightly-retokenize (service.nightly_cron).")
    ] = True,
    verbose: VerboseOpt = False,
) -> None:
    """Run the pipeline as a service on this machine: a Prefect server on 127.0.0.1
    (unless PREFECT_API_URL is set), the deployments store/full-pipeline and
    store/nightly-retokenize, and with --mlflow an MLflow UI. Ctrl-C or
    `store serve --stop` stops everything."""
    setup_logging(verbose)
    cfg = _load(config, set_)
    from store_core import service_supervisor as local

    if stop:
        stopped = guard(lambda: local.stop_running(cfg))
        out.print("stopped" if stopped else f"no `store serve` running for {cfg.workspace}")
        return
    stack = local.LocalStack(
        cfg,
        config,
        set_ or [],
        prefect_port=prefect_port,
        mlflow=mlflow,
        mlflow_port=mlflow_port,
        schedule=schedule,
    )
    guard(stack.start)
    urls = stack.urls
    out.print("[bold green]store is being served[/] (Ctrl-C or `store serve --stop` stops it)")
    out.print(f"Prefect UI:   {urls['prefect_ui']}")
    if "mlflow_ui" in urls:
        out.print(f"MLflow UI:    {urls['mlflow_runs']}")
    out.print(
        f"Deployments:  store/full-pipeline, store/nightly-retokenize "
        f"(cron '{cfg.service.nightly_cron}' {cfg.service.timezone}"
        f"{'' if schedule else ', not scheduled'})"
    )
    out.print("In another terminal:")
    out.print(f"  export PREFECT_API_URL={urls['prefect_api']}")
    out.print("  prefect deployment run store/full-pipeline --watch")
    out.print(f"Logs:         {local.serve_dir(cfg)}/*.log")
    sys.stdout.flush()
    raise typer.Exit(stack.watch())


@app.command()
def query(
    sql: Annotated[
        str,
        typer.Argument(
            help="One SELECT statement, run read-only in a sandbox (the workspace database "
            "only: no files, ATTACH, extensions or SET)."
        ),
    ],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print rows as JSON lines.")] = False,
) -> None:
    """Query the workspace DuckDB database: one read-only SELECT, sandboxed.

    Anything else (COPY, EXPORT, ATTACH, PRAGMA, SET, INSTALL/LOAD, writes, several
    statements, reading other files) is refused with one error line and exit status 1.
    """
    cfg = _load(config, set_)
    from store_core.storage import query as run_query

    columns, rows = guard(lambda: run_query(cfg.duckdb_path, sql))
    if as_json:
        for row in rows:
            out.print_json(json.dumps(dict(zip(columns, row, strict=True)), default=str))
        return
    table = Table()
    for column in columns:
        table.add_column(Text(column))
    for row in rows:
        table.add_row(*(Text(str(v)) for v in row))  # Text: values are not rich markup
    out.print(table)


@config_app.command("show")
def config_show(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved config (defaults < YAML < --set) as JSON."""
    cfg = _load(config, set_)
    sys.stdout.write(json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n")
