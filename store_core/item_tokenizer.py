"""Stage 2a, the semantic tokenizer: the LLM turns every item's text into a semantic ID.

Phase A trains the backbone to compress each item's text into L dense tokens that a
second pass of the same model can reconstruct the text from (token -> text); the dense
tokens of every item are then clustered per position (or, for the TIGER-style baseline,
one text embedding is residual-quantized), the last cluster level is chosen under a
per-prefix capacity so that few items share all L codes
(:mod:`store_core.last_level_assignment`), and a disambiguation level makes every ID
unique. One checkpoint directory, ``<workspace>/models/tokenizer-<quantizer>/``, holds
everything the later stages need: the backbone after Phase A, the codebook, the typed
metadata (versions, L, K, data checksum), the semantic IDs and the clustering's stats;
its layout and files are :mod:`store_core.checkpoint`'s.

Resumable checkpoints live in ``models/tokenizer-checkpoints/<training hash>``: the hash
covers everything that changes training, so a re-run after a crash resumes, and a run
with another quantizer reuses the finished training and only re-clusters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from store_core import checkpoint as ckpt
from store_core import quantizer as q
from store_core.codebook_stats import codebook_stats, plot_usage
from store_core.coherence import category_sets, semantic_coherence
from store_core.config import StoreConfig
from store_core.data_files import ITEMS_FILE, MANIFEST_FILE, read_items
from store_core.dense_tokens import (
    PhaseABatchCollator,
    extract_dense,
    extract_text_embedding,
    phase_a_loss,
    reconstruction_metrics,
)
from store_core.errors import MissingInputError, StoreError
from store_core.last_level_assignment import assign_codes
from store_core.model import build_backbone, save_model_files
from store_core.tracking import Run
from store_core.trainer import rank, train, world_size
from store_core.workspace import recover_directory, staged_directory

logger = logging.getLogger(__name__)

HOLDOUT_FRACTION = 0.05


@dataclass(frozen=True)
class TokenizerOutcome:
    """Where the semantic tokenizer's artifacts are and what it measured (the full record
    is ``stats``, as in the checkpoint's ``stats.json``; the fields below are its
    headline numbers, typed)."""

    checkpoint_dir: str
    stats: dict[str, Any]
    codebook_version: str
    train_steps: int
    tokens_per_s: float

    @property
    def num_items(self) -> int:
        return int(self.stats["num_items"])

    @property
    def collision_rate(self) -> float:
        """Items sharing all L cluster codes with another, before disambiguation."""
        return float(self.stats["collision_rate"])

    @property
    def perplexities(self) -> list[float]:
        """Code-usage perplexity per cluster level (K = perfectly uniform)."""
        return [float(level["perplexity"]) for level in self.stats["levels"]]


def checkpoint_dir(cfg: StoreConfig) -> str:
    return f"{cfg.models_dir}/tokenizer-{cfg.semantic_id.quantizer}"


def _data_checksum(cfg: StoreConfig) -> str:
    manifest = Path(cfg.data_dir) / MANIFEST_FILE
    if not manifest.exists():
        raise MissingInputError(str(manifest), "ingest")
    outputs = json.loads(manifest.read_text())["outputs"]
    return str(outputs[ITEMS_FILE])


def training_hash(cfg: StoreConfig, data_checksum: str) -> str:
    """Digest of everything that changes Phase A training (not the quantizer)."""
    relevant = {
        "model": cfg.model.model_dump(mode="json"),
        "train": cfg.tokenizer_train.model_dump(mode="json"),
        "levels": cfg.semantic_id.cluster_levels,
        "diversity": cfg.semantic_id.diversity_weight,
        "data": data_checksum,
    }
    payload = json.dumps(relevant, sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()[:12]


def _holdout(n: int, seed: int) -> np.ndarray:
    """Boolean mask of items held out of Phase A training (for reconstruction metrics)."""
    count = max(1, round(HOLDOUT_FRACTION * n)) if n >= 20 else 0
    mask = np.zeros(n, dtype=bool)
    if count:
        mask[np.random.default_rng(seed).choice(n, size=count, replace=False)] = True
    return mask


def train_semantic_tokenizer(cfg: StoreConfig, run: Run | None = None) -> TokenizerOutcome | None:
    """Phase A + clustering for ``cfg``; returns None on ranks other than 0.

    Rank 0 first repairs what a killed earlier run left around the output directory
    (:func:`store_core.workspace.recover_directory`); the trainer does the same for its
    checkpoints. Raises StoreError when ingest has not run.
    """
    if rank() == 0:
        recover_directory(checkpoint_dir(cfg))
    data_checksum = _data_checksum(cfg)
    items = read_items(cfg.data_dir)
    item_ids: list[str] = items.column("item_id").to_pylist()
    texts: list[str] = items.column("text").to_pylist()
    fields = [dict(pairs) for pairs in items.column("fields").to_pylist()]
    sid_cfg, train_cfg, model_cfg = cfg.semantic_id, cfg.tokenizer_train, cfg.model
    cluster_levels = sid_cfg.cluster_levels
    run_hash = training_hash(cfg, data_checksum)

    model, tokenizer = build_backbone(model_cfg, texts, cluster_levels, train_cfg.seed)
    held_out = _holdout(len(texts), train_cfg.seed)
    train_texts = [t for t, h in zip(texts, held_out, strict=True) if not h]
    collate = PhaseABatchCollator(tokenizer, model_cfg.max_text_tokens, cluster_levels)
    loss_fn = partial(phase_a_loss, diversity_weight=sid_cfg.diversity_weight)
    started = time.perf_counter()
    result = train(
        model,
        train_texts,
        collate,
        loss_fn,
        train_cfg,
        f"{cfg.models_dir}/tokenizer-checkpoints/{run_hash}",
        run=run,
        description="tokenizer",
    )
    train_seconds = time.perf_counter() - started
    if rank() != 0:
        return None
    trained = result.model
    extract: dict[str, Any] = {
        "max_text_tokens": model_cfg.max_text_tokens,
        "num_query_tokens": cluster_levels,
    }

    started = time.perf_counter()
    if sid_cfg.quantizer == "store":
        vectors = extract_dense(trained, tokenizer, texts, **extract)  # [N, L, D]
        codebook = q.fit_store(
            vectors, sid_cfg.codebook_size, sid_cfg.pca_dim, sid_cfg.kmeans_n_init, train_cfg.seed
        )
    else:
        vectors = extract_text_embedding(trained, tokenizer, texts, **extract)  # [N, D]
        codebook = q.fit_rqkmeans(
            vectors,
            cluster_levels,
            sid_cfg.codebook_size,
            sid_cfg.pca_dim,
            sid_cfg.kmeans_n_init,
            train_cfg.seed,
        )
    extract_seconds = time.perf_counter() - started
    codes = assign_codes(  # [N, L]
        codebook, vectors, sid_cfg.last_level_assignment, sid_cfg.last_level_capacity
    )
    stats = codebook_stats(codes, codebook.codebook_size)
    sids = q.disambiguate(codes, item_ids)  # [N, L+1]
    if len({tuple(r) for r in sids.tolist()}) != len(item_ids):
        raise RuntimeError("semantic IDs are not unique after disambiguation")

    held_texts = [t for t, h in zip(texts, held_out, strict=True) if h]
    recon = reconstruction_metrics(trained, tokenizer, held_texts, **extract) if held_texts else {}
    categories = category_sets(fields)
    has_categories = any(categories)
    coherence = semantic_coherence(
        texts, categories if has_categories else None, sids, seed=train_cfg.seed
    )
    stats.update(
        {
            "quantizer": sid_cfg.quantizer,
            "last_level_assignment": sid_cfg.last_level_assignment,
            "last_level_capacity": sid_cfg.last_level_capacity,
            "num_items": len(item_ids),
            "codebook_version": codebook.version,
            "heldout_items": int(held_out.sum()),
            "heldout_reconstruction": recon,
            "coherence_first_code": coherence,
            "train_steps": result.steps,
            "train_world_size": world_size(),
            "train_seconds": round(train_seconds, 2),
            "train_tokens_per_s": round(result.tokens_per_s, 1),
            "final_train_loss": result.final_loss,
            "extract_items_per_s": round(len(texts) / max(extract_seconds, 1e-9), 1),
        }
    )
    metadata = ckpt.TokenizerMetadata(
        codebook_version=codebook.version,
        quantizer=sid_cfg.quantizer,
        last_level_assignment=sid_cfg.last_level_assignment,
        last_level_capacity=sid_cfg.last_level_capacity,
        cluster_levels=cluster_levels,
        codebook_size=codebook.codebook_size,
        disambiguation_size=int(sids[:, -1].max()) + 1,
        data_manifest_items_sha256=data_checksum,
        training_hash=run_hash,
        backbone=model_cfg.name_or_path or "built-from-config",
        max_text_tokens=model_cfg.max_text_tokens,
        pack_bits=pack_bits(sids.shape[1]),
    )

    target = checkpoint_dir(cfg)
    with staged_directory(target) as staged:
        staging = Path(staged)
        save_model_files(trained, tokenizer, staging)
        q.save_codebook(codebook, staging)
        hashes = items.column("content_hash").to_pylist()
        ckpt.write_semantic_ids(staging, item_ids, sids, hashes, metadata.pack_bits)
        plot_usage(codes, codebook.codebook_size, staging / ckpt.USAGE_PLOT)
        ckpt.write_stats(staging, stats)
        ckpt.write_metadata(staging, metadata)
    logger.info(
        "semantic tokenizer: %d items, collision rate %.3f before disambiguation, "
        "first-code category match %.3f vs random %.3f -> %s",
        len(item_ids),
        stats["collision_rate"],
        coherence.get("same_prefix_category_match", float("nan")),
        coherence.get("random_category_match", float("nan")),
        target,
    )
    return TokenizerOutcome(
        checkpoint_dir=target,
        stats=stats,
        codebook_version=codebook.version,
        train_steps=result.steps,
        tokens_per_s=result.tokens_per_s,
    )


def load_outcome(cfg: StoreConfig) -> TokenizerOutcome:
    """The outcome a finished run (e.g. the ranks of a launcher) left in the workspace."""
    target = checkpoint_dir(cfg)
    stats = ckpt.read_stats(target)
    if stats is None or not ckpt.has_metadata(target):
        raise StoreError(f"{target} has no finished semantic tokenizer")
    metadata = ckpt.read_tokenizer_metadata(target)
    return TokenizerOutcome(
        checkpoint_dir=target,
        stats=stats,
        codebook_version=metadata.codebook_version,
        train_steps=int(stats["train_steps"]),
        tokens_per_s=float(stats["train_tokens_per_s"]),
    )


def pack_bits(id_length: int) -> int:
    """Bits per code in the packed integer column for IDs of ``id_length`` (M = L + 1)
    codes: as many as fit in 63 bits, at most 16."""
    return min(16, 63 // id_length)
