"""Recommendation quality over seeds: every stage per seed, then every system on the test
split, reported as mean +- std over the seeds.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.quality --config ml-100k-quality \\
        --seeds 0 1 2

For each seed N, in its own workspace ``<workspace>-seedN`` (``<workspace>`` is the
config's, after ``--set``), with the overrides ``tokenizer_train.seed=N``,
``recommender_train.seed=N`` and ``evaluation.sasrec_seeds=[N]``, through the library:
``stages.ingest_stage``, ``stages.tokenizer_stage`` and ``stages.recommender_stage``
(Phase A + B of STORE; skipped when ``--systems`` leaves ``store`` out), then
``evaluation.run_systems`` (which trains the TIGER-style variant on demand). The source
is resolved once (a built-in dataset is fetched into the first seed's workspace cache)
and shared by every seed's ingest. With tracking enabled the stages nest under one MLflow
run per seed (``quality-<config>-seedN``) that also gets ``<system>/<metric>``. Each
seed's results go to ``<workspace>-seedN/quality_results.json`` first, so ``--resume``
skips a seed whose file exists (when it was made with the same config, overrides,
systems and resolved settings; otherwise it stops rather than mix runs). ``--resume``
also keeps the seeds that benchmarks/results/quality_<config>.json already holds for the
same config file name, overrides (apart from ``workspace=``), systems and resolved
settings (an edited config file, e.g. a decoding setting, does not resume; a setting
added to the schema later is not compared; a table made before settings were recorded
does not resume), so a table grows across sessions and
machines (e.g. seeds 0-1 here, seed 2 on a GPU box) without the old workspaces.

Writes benchmarks/results/quality_<config>.json (every seed's metrics, per-stage seconds,
machine, config) and benchmarks/results/quality_<config>.md
(``evaluation.markdown_report``: mean +- std over the seeds) and prints the report.
``--systems store tiger sasrec popularity`` picks the systems (default: the config's).
Popularity has no seed: it is run (identically) for every seed. Dry run of the whole path
on the tiny config (tens of seconds per seed):

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.quality --config tiny --seeds 0 1 \\
        --set workspace=/tmp/store-quality-tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, get_args

from benchmarks.machine import machine_info
from store_core.config import StoreConfig, SystemName, load_config, resolve_config_path
from store_core.ingest import ResolvedSource, resolve_source

RESULTS = Path(__file__).resolve().parent / "results"
SEED_FILE = "quality_results.json"

logger = logging.getLogger("benchmarks.quality")


def seed_overrides(base: StoreConfig, seed: int, systems: list[str] | None) -> list[str]:
    """The overrides that make ``base`` the run of one seed (appended after the user's)."""
    out = [
        f"workspace={base.workspace}-seed{seed}",
        f"tokenizer_train.seed={seed}",
        f"recommender_train.seed={seed}",
        f"evaluation.sasrec_seeds=[{seed}]",
    ]
    if systems is not None:
        out.append(f"evaluation.systems=[{','.join(systems)}]")
    return out


def run_seed(
    config: str,
    overrides: list[str],
    seed: int,
    run_key: dict[str, Any],
    source: ResolvedSource | None,
) -> tuple[dict[str, Any], ResolvedSource]:
    """Every stage for one seed, then every configured system: (the seed's record, the
    resolved source, to share with the next seeds)."""
    from store_core import tracking
    from store_core.evaluation import aggregate, run_systems
    from store_core.stages import ingest_stage, recommender_stage, tokenizer_stage

    cfg = load_config(config, overrides)
    if source is None:
        source = resolve_source(cfg)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    run_name = f"quality-{Path(config).stem}-seed{seed}"
    tags = {"store.benchmark": "quality", "store.seed": str(seed)}
    with tracking.pipeline_run(cfg, run_name=run_name, tags=tags) as parent:
        t0 = time.perf_counter()
        ingest_stage(cfg, parent.run_id, source)
        seconds["ingest"] = time.perf_counter() - t0
        if "store" in cfg.evaluation.systems:
            t0 = time.perf_counter()
            tokenizer_stage(cfg, parent.run_id)
            seconds["train_tokenizer"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            recommender_stage(cfg, parent.run_id)
            seconds["train_recommender"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        results = run_systems(cfg)
        seconds["evaluate"] = time.perf_counter() - t0
        for system, metrics in aggregate(results).items():
            parent.log_metrics({f"{system}/{k}": mean for k, (mean, _, _) in metrics.items()})
    seconds["total"] = time.perf_counter() - started
    record = {
        **run_key,
        "seed": seed,
        "workspace": cfg.workspace,
        "mlflow_run_id": parent.run_id,
        "stage_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "results": [dataclasses.asdict(r) for r in results],
    }
    return record, source


def _comparable(key: dict[str, Any]) -> dict[str, Any]:
    """A run key without what differs between checkouts: the config's directory and the
    workspace override."""
    return {
        "config": Path(str(key.get("config"))).name,
        "overrides": [o for o in key.get("overrides") or [] if not o.startswith("workspace=")],
        "systems": key.get("systems"),
    }


def flat_settings(cfg: StoreConfig) -> dict[str, Any]:
    """The resolved config as ``{"section.field": value}`` (JSON values), workspace left
    out: what a run key records so that ``--resume`` notices an edited config file."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            out[prefix] = value

    walk("", cfg.model_dump(mode="json", exclude={"workspace"}))
    return out


def same_settings(stored: dict[str, Any] | None, current: dict[str, Any]) -> bool:
    """Whether a stored run's settings match: every setting both know has the same value
    (a setting added to the config schema later is absent from old runs and not compared).
    A run without recorded settings (made before they were recorded) does not match."""
    if not stored:
        return False
    return all(stored[k] == v for k, v in current.items() if k in stored)


def _matches(stored: dict[str, Any], run_key: dict[str, Any]) -> bool:
    """Whether a stored run key is this run's (:func:`_comparable`, :func:`same_settings`)."""
    return _comparable(stored) == _comparable(run_key) and same_settings(
        stored.get("settings"), run_key.get("settings", {})
    )


def workspace_record(seed_file: Path, run_key: dict[str, Any]) -> dict[str, Any]:
    """A seed's results file from its workspace, for ``--resume``; SystemExit when it was
    made with another config file name, overrides (apart from ``workspace=``) or systems.

    Compared like :func:`published_records`, so a workspace still resumes when the run
    starts from another checkout of the same configs. The record carries this run's key.
    """
    record: dict[str, Any] = json.loads(seed_file.read_text())
    stored = {k: record.get(k) for k in run_key}
    if not _matches(stored, run_key):
        raise SystemExit(
            f"--resume: {seed_file} was made with {stored}, this run is {run_key}; "
            "remove it (or the workspace) or run without --resume"
        )
    return {**record, **run_key}


def published_records(path: Path, run_key: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The seeds a results file already holds for the same config, overrides and systems
    (so ``--resume`` continues a table across machines or sessions whose workspaces are
    gone). A file made with other settings gives nothing."""
    if not path.is_file():
        return {}
    report = json.loads(path.read_text())
    if not _matches(report.get("config", {}), run_key):
        return {}
    records = {}
    for seed in report.get("seeds", []):
        extra = seed.get("extra", {})
        results = [{**r, "extra": extra.get(r["system"], {})} for r in seed["results"]]
        records[int(seed["seed"])] = {
            **run_key,
            **{k: seed[k] for k in ("seed", "workspace", "mlflow_run_id", "stage_seconds")},
            "results": results,
        }
    return records


def _json_default(value: Any) -> Any:
    """numpy scalars/arrays and anything else the results' ``extra`` may hold."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="ml-100k-quality", help="config name or path")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="key=value (repeatable)"
    )
    parser.add_argument(
        "--systems",
        nargs="+",
        choices=get_args(SystemName),
        default=None,
        help="systems to evaluate (default: the config's evaluation.systems)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="skip seeds whose results exist (the seed's workspace file, or the same "
        "config's seeds in benchmarks/results/<name>.json)",
    )
    parser.add_argument(
        "--name", default=None, help="results file stem (default quality_<config name>)"
    )
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True
    )
    for noisy in ("httpx", "alembic", "urllib3", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    config_name = Path(args.config).stem
    name = args.name or f"quality_{config_name}"
    base = load_config(args.config, args.overrides)
    systems = list(dict.fromkeys(args.systems)) if args.systems else None
    run_key = {
        "config": str(resolve_config_path(args.config).resolve()),
        "overrides": args.overrides,
        "systems": systems or list(base.evaluation.systems),
        "settings": flat_settings(base),
    }
    command = shlex.join(["python", "-m", "benchmarks.quality", *sys.argv[1:]])
    report: dict[str, Any] = {
        "machine": machine_info(),
        "config": {
            **run_key,
            "seeds": args.seeds,
            "base_workspace": base.workspace,
            "command": command,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },
    }
    print(json.dumps(report, indent=2), flush=True)

    from store_core.evaluation import SystemResult, aggregate, markdown_report

    started = time.perf_counter()
    records: list[dict[str, Any]] = []
    source: ResolvedSource | None = None
    published = published_records(RESULTS / f"{name}.json", run_key) if args.resume else {}
    for seed in args.seeds:
        overrides = [*args.overrides, *seed_overrides(base, seed, systems)]
        seed_file = Path(f"{base.workspace}-seed{seed}") / SEED_FILE
        if args.resume and seed_file.exists():
            records.append(workspace_record(seed_file, run_key))
            logger.info("seed %d: results exist in %s, skipped (--resume)", seed, seed_file)
            continue
        if seed in published:
            logger.info("seed %d: results exist in %s.json, skipped (--resume)", seed, name)
            records.append(published[seed])
            continue
        logger.info("seed %d: workspace %s", seed, seed_file.parent)
        record, source = run_seed(args.config, overrides, seed, run_key, source)
        seed_file.parent.mkdir(parents=True, exist_ok=True)
        seed_file.write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
        logger.info("seed %d done in %.0f s: %s", seed, record["stage_seconds"]["total"], seed_file)
        records.append(record)

    results = [
        SystemResult(r["system"], r["seed"], r["metrics"], r.get("extra", {}))
        for record in records
        for r in record["results"]
    ]
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["seeds"] = [
        {
            "seed": r["seed"],
            "workspace": r["workspace"],
            "mlflow_run_id": r["mlflow_run_id"],
            "stage_seconds": r["stage_seconds"],
            "results": [{k: v for k, v in x.items() if k != "extra"} for x in r["results"]],
            "extra": {x["system"]: x.get("extra", {}) for x in r["results"]},
        }
        for r in records
    ]
    report["aggregate"] = {
        system: {k: {"mean": m, "std": s, "n": n} for k, (m, s, n) in metrics.items()}
        for system, metrics in aggregate(results).items()
    }
    dataset = base.data.name or base.data.dataset or Path(base.data.path or "dataset").name
    markdown = markdown_report(
        results,
        f"Quality on {dataset}: {config_name}, seeds {', '.join(map(str, args.seeds))}",
        [
            f"command: `{command}`",
            "mean ± std over seeds (sample std, ddof=1); one value where a system ran once",
            "per seed N: tokenizer_train.seed=N, recommender_train.seed=N, "
            "evaluation.sasrec_seeds=[N]; popularity has no seed",
            f"results: {name}.json",
        ],
    )
    print(markdown)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(
        json.dumps(report, indent=2, default=_json_default) + "\n"
    )
    (RESULTS / f"{name}.md").write_text(markdown)
    print(f"wrote {RESULTS / name}.json and .md ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
