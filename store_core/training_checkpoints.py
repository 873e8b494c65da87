"""Resumable training checkpoints: the one module that knows their layout.

::

    <checkpoint_dir>/
      latest                     "step-N": the checkpoint to resume (written atomically)
      step-N/                    one complete checkpoint, published by a single rename
        <engine files>           DeepSpeed's model/optimizer states, or state.pt (plain torch)
        rng-rank<R>.safetensors  each rank's torch RNG state(s), so dropout replays exactly
        trainer_state.json       step, logged history, early-stopping record
        complete.json            written last, before the rename: every file's size
      best/step-M.safetensors    the best weights so far (early stopping), named by step
      .partial-step-N/           a checkpoint being written

**Crash safety.** Every rank writes into ``.partial-step-N/``; rank 0 then fsyncs the
files, writes ``complete.json``, renames the directory to ``step-N`` and rewrites
``latest`` through :func:`store_core.workspace.atomic_write_text` (temporary file, fsync,
rename, fsync of the directory). A kill at any point leaves either the previous complete
checkpoint or the new one. Resume (:func:`resume_step`) takes the checkpoint ``latest``
names when it is complete, else the newest complete one (a missing, empty or garbled
pointer, or one naming a directory without a valid ``complete.json``, only logs a
warning). :func:`clean_leftovers`, run by rank 0 when training starts, removes partial
checkpoints, temporary files, best-weight files no complete checkpoint refers to and
checkpoints beyond the newest two. Directories ``step-N`` without ``complete.json``
(written before this layout, or not by this trainer) are never resumed; they are pruned
like old checkpoints.

**No unpickling.** DeepSpeed loads its ``.pt`` files with ``torch.load(weights_only=False)``,
which runs any code a planted file carries. :func:`load` runs the engine's load under
:func:`weights_only_loads`: torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` switch makes every
``torch.load`` in that block weights-only whatever the caller passed (tensors, containers
and primitive types only), with exactly four DeepSpeed data classes allowed (an enum,
a dataclass of two ints and two loss-scaler records): what ZeRO-2 and ZeRO-3 checkpoints
of this trainer hold (checked with one rank; the switch is process-wide, so every rank's
load is covered alike). Our own files are JSON and safetensors. A file that needs
anything else (a planted payload, or an engine/optimizer that pickles other classes) is
refused with a :class:`~store_core.errors.StoreError`; nothing in it runs. Allow a new
class only if it is plain data.
``complete.json`` guards against partial files, not against a writer who can also
rewrite it: the guarantee against planted files is the weights-only load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from store_core.distributed import barrier, rank
from store_core.errors import StoreError
from store_core.workspace import atomic_write_bytes, atomic_write_text, fsync_path

logger = logging.getLogger(__name__)

FORMAT = 1
LATEST = "latest"
MANIFEST = "complete.json"
STATE = "trainer_state.json"
BEST_DIR = "best"
PARTIAL_PREFIX = ".partial-"
ASIDE_PREFIX = ".replaced-"
#: How many complete checkpoints are kept.
KEEP = 2

_TAG = re.compile(r"step-(\d+)")


def tag(step: int) -> str:
    """The directory name (DeepSpeed's tag) of the checkpoint at ``step``."""
    return f"step-{step}"


def step_of(name: str) -> int | None:
    """The step a checkpoint directory name stands for; None when it is not one."""
    match = _TAG.fullmatch(name.strip())
    return int(match.group(1)) if match else None


#: ``trainer_state.json`` fields older releases wrote under another name -> the name now.
_RENAMED_STATE_FIELDS = {"best_epoch": "best_round", "bad_epochs": "bad_rounds"}


@dataclass
class TrainerState:
    """What the loop needs besides the engine's own states to continue exactly as an
    uninterrupted run would (``trainer_state.json``)."""

    step: int
    history: list[dict[str, float]] = field(default_factory=list)
    last_loss: float = float("nan")
    validation: list[dict[str, float]] = field(default_factory=list)
    best_metric: float | None = None
    best_round: int | None = None  # the validation round of the best metric
    bad_rounds: int = 0  # validation rounds since it
    best_weights_step: int | None = None  # best/step-M.safetensors
    stopped_early: bool = False
    #: Sums of the logging window still open at ``step`` (the next record averages them).
    window: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str, source: Path) -> TrainerState:
        """Parse ``trainer_state.json``; raises StoreError naming ``source`` when it is not
        one this version wrote."""
        try:
            record = json.loads(text)
            if record.pop("format") != FORMAT:
                raise ValueError("unknown format")
            for old, new in _RENAMED_STATE_FIELDS.items():  # a state of an older release
                if old in record and new not in record:
                    record[new] = record.pop(old)
            state = cls(**record)
            state._check()
            return state
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise StoreError(f"{source} is not a trainer state this version wrote ({exc})") from exc

    def _check(self) -> None:
        """Raise TypeError for a field of the wrong type (the file is data from disk)."""

        def number(value: object) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool)

        def integer(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def records(value: object) -> bool:
            return isinstance(value, list) and all(
                isinstance(r, dict) and all(number(v) for v in r.values()) for r in value
            )

        checks = {
            "step": integer(self.step) and self.step >= 0,
            "history": records(self.history),
            "last_loss": number(self.last_loss),
            "validation": records(self.validation),
            "best_metric": self.best_metric is None or number(self.best_metric),
            "best_round": self.best_round is None or integer(self.best_round),
            "bad_rounds": integer(self.bad_rounds),
            "best_weights_step": self.best_weights_step is None or integer(self.best_weights_step),
            "stopped_early": isinstance(self.stopped_early, bool),
            "window": isinstance(self.window, dict) and records([self.window]),
        }
        wrong = [name for name, good in checks.items() if not good]
        if wrong:
            raise TypeError(f"wrong type for {', '.join(wrong)}")


# --------------------------------------------------------------------------------------
# which checkpoint to resume
# --------------------------------------------------------------------------------------
def _manifest(path: Path) -> dict[str, int] | None:
    """The file sizes ``complete.json`` promises, when it exists and every file matches."""
    try:
        record = json.loads((path / MANIFEST).read_text())
        files = {str(k): int(v) for k, v in record["files"].items()}
        if record["format"] != FORMAT or record["step"] != step_of(path.name):
            return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    for name, size in files.items():
        member = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not member.is_file():
            return None
        if member.stat().st_size != size:
            return None
    return files


def complete_steps(directory: str) -> list[int]:
    """Steps of the complete checkpoints in ``directory``, oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        step = step_of(path.name)
        if step is not None and path.is_dir() and _manifest(path) is not None:
            found.append(step)
    return sorted(found)


def resume_step(directory: str, *, warn: bool = True) -> int | None:
    """The step to resume from: the complete checkpoint ``latest`` names, else (pointer
    missing, empty, garbled or naming an incomplete directory) the newest complete one;
    None when there is none."""
    complete = complete_steps(directory)
    pointer = Path(directory) / LATEST
    try:
        named = step_of(pointer.read_text())
    except (OSError, UnicodeDecodeError):
        named = None
    if named is not None and named in complete:
        return named
    if complete:
        if warn and pointer.exists():
            logger.warning(
                "%s does not name a complete checkpoint; resuming from the newest complete one, %s",
                pointer,
                tag(complete[-1]),
            )
        return complete[-1]
    return None


# --------------------------------------------------------------------------------------
# leftovers of a killed run
# --------------------------------------------------------------------------------------
def _referenced_best(root: Path, steps: list[int]) -> set[str]:
    names = set()
    for step in steps:
        with contextlib.suppress(OSError, StoreError):
            state = read_state(root / tag(step))
            if state.best_weights_step is not None:
                names.add(f"{tag(state.best_weights_step)}.safetensors")
    return names


def clean_leftovers(directory: str) -> list[str]:
    """Remove what a killed run left in ``directory``: partial checkpoints, directories
    moved aside, temporary files, best weights no complete checkpoint refers to, and
    checkpoints beyond the :data:`KEEP` newest (a kill before pruning). Returns
    the removed paths. Rank 0 only, while no other process trains into ``directory``
    (the stage holds the workspace's writer lock). Raises OSError when one cannot go."""
    root = Path(directory)
    if not root.is_dir():
        return []
    removed: list[str] = []
    best = root / BEST_DIR
    candidates = list(root.iterdir()) + (list(best.iterdir()) if best.is_dir() else [])
    for path in candidates:
        stale = path.name.startswith((PARTIAL_PREFIX, ASIDE_PREFIX)) or (
            path.name.startswith(".") and ".tmp-" in path.name
        )
        if stale:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(str(path))
    if best.is_dir():
        keep = _referenced_best(root, complete_steps(directory))
        for path in best.iterdir():
            if path.name not in keep:
                path.unlink()
                removed.append(str(path))
    before = {p.name for p in root.iterdir()}
    _prune(root)  # a kill after publishing, before pruning, leaves one checkpoint too many
    removed += [str(root / name) for name in sorted(before - {p.name for p in root.iterdir()})]
    for line in removed:
        if step_of(Path(line).name) is not None and Path(line).parent != best:
            logger.warning(
                "removed %s: no valid %s (a checkpoint cut short, or one written by a version "
                "before checkpoint manifests, which cannot be resumed safely)",
                line,
                MANIFEST,
            )
        else:
            logger.warning("removed %s (left by an interrupted training run)", line)
    return removed


def _prune(root: Path) -> None:
    """Keep the newest :data:`KEEP` complete checkpoints (and the one ``latest`` names)
    and the best weights they use; remove every other ``step-*`` directory."""
    keep = complete_steps(str(root))[-KEEP:]
    named = resume_step(str(root), warn=False)
    keep += [named] if named is not None and named not in keep else []
    for path in root.iterdir():
        step = step_of(path.name)
        if step is not None and path.is_dir() and step not in keep:
            shutil.rmtree(path, ignore_errors=True)
    best = root / BEST_DIR
    if best.is_dir():
        used = _referenced_best(root, keep)
        for path in best.iterdir():
            if path.name not in used:
                path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------
def _rng_file(rank_: int) -> str:
    return f"rng-rank{rank_}.safetensors"


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _publish(partial: Path, final: Path) -> None:
    """fsync, write the manifest, and rename ``partial`` to ``final`` (rank 0)."""
    files = {
        str(p.relative_to(partial)): p.stat().st_size for p in partial.rglob("*") if p.is_file()
    }
    for name in files:
        fsync_path(partial / name)
    manifest = {"format": FORMAT, "step": step_of(final.name), "files": files}
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    fsync_path(partial / MANIFEST)
    fsync_path(partial)
    aside = final.with_name(f"{ASIDE_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}")
    if final.exists():  # an incomplete or superseded directory of the same step
        final.rename(aside)
    partial.rename(final)
    fsync_path(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def save(
    engine: Any,
    directory: str,
    state: TrainerState,
    best_weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the checkpoint of ``state.step`` (every rank calls this), publish it and point
    ``latest`` at it. ``best_weights``: new best weights to store as
    ``best/step-<state.step>.safetensors`` (``state.best_weights_step`` must name them).
    Raises OSError when the disk refuses a write; the previous checkpoint stays intact."""
    from safetensors.torch import save as save_bytes

    root = Path(directory)
    final = root / tag(state.step)
    partial = root / f"{PARTIAL_PREFIX}{final.name}"
    if rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        if best_weights is not None:
            (root / BEST_DIR).mkdir(exist_ok=True)
            weights = {k: v.detach().cpu().contiguous() for k, v in best_weights.items()}
            atomic_write_bytes(root / BEST_DIR / f"{final.name}.safetensors", save_bytes(weights))
    # DeepSpeed's save starts with a barrier: no rank writes before rank 0 made `partial`.
    engine.save_checkpoint(
        str(root), tag=partial.name, client_state={"step": state.step}, save_latest=False
    )
    (partial / _rng_file(rank())).write_bytes(save_bytes(_rng_state()))
    barrier()
    if rank() == 0:
        (partial / STATE).write_text(state.to_json())
        _publish(partial, final)
        atomic_write_text(root / LATEST, final.name + "\n")
        _prune(root)
    barrier()


# --------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------
def _deepspeed_safe_globals() -> list[Any]:
    """The DeepSpeed classes its checkpoints pickle besides tensors and containers: plain
    data (an int enum, a dataclass of two ints, loss-scale records) with no code run on
    load. Empty when DeepSpeed is not installed."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        return []
    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Make every ``torch.load`` in the block weights-only, even one that passes
    ``weights_only=False`` (torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``), allowing only
    :func:`_deepspeed_safe_globals` beyond torch's defaults. Process-wide while active."""
    keys = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {key: os.environ.pop(key, None) for key in keys}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


def read_state(path: Path) -> TrainerState:
    """The trainer state of the checkpoint directory ``path``; raises StoreError (or
    OSError when it cannot be read)."""
    return TrainerState.from_json((path / STATE).read_text(), path / STATE)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = next((line for line in lines if "Unsupported" in line or "error:" in line), "")
    return (reason or (lines[0] if lines else type(exc).__name__))[:300]


def load(engine: Any, directory: str, step: int) -> tuple[TrainerState, dict[str, Any] | None]:
    """Load the checkpoint of ``step`` into ``engine`` (every rank), restore this rank's
    RNG state; returns the trainer state and the best weights it refers to (or None).

    Raises StoreError when a file holds anything but tensor data (nothing in it is
    run), when the trainer state is malformed, or when the engine finds no checkpoint.
    """
    from safetensors.torch import load_file

    path = Path(directory) / tag(step)
    state = read_state(path)
    with weights_only_loads():
        try:
            loaded, _ = engine.load_checkpoint(directory, tag=path.name)
        except pickle.UnpicklingError as exc:
            raise StoreError(
                f"refusing to resume from {path}: a file in it holds more than tensor data "
                f"({_first_line(exc)}), so this trainer did not write it; nothing in it was "
                f"run: delete {path} to resume from an older checkpoint or start afresh"
            ) from exc
        except (RuntimeError, EOFError, OSError) as exc:
            raise StoreError(f"cannot resume from {path}: {_first_line(exc)}") from exc
    if loaded is None:
        raise StoreError(f"{path}: the training engine found no checkpoint files in it")
    rng = path / _rng_file(rank())
    if rng.is_file():
        saved = load_file(str(rng))
        torch.set_rng_state(saved["cpu"])
        if "cuda" in saved and torch.cuda.is_available():
            torch.cuda.set_rng_state(saved["cuda"])
    else:
        logger.warning("%s has no RNG state for rank %d (another world size?)", path, rank())
    best = None
    if state.best_weights_step is not None:
        best_file = Path(directory) / BEST_DIR / f"{tag(state.best_weights_step)}.safetensors"
        if not best_file.is_file():
            raise StoreError(f"{path} refers to best weights {best_file}, which are missing")
        best = load_file(str(best_file))
    return state, best
