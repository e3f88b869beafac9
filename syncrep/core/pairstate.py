"""The volume-pair state machine (pure: no I/O, no dependencies beyond the stdlib).

In the style of h11: a small set of states, a small set of events, ONE table
``(state, event) -> state`` and a ``transition`` function that refuses anything
the table does not list. The coordinator owns the authoritative pair state; the
primary node imports this same module for its own view of the pair.

::

    in_sync   --SECONDARY_FAILED--> degraded
    resyncing --SECONDARY_FAILED--> degraded
    degraded  --SECONDARY_FAILED--> degraded   (more failure information)
    degraded  --RESYNC_STARTED----> resyncing
    resyncing --RESYNC_FAILED-----> degraded
    resyncing --RESYNC_DONE-------> in_sync
    degraded  --RESYNC_DONE-------> in_sync    (see below)
    in_sync   --PROMOTED----------> degraded   (the new primary writes alone)
    in_sync   --SWITCHED_OVER-----> in_sync    (a planned swap: both have every write)
    degraded  --PROMOTED----------> degraded   (forced: the secondary was not current)
    resyncing --PROMOTED----------> degraded   (forced: its pre-resync rollback point)
    degraded  --SPLIT_BRAIN_DETECTED--> split_brain
    resyncing --SPLIT_BRAIN_DETECTED--> split_brain
    split_brain --RESOLVED--------> degraded   (``syncrep resolve``: one side's
                                                data kept, the other's discarded)

A promotion swaps the roles: "degraded" then describes the new primary,
which writes without its peer (the old primary, down or rebuilt).
``split_brain``: both replicas wrote without each other since a common
generation (only after a forced promotion); nothing is resynced automatically.

The status-only state ``PAIR_STATE_PRIMARY_LOST`` (proto value 4: the primary
is silent, nobody serves the volume) is never persisted and never a
``PairState``; ``status_proto`` gives the value to show.

``degraded --RESYNC_DONE--> in_sync`` exists because "degraded" can be an
inference of the coordinator alone (the secondary stopped heartbeating to the
coordinator, or a StartResync call timed out although the primary got it)
while the primary keeps resyncing over its own link and then finishes. The
coordinator guards this edge by the epoch: it accepts it only for a resync it
started at the pair's current epoch.

The proto enum values are written out here (they are part of the wire
contract and never change) so that this module imports nothing from the
generated code; ``tests/test_pairstate.py`` checks them against ``syncrep_pb2``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

__all__ = [
    "PROTO_PAIR_STATE_PRIMARY_LOST",
    "TRANSITIONS",
    "IllegalTransition",
    "PairEvent",
    "PairState",
    "is_legal",
    "status_proto",
    "transition",
]


class PairState(StrEnum):
    """The state of a volume pair. The values are the strings stored and logged."""

    IN_SYNC = "in_sync"
    DEGRADED = "degraded"
    RESYNCING = "resyncing"
    SPLIT_BRAIN = "split_brain"

    def to_proto(self) -> int:
        """The ``syncrep.v1.PairState`` enum value of this state."""
        return _TO_PROTO[self]

    @classmethod
    def from_proto(cls, value: int) -> PairState:
        """The state of a ``syncrep.v1.PairState`` enum value.

        Raises ValueError for PAIR_STATE_UNSPECIFIED (0) and unknown values.
        """
        try:
            return _FROM_PROTO[int(value)]
        except KeyError:
            raise ValueError(
                f"pair state {value} is not one of PAIR_STATE_IN_SYNC (1), "
                "PAIR_STATE_DEGRADED (2), PAIR_STATE_RESYNCING (3), PAIR_STATE_SPLIT_BRAIN (5) "
                "(PAIR_STATE_PRIMARY_LOST (4) is shown by status only, never a pair's state)"
            ) from None


class PairEvent(StrEnum):
    """What happens to a pair."""

    # The secondary failed (NACK, ack timeout, crash, stopped heartbeating) or
    # a resync in progress failed on the primary's side.
    SECONDARY_FAILED = "secondary_failed"
    # The coordinator issued a new epoch and asked the primary to resync.
    RESYNC_STARTED = "resync_started"
    # Starting the resync failed (StartResync refused or unreachable).
    RESYNC_FAILED = "resync_failed"
    # The primary reports the pair back in sync.
    RESYNC_DONE = "resync_done"
    # The secondary was promoted (roles swapped, new epoch): the new primary
    # writes alone until its peer is resynced.
    PROMOTED = "promoted"
    # A planned role swap (switchover): the old primary drained and handed
    # over; both replicas hold every write at the same generation, so the
    # pair stays in sync at the new epoch with the roles swapped.
    SWITCHED_OVER = "switched_over"
    # Both replicas moved on from a common generation: no automatic resync.
    SPLIT_BRAIN_DETECTED = "split_brain_detected"
    # An operator picked the surviving replica (``syncrep resolve``): the other
    # reverts to the common generation (its writes since then kept in a
    # snapshot there) and is resynced from the kept one.
    RESOLVED = "resolved"


# syncrep.v1.PairState values (protos/syncrep.proto).
PROTO_PAIR_STATE_UNSPECIFIED: Final = 0
_TO_PROTO: Final[dict[PairState, int]] = {
    PairState.IN_SYNC: 1,
    PairState.DEGRADED: 2,
    PairState.RESYNCING: 3,
    PairState.SPLIT_BRAIN: 5,
}
#: Status only: the primary is silent (never persisted, never a PairState).
PROTO_PAIR_STATE_PRIMARY_LOST: Final = 4
_FROM_PROTO: Final[dict[int, PairState]] = {v: k for k, v in _TO_PROTO.items()}


# THE transition table. Anything not listed is illegal.
TRANSITIONS: Final[dict[tuple[PairState, PairEvent], PairState]] = {
    (PairState.IN_SYNC, PairEvent.SECONDARY_FAILED): PairState.DEGRADED,
    (PairState.RESYNCING, PairEvent.SECONDARY_FAILED): PairState.DEGRADED,
    (PairState.DEGRADED, PairEvent.SECONDARY_FAILED): PairState.DEGRADED,
    (PairState.DEGRADED, PairEvent.RESYNC_STARTED): PairState.RESYNCING,
    (PairState.RESYNCING, PairEvent.RESYNC_FAILED): PairState.DEGRADED,
    (PairState.RESYNCING, PairEvent.RESYNC_DONE): PairState.IN_SYNC,
    (PairState.DEGRADED, PairEvent.RESYNC_DONE): PairState.IN_SYNC,
    (PairState.IN_SYNC, PairEvent.PROMOTED): PairState.DEGRADED,
    (PairState.IN_SYNC, PairEvent.SWITCHED_OVER): PairState.IN_SYNC,
    (PairState.DEGRADED, PairEvent.PROMOTED): PairState.DEGRADED,
    (PairState.RESYNCING, PairEvent.PROMOTED): PairState.DEGRADED,
    (PairState.DEGRADED, PairEvent.SPLIT_BRAIN_DETECTED): PairState.SPLIT_BRAIN,
    (PairState.RESYNCING, PairEvent.SPLIT_BRAIN_DETECTED): PairState.SPLIT_BRAIN,
    (PairState.SPLIT_BRAIN, PairEvent.RESOLVED): PairState.DEGRADED,
}


class IllegalTransition(Exception):
    """An event that the transition table does not allow in the current state."""

    def __init__(self, state: PairState, event: PairEvent) -> None:
        self.state = state
        self.event = event
        allowed = sorted(e.value for (s, e) in TRANSITIONS if s == state)
        super().__init__(
            f"illegal pair transition: event {event.value} in state {state.value} "
            f"(allowed in {state.value}: {', '.join(allowed) or 'none'})"
        )


def is_legal(state: PairState, event: PairEvent) -> bool:
    return (PairState(state), PairEvent(event)) in TRANSITIONS


def status_proto(state: PairState, *, primary_alive: bool) -> int:
    """The ``syncrep.v1.PairState`` value a status shows: PAIR_STATE_PRIMARY_LOST
    while the primary is silent (nobody serves the volume), else ``state``'s."""
    return PairState(state).to_proto() if primary_alive else PROTO_PAIR_STATE_PRIMARY_LOST


def transition(state: PairState, event: PairEvent) -> PairState:
    """The state after ``event`` in ``state``; IllegalTransition if the table has no entry."""
    s, e = PairState(state), PairEvent(event)
    try:
        return TRANSITIONS[(s, e)]
    except KeyError:
        raise IllegalTransition(s, e) from None
