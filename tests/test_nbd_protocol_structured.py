"""Structured replies, metadata contexts and block status in syncrep.nbd.protocol: no sockets.

Byte layouts against the protocol document (NetworkBlockDevice/nbd doc/proto.md,
"Structured reply chunk message", "Structured reply types", NBD_OPT_*_META_CONTEXT,
"base:allocation"); the negotiation rules of :class:`Negotiation` as data tables:
each row is a sequence of options and the replies the document requires.
The allocation walk of syncrep.blockstore.alloc over real sparse files.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from syncrep.blockstore.alloc import allocation_runs
from syncrep.nbd import protocol as p

KiB = 1024
MiB = 1024 * KiB

# ---------------------------------------------------------------- numbers and layouts


def test_structured_numbers_are_the_documents() -> None:
    assert p.STRUCTURED_REPLY_MAGIC == 0x668E33EF
    assert (p.REPLY_TYPE_NONE, p.REPLY_TYPE_OFFSET_DATA, p.REPLY_TYPE_OFFSET_HOLE, p.REPLY_TYPE_BLOCK_STATUS) == (
        0, 1, 2, 5)
    assert (p.REPLY_TYPE_ERROR, p.REPLY_TYPE_ERROR_OFFSET) == (2**15 + 1, 2**15 + 2)
    assert (p.OPT_STRUCTURED_REPLY, p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT) == (8, 9, 10)
    assert (p.REP_META_CONTEXT, p.CMD_BLOCK_STATUS, p.CMD_FLAG_REQ_ONE) == (4, 7, 1 << 3)
    assert (p.STATE_HOLE, p.STATE_ZERO, p.REPLY_FLAG_DONE) == (1, 2, 1)
    # "SHOULD NOT send more than 2^20 extents in a single reply chunk"
    assert 0 < p.MAX_BLOCK_STATUS_EXTENTS <= 2**20


def test_structured_header_layout_and_round_trip() -> None:
    raw = p.pack_structured_header(p.REPLY_FLAG_DONE, p.REPLY_TYPE_OFFSET_HOLE, 0x1122334455667788, 12)
    assert raw == struct.pack(">IHHQI", 0x668E33EF, 1, 2, 0x1122334455667788, 12)
    assert len(raw) == p.STRUCTURED_REPLY_BYTES == 20
    h = p.parse_structured_header(raw)
    assert (h.flags, h.type, h.handle, h.length, h.done, h.is_error) == (1, 2, 0x1122334455667788, 12, True, False)
    assert p.parse_reply_magic(raw[:4]) == p.STRUCTURED_REPLY_MAGIC
    assert p.parse_reply_magic(p.pack_simple_reply(0, 1)[:4]) == p.SIMPLE_REPLY_MAGIC
    with pytest.raises(p.ProtocolError, match="magic"):
        p.parse_reply_magic(b"\0\0\0\0")
    with pytest.raises(p.ProtocolError, match="magic"):
        p.parse_structured_header(p.pack_simple_reply(0, 1) + bytes(4))


def test_offset_data_header_carries_offset_and_length_without_the_data() -> None:
    raw = p.pack_offset_data_header(7, 4096, 512, done=False)
    assert raw == struct.pack(">IHHQIQ", 0x668E33EF, 0, 1, 7, 8 + 512, 4096)
    assert p.parse_offset_data(raw[20:] + b"x" * 512) == (4096, b"x" * 512)
    with pytest.raises(ValueError):
        p.pack_offset_data_header(7, 0, 0, done=True)  # "length MUST be at least 9"


def test_offset_hole_layout_and_limits() -> None:
    raw = p.pack_offset_hole(9, 1 << 40, 65536, done=True)
    assert raw == struct.pack(">IHHQIQI", 0x668E33EF, 1, 2, 9, 12, 1 << 40, 65536)
    assert p.parse_offset_hole(raw[20:]) == (1 << 40, 65536)
    for bad in (0, 1 << 32):
        with pytest.raises(ValueError):
            p.pack_offset_hole(9, 0, bad, done=True)
    with pytest.raises(p.ProtocolError, match="size 0"):
        p.parse_offset_hole(struct.pack(">QI", 0, 0))


def test_block_status_layout() -> None:
    raw = p.pack_block_status(3, p.META_BASE_ALLOCATION_ID, [(4096, 0), (8192, 3)])
    assert raw[:20] == struct.pack(">IHHQI", 0x668E33EF, 1, 5, 3, 4 + 16)
    assert raw[20:] == struct.pack(">IIIII", p.META_BASE_ALLOCATION_ID, 4096, 0, 8192, 3)
    assert p.parse_block_status(raw[20:]) == (p.META_BASE_ALLOCATION_ID, [(4096, 0), (8192, 3)])
    with pytest.raises(ValueError):
        p.pack_block_status(3, 1, [])
    for bad in (b"\0" * 4, b"\0" * 13, struct.pack(">III", 1, 0, 0)):
        with pytest.raises(p.ProtocolError):
            p.parse_block_status(bad)


def test_structured_error_and_none() -> None:
    raw = p.pack_structured_error(5, p.EINVAL, "bad offset")
    h = p.parse_structured_header(raw[:20])
    assert (h.type, h.done, h.is_error, h.length) == (p.REPLY_TYPE_ERROR, True, True, 6 + 10)
    assert p.parse_structured_error(raw[20:]) == (p.EINVAL, "bad offset")
    long = p.pack_structured_error(5, p.EIO, "x" * 10000)
    assert p.parse_structured_header(long[:20]).length == 6 + p.MAX_STRING_BYTES
    with pytest.raises(ValueError):
        p.pack_structured_error(5, 0)
    none = p.pack_structured_none(5)
    assert none == struct.pack(">IHHQI", 0x668E33EF, 1, 0, 5, 0)


@pytest.mark.parametrize("kind, flags, ok", [
    (p.CMD_BLOCK_STATUS, 0, True),
    (p.CMD_BLOCK_STATUS, p.CMD_FLAG_REQ_ONE, True),
    (p.CMD_BLOCK_STATUS, p.CMD_FLAG_REQ_ONE | p.CMD_FLAG_FUA, True),
    (p.CMD_BLOCK_STATUS, p.CMD_FLAG_DF, False),
    (p.CMD_READ, p.CMD_FLAG_REQ_ONE, False),  # REQ_ONE is for BLOCK_STATUS only
    (p.CMD_READ, p.CMD_FLAG_DF, False),  # NBD_FLAG_SEND_DF is not offered
])
def test_block_status_request_flags(kind: int, flags: int, ok: bool) -> None:
    assert (p.check_request_flags(p.Request(flags, kind, 1, 0, 4096)) is None) == ok


# ---------------------------------------------------------------- meta context requests


@pytest.mark.parametrize("raw, why", [
    (b"\0\0\0", "too short"),
    (struct.pack(">I", 9) + b"ab" + struct.pack(">I", 0), "overruns"),
    (struct.pack(">II", 0, 2) + struct.pack(">I", 15) + b"base:allocation", "ends after 1"),
    (struct.pack(">II", 0, 1) + struct.pack(">I", 99) + b"base:", "overruns"),
    (struct.pack(">II", 0, 1) + struct.pack(">I", 4) + b"base", "namespace and a colon"),
    (struct.pack(">II", 0, 1) + struct.pack(">I", 1) + b":", "namespace and a colon"),
    (struct.pack(">II", 0, 0) + b"junk", "follow the last"),
    (struct.pack(">I", 2) + b"a\0" + struct.pack(">I", 0), "NUL"),
])
def test_meta_context_request_malformed(raw: bytes, why: str) -> None:
    with pytest.raises(p.OptionInvalid, match=why):
        p.parse_meta_context_request(raw)


def test_meta_context_request_round_trip() -> None:
    raw = p.pack_meta_context_request("vol0", ["base:allocation", "qemu:dirty-bitmap:x"])
    assert raw == (struct.pack(">I", 4) + b"vol0" + struct.pack(">II", 2, 15) + b"base:allocation"
                   + struct.pack(">I", 19) + b"qemu:dirty-bitmap:x")
    assert p.parse_meta_context_request(raw) == p.MetaContextRequest("vol0", ("base:allocation", "qemu:dirty-bitmap:x"))
    assert p.parse_meta_context_request(p.pack_meta_context_request("")) == p.MetaContextRequest("", ())
    assert p.parse_meta_context(p.pack_meta_context(1, "base:allocation")) == (1, "base:allocation")


@pytest.mark.parametrize("queries, listing, expect", [
    ((), True, ["base:allocation"]),  # LIST with no query: every context
    ((), False, []),  # SET with no query: none
    (("base:",), True, ["base:allocation"]),  # the namespace wildcard, LIST only
    (("base:",), False, []),  # "MUST ignore this form during SET"
    (("base:allocation",), False, ["base:allocation"]),
    (("base:allocation", "base:allocation"), False, ["base:allocation"]),  # selected once
    (("base:nonsense",), False, []),  # an unknown leaf of base: is ignored
    (("qemu:dirty-bitmap:b0", "x-foo:bar"), True, []),  # unknown namespaces: ignored, not an error
    (("qemu:allocation-depth", "base:allocation"), False, ["base:allocation"]),
])
def test_meta_context_matching(queries: tuple[str, ...], listing: bool, expect: list[str]) -> None:
    assert p.match_meta_contexts(queries, listing=listing) == expect


# ---------------------------------------------------------------- the negotiation state machine

ACK = (p.REP_ACK, b"")
CTX = (p.REP_META_CONTEXT, p.pack_meta_context(p.META_BASE_ALLOCATION_ID, "base:allocation"))
LISTED = (p.REP_META_CONTEXT, p.pack_meta_context(0, "base:allocation"))  # LIST ids are the reserved 0
INVALID = "INVALID"
SR, LIST, SET, TLS = "structured", "list", "set", "starttls"


def _drive(neg: p.Negotiation, step: tuple[str, ...]) -> object:
    """One option against the state machine (the export always exists here)."""
    kind = step[0]
    if kind == SR:
        reply_type, _ = neg.structured_reply(step[1].encode() if len(step) > 1 else b"")
        return INVALID if reply_type == p.REP_ERR_INVALID else (reply_type, b"")
    if kind == TLS:
        neg.starttls()
        return None
    option = p.OPT_LIST_META_CONTEXT if kind == LIST else p.OPT_SET_META_CONTEXT
    export, *queries = step[1:]
    try:
        req = neg.meta_context_request(option, p.pack_meta_context_request(export, queries))
    except p.OptionInvalid:
        return INVALID
    return neg.meta_context_replies(option, req)


@pytest.mark.parametrize("steps, structured, active_on", [
    # Meta contexts before structured replies: INVALID (SET: MUST NOT / SHOULD INVALID).
    ([((SET, "vol0", "base:allocation"), INVALID), ((LIST, "vol0"), INVALID)], False, {}),
    # The usual sequence (qemu, libnbd): structured, then SET; BLOCK_STATUS only on that export.
    ([((SR,), ACK), ((SET, "vol0", "base:allocation"), [CTX, ACK])], True, {"vol0": 1, "vol1": 0, "": 0}),
    # Structured replies twice; with data.
    ([((SR,), ACK), ((SR,), INVALID)], True, {}),
    ([((SR, "x"), INVALID)], False, {}),
    # LIST never selects; with no query or the wildcard it shows base:allocation.
    ([((SR,), ACK), ((LIST, "vol0"), [LISTED, ACK]), ((LIST, "vol0", "base:"), [LISTED, ACK]),
      ((LIST, "vol0", "qemu:"), [ACK])], True, {"vol0": 0}),
    # SET replaces the selection: a later SET selecting nothing (unknown namespace) clears it...
    ([((SR,), ACK), ((SET, "vol0", "base:allocation"), [CTX, ACK]), ((SET, "vol0", "qemu:dirty-bitmap:b"), [ACK])],
     True, {"vol0": 0}),
    # ...and so does a SET that fails (here: malformed, a query without a namespace).
    ([((SR,), ACK), ((SET, "vol0", "base:allocation"), [CTX, ACK]), ((SET, "vol0", "nocolon"), INVALID)],
     True, {"vol0": 0}),
    # The last SET decides which export.
    ([((SR,), ACK), ((SET, "vol0", "base:allocation"), [CTX, ACK]), ((SET, "vol1", "base:allocation"), [CTX, ACK])],
     True, {"vol0": 0, "vol1": 1}),
    # STARTTLS forgets everything negotiated before it.
    ([((SR,), ACK), ((SET, "vol0", "base:allocation"), [CTX, ACK]), ((TLS,), None)], False, {"vol0": 0}),
    ([((SR,), ACK), ((TLS,), None), ((SET, "vol0", "base:allocation"), INVALID), ((SR,), ACK),
      ((SET, "vol0", "base:allocation"), [CTX, ACK])], True, {"vol0": 1}),
])
def test_negotiation_table(steps: list[tuple[tuple[str, ...], object]], structured: bool,
                           active_on: dict[str, int]) -> None:
    neg = p.Negotiation()
    for step, expect in steps:
        assert _drive(neg, step) == expect, step
    assert neg.structured == structured
    for export, n in active_on.items():
        assert len(neg.contexts_for(export)) == n, export


# ---------------------------------------------------------------- block status descriptors

H = p.STATE_HOLE | p.STATE_ZERO


@pytest.mark.parametrize("extents, length, req_one, limit, expect", [
    ([], 4096, False, 8, [(4096, 0)]),  # nothing known: status 0 is always correct
    ([(4096, 0), (8192, H)], 12288, False, 8, [(4096, 0), (8192, H)]),
    ([(4096, 0), (4096, 0), (8192, H)], 16384, False, 8, [(8192, 0), (8192, H)]),  # equal neighbours merged
    ([(4096, 0), (0, H), (4096, H)], 8192, False, 8, [(4096, 0), (4096, H)]),  # empty ones dropped
    ([(4096, 0), (1 << 20, H)], 10000, False, 8, [(4096, 0), (5904, H)]),  # clipped to the request's end
    ([(4096, 0), (8192, H)], 12288, True, 8, [(4096, 0)]),  # REQ_ONE: exactly one
    ([(1 << 20, H)], 4096, True, 8, [(4096, H)]),  # REQ_ONE: not longer than the request
    ([(512, 0), (512, H)] * 10, 10240, False, 3, [(512, 0), (512, H), (512, 0)]),  # bounded: fewer than asked
])
def test_block_status_extents(extents: list[tuple[int, int]], length: int, req_one: bool, limit: int,
                              expect: list[tuple[int, int]]) -> None:
    got = p.block_status_extents(extents, length, req_one=req_one, max_extents=limit)
    assert got == expect
    # The document's constraints: nonzero lengths, the first N-1 sum below the request.
    assert all(n > 0 for n, _ in got) and sum(n for n, _ in got[:-1]) < length and sum(n for n, _ in got) <= length


@pytest.mark.parametrize("offset, length, extents, expect", [
    (0, 8192, [], [(0, 8192, False)]),
    (0, 12288, [(4096, 0), (8192, H)], [(0, 4096, False), (4096, 8192, True)]),
    (100, 8000, [(3996, H), (4004, 0)], [(100, 3996, True), (4096, 4004, False)]),
    (0, 16384, [(4096, H)], [(0, 4096, True), (4096, 12288, False)]),  # uncovered tail: data
    (0, 8192, [(4096, p.STATE_HOLE), (4096, 0)], [(0, 8192, False)]),  # a hole not known to be zero is data
    (0, 8192, [(4096, H), (1 << 30, H)], [(0, 8192, True)]),
])
def test_read_plan(offset: int, length: int, extents: list[tuple[int, int]],
                   expect: list[tuple[int, int, bool]]) -> None:
    plan = p.read_plan(offset, length, extents)
    assert plan == expect
    assert plan[0][0] == offset and sum(n for _, n, _ in plan) == length


# ---------------------------------------------------------------- the allocation walk (real sparse files)

D, Z = False, True  # alloc run kinds: data, hole


@pytest.mark.parametrize("writes, bs, offset, length, expect", [
    ([], 4096, 0, 1 * MiB, [(1 * MiB, Z)]),
    ([(0, 4096)], 4096, 0, 1 * MiB, [(4096, D), (1 * MiB - 4096, Z)]),
    ([(64 * KiB, 8 * KiB)], 4096, 0, 1 * MiB, [(64 * KiB, Z), (8 * KiB, D), (1 * MiB - 72 * KiB, Z)]),
    # a block holding any data is data (a block size above the filesystem's: rounded outward)
    ([(68 * KiB, 4 * KiB)], 64 * KiB, 0, 1 * MiB, [(64 * KiB, Z), (64 * KiB, D), (1 * MiB - 128 * KiB, Z)]),
    # unaligned request: the first run starts at offset, the last ends at offset + length
    ([(0, 4096)], 4096, 1000, 10000, [(3096, D), (6904, Z)]),
    # the data at the very end of the volume
    ([(1 * MiB - 100, 100)], 4096, 0, 1 * MiB, [(1 * MiB - 4096, Z), (4096, D)]),
    # clipped to the volume's size
    ([], 4096, 1 * MiB - 4096, 1 * MiB, [(4096, Z)]),
])
def test_allocation_runs(tmp_path: Path, writes: list[tuple[int, int]], bs: int, offset: int, length: int,
                         expect: list[tuple[int, bool]]) -> None:
    f = tmp_path / "data"
    with open(f, "wb") as fh:
        fh.truncate(1 * MiB)
    fd = os.open(f, os.O_WRONLY)
    try:
        for off, n in writes:
            os.pwrite(fd, b"\x01" * n, off)
    finally:
        os.close(fd)
    if not _seek_data_works(f):
        pytest.skip("this filesystem does not report holes (SEEK_DATA): everything is data")
    assert allocation_runs(f, offset, length, block_size=bs, size=1 * MiB, max_runs=100) == expect


def test_allocation_runs_bounded_and_empty(tmp_path: Path) -> None:
    f = tmp_path / "data"
    with open(f, "wb") as fh:
        fh.truncate(1 * MiB)
    fd = os.open(f, os.O_WRONLY)
    for i in range(0, 1 * MiB, 8192):  # a checkerboard: 128 data blocks, 128 holes
        os.pwrite(fd, b"\x01" * 4096, i)
    os.close(fd)
    if not _seek_data_works(f):
        pytest.skip("this filesystem does not report holes (SEEK_DATA)")
    runs = allocation_runs(f, 0, 1 * MiB, block_size=4096, size=1 * MiB, max_runs=5)
    assert runs == [(4096, D), (4096, Z)] * 2 + [(4096, D)]  # fewer than asked, never more than max_runs
    assert allocation_runs(f, 1 * MiB, 4096, block_size=4096, size=1 * MiB, max_runs=5) == []
    with pytest.raises(FileNotFoundError):
        allocation_runs(tmp_path / "missing", 0, 4096, block_size=4096, size=1 * MiB, max_runs=5)


def _seek_data_works(f: Path) -> bool:
    fd = os.open(f, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_HOLE) < os.fstat(fd).st_size or os.lseek(fd, 0, os.SEEK_DATA) > 0
    except OSError:
        return True  # ENXIO: all hole
    finally:
        os.close(fd)
