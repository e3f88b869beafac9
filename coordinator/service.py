"""The coordinator's gRPC service and its background loops.

* ``CoordinatorServicer`` implements ``syncrep.v1.CoordinatorService`` (grpc.aio).
* Node liveness: a node is alive if the coordinator heard from it (RegisterNode
  or Heartbeat) within ``node_timeout_s``. Liveness and the nodes' latest
  VolumeReports live in memory only; everything else is persisted
  (``coordinator.db``) before any reply or push that depends on it.
* The resync driver (``drive_resync_once``, run every
  ``resync_check_interval_s`` and whenever a node comes back) moves degraded
  pairs to resyncing: new epoch, persisted, then ``NodeService.StartResync``
  on the primary.
* The coordinator pushes ``NodeService.AssignVolume`` to both nodes of a new
  pair (secondary first).

Concurrency: one event loop; every read-modify-write of a pair runs under one
asyncio lock and saves to SQLite before the in-memory copy is replaced, so a
failed write leaves memory and disk in agreement.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any, NoReturn

import grpc
from grpc import aio
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from coordinator.db import CoordinatorDB, NodeRecord, PairExists, PairRecord, ProgressRecord, StateChange
from syncrep import rpc
from syncrep.blockstore import Extent
from syncrep.core.extents import derive_failed_extents, summarize_extents, to_extent
from syncrep.core.pairstate import IllegalTransition, PairEvent, PairState, transition
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
    "validate_address",
]

VOLUME_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DEFAULT_BLOCK_SIZE = 4096
MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 1024 * 1024
MAX_BLOCKS = 2**32
# VolumeStatus carries the first this-many failed extents (failed_bytes counts all).
STATUS_MAX_EXTENTS = 64

_ROLE_HINTS = ("", "primary", "secondary")
# StartResync errors worth retrying within one attempt; anything else (the
# primary refused: stale epoch, no fault snapshot, ...) fails the attempt at once.
_RETRYABLE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)


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


class CoordinatorServicer(pb_grpc.CoordinatorServiceServicer):
    """``syncrep.v1.CoordinatorService`` plus the liveness and resync loops.

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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if heartbeat_interval_s <= 0 or node_timeout_s <= 0:
            raise ValueError(
                f"heartbeat_interval_s ({heartbeat_interval_s}) and node_timeout_s ({node_timeout_s}) must be > 0"
            )
        if node_timeout_s <= heartbeat_interval_s:
            raise ValueError(
                f"node_timeout_s ({node_timeout_s}) must be larger than heartbeat_interval_s "
                f"({heartbeat_interval_s}), or every node is declared dead between two heartbeats"
            )
        if default_resync_mode not in (pb.RESYNC_MODE_REWRITE, pb.RESYNC_MODE_DIRECT):
            raise ValueError(
                f"default_resync_mode {default_resync_mode} must be RESYNC_MODE_REWRITE (1) or RESYNC_MODE_DIRECT (2)"
            )
        self.db = db
        self.heartbeat_interval_s = heartbeat_interval_s
        self.node_timeout_s = node_timeout_s
        self.auto_resync = auto_resync
        self.resync_retry_max_s = resync_retry_max_s
        self.resync_check_interval_s = resync_check_interval_s
        self.default_resync_mode = default_resync_mode
        self.rpc_timeout_s = rpc_timeout_s
        self.start_resync_attempts = max(1, start_resync_attempts)
        self.coordinator_address = coordinator_address
        self._clock = clock
        self._started_at = clock()

        self._lock = asyncio.Lock()
        self._nodes: dict[str, NodeRecord] = {n.address: n for n in db.list_nodes()}
        self._pairs: dict[str, PairRecord] = {p.name: p for p in db.list_pairs()}
        # In memory only: liveness and each node's latest report per volume.
        self._last_heard: dict[str, float] = {}
        self._dead_logged: set[str] = set()
        self._reports: dict[str, dict[str, pb.VolumeReport]] = {}
        self._report_at: dict[str, float] = {}
        self._progress_at: dict[str, float] = {}
        # Resync driver: per-pair failures since the pair was last in sync,
        # and the earliest (clock) time of the next attempt.
        self._resync_failures: dict[str, int] = {}
        self._resync_not_before: dict[str, float] = {}
        self._resync_wait = wait_exponential_jitter(
            multiplier=resync_retry_initial_s, max=resync_retry_max_s, jitter=resync_retry_initial_s
        )
        self._resync_tasks: dict[str, asyncio.Task[None]] = {}
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
                await self.check_liveness_once()
                if self.auto_resync:
                    await self.drive_resync_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception(
                    "coordinator background check failed; retrying in %.1f s", self.resync_check_interval_s
                )
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.resync_check_interval_s)

    # ================================================================ queries

    def is_alive(self, address: str) -> bool:
        t = self._last_heard.get(address)
        return t is not None and self._clock() - t <= self.node_timeout_s

    def pair(self, name: str) -> PairRecord | None:
        return self._pairs.get(name)

    def pairs(self) -> list[PairRecord]:
        return [self._pairs[k] for k in sorted(self._pairs)]

    def latest_report(self, address: str, volume: str) -> pb.VolumeReport | None:
        return self._reports.get(address, {}).get(volume)

    def _silent_for_s(self, address: str) -> float:
        """Seconds since we last heard from ``address`` (or since we started)."""
        return self._clock() - max(self._last_heard.get(address, self._started_at), self._started_at)

    def assignment(self, pair: PairRecord, address: str) -> pb.VolumeAssignment:
        role = pb.ROLE_PRIMARY if address == pair.primary else pb.ROLE_SECONDARY
        return pb.VolumeAssignment(
            spec=pb.VolumeSpec(name=pair.name, size_bytes=pair.size_bytes, block_size=pair.block_size),
            role=role,
            epoch=pair.epoch,
            peer_address=pair.peer_of(address),
            resync_mode=pair.resync_mode,  # type: ignore[arg-type]
        )

    def assignments_for(self, address: str) -> list[pb.VolumeAssignment]:
        return [self.assignment(p, address) for p in self.pairs() if address in (p.primary, p.secondary)]

    def volume_status(self, pair: PairRecord) -> pb.VolumeStatus:
        summary = summarize_extents(pair.failed_extents, STATUS_MAX_EXTENTS)
        report = self.latest_report(pair.primary, pair.name)
        status = pb.VolumeStatus(
            spec=pb.VolumeSpec(name=pair.name, size_bytes=pair.size_bytes, block_size=pair.block_size),
            state=pair.state.to_proto(),  # type: ignore[arg-type]
            epoch=pair.epoch,
            primary=pair.primary,
            secondary=pair.secondary,
            failed_extents=[pb.Extent(offset=e.offset, length=e.length) for e in summary.first],
            failed_bytes=summary.total_bytes,
            fault_snapshot_id=pair.fault_snapshot_id,
            resync=self._progress_proto(pair.progress),
            last_error=pair.last_error,
            state_changed_at=pair.state_changed_at,
            resync_mode=pair.resync_mode,  # type: ignore[arg-type]
            primary_alive=self.is_alive(pair.primary),
            secondary_alive=self.is_alive(pair.secondary),
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

    @staticmethod
    def _progress_proto(p: ProgressRecord) -> pb.ResyncProgress:
        return pb.ResyncProgress(
            bytes_done=p.bytes_done,
            bytes_total=p.bytes_total,
            rate_bytes_per_s=p.rate_bytes_per_s,
            eta_s=p.eta_s,
            round=p.round,
        )

    @staticmethod
    def _progress_record(p: pb.ResyncProgress) -> ProgressRecord:
        return ProgressRecord(
            bytes_done=p.bytes_done,
            bytes_total=p.bytes_total,
            rate_bytes_per_s=p.rate_bytes_per_s,
            eta_s=p.eta_s,
            round=p.round,
        )

    # ================================================================ state changes

    def _apply(
        self,
        pair: PairRecord,
        event: PairEvent | None,
        reason: str,
        **changes: Any,
    ) -> PairRecord:
        """Apply ``event`` (IllegalTransition if not allowed) and ``changes``;
        persist pair + event in one transaction; then update memory and log.
        Must be called with ``self._lock`` held.
        """
        old_state = pair.state
        new_state = transition(old_state, event) if event is not None else old_state
        updated = replace(pair, state=new_state, **changes)
        if new_state != old_state:
            updated = replace(updated, state_changed_at=time.time())
        change = StateChange(old_state, reason) if event is not None else None
        self.db.save_pair(updated, change)
        self._pairs[pair.name] = updated
        if event is None:
            pass
        elif new_state != old_state:
            log.info(
                "volume %s: %s -> %s (epoch %d, event %s): %s",
                pair.name,
                old_state.value,
                new_state.value,
                updated.epoch,
                event.value,
                reason,
            )
        else:
            log.info(
                "volume %s: stays %s (epoch %d, event %s): %s",
                pair.name,
                new_state.value,
                updated.epoch,
                event.value,
                reason,
            )
        if old_state is PairState.RESYNCING and new_state is PairState.DEGRADED:
            self._note_resync_failure(pair.name)
        if new_state is PairState.IN_SYNC:
            self._resync_failures.pop(pair.name, None)
            self._resync_not_before.pop(pair.name, None)
        return updated

    def _note_resync_failure(self, name: str) -> float:
        n = self._resync_failures.get(name, 0) + 1
        self._resync_failures[name] = n
        state = RetryCallState(Retrying(), None, (), {})
        state.attempt_number = n
        delay = float(self._resync_wait(state))
        self._resync_not_before[name] = self._clock() + delay
        return delay

    # ================================================================ RPCs: nodes

    async def RegisterNode(
        self, request: pb.RegisterNodeRequest, context: aio.ServicerContext
    ) -> pb.RegisterNodeReply:
        address = request.address
        if not address:
            await _abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "RegisterNode: address is required (host:port)"
            )
        problem = validate_address(address)
        if problem:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"RegisterNode: {problem}")
        if request.role_hint not in _ROLE_HINTS:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"RegisterNode: role_hint {request.role_hint!r} must be 'primary', 'secondary' or empty",
            )
        async with self._lock:
            known = address in self._nodes
            self._nodes[address] = self.db.upsert_node(address, request.role_hint)
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
        for report in request.volumes:
            pair = self._pairs.get(report.name)
            if pair is not None and pair.primary == address and report.state == pb.PAIR_STATE_DEGRADED:
                try:
                    await self._primary_heartbeat_degraded(pair.name, address, report)
                except Exception:
                    # Never fail the heartbeat itself: the node would think we are gone.
                    log.exception("volume %s: cannot apply the degraded heartbeat of %s", pair.name, address)
        return pb.HeartbeatReply(known=True, assignments=self.assignments_for(address))

    async def _primary_heartbeat_degraded(self, name: str, address: str, report: pb.VolumeReport) -> None:
        """A safety net for a lost ReportReplication: the primary's heartbeat
        says the pair is degraded at the current epoch. Acted on only once the
        pair has been in its current state for ``node_timeout_s`` (so a primary
        that got StartResync but has not started yet is not misread).
        """
        async with self._lock:
            pair = self._pairs.get(name)
            if pair is None or pair.primary != address or report.epoch != pair.epoch:
                return
            try:
                reported = [to_extent(e) for e in report.failed_extents]
            except ValueError:
                return
            if any(e.end > pair.size_bytes for e in reported):
                return
            extents = tuple(derive_failed_extents((), (), [*pair.failed_extents, *reported]))
            snapshot_id = report.fault_snapshot_id or pair.fault_snapshot_id
            if pair.state is PairState.DEGRADED:
                if extents == pair.failed_extents and snapshot_id == pair.fault_snapshot_id:
                    return
                event = PairEvent.SECONDARY_FAILED
                reason = f"primary {address} heartbeat adds failure information"
            else:
                if time.time() - pair.state_changed_at < self.node_timeout_s:
                    return
                event = PairEvent.SECONDARY_FAILED
                reason = f"primary {address} heartbeat reports the pair degraded at epoch {report.epoch}" + (
                    f": {report.last_error}" if report.last_error else ""
                )
            self._apply(
                pair,
                event,
                reason,
                failed_extents=extents,
                fault_snapshot_id=snapshot_id,
                last_error=report.last_error or pair.last_error or reason,
            )

    # ================================================================ RPCs: volumes

    async def CreateVolume(
        self, request: pb.CreateVolumeRequest, context: aio.ServicerContext
    ) -> pb.VolumeStatus:
        name = request.name
        if not VOLUME_NAME_RE.fullmatch(name):
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"volume name {name!r} is invalid: use 1-64 characters from A-Z a-z 0-9 _ . -, "
                "starting with a letter or digit",
            )
        size = request.size_bytes
        if size == 0:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "size_bytes must be > 0")
        block_size = request.block_size or DEFAULT_BLOCK_SIZE
        if block_size & (block_size - 1):
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"block_size {block_size} is not a power of two (allowed: {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE})",
            )
        if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
            await _abort(
                context,
                grpc.StatusCode.OUT_OF_RANGE,
                f"block_size {block_size} is outside the allowed range {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE}",
            )
        if size % block_size:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"size_bytes {size} is not a multiple of block_size {block_size} "
                f"(nearest: {size // block_size * block_size} or {(size // block_size + 1) * block_size})",
            )
        if size // block_size > MAX_BLOCKS:
            await _abort(
                context,
                grpc.StatusCode.OUT_OF_RANGE,
                f"size_bytes {size} is {size // block_size} blocks of {block_size} bytes; the limit is "
                f"{MAX_BLOCKS} blocks ({MAX_BLOCKS * block_size} bytes at this block size)",
            )
        resync_mode = request.resync_mode or self.default_resync_mode
        if resync_mode not in (pb.RESYNC_MODE_REWRITE, pb.RESYNC_MODE_DIRECT):
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"resync_mode {request.resync_mode} is not RESYNC_MODE_REWRITE (1) or RESYNC_MODE_DIRECT (2)",
            )
        for role, addr in (("primary", request.primary), ("secondary", request.secondary)):
            problem = validate_address(addr)
            if problem:
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"{role}: {problem}")
        if request.primary == request.secondary:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"primary and secondary are the same node ({request.primary}); a pair needs two nodes",
            )
        for role, addr in (("primary", request.primary), ("secondary", request.secondary)):
            if addr not in self._nodes:
                coord = self.coordinator_address or "<this coordinator's address>"
                await _abort(
                    context,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"node {addr} is not registered with this coordinator; start it with "
                    f"`syncrep {role} --coordinator {coord} --listen {addr} --data-dir DIR` "
                    f"(or with --advertise {addr} if it listens on another address)",
                )

        mode_name = pb.ResyncMode.Name(resync_mode)  # type: ignore[arg-type]
        pair = PairRecord(
            name=name,
            size_bytes=size,
            block_size=block_size,
            primary=request.primary,
            secondary=request.secondary,
            epoch=1,
            state=PairState.IN_SYNC,
            resync_mode=int(resync_mode),
        )
        async with self._lock:
            if name in self._pairs:
                existing = self._pairs[name]
                await _abort(
                    context,
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"volume {name!r} already exists (primary {existing.primary}, secondary {existing.secondary})",
                )
            try:
                pair = self.db.create_pair(
                    pair,
                    reason=f"created: primary {pair.primary}, secondary {pair.secondary}, "
                    f"{size} bytes, block size {block_size}, resync mode {mode_name}",
                )
            except PairExists as e:
                await _abort(context, grpc.StatusCode.ALREADY_EXISTS, str(e))
            self._pairs[name] = pair
        log.info(
            "volume %s created: primary %s, secondary %s, %d bytes, block size %d, epoch %d, state %s",
            name,
            pair.primary,
            pair.secondary,
            size,
            block_size,
            pair.epoch,
            pair.state.value,
        )

        for addr in (pair.secondary, pair.primary):
            try:
                await self._stub(addr).AssignVolume(self.assignment(pair, addr), timeout=self.rpc_timeout_s)
            except (aio.AioRpcError, OSError) as e:
                error = _rpc_error_text(e)
                async with self._lock:
                    cur = self._pairs.get(name)
                    if cur is not None and cur.created_at == pair.created_at:
                        del self._pairs[name]
                        self.db.delete_pair(
                            name, f"creation rolled back: AssignVolume to {addr} failed: {error}"
                        )
                log.warning(
                    "volume %s: creation rolled back, AssignVolume to %s failed: %s", name, addr, error
                )
                await _abort(
                    context,
                    grpc.StatusCode.UNAVAILABLE,
                    f"volume {name!r} not created: assigning it to the {pair.role_of(addr)} {addr} failed ({error}); "
                    f"check that node {addr} is running and reachable, then retry",
                )
        return self.volume_status(self._pairs.get(name, pair))

    async def GetVolume(self, request: pb.GetVolumeRequest, context: aio.ServicerContext) -> pb.VolumeStatus:
        pair = self._pairs.get(request.name)
        if pair is None:
            await _abort(context, grpc.StatusCode.NOT_FOUND, self._not_found(request.name))
        return self.volume_status(pair)

    async def ListVolumes(
        self, request: pb.ListVolumesRequest, context: aio.ServicerContext
    ) -> pb.ListVolumesReply:
        return pb.ListVolumesReply(volumes=[self.volume_status(p) for p in self.pairs()])

    def _not_found(self, name: str) -> str:
        known = ", ".join(sorted(self._pairs)[:10]) or "none"
        return f"volume {name!r} not found (volumes: {known})"

    # ================================================================ RPCs: replication reports

    async def ReportReplication(
        self, request: pb.ReplicationReport, context: aio.ServicerContext
    ) -> pb.ReportReplicationReply:
        async with self._lock:
            pair = self._pairs.get(request.volume)
            if pair is None:
                await _abort(context, grpc.StatusCode.NOT_FOUND, self._not_found(request.volume))
            if request.reporter != pair.primary:
                await _abort(
                    context,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"node {request.reporter or '(no reporter)'} is not the primary of volume {pair.name!r} "
                    f"(the primary is {pair.primary}); only the primary reports replication state",
                )
            if request.epoch < pair.epoch:
                await _abort(
                    context,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"stale epoch: report for volume {pair.name!r} carries epoch {request.epoch}, "
                    f"the pair is at epoch {pair.epoch} (a newer resync was started; the primary must "
                    "fence off its old stream and follow StartResync / its heartbeat assignments)",
                )
            if request.epoch > pair.epoch:
                await _abort(
                    context,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"epoch {request.epoch} was never issued for volume {pair.name!r}; "
                    f"the pair is at epoch {pair.epoch}",
                )
            try:
                state = PairState.from_proto(request.state)
            except ValueError as e:
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"ReportReplication: {e}")
            try:
                if state is PairState.DEGRADED:
                    pair = await self._report_degraded(pair, request, context)
                elif state is PairState.RESYNCING:
                    pair = await self._report_resyncing(pair, request, context)
                else:
                    pair = await self._report_in_sync(pair, request, context)
            except IllegalTransition as e:
                await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, f"volume {pair.name!r}: {e}")
        return pb.ReportReplicationReply(
            state=pair.state.to_proto(),  # type: ignore[arg-type]
            epoch=pair.epoch,
            failed_extents=[pb.Extent(offset=e.offset, length=e.length) for e in pair.failed_extents],
        )

    async def _check_in_volume(
        self, pair: PairRecord, what: str, items: Iterable[Any], context: aio.ServicerContext
    ) -> list[Extent]:
        out: list[Extent] = []
        for item in items:
            ext = to_extent(item)
            if ext.end > pair.size_bytes:
                await _abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{what} extent offset={ext.offset} length={ext.length} ends at {ext.end}, beyond "
                    f"the end of volume {pair.name!r} ({pair.size_bytes} bytes)",
                )
            out.append(ext)
        return out

    async def _report_degraded(
        self, pair: PairRecord, request: pb.ReplicationReport, context: aio.ServicerContext
    ) -> PairRecord:
        nacks = await self._check_in_volume(pair, "nack", request.nacks, context)
        unacked = await self._check_in_volume(pair, "unacked write", request.unacked, context)
        reported = await self._check_in_volume(pair, "failed", request.failed_extents, context)
        extents = derive_failed_extents(nacks, unacked, [*pair.failed_extents, *reported])
        reason = request.reason or self._nack_reason(request.nacks) or "secondary failed (no reason given)"
        total = sum(e.length for e in extents)
        detail = (
            f"primary {request.reporter} reports the secondary {pair.secondary} failed: {reason} "
            f"({len(request.nacks)} nacks, {len(request.unacked)} unacked writes; "
            f"{len(extents)} failed extents, {total} bytes)"
        )
        return self._apply(
            pair,
            PairEvent.SECONDARY_FAILED,
            detail,
            failed_extents=tuple(extents),
            fault_snapshot_id=request.fault_snapshot_id or pair.fault_snapshot_id,
            last_error=reason,
        )

    @staticmethod
    def _nack_reason(nacks: Sequence[pb.Nack]) -> str:
        if not nacks:
            return ""
        first = nacks[0]
        code = pb.NackCode.Name(first.code) if first.code in pb.NackCode.values() else str(first.code)
        return f"{len(nacks)} write(s) NACKed, first seq {first.seq}: {code} {first.message}".strip()

    async def _report_resyncing(
        self, pair: PairRecord, request: pb.ReplicationReport, context: aio.ServicerContext
    ) -> PairRecord:
        progress = self._progress_record(request.resync)
        if pair.state is PairState.DEGRADED:
            # The coordinator went degraded on its own (secondary silent, or a
            # StartResync that timed out although the primary got it) while
            # the primary's resync for this very epoch carries on.
            if self.db.resync_started_at_epoch(pair.name, pair.epoch) and self.is_alive(pair.secondary):
                pair = self._apply(
                    pair,
                    PairEvent.RESYNC_STARTED,
                    f"primary {request.reporter} reports the resync of epoch {pair.epoch} in progress",
                    progress=progress,
                )
                self._progress_at[pair.name] = self._clock()
                return pair
        if pair.state is not PairState.RESYNCING:
            await _abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"volume {pair.name!r} is {pair.state.value} at epoch {pair.epoch}, not resyncing; "
                "resync progress is accepted only while the coordinator has a resync running",
            )
        self.db.update_progress(pair.name, progress)
        pair = replace(pair, progress=progress)
        self._pairs[pair.name] = pair
        self._progress_at[pair.name] = self._clock()
        return pair

    async def _report_in_sync(
        self, pair: PairRecord, request: pb.ReplicationReport, context: aio.ServicerContext
    ) -> PairRecord:
        if pair.state is PairState.IN_SYNC:
            # A retry of a report already applied: nothing to do.
            return pair
        if pair.state is PairState.DEGRADED and not self.db.resync_started_at_epoch(pair.name, pair.epoch):
            await _abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"volume {pair.name!r} is degraded at epoch {pair.epoch} and no resync was started at that "
                f"epoch; the primary cannot be in sync before the coordinator starts a resync",
            )
        progress = self._progress_record(request.resync) if request.HasField("resync") else pair.progress
        how = f": {request.reason}" if request.reason else ""
        return self._apply(
            pair,
            PairEvent.RESYNC_DONE,
            f"primary {request.reporter} reports the pair in sync at epoch {request.epoch}{how} "
            f"(previous error: {pair.last_error or 'none'})",
            failed_extents=(),
            fault_snapshot_id=0,
            last_error="",
            progress=progress,
        )

    # ================================================================ background: liveness

    async def check_liveness_once(self) -> None:
        """Log nodes that went silent; a resyncing pair whose secondary has been
        silent for ``node_timeout_s`` goes degraded."""
        for address in list(self._nodes):
            if address not in self._dead_logged and self._silent_for_s(address) > self.node_timeout_s:
                self._dead_logged.add(address)
                if address in self._last_heard:
                    log.warning(
                        "node %s has not heartbeated for %.1f s: considered dead",
                        address,
                        self._silent_for_s(address),
                    )
        for pair in self.pairs():
            if pair.state is not PairState.RESYNCING:
                continue
            silent = self._silent_for_s(pair.secondary)
            if silent <= self.node_timeout_s:
                continue
            async with self._lock:
                cur = self._pairs.get(pair.name)
                if cur is None or cur.state is not PairState.RESYNCING:
                    continue
                reason = (
                    f"secondary {cur.secondary} has not heartbeated for {silent:.1f} s "
                    f"(node_timeout_s={self.node_timeout_s}) during the resync of epoch {cur.epoch}"
                )
                self._apply(cur, PairEvent.SECONDARY_FAILED, reason, last_error=reason)

    # ================================================================ background: resync driver

    def resync_ready(self, pair: PairRecord) -> tuple[bool, str]:
        """Whether the driver would start a resync of ``pair`` now, and why not."""
        if pair.state is not PairState.DEGRADED:
            return False, f"state is {pair.state.value}"
        if pair.name in self._resync_tasks:
            return False, "a StartResync call is in flight"
        if not self.is_alive(pair.primary):
            return False, f"primary {pair.primary} is not alive"
        if not self.is_alive(pair.secondary):
            return False, f"secondary {pair.secondary} is not alive"
        report = self.latest_report(pair.primary, pair.name)
        if report is None:
            return False, f"no heartbeat report for the volume from primary {pair.primary} yet"
        if report.state != pb.PAIR_STATE_DEGRADED:
            return False, f"primary reports {pb.PairState.Name(report.state)}, not DEGRADED"
        if report.fault_snapshot_id == 0:
            return False, "primary reports no fault-recovery snapshot yet"
        if report.epoch > pair.epoch:
            return False, f"primary reports epoch {report.epoch} > the pair's {pair.epoch}"
        not_before = self._resync_not_before.get(pair.name, 0.0)
        if self._clock() < not_before:
            return False, f"backing off for {not_before - self._clock():.1f} s more"
        return True, "ready"

    async def drive_resync_once(self) -> None:
        """Start a resync for every degraded pair that is ready (see ``resync_ready``)."""
        for pair in self.pairs():
            ready, _ = self.resync_ready(pair)
            if not ready:
                continue
            # Heartbeats are up to node_timeout_s stale: a secondary killed a
            # moment ago still looks alive. Ask it directly before spending an
            # epoch and a backoff step on a resync that cannot connect.
            if not await rpc.health_check(pair.secondary, timeout_s=1.0):
                log.debug("volume %s: secondary %s does not answer health checks yet", pair.name,
                          pair.secondary)
                continue
            async with self._lock:
                cur = self._pairs.get(pair.name)
                if cur is None or not self.resync_ready(cur)[0]:
                    continue
                report = self.latest_report(cur.primary, cur.name)
                snapshot = report.fault_snapshot_id if report is not None else 0
                new_epoch = cur.epoch + 1
                attempt = self._resync_failures.get(cur.name, 0) + 1
                cur = self._apply(
                    cur,
                    PairEvent.RESYNC_STARTED,
                    f"primary {cur.primary} and secondary {cur.secondary} alive, fault snapshot {snapshot} "
                    f"present; resync attempt {attempt} at epoch {new_epoch} "
                    f"({len(cur.failed_extents)} failed extents, {cur.failed_bytes} bytes)",
                    epoch=new_epoch,
                    progress=ProgressRecord(),
                )
                self._resync_tasks[cur.name] = asyncio.create_task(
                    self._start_resync(cur.name, cur.primary, new_epoch), name=f"start-resync-{cur.name}"
                )

    async def _start_resync(self, name: str, primary: str, epoch: int) -> None:
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
                            pb.StartResyncRequest(volume=name, epoch=epoch), timeout=self.rpc_timeout_s
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
                cur = self._pairs.get(name)
                if cur is None or cur.state is not PairState.RESYNCING or cur.epoch != epoch:
                    log.info(
                        "volume %s: StartResync at epoch %d failed (%s), but the pair has moved on",
                        name,
                        epoch,
                        error,
                    )
                    return
                reason = f"StartResync on primary {primary} at epoch {epoch} failed: {error}"
                self._apply(cur, PairEvent.RESYNC_FAILED, reason, last_error=reason)
                delay = self._resync_not_before.get(name, self._clock()) - self._clock()
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
