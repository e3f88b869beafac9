"""NBD block status (base:allocation), structured replies and sparse reads, end to end (issue 14).

Part 1 — the server in this process over a sparse file (the allocation walk of
syncrep.blockstore.alloc on a real file), driven by a small structured-reply
client written from syncrep.nbd.protocol: the negotiation as the server answers
it (unknown export, contexts before structured replies, contexts selected for
another export), BLOCK_STATUS with and without REQ_ONE, unaligned and out of
range, READ answered with OFFSET_HOLE for holes and OFFSET_DATA for the rest,
errors as NBD_REPLY_TYPE_ERROR chunks with their reason; then nbdinfo --map and
qemu-img map against it.

Part 2 — a real cluster (coordinator, primary, secondary as processes) with a
1 GiB volume and a few written extents: ``nbdinfo --map`` on the primary lists
exactly those as data and the rest as hole,zero; ``qemu-img map`` agrees;
nbdcopy and qemu-img convert of the volume give byte-identical images while the
server ships only the written bytes (its per-connection log line); qemu-io
reads a hole range as zeros; the secondary's live export shows the same holes;
a TRIM (replicated zero range) shows up as a hole on both nodes; the replicas
compare identical and every written extent reads back from both nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import wait_until
from test_nbd_e2e import (
    VOLUME,
    NbdClient,
    assert_replicas_identical,
    need_tool,
    read_option_reply,
    run_tool,
    start_nbd_cluster,
)

from deploy.cluster import LocalCluster
from syncrep.blockstore.alloc import allocation_runs
from syncrep.nbd import protocol as p
from syncrep.nbd.server import NBD_SPARSE_READ_MIN_BYTES, Backend, NbdServer, StaticExports

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
HZ = p.STATE_HOLE | p.STATE_ZERO


# ================================================================ a structured-reply client


@dataclass
class Reply:
    """Every chunk of one structured reply (or the error of a simple one)."""

    error: int = 0
    message: str = ""
    data: list[tuple[int, bytes]] = field(default_factory=list)
    holes: list[tuple[int, int]] = field(default_factory=list)
    status: list[tuple[int, list[tuple[int, int]]]] = field(default_factory=list)
    simple: bool = False
    chunks: int = 0

    def content(self, offset: int, length: int) -> bytes:
        """The READ's bytes, reassembled; asserts the chunks tile the range exactly."""
        buf = bytearray(length)
        covered = 0
        for off, d in self.data:
            buf[off - offset:off - offset + len(d)] = d
            covered += len(d)
        for off, n in self.holes:
            assert buf[off - offset:off - offset + n] == bytes(n)
            covered += n
        assert covered == length, f"chunks cover {covered} of {length} bytes"
        return bytes(buf)


class SClient:
    """Fixed newstyle; NBD_OPT_STRUCTURED_REPLY, SET_META_CONTEXT base:allocation, then GO.
    One request at a time (this is about the replies' content, not pipelining)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.size = 0
        self.contexts: list[tuple[int, str]] = []
        self._handle = 0
        #: Bytes received in OFFSET_DATA chunks and described by OFFSET_HOLE chunks.
        self.data_bytes = 0
        self.hole_bytes = 0

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, port: int, export: str, *, structured: bool = True,
                      contexts: tuple[str, ...] = (p.META_BASE_ALLOCATION,),
                      meta_export: str | None = None) -> AsyncIterator[SClient]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        c = cls(reader, writer)
        try:
            p.parse_greeting(await reader.readexactly(p.GREETING_BYTES))
            writer.write(p.pack_client_flags())
            if structured:
                [(hdr, _)] = await c.option(p.OPT_STRUCTURED_REPLY)
                assert hdr.reply_type == p.REP_ACK
                replies = await c.option(p.OPT_SET_META_CONTEXT, p.pack_meta_context_request(
                    export if meta_export is None else meta_export, contexts))
                assert replies[-1][0].reply_type == p.REP_ACK, replies
                c.contexts = [p.parse_meta_context(d) for h, d in replies if h.reply_type == p.REP_META_CONTEXT]
            for hdr, data in await c.option(p.OPT_GO, p.pack_info_request(export)):
                assert not hdr.is_error, data
                if hdr.reply_type == p.REP_INFO:
                    kind, val = p.parse_info_reply(data)
                    if kind == p.INFO_EXPORT:
                        assert isinstance(val, tuple)
                        c.size = val[0]
            yield c
        finally:
            with contextlib.suppress(Exception):
                writer.write(p.pack_request(p.CMD_DISC, 0))
                await writer.drain()
            writer.close()

    async def option(self, option: int, data: bytes = b"") -> list[tuple[p.OptionReplyHeader, bytes]]:
        self.writer.write(p.pack_option(option, data))
        await self.writer.drain()
        out = []
        while True:
            hdr, payload = await read_option_reply(self.reader)
            out.append((hdr, payload))
            if hdr.reply_type == p.REP_ACK or hdr.is_error:
                return out

    async def request(self, kind: int, offset: int, length: int, flags: int = 0) -> Reply:
        self._handle += 1
        handle = self._handle
        self.writer.write(p.pack_request(kind, handle, offset, length, flags))
        await self.writer.drain()
        r = Reply()
        while True:
            magic = p.parse_reply_magic(await self.reader.readexactly(4))
            if magic == p.SIMPLE_REPLY_MAGIC:
                err, h = p.parse_simple_reply(p.pack_simple_reply(0, 0)[:4] + await self.reader.readexactly(12))
                assert h == handle
                r.error, r.simple = err, True
                if kind == p.CMD_READ and not err:
                    r.data.append((offset, await self.reader.readexactly(length)))
                return r
            hdr = p.parse_structured_header(magic.to_bytes(4, "big") + await self.reader.readexactly(16))
            assert hdr.handle == handle
            payload = await self.reader.readexactly(hdr.length) if hdr.length else b""
            r.chunks += 1
            if hdr.type == p.REPLY_TYPE_OFFSET_DATA:
                r.data.append(p.parse_offset_data(payload))
                self.data_bytes += len(r.data[-1][1])
            elif hdr.type == p.REPLY_TYPE_OFFSET_HOLE:
                r.holes.append(p.parse_offset_hole(payload))
                self.hole_bytes += r.holes[-1][1]
            elif hdr.type == p.REPLY_TYPE_BLOCK_STATUS:
                r.status.append(p.parse_block_status(payload))
            elif hdr.is_error:
                r.error, r.message = p.parse_structured_error(payload)
            else:
                assert hdr.type == p.REPLY_TYPE_NONE, hdr
            if hdr.done:
                return r


# ================================================================ part 1: in-process server


class SparseFileBackend(Backend):
    """A read-only export of a sparse file; ``extents`` from its holes, as the live head's.
    ``all_data``: the Backend default (what a snapshot export reports)."""

    def __init__(self, name: str, path: Path, size: int, *, all_data: bool = False) -> None:
        self.name = self.lock_key = name
        self.path = path
        self.size = size
        self.block_size = 4096
        self.read_only = True
        self.all_data = all_data
        self.extent_calls = 0

    async def read(self, offset: int, length: int) -> bytes:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        self.extent_calls += 1
        if self.all_data:
            return await super().extents(offset, length)
        runs = allocation_runs(self.path, offset, length, block_size=self.block_size, size=self.size,
                               max_runs=p.MAX_BLOCK_STATUS_EXTENTS)
        return [(n, HZ if hole else 0) for n, hole in runs]


#: The written extents of the in-process image: (offset, length).
WRITTEN = [(0, 64 * KiB), (1 * MiB, 4 * KiB), (5 * MiB + 8 * KiB, 1 * MiB), (32 * MiB - 4 * KiB, 4 * KiB)]
IMAGE_SIZE = 32 * MiB


def _expected_map(written: list[tuple[int, int]], size: int) -> list[tuple[int, int, int]]:
    """(offset, length, flags) over the whole image: the written extents data, the rest hole|zero."""
    out: list[tuple[int, int, int]] = []
    pos = 0
    for off, n in sorted(written):
        if off > pos:
            out.append((pos, off - pos, HZ))
        out.append((off, n, 0))
        pos = off + n
    if pos < size:
        out.append((pos, size - pos, HZ))
    return out


@pytest.fixture
async def sparse_server(tmp_path: Path, seed: int) -> AsyncIterator[tuple[NbdServer, Path, bytes]]:
    f = tmp_path / "image.raw"
    rng = random.Random(seed)
    image = bytearray(IMAGE_SIZE)
    writes = {off: rng.randbytes(n) for off, n in WRITTEN}
    for off, data in writes.items():
        image[off:off + len(data)] = data
    write_sparse(f, IMAGE_SIZE, writes)
    if allocation_runs(f, 0, IMAGE_SIZE, block_size=4096, size=IMAGE_SIZE, max_runs=64) == [(IMAGE_SIZE, False)]:
        pytest.skip("this filesystem does not report holes (SEEK_DATA)")
    server = NbdServer("127.0.0.1:0", StaticExports({
        "img": SparseFileBackend("img", f, IMAGE_SIZE),
        "img@snap": SparseFileBackend("img@snap", f, IMAGE_SIZE, all_data=True),
    }))
    await server.start()
    try:
        yield server, f, bytes(image)
    finally:
        await server.stop()


def _tile(status: list[tuple[int, int]], offset: int) -> list[tuple[int, int, int]]:
    out, pos = [], offset
    for n, fl in status:
        out.append((pos, n, fl))
        pos += n
    return out


async def test_block_status_lists_written_extents_as_data_and_the_rest_as_holes(
    sparse_server: tuple[NbdServer, Path, bytes],
) -> None:
    server, _, _ = sparse_server
    async with SClient.connect(server.port, "img") as c:
        assert c.contexts == [(p.META_BASE_ALLOCATION_ID, p.META_BASE_ALLOCATION)]
        r = await c.request(p.CMD_BLOCK_STATUS, 0, IMAGE_SIZE)
        assert r.error == 0 and not r.simple and r.chunks == 1
        [(ctx, extents)] = r.status
        assert ctx == p.META_BASE_ALLOCATION_ID
        assert _tile(extents, 0) == _expected_map(WRITTEN, IMAGE_SIZE)
        # REQ_ONE: exactly one extent, not longer than asked.
        r = await c.request(p.CMD_BLOCK_STATUS, 64 * KiB, 8 * MiB, flags=p.CMD_FLAG_REQ_ONE)
        assert r.status == [(ctx, [(1 * MiB - 64 * KiB, HZ)])]
        r = await c.request(p.CMD_BLOCK_STATUS, 0, 4096, flags=p.CMD_FLAG_REQ_ONE)
        assert r.status == [(ctx, [(4096, 0)])]
        # Unaligned: the first extent starts at the offset, the last ends at the request's end.
        r = await c.request(p.CMD_BLOCK_STATUS, 1 * MiB - 100, 300)
        assert r.status == [(ctx, [(100, HZ), (200, 0)])]
        # Past the end, empty, bad flags: EINVAL as an error chunk, with the reason.
        r = await c.request(p.CMD_BLOCK_STATUS, IMAGE_SIZE - 4096, 8192)
        assert (r.error, r.status) == (p.EINVAL, []) and "end past the end" in r.message
        r = await c.request(p.CMD_BLOCK_STATUS, 0, 0)
        assert r.error == p.EINVAL and "0 bytes" in r.message
        r = await c.request(p.CMD_BLOCK_STATUS, 0, 4096, flags=p.CMD_FLAG_DF)
        assert r.error == p.EINVAL and "not valid" in r.message
    # A snapshot-like export: everything data (always correct).
    async with SClient.connect(server.port, "img@snap") as c:
        r = await c.request(p.CMD_BLOCK_STATUS, 0, IMAGE_SIZE)
        assert r.status == [(p.META_BASE_ALLOCATION_ID, [(IMAGE_SIZE, 0)])]


async def test_block_status_refused_without_contexts_for_this_export(
    sparse_server: tuple[NbdServer, Path, bytes],
) -> None:
    """Faults: BLOCK_STATUS without structured replies, with contexts selected for
    another export, and with only unknown contexts asked for; SET before
    STRUCTURED_REPLY; meta contexts of an unknown export."""
    server, _, image = sparse_server
    async with SClient.connect(server.port, "img", structured=False) as c:
        r = await c.request(p.CMD_BLOCK_STATUS, 0, 4096)
        assert (r.simple, r.error) == (True, p.EINVAL)
        r = await c.request(p.CMD_READ, 0, 4096)  # reads stay simple replies
        assert r.simple and r.data == [(0, image[:4096])]
    async with SClient.connect(server.port, "img", meta_export="img@snap") as c:
        assert c.contexts  # selected, but for img@snap
        r = await c.request(p.CMD_BLOCK_STATUS, 0, 4096)
        assert (r.simple, r.error) == (False, p.EINVAL) and "NBD_OPT_SET_META_CONTEXT" in r.message
    async with SClient.connect(server.port, "img", contexts=("qemu:dirty-bitmap:b0", "base:")) as c:
        assert c.contexts == []  # ignored, as the document says, not an error
        r = await c.request(p.CMD_BLOCK_STATUS, 0, 4096)
        assert r.error == p.EINVAL
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        await reader.readexactly(p.GREETING_BYTES)
        writer.write(p.pack_client_flags())
        writer.write(p.pack_option(p.OPT_SET_META_CONTEXT, p.pack_meta_context_request("img", ["base:allocation"])))
        hdr, msg = await read_option_reply(reader)
        assert hdr.reply_type == p.REP_ERR_INVALID and b"NBD_OPT_STRUCTURED_REPLY first" in msg
        writer.write(p.pack_option(p.OPT_STRUCTURED_REPLY))
        assert (await read_option_reply(reader))[0].reply_type == p.REP_ACK
        writer.write(p.pack_option(p.OPT_LIST_META_CONTEXT, p.pack_meta_context_request("nope")))
        hdr, msg = await read_option_reply(reader)
        assert hdr.reply_type == p.REP_ERR_UNKNOWN and b"nope" in msg
        writer.write(p.pack_option(p.OPT_LIST_META_CONTEXT, p.pack_meta_context_request("img")))
        hdr, data = await read_option_reply(reader)
        assert hdr.reply_type == p.REP_META_CONTEXT and p.parse_meta_context(data) == (0, "base:allocation")
        assert (await read_option_reply(reader))[0].reply_type == p.REP_ACK
    finally:
        writer.close()


async def test_structured_read_sends_holes_as_offset_hole_not_zeros(
    sparse_server: tuple[NbdServer, Path, bytes], caplog: pytest.LogCaptureFixture,
) -> None:
    server, _, image = sparse_server
    caplog.set_level(logging.INFO, logger="syncrep.nbd.server")
    shipped = holes = 0
    async with SClient.connect(server.port, "img") as c:
        # 4 MiB from 0: data 64 KiB, hole, data 4 KiB at 1 MiB, hole.
        r = await c.request(p.CMD_READ, 0, 4 * MiB)
        assert r.error == 0 and not r.simple
        assert r.content(0, 4 * MiB) == image[:4 * MiB]
        assert [o for o, _ in r.data] == [0, 1 * MiB] and sum(len(d) for _, d in r.data) == 68 * KiB
        assert r.holes == [(64 * KiB, 1 * MiB - 64 * KiB), (1 * MiB + 4 * KiB, 3 * MiB - 4 * KiB)]
        # All hole: one chunk, no data.
        r = await c.request(p.CMD_READ, 8 * MiB, 2 * MiB)
        assert (r.data, r.holes, r.chunks) == ([], [(8 * MiB, 2 * MiB)], 1)
        # Unaligned, across a data/hole boundary.
        r = await c.request(p.CMD_READ, 64 * KiB - 1000, 200 * KiB)
        assert r.content(64 * KiB - 1000, 200 * KiB) == image[64 * KiB - 1000:264 * KiB - 1000]
        assert r.data == [(64 * KiB - 1000, image[64 * KiB - 1000:64 * KiB])]
        # Below NBD_SPARSE_READ_MIN_BYTES: one OFFSET_DATA, holes not looked up.
        r = await c.request(p.CMD_READ, 2 * MiB, NBD_SPARSE_READ_MIN_BYTES // 2)
        assert (r.holes, r.data) == ([], [(2 * MiB, bytes(NBD_SPARSE_READ_MIN_BYTES // 2))])
        # Errors are one NBD_REPLY_TYPE_ERROR chunk with the reason (a structured READ MUST NOT be simple).
        r = await c.request(p.CMD_READ, IMAGE_SIZE - 4096, 8192)
        assert (r.simple, r.error, r.data, r.chunks) == (False, p.EINVAL, [], 1) and "past the end" in r.message
        r = await c.request(p.CMD_READ, 0, 0)  # zero-length: NBD_REPLY_TYPE_NONE
        assert (r.simple, r.error, r.chunks, r.data, r.holes) == (False, 0, 1, [], [])
        shipped, holes = c.data_bytes, c.hole_bytes
    assert shipped == 68 * KiB + 1000 + NBD_SPARSE_READ_MIN_BYTES // 2
    # The server's per-connection summary counts the same: data shipped, and holes not shipped.

    def summary() -> list[tuple[int, int]]:
        return _read_summaries("\n".join(rec.getMessage() for rec in caplog.records))

    await wait_until(lambda: bool(summary()), "the connection's summary line was logged", timeout_s=5)
    assert summary() == [(shipped, holes)]


async def test_nbdinfo_map_and_qemu_img_map_against_in_process_server(
    sparse_server: tuple[NbdServer, Path, bytes], tmp_path: Path,
) -> None:
    """Real clients (libnbd's nbdinfo --map, qemu's qemu-img map) against the sparse file."""
    server, _, image = sparse_server
    url = f"nbd://127.0.0.1:{server.port}/img"
    assert await nbdinfo_map(url) == _expected_map(WRITTEN, IMAGE_SIZE)
    assert await qemu_img_map(url) == _expected_map(WRITTEN, IMAGE_SIZE)
    out = tmp_path / "copy.raw"
    await run_tool(need_tool("nbdcopy"), url, str(out))
    assert out.read_bytes() == image


# ================================================================ the real tools' views


async def nbdinfo_map(url: str) -> list[tuple[int, int, int]]:
    """``nbdinfo --map --json``: (offset, length, flags) of base:allocation, merged."""
    need_tool("nbdinfo")
    r = await run_tool("nbdinfo", "--map", "--json", url)
    return _merge([(int(e["offset"]), int(e["length"]), int(e["type"])) for e in json.loads(r.stdout)])


async def qemu_img_map(url: str) -> list[tuple[int, int, int]]:
    """``qemu-img map --output=json``: data=false,zero=true -> hole|zero, data=true -> 0."""
    need_tool("qemu-img")
    r = await run_tool("qemu-img", "map", "--output=json", "-f", "raw", url)
    out = []
    for e in json.loads(r.stdout):
        assert e["data"] or e["zero"], e  # a hole here always reads as zeros
        out.append((int(e["start"]), int(e["length"]), 0 if e["data"] else HZ))
    return _merge(out)


def _merge(rows: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for off, n, fl in sorted(rows):
        if out and out[-1][2] == fl and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n, fl)
        else:
            out.append((off, n, fl))
    return out


def _read_summaries(log: str) -> list[tuple[int, int]]:
    """(bytes read, bytes read as holes) of every NBD connection the node logged as closed."""
    return [(int(a), int(b)) for a, b in
            re.findall(r"closed after \d+ requests \((\d+) bytes read, (\d+) more read as holes", log)]


# ================================================================ part 2: a real cluster


#: Written through the primary's NBD export of the 1 GiB volume: (offset, length).
CLUSTER_WRITTEN = [(0, 1 * MiB), (100 * MiB, 64 * KiB), (512 * MiB + 4 * KiB, 12 * KiB), (GiB - 4 * KiB, 4 * KiB)]


async def test_nbdinfo_map_shows_the_holes_of_a_1gib_volume(
    cluster_factory: Callable[..., LocalCluster], tmp_path: Path, seed: int,
) -> None:
    """A 1 GiB volume with four written extents (random content from the seed):
    the maps of nbdinfo and qemu-img, copies by nbdcopy and qemu-img convert,
    a hole read by qemu-io, both nodes' exports, a TRIM of one extent, then the
    replicas compared and every remaining extent read back from both nodes."""
    for tool in ("nbdinfo", "nbdcopy", "qemu-img", "qemu-io"):
        need_tool(tool)
    n = await start_nbd_cluster(cluster_factory, size=GiB)
    rng = random.Random(seed)
    written = {off: rng.randbytes(length) for off, length in CLUSTER_WRITTEN}
    rw = await NbdClient.open("127.0.0.1", n.primary_port, VOLUME)
    try:
        for off, data in written.items():
            await rw.write(off, data)
    finally:
        await rw.close()
    expect = _expected_map(CLUSTER_WRITTEN, GiB)

    # The maps: exactly the written extents are data, the rest hole,zero.
    assert await nbdinfo_map(n.url("primary")) == expect
    r = await run_tool("nbdinfo", "--map", n.url("primary"))
    print(r.stdout)
    assert "hole,zero" in r.stdout and r.stdout.count("data") == len(CLUSTER_WRITTEN)
    assert await qemu_img_map(n.url("primary")) == expect

    # Copies are byte-identical, and only the written bytes cross the wire.
    image = tmp_path / "expect.raw"
    write_sparse(image, GiB, written)
    before = len(_read_summaries(n.c.log_tail("primary", 2000)))
    for argv, out in ((["nbdcopy", n.url("primary")], tmp_path / "nbdcopy.raw"),
                      (["qemu-img", "convert", "-f", "raw", "-O", "raw", n.url("primary")], tmp_path / "convert.raw")):
        await run_tool(*argv, str(out), timeout_s=300)
        assert out.stat().st_size == GiB
        assert _same_file(out, image), f"{argv[0]} copy differs from the written image"
        # The destination stayed sparse: the holes were skipped, not written as zeros.
        assert out.stat().st_blocks * 512 < 64 * MiB, f"{argv[0]} wrote {out.stat().st_blocks * 512} bytes"
        out.unlink()
    total_written = sum(len(d) for d in written.values())

    def shipped() -> list[tuple[int, int]]:  # (data, holes) per connection since the copies began
        return _read_summaries(n.c.log_tail("primary", 2000))[before:]

    # nbdcopy (over one or more connections) and qemu-img convert each read exactly the written bytes.
    await wait_until(lambda: sum(d for d, _ in shipped()) >= 2 * total_written,
                     "the primary logged the copy connections' summaries", timeout_s=10)
    print(f"bytes shipped per copy connection (data, as holes): {shipped()}; written {total_written}")
    assert sum(d for d, _ in shipped()) == 2 * total_written

    # A read of a hole range returns zeros (qemu-io: pattern 0 verified), written data reads back.
    r = await run_tool("qemu-io", "-f", "raw", "-r", "-c", f"read -P 0 {200 * MiB} {8 * MiB}", n.url("primary"))
    assert "read 8388608/8388608 bytes" in r.stdout, r.stdout
    r = await run_tool("qemu-io", "-f", "raw", "-r", "-c", f"read -P 0 {100 * MiB} {64 * KiB}", n.url("primary"),
                       check=False)
    assert "Pattern verification failed" in r.stdout + r.stderr, "written data read as zeros"

    # The secondary's live copy shows the same holes; every written extent reads back from
    # it and from the primary, and a read inside a hole ships no data.
    assert await nbdinfo_map(n.url("secondary")) == expect  # no resync ran: its file is as sparse
    for port in (n.primary_port, n.secondary_port):
        async with SClient.connect(port, VOLUME) as c:
            for off, data in written.items():
                reply = await c.request(p.CMD_READ, off, len(data))
                assert reply.content(off, len(data)) == data, (port, off)
            reply = await c.request(p.CMD_READ, 300 * MiB, 32 * MiB)  # inside a hole: no data shipped
            assert (reply.data, reply.holes) == ([], [(300 * MiB, 32 * MiB)])

    # TRIM punches holes on both nodes (replicated zero ranges): the map shows them at once.
    await run_tool("qemu-io", "-f", "raw", "-c", f"discard {100 * MiB} {64 * KiB}", n.url("primary"))
    del written[100 * MiB]
    trimmed = _expected_map([(o, len(d)) for o, d in written.items()], GiB)
    assert await nbdinfo_map(n.url("primary")) == trimmed
    assert await nbdinfo_map(n.url("secondary")) == trimmed
    for port in (n.primary_port, n.secondary_port):
        async with SClient.connect(port, VOLUME) as c:
            reply = await c.request(p.CMD_READ, 100 * MiB, 64 * KiB)
            assert (reply.data, reply.holes) == ([], [(100 * MiB, 64 * KiB)]), port
            for off, data in written.items():
                reply = await c.request(p.CMD_READ, off, len(data))
                assert reply.content(off, len(data)) == data, (port, off)
    await assert_replicas_identical(n.c)


def write_sparse(path: Path, size: int, writes: dict[int, bytes]) -> None:
    """A sparse file of ``size`` bytes holding ``writes`` (offset -> data), holes elsewhere."""
    with open(path, "wb") as fh:
        fh.truncate(size)
        for off, data in writes.items():
            fh.seek(off)
            fh.write(data)


def _same_file(a: Path, b: Path, chunk: int = 8 * MiB) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True
