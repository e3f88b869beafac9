"""Stateful property test: the block store against an in-memory reference model.

The model keeps the head as ``block -> bytes``, a copy of it for every live snapshot,
and a log of write events ``(epoch, block)``. A snapshot remembers the epoch it was
taken at, so the blocks changed between snapshots a and b are exactly the blocks with
an event in ``(epoch_a, epoch_b]`` -- a block rewritten with the same bytes included.
``rollback_to(j)`` erases the events after ``epoch_j``.
"""

from __future__ import annotations

import random
import shutil
import tempfile

import google_crc32c
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from syncrep.blockstore import (
    BlockStore,
    Extent,
    InvalidDiffError,
    SnapshotExistsError,
    UnknownSnapshotError,
    merge_extents,
)

BS = 512
NBLOCKS = 64
SIZE = BS * NBLOCKS


def block_content(kind: int, seed: int) -> bytes:
    """Zero blocks, constant fills (so rewrites with equal bytes happen) and random blocks."""
    if kind == 0:
        return bytes(BS)
    if kind == 1:
        return bytes([seed % 4 + 1]) * BS
    return random.Random(seed).randbytes(BS)


block_st = st.tuples(st.integers(0, 2), st.integers(0, 1000))
write_st = st.tuples(st.integers(0, NBLOCKS - 1), st.lists(block_st, min_size=1, max_size=6))


def model_extents(blocks: set[int]) -> list[Extent]:
    return merge_extents(Extent(b * BS, BS) for b in blocks)


class BlockStoreMachine(RuleBasedStateMachine):
    snapshots = Bundle("snapshots")

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="bs-model-")
        self.store: BlockStore | None = None
        self.head: dict[int, bytes] = {}
        self.snaps: dict[int, tuple[int, dict[int, bytes]]] = {}  # id -> (epoch, content copy)
        self.events: list[tuple[int, int]] = []  # (epoch, block)
        self.epoch = 0
        self.name_counter = 0

    # ------------------------------------------------------------------ helpers

    def expected(self, content: dict[int, bytes], first: int, count: int) -> bytes:
        zero = bytes(BS)
        return b"".join(content.get(b, zero) for b in range(first, first + count))

    def content_at(self, sid: int | None) -> dict[int, bytes]:
        return self.head if sid is None else self.snaps[sid][1]

    def changed(self, base: int, target: int | None) -> set[int]:
        lo = self.snaps[base][0]
        hi = float("inf") if target is None else self.snaps[target][0]
        return {b for e, b in self.events if lo < e <= hi}

    # ------------------------------------------------------------------ rules

    @initialize(durability=st.sampled_from(["os", "os", "os", "sync"]))
    def create(self, durability: str) -> None:
        self.store = BlockStore.create(self.dir + "/vol", SIZE, BS, durability=durability, name="model")  # type: ignore[arg-type]

    @rule(writes=st.lists(write_st, min_size=1, max_size=4))
    def write_batch(self, writes: list[tuple[int, list[tuple[int, int]]]]) -> None:
        assert self.store is not None
        batch = []
        for start, blocks in writes:
            blocks = blocks[: NBLOCKS - start]
            data = b"".join(block_content(k, s) for k, s in blocks)
            batch.append((start * BS, data))
        if len(batch) == 1 and random.Random(len(self.events)).random() < 0.5:
            self.store.write(*batch[0])
        else:
            self.store.write_batch(batch)
        self.epoch += 1
        for off, data in batch:
            for i in range(len(data) // BS):
                b = off // BS + i
                self.head[b] = data[i * BS : (i + 1) * BS]
                self.events.append((self.epoch, b))

    @rule(target=snapshots)
    def create_snapshot(self):  # type: ignore[no-untyped-def]
        assert self.store is not None
        self.name_counter += 1
        name = f"snap-{self.name_counter}"
        info = self.store.create_snapshot(name)
        assert all(info.id > s for s in self.snaps), (info.id, sorted(self.snaps))
        self.snaps[info.id] = (self.epoch, dict(self.head))
        with pytest.raises(SnapshotExistsError, match=name):
            self.store.create_snapshot(name)
        return info.id

    @rule(sid=consumes(snapshots))
    def delete_snapshot(self, sid: int) -> None:
        assert self.store is not None
        if sid not in self.snaps:  # already removed by a rollback
            with pytest.raises(UnknownSnapshotError, match=str(sid)):
                self.store.delete_snapshot(sid)
            return
        self.store.delete_snapshot(sid)
        del self.snaps[sid]
        with pytest.raises(UnknownSnapshotError, match=str(sid)):
            self.store.read_at(sid, 0, BS)

    @rule(first=st.integers(0, NBLOCKS - 1), count=st.integers(1, NBLOCKS))
    def read_head(self, first: int, count: int) -> None:
        assert self.store is not None
        count = min(count, NBLOCKS - first)
        assert self.store.read(first * BS, count * BS) == self.expected(self.head, first, count)

    @rule(sid=snapshots, first=st.integers(0, NBLOCKS - 1), count=st.integers(1, NBLOCKS))
    def read_snapshot(self, sid: int, first: int, count: int) -> None:
        assert self.store is not None
        count = min(count, NBLOCKS - first)
        if sid not in self.snaps:
            with pytest.raises(UnknownSnapshotError):
                self.store.read_at(sid, first * BS, count * BS)
            return
        got = self.store.read_at(sid, first * BS, count * BS)
        assert got == self.expected(self.snaps[sid][1], first, count)

    @rule(a=snapshots, b=st.one_of(st.none(), snapshots))
    def diff(self, a: int, b: int | None) -> None:
        assert self.store is not None
        if a not in self.snaps or (b is not None and b not in self.snaps):
            with pytest.raises(UnknownSnapshotError):
                self.store.diff(a, b)
            return
        if b is not None and a > b:
            with pytest.raises(InvalidDiffError, match=f"{a}"):
                self.store.diff(a, b)
            return
        want = self.changed(a, b)
        assert self.store.diff(a, b) == model_extents(want)
        assert set(self.store.diff_bitmap(a, b)) == want
        if b is None:
            assert self.store.bytes_written_since(a) == len(want) * BS

    @rule(
        a=snapshots, b=st.one_of(st.none(), snapshots), chunk=st.sampled_from([BS, 2 * BS, 3 * BS, 1 << 20])
    )
    def iter_diff(self, a: int, b: int | None, chunk: int) -> None:
        assert self.store is not None
        if a not in self.snaps or (b is not None and b not in self.snaps) or (b is not None and a > b):
            return
        want = self.changed(a, b)
        content = self.content_at(b)
        seen: list[int] = []
        last_end = -1
        for off, data in self.store.iter_diff(a, b, chunk_bytes=chunk):
            assert off % BS == 0 and len(data) % BS == 0 and 0 < len(data) <= chunk
            assert off >= last_end
            last_end = off + len(data)
            first = off // BS
            assert data == self.expected(content, first, len(data) // BS)
            seen.extend(range(first, first + len(data) // BS))
        assert seen == sorted(want)

    @rule(target=snapshots, sid=consumes(snapshots))
    def rollback(self, sid: int):  # type: ignore[no-untyped-def]
        assert self.store is not None
        if sid not in self.snaps:
            return multiple()
        epoch, content = self.snaps[sid]
        restored = self.store.rollback_to(sid)
        assert restored == len(self.changed(sid, None)) * BS
        for later in [s for s in self.snaps if s > sid]:
            del self.snaps[later]
        self.head = dict(content)
        self.events = [(e, b) for e, b in self.events if e <= epoch]
        self.epoch += 1  # writes after the rollback come strictly after every kept event
        assert self.store.diff(sid, None) == []
        assert self.store.read(0, SIZE) == self.expected(self.head, 0, NBLOCKS)
        return multiple(sid)  # the snapshot stays

    @rule(durability=st.sampled_from(["os", "sync"]))
    def reopen(self, durability: str) -> None:
        assert self.store is not None
        self.store.close()
        self.store.close()  # idempotent
        self.store = BlockStore.open(self.dir + "/vol", durability=durability)  # type: ignore[arg-type]
        assert [s.id for s in self.store.list_snapshots()] == sorted(self.snaps)

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def checksums(self, data: st.DataObject) -> None:
        assert self.store is not None
        sid = data.draw(st.sampled_from([None, *sorted(self.snaps)]))
        chunk = data.draw(st.sampled_from([BS, 4 * BS, 7 * BS]))
        content = self.expected(self.content_at(sid), 0, NBLOCKS)
        want = [google_crc32c.value(content[i : i + chunk]) for i in range(0, SIZE, chunk)]
        assert self.store.checksums(0, 0, chunk, sid) == want

    # ------------------------------------------------------------------ invariants

    @invariant()
    def snapshots_listed(self) -> None:
        if self.store is None:
            return
        assert [s.id for s in self.store.list_snapshots()] == sorted(self.snaps)

    @invariant()
    def slots_accounted(self) -> None:
        """Every live copy has its own slot; no slot is both used and free, none leaks."""
        if self.store is None:
            return
        conn = self.store._conn
        used = [r[0] for r in conn.execute("SELECT slot FROM changes WHERE slot IS NOT NULL")]
        free = [r[0] for r in conn.execute("SELECT slot FROM free_slots")]
        assert len(used) == len(set(used))
        assert not set(used) & set(free)
        stats = self.store.stats()
        assert sorted(used + free) == list(range(stats["cow_slots_total"]))
        assert stats["cow_slots_used"] == len(used)

    def teardown(self) -> None:
        if self.store is not None:
            self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)


BlockStoreMachine.TestCase.settings = settings(
    max_examples=120,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestBlockStoreModel = BlockStoreMachine.TestCase
