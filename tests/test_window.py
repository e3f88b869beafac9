"""The replication window without sockets: ordering, cumulative acks, NACKs, timeouts, bounds."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncrep.core.window import ReplicationWindow


def win(writes: int = 4, nbytes: int = 1 << 20, timeout: float = 1.0) -> ReplicationWindow:
    return ReplicationWindow(window_writes=writes, window_bytes=nbytes, ack_timeout_s=timeout)


def test_cumulative_ack_completes_in_order() -> None:
    w = win()
    for seq in (1, 2, 3):
        w.send(seq, seq * 4096, 4096, now=0.0)
    assert w.ack(2) == [1, 2]
    assert [x.seq for x in w.unacked()] == [3]
    assert w.inflight_bytes == 4096
    assert w.ack(3) == [3]
    assert w.inflight_count == 0


def test_window_bounds_count_and_bytes() -> None:
    w = win(writes=2, nbytes=8192)
    assert w.has_room(1, 4096)
    w.send(1, 0, 4096, 0.0)
    assert w.has_room(1, 4096)
    assert not w.has_room(1, 8192)  # bytes bound
    w.send(2, 4096, 4096, 0.0)
    assert not w.has_room(1, 1)  # count bound
    w.ack(1)
    assert w.has_room(1, 4096)


def test_empty_window_admits_an_oversized_batch() -> None:
    # Otherwise a batch larger than window_bytes would wait forever.
    w = win(writes=1, nbytes=4096)
    assert w.has_room(10, 10 * 4096)


def test_nack_removes_exactly_one_write_and_records_failure_information() -> None:
    w = win()
    w.send(1, 0, 4096, 0.0)
    w.send(2, 4096, 8192, 0.0)
    info = w.nack(2, code=2, message="no space")
    assert (info.seq, info.offset, info.length, info.code) == (2, 4096, 8192, 2)
    assert [x.seq for x in w.unacked()] == [1]
    assert w.ack(2) == [1]  # cumulative ack past a NACKed seq completes only the others


def test_ack_timeout_measures_the_oldest_unacked_write() -> None:
    w = win(timeout=1.0)
    w.send(1, 0, 4096, now=10.0)
    w.send(2, 4096, 4096, now=10.9)
    assert not w.timed_out(10.99)
    assert w.timed_out(11.01)
    w.ack(1)
    assert not w.timed_out(11.5)  # now the oldest is seq 2, sent at 10.9


def test_fail_all_returns_every_unacked_write() -> None:
    w = win()
    for seq in (1, 2, 3):
        w.send(seq, seq * 4096, 4096, 0.0)
    w.ack(1)
    failed = w.fail_all()
    assert [x.seq for x in failed] == [2, 3]
    assert w.inflight_count == 0 and w.inflight_bytes == 0


def test_invariants_are_asserted() -> None:
    w = win()
    w.send(5, 0, 4096, 0.0)
    with pytest.raises(AssertionError, match="seqs must increase"):
        w.send(5, 0, 4096, 0.0)
    with pytest.raises(AssertionError, match="only seq 5 was sent"):
        w.ack(6)
    with pytest.raises(AssertionError, match="not in flight"):
        w.nack(4, 1, "x")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["send", "ack", "nack"]), st.integers(0, 5)), max_size=60))
def test_every_write_ends_exactly_once(ops: list[tuple[str, int]]) -> None:
    """Property: each sent write is acked, NACKed or still in flight — exactly one."""
    w = win(writes=1000)
    sent: list[int] = []
    acked: set[int] = set()
    nacked: set[int] = set()
    for op, k in ops:
        if op == "send":
            seq = (sent[-1] if sent else 0) + 1
            w.send(seq, 0, 512, 0.0)
            sent.append(seq)
        elif op == "ack" and sent:
            upto = sent[min(k, len(sent) - 1)]
            if upto >= w.acked_through_seq:
                acked.update(w.ack(upto))
        elif op == "nack":
            live = [x.seq for x in w.unacked()]
            if live:
                s = live[min(k, len(live) - 1)]
                w.nack(s, 1, "x")
                nacked.add(s)
    inflight = {x.seq for x in w.unacked()}
    assert acked.isdisjoint(nacked) and acked.isdisjoint(inflight) and nacked.isdisjoint(inflight)
    assert acked | nacked | inflight == set(sent)
    assert w.inflight_bytes == 512 * len(inflight)
