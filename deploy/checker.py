"""The nemesis checker: what the workload wrote against what the replicas hold.

Data format
-----------
Every block a workload writer writes is self-describing: a 32-byte header
(magic, writer, version, block index within the write, volume offset, run
seed) and a body derived from the header by BLAKE2b. So any block read back
can be decoded to the write that produced it (:func:`decode_block`) -- or is
provably bytes that nobody wrote.

History
-------
Each writer owns a disjoint region and is sequential (one write at a time),
numbering its writes 1, 2, ... (the *version*). For every write the workload
records an :class:`Op`: offset, blocks, crc32c of the data, invocation and
completion times, and the outcome: ``ok`` (acknowledged), ``fail`` (an error:
indeterminate, the write may or may not have been applied) or ``pending``
(still in flight when the workload stopped: indeterminate too).

Checks
------
* :func:`check_blocks` (no lost writes): every block the workload touched
  must hold the latest acknowledged version of that block, or a version
  whose write was indeterminate and was issued after that acknowledged one
  (in flight at the end, or failed later); zeros only when no write to the
  block was acknowledged. An older acknowledged version is a LOST write;
  undecodable bytes are GARBAGE.
* :func:`check_rollback_point` (crash consistency of the secondary's
  ``pre-resync-*`` snapshot): that snapshot must be a state the primary had.
  Crash-consistent means: the state a disk could hold after a crash at
  some instant T of the primary's write stream -- every write acknowledged
  before T is there, writes in flight at T may be there, absent, or torn
  (block by block), nothing later is there. What is checkable without the
  primary's sequence numbers: with V_w the newest version of writer w
  visible anywhere in the snapshot (so T is after V_w was issued), every
  block of w's region holds a version u <= V_w such that no *acknowledged*
  write of w covering the block has a version in (u, V_w) -- writes of a
  writer are issued strictly one after another, so every acknowledged write
  before V_w completed before T. V_w itself may be torn, and indeterminate
  writes may be missing. Also: no garbage, and no version whose write was
  invoked after the snapshot was read (a snapshot cannot come from the
  future). An out-of-order replica (a later write applied, an earlier
  acknowledged one missing) fails this.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

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
    if s != seed & 0xFFFFFFFF or off != offset:
        return GARBAGE
    if data != make_block(seed, writer, version, index, offset, block_size):
        return GARBAGE
    return Decoded("block", writer, version, index)


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
    status: str = "pending"  # "ok" | "fail" | "pending"
    error: str = ""

    def blocks(self, block_size: int) -> range:
        b0 = self.offset // block_size
        return range(b0, b0 + self.nblocks)


@dataclass
class History:
    """Every write of a workload run, indexed by block."""

    seed: int
    block_size: int
    ops: list[Op] = field(default_factory=list)

    def add(self, op: Op) -> None:
        self.ops.append(op)

    def by_block(self) -> dict[int, list[Op]]:
        """block -> the ops covering it, in version order (one writer per block)."""
        out: dict[int, list[Op]] = {}
        for op in sorted(self.ops, key=lambda o: (o.writer, o.version)):
            for b in op.blocks(self.block_size):
                out.setdefault(b, []).append(op)
        return out

    def op_index(self) -> dict[tuple[int, int], Op]:
        return {(o.writer, o.version): o for o in self.ops}

    @property
    def acked(self) -> int:
        return sum(1 for o in self.ops if o.status == "ok")

    @property
    def indeterminate(self) -> int:
        return sum(1 for o in self.ops if o.status != "ok")

    def touched_blocks(self) -> list[int]:
        return sorted(self.by_block())


@dataclass
class Finding:
    kind: str  # "lost" | "garbage" | "not_prefix" | "future"
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

    def summary(self, limit: int = 8) -> str:
        if self.ok:
            return f"{self.checked} blocks checked: all hold an allowed version"
        lines = [f"{len(self.findings)} bad blocks of {self.checked} checked "
                 f"({self.lost} lost, {self.garbage} garbage):"]
        lines += [f"  {f.kind.upper()} block {f.block} (offset {f.offset}): {f.detail}" for f in self.findings[:limit]]
        if len(self.findings) > limit:
            lines.append(f"  ... and {len(self.findings) - limit} more")
        return "\n".join(lines)


def _describe(op: Op | None) -> str:
    if op is None:
        return "none"
    return f"w{op.writer}v{op.version}({op.status})"


def check_blocks(history: History, read: dict[int, bytes]) -> BlockReport:
    """No lost writes: ``read`` maps block -> content read from the primary
    after the run (every touched block must be there)."""
    bs = history.block_size
    rep = BlockReport()
    for b, ops in sorted(history.by_block().items()):
        data = read.get(b)
        if data is None:
            rep.findings.append(Finding("lost", b, b * bs, "block was not read back"))
            continue
        rep.checked += 1
        d = decode_block(data, history.seed, b * bs, bs)
        acked = [o for o in ops if o.status == "ok"]
        last_ack = acked[-1] if acked else None
        if d.kind == "garbage":
            rep.findings.append(Finding("garbage", b, b * bs,
                                        f"bytes no writer wrote (latest ack {_describe(last_ack)})"))
            continue
        if d.kind == "zero":
            if last_ack is not None:
                rep.findings.append(Finding("lost", b, b * bs,
                                            f"zeros, but {_describe(last_ack)} was acknowledged"))
            continue
        op = next((o for o in ops if (o.writer, o.version) == (d.writer, d.version)), None)
        if op is None:
            rep.findings.append(Finding("garbage", b, b * bs,
                                        f"holds w{d.writer}v{d.version}, a write that never covered this block"))
            continue
        if last_ack is None or op is last_ack:
            continue
        if op.version > last_ack.version and op.status != "ok":
            continue  # indeterminate, issued after the last acknowledged write
        rep.findings.append(Finding(
            "lost", b, b * bs,
            f"holds {_describe(op)}, but {_describe(last_ack)} was acknowledged later "
            f"(at t={last_ack.t_done:.3f})",
        ))
    return rep


@dataclass
class RollbackReport(BlockReport):
    name: str = ""
    captured_at: float = 0.0
    newest: dict[int, int] = field(default_factory=dict)  # writer -> newest visible version

    def summary(self, limit: int = 8) -> str:
        head = f"rollback point {self.name!r} (read at t={self.captured_at:.2f})"
        if self.ok:
            return f"{head}: crash-consistent ({self.checked} blocks; newest versions {self.newest})"
        lines = [f"{head}: NOT a state the primary had ({len(self.findings)} bad blocks):"]
        lines += [f"  {f.kind.upper()} block {f.block} (offset {f.offset}): {f.detail}" for f in self.findings[:limit]]
        return "\n".join(lines)


def check_rollback_point(
    history: History, snapshot: dict[int, bytes], *, name: str = "", captured_at: float = float("inf"),
) -> RollbackReport:
    """Crash consistency of a secondary snapshot (see the module docstring).
    ``snapshot`` maps block -> content for (at least) every touched block."""
    bs = history.block_size
    rep = RollbackReport(name=name, captured_at=captured_at)
    by_block = history.by_block()
    index = history.op_index()
    decoded: dict[int, Decoded] = {}
    for b in by_block:
        data = snapshot.get(b)
        if data is None:
            continue
        d = decode_block(data, history.seed, b * bs, bs)
        decoded[b] = d
        rep.checked += 1
        if d.kind == "garbage":
            rep.findings.append(Finding("garbage", b, b * bs, "bytes no writer wrote"))
        elif d.kind == "block":
            op = index.get((d.writer, d.version))
            if op is None or b not in op.blocks(bs):
                rep.findings.append(Finding("garbage", b, b * bs, f"w{d.writer}v{d.version} never covered it"))
            elif op.t_inv > captured_at:
                rep.findings.append(Finding("future", b, b * bs,
                                            f"{_describe(op)} was invoked after the snapshot was read"))
            else:
                rep.newest[d.writer] = max(rep.newest.get(d.writer, 0), d.version)
    for b, ops in by_block.items():
        got = decoded.get(b)
        if got is None or got.kind == "garbage":
            continue
        writer = ops[0].writer
        vmax = rep.newest.get(writer, 0)
        have = got.version if got.kind == "block" else 0
        # The newest write itself may be torn (in flight when the state was
        # cut: a multi-block write is not atomic); every acknowledged write
        # before it must be there.
        skipped = [o for o in ops if o.status == "ok" and have < o.version < vmax]
        if skipped:
            rep.findings.append(Finding(
                "not_prefix", b, b * bs,
                f"holds {'zeros' if have == 0 else f'w{writer}v{have}'} but the snapshot shows w{writer}v{vmax}, "
                f"and {_describe(skipped[-1])} (acknowledged before w{writer}v{vmax} was issued) is missing",
            ))
    return rep


def blocks_from_bytes(data: bytes, start_offset: int, block_size: int, wanted: Iterable[int]) -> dict[int, bytes]:
    """Cut ``data`` (read at ``start_offset``) into the ``wanted`` blocks."""
    out = {}
    first = start_offset // block_size
    for b in wanted:
        i = (b - first) * block_size
        if 0 <= i and i + block_size <= len(data):
            out[b] = data[i:i + block_size]
    return out
