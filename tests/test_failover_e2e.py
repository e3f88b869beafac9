"""Failover, data identity and lease fencing end to end (docs/FAILOVER.md), real processes.

Each test is named after the fault it injects and ENDS with the pair in_sync,
the replicas compared block for block, and every acknowledged write checked
on the node that is the primary then (roles move: after a promotion the
process started as "secondary" is the primary). Small volumes and a short
lease keep it quick on a loaded machine; every wait is a bounded poll of a
condition, never a sleep that could hide a race.
"""

from __future__ import annotations

import re
import shutil
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

from deploy import workload as wl
from deploy.cluster import LocalCluster
from syncrep import client as sc
from syncrep import rpc
from syncrep.pb import syncrep_pb2 as pb
from syncrep.pb import syncrep_pb2_grpc as pbg

pytestmark = pytest.mark.e2e

VOL = "vol0"
SIZE = 16 << 20
BLOCK = 4096
LEASE_S = 2.0
LEASE_DRIFT_S = 0.2
NODE_TIMEOUT_S = 1.5
COORDINATOR = ["--lease-s", str(LEASE_S), "--lease-drift-s", str(LEASE_DRIFT_S), "--node-timeout-s",
               str(NODE_TIMEOUT_S)]
#: Generous bounds: the box is a loaded 2-core machine.
SYNC_TIMEOUT_S = 90.0
ROLE_TIMEOUT_S = 60.0
#: Heartbeats are 0.5 s apart; the status settles within a few of them.
STATUS_SETTLE_S = 10.0


async def make_cluster(cluster_factory: Any, *, auto_failover: bool = False, size: int = SIZE,
                       coordinator: list[str] | None = None) -> LocalCluster:
    c: LocalCluster = cluster_factory(coordinator_args=coordinator or COORDINATOR)
    await c.start()
    await c.create_volume(VOL, size, BLOCK, auto_failover=auto_failover)
    return c


async def status(c: LocalCluster) -> dict[str, Any]:
    return sc.volume_status_dict(await c.get_volume(VOL))


async def resync_sent(c: LocalCluster, name: str) -> int:
    """Resync bytes node ``name`` has sent as a primary (its own counter)."""
    r = await sc.node_status(c.address(name))
    return int(next((v.resync_bytes_sent for v in r.volumes if v.name == VOL), 0))


async def wait_primary_is(c: LocalCluster, name: str, timeout_s: float = ROLE_TIMEOUT_S) -> float:
    """Wait until the coordinator names process ``name`` the primary; returns the seconds waited."""
    t0 = time.monotonic()
    want = c.address(name)
    await c.wait_for_volume(VOL, lambda st: st.primary == want, timeout_s=timeout_s)
    return time.monotonic() - t0


async def finish(c: LocalCluster, *, model: dict[int, bytes] | None = None, w: Workload | None = None) -> None:
    """The end of every test: in sync, identical block for block, no acknowledged write lost."""
    await c.wait_for_volume(VOL, "in_sync", timeout_s=SYNC_TIMEOUT_S)
    await assert_replicas_identical(c, VOL)
    if model is not None:
        await check_model(c, VOL, model)
    if w is not None:
        await check_no_lost_writes(c, VOL, w)
    # And the command line agrees. The nodes' own figures (generations, out-of-sync
    # bytes) reach the coordinator with their next heartbeats: allow a few.
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


async def read_on(addr: str, offset: int, length: int) -> bytes | grpc.StatusCode:
    """VolumeService.Read on one node: the data, or the refusal's code."""
    async with rpc.channel(addr) as ch:
        try:
            reply = await pbg.VolumeServiceStub(ch).Read(
                pb.ReadRequest(volume=VOL, offset=offset, length=length), timeout=2.0)
        except grpc.RpcError as e:
            return e.code() or grpc.StatusCode.UNKNOWN
    return bytes(reply.data)


# ---------------------------------------------------------------- empty or unrelated data


async def test_secondary_restarted_with_empty_data_dir_gets_a_full_copy(cluster_factory: Any, seed: int) -> None:
    """Fault: kill -9 of the secondary, its data dir emptied (a replaced disk), restart."""
    c = await make_cluster(cluster_factory)
    cl = await c.connect(VOL)
    model: dict[int, bytes] = {}
    await write_blocks(cl, 0, 512, 8, seed=seed + 1, model=model)  # on both nodes, in sync
    sent0 = await resync_sent(c, "primary")
    c.kill("secondary")
    c.wipe_data("secondary")
    await c.start_process("secondary")
    # Writes go on while the secondary is rebuilt.
    await write_blocks(cl, 1024, 256, 4, seed=seed + 2, model=model)
    await c.wait_for_volume(VOL, "in_sync", timeout_s=SYNC_TIMEOUT_S)
    # Not accepted as in sync by a changes-only resync: the whole volume was copied.
    sent = await resync_sent(c, "primary") - sent0
    assert sent >= SIZE, f"an empty secondary got {sent} bytes, less than the {SIZE}-byte volume"
    assert (await c.role_of(VOL)) == {"primary": "primary", "secondary": "secondary"}
    await finish(c, model=model)
    await cl.close()


async def test_primary_restarted_with_empty_data_dir_never_serves_zeros_and_is_rebuilt(
    cluster_factory: Any, seed: int
) -> None:
    """Fault: kill -9 of the primary, its data dir emptied, restart with its original command line."""
    c = await make_cluster(cluster_factory)
    cl = await c.connect(VOL)
    model: dict[int, bytes] = {}
    await write_blocks(cl, 0, 256, 8, seed=seed + 1, model=model)
    await cl.close()
    c.kill("primary")
    c.wipe_data("primary")
    await c.start_process("primary")
    old_primary = c.address("primary")
    first = model[0]

    # Until the coordinator names the secondary the primary, the emptied node
    # must refuse reads, never answer with zeros (it has no data of the pair).
    async def promoted() -> bool:
        got = await read_on(old_primary, 0, BLOCK)
        assert not isinstance(got, bytes) or got == first, (
            f"the node with an empty data dir served {got[:16]!r}... for block 0 (expected the data or a refusal)"
        )
        return (await c.get_volume(VOL)).primary == c.address("secondary")

    await wait_until(promoted, "the coordinator promotes the secondary", timeout_s=ROLE_TIMEOUT_S,
                     interval_s=0.1)
    # Writes continue on the new primary, through the coordinator.
    cl = await c.connect(VOL)
    await write_blocks(cl, 512, 256, 4, seed=seed + 2, model=model)
    await c.wait_for_volume(VOL, "in_sync", timeout_s=SYNC_TIMEOUT_S)
    assert (await c.role_of(VOL)) == {"primary": "secondary", "secondary": "primary"}
    sent = await resync_sent(c, "secondary")
    assert sent >= SIZE, f"the emptied old primary got {sent} bytes, less than the {SIZE}-byte volume"
    await finish(c, model=model)
    await cl.close()


async def test_unrelated_store_on_secondary_is_set_aside_and_rebuilt(cluster_factory: Any, seed: int) -> None:
    """Fault: another volume's store copied over the secondary's store of vol0 (wrong disk attached)."""
    c = await make_cluster(cluster_factory)
    await c.create_volume("other", SIZE, BLOCK)
    model: dict[int, bytes] = {}
    other: dict[int, bytes] = {}
    async with await c.connect(VOL) as cl:
        await write_blocks(cl, 0, 256, 8, seed=seed + 1, model=model)
    async with await c.connect("other") as cl:
        await write_blocks(cl, 0, 512, 8, seed=seed + 7, model=other)
    sent0 = await resync_sent(c, "primary")
    c.kill("secondary")
    dst = c.volume_dir("secondary", VOL)
    shutil.rmtree(dst)
    shutil.copytree(c.volume_dir("secondary", "other"), dst)
    await c.start_process("secondary")
    await c.wait_for_volume(VOL, "in_sync", timeout_s=SYNC_TIMEOUT_S)
    sent = await resync_sent(c, "primary") - sent0
    assert sent >= SIZE, f"the rebuilt secondary got {sent} bytes, less than the {SIZE}-byte volume"
    # The unrelated store was moved aside, never deleted.
    aside = c.set_aside_dir("secondary")
    assert aside.is_dir() and any(aside.iterdir()), f"nothing set aside under {aside}"
    await finish(c, model=model)
    # The other volume was not touched by any of this.
    assert (await c.get_volume("other")).state == pb.PAIR_STATE_IN_SYNC
    await assert_replicas_identical(c, "other")


# ---------------------------------------------------------------- promotion


#: A lease refusal says how long: "... lease ... 1.8 s ..." (or ms, seconds).
LEASE_MESSAGE = re.compile(r"lease.*?\d+(\.\d+)? ?(s|ms|sec|seconds)\b", re.IGNORECASE | re.DOTALL)


async def test_primary_sigkill_for_good_promote_waits_for_lease_then_old_primary_fails_back_with_changes(
    cluster_factory: Any, seed: int
) -> None:
    """Fault: kill -9 of the primary under a 4-writer load; promote; the old primary returns later."""
    # The writers stay in the first 8 MiB of a 64 MiB volume: the old primary's
    # divergent extents (its activity log, 4 MiB regions) cover only those, so
    # a changes-only fail-back is measurably smaller than the volume.
    size = 64 << 20
    c = await make_cluster(cluster_factory, size=size)
    w = Workload(c, VOL, size, writers=4, seed=seed, region_size=8 << 20)
    await w.start()
    await w.wait_acked(100)
    c.kill("primary")
    # At once: the old primary may still hold its lease, so the promotion is refused, saying how long.
    with pytest.raises(sc.ClientError) as refused:
        await c.promote(VOL)
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION, refused.value
    assert LEASE_MESSAGE.search(refused.value.message), refused.value.message
    # Then the command line succeeds once the lease certainly expired.
    deadline = time.monotonic() + ROLE_TIMEOUT_S
    while True:
        r = await c.run_cli("promote", VOL)
        if r.returncode == 0:
            break
        assert r.returncode == 1 and "lease" in r.stderr.lower(), (r.returncode, r.stderr)
        assert time.monotonic() < deadline, f"promote still refused after {ROLE_TIMEOUT_S} s: {r.stderr}"
    assert f"primary is now {c.address('secondary')}" in r.stdout, r.stdout
    assert (await c.role_of(VOL)) == {"primary": "secondary", "secondary": "primary"}
    # Writes continue on the new primary, through the same VolumeClient (it follows the coordinator).
    await w.wait_acked(100, timeout_s=60)
    st = await status(c)
    assert st["state"] == "degraded" and st["epoch"] >= 2, st
    sent0 = await resync_sent(c, "secondary")
    # The old primary comes back with its original command line: demoted, resynced with changes only.
    await c.start_process("primary")
    await c.wait_for_volume(VOL, "in_sync", timeout_s=SYNC_TIMEOUT_S)
    await w.wait_acked(50, timeout_s=60)  # replication goes on in sync
    await w.stop()
    sent = await resync_sent(c, "secondary") - sent0
    assert 0 < sent < size // 2, f"fail-back sent {sent} bytes; expected only the changes (< {size // 2})"
    assert (await c.role_of(VOL)) == {"primary": "secondary", "secondary": "primary"}
    await finish(c, w=w)


async def test_promote_refused_without_force_when_degraded(cluster_factory: Any, seed: int) -> None:
    """Faults: kill -9 of the secondary (the pair goes degraded, writes go on), then of the primary;
    the stale secondary returns. Promote without --force is refused; the primary returns instead."""
    c = await make_cluster(cluster_factory)
    cl = await c.connect(VOL)
    model: dict[int, bytes] = {}
    await write_blocks(cl, 0, 128, 8, seed=seed + 1, model=model)
    c.kill("secondary")
    await wait_state(c, VOL, "degraded", timeout_s=30)
    await write_blocks(cl, 256, 256, 8, seed=seed + 2, model=model)  # only on the primary
    await cl.close()
    c.kill("primary")
    await c.start_process("secondary")
    # Refused while the lease runs, then because the secondary is not current: it says --force and what is lost.
    deadline = time.monotonic() + ROLE_TIMEOUT_S
    while True:
        r = await c.run_cli("promote", VOL)
        assert r.returncode == 1, f"promoted a stale secondary without --force: {r.stdout}"
        if "--force" in r.stderr:
            break
        assert "lease" in r.stderr.lower() or "not alive" in r.stderr.lower(), r.stderr
        assert time.monotonic() < deadline, f"no --force refusal within {ROLE_TIMEOUT_S} s: {r.stderr}"
    assert re.search(r"\d+(\.\d+)? ?(B|KiB|MiB|bytes)", r.stderr), f"the refusal does not say what is lost: {r.stderr}"
    assert (await c.role_of(VOL)) == {"primary": "primary", "secondary": "secondary"}
    # The primary returns with its original command line and resyncs the secondary.
    await c.start_process("primary")
    await finish(c, model=model)


async def test_auto_failover_promotes_secondary_after_primary_sigkill(cluster_factory: Any, seed: int) -> None:
    """Fault: kill -9 of the primary of a volume created with --auto-failover, under a 4-writer load."""
    c = await make_cluster(cluster_factory, auto_failover=True)
    assert (await status(c))["auto_failover"]
    w = Workload(c, VOL, SIZE, writers=4, seed=seed)
    await w.start()
    await w.wait_acked(100)
    c.kill("primary")
    waited = await wait_primary_is(c, "secondary")
    # lease + drift + the coordinator noticing the silence, and a generous margin for a loaded box
    bound = LEASE_S + LEASE_DRIFT_S + NODE_TIMEOUT_S + 15.0
    assert waited < bound, f"auto-failover took {waited:.1f} s (bound {bound:.1f} s)"
    await w.wait_acked(100, timeout_s=60)  # writes continue on the new primary
    # The old primary returns (original command line): demoted and resynced.
    await c.start_process("primary")
    await c.wait_for_volume(VOL, "in_sync", timeout_s=SYNC_TIMEOUT_S)
    await w.stop()
    assert (await c.role_of(VOL)) == {"primary": "secondary", "secondary": "primary"}
    await finish(c, w=w)


async def test_forced_promote_of_stale_secondary_loses_only_what_it_lacked(cluster_factory: Any, seed: int) -> None:
    """Faults: kill -9 of the secondary (degraded, writes go on), then of the primary for good (its disk
    replaced); the stale secondary returns and is promoted with --force; the old primary is rebuilt."""
    c = await make_cluster(cluster_factory)
    cl = await c.connect(VOL)
    model: dict[int, bytes] = {}
    await write_blocks(cl, 0, 128, 8, seed=seed + 1, model=model)  # on both nodes
    c.kill("secondary")
    await wait_state(c, VOL, "degraded", timeout_s=30)
    lost: dict[int, bytes] = {}
    await write_blocks(cl, 512, 128, 8, seed=seed + 2, model=lost)  # only on the primary
    await cl.close()
    c.kill("primary")
    await c.start_process("secondary")
    deadline = time.monotonic() + ROLE_TIMEOUT_S
    while True:  # wait for the refusal that is about --force (the lease expires first)
        r = await c.run_cli("promote", VOL)
        assert r.returncode == 1, f"promoted a stale secondary without --force: {r.stdout}"
        if "--force" in r.stderr:
            break
        assert time.monotonic() < deadline, f"no --force refusal within {ROLE_TIMEOUT_S} s: {r.stderr}"
    r = await c.run_cli("promote", VOL, "--force")
    assert r.returncode == 0, r.stderr
    assert f"primary is now {c.address('secondary')}" in r.stdout, r.stdout
    # Writes continue on the promoted node: through a new client, and through the command line.
    cl = await c.connect(VOL)
    await write_blocks(cl, 1024, 128, 8, seed=seed + 3, model=model)
    blob = wl.make_write(seed + 4, 0, 1, 2000 * BLOCK, 2, BLOCK)
    src, dst = c.workdir / "cli-in.bin", c.workdir / "cli-out.bin"
    src.write_bytes(blob)
    r = await c.run_cli("write", VOL, "--offset", str(2000 * BLOCK), "--input", str(src))
    assert r.returncode == 0, r.stderr
    r = await c.run_cli("read", VOL, "--offset", str(2000 * BLOCK), "--length", str(len(blob)),
                        "--output", str(dst))
    assert r.returncode == 0, r.stderr
    assert dst.read_bytes() == blob, "`syncrep read` after the promotion returned other bytes than written"
    model[2000], model[2001] = blob[:BLOCK], blob[BLOCK:]
    r = await c.run_cli("status")
    assert r.returncode == 0 and f"primary {c.address('secondary')} (up)" in r.stdout, r.stdout
    # The old primary is gone for good: its disk is replaced, it comes back empty and is rebuilt.
    c.wipe_data("primary")
    await c.start_process("primary")
    await c.wait_for_volume(VOL, "in_sync", timeout_s=SYNC_TIMEOUT_S)
    assert (await c.role_of(VOL)) == {"primary": "secondary", "secondary": "primary"}
    await finish(c, model=model)
    # What --force lost is exactly what the secondary lacked: those blocks are as before them (zeros).
    await check_model(c, VOL, {b: bytes(BLOCK) for b in lost})
    await cl.close()
