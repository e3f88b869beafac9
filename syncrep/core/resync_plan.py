"""Resync planning (method step 3), pure: where a resync stands and what it does next.

The primary persists a ``ResyncPlan`` after every step, so a restart resumes
exactly where it stopped. ``next_step(plan, ...)`` is the whole decision of
what comes next; the executor (``primary/volume.py``) carries the step out
(snapshot, send, measure) and records the result on the plan with the
``ResyncPlan.round_planned`` / ``round_sent`` methods. Nothing here does I/O.

::

    Variant A (rewrite):  [RewriteFailed] -> Snapshot d1 -> round 1 = diff(F, d1)
    Variant B (direct):   Snapshot d0 -> round 0 = failed extents as of d0
                          -> (wait diff_delay_s) Snapshot d2 -> round 1 = diff(F, d2)
    Then, after every diff round:
                          MeasurePending(since = last diff target)
                          -> while pending > final_diff_threshold_bytes, the difference
                             shrinks and rounds_done < max_diff_rounds:
                             Snapshot r<k> -> round k = diff(D_{k-1}, D_k)
                          -> FinalRound: quiesce, diff(D_last, D_final), switch back.

Each round's chunk list is derived only from immutable snapshots, so it is the
same after any restart: the secondary says where to resume and nothing it
already applied travels twice.
"""

from __future__ import annotations

import json
import secrets
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import overload

from syncrep.blockstore.extents import Extent
from syncrep.core.vocab import ResyncMode, RoundKind

__all__ = [
    "FinalRound",
    "MeasurePending",
    "Pieces",
    "ResyncLimits",
    "ResyncPlan",
    "ResyncStep",
    "RewriteFailed",
    "RoundSpec",
    "SendRound",
    "TakeRoundSnapshot",
    "next_step",
    "plan_pieces",
    "plan_pieces_from_runs",
]


class Pieces(Sequence[tuple[int, int]]):
    """The chunks of one resync round, ``(offset, length)`` each, in offset
    order: chunk ``i`` is ``pieces[i]``.

    Why not a list of tuples: a round of a 1 TiB volume with a large dirty set
    has a million chunks or more, and a tuple of two ints costs about 120
    bytes with its list slot (issue 14: "the resync plan is built in memory at
    about 100 bytes per chunk"). Two ``array('Q')`` hold 16 bytes per chunk;
    ``total_bytes`` is kept as they grow. Compares equal to any sequence of
    the same pairs (tests compare with lists)."""

    __slots__ = ("_lengths", "_offsets", "total_bytes")

    def __init__(self, pairs: Iterable[tuple[int, int]] = ()) -> None:
        self._offsets = array("Q")
        self._lengths = array("Q")
        self.total_bytes = 0
        for off, n in pairs:
            self.append(off, n)

    def append(self, offset: int, length: int) -> None:
        assert length > 0 and offset >= 0, (offset, length)
        self._offsets.append(offset)
        self._lengths.append(length)
        self.total_bytes += length

    def length(self, i: int) -> int:
        return self._lengths[i]

    def __len__(self) -> int:
        return len(self._offsets)

    @overload
    def __getitem__(self, i: int) -> tuple[int, int]: ...
    @overload
    def __getitem__(self, i: slice) -> list[tuple[int, int]]: ...

    def __getitem__(self, i: int | slice) -> tuple[int, int] | list[tuple[int, int]]:
        if isinstance(i, slice):
            return list(zip(self._offsets[i], self._lengths[i], strict=True))
        return self._offsets[i], self._lengths[i]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self._offsets, self._lengths, strict=True)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Pieces):
            return self._offsets == other._offsets and self._lengths == other._lengths
        if isinstance(other, Sequence):
            return len(self) == len(other) and all(a == tuple(b) for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"Pieces({len(self)} chunks, {self.total_bytes} bytes)"


def plan_pieces(extents: Iterable[Extent], block_size: int, chunk_bytes: int) -> Pieces:
    """Cut extents (aligned outward to blocks) into pieces of at most
    chunk_bytes, in offset order. Deterministic: the chunk index of a piece is
    its position in this list."""
    return plan_pieces_from_runs(
        ((e.offset // block_size, -(-(e.offset + e.length) // block_size) - e.offset // block_size) for e in extents),
        block_size, chunk_bytes,
    )


def plan_pieces_from_runs(runs: Iterable[tuple[int, int]], block_size: int, chunk_bytes: int) -> Pieces:
    """``plan_pieces`` of block runs ``(first_block, count)`` in block order
    (e.g. ``iter_block_runs`` of a diff bitmap): the same pieces, without an
    Extent object per run in between."""
    out = Pieces()
    step = max(block_size, chunk_bytes - chunk_bytes % block_size)
    for first, count in runs:
        off = first * block_size
        end = off + count * block_size
        while off < end:
            n = min(step, end - off)
            out.append(off, n)
            off += n
    return out


@dataclass
class RoundSpec:
    round: int
    kind: str  # a RoundKind value
    base: int  # snapshot id (0 for extents/repair)
    target: int  # snapshot id to read from (0 = live head, repair only)
    extents: list[list[int]] = field(default_factory=list)  # for "extents"/"repair"


@dataclass
class ResyncPlan:
    """Where a resync stands; persisted in the volume's metadata after every step."""

    resync_id: str
    mode: str  # a ResyncMode value
    fault_snapshot: int
    rollback_to: str = ""
    snapshots: list[int] = field(default_factory=list)  # created by the resync, deleted at the end
    current: RoundSpec | None = None
    rounds_done: int = 0
    last_round: int = -1  # number of the last completed round
    # Target snapshot of the last completed diff round; 0 until one completed
    # (read it through ``diff_base``).
    last_target: int = 0
    last_round_bytes: int = -1
    rewritten: bool = False

    def dump(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def load(cls, raw: str | None) -> ResyncPlan | None:
        if not raw:
            return None
        d = json.loads(raw)
        cur = d.pop("current", None)
        plan = cls(**d)
        plan.current = RoundSpec(**cur) if cur else None
        return plan

    @classmethod
    def new(cls, mode: ResyncMode | str, fault_snapshot: int, rollback_to: str = "") -> ResyncPlan:
        return cls(
            resync_id=f"f{fault_snapshot}-{secrets.token_hex(4)}",
            mode=str(ResyncMode(mode)),
            fault_snapshot=fault_snapshot,
            rollback_to=rollback_to,
        )

    @property
    def diff_base(self) -> int | None:
        """The snapshot the next diff round starts from: the target of the last
        completed diff round, or None while no diff round has completed (the
        next diff then starts from the fault snapshot F)."""
        return self.last_target or None

    # -- recording what the executor did
    def round_planned(self, spec: RoundSpec) -> None:
        """The round's target snapshot exists: ``spec`` is the round to send."""
        if spec.target and spec.target not in self.snapshots:
            self.snapshots.append(spec.target)
        self.current = spec

    def round_sent(self, spec: RoundSpec, sent_bytes: int) -> None:
        """Round ``spec`` is applied on the secondary."""
        assert self.current is not None and self.current.round == spec.round, "round_sent for another round"
        self.rounds_done += 1
        self.last_round = spec.round
        if spec.kind == RoundKind.DIFF:
            self.last_target = spec.target
            self.last_round_bytes = sent_bytes
        self.current = None


@dataclass(frozen=True)
class ResyncLimits:
    final_diff_threshold_bytes: int
    max_diff_rounds: int
    diff_delay_s: float


# ---------------------------------------------------------------- steps


@dataclass(frozen=True)
class RewriteFailed:
    """Variant A: rewrite the failed extents in place (read + write on the
    volume's I/O thread), so they count as changed after F. Then mark the plan
    rewritten (``plan.rewritten = True``)."""


@dataclass(frozen=True)
class TakeRoundSnapshot:
    """Wait ``delay_s``, take snapshot ``tag``, then ``plan.round_planned(
    RoundSpec(round, kind, base, <new snapshot id>, extents))`` and persist."""

    tag: str
    round: int
    kind: RoundKind
    base: int
    extents: tuple[tuple[int, int], ...] = ()
    delay_s: float = 0.0

    def spec(self, target: int) -> RoundSpec:
        return RoundSpec(self.round, str(self.kind), self.base, target, [list(e) for e in self.extents])


@dataclass(frozen=True)
class SendRound:
    """Send ``spec`` (not final), then ``plan.round_sent(spec, bytes)`` and persist."""

    spec: RoundSpec


@dataclass(frozen=True)
class MeasurePending:
    """Measure the bytes written since snapshot ``since`` and call next_step again with them."""

    since: int


@dataclass(frozen=True)
class FinalRound:
    """Quiesce, snapshot, send diff(base, final snapshot) as round ``round``,
    re-open replication at the new epoch, release: in sync."""

    round: int
    base: int


ResyncStep = RewriteFailed | TakeRoundSnapshot | SendRound | MeasurePending | FinalRound


def next_step(
    plan: ResyncPlan,
    failed: Iterable[Extent],
    limits: ResyncLimits,
    pending_bytes: int | None = None,
) -> ResyncStep:
    """What the resync does next. ``pending_bytes`` answers a MeasurePending
    (bytes written since ``plan.diff_base``); pass None otherwise."""
    if plan.current is not None:
        return SendRound(plan.current)
    if plan.rounds_done == 0:
        failed_list = tuple((e.offset, e.length) for e in failed)
        if plan.mode == ResyncMode.REWRITE:
            if not plan.rewritten and failed_list:
                return RewriteFailed()
            return TakeRoundSnapshot("d1", 1, RoundKind.DIFF, plan.fault_snapshot)
        return TakeRoundSnapshot("d0", 0, RoundKind.EXTENTS, 0, failed_list)
    base = plan.diff_base
    if base is None:
        # Variant B after round 0: the second diff snapshot, within diff_delay_s.
        return TakeRoundSnapshot("d2", 1, RoundKind.DIFF, plan.fault_snapshot, delay_s=limits.diff_delay_s)
    if pending_bytes is None:
        return MeasurePending(base)
    shrinking = plan.last_round_bytes < 0 or pending_bytes < plan.last_round_bytes
    if (pending_bytes > limits.final_diff_threshold_bytes and shrinking
            and plan.rounds_done < limits.max_diff_rounds):
        k = plan.last_round + 1
        return TakeRoundSnapshot(f"r{k}", k, RoundKind.DIFF, base)
    return FinalRound(plan.last_round + 1, base)
