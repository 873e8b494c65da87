"""Phase A throughput: training tokens/s (DeepSpeed ZeRO-2, ZeRO-3 and plain torch, same
model, same data, same process) and dense-token extraction items/s.

    .venv/bin/python -m benchmarks.phase_a_throughput --config ml-100k --steps 60

Needs an ingested workspace (`store ingest -c <config>`). Prints the config and machine
and writes benchmarks/results/phase_a_<config>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

from benchmarks.machine import machine_info
from store_core.config import load_config
from store_core.data_files import read_items
from store_core.dense_tokens import PhaseABatchCollator, extract_dense, phase_a_loss
from store_core.model import build_backbone, count_parameters
from store_core.trainer import train

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="ml-100k")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--extract-items", type=int, default=1000)
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    texts = read_items(cfg.data_dir, ["text"]).column("text").to_pylist()
    levels = cfg.semantic_id.cluster_levels
    report: dict[str, object] = {
        "config": args.config,
        "overrides": args.overrides,
        "machine": machine_info(),
        "model": cfg.model.model_dump(mode="json"),
        "batch_size": cfg.tokenizer_train.batch_size,
        "steps": args.steps,
        "num_items": len(texts),
    }
    print(json.dumps(report, indent=2))
    runs = {}
    for name, ds in (
        ("plain", {"enabled": False}),
        ("zero2", {"enabled": True, "stage": 2}),
        ("zero3", {"enabled": True, "stage": 3}),
    ):
        model, tokenizer = build_backbone(cfg.model, texts, levels, 0)
        train_cfg = cfg.tokenizer_train.model_copy(
            update={
                "max_steps": args.steps,
                "log_every": max(1, args.steps // 3),
                "checkpoint_every": 10**9,
                "deepspeed": cfg.tokenizer_train.deepspeed.model_copy(update=ds),
            }
        )
        collate = PhaseABatchCollator(tokenizer, cfg.model.max_text_tokens, levels)
        loss = partial(phase_a_loss, diversity_weight=cfg.semantic_id.diversity_weight)
        result = train(
            model,
            texts,
            collate,
            loss,
            train_cfg,
            f"/tmp/store-bench-phase-a/{name}",
            resume=False,
            description=name,
        )
        # The first window includes warm-up (DeepSpeed init, allocator); report the rest.
        steady = [h["tokens_per_s"] for h in result.history[1:]] or [result.tokens_per_s]
        runs[name] = {
            "tokens_per_s": round(sum(steady) / len(steady), 1),
            "final_loss": round(result.final_loss, 4),
        }
        print(name, runs[name], flush=True)
    report["parameters"] = count_parameters(model)
    report["train"] = runs
    sample = texts[: args.extract_items]
    started = time.perf_counter()
    extract_dense(
        model,
        tokenizer,
        sample,
        max_text_tokens=cfg.model.max_text_tokens,
        num_query_tokens=levels,
        progress=False,
    )
    report["extract_items_per_s"] = round(len(sample) / (time.perf_counter() - started), 1)
    print(json.dumps({"train": runs, "extract_items_per_s": report["extract_items_per_s"]}))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"phase_a_{args.config}.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
