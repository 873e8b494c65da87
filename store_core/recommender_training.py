"""Stage 2b, Phase B training: the same LLM learns to recommend by generating semantic IDs.
(Answering recommendation requests with the trained model is
:mod:`store_core.recommend_top_k`.)

Starting from the Phase A checkpoint (the model that produced the IDs), the semantic-ID
vocabulary is added (one token per level and code, plus the disambiguation codes), and
the model is trained on a mixture of prompt/completion tasks (recommendation, alignment,
reconstruction, ...), loss on the completion only. Each validation round (an epoch end,
or every ``eval_every`` steps) runs constrained beam search on the validation users;
training stops early on NDCG@10 and keeps the best round's weights. Afterwards the
model's text -> token ability is measured against the clustering's IDs. The output is
again one checkpoint directory,
``<workspace>/models/recommender-<quantizer>-<multitask|rec>/`` (layout:
:mod:`store_core.checkpoint`): the trained LLM with its semantic-ID tokens, the codebook,
IDs and stats copied from the Phase A checkpoint, the typed metadata (level sizes, tasks,
history length, prompt format, ...) and ``metrics.json`` (validation curve, best
validation round and its epoch, agreement).

Initialising the new rows: a cluster level's token ``<a_k>`` gets, as its input
embedding, the direction of its cluster centre mapped back from PCA space to the dense
token space (the space Phase A taught the model to read as input embeddings in its
reconstruction pass), rescaled to the mean norm of the existing embedding rows. The
disambiguation tokens and every output row start at the mean of the existing rows.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from store_core import checkpoint as ckpt
from store_core.config import IdNormalization, LossNormalization, StoreConfig
from store_core.dropout import add_dropout
from store_core.errors import StoreError
from store_core.generate import SemanticIdTrie, constrained_beam_search
from store_core.item_tokenizer import checkpoint_dir as tokenizer_dir
from store_core.lora import apply_lora, merged
from store_core.metrics import rank_of, ranking_metrics
from store_core.model import grow_embeddings, load_checkpoint, save_model_files
from store_core.prompts import PROMPT_FORMAT, PromptBuilder, lookup_sid_tokens
from store_core.quantizer import Codebook, load_codebook
from store_core.semantic_ids import vocabulary
from store_core.splits import seeded_subset
from store_core.tasks import (
    EvalSplit,
    IdVocabulary,
    Sample,
    SampleCollator,
    TaskData,
    build_mixture,
    eval_prompts,
    load_task_data,
    multitask_loss,
    targets_per_batch,
)
from store_core.tracking import Run
from store_core.trainer import EarlyStopping, LossFn, rank, train, world_size
from store_core.workspace import recover_directory, staged_directory

logger = logging.getLogger(__name__)

AGREEMENT_SAMPLE = 500


@dataclass(frozen=True)
class RecommenderOutcome:
    """Where Phase B's checkpoint is and what it measured (the full record is ``metrics``,
    as in the checkpoint's ``metrics.json``; the properties are its headline numbers)."""

    checkpoint_dir: str
    metrics: dict[str, Any]

    @property
    def variant(self) -> str:
        return str(self.metrics["variant"])

    @property
    def best_val_ndcg_at_10(self) -> float | None:
        """Validation NDCG@10 of the kept round (None: no validation ran)."""
        value = self.metrics.get("best_val_ndcg_at_10")
        return None if value is None else float(value)

    @property
    def best_validation_round(self) -> int | None:
        """The validation round (1, 2, ...) whose weights were kept (None: no validation
        ran). ``metrics.json`` written before the round had its own name called it
        ``best_epoch``."""
        if "best_validation_round" in self.metrics:
            value = self.metrics["best_validation_round"]
        else:
            value = self.metrics.get("best_epoch")
        return None if value is None else int(value)

    @property
    def best_epoch(self) -> float | None:
        """The epoch (epochs of data trained on, fractional when ``eval_every`` validates
        mid-epoch) of the kept weights; None when no validation ran or ``metrics.json`` is
        older than this record (its ``best_epoch`` was the validation round)."""
        if "best_validation_round" not in self.metrics:
            return None
        value = self.metrics.get("best_epoch")
        return None if value is None else float(value)

    def best_when(self) -> str:
        """``validation round R (epoch E)`` of the kept weights, for log lines and reports."""
        if self.best_validation_round is None:
            return "no validation round"
        epoch = self.best_epoch
        suffix = "" if epoch is None else f" (epoch {epoch:g})"
        return f"validation round {self.best_validation_round}{suffix}"

    @property
    def agreement_full_id(self) -> float:
        """Share of sampled items whose text -> ID generation reproduces all L codes."""
        return float(self.metrics["agreement_full_id"])

    @property
    def agreement_first_code(self) -> float:
        return float(self.metrics["agreement_first_code"])


def variant(cfg: StoreConfig) -> str:
    """``multitask`` when any task besides recommendation has weight, else ``rec``."""
    active = {spec.task for spec in cfg.recommender.mixture if spec.weight > 0}
    return "rec" if active <= {"recommendation"} else "multitask"


def recommender_dir(cfg: StoreConfig) -> str:
    return f"{cfg.models_dir}/recommender-{cfg.semantic_id.quantizer}-{variant(cfg)}"


#: ``recommender`` settings that only change decoding after training (added after the key
#: existed, so leaving them out keeps the keys of earlier checkpoints).
DECODING_ONLY = {
    "cold_start_backoff",
    "cold_start_backoff_depth",
    "transition_memory_weight",
    "transition_memory_depth",
    "transition_memory_decay",
    "transition_memory_window",
    "transition_memory_window_decay",
    "transition_memory_symmetric",
}


#: ``recommender`` settings added after the key existed that change training: left out of
#: the key at this default, so earlier checkpoints keep their keys.
ADDED_WITH_DEFAULT = {"id_normalization": "level"}


def _key_excluded(cfg: StoreConfig) -> set[str]:
    defaults = {k for k, v in ADDED_WITH_DEFAULT.items() if getattr(cfg.recommender, k) == v}
    return DECODING_ONLY | defaults


def training_key(cfg: StoreConfig, item_ids: list[str], codes: np.ndarray) -> str:
    """Digest of everything Phase B training depends on: its settings and the IDs it learns.

    Resumable checkpoints live under ``<recommender dir>-checkpoints/<key>``, so a run with
    another mixture, loss, budget, seed or set of semantic IDs (a retrained Phase A) starts
    afresh instead of resuming a checkpoint that belongs to different training.
    """
    digest = hashlib.sha256()
    settings = {
        "recommender": cfg.recommender.model_dump(mode="json", exclude=_key_excluded(cfg)),
        "train": cfg.recommender_train.model_dump(mode="json"),
        "model": cfg.model.model_dump(mode="json"),
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update("\n".join(item_ids).encode())
    digest.update(np.ascontiguousarray(codes, dtype=np.int64).tobytes())
    return digest.hexdigest()[:12]


#: Disambiguation tokens reserved beyond the largest one in use, so new items whose
#: generated prefix is already taken still get a code with a token (see new_items).
SPARE_DISAMBIGUATION = 16


def level_sizes(codes: np.ndarray, codebook: Codebook) -> list[int]:
    """Tokens per level: K per cluster level; used + spare codes for disambiguation."""
    last = int(codes[:, -1].max()) + 1 + SPARE_DISAMBIGUATION
    return [codebook.codebook_size] * codebook.cluster_levels + [last]


def add_semantic_id_tokens(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    codebook: Codebook,
    sizes: list[int],
) -> list[list[int]]:
    """Add the semantic-ID vocabulary and initialise its rows; returns ids per level/code."""
    tokens = vocabulary(sizes)
    before = len(tokenizer)
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
        new_ids = [cast(int, tokenizer.convert_tokens_to_ids(t)) for t in missing]
        grow_embeddings(model, len(tokenizer), new_ids, reference_rows=before)
    table = lookup_sid_tokens(tokenizer, sizes)
    if missing:
        _init_from_centroids(model, codebook, table, before)
    return table


def _init_from_centroids(
    model: PreTrainedModel, codebook: Codebook, table: list[list[int]], reference_rows: int
) -> None:
    if codebook.kind != "store":
        return  # residual centres are not dense tokens: keep the mean initialisation
    weight = cast(torch.Tensor, model.get_input_embeddings().weight)  # [V, D]
    if weight.shape[1] != codebook.input_dim:
        return
    with torch.no_grad():
        target_norm = weight[:reference_rows].norm(dim=1).mean()
        for level in range(codebook.cluster_levels):
            centres = np.asarray(codebook.centroids[level])  # [K, P]
            if codebook.pca_means is not None and codebook.pca_components is not None:
                centres = codebook.pca_means[level] + centres @ codebook.pca_components[level]
            vectors = torch.as_tensor(centres, dtype=weight.dtype)  # [K, D]
            vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-6) * target_norm
            index = torch.tensor(table[level], dtype=torch.long)
            weight[index] = vectors.to(weight.device)


def evaluate_split(
    model: torch.nn.Module,
    data: TaskData,
    builder: PromptBuilder,
    trie: SemanticIdTrie,
    row_of: dict[str, int],
    cfg: StoreConfig,
    split: EvalSplit,
    *,
    limit: int | None = None,
    progress: bool = False,
) -> tuple[dict[str, float], np.ndarray]:
    """Constrained beam search for the users of ``split``; metrics and per-user ranks."""
    users, prompts, targets = eval_prompts(data, builder, cfg.recommender.history_len, split)
    chosen = seeded_subset(len(users), limit, cfg.recommender_train.seed)
    prompts = [prompts[i] for i in chosen]
    targets = [targets[i] for i in chosen]
    result = constrained_beam_search(
        model,
        prompts,
        trie,
        beam_size=cfg.recommender.beam_size,
        pad_token_id=builder.pad_token_id,
        batch_size=cfg.recommender.eval_batch_size,
        progress=progress,
        normalization=cfg.recommender.id_normalization,
    )
    ranks = np.array(
        [rank_of(row_of[t], result.items[i]) for i, t in enumerate(targets)], dtype=np.int64
    )
    return ranking_metrics(ranks), ranks


def text_to_token_agreement(
    model: torch.nn.Module,
    data: TaskData,
    builder: PromptBuilder,
    level_ids: list[list[int]],
    cluster_levels: int,
    cfg: StoreConfig,
) -> dict[str, float]:
    """How often generating an ID from an item's text reproduces its clustered codes."""
    catalogue = data.catalogue_items()
    chosen = [
        catalogue[i]
        for i in seeded_subset(len(catalogue), AGREEMENT_SAMPLE, cfg.recommender_train.seed)
    ]
    prompts = [builder.alignment(data.texts[item]) for item in chosen]
    result = constrained_beam_search(
        model,
        prompts,
        SemanticIdTrie.levelwise(level_ids[:cluster_levels]),
        beam_size=min(10, cfg.recommender.beam_size),
        pad_token_id=builder.pad_token_id,
        batch_size=cfg.recommender.eval_batch_size,
    )
    generated = result.codes[:, 0, :cluster_levels]  # [P, L] best beam
    truth = np.array([data.codes[item][:cluster_levels] for item in chosen])
    return {
        "agreement_full_id": float(np.mean(np.all(generated == truth, axis=1))),
        "agreement_first_code": float(np.mean(generated[:, 0] == truth[:, 0])),
        "agreement_items": float(len(chosen)),
    }


@dataclass
class PhaseBInputs:
    """What Phase B trains: the Phase A model with semantic-ID tokens, and its samples."""

    source: str  # the Phase A checkpoint directory
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    codebook: Codebook
    item_ids: list[str]
    codes: np.ndarray  # [N, L+1]
    sizes: list[int]
    level_ids: list[list[int]]
    builder: PromptBuilder
    data: TaskData
    samples: list[Sample]

    @property
    def samples_per_task(self) -> dict[str, int]:
        return dict(Counter(sample.task for sample in self.samples))

    @property
    def targets_per_task(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for sample in self.samples:
            counts[sample.task] += sample.num_targets
        return dict(counts)

    def loss(
        self,
        normalization: LossNormalization,
        batch_size: int,
        samples: Sequence[Sample] | None = None,
        id_normalization: IdNormalization = "level",
    ) -> LossFn:
        """Phase B's loss for training on ``samples`` (default: :attr:`samples`):
        ``normalization`` averaging (per target: over their expected targets per
        micro-batch of ``batch_size``), ID tokens over their level's codes, or with
        ``id_normalization`` "trie" a recommendation target's over the codes that
        continue a catalogue ID (:func:`store_core.tasks.token_losses`)."""
        catalogue = None
        if id_normalization == "trie":
            catalogue = SemanticIdTrie.from_codes(self.codes, self.level_ids)
        return functools.partial(
            multitask_loss,
            normalization=normalization,
            ids=IdVocabulary(self.level_ids),
            targets_per_batch=targets_per_batch(
                self.samples if samples is None else samples, batch_size
            ),
            catalogue=catalogue,
        )


def prepare_phase_b(cfg: StoreConfig) -> PhaseBInputs:
    """Load the Phase A checkpoint, add the semantic-ID vocabulary, render the mixture."""
    source = tokenizer_dir(cfg)
    phase_a = ckpt.read_tokenizer_metadata(source)  # StoreError when absent or too old
    ckpt.warn_overrides(phase_a, cfg, source)  # Phase A's settings win (max_text_tokens)
    model, tokenizer = load_checkpoint(source)
    codebook = load_codebook(source)
    table = ckpt.read_semantic_ids(source)
    item_ids: list[str] = table.column("item_id").to_pylist()
    codes = np.array(table.column("codes").to_pylist(), dtype=np.int64)  # [N, L+1]
    sizes = level_sizes(codes, codebook)
    level_ids = add_semantic_id_tokens(model, tokenizer, codebook, sizes)
    rec = cfg.recommender
    builder = PromptBuilder(tokenizer, level_ids, phase_a.max_text_tokens)
    data = load_task_data(cfg.data_dir, dict(zip(item_ids, codes.tolist(), strict=True)))
    samples = build_mixture(
        rec.mixture, data, builder, rec.history_len, cfg.recommender_train.seed, rec.rec_samples
    )
    return PhaseBInputs(
        source,
        model,
        tokenizer,
        codebook,
        item_ids,
        codes,
        sizes,
        level_ids,
        builder,
        data,
        samples,
    )


def train_recommender(cfg: StoreConfig, run: Run | None = None) -> RecommenderOutcome | None:
    """Phase B for ``cfg``; returns None on ranks other than 0.

    Rank 0 first repairs what a killed earlier run left around the output directory
    (:func:`store_core.workspace.recover_directory`); the trainer does the same for its
    checkpoints. Raises StoreError when Phase A has not run.
    """
    if rank() == 0:
        recover_directory(recommender_dir(cfg))
    inputs = prepare_phase_b(cfg)
    rec = cfg.recommender
    model: torch.nn.Module = inputs.model
    if rec.finetune == "lora":
        model = apply_lora(inputs.model, rec.lora, [t for ids in inputs.level_ids for t in ids])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dropout = add_dropout(model, hidden=rec.hidden_dropout, attention=rec.attention_dropout)
    trie = SemanticIdTrie.from_codes(inputs.codes, inputs.level_ids)
    row_of = {item: i for i, item in enumerate(inputs.item_ids)}

    def validate(module: torch.nn.Module) -> dict[str, float]:
        metrics, _ = evaluate_split(
            module, inputs.data, inputs.builder, trie, row_of, cfg, "valid", limit=rec.val_max_users
        )
        return {k: metrics[k] for k in ("recall_at_10", "ndcg_at_10", "recall_at_20", "mrr")}

    result = train(
        model,
        inputs.samples,
        SampleCollator(inputs.builder.pad_token_id, None),
        inputs.loss(
            rec.loss_normalization,
            cfg.recommender_train.batch_size,
            id_normalization=rec.id_normalization,
        ),
        cfg.recommender_train,
        f"{recommender_dir(cfg)}-checkpoints/{training_key(cfg, inputs.item_ids, inputs.codes)}",
        run=run,
        description="recommender",
        early_stopping=EarlyStopping(validate, "ndcg_at_10", rec.early_stopping_patience),
        lengths=[sample.num_tokens for sample in inputs.samples],
    )
    dropout.remove()
    if rank() != 0:
        return None
    trained = merged(result.model)
    agreement = text_to_token_agreement(
        trained, inputs.data, inputs.builder, inputs.level_ids, inputs.codebook.cluster_levels, cfg
    )
    metrics: dict[str, Any] = {
        "variant": variant(cfg),
        "quantizer": cfg.semantic_id.quantizer,
        "loss_normalization": rec.loss_normalization,
        "id_normalization": rec.id_normalization,
        "finetune": rec.finetune,
        "trainable_parameters": trainable,
        "rec_samples": rec.rec_samples,
        "samples_per_task": inputs.samples_per_task,
        "targets_per_task": inputs.targets_per_task,
        "train_targets_per_s": round(result.targets_per_s, 1),
        "train_steps": result.steps,
        "resumed_from_step": result.resumed_from,
        "train_world_size": world_size(),
        "train_tokens_per_s": round(result.tokens_per_s, 1),
        "final_train_loss": result.final_loss,
        "validation": result.validation,
        "best_validation_round": result.best_validation_round,
        "best_epoch": result.best_epoch,
        "best_val_ndcg_at_10": result.best_metric,
        "stopped_early": result.stopped_early,
        **agreement,
    }
    best = max(result.validation, key=lambda v: v["ndcg_at_10"], default=None)
    if best is not None:
        metrics["best_val_recall_at_10"] = best["recall_at_10"]
    phase_a = ckpt.read_tokenizer_metadata(inputs.source)
    metadata = ckpt.RecommenderMetadata(
        **phase_a.model_dump(exclude={"format_version"}),
        level_sizes=inputs.sizes,
        history_len=rec.history_len,
        prompt_format=PROMPT_FORMAT,
        rec_samples=rec.rec_samples,
        mixture=list(rec.mixture),
        loss_normalization=rec.loss_normalization,
        id_normalization=rec.id_normalization,
        finetune=rec.finetune,
        variant=variant(cfg),
        phase_a_checkpoint=inputs.source,
    )
    target = recommender_dir(cfg)
    with staged_directory(target) as staged:
        staging = Path(staged)
        save_model_files(trained, inputs.tokenizer, staging)
        ckpt.copy_from_phase_a(inputs.source, staging)
        metadata = metadata.model_copy(update={"checkpoint_id": ckpt.weights_id(staging)})
        ckpt.write_metadata(staging, metadata)
        (staging / ckpt.METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    outcome = RecommenderOutcome(target, metrics)
    logger.info(
        "recommender (%s): best validation NDCG@10 %.4f at %s -> %s",
        variant(cfg),
        result.best_metric or float("nan"),
        outcome.best_when(),
        target,
    )
    return outcome


def load_outcome(cfg: StoreConfig) -> RecommenderOutcome:
    """The outcome a finished run (e.g. the ranks of a launcher) left in the workspace."""
    target = recommender_dir(cfg)
    path = Path(target) / ckpt.METRICS_FILE
    if not path.is_file():
        raise StoreError(f"{target} has no finished recommender ({ckpt.METRICS_FILE} missing)")
    return RecommenderOutcome(target, json.loads(path.read_text()))
