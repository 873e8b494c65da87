"""Where STORE trails SASRec-CE: test users bucketed by how often their target was trained on.

    python -m benchmarks.target_frequency --config scientific-quality \\
        --set workspace=/path/to/workspace-scientific-quality-seed0 --seed 0

For a workspace that holds a trained Phase B STORE model (``store train``), on the test
split (docs/EVALUATION.md, history kept):

1. **Both systems' per-user ranks.** SASRec-CE is trained here (``evaluation.sasrec``,
   seed ``--seed``, default the config's first ``evaluation.sasrec_seeds``) and ranks
   every test user (``baselines.sasrec.rank_users``); STORE decodes every test user with
   ``store evaluate``'s own constrained beam (``evaluation.decode_split``, the
   checkpoint's trained settings) and a user's rank is the target's place among the live
   beams, as ``evaluation.evaluate_generative`` counts it. Users are matched by user id.
2. **By target frequency.** A user's *target frequency* is how many times the test target
   occurs in the train sequences (``TaskData.train_sequences``; occurrences, not users).
   Users are bucketed by it (``--edges``: inclusive upper bounds, default 0, 2, 5, 10,
   20, 50 -> buckets 0, 1-2, 3-5, 6-10, 11-20, 21-50, >50); per bucket: users, both
   systems' Recall@10 and NDCG@10. Overall: both systems' Recall@10 / NDCG@10 and the
   hit overlap (shares of users: both hit, only STORE, only SASRec-CE, neither). The same
   by *transition count*: how often the user's last history item is directly followed by
   the target in the train sequences (0, 1, 2-3, > 3), the pairs an ID-based model can
   memorize.
3. **Which code STORE misses.** For a seeded sample of ``--users`` test users
   (``splits.seeded_subset`` with ``splits.EVAL_SAMPLE_SEED``, the sample rule of
   ``decode_split``), the model reads the test prompt followed by the target's semantic
   ID (teacher forcing, one left-padded forward per batch of ``recommender.
   eval_batch_size`` users). At each level l < M - 1 (the cluster levels; the last,
   disambiguation code is left out) the target's code is ranked among the codes that
   continue its prefix in the catalogue trie (``SemanticIdTrie.prefix_nodes`` /
   ``children``). The rank (0 = first) is the number of valid codes with a higher logit:
   the level softmax and the trie softmax are monotone in the logits of one position, so
   the ranks are the same whichever ``recommender.id_normalization`` the model was trained
   with. Reported per bucket and level: the share of users whose target code is first, in
   the top 5, the median rank and the median number of valid codes.

4. **Does each system fit its own training transitions?** (``--train-fit USERS``, 0 =
   off) For a seeded sample of users with at least two train items, STORE decodes the
   LAST train item from the train items before it (the last ``history_len``), as
   ``store evaluate`` decodes, and SASRec-CE ranks it after the same items (its own
   ``history_len``): a target each model was trained on, with the context it was trained
   with.
   Users are bucketed by how often their transition (second-to-last -> last train item)
   occurs in the train sequences besides this occurrence (0, 1, 2-3, > 3): bucket 0 is
   pure memorization of one training example, which the test bucket "seen once" asks of
   a model in another user's context.

Cost: one SASRec-CE training, one decode of the test split as ``store evaluate`` runs it,
and one forward per ``eval_batch_size`` sampled users. Nothing is written to the workspace.

Writes benchmarks/results/target_frequency_<config stem>_seed<seed>.json and .md (or
``<--name>.{json,md}`` in ``--results-dir``) and prints the Markdown.
"""

from __future__ import annotations

import argparse
import inspect
import logging
from collections import Counter
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from benchmarks.machine import RESULTS, command_line, machine_info, write_results
from store_core.errors import StoreError
from store_core.generate import BeamResult, SemanticIdTrie
from store_core.generate.beam import left_padded
from store_core.metrics import ranking_metrics
from store_core.prompts import PromptBuilder

if TYPE_CHECKING:
    from store_core.baselines.data import SequenceData
    from store_core.baselines.sasrec import SASRecModel
    from store_core.bundle import RecommenderBundle
    from store_core.config import StoreConfig
    from store_core.evaluation import DecodedSplit
    from store_core.tasks import TaskData

#: Inclusive upper bounds of the target-frequency buckets (the last bucket is "> 50").
DEFAULT_EDGES = (0, 2, 5, 10, 20, 50)
K = 10
#: Buckets of the transition (last history item -> target) counts: 0, 1, 2-3, > 3.
TRANSITION_EDGES = (0, 1, 3)


# --------------------------------------------------------------------------- buckets


def bucket_labels(edges: Sequence[int]) -> list[str]:
    """``["0", "1-2", ..., ">50"]`` for inclusive upper bounds ``edges`` (ValueError unless
    they are non-negative and strictly increasing)."""
    if not edges or edges[0] < 0 or any(b <= a for a, b in pairwise(edges)):
        raise ValueError(f"bucket edges must be non-negative and increasing, got {list(edges)}")
    labels, low = [], 0
    for high in edges:
        labels.append(str(high) if low == high else f"{low}-{high}")
        low = high + 1
    return [*labels, f">{edges[-1]}"]


def bucket_of(counts: np.ndarray, edges: Sequence[int]) -> np.ndarray:
    """int64 [U] bucket index of each count (``[U]``): the first edge >= the count, or
    ``len(edges)`` above the last."""
    return np.searchsorted(np.asarray(edges), counts, side="left").astype(np.int64)


def target_counts(train_sequences: dict[str, list[str]], targets: Sequence[str]) -> np.ndarray:
    """int64 [U] occurrences of each target item in all train sequences."""
    seen = Counter(item for sequence in train_sequences.values() for item in sequence)
    return np.array([seen.get(t, 0) for t in targets], dtype=np.int64)


def transition_counts(
    train_sequences: dict[str, list[str]],
    last_items: Sequence[str | None],
    targets: Sequence[str],
) -> np.ndarray:
    """int64 [U] how often each user's transition (last history item -> test target) occurs
    as two consecutive items of a train sequence (the pairs an ID-based model can memorize
    in its item embeddings); 0 for a user with no history (``None``)."""
    seen = Counter(pair for sequence in train_sequences.values() for pair in pairwise(sequence))
    return np.array(
        [
            0 if last is None else seen.get((last, t), 0)
            for last, t in zip(last_items, targets, strict=True)
        ],
        dtype=np.int64,
    )


def _at_k(ranks: np.ndarray) -> dict[str, float | None]:
    """Recall@10 and NDCG@10 of 0-based ranks (-1: a miss); None for no users."""
    if not ranks.size:
        return {f"recall_at_{K}": None, f"ndcg_at_{K}": None}
    metrics = ranking_metrics(ranks, cutoffs=(K,))
    return {f"recall_at_{K}": metrics[f"recall_at_{K}"], f"ndcg_at_{K}": metrics[f"ndcg_at_{K}"]}


def bucket_table(
    counts: np.ndarray, store: np.ndarray, sasrec: np.ndarray, edges: Sequence[int]
) -> list[dict[str, Any]]:
    """One row per bucket: users and both systems' Recall@10 / NDCG@10 (None where the
    bucket is empty). ``counts``, ``store``, ``sasrec``: [U] per user (ranks 0-based, -1 a
    miss)."""
    buckets = bucket_of(counts, edges)
    rows = []
    for index, label in enumerate(bucket_labels(edges)):
        mask = buckets == index
        row: dict[str, Any] = {"bucket": label, "users": int(mask.sum())}
        for system, ranks in (("store", store), ("sasrec", sasrec)):
            row.update({f"{system}_{k}": v for k, v in _at_k(ranks[mask]).items()})
        rows.append(row)
    return rows


def hit_overlap(store: np.ndarray, sasrec: np.ndarray) -> dict[str, float]:
    """Shares of users by who has the target in the top 10 (ranks [U], 0-based)."""
    s_hit, b_hit = (store >= 0) & (store < K), (sasrec >= 0) & (sasrec < K)
    return {
        "both": float((s_hit & b_hit).mean()),
        "only_store": float((s_hit & ~b_hit).mean()),
        "only_sasrec": float((~s_hit & b_hit).mean()),
        "neither": float((~s_hit & ~b_hit).mean()),
    }


def match_users(
    store_users: Sequence[str],
    store_targets: Sequence[str],
    sasrec_users: Sequence[str],
    sasrec_targets: Sequence[str],
    sasrec_ranks: np.ndarray,
) -> np.ndarray:
    """SASRec-CE's ranks [U] in the order of ``store_users``.

    StoreError when the two do not hold the same test users with the same targets (both
    read the workspace's test split, so a mismatch means the split changed meanwhile or
    one of the readers broke the user or target order).
    """
    if set(store_users) != set(sasrec_users) or len(store_users) != len(sasrec_users):
        only_store = sorted(set(store_users) - set(sasrec_users))
        only_sasrec = sorted(set(sasrec_users) - set(store_users))
        raise StoreError(
            f"STORE decoded {len(store_users)} test users, SASRec-CE ranked "
            f"{len(sasrec_users)}: {len(only_store)} only in STORE's (e.g. "
            f"{only_store[:1]}), {len(only_sasrec)} only in SASRec-CE's (e.g. {only_sasrec[:1]})"
        )
    position = {user: i for i, user in enumerate(sasrec_users)}
    for user, target in zip(store_users, store_targets, strict=True):
        if sasrec_targets[position[user]] != target:
            raise StoreError(
                f"test user {user!r}: STORE's target {target!r}, SASRec-CE's "
                f"{sasrec_targets[position[user]]!r}"
            )
    return np.array([sasrec_ranks[position[u]] for u in store_users], dtype=np.int64)


# ------------------------------------------------------------------ code ranks per level


@torch.no_grad()
def teacher_forced_logits(
    model: torch.nn.Module,
    builder: PromptBuilder,
    prompts: Sequence[Sequence[int]],
    target_codes: np.ndarray,
) -> torch.Tensor:
    """``[B, M - 1, V]`` float32: for each of the ``B`` prompts, the logits that predict the
    target's codes at levels 0 .. M - 2 (``target_codes`` int64 [B, M]) given the prompt
    and the target's earlier ID tokens (teacher forcing). One forward: each prompt followed
    by the target's first M - 2 ID tokens, left-padded, with an attention mask and position
    ids counted from the first real token, as the beam search feeds prompts. ``model`` must
    be in eval mode."""
    levels = target_codes.shape[1] - 1
    device = next(model.parameters()).device
    sequences = [
        [*prompt, *builder.recommendation_completion(codes.tolist())[: levels - 1]]
        for prompt, codes in zip(prompts, target_codes, strict=True)
    ]
    input_ids, mask, positions = left_padded(sequences, builder.pad_token_id, device)  # [B, T]
    extra = {"logits_to_keep": levels} if _keeps_logits(model) else {}
    logits = model(
        input_ids=input_ids, attention_mask=mask, position_ids=positions, **extra
    ).logits  # [B, T or M - 1, V]
    return logits[:, -levels:].float()  # the last M - 1 positions predict levels 0 .. M - 2


def _keeps_logits(model: torch.nn.Module) -> bool:
    """Whether the causal LM can compute logits for the last positions only."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.no_grad()
def code_ranks(
    model: torch.nn.Module,
    builder: PromptBuilder,
    trie: SemanticIdTrie,
    prompts: Sequence[Sequence[int]],
    target_codes: np.ndarray,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced rank of each target's code at every cluster level.

    ``prompts``: token ids per user; ``target_codes`` int64 [U, M]. The logits come from
    :func:`teacher_forced_logits`, ``batch_size`` users per forward. Returns ``(ranks,
    valid)``, both int64 [U, M - 1]: at level l, the number of codes that continue the
    target's prefix in ``trie`` (its valid children) and score a higher logit than the
    target's code (0 = first), and how many codes continue that prefix. Softmax over the
    level or over the valid children is monotone in these logits, so the ranks do not
    depend on the model's ID normalization. ValueError when a target ID is not in the trie.
    """
    users, id_length = target_codes.shape
    levels = id_length - 1
    if levels < 1:
        raise ValueError(f"IDs of {id_length} code have no cluster level to rank")
    device = next(model.parameters()).device
    trie = trie.to(device)
    nodes = trie.prefix_nodes(torch.as_tensor(target_codes, device=device))  # [U, M]
    if (nodes < 0).any():
        row = int((nodes < 0).any(dim=1).nonzero()[0])
        raise ValueError(f"target ID {target_codes[row].tolist()} is not in the catalogue trie")
    ranks = np.zeros((users, levels), dtype=np.int64)
    valid = np.zeros((users, levels), dtype=np.int64)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, users, batch_size):
            rows = np.arange(start, min(start + batch_size, users))
            logits = teacher_forced_logits(
                model, builder, [prompts[u] for u in rows], target_codes[rows]
            )  # [B, M - 1, V]
            block = torch.as_tensor(rows, device=device)
            for level in range(levels):
                level_logits = logits[:, level].index_select(1, trie.token_ids(level))  # [B, K]
                ok = trie.children(level, nodes[block, level]) >= 0  # [B, K] valid children
                code = torch.as_tensor(target_codes[rows, level], device=device)  # [B]
                own = level_logits.gather(1, code.unsqueeze(1))  # [B, 1]
                ranks[rows, level] = ((level_logits > own) & ok).sum(1).cpu().numpy()
                valid[rows, level] = ok.sum(1).cpu().numpy()
    finally:
        model.train(was_training)
    return ranks, valid


def level_summary(ranks: np.ndarray, valid: np.ndarray) -> list[dict[str, Any]]:
    """Per level (columns of ``ranks`` / ``valid`` [U, M - 1]): users whose target code is
    first / in the top 5 (shares), the median rank (0 = first) and median valid codes."""
    out = []
    for level in range(ranks.shape[1]):
        column = ranks[:, level]
        empty = not column.size
        out.append(
            {
                "level": level,
                "top1": None if empty else float((column == 0).mean()),
                "top5": None if empty else float((column < 5).mean()),
                "median_rank": None if empty else float(np.median(column)),
                "median_valid_codes": None if empty else float(np.median(valid[:, level])),
            }
        )
    return out


def level_table(
    counts: np.ndarray, ranks: np.ndarray, valid: np.ndarray, edges: Sequence[int]
) -> dict[str, Any]:
    """:func:`level_summary` of all sampled users and of each bucket (``counts`` [U])."""
    buckets = bucket_of(counts, edges)
    return {
        "users": len(counts),
        "all": level_summary(ranks, valid),
        "buckets": [
            {
                "bucket": label,
                "users": int((buckets == i).sum()),
                "levels": level_summary(ranks[buckets == i], valid[buckets == i]),
            }
            for i, label in enumerate(bucket_labels(edges))
        ],
    }


# ------------------------------------------------------------------------- train fit


def train_fit_prompts(
    data: TaskData, builder: PromptBuilder, history_len: int, users: int
) -> tuple[list[str], list[list[int]], list[str], np.ndarray]:
    """``(user ids, prompts, targets, other occurrences [U])`` of :func:`train_fit`: a
    seeded sample (``splits.seeded_subset`` with ``EVAL_SAMPLE_SEED``) of at most
    ``users`` of the users with at least two train items, sorted by id; each prompt holds
    the last ``history_len`` train items before the user's last one, the target is the
    last train item, and "other occurrences" counts the transition (second-to-last ->
    last) in all train sequences minus this one (int64, >= 0)."""
    from store_core.splits import EVAL_SAMPLE_SEED, recent_history, seeded_subset

    train = data.train_sequences
    eligible = sorted(u for u, sequence in train.items() if len(sequence) >= 2)
    chosen = [eligible[i] for i in seeded_subset(len(eligible), users, EVAL_SAMPLE_SEED)]
    prompts = [
        builder.recommendation([data.codes[i] for i in recent_history(train[u][:-1], history_len)])
        for u in chosen
    ]
    targets = [train[u][-1] for u in chosen]
    counts = transition_counts(train, [train[u][-2] for u in chosen], targets)
    return chosen, prompts, targets, counts - 1  # this occurrence is one of them


def sasrec_train_fit_ranks(
    model: SASRecModel, sequences: SequenceData, users: Sequence[str], targets: Sequence[str]
) -> np.ndarray:
    """SASRec-CE's int64 [U] 0-based rank (top 20; -1 a miss) of each user's LAST train
    item after the train items before it (the model reads its most recent
    ``history_len``); ``targets`` are those items' ids, checked against ``sequences``.

    Raises:
        StoreError: a user's last train item in ``sequences`` is not its ``targets`` entry
            (the two systems' train sequences differ).
    """
    from store_core.baselines.data import target_ranks
    from store_core.baselines.sasrec import top_k_for_histories

    train = [sequences.train_sequences[u] for u in users]
    for user, sequence, target in zip(users, train, targets, strict=True):
        if sequences.item_ids[int(sequence[-1]) - 1] != target:
            raise StoreError(
                f"user {user!r}: last train item {target!r} for STORE, "
                f"{sequences.item_ids[int(sequence[-1]) - 1]!r} for SASRec-CE"
            )
    top = top_k_for_histories(model, [sequence[:-1] for sequence in train], k=20)
    return target_ranks(top, np.array([int(sequence[-1]) for sequence in train], dtype=np.int64))


def train_fit(
    bundle: RecommenderBundle,
    cfg: StoreConfig,
    decoded: DecodedSplit,
    users: int,
    sasrec: tuple[SASRecModel, SequenceData],
) -> dict[str, Any]:
    """Both systems' Recall@10 / NDCG@10 on the last train item of a sample of ``users``
    users (:func:`train_fit_prompts` on the task data ``decoded`` read), overall and by
    the transition's other occurrences in train (buckets of ``TRANSITION_EDGES``): STORE
    decoded with ``store evaluate``'s beam (:func:`store_core.evaluation.local_beam_search`),
    SASRec-CE (``sasrec``: the trained model and its data) by
    :func:`sasrec_train_fit_ranks`."""
    from store_core.evaluation import local_beam_search

    history_len = bundle.trained(cfg).history_len
    chosen, prompts, targets, others = train_fit_prompts(
        decoded.data, bundle.builder, history_len, users
    )
    result = local_beam_search(bundle, prompts, cfg, progress=False)
    ranks = beam_ranks(result, decoded.item_ids, targets)
    baseline = sasrec_train_fit_ranks(*sasrec, chosen, targets)
    return {
        "users": len(chosen),
        "store": _at_k(ranks),
        "sasrec": _at_k(baseline),
        "buckets": bucket_table(others, ranks, baseline, TRANSITION_EDGES),
    }


# --------------------------------------------------------------------------- report


def _cell(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _systems_table(first_column: str, rows: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown lines of :func:`bucket_table` rows: users and both systems' R@10 / N@10."""
    lines = [
        f"| {first_column} | users | STORE R@10 | STORE N@10 | SASRec-CE R@10 | SASRec-CE N@10 |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [_cell(row[k]) for k in ("store_recall_at_10", "store_ndcg_at_10")]
        cells += [_cell(row[k]) for k in ("sasrec_recall_at_10", "sasrec_ndcg_at_10")]
        lines.append(f"| {row['bucket']} | {row['users']} | " + " | ".join(cells) + " |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The report's tables: R@10 / N@10 by bucket, overlap, code ranks by bucket."""
    store, sasrec, overlap = report["store"], report["sasrec"], report["overlap"]
    lines = [
        f"# Target frequency: STORE vs SASRec-CE ({report['config']}, seed {report['seed']})",
        "",
        f"{report['users']} test users, history kept. Overall R@10 / N@10: STORE "
        f"{store['recall_at_10']:.4f} / {store['ndcg_at_10']:.4f}, SASRec-CE "
        f"{sasrec['recall_at_10']:.4f} / {sasrec['ndcg_at_10']:.4f}. Top-10 hits: both "
        f"{overlap['both']:.4f}, only STORE {overlap['only_store']:.4f}, only SASRec-CE "
        f"{overlap['only_sasrec']:.4f}, neither {overlap['neither']:.4f}.",
        "",
        *_systems_table("target seen in train", report["buckets"]),
        "",
        "By how often the user's transition (last history item -> target) occurs in the "
        "train sequences:",
        "",
        *_systems_table("transition seen in train", report["transitions"]),
    ]
    codes = report["code_ranks"]
    lines += [
        "",
        f"STORE's teacher-forced rank of the target's code among the valid codes of its "
        f"prefix ({codes['users']} sampled users; rank 0 = first): share first / share in "
        "the top 5 / median rank (median valid codes), per level.",
        "",
        "| target seen in train | users | "
        + " | ".join(f"level {row['level']}" for row in codes["all"])
        + " |",
        "|---|---|" + "---|" * len(codes["all"]),
    ]
    for bucket in [{"bucket": "all", "users": codes["users"], "levels": codes["all"]}] + codes[
        "buckets"
    ]:
        cells = [
            "—"
            if level["top1"] is None
            else f"{level['top1']:.3f} / {level['top5']:.3f} / {level['median_rank']:g} "
            f"({level['median_valid_codes']:g})"
            for level in bucket["levels"]
        ]
        lines.append(f"| {bucket['bucket']} | {bucket['users']} | " + " | ".join(cells) + " |")
    fit = report.get("train_fit")
    if fit:
        lines += [
            "",
            f"Each system on its own training transitions ({fit['users']} sampled users: "
            "the last train item ranked after the train items before it), by how often the "
            "transition occurs in train besides this occurrence. Overall R@10 / N@10: STORE "
            f"{_cell(fit['store']['recall_at_10'])} / {_cell(fit['store']['ndcg_at_10'])}, "
            f"SASRec-CE {_cell(fit['sasrec']['recall_at_10'])} / "
            f"{_cell(fit['sasrec']['ndcg_at_10'])}.",
            "",
            *_systems_table("other occurrences in train", fit["buckets"]),
        ]
    return "\n".join(lines) + f"\n\n- command: `{report['command']}`\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="scientific-quality", help="config name or path")
    parser.add_argument(
        "--seed", type=int, default=None, help="SASRec-CE seed (default: sasrec_seeds[0])"
    )
    parser.add_argument(
        "--edges",
        type=int,
        nargs="+",
        default=list(DEFAULT_EDGES),
        help="inclusive upper bounds of the target-frequency buckets",
    )
    parser.add_argument(
        "--users", type=int, default=3000, help="test users (seeded sample) for the code ranks"
    )
    parser.add_argument(
        "--train-fit",
        type=int,
        default=0,
        help="users (seeded sample) whose last train item STORE decodes; 0: skip",
    )
    parser.add_argument("--name", default=None, help="results file stem")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where to write")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="key=value (repeatable)"
    )
    return parser


def beam_ranks(result: BeamResult, item_ids: Sequence[str], targets: Sequence[str]) -> np.ndarray:
    """int64 [U] 0-based rank of each prompt's target among its live beams (-1: a miss), as
    ``evaluation.evaluate_generative`` counts it (history kept); ``item_ids`` names the
    catalogue rows the beams hold."""
    from store_core.metrics import rank_of

    row_of = {item: i for i, item in enumerate(item_ids)}
    alive, items = result.alive, result.items  # [U, B] each
    ranks = [rank_of(row_of[t], items[u][alive[u]]) for u, t in enumerate(targets)]
    return np.array(ranks, dtype=np.int64)


def store_ranks(decoded: DecodedSplit) -> np.ndarray:
    """:func:`beam_ranks` of the decoded split: int64 [U]."""
    return beam_ranks(decoded.result, decoded.item_ids, decoded.targets)


def sasrec_ranks(
    cfg: StoreConfig, seed: int, decoded: DecodedSplit
) -> tuple[np.ndarray, SASRecModel, SequenceData]:
    """SASRec-CE trained with ``evaluation.sasrec`` and ``seed``: its test ranks [U] in the
    order of ``decoded.users`` (:func:`match_users`), the model (``model.summary`` says
    how it trained) and the sequence data it read."""
    from store_core.baselines.data import load_sequence_data
    from store_core.baselines.sasrec import rank_users, train_sasrec

    sequences = load_sequence_data(cfg.data_dir)
    model = train_sasrec(sequences, cfg.evaluation.sasrec, seed)
    ranks = match_users(
        decoded.users,
        decoded.targets,
        sequences.eval_users("test"),
        [sequences.item_ids[i - 1] for i in sequences.targets("test").tolist()],
        rank_users(model, sequences, "test", k=20),
    )
    return ranks, model, sequences


def sampled_code_ranks(
    bundle: RecommenderBundle, cfg: StoreConfig, decoded: DecodedSplit, users: int
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """:func:`code_ranks` of a seeded sample of ``users`` test users: their positions in
    ``decoded.users`` (ascending), ranks and valid codes [n, M - 1]."""
    from store_core.splits import EVAL_SAMPLE_SEED, seeded_subset
    from store_core.tasks import eval_prompts

    order, prompts, _ = eval_prompts(
        decoded.data, bundle.builder, bundle.trained(cfg).history_len, "test"
    )
    prompt_of = dict(zip(order, prompts, strict=True))
    row_of = {item: i for i, item in enumerate(decoded.item_ids)}
    keep = seeded_subset(len(decoded.users), users, EVAL_SAMPLE_SEED)
    ranks, valid = code_ranks(
        bundle.model,
        bundle.builder,
        SemanticIdTrie.from_codes(decoded.codes, bundle.level_ids),
        [prompt_of[decoded.users[i]] for i in keep],
        decoded.codes[[row_of[decoded.targets[i]] for i in keep]],  # [n, M]
        cfg.recommender.eval_batch_size,
    )
    return keep, ranks, valid


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (arguments: module docstring); returns the report it wrote."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        bucket_labels(args.edges)
    except ValueError as error:
        parser.error(f"--edges: {error}")
    if args.users < 1:
        parser.error(f"--users must be >= 1, got {args.users}")
    if args.train_fit < 0:
        parser.error(f"--train-fit must be >= 0, got {args.train_fit}")
    from store_core.bundle import load_bundle
    from store_core.config import load_config
    from store_core.evaluation import decode_split
    from store_core.progress import progress_enabled
    from store_core.recommender_training import recommender_dir

    cfg = load_config(args.config, args.overrides)
    seed = cfg.evaluation.sasrec_seeds[0] if args.seed is None else args.seed
    bundle = load_bundle(recommender_dir(cfg))
    decoded = decode_split(bundle, cfg, "test", progress=progress_enabled())
    store = store_ranks(decoded)
    sasrec, sasrec_model, sequences = sasrec_ranks(cfg, seed, decoded)
    summary = sasrec_model.summary
    counts = target_counts(decoded.data.train_sequences, decoded.targets)
    transitions = transition_counts(
        decoded.data.train_sequences,
        [next(reversed(decoded.data.history(u, "test")), None) for u in decoded.users],
        decoded.targets,
    )
    keep, ranks, valid = sampled_code_ranks(bundle, cfg, decoded, args.users)
    report: dict[str, Any] = {
        "machine": machine_info(),
        "config": args.config,
        "overrides": args.overrides,
        "checkpoint": recommender_dir(cfg),
        "command": command_line("benchmarks.target_frequency", argv),
        "seed": seed,
        "edges": args.edges,
        "users": len(decoded.users),
        "sasrec_epochs": summary.epochs,
        "sasrec_best_epoch": summary.best_epoch,
        "store": _at_k(store),
        "sasrec": _at_k(sasrec),
        "overlap": hit_overlap(store, sasrec),
        "buckets": bucket_table(counts, store, sasrec, args.edges),
        "transitions": bucket_table(transitions, store, sasrec, TRANSITION_EDGES),
        "code_ranks": level_table(counts[keep], ranks, valid, args.edges),
    }
    if args.train_fit:
        report["train_fit"] = train_fit(
            bundle, cfg, decoded, args.train_fit, (sasrec_model, sequences)
        )
    text = markdown(report)
    stem = args.name or f"target_frequency_{Path(args.config).stem}_seed{seed}"
    write_results(report, f"{stem}.json", args.results_dir)
    (args.results_dir / f"{stem}.md").write_text(text)
    print(text, flush=True)
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        main()
    except StoreError as error:  # a missing checkpoint, users that do not match: one line
        raise SystemExit(f"error: {error}") from None
