"""The NBD server's reader for the transmission phase: a buffered protocol
that takes the connection over from asyncio's ``StreamReader`` once the
handshake is done (issues 11 and 14).

Why: every WRITE payload crossed the event loop thread five times with a
``StreamReader`` (``recv`` into a new ``bytes``, ``bytearray.extend`` into the
reader's buffer, the slice and the ``bytes()`` of ``readexactly``, and the
``del`` that moves what is left to the front), and with TLS three more
(asyncio's SSL protocol copies what it receives into its memory BIO, decrypts
each 16 KiB record into a new ``bytes`` and joins them). The profile of
``bench/bench_nbd.py``'s 1 MiB cell (py-spy ``--native`` on the primary,
docs/PERF.md, "NBD transmission") showed the loop thread saturated, a quarter
of its time in those copies. An :class:`asyncio.BufferedProtocol` is handed
the free part of one buffer: the plaintext transport ``recv_into``\\s it and the
SSL transport decrypts into it directly (``SSLObject.read(n, buffer)``), and
:meth:`BufferedReader.readexactly` makes the one ``bytes`` the backend writes.

The handshake keeps the ``StreamReader``/``StreamWriter`` pair (option
haggling and ``NBD_OPT_STARTTLS`` use them; ``start_tls`` is a
``StreamWriter`` method). :meth:`BufferedReader.take_over` then swaps the
transport's protocol, moves whatever the client already pipelined out of the
old reader, and forwards write flow control and the end of the connection to
the old protocol, so ``StreamWriter.drain``, ``close`` and ``wait_closed``
keep working unchanged.

Bounds: the buffer starts at ``capacity_bytes``; it grows only to hold one
request the caller asked for whole (``readexactly(n)`` with ``n`` larger than
it; the server bounds ``n`` by ``NBD_MAX_REQUEST_BYTES``) and shrinks back
when emptied. Reading from the socket pauses while ``high_water_bytes`` or
more wait unread and nobody is waiting for more.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

#: The buffer a connection starts with (and shrinks back to).
READ_BUFFER_BYTES = 4 * 1024 * 1024
#: Reading from the socket pauses while this much waits unread (and nobody waits for more).
READ_HIGH_WATER_BYTES = 2 * 1024 * 1024
#: get_buffer moves the unread bytes to the front when less than this is free behind them.
_MIN_FREE_BYTES = 256 * 1024


class BufferedReader(asyncio.BufferedProtocol):
    """``readexactly`` over one growable buffer the transport writes into."""

    def __init__(self, transport: asyncio.BaseTransport, old: asyncio.BaseProtocol, *,
                 capacity_bytes: int = READ_BUFFER_BYTES, high_water_bytes: int = READ_HIGH_WATER_BYTES,
                 over_ssl: bool = False) -> None:
        assert capacity_bytes >= 2 * _MIN_FREE_BYTES and 0 < high_water_bytes <= capacity_bytes
        # Both transports syncrep's server hands over (selector socket, SSL) can pause reading.
        self._transport = cast(asyncio.ReadTransport, transport)
        self._old = old
        self._base_capacity = capacity_bytes
        self._high_water = high_water_bytes
        self._over_ssl = over_ssl
        self._buf = bytearray(capacity_bytes)
        self._mv = memoryview(self._buf)
        self._start = 0  # unread bytes are _buf[_start:_end]
        self._end = 0
        self._want = 0  # bytes the waiting readexactly needs (0: nobody waits)
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._exc: BaseException | None = None
        self._paused = False

    @classmethod
    def take_over(cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  **kwargs: Any) -> BufferedReader:
        """Swap ``writer``'s transport over to a new reader; ``reader`` is not
        to be used again. Bytes it had buffered and its EOF carry over."""
        transport = writer.transport
        old = transport.get_protocol()
        over_ssl = transport.get_extra_info("sslcontext") is not None
        self = cls(transport, old, over_ssl=over_ssl, **kwargs)
        # The StreamReader's unread bytes: what a client pipelined behind the
        # handshake's last option. ``_buffer`` is private to asyncio but has
        # been a bytearray since 3.4; checked rather than trusted.
        pending = getattr(reader, "_buffer", None)
        if not isinstance(pending, bytearray):
            raise RuntimeError("asyncio.StreamReader changed: cannot take its buffered bytes over")
        if pending:
            self._reserve(len(pending))
            self._mv[:len(pending)] = pending
            self._end = len(pending)
            pending.clear()
        exc = reader.exception()
        if exc is not None:
            self._exc = exc
        if reader.at_eof() or getattr(reader, "_eof", False):
            self._eof = True
        transport.set_protocol(self)
        # The StreamReader may have paused reading (its buffer over its limit); this reader decides now.
        if not self._transport.is_reading() and not self._eof:
            self._transport.resume_reading()
        return self

    # ------------------------------------------------------------ the caller's side

    def available(self) -> int:
        return self._end - self._start

    async def readexactly(self, n: int) -> bytes:
        """The next ``n`` bytes. IncompleteReadError (with what there was) at
        EOF first; the transport's error if the connection was lost with one."""
        if n < 0:
            raise ValueError("readexactly size can not be less than zero")
        while self._end - self._start < n:
            if self._exc is not None:
                raise self._exc
            if self._eof:
                partial = bytes(self._mv[self._start:self._end])
                self._start = self._end = 0
                raise asyncio.IncompleteReadError(partial, n)
            if self._waiter is not None:
                raise RuntimeError("readexactly() called while another coroutine is already waiting for data")
            self._reserve(n)
            self._want = n
            if self._paused:
                self._paused = False
                self._transport.resume_reading()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
                self._want = 0
        data = bytes(self._mv[self._start:self._start + n])
        self._start += n
        if self._start == self._end:
            self._start = self._end = 0
            if len(self._buf) > self._base_capacity:  # grown for one large request: give it back
                self._buf = bytearray(self._base_capacity)
                self._mv = memoryview(self._buf)
        if self._paused and self._end - self._start < self._high_water // 2:
            self._paused = False
            self._transport.resume_reading()
        return data

    def _reserve(self, n: int) -> None:
        """Make room for ``n`` unread bytes from ``_start``: compact, or grow."""
        unread = self._end - self._start
        if self._start + n <= len(self._buf) and len(self._buf) - self._end >= _MIN_FREE_BYTES:
            return
        size = len(self._buf)
        if n > size or unread + _MIN_FREE_BYTES > size:
            size = max(n, unread) + _MIN_FREE_BYTES
        if size != len(self._buf):
            new = bytearray(size)
            new[:unread] = self._mv[self._start:self._end]
            self._buf, self._mv = new, memoryview(new)
        elif self._start:
            # Overlapping ranges: copy through a temporary (rare and at most one request's worth).
            self._mv[:unread] = bytes(self._mv[self._start:self._end])
        self._start, self._end = 0, unread

    # ------------------------------------------------------------ the transport's side

    def get_buffer(self, sizehint: int) -> memoryview:
        if len(self._buf) - self._end < _MIN_FREE_BYTES:
            self._reserve(self._want)
        return self._mv[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        unread = self._end - self._start
        if self._waiter is not None:
            if unread >= self._want and not self._waiter.done():
                self._waiter.set_result(None)
        elif unread >= self._high_water and not self._paused:
            self._paused = True
            self._transport.pause_reading()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        # As StreamReaderProtocol: keep a plaintext socket half open (replies still go out);
        # asyncio's SSL transport ignores the answer and warns about True.
        return not self._over_ssl

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        if exc is not None:
            self._exc = exc
        self._wake()
        # The StreamWriter waits on the old protocol (drain, wait_closed).
        self._old.connection_lost(exc)

    def pause_writing(self) -> None:
        self._old.pause_writing()

    def resume_writing(self) -> None:
        self._old.resume_writing()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
