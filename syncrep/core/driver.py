"""The coordinator's decisions, pure: what to do, given what it knows. No I/O.

In the style of etcd raft's ``Ready``: the coordinator's shell
(``coordinator/service.py``) gathers what it knows as plain data -- the pair
records, when it last heard from each node, the nodes' latest reports, the
time -- and asks this module what to do. The answer is a list of commands
(frozen dataclasses). The shell carries them out in a fixed order: first
persist and record (``CreatePair``, ``ChangePair``, ``SaveGenerations``,
``SaveProgress``, ``DeletePair``, the in-memory ``SetBackoff`` /
``ClearBackoff`` / ``NodeSilent``, and the ERROR log of an ``Alert``) in list
order, then send (``StartResync``, ``PushAssignment``, ``ProbeHealth``), then
reply (a lease in a reply is granted only after what the request changed is
persisted).

Entry points:

* ``decide(pairs, liveness, reports, now, ...)``: the periodic tick. A pair
  whose primary lost its data, or (auto-failover) whose in-sync primary is
  silent with its lease expired, gets its secondary promoted; a resyncing
  pair whose secondary went silent goes degraded; a secondary without data is
  rebuilt (degraded, full copy pending), a demoted primary's divergent
  extents join the failed extents, two replicas that both moved on are split
  brain; a degraded pair whose primary and secondary are alive, whose primary
  shows its fault snapshot, whose identities make the primary a source, and
  whose backoff has expired gets its secondary probed (``ProbeHealth``) and,
  once the probe answered, a resync at a new epoch (a full copy when the
  secondary is empty; the failed extents as ``extra_extents``).
* ``on_report``: a ReplicationReport from a primary.
* ``on_heartbeat``: the safety net of a primary's heartbeat that says degraded.
* ``on_identity``: a node's reported generation, persisted when it changed.
* ``switchover_refusal`` / ``plan_switchover``: the Switchover RPC, before
  and after the old primary's PrepareHandover answer (``Handover``).
* ``plan_promote``: the Promote RPC (``decide`` promotes by itself on
  auto-failover and when the primary has lost its data).
* ``leases_for`` / ``lease_remaining_s``: the primaries' leases
  (docs/FAILOVER.md section 2).
* ``on_start_resync_failed``: StartResync failed (refused or unreachable).
* ``plan_create_volume`` / ``on_push_failed``: CreateVolume.
* ``delete_refusal`` / ``plan_delete``: DeleteVolume; ``resize_refusal`` /
  ``plan_resize``: ResizeVolume, before and after both nodes grew (its
  ``ResizePair`` is persisted after the pushes: the record never names a size
  a node lacks). Issue 13.
* validators that return a ``Problem`` (or a message) or None:
  ``validate_config``, ``validate_register``, ``validate_create_volume``,
  ``validate_report``.

Every pair state change goes through ``syncrep.core.pairstate.transition``.
Time is a number passed in: ``now`` is the coordinator's monotonic clock
(liveness, backoff); ``wall_now`` the wall clock (``state_changed_at`` is a
persisted wall-clock time). The backoff's random jitter is passed in too
(``jitter``, a number in [0, 1)), so every function here is deterministic.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Protocol, TypeAlias

from syncrep.blockstore.extents import Extent
from syncrep.core.extents import derive_failed_extents, to_extent
from syncrep.core.identity import Identity, Relation, relate
from syncrep.core.pairstate import IllegalTransition, PairEvent, PairState, is_legal, transition
from syncrep.core.vocab import validate_dial_address

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "MAX_BLOCKS",
    "MAX_BLOCK_SIZE",
    "MIN_BLOCK_SIZE",
    "RESYNC_MODE_DIRECT",
    "RESYNC_MODE_REWRITE",
    "ROLE_HINTS",
    "VOLUME_NAME_RE",
    "Alert",
    "Backoff",
    "ChangePair",
    "ClearBackoff",
    "Code",
    "Command",
    "CreatePair",
    "CreateVolumeArgs",
    "DeletePair",
    "Handover",
    "LeaseGrant",
    "Liveness",
    "Nack",
    "NodeSilent",
    "PairView",
    "Policy",
    "ProbeHealth",
    "Problem",
    "Progress",
    "PushAssignment",
    "ReplicationReport",
    "Report",
    "ResizePair",
    "ResolvePlan",
    "SaveGenerations",
    "SaveProgress",
    "SetBackoff",
    "StartResync",
    "VolumeSpec",
    "decide",
    "delete_refusal",
    "discard_snapshot_name",
    "lease_remaining_s",
    "leases_for",
    "not_found",
    "on_heartbeat",
    "on_identity",
    "on_push_failed",
    "on_report",
    "on_start_resync_failed",
    "plan_create_volume",
    "plan_delete",
    "plan_promote",
    "plan_resize",
    "plan_resolve",
    "plan_switchover",
    "resize_refusal",
    "resolve_merge_discarded",
    "resync_backoff_s",
    "resync_blocker",
    "split_brain_figures",
    "switchover_refusal",
    "validate_config",
    "validate_create_volume",
    "validate_register",
    "validate_report",
    "volume_spec",
]

# ---------------------------------------------------------------- limits and wire values

VOLUME_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DEFAULT_BLOCK_SIZE: Final = 4096
MIN_BLOCK_SIZE: Final = 512
MAX_BLOCK_SIZE: Final = 1024 * 1024
MAX_BLOCKS: Final = 2**32
ROLE_HINTS: Final = ("", "primary", "secondary")

# syncrep.v1.ResyncMode values (protos/syncrep.proto; tests/test_driver.py
# checks them against syncrep_pb2), written out so that this module imports
# nothing from the generated code.
RESYNC_MODE_REWRITE: Final = 1
RESYNC_MODE_DIRECT: Final = 2
_RESYNC_MODE_NAMES: Final = {
    RESYNC_MODE_REWRITE: "RESYNC_MODE_REWRITE",
    RESYNC_MODE_DIRECT: "RESYNC_MODE_DIRECT",
}


# ---------------------------------------------------------------- problems


class Code(StrEnum):
    """What kind of refusal. The values are ``grpc.StatusCode`` names."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    NOT_FOUND = "NOT_FOUND"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class Problem:
    """Why a request is refused: a kind and a message a person can act on."""

    code: Code
    message: str
    #: A refusal that goes away by itself (a node's next heartbeat): the shell
    #: may check again after this many seconds, within its own bound.
    retry_after_s: float | None = None

    def __str__(self) -> str:
        return self.message


# ---------------------------------------------------------------- inputs


class PairView(Protocol):
    """What the decisions read of a pair record (``coordinator.db.PairRecord``)."""

    @property
    def name(self) -> str: ...
    @property
    def size_bytes(self) -> int: ...
    @property
    def primary(self) -> str: ...
    @property
    def secondary(self) -> str: ...
    @property
    def epoch(self) -> int: ...
    @property
    def state(self) -> PairState: ...
    @property
    def failed_extents(self) -> tuple[Extent, ...]: ...
    @property
    def fault_snapshot_id(self) -> int: ...
    @property
    def last_error(self) -> str: ...
    @property
    def state_changed_at(self) -> float: ...
    @property
    def volume_uuid(self) -> str: ...
    @property
    def generation(self) -> int: ...
    @property
    def secondary_generation(self) -> int: ...
    @property
    def auto_failover(self) -> bool: ...
    @property
    def full_copy_pending(self) -> bool: ...
    @property
    def revert_generation(self) -> int: ...


@dataclass(frozen=True)
class Progress:
    """Resync progress as reported by the primary."""

    bytes_done: int = 0
    bytes_total: int = 0
    rate_bytes_per_s: float = 0.0
    eta_s: float = 0.0
    round: int = 0


@dataclass(frozen=True)
class Report:
    """A node's latest report on one volume, from its heartbeat (``VolumeReport``)."""

    volume: str
    epoch: int
    state: PairState | None  # None: PAIR_STATE_UNSPECIFIED or a value this code does not know
    fault_snapshot_id: int = 0
    failed_extents: tuple[tuple[int, int], ...] = ()
    last_error: str = ""
    #: The replica's data identity; None: the report carries none (unknown).
    identity: Identity | None = None
    #: The node has no usable store for the volume (``data_problem`` says why).
    data_missing: bool = False
    data_problem: str = ""
    #: A demoted primary's extents that may be on its disk only.
    divergent_extents: tuple[tuple[int, int], ...] = ()
    out_of_sync_bytes: int = 0
    lease_remaining_s: float = 0.0
    #: "primary", "secondary" or "" (unspecified): the role the node applies.
    role: str = ""

    @property
    def has_data(self) -> bool:
        """The node reports a store with data of a pair (never served otherwise)."""
        return not self.data_missing and self.identity is not None and self.identity.has_data

    @property
    def no_data(self) -> bool:
        """The node says it has no data: no store, or an empty one (being rebuilt)."""
        return self.data_missing or (self.identity is not None and not self.identity.has_data)


@dataclass(frozen=True)
class Nack:
    seq: int
    offset: int
    length: int
    code: str = ""  # the NackCode name (or the number, if unknown)
    message: str = ""


@dataclass(frozen=True)
class ReplicationReport:
    """A primary's ReportReplication request, as plain data."""

    volume: str
    reporter: str
    epoch: int
    state: int  # the syncrep.v1.PairState value, as received (validate_report checks it)
    nacks: tuple[Nack, ...] = ()
    unacked: tuple[tuple[int, int], ...] = ()
    failed_extents: tuple[tuple[int, int], ...] = ()
    reason: str = ""
    fault_snapshot_id: int = 0
    progress: Progress | None = None  # None: the report carries no progress
    identity: Identity | None = None  # the primary's; None: not in the report


@dataclass(frozen=True)
class Liveness:
    """When the coordinator last heard from each node (its clock), and since when it runs."""

    last_heard: Mapping[str, float]
    started_at: float
    #: The registered nodes, and those already reported silent (not reported again).
    nodes: Collection[str] = ()
    reported_silent: Collection[str] = ()

    def alive(self, address: str, now: float, timeout_s: float) -> bool:
        t = self.last_heard.get(address)
        return t is not None and now - t <= timeout_s

    def silent_for(self, address: str, now: float) -> float:
        """Seconds since the coordinator heard from ``address``, or since it started."""
        return now - max(self.last_heard.get(address, self.started_at), self.started_at)


@dataclass(frozen=True)
class Backoff:
    """The resync driver's memory of a pair: failures since it was last in sync,
    and the earliest (clock) time of the next attempt."""

    failures: int = 0
    not_before: float = 0.0


@dataclass(frozen=True)
class Policy:
    """The coordinator's settings the decisions depend on."""

    node_timeout_s: float
    auto_resync: bool = True
    resync_retry_initial_s: float = 0.5
    resync_retry_max_s: float = 10.0
    #: The term of a primary's lease, and the margin for clock-rate drift the
    #: coordinator adds before it treats a lease as expired.
    lease_s: float = 4.0
    lease_drift_s: float = 0.5


@dataclass(frozen=True)
class CreateVolumeArgs:
    """A CreateVolume request as received (0 = unset, for block_size and resync_mode)."""

    name: str
    size_bytes: int
    primary: str
    secondary: str
    block_size: int = 0
    resync_mode: int = 0
    auto_failover: bool = False


@dataclass(frozen=True)
class VolumeSpec:
    """A new pair, with the defaults filled in."""

    name: str
    size_bytes: int
    block_size: int
    primary: str
    secondary: str
    resync_mode: int
    auto_failover: bool = False

    def role_of(self, address: str) -> str | None:
        return {self.primary: "primary", self.secondary: "secondary"}.get(address)


# ---------------------------------------------------------------- commands


@dataclass(frozen=True)
class NodeSilent:
    """Record that ``address`` has been silent longer than the node timeout (say
    so in the log if it was ever heard from)."""

    address: str
    silent_s: float
    heard_before: bool


@dataclass(frozen=True)
class ChangePair:
    """Persist the pair's ``event`` (``from_state -> to_state``, with ``reason``)
    and the changed fields in one transaction; None means unchanged. The shell
    stamps ``state_changed_at`` when the state changes."""

    volume: str
    event: PairEvent
    from_state: PairState
    to_state: PairState
    reason: str
    epoch: int
    failed_extents: tuple[Extent, ...] | None = None
    fault_snapshot_id: int | None = None
    last_error: str | None = None
    progress: Progress | None = None
    #: The progress came from the primary just now (newer than its heartbeats).
    progress_reported: bool = False
    #: A promotion swaps the roles: the new addresses (None: unchanged).
    primary: str | None = None
    secondary: str | None = None
    generation: int | None = None
    secondary_generation: int | None = None
    full_copy_pending: bool | None = None
    revert_generation: int | None = None


@dataclass(frozen=True)
class SaveGenerations:
    """Persist the generations the nodes reported (no state change, no event);
    None means unchanged."""

    volume: str
    generation: int | None = None
    secondary_generation: int | None = None


@dataclass(frozen=True)
class Alert:
    """Log ``message`` at ERROR: something an operator must know (data that may be lost)."""

    volume: str
    message: str


@dataclass(frozen=True)
class SaveProgress:
    """Persist resync progress the primary reported (touches no other field)."""

    volume: str
    progress: Progress


@dataclass(frozen=True)
class SetBackoff:
    """A resync attempt failed: remember the failure count and the next attempt's earliest time."""

    volume: str
    failures: int
    not_before: float
    delay_s: float


@dataclass(frozen=True)
class ClearBackoff:
    """The pair is in sync: forget its resync failures."""

    volume: str


@dataclass(frozen=True)
class ProbeHealth:
    """Ask ``address`` (the secondary of ``volume``) directly whether it serves,
    and call ``decide`` again with the answer in ``healthy``. Heartbeats are up
    to ``node_timeout_s`` stale: a secondary killed a moment ago still looks alive."""

    volume: str
    address: str


@dataclass(frozen=True)
class StartResync:
    """Call ``NodeService.StartResync(volume, epoch)`` on ``primary`` (after the
    ``ChangePair`` that issued ``epoch`` is persisted), with ``extra_extents``
    (the pair's failed extents: they include a demoted primary's divergent
    ones) and ``full_copy`` (the secondary holds no data)."""

    volume: str
    primary: str
    epoch: int
    extra_extents: tuple[Extent, ...] = ()
    full_copy: bool = False


@dataclass(frozen=True)
class CreatePair:
    """Persist a new pair (in sync at epoch 1, with its data identity) and its creation event."""

    spec: VolumeSpec
    reason: str
    volume_uuid: str = ""
    generation: int = 0


@dataclass(frozen=True)
class DeletePair:
    """Delete a pair and record why."""

    volume: str
    reason: str


@dataclass(frozen=True)
class PushAssignment:
    """Call ``NodeService.AssignVolume`` on ``address``; on failure, ask ``on_push_failed``
    (CreateVolume) or leave it to the heartbeats (promotion). ``create``: the
    node creates the store (CreateVolume only)."""

    volume: str
    address: str
    create: bool = False


@dataclass(frozen=True)
class ResizePair:
    """Persist the pair's new size and its event (``resized``) in one
    transaction (after both nodes grew: ``plan_resize``)."""

    volume: str
    size_bytes: int
    reason: str


Command: TypeAlias = (
    NodeSilent
    | ChangePair
    | SaveGenerations
    | Alert
    | SaveProgress
    | SetBackoff
    | ClearBackoff
    | ProbeHealth
    | StartResync
    | CreatePair
    | DeletePair
    | PushAssignment
    | ResizePair
)


# ---------------------------------------------------------------- validators


def validate_config(
    heartbeat_interval_s: float,
    node_timeout_s: float,
    default_resync_mode: int,
    *,
    lease_s: float = 4.0,
    lease_drift_s: float = 0.5,
) -> str | None:
    """None if the coordinator's settings make sense, else what is wrong."""
    if not lease_s > 0 or not lease_drift_s > 0:
        return (
            f"lease_s ({lease_s}) and lease_drift_s ({lease_drift_s}) must be > 0: a primary writes "
            "alone only under a lease, and the coordinator promotes only after it certainly expired"
        )
    if heartbeat_interval_s <= 0 or node_timeout_s <= 0:
        return (
            f"heartbeat_interval_s ({heartbeat_interval_s}) and node_timeout_s ({node_timeout_s}) must be > 0"
        )
    if node_timeout_s <= heartbeat_interval_s:
        return (
            f"node_timeout_s ({node_timeout_s}) must be larger than heartbeat_interval_s "
            f"({heartbeat_interval_s}), or every node is declared dead between two heartbeats"
        )
    if default_resync_mode not in _RESYNC_MODE_NAMES:
        return f"default_resync_mode {default_resync_mode} must be RESYNC_MODE_REWRITE (1) or RESYNC_MODE_DIRECT (2)"
    return None


def validate_register(address: str, role_hint: str) -> Problem | None:
    """RegisterNode's arguments."""
    if not address:
        return Problem(Code.INVALID_ARGUMENT, "RegisterNode: address is required (host:port)")
    problem = validate_dial_address(address)
    if problem:
        return Problem(Code.INVALID_ARGUMENT, f"RegisterNode: {problem}")
    if role_hint not in ROLE_HINTS:
        return Problem(
            Code.INVALID_ARGUMENT,
            f"RegisterNode: role_hint {role_hint!r} must be 'primary', 'secondary' or empty",
        )
    return None


def volume_spec(args: CreateVolumeArgs, default_resync_mode: int) -> VolumeSpec:
    """``args`` with the defaults filled in (not validated: see ``validate_create_volume``)."""
    return VolumeSpec(
        name=args.name,
        size_bytes=args.size_bytes,
        block_size=args.block_size or DEFAULT_BLOCK_SIZE,
        primary=args.primary,
        secondary=args.secondary,
        resync_mode=args.resync_mode or default_resync_mode,
        auto_failover=args.auto_failover,
    )


def validate_create_volume(
    args: CreateVolumeArgs,
    *,
    default_resync_mode: int,
    registered: Collection[str],
    existing: Mapping[str, PairView],
    coordinator_address: str = "",
) -> Problem | None:
    """CreateVolume's arguments, in this order: name, size, block size, resync
    mode, addresses, the nodes registered, the name free."""
    spec = volume_spec(args, default_resync_mode)
    name, size, block_size = spec.name, spec.size_bytes, spec.block_size
    if not VOLUME_NAME_RE.fullmatch(name):
        return Problem(
            Code.INVALID_ARGUMENT,
            f"volume name {name!r} is invalid: use 1-64 characters from A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit",
        )
    if size == 0:
        return Problem(Code.INVALID_ARGUMENT, "size_bytes must be > 0")
    if block_size & (block_size - 1):
        return Problem(
            Code.INVALID_ARGUMENT,
            f"block_size {block_size} is not a power of two (allowed: {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE})",
        )
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        return Problem(
            Code.OUT_OF_RANGE,
            f"block_size {block_size} is outside the allowed range {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE}",
        )
    if size % block_size:
        return Problem(
            Code.INVALID_ARGUMENT,
            f"size_bytes {size} is not a multiple of block_size {block_size} "
            f"(nearest: {size // block_size * block_size} or {(size // block_size + 1) * block_size})",
        )
    if size // block_size > MAX_BLOCKS:
        return Problem(
            Code.OUT_OF_RANGE,
            f"size_bytes {size} is {size // block_size} blocks of {block_size} bytes; the limit is "
            f"{MAX_BLOCKS} blocks ({MAX_BLOCKS * block_size} bytes at this block size)",
        )
    if spec.resync_mode not in _RESYNC_MODE_NAMES:
        return Problem(
            Code.INVALID_ARGUMENT,
            f"resync_mode {args.resync_mode} is not RESYNC_MODE_REWRITE (1) or RESYNC_MODE_DIRECT (2)",
        )
    for role, addr in (("primary", spec.primary), ("secondary", spec.secondary)):
        problem = validate_dial_address(addr)
        if problem:
            return Problem(Code.INVALID_ARGUMENT, f"{role}: {problem}")
    if spec.primary == spec.secondary:
        return Problem(
            Code.INVALID_ARGUMENT,
            f"primary and secondary are the same node ({spec.primary}); a pair needs two nodes",
        )
    for role, addr in (("primary", spec.primary), ("secondary", spec.secondary)):
        if addr not in registered:
            coord = coordinator_address or "<this coordinator's address>"
            return Problem(
                Code.FAILED_PRECONDITION,
                f"node {addr} is not registered with this coordinator; start it with "
                f"`syncrep {role} --coordinator {coord} --listen {addr} --data-dir DIR` "
                f"(or with --advertise {addr} if it listens on another address)",
            )
    if name in existing:
        other = existing[name]
        return Problem(
            Code.ALREADY_EXISTS,
            f"volume {name!r} already exists (primary {other.primary}, secondary {other.secondary})",
        )
    return None


def not_found(name: str, known: Iterable[str]) -> Problem:
    names = ", ".join(sorted(known)[:10]) or "none"
    return Problem(Code.NOT_FOUND, f"volume {name!r} not found (volumes: {names})")


def _check_in_volume(pair: PairView, what: str, items: Iterable[Nack | tuple[int, int]]) -> Problem | None:
    for item in items:
        ext = to_extent(item)
        if ext.end > pair.size_bytes:
            return Problem(
                Code.INVALID_ARGUMENT,
                f"{what} extent offset={ext.offset} length={ext.length} ends at {ext.end}, beyond "
                f"the end of volume {pair.name!r} ({pair.size_bytes} bytes)",
            )
    return None


def validate_report(pair: PairView, report: ReplicationReport) -> Problem | None:
    """A ReplicationReport on ``pair``: from its primary, at its epoch, a known
    state; a degraded report's extents within the volume."""
    if report.reporter != pair.primary:
        return Problem(
            Code.PERMISSION_DENIED,
            f"node {report.reporter or '(no reporter)'} is not the primary of volume {pair.name!r} "
            f"(the primary is {pair.primary}); only the primary reports replication state",
        )
    if report.epoch < pair.epoch:
        return Problem(
            Code.FAILED_PRECONDITION,
            f"stale epoch: report for volume {pair.name!r} carries epoch {report.epoch}, "
            f"the pair is at epoch {pair.epoch} (a newer resync was started; the primary must "
            "fence off its old stream and follow StartResync / its heartbeat assignments)",
        )
    if report.epoch > pair.epoch:
        return Problem(
            Code.FAILED_PRECONDITION,
            f"epoch {report.epoch} was never issued for volume {pair.name!r}; the pair is at epoch {pair.epoch}",
        )
    try:
        state = PairState.from_proto(report.state)
    except ValueError as e:
        return Problem(Code.INVALID_ARGUMENT, f"ReportReplication: {e}")
    if state is PairState.DEGRADED:
        for what, items in (
            ("nack", report.nacks),
            ("unacked write", report.unacked),
            ("failed", report.failed_extents),
        ):
            problem = _check_in_volume(pair, what, items)
            if problem:
                return problem
    return None


# ---------------------------------------------------------------- backoff and state changes


def resync_backoff_s(failures: int, *, initial_s: float, max_s: float, jitter_s: float = 0.0) -> float:
    """The wait before the next resync attempt after ``failures`` failures:
    ``initial_s * 2**(failures - 1) + jitter_s``, capped at ``max_s`` (the
    exponential backoff with jitter of tenacity's ``wait_exponential_jitter``,
    with the random part passed in)."""
    exp = initial_s * 2.0 ** min(max(failures, 1) - 1, 1023)
    return max(0.0, min(exp + jitter_s, max_s))


def _change(
    pair: PairView,
    event: PairEvent,
    reason: str,
    *,
    book: Backoff,
    now: float,
    policy: Policy,
    jitter: float,
    epoch: int | None = None,
    failed_extents: tuple[Extent, ...] | None = None,
    fault_snapshot_id: int | None = None,
    last_error: str | None = None,
    progress: Progress | None = None,
    progress_reported: bool = False,
    primary: str | None = None,
    secondary: str | None = None,
    generation: int | None = None,
    secondary_generation: int | None = None,
    full_copy_pending: bool | None = None,
    revert_generation: int | None = None,
) -> list[Command]:
    """``event`` on ``pair`` (IllegalTransition if the table has no entry), with
    what follows from it: a resync that fell back to degraded backs off, a pair
    in sync forgets its failures."""
    to_state = transition(pair.state, event)
    cmds: list[Command] = [
        ChangePair(
            volume=pair.name,
            event=event,
            from_state=pair.state,
            to_state=to_state,
            reason=reason,
            epoch=pair.epoch if epoch is None else epoch,
            failed_extents=failed_extents,
            fault_snapshot_id=fault_snapshot_id,
            last_error=last_error,
            progress=progress,
            progress_reported=progress_reported,
            primary=primary,
            secondary=secondary,
            generation=generation,
            secondary_generation=secondary_generation,
            full_copy_pending=full_copy_pending,
            revert_generation=revert_generation,
        )
    ]
    if event is PairEvent.PROMOTED:
        # A new primary: the old one's resync failures say nothing about it.
        cmds.append(ClearBackoff(pair.name))
        return cmds
    if pair.state is PairState.RESYNCING and to_state is PairState.DEGRADED:
        failures = book.failures + 1
        delay = resync_backoff_s(
            failures,
            initial_s=policy.resync_retry_initial_s,
            max_s=policy.resync_retry_max_s,
            jitter_s=jitter * policy.resync_retry_initial_s,
        )
        cmds.append(SetBackoff(pair.name, failures, now + delay, delay))
    if to_state is PairState.IN_SYNC:
        cmds.append(ClearBackoff(pair.name))
    return cmds


def _proto_state_name(state: PairState | None) -> str:
    return "PAIR_STATE_UNSPECIFIED" if state is None else f"PAIR_STATE_{state.name}"


# ---------------------------------------------------------------- the tick


@dataclass(frozen=True)
class LeaseGrant:
    """A lease for the primary of ``volume`` (``syncrep.v1.Lease``): the pair's
    persisted state and the primary's generation as the coordinator knows them."""

    volume: str
    epoch: int
    lease_s: float
    state: PairState
    generation: int


def lease_remaining_s(
    volume: str, granted_at: Mapping[str, float], now: float, *, policy: Policy, started_at: float
) -> float:
    """Seconds until the lease of ``volume``'s current primary has certainly
    expired (<= 0: it has): ``granted_at + lease_s + lease_drift_s - now``.
    With no grant recorded (since this coordinator started), a grant at
    ``started_at`` is assumed: one granted just before a restart may still run."""
    t = max(granted_at.get(volume, started_at), started_at)
    return t + policy.lease_s + policy.lease_drift_s - now


def leases_for(
    address: str, pairs: Iterable[PairView], reports: Mapping[str, Report], *, policy: Policy
) -> list[LeaseGrant]:
    """The leases for ``address``: one per volume whose primary it is and that
    it reports (``reports``: its reports of this request, by volume) with data.
    The shell grants them only after it persisted what it decided for the
    same request (a lease's state must be durable) and records each grant
    when it replies."""
    grants: list[LeaseGrant] = []
    for pair in sorted(pairs, key=lambda p: p.name):
        report = reports.get(pair.name)
        if pair.primary != address or report is None or not report.has_data:
            continue
        grants.append(LeaseGrant(pair.name, pair.epoch, policy.lease_s, pair.state, pair.generation))
    return grants


def on_identity(pair: PairView | None, reporter: str, report: Report) -> list[Command]:
    """Persist the generation a node of ``pair`` reports when it changed: the
    primary's (only with data) or the secondary's (0 while it has no data).
    A store of another volume UUID is not this pair's data: ignored."""
    ident = report.identity
    if pair is None or (ident is None and not report.data_missing):
        return []
    if ident is not None and pair.volume_uuid and ident.volume_uuid and ident.volume_uuid != pair.volume_uuid:
        return []
    current = 0 if report.data_missing or ident is None else ident.current
    if reporter == pair.primary:
        if current and current != pair.generation:
            return [SaveGenerations(pair.name, generation=current)]
    elif reporter == pair.secondary and current != pair.secondary_generation:
        return [SaveGenerations(pair.name, secondary_generation=current)]
    return []


# ---------------------------------------------------------------- promotion


def _secondary_unfit(
    pair: PairView, liveness: Liveness, reports: Mapping[tuple[str, str], Report], now: float, policy: Policy
) -> str | None:
    """None if the secondary of ``pair`` can take over (alive, with data of the pair), else why not."""
    sec = pair.secondary
    if not liveness.alive(sec, now, policy.node_timeout_s):
        return (
            f"secondary {sec} is not alive (silent for {liveness.silent_for(sec, now):.1f} s, "
            f"node_timeout_s={policy.node_timeout_s}); start it first"
        )
    report = reports.get((sec, pair.name))
    if report is None:
        return f"secondary {sec} has not reported the volume yet; wait for its next heartbeat"
    if report.data_missing:
        return f"secondary {sec} has no data of the volume ({report.data_problem or 'no store'})"
    if report.identity is None:
        return f"secondary {sec} has not reported its data identity yet; wait for its next heartbeat"
    if not report.identity.has_data:
        return f"secondary {sec} holds no data of the pair yet (it is being rebuilt by a full copy)"
    if pair.volume_uuid and report.identity.volume_uuid != pair.volume_uuid:
        return (
            f"secondary {sec}'s store belongs to volume UUID {report.identity.volume_uuid}, "
            f"not the pair's {pair.volume_uuid}"
        )
    return None


def _lacks(pair: PairView, reports: Mapping[tuple[str, str], Report]) -> str:
    """What the secondary lacks, as far as the coordinator knows."""
    failed = sum(e.length for e in pair.failed_extents)
    text = f"the writes in {len(pair.failed_extents)} failed extents ({failed} bytes)"
    report = reports.get((pair.primary, pair.name))
    if report is not None and report.out_of_sync_bytes:
        text += f"; the primary last reported {report.out_of_sync_bytes} bytes out of sync"
    return text + ", and whatever the primary wrote alone since it last reported"


def _primary_has_no_data(
    pair: PairView, liveness: Liveness, reports: Mapping[tuple[str, str], Report], now: float, policy: Policy
) -> Report | None:
    """The primary's report if it is alive and says it has no data (its current
    process serves nothing), else None."""
    report = reports.get((pair.primary, pair.name))
    if report is None or not liveness.alive(pair.primary, now, policy.node_timeout_s) or not report.no_data:
        return None
    return report


def _promote(
    pair: PairView,
    reports: Mapping[tuple[str, str], Report],
    why: str,
    *,
    forced: str,
    now: float,
    policy: Policy,
) -> list[Command]:
    """The promotion of ``pair``'s secondary (already checked): a new epoch, the
    roles swapped, degraded (the new primary writes alone), then its assignment."""
    old, new = pair.primary, pair.secondary
    epoch = pair.epoch + 1
    sec = reports[(new, pair.name)].identity
    reason = f"promoted {new} to primary at epoch {epoch} (old primary {old}): {why}" + (
        f" (forced: {forced})" if forced else ""
    )
    cmds = _change(
        pair,
        PairEvent.PROMOTED,
        reason,
        book=Backoff(),
        now=now,
        policy=policy,
        jitter=0.0,
        epoch=epoch,
        primary=new,
        secondary=old,
        failed_extents=(),
        fault_snapshot_id=0,
        last_error=reason,
        progress=Progress(),
        generation=sec.current if sec is not None else pair.secondary_generation,
        secondary_generation=pair.generation,
        full_copy_pending=False,
        # In sync, the coordinator granted the old primary no lease that let it
        # write alone, so any generation it minted after this one (it went
        # degraded on its own, isolated) acknowledged nothing: it reverts to
        # this one when demoted, instead of looking split-brained. Not after a
        # forced promote of a stale secondary: then the old primary may hold
        # acknowledged writes the new one lacks.
        revert_generation=sec.current if sec is not None and pair.state is PairState.IN_SYNC else 0,
    )
    cmds.append(PushAssignment(pair.name, new))
    return cmds


def plan_promote(
    pair: PairView,
    liveness: Liveness,
    reports: Mapping[tuple[str, str], Report],
    now: float,
    *,
    force: bool,
    policy: Policy,
    lease_granted_at: Mapping[str, float],
) -> Problem | list[Command]:
    """The Promote RPC on ``pair``: the refusal, or the promotion's commands."""
    name = pair.name
    if pair.state is PairState.SPLIT_BRAIN:
        return Problem(
            Code.FAILED_PRECONDITION,
            f"volume {name!r} is in split brain ({pair.last_error}); promoting resolves nothing: "
            "pick the surviving replica with `syncrep resolve`",
        )
    lost = _primary_has_no_data(pair, liveness, reports, now, policy)
    if lost is None:
        remaining = lease_remaining_s(
            name, lease_granted_at, now, policy=policy, started_at=liveness.started_at
        )
        if remaining > 0:
            return Problem(
                Code.FAILED_PRECONDITION,
                f"volume {name!r}: primary {pair.primary} may still be writing: its lease runs "
                f"{remaining:.1f} s more; retry after that",
            )
    unfit = _secondary_unfit(pair, liveness, reports, now, policy)
    if unfit:
        return Problem(Code.FAILED_PRECONDITION, f"volume {name!r}: cannot promote: {unfit}")
    forced = ""
    if pair.state is PairState.RESYNCING:
        if not force:
            return Problem(
                Code.FAILED_PRECONDITION,
                f"volume {name!r} is resyncing at epoch {pair.epoch}: secondary {pair.secondary} is not "
                f"current. `--force` promotes the secondary's pre-resync rollback point, losing "
                f"{_lacks(pair, reports)}",
            )
        forced = f"mid-resync: the secondary's pre-resync rollback point; lost: {_lacks(pair, reports)}"
    elif pair.state is PairState.DEGRADED:
        if not force:
            return Problem(
                Code.FAILED_PRECONDITION,
                f"volume {name!r} is degraded: secondary {pair.secondary} is not current; it lacks "
                f"{_lacks(pair, reports)}. `--force` promotes it anyway and loses those writes",
            )
        forced = f"the secondary was not current; lost: {_lacks(pair, reports)}"
    why = "operator request"
    if lost is not None:
        why += f"; primary {pair.primary} has no data ({lost.data_problem or 'empty store'})"
    return _promote(pair, reports, why, forced=forced, now=now, policy=policy)


# ---------------------------------------------------------------- switchover (docs/FAILOVER.md section 5)


@dataclass(frozen=True)
class Handover:
    """The old primary's PrepareHandover answer: its gate is closed, every
    write up to ``acked_seq`` is on both replicas, at ``epoch`` and ``identity``."""

    address: str
    epoch: int
    acked_seq: int
    identity: Identity | None
    drain_s: float = 0.0


_NOT_IN_SYNC_ADVICE: Final = {
    PairState.DEGRADED: (
        "wait for the resync that brings the secondary up to date (`syncrep status` shows it), then retry; "
        "to make the secondary primary now, losing what it lacks, use `syncrep promote --force`"
    ),
    PairState.RESYNCING: "wait for the resync to complete (`syncrep status` shows its progress), then retry",
    PairState.SPLIT_BRAIN: "resolve the split brain first (`syncrep resolve`)",
}


def switchover_refusal(
    pair: PairView,
    liveness: Liveness,
    reports: Mapping[tuple[str, str], Report],
    now: float,
    *,
    policy: Policy,
) -> Problem | None:
    """Why ``pair`` cannot switch over now (None: it can). A switchover loses
    no write only when the secondary holds all of them: the pair is in sync,
    both nodes are alive, apply the current assignment and report the same
    generation of the pair's data."""
    name = pair.name
    if pair.state is not PairState.IN_SYNC:
        return Problem(
            Code.FAILED_PRECONDITION,
            f"volume {name!r} is {pair.state.value} at epoch {pair.epoch}, not in sync: a switchover swaps the "
            f"roles only when the secondary has every write; {_NOT_IN_SYNC_ADVICE[pair.state]}",
        )
    timeout = policy.node_timeout_s
    idents: list[Identity] = []
    for role, address in (("primary", pair.primary), ("secondary", pair.secondary)):
        if not liveness.alive(address, now, timeout):
            what = (
                "start it, then retry; if it is down for good, `syncrep promote` makes the secondary primary"
                if role == "primary"
                else "start it, then retry"
            )
            return Problem(
                Code.FAILED_PRECONDITION,
                f"volume {name!r}: {role} {address} is not alive (silent for "
                f"{liveness.silent_for(address, now):.1f} s, node_timeout_s={timeout}); a switchover needs both "
                f"nodes; {what}",
            )
        r = reports.get((address, name))
        if r is None:
            return Problem(
                Code.FAILED_PRECONDITION,
                f"volume {name!r}: {role} {address} has not reported the volume yet; retry after its next "
                "heartbeat",
            )
        if r.epoch != pair.epoch or (r.role and r.role != role):
            return Problem(
                Code.FAILED_PRECONDITION,
                f"volume {name!r}: {role} {address} reports epoch {r.epoch} as {r.role or 'unknown role'}, the "
                f"pair is at epoch {pair.epoch}: it has not applied its assignment yet; retry in a moment",
            )
        if not r.has_data or r.identity is None:
            return Problem(
                Code.FAILED_PRECONDITION,
                f"volume {name!r}: {role} {address} reports no data of the pair "
                f"({r.data_problem or 'no data identity reported'})",
            )
        if role == "primary" and r.state is not PairState.IN_SYNC:
            return Problem(
                Code.FAILED_PRECONDITION,
                f"volume {name!r}: primary {address} reports the pair "
                f"{r.state.value if r.state else 'in an unknown state'}"
                f"{': ' + r.last_error if r.last_error else ''}; the coordinator has not recorded it yet. "
                f"{_NOT_IN_SYNC_ADVICE[PairState.DEGRADED]}",
            )
        idents.append(r.identity)
    prim, sec = idents
    if prim.volume_uuid != sec.volume_uuid or prim.current != sec.current:
        return Problem(
            Code.FAILED_PRECONDITION,
            f"volume {name!r}: primary {pair.primary} holds generation {prim.short()}, secondary "
            f"{pair.secondary} {sec.short()}: not the same data, so a switchover could lose writes; wait for "
            "the resync, then retry",
        )
    return None


def plan_switchover(
    pair: PairView,
    liveness: Liveness,
    reports: Mapping[tuple[str, str], Report],
    now: float,
    handover: Handover,
    *,
    policy: Policy,
) -> Problem | list[Command]:
    """The swap, once the old primary answered PrepareHandover (its gate is
    closed, drained): checked again on the pair as it is now; then a new
    epoch, the roles swapped, still in sync at the same generation (no
    revert, no resync), and the assignments: the old primary first (it stops
    its write path and becomes the secondary at the new epoch, so it accepts
    the new primary's stream), then the new primary (it starts in sync)."""
    problem = switchover_refusal(pair, liveness, reports, now, policy=policy)
    if problem is not None:
        return problem
    name = pair.name
    if handover.address != pair.primary or handover.epoch != pair.epoch:
        return Problem(
            Code.FAILED_PRECONDITION,
            f"volume {name!r} moved on during the handover (primary {pair.primary} at epoch {pair.epoch}; the "
            f"handover was {handover.address} at epoch {handover.epoch}); nothing was swapped, retry",
        )
    sec = reports[(pair.secondary, name)].identity
    if handover.identity is None or sec is None or handover.identity.current != sec.current:
        got = handover.identity.short() if handover.identity is not None else "none"
        return Problem(
            Code.FAILED_PRECONDITION,
            f"volume {name!r}: primary {pair.primary} handed over at generation {got}, secondary "
            f"{pair.secondary} reports {sec.short() if sec is not None else 'none'}; nothing was swapped (the "
            "primary reopens its gate), retry",
        )
    old, new = pair.primary, pair.secondary
    epoch = pair.epoch + 1
    reason = (
        f"switched over: {new} is primary at epoch {epoch}, {old} secondary (operator request; {old} drained "
        f"up to seq {handover.acked_seq} in {handover.drain_s:.3f} s; both at generation "
        f"{handover.identity.short()}, no write lost, no resync)"
    )
    cmds = _change(
        pair,
        PairEvent.SWITCHED_OVER,
        reason,
        book=Backoff(),
        now=now,
        policy=policy,
        jitter=0.0,
        epoch=epoch,
        primary=new,
        secondary=old,
        failed_extents=(),
        fault_snapshot_id=0,
        last_error="",
        generation=handover.identity.current,
        secondary_generation=handover.identity.current,
        full_copy_pending=False,
        # As after an unforced promotion (plan_auto_failover): the pair is in
        # sync, so no lease let the old primary write alone, and a generation
        # it mints after this one acknowledged nothing. That happens when this
        # record commits but its answer is lost (a leader cut from etcd): the
        # old primary's gate reopens, the next leader pushes the swap without
        # the handover, the old primary goes degraded as its stream is
        # superseded, and is demoted the ordinary way. It then reverts to the
        # shared generation instead of looking split-brained (simulator
        # --coordinators 3 seeds 944, 1688, 3029, 3051). After a clean
        # handover its generation is this one already: no-op.
        revert_generation=handover.identity.current,
    )
    cmds += [PushAssignment(name, old), PushAssignment(name, new)]
    return cmds


# ---------------------------------------------------------------- resolve (docs/FAILOVER.md section 6)


@dataclass(frozen=True)
class ResolvePlan:
    """``syncrep resolve`` on a split-brained pair, decided: the pair record
    change (persist first), the assignments (the discarded replica's first),
    and what the discarded replica loses as the reports know it now.

    ``hold``: the address whose (primary) assignment the shell keeps out of
    heartbeat replies until the discarded old primary applied its demotion or
    its lease certainly expired ("" = none): two nodes never write at once."""

    commands: list[Command]
    kept: str
    discarded: str
    common: int
    #: What the discarded replica wrote since the common generation, as reported.
    discarded_extents: tuple[Extent, ...]
    #: True when that is final: the discarded replica is the secondary (it
    #: takes no writes in split brain); a primary may write until it is fenced.
    exact: bool
    #: What the kept replica changed since then (an upper bound, from its report).
    kept_changed_bytes: int
    primary: str
    secondary: str
    #: The snapshot on the discarded replica that keeps its state.
    snapshot: str = ""
    hold: str = ""
    #: Not exact: the discarded primary's out-of-sync bytes so far (an upper
    #: bound of what it wrote alone; its extents are known once it is fenced).
    discarded_bytes_estimate: int = 0


def discard_snapshot_name(epoch: int, generation: int) -> str:
    """The snapshot that keeps a discarded replica's state: the resolve's epoch
    and the generation it discards, so an operator can tell several apart."""
    return f"split-brain-discarded-e{epoch}-{generation:016x}"


def split_brain_figures(
    pair: PairView, reports: Mapping[tuple[str, str], Report]
) -> tuple[int, int, int] | None:
    """In split brain, from the latest reports: (the primary's changed bytes
    since the common generation (an upper bound), the secondary's (its
    divergent extents), the common generation); None when not known."""
    prim, sec = reports.get((pair.primary, pair.name)), reports.get((pair.secondary, pair.name))
    if prim is None or sec is None or prim.identity is None or sec.identity is None:
        return None
    rel = relate(prim.identity, sec.identity)
    if rel.relation is not Relation.SPLIT_BRAIN:
        return None
    return prim.out_of_sync_bytes, _extents_bytes(sec.divergent_extents, pair.size_bytes), rel.common


def _extents_bytes(raw: Sequence[tuple[int, int]], size_bytes: int) -> int:
    return sum(e.length for e in _valid_extents(raw, size_bytes))


def _valid_extents(raw: Sequence[tuple[int, int]], size_bytes: int) -> tuple[Extent, ...]:
    try:
        ext = [to_extent(e) for e in raw]
    except ValueError:
        return ()
    if not all(e.end <= size_bytes for e in ext):
        return ()
    return tuple(derive_failed_extents((), (), ext))


def plan_resolve(
    pair: PairView,
    liveness: Liveness,
    reports: Mapping[tuple[str, str], Report],
    now: float,
    keep: str,
    *,
    policy: Policy,
) -> Problem | ResolvePlan:
    """End ``pair``'s split brain, keeping ``keep``'s data.

    * Keep the primary: the secondary reverts to the common generation, its
      writes since (its divergent extents) kept in a snapshot there and
      resynced from the primary. Same roles, a new epoch (the secondary's
      reports of the split-brained epoch no longer count).
    * Keep the secondary: it is promoted at a new epoch (roles swapped), the
      old primary demoted, reverting to the common generation with a
      snapshot of its state; its writes since are its divergent extents at
      the demotion. The new primary's assignment is held (``hold``) until
      the old one applied its demotion or its lease certainly expired.

    Either way the pair goes ``degraded`` with the kept side's divergent
    extents added to its failed extents, and the ordinary resync (changes
    only) follows."""
    name = pair.name
    if pair.state is not PairState.SPLIT_BRAIN:
        return Problem(
            Code.FAILED_PRECONDITION,
            f"volume {name!r} is {pair.state.value} at epoch {pair.epoch}, not in split brain: nothing to resolve",
        )
    if keep not in (pair.primary, pair.secondary):
        return Problem(
            Code.INVALID_ARGUMENT,
            f"volume {name!r}: --keep {keep!r} is neither of its nodes: primary {pair.primary}, "
            f"secondary {pair.secondary} (give the advertise address `syncrep status` shows)",
        )
    timeout = policy.node_timeout_s
    idents: dict[str, Identity] = {}
    for role, address in (("primary", pair.primary), ("secondary", pair.secondary)):
        if not liveness.alive(address, now, timeout):
            return Problem(
                Code.FAILED_PRECONDITION,
                f"volume {name!r}: {role} {address} is not alive (silent for {liveness.silent_for(address, now):.1f} s); "
                "a resolve needs both nodes (the discarded one reverts and keeps a snapshot of its state): start it, "
                "then retry",
            )
        r = reports.get((address, name))
        if r is None or r.identity is None or not r.has_data:
            return Problem(
                Code.FAILED_PRECONDITION,
                f"volume {name!r}: {role} {address} has not reported data of the pair yet "
                f"({r.data_problem if r is not None and r.data_problem else 'no report'}); retry after its next heartbeat",
            )
        if r.epoch != pair.epoch or (r.role and r.role != role):
            return Problem(
                Code.FAILED_PRECONDITION,
                f"volume {name!r}: {role} {address} reports epoch {r.epoch} as {r.role or 'unknown role'}, the pair is "
                f"at epoch {pair.epoch}: it has not applied its assignment yet; retry in a moment",
            )
        idents[role] = r.identity
    rel = relate(idents["primary"], idents["secondary"])
    if rel.relation is not Relation.SPLIT_BRAIN:
        return Problem(
            Code.FAILED_PRECONDITION,
            f"volume {name!r}: primary {pair.primary} ({idents['primary'].short()}) and secondary {pair.secondary} "
            f"({idents['secondary'].short()}) are not split-brained now ({rel.relation.value}); nothing to resolve",
        )
    prim_r, sec_r = reports[(pair.primary, name)], reports[(pair.secondary, name)]
    sec_divergent = _valid_extents(sec_r.divergent_extents, pair.size_bytes)
    epoch = pair.epoch + 1
    common = rel.common
    if keep == pair.primary:
        discarded = pair.secondary
        snap = discard_snapshot_name(epoch, idents["secondary"].current)
        reason = (
            f"split brain resolved by the operator: kept primary {pair.primary} (generation "
            f"{idents['primary'].short()}); secondary {pair.secondary} reverts to the common generation "
            f"{common:016x}, its writes since ({len(sec_divergent)} extents, {sum(e.length for e in sec_divergent)} "
            f"bytes) kept in its snapshot {snap!r} and overwritten by the resync"
        )
        cmds = _change(
            pair, PairEvent.RESOLVED, reason, book=Backoff(), now=now, policy=policy, jitter=0.0, epoch=epoch,
            failed_extents=tuple(derive_failed_extents((), (), [*pair.failed_extents, *sec_divergent])),
            last_error=reason, secondary_generation=common, revert_generation=common, full_copy_pending=False,
        )
        cmds += [PushAssignment(name, pair.secondary), PushAssignment(name, pair.primary)]
        return ResolvePlan(
            cmds, kept=keep, discarded=discarded, common=common, discarded_extents=sec_divergent, exact=True,
            kept_changed_bytes=prim_r.out_of_sync_bytes, primary=pair.primary, secondary=pair.secondary,
            snapshot=snap,
        )
    # Keep the secondary: it becomes the primary; its own writes since the
    # common generation (its divergent extents) are what the old primary lacks.
    discarded = pair.primary
    snap = discard_snapshot_name(epoch, idents["primary"].current)
    reason = (
        f"split brain resolved by the operator: kept secondary {pair.secondary} (generation "
        f"{idents['secondary'].short()}), promoted to primary at epoch {epoch}; primary {pair.primary} is demoted, "
        f"reverts to the common generation {common:016x}, its writes since kept in its snapshot {snap!r} and "
        "overwritten by the resync"
    )
    cmds = _change(
        pair, PairEvent.RESOLVED, reason, book=Backoff(), now=now, policy=policy, jitter=0.0, epoch=epoch,
        primary=pair.secondary, secondary=pair.primary,
        failed_extents=tuple(derive_failed_extents((), (), [*pair.failed_extents, *sec_divergent])),
        fault_snapshot_id=0, last_error=reason, progress=Progress(), generation=idents["secondary"].current,
        secondary_generation=common, revert_generation=common, full_copy_pending=False,
    )
    cmds += [ClearBackoff(name), PushAssignment(name, pair.primary), PushAssignment(name, pair.secondary)]
    return ResolvePlan(
        cmds, kept=keep, discarded=discarded, common=common, discarded_extents=(), exact=False,
        kept_changed_bytes=sum(e.length for e in sec_divergent), primary=pair.secondary, secondary=pair.primary,
        snapshot=snap, hold=pair.secondary, discarded_bytes_estimate=prim_r.out_of_sync_bytes,
    )


def resolve_merge_discarded(
    pair: PairView, extents: Sequence[tuple[int, int]], why: str, *, now: float, policy: Policy
) -> list[Command]:
    """The discarded replica's writes since the common generation, as it
    answered its resolve assignment: added to the failed extents (the resync
    overwrites them there). Nothing if they are already there."""
    ext = _valid_extents(extents, pair.size_bytes)
    merged = tuple(derive_failed_extents((), (), [*pair.failed_extents, *ext]))
    if not ext or merged == pair.failed_extents or pair.state is not PairState.DEGRADED:
        return []
    return _change(
        pair, PairEvent.SECONDARY_FAILED, why, book=Backoff(), now=now, policy=policy, jitter=0.0,
        failed_extents=merged,
    )


def _auto_promotion(
    pair: PairView,
    liveness: Liveness,
    reports: Mapping[tuple[str, str], Report],
    now: float,
    policy: Policy,
    lease_granted_at: Mapping[str, float],
) -> list[Command] | None:
    """The promotions the tick makes by itself, or None:

    * the primary is alive but has no data (its process serves nothing) and
      the secondary has data of the pair: at once, in any state but split
      brain (what may be lost is logged at ERROR);
    * auto-failover: the pair is in sync, the primary silent past
      ``node_timeout_s`` and its lease certainly expired."""
    if not is_legal(pair.state, PairEvent.PROMOTED):
        return None
    if _secondary_unfit(pair, liveness, reports, now, policy):
        return None
    lost = _primary_has_no_data(pair, liveness, reports, now, policy)
    if lost is not None:
        why = (
            f"primary {pair.primary} has no data of the pair ({lost.data_problem or 'empty store'}) and "
            f"serves nothing; it will be rebuilt as the secondary by a full copy"
        )
        if pair.state is PairState.IN_SYNC:
            return _promote(pair, reports, why, forced="", now=now, policy=policy)
        loss = f"the pair was {pair.state.value}: {_lacks(pair, reports)}"
        return [
            Alert(
                pair.name,
                f"volume {pair.name!r}: promoting secondary {pair.secondary} because primary "
                f"{pair.primary} lost its data, although {loss}; those writes are lost",
            ),
            *_promote(pair, reports, why, forced=loss, now=now, policy=policy),
        ]
    if not pair.auto_failover or pair.state is not PairState.IN_SYNC:
        return None
    silent = liveness.silent_for(pair.primary, now)
    if silent <= policy.node_timeout_s:
        return None
    remaining = lease_remaining_s(
        pair.name, lease_granted_at, now, policy=policy, started_at=liveness.started_at
    )
    if remaining > 0:
        return None
    why = (
        f"auto-failover: primary {pair.primary} silent for {silent:.1f} s (node_timeout_s="
        f"{policy.node_timeout_s}), its lease expired {-remaining:.1f} s ago; secondary "
        f"{pair.secondary} in sync"
    )
    return _promote(pair, reports, why, forced="", now=now, policy=policy)


# ---------------------------------------------------------------- the tick


def _resync_source(primary: Report, secondary: Report, pair: PairView) -> tuple[bool, str | None]:
    """(full copy?, None) if the primary's data may overwrite the secondary's,
    else (False, why not). Decided by the identities (``relate``)."""
    if primary.identity is None or secondary.identity is None:
        return False, "waiting for both replicas to report their data identity"
    rel = relate(primary.identity, secondary.identity)
    p, s = primary.identity.short(), secondary.identity.short()
    if rel.relation in (Relation.SAME, Relation.LOCAL_NEWER):
        return False, None
    if rel.relation is Relation.PEER_EMPTY:
        return True, None
    if rel.relation is Relation.SPLIT_BRAIN:
        return False, _split_brain_text(pair, primary.identity, secondary.identity, rel.common)
    if rel.relation is Relation.LOCAL_EMPTY:
        return False, f"primary {pair.primary} holds no data of the pair; it is never a resync source"
    if rel.relation is Relation.PEER_NEWER:
        return False, (
            f"secondary {pair.secondary} (generation {s}) is newer than primary {pair.primary} ({p}); "
            "a resync would overwrite its writes; resolve it with `syncrep resolve`"
        )
    return False, (
        f"primary {pair.primary} ({p}) and secondary {pair.secondary} ({s}) share no generation; "
        "a resync could overwrite data of another lineage; resolve it with `syncrep resolve`"
    )


def _split_brain_text(pair: PairView, primary: Identity, secondary: Identity, common: int) -> str:
    return (
        f"split brain: primary {pair.primary} at generation {primary.short()} and secondary "
        f"{pair.secondary} at generation {secondary.short()} both moved on from their common "
        f"generation {common:016x}; nothing is resynced automatically: pick the surviving replica "
        "with `syncrep resolve`"
    )


def resync_blocker(
    pair: PairView,
    liveness: Liveness,
    reports: Mapping[tuple[str, str], Report],
    now: float,
    *,
    policy: Policy,
    backoff: Backoff = Backoff(),
    in_flight: Collection[str] = (),
) -> str | None:
    """None if a resync of ``pair`` may start now (after a health probe of its
    secondary), else why not."""
    timeout = policy.node_timeout_s
    if pair.state is not PairState.DEGRADED:
        return f"state is {pair.state.value}"
    if pair.name in in_flight:
        return "a StartResync call is in flight"
    if not liveness.alive(pair.primary, now, timeout):
        return f"primary {pair.primary} is not alive"
    if not liveness.alive(pair.secondary, now, timeout):
        return f"secondary {pair.secondary} is not alive"
    report = reports.get((pair.primary, pair.name))
    if report is None:
        return f"no heartbeat report for the volume from primary {pair.primary} yet"
    if report.state is not PairState.DEGRADED:
        return f"primary reports {_proto_state_name(report.state)}, not DEGRADED"
    if report.fault_snapshot_id == 0:
        return "primary reports no fault-recovery snapshot yet"
    if report.epoch > pair.epoch:
        return f"primary reports epoch {report.epoch} > the pair's {pair.epoch}"
    sec = reports.get((pair.secondary, pair.name))
    if sec is None:
        return f"no heartbeat report for the volume from secondary {pair.secondary} yet"
    if sec.data_missing:
        return (
            f"secondary {pair.secondary} has no data of the pair ({sec.data_problem or 'no store'}); "
            "waiting for it to be rebuilt as an empty store"
        )
    if sec.role == "primary":
        return (
            f"secondary {pair.secondary} still reports itself primary; waiting for it to take its assignment"
        )
    _, why = _resync_source(report, sec, pair)
    if why:
        return why
    if now < backoff.not_before:
        return f"backing off for {backoff.not_before - now:.1f} s more"
    return None


def _secondary_changes(
    pair: PairView,
    liveness: Liveness,
    reports: Mapping[tuple[str, str], Report],
    now: float,
    *,
    policy: Policy,
    book: Backoff,
    jitter: float,
) -> list[Command]:
    """What the secondary's report changes in a pair that is not resyncing:
    it has no data (rebuild, full copy), its divergent extents (merged into the
    failed extents), split brain."""
    if not liveness.alive(pair.secondary, now, policy.node_timeout_s):
        return []
    sec = reports.get((pair.secondary, pair.name))
    if sec is None:
        return []
    if sec.data_missing and (pair.state is PairState.IN_SYNC or not pair.full_copy_pending):
        if pair.state not in (PairState.IN_SYNC, PairState.DEGRADED):
            return []
        reason = (
            f"secondary {pair.secondary} has no data of the pair ({sec.data_problem or 'no store'}): "
            "rebuilding it by a full copy"
        )
        return _change(
            pair,
            PairEvent.SECONDARY_FAILED,
            reason,
            book=book,
            now=now,
            policy=policy,
            jitter=jitter,
            last_error=reason,
            full_copy_pending=True,
        )
    if pair.state is not PairState.DEGRADED:
        return []
    if sec.divergent_extents and sec.role != "primary":
        try:
            divergent = [to_extent(e) for e in sec.divergent_extents]
        except ValueError:
            divergent = []
        if divergent and all(e.end <= pair.size_bytes for e in divergent):
            merged = tuple(derive_failed_extents((), (), [*pair.failed_extents, *divergent]))
            if merged != pair.failed_extents:
                total = sum(e.length for e in divergent)
                reason = (
                    f"secondary {pair.secondary} reports {len(divergent)} divergent extents ({total} bytes) "
                    "from when it was primary: added to the failed extents (resynced from the primary)"
                )
                return _change(
                    pair,
                    PairEvent.SECONDARY_FAILED,
                    reason,
                    book=book,
                    now=now,
                    policy=policy,
                    jitter=jitter,
                    failed_extents=merged,
                )
    prim = reports.get((pair.primary, pair.name))
    if (
        prim is not None
        and liveness.alive(pair.primary, now, policy.node_timeout_s)
        # Only reports of the current assignment: a returning old primary's
        # first heartbeat still shows its own generation, before its demotion
        # (which may revert it) has been applied.
        and prim.role != "secondary"
        and sec.role != "primary"
        and prim.epoch == pair.epoch
        and sec.epoch == pair.epoch
        and prim.has_data
        and sec.has_data
        and prim.identity is not None
        and sec.identity is not None
    ):
        rel = relate(prim.identity, sec.identity)
        if rel.relation is Relation.SPLIT_BRAIN:
            text = _split_brain_text(pair, prim.identity, sec.identity, rel.common)
            return _change(
                pair,
                PairEvent.SPLIT_BRAIN_DETECTED,
                text,
                book=book,
                now=now,
                policy=policy,
                jitter=jitter,
                last_error=text,
            )
    return []


def decide(
    pairs: Iterable[PairView],
    liveness: Liveness,
    reports: Mapping[tuple[str, str], Report],
    now: float,
    *,
    policy: Policy,
    backoff: Mapping[str, Backoff] | None = None,
    in_flight: Collection[str] = (),
    healthy: Mapping[str, bool] | None = None,
    jitter: float = 0.0,
    lease_granted_at: Mapping[str, float] | None = None,
) -> list[Command]:
    """What the coordinator must do now, given

    * ``pairs``: the pair records;
    * ``liveness``: when it last heard from each node;
    * ``reports``: the nodes' latest heartbeat reports, by (node address, volume);
    * ``now``: the coordinator's (monotonic) clock;
    * ``policy``: its settings; ``backoff``: the resync driver's memory per
      pair; ``in_flight``: the volumes with a StartResync call in flight;
    * ``healthy``: the answers to this round's ``ProbeHealth`` commands, by
      address (a pair ready for a resync whose secondary has no answer here
      gets a ``ProbeHealth``; one that answered False waits);
    * ``jitter``: a random number in [0, 1) for the backoff's jitter;
    * ``lease_granted_at``: when the current primary's lease was last granted,
      by volume (the coordinator's clock).

    Per pair, the first that applies: a promotion (the primary lost its data;
    auto-failover); a resyncing pair whose secondary went silent goes
    degraded; the secondary's report (no data: rebuild; divergent extents;
    split brain); a resync.
    """
    backoff = backoff or {}
    healthy = healthy or {}
    granted = lease_granted_at or {}
    timeout = policy.node_timeout_s
    cmds: list[Command] = []
    for address in sorted(liveness.nodes):
        if address in liveness.reported_silent:
            continue
        silent = liveness.silent_for(address, now)
        if silent > timeout:
            cmds.append(NodeSilent(address, silent, heard_before=address in liveness.last_heard))
    for pair in sorted(pairs, key=lambda p: p.name):
        book = backoff.get(pair.name, Backoff())
        promotion = _auto_promotion(pair, liveness, reports, now, policy, granted)
        if promotion is not None:
            cmds += promotion
            continue
        if pair.state is PairState.RESYNCING:
            silent = liveness.silent_for(pair.secondary, now)
            if silent > timeout:
                reason = (
                    f"secondary {pair.secondary} has not heartbeated for {silent:.1f} s "
                    f"(node_timeout_s={timeout}) during the resync of epoch {pair.epoch}"
                )
                cmds += _change(
                    pair,
                    PairEvent.SECONDARY_FAILED,
                    reason,
                    book=book,
                    now=now,
                    policy=policy,
                    jitter=jitter,
                    last_error=reason,
                )
            continue
        changes = _secondary_changes(pair, liveness, reports, now, policy=policy, book=book, jitter=jitter)
        if changes:
            cmds += changes
            continue
        if not policy.auto_resync:
            continue
        if resync_blocker(pair, liveness, reports, now, policy=policy, backoff=book, in_flight=in_flight):
            continue
        answer = healthy.get(pair.secondary)
        if answer is None:
            cmds.append(ProbeHealth(pair.name, pair.secondary))
            continue
        if not answer:
            continue
        prim, sec = reports[(pair.primary, pair.name)], reports[(pair.secondary, pair.name)]
        full_copy, _ = _resync_source(prim, sec, pair)
        snapshot = prim.fault_snapshot_id
        new_epoch = pair.epoch + 1
        failed_bytes = sum(e.length for e in pair.failed_extents)
        what = (
            "a full copy (the secondary holds no data)"
            if full_copy
            else f"{len(pair.failed_extents)} failed extents, {failed_bytes} bytes"
        )
        reason = (
            f"primary {pair.primary} and secondary {pair.secondary} alive, fault snapshot {snapshot} "
            f"present; resync attempt {book.failures + 1} at epoch {new_epoch} ({what})"
        )
        cmds += _change(
            pair,
            PairEvent.RESYNC_STARTED,
            reason,
            book=book,
            now=now,
            policy=policy,
            jitter=jitter,
            epoch=new_epoch,
            progress=Progress(),
        )
        cmds.append(StartResync(pair.name, pair.primary, new_epoch, pair.failed_extents, full_copy))
    return cmds


def on_start_resync_failed(
    pair: PairView | None,
    primary: str,
    epoch: int,
    error: str,
    *,
    backoff: Backoff,
    now: float,
    policy: Policy,
    jitter: float = 0.0,
) -> list[Command]:
    """StartResync at ``epoch`` failed with ``error``: the resync falls back to
    degraded (and backs off) -- unless the pair has moved on (then nothing)."""
    if pair is None or pair.state is not PairState.RESYNCING or pair.epoch != epoch:
        return []
    reason = f"StartResync on primary {primary} at epoch {epoch} failed: {error}"
    return _change(
        pair,
        PairEvent.RESYNC_FAILED,
        reason,
        book=backoff,
        now=now,
        policy=policy,
        jitter=jitter,
        last_error=reason,
    )


# ---------------------------------------------------------------- messages from the nodes


def on_heartbeat(
    pair: PairView | None,
    reporter: str,
    report: Report,
    *,
    wall_now: float,
    policy: Policy,
    backoff: Backoff,
    now: float,
    jitter: float = 0.0,
) -> list[Command]:
    """A safety net for a lost ReportReplication: the primary's heartbeat says
    the pair is degraded at the current epoch. Acted on only once the pair has
    been in its current state for ``node_timeout_s`` of wall-clock time (so a
    primary that got StartResync but has not started yet is not misread), or,
    when already degraded, if it adds failure information. Anything else
    (another reporter, another state, a stale epoch, extents beyond the
    volume) is ignored."""
    if (
        pair is None
        or pair.primary != reporter
        or report.state is not PairState.DEGRADED
        or report.epoch != pair.epoch
        or not is_legal(pair.state, PairEvent.SECONDARY_FAILED)
    ):
        return []
    try:
        reported = [to_extent(e) for e in report.failed_extents]
    except ValueError:
        return []
    if any(e.end > pair.size_bytes for e in reported):
        return []
    extents = tuple(derive_failed_extents((), (), [*pair.failed_extents, *reported]))
    snapshot_id = report.fault_snapshot_id or pair.fault_snapshot_id
    if pair.state is PairState.DEGRADED:
        if extents == pair.failed_extents and snapshot_id == pair.fault_snapshot_id:
            return []
        reason = f"primary {reporter} heartbeat adds failure information"
    else:
        if wall_now - pair.state_changed_at < policy.node_timeout_s:
            return []
        reason = f"primary {reporter} heartbeat reports the pair degraded at epoch {report.epoch}" + (
            f": {report.last_error}" if report.last_error else ""
        )
    return _change(
        pair,
        PairEvent.SECONDARY_FAILED,
        reason,
        book=backoff,
        now=now,
        policy=policy,
        jitter=jitter,
        failed_extents=extents,
        fault_snapshot_id=snapshot_id,
        last_error=report.last_error or pair.last_error or reason,
    )


def _nack_reason(nacks: Sequence[Nack]) -> str:
    if not nacks:
        return ""
    first = nacks[0]
    return f"{len(nacks)} write(s) NACKed, first seq {first.seq}: {first.code} {first.message}".strip()


def on_report(
    pair: PairView,
    report: ReplicationReport,
    *,
    resync_started: bool,
    secondary_alive: bool,
    backoff: Backoff,
    now: float,
    policy: Policy,
    jitter: float = 0.0,
) -> Problem | list[Command]:
    """A ReplicationReport from the primary of ``pair``: the refusal, or what to
    persist. ``resync_started``: a resync was started at the pair's current
    epoch (only read while the pair is degraded); ``secondary_alive``: the
    secondary heartbeats."""
    problem = validate_report(pair, report)
    if problem:
        return problem
    state = PairState.from_proto(report.state)
    try:
        if state is PairState.DEGRADED:
            nacks = [to_extent(n) for n in report.nacks]
            unacked = [to_extent(e) for e in report.unacked]
            reported = [to_extent(e) for e in report.failed_extents]
            extents = derive_failed_extents(nacks, unacked, [*pair.failed_extents, *reported])
            reason = report.reason or _nack_reason(report.nacks) or "secondary failed (no reason given)"
            total = sum(e.length for e in extents)
            detail = (
                f"primary {report.reporter} reports the secondary {pair.secondary} failed: {reason} "
                f"({len(report.nacks)} nacks, {len(report.unacked)} unacked writes; "
                f"{len(extents)} failed extents, {total} bytes)"
            )
            return _change(
                pair,
                PairEvent.SECONDARY_FAILED,
                detail,
                book=backoff,
                now=now,
                policy=policy,
                jitter=jitter,
                failed_extents=tuple(extents),
                fault_snapshot_id=report.fault_snapshot_id or pair.fault_snapshot_id,
                last_error=reason,
            )
        if state is PairState.RESYNCING:
            progress = report.progress or Progress()
            if pair.state is PairState.DEGRADED and resync_started and secondary_alive:
                # The coordinator went degraded on its own (secondary silent, or
                # a StartResync that timed out although the primary got it)
                # while the primary's resync for this very epoch carries on.
                return _change(
                    pair,
                    PairEvent.RESYNC_STARTED,
                    f"primary {report.reporter} reports the resync of epoch {pair.epoch} in progress",
                    book=backoff,
                    now=now,
                    policy=policy,
                    jitter=jitter,
                    progress=progress,
                    progress_reported=True,
                )
            if pair.state is not PairState.RESYNCING:
                return Problem(
                    Code.FAILED_PRECONDITION,
                    f"volume {pair.name!r} is {pair.state.value} at epoch {pair.epoch}, not resyncing; "
                    "resync progress is accepted only while the coordinator has a resync running",
                )
            return [SaveProgress(pair.name, progress)]
        # In sync.
        if pair.state is PairState.IN_SYNC:
            return []  # a retry of a report already applied
        ident = report.identity
        if ident is not None and pair.generation and not ident.knows(pair.generation):
            # A stale report (retried while the coordinator was away) that
            # lands after a newer one: the coordinator already knows the
            # primary at a generation this report has never seen, so the
            # primary went degraded since and wrote alone. Taking it would
            # mark the pair in sync (and allow an unforced promotion that
            # loses those writes: simulator seed 1115).
            return Problem(
                Code.FAILED_PRECONDITION,
                f"volume {pair.name!r}: stale in-sync report from {report.reporter} at generation "
                f"{ident.short()}; the primary is known at generation {pair.generation:016x} since (it went "
                "degraded after this report was sent); ignored",
            )
        if pair.state is PairState.DEGRADED and not resync_started:
            return Problem(
                Code.FAILED_PRECONDITION,
                f"volume {pair.name!r} is degraded at epoch {pair.epoch} and no resync was started at that "
                f"epoch; the primary cannot be in sync before the coordinator starts a resync",
            )
        how = f": {report.reason}" if report.reason else ""
        return _change(
            pair,
            PairEvent.RESYNC_DONE,
            f"primary {report.reporter} reports the pair in sync at epoch {report.epoch}{how} "
            f"(previous error: {pair.last_error or 'none'})",
            book=backoff,
            now=now,
            policy=policy,
            jitter=jitter,
            failed_extents=(),
            fault_snapshot_id=0,
            last_error="",
            progress=report.progress,
            full_copy_pending=False,
            revert_generation=0,
        )
    except IllegalTransition as e:
        return Problem(Code.FAILED_PRECONDITION, f"volume {pair.name!r}: {e}")


# ---------------------------------------------------------------- CreateVolume


def plan_create_volume(
    args: CreateVolumeArgs, *, default_resync_mode: int, volume_uuid: str = "", generation: int = 0
) -> list[Command]:
    """A validated CreateVolume: persist the pair with its identity (``volume_uuid``
    and the initial ``generation``, minted by the shell), then push it, with
    ``create``, to the secondary first (so it accepts the primary's stream),
    then to the primary."""
    spec = volume_spec(args, default_resync_mode)
    mode_name = _RESYNC_MODE_NAMES.get(spec.resync_mode, str(spec.resync_mode))
    reason = (
        f"created: primary {spec.primary}, secondary {spec.secondary}, "
        f"{spec.size_bytes} bytes, block size {spec.block_size}, resync mode {mode_name}, "
        f"volume uuid {volume_uuid or '(none)'}, generation {generation:016x}, "
        f"auto-failover {'on' if spec.auto_failover else 'off'}"
    )
    return [
        CreatePair(spec, reason, volume_uuid=volume_uuid, generation=generation),
        PushAssignment(spec.name, spec.secondary, create=True),
        PushAssignment(spec.name, spec.primary, create=True),
    ]


def on_push_failed(
    spec: VolumeSpec, address: str, error: str, *, still_ours: bool
) -> tuple[list[Command], Problem]:
    """AssignVolume to ``address`` failed: roll the creation back (if the pair
    is still the one this request created) and refuse."""
    cmds: list[Command] = []
    if still_ours:
        cmds.append(DeletePair(spec.name, f"creation rolled back: AssignVolume to {address} failed: {error}"))
    return cmds, Problem(
        Code.UNAVAILABLE,
        f"volume {spec.name!r} not created: assigning it to the {spec.role_of(address)} {address} failed "
        f"({error}); check that node {address} is running and reachable, then retry",
    )


# ---------------------------------------------------------------- volume lifecycle (issue 13)


def delete_refusal(pair: PairView | None, name: str, known: Iterable[str], *, busy: str = "") -> Problem | None:
    """Why volume ``name`` cannot be deleted now (None: it can). ``busy`` names
    an operation of the shell still running on it (a creation, switchover,
    resolve or resize): deleting under it would leave that operation pushing
    assignments of a pair that is gone. A pair in any state may be deleted:
    the operator confirmed it (``syncrep volume delete`` asks first)."""
    if pair is None:
        return not_found(name, known)
    if busy:
        return Problem(
            Code.FAILED_PRECONDITION,
            f"volume {name!r}: a {busy} is running on it; wait for its answer, then retry",
        )
    return None


def plan_delete(pair: PairView) -> list[Command]:
    """A validated DeleteVolume: the pair record (and its grants) go first, in
    one transaction with the event; then the shell tells both nodes
    (``NodeService.DeleteVolume``), the primary first (its write path stops
    before the secondary's store goes). A node it does not reach is no longer
    assigned the volume: at its next registration it finds a store no pair
    claims, keeps it and never serves it."""
    return [
        DeletePair(
            pair.name,
            f"deleted by the operator at epoch {pair.epoch} ({pair.state.value}): primary {pair.primary}, "
            f"secondary {pair.secondary}, {pair.size_bytes} bytes, volume uuid {pair.volume_uuid or '(none)'}",
        )
    ]


def resize_refusal(
    pair: PairView,
    size_bytes: int,
    block_size: int,
    liveness: Liveness,
    reports: Mapping[tuple[str, str], Report],
    now: float,
    *,
    policy: Policy,
) -> Problem | None:
    """Why ``pair`` cannot grow to ``size_bytes`` now (None: it can, or it
    already has that size). Online growth only while in sync with both nodes
    alive at the current epoch: the secondary grows first, then the primary,
    so a write to the new blocks is only ever accepted where the secondary
    has them too; a degraded pair's resync would send extents the other side
    may not have."""
    name, old = pair.name, pair.size_bytes
    if size_bytes < old:
        return Problem(
            Code.INVALID_ARGUMENT,
            f"volume {name!r} is {old} bytes; {size_bytes} is smaller: shrinking would discard data at the end "
            "of the volume; not supported",
        )
    if size_bytes % block_size:
        lower, upper = size_bytes // block_size * block_size, (size_bytes // block_size + 1) * block_size
        return Problem(
            Code.INVALID_ARGUMENT,
            f"size {size_bytes} is not a multiple of the block size {block_size} of volume {name!r} "
            f"(nearest: {lower} or {upper})",
        )
    if size_bytes // block_size > MAX_BLOCKS:
        return Problem(
            Code.OUT_OF_RANGE,
            f"size {size_bytes} is {size_bytes // block_size} blocks of {block_size} bytes; the limit is "
            f"{MAX_BLOCKS} blocks ({MAX_BLOCKS * block_size} bytes at this block size)",
        )
    if size_bytes == old:
        return None
    if pair.state is not PairState.IN_SYNC:
        return Problem(
            Code.FAILED_PRECONDITION,
            f"volume {name!r} is {pair.state.value} at epoch {pair.epoch}, not in sync: it grows online only "
            f"while both replicas hold every write; {_NOT_IN_SYNC_ADVICE[pair.state]}",
        )
    for role, address in (("secondary", pair.secondary), ("primary", pair.primary)):
        if not liveness.alive(address, now, policy.node_timeout_s):
            return Problem(
                Code.FAILED_PRECONDITION,
                f"volume {name!r}: {role} {address} is not alive (silent for "
                f"{liveness.silent_for(address, now):.1f} s); a resize grows both replicas: start it, then retry",
            )
        r = reports.get((address, name))
        if r is None or r.epoch != pair.epoch:
            return Problem(
                Code.FAILED_PRECONDITION,
                f"volume {name!r}: {role} {address} has not applied epoch {pair.epoch} yet; retry in a moment",
                retry_after_s=0.2,  # a live node reports every heartbeat; the shell bounds the wait
            )
    return None


def plan_resize(
    pair: PairView,
    size_bytes: int,
    block_size: int,
    liveness: Liveness,
    reports: Mapping[tuple[str, str], Report],
    now: float,
    *,
    epoch: int,
    policy: Policy,
) -> Problem | list[Command]:
    """After both nodes grew to ``size_bytes`` at ``epoch`` (the shell pushed
    ``NodeService.ResizeVolume`` to the secondary, then the primary): the
    pair's new size, persisted with its event. Checked again on the pair as
    it is now: it must still be at that epoch (a failover meanwhile: the
    nodes grew, the record keeps the old size and the operator retries; a
    node larger than the record is the same volume, syncrep.volumes)."""
    if pair.epoch != epoch:
        return Problem(
            Code.UNAVAILABLE,
            f"volume {pair.name!r} moved to epoch {pair.epoch} while it grew at epoch {epoch}: both nodes have "
            f"{size_bytes} bytes, the pair's size stays {pair.size_bytes}; retry the resize",
        )
    problem = resize_refusal(pair, size_bytes, block_size, liveness, reports, now, policy=policy)
    if problem is not None:
        return problem
    if size_bytes == pair.size_bytes:
        return []
    return [ResizePair(pair.name, size_bytes,
                       f"resized online from {pair.size_bytes} to {size_bytes} bytes at epoch {pair.epoch}: "
                       f"secondary {pair.secondary}, then primary {pair.primary} grew; the new blocks read as zeros")]
