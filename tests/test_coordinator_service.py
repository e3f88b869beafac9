"""The coordinator in-process on 127.0.0.1:0, exercised through real grpc.aio stubs,
with fake nodes (``syncrep.rpc.Server`` serving NodeService.AssignVolume/StartResync).

No sleep orders a race or proves a negative here: tests wait for a condition
(bounded), move the coordinator's injected clocks forward (``MovableClock``), or,
to show that nothing will happen, ask the pure ``decide()`` what the
coordinator would do in its current state (``resync_steps``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from coordinator.server import Coordinator
from syncrep import client as sc
from syncrep import rpc
from syncrep.core.driver import ChangePair, Command, ProbeHealth, StartResync
from syncrep.core.pairstate import PairState
from syncrep.pb import syncrep_pb2 as pb
from syncrep.pb import syncrep_pb2_grpc as pb_grpc

HEARTBEAT_S = 0.1
NODE_TIMEOUT_S = 0.8
FAST = dict(
    heartbeat_interval_s=HEARTBEAT_S,
    node_timeout_s=NODE_TIMEOUT_S,
    resync_retry_max_s=0.4,
    resync_check_interval_s=0.05,
    rpc_timeout_s=1.0,
)
MiB = 1024 * 1024


# ---------------------------------------------------------------- fakes


class MovableClock:
    """The coordinator's clocks: real time plus an offset the test can move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def wall(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class FakeNode(pb_grpc.NodeServiceServicer):  # only AssignVolume and StartResync
    """A node: records AssignVolume/StartResync, fails them on demand, heartbeats."""

    def __init__(self, calls: list[tuple[str, str, Any]]) -> None:
        self.calls = calls  # shared between nodes: the order of pushes
        self.address = ""
        self.assign_error: grpc.StatusCode | None = None
        self.resync_errors: list[grpc.StatusCode] = []  # popped one per StartResync call
        self.resync_requests: list[pb.StartResyncRequest] = []
        self.reports: dict[str, pb.VolumeReport] = {}
        # What a node keeps of its assignments: the identity of the store it
        # created (AssignVolume with create) and its role, reported in every
        # heartbeat unless the test set the report's identity itself.
        self.identities: dict[str, pb.Identity] = {}
        self.roles: dict[str, int] = {}
        self.heartbeating = False
        self._server: rpc.Server | None = None
        self._hb_task: asyncio.Task[None] | None = None
        self.coordinator = ""

    async def AssignVolume(self, request: pb.VolumeAssignment, context: Any) -> pb.AssignVolumeReply:
        self.calls.append(("assign", self.address, request))
        if self.assign_error is not None:
            await context.abort(self.assign_error, "disk full (injected)")
        name = request.spec.name
        self.roles[name] = request.role
        if request.create and (name not in self.identities or request.identity.current):
            self.identities[name] = pb.Identity(
                volume_uuid=request.identity.volume_uuid, current=request.identity.current
            )
        return pb.AssignVolumeReply(message="ok")

    def volume_reports(self) -> list[pb.VolumeReport]:
        out: dict[str, pb.VolumeReport] = {}
        for name in self.identities:
            out[name] = pb.VolumeReport(name=name, role=self.roles.get(name, 0))  # type: ignore[arg-type]
        for name, r in self.reports.items():
            out[name] = pb.VolumeReport()
            out[name].CopyFrom(r)
        for name, r in out.items():
            if not r.HasField("identity") and not r.data_missing and name in self.identities:
                r.identity.CopyFrom(self.identities[name])
        return list(out.values())

    async def StartResync(self, request: pb.StartResyncRequest, context: Any) -> pb.StartResyncReply:
        self.calls.append(("resync", self.address, request))
        self.resync_requests.append(request)
        if self.resync_errors:
            await context.abort(self.resync_errors.pop(0), "no fault snapshot (injected)")
        return pb.StartResyncReply(message="resync started")

    async def start(self) -> str:
        self._server = rpc.Server("127.0.0.1:0")
        self._server.add(pb_grpc.add_NodeServiceServicer_to_server, self, "syncrep.v1.NodeService")
        port = await self._server.start()
        self.address = f"127.0.0.1:{port}"
        return self.address

    async def stop(self) -> None:
        self.heartbeating = False
        if self._hb_task is not None:
            self._hb_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._hb_task
        if self._server is not None:
            await self._server.stop(0)

    def start_heartbeats(self, coord: pb_grpc.CoordinatorServiceAsyncStub) -> None:
        self.heartbeating = True
        if self._hb_task is None:
            self._hb_task = asyncio.create_task(self._heartbeat_loop(coord))

    async def _heartbeat_loop(self, coord: pb_grpc.CoordinatorServiceAsyncStub) -> None:
        while True:
            if self.heartbeating:
                with contextlib.suppress(grpc.RpcError):
                    await coord.Heartbeat(
                        pb.HeartbeatRequest(address=self.address, volumes=self.volume_reports()),
                        timeout=1.0,
                    )
            await asyncio.sleep(HEARTBEAT_S)


@dataclass
class Env:
    tmp: Path
    coord: Coordinator
    channel: aio.Channel
    stub: pb_grpc.CoordinatorServiceAsyncStub
    primary: FakeNode
    secondary: FakeNode
    calls: list[tuple[str, str, Any]] = field(default_factory=list)
    clock: MovableClock = field(default_factory=MovableClock)

    async def restart(self, **opts: Any) -> None:
        await self.coord.stop(0)
        self.coord = Coordinator(self.coord.listen, self.tmp, **{**FAST, **self.clock_opts(), **opts})
        await self.coord.start()

    def clock_opts(self) -> dict[str, Any]:
        return {"clock": self.clock.monotonic, "wall_clock": self.clock.wall}

    @property
    def servicer(self) -> Any:
        assert self.coord.servicer is not None
        return self.coord.servicer

    async def register(self, node: FakeNode, role: str) -> pb.RegisterNodeReply:
        return await self.stub.RegisterNode(
            pb.RegisterNodeRequest(address=node.address, role_hint=role, pid=1)
        )

    async def create(self, name: str = "vol1", **kw: Any) -> pb.VolumeStatus:
        req = pb.CreateVolumeRequest(
            name=name, size_bytes=64 * MiB, primary=self.primary.address, secondary=self.secondary.address
        )
        for k, v in kw.items():
            setattr(req, k, v)
        return await self.stub.CreateVolume(req)

    async def get(self, name: str = "vol1") -> pb.VolumeStatus:
        return await self.stub.GetVolume(pb.GetVolumeRequest(name=name))

    async def report(
        self, state: Any, epoch: int, name: str = "vol1", **kw: Any
    ) -> pb.ReportReplicationReply:
        req = pb.ReplicationReport(volume=name, reporter=self.primary.address, epoch=epoch, state=state, **kw)
        return await self.stub.ReportReplication(req)

    def primary_reports(self, state: Any, epoch: int, name: str = "vol1", **kw: Any) -> None:
        self.primary.reports[name] = pb.VolumeReport(
            name=name, role=pb.ROLE_PRIMARY, epoch=epoch, state=state, **kw
        )


async def wait_until(pred: Callable[[], Awaitable[bool]], timeout_s: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what or pred}")


async def _make_env(tmp_path: Path, **opts: Any) -> Env:
    calls: list[tuple[str, str, Any]] = []
    clock = MovableClock()
    coord = Coordinator(
        "127.0.0.1:0", tmp_path, **{**FAST, "clock": clock.monotonic, "wall_clock": clock.wall, **opts}
    )
    port = await coord.start()
    coord.listen = f"127.0.0.1:{port}"  # restarts reuse the port
    channel = rpc.channel(f"127.0.0.1:{port}")
    stub: Any = pb_grpc.CoordinatorServiceStub(channel)
    primary, secondary = FakeNode(calls), FakeNode(calls)  # type: ignore[abstract]
    await primary.start()
    await secondary.start()
    return Env(tmp_path, coord, channel, stub, primary, secondary, calls, clock)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = await _make_env(tmp_path)
    try:
        yield e
    finally:
        await e.primary.stop()
        await e.secondary.stop()
        await e.channel.close()
        await e.coord.stop(0)


@pytest.fixture
async def pair(env: Env) -> Env:
    """Both nodes registered and heartbeating, volume vol1 created."""
    await env.register(env.primary, "primary")
    await env.register(env.secondary, "secondary")
    env.primary.start_heartbeats(env.stub)
    env.secondary.start_heartbeats(env.stub)
    await env.create()
    return env


async def expect_error(code: grpc.StatusCode, aw: Awaitable[Any], *fragments: str) -> str:
    with pytest.raises(aio.AioRpcError) as ei:
        await aw
    assert ei.value.code() == code, ei.value.details()
    details = ei.value.details() or ""
    for f in fragments:
        assert f in details, details
    return details


def resync_steps(env: Env, volume: str = "vol1") -> list[Command]:
    """What the pure ``decide()`` has the coordinator do about ``volume`` in its
    current state, were every node to answer its health check: the health
    probes, state changes and StartResync calls. Empty means the driver will
    not move the pair until something changes (a heartbeat, a report, time)."""
    cmds = env.servicer.commands(healthy={env.primary.address: True, env.secondary.address: True})
    return [
        c
        for c in cmds
        if isinstance(c, (ProbeHealth, ChangePair, StartResync)) and c.volume == volume
    ]


async def report_arrived(env: Env, pred: Callable[[pb.VolumeReport], bool], volume: str = "vol1") -> None:
    """Wait (bounded) until the primary's latest heartbeat report on ``volume`` satisfies ``pred``."""

    async def arrived() -> bool:
        r = env.servicer.latest_report(env.primary.address, volume)
        return r is not None and pred(r)

    await wait_until(arrived, what="the primary's heartbeat report")


def events(env: Env, volume: str = "vol1") -> list[tuple[str | None, str | None, int]]:
    assert env.coord.db is not None
    return [
        (e.from_state and e.from_state.value, e.to_state and e.to_state.value, e.epoch)
        for e in env.coord.db.events(volume)
    ]


async def degrade(env: Env, *, snapshot_id: int = 11) -> pb.ReportReplicationReply:
    """The primary reports the secondary failed and shows its fault snapshot in heartbeats."""
    reply = await env.report(
        pb.PAIR_STATE_DEGRADED,
        1,
        nacks=[pb.Nack(seq=3, offset=4096, length=4096, code=pb.NACK_CODE_IO_ERROR, message="EIO")],
        unacked=[pb.ReplicatedWriteRef(seq=4, offset=8192, length=100)],
        reason="secondary NACKed seq 3: EIO",
        fault_snapshot_id=snapshot_id,
    )
    return reply


# ---------------------------------------------------------------- nodes


async def test_register_and_heartbeat(env: Env) -> None:
    await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        env.stub.RegisterNode(pb.RegisterNodeRequest()),
        "address is required",
    )
    for bad in ("localhost", "host:", ":7000", "h:70000", "h:0", "a b:1"):
        await expect_error(
            grpc.StatusCode.INVALID_ARGUMENT,
            env.stub.RegisterNode(pb.RegisterNodeRequest(address=bad)),
            "host:port",
        )
    await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        env.stub.RegisterNode(pb.RegisterNodeRequest(address="127.0.0.1:1", role_hint="boss")),
        "role_hint",
    )
    hb = await env.stub.Heartbeat(pb.HeartbeatRequest(address=env.primary.address))
    assert not hb.known
    reply = await env.register(env.primary, "primary")
    assert reply.heartbeat_interval_s == HEARTBEAT_S
    assert list(reply.assignments) == []
    hb = await env.stub.Heartbeat(pb.HeartbeatRequest(address=env.primary.address))
    assert hb.known and list(hb.assignments) == []
    # Registering again is an upsert.
    await env.register(env.primary, "primary")
    assert env.coord.db is not None
    assert [n.address for n in env.coord.db.list_nodes()] == [env.primary.address]


async def test_liveness(env: Env) -> None:
    await env.register(env.primary, "primary")
    servicer = env.coord.servicer
    assert servicer is not None
    assert servicer.is_alive(env.primary.address)
    assert not servicer.is_alive(env.secondary.address)
    env.clock.advance(NODE_TIMEOUT_S + 0.2)
    assert not servicer.is_alive(env.primary.address)
    await env.stub.Heartbeat(pb.HeartbeatRequest(address=env.primary.address))
    assert servicer.is_alive(env.primary.address)


# ---------------------------------------------------------------- CreateVolume


async def test_create_volume_pushes_secondary_then_primary(env: Env) -> None:
    await env.register(env.primary, "primary")
    await env.register(env.secondary, "secondary")
    st = await env.create()
    assert [(kind, addr) for kind, addr, _ in env.calls] == [
        ("assign", env.secondary.address),
        ("assign", env.primary.address),
    ]
    sec_assign, prim_assign = env.calls[0][2], env.calls[1][2]
    assert sec_assign.role == pb.ROLE_SECONDARY and sec_assign.peer_address == env.primary.address
    assert prim_assign.role == pb.ROLE_PRIMARY and prim_assign.peer_address == env.secondary.address
    for a in (sec_assign, prim_assign):
        assert a.epoch == 1 and a.resync_mode == pb.RESYNC_MODE_DIRECT
        assert (a.spec.name, a.spec.size_bytes, a.spec.block_size) == ("vol1", 64 * MiB, 4096)

    assert st.spec.name == "vol1" and st.spec.block_size == 4096 and st.spec.size_bytes == 64 * MiB
    assert st.state == pb.PAIR_STATE_IN_SYNC and st.epoch == 1
    assert st.primary == env.primary.address and st.secondary == env.secondary.address
    assert st.resync_mode == pb.RESYNC_MODE_DIRECT
    assert st.primary_alive and st.secondary_alive
    assert st.state_changed_at > 0 and st.failed_bytes == 0

    # Nodes learn their assignments from RegisterNode and Heartbeat too.
    reg = await env.register(env.secondary, "secondary")
    assert [(a.spec.name, a.role) for a in reg.assignments] == [("vol1", pb.ROLE_SECONDARY)]
    hb = await env.stub.Heartbeat(pb.HeartbeatRequest(address=env.primary.address))
    assert [(a.spec.name, a.role, a.epoch) for a in hb.assignments] == [("vol1", pb.ROLE_PRIMARY, 1)]

    await expect_error(grpc.StatusCode.ALREADY_EXISTS, env.create(), "vol1", "already exists")
    st2 = await env.create("vol2", resync_mode=pb.RESYNC_MODE_REWRITE, block_size=512, size_bytes=512 * 3)
    assert st2.resync_mode == pb.RESYNC_MODE_REWRITE and st2.spec.block_size == 512
    listed = await env.stub.ListVolumes(pb.ListVolumesRequest())
    assert [v.spec.name for v in listed.volumes] == ["vol1", "vol2"]
    assert events(env, "vol1") == [(None, "in_sync", 1)]


@pytest.mark.parametrize(
    ("fields", "code", "fragments"),
    [
        ({"name": ""}, grpc.StatusCode.INVALID_ARGUMENT, ["volume name"]),
        ({"name": "-bad"}, grpc.StatusCode.INVALID_ARGUMENT, ["volume name", "-bad"]),
        ({"name": "a" * 65}, grpc.StatusCode.INVALID_ARGUMENT, ["volume name"]),
        ({"name": "has space"}, grpc.StatusCode.INVALID_ARGUMENT, ["volume name"]),
        ({"size_bytes": 0}, grpc.StatusCode.INVALID_ARGUMENT, ["size_bytes", "> 0"]),
        ({"block_size": 3000}, grpc.StatusCode.INVALID_ARGUMENT, ["3000", "power of two", "512"]),
        ({"block_size": 256}, grpc.StatusCode.OUT_OF_RANGE, ["256", "512..1048576"]),
        ({"block_size": 2 * MiB}, grpc.StatusCode.OUT_OF_RANGE, ["2097152", "1048576"]),
        ({"size_bytes": 4097}, grpc.StatusCode.INVALID_ARGUMENT, ["4097", "multiple", "4096"]),
        ({"size_bytes": 512 * (2**32 + 1), "block_size": 512}, grpc.StatusCode.OUT_OF_RANGE, ["4294967296"]),
        ({"resync_mode": 7}, grpc.StatusCode.INVALID_ARGUMENT, ["resync_mode 7"]),
        ({"primary": "nohost"}, grpc.StatusCode.INVALID_ARGUMENT, ["primary", "host:port"]),
        ({"secondary": "PRIMARY"}, grpc.StatusCode.INVALID_ARGUMENT, ["same node"]),
        (
            {"secondary": "127.0.0.1:1"},
            grpc.StatusCode.FAILED_PRECONDITION,
            ["node 127.0.0.1:1 is not registered", "syncrep secondary --coordinator 127.0.0.1:"],
        ),
    ],
)
async def test_create_volume_validation(
    env: Env, fields: dict[str, Any], code: grpc.StatusCode, fragments: list[str]
) -> None:
    await env.register(env.primary, "primary")
    await env.register(env.secondary, "secondary")
    fields = {k: (env.primary.address if v == "PRIMARY" else v) for k, v in fields.items()}
    await expect_error(code, env.create(**fields), *fragments)
    assert env.calls == []
    assert (await env.stub.ListVolumes(pb.ListVolumesRequest())).volumes == []


async def test_create_volume_on_max_blocks_is_fine(env: Env) -> None:
    await env.register(env.primary, "primary")
    await env.register(env.secondary, "secondary")
    st = await env.create(size_bytes=512 * 2**32, block_size=512)
    assert st.spec.size_bytes == 512 * 2**32


async def test_create_volume_push_failure_rolls_back(env: Env) -> None:
    await env.register(env.primary, "primary")
    await env.register(env.secondary, "secondary")
    env.primary.assign_error = grpc.StatusCode.RESOURCE_EXHAUSTED
    details = await expect_error(grpc.StatusCode.UNAVAILABLE, env.create(), env.primary.address, "disk full")
    assert "primary" in details
    await expect_error(grpc.StatusCode.NOT_FOUND, env.get(), "vol1")
    assert events(env) == [(None, "in_sync", 1), ("in_sync", None, 1)]
    # Unreachable secondary: nothing is pushed to the primary at all.
    env.primary.assign_error = None
    await env.secondary.stop()
    env.calls.clear()
    await expect_error(grpc.StatusCode.UNAVAILABLE, env.create(), env.secondary.address, "not created")
    assert env.calls == []
    await expect_error(grpc.StatusCode.NOT_FOUND, env.get())
    # The client library (what `syncrep volume create` prints): the
    # coordinator answered, so the error names the node it could not
    # assign, not "cannot reach coordinator" (it said that before).
    with pytest.raises(sc.ClientError) as refused:
        await sc.create_volume(env.coord.address, "vol1", 64 * MiB, env.primary.address, env.secondary.address)
    text = str(refused.value)
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE, text
    assert "cannot reach coordinator" not in text and "not created" in text and env.secondary.address in text, text
    # And a coordinator that is not there still is "cannot reach coordinator".
    with pytest.raises(sc.ClientError) as unreachable:
        await sc.create_volume("127.0.0.1:1", "vol1", 64 * MiB, env.primary.address, env.secondary.address)
    assert "cannot reach coordinator 127.0.0.1:1" in str(unreachable.value), unreachable.value


async def test_get_volume_not_found(env: Env) -> None:
    await expect_error(grpc.StatusCode.NOT_FOUND, env.get("ghost"), "ghost", "not found")


# ---------------------------------------------------------------- ReportReplication


async def test_report_replication_checks(pair: Env) -> None:
    env = pair
    await expect_error(
        grpc.StatusCode.NOT_FOUND, env.report(pb.PAIR_STATE_DEGRADED, 1, name="ghost"), "ghost"
    )
    await expect_error(
        grpc.StatusCode.PERMISSION_DENIED,
        env.stub.ReportReplication(
            pb.ReplicationReport(
                volume="vol1", reporter=env.secondary.address, epoch=1, state=pb.PAIR_STATE_DEGRADED
            )
        ),
        env.secondary.address,
        "not the primary",
    )
    await expect_error(
        grpc.StatusCode.FAILED_PRECONDITION, env.report(pb.PAIR_STATE_DEGRADED, 5), "epoch 5", "epoch 1"
    )
    await expect_error(grpc.StatusCode.INVALID_ARGUMENT, env.report(pb.PAIR_STATE_UNSPECIFIED, 1))
    await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        env.report(pb.PAIR_STATE_DEGRADED, 1, nacks=[pb.Nack(offset=64 * MiB - 1, length=2)]),
        "beyond the end",
    )
    # Progress while in sync, and in sync while in sync (a retried report).
    await expect_error(
        grpc.StatusCode.FAILED_PRECONDITION,
        env.report(pb.PAIR_STATE_RESYNCING, 1),
        "in_sync",
        "not resyncing",
    )
    ok = await env.report(pb.PAIR_STATE_IN_SYNC, 1)
    assert ok.state == pb.PAIR_STATE_IN_SYNC and ok.epoch == 1
    assert events(env) == [(None, "in_sync", 1)]


async def test_report_degraded_derives_and_accumulates(env: Env) -> None:
    await env.register(env.primary, "primary")
    await env.register(env.secondary, "secondary")
    await env.create()
    reply = await degrade(env)
    assert reply.state == pb.PAIR_STATE_DEGRADED and reply.epoch == 1
    assert [(e.offset, e.length) for e in reply.failed_extents] == [(4096, 4096 + 100)]
    st = await env.get()
    assert st.state == pb.PAIR_STATE_DEGRADED
    assert st.fault_snapshot_id == 11 and st.failed_bytes == 4196
    assert st.last_error == "secondary NACKed seq 3: EIO"

    # More failure information while degraded: merged, snapshot kept when 0.
    reply = await env.report(
        pb.PAIR_STATE_DEGRADED,
        1,
        unacked=[pb.ReplicatedWriteRef(seq=9, offset=0, length=10)],
        failed_extents=[pb.Extent(offset=1 * MiB, length=1)],
        reason="ack timeout",
    )
    assert [(e.offset, e.length) for e in reply.failed_extents] == [(0, 10), (4096, 4196), (MiB, 1)]
    st = await env.get()
    assert st.fault_snapshot_id == 11 and st.last_error == "ack timeout" and st.failed_bytes == 4196 + 11
    assert events(env) == [(None, "in_sync", 1), ("in_sync", "degraded", 1), ("degraded", "degraded", 1)]

    # Without a resync there is nothing to be in sync from, or progress of.
    await expect_error(grpc.StatusCode.FAILED_PRECONDITION, env.report(pb.PAIR_STATE_IN_SYNC, 1), "no resync")
    await expect_error(
        grpc.StatusCode.FAILED_PRECONDITION, env.report(pb.PAIR_STATE_RESYNCING, 1), "degraded"
    )


async def test_status_shows_first_64_extents_and_all_bytes(env: Env) -> None:
    await env.register(env.primary, "primary")
    await env.register(env.secondary, "secondary")
    await env.create()
    nacks = [pb.Nack(seq=i, offset=i * 8192, length=4096) for i in range(100)]
    reply = await env.report(pb.PAIR_STATE_DEGRADED, 1, nacks=nacks)
    assert len(reply.failed_extents) == 100
    st = await env.get()
    assert len(st.failed_extents) == 64 and st.failed_bytes == 100 * 4096
    assert "100 write(s) NACKed" in st.last_error


# ---------------------------------------------------------------- resync driver


async def test_full_recovery_cycle(pair: Env) -> None:
    env = pair
    await degrade(env)
    # The primary's heartbeat has no fault snapshot yet: the driver waits.
    env.primary_reports(
        pb.PAIR_STATE_DEGRADED,
        1,
        fault_snapshot_id=0,
        acked_seq=2,
        last_seq=4,
        resync_bytes_sent=7,
        resync_chunks_refused=1,
        last_stall_ms=2.5,
    )
    await report_arrived(env, lambda r: r.acked_seq == 2)
    assert resync_steps(env) == []  # without a fault snapshot the driver waits
    assert env.primary.resync_requests == []
    st = await env.get()
    assert (st.acked_seq, st.last_seq) == (2, 4)
    assert (st.resync_bytes_sent, st.resync_chunks_refused, st.last_stall_ms) == (7, 1, 2.5)
    assert st.state == pb.PAIR_STATE_DEGRADED

    env.primary_reports(pb.PAIR_STATE_DEGRADED, 1, fault_snapshot_id=11)
    await wait_until(lambda: _resync_count(env, 1), what="StartResync")
    assert [(r.volume, r.epoch) for r in env.primary.resync_requests] == [("vol1", 2)]
    st = await env.get()
    assert st.state == pb.PAIR_STATE_RESYNCING and st.epoch == 2
    assert st.failed_bytes == 4196  # kept until in sync

    # The old epoch is fenced out.
    await expect_error(
        grpc.StatusCode.FAILED_PRECONDITION,
        env.report(pb.PAIR_STATE_IN_SYNC, 1),
        "stale",
        "epoch 1",
        "epoch 2",
    )
    # Progress via report, then via heartbeat (newer wins).
    await env.report(
        pb.PAIR_STATE_RESYNCING, 2, resync=pb.ResyncProgress(bytes_done=100, bytes_total=4196, round=0)
    )
    st = await env.get()
    assert (st.resync.bytes_done, st.resync.bytes_total) == (100, 4196)
    env.primary_reports(
        pb.PAIR_STATE_RESYNCING, 2, resync=pb.ResyncProgress(bytes_done=2000, bytes_total=4196, round=1)
    )

    async def hb_progress() -> bool:
        return (await env.get()).resync.bytes_done == 2000

    await wait_until(hb_progress, what="heartbeat progress")
    # Secondary learns the new epoch from its assignments.
    hb = await env.stub.Heartbeat(pb.HeartbeatRequest(address=env.secondary.address))
    assert hb.assignments[0].epoch == 2

    reply = await env.report(pb.PAIR_STATE_IN_SYNC, 2, reason="final diff applied")
    assert reply.state == pb.PAIR_STATE_IN_SYNC and reply.epoch == 2 and list(reply.failed_extents) == []
    env.primary_reports(pb.PAIR_STATE_IN_SYNC, 2)
    st = await env.get()
    assert st.state == pb.PAIR_STATE_IN_SYNC and st.epoch == 2
    assert st.failed_bytes == 0 and list(st.failed_extents) == [] and st.fault_snapshot_id == 0
    assert st.last_error == ""
    assert events(env) == [
        (None, "in_sync", 1),
        ("in_sync", "degraded", 1),
        ("degraded", "resyncing", 2),
        ("resyncing", "in_sync", 2),
    ]
    assert env.coord.db is not None
    reasons = [e.reason for e in env.coord.db.events("vol1")]
    assert "secondary NACKed seq 3: EIO" in reasons[1]
    assert "secondary NACKed seq 3: EIO" in reasons[3]  # the last error lives on in the events
    await report_arrived(env, lambda r: r.state == pb.PAIR_STATE_IN_SYNC)
    assert resync_steps(env) == []  # in sync: nothing more to start
    assert len(env.primary.resync_requests) == 1


async def _resync_count(env: Env, n: int) -> bool:
    return len(env.primary.resync_requests) >= n


async def test_driver_waits_for_the_secondary(pair: Env) -> None:
    env = pair
    env.secondary.heartbeating = False
    env.clock.advance(NODE_TIMEOUT_S + 0.2)

    async def only_primary_alive() -> bool:
        st = await env.get()
        return st.primary_alive and not st.secondary_alive

    await wait_until(only_primary_alive, what="the secondary considered dead")
    await degrade(env)
    env.primary_reports(pb.PAIR_STATE_DEGRADED, 1, fault_snapshot_id=11)
    await report_arrived(env, lambda r: r.fault_snapshot_id == 11)
    assert resync_steps(env) == []  # the secondary is not alive: no probe, no resync
    st = await env.get()
    assert not st.secondary_alive and st.primary_alive
    assert env.primary.resync_requests == [] and st.state == pb.PAIR_STATE_DEGRADED
    env.secondary.heartbeating = True
    await wait_until(lambda: _resync_count(env, 1), what="StartResync after the secondary came back")
    assert (await env.get()).state == pb.PAIR_STATE_RESYNCING


async def test_start_resync_failure_backs_off_and_retries(pair: Env) -> None:
    env = pair
    # A refusal (not retried within the attempt), then an outage that outlasts
    # the in-call retries (3 attempts), then success.
    env.primary.resync_errors = [grpc.StatusCode.FAILED_PRECONDITION] + [grpc.StatusCode.UNAVAILABLE] * 3
    await degrade(env)
    env.primary_reports(pb.PAIR_STATE_DEGRADED, 1, fault_snapshot_id=11)
    await wait_until(lambda: _resync_count(env, 5), timeout_s=10.0, what="five StartResync calls")

    async def resyncing() -> bool:
        return (await env.get()).state == pb.PAIR_STATE_RESYNCING

    await wait_until(resyncing, what="resyncing")
    epochs = [r.epoch for r in env.primary.resync_requests]
    assert epochs == [2, 3, 3, 3, 4]  # a new epoch per attempt, the same one within an attempt
    st = await env.get()
    assert st.epoch == 4
    assert events(env)[1:] == [
        ("in_sync", "degraded", 1),
        ("degraded", "resyncing", 2),
        ("resyncing", "degraded", 2),
        ("degraded", "resyncing", 3),
        ("resyncing", "degraded", 3),
        ("degraded", "resyncing", 4),
    ]
    assert env.coord.db is not None
    failed = [e.reason for e in env.coord.db.events("vol1") if e.to_state is PairState.DEGRADED][1:]
    assert "FAILED_PRECONDITION" in failed[0] and "UNAVAILABLE" in failed[1]


async def test_resyncing_goes_degraded_when_secondary_goes_silent(pair: Env) -> None:
    env = pair
    await degrade(env)
    env.primary_reports(pb.PAIR_STATE_DEGRADED, 1, fault_snapshot_id=11)
    await wait_until(lambda: _resync_count(env, 1), what="StartResync")
    env.primary_reports(pb.PAIR_STATE_RESYNCING, 2)
    env.secondary.heartbeating = False

    async def degraded() -> bool:
        return (await env.get()).state == pb.PAIR_STATE_DEGRADED

    await wait_until(degraded, what="degraded after the secondary went silent")
    st = await env.get()
    assert st.epoch == 2 and "has not heartbeated" in st.last_error and st.failed_bytes == 4196
    # The primary finished anyway over its own link: accepted for the epoch it was started at.
    reply = await env.report(pb.PAIR_STATE_IN_SYNC, 2)
    assert reply.state == pb.PAIR_STATE_IN_SYNC
    assert events(env)[-2:] == [("resyncing", "degraded", 2), ("degraded", "in_sync", 2)]


async def test_primary_reports_degraded_during_resync(pair: Env) -> None:
    env = pair
    await degrade(env)
    env.primary_reports(pb.PAIR_STATE_DEGRADED, 1, fault_snapshot_id=11)
    await wait_until(lambda: _resync_count(env, 1), what="StartResync")
    env.primary_reports(pb.PAIR_STATE_RESYNCING, 2)
    reply = await env.report(
        pb.PAIR_STATE_DEGRADED, 2, reason="resync stream broke", nacks=[pb.Nack(offset=0, length=1)]
    )
    assert reply.state == pb.PAIR_STATE_DEGRADED and reply.epoch == 2
    assert [(e.offset, e.length) for e in reply.failed_extents] == [(0, 1), (4096, 4196)]
    # Once the primary's heartbeat shows the fault snapshot again, the driver retries (after backoff).
    env.primary_reports(pb.PAIR_STATE_DEGRADED, 2, fault_snapshot_id=11)
    await wait_until(lambda: _resync_count(env, 2), what="second StartResync")
    assert env.primary.resync_requests[-1].epoch == 3


async def test_primary_heartbeat_degraded_is_a_safety_net(pair: Env) -> None:
    """A lost ReportReplication: the primary's heartbeat alone moves the pair to degraded."""
    env = pair
    env.clock.advance(NODE_TIMEOUT_S)  # in sync for longer than the grace
    env.primary_reports(
        pb.PAIR_STATE_DEGRADED,
        1,
        failed_extents=[pb.Extent(offset=0, length=512)],
        fault_snapshot_id=5,
        last_error="ack timeout",
    )
    await wait_until(lambda: _resync_count(env, 1), what="StartResync from heartbeat-only degradation")
    st = await env.get()
    assert st.epoch == 2 and st.failed_bytes == 512 and st.fault_snapshot_id == 5
    assert events(env)[1:] == [("in_sync", "degraded", 1), ("degraded", "resyncing", 2)]


async def test_auto_resync_off(tmp_path: Path) -> None:
    env = await _make_env(tmp_path, auto_resync=False)
    try:
        await env.register(env.primary, "primary")
        await env.register(env.secondary, "secondary")
        env.primary.start_heartbeats(env.stub)
        env.secondary.start_heartbeats(env.stub)
        await env.create()
        await degrade(env)
        env.primary_reports(pb.PAIR_STATE_DEGRADED, 1, fault_snapshot_id=11)
        await report_arrived(env, lambda r: r.fault_snapshot_id == 11)
        assert resync_steps(env) == []  # ready, but the driver is off
        assert env.primary.resync_requests == []
        assert (await env.get()).state == pb.PAIR_STATE_DEGRADED
    finally:
        await env.primary.stop()
        await env.secondary.stop()
        await env.channel.close()
        await env.coord.stop(0)


# ---------------------------------------------------------------- restart


async def test_restart_loses_nothing(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    await env.register(env.primary, "primary")
    await env.register(env.secondary, "secondary")
    await env.create()
    await degrade(env)
    before = await env.get()
    await env.restart(auto_resync=False)
    after = await env.get()
    # Nobody alive yet after the restart: the status shows the primary lost,
    # the persisted state is unchanged.
    assert before.state == pb.PAIR_STATE_DEGRADED
    assert after.state == pb.PAIR_STATE_PRIMARY_LOST
    assert env.servicer.pair("vol1").state is PairState.DEGRADED
    for f in (
        "spec",
        "epoch",
        "volume_uuid",
        "generation",
        "secondary_generation",
        "auto_failover",
        "primary",
        "secondary",
        "failed_extents",
        "failed_bytes",
        "fault_snapshot_id",
        "last_error",
        "state_changed_at",
        "resync_mode",
    ):
        assert getattr(after, f) == getattr(before, f), f
    # Liveness is not persisted: nobody is alive until heard from.
    assert not after.primary_alive and not after.secondary_alive
    # Known nodes keep heartbeating without registering again.
    hb = await env.stub.Heartbeat(pb.HeartbeatRequest(address=env.primary.address))
    assert hb.known and hb.assignments[0].spec.name == "vol1"
    assert (await env.get()).primary_alive
    assert (await env.get()).state == pb.PAIR_STATE_DEGRADED
    assert events(env) == [(None, "in_sync", 1), ("in_sync", "degraded", 1)]


async def test_state_changes_are_logged(pair: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="coordinator.service")
    await degrade(pair)
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("in_sync -> degraded" in m and "EIO" in m for m in msgs), msgs


async def test_serve_stops_on_signal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import os
    import signal

    from coordinator.server import serve

    caplog.set_level(logging.INFO, logger="coordinator.server")
    before = signal.getsignal(signal.SIGTERM)
    task = asyncio.create_task(serve("127.0.0.1:0", tmp_path, **FAST))

    async def handler_installed() -> bool:
        return signal.getsignal(signal.SIGTERM) is not before

    await wait_until(handler_installed, what="serve() waiting for signals")
    assert any("coordinator listening on 127.0.0.1:" in r.getMessage() for r in caplog.records)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(task, timeout=10)
    assert any("coordinator stopped" in r.getMessage() for r in caplog.records)
