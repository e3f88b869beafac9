"""An NBD server in asyncio: replicated volumes as real block devices.

    qemu-img / nbdcopy / fio / nbd-client --NBD--> NbdServer --> Backend
        primary:   PrimaryBackend  -> PrimaryVolume.write/read (the replicated write path)
        secondary: LocalBackend    -> LocalVolume.store.read_at (read-only: live copy or a snapshot)

Handshake: fixed newstyle only (``NBD_OPT_EXPORT_NAME``, ``NBD_OPT_GO``,
``NBD_OPT_INFO``, ``NBD_OPT_LIST``, ``NBD_OPT_ABORT``, ``NBD_OPT_STARTTLS``,
``NBD_OPT_STRUCTURED_REPLY``, ``NBD_OPT_LIST_META_CONTEXT`` and
``NBD_OPT_SET_META_CONTEXT`` with ``base:allocation``; every other option is
answered ``NBD_REP_ERR_UNSUP``). Transmission: READ, WRITE, FLUSH, DISC, TRIM,
WRITE_ZEROES and BLOCK_STATUS, FUA honoured; simple replies, or structured
replies when the client negotiated them (then errors go out as
``NBD_REPLY_TYPE_ERROR`` chunks with the reason).

Holes (issue 14): ``Backend.extents`` says which ranges read as zeros. For the
live head (the primary's export and the secondary's live copy) that is the
layout of the store's sparse data file (``syncrep.blockstore.alloc``,
SEEK_DATA/SEEK_HOLE): never-written and punched ranges are ``NBD_STATE_HOLE |
NBD_STATE_ZERO``. A snapshot export reports everything as data (always
correct). BLOCK_STATUS answers from it, at most
``protocol.MAX_BLOCK_STATUS_EXTENTS`` extents per reply, so qemu-img convert,
nbdcopy and ``nbdinfo --map`` skip the holes; a structured READ of at least
``NBD_SPARSE_READ_MIN_BYTES`` sends ``NBD_REPLY_TYPE_OFFSET_HOLE`` for the
holes in it instead of their zeros.

TLS and who may use what (issue 11): with a TLS context the server runs in the
document's FORCEDTLS mode on every listener, TCP and Unix alike: before
``NBD_OPT_STARTTLS`` every option but ABORT is answered
``NBD_REP_ERR_TLS_REQD`` and ``NBD_OPT_EXPORT_NAME`` (which cannot be answered
with an error) ends the session, so no export is even named to a client that
has not shown a certificate. After ``NBD_REP_ACK`` the TLS handshake runs on
the same socket (the context requires a client certificate signed by the CA),
haggling starts over, and the certificate's CN is the user: each export is
offered only when ``authorize(volume, user, write)`` grants it, read-only when
only a read-only grant exists. A single server-wide mode (rather than the
document's SELECTIVETLS) is on purpose: an export reachable both ways is open
to a downgrade by whoever sits on the path. Without TLS there is no user to
authorise: plaintext is refused at construction except on a Unix socket or a
loopback address, where only local processes connect, or when the operator
asked for it (``--insecure``).

Concurrency: each connection reads requests in order and runs each in its own
task; replies go out as they complete, in any order (the handle matches them
up). At most ``NBD_MAX_INFLIGHT`` requests and ``NBD_MAX_INFLIGHT_BYTES`` of
payload are in flight per connection; beyond that the server stops reading the
socket (TCP backpressure).

Alignment: the write path takes whole blocks of the volume's block size. The
server advertises that block size as the minimum (NBD_INFO_BLOCK_SIZE, to
clients that ask for it) and still accepts unaligned requests: reads read the
covering blocks; writes, TRIM and WRITE_ZEROES read-modify-write their edge
blocks. Every write-like request holds a per-volume lock on its block range
(shared by all connections to the volume), so a read-modify-write never
interleaves with another NBD write to the same blocks.

Durability: FLUSH waits for every write-like request this connection received
before it, then calls ``backend.flush()`` (a no-op under ``--durability sync``,
where every acknowledged write is already durable; ``store.flush()`` on the
volume's I/O thread under ``--durability os``). FUA does the same after its own
write. Writes already acknowledged on other connections are durable as well
(``NBD_FLAG_CAN_MULTI_CONN``): there is no per-connection cache.

Errors map to NBD error codes (:func:`nbd_errno`); a malformed handshake or
request closes that one connection with a log line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno as _errno
import ipaddress
import logging
import os
import re
import socket
import ssl
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from syncrep import certs
from syncrep.blockstore.alloc import allocation_runs
from syncrep.blockstore.errors import (
    InvalidArgumentError,
    OutOfRangeError,
    StoreClosedError,
    UnknownSnapshotError,
)
from syncrep.blockstore.store import DATA_FILE, zeros
from syncrep.core.pairstate import PairState
from syncrep.core.vocab import MAX_WRITE_BYTES
from syncrep.errors import FailedPrecondition, PermissionDenied, SyncrepError, Unavailable
from syncrep.nbd import protocol as p
from syncrep.nbd.reader import BufferedReader
from syncrep.pb import syncrep_pb2 as pb

if TYPE_CHECKING:
    from primary.volume import PrimaryVolume
    from syncrep.volumes import LocalVolume, VolumeRegistry

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Requests in flight per connection (clients pipeline; qemu uses up to 16,
#: fio --iodepth N uses N). Beyond it the server stops reading the socket.
NBD_MAX_INFLIGHT = 64
#: Payload bytes (READ lengths + WRITE data) in flight per connection.
NBD_MAX_INFLIGHT_BYTES = 64 * 1024 * 1024
#: Largest READ/WRITE the server accepts at all. The advertised maximum is
#: MAX_WRITE_BYTES (4 MiB); larger requests from clients that ignore it are
#: split; a WRITE above this closes the connection (its payload cannot be trusted
#: to be skippable), a READ above it gets EINVAL.
NBD_MAX_REQUEST_BYTES = 32 * 1024 * 1024
#: One volume-level I/O (a write through PrimaryVolume.write) is at most this.
NBD_MAX_IO_BYTES = MAX_WRITE_BYTES
#: TRIM/WRITE_ZEROES of a large range: this many zero chunks in flight at once.
NBD_ZERO_CONCURRENCY = 8
#: A client must finish option haggling (the TLS handshake included) within this long.
NBD_HANDSHAKE_TIMEOUT_S = 30.0
#: Options accepted per handshake, and the largest option payload.
NBD_MAX_OPTIONS = 128
NBD_MAX_OPTION_BYTES = 64 * 1024
#: Connections per server; more are closed at once (with a log line).
NBD_MAX_CONNECTIONS = 256
#: On stop: how long in-flight requests get to finish before connections close.
NBD_STOP_GRACE_S = 5.0
#: While the primary role of a volume is being re-established (a new epoch
#: restarts the write path), NBD writes wait up to this long instead of failing.
NBD_PRIMARY_SWITCH_WAIT_S = 10.0
#: Per connection, this many request errors are logged at WARNING; later ones at DEBUG.
NBD_LOGGED_ERRORS = 10
#: A structured READ at least this long asks ``Backend.extents`` first and sends
#: the holes in it as NBD_REPLY_TYPE_OFFSET_HOLE. Shorter reads skip the
#: question: it is a trip to a thread for SEEK_DATA/SEEK_HOLE, which costs more
#: than a few KiB of zeros on the wire, and the clients that copy whole images
#: (qemu-img convert, nbdcopy) ask BLOCK_STATUS first and never read holes anyway.
NBD_SPARSE_READ_MIN_BYTES = 64 * 1024
# StreamReader buffer limit (read-ahead before backpressure).
_READ_LIMIT = 1024 * 1024


#: authorize(volume, user, write) -> None (granted) or why not.
Authorize = Callable[[str, str, bool], str | None]


class NbdError(Exception):
    """A request fails with this NBD error code (see protocol.E*)."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno


def nbd_errno(e: BaseException) -> int:
    """The NBD error code for an exception raised while serving a request."""
    if isinstance(e, NbdError):
        return e.errno
    if isinstance(e, SyncrepError):
        name = e.code.name
        if name == "PERMISSION_DENIED":
            return p.EPERM
        if name in ("INVALID_ARGUMENT", "OUT_OF_RANGE", "RESOURCE_EXHAUSTED"):
            return p.EINVAL
        return p.EIO  # UNAVAILABLE, FAILED_PRECONDITION (no longer primary), NOT_FOUND, INTERNAL
    if isinstance(e, OSError):
        if e.errno in (_errno.ENOSPC, _errno.EDQUOT, _errno.EFBIG):
            return p.ENOSPC
        if e.errno in (_errno.EPERM, _errno.EACCES, _errno.EROFS):
            return p.EPERM
        return p.EIO
    if isinstance(e, OutOfRangeError | InvalidArgumentError):
        return p.EINVAL
    return p.EIO


# ---------------------------------------------------------------- listen addresses


@dataclass(frozen=True)
class ListenAddress:
    """``host``/``port`` for TCP, or ``path`` for a Unix socket."""

    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def is_unix(self) -> bool:
        return bool(self.path)

    def __str__(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(text: str) -> list[ListenAddress]:
    """``HOST:PORT`` (``[v6]:PORT``), ``unix:PATH`` or an absolute socket path;
    several separated by commas. ``""`` -> no NBD server. ValueError when malformed."""
    out: list[ListenAddress] = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        if item.startswith("unix:") or item.startswith("/"):
            path = item[5:] if item.startswith("unix:") else item
            if not path:
                raise ValueError(f"invalid NBD listen address {item!r}: empty socket path")
            out.append(ListenAddress(path=path))
            continue
        host, sep, port_s = item.rpartition(":")
        if not sep or not host or not port_s.isdigit() or int(port_s) > 65535:
            raise ValueError(
                f"invalid NBD listen address {item!r}: expected HOST:PORT (e.g. 127.0.0.1:10809) "
                "or unix:/path/to/socket"
            )
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        out.append(ListenAddress(host=host, port=int(port_s)))
    if text.strip() and not out:
        raise ValueError(f"invalid NBD listen address {text!r}")
    return out


def nbd_listen_type(text: str) -> str:
    """argparse ``type=`` for ``--nbd-listen`` ("" = off)."""
    try:
        parse_listen(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.strip()


# ---------------------------------------------------------------- backends


class Backend:
    """What one export serves. Offsets and lengths given to ``read``,
    ``write`` and ``zeroes`` are multiples of ``block_size`` and at most
    ``max_io_bytes``; the server does alignment, splitting and locking.
    ``lock_key`` names the volume: exports with the same key share a range lock."""

    name: str = ""
    lock_key: str = ""
    size: int = 0
    block_size: int = 4096
    read_only: bool = True
    description: str = ""

    @property
    def max_io_bytes(self) -> int:
        return NBD_MAX_IO_BYTES - NBD_MAX_IO_BYTES % self.block_size

    async def read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """base:allocation of [offset, offset + length) (inside the export, any
        alignment): consecutive (length, NBD_STATE_* flags) from ``offset``;
        they may cover less than asked. This default, "all data" (flags 0), is
        always correct."""
        return [(length, 0)]

    async def write(self, offset: int, data: bytes) -> None:
        raise PermissionDenied(f"export {self.name!r} is read-only")

    async def flush(self) -> None:
        """Make every write acknowledged so far durable."""

    @property
    def max_zero_bytes(self) -> int:
        """The longest aligned range one ``zeroes`` or ``trim`` call takes (the
        server splits longer ones). Writing zero buffers: ``max_io_bytes``; a
        backend with a zero-range operation takes far more (PrimaryBackend)."""
        return self.max_io_bytes

    async def zeroes(self, offset: int, length: int) -> None:
        """Zero an aligned range (through the ordinary write path)."""
        await self.write(offset, zeros(length))

    async def trim(self, offset: int, length: int) -> None:
        """TRIM: this server has no thin provisioning; trimmed blocks read as zeros."""
        await self.zeroes(offset, length)

    def close(self) -> None:
        """The connection using this backend is gone."""


class PrimaryBackend(Backend):
    """Read-write export of a volume this node is primary for. Every write is
    ``PrimaryVolume.write``: the same replicated path as a gRPC client write.

    The PrimaryVolume is looked up per request, because a new epoch replaces
    it; while that happens (no PrimaryVolume, or the old one shutting down)
    requests wait up to NBD_PRIMARY_SWITCH_WAIT_S instead of failing."""

    def __init__(
        self, name: str, lv: LocalVolume, primaries: Mapping[str, PrimaryVolume], durability: str
    ) -> None:
        self.name = name
        self.lock_key = lv.name
        self.lv = lv
        self.primaries = primaries
        self.durability = durability
        self.size = lv.store.size_bytes
        self.block_size = lv.store.block_size
        self.read_only = False
        self.description = f"syncrep volume {lv.name} (primary, replicated writes)"

    async def _with_primary(self, fn: Callable[[PrimaryVolume], Awaitable[T]]) -> T:
        deadline = time.monotonic() + NBD_PRIMARY_SWITCH_WAIT_S
        while True:
            pv = self.primaries.get(self.lv.name)
            if pv is None:
                if self.lv.role != pb.ROLE_PRIMARY:
                    raise FailedPrecondition(f"this node is no longer the primary of volume {self.lv.name!r}")
                if time.monotonic() >= deadline:
                    raise Unavailable(f"volume {self.lv.name!r} has no running write path")
            else:
                try:
                    return await fn(pv)
                except Unavailable:
                    refused = pv.options.on_secondary_failure == "block" and pv.state is not PairState.IN_SYNC
                    # ``closing``: the write path is being stopped (to be replaced at a new
                    # epoch); the write was refused before it was queued, so a retry is safe.
                    if refused or not pv.closing or time.monotonic() >= deadline:
                        raise
            await asyncio.sleep(0.05)

    async def read(self, offset: int, length: int) -> bytes:
        return await self._with_primary(lambda pv: pv.read(offset, length))

    async def write(self, offset: int, data: bytes) -> None:
        await self._with_primary(lambda pv: pv.write(offset, data))

    async def flush(self) -> None:
        if self.durability == "sync":
            return  # every acknowledged write is already durable (fdatasync, group commit)
        await self.lv.run_io(self.lv.store.flush)

    @property
    def max_zero_bytes(self) -> int:
        # One replicated zero range per request, whatever its length (an NBD
        # request is at most 4 GiB): no payload travels, the nodes punch holes.
        return self.size - self.size % self.block_size

    async def zeroes(self, offset: int, length: int) -> None:
        """WRITE_ZEROES as one replicated zero range (issue 14): holes punched
        on both nodes (``PrimaryVolume.zero_range``), nothing allocated. Also
        with NBD_CMD_FLAG_NO_HOLE: the range is punched anyway. Reads are the
        same (zeros); the flag asks for the space to stay provisioned, and a
        syncrep volume is thin by design (no write preallocates), so honouring
        it would only bring back writing zero buffers through the replicated
        path (about 80 MiB/s) for no guarantee the store gives elsewhere."""
        await self._with_primary(lambda pv: pv.zero_range(offset, length))

    async def trim(self, offset: int, length: int) -> None:
        """TRIM: the same replicated zero range; trimmed blocks read as zeros."""
        await self._with_primary(lambda pv: pv.zero_range(offset, length))

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        # Through _with_primary like read: a node no longer primary answers nothing.
        return await self._with_primary(lambda pv: live_extents(self.lv, offset, length))


class LocalBackend(Backend):
    """Read-only export of this node's copy of a volume (``snapshot_id`` None:
    the live copy) or of one of its snapshots."""

    def __init__(self, name: str, lv: LocalVolume, snapshot_id: int | None, description: str) -> None:
        self.name = name
        self.lock_key = lv.name
        self.lv = lv
        self.snapshot_id = snapshot_id
        self.size = lv.store.size_bytes
        self.block_size = lv.store.block_size
        self.read_only = True
        self.description = description

    async def read(self, offset: int, length: int) -> bytes:
        return await asyncio.to_thread(self.lv.store.read_at, self.snapshot_id, offset, length)

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        if self.snapshot_id is not None:  # holes of the head say nothing about a snapshot
            return await super().extents(offset, length)
        return await live_extents(self.lv, offset, length)


#: base:allocation flags of a hole in the live head's data file: it reads as zeros.
_HOLE_FLAGS = p.STATE_HOLE | p.STATE_ZERO


async def live_extents(lv: LocalVolume, offset: int, length: int) -> list[tuple[int, int]]:
    """base:allocation of the live head of ``lv``: the holes of its data file,
    in whole blocks (``syncrep.blockstore.alloc``), at most
    MAX_BLOCK_STATUS_EXTENTS runs, on a thread (lseek may wait for the disk)."""
    store = lv.store
    runs = await asyncio.to_thread(
        allocation_runs, store.path / DATA_FILE, offset, length, block_size=store.block_size,
        size=store.size_bytes, max_runs=p.MAX_BLOCK_STATUS_EXTENTS,
    )
    return [(n, _HOLE_FLAGS if hole else 0) for n, hole in runs]


class ExportLookup(Protocol):
    """How the server finds exports by name."""

    async def open(self, name: str) -> Backend | None: ...

    async def names(self) -> list[str]: ...


class NodeExports:
    """The exports of a node: ``VOLUME`` read-write where the node is primary,
    ``VOLUME`` read-only where it is secondary, and ``VOLUME@SNAPSHOT``
    (read-only, a snapshot of the local copy) on either."""

    def __init__(
        self, primaries: Mapping[str, PrimaryVolume], registry: VolumeRegistry, durability: str
    ) -> None:
        self.primaries = primaries
        self.registry = registry
        self.durability = durability

    async def open(self, name: str) -> Backend | None:
        vol, at, snap = name.partition("@")
        lv = self.registry.volumes.get(vol)
        if lv is None:
            return None
        if at:
            if not snap:
                return None
            info = await asyncio.to_thread(lv.store.find_snapshot, snap)
            if info is None:
                return None
            return LocalBackend(
                name, lv, info.id, f"syncrep volume {vol}, snapshot {snap} (id {info.id}), read-only"
            )
        if vol in self.primaries or lv.role == pb.ROLE_PRIMARY:
            return PrimaryBackend(name, lv, self.primaries, self.durability)
        # An empty replica being rebuilt (identity current 0) holds no data of
        # the pair yet: it is never served (docs/FAILOVER.md section 1).
        if lv.role == pb.ROLE_SECONDARY and lv.identity.has_data:
            return LocalBackend(name, lv, None, f"syncrep volume {vol} (secondary copy, read-only)")
        return None

    async def names(self) -> list[str]:
        out: list[str] = []
        for vol, lv in sorted(self.registry.volumes.items()):
            if vol in self.primaries or lv.role == pb.ROLE_PRIMARY or (
                lv.role == pb.ROLE_SECONDARY and lv.identity.has_data
            ):
                out.append(vol)
            with contextlib.suppress(Exception):
                snaps = await asyncio.to_thread(lv.store.list_snapshots)
                out.extend(f"{vol}@{s.name}" for s in snaps)
        return out


class StaticExports:
    """A fixed name -> backend map (tests, tools)."""

    def __init__(self, backends: Mapping[str, Backend]) -> None:
        self.backends = dict(backends)

    async def open(self, name: str) -> Backend | None:
        return self.backends.get(name)

    async def names(self) -> list[str]:
        return sorted(self.backends)


# ---------------------------------------------------------------- locking and budgets


class RangeLock:
    """Exclusive locks on byte ranges [start, end): holders of overlapping
    ranges run one after the other, disjoint ones concurrently."""

    def __init__(self) -> None:
        self._held: list[tuple[int, int, asyncio.Future[None]]] = []

    @contextlib.asynccontextmanager
    async def hold(self, start: int, end: int) -> AsyncIterator[None]:
        while True:
            blockers = [f for s, e, f in self._held if s < end and start < e]
            if not blockers:
                break
            await asyncio.wait(blockers)
        entry = (start, end, asyncio.get_running_loop().create_future())
        self._held.append(entry)
        try:
            yield
        finally:
            self._held.remove(entry)
            entry[2].set_result(None)

    def __len__(self) -> int:
        return len(self._held)


class _Budget:
    """Units in flight, taken by one acquirer (the connection's reader) and
    given back by many (request tasks)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._freed = asyncio.Event()

    async def acquire(self, n: int) -> int:
        n = min(n, self.limit)
        while self.used + n > self.limit:
            self._freed.clear()
            await self._freed.wait()
        self.used += n
        return n

    def release(self, n: int) -> None:
        self.used -= n
        self._freed.set()


# ---------------------------------------------------------------- connections


@dataclass
class _Export:
    backend: Backend
    locks: RangeLock
    flags: int
    #: The backend's read-only, or a read-only grant on a writable backend.
    read_only: bool


class _TlsFailed(Exception):
    """The TLS handshake after NBD_REP_ACK failed: the session cannot go on."""


@dataclass(eq=False)
class _Conn:
    #: The handshake's StreamReader, then (transmission) a BufferedReader over the same transport.
    reader: asyncio.StreamReader | BufferedReader
    writer: asyncio.StreamWriter
    peer: str
    export: _Export | None = None
    #: After the TLS handshake: the CN of the client's certificate (None: no TLS yet).
    user: str | None = None
    #: Options answered NBD_REP_ERR_TLS_REQD (the first is logged at WARNING).
    tls_refusals: int = 0
    #: Exports refused to this connection's user (each logged once at WARNING).
    refused: set[str] = field(default_factory=set)
    #: Structured replies and metadata contexts as negotiated so far.
    neg: p.Negotiation = field(default_factory=p.Negotiation)
    #: In transmission: structured replies on; the (id, name) contexts BLOCK_STATUS answers.
    structured: bool = False
    contexts: tuple[tuple[int, str], ...] = ()
    read_task: asyncio.Task[None] | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    write_tasks: set[asyncio.Task[None]] = field(default_factory=set)
    slots: _Budget = field(default_factory=lambda: _Budget(NBD_MAX_INFLIGHT))
    payload: _Budget = field(default_factory=lambda: _Budget(NBD_MAX_INFLIGHT_BYTES))
    broken: bool = False
    requests: int = 0
    errors: int = 0
    bytes_read: int = 0
    #: READ bytes answered with NBD_REPLY_TYPE_OFFSET_HOLE (not shipped).
    bytes_holes: int = 0
    bytes_written: int = 0

    async def send(self, parts: Sequence[bytes | memoryview]) -> None:
        if self.broken:
            return
        try:
            self.writer.writelines(parts)
            await self.writer.drain()
        except (ConnectionError, OSError, RuntimeError) as e:
            # The client went away; the reader notices EOF and ends the connection.
            self.broken = True
            log.debug("nbd client %s: reply not delivered: %s", self.peer, e)


def is_plaintext_safe(a: ListenAddress) -> bool:
    """Whether plaintext NBD on ``a`` reaches local processes only: a Unix
    socket, or a loopback address (127.0.0.0/8, ::1, ::ffff:127.x, localhost).
    An empty host (every interface) is not."""
    if a.is_unix:
        return True
    if a.host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(a.host)
    except ValueError:
        return False  # a host name: what it resolves to is not ours to trust
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class NbdServer:
    """NBD server on ``listen`` (see :func:`parse_listen`), serving the exports
    that ``backend_lookup`` finds by name.

    ``tls``: a server context that requires a client certificate
    (:func:`syncrep.nbd.tls.server_ssl_context`). With it, TLS is required on
    every listener (FORCEDTLS, see the module docstring) and the client
    certificate's CN is the user. ``authorize(volume, user, write)`` (with
    ``tls`` only; None: every certificate of the CA may use every export)
    returns None when ``user`` may use ``volume`` (``VOLUME@SNAPSHOT`` ->
    ``VOLUME``) for writing (``write``) or reading, else the reason: a
    writable export is offered read-write, or read-only when only
    ``write=False`` is granted, or not at all (NBD_REP_ERR_POLICY with the
    reason; a closed connection after NBD_OPT_EXPORT_NAME); an exception in
    it refuses too. Plaintext connections have no user and are not authorised:
    without ``tls`` the listeners must be Unix sockets or loopback addresses
    unless ``allow_plaintext`` (``--insecure``), else ValueError."""

    def __init__(
        self,
        listen: str,
        backend_lookup: ExportLookup,
        *,
        max_inflight: int = NBD_MAX_INFLIGHT,
        tls: ssl.SSLContext | None = None,
        authorize: Authorize | None = None,
        allow_plaintext: bool = False,
    ) -> None:
        self.listen = listen
        self.addresses = parse_listen(listen)
        self.lookup = backend_lookup
        self.max_inflight = max_inflight
        if tls is not None and tls.verify_mode != ssl.CERT_REQUIRED:
            # Without a client certificate there is no user to authorise.
            raise ValueError("the NBD server's TLS context must require a client certificate (CERT_REQUIRED); "
                             "build it with syncrep.nbd.tls.server_ssl_context")
        if tls is None and not allow_plaintext:
            exposed = [str(a) for a in self.addresses if not is_plaintext_safe(a)]
            if exposed:
                raise ValueError(
                    f"refusing plaintext NBD on {', '.join(exposed)}: anyone who can reach it could read and "
                    "write the volumes. Pass --certs-dir DIR to serve NBD over TLS with client certificates, "
                    "listen on a loopback address or a unix: socket, or pass --insecure to allow plaintext"
                )
        self.tls = tls
        self.authorize = authorize
        self._servers: list[asyncio.AbstractServer] = []
        self._conns: dict[_Conn, asyncio.Task[Any]] = {}
        self._locks: dict[str, RangeLock] = {}
        self._stopping = False
        #: Bound addresses after start() (a TCP port 0 becomes the real port).
        self.bound: list[ListenAddress] = []

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        try:
            for a in self.addresses:
                if a.is_unix:
                    _remove_stale_socket(a.path)
                    srv = await asyncio.start_unix_server(self._accept, path=a.path, limit=_READ_LIMIT)
                    self.bound.append(a)
                else:
                    srv = await asyncio.start_server(
                        self._accept, a.host or None, a.port, limit=_READ_LIMIT, reuse_address=True
                    )
                    port = srv.sockets[0].getsockname()[1] if srv.sockets else a.port
                    self.bound.append(ListenAddress(host=a.host, port=int(port)))
                self._servers.append(srv)
        except OSError as e:
            await self.stop()
            raise OSError(f"cannot serve NBD on {self.listen}: {e}") from None
        log.info("NBD server listening on %s", ", ".join(str(a) for a in self.bound))

    @property
    def port(self) -> int:
        """The first bound TCP port (0 when none)."""
        return next((a.port for a in self.bound if not a.is_unix), 0)

    async def stop(self, grace_s: float = NBD_STOP_GRACE_S) -> None:
        """Stop listening, stop reading requests, give in-flight requests
        ``grace_s`` to finish (their replies are sent), then close every connection."""
        self._stopping = True
        for srv in self._servers:
            srv.close()
        for conn, task in list(self._conns.items()):
            if conn.read_task is not None:
                conn.read_task.cancel()  # transmission: stop reading, finish in-flight requests
            else:
                task.cancel()  # still haggling
        tasks = list(self._conns.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace_s + 1.0)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 1.0)
        for a in self.bound:
            if a.is_unix:
                with contextlib.suppress(OSError):
                    os.unlink(a.path)
        self._servers.clear()
        if self.bound:
            log.info("NBD server on %s stopped", ", ".join(str(a) for a in self.bound))

    # ------------------------------------------------------------ one connection

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer_name(writer)
        conn = _Conn(reader, writer, peer, slots=_Budget(self.max_inflight))
        task = asyncio.current_task()
        assert task is not None
        if self._stopping or len(self._conns) >= NBD_MAX_CONNECTIONS:
            log.warning("nbd client %s refused: %s", peer,
                        "the server is stopping" if self._stopping
                        else f"{NBD_MAX_CONNECTIONS} connections already open")
            writer.close()
            return
        self._conns[conn] = task
        try:
            await self._serve(conn)
        except asyncio.CancelledError:
            log.info("nbd client %s: connection closed by server shutdown", peer)
        except p.ProtocolError as e:
            log.warning("nbd client %s: protocol violation: %s; closing this connection", peer, e)
        except _TlsFailed as e:
            log.warning("nbd client %s: TLS handshake failed: %s; closing this connection", peer, e)
        except TimeoutError:
            log.warning("nbd client %s: handshake not finished within %.0f s; closing this connection",
                        peer, NBD_HANDSHAKE_TIMEOUT_S)
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            if conn.export is not None and isinstance(e, asyncio.IncompleteReadError) and not e.partial:
                log.debug("nbd client %s: closed the connection without NBD_CMD_DISC", peer)
            else:
                log.info("nbd client %s: connection lost (%s)", peer, _describe(e))
        except Exception:
            log.exception("nbd client %s: internal error; closing this connection", peer)
        finally:
            self._conns.pop(conn, None)
            if conn.export is not None:
                conn.export.backend.close()
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2.0)

    async def _serve(self, conn: _Conn) -> None:
        async with asyncio.timeout(NBD_HANDSHAKE_TIMEOUT_S):
            export = await self._handshake(conn)
        if export is None:
            return
        conn.export = export
        b = export.backend
        assert isinstance(conn.reader, asyncio.StreamReader)
        # Requests and their payloads are read into one buffer from here on (syncrep/nbd/reader.py).
        conn.reader = BufferedReader.take_over(conn.reader, conn.writer)
        log.info("nbd client %s: serving export %r (%s, %d bytes, %d-byte blocks%s)",
                 conn.peer, b.name, "read-only" if export.read_only else "read-write", b.size, b.block_size,
                 "" if conn.user is None else f", TLS, user {conn.user!r}")
        read_task = conn.read_task = asyncio.create_task(self._read_requests(conn), name=f"nbd-read-{conn.peer}")
        try:
            # stop() cancels read_task (asyncio.wait does not raise for that); if this
            # task itself is cancelled, reading stops the same way.
            await asyncio.wait([read_task])
        finally:
            if not read_task.done():
                read_task.cancel()
                await asyncio.wait([read_task])
            # DISC, EOF, a protocol error or shutdown: finish what is in flight first
            # (DISC: "the server MUST handle all outstanding requests").
            if conn.tasks:
                await asyncio.wait(list(conn.tasks), timeout=NBD_STOP_GRACE_S)
            log.info("nbd client %s: export %r closed after %d requests (%d bytes read, %d more read as "
                     "holes, %d written, %d errors)", conn.peer, b.name, conn.requests, conn.bytes_read,
                     conn.bytes_holes, conn.bytes_written, conn.errors)
        if read_task.cancelled():
            raise asyncio.CancelledError
        exc = read_task.exception()
        if exc is not None:
            raise exc

    # ------------------------------------------------------------ handshake

    async def _handshake(self, conn: _Conn) -> _Export | None:
        conn.writer.write(p.pack_greeting())
        await conn.writer.drain()
        cflags = p.parse_client_flags(await conn.reader.readexactly(p.CLIENT_FLAGS_BYTES))
        fixed = bool(cflags & p.FLAG_C_FIXED_NEWSTYLE)
        no_zeroes = bool(cflags & p.FLAG_C_NO_ZEROES)
        for _ in range(NBD_MAX_OPTIONS):
            hdr = p.parse_option_header(await conn.reader.readexactly(p.OPTION_HEADER_BYTES))
            if hdr.length > NBD_MAX_OPTION_BYTES:
                raise p.ProtocolError(f"{hdr.name} carries {hdr.length} bytes; the limit is {NBD_MAX_OPTION_BYTES}")
            data = await conn.reader.readexactly(hdr.length) if hdr.length else b""
            if hdr.option == p.OPT_EXPORT_NAME:
                if self.tls is not None and conn.user is None:
                    # FORCEDTLS: this option cannot be answered with an error, so the session MUST end.
                    log.warning("nbd client %s: NBD_OPT_EXPORT_NAME without TLS, but this server requires TLS "
                                "(NBD_OPT_STARTTLS first, e.g. an nbds:// URI); closing this connection", conn.peer)
                    return None
                name = p.parse_export_name_option(data)
                backend = await self._open(conn, name)
                if backend is None:
                    # This option cannot be answered with an error: the session MUST end.
                    raise p.ProtocolError(f"NBD_OPT_EXPORT_NAME asked for unknown export {name!r}")
                granted = self._grant(conn, backend)
                if isinstance(granted, str):
                    backend.close()
                    return None  # refused (logged by _grant); no error reply exists for this option
                conn.writer.write(p.pack_export_name_reply(backend.size, granted.flags, no_zeroes))
                await conn.writer.drain()
                self._enter_transmission(conn, name)
                return granted
            if not fixed:
                raise p.ProtocolError(f"{hdr.name} from a client without NBD_FLAG_C_FIXED_NEWSTYLE")
            if hdr.option == p.OPT_ABORT:
                with contextlib.suppress(ConnectionError):
                    await self._reply(conn, hdr.option, p.REP_ACK)
                log.debug("nbd client %s: aborted the handshake", conn.peer)
                return None
            if hdr.option == p.OPT_STARTTLS:
                await self._starttls(conn, data)
                continue
            if self.tls is not None and conn.user is None:
                await self._tls_required(conn, hdr)
                continue
            if hdr.option == p.OPT_LIST:
                if data:
                    await self._error(conn, hdr.option, p.REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                    continue
                for name in await self._names(conn):
                    await self._reply(conn, hdr.option, p.REP_SERVER, p.pack_rep_server(name))
                await self._reply(conn, hdr.option, p.REP_ACK)
                continue
            if hdr.option in (p.OPT_INFO, p.OPT_GO):
                chosen = await self._info(conn, hdr.option, data)
                if chosen is not None and hdr.option == p.OPT_GO:
                    self._enter_transmission(conn, p.parse_info_request(data).name)
                    return chosen
                continue
            if hdr.option == p.OPT_STRUCTURED_REPLY:
                reply_type, msg = conn.neg.structured_reply(data)
                if reply_type & p.REP_FLAG_ERROR:
                    await self._error(conn, hdr.option, reply_type, msg.decode())
                else:
                    await self._reply(conn, hdr.option, reply_type)
                continue
            if hdr.option in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
                await self._meta_context(conn, hdr.option, data)
                continue
            await self._error(conn, hdr.option, p.REP_ERR_UNSUP, f"{hdr.name} is not supported by this server")
        raise p.ProtocolError(f"more than {NBD_MAX_OPTIONS} options without entering transmission")

    def _enter_transmission(self, conn: _Conn, export_name: str) -> None:
        """Fix what the haggling negotiated; BLOCK_STATUS only when the last
        SET_META_CONTEXT named this export (as the client spelled it)."""
        conn.structured = conn.neg.structured
        conn.contexts = conn.neg.contexts_for(export_name)
        if conn.structured:
            log.debug("nbd client %s: structured replies, metadata contexts %s", conn.peer,
                      ", ".join(n for _, n in conn.contexts) or "none")

    async def _meta_context(self, conn: _Conn, option: int, data: bytes) -> None:
        """NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: the rules are
        conn.neg's; here the export is looked up and authorised as for NBD_OPT_INFO."""
        try:
            req = conn.neg.meta_context_request(option, data)
        except p.OptionInvalid as e:
            await self._error(conn, option, p.REP_ERR_INVALID, str(e))
            return
        backend = await self._open(conn, req.name)
        if backend is None:
            names = await self._names(conn)
            await self._error(conn, option, p.REP_ERR_UNKNOWN,
                              f"no export named {req.name!r} here; exports: {', '.join(names) or 'none'}")
            return
        try:
            granted = self._grant(conn, backend)
        finally:
            backend.close()
        if isinstance(granted, str):
            await self._error(conn, option, p.REP_ERR_POLICY,
                              f"user {conn.user!r} may not use export {backend.name!r}: {granted}")
            return
        for reply_type, payload in conn.neg.meta_context_replies(option, req):
            await self._reply(conn, option, reply_type, payload)

    async def _starttls(self, conn: _Conn, data: bytes) -> None:
        """NBD_OPT_STARTTLS: NBD_REP_ACK, then the TLS handshake on the same
        socket; haggling then starts over inside TLS. The client certificate's
        CN becomes ``conn.user``. _TlsFailed when the handshake fails (after
        the ACK there is no way back to plaintext: the session ends)."""
        option = p.OPT_STARTTLS
        if self.tls is None:
            await self._error(conn, option, p.REP_ERR_POLICY,
                              "this server does not offer TLS (it was started without --certs-dir)")
            return
        if conn.user is not None:
            await self._error(conn, option, p.REP_ERR_INVALID, "TLS is already running on this connection")
            return
        if data:
            await self._error(conn, option, p.REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
            return
        await self._reply(conn, option, p.REP_ACK)
        try:
            await conn.writer.start_tls(self.tls)
        except (ssl.SSLError, OSError, EOFError) as e:  # ConnectionResetError: lost mid-handshake
            raise _TlsFailed(_describe_tls_error(e)) from None
        ssl_object = conn.writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:  # CERT_REQUIRED makes this unreachable; never serve a connection without a user
            raise _TlsFailed("the client presented no certificate")
        try:
            user = certs.cert_common_name(ssl.DER_cert_to_PEM_cert(der).encode("ascii"))
        except certs.CertError as e:
            raise _TlsFailed(f"cannot read the client certificate: {e}") from None
        if not user:
            raise _TlsFailed("the client certificate has no CN (make it with `syncrep cert create-client NAME`)")
        conn.user = user
        conn.neg.starttls()  # "the server MUST NOT preserve any negotiation state" from before
        log.info("nbd client %s: %s (%s) as user %r", conn.peer, ssl_object.version(),
                 (ssl_object.cipher() or ("?",))[0], user)

    async def _tls_required(self, conn: _Conn, hdr: p.OptionHeader) -> None:
        """FORCEDTLS: any option but STARTTLS and ABORT before TLS -> NBD_REP_ERR_TLS_REQD."""
        conn.tls_refusals += 1
        level = logging.WARNING if conn.tls_refusals == 1 else logging.DEBUG
        log.log(level, "nbd client %s: %s without TLS refused (NBD_REP_ERR_TLS_REQD): this server requires "
                "NBD_OPT_STARTTLS with a client certificate", conn.peer, hdr.name)
        conn.writer.write(p.pack_error_reply(
            hdr.option, p.REP_ERR_TLS_REQD,
            "this server requires TLS with a client certificate: use an nbds:// URI "
            "(libnbd: ?tls-certificates=DIR; qemu: tls-creds-x509)"))
        await conn.writer.drain()

    def _authorize(self, conn: _Conn, volume: str, write: bool) -> str | None:
        """None when the connection's user may use ``volume`` (for writing if
        ``write``), else why not. Plaintext connections are not authorised
        (they exist only on local listeners or with --insecure)."""
        if conn.user is None or self.authorize is None:
            return None
        try:
            return self.authorize(volume, conn.user, write)
        except Exception as e:  # fail closed: a broken grant lookup grants nothing
            log.exception("nbd client %s: authorising user %r on volume %r failed", conn.peer, conn.user, volume)
            return f"the grant lookup failed ({type(e).__name__}: {e})"

    def _grant(self, conn: _Conn, backend: Backend) -> _Export | str:
        """The export as this connection may use it (read-write, read-only on a
        read-only grant), or the reason it may not (logged at WARNING)."""
        volume = _volume_of(backend.name)
        if not backend.read_only:
            if self._authorize(conn, volume, True) is None:
                return self._export(backend, read_only=False)
        reason = self._authorize(conn, volume, False)
        if reason is None:
            if not backend.read_only:
                log.info("nbd client %s: user %r may only read volume %r: export %r is read-only for it",
                         conn.peer, conn.user, volume, backend.name)
            return self._export(backend, read_only=True)
        # One WARNING per export and connection: clients ask NBD_OPT_INFO, then NBD_OPT_GO.
        level = logging.DEBUG if backend.name in conn.refused else logging.WARNING
        conn.refused.add(backend.name)
        log.log(level, "nbd client %s: user %r refused export %r of volume %r: %s",
                conn.peer, conn.user, backend.name, volume, reason)
        return reason

    async def _names(self, conn: _Conn) -> list[str]:
        """The export names this connection may see: those its user may read."""
        names = await self.lookup.names()
        if conn.user is None or self.authorize is None:
            return names
        return [n for n in names if self._authorize(conn, _volume_of(n), False) is None]

    async def _info(self, conn: _Conn, option: int, data: bytes) -> _Export | None:
        """NBD_OPT_INFO / NBD_OPT_GO: describe the export (and for GO, use it)."""
        try:
            req = p.parse_info_request(data)
        except p.OptionInvalid as e:
            await self._error(conn, option, p.REP_ERR_INVALID, str(e))
            return None
        backend = await self._open(conn, req.name)
        if backend is None:
            names = await self._names(conn)
            await self._error(conn, option, p.REP_ERR_UNKNOWN,
                              f"no export named {req.name!r} here; exports: {', '.join(names) or 'none'}")
            return None
        granted = self._grant(conn, backend)
        if isinstance(granted, str):
            backend.close()
            await self._error(conn, option, p.REP_ERR_POLICY,
                              f"user {conn.user!r} may not use export {backend.name!r}: {granted}")
            return None
        export = granted
        minimum, preferred, maximum = p.block_size_constraints(
            backend.block_size, backend.max_io_bytes, client_asked=req.wants_block_size
        )
        await self._reply(conn, option, p.REP_INFO, p.pack_info_export(backend.size, export.flags))
        # Always sent (as qemu-nbd does); to a client that did not ask, the minimum is 1.
        await self._reply(conn, option, p.REP_INFO, p.pack_info_block_size(minimum, preferred, maximum))
        if p.INFO_NAME in req.requests:
            await self._reply(conn, option, p.REP_INFO, p.pack_info_name(backend.name))
        if p.INFO_DESCRIPTION in req.requests:
            await self._reply(conn, option, p.REP_INFO, p.pack_info_description(backend.description))
        await self._reply(conn, option, p.REP_ACK)
        if option == p.OPT_INFO:
            backend.close()
        return export

    async def _open(self, conn: _Conn, name: str) -> Backend | None:
        if name == "":  # the "default" export: the only one this client may see, if there is exactly one
            names = [n for n in await self._names(conn) if "@" not in n]
            if len(names) != 1:
                return None
            name = names[0]
        return await self.lookup.open(name)

    def _export(self, backend: Backend, *, read_only: bool) -> _Export:
        read_only = read_only or backend.read_only
        locks = self._locks.setdefault(backend.lock_key or backend.name, RangeLock())
        return _Export(backend, locks, p.transmission_flags(read_only), read_only)

    async def _reply(self, conn: _Conn, option: int, reply_type: int, data: bytes = b"") -> None:
        conn.writer.write(p.pack_option_reply(option, reply_type, data))
        await conn.writer.drain()

    async def _error(self, conn: _Conn, option: int, reply_type: int, message: str) -> None:
        log.debug("nbd client %s: %s -> error 0x%x: %s", conn.peer, p.OPT_NAMES.get(option, option),
                  reply_type, message)
        conn.writer.write(p.pack_error_reply(option, reply_type, message))
        await conn.writer.drain()

    # ------------------------------------------------------------ transmission

    async def _read_requests(self, conn: _Conn) -> None:
        """Read requests in order; run each in its own task (replies in any order)."""
        assert conn.export is not None
        while True:
            req = p.parse_request(await conn.reader.readexactly(p.REQUEST_HEADER_BYTES))
            if req.type == p.CMD_DISC:
                log.debug("nbd client %s: NBD_CMD_DISC", conn.peer)
                return
            if req.type == p.CMD_WRITE and req.length > NBD_MAX_REQUEST_BYTES:
                raise p.ProtocolError(
                    f"WRITE of {req.length} bytes exceeds the {NBD_MAX_REQUEST_BYTES}-byte limit "
                    f"(advertised maximum {conn.export.backend.max_io_bytes})"
                )
            nbytes = req.length if req.type in (p.CMD_READ, p.CMD_WRITE) and req.length <= NBD_MAX_REQUEST_BYTES \
                else 0
            await conn.slots.acquire(1)
            held = await conn.payload.acquire(nbytes)
            try:
                payload = await conn.reader.readexactly(req.length) if req.type == p.CMD_WRITE else b""
            except BaseException:
                conn.slots.release(1)
                conn.payload.release(held)
                raise
            conn.requests += 1
            # FLUSH covers every write-like request received before it (not after).
            barrier = list(conn.write_tasks) if req.type == p.CMD_FLUSH else []
            t = asyncio.create_task(self._run(conn, req, payload, held, barrier))
            conn.tasks.add(t)
            t.add_done_callback(conn.tasks.discard)
            if req.type in (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES):
                conn.write_tasks.add(t)
                t.add_done_callback(conn.write_tasks.discard)

    async def _run(
        self, conn: _Conn, req: p.Request, payload: bytes, held: int, barrier: list[asyncio.Task[None]]
    ) -> None:
        try:
            error = 0
            message = ""
            data: bytes | list[bytes | memoryview] = b""
            try:
                data = await self._execute(conn, req, payload, barrier)
            except Exception as e:
                error = nbd_errno(e)
                message = str(e) or type(e).__name__
                conn.errors += 1
                level = logging.WARNING if conn.errors <= NBD_LOGGED_ERRORS else logging.DEBUG
                if not isinstance(e, NbdError | SyncrepError | OSError | InvalidArgumentError
                                  | UnknownSnapshotError | StoreClosedError):
                    log.exception("nbd client %s: %s failed unexpectedly", conn.peer, req.name)
                else:
                        log.log(level, "nbd client %s: %s of %d bytes at %d failed with %s: %s%s", conn.peer,
                            req.name, req.length, req.offset, p.ERROR_NAMES.get(error, error), e,
                            " (further errors on this connection are logged at DEBUG)"
                            if conn.errors == NBD_LOGGED_ERRORS else "")
            if error and conn.structured:  # with the reason, which a simple reply cannot carry
                await conn.send([p.pack_structured_error(req.handle, error, message)])
            elif isinstance(data, list):  # structured chunks, the last one marked done
                await conn.send(data)
            else:
                header = p.pack_simple_reply(error, req.handle)
                await conn.send([header, data] if data and not error else [header])
        finally:
            conn.slots.release(1)
            conn.payload.release(held)

    async def _execute(
        self, conn: _Conn, req: p.Request, payload: bytes, barrier: list[asyncio.Task[None]]
    ) -> bytes | list[bytes | memoryview]:
        """Run one request: the data of a simple READ reply, the chunks of a
        structured reply, or b"" (a simple reply without data follows)."""
        export = conn.export
        assert export is not None
        b = export.backend
        bad_flags = p.check_request_flags(req)
        if bad_flags:
            raise NbdError(p.EINVAL, bad_flags)
        if req.type == p.CMD_FLUSH:
            if barrier:
                await asyncio.wait(barrier)
            await b.flush()
            return b""
        if req.type not in (p.CMD_READ, p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES, p.CMD_BLOCK_STATUS):
            raise NbdError(p.EINVAL, f"NBD_CMD_{req.name} is not supported")
        if req.type == p.CMD_BLOCK_STATUS and not conn.contexts:
            raise NbdError(p.EINVAL, "NBD_CMD_BLOCK_STATUS without a metadata context: select base:allocation "
                           "for this export with NBD_OPT_SET_META_CONTEXT (after NBD_OPT_STRUCTURED_REPLY)")
        writing = req.type not in (p.CMD_READ, p.CMD_BLOCK_STATUS)
        if writing and export.read_only:
            raise NbdError(p.EPERM, f"export {b.name!r} is read-only" + (
                "" if b.read_only else f" for user {conn.user!r} (a read-only grant)"))
        if req.offset + req.length > b.size:
            raise NbdError(
                p.ENOSPC if writing else p.EINVAL,
                f"{req.length} bytes at offset {req.offset} end past the end of the export ({b.size} bytes)",
            )
        if req.type == p.CMD_BLOCK_STATUS:
            return await self._block_status(conn, b, req)
        if req.length == 0:
            return [p.pack_structured_none(req.handle)] if conn.structured and req.type == p.CMD_READ else b""
        if req.type == p.CMD_READ:
            if req.length > NBD_MAX_REQUEST_BYTES:
                raise NbdError(p.EINVAL, f"READ of {req.length} bytes exceeds the {NBD_MAX_REQUEST_BYTES}-byte limit")
            if conn.structured:
                return await self._structured_read(conn, b, req)
            data = await read_range(b, req.offset, req.length)
            conn.bytes_read += len(data)
            return data
        if req.type == p.CMD_WRITE:
            await write_range(b, export.locks, req.offset, payload)
        else:
            await zero_range(b, export.locks, req.offset, req.length, trim=req.type == p.CMD_TRIM)
        conn.bytes_written += req.length
        if req.fua:
            await b.flush()
        return b""


    async def _block_status(self, conn: _Conn, b: Backend, req: p.Request) -> list[bytes | memoryview]:
        """One NBD_REPLY_TYPE_BLOCK_STATUS chunk per selected context (only
        base:allocation exists), bounded by MAX_BLOCK_STATUS_EXTENTS."""
        if req.length == 0:
            raise NbdError(p.EINVAL, "NBD_CMD_BLOCK_STATUS of 0 bytes")
        extents = p.block_status_extents(await b.extents(req.offset, req.length), req.length,
                                         req_one=bool(req.flags & p.CMD_FLAG_REQ_ONE))
        last = len(conn.contexts) - 1
        return [p.pack_block_status(req.handle, cid, extents, done=i == last)
                for i, (cid, _) in enumerate(conn.contexts)]

    async def _structured_read(self, conn: _Conn, b: Backend, req: p.Request) -> list[bytes | memoryview]:
        """A READ as content chunks: OFFSET_HOLE for what reads as zeros
        (Backend.extents, asked for reads of NBD_SPARSE_READ_MIN_BYTES or
        more), OFFSET_DATA for the rest. The data is read in one pass over the
        span from the first to the last data byte, before any chunk is sent, so
        an error is still one NBD_REPLY_TYPE_ERROR and no chunk is marked done
        too early."""
        plan = [(req.offset, req.length, False)]
        if req.length >= NBD_SPARSE_READ_MIN_BYTES:
            plan = p.read_plan(req.offset, req.length, await b.extents(req.offset, req.length))
        data_parts = [(o, n) for o, n, hole in plan if not hole]
        lo = data_parts[0][0] if data_parts else req.offset
        buf = memoryview(b"")
        if data_parts:
            hi = data_parts[-1][0] + data_parts[-1][1]
            buf = memoryview(await read_range(b, lo, hi - lo))
        parts: list[bytes | memoryview] = []
        last = len(plan) - 1
        for i, (o, n, hole) in enumerate(plan):
            if hole:
                parts.append(p.pack_offset_hole(req.handle, o, n, done=i == last))
                conn.bytes_holes += n
            else:
                parts.append(p.pack_offset_data_header(req.handle, o, n, done=i == last))
                parts.append(buf[o - lo:o - lo + n])
                conn.bytes_read += n
        return parts


# ---------------------------------------------------------------- the alignment engine


def _span(b: Backend, offset: int, length: int) -> tuple[int, int]:
    """The block-aligned [first, last) covering [offset, offset + length)."""
    bs = b.block_size
    first = offset - offset % bs
    end = offset + length
    last = end + (-end) % bs
    return first, last


async def _gather_all(aws: Sequence[Awaitable[Any]]) -> list[Any]:
    """Run all; wait for every one even when some fail; raise the first failure."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return list(results)


async def read_range(b: Backend, offset: int, length: int) -> bytes:
    """Any (offset, length) inside the export: read the covering blocks in
    chunks of at most ``b.max_io_bytes`` and cut out the requested bytes."""
    first, last = _span(b, offset, length)
    step = b.max_io_bytes
    if last - first <= step:
        data = await b.read(first, last - first)
    else:
        parts = await _gather_all([b.read(o, min(step, last - o)) for o in range(first, last, step)])
        data = b"".join(parts)
    if first == offset and last - first == length:
        return data
    return data[offset - first:offset - first + length]


async def write_range(b: Backend, locks: RangeLock, offset: int, data: bytes) -> None:
    """Any (offset, data) inside the export. Under the range lock of its
    blocks: read-modify-write of unaligned edge blocks, then aligned writes
    of at most ``b.max_io_bytes`` each, through ``b.write``."""
    length = len(data)
    first, last = _span(b, offset, length)
    bs = b.block_size
    async with locks.hold(first, last):
        if first == offset and last == offset + length:
            buf: bytes | bytearray = data
        else:
            head = offset != first
            tail = (offset + length) % bs != 0
            buf = bytearray(last - first)
            if head:
                buf[:bs] = await b.read(first, bs)
            if tail and (last - bs != first or not head):
                buf[-bs:] = await b.read(last - bs, bs)
            buf[offset - first:offset - first + length] = data
        await _write_chunks(b, first, buf)


async def _write_chunks(b: Backend, first: int, buf: bytes | bytearray) -> None:
    step = b.max_io_bytes
    if len(buf) <= step:
        await b.write(first, bytes(buf))
        return
    view = memoryview(buf)
    await _gather_all([b.write(first + i, bytes(view[i:i + step])) for i in range(0, len(buf), step)])


async def zero_range(b: Backend, locks: RangeLock, offset: int, length: int, *, trim: bool = False) -> None:
    """Zero any (offset, length) inside the export: edge blocks by
    read-modify-write, the aligned middle with ``b.zeroes`` (``b.trim``) in
    chunks of at most ``b.max_zero_bytes``, NBD_ZERO_CONCURRENCY at a time."""
    first, last = _span(b, offset, length)
    bs = b.block_size
    end = offset + length
    async with locks.hold(first, last):
        mid_start = offset + (-offset) % bs  # first aligned offset at or after offset
        mid_end = end - end % bs
        edges: list[tuple[int, int, int]] = []  # (block offset, zero from, zero to) within the block
        if mid_start >= mid_end:  # everything inside one or two partial blocks
            mid_start = mid_end = 0
            for blk in range(first, last, bs):
                edges.append((blk, max(offset, blk) - blk, min(end, blk + bs) - blk))
        else:
            if offset != mid_start:
                edges.append((first, offset - first, bs))
            if end != mid_end:
                edges.append((mid_end, 0, end - mid_end))
        for blk, lo, hi in edges:  # never a whole block: those are all in the middle
            block = bytearray(await b.read(blk, bs))
            block[lo:hi] = bytes(hi - lo)
            await b.write(blk, bytes(block))
        step = b.max_zero_bytes
        pieces = [(o, min(step, mid_end - o)) for o in range(mid_start, mid_end, step)]
        sem = asyncio.Semaphore(NBD_ZERO_CONCURRENCY)
        op = b.trim if trim else b.zeroes

        async def one(o: int, n: int) -> None:
            async with sem:
                await op(o, n)

        await _gather_all([one(o, n) for o, n in pieces])


# ---------------------------------------------------------------- helpers


def _peer_name(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
    sock = writer.get_extra_info("socket")
    fd = sock.fileno() if sock is not None else -1
    return f"unix-socket(fd {fd})"


_SSL_SOURCE_RE = re.compile(r"\s*\(_ssl\.c:\d+\)")


def _volume_of(export_name: str) -> str:
    """The volume an export serves: ``VOLUME`` or ``VOLUME@SNAPSHOT`` -> ``VOLUME``."""
    return export_name.partition("@")[0]


def _describe_tls_error(e: BaseException) -> str:
    """An SSL error as one line, e.g. "[SSL: CERTIFICATE_VERIFY_FAILED] certificate
    verify failed: unable to get local issuer certificate" (a certificate of
    another CA), without OpenSSL's source location."""
    text = _SSL_SOURCE_RE.sub("", str(e)).strip()
    return text or type(e).__name__


def _describe(e: BaseException) -> str:
    if isinstance(e, asyncio.IncompleteReadError):
        return "EOF" if not e.partial else f"EOF after {len(e.partial)} of {e.expected} bytes"
    return str(e) or type(e).__name__


def _remove_stale_socket(path: str) -> None:
    """Remove a leftover Unix socket at ``path`` if nothing listens on it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(_errno.EEXIST, f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            os.unlink(path)
            return
    raise OSError(_errno.EADDRINUSE, f"another process serves on {path}")
