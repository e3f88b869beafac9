"""Resync sends zeros as a length, not as bytes (issue 14), in process over real gRPC.

A resync chunk that reads as all zeros on the primary (a hole, a TRIM, a
range zeroed) travels as ``ResyncChunk.zero_length`` with the crc32c of those
zeros and no payload; the secondary checks it and punches the range, so a
full copy of a mostly empty volume ships metadata, and a copy stays as thin
as its source. A malformed zero chunk (a payload as well) is refused and
asked for again, never applied. The primary's real ``RoundSender`` and the
secondary's real receiver (tests/test_rollback_release.py's harness); every
test ends with the replicas compared block for block.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_rollback_release import BLOCK, CHUNK, IDENTITY, SIZE, Primary, Secondary, assert_identical

import primary.resync as presync
from primary.resync import Counters, RateLimiter, RoundSender, round_pieces
from syncrep.core.resync_plan import ResyncPlan, RoundSpec
from syncrep.core.vocab import ResyncMode, RoundKind
from syncrep.pb import syncrep_pb2 as pb


def _allocated(sec: Secondary) -> int:
    return int((sec.lv.store.path / "data").stat().st_blocks * 512)


async def _resync(p: Primary, address: str, counters: Counters) -> None:
    """One final round from ``p.base`` to a new snapshot, at a new epoch, counted in ``counters``."""
    p.epoch += 1
    plan = ResyncPlan.new(ResyncMode.DIRECT, p.base)
    spec = p.next_round()
    pieces = round_pieces(p.store, spec, CHUNK)
    sender = RoundSender(p.store, address, p.spec_pb, p.epoch, plan, spec, pieces, True, RateLimiter(0),
                         counters, lambda _done: None, identity=IDENTITY)
    await sender.run()
    p.base = spec.target


async def test_a_zeroed_range_travels_as_zero_chunks_and_is_punched_on_the_secondary(tmp_path: Path) -> None:
    """No fault: data written and resynced, then 1 MiB of it zeroed on the
    primary (zero_range, as a TRIM does) and one 64 KiB chunk rewritten with
    zero bytes (a write of zeros). The next round sends both as zero chunks
    (counted), the secondary punches them (its data file shrinks), and the
    replicas are identical."""
    p, sec = Primary(tmp_path, seed=7), Secondary(tmp_path / "secondary")
    try:
        addr = await sec.serve()
        for off in range(0, 2 << 20, BLOCK):  # 2 MiB of data at the start
            p.store.write(off, p.rng.randbytes(BLOCK))
        first = Counters()
        await _resync(p, addr, first)
        assert first.zero_bytes_sent == 0 and first.bytes_sent == 2 << 20
        before = _allocated(sec)
        assert before >= 2 << 20
        p.store.zero_range(0, 1 << 20)
        p.store.write(1 << 20, bytes(CHUNK))
        second = Counters()
        await _resync(p, addr, second)
        assert second.zero_bytes_sent == (1 << 20) + CHUNK, second
        assert second.bytes_sent >= second.zero_bytes_sent
        assert _allocated(sec) <= before - (1 << 20), (before, _allocated(sec))
        await assert_identical(p, sec)
    finally:
        await sec.close()
        p.close()


async def test_a_full_copy_of_a_mostly_empty_volume_ships_no_zeros(tmp_path: Path) -> None:
    """No fault: the whole volume sent as one failed-extent round (what a full
    copy is) while only 3 chunks hold data: every other chunk is a zero chunk,
    and the copy allocates no more than the data."""
    p, sec = Primary(tmp_path, seed=8), Secondary(tmp_path / "secondary")
    try:
        addr = await sec.serve()
        spots = (0, SIZE // 2, SIZE - CHUNK)
        for off in spots:
            p.store.write(off, p.rng.randbytes(CHUNK))
        counters = Counters()
        await _resync(p, addr, counters)
        assert counters.zero_bytes_sent == 0  # a diff round covers only the written chunks
        # Now the whole volume as failed extents, over the secondary's copy.
        p.epoch += 1
        plan = ResyncPlan.new(ResyncMode.DIRECT, p.base)
        target = p.store.create_snapshot("full").id
        spec = RoundSpec(p.n + 1, RoundKind.EXTENTS, 0, target, [[0, SIZE]])
        pieces = round_pieces(p.store, spec, CHUNK)
        full = Counters()
        sender = RoundSender(p.store, addr, p.spec_pb, p.epoch, plan, spec, pieces, True, RateLimiter(0), full,
                             lambda _done: None, identity=IDENTITY)
        await sender.run()
        assert full.bytes_sent == SIZE and full.zero_bytes_sent == SIZE - len(spots) * CHUNK, full
        assert _allocated(sec) <= len(spots) * CHUNK + (1 << 20)
        await assert_identical(p, sec)
    finally:
        await sec.close()
        p.close()


async def test_a_malformed_zero_chunk_is_refused_and_sent_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bad input: one zero chunk that also carries a payload (the primary
    faulted by a test hook). The secondary refuses it (nothing applied from
    it) and asks for it again; the well-formed one that follows is applied;
    the replicas end identical."""
    p, sec = Primary(tmp_path, seed=9), Secondary(tmp_path / "secondary")
    real_read = RoundSender._read
    spoiled: list[int] = []

    def read(self: RoundSender, i: int) -> pb.ResyncChunk:
        c = real_read(self, i)
        if c.zero_length and not spoiled:
            spoiled.append(i)
            return pb.ResyncChunk(index=c.index, offset=c.offset, zero_length=c.zero_length, crc32c=c.crc32c,
                                  data=b"\x01" * BLOCK)
        return c

    monkeypatch.setattr(presync.RoundSender, "_read", read)
    try:
        addr = await sec.serve()
        for off in range(0, 1 << 20, BLOCK):
            p.store.write(off, p.rng.randbytes(BLOCK))
        await _resync(p, addr, Counters())
        p.store.zero_range(0, 1 << 20)
        counters = Counters()
        await _resync(p, addr, counters)
        assert spoiled and counters.chunks_refused == 1, (spoiled, counters)
        await assert_identical(p, sec)
    finally:
        await sec.close()
        p.close()
