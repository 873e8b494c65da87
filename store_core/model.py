"""The backbone causal LM: build or load it, extend its vocabulary, save and load checkpoints.

STORE uses ONE causal language model for every task (text -> semantic ID, history ->
next semantic ID, semantic ID -> text). This module is the single place where that model
comes from, so that a small Llama built here from the config (offline, CPU, tests) and a
pretrained Hugging Face model named by path or hub id (GPU clusters) go through the same
code afterwards: both get the Phase A query tokens ``<q_1>..<q_L>`` appended to their
vocabulary with mean-initialised embedding rows.

Checkpoints are plain Hugging Face directories (``config.json``, ``model.safetensors``,
tokenizer files) loaded with ``trust_remote_code=False`` and ``use_safetensors=True``: a
checkpoint never executes code or unpickles weights. The trainer adds its own files (the
semantic-ID codebook) next to the model files, so writing the files
(:func:`save_model_files`) and publishing the directory atomically
(:func:`store_core.workspace.staged_directory`) are separate steps;
:func:`save_checkpoint` does both.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as transformers_logging

from store_core.config import ModelConfig
from store_core.errors import StoreError
from store_core.progress import progress_enabled
from store_core.workspace import staged_directory

logger = logging.getLogger(__name__)

if not progress_enabled():  # no "Loading weights" bars in logs, CI and piped output
    transformers_logging.disable_progress_bar()

#: Special tokens of the tokenizer trained here (ids 0, 1, 2 in this order).
PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"

#: File holding the weights of a checkpoint (the only weights file we write or read).
WEIGHTS_FILE = "model.safetensors"


# --------------------------------------------------------------------------- tokenizer


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the catalogue text, in process (no download).

    Byte-level means every string is encodable (no unknown token) and ``decode`` restores
    it exactly. Special tokens: ``<pad>`` (0), ``<s>`` (1, bos), ``</s>`` (2, eos). The
    result is deterministic for the same texts in the same order.

    The tokenizer adds no bos/eos by itself (``tokenizer(text)`` returns only the text's
    tokens): callers place special tokens explicitly, which keeps the layouts identical
    for tokenizers trained here and pretrained ones (which differ in what they add).
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(iter(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )
    logger.info("trained byte-level BPE tokenizer: %d tokens", len(tokenizer))
    return tokenizer


def query_tokens(num_query_tokens: int) -> list[str]:
    """The Phase A query tokens ``["<q_1>", ..., "<q_L>"]``."""
    if num_query_tokens < 1:
        raise ValueError(f"num_query_tokens must be >= 1, got {num_query_tokens}")
    return [f"<q_{i}>" for i in range(1, num_query_tokens + 1)]


def query_token_ids(tokenizer: PreTrainedTokenizerBase, num_query_tokens: int) -> list[int]:
    """Ids of ``<q_1>..<q_L>`` in ``tokenizer``; :class:`StoreError` if any is missing."""
    ids: list[int] = []
    for token in query_tokens(num_query_tokens):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
            raise StoreError(
                f"tokenizer has no query token {token}: the checkpoint was not prepared for "
                f"{num_query_tokens} dense tokens (semantic_id.cluster_levels)"
            )
        ids.append(token_id)
    return ids


def add_query_tokens(
    tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, num_query_tokens: int
) -> list[int]:
    """Add ``<q_1>..<q_L>`` as special tokens (if missing) and grow the embeddings.

    New rows of the input embedding (and of the output embedding when it is not tied) are
    set to the mean of the existing token rows, so the new tokens start "in
    distribution". Idempotent: tokens already present keep their ids and rows. Returns
    the ids of the L query tokens (contiguous when added here).

    Call before wrapping the model in DeepSpeed (it writes ``.weight`` directly).
    """
    wanted = query_tokens(num_query_tokens)
    vocab = tokenizer.get_vocab()
    missing = [t for t in wanted if t not in vocab]
    if missing:
        tokens_before = len(tokenizer)
        tokenizer.add_tokens(missing, special_tokens=True)
        new_ids = [cast(int, tokenizer.convert_tokens_to_ids(t)) for t in missing]
        grow_embeddings(model, len(tokenizer), new_ids, reference_rows=tokens_before)
        logger.info("added %d query tokens (ids %d..%d)", len(new_ids), new_ids[0], new_ids[-1])
    return query_token_ids(tokenizer, num_query_tokens)


def grow_embeddings(
    model: PreTrainedModel, num_tokens: int, new_ids: list[int], reference_rows: int
) -> None:
    """Make room for ``num_tokens`` tokens and mean-initialise the rows ``new_ids``.

    Never shrinks: pretrained models often have more embedding rows than tokenizer
    entries (padded to a multiple), and new tokens may land in those spare rows, which
    are then re-initialised too. The mean is taken over the first ``reference_rows`` rows
    (the tokens that existed before), capped at the old matrix size.
    """
    old_rows = _embedding_weight(model.get_input_embeddings()).shape[0]
    if num_tokens > old_rows:
        model.resize_token_embeddings(num_tokens, mean_resizing=False)
    rows = max(1, min(reference_rows, old_rows))
    index = torch.tensor(new_ids, dtype=torch.long)
    with torch.no_grad():
        weight = _embedding_weight(model.get_input_embeddings())  # [V, D]
        weight[index.to(weight.device)] = weight[:rows].mean(dim=0, keepdim=True)
        output_embeddings = model.get_output_embeddings()  # after the resize replaced it
        if output_embeddings is None:
            return
        out_weight = _embedding_weight(output_embeddings)  # [V, D]
        if out_weight.data_ptr() == weight.data_ptr():  # tied: already done
            return
        out_weight[index.to(out_weight.device)] = out_weight[:rows].mean(dim=0, keepdim=True)
        out_bias = getattr(output_embeddings, "bias", None)
        if isinstance(out_bias, torch.Tensor):
            out_bias[index.to(out_bias.device)] = out_bias[:rows].mean()


def _embedding_weight(module: torch.nn.Module) -> torch.Tensor:
    """The ``[V, D]`` weight of an embedding or output projection."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"{type(module).__name__} has no 2-D weight to extend")
    return weight


# --------------------------------------------------------------------------- backbone


def _looks_local(path: str) -> bool:
    """Whether ``path`` names a directory on this machine rather than a hub model id."""
    return path.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(path))


def _load_pretrained(path: str) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load tokenizer and model from a local directory or hub name, errors as StoreError."""
    if _looks_local(path):
        path = os.path.expanduser(path)
        if not os.path.isdir(path):
            raise StoreError(f"model.name_or_path {path}: no such directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=False, use_safetensors=True, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError) as exc:
        raise StoreError(
            f"cannot load model {path} (a Hugging Face directory with safetensors weights, "
            f"or a hub name reachable from here): {exc}"
        ) from exc
    return cast(PreTrainedModel, model), cast(PreTrainedTokenizerFast, tokenizer)


def _ensure_special_tokens(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Give a pretrained tokenizer the eos/pad tokens the layouts need (pad = eos).

    Returns the ids of tokens added to the vocabulary (an eos, for the rare tokenizer
    without one).
    """
    added: list[int] = []
    if tokenizer.eos_token is None:
        tokenizer.add_special_tokens({"eos_token": EOS_TOKEN})
        added.append(cast(int, tokenizer.eos_token_id))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return added


def build_backbone(
    cfg: ModelConfig, texts: list[str], num_query_tokens: int, seed: int
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """The backbone and its tokenizer, with the L query tokens added.

    ``cfg.name_or_path`` None: train a byte-level BPE tokenizer on ``texts`` and build a
    small ``LlamaForCausalLM`` from ``cfg`` (seeded, untied input/output embeddings, no
    dropout). Otherwise load tokenizer and model from the path or hub name (no remote
    code, safetensors only, float32); a local-looking path that does not exist raises
    :class:`StoreError` without contacting the hub.
    """
    if cfg.name_or_path is None:
        tokenizer = train_bpe_tokenizer(texts, cfg.vocab_size)
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_heads,
            max_position_embeddings=max(512, 2 * cfg.max_text_tokens + 64),
            tie_word_embeddings=False,
            attention_dropout=0.0,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model: PreTrainedModel = LlamaForCausalLM(config)
    else:
        model, tokenizer = _load_pretrained(cfg.name_or_path)
        torch.manual_seed(seed)
    tokens_before = len(tokenizer)
    added = _ensure_special_tokens(tokenizer)
    if added:
        grow_embeddings(model, len(tokenizer), added, reference_rows=tokens_before)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    add_query_tokens(tokenizer, model, num_query_tokens)
    logger.info(
        "backbone %s: %d parameters, %d tokens",
        cfg.name_or_path or "built from config",
        count_parameters(model),
        len(tokenizer),
    )
    return model, tokenizer


def default_device() -> torch.device:
    """Where training and decoding run when nothing says otherwise: the GPU if there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_device(model: Any) -> torch.device:
    """Where a model (or a DeepSpeed engine wrapping one) keeps its parameters."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    if isinstance(device, str | int):
        return torch.device(device)
    return next(iter(model.parameters())).device


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights once; full size under ZeRO-3)."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += int(getattr(param, "ds_numel", param.numel()))
    return total


# --------------------------------------------------------------------------- checkpoints


def _unwrap(model: Any) -> PreTrainedModel:
    """The Hugging Face model inside a DeepSpeed engine / DDP wrapper (or itself)."""
    return cast(PreTrainedModel, getattr(model, "module", model))


def save_model_files(
    model: PreTrainedModel | torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    directory: str | os.PathLike[str],
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write config, ``model.safetensors`` and tokenizer files into ``directory``.

    The directory is created if needed; other files in it are left alone (the caller
    adds the codebook). Not atomic: write into a staged directory
    (:func:`store_core.workspace.staged_directory`). A DeepSpeed
    engine is unwrapped; under ZeRO-3 its parameters are partitioned, so pass the
    gathered weights as ``state_dict`` (e.g. the engine's
    ``_zero3_consolidated_16bit_state_dict()``, with
    ``stage3_gather_16bit_weights_on_model_save``).
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    hf_model = _unwrap(model)
    hf_model.save_pretrained(str(path), state_dict=state_dict)
    tokenizer.save_pretrained(str(path))
    if not (path / WEIGHTS_FILE).exists():
        raise StoreError(f"saving the model into {path} did not produce {WEIGHTS_FILE}")


def save_checkpoint(
    model: PreTrainedModel | torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    directory: str | os.PathLike[str],
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Atomically (re)write ``directory`` with the model and tokenizer: readers see the
    old complete checkpoint or the new one (:func:`store_core.workspace.staged_directory`;
    a kill's leftovers are repaired by :func:`store_core.workspace.recover_directory`)."""
    with staged_directory(str(directory)) as staging:
        save_model_files(model, tokenizer, staging, state_dict=state_dict)
    logger.info("saved checkpoint to %s", directory)


def load_checkpoint(
    directory: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load a checkpoint written by :func:`save_checkpoint` (no remote code, no pickle)."""
    path = Path(directory).expanduser()
    if not (path / WEIGHTS_FILE).is_file():
        raise StoreError(f"checkpoint {path}: no {WEIGHTS_FILE} (not a trained model directory)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            str(path), trust_remote_code=False, use_safetensors=True, dtype=dtype
        )
    except (OSError, ValueError, KeyError) as exc:
        raise StoreError(f"checkpoint {path}: cannot load: {exc}") from exc
    return cast(PreTrainedModel, model), cast(PreTrainedTokenizerFast, tokenizer)
