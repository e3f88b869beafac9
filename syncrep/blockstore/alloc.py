"""Which ranges of a volume's live head are allocated: SEEK_DATA / SEEK_HOLE on its data file.

The live head is a sparse file (``store.py``: ``data``, ``os.ftruncate`` to the
volume's size, written with ``os.pwrite``); a range never written, or whose
space was released with ``fallocate(PUNCH_HOLE)``, is a hole of that file and
reads as zeros. NBD block status (``base:allocation``) and sparse NBD reads
use this to tell clients (qemu-img convert, nbdcopy, nbdinfo --map) which
ranges they can skip, without reading them.

Why a module of its own that opens the file read-only by path, rather than a
``BlockStore`` method: it only asks the kernel about the file's layout, never
touches the store's descriptors, lock or metadata, and so cannot disturb the
write path. It holds no state: each call opens the file, walks it and closes
it, so a store closed or reopened meanwhile is never read through a stale
descriptor.

Only the live head: a snapshot's content is the head overlaid with copies in
``cow``, so a hole in ``data`` says nothing about it (a snapshot export reports
everything as data, which the NBD document says is always correct).

Rounding: answers are in whole blocks of ``block_size``. A block is a hole
only when all of it is a hole; a block that holds any data is data. That is
the direction that is always safe: reporting data for zeros costs a read,
reporting a hole for data would lose it. A filesystem without SEEK_DATA
support (Linux then treats the whole file as data) yields one data extent,
correct as well. The answer is a snapshot of the layout when asked: a write
landing right after may allocate a range reported as a hole, the same race as
a read issued concurrently with that write.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

__all__ = ["DATA", "HOLE", "allocation_runs"]

#: Run kinds returned by :func:`allocation_runs`.
HOLE = True
DATA = False


def allocation_runs(
    data_path: str | os.PathLike[str], offset: int, length: int, *, block_size: int, size: int,
    max_runs: int,
) -> list[tuple[int, bool]]:
    """Consecutive (length, is_hole) runs of the file at ``data_path`` from
    ``offset`` over ``length`` bytes (clipped to ``size``, the volume's size).

    Boundaries inside the range fall on multiples of ``block_size``; the
    first run starts at ``offset`` and the last ends at ``offset + length``
    (both may be unaligned). At most ``max_runs`` runs: then they cover less
    than asked (the caller reports what it has; the rest is unknown). Adjacent
    runs always differ in kind. ``OSError`` if the file cannot be opened."""
    if block_size <= 0 or max_runs <= 0:
        raise ValueError(f"block size {block_size} and max runs {max_runs} must be > 0")
    end = min(offset + length, size)
    if offset < 0 or end <= offset:
        return []
    bs = block_size
    fd = os.open(Path(data_path), os.O_RDONLY | os.O_CLOEXEC)
    try:
        file_end = os.fstat(fd).st_size
        pos = offset - offset % bs
        # (start, stop, is_hole): start a multiple of bs; stop a multiple of bs, or `end`.
        runs: list[tuple[int, int, bool]] = []
        while pos < end and len(runs) < max_runs:
            data_at = _seek_data(fd, pos, file_end)
            if data_at > pos:
                # [pos, data_at) is a hole; only its whole blocks count (round down).
                hole_end = min(data_at - data_at % bs, end)
                if hole_end > pos:
                    runs.append((pos, hole_end, HOLE))
                    pos = hole_end
                    continue
            # The block at pos holds data (at data_at, within it); the data ends where
            # the next hole starts, rounded up to a whole block.
            hole_at = _seek_hole(fd, max(pos, data_at), file_end)
            data_end = min(hole_at + (-hole_at) % bs, end)
            runs.append((pos, data_end, DATA))
            pos = data_end
    finally:
        os.close(fd)
    out: list[tuple[int, bool]] = []
    for start, stop, hole in runs:
        start = max(start, offset)  # the first run starts at the aligned block below offset
        if out and out[-1][1] == hole:
            out[-1] = (out[-1][0] + stop - start, hole)
        else:
            out.append((stop - start, hole))
    return out


#: What _seek_data returns when no data follows: everything after reads as zeros.
_NO_MORE_DATA = 1 << 63


def _seek_data(fd: int, pos: int, file_end: int) -> int:
    """The first data offset at or after ``pos`` (SEEK_DATA), or _NO_MORE_DATA
    (ENXIO: only holes up to the end of the file; past it everything reads as zeros)."""
    if pos >= file_end:
        return _NO_MORE_DATA
    try:
        return os.lseek(fd, pos, os.SEEK_DATA)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return _NO_MORE_DATA
        raise


def _seek_hole(fd: int, pos: int, file_end: int) -> int:
    """The first hole offset at or after ``pos`` (SEEK_HOLE; the end of the file is one)."""
    if pos >= file_end:
        return pos
    return os.lseek(fd, pos, os.SEEK_HOLE)
