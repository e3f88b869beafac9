"""ReplicaService: the secondary end of the synchronous replication stream.

Thin shell around ``syncrep.core.classify.StreamState``: read messages, plan,
apply the accepted writes in one group commit on the volume's I/O thread,
then answer — NACKs first, one per refused write, then one cumulative ack.

A reader task pulls messages off the stream while the previous group is
being applied, and the applier coalesces everything that queued up meanwhile
into the next group commit, so one fdatasync covers many writes under load.

Opening a replication stream is also the primary's proof that it switched
back after a resync: it queues the release of that resync's rollback point
(``secondary.resync``, "Releasing the rollback point").

Authorisation (issue 11): the server's interceptor lets only node
certificates (and admin) reach this service; each stream is then accepted
only from the node that is the volume's primary as this secondary knows it
(``lv.peer``, from the coordinator's assignment): the peer's certificate must
name that host (``authz.check_stream_peer``). Checked on the opening message,
before anything else (no epoch adopted, no stream fenced); the epoch is the
stream protocol's own check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, NamedTuple, cast

import grpc

from syncrep import authz, rpc
from syncrep.aio import wait_event
from syncrep.core.classify import (
    STORAGE_ERRORS,
    Refusal,
    StreamState,
    nack_code,
    nack_code_for_errno,
    storage_errno,
    storage_error_text,
)
from syncrep.core.identity import Identity, stream_refusal
from syncrep.errors import FailedPrecondition, NotFound, PermissionDenied, SyncrepError
from syncrep.pb import syncrep_pb2 as pb
from syncrep.pb import syncrep_pb2_grpc as pbg
from syncrep.volumes import LocalVolume, VolumeRegistry, role_name

log = logging.getLogger(__name__)

# Messages read ahead of the applier (each up to MAX_MESSAGE_BYTES).
READ_AHEAD_MESSAGES = 64
# One group commit carries at most this much.
GROUP_MAX_BYTES = 16 * 1024 * 1024
OPEN_TIMEOUT_S = 10.0

EOF_MARK = object()
#: Put in a replication stream's inbox by a planned stop (issue 13): end the
#: stream with ReplicateReply.stopping once the group being applied is acked.
STOP_MARK = object()


class Payload(NamedTuple):
    """A ``ReplicatedWrite`` with its payload read out of protobuf once.

    Every read of a upb ``bytes`` field returns a new copy (``w.data is
    w.data`` is False), and the secondary read each payload four times: the
    byte count, the length and crc32c checks, the store's write (issue 14,
    docs/PERF.md finding 5 and plan item 4). ``StreamState`` reads only these
    fields, so it takes these in place of the messages."""

    seq: int
    offset: int
    data: bytes
    crc32c: int
    #: Nonzero: a zero range of this many bytes, no data (issue 14: TRIM,
    #: WRITE_ZEROES), applied with ``BlockStore.zero_range``.
    zero_length: int = 0


def payloads(batch: pb.WriteBatch) -> list[Payload]:
    return [Payload(w.seq, w.offset, w.data, w.crc32c, w.zero_length) for w in batch.writes]


def read_ahead(context: grpc.aio.ServicerContext, maxsize: int) -> tuple[asyncio.Queue[Any], asyncio.Task[None]]:
    """Read a request stream into a bounded queue from a task of its own, so
    the applier can work on one group while the next messages arrive. The
    queue ends with ``EOF_MARK``; cancel the task when done."""
    inbox: asyncio.Queue[Any] = asyncio.Queue(maxsize=maxsize)

    async def reader() -> None:
        try:
            while True:
                msg = await context.read()
                if msg is grpc.aio.EOF:
                    break
                await inbox.put(msg)
        finally:
            await inbox.put(EOF_MARK)

    return inbox, asyncio.create_task(reader())


async def first_message(context: grpc.aio.ServicerContext, field: str, what: str, timeout_s: float) -> Any:
    """The stream's opening message, which must carry ``field``; aborts the
    call (and returns None) when it is missing or late."""
    try:
        first = await asyncio.wait_for(context.read(), timeout_s)
    except TimeoutError:
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no {what} within {timeout_s:.0f} s")
        return None
    if first is grpc.aio.EOF or not first.HasField(field):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the first message must be {what}")
        return None
    return first


class _Replay:
    """``context`` with its first request, already read, put back in front."""

    def __init__(self, context: grpc.aio.ServicerContext, first: Any) -> None:
        self._context = context
        self._first = first

    async def read(self) -> Any:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await self._context.read()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class ReplicaServicer(pbg.ReplicaServiceServicer):
    def __init__(self, registry: VolumeRegistry, resync: Any = None) -> None:
        self.registry = registry
        # secondary.resync.ResyncReceiver (method step 3), when present; it also
        # releases a completed resync's rollback point when Replicate opens.
        self.resync = resync
        # A planned stop (issue 13, ``begin_stop``): the open replication
        # streams' inboxes, and who stops and why once it began.
        self._inboxes: set[asyncio.Queue[Any]] = set()
        self._stop_reason = ""
        self._ended: asyncio.Event | None = None
        self.node_address = ""

    def begin_stop(self, reason: str) -> int:
        """A planned stop of this node (SIGTERM): every replication stream
        finishes the group of writes it is applying (written, acked), then
        tells its primary ``stopping`` at the stream's epoch and ends OK. What
        was received and not applied is never acked: the primary counts it
        unacked, goes degraded and resyncs it (writes stay safe). New streams
        are refused from now on. Returns the number of streams told."""
        self._stop_reason = reason or "planned stop"
        self._ended = asyncio.Event()
        if not self._inboxes:
            self._ended.set()
        for inbox in list(self._inboxes):
            with contextlib.suppress(asyncio.QueueFull):
                inbox.put_nowait(STOP_MARK)  # full: the applier is busy and sees _stop_reason next
        return len(self._inboxes)

    @property
    def streams_open(self) -> int:
        return len(self._inboxes)

    async def wait_streams_ended(self, timeout_s: float) -> bool:
        """After ``begin_stop``: wait (at most ``timeout_s``) until every
        replication stream ended. True when they did."""
        if self._ended is None:
            return not self._inboxes
        return await wait_event(self._ended, timeout_s)  # a cancel ends the wait (syncrep/aio.py)

    def accept_stream(
        self, open_: pb.StreamOpen, fence: bool = True, *, check_identity: bool = True
    ) -> tuple[LocalVolume, int]:
        """Validate a stream opening and (unless ``fence`` is False) fence every
        older stream of the volume. Returns (volume, token). ``check_identity``
        False: the caller checked the data identity itself (a resync)."""
        name = open_.volume.name
        missing = self.registry.missing.get(name)
        if missing is not None:
            raise FailedPrecondition(
                f"volume {name!r} has no data on this node ({missing.problem}); it is not served here "
                "until the coordinator rebuilds it"
            )
        try:
            lv = self.registry.get(name)
        except NotFound:
            raise NotFound(
                f"volume {name!r} is not assigned to this node; create it through the coordinator first"
            ) from None
        if lv.role != pb.ROLE_SECONDARY:
            raise FailedPrecondition(
                f"this node is {role_name(lv.role)} for volume {name!r}, not its secondary"
            )
        if open_.epoch < lv.epoch:
            raise FailedPrecondition(
                f"stale epoch: stream for volume {name!r} carries epoch {open_.epoch}, "
                f"but this node has seen epoch {lv.epoch}"
            )
        # A primary smaller than this replica is one mid-resize (issue 13: the
        # secondary grows first, then the primary): it writes within its own
        # size, which is within this one's. A larger primary is refused.
        if open_.volume.block_size != lv.store.block_size or open_.volume.size_bytes > lv.store.size_bytes:
            raise FailedPrecondition(
                f"volume {name!r} geometry mismatch: stream says {open_.volume.size_bytes} bytes / "
                f"{open_.volume.block_size}-byte blocks, this node has {lv.store.size_bytes} / "
                f"{lv.store.block_size}"
            )
        if check_identity:
            # Synchronous replication only between replicas of the same current
            # generation (docs/FAILOVER.md section 1). After the epoch checks (a
            # stale primary hears "stale epoch"), before this stream adopts an
            # epoch or fences anything: the primary goes degraded and a resync
            # brings this replica up to date.
            why = stream_refusal(lv.identity, Identity.from_proto(open_.identity), name)
            if why is not None:
                raise FailedPrecondition(why)
        if open_.epoch > lv.epoch:
            old_epoch, lv.epoch = lv.epoch, open_.epoch
            try:
                lv.persist_role()
            except BaseException:
                lv.epoch = old_epoch  # not persisted: do not claim it (the assignment retries it)
                raise
        if fence:
            lv.stream_token += 1
        return lv, lv.stream_token

    async def check_peer(self, context: grpc.aio.ServicerContext, volume: str, kind: str) -> bool:
        """Refuse (PERMISSION_DENIED, one WARNING line; returns False) a stream
        for ``volume`` from anyone but its primary. A volume this node does not
        hold passes: accept_stream refuses it, saying why."""
        lv = self.registry.volumes.get(volume)
        if lv is None:
            return True
        try:
            authz.check_stream_peer(rpc.peer_of(context), volume, lv.peer, kind)
        except PermissionDenied as e:
            await authz.deny(context, e)
            return False
        return True

    async def Replicate(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        first = await first_message(context, "open", "StreamOpen", OPEN_TIMEOUT_S)
        if first is None:
            return
        if self._stop_reason:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"secondary {self.node_address or 'this node'} is stopping ({self._stop_reason})")
            return
        if not await self.check_peer(context, first.open.volume.name, "replication"):
            return
        try:
            lv, token = self.accept_stream(first.open)
        except SyncrepError as e:
            log.warning("refused replication stream: %s", e.message)
            await context.abort(e.code, e.message)
            return
        if self.resync is not None:
            # The primary opens this stream at the resync's epoch only after its
            # final round completed, i.e. switching back: the rollback point of
            # that resync can go. Queued on the I/O thread, not awaited — the
            # "accepted" reply (inside the primary's switch-back write stall)
            # does not wait for a snapshot deletion — and queued before that
            # reply, so cancelling this call cannot skip it. Idempotent, and a
            # no-op unless a completed resync awaits release.
            self.resync.schedule_release(
                lv, f"the primary opened the replication stream at epoch {first.open.epoch}", first.open.epoch
            )
        st = StreamState(
            volume=lv.name,
            epoch=first.open.epoch,
            next_seq=first.open.first_seq,
            size_bytes=lv.store.size_bytes,
            block_size=lv.store.block_size,
        )
        log.info(
            "replication stream for %s accepted from %s: epoch %d, first seq %d",
            lv.name, first.open.primary_address or context.peer(), st.epoch, st.next_seq,
        )
        await context.write(pb.ReplicateReply(accepted=pb.StreamAccepted(epoch=st.epoch)))

        inbox, rt = read_ahead(context, READ_AHEAD_MESSAGES)
        self._inboxes.add(inbox)
        try:
            await self._apply_loop(lv, token, st, inbox, context)
        finally:
            self._inboxes.discard(inbox)
            if self._ended is not None and not self._inboxes:
                self._ended.set()
            rt.cancel()
            log.info("replication stream for %s (epoch %d) ended at seq %d", lv.name, st.epoch, st.next_seq - 1)

    async def _apply_loop(
        self,
        lv: LocalVolume,
        token: int,
        st: StreamState,
        inbox: asyncio.Queue[Any],
        context: grpc.aio.ServicerContext,
    ) -> None:
        pending: Any = None
        while True:
            msg = pending if pending is not None else await inbox.get()
            pending = None
            if msg is EOF_MARK:
                return
            if msg is STOP_MARK or self._stop_reason:
                # Planned stop: everything acked so far is durable here.
                log.info("volume %s: replication stream (epoch %d) ends at seq %d: this node is stopping (%s)",
                         lv.name, st.epoch, st.next_seq - 1, self._stop_reason)
                await context.write(pb.ReplicateReply(stopping=pb.ReplicaStopping(
                    epoch=st.epoch, node=self.node_address, reason=self._stop_reason)))
                return
            if lv.stream_token != token:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"stream superseded: a newer stream for volume {lv.name!r} (epoch {lv.epoch}) was accepted",
                )
                return
            if msg.HasField("marker"):
                await self._marker(lv, st, msg.marker, context)
                continue
            if not msg.HasField("batch"):
                continue
            # Coalesce every batch already queued into one group commit.
            ws = payloads(msg.batch)
            batches = [(msg.batch.epoch, ws)]
            nbytes = sum(len(w.data) for w in ws)
            while nbytes < GROUP_MAX_BYTES and not inbox.empty():
                nxt = inbox.get_nowait()
                if nxt is EOF_MARK or nxt is STOP_MARK or not nxt.HasField("batch"):
                    pending = nxt
                    break
                ws = payloads(nxt.batch)
                batches.append((nxt.batch.epoch, ws))
                nbytes += sum(len(w.data) for w in ws)
            apply: list[Payload] = []
            refuse: list[Refusal] = []
            last_seq = 0
            # The store may have grown since the stream opened (issue 13: an
            # online resize grows this secondary before its primary).
            st.size_bytes = lv.store.size_bytes
            for epoch, ws in batches:
                # StreamState is typed with the message; it reads the same
                # fields of a Payload (see Payload).
                plan = st.plan(epoch, cast("list[pb.ReplicatedWrite]", ws))
                apply.extend(cast("list[Payload]", plan.apply))
                refuse.extend(plan.refuse)
                if ws:
                    last_seq = max(last_seq, ws[-1].seq)
            if apply:
                try:
                    await lv.run_io(self._write_group, lv, apply)
                except STORAGE_ERRORS as e:
                    code = nack_code_for_errno(storage_errno(e))
                    msg_text = f"secondary storage failed: {storage_error_text(e)}"
                    log.error("volume %s: group commit of %d writes failed: %s", lv.name, len(apply), e)
                    refuse.extend(st.fail_applied(cast("list[pb.ReplicatedWrite]", apply), code, msg_text))
            for r in sorted(refuse, key=lambda r: r.seq):
                await context.write(
                    pb.ReplicateReply(
                        nack=pb.Nack(seq=r.seq, offset=r.offset, length=r.length, code=nack_code(r.code),
                                     message=r.message, epoch=st.epoch)
                    )
                )
            if refuse:
                log.warning(
                    "volume %s: NACKed %d writes (first: seq %d %s: %s)",
                    lv.name, len(refuse), refuse[0].seq, pb.NackCode.Name(nack_code(refuse[0].code)), refuse[0].message,
                )
            if last_seq:
                await context.write(pb.ReplicateReply(ack=pb.Ack(acked_through_seq=last_seq)))

    @staticmethod
    def _write_group(lv: LocalVolume, writes: list[Payload]) -> None:
        """Apply in seq order: each run of data writes is one group commit
        (``write_batch``), each zero range one ``zero_range`` (a hole punched,
        O(1) in its length)."""
        lv.faults.check()
        run: list[tuple[int, bytes]] = []
        for w in writes:
            if w.zero_length:
                if run:
                    lv.store.write_batch(run)
                    run = []
                lv.store.zero_range(w.offset, w.zero_length)
            else:
                run.append((w.offset, w.data))
        if run:
            lv.store.write_batch(run)

    async def _marker(
        self, lv: LocalVolume, st: StreamState, m: pb.SnapshotMarker, context: grpc.aio.ServicerContext
    ) -> None:
        """A common consistency point: every earlier write is applied (the
        applier is sequential), no later one is; take the snapshot now."""
        if st.failed or m.epoch != st.epoch:
            return
        info = await lv.run_io(self._common_snapshot, lv, m.name, m.keep)
        log.info("volume %s: common snapshot %r (id %d) at seq %d", lv.name, m.name, info.id, m.seq)
        await context.write(
            pb.ReplicateReply(marker_done=pb.MarkerDone(seq=m.seq, snapshot_id=info.id, name=m.name))
        )

    @staticmethod
    def _common_snapshot(lv: LocalVolume, name: str, keep: int) -> Any:
        info = lv.store.create_snapshot(name)
        if keep:
            commons = [s for s in lv.store.list_snapshots() if s.name.startswith("common-")]
            for s in commons[: max(0, len(commons) - keep)]:
                lv.store.delete_snapshot(s.id)
        return info

    async def Resync(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        if self.resync is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "resync is not available on this node")
            return
        # The header is read here for the peer check, then handed back to
        # the receiver as the stream's first message.
        first = await first_message(context, "header", "ResyncHeader", OPEN_TIMEOUT_S)
        if first is None:
            return
        if not await self.check_peer(context, first.header.volume.name, "resync"):
            return
        await self.resync.serve(self, _Replay(context, first))
