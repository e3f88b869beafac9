"""Block store: a volume of blocks with O(1) snapshots and O(changed) diffs.

Its size is set at create and can only grow (``grow``, issue 13: the data file
is extended, the descriptor's size updated; the new blocks read as zeros).

On-disk layout (one directory per volume)
-----------------------------------------
``data``
    The live head: a sparse file of ``size_bytes`` (``os.ftruncate``), written with
    ``os.pwrite`` and read with ``os.pread``. Unwritten blocks read as zeros.
``cow``
    Copy-on-write slots, one block each: the content a block had when a snapshot
    was taken, saved just before the block is first overwritten after it. Freed slots
    are reused and their space released with ``fallocate(PUNCH_HOLE)`` where supported.
``meta.sqlite3``
    SQLite (WAL mode) holding the volume descriptor, the snapshot catalog, the
    change sets, the slot allocator and the application key/value table ``app_meta``.

Change tracking
---------------
Snapshots S_k have increasing ids that are never reused. "Interval k" runs from S_k to
the next live snapshot (the newest interval runs to the live head). ``C_k`` is the set
of blocks first written during interval k; it is kept as rows ``changes(snap_id, block,
slot)`` and in memory as one ``pyroaring.BitMap`` per live snapshot (loaded at open, in
time proportional to the number of rows). When block b is first written in the newest
interval n, its old content is copied to a free ``cow`` slot (or recorded as slot NULL
when it was all zeros) and the row (n, b, slot) is committed *before* the new data is
written. The content of b at S_j is the copy of the smallest live k >= j with b in C_k,
else the head. ``diff(a, b)`` is the union of C_k for live a <= k < b. Deleting S_j
merges C_j into the previous live snapshot (copies it already has are freed), or frees
it all when there is none. With no snapshot at all, nothing is tracked.

Zeroing (``zero_range``, TRIM and WRITE_ZEROES, issue 14) is a write of zeros
as far as snapshots and diffs go, but done as a metadata operation: the range
is punched out of the data file (the volume stays thin), and only the blocks of
it that hold data at the head get the copy-on-write treatment first (holes
already read as zeros: zeroing them changes nothing, so they are not tracked).

Durability contract
-------------------
* ``durability="sync"``: when ``write``/``write_batch``/``zero_range`` (and every other mutating call)
  returns, its data and its change tracking are on stable storage (copies fdatasync'd,
  SQLite ``synchronous=FULL`` commit, data fdatasync'd): it survives SIGKILL, OS crash
  and power loss. One ``write_batch`` is one group commit: at most one sync per file.
* ``durability="os"``: when a call returns, its data is in the OS page cache and its
  tracking is committed to SQLite's WAL (``synchronous=NORMAL``): it survives the
  process being killed at any moment (SIGKILL), not an OS crash or power loss.
  ``flush()`` is the barrier that makes everything before it durable.
* Ordering (both modes): the old block content is saved and the change row committed
  before the new data is written, so any block whose new data reached the file -- even
  from a write that never returned, which may have landed fully, partly (torn) or not
  at all -- is covered by the next ``diff`` from the newest snapshot, and every
  snapshot still reads back exactly as it was taken.

Threads: every operation holds one ``threading.RLock`` while it touches the files or the
database; streaming readers (``iter_diff``, ``iter_extents``, ``checksums``) take it per
chunk, so they see writes that land between chunks and raise UnknownSnapshotError if
the snapshot they read is deleted meanwhile.

Memory: data is never buffered beyond one caller-supplied write batch plus
``cow_chunk_bytes`` (copying) or ``chunk_bytes`` (streaming reads, diffs, checksums).
Metadata in memory is proportional to the number of tracked blocks, never to the
volume size.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import functools
import heapq
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import google_crc32c
from pyroaring import BitMap

from ._fileio import _HolePuncher, pread_full, pwrite_full
from .errors import (
    BlockStoreError,
    EmptyWriteError,
    InvalidArgumentError,
    InvalidDiffError,
    InvalidVolumeError,
    MisalignedError,
    OutOfRangeError,
    SnapshotExistsError,
    StoreClosedError,
    UnknownSnapshotError,
    VolumeBusyError,
)
from .extents import Extent, block_runs, blocks_to_extents, merge_extents

__all__ = ["BlockStore", "Durability", "SnapshotInfo"]

Durability = Literal["sync", "os"]

FORMAT_VERSION = 1
MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 1 << 20
MAX_BLOCKS = 1 << 32
DEFAULT_CHUNK = 1 << 20

DATA_FILE = "data"
COW_FILE = "cow"
META_FILE = "meta.sqlite3"
_META_TMP = "meta.sqlite3.tmp"

_SCHEMA = """
CREATE TABLE volume (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    format INTEGER NOT NULL,
    name TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    block_size INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE counters (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE snapshots (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL
);
CREATE TABLE changes (
    snap_id INTEGER NOT NULL,
    block INTEGER NOT NULL,
    slot INTEGER,
    PRIMARY KEY (snap_id, block)
) WITHOUT ROWID;
CREATE TABLE free_slots (slot INTEGER PRIMARY KEY);
CREATE TABLE app_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
INSERT INTO counters (key, value) VALUES ('next_slot', 0), ('next_snap_id', 1);
"""


@dataclass(frozen=True)
class SnapshotInfo:
    id: int
    name: str
    created_at: float


@functools.lru_cache(maxsize=16)
def zeros(n: int) -> bytes:
    """A shared all-zero buffer of ``n`` bytes (16 sizes cached): to compare
    with (one memcmp tells a zero chunk) or to write."""
    return bytes(n)


def _data_segments(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The ``[a, b)`` byte ranges of ``[start, end)`` that hold data in file
    ``fd`` (``SEEK_DATA``/``SEEK_HOLE``); where the filesystem cannot tell,
    the whole range (everything counts as data: slower, never wrong)."""
    pos = start
    while pos < end:
        try:
            d = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                return
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield pos, end
                return
            raise
        if d >= end:
            return
        h = os.lseek(fd, d, os.SEEK_HOLE)
        yield d, min(h, end)
        pos = h


def _is_hole(fd: int, offset: int, length: int) -> bool:
    """True when ``[offset, offset+length)`` of file ``fd`` holds no data
    (``SEEK_DATA``); False when it may, or the filesystem cannot tell."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
    except OSError as e:
        if e.errno == errno.ENXIO:  # no data at or after offset
            return True
        return False


@functools.lru_cache(maxsize=16)
def zeros_crc32c(n: int) -> int:
    """crc32c of ``n`` zero bytes (16 sizes cached)."""
    return int(google_crc32c.value(zeros(n)))


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_durability(durability: object) -> Durability:
    if durability not in ("sync", "os"):
        raise InvalidArgumentError(f"durability {durability!r} is not one of 'sync', 'os'")
    return durability  # type: ignore[return-value]


def _as_bytes_view(data: object, what: str) -> memoryview:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidArgumentError(
            f"{what}: data of type {type(data).__name__} is not bytes, bytearray or memoryview"
        )
    mv = memoryview(data)
    if not mv.c_contiguous:
        raise InvalidArgumentError(f"{what}: memoryview is not C-contiguous")
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


class _SlotWriter:
    """Buffers COW copies and writes runs of consecutive slots with one pwrite each."""

    def __init__(self, fd: int, block_size: int, max_bytes: int) -> None:
        self.fd = fd
        self.bs = block_size
        self.max_bytes = max(max_bytes, block_size)
        self.start = -1
        self.parts: list[bytes] = []
        self.wrote = False

    def add(self, slot: int, block: bytes) -> None:
        if self.parts and (
            slot != self.start + len(self.parts) or len(self.parts) * self.bs >= self.max_bytes
        ):
            self.flush()
        if not self.parts:
            self.start = slot
        self.parts.append(block)

    def flush(self) -> None:
        if self.parts:
            pwrite_full(self.fd, b"".join(self.parts), self.start * self.bs)
            self.parts = []
            self.wrote = True


class BlockStore:
    """A volume of ``num_blocks`` blocks of ``block_size`` bytes with snapshots and diffs.

    Build one with :meth:`create` or :meth:`open`, not with the constructor. See the
    module docstring for the layout and the durability contract.
    """

    #: Most old-block data held in memory at once while copying blocks on write.
    cow_chunk_bytes: int = DEFAULT_CHUNK

    path: Path
    name: str
    size_bytes: int
    block_size: int
    num_blocks: int
    durability: Durability

    def __init__(
        self,
        path: Path,
        *,
        name: str,
        size_bytes: int,
        block_size: int,
        durability: Durability,
        conn: sqlite3.Connection,
        data_fd: int,
        cow_fd: int,
    ) -> None:
        self.path = path
        self.name = name
        self.size_bytes = size_bytes
        self.block_size = block_size
        self.num_blocks = size_bytes // block_size
        self.durability = durability
        self._conn = conn
        self._data_fd = data_fd
        self._cow_fd = cow_fd
        self._lock = threading.RLock()
        self._closed = False
        self._puncher = _HolePuncher()
        self._zero_block = bytes(block_size)
        # In-memory mirror of the database (rebuilt by _load_state).
        self._ids: list[int] = []
        self._snaps: dict[int, SnapshotInfo] = {}
        self._changes: dict[int, Any] = {}  # snap id -> BitMap
        self._free: list[int] = []  # min-heap of free cow slots
        self._next_slot = 0
        self._next_snap_id = 1

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        size_bytes: int,
        block_size: int = 4096,
        *,
        durability: Durability = "sync",
        name: str = "",
    ) -> BlockStore:
        """Create a volume in directory ``path`` (created if needed) and open it.

        ``name`` defaults to the directory name. Raises InvalidVolumeError for a bad
        geometry or when ``path`` already holds a volume; nothing is created then.
        """
        p = Path(path)
        durability = _check_durability(durability)
        if not isinstance(name, str):
            raise InvalidArgumentError(f"volume name {name!r} is not a string")
        vol_name = name or p.name
        if not _is_int(block_size):
            raise InvalidVolumeError(f"block size {block_size!r} is not an integer")
        if block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
            raise InvalidVolumeError(
                f"block size {block_size} of volume {vol_name!r} is not a power of two "
                f"between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE} bytes"
            )
        if not _is_int(size_bytes) or size_bytes <= 0:
            raise InvalidVolumeError(
                f"volume size {size_bytes!r} of volume {vol_name!r} is not a positive integer"
            )
        if size_bytes % block_size:
            raise InvalidVolumeError(
                f"volume size {size_bytes} of volume {vol_name!r} is not a multiple of the "
                f"{block_size}-byte block size"
            )
        if size_bytes // block_size > MAX_BLOCKS:
            raise InvalidVolumeError(
                f"volume size {size_bytes} of volume {vol_name!r} is {size_bytes // block_size} blocks of "
                f"{block_size} bytes, more than the limit of {MAX_BLOCKS} (2**32) blocks"
            )
        if p.exists() and not p.is_dir():
            raise InvalidVolumeError(f"cannot create volume {vol_name!r}: {p} exists and is not a directory")
        if cls.exists(p):
            raise InvalidVolumeError(f"cannot create volume {vol_name!r}: {p} already holds a volume")

        p.mkdir(parents=True, exist_ok=True)
        # Leftovers of a create that crashed before its final rename are ours to replace.
        for leftover in (_META_TMP, _META_TMP + "-wal", _META_TMP + "-shm", _META_TMP + "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p / leftover)
        for fname, size in ((DATA_FILE, size_bytes), (COW_FILE, 0)):
            fd = os.open(p / fname, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
            finally:
                os.close(fd)
        tmp = p / _META_TMP
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript("BEGIN;" + _SCHEMA + "COMMIT;")
            conn.execute(
                "INSERT INTO volume (id, format, name, size_bytes, block_size, created_at) VALUES (1, ?, ?, ?, ?, ?)",
                (FORMAT_VERSION, vol_name, size_bytes, block_size, time.time()),
            )
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
        os.replace(tmp, p / META_FILE)
        dfd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return cls.open(p, durability=durability)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, durability: Durability = "sync") -> BlockStore:
        """Open an existing volume. Missing or corrupt -> InvalidVolumeError;
        already open (here or in another process) -> VolumeBusyError."""
        p = Path(path)
        durability = _check_durability(durability)
        meta = p / META_FILE
        if not meta.is_file():
            raise InvalidVolumeError(f"no volume at {p}: {meta.name} not found")
        try:
            data_fd = os.open(p / DATA_FILE, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InvalidVolumeError(f"volume at {p} is damaged: its {DATA_FILE} file is missing") from None
        fds = [data_fd]
        conn: sqlite3.Connection | None = None
        try:
            try:
                fcntl.flock(data_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise VolumeBusyError(f"volume at {p} is already open (in this or another process)") from None
            cow_fd = os.open(p / COW_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fds.append(cow_fd)
            conn = sqlite3.connect(meta, isolation_level=None, check_same_thread=False)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(f"PRAGMA synchronous={'FULL' if durability == 'sync' else 'NORMAL'}")
                row = conn.execute(
                    "SELECT format, name, size_bytes, block_size FROM volume WHERE id = 1"
                ).fetchone()
            except sqlite3.DatabaseError as exc:
                raise InvalidVolumeError(f"volume at {p} is damaged: {meta.name}: {exc}") from None
            if row is None:
                raise InvalidVolumeError(f"volume at {p} is damaged: no volume descriptor")
            fmt, vol_name, size_bytes, block_size = row
            if fmt != FORMAT_VERSION:
                raise InvalidVolumeError(
                    f"volume at {p} has format {fmt}, this code reads format {FORMAT_VERSION}"
                )
            actual = os.fstat(data_fd).st_size
            if actual > size_bytes and actual % block_size == 0:
                # A grow that crashed between extending the data file and
                # committing the new size (``grow``): the extension was never
                # part of the volume (nothing is written past the descriptor's
                # size), so it is undone and the volume keeps its old size.
                os.ftruncate(data_fd, size_bytes)
                os.fsync(data_fd)
                actual = size_bytes
            if actual != size_bytes:
                raise InvalidVolumeError(
                    f"volume at {p} is damaged: {DATA_FILE} is {actual} bytes, descriptor says {size_bytes}"
                )
            store = cls(
                p,
                name=vol_name,
                size_bytes=size_bytes,
                block_size=block_size,
                durability=durability,
                conn=conn,
                data_fd=data_fd,
                cow_fd=cow_fd,
            )
            store._load_state()
            return store
        except BaseException:
            if conn is not None:
                conn.close()
            for fd in fds:
                os.close(fd)
            raise

    @staticmethod
    def exists(path: str | os.PathLike[str]) -> bool:
        """True if ``path`` holds a (completely created) volume."""
        return (Path(path) / META_FILE).is_file()

    def close(self) -> None:
        """Close the files and the database. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._conn.close()
            finally:
                os.close(self._cow_fd)
                os.close(self._data_fd)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> BlockStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"BlockStore(path={str(self.path)!r}, name={self.name!r}, size_bytes={self.size_bytes}, "
            f"block_size={self.block_size}, durability={self.durability!r}{', closed' if self._closed else ''})"
        )

    # ------------------------------------------------------------------ internal state

    def _load_state(self) -> None:
        conn = self._conn
        snaps = [
            SnapshotInfo(int(i), str(n), float(t))
            for i, n, t in conn.execute("SELECT id, name, created_at FROM snapshots ORDER BY id")
        ]
        changes: dict[int, Any] = {}
        for s in snaps:
            bm = BitMap()
            cur = conn.execute("SELECT block FROM changes WHERE snap_id = ? ORDER BY block", (s.id,))
            while rows := cur.fetchmany(1 << 16):
                bm |= BitMap([r[0] for r in rows])
            changes[s.id] = bm
        free = [r[0] for r in conn.execute("SELECT slot FROM free_slots")]
        heapq.heapify(free)
        counters = dict(conn.execute("SELECT key, value FROM counters").fetchall())
        self._ids = [s.id for s in snaps]
        self._snaps = {s.id: s for s in snaps}
        self._changes = changes
        self._free = free
        self._next_slot = int(counters["next_slot"])
        self._next_snap_id = int(counters["next_snap_id"])

    def _recover_after_error(self) -> None:
        """Re-sync memory with the database after a failed mutation."""
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            self._load_state()
        except Exception:  # database unusable: refuse further use rather than guess
            self._closed = True
            with contextlib.suppress(Exception):
                self._conn.close()
            os.close(self._cow_fd)
            os.close(self._data_fd)

    @contextlib.contextmanager
    def _mutation(self) -> Iterator[None]:
        with self._lock:
            self._check_open()
            try:
                yield
            except BlockStoreError:
                raise  # argument/state errors are raised before any side effect
            except BaseException:
                self._recover_after_error()
                raise

    @contextlib.contextmanager
    def _txn(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"volume {self.name!r} at {self.path} is closed")

    def _alloc_slot(self, used_free: list[int]) -> int:
        if self._free:
            slot = heapq.heappop(self._free)
            used_free.append(slot)
            return slot
        slot = self._next_slot
        self._next_slot += 1
        return slot

    def _release_slots(self, slots: list[int]) -> None:
        """After the commit that freed ``slots``: make them reusable and punch their space."""
        if not slots:
            return
        slots.sort()
        for s in slots:
            heapq.heappush(self._free, s)
        bs = self.block_size
        for first, count in block_runs(slots):
            self._puncher.punch(self._cow_fd, first * bs, count * bs)

    # ------------------------------------------------------------------ validation

    def _check_span(self, what: str, offset: object, length: object) -> tuple[int, int]:
        bs = self.block_size
        if not _is_int(offset):
            raise InvalidArgumentError(f"{what} offset {offset!r} is not an integer")
        if not _is_int(length):
            raise InvalidArgumentError(f"{what} length {length!r} is not an integer")
        assert isinstance(offset, int) and isinstance(length, int)
        if offset < 0 or (offset >= self.size_bytes and not (offset == self.size_bytes and length == 0)):
            raise OutOfRangeError(
                f"{what} at offset {offset} is outside volume {self.name!r} of {self.size_bytes} bytes"
            )
        if length < 0:
            raise OutOfRangeError(f"{what} length {length} at offset {offset} is negative")
        if offset % bs:
            raise MisalignedError(
                f"{what} at offset {offset} is not aligned to the {bs}-byte block size of volume {self.name!r}"
            )
        if length % bs:
            raise MisalignedError(
                f"{what} length {length} at offset {offset} is not a whole number of {bs}-byte blocks "
                f"of volume {self.name!r}"
            )
        if offset + length > self.size_bytes:
            raise OutOfRangeError(
                f"{what} of {length} bytes at offset {offset} ends at {offset + length}, past the end of "
                f"volume {self.name!r} ({self.size_bytes} bytes)"
            )
        return offset, length

    def _check_snapshot(self, snapshot_id: object, what: str = "snapshot") -> int:
        if not _is_int(snapshot_id):
            raise InvalidArgumentError(f"{what} id {snapshot_id!r} is not an integer")
        assert isinstance(snapshot_id, int)
        if snapshot_id not in self._snaps:
            raise UnknownSnapshotError(f"{what} {snapshot_id} does not exist in volume {self.name!r}")
        return snapshot_id

    def _check_chunk(self, chunk_bytes: object) -> int:
        bs = self.block_size
        if not _is_int(chunk_bytes) or chunk_bytes <= 0:  # type: ignore[operator]
            raise InvalidArgumentError(f"chunk_bytes {chunk_bytes!r} is not a positive integer")
        assert isinstance(chunk_bytes, int)
        if chunk_bytes % bs:
            raise MisalignedError(
                f"chunk_bytes {chunk_bytes} is not a whole number of {bs}-byte blocks of volume {self.name!r}"
            )
        return chunk_bytes

    def _check_diff(self, base_id: object, target_id: object) -> tuple[int, int | None]:
        base = self._check_snapshot(base_id, "diff base snapshot")
        if target_id is None:
            return base, None
        target = self._check_snapshot(target_id, "diff target snapshot")
        if base > target:
            raise InvalidDiffError(
                f"diff base snapshot {base} is newer than target snapshot {target} of volume {self.name!r}"
            )
        return base, target

    # ------------------------------------------------------------------ writes

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write whole blocks at ``offset`` (block-aligned)."""
        self.write_batch([(offset, data)])

    def write_batch(self, writes: Sequence[tuple[int, bytes | bytearray | memoryview]]) -> None:
        """Validate every write, then apply them in order (later overlapping writes win)
        with one group commit. A bad write raises before anything is applied."""
        items: list[tuple[int, memoryview]] = []
        for i, item in enumerate(writes):
            try:
                offset, data = item
            except (TypeError, ValueError):
                raise InvalidArgumentError(f"write #{i} {item!r:.60} is not an (offset, data) pair") from None
            mv = _as_bytes_view(data, f"write #{i} at offset {offset!r}")
            if len(mv) == 0:
                raise EmptyWriteError(f"write at offset {offset!r} carries no data (zero-length write)")
            self._check_span("write", offset, len(mv))
            items.append((offset, mv))
        if not items:
            return
        with self._mutation():
            self._apply_writes(items)

    def _apply_writes(self, items: list[tuple[int, memoryview]]) -> None:
        bs = self.block_size
        if self._ids:
            newest = self._ids[-1]
            cn = self._changes[newest]
            touched = BitMap()
            for off, mv in items:
                touched.add_range(off // bs, (off + len(mv)) // bs)
            new = touched - cn
            if new:
                self._copy_on_write(newest, new)
                cn |= new
        for off, mv in items:
            pwrite_full(self._data_fd, mv, off)
        if self.durability == "sync":
            os.fdatasync(self._data_fd)

    def zero_range(self, offset: int, length: int) -> None:
        """Make ``[offset, offset+length)`` (block-aligned) read as zeros, as a
        metadata operation where it can be one (issue 14, TRIM/WRITE_ZEROES):

        * no live snapshot (nothing tracked): the blocks are punched out of the
          data file (``fallocate(PUNCH_HOLE|KEEP_SIZE)``), one call whatever the
          length; where punching is not supported, zeros are written instead.
        * live snapshots: every snapshot keeps reading back as taken, as for a
          write. The blocks of the range that hold data at the head (found with
          ``SEEK_DATA``/``SEEK_HOLE``) and are not yet in the newest change set
          are saved first (their copies, or NULL-slot "was zeros" rows), their
          rows committed, and only then is the range punched; so the cost is
          one row (and one copy, if not zeros) per *allocated* block not yet
          tracked, nothing per hole. A block that is a hole at the head already
          reads as zeros, so zeroing it changes nothing and it is not recorded:
          ``diff`` covers exactly the blocks whose content changed.

        Same durability and ordering contract as ``write``: rows before data,
        and with ``durability="sync"`` the punch is on stable storage (fsync:
        the file's allocation is metadata) when this returns. A crash midway
        leaves some blocks punched and others not, all of them tracked."""
        offset, length = self._check_span("zero_range", offset, length)
        if length == 0:
            raise EmptyWriteError(f"zero_range at offset {offset} is empty (zero-length)")
        with self._mutation():
            self._apply_zero_range(offset, length)

    def _apply_zero_range(self, offset: int, length: int) -> None:
        bs = self.block_size
        end = offset + length
        if self._ids:
            newest = self._ids[-1]
            cn = self._changes[newest]
            allocated = BitMap()
            for d_start, d_end in _data_segments(self._data_fd, offset, end):
                # Outward to whole blocks: a filesystem block can be smaller
                # than ours (conservative: a hole we miss costs one row).
                allocated.add_range(d_start // bs, -(-d_end // bs))
            new = allocated - cn
            if new:
                self._copy_on_write(newest, new)
                cn |= new
        if self._puncher.punch(self._data_fd, offset, length):
            if self.durability == "sync":
                os.fsync(self._data_fd)
            return
        # No hole punching here: write the zeros (the space stays allocated).
        step = max(bs, self.cow_chunk_bytes - self.cow_chunk_bytes % bs)
        for pos in range(offset, end, step):
            pwrite_full(self._data_fd, zeros(min(step, end - pos)), pos)
        if self.durability == "sync":
            os.fdatasync(self._data_fd)

    def _copy_on_write(self, snap_id: int, blocks: Any) -> None:
        """Save the current content of ``blocks`` for snapshot ``snap_id`` and commit the rows."""
        bs = self.block_size
        per = max(1, self.cow_chunk_bytes // bs)
        writer = _SlotWriter(self._cow_fd, bs, self.cow_chunk_bytes)
        rows: list[tuple[int, int, int | None]] = []
        used_free: list[int] = []
        zero = self._zero_block
        for first, count in block_runs(blocks):
            pos, end = first, first + count
            while pos < end:
                n = min(per, end - pos)
                buf = pread_full(self._data_fd, n * bs, pos * bs)
                if buf == zeros(n * bs):
                    rows.extend((snap_id, b, None) for b in range(pos, pos + n))
                else:
                    for i in range(n):
                        blk = buf[i * bs : (i + 1) * bs]
                        if blk == zero:
                            rows.append((snap_id, pos + i, None))
                        else:
                            slot = self._alloc_slot(used_free)
                            rows.append((snap_id, pos + i, slot))
                            writer.add(slot, blk)
                pos += n
        writer.flush()
        if writer.wrote and self.durability == "sync":
            os.fdatasync(self._cow_fd)
        with self._txn() as conn:
            conn.executemany("INSERT INTO changes (snap_id, block, slot) VALUES (?, ?, ?)", rows)
            if used_free:
                conn.executemany("DELETE FROM free_slots WHERE slot = ?", [(s,) for s in used_free])
            conn.execute("UPDATE counters SET value = ? WHERE key = 'next_slot'", (self._next_slot,))

    # ------------------------------------------------------------------ reads

    def _read_blocks(self, snapshot_id: int | None, first: int, count: int) -> bytes:
        """Content of blocks [first, first+count) at the head or a live snapshot. Lock held."""
        bs = self.block_size
        buf = pread_full(self._data_fd, count * bs, first * bs)
        if snapshot_id is None:
            return buf
        end = first + count
        ids = self._ids
        k_start = bisect.bisect_left(ids, snapshot_id)
        out: bytearray | None = None
        assigned = BitMap()
        located: list[tuple[int, int | None]] = []
        for k in ids[k_start:]:
            ck = self._changes[k]
            if ck.range_cardinality(first, end) == 0:
                continue
            for block, slot in self._conn.execute(
                "SELECT block, slot FROM changes WHERE snap_id = ? AND block >= ? AND block < ?",
                (k, first, end),
            ):
                if block not in assigned:
                    assigned.add(block)
                    located.append((block, slot))
        if not located:
            return buf
        out = bytearray(buf)
        zero = self._zero_block
        located.sort()
        i = 0
        while i < len(located):
            block, slot = located[i]
            if slot is None:
                out[(block - first) * bs : (block - first + 1) * bs] = zero
                i += 1
                continue
            j = i + 1  # extend over consecutive blocks stored in consecutive slots
            while j < len(located) and located[j][0] == block + (j - i) and located[j][1] == slot + (j - i):
                j += 1
            n = j - i
            out[(block - first) * bs : (block - first + n) * bs] = pread_full(self._cow_fd, n * bs, slot * bs)
            i = j
        return bytes(out)

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of the live head (block-aligned offset and length)."""
        return self.read_at(None, offset, length)

    def read_at(self, snapshot_id: int | None, offset: int, length: int) -> bytes:
        """Bytes as they were when snapshot ``snapshot_id`` was taken (None = live head)."""
        offset, length = self._check_span("read", offset, length)
        with self._lock:
            self._check_open()
            sid = None if snapshot_id is None else self._check_snapshot(snapshot_id)
            if length == 0:
                return b""
            return self._read_blocks(sid, offset // self.block_size, length // self.block_size)

    def reads_as_zeros(self, snapshot_id: int | None, offset: int, length: int) -> bool:
        """True when ``[offset, offset+length)`` certainly reads as zeros at the
        head or snapshot ``snapshot_id``, told without reading it: the data
        file holds a hole there (never written, or ``zero_range``) and, for a
        snapshot, no block of the range changed since it was taken (so the
        snapshot's content is the live file's). False when it may hold data.
        Why: reading a hole still costs the kernel a zeroed page per 4 KiB
        (about 3.5 ms per MiB on a cold file here), which dominated a resync
        of a mostly empty volume (issue 14). One lseek and a few bitmap range
        checks, under the lock like a read."""
        offset, length = self._check_span("read", offset, length)
        with self._lock:
            self._check_open()
            sid = None if snapshot_id is None else self._check_snapshot(snapshot_id)
            if length == 0 or not _is_hole(self._data_fd, offset, length):
                return length == 0
            if sid is None:
                return True
            first, end = offset // self.block_size, (offset + length) // self.block_size
            ids = self._ids
            return all(self._changes[k].range_cardinality(first, end) == 0
                       for k in ids[bisect.bisect_left(ids, sid):])

    def _iter_runs(
        self, runs: Iterable[tuple[int, int]], snapshot_id: int | None, chunk_bytes: int
    ) -> Iterator[tuple[int, bytes]]:
        bs = self.block_size
        per = chunk_bytes // bs
        for first, count in runs:
            pos, end = first, first + count
            while pos < end:
                n = min(per, end - pos)
                with self._lock:
                    self._check_open()
                    if snapshot_id is not None:
                        self._check_snapshot(snapshot_id)
                    data = self._read_blocks(snapshot_id, pos, n)
                yield pos * bs, data
                pos += n

    def iter_extents(
        self, extents: Iterable[Extent], snapshot_id: int | None = None, *, chunk_bytes: int = DEFAULT_CHUNK
    ) -> Iterator[tuple[int, bytes]]:
        """Read ``extents`` (each aligned outward to whole blocks, then sorted and merged)
        from the head or a snapshot, as ``(offset, data)`` pieces of at most ``chunk_bytes``.
        Arguments are validated when called, before iteration starts."""
        chunk_bytes = self._check_chunk(chunk_bytes)
        bs = self.block_size
        aligned: list[Extent] = []
        for e in extents:
            if not isinstance(e, Extent):
                raise InvalidArgumentError(f"extent {e!r:.60} is not an Extent")
            if not _is_int(e.offset) or not _is_int(e.length) or e.length < 0:
                raise InvalidArgumentError(f"extent {e!r} has a non-integer or negative offset/length")
            if e.offset < 0 or e.end > self.size_bytes:
                raise OutOfRangeError(
                    f"extent at offset {e.offset} of {e.length} bytes (end {e.end}) is outside volume "
                    f"{self.name!r} of {self.size_bytes} bytes"
                )
            start = e.offset - e.offset % bs
            end = -(-e.end // bs) * bs
            aligned.append(Extent(start, end - start))
        merged = merge_extents(aligned)
        with self._lock:
            self._check_open()
            sid = None if snapshot_id is None else self._check_snapshot(snapshot_id)
        runs = [(e.offset // bs, e.length // bs) for e in merged]
        return self._iter_runs(runs, sid, chunk_bytes)

    # ------------------------------------------------------------------ snapshots

    def create_snapshot(self, name: str) -> SnapshotInfo:
        """Take a snapshot of the head (O(1)). A live snapshot already named ``name``
        -> SnapshotExistsError."""
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"snapshot name {name!r} is not a non-empty string")
        with self._mutation():
            for s in self._snaps.values():
                if s.name == name:
                    raise SnapshotExistsError(
                        f"snapshot name {name!r} is already used by live snapshot {s.id} of volume {self.name!r}"
                    )
            info = SnapshotInfo(self._next_snap_id, name, time.time())
            with self._txn() as conn:
                conn.execute(
                    "INSERT INTO snapshots (id, name, created_at) VALUES (?, ?, ?)",
                    (info.id, name, info.created_at),
                )
                conn.execute("UPDATE counters SET value = ? WHERE key = 'next_snap_id'", (info.id + 1,))
            self._next_snap_id = info.id + 1
            self._ids.append(info.id)
            self._snaps[info.id] = info
            self._changes[info.id] = BitMap()
            return info

    def list_snapshots(self) -> list[SnapshotInfo]:
        """Live snapshots, by id."""
        with self._lock:
            self._check_open()
            return [self._snaps[i] for i in self._ids]

    def get_snapshot(self, snapshot_id: int) -> SnapshotInfo:
        with self._lock:
            self._check_open()
            return self._snaps[self._check_snapshot(snapshot_id)]

    def find_snapshot(self, name: str) -> SnapshotInfo | None:
        with self._lock:
            self._check_open()
            for s in self._snaps.values():
                if s.name == name:
                    return s
            return None

    def delete_snapshot(self, snapshot_id: int) -> None:
        """Delete a snapshot, releasing the copies only it needed (O(blocks it tracked))."""
        with self._mutation():
            self._delete_snapshot_locked(self._check_snapshot(snapshot_id))

    def _delete_snapshot_locked(self, sid: int) -> None:
        idx = self._ids.index(sid)
        prev = self._ids[idx - 1] if idx > 0 else None
        cj = self._changes[sid]
        freed: list[int] = []
        with self._txn() as conn:
            if prev is None:
                freed = [
                    r[0]
                    for r in conn.execute(
                        "SELECT slot FROM changes WHERE snap_id = ? AND slot IS NOT NULL", (sid,)
                    )
                ]
                conn.execute("DELETE FROM changes WHERE snap_id = ?", (sid,))
            else:
                cp = self._changes[prev]
                if cj.intersection_cardinality(cp):
                    dup = [
                        (b, s)
                        for b, s in conn.execute("SELECT block, slot FROM changes WHERE snap_id = ?", (sid,))
                        if b in cp
                    ]
                    conn.executemany(
                        "DELETE FROM changes WHERE snap_id = ? AND block = ?", [(sid, b) for b, _ in dup]
                    )
                    freed = [s for _, s in dup if s is not None]
                conn.execute("UPDATE changes SET snap_id = ? WHERE snap_id = ?", (prev, sid))
            conn.execute("DELETE FROM snapshots WHERE id = ?", (sid,))
            conn.executemany("INSERT INTO free_slots (slot) VALUES (?)", [(s,) for s in freed])
        if prev is not None:
            self._changes[prev] |= cj
        del self._changes[sid]
        del self._snaps[sid]
        self._ids.pop(idx)
        self._release_slots(freed)

    def rollback_to(self, snapshot_id: int) -> int:
        """Make the head equal to snapshot ``snapshot_id``: later snapshots are deleted,
        then the blocks changed since it are restored (O(changed)). The snapshot stays,
        and afterwards ``diff(snapshot_id, None)`` is empty. Returns the bytes restored.
        A crash midway leaves the restored blocks still tracked; rolling back again completes."""
        with self._mutation():
            sid = self._check_snapshot(snapshot_id)
            for later in reversed([i for i in self._ids if i > sid]):
                self._delete_snapshot_locked(later)
            cj = self._changes[sid]
            if not cj:
                return 0
            bs = self.block_size
            per = max(1, self.cow_chunk_bytes // bs)
            restored = 0
            punched = False
            for first, count in block_runs(cj):
                pos, end = first, first + count
                while pos < end:
                    n = min(per, end - pos)
                    content = self._read_blocks(sid, pos, n)
                    # Blocks that were zero at the snapshot become holes again (keeps the volume sparse).
                    if content == zeros(n * bs) and self._puncher.punch(self._data_fd, pos * bs, n * bs):
                        punched = True
                    else:
                        pwrite_full(self._data_fd, content, pos * bs)
                    restored += n * bs
                    pos += n
            if self.durability == "sync":
                (os.fsync if punched else os.fdatasync)(self._data_fd)
            with self._txn() as conn:
                freed = [
                    r[0]
                    for r in conn.execute(
                        "SELECT slot FROM changes WHERE snap_id = ? AND slot IS NOT NULL", (sid,)
                    )
                ]
                conn.execute("DELETE FROM changes WHERE snap_id = ?", (sid,))
                conn.executemany("INSERT INTO free_slots (slot) VALUES (?)", [(s,) for s in freed])
            self._changes[sid] = BitMap()
            self._release_slots(freed)
            return restored

    # ------------------------------------------------------------------ diffs

    def diff_bitmap(self, base_id: int, target_id: int | None = None) -> BitMap:
        """Indices of the blocks written between snapshot ``base_id`` and ``target_id``
        (None = live head). A block rewritten with the same bytes counts as changed."""
        with self._lock:
            self._check_open()
            base, target = self._check_diff(base_id, target_id)
            lo = bisect.bisect_left(self._ids, base)
            hi = len(self._ids) if target is None else bisect.bisect_left(self._ids, target)
            sets = [self._changes[k] for k in self._ids[lo:hi]]
            if not sets:
                return BitMap()
            if len(sets) == 1:
                return BitMap(sets[0])
            return BitMap.union(*sets)

    def diff(self, base_id: int, target_id: int | None = None) -> list[Extent]:
        """Changed byte extents (merged runs of blocks, in offset order) between two
        snapshots, or a snapshot and the head (``target_id=None``). O(changed blocks)."""
        return blocks_to_extents(self.diff_bitmap(base_id, target_id), self.block_size)

    def iter_diff(
        self, base_id: int, target_id: int | None = None, *, chunk_bytes: int = DEFAULT_CHUNK
    ) -> Iterator[tuple[int, bytes]]:
        """The changed blocks with their content as of ``target_id`` (None = head), as
        ``(offset, data)`` pieces of whole blocks, at most ``chunk_bytes`` each, in offset
        order. Arguments are validated when called; the changed set is fixed then."""
        chunk_bytes = self._check_chunk(chunk_bytes)
        bm = self.diff_bitmap(base_id, target_id)
        return self._iter_runs(block_runs(bm), target_id, chunk_bytes)

    def bytes_written_since(self, base_id: int) -> int:
        """Total length of ``diff(base_id, None)``."""
        return len(self.diff_bitmap(base_id, None)) * self.block_size

    # ------------------------------------------------------------------ checksums

    def checksums(
        self,
        offset: int = 0,
        length: int = 0,
        chunk_bytes: int = DEFAULT_CHUNK,
        snapshot_id: int | None = None,
    ) -> list[int]:
        """CRC32C of each ``chunk_bytes`` piece of ``[offset, offset+length)`` (length 0 =
        to the end of the volume; the last piece may be shorter), at the head or a snapshot."""
        chunk_bytes = self._check_chunk(chunk_bytes)
        if _is_int(offset) and _is_int(length) and length == 0:
            length = self.size_bytes - offset
        offset, length = self._check_span("checksum", offset, length)
        with self._lock:
            self._check_open()
            sid = None if snapshot_id is None else self._check_snapshot(snapshot_id)
        bs = self.block_size
        out: list[int] = []
        value = google_crc32c.value
        if sid is not None:
            for _off, data in self._iter_runs([(offset // bs, length // bs)], sid, chunk_bytes):
                out.append(value(data))
            return out
        # The head: a chunk that is all hole in the data file (never written,
        # or zeroed: ``zero_range``) reads as zeros, so its checksum is known
        # without reading it (one lseek per chunk, under the lock like a read):
        # a verify of a thin volume costs what is allocated, not its size.
        end = offset + length
        for pos in range(offset, end, chunk_bytes):
            n = min(chunk_bytes, end - pos)
            with self._lock:
                self._check_open()
                if _is_hole(self._data_fd, pos, n):
                    out.append(zeros_crc32c(n))
                    continue
                data = self._read_blocks(None, pos // bs, n // bs)
            out.append(value(data))
        return out

    # ------------------------------------------------------------------ app metadata, flush, stats

    def meta_get(self, key: str) -> str | None:
        if not isinstance(key, str):
            raise InvalidArgumentError(f"metadata key {key!r} is not a string")
        with self._lock:
            self._check_open()
            row = self._conn.execute("SELECT value FROM app_meta WHERE key = ?", (key,)).fetchone()
            return None if row is None else str(row[0])

    def meta_set(self, items: Mapping[str, str | None]) -> None:
        """Set (or, for None, delete) keys in one durable transaction (always fsync'd)."""
        pairs = list(items.items())
        for k, v in pairs:
            if not isinstance(k, str):
                raise InvalidArgumentError(f"metadata key {k!r} is not a string")
            if v is not None and not isinstance(v, str):
                raise InvalidArgumentError(f"metadata value {v!r} for key {k!r} is not a string or None")
        with self._mutation():
            if self.durability != "sync":
                self._conn.execute("PRAGMA synchronous=FULL")
            try:
                with self._txn() as conn:
                    for k, v in pairs:
                        if v is None:
                            conn.execute("DELETE FROM app_meta WHERE key = ?", (k,))
                        else:
                            conn.execute(
                                "INSERT INTO app_meta (key, value) VALUES (?, ?) "
                                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                                (k, v),
                            )
            finally:
                if self.durability != "sync":
                    self._conn.execute("PRAGMA synchronous=NORMAL")

    def flush(self) -> None:
        """Make everything written so far durable (fdatasync data and copies, checkpoint
        the SQLite WAL with syncs). A barrier for ``durability="os"``."""
        with self._lock:
            self._check_open()
            os.fdatasync(self._cow_fd)
            os.fdatasync(self._data_fd)
            self._conn.execute("PRAGMA wal_checkpoint(FULL)")

    # ------------------------------------------------------------------ growing (issue 13)

    def grow(self, size_bytes: int) -> int:
        """Grow the volume to ``size_bytes`` (a multiple of the block size, not
        smaller than now); returns the bytes added (0: already that size). Online:
        it holds the store's lock like a write, so a write or read runs wholly
        before or after it. The new blocks read as zeros at the head and at every
        snapshot (they are in no change set: a snapshot reads the head there, and
        the first write to one after a snapshot saves its zeros first, as for any
        block). Shrinking is refused (it would discard the data at the end).

        Order: the data file is extended (and synced) first, then the new size
        commits in the descriptor; a crash between leaves a data file longer than
        the descriptor, which ``open`` truncates back (the old size stands)."""
        if not _is_int(size_bytes):
            raise InvalidArgumentError(f"new size {size_bytes!r} of volume {self.name!r} is not an integer")
        with self._mutation():
            old = self.size_bytes
            if size_bytes < old:
                raise InvalidArgumentError(
                    f"cannot shrink volume {self.name!r} from {old} to {size_bytes} bytes: shrinking would "
                    "discard data at the end of the volume; not supported"
                )
            if size_bytes % self.block_size:
                raise InvalidArgumentError(
                    f"new size {size_bytes} of volume {self.name!r} is not a multiple of its "
                    f"{self.block_size}-byte block size"
                )
            if size_bytes // self.block_size > MAX_BLOCKS:
                raise InvalidArgumentError(
                    f"new size {size_bytes} of volume {self.name!r} is {size_bytes // self.block_size} blocks, "
                    f"more than the limit of {MAX_BLOCKS} (2**32) blocks"
                )
            if size_bytes == old:
                return 0
            os.ftruncate(self._data_fd, size_bytes)
            os.fsync(self._data_fd)  # the file's size is metadata: fdatasync may not carry it
            if self.durability != "sync":
                self._conn.execute("PRAGMA synchronous=FULL")
            try:
                with self._txn() as conn:
                    conn.execute("UPDATE volume SET size_bytes = ? WHERE id = 1", (size_bytes,))
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._data_fd, old)
                raise
            finally:
                if self.durability != "sync":
                    self._conn.execute("PRAGMA synchronous=NORMAL")
            self.size_bytes = size_bytes
            self.num_blocks = size_bytes // self.block_size
            return size_bytes - old

    def stats(self) -> dict[str, int]:
        """Space accounting: live snapshots, tracked blocks, copy-on-write slots in use/free."""
        with self._lock:
            self._check_open()
            return {
                "snapshots": len(self._ids),
                "tracked_blocks": sum(len(b) for b in self._changes.values()),
                "cow_slots_used": self._next_slot - len(self._free),
                "cow_slots_free": len(self._free),
                "cow_slots_total": self._next_slot,
            }
