"""The one workload of the multi-process checks, and the model of what it wrote.

The e2e tests, the nemesis and ``syncrep demo`` all do the same thing: write
blocks through the primary, remember which writes were acknowledged, and
later check that every acknowledged write is still there. This module is
that, once.

Blocks
------
Every block the workload writes is self-describing: a 32-byte header (magic,
writer, block index within the write, version, run seed, volume offset) and a
body derived from the header by BLAKE2b. Any block read back can therefore be
decoded to the write that produced it (:func:`decode_block`) -- or is provably
bytes that nobody wrote (a torn block, a block written at the wrong offset, a
block of another run, random bytes). :func:`describe_block` says which, for
messages.

Model
-----
Each writer owns a disjoint region of the volume and is sequential (one write
at a time), numbering its writes 1, 2, ... (the *version*). So on any block
the order of the writes that covered it is their version order, without
needing the primary's sequence numbers. Every write is an :class:`Op` in a
:class:`History`: offset, blocks, crc32c, invocation and completion times,
and the outcome: ``ok`` (acknowledged), ``fail`` (an error: the client cannot
know whether it was applied) or ``pending`` (still in flight when the
workload stopped). ``fail`` and ``pending`` are *indeterminate*.

Checks
------
:func:`check_blocks`: every block holds the latest acknowledged version of
that block, or a version whose write was indeterminate and issued after it
(it may or may not have landed); zeros only when no write to the block was
acknowledged; a block no write touched holds zeros. An older version is a
LOST write; undecodable bytes are GARBAGE.

Writers
-------
:class:`Workload` runs the writers through one :class:`~syncrep.client.VolumeClient`
(one shared write stream), either in the background until stopped or for a
fixed number of writes each, and records every write in its history.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import google_crc32c

from syncrep import client as sc

# ================================================================ blocks

MAGIC = b"SRNM"
HEADER = struct.Struct("<4sHHIIQ")  # magic, writer, block index, version, seed, offset -> 24 bytes
HEADER_BYTES = 32


def make_block(seed: int, writer: int, version: int, index: int, offset: int, block_size: int) -> bytes:
    """The content of block ``index`` of write ``version`` of ``writer`` at ``offset``."""
    head = HEADER.pack(MAGIC, writer, index, version, seed & 0xFFFFFFFF, offset).ljust(HEADER_BYTES, b"\0")
    body = hashlib.blake2b(head, digest_size=64).digest()
    n = block_size - HEADER_BYTES
    return head + (body * (n // 64 + 1))[:n]


def make_write(seed: int, writer: int, version: int, offset: int, nblocks: int, block_size: int) -> bytes:
    return b"".join(
        make_block(seed, writer, version, i, offset + i * block_size, block_size) for i in range(nblocks)
    )


@dataclass(frozen=True)
class Decoded:
    kind: str  # "zero" | "block" | "garbage"
    writer: int = -1
    version: int = 0
    index: int = 0


ZERO = Decoded("zero")
GARBAGE = Decoded("garbage")


def decode_block(data: bytes, seed: int, offset: int, block_size: int) -> Decoded:
    """What wrote this block at ``offset``: zeros, a workload write, or nobody."""
    if not data.strip(b"\0"):
        return ZERO
    if len(data) < HEADER_BYTES or data[:4] != MAGIC:
        return GARBAGE
    _, writer, index, version, s, off = HEADER.unpack_from(data)
    # The seed and offset are checked so that a block of another run, or one
    # that landed at the wrong offset, is not mistaken for a version here.
    if s != seed & 0xFFFFFFFF or off != offset:
        return GARBAGE
    # The whole block is compared, so a torn or corrupted block is garbage too.
    if data != make_block(seed, writer, version, index, offset, block_size):
        return GARBAGE
    return Decoded("block", writer, version, index)


def describe_block(data: bytes, offset: int, block_size: int) -> str:
    """What a block read at ``offset`` holds, for a message, without knowing
    the run: a self-describing block is named even when it is of another run
    or was written for another offset."""
    if not data.strip(b"\0"):
        return "zeros"
    if len(data) >= HEADER_BYTES and data[:4] == MAGIC:
        _, writer, index, version, s, off = HEADER.unpack_from(data)
        what = f"w{writer}v{version} (block {index} of the write, run seed {s})"
        if off != offset:
            what += f" written for offset {off}"
        if len(data) != block_size or data != make_block(s, writer, version, index, off, block_size):
            what += ", torn or corrupt"
        return what
    return "bytes no workload wrote"


# ================================================================ model

OK = "ok"
FAIL = "fail"
PENDING = "pending"


@dataclass
class Op:
    """One write of the workload."""

    writer: int
    version: int
    offset: int
    nblocks: int
    crc32c: int
    t_inv: float
    t_done: float = 0.0
    status: str = PENDING  # OK | FAIL | PENDING
    error: str = ""

    def blocks(self, block_size: int) -> range:
        b0 = self.offset // block_size
        return range(b0, b0 + self.nblocks)

    @property
    def indeterminate(self) -> bool:
        return self.status != OK


def describe_op(op: Op | None) -> str:
    if op is None:
        return "none"
    return f"w{op.writer}v{op.version}({op.status})"


@dataclass(frozen=True)
class Expected:
    """What one block may hold: the latest acknowledged write covering it
    (None: none was, so zeros are allowed) or any of the indeterminate writes
    issued after that one."""

    last_ack: Op | None
    maybe: tuple[Op, ...]

    def allows(self, writer: int, version: int) -> bool:
        if self.last_ack is not None and (self.last_ack.writer, self.last_ack.version) == (writer, version):
            return True
        return any((o.writer, o.version) == (writer, version) for o in self.maybe)

    @property
    def zeros_allowed(self) -> bool:
        return self.last_ack is None


@dataclass
class History:
    """Every write of a workload run, indexed by block."""

    seed: int
    block_size: int
    ops: list[Op] = field(default_factory=list)
    # by_block() is asked once per checked block; ops only ever grow (their
    # status changes in place, which the index does not depend on), so the
    # index is rebuilt only when the number of ops changed.
    _index: tuple[int, dict[int, list[Op]]] = field(
        default_factory=lambda: (-1, {}), init=False, repr=False, compare=False
    )

    def add(self, op: Op) -> None:
        self.ops.append(op)

    def by_block(self) -> dict[int, list[Op]]:
        """block -> the ops covering it, in version order (one writer per block)."""
        if self._index[0] != len(self.ops):
            out: dict[int, list[Op]] = {}
            for op in sorted(self.ops, key=lambda o: (o.writer, o.version)):
                for b in op.blocks(self.block_size):
                    out.setdefault(b, []).append(op)
            self._index = (len(self.ops), out)
        return self._index[1]

    def op_index(self) -> dict[tuple[int, int], Op]:
        return {(o.writer, o.version): o for o in self.ops}

    def expected(self, block: int) -> Expected:
        """The model of one block (see :class:`Expected`)."""
        ops = self.by_block().get(block, [])
        acked = [o for o in ops if o.status == OK]
        last = acked[-1] if acked else None
        after = last.version if last is not None else 0
        return Expected(last, tuple(o for o in ops if o.indeterminate and o.version > after))

    @property
    def acked(self) -> int:
        return sum(1 for o in self.ops if o.status == OK)

    @property
    def indeterminate(self) -> int:
        return sum(1 for o in self.ops if o.indeterminate)

    def touched_blocks(self) -> list[int]:
        return sorted(self.by_block())


# ================================================================ checks


@dataclass
class Finding:
    kind: str  # "lost" | "garbage" (check_blocks); "not_prefix" | "future" (deploy.checker)
    block: int
    offset: int
    detail: str


@dataclass
class BlockReport:
    checked: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return sum(1 for f in self.findings if f.kind == "lost")

    @property
    def garbage(self) -> int:
        return sum(1 for f in self.findings if f.kind == "garbage")

    @property
    def ok(self) -> bool:
        return not self.findings

    def extend(self, other: BlockReport) -> None:
        """Add the result of checking other blocks (a volume checked piece by piece)."""
        self.checked += other.checked
        self.findings += other.findings

    def summary(self, limit: int = 8) -> str:
        if self.ok:
            return f"{self.checked} blocks checked: all hold an allowed version"
        lines = [f"{len(self.findings)} bad blocks of {self.checked} checked "
                 f"({self.lost} lost, {self.garbage} garbage):"]
        lines += [f"  {f.kind.upper()} block {f.block} (offset {f.offset}): {f.detail}" for f in self.findings[:limit]]
        if len(self.findings) > limit:
            lines.append(f"  ... and {len(self.findings) - limit} more")
        return "\n".join(lines)


def check_blocks(history: History, read: Mapping[int, bytes], *, blocks: Iterable[int] | None = None) -> BlockReport:
    """No lost writes, no garbage. ``read`` maps block -> content read back
    (from the primary, after the run).

    ``blocks``: the blocks to check (default: every touched block and every
    block in ``read``). A touched block missing from ``read`` is reported
    lost; an untouched block in ``read`` must hold zeros (the volume starts
    zeroed, and nothing else writes to it).
    """
    bs = history.block_size
    rep = BlockReport()
    by_block = history.by_block()
    wanted = sorted(set(by_block) | set(read)) if blocks is None else blocks
    for b in wanted:
        data = read.get(b)
        if data is None:
            if b in by_block:
                rep.findings.append(Finding("lost", b, b * bs, "block was not read back"))
            continue
        rep.checked += 1
        exp = history.expected(b) if b in by_block else Expected(None, ())
        d = decode_block(data, history.seed, b * bs, bs)
        if d.kind == "garbage":
            rep.findings.append(Finding(
                "garbage", b, b * bs,
                f"bytes no writer wrote here ({describe_block(data, b * bs, bs)}; "
                f"latest ack {describe_op(exp.last_ack)})",
            ))
            continue
        if d.kind == "zero":
            if not exp.zeros_allowed:
                rep.findings.append(Finding("lost", b, b * bs,
                                            f"zeros, but {describe_op(exp.last_ack)} was acknowledged"))
            continue
        op = next((o for o in by_block.get(b, []) if (o.writer, o.version) == (d.writer, d.version)), None)
        if op is None:
            rep.findings.append(Finding("garbage", b, b * bs,
                                        f"holds w{d.writer}v{d.version}, a write that never covered this block"))
            continue
        if exp.allows(op.writer, op.version):
            continue
        assert exp.last_ack is not None  # with no ack, every write covering the block is allowed
        rep.findings.append(Finding(
            "lost", b, b * bs,
            f"holds {describe_op(op)}, but {describe_op(exp.last_ack)} was acknowledged later "
            f"(at t={exp.last_ack.t_done:.3f})",
        ))
    return rep


# ================================================================ block-by-block helpers


def blocks_from_bytes(data: bytes, start_offset: int, block_size: int, wanted: Iterable[int]) -> dict[int, bytes]:
    """Cut ``data`` (read at ``start_offset``) into the ``wanted`` blocks."""
    out = {}
    first = start_offset // block_size
    for b in wanted:
        i = (b - first) * block_size
        if 0 <= i and i + block_size <= len(data):
            out[b] = data[i:i + block_size]
    return out


def differing_blocks(a: bytes, b: bytes, block_size: int, start_offset: int = 0) -> list[int]:
    """Offsets of the blocks where ``a`` and ``b`` (both read at
    ``start_offset``) differ; a length difference counts from the shorter end."""
    if a == b:
        return []
    n = max(len(a), len(b))
    return [start_offset + k for k in range(0, n, block_size) if a[k:k + block_size] != b[k:k + block_size]]


def runs(blocks: Iterable[int], max_blocks: int) -> list[tuple[int, int]]:
    """Sorted ``blocks`` as (first, count) runs of consecutive blocks, at most
    ``max_blocks`` long (one read each instead of one per block)."""
    out: list[tuple[int, int]] = []
    for b in sorted(set(blocks)):
        if out and out[-1][0] + out[-1][1] == b and out[-1][1] < max_blocks:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out


async def read_blocks(addr: str, volume: str, blocks: Iterable[int], block_size: int, *,
                      snapshot_id: int = 0, max_read_bytes: int = 1 << 20,
                      timeout_s: float = 20.0) -> dict[int, bytes]:
    """Read ``blocks`` from one node (``NodeService.ReadLocal``) by runs of
    consecutive blocks."""
    out: dict[int, bytes] = {}
    for first, n in runs(blocks, max(1, max_read_bytes // block_size)):
        data = await sc.read_local(addr, volume, first * block_size, n * block_size, snapshot_id,
                                   timeout_s=timeout_s)
        out.update(blocks_from_bytes(data, first * block_size, block_size, range(first, first + n)))
    return out


# ================================================================ writers

#: Mostly small writes, some up to 1 MiB: (blocks, weight).
MIXED_SIZES: tuple[tuple[int, int], ...] = ((1, 30), (2, 20), (4, 20), (16, 15), (64, 10), (256, 5))


def split_regions(size: int, writers: int, block_size: int, start: int = 0) -> list[tuple[int, int]]:
    """``writers`` disjoint regions (start, size) of equal whole-block size in
    ``[start, start + size)``: one writer per block keeps the version order."""
    per = (size // writers) // block_size * block_size
    if per < block_size:
        raise ValueError(f"{size} bytes are too few for {writers} writers of {block_size}-byte blocks")
    return [(start + i * per, per) for i in range(writers)]


class Workload:
    """Sequential writers on disjoint regions through one client, every write
    recorded in :attr:`history`.

    ``connect`` opens the client (once, on first use). Each writer picks its
    next write from its own seeded random stream (``writer-<seed>-<w>``), so
    a seed replays the same offsets and sizes: uniformly 1 .. ``max_blocks``
    blocks, or from ``sizes`` ((blocks, weight) pairs, capped at
    ``max_blocks``).
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[sc.VolumeClient]],
        *,
        seed: int,
        regions: Sequence[tuple[int, int]],
        block_size: int = 4096,
        max_blocks: int = 16,
        sizes: Sequence[tuple[int, int]] = (),
        t0: float | None = None,
        fail_pause_s: float = 0.05,
    ) -> None:
        self._connect = connect
        self.seed = seed
        self.regions = list(regions)
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.sizes = tuple(sizes)
        self.t0 = time.monotonic() if t0 is None else t0
        self.fail_pause_s = fail_pause_s
        self.history = History(seed, block_size)
        self.client: sc.VolumeClient | None = None
        # Counters kept as writes complete (wait_acked polls them; counting
        # the history each time would grow with the run).
        self.acked = 0
        self.acked_bytes = 0
        self.failed = 0
        self.errors: list[str] = []
        self._versions = [0] * len(self.regions)
        self._rngs = [random.Random(f"writer-{seed}-{w}") for w in range(len(self.regions))]
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def get_client(self) -> sc.VolumeClient:
        if self.client is None:
            self.client = await self._connect()
        return self.client

    def _next(self, w: int, max_blocks: int) -> tuple[Op, bytes]:
        start, size = self.regions[w]
        bs = self.block_size
        nblocks = size // bs
        rng = self._rngs[w]
        if self.sizes:
            choices = [(n, wt) for n, wt in self.sizes if n <= max_blocks] or [(1, 1)]
            n = min(rng.choices([c for c, _ in choices], [wt for _, wt in choices])[0], nblocks)
        else:
            n = rng.randint(1, min(max_blocks, nblocks))
        off = start + rng.randrange(0, nblocks - n + 1) * bs
        self._versions[w] += 1
        data = make_write(self.seed, w, self._versions[w], off, n, bs)
        op = Op(w, self._versions[w], off, n, google_crc32c.value(data), time.monotonic() - self.t0)
        return op, data

    async def write_one(self, w: int, *, max_blocks: int | None = None) -> Op:
        """Writer ``w``'s next write. Recorded before it is sent (so a write
        cut short by a fault or a cancel stays in the history, indeterminate);
        a failure is recorded, then raised."""
        client = await self.get_client()
        op, data = self._next(w, max_blocks or self.max_blocks)
        self.history.add(op)
        try:
            await client.write(op.offset, data)
        except sc.ClientError as e:
            op.status = FAIL
            op.error = str(e)[:300]
            op.t_done = time.monotonic() - self.t0
            self.failed += 1
            self.errors.append(str(e))
            raise
        op.status = OK
        op.t_done = time.monotonic() - self.t0
        self.acked += 1
        self.acked_bytes += len(data)
        return op

    async def write_each(self, counts: Sequence[int], *, max_blocks: int | None = None) -> tuple[int, int, float]:
        """Writer ``i`` does ``counts[i]`` writes, one after another, all
        writers at once. The first failure is raised. Returns (writes, bytes,
        seconds)."""
        await self.get_client()
        w0, b0, t0 = self.acked, self.acked_bytes, time.monotonic()

        async def writer(w: int, n: int) -> None:
            for _ in range(n):
                await self.write_one(w, max_blocks=max_blocks)

        await asyncio.gather(*(writer(w, n) for w, n in enumerate(counts) if n))
        return self.acked - w0, self.acked_bytes - b0, time.monotonic() - t0

    async def start(self, writers: Iterable[int] | None = None, *, max_blocks: int | None = None) -> None:
        """Start ``writers`` (default: all) in the background until
        :meth:`stop_writers`. A failed write is recorded and the writer goes on
        after a short pause (the pair may be failing over)."""
        await self.get_client()
        self._stop.clear()
        ws = range(len(self.regions)) if writers is None else writers
        self._tasks += [asyncio.create_task(self._loop(w, max_blocks), name=f"writer-{w}") for w in ws]

    async def _loop(self, w: int, max_blocks: int | None) -> None:
        while not self._stop.is_set():
            try:
                await self.write_one(w, max_blocks=max_blocks)
            except sc.ClientError:
                await asyncio.sleep(self.fail_pause_s)

    async def stop_writers(self, timeout_s: float = 75.0) -> None:
        """Stop the background writers after their current write; a writer
        still waiting after ``timeout_s`` is cancelled (its write stays
        pending: indeterminate). The default outlasts the client's default
        write timeout."""
        self._stop.set()
        tasks, self._tasks = self._tasks, []
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for t in pending:
                t.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            # A writer that died of anything but a client error is a bug of
            # the harness: it must not pass for a quiet writer.
            crashed = [r for r in results if isinstance(r, Exception)]
            if crashed:
                raise crashed[0]

    async def stop(self, timeout_s: float = 75.0) -> None:
        """Stop the writers and close the client."""
        try:
            await self.stop_writers(timeout_s)
        finally:
            if self.client is not None:
                with contextlib.suppress(Exception):
                    await self.client.close()
                self.client = None

    async def run_for(self, seconds: float) -> None:
        await self.start()
        await asyncio.sleep(seconds)
        await self.stop()

    async def wait_acked(self, n: int, timeout_s: float = 30.0) -> None:
        """Wait until ``n`` more writes were acknowledged (bounded)."""
        target = self.acked + n
        deadline = time.monotonic() + timeout_s
        while self.acked < target:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"only {self.acked} of {target} writes acknowledged in {timeout_s} s (seed {self.seed})"
                )
            await asyncio.sleep(0.02)
