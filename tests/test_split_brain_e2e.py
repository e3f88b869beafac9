"""Split brain after a forced promote, and `syncrep resolve` (docs/FAILOVER.md section 6), real processes.

The fault, in both tests: kill -9 of the secondary (the pair goes degraded, the
primary acknowledges writes alone), then kill -9 of the primary; the stale
secondary comes back and is promoted with --force and acknowledges writes of
its own; then the old primary comes back with its old command line. Both
replicas moved on from their common generation: the pair is split_brain and
nothing is resynced. `syncrep resolve --keep` then keeps one side.

Each test ENDS with the pair in_sync, the replicas compared block for block,
every acknowledged write of the kept side present, and every acknowledged
write of the discarded side either present or inside the extents resolve
reported as discarded (the checker's invariant of issue 10); the discarded
side's writes are then read back from the snapshot resolve kept on its node.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from e2e_helpers import assert_replicas_identical, check_model, wait_state, write_blocks
from test_failover_e2e import ROLE_TIMEOUT_S, SYNC_TIMEOUT_S, VOL, make_cluster

from deploy.cluster import LocalCluster
from syncrep import rpc
from syncrep.pb import syncrep_pb2 as pb
from syncrep.pb import syncrep_pb2_grpc as pbg

pytestmark = pytest.mark.e2e

BLOCK = 4096


async def _split_brain(c: LocalCluster, seed: int) -> tuple[dict[int, bytes], dict[int, bytes], dict[int, bytes]]:
    """Drive the pair into split brain. Returns (written while in sync, written by the old primary alone,
    written by the force-promoted secondary): the block -> bytes each side acknowledged."""
    cl = await c.connect(VOL)
    common: dict[int, bytes] = {}
    await write_blocks(cl, 0, 64, 8, seed=seed + 1, model=common)
    c.kill("secondary")
    await wait_state(c, VOL, "degraded", timeout_s=30)
    old_alone: dict[int, bytes] = {}
    await write_blocks(cl, 512, 64, 8, seed=seed + 2, model=old_alone)
    await cl.close()
    c.kill("primary")
    await c.start_process("secondary")
    import time

    deadline = time.monotonic() + ROLE_TIMEOUT_S
    while True:  # the lease expires first; then the refusal is about --force
        r = await c.run_cli("promote", VOL)
        assert r.returncode == 1, f"promoted a stale secondary without --force: {r.stdout}"
        if "--force" in r.stderr:
            break
        assert time.monotonic() < deadline, r.stderr
    r = await c.run_cli("promote", VOL, "--force")
    assert r.returncode == 0, r.stderr
    cl = await c.connect(VOL)
    new_alone: dict[int, bytes] = {}
    await write_blocks(cl, 1024, 64, 8, seed=seed + 3, model=new_alone)
    # Overlap: the new primary also rewrites blocks the old one wrote alone.
    await write_blocks(cl, 520, 8, 8, seed=seed + 4, model=new_alone)
    await cl.close()
    await c.start_process("primary")  # the old primary returns: demoted, both moved on
    await wait_state(c, VOL, "split_brain", timeout_s=ROLE_TIMEOUT_S)
    return common, old_alone, new_alone


def _inside(block: int, extents: list[list[int]]) -> bool:
    off = block * BLOCK
    return any(o <= off and off + BLOCK <= o + n for o, n in extents)


async def _snapshot_blocks(addr: str, snapshot_id: int, blocks: dict[int, bytes]) -> dict[int, bytes]:
    got: dict[int, bytes] = {}
    async with rpc.channel(addr) as ch:
        stub = pbg.NodeServiceStub(ch)
        for b in blocks:
            r = await stub.ReadLocal(
                pb.ReadRequest(volume=VOL, offset=b * BLOCK, length=BLOCK, snapshot_id=snapshot_id), timeout=10)
            got[b] = bytes(r.data)
    return got


async def _resolve_and_check(c: LocalCluster, seed: int, keep_proc: str) -> None:
    common, old_alone, new_alone = await _split_brain(c, seed)
    # The promoted process "secondary" is the primary now; the old primary is its secondary.
    kept_model, lost_model = (new_alone, old_alone) if keep_proc == "secondary" else (old_alone, new_alone)
    discard_proc = "primary" if keep_proc == "secondary" else "secondary"

    doc = await c.status_json(VOL)
    assert doc["state"] == "split_brain", doc
    assert doc["split_brain"] and doc["split_brain"]["common_generation"], doc
    assert doc["split_brain"]["secondary_changed_bytes"] >= len(old_alone) * BLOCK, doc
    # Bad input changes nothing: a node that is not the pair's.
    r = await c.run_cli("resolve", VOL, "--keep", "127.0.0.1:1")
    assert r.returncode == 1 and "neither of its nodes" in r.stderr, (r.stdout, r.stderr)
    assert (await c.status_json(VOL))["state"] == "split_brain"

    r = await c.run_cli("resolve", VOL, "--keep", c.address(keep_proc), "--json")
    assert r.returncode == 0, r.stderr
    # First printed (stderr with --json): what the other side loses.
    assert "loses what it wrote since the common generation" in r.stderr, r.stderr
    res = json.loads(r.stdout)
    assert res["kept"] == c.address(keep_proc) and res["discarded"] == c.address(discard_proc), res
    assert res["discarded_exact"], res
    assert res["discard_snapshot"].startswith("split-brain-discarded-") and res["discard_snapshot_id"], res
    extents = res["discarded_extents"]
    assert res["discarded_bytes"] == sum(n for _, n in extents) > 0, res
    # Every acknowledged write of the discarded side since the common generation is inside the report.
    outside = [b for b in lost_model if not _inside(b, extents)]
    assert not outside, f"discarded writes not reported: blocks {outside[:8]} (report {extents})"
    # A resolve of a pair no longer split-brained is refused.
    r2 = await c.run_cli("resolve", VOL, "--keep", c.address(keep_proc))
    assert r2.returncode == 1 and "not in split brain" in r2.stderr, (r2.stdout, r2.stderr)

    await c.wait_for_volume(VOL, "in_sync", timeout_s=SYNC_TIMEOUT_S)
    assert await c.current_primary_addr(VOL) == c.address(keep_proc)
    await assert_replicas_identical(c, VOL)
    # The kept side's writes all there (the common ones too, unless the kept side rewrote them).
    await check_model(c, VOL, {**common, **kept_model})
    # The discarded side's writes: only those the kept side rewrote hold other data; the rest hold what
    # the kept side has there (zeros: it never wrote those blocks).
    await check_model(c, VOL, {b: bytes(BLOCK) for b in lost_model if b not in kept_model and b not in common})
    # Nothing is lost for good: the discarded writes are in the snapshot on the discarded node.
    snap = await _snapshot_blocks(c.address(discard_proc), res["discard_snapshot_id"], lost_model)
    wrong = [b for b, want in lost_model.items() if snap[b] != want]
    assert not wrong, f"the discard snapshot lacks the discarded writes at blocks {wrong[:8]}"
    # Resync sent changes only, not the volume.
    doc = await c.status_json(VOL)
    assert doc["state"] == "in_sync" and doc["split_brain"] is None, doc
    # Writes continue on the kept primary.
    cl = await c.connect(VOL)
    after: dict[int, bytes] = {}
    await write_blocks(cl, 2048, 16, 8, seed=seed + 9, model=after)
    await cl.close()
    await c.wait_for_volume(VOL, "in_sync", timeout_s=SYNC_TIMEOUT_S)
    await assert_replicas_identical(c, VOL)
    await check_model(c, VOL, after)


async def test_forced_promote_split_brain_resolved_keeping_the_new_primary(cluster_factory: Any, seed: int) -> None:
    """Faults: kill -9 of the secondary, then of the primary; forced promote; the old primary returns.
    Resolve keeps the force-promoted primary: the old primary's writes alone are discarded."""
    c = await make_cluster(cluster_factory)
    await _resolve_and_check(c, seed, keep_proc="secondary")


async def test_forced_promote_split_brain_resolved_keeping_the_old_primary(cluster_factory: Any, seed: int) -> None:
    """Faults: as above. Resolve keeps the returning old primary (now the secondary): it becomes the
    primary again, and the force-promoted node's writes are discarded."""
    c = await make_cluster(cluster_factory)
    await _resolve_and_check(c, seed, keep_proc="primary")
