"""The primary's lease from the coordinator: may it acknowledge a write alone? Pure.

docs/FAILOVER.md section 2. A primary acknowledges a write its secondary does
not have (degraded, resyncing) only under a lease whose

* term has not run out: it runs ``lease_s`` from when the primary *sent* the
  request the grant answered (its own monotonic clock), so it ends on the
  primary no later than the coordinator's record of it says;
* pair state is not IN_SYNC: a grant made while the coordinator believed the
  pair in sync proves nothing about a degrade that began since (the
  coordinator could still promote the secondary without ``--force``);
* generation is the primary's current one: the coordinator has seen this
  primary's new generation, so it knows the secondary is behind.

No clocks and no I/O here: every method takes ``now`` (seconds on the
primary's monotonic clock). ``primary/volume.py`` feeds grants in
(``PrimaryVolume.on_lease``) and asks before acknowledging a write that is on
the primary only. Tables of cases: tests/test_lease.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from syncrep.core.pairstate import PairState

__all__ = ["Grant", "LeaseState"]


@dataclass(frozen=True)
class Grant:
    """One lease as granted. ``state`` None: the coordinator sent no (or an
    unknown) pair state; such a grant never permits writing alone."""

    epoch: int
    lease_s: float
    state: PairState | None
    generation: int
    sent_at: float

    @property
    def expires_at(self) -> float:
        return self.sent_at + max(0.0, self.lease_s)


class LeaseState:
    """The newest grant the primary holds (by ``sent_at``: replies may arrive
    out of order, and an older request's reply says less about now)."""

    def __init__(self) -> None:
        self._grant: Grant | None = None

    @property
    def current(self) -> Grant | None:
        return self._grant

    def grant(self, epoch: int, lease_s: float, state: PairState | None, generation: int,
              sent_at: float) -> bool:
        """Take a grant in. Returns False (and keeps the held grant) when it
        answers a request sent before the held grant's: it is stale. A newer
        grant replaces the held one even when it permits less (the coordinator
        changed its mind: a newer state, another generation, a shorter term)."""
        if self._grant is not None and sent_at < self._grant.sent_at:
            return False
        self._grant = Grant(epoch, lease_s, state, generation, sent_at)
        return True

    def remaining_s(self, now: float) -> float:
        """Seconds of the held lease left (0 when none or expired)."""
        if self._grant is None:
            return 0.0
        return max(0.0, self._grant.expires_at - now)

    def may_write_alone(self, now: float, generation: int) -> bool:
        """True when a write that is on the primary only may be acknowledged now."""
        return self.refusal(now, generation) == ""

    def refusal(self, now: float, generation: int) -> str:
        """Why the primary may not write alone now ("" = it may), for error messages."""
        g = self._grant
        if g is None:
            return "no lease has been granted since this write path started"
        if now >= g.expires_at:
            return f"the lease expired {now - g.expires_at:.1f} s ago"
        if g.state is None:
            return "the lease names no pair state"
        if g.state is PairState.IN_SYNC:
            return ("the lease was granted while the coordinator still saw the pair in sync "
                    "(it does not know yet that the secondary is behind)")
        if generation == 0 or g.generation != generation:
            return (f"the lease is for generation {g.generation:016x}, this primary is at "
                    f"{generation:016x} (the coordinator has not seen its new generation yet)")
        return ""
