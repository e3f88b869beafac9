"""The primary's side of resync (method step 3): plan, rounds, and the switch back.

Pure planning lives in ``syncrep.core.resync_plan`` (``ResyncPlan``, a
JSON-persisted record of where the resync is, and ``next_step``, the choice of
what comes next), and so does the send window of one round
(``syncrep.core.resync_window.ResyncSendWindow``: what to send next, what is
applied, refusals, the digest); ``RoundSender`` here carries one round over one
``Resync`` stream (reads, writes, replies, deadlines); ``PrimaryVolume._resync``
executes the steps:

Variant A (rewrite):  rewrite the failed extents in place (read + write on the
                      I/O thread, atomic w.r.t. client writes) -> snapshot D1
                      -> round 1 = diff(F, D1)
Variant B (direct):   snapshot D0 -> round 0 = the failed extents as of D0
                      -> wait diff_delay_s -> snapshot D2 -> round 1 = diff(F, D2)
Then:                 rounds k = diff(D_{k-1}, D_k) while the difference shrinks
                      and is above final_diff_threshold_bytes (at most
                      max_diff_rounds), then quiesce -> D_final -> the final
                      round diff(D_last, D_final) -> open the replication stream
                      at the new epoch -> release: in sync.

Each round's chunk list is derived only from immutable snapshots, so it is
the same after any restart: the secondary tells where to resume and nothing
it already applied travels twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import google_crc32c
import grpc

from primary.link import identity_msg
from syncrep import rpc
from syncrep.blockstore import BlockStore, Extent, iter_block_runs, zeros, zeros_crc32c
from syncrep.core.identity import Identity
from syncrep.core.resync_plan import Pieces, ResyncPlan, RoundSpec, plan_pieces, plan_pieces_from_runs
from syncrep.core.resync_window import ResyncSendWindow, ResyncWindowError, SendLimits
from syncrep.core.vocab import RoundKind
from syncrep.pb import syncrep_pb2 as pb
from syncrep.pb import syncrep_pb2_grpc as pbg

log = logging.getLogger(__name__)

# The limits of the send window (syncrep.core.resync_window.ResyncSendWindow).
# Chunks sent but not yet applied: bounded by count and bytes (memory on both
# sides). Small chunks need a deep window: each window's worth becomes one
# group commit (fdatasync) on the secondary.
WINDOW_CHUNKS = 1024
WINDOW_BYTES = 8 * 1024 * 1024
# Chunks read from the store per thread hop.
READ_BATCH_CHUNKS = 64
REPLY_TIMEOUT_S = 30.0
# A chunk refused more often than this in one round aborts the round.
MAX_REFUSALS_PER_CHUNK = 5


class ResyncError(Exception):
    pass


def round_pieces(store: BlockStore, spec: RoundSpec, chunk_bytes: int) -> Pieces:
    """The round's chunks. A diff round's come straight from the diff bitmap's
    runs (no Extent per run in between), into 16 bytes per chunk (Pieces)."""
    if spec.kind == RoundKind.DIFF:
        runs = iter_block_runs(store.diff_bitmap(spec.base, spec.target))
        return plan_pieces_from_runs(runs, store.block_size, chunk_bytes)
    return plan_pieces([Extent(o, n) for o, n in spec.extents], store.block_size, chunk_bytes)


class TokenBucket:
    """A node-wide cap in bytes per second (0 = unlimited) shared by every
    resync of the node (``--node-resync-max-rate``). A take may overdraw
    (a chunk is larger than the burst); the takers then sleep off the debt,
    so the long-run rate holds whatever the number of volumes. The burst is
    a quarter of a second of the rate: idle time does not bank credit."""

    def __init__(self, max_rate_bytes_per_s: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = max_rate_bytes_per_s
        self.burst = self.rate / 4
        self._clock = clock
        self._tokens = self.burst
        self._t = clock()

    def debit(self, n: int) -> float:
        """Take ``n`` bytes; the seconds the caller must wait before sending them."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._t) * self.rate) - n
        self._t = now
        return -self._tokens / self.rate if self._tokens < 0 else 0.0

    async def take(self, n: int) -> None:
        wait = self.debit(n)
        if wait > 0:
            await asyncio.sleep(wait)


class RateLimiter:
    """Caps bytes per second (0 = unlimited) over the life of one resync;
    then the node-wide ``budget`` (if any) as well."""

    def __init__(self, max_rate_bytes_per_s: int, budget: TokenBucket | None = None) -> None:
        self.rate = max_rate_bytes_per_s
        self.budget = budget
        self.t0 = time.monotonic()
        self.sent = 0

    async def take(self, n: int) -> None:
        self.sent += n
        if self.rate > 0:
            ahead = self.sent / self.rate - (time.monotonic() - self.t0)
            if ahead > 0:
                await asyncio.sleep(ahead)
        if self.budget is not None:
            await self.budget.take(n)


class ResyncBudget:
    """What the resyncs of one node share (issue 14, after the EBS
    re-mirroring storm of April 2011: a node back with 200 degraded volumes
    must not start 200 resyncs at once): at most ``max_concurrent`` run
    (``--max-concurrent-resyncs``; the others wait in FIFO order, still
    tracking their writes), all under one ``rate`` (``--node-resync-max-rate``)."""

    def __init__(self, max_concurrent: int, max_rate_bytes_per_s: int = 0) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        self.max_concurrent = max_concurrent
        self.rate = TokenBucket(max_rate_bytes_per_s)
        self._slots = asyncio.Semaphore(max_concurrent)
        self.running: set[str] = set()
        self.queued: list[str] = []

    @contextlib.asynccontextmanager
    async def slot(self, volume: str) -> AsyncIterator[None]:
        """Hold one of the node's resync slots while the body runs (the wait
        for it is logged when there was one)."""
        t0 = time.monotonic()
        if self._slots.locked():
            log.warning("volume %s: resync queued: %d resyncs run on this node (%s), at most %d "
                        "(--max-concurrent-resyncs); %d queued before it", volume, len(self.running),
                        ", ".join(sorted(self.running)), self.max_concurrent, len(self.queued))
        self.queued.append(volume)
        try:
            await self._slots.acquire()
        finally:
            self.queued.remove(volume)
        waited = time.monotonic() - t0
        self.running.add(volume)
        try:
            if waited > 0.001:
                log.warning("volume %s: resync starts after %.1f s in the node's queue", volume, waited)
            yield
        finally:
            self.running.discard(volume)
            self._slots.release()


@dataclass
class Counters:
    #: The bytes the resync covered (zero chunks at their length).
    bytes_sent: int = 0
    #: Of those, the zeros sent as a length without a payload (issue 14).
    zero_bytes_sent: int = 0
    chunks_refused: int = 0
    # Test hook: corrupt the next N chunks sent (checksum computed over the
    # original data, then a byte flipped), so the secondary must refuse them.
    corrupt_next: int = 0


def _zero_chunk(index: int, offset: int, n: int) -> pb.ResyncChunk:
    """Chunk ``index``: ``n`` zero bytes at ``offset``, sent as a length (issue 14)."""
    return pb.ResyncChunk(index=index, offset=offset, zero_length=n, crc32c=zeros_crc32c(n))


class RoundSender:
    """Send one round over one Resync stream, resuming where the secondary says."""

    def __init__(
        self,
        store: BlockStore,
        secondary: str,
        spec_pb: pb.VolumeSpec,
        epoch: int,
        plan: ResyncPlan,
        spec: RoundSpec,
        pieces: Sequence[tuple[int, int]],
        final: bool,
        limiter: RateLimiter,
        counters: Counters,
        on_progress: Callable[[int], None],
        *,
        identity: Identity | None = None,
        full_copy: bool = False,
    ) -> None:
        self.store = store
        # In every round's header: the secondary checks the primary is a
        # source for it (syncrep/core/identity.py, resync_refusal) and adopts
        # this identity when the final round completes. ``full_copy``: the
        # resync sends the whole volume, so an empty secondary may take it.
        # None (tests that drive a bare sender): no identity, which a
        # secondary that checks identities refuses, saying so.
        self.identity = identity if identity is not None else Identity()
        self.full_copy = full_copy
        self.secondary = secondary
        self.spec_pb = spec_pb
        self.epoch = epoch
        self.plan = plan
        self.spec = spec
        self.pieces = pieces
        self.final = final
        self.limiter = limiter
        self.counters = counters
        self.on_progress = on_progress

    def _read(self, i: int) -> pb.ResyncChunk:
        off, n = self.pieces[i]
        snap = self.spec.target or None
        if self.counters.corrupt_next <= 0 and self.store.reads_as_zeros(snap, off, n):
            # A hole (issue 14): known without reading it (reading a hole
            # still costs the kernel a zeroed page per block).
            return _zero_chunk(i, off, n)
        data = self.store.read_at(snap, off, n)
        if self.counters.corrupt_next > 0:
            crc = google_crc32c.value(data)
            self.counters.corrupt_next -= 1
            data = bytes([data[0] ^ 0xFF]) + data[1:]
            log.warning("resync chunk %d at offset %d deliberately corrupted (fault injection)", i, off)
            return pb.ResyncChunk(index=i, offset=off, data=data, crc32c=crc)
        if data == zeros(n):
            # A hole or a zeroed range (issue 14): one memcmp tells, and it
            # travels without its payload; the secondary punches it. A full
            # copy of a mostly empty volume then ships metadata, not zeros.
            return _zero_chunk(i, off, n)
        return pb.ResyncChunk(index=i, offset=off, data=data, crc32c=google_crc32c.value(data))

    def _read_many(self, first: int, end: int) -> list[pb.ResyncChunk]:
        return [self._read(i) for i in range(first, end)]

    async def run(self) -> None:
        total = sum(n for _, n in self.pieces)
        async with rpc.channel(self.secondary) as ch:
            call = pbg.ReplicaServiceStub(ch).Resync()
            header = pb.ResyncHeader(
                volume=self.spec_pb,
                epoch=self.epoch,
                resync_id=self.plan.resync_id,
                round=self.spec.round,
                base_snapshot_id=self.spec.base,
                target_snapshot_id=self.spec.target,
                total_bytes=total,
                kind=self.spec.kind,
                final=self.final,
                rollback_to_snapshot=self.plan.rollback_to,
                identity=identity_msg(self.identity),
                full_copy=self.full_copy,
            )
            try:
                await asyncio.wait_for(call.write(pb.ResyncRequest(header=header)), REPLY_TIMEOUT_S)
                first = await asyncio.wait_for(call.read(), REPLY_TIMEOUT_S)
                if first is grpc.aio.EOF:
                    raise ResyncError(f"secondary {self.secondary} closed the resync stream")
                window = self._window(first.applied_below)
                start = window.applied
                if start:
                    log.info("volume %s: resync round %d resumes at chunk %d of %d (%d bytes already applied)",
                             self.spec_pb.name, self.spec.round, start, len(self.pieces),
                             window.progress_bytes)
                self.on_progress(window.progress_bytes)
                await self._stream(call, window)
            except grpc.RpcError as e:
                raise ResyncError(
                    f"resync stream to {self.secondary} failed: {e.code().name}: {e.details()}"
                ) from e
            except asyncio.InvalidStateError:
                # A write after the secondary ended the call (aborted it): say why it did.
                raise ResyncError(
                    f"resync stream to {self.secondary} failed: {(await call.code()).name}: {await call.details()}"
                ) from None
            except TimeoutError:
                raise ResyncError(f"secondary {self.secondary} stopped answering (or reading) the resync "
                                  f"stream for {REPLY_TIMEOUT_S} s") from None
            finally:
                # Right after "complete" too: the secondary has persisted the
                # completion before answering and releases its rollback point
                # when the replication stream opens at this epoch
                # (secondary/resync.py), so nothing is owed on this call and
                # the switch-back stall does not wait for that release.
                call.cancel()

    def _window(self, start: int) -> ResyncSendWindow:
        """The round's send window, resuming at chunk ``start``. The limits are
        read now (module constants, so tests may patch them)."""
        limits = SendLimits(WINDOW_CHUNKS, WINDOW_BYTES, READ_BATCH_CHUNKS, MAX_REFUSALS_PER_CHUNK)
        try:
            return ResyncSendWindow(self.pieces, start, limits)
        except ResyncWindowError as e:
            raise ResyncError(str(e)) from None

    async def _stream(self, call: Any, window: ResyncSendWindow) -> None:
        """Carry the window out: read and send what ``next_batch`` allows, take
        in the replies, then the trailer with the window's digest."""
        replies: asyncio.Queue[Any] = asyncio.Queue()

        async def reader() -> None:
            try:
                while True:
                    r = await call.read()
                    await replies.put(r)
                    if r is grpc.aio.EOF:
                        return
            except Exception as e:
                await replies.put(e)

        rt = asyncio.create_task(reader())

        def handle(r: Any) -> None:
            if isinstance(r, Exception):
                raise r
            if r is grpc.aio.EOF:
                raise ResyncError(f"secondary {self.secondary} closed the resync stream mid-round")
            try:
                # The applied part first: progress is reported even when the
                # refusal in the same reply aborts the round.
                if window.on_applied(r.applied_below):
                    self.on_progress(window.progress_bytes)
                if r.refused:
                    self.counters.chunks_refused += 1
                    refusal = window.on_refused(r.refused_index, r.message)
                    log.warning("volume %s: secondary refused resync chunk %d (%s); re-sending from it",
                                self.spec_pb.name, refusal.index, r.message)
            except ResyncWindowError as e:
                raise ResyncError(str(e)) from None

        try:
            while not window.done:
                batch = window.next_batch()
                if batch:
                    # Room in the window: send one read batch, then take in
                    # whatever replies arrived meanwhile (progress, refusals).
                    chunks = await asyncio.to_thread(self._read_many, batch.start, batch.stop)
                    for c in chunks:
                        # upb copies the payload on every read of c.data: once.
                        wire = len(c.data)
                        n = c.zero_length or wire
                        # The window keeps (length, crc32c) for the round
                        # digest (RoundDigest): the crc32c over the data as
                        # read, the one the secondary checks before applying.
                        window.sent(c.index, n, c.crc32c, payload_bytes=wire)
                        # The cap is on bandwidth: zeros sent as a length use none.
                        await self.limiter.take(wire)
                        # Bounded like the replies: a write blocked on flow
                        # control (a stalled connection) must fail the round,
                        # not hang it until TCP gives up.
                        await asyncio.wait_for(call.write(pb.ResyncRequest(chunk=c)), REPLY_TIMEOUT_S)
                        self.counters.bytes_sent += n
                        self.counters.zero_bytes_sent += c.zero_length
                    while not replies.empty():
                        handle(replies.get_nowait())
                    continue
                handle(await asyncio.wait_for(replies.get(), REPLY_TIMEOUT_S))
            trailer = pb.ResyncTrailer(chunk_count=window.chunk_count, digest=window.digest())
            await asyncio.wait_for(call.write(pb.ResyncRequest(trailer=trailer)), REPLY_TIMEOUT_S)
            while True:
                r = await asyncio.wait_for(replies.get(), REPLY_TIMEOUT_S)
                if isinstance(r, Exception):
                    raise r
                if r is grpc.aio.EOF:
                    raise ResyncError("secondary closed the stream before confirming the round")
                if r.complete:
                    return
        finally:
            rt.cancel()
