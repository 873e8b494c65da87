"""Training safety (issue 14): resume never unpickles a workspace file, resume continues
bit for bit, the checkpoint pointer cannot wedge training, and training (and ``store
serve``) listen on loopback only."""

from __future__ import annotations

import contextlib
import json
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from store_core import training_checkpoints as ckpt
from store_core.errors import StoreError
from store_core.service_supervisor import clean_environ, free_port
from store_core.trainer import latest_step, train
from tests.conftest import REPO
from tests.test_trainer import Crash, collate, config, dataset, lm_loss, params

BIN = Path(sys.executable).parent


class Payload:
    """Unpickling it creates ``marker``: what a planted checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path(self.marker).touch, ())


def dropout_model(seed: int = 0) -> LlamaForCausalLM:
    """The trainer tests' tiny Llama with attention dropout, so resume needs the RNG."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attention_dropout=0.2,
    )
    return LlamaForCausalLM(cfg)


def trained_checkpoints(directory: Path, stage: int | None) -> None:
    """Train 4 steps with checkpoints at steps 2 and 4."""
    cfg = config(stage, max_steps=4, checkpoint_every=2)
    train(dropout_model(), dataset(), collate, lm_loss, cfg, str(directory))
    assert ckpt.complete_steps(str(directory)) == [2, 4]


def rewrite_manifest(path: Path) -> None:
    """Make ``complete.json`` match the files again (an attacker who can write one file
    can write this one too)."""
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    manifest["files"] = {name: (path / name).stat().st_size for name in manifest["files"]}
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))


def plant(path: Path, marker: Path, form: str) -> list[Path]:
    """Replace every ``.pt`` file of the checkpoint ``path`` with a payload."""
    planted = sorted(path.glob("*.pt"))
    for target in planted:
        if form == "torch":
            torch.save({"module": Payload(marker), "step": 4}, target)
        else:
            target.write_bytes(pickle.dumps({"module": Payload(marker)}, protocol=2))
    return planted


@pytest.mark.parametrize("form", ["torch", "raw-pickle"])
@pytest.mark.parametrize("stage", [None, 2, 3], ids=["plain", "zero2", "zero3"])
def test_planted_pickle_is_refused_not_run(stage: int | None, form: str, tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    trained_checkpoints(directory, stage)
    marker = tmp_path / "payload-ran"
    planted = plant(directory / "step-4", marker, form)
    rewrite_manifest(directory / "step-4")
    cfg = config(stage, max_steps=6, checkpoint_every=2)
    with pytest.raises(StoreError) as raised:
        train(dropout_model(), dataset(), collate, lm_loss, cfg, str(directory))
    message = str(raised.value)
    assert not marker.exists()
    assert "\n" not in message and "refusing to resume" in message
    assert str(directory / "step-4") in message
    # The files were live: loaded the way DeepSpeed loads them, the payload runs (a raw
    # pickle runs it while torch reads what it takes for the header, then fails).
    with contextlib.suppress(RuntimeError):
        torch.load(planted[0], weights_only=False)
    assert marker.exists()


def test_planted_file_without_a_matching_manifest_is_never_opened(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    trained_checkpoints(directory, 2)
    marker = tmp_path / "payload-ran"
    plant(directory / "step-4", marker, "torch")  # sizes no longer match complete.json
    cfg = config(2, max_steps=6, checkpoint_every=2)
    result = train(dropout_model(), dataset(), collate, lm_loss, cfg, str(directory))
    assert not marker.exists()
    assert result.resumed_from == 2  # the newest complete checkpoint
    assert ckpt.complete_steps(str(directory)) == [4, 6]  # step-4 rewritten


def test_a_malformed_trainer_state_is_one_clear_error(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    trained_checkpoints(directory, None)
    (directory / "step-4" / ckpt.STATE).write_text('{"format": 1, "step": "__import__"}')
    rewrite_manifest(directory / "step-4")
    with pytest.raises(StoreError, match="not a trainer state") as raised:
        train(
            dropout_model(), dataset(), collate, lm_loss, config(None, max_steps=6), str(directory)
        )
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("stage", [None, 2, 3], ids=["plain", "zero2", "zero3"])
def test_resume_continues_bit_for_bit(stage: int | None, tmp_path: Path) -> None:
    cfg = config(stage, max_steps=6, checkpoint_every=3)
    straight = train(dropout_model(), dataset(), collate, lm_loss, cfg, str(tmp_path / "a"))

    calls = {"n": 0}

    def crashing_loss(model: Any, batch: dict[str, torch.Tensor]) -> Any:
        calls["n"] += 1
        if calls["n"] == 5:  # after the step-3 checkpoint
            raise Crash
        return lm_loss(model, batch)

    with pytest.raises(Crash):
        train(dropout_model(), dataset(), collate, crashing_loss, cfg, str(tmp_path / "b"))
    assert latest_step(str(tmp_path / "b")) == 3
    torch.manual_seed(1234)  # whatever the RNG holds now, resume restores the saved one
    resumed = train(dropout_model(seed=5), dataset(), collate, lm_loss, cfg, str(tmp_path / "b"))
    assert resumed.resumed_from == 3
    a, b = params(straight.model), params(resumed.model)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    assert resumed.final_loss == straight.final_loss


def checkpoint_dir_after_a_run(tmp_path: Path) -> Path:
    directory = tmp_path / "ckpt"
    train(
        dropout_model(),
        dataset(),
        collate,
        lm_loss,
        config(None, max_steps=4, checkpoint_every=2),
        str(directory),
    )
    return directory


@pytest.mark.parametrize(
    "pointer",
    ["", "\n", "step-", "step-x", "step-99", "../../etc", "step-4\x00", b"\xff\xfe"],
    ids=["empty", "newline", "no-number", "not-a-number", "missing", "escape", "nul", "binary"],
)
def test_a_damaged_pointer_falls_back_to_the_newest_complete_checkpoint(
    pointer: str | bytes, tmp_path: Path
) -> None:
    directory = checkpoint_dir_after_a_run(tmp_path)
    target = directory / ckpt.LATEST
    target.write_bytes(pointer if isinstance(pointer, bytes) else pointer.encode())
    assert latest_step(str(directory)) == 4
    result = train(
        dropout_model(), dataset(), collate, lm_loss, config(None, max_steps=6), str(directory)
    )
    assert result.resumed_from == 4
    assert target.read_text() == "step-6\n"


def test_pointer_to_an_incomplete_directory_falls_back(tmp_path: Path) -> None:
    directory = checkpoint_dir_after_a_run(tmp_path)
    (directory / "step-4" / ckpt.MANIFEST).unlink()  # as a checkpoint of an older layout
    (directory / "step-9").mkdir()
    (directory / ckpt.LATEST).write_text("step-9")
    assert latest_step(str(directory)) == 2
    (directory / "step-2" / "state.pt").write_bytes(b"")  # truncated
    assert latest_step(str(directory)) is None
    result = train(
        dropout_model(), dataset(), collate, lm_loss, config(None, max_steps=4), str(directory)
    )
    assert result.resumed_from is None  # a fresh start, nothing loaded
    # The damaged and foreign directories were replaced or pruned, nothing else is left.
    assert ckpt.complete_steps(str(directory)) == [4]
    assert sorted(p.name for p in directory.iterdir()) == ["latest", "step-4"]


def test_leftovers_of_a_killed_run_are_removed_at_start(tmp_path: Path) -> None:
    directory = checkpoint_dir_after_a_run(tmp_path)
    leftovers = [
        directory / ".partial-step-6" / "state.pt",
        directory / ".replaced-step-4-0123abcd" / "state.pt",
        directory / ".latest.tmp-0123abcd",
        directory / ckpt.BEST_DIR / ".step-6.safetensors.tmp-0123abcd",
        directory / ckpt.BEST_DIR / "step-6.safetensors",  # no checkpoint refers to it
    ]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    before = {p for p in directory.rglob("*") if p.is_file()} - set(leftovers)
    removed = ckpt.clean_leftovers(str(directory))
    assert len(removed) == len(leftovers)
    after = {p for p in directory.rglob("*") if p.is_file()}
    assert after == before
    assert not (directory / ".partial-step-6").exists()


# --------------------------------------------------------------------------------------
# what listens
# --------------------------------------------------------------------------------------
def listening(root: psutil.Process) -> set[tuple[str, int, str]]:
    """(address, port, process name) of every listening socket of ``root``'s tree."""
    found = set()
    try:
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for proc in tree:
        try:
            for conn in proc.net_connections("inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((conn.laddr.ip, conn.laddr.port, proc.name()))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def other_addresses() -> list[str]:
    """This machine's addresses that are not loopback (where an outsider connects)."""
    import ipaddress

    return [
        a.address
        for addresses in psutil.net_if_addrs().values()
        for a in addresses
        if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback
    ]


def assert_loopback_only(seen: set[tuple[str, int, str]]) -> None:
    assert seen, "nothing listened: the check saw no socket"
    assert {ip for ip, _, _ in seen} <= {"127.0.0.1", "::1"}, seen
    for address in other_addresses():
        for _, port, _ in seen:
            with pytest.raises(OSError), socket.create_connection((address, port), timeout=2):
                pass


def environ(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in clean_environ().items() if not k.endswith("SOCKET_IFNAME")}
    env.pop("PREFECT_API_URL", None)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PREFECT_HOME=str(tmp_path / "ph"))
    return env


@pytest.mark.service
def test_store_train_listens_on_loopback_only(tmp_path: Path) -> None:
    from store_core.config import load_config
    from store_core.ingest import run_ingest

    ws = tmp_path / "ws"
    args = ["--config", "tiny", "--set", f"workspace={ws}", "--set", "tracking.enabled=false"]
    run_ingest(load_config("tiny", [f"workspace={ws}", "tracking.enabled=false"]))
    proc = subprocess.Popen(
        [str(BIN / "store"), "train", "--phase", "tokenizer", *args],
        env=environ(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: set[tuple[str, int, str]] = set()
    checked = False
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        now = listening(root)
        if now and not checked:  # while the rendezvous is up: try to reach it from outside
            assert_loopback_only(now)
            checked = True
        seen |= now
        time.sleep(0.1)
    assert proc.returncode == 0, proc.stderr.read()[-3000:] if proc.stderr else ""
    assert checked
    assert_loopback_only(seen)
    print(f"\nlistening during store train: {sorted(seen)}")


@pytest.mark.slow
def test_store_serve_listens_on_loopback_only(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    args = ["--config", "tiny", "--set", f"workspace={ws}"]
    env = environ(tmp_path)
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1")
    prefect_port, mlflow_port = free_port(), free_port()
    ports = ["--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [str(BIN / "store"), "serve", *args, "--mlflow", *ports, "--no-schedule"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 300
        while not (ws / "serve" / "serve.json").exists():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "store serve not ready in 300 s"
            time.sleep(1)
        seen: set[tuple[str, int, str]] = set()
        for _ in range(20):  # the deployments' runner may open its socket a little later
            seen |= listening(psutil.Process(proc.pid))
            time.sleep(0.5)
        assert {prefect_port, mlflow_port} <= {port for _, port, _ in seen}
        assert_loopback_only(seen)
        print(f"\nlistening during store serve: {sorted(seen)}")
    finally:
        subprocess.run(
            [str(BIN / "store"), "serve", "--stop", *args], env=env, cwd=REPO, timeout=120
        )
        proc.wait(timeout=60)
        log.close()


def test_checkpoint_without_manifest_is_removed_with_a_message_that_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``step-N`` directory without ``complete.json`` (cut short, or written before the
    manifest existed) is not resumed and is removed at start, and the warning says which
    of the two it can be, not only "interrupted run"."""
    directory = checkpoint_dir_after_a_run(tmp_path)
    old = directory / "step-1"
    old.mkdir()
    (old / "mp_rank_00_model_states.pt").write_bytes(b"pickle")  # an old DeepSpeed layout
    with caplog.at_level("WARNING", logger="store_core.training_checkpoints"):
        removed = ckpt.clean_leftovers(str(directory))
    assert removed == [str(old)]
    (message,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("removed")]
    assert message.startswith(f"removed {old}: no valid {ckpt.MANIFEST} (a checkpoint cut short")
    assert "cannot be resumed safely" in message
