"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

The only module that imports mlflow. It talks to MLflow through ``MlflowClient`` with
explicit run ids (no global "active run"), so stages running as Prefect subflows, in
threads or in other processes log to the right run when given its id. mlflow is imported
only when a run is opened with tracking enabled: a run with ``tracking.enabled: false``
neither imports it nor needs it installed (a GPU box with torch alone, say).

Everything a :class:`Run` sends as text goes through :func:`store_core.redaction.redact`
first: params, tags, run names, :meth:`Run.log_dict` and :meth:`Run.log_text` artifacts,
so credentials in a ``tracking.uri``, ``data.path`` or any other config URI
(``s3://KEY:SECRET@bucket``, ``postgresql://user:pw@host``, ``?token=...``) are stored
as ``s3://***@bucket``. Files given to :meth:`Run.log_artifact` /
:meth:`Run.log_artifacts` (checkpoints, reports, plots) are uploaded as they are: they
hold no config URI.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from store_core.config import StoreConfig
from store_core.redaction import redact, redact_value
from store_core.signals import deferred
from store_core.telemetry import disable_telemetry

disable_telemetry()  # before mlflow (or anything it loads) is first imported

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
FLOW_RUN_TAG = "prefect.flow_run_id"
STAGE_TAG = "store.stage"
DEPLOYMENT_ID_TAG = "prefect.deployment_id"
DEPLOYMENT_NAME_TAG = "prefect.deployment_name"
WORKSPACE_TAG = "store.workspace"
HOST_TAG = "store.host"
PID_TAG = "store.pid"
ENDED_BY_TAG = "store.ended_by"
#: MLflow renders this run tag as the run's Markdown description.
DESCRIPTION_TAG = "mlflow.note.content"
#: The experiment tag MLflow 3's UI reads to choose its view: with this value it opens
#: the runs table (classic ML), not the GenAI view (traces, tokens, cost).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: The registered-model alias the full pipeline moves to its new version and the nightly
#: job resolves (``models:/<name>@production``).
PRODUCTION_ALIAS = "production"
#: Set by ``store serve --mlflow`` for the flow runs it serves: the MLflow UI's base URL.
UI_URL_ENV = "STORE_MLFLOW_UI_URL"


def tracking_uri(cfg: StoreConfig) -> str:
    """The configured URI, else ``MLFLOW_TRACKING_URI``, else SQLite in the workspace."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = Path(cfg.workspace) / "mlflow" / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def artifact_location(cfg: StoreConfig) -> str | None:
    """Where a new experiment keeps its artifacts: the configured location; else, with a
    tracking server (http/https URI), the server's own (None: it proxies uploads to its
    artifact store); else ``<workspace>/mlflow/artifacts``."""
    if cfg.tracking.artifact_location:
        return cfg.tracking.artifact_location
    if tracking_uri(cfg).startswith(("http://", "https://")):
        return None
    return (Path(cfg.workspace) / "mlflow" / "artifacts").as_uri()


class SignalSafeClient:
    """An ``MlflowClient`` whose every method call runs with SIGTERM and Ctrl-C held back
    (:func:`store_core.signals.deferred`): a stop that arrives while MLflow reads or writes
    its store takes effect when that call returns. Raised in the middle of a call, it left
    SQLAlchemy's SQLite transaction open, and the cleanup that marks the run KILLED then
    failed with "database is locked" (exit 1, the run left RUNNING). One call is one short
    store round trip, so the stop waits milliseconds (an artifact upload: its duration)."""

    def __init__(self, client: MlflowClient) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        @functools.wraps(attribute)
        def call(*args: Any, **kwargs: Any) -> Any:
            with deferred():
                return cast(Callable[..., Any], attribute)(*args, **kwargs)

        return call


def _new_client(uri: str) -> MlflowClient:
    """An ``MlflowClient`` on ``uri`` behind :class:`SignalSafeClient`."""
    from mlflow.tracking import MlflowClient

    return cast("MlflowClient", SignalSafeClient(MlflowClient(tracking_uri=uri)))


class Run:
    """A handle on one MLflow run; every method is a no-op when tracking is disabled."""

    def __init__(
        self, client: MlflowClient | None, run_id: str | None, experiment_id: str | None = None
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id

    def url(self, base: str | None) -> str | None:
        """This run's page under the MLflow UI at ``base`` (None without a UI or run)."""
        if base is None or self.run_id is None or self.experiment_id is None:
            return None
        return run_url(base, self.experiment_id, self.run_id)

    def set_description(self, markdown: str) -> None:
        """The run's description (Markdown, shown on its page; redacted)."""
        self.set_tags({DESCRIPTION_TAG: markdown[:5000]})

    def log_table(self, data: Mapping[str, list[Any]], file_name: str) -> None:
        """A table (column -> values) as an MLflow table artifact (``*.json``), shown as
        a table on the run's Artifacts tab."""
        if self.client is None or self.run_id is None:
            return
        self.client.log_table(self.run_id, dict(data), file_name)

    def log_figure(self, figure: Any, file_name: str) -> None:
        """A matplotlib figure as an image artifact."""
        if self.client is None or self.run_id is None:
            return
        self.client.log_figure(self.run_id, figure, file_name)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.client is None or self.run_id is None:
            return
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key, float(value), step=step or 0)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params, each value as redacted text (cut to MLflow's 6000 characters)."""
        if self.client is None or self.run_id is None:
            return
        for key, value in params.items():
            self.client.log_param(self.run_id, key, redact(str(value))[:6000])

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        if self.client is None or self.run_id is None:
            return
        self.client.log_artifact(self.run_id, local_path, artifact_path)

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        if self.client is None or self.run_id is None:
            return
        self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def log_dict(self, obj: Any, file_name: str) -> None:
        """Log a JSON-serialisable object as an artifact file (strings redacted)."""
        if self.client is None or self.run_id is None:
            return
        text = json.dumps(redact_value(obj), indent=2, sort_keys=True, default=str)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / file_name
            path.write_text(redact(text))
            self.client.log_artifact(self.run_id, str(path))

    def log_text(self, text: str, file_name: str) -> None:
        """Log a text (e.g. a Markdown summary) as an artifact file (redacted)."""
        if self.client is None or self.run_id is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / file_name
            path.write_text(redact(text))
            self.client.log_artifact(self.run_id, str(path))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set tags, each value redacted."""
        if self.client is None or self.run_id is None:
            return
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, redact(str(value)))


def _client(cfg: StoreConfig, uri: str | None = None) -> tuple[MlflowClient, str]:
    """A client on ``uri`` (default :func:`tracking_uri`) and the configured experiment's
    id, creating the experiment (marked as a classic ML experiment) on first use."""
    client = _new_client(uri or tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        experiment_id = client.create_experiment(
            cfg.tracking.experiment,
            artifact_location=artifact_location(cfg),
            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
        )
    else:
        experiment_id = experiment.experiment_id
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # created by an older STORE
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return client, experiment_id


def ensure_experiment(cfg: StoreConfig, uri: str | None = None) -> str:
    """The configured experiment's id on ``uri`` (default :func:`tracking_uri`), created
    when missing. Raises what MLflow raises for an unreachable or broken store."""
    return _client(cfg, uri)[1]


def ui_url(cfg: StoreConfig) -> str | None:
    """The MLflow UI's base URL: ``$STORE_MLFLOW_UI_URL`` (``store serve --mlflow`` sets
    it), else an http(s) tracking URI (a tracking server serves its UI), else None."""
    if os.environ.get(UI_URL_ENV):
        return redact(os.environ[UI_URL_ENV]).rstrip("/")
    uri = tracking_uri(cfg)
    return redact(uri).rstrip("/") if uri.startswith(("http://", "https://")) else None


def experiment_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table in the MLflow UI (not its GenAI view)."""
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """One run's page in the MLflow UI (in its classic-ML view)."""
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def model_version_url(base: str, name: str, version: str) -> str:
    """A registered model version's page in the MLflow UI."""
    return f"{base}/#/models/{name}/versions/{version}"


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested config dict into ``a.b.c`` keys (MLflow params are flat)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


@contextmanager
def _run(cfg: StoreConfig, run_name: str, tags: Mapping[str, str]) -> Iterator[Run]:
    if not cfg.tracking.enabled:
        yield Run(None, None)
        return
    client, experiment_id = _client(cfg)
    from mlflow.entities import RunStatus

    owner = _owner(cfg)
    reap_orphaned_runs(client, experiment_id, owner[WORKSPACE_TAG])
    safe_tags = {key: redact(str(value)) for key, value in {**tags, **owner}.items()}
    info = client.create_run(experiment_id, run_name=redact(run_name), tags=safe_tags).info
    run = Run(client, info.run_id, experiment_id)
    try:
        yield run
    except BaseException as exc:
        status = RunStatus.KILLED if _stopped(exc) else RunStatus.FAILED
        client.set_terminated(info.run_id, RunStatus.to_string(status))
        raise
    client.set_terminated(info.run_id, RunStatus.to_string(RunStatus.FINISHED))


def _stopped(exc: BaseException) -> bool:
    """Ctrl-C, SIGTERM (:class:`store_core.signals.Terminated` is a KeyboardInterrupt) or
    Prefect's own termination signal (matched by name: store_core never imports prefect)."""
    return isinstance(exc, KeyboardInterrupt) or any(
        cls.__name__ == "TerminationSignal" for cls in type(exc).__mro__
    )


def _owner(cfg: StoreConfig) -> dict[str, str]:
    """Tags that say which process on which host writes a run, for :func:`reap_orphaned_runs`."""
    return {
        WORKSPACE_TAG: str(Path(cfg.workspace).resolve()),
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(os.getpid()),
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def reap_orphaned_runs(client: MlflowClient, experiment_id: str, workspace: str) -> list[str]:
    """Mark KILLED the RUNNING runs of ``workspace`` whose writer process is gone.

    A process killed with SIGKILL (the OOM killer, ``kill -9``, a node lost) cannot end
    its MLflow runs; they would show RUNNING forever. Every run STORE opens is tagged with
    its workspace, host and pid; before a new run is opened, the RUNNING runs of the same
    workspace on this host whose pid no longer exists are ended KILLED and tagged
    ``store.ended_by``. Runs of other hosts, of live processes and runs without the tags
    (other tools) are left alone. Returns the reaped run ids. Raises what MLflow raises.
    """
    from mlflow.entities import RunStatus

    host = socket.gethostname()
    reaped: list[str] = []
    running = client.search_runs(
        [experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000
    )
    for found in running:
        tags = found.data.tags
        if tags.get(WORKSPACE_TAG) != workspace or tags.get(HOST_TAG) != host:
            continue
        pid = tags.get(PID_TAG, "")
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        client.set_tag(found.info.run_id, ENDED_BY_TAG, f"reaped: process {pid} is gone")
        client.set_terminated(found.info.run_id, RunStatus.to_string(RunStatus.KILLED))
        reaped.append(found.info.run_id)
    if reaped:
        logger.warning(
            "marked %d MLflow run(s) KILLED whose process was killed: %s",
            len(reaped),
            ", ".join(reaped),
        )
    return reaped


@contextmanager
def pipeline_run(
    cfg: StoreConfig, *, run_name: str = "store", tags: Mapping[str, str] | None = None
) -> Iterator[Run]:
    """The parent run of one pipeline run; logs the resolved config as params + artifact."""
    with _run(cfg, run_name, dict(tags or {})) as run:
        config = cfg.model_dump(mode="json")
        run.log_params(flatten(config))
        run.log_dict(config, "config.json")
        if run.run_id:
            logger.info("MLflow run %s at %s", run.run_id, redact(tracking_uri(cfg)))
        yield run


def attach(cfg: StoreConfig, run_id: str | None) -> Run:
    """A handle on an existing run (a stage's, after it ended): no-op when tracking is
    disabled or ``run_id`` is None."""
    if not cfg.tracking.enabled or run_id is None:
        return Run(None, None)
    client = _new_client(tracking_uri(cfg))
    return Run(client, run_id, client.get_run(run_id).info.experiment_id)


@contextmanager
def stage_run(cfg: StoreConfig, stage: str, parent_run_id: str | None = None) -> Iterator[Run]:
    """A run for one stage, nested under ``parent_run_id`` when given."""
    tags = {STAGE_TAG: stage}
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    with _run(cfg, stage, tags) as run:
        yield run


@dataclass(frozen=True)
class ModelVersion:
    """A model version in the MLflow registry: ``models:/<name>/<version>``."""

    name: str
    version: str
    run_id: str
    source: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def to_json(self) -> dict[str, str]:
        return {
            "name": self.name,
            "version": self.version,
            "run_id": self.run_id,
            "source": self.source,
            "uri": self.uri,
        }


def registered_model_name(cfg: StoreConfig) -> str:
    return cfg.tracking.registered_model or f"{cfg.tracking.experiment}-recommender"


def register_model(
    cfg: StoreConfig,
    run: Run,
    artifact_path: str,
    *,
    tags: Mapping[str, str] | None = None,
    description: str = "",
) -> ModelVersion | None:
    """Register ``<run's artifacts>/<artifact_path>`` as a new version of the configured
    registered model (created on first use); None when tracking is disabled."""
    if run.client is None or run.run_id is None:
        return None
    from mlflow.exceptions import MlflowException

    client = run.client
    name = registered_model_name(cfg)
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(
            name, description="STORE: one LLM for semantic IDs and generative recommendation."
        )
    source = f"{client.get_run(run.run_id).info.artifact_uri}/{artifact_path}"
    safe_tags = {key: redact(str(value)) for key, value in (tags or {}).items()}
    version = client.create_model_version(
        name, source, run_id=run.run_id, tags=safe_tags, description=redact(description)
    )
    _record_logged_model(client, run.run_id, artifact_path)
    logger.info("registered model %s version %s (run %s)", name, version.version, run.run_id)
    return ModelVersion(name, str(version.version), run.run_id, source)


#: The run tag MLflow's runs table reads for its "Models" column (what ``mlflow.<flavor>.
#: log_model`` records): one entry per model logged by the run.
LOGGED_MODELS_TAG = "mlflow.log-model.history"


def _record_logged_model(
    client: MlflowClient, run_id: str, artifact_path: str, on_run: str | None = None
) -> None:
    """Record ``<run>/<artifact_path>`` as a model the run logged, so the runs table's
    Models column shows it (linked to its registered version); ``on_run``: the run whose
    row shows it (default: ``run_id`` itself)."""
    import datetime
    import uuid

    entry = {
        "run_id": run_id,
        "artifact_path": artifact_path,
        "utc_time_created": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S.%f"),
        "flavors": {"store_checkpoint": {"format": "safetensors + tokenizer"}},
        "model_uuid": uuid.uuid4().hex,
    }
    client.set_tag(on_run or run_id, LOGGED_MODELS_TAG, json.dumps([entry]))


def show_model_on(cfg: StoreConfig, version: ModelVersion, run_id: str) -> None:
    """Show ``version`` (logged by its training run) in the Models column of ``run_id``'s
    row too: the pipeline's parent run, so pipeline runs list the model they produced."""
    if not cfg.tracking.enabled:
        return
    client = _new_client(tracking_uri(cfg))
    artifact_path = version.source.rstrip("/").rsplit("/", 1)[-1]
    _record_logged_model(client, version.run_id, artifact_path, on_run=run_id)


def set_alias(cfg: StoreConfig, version: ModelVersion, alias: str = PRODUCTION_ALIAS) -> None:
    """Point ``models:/<name>@<alias>`` at ``version`` (moved from any earlier one)."""
    if not cfg.tracking.enabled:
        return
    client = _new_client(tracking_uri(cfg))
    client.set_registered_model_alias(version.name, alias, version.version)
    logger.info("models:/%s@%s is now version %s", version.name, alias, version.version)


def model_by_alias(cfg: StoreConfig, alias: str = PRODUCTION_ALIAS) -> ModelVersion | None:
    """The version ``models:/<name>@<alias>`` points at; None when tracking is disabled or
    the model or alias does not exist. Raises what MLflow raises for other errors."""
    if not cfg.tracking.enabled:
        return None
    from mlflow.exceptions import MlflowException

    client = _new_client(tracking_uri(cfg))
    name = registered_model_name(cfg)
    try:
        found = client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    return ModelVersion(name, str(found.version), str(found.run_id), str(found.source))


def describe_model_version(
    cfg: StoreConfig, version: ModelVersion, markdown: str, tags: Mapping[str, str]
) -> None:
    """Add links (Markdown description) and tags to a registered model version."""
    if not cfg.tracking.enabled:
        return
    client = _new_client(tracking_uri(cfg))
    client.update_model_version(version.name, version.version, description=redact(markdown))
    for key, value in tags.items():
        client.set_model_version_tag(version.name, version.version, key, redact(str(value)))
