"""The secondary's resync decisions (syncrep/core/receiver.py) as tables: given
the persisted resync state and what happened, what the executor
(secondary/resync.py) must do. No sockets, no files."""

from __future__ import annotations

import json

import pytest

from syncrep.core.receiver import (
    Abort,
    Begin,
    ChunkVerdict,
    Header,
    Opening,
    ResyncState,
    Snapshot,
    check_chunk,
    check_trailer,
    chunk_in_range,
    chunk_refusal,
    decide_abort,
    decide_begin,
    decide_release,
    may_release,
)

VOL = "vol0"
BS = 4096
SIZE = 1 << 20


def hdr(resync_id: str = "r2", round: int = 1, kind: str = "diff", rollback: str = "", final: bool = False,
        epoch: int = 5) -> Header:
    return Header(resync_id, round, kind, 3, 7, final, epoch, rollback)


KEY = hdr().key  # "1:diff:3:7"
PRE1 = ("pre-resync-r1", 10)
PRE2 = ("pre-resync-r2", 12)
COMMON = ("common-1", 8)
LATER = ("common-2", 11)


# ---------------------------------------------------------------- the persisted form


def test_state_round_trips_and_keeps_its_format() -> None:
    st = ResyncState("r1", 10, {KEY: 4}, True, 6)
    raw = st.dump()
    assert json.loads(raw) == {"resync_id": "r1", "pre_snapshot_id": 10, "progress": {KEY: 4},
                               "complete": True, "epoch": 6}
    assert ResyncState.from_json(raw) == st
    assert ResyncState.from_json(None) == ResyncState() == ResyncState.from_json("")
    # States written before completion was persisted were in progress.
    old = ResyncState.from_json(json.dumps({"resync_id": "r1", "pre_snapshot_id": "10", "progress": {KEY: "2"}}))
    assert old == ResyncState("r1", 10, {KEY: 2}) and old.in_progress


def test_progress_and_completion_are_new_states() -> None:
    st = ResyncState("r1", 10, {"0:extents:0:5": 9})
    st2 = st.applied(KEY, 4)
    assert st2 is not None and st2.progress == {"0:extents:0:5": 9, KEY: 4}
    assert st.progress == {"0:extents:0:5": 9}  # the input is not changed
    assert st2.resume_at(KEY) == 4 and st2.resume_at("2:diff:7:9") == 0
    assert ResyncState().applied(KEY, 4) is None  # a repair persists nothing
    done = st2.completed(6)
    assert (done.complete, done.epoch, done.in_progress, done.progress) == (True, 6, False, st2.progress)


# ---------------------------------------------------------------- the header
# (state, header, snapshots) -> (opening, persisted state, resume, release first, rollback to,
#                                deleted, snapshot to take, kept, no rollback point)

IN_PROGRESS = ResyncState("r1", 10, {KEY: 4})
DONE = ResyncState("r1", 10, {KEY: 4}, True, 4)
BEGIN = [
    ("a repair: nothing to roll back to, nothing to resume, nothing persisted",
     IN_PROGRESS, hdr("r1", kind="repair"), [PRE1],
     Opening.REPAIR, ResyncState(), 0, False, None, (), "", False, False),
    ("first resync on a consistent node: take the rollback point",
     ResyncState(), hdr(), [COMMON],
     Opening.NEW, ResyncState("r2"), 0, False, None, (), "pre-resync-r2", False, False),
    ("first resync, its rollback point already taken by a begin that crashed before persisting",
     ResyncState(), hdr(), [COMMON, PRE2],
     Opening.NEW, ResyncState("r2", 12), 0, False, None, (), "", False, False),
    ("no resync in progress: stale rollback points (an abort that crashed) are released",
     ResyncState(), hdr(), [PRE1, ("pre-resync-old", 11)],
     Opening.NEW, ResyncState("r2"), 0, False, None, (PRE1, ("pre-resync-old", 11)), "pre-resync-r2", False, False),
    ("the same resync in progress: resume at its persisted chunk",
     IN_PROGRESS, hdr("r1"), [PRE1],
     Opening.RESUME, IN_PROGRESS, 4, False, None, (), "", False, False),
    ("the same resync, another round: resume at chunk 0",
     IN_PROGRESS, hdr("r1", round=2), [PRE1],
     Opening.RESUME, IN_PROGRESS, 0, False, None, (), "", False, False),
    ("the same resync in progress: a rollback to a common snapshot is not replayed",
     IN_PROGRESS, hdr("r1", rollback="common-1"), [COMMON, PRE1],
     Opening.RESUME, IN_PROGRESS, 4, False, None, (), "", False, False),
    ("an abandoned resync: its rollback point is kept for the new one",
     IN_PROGRESS, hdr(), [PRE1],
     Opening.NEW, ResyncState("r2", 10), 0, False, None, (), "", True, False),
    ("an abandoned resync whose rollback point is gone: no rollback point until it completes",
     IN_PROGRESS, hdr(), [COMMON],
     Opening.NEW, ResyncState("r2"), 0, False, None, (), "", False, True),
    ("an abandoned resync, a rollback to a common snapshot older than its rollback point: that one goes "
     "with the rollback, and the rolled-back data gets a new one",
     IN_PROGRESS, hdr(rollback="common-1"), [COMMON, PRE1, LATER],
     Opening.NEW, ResyncState("r2"), 0, False, COMMON, (), "pre-resync-r2", False, False),
    ("an abandoned resync, a rollback to a common snapshot newer than its rollback point: kept",
     IN_PROGRESS, hdr(rollback="common-2"), [PRE1, LATER],
     Opening.NEW, ResyncState("r2", 10), 0, False, LATER, (), "", True, False),
    ("an abandoned resync whose rollback point is gone, with a rollback: consistent again, take one",
     ResyncState("r1", 99, {}), hdr(rollback="common-1"), [COMMON],
     Opening.NEW, ResyncState("r2"), 0, False, COMMON, (), "pre-resync-r2", False, False),
    ("a rollback to a common snapshot on a consistent node",
     ResyncState(), hdr(rollback="common-1"), [COMMON],
     Opening.NEW, ResyncState("r2"), 0, False, COMMON, (), "pre-resync-r2", False, False),
    ("the previous resync completed: release its rollback point first, then take a new one",
     DONE, hdr(), [COMMON, PRE1],
     Opening.NEW, ResyncState("r2"), 0, True, None, (), "pre-resync-r2", False, False),
    ("the previous resync completed and released: a new rollback point",
     ResyncState("r1", 0, {KEY: 4}, True, 4), hdr(), [COMMON],
     Opening.NEW, ResyncState("r2"), 0, True, None, (), "pre-resync-r2", False, False),
    ("a completed resync resumed by the primary: reopened, rollback point kept",
     DONE, hdr("r1"), [PRE1],
     Opening.REOPEN, ResyncState("r1", 10, {KEY: 4}, False, 4), 4, False, None, (), "", True, False),
    ("a completed resync resumed after its rollback point was released: the current state becomes it",
     ResyncState("r1", 0, {KEY: 4}, True, 4), hdr("r1", round=2), [COMMON],
     Opening.REOPEN, ResyncState("r1", 0, {KEY: 4}, False, 4), 0, False, None, (), "pre-resync-r1", False, False),
    ("a completed resync reopened: a rollback to a common snapshot is not replayed over its rounds",
     DONE, hdr("r1", rollback="common-1"), [COMMON, PRE1],
     Opening.REOPEN, ResyncState("r1", 10, {KEY: 4}, False, 4), 4, False, None, (), "", True, False),
]


@pytest.mark.parametrize(
    ("name", "st", "h", "snaps", "opening", "state", "resume", "release_first", "rollback_to", "delete",
     "create", "kept", "no_point"),
    BEGIN, ids=[r[0] for r in BEGIN])
def test_begin(name: str, st: ResyncState, h: Header, snaps: list[Snapshot], opening: Opening,
               state: ResyncState, resume: int, release_first: bool, rollback_to: Snapshot | None,
               delete: tuple[Snapshot, ...], create: str, kept: bool, no_point: bool) -> None:
    d = decide_begin(st, h, VOL, snaps)
    assert d.opening is opening
    assert d.state == state
    assert (d.resume, d.release_first, d.rollback_to, d.delete, d.create_snapshot, d.kept, d.no_rollback_point) \
        == (resume, release_first, rollback_to, delete, create, kept, no_point)
    assert d.persist is (opening in (Opening.NEW, Opening.REOPEN))
    assert not d.refuse


REFUSE = [
    ("a rollback to a common snapshot this node does not have",
     ResyncState(), [PRE1], False),
    ("the same, after a completed resync: its rollback point is released before the refusal",
     DONE, [PRE1], True),
    ("a rollback point is not a common snapshot once released",
     DONE, [("common-9", 10)], True),
]


@pytest.mark.parametrize(("name", "st", "snaps", "release_first"), REFUSE, ids=[r[0] for r in REFUSE])
def test_begin_refuses(name: str, st: ResyncState, snaps: list[Snapshot], release_first: bool) -> None:
    d = decide_begin(st, hdr(rollback="common-9"), VOL, [s for s in snaps if s[0] != "common-9"])
    assert d == Begin(Opening.REFUSE, ResyncState() if release_first else st, release_first=release_first,
                      refuse="resync of 'vol0' needs a rollback to common snapshot 'common-9', which this node "
                             "does not have")


def test_begin_does_not_change_its_input() -> None:
    st = ResyncState("r1", 10, {KEY: 4}, True, 4)
    decide_begin(st, hdr("r1"), VOL, [PRE1])
    assert st == ResyncState("r1", 10, {KEY: 4}, True, 4)


# ---------------------------------------------------------------- chunks
# (index, offset, length, crc ok, expected) -> verdict

CHUNKS = [
    ("the expected chunk, good checksum, aligned, inside", 4, 0, BS, True, 4, ChunkVerdict.APPLY),
    ("the last block of the volume", 4, SIZE - BS, BS, True, 4, ChunkVerdict.APPLY),
    ("bad checksum", 4, 0, BS, False, 4, ChunkVerdict.REFUSE),
    ("empty", 4, 0, 0, True, 4, ChunkVerdict.REFUSE),
    ("unaligned offset", 4, 512, BS, True, 4, ChunkVerdict.REFUSE),
    ("unaligned length", 4, 0, BS + 512, True, 4, ChunkVerdict.REFUSE),
    ("past the end of the volume", 4, SIZE - BS, 2 * BS, True, 4, ChunkVerdict.REFUSE),
    ("after a refused one (not the expected index): dropped", 5, 0, BS, True, 4, ChunkVerdict.DROP),
    ("an old one, already applied: dropped", 3, 0, BS, True, 4, ChunkVerdict.DROP),
    ("not the expected index and corrupt: dropped, not refused", 6, 0, BS, False, 4, ChunkVerdict.DROP),
]


@pytest.mark.parametrize(("name", "index", "offset", "length", "crc_ok", "expected", "verdict"), CHUNKS,
                         ids=[r[0] for r in CHUNKS])
def test_chunk(name: str, index: int, offset: int, length: int, crc_ok: bool, expected: int,
               verdict: ChunkVerdict) -> None:
    crc = 0x1234
    assert check_chunk(index, offset, length, crc, crc if crc_ok else crc ^ 1, expected, BS, SIZE) is verdict


def test_chunk_range_and_refusal_message() -> None:
    assert chunk_in_range(0, SIZE, BS, SIZE) and not chunk_in_range(BS, SIZE, BS, SIZE)
    assert chunk_refusal(7, 8192) == "chunk 7 at offset 8192: crc32c mismatch"


# ---------------------------------------------------------------- trailer
# (header, announced, applied, digest ok) -> (refusal, finish)

TRAILERS = [
    ("a round that is not the last: complete, nothing persisted", hdr(), 9, 9, True, "", False),
    ("the final round: persist completion, then complete", hdr(final=True), 9, 9, True, "", True),
    ("a final repair: complete, nothing persisted", hdr("", kind="repair", final=True), 3, 3, True, "", False),
    ("an empty final round", hdr(final=True), 0, 0, True, "", True),
    ("fewer chunks applied than announced", hdr(final=True), 9, 8, True,
     "resync round 1 trailer mismatch: 9 chunks announced, 8 applied, digest ok", False),
    ("digest differs", hdr(round=3, final=True), 9, 9, False,
     "resync round 3 trailer mismatch: 9 chunks announced, 9 applied, digest differs", False),
    ("both", hdr(), 2, 5, False, "resync round 1 trailer mismatch: 2 chunks announced, 5 applied, digest differs",
     False),
]


@pytest.mark.parametrize(("name", "h", "announced", "applied", "digest_ok", "refuse", "finish"), TRAILERS,
                         ids=[r[0] for r in TRAILERS])
def test_trailer(name: str, h: Header, announced: int, applied: int, digest_ok: bool, refuse: str,
                 finish: bool) -> None:
    t = check_trailer(h, announced, applied, digest_ok)
    assert (t.refuse, t.finish) == (refuse, finish)


# ---------------------------------------------------------------- release
# (state, replication epoch) -> allowed, deleted, state persisted after

RELEASE = [
    ("a completed resync, at node start / next resync / abort (no epoch)",
     DONE, 0, True, (PRE1, PRE2), ResyncState("r1", 0, {KEY: 4}, True, 4)),
    ("a completed resync, replication stream at its epoch",
     DONE, 4, True, (PRE1, PRE2), ResyncState("r1", 0, {KEY: 4}, True, 4)),
    ("a completed resync, replication stream at a newer epoch",
     DONE, 9, True, (PRE1, PRE2), ResyncState("r1", 0, {KEY: 4}, True, 4)),
    ("a completed resync, replication stream at an older epoch: not yet",
     DONE, 3, False, None, None),
    ("an incomplete resync: never",
     IN_PROGRESS, 0, False, None, None),
    ("an incomplete resync, even with a replication stream at a newer epoch: never",
     IN_PROGRESS, 9, False, None, None),
    ("a completed resync already released: leftovers go, nothing to record",
     ResyncState("r1", 0, {KEY: 4}, True, 4), 0, True, (PRE1, PRE2), None),
    ("no resync record: leftovers go (no resync in progress means consistent data)",
     ResyncState(), 7, True, (PRE1, PRE2), None),
]


@pytest.mark.parametrize(("name", "st", "epoch", "allowed", "delete", "after"), RELEASE,
                         ids=[r[0] for r in RELEASE])
def test_release(name: str, st: ResyncState, epoch: int, allowed: bool, delete: tuple[Snapshot, ...] | None,
                 after: ResyncState | None) -> None:
    assert may_release(st, epoch) is allowed
    r = decide_release(st, [COMMON, PRE1, LATER, PRE2], epoch)
    if not allowed:
        assert r is None
        return
    assert r is not None and r.delete == delete and r.state == after


def test_release_with_nothing_left_to_delete_still_records_it() -> None:
    """A crash between deleting the snapshot and recording it: the next release
    deletes nothing and records it."""
    r = decide_release(DONE, [COMMON])
    assert r is not None and r.delete == () and r.state == ResyncState("r1", 0, {KEY: 4}, True, 4)


# ---------------------------------------------------------------- AbortResync
# (state, rollback, snapshots) -> decision, message

ABORT = [
    ("no resync", ResyncState(), True, [PRE1],
     Abort(VOL, ResyncState()), 0, (), "volume 'vol0' has no resync in progress"),
    ("complete: released, never rolled back", DONE, True, [PRE1],
     Abort(VOL, DONE, release=True), 0, ("pre-resync-r1",),
     "volume 'vol0' has no resync in progress (resync r1 is complete; released pre-resync-r1)"),
    ("complete, nothing left to release", DONE, False, [],
     Abort(VOL, DONE, release=True), 0, (), "volume 'vol0' has no resync in progress (resync r1 is complete)"),
    ("in progress, without rollback: fenced, left resumable", IN_PROGRESS, False, [PRE1],
     Abort(VOL, IN_PROGRESS, fence=True), 0, (), "resync r1 left resumable; pre-resync snapshot 10 kept"),
    ("in progress, with rollback: fenced, rolled back, forgotten, snapshot deleted", IN_PROGRESS, True, [PRE1],
     Abort(VOL, IN_PROGRESS, fence=True, rollback_to=10, forget=True, delete=10, rollback=True), 4096, (),
     "resync r1 abandoned; rolled back 4096 bytes to the pre-resync snapshot"),
    ("in progress, with rollback, rollback point gone: nothing rolled back, still forgotten", IN_PROGRESS, True,
     [COMMON],
     Abort(VOL, IN_PROGRESS, fence=True, rollback_to=0, forget=True, delete=10, rollback=True), 0, (),
     "resync r1 abandoned; rolled back 0 bytes to the pre-resync snapshot"),
]


@pytest.mark.parametrize(("name", "st", "rollback", "snaps", "abort", "n", "released", "message"), ABORT,
                         ids=[r[0] for r in ABORT])
def test_abort(name: str, st: ResyncState, rollback: bool, snaps: list[Snapshot], abort: Abort, n: int,
               released: tuple[str, ...], message: str) -> None:
    d = decide_abort(st, VOL, rollback, snaps)
    assert d == abort
    assert d.message(rolled_back=n, released=released) == message
