"""Replicated volumes end to end: real processes, real gRPC, real files.

Every test that fails or restarts something ends by comparing the replicas
block for block. The workloads are seeded by the ``seed`` fixture (printed
when a test fails; rerun with SYNCREP_TEST_SEED=N).
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from e2e_helpers import (
    Workload,
    assert_replicas_identical,
    check_no_lost_writes,
    wait_in_sync_and_identical,
    wait_state,
)

from deploy.cluster import LocalCluster
from syncrep import client as sc
from syncrep import rpc
from syncrep.core.vocab import MAX_WRITE_BYTES
from syncrep.pb import syncrep_pb2 as pb
from syncrep.pb import syncrep_pb2_grpc as pbg

pytestmark = pytest.mark.e2e

VOL = "vol0"
SIZE = 16 << 20


async def test_concurrent_random_writes_are_identical_on_both_replicas(cluster: LocalCluster, seed: int) -> None:
    w = Workload(cluster, VOL, SIZE, writers=4, seed=seed)
    await w.start()
    await w.wait_acked(400)
    await w.stop()
    assert w.failed == 0, f"seed {seed}: {w.errors[:3]}"
    await check_no_lost_writes(cluster, VOL, w)
    # Overlapping writers too: the order between clients is up to the
    # primary, but both replicas must agree on it.
    clients = [await cluster.connect(VOL) for _ in range(3)]
    rng = random.Random(f"{seed}-overlap")

    async def overlap(c: sc.VolumeClient, k: int) -> None:
        for _ in range(60):
            off = rng.randrange(0, 64) * 4096
            await c.write(off, rng.randbytes(4096 * rng.randint(1, 8)))

    await asyncio.gather(*(overlap(c, i) for i, c in enumerate(clients)))
    for c in clients:
        await c.close()
    await assert_replicas_identical(cluster, VOL)
    st = await cluster.get_volume(VOL)
    assert sc.volume_status_dict(st)["state"] == "in_sync"


async def test_writer_workload_model_matches_primary(cluster: LocalCluster, seed: int) -> None:
    w = Workload(cluster, VOL, SIZE, writers=3, seed=seed)
    await w.start()
    await w.wait_acked(300)
    await w.stop()
    await check_no_lost_writes(cluster, VOL, w)
    await assert_replicas_identical(cluster, VOL)


async def test_secondary_killed_under_load_degrades_quickly_and_writes_continue(
    cluster_factory: Any, seed: int,
) -> None:
    """Fault: SIGKILL of the secondary under a 4-writer load, then a restart."""
    ack_timeout_s = 1.0
    c: LocalCluster = cluster_factory(primary_args=["--ack-timeout-s", str(ack_timeout_s)])
    await c.start()
    await c.create_volume(VOL, SIZE)
    w = Workload(c, VOL, SIZE, writers=4, seed=seed)
    await w.start()
    await w.wait_acked(50)
    t0 = time.monotonic()
    c.kill("secondary")
    waited = await wait_state(c, VOL, "degraded", timeout_s=30)
    detect_s = time.monotonic() - t0
    before = w.acked
    await w.wait_acked(100)  # writes continue on the primary alone
    assert w.failed == 0, f"client writes failed while degraded (seed {seed}): {w.errors[:3]}"
    assert detect_s <= ack_timeout_s + 1.0, f"degraded after {detect_s:.2f} s (waited {waited:.2f})"
    assert w.acked > before
    await c.restart("secondary")
    await w.wait_acked(50)
    await w.stop()
    await wait_in_sync_and_identical(c, VOL)
    await check_no_lost_writes(c, VOL, w)


async def test_secondary_hang_is_detected_by_ack_timeout(cluster_factory: Any, seed: int) -> None:
    """Fault: SIGSTOP of the secondary (a hang: its sockets stay open), then SIGCONT."""
    c: LocalCluster = cluster_factory(primary_args=["--ack-timeout-s", "0.5"])
    await c.start()
    await c.create_volume(VOL, SIZE)
    w = Workload(c, VOL, SIZE, writers=2, seed=seed)
    await w.start()
    await w.wait_acked(20)
    c.pause("secondary")  # SIGSTOP: the socket stays open, acks stop
    try:
        await wait_state(c, VOL, "degraded", timeout_s=20)
        await w.wait_acked(20)
        st = sc.volume_status_dict(await c.get_volume(VOL))
        assert "ack_timeout_s" in st["last_error"] or "no ack" in st["last_error"], st["last_error"]
    finally:
        c.resume("secondary")
    await w.stop()
    assert w.failed == 0, f"seed {seed}: {w.errors[:3]}"
    await wait_in_sync_and_identical(c, VOL)
    await check_no_lost_writes(c, VOL, w)


async def test_block_policy_fails_writes_with_unavailable_while_degraded(cluster_factory: Any) -> None:
    """Fault: SIGKILL of the secondary under ``--on-secondary-failure block``."""
    c: LocalCluster = cluster_factory(
        primary_args=["--on-secondary-failure", "block"],
        coordinator_args=["--no-auto-resync"],
    )
    await c.start()
    await c.create_volume(VOL, SIZE)
    cl = await c.connect(VOL)
    try:
        await cl.write(0, b"a" * 4096)
        c.kill("secondary")
        await wait_state(c, VOL, "degraded", timeout_s=20)
        with pytest.raises(sc.WriteError) as ei:
            await cl.write(4096, b"b" * 4096)
        assert ei.value.code == grpc.StatusCode.UNAVAILABLE
        assert "block" in ei.value.message
    finally:
        await cl.close()


async def _open_replicate(addr: str, epoch: int, size: int = SIZE) -> Any:
    ch = rpc.channel(addr)
    call = pbg.ReplicaServiceStub(ch).Replicate()
    await call.write(pb.ReplicateRequest(open=pb.StreamOpen(
        volume=pb.VolumeSpec(name=VOL, size_bytes=size, block_size=4096), epoch=epoch, first_seq=1)))
    return ch, call


async def test_stale_epoch_replication_stream_is_refused(cluster: LocalCluster) -> None:
    """Fault: a replication stream opened to the secondary with an older epoch."""
    vclient = await cluster.connect(VOL)
    await vclient.write(0, b"x" * 4096)
    st = await cluster.get_volume(VOL)
    assert st.epoch >= 1
    ch, call = await _open_replicate(cluster.secondary_addr, epoch=st.epoch - 1)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await asyncio.wait_for(call.read(), 10)
        assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "stale epoch" in (ei.value.details() or "")
    finally:
        await ch.close()
    # The live stream was not disturbed.
    await vclient.write(4096, b"y" * 4096)
    await vclient.close()
    assert sc.volume_status_dict(await cluster.get_volume(VOL))["state"] == "in_sync"
    await assert_replicas_identical(cluster, VOL)


async def test_bad_writes_get_precise_status_and_change_nothing(cluster: LocalCluster) -> None:
    """Faults: writes past the end, unaligned, empty, oversized, to an unknown volume."""
    cl = await cluster.connect(VOL)
    await cl.write(0, b"k" * 8192)
    before = await sc.checksum(cluster.primary_addr, VOL)
    cases = [
        (SIZE, b"z" * 4096, grpc.StatusCode.OUT_OF_RANGE, "past the end"),
        (SIZE - 4096, b"z" * 8192, grpc.StatusCode.OUT_OF_RANGE, "past the end"),
        (100, b"z" * 4096, grpc.StatusCode.INVALID_ARGUMENT, "not aligned"),
        (0, b"z" * 100, grpc.StatusCode.INVALID_ARGUMENT, "not a multiple"),
        (0, b"", grpc.StatusCode.INVALID_ARGUMENT, "length must be > 0"),
        (0, b"z" * (MAX_WRITE_BYTES + 4096), grpc.StatusCode.RESOURCE_EXHAUSTED, "exceeds"),
    ]
    try:
        for off, data, code, text in cases:
            with pytest.raises(sc.WriteError) as ei:
                await cl.write(off, data)
            assert ei.value.code == code, (off, len(data), ei.value)
            assert text in ei.value.message, ei.value.message
    finally:
        await cl.close()
    # Straight to the node, bypassing the client library's own checks.
    async with rpc.channel(cluster.primary_addr) as ch:
        stub = pbg.VolumeServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as ei2:
            await stub.WriteOne(pb.WriteRequest(volume="nope", offset=0, data=b"a" * 4096), timeout=5)
        assert ei2.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in ei2.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as ei2:
            await stub.WriteOne(pb.WriteRequest(volume=VOL, offset=4096 * 3, data=b"a" * 5000), timeout=5)
        assert ei2.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as ei2:  # the node's own limit per write
            await stub.WriteOne(
                pb.WriteRequest(volume=VOL, offset=0, data=b"a" * (MAX_WRITE_BYTES + 4096)), timeout=10
            )
        assert ei2.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit per write" in ei2.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as ei2:  # gRPC's message size limit
            await stub.WriteOne(
                pb.WriteRequest(volume=VOL, offset=0, data=b"a" * (rpc.MAX_MESSAGE_BYTES + 4096)), timeout=10
            )
        assert ei2.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(sc.ClientError) as ei3:
        await sc.get_volume(cluster.coordinator_addr, "nope")
    assert ei3.value.code == grpc.StatusCode.NOT_FOUND
    after = await sc.checksum(cluster.primary_addr, VOL)
    assert before == after, "a refused write changed the volume"
    await assert_replicas_identical(cluster, VOL)


async def test_volume_create_with_unregistered_node_is_refused(cluster: LocalCluster, tmp_path: Path) -> None:
    """Faults: an unregistered secondary address; a size that is not a multiple of the block size."""
    with pytest.raises(sc.ClientError) as ei:
        await sc.create_volume(cluster.coordinator_addr, "v2", SIZE, cluster.primary_addr, "127.0.0.1:1")
    assert ei.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "127.0.0.1:1" in ei.value.message and "not registered" in ei.value.message
    with pytest.raises(sc.ClientError) as ei:
        await sc.create_volume(cluster.coordinator_addr, "v3", 12345, cluster.primary_addr, cluster.secondary_addr)
    assert ei.value.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE)
    names = [v.spec.name for v in await cluster.list_volumes()]
    assert names == [VOL]
