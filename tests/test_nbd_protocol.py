"""The NBD wire protocol (syncrep.nbd.protocol): packing and parsing, no sockets.

Byte layouts are checked against the protocol document (NetworkBlockDevice/nbd
doc/proto.md): magics, field widths, big-endian order; malformed input raises
ProtocolError (close the connection) or OptionInvalid (NBD_REP_ERR_INVALID).
Also the pure helpers of the server: listen-address parsing, error mapping,
the range lock.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import struct

import pytest
from conftest import wait_until

from syncrep.errors import FailedPrecondition, InvalidArgument, PermissionDenied, Unavailable
from syncrep.nbd import protocol as p
from syncrep.nbd import server as nbd_server
from syncrep.nbd.server import ListenAddress, NbdError, RangeLock, nbd_errno, nbd_listen_type, parse_listen

# ---------------------------------------------------------------- constants


def test_magics_spell_what_the_document_says() -> None:
    assert struct.pack(">Q", p.NBDMAGIC) == b"NBDMAGIC"
    assert struct.pack(">Q", p.IHAVEOPT) == b"IHAVEOPT"
    assert p.OPT_REPLY_MAGIC == 0x3E889045565A9
    assert p.REQUEST_MAGIC == 0x25609513
    assert p.SIMPLE_REPLY_MAGIC == 0x67446698


def test_option_command_and_error_numbers() -> None:
    assert (p.OPT_EXPORT_NAME, p.OPT_ABORT, p.OPT_LIST, p.OPT_STARTTLS, p.OPT_INFO, p.OPT_GO) == (1, 2, 3, 5, 6, 7)
    assert (p.CMD_READ, p.CMD_WRITE, p.CMD_DISC, p.CMD_FLUSH, p.CMD_TRIM, p.CMD_WRITE_ZEROES) == (0, 1, 2, 3, 4, 6)
    assert p.REP_ERR_UNSUP == 2**31 + 1 and p.REP_ERR_UNKNOWN == 2**31 + 6 and p.REP_ERR_TOO_BIG == 2**31 + 9
    assert (p.EPERM, p.EIO, p.EINVAL, p.ENOSPC, p.ESHUTDOWN) == (1, 5, 22, 28, 108)
    assert p.INFO_EXPORT == 0 and p.INFO_BLOCK_SIZE == 3


# ---------------------------------------------------------------- handshake


def test_greeting_is_18_bytes_fixed_newstyle_no_zeroes() -> None:
    g = p.pack_greeting()
    assert len(g) == p.GREETING_BYTES == 18
    assert g[:16] == b"NBDMAGICIHAVEOPT"
    assert struct.unpack(">H", g[16:])[0] == p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES
    assert p.parse_greeting(g) == p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES


def test_greeting_parse_rejects_oldstyle_and_garbage() -> None:
    with pytest.raises(p.ProtocolError, match="newstyle"):
        p.parse_greeting(struct.pack(">QQH", p.NBDMAGIC, 0x00420281861253, 0))
    with pytest.raises(p.ProtocolError, match="magic"):
        p.parse_greeting(b"X" * 18)
    with pytest.raises(p.ProtocolError, match="18 bytes"):
        p.parse_greeting(b"NBDMAGIC")


@pytest.mark.parametrize("flags", [0, 1, 2, 3])
def test_client_flags_known_bits_accepted(flags: int) -> None:
    assert p.parse_client_flags(struct.pack(">I", flags)) == flags


@pytest.mark.parametrize("flags", [4, 1 << 31, 0xFFFFFFFF])
def test_client_flags_unknown_bits_refused(flags: int) -> None:
    with pytest.raises(p.ProtocolError, match="unknown"):
        p.parse_client_flags(struct.pack(">I", flags))


def test_client_no_zeroes_refused_when_server_did_not_offer_it() -> None:
    with pytest.raises(p.ProtocolError):
        p.parse_client_flags(struct.pack(">I", p.FLAG_C_NO_ZEROES), server_flags=p.FLAG_FIXED_NEWSTYLE)


def test_option_header_round_trip_and_bad_magic() -> None:
    raw = p.pack_option(p.OPT_GO, b"abc")
    assert raw[:8] == b"IHAVEOPT" and len(raw) == 16 + 3
    h = p.parse_option_header(raw[:16])
    assert (h.option, h.length, h.name) == (p.OPT_GO, 3, "NBD_OPT_GO")
    assert p.OptionHeader(99, 0).name == "option 99"
    with pytest.raises(p.ProtocolError, match="option magic"):
        p.parse_option_header(b"NOTMAGIC" + raw[8:16])


def test_option_reply_layout() -> None:
    raw = p.pack_option_reply(p.OPT_LIST, p.REP_SERVER, b"xy")
    assert len(raw) == 22
    magic, opt, kind, n = struct.unpack(">QIII", raw[:20])
    assert (magic, opt, kind, n) == (p.OPT_REPLY_MAGIC, p.OPT_LIST, p.REP_SERVER, 2)
    hdr = p.parse_option_reply_header(raw[:20])
    assert (hdr.option, hdr.reply_type, hdr.length, hdr.is_error) == (p.OPT_LIST, p.REP_SERVER, 2, False)


def test_error_reply_carries_message_and_error_bit() -> None:
    raw = p.pack_error_reply(p.OPT_GO, p.REP_ERR_UNKNOWN, "no export named 'x'")
    hdr = p.parse_option_reply_header(raw[:20])
    assert hdr.is_error and hdr.reply_type == p.REP_ERR_UNKNOWN
    assert raw[20:] == b"no export named 'x'"
    with pytest.raises(AssertionError):
        p.pack_error_reply(p.OPT_GO, p.REP_ACK)


def test_long_messages_are_clipped_to_4096_bytes_on_a_character_boundary() -> None:
    raw = p.pack_error_reply(p.OPT_GO, p.REP_ERR_INVALID, "é" * 5000)
    msg = raw[20:]
    assert len(msg) <= p.MAX_STRING_BYTES
    msg.decode("utf-8")  # still valid UTF-8


def test_export_name_reply_with_and_without_zeroes() -> None:
    flags = p.transmission_flags(read_only=False)
    assert p.pack_export_name_reply(1 << 30, flags, no_zeroes=True) == struct.pack(">QH", 1 << 30, flags)
    full = p.pack_export_name_reply(1 << 30, flags, no_zeroes=False)
    assert len(full) == 10 + 124 and full[10:] == bytes(124)


def test_export_name_option_must_be_a_valid_string() -> None:
    assert p.parse_export_name_option(b"vol0") == "vol0"
    assert p.parse_export_name_option(b"") == ""
    with pytest.raises(p.ProtocolError, match="NUL"):
        p.parse_export_name_option(b"v\0l")
    with pytest.raises(p.ProtocolError, match="UTF-8"):
        p.parse_export_name_option(b"\xff\xfe")
    with pytest.raises(p.ProtocolError, match="4096"):
        p.parse_export_name_option(b"a" * 4097)


def test_info_request_round_trip() -> None:
    raw = p.pack_info_request("vol0@snap", (p.INFO_BLOCK_SIZE, p.INFO_NAME))
    req = p.parse_info_request(raw)
    assert req.name == "vol0@snap" and req.requests == (p.INFO_BLOCK_SIZE, p.INFO_NAME)
    assert req.wants_block_size
    assert not p.parse_info_request(p.pack_info_request("v", ())).wants_block_size


@pytest.mark.parametrize(
    "raw, why",
    [
        (b"", "too short"),
        (b"\0\0\0", "too short"),
        (struct.pack(">I", 100) + b"vol0" + struct.pack(">H", 0), "overruns"),
        (struct.pack(">I", 4) + b"vol0" + struct.pack(">H", 2) + b"\0\3", "information requests"),
        (struct.pack(">I", 4) + b"vol0" + struct.pack(">H", 0) + b"junk", "information requests"),
        (struct.pack(">I", 2) + b"\0a" + struct.pack(">H", 0), "NUL"),
    ],
)
def test_info_request_malformed(raw: bytes, why: str) -> None:
    with pytest.raises(p.OptionInvalid, match=why):
        p.parse_info_request(raw)


def test_info_payloads() -> None:
    flags = p.transmission_flags(read_only=True)
    e = p.pack_info_export(123456, flags)
    assert e == struct.pack(">HQH", 0, 123456, flags)
    assert p.parse_info_reply(e) == (p.INFO_EXPORT, (123456, flags))
    bsz = p.pack_info_block_size(4096, 4096, 4 << 20)
    assert bsz == struct.pack(">HIII", 3, 4096, 4096, 4 << 20)
    assert p.parse_info_reply(bsz) == (p.INFO_BLOCK_SIZE, (4096, 4096, 4 << 20))
    assert p.parse_info_reply(p.pack_info_name("vol0")) == (p.INFO_NAME, "vol0")
    assert p.parse_info_reply(p.pack_info_description("d")) == (p.INFO_DESCRIPTION, "d")


def test_rep_server_round_trip() -> None:
    raw = p.pack_rep_server("vol0", "details")
    assert raw[:4] == struct.pack(">I", 4)
    assert p.parse_rep_server(raw) == "vol0"
    with pytest.raises(p.ProtocolError):
        p.parse_rep_server(struct.pack(">I", 9) + b"ab")


def test_transmission_flags() -> None:
    rw = p.transmission_flags(read_only=False)
    ro = p.transmission_flags(read_only=True)
    for f in (p.FLAG_HAS_FLAGS, p.FLAG_SEND_FLUSH, p.FLAG_SEND_FUA, p.FLAG_CAN_MULTI_CONN):
        assert rw & f and ro & f
    assert rw & p.FLAG_SEND_TRIM and rw & p.FLAG_SEND_WRITE_ZEROES and not rw & p.FLAG_READ_ONLY
    assert ro & p.FLAG_READ_ONLY and not ro & (p.FLAG_SEND_TRIM | p.FLAG_SEND_WRITE_ZEROES)
    assert not rw & p.FLAG_SEND_DF  # no structured replies, so no DF
    assert not p.transmission_flags(read_only=False, multi_conn=False) & p.FLAG_CAN_MULTI_CONN


@pytest.mark.parametrize(
    "block_size, asked, expect",
    [
        (4096, True, (4096, 4096, 4 << 20)),
        (4096, False, (1, 4096, 4 << 20)),  # a client that did not ask may send anything: RMW
        (512, True, (512, 4096, 4 << 20)),
        (65536, True, (65536, 65536, 4 << 20)),
        (131072, True, (1, 131072, 4 << 20)),  # above 64 KiB: not expressible as a minimum
        (6144, True, (1, 8192, 4 << 20)),  # not a power of two
    ],
)
def test_block_size_constraints(block_size: int, asked: bool, expect: tuple[int, int, int]) -> None:
    got = p.block_size_constraints(block_size, 4 << 20, client_asked=asked)
    assert got == expect
    mn, pref, mx = got
    # The document's rules: powers of two, preferred >= max(min, 512), max a multiple of min.
    assert mn & (mn - 1) == 0 and mn <= 65536
    assert pref & (pref - 1) == 0 and pref >= max(mn, 512)
    assert mx % mn == 0 and mx >= min(pref, 32 << 20)


def test_block_size_constraints_reject_nonsense() -> None:
    with pytest.raises(ValueError):
        p.block_size_constraints(0, 4096, client_asked=True)


# ---------------------------------------------------------------- transmission


def test_request_layout_and_round_trip() -> None:
    raw = p.pack_request(p.CMD_WRITE, handle=0x1122334455667788, offset=1 << 40, length=4096, flags=p.CMD_FLAG_FUA)
    assert len(raw) == p.REQUEST_HEADER_BYTES == 28
    assert raw[:4] == struct.pack(">I", p.REQUEST_MAGIC)
    r = p.parse_request(raw)
    assert (r.type, r.handle, r.offset, r.length, r.fua, r.has_payload, r.name) == (
        p.CMD_WRITE, 0x1122334455667788, 1 << 40, 4096, True, True, "WRITE"
    )
    assert not p.parse_request(p.pack_request(p.CMD_READ, 1, 0, 512)).has_payload
    assert p.Request(0, 42, 0, 0, 0).name == "command 42"


def test_request_bad_magic_or_size() -> None:
    raw = bytearray(p.pack_request(p.CMD_READ, 1, 0, 512))
    raw[0] ^= 0xFF
    with pytest.raises(p.ProtocolError, match="request magic"):
        p.parse_request(bytes(raw))
    with pytest.raises(p.ProtocolError, match="28 bytes"):
        p.parse_request(b"\0" * 27)


def test_simple_reply_round_trip() -> None:
    raw = p.pack_simple_reply(p.EPERM, 0xABCDEF)
    assert len(raw) == 16 and raw[:4] == struct.pack(">I", p.SIMPLE_REPLY_MAGIC)
    assert p.parse_simple_reply(raw) == (p.EPERM, 0xABCDEF)
    with pytest.raises(p.ProtocolError):
        p.parse_simple_reply(b"\0" * 16)


@pytest.mark.parametrize(
    "kind, flags, ok",
    [
        (p.CMD_WRITE, p.CMD_FLAG_FUA, True),
        (p.CMD_READ, p.CMD_FLAG_FUA, True),  # clients are known to set FUA anywhere
        (p.CMD_WRITE_ZEROES, p.CMD_FLAG_NO_HOLE | p.CMD_FLAG_FUA, True),
        (p.CMD_WRITE, p.CMD_FLAG_NO_HOLE, False),
        (p.CMD_READ, p.CMD_FLAG_DF, False),  # DF needs structured replies
        (p.CMD_WRITE_ZEROES, p.CMD_FLAG_FAST_ZERO, False),  # not advertised
        (p.CMD_FLUSH, 1 << 9, False),
        (p.CMD_BLOCK_STATUS, 0, True),  # flags fine; the command itself is refused elsewhere
    ],
)
def test_request_flag_check(kind: int, flags: int, ok: bool) -> None:
    why = p.check_request_flags(p.Request(flags, kind, 1, 0, 0))
    assert (why is None) == ok, why


# ---------------------------------------------------------------- server helpers (pure)


def test_parse_listen_forms() -> None:
    assert parse_listen("") == []
    assert parse_listen("127.0.0.1:10809") == [ListenAddress(host="127.0.0.1", port=10809)]
    assert parse_listen("[::1]:0") == [ListenAddress(host="::1", port=0)]
    assert parse_listen("unix:/run/x.sock") == [ListenAddress(path="/run/x.sock")]
    assert parse_listen("/run/x.sock, 0.0.0.0:1") == [
        ListenAddress(path="/run/x.sock"), ListenAddress(host="0.0.0.0", port=1)
    ]
    assert str(ListenAddress(host="::1", port=5)) == "[::1]:5"
    assert str(ListenAddress(path="/s")) == "unix:/s"


@pytest.mark.parametrize("bad", ["localhost", "host:port", ":10809", "1.2.3.4:70000", "unix:", ","])
def test_parse_listen_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="NBD listen address"):
        parse_listen(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        nbd_listen_type(bad)


def test_nbd_listen_type_accepts_off() -> None:
    assert nbd_listen_type("") == ""
    assert nbd_listen_type(" 127.0.0.1:1 ") == "127.0.0.1:1"


@pytest.mark.parametrize(
    "exc, code",
    [
        (NbdError(p.ENOSPC, "x"), p.ENOSPC),
        (PermissionDenied("ro"), p.EPERM),
        (InvalidArgument("bad"), p.EINVAL),
        (Unavailable("down"), p.EIO),
        (FailedPrecondition("not primary"), p.EIO),
        (OSError(errno.ENOSPC, "full"), p.ENOSPC),
        (OSError(errno.EDQUOT, "quota"), p.ENOSPC),
        (OSError(errno.EIO, "disk"), p.EIO),
        (RuntimeError("bug"), p.EIO),
    ],
)
def test_error_mapping(exc: BaseException, code: int) -> None:
    assert nbd_errno(exc) == code


async def test_range_lock_serialises_overlaps_only() -> None:
    locks = RangeLock()
    order: list[str] = []
    release_a = asyncio.Event()

    async def hold(name: str, start: int, end: int, until: asyncio.Event | None = None) -> None:
        async with locks.hold(start, end):
            order.append(f"+{name}")
            if until is not None:
                await until.wait()
            order.append(f"-{name}")

    a = asyncio.create_task(hold("a", 0, 8192, release_a))  # holds its range until released
    await wait_until(lambda: "+a" in order, "a holds its range")
    b = asyncio.create_task(hold("b", 4096, 12288))  # overlaps a: waits
    c = asyncio.create_task(hold("c", 8192, 16384))  # disjoint from a: runs now
    await wait_until(lambda: "-c" in order, "c (disjoint from a) ran to the end while a held its range")
    # b started before c (tasks start in creation order): had it not waited for a, "+b" would be here.
    assert "+b" not in order, order
    release_a.set()
    await asyncio.gather(a, b, c)
    assert order.index("+c") < order.index("-a")
    assert order.index("+b") > order.index("-a")
    assert len(locks) == 0


# ---------------------------------------------------------------- TLS (issue 11)


def test_tls_option_and_reply_numbers() -> None:
    """NBD_OPT_STARTTLS = 5; NBD_REP_ERR_POLICY = 2^31 + 2, NBD_REP_ERR_TLS_REQD = 2^31 + 5."""
    assert p.OPT_STARTTLS == 5 and p.OPT_NAMES[p.OPT_STARTTLS] == "NBD_OPT_STARTTLS"
    assert p.REP_ERR_POLICY == 2**31 + 2 and p.REP_ERR_TLS_REQD == 2**31 + 5
    raw = p.pack_error_reply(p.OPT_GO, p.REP_ERR_TLS_REQD, "TLS first")
    hdr = p.parse_option_reply_header(raw[:20])
    assert hdr.is_error and (hdr.option, hdr.reply_type, raw[20:]) == (p.OPT_GO, p.REP_ERR_TLS_REQD, b"TLS first")


@pytest.mark.parametrize(
    "listen, safe",
    [
        ("unix:/run/x.sock", True),
        ("127.0.0.1:1", True),
        ("127.200.0.9:1", True),  # all of 127.0.0.0/8
        ("[::1]:1", True),
        ("[::ffff:127.0.0.1]:1", True),  # IPv4-mapped loopback
        ("localhost:1", True),
        ("LOCALHOST:1", True),
        ("0.0.0.0:1", False),  # every interface
        ("[::]:1", False),
        ("10.0.0.5:1", False),
        ("[fe80::1]:1", False),
        ("[::ffff:10.0.0.5]:1", False),
        ("localhost.example.com:1", False),  # a host name: its addresses are not ours to trust
        ("node-a:1", False),
    ],
)
def test_plaintext_is_safe_only_on_unix_and_loopback(listen: str, safe: bool) -> None:
    [a] = parse_listen(listen)
    assert nbd_server.is_plaintext_safe(a) is safe
