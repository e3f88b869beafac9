"""Byte extents and their conversion to and from block bitmaps."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pyroaring import BitMap


@dataclass(frozen=True)
class Extent:
    """A byte range ``[offset, offset + length)`` of a volume."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def merge_extents(extents: Iterable[Extent]) -> list[Extent]:
    """Sort extents by offset and merge the overlapping or adjacent ones.

    Zero-length extents are dropped.
    """
    items = sorted((e for e in extents if e.length > 0), key=lambda e: e.offset)
    out: list[Extent] = []
    cur_start = cur_end = -1
    for e in items:
        if e.offset <= cur_end:
            if e.end > cur_end:
                cur_end = e.end
            continue
        if cur_end >= 0:
            out.append(Extent(cur_start, cur_end - cur_start))
        cur_start, cur_end = e.offset, e.end
    if cur_end >= 0:
        out.append(Extent(cur_start, cur_end - cur_start))
    return out


def extents_to_blocks(extents: Iterable[Extent], block_size: int) -> BitMap:
    """The set of block indices touched by ``extents`` (each aligned outward to blocks)."""
    if block_size <= 0:
        raise ValueError(f"block size {block_size} must be positive")
    bm = BitMap()
    for e in extents:
        if e.length <= 0:
            continue
        first = e.offset // block_size
        last = (e.end + block_size - 1) // block_size
        bm.add_range(first, last)
    return bm


def iter_block_runs(blocks: Iterable[int]) -> Iterator[tuple[int, int]]:
    """Merge sorted block indices into ``(first_block, count)`` runs, one at a time."""
    start = prev = -2
    for b in blocks:
        if b != prev + 1:
            if start >= 0:
                yield start, prev - start + 1
            start = b
        prev = b
    if start >= 0:
        yield start, prev - start + 1


def block_runs(blocks: Iterable[int]) -> list[tuple[int, int]]:
    """Merge sorted block indices into ``(first_block, count)`` runs."""
    return list(iter_block_runs(blocks))


def blocks_to_extents(blocks: Iterable[int], block_size: int) -> list[Extent]:
    """Merged byte extents, in offset order, of sorted block indices (e.g. a BitMap)."""
    return [Extent(first * block_size, count * block_size) for first, count in block_runs(blocks)]
