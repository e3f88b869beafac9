"""The replication window: pure bookkeeping of writes sent to the secondary.

No I/O, no asyncio: the replication link feeds it events (sent, ack, nack,
clock ticks) and it answers what completed and whether the secondary must be
declared failed. Unit-tested without sockets (tests/test_window.py).

Invariants (asserted):
* seqs are sent in strictly increasing order;
* an ack never covers a seq that was not sent;
* a write is either in flight, acked, or failed — never two of these.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(frozen=True)
class InFlight:
    seq: int
    offset: int
    length: int
    sent_at: float


@dataclass(frozen=True)
class NackInfo:
    seq: int
    offset: int
    length: int
    code: int
    message: str


class WindowFull(Exception):
    """Raised by ``send`` when the window has no room; callers check ``has_room`` first."""


@dataclass
class ReplicationWindow:
    """Writes sent but not yet acked, bounded by count and bytes."""

    window_writes: int
    window_bytes: int
    ack_timeout_s: float
    _inflight: OrderedDict[int, InFlight] = field(default_factory=OrderedDict)
    _bytes: int = 0
    last_sent_seq: int = 0
    acked_through_seq: int = 0
    nacks: list[NackInfo] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.window_writes < 1 or self.window_bytes < 1:
            raise ValueError("window_writes and window_bytes must be >= 1")
        if self.ack_timeout_s <= 0:
            raise ValueError("ack_timeout_s must be > 0")

    # ------------------------------------------------------------ queries
    @property
    def inflight_count(self) -> int:
        return len(self._inflight)

    @property
    def inflight_bytes(self) -> int:
        return self._bytes

    def has_room(self, n_writes: int, n_bytes: int) -> bool:
        """True when n more writes of n_bytes fit. An empty window always
        admits one batch, however large, so an oversized batch cannot stall
        forever."""
        if not self._inflight:
            return True
        return (
            self.inflight_count + n_writes <= self.window_writes
            and self._bytes + n_bytes <= self.window_bytes
        )

    def unacked(self) -> list[InFlight]:
        """Writes sent and neither acked nor NACKed, in seq order."""
        return list(self._inflight.values())

    def oldest_age_s(self, now: float) -> float:
        if not self._inflight:
            return 0.0
        first = next(iter(self._inflight.values()))
        return now - first.sent_at

    def timed_out(self, now: float) -> bool:
        """True when the oldest unacked write has waited longer than ack_timeout_s."""
        return self.oldest_age_s(now) > self.ack_timeout_s

    # ------------------------------------------------------------ events
    def send(self, seq: int, offset: int, length: int, now: float) -> None:
        if seq <= self.last_sent_seq:
            raise AssertionError(f"seq {seq} sent after seq {self.last_sent_seq}: seqs must increase")
        self.last_sent_seq = seq
        self._inflight[seq] = InFlight(seq, offset, length, now)
        self._bytes += length

    def ack(self, acked_through_seq: int) -> list[int]:
        """Cumulative ack; returns the seqs it completed (in order)."""
        if acked_through_seq > self.last_sent_seq:
            raise AssertionError(
                f"ack through seq {acked_through_seq} but only seq {self.last_sent_seq} was sent"
            )
        done: list[int] = []
        while self._inflight:
            seq, w = next(iter(self._inflight.items()))
            if seq > acked_through_seq:
                break
            self._inflight.popitem(last=False)
            self._bytes -= w.length
            done.append(seq)
        self.acked_through_seq = max(self.acked_through_seq, acked_through_seq)
        return done

    def nack(self, seq: int, code: int, message: str) -> NackInfo:
        """A precise failure for one write. The write leaves the window as failed."""
        w = self._inflight.pop(seq, None)
        if w is None:
            raise AssertionError(f"NACK for seq {seq}, which is not in flight")
        self._bytes -= w.length
        info = NackInfo(seq, w.offset, w.length, code, message)
        self.nacks.append(info)
        return info

    def fail_all(self) -> list[InFlight]:
        """The secondary is declared failed: every unacked write becomes failed.
        Returns them; the window is empty afterwards."""
        out = list(self._inflight.values())
        self._inflight.clear()
        self._bytes = 0
        return out
