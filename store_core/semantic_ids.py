"""The semantic-ID codec: codes <-> token strings <-> packed integers.

A semantic ID is a short fixed-length sequence of discrete codes, one per level: the L
cluster levels from the quantizer plus one disambiguation level (see
:mod:`store_core.quantizer`). Level ``l`` is named by the ``l``-th lowercase letter, so
an ID with codes ``(12, 5, 200, 0)`` renders as the tokens ``<a_12><b_5><c_200><d_0>``.
Naming the level inside the token (rather than sharing ``<12>`` across levels) gives each
level its own embedding rows in the LLM, which is what lets constrained decoding allow
only the codes of the current level at each step.

The string form is what the LLM reads and writes, so :func:`parse_sid` is strict: exactly
the canonical rendering is accepted (levels in order from ``a``, decimal codes without
leading zeros or signs, nothing in between). Anything else is a malformed ID - e.g. a
generation that went off the rails - and must not be silently coerced into a real item.

The packed form is for SQL. Codes are packed big-endian into one int64, level 0 in the
high bits, ``bits`` bits per level. Integer order then equals lexicographic order of the
code tuples, so ``ORDER BY packed`` sorts by prefix and "every item whose ID starts with
``(c0..ck)``" (its semantic neighbours) is one ``BETWEEN lo AND hi`` range
(:func:`prefix_range`), which DuckDB answers from a sorted column without string
matching.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import numpy as np

#: Level names in order: level 0 is ``a``. The quantizer allows at most 8 cluster levels
#: plus disambiguation, well inside the 26 available.
LEVEL_NAMES: str = string.ascii_lowercase

_TOKEN = re.compile(r"<([a-z])_(0|[1-9][0-9]*)>")


def level_name(level: int) -> str:
    """The letter naming ``level`` (0 -> ``a``)."""
    if not 0 <= level < len(LEVEL_NAMES):
        raise ValueError(f"level must be in 0..{len(LEVEL_NAMES) - 1}, got {level}")
    return LEVEL_NAMES[level]


def level_token(level: int, code: int) -> str:
    """The token of ``code`` at ``level``, e.g. ``level_token(2, 200) == "<c_200>"``."""
    if code < 0:
        raise ValueError(f"code must be >= 0, got {code} at level {level}")
    return f"<{level_name(level)}_{int(code)}>"


def format_sid(codes: Sequence[int] | np.ndarray) -> str:
    """Render a semantic ID: ``format_sid([12, 5, 200, 0]) == "<a_12><b_5><c_200><d_0>"``."""
    if len(codes) == 0:
        raise ValueError("a semantic ID needs at least one code")
    return "".join(level_token(level, int(code)) for level, code in enumerate(codes))


def parse_sid(sid: str) -> list[int]:
    """The codes of a canonical semantic-ID string; ValueError naming it when malformed.

    Inverse of :func:`format_sid`: ``parse_sid(format_sid(c)) == list(c)``.
    """
    codes: list[int] = []
    pos = 0
    while pos < len(sid):
        match = _TOKEN.match(sid, pos)
        if match is None:
            raise ValueError(
                f"malformed semantic ID {sid!r}: expected a token like "
                f"<{level_name(min(len(codes), len(LEVEL_NAMES) - 1))}_N> at character {pos}"
            )
        letter, digits = match.groups()
        expected = LEVEL_NAMES[len(codes)] if len(codes) < len(LEVEL_NAMES) else None
        if letter != expected:
            raise ValueError(
                f"malformed semantic ID {sid!r}: token {match.group(0)!r} at character {pos} "
                f"is level {letter!r}, expected level {expected!r}"
            )
        codes.append(int(digits))
        pos = match.end()
    if not codes:
        raise ValueError(f"malformed semantic ID {sid!r}: no tokens")
    return codes


def vocabulary(level_sizes: Sequence[int]) -> list[str]:
    """Every semantic-ID token, level by level, codes in order (to add to the tokenizer).

    ``level_sizes[l]`` is the number of codes at level ``l`` (K for the cluster levels,
    the largest disambiguation code + 1 for the last one).
    """
    tokens: list[str] = []
    for level, size in enumerate(level_sizes):
        if size < 1:
            raise ValueError(f"level {level} must have at least one code, got {size}")
        tokens.extend(level_token(level, code) for code in range(size))
    return tokens


# --------------------------------------------------------------------------- packing


def _check_layout(id_length: int, bits: int) -> None:
    if id_length < 1:
        raise ValueError(f"need at least one level, got {id_length}")
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    if id_length * bits > 63:
        raise ValueError(
            f"{id_length} levels x {bits} bits = {id_length * bits} bits do not fit in a "
            "signed int64 (63 bits): use fewer bits per level"
        )


def pack_codes(codes: np.ndarray, bits: int = 16) -> np.ndarray:
    """Pack each row of codes into one int64, level 0 in the high bits.

    codes: [N, M] non-negative ints, each < 2**bits. Returns [N] int64 whose order is the
    lexicographic order of the rows.
    """
    arr = np.asarray(codes)
    if arr.ndim != 2:
        raise ValueError(f"codes must be a 2-D [N, M] array, got shape {arr.shape}")
    id_length = arr.shape[1]
    _check_layout(id_length, bits)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= (1 << bits)):
        bad = arr[(arr < 0) | (arr >= (1 << bits))][0]
        raise ValueError(f"code {int(bad)} does not fit in {bits} bits (0..{(1 << bits) - 1})")
    packed = np.zeros(arr.shape[0], dtype=np.int64)  # [N]
    for level in range(id_length):
        packed = (packed << bits) | arr[:, level]
    return packed


def unpack_codes(packed: np.ndarray, id_length: int, bits: int = 16) -> np.ndarray:
    """Inverse of :func:`pack_codes`: packed [N] int64 -> codes [N, id_length] int64."""
    _check_layout(id_length, bits)
    values = np.asarray(packed, dtype=np.int64)
    if values.ndim != 1:
        raise ValueError(f"packed must be a 1-D [N] array, got shape {values.shape}")
    if values.size and (values.min() < 0 or values.max() >= (1 << (id_length * bits))):
        raise ValueError(f"packed values out of range for {id_length} levels x {bits} bits")
    mask = (1 << bits) - 1
    codes = np.empty((values.shape[0], id_length), dtype=np.int64)  # [N, M]
    for level in range(id_length):
        shift = bits * (id_length - 1 - level)
        codes[:, level] = (values >> shift) & mask
    return codes


def prefix_range(prefix: Sequence[int], id_length: int, bits: int = 16) -> tuple[int, int]:
    """Inclusive ``(lo, hi)`` of the packed IDs that start with ``prefix``.

    ``packed BETWEEN lo AND hi`` selects exactly the IDs whose first ``len(prefix)`` codes
    equal ``prefix``; an empty prefix covers every ID.
    """
    _check_layout(id_length, bits)
    if len(prefix) > id_length:
        raise ValueError(f"prefix has {len(prefix)} codes, IDs have only {id_length} levels")
    lo = 0
    for code in prefix:
        if not 0 <= int(code) < (1 << bits):
            raise ValueError(f"code {code} does not fit in {bits} bits (0..{(1 << bits) - 1})")
        lo = (lo << bits) | int(code)
    free_bits = bits * (id_length - len(prefix))
    lo <<= free_bits
    hi = lo | ((1 << free_bits) - 1)
    return lo, hi
