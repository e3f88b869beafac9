"""BlockStore.zero_range (issue 14, TRIM and WRITE_ZEROES as metadata
operations): the range reads back as zeros at the head, every snapshot still
reads back as taken, diffs from older snapshots carry the blocks whose content
changed, all of it survives reopen; with no snapshot the blocks are punched
(nothing allocated, whatever the length); where punching is not supported,
zeros are written instead."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from syncrep.blockstore import BlockStore, EmptyWriteError, Extent, MisalignedError, OutOfRangeError

BS = 4096
MIB = 1 << 20
GIB = 1 << 30


def allocated(path: Path) -> int:
    return (path / "data").stat().st_blocks * 512


def test_zero_range_without_snapshot_punches_everything(tmp_path: Path) -> None:
    path = tmp_path / "v"
    with BlockStore.create(path, 64 * GIB, BS, durability="sync") as s:
        s.write(0, b"a" * MIB)
        s.write(40 * GIB, b"b" * 2 * MIB)
        assert allocated(path) >= 3 * MIB
        s.zero_range(0, 64 * GIB)  # the whole volume in one call
        assert allocated(path) == 0
        assert s.read(0, MIB) == bytes(MIB)
        assert s.read(40 * GIB, 2 * MIB) == bytes(2 * MIB)
        assert s.stats()["tracked_blocks"] == 0
    with BlockStore.open(path) as s:
        assert s.read(40 * GIB, 2 * MIB) == bytes(2 * MIB)
        assert allocated(path) == 0


def test_zero_range_partial_keeps_neighbours(tmp_path: Path) -> None:
    with BlockStore.create(tmp_path / "v", 64 * BS, BS, durability="os") as s:
        s.write(0, b"x" * 16 * BS)
        s.zero_range(4 * BS, 8 * BS)
        assert s.read(0, 16 * BS) == b"x" * 4 * BS + bytes(8 * BS) + b"x" * 4 * BS


def test_zero_range_with_snapshot_keeps_snapshot_and_diffs(tmp_path: Path) -> None:
    path = tmp_path / "v"
    with BlockStore.create(path, 1024 * BS, BS, durability="sync") as s:
        s.write(0, b"A" * 8 * BS)
        s.write(100 * BS, bytes(2 * BS))  # allocated, all zeros: recorded as "was zeros"
        s1 = s.create_snapshot("one")
        s.write(8 * BS, b"B" * 4 * BS)  # already tracked in interval one before the zeroing
        s.zero_range(0, 1024 * BS)
        assert s.read(0, 1024 * BS) == bytes(1024 * BS)
        assert s.read_at(s1.id, 0, 12 * BS) == b"A" * 8 * BS + bytes(4 * BS)
        # Changed: the data blocks (A, B) and the allocated zero blocks; the
        # holes that stayed holes are not tracked.
        assert s.diff(s1.id) == [Extent(0, 12 * BS), Extent(100 * BS, 2 * BS)]
        assert s.stats()["cow_slots_used"] == 8  # the A blocks; zeros need no copy
        assert allocated(path) == 0
    with BlockStore.open(path) as s:
        assert s.read_at(s1.id, 0, 12 * BS) == b"A" * 8 * BS + bytes(4 * BS)
        assert s.read(0, 12 * BS) == bytes(12 * BS)
        assert s.diff(s1.id) == [Extent(0, 12 * BS), Extent(100 * BS, 2 * BS)]
        # And back: rolling back restores the snapshot's content.
        s.rollback_to(s1.id)
        assert s.read(0, 12 * BS) == b"A" * 8 * BS + bytes(4 * BS)


def test_zero_range_diff_from_older_snapshot(tmp_path: Path) -> None:
    """Blocks written in an older interval, zeroed in the newest: the diff from
    the older snapshot covers them, the one from the newest too."""
    with BlockStore.create(tmp_path / "v", 256 * BS, BS, durability="os") as s:
        s0 = s.create_snapshot("zero")
        s.write(10 * BS, b"C" * 5 * BS)
        s1 = s.create_snapshot("one")
        s.zero_range(0, 256 * BS)
        assert s.diff(s0.id) == [Extent(10 * BS, 5 * BS)]
        assert s.diff(s1.id) == [Extent(10 * BS, 5 * BS)]
        assert s.read_at(s1.id, 10 * BS, 5 * BS) == b"C" * 5 * BS
        assert s.read_at(s0.id, 10 * BS, 5 * BS) == bytes(5 * BS)
        assert [(o, d) for o, d in s.iter_diff(s1.id)] == [(10 * BS, bytes(5 * BS))]


def test_zero_range_when_punching_is_unsupported_writes_zeros(tmp_path: Path) -> None:
    with BlockStore.create(tmp_path / "v", 64 * BS, BS, durability="sync") as s:
        s._puncher._fn = None  # as on a filesystem without PUNCH_HOLE
        s.write(0, b"q" * 32 * BS)
        snap = s.create_snapshot("s")
        s.zero_range(8 * BS, 16 * BS)
        assert s.read(0, 32 * BS) == b"q" * 8 * BS + bytes(16 * BS) + b"q" * 8 * BS
        assert s.read_at(snap.id, 0, 32 * BS) == b"q" * 32 * BS
        assert s.diff(snap.id) == [Extent(8 * BS, 16 * BS)]


def test_zero_range_validates_like_a_write(tmp_path: Path) -> None:
    with BlockStore.create(tmp_path / "v", 64 * BS, BS, durability="os") as s:
        with pytest.raises(MisalignedError):
            s.zero_range(1, BS)
        with pytest.raises(MisalignedError):
            s.zero_range(0, BS + 1)
        with pytest.raises(OutOfRangeError):
            s.zero_range(60 * BS, 8 * BS)
        with pytest.raises(EmptyWriteError):
            s.zero_range(0, 0)


def test_zero_range_model_against_writes_of_zeros(tmp_path: Path) -> None:
    """Random writes, zero ranges and snapshots (seed 1414), mirrored on a
    second store that writes zero buffers instead: every snapshot and the head
    read the same on both, and each diff from the model is covered by the
    store's (it may only omit blocks whose content did not change)."""
    rng = random.Random(1414)
    n = 128
    with BlockStore.create(tmp_path / "z", n * BS, BS, durability="os") as z, \
            BlockStore.create(tmp_path / "w", n * BS, BS, durability="os") as w:
        snaps: list[tuple[int, int]] = []
        for step in range(300):
            op = rng.random()
            first = rng.randrange(n)
            count = rng.randint(1, min(16, n - first))
            if op < 0.45:
                data = bytes([rng.randrange(1, 256)]) * (count * BS)
                z.write(first * BS, data)
                w.write(first * BS, data)
            elif op < 0.8:
                z.zero_range(first * BS, count * BS)
                w.write(first * BS, bytes(count * BS))
            elif op < 0.9:
                snaps.append((z.create_snapshot(f"s{step}").id, w.create_snapshot(f"s{step}").id))
            elif snaps:
                zi, wi = snaps.pop(rng.randrange(len(snaps)))
                z.delete_snapshot(zi)
                w.delete_snapshot(wi)
        assert z.read(0, n * BS) == w.read(0, n * BS)
        for zi, wi in snaps:
            assert z.read_at(zi, 0, n * BS) == w.read_at(wi, 0, n * BS)
            head = z.read(0, n * BS)
            then = z.read_at(zi, 0, n * BS)
            changed = {b for b in range(n) if head[b * BS:(b + 1) * BS] != then[b * BS:(b + 1) * BS]}
            assert changed <= set(z.diff_bitmap(zi)), sorted(changed - set(z.diff_bitmap(zi)))
        assert os.stat(tmp_path / "z" / "data").st_blocks <= os.stat(tmp_path / "w" / "data").st_blocks


def test_checksums_of_holes_equal_checksums_of_zeros(tmp_path: Path) -> None:
    """checksums() answers hole chunks without reading them: the values must
    be those of the zeros they read as, beside written and zeroed chunks, at
    the head and at a snapshot."""
    import google_crc32c

    with BlockStore.create(tmp_path / "v", 64 * MIB, BS, durability="os") as s:
        s.write(3 * MIB, b"d" * MIB)
        s.write(10 * MIB, bytes(MIB))  # allocated zeros
        s.write(20 * MIB, b"e" * 2 * MIB)
        snap = s.create_snapshot("s")
        s.zero_range(20 * MIB, MIB)
        for sid in (None, snap.id):
            expect = [google_crc32c.value(s.read_at(sid, o, MIB)) for o in range(0, 64 * MIB, MIB)]
            assert s.checksums(0, 0, MIB, snapshot_id=sid) == expect
        odd = [google_crc32c.value(s.read(o, min(3 * MIB, 64 * MIB - o))) for o in range(0, 64 * MIB, 3 * MIB)]
        assert s.checksums(0, 0, 3 * MIB) == odd


def test_reads_as_zeros_is_never_wrong_and_sees_holes(tmp_path: Path) -> None:
    """``reads_as_zeros`` (what a resync uses to send a hole without reading
    it): over random writes, zero ranges and snapshots (seed 14), whenever it
    says True for a range at the head or any snapshot, that range reads as
    zeros there; and it does say True for never-written and zeroed ranges."""
    rng = random.Random(14)
    nblocks = 256
    with BlockStore.create(tmp_path / "v", nblocks * BS, BS, durability="os") as s:
        snaps: list[int] = []
        for step in range(120):
            op = rng.random()
            first = rng.randrange(nblocks)
            n = rng.randint(1, min(16, nblocks - first))
            if op < 0.45:
                s.write(first * BS, rng.randbytes(n * BS))
            elif op < 0.75:
                s.zero_range(first * BS, n * BS)
            elif op < 0.85 or not snaps:
                snaps.append(s.create_snapshot(f"s{step}").id)
            else:
                s.delete_snapshot(snaps.pop(rng.randrange(len(snaps))))
            for view in [None, *snaps]:
                for _ in range(4):
                    a = rng.randrange(nblocks)
                    m = rng.randint(1, nblocks - a)
                    if s.reads_as_zeros(view, a * BS, m * BS):
                        assert s.read_at(view, a * BS, m * BS) == bytes(m * BS), (step, view, a, m)
        s.zero_range(0, nblocks * BS)
        for sid in list(snaps):
            s.delete_snapshot(sid)
        assert s.reads_as_zeros(None, 0, nblocks * BS)
        sid = s.create_snapshot("after").id
        assert s.reads_as_zeros(sid, 0, nblocks * BS)
        s.write(3 * BS, b"x" * BS)  # after the snapshot: the head holds data there, the snapshot zeros
        assert not s.reads_as_zeros(None, 0, 8 * BS)
        assert s.reads_as_zeros(None, 4 * BS, 4 * BS)
        assert not s.reads_as_zeros(sid, 0, 8 * BS)  # not told without reading: the block changed since
        assert s.read_at(sid, 0, 8 * BS) == bytes(8 * BS)


def test_reads_as_zeros_of_a_snapshot_whose_data_was_zeroed_since(tmp_path: Path) -> None:
    """Data written, a snapshot taken, then the range zeroed at the head: the
    head reads as zeros (a hole) but the snapshot still holds the data, so
    for the snapshot the answer must be False."""
    with BlockStore.create(tmp_path / "v", 64 * BS, BS, durability="os") as s:
        s.write(0, b"d" * 8 * BS)
        sid = s.create_snapshot("before").id
        s.zero_range(0, 8 * BS)
        assert s.reads_as_zeros(None, 0, 8 * BS)
        assert not s.reads_as_zeros(sid, 0, 8 * BS)
        assert s.read_at(sid, 0, 8 * BS) == b"d" * 8 * BS
