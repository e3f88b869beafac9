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

Time: every read goes through the injected clocks -- ``clock`` (monotonic:
liveness, backoff) and ``wall_clock`` (the persisted timestamps).

Concurrency: one event loop; every read-modify-write of a pair runs under one
asyncio lock and saves to SQLite before the in-memory copy is replaced, so a
failed write leaves memory and disk in agreement.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any, NoReturn

import grpc
from grpc import aio
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from coordinator.db import CoordinatorDB, NodeRecord, PairExists, PairRecord, StateChange
from syncrep import rpc, volumes
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
    await context.abort(code, message)
    raise AssertionError("unreachable: context.abort returned")  # pragma: no cover


async def _refuse(context: aio.ServicerContext, problem: Problem) -> NoReturn:
    await _abort(context, grpc.StatusCode[problem.code.value], problem.message)


# ---------------------------------------------------------------- proto <-> plain data


def _progress(p: pb.ResyncProgress) -> driver.Progress:
    return driver.Progress(
        bytes_done=p.bytes_done,
        bytes_total=p.bytes_total,
        rate_bytes_per_s=p.rate_bytes_per_s,
        eta_s=p.eta_s,
        round=p.round,
    )


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


class CoordinatorServicer(pb_grpc.CoordinatorServiceServicer):
    """``syncrep.v1.CoordinatorService`` plus the background tick.

    Call ``start_background()`` once the event loop runs and
    ``stop_background()`` before closing the database.
    """

    def __init__(
        self,
        db: CoordinatorDB,
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
        self._switched_at: dict[str, int] = {}
        # A switchover's new primary does not get its primary assignment by
        # heartbeat before the old primary's demotion was pushed (it would
        # open its stream to a node still primary): volume -> new primary.
        self._switch_hold: dict[str, str] = {}
        self._channels: dict[str, aio.Channel] = {}
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None

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
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._loop_task = None
        self._resync_tasks.clear()
        channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            with contextlib.suppress(Exception):
                await ch.close()

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
            except Exception:
                log.exception(
                    "coordinator background check failed; retrying in %.1f s", self.resync_check_interval_s
                )
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.resync_check_interval_s)

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
        )

    def assignments_for(self, address: str) -> list[pb.VolumeAssignment]:
        return [
            self.assignment(p, address)
            for p in self.pairs()
            if address in (p.primary, p.secondary)
            and p.name not in self._creating
            and self._switch_hold.get(p.name) != address
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
            elif isinstance(cmd, CreatePair):
                self._create_pair(cmd)
            elif isinstance(cmd, DeletePair):
                self.db.delete_pair(cmd.volume, cmd.reason, at=self._wall())
                self._pairs.pop(cmd.volume, None)
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

    async def RegisterNode(
        self, request: pb.RegisterNodeRequest, context: aio.ServicerContext
    ) -> pb.RegisterNodeReply:
        address = request.address
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
            self._dead_logged.discard(address)
            self.wake()

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: aio.ServicerContext
    ) -> pb.HeartbeatReply:
        address = request.address
        if address not in self._nodes:
            return pb.HeartbeatReply(known=False)
        self._mark_alive(address)
        self._reports[address] = {r.name: r for r in request.volumes}
        self._report_at[address] = self._clock()
        views = {r.name: _volume_report(r) for r in request.volumes}
        async with self._lock:
            for view in views.values():
                try:
                    self._carry_out(self._on_heartbeat(address, view))
                    self._carry_out(driver.on_identity(self._pairs.get(view.volume), address, view))
                except Exception:
                    # Never fail the heartbeat itself: the node would think we are gone.
                    log.exception("volume %s: cannot apply the heartbeat report of %s", view.volume, address)
            # Only now, with what this heartbeat changed persisted: a lease's
            # state must be durable.
            leases = self._grant_leases(address, views)
            assignments = self.assignments_for(address)
        if any(v.no_data for v in views.values()):
            self.wake()  # a replica without data: a rebuild or a promotion is decided at once
        return pb.HeartbeatReply(known=True, assignments=assignments, leases=leases)

    def _grant_leases(self, address: str, views: Mapping[str, driver.Report]) -> list[pb.Lease]:
        """The leases for ``address`` (see ``driver.leases_for``), recorded as
        granted now. Call with ``self._lock`` held, right before replying."""
        grants = driver.leases_for(address, self.pairs(), views, policy=self.policy())
        now = self._clock()
        for g in grants:
            self._lease_granted_at[g.volume] = now
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
            await self._push_create(pair, spec, cmds, context)
        finally:
            self._creating.discard(pair.name)
        return self.volume_status(self._pairs.get(pair.name, pair))

    async def _push_create(
        self,
        pair: PairRecord,
        spec: driver.VolumeSpec,
        cmds: list[Command],
        context: aio.ServicerContext,
    ) -> None:
        """CreateVolume's pushes (with ``create``), secondary first; a failed one rolls the creation back."""
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
        for push in cmds:
            if not isinstance(push, PushAssignment):
                continue
            try:
                await self._stub(push.address).AssignVolume(
                    self.assignment(pair, push.address, create=push.create), timeout=self.rpc_timeout_s
                )
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

    async def GetVolume(self, request: pb.GetVolumeRequest, context: aio.ServicerContext) -> pb.VolumeStatus:
        pair = self._pairs.get(request.name)
        if pair is None:
            await _refuse(context, driver.not_found(request.name, self._pairs))
        return self.volume_status(pair)

    async def ListVolumes(
        self, request: pb.ListVolumesRequest, context: aio.ServicerContext
    ) -> pb.ListVolumesReply:
        return pb.ListVolumesReply(volumes=[self.volume_status(p) for p in self.pairs()])

    # ================================================================ RPCs: replication reports

    async def ReportReplication(
        self, request: pb.ReplicationReport, context: aio.ServicerContext
    ) -> pb.ReportReplicationReply:
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
        # Real time, not the injected clock: the stall is a measurement, and
        # the half-timeout check races the node's own (real) handover timer.
        t0 = time.monotonic()
        try:
            # Half the timeout: the other half is for persisting and demoting
            # before the old primary reopens its gate by itself.
            reply = await self._stub(old).PrepareHandover(
                pb.PrepareHandoverRequest(volume=name, epoch=epoch, timeout_s=timeout_s),
                timeout=timeout_s / 2,
            )
        except (aio.AioRpcError, OSError) as e:
            await self._release_handover(old, name, epoch)
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
            await self._release_handover(old, name, epoch)
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

    async def _release_handover(self, address: str, volume: str, epoch: int) -> None:
        """Best effort: reopen the old primary's gate now (else it reopens by itself at its timeout)."""
        try:
            await self._stub(address).PrepareHandover(
                pb.PrepareHandoverRequest(volume=volume, epoch=epoch, release=True), timeout=self.rpc_timeout_s
            )
        except (aio.AioRpcError, OSError) as e:
            log.warning(
                "volume %s: could not reopen the gate of %s (%s); it reopens by itself at its handover timeout",
                volume, address, _rpc_error_text(e),
            )

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
        async with self._lock:
            cmds = self.commands(jitter=random.random())
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
                self._carry_out(cmds)
                now = self._clock()
                delay = self._backoff.get(name, Backoff(not_before=now)).not_before - now
            log.warning(
                "volume %s: resync not started (%s); next attempt in %.1f s", name, error, max(0.0, delay)
            )
        finally:
            if self._resync_tasks.get(name) is asyncio.current_task():
                del self._resync_tasks[name]

    # ================================================================ plumbing

    def _stub(self, address: str) -> Any:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = rpc.channel(address)
        return pb_grpc.NodeServiceStub(ch)
