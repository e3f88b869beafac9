"""The deterministic simulator (deploy/sim.py): same seed, same run; its
checkers catch real bugs. (Its workload, model and checks are the shared
ones of deploy/workload.py and deploy/checker.py, tested in test_workload.py.)

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
    simulator must report replicas that differ, within a few seeds (about a
    third of the schedules hit it)."""
    import primary.volume
    import syncrep.core.pair

    monkeypatch.setattr(syncrep.core.pair, "derive_failed_extents", lambda *a, **k: [])
    assert primary.volume.decide_degrade is syncrep.core.pair.decide_degrade
    failures = []
    for seed in range(1, 16):
        ok, trace, _ = sim.run_seed(seed)
        if not ok:
            failures.append(trace[-1])
    assert failures, "15 schedules and the simulator never noticed the lost failed extents"
    assert any("replicas differ" in f or "lost" in f.lower() for f in failures), failures


def test_a_clean_seed_passes_in_process() -> None:
    ok, trace, stats = sim.run_seed(3)
    assert ok, "\n".join(trace[-20:])
    assert stats["acks"] > 0
