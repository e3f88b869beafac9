"""Switchover end to end (docs/FAILOVER.md section 5), real processes.

A switchover is a planned role swap: the primary closes its gate, drains,
hands over; the coordinator swaps the roles at a new epoch, in sync, and the
VolumeClient re-sends the writes refused at the old primary ("not its
primary") to the new one. Each test ENDS with the pair in_sync, the replicas
compared block for block and every acknowledged write checked on the node
that is the primary then. Every wait is a bounded poll of a condition.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import grpc
import pytest
from conftest import wait_until
from e2e_helpers import (
    Workload,
    assert_replicas_identical,
    check_model,
    check_no_lost_writes,
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
COORDINATOR = ["--lease-s", "2.0", "--lease-drift-s", "0.2", "--node-timeout-s", "1.5"]
#: Generous bounds: the box is a loaded 2-core machine.
SYNC_TIMEOUT_S = 90.0
ROLE_TIMEOUT_S = 60.0
STATUS_SETTLE_S = 10.0
STALL_LINE = re.compile(r"write stall ([0-9.]+) ms")


async def make_cluster(cluster_factory: Any) -> LocalCluster:
    c: LocalCluster = cluster_factory(coordinator_args=COORDINATOR)
    await c.start()
    await c.create_volume(VOL, SIZE, BLOCK)
    return c


async def resync_sent(c: LocalCluster, name: str) -> int:
    """Resync bytes node ``name`` has sent as a primary (its own counter)."""
    r = await sc.node_status(c.address(name))
    return int(next((v.resync_bytes_sent for v in r.volumes if v.name == VOL), 0))


async def finish(c: LocalCluster, *, model: dict[int, bytes] | None = None, w: Workload | None = None) -> None:
    """In sync, identical block for block, no acknowledged write lost, and the
    status shows one generation and nothing out of sync."""
    await c.wait_for_volume(VOL, "in_sync", timeout_s=SYNC_TIMEOUT_S)
    await assert_replicas_identical(c, VOL)
    if model is not None:
        await check_model(c, VOL, model)
    if w is not None:
        await check_no_lost_writes(c, VOL, w)
    docs: list[dict[str, Any]] = []

    async def status_settled() -> bool:
        doc = await c.status_json(VOL)
        docs.append(doc)
        assert doc["state"] == "in_sync" and doc["primary_alive"] and doc["secondary_alive"], doc
        return bool(doc["generation"] != 0 and doc["generation"] == doc["secondary_generation"]
                    and doc["out_of_sync_bytes"] == 0)

    try:
        await wait_until(status_settled, "status shows one generation and 0 out-of-sync bytes",
                         timeout_s=STATUS_SETTLE_S, interval_s=0.2)
    except AssertionError as e:
        raise AssertionError(f"{e}; last `syncrep status --json`: {docs[-1] if docs else None}") from None


async def assert_swapped_in_sync(c: LocalCluster, primary: str, epoch: int, generation: int) -> None:
    """The coordinator names process ``primary`` the primary at ``epoch``, in
    sync at the same generation as before, and it stays so (no degrade, no
    resync): a switchover is not a promotion."""
    st = sc.volume_status_dict(await c.get_volume(VOL))
    assert st["primary"] == c.address(primary), st
    assert (st["epoch"], st["state"], st["generation"]) == (epoch, "in_sync", generation), st
    # The new primary's first reports (within a few heartbeats) would turn it
    # degraded if it had taken the promotion path.
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        st = sc.volume_status_dict(await c.get_volume(VOL))
        assert (st["epoch"], st["state"]) == (epoch, "in_sync"), st
        node = await sc.node_status(c.address(primary))
        v = next(v for v in node.volumes if v.name == VOL)
        assert v.state == 1 and v.epoch == epoch, v  # PAIR_STATE_IN_SYNC on the node itself
        await asyncio.sleep(0.25)  # the polling interval of this 3-s observation, not a wait for a condition


async def test_switchover_under_load_swaps_the_roles_and_back_without_losing_a_write(
    cluster_factory: Any, seed: int
) -> None:
    """Fault: a planned role swap while 4 writers keep writing through VolumeClient, then a swap back."""
    c = await make_cluster(cluster_factory)
    w = Workload(c, VOL, SIZE, writers=4, seed=seed)
    await w.start()
    await w.wait_acked(200)
    st0 = sc.volume_status_dict(await c.get_volume(VOL))
    sent0 = await resync_sent(c, "secondary") + await resync_sent(c, "primary")

    # The command line: swap to the process started as "secondary".
    t_swap1 = time.monotonic() - w.t0
    r = await c.run_cli("switchover", VOL)
    deadline = time.monotonic() + 10.0
    while r.returncode != 0 and "has not reported the volume yet" in r.stderr and time.monotonic() < deadline:
        # The refusal says to retry after the primary's next heartbeat (the
        # coordinator checks the node's own report, which a loaded box delays).
        await asyncio.sleep(0.5)
        r = await c.run_cli("switchover", VOL)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    m = STALL_LINE.search(r.stdout)
    assert m, r.stdout
    stall1_ms = float(m.group(1))
    await assert_swapped_in_sync(c, "secondary", st0["epoch"] + 1, st0["generation"])
    # Writes go on, on the new primary.
    await w.wait_acked(200)

    # And back, through the client API.
    t_swap2 = time.monotonic() - w.t0
    reply = await sc.switchover(c.coordinator_addr, VOL)
    assert reply.stall_s > 0 and reply.stall_s >= reply.drain_s, reply
    assert reply.status.primary == c.address("primary"), reply
    await assert_swapped_in_sync(c, "primary", st0["epoch"] + 2, st0["generation"])
    await w.wait_acked(200)
    await w.stop()

    # The client re-sent every write refused at the gate to the new primary:
    # none failed, and none was lost.
    assert w.failed == 0, f"{w.failed} writes failed across the switchovers: {w.errors[:3]}"
    # No resync was needed: both replicas had every write at every swap.
    assert await resync_sent(c, "secondary") + await resync_sent(c, "primary") == sent0
    # The stall as a client sees it: the longest write that overlapped a swap
    # (it includes the re-lookup of the primary and the re-send).
    def longest(t: float) -> float:
        return max((o.t_done - o.t_inv for o in w.history.ops if o.t_done >= t and o.t_inv <= t + 5.0), default=0.0)

    print(f"switchover write stall (coordinator): {stall1_ms:.1f} ms (cli), {reply.stall_s * 1000:.1f} ms (api), "
          f"drain {reply.drain_s * 1000:.1f} ms; longest client write around the swaps: "
          f"{longest(t_swap1) * 1000:.1f} ms, {longest(t_swap2) * 1000:.1f} ms; {w.acked} writes acknowledged")
    await finish(c, w=w)


async def test_switchover_refused_when_secondary_killed_and_pair_degraded(cluster_factory: Any, seed: int) -> None:
    """Fault: kill -9 of the secondary; the pair goes degraded; a switchover is refused, saying why."""
    c = await make_cluster(cluster_factory)
    cl = await c.connect(VOL)
    model: dict[int, bytes] = {}
    await write_blocks(cl, 0, 256, 8, seed=seed + 1, model=model)
    c.kill("secondary")
    # A write the secondary lacks: the primary goes degraded and tells the coordinator.
    await write_blocks(cl, 512, 64, 8, seed=seed + 2, model=model)
    await wait_state(c, VOL, "degraded", timeout_s=ROLE_TIMEOUT_S)
    with pytest.raises(sc.ClientError) as refused:
        await sc.switchover(c.coordinator_addr, VOL)
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION, refused.value
    msg = refused.value.message
    assert "degraded" in msg and "not in sync" in msg and "resync" in msg and "promote" in msg, msg
    # The command line says the same on stderr, exit status 1.
    r = await c.run_cli("switchover", VOL)
    assert r.returncode == 1 and "not in sync" in r.stderr, (r.returncode, r.stderr)
    # Nothing changed: the primary still serves writes.
    assert (await c.role_of(VOL)) == {"primary": "primary", "secondary": "secondary"}
    await write_blocks(cl, 1024, 64, 8, seed=seed + 3, model=model)
    await c.start_process("secondary")
    await finish(c, model=model)
    await cl.close()


async def test_handover_not_followed_by_a_swap_reopens_the_gate_and_loses_nothing(
    cluster_factory: Any, seed: int
) -> None:
    """Fault: the primary hands over but no swap follows (the coordinator is
    not the one asking, as if it died after PrepareHandover): the gate
    reopens at the handover timeout, the held writes complete, the pair stays
    as it was. Then a handover released at once (what the coordinator does
    when it gives up), after a release by another attempt left it closed."""
    c = await make_cluster(cluster_factory)
    w = Workload(c, VOL, SIZE, writers=4, seed=seed)
    await w.start()
    await w.wait_acked(100)
    st0 = sc.volume_status_dict(await c.get_volume(VOL))
    async with rpc.channel(c.address("primary")) as ch:
        stub = pbg.NodeServiceStub(ch)
        t0 = time.monotonic()
        reply = await stub.PrepareHandover(
            pb.PrepareHandoverRequest(volume=VOL, epoch=st0["epoch"], timeout_s=2.0), timeout=10.0)
        assert reply.identity.current == st0["generation"] and reply.acked_seq > 0, reply
        # A second handover while this one holds the gate is refused.
        with pytest.raises(grpc.aio.AioRpcError) as again:
            await stub.PrepareHandover(
                pb.PrepareHandoverRequest(volume=VOL, epoch=st0["epoch"], timeout_s=2.0), timeout=10.0)
        assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION, again.value
        assert "already in progress" in (again.value.details() or ""), again.value
        # The writers are held at the gate, then resume by themselves.
        acked = w.acked
        await w.wait_acked(100, timeout_s=30.0)
        held_s = time.monotonic() - t0
        assert held_s >= 1.0, f"writes resumed {held_s:.2f} s after the handover, before its 2-s timeout"
        assert w.acked > acked
        # A handover released at once: the writes resume without waiting for the timeout.
        await stub.PrepareHandover(
            pb.PrepareHandoverRequest(volume=VOL, epoch=st0["epoch"], timeout_s=30.0, handover_id="a"),
            timeout=10.0)
        t1 = time.monotonic()
        # Fault: a second attempt (a deposed leader's, or a retry after a
        # timeout) is refused, and its coordinator releases what it believes
        # is its own gate: that must not reopen the gate attempt "a" holds.
        with pytest.raises(grpc.aio.AioRpcError) as other:
            await stub.PrepareHandover(
                pb.PrepareHandoverRequest(volume=VOL, epoch=st0["epoch"], timeout_s=30.0, handover_id="b"),
                timeout=10.0)
        assert other.value.code() == grpc.StatusCode.FAILED_PRECONDITION, other.value
        ignored = await stub.PrepareHandover(
            pb.PrepareHandoverRequest(volume=VOL, epoch=st0["epoch"], release=True, handover_id="b"), timeout=10.0)
        assert ignored.message.startswith("the gate is held for another handover (a)"), ignored
        released = await stub.PrepareHandover(
            pb.PrepareHandoverRequest(volume=VOL, epoch=st0["epoch"], release=True, handover_id="a"), timeout=10.0)
        assert released.message == "gate reopened", released
        await w.wait_acked(100, timeout_s=30.0)
        assert time.monotonic() - t1 < 20.0
    await w.stop()
    assert w.failed == 0, f"{w.failed} writes failed: {w.errors[:3]}"
    st = sc.volume_status_dict(await c.get_volume(VOL))
    assert (st["epoch"], st["state"], st["primary"]) == (st0["epoch"], "in_sync", c.address("primary")), st
    await finish(c, w=w)
