"""The primary's lease (syncrep/core/lease.py) as tables: which grants let a
primary acknowledge a write its secondary does not have (docs/FAILOVER.md §2)."""

from __future__ import annotations

import pytest

from syncrep.core.lease import LeaseState
from syncrep.core.pairstate import PairState

S, D, R = PairState.IN_SYNC, PairState.DEGRADED, PairState.RESYNCING
GEN, OTHER = 0x1234, 0x9999

# (grant: state, generation, lease_s, sent_at) or None, now, primary's generation -> may write alone, why not
CASES = [
    ("no grant yet: may not write alone", None, 1.0, GEN, False, "no lease"),
    ("a degraded lease for this generation, within its term", (D, GEN, 5.0, 10.0), 12.0, GEN, True, ""),
    ("a resyncing lease permits like a degraded one", (R, GEN, 5.0, 10.0), 14.9, GEN, True, ""),
    ("the term counts from when the request was sent: expired at sent_at + lease_s",
     (D, GEN, 5.0, 10.0), 15.0, GEN, False, "expired"),
    ("long expired", (D, GEN, 5.0, 10.0), 20.0, GEN, False, "expired 5.0 s ago"),
    ("a lease granted while the coordinator saw the pair in sync proves nothing about a degrade",
     (S, GEN, 5.0, 10.0), 11.0, GEN, False, "in sync"),
    ("a lease for another generation (the coordinator has not seen the new one)",
     (D, OTHER, 5.0, 10.0), 11.0, GEN, False, "generation"),
    ("a primary without a generation never writes alone", (D, 0, 5.0, 10.0), 11.0, 0, False, "generation"),
    ("no pair state in the grant", (None, GEN, 5.0, 10.0), 11.0, GEN, False, "no pair state"),
    ("a zero-length lease is no lease", (D, GEN, 0.0, 10.0), 10.0, GEN, False, "expired"),
    ("a negative lease_s counts as zero", (D, GEN, -3.0, 10.0), 10.0, GEN, False, "expired"),
]


@pytest.mark.parametrize(("name", "grant", "now", "gen", "may", "why"), CASES, ids=[c[0] for c in CASES])
def test_may_write_alone(name: str, grant: tuple[PairState | None, int, float, float] | None, now: float,
                         gen: int, may: bool, why: str) -> None:
    lease = LeaseState()
    if grant is not None:
        state, generation, lease_s, sent_at = grant
        assert lease.grant(7, lease_s, state, generation, sent_at)
    assert lease.may_write_alone(now, gen) is may
    refusal = lease.refusal(now, gen)
    assert (why in refusal) if why else refusal == ""


def test_remaining_s_counts_down_from_the_send_time_and_stops_at_zero() -> None:
    lease = LeaseState()
    assert lease.remaining_s(0.0) == 0.0
    lease.grant(1, 4.0, D, GEN, 100.0)
    assert lease.remaining_s(101.0) == pytest.approx(3.0)
    assert lease.remaining_s(104.0) == 0.0 and lease.remaining_s(500.0) == 0.0
    # An in-sync lease still has a term (reported), it only does not permit writing alone.
    lease.grant(1, 4.0, S, GEN, 105.0)
    assert lease.remaining_s(106.0) == pytest.approx(3.0) and not lease.may_write_alone(106.0, GEN)


def test_a_stale_grant_does_not_replace_a_newer_one() -> None:
    """Replies arrive out of order: the reply to an older request (sent first)
    says less about now and must not replace the newer grant, in either direction."""
    lease = LeaseState()
    assert lease.grant(1, 5.0, D, GEN, 20.0)
    assert not lease.grant(1, 5.0, S, GEN, 19.0)  # older in-sync grant: would revoke wrongly
    assert lease.may_write_alone(21.0, GEN)
    assert lease.current is not None and lease.current.sent_at == 20.0
    fresh = LeaseState()
    assert fresh.grant(1, 5.0, S, GEN, 20.0)
    assert not fresh.grant(1, 50.0, D, GEN, 10.0)  # older permitting grant: would extend wrongly
    assert not fresh.may_write_alone(21.0, GEN)


def test_a_newer_grant_replaces_the_held_one_even_when_it_permits_less() -> None:
    lease = LeaseState()
    lease.grant(1, 5.0, D, GEN, 10.0)
    assert lease.may_write_alone(11.0, GEN)
    lease.grant(2, 5.0, D, OTHER, 11.0)  # the coordinator now knows another generation (a promotion)
    assert not lease.may_write_alone(12.0, GEN)
    lease.grant(2, 5.0, D, GEN, 12.0)
    assert lease.may_write_alone(12.5, GEN)
    lease.grant(2, 5.0, D, GEN, 12.0)  # the same send time again: taken (two replies to one request)
    assert lease.may_write_alone(16.9, GEN) and not lease.may_write_alone(17.0, GEN)
