"""How much of STORE's Recall@K the width-20 beam loses against the model's own ranking.

    python -m benchmarks.beam_search_gap --config ml-100k-quality \\
        --set workspace=/path/to/workspace-ml-100k-quality-seed0 --users 300

EVALUATION.md scores generative systems from a constrained beam of width 20. Beam search
prunes: an item whose first code is not among the 20 best prefixes is never scored, even
if its full semantic ID is more likely than the 10th beam. This decodes the same test
users (a seeded sample of ``--users``, history kept, the prompts of ``store evaluate``)
twice with ``evaluation.decode_split``:

- beam 20 (the protocol's ranking);
- beam = catalogue size: every valid ID prefix survives every step, so the result is
  the exact ranking of every item by the model's log-probability (the sum of its M
  per-level log-softmax scores, the decoder's own score).

If the exhaustive Recall@10 is much higher, the model ranks well and the search loses
it; if the two are close, the model itself is what limits STORE. Also reported: how many
of the exhaustive top 10 the beam's top 10 holds.

Writes benchmarks/results/beam_search_gap_<config>.json (or <--name>.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import command_line, machine_info, write_results


def ranks_of(items: np.ndarray, alive: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``[U]`` 1-based rank of each target in its row of ``items`` [U, B] (0 = missed)."""
    ranks = np.zeros(len(targets), dtype=np.int64)
    for u, target in enumerate(targets.tolist()):
        row = items[u][alive[u]].tolist()
        ranks[u] = row.index(target) + 1 if target in row else 0
    return ranks


def summary(ranks: np.ndarray) -> dict[str, float]:
    """Recall@{1,10,20} and NDCG@10 from 1-based ranks (0 = missed)."""
    hit = ranks > 0
    out = {f"recall_at_{k}": float((hit & (ranks <= k)).mean()) for k in (1, 10, 20)}
    gain = np.where(hit & (ranks <= 10), 1.0 / np.log2(np.maximum(ranks, 1) + 1.0), 0.0)
    out["ndcg_at_10"] = float(gain.mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="ml-100k-quality", help="config name or path")
    parser.add_argument("--name", default=None, help="results file stem")
    parser.add_argument("--users", type=int, default=300, help="test users (seeded sample)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="key=value (repeatable)"
    )
    args = parser.parse_args()
    from store_core.bundle import load_bundle
    from store_core.config import load_config
    from store_core.evaluation import decode_split
    from store_core.recommender_training import recommender_dir

    cfg = load_config(args.config, args.overrides)
    bundle = load_bundle(recommender_dir(cfg))
    catalogue = len(bundle.codes())
    runs: dict[str, Any] = {}
    decoded_by_width = {}
    widths = ((cfg.recommender.beam_size, cfg.recommender.eval_batch_size), (catalogue, 1))
    for width, batch in widths:
        run_cfg = cfg.model_copy(
            update={
                "recommender": cfg.recommender.model_copy(
                    update={"beam_size": width, "eval_batch_size": batch}
                )
            }
        )
        clock = time.perf_counter()
        decoded = decode_split(bundle, run_cfg, "test", max_users=args.users)
        seconds = time.perf_counter() - clock
        row_of = {item: i for i, item in enumerate(decoded.item_ids)}
        targets = np.array([row_of[t] for t in decoded.targets], dtype=np.int64)
        ranks = ranks_of(decoded.result.items, decoded.result.alive, targets)
        runs[f"beam_{width}"] = {"seconds": round(seconds, 1), **summary(ranks)}
        decoded_by_width[width] = (decoded, ranks)
    (narrow, narrow_ranks), (full, full_ranks) = decoded_by_width.values()
    overlap = [
        len(set(narrow.result.items[u, :10].tolist()) & set(full.result.items[u, :10].tolist()))
        / 10
        for u in range(len(narrow.users))
    ]
    found_by_model = (full_ranks > 0) & (full_ranks <= 10)
    missed_by_beam = found_by_model & ~((narrow_ranks > 0) & (narrow_ranks <= 10))
    report: dict[str, Any] = {
        "machine": machine_info(),
        "config": args.config,
        "overrides": args.overrides,
        "checkpoint": recommender_dir(cfg),
        "command": command_line("benchmarks.beam_search_gap"),
        "users": len(narrow.users),
        "catalogue_items": catalogue,
        "runs": runs,
        "top10_overlap_beam_vs_exact": float(np.mean(overlap)),
        "targets_in_exact_top10_missed_by_beam": float(missed_by_beam.mean()),
    }
    print(json.dumps(report, indent=2), flush=True)
    write_results(report, f"{args.name or 'beam_search_gap_' + Path(args.config).stem}.json")


if __name__ == "__main__":
    main()
