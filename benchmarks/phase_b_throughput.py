"""Phase B throughput: multi-task training tokens/s (DeepSpeed ZeRO-2 and plain torch, same
model, same samples, same process), and constrained-decoding users/s on validation users.

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.phase_b_throughput --config ml-100k \\
        --steps 60

Needs a workspace with a finished Phase A (`store ingest` + `store train --phase
tokenizer` with the same config). Every engine starts from the same Phase A weights and
trains ``--steps`` optimizer steps on the config's mixture (nothing is written to the
workspace; checkpoints go to a temporary directory). The first logging window (engine
set-up, allocator warm-up) is left out of the steady-state figures. Reported per engine:
supervised tokens/s (completion tokens, the ones with a loss), input tokens/s (every
token the model reads: prompt + completion) and samples/s. Prints the config and machine
and writes benchmarks/results/phase_b_<config>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.machine import command_line, machine_info, write_results
from store_core.config import StoreConfig, TrainConfig, load_config
from store_core.generate import SemanticIdTrie
from store_core.model import count_parameters
from store_core.recommender_training import PhaseBInputs, evaluate_split, prepare_phase_b
from store_core.tasks import SampleCollator
from store_core.trainer import train


@dataclass
class StepRates:
    """Steady-state Phase B training rates from ``timed_steps``."""

    tokens_per_s: float  # supervised (completion) tokens
    samples_per_s: float
    final_loss: float
    model: torch.nn.Module  # the trained copy


def timed_steps(
    cfg: StoreConfig, inputs: PhaseBInputs, train_cfg: TrainConfig, steps: int, name: str
) -> StepRates:
    """Train a copy of the Phase A model for ``steps`` optimizer steps of ``cfg``'s mixture
    with ``train_cfg`` (checkpoints to a temporary directory, no validation). The first
    logging window (engine set-up, allocator warm-up) is left out of the rates."""
    model = copy.deepcopy(inputs.model)
    train_cfg = train_cfg.model_copy(
        update={
            "max_steps": steps,
            "log_every": max(1, steps // 4),
            "checkpoint_every": 10**9,
            "eval_every": None,
        }
    )
    collate = SampleCollator(inputs.builder.pad_token_id, None)
    loss = inputs.loss(cfg.recommender.loss_normalization, train_cfg.batch_size)
    with tempfile.TemporaryDirectory(prefix="store-bench-phase-b-") as tmp:
        result = train(
            model, inputs.samples, collate, loss, train_cfg, tmp, resume=False, description=name
        )
    steady = result.history[1:] or result.history
    return StepRates(
        tokens_per_s=round(statistics.fmean(h["tokens_per_s"] for h in steady), 1),
        samples_per_s=round(statistics.fmean(h["samples_per_s"] for h in steady), 2),
        final_loss=round(result.final_loss, 4),
        model=result.model,
    )


def timed_validation(
    cfg: StoreConfig, inputs: PhaseBInputs, model: torch.nn.Module, limit: int | None
) -> tuple[int, float]:
    """Constrained beam search over (up to ``limit``) validation users with ``model``, as
    Phase B's validation runs it: (users decoded, seconds)."""
    trie = SemanticIdTrie.from_codes(inputs.codes, inputs.level_ids)
    row_of = {item: i for i, item in enumerate(inputs.item_ids)}
    started = time.perf_counter()
    _, ranks = evaluate_split(
        model, inputs.data, inputs.builder, trie, row_of, cfg, "valid", limit=limit
    )
    return len(ranks), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="ml-100k")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--decode-users", type=int, default=200)
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    inputs = prepare_phase_b(cfg)
    seq_tokens = statistics.fmean(
        s.num_tokens for s in inputs.samples
    )  # what the collator feeds, on average (prompts are already truncated when rendered)
    report: dict[str, object] = {
        "config": args.config,
        "overrides": args.overrides,
        "machine": machine_info(),
        "model": cfg.model.model_dump(mode="json"),
        "parameters": count_parameters(inputs.model),
        "batch_size": cfg.recommender_train.batch_size,
        "loss_normalization": cfg.recommender.loss_normalization,
        "steps": args.steps,
        "samples_per_task": inputs.samples_per_task,
        "mean_sequence_tokens": round(seq_tokens, 1),
        "command": command_line("benchmarks.phase_b_throughput"),
    }
    print(json.dumps(report, indent=2), flush=True)
    runs: dict[str, dict[str, float]] = {}
    trained: torch.nn.Module = inputs.model
    for name, ds in (("plain", {"enabled": False}), ("zero2", {"enabled": True, "stage": 2})):
        train_cfg = cfg.recommender_train.model_copy(
            update={"deepspeed": cfg.recommender_train.deepspeed.model_copy(update=ds)}
        )
        rates = timed_steps(cfg, inputs, train_cfg, args.steps, name)
        runs[name] = {
            "supervised_tokens_per_s": rates.tokens_per_s,
            "input_tokens_per_s": round(rates.samples_per_s * seq_tokens, 1),
            "samples_per_s": rates.samples_per_s,
            "final_loss": rates.final_loss,
        }
        print(name, runs[name], flush=True)
        trained = rates.model
    report["train"] = runs
    report["zero2_vs_plain"] = round(
        runs["zero2"]["supervised_tokens_per_s"] / runs["plain"]["supervised_tokens_per_s"], 3
    )

    users, seconds = timed_validation(cfg, inputs, trained, args.decode_users)
    report["decode"] = {
        "users": users,
        "beam_size": cfg.recommender.beam_size,
        "users_per_s": round(users / seconds, 1),
    }
    print(json.dumps({"train": runs, "decode": report["decode"]}), flush=True)
    write_results(report, f"phase_b_{Path(args.config).stem}.json")


if __name__ == "__main__":
    main()
