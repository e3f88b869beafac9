"""NBD export of replicated volumes, end to end.

Part 1 — the server in this process against an in-memory backend, driven by a
small NBD client written from syncrep.nbd.protocol (no external tools): the
handshake options, unaligned I/O by read-modify-write, pipelining with
out-of-order replies and the in-flight bound, FLUSH ordering, error codes, and
a malformed handshake or request closing only its own connection.

Part 2 — a real cluster (coordinator, primary, secondary as processes) with
``--nbd-listen`` on both nodes, driven by the real tools: nbdinfo, qemu-img
convert/compare, nbdcopy both ways, fio --ioengine=nbd with crc32c verify
(also with the secondary killed mid-run, then restarted and resynced), the
secondary's read-only exports (live copy and VOLUME@SNAPSHOT), and
``syncrep verify`` to show the replicas are identical. Tests skip with the
reason when a tool is missing (scripts/setup.sh installs them); the
nbd-client test skips unless /dev/nbd* exists or ``modprobe nbd`` works.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until

from deploy.cluster import LocalCluster, free_port
from syncrep import client as sc
from syncrep.nbd import protocol as p
from syncrep.nbd.server import Backend, NbdServer, StaticExports
from syncrep.pb import syncrep_pb2 as pb
from syncrep.pb import syncrep_pb2_grpc as pbg

REPO = Path(__file__).resolve().parent.parent
KiB = 1024
MiB = 1024 * KiB
VOLUME = "vol0"
NBD_VOLUME_SIZE = 64 * MiB
TOOL_HINT = "install it with scripts/setup.sh (Debian: apt-get install qemu-utils libnbd-bin fio)"


# ================================================================ a minimal NBD client


class NbdClient:
    """Fixed-newstyle client: NBD_OPT_GO, then pipelined requests matched by handle."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.size = 0
        self.flags = 0
        self.block_sizes: tuple[int, ...] = ()
        self._handles = iter(range(1, 1 << 62))
        self._pending: dict[int, tuple[asyncio.Future[tuple[int, bytes]], int]] = {}
        self._reader_task: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    @classmethod
    async def open(cls, host: str, port: int, export: str, *, ask_block_size: bool = True) -> NbdClient:
        reader, writer = await asyncio.open_connection(host, port)
        c = cls(reader, writer)
        await c._go(export, ask_block_size)
        c._reader_task = asyncio.create_task(c._read_replies())
        return c

    async def _go(self, export: str, ask_block_size: bool) -> None:
        p.parse_greeting(await self.reader.readexactly(p.GREETING_BYTES))
        self.writer.write(p.pack_client_flags())
        infos = (p.INFO_BLOCK_SIZE,) if ask_block_size else ()
        self.writer.write(p.pack_option(p.OPT_GO, p.pack_info_request(export, infos)))
        while True:
            hdr, data = await read_option_reply(self.reader)
            if hdr.is_error:
                raise OSError(f"NBD_OPT_GO {export!r}: error 0x{hdr.reply_type:x}: {data.decode()}")
            if hdr.reply_type == p.REP_ACK:
                return
            kind, val = p.parse_info_reply(data)
            if kind == p.INFO_EXPORT:
                assert isinstance(val, tuple)
                self.size, self.flags = val
            elif kind == p.INFO_BLOCK_SIZE:
                assert isinstance(val, tuple)
                self.block_sizes = val

    async def _read_replies(self) -> None:
        try:
            while True:
                err, handle = p.parse_simple_reply(await self.reader.readexactly(p.SIMPLE_REPLY_BYTES))
                fut, read_len = self._pending.pop(handle)
                data = await self.reader.readexactly(read_len) if read_len and not err else b""
                fut.set_result((err, data))
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            for fut, _ in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionError(f"connection closed: {e!r}"))
        finally:
            self.closed.set()

    def submit(self, kind: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0
               ) -> asyncio.Future[tuple[int, bytes]]:
        """Send a request now (requests go on the wire in the order of these
        calls); the future resolves with (error, data) when its reply is read."""
        handle = next(self._handles)
        fut: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self._pending[handle] = (fut, length if kind == p.CMD_READ else 0)
        if kind == p.CMD_WRITE:
            length = len(data)
        self.writer.write(p.pack_request(kind, handle, offset, length, flags) + data)
        return fut

    async def request(self, kind: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0
                      ) -> tuple[int, bytes]:
        fut = self.submit(kind, offset, length, data, flags)
        await self.writer.drain()
        return await fut

    async def read(self, offset: int, length: int) -> bytes:
        err, data = await self.request(p.CMD_READ, offset, length)
        assert err == 0, f"READ {length}@{offset}: error {p.ERROR_NAMES.get(err, err)}"
        return data

    async def write(self, offset: int, data: bytes, flags: int = 0) -> None:
        err, _ = await self.request(p.CMD_WRITE, offset, data=data, flags=flags)
        assert err == 0, f"WRITE {len(data)}@{offset}: error {p.ERROR_NAMES.get(err, err)}"

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(p.pack_request(p.CMD_DISC, 0))
            await self.writer.drain()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.closed.wait(), 5.0)
        if self._reader_task is not None:
            self._reader_task.cancel()
        self.writer.close()


async def read_option_reply(reader: asyncio.StreamReader) -> tuple[p.OptionReplyHeader, bytes]:
    hdr = p.parse_option_reply_header(await reader.readexactly(p.OPTION_REPLY_HEADER_BYTES))
    data = await reader.readexactly(hdr.length) if hdr.length else b""
    return hdr, data


async def closed_by_server(reader: asyncio.StreamReader, timeout_s: float = 5.0) -> bool:
    """True when the server closes the connection (EOF) within ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            while await reader.read(65536):
                pass  # option replies sent before the server gave up
        return True
    except ConnectionError:
        return True  # reset: closed as well
    except TimeoutError:
        return False


# ================================================================ part 1: in-process server


class MemBackend(Backend):
    """A volume in memory. Checks that the server only passes aligned,
    bounded I/O, and records the peak number of concurrent calls and every
    call on arrival (``arrivals``: (kind, offset, length), before any gate).

    While ``gate`` is an unset Event every read and write waits for it there;
    ``write_gate`` holds writes only. Each call then sleeps a random fraction
    of ``delay_s`` (from ``rng``: seeded, so a run replays the same jitter)."""

    def __init__(self, name: str, size: int, block_size: int = 4096, *, read_only: bool = False,
                 delay_s: float = 0.0, rng: random.Random | None = None) -> None:
        self.name = name
        self.lock_key = name
        self.size = size
        self.block_size = block_size
        self.read_only = read_only
        self.description = f"memory volume {name}"
        self.buf = bytearray(size)
        self.delay_s = delay_s
        self.rng = rng or random.Random(0)
        self.active = 0
        self.peak = 0
        self.arrivals: list[tuple[str, int, int]] = []
        self.writes: list[tuple[int, int]] = []
        self.flushes = 0
        self.gate: asyncio.Event | None = None
        self.write_gate: asyncio.Event | None = None

    def _check(self, offset: int, length: int) -> None:
        bs = self.block_size
        assert offset % bs == 0 and length % bs == 0, (offset, length)
        assert 0 < length <= self.max_io_bytes and offset + length <= self.size, (offset, length)

    async def _io(self, kind: str, offset: int, length: int) -> None:
        self.arrivals.append((kind, offset, length))
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            for gate in (self.gate, self.write_gate if kind == "write" else None):
                if gate is not None:
                    await gate.wait()
            await asyncio.sleep(self.delay_s * self.rng.random())  # jitter (0: just a yield)
        finally:
            self.active -= 1

    async def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        await self._io("read", offset, length)
        return bytes(self.buf[offset:offset + length])

    async def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        await self._io("write", offset, len(data))
        self.buf[offset:offset + len(data)] = data
        self.writes.append((offset, len(data)))

    async def flush(self) -> None:
        self.flushes += 1


def reader_waits_for_a_slot(server: NbdServer) -> bool:
    """True when a connection's request reader is suspended in its in-flight
    budget (``slots.acquire``): it has read the next request's header and
    takes nothing more until a request in flight completes.

    White-box (``server._conns``, the reader task's await chain) on purpose:
    that the server admits no further request is a negative nothing outside it
    can observe (the next requests just stay unread), so the in-flight-bound
    test waits for this, then counts what reached the backend."""
    for conn in server._conns:
        task = conn.read_task
        if task is None or task.done():
            continue
        awaiting: Any = getattr(task.get_coro(), "cr_await", None)
        code = getattr(awaiting, "cr_code", None)
        if code is not None and code.co_name == "acquire" and awaiting.cr_frame.f_locals.get("self") is conn.slots:
            return True
    return False


async def refuses_connections(port: int) -> bool:
    """True when nothing listens on ``port`` any more (a connection still in the
    backlog when the listener closed is reset: that counts too)."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    writer.close()
    return False


@pytest.fixture
async def mem_server(seed: int) -> AsyncIterator[tuple[NbdServer, dict[str, MemBackend]]]:
    backends = {
        "mem": MemBackend("mem", 8 * MiB, delay_s=0.002, rng=random.Random(f"{seed}-jitter")),
        "ro": MemBackend("ro", 1 * MiB, read_only=True),
        "big": MemBackend("big", 64 * MiB),
    }
    backends["ro"].buf[:] = random.Random(f"{seed}-ro").randbytes(1 * MiB)
    server = NbdServer("127.0.0.1:0", StaticExports(backends))
    await server.start()
    try:
        yield server, backends
    finally:
        await server.stop()


async def test_handshake_list_info_and_go(mem_server: tuple[NbdServer, dict[str, MemBackend]]) -> None:
    server, _ = mem_server
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        assert p.parse_greeting(await reader.readexactly(18)) == p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES
        writer.write(p.pack_client_flags())
        # NBD_OPT_LIST: one NBD_REP_SERVER per export, then ACK.
        writer.write(p.pack_option(p.OPT_LIST))
        names = []
        while True:
            hdr, data = await read_option_reply(reader)
            if hdr.reply_type == p.REP_ACK:
                break
            assert hdr.reply_type == p.REP_SERVER
            names.append(p.parse_rep_server(data))
        assert names == ["big", "mem", "ro"]
        # NBD_OPT_LIST with data is invalid (and haggling goes on).
        writer.write(p.pack_option(p.OPT_LIST, b"x"))
        hdr, _ = await read_option_reply(reader)
        assert hdr.reply_type == p.REP_ERR_INVALID
        # Unknown export.
        writer.write(p.pack_option(p.OPT_INFO, p.pack_info_request("nope")))
        hdr, msg = await read_option_reply(reader)
        assert hdr.reply_type == p.REP_ERR_UNKNOWN and b"nope" in msg
        # Structured replies are offered (tests/test_nbd_block_status.py); TLS on a server
        # without it and an unknown option number are not.
        for opt, want in ((p.OPT_STRUCTURED_REPLY, p.REP_ACK), (p.OPT_STARTTLS, p.REP_ERR_POLICY),
                          (77, p.REP_ERR_UNSUP)):
            writer.write(p.pack_option(opt))
            hdr, _ = await read_option_reply(reader)
            assert (hdr.option, hdr.reply_type) == (opt, want)
        # Malformed NBD_OPT_INFO data.
        writer.write(p.pack_option(p.OPT_INFO, b"\0\0\0\x09ab"))
        hdr, _ = await read_option_reply(reader)
        assert hdr.reply_type == p.REP_ERR_INVALID
        # NBD_OPT_INFO: export info, block sizes, name and description on request.
        writer.write(p.pack_option(p.OPT_INFO, p.pack_info_request(
            "ro", (p.INFO_BLOCK_SIZE, p.INFO_NAME, p.INFO_DESCRIPTION))))
        infos: dict[int, Any] = {}
        while True:
            hdr, data = await read_option_reply(reader)
            if hdr.reply_type == p.REP_ACK:
                break
            kind, val = p.parse_info_reply(data)
            infos[kind] = val
        assert infos[p.INFO_EXPORT] == (1 * MiB, p.transmission_flags(read_only=True))
        assert infos[p.INFO_BLOCK_SIZE] == (4096, 4096, 4 * MiB)
        assert infos[p.INFO_NAME] == "ro" and "memory" in infos[p.INFO_DESCRIPTION]
        # NBD_OPT_ABORT: ACK, then the server closes.
        writer.write(p.pack_option(p.OPT_ABORT))
        hdr, _ = await read_option_reply(reader)
        assert hdr.reply_type == p.REP_ACK
        assert await reader.read() == b""
    finally:
        writer.close()


async def test_export_name_option_enters_transmission(mem_server: tuple[NbdServer, dict[str, MemBackend]]) -> None:
    server, backends = mem_server
    backends["mem"].buf[:4096] = b"\x5a" * 4096
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        await reader.readexactly(18)
        writer.write(p.pack_client_flags(p.FLAG_C_FIXED_NEWSTYLE))  # no NO_ZEROES: 124 zero bytes follow
        writer.write(p.pack_option(p.OPT_EXPORT_NAME, b"mem"))
        size, flags = struct.unpack(">QH", await reader.readexactly(10))
        assert size == 8 * MiB and flags == p.transmission_flags(read_only=False)
        assert await reader.readexactly(124) == bytes(124)
        writer.write(p.pack_request(p.CMD_READ, 7, 0, 4096))
        assert p.parse_simple_reply(await reader.readexactly(16)) == (0, 7)
        assert await reader.readexactly(4096) == b"\x5a" * 4096
    finally:
        writer.close()


async def test_export_name_of_unknown_export_closes(mem_server: tuple[NbdServer, dict[str, MemBackend]]) -> None:
    server, _ = mem_server
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    await reader.readexactly(18)
    writer.write(p.pack_client_flags() + p.pack_option(p.OPT_EXPORT_NAME, b"nope"))
    assert await reader.read() == b""  # the session MUST end: no way to send an error
    writer.close()


async def test_unaligned_io_is_read_modify_write(mem_server: tuple[NbdServer, dict[str, MemBackend]],
                                                  seed: int) -> None:
    """Random unaligned reads, writes, TRIMs and WRITE_ZEROES, many in flight,
    disjoint per round: the export always equals a byte-level model."""
    server, backends = mem_server
    b = backends["mem"]
    rng = random.Random(seed)
    model = bytearray(rng.randbytes(b.size))
    b.buf[:] = model
    c = await NbdClient.open("127.0.0.1", server.port, "mem", ask_block_size=False)
    try:
        assert c.block_sizes[0] == 1  # did not ask: minimum 1, the server handles any alignment
        for _ in range(6):
            # Disjoint random requests (unordered in flight), checked against the model after each round.
            cuts = sorted(rng.sample(range(0, b.size), 40))
            reqs = []
            for lo, hi in zip(cuts[::2], cuts[1::2], strict=True):
                hi = min(hi, lo + 300 * KiB)
                kind = rng.choice([p.CMD_WRITE, p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES, p.CMD_READ])
                if kind == p.CMD_WRITE:
                    data = rng.randbytes(hi - lo)
                    model[lo:hi] = data
                    reqs.append(c.request(kind, lo, data=data, flags=rng.choice([0, p.CMD_FLAG_FUA])))
                elif kind == p.CMD_READ:
                    expect = bytes(model[lo:hi])
                    reqs.append(_expect_read(c, lo, hi - lo, expect))
                else:
                    model[lo:hi] = bytes(hi - lo)
                    reqs.append(c.request(kind, lo, hi - lo))
            for err, _ in await asyncio.gather(*reqs):
                assert err == 0
            assert b.buf == model
            assert await c.read(0, b.size) == bytes(model)  # 8 MiB: split into 4 MiB backend reads
        # Tiny edge cases: one byte, a block boundary straddle, the last byte.
        for off, n in ((0, 1), (4095, 2), (b.size - 1, 1), (12345, 4096 * 3 + 7)):
            data = rng.randbytes(n)
            await c.write(off, data)
            model[off:off + n] = data
            assert await c.read(off, n) == data
        assert b.buf == model
    finally:
        await c.close()


async def _expect_read(c: NbdClient, off: int, n: int, expect: bytes) -> tuple[int, bytes]:
    err, data = await c.request(p.CMD_READ, off, n)
    assert err == 0 and data == expect, f"READ {n}@{off} differs"
    return err, data


async def test_overlapping_unaligned_writes_from_two_connections_do_not_tear(
    mem_server: tuple[NbdServer, dict[str, MemBackend]],
) -> None:
    """Two clients write disjoint byte ranges of the SAME blocks concurrently;
    the per-volume range lock serialises the read-modify-writes, so both land."""
    server, backends = mem_server
    b = backends["mem"]
    b.buf[:] = bytes(b.size)
    c1 = await NbdClient.open("127.0.0.1", server.port, "mem")
    c2 = await NbdClient.open("127.0.0.1", server.port, "mem")
    try:
        jobs = []
        for blk in range(64):
            base = blk * 4096
            jobs.append(c1.write(base + 10, b"\x11" * 1000))
            jobs.append(c2.write(base + 2000, b"\x22" * 1000))
        await asyncio.gather(*jobs)
        for blk in range(64):
            base = blk * 4096
            assert b.buf[base + 10:base + 1010] == b"\x11" * 1000
            assert b.buf[base + 2000:base + 3000] == b"\x22" * 1000
    finally:
        await c1.close()
        await c2.close()


async def test_pipelined_requests_complete_out_of_order_and_in_flight_is_bounded() -> None:
    b = MemBackend("mem", 16 * MiB)
    b.gate = asyncio.Event()
    server = NbdServer("127.0.0.1:0", StaticExports({"mem": b}), max_inflight=8)
    await server.start()
    c = await NbdClient.open("127.0.0.1", server.port, "mem")
    try:
        jobs = [asyncio.create_task(c.write(i * 4096, bytes([i % 251]) * 4096)) for i in range(40)]
        # Once the reader waits for a slot with the gate shut, nothing more can reach the backend.
        await wait_until(lambda: reader_waits_for_a_slot(server) and b.active >= 8,
                         "the server held requests in the backend and stopped reading the rest")
        assert b.active == 8, "the server must hold at most max_inflight requests of a connection"
        assert len(b.arrivals) == 8 and b.peak == 8
        b.gate.set()
        await asyncio.gather(*jobs)
        assert b.peak == 8
        # Replies come back in completion order: a write held in the backend does not hold up a later read.
        b.gate = None
        b.write_gate = asyncio.Event()
        n = len(b.arrivals)
        slow = asyncio.create_task(c.write(0, b"\1" * 4096))
        await wait_until(lambda: len(b.arrivals) > n, "the slow write reached the backend")
        assert await c.read(8192, 4096) == bytes([2]) * 4096
        assert not slow.done(), "the write is still held in the backend"
        b.write_gate.set()
        await slow
        assert b.buf[:4096] == b"\1" * 4096
    finally:
        await c.close()
        await server.stop()


async def test_flush_waits_for_writes_received_before_it() -> None:
    b = MemBackend("mem", 4 * MiB)
    b.write_gate = asyncio.Event()
    server = NbdServer("127.0.0.1:0", StaticExports({"mem": b}))
    await server.start()
    c = await NbdClient.open("127.0.0.1", server.port, "mem")
    try:
        w = asyncio.create_task(c.write(0, b"\7" * 4096))
        await wait_until(lambda: b.active == 1, "the write reached the backend (held there)")
        f = c.submit(p.CMD_FLUSH)
        # A READ sent after the FLUSH (requests are read in order): its reply proves the
        # server has the FLUSH, and a FLUSH reply sent before it would have been read first.
        assert await c.submit(p.CMD_READ, 8192, 4096) == (0, bytes(4096))
        assert not f.done() and b.flushes == 0, "FLUSH replied before an earlier write completed"
        b.write_gate.set()
        await w
        assert await f == (0, b"") and b.flushes == 1
        # FUA: the write's own flush happens before its reply.
        await c.write(4096, b"\1" * 4096, flags=p.CMD_FLAG_FUA)
        assert b.flushes == 2
    finally:
        await c.close()
        await server.stop()


async def test_error_codes(mem_server: tuple[NbdServer, dict[str, MemBackend]]) -> None:
    """Faults: writes to a read-only export, I/O past the end, unsupported commands and flags."""
    server, backends = mem_server
    ro = await NbdClient.open("127.0.0.1", server.port, "ro")
    rw = await NbdClient.open("127.0.0.1", server.port, "mem")
    try:
        assert ro.flags & p.FLAG_READ_ONLY
        assert await ro.read(0, 4096) == bytes(backends["ro"].buf[:4096])
        assert (await ro.request(p.CMD_WRITE, 0, data=b"x" * 4096))[0] == p.EPERM
        assert (await ro.request(p.CMD_TRIM, 0, 4096))[0] == p.EPERM
        assert (await ro.request(p.CMD_WRITE_ZEROES, 0, 4096))[0] == p.EPERM
        assert (await ro.request(p.CMD_FLUSH))[0] == 0
        assert (await rw.request(p.CMD_WRITE, 8 * MiB - 4096, data=b"x" * 8192))[0] == p.ENOSPC
        assert (await rw.request(p.CMD_READ, 8 * MiB, 1))[0] == p.EINVAL
        assert (await rw.request(p.CMD_BLOCK_STATUS, 0, 4096))[0] == p.EINVAL
        assert (await rw.request(p.CMD_CACHE, 0, 4096))[0] == p.EINVAL
        assert (await rw.request(p.CMD_READ, 0, 4096, flags=p.CMD_FLAG_DF))[0] == p.EINVAL
        assert (await rw.request(p.CMD_READ, 0, 33 * MiB))[0] == p.EINVAL
        # The connection survives all of that.
        assert await rw.read(0, 4096) == bytes(backends["mem"].buf[:4096])
        assert backends["ro"].writes == []
    finally:
        await ro.close()
        await rw.close()


@pytest.mark.parametrize(
    "garbage, eof",
    [
        pytest.param(struct.pack(">I", 0xFFFF0000), False, id="bad-client-flags"),
        pytest.param(p.pack_client_flags() + b"NOTMAGIC" + bytes(8), False, id="bad-option-magic"),
        pytest.param(p.pack_client_flags() + struct.pack(">QII", p.IHAVEOPT, p.OPT_GO, 100) + b"x" * 10, True,
                     id="truncated-option"),
        pytest.param(p.pack_client_flags() + struct.pack(">QII", p.IHAVEOPT, p.OPT_GO, 1 << 30), False,
                     id="huge-option"),
        pytest.param(p.pack_client_flags(0) + p.pack_option(p.OPT_LIST), False,
                     id="list-without-fixed-newstyle"),
        pytest.param(p.pack_client_flags() + p.pack_option(p.OPT_EXPORT_NAME, b"\xff\xfe"), False,
                     id="export-name-not-utf8"),
    ],
)
async def test_malformed_handshake_closes_only_that_connection(
    mem_server: tuple[NbdServer, dict[str, MemBackend]], garbage: bytes, eof: bool,
) -> None:
    """Fault: a second client sends a malformed handshake (``garbage``)."""
    server, backends = mem_server
    good = await NbdClient.open("127.0.0.1", server.port, "mem")
    try:
        await good.write(0, b"\3" * 4096)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        await reader.readexactly(18)
        writer.write(garbage)
        if eof:
            writer.write_eof()  # the truncated option never completes
        assert await closed_by_server(reader)
        writer.close()
        # The other client and the volume are untouched.
        assert await good.read(0, 4096) == b"\3" * 4096
        await good.write(4096, b"\4" * 4096)
        assert backends["mem"].buf[4096:8192] == b"\4" * 4096
    finally:
        await good.close()


async def test_malformed_request_closes_only_that_connection(
    mem_server: tuple[NbdServer, dict[str, MemBackend]], caplog: pytest.LogCaptureFixture
) -> None:
    """Fault: one client sends a request header with a bad magic."""
    server, _ = mem_server
    bad = await NbdClient.open("127.0.0.1", server.port, "mem")
    good = await NbdClient.open("127.0.0.1", server.port, "mem")
    try:
        bad.writer.write(b"\xde\xad\xbe\xef" + bytes(24))
        await asyncio.wait_for(bad.closed.wait(), 5.0)
        assert "protocol violation" in caplog.text and "bad request magic" in caplog.text
        await good.write(0, b"\5" * 4096)
        assert await good.read(0, 4096) == b"\5" * 4096
    finally:
        await bad.close()
        await good.close()


async def test_stop_finishes_in_flight_requests() -> None:
    """Fault: the server is stopped while a write is held in the backend."""
    b = MemBackend("mem", 4 * MiB)
    b.gate = asyncio.Event()
    server = NbdServer("127.0.0.1:0", StaticExports({"mem": b}))
    await server.start()
    c = await NbdClient.open("127.0.0.1", server.port, "mem")
    w = asyncio.create_task(c.request(p.CMD_WRITE, 0, data=b"\x09" * 4096))
    await wait_until(lambda: b.active == 1, "the write reached the backend (held at the gate)")
    stopping = asyncio.create_task(server.stop())
    # stop() closes the listener and cancels the connection's reader in one step.
    await wait_until(lambda: refuses_connections(server.port), "the stopping server closed its listener")
    assert not w.done()
    b.gate.set()
    assert await w == (0, b"")  # replied before the connection closed
    await stopping
    await asyncio.wait_for(c.closed.wait(), 5.0)
    assert b.buf[:4096] == b"\x09" * 4096


async def test_unix_socket(tmp_path: Path) -> None:
    b = MemBackend("mem", 1 * MiB)
    sock = tmp_path / "nbd.sock"
    server = NbdServer(f"unix:{sock}", StaticExports({"mem": b}))
    await server.start()
    try:
        reader, writer = await asyncio.open_unix_connection(str(sock))
        c = NbdClient(reader, writer)
        await c._go("mem", True)
        c._reader_task = asyncio.create_task(c._read_replies())
        await c.write(0, b"u" * 4096)
        assert await c.read(0, 4096) == b"u" * 4096
        await c.close()
    finally:
        await server.stop()
    assert not sock.exists()


async def test_qemu_img_against_in_process_server(mem_server: tuple[NbdServer, dict[str, MemBackend]],
                                                  tmp_path: Path, seed: int) -> None:
    """The real client against the in-memory backend (fast; no cluster)."""
    need_tool("qemu-img")
    server, backends = mem_server
    src = tmp_path / "src.raw"
    src.write_bytes(random.Random(seed).randbytes(8 * MiB))
    url = f"nbd://127.0.0.1:{server.port}/mem"
    await run_tool("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), url)
    assert backends["mem"].buf == src.read_bytes()
    await run_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), url)


# ================================================================ part 2: a real cluster


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed; {TOOL_HINT}")
    if name == "fio":
        out = subprocess.run([path, "--enghelp=nbd"], capture_output=True, text=True).stdout
        if "uri" not in out:
            pytest.skip("this fio has no nbd ioengine (--ioengine=nbd); install Debian's fio >= 3.19")
    return path


async def run_tool(*argv: str, timeout_s: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{' '.join(argv)} did not finish within {timeout_s:g} s") from None
    r = subprocess.CompletedProcess(list(argv), proc.returncode or 0, out.decode(), err.decode())
    if check:
        assert r.returncode == 0, f"{' '.join(argv)} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


async def syncrep_verify(c: LocalCluster) -> subprocess.CompletedProcess[str]:
    """``python -m syncrep verify vol0 --coordinator ...``: exit 0 = replicas identical."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), env.get("PYTHONPATH", "")) if x)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "syncrep", "verify", VOLUME, "--coordinator", c.coordinator_addr,
        *c.security_args(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return subprocess.CompletedProcess([], proc.returncode or 0, out.decode(), err.decode())


async def assert_replicas_identical(c: LocalCluster) -> None:
    r = await syncrep_verify(c)
    assert r.returncode == 0, f"syncrep verify exited {r.returncode}:\n{r.stdout}\n{r.stderr}"


class NbdCluster:
    def __init__(self, cluster: LocalCluster, primary_port: int, secondary_port: int) -> None:
        self.c = cluster
        self.primary_port = primary_port
        self.secondary_port = secondary_port

    def url(self, node: str = "primary", export: str = VOLUME) -> str:
        port = self.primary_port if node == "primary" else self.secondary_port
        return f"nbd://127.0.0.1:{port}/{export}"


async def start_nbd_cluster(
    cluster_factory: Callable[..., LocalCluster], *node_args: str, size: int = NBD_VOLUME_SIZE
) -> NbdCluster:
    pp, sp = free_port(), free_port()
    # Plaintext: fio's and nbd-client's NBD clients here speak nbd://; TLS on the
    # export (nbds://, grants) is covered by tests/test_nbd_tls.py and tests/test_security_e2e.py.
    c = cluster_factory(
        primary_args=["--nbd-listen", f"127.0.0.1:{pp}", *node_args],
        secondary_args=["--nbd-listen", f"127.0.0.1:{sp}", *node_args],
        tls=False,
    )
    await c.start()
    await c.create_volume(VOLUME, size)
    return NbdCluster(c, pp, sp)


def fio_args(url: str, seed: int, *extra: str) -> list[str]:
    """Random writes, 4 KiB .. 1 MiB (bssplit), queue depth 16, crc32c verify of every block.
    A verify-only pass must use the seed of the pass that wrote."""
    return [
        "fio", "--name=nbd-verify", "--ioengine=nbd", f"--uri={url}", "--rw=randwrite",
        "--bssplit=4k/40:16k/20:64k/20:256k/10:1m/10", "--iodepth=16", f"--size={NBD_VOLUME_SIZE}",
        "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0", f"--randseed={seed}", *extra,
    ]


async def test_qemu_img_nbdcopy_and_nbdinfo_on_primary_and_secondary_exports(
    cluster_factory: Callable[..., LocalCluster], tmp_path: Path, seed: int
) -> None:
    """Faults: a write to the secondary's read-only export; a malformed handshake on the primary."""
    for tool in ("nbdinfo", "qemu-img", "nbdcopy"):
        need_tool(tool)
    n = await start_nbd_cluster(cluster_factory)

    # nbdinfo: right size, block sizes, read-write on the primary, read-only on the secondary.
    info = (await run_tool("nbdinfo", "--json", n.url("primary"))).stdout
    assert f'"export-size": {NBD_VOLUME_SIZE}' in info
    assert '"is_read_only": false' in info and '"block_size_minimum": 4096' in info
    info = (await run_tool("nbdinfo", "--json", n.url("secondary"))).stdout
    assert f'"export-size": {NBD_VOLUME_SIZE}' in info and '"is_read_only": true' in info
    listing = (await run_tool("nbdinfo", "--list", f"nbd://127.0.0.1:{n.primary_port}")).stdout
    assert 'export="vol0"' in listing

    # qemu-img convert of a random raw image into the primary's export, then compare
    # against the source on the primary's export and on the secondary's read-only one.
    src = tmp_path / "src.raw"
    rng = random.Random(f"{seed}-src")
    src.write_bytes(b"".join(  # some all-zero regions too
        rng.randbytes(MiB) if i % 4 != 3 else bytes(MiB) for i in range(NBD_VOLUME_SIZE // MiB)
    ))
    await run_tool("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), n.url("primary"))
    await run_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), n.url("primary"))
    await run_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), n.url("secondary"))
    r = await run_tool("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), n.url("secondary"),
                       check=False)
    assert r.returncode != 0, "writing to the secondary's read-only export must fail"

    # nbdcopy both directions (file -> export, export -> file), primary and secondary.
    src2 = tmp_path / "src2.raw"
    src2.write_bytes(random.Random(f"{seed}-src2").randbytes(NBD_VOLUME_SIZE))
    await run_tool("nbdcopy", str(src2), n.url("primary"))
    out = tmp_path / "out.raw"
    await run_tool("nbdcopy", n.url("primary"), str(out))
    assert out.read_bytes() == src2.read_bytes()
    out2 = tmp_path / "out2.raw"
    await run_tool("nbdcopy", n.url("secondary"), str(out2))
    assert out2.read_bytes() == src2.read_bytes()

    # A write to the secondary's export gets EPERM (our client sends it regardless of the flag).
    ro = await NbdClient.open("127.0.0.1", n.secondary_port, VOLUME)
    try:
        assert ro.flags & p.FLAG_READ_ONLY
        assert (await ro.request(p.CMD_WRITE, 0, data=b"x" * 4096))[0] == p.EPERM
        assert (await ro.request(p.CMD_WRITE_ZEROES, 0, 4096))[0] == p.EPERM
        assert await ro.read(0, 4096) == src2.read_bytes()[:4096]
    finally:
        await ro.close()

    # A malformed handshake on the primary closes only that connection; another client works.
    good = await NbdClient.open("127.0.0.1", n.primary_port, VOLUME)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", n.primary_port)
        await reader.readexactly(18)
        writer.write(struct.pack(">I", 0xBAD0BAD0))
        assert await closed_by_server(reader)
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", n.primary_port)
        await reader.readexactly(18)
        writer.write(p.pack_client_flags() + b"GARBAGE!" + bytes(8))
        assert await closed_by_server(reader)
        writer.close()
        await good.write(12345, b"after garbage")  # unaligned: read-modify-write on the primary
        assert await good.read(12345, 13) == b"after garbage"
    finally:
        await good.close()
    assert "protocol violation" in n.c.log_tail("primary", 200)
    await assert_replicas_identical(n.c)


async def test_fio_random_writes_verify_and_replicas_identical(
    cluster_factory: Callable[..., LocalCluster], seed: int,
) -> None:
    need_tool("fio")
    n = await start_nbd_cluster(cluster_factory)
    t0 = time.monotonic()
    r = await run_tool(*fio_args(n.url("primary"), seed, "--io_size=48m"))
    assert "err= 0" in r.stdout, r.stdout
    print(f"fio: {time.monotonic() - t0:.1f} s")
    await assert_replicas_identical(n.c)
    # The secondary's read-only export serves the same data: fio verify-only pass over it.
    r = await run_tool(*fio_args(n.url("secondary"), seed, "--io_size=48m", "--verify_only"))
    assert "err= 0" in r.stdout, r.stdout


async def test_fio_verify_survives_secondary_kill_then_resync(
    cluster_factory: Callable[..., LocalCluster], seed: int,
) -> None:
    """Fault: the secondary is SIGKILLed while fio writes through the primary's export."""
    need_tool("fio")
    n = await start_nbd_cluster(cluster_factory)
    c = n.c
    acked0 = (await primary_volume_report(c)).acked_seq
    # Rate-limited so the kill lands mid-run: ~64 MiB at 16 MiB/s = ~4 s of writes.
    proc = await asyncio.create_subprocess_exec(
        *fio_args(n.url("primary"), seed, "--io_size=64m", "--rate=16m"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )

    async def replicating() -> bool:
        assert proc.returncode is None, "fio exited before any of its writes were replicated"
        return (await primary_volume_report(c)).acked_seq >= acked0 + 32

    # Kill once the secondary has acknowledged some of fio's writes (not after a guessed time).
    await wait_until(replicating, "the secondary acknowledged 32 of fio's writes", timeout_s=60)
    assert proc.returncode is None, "fio finished before the secondary was killed"
    c.kill("secondary")
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
    assert proc.returncode == 0, f"fio failed after the secondary was killed:\n{out.decode()}\n{err.decode()}"
    assert "err= 0" in out.decode()
    st = await c.get_volume(VOLUME)
    assert st.state != pb.PAIR_STATE_IN_SYNC, "the pair should be degraded with the secondary dead"
    await c.restart("secondary")
    await c.wait_for_volume(VOLUME, "in_sync", timeout_s=90)
    await assert_replicas_identical(c)
    # After the resync the secondary's copy passes fio's verify of everything fio wrote.
    r = await run_tool(*fio_args(n.url("secondary"), seed, "--io_size=64m", "--verify_only"))
    assert "err= 0" in r.stdout, r.stdout


async def test_secondary_snapshot_export(cluster_factory: Callable[..., LocalCluster]) -> None:
    """VOLUME@SNAPSHOT on the secondary reads the snapshot, not the live copy."""
    need_tool("nbdinfo")
    n = await start_nbd_cluster(cluster_factory, "--snapshot-period-s", "1", "--snapshots-keep", "30",
                                size=16 * MiB)
    c = n.c
    rw = await NbdClient.open("127.0.0.1", n.primary_port, VOLUME)
    try:
        await rw.write(0, b"A" * MiB)
        # Listed after the write was acknowledged: any snapshot not listed yet is taken after it.
        before = set(await list_snapshots(c.secondary_addr))
        new: set[str] = set()

        async def new_snapshot() -> bool:
            new.update(set(await list_snapshots(c.secondary_addr)) - before)
            return bool(new)

        await wait_until(new_snapshot, "a periodic snapshot appeared on the secondary", timeout_s=30)
        snap = sorted(new)[-1]
        await rw.write(0, b"B" * MiB)
    finally:
        await rw.close()
    ro = await NbdClient.open("127.0.0.1", n.secondary_port, f"{VOLUME}@{snap}")
    live = await NbdClient.open("127.0.0.1", n.secondary_port, VOLUME)
    try:
        assert ro.flags & p.FLAG_READ_ONLY and ro.size == 16 * MiB
        assert await ro.read(0, MiB) == b"A" * MiB
        assert await live.read(0, MiB) == b"B" * MiB
        assert (await ro.request(p.CMD_WRITE, 0, data=b"x" * 4096))[0] == p.EPERM
    finally:
        await ro.close()
        await live.close()
    listing = (await run_tool("nbdinfo", "--list", f"nbd://127.0.0.1:{n.secondary_port}")).stdout
    assert f'export="{VOLUME}"' in listing and f'export="{VOLUME}@' in listing


async def primary_volume_report(c: LocalCluster) -> pb.VolumeReport:
    r = await sc.node_status(c.primary_addr)
    return next(v for v in r.volumes if v.name == VOLUME)


async def list_snapshots(address: str) -> list[str]:
    from syncrep import rpc

    async with rpc.channel(address) as ch:
        reply = await pbg.NodeServiceStub(ch).ListSnapshots(pb.ListSnapshotsRequest(volume=VOLUME), timeout=5.0)
    return [s.name for s in reply.snapshots]


def _kernel_nbd_device() -> str:
    """A free /dev/nbdX, or skip with the reason."""
    if os.geteuid() != 0:
        pytest.skip("nbd-client needs root")
    need_tool("nbd-client")
    if not Path("/dev/nbd0").exists():
        modprobe = shutil.which("modprobe")
        if modprobe is None:
            pytest.skip("no /dev/nbd* and no modprobe to load the nbd kernel module (container without it?)")
        r = subprocess.run([modprobe, "nbd"], capture_output=True, text=True)
        if r.returncode != 0 or not Path("/dev/nbd0").exists():
            pytest.skip(f"no /dev/nbd*: `modprobe nbd` failed: {r.stderr.strip() or r.returncode}")
    for i in range(16):
        dev = f"/dev/nbd{i}"
        if Path(dev).exists() and Path(f"/sys/block/nbd{i}/pid").exists() is False:
            return dev
    pytest.skip("no free /dev/nbd device")


def _write_device(dev: str, data: bytes) -> None:
    with open(dev, "r+b", buffering=0) as f:
        f.write(data)
        os.fsync(f.fileno())  # -> NBD_CMD_FLUSH


async def test_kernel_nbd_client_block_device(cluster_factory: Callable[..., LocalCluster], seed: int) -> None:
    dev = _kernel_nbd_device()
    n = await start_nbd_cluster(cluster_factory, size=16 * MiB)
    await run_tool("nbd-client", "127.0.0.1", str(n.primary_port), dev, "-N", VOLUME, "-b", "4096")
    try:
        data = random.Random(seed).randbytes(4 * MiB)
        await asyncio.to_thread(_write_device, dev, data)
    finally:
        await run_tool("nbd-client", "-d", dev, check=False)
    # Read back over a second NBD connection (not the kernel's page cache), then compare replicas.
    c = await NbdClient.open("127.0.0.1", n.primary_port, VOLUME)
    try:
        assert await c.read(0, len(data)) == data
    finally:
        await c.close()
    await assert_replicas_identical(n.c)
