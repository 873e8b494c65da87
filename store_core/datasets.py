"""Automatic, checksum-verified acquisition of the default dataset, MovieLens 100K.

Why this exists: the product's promise is that a fresh install runs end to end on its
default dataset with no manual download step (``data.dataset: movielens-100k``). So the
pipeline fetches MovieLens 100K itself, in this order:

1. **The cache.** A copy acquired earlier (``<cache_dir>/ml-100k`` plus a ``source.json``
   marker) is reused with no network access, after re-verifying its sha256 checksums. A
   cache that fails verification is deleted and acquired again.
2. **GroupLens**, the official archive (``ml-100k.zip``), fetched with ``urllib`` and a
   short timeout. Only ``u.data``, ``u.item``, ``u.genre``, ``u.info`` and ``README`` are
   extracted; the first three are checked against hard-coded sha256 constants.
3. **The RecBole wheel on PyPI.** GroupLens is sometimes slow or unreachable (and some
   machines may reach only package registries), while ``recbole==1.2.1`` ships the same
   data as RecBole atomic files. The wheel is fetched with ``pip download`` (so pip's own
   index/proxy configuration applies), its sha256 is checked, and ``ml-100k.inter`` /
   ``ml-100k.item`` are extracted and checked too. The result has format ``recbole``.

Every write is atomic: downloads and extraction happen in a staging directory inside
``cache_dir`` that is renamed into place only once verified, so an interrupted or failed
run never leaves a half-written cache. If every source fails, :class:`DataError` says what
was tried, why each failed, and how to supply the files by hand.

The sources (``grouplens_url``, ``pip_download``) are injectable so tests can simulate both
paths without the network.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from store_core.errors import DataError
from store_core.workspace import sha256_of

logger = logging.getLogger(__name__)

#: Official GroupLens archive of MovieLens 100K.
GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"

#: Landing page users are pointed to when they must download the data by hand.
GROUPLENS_PAGE = "https://grouplens.org/datasets/movielens/100k/"

#: Directory name inside the GroupLens archive.
GROUPLENS_ARCHIVE_DIR = "ml-100k"

#: sha256 of the GroupLens files we use. Computed from /work/shared/datasets/ml-100k/ on the
#: development machine, whose files are byte-identical to those in the official
#: ``ml-100k.zip`` from files.grouplens.org.
MOVIELENS_SHA256: Mapping[str, str] = {
    "u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
    "u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
    "u.genre": "9757e0d3e6b298159a80dd48eaf938114690e911e39af97a76949ef1663610bb",
}

#: Further GroupLens files copied into the cache when present (documentation; not verified).
MOVIELENS_EXTRA_FILES: tuple[str, ...] = ("u.info", "README")

#: The PyPI requirement whose wheel carries a copy of ml-100k as RecBole atomic files.
RECBOLE_REQUIREMENT = "recbole==1.2.1"

#: sha256 of ``recbole-1.2.1-py3-none-any.whl`` (2,130,151 bytes) as served by PyPI;
#: computed by running the ``pip download`` below on the development machine.
RECBOLE_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"

#: RecBole file prefix (``<name>.inter``, ``<name>.item``).
RECBOLE_NAME = "ml-100k"

#: Cached file name -> member path inside the RecBole wheel.
RECBOLE_MEMBERS: Mapping[str, str] = {
    "ml-100k.inter": "recbole/dataset_example/ml-100k/ml-100k.inter",
    "ml-100k.item": "recbole/dataset_example/ml-100k/ml-100k.item",
}

#: sha256 of the files extracted from the RecBole 1.2.1 wheel (computed from the real wheel).
#: Headers: ``user_id:token	item_id:token	rating:float	timestamp:float`` (.inter) and
#: ``item_id:token	movie_title:token_seq	release_year:token	class:token_seq`` (.item).
RECBOLE_SHA256: Mapping[str, str] = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
}

#: The GroupLens usage terms, for the README and run manifests.
MOVIELENS_TERMS = (
    "MovieLens 100K is provided by the GroupLens Research Project (University of Minnesota) "
    "for research use only, on these conditions: do not state or imply endorsement by the "
    "University of Minnesota or GroupLens; acknowledge the data set in publications by citing "
    "F. Maxwell Harper and Joseph A. Konstan. 2015. The MovieLens Datasets: History and "
    "Context. ACM Transactions on Interactive Intelligent Systems (TiiS) 5, 4, Article 19 "
    "(https://doi.org/10.1145/2827872); do not redistribute the data without separate "
    "permission; no commercial or revenue-bearing use without permission from GroupLens. "
    "The data is downloaded from its source on each machine and never shipped with this "
    "project."
)

#: Name of the directory inside ``cache_dir`` holding the acquired files.
CACHE_SUBDIR = "ml-100k"

#: Marker written next to the files once a copy is verified.
MARKER_FILE = "source.json"

#: Downloads larger than this are refused (the archive is ~5 MB, the wheel ~2 MB).
MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024

#: Staging directories older than this are leftovers of a killed process and are removed.
STALE_STAGING_SECONDS = 3600.0

_STAGING_PREFIX = f".{CACHE_SUBDIR}.partial-"

#: ``pip_download(dest_dir, timeout) -> path of the downloaded RecBole wheel``. Raises on
#: failure (any exception; its message ends up in the final error).
PipDownload = Callable[[Path, float], Path]


@dataclass(frozen=True)
class AcquiredDataset:
    """A verified local copy of MovieLens 100K and where it came from."""

    format: str  # "movielens" (GroupLens files) or "recbole" (RecBole atomic files)
    path: str  # local directory holding the files
    name: str | None  # file prefix for format "recbole" ("ml-100k"); None for "movielens"
    source: str  # URL or description of where the files came from
    checksums: dict[str, str]  # file name -> sha256 of the verified files


def acquire_movielens_100k(
    cache_dir: str | os.PathLike[str],
    *,
    timeout: float = 15.0,
    grouplens_url: str | None = None,
    pip_download: PipDownload | None = None,
    pip_timeout: float = 180.0,
) -> AcquiredDataset:
    """Return a verified local copy of MovieLens 100K, fetching it if needed.

    Args:
        cache_dir: Directory for the cache; the files land in ``<cache_dir>/ml-100k``.
        timeout: Socket timeout (seconds) for the GroupLens download.
        grouplens_url: Archive URL; default :data:`GROUPLENS_URL`. ``file://`` works too.
        pip_download: Fetches the RecBole wheel; default runs ``pip download``.
        pip_timeout: Wall-clock limit (seconds) for the default ``pip download``.

    Raises:
        DataError: when no source yields a verified copy; the message lists each failure.
    """
    cache_root = Path(cache_dir).expanduser()
    final_dir = cache_root / CACHE_SUBDIR
    url = GROUPLENS_URL if grouplens_url is None else grouplens_url
    downloader = pip_download if pip_download is not None else _default_pip_download(pip_timeout)

    cached = _load_cached(final_dir)
    if cached is not None:
        logger.info("MovieLens 100K: using verified cache %s (from %s)", final_dir, cached.source)
        return cached
    if final_dir.exists():
        logger.warning("MovieLens 100K: cache %s failed verification; deleting it", final_dir)
        shutil.rmtree(final_dir)

    cache_root.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(cache_root)

    attempts: list[tuple[str, Callable[[Path], AcquiredDataset]]] = [
        (f"GroupLens archive {url}", lambda d: _fetch_grouplens(url, d, timeout)),
        (
            f"RecBole wheel from PyPI (pip download {RECBOLE_REQUIREMENT})",
            lambda d: _fetch_recbole(downloader, d, timeout),
        ),
    ]
    failures: list[str] = []
    for label, fetch in attempts:
        logger.info("MovieLens 100K: trying %s", label)
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=cache_root))
        try:
            staged = fetch(staging)
            result = _publish(staging / CACHE_SUBDIR, final_dir, staged)
        except Exception as exc:  # every failure is reported, then the next source is tried
            reason = f"{type(exc).__name__}: {exc}"
            logger.warning("MovieLens 100K: %s failed: %s", label, reason)
            failures.append(f"- {label}: {reason}")
            continue
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info(
            "MovieLens 100K: acquired from %s (format %s), cached in %s",
            result.source,
            result.format,
            result.path,
        )
        return result

    raise DataError(
        "could not acquire the default dataset MovieLens 100K. Tried:\n"
        + "\n".join(failures)
        + "\nTo supply the files by hand: download ml-100k.zip from "
        f"{GROUPLENS_PAGE} on a machine with internet access, unzip it, remove "
        "`data.dataset` from the config and set `data.format: movielens` and `data.path` to "
        "the directory holding u.data and u.item (e.g. --set data.format=movielens "
        "--set data.path=/path/to/ml-100k)."
    )


# --------------------------------------------------------------------------- cache


def _load_cached(final_dir: Path) -> AcquiredDataset | None:
    """The cached copy if its marker is valid and every checksum matches, else None."""
    marker = final_dir / MARKER_FILE
    if not marker.is_file():
        return None
    try:
        meta: Any = json.loads(marker.read_text(encoding="utf-8"))
        fmt = meta["format"]
        source = str(meta["source"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("MovieLens 100K: unreadable cache marker %s: %s", marker, exc)
        return None
    if fmt == "movielens":
        expected, name = MOVIELENS_SHA256, None
    elif fmt == "recbole":
        expected, name = RECBOLE_SHA256, RECBOLE_NAME
    else:
        logger.warning("MovieLens 100K: cache marker %s has unknown format %r", marker, fmt)
        return None
    try:
        mismatches = _mismatches(final_dir, expected)
    except OSError as exc:
        logger.warning("MovieLens 100K: cannot read cache %s: %s", final_dir, exc)
        return None
    if mismatches:
        logger.warning("MovieLens 100K: cache %s: %s", final_dir, "; ".join(mismatches))
        return None
    return AcquiredDataset(
        format=fmt, path=str(final_dir), name=name, source=source, checksums=dict(expected)
    )


def _publish(staged_dir: Path, final_dir: Path, result: AcquiredDataset) -> AcquiredDataset:
    """Write the marker and rename the verified staged directory into place."""
    marker = {
        "format": result.format,
        "name": result.name,
        "source": result.source,
        "checksums": result.checksums,
        "acquired_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "terms": MOVIELENS_TERMS,
    }
    (staged_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    try:
        os.replace(staged_dir, final_dir)
    except OSError:
        # Another process published first: use its copy if it verifies, else replace it.
        other = _load_cached(final_dir)
        if other is not None:
            return other
        shutil.rmtree(final_dir, ignore_errors=True)
        os.replace(staged_dir, final_dir)
    return AcquiredDataset(
        format=result.format,
        path=str(final_dir),
        name=result.name,
        source=result.source,
        checksums=result.checksums,
    )


def _remove_stale_staging(cache_root: Path) -> None:
    """Delete staging directories left behind by a killed process."""
    cutoff = time.time() - STALE_STAGING_SECONDS
    for entry in cache_root.glob(f"{_STAGING_PREFIX}*"):
        try:
            if entry.is_dir() and entry.stat().st_mtime < cutoff:
                logger.info("MovieLens 100K: removing stale staging directory %s", entry)
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


# --------------------------------------------------------------------------- sources


def _fetch_grouplens(url: str, staging: Path, timeout: float) -> AcquiredDataset:
    """Download the GroupLens archive, extract the files we use, verify them."""
    archive = staging / "ml-100k.zip"
    with urllib.request.urlopen(url, timeout=timeout) as response, archive.open("wb") as out:
        _copy_limited(response, out)
    out_dir = staging / CACHE_SUBDIR
    out_dir.mkdir()
    with zipfile.ZipFile(archive) as zf:
        members = set(zf.namelist())
        for file_name in (*MOVIELENS_SHA256, *MOVIELENS_EXTRA_FILES):
            member = f"{GROUPLENS_ARCHIVE_DIR}/{file_name}"
            if member not in members:
                if file_name in MOVIELENS_SHA256:
                    raise DataError(f"archive has no member {member}")
                continue
            _extract_member(zf, member, out_dir / file_name)
    archive.unlink()
    _verify(out_dir, MOVIELENS_SHA256, what="GroupLens file")
    return AcquiredDataset(
        format="movielens",
        path=str(out_dir),
        name=None,
        source=url,
        checksums=dict(MOVIELENS_SHA256),
    )


def _fetch_recbole(download: PipDownload, staging: Path, timeout: float) -> AcquiredDataset:
    """Download the RecBole wheel, verify it, extract and verify the ml-100k atomic files."""
    download_dir = staging / "download"
    download_dir.mkdir()
    wheel = Path(download(download_dir, timeout))
    actual = sha256_of(str(wheel))
    if actual != RECBOLE_WHEEL_SHA256:
        raise DataError(
            f"checksum mismatch for {wheel.name}: expected sha256 {RECBOLE_WHEEL_SHA256}, "
            f"got {actual}"
        )
    out_dir = staging / CACHE_SUBDIR
    out_dir.mkdir()
    with zipfile.ZipFile(wheel) as zf:
        members = set(zf.namelist())
        for file_name, member in RECBOLE_MEMBERS.items():
            if member not in members:
                raise DataError(f"wheel {wheel.name} has no member {member}")
            _extract_member(zf, member, out_dir / file_name)
    shutil.rmtree(download_dir)
    _verify(out_dir, RECBOLE_SHA256, what="RecBole file")
    return AcquiredDataset(
        format="recbole",
        path=str(out_dir),
        name=RECBOLE_NAME,
        source=f"PyPI wheel {wheel.name} ({RECBOLE_REQUIREMENT}), recbole/dataset_example/ml-100k",
        checksums=dict(RECBOLE_SHA256),
    )


def _default_pip_download(pip_timeout: float) -> PipDownload:
    def download(dest_dir: Path, timeout: float) -> Path:
        return pip_download_recbole(dest_dir, socket_timeout=timeout, timeout=pip_timeout)

    return download


def pip_download_recbole(
    dest_dir: str | os.PathLike[str], *, socket_timeout: float = 15.0, timeout: float = 180.0
) -> Path:
    """Run ``pip download`` for the RecBole wheel into ``dest_dir``; return the wheel's path.

    Uses the interpreter running this code (``sys.executable -m pip``), so pip's own index,
    proxy and cache configuration applies. Raises :class:`DataError` on failure.
    """
    dest = Path(dest_dir)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--retries",
        "1",
        "--timeout",
        str(socket_timeout),
        RECBOLE_REQUIREMENT,
        "-d",
        str(dest),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise DataError(f"pip download timed out after {timeout:g}s") from exc
    except OSError as exc:
        raise DataError(f"could not run pip: {exc}") from exc
    if proc.returncode != 0:
        tail = " | ".join(line for line in proc.stderr.strip().splitlines()[-3:] if line)
        raise DataError(f"pip download exited with {proc.returncode}: {tail or 'no output'}")
    wheels = sorted(dest.glob("recbole-*.whl"))
    if len(wheels) != 1:
        raise DataError(f"pip download left {len(wheels)} recbole wheels in {dest}")
    return wheels[0]


# --------------------------------------------------------------------------- helpers


def _mismatches(directory: Path, expected: Mapping[str, str]) -> list[str]:
    problems = []
    for file_name, want in expected.items():
        path = directory / file_name
        if not path.is_file():
            problems.append(f"{file_name} is missing")
            continue
        got = sha256_of(str(path))
        if got != want:
            problems.append(f"checksum mismatch for {file_name}: expected sha256 {want}, got {got}")
    return problems


def _verify(directory: Path, expected: Mapping[str, str], *, what: str) -> None:
    problems = _mismatches(directory, expected)
    if problems:
        raise DataError(f"{what} verification failed: " + "; ".join(problems))


def _copy_limited(src: Any, dst: Any) -> None:
    total = 0
    while chunk := src.read(1 << 20):
        total += len(chunk)
        if total > MAX_DOWNLOAD_BYTES:
            raise DataError(f"download exceeds {MAX_DOWNLOAD_BYTES} bytes; refusing it")
        dst.write(chunk)


def _extract_member(zf: zipfile.ZipFile, member: str, target: Path) -> None:
    """Copy one archive member to ``target`` (a name we chose, so no path traversal)."""
    with zf.open(member) as src, target.open("wb") as dst:
        _copy_limited(src, dst)
