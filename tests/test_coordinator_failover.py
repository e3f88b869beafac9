"""Failover through the coordinator's gRPC API (docs/FAILOVER.md): identities
issued at CreateVolume, leases in heartbeat replies, Promote, auto-failover,
rebuilds of a replica without data, the status fields.

The coordinator runs in-process with fake nodes (``FakeNode`` of
tests/test_coordinator_service.py); its clocks are moved forward instead of
sleeping past node timeouts and leases."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_coordinator_service import Env, _make_env, events, expect_error, wait_until

from syncrep.core.pairstate import PairState
from syncrep.pb import syncrep_pb2 as pb

UUID = "feedface" * 4
INITIAL = 0x1234_5678_9ABC_DEF0
LEASE_S = 0.6
DRIFT_S = 0.2


@pytest.fixture
async def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Env]:
    # The seams the simulator patches: patched here the same way.
    monkeypatch.setattr("coordinator.service.new_volume_uuid", lambda: UUID)
    monkeypatch.setattr("syncrep.volumes.new_generation", lambda: INITIAL)
    e = await _make_env(tmp_path, lease_s=LEASE_S, lease_drift_s=DRIFT_S)
    try:
        yield e
    finally:
        await e.primary.stop()
        await e.secondary.stop()
        await e.channel.close()
        await e.coord.stop(0)


async def _pair(env: Env, **create: Any) -> Env:
    await env.register(env.primary, "primary")
    await env.register(env.secondary, "secondary")
    env.primary.start_heartbeats(env.stub)
    env.secondary.start_heartbeats(env.stub)
    await env.create(**create)
    return env


async def _reported(env: Env, address: str, pred: object = None) -> None:
    async def arrived() -> bool:
        r = env.servicer.latest_report(address, "vol1")
        return r is not None and (pred is None or pred(r))  # type: ignore[operator]

    await wait_until(arrived, what=f"a heartbeat report from {address}")


async def _primary_dies(env: Env, seconds: float = LEASE_S + DRIFT_S + 0.05) -> None:
    """The primary stops heartbeating and ``seconds`` pass (its lease runs out);
    then the secondary's next heartbeat shows it alive again."""
    env.primary.heartbeating = False
    env.clock.advance(seconds)

    async def secondary_alive() -> bool:
        return bool(env.servicer.is_alive(env.secondary.address))

    await wait_until(secondary_alive, what="the secondary's heartbeat")


def _assigns(env: Env, address: str) -> list[pb.VolumeAssignment]:
    return [req for kind, addr, req in env.calls if kind == "assign" and addr == address]


# ---------------------------------------------------------------- CreateVolume


async def test_create_volume_issues_the_identity_and_pushes_create(env: Env) -> None:
    await _pair(env, auto_failover=True)
    for node in (env.secondary, env.primary):
        (a,) = _assigns(env, node.address)
        assert a.create and (a.identity.volume_uuid, a.identity.current) == (UUID, INITIAL)
    st = await env.get()
    assert (st.volume_uuid, st.generation, st.secondary_generation) == (UUID, INITIAL, INITIAL)
    assert st.auto_failover
    rec = env.servicer.pair("vol1")
    assert rec.volume_uuid == UUID and rec.auto_failover


async def test_heartbeat_assignments_carry_the_uuid_without_create(env: Env) -> None:
    await _pair(env)
    reply = await env.stub.Heartbeat(pb.HeartbeatRequest(address=env.secondary.address))
    (a,) = reply.assignments
    assert a.identity.volume_uuid == UUID and not a.create and a.identity.current == 0


# ---------------------------------------------------------------- leases


async def test_lease_granted_to_the_primary_only(env: Env) -> None:
    await _pair(env)
    await _reported(env, env.primary.address, lambda r: r.HasField("identity"))
    ident = pb.Identity(volume_uuid=UUID, current=INITIAL)
    report = pb.VolumeReport(name="vol1", role=pb.ROLE_PRIMARY, epoch=1, identity=ident)
    reply = await env.stub.Heartbeat(pb.HeartbeatRequest(address=env.primary.address, volumes=[report]))
    (lease,) = reply.leases
    assert (lease.volume, lease.epoch, lease.lease_s) == ("vol1", 1, LEASE_S)
    assert (lease.state, lease.generation) == (pb.PAIR_STATE_IN_SYNC, INITIAL)
    report.role = pb.ROLE_SECONDARY
    reply = await env.stub.Heartbeat(pb.HeartbeatRequest(address=env.secondary.address, volumes=[report]))
    assert list(reply.leases) == []
    # A primary without data gets none.
    missing = pb.VolumeReport(name="vol1", role=pb.ROLE_PRIMARY, epoch=1, data_missing=True)
    reply = await env.stub.Heartbeat(pb.HeartbeatRequest(address=env.primary.address, volumes=[missing]))
    assert list(reply.leases) == []
    assert 0 < (await env.get()).lease_remaining_s <= LEASE_S + DRIFT_S


async def test_lease_after_a_degrade_carries_the_durable_state_and_new_generation(env: Env) -> None:
    await _pair(env)
    new_gen = pb.Identity(volume_uuid=UUID, current=0x77, history=[INITIAL])
    reply = await env.report(pb.PAIR_STATE_DEGRADED, 1, reason="secondary NACKed", identity=new_gen)
    assert reply.lease.state == pb.PAIR_STATE_DEGRADED and reply.lease.generation == 0x77
    assert env.coord.db is not None
    rec = env.coord.db.get_pair("vol1")
    assert rec is not None and rec.state is PairState.DEGRADED and rec.generation == 0x77


# ---------------------------------------------------------------- Promote


async def test_promote_unknown_volume(env: Env) -> None:
    await expect_error(grpc.StatusCode.NOT_FOUND, env.stub.Promote(pb.PromoteRequest(volume="nope")), "nope")


async def test_promote_waits_for_the_lease_then_swaps_roles(env: Env) -> None:
    await _pair(env)
    await _reported(env, env.primary.address, lambda r: r.HasField("identity"))
    await _reported(env, env.secondary.address, lambda r: r.HasField("identity"))
    await expect_error(
        grpc.StatusCode.FAILED_PRECONDITION,
        env.stub.Promote(pb.PromoteRequest(volume="vol1")),
        f"primary {env.primary.address} may still be writing: its lease runs",
        "retry after that",
    )
    # The primary dies: no heartbeats, its lease runs out.
    await _primary_dies(env)
    st = await env.get()
    assert st.lease_remaining_s == 0.0
    reply = await env.stub.Promote(pb.PromoteRequest(volume="vol1"))
    assert reply.status.primary == env.secondary.address and reply.status.secondary == env.primary.address
    assert reply.status.epoch == 2
    assert f"promoted {env.secondary.address} to primary at epoch 2" in reply.message
    rec = env.servicer.pair("vol1")
    assert rec.state is PairState.DEGRADED and (rec.primary, rec.epoch) == (env.secondary.address, 2)
    assert events(env)[-1] == ("in_sync", "degraded", 2)
    push = _assigns(env, env.secondary.address)[-1]
    assert (push.role, push.epoch, push.peer_address) == (pb.ROLE_PRIMARY, 2, env.primary.address)
    assert not push.create and push.identity.volume_uuid == UUID
    # The old primary learns its demotion from its heartbeat replies.
    hb = await env.stub.Heartbeat(pb.HeartbeatRequest(address=env.primary.address))
    (a,) = hb.assignments
    assert (a.role, a.epoch, a.peer_address) == (pb.ROLE_SECONDARY, 2, env.secondary.address)
    assert list(hb.leases) == []


async def test_promote_degraded_needs_force(env: Env) -> None:
    await _pair(env)
    await env.report(
        pb.PAIR_STATE_DEGRADED,
        1,
        reason="secondary NACKed",
        fault_snapshot_id=11,
        failed_extents=[pb.Extent(offset=0, length=4096)],
    )
    await _reported(env, env.secondary.address, lambda r: r.HasField("identity"))
    await _primary_dies(env)
    await expect_error(
        grpc.StatusCode.FAILED_PRECONDITION,
        env.stub.Promote(pb.PromoteRequest(volume="vol1")),
        "is not current",
        "4096 bytes",
        "--force",
    )
    reply = await env.stub.Promote(pb.PromoteRequest(volume="vol1", force=True))
    assert "(forced: the secondary was not current" in reply.message
    assert reply.status.failed_bytes == 0 and reply.status.primary == env.secondary.address


async def test_auto_failover_promotes_when_the_primary_is_gone(env: Env) -> None:
    await _pair(env, auto_failover=True)
    await _reported(env, env.secondary.address, lambda r: r.HasField("identity"))
    env.primary.heartbeating = False
    env.clock.advance(max(LEASE_S + DRIFT_S, 0.8) + 0.1)  # past node_timeout_s (0.8) and the lease

    async def promoted() -> bool:
        return env.servicer.pair("vol1").primary == env.secondary.address

    await wait_until(promoted, what="the automatic promotion")
    assert "auto-failover: primary" in env.servicer.pair("vol1").last_error


async def test_status_shows_primary_lost(env: Env) -> None:
    await _pair(env)
    env.primary.heartbeating = False
    env.clock.advance(1.0)
    st = await env.get()
    assert st.state == pb.PAIR_STATE_PRIMARY_LOST and not st.primary_alive
    assert env.servicer.pair("vol1").state is PairState.IN_SYNC  # never persisted


# ---------------------------------------------------------------- rebuilds


async def test_secondary_without_data_is_rebuilt_for_a_full_copy(env: Env) -> None:
    await _pair(env)
    env.secondary.reports["vol1"] = pb.VolumeReport(
        name="vol1", role=pb.ROLE_SECONDARY, epoch=1, data_missing=True, data_problem="empty data dir"
    )

    async def marked() -> bool:
        rec = env.servicer.pair("vol1")
        return rec.state is PairState.DEGRADED and rec.full_copy_pending

    await wait_until(marked, what="the pair degraded for a full copy")
    rec = env.servicer.pair("vol1")
    assert "rebuilding it by a full copy" in rec.last_error and "empty data dir" in rec.last_error
    st = await env.get()
    assert st.secondary_data_missing and not st.primary_data_missing
    hb = await env.stub.Heartbeat(
        pb.HeartbeatRequest(address=env.secondary.address, volumes=[env.secondary.reports["vol1"]])
    )
    (a,) = hb.assignments
    assert a.create and (a.identity.volume_uuid, a.identity.current) == (UUID, 0)
    # Rebuilt (an empty store) and the primary shows its fault snapshot: a full copy.
    env.secondary.reports["vol1"] = pb.VolumeReport(
        name="vol1", role=pb.ROLE_SECONDARY, epoch=1, identity=pb.Identity(volume_uuid=UUID)
    )
    env.primary_reports(
        pb.PAIR_STATE_DEGRADED,
        1,
        fault_snapshot_id=11,
        identity=pb.Identity(volume_uuid=UUID, current=0x55, history=[INITIAL]),
    )
    env.servicer.wake()

    async def started() -> bool:
        return bool(env.primary.resync_requests)

    await wait_until(started, what="StartResync")
    req = env.primary.resync_requests[0]
    assert req.full_copy and req.epoch == 2


async def test_volume_being_created_is_left_out_of_heartbeat_assignments(env: Env) -> None:
    await _pair(env)
    env.servicer._creating.add("vol1")  # its create pushes in flight
    reply = await env.stub.Heartbeat(pb.HeartbeatRequest(address=env.primary.address))
    assert list(reply.assignments) == []
    env.servicer._creating.discard("vol1")
    reply = await env.stub.Heartbeat(pb.HeartbeatRequest(address=env.primary.address))
    assert [a.spec.name for a in reply.assignments] == ["vol1"]


async def test_reported_generations_are_persisted(env: Env) -> None:
    await _pair(env)
    env.primary_reports(
        pb.PAIR_STATE_IN_SYNC, 1, identity=pb.Identity(volume_uuid=UUID, current=0x99, history=[INITIAL])
    )

    async def saved() -> bool:
        assert env.coord.db is not None
        rec = env.coord.db.get_pair("vol1")
        return rec is not None and rec.generation == 0x99

    await wait_until(saved, what="the primary's new generation persisted")
    assert (await env.get()).generation == 0x99


# ---------------------------------------------------------------- Switchover (docs/FAILOVER.md section 5)


async def _in_sync_reports(env: Env) -> None:
    """Both fake nodes report the pair in sync at epoch 1, same generation."""
    ident = pb.Identity(volume_uuid=UUID, current=INITIAL)
    env.primary_reports(pb.PAIR_STATE_IN_SYNC, 1, identity=ident)
    env.secondary.reports["vol1"] = pb.VolumeReport(name="vol1", role=pb.ROLE_SECONDARY, epoch=1, identity=ident)
    await _reported(env, env.primary.address, lambda r: r.epoch == 1 and r.state == pb.PAIR_STATE_IN_SYNC)
    await _reported(env, env.secondary.address, lambda r: r.epoch == 1)


async def test_switchover_unknown_volume(env: Env) -> None:
    await expect_error(grpc.StatusCode.NOT_FOUND, env.stub.Switchover(pb.SwitchoverRequest(volume="nope")))


async def test_switchover_refused_when_degraded_says_wait_for_the_resync(env: Env) -> None:
    await _pair(env)
    await _in_sync_reports(env)
    await env.report(pb.PAIR_STATE_DEGRADED, 1, reason="secondary unreachable")
    await expect_error(
        grpc.StatusCode.FAILED_PRECONDITION,
        env.stub.Switchover(pb.SwitchoverRequest(volume="vol1")),
        "is degraded at epoch 1, not in sync",
        "wait for the resync",
    )
    rec = env.servicer.pair("vol1")
    assert (rec.primary, rec.epoch) == (env.primary.address, 1)


async def test_switchover_primary_fails_to_hand_over_nothing_swapped(env: Env) -> None:
    """Fault: PrepareHandover fails on the primary (this fake does not serve
    it): UNAVAILABLE, the pair stays as it was, no assignment is pushed."""
    await _pair(env)
    await _in_sync_reports(env)
    pushed = len([c for c in env.calls if c[0] == "assign"])
    await expect_error(
        grpc.StatusCode.UNAVAILABLE,
        env.stub.Switchover(pb.SwitchoverRequest(volume="vol1", handover_timeout_s=2.0)),
        f"primary {env.primary.address} did not hand over",
        "nothing was swapped",
    )
    rec = env.servicer.pair("vol1")
    assert (rec.state, rec.primary, rec.secondary, rec.epoch) == (
        PairState.IN_SYNC, env.primary.address, env.secondary.address, 1)
    assert len([c for c in env.calls if c[0] == "assign"]) == pushed
    assert not env.servicer.assignment(rec, env.secondary.address).switchover


async def test_switchover_timeout_out_of_range(env: Env) -> None:
    await _pair(env)
    await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        env.stub.Switchover(pb.SwitchoverRequest(volume="vol1", handover_timeout_s=600)),
        "handover timeout 600",
    )
