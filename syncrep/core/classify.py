"""Pure decisions of the secondary: which replicated writes to apply, which to NACK, and why.

No I/O. The replica servicer feeds each incoming batch through
``StreamState.plan`` and carries out the result: apply the accepted writes
in one group commit, then send one NACK per refused write and a cumulative
ack. ``nack_for_oserror`` turns a storage failure into failure information.
"""

from __future__ import annotations

import errno
import sqlite3
from dataclasses import dataclass, field
from typing import cast

import google_crc32c

from syncrep.pb import syncrep_pb2 as pb


@dataclass(frozen=True)
class Refusal:
    seq: int
    offset: int
    length: int
    code: int  # pb.NackCode
    message: str


@dataclass
class Plan:
    apply: list[pb.ReplicatedWrite] = field(default_factory=list)
    refuse: list[Refusal] = field(default_factory=list)


def nack_code(code: int) -> pb.NackCode.ValueType:
    return cast("pb.NackCode.ValueType", code)


#: What a failing store raises: OSError from the files, sqlite3.Error from its
#: metadata database (a full disk surfaces as "database or disk is full").
STORAGE_ERRORS: tuple[type[Exception], ...] = (OSError, sqlite3.Error)


def storage_errno(e: BaseException) -> int | None:
    """The errno of a storage failure (ENOSPC for SQLite's "disk is full")."""
    if isinstance(e, OSError):
        return e.errno
    if isinstance(e, sqlite3.Error) and "full" in str(e).lower():
        return errno.ENOSPC
    return errno.EIO


def storage_error_text(e: BaseException) -> str:
    return (e.strerror if isinstance(e, OSError) else None) or str(e) or type(e).__name__


def nack_code_for_errno(err: int | None) -> int:
    if err in (errno.ENOSPC, errno.EDQUOT):
        return pb.NACK_CODE_NO_SPACE
    return pb.NACK_CODE_IO_ERROR


def write_span(w: pb.ReplicatedWrite) -> int:
    """The bytes of the volume a replicated write covers: its data, or its
    zero range (``zero_length``, issue 14: TRIM and WRITE_ZEROES, no data)."""
    return w.zero_length or len(w.data)


@dataclass
class StreamState:
    """Per-stream bookkeeping on the secondary.

    ``failed`` is sticky: once one write failed, every later write on the
    stream is refused with STREAM_FAILED. Applying writes after a gap would
    leave the replica in a state the primary never had; the primary declares
    the secondary failed on the first NACK anyway and resyncs every unacked
    extent.
    """

    volume: str
    epoch: int
    next_seq: int
    size_bytes: int
    block_size: int
    failed: bool = False
    failure: str = ""

    def plan(self, batch_epoch: int, writes: list[pb.ReplicatedWrite]) -> Plan:
        p = Plan()
        for w in writes:
            r = self._check(batch_epoch, w)
            if r is None:
                p.apply.append(w)
                self.next_seq = w.seq + 1
            else:
                p.refuse.append(r)
                if not self.failed:
                    self.failed = True
                    self.failure = f"seq {w.seq}: {r.message}"
                # keep the expected seq moving so later writes get STREAM_FAILED,
                # not a cascade of OUT_OF_ORDER
                self.next_seq = max(self.next_seq, w.seq + 1)
        return p

    def fail_applied(self, writes: list[pb.ReplicatedWrite], code: int, message: str) -> list[Refusal]:
        """The store refused a group commit: every write in it failed."""
        self.failed = True
        self.failure = message
        return [Refusal(w.seq, w.offset, write_span(w), code, message) for w in writes]

    def _check(self, batch_epoch: int, w: pb.ReplicatedWrite) -> Refusal | None:
        n = write_span(w)

        def refuse(code: int, msg: str) -> Refusal:
            return Refusal(w.seq, w.offset, n, code, msg)

        if batch_epoch != self.epoch:
            return refuse(
                pb.NACK_CODE_STALE_EPOCH,
                f"write seq {w.seq} carries epoch {batch_epoch} but the stream is at epoch {self.epoch}",
            )
        if self.failed:
            return refuse(
                pb.NACK_CODE_STREAM_FAILED,
                f"not applied: an earlier write on this stream failed ({self.failure})",
            )
        if w.seq != self.next_seq:
            return refuse(
                pb.NACK_CODE_OUT_OF_ORDER,
                f"write seq {w.seq} arrived but seq {self.next_seq} was expected",
            )
        if (
            n == 0
            or w.offset % self.block_size
            or n % self.block_size
            or w.offset + n > self.size_bytes
        ):
            return refuse(
                pb.NACK_CODE_OUT_OF_RANGE,
                f"write seq {w.seq} at offset {w.offset} length {n} is outside or misaligned for "
                f"volume {self.volume!r} ({self.size_bytes} bytes, {self.block_size}-byte blocks)",
            )
        if w.zero_length and w.data:
            return refuse(
                pb.NACK_CODE_OUT_OF_RANGE,
                f"write seq {w.seq} at offset {w.offset} is a zero range of {w.zero_length} bytes "
                f"that also carries {len(w.data)} bytes of data",
            )
        crc = google_crc32c.value(w.data)
        if crc != w.crc32c:
            return refuse(
                pb.NACK_CODE_CHECKSUM_MISMATCH,
                f"write seq {w.seq} at offset {w.offset}: crc32c {crc:#010x} != sent {w.crc32c:#010x}",
            )
        return None
