"""The primary's resync send window, pure: which chunks of a round go next.

One resync round sends a fixed list of pieces (``plan_pieces``: chunk ``i``
is ``pieces[i] = (offset, length)``) over one stream, starting where the
secondary says it stopped (``start``, its ``applied_below`` in the first
reply). ``RoundSender`` (``primary/resync.py``) is the executor: it reads
chunks, writes them to the stream and reads the replies; this class decides
everything in between, without I/O:

* what may be read and sent now (``next_batch``): chunks go in index order,
  at most ``read_batch_chunks`` per read (one thread hop), while fewer than
  ``window_chunks`` are unapplied and in-flight bytes are below
  ``window_bytes`` -- both bound memory on both sides, and each window's worth
  becomes one group commit on the secondary. In-flight bytes are payload
  bytes: a chunk sent as zeros without a payload (``sent(...,
  payload_bytes=0)``, issue 14) holds no memory and counts 0, so a run of
  holes is bounded by ``window_chunks`` alone. A chunk is admitted while the
  in-flight bytes are *below* the byte bound, so the last chunk admitted may
  overshoot it (by less than its own length); and an empty window always
  admits one chunk, however large, or an oversized chunk would wait forever;
* what is applied (``on_applied``): the secondary applies in index order and
  says ``applied_below``; it can never claim a chunk that was not sent;
* refusals (``on_refused``): the secondary drops every chunk after one it
  refused (bad checksum), so the primary goes back and re-sends from the
  refused chunk; one chunk refused more than ``max_refusals_per_chunk``
  times in a round aborts it (the data keeps arriving damaged: retrying
  forever would hide it);
* the round's digest (``digest``, a ``RoundDigest``): sha256 over the record
  (index, offset, length, crc32c) of every chunk applied in this stream, in
  index order, fed only once a chunk is applied -- exactly what the secondary
  hashes as it applies, so the trailer proves both sides saw the same chunks
  (a chunk sent and then refused or dropped is never in it);
* progress (``progress_bytes``): the bytes of the chunks applied, resumed
  chunks included; it never goes back.

Invariant (asserted): the chunks in flight are exactly ``[applied, next)``
-- sent in order, none applied, none skipped.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Refusal", "ReplyEvents", "ResyncSendWindow", "ResyncWindowError", "RoundDigest", "SendLimits"]

# One chunk's record in the round digest: index, offset, length (u64 each),
# crc32c (u32), little-endian. 28 bytes per chunk, whatever its size.
_RECORD = struct.Struct("<QQQI")


class RoundDigest:
    """The digest of one resync round's stream, the same code on both sides:
    the primary feeds each chunk once the secondary says it is applied
    (``ResyncSendWindow.on_applied``), the secondary each chunk it applied
    (``secondary/resync.py``), and the trailer carries the primary's.

    What it protects against: a chunk lost, duplicated or reordered within the
    round (a bug in either side's window, resume or refusal handling), so that
    "complete" is never said over a copy that missed a piece. It does not have
    to hash the payload for that, and no longer does (it was SHA-256 over every
    byte, 1.07 ms/MiB on each node, docs/PERF.md finding 6):

    * every chunk's data is checked against its crc32c on the secondary before
      it is applied (``syncrep.core.receiver.check_chunk``: a mismatch is
      refused, never applied), and the primary computed that crc32c over the
      data it read from the snapshot (``RoundSender._read``), so the crc32c in
      an applied chunk's record stands for the bytes applied;
    * the sequence of (index, offset, length, crc32c) records, hashed in stream
      order, differs as soon as one chunk is missing (the indices and offsets
      skip), appears twice, or comes in another order, or when the two sides
      disagree on where a chunk went or how long it was; SHA-256 over the
      records makes such a difference undetectable only by a collision.

    What it gives up against the payload hash: damage in transit that keeps
    the chunk's crc32c (about 2^-32 of random damage; every burst of up to 32
    bits is caught) passed the per-chunk check before too, but the trailer
    then caught it (the primary hashed the bytes it sent); now the crc32c
    alone stands between it and the copy, as it does for every replicated
    write (``ReplicatedWrite.crc32c``), above TCP's and TLS's own integrity
    checks. Deliberate tampering is TLS's job: neither a crc32c nor a hash
    sent over the same channel ever defended against it.

    Wire compatibility: the trailer's ``digest`` field keeps its type and
    place; only what it is computed over changed. A node of the older version
    would refuse every round's trailer (DATA_LOSS, "digest differs"), never
    accept a wrong one; both nodes of a pair run the same version.
    """

    __slots__ = ("_h",)

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def add(self, index: int, offset: int, length: int, crc32c: int) -> None:
        """Chunk ``index`` at ``offset``, ``length`` bytes whose crc32c is
        ``crc32c``, was applied (the next one in stream order)."""
        self._h.update(_RECORD.pack(index, offset, length, crc32c))

    def digest(self) -> bytes:
        return self._h.digest()


class ResyncWindowError(Exception):
    """The round cannot go on: the secondary broke the protocol (claims more
    than was sent, refuses a chunk not in flight) or refuses one chunk too
    often. The executor fails the round with this message."""


@dataclass(frozen=True)
class SendLimits:
    window_chunks: int  # chunks sent but not applied, at most
    window_bytes: int  # a chunk is admitted while fewer bytes are in flight (or none)
    read_batch_chunks: int  # chunks read (and then sent) per batch, at most
    max_refusals_per_chunk: int  # one more refusal of the same chunk aborts the round

    def __post_init__(self) -> None:
        if min(self.window_chunks, self.window_bytes, self.read_batch_chunks) < 1:
            raise ValueError("window_chunks, window_bytes and read_batch_chunks must be >= 1")
        if self.max_refusals_per_chunk < 0:
            raise ValueError("max_refusals_per_chunk must be >= 0")


@dataclass(frozen=True)
class Refusal:
    """The secondary refused chunk ``index`` (the ``count``-th time in this
    round); everything from it on is to be re-sent."""

    index: int
    count: int
    message: str


@dataclass(frozen=True)
class ReplyEvents:
    """What one reply did: the chunks it applied (in order) and its refusal."""

    applied: range
    refusal: Refusal | None = None


class ResyncSendWindow:
    """The send window of one resync round over one stream."""

    def __init__(self, pieces: Sequence[tuple[int, int]], start: int, limits: SendLimits) -> None:
        n = len(pieces)
        if not 0 <= start <= n:
            # The same words as before the window was its own class.
            raise ResyncWindowError(f"secondary claims {start} chunks applied of a {n}-chunk round")
        self.pieces = pieces
        self.limits = limits
        self.start = start
        self._applied = start
        self._next = start
        # (length, crc32c) of the chunks in flight, by index: [applied, next).
        # Not their data: the digest needs only the record, and the window
        # does not keep up to window_bytes of payload alive after the send.
        self._inflight: dict[int, tuple[int, int, int]] = {}  # index -> (length, crc32c, payload bytes)
        self._inflight_bytes = 0
        self._refusals: dict[int, int] = {}
        self._digest = RoundDigest()
        # prefix[i] = bytes in pieces[:i]: progress without rescanning the list
        # (8 bytes per chunk: a round may have millions, see resync_plan.Pieces).
        self._prefix = array("Q", [0])
        self._prefix.extend(itertools.accumulate(length for _, length in pieces))

    # ------------------------------------------------------------ queries
    @property
    def chunk_count(self) -> int:
        return len(self.pieces)

    @property
    def applied(self) -> int:
        """Chunks ``[0, applied)`` are applied on the secondary."""
        return self._applied

    @property
    def next_index(self) -> int:
        """The next chunk to send."""
        return self._next

    @property
    def done(self) -> bool:
        """Every chunk is applied: the trailer may go."""
        return self._applied == len(self.pieces)

    @property
    def inflight_chunks(self) -> int:
        return len(self._inflight)

    @property
    def inflight_bytes(self) -> int:
        return self._inflight_bytes

    @property
    def progress_bytes(self) -> int:
        """Bytes of the chunks applied (those applied before ``start`` too)."""
        return self._prefix[self._applied]

    @property
    def total_bytes(self) -> int:
        return self._prefix[-1]

    def refusals(self, index: int) -> int:
        return self._refusals.get(index, 0)

    def digest(self) -> bytes:
        """The ``RoundDigest`` of the chunks applied in this stream, in index
        order: the trailer's digest once ``done``."""
        return self._digest.digest()

    def next_batch(self) -> range:
        """The chunks that may be read and sent now, in order (empty: wait for
        a reply). Send them all (``sent``) before taking in any reply."""
        n, lim = len(self.pieces), self.limits
        first, applied = self._next, self._applied
        if not (first < n and first - applied < lim.window_chunks
                and (self._inflight_bytes < lim.window_bytes or first == applied)):
            return range(first, first)
        k = first
        room = lim.window_bytes - self._inflight_bytes
        while (k < n and k - first < lim.read_batch_chunks and k - applied < lim.window_chunks
               and (room > 0 or k == first)):
            room -= self.pieces[k][1]
            k += 1
        return range(first, k)

    def _check(self) -> None:
        assert len(self._inflight) == self._next - self._applied, "in flight is not [applied, next)"

    # ------------------------------------------------------------ events
    def sent(self, index: int, length: int, crc32c: int, payload_bytes: int | None = None) -> None:
        """Chunk ``index`` is on its way: ``length`` bytes of data, with the
        ``crc32c`` the chunk carries (computed over the data as read), of
        which ``payload_bytes`` travel (default: all; 0 for zeros sent as a
        length): what counts against ``window_bytes``."""
        if index != self._next or index >= len(self.pieces):
            raise AssertionError(f"chunk {index} sent, but chunk {self._next} is next of {len(self.pieces)}")
        payload = length if payload_bytes is None else payload_bytes
        assert 0 <= payload <= length, (payload, length)
        self._inflight[index] = (length, crc32c, payload)
        self._inflight_bytes += payload
        self._next += 1
        self._check()

    def on_applied(self, applied_below: int) -> range:
        """The secondary has applied chunks ``[0, applied_below)``. Returns the
        chunks this newly applied, in order (they are in the digest now). A
        smaller ``applied_below`` than already known changes nothing."""
        if applied_below > self._next:
            raise ResyncWindowError(
                f"secondary claims {applied_below} chunks applied but only chunks below "
                f"{self._next} were sent (of a {len(self.pieces)}-chunk round)"
            )
        newly = range(self._applied, max(self._applied, applied_below))
        for i in newly:
            length, crc, payload = self._inflight.pop(i)
            self._inflight_bytes -= payload
            self._digest.add(i, self.pieces[i][0], length, crc)
        self._applied = newly.stop
        self._check()
        return newly

    def on_refused(self, index: int, message: str) -> Refusal:
        """The secondary refused chunk ``index`` (and drops what follows it):
        send again from it. Raises ResyncWindowError on the refusal that
        exceeds ``max_refusals_per_chunk``."""
        if not self._applied <= index < self._next:
            raise ResyncWindowError(
                f"secondary refused chunk {index}, which is not in flight "
                f"(chunks {self._applied} to {self._next - 1} are)"
            )
        count = self._refusals.get(index, 0) + 1
        self._refusals[index] = count
        if count > self.limits.max_refusals_per_chunk:
            raise ResyncWindowError(f"chunk {index} refused {count} times: {message}")
        # Go back: everything from the refused chunk on is re-sent.
        for j in range(index, self._next):
            self._inflight_bytes -= self._inflight.pop(j)[2]
        self._next = index
        self._check()
        return Refusal(index, count, message)

    def on_reply(self, applied_below: int, refused: bool = False, refused_index: int = 0,
                 message: str = "") -> ReplyEvents:
        """One reply: its applied part, then its refusal. An executor that must
        act on the applied part even when the refusal aborts (progress) calls
        ``on_applied`` and ``on_refused`` itself, in this order."""
        applied = self.on_applied(applied_below)
        refusal = self.on_refused(refused_index, message) if refused else None
        return ReplyEvents(applied, refusal)
