"""The primary's pair record and the pair's decisions on it, pure.

The record: one value, persisted whole, in one transaction.

Why one record: the pair's durable state (state, failed extents, fault
snapshot, why, clean-stop flag, rollback point, activity log) used to be
written by nine ``meta_set`` calls, each with a different subset of keys. A
subset written from a stale in-memory view could overwrite a newer field
written just before it on the same I/O queue. Now every change is
``record.evolve(...)`` of the last record *submitted* for persistence, so each
write carries every earlier change, and the order of writes on the volume's
FIFO I/O thread is the order of changes. See docs/PAIR.md for the meaning of
each field. Pure: no I/O here; the executor (``primary/volume.py``) persists.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from syncrep.blockstore.extents import Extent, merge_extents
from syncrep.core.extents import derive_failed_extents
from syncrep.core.pairstate import PairEvent, PairState, transition
from syncrep.core.vocab import (
    META_AL,
    META_CLEAN,
    META_FAILED,
    META_FAULT_SNAP,
    META_LAST_ERROR,
    META_ROLLBACK_TO,
    META_STATE,
)

__all__ = [
    "CrashRecovery",
    "Degrade",
    "PairRecord",
    "Promotion",
    "StartResync",
    "Startup",
    "decide_crash_recovery",
    "decide_degrade",
    "decide_promotion",
    "decide_start_resync",
    "decide_startup",
    "handover_refusal",
    "is_full_copy",
    "must_degrade_before_writing",
    "repair_refusal",
    "reply_refusal",
    "resync_done",
    "resync_failed",
    "write_refusal",
]


@dataclass(frozen=True)
class PairRecord:
    state: PairState = PairState.IN_SYNC
    failed_extents: tuple[Extent, ...] = ()
    fault_snapshot_id: int = 0
    last_error: str = ""
    # "1" after a graceful stop, "0" while a stream may have writes in flight,
    # None before the first stream opened (a new volume).
    clean: str | None = None
    rollback_to: str = ""
    # Activity-log regions; None for a volume from before the log existed
    # (the crash recovery then falls back to a common snapshot or a full copy).
    al_regions: tuple[int, ...] | None = field(default=None)

    def evolve(self, **changes: Any) -> PairRecord:
        if "failed_extents" in changes:
            changes["failed_extents"] = tuple(changes["failed_extents"])
        if changes.get("al_regions") is not None:
            changes["al_regions"] = tuple(changes["al_regions"])
        return replace(self, **changes)

    @property
    def failed_bytes(self) -> int:
        return sum(e.length for e in self.failed_extents)

    # -- the on-disk form (keys of syncrep.core.vocab; values as the store keeps them)
    def to_meta(self) -> dict[str, str | None]:
        return {
            META_STATE: self.state.value,
            META_FAILED: json.dumps([[e.offset, e.length] for e in self.failed_extents]),
            META_FAULT_SNAP: str(self.fault_snapshot_id),
            META_LAST_ERROR: self.last_error,
            META_CLEAN: self.clean,
            META_ROLLBACK_TO: self.rollback_to,
            META_AL: None if self.al_regions is None else json.dumps(list(self.al_regions)),
        }

    @classmethod
    def from_meta(cls, get: Callable[[str], str | None]) -> PairRecord:
        al = get(META_AL)
        failed: Sequence[Sequence[int]] = json.loads(get(META_FAILED) or "[]")
        return cls(
            state=PairState(get(META_STATE) or PairState.IN_SYNC.value),
            failed_extents=tuple(Extent(o, n) for o, n in failed),
            fault_snapshot_id=int(get(META_FAULT_SNAP) or 0),
            last_error=get(META_LAST_ERROR) or "",
            clean=get(META_CLEAN),
            rollback_to=get(META_ROLLBACK_TO) or "",
            al_regions=None if al is None else tuple(json.loads(al)),
        )


# ---------------------------------------------------------------- decisions
# Pure functions of the record and what happened; ``primary/volume.py``
# carries their results out in a fixed order: snapshot, persist, then report,
# then reply. Tables of cases: tests/test_pair_decisions.py.


@dataclass(frozen=True)
class Degrade:
    """What going degraded changes: the record to persist (the fault snapshot id
    still to be filled in when ``needs_snapshot``) and the failure information."""

    record: PairRecord
    needs_snapshot: bool
    # The pair leaves IN_SYNC or RESYNCING: the primary starts writing without
    # its peer, so it starts a new generation (docs/FAILOVER.md section 1),
    # persisted with the degraded record. Resyncing too: the secondary adopts
    # the primary's identity when a final round completes, so writes alone
    # after a switch-back that failed must be under a generation it never had
    # (else a forced promote of it looks merely newer, and those writes are
    # overwritten with no split brain: simulator seed 3947). degraded ->
    # degraded stays in the generation begun when the pair left in sync.
    new_generation: bool = False


def decide_degrade(
    rec: PairRecord,
    nacked: Sequence[tuple[int, int]],
    unacked: Sequence[tuple[int, int]],
    reason: str,
    unrecorded: Sequence[Extent] = (),
) -> Degrade:
    """Method steps 1-2: the failed extents are the NACKed writes, the writes
    in flight without an ack, the extents already known, and any derived by an
    earlier degrade that could not be persisted (``unrecorded``). A fault
    snapshot exists once per fault: a second failure while degraded reuses it."""
    extents = derive_failed_extents(nacked, unacked, [*rec.failed_extents, *unrecorded])
    state = transition(rec.state, PairEvent.SECONDARY_FAILED)
    return Degrade(rec.evolve(state=state, failed_extents=extents, last_error=reason),
                   needs_snapshot=rec.fault_snapshot_id == 0,
                   new_generation=rec.state in (PairState.IN_SYNC, PairState.RESYNCING))


@dataclass(frozen=True)
class CrashRecovery:
    """After a crash while in sync: which extents may differ, and from where."""

    extents: tuple[Extent, ...]
    rollback_to: str  # a common snapshot both sides roll back to, or ""
    snapshot_cause: str  # "al" / "full": take a fault snapshot of that name; "" = use ``base_snapshot``
    base_snapshot: int
    reason: str
    last_resort: bool


def decide_crash_recovery(
    rec: PairRecord, al_extents: Sequence[Extent], commons: Sequence[tuple[str, int]], size_bytes: int,
) -> CrashRecovery:
    """The primary restarts after a crash while in sync (the record says in
    sync but not clean): writes in flight may be on one node only. In order of
    preference: the activity log's regions (exactly where that is possible);
    without a log (a volume from before it existed), the newest common snapshot
    with a rollback of the secondary; without one, a full copy, explicitly."""
    if rec.al_regions is not None:
        n = sum(e.length for e in al_extents)
        return CrashRecovery(tuple(al_extents), "", "al", 0,
                             f"primary restarted after a crash while in sync: the {len(al_extents)} regions of "
                             f"the activity log ({n} bytes) may differ and are resynced", False)
    if commons:
        name, snap_id = commons[-1]
        return CrashRecovery((), name, "", snap_id,
                             "primary restarted after a crash while in sync: in-flight writes unknown; resync "
                             f"from common snapshot {name!r} (id {snap_id}) with rollback of the secondary", False)
    return CrashRecovery((Extent(0, size_bytes),), "", "full", 0,
                         "primary restarted after a crash while in sync and no common snapshot exists "
                         "(enable --snapshot-period-s): LAST RESORT — full copy of the volume", True)


@dataclass(frozen=True)
class StartResync:
    """The answer to StartResync(epoch). ``refuse``: a FAILED_PRECONDITION with
    that message; ``already``: a no-op answer; else start at ``epoch`` with
    ``state`` (after cancelling a running resync when ``cancel_running``) and
    ``failed_extents`` (the record's, plus what the coordinator asked for).
    ``added_bytes`` > 0: the request added extents the record did not cover,
    so a persisted resync plan (made from the old extents) is dropped and the
    resync starts over from round 0, or the added extents would never travel."""

    refuse: str = ""
    already: str = ""
    cancel_running: bool = False
    state: PairState = PairState.RESYNCING
    failed_extents: tuple[Extent, ...] = ()
    added_bytes: int = 0
    added: str = ""  # for the log: what the request added, and why


def decide_start_resync(
    rec: PairRecord, volume: str, current_epoch: int, epoch: int, running: bool, degrading: bool, *,
    extra_extents: Sequence[Extent] = (), full_copy: bool = False, size_bytes: int = 0,
) -> StartResync:
    """``extra_extents``: extents the coordinator knows must be re-sent (a
    demoted primary's divergent writes); ``full_copy``: the secondary is empty,
    send the whole volume (``size_bytes``). Both are unioned into the failed
    extents before the plan is made. A resync already running at the same
    epoch stays as is (the request is a retry of the one that started it)."""
    if epoch < current_epoch:
        return StartResync(refuse=f"stale resync request for {volume!r}: epoch {epoch} < current epoch "
                                  f"{current_epoch}")
    if rec.state is PairState.IN_SYNC:
        return StartResync(refuse=f"volume {volume!r} is in sync; there is nothing to resync")
    if running and epoch == current_epoch:
        return StartResync(already=f"volume {volume!r} is already resyncing at epoch {epoch}")
    if degrading:
        return StartResync(refuse=f"volume {volume!r} is still entering degraded state; retry",
                           cancel_running=running)
    if full_copy and size_bytes <= 0:
        return StartResync(refuse=f"volume {volume!r}: a full copy needs the volume size (internal error)")
    # RESYNCING stays RESYNCING: a resync restarted at a newer epoch (the
    # running attempt is cancelled first) is the same resync, resumed.
    state = transition(rec.state, PairEvent.RESYNC_STARTED) if rec.state is PairState.DEGRADED else rec.state
    asked = [*extra_extents, *((Extent(0, size_bytes),) if full_copy else ())]
    extents = tuple(merge_extents([*rec.failed_extents, *asked]))
    added_bytes = sum(e.length for e in extents) - sum(e.length for e in merge_extents(rec.failed_extents))
    added = ""
    if added_bytes > 0:
        what = []
        if full_copy:
            what.append("a full copy (the secondary holds no data of the pair)")
        if extra_extents:
            what.append(f"{len(extra_extents)} extents from the coordinator (a demoted primary's divergent "
                        "writes)")
        added = f"{' and '.join(what)}: {added_bytes} bytes added to the failed extents"
    return StartResync(cancel_running=running, state=state, failed_extents=extents, added_bytes=added_bytes,
                       added=added)


def is_full_copy(failed_extents: Sequence[Extent], size_bytes: int) -> bool:
    """The resync sends the whole volume (a full copy was asked for, or a crash
    left no better information): the secondary may accept it whatever its
    identity (``ResyncHeader.full_copy``; syncrep/core/identity.py)."""
    merged = merge_extents(failed_extents)
    return size_bytes > 0 and len(merged) == 1 and merged[0].offset == 0 and merged[0].end >= size_bytes


@dataclass(frozen=True)
class Promotion:
    """The first record of a promoted primary (docs/FAILOVER.md section 3)."""

    record: PairRecord
    reason: str


def decide_promotion(epoch: int, fault_snapshot_id: int) -> Promotion:
    """A secondary promoted at ``epoch`` writes alone from the promotion point:
    degraded, the snapshot of that point is the fault-recovery snapshot (the
    resync sends the difference since it), no failed extents (nothing was in
    flight from this node), a stream may have writes in flight as soon as one
    opens ("0"), and an empty activity log. Whatever record this store held
    from an earlier life as primary is replaced whole."""
    reason = (f"promoted to primary at epoch {epoch}: writes are tracked from the promotion point "
              f"(fault snapshot {fault_snapshot_id}) and resynced to the new secondary")
    rec = PairRecord(state=PairState.DEGRADED, failed_extents=(), fault_snapshot_id=fault_snapshot_id,
                     last_error=reason, clean="0", rollback_to="", al_regions=())
    return Promotion(rec, reason)


def resync_done(rec: PairRecord, al_regions: Sequence[int]) -> PairRecord:
    """The final round is applied and replication is open at the new epoch:
    in sync, no failure information left, a stream may have writes in flight."""
    return rec.evolve(state=transition(rec.state, PairEvent.RESYNC_DONE), failed_extents=(), fault_snapshot_id=0,
                      rollback_to="", last_error="", clean="0", al_regions=al_regions)


def resync_failed(rec: PairRecord, reason: str) -> PairRecord:
    """A resync stopped before the end: degraded again (the plan stays, so the
    next resync resumes), and say why."""
    state = transition(rec.state, PairEvent.SECONDARY_FAILED) if rec.state is PairState.RESYNCING else rec.state
    return rec.evolve(state=state, last_error=f"resync interrupted: {reason}")


def write_refusal(state: PairState, closing: bool, block_when_degraded: bool, volume: str) -> str:
    """Why a client write is refused before it is queued ("" = accepted)."""
    if closing:
        return f"volume {volume!r} is shutting down"
    if block_when_degraded and state is not PairState.IN_SYNC:
        return (f"volume {volume!r} is {state.value} and the node runs with --on-secondary-failure block: "
                "writes are refused until the pair is back in sync")
    return ""


@dataclass(frozen=True)
class Startup:
    """What a primary does when its volume starts, from the record it finds."""

    crash_recovery: bool  # in sync but not clean: it crashed with writes possibly in flight
    resync_interrupted: bool  # the resync ran in a process that is gone


def decide_startup(rec: PairRecord) -> Startup:
    """``crash_recovery`` comes first (it turns the pair degraded); then the
    executor replicates if the pair is still in sync. A resync that was
    running when the process died is driven by nothing any more: the pair goes
    back to degraded and says so, so the coordinator starts a new resync, which
    resumes the persisted plan."""
    return Startup(crash_recovery=rec.state is PairState.IN_SYNC and rec.clean == "0",
                   resync_interrupted=rec.state is PairState.RESYNCING)


def must_degrade_before_writing(state: PairState) -> bool:
    """A batch finds no live replication stream. In sync, it must not land on
    the primary alone untracked: the fault is recorded first (degrade, fault
    snapshot), then the batch is written. Degraded or resyncing, the batch is
    tracked by the diff since the fault snapshot: write it locally."""
    return state is PairState.IN_SYNC


def reply_refusal(block_when_degraded: bool, on_primary_only: bool, volume: str, last_error: str) -> str:
    """Why a write that landed on the primary is answered with an error ("" =
    success). With --on-secondary-failure block, a write that is on the primary
    only is not acknowledged (the client chose availability of the copy)."""
    if block_when_degraded and on_primary_only:
        return (f"volume {volume!r}: the secondary failed ({last_error}); the write is on the primary only "
                "and the node runs with --on-secondary-failure block")
    return ""


def repair_refusal(state: PairState, replicating: bool, volume: str) -> str:
    """verify --repair re-sends extents over a live stream, in sync only."""
    if state is not PairState.IN_SYNC or not replicating:
        return f"volume {volume!r} is {state.value}; repair runs only in sync (a resync already covers the differences)"
    return ""


def handover_refusal(
    state: PairState,
    *,
    closing: bool,
    degrading: bool,
    replicating: bool,
    resyncing: bool,
    acked_seq: int,
    next_seq: int,
    volume: str,
) -> str:
    """Why this primary cannot hand over to its secondary ("" = it can): the
    gate is closed and the drain done, so every write sequenced (up to
    ``next_seq - 1``) must be acknowledged by the secondary (``acked_seq``)
    over a live stream, in sync (docs/FAILOVER.md section 5)."""
    if closing:
        return f"volume {volume!r} is shutting down on this node"
    if degrading or state is not PairState.IN_SYNC:
        return (f"volume {volume!r} is {'going degraded' if degrading else state.value} on the primary: the "
                "secondary may lack writes; wait for the resync, then retry")
    if resyncing:
        return f"volume {volume!r} has a resync running on the primary; wait for it to complete, then retry"
    if not replicating:
        return f"volume {volume!r} has no live replication stream to its secondary; retry once it is replicating"
    if acked_seq != next_seq - 1:
        return (f"volume {volume!r}: the secondary acknowledged writes up to seq {acked_seq}, the primary "
                f"sequenced up to {next_seq - 1}; the drain is incomplete, retry")
    return ""
