"""Failure and recovery end to end (the method of ../shared/docs/METHOD.md).

Each test is named after the fault it injects (its docstring names it too)
and ends with the replicas compared block for block and the pair in_sync.
Workloads and written blocks are seeded by the ``seed`` fixture: it is printed
when a test fails (rerun with SYNCREP_TEST_SEED=N), and it is in the assertion
messages of the workload checker and in every self-describing block.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from conftest import wait_until
from e2e_helpers import (
    Workload,
    assert_replicas_identical,
    check_model,
    check_no_lost_writes,
    wait_in_sync_and_identical,
    wait_state,
    write_blocks,
)

from deploy.cluster import LocalCluster
from syncrep import client as sc
from syncrep import rpc
from syncrep.pb import syncrep_pb2 as pb
from syncrep.pb import syncrep_pb2_grpc as pbg

pytestmark = pytest.mark.e2e

VOL = "vol0"
SIZE = 16 << 20
BLOCK = 4096
FI = ["--enable-fault-injection"]


async def make_cluster(cluster_factory: Any, mode: str = "direct", *, primary: list[str] | None = None,
                       secondary: list[str] | None = None, coordinator: list[str] | None = None) -> LocalCluster:
    c: LocalCluster = cluster_factory(
        primary_args=[*FI, *(primary or [])],
        secondary_args=[*FI, *(secondary or [])],
        coordinator_args=coordinator or [],
    )
    await c.start()
    await c.create_volume(VOL, SIZE, BLOCK, resync_mode=mode)
    return c


async def status(c: LocalCluster) -> dict[str, Any]:
    return sc.volume_status_dict(await c.get_volume(VOL))


async def primary_report(c: LocalCluster) -> pb.VolumeReport:
    r = await sc.node_status(c.primary_addr)
    return next(v for v in r.volumes if v.name == VOL)


@pytest.mark.parametrize("mode", ["rewrite", "direct"])
async def test_nack_from_full_secondary_resyncs_only_failed_extents_and_changes(
    cluster_factory: Any, mode: str, seed: int
) -> None:
    """Fault: the secondary NACKs writes with ENOSPC (fault injection), later cleared."""
    c = await make_cluster(cluster_factory, mode)
    cl = await c.connect(VOL)
    model: dict[int, bytes] = {}
    await write_blocks(cl, 0, 64, 4, seed=seed + 1, model=model)  # replicated while in sync
    await sc.inject_fault(c.secondary_addr, VOL, "enospc", 1_000_000)
    a_bytes = await write_blocks(cl, 512, 256, 8, seed=seed + 2, model=model)  # NACKed: disk full
    st = await status(c)
    if st["state"] == "in_sync":
        await wait_state(c, VOL, "degraded", timeout_s=20)
        st = await status(c)
    assert st["state"] in ("degraded", "resyncing"), st
    assert st["failed_bytes"] > 0 and st["failed_extents"], st
    for e in st["failed_extents"]:  # failed extents lie within the NACKed writes
        assert 512 * BLOCK <= e["offset"] and e["offset"] + e["length"] <= (512 + 256) * BLOCK, e
    assert "NO_SPACE" in st["last_error"] or "No space" in st["last_error"], st["last_error"]
    assert st["fault_snapshot_id"] > 0
    b_bytes = await write_blocks(cl, 2048, 128, 4, seed=seed + 3, model=model)  # tracked while degraded
    sent_before = (await primary_report(c)).resync_bytes_sent
    await sc.inject_fault(c.secondary_addr, VOL, "clear", 0)  # the condition is cleared
    await wait_in_sync_and_identical(c, VOL)
    sent = (await primary_report(c)).resync_bytes_sent - sent_before
    # Only the failed extents and the blocks written since the fault travel —
    # not the 16 MiB volume. (Every block here was written once, so the
    # failed extents and the post-fault writes do not overlap.)
    assert sent == a_bytes + b_bytes, (sent, a_bytes, b_bytes)
    await check_model(c, VOL, model)
    await cl.close()


@pytest.mark.parametrize("mode", ["rewrite", "direct"])
async def test_secondary_sigkill_under_steady_load_resyncs_while_writes_continue(
    cluster_factory: Any, mode: str, seed: int
) -> None:
    """Fault: SIGKILL of the secondary under a 4-writer load, then a restart."""
    c = await make_cluster(cluster_factory, mode)
    w = Workload(c, VOL, SIZE, writers=4, seed=seed)
    await w.start()
    await w.wait_acked(100)
    c.kill("secondary")
    await wait_state(c, VOL, "degraded", timeout_s=20)
    await w.wait_acked(100)
    await c.restart("secondary")
    # Resync completes while the writers keep going.
    await c.wait_for_volume(VOL, "in_sync", timeout_s=90)
    await w.wait_acked(100)  # and replication carries on afterwards
    await w.stop()
    assert w.failed == 0, f"seed {seed}: {w.errors[:3]}"
    await wait_in_sync_and_identical(c, VOL)
    await check_no_lost_writes(c, VOL, w)


async def test_secondary_sigkill_mid_resync_resumes_instead_of_restarting(cluster_factory: Any, seed: int) -> None:
    """Faults: SIGKILL of the secondary (12 MiB written while it is down), then again mid-resync."""
    c = await make_cluster(
        cluster_factory, "direct",
        primary=["--resync-max-rate", "4MiB", "--resync-chunk-bytes", "65536"],
    )
    cl = await c.connect(VOL)
    model: dict[int, bytes] = {}
    c.kill("secondary")
    await wait_state(c, VOL, "degraded", timeout_s=20)
    dirty = await write_blocks(cl, 0, 3072, 32, seed=seed + 5, model=model)  # 12 MiB while down
    sent0 = (await primary_report(c)).resync_bytes_sent
    await c.restart("secondary")

    def halfway(st: pb.VolumeStatus) -> bool:
        return st.state == pb.PAIR_STATE_RESYNCING and st.resync.bytes_done >= 0.4 * dirty
    await c.wait_for_volume(VOL, halfway, timeout_s=60)
    c.kill("secondary")
    await wait_state(c, VOL, "degraded", timeout_s=20)
    await c.restart("secondary")
    await wait_in_sync_and_identical(c, VOL)
    sent = (await primary_report(c)).resync_bytes_sent - sent0
    # A restart from scratch would send >= 1.4x the dirty bytes; a resume
    # re-sends at most the unacknowledged window (8 chunks of 64 KiB).
    assert dirty <= sent <= dirty + 8 * 65536, (sent, dirty)
    log = c.log_path("secondary").read_text()
    assert "resumes at chunk 0" in log and any(
        "resumes at chunk" in ln and "resumes at chunk 0" not in ln for ln in log.splitlines()
    ), "the secondary never resumed mid-round"
    await check_model(c, VOL, model)
    await cl.close()


async def test_primary_sigkill_while_degraded_keeps_failed_extents_and_fault_snapshot(
    cluster_factory: Any, seed: int,
) -> None:
    """Faults: ENOSPC NACKs from the secondary (degraded), then SIGKILL of the primary."""
    c = await make_cluster(cluster_factory, "rewrite")
    cl = await c.connect(VOL)
    model: dict[int, bytes] = {}
    await write_blocks(cl, 0, 64, 4, seed=seed + 11, model=model)
    await sc.inject_fault(c.secondary_addr, VOL, "enospc", 1_000_000)
    await write_blocks(cl, 256, 128, 8, seed=seed + 12, model=model)
    await wait_state(c, VOL, "degraded", timeout_s=20)
    before = await primary_report(c)
    assert before.failed_extents and before.fault_snapshot_id
    await write_blocks(cl, 1024, 64, 4, seed=seed + 13, model=model)
    await cl.close()
    c.kill("primary")
    await c.restart("primary")
    after = await primary_report(c)
    assert after.state == pb.PAIR_STATE_DEGRADED or after.state == pb.PAIR_STATE_RESYNCING
    assert after.fault_snapshot_id == before.fault_snapshot_id
    assert list(after.failed_extents) == list(before.failed_extents)
    await check_model(c, VOL, model)  # every acknowledged write survived the crash
    await sc.inject_fault(c.secondary_addr, VOL, "clear", 0)
    await wait_in_sync_and_identical(c, VOL)
    await check_model(c, VOL, model)


async def test_coordinator_sigkill_during_resync_picks_the_state_back_up(cluster_factory: Any, seed: int) -> None:
    """Faults: SIGKILL of the secondary, then of the coordinator (down for 0.5 s) mid-resync."""
    c = await make_cluster(cluster_factory, "direct", primary=["--resync-max-rate", "4MiB"])
    cl = await c.connect(VOL)
    model: dict[int, bytes] = {}
    c.kill("secondary")
    await wait_state(c, VOL, "degraded", timeout_s=20)
    await write_blocks(cl, 0, 2048, 32, seed=seed + 21, model=model)  # 8 MiB: ~2 s of resync
    await c.restart("secondary")
    await wait_state(c, VOL, "resyncing", timeout_s=30)
    c.kill("coordinator")  # reaped before it returns
    # Deliberate: the fault is a coordinator that stays down for a while mid-resync (the
    # outage), not a wait for anything; restart() then waits until it is healthy.
    await asyncio.sleep(0.5)
    await c.restart("coordinator")
    await wait_in_sync_and_identical(c, VOL)
    await write_blocks(cl, 3000, 16, 4, seed=seed + 22, model=model)  # replicating again
    await assert_replicas_identical(c, VOL)
    await check_model(c, VOL, model)
    await cl.close()


async def test_corrupt_resync_chunk_is_refused_and_resent(cluster_factory: Any, seed: int) -> None:
    """Faults: SIGKILL of the secondary; the primary corrupts two resync chunks (fault injection)."""
    c = await make_cluster(cluster_factory, "direct")
    cl = await c.connect(VOL)
    model: dict[int, bytes] = {}
    c.kill("secondary")
    await wait_state(c, VOL, "degraded", timeout_s=20)
    await write_blocks(cl, 0, 1024, 16, seed=seed + 31, model=model)
    # Two chunks go out corrupted; the secondary refuses the first, drops
    # what follows it unapplied, and the primary re-sends from there.
    await sc.inject_fault(c.primary_addr, VOL, "corrupt_chunk", 2)
    await c.restart("secondary")
    await wait_in_sync_and_identical(c, VOL)
    rep = await primary_report(c)
    assert rep.resync_chunks_refused >= 1
    assert "refused" in c.log_path("secondary").read_text()
    await check_model(c, VOL, model)
    await cl.close()


async def test_periodic_common_snapshots_are_identical_on_both_sides(cluster_factory: Any, seed: int) -> None:
    """No fault: common snapshots taken every 0.5 s under a 2-writer load (3 kept)."""
    c = await make_cluster(cluster_factory, primary=["--snapshot-period-s", "0.5", "--snapshots-keep", "3"])

    async def snaps(addr: str) -> dict[str, int]:
        async with rpc.channel(addr) as ch:
            r = await pbg.NodeServiceStub(ch).ListSnapshots(pb.ListSnapshotsRequest(volume=VOL), timeout=5)
        return {s.name: s.id for s in r.snapshots if s.name.startswith("common-")}

    async def common_names() -> set[str]:
        p, s = await snaps(c.primary_addr), await snaps(c.secondary_addr)
        return set(p) & set(s)

    w = Workload(c, VOL, SIZE, writers=2, seed=seed)
    await w.start()
    await w.wait_acked(50)
    # Keep writing until two common snapshots were taken under load (not for a guessed time).
    early = await common_names()

    async def two_taken_under_load() -> bool:
        return len(await common_names() - early) >= 2

    await wait_until(two_taken_under_load, "two common snapshots were taken while the writers ran",
                     timeout_s=30)
    await w.stop()

    p, s = await snaps(c.primary_addr), await snaps(c.secondary_addr)
    common = sorted(set(p) & set(s))
    assert len(common) >= 2, (p, s)
    # Snapshots keep being taken (every 0.5 s) while we look: one extra may
    # exist between a snapshot and the pruning that follows it.
    assert len(p) <= 4 and len(s) <= 4, (p, s)
    compared = 0
    for name in common:
        try:
            ps, ss = await asyncio.gather(
                sc.checksum(c.primary_addr, VOL, snapshot_id=p[name]),
                sc.checksum(c.secondary_addr, VOL, snapshot_id=s[name]),
            )
        except sc.ClientError as e:  # pruned meanwhile
            assert e.code == grpc.StatusCode.NOT_FOUND, e
            continue
        assert ps == ss, f"common snapshot {name} differs between primary and secondary"
        compared += 1
    assert compared >= 1, "no common snapshot could be compared"
    await wait_in_sync_and_identical(c, VOL)
    await check_no_lost_writes(c, VOL, w)


async def test_primary_sigkill_while_in_sync_resyncs_only_the_activity_log(cluster_factory: Any, seed: int) -> None:
    """Fault: SIGKILL of the primary, in sync, under a 4-writer load (down for 0.2 s).

    Writes in flight at a primary crash may be on either node alone; the
    activity log bounds where, so resync sends those regions, not the volume."""
    big = 256 << 20
    c: LocalCluster = cluster_factory(primary_args=FI, secondary_args=FI)
    await c.start()
    await c.create_volume(VOL, big, BLOCK)
    # All writes fall in the first 8 MiB: at most 2 (+1 straddling) 4 MiB regions.
    w = Workload(c, VOL, big, writers=4, seed=seed, region_start=0, region_size=8 << 20)
    await w.start()
    await w.wait_acked(150)
    c.kill("primary")  # reaped before it returns
    await asyncio.sleep(0.2)  # deliberate: the outage (the fault), not a wait for anything
    await c.restart("primary")
    await w.wait_acked(50, timeout_s=60)  # clients reconnect and carry on
    await w.stop()
    # Back in sync means after a resync, i.e. at a newer epoch.
    await c.wait_for_volume(
        VOL, lambda st: st.epoch >= 2 and sc.volume_status_dict(st)["state"] == "in_sync", timeout_s=120
    )
    await wait_in_sync_and_identical(c, VOL, timeout_s=120)
    await check_no_lost_writes(c, VOL, w)
    rep = await primary_report(c)
    assert rep.resync_bytes_sent <= 12 << 20, (
        f"resync after a primary crash sent {rep.resync_bytes_sent} bytes of a {big}-byte volume (seed {seed})"
    )
    assert "activity log" in c.log_path("primary").read_text()
