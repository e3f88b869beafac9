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


# 62: a switchover, then a replaced disk on the primary (promotion); 5: an isolated
# primary (auto-failover); 1029: a forced promote mid-resync, then resolved.
@pytest.mark.parametrize("seed", [7, 62, 1029, 5])
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
    assert kinds == set(sim.ALL_KINDS)
    triggers = {f.trigger for s in range(1, 300) for f in sim.make_schedule(s, 8.0)}
    assert triggers == {"time", "resync", "final_round"}
    targets = {(f.kind, f.target) for s in range(1, 300) for f in sim.make_schedule(s, 8.0)}
    assert {("lose_primary", "auto"), ("lose_primary", "promote"), ("isolate_primary", "primary"),
            ("replace_disk", "primary"), ("replace_disk", "secondary"),
            ("switchover", "in_sync"), ("switchover", "any"),
            ("forced_promote", "degraded"), ("forced_promote", "partition"), ("forced_promote", "resync"),
            ("forced_promote", "isolated")} <= targets
    # The operator's actions are drawn after the faults: at most one per schedule.
    assert all(sum(f.kind in sim.EXTRA_KINDS for f in sim.make_schedule(s, 8.0)) <= 1 for s in range(1, 300))


# Seeds of the failover faults (schedules of make_schedule(seed, 8.0)), each
# passing with the promotion / replaced disk it is about.
FAILOVER_SEEDS = {
    81: "lose_primary(auto): auto-failover; the old primary returns with an empty data dir",
    94: "lose_primary(promote): Promote RPC retried until the lease expired; returns with an empty data dir",
    82: "lose_primary(auto): the old primary returns with its data (fail-back, changes only)",
    69: "isolate_primary: cut from coordinator and secondary, the client still reaches it",
    62: "replace_disk(primary): the primary restarts empty and the secondary is promoted",
    58: "replace_disk(secondary): the secondary restarts empty and gets a full copy",
}


@pytest.mark.parametrize("seed", sorted(FAILOVER_SEEDS))
def test_failover_fault_schedules_pass(seed: int) -> None:
    kinds = {f.kind for f in sim.make_schedule(seed, 8.0)}
    assert FAILOVER_SEEDS[seed].split("(")[0].split(":")[0] in kinds, (seed, kinds)
    ok, trace, stats = sim.run_seed(seed)
    assert ok, "\n".join(trace[-30:])
    assert stats["acks"] > 0
    if "replace_disk(secondary)" in FAILOVER_SEEDS[seed]:
        assert stats["disks_replaced"] == 1, stats
    else:
        assert stats["promotions"] >= 1, stats
    if "empty data dir" in FAILOVER_SEEDS[seed]:
        assert stats["disks_replaced"] >= 1, stats
    assert any("final: in sync, replicas identical" in line for line in trace), trace[-5:]


def test_a_planted_bug_forgetting_failed_extents_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault planted in the product: the failed extents are forgotten when the
    primary degrades, by the primary and by the coordinator (which merges the
    primary's reported NACKs and unacked writes itself; forgetting them on one
    side only is compensated by the other). Resyncs then skip writes the
    secondary missed, and the simulator must report replicas that differ,
    within a few seeds (about a quarter of the schedules hit it)."""
    import primary.volume
    import syncrep.core.driver
    import syncrep.core.pair

    monkeypatch.setattr(syncrep.core.pair, "derive_failed_extents", lambda *a, **k: [])
    monkeypatch.setattr(syncrep.core.driver, "derive_failed_extents", lambda *a, **k: [])
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


def test_a_planted_bug_acking_without_a_lease_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault planted in the product: a primary believes any lease lets it write
    alone. An isolated primary (cut from coordinator and secondary, still
    reached by the client) then acknowledges writes while the coordinator
    promotes the secondary: two nodes acknowledge writes for the volume, and
    the simulator must say so (the end check alone may miss it: a later write
    by the same writer overwrites the lost one)."""
    import syncrep.core.lease

    monkeypatch.setattr(syncrep.core.lease.LeaseState, "may_write_alone", lambda self, now, generation: True)
    failures = []
    for seed in (5, 69, 78):  # isolate_primary schedules
        assert "isolate_primary" in {f.kind for f in sim.make_schedule(seed, 8.0)}
        ok, trace, _ = sim.run_seed(seed)
        if not ok:
            failures.append(trace[-1])
    assert failures, "an isolated primary acknowledged writes alone and the simulator never noticed"
    assert all("acknowledged a write" in f and "after the coordinator had named" in f for f in failures), failures


def test_a_promotion_failed_on_a_full_disk_is_retried_once_the_disk_is_freed() -> None:
    """Faults: the primary lost (Promote RPC retried through the lease) while
    the secondary's disk is full; the promotion's fault-recovery snapshot
    fails with ENOSPC; the disk is freed 2.4 s later. The promoted node must
    then serve and resync the returning old primary (syncrep/node.py
    Node._become_primary drops a write path whose start failed, so the next
    assignment retries the promotion)."""
    assert [f.kind for f in sim.make_schedule(301, 8.0)] == ["lose_primary", "disk_full"]
    ok, trace, _ = sim.run_seed(301)
    assert ok, trace[-1]


def test_switchover_under_load_swaps_the_roles_and_loses_no_write() -> None:
    """Seed 70. Fault: switchover(in_sync) at 0.76 s, the workload running
    (then the coordinator crashes for 0.48 s). The primary drains and hands
    over, the coordinator swaps the roles at a new epoch, in sync; the writes
    that waited at the old primary's gate go to the new one. Checked all
    along: never two nodes acknowledging; at the end: every acknowledged
    write is in the volume, replicas equal."""
    assert [f.kind for f in sim.make_schedule(70, 8.0)] == ["crash", "switchover"]
    ok, trace, stats = sim.run_seed(70)
    assert ok, "\n".join(trace[-30:])
    assert stats["switchovers"] == 1 and stats["role_swaps"] == 1 and stats["promotions"] == 0, stats
    assert any("switched over, write stall" in line for line in trace)
    assert any("final: in sync, replicas identical" in line and "primary node-b" in line for line in trace)


def test_a_switchover_refused_by_a_degraded_primary_is_harmless() -> None:
    """Seed 188. Faults: a one-way partition node-b>node-a (the primary goes
    degraded), switchover(any) at 2.42 s: the coordinator still records the
    pair in sync, asks the primary to hand over, and the primary refuses
    (degraded: the secondary may lack writes); the coordinator reopens the
    gate and swaps nothing. Then the primary is isolated (auto-failover). The
    refused switchover must lose no write and leave the pair to heal."""
    kinds = [f.kind for f in sim.make_schedule(188, 8.0)]
    assert "switchover" in kinds and "isolate_primary" in kinds, kinds
    ok, trace, stats = sim.run_seed(188)
    assert ok, "\n".join(trace[-30:])
    assert stats["switchovers_refused"] == 1 and stats["switchovers"] == 0, stats
    assert any("switchover: refused: FAILED_PRECONDITION" in line and "did not hand over" in line for line in trace)
    assert any("final: in sync, replicas identical" in line for line in trace)


def test_a_forced_promote_mid_resync_resolved_keeping_the_promoted_side_loses_only_what_it_discarded() -> None:
    """Seed 239. Faults: the secondary's disk full (3.1 s for 3.7 s), then
    forced_promote(resync): node-b crashes, node-a writes alone 1.6 s, node-b
    returns and node-a is lost while the resync runs; Promote(force=True)
    promotes node-b's pre-resync rollback point (retried through node-a's
    lease); node-b writes; node-a returns: split brain; Resolve keeps node-b.
    node-a's writes since the divergence (the ones node-b lacked) are the
    only ones allowed to be missing, each inside the reported extents and in
    the resolve's snapshot of node-a; everything else acknowledged is there."""
    assert [f.kind for f in sim.make_schedule(239, 8.0)] == ["disk_full", "forced_promote"]
    ok, trace, stats = sim.run_seed(239)
    assert ok, "\n".join(trace[-30:])
    assert stats["forced_promotions"] == 1, stats
    assert any("promoted to primary" in line and "during resync" in line for line in trace)
    assert [(k, d) for k, d, _ in stats["resolves"]] == [("node-b", "node-a")], stats
    assert stats["resolves"][0][2] > 0, "node-a acknowledged nothing alone after the divergence"
    assert any("final:" in line and "discarded writes missing (in the resolve's snapshot)" in line for line in trace)
    assert any("final: in sync, replicas identical" in line for line in trace)


def test_a_forced_promote_resolved_keeping_the_old_primary_discards_the_promoted_sides_writes() -> None:
    """Seed 9. Faults: a partition node-a|node-b (3.5 s for 3.8 s), then
    forced_promote(degraded): node-b crashes, node-a writes alone 2.2 s and
    crashes, node-b returns and is force-promoted, writes alone, node-a
    returns: split brain; Resolve keeps node-a (the roles swap back at a new
    epoch, node-b is fenced). node-b's writes since the promotion may be
    missing, no other; the two-primaries check runs through both role changes."""
    assert [f.kind for f in sim.make_schedule(9, 8.0)] == ["partition", "forced_promote"]
    ok, trace, stats = sim.run_seed(9)
    assert ok, "\n".join(trace[-30:])
    assert stats["forced_promotions"] == 1 and stats["promotions"] == 2, stats
    assert [(k, d) for k, d, _ in stats["resolves"]] == [("node-a", "node-b")], stats
    assert any("final: in sync, replicas identical" in line and "primary node-a" in line for line in trace)



def test_tls_identities_run_the_authorization_on_every_call() -> None:
    """--tls: every call carries its host's certificate identity (real
    certificates) and every server runs syncrep.authz; a schedule with faults
    still passes (seed 1: its faults and recovery, all authorized)."""
    ok, trace, _ = sim.run_seed(1, 8.0, tls=True)
    assert ok, "\n".join(trace[-30:])
    assert any("mutual TLS identities on every call" in line for line in trace)
    assert not any("syncrep.authz: refused" in line for line in trace), [
        line for line in trace if "refused" in line][:3]


def test_a_planted_bug_a_node_presenting_another_nodes_certificate_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault planted in the harness: node-a presents node-b's certificate.
    The coordinator refuses its registration (its address is not among the
    certificate's SANs), so the schedule cannot even create its volume: the
    authorization really runs in the simulator."""
    real = sim._sim_identity
    for who in (*sim.HOSTS, *sim.COORD_HOSTS_HA, "admin"):
        real(who)  # made outside the schedule, as run_seed does
    monkeypatch.setattr(sim, "_sim_identity", lambda host: real("node-b" if host == "node-a" else host))
    ok, trace, _ = sim.run_seed(1, 8.0, tls=True)
    assert not ok
    assert any("may not register as node node-a:7001" in line for line in trace), trace[-5:]
