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
  :func:`promote`, and the per-volume grants of users: :func:`grant`,
  :func:`revoke`, :func:`list_grants`.
* :func:`volume_status_dict`: the JSON shape of ``syncrep status --json``.
* The volume lifecycle (issue 13): :func:`delete_volume`, :func:`resize_volume`.
* :func:`watch_events` (``CoordinatorService.WatchEvents``), :func:`event_line`
  and :func:`event_dict`: ``syncrep events`` and its ``--json`` lines. Given
  several coordinators it streams from the leader and follows a new one.

Every unary call carries a deadline (``DEFAULT_RPC_TIMEOUT_S`` unless the
caller passes one). Every failure surfaces as :class:`ClientError` (or its
subclass :class:`WriteError`), carrying the gRPC status code and message. A
server that cannot be reached because the TLS handshake failed (a certificate
from another CA, an expired one, a server whose SANs do not name the address
dialed) says so: gRPC reports it as UNAVAILABLE with the TLS library's words
in the details, and :data:`TLS_HINT` is added to the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, NoReturn, TypeVar

import grpc
from grpc import aio

from syncrep import rpc
from syncrep.core.vocab import MAX_WRITE_BYTES, parse_address_list
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
#: Added to an UNAVAILABLE error whose details come from the TLS handshake.
TLS_HINT = "(TLS handshake failed? check --certs-dir, the CA and the server's SANs)"
#: Words of gRPC's and BoringSSL's handshake failures (lower case).
_TLS_WORDS = ("ssl", "handshake", "certificate", "peer name", "tls", "alert", "hostname verification")

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


def tls_failure(details: str) -> bool:
    """Whether an UNAVAILABLE error's details come from a failed TLS handshake:
    the TLS library's words (this side refused the server's certificate), or,
    when this process uses TLS, a connection the server closed before any
    call ("failed to connect ... Socket closed": how gRPC reports that the
    server refused this side's certificate: another CA's, an expired one)."""
    text = (details or "").lower()
    if any(w in text for w in _TLS_WORDS):
        return True
    sec = rpc.security
    tls_on = sec is not None and not sec.insecure
    return tls_on and "failed to connect" in text and "socket closed" in text


async def _call(what: str, aw: Awaitable[T], *, unreachable: str | None = None) -> T:
    """Await one RPC; turn gRPC failures into :class:`ClientError`.
    ``unreachable`` replaces ``what`` when the server cannot be reached (and
    a failed TLS handshake says so, :data:`TLS_HINT`)."""
    try:
        return await aw
    except grpc.RpcError as e:
        err = ClientError.from_rpc(e, what)
        if unreachable and err.code == grpc.StatusCode.UNAVAILABLE and not answered_by_server(e):
            err.what = unreachable
            if tls_failure(err.message) and TLS_HINT not in err.message:
                err.message = f"{err.message} {TLS_HINT}"
        raise err from None


# ---------------------------------------------------------------- the write stream


def write_reply_outcomes(reply: pb.WriteReply) -> list[tuple[int, int, str]]:
    """Every write one ``WriteReply`` answers, as (client_seq, code, message):
    its ``client_seq`` with its code, then each of ``more_ok_seqs`` (the
    node's batched OK answers, sent only to a stream that asked for them with
    ``WriteRequest.batch_replies``) with code 0."""
    return [(reply.client_seq, reply.code, reply.message), *((s, 0, "") for s in reply.more_ok_seqs)]


class _WriteStream:
    """One ``Write`` stream and the writes waiting for a reply on it."""

    def __init__(self, stub: Any, primary: str, on_fail: Callable[[WriteError, int], None]) -> None:
        self.primary = primary
        self.on_fail = on_fail
        self.call: Any = stub.Write()
        # Whether a request asking for batched replies was sent on it yet
        # (the first one asks; the node batches from that request on).
        self.asked_batch = False
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
                for seq, code, message in write_reply_outcomes(reply):
                    fut = self.pending.pop(seq, None)
                    if fut is None or fut.done():
                        continue  # timed out or cancelled by the caller
                    if code == 0:
                        fut.set_result(None)
                    else:
                        fut.set_exception(WriteError(code, message))
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
        await self.check_range(offset, len(data), "write")
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
                        if not stream.asked_batch:
                            req.batch_replies = True
                            stream.asked_batch = True
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

    # ------------------------------------------------------------ range checks (issue 13)

    @property
    def size_bytes(self) -> int:
        """The volume's size, when known from the coordinator (else 0)."""
        return int(self.status.spec.size_bytes) if self.status is not None else 0

    async def check_range(self, offset: int, length: int, what: str) -> None:
        """Refuse (OUT_OF_RANGE, nothing sent) an I/O that crosses the end of the
        volume, by the size the coordinator gave (GetVolume). The node refuses it
        too, but a large write split into several would land in part first.
        A range past the size known here is checked once more against the
        coordinator (a resize may have grown the volume since). Without a
        known size (a client not made by :meth:`connect`) only the node checks."""
        if offset < 0 or length <= 0 or not self.size_bytes or offset + length <= self.size_bytes:
            return
        if self.coordinator:
            with contextlib.suppress(ClientError):
                self.status = await get_volume(self.coordinator, self.volume, timeout_s=self.rpc_timeout_s)
            if offset + length <= self.size_bytes:
                return
        size = self.size_bytes
        text = (
            f"{what} of {length} bytes at offset {offset} ends at {offset + length}, past the end of volume "
            f"{self.volume!r} ({size} bytes); refused before sending anything"
        )
        if what == "write":
            raise WriteError(grpc.StatusCode.OUT_OF_RANGE, text, what=f"volume {self.volume}",
                             offset=offset, length=length)
        raise ClientError(grpc.StatusCode.OUT_OF_RANGE, text, what=f"volume {self.volume}")

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
        await self.check_range(offset, length, "read")
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


# ---------------------------------------------------------------- several coordinators (issue 12)

#: How long one call looks for the leading coordinator among those named
#: (``--coordinator A,B,C``): through redirects, unreachable coordinators
#: and an election (a new leader is elected within about 2 x its TTL, 5 s).
LEADER_SEARCH_S = 15.0
#: Pause after every coordinator known was tried once without an answer.
LEADER_RETRY_S = 0.25
#: Trailing metadata of a follower's redirect and of its read answers
#: (coordinator/service.py's LEADER_METADATA_KEY and ROLE_METADATA_KEY).
LEADER_METADATA_KEY = "syncrep-leader"
ROLE_METADATA_KEY = "syncrep-coordinator-role"
#: Trailing metadata of a refusal the coordinator itself sent (its ANSWERED_METADATA_KEY).
ANSWERED_METADATA_KEY = "syncrep-answered-by"


class CoordinatorSet:
    """The coordinators one ``--coordinator A,B,C`` names, and which of them
    leads as last learnt (from an answer, or a follower's redirect)."""

    def __init__(self, addresses: Iterable[str]) -> None:
        self.addresses = list(addresses)
        self.leader: str | None = None

    def order(self) -> list[str]:
        """The known leader first (it may be one no flag named: a redirect), then the others as named."""
        first = [self.leader] if self.leader else []
        return first + [a for a in self.addresses if a != self.leader]


_COORDINATOR_SETS: dict[str, CoordinatorSet] = {}


def coordinator_set(coordinator: str) -> CoordinatorSet:
    """The (per process, shared) ``CoordinatorSet`` of a ``--coordinator`` value."""
    cs = _COORDINATOR_SETS.get(coordinator)
    if cs is None:
        cs = _COORDINATOR_SETS[coordinator] = CoordinatorSet(parse_address_list(coordinator))
    return cs


def _metadata(md: Any, key: str) -> str | None:
    for k, v in md or ():
        if k == key:
            return v.decode() if isinstance(v, bytes) else str(v)
    return None


def _trailing(err: BaseException) -> Any:
    trailing = getattr(err, "trailing_metadata", None)
    try:
        return trailing() if callable(trailing) else None
    except Exception:
        return None


def answered_by_server(err: BaseException) -> bool:
    """Whether ``err`` is a status the coordinator sent (it was reached; an
    UNAVAILABLE then means something behind it did not answer), not one
    gRPC made up because the coordinator could not be reached."""
    return _metadata(_trailing(err), ANSWERED_METADATA_KEY) is not None


def redirect_of(err: grpc.RpcError) -> str | None:
    """A coordinator's "I do not lead" answer: the leader it names ("" if it
    knows none), or None when ``err`` is no redirect."""
    return _metadata(_trailing(err), LEADER_METADATA_KEY)


async def _coord_rpc(
    coordinator: str, op: str, method: str, request: Any, *, timeout_s: float, search_s: float = LEADER_SEARCH_S
) -> Any:
    """One CoordinatorService call on the leading coordinator among ``coordinator``
    ("A" or "A,B,C"). A redirect is followed at once; an unreachable coordinator
    (or one that knows no leader) makes the call try the next one, and again
    after LEADER_RETRY_S, for at most ``search_s`` -- only when there is
    another to try or an election is under way: one SQLite coordinator that
    cannot be reached fails at once, as before. A read a follower answered
    (from its copy of the store, without node liveness) is asked of the
    leader it names, and the follower's answer used only if the leader does
    not answer -- and when it names none, the other coordinators of the
    list are asked first (a leader cut from etcd keeps answering from a stale
    copy: tests/test_etcd_partition.py). Any other refusal is the call's error. NOTE: a mutating call
    retried after an UNAVAILABLE of unknown outcome may then be refused for
    what it did (CreateVolume: ALREADY_EXISTS)."""
    cs = coordinator_set(coordinator)
    deadline = time.monotonic() + search_s
    pending = cs.order()
    tried: set[str] = set()
    fallback: Any = None
    last: ClientError | None = None
    election = False
    while True:
        if not pending:
            if fallback is not None:
                return fallback
            assert last is not None
            if not (election or len(cs.order()) > 1) or time.monotonic() >= deadline:
                raise last
            await asyncio.sleep(LEADER_RETRY_S)
            pending, tried = cs.order(), set()
            continue
        address = pending.pop(0)
        tried.add(address)
        try:
            async with rpc.channel(address) as ch:
                call = getattr(pb_grpc.CoordinatorServiceStub(ch), method)(request, timeout=timeout_s)
                reply = await call
                md = await call.trailing_metadata()
        except grpc.RpcError as e:
            leader = redirect_of(e)
            err = ClientError.from_rpc(e, _coord_what(address, op))
            if err.code == grpc.StatusCode.UNAVAILABLE and leader is None and not answered_by_server(e):
                err.what = f"cannot reach coordinator {address} ({op})"
                if tls_failure(err.message) and TLS_HINT not in err.message:
                    err.message = f"{err.message} {TLS_HINT}"
            last = err
            if leader:
                cs.leader = leader
                if leader not in tried:
                    pending = [leader] + [a for a in pending if a != leader]
                election = True
                continue
            if leader == "" or err.code == grpc.StatusCode.UNAVAILABLE:
                election = election or leader == ""
                if cs.leader == address:
                    cs.leader = None
                continue
            raise err from None
        leader = _metadata(md, LEADER_METADATA_KEY)
        if _metadata(md, ROLE_METADATA_KEY) == "follower":
            # A follower's copy of the store (no node liveness; stale if it is
            # cut from etcd): used only when no leader answers. Ask the leader
            # it names first, then every other coordinator of the list.
            if fallback is None:
                fallback = reply
            if cs.leader == address:
                cs.leader = None
            if leader and leader != address and leader not in tried:
                cs.leader = leader
                pending = [leader] + [a for a in pending if a != leader]
            continue
        cs.leader = address
        return reply


async def coordinator_info(
    coordinator: str, *, timeout_s: float = rpc.DEFAULT_RPC_TIMEOUT_S
) -> list[dict[str, Any]]:
    """``CoordinatorService.CoordinatorInfo`` of EVERY coordinator named (no
    redirect): ``[{address, state: leader|follower|unreachable, leader, store,
    why_not_leader | error}]``, in the order named (``syncrep status``)."""

    async def one(address: str) -> dict[str, Any]:
        try:
            async with rpc.channel(address) as ch:
                reply = await _coord_call(
                    address, "CoordinatorInfo",
                    pb_grpc.CoordinatorServiceStub(ch).CoordinatorInfo(pb.CoordinatorInfoRequest(), timeout=timeout_s),
                )
        except ClientError as e:
            return {"address": address, "state": "unreachable", "error": str(e)}
        return {
            "address": address,
            "state": "leader" if reply.is_leader else "follower",
            "leader": reply.leader or None,
            "store": reply.store,
            "why_not_leader": reply.why_not_leader or None,
        }

    return list(await asyncio.gather(*(one(a) for a in parse_address_list(coordinator))))


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
    return await _coord_rpc(coordinator, f"CreateVolume {name!r}", "CreateVolume", req, timeout_s=timeout_s)


async def get_volume(
    coordinator: str, name: str, *, timeout_s: float = rpc.DEFAULT_RPC_TIMEOUT_S
) -> pb.VolumeStatus:
    """``CoordinatorService.GetVolume``: the pair's state and where its primary is."""
    return await _coord_rpc(
        coordinator, f"GetVolume {name!r}", "GetVolume", pb.GetVolumeRequest(name=name), timeout_s=timeout_s
    )


async def list_volumes(
    coordinator: str, *, timeout_s: float = rpc.DEFAULT_RPC_TIMEOUT_S
) -> list[pb.VolumeStatus]:
    """``CoordinatorService.ListVolumes``."""
    reply = await _coord_rpc(
        coordinator, "ListVolumes", "ListVolumes", pb.ListVolumesRequest(), timeout_s=timeout_s
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
    return await _coord_rpc(
        coordinator, f"Promote {volume!r}{' --force' if force else ''}", "Promote", req, timeout_s=timeout_s
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
    return await _coord_rpc(coordinator, f"Switchover {volume!r}", "Switchover", req, timeout_s=timeout_s)


async def resolve(
    coordinator: str, volume: str, *, keep: str, dry_run: bool = False, timeout_s: float = PROMOTE_TIMEOUT_S
) -> pb.ResolveReply:
    """``CoordinatorService.Resolve``: end ``volume``'s split brain keeping the
    data of the replica at ``keep`` (docs/FAILOVER.md section 6). The other
    replica's writes since the common generation are discarded (kept in a
    snapshot on its node) and overwritten by a resync of changes only.
    ``dry_run``: only say what would be discarded."""
    req = pb.ResolveRequest(volume=volume, keep=keep, dry_run=dry_run)
    return await _coord_rpc(
        coordinator, f"Resolve {volume!r} --keep {keep}{' (dry run)' if dry_run else ''}", "Resolve", req, timeout_s=timeout_s
    )


async def grant(
    coordinator: str, user: str, volume: str, *, read_only: bool = False,
    timeout_s: float = rpc.DEFAULT_RPC_TIMEOUT_S,
) -> pb.GrantReply:
    """``CoordinatorService.Grant``: let ``user`` (a client certificate's CN)
    read ``volume`` and, unless ``read_only``, write it (admin only). The nodes
    apply it with their next heartbeat."""
    req = pb.GrantRequest(user=user, volume=volume, read_only=read_only)
    return await _coord_rpc(
        coordinator, f"Grant {user!r} on {volume!r}{' (read-only)' if read_only else ''}", "Grant", req, timeout_s=timeout_s
    )


async def revoke(
    coordinator: str, user: str, volume: str, *, timeout_s: float = rpc.DEFAULT_RPC_TIMEOUT_S
) -> pb.RevokeReply:
    """``CoordinatorService.Revoke``: take ``user``'s grant on ``volume`` away
    (NOT_FOUND if it had none)."""
    req = pb.RevokeRequest(user=user, volume=volume)
    return await _coord_rpc(coordinator, f"Revoke {user!r} on {volume!r}", "Revoke", req, timeout_s=timeout_s)


async def list_grants(
    coordinator: str, volume: str = "", *, timeout_s: float = rpc.DEFAULT_RPC_TIMEOUT_S
) -> list[pb.Grant]:
    """``CoordinatorService.ListGrants``: every grant, or ``volume``'s."""
    reply = await _coord_rpc(
        coordinator, f"ListGrants{f' {volume!r}' if volume else ''}", "ListGrants", pb.ListGrantsRequest(volume=volume), timeout_s=timeout_s
    )
    return list(reply.grants)


# ---------------------------------------------------------------- volume lifecycle (issue 13)


async def delete_volume(
    coordinator: str, name: str, *, timeout_s: float = PROMOTE_TIMEOUT_S
) -> pb.DeleteVolumeReply:
    """``CoordinatorService.DeleteVolume`` (admin): the pair record and its
    grants go, then both nodes remove their store (a node that is down keeps
    it, never served). Irreversible: the CLI asks first. Asked of the leading
    coordinator among ``coordinator`` ("A,B,C"), as every call here."""
    return await _coord_rpc(
        coordinator, f"DeleteVolume {name!r}", "DeleteVolume", pb.DeleteVolumeRequest(name=name),
        timeout_s=timeout_s,
    )


async def resize_volume(
    coordinator: str, name: str, size_bytes: int, *, timeout_s: float = PROMOTE_TIMEOUT_S
) -> pb.ResizeVolumeReply:
    """``CoordinatorService.ResizeVolume`` (admin): grow the volume online to
    ``size_bytes`` while in sync (refused otherwise, and when shrinking), on
    the leading coordinator among ``coordinator`` (idempotent: a retry after
    an answer lost with a dead leader finds it done)."""
    return await _coord_rpc(
        coordinator, f"ResizeVolume {name!r} to {size_bytes} bytes", "ResizeVolume",
        pb.ResizeVolumeRequest(name=name, size_bytes=size_bytes), timeout_s=timeout_s,
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
        # In split brain: what each side changed since the common generation.
        "split_brain": (
            {
                "common_generation": int(st.common_generation),
                "primary_changed_bytes": int(st.primary_changed_bytes),
                "secondary_changed_bytes": int(st.secondary_changed_bytes),
            }
            if st.common_generation
            else None
        ),
    }


# ---------------------------------------------------------------- events (issue 13)


#: ``watch_events`` on several coordinators (issue 12): how long it looks for
#: the (new) leader after the one it streamed from was lost -- an election
#: takes about 2 x the election TTL (5 s); beyond, the caller hears
#: UNAVAILABLE (``syncrep events`` then retries with its own backoff).
EVENTS_LEADER_SEARCH_S = 60.0
#: The backoff between two looks for the leader (tenacity's exponential
#: jitter): the first soon, none more than EVENTS_FOLLOW_MAX_S apart.
EVENTS_FOLLOW_INITIAL_S = 0.2
EVENTS_FOLLOW_MAX_S = 2.0
#: How often the coordinator streamed from is asked whether it still leads: a
#: deposed leader (or a follower) keeps the stream open but publishes nothing
#: (only the leader carries out changes), so the stream alone cannot tell.
EVENTS_LEADER_CHECK_S = 1.0
#: The bound of that question; a coordinator that does not answer it is lost.
EVENTS_LEADER_CHECK_TIMEOUT_S = 3.0
#: Codes of a stream that broke with its coordinator (anything else is an answer).
_LOST_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
               grpc.StatusCode.INTERNAL)


class _NoLeader(Exception):
    """No coordinator of the list leads now (each one's answer in the message)."""


class _Lost(Exception):
    """The coordinator a WatchEvents stream came from died, ended it, or no longer leads."""


async def _leader_now(coordinator: str) -> str:
    """The address of the coordinator of ``coordinator`` (a list) that leads
    now, asked of every one (CoordinatorInfo); _NoLeader saying what each said."""
    infos = await coordinator_info(coordinator, timeout_s=EVENTS_LEADER_CHECK_TIMEOUT_S)
    for info in infos:
        if info["state"] == "leader":
            return str(info["address"])
    said = "; ".join(
        f"{i['address']}: {i['state']}"
        + (f" ({' '.join(str(i.get('error') or i.get('why_not_leader') or '').split())})"
           if i.get("error") or i.get("why_not_leader") else "")
        for i in infos
    )
    raise _NoLeader(f"no coordinator of {coordinator} leads now: {said}")


async def _find_leader(coordinator: str, search_s: float) -> str:
    """``_leader_now``, again with bounded backoff (tenacity) for at most
    ``search_s``; then ClientError UNAVAILABLE with the last answers."""
    from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

    retrying = AsyncRetrying(
        stop=stop_after_delay(search_s),
        wait=wait_exponential_jitter(initial=EVENTS_FOLLOW_INITIAL_S, max=EVENTS_FOLLOW_MAX_S),
        retry=retry_if_exception_type(_NoLeader),
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                leader = await _leader_now(coordinator)
    except _NoLeader as e:
        raise ClientError(grpc.StatusCode.UNAVAILABLE, f"{e} (looked for {search_s:g} s)",
                          what=f"WatchEvents on coordinators {coordinator}") from None
    coordinator_set(coordinator).leader = leader
    return leader


async def _stream_events(
    coordinator: str, volume: str, *, now: bool, timeout_s: float | None, check_leader: bool
) -> AsyncIterator[pb.Event]:
    """One WatchEvents stream from ``coordinator`` (one address). Its errors
    are ClientErrors. ``check_leader``: also ask it every
    EVENTS_LEADER_CHECK_S whether it still leads; a stream that breaks with
    its coordinator (``_LOST_CODES``), ends without a "dropped" event, or
    comes from one that no longer leads raises ``_Lost`` saying which."""
    what = f"WatchEvents{f' {volume!r}' if volume else ''}{' --now' if now else ''}"
    async with rpc.channel(coordinator) as ch:
        stub = pb_grpc.CoordinatorServiceStub(ch)
        call = stub.WatchEvents(pb.WatchEventsRequest(volume=volume, now=now), timeout=timeout_s)
        # The stream is read by a task of its own, so that a deposed leader's
        # silence can be cut short; a bounded queue keeps gRPC's flow control
        # (a slow reader still falls behind on the coordinator: "dropped").
        queue: asyncio.Queue[pb.Event | BaseException | None] = asyncio.Queue(maxsize=64)
        lost: asyncio.Future[_Lost] = asyncio.get_running_loop().create_future()

        async def read() -> None:
            try:
                async for ev in call:
                    await queue.put(ev)
                await queue.put(None)
            except grpc.RpcError as e:
                err = ClientError.from_rpc(e, _coord_what(coordinator, what))
                if err.code == grpc.StatusCode.UNAVAILABLE and not answered_by_server(e):
                    err.what = f"cannot reach coordinator {coordinator} ({what})"
                    if tls_failure(err.message) and TLS_HINT not in err.message:
                        err.message = f"{err.message} {TLS_HINT}"
                await queue.put(err)

        async def still_leads() -> None:
            while True:
                await asyncio.sleep(EVENTS_LEADER_CHECK_S)
                try:
                    reply = await _coord_call(
                        coordinator, "CoordinatorInfo",
                        stub.CoordinatorInfo(pb.CoordinatorInfoRequest(), timeout=EVENTS_LEADER_CHECK_TIMEOUT_S),
                    )
                except ClientError as e:
                    lost.set_result(_Lost(f"it does not answer whether it leads: {e}"))
                    return
                if not reply.is_leader:
                    why = " ".join((reply.why_not_leader or "").split())
                    lost.set_result(_Lost(f"it no longer leads{f': {why}' if why else ''}"
                                          f"{f'; it names {reply.leader}' if reply.leader else ''}"))
                    return

        tasks = [asyncio.ensure_future(read())]
        if check_leader:
            tasks.append(asyncio.ensure_future(still_leads()))
        dropped = False
        try:
            while True:
                get = asyncio.ensure_future(queue.get())
                waiters: set[asyncio.Future[Any]] = {get, lost}
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    raise lost.result()
                item = get.result()
                if isinstance(item, pb.Event):
                    dropped = item.kind == "dropped"
                    yield item
                    continue
                if item is None:
                    if check_leader and not dropped and not now:
                        raise _Lost("it ended the event stream")
                    return
                if check_leader and isinstance(item, ClientError) and item.code in _LOST_CODES:
                    raise _Lost(" ".join(str(item).split()))
                raise item
        finally:
            for t in tasks:
                t.cancel()
            call.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t


async def watch_events(
    coordinator: str,
    volume: str = "",
    *,
    now: bool = False,
    timeout_s: float | None = None,
    on_follow: Callable[[str], object] | None = None,
    search_s: float = EVENTS_LEADER_SEARCH_S,
) -> AsyncIterator[pb.Event]:
    """``CoordinatorService.WatchEvents``: the current state of every volume
    (or ``volume``'s), then, unless ``now``, every change until the caller
    stops iterating, the coordinator goes away (:class:`ClientError`
    UNAVAILABLE) or this subscriber falls behind (a last event of kind
    "dropped", then the end). ``timeout_s`` bounds the whole call (default:
    none when following, ``DEFAULT_RPC_TIMEOUT_S`` with ``now``).

    Several coordinators (``"A,B,C"``, issue 12): the events come from the
    leader -- a follower answers WatchEvents with its copy's current state
    and then nothing, since only the leader carries out (and publishes)
    changes. When the leader streamed from dies, ends the stream or no longer
    leads (asked every EVENTS_LEADER_CHECK_S), the new leader is looked for
    with bounded backoff (at most ``search_s``, then ClientError
    UNAVAILABLE), ``on_follow`` is given one line saying so (default: a
    WARNING log line), and the stream goes on from it, starting again with
    the current state of every volume (what changed meanwhile shows there)."""
    if timeout_s is None and now:
        timeout_s = rpc.DEFAULT_RPC_TIMEOUT_S
    if len(parse_address_list(coordinator)) < 2:
        async for ev in _stream_events(coordinator, volume, now=now, timeout_s=timeout_s, check_leader=False):
            yield ev
        return
    say = on_follow or (lambda line: log.warning("%s", line))
    if now:  # one answer wanted: no longer than any other command looks for the leader
        search_s = min(search_s, LEADER_SEARCH_S)
    address = await _find_leader(coordinator, search_s)
    while True:
        try:
            async for ev in _stream_events(address, volume, now=now, timeout_s=timeout_s, check_leader=not now):
                yield ev
            return
        except _Lost as e:
            why = str(e)
        leader = await _find_leader(coordinator, search_s)
        say(f"events: coordinator {address} lost ({why}); following the leader {leader}")
        address = leader


def event_time_text(ts: float) -> str:
    """An event's time as ISO 8601 with the local timezone's offset, to the millisecond."""
    return datetime.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="milliseconds")


def _progress_dict(p: pb.ResyncProgress) -> dict[str, Any]:
    return {
        "bytes_done": int(p.bytes_done),
        "bytes_total": int(p.bytes_total),
        "rate_bytes_per_s": float(p.rate_bytes_per_s),
        "eta_s": float(p.eta_s),
        "round": int(p.round),
    }


def event_dict(ev: pb.Event) -> dict[str, Any]:
    """The JSON shape of one ``syncrep events --json`` line."""
    return {
        "time": event_time_text(ev.time_unix_s),
        "time_unix_s": float(ev.time_unix_s),
        "volume": ev.volume,
        "epoch": int(ev.epoch),
        "kind": ev.kind,
        "old": ev.old,
        "new": ev.new,
        "message": ev.message,
        "primary": ev.primary,
        "secondary": ev.secondary,
        "progress": _progress_dict(ev.progress) if ev.HasField("progress") else None,
        "seq": int(ev.seq),
    }


def event_line(ev: pb.Event) -> str:
    """One ``syncrep events`` line: time (with timezone), volume, epoch, kind,
    old -> new, and the message."""
    if ev.old and ev.new and ev.old != ev.new:
        change = f" {ev.old} -> {ev.new}"
    elif ev.new or ev.old:
        change = f" {ev.new or ev.old}"
    else:
        change = ""
    message = " ".join(ev.message.split())
    return f"{event_time_text(ev.time_unix_s)} {ev.volume or '-'} epoch {ev.epoch} {ev.kind}{change}" + (
        f": {message}" if message else ""
    )
