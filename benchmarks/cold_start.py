"""Cold-start recommendation: what text-based semantic IDs buy (issue 13).

    python -m benchmarks.cold_start --config scientific-quality --workspace /runs/cold-sci \\
        --seeds 0 1 2 --weights 0 1 3 --set data.cold_start_fraction=0.05

Reads the seed workspaces ``<workspace>-seedN`` that ``benchmarks.quality`` made with the
same ``--set`` s (every stage and every system trained there, with 5% of the items held
out of all training), and decodes the test split again with STORE's and the TIGER-style
variant's checkpoints for each cold-start back-off weight (``recommender.
cold_start_backoff``; 0 = plain beam search, :mod:`store_core.generate.cold_start`).
SASRec-CE and popularity have nothing to back off with: their metrics (with the
``cold_*`` ones) are trained and ranked again here on the same split and seed, as
``store evaluate`` does. Reported per system and weight, mean +- sample std over seeds:
Recall@10 / NDCG@10 of the cold-start test users (target in no training sequence), of the
other users, and of all (history kept, the headline rule; and history excluded); and,
without back-off, how often the top 10 holds an item sharing the target's first d codes
(``prefix_hits_cold`` / ``prefix_hits_other``, d = 1..M).

Writes benchmarks/results/<--name or cold_start_<config>>.json and .md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import RESULTS, command_line, machine_info, write_results

METRICS = ("recall_at_10", "ndcg_at_10")


def _generative(cfg: Any, system: str) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The system's test metrics, and (without back-off) where its top 10 lands:
    ``prefix_hits_cold[d - 1]`` / ``prefix_hits_other[d - 1]``: the share of cold / other
    users whose top 10 holds an item with the target's first ``d`` codes."""
    from store_core.bundle import load_bundle
    from store_core.evaluation import cold_users, decode_split, evaluate_generative, tiger_config
    from store_core.recommender_training import recommender_dir

    sys_cfg = cfg if system == "store" else tiger_config(cfg)
    bundle = load_bundle(recommender_dir(sys_cfg))
    if cfg.recommender.cold_start_backoff > 0:
        return evaluate_generative(bundle, sys_cfg, system=system, progress=False).metrics, {}
    decoded = decode_split(bundle, sys_cfg, "test", progress=False)
    metrics = evaluate_generative(
        bundle, sys_cfg, system=system, progress=False, search=lambda *_: decoded.result
    ).metrics
    return metrics, prefix_hits(decoded, cold_users(decoded.data, decoded.targets))


def prefix_hits(decoded: Any, cold: np.ndarray, k: int = 10) -> dict[str, list[float]]:
    """Per prefix length d = 1..M: the share of cold (``cold`` [U] True) and of other
    users whose top ``k`` holds an item sharing the target's first d codes."""
    row_of = {item: i for i, item in enumerate(decoded.item_ids)}
    codes, result = decoded.codes, decoded.result
    out: dict[str, list[float]] = {"prefix_hits_cold": [], "prefix_hits_other": []}
    for depth in range(1, codes.shape[1] + 1):
        hits = np.zeros(len(decoded.targets), dtype=bool)
        for u, target in enumerate(decoded.targets):
            top = [i for i in result.items[u, :k].tolist() if i >= 0]
            want = codes[row_of[target], :depth]
            hits[u] = any((codes[i, :depth] == want).all() for i in top)
        out["prefix_hits_cold"].append(float(hits[cold].mean()) if cold.any() else float("nan"))
        out["prefix_hits_other"].append(float(hits[~cold].mean()))
    return out


def _split_rows(metrics: dict[str, float]) -> dict[str, float]:
    """cold / warm / all Recall@10 and NDCG@10 (warm from all and cold by user counts)."""
    users, cold = metrics["users"], metrics.get("cold_users", 0.0)
    out: dict[str, float] = {"users": users, "cold_users": cold}
    for name in METRICS:
        overall = metrics[name]
        cold_value = metrics.get(f"cold_{name}", 0.0) if cold else float("nan")
        out[f"all_{name}"] = overall
        out[f"cold_{name}"] = cold_value
        warm = (overall * users - (cold_value * cold if cold else 0.0)) / max(users - cold, 1)
        out[f"warm_{name}"] = warm
        out[f"history_excluded_{name}"] = metrics[f"history_excluded_{name}"]
    return out


def _markdown(rows: list[dict[str, Any]], command: str) -> str:
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["system"], row["weight"]), []).append(row)

    def cell(values: list[float]) -> str:
        arr = np.asarray(values, dtype=float)
        if len(arr) == 1:
            return f"{arr[0]:.4f}"
        return f"{arr.mean():.4f} ± {arr.std(ddof=1):.4f}"

    lines = [
        "| system | back-off weight | seeds | cold users | cold R@10 | cold N@10 | "
        "other R@10 | other N@10 | all R@10 | all N@10 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (system, weight), group in groups.items():
        values = [
            cell([r[key] for r in group])
            for key in (
                "cold_recall_at_10",
                "cold_ndcg_at_10",
                "warm_recall_at_10",
                "warm_ndcg_at_10",
                "all_recall_at_10",
                "all_ndcg_at_10",
            )
        ]
        label = "—" if weight is None else f"{weight:g}"
        cold_users = int(np.mean([r["cold_users"] for r in group]))
        lines.append(
            f"| {system} | {label} | {len(group)} | {cold_users} | " + " | ".join(values) + " |"
        )
    return "\n".join(lines) + f"\n\n- command: `{command}`\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="scientific-quality", help="config name or path")
    parser.add_argument("--workspace", required=True, help="seed workspaces: <this>-seedN")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument(
        "--baselines", nargs="*", default=["sasrec", "popularity"], help="non-generative systems"
    )
    parser.add_argument("--name", default=None, help="results file stem")
    parser.add_argument(
        "--combine",
        nargs="+",
        default=None,
        help="no decoding: merge the rows of these result files (e.g. one per seed) into one",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="key=value (repeatable)"
    )
    args = parser.parse_args()
    from store_core.config import load_config
    from store_core.evaluation import run_systems

    rows: list[dict[str, Any]] = []
    if args.combine:
        parts = [json.loads(Path(path).read_text()) for path in args.combine]
        rows = [row for part in parts for row in part["rows"]]
        args.seeds = sorted({row["seed"] for row in rows})
        args.weights = sorted({row["weight"] for row in rows if row["weight"] is not None})
    for seed in [] if args.combine else args.seeds:
        base = [
            *args.overrides,
            f"workspace={args.workspace}-seed{seed}",
            "tracking.enabled=false",
            f"tokenizer_train.seed={seed}",
            f"recommender_train.seed={seed}",
            f"evaluation.sasrec_seeds=[{seed}]",
        ]
        for weight in args.weights:
            cfg = load_config(args.config, [*base, f"recommender.cold_start_backoff={weight}"])
            for system in ("store", "tiger"):
                metrics, hits = _generative(cfg, system)
                split = _split_rows(metrics)
                rows.append({"system": system, "seed": seed, "weight": weight, **split, **hits})
                print(json.dumps(rows[-1]), flush=True)
        if args.baselines:
            systems = json.dumps(args.baselines).replace('"', "")
            cfg = load_config(args.config, [*base, f"evaluation.systems={systems}"])
            for result in run_systems(cfg, train_missing=False):
                row = {"system": result.system, "seed": seed, "weight": None}
                rows.append({**row, **_split_rows(result.metrics)})
                print(json.dumps(rows[-1]), flush=True)
    stem = args.name or f"cold_start_{Path(args.config).stem}"
    command = command_line("benchmarks.cold_start")
    report = {
        "machine": machine_info(),
        "config": args.config,
        "overrides": args.overrides,
        "seeds": args.seeds,
        "weights": args.weights,
        "command": command,
        "rows": rows,
    }
    write_results(report, f"{stem}.json")
    markdown = _markdown(rows, command)
    (RESULTS / f"{stem}.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
