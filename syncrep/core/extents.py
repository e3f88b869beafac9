"""Failed-extent derivation (method step 1). Pure: no I/O.

The secondary did not durably apply exactly the bytes covered by

* every NACKed write (each NACK names its write's offset and length), and
* every write that was in flight without an ack when the secondary was
  declared failed (crash, hang, cut link),

plus whatever was already known to have failed. The result is byte-exact —
no rounding to blocks — merged, and in offset order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, TypeAlias

from syncrep.blockstore.extents import Extent, merge_extents

__all__ = [
    "ExtentLike",
    "ExtentSummary",
    "derive_failed_extents",
    "extents_bytes",
    "summarize_extents",
    "to_extent",
]


class _HasRange(Protocol):
    @property
    def offset(self) -> int: ...

    @property
    def length(self) -> int: ...


# An Extent, an (offset, length) pair, or anything with ``.offset`` and
# ``.length`` (a proto Nack, ReplicatedWriteRef or Extent).
ExtentLike: TypeAlias = _HasRange | tuple[int, int]


def to_extent(item: ExtentLike) -> Extent:
    """``item`` as an Extent; ValueError for a negative offset or length."""
    if isinstance(item, Extent):
        ext = item
    elif isinstance(item, tuple):
        offset, length = item
        ext = Extent(int(offset), int(length))
    else:
        ext = Extent(int(item.offset), int(item.length))
    if ext.offset < 0 or ext.length < 0:
        raise ValueError(f"invalid extent offset={ext.offset} length={ext.length}: both must be >= 0")
    return ext


def derive_failed_extents(
    nacks: Iterable[ExtentLike],
    unacked: Iterable[ExtentLike],
    existing: Iterable[ExtentLike] = (),
) -> list[Extent]:
    """The failed data extents: the union of NACKed writes, unacked in-flight
    writes and already-known failed extents, merged (overlapping and adjacent
    ranges joined, zero-length ones dropped) and sorted by offset.
    """
    items: list[Extent] = []
    for source in (existing, nacks, unacked):
        items.extend(to_extent(x) for x in source)
    return merge_extents(items)


def extents_bytes(extents: Iterable[ExtentLike]) -> int:
    """Total length in bytes (of already-merged extents: overlaps count twice)."""
    return sum(to_extent(e).length for e in extents)


@dataclass(frozen=True)
class ExtentSummary:
    """For status output: how many extents, how many bytes, and the first few."""

    count: int
    total_bytes: int
    first: tuple[Extent, ...]

    @property
    def truncated(self) -> bool:
        return self.count > len(self.first)


def summarize_extents(extents: Iterable[ExtentLike], first_n: int = 64) -> ExtentSummary:
    """Count, bytes and the first ``first_n`` of (already-merged, sorted) extents."""
    if first_n < 0:
        raise ValueError(f"first_n {first_n} must be >= 0")
    count = 0
    total = 0
    first: list[Extent] = []
    for item in extents:
        e = to_extent(item)
        count += 1
        total += e.length
        if len(first) < first_n:
            first.append(e)
    return ExtentSummary(count=count, total_bytes=total, first=tuple(first))
