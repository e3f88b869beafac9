"""The primary's pair record: one value, persisted whole, in one transaction.

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

from syncrep.blockstore.extents import Extent
from syncrep.core.pairstate import PairState
from syncrep.core.vocab import (
    META_AL,
    META_CLEAN,
    META_FAILED,
    META_FAULT_SNAP,
    META_LAST_ERROR,
    META_ROLLBACK_TO,
    META_STATE,
)

__all__ = ["PairRecord"]


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
