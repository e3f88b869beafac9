"""The secondary's resync receiver (method step 3), pure: what to do with a diff stream.

The secondary persists a ``ResyncState`` (``secondary.resync``) about its
current (or last) resync. Each decision here is a function of that state and
of what happened — a stream header, a chunk, the trailer, a release trigger,
an ``AbortResync`` — and returns what the executor (``secondary/resync.py``,
``ResyncReceiver``) carries out on the volume's I/O thread, in a fixed order:
snapshot work (release, roll back, delete, take), then persist, then reply.
Snapshots are plain ``(name, id)`` pairs of the live snapshots, in id order.
Nothing here does I/O. Tables of cases: tests/test_receiver.py.

The protocol, the rollback point and its release are described in the
module docstring of ``secondary/resync.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Self

from syncrep.blockstore.extents import Extent, merge_extents
from syncrep.core.activity import ActivityLog
from syncrep.core.identity import Identity, resync_refusal
from syncrep.core.pair import PairRecord
from syncrep.core.vocab import PRE_RESYNC_PREFIX, RoundKind, pre_resync_snapshot_name

__all__ = [
    "Abort",
    "Begin",
    "ChunkVerdict",
    "Header",
    "Opening",
    "Release",
    "ResyncState",
    "Snapshot",
    "Trailer",
    "check_chunk",
    "check_trailer",
    "chunk_in_range",
    "chunk_refusal",
    "decide_abort",
    "decide_begin",
    "decide_release",
    "decode_extents",
    "divergent_extents",
    "encode_extents",
    "header_refusal",
    "may_release",
]

Snapshot = tuple[str, int]  # (name, id) of a live snapshot


@dataclass(frozen=True)
class ResyncState:
    """What the secondary persists about its current (or last) resync."""

    resync_id: str = ""
    # The rollback point (a ``pre-resync-*`` snapshot); 0 once released.
    pre_snapshot_id: int = 0
    # "round:kind:base:target" -> applied_below
    progress: Mapping[str, int] = field(default_factory=dict)
    # The final round is applied and checked, persisted before the primary
    # hears "complete": the data is the primary's final target, a consistent
    # state, and the rollback point only awaits release.
    complete: bool = False
    # Epoch of the final round: a replication stream at this epoch or later
    # proves the primary switched back.
    epoch: int = 0

    @property
    def in_progress(self) -> bool:
        """A resync whose rollback point is still the DR copy's last consistent state."""
        return bool(self.resync_id) and not self.complete

    @classmethod
    def from_json(cls, raw: str | None) -> Self:
        """The persisted form (``dump``); no record is the empty state."""
        if not raw:
            return cls()
        d = json.loads(raw)
        return cls(
            d["resync_id"], int(d["pre_snapshot_id"]), {k: int(v) for k, v in d["progress"].items()},
            # Absent in states written before completion was persisted: those
            # were in progress (a completed resync used to clear its state).
            bool(d.get("complete", False)), int(d.get("epoch", 0)),
        )

    def dump(self) -> str:
        return json.dumps(
            {"resync_id": self.resync_id, "pre_snapshot_id": self.pre_snapshot_id, "progress": dict(self.progress),
             "complete": self.complete, "epoch": self.epoch}
        )

    def resume_at(self, key: str) -> int:
        """The first chunk of round ``key`` not applied yet."""
        return self.progress.get(key, 0)

    def applied(self, key: str, applied_below: int) -> ResyncState | None:
        """Chunks below ``applied_below`` of round ``key`` are durable: the state
        to persist, or None for a repair (nothing is persisted for one)."""
        if not self.resync_id:
            return None
        return replace(self, progress={**self.progress, key: applied_below})

    def completed(self, epoch: int) -> ResyncState:
        """The final round, at ``epoch``, is applied and checked: a release is owed."""
        return replace(self, complete=True, epoch=epoch)


@dataclass(frozen=True)
class Header:
    """The fields of a ``ResyncHeader`` the receiver decides on."""

    resync_id: str
    round: int
    kind: str  # a RoundKind value
    base: int = 0
    target: int = 0
    final: bool = False
    epoch: int = 0
    rollback_to_snapshot: str = ""

    @property
    def key(self) -> str:
        """The round's key in ``ResyncState.progress``."""
        return f"{self.round}:{self.kind}:{self.base}:{self.target}"

    @property
    def repair(self) -> bool:
        return self.kind == RoundKind.REPAIR


def rollback_points(snapshots: Iterable[Snapshot]) -> tuple[Snapshot, ...]:
    """The ``pre-resync-*`` snapshots."""
    return tuple(s for s in snapshots if s[0].startswith(PRE_RESYNC_PREFIX))


def _live(snapshots: Iterable[Snapshot], snapshot_id: int) -> bool:
    return bool(snapshot_id) and any(i == snapshot_id for _, i in snapshots)


def _find(snapshots: Iterable[Snapshot], name: str) -> Snapshot | None:
    return next((s for s in snapshots if s[0] == name), None)


# ---------------------------------------------------------------- the header


class Opening(Enum):
    """What a stream header opens."""

    REPAIR = "repair"  # verify --repair while in sync: nothing to roll back to, nothing to resume
    RESUME = "resume"  # the resync in progress, from its persisted progress
    REOPEN = "reopen"  # a resync whose final round completed here (the primary did not switch back)
    NEW = "new"  # a resync this node has not seen
    REFUSE = "refuse"  # FAILED_PRECONDITION with ``Begin.refuse``


@dataclass(frozen=True)
class Begin:
    """The answer to a stream header. The executor, in this order: release the
    previous (completed) resync's rollback point (``release_first``), refuse
    (``refuse``), roll back to ``rollback_to``, delete the stale rollback
    points ``delete``, take the rollback point named ``create_snapshot`` (its
    id goes into ``state.pre_snapshot_id``), persist ``state`` (when
    ``persist``), then reply ``applied_below = resume``."""

    opening: Opening
    state: ResyncState
    resume: int = 0
    persist: bool = False
    refuse: str = ""
    release_first: bool = False
    rollback_to: Snapshot | None = None
    delete: tuple[Snapshot, ...] = ()
    create_snapshot: str = ""
    # REOPEN: the rollback point was still there. NEW: an abandoned resync's
    # rollback point is kept.
    kept: bool = False
    # NEW over an abandoned resync whose rollback point is gone: none until it completes.
    no_rollback_point: bool = False


def _rollback_point(snapshots: Sequence[Snapshot], name: str) -> tuple[int, str]:
    """(id, "") of the rollback point ``name`` if it exists (taken by a begin
    that crashed before persisting the state naming it), else (0, name): take it."""
    found = _find(snapshots, name)
    return (found[1], "") if found else (0, name)


def decide_begin(st: ResyncState, h: Header, volume: str, snapshots: Sequence[Snapshot]) -> Begin:
    """A ``Resync`` call's header: new resync, resume, reopen or refusal.

    A completed resync that the primary resumes is reopened: its rollback
    point is kept if not released yet, else the current (consistent) state
    becomes the new one, and a rollback to a common snapshot is not replayed
    over the rounds already applied. A new resync first releases a completed
    predecessor's rollback point, then rolls back to the common snapshot if
    asked (which deletes every later snapshot), and keeps an abandoned
    resync's rollback point if it is still there; without one, and without a
    rollback, its data is not known to be consistent and no snapshot of it may
    pose as one. Otherwise the data is consistent: stale rollback points go
    and a new one is taken."""
    if h.repair:
        return Begin(Opening.REPAIR, ResyncState())
    if st.resync_id == h.resync_id and st.complete:
        kept = _live(snapshots, st.pre_snapshot_id)
        pre_id, create = (st.pre_snapshot_id, "") if kept else _rollback_point(
            snapshots, pre_resync_snapshot_name(st.resync_id))
        return Begin(Opening.REOPEN, replace(st, pre_snapshot_id=pre_id, complete=False),
                     resume=st.resume_at(h.key), persist=True, create_snapshot=create, kept=kept)
    if st.resync_id == h.resync_id:
        return Begin(Opening.RESUME, st, resume=st.resume_at(h.key))

    release_first = st.complete
    if release_first:
        # The release deletes every rollback point; the new resync starts from none.
        snapshots = [s for s in snapshots if s not in rollback_points(snapshots)]
        st = ResyncState()
    rollback_to = None
    if h.rollback_to_snapshot:
        rollback_to = _find(snapshots, h.rollback_to_snapshot)
        if rollback_to is None:
            return Begin(Opening.REFUSE, st, release_first=release_first,
                         refuse=f"resync of {volume!r} needs a rollback to common snapshot "
                                f"{h.rollback_to_snapshot!r}, which this node does not have")
        # A rollback deletes the snapshots taken after its target.
        snapshots = [s for s in snapshots if s[1] <= rollback_to[1]]
    new = ResyncState(h.resync_id)
    if st.in_progress and _live(snapshots, st.pre_snapshot_id):
        # An earlier, abandoned resync: its pre-resync snapshot is still our
        # last consistent point. Keep it.
        return Begin(Opening.NEW, replace(new, pre_snapshot_id=st.pre_snapshot_id), persist=True,
                     release_first=release_first, rollback_to=rollback_to, kept=True)
    if st.in_progress and rollback_to is None:
        return Begin(Opening.NEW, new, persist=True, release_first=release_first, no_rollback_point=True)
    # No resync in progress (or just rolled back to a common snapshot): our data is consistent.
    name = pre_resync_snapshot_name(h.resync_id)
    stale = tuple(s for s in rollback_points(snapshots) if s[0] != name)
    pre_id, create = _rollback_point(snapshots, name)
    return Begin(Opening.NEW, replace(new, pre_snapshot_id=pre_id), persist=True, release_first=release_first,
                 rollback_to=rollback_to, delete=stale, create_snapshot=create)


# ---------------------------------------------------------------- chunks and trailer


class ChunkVerdict(Enum):
    APPLY = "apply"
    # Not the chunk expected next: one sent after a refused one, before the
    # primary saw the refusal. Dropped; the primary re-sends from there.
    DROP = "drop"
    # Bad checksum or out of range: never applied, refused, asked for again.
    REFUSE = "refuse"


def chunk_in_range(offset: int, length: int, block_size: int, size_bytes: int) -> bool:
    return length > 0 and offset % block_size == 0 and length % block_size == 0 and offset + length <= size_bytes


def check_chunk(index: int, offset: int, length: int, crc32c: int, actual_crc32c: int, expected: int,
                block_size: int, size_bytes: int) -> ChunkVerdict:
    """A chunk claiming ``crc32c`` whose data has ``actual_crc32c``, when chunk
    ``expected`` is the next one to apply."""
    if index != expected:
        return ChunkVerdict.DROP
    if actual_crc32c != crc32c or not chunk_in_range(offset, length, block_size, size_bytes):
        return ChunkVerdict.REFUSE
    return ChunkVerdict.APPLY


def chunk_refusal(index: int, offset: int) -> str:
    """The message of a refused chunk's reply."""
    return f"chunk {index} at offset {offset}: crc32c mismatch"


@dataclass(frozen=True)
class Trailer:
    """The answer to a round's trailer: ``refuse`` (DATA_LOSS with that
    message), or reply ``complete`` — after persisting the completion
    (``ResyncState.completed``) when ``finish``."""

    refuse: str = ""
    finish: bool = False


def check_trailer(h: Header, announced: int, applied: int, digest_ok: bool) -> Trailer:
    if announced != applied or not digest_ok:
        return Trailer(refuse=f"resync round {h.round} trailer mismatch: {announced} chunks announced, "
                              f"{applied} applied, digest {'ok' if digest_ok else 'differs'}")
    return Trailer(finish=h.final and not h.repair)


# ---------------------------------------------------------------- release


def may_release(st: ResyncState, epoch: int = 0) -> bool:
    """Whether the rollback points may go now: never while a resync is in
    progress (its rollback point is the DR copy's last consistent state), nor,
    given ``epoch`` (a replication stream's), when that is older than the
    completed resync's. Without a resync record, leftovers go too: no resync
    in progress means our data is consistent."""
    if st.in_progress:
        return False
    return not (st.complete and epoch and epoch < st.epoch)


@dataclass(frozen=True)
class Release:
    """Delete ``delete``, then persist ``state`` (None: nothing to record). The
    record stays, so a resumed resync_id is recognised."""

    delete: tuple[Snapshot, ...]
    state: ResyncState | None


def decide_release(st: ResyncState, snapshots: Sequence[Snapshot], epoch: int = 0) -> Release | None:
    """Release the rollback point of a completed resync; None when not allowed now."""
    if not may_release(st, epoch):
        return None
    return Release(rollback_points(snapshots), replace(st, pre_snapshot_id=0) if st.pre_snapshot_id else None)


# ---------------------------------------------------------------- AbortResync


@dataclass(frozen=True)
class Abort:
    """What ``AbortResync`` does. In order: ``release`` (the resync is complete:
    release its rollback point, never roll back); ``fence`` (any stream still
    applying); roll back to ``rollback_to`` (0: none); ``forget`` the resync
    (clear its persisted state); delete snapshot ``delete`` (failures ignored:
    a leftover is removed by the next release). Then reply ``message``."""

    volume: str
    st: ResyncState
    release: bool = False
    fence: bool = False
    rollback_to: int = 0
    forget: bool = False
    delete: int = 0
    rollback: bool = False

    def message(self, rolled_back: int = 0, released: Sequence[str] = ()) -> str:
        if not self.st.resync_id:
            return f"volume {self.volume!r} has no resync in progress"
        if self.release:
            extra = f"; released {', '.join(released)}" if released else ""
            return (f"volume {self.volume!r} has no resync in progress "
                    f"(resync {self.st.resync_id} is complete{extra})")
        if self.rollback:
            return f"resync {self.st.resync_id} abandoned; rolled back {rolled_back} bytes to the pre-resync snapshot"
        return f"resync {self.st.resync_id} left resumable; pre-resync snapshot {self.st.pre_snapshot_id} kept"


def decide_abort(st: ResyncState, volume: str, rollback: bool, snapshots: Sequence[Snapshot]) -> Abort:
    """Abandon the resync in progress (operator abort, primary lost). With
    ``rollback`` the data becomes the rollback point: the resync is forgotten
    first, then its snapshot deleted (a crash in between leaves a leftover
    that the next release removes, never a resync naming a lost snapshot)."""
    if not st.resync_id:
        return Abort(volume, st)
    if st.complete:
        # Never rolled back: the data is the resync's consistent result.
        return Abort(volume, st, release=True)
    if not rollback:
        return Abort(volume, st, fence=True)
    target = st.pre_snapshot_id if _live(snapshots, st.pre_snapshot_id) else 0
    return Abort(volume, st, fence=True, rollback_to=target, forget=True, delete=st.pre_snapshot_id, rollback=True)


# ---------------------------------------------------------------- demotion (docs/FAILOVER.md section 4)
def decode_extents(raw: str | None) -> list[Extent]:
    """``META_NODE_DIVERGENT``'s JSON ``[[offset, length], ...]``; none is empty."""
    return [Extent(int(o), int(n)) for o, n in json.loads(raw or "[]")]


def encode_extents(extents: Iterable[Extent]) -> str | None:
    """The persisted form of ``decode_extents``; None (delete the key) when empty."""
    items = [[e.offset, e.length] for e in extents]
    return json.dumps(items) if items else None


def divergent_extents(
    rec: PairRecord, size_bytes: int, written_alone: Iterable[Extent] = (), already: Iterable[Extent] = ()
) -> list[Extent]:
    """Where a demoted primary's writes may have reached only its own disk:
    its activity log regions (writes in flight towards the secondary), its
    failed extents, ``written_alone`` (what it wrote since its fault snapshot,
    degraded) and ``already`` (divergent extents of an earlier demotion not yet
    overwritten), merged and clipped to the volume. The new primary's resync
    overwrites them; nothing here is a full copy."""
    al = ActivityLog(regions=list(rec.al_regions or ())).extents(size_bytes)
    out = []
    for e in merge_extents([*al, *rec.failed_extents, *written_alone, *already]):
        end = min(e.end, size_bytes)
        if e.offset < end:
            out.append(Extent(e.offset, end - e.offset))
    return out


def header_refusal(local: Identity, primary: Identity, volume: str, h: Header, *, full_copy: bool) -> str | None:
    """None if this replica (``local``) may apply the resync round ``h`` from
    a primary at ``primary``; else why not (docs/FAILOVER.md section 1). A
    repair ("verify --repair", in sync) needs the same current generation: it
    only re-sends blocks of data both sides already share."""
    if h.repair:
        if local.volume_uuid == primary.volume_uuid and local.has_data and local.current == primary.current:
            return None
        return (
            f"volume {volume!r}: repair refused: this replica's generation {local.short()} (volume UUID "
            f"{local.volume_uuid or '(none)'}) is not the primary's {primary.short()} (volume UUID "
            f"{primary.volume_uuid or '(none)'}); a repair runs only between replicas in sync, resync instead"
        )
    return resync_refusal(local, primary, volume, full_copy=full_copy)
