"""Bad input: every case raises its specific BlockStoreError, names the bad value, and
changes nothing -- not the head, not the snapshots, not the diffs, not the files."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from syncrep.blockstore import (
    BlockStore,
    BlockStoreError,
    EmptyWriteError,
    Extent,
    InvalidDiffError,
    InvalidVolumeError,
    MisalignedError,
    OutOfRangeError,
    SnapshotExistsError,
    StoreClosedError,
    UnknownSnapshotError,
    VolumeBusyError,
)

BS = 4096
NBLOCKS = 32
SIZE = BS * NBLOCKS


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = BlockStore.create(tmp_path / "v1", SIZE, BS, durability="os", name="v1")
    s.write(0, b"\x01" * (4 * BS))
    s.create_snapshot("a")  # id 1
    s.write_batch([(2 * BS, b"\x02" * (4 * BS)), (20 * BS, b"\x03" * BS)])
    s.create_snapshot("b")  # id 2
    s.write(0, b"\x04" * BS)
    s.meta_set({"k": "v"})
    yield s
    s.close()


def fingerprint(s: BlockStore) -> dict[str, Any]:
    """Everything observable: head, snapshots, every diff, files and database rows."""
    snaps = s.list_snapshots()
    ids = [x.id for x in snaps]
    db = sqlite3.connect(f"file:{s.path / 'meta.sqlite3'}?mode=ro", uri=True)
    try:
        tables = {
            t: db.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
            for t in ("volume", "counters", "snapshots", "changes", "free_slots", "app_meta")
        }
    finally:
        db.close()
    return {
        "head": s.read(0, SIZE),
        "snaps": snaps,
        "at": {i: s.read_at(i, 0, SIZE) for i in ids},
        "diffs": {(a, b): s.diff(a, b) for a in ids for b in [*ids, None] if b is None or a <= b},
        "files": {n: hashlib.sha256((s.path / n).read_bytes()).hexdigest() for n in ("data", "cow")},
        "sizes": {n: (s.path / n).stat().st_size for n in ("data", "cow")},
        "tables": tables,
        "stats": s.stats(),
        "meta": s.meta_get("k"),
    }


CASES: list[tuple[str, Callable[[BlockStore], Any], type[BlockStoreError], list[str]]] = [
    ("write past end", lambda s: s.write(SIZE, b"x" * BS), OutOfRangeError, [str(SIZE)]),
    ("write negative offset", lambda s: s.write(-BS, b"x" * BS), OutOfRangeError, [str(-BS)]),
    ("write straddling end", lambda s: s.write(SIZE - BS, b"x" * 2 * BS), OutOfRangeError, [str(SIZE + BS)]),
    (
        "write misaligned offset",
        lambda s: s.write(4097, b"x" * BS),
        MisalignedError,
        ["4097", "4096", "'v1'"],
    ),
    ("write misaligned length", lambda s: s.write(0, b"x" * 1000), MisalignedError, ["1000", "4096"]),
    ("write zero length", lambda s: s.write(BS, b""), EmptyWriteError, [str(BS)]),
    (
        "batch with one bad write",
        lambda s: s.write_batch([(0, b"z" * BS), (5 * BS, b"z" * BS), (BS + 1, b"z" * BS)]),
        MisalignedError,
        [str(BS + 1)],
    ),
    (
        "batch with zero-length write",
        lambda s: s.write_batch([(0, b"z" * BS), (BS, b"")]),
        EmptyWriteError,
        [],
    ),
    ("read misaligned offset", lambda s: s.read(100, BS), MisalignedError, ["100"]),
    ("read misaligned length", lambda s: s.read(0, 100), MisalignedError, ["100"]),
    ("read past end", lambda s: s.read(SIZE - BS, 2 * BS), OutOfRangeError, [str(SIZE)]),
    ("read_at unknown snapshot", lambda s: s.read_at(99, 0, BS), UnknownSnapshotError, ["99"]),
    ("read_at misaligned", lambda s: s.read_at(1, 3, BS), MisalignedError, ["3"]),
    ("diff unknown base", lambda s: s.diff(99), UnknownSnapshotError, ["99"]),
    ("diff unknown target", lambda s: s.diff(1, 77), UnknownSnapshotError, ["77"]),
    ("diff base newer than target", lambda s: s.diff(2, 1), InvalidDiffError, ["2", "1", "newer"]),
    ("diff_bitmap base newer", lambda s: s.diff_bitmap(2, 1), InvalidDiffError, ["2"]),
    ("iter_diff unknown base", lambda s: s.iter_diff(99), UnknownSnapshotError, ["99"]),
    ("iter_diff base newer", lambda s: s.iter_diff(2, 1), InvalidDiffError, ["2"]),
    ("iter_diff bad chunk", lambda s: s.iter_diff(1, chunk_bytes=1000), MisalignedError, ["1000"]),
    ("bytes_written_since unknown", lambda s: s.bytes_written_since(99), UnknownSnapshotError, ["99"]),
    ("delete unknown snapshot", lambda s: s.delete_snapshot(99), UnknownSnapshotError, ["99"]),
    ("get unknown snapshot", lambda s: s.get_snapshot(99), UnknownSnapshotError, ["99"]),
    ("rollback unknown snapshot", lambda s: s.rollback_to(99), UnknownSnapshotError, ["99"]),
    ("duplicate snapshot name", lambda s: s.create_snapshot("a"), SnapshotExistsError, ["'a'", "1"]),
    ("checksums misaligned", lambda s: s.checksums(10, BS), MisalignedError, ["10"]),
    ("checksums bad chunk", lambda s: s.checksums(0, 0, 5000), MisalignedError, ["5000"]),
    ("checksums unknown snapshot", lambda s: s.checksums(snapshot_id=99), UnknownSnapshotError, ["99"]),
    (
        "iter_extents out of range",
        lambda s: s.iter_extents([Extent(SIZE - 10, 20)]),
        OutOfRangeError,
        [str(SIZE + 10)],
    ),
    (
        "iter_extents unknown snapshot",
        lambda s: s.iter_extents([Extent(0, 1)], 99),
        UnknownSnapshotError,
        ["99"],
    ),
]


@pytest.mark.parametrize(("label", "call", "exc", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_and_changes_nothing(
    store: BlockStore,
    label: str,
    call: Callable[[BlockStore], Any],
    exc: type[BlockStoreError],
    words: list[str],
) -> None:
    before = fingerprint(store)
    with pytest.raises(exc) as info:
        call(store)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{label}: message {msg!r} does not name {w!r}"
    assert fingerprint(store) == before, f"{label}: the store changed"
    # Also unchanged after a reopen (nothing half-written reached the disk).
    path = store.path
    store.close()
    with BlockStore.open(path, durability="os") as again:
        assert fingerprint(again) == before, f"{label}: the store changed on disk"


def test_bad_block_sizes_and_geometry(tmp_path: Path) -> None:
    cases: list[tuple[int, int, str]] = [
        (1 << 20, 1000, "1000"),  # not a power of two
        (1 << 20, 256, "256"),  # below 512
        (4 << 20, 2 << 20, "2097152"),  # above 1 MiB
        (1 << 20, 0, "0"),
        (10_000, 4096, "10000"),  # size not a multiple of the block size
        (0, 4096, "0"),
        (-4096, 4096, "-4096"),
        ((1 << 32) * 512 + 512, 512, str((1 << 32) + 1)),  # more than 2**32 blocks
    ]
    for size, bs, word in cases:
        path = tmp_path / f"v-{size}-{bs}"
        with pytest.raises(InvalidVolumeError) as info:
            BlockStore.create(path, size, bs)
        assert word in str(info.value), (size, bs, str(info.value))
        assert not path.exists(), f"create({size}, {bs}) left {path} behind"


def test_max_blocks_is_accepted(tmp_path: Path) -> None:
    with BlockStore.create(tmp_path / "max", (1 << 32) * 512, 512, durability="os") as s:
        assert s.num_blocks == 1 << 32
        s.write(s.size_bytes - 512, b"e" * 512)
        snap = s.create_snapshot("x")
        s.write(s.size_bytes - 512, b"f" * 512)
        assert s.diff(snap.id) == [Extent(s.size_bytes - 512, 512)]
        assert s.read_at(snap.id, s.size_bytes - 512, 512) == b"e" * 512


def test_create_over_existing_volume(store: BlockStore) -> None:
    before = fingerprint(store)
    with pytest.raises(InvalidVolumeError, match="already holds a volume"):
        BlockStore.create(store.path, SIZE * 2, 512)
    assert fingerprint(store) == before


def test_create_on_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_bytes(b"hello")
    with pytest.raises(InvalidVolumeError, match="not a directory"):
        BlockStore.create(f, SIZE)
    assert f.read_bytes() == b"hello"


def test_open_missing_and_busy(tmp_path: Path, store: BlockStore) -> None:
    with pytest.raises(InvalidVolumeError, match="nope"):
        BlockStore.open(tmp_path / "nope")
    assert not BlockStore.exists(tmp_path / "nope")
    with pytest.raises(VolumeBusyError):
        BlockStore.open(store.path)
    assert store.read(0, BS) == b"\x04" * BS  # the failed open did not disturb the open store


def test_bad_durability_and_closed(tmp_path: Path) -> None:
    with pytest.raises(BlockStoreError, match="fast"):
        BlockStore.create(tmp_path / "d", SIZE, durability="fast")  # type: ignore[arg-type]
    assert not (tmp_path / "d").exists()
    s = BlockStore.create(tmp_path / "c", SIZE)
    s.close()
    with pytest.raises(StoreClosedError):
        s.read(0, BS)
    with pytest.raises(StoreClosedError):
        s.write(0, b"x" * BS)


def test_type_errors_are_blockstore_errors(store: BlockStore) -> None:
    before = fingerprint(store)
    for call in (
        lambda: store.write(0, "text" * 1024),  # type: ignore[arg-type]
        lambda: store.write("0", b"x" * BS),  # type: ignore[arg-type]
        lambda: store.read_at("1", 0, BS),  # type: ignore[arg-type]
        lambda: store.create_snapshot(""),
        lambda: store.meta_set({"k": 5}),  # type: ignore[dict-item]
        lambda: store.write_batch([(0,)]),  # type: ignore[list-item]
    ):
        with pytest.raises(BlockStoreError):
            call()
    assert fingerprint(store) == before
