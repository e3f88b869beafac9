"""The NBD server's transmission-phase reader (syncrep/nbd/reader.py) on real
loopback sockets, plaintext and TLS (asyncio's own ``start_tls``, as the NBD
server's STARTTLS does).

Each test has a server that reads a prefix through a StreamReader (the
handshake's side), then hands the connection to ``BufferedReader.take_over``
and reads the rest with ``readexactly`` in random sizes; a client writes seeded
random bytes in random pieces. What is checked: every byte arrives once and
in order, including what the client sent ahead of the hand-over (pipelined),
requests larger than the buffer (it grows, then shrinks back), reading paused
while a full buffer waits unread and resumed when it is read, and EOF or a
lost connection in the middle of a request.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from syncrep import certs
from syncrep.nbd.reader import BufferedReader
from syncrep.nbd.tls import client_ssl_context, server_ssl_context

KiB = 1024
MiB = 1024 * KiB
#: Small bounds so that the tests cross them many times.
CAPACITY = 1 * MiB
HIGH_WATER = 512 * KiB
PREFIX = b"HELO"


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    root = tmp_path_factory.mktemp("pki")
    certs.create_all(root / "certs", root / "ca.key", ["127.0.0.1"], users=("admin",))
    return (server_ssl_context(certs.load_node_tls(root / "certs")),
            client_ssl_context(certs.load_client_tls(root / "certs", "admin")))


@dataclass
class Pair:
    reader: BufferedReader
    client: asyncio.StreamWriter
    client_reader: asyncio.StreamReader
    server_writer: asyncio.StreamWriter


@pytest.fixture(params=["plain", "tls"])
async def connect(request: pytest.FixtureRequest, contexts: tuple[ssl.SSLContext, ssl.SSLContext]
                  ) -> AsyncIterator[Callable[[bytes], Awaitable[Pair]]]:
    """connect(ahead) -> a Pair: the client sent PREFIX + ``ahead`` before the hand-over."""
    tls = request.param == "tls"
    server_ctx, client_ctx = contexts
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def on_client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await accepted.put((r, w))

    srv = await asyncio.start_server(on_client, "127.0.0.1", 0, limit=64 * KiB)
    port = srv.sockets[0].getsockname()[1]
    writers: list[asyncio.StreamWriter] = []

    async def make(ahead: bytes) -> Pair:
        cr, cw = await asyncio.open_connection("127.0.0.1", port)
        sr, sw = await accepted.get()
        if tls:
            await asyncio.gather(sw.start_tls(server_ctx), cw.start_tls(client_ctx, server_hostname="127.0.0.1"))
        cw.write(PREFIX + ahead)
        await cw.drain()
        assert await sr.readexactly(len(PREFIX)) == PREFIX
        if ahead:  # let (some of) it land in the StreamReader's buffer before the hand-over
            for _ in range(200):
                if getattr(sr, "_buffer", b""):
                    break
                await asyncio.sleep(0.005)
        writers.extend((cw, sw))
        return Pair(BufferedReader.take_over(sr, sw, capacity_bytes=CAPACITY, high_water_bytes=HIGH_WATER),
                    cw, cr, sw)

    yield make
    for w in writers:
        w.close()
    srv.close()
    await srv.wait_closed()


async def send_in_pieces(w: asyncio.StreamWriter, data: bytes, rng: random.Random) -> None:
    pos = 0
    while pos < len(data):
        n = rng.choice([1, 7, 28, 4 * KiB, 64 * KiB, 300 * KiB, 2 * MiB])
        w.write(data[pos:pos + n])
        pos += n
        await w.drain()


async def test_every_byte_arrives_once_in_order_with_pipelined_bytes_and_large_requests(
        connect: Callable[[bytes], Awaitable[Pair]], seed: int) -> None:
    rng = random.Random(seed)
    ahead = rng.randbytes(100 * KiB)
    pair = await connect(ahead)
    body = rng.randbytes(12 * MiB)
    sizes = []
    total = len(ahead) + len(body)
    while sum(sizes) < total:
        sizes.append(min(rng.choice([28, 4 * KiB, 1 * MiB, 3 * MiB]), total - sum(sizes)))
    sender = asyncio.create_task(send_in_pieces(pair.client, body, rng))
    got = bytearray()
    for n in sizes:
        chunk = await asyncio.wait_for(pair.reader.readexactly(n), 30)
        assert type(chunk) is bytes and len(chunk) == n
        got += chunk
    await sender
    assert got == ahead + body, f"seed {seed}"
    # Grown for the 3 MiB reads, given back once emptied.
    assert len(pair.reader._buf) == CAPACITY


async def test_reading_pauses_while_a_full_buffer_waits_and_resumes_when_read(
        connect: Callable[[bytes], Awaitable[Pair]], seed: int) -> None:
    rng = random.Random(seed)
    pair = await connect(b"")
    body = rng.randbytes(8 * MiB)
    sender = asyncio.create_task(send_in_pieces(pair.client, body, rng))
    transport = pair.server_writer.transport
    for _ in range(1000):
        if not transport.is_reading():  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.005)
    assert not transport.is_reading(), "nobody reads: the reader should have paused the socket"  # type: ignore[attr-defined]
    assert HIGH_WATER <= pair.reader.available() <= CAPACITY
    assert not sender.done(), "8 MiB cannot all be buffered: the sender should be held by flow control"
    got = bytearray()
    while len(got) < len(body):
        got += await asyncio.wait_for(pair.reader.readexactly(min(64 * KiB, len(body) - len(got))), 30)
    await sender
    assert got == body, f"seed {seed}"


async def test_eof_in_the_middle_of_a_request_is_an_incomplete_read(
        connect: Callable[[bytes], Awaitable[Pair]], seed: int) -> None:
    rng = random.Random(seed)
    pair = await connect(b"")
    data = rng.randbytes(5000)
    pair.client.write(data)
    await pair.client.drain()
    assert await pair.reader.readexactly(1000) == data[:1000]
    pair.client.close()
    with pytest.raises(asyncio.IncompleteReadError) as e:
        await asyncio.wait_for(pair.reader.readexactly(1 * MiB), 10)
    assert e.value.partial == data[1000:]
    # The StreamWriter, whose protocol the reader replaced, still sees the end of the connection.
    pair.server_writer.close()
    await asyncio.wait_for(pair.server_writer.wait_closed(), 10)


async def test_replies_still_flow_through_the_writer_after_the_hand_over(
        connect: Callable[[bytes], Awaitable[Pair]], seed: int) -> None:
    """Write flow control is forwarded to the old protocol: drain() waits and returns."""
    rng = random.Random(seed)
    pair = await connect(b"")
    reply = rng.randbytes(6 * MiB)
    pair.server_writer.write(reply)
    drained = asyncio.create_task(pair.server_writer.drain())
    await asyncio.sleep(0.05)
    got = await asyncio.wait_for(pair.client_reader.readexactly(len(reply)), 30)
    await asyncio.wait_for(drained, 30)
    assert got == reply
