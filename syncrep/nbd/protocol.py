"""The NBD wire protocol: constants and (un)packing, no I/O.

Follows the protocol document of the reference implementation
(NetworkBlockDevice/nbd, ``doc/proto.md``): the fixed newstyle handshake,
option haggling with ``NBD_OPT_EXPORT_NAME``, ``NBD_OPT_ABORT``,
``NBD_OPT_LIST``, ``NBD_OPT_INFO``, ``NBD_OPT_GO``, ``NBD_OPT_STRUCTURED_REPLY``
and ``NBD_OPT_LIST_META_CONTEXT`` / ``NBD_OPT_SET_META_CONTEXT`` (the one
context ``base:allocation``), and the transmission phase with simple replies,
or structured reply chunks once negotiated (``NBD_REPLY_TYPE_OFFSET_DATA``,
``OFFSET_HOLE``, ``BLOCK_STATUS``, ``ERROR``). Everything is big-endian
("network byte order").

The options that change what transmission looks like (structured replies, the
selected metadata contexts) are per-connection state kept by
:class:`Negotiation`, a pure state machine the server feeds with option data
and whose replies it sends: the rules of the document (structured replies
first, ``NBD_OPT_SET_META_CONTEXT`` replaces the selection even when it fails,
``NBD_OPT_STARTTLS`` forgets everything, block status only on the export the
contexts were selected for) are kept in one place and tested as data tables.

Every parser takes exactly the bytes of one message part (the caller reads a
fixed-size header, then the length it announces) and raises
:class:`ProtocolError` when the client broke a MUST of the document; the
server closes that one connection. Option data that is merely unacceptable
(a bad ``NBD_OPT_GO`` payload, say) raises :class:`OptionInvalid`, which the
server answers with ``NBD_REP_ERR_INVALID`` and carries on haggling.

The packers for the *client* side (``pack_*_request``, ``parse_*_reply``)
exist for tests and tools; the server never uses them.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

# ---------------------------------------------------------------- magics

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC" (INIT_PASSWD)
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle server magic and option request magic
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# ---------------------------------------------------------------- handshake flags

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
# Client flags (the same bits, sent back by the client).
FLAG_C_FIXED_NEWSTYLE = FLAG_FIXED_NEWSTYLE
FLAG_C_NO_ZEROES = FLAG_NO_ZEROES
SERVER_HANDSHAKE_FLAGS = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
KNOWN_CLIENT_FLAGS = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

# ---------------------------------------------------------------- transmission flags

FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8

# ---------------------------------------------------------------- options

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

OPT_NAMES = {
    OPT_EXPORT_NAME: "NBD_OPT_EXPORT_NAME",
    OPT_ABORT: "NBD_OPT_ABORT",
    OPT_LIST: "NBD_OPT_LIST",
    OPT_PEEK_EXPORT: "NBD_OPT_PEEK_EXPORT",
    OPT_STARTTLS: "NBD_OPT_STARTTLS",
    OPT_INFO: "NBD_OPT_INFO",
    OPT_GO: "NBD_OPT_GO",
    OPT_STRUCTURED_REPLY: "NBD_OPT_STRUCTURED_REPLY",
    OPT_LIST_META_CONTEXT: "NBD_OPT_LIST_META_CONTEXT",
    OPT_SET_META_CONTEXT: "NBD_OPT_SET_META_CONTEXT",
    OPT_EXTENDED_HEADERS: "NBD_OPT_EXTENDED_HEADERS",
}

# ---------------------------------------------------------------- option replies

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9

# NBD_REP_INFO payload types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# ---------------------------------------------------------------- commands

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_NAMES = {
    CMD_READ: "READ",
    CMD_WRITE: "WRITE",
    CMD_DISC: "DISC",
    CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM",
    CMD_CACHE: "CACHE",
    CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# Command flags this server accepts per command. FUA is "valid for all
# commands" once NBD_FLAG_SEND_FUA is advertised (clients are known to set it
# on reads and flushes too); NO_HOLE only means something to WRITE_ZEROES.
# Anything else (DF without structured replies, FAST_ZERO without
# NBD_FLAG_SEND_FAST_ZERO, unknown bits) gets EINVAL.
ALLOWED_CMD_FLAGS = {
    CMD_READ: CMD_FLAG_FUA,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_DISC: CMD_FLAG_FUA,
    CMD_FLUSH: CMD_FLAG_FUA,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
    CMD_BLOCK_STATUS: CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
}

# ---------------------------------------------------------------- structured replies

REPLY_FLAG_DONE = 1 << 0

REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2
REPLY_TYPE_FLAG_ERROR = 1 << 15

REPLY_TYPE_NAMES = {
    REPLY_TYPE_NONE: "NBD_REPLY_TYPE_NONE",
    REPLY_TYPE_OFFSET_DATA: "NBD_REPLY_TYPE_OFFSET_DATA",
    REPLY_TYPE_OFFSET_HOLE: "NBD_REPLY_TYPE_OFFSET_HOLE",
    REPLY_TYPE_BLOCK_STATUS: "NBD_REPLY_TYPE_BLOCK_STATUS",
    REPLY_TYPE_ERROR: "NBD_REPLY_TYPE_ERROR",
    REPLY_TYPE_ERROR_OFFSET: "NBD_REPLY_TYPE_ERROR_OFFSET",
}

# ---------------------------------------------------------------- metadata contexts

#: The one context this server offers: is a range allocated in the backing file.
META_BASE_ALLOCATION = "base:allocation"
#: Its id in NBD_REP_META_CONTEXT replies to NBD_OPT_SET_META_CONTEXT (any value
#: the server picks; LIST replies carry the reserved 0).
META_BASE_ALLOCATION_ID = 1
#: base:allocation flags: not allocated in the backend / reads as all zeroes.
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
#: Most extents in one NBD_REPLY_TYPE_BLOCK_STATUS chunk. The document says
#: SHOULD NOT exceed 2^20 and lets the server return fewer than asked (the
#: client asks again from where the reply ended); 16 Ki extents keep a reply
#: at 128 KiB and the SEEK_DATA/SEEK_HOLE walk behind it short.
MAX_BLOCK_STATUS_EXTENTS = 16 * 1024
#: Largest length of one extent (a 32-bit field).
MAX_EXTENT_BYTES = (1 << 32) - 1

# ---------------------------------------------------------------- errors (reply error field)

EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

ERROR_NAMES = {
    0: "OK",
    EPERM: "EPERM",
    EIO: "EIO",
    ENOMEM: "ENOMEM",
    EINVAL: "EINVAL",
    ENOSPC: "ENOSPC",
    EOVERFLOW: "EOVERFLOW",
    ENOTSUP: "ENOTSUP",
    ESHUTDOWN: "ESHUTDOWN",
}

# ---------------------------------------------------------------- sizes and limits

GREETING_BYTES = 18  # NBDMAGIC, IHAVEOPT, 16-bit handshake flags
CLIENT_FLAGS_BYTES = 4
OPTION_HEADER_BYTES = 16  # IHAVEOPT, option, length
REQUEST_HEADER_BYTES = 28
SIMPLE_REPLY_BYTES = 16
OPTION_REPLY_HEADER_BYTES = 20
EXPORT_NAME_ZEROES = 124
# Strings (export names, messages) "MUST be no longer than 4096 bytes".
MAX_STRING_BYTES = 4096
# Block size constraints the document allows: minimum a power of two in
# [1, 64 KiB]; preferred a power of two >= max(minimum, 512).
MAX_MIN_BLOCK_SIZE = 64 * 1024
MIN_PREFERRED_BLOCK_SIZE = 512

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_GREETING = struct.Struct(">QQH")
_OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY_HEADER = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_EXPORT_NAME_REPLY = struct.Struct(">QH")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_STRUCTURED_REPLY = struct.Struct(">IHHQI")
_OFFSET_HOLE = struct.Struct(">QI")
_U64 = struct.Struct(">Q")
_EXTENT = struct.Struct(">II")
_ERROR_PAYLOAD = struct.Struct(">IH")


class ProtocolError(Exception):
    """The peer broke a mandatory rule of the protocol: close the connection."""


class OptionInvalid(Exception):
    """Option data the server understands but cannot accept (NBD_REP_ERR_INVALID)."""


# ---------------------------------------------------------------- handshake


def pack_greeting(handshake_flags: int = SERVER_HANDSHAKE_FLAGS) -> bytes:
    """S: NBDMAGIC, IHAVEOPT, 16-bit handshake flags (fixed newstyle)."""
    return _GREETING.pack(NBDMAGIC, IHAVEOPT, handshake_flags)


def parse_greeting(data: bytes) -> int:
    """Client side: the server's handshake flags."""
    _need(data, GREETING_BYTES, "greeting")
    magic, opt_magic, flags = _GREETING.unpack(data)
    if magic != NBDMAGIC:
        raise ProtocolError(f"bad server magic 0x{magic:016x} (expected NBDMAGIC)")
    if opt_magic != IHAVEOPT:
        raise ProtocolError(f"not a newstyle server: magic 0x{opt_magic:016x} (expected IHAVEOPT)")
    return int(flags)


def parse_client_flags(data: bytes, server_flags: int = SERVER_HANDSHAKE_FLAGS) -> int:
    """C: 32-bit client flags. Unknown flags, or a flag the server did not
    offer, MUST make the server drop the connection."""
    _need(data, CLIENT_FLAGS_BYTES, "client flags")
    (flags,) = _U32.unpack(data)
    unknown = flags & ~(KNOWN_CLIENT_FLAGS & server_flags)
    if unknown:
        raise ProtocolError(f"client flags 0x{flags:08x} set unknown or unoffered bits 0x{unknown:08x}")
    return int(flags)


def pack_client_flags(flags: int = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) -> bytes:
    return _U32.pack(flags)


@dataclass(frozen=True)
class OptionHeader:
    option: int
    length: int

    @property
    def name(self) -> str:
        return OPT_NAMES.get(self.option, f"option {self.option}")


def parse_option_header(data: bytes) -> OptionHeader:
    """C: IHAVEOPT, 32-bit option, 32-bit length (the data follows)."""
    _need(data, OPTION_HEADER_BYTES, "option header")
    magic, option, length = _OPTION_HEADER.unpack(data)
    if magic != IHAVEOPT:
        raise ProtocolError(f"bad option magic 0x{magic:016x} (expected IHAVEOPT)")
    return OptionHeader(int(option), int(length))


def pack_option(option: int, data: bytes = b"") -> bytes:
    """Client side: one option request."""
    return _OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def pack_option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    """S: reply magic, the option replied to, reply type, length, data."""
    return _OPTION_REPLY_HEADER.pack(OPT_REPLY_MAGIC, option, reply_type, len(data)) + data


@dataclass(frozen=True)
class OptionReplyHeader:
    option: int
    reply_type: int
    length: int

    @property
    def is_error(self) -> bool:
        return bool(self.reply_type & REP_FLAG_ERROR)


def parse_option_reply_header(data: bytes) -> OptionReplyHeader:
    """Client side: the 20-byte header of an option reply."""
    _need(data, OPTION_REPLY_HEADER_BYTES, "option reply header")
    magic, option, reply_type, length = _OPTION_REPLY_HEADER.unpack(data)
    if magic != OPT_REPLY_MAGIC:
        raise ProtocolError(f"bad option reply magic 0x{magic:x}")
    return OptionReplyHeader(int(option), int(reply_type), int(length))


def pack_error_reply(option: int, reply_type: int, message: str = "") -> bytes:
    """An error reply (bit 31 set) with a human-readable message."""
    assert reply_type & REP_FLAG_ERROR, reply_type
    return pack_option_reply(option, reply_type, _clip_string(message))


def decode_name(data: bytes, what: str = "export name") -> str:
    """A protocol string: UTF-8, no NUL, at most 4096 bytes."""
    if len(data) > MAX_STRING_BYTES:
        raise OptionInvalid(f"{what} is {len(data)} bytes; the limit is {MAX_STRING_BYTES}")
    if b"\0" in data:
        raise OptionInvalid(f"{what} contains a NUL byte")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OptionInvalid(f"{what} is not valid UTF-8: {e}") from None


def parse_export_name_option(data: bytes) -> str:
    """NBD_OPT_EXPORT_NAME data: the name, its length taken from the option header."""
    try:
        return decode_name(data)
    except OptionInvalid as e:  # this option cannot be answered with an error
        raise ProtocolError(str(e)) from None


def pack_export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    """S (after NBD_OPT_EXPORT_NAME): size, transmission flags, 124 zeroes
    unless NBD_FLAG_C_NO_ZEROES was negotiated."""
    return _EXPORT_NAME_REPLY.pack(size, flags) + (b"" if no_zeroes else bytes(EXPORT_NAME_ZEROES))


@dataclass(frozen=True)
class InfoRequest:
    """NBD_OPT_INFO / NBD_OPT_GO data: the export name and the NBD_INFO_* asked for."""

    name: str
    requests: tuple[int, ...]

    @property
    def wants_block_size(self) -> bool:
        return INFO_BLOCK_SIZE in self.requests


def parse_info_request(data: bytes) -> InfoRequest:
    """32-bit name length, name, 16-bit count, count x 16-bit info types."""
    if len(data) < 6:
        raise OptionInvalid(f"option data of {len(data)} bytes is too short (at least 6)")
    (name_len,) = _U32.unpack_from(data, 0)
    if name_len > len(data) - 6:
        raise OptionInvalid(f"export name length {name_len} overruns the {len(data)}-byte option data")
    name = decode_name(data[4:4 + name_len])
    (count,) = _U16.unpack_from(data, 4 + name_len)
    rest = data[6 + name_len:]
    if len(rest) != 2 * count:
        raise OptionInvalid(
            f"{count} information requests need {2 * count} bytes, but {len(rest)} follow the name"
        )
    reqs = tuple(int(_U16.unpack_from(rest, 2 * i)[0]) for i in range(count))
    return InfoRequest(name, reqs)


def pack_info_request(name: str, requests: tuple[int, ...] = (INFO_BLOCK_SIZE,)) -> bytes:
    """Client side: NBD_OPT_INFO / NBD_OPT_GO data."""
    raw = name.encode()
    return _U32.pack(len(raw)) + raw + _U16.pack(len(requests)) + b"".join(_U16.pack(r) for r in requests)


def pack_info_export(size: int, flags: int) -> bytes:
    """NBD_REP_INFO payload NBD_INFO_EXPORT: size and transmission flags."""
    return _INFO_EXPORT.pack(INFO_EXPORT, size, flags)


def pack_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    """NBD_REP_INFO payload NBD_INFO_BLOCK_SIZE: minimum, preferred, maximum."""
    return _INFO_BLOCK_SIZE.pack(INFO_BLOCK_SIZE, minimum, preferred, maximum)


def pack_info_name(name: str) -> bytes:
    return _U16.pack(INFO_NAME) + _clip_string(name)


def pack_info_description(text: str) -> bytes:
    return _U16.pack(INFO_DESCRIPTION) + _clip_string(text)


def parse_info_reply(data: bytes) -> tuple[int, tuple[int, ...] | str]:
    """Client side: an NBD_REP_INFO payload -> (info type, values or string)."""
    if len(data) < 2:
        raise ProtocolError("NBD_REP_INFO payload shorter than 2 bytes")
    (kind,) = _U16.unpack_from(data, 0)
    if kind == INFO_EXPORT:
        _need(data, _INFO_EXPORT.size, "NBD_INFO_EXPORT")
        _, size, flags = _INFO_EXPORT.unpack(data)
        return INFO_EXPORT, (int(size), int(flags))
    if kind == INFO_BLOCK_SIZE:
        _need(data, _INFO_BLOCK_SIZE.size, "NBD_INFO_BLOCK_SIZE")
        _, mn, pref, mx = _INFO_BLOCK_SIZE.unpack(data)
        return INFO_BLOCK_SIZE, (int(mn), int(pref), int(mx))
    return int(kind), data[2:].decode("utf-8", "replace")


def pack_rep_server(name: str, description: str = "") -> bytes:
    """NBD_REP_SERVER payload (a reply to NBD_OPT_LIST): 32-bit name length, name, details."""
    raw = _clip_string(name)
    return _U32.pack(len(raw)) + raw + _clip_string(description)


def parse_rep_server(data: bytes) -> str:
    """Client side: the export name in an NBD_REP_SERVER payload."""
    if len(data) < 4:
        raise ProtocolError("NBD_REP_SERVER payload shorter than 4 bytes")
    (n,) = _U32.unpack_from(data, 0)
    if n > len(data) - 4:
        raise ProtocolError(f"NBD_REP_SERVER name length {n} overruns the payload")
    return data[4:4 + n].decode("utf-8", "replace")


def transmission_flags(read_only: bool, *, multi_conn: bool = True) -> int:
    """What this server offers on an export: flush, FUA, trim, write zeroes
    (all writable exports), read-only and multi-connection consistency."""
    flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA
    if read_only:
        flags |= FLAG_READ_ONLY
    else:
        flags |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES
    if multi_conn:
        flags |= FLAG_CAN_MULTI_CONN
    return flags


def block_size_constraints(block_size: int, max_request: int, *, client_asked: bool) -> tuple[int, int, int]:
    """(minimum, preferred, maximum) to advertise in NBD_INFO_BLOCK_SIZE.

    The volume's write path is block-aligned, so the natural minimum is its
    block size. A client that did not ask for NBD_INFO_BLOCK_SIZE is not
    bound to honour a minimum, so it is told 1 (the server then handles
    unaligned requests by read-modify-write). The same holds for a block
    size the document cannot express (not a power of two, or above 64 KiB).
    Preferred: the block size, at least 4 KiB. Maximum: ``max_request``
    rounded down to a multiple of the minimum.
    """
    if block_size <= 0 or max_request <= 0:
        raise ValueError(f"block size {block_size} and max request {max_request} must be > 0")
    expressible = _is_pow2(block_size) and block_size <= MAX_MIN_BLOCK_SIZE
    minimum = block_size if client_asked and expressible else 1
    preferred = max(4096, block_size if _is_pow2(block_size) else 1 << (block_size - 1).bit_length())
    maximum = max(max_request - max_request % minimum, minimum)
    return minimum, preferred, maximum


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# ---------------------------------------------------------------- transmission


@dataclass(frozen=True)
class Request:
    flags: int
    type: int
    handle: int
    offset: int
    length: int

    @property
    def name(self) -> str:
        return CMD_NAMES.get(self.type, f"command {self.type}")

    @property
    def fua(self) -> bool:
        return bool(self.flags & CMD_FLAG_FUA)

    @property
    def has_payload(self) -> bool:
        """Only NBD_CMD_WRITE carries data after the header."""
        return self.type == CMD_WRITE


def parse_request(data: bytes) -> Request:
    """C: magic, 16-bit flags, 16-bit type, 64-bit handle, 64-bit offset, 32-bit length."""
    _need(data, REQUEST_HEADER_BYTES, "request header")
    magic, flags, kind, handle, offset, length = _REQUEST.unpack(data)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic 0x{magic:08x} (expected 0x{REQUEST_MAGIC:08x})")
    return Request(int(flags), int(kind), int(handle), int(offset), int(length))


def pack_request(kind: int, handle: int, offset: int = 0, length: int = 0, flags: int = 0) -> bytes:
    """Client side: a request header (append the data of a WRITE yourself)."""
    return _REQUEST.pack(REQUEST_MAGIC, flags, kind, handle, offset, length)


def pack_simple_reply(error: int, handle: int) -> bytes:
    """S: simple reply header (the data of a successful READ follows)."""
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def parse_simple_reply(data: bytes) -> tuple[int, int]:
    """Client side: (error, handle) of a simple reply header."""
    _need(data, SIMPLE_REPLY_BYTES, "simple reply")
    magic, error, handle = _SIMPLE_REPLY.unpack(data)
    if magic != SIMPLE_REPLY_MAGIC:
        raise ProtocolError(f"bad reply magic 0x{magic:08x}")
    return int(error), int(handle)


def pack_structured_header(flags: int, kind: int, handle: int, length: int) -> bytes:
    """S: structured reply chunk header: magic, 16-bit flags, 16-bit type,
    64-bit handle (cookie), 32-bit payload length (the payload follows)."""
    return _STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, flags, kind, handle, length)


def pack_offset_data_header(handle: int, offset: int, data_len: int, *, done: bool) -> bytes:
    """NBD_REPLY_TYPE_OFFSET_DATA up to its data: the chunk header and the
    64-bit offset. The caller sends the ``data_len`` (>= 1) bytes after it, so
    the data is never copied into the header."""
    if data_len < 1:
        raise ValueError("an NBD_REPLY_TYPE_OFFSET_DATA chunk carries at least one byte")
    return pack_structured_header(REPLY_FLAG_DONE if done else 0, REPLY_TYPE_OFFSET_DATA, handle,
                                  8 + data_len) + _U64.pack(offset)


def pack_offset_hole(handle: int, offset: int, size: int, *, done: bool) -> bytes:
    """NBD_REPLY_TYPE_OFFSET_HOLE: ``size`` (1 .. 2^32-1) bytes at ``offset`` read as zeroes."""
    if not 0 < size <= MAX_EXTENT_BYTES:
        raise ValueError(f"hole size {size} is outside 1 .. {MAX_EXTENT_BYTES}")
    return pack_structured_header(REPLY_FLAG_DONE if done else 0, REPLY_TYPE_OFFSET_HOLE, handle,
                                  _OFFSET_HOLE.size) + _OFFSET_HOLE.pack(offset, size)


def pack_block_status(handle: int, context_id: int, extents: Sequence[tuple[int, int]], *,
                      done: bool = True) -> bytes:
    """NBD_REPLY_TYPE_BLOCK_STATUS: the context id, then (length, flags) per extent."""
    if not extents:
        raise ValueError("a block status chunk carries at least one extent")
    payload = _U32.pack(context_id) + b"".join(_EXTENT.pack(n, f) for n, f in extents)
    return pack_structured_header(REPLY_FLAG_DONE if done else 0, REPLY_TYPE_BLOCK_STATUS, handle,
                                  len(payload)) + payload


def pack_structured_error(handle: int, error: int, message: str = "") -> bytes:
    """NBD_REPLY_TYPE_ERROR, the final chunk: error (nonzero), 16-bit message length, message."""
    if error == 0:
        raise ValueError("an error chunk needs a nonzero error")
    msg = _clip_string(message)
    return pack_structured_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle,
                                  _ERROR_PAYLOAD.size + len(msg)) + _ERROR_PAYLOAD.pack(error, len(msg)) + msg


def pack_structured_none(handle: int) -> bytes:
    """NBD_REPLY_TYPE_NONE with NBD_REPLY_FLAG_DONE: the reply ends, successfully."""
    return pack_structured_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0)


@dataclass(frozen=True)
class StructuredHeader:
    flags: int
    type: int
    handle: int
    length: int

    @property
    def done(self) -> bool:
        return bool(self.flags & REPLY_FLAG_DONE)

    @property
    def is_error(self) -> bool:
        return bool(self.type & REPLY_TYPE_FLAG_ERROR)


#: Bytes of a structured reply chunk header.
STRUCTURED_REPLY_BYTES = _STRUCTURED_REPLY.size


def parse_reply_magic(data: bytes) -> int:
    """Client side: the magic of the next reply (simple or structured), from its first 4 bytes."""
    _need(data, 4, "reply magic")
    (magic,) = _U32.unpack(data)
    if magic not in (SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC):
        raise ProtocolError(f"bad reply magic 0x{magic:08x}")
    return int(magic)


def parse_structured_header(data: bytes) -> StructuredHeader:
    """Client side: the 20-byte header of a structured reply chunk."""
    _need(data, STRUCTURED_REPLY_BYTES, "structured reply header")
    magic, flags, kind, handle, length = _STRUCTURED_REPLY.unpack(data)
    if magic != STRUCTURED_REPLY_MAGIC:
        raise ProtocolError(f"bad structured reply magic 0x{magic:08x}")
    return StructuredHeader(int(flags), int(kind), int(handle), int(length))


def parse_offset_hole(payload: bytes) -> tuple[int, int]:
    """Client side: (offset, size) of an NBD_REPLY_TYPE_OFFSET_HOLE payload."""
    _need(payload, _OFFSET_HOLE.size, "NBD_REPLY_TYPE_OFFSET_HOLE payload")
    offset, size = _OFFSET_HOLE.unpack(payload)
    if size == 0:
        raise ProtocolError("NBD_REPLY_TYPE_OFFSET_HOLE of size 0")
    return int(offset), int(size)


def parse_offset_data(payload: bytes) -> tuple[int, bytes]:
    """Client side: (offset, data) of an NBD_REPLY_TYPE_OFFSET_DATA payload."""
    if len(payload) < 9:
        raise ProtocolError(f"NBD_REPLY_TYPE_OFFSET_DATA payload of {len(payload)} bytes (at least 9)")
    return int(_U64.unpack_from(payload, 0)[0]), payload[8:]


def parse_block_status(payload: bytes) -> tuple[int, list[tuple[int, int]]]:
    """Client side: (context id, [(length, flags), ...]) of an NBD_REPLY_TYPE_BLOCK_STATUS payload."""
    if len(payload) < 12 or (len(payload) - 4) % 8:
        raise ProtocolError(f"NBD_REPLY_TYPE_BLOCK_STATUS payload of {len(payload)} bytes is not 4 + 8n (n >= 1)")
    (ctx,) = _U32.unpack_from(payload, 0)
    extents = [(int(n), int(f)) for n, f in _EXTENT.iter_unpack(payload[4:])]
    if any(n == 0 for n, _ in extents):
        raise ProtocolError("NBD_REPLY_TYPE_BLOCK_STATUS extent of length 0")
    return int(ctx), extents


def parse_structured_error(payload: bytes) -> tuple[int, str]:
    """Client side: (error, message) of an error chunk."""
    if len(payload) < _ERROR_PAYLOAD.size:
        raise ProtocolError(f"error chunk payload of {len(payload)} bytes (at least 6)")
    error, n = _ERROR_PAYLOAD.unpack_from(payload, 0)
    if n > len(payload) - _ERROR_PAYLOAD.size:
        raise ProtocolError(f"error chunk message length {n} overruns the payload")
    return int(error), payload[6:6 + n].decode("utf-8", "replace")


def check_request_flags(req: Request) -> str | None:
    """None when the command flags are acceptable, else why not (-> EINVAL)."""
    allowed = ALLOWED_CMD_FLAGS.get(req.type, 0)
    bad = req.flags & ~allowed
    if bad:
        return f"command flags 0x{bad:04x} are not valid for NBD_CMD_{req.name}"
    return None


# ---------------------------------------------------------------- block status and sparse reads


def block_status_extents(
    extents: Sequence[tuple[int, int]], length: int, *, req_one: bool,
    max_extents: int = MAX_BLOCK_STATUS_EXTENTS,
) -> list[tuple[int, int]]:
    """The descriptors of one NBD_REPLY_TYPE_BLOCK_STATUS chunk for a request
    of ``length`` (> 0) bytes, from what the backend reported (consecutive
    (length, flags) from the request's offset; it may cover less or more).

    Merges neighbours with equal flags (the document: SHOULD differ), drops
    empty ones, clips the last to the request's end (so every length fits 32
    bits and REQ_ONE's "MUST NOT exceed the length" holds), keeps at most
    ``max_extents`` (1 with ``req_one``). Nothing reported: one extent of
    status 0 ("allocated or unknown"), which is always correct."""
    if length <= 0:
        raise ValueError(f"block status of {length} bytes")
    limit = 1 if req_one else max_extents
    out: list[list[int]] = []
    covered = 0
    for n, flags in extents:
        if n <= 0:
            continue
        n = min(n, length - covered)
        if out and out[-1][1] == flags:
            out[-1][0] += n
        elif len(out) < limit:
            out.append([n, flags])
        else:
            break
        covered += n
        if covered >= length:
            break
    if not out:
        return [(length, 0)]
    return [(n, f) for n, f in out]


def read_plan(
    offset: int, length: int, extents: Sequence[tuple[int, int]]
) -> list[tuple[int, int, bool]]:
    """Content chunks for a structured READ of [offset, offset + length):
    (offset, length, is_hole) in order, covering the range exactly. A hole
    chunk is sent for every extent that reads as zeroes (STATE_ZERO); what
    the extents leave uncovered is data."""
    out: list[tuple[int, int, bool]] = []
    pos, end = offset, offset + length
    for n, flags in extents:
        if pos >= end:
            break
        if n <= 0:
            continue
        n = min(n, end - pos)
        hole = bool(flags & STATE_ZERO)
        if out and out[-1][2] == hole:
            o, m, _ = out[-1]
            out[-1] = (o, m + n, hole)
        else:
            out.append((pos, n, hole))
        pos += n
    if pos < end:
        if out and not out[-1][2]:
            o, m, _ = out[-1]
            out[-1] = (o, m + end - pos, False)
        else:
            out.append((pos, end - pos, False))
    return out


# ---------------------------------------------------------------- negotiation state


@dataclass(frozen=True)
class MetaContextRequest:
    """NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT data."""

    name: str
    queries: tuple[str, ...]


def parse_meta_context_request(data: bytes) -> MetaContextRequest:
    """32-bit name length, name, 32-bit query count, per query a 32-bit length
    and the query (a string that MUST start with a namespace and a colon)."""
    if len(data) < 8:
        raise OptionInvalid(f"option data of {len(data)} bytes is too short (at least 8)")
    (name_len,) = _U32.unpack_from(data, 0)
    if name_len > len(data) - 8:
        raise OptionInvalid(f"export name length {name_len} overruns the {len(data)}-byte option data")
    name = decode_name(data[4:4 + name_len])
    pos = 4 + name_len
    (count,) = _U32.unpack_from(data, pos)
    pos += 4
    queries: list[str] = []
    for i in range(count):
        if pos + 4 > len(data):
            raise OptionInvalid(f"{count} queries announced, the option data ends after {i}")
        (n,) = _U32.unpack_from(data, pos)
        pos += 4
        if n > len(data) - pos:
            raise OptionInvalid(f"query {i} of {n} bytes overruns the option data")
        q = decode_name(data[pos:pos + n], f"query {i}")
        pos += n
        ns, colon, _ = q.partition(":")
        if not colon or not ns:
            raise OptionInvalid(f"query {q!r} does not start with a namespace and a colon (e.g. base:allocation)")
        queries.append(q)
    if pos != len(data):
        raise OptionInvalid(f"{len(data) - pos} bytes follow the last of {count} queries")
    return MetaContextRequest(name, tuple(queries))


def pack_meta_context_request(name: str, queries: Sequence[str] = ()) -> bytes:
    """Client side: NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT data."""
    raw = name.encode()
    out = [_U32.pack(len(raw)), raw, _U32.pack(len(queries))]
    for q in queries:
        qb = q.encode()
        out += [_U32.pack(len(qb)), qb]
    return b"".join(out)


def pack_meta_context(context_id: int, name: str) -> bytes:
    """NBD_REP_META_CONTEXT payload: 32-bit context id, the context's name."""
    return _U32.pack(context_id) + _clip_string(name)


def parse_meta_context(data: bytes) -> tuple[int, str]:
    """Client side: (context id, name) of an NBD_REP_META_CONTEXT payload."""
    if len(data) < 4:
        raise ProtocolError("NBD_REP_META_CONTEXT payload shorter than 4 bytes")
    return int(_U32.unpack_from(data, 0)[0]), data[4:].decode("utf-8", "replace")


def match_meta_contexts(queries: Sequence[str], *, listing: bool) -> list[str]:
    """The contexts of this server (only ``base:allocation``) that ``queries``
    name. Listing: no query means every context, ``base:`` is the wildcard of
    the namespace. Selecting: no query selects nothing, ``base:`` MUST be
    ignored. Any other leaf of ``base:``, and every other namespace (``qemu:``,
    ``x-...:``), is ignored, as the document requires: such a query just
    matches nothing."""
    if listing and not queries:
        return [META_BASE_ALLOCATION]
    for q in queries:
        if q == META_BASE_ALLOCATION or (listing and q == "base:"):
            return [META_BASE_ALLOCATION]
    return []


#: One option reply to send: (reply type, payload).
OptionReply = tuple[int, bytes]


@dataclass
class Negotiation:
    """Per-connection option state that shapes transmission.

    ``structured``: NBD_OPT_STRUCTURED_REPLY was acknowledged (READ must then
    be answered with structured chunks). ``meta_export`` / ``meta_contexts``:
    the export name the last NBD_OPT_SET_META_CONTEXT named and the
    (id, name) contexts it selected. The server parses, checks that the
    export exists and may be used, and sends what these methods return; the
    methods decide, so the rules are tested without sockets."""

    structured: bool = False
    meta_export: str | None = None
    meta_contexts: tuple[tuple[int, str], ...] = ()

    def starttls(self) -> None:
        """After NBD_OPT_STARTTLS succeeds nothing negotiated before it is kept."""
        self.structured = False
        self.clear_meta_contexts()

    def clear_meta_contexts(self) -> None:
        self.meta_export = None
        self.meta_contexts = ()

    def structured_reply(self, data: bytes) -> OptionReply:
        """NBD_OPT_STRUCTURED_REPLY: ACK, or INVALID with data or when already on."""
        if data:
            return REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data"
        if self.structured:
            return REP_ERR_INVALID, b"structured replies are already negotiated"
        self.structured = True
        return REP_ACK, b""

    def meta_context_request(self, option: int, data: bytes) -> MetaContextRequest:
        """First step of LIST/SET_META_CONTEXT: the parsed request, or
        OptionInvalid (malformed, or structured replies not negotiated: a
        MUST NOT / SHOULD reply INVALID). SET replaces the selection even when
        it fails, so a SET clears it here, before anything can fail."""
        if option == OPT_SET_META_CONTEXT:
            self.clear_meta_contexts()
        if not self.structured:
            raise OptionInvalid(f"{OPT_NAMES[option]} needs NBD_OPT_STRUCTURED_REPLY first")
        return parse_meta_context_request(data)

    def meta_context_replies(self, option: int, req: MetaContextRequest) -> list[OptionReply]:
        """Second step, for an export that exists and may be used: one
        NBD_REP_META_CONTEXT per matching context, then NBD_REP_ACK. SET
        remembers the export and what it selected."""
        listing = option == OPT_LIST_META_CONTEXT
        names = match_meta_contexts(req.queries, listing=listing)
        if listing:
            return [(REP_META_CONTEXT, pack_meta_context(0, n)) for n in names] + [(REP_ACK, b"")]
        selected = tuple((META_BASE_ALLOCATION_ID, n) for n in names)
        self.meta_export = req.name
        self.meta_contexts = selected
        return [(REP_META_CONTEXT, pack_meta_context(i, n)) for i, n in selected] + [(REP_ACK, b"")]

    def contexts_for(self, export_name: str) -> tuple[tuple[int, str], ...]:
        """The contexts BLOCK_STATUS answers on transmission with ``export_name``
        (as the client named it): those selected for that very name, else none."""
        return self.meta_contexts if self.meta_export == export_name else ()


# ---------------------------------------------------------------- helpers


def _need(data: bytes, n: int, what: str) -> None:
    if len(data) != n:
        raise ProtocolError(f"{what}: expected {n} bytes, got {len(data)}")


def _clip_string(text: str) -> bytes:
    """UTF-8 without NULs, at most MAX_STRING_BYTES (cut on a character boundary)."""
    raw = text.replace("\0", " ").encode("utf-8")
    if len(raw) <= MAX_STRING_BYTES:
        return raw
    return raw[:MAX_STRING_BYTES].decode("utf-8", "ignore").encode("utf-8")
