"""The semantic-ID codec: token strings, vocabulary, packed integers and prefix ranges."""

from __future__ import annotations

import re

import numpy as np
import pytest

from store_core.semantic_ids import (
    format_sid,
    level_token,
    pack_codes,
    parse_sid,
    prefix_range,
    unpack_codes,
    vocabulary,
)


def test_tokens_and_format() -> None:
    assert level_token(0, 12) == "<a_12>"
    assert level_token(3, 0) == "<d_0>"
    assert format_sid([12, 5, 200, 0]) == "<a_12><b_5><c_200><d_0>"
    assert format_sid(np.array([1, 2], dtype=np.int64)) == "<a_1><b_2>"


def test_parse_round_trip() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        codes = rng.integers(0, 5000, size=int(rng.integers(1, 9))).tolist()
        assert parse_sid(format_sid(codes)) == codes
    assert parse_sid("<a_12><b_5><c_200><d_0>") == [12, 5, 200, 0]


@pytest.mark.parametrize(
    "sid",
    [
        "",
        "<b_1>",  # must start at level a
        "<a_1><c_2>",  # skips a level
        "<a_1><a_2>",  # repeats a level
        "<a_01>",  # leading zero: not canonical
        "<a_-1>",
        "<A_1>",
        "<a_1> <b_2>",
        "<a_1><b_2",
        "<a_1><b_2>x",
        "a_1",
        "<a_>",
        "<a_1x>",
    ],
)
def test_parse_rejects_malformed(sid: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(sid))):
        parse_sid(sid)


def test_format_rejects_bad_codes() -> None:
    with pytest.raises(ValueError):
        format_sid([])
    with pytest.raises(ValueError):
        format_sid([1, -1])
    with pytest.raises(ValueError):
        level_token(26, 0)


def test_vocabulary_order() -> None:
    assert vocabulary([2, 3]) == ["<a_0>", "<a_1>", "<b_0>", "<b_1>", "<b_2>"]
    vocab = vocabulary([256, 256, 256, 7])
    assert len(vocab) == len(set(vocab)) == 3 * 256 + 7
    assert vocab[256] == "<b_0>" and vocab[-1] == "<d_6>"
    with pytest.raises(ValueError):
        vocabulary([3, 0])


def _random_codes(rng: np.random.Generator, n: int, m: int, high: int) -> np.ndarray:
    return rng.integers(0, high, size=(n, m))


def test_pack_order_is_lexicographic() -> None:
    rng = np.random.default_rng(1)
    for bits, high in ((16, 5), (16, 65536), (8, 256), (21, 3)):
        codes = _random_codes(rng, 500, 3, high)  # small `high`: many shared prefixes
        packed = pack_codes(codes, bits=bits)
        assert packed.dtype == np.int64
        by_packed = codes[np.argsort(packed, kind="stable")]
        by_lex = codes[np.lexsort(codes.T[::-1])]
        assert np.array_equal(by_packed, by_lex)
        assert np.array_equal(unpack_codes(packed, 3, bits=bits), codes)


def test_pack_extremes() -> None:
    codes = np.array([[0, 0, 0], [65535, 65535, 65535], [1, 0, 0], [0, 65535, 65535]])
    packed = pack_codes(codes)
    assert packed.tolist() == [0, (1 << 48) - 1, 1 << 32, (1 << 32) - 1]
    assert pack_codes(np.array([[1] * 3], dtype=np.int64), bits=21)[0] == (1 << 42) + (1 << 21) + 1


def test_prefix_range_selects_exactly_the_prefix() -> None:
    rng = np.random.default_rng(2)
    m = 4  # L=3 cluster levels + disambiguation: 4 x 16 bits would not fit, 4 x 15 does
    codes = _random_codes(rng, 400, m, 4)
    packed = pack_codes(codes, bits=15)
    for _ in range(300):
        length = int(rng.integers(0, m + 1))
        prefix = rng.integers(0, 4, size=length).tolist()
        lo, hi = prefix_range(prefix, m, bits=15)
        in_range = (packed >= lo) & (packed <= hi)
        expected = (codes[:, :length] == np.array(prefix, dtype=np.int64)).all(axis=1)
        assert np.array_equal(in_range, expected), prefix
    assert prefix_range([], 2) == (0, (1 << 32) - 1)
    assert prefix_range([3, 7], 2) == ((3 << 16) + 7, (3 << 16) + 7)


def test_pack_rejects_overflow() -> None:
    with pytest.raises(ValueError, match="does not fit in 8 bits"):
        pack_codes(np.array([[1, 256]]), bits=8)
    with pytest.raises(ValueError, match="does not fit"):
        pack_codes(np.array([[1, -1]]))
    with pytest.raises(ValueError, match="63"):
        pack_codes(np.zeros((1, 4), dtype=np.int64), bits=16)
    with pytest.raises(ValueError, match="63"):
        prefix_range([1], 4, bits=16)
    with pytest.raises(ValueError):
        prefix_range([1, 2, 3], 2)
    with pytest.raises(ValueError):
        prefix_range([70000], 3)
    with pytest.raises(ValueError):
        pack_codes(np.zeros((2, 2), dtype=np.float64))
    with pytest.raises(ValueError):
        unpack_codes(np.array([1 << 40]), 2, bits=16)
