"""What an ensemble of trained models buys STORE and SASRec-CE on the same test split.

    python -m benchmarks.ensemble_gain --config infra/configs/scientific-quality.yaml \\
        --workspace <seed-0 workspace> --workspace <seed-1 workspace> \\
        --sasrec-seeds 0 1 --name ensemble_gain_scientific-quality

A diagnostic, not a system the project ships: each STORE workspace's trained recommender
decodes every test user (history kept, ``store evaluate``'s prompts, the config's beam of
20, via ``evaluation.decode_split``) and SASRec-CE is trained once per seed in
``--sasrec-seeds`` (``evaluation.sasrec``). Reported: each model alone and the ensemble of
all of them per system, Recall@{1,10,20} and NDCG@10 (EVALUATION.md's definitions).

How members are combined (a product of experts, the same rule for both systems): an
item's ensemble score is the mean of its log-probabilities under the members. SASRec-CE
scores every item (log-softmax over the catalogue). A STORE member scores only the items
of its beam (the sum of the M per-level log-probabilities, the decoder's own score); an
item outside a member's beam gets that beam's lowest score, an upper bound on its true
log-probability, so the STORE ensemble ranks the union of the members' beams.

Why it is asked: two STORE models whose semantic IDs come from different Phase A runs
disagree far more than two SASRec-CE seeds do, and whether that disagreement is worth
building into one model (several ID views decoded and combined) is what this measures.

Writes benchmarks/results/<--name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.beam_search_gap import summary
from benchmarks.machine import RESULTS, command_line, machine_info, write_results


def sasrec_ranks(log_probs: np.ndarray, targets: np.ndarray, k: int = 20) -> np.ndarray:
    """``[U]`` 1-based rank of each 1-based item index in ``targets`` within the top ``k``
    of its row of ``log_probs`` [U, N] (column j = item j + 1; 0 = outside), ranked by
    ``store evaluate``'s own top-k (``baselines.data.top_k_items`` / ``target_ranks``)."""
    import torch

    from store_core.baselines.data import target_ranks, top_k_items

    return target_ranks(top_k_items(torch.from_numpy(log_probs), k), targets) + 1


def fuse_beams(
    items: Sequence[Sequence[str]],
    scores: Sequence[Sequence[float]],
    weights: Sequence[float] | None = None,
) -> list[str]:
    """The union of one user's member beams, best first by mean log-probability.

    ``items[m]`` / ``scores[m]``: member ``m``'s beam (item ids, best first; "" = a dead
    slot) and its log-probabilities. An item missing from a member's beam gets that
    member's lowest live score. ``weights`` (one per member, non-negative, not all 0;
    default equal) makes the mean a weighted one. Ties keep first-seen order. Raises
    ValueError when a member's beam has no live item, the lists differ in length, or the
    weights do not fit the members.
    """
    if len(items) != len(scores):
        raise ValueError(f"{len(items)} member beams but {len(scores)} score rows")
    w = np.ones(len(items)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(items),) or (w < 0).any() or not w.sum() > 0:
        raise ValueError(f"weights {list(w)} do not fit {len(items)} members (>= 0, not all 0)")
    beams: list[dict[str, float]] = []
    for row_items, row_scores in zip(items, scores, strict=True):
        beam = {
            item: float(score)
            for item, score in zip(row_items, row_scores, strict=True)
            if item and np.isfinite(score)
        }
        if not beam:
            raise ValueError("a member beam holds no live item")
        beams.append(beam)
    order = list(dict.fromkeys(item for beam in beams for item in beam))  # first seen first
    floors = [min(beam.values()) for beam in beams]
    fused = {
        item: float(
            np.average([b.get(item, f) for b, f in zip(beams, floors, strict=True)], weights=w)
        )
        for item in order
    }
    return sorted(order, key=lambda item: -fused[item])  # stable: ties keep first seen


def ranks_in_lists(lists: Sequence[Sequence[str]], targets: Sequence[str]) -> np.ndarray:
    """``[U]`` 1-based rank of each target in its user's ranked list (0 = missed)."""
    return np.array(
        [
            ranked.index(t) + 1 if t in ranked else 0
            for ranked, t in zip(lists, targets, strict=True)
        ],
        dtype=np.int64,
    )


def _store_member(config: str, overrides: list[str], workspace: str) -> dict[str, Any]:
    from store_core.bundle import load_bundle
    from store_core.config import load_config
    from store_core.evaluation import decode_split
    from store_core.progress import progress_enabled
    from store_core.recommender_training import recommender_dir

    cfg = load_config(config, [*overrides, f"workspace={workspace}"])
    decoded = decode_split(
        load_bundle(recommender_dir(cfg)), cfg, "test", progress=progress_enabled()
    )
    ids = np.array(decoded.item_ids, dtype=object)
    result = decoded.result
    items = np.where(result.items >= 0, ids[np.maximum(result.items, 0)], "")
    return {
        "users": decoded.users,
        "targets": decoded.targets,
        "items": items.tolist(),
        "scores": result.scores.tolist(),
        "beam_size": cfg.recommender.beam_size,
    }


def _sasrec_members(
    config: str, overrides: list[str], seeds: Sequence[int]
) -> tuple[list[str], np.ndarray, list[np.ndarray]]:
    import torch

    from store_core.baselines.data import load_sequence_data
    from store_core.baselines.sasrec import train_sasrec
    from store_core.config import load_config

    cfg = load_config(config, overrides)
    data = load_sequence_data(cfg.data_dir)
    histories = data.histories("test", cfg.evaluation.sasrec.history_len)
    targets = data.targets("test")  # 1-based item indices
    members = []
    for seed in seeds:
        model = train_sasrec(data, cfg.evaluation.sasrec, seed)
        model.eval()
        blocks = []
        with torch.no_grad():
            for start in range(0, len(histories), model.cfg.eval_batch_size):
                hidden = model.encode(histories[start : start + model.cfg.eval_batch_size])
                blocks.append(torch.log_softmax(model.item_logits(hidden), dim=-1).numpy())
        members.append(np.concatenate(blocks))
    return data.eval_users("test"), targets, members


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Ensembles of trained models: {report['config']}",
        "",
        f"`{report['command']}`",
        "",
        f"Test split, history kept, {report['users']} users; STORE beams of "
        f"{report['beam_size']}; product of experts (mean log-probability).",
        "",
        "| system | members | R@1 | R@10 | R@20 | N@10 |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        m = row["metrics"]
        lines.append(
            f"| {row['system']} | {row['members']} | {m['recall_at_1']:.4f} | "
            f"{m['recall_at_10']:.4f} | {m['recall_at_20']:.4f} | {m['ndcg_at_10']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="config name or path")
    parser.add_argument(
        "--workspace", action="append", required=True, help="a STORE workspace (repeat, >= 2)"
    )
    parser.add_argument("--sasrec-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--name", default=None, help="results file stem")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="key=value (repeatable)"
    )
    args = parser.parse_args(argv)
    if len(args.workspace) < 2 or len(args.sasrec_seeds) < 2:
        parser.error("an ensemble needs at least two --workspace and two --sasrec-seeds")
    members = [_store_member(args.config, args.overrides, w) for w in args.workspace]
    users, targets = members[0]["users"], members[0]["targets"]
    for member, workspace in zip(members, args.workspace, strict=True):
        if member["users"] != users or member["targets"] != targets:
            raise SystemExit(f"{workspace}: its test users or targets differ from the first's")
    rows: list[dict[str, Any]] = []
    for member, workspace in zip(members, args.workspace, strict=True):
        lists = [[i for i in row if i] for row in member["items"]]
        rows.append(
            {
                "system": "STORE",
                "members": workspace,
                "metrics": summary(ranks_in_lists(lists, targets)),
            }
        )
    fused = [
        fuse_beams([m["items"][u] for m in members], [m["scores"][u] for m in members])
        for u in range(len(users))
    ]
    rows.append(
        {
            "system": "STORE ensemble",
            "members": len(members),
            "metrics": summary(ranks_in_lists(fused, targets)),
        }
    )
    sasrec_users, sasrec_targets, log_probs = _sasrec_members(
        args.config, [*args.overrides, f"workspace={args.workspace[0]}"], args.sasrec_seeds
    )
    if sasrec_users != users:
        raise SystemExit("SASRec-CE's test users differ from STORE's")
    for seed, scores in zip(args.sasrec_seeds, log_probs, strict=True):
        ranks = sasrec_ranks(scores, sasrec_targets)
        rows.append({"system": "SASRec-CE", "members": f"seed {seed}", "metrics": summary(ranks)})
    ranks = sasrec_ranks(np.mean(log_probs, axis=0), sasrec_targets)
    rows.append(
        {"system": "SASRec-CE ensemble", "members": len(log_probs), "metrics": summary(ranks)}
    )
    report: dict[str, Any] = {
        "machine": machine_info(),
        "config": args.config,
        "overrides": args.overrides,
        "command": command_line("benchmarks.ensemble_gain", argv),
        "users": len(users),
        "beam_size": members[0]["beam_size"],
        "rows": rows,
    }
    stem = args.name or f"ensemble_gain_{Path(args.config).stem}"
    write_results(report, f"{stem}.json")
    text = markdown(report)
    (RESULTS / f"{stem}.md").write_text(text)
    print(json.dumps(rows, indent=2), flush=True)
    print(text, flush=True)


if __name__ == "__main__":
    main()
