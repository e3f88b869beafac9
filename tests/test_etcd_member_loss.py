"""One etcd member of three lost (issue 12: "one etcd member lost: no
interruption"), real processes end to end: 3 coordinators on a 3-member etcd,
a pair under a writing load, mutual TLS. Every wait is a bounded poll; the
test ends in sync, replicas compared block for block, every acknowledged
write checked (the helpers of tests/test_coordinator_ha.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from e2e_helpers import Workload
from etcd_fixture import EtcdCluster, fixture_etcd_cluster3  # noqa: F401
from test_coordinator_ha import SIZE, SYNC_TIMEOUT_S, VOL, finish, infos, make_cluster

from coordinator.election import DEFAULT_TTL_S
from syncrep.pb import syncrep_pb2 as pb

pytestmark = pytest.mark.e2e

#: The election TTL here is the default one (5 s), not the HA tests' 2 s:
#: "no interruption" is a promise of the defaults. With a 2 s TTL a leader
#: holds through 1 s with no keepalive answered (TTL/2), about as long as etcd
#: takes to elect a new raft leader on a loaded 2-core box: CI once saw 1.5 s,
#: the old leader stepped down and, the lease extended by etcd's new raft
#: leader, nobody led for 3 s. With 5 s it holds through 2.5 s.
ELECTION_TTL_S = DEFAULT_TTL_S
#: How long the leader is watched after the member's loss: several election
#: TTLs, so a leadership that did not survive it would have shown.
WATCH_S = 2 * ELECTION_TTL_S + 1.0


@pytest.mark.parametrize("which", ["raft_leader", "raft_follower"])
async def test_one_etcd_member_kill9_no_interruption(
    cluster_factory: Any, etcd_cluster3: EtcdCluster, seed: int, which: str
) -> None:
    """Fault: kill -9 of one etcd member of three under a 4-writer load: the
    member that leads etcd's raft (etcd has no leader until the other two
    elect one, 0.5-1 s with the fixture's timings, 1.5 s seen in CI:
    keepalives sent meanwhile fail or wait) or a follower (the RPCs in flight on its connection fail).
    CI once failed here when the killed member happened to lead the raft: the
    first failed keepalive ended leadership at once. No interruption: the
    same coordinator leads throughout (polled every 0.2 s for several
    election TTLs), writes go on, and a failure meanwhile is handled on the
    two members left (the secondary killed: degraded; back: resynced to
    in_sync). Then the member returns. The writers' seed is ``seed``."""
    etcd = etcd_cluster3
    c = await make_cluster(cluster_factory, etcd, election_ttl_s=ELECTION_TTL_S)
    w = Workload(c, VOL, SIZE, writers=4, seed=seed)
    await w.start()
    await w.wait_acked(100)
    leader = await c.leader()
    raft_leader = await asyncio.to_thread(etcd.raft_leader)
    member = raft_leader if which == "raft_leader" else (raft_leader + 1) % len(etcd.members)
    await asyncio.to_thread(etcd.kill, member)
    seen: list[tuple[float, list[str]]] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < WATCH_S:
        leading = sorted(n for n, i in (await infos(c)).items() if i["state"] == "leader")
        seen.append((round(time.monotonic() - t0, 2), leading))
        await asyncio.sleep(0.2)  # the poll's period, not a wait for a condition
    changed = [(t, who) for t, who in seen if who != [leader]]
    print(f"etcd member {member} ({which}) killed; leader {leader}; {len(seen)} polls over {WATCH_S:g} s; "
          f"other answers: {changed}")
    assert not changed, f"leadership interrupted after etcd member {member} was lost: {changed}"
    await w.wait_acked(100, timeout_s=60)
    # A failure on the two members left: handled by the same leader.
    c.kill("secondary")
    await c.wait_for_volume(VOL, lambda st: st.state == pb.PAIR_STATE_DEGRADED, timeout_s=SYNC_TIMEOUT_S)
    await w.wait_acked(100, timeout_s=60)
    await c.start_process("secondary")
    await c.wait_for_volume(VOL, "in_sync", timeout_s=SYNC_TIMEOUT_S)
    assert await c.leader() == leader
    await asyncio.to_thread(etcd.start_member, member)
    await w.wait_acked(50, timeout_s=60)
    await w.stop()
    await finish(c, w)
