"""The shared trainer: plain torch, DeepSpeed ZeRO-2 and ZeRO-3 on CPU, resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from store_core.config import DeepSpeedSettings, TrainConfig
from store_core.trainer import DataPlan, EarlyStopping, latest_step, lr_lambda, train

VOCAB = 64


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def dataset(n: int = 48) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    # Learnable structure: each sequence counts up from a random start.
    starts = torch.randint(0, VOCAB - 12, (n,), generator=g).tolist()
    return [list(range(s, s + 12)) for s in starts]


def collate(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    ids = torch.tensor(rows)
    return {"input_ids": ids, "labels": ids.clone()}


def lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    out = model(input_ids=batch["input_ids"], labels=batch["labels"])
    return out.loss, {"tokens": float(batch["input_ids"].numel())}


def config(stage: int | None, **kw: Any) -> TrainConfig:
    ds = DeepSpeedSettings(enabled=stage is not None, stage=stage or 2)
    base: dict[str, Any] = dict(
        max_steps=12, batch_size=8, lr=5e-3, warmup_steps=2, log_every=2, checkpoint_every=100
    )
    base.update(kw)
    return TrainConfig(deepspeed=ds, **base)


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().float() for k, v in model.named_parameters()}


@pytest.mark.parametrize("stage", [None, 2, 3], ids=["plain", "zero2", "zero3"])
def test_training_lowers_loss_and_changes_every_parameter(
    stage: int | None, tmp_path: Path
) -> None:
    model = tiny_model()
    before = params(model)
    result = train(model, dataset(), collate, lm_loss, config(stage), str(tmp_path / "ckpt"))
    assert result.steps == 12
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0] - 0.3, losses
    after = params(result.model)
    assert after.keys() == before.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == []
    assert result.tokens_per_s > 0
    assert latest_step(str(tmp_path / "ckpt")) == 12


class Crash(RuntimeError):
    pass


def test_data_plan_is_deterministic_and_disjoint_across_ranks() -> None:
    plans = [DataPlan(50, 4, seed=3, rank=r, world=2) for r in range(2)]
    assert plans[0].per_rank == 25 and plans[0].batches_per_epoch == 7
    epoch0 = [{i for m in range(7) for i in p.batch(m)} for p in plans]
    assert not epoch0[0] & epoch0[1]
    assert len(epoch0[0] | epoch0[1]) == 50
    assert plans[0].batch(7) != plans[0].batch(0)  # a new permutation each epoch
    assert DataPlan(50, 4, 3, 0, 2).batch(9) == plans[0].batch(9)


def test_lr_schedule_warms_up_then_decays() -> None:
    f = lr_lambda(warmup=4, total=20)
    assert [round(f(s), 2) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(19) < 0.2 and f(19) >= 0.1


@pytest.mark.parametrize("stage", [None, 3], ids=["plain", "zero3"])
def test_early_stopping_returns_best_epoch_weights(stage: int | None, tmp_path: Path) -> None:
    scores = iter([0.1, 0.5, 0.3, 0.2, 0.9])  # best at epoch 2, patience 2 -> stop at 4
    snapshots: list[dict[str, torch.Tensor]] = []

    def validate(module: torch.nn.Module) -> dict[str, float]:
        snapshots.append(params(module) if stage is None else {})
        return {"ndcg_at_10": next(scores)}

    cfg = config(stage, max_steps=None, epochs=10, batch_size=16)  # 3 micro-batches/epoch
    result = train(
        tiny_model(),
        dataset(),
        collate,
        lm_loss,
        cfg,
        str(tmp_path / "ckpt"),
        early_stopping=EarlyStopping(validate, "ndcg_at_10", patience=2),
    )
    assert result.stopped_early
    assert (result.best_validation_round, result.best_epoch, result.best_metric) == (2, 2.0, 0.5)
    assert [v["validation_round"] for v in result.validation] == [1, 2, 3, 4]
    assert [v["epoch"] for v in result.validation] == [1.0, 2.0, 3.0, 4.0]
    assert [v["step"] for v in result.validation] == [3.0, 6.0, 9.0, 12.0]
    assert result.steps == 12
    if stage is None:
        best = snapshots[1]
        final = params(result.model)
        for key in best:
            torch.testing.assert_close(final[key], best[key])


def test_eval_every_records_rounds_and_fractional_epochs(tmp_path: Path) -> None:
    """With ``eval_every`` a validation is a round, not an epoch: each record says its
    round (1, 2, ...), the epochs of data trained on (fractional) and the step."""
    scores = iter([0.1, 0.5, 0.3, 0.2, 0.1, 0.0])  # best at round 2, patience 3 -> stop at 5
    cfg = config(None, max_steps=None, epochs=10, batch_size=16, eval_every=2)  # 3 steps/epoch
    result = train(
        tiny_model(),
        dataset(),
        collate,
        lm_loss,
        cfg,
        str(tmp_path / "ckpt"),
        early_stopping=EarlyStopping(lambda m: {"ndcg_at_10": next(scores)}, "ndcg_at_10", 3),
    )
    assert [v["validation_round"] for v in result.validation] == [1, 2, 3, 4, 5]
    assert [v["step"] for v in result.validation] == [2.0, 4.0, 6.0, 8.0, 10.0]
    assert [v["epoch"] for v in result.validation] == [0.6667, 1.3333, 2.0, 2.6667, 3.3333]
    assert (result.best_validation_round, result.best_epoch) == (2, 1.3333)


def test_old_validation_records_read_their_epoch_as_the_round() -> None:
    """``metrics.json`` / trainer states written before ``validation_round`` existed called
    the round ``epoch``; readers take it as the round."""
    from store_core.trainer import validation_round_of

    assert validation_round_of({"epoch": 3.0, "step": 12.0, "ndcg_at_10": 0.1}) == 3
    assert validation_round_of({"validation_round": 2, "epoch": 0.5, "step": 4.0}) == 2


def test_a_trainer_state_of_an_older_release_loads(tmp_path: Path) -> None:
    """``trainer_state.json`` written with ``best_epoch``/``bad_epochs`` (the round and the
    rounds since it) resumes with them as ``best_round``/``bad_rounds``."""
    import json

    from store_core.training_checkpoints import FORMAT, TrainerState

    old = {"format": FORMAT, "step": 6, "best_metric": 0.5, "best_epoch": 2, "bad_epochs": 1}
    state = TrainerState.from_json(json.dumps(old), tmp_path / "trainer_state.json")
    assert (state.step, state.best_round, state.bad_rounds) == (6, 2, 1)


def test_resume_keeps_the_early_stopping_state(tmp_path: Path) -> None:
    scores = iter([0.1, 0.5, 0.3, 0.2])  # best at epoch 2, patience 2 -> stop at epoch 4
    snapshots: list[dict[str, torch.Tensor]] = []

    def validate(module: torch.nn.Module) -> dict[str, float]:
        snapshots.append(params(module))
        return {"ndcg_at_10": next(scores)}

    cfg = config(None, max_steps=None, epochs=10, batch_size=16, checkpoint_every=100)
    stopping = EarlyStopping(validate, "ndcg_at_10", patience=2)
    calls = {"n": 0}

    def crash_in_epoch_3(model: Any, batch: dict[str, torch.Tensor]) -> Any:
        calls["n"] += 1
        if calls["n"] == 8:  # 3 micro-batches per epoch: the 2nd batch of epoch 3
            raise Crash
        return lm_loss(model, batch)

    directory = str(tmp_path / "ckpt")
    with pytest.raises(Crash):
        train(
            tiny_model(),
            dataset(),
            collate,
            crash_in_epoch_3,
            cfg,
            directory,
            early_stopping=stopping,
        )
    assert latest_step(directory) == 6  # the checkpoint written with the epoch-2 validation
    resumed = train(
        tiny_model(seed=5), dataset(), collate, lm_loss, cfg, directory, early_stopping=stopping
    )
    assert resumed.resumed_from == 6
    assert resumed.stopped_early and resumed.steps == 12
    assert (resumed.best_validation_round, resumed.best_epoch, resumed.best_metric) == (2, 2.0, 0.5)
    assert [v["validation_round"] for v in resumed.validation] == [1, 2, 3, 4]
    assert [v["epoch"] for v in resumed.validation] == [1.0, 2.0, 3.0, 4.0]
    final = params(resumed.model)
    for key, value in snapshots[1].items():  # the weights validated at epoch 2, before the crash
        torch.testing.assert_close(final[key], value, msg=key)
