"""The coordinator's gRPC service and its background loop: a thin shell.

Every decision lives in ``syncrep.core.driver`` (pure; in the style of etcd
raft's ``Ready``). This module translates: a gRPC request becomes plain data,
the pure validators and decision functions say what to do as a list of
commands, and the shell carries them out in a fixed order -- persist first
(``coordinator.db``, then memory), then send (RPCs to the nodes), then reply.

* ``CoordinatorServicer`` implements ``syncrep.v1.CoordinatorService`` (grpc.aio).
* Node liveness: a node is alive if the coordinator heard from it (RegisterNode
  or Heartbeat) within ``node_timeout_s``. Liveness and the nodes' latest
  VolumeReports live in memory only; everything else is persisted before any
  reply or push that depends on it.
* The background tick (``tick``, run every ``resync_check_interval_s`` and
  whenever a node comes back) runs ``driver.decide``: resyncing pairs whose
  secondary went silent go degraded; degraded pairs that are ready get their
  secondary health-checked, then a new epoch, persisted, then
  ``NodeService.StartResync`` on the primary.
* CreateVolume pushes ``NodeService.AssignVolume`` to both nodes of a new
  pair (secondary first), with ``create`` and the pair's identity (a volume
  UUID from ``new_volume_uuid()``, the initial generation from
  ``syncrep.volumes.new_generation()``: both seams the simulator patches).
* Leases (docs/FAILOVER.md section 2): every HeartbeatReply (and
  ReportReplicationReply) grants the pair's primary a lease, after what the
  request changed is persisted; the grant time is recorded per volume.
* Promote (and the tick's automatic promotions): ``driver.plan_promote``.
* Switchover: ``driver.switchover_refusal``, then ``NodeService.PrepareHandover``
  on the primary (its gate closes, it drains), then ``driver.plan_switchover``
  persisted, then the assignments (old primary first), with ``switchover``.
* Resolve (split brain, docs/FAILOVER.md section 6): ``driver.plan_resolve``
  persisted, then the discarded replica's assignment (``discard_snapshot``,
  ``revert_to_generation``), whose answer gives its discarded extents; a kept
  secondary's primary assignment is held until the old primary applied its
  demotion or its lease certainly expired.
* Grants (issue 11): ``Grant``/``Revoke``/``ListGrants`` persist to the
  ``grants`` table (then memory); every assignment carries the volume's
  grants, so the nodes learn a change with their next heartbeat. Who may call
  what is ``syncrep.authz``'s table (the server's interceptor); the handlers
  here add what needs the request: a node registers, heartbeats and reports
  only under an address its certificate names (``authz.check_registered_address``).

Time: every read goes through the injected clocks -- ``clock`` (monotonic:
liveness, backoff) and ``wall_clock`` (the persisted timestamps).

Concurrency: one event loop; every read-modify-write of a pair runs under one
asyncio lock and saves to SQLite before the in-memory copy is replaced, so a
failed write leaves memory and disk in agreement.
"""

from __future__ import annotations

import asyncio
import functools
import io
import itertools
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
from grpc import aio
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from coordinator.db import DBError, NodeRecord, PairExists, PairRecord, StateChange
from coordinator.store import NotLeader, Store, StoreConflict, StoreUnavailable
from syncrep import authz, certs, rpc, volumes
from syncrep.aio import wait_event
from syncrep.core import driver
from syncrep.core.driver import (
    DEFAULT_BLOCK_SIZE,
    MAX_BLOCK_SIZE,
    MAX_BLOCKS,
    MIN_BLOCK_SIZE,
    VOLUME_NAME_RE,
    Alert,
    Backoff,
    ChangePair,
    ClearBackoff,
    Command,
    CreatePair,
    DeletePair,
    NodeSilent,
    ProbeHealth,
    Problem,
    PushAssignment,
    ResizePair,
    SaveGenerations,
    SaveProgress,
    SetBackoff,
    StartResync,
)
from syncrep.core.extents import summarize_extents
from syncrep.core.identity import Identity
from syncrep.core.pairstate import PairEvent, PairState, status_proto
from syncrep.core.vocab import validate_dial_address
from syncrep.pb import syncrep_pb2 as pb
from syncrep.pb import syncrep_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "MAX_BLOCKS",
    "MAX_BLOCK_SIZE",
    "MIN_BLOCK_SIZE",
    "STATUS_MAX_EXTENTS",
    "VOLUME_NAME_RE",
    "CoordinatorServicer",
    "new_volume_uuid",
    "validate_address",
]

# VolumeStatus carries the first this-many failed extents (failed_bytes counts all).
STATUS_MAX_EXTENTS = 64
# The health check of a secondary before a resync is started.
HEALTH_CHECK_TIMEOUT_S = 1.0
# How long a stop waits for each background task, and each node channel, to end.
STOP_TASKS_TIMEOUT_S = 5.0
# How long a switchover may hold the old primary's writes at its gate by
# default, and at most (the node refuses longer ones too).
DEFAULT_HANDOVER_TIMEOUT_S = 5.0
MAX_HANDOVER_TIMEOUT_S = 60.0

# StartResync errors worth retrying within one attempt; anything else (the
# primary refused: stale epoch, no fault snapshot, ...) fails the attempt at once.
_RETRYABLE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)


def new_volume_uuid() -> str:
    """A new pair's volume UUID (a seam: the simulator patches it to stay deterministic)."""
    return uuid.uuid4().hex


_HANDOVER_SEQ = itertools.count(1)


def new_handover_id(coordinator: str) -> str:
    """A name for one switchover attempt (PrepareHandoverRequest.handover_id).
    Unique across attempts of this process (the counter) and across restarts
    and coordinators (the address, the wall clock); drawn without a random
    number so that the simulator's schedules do not shift."""
    return f"{coordinator or '-'}/{time.time():.6f}/{next(_HANDOVER_SEQ)}"


def validate_address(address: str) -> str | None:
    """None if ``address`` is a usable "host:port", else what is wrong with it."""
    return validate_dial_address(address)


def _rpc_error_text(e: BaseException) -> str:
    if isinstance(e, aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return f"{type(e).__name__}: {e}"


def _retryable(e: BaseException) -> bool:
    return isinstance(e, aio.AioRpcError) and e.code() in _RETRYABLE_CODES


async def _abort(context: aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """Refuse with ``code``, marked as this coordinator's answer
    (ANSWERED_METADATA_KEY): a client must not call an UNAVAILABLE that we
    sent ("not created: the node did not answer in time") "cannot reach the
    coordinator"."""
    kept = tuple(context.trailing_metadata() or ())
    await context.abort(
        code, rpc.status_details(message), trailing_metadata=(*kept, (ANSWERED_METADATA_KEY, "coordinator"))
    )
    raise AssertionError("unreachable: context.abort returned")  # pragma: no cover


async def _refuse(context: aio.ServicerContext, problem: Problem) -> NoReturn:
    await _abort(context, grpc.StatusCode[problem.code.value], problem.message)


async def _check_node_address(context: aio.ServicerContext, address: str, what: str) -> None:
    """A node registers, heartbeats and reports only under an address whose
    host its certificate names ("a node may register only under an address in
    its certificate's SANs"): else refused (one WARNING line), nothing recorded."""
    try:
        authz.check_registered_address(rpc.peer_of(context), address, what=what)
    except authz.PermissionDenied as e:
        await authz.deny(context, e)


# ---------------------------------------------------------------- leadership (issue 12)

#: Trailing metadata of a follower's redirect (and of its read answers): the
#: leader's address as this coordinator knows it ("" when none is known).
LEADER_METADATA_KEY = "syncrep-leader"
#: Trailing metadata of a read a follower answered from its copy of the store.
ROLE_METADATA_KEY = "syncrep-coordinator-role"
#: Trailing metadata of every refusal this coordinator sends (``_abort``).
ANSWERED_METADATA_KEY = "syncrep-answered-by"


class Leadership(Protocol):
    """Who leads (``coordinator.election.Election`` behind an adapter in
    coordinator/server.py). ``term()`` identifies the current term (the
    election key's value while this coordinator leads, else None): a change
    means a new term, and the servicer takes over again (reload, lease wait)."""

    def is_leader(self) -> bool: ...
    def leader(self) -> str | None: ...
    def why_not_leader(self) -> str: ...
    def term(self) -> bytes | None: ...


_RPC = TypeVar("_RPC", bound=Callable[..., Awaitable[Any]])


def _leader_only(recheck: bool = False) -> Callable[[_RPC], _RPC]:
    """A mutating RPC: only the leader carries it out. A follower (or a leader
    whose election view expired) answers with a redirect naming the leader;
    a write the store fenced (``NotLeader``) too; an unreachable etcd is
    UNAVAILABLE (nothing known to be written); a lost compare-and-swap
    reloads the store's state and is UNAVAILABLE (retry: decided again on the
    state as it is). ``recheck``: also redirect when leadership was lost
    while the RPC ran (Heartbeat: its per-volume failures are swallowed, and
    its node must move to the new leader)."""

    def wrap(method: _RPC) -> _RPC:
        @functools.wraps(method)
        async def handler(self: CoordinatorServicer, request: Any, context: aio.ServicerContext) -> Any:
            await self._require_leader(context)
            try:
                reply = await method(self, request, context)
            except NotLeader as e:
                await self._redirect(context, str(e))
            except StoreUnavailable as e:
                await _abort(
                    context, grpc.StatusCode.UNAVAILABLE,
                    f"coordinator {self.coordinator_address}: etcd unavailable, it changes nothing until etcd "
                    f"answers again ({e}); retry",
                )
            except StoreConflict as e:
                await self._reload_after_conflict()
                await _abort(context, grpc.StatusCode.UNAVAILABLE, f"{e}; reloaded, retry")
            if recheck and not self.leads():
                await self._redirect(context, "")
            return reply

        return handler  # type: ignore[return-value]

    return wrap


# ---------------------------------------------------------------- proto <-> plain data


def _progress(p: pb.ResyncProgress) -> driver.Progress:
    return driver.Progress(
        bytes_done=p.bytes_done,
        bytes_total=p.bytes_total,
        rate_bytes_per_s=p.rate_bytes_per_s,
        eta_s=p.eta_s,
        round=p.round,
    )


def _progress_proto(p: driver.Progress) -> pb.ResyncProgress:
    return pb.ResyncProgress(
        bytes_done=p.bytes_done,
        bytes_total=p.bytes_total,
        rate_bytes_per_s=p.rate_bytes_per_s,
        eta_s=p.eta_s,
        round=p.round,
    )


#: A VolumeStatus state as an event names it (primary_lost is status-only).
_STATUS_STATE_NAMES: dict[int, str] = {
    pb.PAIR_STATE_IN_SYNC: "in_sync",
    pb.PAIR_STATE_DEGRADED: "degraded",
    pb.PAIR_STATE_RESYNCING: "resyncing",
    pb.PAIR_STATE_PRIMARY_LOST: "primary_lost",
    pb.PAIR_STATE_SPLIT_BRAIN: "split_brain",
}


def _pair_state(value: int) -> PairState | None:
    try:
        return PairState.from_proto(value)
    except ValueError:
        return None


_ROLE_NAMES = {pb.ROLE_PRIMARY: "primary", pb.ROLE_SECONDARY: "secondary"}


def _volume_report(r: pb.VolumeReport) -> driver.Report:
    return driver.Report(
        volume=r.name,
        epoch=r.epoch,
        state=_pair_state(r.state),
        fault_snapshot_id=r.fault_snapshot_id,
        failed_extents=tuple((e.offset, e.length) for e in r.failed_extents),
        last_error=r.last_error,
        identity=Identity.from_proto(r.identity) if r.HasField("identity") else None,
        data_missing=r.data_missing,
        data_problem=r.data_problem,
        divergent_extents=tuple((e.offset, e.length) for e in r.divergent_extents),
        out_of_sync_bytes=r.out_of_sync_bytes,
        lease_remaining_s=r.lease_remaining_s,
        role=_ROLE_NAMES.get(r.role, ""),
    )


def _nack_code(code: int) -> str:
    return pb.NackCode.Name(code) if code in pb.NackCode.values() else str(code)  # type: ignore[arg-type]


def _replication_report(r: pb.ReplicationReport) -> driver.ReplicationReport:
    return driver.ReplicationReport(
        volume=r.volume,
        reporter=r.reporter,
        epoch=r.epoch,
        state=r.state,
        nacks=tuple(driver.Nack(n.seq, n.offset, n.length, _nack_code(n.code), n.message) for n in r.nacks),
        unacked=tuple((u.offset, u.length) for u in r.unacked),
        failed_extents=tuple((e.offset, e.length) for e in r.failed_extents),
        reason=r.reason,
        fault_snapshot_id=r.fault_snapshot_id,
        progress=_progress(r.resync) if r.HasField("resync") else None,
        identity=Identity.from_proto(r.identity) if r.HasField("identity") else None,
    )


# ---------------------------------------------------------------- events (WatchEvents, issue 13)

#: Events queued per WatchEvents subscriber; one that falls this far behind
#: gets a last "dropped" event and its stream ends (never a wait for it).
EVENT_QUEUE_EVENTS = 1024
#: At most one resync_progress event per volume in this many seconds.
PROGRESS_EVENT_INTERVAL_S = 2.0

#: The event kind of each pair event (``Event.kind``).
_EVENT_KINDS: dict[PairEvent, str] = {
    PairEvent.SECONDARY_FAILED: "state_change",
    PairEvent.RESYNC_STARTED: "resync_start",
    PairEvent.RESYNC_FAILED: "resync_failed",
    PairEvent.RESYNC_DONE: "resync_done",
    PairEvent.PROMOTED: "promotion",
    PairEvent.SWITCHED_OVER: "switchover",
    PairEvent.SPLIT_BRAIN_DETECTED: "split_brain",
    PairEvent.RESOLVED: "resolve",
}


class _Subscriber:
    """One WatchEvents call: its volume filter and its bounded queue. The
    coordinator only ever ``offer``s (never awaits); once the queue is full the
    subscriber is over: what it misses is counted and its stream ends."""

    def __init__(self, volume: str, max_events: int = EVENT_QUEUE_EVENTS) -> None:
        self.volume = volume
        self.queue: asyncio.Queue[pb.Event] = asyncio.Queue(maxsize=max_events)
        self.dropped = 0
        # Set when the subscriber fell behind: its handler stops waiting.
        self.overflowed = asyncio.Event()

    def offer(self, event: pb.Event) -> None:
        if self.volume and event.volume != self.volume:
            return
        if self.dropped:
            self.dropped += 1
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            # What it did not get: everything queued, and this one.
            self.dropped = self.queue.qsize() + 1
            while not self.queue.empty():
                self.queue.get_nowait()
            self.overflowed.set()


class CoordinatorServicer(pb_grpc.CoordinatorServiceServicer):
    """``syncrep.v1.CoordinatorService`` plus the background tick.

    Call ``start_background()`` once the event loop runs and
    ``stop_background()`` before closing the database.
    """

    # Leadership (issue 12), set by coordinator/server.py on etcd: None means
    # this coordinator always leads (SQLite: one coordinator, no election).
    leadership: Leadership | None = None
    #: The store as --store names it ("sqlite", "etcd://..."), for CoordinatorInfo.
    store_url: str = "sqlite"
    #: The election's TTL, added to a new leader's wait for the leases a
    #: previous leader could have granted (election.longest_lease_wait_s).
    election_ttl_s: float = 0.0
    # The term this servicer took over (Leadership.term()), and whether a
    # follower's last refresh from the store failed (said once per outage).
    _term: bytes | None = None
    _follow_failed: bool = False

    def __init__(
        self,
        db: Store,  # CoordinatorDB (SQLite) or EtcdStore (issue 12)
        *,
        heartbeat_interval_s: float = 0.5,
        node_timeout_s: float = 3.0,
        auto_resync: bool = True,
        resync_retry_max_s: float = 10.0,
        resync_retry_initial_s: float = 0.5,
        resync_check_interval_s: float = 0.5,
        default_resync_mode: int = pb.RESYNC_MODE_DIRECT,
        rpc_timeout_s: float = rpc.DEFAULT_RPC_TIMEOUT_S,
        start_resync_attempts: int = 3,
        coordinator_address: str = "",
        lease_s: float = 4.0,
        lease_drift_s: float = 0.5,
        clock: Callable[[], float] | None = None,
        wall_clock: Callable[[], float] | None = None,
    ) -> None:
        problem = driver.validate_config(
            heartbeat_interval_s,
            node_timeout_s,
            default_resync_mode,
            lease_s=lease_s,
            lease_drift_s=lease_drift_s,
        )
        if problem:
            raise ValueError(problem)
        self.lease_s = lease_s
        self.lease_drift_s = lease_drift_s
        self.db = db
        self.heartbeat_interval_s = heartbeat_interval_s
        self.node_timeout_s = node_timeout_s
        self.auto_resync = auto_resync
        self.resync_retry_initial_s = resync_retry_initial_s
        self.resync_retry_max_s = resync_retry_max_s
        self.resync_check_interval_s = resync_check_interval_s
        self.default_resync_mode = default_resync_mode
        self.rpc_timeout_s = rpc_timeout_s
        self.start_resync_attempts = max(1, start_resync_attempts)
        self.coordinator_address = coordinator_address
        # Looked up at each call, not bound at import: the simulator replaces
        # time.monotonic/time.time, and this module may be imported first.
        self._clock: Callable[[], float] = clock if clock is not None else (lambda: time.monotonic())
        self._wall: Callable[[], float] = wall_clock if wall_clock is not None else (lambda: time.time())
        self._started_at = self._clock()

        self._lock = asyncio.Lock()
        self._nodes: dict[str, NodeRecord] = {n.address: n for n in db.list_nodes()}
        self._pairs: dict[str, PairRecord] = {p.name: p for p in db.list_pairs()}
        # In memory only: liveness and each node's latest report per volume.
        self._last_heard: dict[str, float] = {}
        self._dead_logged: set[str] = set()
        self._reports: dict[str, dict[str, pb.VolumeReport]] = {}
        # Counters for /metrics (syncrep_coordinator_heartbeats_total, ...).
        self.heartbeats_handled = 0
        self.volume_reports_handled = 0
        self.replication_reports_handled = 0
        self._report_at: dict[str, float] = {}
        self._progress_at: dict[str, float] = {}
        # When the current primary's lease was last granted, by volume (clock).
        # After a start nothing is recorded: driver.lease_remaining_s assumes a
        # grant at the start (one granted just before a restart may still run).
        self._lease_granted_at: dict[str, float] = {}
        # Volumes whose CreateVolume pushes are in flight: left out of
        # registration and heartbeat assignments until then, so that no node
        # learns of the volume without ``create`` (it would report its data
        # missing, and the coordinator would "rebuild" or promote).
        self._creating: set[str] = set()
        # The resync driver's memory: per-pair failures since the pair was last
        # in sync, and the earliest (clock) time of the next attempt.
        self._backoff: dict[str, Backoff] = {}
        self._resync_tasks: dict[str, asyncio.Task[None]] = {}
        # Switchovers: the volumes with one running, and the epoch each last
        # swapped the roles at (in memory: its assignments carry
        # ``switchover``; after a restart they do not, and the nodes take
        # the ordinary, conservative promotion and demotion).
        self._switching: set[str] = set()
        # Issue 13: the volumes with a ResizeVolume running (its pushes are in flight).
        self._resizing: set[str] = set()
        self._switched_at: dict[str, int] = {}
        # A switchover's new primary does not get its primary assignment by
        # heartbeat before the old primary's demotion was pushed (it would
        # open its stream to a node still primary): volume -> new primary.
        self._switch_hold: dict[str, str] = {}
        # Resolves (in memory, like switchovers): the epoch and the snapshot
        # name of the discarded replica's assignment (volume -> (epoch,
        # address, name)); and a kept secondary's primary assignment held
        # until the demoted old primary is fenced: volume -> new primary.
        self._discard: dict[str, tuple[int, str, str]] = {}
        self._resolve_hold: dict[str, str] = {}
        # Grants, persisted in the grants table: volume -> user -> read_only.
        self._grants: dict[str, dict[str, bool]] = {}
        for g in db.list_grants():
            self._grants.setdefault(g.volume, {})[g.user] = g.read_only
        self._channels: dict[str, aio.Channel] = {}
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        # WatchEvents (issue 13): the subscribers, the coordinator-wide event
        # counter, and when each volume's last resync_progress event went out.
        self._subscribers: set[_Subscriber] = set()
        self._event_seq = 0
        self._progress_event_at: dict[str, float] = {}

    # ================================================================ lifecycle

    async def start_background(self) -> None:
        if self._loop_task is not None:
            return
        self._started_at = self._clock()
        self._wake = asyncio.Event()
        self._loop_task = asyncio.create_task(self._background_loop(), name="coordinator-background")

    async def stop_background(self) -> None:
        tasks: list[asyncio.Task[None]] = list(self._resync_tasks.values())
        if self._loop_task is not None:
            tasks.append(self._loop_task)
        for t in tasks:
            t.cancel()
        # Bounded: a stop (SIGTERM, systemd's TimeoutStopSec) must not hang on
        # one task that does not end; say which one, with where it waits.
        pending: set[asyncio.Task[None]] = set()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_TASKS_TIMEOUT_S)
        for t in tasks:
            if t in pending:
                stack = io.StringIO()
                t.print_stack(file=stack)
                log.warning("coordinator stop: task %s did not end %.0f s after it was cancelled; left "
                            "behind:\n%s", t.get_name(), STOP_TASKS_TIMEOUT_S, stack.getvalue())
            elif not t.cancelled():
                t.exception()  # retrieved: an error of a task being stopped is no news
        self._loop_task = None
        self._resync_tasks.clear()
        channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            try:
                await asyncio.wait_for(ch.close(), STOP_TASKS_TIMEOUT_S)
            except TimeoutError:
                log.warning("coordinator stop: a node channel did not close in %.0f s; left behind",
                            STOP_TASKS_TIMEOUT_S)
            except Exception:
                pass

    def wake(self) -> None:
        """Run the background checks now rather than at the next interval."""
        if self._wake is not None:
            self._wake.set()

    async def _background_loop(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except (NotLeader, StoreUnavailable, StoreConflict) as e:  # issue 12: said, not a traceback
                log.warning("coordinator background check stopped: %s; retrying in %.1f s", e,
                            self.resync_check_interval_s)
                if isinstance(e, StoreConflict):
                    await self._reload_after_conflict()
            except Exception:
                log.exception(
                    "coordinator background check failed; retrying in %.1f s", self.resync_check_interval_s
                )
            self._wake.clear()
            # wait_event, not wait_for: a stop's cancel must end this loop (syncrep/aio.py).
            await wait_event(self._wake, self.resync_check_interval_s)

    # ================================================================ what decide() sees

    def policy(self) -> driver.Policy:
        return driver.Policy(
            node_timeout_s=self.node_timeout_s,
            auto_resync=self.auto_resync,
            resync_retry_initial_s=self.resync_retry_initial_s,
            resync_retry_max_s=self.resync_retry_max_s,
            lease_s=self.lease_s,
            lease_drift_s=self.lease_drift_s,
        )

    def liveness(self) -> driver.Liveness:
        return driver.Liveness(
            last_heard=dict(self._last_heard),
            started_at=self._started_at,
            nodes=tuple(self._nodes),
            reported_silent=frozenset(self._dead_logged),
        )

    def report_views(self) -> dict[tuple[str, str], driver.Report]:
        return {
            (address, name): _volume_report(r)
            for address, by_volume in self._reports.items()
            for name, r in by_volume.items()
        }

    def commands(self, healthy: Mapping[str, bool] | None = None, jitter: float = 0.0) -> list[Command]:
        """What ``driver.decide`` has the coordinator do now (nothing is carried out)."""
        return driver.decide(
            self.pairs(),
            self.liveness(),
            self.report_views(),
            self._clock(),
            policy=self.policy(),
            backoff=dict(self._backoff),
            in_flight=frozenset(self._resync_tasks),
            healthy=healthy,
            jitter=jitter,
            lease_granted_at=dict(self._lease_granted_at),
        )

    # ================================================================ queries

    def is_alive(self, address: str) -> bool:
        return driver.Liveness(self._last_heard, self._started_at).alive(
            address, self._clock(), self.node_timeout_s
        )

    def pair(self, name: str) -> PairRecord | None:
        return self._pairs.get(name)

    def pairs(self) -> list[PairRecord]:
        return [self._pairs[k] for k in sorted(self._pairs)]

    def latest_report(self, address: str, volume: str) -> pb.VolumeReport | None:
        return self._reports.get(address, {}).get(volume)

    def resync_ready(self, pair: PairRecord) -> tuple[bool, str]:
        """Whether the driver would start a resync of ``pair`` now (once its
        secondary answers a health check), and why not."""
        why = driver.resync_blocker(
            pair,
            self.liveness(),
            self.report_views(),
            self._clock(),
            policy=self.policy(),
            backoff=self._backoff.get(pair.name, Backoff()),
            in_flight=frozenset(self._resync_tasks),
        )
        return why is None, why or "ready"

    def lease_remaining_s(self, pair: PairRecord) -> float:
        """Seconds the current primary's lease may still run (>= 0), as this coordinator counts it."""
        return max(
            0.0,
            driver.lease_remaining_s(
                pair.name,
                self._lease_granted_at,
                self._clock(),
                policy=self.policy(),
                started_at=self._started_at,
            ),
        )

    def assignment(self, pair: PairRecord, address: str, *, create: bool = False) -> pb.VolumeAssignment:
        """The assignment of ``pair`` to ``address``. ``create`` (CreateVolume):
        the node creates its store with the initial identity. A secondary that
        reports it has no data of the volume is rebuilt: ``create`` with
        ``identity.current = 0`` (idempotent: a store of the same UUID with
        data is kept by the node)."""
        role = pb.ROLE_PRIMARY if address == pair.primary else pb.ROLE_SECONDARY
        identity = pb.Identity(volume_uuid=pair.volume_uuid)
        if create:
            identity.current = pair.generation
        else:
            report = self.latest_report(address, pair.name)
            create = report is not None and report.data_missing and address == pair.secondary
        return pb.VolumeAssignment(
            spec=pb.VolumeSpec(name=pair.name, size_bytes=pair.size_bytes, block_size=pair.block_size),
            role=role,
            epoch=pair.epoch,
            peer_address=pair.peer_of(address),
            resync_mode=pair.resync_mode,  # type: ignore[arg-type]
            identity=identity,
            create=create,
            revert_to_generation=pair.revert_generation if address == pair.secondary else 0,
            switchover=self._switched_at.get(pair.name) == pair.epoch,
            discard_snapshot=self._discard_snapshot(pair, address),
            grants=self.grants_of(pair.name),
        )

    def grants_of(self, volume: str) -> list[pb.Grant]:
        """The grants of ``volume``, by user (what every assignment carries)."""
        return [
            pb.Grant(user=u, volume=volume, read_only=ro) for u, ro in sorted(self._grants.get(volume, {}).items())
        ]

    def _discard_snapshot(self, pair: PairRecord, address: str) -> str:
        d = self._discard.get(pair.name)
        return d[2] if d is not None and d[0] == pair.epoch and d[1] == address else ""

    def assignments_for(self, address: str) -> list[pb.VolumeAssignment]:
        return [
            self.assignment(p, address)
            for p in self.pairs()
            if address in (p.primary, p.secondary)
            and p.name not in self._creating
            and self._switch_hold.get(p.name) != address
            and self._resolve_hold.get(p.name) != address
        ]

    def volume_status(self, pair: PairRecord) -> pb.VolumeStatus:
        summary = summarize_extents(pair.failed_extents, STATUS_MAX_EXTENTS)
        report = self.latest_report(pair.primary, pair.name)
        sec_report = self.latest_report(pair.secondary, pair.name)
        primary_alive = self.is_alive(pair.primary)
        p = pair.progress
        status = pb.VolumeStatus(
            spec=pb.VolumeSpec(name=pair.name, size_bytes=pair.size_bytes, block_size=pair.block_size),
            state=status_proto(pair.state, primary_alive=primary_alive),  # type: ignore[arg-type]
            epoch=pair.epoch,
            primary=pair.primary,
            secondary=pair.secondary,
            failed_extents=[pb.Extent(offset=e.offset, length=e.length) for e in summary.first],
            failed_bytes=summary.total_bytes,
            fault_snapshot_id=pair.fault_snapshot_id,
            resync=pb.ResyncProgress(
                bytes_done=p.bytes_done,
                bytes_total=p.bytes_total,
                rate_bytes_per_s=p.rate_bytes_per_s,
                eta_s=p.eta_s,
                round=p.round,
            ),
            last_error=pair.last_error,
            state_changed_at=pair.state_changed_at,
            resync_mode=pair.resync_mode,  # type: ignore[arg-type]
            primary_alive=primary_alive,
            secondary_alive=self.is_alive(pair.secondary),
            volume_uuid=pair.volume_uuid,
            generation=pair.generation,
            secondary_generation=pair.secondary_generation,
            lease_remaining_s=self.lease_remaining_s(pair),
            out_of_sync_bytes=report.out_of_sync_bytes if report is not None else summary.total_bytes,
            auto_failover=pair.auto_failover,
            primary_data_missing=report is not None and report.data_missing,
            secondary_data_missing=sec_report is not None and sec_report.data_missing,
        )
        if pair.state is PairState.SPLIT_BRAIN:
            figures = driver.split_brain_figures(pair, self.report_views())
            if figures is not None:
                status.primary_changed_bytes, status.secondary_changed_bytes, status.common_generation = figures
        if report is not None:
            # Counters from the primary's latest heartbeat (since it started).
            status.acked_seq = report.acked_seq
            status.last_seq = report.last_seq
            status.resync_bytes_sent = report.resync_bytes_sent
            status.resync_chunks_refused = report.resync_chunks_refused
            status.last_stall_ms = report.last_stall_ms
            # A heartbeat's progress wins when it is newer than the last
            # ReportReplication progress and belongs to the current resync.
            if (
                pair.state is PairState.RESYNCING
                and report.epoch == pair.epoch
                and report.state == pb.PAIR_STATE_RESYNCING
                and report.HasField("resync")
                and self._report_at.get(pair.primary, 0.0) > self._progress_at.get(pair.name, 0.0)
            ):
                status.resync.CopyFrom(report.resync)
        return status

    # ================================================================ carrying out commands

    def _carry_out(self, cmds: Iterable[Command]) -> None:
        """Persist and record every command in list order, then send
        (StartResync). ProbeHealth and PushAssignment are awaited by their
        callers (``tick``, ``CreateVolume``). Must be called with ``self._lock`` held.
        """
        sends: list[StartResync] = []
        for cmd in cmds:
            if isinstance(cmd, ChangePair):
                self._change_pair(cmd)
                if cmd.event is PairEvent.SWITCHED_OVER:
                    self._switched_at[cmd.volume] = cmd.epoch
            elif isinstance(cmd, SaveProgress):
                progress = cmd.progress
                self.db.update_progress(cmd.volume, progress)
                self._pairs[cmd.volume] = replace(self._pairs[cmd.volume], progress=progress)
                self._progress_at[cmd.volume] = self._clock()
                self._progress_event(cmd.volume, progress)
            elif isinstance(cmd, SetBackoff):
                self._backoff[cmd.volume] = Backoff(cmd.failures, cmd.not_before)
            elif isinstance(cmd, ClearBackoff):
                self._backoff.pop(cmd.volume, None)
            elif isinstance(cmd, SaveGenerations):
                self._save_generations(cmd)
            elif isinstance(cmd, Alert):
                log.error("%s", cmd.message)
            elif isinstance(cmd, NodeSilent):
                self._dead_logged.add(cmd.address)
                if cmd.heard_before:
                    log.warning(
                        "node %s has not heartbeated for %.1f s: considered dead", cmd.address, cmd.silent_s
                    )
                    self._node_event(cmd.address, up=False, why=f"no heartbeat for {cmd.silent_s:.1f} s")
            elif isinstance(cmd, CreatePair):
                self._create_pair(cmd)
                self._lifecycle_event(cmd.spec.name, "created", cmd.reason)
            elif isinstance(cmd, DeletePair):
                self._lifecycle_event(cmd.volume, "deleted", cmd.reason)
                self.db.delete_pair(cmd.volume, cmd.reason, at=self._wall())  # its grants too
                self._pairs.pop(cmd.volume, None)
                self._grants.pop(cmd.volume, None)
            elif isinstance(cmd, ResizePair):
                self._resize_pair(cmd)
            elif isinstance(cmd, StartResync):
                sends.append(cmd)
        for send in sends:
            self._resync_tasks[send.volume] = asyncio.create_task(
                self._start_resync(send), name=f"start-resync-{send.volume}"
            )

    def _change_pair(self, cmd: ChangePair) -> None:
        """The pair's event and changed fields, in one transaction; then memory and the log."""
        pair = self._pairs[cmd.volume]
        if pair.state is not cmd.from_state:  # decided and carried out under one lock hold
            raise RuntimeError(
                f"volume {cmd.volume}: {cmd.event.value} decided in {cmd.from_state.value}, "
                f"but the pair is {pair.state.value}"
            )
        now = self._wall()
        updated = replace(
            pair,
            state=cmd.to_state,
            epoch=cmd.epoch,
            failed_extents=pair.failed_extents if cmd.failed_extents is None else cmd.failed_extents,
            fault_snapshot_id=pair.fault_snapshot_id
            if cmd.fault_snapshot_id is None
            else cmd.fault_snapshot_id,
            last_error=pair.last_error if cmd.last_error is None else cmd.last_error,
            progress=pair.progress if cmd.progress is None else cmd.progress,
            state_changed_at=now if cmd.to_state != cmd.from_state else pair.state_changed_at,
            primary=pair.primary if cmd.primary is None else cmd.primary,
            secondary=pair.secondary if cmd.secondary is None else cmd.secondary,
            generation=pair.generation if cmd.generation is None else cmd.generation,
            secondary_generation=pair.secondary_generation
            if cmd.secondary_generation is None
            else cmd.secondary_generation,
            full_copy_pending=pair.full_copy_pending
            if cmd.full_copy_pending is None
            else cmd.full_copy_pending,
            revert_generation=pair.revert_generation
            if cmd.revert_generation is None
            else cmd.revert_generation,
        )
        self.db.save_pair(updated, StateChange(cmd.from_state, cmd.reason), at=now)
        self._pairs[cmd.volume] = updated
        self._pair_events(cmd, pair, updated, at=now)
        if updated.primary != pair.primary:
            # A new primary: the old one's grant is no lease of the new one.
            self._lease_granted_at.pop(cmd.volume, None)
        if cmd.progress_reported:
            self._progress_at[cmd.volume] = self._clock()
        if cmd.to_state != cmd.from_state:
            log.info(
                "volume %s: %s -> %s (epoch %d, event %s): %s",
                cmd.volume,
                cmd.from_state.value,
                cmd.to_state.value,
                updated.epoch,
                cmd.event.value,
                cmd.reason,
            )
        else:
            log.info(
                "volume %s: stays %s (epoch %d, event %s): %s",
                cmd.volume,
                cmd.to_state.value,
                updated.epoch,
                cmd.event.value,
                cmd.reason,
            )

    def _save_generations(self, cmd: SaveGenerations) -> None:
        pair = self._pairs[cmd.volume]
        updated = replace(
            pair,
            generation=pair.generation if cmd.generation is None else cmd.generation,
            secondary_generation=pair.secondary_generation
            if cmd.secondary_generation is None
            else cmd.secondary_generation,
        )
        self.db.save_pair(updated)
        self._pairs[cmd.volume] = updated
        log.info(
            "volume %s: generation of primary %s is %016x, of secondary %s %016x",
            cmd.volume,
            updated.primary,
            updated.generation,
            updated.secondary,
            updated.secondary_generation,
        )

    def _create_pair(self, cmd: CreatePair) -> None:
        spec = cmd.spec
        pair = PairRecord(
            name=spec.name,
            size_bytes=spec.size_bytes,
            block_size=spec.block_size,
            primary=spec.primary,
            secondary=spec.secondary,
            epoch=1,
            state=PairState.IN_SYNC,
            resync_mode=int(spec.resync_mode),
            volume_uuid=cmd.volume_uuid,
            generation=cmd.generation,
            secondary_generation=cmd.generation,
            auto_failover=spec.auto_failover,
        )
        self._pairs[spec.name] = self.db.create_pair(pair, reason=cmd.reason, at=self._wall())

    # ================================================================ RPCs: nodes

    @_leader_only()
    async def RegisterNode(
        self, request: pb.RegisterNodeRequest, context: aio.ServicerContext
    ) -> pb.RegisterNodeReply:
        address = request.address
        await _check_node_address(context, address, "register")
        problem = driver.validate_register(address, request.role_hint)
        if problem:
            await _refuse(context, problem)
        async with self._lock:
            known = address in self._nodes
            self._nodes[address] = self.db.upsert_node(address, request.role_hint, registered_at=self._wall())
        # A (re)registering node starts afresh: forget its old reports.
        self._reports.pop(address, None)
        self._report_at.pop(address, None)
        self._mark_alive(address)
        log.info(
            "node %s %s (role hint %r, pid %d, version %r)",
            address,
            "re-registered" if known else "registered",
            request.role_hint,
            request.pid,
            request.version,
        )
        return pb.RegisterNodeReply(
            assignments=self.assignments_for(address), heartbeat_interval_s=self.heartbeat_interval_s
        )

    def _mark_alive(self, address: str) -> None:
        was_alive = self.is_alive(address)
        heard_before = address in self._last_heard
        self._last_heard[address] = self._clock()
        if not was_alive:
            log.info("node %s is %s", address, "alive again" if heard_before else "alive")
            self._node_event(address, up=True, why="heard again" if heard_before else "heard")
            self._dead_logged.discard(address)
            self.wake()

    @_leader_only(recheck=True)
    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: aio.ServicerContext
    ) -> pb.HeartbeatReply:
        address = request.address
        await _check_node_address(context, address, "heartbeat")
        if address not in self._nodes:
            return pb.HeartbeatReply(known=False)
        self.heartbeats_handled += 1
        self.volume_reports_handled += len(request.volumes)
        self._mark_alive(address)
        self._reports[address] = {r.name: r for r in request.volumes}
        self._report_at[address] = self._clock()
        views = {r.name: _volume_report(r) for r in request.volumes}
        self._heartbeat_progress_events(address, request.volumes)
        conflicted = False
        async with self._lock:
            for view in views.values():
                try:
                    self._carry_out(self._on_heartbeat(address, view))
                    self._carry_out(driver.on_identity(self._pairs.get(view.volume), address, view))
                except (NotLeader, StoreUnavailable, StoreConflict) as e:
                    # The store refused or did not answer (deposed, cut from
                    # etcd): said, not a traceback; the next heartbeat retries.
                    log.warning("volume %s: cannot apply the heartbeat report of %s: %s", view.volume, address, e)
                    conflicted = conflicted or isinstance(e, StoreConflict)
                except Exception:
                    # Never fail the heartbeat itself: the node would think we are gone.
                    log.exception("volume %s: cannot apply the heartbeat report of %s", view.volume, address)
            # Only now, with what this heartbeat changed persisted: a lease's
            # state must be durable.
            leases = self._grant_leases(address, views)
            assignments = self.assignments_for(address)
        if conflicted:
            # Our copy is stale (a write of ours that committed with its
            # answer lost, or another writer's): without a reload every
            # later compare-and-swap on the volume loses again, for ever
            # (simulator --coordinators 3, seed 20171).
            await self._reload_after_conflict()
        if any(v.no_data for v in views.values()):
            self.wake()  # a replica without data: a rebuild or a promotion is decided at once
        return pb.HeartbeatReply(known=True, assignments=assignments, leases=leases)

    def _grant_leases(self, address: str, views: Mapping[str, driver.Report]) -> list[pb.Lease]:
        """The leases for ``address`` (see ``driver.leases_for``), recorded as
        granted now. Call with ``self._lock`` held, right before replying."""
        if not self.leads():
            return []  # only the leader grants leases (issue 12)
        grants = [
            g
            for g in driver.leases_for(address, self.pairs(), views, policy=self.policy())
            # A held new primary is not primary yet: its grant would also
            # hide when the old primary's lease ends.
            if self._resolve_hold.get(g.volume) != address
        ]
        now = self._clock()
        for g in grants:
            # max: a new leader's floor (_take_over) may lie ahead of now.
            self._lease_granted_at[g.volume] = max(now, self._lease_granted_at.get(g.volume, now))
        return [
            pb.Lease(
                volume=g.volume,
                epoch=g.epoch,
                lease_s=g.lease_s,
                state=g.state.to_proto(),  # type: ignore[arg-type]
                generation=g.generation,
            )
            for g in grants
        ]

    def _on_heartbeat(self, address: str, report: driver.Report) -> list[Command]:
        return driver.on_heartbeat(
            self._pairs.get(report.volume),
            address,
            report,
            wall_now=self._wall(),
            policy=self.policy(),
            backoff=self._backoff.get(report.volume, Backoff()),
            now=self._clock(),
            jitter=random.random(),
        )

    # ================================================================ RPCs: volumes

    @_leader_only()
    async def CreateVolume(
        self, request: pb.CreateVolumeRequest, context: aio.ServicerContext
    ) -> pb.VolumeStatus:
        args = driver.CreateVolumeArgs(
            name=request.name,
            size_bytes=request.size_bytes,
            primary=request.primary,
            secondary=request.secondary,
            block_size=request.block_size,
            resync_mode=request.resync_mode,
            auto_failover=request.auto_failover,
        )
        spec = driver.volume_spec(args, self.default_resync_mode)
        async with self._lock:
            problem = driver.validate_create_volume(
                args,
                default_resync_mode=self.default_resync_mode,
                registered=self._nodes,
                existing=self._pairs,
                coordinator_address=self.coordinator_address,
            )
            if problem:
                await _refuse(context, problem)
            cmds = driver.plan_create_volume(
                args,
                default_resync_mode=self.default_resync_mode,
                # Both through the module attributes: the simulator patches them.
                volume_uuid=new_volume_uuid(),
                generation=volumes.new_generation(),
            )
            try:
                self._carry_out(cmds)
            except PairExists as e:
                await _abort(context, grpc.StatusCode.ALREADY_EXISTS, str(e))
            pair = self._pairs[spec.name]
            self._creating.add(pair.name)
        try:
            warnings = await self._push_create(pair, spec, cmds, context)
        finally:
            self._creating.discard(pair.name)
        status = self.volume_status(self._pairs.get(pair.name, pair))
        status.warnings.extend(warnings)  # issue 13: a thin volume larger than a node's free space
        return status

    async def _push_create(
        self,
        pair: PairRecord,
        spec: driver.VolumeSpec,
        cmds: list[Command],
        context: aio.ServicerContext,
    ) -> list[str]:
        """CreateVolume's pushes (with ``create``), secondary first; a failed one
        rolls the creation back. Returns the nodes' warnings (issue 13: a thin
        volume larger than the free space of a node's data directory)."""
        log.info(
            "volume %s created: primary %s, secondary %s, %d bytes, block size %d, epoch %d, state %s",
            pair.name,
            pair.primary,
            pair.secondary,
            pair.size_bytes,
            pair.block_size,
            pair.epoch,
            pair.state.value,
        )
        warnings: list[str] = []
        for push in cmds:
            if not isinstance(push, PushAssignment):
                continue
            try:
                answer = await self._stub(push.address).AssignVolume(
                    self.assignment(pair, push.address, create=push.create), timeout=self.rpc_timeout_s
                )
                if answer.warning:
                    warnings.append(answer.warning)
                    log.warning("volume %s: %s", pair.name, answer.warning)
            except (aio.AioRpcError, OSError) as e:
                error = _rpc_error_text(e)
                async with self._lock:
                    cur = self._pairs.get(pair.name)
                    rollback, problem = driver.on_push_failed(
                        spec,
                        push.address,
                        error,
                        still_ours=cur is not None and cur.created_at == pair.created_at,
                    )
                    self._carry_out(rollback)
                log.warning(
                    "volume %s: creation rolled back, AssignVolume to %s failed: %s",
                    pair.name,
                    push.address,
                    error,
                )
                await _refuse(context, problem)
        return warnings

    async def GetVolume(self, request: pb.GetVolumeRequest, context: aio.ServicerContext) -> pb.VolumeStatus:
        self._mark_follower(context)
        pair = self._pairs.get(request.name)
        if pair is None:
            await _refuse(context, driver.not_found(request.name, self._pairs))
        return self.volume_status(pair)

    async def ListVolumes(
        self, request: pb.ListVolumesRequest, context: aio.ServicerContext
    ) -> pb.ListVolumesReply:
        self._mark_follower(context)
        return pb.ListVolumesReply(volumes=[self.volume_status(p) for p in self.pairs()])

    # ================================================================ RPCs: volume lifecycle (issue 13)

    def _busy(self, name: str) -> str:
        """The operation of this shell still running on volume ``name`` ("" if none)."""
        if name in self._creating:
            return "creation"
        if name in self._switching:
            return "switchover"
        if name in self._resizing:
            return "resize"
        if name in self._resolve_hold:
            return "resolve"
        return ""

    @_leader_only()
    async def DeleteVolume(self, request: pb.DeleteVolumeRequest, context: aio.ServicerContext) -> pb.DeleteVolumeReply:
        """Remove the pair record (and its grants), then tell both nodes,
        primary first. A node not reached learns it at its next registration."""
        name = request.name
        async with self._lock:
            pair = self._pairs.get(name)
            problem = driver.delete_refusal(pair, name, self._pairs, busy=self._busy(name))
            if problem is not None:
                log.warning("volume %s: delete refused: %s", name, problem.message)
                await _refuse(context, problem)
            assert pair is not None
            self._carry_out(driver.plan_delete(pair))
            # What memory held of it: a new pair of the name starts clean.
            for held in (self._backoff, self._lease_granted_at, self._switched_at, self._discard,
                         self._resolve_hold, self._progress_at):
                held.pop(name, None)  # type: ignore[attr-defined]
            for by_volume in self._reports.values():
                by_volume.pop(name, None)
            task = self._resync_tasks.pop(name, None)
            if task is not None:
                task.cancel()
        log.warning("volume %s deleted (epoch %d, %s): telling %s and %s", name, pair.epoch, pair.state.value,
                    pair.primary, pair.secondary)
        removed: list[str] = []
        not_reached: list[str] = []
        notes: list[str] = []
        for address in (pair.primary, pair.secondary):
            try:
                answer = await self._stub(address).DeleteVolume(
                    pb.NodeDeleteVolumeRequest(volume=name, epoch=pair.epoch, volume_uuid=pair.volume_uuid),
                    timeout=self.rpc_timeout_s,
                )
            except (aio.AioRpcError, OSError) as e:
                not_reached.append(address)
                log.warning("volume %s: DeleteVolume on %s failed (%s); it keeps its store and never serves it "
                            "(it finds no pair claiming it when it registers again)", name, address,
                            _rpc_error_text(e))
                continue
            if answer.removed:
                removed.append(address)
            else:
                notes.append(answer.message)
        message = f"volume {name!r} deleted: the pair record and its grants are gone"
        if removed:
            message += f"; store removed on {', '.join(removed)}"
        if notes:
            message += f"; {'; '.join(notes)}"
        if not_reached:
            message += (f"; {', '.join(not_reached)} did not answer: it keeps its store on disk and never serves it "
                        "(remove it there by hand once it is back)")
        log.warning("%s", message)
        return pb.DeleteVolumeReply(message=message, removed_on=removed, not_reached=not_reached)

    @_leader_only()
    async def ResizeVolume(self, request: pb.ResizeVolumeRequest, context: aio.ServicerContext) -> pb.ResizeVolumeReply:
        """Grow the volume online while in sync: the secondary first, then the
        primary, then the pair's size (``driver.plan_resize``)."""
        name, size = request.name, request.size_bytes
        # A refusal that clears by itself (a node that has not reported the
        # current epoch yet, just after a create or a resync) is checked again
        # until a live node must have reported: node_timeout_s at most.
        wait_until = self._clock() + self.node_timeout_s
        while True:
            async with self._lock:
                pair = self._pairs.get(name)
                if pair is None:
                    await _refuse(context, driver.not_found(name, self._pairs))
                busy = self._busy(name)
                problem = driver.resize_refusal(
                    pair, size, pair.block_size, self.liveness(), self.report_views(), self._clock(),
                    policy=self.policy()
                ) if not busy else driver.delete_refusal(pair, name, self._pairs, busy=busy)
                if problem is not None and problem.retry_after_s is not None and self._clock() < wait_until:
                    retry_after_s = problem.retry_after_s
                else:
                    if problem is not None:
                        log.warning("volume %s: resize refused: %s", name, problem.message)
                        await _refuse(context, problem)
                    if size == pair.size_bytes:
                        return pb.ResizeVolumeReply(status=self.volume_status(pair), old_size_bytes=size,
                                                    message=f"volume {name!r} is already {size} bytes; nothing to do")
                    self._resizing.add(name)
                    break
            await asyncio.sleep(retry_after_s)
        try:
            return await self._resize(pair, size, context)
        finally:
            self._resizing.discard(name)

    async def _resize(self, pair: PairRecord, size: int, context: aio.ServicerContext) -> pb.ResizeVolumeReply:
        name, epoch, old = pair.name, pair.epoch, pair.size_bytes
        warnings: list[str] = []
        grown: list[str] = []
        # The secondary first: once the primary accepts a write to a new
        # block, the secondary has that block too.
        for role, address in (("secondary", pair.secondary), ("primary", pair.primary)):
            try:
                answer = await self._stub(address).ResizeVolume(
                    pb.NodeResizeVolumeRequest(volume=name, epoch=epoch, size_bytes=size), timeout=self.rpc_timeout_s
                )
            except (aio.AioRpcError, OSError) as e:
                code = e.code() if isinstance(e, aio.AioRpcError) else grpc.StatusCode.UNAVAILABLE
                if code not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT):
                    code = grpc.StatusCode.UNAVAILABLE
                done = (f"{', '.join(grown)} grew to {size} bytes (harmless: a node larger than the pair's size "
                        "is the same volume), " if grown else "")
                text = (f"volume {name!r}: the {role} {address} did not grow: {_rpc_error_text(e)}; {done}the "
                        f"pair's size stays {old} bytes; retry the resize (it is idempotent)")
                log.warning("%s", text)
                await _abort(context, code, text)
            grown.append(f"{role} {address}")
            if answer.warning:
                warnings.append(answer.warning)
        async with self._lock:
            current = self._pairs.get(name)
            outcome = driver.not_found(name, self._pairs) if current is None else driver.plan_resize(
                current, size, current.block_size, self.liveness(), self.report_views(), self._clock(),
                epoch=epoch, policy=self.policy(),
            )
            if not isinstance(outcome, Problem):
                self._carry_out(outcome)
        if isinstance(outcome, Problem):
            log.warning("volume %s: resize not recorded: %s", name, outcome.message)
            await _refuse(context, outcome)
        resized = self._pairs[name]
        message = (f"volume {name!r} grown online from {old} to {resized.size_bytes} bytes "
                   f"({resized.size_bytes - old} bytes added, reading as zeros): the secondary {pair.secondary} "
                   f"first, then the primary {pair.primary}; writes up to the new end work now")
        return pb.ResizeVolumeReply(status=self.volume_status(resized), message=message, old_size_bytes=old,
                                    warnings=warnings)

    def _resize_pair(self, cmd: ResizePair) -> None:
        """Persist a pair's new size with its event (CoordinatorDB.resize_pair), then memory and the log."""
        pair = self._pairs[cmd.volume]
        self.db.resize_pair(cmd.volume, cmd.size_bytes, cmd.reason, at=self._wall())
        self._pairs[cmd.volume] = replace(pair, size_bytes=cmd.size_bytes)
        log.warning("volume %s: %s", cmd.volume, cmd.reason)
        if self._subscribers:
            self._publish(self._event(self._pairs[cmd.volume], "resized", str(pair.size_bytes),
                                      str(cmd.size_bytes), cmd.reason))

    # ================================================================ RPCs: replication reports

    @_leader_only()
    async def ReportReplication(
        self, request: pb.ReplicationReport, context: aio.ServicerContext
    ) -> pb.ReportReplicationReply:
        await _check_node_address(context, request.reporter, "report replication")
        self.replication_reports_handled += 1
        async with self._lock:
            pair = self._pairs.get(request.volume)
            if pair is None:
                await _refuse(context, driver.not_found(request.volume, self._pairs))
            outcome = driver.on_report(
                pair,
                _replication_report(request),
                resync_started=pair.state is PairState.DEGRADED
                and self.db.resync_started_at_epoch(pair.name, pair.epoch),
                secondary_alive=self.is_alive(pair.secondary),
                backoff=self._backoff.get(pair.name, Backoff()),
                now=self._clock(),
                policy=self.policy(),
                jitter=random.random(),
            )
            if isinstance(outcome, Problem):
                await _refuse(context, outcome)
            self._carry_out(outcome)
            if request.nacks:
                self._nack_event(request)
            view = self._replication_view(request)
            self._carry_out(driver.on_identity(self._pairs[pair.name], request.reporter, view))
            pair = self._pairs[pair.name]
            # After what the report changed is persisted (the lease's state is durable).
            leases = self._grant_leases(request.reporter, {pair.name: view})
        reply = pb.ReportReplicationReply(
            state=pair.state.to_proto(),  # type: ignore[arg-type]
            epoch=pair.epoch,
            failed_extents=[pb.Extent(offset=e.offset, length=e.length) for e in pair.failed_extents],
        )
        if leases:
            reply.lease.CopyFrom(leases[0])
        return reply

    def _replication_view(self, request: pb.ReplicationReport) -> driver.Report:
        """A ReplicationReport as the identity part of a heartbeat report: its
        identity, or (if it carries none) the one of the reporter's latest heartbeat."""
        if request.HasField("identity"):
            return driver.Report(
                volume=request.volume,
                epoch=request.epoch,
                state=_pair_state(request.state),
                identity=Identity.from_proto(request.identity),
            )
        latest = self.latest_report(request.reporter, request.volume)
        if latest is not None:
            return _volume_report(latest)
        return driver.Report(volume=request.volume, epoch=request.epoch, state=_pair_state(request.state))

    # ================================================================ RPCs: promotion

    @_leader_only()
    async def Promote(self, request: pb.PromoteRequest, context: aio.ServicerContext) -> pb.PromoteReply:
        async with self._lock:
            pair = self._pairs.get(request.volume)
            if pair is None:
                await _refuse(context, driver.not_found(request.volume, self._pairs))
            outcome = driver.plan_promote(
                pair,
                self.liveness(),
                self.report_views(),
                self._clock(),
                force=request.force,
                policy=self.policy(),
                lease_granted_at=dict(self._lease_granted_at),
            )
            if isinstance(outcome, Problem):
                log.warning("volume %s: promotion refused: %s", request.volume, outcome.message)
                await _refuse(context, outcome)
            self._carry_out(outcome)
            pair = self._pairs[pair.name]
        failed = await self._push_assignments(outcome)
        message = pair.last_error
        if failed:
            message += (
                f"; the assignment did not reach {', '.join(failed)} yet: it gets it with its next heartbeat"
            )
        return pb.PromoteReply(status=self.volume_status(pair), message=message)

    @_leader_only()
    async def Switchover(self, request: pb.SwitchoverRequest, context: aio.ServicerContext) -> pb.SwitchoverReply:
        """A planned role swap with no data loss (docs/FAILOVER.md section 5)."""
        name = request.volume
        timeout_s = request.handover_timeout_s or DEFAULT_HANDOVER_TIMEOUT_S
        if not 0 < timeout_s <= MAX_HANDOVER_TIMEOUT_S:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"handover timeout {timeout_s} s is not in (0, {MAX_HANDOVER_TIMEOUT_S:.0f}] s",
            )
        async with self._lock:
            pair = self._pairs.get(name)
            if pair is None:
                await _refuse(context, driver.not_found(name, self._pairs))
            if name in self._switching:
                await _abort(
                    context,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"volume {name!r}: a switchover is already running; wait for its answer",
                )
            problem = driver.switchover_refusal(
                pair, self.liveness(), self.report_views(), self._clock(), policy=self.policy()
            )
            if problem is not None:
                log.warning("volume %s: switchover refused: %s", name, problem.message)
                await _refuse(context, problem)
            self._switching.add(name)
        try:
            return await self._switch_over(pair, timeout_s, context)
        finally:
            self._switching.discard(name)
            self._switch_hold.pop(name, None)

    async def _switch_over(
        self, pair: PairRecord, timeout_s: float, context: aio.ServicerContext
    ) -> pb.SwitchoverReply:
        name, old, epoch = pair.name, pair.primary, pair.epoch
        handover_id = new_handover_id(self.coordinator_address)
        # Real time, not the injected clock: the stall is a measurement, and
        # the half-timeout check races the node's own (real) handover timer.
        t0 = time.monotonic()
        try:
            # Half the timeout: the other half is for persisting and demoting
            # before the old primary reopens its gate by itself.
            reply = await self._stub(old).PrepareHandover(
                pb.PrepareHandoverRequest(volume=name, epoch=epoch, timeout_s=timeout_s, handover_id=handover_id),
                timeout=timeout_s / 2,
            )
        except (aio.AioRpcError, OSError) as e:
            # Also after a refusal: the answer may be a timeout whose request
            # did close the gate. The id keeps this from reopening a gate
            # another attempt closed.
            await self._release_handover(old, name, epoch, handover_id)
            code = e.code() if isinstance(e, aio.AioRpcError) else grpc.StatusCode.UNAVAILABLE
            if code not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT):
                code = grpc.StatusCode.UNAVAILABLE
            text = (
                f"volume {name!r}: primary {old} did not hand over: {_rpc_error_text(e)}; nothing was swapped, "
                "the pair stays as it was (writes resume on the primary); retry"
            )
            log.warning("%s", text)
            await _abort(context, code, text)
        handover = driver.Handover(
            address=old,
            epoch=reply.epoch,
            acked_seq=reply.acked_seq,
            identity=Identity.from_proto(reply.identity) if reply.HasField("identity") else None,
            drain_s=reply.drain_s,
        )
        async with self._lock:
            current = self._pairs.get(name)
            outcome: Problem | list[Command]
            if current is None:
                outcome = driver.not_found(name, self._pairs)
            elif time.monotonic() - t0 >= timeout_s / 2:
                outcome = Problem(
                    driver.Code.UNAVAILABLE,
                    f"volume {name!r}: primary {old} took {time.monotonic() - t0:.1f} s to hand over, past half "
                    f"the handover timeout ({timeout_s:.1f} s); nothing was swapped, retry",
                )
            else:
                outcome = driver.plan_switchover(
                    current, self.liveness(), self.report_views(), self._clock(), handover, policy=self.policy()
                )
            if isinstance(outcome, Problem):
                log.warning("volume %s: switchover abandoned: %s", name, outcome.message)
            else:
                self._switch_hold[name] = pair.secondary
                self._carry_out(outcome)
        if isinstance(outcome, Problem):
            await self._release_handover(old, name, epoch, handover_id)
            await _refuse(context, outcome)
        swapped = self._pairs[name]
        # The old primary first: it refuses the writes waiting at its gate
        # ("not its primary") and becomes the secondary at the new epoch, so
        # it accepts the new primary's stream; then the new primary.
        failed = await self._push_assignments([PushAssignment(name, old)])
        self._switch_hold.pop(name, None)
        failed += await self._push_assignments([PushAssignment(name, swapped.primary)])
        stall_s = time.monotonic() - t0
        message = (
            f"volume {name!r} switched over: primary {swapped.primary}, secondary {swapped.secondary}, epoch "
            f"{swapped.epoch}, in sync; write stall {stall_s:.3f} s (from PrepareHandover sent to the new "
            f"primary's write path open), of which the old primary's drain {handover.drain_s:.3f} s"
        )
        if failed:
            message += (
                f"; the assignment did not reach {', '.join(failed)} yet: it gets it with its next heartbeat "
                "(the stall lasts until then)"
            )
        log.info("%s", message)
        return pb.SwitchoverReply(
            status=self.volume_status(swapped),
            message=message,
            stall_s=stall_s,
            drain_s=handover.drain_s,
            acked_seq=handover.acked_seq,
        )

    async def _release_handover(self, address: str, volume: str, epoch: int, handover_id: str) -> None:
        """Best effort: reopen the gate attempt ``handover_id`` closed on the
        old primary now (else it reopens by itself at its timeout)."""
        try:
            await self._stub(address).PrepareHandover(
                pb.PrepareHandoverRequest(volume=volume, epoch=epoch, release=True, handover_id=handover_id),
                timeout=self.rpc_timeout_s,
            )
        except (aio.AioRpcError, OSError) as e:
            log.warning(
                "volume %s: could not reopen the gate of %s (%s); it reopens by itself at its handover timeout",
                volume, address, _rpc_error_text(e),
            )

    # ================================================================ RPCs: grants

    async def _grant_target(self, context: aio.ServicerContext, user: str, volume: str) -> None:
        """Refuse (INVALID_ARGUMENT, NOT_FOUND) a grant request naming no valid user or no known volume."""
        try:
            certs.check_user_name(user)
        except certs.CertError as e:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"cannot grant to {user!r}: {e}")
        if volume not in self._pairs:
            await _refuse(context, driver.not_found(volume, self._pairs))

    @_leader_only()
    async def Grant(self, request: pb.GrantRequest, context: aio.ServicerContext) -> pb.GrantReply:
        """Let ``user`` read ``volume`` and, unless ``read_only``, write it."""
        user, volume, read_only = request.user, request.volume, request.read_only
        async with self._lock:
            await self._grant_target(context, user, volume)
            try:
                before = self.db.set_grant(volume, user, read_only, at=self._wall())
            except KeyError:
                await _refuse(context, driver.not_found(volume, self._pairs))
            self._grants.setdefault(volume, {})[user] = read_only
        access = "read (read-only)" if read_only else "read and write"
        if before is None:
            was = ""
        elif before.read_only == read_only:
            was = " (unchanged)"
        else:
            was = f" (was {'read-only' if before.read_only else 'read-write'})"
        note = " (admin may do everything anyway)" if user == authz.ADMIN_USER else ""
        message = (
            f"user {user!r} may now {access} volume {volume!r}{was}{note}; the nodes apply it with their "
            "next heartbeat"
        )
        log.warning("grant: %s", message)
        return pb.GrantReply(message=message)

    @_leader_only()
    async def Revoke(self, request: pb.RevokeRequest, context: aio.ServicerContext) -> pb.RevokeReply:
        """Take ``user``'s grant on ``volume`` away (NOT_FOUND if it had none)."""
        user, volume = request.user, request.volume
        async with self._lock:
            await self._grant_target(context, user, volume)
            if user not in self._grants.get(volume, {}):
                held = ", ".join(sorted(self._grants.get(volume, {}))) or "nobody"
                await _abort(
                    context, grpc.StatusCode.NOT_FOUND,
                    f"user {user!r} holds no grant on volume {volume!r} (granted: {held})",
                )
            self.db.delete_grant(volume, user)
            self._grants[volume].pop(user, None)
            if not self._grants[volume]:
                del self._grants[volume]
        message = (
            f"user {user!r} may no longer use volume {volume!r}; the nodes apply it with their next heartbeat "
            "(streams already open are refused from their next request)"
        )
        log.warning("revoke: %s", message)
        return pb.RevokeReply(message=message)

    async def ListGrants(self, request: pb.ListGrantsRequest, context: aio.ServicerContext) -> pb.ListGrantsReply:
        """Every grant, or those of ``request.volume`` (NOT_FOUND if unknown)."""
        if request.volume and request.volume not in self._pairs:
            await _refuse(context, driver.not_found(request.volume, self._pairs))
        names = [request.volume] if request.volume else sorted(self._grants)
        return pb.ListGrantsReply(grants=[g for name in names for g in self.grants_of(name)])

    # ================================================================ RPCs: resolve (split brain)

    @_leader_only()
    async def Resolve(self, request: pb.ResolveRequest, context: aio.ServicerContext) -> pb.ResolveReply:
        """End a split brain keeping ``request.keep``'s data (docs/FAILOVER.md section 6)."""
        name = request.volume
        async with self._lock:
            pair = self._pairs.get(name)
            if pair is None:
                await _refuse(context, driver.not_found(name, self._pairs))
            outcome = driver.plan_resolve(
                pair, self.liveness(), self.report_views(), self._clock(), request.keep, policy=self.policy()
            )
            if isinstance(outcome, Problem):
                log.warning("volume %s: resolve refused: %s", name, outcome.message)
                await _refuse(context, outcome)
            if request.dry_run:
                return self._resolve_reply(pair, outcome, dry_run=True)
            self._discard[name] = (pair.epoch + 1, outcome.discarded, outcome.snapshot)
            if outcome.hold:
                self._resolve_hold[name] = outcome.hold
            self._carry_out(outcome.commands)
            pair = self._pairs[name]
        log.warning("volume %s: %s", name, pair.last_error)
        # The discarded replica first: its answer says what it wrote since the
        # common generation (exact: it is fenced, its write path stopped).
        answer, why = await self._assign_one(name, outcome.discarded)
        extents: list[tuple[int, int]] = [(e.offset, e.length) for e in outcome.discarded_extents]
        snapshot_id = 0
        exact = False
        if answer is not None:
            extents = [(e.offset, e.length) for e in answer.divergent_extents]
            snapshot_id, exact = answer.discard_snapshot_id, True
            async with self._lock:
                current = self._pairs.get(name)
                if current is not None and current.epoch == pair.epoch:
                    self._carry_out(
                        driver.resolve_merge_discarded(
                            current,
                            extents,
                            f"{outcome.discarded}'s writes since the common generation (discarded by the resolve) "
                            "added to the failed extents",
                            now=self._clock(),
                            policy=self.policy(),
                        )
                    )
                self._resolve_hold.pop(name, None)
        failed = [] if answer is not None else [outcome.discarded]
        if outcome.hold and name in self._resolve_hold:
            message_hold = (
                f"; {outcome.kept} becomes primary once {outcome.discarded} applied its demotion or its lease "
                "expired"
            )
        else:
            message_hold = ""
            failed += await self._push_assignments([PushAssignment(name, outcome.kept)])
        reply = self._resolve_reply(self._pairs.get(name, pair), outcome, dry_run=False)
        reply.ClearField("discarded_extents")
        reply.discarded_extents.extend(pb.Extent(offset=o, length=n) for o, n in extents)
        reply.discarded_bytes = sum(n for _, n in extents)
        reply.discarded_exact = exact or outcome.exact
        reply.discard_snapshot_id = snapshot_id
        reply.message = (
            f"volume {name!r}: kept {outcome.kept}; {outcome.discarded} discards {len(extents)} extents "
            f"({reply.discarded_bytes} bytes) written since the common generation {outcome.common:016x}, its state "
            f"kept in snapshot {outcome.snapshot!r}"
            + (f" (id {snapshot_id})" if snapshot_id else "")
            + f" on {outcome.discarded}; the resync from {outcome.kept} follows (changes only)"
            + message_hold
        )
        if failed:
            reply.message += (
                f"; the assignment did not reach {', '.join(failed)} yet ({why or 'unreachable'}): it gets it with "
                "its next heartbeat"
            )
        log.warning("%s", reply.message)
        return reply

    def _resolve_reply(self, pair: PairRecord, plan: driver.ResolvePlan, *, dry_run: bool) -> pb.ResolveReply:
        reply = pb.ResolveReply(
            status=self.volume_status(pair),
            kept=plan.kept,
            discarded=plan.discarded,
            common_generation=plan.common,
            discarded_bytes=sum(e.length for e in plan.discarded_extents) or plan.discarded_bytes_estimate,
            discarded_exact=plan.exact,
            discard_snapshot=plan.snapshot,
            kept_changed_bytes=plan.kept_changed_bytes,
            primary=plan.primary,
            secondary=plan.secondary,
        )
        reply.discarded_extents.extend(pb.Extent(offset=e.offset, length=e.length) for e in plan.discarded_extents)
        if dry_run:
            if plan.exact:
                what = f"{len(plan.discarded_extents)} extents, {reply.discarded_bytes} bytes"
            else:
                what = (
                    f"at most {reply.discarded_bytes} bytes so far (its out-of-sync bytes: it is the primary and "
                    "writes until it is fenced; the extents are measured then)"
                )
            reply.message = (
                f"volume {pair.name!r} (dry run): keeping {plan.kept} would discard what {plan.discarded} wrote "
                f"since the common generation {plan.common:016x}: {what}"
            )
        return reply

    async def _assign_one(self, volume: str, address: str) -> tuple[pb.AssignVolumeReply | None, str]:
        """Push ``volume``'s assignment to ``address`` and return its answer (None, why: not reached)."""
        pair = self._pairs.get(volume)
        if pair is None:
            return None, "the volume is gone"
        try:
            answer = await self._stub(address).AssignVolume(
                self.assignment(pair, address), timeout=self.rpc_timeout_s
            )
        except (aio.AioRpcError, OSError) as e:
            log.warning("volume %s: AssignVolume to %s failed (%s); its next heartbeat delivers it",
                        volume, address, _rpc_error_text(e))
            return None, _rpc_error_text(e)
        log.info("volume %s: assignment pushed to %s (epoch %d)", volume, address, pair.epoch)
        return answer, ""

    def _release_resolve_holds(self) -> list[Command]:
        """A kept secondary's primary assignment is released once the old
        primary reports its demotion (the current epoch, as secondary) or its
        lease certainly expired. Call with ``self._lock`` held."""
        cmds: list[Command] = []
        for name, address in list(self._resolve_hold.items()):
            pair = self._pairs.get(name)
            if pair is None or pair.primary != address:
                self._resolve_hold.pop(name, None)
                continue
            old = self.latest_report(pair.secondary, name)
            demoted = old is not None and old.epoch >= pair.epoch and old.role == pb.ROLE_SECONDARY
            if demoted or self.lease_remaining_s(pair) <= 0:
                log.warning("volume %s: %s is primary now (%s)", name, address,
                            "the old primary applied its demotion" if demoted else "the old primary's lease expired")
                self._resolve_hold.pop(name, None)
                cmds.append(PushAssignment(name, address))
        return cmds

    async def _push_assignments(self, cmds: Iterable[Command]) -> list[str]:
        """Push the assignments among ``cmds`` (after they were carried out). A
        failed push is not rolled back: the node gets the same assignment with
        its next heartbeat reply. Returns the addresses that were not reached."""
        failed: list[str] = []
        for cmd in cmds:
            if not isinstance(cmd, PushAssignment):
                continue
            pair = self._pairs.get(cmd.volume)
            if pair is None:
                continue
            try:
                await self._stub(cmd.address).AssignVolume(
                    self.assignment(pair, cmd.address, create=cmd.create), timeout=self.rpc_timeout_s
                )
                log.info("volume %s: assignment pushed to %s (epoch %d)", cmd.volume, cmd.address, pair.epoch)
            except (aio.AioRpcError, OSError) as e:
                failed.append(cmd.address)
                log.warning(
                    "volume %s: AssignVolume to %s failed (%s); its next heartbeat delivers it",
                    cmd.volume,
                    cmd.address,
                    _rpc_error_text(e),
                )
        return failed

    # ================================================================ background: the tick

    async def tick(self) -> None:
        """One round of the background checks: decide and carry out; probe the
        secondaries of the pairs that are ready for a resync; decide again with
        the answers (on the state as it is then) and carry out."""
        if not self.leads():  # issue 12: a follower only refreshes its copy
            await self._take_over_if_elected()
            if not self.leads():
                await self._follow_store()
                return
        async with self._lock:
            cmds = self._release_resolve_holds() + self.commands(jitter=random.random())
            self._carry_out(cmds)
        await self._push_assignments(cmds)
        probes = [c for c in cmds if isinstance(c, ProbeHealth)]
        if not probes:
            return
        healthy: dict[str, bool] = {}
        for probe in probes:
            if probe.address not in healthy:
                healthy[probe.address] = await rpc.health_check(
                    probe.address, timeout_s=HEALTH_CHECK_TIMEOUT_S
                )
            if not healthy[probe.address]:
                log.debug(
                    "volume %s: secondary %s does not answer health checks yet", probe.volume, probe.address
                )
        async with self._lock:
            cmds = self.commands(healthy, jitter=random.random())
            self._carry_out(cmds)
        await self._push_assignments(cmds)

    async def _start_resync(self, cmd: StartResync) -> None:
        name, primary, epoch = cmd.volume, cmd.primary, cmd.epoch
        try:
            error: str | None = None
            try:
                async for attempt in AsyncRetrying(
                    stop=stop_after_attempt(self.start_resync_attempts),
                    wait=wait_exponential_jitter(multiplier=0.2, max=2.0, jitter=0.2),
                    retry=retry_if_exception(_retryable),
                    reraise=True,
                ):
                    with attempt:
                        reply = await self._stub(primary).StartResync(
                            pb.StartResyncRequest(
                                volume=name,
                                epoch=epoch,
                                extra_extents=[
                                    pb.Extent(offset=e.offset, length=e.length) for e in cmd.extra_extents
                                ],
                                full_copy=cmd.full_copy,
                            ),
                            timeout=self.rpc_timeout_s,
                        )
                log.info(
                    "volume %s: primary %s accepted StartResync at epoch %d: %s",
                    name,
                    primary,
                    epoch,
                    reply.message,
                )
            except (aio.AioRpcError, OSError) as e:
                error = _rpc_error_text(e)
            if error is None:
                return
            async with self._lock:
                cmds = driver.on_start_resync_failed(
                    self._pairs.get(name),
                    primary,
                    epoch,
                    error,
                    backoff=self._backoff.get(name, Backoff()),
                    now=self._clock(),
                    policy=self.policy(),
                    jitter=random.random(),
                )
                if not cmds:
                    log.info(
                        "volume %s: StartResync at epoch %d failed (%s), but the pair has moved on",
                        name,
                        epoch,
                        error,
                    )
                    return
                conflict: bool | None = None
                try:
                    self._carry_out(cmds)
                except (NotLeader, StoreUnavailable, StoreConflict) as e:
                    # The failure is not recorded (the background check
                    # decides again); said, not a task's lost traceback.
                    log.warning("volume %s: StartResync at epoch %d failed (%s), and recording that failed: %s",
                                name, epoch, error, e)
                    conflict = isinstance(e, StoreConflict)
                now = self._clock()
                delay = self._backoff.get(name, Backoff(not_before=now)).not_before - now
            if conflict is not None:
                if conflict:
                    await self._reload_after_conflict()
                return
            log.warning(
                "volume %s: resync not started (%s); next attempt in %.1f s", name, error, max(0.0, delay)
            )
        finally:
            if self._resync_tasks.get(name) is asyncio.current_task():
                del self._resync_tasks[name]

    # ================================================================ events (WatchEvents, issue 13)
    # Emitted where a pair record changes (``_change_pair``: one event per
    # pair event, plus role_change when the roles moved), resync progress at
    # most every PROGRESS_EVENT_INTERVAL_S per volume (SaveProgress and the
    # primary's heartbeats), NACKs (ReportReplication), node liveness, and
    # creation/deletion. Building an event costs nothing without subscribers.

    def _publish(self, event: pb.Event) -> None:
        self._event_seq += 1
        event.seq = self._event_seq
        for sub in list(self._subscribers):
            sub.offer(event)

    def _event(self, pair: PairRecord, kind: str, old: str, new: str, message: str, *,
               at: float | None = None, progress: driver.Progress | None = None) -> pb.Event:
        ev = pb.Event(
            time_unix_s=self._wall() if at is None else at,
            volume=pair.name,
            epoch=pair.epoch,
            kind=kind,
            old=old,
            new=new,
            message=message,
            primary=pair.primary,
            secondary=pair.secondary,
        )
        if progress is not None:
            ev.progress.CopyFrom(_progress_proto(progress))
        return ev

    def _pair_events(self, cmd: ChangePair, before: PairRecord, after: PairRecord, *, at: float) -> None:
        if not self._subscribers:
            return
        kind = _EVENT_KINDS.get(cmd.event, cmd.event.value)
        resync = kind in ("resync_start", "resync_done") or after.state is PairState.RESYNCING
        self._publish(self._event(after, kind, cmd.from_state.value, cmd.to_state.value, cmd.reason, at=at,
                                  progress=after.progress if resync else None))
        if (after.primary, after.secondary) != (before.primary, before.secondary):
            self._publish(self._event(
                after, "role_change", f"primary {before.primary}, secondary {before.secondary}",
                f"primary {after.primary}, secondary {after.secondary}",
                f"{cmd.event.value} at epoch {after.epoch}: {after.primary} is the primary now", at=at,
            ))

    def _progress_event(self, volume: str, progress: driver.Progress) -> None:
        """A resync_progress event, unless one went out for ``volume`` less than
        PROGRESS_EVENT_INTERVAL_S ago."""
        pair = self._pairs.get(volume)
        now = self._clock()
        if pair is None or not self._subscribers or now - self._progress_event_at.get(volume, -PROGRESS_EVENT_INTERVAL_S) < (
            PROGRESS_EVENT_INTERVAL_S
        ):
            return
        self._progress_event_at[volume] = now
        pct = 100.0 * progress.bytes_done / progress.bytes_total if progress.bytes_total else 0.0
        message = (
            f"round {progress.round}: {progress.bytes_done}/{progress.bytes_total} bytes ({pct:.0f}%), "
            f"{progress.rate_bytes_per_s / (1024 * 1024):.1f} MiB/s, eta {progress.eta_s:.1f} s"
        )
        state = pair.state.value
        self._publish(self._event(pair, "resync_progress", state, state, message, progress=progress))

    def _heartbeat_progress_events(self, address: str, reports: Iterable[pb.VolumeReport]) -> None:
        """The primary's heartbeats carry the running resync's progress (it
        reports it no other way while the resync runs)."""
        if not self._subscribers:
            return
        for r in reports:
            pair = self._pairs.get(r.name)
            if (
                pair is not None
                and pair.primary == address
                and pair.state is PairState.RESYNCING
                and r.epoch == pair.epoch
                and r.state == pb.PAIR_STATE_RESYNCING
                and r.HasField("resync")
            ):
                self._progress_event(r.name, _progress(r.resync))

    def _nack_event(self, request: pb.ReplicationReport) -> None:
        pair = self._pairs.get(request.volume)
        if pair is None or not self._subscribers:
            return
        codes: dict[str, int] = {}
        for n in request.nacks:
            name = _nack_code(n.code).removeprefix("NACK_CODE_")
            codes[name] = codes.get(name, 0) + 1
        first = request.nacks[0]
        message = (
            f"primary {request.reporter}: {len(request.nacks)} write(s) NACKed by {pair.secondary} "
            f"({', '.join(f'{k} x{v}' for k, v in sorted(codes.items()))}); first seq {first.seq} at offset "
            f"{first.offset}: {first.message or _nack_code(first.code)}"
        )
        self._publish(self._event(pair, "nack", "", "", " ".join(message.split())))

    def _node_event(self, address: str, *, up: bool, why: str) -> None:
        """A node's connection state changed: one event per volume it serves."""
        if not self._subscribers:
            return
        for pair in self.pairs():
            role = "primary" if address == pair.primary else "secondary" if address == pair.secondary else ""
            if role:
                self._publish(self._event(
                    pair, "node_up" if up else "node_down", "down" if up else "up", "up" if up else "down",
                    f"{role} {address} is {'up' if up else 'down'} ({why})",
                ))

    def _lifecycle_event(self, volume: str, kind: str, reason: str) -> None:
        pair = self._pairs.get(volume)
        if pair is None or not self._subscribers:
            return
        state = pair.state.value
        self._publish(self._event(pair, kind, "" if kind == "created" else state,
                                  state if kind == "created" else "", reason))

    def _state_event(self, pair: PairRecord) -> pb.Event:
        """The current state of ``pair`` as one event (kind "state"), as status shows it."""
        st = self.volume_status(pair)
        state = _STATUS_STATE_NAMES.get(st.state, pair.state.value)

        def node(role: str, address: str, alive: bool, missing: bool) -> str:
            return f"{role} {address} ({'up' if alive else 'down'}{', no data' if missing else ''})"

        parts = [
            node("primary", st.primary, st.primary_alive, st.primary_data_missing),
            node("secondary", st.secondary, st.secondary_alive, st.secondary_data_missing),
            f"out of sync {st.out_of_sync_bytes} bytes",
        ]
        if st.lease_remaining_s > 0:
            parts.append(f"lease {st.lease_remaining_s:.1f} s left")
        if pair.last_error:
            parts.append(f"last error: {pair.last_error}")
        ev = self._event(pair, "state", "", state, " ".join("; ".join(parts).split()),
                         at=pair.state_changed_at or self._wall(), progress=_progress(st.resync))
        ev.seq = self._event_seq
        return ev

    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.Event]:
        """The current state of every (matching) volume, then, unless ``now``,
        every change as it happens, until the client goes away (or falls
        EVENT_QUEUE_EVENTS behind: a last "dropped" event, then the end)."""
        name = request.volume
        if name and request.now and name not in self._pairs:
            await _refuse(context, driver.not_found(name, self._pairs))
        sub = _Subscriber(name)
        # Subscribed before the snapshot, with no await between them: no
        # change falls between the current state and the first change.
        if not request.now:
            self._subscribers.add(sub)
        try:
            for pair in self.pairs():
                if not name or pair.name == name:
                    yield self._state_event(pair)
            if request.now:
                return
            peer = rpc.peer_of(context)
            log.info("events: %s follows %s", peer.name or peer.address or "a client",
                     f"volume {name!r}" if name else "every volume")
            while True:
                if sub.overflowed.is_set() and sub.queue.empty():
                    log.warning("events: a subscriber fell %d events behind; its stream ends", sub.dropped)
                    yield pb.Event(
                        time_unix_s=self._wall(), volume=name, kind="dropped", seq=self._event_seq,
                        message=f"dropped {sub.dropped} events: this subscriber fell more than "
                                f"{EVENT_QUEUE_EVENTS} events behind; the stream ends (reconnect for the "
                                "current state)",
                    )
                    return
                get = asyncio.ensure_future(sub.queue.get())
                over = asyncio.ensure_future(sub.overflowed.wait())
                try:
                    await asyncio.wait({get, over}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    over.cancel()
                    if not get.done():
                        get.cancel()
                if get.done() and not get.cancelled():
                    yield get.result()
        finally:
            self._subscribers.discard(sub)

    # ================================================================ leadership (issue 12)
    # On etcd, several coordinators share the store and one leads. Every
    # mutating RPC is ``@_leader_only``; the tick only refreshes a follower's
    # copy of the store; ``_stub`` (every push to a node) and ``_grant_leases``
    # check again; and the store itself fences every write with the election
    # key (coordinator/etcd_store.py), so a deposed leader that has not
    # noticed yet writes nothing. A new term starts with ``_take_over``.

    def leads(self) -> bool:
        """This coordinator leads now and has taken over the current term."""
        lead = self.leadership
        if lead is None:
            return True
        term = lead.term()
        if term is None or not lead.is_leader():
            # A lapsed term is over here even if the same lease wins it back
            # (etcd renews every lease when its quorum returns): take over
            # again (reload, nodes heard now, lease wait) rather than judge
            # the nodes by the heartbeats refused meanwhile (sim seed 10 -c3).
            self._term = None
            return False
        return term == self._term

    def leader_address(self) -> str:
        """The leader's address as this coordinator knows it ("" if none)."""
        if self.leads():
            return self.coordinator_address
        lead = self.leadership
        leader = lead.leader() if lead is not None else None
        return leader or ""

    async def _require_leader(self, context: aio.ServicerContext) -> None:
        if self.leadership is None:
            return
        if not self.leads():
            await self._take_over_if_elected()
        if not self.leads():
            await self._redirect(context, "")

    async def _redirect(self, context: aio.ServicerContext, why: str) -> NoReturn:
        """Refuse: this coordinator does not lead. FAILED_PRECONDITION naming
        the leader (also in the trailing metadata, LEADER_METADATA_KEY), or
        UNAVAILABLE when no leader is known (the metadata says "")."""
        me, leader = self.coordinator_address, self.leader_address()
        lead = self.leadership
        reason = why or (lead.why_not_leader() if lead is not None else "") or "it is not elected"
        if leader and leader != me:
            code = grpc.StatusCode.FAILED_PRECONDITION
            message = f"coordinator {me} does not lead; the leader is {leader} ({reason})"
        else:
            leader = ""
            code = grpc.StatusCode.UNAVAILABLE
            message = (
                f"coordinator {me} does not lead and knows no leader now ({reason}); nothing was changed: "
                "retry, or ask the other coordinators (no coordinator leads while etcd has no quorum; one "
                "cut from etcd knows no leader while another may lead)"
            )
        await context.abort(code, message, trailing_metadata=((LEADER_METADATA_KEY, leader),))
        raise AssertionError("unreachable: context.abort returned")  # pragma: no cover

    def _mark_follower(self, context: aio.ServicerContext) -> None:
        """A read answered by a follower (from its copy of the store, without
        node liveness): the trailing metadata says so and names the leader."""
        if not self.leads():
            context.set_trailing_metadata(
                ((LEADER_METADATA_KEY, self.leader_address()), (ROLE_METADATA_KEY, "follower"))
            )

    async def _take_over_if_elected(self) -> None:
        lead = self.leadership
        term = lead.term() if lead is not None else None
        if lead is None or term is None or term == self._term:
            return
        async with self._lock:
            if lead.term() != term or self._term == term:
                return
            try:
                # In a thread: an etcd that does not answer must not stall this loop.
                state = await asyncio.to_thread(self._read_store)
            except DBError as e:
                log.warning("coordinator %s won the election but cannot read the store (%s); it does not "
                            "act yet", self.coordinator_address, e)
                return
            self._take_over(*state)
            self._term = term
        self.wake()

    def _read_store(self) -> tuple[list[PairRecord], list[NodeRecord], list[Any]]:
        """Every pair (refreshing the store's compare-and-swap expectations), node and grant."""
        reload = getattr(self.db, "reload", None)
        pairs = reload() if reload is not None else self.db.list_pairs()
        return pairs, self.db.list_nodes(), self.db.list_grants()

    def _take_over(self, pairs: list[PairRecord], nodes: list[NodeRecord], grants: list[Any]) -> None:
        """A new term: everything from the store, nothing from memory; the
        nodes count as heard now (as after a restart); and no lease counts as
        expired before the longest one a previous leader could have granted
        (lease + drift + the election's TTL: election.longest_lease_wait_s)."""
        now = self._clock()
        self._pairs = {p.name: p for p in pairs}
        self._nodes = {n.address: n for n in nodes}
        self._grants = {}
        for g in grants:
            self._grants.setdefault(g.volume, {})[g.user] = g.read_only
        for task in self._resync_tasks.values():
            task.cancel()
        self._resync_tasks.clear()
        for memory in (self._last_heard, self._reports, self._report_at, self._backoff, self._switch_hold,
                       self._switched_at, self._discard, self._resolve_hold, self._progress_at):
            memory.clear()  # type: ignore[attr-defined]
        self._dead_logged.clear()
        self._started_at = now
        self._lease_granted_at = {name: now + self.election_ttl_s for name in self._pairs}
        log.warning(
            "coordinator %s leads now: %d volumes, %d nodes, %d grants read from %s; no promotion for %.1f s "
            "(the longest primary lease a previous leader could have granted: lease %.1f s + drift %.1f s + "
            "election TTL %.1f s)",
            self.coordinator_address, len(self._pairs), len(self._nodes), len(grants), self.store_url,
            self.lease_s + self.lease_drift_s + self.election_ttl_s, self.lease_s, self.lease_drift_s,
            self.election_ttl_s,
        )

    async def _follow_store(self) -> None:
        """A follower's copy of the store (what it answers status with), read
        again at every tick, in a thread: an unreachable etcd must not stall
        this loop (health checks, CoordinatorInfo)."""
        if getattr(self.db, "reload", None) is None:
            return
        async with self._lock:
            if self.leads():
                return
            try:
                pairs, nodes, grants = await asyncio.to_thread(self._read_store)
            except DBError as e:
                if not self._follow_failed:
                    log.warning("coordinator %s (follower): cannot read the store: %s (status answers "
                                "from the last copy)", self.coordinator_address, e)
                self._follow_failed = True
                return
            if self._follow_failed:
                log.info("coordinator %s (follower): the store answers again", self.coordinator_address)
            self._follow_failed = False
            self._pairs = {p.name: p for p in pairs}
            self._nodes = {n.address: n for n in nodes}
            self._grants = {}
            for g in grants:
                self._grants.setdefault(g.volume, {})[g.user] = g.read_only

    async def _reload_after_conflict(self) -> None:
        """A compare-and-swap lost: another writer changed a volume (a deposed
        leader's last write, say); this coordinator's copy is stale."""
        reload = getattr(self.db, "reload", None)
        if reload is None:
            return
        async with self._lock:
            try:
                pairs = await asyncio.to_thread(reload)
            except DBError as e:
                log.warning("coordinator %s: reloading after a store conflict failed: %s",
                            self.coordinator_address, e)
                return
            self._pairs = {p.name: p for p in pairs}

    async def CoordinatorInfo(
        self, request: pb.CoordinatorInfoRequest, context: aio.ServicerContext
    ) -> pb.CoordinatorInfoReply:
        """Who this coordinator is and who leads; answered by every coordinator."""
        lead = self.leadership
        leads = self.leads()
        why = "" if leads else (lead.why_not_leader() if lead is not None else "") or "not taken over yet"
        return pb.CoordinatorInfoReply(
            address=self.coordinator_address,
            is_leader=leads,
            leader=self.leader_address(),
            store=self.store_url,
            why_not_leader=why,
        )

    # ================================================================ plumbing

    def _stub(self, address: str) -> Any:
        if not self.leads():  # every push to a node: only the leader's (issue 12)
            raise NotLeader(
                f"coordinator {self.coordinator_address} no longer leads: it does not call node {address}",
                leader=self.leader_address(),
            )
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = rpc.channel(address)
        return pb_grpc.NodeServiceStub(ch)
