"""Basic behaviour: sparse huge volumes, slot reuse, persistence, durability modes,
streaming helpers, application metadata and concurrent readers."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import google_crc32c
import pytest
from pyroaring import BitMap

from syncrep.blockstore import (
    BlockStore,
    Extent,
    UnknownSnapshotError,
    extents_to_blocks,
    merge_extents,
)

BS = 4096
MIB = 1 << 20
TIB = 1 << 40


def disk_usage(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.iterdir() if p.is_file())


def test_one_tib_sparse_volume(tmp_path: Path) -> None:
    path = tmp_path / "big"
    with BlockStore.create(path, TIB, BS, durability="sync", name="big") as s:
        assert s.num_blocks == TIB // BS and s.size_bytes == TIB
        assert (path / "data").stat().st_size == TIB
        assert disk_usage(path) < 1 << 20, disk_usage(path)
        s.write(TIB - BS, b"z" * BS)
        s.write(0, b"a" * BS)
        snap = s.create_snapshot("s")
        s.write_batch([(TIB // 2, b"m" * 2 * BS), (TIB - BS, b"y" * BS)])
        assert s.diff(snap.id) == [Extent(TIB // 2, 2 * BS), Extent(TIB - BS, BS)]
        assert s.read_at(snap.id, TIB - BS, BS) == b"z" * BS
        assert s.read_at(snap.id, TIB // 2, BS) == bytes(BS)
        assert s.read(TIB - BS, BS) == b"y" * BS
        assert s.read(BS * 12345, BS) == bytes(BS)
        assert disk_usage(path) < 4 << 20, disk_usage(path)
    with BlockStore.open(path, durability="os") as s:
        assert s.diff(snap.id) == [Extent(TIB // 2, 2 * BS), Extent(TIB - BS, BS)]


def test_snapshot_reads_and_diffs(tmp_path: Path) -> None:
    with BlockStore.create(tmp_path / "v", 64 * BS, BS, durability="os") as s:
        s.write(0, b"A" * 8 * BS)
        s1 = s.create_snapshot("one")
        s.write(2 * BS, b"B" * 2 * BS)
        s2 = s.create_snapshot("two")
        s.write(3 * BS, b"C" * 3 * BS)
        s.write(3 * BS, b"C" * BS)  # same bytes again: still one changed block
        assert s.read(0, 8 * BS) == b"A" * 2 * BS + b"B" * BS + b"C" * 3 * BS + b"A" * 2 * BS
        assert s.read_at(s1.id, 0, 8 * BS) == b"A" * 8 * BS
        assert s.read_at(s2.id, 0, 8 * BS) == b"A" * 2 * BS + b"B" * 2 * BS + b"A" * 4 * BS
        assert s.diff(s1.id, s2.id) == [Extent(2 * BS, 2 * BS)]
        assert s.diff(s2.id) == [Extent(3 * BS, 3 * BS)]
        assert s.diff(s1.id) == [Extent(2 * BS, 4 * BS)]
        assert s.diff(s1.id, s1.id) == []
        assert s.bytes_written_since(s1.id) == 4 * BS
        assert list(s.diff_bitmap(s1.id)) == [2, 3, 4, 5]
        assert [x.name for x in s.list_snapshots()] == ["one", "two"]
        assert s.find_snapshot("two") == s2 and s.find_snapshot("zzz") is None
        assert s.get_snapshot(s1.id) == s1
        # Deleting the middle snapshot merges its interval into the previous one.
        s.delete_snapshot(s2.id)
        assert s.diff(s1.id) == [Extent(2 * BS, 4 * BS)]
        assert s.read_at(s1.id, 0, 8 * BS) == b"A" * 8 * BS
        s3 = s.create_snapshot("two")  # the name is free again; the id is new
        assert s3.id == s2.id + 1


def test_delete_snapshot_frees_and_reuses_slots(tmp_path: Path) -> None:
    with BlockStore.create(tmp_path / "v", 256 * BS, BS, durability="os") as s:
        s.write(0, os.urandom(100 * BS))
        snap = s.create_snapshot("s")
        s.write(0, os.urandom(100 * BS))
        st = s.stats()
        assert st["cow_slots_used"] == 100 and st["cow_slots_total"] == 100
        cow_blocks = (s.path / "cow").stat().st_blocks
        s.delete_snapshot(snap.id)
        st = s.stats()
        assert st["cow_slots_used"] == 0 and st["cow_slots_free"] == 100 and st["tracked_blocks"] == 0
        assert (s.path / "cow").stat().st_blocks < cow_blocks  # hole punched (ext4/xfs/tmpfs)
        snap = s.create_snapshot("t")
        s.write(0, os.urandom(60 * BS))
        st = s.stats()
        assert st["cow_slots_used"] == 60 and st["cow_slots_total"] == 100, st  # reused, file did not grow
        before = s.read_at(snap.id, 0, 100 * BS)
        s.close()
        s2 = BlockStore.open(s.path, durability="os")
        assert s2.stats() == st
        assert s2.read_at(snap.id, 0, 100 * BS) == before
        s2.close()


def test_zero_blocks_need_no_copy(tmp_path: Path) -> None:
    with BlockStore.create(tmp_path / "v", 64 * BS, BS, durability="os") as s:
        snap = s.create_snapshot("s")
        s.write(0, b"q" * 32 * BS)
        assert s.stats()["cow_slots_total"] == 0
        assert s.read_at(snap.id, 0, 32 * BS) == bytes(32 * BS)
        assert s.diff(snap.id) == [Extent(0, 32 * BS)]


def test_reopen_persistence(tmp_path: Path) -> None:
    path = tmp_path / "v"
    with BlockStore.create(path, 32 * BS, BS, name="vol") as s:
        s.write(BS, b"1" * BS)
        a = s.create_snapshot("a")
        s.write(BS, b"2" * BS)
        b = s.create_snapshot("b")
        s.delete_snapshot(b.id)
        s.write(5 * BS, b"3" * BS)
        s.meta_set({"role": "primary", "epoch": "7"})
    assert BlockStore.exists(path)
    with BlockStore.open(path) as s:
        assert (s.name, s.size_bytes, s.block_size, s.num_blocks) == ("vol", 32 * BS, BS, 32)
        assert s.list_snapshots() == [a]
        assert s.read(BS, BS) == b"2" * BS and s.read_at(a.id, BS, BS) == b"1" * BS
        assert s.diff(a.id) == [Extent(BS, BS), Extent(5 * BS, BS)]
        assert s.meta_get("role") == "primary" and s.meta_get("epoch") == "7"
        s.meta_set({"role": None, "epoch": "8"})
        assert s.meta_get("role") is None and s.meta_get("epoch") == "8"
        assert s.create_snapshot("c").id == b.id + 1  # ids are never reused, even across reopen


def test_durability_os_and_flush(tmp_path: Path) -> None:
    path = tmp_path / "v"
    with BlockStore.create(path, 16 * BS, BS, durability="os") as s:
        assert s.durability == "os"
        assert s._conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        snap = s.create_snapshot("s")
        s.write(0, b"o" * BS)
        s.meta_set({"x": "y"})
        s.flush()
        assert s.diff(snap.id) == [Extent(0, BS)]
    with BlockStore.open(path, durability="sync") as s:
        assert s._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert s._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s.read(0, BS) == b"o" * BS and s.meta_get("x") == "y"


def test_rollback_to(tmp_path: Path) -> None:
    with BlockStore.create(tmp_path / "v", 16 * BS, BS, durability="os") as s:
        s.write(0, b"a" * 4 * BS)
        s1 = s.create_snapshot("s1")
        s.write(BS, b"b" * BS)
        s2 = s.create_snapshot("s2")
        s.write(8 * BS, b"c" * BS)
        assert s.rollback_to(s1.id) == 2 * BS
        assert [x.id for x in s.list_snapshots()] == [s1.id]
        with pytest.raises(UnknownSnapshotError):
            s.read_at(s2.id, 0, BS)
        assert s.read(0, 16 * BS) == b"a" * 4 * BS + bytes(12 * BS)
        assert s.diff(s1.id) == [] and s.stats()["cow_slots_used"] == 0
        s.write(2 * BS, b"d" * BS)
        assert s.diff(s1.id) == [Extent(2 * BS, BS)]
        assert s.read_at(s1.id, 2 * BS, BS) == b"a" * BS


def test_iter_extents_and_iter_diff_chunking(tmp_path: Path) -> None:
    with BlockStore.create(tmp_path / "v", 64 * BS, BS, durability="os") as s:
        content = os.urandom(64 * BS)
        s.write(0, content)
        snap = s.create_snapshot("s")
        s.write(10 * BS, b"n" * 7 * BS)
        pieces = list(
            s.iter_extents([Extent(5, 10), Extent(BS * 3 + 1, 2 * BS), Extent(0, 1)], chunk_bytes=2 * BS)
        )
        assert [(o, len(d)) for o, d in pieces] == [(0, BS), (3 * BS, 2 * BS), (5 * BS, BS)]
        assert b"".join(d for _, d in pieces) == content[:BS] + content[3 * BS : 6 * BS]
        old = list(s.iter_extents([Extent(10 * BS, 7 * BS)], snap.id, chunk_bytes=3 * BS))
        assert [o for o, _ in old] == [10 * BS, 13 * BS, 16 * BS]
        assert b"".join(d for _, d in old) == content[10 * BS : 17 * BS]
        new = list(s.iter_diff(snap.id, None, chunk_bytes=4 * BS))
        assert [(o, len(d)) for o, d in new] == [(10 * BS, 4 * BS), (14 * BS, 3 * BS)]
        assert b"".join(d for _, d in new) == b"n" * 7 * BS


def test_checksums(tmp_path: Path) -> None:
    with BlockStore.create(tmp_path / "v", 40 * BS, BS, durability="os") as s:
        data = os.urandom(40 * BS)
        s.write(0, data)
        snap = s.create_snapshot("s")
        s.write(0, b"x" * BS)
        chunk = 16 * BS
        want = [google_crc32c.value(data[i : i + chunk]) for i in range(0, len(data), chunk)]
        assert s.checksums(chunk_bytes=chunk, snapshot_id=snap.id) == want
        assert s.checksums(0, 0, chunk)[1:] == want[1:]
        assert s.checksums(0, 0, chunk)[0] != want[0]
        assert s.checksums(BS * 8, BS * 8, BS * 8) == [google_crc32c.value(data[BS * 8 : BS * 16])]


def test_extent_helpers() -> None:
    assert merge_extents([Extent(10, 5), Extent(0, 10), Extent(20, 0), Extent(12, 10), Extent(40, 1)]) == [
        Extent(0, 22),
        Extent(40, 1),
    ]
    assert Extent(3, 4).end == 7
    assert extents_to_blocks([Extent(100, 10), Extent(4095, 2), Extent(BS * 10, BS)], BS) == BitMap(
        [0, 1, 10]
    )


def test_concurrent_readers_see_consistent_snapshots(tmp_path: Path) -> None:
    with BlockStore.create(tmp_path / "v", 64 * BS, BS, durability="os") as s:
        base = os.urandom(64 * BS)
        s.write(0, base)
        snap = s.create_snapshot("s")
        errors: list[str] = []
        stop = threading.Event()

        def reader() -> None:
            while not stop.is_set():
                if s.read_at(snap.id, 0, 64 * BS) != base:
                    errors.append("snapshot changed under a concurrent writer")
                    return

        threads = [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        for i in range(200):
            s.write((i * 7 % 64) * BS, os.urandom(BS))
        stop.set()
        for t in threads:
            t.join()
        assert not errors


def test_rollback_keeps_volume_sparse(tmp_path: Path) -> None:
    with BlockStore.create(tmp_path / "v", 64 * MIB, BS, durability="sync") as s:
        snap = s.create_snapshot("empty")
        s.write(0, os.urandom(8 * MIB))
        assert (s.path / "data").stat().st_blocks * 512 >= 8 * MIB
        assert s.rollback_to(snap.id) == 8 * MIB
        assert s.read(0, 8 * MIB) == bytes(8 * MIB)
        assert (s.path / "data").stat().st_blocks * 512 < MIB  # holes again (ext4/xfs/tmpfs)
