"""Recommendation targets learned per second: sequence mode vs prefix mode, same model,
same process; plus what the two Phase B cost cuts of issue 13 save.

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.rec_samples_throughput \\
        --config ml-100k-quality --set workspace=/path/to/workspace --steps 40

Needs a workspace with a finished Phase A (`store ingest` + `store train --phase
tokenizer` with the same config). Three measurements, all from the Phase A checkpoint's
model with the semantic-ID vocabulary added (``recommender.prepare_phase_b``):

1. **Targets/s.** The recommendation task alone, rendered both ways
   (``recommender.rec_samples``: ``prefix`` = one row per target, ``sequence`` = one row
   per window labelling up to ``history_len`` targets; the same targets). Each mode
   trains a fresh copy of the same weights on ``--steps`` batches drawn uniformly from
   one epoch batched as Phase B batches it (:func:`epoch_rate`: batch size, length
   grouping, per-target loss with ID tokens over their level's codes; plain torch
   AdamW), alternating modes over ``--rounds`` rounds so background load hits both
   alike. Reported: seconds per step, the epoch's time (mean step time x batches per
   epoch), targets/s and rows/s over the epoch.
2. **Logits only where there are labels.** Forward + backward of the same sequence-mode
   batches with the output projection on the gathered labelled positions, ID tokens on
   their level's rows only (``tasks.token_losses``), vs full ``[B, T, V]`` logits then
   the same columns (``gather=False``), plain torch, alternating; seconds per batch.
3. **Length grouping.** For the config's whole mixture in sequence mode: tokens the
   collator feeds in one epoch (rows padded to the longest of their batch) with
   length-grouped batches (``train.group_by_length``) vs a plain shuffle; the share of
   those tokens that is padding.

Prints the report and writes benchmarks/results/rec_samples_<config>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.machine import command_line, machine_info, write_results
from store_core.config import LossNormalization, RecSamples, TaskSpec, TrainConfig, load_config
from store_core.model import count_parameters
from store_core.recommender_training import PhaseBInputs, prepare_phase_b
from store_core.tasks import (
    IdVocabulary,
    Sample,
    SampleCollator,
    build_mixture,
    padded_tokens,
    token_losses,
)
from store_core.trainer import DataPlan


def rec_samples(
    inputs: PhaseBInputs, history_len: int, seed: int, mode: RecSamples
) -> list[Sample]:
    """The recommendation task alone, rendered in ``mode``."""
    spec = [TaskSpec(task="recommendation")]
    return build_mixture(spec, inputs.data, inputs.builder, history_len, seed, mode)


def epoch_rate(
    inputs: PhaseBInputs,
    samples: list[Sample],
    train_cfg: TrainConfig,
    normalization: LossNormalization,
    steps: int,
    seed: int,
) -> dict[str, float]:
    """Targets/s over one epoch of ``samples``, estimated from ``steps`` of its batches.

    The epoch is batched as Phase B batches it (``DataPlan``, length-grouped when the
    config says so); ``steps`` of its batches, drawn uniformly at random (``seed``), are
    trained in order on a copy of the Phase A model (plain torch AdamW at the config's
    learning rate, clipping as configured), each optimizer step timed. The epoch's time is
    the mean step time times its number of batches, so the estimate is not biased by
    where the grouped order puts long or short rows.
    """
    model = copy.deepcopy(inputs.model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr)
    loss_fn = inputs.loss(normalization, train_cfg.batch_size, samples)
    lengths = tuple(s.num_tokens for s in samples)
    plan = DataPlan(
        len(samples),
        train_cfg.batch_size,
        train_cfg.seed,
        0,
        1,
        lengths if train_cfg.group_by_length else None,
    )
    collate = SampleCollator(inputs.builder.pad_token_id, None)
    rng = np.random.default_rng(seed)
    small = plan.batches_per_epoch < steps + 2  # a tiny epoch: batches may repeat
    chosen = rng.choice(plan.batches_per_epoch, size=steps + 2, replace=small).tolist()
    seconds: list[float] = []
    targets = tokens = 0.0
    for position, index in enumerate(chosen):
        batch = collate([samples[i] for i in plan.batch(index)])
        started = time.perf_counter()
        loss, metrics = loss_fn(model, batch)
        loss.backward()
        if train_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if position >= 2:  # the first two steps warm up the allocator
            seconds.append(time.perf_counter() - started)
            targets += metrics["targets"]
            tokens += metrics["tokens"]
    step_s = statistics.fmean(seconds)
    epoch_s = step_s * plan.batches_per_epoch
    epoch_targets = sum(sample.num_targets for sample in samples)
    return {
        "step_s": round(step_s, 4),
        "batches_per_epoch": plan.batches_per_epoch,
        "epoch_minutes": round(epoch_s / 60, 2),
        "targets_per_s": round(epoch_targets / epoch_s, 1),
        "rows_per_s": round(len(samples) / epoch_s, 1),
        "sampled_targets_per_step": round(targets / len(seconds), 1),
        "sampled_tokens_per_step": round(tokens / len(seconds), 1),
    }


def logits_cost(
    inputs: PhaseBInputs, samples: list[Sample], batch_size: int, batches: int, rounds: int
) -> dict[str, float]:
    """Seconds per forward + backward batch, gathered vs full logits (same batches)."""
    model = copy.deepcopy(inputs.model).train()
    collate = SampleCollator(inputs.builder.pad_token_id, None)
    plan = DataPlan(len(samples), batch_size, 0, 0, 1)
    chosen = [collate([samples[i] for i in plan.batch(b)]) for b in range(batches)]
    ids = IdVocabulary(inputs.level_ids)
    seconds: dict[str, list[float]] = {"gathered": [], "full": []}
    for _ in range(rounds):
        for name, gather in (("full", False), ("gathered", True)):
            started = time.perf_counter()
            for batch in chosen:
                losses = token_losses(model, batch, ids, gather=gather)
                losses.per_target().mean().backward()
                model.zero_grad(set_to_none=True)
            seconds[name].append((time.perf_counter() - started) / len(chosen))
    full, gathered = statistics.median(seconds["full"]), statistics.median(seconds["gathered"])
    return {
        "full_logits_s_per_batch": round(full, 4),
        "gathered_logits_s_per_batch": round(gathered, 4),
        "speedup": round(full / gathered, 3),
    }


def padding_report(samples: list[Sample], batch_size: int, seed: int) -> dict[str, float]:
    """Collated tokens in one epoch, length-grouped vs plainly shuffled."""
    lengths = tuple(s.num_tokens for s in samples)
    real = sum(lengths)
    report: dict[str, float] = {"real_tokens": real}
    for name, plan in (
        ("shuffled", DataPlan(len(samples), batch_size, seed, 0, 1)),
        ("grouped", DataPlan(len(samples), batch_size, seed, 0, 1, lengths)),
    ):
        fed = padded_tokens(samples, batch_size, plan.order(0).tolist())
        report[f"{name}_tokens"] = fed
        report[f"{name}_padding_share"] = round(1 - real / fed, 4)
    report["tokens_saved_share"] = round(
        1 - report["grouped_tokens"] / report["shuffled_tokens"], 4
    )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="ml-100k-quality")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=40, help="timed batches per mode and round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per mode")
    parser.add_argument("--logit-batches", type=int, default=10)
    parser.add_argument("--name", default=None, help="results file stem")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    rec, train_cfg = cfg.recommender, cfg.recommender_train
    inputs = prepare_phase_b(cfg)
    modes: dict[str, list[Sample]] = {
        "prefix": rec_samples(inputs, rec.history_len, train_cfg.seed, "prefix"),
        "sequence": rec_samples(inputs, rec.history_len, train_cfg.seed, "sequence"),
    }
    report: dict[str, Any] = {
        "config": args.config,
        "overrides": args.overrides,
        "machine": machine_info(),
        "parameters": count_parameters(inputs.model),
        "history_len": rec.history_len,
        "batch_size": train_cfg.batch_size,
        "engine": "zero2" if train_cfg.deepspeed.enabled else "plain",
        "loss_normalization": rec.loss_normalization,
        "steps": args.steps,
        "rounds": args.rounds,
        "command": command_line("benchmarks.rec_samples_throughput"),
    }
    for mode, samples in modes.items():
        report[f"{mode}_rows"] = len(samples)
        report[f"{mode}_targets"] = sum(s.num_targets for s in samples)
        report[f"{mode}_mean_row_tokens"] = round(
            statistics.fmean(s.num_tokens for s in samples), 1
        )
    print(json.dumps(report, indent=2), flush=True)

    runs: dict[str, list[dict[str, float]]] = {"prefix": [], "sequence": []}
    for round_ in range(args.rounds):
        for mode, samples in modes.items():
            rates = epoch_rate(
                inputs, samples, train_cfg, rec.loss_normalization, args.steps, seed=round_
            )
            runs[mode].append(rates)
            print(mode, round_, rates, flush=True)
    summary: dict[str, dict[str, float]] = {}
    for mode, rounds in runs.items():
        targets_per_s = statistics.fmean(r["targets_per_s"] for r in rounds)
        summary[mode] = {
            "targets_per_s": round(targets_per_s, 1),
            "rows_per_s": round(statistics.fmean(r["rows_per_s"] for r in rounds), 2),
            "step_s": round(statistics.fmean(r["step_s"] for r in rounds), 4),
            "epoch_minutes": round(report[f"{mode}_targets"] / targets_per_s / 60, 2),
        }
    report["train"] = summary
    report["train_rounds"] = runs
    report["sequence_vs_prefix_targets_per_s"] = round(
        summary["sequence"]["targets_per_s"] / summary["prefix"]["targets_per_s"], 2
    )
    print(json.dumps(summary), report["sequence_vs_prefix_targets_per_s"], flush=True)

    report["logits"] = logits_cost(
        inputs, modes["sequence"], train_cfg.batch_size, args.logit_batches, args.rounds
    )
    print("logits", report["logits"], flush=True)
    mixture = build_mixture(
        rec.mixture, inputs.data, inputs.builder, rec.history_len, train_cfg.seed, "sequence"
    )
    report["padding_sequence_mixture"] = padding_report(
        mixture, train_cfg.batch_size, train_cfg.seed
    )
    print("padding", report["padding_sequence_mixture"], flush=True)
    write_results(report, f"{args.name or 'rec_samples_' + Path(args.config).stem}.json")


if __name__ == "__main__":
    main()
