"""Where STORE's test misses land: on the target's semantic-ID code group, or elsewhere.

    python -m benchmarks.id_collisions --config scientific-quality \\
        --set workspace=/path/to/workspace-scientific-quality-seed0

Loads the workspace's trained recommender, decodes the test split with ``store
evaluate``'s own decoding (``evaluation.decode_split``, history kept), and splits what the top 10
holds. A target's *code group* is every item with the same first L codes (the quantizer's
codes; items in one group differ only in the disambiguation code, which carries no
meaning). Reported:

- the share of items and of test targets whose code group has other items;
- Recall@10 (exact item) and "group Recall@10" (some item of the target's group in the top
  10): their difference is the misses where the model found the group but not the item;
- Recall@10 for targets alone in their group vs targets that share it.

Writes benchmarks/results/id_collisions_<config>.json (or <--name>.json) and prints it.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import command_line, machine_info, write_results


def collision_report(
    codes: np.ndarray, cluster_levels: int, top: np.ndarray, targets: np.ndarray, k: int = 10
) -> dict[str, Any]:
    """``codes`` [N, L+1] item codes; ``top`` [U, B] decoded item rows per user, best first
    (-1 for dead slots); ``targets`` [U] the target item row per user."""
    groups = [tuple(row) for row in codes[:, :cluster_levels].tolist()]
    group_size = Counter(groups)
    shared = np.array([group_size[g] > 1 for g in groups])  # [N]
    hit = np.zeros(len(targets), dtype=bool)
    group_hit = np.zeros(len(targets), dtype=bool)
    for u, target in enumerate(targets.tolist()):
        row = [i for i in top[u, :k].tolist() if i >= 0]
        hit[u] = target in row
        group_hit[u] = any(groups[i] == groups[target] for i in row)
    target_shared = shared[targets]  # [U]

    def rate(mask: np.ndarray, values: np.ndarray) -> float | None:
        return float(values[mask].mean()) if mask.any() else None

    return {
        "items": len(groups),
        "code_groups": len(group_size),
        "largest_group": max(group_size.values()),
        "items_sharing_group": float(shared.mean()),
        "users": len(targets),
        "targets_sharing_group": float(target_shared.mean()),
        f"recall_at_{k}": float(hit.mean()),
        f"group_recall_at_{k}": float(group_hit.mean()),
        "group_found_item_missed": float((group_hit & ~hit).mean()),
        f"recall_at_{k}_unique_group": rate(~target_shared, hit),
        f"recall_at_{k}_shared_group": rate(target_shared, hit),
        f"group_recall_at_{k}_shared_group": rate(target_shared, group_hit),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="scientific-quality", help="config name or path")
    parser.add_argument("--name", default=None, help="results file stem")
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
    decoded = decode_split(bundle, cfg, "test")
    row_of = {item: i for i, item in enumerate(decoded.item_ids)}
    top = np.where(decoded.result.alive, decoded.result.items, -1)
    targets = np.array([row_of[t] for t in decoded.targets], dtype=np.int64)
    report: dict[str, Any] = {
        "machine": machine_info(),
        "config": args.config,
        "overrides": args.overrides,
        "checkpoint": recommender_dir(cfg),
        "command": command_line("benchmarks.id_collisions"),
        **collision_report(decoded.codes, bundle.cluster_levels, top, targets),
    }
    print(json.dumps(report, indent=2), flush=True)
    write_results(report, f"{args.name or 'id_collisions_' + Path(args.config).stem}.json")


if __name__ == "__main__":
    main()
