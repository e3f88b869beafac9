"""The primary's end of one replication stream to the secondary.

Owns a grpc.aio bidirectional ``Replicate`` call. Writes go out in batches
(``send``); acks and NACKs come back and settle per-write futures through the
pure ``ReplicationWindow``. Any of these declares the secondary failed, once:

* the stream breaks (connection reset, secondary crashed, server aborted);
* a NACK arrives (precise failure information for one write);
* the oldest unacked write waited longer than ``ack_timeout_s`` (hang, cut link).

On failure the link calls ``on_failure(reason)`` synchronously — the owner
closes its quiesce gate before anything else can run — and then settles every
unacked write's future with ``False`` (not acked; tracked for resync by the
owner).

Write frames go out as bytes encoded here (``encode_batch``), the exact
serialisation of the proto's ``ReplicateRequest``, so each payload is copied
once instead of three times through protobuf objects. A write may carry a
zero range (``Zeros``, issue 14: TRIM and WRITE_ZEROES) instead of bytes: one
op of a few bytes whatever its length, in seq order with the other writes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import google_crc32c
import grpc

from syncrep import rpc
from syncrep.config import NodeOptions
from syncrep.core.identity import Identity
from syncrep.core.window import InFlight, NackInfo, ReplicationWindow
from syncrep.metrics import ReplicationStats
from syncrep.pb import syncrep_pb2 as pb

log = logging.getLogger(__name__)


class LinkError(Exception):
    pass


def identity_msg(identity: Identity) -> pb.Identity:
    """The wire form of a data identity (StreamOpen, ResyncHeader, reports).
    Field by field rather than ``pb.Identity(**identity.proto_fields())``:
    that helper is typed ``dict[str, object]``, which mypy cannot check."""
    return pb.Identity(volume_uuid=identity.volume_uuid, current=identity.current,
                       history=list(identity.history))


# The Replicate stream's method path, as the generated stub names it.
REPLICATE_METHOD = "/{}/Replicate".format(pb.DESCRIPTOR.services_by_name["ReplicaService"].full_name)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _uint_field(tag: bytes, n: int) -> bytes:
    # proto3: a scalar at its default value is not on the wire
    return tag + _varint(n) if n else b""


@dataclass(frozen=True, slots=True)
class Zeros:
    """A zero range in place of a payload (issue 14, TRIM and WRITE_ZEROES):
    the ``length`` bytes at the write's offset read as zeros afterwards. Goes
    on the wire as ``ReplicatedWrite.zero_length``, with no data. Deliberately
    not ``Sized``: a byte budget must not count a 2 GiB TRIM as 2 GiB of
    payload by accident; say which length you mean (``span``, ``wire_bytes``)."""

    length: int


#: What a replicated write carries: bytes, or a zero range.
Payload: TypeAlias = bytes | Zeros


def span(data: Payload) -> int:
    """How many bytes of the volume the write covers."""
    return data.length if isinstance(data, Zeros) else len(data)


def wire_bytes(data: Payload) -> int:
    """How many payload bytes the write carries (0 for a zero range)."""
    return 0 if isinstance(data, Zeros) else len(data)


def encode_batch(epoch: int, writes: list[tuple[int, int, Payload]]) -> bytes:
    """``ReplicateRequest(batch=WriteBatch(epoch, writes=[ReplicatedWrite(seq,
    offset, data, crc32c(data))...]))`` serialised, the very bytes protobuf's
    ``SerializeToString`` gives (the proto stays the contract), but with each
    payload copied once, by the final join (issue 14, docs/PERF.md plan item 1
    and "Step 2 results": building the message and serialising it cost about
    1.5 CPU-ms per MiB of payload on the loaded dev box, this about 0.07; the
    fresh buffers of upb's copies dominate). A ``Zeros`` payload is
    ``ReplicatedWrite(seq, offset, zero_length=length)``: no data, crc32c 0
    (omitted). Field numbers: ReplicateRequest.batch = 2; WriteBatch.epoch = 1,
    .writes = 2; ReplicatedWrite.seq = 1, .offset = 2, .data = 3, .crc32c = 4
    (uint32, a varint), .zero_length = 5 (a varint)."""
    parts: list[bytes] = []
    body = 0
    for seq, offset, payload in writes:
        head = _uint_field(b"\x08", seq) + _uint_field(b"\x10", offset)
        if isinstance(payload, Zeros):
            data = b""
            tail = _uint_field(b"\x28", payload.length)
        else:
            data = payload
            if data:
                head += b"\x1a" + _varint(len(data))
            tail = _uint_field(b"\x20", google_crc32c.value(data))
        start = b"\x12" + _varint(len(head) + len(data) + len(tail)) + head
        parts += (start, data, tail)
        body += len(start) + len(data) + len(tail)
    epoch_field = _uint_field(b"\x08", epoch)
    return b"".join((b"\x12", _varint(body + len(epoch_field)), epoch_field, *parts))


class ReplicationLink:
    def __init__(
        self,
        spec: pb.VolumeSpec,
        epoch: int,
        first_seq: int,
        secondary: str,
        primary_address: str,
        options: NodeOptions,
        on_failure: Callable[[str], None],
        on_marker_done: Callable[[pb.MarkerDone], None] | None = None,
        *,
        identity: Identity,
        stats: ReplicationStats | None = None,
    ) -> None:
        self.spec = spec
        # The volume's metrics counters (syncrep.metrics): they outlive this
        # link, so the owner passes its own; one addition per ack message.
        self.stats = stats if stats is not None else ReplicationStats()
        # The primary's data identity, sent in StreamOpen: the secondary
        # accepts the stream only at the same current generation.
        self.identity = identity
        self.epoch = epoch
        self.first_seq = first_seq
        self.secondary = secondary
        self.primary_address = primary_address
        self.options = options
        self.window = ReplicationWindow(options.window_writes, options.window_bytes, options.ack_timeout_s)
        self.window.last_sent_seq = first_seq - 1
        self.window.acked_through_seq = first_seq - 1
        self._on_failure = on_failure
        self._on_marker_done = on_marker_done
        self._futures: dict[int, asyncio.Future[bool]] = {}
        self._room = asyncio.Event()
        self._room.set()
        self.failed = False
        self.failure_reason = ""
        #: The failure was the secondary's planned stop (ReplicateReply.stopping).
        self.planned = False
        self.failed_writes: list[InFlight] = []
        self._channel: Any = None
        self._call: Any = None
        # Serialised ReplicateRequests (the stream sends bytes as they are).
        self._outbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------ lifecycle
    async def open(self) -> None:
        """Open the stream and wait for StreamAccepted (bounded by connect_timeout_s)."""
        self._channel = rpc.channel(self.secondary)
        # Replicate without grpc's request serialiser: send() encodes each
        # frame itself (encode_batch), the other messages are serialised here.
        self._call = self._channel.stream_stream(
            REPLICATE_METHOD, request_serializer=None, response_deserializer=pb.ReplicateReply.FromString
        )()
        try:
            await asyncio.wait_for(
                self._call.write(
                    pb.ReplicateRequest(
                        open=pb.StreamOpen(
                            volume=self.spec,
                            epoch=self.epoch,
                            first_seq=self.first_seq,
                            primary_address=self.primary_address,
                            identity=identity_msg(self.identity),
                        )
                    ).SerializeToString()
                ),
                self.options.connect_timeout_s,
            )
            reply = await asyncio.wait_for(self._call.read(), self.options.connect_timeout_s)
        except TimeoutError:
            await self._teardown()
            raise LinkError(
                f"secondary {self.secondary} did not accept the replication stream "
                f"within {self.options.connect_timeout_s} s"
            ) from None
        except grpc.RpcError as e:
            await self._teardown()
            raise LinkError(f"secondary {self.secondary} refused the replication stream: "
                            f"{e.code().name}: {e.details()}") from e
        if reply is grpc.aio.EOF or not reply.HasField("accepted"):
            await self._teardown()
            raise LinkError(f"secondary {self.secondary} closed the stream instead of accepting it")
        self._tasks = [
            asyncio.create_task(self._writer(), name=f"repl-writer-{self.spec.name}"),
            asyncio.create_task(self._reader(), name=f"repl-reader-{self.spec.name}"),
            asyncio.create_task(self._watchdog(), name=f"repl-watchdog-{self.spec.name}"),
        ]

    async def close(self) -> None:
        """Stop the stream. Unacked writes, if any, are failed first."""
        self._fail("replication stopped", notify=False)
        await self._teardown()

    async def _teardown(self) -> None:
        me = asyncio.current_task()
        for t in self._tasks:
            if t is not me:
                t.cancel()
        if self._call is not None:
            self._call.cancel()
        if self._channel is not None:
            await self._channel.close(grace=None)
            self._channel = None

    async def wait_drained(self) -> None:
        """Wait until every write sent so far is acked (or the link failed).
        Bounded: the watchdog fails the link after ack_timeout_s."""
        while not self.failed and self.window.inflight_count:
            self._room.clear()
            await self._room.wait()

    # ------------------------------------------------------------ sending
    async def wait_room(self, n_writes: int, n_bytes: int) -> bool:
        """Wait until the window admits the batch. False if the link failed meanwhile."""
        while not self.failed and not self.window.has_room(n_writes, n_bytes):
            self._room.clear()
            await self._room.wait()
        return not self.failed

    def send(self, writes: list[tuple[int, int, Payload]]) -> list[asyncio.Future[bool]]:
        """Queue one batch of (seq, offset, data or Zeros). Returns a future per write:
        True once acked, False when the write failed (NACK or link failure).
        Must only be called while the link has not failed (checked)."""
        if self.failed:
            raise LinkError("send on a failed link")
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        futs = []
        for seq, offset, data in writes:
            # The covered span, a zero range's too: a failure must track all of
            # it. So a large zero range fills the window's bytes until acked (a
            # round trip, the writes after it wait): cheap next to its payload
            # had it been zeros, and the order stays exact.
            self.window.send(seq, offset, span(data), now)
            f: asyncio.Future[bool] = loop.create_future()
            self._futures[seq] = f
            futs.append(f)
        self._outbox.put_nowait(encode_batch(self.epoch, writes))
        return futs

    def send_marker(self, seq: int, name: str, keep: int) -> None:
        """A common-snapshot marker, in order with the writes: it follows
        every write with a smaller seq."""
        if self.failed:
            raise LinkError("send on a failed link")
        self._outbox.put_nowait(
            pb.ReplicateRequest(
                marker=pb.SnapshotMarker(seq=seq, name=name, epoch=self.epoch, keep=keep)
            ).SerializeToString()
        )

    # ------------------------------------------------------------ tasks
    async def _writer(self) -> None:
        try:
            while True:
                msg = await self._outbox.get()
                if msg is None:
                    return
                await self._call.write(msg)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._fail(f"replication stream to {self.secondary} broke while sending: {_describe(e)}")

    async def _reader(self) -> None:
        try:
            while True:
                reply = await self._call.read()
                if reply is grpc.aio.EOF:
                    self._fail(f"secondary {self.secondary} closed the replication stream")
                    return
                kind = reply.WhichOneof("kind")
                if kind == "ack":
                    done = self.window.ack(reply.ack.acked_through_seq)
                    self.stats.acks += len(done)
                    for seq in done:
                        f = self._futures.pop(seq, None)
                        if f is not None and not f.done():
                            f.set_result(True)
                    self._room.set()
                elif kind == "nack":
                    n = reply.nack
                    self.stats.nack(n.code)
                    info: NackInfo | None = None
                    if n.seq in self._futures:
                        info = self.window.nack(n.seq, n.code, n.message)
                        f = self._futures.pop(n.seq)
                        if not f.done():
                            f.set_result(False)
                    log.warning(
                        "volume %s: secondary NACKed seq %d (offset %d, length %d): %s: %s",
                        self.spec.name, n.seq, n.offset, n.length, pb.NackCode.Name(n.code), n.message,
                    )
                    if info is not None or not self.failed:
                        self._fail(
                            f"secondary NACKed write seq {n.seq}: {pb.NackCode.Name(n.code)}: {n.message}"
                        )
                elif kind == "marker_done" and self._on_marker_done is not None:
                    self._on_marker_done(reply.marker_done)
                elif kind == "stopping":
                    # Issue 13: a planned stop (SIGTERM of the secondary), the
                    # stream's last message. Fenced by the epoch: only this
                    # stream's secondary at this epoch says it.
                    st = reply.stopping
                    if st.epoch == self.epoch:
                        self._fail(f"secondary {self.secondary} is stopping (planned): {st.reason or 'no reason given'}",
                                   planned=True)
                        return
                    log.warning("volume %s: ignored a stopping message at epoch %d on the stream of epoch %d",
                                self.spec.name, st.epoch, self.epoch)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._fail(f"replication stream to {self.secondary} broke: {_describe(e)}")

    async def _watchdog(self) -> None:
        # Poll at a quarter of the timeout: a hang is detected within
        # ack_timeout_s * 1.25.
        period = max(0.01, self.options.ack_timeout_s / 4)
        while not self.failed:
            await asyncio.sleep(period)
            now = time.monotonic()
            if self.window.timed_out(now):
                self._fail(
                    f"no ack from secondary {self.secondary} within ack_timeout_s="
                    f"{self.options.ack_timeout_s} s (oldest unacked write waited "
                    f"{self.window.oldest_age_s(now):.2f} s)"
                )

    # ------------------------------------------------------------ failure
    def _fail(self, reason: str, notify: bool = True, *, planned: bool = False) -> None:
        if self.failed:
            return
        self.failed = True
        self.failure_reason = reason
        self.planned = planned
        self.failed_writes = self.window.fail_all()
        if notify and planned:
            # Not a failure: the pair still degrades (writes stay safe), but
            # an operator's planned stop is no ERROR.
            log.warning("volume %s: %s; the pair goes degraded until it is back (%d writes unacked, tracked)",
                        self.spec.name, reason, len(self.failed_writes))
            self._on_failure(reason)
        elif notify:
            log.error("volume %s: secondary declared failed: %s", self.spec.name, reason)
            # Synchronously: the owner closes its gate before any future settles.
            self._on_failure(reason)
        for f in self._futures.values():
            if not f.done():
                f.set_result(False)
        self._futures.clear()
        self._room.set()
        self._outbox.put_nowait(None)
        if notify:
            asyncio.get_running_loop().create_task(self._teardown())


def _describe(e: BaseException) -> str:
    if isinstance(e, grpc.RpcError):
        return f"{e.code().name}: {e.details()}"
    return f"{type(e).__name__}: {e}"
