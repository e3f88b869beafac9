"""The resync send window without sockets: ``syncrep.core.resync_window``.

Tables for each rule (resume, the count/byte/read-batch bounds, refusals and
the refusal limit, replies that break the protocol, progress), then a property:
a model of the secondary (``secondary/resync.py``: applies in index order, drops
what is not the next chunk, refuses a damaged one) fed by the window under
random interleavings of sends, group commits and replies -- every chunk ends
applied exactly once in index order, both digests agree, and the bounds hold.
Last, the round digest itself (``RoundDigest``): its exact records, and that a
chunk lost, duplicated, reordered, moved, cut short or changed (its crc32c)
changes it.
"""

from __future__ import annotations

import hashlib
import struct
from collections import deque

import google_crc32c
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from syncrep.core.resync_window import (
    Refusal,
    ResyncSendWindow,
    ResyncWindowError,
    RoundDigest,
    SendLimits,
)


def pieces_of(lengths: list[int], base: int = 0) -> list[tuple[int, int]]:
    out, off = [], base
    for n in lengths:
        out.append((off, n))
        off += n
    return out


def data_of(i: int, length: int, version: int = 0) -> bytes:
    return bytes((i * 7 + version * 13 + k) % 251 for k in range(length))


def limits(chunks: int = 100, nbytes: int = 1 << 20, batch: int = 100, refusals: int = 5) -> SendLimits:
    return SendLimits(window_chunks=chunks, window_bytes=nbytes, read_batch_chunks=batch,
                      max_refusals_per_chunk=refusals)


def crc_of(i: int, length: int, version: int = 0) -> int:
    return google_crc32c.value(data_of(i, length, version))


def send_one(w: ResyncSendWindow, i: int, version: int = 0) -> None:
    n = w.pieces[i][1]
    w.sent(i, n, crc_of(i, n, version))


def send(w: ResyncSendWindow, upto: int) -> None:
    """Send chunks [next, upto), whatever the bounds (the tables set the scene)."""
    for i in range(w.next_index, upto):
        send_one(w, i)


def digest_of(w: ResyncSendWindow, indices: range, version: int = 0) -> bytes:
    """The digest written out by hand: sha256 over the 28-byte records."""
    d = hashlib.sha256()
    for i in indices:
        off, n = w.pieces[i]
        d.update(struct.pack("<QQQI", i, off, n, crc_of(i, n, version)))
    return d.digest()


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize(
    ("lengths", "start", "applied", "progress", "batch", "done"),
    [
        ([100] * 5, 0, 0, 0, range(0, 5), False),
        ([100, 200, 300], 2, 2, 300, range(2, 3), False),  # resumed: chunks 0, 1 travel no more
        ([100, 200, 300], 3, 3, 600, range(3, 3), True),  # all applied before: only the trailer
        ([], 0, 0, 0, range(0, 0), True),  # an empty round
    ],
)
def test_resume_from_the_secondarys_start(lengths: list[int], start: int, applied: int, progress: int,
                                          batch: range, done: bool) -> None:
    w = ResyncSendWindow(pieces_of(lengths), start, limits())
    assert (w.applied, w.progress_bytes, w.next_batch(), w.done) == (applied, progress, batch, done)
    assert w.digest() == hashlib.sha256().digest()  # nothing applied in this stream yet


def test_start_beyond_the_round_is_refused() -> None:
    with pytest.raises(ResyncWindowError, match=r"^secondary claims 4 chunks applied of a 3-chunk round$"):
        ResyncSendWindow(pieces_of([100] * 3), 4, limits())


def test_a_resumed_round_digests_only_what_this_stream_applied() -> None:
    w = ResyncSendWindow(pieces_of([100] * 4), 2, limits())
    send(w, 4)
    assert w.on_applied(4) == range(2, 4)
    assert w.digest() == digest_of(w, range(2, 4))


# ---------------------------------------------------------------- bounds

# (name, piece lengths, limits, chunks sent first, applied_below, expected batch)
BOUNDS: list[tuple[str, list[int], SendLimits, int, int, range]] = [
    ("an empty window sends a read batch", [100] * 10, limits(batch=4), 0, 0, range(0, 4)),
    ("the read batch is cut by the count window", [100] * 10, limits(chunks=3, batch=8), 0, 0, range(0, 3)),
    ("full by count: wait for a reply", [100] * 10, limits(chunks=3), 3, 0, range(3, 3)),
    ("an applied chunk frees one slot", [100] * 10, limits(chunks=3), 3, 1, range(3, 4)),
    ("full by bytes: wait for a reply", [100] * 10, limits(nbytes=300), 3, 0, range(3, 3)),
    ("room below the byte bound admits one more chunk", [100] * 10, limits(nbytes=250), 2, 0, range(2, 3)),
    # A chunk is admitted while in-flight bytes are below the bound: the last
    # one of a batch may overshoot it (300 in flight of 250).
    ("the batch stops once the byte bound is reached", [100] * 10, limits(nbytes=250), 0, 0, range(0, 3)),
    ("a chunk larger than the byte window goes alone when nothing is in flight",
     [500, 10, 10], limits(nbytes=100), 0, 0, range(0, 1)),
    ("... and not while anything is in flight", [500, 10, 10], limits(nbytes=100), 1, 0, range(1, 1)),
    ("... the rest goes once it is applied", [500, 10, 10], limits(nbytes=100), 1, 1, range(1, 3)),
    ("a large chunk goes while in-flight bytes are below the bound", [10, 500], limits(nbytes=100), 1, 0, range(1, 2)),
    ("everything sent: nothing more", [100] * 3, limits(), 3, 1, range(3, 3)),
]


@pytest.mark.parametrize(("name", "lengths", "lim", "sent", "applied", "want"), BOUNDS, ids=[b[0] for b in BOUNDS])
def test_next_batch_bounds(name: str, lengths: list[int], lim: SendLimits, sent: int, applied: int,
                           want: range) -> None:
    w = ResyncSendWindow(pieces_of(lengths), 0, lim)
    send(w, sent)
    w.on_applied(applied)
    assert w.next_batch() == want


def test_in_flight_accounting() -> None:
    w = ResyncSendWindow(pieces_of([100, 200, 300]), 0, limits())
    send(w, 3)
    assert (w.inflight_chunks, w.inflight_bytes) == (3, 600)
    assert w.on_applied(2) == range(0, 2)
    assert (w.inflight_chunks, w.inflight_bytes) == (1, 300)


def test_zeros_sent_as_a_length_hold_no_window_bytes() -> None:
    """Chunks sent without a payload (zero chunks, issue 14) count 0 bytes in
    flight: a run of them is bounded by window_chunks alone, and the bytes
    come back exactly on apply and on refusal (no drift)."""
    w = ResyncSendWindow(pieces_of([100] * 10), 0, limits(chunks=6, nbytes=150, batch=2))
    for _ in range(3):  # batches of 2: the byte bound never closes the window
        batch = w.next_batch()
        assert len(batch) == 2, batch
        for i in batch:
            w.sent(i, 100, crc_of(i, 100), payload_bytes=0)
    assert (w.inflight_chunks, w.inflight_bytes) == (6, 0)
    assert not w.next_batch()  # window_chunks reached
    w.on_applied(2)
    w.sent(6, 100, crc_of(6, 100))  # a chunk with its payload
    assert w.inflight_bytes == 100
    w.on_refused(5, "bad")  # chunks 5 and 6 go back
    assert (w.inflight_chunks, w.inflight_bytes) == (3, 0)
    with pytest.raises(AssertionError):
        w.sent(5, 100, 0, payload_bytes=101)  # more payload than the chunk's length


def test_chunks_are_sent_in_order_only() -> None:
    w = ResyncSendWindow(pieces_of([100] * 3), 0, limits())
    with pytest.raises(AssertionError):
        send_one(w, 1)
    send(w, 3)
    with pytest.raises(AssertionError):
        w.sent(3, 1, 0)  # beyond the round


@pytest.mark.parametrize(
    "kwargs",
    [dict(chunks=0), dict(nbytes=0), dict(batch=0), dict(refusals=-1)],
)
def test_limits_are_checked(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        limits(**kwargs)


# ---------------------------------------------------------------- refusals


def test_a_refusal_goes_back_and_resends_from_the_refused_chunk() -> None:
    w = ResyncSendWindow(pieces_of([100] * 6), 0, limits())
    send(w, 5)
    # The secondary applied 0, 1, refused 2 (and drops 3, 4 after it).
    ev = w.on_reply(2, refused=True, refused_index=2, message="chunk 2 at offset 200: crc32c mismatch")
    assert ev.applied == range(0, 2)
    assert ev.refusal == Refusal(2, 1, "chunk 2 at offset 200: crc32c mismatch")
    assert (w.next_index, w.inflight_chunks, w.inflight_bytes) == (2, 0, 0)
    assert w.next_batch() == range(2, 6)
    for i in range(2, 6):
        send_one(w, i, version=1)  # read again: new data
    assert w.on_reply(6).applied == range(2, 6)
    assert w.done and w.progress_bytes == 600
    # Only applied chunks are in the digest, each once: not the refused send of 2.
    want = RoundDigest()
    for i in range(6):
        want.add(i, i * 100, 100, crc_of(i, 100, version=0 if i < 2 else 1))
    assert w.digest() == want.digest()


@pytest.mark.parametrize(("max_refusals", "aborts_at"), [(5, 6), (1, 2), (0, 1)])
def test_one_refusal_too_many_of_one_chunk_aborts(max_refusals: int, aborts_at: int) -> None:
    w = ResyncSendWindow(pieces_of([100] * 3), 0, limits(refusals=max_refusals))
    for k in range(1, aborts_at):
        send(w, 3)
        assert w.on_reply(1, True, 1, "bad").refusal == Refusal(1, k, "bad")
        assert w.refusals(1) == k
    send(w, 3)
    with pytest.raises(ResyncWindowError, match=rf"^chunk 1 refused {aborts_at} times: bad$"):
        w.on_refused(1, "bad")


def test_refusals_are_counted_per_chunk() -> None:
    w = ResyncSendWindow(pieces_of([100] * 3), 0, limits(refusals=1))
    send(w, 3)
    w.on_reply(0, True, 0, "bad")  # chunk 0: once
    send(w, 3)
    w.on_reply(1, True, 1, "bad")  # chunk 1: once; chunk 0 is applied
    send(w, 3)
    assert w.on_reply(3).applied == range(1, 3)
    assert w.done


# ---------------------------------------------------------------- protocol violations

# (name, chunks sent, applied_below before, the reply, error pattern)
VIOLATIONS: list[tuple[str, int, int, tuple[int, bool, int], str]] = [
    ("applied beyond what was sent", 3, 0, (4, False, 0),
     r"^secondary claims 4 chunks applied but only chunks below 3 were sent \(of a 5-chunk round\)$"),
    ("applied while nothing was sent", 0, 0, (1, False, 0), r"claims 1 chunks applied but only chunks below 0"),
    ("refused a chunk not sent yet", 3, 0, (0, True, 3), r"^secondary refused chunk 3, which is not in flight"),
    ("refused a chunk already applied", 3, 2, (2, True, 1),
     r"^secondary refused chunk 1, which is not in flight \(chunks 2 to 2 are\)$"),
]


@pytest.mark.parametrize(("name", "sent", "applied", "reply", "error"), VIOLATIONS, ids=[v[0] for v in VIOLATIONS])
def test_replies_that_break_the_protocol_are_refused(name: str, sent: int, applied: int,
                                                     reply: tuple[int, bool, int], error: str) -> None:
    w = ResyncSendWindow(pieces_of([100] * 5), 0, limits())
    send(w, sent)
    w.on_applied(applied)
    with pytest.raises(ResyncWindowError, match=error):
        w.on_reply(*reply, message="m")


def test_progress_is_monotone_and_a_stale_reply_changes_nothing() -> None:
    w = ResyncSendWindow(pieces_of([100, 200, 300, 400]), 1, limits())
    seen = [w.progress_bytes]
    send(w, 4)
    for below in (2, 2, 1, 3, 0, 4):  # stale and repeated replies among them
        w.on_applied(below)
        seen.append(w.progress_bytes)
    assert seen == [100, 300, 300, 300, 600, 600, 1000]
    assert w.done and w.progress_bytes == w.total_bytes


# ---------------------------------------------------------------- property


class SecondaryModel:
    """``secondary/resync.py`` ``_apply``, reduced: chunks are applied in
    index order; one that is not the next is dropped; a damaged next one is
    refused (the group ends there) and everything after it dropped until it
    comes again. Replies: ``applied_below`` after each group, then the refusal."""

    def __init__(self, start: int) -> None:
        self.expected = start
        self.applied: list[int] = []
        self.digest = RoundDigest()

    def take(self, wire: deque[tuple[int, int, bytes, int, bool]], k: int,
             replies: deque[tuple[int, bool, int, str]]) -> None:
        group: list[tuple[int, int, bytes, int]] = []
        refused: int | None = None
        for _ in range(k):
            index, offset, data, crc, damaged = wire.popleft()
            if index != self.expected + len(group):
                continue
            if damaged:
                data = bytes([data[0] ^ 0xFF]) + data[1:]  # RoundSender's fault injection
            if google_crc32c.value(data) != crc:  # check_chunk
                refused = index
                break
            group.append((index, offset, data, crc))
        for index, offset, data, crc in group:
            self.applied.append(index)
            self.digest.add(index, offset, len(data), crc)
        self.expected += len(group)
        if group:
            replies.append((self.expected, False, 0, ""))
        if refused is not None:
            replies.append((self.expected, True, refused, f"chunk {refused}: crc32c mismatch"))


@settings(max_examples=300, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 300), max_size=14),
    start_frac=st.floats(0, 1),
    wc=st.integers(1, 5),
    wb=st.integers(1, 700),
    rb=st.integers(1, 4),
    max_refusals=st.integers(0, 3),
    data=st.data(),
)
def test_every_chunk_is_applied_once_in_order_within_the_bounds(
    lengths: list[int], start_frac: float, wc: int, wb: int, rb: int, max_refusals: int, data: st.DataObject
) -> None:
    pieces = pieces_of(lengths, base=4096)
    n = len(pieces)
    start = int(start_frac * n)
    lim = SendLimits(wc, wb, rb, max_refusals)
    w = ResyncSendWindow(pieces, start, lim)
    sec = SecondaryModel(start)
    wire: deque[tuple[int, int, bytes, int, bool]] = deque()
    replies: deque[tuple[int, bool, int, str]] = deque()
    damaged_times: dict[int, int] = {}
    applied_seen: list[int] = []
    progress = [w.progress_bytes]
    sends = 0
    aborted: str | None = None

    for step in range(2000):
        batch = w.next_batch()
        choices = [c for c, ok in (("send", bool(batch)), ("secondary", bool(wire)), ("reply", bool(replies)))
                   if ok]
        if not choices:
            break
        free = step < 300  # then a fair, damage-free schedule drains everything
        choice = data.draw(st.sampled_from(choices)) if free else choices[-1]
        if choice == "send":
            assert len(batch) <= rb
            for i in batch:
                off, length = pieces[i]
                # Admitted only below the byte bound, or alone (however large).
                assert w.inflight_bytes < wb or w.inflight_chunks == 0
                sends += 1
                chunk = data_of(i, length, sends)
                crc = google_crc32c.value(chunk)
                w.sent(i, length, crc)
                assert w.inflight_chunks <= wc
                assert w.inflight_bytes < wb + length
                damaged = (free and damaged_times.get(i, 0) <= max_refusals
                           and data.draw(st.integers(0, 4)) == 0)
                if damaged:
                    damaged_times[i] = damaged_times.get(i, 0) + 1
                wire.append((i, off, chunk, crc, damaged))
        elif choice == "secondary":
            k = data.draw(st.integers(1, len(wire))) if free else len(wire)
            sec.take(wire, k, replies)
        else:
            below, refused, index, message = replies.popleft()
            try:
                ev = w.on_reply(below, refused, index, message)
            except ResyncWindowError as e:
                aborted = str(e)
                break
            applied_seen.extend(ev.applied)
            progress.append(w.progress_bytes)
        assert w.inflight_chunks == w.next_index - w.applied
    else:
        raise AssertionError("the round did not finish in 2000 steps")

    assert progress == sorted(progress), "progress went back"
    event("aborted" if aborted is not None else "completed")
    refusals = sum(w.refusals(i) for i in range(n))
    event(f"refusals: {refusals if refusals < 3 else '3+'}")
    if aborted is not None:
        # Only the refusal beyond the limit aborts, of the chunk refused that often.
        worst = max(damaged_times.values())
        assert worst == max_refusals + 1
        assert aborted.startswith(f"chunk {sec.expected} refused {max_refusals + 1} times: ")
        assert damaged_times[sec.expected] == max_refusals + 1
        return
    assert w.done and not replies
    assert applied_seen == sec.applied == list(range(start, n))
    assert w.digest() == sec.digest.digest()
    assert w.progress_bytes == sum(lengths)
    assert (w.inflight_chunks, w.inflight_bytes) == (0, 0)


# ---------------------------------------------------------------- the digest


def test_the_digest_is_sha256_over_28_byte_records_in_order() -> None:
    """The exact bytes both sides hash (the trailer's contract, protos/syncrep.proto)."""
    d = RoundDigest()
    d.add(3, 4096, 1 << 20, 0xDEADBEEF)
    d.add(4, 4096 + (1 << 20), 8192, 7)
    want = hashlib.sha256(struct.pack("<QQQI", 3, 4096, 1 << 20, 0xDEADBEEF)
                          + struct.pack("<QQQI", 4, 4096 + (1 << 20), 8192, 7)).digest()
    assert d.digest() == want
    assert RoundDigest().digest() == hashlib.sha256().digest()


# (name, the records as the secondary applied them) -- the primary's are
# RECORDS; each fault must change the digest.
RECORDS = [(i, 4096 * (i + 1), 4096, 1000 + i) for i in range(5)]


def with_chunk_2(rec: tuple[int, int, int, int]) -> list[tuple[int, int, int, int]]:
    return [*RECORDS[:2], rec, *RECORDS[3:]]


FAULTS: list[tuple[str, list[tuple[int, int, int, int]]]] = [
    ("a chunk lost", RECORDS[:2] + RECORDS[3:]),
    ("the last chunk lost", RECORDS[:-1]),
    ("a chunk duplicated", RECORDS[:3] + RECORDS[2:]),
    ("two chunks reordered", [RECORDS[0], RECORDS[2], RECORDS[1], *RECORDS[3:]]),
    ("a chunk applied at another offset", with_chunk_2((2, 0, 4096, 1002))),
    ("a chunk cut short", with_chunk_2((2, 4096 * 3, 2048, 1002))),
    ("a chunk with other data (another crc32c)", with_chunk_2((2, 4096 * 3, 4096, 999))),
    ("a chunk's index off by one", with_chunk_2((3, 4096 * 3, 4096, 1002))),
]


@pytest.mark.parametrize(("name", "applied"), FAULTS, ids=[f[0] for f in FAULTS])
def test_a_lost_duplicated_or_reordered_chunk_changes_the_digest(
        name: str, applied: list[tuple[int, int, int, int]]) -> None:
    sent, got = RoundDigest(), RoundDigest()
    for rec in RECORDS:
        sent.add(*rec)
    for rec in applied:
        got.add(*rec)
    assert got.digest() != sent.digest()
