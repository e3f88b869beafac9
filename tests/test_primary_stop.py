"""Regressions of the primary's executor found by reading the code (docs review),
named after the fault."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from primary.volume import PrimaryVolume
from syncrep import volumes
from syncrep.blockstore import Extent
from syncrep.config import NodeOptions
from syncrep.core.identity import Identity
from syncrep.core.pair import PairRecord
from syncrep.core.pairstate import PairState
from syncrep.core.resync_plan import ResyncPlan
from syncrep.core.vocab import (
    FAULT_PREFIX,
    META_NODE_EPOCH,
    META_NODE_PROMOTE_PENDING,
    META_RESYNC_PLAN,
    ResyncMode,
)
from syncrep.errors import FailedPrecondition, Unavailable
from syncrep.pb import syncrep_pb2 as pb
from syncrep.volumes import LocalVolume, VolumeRegistry


class _FailedLink:
    """A replication link that has just failed with one write unacked."""

    failed = True
    failure_reason = "test: the secondary stopped answering"

    class window:
        nacks: list[Any] = []

    class _W:
        seq, offset, length = 7, 8192, 4096

    failed_writes = [_W()]

    async def close(self) -> None:
        pass


async def test_graceful_stop_during_a_degrade_keeps_the_failure_information(tmp_path: Path) -> None:
    """Fault: SIGTERM (graceful stop) while the primary is going degraded, with
    the fault snapshot still being written. Before the fix, stop() cancelled the
    degrade: the waiting writes were released although their failed extents were
    never persisted, and the record (still in sync in memory) was marked clean,
    so the next start would replicate without a resync. Now the degrade
    finishes first: the record on disk is degraded, with the unacked write as a
    failed extent, and not clean."""
    registry, lv = _volume(tmp_path)
    reports: list[pb.ReplicationReport] = []

    async def reporter(r: pb.ReplicationReport) -> None:
        reports.append(r)

    pv = PrimaryVolume(lv, NodeOptions(durability="os"), "primary.invalid:1", reporter)
    # Hold the volume's I/O thread, so the degrade waits in its fault snapshot.
    release = threading.Event()
    io_busy = lv.submit_io(release.wait, 10.0)
    pv.link = _FailedLink()  # type: ignore[assignment]
    pv._begin_degrade("test: the secondary stopped answering")
    stopping = asyncio.get_running_loop().create_task(pv.stop())
    await asyncio.sleep(0)  # stop() is now waiting; the degrade is blocked on the I/O thread
    release.set()
    await io_busy
    await asyncio.wait_for(stopping, 10.0)
    on_disk = PairRecord.from_meta(lv.store.meta_get)
    assert on_disk.state is PairState.DEGRADED
    assert [(e.offset, e.length) for e in on_disk.failed_extents] == [(8192, 4096)]
    assert on_disk.fault_snapshot_id != 0 and on_disk.clean != "1"
    registry.close()


# ---------------------------------------------------------------- leases, generations, promotion
# docs/FAILOVER.md: a primary acknowledges a write its secondary does not have
# only under a lease; it starts a generation whenever it begins writing alone.

GEN = 0x5555
NEW_GEN = 0x7777


def _volume(tmp_path: Path, epoch: int = 1) -> tuple[VolumeRegistry, LocalVolume]:
    registry = VolumeRegistry(tmp_path, "os")
    ident = Identity("uuid-v", GEN, (0x1111,))
    lv, _ = registry.assign(pb.VolumeAssignment(
        spec=pb.VolumeSpec(name="v", size_bytes=1 << 20, block_size=4096), role=pb.ROLE_PRIMARY, epoch=epoch,
        peer_address="secondary.invalid:1", create=True,
        identity=pb.Identity(volume_uuid=ident.volume_uuid, current=ident.current, history=list(ident.history))))
    if lv.identity != ident:  # a registry that does not take the identity from the assignment (yet)
        lv.store.meta_set(ident.to_meta())
        lv.identity = ident
    return registry, lv


def _degraded(lv: LocalVolume) -> None:
    snap = lv.store.create_snapshot("fault-e1-test")
    lv.store.meta_set(PairRecord(PairState.DEGRADED, fault_snapshot_id=snap.id, last_error="test", clean="0",
                                 al_regions=()).to_meta())


def _lease(state: pb.PairState.ValueType, generation: int, lease_s: float = 10.0) -> pb.Lease:
    return pb.Lease(volume="v", epoch=1, lease_s=lease_s, state=state, generation=generation)


async def _reporter_into(reports: list[pb.ReplicationReport]) -> Any:
    async def reporter(r: pb.ReplicationReport) -> None:
        reports.append(r)
    return reporter


async def _primary(lv: LocalVolume, reports: list[pb.ReplicationReport], **options: Any) -> PrimaryVolume:
    pv = PrimaryVolume(lv, NodeOptions(durability="os", **options), "primary.invalid:1",
                       await _reporter_into(reports))
    await pv.start()
    return pv


async def _until_suspended(pv: PrimaryVolume) -> None:
    """Poll (bounded, 2 s) until a write waits for a lease."""
    for _ in range(200):
        if pv.report().suspended:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no write began waiting for a lease within 2 s")


async def test_a_degraded_primary_without_a_lease_fails_writes_at_once_with_io_error(tmp_path: Path) -> None:
    """Fault: the secondary is gone and the coordinator unreachable (no lease).
    --on-quorum-loss io-error: the write fails at once with UNAVAILABLE saying
    why, but it is on the primary (tracked for resync), so failing it is safe."""
    registry, lv = _volume(tmp_path)
    _degraded(lv)
    pv = await _primary(lv, [], on_quorum_loss="io-error")
    with pytest.raises(Unavailable, match="holds no lease from the coordinator") as e:
        await asyncio.wait_for(pv.write(0, b"a" * 4096), 5.0)
    assert "no lease has been granted" in str(e.value)
    assert await pv.read(0, 4096) == b"a" * 4096
    await pv.stop()
    registry.close()


async def test_a_suspended_write_is_acknowledged_once_a_degraded_lease_for_its_generation_arrives(
        tmp_path: Path) -> None:
    """--on-quorum-loss suspend: the write waits (the report says suspended);
    a lease granted while the coordinator saw the pair in sync, or for another
    generation, does not release it; a degraded lease for the primary's
    current generation does, and later writes need no wait."""
    registry, lv = _volume(tmp_path)
    _degraded(lv)
    pv = await _primary(lv, [], on_quorum_loss="suspend", quorum_loss_timeout_s=30.0)
    w = asyncio.get_running_loop().create_task(pv.write(0, b"b" * 4096))
    await _until_suspended(pv)
    assert not w.done()
    pv.on_lease(_lease(pb.PAIR_STATE_IN_SYNC, GEN), time.monotonic())
    pv.on_lease(_lease(pb.PAIR_STATE_DEGRADED, 0x4242), time.monotonic())
    await asyncio.sleep(0.05)
    assert not w.done() and pv.report().suspended
    pv.on_lease(_lease(pb.PAIR_STATE_DEGRADED, GEN), time.monotonic())
    await asyncio.wait_for(w, 5.0)
    r = pv.report()
    assert not r.suspended and 0 < r.lease_remaining_s <= 10.0
    await asyncio.wait_for(pv.write(4096, b"c" * 4096), 5.0)
    await pv.stop()
    registry.close()


async def test_a_suspended_write_fails_after_the_quorum_loss_timeout_saying_it_waited(tmp_path: Path) -> None:
    registry, lv = _volume(tmp_path)
    _degraded(lv)
    pv = await _primary(lv, [], on_quorum_loss="suspend", quorum_loss_timeout_s=0.2)
    # An expired lease (sent long ago) does not count.
    pv.on_lease(_lease(pb.PAIR_STATE_DEGRADED, GEN, lease_s=1.0), time.monotonic() - 5.0)
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match=r"waited 0\.2 s") as e:
        await asyncio.wait_for(pv.write(0, b"d" * 4096), 5.0)
    assert time.monotonic() - t0 >= 0.2
    assert "expired" in str(e.value)
    await pv.stop()
    registry.close()


async def test_stop_fails_writes_waiting_for_a_lease_instead_of_hanging(tmp_path: Path) -> None:
    registry, lv = _volume(tmp_path)
    _degraded(lv)
    pv = await _primary(lv, [], on_quorum_loss="suspend", quorum_loss_timeout_s=60.0)
    w = asyncio.get_running_loop().create_task(pv.write(0, b"e" * 4096))
    await _until_suspended(pv)
    t0 = time.monotonic()
    await asyncio.wait_for(pv.stop(), 10.0)
    assert time.monotonic() - t0 < 2.0
    with pytest.raises(Unavailable, match="shut down"):
        await w
    registry.close()


async def test_degrading_from_in_sync_starts_a_new_generation_persisted_with_the_degraded_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/FAILOVER.md §1: leaving in sync mints a generation (via
    syncrep.volumes.new_generation, the simulator's seam), written in the same
    transaction as the degraded record and reported; a second failure while
    degraded keeps it."""
    monkeypatch.setattr(volumes, "new_generation", lambda: NEW_GEN)
    registry, lv = _volume(tmp_path)
    reports: list[pb.ReplicationReport] = []
    pv = PrimaryVolume(lv, NodeOptions(durability="os"), "primary.invalid:1", await _reporter_into(reports))
    pv.link = _FailedLink()  # type: ignore[assignment]
    pv._begin_degrade("test: the secondary stopped answering")
    assert pv._degrade_outcome is not None and await asyncio.wait_for(pv._degrade_outcome, 10.0)
    assert lv.identity == Identity("uuid-v", NEW_GEN, (0x1111, GEN))
    assert Identity.from_meta(lv.store.meta_get) == lv.identity
    assert PairRecord.from_meta(lv.store.meta_get).state is PairState.DEGRADED
    await asyncio.sleep(0)
    assert reports and reports[-1].identity.current == NEW_GEN
    monkeypatch.setattr(volumes, "new_generation", lambda: 0x8888)
    pv._begin_degrade("test: again")
    assert await asyncio.wait_for(pv._degrade_outcome, 10.0)
    assert lv.identity.current == NEW_GEN
    assert pv.report().identity.current == NEW_GEN
    await pv.stop()
    registry.close()


async def test_a_degrade_whose_record_is_not_durable_does_not_claim_the_new_generation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault: disk full while persisting the degraded record. The identity in
    memory stays at the old generation (the disk has it), and the next record
    written carries the new generation with it."""
    monkeypatch.setattr(volumes, "new_generation", lambda: NEW_GEN)
    registry, lv = _volume(tmp_path)
    pv = PrimaryVolume(lv, NodeOptions(durability="os"), "primary.invalid:1", await _reporter_into([]))
    real_meta_set = lv.store.meta_set
    failing = {"n": 1}

    def meta_set(kv: dict[str, str | None]) -> None:
        if failing["n"] > 0:
            failing["n"] -= 1
            raise OSError(28, "No space left on device")
        real_meta_set(kv)

    monkeypatch.setattr(lv.store, "meta_set", meta_set)
    pv.link = _FailedLink()  # type: ignore[assignment]
    pv._begin_degrade("test: the secondary stopped answering")
    assert pv._degrade_outcome is not None and not await asyncio.wait_for(pv._degrade_outcome, 10.0)
    assert lv.identity.current == GEN and Identity.from_meta(lv.store.meta_get).current == GEN
    pv._begin_degrade("test: retried")
    assert await asyncio.wait_for(pv._degrade_outcome, 10.0)
    assert lv.identity.current == NEW_GEN and Identity.from_meta(lv.store.meta_get).current == NEW_GEN
    assert [(e.offset, e.length) for e in PairRecord.from_meta(lv.store.meta_get).failed_extents] == [(8192, 4096)]
    await pv.stop()
    registry.close()


async def test_a_promoted_primary_snapshots_the_promotion_point_and_persists_its_record_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/FAILOVER.md §3, with a crash before the promotion's transaction:
    the leftover snapshot of the same promotion is dropped, a new one taken;
    the record (degraded, no failed extents), the new generation and the
    cleared flag are on disk together; the coordinator hears "promoted"."""
    monkeypatch.setattr(volumes, "new_generation", lambda: NEW_GEN)
    registry, lv = _volume(tmp_path, epoch=3)
    lv.store.write_batch([(0, b"s" * 4096)])
    leftover = lv.store.create_snapshot(f"{FAULT_PREFIX}promote-e3-1")
    lv.store.meta_set({META_NODE_PROMOTE_PENDING: "3"})
    reports: list[pb.ReplicationReport] = []
    pv = await _primary(lv, reports, on_quorum_loss="io-error")
    rec = PairRecord.from_meta(lv.store.meta_get)
    assert rec.state is PairState.DEGRADED and rec.failed_extents == () and rec.clean == "0"
    assert rec.al_regions == () and rec.last_error.startswith("promoted to primary at epoch 3")
    snaps = {s.id: s.name for s in lv.store.list_snapshots()}
    assert leftover.id not in snaps and snaps[rec.fault_snapshot_id].startswith(f"{FAULT_PREFIX}promote-e3-")
    assert lv.store.meta_get(META_NODE_PROMOTE_PENDING) is None
    assert Identity.from_meta(lv.store.meta_get) == lv.identity == Identity("uuid-v", NEW_GEN, (0x1111, GEN))
    await asyncio.sleep(0)
    assert [(r.state, r.reason) for r in reports] == [(pb.PAIR_STATE_DEGRADED, "promoted")]
    # It writes alone only under a degraded lease for its new generation.
    with pytest.raises(Unavailable):
        await asyncio.wait_for(pv.write(0, b"p" * 4096), 5.0)
    pv.on_lease(_lease(pb.PAIR_STATE_DEGRADED, NEW_GEN), time.monotonic())
    await asyncio.wait_for(pv.write(0, b"q" * 4096), 5.0)
    await pv.stop()
    registry.close()


async def test_report_counts_out_of_sync_bytes_from_the_fault_snapshot_without_blocking(tmp_path: Path) -> None:
    """The report (every heartbeat) shows what the secondary lacks: failed
    extents plus what was written since the fault snapshot, measured in a
    thread and cached, never on the caller's path."""
    registry, lv = _volume(tmp_path)
    _degraded(lv)
    pv = await _primary(lv, [], on_quorum_loss="suspend")
    pv.on_lease(_lease(pb.PAIR_STATE_DEGRADED, GEN), time.monotonic())
    await asyncio.wait_for(pv.write(0, b"f" * 8192), 5.0)
    pv._out_of_sync_at = -1e9  # the cache is older than OUT_OF_SYNC_REFRESH_S
    assert pv.report().out_of_sync_bytes == 0  # the cached value; the refresh runs in a thread
    for _ in range(200):
        if pv.report().out_of_sync_bytes:
            break
        pv._out_of_sync_at = -1e9
        await asyncio.sleep(0.01)
    assert pv.report().out_of_sync_bytes == 8192
    await pv.stop()
    registry.close()


async def test_start_resync_persists_the_coordinators_extra_extents_and_restarts_a_stale_plan(
        tmp_path: Path) -> None:
    """Fail-back: the coordinator passes the demoted primary's divergent
    extents; they join the failed extents in the transaction that starts the
    resync, and a persisted plan made without them is dropped."""
    registry, lv = _volume(tmp_path)
    _degraded(lv)
    old_plan = ResyncPlan.new(ResyncMode.DIRECT, PairRecord.from_meta(lv.store.meta_get).fault_snapshot_id)
    lv.store.meta_set({META_RESYNC_PLAN: old_plan.dump()})
    pv = await _primary(lv, [])
    msg = await pv.start_resync(2, extra_extents=[Extent(65536, 4096)])
    assert "started at epoch 2" in msg
    rec = PairRecord.from_meta(lv.store.meta_get)
    assert rec.state is PairState.RESYNCING and rec.failed_extents == (Extent(65536, 4096),)
    assert lv.store.meta_get(META_NODE_EPOCH) == "2"
    plan = ResyncPlan.load(lv.store.meta_get(META_RESYNC_PLAN))
    assert plan is None or plan.resync_id != old_plan.resync_id
    # The same epoch again (a retried StartResync) while it runs: as is.
    if pv._resync_task is not None and not pv._resync_task.done():
        assert "already resyncing" in await pv.start_resync(2, full_copy=True)
    await pv.stop()
    registry.close()


async def test_writes_waiting_for_a_lease_are_acknowledged_when_a_resync_completes_meanwhile(
        tmp_path: Path) -> None:
    """A write waiting for a lease has landed locally; the final resync round
    carries it to the secondary. Once the pair is durably in sync it is on
    both nodes: it is acknowledged without a lease (no needless failure)."""
    registry, lv = _volume(tmp_path)
    _degraded(lv)
    pv = await _primary(lv, [], on_quorum_loss="suspend", quorum_loss_timeout_s=30.0)
    w = asyncio.get_running_loop().create_task(pv.write(0, b"g" * 4096))
    await _until_suspended(pv)
    # What _final_round does once the resync is done: the record in sync, then wake.
    pv.rec = pv.rec.evolve(state=PairState.IN_SYNC, failed_extents=(), fault_snapshot_id=0)
    pv._wake_lease_waiters()
    await asyncio.wait_for(w, 5.0)
    await pv.stop()
    registry.close()


async def test_promoting_a_replica_without_data_of_the_pair_refuses_to_serve(tmp_path: Path) -> None:
    """Fault: a replica being rebuilt (generation 0) is promoted. It must never
    serve: start() fails saying why, and writes are refused with that reason
    (not queued for a sequencer that never runs)."""
    registry, lv = _volume(tmp_path, epoch=3)
    lv.identity = Identity("uuid-v", 0)
    lv.store.meta_set({META_NODE_PROMOTE_PENDING: "3"})
    pv = PrimaryVolume(lv, NodeOptions(durability="os"), "primary.invalid:1", await _reporter_into([]))
    with pytest.raises(FailedPrecondition, match="holds no data of the pair"):
        await pv.start()
    with pytest.raises(Unavailable, match="promotion to primary failed"):
        await asyncio.wait_for(pv.write(0, b"x" * 4096), 5.0)
    assert lv.store.meta_get(META_NODE_PROMOTE_PENDING) == "3"  # redone once the cause is fixed
    await pv.stop()
    registry.close()
