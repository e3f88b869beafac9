"""``syncrep coordinator migrate --from DIR --to etcd://...`` (issue 12), real processes.

A real coordinator's SQLite state (a LocalCluster with a volume, degraded
with failed extents, and a grant) is migrated to a real etcd
(tests/etcd_fixture.py); a coordinator started on that etcd, at the same
address, serves the same volume state to the nodes that kept running, and
the pair resyncs to in_sync. Ends with the replicas compared block for block
and every acknowledged write checked.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from dataclasses import replace
from typing import Any

import pytest
from e2e_helpers import Workload, assert_replicas_identical, check_no_lost_writes
from etcd_fixture import EtcdCluster, fixture_etcd  # noqa: F401

from coordinator.db import DB_FILENAME, CoordinatorDB
from coordinator.etcd_store import EtcdStore
from coordinator.migrate import MigrateError, migrate
from deploy.cluster import LocalCluster
from syncrep import client as sc
from syncrep.pb import syncrep_pb2 as pb

pytestmark = pytest.mark.e2e

VOL = "vol0"
SIZE = 16 << 20
BLOCK = 4096
COORDINATOR = ["--lease-s", "2.0", "--lease-drift-s", "0.2", "--node-timeout-s", "1.5",
               "--no-auto-resync"]
SYNC_TIMEOUT_S = 90.0


def run_migrate(c: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "syncrep", "coordinator", "migrate", *args],
                          capture_output=True, text=True, timeout=60, env=c._environ())


async def test_migrate_degraded_volume_then_serve_it_from_etcd(
    cluster_factory: Any, etcd: EtcdCluster, seed: int
) -> None:
    """Faults: ENOSPC NACKs from the secondary under a 4-writer load (degraded,
    failed extents: certain, unlike the in-flight writes a kill happens to
    catch), kill -9 of the secondary, then the coordinator stopped and its state migrated to etcd; a
    coordinator on etcd at the same address takes the nodes over with the same
    pair state (epoch, roles, failed extents, generations), grant and events;
    the secondary returns and is resynced. The writers' seed is ``seed``."""
    c: LocalCluster = cluster_factory(coordinator_args=COORDINATOR, secondary_args=["--enable-fault-injection"])
    await c.start()
    await c.create_volume(VOL, SIZE, BLOCK)
    assert (await c.run_cli("grant", "alice", "--volume", VOL, "--read-only")).returncode == 0
    w = Workload(c, VOL, SIZE, writers=4, seed=seed)
    await w.start()
    await w.wait_acked(50)
    await sc.inject_fault(c.secondary_addr, VOL, "enospc", 1_000_000)
    await c.wait_for_volume(VOL, lambda st: st.state == pb.PAIR_STATE_DEGRADED and st.failed_bytes > 0,
                            timeout_s=SYNC_TIMEOUT_S)
    c.kill("secondary")
    await w.stop_writers()
    await c.stop("coordinator")
    db = CoordinatorDB(c.data_dir("coordinator") / DB_FILENAME)
    try:
        pairs, nodes, grants, events = db.list_pairs(), db.list_nodes(), db.list_grants(), db.events()
    finally:
        db.close()
    assert pairs[0].failed_extents, pairs

    # The CLI: what it copied, one line.
    r = await asyncio.to_thread(run_migrate, c, "--from", str(c.data_dir("coordinator")), "--to", etcd.url)
    assert r.returncode == 0, r.stderr
    assert f"1 volumes ({VOL})" in r.stdout and "2 nodes" in r.stdout and "1 grants" in r.stdout, r.stdout
    assert f"{len(events)} events" in r.stdout, r.stdout
    # A second run: the target holds state now, refused (nothing overwritten), saying why.
    r = await asyncio.to_thread(run_migrate, c, "--from", str(c.data_dir("coordinator")), "--to", etcd.url)
    assert r.returncode == 1 and "already holds coordinator state" in r.stderr, (r.returncode, r.stderr)
    with pytest.raises(MigrateError, match="no coordinator database"):
        migrate(c.workdir / "nowhere", etcd.url)

    # The copy is exact.
    store = await asyncio.to_thread(EtcdStore, etcd.endpoints)
    try:
        assert store.list_pairs() == pairs
        assert sorted(store.list_nodes(), key=lambda n: n.address) == sorted(nodes, key=lambda n: n.address)
        assert store.list_grants() == grants
        assert [replace(e, id=0) for e in store.events()] == [replace(e, id=0) for e in events]
    finally:
        await asyncio.to_thread(store.close)

    # A coordinator on etcd, same address: serves the same state to the running nodes.
    c.store = etcd.url
    await c.start_process("coordinator")
    await c.leader()
    # Led and heard from the primary (a follower's answer knows no liveness).
    st = await c.wait_for_volume(VOL, lambda st: st.primary_alive and st.last_seq > 0, timeout_s=SYNC_TIMEOUT_S)
    assert (st.epoch, st.primary, st.secondary, st.generation) == (
        pairs[0].epoch, pairs[0].primary, pairs[0].secondary, pairs[0].generation)
    assert st.state == pb.PAIR_STATE_DEGRADED and st.failed_bytes == sum(e.length for e in pairs[0].failed_extents)
    assert [(g.user, g.read_only) for g in await sc.list_grants(c.coordinator_addr, VOL)] == [("alice", True)]
    await c.start_process("secondary")
    r = await c.run_cli("status", "--json")
    assert r.returncode == 0, r.stderr
    # Resync by hand (--no-auto-resync kept the failed extents for the comparison above).
    c.set_args("coordinator", [a for a in COORDINATOR if a != "--no-auto-resync"])
    await c.stop("coordinator")
    await c.start_process("coordinator")
    await c.wait_for_volume(VOL, "in_sync", timeout_s=SYNC_TIMEOUT_S)
    await w.start()
    await w.wait_acked(50, timeout_s=60)
    await w.stop()
    await c.wait_for_volume(VOL, "in_sync", timeout_s=SYNC_TIMEOUT_S)
    await assert_replicas_identical(c, VOL)
    await check_no_lost_writes(c, VOL, w)
