"""Regression tests for bugs the nemesis (deploy/nemesis.py) found.

Each test is named after the fault that exposed the bug, and says which seed
found it (``python -m deploy.nemesis --seed S --schedule-s 15`` replays its
schedule; the timing of a real cluster is not replayed, so a seed exposes a
race often rather than always -- hence these deterministic tests). They run
on loopback: the bugs are in the product, not in the network.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any

import pytest
from e2e_helpers import check_model, wait_in_sync_and_identical, wait_state, write_blocks

from deploy import netns
from deploy.cluster import LocalCluster
from deploy.nemesis import LogWatcher
from primary.volume import PrimaryVolume
from syncrep import client as sc
from syncrep.blockstore import BlockStore
from syncrep.config import NodeOptions
from syncrep.pb import syncrep_pb2 as pb
from syncrep.volumes import LocalVolume

# Tests that use ``cluster_factory`` are marked e2e by conftest.py.

VOL = "vol0"
SIZE = 16 << 20
BLOCK = 4096


async def _cluster(cluster_factory: Any, mode: str = "direct", *, primary: list[str] | None = None,
                   secondary: list[str] | None = None, coordinator: list[str] | None = None) -> LocalCluster:
    c: LocalCluster = cluster_factory(
        primary_args=["--enable-fault-injection", *(primary or [])],
        secondary_args=["--enable-fault-injection", *(secondary or [])],
        coordinator_args=coordinator or [],
    )
    await c.start()
    await c.create_volume(VOL, SIZE, BLOCK, resync_mode=mode)
    return c


async def test_primary_sigkill_during_resync_restarts_the_resync(cluster_factory: Any) -> None:
    """Seed 1 (--schedule-s 15): the primary was SIGKILLed while resyncing. It
    came back with its persisted state "resyncing", but no process drove that resync any more and
    the coordinator only (re)starts resyncs of degraded pairs: the pair stayed
    resyncing forever. Fix: a primary that starts in "resyncing" reports the
    resync interrupted (degraded), so the coordinator starts a new one, which
    resumes the persisted plan."""
    c = await _cluster(cluster_factory, primary=["--resync-max-rate", "2MiB"])
    cl = await c.connect(VOL)
    model: dict[int, bytes] = {}
    c.kill("secondary")
    await wait_state(c, VOL, "degraded", timeout_s=20)
    await write_blocks(cl, 0, 2048, 32, seed=1, model=model)  # 8 MiB: ~4 s of resync at 2 MiB/s
    await c.restart("secondary")
    await wait_state(c, VOL, "resyncing", timeout_s=30)
    await cl.close()
    c.kill("primary")
    await c.restart("primary")
    st = await c.wait_for_volume(VOL, lambda s: s.state != pb.PAIR_STATE_RESYNCING or s.epoch > 2, timeout_s=30)
    assert st.state != pb.PAIR_STATE_IN_SYNC or st.epoch > 2, sc.volume_status_dict(st)
    await wait_in_sync_and_identical(c, VOL, timeout_s=60)
    await check_model(c, VOL, model)


@pytest.fixture
def small_disk(tmp_path: Any) -> Any:
    """A 64 MiB tmpfs for the secondary's data directory (root only)."""
    if os.geteuid() != 0:
        pytest.skip("a size-limited tmpfs needs root")
    d = tmp_path / "cluster0" / "secondary"
    netns.mount_tmpfs(d, 64 << 20)
    try:
        yield d
    finally:
        netns.umount(d)


async def test_secondary_disk_full_keeps_heartbeating_and_resyncs_once_freed(
    cluster_factory: Any, small_disk: Any
) -> None:
    """Seed 6 (also seed 2; --schedule-s 15): the secondary's disk filled up while
    periodic snapshots were on, so its store failed with sqlite3's "database
    or disk is full" instead of an OSError. (1) The replication stream broke
    with UNKNOWN instead of NACKing NO_SPACE; (2) the node's coordinator loop
    died on the same error while persisting a new epoch, so the secondary
    never heartbeated again: the coordinator declared it dead for good and
    the pair stayed degraded after the disk was freed. Fix: the loop survives
    any error (the assignment is retried, and memory is not updated unless
    persisted); SQLite's disk-full counts as ENOSPC (NACK NO_SPACE)."""
    c = await _cluster(cluster_factory, primary=["--snapshot-period-s", "0.3"],
                       secondary=["--snapshot-period-s", "0.3"])
    cl = await c.connect(VOL)
    model: dict[int, bytes] = {}
    await write_blocks(cl, 0, 256, 8, seed=61, model=model)
    filler = small_disk / "filler"
    netns.fill_disk(small_disk, filler.name)
    try:
        await write_blocks(cl, 512, 512, 8, seed=62, model=model)
        st = await wait_state(c, VOL, "degraded", timeout_s=20) and await c.get_volume(VOL)
        err = sc.volume_status_dict(st)["last_error"]
        assert "NO_SPACE" in err or "full" in err or "No space" in err, err
        await write_blocks(cl, 1024, 256, 8, seed=63, model=model)
        await asyncio.sleep(4.0)  # longer than the coordinator's node timeout (3 s)
        st = await c.get_volume(VOL)
        assert st.secondary_alive, "the secondary stopped heartbeating while its disk was full"
    finally:
        filler.unlink()
    await wait_in_sync_and_identical(c, VOL, timeout_s=60)
    await check_model(c, VOL, model)
    await cl.close()


async def test_secondary_sigkill_during_final_round_resumes_and_switches_back(cluster_factory: Any) -> None:
    """Seed 200 (also seed 101; --schedule-s 15): the secondary failed (disk full)
    during the final, quiesced resync round. The next attempt resumed that
    round as an ordinary one and then tried to take the final snapshot again
    under the same name: SnapshotExistsError, on every attempt -- the pair
    never got back in sync. Fix: each final round names its snapshot after
    its round number (and drops a same-named leftover of a crashed attempt)."""
    c = await _cluster(cluster_factory, primary=["--resync-max-rate", "1MiB"])
    cl = await c.connect(VOL)
    model: dict[int, bytes] = {}
    c.kill("secondary")
    await wait_state(c, VOL, "degraded", timeout_s=20)
    await write_blocks(cl, 0, 512, 32, seed=71, model=model)  # 2 MiB while degraded: ~2 s of resync
    final = LogWatcher(c.log_path("primary"), ", final)")
    await c.restart("secondary")
    # Writes all through the resync, so the final round has something to
    # carry (at 1 MiB/s: time to kill the secondary in the middle of it).
    stop = asyncio.Event()

    async def trickle() -> None:
        rng = random.Random(72)
        while not stop.is_set():
            b = 1024 + rng.randrange(0, 1024) // 8 * 8
            data = rng.randbytes(8 * BLOCK)
            await cl.write(b * BLOCK, data)
            for i in range(8):
                model[b + i] = data[i * BLOCK:(i + 1) * BLOCK]
            await asyncio.sleep(0.01)

    writer = asyncio.create_task(trickle())
    deadline = time.monotonic() + 30
    while not final.poll():
        assert time.monotonic() < deadline, "the final round never started"
        await asyncio.sleep(0.005)
    c.kill("secondary")
    stop.set()
    await writer
    await wait_state(c, VOL, "degraded", timeout_s=20)
    await c.restart("secondary")
    await wait_in_sync_and_identical(c, VOL, timeout_s=60)
    await check_model(c, VOL, model)
    await cl.close()


async def test_primary_sigkill_while_in_sync_is_reported_degraded_at_once(cluster_factory: Any) -> None:
    """Found by the activity-log e2e test while running the suite for the
    nemesis (primary SIGKILL while in sync, as in every nemesis crash of the
    primary): the restarted primary recovered from its unclean stop into
    "degraded" but told nobody -- and the node's coordinator channel did not
    even exist yet when its volumes started -- so for up to node_timeout_s
    the coordinator kept showing the pair in_sync while the replicas
    differed (verify failed). Fix: the node opens its coordinator channel
    first, and the recovering primary reports the pair degraded at once."""
    c = await _cluster(cluster_factory)
    cl = await c.connect(VOL)
    model: dict[int, bytes] = {}
    await write_blocks(cl, 0, 64, 8, seed=81, model=model)
    await cl.close()
    c.kill("primary")
    await c.restart("primary")
    # Old behaviour: in_sync at epoch 1 for node_timeout_s (3 s) more.
    st = await c.wait_for_volume(VOL, lambda s: s.state != pb.PAIR_STATE_IN_SYNC or s.epoch > 1, timeout_s=1.5)
    assert st.state != pb.PAIR_STATE_IN_SYNC or st.epoch > 1
    await wait_in_sync_and_identical(c, VOL, timeout_s=60)
    await check_model(c, VOL, model)


async def test_primary_sigkill_between_resync_snapshot_and_plan_drops_the_leftover(tmp_path: Any) -> None:
    """Seed 1029 (--schedule-s 15): the primary was SIGKILLed (restarted after
    a link fault, mid-resync) after creating the variant-B snapshot
    ``resync-<id>-d2`` but before persisting the plan that names it. The
    resumed resync tried to create ``resync-<id>-d2`` again: SnapshotExistsError
    on every attempt, the pair never got back in sync. Fix: a resync snapshot
    of the same name can only be such a leftover (the plan never names one
    twice), so it is dropped and taken afresh."""
    store = BlockStore.create(tmp_path / "vol", 1 << 20, 4096)
    lv = LocalVolume(name="vol", store=store, role=pb.ROLE_PRIMARY, epoch=1, peer="127.0.0.1:1")

    async def no_report(r: pb.ReplicationReport) -> None:
        return None

    pv = PrimaryVolume(lv, NodeOptions(), "127.0.0.1:2", no_report)
    try:
        leftover = store.create_snapshot("resync-f1-abcd-d2").id  # the crashed attempt's
        await lv.run_io(store.write, 0, b"x" * 4096)
        sid = await pv._snapshot("resync-f1-abcd-d2")
        assert sid != leftover
        names = {s.name: s.id for s in store.list_snapshots()}
        assert names == {"resync-f1-abcd-d2": sid}
        assert store.read_at(sid, 0, 4096) == b"x" * 4096  # taken now, not the stale point
    finally:
        lv.close()


class _StalledResyncCall:
    """A Resync call whose connection stalls after the header: the secondary's
    first reply arrives, then every write blocks (HTTP/2 flow control on a
    connection that no longer moves) and no reply ever comes."""

    def __init__(self) -> None:
        self.writes = 0
        self.reads = 0

    async def write(self, msg: Any) -> None:
        self.writes += 1
        if self.writes > 1:
            await asyncio.Event().wait()

    async def read(self) -> Any:
        self.reads += 1
        if self.reads == 1:
            return pb.ResyncReply(applied_below=0)
        await asyncio.Event().wait()

    def cancel(self) -> None:
        pass


async def test_network_faults_during_resync_do_not_hang_a_blocked_resync_write(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seed 1067 (--schedule-s 15): link down, then two partitions between
    primary and secondary, then the primary SIGSTOPped, all during a resync
    round. Afterwards the round made no progress for a minute: the sender was
    blocked in ``call.write`` on a connection that no longer moved, and only
    the replies had a deadline (REPLY_TIMEOUT_S) -- a blocked write could
    hang the resync until TCP itself gave up. Fix: every write of the resync
    stream has the same deadline, so the round fails and is resumed on a
    fresh connection."""
    import primary.resync as resync_mod

    call = _StalledResyncCall()

    class Stub:
        def __init__(self, ch: Any) -> None:
            pass

        def Resync(self) -> _StalledResyncCall:
            return call

    monkeypatch.setattr(resync_mod, "REPLY_TIMEOUT_S", 0.5)
    monkeypatch.setattr(resync_mod.pbg, "ReplicaServiceStub", Stub)
    store = BlockStore.create(tmp_path / "vol", 1 << 20, 4096)
    try:
        plan = resync_mod.ResyncPlan.new("direct", 1)
        spec = resync_mod.RoundSpec(0, "extents", 0, 0, [[0, 65536]])
        sender = resync_mod.RoundSender(
            store, "127.0.0.1:1", pb.VolumeSpec(name="vol", size_bytes=1 << 20, block_size=4096), 1, plan,
            spec, [(0, 65536)], False, resync_mod.RateLimiter(0), resync_mod.Counters(), lambda done: None,
        )
        t0 = time.monotonic()
        with pytest.raises(resync_mod.ResyncError, match="stopped answering"):
            await asyncio.wait_for(sender.run(), 10)
        assert time.monotonic() - t0 < 5
        assert call.writes == 2  # the header, then the chunk that blocked
    finally:
        store.close()
