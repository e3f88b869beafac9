"""The coordinator's store on etcd (issue 12): the same behaviour as SQLite's, plus CAS and fencing.

The behavioural cases of tests/test_coordinator_db.py run here against BOTH
stores (``store`` is parametrized: "sqlite" and "etcd"): ``reopen()`` gives a
new store on the same state (a coordinator restart). The SQLite-only cases
(pragmas, migrations of its files) stay in that file. Then the etcd store's
own faults, against a real etcd started by the test (tests/etcd_fixture.py):
a CAS lost between two stores, a deposed leader fenced, two stores racing to
raise one volume's epoch (no epoch handed out twice), etcd paused or
unreachable, a store holding another schema or cluster.

A store has no replicas to compare: every test that injects a fault ends by
checking that every write the store acknowledged is there, and nothing else.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aetcd  # type: ignore[import-untyped]
import pytest
from etcd_fixture import EtcdCluster, etcd_binary, fixture_etcd  # noqa: F401  (the etcd fixture)

from coordinator.db import (
    DB_FILENAME,
    CoordinatorDB,
    DBError,
    GrantRecord,
    PairExists,
    PairRecord,
    ProgressRecord,
    StateChange,
)
from coordinator.election import Election
from coordinator.etcd_store import DEFAULT_PREFIX, EtcdStore, grpc_target
from coordinator.store import (
    STORE_METHODS,
    NotLeader,
    Store,
    StoreConflict,
    StoreSpec,
    StoreUnavailable,
    parse_store_url,
)
from deploy.cluster import free_port
from syncrep.blockstore import Extent
from syncrep.core.pairstate import PairState

Opener = Callable[[], Any]


def _pair(name: str = "vol1", **kw: object) -> PairRecord:
    base = PairRecord(
        name=name,
        size_bytes=64 * 1024 * 1024,
        block_size=4096,
        primary="127.0.0.1:7001",
        secondary="127.0.0.1:7002",
        resync_mode=2,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


@pytest.fixture(params=["sqlite", "etcd"])
def reopen(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """``reopen()`` -> a new store on this test's state (SQLite file, or etcd prefix); all closed at the end."""
    opened: list[Any] = []
    if request.param == "sqlite":
        path = tmp_path / "data" / DB_FILENAME

        def open_one() -> Any:
            opened.append(CoordinatorDB(path))
            return opened[-1]
    else:
        cluster: EtcdCluster = request.getfixturevalue("etcd")

        def open_one() -> Any:
            opened.append(EtcdStore(cluster.endpoints, start_timeout_s=5.0))
            return opened[-1]

    yield open_one
    for s in opened:
        s.close()


# ---------------------------------------------------------------- the interface


def test_both_stores_satisfy_the_store_protocol() -> None:
    """CoordinatorDB and EtcdStore have every Store method with its exact signature."""
    assert {"save_pair", "create_pair", "update_progress", "delete_pair", "set_grant", "close"} <= set(
        STORE_METHODS
    )
    for impl in (CoordinatorDB, EtcdStore):
        for name in STORE_METHODS:
            want = inspect.signature(getattr(Store, name))
            got = inspect.signature(getattr(impl, name))
            assert str(got) == str(want), f"{impl.__name__}.{name}{got} != Store.{name}{want}"


def test_store_protocol_isinstance(tmp_path: Path) -> None:
    with CoordinatorDB(tmp_path / DB_FILENAME) as db:
        assert isinstance(db, Store)


def _typecheck(db: CoordinatorDB, es: EtcdStore) -> None:  # checked by mypy, never run
    s: Store = db
    s = es
    del s


# ---------------------------------------------------------------- the shared behaviour


def test_nodes_persist_and_upsert(reopen: Opener) -> None:
    db = reopen()
    db.upsert_node("127.0.0.1:7001", "primary", registered_at=100.0)
    db.upsert_node("127.0.0.1:7002", "secondary", registered_at=101.0)
    db.upsert_node("127.0.0.1:7001", "secondary", registered_at=102.0)
    db.close()
    db = reopen()
    assert [(n.address, n.role_hint, n.registered_at) for n in db.list_nodes()] == [
        ("127.0.0.1:7001", "secondary", 102.0),
        ("127.0.0.1:7002", "secondary", 101.0),
    ]
    assert db.get_node("127.0.0.1:7002") is not None
    assert db.get_node("127.0.0.1:9999") is None


def test_pair_roundtrip_all_fields(reopen: Opener) -> None:
    pair = _pair(
        epoch=7,
        state=PairState.DEGRADED,
        failed_extents=(Extent(0, 4096), Extent(10_000, 3)),
        fault_snapshot_id=2**64 - 1,
        progress=ProgressRecord(bytes_done=5, bytes_total=10, rate_bytes_per_s=1.5, eta_s=3.25, round=2),
        last_error="NACK: EIO",
        state_changed_at=1234.5,
        created_at=1000.0,
        volume_uuid="u" * 32,
        generation=2**64 - 1,
        secondary_generation=5,
        auto_failover=True,
        full_copy_pending=True,
        revert_generation=2**63 + 1,
    )
    db = reopen()
    assert db.create_pair(pair, "created") == pair
    db.close()
    db = reopen()
    assert db.get_pair("vol1") == pair
    assert db.list_pairs() == [pair]
    assert db.pairs_for_node("127.0.0.1:7002") == [pair]
    assert db.pairs_for_node("127.0.0.1:7003") == []


def test_create_sets_timestamps_and_event(reopen: Opener) -> None:
    db = reopen()
    p = db.create_pair(_pair(), "created by test")
    assert p.created_at > 0 and p.state_changed_at > 0
    (ev,) = db.events("vol1")
    assert (ev.from_state, ev.to_state, ev.epoch, ev.reason) == (
        None,
        PairState.IN_SYNC,
        1,
        "created by test",
    )


def test_duplicate_pair(reopen: Opener) -> None:
    db = reopen()
    db.create_pair(_pair(), "first")
    with pytest.raises(PairExists, match="vol1"):
        db.create_pair(_pair(primary="127.0.0.1:8001"), "second")
    assert len(db.events("vol1")) == 1
    assert db.get_pair("vol1") == db.list_pairs()[0]
    # A second coordinator's store sees the name taken too.
    with pytest.raises(PairExists):
        reopen().create_pair(_pair(), "third")


def test_save_pair_with_event_and_reopen(reopen: Opener) -> None:
    db = reopen()
    p = db.create_pair(_pair(), "created")
    p = db.save_pair(
        replace(
            p, state=PairState.DEGRADED, failed_extents=(Extent(0, 10), Extent(20, 5)), fault_snapshot_id=3
        ),
        StateChange(PairState.IN_SYNC, "secondary failed: EIO"),
    )
    p = db.save_pair(
        replace(p, epoch=2, state=PairState.RESYNCING), StateChange(PairState.DEGRADED, "resync")
    )
    p = db.save_pair(replace(p, failed_extents=(Extent(0, 30),)))  # extents replaced, not appended
    db.close()
    db = reopen()
    assert db.get_pair("vol1") == p
    evs = db.events("vol1")
    assert [(e.from_state, e.to_state, e.epoch) for e in evs] == [
        (None, PairState.IN_SYNC, 1),
        (PairState.IN_SYNC, PairState.DEGRADED, 1),
        (PairState.DEGRADED, PairState.RESYNCING, 2),
    ]
    assert evs[1].reason == "secondary failed: EIO"
    assert [e.id for e in evs] == sorted(e.id for e in evs)
    assert [e.to_state for e in db.events("vol1", limit=1)] == [PairState.RESYNCING]
    assert db.resync_started_at_epoch("vol1", 2)
    assert not db.resync_started_at_epoch("vol1", 1)


def test_save_unknown_pair(reopen: Opener) -> None:
    with pytest.raises(KeyError, match="nope"):
        reopen().save_pair(_pair("nope"))


def test_update_progress_only(reopen: Opener) -> None:
    db = reopen()
    p = db.create_pair(_pair(state=PairState.RESYNCING, failed_extents=(Extent(5, 5),)), "created")
    db.update_progress(
        "vol1", ProgressRecord(bytes_done=1, bytes_total=2, rate_bytes_per_s=3.0, eta_s=4.0, round=1)
    )
    db.update_progress("unknown", ProgressRecord(1, 2, 3.0, 4.0, 1))  # changes nothing, as in SQLite
    db.close()
    assert reopen().get_pair("vol1") == replace(p, progress=ProgressRecord(1, 2, 3.0, 4.0, 1))


def test_delete_pair(reopen: Opener) -> None:
    db = reopen()
    db.create_pair(_pair(failed_extents=(Extent(0, 1),)), "created")
    assert db.delete_pair("vol1", "rolled back")
    assert not db.delete_pair("vol1", "again")
    assert db.get_pair("vol1") is None
    db.close()
    db = reopen()
    assert db.list_pairs() == []
    assert [(e.from_state, e.to_state) for e in db.events("vol1")] == [
        (None, PairState.IN_SYNC),
        (PairState.IN_SYNC, None),
    ]
    db.create_pair(_pair(), "recreated")  # the name can be used again; its history goes on
    assert [e.reason for e in db.events("vol1")] == ["created", "rolled back", "recreated"]


def test_resize_pair_persists_the_size_and_its_event(reopen: Opener) -> None:
    """Issue 13 on both stores: resize_pair changes the size only, records the event (same
    state, same epoch) in the same transaction; a later save_pair keeps the new size."""
    db = reopen()
    p = db.create_pair(_pair(epoch=3, failed_extents=(Extent(0, 4096),)), "created")
    grown = db.resize_pair("vol1", 128 << 20, "grown online from 64 MiB to 128 MiB", at=500.0)
    assert grown == replace(p, size_bytes=128 << 20)
    db.save_pair(replace(grown, size_bytes=1, state=PairState.DEGRADED), StateChange(PairState.IN_SYNC, "failed"))
    with pytest.raises(KeyError, match="'nope' does not exist"):
        db.resize_pair("nope", 128 << 20, "never")
    db.close()
    db = reopen()
    got = db.get_pair("vol1")
    assert got is not None and got.size_bytes == 128 << 20 and got.state is PairState.DEGRADED
    assert got.failed_extents == (Extent(0, 4096),) and got.epoch == 3
    evs = db.events("vol1")
    assert [(e.from_state, e.to_state, e.epoch, e.reason) for e in evs] == [
        (None, PairState.IN_SYNC, 3, "created"),
        (PairState.IN_SYNC, PairState.IN_SYNC, 3, "grown online from 64 MiB to 128 MiB"),
        (PairState.IN_SYNC, PairState.DEGRADED, 3, "failed"),
    ]
    assert evs[1].ts == 500.0
    # A store that never read the volume may resize it: the record is read, only the size changes.
    assert reopen().resize_pair("vol1", 256 << 20, "again").size_bytes == 256 << 20
    got = reopen().get_pair("vol1")
    assert got is not None and got.size_bytes == 256 << 20 and got.state is PairState.DEGRADED


def test_many_extents(reopen: Opener) -> None:
    exts = tuple(Extent(i * 8192, 4096) for i in range(5000))
    reopen().create_pair(_pair(failed_extents=exts), "created")
    got = reopen().get_pair("vol1")
    assert got is not None and got.failed_extents == exts


def test_events_all_volumes_in_order(reopen: Opener) -> None:
    db = reopen()
    db.create_pair(_pair("a"), "a")
    db.create_pair(_pair("b"), "b")
    db.save_pair(replace(_pair("a"), state=PairState.DEGRADED), StateChange(PairState.IN_SYNC, "a degraded"))
    assert [e.reason for e in db.events()] == ["a", "b", "a degraded"]
    assert [e.reason for e in db.events(limit=2)] == ["b", "a degraded"]


def test_odd_names_stay_apart(reopen: Opener) -> None:
    """Names that share a prefix, or hold '/' and '%', do not mix (keys are percent-encoded)."""
    db = reopen()
    db.create_pair(_pair("a"), "a")
    db.create_pair(_pair("ab"), "ab")
    db.set_grant("a", "CN=x/y%z", False, at=1.0)
    db.upsert_node("[::1]:7001", "primary", registered_at=1.0)
    assert [e.volume for e in db.events("a")] == ["a"]
    assert db.list_grants("ab") == []
    assert db.list_grants("a") == [GrantRecord("a", "CN=x/y%z", False, 1.0)]
    assert [n.address for n in db.list_nodes()] == ["[::1]:7001"]


def test_grants_persist_replace_and_revoke(reopen: Opener) -> None:
    db = reopen()
    db.create_pair(_pair("a"), "a")
    db.create_pair(_pair("b"), "b")
    assert db.set_grant("b", "alice", False, at=1.0) is None
    assert db.set_grant("a", "carol", True, at=2.0) is None
    assert db.set_grant("a", "alice", True, at=3.0) is None
    assert db.set_grant("a", "alice", False, at=4.0) == GrantRecord("a", "alice", True, 3.0)
    db.close()
    db = reopen()
    assert db.list_grants() == [
        GrantRecord("a", "alice", False, 4.0),
        GrantRecord("a", "carol", True, 2.0),
        GrantRecord("b", "alice", False, 1.0),
    ]
    assert [g.user for g in db.list_grants("a")] == ["alice", "carol"]
    assert db.delete_grant("a", "carol") == GrantRecord("a", "carol", True, 2.0)
    assert db.delete_grant("a", "carol") is None
    assert [(g.volume, g.user) for g in reopen().list_grants()] == [("a", "alice"), ("b", "alice")]


def test_grant_on_unknown_volume_refused(reopen: Opener) -> None:
    """Fault: a grant for a volume that does not exist."""
    with pytest.raises(KeyError, match="'nope' does not exist"):
        reopen().set_grant("nope", "alice", False)
    assert reopen().list_grants() == []


def test_deleting_a_pair_drops_its_grants(reopen: Opener) -> None:
    db = reopen()
    db.create_pair(_pair("a"), "a")
    db.create_pair(_pair("b"), "b")
    db.set_grant("a", "alice", False)
    db.set_grant("b", "alice", False)
    assert db.delete_pair("a", "rolled back")
    db.create_pair(_pair("a"), "created again")
    assert [(g.volume, g.user) for g in db.list_grants()] == [("b", "alice")]


# ---------------------------------------------------------------- etcd only: CAS and fencing


def _store(etcd_: EtcdCluster, **kw: Any) -> EtcdStore:
    kw.setdefault("start_timeout_s", 5.0)
    return EtcdStore(etcd_.endpoints, **kw)


def test_cas_conflict_between_two_stores(etcd: EtcdCluster) -> None:
    """Fault: two coordinators' stores both read vol1, then both save it: the second loses."""
    with _store(etcd) as a, _store(etcd) as b:
        a.create_pair(_pair(), "created")
        pa, pb = b.get_pair("vol1"), a.get_pair("vol1")
        assert pa is not None and pb is not None
        a.save_pair(replace(pa, epoch=2), StateChange(PairState.IN_SYNC, "a raised the epoch"))
        with pytest.raises(StoreConflict, match=r"volumes/vol1.*reload"):
            b.save_pair(replace(pb, epoch=2), StateChange(PairState.IN_SYNC, "b raised the epoch"))
        with pytest.raises(StoreConflict):
            b.update_progress("vol1", ProgressRecord(1, 2, 0.0, 0.0, 1))
        with pytest.raises(StoreConflict):
            b.delete_pair("vol1", "b deletes")
        with pytest.raises(StoreConflict, match="resizing volume 'vol1'"):
            b.resize_pair("vol1", 128 << 20, "b grows it")
        # After a reload b's view is current and its write goes through.
        (fresh,) = b.reload()
        assert fresh.epoch == 2
        b.save_pair(replace(fresh, epoch=3), StateChange(PairState.IN_SYNC, "b after reload"))
        # Every acknowledged write, and only those.
        assert [(e.epoch, e.reason) for e in a.events("vol1")] == [
            (1, "created"),
            (2, "a raised the epoch"),
            (3, "b after reload"),
        ]
        got = a.get_pair("vol1")
        assert got is not None and got.epoch == 3 and got.progress == ProgressRecord()
        assert got.size_bytes == 64 << 20  # the resize that lost its CAS wrote nothing


def test_save_without_a_read_is_a_conflict(etcd: EtcdCluster) -> None:
    """Fault: a store saves a volume it never read (a blind write): refused; after a read it goes through."""
    with _store(etcd) as a, _store(etcd) as b:
        a.create_pair(_pair(), "created")
        a.save_pair(replace(_pair(), epoch=2))
        with pytest.raises(StoreConflict, match="had not read it"):
            b.save_pair(replace(_pair(), epoch=5))
        got = b.get_pair("vol1")
        assert got is not None and got.epoch == 2  # the blind write left nothing
        b.save_pair(replace(got, epoch=3))
        got = a.get_pair("vol1")
        assert got is not None and got.epoch == 3


async def test_deposed_leader_is_fenced(etcd: EtcdCluster) -> None:
    """Fault: the leader stops (its loop frozen, as a paused process) while still believing it
    leads; its lease is revoked, another coordinator wins. Every write of the old one is
    refused by etcd (NotLeader naming the new leader), and the new leader's go through."""
    e1 = Election(etcd.endpoints, "10.0.0.1:7000", ttl_s=2, campaign_interval_s=0.1)
    e2 = Election(etcd.endpoints, "10.0.0.2:7000", ttl_s=2, campaign_interval_s=0.1)
    await e1.start()
    deadline = time.monotonic() + 5
    while not e1.is_leader():
        assert time.monotonic() < deadline, "e1 never led"
        await asyncio.sleep(0.05)
    await e2.start()
    old_fence = e1.fence()
    assert old_fence is not None
    s1 = await asyncio.to_thread(_store, etcd, fence=lambda: old_fence)  # it still believes it leads
    s2 = await asyncio.to_thread(_store, etcd, fence=e2.fence)
    try:
        await asyncio.to_thread(s1.create_pair, _pair(), "created by the first leader")
        assert e1._task is not None
        e1._task.cancel()  # frozen: no keepalive, no campaign, its view never updated
        lease = e1._lease_id
        async with aetcd.Client(*etcd.endpoints[0].split(":")) as c:
            await c.revoke_lease(lease)
        deadline = time.monotonic() + 5
        while not e2.is_leader():
            assert time.monotonic() < deadline, "e2 never took over"
            await asyncio.sleep(0.05)
        pair = await asyncio.to_thread(s1.get_pair, "vol1")
        assert pair is not None
        with pytest.raises(NotLeader, match="no longer leads") as info:
            await asyncio.to_thread(
                s1.save_pair, replace(pair, epoch=2), StateChange(PairState.IN_SYNC, "stale")
            )
        assert info.value.leader == "10.0.0.2:7000"
        for stale in (
            lambda: s1.create_pair(_pair("vol2"), "stale"),
            lambda: s1.delete_pair("vol1", "stale"),
            lambda: s1.resize_pair("vol1", 128 << 20, "stale"),
            lambda: s1.update_progress("vol1", ProgressRecord(1, 1, 0.0, 0.0, 1)),
            lambda: s1.set_grant("vol1", "mallory", False),
            lambda: s1.delete_grant("vol1", "alice"),
            lambda: s1.upsert_node("10.0.0.9:7001", "primary"),
        ):
            with pytest.raises(NotLeader):
                await asyncio.to_thread(stale)
        # The new leader writes.
        p2 = await asyncio.to_thread(s2.get_pair, "vol1")
        assert p2 is not None
        await asyncio.to_thread(
            s2.save_pair, replace(p2, epoch=2), StateChange(PairState.IN_SYNC, "new leader")
        )
        # Exactly the acknowledged writes.
        evs = await asyncio.to_thread(s2.events)
        assert [(e.volume, e.epoch, e.reason) for e in evs] == [
            ("vol1", 1, "created by the first leader"),
            ("vol1", 2, "new leader"),
        ]
        assert await asyncio.to_thread(s2.list_grants) == []
        assert await asyncio.to_thread(s2.list_nodes) == []
    finally:
        await asyncio.to_thread(s1.close)
        await asyncio.to_thread(s2.close)
        await e2.resign()
        await e1.resign()


def test_no_fence_when_not_leading(etcd: EtcdCluster) -> None:
    """A store whose election says it does not lead writes nothing (refused before etcd is asked)."""
    with _store(etcd, fence=lambda: None) as s:
        with pytest.raises(NotLeader, match="does not lead"):
            s.create_pair(_pair(), "created")
        assert s.list_pairs() == []


@pytest.mark.parametrize("seed", [1212], indirect=True)
def test_two_stores_never_hand_out_the_same_epoch(etcd: EtcdCluster, seed: int) -> None:
    """Fault: two coordinators (threads, two stores) race to raise vol1's epoch 100 times each,
    reloading on every lost CAS (seed 1212: the jitter between tries). Every epoch value is
    handed out at most once, and the volume ends at 1 + the number of raises acknowledged."""
    rounds = 100
    with _store(etcd) as s0:
        s0.create_pair(_pair(), "created")
    won: dict[str, list[int]] = {"a": [], "b": []}
    conflicts = {"a": 0, "b": 0}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def racer(name: str) -> None:
        rng = random.Random(f"{seed}-{name}")
        try:
            with _store(etcd) as s:
                barrier.wait(5)
                for _ in range(rounds):
                    while True:
                        p = s.get_pair("vol1")
                        assert p is not None
                        if rng.random() < 0.5:
                            time.sleep(rng.random() * 0.002)
                        try:
                            s.save_pair(
                                replace(p, epoch=p.epoch + 1),
                                StateChange(p.state, f"{name} raised to {p.epoch + 1}"),
                            )
                        except StoreConflict:
                            conflicts[name] += 1
                            continue
                        won[name].append(p.epoch + 1)
                        break
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=racer, args=(n,)) for n in won]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    epochs = won["a"] + won["b"]
    assert len(epochs) == 2 * rounds
    assert len(set(epochs)) == len(epochs), "an epoch was handed out twice"
    assert sorted(epochs) == list(range(2, 2 + 2 * rounds))
    with _store(etcd) as s:
        final = s.get_pair("vol1")
        assert final is not None and final.epoch == 1 + 2 * rounds
        ev_epochs = [e.epoch for e in s.events("vol1")]
        assert ev_epochs == list(range(1, 2 + 2 * rounds))  # one event per acknowledged raise, in order
    assert conflicts["a"] + conflicts["b"] > 0, "the race never raced: no CAS conflict seen"


# ---------------------------------------------------------------- etcd only: unavailability, schema


def test_paused_etcd_raises_store_unavailable(etcd: EtcdCluster) -> None:
    """Fault: etcd SIGSTOPped: a call fails within op_timeout_s with StoreUnavailable naming the endpoint."""
    with _store(etcd, op_timeout_s=0.5) as s:
        s.create_pair(_pair(), "created")
        p = s.get_pair("vol1")
        assert p is not None
        etcd.members[0].pause()
        try:
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable, match=etcd.endpoints[0]):
                s.save_pair(replace(p, epoch=2), StateChange(PairState.IN_SYNC, "while paused"))
            assert time.monotonic() - t0 < 1.5
            # The next calls are not tried (they fail at once, without
            # waiting op_timeout_s each: the service's loop would sit in them).
            for _ in range(3):
                with pytest.raises(StoreUnavailable, match="not tried"):
                    s.list_pairs()
        finally:
            etcd.members[0].resume()
        # Once the probe is answered, calls go through again (bounded poll).
        deadline = time.monotonic() + 30.0
        while True:
            try:
                (now,) = s.reload()
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "calls still fail 30 s after etcd resumed"
                time.sleep(0.05)  # the poll interval of a bounded wait for the probe
        # The write's outcome was unknown; the next CAS or a reload settles it.
        assert now.epoch in (1, 2)
        s.save_pair(replace(now, epoch=now.epoch + 1), StateChange(PairState.IN_SYNC, "after resume"))
        assert s.events("vol1")[-1].reason == "after resume"


def test_unreachable_at_start_times_out_clearly(caplog: pytest.LogCaptureFixture) -> None:
    """Fault: no etcd listens: a warning naming the endpoint, retries, then StoreUnavailable after start_timeout_s."""
    ep = f"127.0.0.1:{free_port()}"
    caplog.set_level(logging.WARNING, logger="coordinator.etcd_store")
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match=rf"{ep}.*still unreachable after 1 s \(start_timeout_s\)"):
        EtcdStore([ep], start_timeout_s=1.0, op_timeout_s=0.3)
    assert 0.9 < time.monotonic() - t0 < 4.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and ep in warnings[0] and "retrying with backoff" in warnings[0]


def test_etcd_started_late_is_waited_for(tmp_path: Path) -> None:
    """Fault: the coordinator starts before etcd: it retries with backoff and starts once etcd is up."""
    cluster = EtcdCluster.make(etcd_binary(), tmp_path / "late", 1)
    starter = threading.Timer(1.0, cluster.start)
    starter.start()
    try:
        with EtcdStore(cluster.endpoints, start_timeout_s=20.0, op_timeout_s=0.5) as s:
            s.create_pair(_pair(), "created")
            assert [p.name for p in s.list_pairs()] == ["vol1"]
    finally:
        starter.join()
        cluster.close()


def test_other_schema_or_cluster_refused(etcd: EtcdCluster) -> None:
    """Fault: the store holds another schema version, another cluster's data, or foreign keys."""
    with _store(etcd, cluster="east"):
        pass
    with pytest.raises(DBError, match="holds the data of cluster 'east', not 'west'"):
        _store(etcd, cluster="west")

    async def put(key: bytes, value: bytes) -> None:
        async with aetcd.Client(*etcd.endpoints[0].split(":")) as c:
            await c.put(key, value)

    asyncio.run(put(f"{DEFAULT_PREFIX}meta/schema".encode(), b'{"schema_version": 99, "cluster": "east"}'))
    with pytest.raises(DBError, match=r"schema version 99, this coordinator understands version 1.*newer"):
        _store(etcd, cluster="east")
    asyncio.run(put(b"/other/volumes/x", b"x"))
    with pytest.raises(DBError, match=r"holds keys but no meta/schema.*/other/volumes/x"):
        _store(etcd, prefix="/other/")
    with _store(etcd, prefix="/fresh/") as s:  # a prefix of its own: a store of its own
        assert s.list_pairs() == []


def test_watch_changes_sees_another_writer(etcd: EtcdCluster) -> None:
    seen: list[str] = []
    got = threading.Event()

    def cb(name: str) -> None:
        seen.append(name)
        got.set()

    with _store(etcd) as follower, _store(etcd) as leader:
        stop = follower.watch_changes(cb)
        leader.create_pair(_pair("vol/odd"), "created")
        assert got.wait(5), "no watch event within 5 s"
        stop()
        assert seen[0] == "vol/odd"


# ---------------------------------------------------------------- --store


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("sqlite", StoreSpec("sqlite")),
        ("etcd://h1:2379,h2:2380", StoreSpec("etcd", ("h1:2379", "h2:2380"))),
        ("etcd://10.0.0.1", StoreSpec("etcd", ("10.0.0.1:2379",))),
        ("etcd://[::1]:2379/", StoreSpec("etcd", ("[::1]:2379",))),
    ],
)
def test_parse_store_url(text: str, spec: StoreSpec) -> None:
    assert parse_store_url(text) == spec
    assert parse_store_url(spec.url) == spec


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("postgres://x", "unknown store"),
        ("etcd://", "no etcd endpoint"),
        ("etcd://h1:0", "bad port"),
        ("etcd://h1:x", "bad port"),
        ("etcd://h1:2379,,h2", "bad etcd endpoint"),
        ("etcd://::1:2379", "needs brackets"),
        ("etcd://h1,h1:2379", "listed twice"),
        ("etcd://user@h1", "bad etcd endpoint"),
    ],
)
def test_parse_store_url_refuses(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as info:
        parse_store_url(text)
    assert "etcd://HOST:PORT" in str(info.value) or "twice" in why


def test_grpc_target() -> None:
    assert grpc_target(["h1:2379"]) == "h1:2379"
    assert grpc_target(["127.0.0.1:1", "127.0.0.2:2"]) == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert grpc_target(["localhost:1", "127.0.0.2:2"]).startswith("ipv4:127.0.0.1:1,")
