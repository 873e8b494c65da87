"""Run by tests/test_trainer_distributed.py under the ``deepspeed`` launcher (2 ranks)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import psutil
import torch

from store_core.trainer import rank, train, world_size
from tests.test_trainer import collate, config, dataset, lm_loss, params, tiny_model


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out, stage = Path(args[0]), int(args[1])
    model = tiny_model()
    before = params(model)
    result = train(model, dataset(), collate, lm_loss, config(stage), str(out / "ckpt"))
    after = params(result.model)
    listening = [
        c.laddr.ip for c in psutil.Process().net_connections("inet") if c.status == "LISTEN"
    ]
    (out / f"listening-rank{rank()}.json").write_text(json.dumps(listening))
    if rank() == 0:
        report = {
            "world_size": world_size(),
            "losses": [h["loss"] for h in result.history],
            "changed": all(not torch.equal(before[k], after[k]) for k in before),
            "checksum": float(sum(v.sum() for v in after.values())),
        }
        (out / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
