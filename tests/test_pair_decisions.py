"""The primary's pair decisions (syncrep/core/pair.py) as tables: given the
record and what happened, what the executor (primary/volume.py) must do."""

from __future__ import annotations

import pytest

from syncrep.blockstore.extents import Extent
from syncrep.core.pair import (
    PairRecord,
    decide_crash_recovery,
    decide_degrade,
    decide_promotion,
    decide_start_resync,
    decide_startup,
    is_full_copy,
    must_degrade_before_writing,
    repair_refusal,
    reply_refusal,
    resync_done,
    resync_failed,
    write_refusal,
)
from syncrep.core.pairstate import IllegalTransition, PairState

S, D, R = PairState.IN_SYNC, PairState.DEGRADED, PairState.RESYNCING
KIB = 1024


# (record, nacked, unacked, unrecorded) -> (state, failed extents, needs a fault snapshot)
DEGRADE = [
    ("first failure while in sync: snapshot, NACKed + unacked become failed extents",
     PairRecord(S), [(0, 4 * KIB)], [(8 * KIB, 4 * KIB)], [],
     D, [Extent(0, 4 * KIB), Extent(8 * KIB, 4 * KIB)], True),
    ("adjacent extents merge",
     PairRecord(S), [(0, 4 * KIB)], [(4 * KIB, 4 * KIB)], [], D, [Extent(0, 8 * KIB)], True),
    ("a second failure while degraded keeps the fault snapshot and adds to the extents",
     PairRecord(D, failed_extents=(Extent(0, 4 * KIB),), fault_snapshot_id=3), [], [(64 * KIB, 4 * KIB)], [],
     D, [Extent(0, 4 * KIB), Extent(64 * KIB, 4 * KIB)], False),
    ("a resync that fails goes back to degraded, same snapshot",
     PairRecord(R, failed_extents=(Extent(0, 4 * KIB),), fault_snapshot_id=3), [], [], [],
     D, [Extent(0, 4 * KIB)], False),
    ("extents an earlier degrade could not persist are carried into the next",
     PairRecord(S), [], [(0, 4 * KIB)], [Extent(1 << 20, 4 * KIB)],
     D, [Extent(0, 4 * KIB), Extent(1 << 20, 4 * KIB)], True),
]


@pytest.mark.parametrize(("name", "rec", "nacked", "unacked", "unrecorded", "state", "extents", "snap"),
                         DEGRADE, ids=[r[0] for r in DEGRADE])
def test_degrade(name: str, rec: PairRecord, nacked: list[tuple[int, int]], unacked: list[tuple[int, int]],
                 unrecorded: list[Extent], state: PairState, extents: list[Extent], snap: bool) -> None:
    d = decide_degrade(rec, nacked, unacked, "why", unrecorded)
    assert d.record.state is state
    assert list(d.record.failed_extents) == extents
    assert d.needs_snapshot is snap
    assert d.record.last_error == "why"
    assert d.record.fault_snapshot_id == rec.fault_snapshot_id  # filled in by the executor when new


@pytest.mark.parametrize(("state", "new_generation"), [(S, True), (D, False), (R, True)])
def test_leaving_in_sync_or_resyncing_starts_a_new_generation(state: PairState, new_generation: bool) -> None:
    """docs/FAILOVER.md §1: the primary starts a generation when it begins
    writing without its peer; degraded -> degraded and resyncing -> degraded
    stay in the generation begun when the pair left in sync."""
    rec = PairRecord(state, fault_snapshot_id=0 if state is S else 3)
    assert decide_degrade(rec, [], [(0, 4 * KIB)], "why").new_generation is new_generation


def test_crash_recovery_prefers_the_activity_log_then_a_common_snapshot_then_a_full_copy() -> None:
    al = [Extent(0, 4 << 20)]
    with_log = decide_crash_recovery(PairRecord(S, clean="0", al_regions=(0,)), al, [("common-1", 5)], 1 << 30)
    assert (with_log.extents, with_log.snapshot_cause, with_log.rollback_to) == (tuple(al), "al", "")
    assert not with_log.last_resort
    no_log = decide_crash_recovery(PairRecord(S, clean="0"), [], [("common-1", 5), ("common-2", 9)], 1 << 30)
    assert (no_log.extents, no_log.snapshot_cause, no_log.base_snapshot, no_log.rollback_to) == \
        ((), "", 9, "common-2")
    nothing = decide_crash_recovery(PairRecord(S, clean="0"), [], [], 1 << 30)
    assert nothing.extents == (Extent(0, 1 << 30),) and nothing.snapshot_cause == "full" and nothing.last_resort
    assert "LAST RESORT" in nothing.reason


# (state, current epoch, asked epoch, running, degrading) -> (refuse?, already?, cancel, new state)
START = [
    ("degraded: start at the new epoch", D, 3, 4, False, False, "", "", False, R),
    ("a stale epoch is refused", D, 5, 4, False, False, "stale resync request", "", False, None),
    ("in sync: nothing to resync", S, 3, 4, False, False, "is in sync", "", False, None),
    ("the same epoch while running: already", R, 4, 4, True, False, "", "already resyncing", False, None),
    ("a newer epoch while running: cancel and restart, still resyncing", R, 4, 5, True, False, "", "", True, R),
    ("still entering degraded: retry later", D, 3, 4, False, True, "still entering degraded", "", False, None),
    ("a restarted primary left in resyncing: resume at the new epoch", R, 3, 4, False, False, "", "", False, R),
]


@pytest.mark.parametrize(("name", "state", "cur", "epoch", "running", "degrading", "refuse", "already",
                          "cancel", "new"), START, ids=[r[0] for r in START])
def test_start_resync(name: str, state: PairState, cur: int, epoch: int, running: bool, degrading: bool,
                      refuse: str, already: str, cancel: bool, new: PairState | None) -> None:
    d = decide_start_resync(PairRecord(state), "v", cur, epoch, running, degrading)
    assert (refuse in d.refuse) if refuse else not d.refuse
    assert (already in d.already) if already else not d.already
    assert d.cancel_running is cancel
    if new is not None:
        assert d.state is new


MIB = 1 << 20
SIZE = 16 * MIB


# (record's failed extents, extra extents, full copy) -> (failed extents after, bytes added)
START_EXTRAS = [
    ("no extras: the record's extents as they are", [Extent(0, 4 * KIB)], [], False, [Extent(0, 4 * KIB)], 0),
    ("a demoted primary's divergent extents are unioned in",
     [Extent(0, 4 * KIB)], [Extent(MIB, 64 * KIB)], False, [Extent(0, 4 * KIB), Extent(MIB, 64 * KIB)], 64 * KIB),
    ("extras overlapping the record's extents add only what is new",
     [Extent(0, 8 * KIB)], [Extent(4 * KIB, 8 * KIB)], False, [Extent(0, 12 * KIB)], 4 * KIB),
    ("extras already covered add nothing (a retried StartResync)",
     [Extent(0, 8 * KIB)], [Extent(0, 4 * KIB)], False, [Extent(0, 8 * KIB)], 0),
    ("a full copy covers the whole volume", [Extent(0, 4 * KIB)], [], True, [Extent(0, SIZE)], SIZE - 4 * KIB),
    ("a full copy of a promoted primary with no failed extents", [], [], True, [Extent(0, SIZE)], SIZE),
]


@pytest.mark.parametrize(("name", "failed", "extra", "full", "after", "added"), START_EXTRAS,
                         ids=[r[0] for r in START_EXTRAS])
def test_start_resync_extras(name: str, failed: list[Extent], extra: list[Extent], full: bool,
                             after: list[Extent], added: int) -> None:
    d = decide_start_resync(PairRecord(D, failed_extents=tuple(failed), fault_snapshot_id=3), "v", 3, 4, False,
                            False, extra_extents=extra, full_copy=full, size_bytes=SIZE)
    assert not d.refuse and not d.already and d.state is R
    assert list(d.failed_extents) == after
    assert d.added_bytes == added
    assert bool(d.added) is (added > 0)
    if full:
        assert "full copy" in d.added
    assert is_full_copy(d.failed_extents, SIZE) is full


def test_start_resync_at_the_same_epoch_while_running_ignores_the_extras() -> None:
    """The request is a retry of the one that started the running resync: it stays as is."""
    d = decide_start_resync(PairRecord(R), "v", 4, 4, True, False, extra_extents=[Extent(0, 4 * KIB)],
                            full_copy=True, size_bytes=SIZE)
    assert d.already and not d.failed_extents and d.added_bytes == 0


def test_is_full_copy_only_for_the_whole_volume() -> None:
    assert is_full_copy([Extent(0, SIZE // 2), Extent(SIZE // 2, SIZE // 2)], SIZE)
    assert not is_full_copy([Extent(0, SIZE - 4 * KIB)], SIZE)
    assert not is_full_copy([Extent(4 * KIB, SIZE)], SIZE)
    assert not is_full_copy([], SIZE)


def test_a_promotion_record_is_degraded_from_the_promotion_point_and_replaces_any_old_record() -> None:
    p = decide_promotion(7, 42)
    assert p.record == PairRecord(D, failed_extents=(), fault_snapshot_id=42, last_error=p.reason, clean="0",
                                  rollback_to="", al_regions=())
    assert p.reason.startswith("promoted to primary at epoch 7")
    # Needs no crash recovery and no resync restart at the next start: it is plainly degraded.
    assert decide_startup(p.record) == decide_startup(PairRecord(D, clean="0"))
    # The next failure while promoted keeps the promotion's snapshot and starts no new generation.
    again = decide_degrade(p.record, [], [], "secondary unreachable")
    assert not again.needs_snapshot and not again.new_generation


def test_resync_done_clears_every_failure_field_and_marks_a_stream_open() -> None:
    rec = PairRecord(R, failed_extents=(Extent(0, 4096),), fault_snapshot_id=3, last_error="x",
                     rollback_to="common-1", clean="1", al_regions=(1,))
    done = resync_done(rec, [2, 3])
    assert done == PairRecord(S, clean="0", al_regions=(2, 3))
    with pytest.raises(IllegalTransition):
        resync_done(PairRecord(S), [])


def test_resync_failed_keeps_the_failure_information() -> None:
    rec = PairRecord(R, failed_extents=(Extent(0, 4096),), fault_snapshot_id=3)
    failed = resync_failed(rec, "stream broke")
    assert failed.state is D and failed.failed_extents == rec.failed_extents and failed.fault_snapshot_id == 3
    assert failed.last_error == "resync interrupted: stream broke"
    assert resync_failed(PairRecord(D), "x").state is D


@pytest.mark.parametrize(
    ("state", "closing", "block", "want"),
    [(S, False, False, ""), (D, False, False, ""), (D, False, True, "--on-secondary-failure block"),
     (S, False, True, ""), (S, True, False, "shutting down")],
)
def test_write_refusal(state: PairState, closing: bool, block: bool, want: str) -> None:
    got = write_refusal(state, closing, block, "v")
    assert (want in got) if want else got == ""


@pytest.mark.parametrize(
    ("rec", "crash", "interrupted"),
    [
        (PairRecord(S), False, False),  # a new volume
        (PairRecord(S, clean="1"), False, False),  # after a graceful stop
        (PairRecord(S, clean="0"), True, False),  # crashed while in sync: recover first
        (PairRecord(D, clean="0"), False, False),  # degraded: the failure information is on disk
        (PairRecord(R, clean="0"), False, True),  # the resync's process is gone
    ],
)
def test_startup(rec: PairRecord, crash: bool, interrupted: bool) -> None:
    d = decide_startup(rec)
    assert (d.crash_recovery, d.resync_interrupted) == (crash, interrupted)


def test_a_batch_without_a_stream_degrades_first_only_while_in_sync() -> None:
    assert must_degrade_before_writing(S)
    assert not must_degrade_before_writing(D) and not must_degrade_before_writing(R)


@pytest.mark.parametrize(
    ("block", "primary_only", "refused"),
    [(False, False, False), (False, True, False), (True, False, False), (True, True, True)],
)
def test_reply_refusal(block: bool, primary_only: bool, refused: bool) -> None:
    got = reply_refusal(block, primary_only, "v", "NACK")
    assert bool(got) is refused
    if refused:
        assert "--on-secondary-failure block" in got and "NACK" in got


@pytest.mark.parametrize(("state", "replicating", "refused"),
                         [(S, True, False), (S, False, True), (D, False, True), (R, True, True)])
def test_repair_refusal(state: PairState, replicating: bool, refused: bool) -> None:
    assert bool(repair_refusal(state, replicating, "v")) is refused
