"""The project's one trainer: DeepSpeed ZeRO (stage 2 or 3) by default, plain torch for
debugging, the same loop either way.

What it gives every phase: deterministic data order per (seed, epoch) that a resumed run
replays exactly, gradient accumulation, AdamW with linear warmup + cosine decay, gradient
clipping, bf16 where the GPU has it, a resumable checkpoint every N optimizer steps (the
newest complete one is picked up automatically and continues bit for bit, see
:mod:`store_core.training_checkpoints`: published atomically, loaded without unpickling),
a progress bar with loss and tokens/s, and per-step metrics to MLflow from rank 0 only.

On CPU DeepSpeed runs with its CPU accelerator over gloo; a single process gets its
process group from :func:`store_core.distributed.ensure_distributed`, which listens on
127.0.0.1 only. Under ``deepspeed``/``torchrun`` with several processes each rank takes a
disjoint slice of every epoch's permutation.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from store_core import training_checkpoints as checkpoints
from store_core.config import CONFIG_DIR, TrainConfig
from store_core.distributed import barrier, ensure_distributed, rank, world_size
from store_core.errors import StoreError
from store_core.model import default_device
from store_core.progress import progress
from store_core.tracking import Run

logger = logging.getLogger(__name__)
#: Without a progress bar (not a terminal: a service's log), a progress line this often.
PROGRESS_EVERY_S = 30.0

DEEPSPEED_DIR = CONFIG_DIR.parent / "deepspeed"

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
    #: One record per validation: ``validation_round`` (1, 2, ...), ``epoch`` (the epochs
    #: of data trained on so far, fractional when ``eval_every`` validates mid-epoch),
    #: ``step`` (optimizer steps) and the validation metrics.
    validation: list[dict[str, float]] = field(default_factory=list)
    best_metric: float | None = None
    best_validation_round: int | None = None
    best_epoch: float | None = None  # the epoch of the best validation round
    stopped_early: bool = False


@dataclass(frozen=True)
class EarlyStopping:
    """Validate at every epoch end (or every ``eval_every`` steps); keep the best weights;
    stop after ``patience`` validation rounds without improvement of ``monitor`` (higher is
    better)."""

    validate: Callable[[nn.Module], dict[str, float]]
    monitor: str
    patience: int


# --------------------------------------------------------------------------------------
# engine setup
# --------------------------------------------------------------------------------------
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
    """The step a resumed run would start from: that of the complete checkpoint the
    ``latest`` pointer names, else of the newest complete one; None when there is none."""
    return checkpoints.resume_step(checkpoint_dir)


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

    def save_checkpoint(
        self, save_dir: str, tag: str, client_state: dict[str, Any], save_latest: bool = False
    ) -> None:
        """DeepSpeed's signature; writes ``<save_dir>/<tag>/state.pt`` (no pointer)."""
        target = Path(save_dir) / tag
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

    def load_checkpoint(self, load_dir: str, tag: str) -> tuple[str, dict[str, Any]]:
        """DeepSpeed's signature; ``state.pt`` is loaded weights-only (tensors, no code)."""
        path = Path(load_dir) / tag
        state = torch.load(path / "state.pt", weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        client: dict[str, Any] = state["client_state"]
        self.micro = int(client["step"]) * self.cfg.grad_accum
        return str(path), client


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
    if engine.checkpoint_engine.is_decoupled():
        raise StoreError(
            "the DeepSpeed config selects an asynchronous checkpoint engine; the trainer "
            "publishes a checkpoint only once its files are written: use the default one"
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
@dataclass
class _Meter:
    """Sums over the current logging window and over the whole run (this process)."""

    loss: float = 0.0
    micro: int = 0
    samples: int = 0
    tokens: float = 0.0
    targets: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)
    clock: float = field(default_factory=time.perf_counter)
    total_tokens: float = 0.0
    total_samples: int = 0
    total_targets: float = 0.0

    def add(self, loss: torch.Tensor, samples: int, extra: dict[str, float]) -> None:
        self.loss += float(loss.detach())
        self.micro += 1
        self.samples += samples
        self.tokens += float(extra.get("tokens", 0.0))
        self.targets += float(extra.get("targets", 0.0))
        for key, value in extra.items():
            if key not in ("tokens", "targets"):
                self.extra[key] = self.extra.get(key, 0.0) + float(value)

    def flush(self, lr: float) -> dict[str, float]:
        """The window's record (loss, lr, throughput, mean extras); starts a new window."""
        elapsed = max(time.perf_counter() - self.clock, 1e-9)
        world = world_size()
        record = {
            "loss": self.loss / self.micro,
            "lr": lr,
            "tokens_per_s": self.tokens * world / elapsed,
            "samples_per_s": self.samples * world / elapsed,
            **{k: v / self.micro for k, v in self.extra.items()},
        }
        if self.targets:
            record["targets_per_s"] = self.targets * world / elapsed
        self.total_tokens += self.tokens
        self.total_samples += self.samples
        self.total_targets += self.targets
        self.loss, self.micro, self.samples, self.tokens, self.targets = 0.0, 0, 0, 0.0, 0.0
        self.extra = {}
        self.clock = time.perf_counter()
        return record

    def window(self) -> dict[str, float]:
        """The sums behind the open window's means, for a checkpoint: a resumed run logs
        the same losses (throughput counts only this process's own time and samples)."""
        return {"loss": self.loss, "micro": float(self.micro)} | {
            f"extra/{k}": v for k, v in self.extra.items()
        }

    def reopen(self, window: dict[str, float]) -> None:
        """Continue the window a checkpoint saved (:meth:`window`)."""
        self.loss, self.micro = window.get("loss", 0.0), int(window.get("micro", 0))
        self.extra = {k.removeprefix("extra/"): v for k, v in window.items() if "/" in k}


def _resume(
    engine: Any, checkpoint_dir: str, resume: bool
) -> tuple[checkpoints.TrainerState, dict[str, torch.Tensor] | None]:
    """Clean a killed run's leftovers (rank 0), then load the checkpoint to resume from,
    if any: (trainer state, best weights so far)."""
    if rank() == 0:
        checkpoints.clean_leftovers(checkpoint_dir)
    barrier()
    found = checkpoints.resume_step(checkpoint_dir) if resume else None
    if found is None:
        return checkpoints.TrainerState(step=0), None
    return checkpoints.load(engine, checkpoint_dir, found)


def validation_round_of(record: Mapping[str, float]) -> int:
    """The validation round of a record of ``TrainResult.validation`` (``metrics.json``'s
    ``validation``). Records written before the round had its own name call it ``epoch``."""
    return int(record.get("validation_round", record["epoch"]))


def _epoch_of(record: Mapping[str, float] | None) -> float | None:
    """The epoch of a validation record; None for records written before it was recorded
    (their ``epoch`` was the validation round)."""
    if record is None or "validation_round" not in record:
        return None
    return float(record["epoch"])


def _validate(
    engine: Any,
    cfg: TrainConfig,
    stopping: EarlyStopping,
    state: checkpoints.TrainerState,
    when: tuple[int, float],
    log: Callable[[dict[str, float]], None],
) -> dict[str, torch.Tensor] | None:
    """Validate at ``when`` = (validation round, epoch), update the early-stopping fields
    of ``state``; returns a snapshot of the weights when they are the new best (on every
    rank)."""
    validation_round, epoch = when
    metrics = stopping.validate(engine.module)
    engine.train()
    state.validation.append(
        {
            "validation_round": validation_round,
            "epoch": epoch,
            "step": float(state.step),
            **metrics,
        }
    )
    logger.info(
        "validation round %d (epoch %.2f, step %d): %s",
        validation_round,
        epoch,
        state.step,
        ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
    )
    log(
        {
            "validation_round": float(validation_round),
            "epoch": epoch,
            **{f"val_{k}": v for k, v in metrics.items()},
        }
    )
    value = metrics[stopping.monitor]
    if state.best_metric is None or value > state.best_metric:
        state.best_metric, state.best_round, state.bad_rounds = value, validation_round, 0
        state.best_weights_step = state.step
        return _snapshot(engine, cfg)
    state.bad_rounds += 1
    if state.bad_rounds >= stopping.patience:
        logger.info(
            "early stopping at validation round %d: best %s %.4f at round %s",
            validation_round,
            stopping.monitor,
            state.best_metric,
            state.best_round,
        )
        state.stopped_early = True
    return None


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
    With ``resume`` the newest complete checkpoint in ``checkpoint_dir`` is loaded and
    training continues from its step exactly as an uninterrupted run would (same data
    order, RNG, history and early-stopping state); leftovers of a killed run there are
    removed first (:mod:`store_core.training_checkpoints`).
    ``early_stopping`` validates at each epoch end or every ``cfg.eval_every`` steps (on
    every rank, so ZeRO-3 forwards stay collective), logs the metrics with the validation
    round and epoch, and returns the weights of the best round. ``lengths``
    (tokens per sample) length-groups the batches when ``cfg.group_by_length`` is on
    (:class:`DataPlan`). A ``targets`` entry of the loss metrics feeds targets/s.

    Raises ValueError for an empty dataset, StoreError when a checkpoint to resume holds
    anything but tensor data (it is not loaded) or is otherwise unreadable, and OSError
    when a checkpoint cannot be written.
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
    state, best_state = _resume(engine, checkpoint_dir, resume)
    resumed_from = state.step if state.step else None
    if resumed_from is not None:
        logger.info("resumed %s from step %d (%s)", description, resumed_from, checkpoint_dir)

    is_main = rank() == 0

    def log(record: dict[str, float]) -> None:
        if is_main and run is not None:
            run.log_metrics({f"{description}/{k}": v for k, v in record.items()}, state.step)

    bar = progress(
        total=steps, initial=state.step, desc=description, disable=None if is_main else True
    )
    if not is_main:
        bar.disable = True
    engine.train()
    meter = _Meter()
    meter.reopen(state.window)
    clock = said = time.perf_counter()
    said -= PROGRESS_EVERY_S  # the first logged step gets a line
    micro = state.step * cfg.grad_accum
    while state.step < steps and not state.stopped_early:
        indices = plan.batch(micro)
        batch = {k: v.to(device) for k, v in collate([dataset[i] for i in indices]).items()}
        loss, extra = loss_fn(engine, batch)
        engine.backward(loss)
        engine.step()
        micro += 1
        meter.add(loss, len(indices), extra)
        if micro % cfg.grad_accum:
            continue
        state.step += 1
        bar.update(1)
        if state.step % cfg.log_every == 0 or state.step == steps:
            record = meter.flush(float(engine.optimizer.param_groups[0]["lr"]))
            state.last_loss = record["loss"]
            state.history.append({"step": float(state.step), **record})
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            log(record)
            if is_main and bar.disable and time.perf_counter() - said >= PROGRESS_EVERY_S:
                said = time.perf_counter()  # no bar (a service's log): a line every 30 s
                logger.info(
                    "%s: step %d/%d, loss %.4f, %.0f tokens/s",
                    description,
                    state.step,
                    steps,
                    record["loss"],
                    record["tokens_per_s"],
                )
        due = (
            state.step % cfg.eval_every == 0
            if cfg.eval_every
            else micro % plan.batches_per_epoch == 0
        )
        new_best = None
        if early_stopping is not None and due:
            validation_round = (
                state.step // cfg.eval_every if cfg.eval_every else micro // plan.batches_per_epoch
            )
            epoch = round(micro / plan.batches_per_epoch, 4)  # epochs of data trained on
            when = (validation_round, epoch)
            new_best = _validate(engine, cfg, early_stopping, state, when, log)
            best_state = new_best if new_best is not None else best_state
        # Validated steps are checkpointed too (after validation), so a resumed run keeps
        # the early-stopping state that goes with its weights.
        validated = early_stopping is not None and due
        if validated or state.step % cfg.checkpoint_every == 0 or state.step == steps:
            state.window = meter.window()
            checkpoints.save(engine, checkpoint_dir, state, new_best)
    bar.close()
    elapsed = max(time.perf_counter() - clock, 1e-9)
    trained = _consolidate(engine, model, cfg, best_state)
    return TrainResult(
        model=trained,
        steps=state.step,
        resumed_from=resumed_from,
        final_loss=state.last_loss,
        tokens_per_s=meter.total_tokens * world_size() / elapsed,
        samples_per_s=meter.total_samples * world_size() / elapsed,
        targets_per_s=meter.total_targets * world_size() / elapsed,
        history=list(state.history),
        validation=list(state.validation),
        best_metric=state.best_metric,
        best_validation_round=state.best_round,
        best_epoch=_epoch_of(
            next(
                (v for v in state.validation if validation_round_of(v) == state.best_round),
                None,
            )
        ),
        stopped_early=state.stopped_early,
    )
