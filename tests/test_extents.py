"""Failed-extent derivation: table-driven cases and a byte-set model."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncrep.blockstore import Extent
from syncrep.core.extents import (
    ExtentSummary,
    derive_failed_extents,
    extents_bytes,
    summarize_extents,
    to_extent,
)
from syncrep.pb import syncrep_pb2 as pb

X = Extent

CASES: list[tuple[str, list[Any], list[Any], list[Any], list[Extent]]] = [
    ("nothing", [], [], [], []),
    ("one nack", [(4096, 4096)], [], [], [X(4096, 4096)]),
    ("one unacked", [], [(0, 512)], [], [X(0, 512)]),
    ("existing only", [], [], [(100, 1)], [X(100, 1)]),
    ("sorted output", [(8192, 10)], [(0, 10)], [(4096, 10)], [X(0, 10), X(4096, 10), X(8192, 10)]),
    ("overlap merges", [(0, 100)], [(50, 100)], [], [X(0, 150)]),
    ("adjacent merges", [(0, 100)], [(100, 100)], [], [X(0, 200)]),
    ("contained", [(0, 1000)], [(10, 10)], [(500, 1)], [X(0, 1000)]),
    ("gap of one byte stays", [(0, 100)], [(101, 1)], [], [X(0, 100), X(101, 1)]),
    ("zero length dropped", [(10, 0)], [(20, 0)], [(30, 0)], []),
    ("duplicates", [(7, 3), (7, 3)], [(7, 3)], [(7, 3)], [X(7, 3)]),
    ("byte exact, unaligned", [(4095, 2)], [], [], [X(4095, 2)]),
    ("bridge joins three", [(0, 10), (20, 10)], [(10, 10)], [], [X(0, 30)]),
    ("existing extended", [(90, 20)], [], [(0, 100)], [X(0, 110)]),
    ("reverse order input", [(300, 10), (200, 10), (100, 10)], [], [], [X(100, 10), X(200, 10), X(300, 10)]),
]


@pytest.mark.parametrize(("name", "nacks", "unacked", "existing", "want"), CASES, ids=[c[0] for c in CASES])
def test_derive_cases(
    name: str, nacks: list[Any], unacked: list[Any], existing: list[Any], want: list[Extent]
) -> None:
    assert derive_failed_extents(nacks, unacked, existing) == want


def test_accepts_proto_messages_and_extents() -> None:
    nacks = [pb.Nack(seq=5, offset=4096, length=4096, code=pb.NACK_CODE_IO_ERROR)]
    unacked = [pb.ReplicatedWriteRef(seq=6, offset=8192, length=512)]
    existing: list[Any] = [pb.Extent(offset=0, length=4096), X(100_000, 1)]
    assert derive_failed_extents(nacks, unacked, existing) == [X(0, 8192 + 512), X(100_000, 1)]


def test_existing_defaults_to_empty() -> None:
    assert derive_failed_extents([(1, 1)], []) == [X(1, 1)]


def test_negative_rejected() -> None:
    with pytest.raises(ValueError, match="offset=-1"):
        derive_failed_extents([(-1, 5)], [])
    with pytest.raises(ValueError, match="length=-5"):
        to_extent((0, -5))


def test_extents_bytes() -> None:
    assert extents_bytes([]) == 0
    assert extents_bytes([X(0, 10), X(20, 5), (100, 1)]) == 16


def test_summary() -> None:
    exts = [X(i * 10, 5) for i in range(100)]
    s = summarize_extents(exts, first_n=3)
    assert s == ExtentSummary(count=100, total_bytes=500, first=(X(0, 5), X(10, 5), X(20, 5)))
    assert s.truncated
    small = summarize_extents(exts[:2])
    assert small.count == 2 and small.first == (X(0, 5), X(10, 5)) and not small.truncated
    assert summarize_extents([], 0) == ExtentSummary(0, 0, ())
    with pytest.raises(ValueError):
        summarize_extents(exts, -1)


def _bytes_of(ranges: list[tuple[int, int]]) -> set[int]:
    out: set[int] = set()
    for off, length in ranges:
        out.update(range(off, off + length))
    return out


_ranges = st.lists(st.tuples(st.integers(0, 300), st.integers(0, 40)), max_size=12)


@settings(max_examples=400, deadline=None)
@given(nacks=_ranges, unacked=_ranges, existing=_ranges)
def test_matches_byte_set_model(
    nacks: list[tuple[int, int]], unacked: list[tuple[int, int]], existing: list[tuple[int, int]]
) -> None:
    got = derive_failed_extents(nacks, unacked, existing)
    # Same bytes, exactly.
    assert _bytes_of([(e.offset, e.length) for e in got]) == _bytes_of(nacks + unacked + existing)
    # Canonical: non-empty, sorted, neither overlapping nor adjacent.
    assert all(e.length > 0 for e in got)
    for a, b in itertools.pairwise(got):
        assert a.end < b.offset
    assert extents_bytes(got) == len(_bytes_of(nacks + unacked + existing))
    # Idempotent: re-deriving from the result changes nothing.
    assert derive_failed_extents([], [], got) == got
    assert derive_failed_extents(got, got, got) == got
