"""Unit tests of :mod:`deploy.workload`: the self-describing blocks, the model
of acknowledged and indeterminate writes, the no-lost-writes check, and the
writers (against an in-memory client, no cluster).

The check is what every multi-process test, the nemesis and the demo trust
to say "no acknowledged write was lost", so it is tested both ways: states a
correct system can produce must pass (including an indeterminate write that
did or did not land, torn block by block), and each kind of wrong state (a
lost write, an older version, garbage) must be found, on the right block.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any, cast

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deploy.workload import (
    FAIL,
    OK,
    PENDING,
    History,
    Op,
    Workload,
    blocks_from_bytes,
    check_blocks,
    decode_block,
    describe_block,
    differing_blocks,
    make_block,
    make_write,
    runs,
    split_regions,
)
from syncrep.client import ClientError, VolumeClient

BS = 4096
SEED = 5


def _hist(*ops: tuple[int, int, int, int, str], seed: int = SEED) -> History:
    """History of (writer, version, first block, blocks, status) ops, invoked in that order."""
    h = History(seed=seed, block_size=BS)
    for i, (w, v, block, n, status) in enumerate(ops):
        h.add(Op(w, v, block * BS, n, 0, t_inv=float(i), t_done=float(i) + 0.5, status=status))
    return h


def _holding(h: History, picks: dict[int, tuple[int, int] | None]) -> dict[int, bytes]:
    """block -> the bytes of the (writer, version) it holds (None: zeros)."""
    ops = h.op_index()
    out = {}
    for b, wv in picks.items():
        if wv is None:
            out[b] = bytes(BS)
        else:
            op = ops[wv]
            out[b] = make_block(h.seed, op.writer, op.version, b - op.offset // BS, b * BS, BS)
    return out


def _kinds(h: History, read: dict[int, bytes]) -> list[tuple[str, int]]:
    return [(f.kind, f.block) for f in check_blocks(h, read).findings]


# ---------------------------------------------------------------- blocks


@given(writer=st.integers(0, 0xFFFF), version=st.integers(1, 2**32 - 1), index=st.integers(0, 255),
       block=st.integers(0, 2**40), seed=st.integers(0, 2**64))
def test_every_block_decodes_to_the_write_that_made_it(
    writer: int, version: int, index: int, block: int, seed: int,
) -> None:
    b = make_block(seed, writer, version, index, block * BS, BS)
    d = decode_block(b, seed, block * BS, BS)
    assert (d.kind, d.writer, d.version, d.index) == ("block", writer, version, index)


@given(seed=st.integers(0, 2**32 - 1), pos=st.integers(0, BS - 1), flip=st.integers(1, 255))
def test_any_changed_byte_makes_a_block_garbage(seed: int, pos: int, flip: int) -> None:
    # A torn sector or a bit flip anywhere (header or body) must not decode as
    # some version: it would let a damaged block pass for an allowed one.
    b = bytearray(make_block(seed, 1, 2, 0, 8 * BS, BS))
    b[pos] ^= flip
    assert decode_block(bytes(b), seed, 8 * BS, BS).kind == "garbage"


def test_blocks_of_another_run_or_offset_are_garbage_and_described() -> None:
    b = make_block(7, 3, 42, 1, 8192, BS)
    assert decode_block(b, 7, 4096, BS).kind == "garbage"  # landed at the wrong offset
    assert decode_block(b, 8, 8192, BS).kind == "garbage"  # another run's
    assert decode_block(bytes(BS), 7, 8192, BS).kind == "zero"
    assert describe_block(bytes(BS), 0, BS) == "zeros"
    assert describe_block(b, 8192, BS) == "w3v42 (block 1 of the write, run seed 7)"
    assert "written for offset 8192" in describe_block(b, 4096, BS)
    assert "torn or corrupt" in describe_block(b[:BS // 2] + bytes(BS // 2), 8192, BS)
    assert describe_block(random.Random(1).randbytes(BS), 0, BS) == "bytes no workload wrote"


def test_a_write_is_its_blocks_in_order() -> None:
    w = make_write(7, 0, 1, 3 * BS, 3, BS)
    assert len(w) == 3 * BS
    assert [decode_block(w[i * BS:(i + 1) * BS], 7, (3 + i) * BS, BS).index for i in range(3)] == [0, 1, 2]


def test_block_helpers() -> None:
    data = make_write(1, 0, 1, 4 * BS, 4, BS)
    assert blocks_from_bytes(data, 4 * BS, BS, [3, 5, 8]) == {5: data[BS:2 * BS]}  # 3 and 8: outside
    other = data[:2 * BS] + bytes(BS) + data[3 * BS:]
    assert differing_blocks(data, data, BS, 4 * BS) == []
    assert differing_blocks(data, other, BS, 4 * BS) == [6 * BS]
    assert differing_blocks(data, data[:BS], BS) == [BS, 2 * BS, 3 * BS]  # the missing tail differs
    assert runs([7, 1, 2, 3, 5, 6], 2) == [(1, 2), (3, 1), (5, 2), (7, 1)]


def test_split_regions_are_disjoint_whole_blocks() -> None:
    assert split_regions(10 * BS + 5, 3, BS, start=BS) == [(BS, 3 * BS), (4 * BS, 3 * BS), (7 * BS, 3 * BS)]
    with pytest.raises(ValueError):
        split_regions(2 * BS, 3, BS)


# ---------------------------------------------------------------- the model and the check


def test_latest_ack_or_a_later_indeterminate_write() -> None:
    # block 0: v1 acked, then v4 pending -> v1 or v4; block 1: v1 then v2
    # acked -> v2; block 2: v2 acked, v3 failed later -> v2 or v3.
    h = _hist((0, 1, 0, 2, OK), (0, 2, 1, 2, OK), (0, 3, 2, 1, FAIL), (0, 4, 0, 1, PENDING))
    assert h.expected(0).last_ack is h.ops[0] and [o.version for o in h.expected(0).maybe] == [4]
    assert h.expected(1).last_ack is h.ops[1] and not h.expected(1).maybe
    assert check_blocks(h, _holding(h, {0: (0, 4), 1: (0, 2), 2: (0, 3)})).ok  # both landed
    assert check_blocks(h, _holding(h, {0: (0, 1), 1: (0, 2), 2: (0, 2)})).ok  # neither landed
    assert h.acked == 2 and h.indeterminate == 2 and h.touched_blocks() == [0, 1, 2]


def test_a_lost_write() -> None:
    h = _hist((0, 1, 0, 2, OK), (0, 2, 1, 2, OK))
    # zeros where v1 was acknowledged
    assert _kinds(h, _holding(h, {0: None, 1: (0, 2), 2: (0, 2)})) == [("lost", 0)]
    # a touched block that could not be read back counts as lost too
    assert _kinds(h, _holding(h, {0: (0, 1), 1: (0, 2)})) == [("lost", 2)]


def test_an_older_version_is_a_lost_write() -> None:
    h = _hist((0, 1, 0, 2, OK), (0, 2, 1, 2, OK))
    rep = check_blocks(h, _holding(h, {0: (0, 1), 1: (0, 1), 2: (0, 2)}))
    assert [(f.kind, f.block) for f in rep.findings] == [("lost", 1)]
    assert "w0v1(ok)" in rep.findings[0].detail and "w0v2(ok)" in rep.findings[0].detail
    assert rep.lost == 1 and not rep.ok and "LOST block 1" in rep.summary()


def test_an_indeterminate_write_older_than_the_last_ack_must_not_show() -> None:
    # v1 failed, v2 (same block) was acknowledged after it: v1 showing means v2 was lost.
    h = _hist((0, 1, 0, 1, FAIL), (0, 2, 0, 1, OK))
    assert check_blocks(h, _holding(h, {0: (0, 2)})).ok
    assert _kinds(h, _holding(h, {0: (0, 1)})) == [("lost", 0)]


def test_an_indeterminate_write_with_no_ack_before_it_may_or_may_not_have_landed() -> None:
    h = _hist((0, 1, 0, 2, PENDING))
    assert check_blocks(h, _holding(h, {0: (0, 1), 1: None})).ok  # torn: one block landed
    assert check_blocks(h, _holding(h, {0: None, 1: None})).ok


def test_garbage() -> None:
    h = _hist((0, 1, 0, 1, OK), (1, 1, 4, 1, OK))
    read = _holding(h, {0: (0, 1), 4: (1, 1)})
    cases = {
        "random bytes": random.Random(3).randbytes(BS),
        "torn": read[0][:BS // 2] + bytes(BS // 2),
        "another run": make_block(SEED + 1, 0, 1, 0, 0, BS),
        "another offset": make_block(SEED, 1, 1, 0, 4 * BS, BS),
        "a write that never covered it": make_block(SEED, 0, 9, 0, 0, BS),
    }
    for why, data in cases.items():
        rep = check_blocks(h, {**read, 0: data})
        assert [(f.kind, f.block) for f in rep.findings] == [("garbage", 0)], why
        assert rep.garbage == 1


def test_untouched_blocks_read_back_must_be_zeros() -> None:
    # A write landing at the wrong offset shows on a block nobody wrote to.
    h = _hist((0, 1, 0, 1, OK))
    read = _holding(h, {0: (0, 1)})
    assert check_blocks(h, {**read, 5: bytes(BS)}).ok
    assert _kinds(h, {**read, 5: make_block(SEED, 0, 1, 0, 0, BS)}) == [("garbage", 5)]
    # ``blocks`` restricts the check (a volume checked piece by piece).
    assert check_blocks(h, {**read, 5: b"x" * BS}, blocks=[0]).ok


def test_the_index_follows_new_ops() -> None:
    h = _hist((0, 1, 0, 1, OK))
    assert h.touched_blocks() == [0]
    h.add(Op(0, 2, 3 * BS, 1, 0, 1.0))
    assert h.touched_blocks() == [0, 3] and h.expected(3).maybe == (h.ops[1],)


# ---------------------------------------------------------------- property: a simulated correct disk


@st.composite
def _runs(draw: st.DrawFn) -> tuple[History, dict[int, bytes], random.Random]:
    """A random history of up to 3 sequential writers on disjoint 8-block
    regions, and a disk a correct system could leave: acknowledged writes
    applied in order, each indeterminate write applied block by block or not."""
    h = History(seed=draw(st.integers(0, 2**32 - 1)), block_size=BS)
    disk: dict[int, bytes] = {}
    t = 0.0
    for w in range(draw(st.integers(1, 3))):
        for v in range(1, draw(st.integers(1, 12)) + 1):
            n = draw(st.integers(1, 4))
            b0 = w * 8 + draw(st.integers(0, 8 - n))
            status = draw(st.sampled_from([OK, OK, FAIL, PENDING]))
            h.add(Op(w, v, b0 * BS, n, 0, t_inv=t, t_done=t + 0.5, status=status))
            t += 1.0
            for i in range(n):
                if status == OK or draw(st.booleans()):
                    disk[b0 + i] = make_block(h.seed, w, v, i, (b0 + i) * BS, BS)
    for b in h.touched_blocks():
        disk.setdefault(b, bytes(BS))
    return h, disk, random.Random(draw(st.integers(0, 2**16)))


@settings(max_examples=200, deadline=None)
@given(_runs())
def test_every_disk_a_correct_system_can_leave_passes(run: tuple[History, dict[int, bytes], random.Random]) -> None:
    h, disk, _ = run
    rep = check_blocks(h, disk)
    assert rep.ok, rep.summary()
    assert rep.checked == len(h.touched_blocks())


@settings(max_examples=200, deadline=None)
@given(_runs())
def test_rolling_one_block_back_past_its_last_ack_is_found(
    run: tuple[History, dict[int, bytes], random.Random],
) -> None:
    h, disk, rng = run
    # Blocks where something older than the last acknowledged write exists:
    # zeros (nothing written yet) or any write covering it before that ack.
    older: list[tuple[int, bytes]] = []
    for b, ops in h.by_block().items():
        last = h.expected(b).last_ack
        if last is None:
            continue
        older.append((b, bytes(BS)))
        for o in ops:
            if o.version < last.version:
                older.append((b, make_block(h.seed, o.writer, o.version, b - o.offset // BS, b * BS, BS)))
    if not older:
        return
    b, data = rng.choice(older)
    assert _kinds(h, {**disk, b: data}) == [("lost", b)]


@settings(max_examples=100, deadline=None)
@given(_runs(), st.binary(min_size=1, max_size=64))
def test_any_foreign_bytes_are_garbage(run: tuple[History, dict[int, bytes], random.Random], junk: bytes) -> None:
    h, disk, rng = run
    b = rng.choice(h.touched_blocks())
    data = (junk * (BS // len(junk) + 1))[:BS]
    if not data.strip(b"\0"):
        return  # zeros are not foreign (test_rolling_one_block_back... covers them)
    assert _kinds(h, {**disk, b: data}) == [("garbage", b)]


# ---------------------------------------------------------------- the writers, against an in-memory volume


class FakeClient:
    """A volume in memory. Writes listed in ``fail`` raise a client error;
    the ones also in ``land`` are applied anyway (an ack lost on the way
    back), the others are not: both are what an indeterminate write can be."""

    def __init__(self, size: int, fail: Sequence[int] = (), land: Sequence[int] = ()) -> None:
        self.disk = bytearray(size)
        self.fail, self.land = set(fail), set(land)
        self.calls = 0
        self.closed = False
        self.hang = asyncio.Event()
        self.hang_on: int | None = None
        self.until = 0
        self.reached = asyncio.Event()  # set once ``until`` writes were sent

    async def write(self, offset: int, data: bytes) -> None:
        self.calls += 1
        call = self.calls
        if call >= self.until:
            self.reached.set()
        await asyncio.sleep(0)
        if call == self.hang_on:
            await self.hang.wait()  # never set: the write is in flight when the writer stops
        if call not in self.fail or call in self.land:
            self.disk[offset:offset + len(data)] = data
        if call in self.fail:
            raise ClientError(grpc.StatusCode.UNAVAILABLE, f"injected failure of call {call}")

    async def close(self) -> None:
        self.closed = True


def _workload(client: FakeClient, seed: int = 1, writers: int = 3, **kw: Any) -> Workload:
    async def connect() -> VolumeClient:
        return cast(VolumeClient, client)  # only write() and close() are used

    return Workload(connect, seed=seed, regions=split_regions(len(client.disk), writers, BS),
                    block_size=BS, fail_pause_s=0.0, **kw)


def _disk_blocks(client: FakeClient) -> dict[int, bytes]:
    return blocks_from_bytes(bytes(client.disk), 0, BS, range(len(client.disk) // BS))


async def test_write_each_records_every_acknowledged_write() -> None:
    fake = FakeClient(48 * BS)
    w = _workload(fake)
    n, nbytes, _ = await w.write_each([5, 3, 0])
    assert (n, w.acked, w.failed) == (8, 8, 0)
    assert nbytes == w.acked_bytes == sum(o.nblocks for o in w.history.ops) * BS
    assert [o.version for o in w.history.ops if o.writer == 0] == [1, 2, 3, 4, 5]
    for o in w.history.ops:  # each writer stays in its region
        start, size = w.regions[o.writer]
        assert o.status == OK and start <= o.offset and o.offset + o.nblocks * BS <= start + size
    assert check_blocks(w.history, _disk_blocks(fake)).ok


async def test_failed_writes_are_indeterminate_whether_or_not_they_landed() -> None:
    fake = FakeClient(48 * BS, fail=[3, 4, 9, 10], land=[4, 10])
    w = _workload(fake)
    fake.until = 30
    await w.start()
    await fake.reached.wait()
    await w.stop()
    assert fake.closed and w.failed == 4 and len(w.errors) == 4
    assert [o.status for o in w.history.ops].count(FAIL) == 4
    assert w.acked == sum(1 for o in w.history.ops if o.status == OK)
    rep = check_blocks(w.history, _disk_blocks(fake))
    assert rep.ok, rep.summary()


async def test_a_write_in_flight_when_the_writers_stop_stays_pending() -> None:
    fake = FakeClient(16 * BS)
    fake.hang_on = fake.until = 4
    w = _workload(fake, writers=1)
    await w.start()
    await fake.reached.wait()
    await w.stop(timeout_s=0.05)  # the hung writer is cancelled
    last = w.history.ops[-1]
    assert last.status == PENDING and last.version == 4 and w.history.indeterminate == 1
    assert check_blocks(w.history, _disk_blocks(fake)).ok


async def test_a_seed_replays_the_same_writes() -> None:
    # The nemesis replays a failing seed: its workload must pick the same
    # offsets and sizes again (the data follows from them).
    def shape(w: Workload) -> list[tuple[int, int, int, int]]:
        return sorted((o.writer, o.version, o.offset, o.nblocks) for o in w.history.ops)

    a, b, c = (_workload(FakeClient(96 * BS), seed=s) for s in (11, 11, 12))
    for w in (a, b, c):
        await w.write_each([10, 10, 10])
    assert shape(a) == shape(b) != shape(c)


async def test_weighted_sizes_are_capped() -> None:
    fake = FakeClient(1024 * BS)
    w = _workload(fake, writers=2, max_blocks=256, sizes=((1, 1), (64, 1), (256, 1)))
    await w.write_each([40, 0])
    await w.write_each([0, 40], max_blocks=64)
    assert {o.nblocks for o in w.history.ops if o.writer == 0} == {1, 64, 256}
    assert {o.nblocks for o in w.history.ops if o.writer == 1} == {1, 64}


async def test_write_each_raises_the_first_failure() -> None:
    fake = FakeClient(16 * BS, fail=[2])
    w = _workload(fake, writers=1)
    with pytest.raises(ClientError):
        await w.write_each([5])
    assert [o.status for o in w.history.ops] == [OK, FAIL]


async def test_a_writer_that_crashes_is_not_a_quiet_writer() -> None:
    class Broken(FakeClient):
        async def write(self, offset: int, data: bytes) -> None:
            raise RuntimeError("harness bug")

    w = _workload(Broken(16 * BS), writers=1)
    await w.start()
    await asyncio.sleep(0.01)
    with pytest.raises(RuntimeError, match="harness bug"):
        await w.stop()
