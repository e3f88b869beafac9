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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import google_crc32c
import grpc

from syncrep import rpc
from syncrep.config import NodeOptions
from syncrep.core.identity import Identity
from syncrep.core.window import InFlight, NackInfo, ReplicationWindow
from syncrep.pb import syncrep_pb2 as pb
from syncrep.pb import syncrep_pb2_grpc as pbg

log = logging.getLogger(__name__)


class LinkError(Exception):
    pass


def identity_msg(identity: Identity) -> pb.Identity:
    """The wire form of a data identity (StreamOpen, ResyncHeader, reports).
    Field by field rather than ``pb.Identity(**identity.proto_fields())``:
    that helper is typed ``dict[str, object]``, which mypy cannot check."""
    return pb.Identity(volume_uuid=identity.volume_uuid, current=identity.current,
                       history=list(identity.history))


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
    ) -> None:
        self.spec = spec
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
        self.failed_writes: list[InFlight] = []
        self._channel: Any = None
        self._call: Any = None
        self._outbox: asyncio.Queue[pb.ReplicateRequest | None] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------ lifecycle
    async def open(self) -> None:
        """Open the stream and wait for StreamAccepted (bounded by connect_timeout_s)."""
        self._channel = rpc.channel(self.secondary)
        stub = pbg.ReplicaServiceStub(self._channel)
        self._call = stub.Replicate()
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
                    )
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

    def send(self, writes: list[tuple[int, int, bytes]]) -> list[asyncio.Future[bool]]:
        """Queue one batch of (seq, offset, data). Returns a future per write:
        True once acked, False when the write failed (NACK or link failure).
        Must only be called while the link has not failed (checked)."""
        if self.failed:
            raise LinkError("send on a failed link")
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        futs = []
        msg = pb.WriteBatch(epoch=self.epoch)
        for seq, offset, data in writes:
            self.window.send(seq, offset, len(data), now)
            f: asyncio.Future[bool] = loop.create_future()
            self._futures[seq] = f
            futs.append(f)
            msg.writes.append(
                pb.ReplicatedWrite(seq=seq, offset=offset, data=data, crc32c=google_crc32c.value(data))
            )
        self._outbox.put_nowait(pb.ReplicateRequest(batch=msg))
        return futs

    def send_marker(self, seq: int, name: str, keep: int) -> None:
        """A common-snapshot marker, in order with the writes: it follows
        every write with a smaller seq."""
        if self.failed:
            raise LinkError("send on a failed link")
        self._outbox.put_nowait(
            pb.ReplicateRequest(marker=pb.SnapshotMarker(seq=seq, name=name, epoch=self.epoch, keep=keep))
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
                    for seq in self.window.ack(reply.ack.acked_through_seq):
                        f = self._futures.pop(seq, None)
                        if f is not None and not f.done():
                            f.set_result(True)
                    self._room.set()
                elif kind == "nack":
                    n = reply.nack
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
    def _fail(self, reason: str, notify: bool = True) -> None:
        if self.failed:
            return
        self.failed = True
        self.failure_reason = reason
        self.failed_writes = self.window.fail_all()
        if notify:
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
