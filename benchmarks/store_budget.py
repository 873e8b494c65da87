"""STORE quality against its Phase B training budget: the counterpart of sasrec_budget.py.

    python -m benchmarks.store_budget --config ml-100k-quality --seed 0 --epochs 12 \\
        --time-budget-s 420 --set tracking.enabled=false

Runs ingest and Phase A for one seed (a finished Phase A in the workspace is reused), then
Phase B sized in epochs of the task mixture, validating ``--evals-per-epoch`` times per
epoch (early stopping on validation NDCG@10 as configured; the best weights are kept),
then ranks the test split with the trained model exactly as ``store evaluate`` does.

One epoch renders every sample of the mixture once; its recommendation samples are the
train prefixes that SASRec-CE labels once per epoch (see sasrec_budget.py), so "E epochs"
compares across the two scripts. The quality configs give Phase B a fixed number of steps
(``max_steps``); here ``max_steps`` is derived from the epochs instead.

With ``--time-budget-s T`` it first times Phase B on this machine: ``--probe-steps``
optimizer steps on a throw-away copy of the Phase A model, then one validation pass. It
then lowers the epochs (in whole validation intervals) so that the whole run -- what has
run so far, Phase B with its validations and the test decoding -- fits in T seconds.
Phase B's learning-rate schedule is laid out over the steps that fit, so a capped run is a
complete run of fewer epochs, not an interrupted one. The run stops with an error when not
even one validation interval fits.

The seed's workspace is ``<workspace>-budget-seed<N>`` (never the quality runs' own).
Writes benchmarks/results/<--name>.json: machine (GPU name when there is one), the plan
(epochs asked and run, steps, probe rates), the validation curve, the best epoch, the test
metrics and the seconds per stage.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.machine import command_line, machine_info

if TYPE_CHECKING:
    from store_core.config import StoreConfig
    from store_core.recommender_training import PhaseBInputs

RESULTS = Path(__file__).resolve().parent / "results"
logger = logging.getLogger("benchmarks.store_budget")


@dataclass(frozen=True)
class Plan:
    """How many Phase B steps to run and how often to validate."""

    epochs_asked: float
    epochs: float  # what the steps amount to
    steps_per_epoch: int
    eval_every: int  # optimizer steps between validations
    max_steps: int  # a whole number of validation intervals
    capped_by_time: bool


def plan_phase_b(
    epochs: float,
    samples: int,
    batch: int,
    evals_per_epoch: int,
    *,
    seconds_left: float | None = None,
    samples_per_s: float | None = None,
    validation_s: float | None = None,
) -> Plan:
    """The steps for ``epochs`` of ``samples`` at ``batch`` samples per optimizer step,
    rounded down to whole validation intervals (at least one), and, with a time budget
    (``seconds_left`` for Phase B and its validations, at the measured rates), no more
    intervals than fit in it."""
    steps_per_epoch = math.ceil(samples / batch)
    eval_every = max(1, steps_per_epoch // evals_per_epoch)
    intervals = max(1, math.floor(epochs * steps_per_epoch / eval_every))
    capped = False
    if seconds_left is not None:
        if not samples_per_s or validation_s is None:
            raise ValueError("a time budget needs the measured samples/s and validation time")
        interval_s = eval_every * batch / samples_per_s + validation_s
        fit = math.floor(seconds_left / interval_s)
        if fit < 1:
            raise SystemExit(
                f"the time budget leaves {seconds_left:.0f} s for Phase B, less than one "
                f"validation interval ({eval_every} steps + a validation: {interval_s:.0f} s "
                "at the measured rates); raise --time-budget-s or lower --evals-per-epoch"
            )
        if fit < intervals:
            intervals, capped = fit, True
    max_steps = intervals * eval_every
    return Plan(
        epochs_asked=epochs,
        epochs=round(max_steps / steps_per_epoch, 3),
        steps_per_epoch=steps_per_epoch,
        eval_every=eval_every,
        max_steps=max_steps,
        capped_by_time=capped,
    )


def _probe(cfg: StoreConfig, inputs: PhaseBInputs, steps: int) -> dict[str, float]:
    """Phase B samples/s on this machine and the seconds of one validation pass."""
    from benchmarks.phase_b_throughput import timed_steps, timed_validation

    rates = timed_steps(cfg, inputs, cfg.recommender_train, steps, "probe")
    users, validation_s = timed_validation(cfg, inputs, rates.model, cfg.recommender.val_max_users)
    return {
        "steps": steps,
        "samples_per_s": rates.samples_per_s,
        "tokens_per_s": rates.tokens_per_s,
        "validation_s": round(validation_s, 2),
        "validation_users": users,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="ml-100k-quality", help="config name or path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=float, default=10.0, help="Phase B epochs asked")
    parser.add_argument("--evals-per-epoch", type=int, default=1)
    parser.add_argument(
        "--time-budget-s", type=float, default=None, help="fit the whole run in this many s"
    )
    parser.add_argument("--probe-steps", type=int, default=60)
    parser.add_argument("--name", default=None, help="results file stem")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="key=value (repeatable)"
    )
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True
    )
    started = time.perf_counter()
    from store_core.config import load_config
    from store_core.evaluation import run_systems
    from store_core.ingest import resolve_source
    from store_core.recommender_training import prepare_phase_b
    from store_core.stages import ingest_stage, recommender_stage, tokenizer_stage

    base = load_config(args.config, args.overrides)
    seed_overrides = [
        f"workspace={base.workspace}-budget-seed{args.seed}",
        f"tokenizer_train.seed={args.seed}",
        f"recommender_train.seed={args.seed}",
        "evaluation.systems=[store]",
    ]
    cfg = load_config(args.config, [*args.overrides, *seed_overrides])
    name = args.name or f"store_budget_{Path(args.config).stem}"
    report: dict[str, Any] = {
        "machine": machine_info(),
        "config": {
            "config": args.config,
            "overrides": args.overrides,
            "seed": args.seed,
            "workspace": cfg.workspace,
            "command": command_line("benchmarks.store_budget"),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "deepspeed": cfg.recommender_train.deepspeed.enabled,
            "batch_size": cfg.recommender_train.batch_size,
            "lr": cfg.recommender_train.lr,
        },
    }
    print(json.dumps(report, indent=2), flush=True)
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    ingest_stage(cfg, None, resolve_source(cfg))
    seconds["ingest"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokenizer_stage(cfg, None)
    seconds["train_tokenizer"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    inputs = prepare_phase_b(cfg)
    train = cfg.recommender_train
    batch = train.batch_size * train.grad_accum
    budget: dict[str, Any] = {}
    if args.time_budget_s is not None:
        probe = _probe(cfg, inputs, args.probe_steps)
        test_users = len(inputs.data.test_targets)  # the users `store evaluate` decodes
        if cfg.evaluation.max_users:
            test_users = min(test_users, cfg.evaluation.max_users)
        test_s = probe["validation_s"] * test_users / max(1, probe["validation_users"])
        elapsed = time.perf_counter() - started
        # Left for Phase B: the budget less what ran, the test decoding, and 5% for loading,
        # the text -> token agreement check and saving.
        left = args.time_budget_s * 0.95 - elapsed - test_s
        budget = {
            "time_budget_s": args.time_budget_s,
            "probe": probe,
            "estimated_test_s": round(test_s, 1),
            "phase_b_seconds_left": round(left, 1),
        }
        plan = plan_phase_b(
            args.epochs,
            len(inputs.samples),
            batch,
            args.evals_per_epoch,
            seconds_left=left,
            samples_per_s=probe["samples_per_s"],
            validation_s=probe["validation_s"],
        )
    else:
        plan = plan_phase_b(args.epochs, len(inputs.samples), batch, args.evals_per_epoch)
    samples_per_epoch = len(inputs.samples)
    del inputs
    seconds["probe"] = time.perf_counter() - t0
    report["plan"] = {**asdict(plan), "samples_per_epoch": samples_per_epoch, **budget}
    logger.info("Phase B plan: %s", report["plan"])

    sized = [
        f"recommender_train.max_steps={plan.max_steps}",
        f"recommender_train.eval_every={plan.eval_every}",
        f"recommender_train.checkpoint_every={plan.eval_every}",
    ]
    cfg = load_config(args.config, [*args.overrides, *seed_overrides, *sized])
    t0 = time.perf_counter()
    outcome = recommender_stage(cfg, None).result
    seconds["train_recommender"] = time.perf_counter() - t0
    assert outcome is not None
    metrics = outcome.metrics

    t0 = time.perf_counter()
    (result,) = run_systems(cfg)
    seconds["evaluate"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - started
    report["phase_b"] = {
        "train_steps": metrics["train_steps"],
        "epochs_run": round(metrics["train_steps"] * batch / samples_per_epoch, 3),
        "best_validation_round": outcome.best_validation_round,
        "best_epoch": outcome.best_epoch,
        "best_val_ndcg_at_10": metrics["best_val_ndcg_at_10"],
        "stopped_early": metrics["stopped_early"],
        "train_tokens_per_s": metrics["train_tokens_per_s"],
        "validation": metrics["validation"],
    }
    report["test"] = result.metrics
    report["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    test = result.metrics
    print(
        f"STORE seed {args.seed}: {report['phase_b']['epochs_run']} epochs of Phase B "
        f"(best at {outcome.best_when()}), test R@10 "
        f"{test['recall_at_10']:.4f} N@10 {test['ndcg_at_10']:.4f}, invalid-ID rate "
        f"{test['invalid_id_rate']:.4f}; {seconds['total']:.0f} s in all; wrote {out}",
        flush=True,
    )


if __name__ == "__main__":
    main()
