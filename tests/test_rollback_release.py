"""The secondary's rollback point (``pre-resync-<id>``) is released as a step of
its own after a resync completes -- never lost, never early.

The race this pins down: the secondary answered the final round's trailer
with ``complete`` and only then deleted its pre-resync snapshot, while the
primary (``RoundSender.run``) cancels the ``Resync`` call as soon as it reads
``complete``. A cancellation delivered while the secondary was still sending
that reply skipped the deletion; the snapshot stayed while the pair was in
sync (about 1 resync in 7) and every later write paid copy-on-write for it.

Now the secondary persists "complete, rollback point awaits release" before
it answers, and releases the snapshot when the primary opens the replication
stream at the resync's epoch (the switch-back), at the next resync, at
AbortResync, or at node start -- always on the volume's I/O thread, off the
stream's critical path, and never for a resync that is not complete.

Most tests drive the secondary's real components (``ReplicaServicer``,
``ResyncReceiver``, ``VolumeRegistry``) in this process, either through a
stand-in for the gRPC servicer context (to place a cancellation exactly) or
behind a real gRPC server fed by the primary's real ``RoundSender``; "restart"
there means closing the registry and opening it again from disk. The last test
runs real processes. Every test that restarts something ends by comparing
the replicas block for block. No test sleeps for a guessed time: waits are on
conditions, with a deadline.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import google_crc32c
import grpc
import pytest
from e2e_helpers import (
    assert_replicas_identical,
    check_model,
    wait_in_sync_and_identical,
    wait_state,
    write_blocks,
)

from deploy.cluster import LocalCluster
from primary.resync import Counters, RateLimiter, RoundSender, round_pieces
from secondary.replica import ReplicaServicer
from secondary.resync import ResyncReceiver, ResyncState
from syncrep import rpc
from syncrep.blockstore import BlockStore
from syncrep.core.identity import Identity
from syncrep.core.resync_plan import ResyncPlan, RoundSpec
from syncrep.core.resync_window import RoundDigest
from syncrep.core.vocab import PRE_RESYNC_PREFIX, ResyncMode, RoundKind, pre_resync_snapshot_name
from syncrep.pb import syncrep_pb2 as pb
from syncrep.pb import syncrep_pb2_grpc as pbg
from syncrep.volumes import LocalVolume, VolumeRegistry

VOL = "vol0"
BLOCK = 4096
SIZE = 4 << 20  # in-process volumes: 1024 blocks
CHUNK = 64 << 10
EPOCH0 = 1  # the secondary's epoch when assigned; every resync here runs at a newer one
# The pair's data identity (docs/FAILOVER.md): both sides start with it, so
# every resync here is from a primary at the secondary's own generation.
IDENTITY = Identity("9a0c7e1e-0000-4000-8000-000000000011", 0x5EED)
IDENTITY_PB = pb.Identity(**IDENTITY.proto_fields())  # type: ignore[arg-type]


async def eventually(cond: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 10.0) -> None:
    """Wait until ``cond()`` holds, failing after ``timeout_s``: a wait on a
    condition, not a sleep that could hide a race."""
    deadline = time.monotonic() + timeout_s
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting until {what}")
        await asyncio.sleep(0.005)


# ---------------------------------------------------------------- the secondary, in process


class Secondary:
    """The secondary's real components on a data dir; ``serve`` puts them
    behind a real gRPC server; ``restart`` closes everything and opens it
    again from disk (what survives a crash: every state change is a durable
    metadata transaction)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.server: rpc.Server | None = None
        self.address = ""
        self._open()
        self.registry.assign(pb.VolumeAssignment(
            spec=pb.VolumeSpec(name=VOL, size_bytes=SIZE, block_size=BLOCK), role=pb.ROLE_SECONDARY,
            epoch=EPOCH0, peer_address="primary.invalid:1", identity=IDENTITY_PB, create=True))

    def _open(self) -> None:
        self.registry = VolumeRegistry(self.root, "os")
        self.registry.open_existing()
        self.receiver = ResyncReceiver(self.registry)
        self.servicer = ReplicaServicer(self.registry, self.receiver)

    @property
    def lv(self) -> LocalVolume:
        return self.registry.get(VOL)

    async def serve(self) -> str:
        self.server = rpc.Server("127.0.0.1:0")
        self.server.add(pbg.add_ReplicaServiceServicer_to_server, self.servicer, "syncrep.v1.ReplicaService")
        self.address = f"127.0.0.1:{await self.server.start()}"
        return self.address

    async def restart(self, *, serve: bool = True) -> None:
        if self.server is not None:
            await self.server.stop(0)
            self.server = None
        await asyncio.to_thread(self.registry.close)
        self._open()
        if serve:
            await self.serve()

    async def close(self) -> None:
        if self.server is not None:
            await self.server.stop(0)
        await asyncio.to_thread(self.registry.close)

    async def pre_snapshots(self) -> list[str]:
        lv = self.lv
        snaps = await lv.run_io(lv.store.list_snapshots)
        return [s.name for s in snaps if s.name.startswith(PRE_RESYNC_PREFIX)]

    async def state(self) -> ResyncState:
        lv = self.lv
        return await lv.run_io(ResyncState.load, lv)

    async def released(self) -> bool:
        return not await self.pre_snapshots()


class Primary:
    """The primary's side of a resync: its block store and the real
    ``RoundSender`` (which cancels the call right after ``complete``)."""

    def __init__(self, root: Path, seed: int) -> None:
        self.store = BlockStore.create(root / "primary", SIZE, BLOCK, durability="os", name=VOL)
        self.rng = random.Random(seed)
        self.spec_pb = pb.VolumeSpec(name=VOL, size_bytes=SIZE, block_size=BLOCK)
        self.epoch = EPOCH0
        # What the secondary holds: the last target it was brought to (the
        # empty volume at first, which the secondary also starts as).
        self.base = self.store.create_snapshot("base-0").id
        self.n = 0

    def write_some(self, blocks: int = 48) -> None:
        """Random writes, as if made while the pair was degraded."""
        for _ in range(blocks // 8):
            b = self.rng.randrange(0, SIZE // BLOCK - 8)
            self.store.write(b * BLOCK, self.rng.randbytes(8 * BLOCK))

    def next_round(self) -> RoundSpec:
        self.n += 1
        target = self.store.create_snapshot(f"target-{self.n}").id
        return RoundSpec(self.n, RoundKind.DIFF, self.base, target)

    async def send(self, address: str, plan: ResyncPlan, spec: RoundSpec, *, final: bool) -> None:
        pieces = round_pieces(self.store, spec, CHUNK)
        sender = RoundSender(self.store, address, self.spec_pb, self.epoch, plan, spec, pieces, final,
                             RateLimiter(0), Counters(), lambda _done: None, identity=IDENTITY)
        await sender.run()
        self.base = spec.target

    async def resync(self, address: str) -> ResyncPlan:
        """A one-round resync at a new epoch: the final round, then (as the
        primary does) nothing more on that call."""
        self.epoch += 1
        plan = ResyncPlan.new(ResyncMode.DIRECT, self.base)
        await self.send(address, plan, self.next_round(), final=True)
        return plan

    def close(self) -> None:
        self.store.close()


async def open_replication(address: str, epoch: int) -> tuple[Any, Any]:
    """The primary's switch-back: open the replication stream at ``epoch``
    and wait for ``accepted``. Returns (channel, call); cancel and close them."""
    ch = rpc.channel(address)
    call = pbg.ReplicaServiceStub(ch).Replicate()
    await call.write(pb.ReplicateRequest(open=pb.StreamOpen(
        volume=pb.VolumeSpec(name=VOL, size_bytes=SIZE, block_size=BLOCK), epoch=epoch, first_seq=1,
        primary_address="test-primary", identity=IDENTITY_PB)))
    reply = await asyncio.wait_for(call.read(), 10)
    assert reply is not grpc.aio.EOF and reply.HasField("accepted"), reply
    return ch, call


async def replicate(call: Any, epoch: int, seq: int, offset: int, data: bytes) -> None:
    """One synchronous write over the replication stream, waited for its ack."""
    w = pb.ReplicatedWrite(seq=seq, offset=offset, data=data, crc32c=google_crc32c.value(data))
    await call.write(pb.ReplicateRequest(batch=pb.WriteBatch(epoch=epoch, writes=[w])))
    reply = await asyncio.wait_for(call.read(), 10)
    assert reply.HasField("ack") and reply.ack.acked_through_seq == seq, reply


async def close_call(ch: Any, call: Any) -> None:
    call.cancel()
    await ch.close()


async def assert_identical(primary: Primary, sec: Secondary) -> None:
    """The replicas, block for block."""
    lv = sec.lv
    p = await asyncio.to_thread(primary.store.read_at, None, 0, SIZE)
    s = await lv.run_io(lv.store.read_at, None, 0, SIZE)
    bad = [b for b in range(SIZE // BLOCK) if p[b * BLOCK:(b + 1) * BLOCK] != s[b * BLOCK:(b + 1) * BLOCK]]
    assert not bad, f"replicas differ in {len(bad)} blocks; first at offset {bad[0] * BLOCK}"


# ---------------------------------------------------------------- a stand-in servicer context


class Context:
    """Stands in for ``grpc.aio.ServicerContext``: reads return ``requests``
    in order, then block like a stream the peer keeps open; every reply is
    recorded, then handed to ``on_write`` (which may cancel the handler)."""

    def __init__(self, requests: list[Any],
                 on_write: Callable[[Any], Awaitable[None]] | None = None) -> None:
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        for r in requests:
            self.inbox.put_nowait(r)
        self.replies: list[Any] = []
        self.on_write = on_write

    async def read(self) -> Any:
        return await self.inbox.get()

    async def write(self, msg: Any) -> None:
        self.replies.append(msg)
        if self.on_write is not None:
            await self.on_write(msg)

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise AssertionError(f"the secondary aborted the call: {code.name}: {details}")

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


def round_requests(primary: Primary, plan: ResyncPlan, spec: RoundSpec, *, final: bool,
                   chunks: int | None = None, trailer: bool = True) -> list[pb.ResyncRequest]:
    """What the primary sends for one round: header, chunks (the first
    ``chunks`` only, if given), trailer."""
    pieces = round_pieces(primary.store, spec, CHUNK)
    header = pb.ResyncHeader(volume=primary.spec_pb, epoch=primary.epoch, resync_id=plan.resync_id,
                             round=spec.round, base_snapshot_id=spec.base, target_snapshot_id=spec.target,
                             total_bytes=sum(n for _, n in pieces), kind=spec.kind, final=final,
                             identity=IDENTITY_PB)
    out = [pb.ResyncRequest(header=header)]
    digest = RoundDigest()
    for i, (off, n) in enumerate(pieces[:chunks]):
        data = primary.store.read_at(spec.target, off, n)
        crc = google_crc32c.value(data)
        out.append(pb.ResyncRequest(chunk=pb.ResyncChunk(index=i, offset=off, data=data, crc32c=crc)))
        digest.add(i, off, len(data), crc)
    if trailer:
        out.append(pb.ResyncRequest(trailer=pb.ResyncTrailer(chunk_count=len(pieces), digest=digest.digest())))
    return out


def cancel_when(task: Callable[[], asyncio.Task[Any] | None], pred: Callable[[Any], bool]) -> Callable[[Any], Any]:
    """An ``on_write`` that, once a reply matching ``pred`` is sent, cancels
    the handler while it is still inside that ``write`` -- what the primary's
    ``call.cancel()`` right after reading the reply does to the handler."""
    async def on_write(msg: Any) -> None:
        if pred(msg):
            t = task()
            assert t is not None, "the handler task is not set"
            t.cancel()
            await asyncio.Event().wait()  # the CancelledError arrives here, in write
    return on_write


# ---------------------------------------------------------------- (1) the race, deterministically


async def test_call_cancelled_right_after_complete_still_releases_the_rollback_point(tmp_path: Path) -> None:
    primary, sec = Primary(tmp_path, seed=1), Secondary(tmp_path / "secondary")
    try:
        primary.write_some()
        primary.epoch += 1
        plan = ResyncPlan.new(ResyncMode.DIRECT, primary.base)
        spec = primary.next_round()
        handler: asyncio.Task[None] | None = None
        ctx = Context(round_requests(primary, plan, spec, final=True),
                      on_write=cancel_when(lambda: handler, lambda m: m.complete))
        handler = asyncio.create_task(sec.servicer.Resync(None, ctx))
        await asyncio.wait({handler}, timeout=10)
        assert handler.cancelled(), "the handler was not cancelled in the complete reply"
        assert ctx.replies[-1].complete

        # The call is gone; the completion is persisted and the release owed.
        st = await sec.state()
        assert st.resync_id == plan.resync_id and st.complete and st.epoch == primary.epoch, st
        assert await sec.pre_snapshots() == [pre_resync_snapshot_name(plan.resync_id)]

        # The switch-back: the replication stream opens at the new epoch. Its
        # "accepted" reply does not wait for the deletion (the I/O thread is
        # held busy meanwhile, so it cannot have run yet) ...
        lv = sec.lv
        gate = threading.Event()
        busy = lv.submit_io(gate.wait, 10.0)
        rctx = Context([pb.ReplicateRequest(open=pb.StreamOpen(volume=primary.spec_pb, epoch=primary.epoch,
                                                               first_seq=1, identity=IDENTITY_PB))])
        repl = asyncio.create_task(sec.servicer.Replicate(None, rctx))

        async def accepted() -> bool:
            return any(r.HasField("accepted") for r in rctx.replies)
        await eventually(accepted, "the replication stream is accepted")
        assert not gate.is_set()
        # ... and the release, queued on the I/O thread, happens anyway.
        gate.set()
        await busy
        await eventually(sec.released, "the pre-resync snapshot is released")
        st = await sec.state()
        assert st.complete and st.pre_snapshot_id == 0, st
        repl.cancel()
        await asyncio.gather(repl, return_exceptions=True)
        await assert_identical(primary, sec)
    finally:
        await sec.close()
        primary.close()


async def test_real_round_sender_cancel_never_leaves_the_rollback_point(tmp_path: Path) -> None:
    """The primary's real ``RoundSender`` over real gRPC, resync after resync
    (the bug showed in about 1 in 7): the snapshot is kept exactly until the
    switch-back (so its deletion is outside the write stall) and released
    after it, every time."""
    primary, sec = Primary(tmp_path, seed=2), Secondary(tmp_path / "secondary")
    try:
        addr = await sec.serve()
        for _ in range(8):
            primary.write_some()
            plan = await primary.resync(addr)
            # Between "complete" and the switch-back: still there (nothing on
            # the cancelled call deletes it), its release recorded as owed.
            assert await sec.pre_snapshots() == [pre_resync_snapshot_name(plan.resync_id)]
            assert (await sec.state()).complete
            ch, call = await open_replication(addr, primary.epoch)
            try:
                await eventually(sec.released, f"the rollback point of {plan.resync_id} is released")
                # In sync: writes replicate, and no snapshot tracks them.
                data = primary.rng.randbytes(BLOCK)
                off = primary.rng.randrange(SIZE // BLOCK) * BLOCK
                primary.store.write(off, data)
                await replicate(call, primary.epoch, 1, off, data)
            finally:
                await close_call(ch, call)
            primary.base = primary.store.create_snapshot(f"in-sync-{primary.n}").id
        await assert_identical(primary, sec)
    finally:
        await sec.close()
        primary.close()


# ---------------------------------------------------------------- (2) restart between complete and release


@pytest.mark.parametrize("trigger", ["replication_stream", "next_resync", "node_start"])
async def test_secondary_restart_between_complete_and_release(tmp_path: Path, trigger: str) -> None:
    primary, sec = Primary(tmp_path, seed=3), Secondary(tmp_path / "secondary")
    try:
        addr = await sec.serve()
        primary.write_some()
        plan = await primary.resync(addr)
        # The secondary goes down after "complete", before any release.
        await sec.restart()
        addr = sec.address
        assert await sec.pre_snapshots() == [pre_resync_snapshot_name(plan.resync_id)]
        st = await sec.state()
        assert st.resync_id == plan.resync_id and st.complete, st

        if trigger == "replication_stream":  # the primary switches back to the restarted node
            ch, call = await open_replication(addr, primary.epoch)
            await eventually(sec.released, "the rollback point is released after the restart")
            await close_call(ch, call)
        elif trigger == "next_resync":  # the primary resyncs again (new id)
            primary.write_some()
            plan2 = await primary.resync(addr)
            # The old one went when the new resync began; the new one is owed.
            assert await sec.pre_snapshots() == [pre_resync_snapshot_name(plan2.resync_id)]
            ch, call = await open_replication(addr, primary.epoch)
            await eventually(sec.released, "both rollback points are released")
            await close_call(ch, call)
        else:  # the node's start-up hook
            await asyncio.gather(*sec.receiver.release_pending())
            assert await sec.released()
        assert (await sec.state()).pre_snapshot_id == 0
        await assert_identical(primary, sec)
    finally:
        await sec.close()
        primary.close()


async def test_crash_midway_through_the_release_is_finished_by_the_next_one(tmp_path: Path) -> None:
    """Deleted the snapshot, crashed before recording it: the next release
    finds nothing to delete, records it, and does not fail."""
    primary, sec = Primary(tmp_path, seed=4), Secondary(tmp_path / "secondary")
    try:
        addr = await sec.serve()
        primary.write_some()
        await primary.resync(addr)
        lv = sec.lv
        st = await sec.state()
        await lv.run_io(lv.store.delete_snapshot, st.pre_snapshot_id)
        await sec.restart()
        assert (await sec.state()).pre_snapshot_id == st.pre_snapshot_id  # still owed
        for _ in range(2):  # idempotent
            assert await sec.lv.run_io(ResyncReceiver.release_rollback_point, sec.lv, "test") == []
            assert (await sec.state()).pre_snapshot_id == 0
        await assert_identical(primary, sec)
    finally:
        await sec.close()
        primary.close()


# ---------------------------------------------------------------- (3) never for an incomplete resync


async def test_rollback_point_of_an_incomplete_resync_is_never_released(tmp_path: Path) -> None:
    primary, sec = Primary(tmp_path, seed=5), Secondary(tmp_path / "secondary")
    try:
        # A completed resync first, so the secondary holds data worth keeping.
        addr = await sec.serve()
        primary.write_some()
        await primary.resync(addr)
        ch, call = await open_replication(addr, primary.epoch)
        await eventually(sec.released, "the first resync's rollback point is released")
        await close_call(ch, call)
        before = await sec.lv.run_io(sec.lv.store.read_at, None, 0, SIZE)

        # A final round cut off after some chunks: the primary cancels it
        # mid-round (it lost the secondary, say). The secondary now holds a
        # state the primary never had; its rollback point is all that is
        # consistent.
        primary.write_some(96)
        primary.epoch += 1
        plan = ResyncPlan.new(ResyncMode.DIRECT, primary.base)
        spec = primary.next_round()
        handler: asyncio.Task[None] | None = None
        ctx = Context(round_requests(primary, plan, spec, final=True, chunks=3, trailer=False),
                      on_write=cancel_when(lambda: handler, lambda m: m.applied_below >= 3))
        handler = asyncio.create_task(sec.servicer.Resync(None, ctx))
        await asyncio.wait({handler}, timeout=10)
        assert handler.cancelled()
        name = pre_resync_snapshot_name(plan.resync_id)
        st = await sec.state()
        assert st.in_progress and not st.complete, st
        assert await sec.lv.run_io(sec.lv.store.read_at, None, 0, SIZE) != before, "nothing was applied"

        # No trigger releases it: a replication stream at the epoch, a
        # restart and the start-up hook, an AbortResync that keeps it.
        ch, call = await open_replication(addr, primary.epoch)
        await close_call(ch, call)
        await sec.restart()
        addr = sec.address
        await asyncio.gather(*sec.receiver.release_pending())
        lv = sec.lv
        msg, _ = await lv.run_io(sec.receiver.abort, lv, False)
        assert "left resumable" in msg, msg
        # A different resync begins over the abandoned one: the same
        # rollback point stays the rollback point.
        primary.epoch += 1
        plan2 = ResyncPlan.new(ResyncMode.DIRECT, primary.base)
        spec2 = primary.next_round()
        ctx2 = Context(round_requests(primary, plan2, spec2, final=False, chunks=0, trailer=False))
        h2 = asyncio.create_task(sec.servicer.Resync(None, ctx2))
        await eventually(lambda: _has_reply(ctx2), "the second resync's header is answered")
        h2.cancel()
        await asyncio.gather(h2, return_exceptions=True)
        assert await sec.pre_snapshots() == [name]
        st2 = await sec.state()
        assert st2.resync_id == plan2.resync_id and st2.pre_snapshot_id == st.pre_snapshot_id, (st, st2)
        assert ResyncReceiver.release_rollback_point(lv, "test") == []  # refused outright, too
        assert await sec.pre_snapshots() == [name]

        # It is a real rollback point: rolling back restores exactly the
        # state from before the interrupted resync.
        msg, n = await lv.run_io(sec.receiver.abort, lv, True)
        assert n > 0, msg
        assert await lv.run_io(lv.store.read_at, None, 0, SIZE) == before
        assert await sec.released()

        # And a full resync afterwards brings the replicas together.
        primary.base = _first_target(primary)
        await primary.resync(addr)
        ch, call = await open_replication(addr, primary.epoch)
        await eventually(sec.released, "the last resync's rollback point is released")
        await close_call(ch, call)
        await assert_identical(primary, sec)
    finally:
        await sec.close()
        primary.close()


async def _has_reply(ctx: Context) -> bool:
    return bool(ctx.replies)


def _first_target(primary: Primary) -> int:
    """The target of the first (completed) resync: what the secondary holds
    again after its rollback."""
    s = primary.store.find_snapshot("target-1")
    assert s is not None
    return s.id


async def test_completed_resync_resumed_by_the_primary_is_reopened_not_rolled_back(tmp_path: Path) -> None:
    """The primary heard "complete" but crashed before switching back, and
    resumes the same resync: the secondary keeps its rollback point, does not
    replay the rollback to a common snapshot over the rounds it applied, and
    an AbortResync of a completed resync rolls nothing back."""
    primary, sec = Primary(tmp_path, seed=6), Secondary(tmp_path / "secondary")
    try:
        addr = await sec.serve()
        lv = sec.lv
        # A common snapshot of the empty volume: replaying a rollback to it
        # now would undo the rounds already applied.
        common = await lv.run_io(lv.store.create_snapshot, "common-1")
        primary.write_some()
        plan = await primary.resync(addr)
        pre = (await sec.state()).pre_snapshot_id
        plan.rollback_to = common.name  # as if the resync had asked for it from its first round
        primary.write_some()
        await primary.send(addr, plan, primary.next_round(), final=False)
        st = await sec.state()
        assert st.resync_id == plan.resync_id and st.in_progress and st.pre_snapshot_id == pre, st
        await primary.send(addr, plan, primary.next_round(), final=True)
        await assert_identical(primary, sec)  # no rollback replayed in between

        msg, n = await lv.run_io(sec.receiver.abort, lv, True)
        assert n == 0 and "complete" in msg, msg
        assert await sec.released()
        await assert_identical(primary, sec)
    finally:
        await sec.close()
        primary.close()


# ---------------------------------------------------------------- real processes


FI = ["--enable-fault-injection"]


async def _pre_snapshots(c: LocalCluster) -> list[str]:
    async with rpc.channel(c.secondary_addr) as ch:
        r = await pbg.NodeServiceStub(ch).ListSnapshots(pb.ListSnapshotsRequest(volume=VOL), timeout=5)
    return [s.name for s in r.snapshots if s.name.startswith(PRE_RESYNC_PREFIX)]


def _leave_completed_unreleased(data_dir: Path, resync_id: str) -> None:
    """On the stopped secondary's data dir, with the secondary's own code:
    begin a resync and complete its final round, then stop -- the state a
    crash between "complete" and the release leaves on disk."""
    reg = VolumeRegistry(data_dir, "sync")
    try:
        reg.open_existing()
        lv = reg.get(VOL)
        # From a primary at this replica's own generation (what it adopted last).
        h = pb.ResyncHeader(volume=lv.spec, epoch=lv.epoch, resync_id=resync_id, round=1, kind="diff",
                            final=True, identity=pb.Identity(**lv.identity.proto_fields()))  # type: ignore[arg-type]
        r = ResyncReceiver(reg)
        st, _ = r.begin(lv, h)
        r.finish(lv, st, lv.epoch)
    finally:
        reg.close()


@pytest.mark.e2e
async def test_e2e_secondary_restart_with_a_release_owed(cluster_factory: Any) -> None:
    c: LocalCluster = cluster_factory(primary_args=FI, secondary_args=FI)
    await c.start()
    await c.create_volume(VOL, 16 << 20, BLOCK)
    cl = await c.connect(VOL)
    model: dict[int, bytes] = {}
    try:
        await write_blocks(cl, 0, 64, 4, seed=1, model=model)
        # An ordinary resync releases its rollback point once in sync.
        c.kill("secondary")
        await wait_state(c, VOL, "degraded", timeout_s=20)
        await write_blocks(cl, 256, 256, 8, seed=2, model=model)
        await c.restart("secondary")
        await wait_in_sync_and_identical(c, VOL)

        async def none_left() -> bool:
            return not await _pre_snapshots(c)
        await eventually(none_left, "the resync's rollback point is released", timeout_s=20)

        # The secondary goes down owing a release.
        await c.stop("secondary")
        await wait_state(c, VOL, "degraded", timeout_s=20)
        await asyncio.to_thread(_leave_completed_unreleased, c.data_dir("secondary"), "crashed-x")
        await write_blocks(cl, 1024, 128, 8, seed=3, model=model)
        await c.restart("secondary")
        await wait_in_sync_and_identical(c, VOL)
        await eventually(none_left, "the owed rollback point is released after the restart", timeout_s=20)
        log = c.log_path("secondary").read_text()
        assert "rollback point 'pre-resync-crashed-x'" in log and "resync crashed-x completed" in log
        await write_blocks(cl, 2048, 32, 4, seed=4, model=model)  # replicating again
        await assert_replicas_identical(c, VOL)
        await check_model(c, VOL, model)
    finally:
        await cl.close()
