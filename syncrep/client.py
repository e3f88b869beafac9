"""The syncrep client library: used by the CLI, the demo, tests and benchmarks.

* :class:`VolumeClient` — writes and reads one volume through its primary.
  Writes travel over ONE shared bidirectional ``VolumeService.Write`` stream;
  concurrent callers are multiplexed by ``client_seq`` and each gets exactly
  its own reply. A reply with a non-zero code raises :class:`WriteError`.
  When the stream breaks, every write still waiting for a reply fails with the
  stream's error (such writes are never silently retried: the caller cannot
  know whether a failed write was applied), and the next write opens a new
  stream, towards the primary the coordinator names now.
  It follows a failover without being told: a write the node *refused*
  because it is not the volume's primary any more (FAILED_PRECONDITION "not
  its primary"; nothing was applied) is re-sent to the primary the
  coordinator names, and a read is retried there (reads are idempotent, so
  also after UNAVAILABLE), for at most ``failover_wait_s``.
* Node helpers (``NodeService``): :func:`read_local`, :func:`checksum`,
  :func:`node_status`, :func:`inject_fault`.
* Coordinator helpers (``CoordinatorService``): :func:`create_volume`,
  :func:`get_volume`, :func:`list_volumes`, :func:`wait_for_volume`,
  :func:`promote`.
* :func:`volume_status_dict`: the JSON shape of ``syncrep status --json``.

Every unary call carries a deadline (``DEFAULT_RPC_TIMEOUT_S`` unless the
caller passes one). Every failure surfaces as :class:`ClientError` (or its
subclass :class:`WriteError`), carrying the gRPC status code and message.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, NoReturn, TypeVar

import grpc
from grpc import aio

from syncrep import rpc
from syncrep.core.vocab import MAX_WRITE_BYTES
from syncrep.pb import syncrep_pb2 as pb
from syncrep.pb import syncrep_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Largest read the client asks for in one RPC; larger reads are split.
MAX_READ_BYTES = MAX_WRITE_BYTES
#: Default chunk of :func:`checksum` (matches the server's default).
DEFAULT_CHECKSUM_CHUNK_BYTES = 1024 * 1024
#: Checksumming a whole volume reads all of it on the node: a longer deadline.
CHECKSUM_TIMEOUT_S = 120.0
#: Default bound on how long one write waits for its reply. The stream itself
#: has keepalives; this only bounds a primary that accepts and never answers.
DEFAULT_WRITE_TIMEOUT_S = 60.0
#: How long a VolumeClient keeps looking for the volume's (new) primary after
#: the node it used refused a write or read as not the primary, or (reads
#: only) could not be reached. Longer than a lease (4 s) plus its drift and a
#: few heartbeats, so an automatic failover completes within it.
DEFAULT_FAILOVER_WAIT_S = 30.0
#: Pause between two look-ups of the primary while it moves.
FAILOVER_POLL_S = 0.2
# A node the coordinator names primary refused a write as "not its primary":
# it applies its assignment within milliseconds (a switchover), so it is
# asked again soon.
NAMED_PRIMARY_RETRY_S = 0.05
#: Promote waits for the coordinator to persist the new epoch and assign it.
PROMOTE_TIMEOUT_S = 20.0
#: Substring of the node's refusal when it is not the volume's primary
#: (syncrep.node.Node.primary): the write or read was not applied.
NOT_PRIMARY_HINT = "not its primary"

STATE_NAMES: dict[int, str] = {
    pb.PAIR_STATE_UNSPECIFIED: "unspecified",
    pb.PAIR_STATE_IN_SYNC: "in_sync",
    pb.PAIR_STATE_DEGRADED: "degraded",
    pb.PAIR_STATE_RESYNCING: "resyncing",
    pb.PAIR_STATE_PRIMARY_LOST: "primary_lost",
    pb.PAIR_STATE_SPLIT_BRAIN: "split_brain",
}
STATE_VALUES: dict[str, int] = {v: k for k, v in STATE_NAMES.items()}

RESYNC_MODES: dict[str, int] = {
    "rewrite": pb.RESYNC_MODE_REWRITE,
    "direct": pb.RESYNC_MODE_DIRECT,
}


# ---------------------------------------------------------------- errors


def status_code(value: int | grpc.StatusCode) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` for an integer code (UNKNOWN when unknown)."""
    if isinstance(value, grpc.StatusCode):
        return value
    for c in grpc.StatusCode:
        if c.value[0] == value:
            return c
    return grpc.StatusCode.UNKNOWN


class ClientError(Exception):
    """A failed call: ``code`` (grpc.StatusCode), ``message`` (details), ``what``.

    ``str(err)`` is one human line: ``<what>: <message> (<CODE>)``.
    """

    def __init__(self, code: int | grpc.StatusCode, message: str, *, what: str = "") -> None:
        self.code: grpc.StatusCode = status_code(code)
        self.message = message
        self.what = what
        super().__init__(str(self))

    @property
    def code_value(self) -> int:
        return int(self.code.value[0])

    def __str__(self) -> str:
        head = f"{self.what}: " if self.what else ""
        msg = " ".join((self.message or "").split()) or "no details"
        return f"{head}{msg} ({self.code.name})"

    @classmethod
    def from_rpc(cls, err: grpc.RpcError, what: str) -> ClientError:
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        details = err.details() if hasattr(err, "details") else str(err)
        return cls(code if code is not None else grpc.StatusCode.UNKNOWN, details or "", what=what)


class WriteError(ClientError):
    """A write that did not succeed: the primary answered with a non-zero code,
    the stream broke before the reply, or no reply came within the timeout.

    ``offset`` and ``length`` name the write. When the stream broke or timed
    out, the write may or may not have been applied.
    """

    def __init__(
        self,
        code: int | grpc.StatusCode,
        message: str,
        *,
        what: str = "",
        offset: int | None = None,
        length: int | None = None,
    ) -> None:
        self.offset = offset
        self.length = length
        #: The node that answered (set for a node's per-write reply).
        self.node: str | None = None
        #: True when the write never left the client (no stream could carry
        #: it): sending it again is safe.
        self.not_sent = False
        super().__init__(code, message, what=what)


def _not_primary(err: ClientError) -> bool:
    """The node refused because it is not the volume's primary: nothing was applied."""
    return err.code == grpc.StatusCode.FAILED_PRECONDITION and NOT_PRIMARY_HINT in err.message


async def _call(what: str, aw: Awaitable[T], *, unreachable: str | None = None) -> T:
    """Await one RPC; turn gRPC failures into :class:`ClientError`.
    ``unreachable`` replaces ``what`` when the server cannot be reached."""
    try:
        return await aw
    except grpc.RpcError as e:
        err = ClientError.from_rpc(e, what)
        if unreachable and err.code == grpc.StatusCode.UNAVAILABLE:
            err.what = unreachable
        raise err from None


# ---------------------------------------------------------------- the write stream


class _WriteStream:
    """One ``Write`` stream and the writes waiting for a reply on it."""

    def __init__(self, stub: Any, primary: str, on_fail: Callable[[WriteError, int], None]) -> None:
        self.primary = primary
        self.on_fail = on_fail
        self.call: Any = stub.Write()
        self.pending: dict[int, asyncio.Future[None]] = {}
        self.send_lock = asyncio.Lock()
        self.error: WriteError | None = None
        self.reader = asyncio.create_task(self._read_replies(), name=f"write-replies[{primary}]")

    @property
    def broken(self) -> bool:
        return self.error is not None

    async def _read_replies(self) -> None:
        err: WriteError | None = None
        try:
            while True:
                reply = await self.call.read()
                if reply is aio.EOF:
                    code = await self.call.code()
                    details = await self.call.details()
                    if code == grpc.StatusCode.OK:
                        code = grpc.StatusCode.UNAVAILABLE
                        details = "the primary closed the write stream"
                    err = WriteError(code, details or "", what=f"write stream to {self.primary}")
                    return
                fut = self.pending.pop(reply.client_seq, None)
                if fut is None or fut.done():
                    continue  # timed out or cancelled by the caller
                if reply.code == 0:
                    fut.set_result(None)
                else:
                    fut.set_exception(WriteError(reply.code, reply.message))
        except grpc.RpcError as e:
            err = WriteError(
                e.code() or grpc.StatusCode.UNKNOWN,
                e.details() or "",
                what=f"write stream to {self.primary}",
            )
        except asyncio.CancelledError:
            err = WriteError(grpc.StatusCode.CANCELLED, "the client closed the write stream")
            raise
        except Exception as e:
            err = WriteError(grpc.StatusCode.UNKNOWN, repr(e), what=f"write stream to {self.primary}")
        finally:
            self.fail(err or WriteError(grpc.StatusCode.UNAVAILABLE, "write stream ended"))

    def fail(self, err: WriteError) -> None:
        """Mark the stream broken and fail every write still waiting on it."""
        if self.error is None:
            self.error = err
            self.on_fail(err, len(self.pending))
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(WriteError(err.code, err.message, what=err.what))
        if not self.call.done():
            self.call.cancel()

    async def close(self) -> None:
        if self.error is None:
            with contextlib.suppress(Exception):
                async with self.send_lock:
                    await asyncio.wait_for(self.call.done_writing(), 1.0)
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.reader
        self.fail(WriteError(grpc.StatusCode.CANCELLED, "the client closed the write stream"))


# ---------------------------------------------------------------- VolumeClient


class VolumeClient:
    """Writes and reads one volume through its primary.

    Use ``await VolumeClient.connect(coordinator, volume)`` (or ``async with``
    on the result). Safe for many concurrent callers in one event loop.
    """

    def __init__(
        self,
        volume: str,
        primary: str,
        *,
        coordinator: str | None = None,
        rpc_timeout_s: float = rpc.DEFAULT_RPC_TIMEOUT_S,
        write_timeout_s: float | None = DEFAULT_WRITE_TIMEOUT_S,
        failover_wait_s: float = DEFAULT_FAILOVER_WAIT_S,
    ) -> None:
        self.volume = volume
        self.primary = primary
        self.coordinator = coordinator
        self.rpc_timeout_s = rpc_timeout_s
        self.write_timeout_s = write_timeout_s
        self.failover_wait_s = failover_wait_s
        self._channel: aio.Channel = rpc.channel(primary)
        self._stub: Any = pb_grpc.VolumeServiceStub(self._channel)
        self._stream: _WriteStream | None = None
        self._open_lock = asyncio.Lock()
        self._seq = itertools.count(1)
        self._closed = False
        self._last_fail_log = -1e9
        self._last_unavailable_check = -1e9
        # Streams and channels to a node that stopped being the primary: they
        # drain (their writes get the node's refusal) and close in the background.
        self._retiring: set[asyncio.Task[None]] = set()
        self.status: pb.VolumeStatus | None = None

    @classmethod
    async def connect(
        cls,
        coordinator_addr: str,
        volume: str,
        *,
        rpc_timeout_s: float = rpc.DEFAULT_RPC_TIMEOUT_S,
        write_timeout_s: float | None = DEFAULT_WRITE_TIMEOUT_S,
        failover_wait_s: float = DEFAULT_FAILOVER_WAIT_S,
    ) -> VolumeClient:
        """Look the volume up on the coordinator and connect to its primary."""
        st = await get_volume(coordinator_addr, volume, timeout_s=rpc_timeout_s)
        if not st.primary:
            raise ClientError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "the coordinator names no primary",
                what=f"volume {volume!r}",
            )
        client = cls(
            volume,
            st.primary,
            coordinator=coordinator_addr,
            rpc_timeout_s=rpc_timeout_s,
            write_timeout_s=write_timeout_s,
            failover_wait_s=failover_wait_s,
        )
        client.status = st
        return client

    async def __aenter__(self) -> VolumeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ writes

    async def _relookup_primary(self) -> bool:
        """Ask the coordinator where the primary is now; switch to it if it
        moved. True when it moved. Called with ``_open_lock`` held."""
        if not self.coordinator:
            return False
        try:
            st = await get_volume(self.coordinator, self.volume, timeout_s=self.rpc_timeout_s)
        except ClientError as e:
            log.info("cannot re-check the primary of %s (%s); keeping %s", self.volume, e, self.primary)
            return False
        self.status = st
        if not st.primary or st.primary == self.primary:
            return False
        log.info("primary of %s moved: %s -> %s", self.volume, self.primary, st.primary)
        old_channel, old_stream = self._channel, self._stream
        self.primary = st.primary
        self._channel = rpc.channel(st.primary)
        self._stub = pb_grpc.VolumeServiceStub(self._channel)
        self._stream = None
        task = asyncio.create_task(self._retire(old_stream, old_channel), name=f"retire[{old_channel}]")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return True

    async def _retire(self, stream: _WriteStream | None, channel: aio.Channel) -> None:
        """Close a stream and channel to the old primary once the writes still
        waiting on it have their answers (bounded by the write timeout): those
        writes may have been applied, so they must get their real outcome."""
        try:
            waiting = list(stream.pending.values()) if stream is not None and not stream.broken else []
            if waiting:
                await asyncio.wait(waiting, timeout=self.write_timeout_s or DEFAULT_WRITE_TIMEOUT_S)
        finally:
            if stream is not None:
                with contextlib.suppress(Exception):
                    await stream.close()
            with contextlib.suppress(Exception):
                await channel.close()

    async def _follow_primary(self, refused_by: str, deadline: float) -> bool:
        """``refused_by`` is not (or no longer reachable as) the primary: find
        the one the coordinator names now, polling until ``deadline``
        (monotonic). True when the client now points at another node."""
        while True:
            async with self._open_lock:
                if self._closed:
                    return False
                if self.primary != refused_by:
                    return True  # a concurrent caller already followed it
                if await self._relookup_primary():
                    return True
                # The coordinator names the very node that refused: it has not
                # applied its primary assignment yet (a switchover or promotion
                # names the new primary a moment before it serves). Its
                # refusal applied nothing, so the write is re-sent to it.
                named_refuser = self.status is not None and self.status.primary == refused_by
            pause = NAMED_PRIMARY_RETRY_S if named_refuser else FAILOVER_POLL_S
            if time.monotonic() + pause >= deadline:
                return False
            await asyncio.sleep(pause)
            if named_refuser:
                return True

    async def _recheck_after_unavailable(self, e: WriteError) -> None:
        """A write failed UNAVAILABLE: its outcome is unknown, so it is not
        re-sent (the caller gets the error). But the primary may have moved:
        an isolated old primary that lost its lease answers every write
        UNAVAILABLE and never learns of its demotion while cut off. So the
        coordinator is asked again (at most every FAILOVER_POLL_S), and the
        next write goes to the primary it names."""
        now = time.monotonic()
        if now - self._last_unavailable_check < FAILOVER_POLL_S:
            return
        self._last_unavailable_check = now
        async with self._open_lock:
            if self._closed or (e.node is not None and e.node != self.primary):
                return
            await self._relookup_primary()

    async def _get_stream(self) -> _WriteStream:
        if self._closed:
            raise WriteError(grpc.StatusCode.CANCELLED, "the client is closed", what=f"volume {self.volume}")
        stream = self._stream
        if stream is not None and not stream.broken:
            return stream
        async with self._open_lock:
            stream = self._stream
            if stream is not None and not stream.broken:
                return stream
            if stream is not None:  # broken: re-open, maybe towards a new primary
                await self._relookup_primary()
            self._stream = _WriteStream(self._stub, self.primary, self._stream_failed)
            return self._stream

    def _stream_failed(self, err: WriteError, pending: int) -> None:
        # While the primary is down every write may open (and lose) a stream:
        # one warning per few seconds, the rest at debug level.
        now = time.monotonic()
        level = logging.DEBUG
        if not self._closed and now - self._last_fail_log >= 5.0:
            level = logging.WARNING
            self._last_fail_log = now
        log.log(level, "%s; %d pending write(s) fail", err, pending)

    async def write(self, offset: int, data: bytes, *, timeout_s: float | None = None) -> None:
        """Write ``data`` at ``offset``; return once the primary acknowledged it.

        Raises :class:`WriteError` when the primary answers with a non-zero
        code, when the stream breaks before the reply, or when no reply came
        within ``timeout_s`` (default: the client's ``write_timeout_s``).
        A write the node refused because it is not the primary (nothing was
        applied) is re-sent to the primary the coordinator names, for at most
        ``failover_wait_s``.
        """
        deadline = time.monotonic() + self.failover_wait_s
        while True:
            try:
                await self._write_once(offset, data, timeout_s)
                return
            except WriteError as e:
                if e.not_sent and self.coordinator and e.code == grpc.StatusCode.UNAVAILABLE:
                    # The primary is unreachable (killed, say) and the write never
                    # left: wait for the coordinator to name a primary that takes
                    # it (a failover), within failover_wait_s, instead of failing
                    # every write of the outage at once.
                    if time.monotonic() + FAILOVER_POLL_S >= deadline:
                        raise
                    await asyncio.sleep(FAILOVER_POLL_S)
                    async with self._open_lock:
                        if not self._closed:
                            await self._relookup_primary()
                    continue
                if e.code == grpc.StatusCode.UNAVAILABLE and self.coordinator:
                    await self._recheck_after_unavailable(e)
                if not _not_primary(e) or not self.coordinator:
                    raise
                refused_by = self.primary if e.node is None else e.node
                if not await self._follow_primary(refused_by, deadline):
                    raise WriteError(
                        e.code,
                        f"{e.message}; the coordinator named no other primary within "
                        f"{self.failover_wait_s:g} s",
                        what=e.what, offset=offset, length=len(data),
                    ) from None
                log.info("write at %d refused by %s (not the primary); re-sent to %s",
                         offset, refused_by, self.primary)

    async def _write_once(self, offset: int, data: bytes, timeout_s: float | None) -> None:
        what = f"write {len(data)} B at offset {offset} to {self.volume}"
        if offset < 0:
            raise WriteError(grpc.StatusCode.INVALID_ARGUMENT, "negative offset", what=what)
        if len(data) > MAX_WRITE_BYTES:
            raise WriteError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{len(data)} bytes exceeds the largest write ({MAX_WRITE_BYTES} bytes)",
                what=what,
                offset=offset,
                length=len(data),
            )
        loop = asyncio.get_running_loop()
        for attempt in range(2):
            stream = await self._get_stream()
            seq = next(self._seq)
            fut: asyncio.Future[None] = loop.create_future()
            stream.pending[seq] = fut
            req = pb.WriteRequest(volume=self.volume, client_seq=seq, offset=offset, data=bytes(data))
            try:
                async with stream.send_lock:
                    if stream.error is None:
                        await stream.call.write(req)
                        break
            except (grpc.RpcError, asyncio.InvalidStateError, RuntimeError) as e:
                await self._send_failed(stream, seq, fut, e, what, offset, len(data))
            except asyncio.CancelledError:
                stream.pending.pop(seq, None)
                raise
            # The stream broke before this write was sent: nothing left the
            # client, so sending it on a fresh stream is safe.
            stream.pending.pop(seq, None)
            if fut.done() and not fut.cancelled():
                fut.exception()  # mark retrieved
            if attempt == 1:
                err = stream.error or WriteError(grpc.StatusCode.UNAVAILABLE, "write stream broken")
                unsent = WriteError(err.code, err.message, what=what, offset=offset, length=len(data))
                unsent.not_sent = True
                raise unsent
        timeout = self.write_timeout_s if timeout_s is None else timeout_s
        try:
            if timeout is None:
                await fut
            else:
                await asyncio.wait_for(fut, timeout)
        except asyncio.CancelledError:
            stream.pending.pop(seq, None)
            raise
        except TimeoutError:
            stream.pending.pop(seq, None)
            raise WriteError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no reply within {timeout:g} s; the write may or may not have been applied",
                what=what,
                offset=offset,
                length=len(data),
            ) from None
        except WriteError as e:
            err = WriteError(e.code, e.message, what=what, offset=offset, length=len(data))
            err.node = stream.primary
            raise err from None

    async def _send_failed(
        self,
        stream: _WriteStream,
        seq: int,
        fut: asyncio.Future[None],
        e: BaseException,
        what: str,
        offset: int,
        length: int,
    ) -> NoReturn:
        """Sending a write failed (the call has ended): fail the stream and this
        write. The write may have reached the primary, so it is not retried."""
        stream.pending.pop(seq, None)
        if fut.done() and not fut.cancelled():
            fut.exception()  # already failed by the reader: mark it retrieved
        # The call's final status (seen by the reader) says why better than
        # the send error does.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(stream.reader), 1.0)
        err = stream.error
        if err is None:
            code = e.code() if isinstance(e, grpc.RpcError) and hasattr(e, "code") else None
            details = e.details() if isinstance(e, grpc.RpcError) and hasattr(e, "details") else repr(e)
            err = WriteError(
                code or grpc.StatusCode.UNAVAILABLE, details or "", what=f"write stream to {stream.primary}"
            )
            stream.fail(err)
        raise WriteError(err.code, err.message, what=what, offset=offset, length=length) from None

    async def write_many(
        self,
        writes: Iterable[tuple[int, bytes]],
        depth: int = 16,
        *,
        on_done: Callable[[int, int], None] | None = None,
    ) -> int:
        """Pipelined writes: at most ``depth`` in flight at once.

        Stops submitting after the first failure, waits for the writes
        already in flight, then raises that first :class:`WriteError`.
        ``on_done(offset, length)`` is called for every acknowledged write.
        Returns the number of bytes written.
        """
        if depth < 1:
            raise ValueError("depth must be >= 1")
        sem = asyncio.Semaphore(depth)
        first_err: list[BaseException] = []
        tasks: set[asyncio.Task[None]] = set()
        written = 0

        async def one(offset: int, data: bytes) -> None:
            nonlocal written
            try:
                await self.write(offset, data)
                written += len(data)
                if on_done is not None:
                    on_done(offset, len(data))
            except BaseException as e:
                if not first_err:
                    first_err.append(e)
                raise
            finally:
                sem.release()

        try:
            for offset, data in writes:
                await sem.acquire()
                if first_err:
                    sem.release()
                    break
                t = asyncio.create_task(one(offset, data))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        except BaseException:
            for t in tasks:
                t.cancel()
            raise
        if first_err:
            raise first_err[0]
        return written

    # ------------------------------------------------------------ reads

    @property
    def block_size(self) -> int:
        """The volume's block size, when known from the coordinator (else 0)."""
        return int(self.status.spec.block_size) if self.status is not None else 0

    async def read(self, offset: int, length: int, *, snapshot_id: int = 0) -> bytes:
        """Read ``length`` bytes at ``offset`` from the primary (unary Read).

        The node reads whole blocks; when the block size is known (clients made
        by :meth:`connect`), an unaligned range is widened to whole blocks and
        the answer cut back to exactly what was asked. Reads larger than
        ``MAX_READ_BYTES`` are split into several RPCs.
        """
        if length <= 0:
            return b""
        bs = self.block_size
        if bs > 1 and (offset % bs or length % bs):
            start = offset - offset % bs
            end = -(-(offset + length) // bs) * bs
            data = await self._read_aligned(start, end - start, snapshot_id)
            return data[offset - start : offset - start + length]
        return await self._read_aligned(offset, length, snapshot_id)

    async def _read_aligned(self, offset: int, length: int, snapshot_id: int) -> bytes:
        """One read, following the primary: a read refused as not the primary,
        or that cannot reach it, is retried (reads are idempotent) on the primary
        the coordinator names, for at most ``failover_wait_s``."""
        deadline = time.monotonic() + self.failover_wait_s
        while True:
            node = self.primary
            try:
                return await self._read_from_primary(offset, length, snapshot_id)
            except ClientError as e:
                retry = _not_primary(e) or e.code == grpc.StatusCode.UNAVAILABLE
                if not retry or not self.coordinator or self._closed:
                    raise
                if time.monotonic() >= deadline:
                    raise ClientError(
                        e.code, f"{e.message}; no reachable primary within {self.failover_wait_s:g} s",
                        what=e.what,
                    ) from None
                if _not_primary(e):
                    if not await self._follow_primary(node, deadline):
                        raise
                elif not await self._follow_primary(node, time.monotonic()):
                    # Unreachable and still named the primary: it may be
                    # restarting, or about to be replaced; ask again shortly.
                    await asyncio.sleep(FAILOVER_POLL_S)

    async def _read_from_primary(self, offset: int, length: int, snapshot_id: int) -> bytes:
        what = f"read {length} B at offset {offset} of {self.volume} from {self.primary}"
        step = MAX_READ_BYTES
        if self.block_size > 1:
            step = max(self.block_size, step // self.block_size * self.block_size)
        parts: list[bytes] = []
        done = 0
        while done < length:
            n = min(step, length - done)
            req = pb.ReadRequest(volume=self.volume, offset=offset + done, length=n, snapshot_id=snapshot_id)
            reply = await _call(
                what,
                self._stub.Read(req, timeout=self.rpc_timeout_s),
                unreachable=f"cannot reach primary {self.primary} ({what})",
            )
            if len(reply.data) != n:
                raise ClientError(
                    grpc.StatusCode.DATA_LOSS,
                    f"short read: asked {n} bytes at {offset + done}, got {len(reply.data)}",
                    what=what,
                )
            parts.append(reply.data)
            done += n
        return b"".join(parts)

    # ------------------------------------------------------------ lifecycle

    async def close(self) -> None:
        """Close the write stream (pending writes fail with CANCELLED) and the channel."""
        if self._closed:
            return
        self._closed = True
        if self._stream is not None:
            await self._stream.close()
            self._stream = None
        for t in list(self._retiring):
            t.cancel()
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._channel.close()


# ---------------------------------------------------------------- node helpers


async def read_local(
    node_addr: str,
    volume: str,
    offset: int,
    length: int,
    snapshot_id: int = 0,
    *,
    timeout_s: float = rpc.DEFAULT_RPC_TIMEOUT_S,
) -> bytes:
    """Node-local read (``NodeService.ReadLocal``) of a volume or one of its snapshots,
    whatever the node's role. Split into RPCs of at most ``MAX_READ_BYTES``."""
    what = f"ReadLocal {length} B at offset {offset} of {volume} on {node_addr}"
    parts: list[bytes] = []
    async with rpc.channel(node_addr) as ch:
        stub = pb_grpc.NodeServiceStub(ch)
        done = 0
        while done < length:
            n = min(MAX_READ_BYTES, length - done)
            req = pb.ReadRequest(volume=volume, offset=offset + done, length=n, snapshot_id=snapshot_id)
            reply = await _call(what, stub.ReadLocal(req, timeout=timeout_s), unreachable=f"cannot reach node {node_addr} ({what})")
            if len(reply.data) != n:
                raise ClientError(
                    grpc.StatusCode.DATA_LOSS,
                    f"short read: asked {n} bytes at {offset + done}, got {len(reply.data)}",
                    what=what,
                )
            parts.append(reply.data)
            done += n
    return b"".join(parts)


async def checksum(
    node_addr: str,
    volume: str,
    chunk_bytes: int = DEFAULT_CHECKSUM_CHUNK_BYTES,
    *,
    offset: int = 0,
    length: int = 0,
    snapshot_id: int = 0,
    timeout_s: float = CHECKSUM_TIMEOUT_S,
) -> list[int]:
    """Per-chunk crc32c of a node's copy (``NodeService.Checksum``); ``length=0``
    means to the end of the volume. The data never leaves the node."""
    what = f"Checksum of {volume} on {node_addr}"
    req = pb.ChecksumRequest(
        volume=volume, offset=offset, length=length, chunk_bytes=chunk_bytes, snapshot_id=snapshot_id
    )
    async with rpc.channel(node_addr) as ch:
        reply = await _call(
            what, pb_grpc.NodeServiceStub(ch).Checksum(req, timeout=timeout_s), unreachable=f"cannot reach node {node_addr} ({what})"
        )
    return list(reply.crc32c)


async def node_status(node_addr: str, *, timeout_s: float = rpc.DEFAULT_RPC_TIMEOUT_S) -> pb.NodeStatusReply:
    """``NodeService.NodeStatus``: the node's own view of each of its volumes."""
    async with rpc.channel(node_addr) as ch:
        return await _call(
            f"NodeStatus of {node_addr}",
            pb_grpc.NodeServiceStub(ch).NodeStatus(pb.NodeStatusRequest(), timeout=timeout_s),
        )


async def inject_fault(
    node_addr: str,
    volume: str,
    kind: str,
    count: int = 1,
    *,
    timeout_s: float = rpc.DEFAULT_RPC_TIMEOUT_S,
) -> str:
    """Arm a test fault on a node started with ``--enable-fault-injection``:
    ``kind`` is "eio", "enospc" or "clear". Returns the node's message."""
    req = pb.InjectFaultRequest(volume=volume, kind=kind, count=count)
    async with rpc.channel(node_addr) as ch:
        reply = await _call(
            f"InjectFault {kind} on {node_addr}",
            pb_grpc.NodeServiceStub(ch).InjectFault(req, timeout=timeout_s),
        )
    return str(reply.message)


# ---------------------------------------------------------------- coordinator helpers


def _coord_what(coordinator: str, op: str) -> str:
    return f"{op} on coordinator {coordinator}"


def _coord_call(coordinator: str, op: str, aw: Awaitable[T]) -> Awaitable[T]:
    return _call(_coord_what(coordinator, op), aw, unreachable=f"cannot reach coordinator {coordinator} ({op})")


async def create_volume(
    coordinator: str,
    name: str,
    size_bytes: int,
    primary: str,
    secondary: str,
    *,
    block_size: int = 4096,
    resync_mode: int | str = pb.RESYNC_MODE_UNSPECIFIED,
    auto_failover: bool = False,
    timeout_s: float = rpc.DEFAULT_RPC_TIMEOUT_S,
) -> pb.VolumeStatus:
    """``CoordinatorService.CreateVolume``. ``resync_mode``: a pb value or
    "rewrite"/"direct" (UNSPECIFIED = the coordinator's default).
    ``auto_failover``: the coordinator promotes the secondary by itself when
    the primary is lost (after its lease expired, only if the secondary is
    healthy and current)."""
    mode = RESYNC_MODES[resync_mode] if isinstance(resync_mode, str) else resync_mode
    req = pb.CreateVolumeRequest(
        name=name,
        size_bytes=size_bytes,
        block_size=block_size,
        primary=primary,
        secondary=secondary,
        resync_mode=mode,  # type: ignore[arg-type]
        auto_failover=auto_failover,
    )
    async with rpc.channel(coordinator) as ch:
        return await _coord_call(
            coordinator, f"CreateVolume {name!r}",
            pb_grpc.CoordinatorServiceStub(ch).CreateVolume(req, timeout=timeout_s),
        )


async def get_volume(
    coordinator: str, name: str, *, timeout_s: float = rpc.DEFAULT_RPC_TIMEOUT_S
) -> pb.VolumeStatus:
    """``CoordinatorService.GetVolume``: the pair's state and where its primary is."""
    async with rpc.channel(coordinator) as ch:
        return await _coord_call(
            coordinator, f"GetVolume {name!r}",
            pb_grpc.CoordinatorServiceStub(ch).GetVolume(pb.GetVolumeRequest(name=name), timeout=timeout_s),
        )


async def list_volumes(
    coordinator: str, *, timeout_s: float = rpc.DEFAULT_RPC_TIMEOUT_S
) -> list[pb.VolumeStatus]:
    """``CoordinatorService.ListVolumes``."""
    async with rpc.channel(coordinator) as ch:
        reply = await _coord_call(
            coordinator, "ListVolumes",
            pb_grpc.CoordinatorServiceStub(ch).ListVolumes(pb.ListVolumesRequest(), timeout=timeout_s),
        )
    return list(reply.volumes)


async def promote(
    coordinator: str, volume: str, *, force: bool = False, timeout_s: float = PROMOTE_TIMEOUT_S
) -> pb.PromoteReply:
    """``CoordinatorService.Promote``: make the secondary of ``volume`` its
    primary at a new epoch (docs/FAILOVER.md). The coordinator refuses
    (:class:`ClientError`, its message says why and for how long) while the old
    primary's lease runs, and, unless ``force``, when the secondary is not
    alive, has no data or is not current (``force`` loses what it lacks)."""
    req = pb.PromoteRequest(volume=volume, force=force)
    async with rpc.channel(coordinator) as ch:
        return await _coord_call(
            coordinator, f"Promote {volume!r}{' --force' if force else ''}",
            pb_grpc.CoordinatorServiceStub(ch).Promote(req, timeout=timeout_s),
        )


async def switchover(
    coordinator: str, volume: str, *, handover_timeout_s: float = 0.0, timeout_s: float = PROMOTE_TIMEOUT_S
) -> pb.SwitchoverReply:
    """``CoordinatorService.Switchover``: swap the roles of ``volume``'s
    replicas with no data loss (docs/FAILOVER.md section 5). The coordinator
    refuses (:class:`ClientError`, its message says why and what to do) unless
    the pair is in sync with both nodes alive at the same generation. The
    reply carries the write stall (``stall_s``). ``handover_timeout_s``: how
    long the old primary holds writes at its gate (0: the coordinator's
    default)."""
    req = pb.SwitchoverRequest(volume=volume, handover_timeout_s=handover_timeout_s)
    async with rpc.channel(coordinator) as ch:
        return await _coord_call(
            coordinator, f"Switchover {volume!r}",
            pb_grpc.CoordinatorServiceStub(ch).Switchover(req, timeout=timeout_s),
        )


async def wait_for_volume(
    coordinator: str,
    name: str,
    predicate: Callable[[pb.VolumeStatus], bool] | str,
    *,
    timeout_s: float = 30.0,
    poll_s: float = 0.1,
) -> pb.VolumeStatus:
    """Poll GetVolume until ``predicate(status)`` holds (a state name such as
    "in_sync" means: that state and both nodes alive). Raises
    :class:`ClientError` DEADLINE_EXCEEDED with the last status on timeout."""
    if isinstance(predicate, str):
        want = STATE_VALUES[predicate]

        def in_state(st: pb.VolumeStatus) -> bool:
            return st.state == want and st.primary_alive and st.secondary_alive

        pred: Callable[[pb.VolumeStatus], bool] = in_state
        label = f"state {predicate}"
    else:
        pred = predicate
        label = getattr(predicate, "__name__", "condition")
    deadline = time.monotonic() + timeout_s
    last: pb.VolumeStatus | None = None
    last_err: ClientError | None = None
    while True:
        try:
            last = await get_volume(coordinator, name)
            last_err = None
            if pred(last):
                return last
        except ClientError as e:
            last_err = e
        if time.monotonic() >= deadline:
            seen = (
                f"last seen: {STATE_NAMES.get(last.state, last.state)}, "
                f"primary_alive={last.primary_alive}, secondary_alive={last.secondary_alive}, "
                f"last_error={last.last_error!r}"
                if last is not None
                else f"last error: {last_err}"
            )
            raise ClientError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"not reached within {timeout_s:g} s ({seen})",
                what=f"waiting for volume {name!r} to reach {label}",
            )
        await asyncio.sleep(poll_s)


# ---------------------------------------------------------------- status JSON


def _iso(ts: float) -> str | None:
    if not ts:
        return None
    return datetime.datetime.fromtimestamp(ts, tz=datetime.UTC).isoformat()


def volume_status_dict(st: pb.VolumeStatus) -> dict[str, Any]:
    """The JSON shape of one volume in ``syncrep status --json``."""
    failed = [{"offset": int(e.offset), "length": int(e.length)} for e in st.failed_extents]
    failed_bytes = int(st.failed_bytes) or sum(e["length"] for e in failed)
    state = STATE_NAMES.get(st.state, "unspecified")
    if state == "unspecified":
        # `state` is exactly one of the five names; an unknown pair is not in sync.
        state = "degraded"
    mode = {v: k for k, v in RESYNC_MODES.items()}.get(st.resync_mode)
    return {
        "name": st.spec.name,
        "state": state,
        "epoch": int(st.epoch),
        "primary": st.primary,
        "secondary": st.secondary,
        "primary_alive": bool(st.primary_alive),
        "secondary_alive": bool(st.secondary_alive),
        "size_bytes": int(st.spec.size_bytes),
        "block_size": int(st.spec.block_size),
        "resync_mode": mode,
        "failed_extents": failed,
        "failed_extents_count": len(failed),
        "failed_bytes": failed_bytes,
        "fault_snapshot_id": int(st.fault_snapshot_id),
        "resync": {
            "bytes_done": int(st.resync.bytes_done),
            "bytes_total": int(st.resync.bytes_total),
            "rate_bytes_per_s": float(st.resync.rate_bytes_per_s),
            "eta_s": float(st.resync.eta_s),
            "round": int(st.resync.round),
        },
        "last_error": st.last_error,
        "state_changed_at": _iso(st.state_changed_at),
        "acked_seq": int(st.acked_seq),
        "last_seq": int(st.last_seq),
        "resync_bytes_sent": int(getattr(st, "resync_bytes_sent", 0)),
        "resync_chunks_refused": int(getattr(st, "resync_chunks_refused", 0)),
        "last_stall_ms": float(getattr(st, "last_stall_ms", 0.0)),
        # Failover and data identity (docs/FAILOVER.md).
        "volume_uuid": st.volume_uuid,
        "generation": int(st.generation),
        "secondary_generation": int(st.secondary_generation),
        "lease_remaining_s": float(st.lease_remaining_s),
        "out_of_sync_bytes": int(st.out_of_sync_bytes),
        "auto_failover": bool(st.auto_failover),
        "primary_data_missing": bool(st.primary_data_missing),
        "secondary_data_missing": bool(st.secondary_data_missing),
    }
