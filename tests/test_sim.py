"""The deterministic simulator (deploy/sim.py): same seed, same run; its
checkers catch real bugs; its model of concurrent writes is right.

The 10,000-schedule run itself is a step of scripts/test.sh (it has its own
summary line); these tests check the simulator."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy import sim

ROOT = Path(__file__).resolve().parent.parent


def _trace(seed: int) -> bytes:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    p = subprocess.run(
        [sys.executable, "-m", "deploy.sim", "--seed", str(seed), "--trace"],
        cwd=ROOT, env=env, capture_output=True, timeout=300,
    )
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    return p.stdout


@pytest.mark.parametrize("seed", [7, 1029])
def test_the_same_seed_prints_the_same_trace_byte_for_byte(seed: int) -> None:
    """Two processes (each re-executes itself with PYTHONHASHSEED=0), one seed:
    the traces are identical, and they tell a whole run with faults."""
    first, second = _trace(seed), _trace(seed)
    assert first == second
    text = first.decode()
    assert f"seed {seed} schedule:" in text and "fault " in text
    assert "final: in sync, replicas identical" in text
    assert str(ROOT) not in text and "/dev/shm" not in text, "the trace must not name temp paths"


def test_schedules_are_a_pure_function_of_the_seed() -> None:
    assert sim.make_schedule(42, 8.0) == sim.make_schedule(42, 8.0)
    kinds = {f.kind for s in range(1, 300) for f in sim.make_schedule(s, 8.0)}
    assert kinds == set(sim.FAULT_KINDS)
    triggers = {f.trigger for s in range(1, 300) for f in sim.make_schedule(s, 8.0)}
    assert triggers == {"time", "resync", "final_round"}


def test_a_planted_bug_forgetting_failed_extents_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault planted in the product: the primary forgets the failed extents
    when it degrades. Resyncs then skip writes the secondary missed, and the
    simulator must report replicas that differ (seed 2 does, among others)."""
    import primary.volume

    monkeypatch.setattr(primary.volume, "derive_failed_extents", lambda *a, **k: [])
    ok, trace, _ = sim.run_seed(2)
    assert not ok
    assert "replicas differ" in trace[-1], trace[-1]


def test_a_clean_seed_passes_in_process() -> None:
    ok, trace, stats = sim.run_seed(3)
    assert ok, "\n".join(trace[-20:])
    assert stats["acks"] > 0


def _block(v: int, b: int = 0) -> bytes:
    return sim.block_data(1, v, b)


def test_model_accepts_concurrent_writes_in_either_order() -> None:
    m = sim.Model()
    a, b = m.issued(0, 1, now=1.0), m.issued(0, 2, now=1.1)
    a[2], b[2] = 1.3, 1.2  # both in flight together, both acknowledged
    m.check_block(0, _block(1), "t")
    m.check_block(0, _block(2), "t")


def test_model_reports_a_lost_acknowledged_write() -> None:
    m = sim.Model()
    a = m.issued(0, 1, now=1.0)
    a[2] = 1.1
    b = m.issued(0, 2, now=2.0)  # issued after 1 was acknowledged: 2 must win
    b[2] = 2.1
    with pytest.raises(sim.SimFailure, match="LOST"):
        m.check_block(0, _block(1), "t")
    with pytest.raises(sim.SimFailure, match="LOST"):
        m.check_block(0, bytes(sim.BLOCK), "t")  # zeros: both lost


def test_model_allows_an_indeterminate_later_write_either_way() -> None:
    m = sim.Model()
    a = m.issued(0, 1, now=1.0)
    a[2] = 1.1
    m.issued(0, 2, now=2.0)  # the client saw an error: it may or may not have landed
    m.check_block(0, _block(1), "t")
    m.check_block(0, _block(2), "t")


def test_garbage_and_misplaced_blocks_are_reported() -> None:
    m = sim.Model()
    m.issued(0, 1, now=1.0)[2] = 1.1
    with pytest.raises(sim.SimFailure, match="garbage"):
        m.check_block(0, b"\x01" * sim.BLOCK, "t")
    with pytest.raises(sim.SimFailure, match="block 5's data"):
        m.check_block(0, _block(1, b=5), "t")
