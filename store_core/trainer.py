"""The project's one trainer: DeepSpeed ZeRO (stage 2 or 3) by default, plain torch for
debugging, the same loop either way.

What it gives every phase: deterministic data order per (seed, epoch) that a resumed run
replays exactly, gradient accumulation, AdamW with linear warmup + cosine decay, gradient
clipping, bf16 where the GPU has it, a resumable checkpoint every N optimizer steps (the
latest one is picked up automatically), a progress bar with loss and tokens/s, and
per-step metrics to MLflow from rank 0 only.

On CPU DeepSpeed runs with its CPU accelerator over gloo; a single process needs the
usual ``RANK``/``WORLD_SIZE``/``MASTER_*`` variables, which :func:`ensure_distributed`
sets when no launcher did. Under ``deepspeed``/``torchrun`` with several processes each
rank takes a disjoint slice of every epoch's permutation.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from store_core.config import CONFIG_DIR, TrainConfig
from store_core.model import default_device
from store_core.progress import progress
from store_core.tracking import Run

logger = logging.getLogger(__name__)

DEEPSPEED_DIR = CONFIG_DIR.parent / "deepspeed"
LATEST = "latest"

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]
Collate = Callable[[list[Any]], Batch]


@dataclass
class TrainResult:
    """What a training run did. ``model`` holds the trained weights as a plain module."""

    model: nn.Module
    steps: int
    resumed_from: int | None
    final_loss: float
    tokens_per_s: float
    samples_per_s: float
    targets_per_s: float = 0.0  # from the loss's ``targets`` metric (0 when it has none)
    history: list[dict[str, float]] = field(default_factory=list)
    validation: list[dict[str, float]] = field(default_factory=list)
    best_metric: float | None = None
    best_epoch: int | None = None
    stopped_early: bool = False


@dataclass(frozen=True)
class EarlyStopping:
    """Validate at every epoch end; keep the best weights; stop after ``patience`` epochs
    without improvement of ``monitor`` (higher is better)."""

    validate: Callable[[nn.Module], dict[str, float]]
    monitor: str
    patience: int


# --------------------------------------------------------------------------------------
# distributed setup
# --------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_distributed() -> None:
    """Initialise torch.distributed for DeepSpeed (one local process unless launched)."""
    import deepspeed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)


def rank() -> int:
    """This process's rank: from torch.distributed, else the launcher's RANK, else 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_world_size())
    return 1


def use_bf16(setting: str) -> bool:
    if setting == "on":
        return True
    if setting == "off":
        return False
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    """The shipped (or user) ZeRO JSON with the ``auto`` values filled from ``cfg``."""
    path = (
        Path(cfg.deepspeed.config_file)
        if cfg.deepspeed.config_file
        else DEEPSPEED_DIR / f"zero{cfg.deepspeed.stage}.json"
    )
    ds = json.loads(path.read_text())
    auto = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
    }
    for key, value in auto.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    ds.pop("train_batch_size", None)
    bf16 = ds.setdefault("bf16", {})
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = use_bf16(cfg.bf16)
    ds.setdefault("zero_optimization", {})["stage"] = cfg.deepspeed.stage
    return ds


# --------------------------------------------------------------------------------------
# schedule and data order
# --------------------------------------------------------------------------------------
def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine decay to 10% of the peak."""

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))

    return factor


@dataclass(frozen=True)
class DataPlan:
    """Which samples make micro-batch ``m`` on this rank; a pure function of the seed.

    Each epoch is a seeded permutation. With ``lengths`` (tokens per sample) it is
    length-grouped by ``transformers.trainer_pt_utils.get_length_grouped_indices`` with a
    global batch of ``batch_size * world``: random mega-batches of 50 global batches are
    sorted by length, so a batch holds samples of similar length and pads little, while
    batches stay in random order (the longest first, which surfaces out-of-memory early).
    """

    num_samples: int
    batch_size: int
    seed: int
    rank: int
    world: int
    lengths: tuple[int, ...] | None = None
    _orders: dict[int, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.lengths is not None and len(self.lengths) != self.num_samples:
            raise ValueError(f"{len(self.lengths)} lengths for {self.num_samples} samples")

    def order(self, epoch: int) -> np.ndarray:
        """``[num_samples]`` sample indices of ``epoch`` in the order they are batched."""
        cached = self._orders.get(epoch)
        if cached is not None:
            return cached
        if self.lengths is None:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        else:
            from transformers.trainer_pt_utils import get_length_grouped_indices

            generator = torch.Generator().manual_seed(
                int(np.random.default_rng([self.seed, epoch]).integers(2**62))
            )
            grouped = get_length_grouped_indices(
                list(self.lengths), self.batch_size * self.world, generator=generator
            )
            order = np.asarray(grouped, dtype=np.int64)
        self._orders.clear()  # one epoch at a time: flat memory
        self._orders[epoch] = order
        return order

    @property
    def per_rank(self) -> int:
        return self.num_samples // self.world

    @property
    def batches_per_epoch(self) -> int:
        return max(1, math.ceil(self.per_rank / self.batch_size))

    def batch(self, micro: int) -> list[int]:
        epoch, index = divmod(micro, self.batches_per_epoch)
        order = self.order(epoch)
        mine = order[: self.per_rank * self.world][self.rank :: self.world]
        return mine[index * self.batch_size : (index + 1) * self.batch_size].tolist()


def total_steps(cfg: TrainConfig, plan: DataPlan) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    micro = cfg.epochs * plan.batches_per_epoch
    return max(1, math.ceil(micro / cfg.grad_accum))


# --------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------
def latest_step(checkpoint_dir: str) -> int | None:
    """The step of the newest complete checkpoint in ``checkpoint_dir``, if any."""
    marker = Path(checkpoint_dir) / LATEST
    if not marker.exists():
        return None
    tag = marker.read_text().strip()
    if not (Path(checkpoint_dir) / tag).is_dir():
        return None
    return int(tag.removeprefix("step-"))


def _prune(checkpoint_dir: str, keep: int = 2) -> None:
    tags = sorted(
        (p for p in Path(checkpoint_dir).glob("step-*") if p.is_dir()),
        key=lambda p: int(p.name.removeprefix("step-")),
    )
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


class _PlainEngine:
    """The DeepSpeed-engine surface the loop uses, in plain torch (``deepspeed.enabled: false``)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        cfg: TrainConfig,
    ) -> None:
        self.module = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.cfg = cfg
        self.device = default_device()
        self.module.to(self.device)
        self.micro = 0
        self.autocast = use_bf16(cfg.bf16) and self.device.type == "cuda"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def train(self) -> None:
        self.module.train()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.grad_accum).backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.cfg.grad_accum:
            return
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save_checkpoint(self, directory: str, tag: str, client_state: dict[str, Any]) -> None:
        target = Path(directory) / tag
        target.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "model": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "client_state": client_state,
            },
            target / "state.pt",
        )
        (Path(directory) / LATEST).write_text(tag)

    def load_checkpoint(self, directory: str) -> dict[str, Any]:
        tag = (Path(directory) / LATEST).read_text().strip()
        state = torch.load(Path(directory) / tag / "state.pt", weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        client: dict[str, Any] = state["client_state"]
        self.micro = int(client["step"]) * self.cfg.grad_accum
        return client


def _build_engine(model: nn.Module, cfg: TrainConfig, steps: int) -> tuple[Any, torch.device]:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [  # empty groups left out (DeepSpeed drops them, the scheduler would not)
        group
        for group in (
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        )
        if group["params"]
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, steps))
    if not cfg.deepspeed.enabled:
        plain = _PlainEngine(model, optimizer, scheduler, cfg)
        return plain, plain.device
    import deepspeed

    ensure_distributed()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg),
    )
    return engine, torch.device(engine.device)


def _snapshot(engine: Any, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """A CPU copy of the full weights (gathers ZeRO-3 shards; collective under ZeRO-3)."""
    if not cfg.deepspeed.enabled or cfg.deepspeed.stage < 3:
        return {k: v.detach().clone().cpu() for k, v in engine.module.state_dict().items()}
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {k: v.detach().clone().cpu() for k, v in engine.module.state_dict().items()}


def _consolidate(
    engine: Any,
    model: nn.Module,
    cfg: TrainConfig,
    best_state: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Return a plain module with the full trained (or best) weights."""
    if not cfg.deepspeed.enabled or cfg.deepspeed.stage < 3:
        module: nn.Module = engine.module
        if best_state is not None:
            module.load_state_dict(best_state)
        return module
    state = best_state if best_state is not None else _snapshot(engine, cfg)
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError("ZeRO-3 consolidation needs a Hugging Face model (with .config)")
    fresh: nn.Module = type(model)(config)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    # Tied weights may appear under one name only; anything else missing is a bug.
    if unexpected or any("lm_head" not in k and "embed" not in k for k in missing):
        raise RuntimeError(f"ZeRO-3 consolidation mismatch: {missing} {unexpected}")
    return fresh


# --------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------
def train(
    model: nn.Module,
    dataset: Sequence[Any],
    collate: Collate,
    loss_fn: LossFn,
    cfg: TrainConfig,
    checkpoint_dir: str,
    *,
    run: Run | None = None,
    description: str = "train",
    resume: bool = True,
    early_stopping: EarlyStopping | None = None,
    lengths: Sequence[int] | None = None,
) -> TrainResult:
    """Train ``model`` on ``dataset`` until ``cfg.max_steps`` / ``cfg.epochs``.

    ``collate`` turns a list of samples into a batch of tensors; ``loss_fn(engine, batch)``
    returns the loss and a dict of floats to log (a ``tokens`` entry feeds tokens/s).
    With ``resume`` the newest checkpoint in ``checkpoint_dir`` is loaded and training
    continues from its step with the same data order as an uninterrupted run.
    ``early_stopping`` validates at each epoch end (on every rank, so ZeRO-3 forwards stay
    collective), logs the metrics and returns the best epoch's weights. ``lengths``
    (tokens per sample) length-groups the batches when ``cfg.group_by_length`` is on
    (:class:`DataPlan`). A ``targets`` entry of the loss metrics feeds targets/s.
    """
    if len(dataset) == 0:
        raise ValueError("no training samples")
    torch.manual_seed(cfg.seed)
    if cfg.deepspeed.enabled:
        ensure_distributed()
    grouped = (
        tuple(int(n) for n in lengths) if lengths is not None and cfg.group_by_length else None
    )
    plan = DataPlan(len(dataset), cfg.batch_size, cfg.seed, rank(), world_size(), grouped)
    steps = total_steps(cfg, plan)
    engine, device = _build_engine(model, cfg, steps)
    Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)

    start = 0
    resumed_from = None
    if resume and latest_step(checkpoint_dir) is not None:
        if cfg.deepspeed.enabled:
            _, client = engine.load_checkpoint(checkpoint_dir)
        else:
            client = engine.load_checkpoint(checkpoint_dir)
        start = resumed_from = int(client["step"])
        logger.info("resumed %s from step %d (%s)", description, start, checkpoint_dir)

    is_main = rank() == 0
    history: list[dict[str, float]] = []
    bar = progress(total=steps, initial=start, desc=description, disable=None if is_main else True)
    if not is_main:
        bar.disable = True
    engine.train()
    window_loss, window_tokens, window_samples, window_micro = 0.0, 0.0, 0, 0
    window_targets = 0.0
    window_extra: dict[str, float] = {}
    tokens_total, samples_total, clock = 0.0, 0, time.perf_counter()
    targets_total = 0.0
    window_clock = clock
    last_loss = float("nan")
    validation: list[dict[str, float]] = []
    best_metric: float | None = None
    best_epoch: int | None = None
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs = 0
    if early_stopping is not None and resumed_from is not None:
        restored = _load_best(checkpoint_dir, resumed_from)
        if restored is not None:
            validation, best_metric, best_epoch, bad_epochs, best_state = restored
            logger.info("restored early-stopping state: best epoch %s", best_epoch)
    stopped_early = False
    micro = start * cfg.grad_accum
    step = start
    epoch_batches = plan.batches_per_epoch
    while step < steps:
        indices = plan.batch(micro)
        batch = {k: v.to(device) for k, v in collate([dataset[i] for i in indices]).items()}
        loss, extra = loss_fn(engine, batch)
        engine.backward(loss)
        engine.step()
        micro += 1
        window_loss += float(loss.detach())
        window_micro += 1
        window_samples += len(indices)
        window_tokens += float(extra.get("tokens", 0.0))
        window_targets += float(extra.get("targets", 0.0))
        for key, value in extra.items():
            if key not in ("tokens", "targets"):
                window_extra[key] = window_extra.get(key, 0.0) + float(value)
        if micro % cfg.grad_accum:
            continue
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == steps:
            elapsed = max(time.perf_counter() - window_clock, 1e-9)
            last_loss = window_loss / window_micro
            record = {
                "loss": last_loss,
                "lr": float(engine.optimizer.param_groups[0]["lr"]),
                "tokens_per_s": window_tokens * world_size() / elapsed,
                "samples_per_s": window_samples * world_size() / elapsed,
                **{k: v / window_micro for k, v in window_extra.items()},
            }
            if window_targets:
                record["targets_per_s"] = window_targets * world_size() / elapsed
            history.append({"step": float(step), **record})
            bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if is_main and run is not None:
                run.log_metrics({f"{description}/{k}": v for k, v in record.items()}, step=step)
            tokens_total += window_tokens
            samples_total += window_samples
            targets_total += window_targets
            window_loss, window_tokens, window_samples, window_micro = 0.0, 0.0, 0, 0
            window_targets = 0.0
            window_extra = {}
            window_clock = time.perf_counter()
        if step % cfg.checkpoint_every == 0 or step == steps:
            _save(engine, checkpoint_dir, step, cfg)
        at_epoch_end = micro % epoch_batches == 0
        due = step % cfg.eval_every == 0 if cfg.eval_every else at_epoch_end
        if early_stopping is not None and due:
            epoch = step // cfg.eval_every if cfg.eval_every else micro // epoch_batches
            metrics = early_stopping.validate(engine.module)
            engine.train()
            validation.append({"epoch": float(epoch), "step": float(step), **metrics})
            logger.info("epoch %d validation: %s", epoch, metrics)
            if is_main and run is not None:
                run.log_metrics({f"{description}/val_{k}": v for k, v in metrics.items()}, step)
            value = metrics[early_stopping.monitor]
            improved = best_metric is None or value > best_metric
            if improved:
                best_metric, best_epoch, bad_epochs = value, epoch, 0
                best_state = _snapshot(engine, cfg)
            else:
                bad_epochs += 1
            # Checkpoint with the early-stopping state, so a resumed run keeps its best.
            if step % cfg.checkpoint_every and step != steps:
                _save(engine, checkpoint_dir, step, cfg)
            if rank() == 0:
                assert best_metric is not None and best_epoch is not None
                _save_best(
                    checkpoint_dir,
                    step,
                    validation,
                    (best_metric, best_epoch, bad_epochs),
                    best_state if improved else None,
                )
            if not improved and bad_epochs >= early_stopping.patience:
                logger.info(
                    "early stopping at epoch %d: best %s %.4f at epoch %d",
                    epoch,
                    early_stopping.monitor,
                    best_metric,
                    best_epoch,
                )
                stopped_early = True
                break
    bar.close()
    elapsed = max(time.perf_counter() - clock, 1e-9)
    trained = _consolidate(engine, model, cfg, best_state)
    return TrainResult(
        model=trained,
        steps=step,
        resumed_from=resumed_from,
        final_loss=last_loss,
        tokens_per_s=tokens_total * world_size() / elapsed,
        samples_per_s=samples_total * world_size() / elapsed,
        targets_per_s=targets_total * world_size() / elapsed,
        history=history,
        validation=validation,
        best_metric=best_metric,
        best_epoch=best_epoch,
        stopped_early=stopped_early,
    )


#: Early-stopping state next to the checkpoints: the validation history and the best
#: weights so far, so a resumed run still returns the best epoch's weights.
BEST_DIR = "best"


def _save_best(
    checkpoint_dir: str,
    step: int,
    validation: list[dict[str, float]],
    summary: tuple[float, int, int],
    state: dict[str, torch.Tensor] | None,
) -> None:
    """Record the early-stopping state at validation ``step`` (its checkpoint exists);
    ``state``: the new best weights, None when they did not change."""
    from safetensors.torch import save_file

    best = Path(checkpoint_dir) / BEST_DIR
    best.mkdir(parents=True, exist_ok=True)
    record_path = best / "state.json"
    weights_step = json.loads(record_path.read_text())["weights_step"] if state is None else step
    if state is not None:
        tmp = best / "model.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        tmp.replace(best / "model.safetensors")
    metric, epoch, bad = summary
    record = {
        "step": step,
        "weights_step": weights_step,
        "best_metric": metric,
        "best_epoch": epoch,
        "bad_epochs": bad,
        "validation": validation,
    }
    tmp_record = best / "state.json.tmp"
    tmp_record.write_text(json.dumps(record))
    tmp_record.replace(record_path)


def _load_best(
    checkpoint_dir: str, resumed_step: int
) -> tuple[list[dict[str, float]], float, int, int, dict[str, torch.Tensor]] | None:
    """The early-stopping state saved at or before ``resumed_step``, if any."""
    from safetensors.torch import load_file

    best = Path(checkpoint_dir) / BEST_DIR
    if not (best / "state.json").is_file() or not (best / "model.safetensors").is_file():
        return None
    record = json.loads((best / "state.json").read_text())
    if record["step"] > resumed_step:  # newer than the checkpoint: not this run's past
        return None
    return (
        list(record["validation"]),
        float(record["best_metric"]),
        int(record["best_epoch"]),
        int(record["bad_epochs"]),
        load_file(str(best / "model.safetensors")),
    )


def _save(engine: Any, checkpoint_dir: str, step: int, cfg: TrainConfig) -> None:
    tag = f"step-{step}"
    engine.save_checkpoint(checkpoint_dir, tag=tag, client_state={"step": step})
    if cfg.deepspeed.enabled and rank() == 0:
        (Path(checkpoint_dir) / LATEST).write_text(tag)
    if rank() == 0:
        _prune(checkpoint_dir)
