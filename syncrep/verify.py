"""Online verify: are the primary's and the secondary's copies of a volume identical?

Like DRBD's online verify, the data never leaves the nodes: each node computes a
crc32c per ``chunk_bytes`` chunk of its own copy (``NodeService.Checksum``) and
only the checksums travel. The volume is asked for in slices of
``slice_chunks`` chunks per call, so a reply stays small (4096 chunks = 16 KiB
of checksums) whatever the volume size; both nodes hash each slice
concurrently, and only the mismatching chunks are kept, so memory stays
bounded for a 1 TiB volume too.

A mismatching chunk becomes a byte extent (clipped to the volume size);
adjacent ones are merged. With ``repair=True`` the mismatching extents are
handed to the primary (``NodeService.Repair``), which re-sends just those to
the secondary under a brief write quiesce; then the volume is verified again.

The two nodes hash at slightly different moments: a verify while writes are in
flight can report chunks that differ only transiently (a write landed on one
node between the two reads). Run it on a quiet volume, or run it again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from syncrep import client, rpc
from syncrep.blockstore import Extent, merge_extents
from syncrep.client import STATE_NAMES, ClientError
from syncrep.pb import syncrep_pb2 as pb
from syncrep.pb import syncrep_pb2_grpc as pb_grpc

#: Default chunk: one crc32c per MiB.
DEFAULT_CHUNK_BYTES = client.DEFAULT_CHECKSUM_CHUNK_BYTES
#: Largest chunk a node accepts in NodeService.Checksum.
MAX_CHUNK_BYTES = 64 * 1024 * 1024
#: Chunks per Checksum call (bounds the reply: 4 bytes or so per chunk).
DEFAULT_SLICE_CHUNKS = 4096
#: The slowest hash rate a Checksum call's deadline allows for (it reads the
#: whole slice from disk): a 4 GiB slice gets 256 s.
MIN_HASH_RATE_BYTES_PER_S = 16 * 1024 * 1024
#: Repair re-sends data to the secondary: its deadline allows this rate at least.
MIN_REPAIR_RATE_BYTES_PER_S = 8 * 1024 * 1024

T = TypeVar("T")

#: ``progress(bytes_done, bytes_total)`` after each slice.
Progress = Callable[[int, int], None]


class VerifyError(Exception):
    """Verify cannot run (bad chunk size, a node missing, a malformed reply)."""


class RepairError(VerifyError):
    """The first pass found mismatches (``result``) and the repair failed or
    was refused (e.g. FAILED_PRECONDITION: the pair is not in sync); ``cause``
    is the :class:`ClientError` or :class:`VerifyError`."""

    def __init__(self, message: str, result: VerifyResult, cause: Exception | None = None) -> None:
        super().__init__(message)
        self.result = result
        self.cause = cause


@dataclass
class VerifyResult:
    """The outcome of one verify pass (with ``repair``: of the final pass).

    ``hash_rate_bytes_per_s`` is per node: each node hashed ``size_bytes``
    (both at once) in ``elapsed_s``. ``before_repair`` is the first pass when a
    repair ran; ``repaired_bytes`` what the primary re-sent.
    """

    volume: str
    primary: str
    secondary: str
    size_bytes: int
    block_size: int
    chunk_bytes: int
    chunks: int
    mismatches: list[Extent]
    mismatched_bytes: int
    elapsed_s: float
    hash_rate_bytes_per_s: float
    state: str = "in_sync"
    repaired_bytes: int = 0
    repair_message: str = ""
    before_repair: VerifyResult | None = None
    node_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def identical(self) -> bool:
        return not self.mismatches

    @property
    def repaired(self) -> bool:
        return self.before_repair is not None

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of ``syncrep verify --json``."""
        d: dict[str, Any] = {
            "volume": self.volume,
            "identical": self.identical,
            "state": self.state,
            "primary": self.primary,
            "secondary": self.secondary,
            "size_bytes": self.size_bytes,
            "block_size": self.block_size,
            "chunk_bytes": self.chunk_bytes,
            "chunks": self.chunks,
            "mismatches": [{"offset": e.offset, "length": e.length} for e in self.mismatches],
            "mismatch_count": len(self.mismatches),
            "mismatched_bytes": self.mismatched_bytes,
            "elapsed_s": round(self.elapsed_s, 6),
            "hash_rate_bytes_per_s": round(self.hash_rate_bytes_per_s, 1),
            "node_seconds": {k: round(v, 6) for k, v in self.node_seconds.items()},
            "repaired_bytes": self.repaired_bytes,
            "before_repair": self.before_repair.to_dict() if self.before_repair is not None else None,
        }
        return d


def mismatched_extents(
    primary_sums: Sequence[int],
    secondary_sums: Sequence[int],
    chunk_bytes: int,
    offset: int,
    volume_size: int,
) -> list[Extent]:
    """The byte extents whose checksums differ, merged.

    ``primary_sums[i]`` and ``secondary_sums[i]`` are the checksums of the chunk
    at ``offset + i * chunk_bytes``; the last chunk of the volume is clipped to
    ``volume_size``. A chunk that only one side has a checksum for counts as
    mismatching (nothing shows it equal).
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes {chunk_bytes} must be positive")
    out: list[Extent] = []
    n = max(len(primary_sums), len(secondary_sums))
    for i in range(n):
        a = primary_sums[i] if i < len(primary_sums) else None
        b = secondary_sums[i] if i < len(secondary_sums) else None
        if a is not None and a == b:
            continue
        start = offset + i * chunk_bytes
        if start >= volume_size:
            break
        out.append(Extent(start, min(chunk_bytes, volume_size - start)))
    return merge_extents(out)


def _check_chunk(chunk_bytes: int, block_size: int) -> None:
    if chunk_bytes <= 0 or chunk_bytes % block_size or chunk_bytes > MAX_CHUNK_BYTES:
        raise VerifyError(
            f"chunk size {chunk_bytes} must be a positive multiple of the volume's {block_size}-byte "
            f"block size and at most {MAX_CHUNK_BYTES // (1024 * 1024)} MiB"
        )


async def _timed_checksum(
    node: str, volume: str, chunk_bytes: int, offset: int, length: int, timeout_s: float
) -> tuple[list[int], float]:
    t0 = time.monotonic()
    sums = await client.checksum(node, volume, chunk_bytes, offset=offset, length=length, timeout_s=timeout_s)
    return sums, time.monotonic() - t0


async def _both(a: Coroutine[Any, Any, T], b: Coroutine[Any, Any, T]) -> tuple[T, T]:
    """Run two calls concurrently; the first failure cancels the other and is raised."""
    ta, tb = asyncio.ensure_future(a), asyncio.ensure_future(b)
    try:
        ra, rb = await asyncio.gather(ta, tb)
    except BaseException:
        for t in (ta, tb):
            t.cancel()
        await asyncio.gather(ta, tb, return_exceptions=True)
        raise
    return ra, rb


async def _status(coordinator: str, volume: str) -> pb.VolumeStatus:
    st = await client.get_volume(coordinator, volume)
    if not st.primary or not st.secondary:
        raise VerifyError(f"volume {volume!r} has no {'primary' if not st.primary else 'secondary'} assigned")
    if not st.spec.size_bytes or not st.spec.block_size:
        raise VerifyError(f"the coordinator reports no size for volume {volume!r}")
    return st


async def _verify_once(
    st: pb.VolumeStatus,
    volume: str,
    chunk_bytes: int,
    slice_chunks: int,
    progress: Progress | None,
) -> VerifyResult:
    size = int(st.spec.size_bytes)
    primary, secondary = st.primary, st.secondary
    slice_bytes = chunk_bytes * slice_chunks
    timeout_s = max(client.CHECKSUM_TIMEOUT_S, min(slice_bytes, size) / MIN_HASH_RATE_BYTES_PER_S)
    mismatches: list[Extent] = []
    node_s = {"primary": 0.0, "secondary": 0.0}
    t0 = time.monotonic()
    offset = 0
    while offset < size:
        length = min(slice_bytes, size - offset)
        want = -(-length // chunk_bytes)
        (ps, pt), (ss, stt) = await _both(
            _timed_checksum(primary, volume, chunk_bytes, offset, length, timeout_s),
            _timed_checksum(secondary, volume, chunk_bytes, offset, length, timeout_s),
        )
        node_s["primary"] += pt
        node_s["secondary"] += stt
        for who, sums in (("primary", ps), ("secondary", ss)):
            addr = primary if who == "primary" else secondary
            if len(sums) != want:
                raise VerifyError(
                    f"the {who} {addr} returned {len(sums)} checksums for {want} chunks of "
                    f"{chunk_bytes} bytes at offset {offset}"
                )
        mismatches.extend(mismatched_extents(ps, ss, chunk_bytes, offset, size))
        offset += length
        if progress is not None:
            progress(offset, size)
    elapsed = time.monotonic() - t0
    merged = merge_extents(mismatches)
    return VerifyResult(
        volume=volume,
        primary=primary,
        secondary=secondary,
        size_bytes=size,
        block_size=int(st.spec.block_size),
        chunk_bytes=chunk_bytes,
        chunks=-(-size // chunk_bytes),
        mismatches=merged,
        mismatched_bytes=sum(e.length for e in merged),
        elapsed_s=elapsed,
        hash_rate_bytes_per_s=size / elapsed if elapsed > 0 else 0.0,
        state=STATE_NAMES.get(st.state, "unspecified"),
        node_seconds=node_s,
    )


async def repair_extents(primary: str, volume: str, extents: Sequence[Extent]) -> tuple[int, str]:
    """``NodeService.Repair`` on the primary: re-send ``extents`` to the
    secondary under a brief quiesce. Returns (bytes sent, the node's message).
    FAILED_PRECONDITION (as :class:`ClientError`) unless the pair is in sync."""
    total = sum(e.length for e in extents)
    what = f"Repair of {len(extents)} extent(s), {total} bytes of {volume} on {primary}"
    req = pb.RepairRequest(volume=volume, extents=[pb.Extent(offset=e.offset, length=e.length) for e in extents])
    timeout_s = max(30.0, total / MIN_REPAIR_RATE_BYTES_PER_S)
    try:
        async with rpc.channel(primary) as ch:
            reply = await pb_grpc.NodeServiceStub(ch).Repair(req, timeout=timeout_s)
    except grpc.RpcError as e:
        err = ClientError.from_rpc(e, what)
        if err.code == grpc.StatusCode.UNAVAILABLE:
            err.what = f"cannot reach node {primary} ({what})"
        raise err from None
    return int(reply.bytes_sent), str(reply.message)


async def verify_volume(
    coordinator: str,
    volume: str,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    repair: bool = False,
    slice_chunks: int = DEFAULT_SLICE_CHUNKS,
    progress: Progress | None = None,
) -> VerifyResult:
    """Compare the primary's and the secondary's copies of ``volume`` chunk by
    chunk (crc32c computed on each node) and return the mismatching extents.

    With ``repair`` and mismatches: have the primary re-send those extents
    (refused with FAILED_PRECONDITION unless the pair is in sync), verify
    again, and return the second result with the first in ``before_repair``.
    Raises :class:`ClientError` (an RPC failed) or :class:`VerifyError`.
    """
    if slice_chunks < 1:
        raise VerifyError(f"slice_chunks {slice_chunks} must be at least 1")
    st = await _status(coordinator, volume)
    _check_chunk(chunk_bytes, int(st.spec.block_size))
    first = await _verify_once(st, volume, chunk_bytes, slice_chunks, progress)
    if not repair or first.identical:
        return first
    try:
        sent, message = await repair_extents(first.primary, volume, first.mismatches)
    except ClientError as e:
        raise RepairError(f"repair refused: {e}" if e.code == grpc.StatusCode.FAILED_PRECONDITION
                          else str(e), first, e) from None
    st2 = await _status(coordinator, volume)
    if (st2.primary, st2.secondary) != (first.primary, first.secondary):
        raise RepairError(
            f"the pair of {volume!r} changed during the repair (primary {st2.primary}, secondary "
            f"{st2.secondary}); verify again", first
        )
    second = await _verify_once(st2, volume, chunk_bytes, slice_chunks, progress)
    second.repaired_bytes = sent
    second.repair_message = message
    second.before_repair = first
    return second
