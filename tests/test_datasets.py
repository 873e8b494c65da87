"""Tests for store_core.datasets: GroupLens first, RecBole wheel fallback, verified cache."""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import urllib.request
import zipfile
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from store_core import datasets
from store_core.datasets import (
    MOVIELENS_SHA256,
    MOVIELENS_TERMS,
    RECBOLE_SHA256,
    AcquiredDataset,
    acquire_movielens_100k,
)
from store_core.errors import DataError
from store_core.workspace import sha256_of

SHARED_ML100K = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "ml-100k"
GROUPLENS_FILES = ("u.data", "u.item", "u.genre", "u.info", "README")


@pytest.fixture
def shared_ml100k() -> Path:
    if not (SHARED_ML100K / "u.data").is_file():
        pytest.skip(f"shared MovieLens 100K copy not found at {SHARED_ML100K}")
    return SHARED_ML100K


def _make_grouplens_zip(src: Path, dest: Path, *, corrupt_u_data: bool = False) -> Path:
    """A zip laid out like the official ml-100k.zip, built from the shared files."""
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in GROUPLENS_FILES:
            data = (src / name).read_bytes()
            if name == "u.data" and corrupt_u_data:
                data = data.replace(b"\t3\t", b"\t4\t", 1)
            zf.writestr(f"ml-100k/{name}", data)
        zf.writestr("ml-100k/u.user", (src / "u.user").read_bytes())
    return dest


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory served by http.server on 127.0.0.1 (free port): (directory, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _no_pip(dest_dir: Path, timeout: float) -> Path:
    raise AssertionError("the RecBole fallback must not be used here")


def _failing_pip(dest_dir: Path, timeout: float) -> Path:
    raise DataError("pip download exited with 1: simulated: no network")


def _no_urlopen(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("network access on cache reuse")


def _cache_entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def _fake_recbole_wheel(src: Path, dest_dir: Path) -> Path:
    """A wheel-shaped zip holding RecBole-style atomic files derived from the shared copy."""
    inter = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + (
        src / "u.data"
    ).read_text(encoding="ascii")
    items = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    for line in (src / "u.item").read_text(encoding="latin-1").splitlines():
        fields = line.split("|")
        items.append(f"{fields[0]}\t{fields[1]}\t{fields[2][-4:]}\tDrama")
    wheel = dest_dir / "recbole-1.2.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("recbole/__init__.py", "")
        zf.writestr("recbole/dataset_example/ml-100k/ml-100k.inter", inter)
        zf.writestr("recbole/dataset_example/ml-100k/ml-100k.item", "\n".join(items) + "\n")
    return wheel


def _assert_movielens(result: AcquiredDataset, cache: Path, source: str) -> None:
    assert result.format == "movielens"
    assert result.name is None
    assert result.source == source
    assert Path(result.path) == cache / "ml-100k"
    assert result.checksums == dict(MOVIELENS_SHA256)
    for name in GROUPLENS_FILES:
        assert (Path(result.path) / name).is_file(), name
    assert not (Path(result.path) / "u.user").exists()  # only the files we use
    for name, digest in MOVIELENS_SHA256.items():
        assert sha256_of(str(Path(result.path) / name)) == digest
    assert (Path(result.path) / "source.json").is_file()
    assert _cache_entries(cache) == ["ml-100k"]  # no staging leftovers


def test_constants_match_shared_copy(shared_ml100k: Path) -> None:
    for name, digest in MOVIELENS_SHA256.items():
        assert sha256_of(str(shared_ml100k / name)) == digest
    assert "Harper" in MOVIELENS_TERMS and "redistribute" in MOVIELENS_TERMS


def test_grouplens_over_http(
    shared_ml100k: Path, http_dir: tuple[Path, str], tmp_path: Path
) -> None:
    root, base = http_dir
    _make_grouplens_zip(shared_ml100k, root / "ml-100k.zip")
    url = f"{base}/ml-100k.zip"
    cache = tmp_path / "cache"

    result = acquire_movielens_100k(cache, timeout=5, grouplens_url=url, pip_download=_no_pip)

    _assert_movielens(result, cache, url)


def test_grouplens_checksum_mismatch_falls_back_to_recbole(
    shared_ml100k: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad_zip = _make_grouplens_zip(shared_ml100k, tmp_path / "bad.zip", corrupt_u_data=True)
    wheel_dir = tmp_path / "wheel"
    wheel_dir.mkdir()
    fake_wheel = _fake_recbole_wheel(shared_ml100k, wheel_dir)
    # The fake wheel is not the real one, so point the expected checksums at it.
    with zipfile.ZipFile(fake_wheel) as zf:
        fake_sums = {
            name: hashlib.sha256(zf.read(member)).hexdigest()
            for name, member in datasets.RECBOLE_MEMBERS.items()
        }
    monkeypatch.setattr(datasets, "RECBOLE_WHEEL_SHA256", sha256_of(str(fake_wheel)))
    monkeypatch.setattr(datasets, "RECBOLE_SHA256", fake_sums)
    calls: list[Path] = []

    def fake_pip(dest_dir: Path, timeout: float) -> Path:
        calls.append(dest_dir)
        target = dest_dir / fake_wheel.name
        target.write_bytes(fake_wheel.read_bytes())
        return target

    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="store_core.datasets"):
        result = acquire_movielens_100k(
            cache, grouplens_url=bad_zip.as_uri(), pip_download=fake_pip, timeout=5
        )

    assert "checksum mismatch for u.data" in caplog.text

    assert len(calls) == 1
    assert result.format == "recbole"
    assert result.name == "ml-100k"
    assert result.checksums == fake_sums
    assert Path(result.path) == cache / "ml-100k"
    assert sorted(p.name for p in Path(result.path).iterdir()) == [
        "ml-100k.inter",
        "ml-100k.item",
        "source.json",
    ]
    assert not (Path(result.path) / "u.data").exists()  # nothing of the bad archive kept
    assert _cache_entries(cache) == ["ml-100k"]

    # The recbole copy is reused from the cache, without touching any source.
    monkeypatch.setattr(urllib.request, "urlopen", _no_urlopen)
    again = acquire_movielens_100k(cache, grouplens_url=bad_zip.as_uri(), pip_download=_no_pip)
    assert again == result


def test_bad_wheel_checksum_is_a_failure(shared_ml100k: Path, tmp_path: Path) -> None:
    wheel_dir = tmp_path / "wheel"
    wheel_dir.mkdir()
    fake_wheel = _fake_recbole_wheel(shared_ml100k, wheel_dir)

    def fake_pip(dest_dir: Path, timeout: float) -> Path:
        return Path(fake_wheel)

    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"checksum mismatch for recbole-1\.2\.1-py3-none-any\.whl"):
        acquire_movielens_100k(
            cache, grouplens_url=(tmp_path / "missing.zip").as_uri(), pip_download=fake_pip
        )
    assert _cache_entries(cache) == []


def test_cache_reuse_does_no_network(
    shared_ml100k: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good_zip = _make_grouplens_zip(shared_ml100k, tmp_path / "ml-100k.zip")
    cache = tmp_path / "cache"
    first = acquire_movielens_100k(cache, grouplens_url=good_zip.as_uri(), pip_download=_no_pip)
    marker_before = (cache / "ml-100k" / "source.json").read_bytes()

    monkeypatch.setattr(urllib.request, "urlopen", _no_urlopen)
    second = acquire_movielens_100k(
        str(cache), grouplens_url="http://127.0.0.1:9/never", pip_download=_no_pip
    )

    assert second == first
    assert (cache / "ml-100k" / "source.json").read_bytes() == marker_before


def test_corrupt_cache_is_reacquired(shared_ml100k: Path, tmp_path: Path) -> None:
    good_zip = _make_grouplens_zip(shared_ml100k, tmp_path / "ml-100k.zip")
    cache = tmp_path / "cache"
    acquire_movielens_100k(cache, grouplens_url=good_zip.as_uri(), pip_download=_no_pip)
    u_data = cache / "ml-100k" / "u.data"
    u_data.write_bytes(u_data.read_bytes()[:-10])  # truncated

    result = acquire_movielens_100k(cache, grouplens_url=good_zip.as_uri(), pip_download=_no_pip)

    _assert_movielens(result, cache, good_zip.as_uri())


def test_cache_with_broken_marker_is_reacquired(shared_ml100k: Path, tmp_path: Path) -> None:
    good_zip = _make_grouplens_zip(shared_ml100k, tmp_path / "ml-100k.zip")
    cache = tmp_path / "cache"
    acquire_movielens_100k(cache, grouplens_url=good_zip.as_uri(), pip_download=_no_pip)
    (cache / "ml-100k" / "source.json").write_text("{not json", encoding="utf-8")

    result = acquire_movielens_100k(cache, grouplens_url=good_zip.as_uri(), pip_download=_no_pip)

    _assert_movielens(result, cache, good_zip.as_uri())


def test_all_sources_fail(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    url = "http://127.0.0.1:9/ml-100k.zip"  # discard port: connection refused

    with pytest.raises(DataError) as info:
        acquire_movielens_100k(cache, timeout=2, grouplens_url=url, pip_download=_failing_pip)

    message = str(info.value)
    assert url in message
    assert "pip download recbole==1.2.1" in message
    assert "simulated: no network" in message
    assert "data.format: movielens" in message
    assert "data.path" in message
    assert "u.data" in message
    assert _cache_entries(cache) == []  # nothing half-written


def test_truncated_archive_and_failing_fallback_leave_nothing(
    shared_ml100k: Path, http_dir: tuple[Path, str], tmp_path: Path
) -> None:
    root, base = http_dir
    whole = _make_grouplens_zip(shared_ml100k, tmp_path / "whole.zip").read_bytes()
    (root / "ml-100k.zip").write_bytes(whole[: len(whole) // 2])
    cache = tmp_path / "cache"

    with pytest.raises(DataError, match="BadZipFile"):
        acquire_movielens_100k(
            cache, timeout=5, grouplens_url=f"{base}/ml-100k.zip", pip_download=_failing_pip
        )
    assert _cache_entries(cache) == []


@pytest.mark.network
def test_real_recbole_fallback_via_pip(tmp_path: Path) -> None:
    # Probe first so a machine without access to PyPI skips instead of failing.
    probe = tmp_path / "probe"
    probe.mkdir()
    try:
        datasets.pip_download_recbole(probe, socket_timeout=15, timeout=120)
    except DataError as exc:
        pytest.skip(f"pip download of recbole not possible here: {exc}")

    cache = tmp_path / "cache"
    result = acquire_movielens_100k(
        cache, timeout=2, grouplens_url=(tmp_path / "no-such.zip").as_uri()
    )

    assert result.format == "recbole"
    assert result.name == "ml-100k"
    assert result.checksums == dict(RECBOLE_SHA256)
    for name, digest in RECBOLE_SHA256.items():
        assert sha256_of(str(Path(result.path) / name)) == digest
    inter_header = (Path(result.path) / "ml-100k.inter").open(encoding="utf-8").readline()
    assert inter_header.rstrip("\n").split("\t") == [
        "user_id:token",
        "item_id:token",
        "rating:float",
        "timestamp:float",
    ]
    assert _cache_entries(cache) == ["ml-100k"]
