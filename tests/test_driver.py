"""The coordinator's decisions as data: tables for ``syncrep.core.driver``.

Like etcd raft's testdata: each row is an input the coordinator may see and
the commands it must be told to carry out, written compactly (see ``short``).
No sockets, no sleeps, no clock: time is a number in the row. The trace tests
at the end play the shell: they carry out each command on a small in-memory
world and call ``decide`` again, as ``CoordinatorServicer.tick`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import pytest

from coordinator.db import PairRecord
from syncrep.blockstore.extents import Extent
from syncrep.core import driver
from syncrep.core.driver import (
    Backoff,
    ChangePair,
    ClearBackoff,
    Code,
    Command,
    CreatePair,
    CreateVolumeArgs,
    DeletePair,
    Liveness,
    Nack,
    NodeSilent,
    Policy,
    ProbeHealth,
    Problem,
    Progress,
    PushAssignment,
    ReplicationReport,
    Report,
    SaveProgress,
    SetBackoff,
    StartResync,
    decide,
    on_heartbeat,
    on_push_failed,
    on_report,
    on_start_resync_failed,
    plan_create_volume,
    resync_backoff_s,
    validate_config,
    validate_create_volume,
    validate_register,
    validate_report,
)
from syncrep.core.identity import Identity
from syncrep.core.pairstate import PairState
from syncrep.pb import syncrep_pb2 as pb

S_ = PairState
P, S = "10.0.0.1:7001", "10.0.0.2:7002"
VOL = "vol1"
MiB = 1024 * 1024
POLICY = Policy(node_timeout_s=3.0, auto_resync=True, resync_retry_initial_s=0.5, resync_retry_max_s=10.0)
FAILED = (Extent(4096, 4196),)
UUID = "c0ffee" * 5 + "00"
G0, G1, G2 = 0x10, 0x11, 0x12
#: The primary went degraded (new generation G1); the secondary is still at G0.
PID = Identity(UUID, G1, (G0,))
SID = Identity(UUID, G0)


def pair(state: PairState = S_.DEGRADED, epoch: int = 1, **kw: Any) -> PairRecord:
    base: dict[str, Any] = dict(
        name=VOL,
        size_bytes=64 * MiB,
        block_size=4096,
        primary=P,
        secondary=S,
        epoch=epoch,
        state=state,
        failed_extents=FAILED if state is not S_.IN_SYNC else (),
        fault_snapshot_id=11 if state is not S_.IN_SYNC else 0,
        volume_uuid=UUID,
        generation=G1 if state is not S_.IN_SYNC else G0,
        secondary_generation=G0,
    )
    return PairRecord(**{**base, **kw})


def hb(state: PairState | None = S_.DEGRADED, epoch: int = 1, snap: int = 11, **kw: Any) -> Report:
    """The primary's heartbeat report (with its identity unless told otherwise)."""
    kw.setdefault("identity", PID)
    return Report(volume=VOL, epoch=epoch, state=state, fault_snapshot_id=snap, **kw)


def sec(identity: Identity | None = SID, epoch: int = 1, **kw: Any) -> Report:
    """The secondary's heartbeat report."""
    kw.setdefault("role", "secondary")
    return Report(volume=VOL, epoch=epoch, state=None, identity=identity, **kw)


def both(primary: Report, secondary: Report | None = None) -> dict[tuple[str, str], Report]:
    return {(P, VOL): primary, (S, VOL): sec() if secondary is None else secondary}


def short(cmd: Command) -> tuple[Any, ...]:
    """A command as a short tuple, for the tables."""
    if isinstance(cmd, ChangePair):
        return ("change", f"{cmd.from_state.value}->{cmd.to_state.value}", cmd.epoch)
    if isinstance(cmd, StartResync):
        return ("start", cmd.primary, cmd.epoch)
    if isinstance(cmd, ProbeHealth):
        return ("probe", cmd.address)
    if isinstance(cmd, SetBackoff):
        return ("backoff", cmd.failures, cmd.not_before)
    if isinstance(cmd, ClearBackoff):
        return ("clear",)
    if isinstance(cmd, NodeSilent):
        return ("silent", cmd.address, cmd.heard_before)
    if isinstance(cmd, SaveProgress):
        return ("progress", cmd.progress.bytes_done)
    if isinstance(cmd, CreatePair):
        return ("create", cmd.spec.name)
    if isinstance(cmd, DeletePair):
        return ("delete", cmd.volume)
    if isinstance(cmd, PushAssignment):
        return ("push", cmd.address)
    raise AssertionError(f"unknown command {cmd!r}")


def shorts(cmds: list[Command]) -> list[tuple[Any, ...]]:
    return [short(c) for c in cmds]


def test_wire_values_agree_with_the_protos() -> None:
    assert (driver.RESYNC_MODE_REWRITE, driver.RESYNC_MODE_DIRECT) == (
        pb.RESYNC_MODE_REWRITE,
        pb.RESYNC_MODE_DIRECT,
    )
    for code in Code:
        assert grpc.StatusCode[code.value].name == code.value


# ================================================================ decide(): one call per row

NOW = 100.0
BOTH = {P: 99.9, S: 99.9}  # both heard a moment ago
# The primary's heartbeat (degraded at epoch 1, fault snapshot 11) and the secondary's.
DEGRADED_HB = both(hb())


@dataclass
class Row:
    pair: PairRecord
    heard: dict[str, float] = field(default_factory=lambda: dict(BOTH))
    reports: dict[tuple[str, str], Report] = field(default_factory=lambda: dict(DEGRADED_HB))
    want: list[tuple[Any, ...]] = field(default_factory=list)
    healthy: dict[str, bool] | None = None
    backoff: dict[str, Backoff] | None = None
    in_flight: frozenset[str] = frozenset()
    policy: Policy = POLICY
    started_at: float = 0.0
    now: float = NOW


DECIDE: dict[str, Row] = {
    # -- the secondary stops heartbeating during a resync
    "resyncing, secondary silent past node_timeout_s -> degraded, first backoff": Row(
        pair(S_.RESYNCING, 2),
        heard={P: 99.9, S: 96.9},
        want=[("change", "resyncing->degraded", 2), ("backoff", 1, 100.5)],
    ),
    "resyncing, secondary silent exactly node_timeout_s -> nothing yet": Row(
        pair(S_.RESYNCING, 2), heard={P: 99.9, S: 97.0}
    ),
    "resyncing, secondary never heard but the coordinator is up for less than the timeout": Row(
        pair(S_.RESYNCING, 2), heard={P: 99.9}, started_at=98.0
    ),
    "resyncing, secondary never heard since the coordinator started long ago -> degraded": Row(
        pair(S_.RESYNCING, 2),
        heard={P: 99.9},
        started_at=90.0,
        want=[("change", "resyncing->degraded", 2), ("backoff", 1, 100.5)],
    ),
    "resyncing, the second failure doubles the backoff": Row(
        pair(S_.RESYNCING, 3),
        heard={P: 99.9, S: 90.0},
        backoff={VOL: Backoff(failures=1, not_before=0.0)},
        want=[("change", "resyncing->degraded", 3), ("backoff", 2, 101.0)],
    ),
    "resyncing, the backoff is capped at resync_retry_max_s": Row(
        pair(S_.RESYNCING, 3),
        heard={P: 99.9, S: 90.0},
        backoff={VOL: Backoff(failures=10, not_before=0.0)},
        want=[("change", "resyncing->degraded", 3), ("backoff", 11, 110.0)],
    ),
    "in sync, secondary silent: the primary reports failures, the coordinator does nothing": Row(
        pair(S_.IN_SYNC), heard={P: 99.9, S: 50.0}, reports={}
    ),
    # -- a resync is in progress: not restarted
    "resyncing, secondary alive: the resync in progress is not restarted": Row(
        pair(S_.RESYNCING, 2), healthy={S: True}
    ),
    "degraded, StartResync in flight: not started twice": Row(
        pair(), in_flight=frozenset({VOL}), healthy={S: True}
    ),
    # -- the secondary is back: probe, then resync at epoch + 1
    "degraded, both alive, fault snapshot shown, no probe answer yet -> probe the secondary": Row(
        pair(), want=[("probe", S)]
    ),
    "degraded, the secondary answers its health check -> resync at epoch + 1": Row(
        pair(), healthy={S: True}, want=[("change", "degraded->resyncing", 2), ("start", P, 2)]
    ),
    "degraded, the secondary does not answer its health check -> wait": Row(pair(), healthy={S: False}),
    "degraded, secondary silent -> no probe, no resync": Row(pair(), heard={P: 99.9, S: 90.0}),
    "degraded, secondary never heard -> no resync": Row(pair(), heard={P: 99.9}, healthy={S: True}),
    # -- the primary
    "degraded, primary dead -> no resync": Row(pair(), heard={P: 90.0, S: 99.9}, healthy={S: True}),
    "degraded, no heartbeat report from the primary yet -> no resync": Row(
        pair(), reports={}, healthy={S: True}
    ),
    "degraded, only the secondary's report: it does not count": Row(
        pair(), reports={(S, VOL): hb()}, healthy={S: True}
    ),
    "degraded, primary reports no fault snapshot yet -> no resync": Row(
        pair(), reports={(P, VOL): hb(snap=0)}, healthy={S: True}
    ),
    "degraded, primary reports in sync -> no resync": Row(
        pair(), reports={(P, VOL): hb(S_.IN_SYNC)}, healthy={S: True}
    ),
    "degraded, primary reports an unknown state -> no resync (and no crash)": Row(
        pair(), reports={(P, VOL): hb(None)}, healthy={S: True}
    ),
    "degraded, primary reports an epoch the pair never had -> no resync": Row(
        pair(epoch=1), reports={(P, VOL): hb(epoch=2)}, healthy={S: True}
    ),
    "degraded, primary still at an older epoch (StartResync never reached it) -> resync": Row(
        pair(epoch=3),
        reports=both(hb(epoch=2)),
        healthy={S: True},
        want=[("change", "degraded->resyncing", 4), ("start", P, 4)],
    ),
    # -- backoff between attempts
    "degraded, backing off -> nothing, not even a probe": Row(
        pair(epoch=2), backoff={VOL: Backoff(failures=1, not_before=100.5)}, healthy={S: True}
    ),
    "degraded, the backoff just expired -> resync": Row(
        pair(epoch=2),
        backoff={VOL: Backoff(failures=1, not_before=100.0)},
        healthy={S: True},
        want=[("change", "degraded->resyncing", 3), ("start", P, 3)],
    ),
    # -- auto_resync off
    "auto_resync off: a ready pair is left alone": Row(
        pair(), healthy={S: True}, policy=replace(POLICY, auto_resync=False)
    ),
    "auto_resync off: a resyncing pair whose secondary went silent still goes degraded": Row(
        pair(S_.RESYNCING, 2),
        heard={P: 99.9, S: 90.0},
        policy=replace(POLICY, auto_resync=False),
        want=[("change", "resyncing->degraded", 2), ("backoff", 1, 100.5)],
    ),
}


def run(
    row: Row, nodes: tuple[str, ...] = (), reported_silent: frozenset[str] = frozenset()
) -> list[Command]:
    return decide(
        [row.pair],
        Liveness(row.heard, row.started_at, nodes=nodes, reported_silent=reported_silent),
        row.reports,
        row.now,
        policy=row.policy,
        backoff=row.backoff,
        in_flight=row.in_flight,
        healthy=row.healthy,
    )


@pytest.mark.parametrize("name", list(DECIDE))
def test_decide(name: str) -> None:
    row = DECIDE[name]
    assert shorts(run(row)) == row.want


def test_decide_resync_start_in_detail() -> None:
    row = Row(pair(epoch=2), healthy={S: True}, backoff={VOL: Backoff(failures=2, not_before=99.0)})
    change, start = run(row)
    assert isinstance(change, ChangePair) and isinstance(start, StartResync)
    assert change.event.value == "resync_started" and change.progress == Progress()  # progress reset
    assert change.failed_extents is None and change.fault_snapshot_id is None  # kept until in sync
    assert "fault snapshot 11 present; resync attempt 3 at epoch 3" in change.reason
    assert "(1 failed extents, 4196 bytes)" in change.reason
    assert (start.volume, start.primary, start.epoch) == (VOL, P, 3)


def test_decide_silent_secondary_in_detail() -> None:
    row = DECIDE["resyncing, secondary silent past node_timeout_s -> degraded, first backoff"]
    change, backoff = run(row)
    assert isinstance(change, ChangePair) and isinstance(backoff, SetBackoff)
    assert change.event.value == "secondary_failed"
    assert change.reason == change.last_error
    assert change.reason == (
        f"secondary {S} has not heartbeated for 3.1 s (node_timeout_s=3.0) during the resync of epoch 2"
    )
    assert backoff.delay_s == 0.5


def test_decide_jitter_lengthens_the_backoff() -> None:
    row = DECIDE["resyncing, secondary silent past node_timeout_s -> degraded, first backoff"]
    cmds = decide([row.pair], Liveness(row.heard, 0.0), row.reports, NOW, policy=POLICY, jitter=0.5)
    assert shorts(cmds)[1] == ("backoff", 1, NOW + 0.5 + 0.25)


@pytest.mark.parametrize(
    ("heard", "reported_silent", "want"),
    [
        ({P: 99.9, S: 96.0}, frozenset(), [("silent", S, True)]),
        ({P: 99.9, S: 96.0}, frozenset({S}), []),  # said once, not again
        ({P: 99.9}, frozenset(), [("silent", S, False)]),  # registered, never heard
        ({P: 99.9, S: 97.0}, frozenset(), []),
    ],
)
def test_decide_reports_silent_nodes_once(
    heard: dict[str, float], reported_silent: frozenset[str], want: list[tuple[Any, ...]]
) -> None:
    row = Row(pair(S_.IN_SYNC), heard=heard, reports={})
    assert shorts(run(row, nodes=(P, S), reported_silent=reported_silent)) == want


def test_decide_does_not_touch_its_inputs_and_repeats_itself() -> None:
    heard = dict(BOTH)
    reports = dict(DEGRADED_HB)
    backoff = {VOL: Backoff(1, 50.0)}
    args = ([pair()], Liveness(heard, 0.0), reports, NOW)
    first = decide(*args, policy=POLICY, backoff=backoff, healthy={S: True})
    assert first == decide(*args, policy=POLICY, backoff=backoff, healthy={S: True})
    assert heard == BOTH and reports == DEGRADED_HB and backoff == {VOL: Backoff(1, 50.0)}


# ================================================================ traces: decide, carry out, decide again


@dataclass
class World:
    """What the shell keeps, and the commands it was told to carry out."""

    pairs: dict[str, PairRecord]
    heard: dict[str, float] = field(default_factory=dict)
    reports: dict[tuple[str, str], Report] = field(default_factory=dict)
    backoff: dict[str, Backoff] = field(default_factory=dict)
    in_flight: set[str] = field(default_factory=set)
    sent: list[tuple[Any, ...]] = field(default_factory=list)

    def tick(self, now: float, healthy: dict[str, bool] | None = None) -> list[tuple[Any, ...]]:
        cmds = decide(
            list(self.pairs.values()),
            Liveness(self.heard, 0.0),
            self.reports,
            now,
            policy=POLICY,
            backoff=self.backoff,
            in_flight=self.in_flight,
            healthy=healthy,
        )
        for c in cmds:
            self.carry_out(c)
        return shorts(cmds)

    def carry_out(self, c: Command) -> None:
        if isinstance(c, ChangePair):
            p = self.pairs[c.volume]
            assert p.state is c.from_state
            self.pairs[c.volume] = replace(
                p,
                state=c.to_state,
                epoch=c.epoch,
                last_error=p.last_error if c.last_error is None else c.last_error,
            )
        elif isinstance(c, SetBackoff):
            self.backoff[c.volume] = Backoff(c.failures, c.not_before)
        elif isinstance(c, ClearBackoff):
            self.backoff.pop(c.volume, None)
        elif isinstance(c, StartResync):
            self.in_flight.add(c.volume)
            self.sent.append(short(c))

    def hear(self, now: float, *addresses: str) -> None:
        for a in addresses:
            self.heard[a] = now


def test_trace_secondary_goes_silent_comes_back_and_resyncs_at_the_next_epoch() -> None:
    w = World({VOL: pair(S_.RESYNCING, 2)}, reports=both(hb(S_.RESYNCING, 2)))
    w.hear(0.0, P, S)
    assert w.tick(0.0) == []
    for t in (1.0, 2.0, 3.0):  # the secondary stops heartbeating after t=0
        w.hear(t, P)
        assert w.tick(t) == []
    w.hear(3.5, P)
    assert w.tick(3.5) == [("change", "resyncing->degraded", 2), ("backoff", 1, 4.0)]
    w.in_flight.clear()  # the StartResync call of epoch 2 finished long ago
    # The primary notices too and shows its fault snapshot; the secondary is back.
    w.reports[(P, VOL)] = hb(S_.DEGRADED, 2)
    w.hear(3.6, P, S)
    assert w.tick(3.6, healthy={S: True}) == []  # backing off
    w.hear(4.0, P, S)
    assert w.tick(4.0) == [("probe", S)]
    assert w.tick(4.0, healthy={S: False}) == []  # not serving yet: no epoch spent
    w.hear(4.5, P, S)
    assert w.tick(4.5) == [("probe", S)]
    assert w.tick(4.5, healthy={S: True}) == [("change", "degraded->resyncing", 3), ("start", P, 3)]
    # In progress: not restarted, however often the tick runs.
    for t in (4.6, 5.0, 6.0):
        w.hear(t, P, S)
        assert w.tick(t, healthy={S: True}) == []
    assert w.sent == [("start", P, 3)]


def test_trace_failed_start_resync_backs_off_then_retries_at_a_new_epoch() -> None:
    w = World({VOL: pair(S_.DEGRADED, 1)}, reports=both(hb()))
    w.hear(10.0, P, S)
    assert w.tick(10.0, healthy={S: True}) == [("change", "degraded->resyncing", 2), ("start", P, 2)]
    # StartResync at epoch 2 was refused.
    w.in_flight.discard(VOL)
    failed = on_start_resync_failed(
        w.pairs[VOL],
        P,
        2,
        "FAILED_PRECONDITION: no fault snapshot",
        backoff=Backoff(),
        now=10.2,
        policy=POLICY,
    )
    assert shorts(failed) == [("change", "resyncing->degraded", 2), ("backoff", 1, 10.7)]
    for c in failed:
        w.carry_out(c)
    w.hear(10.5, P, S)
    assert w.tick(10.5, healthy={S: True}) == []  # backing off until 10.7
    w.hear(10.7, P, S)
    assert w.tick(10.7, healthy={S: True}) == [("change", "degraded->resyncing", 3), ("start", P, 3)]
    assert w.sent == [("start", P, 2), ("start", P, 3)]


def test_trace_primary_dead_no_resync_until_it_is_back() -> None:
    w = World({VOL: pair(S_.DEGRADED, 1)}, reports=both(hb()))
    w.hear(0.0, P, S)
    for t in (3.5, 5.0):
        w.hear(t, S)  # only the secondary heartbeats: the primary is dead
        assert w.tick(t, healthy={S: True}) == []
    w.hear(5.5, P, S)
    assert w.tick(5.5, healthy={S: True}) == [("change", "degraded->resyncing", 2), ("start", P, 2)]


# ================================================================ the other decisions


def rr(state: int, epoch: int = 1, **kw: Any) -> ReplicationReport:
    return ReplicationReport(volume=VOL, reporter=P, epoch=epoch, state=state, **kw)


NACK = Nack(seq=3, offset=4096, length=4096, code="NACK_CODE_IO_ERROR", message="EIO")

# (pair, report, (resync_started, secondary_alive), expected commands or (Code, fragments))
REPORTS: dict[str, tuple[PairRecord, ReplicationReport, tuple[bool, bool], Any]] = {
    "degraded report in sync -> degraded": (
        pair(S_.IN_SYNC),
        rr(pb.PAIR_STATE_DEGRADED, nacks=(NACK,), unacked=((8192, 100),), fault_snapshot_id=11),
        (False, True),
        [("change", "in_sync->degraded", 1)],
    ),
    "degraded report during a resync -> degraded and back off": (
        pair(S_.RESYNCING, 2),
        rr(pb.PAIR_STATE_DEGRADED, 2, reason="resync stream broke"),
        (True, True),
        [("change", "resyncing->degraded", 2), ("backoff", 1, NOW + 0.5)],
    ),
    "degraded report while degraded -> more failure information": (
        pair(),
        rr(pb.PAIR_STATE_DEGRADED, failed_extents=((MiB, 1),)),
        (False, True),
        [("change", "degraded->degraded", 1)],
    ),
    "progress during the resync -> saved": (
        pair(S_.RESYNCING, 2),
        rr(pb.PAIR_STATE_RESYNCING, 2, progress=Progress(bytes_done=100, bytes_total=4196)),
        (True, True),
        [("progress", 100)],
    ),
    "progress while degraded by the coordinator alone, resync started at this epoch -> resyncing": (
        pair(S_.DEGRADED, 2),
        rr(pb.PAIR_STATE_RESYNCING, 2, progress=Progress(bytes_done=7)),
        (True, True),
        [("change", "degraded->resyncing", 2)],
    ),
    "progress while degraded, secondary silent -> refused": (
        pair(S_.DEGRADED, 2),
        rr(pb.PAIR_STATE_RESYNCING, 2),
        (True, False),
        (Code.FAILED_PRECONDITION, ["degraded at epoch 2", "not resyncing"]),
    ),
    "progress while degraded, no resync at this epoch -> refused": (
        pair(S_.DEGRADED, 1),
        rr(pb.PAIR_STATE_RESYNCING, 1),
        (False, True),
        (Code.FAILED_PRECONDITION, ["degraded"]),
    ),
    "progress while in sync -> refused": (
        pair(S_.IN_SYNC),
        rr(pb.PAIR_STATE_RESYNCING, 1),
        (False, True),
        (Code.FAILED_PRECONDITION, ["in_sync", "not resyncing"]),
    ),
    "in sync while in sync (a retried report) -> nothing": (
        pair(S_.IN_SYNC),
        rr(pb.PAIR_STATE_IN_SYNC),
        (False, True),
        [],
    ),
    "in sync while degraded, no resync started -> refused": (
        pair(),
        rr(pb.PAIR_STATE_IN_SYNC),
        (False, True),
        (Code.FAILED_PRECONDITION, ["no resync"]),
    ),
    "in sync after the resync -> in sync, failures forgotten": (
        pair(S_.RESYNCING, 2),
        rr(pb.PAIR_STATE_IN_SYNC, 2, reason="final diff applied"),
        (True, True),
        [("change", "resyncing->in_sync", 2), ("clear",)],
    ),
    "in sync while degraded by the coordinator alone, resync started at this epoch -> in sync": (
        pair(S_.DEGRADED, 2),
        rr(pb.PAIR_STATE_IN_SYNC, 2),
        (True, False),
        [("change", "degraded->in_sync", 2), ("clear",)],
    ),
    "stale epoch -> refused": (
        pair(S_.RESYNCING, 2),
        rr(pb.PAIR_STATE_IN_SYNC, 1),
        (True, True),
        (Code.FAILED_PRECONDITION, ["stale", "epoch 1", "epoch 2"]),
    ),
}


@pytest.mark.parametrize("name", list(REPORTS))
def test_on_report(name: str) -> None:
    p, report, (started, alive), want = REPORTS[name]
    out = on_report(
        p, report, resync_started=started, secondary_alive=alive, backoff=Backoff(), now=NOW, policy=POLICY
    )
    if isinstance(want, tuple):
        code, fragments = want
        assert isinstance(out, Problem) and out.code is code, out
        for f in fragments:
            assert f in out.message, out.message
    else:
        assert not isinstance(out, Problem), out
        assert shorts(out) == want


def test_on_report_degraded_in_detail() -> None:
    name = "degraded report in sync -> degraded"
    p, report, _, _ = REPORTS[name]
    out = on_report(
        p, report, resync_started=False, secondary_alive=True, backoff=Backoff(), now=NOW, policy=POLICY
    )
    assert not isinstance(out, Problem)
    (change,) = out
    assert isinstance(change, ChangePair)
    assert change.failed_extents == (Extent(4096, 4196),)  # NACK [4096, 8192) + unacked [8192, 8292)
    assert change.fault_snapshot_id == 11
    assert change.last_error == "1 write(s) NACKed, first seq 3: NACK_CODE_IO_ERROR EIO"
    assert "(1 nacks, 1 unacked writes; 1 failed extents, 4196 bytes)" in change.reason
    # More information later: merged; a report without a snapshot keeps the known one.
    more = on_report(
        replace(p, state=S_.DEGRADED, failed_extents=change.failed_extents, fault_snapshot_id=11),
        rr(pb.PAIR_STATE_DEGRADED, unacked=((0, 10),), failed_extents=((MiB, 1),), reason="ack timeout"),
        resync_started=False,
        secondary_alive=True,
        backoff=Backoff(),
        now=NOW,
        policy=POLICY,
    )
    assert not isinstance(more, Problem)
    (c,) = more
    assert isinstance(c, ChangePair)
    assert c.failed_extents == (Extent(0, 10), Extent(4096, 4196), Extent(MiB, 1))
    assert c.fault_snapshot_id == 11 and c.last_error == "ack timeout"


def test_on_report_in_sync_clears_the_failure_information() -> None:
    p = pair(S_.RESYNCING, 2, last_error="secondary NACKed seq 3: EIO")
    out = on_report(
        p,
        rr(pb.PAIR_STATE_IN_SYNC, 2, reason="final diff applied"),
        resync_started=True,
        secondary_alive=True,
        backoff=Backoff(2, 0.0),
        now=NOW,
        policy=POLICY,
    )
    assert not isinstance(out, Problem)
    change = out[0]
    assert isinstance(change, ChangePair)
    assert (change.failed_extents, change.fault_snapshot_id, change.last_error) == ((), 0, "")
    assert change.progress is None  # no progress in the report: kept
    assert "final diff applied" in change.reason and "secondary NACKed seq 3: EIO" in change.reason


# validate_report: (pair, report, None or (Code, fragment))
VALIDATE_REPORT: list[tuple[str, ReplicationReport, Any]] = [
    ("ok", rr(pb.PAIR_STATE_DEGRADED), None),
    (
        "not the primary",
        replace(rr(pb.PAIR_STATE_DEGRADED), reporter=S),
        (Code.PERMISSION_DENIED, "not the primary"),
    ),
    (
        "no reporter",
        replace(rr(pb.PAIR_STATE_DEGRADED), reporter=""),
        (Code.PERMISSION_DENIED, "(no reporter)"),
    ),
    ("stale epoch", rr(pb.PAIR_STATE_DEGRADED, 0), (Code.FAILED_PRECONDITION, "stale epoch")),
    (
        "epoch never issued",
        rr(pb.PAIR_STATE_DEGRADED, 5),
        (Code.FAILED_PRECONDITION, "epoch 5 was never issued"),
    ),
    ("unspecified state", rr(pb.PAIR_STATE_UNSPECIFIED), (Code.INVALID_ARGUMENT, "ReportReplication")),
    ("unknown state", rr(9), (Code.INVALID_ARGUMENT, "pair state 9")),
    (
        "nack beyond the end",
        rr(pb.PAIR_STATE_DEGRADED, nacks=(Nack(1, 64 * MiB - 1, 2),)),
        (Code.INVALID_ARGUMENT, "nack extent offset=67108863 length=2 ends at 67108865, beyond the end"),
    ),
    (
        "unacked write beyond the end",
        rr(pb.PAIR_STATE_DEGRADED, unacked=((64 * MiB, 1),)),
        (Code.INVALID_ARGUMENT, "unacked write extent"),
    ),
    (
        "failed extent beyond the end",
        rr(pb.PAIR_STATE_DEGRADED, failed_extents=((0, 64 * MiB + 1),)),
        (Code.INVALID_ARGUMENT, "failed extent"),
    ),
    ("extent ending exactly at the end", rr(pb.PAIR_STATE_DEGRADED, nacks=(Nack(1, 64 * MiB - 1, 1),)), None),
    # Only a degraded report's extents are failure information (and checked).
    ("extents of an in-sync report", rr(pb.PAIR_STATE_IN_SYNC, nacks=(Nack(1, 64 * MiB, 1),)), None),
]


@pytest.mark.parametrize(("name", "report", "want"), VALIDATE_REPORT, ids=[r[0] for r in VALIDATE_REPORT])
def test_validate_report(name: str, report: ReplicationReport, want: Any) -> None:
    problem = validate_report(pair(S_.IN_SYNC), report)
    if want is None:
        assert problem is None
    else:
        assert problem is not None and problem.code is want[0] and want[1] in problem.message, problem


# on_heartbeat: (pair, reporter, report, seconds since the pair's last state change, expected)
HEARTBEATS: dict[str, tuple[PairRecord | None, str, Report, float, list[tuple[Any, ...]]]] = {
    "in sync for longer than the grace, primary says degraded -> degraded": (
        pair(S_.IN_SYNC),
        P,
        hb(failed_extents=((0, 512),), snap=5, last_error="ack timeout"),
        3.0,
        [("change", "in_sync->degraded", 1)],
    ),
    "in sync for less than the grace -> nothing yet": (pair(S_.IN_SYNC), P, hb(), 2.9, []),
    "resyncing for longer than the grace -> degraded, back off": (
        pair(S_.RESYNCING, 2),
        P,
        hb(epoch=2),
        10.0,
        [("change", "resyncing->degraded", 2), ("backoff", 1, NOW + 0.5)],
    ),
    "degraded, nothing new -> nothing": (pair(), P, hb(), 10.0, []),
    "degraded, a new extent -> more failure information": (
        pair(),
        P,
        hb(failed_extents=((0, 1),)),
        0.0,
        [("change", "degraded->degraded", 1)],
    ),
    "degraded, a new fault snapshot -> more failure information": (
        pair(),
        P,
        hb(snap=12),
        0.0,
        [("change", "degraded->degraded", 1)],
    ),
    "stale epoch -> ignored": (pair(S_.IN_SYNC, 2), P, hb(epoch=1), 10.0, []),
    "the secondary's heartbeat -> ignored": (pair(S_.IN_SYNC), S, hb(), 10.0, []),
    "extents beyond the end -> ignored": (pair(S_.IN_SYNC), P, hb(failed_extents=((64 * MiB, 1),)), 10.0, []),
    "in sync report -> ignored": (pair(S_.DEGRADED), P, hb(S_.IN_SYNC), 10.0, []),
    "unknown volume -> ignored": (None, P, hb(), 10.0, []),
}


@pytest.mark.parametrize("name", list(HEARTBEATS))
def test_on_heartbeat(name: str) -> None:
    p, reporter, report, age, want = HEARTBEATS[name]
    wall = 1_700_000_000.0
    if p is not None:
        p = replace(p, state_changed_at=wall - age)
    cmds = on_heartbeat(p, reporter, report, wall_now=wall, policy=POLICY, backoff=Backoff(), now=NOW)
    assert shorts(cmds) == want


def test_on_heartbeat_degraded_in_detail() -> None:
    p, reporter, report, _, _ = HEARTBEATS[
        "in sync for longer than the grace, primary says degraded -> degraded"
    ]
    (change,) = on_heartbeat(p, reporter, report, wall_now=10.0, policy=POLICY, backoff=Backoff(), now=NOW)
    assert isinstance(change, ChangePair)
    assert change.failed_extents == (Extent(0, 512),) and change.fault_snapshot_id == 5
    assert change.last_error == "ack timeout"
    assert change.reason == f"primary {P} heartbeat reports the pair degraded at epoch 1: ack timeout"


@pytest.mark.parametrize(
    ("p", "epoch", "want"),
    [
        (pair(S_.RESYNCING, 2), 2, [("change", "resyncing->degraded", 2), ("backoff", 1, NOW + 0.5)]),
        (pair(S_.RESYNCING, 3), 2, []),  # a newer attempt is under way
        (pair(S_.DEGRADED, 2), 2, []),  # already degraded (the secondary went silent)
        (pair(S_.IN_SYNC, 2), 2, []),  # the primary finished anyway
        (None, 2, []),
    ],
)
def test_on_start_resync_failed(p: PairRecord | None, epoch: int, want: list[tuple[Any, ...]]) -> None:
    cmds = on_start_resync_failed(p, P, epoch, "UNAVAILABLE: down", backoff=Backoff(), now=NOW, policy=POLICY)
    assert shorts(cmds) == want
    if cmds:
        assert isinstance(cmds[0], ChangePair)
        assert cmds[0].last_error == f"StartResync on primary {P} at epoch 2 failed: UNAVAILABLE: down"


@pytest.mark.parametrize(
    ("failures", "jitter_s", "want"),
    [
        (1, 0.0, 0.5),
        (2, 0.0, 1.0),
        (3, 0.0, 2.0),
        (1, 0.3, 0.8),
        (6, 0.0, 10.0),
        (5000, 0.5, 10.0),
        (0, 0.0, 0.5),
    ],
)
def test_resync_backoff_s(failures: int, jitter_s: float, want: float) -> None:
    assert resync_backoff_s(failures, initial_s=0.5, max_s=10.0, jitter_s=jitter_s) == pytest.approx(want)


# ================================================================ validators

REG = [P, S]


def cv(**kw: Any) -> CreateVolumeArgs:
    return CreateVolumeArgs(**{**dict(name=VOL, size_bytes=64 * MiB, primary=P, secondary=S), **kw})


CREATE: list[tuple[dict[str, Any], Code | None, list[str]]] = [
    ({}, None, []),
    ({"name": ""}, Code.INVALID_ARGUMENT, ["volume name"]),
    ({"name": "-bad"}, Code.INVALID_ARGUMENT, ["volume name", "-bad"]),
    ({"name": "a" * 65}, Code.INVALID_ARGUMENT, ["volume name"]),
    ({"name": "a" * 64}, None, []),
    ({"name": "has space"}, Code.INVALID_ARGUMENT, ["volume name"]),
    ({"size_bytes": 0}, Code.INVALID_ARGUMENT, ["size_bytes", "> 0"]),
    ({"block_size": 3000}, Code.INVALID_ARGUMENT, ["3000", "power of two", "512"]),
    ({"block_size": 256}, Code.OUT_OF_RANGE, ["256", "512..1048576"]),
    ({"block_size": 2 * MiB}, Code.OUT_OF_RANGE, ["2097152", "1048576"]),
    ({"size_bytes": 4097}, Code.INVALID_ARGUMENT, ["4097", "multiple", "4096", "nearest: 4096 or 8192"]),
    ({"size_bytes": 512 * (2**32 + 1), "block_size": 512}, Code.OUT_OF_RANGE, ["4294967296"]),
    ({"size_bytes": 512 * 2**32, "block_size": 512}, None, []),
    ({"resync_mode": 7}, Code.INVALID_ARGUMENT, ["resync_mode 7"]),
    ({"resync_mode": 1}, None, []),
    ({"primary": "nohost"}, Code.INVALID_ARGUMENT, ["primary", "host:port"]),
    ({"secondary": "h:0"}, Code.INVALID_ARGUMENT, ["secondary", "outside 1..65535"]),
    ({"secondary": P}, Code.INVALID_ARGUMENT, ["same node"]),
    (
        {"secondary": "127.0.0.1:1"},
        Code.FAILED_PRECONDITION,
        [
            "node 127.0.0.1:1 is not registered",
            "syncrep secondary --coordinator 127.0.0.1:9 --listen 127.0.0.1:1",
        ],
    ),
    ({"name": "taken"}, Code.ALREADY_EXISTS, ["'taken' already exists", f"primary {P}"]),
]


@pytest.mark.parametrize(("fields", "code", "fragments"), CREATE)
def test_validate_create_volume(fields: dict[str, Any], code: Code | None, fragments: list[str]) -> None:
    problem = validate_create_volume(
        cv(**fields),
        default_resync_mode=driver.RESYNC_MODE_DIRECT,
        registered=REG,
        existing={"taken": pair(name="taken")},
        coordinator_address="127.0.0.1:9",
    )
    if code is None:
        assert problem is None, problem
        return
    assert problem is not None and problem.code is code, problem
    for f in fragments:
        assert f in problem.message, problem.message


def test_plan_create_volume_persists_then_pushes_secondary_first() -> None:
    cmds = plan_create_volume(
        cv(auto_failover=True), default_resync_mode=driver.RESYNC_MODE_DIRECT, volume_uuid=UUID, generation=G0
    )
    assert shorts(cmds) == [("create", VOL), ("push", S), ("push", P)]
    create = cmds[0]
    assert isinstance(create, CreatePair)
    assert (create.spec.block_size, create.spec.resync_mode) == (4096, driver.RESYNC_MODE_DIRECT)
    assert (create.volume_uuid, create.generation, create.spec.auto_failover) == (UUID, G0, True)
    assert all(isinstance(c, PushAssignment) and c.create for c in cmds[1:])
    assert create.reason == (
        f"created: primary {P}, secondary {S}, {64 * MiB} bytes, block size 4096, resync mode RESYNC_MODE_DIRECT, "
        f"volume uuid {UUID}, generation {G0:016x}, auto-failover on"
    )
    rewrite = plan_create_volume(cv(resync_mode=1, block_size=512), default_resync_mode=2)[0]
    assert isinstance(rewrite, CreatePair) and rewrite.spec.block_size == 512
    assert "resync mode RESYNC_MODE_REWRITE," in rewrite.reason


@pytest.mark.parametrize(("still_ours", "want"), [(True, [("delete", VOL)]), (False, [])])
def test_on_push_failed(still_ours: bool, want: list[tuple[Any, ...]]) -> None:
    spec = driver.volume_spec(cv(), driver.RESYNC_MODE_DIRECT)
    cmds, problem = on_push_failed(spec, P, "RESOURCE_EXHAUSTED: disk full", still_ours=still_ours)
    assert shorts(cmds) == want
    assert problem.code is Code.UNAVAILABLE
    assert f"assigning it to the primary {P} failed (RESOURCE_EXHAUSTED: disk full)" in problem.message
    assert "not created" in problem.message


@pytest.mark.parametrize(
    ("address", "role_hint", "fragment"),
    [
        ("", "", "address is required"),
        ("localhost", "", "host:port"),
        ("host:", "", "host:port"),
        (":7000", "", "host:port"),
        ("h:70000", "", "host:port"),
        ("h:0", "", "host:port"),
        ("a b:1", "", "host:port"),
        ("127.0.0.1:1", "boss", "role_hint 'boss'"),
        ("127.0.0.1:1", "primary", None),
        ("127.0.0.1:1", "secondary", None),
        ("node-1.example:7001", "", None),
    ],
)
def test_validate_register(address: str, role_hint: str, fragment: str | None) -> None:
    problem = validate_register(address, role_hint)
    if fragment is None:
        assert problem is None
    else:
        assert problem is not None and problem.code is Code.INVALID_ARGUMENT and fragment in problem.message


@pytest.mark.parametrize(
    ("hb_s", "timeout_s", "mode", "fragment"),
    [
        (0.5, 3.0, 2, None),
        (0.5, 3.0, 1, None),
        (0.0, 3.0, 2, "must be > 0"),
        (0.5, -1.0, 2, "must be > 0"),
        (0.5, 0.5, 2, "must be larger than heartbeat_interval_s"),
        (0.5, 3.0, 0, "default_resync_mode 0"),
    ],
)
def test_validate_config(hb_s: float, timeout_s: float, mode: int, fragment: str | None) -> None:
    problem = validate_config(hb_s, timeout_s, mode)
    assert problem is None if fragment is None else (problem is not None and fragment in problem)


# ================================================================ failover (docs/FAILOVER.md)

from syncrep.core.driver import (  # noqa: E402
    Alert,
    LeaseGrant,
    SaveGenerations,
    lease_remaining_s,
    leases_for,
    on_identity,
    plan_promote,
)
from syncrep.core.pairstate import PairEvent  # noqa: E402

LEASE_POLICY = replace(POLICY, lease_s=4.0, lease_drift_s=0.5)
#: Both replicas in sync at G0.
SYNC_REPORTS = both(hb(S_.IN_SYNC, snap=0, identity=SID), sec())


def fo_decide(
    p: PairRecord,
    reports: dict[tuple[str, str], Report],
    heard: dict[str, float] | None = None,
    granted: dict[str, float] | None = None,
    healthy: dict[str, bool] | None = None,
    policy: Policy = LEASE_POLICY,
) -> list[Command]:
    return decide(
        [p],
        Liveness(dict(BOTH) if heard is None else heard, 0.0),
        reports,
        NOW,
        policy=policy,
        healthy=healthy,
        lease_granted_at=granted or {},
    )


def kinds(cmds: list[Command]) -> list[str]:
    out = []
    for c in cmds:
        if isinstance(c, ChangePair):
            out.append(c.event.value)
        elif isinstance(c, StartResync):
            out.append("start_full" if c.full_copy else "start")
        else:
            out.append(type(c).__name__)
    return out


# ---------------------------------------------------------------- leases


@pytest.mark.parametrize(
    ("granted", "started_at", "now", "want"),
    [
        ({VOL: 10.0}, 0.0, 12.0, 2.5),  # 10 + 4 + 0.5 - 12
        ({VOL: 10.0}, 0.0, 14.5, 0.0),  # certainly expired exactly now
        ({}, 50.0, 51.0, 3.5),  # no grant since the start: assume one at the start
        ({VOL: 10.0}, 50.0, 51.0, 3.5),  # a grant before the start counts from the start
    ],
)
def test_lease_remaining_counts_from_the_grant_or_the_start(
    granted: dict[str, float], started_at: float, now: float, want: float
) -> None:
    got = lease_remaining_s(VOL, granted, now, policy=LEASE_POLICY, started_at=started_at)
    assert got == pytest.approx(want)


def test_leases_granted_only_to_the_primary_with_data() -> None:
    p = pair(S_.DEGRADED, 3)
    assert leases_for(P, [p], {VOL: hb()}, policy=LEASE_POLICY) == [LeaseGrant(VOL, 3, 4.0, S_.DEGRADED, G1)]
    assert leases_for(S, [p], {VOL: sec()}, policy=LEASE_POLICY) == []  # the secondary: never
    assert leases_for(P, [p], {}, policy=LEASE_POLICY) == []  # does not report the volume
    assert leases_for(P, [p], {VOL: hb(data_missing=True, identity=None)}, policy=LEASE_POLICY) == []
    assert leases_for(P, [p], {VOL: hb(identity=Identity(UUID, 0))}, policy=LEASE_POLICY) == []
    assert leases_for(P, [p], {VOL: hb(identity=None)}, policy=LEASE_POLICY) == []  # identity unknown


def test_lease_carries_the_persisted_state() -> None:
    (grant,) = leases_for(P, [pair(S_.IN_SYNC)], {VOL: hb(identity=SID)}, policy=LEASE_POLICY)
    assert (grant.state, grant.generation) == (S_.IN_SYNC, G0)


def test_validate_config_refuses_nonpositive_leases() -> None:
    assert validate_config(0.5, 3.0, 2, lease_s=0.0) is not None
    assert "lease_drift_s" in (validate_config(0.5, 3.0, 2, lease_drift_s=-1.0) or "")
    assert validate_config(0.5, 3.0, 2, lease_s=1.0, lease_drift_s=0.1) is None


# ---------------------------------------------------------------- identities reported


@pytest.mark.parametrize(
    ("reporter", "report", "want"),
    [
        (P, hb(identity=Identity(UUID, G2, (G0,))), [SaveGenerations(VOL, generation=G2)]),
        (P, hb(), []),  # unchanged (the pair has G1)
        (P, hb(identity=Identity(UUID, 0)), []),  # a primary without data: nothing to record
        (S, sec(Identity(UUID, G1, (G0,))), [SaveGenerations(VOL, secondary_generation=G1)]),
        (S, sec(None, data_missing=True), [SaveGenerations(VOL, secondary_generation=0)]),
        (S, sec(Identity("other", G2)), []),  # another volume's store
        (S, sec(None), []),  # identity unknown
        ("10.0.0.9:7000", sec(Identity(UUID, G2)), []),  # not a node of the pair
    ],
)
def test_on_identity_persists_changed_generations(reporter: str, report: Report, want: list[Command]) -> None:
    assert on_identity(pair(), reporter, report) == want


# ---------------------------------------------------------------- Promote


def promote(
    p: PairRecord,
    reports: dict[tuple[str, str], Report] | None = None,
    heard: dict[str, float] | None = None,
    granted: dict[str, float] | None = None,
    force: bool = False,
) -> Problem | list[Command]:
    return plan_promote(
        p,
        Liveness({S: 99.9} if heard is None else heard, 0.0),
        SYNC_REPORTS if reports is None else reports,
        NOW,
        force=force,
        policy=LEASE_POLICY,
        lease_granted_at={VOL: 50.0} if granted is None else granted,
    )


PROMOTE_REFUSALS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "the primary's lease still runs": (
        dict(granted={VOL: 97.0}),
        [f"primary {P} may still be writing: its lease runs 1.5 s more; retry after that"],
    ),
    "no grant recorded since a start long ago: the lease has expired": (dict(granted={}), []),
    "the secondary is not alive": (dict(heard={}), [f"secondary {S} is not alive", "start it first"]),
    "the secondary has not reported the volume": (
        dict(reports={(P, VOL): hb(S_.IN_SYNC)}),
        [f"secondary {S} has not reported the volume yet"],
    ),
    "the secondary reports no data": (
        dict(reports=both(hb(S_.IN_SYNC), sec(None, data_missing=True, data_problem="no store folder"))),
        [f"secondary {S} has no data of the volume (no store folder)"],
    ),
    "the secondary's identity is unknown": (
        dict(reports=both(hb(S_.IN_SYNC), sec(None))),
        ["has not reported its data identity yet"],
    ),
    "the secondary holds an empty store": (
        dict(reports=both(hb(S_.IN_SYNC), sec(Identity(UUID, 0)))),
        ["holds no data of the pair yet", "full copy"],
    ),
}


@pytest.mark.parametrize("name", list(PROMOTE_REFUSALS))
def test_promote_refusals(name: str) -> None:
    kw, fragments = PROMOTE_REFUSALS[name]
    got = promote(pair(S_.IN_SYNC), **kw)
    if not fragments:
        assert isinstance(got, list)
        return
    assert isinstance(got, Problem) and got.code is Code.FAILED_PRECONDITION, got
    for f in fragments:
        assert f in got.message, got.message


def test_promote_degraded_refused_without_force_says_what_is_lost() -> None:
    reports = both(hb(out_of_sync_bytes=8192), sec())
    got = promote(pair(S_.DEGRADED), reports)
    assert isinstance(got, Problem) and got.code is Code.FAILED_PRECONDITION
    assert f"secondary {S} is not current" in got.message
    assert "1 failed extents (4196 bytes)" in got.message and "8192 bytes out of sync" in got.message
    assert "`--force` promotes it anyway" in got.message


def test_promote_mid_resync_refused_without_force_names_the_rollback_point() -> None:
    got = promote(pair(S_.RESYNCING, 2))
    assert (
        isinstance(got, Problem) and "pre-resync rollback point" in got.message and "--force" in got.message
    )


def test_promote_split_brain_refused_even_forced() -> None:
    got = promote(pair(S_.SPLIT_BRAIN, last_error="split brain: ..."), force=True)
    assert isinstance(got, Problem) and "syncrep resolve" in got.message


def test_promote_in_sync_swaps_roles_at_a_new_epoch_and_pushes_to_the_new_primary() -> None:
    cmds = promote(pair(S_.IN_SYNC, 4))
    assert isinstance(cmds, list)
    change, clear, push = cmds
    assert isinstance(change, ChangePair) and isinstance(clear, ClearBackoff)
    assert change.event is PairEvent.PROMOTED
    assert (change.from_state, change.to_state, change.epoch) == (S_.IN_SYNC, S_.DEGRADED, 5)
    assert (change.primary, change.secondary) == (S, P)
    assert (change.failed_extents, change.fault_snapshot_id) == ((), 0)
    assert (change.generation, change.secondary_generation) == (G0, G0)
    assert change.last_error == change.reason
    assert change.reason.startswith(f"promoted {S} to primary at epoch 5 (old primary {P}): operator request")
    assert "forced" not in change.reason
    assert push == PushAssignment(VOL, S)
    # In sync the old primary was never let write alone: it reverts to the
    # new primary's generation when demoted (no false split brain).
    assert change.revert_generation == G0


def test_promote_forced_degraded_names_no_generation_to_revert_to() -> None:
    """Forced promote of a stale secondary: the old primary may hold writes it
    acknowledged alone under its own generation; it must not be reverted."""
    cmds = promote(pair(S_.DEGRADED), both(hb(), sec()), force=True)
    assert isinstance(cmds, list) and isinstance(cmds[0], ChangePair)
    assert cmds[0].revert_generation == 0


def test_split_brain_not_detected_from_a_returning_old_primary_before_its_demotion() -> None:
    """Its first heartbeat still says primary at the old epoch, with the
    generation it minted alone (which its demotion may revert)."""
    reports = both(hb(identity=Identity(UUID, G1, (G0,))), sec(Identity(UUID, G2, (G0,)), role="primary"))
    assert "split_brain_detected" not in kinds(fo_decide(pair(S_.DEGRADED), reports, healthy={S: True}))


def test_promote_forced_degraded_records_what_was_lost() -> None:
    cmds = promote(pair(S_.DEGRADED), both(hb(), sec()), force=True)
    assert isinstance(cmds, list)
    change = cmds[0]
    assert isinstance(change, ChangePair) and change.to_state is S_.DEGRADED
    assert "(forced: the secondary was not current; lost: the writes in 1 failed extents (4196 bytes)" in (
        change.last_error or ""
    )


def test_promote_forced_mid_resync() -> None:
    cmds = promote(pair(S_.RESYNCING, 2), force=True)
    assert isinstance(cmds, list)
    change = cmds[0]
    assert isinstance(change, ChangePair) and change.from_state is S_.RESYNCING and change.epoch == 3
    assert "pre-resync rollback point" in change.reason


def test_promote_does_not_wait_for_the_lease_of_a_primary_without_data() -> None:
    reports = both(hb(S_.IN_SYNC, identity=None, data_missing=True, data_problem="empty data dir"), sec())
    cmds = promote(pair(S_.IN_SYNC), reports, heard={P: 99.9, S: 99.9}, granted={VOL: 99.9})
    assert isinstance(cmds, list) and kinds(cmds) == ["promoted", "ClearBackoff", "PushAssignment"]


def test_promote_alive_primary_with_data_waits_for_its_lease() -> None:
    got = promote(pair(S_.IN_SYNC), heard={P: 99.9, S: 99.9}, granted={VOL: 99.9})
    assert isinstance(got, Problem) and "lease runs 4.4 s more" in got.message


# ---------------------------------------------------------------- automatic promotion in the tick

SILENT_P = {P: 95.0, S: 99.9}  # the primary silent for 5 s (node_timeout_s = 3)


@pytest.mark.parametrize(
    ("p", "heard", "granted", "want"),
    [
        (
            pair(S_.IN_SYNC, auto_failover=True),
            SILENT_P,
            {VOL: 95.0},
            ["promoted", "ClearBackoff", "PushAssignment"],
        ),
        (pair(S_.IN_SYNC, auto_failover=True), SILENT_P, {VOL: 96.0}, []),  # lease runs 0.5 s more
        (pair(S_.IN_SYNC, auto_failover=False), SILENT_P, {VOL: 90.0}, []),  # not asked for
        (pair(S_.IN_SYNC, auto_failover=True), {P: 98.0, S: 99.9}, {VOL: 90.0}, []),  # primary alive
        (pair(S_.IN_SYNC, auto_failover=True), {P: 95.0, S: 90.0}, {VOL: 90.0}, []),  # secondary dead too
        (pair(S_.DEGRADED, auto_failover=True), SILENT_P, {VOL: 90.0}, []),  # not in sync: never
    ],
)
def test_auto_failover(
    p: PairRecord, heard: dict[str, float], granted: dict[str, float], want: list[str]
) -> None:
    cmds = fo_decide(p, SYNC_REPORTS, heard=heard, granted=granted)
    assert kinds(cmds) == want
    if want:
        change = cmds[0]
        assert isinstance(change, ChangePair) and "auto-failover: primary" in change.reason
        assert "its lease expired 0.5 s ago" in change.reason


def test_primary_without_data_in_sync_promotes_the_secondary_at_once() -> None:
    reports = both(hb(S_.IN_SYNC, identity=None, data_missing=True, data_problem="no store"), sec())
    cmds = fo_decide(pair(S_.IN_SYNC), reports, granted={VOL: 99.9})
    assert kinds(cmds) == ["promoted", "ClearBackoff", "PushAssignment"]
    change = cmds[0]
    assert isinstance(change, ChangePair) and (change.primary, change.secondary) == (S, P)
    assert f"primary {P} has no data of the pair (no store)" in change.reason


def test_primary_without_data_degraded_promotes_and_alerts_what_is_lost() -> None:
    reports = both(hb(identity=Identity(UUID, 0)), sec())
    cmds = fo_decide(pair(S_.DEGRADED), reports)
    assert kinds(cmds) == ["Alert", "promoted", "ClearBackoff", "PushAssignment"]
    alert = cmds[0]
    assert isinstance(alert, Alert) and "those writes are lost" in alert.message
    assert "4196 bytes" in alert.message


def test_primary_without_data_and_secondary_without_data_waits() -> None:
    reports = both(hb(identity=None, data_missing=True), sec(None, data_missing=True))
    assert [k for k in kinds(fo_decide(pair(S_.DEGRADED, full_copy_pending=True), reports))] == []


# ---------------------------------------------------------------- rebuilds, split brain, extra extents


def test_secondary_without_data_in_sync_goes_degraded_for_a_full_copy() -> None:
    reports = both(hb(S_.IN_SYNC, identity=SID), sec(None, data_missing=True, data_problem="empty data dir"))
    cmds = fo_decide(pair(S_.IN_SYNC), reports)
    assert kinds(cmds) == ["secondary_failed"]
    change = cmds[0]
    assert isinstance(change, ChangePair) and change.full_copy_pending is True
    assert change.reason == (
        f"secondary {S} has no data of the pair (empty data dir): rebuilding it by a full copy"
    )


def test_secondary_without_data_degraded_is_marked_for_a_full_copy_once() -> None:
    reports = both(hb(), sec(None, data_missing=True))
    first = fo_decide(pair(S_.DEGRADED), reports, healthy={S: True})
    assert kinds(first) == ["secondary_failed"]
    # Marked: it waits for the rebuild (no resync of a replica without a store).
    assert fo_decide(pair(S_.DEGRADED, full_copy_pending=True), reports, healthy={S: True}) == []


def test_rebuilt_secondary_gets_a_full_copy_with_the_failed_extents() -> None:
    reports = both(hb(), sec(Identity(UUID, 0)))
    cmds = fo_decide(pair(S_.DEGRADED, full_copy_pending=True), reports, healthy={S: True})
    assert kinds(cmds) == ["resync_started", "start_full"]
    start = cmds[1]
    assert isinstance(start, StartResync) and start.extra_extents == FAILED
    change = cmds[0]
    assert isinstance(change, ChangePair) and "a full copy (the secondary holds no data)" in change.reason


def test_resync_of_an_older_secondary_carries_the_failed_extents() -> None:
    cmds = fo_decide(pair(S_.DEGRADED), DEGRADED_HB, healthy={S: True})
    start = cmds[-1]
    assert isinstance(start, StartResync) and not start.full_copy and start.extra_extents == FAILED


@pytest.mark.parametrize(
    ("secondary", "why"),
    [
        (sec(None), "waiting for both replicas to report their data identity"),
        (sec(Identity(UUID, G2, (G0, G1))), "is newer than primary"),
        (sec(Identity(UUID, 0x99)), "share no generation"),
        (sec(SID, role="primary"), "still reports itself primary"),
    ],
)
def test_resync_waits_for_an_identity_that_makes_the_primary_a_source(secondary: Report, why: str) -> None:
    reports = both(hb(), secondary)
    assert fo_decide(pair(S_.DEGRADED), reports, healthy={S: True}) == []
    blocker = driver.resync_blocker(pair(S_.DEGRADED), Liveness(dict(BOTH), 0.0), reports, NOW, policy=POLICY)
    assert blocker is not None and why in blocker


def test_split_brain_detected_and_never_resynced() -> None:
    # The primary went degraded (G1); the secondary was promoted by force meanwhile (G2): both from G0.
    reports = both(hb(identity=Identity(UUID, G1, (G0,))), sec(Identity(UUID, G2, (G0,))))
    cmds = fo_decide(pair(S_.DEGRADED), reports, healthy={S: True})
    assert kinds(cmds) == ["split_brain_detected"]
    change = cmds[0]
    assert isinstance(change, ChangePair) and change.to_state is S_.SPLIT_BRAIN
    assert change.last_error == change.reason
    for f in (f"{G1:016x}", f"{G2:016x}", f"common generation {G0:016x}", "syncrep resolve"):
        assert f in change.reason
    # In split brain: nothing more, however often the tick runs.
    assert fo_decide(pair(S_.SPLIT_BRAIN), reports, healthy={S: True}) == []


def test_demoted_primary_divergent_extents_merge_into_the_failed_extents() -> None:
    reports = both(hb(), sec(divergent_extents=((8192, 4096), (MiB, 4096))))
    cmds = fo_decide(pair(S_.DEGRADED), reports, healthy={S: True})
    assert kinds(cmds) == ["secondary_failed"]
    change = cmds[0]
    assert isinstance(change, ChangePair) and change.to_state is S_.DEGRADED
    assert change.failed_extents == (Extent(4096, 8192), Extent(MiB, 4096))
    # Once merged, the resync starts and carries them.
    merged = pair(S_.DEGRADED, failed_extents=change.failed_extents)
    start = fo_decide(merged, reports, healthy={S: True})[-1]
    assert isinstance(start, StartResync) and start.extra_extents == change.failed_extents


def test_divergent_extents_beyond_the_volume_are_ignored() -> None:
    reports = both(hb(), sec(divergent_extents=((64 * MiB, 4096),)))
    assert kinds(fo_decide(pair(S_.DEGRADED), reports, healthy={S: True})) == ["resync_started", "start"]


def test_degraded_heartbeat_in_split_brain_changes_nothing() -> None:
    p = pair(S_.SPLIT_BRAIN, state_changed_at=0.0)
    assert on_heartbeat(p, P, hb(), wall_now=NOW, policy=POLICY, backoff=Backoff(), now=NOW) == []


def test_resync_done_clears_the_full_copy_mark() -> None:
    p = pair(S_.RESYNCING, 2, full_copy_pending=True)
    cmds = on_report(
        p,
        rr(pb.PAIR_STATE_IN_SYNC, 2),
        resync_started=True,
        secondary_alive=True,
        backoff=Backoff(),
        now=NOW,
        policy=POLICY,
    )
    assert isinstance(cmds, list)
    change = cmds[0]
    assert isinstance(change, ChangePair) and change.full_copy_pending is False


def test_promote_right_after_a_coordinator_restart_waits_for_a_lease_granted_before_it() -> None:
    got = plan_promote(
        pair(S_.IN_SYNC),
        Liveness({S: 99.9}, started_at=98.0),
        SYNC_REPORTS,
        NOW,
        force=False,
        policy=LEASE_POLICY,
        lease_granted_at={},
    )
    assert isinstance(got, Problem) and "its lease runs 2.5 s more" in got.message


# ---------------------------------------------------------------- Switchover (docs/FAILOVER.md section 5)

#: Both nodes report the pair in sync at the same generation (G0), at epoch 1.
SWITCH_REPORTS = both(hb(S_.IN_SYNC, snap=0, identity=SID, role="primary"), sec(SID))
HANDOVER = driver.Handover(address=P, epoch=1, acked_seq=333, identity=SID, drain_s=0.002)


def switch_refusal(
    p: PairRecord, reports: dict[tuple[str, str], Report] | None = None, heard: dict[str, float] | None = None
) -> Problem | None:
    return driver.switchover_refusal(
        p, Liveness(BOTH if heard is None else heard, 0.0), SWITCH_REPORTS if reports is None else reports,
        NOW, policy=POLICY,
    )


SWITCHOVER_REFUSALS: dict[str, tuple[PairRecord, dict[str, Any], list[str]]] = {
    "degraded: the secondary lacks writes": (
        pair(S_.DEGRADED), {}, ["is degraded at epoch 1, not in sync", "wait for the resync", "promote --force"],
    ),
    "resyncing": (pair(S_.RESYNCING, 2), {}, ["is resyncing at epoch 2", "wait for the resync to complete"]),
    "split brain": (pair(S_.SPLIT_BRAIN), {}, ["split_brain", "syncrep resolve"]),
    "the primary is silent": (
        pair(S_.IN_SYNC), dict(heard={S: 99.9}), [f"primary {P} is not alive", "`syncrep promote`"],
    ),
    "the secondary is silent": (
        pair(S_.IN_SYNC), dict(heard={P: 99.9}), [f"secondary {S} is not alive", "start it, then retry"],
    ),
    "the secondary has not reported the volume": (
        pair(S_.IN_SYNC), dict(reports={(P, VOL): SWITCH_REPORTS[(P, VOL)]}),
        [f"secondary {S} has not reported the volume yet"],
    ),
    "the secondary still applies an older assignment": (
        pair(S_.IN_SYNC, 2), dict(reports=both(hb(S_.IN_SYNC, 2, 0, identity=SID, role="primary"), sec(SID, 1))),
        [f"secondary {S} reports epoch 1", "pair is at epoch 2", "retry in a moment"],
    ),
    "the secondary has no data": (
        pair(S_.IN_SYNC), dict(reports=both(SWITCH_REPORTS[(P, VOL)], sec(None, data_missing=True,
                                                                          data_problem="no store folder"))),
        [f"secondary {S} reports no data of the pair (no store folder)"],
    ),
    "the primary reports degraded before the coordinator recorded it": (
        pair(S_.IN_SYNC), dict(reports=both(hb(S_.DEGRADED, identity=PID, role="primary", last_error="EIO"),
                                            sec(SID))),
        [f"primary {P} reports the pair degraded: EIO", "wait for the resync"],
    ),
    "the replicas report different generations": (
        pair(S_.IN_SYNC), dict(reports=both(hb(S_.IN_SYNC, snap=0, identity=PID, role="primary"), sec(SID))),
        [f"primary {P} holds generation {PID.short()}", f"secondary {S} {SID.short()}", "not the same data"],
    ),
}


@pytest.mark.parametrize("name", list(SWITCHOVER_REFUSALS))
def test_switchover_refusals_say_why_and_what_to_do(name: str) -> None:
    p, kw, fragments = SWITCHOVER_REFUSALS[name]
    got = switch_refusal(p, **kw)
    assert isinstance(got, Problem) and got.code is Code.FAILED_PRECONDITION, got
    for f in fragments:
        assert f in got.message, got.message
    # The same refusal after the handover: nothing is swapped.
    again = driver.plan_switchover(
        p, Liveness(kw.get("heard", BOTH), 0.0), kw.get("reports", SWITCH_REPORTS), NOW, HANDOVER, policy=POLICY
    )
    assert again == got


def test_switchover_allowed_in_sync_with_both_alive_at_one_generation() -> None:
    assert switch_refusal(pair(S_.IN_SYNC)) is None


def test_switchover_swaps_roles_at_a_new_epoch_in_sync_and_demotes_the_old_primary_first() -> None:
    cmds = driver.plan_switchover(pair(S_.IN_SYNC, 4), Liveness(BOTH, 0.0),
                                  both(hb(S_.IN_SYNC, 4, 0, identity=SID, role="primary"), sec(SID, 4)), NOW,
                                  replace(HANDOVER, epoch=4), policy=POLICY)
    assert isinstance(cmds, list)
    assert shorts(cmds) == [("change", "in_sync->in_sync", 5), ("clear",), ("push", P), ("push", S)]
    change = cmds[0]
    assert isinstance(change, ChangePair) and change.event is PairEvent.SWITCHED_OVER
    assert (change.primary, change.secondary) == (S, P)
    # No new generation, nothing failed: both have every write. The shared
    # generation is the revert point: if the old primary did not hand over
    # after all (the record committed, its answer lost), what it minted after
    # acknowledged nothing alone (simulator -c3 seeds 3029, 3051).
    assert (change.generation, change.secondary_generation, change.revert_generation) == (G0, G0, G0)
    assert (change.failed_extents, change.fault_snapshot_id, change.last_error) == ((), 0, "")
    assert f"switched over: {S} is primary at epoch 5, {P} secondary" in change.reason
    assert "drained up to seq 333" in change.reason


@pytest.mark.parametrize(
    ("handover", "fragment"),
    [
        (replace(HANDOVER, epoch=0), "moved on during the handover"),
        (replace(HANDOVER, address=S), "moved on during the handover"),
        (replace(HANDOVER, identity=PID), f"handed over at generation {PID.short()}"),
        (replace(HANDOVER, identity=None), "handed over at generation none"),
    ],
)
def test_switchover_abandoned_when_the_handover_does_not_match(handover: driver.Handover, fragment: str) -> None:
    got = driver.plan_switchover(pair(S_.IN_SYNC), Liveness(BOTH, 0.0), SWITCH_REPORTS, NOW, handover,
                                 policy=POLICY)
    assert isinstance(got, Problem) and got.code is Code.FAILED_PRECONDITION, got
    assert fragment in got.message and "nothing was swapped" in got.message, got.message


# The primary's side of the handover (syncrep/core/pair.py; here with the
# coordinator's switchover tables).
@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        (dict(), ""),
        (dict(closing=True), "shutting down"),
        (dict(degrading=True), "going degraded on the primary"),
        (dict(state=S_.DEGRADED), "is degraded on the primary"),
        (dict(resyncing=True), "resync running"),
        (dict(replicating=False), "no live replication stream"),
        (dict(acked_seq=7), "acknowledged writes up to seq 7, the primary sequenced up to 9"),
    ],
)
def test_handover_refusal(kw: dict[str, Any], fragment: str) -> None:
    from syncrep.core.pair import handover_refusal

    args: dict[str, Any] = dict(state=S_.IN_SYNC, closing=False, degrading=False, replicating=True,
                                resyncing=False, acked_seq=9, next_seq=10, volume=VOL)
    args.update(kw)
    state = args.pop("state")
    got = handover_refusal(state, **args)
    assert (fragment in got) if fragment else got == "", got


# ---------------------------------------------------------------- Resolve (docs/FAILOVER.md section 6)

#: Split brain: the primary (force-promoted) moved on to G2, the secondary (the
#: old primary, demoted) to G1; both from G0. The secondary's writes alone are
#: its divergent extents.
SB_PRIMARY = Identity(UUID, G2, (G0,))
SB_SECONDARY = Identity(UUID, G1, (G0,))
SB_DIVERGENT = ((8 * MiB, MiB), (32 * MiB, 4096))
SB_REPORTS = both(
    hb(S_.DEGRADED, 3, identity=SB_PRIMARY, role="primary", out_of_sync_bytes=3 * MiB),
    sec(SB_SECONDARY, 3, divergent_extents=SB_DIVERGENT),
)


def sb_pair(**kw: Any) -> PairRecord:
    kw.setdefault("last_error", "split brain: ...")
    return pair(S_.SPLIT_BRAIN, 3, generation=G2, secondary_generation=G1, **kw)


def resolve(p: PairRecord, keep: str, reports: dict[tuple[str, str], Report] | None = None,
            heard: dict[str, float] | None = None) -> Problem | driver.ResolvePlan:
    return driver.plan_resolve(p, Liveness(BOTH if heard is None else heard, 0.0),
                               SB_REPORTS if reports is None else reports, NOW, keep, policy=POLICY)


RESOLVE_REFUSALS: dict[str, tuple[PairRecord, str, dict[str, Any], Code, list[str]]] = {
    "not split-brained": (pair(S_.DEGRADED, 3), P, {}, Code.FAILED_PRECONDITION, ["is degraded at epoch 3",
                                                                                   "nothing to resolve"]),
    "keep names no node of the pair": (sb_pair(), "10.9.9.9:1", {}, Code.INVALID_ARGUMENT,
                                       ["neither of its nodes", P, S]),
    "the secondary is silent": (sb_pair(), P, {"heard": {P: NOW}}, Code.FAILED_PRECONDITION,
                                [f"secondary {S} is not alive", "needs both nodes"]),
    "the primary has not reported": (sb_pair(), S, {"reports": {(S, VOL): SB_REPORTS[(S, VOL)]}},
                                     Code.FAILED_PRECONDITION, [f"primary {P} has not reported data"]),
    "the secondary reports an older epoch": (
        sb_pair(), P, {"reports": both(SB_REPORTS[(P, VOL)], sec(SB_SECONDARY, 2))},
        Code.FAILED_PRECONDITION, [f"secondary {S} reports epoch 2", "not applied its assignment"]),
    "the identities no longer diverge": (
        sb_pair(), P, {"reports": both(SB_REPORTS[(P, VOL)], sec(SID, 3))},
        Code.FAILED_PRECONDITION, ["are not split-brained now (local_newer)"]),
}


@pytest.mark.parametrize("name", list(RESOLVE_REFUSALS))
def test_resolve_refusals_say_why_and_change_nothing(name: str) -> None:
    p, keep, kw, code, fragments = RESOLVE_REFUSALS[name]
    got = resolve(p, keep, **kw)
    assert isinstance(got, Problem) and got.code is code, got
    for f in fragments:
        assert f in got.message, got.message


def test_resolve_keeping_the_primary_reverts_the_secondary_and_resyncs_its_divergent_extents() -> None:
    got = resolve(sb_pair(), P)
    assert isinstance(got, driver.ResolvePlan)
    # Persist, then the discarded secondary first (its answer gives the exact extents), then the primary.
    assert shorts(got.commands) == [("change", "split_brain->degraded", 4), ("push", S), ("push", P)]
    change = got.commands[0]
    assert isinstance(change, ChangePair) and change.event is PairEvent.RESOLVED
    assert (change.primary, change.secondary) == (None, None)  # the roles stay
    assert change.revert_generation == G0 and change.secondary_generation == G0
    divergent = tuple(Extent(o, n) for o, n in SB_DIVERGENT)
    assert set(divergent) <= set(change.failed_extents or ()) and set(FAILED) <= set(change.failed_extents or ())
    assert (got.kept, got.discarded, got.common, got.exact, got.hold) == (P, S, G0, True, "")
    assert got.discarded_extents == divergent and got.kept_changed_bytes == 3 * MiB
    assert got.snapshot == driver.discard_snapshot_name(4, G1) == f"split-brain-discarded-e4-{G1:016x}"


def test_resolve_keeping_the_secondary_promotes_it_and_holds_it_until_the_old_primary_is_fenced() -> None:
    got = resolve(sb_pair(), S)
    assert isinstance(got, driver.ResolvePlan)
    assert shorts(got.commands) == [("change", "split_brain->degraded", 4), ("clear",), ("push", P), ("push", S)]
    change = got.commands[0]
    assert isinstance(change, ChangePair) and change.event is PairEvent.RESOLVED
    assert (change.primary, change.secondary) == (S, P)
    assert (change.generation, change.secondary_generation, change.revert_generation) == (G1, G0, G0)
    assert change.fault_snapshot_id == 0
    # The kept side's own writes since G0 are what the old primary lacks.
    assert set(Extent(o, n) for o, n in SB_DIVERGENT) <= set(change.failed_extents or ())
    assert (got.kept, got.discarded, got.primary, got.secondary, got.hold) == (S, P, S, P, S)
    # A primary may write until it is fenced: what it loses is known after.
    assert not got.exact and got.discarded_extents == () and got.discarded_bytes_estimate == 3 * MiB


def test_resolve_merge_adds_the_discarded_extents_once() -> None:
    p = pair(S_.DEGRADED, 4)
    cmds = driver.resolve_merge_discarded(p, [(16 * MiB, 8192)], "why", now=NOW, policy=POLICY)
    assert shorts(cmds) == [("change", "degraded->degraded", 4)]
    change = cmds[0]
    assert isinstance(change, ChangePair) and Extent(16 * MiB, 8192) in (change.failed_extents or ())
    merged = replace(p, failed_extents=change.failed_extents or ())
    assert driver.resolve_merge_discarded(merged, [(16 * MiB, 8192)], "why", now=NOW, policy=POLICY) == []
    # Out of range extents are ignored, not trusted.
    assert driver.resolve_merge_discarded(p, [(128 * MiB, 4096)], "why", now=NOW, policy=POLICY) == []


def test_split_brain_figures_from_the_reports() -> None:
    assert driver.split_brain_figures(sb_pair(), SB_REPORTS) == (3 * MiB, MiB + 4096, G0)
    assert driver.split_brain_figures(sb_pair(), both(SB_REPORTS[(P, VOL)], sec(SID, 3))) is None


def test_stale_in_sync_report_after_a_newer_generation_is_refused() -> None:
    """Simulator seed 1115: an in-sync report retried while the coordinator was away lands after the
    primary's later degraded report (which told the coordinator its new generation G2): it must not
    mark the pair in sync."""
    p = pair(S_.RESYNCING, 4, generation=G2)
    stale = rr(pb.PAIR_STATE_IN_SYNC, 4, identity=Identity(UUID, G1, (G0,)))
    got = driver.on_report(p, stale, resync_started=True, secondary_alive=True, backoff=Backoff(), now=NOW,
                           policy=POLICY)
    assert isinstance(got, Problem) and got.code is Code.FAILED_PRECONDITION, got
    assert "stale in-sync report" in got.message
    # The same report at the generation the coordinator knows (or a newer one) is taken.
    fresh = rr(pb.PAIR_STATE_IN_SYNC, 4, identity=Identity(UUID, G2, (G0, G1)))
    cmds = driver.on_report(p, fresh, resync_started=True, secondary_alive=True, backoff=Backoff(), now=NOW,
                            policy=POLICY)
    assert isinstance(cmds, list) and shorts(cmds)[0] == ("change", "resyncing->in_sync", 4)
