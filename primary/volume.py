"""The primary's write path for one volume pair.

    client write -> validate -> queue -> sequencer -> (local group commit  ||  replication batch)
                                                   -> reply when local is durable AND
                                                      (the secondary acked  OR  the write is
                                                       tracked for resync, i.e. degraded)

The sequencer is the single place that assigns seqs, so local application
(one I/O thread, FIFO) and remote application (the secondary applies in seq
order) see overlapping writes in the same order.

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
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from coordinator.extents import derive_failed_extents
from coordinator.pairstate import Event, PairState, transition
from primary.link import LinkError, ReplicationLink
from syncrep.blockstore import Extent
from syncrep.config import NodeOptions
from syncrep.errors import InvalidArgument, ResourceExhausted, SyncrepError, Unavailable, check_io_range
from syncrep.pb import syncrep_pb2 as pb
from syncrep.rpc import MAX_WRITE_BYTES
from syncrep.volumes import LocalVolume

log = logging.getLogger(__name__)

META_STATE = "pair.state"
META_FAILED = "pair.failed_extents"
META_FAULT_SNAP = "pair.fault_snapshot_id"
META_LAST_ERROR = "pair.last_error"

Reporter = Callable[[pb.ReplicationReport], Awaitable[None]]


@dataclass
class _Write:
    offset: int
    data: bytes
    fut: asyncio.Future[None]


class PrimaryVolume:
    def __init__(
        self,
        lv: LocalVolume,
        options: NodeOptions,
        address: str,
        reporter: Reporter,
    ) -> None:
        self.lv = lv
        self.options = options
        self.address = address
        self.reporter = reporter
        store = lv.store
        self.state = PairState(store.meta_get(META_STATE) or PairState.IN_SYNC.value)
        self.failed_extents: list[Extent] = [
            Extent(o, n) for o, n in json.loads(store.meta_get(META_FAILED) or "[]")
        ]
        self.fault_snapshot_id = int(store.meta_get(META_FAULT_SNAP) or 0)
        self.last_error = store.meta_get(META_LAST_ERROR) or ""
        self.next_seq = 1
        self.acked_seq = 0
        self.link: ReplicationLink | None = None
        self._queue: asyncio.Queue[_Write] = asyncio.Queue(maxsize=options.queue_writes)
        self._holdover: _Write | None = None
        self._gate = asyncio.Event()
        self._gate.set()
        self._settled = asyncio.Event()
        self._settled.set()
        self._degrading = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self.last_stall_s = 0.0
        self.resync_progress = pb.ResyncProgress()

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._spawn(self._sequencer(), "sequencer")
        if self.state is PairState.IN_SYNC:
            try:
                await self._open_link()
            except LinkError as e:
                self._begin_degrade(f"secondary unreachable at startup: {e}")
        else:
            log.warning(
                "volume %s starts %s: %d failed extents (%d bytes), fault snapshot %d; writes are "
                "tracked for resync",
                self.lv.name, self.state.value, len(self.failed_extents),
                sum(e.length for e in self.failed_extents), self.fault_snapshot_id,
            )

    async def stop(self) -> None:
        """Graceful: stop taking writes, let queued ones finish, close the stream."""
        self._closed = True
        deadline = time.monotonic() + 5.0
        while (not self._queue.empty() or self._holdover) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for t in list(self._tasks):
            if t.get_name() != "complete":
                t.cancel()
        pending = [t for t in self._tasks if t.get_name() == "complete"]
        if pending:
            await asyncio.wait(pending, timeout=5.0)
        if self.link is not None:
            await self.link.close()
            self.link = None

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        t = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(t)
        t.add_done_callback(self._task_done)
        return t

    def _task_done(self, t: asyncio.Task[Any]) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.error("volume %s: task %s failed", self.lv.name, t.get_name(), exc_info=t.exception())

    async def _open_link(self) -> None:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(self.options.connect_attempts),
            wait=wait_exponential_jitter(initial=0.1, max=2.0),
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
                )
                await link.open()
                self.link = link
                log.info(
                    "volume %s: replicating to %s (epoch %d, from seq %d)",
                    self.lv.name, self.lv.peer, self.lv.epoch, self.next_seq,
                )

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
        if self._closed:
            raise Unavailable(f"volume {self.lv.name!r} is shutting down")
        if self.options.on_secondary_failure == "block" and self.state is not PairState.IN_SYNC:
            raise Unavailable(
                f"volume {self.lv.name!r} is {self.state.value} and the node runs with "
                "--on-secondary-failure block: writes are refused until the pair is back in sync"
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Write(offset, bytes(data), fut))
        await fut

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
        nbytes = len(first.data)
        while len(batch) < self.options.batch_max_writes and not self._queue.empty():
            w = self._queue.get_nowait()
            if nbytes + len(w.data) > self.options.batch_max_bytes:
                self._holdover = w
                break
            batch.append(w)
            nbytes += len(w.data)
        return batch

    async def _sequencer(self) -> None:
        while True:
            batch = await self._next_batch()
            nbytes = sum(len(w.data) for w in batch)
            while True:
                await self._gate.wait()
                link = self.link
                if link is None or link.failed:
                    link = None
                    break
                if await link.wait_room(len(batch), nbytes) and self._gate.is_set():
                    break
            # From here to the end of the loop body nothing awaits: the seq
            # assignment, the local submission and the send are one step, so
            # a failure cannot slip between them.
            writes = []
            for w in batch:
                writes.append((self.next_seq, w.offset, w.data))
                self.next_seq += 1
            local = asyncio.ensure_future(self.lv.run_io(self._write_local, [(o, d) for _, o, d in writes]))
            remote = link.send(writes) if link is not None else None
            self._spawn(self._complete(batch, writes, local, remote), "complete")

    def _write_local(self, writes: list[tuple[int, bytes]]) -> None:
        self.lv.store.write_batch(writes)

    async def _complete(
        self,
        batch: list[_Write],
        writes: list[tuple[int, int, bytes]],
        local: asyncio.Future[None],
        remote: list[asyncio.Future[bool]] | None,
    ) -> None:
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
            return
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
        block = self.options.on_secondary_failure == "block" and (lost or remote is None)
        for w in batch:
            if w.fut.done():
                continue
            if block:
                w.fut.set_exception(
                    Unavailable(
                        f"volume {self.lv.name!r}: the secondary failed ({self.last_error}); the write is "
                        "on the primary only and the node runs with --on-secondary-failure block"
                    )
                )
            else:
                w.fut.set_result(None)

    # ------------------------------------------------------------ degrade (method steps 1-2)
    def _begin_degrade(self, reason: str) -> None:
        """Called synchronously by the link on failure: close the gate first."""
        if self._degrading:
            return
        self._degrading = True
        self._gate.clear()
        self._settled.clear()
        self._spawn(self._degrade(reason, time.monotonic()), "degrade")

    async def _degrade(self, reason: str, t0: float) -> None:
        try:
            link, self.link = self.link, None
            nacks = list(link.window.nacks) if link is not None else []
            unacked = list(link.failed_writes) if link is not None else []
            if link is not None:
                await link.close()
            extents = derive_failed_extents(
                [(n.offset, n.length) for n in nacks],
                [(w.offset, w.length) for w in unacked],
                self.failed_extents,
            )
            new_state = transition(self.state, Event.SECONDARY_FAILED)
            # Drain + snapshot: the I/O thread is FIFO, so the snapshot lands
            # after every write already submitted and before any new one (the
            # gate is closed).
            snap_id = self.fault_snapshot_id
            if not snap_id:
                info = await self.lv.run_io(
                    self.lv.store.create_snapshot, f"fault-e{self.lv.epoch}-{int(time.time() * 1000)}"
                )
                snap_id = info.id
            await self.lv.run_io(
                self.lv.store.meta_set,
                {
                    META_STATE: new_state.value,
                    META_FAILED: json.dumps([[e.offset, e.length] for e in extents]),
                    META_FAULT_SNAP: str(snap_id),
                    META_LAST_ERROR: reason,
                },
            )
            self.state = new_state
            self.failed_extents = extents
            self.fault_snapshot_id = snap_id
            self.last_error = reason
        finally:
            self._degrading = False
            self._settled.set()
            self._gate.set()
        self.last_stall_s = time.monotonic() - t0
        log.warning(
            "volume %s degraded: %s; %d failed extents (%d bytes) from %d NACKs and %d unacked writes; "
            "fault-recovery snapshot %d; write stall %.1f ms",
            self.lv.name, reason, len(extents), sum(e.length for e in extents), len(nacks), len(unacked),
            snap_id, self.last_stall_s * 1000,
        )
        report = pb.ReplicationReport(
            volume=self.lv.name,
            reporter=self.address,
            epoch=self.lv.epoch,
            state=pb.PAIR_STATE_DEGRADED,
            nacks=[
                pb.Nack(seq=n.seq, offset=n.offset, length=n.length, code=n.code, message=n.message)
                for n in nacks
            ],
            unacked=[pb.ReplicatedWriteRef(seq=w.seq, offset=w.offset, length=w.length) for w in unacked],
            reason=reason,
            fault_snapshot_id=snap_id,
            failed_extents=[pb.Extent(offset=e.offset, length=e.length) for e in extents],
        )
        self._spawn(self.reporter(report), "report")

    # ------------------------------------------------------------ status
    def report(self) -> pb.VolumeReport:
        r = pb.VolumeReport(
            name=self.lv.name,
            role=pb.ROLE_PRIMARY,
            epoch=self.lv.epoch,
            state=self.state.to_proto(),
            last_seq=self.next_seq - 1,
            acked_seq=self.acked_seq,
            fault_snapshot_id=self.fault_snapshot_id,
            last_error=self.last_error,
            size_bytes=self.lv.store.size_bytes,
            block_size=self.lv.store.block_size,
        )
        r.failed_extents.extend(pb.Extent(offset=e.offset, length=e.length) for e in self.failed_extents[:64])
        r.resync.CopyFrom(self.resync_progress)
        return r


__all__ = ["PrimaryVolume", "SyncrepError"]
