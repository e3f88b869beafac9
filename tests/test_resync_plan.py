"""Resync planning as data: scenario tables for ``syncrep.core.resync_plan.next_step``.

Each scenario is a list of (what the executor observes, the step it must be
told to take). The driver below plays the executor: it carries out each step
on the plan exactly as ``PrimaryVolume._resync`` does, with made-up snapshot
ids and byte counts, so the tables read like a trace of a real resync.
"""

from __future__ import annotations

import random
import tracemalloc
from typing import Any

import pytest
from pyroaring import BitMap

from syncrep.blockstore.extents import Extent, blocks_to_extents, iter_block_runs
from syncrep.core.resync_plan import (
    FinalRound,
    MeasurePending,
    Pieces,
    ResyncLimits,
    ResyncPlan,
    RewriteFailed,
    RoundSpec,
    SendRound,
    TakeRoundSnapshot,
    next_step,
    plan_pieces,
    plan_pieces_from_runs,
)
from syncrep.core.vocab import ResyncMode, RoundKind

MIB = 1 << 20
LIMITS = ResyncLimits(final_diff_threshold_bytes=1 * MIB, max_diff_rounds=4, diff_delay_s=0.5)
F = 7  # the fault snapshot id
FAILED = [Extent(0, 8192), Extent(1 * MIB, 4096)]

# Each row: (expected step as (name, details), input for the executor)
#   TakeRoundSnapshot -> input = the new snapshot id
#   SendRound         -> input = bytes the round sent
#   MeasurePending    -> input = bytes written since the measured snapshot
#   RewriteFailed / FinalRound -> input unused
Row = tuple[tuple[Any, ...], int]

SCENARIOS: dict[str, tuple[ResyncMode, list[Extent], list[Row]]] = {
    "variant B: extents, second snapshot after diff_delay_s, diff shrinks below the threshold": (
        ResyncMode.DIRECT, FAILED, [
            (("snapshot", "d0", 0, RoundKind.EXTENTS, 0, 0.0), 10),
            (("send", 0, RoundKind.EXTENTS, 0, 10), 12288),
            (("snapshot", "d2", 1, RoundKind.DIFF, F, 0.5), 11),
            (("send", 1, RoundKind.DIFF, F, 11), 5 * MIB),
            (("measure", 11), 512 * 1024),  # below the threshold: final
            (("final", 2, 11), 0),
        ]),
    "variant A: rewrite, then diff(F, d1), then rounds while the diff shrinks": (
        ResyncMode.REWRITE, FAILED, [
            (("rewrite",), 0),
            (("snapshot", "d1", 1, RoundKind.DIFF, F, 0.0), 20),
            (("send", 1, RoundKind.DIFF, F, 20), 8 * MIB),
            (("measure", 20), 4 * MIB),
            (("snapshot", "r2", 2, RoundKind.DIFF, 20, 0.0), 21),
            (("send", 2, RoundKind.DIFF, 20, 21), 4 * MIB),
            (("measure", 21), 2 * MIB),
            (("snapshot", "r3", 3, RoundKind.DIFF, 21, 0.0), 22),
            (("send", 3, RoundKind.DIFF, 21, 22), 2 * MIB),
            (("measure", 22), 1 * MIB),  # not above the threshold: final
            (("final", 4, 22), 0),
        ]),
    "variant A with no failed extents skips the rewrite": (
        ResyncMode.REWRITE, [], [
            (("snapshot", "d1", 1, RoundKind.DIFF, F, 0.0), 20),
            (("send", 1, RoundKind.DIFF, F, 20), 0),
            (("measure", 20), 0),
            (("final", 2, 20), 0),
        ]),
    "a diff that stops shrinking goes to the final round": (
        ResyncMode.REWRITE, [], [
            (("snapshot", "d1", 1, RoundKind.DIFF, F, 0.0), 20),
            (("send", 1, RoundKind.DIFF, F, 20), 3 * MIB),
            (("measure", 20), 3 * MIB),  # as much as last round: not shrinking
            (("final", 2, 20), 0),
        ]),
    "max_diff_rounds bounds the rounds however much is pending": (
        ResyncMode.DIRECT, FAILED, [
            (("snapshot", "d0", 0, RoundKind.EXTENTS, 0, 0.0), 10),
            (("send", 0, RoundKind.EXTENTS, 0, 10), 12288),
            (("snapshot", "d2", 1, RoundKind.DIFF, F, 0.5), 11),
            (("send", 1, RoundKind.DIFF, F, 11), 64 * MIB),
            (("measure", 11), 32 * MIB),
            (("snapshot", "r2", 2, RoundKind.DIFF, 11, 0.0), 12),
            (("send", 2, RoundKind.DIFF, 11, 12), 32 * MIB),
            (("measure", 12), 16 * MIB),
            (("snapshot", "r3", 3, RoundKind.DIFF, 12, 0.0), 13),
            (("send", 3, RoundKind.DIFF, 12, 13), 16 * MIB),
            (("measure", 13), 8 * MIB),  # 4 rounds done = max_diff_rounds
            (("final", 4, 13), 0),
        ]),
}


def _describe(step: Any) -> tuple[Any, ...]:
    match step:
        case RewriteFailed():
            return ("rewrite",)
        case TakeRoundSnapshot():
            return ("snapshot", step.tag, step.round, step.kind, step.base, step.delay_s)
        case SendRound(spec=s):
            return ("send", s.round, s.kind, s.base, s.target)
        case MeasurePending(since=since):
            return ("measure", since)
        case FinalRound():
            return ("final", step.round, step.base)
    raise AssertionError(f"unknown step {step!r}")


def _play(plan: ResyncPlan, failed: list[Extent], rows: list[Row], *, reload_each_step: bool) -> None:
    pending: int | None = None
    for i, (want, value) in enumerate(rows):
        if reload_each_step:
            # A restart between any two steps: the persisted plan is all there is.
            loaded = ResyncPlan.load(plan.dump())
            assert loaded is not None
            plan = loaded
        step = next_step(plan, failed, LIMITS, pending)
        pending = None
        assert _describe(step) == want, f"row {i}: got {_describe(step)}, want {want}"
        match step:
            case RewriteFailed():
                plan.rewritten = True
            case TakeRoundSnapshot():
                plan.round_planned(step.spec(value))
            case SendRound(spec=spec):
                plan.round_sent(spec, value)
            case MeasurePending():
                pending = value
            case FinalRound():
                return
    raise AssertionError("scenario ended before the final round")


@pytest.mark.parametrize("reload_each_step", [False, True], ids=["in-memory", "restart-between-steps"])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_resync_scenario(name: str, reload_each_step: bool) -> None:
    mode, failed, rows = SCENARIOS[name]
    _play(ResyncPlan.new(mode, F), failed, rows, reload_each_step=reload_each_step)


def test_crash_after_rewrite_before_d1_redoes_the_rewrite() -> None:
    """Variant A, killed after rewriting but before the d1 round was persisted:
    the persisted plan has no round, so the rewrite runs again (idempotent:
    it rewrites the same bytes), then d1."""
    plan = ResyncPlan.new(ResyncMode.REWRITE, F)
    persisted = plan.dump()
    assert isinstance(next_step(plan, FAILED, LIMITS), RewriteFailed)
    plan.rewritten = True  # in memory only: the crash loses it
    restarted = ResyncPlan.load(persisted)
    assert restarted is not None
    assert isinstance(next_step(restarted, FAILED, LIMITS), RewriteFailed)


def test_interrupted_final_round_resumes_as_an_ordinary_round_then_final_again() -> None:
    """A final round killed mid-way stays in the plan as ``current``: after a
    restart it is sent as an ordinary round, and a new final round follows
    (with a snapshot of its own, round number one higher)."""
    plan = ResyncPlan.new(ResyncMode.DIRECT, F)
    plan.round_planned(RoundSpec(0, RoundKind.EXTENTS, 0, 10, [[0, 4096]]))
    plan.round_sent(RoundSpec(0, RoundKind.EXTENTS, 0, 10, [[0, 4096]]), 4096)
    plan.round_planned(RoundSpec(1, RoundKind.DIFF, F, 11))
    plan.round_sent(RoundSpec(1, RoundKind.DIFF, F, 11), 2 * MIB)
    step = next_step(plan, FAILED, LIMITS, pending_bytes=100)
    assert step == FinalRound(2, 11)
    final_spec = RoundSpec(2, RoundKind.DIFF, 11, 30)
    plan.round_planned(final_spec)  # persisted before the final round is sent ... then a crash
    restarted = ResyncPlan.load(plan.dump())
    assert restarted is not None
    step = next_step(restarted, FAILED, LIMITS)
    assert step == SendRound(final_spec)
    restarted.round_sent(final_spec, 100)
    assert next_step(restarted, FAILED, LIMITS) == MeasurePending(30)
    assert next_step(restarted, FAILED, LIMITS, pending_bytes=0) == FinalRound(3, 30)
    assert restarted.snapshots == [10, 11, 30]


def test_round_sent_for_another_round_is_refused() -> None:
    plan = ResyncPlan.new(ResyncMode.DIRECT, F)
    plan.round_planned(RoundSpec(0, RoundKind.EXTENTS, 0, 10))
    with pytest.raises(AssertionError):
        plan.round_sent(RoundSpec(5, RoundKind.DIFF, 1, 2), 0)


def test_plan_round_trips_through_json() -> None:
    plan = ResyncPlan.new(ResyncMode.REWRITE, F, rollback_to="common-1")
    plan.round_planned(RoundSpec(1, RoundKind.DIFF, F, 20))
    assert ResyncPlan.load(plan.dump()) == plan
    assert ResyncPlan.load(None) is None and ResyncPlan.load("") is None


@pytest.mark.parametrize(
    ("extents", "block", "chunk", "want"),
    [
        ([Extent(0, 8192)], 4096, 4096, [(0, 4096), (4096, 4096)]),
        ([Extent(100, 10)], 4096, 1 << 20, [(0, 4096)]),  # aligned outward
        ([Extent(0, 3 * 4096)], 4096, 8192, [(0, 8192), (8192, 4096)]),
        ([Extent(0, 4096)], 4096, 5000, [(0, 4096)]),  # chunk rounded down to blocks
        ([], 4096, 4096, []),
    ],
)
def test_plan_pieces(extents: list[Extent], block: int, chunk: int, want: list[tuple[int, int]]) -> None:
    assert plan_pieces(extents, block, chunk) == want


def _reference_pieces(extents: list[Extent], block: int, chunk: int) -> list[tuple[int, int]]:
    """plan_pieces as it was (a list of tuples), the oracle for the compact one."""
    out: list[tuple[int, int]] = []
    step = max(block, chunk - chunk % block)
    for e in extents:
        off, end = e.offset - e.offset % block, -(-(e.offset + e.length) // block) * block
        while off < end:
            n = min(step, end - off)
            out.append((off, n))
            off += n
    return out


@pytest.mark.parametrize("trial", range(40))
def test_pieces_from_diff_bitmap_runs_are_the_same_chunks_as_from_extents(trial: int, seed: int) -> None:
    """A diff round's chunks come from the bitmap's runs straight into Pieces
    (primary/resync.round_pieces): the same chunks, in the same order, as the
    extent path and the list it replaced. Seed: ``seed`` + trial."""
    rng = random.Random(seed + trial)
    block = rng.choice([512, 4096, 65536])
    chunk = rng.choice([block, 3 * block + 1, 1 << 20, 4 << 20])
    bm = BitMap()
    for _ in range(rng.randrange(0, 30)):
        first = rng.randrange(0, 1 << 16)
        bm.add_range(first, first + rng.randrange(1, 600))
    want = _reference_pieces(blocks_to_extents(bm, block), block, chunk)
    got = plan_pieces_from_runs(iter_block_runs(bm), block, chunk)
    assert got == want and plan_pieces(blocks_to_extents(bm, block), block, chunk) == want, f"seed {seed + trial}"
    assert len(got) == len(want) and got.total_bytes == sum(n for _, n in want) == len(bm) * block
    assert all(got[i] == want[i] for i in range(len(want))) and got[1:4] == want[1:4]


def test_a_round_of_many_chunks_is_held_in_about_16_bytes_per_chunk() -> None:
    """Issue 14 (1 TiB volumes, a large dirty set: the plan in bounded memory):
    a diff round of 2^18 one-block runs (every other 4 KiB block of 2 GiB, the
    worst case: one chunk per run) is held in at most 24 bytes per chunk (two
    array('Q'), with their growth slack); the list of tuples it replaced
    took about 5x that, measured here in the same way."""
    n = 1 << 18
    bm = BitMap(range(0, 2 * n, 2))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        pieces = plan_pieces_from_runs(iter_block_runs(bm), 4096, 1 << 20)
        compact = tracemalloc.get_traced_memory()[0] - before
        before = tracemalloc.get_traced_memory()[0]
        old = _reference_pieces([Extent(2 * i * 4096, 4096) for i in range(n)], 4096, 1 << 20)
        listed = tracemalloc.get_traced_memory()[0] - before  # includes the Extents it needed
    finally:
        tracemalloc.stop()
    assert isinstance(pieces, Pieces) and len(pieces) == n == len(old)
    assert pieces[n - 1] == old[n - 1] == ((2 * n - 2) * 4096, 4096)
    per_chunk = compact / n
    print(f"\nresync plan memory per chunk: Pieces {per_chunk:.1f} B, list of tuples + Extents {listed / n:.1f} B")
    assert per_chunk <= 24, per_chunk
    assert listed / n >= 4 * per_chunk, (listed / n, per_chunk)
