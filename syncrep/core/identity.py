"""Data identity of a replica: the pair's UUID and a generation history. Pure.

After DRBD's generation UUIDs. A node's data is used only when its identity
proves it belongs to the pair and says how it relates to the peer's:

* every replica carries the pair's ``volume_uuid`` (issued by the coordinator
  at CreateVolume) and a ``current`` generation, a random nonzero id;
* a side that starts writing without its peer (going degraded, being
  promoted) starts a new current generation and pushes the old one onto its
  ``history``;
* a resync that completes makes the secondary adopt the primary's identity
  (current and history): the sides share it again;
* ``current == 0`` means "no data of this pair" (an empty replica being rebuilt
  by a full copy). Such a replica is never served and never a resync source.

Comparing two identities (``relate``) gives one of the ``Relation`` values;
the table in tests/test_identity.py lists every case. Why a random id rather
than the epoch: a primary goes degraded on its own, without the coordinator,
so it must be able to mint a generation no other node can have minted.

Generation ids come from a function passed in (``new_generation``), so tests
and the simulator stay deterministic.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Final

__all__ = [
    "HISTORY_MAX",
    "META_GEN_CURRENT",
    "META_GEN_HISTORY",
    "META_VOLUME_UUID",
    "Identity",
    "Relation",
    "Relationship",
    "relate",
    "resync_refusal",
    "stream_refusal",
]

#: Generations kept in a history. Bounded like everything else: a peer whose
#: current generation has fallen off the end looks unrelated and gets a full
#: copy, which is correct, only slow. 64 generations are 64 degrade/resync or
#: promotion cycles without the peer catching up once.
HISTORY_MAX: Final = 64

# Keys in the volume store's metadata (committed atomically with the pair record).
META_VOLUME_UUID: Final = "identity.volume_uuid"
META_GEN_CURRENT: Final = "identity.current"
META_GEN_HISTORY: Final = "identity.history"


@dataclass(frozen=True)
class Identity:
    volume_uuid: str = ""
    current: int = 0
    history: tuple[int, ...] = ()

    @property
    def has_data(self) -> bool:
        """True when this replica holds data of a pair (a uuid and a generation)."""
        return bool(self.volume_uuid) and self.current != 0

    def knows(self, generation: int) -> bool:
        """``generation`` is this replica's current one or in its history."""
        return generation != 0 and (generation == self.current or generation in self.history)

    def next_generation(self, new_generation: Callable[[], int]) -> Identity:
        """A new current generation (writing without the peer starts now)."""
        assert self.has_data, "an empty replica never writes alone"
        gen = new_generation()
        assert gen != 0 and not self.knows(gen), "generation ids must be fresh and nonzero"
        history = (*self.history, self.current)[-HISTORY_MAX:]
        return replace(self, current=gen, history=history)

    def reverted_to(self, generation: int) -> Identity | None:
        """This identity as it was when ``generation`` was current (its later
        generations dropped), or None if ``generation`` is not in the history.
        Used only for generations the coordinator proves unconfirmed: no write
        was acknowledged under them (``VolumeAssignment.revert_to_generation``)."""
        if generation == self.current:
            return self
        if generation == 0 or generation not in self.history:
            return None
        i = self.history.index(generation)
        return replace(self, current=generation, history=self.history[:i])

    def short(self) -> str:
        """For logs and status: the current generation in hex."""
        return f"{self.current:016x}" if self.current else "none (no data)"

    # ------------------------------------------------------------ persistence
    def to_meta(self) -> dict[str, str | None]:
        return {
            META_VOLUME_UUID: self.volume_uuid or None,
            META_GEN_CURRENT: str(self.current),
            META_GEN_HISTORY: json.dumps(list(self.history)),
        }

    @classmethod
    def from_meta(cls, get: Callable[[str], str | None] | Mapping[str, str | None]) -> Identity:
        getter = get.get if isinstance(get, Mapping) else get
        uuid = getter(META_VOLUME_UUID) or ""
        current = int(getter(META_GEN_CURRENT) or 0)
        history = tuple(int(g) for g in json.loads(getter(META_GEN_HISTORY) or "[]"))
        return cls(uuid, current, history)

    # ------------------------------------------------------------ wire
    @classmethod
    def from_proto(cls, msg: object) -> Identity:
        """From a ``syncrep.v1.Identity`` message (duck-typed: the core imports no generated code)."""
        return cls(
            str(getattr(msg, "volume_uuid", "")),
            int(getattr(msg, "current", 0)),
            tuple(int(g) for g in getattr(msg, "history", ())),
        )

    def proto_fields(self) -> dict[str, object]:
        """Keyword arguments for ``pb.Identity(**...)``."""
        return {"volume_uuid": self.volume_uuid, "current": self.current, "history": list(self.history)}


class Relation(StrEnum):
    """How a replica (``local``) relates to its peer's identity."""

    SAME = "same"                    # same current generation: normal operation
    LOCAL_NEWER = "local_newer"      # the peer's current is in our history: we are the source
    PEER_NEWER = "peer_newer"        # our current is in the peer's history: the peer is the source
    SPLIT_BRAIN = "split_brain"      # both moved on from a common ancestor
    LOCAL_EMPTY = "local_empty"      # we hold no data: we need a full copy
    PEER_EMPTY = "peer_empty"        # the peer holds no data: it needs a full copy
    UNRELATED = "unrelated"          # different volume UUIDs, or no common generation


@dataclass(frozen=True)
class Relationship:
    relation: Relation
    #: The newest generation both have known (0 if none): what a resync starts from.
    common: int = 0


def relate(local: Identity, peer: Identity) -> Relationship:
    """Compare two identities. Both empty compares as LOCAL_EMPTY (nothing to copy from)."""
    if local.volume_uuid and peer.volume_uuid and local.volume_uuid != peer.volume_uuid:
        return Relationship(Relation.UNRELATED)
    if not local.has_data:
        return Relationship(Relation.LOCAL_EMPTY)
    if not peer.has_data:
        return Relationship(Relation.PEER_EMPTY)
    if local.current == peer.current:
        return Relationship(Relation.SAME, local.current)
    if local.knows(peer.current):
        return Relationship(Relation.LOCAL_NEWER, peer.current)
    if peer.knows(local.current):
        return Relationship(Relation.PEER_NEWER, local.current)
    ours = (*local.history, local.current)
    theirs = set((*peer.history, peer.current))
    common = next((g for g in reversed(ours) if g in theirs), 0)
    if common:
        return Relationship(Relation.SPLIT_BRAIN, common)
    return Relationship(Relation.UNRELATED)


def stream_refusal(local: Identity, primary: Identity, volume: str) -> str | None:
    """None if a secondary at ``local`` may accept a replication stream from a
    primary at ``primary``; else why not. Only the same current generation: a
    secondary that is behind (or ahead, or empty) needs a resync first."""
    if local.volume_uuid != primary.volume_uuid:
        return (
            f"volume {volume!r}: the primary's volume UUID {primary.volume_uuid or '(none)'} is not this "
            f"replica's {local.volume_uuid or '(none)'}; this store belongs to another volume"
        )
    if not local.has_data:
        return f"volume {volume!r}: this replica holds no data yet; it needs a full copy (resync) first"
    if local.current != primary.current:
        rel = relate(local, primary).relation
        return (
            f"volume {volume!r}: generation mismatch (this replica {local.short()}, primary "
            f"{primary.short()}: {rel.value}); it needs a resync before synchronous replication"
        )
    return None


def resync_refusal(local: Identity, primary: Identity, volume: str, *, full_copy: bool) -> str | None:
    """None if a secondary at ``local`` may accept a resync from ``primary``;
    else why not. The primary must be a source: it has data of this pair, and
    either the secondary's current generation is in the primary's history or
    current (the primary is newer or the same), or the resync is a full copy."""
    if not primary.has_data:
        return f"volume {volume!r}: the primary holds no data of the pair; it is never a resync source"
    if local.volume_uuid and local.volume_uuid != primary.volume_uuid:
        return (
            f"volume {volume!r}: the primary's volume UUID {primary.volume_uuid} is not this replica's "
            f"{local.volume_uuid}; this store belongs to another volume"
        )
    if full_copy:
        return None
    if not local.has_data:
        return f"volume {volume!r}: this replica holds no data; only a full copy can rebuild it"
    if primary.knows(local.current):
        return None
    rel = relate(local, primary)
    return (
        f"volume {volume!r}: this replica's generation {local.short()} is not in the primary's history "
        f"({rel.relation.value}); a resync from it would lose this replica's writes. "
        "Resolve it with `syncrep resolve`."
    )
