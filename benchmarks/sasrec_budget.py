"""SASRec-CE quality against its training budget, to compare with STORE's Phase B budget.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.sasrec_budget \\
        --config ml-100k-quality --seeds 0 1 2 --epochs 1 3

For each seed and each epoch cap C, SASRec-CE (the config's ``evaluation.sasrec``
settings with ``max_epochs=C``, early stopping on validation NDCG@10 as usual) is trained
on the config's split and ranks the test split, exactly as ``store evaluate`` runs it.
One SASRec epoch labels every training target (next item of a train prefix) once, the
unit STORE's recommendation task is counted in: STORE's Phase B draws ``max_steps x
batch_size`` samples from the task mixture, whose recommendation samples are the same
train prefixes. The report states the targets per epoch and the STORE Phase B sample
budget of the config, so "C epochs" reads as "C x targets seen".

Writes benchmarks/results/sasrec_budget_<config>.json (per seed and cap: test metrics,
epochs run, best epoch, optimizer steps, seconds, per-epoch history) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
from pathlib import Path
from typing import Any

from benchmarks.machine import command_line, machine_info
from store_core.config import load_config

RESULTS = Path(__file__).resolve().parent / "results"


def _mean_std(values: list[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="ml-100k-quality", help="config name or path")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--epochs", type=int, nargs="+", default=[1, 3], help="epoch caps (max_epochs)"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="key=value (repeatable)"
    )
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True
    )
    from store_core.baselines.data import load_sequence_data
    from store_core.baselines.sasrec import run_sasrec
    from store_core.ingest import run_ingest

    cfg = load_config(args.config, args.overrides)
    run_ingest(cfg)
    data = load_sequence_data(cfg.data_dir)
    targets = int(sum(max(len(seq) - 1, 0) for seq in data.train_sequences.values()))
    train = cfg.recommender_train
    # None when STORE's Phase B is sized in epochs of the mixture instead of steps.
    store_samples = train.max_steps * train.batch_size if train.max_steps else None
    store_epochs = round(store_samples / targets, 3) if store_samples else None
    report: dict[str, Any] = {
        "machine": machine_info(),
        "config": {
            "config": args.config,
            "overrides": args.overrides,
            "seeds": args.seeds,
            "epochs": args.epochs,
            "command": command_line("benchmarks.sasrec_budget"),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "sasrec": cfg.evaluation.sasrec.model_dump(),
        },
        "train_targets_per_epoch": targets,
        "store_phase_b_samples": store_samples,
        "store_phase_b_epochs_upper_bound": store_epochs,
        "runs": [],
    }
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2), flush=True)
    for cap in args.epochs:
        sas_cfg = cfg.evaluation.sasrec.model_copy(update={"max_epochs": cap})
        for seed in args.seeds:
            out = run_sasrec(cfg.data_dir, sas_cfg, seed)
            steps = sum(math.ceil(row["windows"] / sas_cfg.batch_size) for row in out["history"])
            report["runs"].append(
                {
                    "epoch_cap": cap,
                    "seed": seed,
                    "test": out["test"],
                    "test_history_excluded": out["test_history_excluded"],
                    "epochs": out["epochs"],
                    "best_epoch": out["best_epoch"],
                    "optimizer_steps": steps,
                    "targets_seen": targets * out["epochs"],
                    "train_seconds": round(out["train_seconds"], 1),
                    "history": out["history"],
                }
            )
    store_budget = (
        f"STORE Phase B draws {store_samples} samples (<= {store_epochs:.2f} epochs of targets)"
        if store_epochs is not None
        else f"STORE Phase B runs {train.epochs} epochs of its mixture"
    )
    lines = [
        f"SASRec-CE by epoch cap on {args.config} (seeds {', '.join(map(str, args.seeds))}); "
        f"{targets} train targets per epoch; {store_budget}",
        "",
        "| epoch cap | epochs run (best) | steps | R@10 | N@10 | train s |",
        "|---|---|---|---|---|---|",
    ]
    for cap in args.epochs:
        runs = [r for r in report["runs"] if r["epoch_cap"] == cap]
        lines.append(
            f"| {cap} | {_mean_std([float(r['epochs']) for r in runs], 1)} "
            f"({', '.join(str(r['best_epoch']) for r in runs)}) "
            f"| {_mean_std([float(r['optimizer_steps']) for r in runs], 0)} "
            f"| {_mean_std([r['test']['recall_at_10'] for r in runs])} "
            f"| {_mean_std([r['test']['ndcg_at_10'] for r in runs])} "
            f"| {_mean_std([r['train_seconds'] for r in runs], 1)} |"
        )
    markdown = "\n".join(lines) + "\n"
    report["markdown"] = markdown
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"sasrec_budget_{Path(args.config).stem}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
