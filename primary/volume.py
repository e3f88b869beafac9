"""The primary's write path for one volume pair.

    client write -> validate -> queue -> sequencer -> (local group commit  ||  replication batch)
                                                   -> reply when local is durable AND
                                                      (the secondary acked  OR  the write is
                                                       tracked for resync, i.e. degraded)

The sequencer is the single place that assigns seqs, so local application
(one I/O thread, FIFO) and remote application (the secondary applies in seq
order) see overlapping writes in the same order. A zero range (``zero_range``:
NBD TRIM and WRITE_ZEROES, issue 14) is a write like any other on this path,
carrying ``Zeros`` instead of bytes: one op and no payload however long it
is, applied on both nodes by punching holes (``BlockStore.zero_range``).

Going degraded (method step 2) happens here: the quiesce gate closes (new
writes wait), the in-flight queue drains (everything already submitted to the
I/O thread lands first — it is FIFO), replication stops, the fault-recovery
snapshot is created, the failed extents (NACKed + unacked writes) and the
snapshot id are persisted in one transaction, and only then does the gate
open and do the affected writes get their replies. So a write is acknowledged
to its client only when it is on both nodes, or on the primary and tracked.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from primary.link import LinkError, Payload, ReplicationLink, Zeros, identity_msg, span, wire_bytes
from primary.resync import Counters, RateLimiter, ResyncBudget, ResyncError, RoundSender, round_pieces
from syncrep import volumes
from syncrep.aio import wait_event
from syncrep.blockstore import Extent
from syncrep.blockstore.extents import merge_extents
from syncrep.config import NodeOptions
from syncrep.core.activity import ActivityLog
from syncrep.core.classify import nack_code
from syncrep.core.identity import Identity
from syncrep.core.lease import LeaseState
from syncrep.core.pair import (
    PairRecord,
    decide_crash_recovery,
    decide_degrade,
    decide_promotion,
    decide_start_resync,
    decide_startup,
    handover_refusal,
    is_full_copy,
    must_degrade_before_writing,
    repair_refusal,
    reply_refusal,
    resync_done,
    resync_failed,
    write_refusal,
)
from syncrep.core.pairstate import PairEvent, PairState, transition
from syncrep.core.resync_plan import (
    FinalRound,
    MeasurePending,
    ResyncLimits,
    ResyncPlan,
    RewriteFailed,
    RoundSpec,
    SendRound,
    TakeRoundSnapshot,
    next_step,
)
from syncrep.core.vocab import (
    COMMON_PREFIX,
    MAX_WRITE_BYTES,
    META_NODE_PROMOTE_PENDING,
    META_RESYNC_PLAN,
    ResyncMode,
    RoundKind,
    common_snapshot_name,
    fault_snapshot_name,
    resync_final_snapshot_name,
    resync_snapshot_name,
)
from syncrep.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    SyncrepError,
    Unavailable,
    check_io_range,
)
from syncrep.metrics import ReplicationStats
from syncrep.pb import syncrep_pb2 as pb
from syncrep.volumes import LocalVolume

#: After a degrade that could not be persisted (the primary's disk is full),
#: the write path retries it after this pause (not in a busy loop).
DEGRADE_RETRY_S = 0.5
#: Group commit sized by latency (issue 14, docs/PERF.md plan item 6): at most
#: this many batches on their way to the local disk at once. While they are
#: (the I/O thread in pwrite + fdatasync), the writes that arrive wait in the
#: queue and go together as the next batch: one fdatasync and one Replicate
#: frame for all of them, instead of one per write. Two, so that the I/O thread
#: finds the next batch ready when a flush returns. Without this bound the
#: sequencer handed the I/O thread one write per batch at 4 KiB QD64 (1.07
#: writes per batch measured: every write paid its own fdatasync).
LOCAL_BATCHES_IN_FLIGHT = 2

log = logging.getLogger(__name__)

# Graceful stop: how long queued writes get to finish.
STOP_DRAIN_S = 5.0
# report() runs every heartbeat; the out-of-sync byte count (a bitmap diff
# since the fault snapshot) is recomputed in a thread at most this often.
OUT_OF_SYNC_REFRESH_S = 1.0

#: Delivers a ReplicationReport to the coordinator; returns its reply (None
#: when it could not be delivered). The node applies ``reply.lease`` through
#: ``PrimaryVolume.on_lease``.
Reporter = Callable[[pb.ReplicationReport], Awaitable["pb.ReportReplicationReply | None"]]


@dataclass
class _Write:
    offset: int
    #: The bytes, or a zero range (``zero_range``: TRIM, WRITE_ZEROES).
    data: Payload
    fut: asyncio.Future[None]


def apply_writes(store: Any, writes: Sequence[tuple[int, Payload]]) -> None:
    """Apply writes in order to a BlockStore: each run of data writes is one
    group commit (``write_batch``), each zero range one ``zero_range`` (holes
    punched, O(1) in its length; see syncrep/blockstore/store.py)."""
    run: list[tuple[int, bytes]] = []
    for off, data in writes:
        if isinstance(data, Zeros):
            if run:
                store.write_batch(run)
                run = []
            store.zero_range(off, data.length)
        else:
            run.append((off, data))
    if run:
        store.write_batch(run)


@dataclass
class _Handover:
    """A switchover in progress on this primary (docs/FAILOVER.md section 5):
    the gate is held for it from ``t0`` (time.monotonic) at ``epoch``."""

    epoch: int
    t0: float
    #: The coordinator's name for this attempt (PrepareHandoverRequest.handover_id).
    handover_id: str = ""
    drained: bool = False
    expiry: asyncio.Task[None] | None = None
    #: The data identity both replicas shared when the drain ended.
    identity: Identity | None = None


class PrimaryVolume:
    def __init__(
        self,
        lv: LocalVolume,
        options: NodeOptions,
        address: str,
        reporter: Reporter,
        budget: ResyncBudget | None = None,
    ) -> None:
        self.lv = lv
        self.options = options
        self.address = address
        self.reporter = reporter
        # Shared by every primary volume of the node (Node builds one).
        self.budget = budget if budget is not None else ResyncBudget(
            options.max_concurrent_resyncs, options.node_resync_max_rate_bytes_per_s)
        store = lv.store
        # The pair record as durable (``rec``) and as last submitted to the
        # I/O thread for persistence (``_submitted``); see syncrep/core/pair.py.
        self.rec = PairRecord.from_meta(store.meta_get)
        self._submitted = self.rec
        self.next_seq = 1
        self.acked_seq = 0
        self.link: ReplicationLink | None = None
        self._queue: asyncio.Queue[_Write] = asyncio.Queue(maxsize=options.queue_writes)
        self._holdover: _Write | None = None
        self._local_slots = asyncio.Semaphore(LOCAL_BATCHES_IN_FLIGHT)
        # The quiesce gate: the sequencer takes no new batch while any holder
        # (degrade, periodic snapshot, final resync round) holds it closed.
        self._gate = asyncio.Event()
        self._gate.set()
        self._gate_holds = 0
        self._settled = asyncio.Event()
        self._settled.set()
        self._degrading = False
        # The outcome of the latest degrade (None before the first): True once
        # its failure information is durable.
        self._degrade_outcome: asyncio.Future[bool] | None = None
        # Failed extents a degrade derived but could not persist.
        self._unrecorded: list[Extent] = []
        # A dict, not a set: stop() cancels in creation order, the same on every
        # run (a set iterates by object id), so a simulated run is reproducible.
        self._tasks: dict[asyncio.Task[Any], None] = {}
        self._closed = False
        self.last_stall_s = 0.0
        self.resync_progress = pb.ResyncProgress()
        self.al = ActivityLog(regions=list(self.rec.al_regions or ()))
        # The log on disk, as found at startup (before this run adds to it).
        self._al_at_start = self.al.extents(store.size_bytes)
        self.counters = Counters()
        # Metrics (syncrep.metrics, read at scrape time): plain counters,
        # touched on the event loop only; the links count their acks here.
        self.stats = ReplicationStats()
        self._resync_task: asyncio.Task[None] | None = None
        self._resync_t0 = 0.0
        self._resync_sent0 = 0
        self._resync_zero0 = 0
        self._resync_refused0 = 0
        self._snapshot_lock = asyncio.Lock()
        # A new generation minted but not yet durable: every _persist carries
        # it until one succeeds, and only then does ``lv.identity`` claim it.
        self._identity_pending: Identity | None = None
        # The coordinator's lease (docs/FAILOVER.md section 2): writes that
        # are on the primary only are acknowledged only under it.
        self.lease = LeaseState()
        # Set (and replaced) on every lease taken in, and on stop: wakes the
        # writes waiting for a lease.
        self._lease_changed = asyncio.Event()
        self._lease_waiters = 0
        self._out_of_sync = self.rec.failed_bytes
        self._out_of_sync_at = -math.inf
        self._out_of_sync_task: asyncio.Task[None] | None = None
        # Why this write path cannot serve (start() failed), for the writes refused.
        self._unusable = ""
        # A switchover: the gate held for the handover, and once handed over
        # the refusal every write gets from then on (FAILED_PRECONDITION "not
        # its primary": the client re-sends it to the new primary).
        self._handover: _Handover | None = None
        self._handed_over = ""

    # ------------------------------------------------------------ the pair record
    @property
    def state(self) -> PairState:
        return self.rec.state

    @property
    def failed_extents(self) -> tuple[Extent, ...]:
        return self.rec.failed_extents

    @property
    def fault_snapshot_id(self) -> int:
        return self.rec.fault_snapshot_id

    @property
    def last_error(self) -> str:
        return self.rec.last_error

    @property
    def rollback_to(self) -> str:
        return self.rec.rollback_to

    async def _persist(self, extra: dict[str, str | None] | None = None, **changes: Any) -> None:
        """Persist the whole record, with ``changes``, in one transaction (with
        the ``extra`` metadata keys in the same transaction). The record is built from the
        last *submitted* one, and submitted before the first await, so every
        write carries every earlier change whatever order callers resume in.
        The in-memory record (``rec``) is adopted once the write is durable."""
        rec = self._submitted.evolve(**changes)
        self._submitted = rec
        store = self.lv.store
        identity = self._identity_pending

        def write() -> None:
            ident = identity.to_meta() if identity is not None else {}
            store.meta_set({**(extra or {}), **ident, **rec.to_meta()})

        # The I/O thread is FIFO, so writes complete in submission order: the
        # record just written is the newest durable one. A failed write (disk
        # full) raises and is not adopted; its changes stay in ``_submitted``
        # and reach the disk with the next record written.
        await self.lv.run_io(write)
        self.rec = rec
        if identity is not None and self._identity_pending is identity:
            old, self.lv.identity, self._identity_pending = self.lv.identity, identity, None
            log.info("volume %s: new generation %s (was %s): this primary writes without its peer",
                     self.lv.name, identity.short(), old.short())

    def _alone_generation(self) -> int:
        """The generation a write on this primary alone is made under: a new
        one not yet durable counts already (the lease must name it), so that
        no write is acknowledged alone under a generation the secondary may
        hold too."""
        pending = self._identity_pending
        return pending.current if pending is not None else self.lv.identity.current

    def _start_generation(self) -> None:
        """The primary begins writing without its peer (degrade, crash recovery,
        promotion): mint a new generation, to be persisted by the next _persist
        (docs/FAILOVER.md section 1). One already waiting to be durable is kept:
        the writes since it are the same episode."""
        if self._identity_pending is not None:
            return
        if not self.lv.identity.has_data:
            log.warning("volume %s: the store carries no data identity (created before identities existed); "
                        "no new generation is started", self.lv.name)
            return
        # Via the module attribute: the simulator patches it to stay reproducible.
        self._identity_pending = self.lv.identity.next_generation(volumes.new_generation)

    def _report_msg(
        self,
        state: PairState,
        reason: str,
        *,
        epoch: int | None = None,
        nacks: list[Any] | None = None,
        unacked: list[Any] | None = None,
    ) -> pb.ReplicationReport:
        """The one builder of ReplicationReports: failure information goes
        with every non-in-sync report, so a lost report loses nothing."""
        r = pb.ReplicationReport(
            volume=self.lv.name,
            reporter=self.address,
            epoch=self.lv.epoch if epoch is None else epoch,
            state=cast("pb.PairState.ValueType", state.to_proto()),
            reason=reason,
            identity=identity_msg(self.lv.identity),
        )
        if state is not PairState.IN_SYNC:
            r.fault_snapshot_id = self.fault_snapshot_id
            r.failed_extents.extend(pb.Extent(offset=e.offset, length=e.length) for e in self.failed_extents)
            r.nacks.extend(
                pb.Nack(seq=n.seq, offset=n.offset, length=n.length, code=nack_code(n.code), message=n.message)
                for n in nacks or ()
            )
            r.unacked.extend(pb.ReplicatedWriteRef(seq=w.seq, offset=w.offset, length=w.length)
                             for w in unacked or ())
        return r

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        # Writes that arrive while we connect wait at the gate: in sync, no
        # write may go to the local volume alone without being tracked.
        self._hold_gate()
        try:
            if self.lv.store.meta_get(META_NODE_PROMOTE_PENDING) is not None:
                try:
                    await self._promote()
                except BaseException as e:
                    # No sequencer runs: refuse writes rather than queue them forever.
                    self._unusable = f"volume {self.lv.name!r}: the promotion to primary failed: {e}"
                    self._closed = True
                    raise
            self._spawn(self._sequencer(), "sequencer")
            startup = decide_startup(self.rec)
            if startup.crash_recovery:
                await self._recover_from_unclean_stop()
            if self.options.snapshot_period_s > 0:
                self._spawn(self._snapshot_loop(), "snapshots")
            if self.state is PairState.IN_SYNC:
                try:
                    await self._open_link()
                except LinkError as e:
                    self._begin_degrade(f"secondary unreachable at startup: {e}")
        finally:
            self._release_gate()
        if self.state is not PairState.IN_SYNC:
            log.warning(
                "volume %s starts %s: %d failed extents (%d bytes), fault snapshot %d; writes are "
                "tracked for resync",
                self.lv.name, self.state.value, len(self.failed_extents),
                sum(e.length for e in self.failed_extents), self.fault_snapshot_id,
            )
        if startup.resync_interrupted:
            await self._resync_failed("the primary restarted during the resync")

    async def stop(self) -> None:
        """Graceful: stop taking writes, let queued ones finish, close the stream."""
        self._closed = True
        if self._handover is not None:
            # Not handed over: the writes at the gate are sequenced and finish.
            self._end_handover(self._handover, "the write path stops")
        # Writes waiting for a lease fail now (they are local and tracked), and
        # so does every write sequenced from here on that has no lease.
        self._wake_lease_waiters()
        try:
            # Every queued write gets sequenced (task_done per write) ...
            await asyncio.wait_for(self._queue.join(), STOP_DRAIN_S)
        except TimeoutError:
            log.warning("volume %s: %d queued writes not sequenced within %.0f s of shutdown",
                        self.lv.name, self._queue.qsize(), STOP_DRAIN_S)
        # A degrade in progress finishes: cancelling it would release writes
        # whose failure information is not yet durable.
        degrading = [t for t in self._tasks if t.get_name() == "degrade"]
        if degrading:
            await asyncio.wait(degrading, timeout=STOP_DRAIN_S)
        for t in list(self._tasks):
            if t.get_name() not in ("complete", "degrade"):
                t.cancel()
        if self._resync_task is not None:
            await asyncio.gather(self._resync_task, return_exceptions=True)
        # ... and completed (replicated, or tracked) before the stream closes.
        pending = [t for t in self._tasks if t.get_name() == "complete"]
        if pending:
            await asyncio.wait(pending, timeout=STOP_DRAIN_S)
        if self.link is not None:
            await self.link.close()
            self.link = None
        if self.state is PairState.IN_SYNC:
            # Every write got its reply and is on both nodes: a clean stop.
            await self._persist(clean="1")

    def _hold_gate(self) -> None:
        self._gate_holds += 1
        self._gate.clear()

    def _release_gate(self) -> None:
        self._gate_holds -= 1
        assert self._gate_holds >= 0, "quiesce gate released more often than held"
        if self._gate_holds == 0:
            self._gate.set()

    async def _recover_from_unclean_stop(self) -> None:
        """The primary crashed while in sync: writes that were in flight may be
        on one node and not the other. The activity log names the regions where
        that is possible: they become the failed extents. Without a log (a
        volume from before it existed), fall back to the last common snapshot
        (the secondary rolls back to it and receives diff(common, head)), and
        without one of those, a full copy — explicitly, and logged."""
        store = self.lv.store
        commons = [(s.name, s.id) for s in store.list_snapshots() if s.name.startswith(COMMON_PREFIX)]
        d = decide_crash_recovery(self.rec, self._al_at_start, commons, store.size_bytes)
        snap_id = d.base_snapshot
        if d.snapshot_cause:
            snap_id = (await self.lv.run_io(store.create_snapshot,
                                            fault_snapshot_name(d.snapshot_cause, self._now_ms()))).id
        extents, rollback_to, reason = d.extents, d.rollback_to, d.reason
        log.error("volume %s: %s", self.lv.name, reason)
        self._start_generation()
        await self._persist(
            state=transition(self._submitted.state, PairEvent.SECONDARY_FAILED), failed_extents=extents,
            fault_snapshot_id=snap_id, last_error=reason, rollback_to=rollback_to,
        )
        # Tell the coordinator now: until it knows, it shows the pair in_sync
        # although the replicas may differ.
        self._spawn(self.reporter(self._report_msg(PairState.DEGRADED, reason)), "report")

    async def _promote(self) -> None:
        """This replica was promoted (docs/FAILOVER.md section 3; the node
        persisted META_NODE_PROMOTE_PENDING with the role change, after rolling
        an incomplete resync back). Snapshot the promotion point, start a new
        generation and persist the degraded record, the identity and the
        cleared flag in one transaction. A crash before that transaction
        redoes all of it; its leftover snapshot is dropped (nothing was
        written since: the gate is held and nothing else writes this store)."""
        store = self.lv.store
        epoch = self.lv.epoch
        if not self.lv.identity.has_data:
            raise FailedPrecondition(
                f"volume {self.lv.name!r} was promoted to primary at epoch {epoch}, but this replica holds no "
                f"data of the pair (identity {self.lv.identity.short()}); it will not serve. Promote a replica "
                "that has the data, or restore this one")
        cause = f"promote-e{epoch}"
        prefix = fault_snapshot_name(cause, 0).removesuffix("0")
        keep = self.rec.fault_snapshot_id

        def snapshot() -> int:
            for s in store.list_snapshots():
                if s.name.startswith(prefix) and s.id != keep:
                    log.warning("volume %s: dropping snapshot %r (id %d) left by an interrupted promotion",
                                self.lv.name, s.name, s.id)
                    store.delete_snapshot(s.id)
            return int(store.create_snapshot(fault_snapshot_name(cause, self._now_ms())).id)

        snap_id = await self.lv.run_io(snapshot)
        p = decide_promotion(epoch, snap_id)
        self._start_generation()
        r = p.record
        await self._persist(
            {META_NODE_PROMOTE_PENDING: None, META_RESYNC_PLAN: None},
            state=r.state, failed_extents=r.failed_extents, fault_snapshot_id=r.fault_snapshot_id,
            last_error=r.last_error, clean=r.clean, rollback_to=r.rollback_to, al_regions=r.al_regions,
        )
        # The activity log of an earlier life as primary is history now.
        self.al = ActivityLog(regions=[])
        self._al_at_start = []
        self._out_of_sync = 0
        log.warning("volume %s: %s; generation %s", self.lv.name, p.reason, self.lv.identity.short())
        self._spawn(self.reporter(self._report_msg(PairState.DEGRADED, "promoted")), "report")

    @staticmethod
    def _now_ms() -> int:
        """Wall-clock milliseconds, for snapshot names only (unique and readable
        by an operator); no decision depends on it."""
        return int(time.time() * 1000)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        t = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks[t] = None
        t.add_done_callback(self._task_done)
        return t

    def _task_done(self, t: asyncio.Task[Any]) -> None:
        self._tasks.pop(t, None)
        if not t.cancelled() and t.exception() is not None:
            log.error("volume %s: task %s failed", self.lv.name, t.get_name(), exc_info=t.exception())

    async def _open_link(self) -> None:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(self.options.connect_attempts),
            wait=wait_exponential_jitter(multiplier=0.1, max=2.0),
            retry=retry_if_exception_type(LinkError),
            reraise=True,
        ):
            with attempt:
                link = ReplicationLink(
                    self.lv.spec,
                    self.lv.epoch,
                    self.next_seq,
                    self.lv.peer,
                    self.address,
                    self.options,
                    on_failure=self._begin_degrade,
                    identity=self.lv.identity,
                    stats=self.stats,
                )
                await link.open()
                await self._persist(clean="0", al_regions=self.al.regions())
                self.link = link
                log.info(
                    "volume %s: replicating to %s (epoch %d, from seq %d)",
                    self.lv.name, self.lv.peer, self.lv.epoch, self.next_seq,
                )

    @property
    def closing(self) -> bool:
        """True once stop() began: refused writes may be retried on the write
        path that replaces this one."""
        return self._closed

    # ------------------------------------------------------------ client API
    def validate(self, offset: int, data: bytes) -> None:
        if len(data) > MAX_WRITE_BYTES:
            raise ResourceExhausted(
                f"write of {len(data)} bytes exceeds the {MAX_WRITE_BYTES}-byte limit per write; split it"
            )
        store = self.lv.store
        check_io_range(self.lv.name, store.size_bytes, store.block_size, offset, len(data))

    async def write(self, offset: int, data: bytes) -> None:
        """Replicated write. Returns when acknowledged (see module docstring)."""
        self.validate(offset, data)
        await self._submit(offset, bytes(data))

    async def zero_range(self, offset: int, length: int) -> None:
        """Replicated zeroing of ``length`` bytes at ``offset`` (block-aligned;
        issue 14: TRIM, WRITE_ZEROES): a write of zeros in every respect --
        sequenced in order with the other writes, acknowledged on the same
        terms, tracked for resync when degraded -- except that it is one op
        of no payload whatever its length, applied on both nodes with
        ``BlockStore.zero_range`` (holes punched). No per-write size limit:
        nothing is carried, the whole range is one op."""
        store = self.lv.store
        check_io_range(self.lv.name, store.size_bytes, store.block_size, offset, length, what="zero range")
        if length == 0:
            raise InvalidArgument(f"zero range at offset {offset} of volume {self.lv.name!r} is empty")
        await self._submit(offset, Zeros(length))

    async def _submit(self, offset: int, data: Payload) -> None:
        if self._unusable:
            raise Unavailable(self._unusable)
        if self._handed_over:
            raise FailedPrecondition(self._handed_over)
        refusal = write_refusal(self.state, self._closed, self.options.on_secondary_failure == "block",
                                self.lv.name)
        if refusal:
            raise Unavailable(refusal)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        t0 = time.monotonic()
        await self._queue.put(_Write(offset, data, fut))
        await fut
        # Acknowledged: its latency, queueing included (what the client saw).
        self.stats.write_latency.observe(time.monotonic() - t0)

    async def read(self, offset: int, length: int, snapshot_id: int = 0) -> bytes:
        store = self.lv.store
        check_io_range(self.lv.name, store.size_bytes, store.block_size, offset, length, what="read")
        if length > MAX_WRITE_BYTES:
            raise InvalidArgument(f"read of {length} bytes exceeds the {MAX_WRITE_BYTES}-byte limit per read")
        return await asyncio.to_thread(store.read_at, snapshot_id or None, offset, length)

    # ------------------------------------------------------------ sequencer
    async def _next_batch(self) -> list[_Write]:
        first = self._holdover or await self._queue.get()
        self._holdover = None
        batch = [first]
        # Payload bytes: a zero range carries none (however long it is).
        nbytes = wire_bytes(first.data)
        while len(batch) < self.options.batch_max_writes and not self._queue.empty():
            w = self._queue.get_nowait()
            if nbytes + wire_bytes(w.data) > self.options.batch_max_bytes:
                self._holdover = w
                break
            batch.append(w)
            nbytes += wire_bytes(w.data)
        return batch

    async def _sequencer(self) -> None:
        while True:
            # A slot first, then the batch: while both slots are busy the
            # queue fills, and the next batch takes all of it.
            await self._local_slots.acquire()
            batch = await self._next_batch()
            nbytes = sum(wire_bytes(w.data) for w in batch)
            # A zero range logs every region it covers, as a write would: a
            # crash mid-way may leave it applied on one node only.
            regions = self.al.regions_for((w.offset, span(w.data)) for w in batch)
            refused = False
            while True:
                await self._gate.wait()
                if self._handed_over:
                    refused = True
                    break
                link = self.link
                if link is None or link.failed:
                    link = None
                    if must_degrade_before_writing(self.state):
                        last = self._degrade_outcome
                        if last is not None and last.done() and not last.result():
                            # The last degrade could not be made durable (a full
                            # disk): retry after a pause, not in a busy loop
                            # (simulator seed 5015: a switchover onto a full disk).
                            await asyncio.sleep(DEGRADE_RETRY_S)
                        self._begin_degrade(
                            self.link.failure_reason if self.link is not None else "no replication stream"
                        )
                        continue
                    break
                if self.al.missing(regions):
                    # Log the regions durably before the write can reach
                    # either node; then look at the gate and the link again.
                    await self._log_regions(regions)
                    continue
                if await link.wait_room(len(batch), nbytes) and self._gate.is_set() and not self._handed_over:
                    break
            if refused:
                # Handed over: these writes never got a seq, they are on
                # neither node; the client re-sends them to the new primary.
                err = FailedPrecondition(self._handed_over)
                for w in batch:
                    if not w.fut.done():
                        w.fut.set_exception(err)
                    self._queue.task_done()
                self._local_slots.release()
                continue
            # From here to the end of the loop body nothing awaits: the seq
            # assignment, the local submission and the send are one step, so
            # a failure cannot slip between them.
            writes = []
            for w in batch:
                writes.append((self.next_seq, w.offset, w.data))
                self.next_seq += 1
            local = self.lv.submit_io(self._write_local, [(o, d) for _, o, d in writes])
            local.add_done_callback(lambda _done: self._local_slots.release())
            remote = link.send(writes) if link is not None else None
            held = regions if link is not None else set()
            self.al.acquire(held)
            self._spawn(self._complete(batch, writes, local, remote, held), "complete")
            for _ in batch:
                self._queue.task_done()

    def _write_local(self, writes: list[tuple[int, Payload]]) -> None:
        apply_writes(self.lv.store, writes)

    async def _log_regions(self, regions: set[int]) -> None:
        evicted = self.al.add(regions)
        await self._persist(al_regions=self.al.regions())
        log.debug("volume %s: activity log +%d regions, -%d evicted (%d logged)", self.lv.name,
                  len(regions), len(evicted), len(self.al.regions()))

    async def _complete(
        self,
        batch: list[_Write],
        writes: list[tuple[int, int, Payload]],
        local: asyncio.Future[None],
        remote: list[asyncio.Future[bool]] | None,
        held: set[int],
    ) -> None:
        alone = False
        try:
            alone = await self._settle(batch, writes, local, remote)
        finally:
            # Both sides have settled: the region may leave the activity log.
            self.al.release(held)
        if alone:
            # After the release: a write waiting for a lease holds no region.
            await self._acknowledge_alone(batch)

    async def _settle(
        self,
        batch: list[_Write],
        writes: list[tuple[int, int, Payload]],
        local: asyncio.Future[None],
        remote: list[asyncio.Future[bool]] | None,
    ) -> bool:
        """Reply to the batch's writes, except those on the primary only
        (tracked for resync): for those it returns True and the caller
        acknowledges them under a lease (``_acknowledge_alone``)."""
        try:
            await local
        except Exception as e:
            # The primary's own disk failed. The secondary may have the write;
            # the client is told it failed (its content is indeterminate).
            log.error("volume %s: local write failed: %s", self.lv.name, e)
            err = Unavailable(f"primary storage failed: {e}")
            for w in batch:
                if not w.fut.done():
                    w.fut.set_exception(err)
            if remote is not None and any(await asyncio.gather(*remote)):
                # The secondary applied writes this node could not: the
                # replicas differ there although the pair may be in sync (a
                # switchover onto a full disk: simulator seed 5015). Degrade
                # with those extents failed, so the resync makes the
                # secondary equal to this primary again.
                while self._degrading:
                    await self._settled.wait()
                self._unrecorded.extend(Extent(off, span(data)) for _, off, data in writes)
                self._begin_degrade(f"local write failed ({e}); the secondary holds writes this primary lacks")
            return False
        lost = False
        if remote is not None:
            results = await asyncio.gather(*remote)
            if all(results):
                self.acked_seq = max(self.acked_seq, writes[-1][0])
            else:
                lost = True
                # Not on the secondary: reply only once the degrade step has
                # persisted these writes as failed extents.
                await self._settled.wait()
                if self._degrade_outcome is not None and not await self._degrade_outcome:
                    err = Unavailable(
                        f"volume {self.lv.name!r}: the secondary failed and the primary could not record "
                        "the failed extents durably; the write's outcome is unknown, retry it"
                    )
                    for w in batch:
                        if not w.fut.done():
                            w.fut.set_exception(err)
                    return False
        alone = lost or remote is None
        refusal = reply_refusal(self.options.on_secondary_failure == "block", alone, self.lv.name,
                                self.last_error)
        if alone and not refusal:
            return True
        for w in batch:
            if w.fut.done():
                continue
            if refusal:
                w.fut.set_exception(Unavailable(refusal))
            else:
                w.fut.set_result(None)
        return False

    # ------------------------------------------------------------ switchover (docs/FAILOVER.md section 5)
    async def prepare_handover(self, epoch: int, timeout_s: float, handover_id: str = "") -> tuple[int, float]:
        """Close the gate (new writes wait there; they do not fail), drain
        (every write sequenced is durable here and acknowledged by the
        secondary), check the pair is in sync, and keep the gate closed for
        the demotion (``hand_over``). Returns (the last acknowledged seq, the
        drain's seconds). Refused (gate reopened) if anything is not in
        order; the gate also reopens by itself after ``timeout_s`` if no
        demotion came (the coordinator did not persist the swap)."""
        if self._handover is not None or self._handed_over:
            raise FailedPrecondition(f"volume {self.lv.name!r}: a handover is already in progress on this node")
        t0 = time.monotonic()
        handover = self._handover = _Handover(epoch, t0, handover_id)
        self._hold_gate()
        try:
            # After _hold_gate no new batch is sequenced (the sequencer looks at
            # the gate after every await before it sends), so the "complete"
            # tasks now running are all the writes in flight.
            # Half the timeout for the drain: the other half is the coordinator's,
            # to persist the swap and demote this node.
            deadline = t0 + timeout_s / 2
            while pending := [t for t in self._tasks if t.get_name() in ("complete", "degrade")]:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Unavailable(
                        f"volume {self.lv.name!r}: {len(pending)} write batches still in flight after "
                        f"{timeout_s / 2:.1f} s; the handover is abandoned, retry"
                    )
                await asyncio.wait(pending, timeout=remaining)
            link = self.link
            refusal = handover_refusal(
                self.state,
                closing=self._closed,
                degrading=self._degrading,
                replicating=link is not None and not link.failed,
                resyncing=self._resync_task is not None and not self._resync_task.done(),
                acked_seq=self.acked_seq,
                next_seq=self.next_seq,
                volume=self.lv.name,
            )
            if refusal:
                raise FailedPrecondition(refusal)
        except BaseException:
            self._end_handover(handover, "")
            raise
        drain_s = time.monotonic() - t0
        handover.drained = True
        handover.identity = self.lv.identity
        handover.expiry = self._spawn(self._handover_expiry(handover, timeout_s), "handover-expiry")
        log.warning(
            "volume %s: handing over at epoch %d: gate closed, drained up to seq %d in %.3f s; writes wait "
            "for the switchover (at most %.1f s)", self.lv.name, epoch, self.acked_seq, drain_s, timeout_s,
        )
        return self.acked_seq, drain_s

    async def _handover_expiry(self, handover: _Handover, timeout_s: float) -> None:
        await asyncio.sleep(max(0.0, handover.t0 + timeout_s - time.monotonic()))
        self._end_handover(handover, f"no switchover within {timeout_s:.1f} s")

    def _end_handover(self, handover: _Handover, why: str) -> None:
        """Abandon ``handover`` (if it is still the current one): reopen the gate."""
        if self._handover is not handover:
            return
        self._handover = None
        if handover.expiry is not None and handover.expiry is not asyncio.current_task():
            handover.expiry.cancel()
        self._release_gate()
        if why:
            log.warning("volume %s: handover abandoned (%s); the gate is open again, writes resume",
                        self.lv.name, why)

    def release_handover(self, epoch: int, handover_id: str = "") -> str:
        """The coordinator gave up the switchover: reopen the gate now, if
        it is the gate that attempt closed. Returns what was done (the
        reply's message). Why the id: a coordinator whose
        PrepareHandover was refused (another attempt, from a deposed leader
        or an earlier try that timed out, holds the gate) releases as well,
        and must not reopen a gate it did not close: that attempt may still
        be about to swap the roles."""
        handover = self._handover
        if handover is None or handover.epoch != epoch:
            return "no handover in progress"
        if handover_id and handover.handover_id and handover_id != handover.handover_id:
            log.info("volume %s: release of handover %s ignored: the gate is held for handover %s",
                     self.lv.name, handover_id, handover.handover_id)
            return f"the gate is held for another handover ({handover.handover_id}); left closed"
        self._end_handover(handover, "the coordinator did not swap the roles")
        return "gate reopened"

    def hand_over(self, new_primary: str, new_epoch: int) -> Identity | None:
        """The demotion of a switchover: if this primary drained and still
        holds its gate (then nothing was written since, and no write is on
        this node alone), from now on every write, those waiting at the gate
        included, is refused as "not its primary", and the identity both
        replicas shared at the handover is returned: the node keeps that one
        (a degrade that began since, the link failing while the gate was
        held, minted a generation under which nothing was written). None: no
        valid handover (it expired, or never happened): the caller demotes the
        ordinary way (divergent extents)."""
        handover = self._handover
        if handover is None or not handover.drained or handover.identity is None or new_epoch <= handover.epoch:
            return None
        self._handed_over = (
            f"this node ({self.address}) is not its primary any more: volume {self.lv.name!r} was switched over "
            f"to {new_primary} at epoch {new_epoch}; writes go to the primary ({new_primary})"
        )
        log.warning("volume %s: handed over to %s at epoch %d after %.3f s with the gate closed",
                    self.lv.name, new_primary, new_epoch, time.monotonic() - handover.t0)
        # Opening the gate now lets the sequencer refuse the waiting writes.
        self._end_handover(handover, "")
        return handover.identity

    @property
    def handed_over(self) -> bool:
        return bool(self._handed_over)

    # ------------------------------------------------------------ the lease (docs/FAILOVER.md section 2)
    def on_lease(self, lease: pb.Lease, sent_at: float) -> None:
        """A Lease from a HeartbeatReply or ReportReplicationReply; ``sent_at``:
        time.monotonic() when the request it answers was sent. The newest
        grant (by ``sent_at``) is kept; writes waiting for a lease look again."""
        if lease.volume and lease.volume != self.lv.name:
            log.warning("volume %s: ignoring a lease for volume %r", self.lv.name, lease.volume)
            return
        try:
            state: PairState | None = PairState.from_proto(lease.state)
        except ValueError:
            state = None
        if self.lease.grant(lease.epoch, lease.lease_s, state, lease.generation, sent_at):
            self._wake_lease_waiters()

    def _wake_lease_waiters(self) -> None:
        changed, self._lease_changed = self._lease_changed, asyncio.Event()
        changed.set()

    def may_write_alone(self) -> bool:
        return self.lease.may_write_alone(time.monotonic(), self._alone_generation())

    async def _acknowledge_alone(self, batch: list[_Write]) -> None:
        """The batch is on the primary only and tracked for resync: acknowledge
        it under a lease, or fail it (safe: failing a tracked write leaves its
        outcome unknown to the client, as for any UNAVAILABLE)."""
        if all(w.fut.done() for w in batch):
            return
        refusal = await self._wait_for_lease()
        for w in batch:
            if w.fut.done():
                continue
            if refusal:
                w.fut.set_exception(Unavailable(refusal))
            else:
                w.fut.set_result(None)

    async def _wait_for_lease(self) -> str:
        """"" once the primary may write alone; else why not (the message of
        the UNAVAILABLE the writes get). --on-quorum-loss io-error: no wait;
        suspend: up to quorum_loss_timeout_s, woken by on_lease and stop()."""
        now = time.monotonic()
        if self.lease.may_write_alone(now, self._alone_generation()):
            return ""
        if self._closed:
            return self._quorum_loss_message(now, "the write path is shutting down")
        if self.options.on_quorum_loss == "io-error":
            return self._quorum_loss_message(now, "--on-quorum-loss io-error: not waiting for one")
        timeout_s = self.options.quorum_loss_timeout_s
        deadline = now + timeout_s
        t0 = now
        if self._lease_waiters == 0:
            log.warning("volume %s: writes suspended: the secondary is not reachable and the primary may not "
                        "write alone (%s); waiting up to %.1f s for a lease from the coordinator",
                        self.lv.name, self.lease.refusal(now, self.lv.identity.current), timeout_s)
        self._lease_waiters += 1
        try:
            while True:
                changed = self._lease_changed
                now = time.monotonic()
                if self.lease.may_write_alone(now, self._alone_generation()):
                    if self._lease_waiters == 1:
                        log.warning("volume %s: writes resumed under a lease after %.2f s", self.lv.name, now - t0)
                    return ""
                if self.rec.state is PairState.IN_SYNC:
                    # A resync completed meanwhile: its final round carried
                    # every write that had landed locally, this one included
                    # (it landed before it began to wait). It is on both nodes.
                    return ""
                if self._closed:
                    return self._quorum_loss_message(
                        now, f"waited {now - t0:.1f} s, then the write path shut down")
                left = deadline - now
                if left <= 0:
                    return self._quorum_loss_message(now, f"waited {timeout_s:.1f} s (--quorum-loss-timeout-s)")
                await wait_event(changed, left)  # not wait_for: a cancel must end the wait (syncrep/aio.py)
        finally:
            self._lease_waiters -= 1

    def _quorum_loss_message(self, now: float, what: str) -> str:
        why = self.lease.refusal(now, self.lv.identity.current)
        return (
            f"volume {self.lv.name!r}: the secondary is not reachable and the primary holds no lease from the "
            f"coordinator (it may not write alone; docs/FAILOVER.md): {why}; {what}. The write is on the "
            "primary and tracked for resync, its outcome is unknown: retry it once the coordinator is "
            "reachable or the secondary is back"
        )

    # ------------------------------------------------------------ degrade (method steps 1-2)
    def _begin_degrade(self, reason: str) -> None:
        """Called synchronously by the link on failure: close the gate first."""
        if self._degrading:
            return
        self._degrading = True
        self._hold_gate()
        self._settled.clear()
        self._degrade_outcome = asyncio.get_running_loop().create_future()
        self._spawn(self._degrade(reason, time.monotonic(), self._degrade_outcome), "degrade")

    async def _degrade(self, reason: str, t0: float, outcome: asyncio.Future[bool]) -> None:
        decision = None
        try:
            link, self.link = self.link, None
            nacks = list(link.window.nacks) if link is not None else []
            unacked = list(link.failed_writes) if link is not None else []
            decision = decide_degrade(self._submitted, [(n.offset, n.length) for n in nacks],
                                      [(w.offset, w.length) for w in unacked], reason, self._unrecorded)
            if link is not None:
                await link.close()
            # Drain + snapshot: the I/O thread is FIFO, so the snapshot lands
            # after every write already submitted and before any new one (the
            # gate is closed).
            rec = decision.record
            if decision.needs_snapshot:
                info = await self.lv.run_io(
                    self.lv.store.create_snapshot, fault_snapshot_name(f"e{self.lv.epoch}", self._now_ms())
                )
                rec = rec.evolve(fault_snapshot_id=info.id)
            if decision.new_generation:
                # Persisted with the degraded record just below (and, should
                # that fail, with the next record that is written).
                self._start_generation()
            # Only the fields this decision changes: a record persisted while
            # we awaited (the activity log) keeps its newer fields.
            await self._persist(state=rec.state, failed_extents=rec.failed_extents,
                                fault_snapshot_id=rec.fault_snapshot_id, last_error=rec.last_error)
            self._unrecorded = []
            outcome.set_result(True)
        finally:
            if not outcome.done():
                # Not durable (disk full, shutdown): the writes this degrade
                # covers must not be acknowledged as replicated-or-tracked, and
                # the next degrade carries their extents.
                if decision is not None:
                    self._unrecorded = list(decision.record.failed_extents)
                outcome.set_result(False)
            self._degrading = False
            self._settled.set()
            self._release_gate()
        extents, snap_id = self.failed_extents, self.fault_snapshot_id
        self.last_stall_s = time.monotonic() - t0
        self.stats.stall.observe(self.last_stall_s)
        log.warning(
            "volume %s degraded: %s; %d failed extents (%d bytes) from %d NACKs and %d unacked writes; "
            "fault-recovery snapshot %d; write stall %.1f ms",
            self.lv.name, reason, len(extents), sum(e.length for e in extents), len(nacks), len(unacked),
            snap_id, self.last_stall_s * 1000,
        )
        report = self._report_msg(PairState.DEGRADED, reason, nacks=nacks, unacked=unacked)
        self._spawn(self.reporter(report), "report")

    # ------------------------------------------------------------ resync (method step 3)
    async def start_resync(
        self, epoch: int, *, extra_extents: Sequence[Extent] = (), full_copy: bool = False,
    ) -> str:
        """Called by the coordinator with a new epoch once the secondary is back.
        ``extra_extents``: extents to re-send besides the primary's failed ones
        (a demoted primary's divergent writes); ``full_copy``: the secondary is
        empty, send the whole volume. Both join the failed extents, persisted
        with the state change, before the resync plan is made."""
        if self._closed:
            raise Unavailable(f"volume {self.lv.name!r} is shutting down")
        running = self._resync_task is not None and not self._resync_task.done()
        store = self.lv.store
        d = decide_start_resync(self._submitted, self.lv.name, self.lv.epoch, epoch, running, self._degrading,
                                extra_extents=extra_extents, full_copy=full_copy, size_bytes=store.size_bytes)
        if d.already:
            return d.already
        if d.cancel_running and self._resync_task is not None:
            self._resync_task.cancel()
            await asyncio.gather(self._resync_task, return_exceptions=True)
        if d.refuse:
            raise FailedPrecondition(d.refuse)
        self.lv.epoch = epoch
        state = d.state
        meta = self.lv.role_meta()
        stale_plan: ResyncPlan | None = None
        persisted = ResyncPlan.load(store.meta_get(META_RESYNC_PLAN))
        if d.added_bytes:
            # The persisted plan was made from the old failed extents: start over.
            stale_plan = persisted
            meta[META_RESYNC_PLAN] = None
            log.warning("volume %s: resync at epoch %d adds %s%s", self.lv.name, epoch, d.added,
                        f"; the interrupted resync {stale_plan.resync_id} starts over" if stale_plan else "")
        elif full_copy and persisted is not None and persisted.rounds_done > 0:
            # A full copy goes to an empty replica, which may be a NEW empty
            # store (its disk replaced again mid-copy): it would then lack the
            # rounds this plan counts as done, and resuming at the next round
            # would leave it with zeros. Only a full copy interrupted within
            # its first round resumes (the replica tells where: applied_below).
            # (Found by the simulator, seeds 21112 and 21399.)
            stale_plan = persisted
            meta[META_RESYNC_PLAN] = None
            log.warning("volume %s: the interrupted full copy %s (%d rounds done) starts over: the empty "
                        "replica may be a new store", self.lv.name, persisted.resync_id, persisted.rounds_done)
        # Unioned with the extents submitted now: a change persisted while we
        # waited for a cancelled resync keeps its extents.
        failed = merge_extents([*self._submitted.failed_extents, *d.failed_extents])
        await self._persist(meta, state=state, failed_extents=failed)
        if stale_plan is not None:
            for sid in stale_plan.snapshots:
                try:
                    await self.lv.run_io(store.delete_snapshot, sid)
                except Exception as e:
                    log.info("volume %s: snapshot %d of the dropped plan: %s", self.lv.name, sid, e)
        self._resync_t0 = time.monotonic()
        self._resync_sent0 = self.counters.bytes_sent
        self._resync_zero0 = self.counters.zero_bytes_sent
        self._resync_refused0 = self.counters.chunks_refused
        self.stats.resync_started()
        self._resync_task = self._spawn(self._resync_main(epoch), "resync")
        mode = ResyncMode.from_proto(self.lv.resync_mode)
        return f"resync of {self.lv.name!r} started at epoch {epoch} ({mode.value})"

    def _on_progress(self, done: int, total: int, round_no: int) -> None:
        elapsed = max(1e-6, time.monotonic() - self._resync_t0)
        rate = (self.counters.bytes_sent - self._resync_sent0) / elapsed
        eta = (total - done) / rate if rate > 0 else 0.0
        self.stats.resync_progress(done, total)
        self.resync_progress = pb.ResyncProgress(
            bytes_done=done, bytes_total=total, rate_bytes_per_s=rate, eta_s=eta, round=round_no
        )

    async def _send_round(self, plan: ResyncPlan, spec: RoundSpec, final: bool, limiter: RateLimiter) -> int:
        store = self.lv.store
        pieces = await asyncio.to_thread(round_pieces, store, spec, self.options.resync_chunk_bytes)
        total = sum(n for _, n in pieces)
        log.info("volume %s: resync %s round %d (%s%s): %d bytes in %d chunks",
                 self.lv.name, plan.resync_id, spec.round, spec.kind, ", final" if final else "",
                 total, len(pieces))
        self._on_progress(0, total, spec.round)
        sender = RoundSender(
            store, self.lv.peer, self.lv.spec, self.lv.epoch, plan, spec, pieces, final, limiter,
            self.counters, lambda done: self._on_progress(done, total, spec.round),
            identity=self.lv.identity, full_copy=is_full_copy(self.failed_extents, store.size_bytes),
        )
        await sender.run()
        self.stats.resync_round_sent(total)
        return total

    async def _persist_plan(self, plan: ResyncPlan | None) -> None:
        await self.lv.run_io(self.lv.store.meta_set, {META_RESYNC_PLAN: plan.dump() if plan else None})

    async def _snapshot(self, name: str) -> int:
        return (await self.lv.run_io(self._fresh_snapshot, name)).id

    def _fresh_snapshot(self, name: str) -> Any:
        """On the I/O thread: create snapshot ``name``. A resync snapshot of that
        name can only be a leftover of a crash between creating it and
        persisting the plan that names it (the plan never names it twice):
        drop it, or the resync fails on SnapshotExistsError forever."""
        store = self.lv.store
        stale = store.find_snapshot(name)
        if stale is not None:
            log.warning("volume %s: dropping snapshot %r (id %d) left by an interrupted resync step",
                        self.lv.name, name, stale.id)
            store.delete_snapshot(stale.id)
        return store.create_snapshot(name)

    async def _resync_main(self, epoch: int) -> None:
        try:
            async with self.budget.slot(self.lv.name):
                await self._resync(epoch)
        except asyncio.CancelledError:
            raise
        except (ResyncError, LinkError, OSError) as e:
            await self._resync_failed(str(e))
        except Exception as e:
            log.exception("volume %s: resync failed unexpectedly", self.lv.name)
            await self._resync_failed(f"{type(e).__name__}: {e}")

    async def _resync(self, epoch: int) -> None:
        """Carry out the steps of ``next_step`` (syncrep/core/resync_plan.py)
        until the final round has switched the pair back to in sync. The plan
        is persisted after every step that changes it, so a restart resumes."""
        store = self.lv.store
        limiter = RateLimiter(self.options.resync_max_rate_bytes_per_s, self.budget.rate)
        plan = ResyncPlan.load(store.meta_get(META_RESYNC_PLAN))
        if plan is None or plan.fault_snapshot != self.fault_snapshot_id:
            mode = ResyncMode.from_proto(self.lv.resync_mode)
            if mode is ResyncMode.REWRITE and is_full_copy(self.failed_extents, store.size_bytes):
                # Variant A would rewrite the whole volume in one step on the
                # I/O thread, stalling every client write for that long;
                # variant B reads a full copy from a snapshot instead.
                log.info("volume %s: full copy: variant B (direct) instead of the configured rewrite",
                         self.lv.name)
                mode = ResyncMode.DIRECT
            plan = ResyncPlan.new(mode, self.fault_snapshot_id, self.rollback_to)
            log.info("volume %s: new resync %s, variant %s, base fault snapshot %d, %d failed extents "
                     "(%d bytes)%s", self.lv.name, plan.resync_id, mode.variant, plan.fault_snapshot,
                     len(self.failed_extents), sum(e.length for e in self.failed_extents),
                     f", secondary rolls back to {plan.rollback_to!r}" if plan.rollback_to else "")
        else:
            log.info("volume %s: resuming resync %s after %d completed rounds", self.lv.name,
                     plan.resync_id, plan.rounds_done)
        limits = ResyncLimits(
            final_diff_threshold_bytes=self.options.final_diff_threshold_bytes,
            max_diff_rounds=self.options.max_diff_rounds,
            diff_delay_s=self.options.diff_delay_s,
        )
        pending: int | None = None
        while True:
            step = next_step(plan, self.failed_extents, limits, pending)
            pending = None
            match step:
                case RewriteFailed():
                    n = await self.lv.run_io(self._rewrite, self.failed_extents)
                    log.info("volume %s: variant A rewrote %d bytes of failed extents", self.lv.name, n)
                    plan.rewritten = True
                case TakeRoundSnapshot():
                    if step.delay_s > 0:
                        await asyncio.sleep(step.delay_s)
                    snap = await self._snapshot(resync_snapshot_name(plan.resync_id, step.tag))
                    plan.round_planned(step.spec(snap))
                    await self._persist_plan(plan)
                case SendRound(spec=spec):
                    sent = await self._send_round(plan, spec, False, limiter)
                    plan.round_sent(spec, sent)
                    await self._persist_plan(plan)
                case MeasurePending(since=since):
                    pending = await asyncio.to_thread(store.bytes_written_since, since)
                case FinalRound():
                    await self._final_round(plan, step, epoch)
                    return

    def _rewrite(self, extents: list[Extent]) -> int:
        """Variant A, on the I/O thread (atomic w.r.t. client writes): read the
        failed extents and write them back, so they count as changed after F."""
        store = self.lv.store
        n = 0
        batch: list[tuple[int, bytes]] = []
        size = 0
        for off, data in store.iter_extents(extents, None, chunk_bytes=self.options.resync_chunk_bytes):
            batch.append((off, data))
            size += len(data)
            n += len(data)
            if size >= 8 * self.options.resync_chunk_bytes:
                store.write_batch(batch)
                batch, size = [], 0
        if batch:
            store.write_batch(batch)
        return n

    async def _final_round(self, plan: ResyncPlan, step: FinalRound, epoch: int) -> None:
        """Quiesce, send the last difference, re-open synchronous replication at
        the new epoch, release. The stall is bounded by final_diff_threshold_bytes."""
        t0 = time.monotonic()
        self._hold_gate()
        released = False
        final_sent = False
        try:
            # One name per attempt: an interrupted final round is resumed as an
            # ordinary round (its snapshot stays in the plan), and the next
            # final round needs a snapshot of its own.
            name = resync_final_snapshot_name(plan.resync_id, step.round)
            stale = await self.lv.run_io(self.lv.store.find_snapshot, name)
            if stale is not None and stale.id not in plan.snapshots:
                # Left by a crash between creating it and persisting the plan.
                await self.lv.run_io(self.lv.store.delete_snapshot, stale.id)
            dfin = await self._snapshot(name)
            spec = RoundSpec(step.round, RoundKind.DIFF, step.base, dfin)
            plan.round_planned(spec)
            await self._persist_plan(plan)
            # Unthrottled: writes are paused while this round travels, so
            # --resync-max-rate would only lengthen the stall.
            await self._send_round(plan, spec, True, RateLimiter(0))
            final_sent = True
            link = ReplicationLink(self.lv.spec, epoch, self.next_seq, self.lv.peer, self.address,
                                   self.options, on_failure=self._begin_degrade, identity=self.lv.identity,
                                   stats=self.stats)
            await link.open()
            old_snaps = [*plan.snapshots, self.fault_snapshot_id]
            done = resync_done(self._submitted, self.al.regions())
            await self._persist(
                {META_RESYNC_PLAN: None}, state=done.state, failed_extents=(), fault_snapshot_id=0,
                rollback_to="", last_error="", clean="0", al_regions=done.al_regions,
            )
            self.link = link
            self._release_gate()
            released = True
            # Writes waiting for a lease are on both nodes now (_wait_for_lease).
            self._wake_lease_waiters()
            stall = time.monotonic() - t0
            self.last_stall_s = stall
            self.stats.stall.observe(stall)
            log.info("volume %s: back in sync at epoch %d after %.1f s; resync sent %d bytes in %d rounds "
                     "(%d of them zeros sent as a length; %d chunks refused and re-sent); switch-back write "
                     "stall %.1f ms",
                     self.lv.name, epoch, time.monotonic() - self._resync_t0,
                     self.counters.bytes_sent - self._resync_sent0, plan.rounds_done + 1,
                     self.counters.zero_bytes_sent - self._resync_zero0,
                     self.counters.chunks_refused - self._resync_refused0, stall * 1000)
        finally:
            if not released:
                if final_sent:
                    # The final round completed on the secondary, which adopted
                    # this generation with it; the switch-back failed, so what
                    # this primary acknowledges alone from now on must be under
                    # a generation the secondary never had (simulator seed 3947:
                    # else a forced promote of it looks merely newer and those
                    # writes are overwritten, with no split brain). Minted
                    # before the gate opens; a lease must name it.
                    self._start_generation()
                    try:
                        await self._persist()
                    except Exception as e:  # disk full: it stays pending, writes alone wait for it
                        log.warning("volume %s: new generation not yet durable: %s", self.lv.name, e)
                self._release_gate()
        self.resync_progress = pb.ResyncProgress()
        for sid in old_snaps:
            try:
                await self.lv.run_io(self.lv.store.delete_snapshot, sid)
            except Exception as e:
                log.info("volume %s: snapshot %d: %s", self.lv.name, sid, e)
        self._spawn(self.reporter(self._report_msg(PairState.IN_SYNC, "resync complete", epoch=epoch)), "report")

    async def _resync_failed(self, reason: str) -> None:
        log.error("volume %s: resync interrupted: %s (it resumes when the secondary is back)",
                  self.lv.name, reason)
        failed = resync_failed(self._submitted, reason)
        # The secondary may have adopted this generation (a final round that
        # completed there): writing alone from here on needs a new one
        # (simulator seed 3947; see decide_degrade).
        self._start_generation()
        await self._persist(state=failed.state, last_error=failed.last_error)
        self._spawn(self.reporter(self._report_msg(PairState.DEGRADED, self.last_error)), "report")

    async def repair(self, extents: list[Extent]) -> int:
        """verify --repair: re-send just these extents, under quiesce so the
        secondary ends identical to the primary."""
        refusal = repair_refusal(self.state, self.link is not None, self.lv.name)
        if refusal:
            raise FailedPrecondition(refusal)
        self._hold_gate()
        try:
            await self.lv.run_io(lambda: None)  # drain: every earlier write has landed locally ...
            if self.link is not None:  # ... and on the secondary
                await self.link.wait_drained()
            plan = ResyncPlan.new(ResyncMode.REPAIR, 0)
            spec = RoundSpec(0, RoundKind.REPAIR, 0, 0, [[e.offset, e.length] for e in extents])
            # final=True: a repair is complete in one round.
            sent = await self._send_round(plan, spec, True, RateLimiter(0))
        finally:
            self._release_gate()
        return sent

    # ------------------------------------------------------------ periodic common snapshots
    async def _snapshot_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.snapshot_period_s)
            if self.state is PairState.IN_SYNC and self.link is not None and not self.link.failed:
                try:
                    await self.take_common_snapshot()
                except (LinkError, OSError) as e:
                    log.warning("volume %s: periodic snapshot skipped: %s", self.lv.name, e)

    async def take_common_snapshot(self) -> str:
        """Quiesce, drain, snapshot locally and send the marker in the write
        stream, so the secondary cuts at exactly the same point."""
        async with self._snapshot_lock:
            t0 = time.monotonic()
            self._hold_gate()
            try:
                link = self.link
                if link is None or link.failed:
                    raise LinkError("not replicating")
                name = common_snapshot_name(self._now_ms())
                seq = self.next_seq
                await self._snapshot(name)
                link.send_marker(seq, name, self.options.snapshots_keep)
            finally:
                self._release_gate()
                self.stats.stall.observe(time.monotonic() - t0)
            await self.lv.run_io(self._prune_common)
            log.info("volume %s: common snapshot %r at seq %d (write stall %.1f ms)",
                     self.lv.name, name, seq, (time.monotonic() - t0) * 1000)
            return name

    def _prune_common(self) -> None:
        commons = [s for s in self.lv.store.list_snapshots() if s.name.startswith(COMMON_PREFIX)]
        for s in commons[: max(0, len(commons) - self.options.snapshots_keep)]:
            self.lv.store.delete_snapshot(s.id)

    # ------------------------------------------------------------ status
    def report(self) -> pb.VolumeReport:
        r = pb.VolumeReport(
            name=self.lv.name,
            role=pb.ROLE_PRIMARY,
            epoch=self.lv.epoch,
            state=cast("pb.PairState.ValueType", self.state.to_proto()),
            last_seq=self.next_seq - 1,
            acked_seq=self.acked_seq,
            fault_snapshot_id=self.fault_snapshot_id,
            last_error=self.last_error,
            size_bytes=self.lv.store.size_bytes,
            block_size=self.lv.store.block_size,
        )
        r.failed_extents.extend(pb.Extent(offset=e.offset, length=e.length) for e in self.failed_extents[:64])
        r.resync.CopyFrom(self.resync_progress)
        r.resync_bytes_sent = self.counters.bytes_sent
        r.resync_chunks_refused = self.counters.chunks_refused
        r.last_stall_ms = self.last_stall_s * 1000
        r.identity.CopyFrom(identity_msg(self.lv.identity))
        r.out_of_sync_bytes = self._out_of_sync_bytes()
        r.lease_remaining_s = self.lease.remaining_s(time.monotonic())
        r.suspended = self._lease_waiters > 0
        return r

    def out_of_sync_bytes(self) -> int:
        """What status and the metrics show: see ``_out_of_sync_bytes``."""
        return self._out_of_sync_bytes()

    def _out_of_sync_bytes(self) -> int:
        """0 in sync; else the failed extents plus what was written since the
        fault snapshot (overlaps count twice: an upper bound). From a cache
        refreshed in a thread at most every OUT_OF_SYNC_REFRESH_S: report()
        runs every heartbeat and the diff walks a bitmap."""
        if self.state is PairState.IN_SYNC:
            return 0
        now = time.monotonic()
        refreshing = self._out_of_sync_task is not None and not self._out_of_sync_task.done()
        if now - self._out_of_sync_at >= OUT_OF_SYNC_REFRESH_S and not refreshing and not self._closed:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return self._out_of_sync
            self._out_of_sync_at = now
            self._out_of_sync_task = self._spawn(self._refresh_out_of_sync(), "out-of-sync")
        return self._out_of_sync

    async def _refresh_out_of_sync(self) -> None:
        failed, snap = self.rec.failed_bytes, self.fault_snapshot_id
        since = 0
        if snap:
            try:
                since = await asyncio.to_thread(self.lv.store.bytes_written_since, snap)
            except Exception as e:  # the snapshot went away (resync done): the next refresh sees in sync
                log.debug("volume %s: out-of-sync bytes not measured: %s", self.lv.name, e)
                return
        self._out_of_sync = failed + since


__all__ = ["PrimaryVolume", "SyncrepError"]
