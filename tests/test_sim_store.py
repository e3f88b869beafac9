"""The simulator's in-memory etcd (deploy/simstore.py): the semantics the
coordinators rely on -- CAS on mod_revision, atomic transactions, leases on
the virtual clock -- checked through the REAL EtcdStore and Election on it,
and its fault hooks (a coordinator cut from the store, the store paused)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from coordinator.db import PairExists, PairRecord, StateChange
from coordinator.election import Election
from coordinator.etcd_store import EtcdStore
from coordinator.store import NotLeader, StoreConflict, StoreUnavailable
from deploy.sim import VirtualTimeLoop
from deploy.simstore import SimEtcd
from syncrep.core.pairstate import PairState

PREFIX = b"/syncrep/v1/"
KEY = b"/syncrep/v1/leader"


@pytest.fixture
def loop() -> Iterator[VirtualTimeLoop]:
    lp = VirtualTimeLoop()
    asyncio.set_event_loop(lp)
    yield lp
    lp.close()
    asyncio.set_event_loop(None)


def _etcd(loop: VirtualTimeLoop, seed: int = 1) -> SimEtcd:
    return SimEtcd(loop.time, random.Random(seed), election_key=KEY, data_prefix=PREFIX)


def _pair(epoch: int = 1) -> PairRecord:
    return PairRecord(name="vol", size_bytes=1 << 20, block_size=4096, primary="a:1", secondary="b:1",
                      epoch=epoch)


def _store(etcd: SimEtcd, host: str, fence: object = None) -> EtcdStore:
    return EtcdStore(["sim-etcd:2379"], client=etcd.client(host, inline=True), start_timeout_s=0,
                     fence=fence)  # type: ignore[arg-type]


def test_cas_on_mod_revision_between_two_stores(loop: VirtualTimeLoop) -> None:
    """Two stores on one SimEtcd: the second writer of a volume read at the same
    revision loses its CAS (StoreConflict), writes nothing, and wins after a reload."""
    etcd = SimEtcd(loop.time, random.Random(1))  # no audit: no election here
    a, b = _store(etcd, "c1"), _store(etcd, "c2")
    a.create_pair(_pair(), "created")
    with pytest.raises(PairExists):
        b.create_pair(_pair(), "again")
    assert b.get_pair("vol") is not None
    rev = etcd.revision
    a.save_pair(replace(_pair(), epoch=2), StateChange(PairState.IN_SYNC, "a raises"))
    assert etcd.revision == rev + 1, "one transaction (the pair and its event) is one revision"
    with pytest.raises(StoreConflict):
        b.save_pair(replace(_pair(), epoch=2), StateChange(PairState.IN_SYNC, "b raises the same epoch"))
    assert etcd.revision == rev + 1, "a lost CAS writes nothing"
    b.reload()
    b.save_pair(replace(_pair(), epoch=3), StateChange(PairState.IN_SYNC, "b after reload"))
    assert a.get_pair("vol").epoch == 3  # type: ignore[union-attr]
    assert [e.epoch for e in a.events("vol")] == [1, 2, 3]


def test_a_put_bound_to_a_lease_vanishes_when_it_expires_unless_kept_alive(loop: VirtualTimeLoop) -> None:
    etcd = SimEtcd(loop.time, random.Random(1))
    c = etcd.client("c1", inline=True)

    def run(coro: Any) -> Any:
        return loop.run_until_complete(coro)

    lease = run(c.lease(2))
    t = c.transactions
    ok, _ = run(c.transaction(compare=[t.create(b"k") == 0], success=[t.put(b"k", b"v", lease=lease.id)],
                              failure=[]))
    assert ok
    ok, _ = run(c.transaction(compare=[t.create(b"k") == 0], success=[t.put(b"k", b"w")], failure=[]))
    assert not ok, "the key exists: the create compare fails"
    loop.advance(1.5)
    assert run(c.refresh_lease(lease.id)).TTL == 2
    loop.advance(1.5)
    assert run(c.get(b"k")) is not None, "kept alive 1.5 s ago: still there"
    loop.advance(0.6)
    assert run(c.get(b"k")) is None, "expired: its key is deleted"
    assert run(c.refresh_lease(lease.id)).TTL == 0
    with pytest.raises(Exception, match="lease not found"):
        run(c.transaction(compare=[], success=[t.put(b"k2", b"v", lease=lease.id)], failure=[]))


def test_a_value_compare_on_a_missing_key_fails_and_ranges_compare_every_key(loop: VirtualTimeLoop) -> None:
    etcd = SimEtcd(loop.time, random.Random(1))
    c = etcd.client("c1", inline=True)
    t = c.transactions
    run = loop.run_until_complete
    assert not run(c.transaction(compare=[t.value(b"x") != b"a"], success=[], failure=[]))[0]
    assert run(c.transaction(compare=[t.create(b"p/", b"p0") == 0], success=[t.put(b"p/1", b"1")],
                             failure=[]))[0]
    assert not run(c.transaction(compare=[t.create(b"p/", b"p0") == 0], success=[], failure=[]))[0]


def test_a_deposed_leaders_write_is_refused_by_its_fence_and_nothing_is_written(loop: VirtualTimeLoop) -> None:
    """The real Election on the fake: c1 wins; cut from the store it loses its
    view within TTL - margin, the store expires its lease, c2 wins. A write of
    c1 sent before the cut and applied late (held) is refused by the fence."""
    etcd = _etcd(loop, seed=3)
    e1 = Election(etcd.client("c1", inline=False), "c1:7000", ttl_s=2, campaign_interval_s=0.25,
                  clock=loop.time)
    e2 = Election(etcd.client("c2", inline=False), "c2:7000", ttl_s=2, campaign_interval_s=0.25,
                  clock=loop.time)
    s1 = _store(etcd, "c1", fence=e1.fence)
    s2 = _store(etcd, "c2", fence=e2.fence)

    async def scenario() -> None:
        await e1.start()
        await asyncio.sleep(0.5)
        await e2.start()
        await asyncio.sleep(0.5)
        assert e1.is_leader() and not e2.is_leader() and e2.leader() == "c1:7000"
        s1.create_pair(_pair(), "created by c1")
        with pytest.raises(NotLeader):
            s2.upsert_node("n:1", "primary")
        s2.reload()
        fence_before = e1.fence()
        assert fence_before is not None
        etcd.cut("c1")
        etcd.next_fates.append("delayed")  # c1's next write reaches the store late
        with pytest.raises(StoreUnavailable):
            s1.save_pair(replace(_pair(), epoch=2), StateChange(PairState.IN_SYNC, "c1, late"))
        assert len(etcd.held) == 1
        await asyncio.sleep(2.0)
        assert not e1.is_leader(), "cut from the store, c1 stops leading within the TTL"
        await asyncio.sleep(1.5)
        assert e2.is_leader(), "the store expired c1's lease and c2 won"
        s2.save_pair(replace(_pair(), epoch=2), StateChange(PairState.IN_SYNC, "c2 raises"))
        refused = etcd.fenced_refusals
        etcd.heal("c1")
        assert etcd.fenced_refusals == refused + 1, "c1's late write was refused by its fence"
        assert s2.get_pair("vol").epoch == 2  # type: ignore[union-attr]
        assert [e.reason for e in s2.events("vol")] == ["created by c1", "c2 raises"]
        await asyncio.sleep(3.0)  # (its keepalive sent during the cut times out first: 2 s)
        assert not e1.is_leader() and e1.leader() == "c2:7000"
        await e1.resign()
        await e2.resign()

    loop.run_until_complete(scenario())
    assert etcd.violations == []


def test_the_audit_catches_an_unfenced_write_and_a_stale_term(loop: VirtualTimeLoop) -> None:
    etcd = _etcd(loop)
    s = _store(etcd, "c1")  # no fence: a coordinator that would write without checking it leads
    s.upsert_node("n:1", "primary")
    assert etcd.violations and "unfenced" in etcd.violations[0]


def test_a_paused_store_answers_nothing_expires_nothing_and_renews_every_lease_on_resume(
        loop: VirtualTimeLoop) -> None:
    etcd = _etcd(loop)
    e1 = Election(etcd.client("c1", inline=False), "c1:7000", ttl_s=2, campaign_interval_s=0.25,
                  clock=loop.time)
    s1 = _store(etcd, "c1", fence=e1.fence)

    async def scenario() -> None:
        await e1.start()
        await asyncio.sleep(0.5)
        assert e1.is_leader()
        etcd.pause()
        with pytest.raises(StoreUnavailable):
            s1.list_pairs()
        await asyncio.sleep(5.0)
        assert not e1.is_leader() and e1.why_not_leader().startswith("cannot reach etcd")
        etcd.resume()
        await asyncio.sleep(3.0)  # (its keepalive sent during the pause times out first: 2 s)
        assert e1.is_leader(), "the store answers again: it leads again"
        await e1.resign()

    loop.run_until_complete(scenario())
    # Won; the old lease (renewed by the store's new raft leader, but no longer
    # refreshed by c1, whose view of it had expired during the pause) expired;
    # won again with a new lease; resigned. Nothing expired while paused.
    assert etcd.leader_changes == 4
