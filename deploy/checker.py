"""The nemesis checker: what the workload wrote against what the replicas hold.

The block format, the model of acknowledged and indeterminate writes and the
no-lost-writes check (:func:`check_blocks`) are :mod:`deploy.workload`'s,
shared with the e2e tests and ``syncrep demo``; they are re-exported here
under their old names. What is the nemesis's own is the crash consistency
of the secondary's rollback points:

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

from dataclasses import dataclass, field

from deploy.workload import (
    GARBAGE,
    HEADER,
    HEADER_BYTES,
    MAGIC,
    ZERO,
    BlockReport,
    Decoded,
    Finding,
    History,
    Op,
    blocks_from_bytes,
    check_blocks,
    decode_block,
    describe_op,
    make_block,
    make_write,
)

__all__ = [
    "GARBAGE",
    "HEADER",
    "HEADER_BYTES",
    "MAGIC",
    "ZERO",
    "BlockReport",
    "Decoded",
    "Finding",
    "History",
    "Op",
    "RollbackReport",
    "blocks_from_bytes",
    "check_blocks",
    "check_rollback_point",
    "decode_block",
    "make_block",
    "make_write",
]


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
                                            f"{describe_op(op)} was invoked after the snapshot was read"))
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
                f"and {describe_op(skipped[-1])} (acknowledged before w{writer}v{vmax} was issued) is missing",
            ))
    return rep
