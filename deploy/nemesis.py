"""The nemesis: seeded fault schedules against a real cluster on separate test hosts.

    python -m deploy.nemesis --seed 1234             # replay one schedule
    python -m deploy.nemesis --seeds 200             # 200 random schedules, then a summary table
    python -m deploy.nemesis --duration 10m          # random schedules until 10 minutes are up
    python -m deploy.nemesis --store etcd --seeds 10 # 3 coordinators on etcd, control-plane faults too

One run of a seed:

1. :func:`generate_schedule` (pure: the seed and the schedule length decide
   everything) picks the cluster options (resync variant, periodic snapshot
   period, resync rate cap, writers) and a list of :class:`Step` s: process
   crash (SIGKILL + restart) and hang (SIGSTOP ... SIGCONT) of the secondary,
   the primary or the coordinator; network partitions between any two test
   hosts, symmetric or one-directional (iptables DROP in a namespace); link
   down/up; the secondary's disk full (its data directory is a size-limited
   tmpfs; a filler file fills it, deleting the file frees it). A step fires
   at a time, or when a condition is seen after that time: the pair is
   ``resyncing`` (a second fault while the first is being recovered from),
   the primary starts the ``final`` resync round (the switch-back), or a
   periodic common ``snapshot`` was just cut.

   Failover faults (docs/FAILOVER.md; on by default, ``--no-failover`` for
   the plain schedules): often one episode per schedule, started once the
   pair is ``in_sync``: the primary lost for good (then auto-failover or
   Promote, retried while refused for the lease; the old primary returns with
   its old command line), the primary isolated from coordinator and
   secondary while the client still reaches it, the primary killed while the
   pair resyncs (Promote refused without force; or forced, then as a forced
   promote), a replaced disk on either side (an empty data dir; only when the
   other replica holds every acknowledged write), and a forced promote of a
   stale secondary, whose split brain is ended by ``Resolve(keep=...)`` of a
   random side. Such schedules run the coordinator with a short lease.
   "primary" and "secondary" in a step are roles, looked up when it starts.
2. The outer process (root) creates the test hosts (:mod:`deploy.netns`) and
   starts the *runner* on the client host (``ip netns exec``); without
   namespaces everything runs on loopback and link faults are skipped, with
   the reason in the report.
3. The runner starts the cluster (each process on its own host), creates the
   volume, runs the workload (several sequential writers through the
   primary, each write self-describing: see :mod:`deploy.workload`), executes
   the steps, heals everything, waits (bounded) for in_sync -- the
   coordinator and the primary itself agree, without interruption for
   longer than the ack timeout, so a stale view (a primary just resumed from
   SIGSTOP) is not taken for the real thing -- then checks: no lost writes
   on the final primary (whichever node it is; what a resolve discarded is
   accepted exactly: an acknowledged write inside the reported discarded
   extents, acknowledged by the discarded node after the split, see
   :class:`Discard`), ``syncrep verify`` (primary == secondary; repeated if the
   pair left in_sync during the verify), the periodic common snapshots
   identical on both nodes, and the crash consistency of every
   ``pre-resync-*`` rollback point it managed to read from the secondary
   during the run.

A failure prints the seed, the schedule, what happened when, and the path of
every node's log; ``--seed S`` (with the same ``--schedule-s``, and
``--no-failover`` if it was a plain run) replays it.

The etcd mode (issue 12, opt-in: ``--store etcd``) runs the control plane as
docs/HA.md does in production: 3 coordinators (hosts ``coordinator``,
``coordinator2``, ``coordinator3``) on a 3-member etcd on a host of its own
(``etcd``, deploy/netns_etcd.py, so that cutting a host from it cuts it from
every member and from nothing else); the nodes and the client are given all
three coordinators. Its schedules are the default ones plus 1-3 faults of the
control plane (:data:`ETCD_KINDS`), drawn from a random stream of their own so
that a seed's default schedule is unchanged: SIGKILL + restart of the leading
coordinator or of a follower, SIGSTOP/SIGCONT of the leader, the leader's
host cut from the etcd host, an etcd member SIGKILLed and restarted. Every
"coordinator" of a default fault means the coordinator leading when it starts.
After the heal it also checks that exactly one coordinator leads and that every
coordinator answers CoordinatorInfo.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc

from deploy import netns
from deploy.checker import check_rollback_point
from deploy.cluster import ClusterError, LocalCluster
from deploy.etcd import EtcdCluster
from deploy.netns_etcd import etcd_on_host
from deploy.workload import (
    OK,
    History,
    Op,
    Workload,
    blocks_from_bytes,
    check_blocks,
    decode_block,
    split_regions,
)
from syncrep import client as sc
from syncrep import rpc
from syncrep.pb import syncrep_pb2 as pb
from syncrep.pb import syncrep_pb2_grpc as pbg

log = logging.getLogger("deploy.nemesis")

VOLUME = "vol0"
VOLUME_SIZE = 16 << 20
BLOCK = 4096
NODES = ("coordinator", "primary", "secondary")
HOSTS = (*NODES, "client")
#: The plain fault kinds and triggers (schedules without failover faults).
KINDS = ("crash", "hang", "partition", "partition_oneway", "link_down", "disk_full")
TRIGGERS = ("time", "resyncing", "final", "snapshot")
#: The failover faults (docs/FAILOVER.md): at most one episode per schedule,
#: which starts when the pair is in sync (trigger "in_sync").
FAILOVER_KINDS = ("lose_primary", "isolate_primary", "promote_during_resync", "replace_disk", "forced_promote")
#: The etcd mode's faults of the control plane (``--store etcd``), drawn by :func:`_with_etcd`.
ETCD_KINDS = ("coordinator_crash", "coordinator_hang", "leader_etcd_partition", "etcd_member_crash")
ALL_KINDS = (*KINDS, *FAILOVER_KINDS, *ETCD_KINDS)
ALL_TRIGGERS = (*TRIGGERS, "in_sync")
#: The secondary's data directory: a tmpfs this large (the volume is 16 MiB).
DISK_BYTES = 96 << 20
DEFAULT_SCHEDULE_S = 15.0
IN_SYNC_TIMEOUT_S = 120.0
TRIGGER_TIMEOUT_S = 12.0
WRITE_TIMEOUT_S = 10.0
#: Writes continue this long after the heal (the switch-back happens under load).
TAIL_WRITES_S = 3.0
#: "In sync" must hold this long (> the nodes' 1 s ack timeout) before the checks.
STABLE_IN_SYNC_S = 2.0
VERIFY_ATTEMPTS = 3
#: A schedule with a failover episode runs its coordinator with a short lease
#: (a promotion waits lease + drift after the old primary's last grant, and
#: auto-failover also node_timeout), as tests/test_failover_e2e.py does, so
#: that an episode fits in a schedule. Schedules without one keep the defaults.
FAILOVER_LEASE_S = 2.0
FAILOVER_LEASE_DRIFT_S = 0.2
FAILOVER_NODE_TIMEOUT_S = 1.5
#: A write the isolated primary cannot replicate waits this long for a lease,
#: then fails UNAVAILABLE (the client then asks the coordinator where the
#: primary is now); the default (30 s) would outlast the client's write timeout.
FAILOVER_QUORUM_LOSS_TIMEOUT_S = 3.0
#: Bounded waits of a failover episode: a promotion (lease + drift + the
#: coordinator's tick on a loaded box), a pair state, the trigger "in_sync".
ROLE_WAIT_S = 30.0
STATE_WAIT_S = 40.0
IN_SYNC_TRIGGER_TIMEOUT_S = 40.0
#: A failover episode's waits added to the runner's time limit.
FAILOVER_EXTRA_S = 3 * ROLE_WAIT_S + 2 * STATE_WAIT_S
#: The etcd mode: coordinators and etcd members, on hosts of their own.
COORDINATORS = ("coordinator", "coordinator2", "coordinator3")
ETCD_NODES = (*COORDINATORS, "primary", "secondary")
ETCD_HOSTS = (*ETCD_NODES, "etcd", "client")
ETCD_MEMBERS = 3
#: The coordinators' election lease in the etcd mode (the default 5 s would
#: make every leader fault last a schedule): a leader killed, stopped or cut
#: is replaced within about 2 TTLs (tests/test_etcd_partition.py's value).
ETCD_ELECTION_TTL_S = 2
#: A fault of "the leader" waits this long for one that runs (about 2 TTLs for an election, a loaded box).
LEADER_WAIT_S = 2 * ETCD_ELECTION_TTL_S + 4.0
#: After the heal: exactly one leader, every coordinator answering, within this.
LEADER_SETTLE_S = 30.0
#: A CoordinatorInfo may wait behind one store call running to its deadline
#: (the coordinator's 2 s etcd RPC deadline; test_etcd_partition's INFO_TIMEOUT_S).
INFO_TIMEOUT_S = 5.0
#: The etcd mode's longer start (etcd, 3 coordinators) and settle, added to the runner's limit.
ETCD_EXTRA_S = 60.0 + LEADER_SETTLE_S


# ================================================================ schedules (pure)


@dataclass(frozen=True)
class Step:
    """One fault. ``target``: a node (crash, hang), a host (link_down), the
    first host of a partition (``peer`` the second; one-directional: packets
    from ``target`` to ``peer`` are dropped) or "secondary" (disk_full).

    "primary" and "secondary" name ROLES, looked up on the coordinator when
    the fault starts (a promotion moves them; the processes keep their names).

    The failover kinds (``variant`` says how):

    * ``lose_primary``: SIGKILL the primary for good; ``variant`` "auto" (the
      volume is --auto-failover) or "promote" (Promote, retried while refused
      for the lease); the old primary returns with its old command line
      ``duration_s`` after the promotion (<= 0: only at the heal).
    * ``isolate_primary``: cut the primary from the coordinator and the
      secondary (the client still reaches it) until it is promoted away from
      ("auto" / "promote"), then ``duration_s`` more; heal.
    * ``promote_during_resync``: SIGKILL the secondary for ``duration_s``
      (writes go on degraded), restart it, and when the pair resyncs SIGKILL
      the primary and Promote: "refused" (no --force: refused, the primary
      restarts) or "forced_keep_new" / "forced_keep_old" (force: the
      pre-resync rollback point; split brain when the old primary returns;
      then resolve, as forced_promote).
    * ``replace_disk``: stop the node in role ``target``, replace its data dir
      by an empty one (the old one kept, renamed), restart it after
      ``duration_s`` -- only when the other replica holds every acknowledged
      write, else it is a plain crash.
    * ``forced_promote``: SIGKILL the secondary, writes go on degraded for
      ``duration_s``, SIGKILL the primary, restart the stale secondary and
      force-promote it, write, bring the old primary back: split brain; then
      ``Resolve(keep=...)``: ``variant`` "keep_new" (the promoted node) or
      "keep_old" (the old primary).
    """

    at_s: float
    kind: str
    target: str
    duration_s: float
    peer: str = ""
    trigger: str = "time"
    variant: str = ""

    def describe(self) -> str:
        returns = (f"returns {self.duration_s:.1f} s after the promotion" if self.duration_s > 0
                   else "returns at the heal")
        what = {
            "crash": f"SIGKILL {self.target}, restart after {self.duration_s:.1f} s",
            "hang": f"SIGSTOP {self.target} for {self.duration_s:.1f} s",
            "partition": f"partition {self.target} <-> {self.peer} for {self.duration_s:.1f} s",
            "partition_oneway": f"drop {self.target} -> {self.peer} for {self.duration_s:.1f} s",
            "link_down": f"link of {self.target} down for {self.duration_s:.1f} s",
            "disk_full": f"secondary disk full for {self.duration_s:.1f} s",
            "lose_primary": f"primary lost for good ({self.variant}), {returns}",
            "isolate_primary": (f"isolate the primary from coordinator and secondary ({self.variant}), "
                                f"heal {self.duration_s:.1f} s after the promotion"),
            "promote_during_resync": (f"secondary down {self.duration_s:.1f} s, then on resyncing: SIGKILL "
                                      f"the primary and promote ({self.variant})"),
            "replace_disk": f"replace the {self.target}'s disk (empty data dir), restart after "
                            f"{self.duration_s:.1f} s",
            "forced_promote": (f"secondary down, {self.duration_s:.1f} s of degraded writes, primary lost, "
                               f"forced promote, old primary back: split brain, resolve ({self.variant})"),
            "coordinator_crash": f"SIGKILL the {self.target} coordinator, restart after {self.duration_s:.1f} s",
            "coordinator_hang": f"SIGSTOP the {self.target} coordinator for {self.duration_s:.1f} s",
            "leader_etcd_partition": f"partition the leader's host <-> etcd for {self.duration_s:.1f} s",
            "etcd_member_crash": f"SIGKILL etcd member {self.target}, restart after {self.duration_s:.1f} s",
        }[self.kind]
        when = f"t={self.at_s:.1f}"
        if self.trigger != "time":
            when += f" then on {self.trigger}"
        return f"{when}: {what}"


@dataclass(frozen=True)
class Schedule:
    seed: int
    schedule_s: float
    resync_mode: str  # "rewrite" | "direct"
    snapshot_period_s: float  # 0 = off
    resync_max_rate: str  # "0" = unlimited
    writers: int
    steps: tuple[Step, ...]
    #: The volume is created with --auto-failover.
    auto_failover: bool = False
    #: A failover episode: the coordinator runs with the FAILOVER_* lease and
    #: node timeout, the nodes with FAILOVER_QUORUM_LOSS_TIMEOUT_S.
    failover: bool = False
    #: "sqlite" (one coordinator) or "etcd" (the etcd mode, see the module docstring).
    store: str = "sqlite"

    def describe(self) -> str:
        head = (f"seed {self.seed}: {self.schedule_s:g} s, resync {self.resync_mode}, "
                f"snapshot period {self.snapshot_period_s or 'off'}, resync rate {self.resync_max_rate}, "
                f"{self.writers} writers")
        if self.failover:
            head += (f", lease {FAILOVER_LEASE_S:g} s, node timeout {FAILOVER_NODE_TIMEOUT_S:g} s, "
                     f"auto-failover {'on' if self.auto_failover else 'off'}")
        if self.store == "etcd":
            head += (f", {len(COORDINATORS)} coordinators on {ETCD_MEMBERS} etcd members (election TTL "
                     f"{ETCD_ELECTION_TTL_S} s)")
        return "\n".join([head, *(f"  [{i}] {s.describe()}" for i, s in enumerate(self.steps))])

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_KIND_WEIGHTS = {"crash": 30, "hang": 15, "partition": 18, "partition_oneway": 12, "link_down": 12, "disk_full": 13}
_NODE_WEIGHTS = {"secondary": 50, "primary": 35, "coordinator": 15}


def _pick(rng: random.Random, weights: dict[str, int]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _fault(rng: random.Random, at_s: float, trigger: str = "time", kinds: dict[str, int] | None = None) -> Step:
    kind = _pick(rng, kinds or _KIND_WEIGHTS)
    if kind == "crash":
        return Step(round(at_s, 2), kind, _pick(rng, _NODE_WEIGHTS), round(rng.uniform(0.1, 2.5), 2),
                    trigger=trigger)
    if kind == "hang":
        return Step(round(at_s, 2), kind, _pick(rng, _NODE_WEIGHTS), round(rng.uniform(0.3, 3.0), 2),
                    trigger=trigger)
    if kind in ("partition", "partition_oneway"):
        # Mostly the replication link; any two hosts otherwise.
        if rng.random() < 0.5:
            a, b = "primary", "secondary"
        else:
            a, b = rng.sample(HOSTS, 2)
        if rng.random() < 0.5:
            a, b = b, a
        return Step(round(at_s, 2), kind, a, round(rng.uniform(0.5, 4.0), 2), peer=b, trigger=trigger)
    if kind == "link_down":
        host = rng.choices(HOSTS, weights=(15, 30, 45, 10))[0]
        return Step(round(at_s, 2), kind, host, round(rng.uniform(0.5, 3.0), 2), trigger=trigger)
    return Step(round(at_s, 2), "disk_full", "secondary", round(rng.uniform(0.8, 4.0), 2), trigger=trigger)


_SECONDARY_FAULTS = {"crash": 40, "partition": 25, "link_down": 15, "disk_full": 20}


def generate_schedule(seed: int, schedule_s: float = DEFAULT_SCHEDULE_S, *, failover: bool = False,
                      store: str = "sqlite") -> Schedule:
    """The schedule of ``seed`` (pure and deterministic: same seed, length and
    ``failover``, same schedule). Episodes: a fault, and often a second one
    while the pair recovers (on ``resyncing``), during the switch-back (on
    ``final``), overlapping the first, or right after a periodic snapshot.

    ``failover``: often (FAILOVER_ODDS) one failover episode as well (see
    :func:`_with_failover`); the command line's default. Without it (the
    default here, and ``--no-failover``) a seed's schedule is what it was
    before the failover faults existed, so older seeds replay as reported.

    ``store`` "etcd": the same schedule plus the etcd mode's faults
    (:func:`_with_etcd`, a random stream of its own)."""
    rng = random.Random(f"nemesis-{seed}-{schedule_s:g}")
    mode = rng.choice(("rewrite", "direct"))
    period = rng.choice((0.0, 0.0, 0.3, 0.5, 1.0))
    rate = rng.choice(("0", "4MiB", "8MiB", "16MiB"))
    writers = rng.randint(3, 6)
    steps: list[Step] = []
    end = schedule_s - 0.5  # every step starts before this

    def clip(st: Step, latest_end: float) -> Step:
        return replace(st, duration_s=round(max(0.1, min(st.duration_s, latest_end - st.at_s)), 2))

    t = rng.uniform(1.0, 2.5)
    while t < schedule_s - 1.5:
        r = rng.random()
        if r < 0.30:
            # A failure of the secondary (or its link), then a second fault during recovery.
            first = clip(_fault(rng, t, kinds=_SECONDARY_FAULTS), end - 0.5)
            if first.kind in ("crash",):
                first = Step(first.at_s, "crash", "secondary", first.duration_s)
            elif first.kind == "partition":
                first = Step(first.at_s, "partition", "primary", first.duration_s, peer="secondary")
            elif first.kind == "link_down":
                first = Step(first.at_s, "link_down", "secondary", first.duration_s)
            trigger = rng.choice(("resyncing", "resyncing", "final"))
            second = clip(_fault(rng, first.at_s + first.duration_s, trigger=trigger), schedule_s + 2.0)
            steps += [first, second]
            t = first.at_s + first.duration_s + second.duration_s + rng.uniform(1.5, 3.5)
        elif r < 0.45:
            first = clip(_fault(rng, t), end)
            second = clip(_fault(rng, t + rng.uniform(0.1, max(0.2, first.duration_s))), end + 1.0)
            steps += [first, second]
            t = max(first.at_s + first.duration_s, second.at_s + second.duration_s) + rng.uniform(1.0, 3.0)
        elif r < 0.55 and period > 0:
            s = clip(_fault(rng, t, trigger="snapshot"), end + 1.0)
            steps.append(s)
            t = s.at_s + s.duration_s + rng.uniform(1.0, 3.0)
        else:
            s = clip(_fault(rng, t), end + 1.0)
            steps.append(s)
            t = s.at_s + s.duration_s + rng.uniform(0.8, 3.0)
    plain = Schedule(seed, schedule_s, mode, period, rate, writers, tuple(steps))
    sched = plain if not failover else _with_failover(plain, random.Random(f"nemesis-failover-{seed}-{schedule_s:g}"))
    if store == "sqlite":
        return sched
    if store != "etcd":
        raise ValueError(f"store {store!r}: expected 'sqlite' or 'etcd'")
    return _with_etcd(sched, random.Random(f"nemesis-etcd-{seed}-{schedule_s:g}"))


_ETCD_WEIGHTS = {"coordinator_crash": 35, "coordinator_hang": 20, "leader_etcd_partition": 25,
                 "etcd_member_crash": 20}


def _with_etcd(sched: Schedule, rng: random.Random) -> Schedule:
    """``sched`` plus 1-3 faults of the control plane (ETCD_KINDS) at random
    times, from their own random stream (``sched``'s steps keep their indexes
    and times). A hang of the leader lasts up to 1.5 election TTLs: sometimes
    its lease runs out while it is stopped and it must step down on SIGCONT."""
    steps = list(sched.steps)
    for _ in range(rng.randint(1, 3)):
        at = round(rng.uniform(1.0, max(1.5, sched.schedule_s - 2.0)), 2)
        kind = _pick(rng, _ETCD_WEIGHTS)
        if kind == "coordinator_crash":
            steps.append(Step(at, kind, rng.choice(("leader", "follower")), round(rng.uniform(0.3, 3.0), 2)))
        elif kind == "coordinator_hang":
            steps.append(Step(at, kind, "leader", round(rng.uniform(0.5, 1.5 * ETCD_ELECTION_TTL_S), 2)))
        elif kind == "leader_etcd_partition":
            steps.append(Step(at, kind, "leader", round(rng.uniform(1.0, 5.0), 2), peer="etcd"))
        else:
            steps.append(Step(at, kind, str(rng.randrange(ETCD_MEMBERS)), round(rng.uniform(0.5, 4.0), 2)))
    return replace(sched, steps=tuple(steps), store="etcd")


#: Odds that a schedule has a failover episode, and of each kind: a
#: 200-schedule run has about 120 episodes, 20-26 of each kind.
FAILOVER_ODDS = 0.6
_FAILOVER_WEIGHTS = {"lose_primary": 22, "isolate_primary": 20, "promote_during_resync": 18, "replace_disk": 22,
                     "forced_promote": 18}
#: A second fault during the fail-back / rebuild resync (not after the
#: episodes that end with a resolve: it needs both nodes alive).
_SECOND_FAULT_ODDS = 0.4
#: The resync a promote_during_resync catches must last a while.
_RESYNC_RATE_CAP = "4MiB"


def _with_failover(plain: Schedule, rng: random.Random) -> Schedule:
    """``plain`` with (often) one failover episode, drawn from its own random
    stream so that a schedule without one is exactly what it was before. The
    episode starts in the first half of the schedule, when the pair is back
    in sync (trigger ``in_sync``); the plain faults that would not have ended
    a little before it are dropped."""
    if rng.random() >= FAILOVER_ODDS:
        return plain
    kind = _pick(rng, _FAILOVER_WEIGHTS)
    at = round(rng.uniform(1.0, max(1.5, plain.schedule_s / 2)), 2)
    earlier = tuple(st for st in plain.steps if st.at_s + st.duration_s < at - 0.5)
    auto = rng.random() < 0.25
    rate = plain.resync_max_rate
    if kind in ("lose_primary", "isolate_primary"):
        variant = rng.choice(("auto", "promote"))
        auto = variant == "auto"
        if kind == "lose_primary":
            duration = round(rng.uniform(0.5, 4.0), 2) if rng.random() < 0.75 else 0.0
        else:
            duration = round(rng.uniform(0.5, 3.0), 2)
        step = Step(at, kind, "primary", duration, trigger="in_sync", variant=variant)
    elif kind == "replace_disk":
        step = Step(at, kind, rng.choice(("primary", "secondary")), round(rng.uniform(0.3, 3.0), 2),
                    trigger="in_sync")
    elif kind == "promote_during_resync":
        variant = rng.choice(("refused", "forced"))
        if variant == "forced":
            variant += "_" + rng.choice(("keep_new", "keep_old"))
        step = Step(at, kind, "primary", round(rng.uniform(0.8, 2.5), 2), trigger="in_sync", variant=variant)
        rate = _RESYNC_RATE_CAP
    else:
        step = Step(at, kind, "primary", round(rng.uniform(1.0, 3.0), 2), trigger="in_sync",
                    variant=rng.choice(("keep_new", "keep_old")))
    steps = [*earlier, step]
    if kind in ("lose_primary", "isolate_primary", "replace_disk") and rng.random() < _SECOND_FAULT_ODDS:
        second = _fault(rng, min(plain.schedule_s - 0.5, at + 0.5), trigger="resyncing")
        steps.append(replace(second, duration_s=round(min(second.duration_s, 3.0), 2)))
    return replace(plain, resync_max_rate=rate, steps=tuple(steps), auto_failover=auto, failover=True)


# ================================================================ workload


class NemesisWorkload(Workload):
    """A :class:`~deploy.workload.Workload` that also records which node
    acknowledged each write, when that is certain: the client pointed at the
    same node before and after the write (it follows a promotion by itself,
    and a write whose primary moved meanwhile may have been acknowledged by
    either). A resolve's accounting needs it (see ``Runner._accounted``)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        #: (writer, version) -> the address of the node that acknowledged it.
        self.acked_by: dict[tuple[int, int], str] = {}

    async def write_one(self, w: int, *, max_blocks: int | None = None) -> Op:
        client = await self.get_client()
        before = client.primary
        op = await super().write_one(w, max_blocks=max_blocks)
        if client.primary == before:
            self.acked_by[(op.writer, op.version)] = before
        return op


def make_workload(coordinator: str, seed: int, writers: int, t0: float) -> NemesisWorkload:
    """Sequential writers on disjoint regions through the primary (one shared
    write stream), every write self-describing and recorded in a history
    (:mod:`deploy.workload`). The writers' random streams depend on the seed
    only, so a replayed seed writes the same offsets and sizes."""

    async def connect() -> sc.VolumeClient:
        return await sc.VolumeClient.connect(coordinator, VOLUME, write_timeout_s=WRITE_TIMEOUT_S)

    return NemesisWorkload(connect, seed=seed, regions=split_regions(VOLUME_SIZE, writers, BLOCK),
                           block_size=BLOCK, t0=t0)


# ================================================================ the runner (on the client host)


class LogWatcher:
    """Counts occurrences of a text in a growing log file."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.text = text
        self.offset = path.stat().st_size if path.exists() else 0
        self._carry = ""

    def poll(self) -> bool:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return False
        self.offset += len(chunk)
        text = self._carry + chunk.decode("utf-8", "replace")
        self._carry = text[-len(self.text):]
        return self.text in text


@dataclass
class RunResult:
    seed: int
    schedule: dict[str, Any]
    ok: bool = False
    failure: str = ""
    events: list[tuple[float, str]] = field(default_factory=list)
    faults: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    acked: int = 0
    indeterminate: int = 0
    lost_writes: int = 0
    lost_blocks: int = 0
    garbage_blocks: int = 0
    divergent: int = 0
    rollback_checked: int = 0
    rollback_bad: int = 0
    time_to_in_sync_s: float | None = None
    #: Promotions seen (the coordinator named another node primary).
    promotions: int = 0
    #: What the operator discarded with Resolve (forced promotes only): the
    #: bytes the real run reported, the acknowledged writes the check accepted
    #: as discarded (inside the reported extents, acknowledged by the
    #: discarded node after the split), and each ResolveReply in short.
    discarded_bytes: int = 0
    discarded_writes: int = 0
    resolves: list[dict[str, Any]] = field(default_factory=list)
    harness_errors: list[str] = field(default_factory=list)
    logs: dict[str, str] = field(default_factory=dict)
    workdir: str = ""
    mode: str = ""
    elapsed_s: float = 0.0
    schedule_s: float = DEFAULT_SCHEDULE_S
    #: The schedule was drawn with failover faults (``generate_schedule(failover=)``).
    failover_faults: bool = False
    #: "sqlite" or "etcd" (``generate_schedule(store=)``).
    store: str = "sqlite"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunResult:
        known = set(cls.__dataclass_fields__)
        d = {k: v for k, v in d.items() if k in known}
        d["events"] = [tuple(e) for e in d.get("events", [])]
        return cls(**d)

    def report(self) -> str:
        sched = generate_schedule(self.seed, self.schedule_s, failover=self.failover_faults, store=self.store)
        lines = [
            f"NEMESIS {'PASSED' if self.ok else 'FAILED'}: seed {self.seed} ({self.mode}, {self.elapsed_s:.1f} s)",
        ]
        if self.failure:
            lines.append(f"failure: {self.failure}")
        lines.append(sched.describe())
        if self.skipped:
            lines.append("skipped faults: " + "; ".join(f"{k}: {v}" for k, v in self.skipped.items()))
        lines.append("what happened when:")
        lines += [f"  {t:7.2f}  {text}" for t, text in self.events]
        lines.append(f"writes: {self.acked} acknowledged, {self.indeterminate} indeterminate; lost writes "
                     f"{self.lost_writes}, garbage blocks {self.garbage_blocks}, divergent replicas "
                     f"{self.divergent}, rollback points checked {self.rollback_checked} (bad "
                     f"{self.rollback_bad}); time to in_sync "
                     f"{'-' if self.time_to_in_sync_s is None else f'{self.time_to_in_sync_s:.2f} s'}")
        if self.promotions or self.resolves:
            lines.append(f"promotions {self.promotions}; resolves {len(self.resolves)}: discarded "
                         f"{self.discarded_bytes} bytes, {self.discarded_writes} acknowledged writes accounted "
                         f"as discarded")
        for res in self.resolves:
            lines.append(f"  resolve: {json.dumps(res)}")
        if self.harness_errors:
            lines.append("harness errors: " + "; ".join(self.harness_errors))
        lines.append("logs:")
        lines += [f"  {name:<12} {path}" for name, path in self.logs.items()]
        lines.append(f"replay: python -m deploy.nemesis --seed {self.seed} --schedule-s {self.schedule_s:g}"
                     + ("" if self.failover_faults else " --no-failover")
                     + ("" if self.store == "sqlite" else f" --store {self.store}"))
        return "\n".join(lines)


#: The status of an acknowledged write an operator discarded with Resolve
#: (indeterminate to the checks: it may or may not be in the final volume).
DISCARDED = "discarded"


@dataclass
class Discard:
    """What one Resolve discarded (/tmp/h/resolve_contract.md, issue 10's
    checker invariant): the reported extents of the discarded node, and when
    it could have acknowledged a write after the split, in (``t_split``,
    ``t_until``]. A write counts when it lies inside the extents and was
    acknowledged by that node: its node is known (``NemesisWorkload.acked_by``)
    and is that node, or -- a write whose primary moved while it was in
    flight, acknowledged by either -- the discarded node's own state (its
    ``discard_snapshot``, read by the final check into ``versions``) holds it
    or a later version of its writer at one of its blocks (the client only
    ever moves on to the new primary, so a later write there means this one
    went there too). ``t_diverged``: when the two sides' histories began to
    differ (the episode's first fault)."""

    node: str
    extents: tuple[tuple[int, int], ...]
    t_split: float
    t_until: float
    t_diverged: float
    snapshot_id: int
    #: block -> version held by the discarded node's snapshot (0: zeros or garbage).
    versions: dict[int, int] = field(default_factory=dict)

    def covers(self, op: Op, acked_by: str) -> bool:
        if op.status != OK or not self.t_split < op.t_done <= self.t_until:
            return False
        if acked_by and acked_by != self.node:
            return False
        if not acked_by and not any(self.versions.get(b, 0) >= op.version for b in op.blocks(BLOCK)):
            return False
        return _inside(op.offset, op.nblocks * BLOCK, self.extents)


def _inside(offset: int, length: int, extents: Sequence[tuple[int, int]]) -> bool:
    """[offset, offset + length) lies entirely inside the union of ``extents``."""
    pos, end = offset, offset + length
    for off, n in sorted(extents):
        if off > pos:
            break
        pos = max(pos, off + n)
        if pos >= end:
            return True
    return pos >= end


def _relabel(h: History, discarded: Callable[[Op], bool]) -> History:
    """A copy of ``h`` with the ops ``discarded`` says marked DISCARDED."""
    return History(h.seed, h.block_size, [replace(o, status=DISCARDED) if discarded(o) else o for o in h.ops])


def _retry_promote(e: sc.ClientError) -> bool:
    """A Promote refusal that a moment fixes: the old primary's lease runs, the
    secondary has not registered or reported yet, the coordinator is down."""
    if e.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return True
    m = e.message
    return e.code == grpc.StatusCode.FAILED_PRECONDITION and (
        "lease runs" in m or "is not alive" in m or "has not reported" in m or "next heartbeat" in m)


class Runner:
    """Runs one schedule. Must run where every host is reachable (the client host)."""

    def __init__(self, sched: Schedule, workdir: Path, net: netns.TestNet | None, mode: str,
                 failover_faults: bool = False) -> None:
        self.sched = sched
        self.workdir = workdir
        self.net = net
        self.mode = mode
        self.t0 = self.t_start = time.monotonic()
        self.result = RunResult(sched.seed, sched.to_json(), workdir=str(workdir), mode=mode,
                                schedule_s=sched.schedule_s, failover_faults=failover_faults, store=sched.store)
        self.cluster: LocalCluster | None = None
        #: The etcd mode: its etcd cluster, the coordinator leading as last seen, members SIGKILLed.
        self.etcd: EtcdCluster | None = None
        self.leader = "coordinator"
        #: A fault killed or stopped the leader and no leader has been seen since (``_wait_live_leader``).
        self.leader_gone = False
        self.leader_gone_at = 0.0
        self.etcd_down: set[int] = set()
        self.nodes = ETCD_NODES if sched.store == "etcd" else NODES
        self.workload: NemesisWorkload | None = None
        self.state = ""
        #: role -> process name, as the coordinator records the pair (roles
        #: move with a promotion; the processes keep their names).
        self.roles = {"primary": "primary", "secondary": "secondary"}
        self.epoch = 0
        #: Nodes a failover fault holds down (no other fault restarts them;
        #: the heal does): name -> why.
        self.held: dict[str, str] = {}
        #: What a resolve discarded, for the final check (``_accounted``).
        self.discards: list[Discard] = []
        #: Why Resolve cannot be used here ("" = it can): probed at start.
        self.resolve_why = "not probed"
        self.state_seen: set[str] = set()
        self.captures: list[tuple[str, float, dict[int, bytes]]] = []
        self._captured: set[int] = set()
        #: Size-limited data dirs (tmpfs) by process name (disk_full).
        self.disk_dirs: dict[str, Path] = {}
        self.fillers: set[Path] = set()
        self.stopped: dict[str, int] = {}  # node -> pid SIGSTOPped
        self.faults: Counter[str] = Counter()

    # ------------------------------------------------------------ bookkeeping
    def now(self) -> float:
        return time.monotonic() - self.t0

    def event(self, text: str) -> None:
        t = self.now()
        self.result.events.append((round(t, 3), text))
        log.info("t=%.2f %s", t, text)

    def capabilities(self) -> dict[str, str]:
        """kind -> why it cannot run here ("" = it can)."""
        why_net = "" if self.net is not None else "no network namespaces (loopback fallback)"
        why_ipt = why_net or netns.iptables_available()[1]
        why_disk = "" if os.geteuid() == 0 and shutil.which("mount") else "tmpfs needs root"
        return {"crash": "", "hang": "", "partition": why_ipt, "partition_oneway": why_ipt,
                "link_down": why_net, "disk_full": why_disk, "lose_primary": "", "isolate_primary": why_ipt,
                "promote_during_resync": "", "replace_disk": "", "forced_promote": "", "coordinator_crash": "",
                "coordinator_hang": "", "leader_etcd_partition": why_ipt, "etcd_member_crash": ""}

    # ------------------------------------------------------------ main
    async def run(self) -> RunResult:
        caps = self.capabilities()
        try:
            await self._run(caps)
        except Exception as e:
            log.exception("nemesis runner failed")
            self._fail(f"harness error: {type(e).__name__}: {e}")
        finally:
            await self._teardown()
        r = self.result
        r.faults = dict(self.faults)
        r.elapsed_s = round(time.monotonic() - self.t_start, 2)
        r.ok = not r.failure
        return r

    def _fail(self, why: str) -> None:
        if not self.result.failure:
            self.result.failure = why
        else:
            self.result.failure += f"; {why}"

    async def _run(self, caps: dict[str, str]) -> None:
        s = self.sched
        need_disk = any(st.kind == "disk_full" for st in s.steps) and not caps["disk_full"]
        if need_disk:
            # The secondary's disk; with a failover episode the roles may
            # move, so the primary's too (disk_full fills the secondary's).
            for name in ("secondary", "primary") if s.failover else ("secondary",):
                self.disk_dirs[name] = self.workdir / name
                netns.mount_tmpfs(self.disk_dirs[name], DISK_BYTES)
        node_args = ["--ack-timeout-s", "1.0", "--resync-max-rate", s.resync_max_rate]
        if s.snapshot_period_s:
            node_args += ["--snapshot-period-s", str(s.snapshot_period_s)]
        coordinator_args: list[str] = []
        if s.failover:
            node_args += ["--quorum-loss-timeout-s", f"{FAILOVER_QUORUM_LOSS_TIMEOUT_S:g}"]
            coordinator_args = ["--lease-s", f"{FAILOVER_LEASE_S:g}", "--lease-drift-s",
                                f"{FAILOVER_LEASE_DRIFT_S:g}", "--node-timeout-s", f"{FAILOVER_NODE_TIMEOUT_S:g}"]
        hosts = dict(self.net.hosts) if self.net is not None else None
        store_kw: dict[str, Any] = {}
        if s.store == "etcd":
            self.etcd = self._make_etcd()
            await asyncio.to_thread(self.etcd.start)
            for m in self.etcd.members:
                self.result.logs[m.name] = str(m.log_path)
            coordinator_args += ["--election-ttl-s", str(ETCD_ELECTION_TTL_S)]
            store_kw = {"coordinators": len(COORDINATORS), "store": self.etcd.url}
        self.cluster = c = LocalCluster(
            self.workdir, primary_args=node_args, secondary_args=node_args, coordinator_args=coordinator_args,
            hosts=hosts, stop_grace_s=3.0, startup_timeout_s=30.0, **store_kw,
        )
        for name in self.nodes:
            self.result.logs[name] = str(c.log_path(name))
        self.result.logs["runner"] = str(self.workdir / "runner.log")
        await c.start()
        if self.etcd is not None:
            self.leader = await c.leader()
        await c.create_volume(VOLUME, VOLUME_SIZE, BLOCK, resync_mode=s.resync_mode, auto_failover=s.auto_failover,
                              timeout_s=40)
        self.t0 = time.monotonic()
        self.event(f"cluster up ({self.mode}): {c.addresses}; volume {VOLUME} in_sync"
                   f"{' (auto-failover)' if s.auto_failover else ''}")
        if any(st.kind == "forced_promote" or st.variant.startswith("forced") for st in s.steps):
            self.resolve_why = await self._probe_resolve()
            if self.resolve_why:
                caps["forced_promote"] = self.resolve_why
                self.event(f"no forced promotes in this run: {self.resolve_why}")
        self.workload = make_workload(c.coordinator_addr, s.seed, s.writers, self.t0)
        await self.workload.start()
        monitor = asyncio.create_task(self._monitor(), name="monitor")
        leaders = asyncio.create_task(self._monitor_leader(), name="monitor-leader") if self.etcd else None
        try:
            steps = [asyncio.create_task(self._step(i, st, caps), name=f"step-{i}") for i, st in enumerate(s.steps)]
            await asyncio.sleep(max(0.0, s.schedule_s - self.now()))
            await asyncio.gather(*steps)
            await self._heal_all()
            t_heal = time.monotonic()
            self.event("schedule over, everything healed; writes continue a little")
            early = await self._wait_in_sync(TAIL_WRITES_S)
            await self.workload.stop(WRITE_TIMEOUT_S + 5)
            h = self.workload.history
            self.result.acked, self.result.indeterminate = h.acked, h.indeterminate
            self.event(f"workload stopped: {h.acked} writes acknowledged, {h.indeterminate} indeterminate")
            # In sync for real: stable for longer than the ack timeout with no
            # client write in flight (a primary that was just resumed from
            # SIGSTOP looks in sync until its watchdog fires).
            found = await self._wait_in_sync(IN_SYNC_TIMEOUT_S, stable_s=STABLE_IN_SYNC_S)
            in_sync_at = None
            if found is not None:
                in_sync_at = found[0]
                if early is not None and early[1] == found[1]:
                    in_sync_at = early[0]  # same epoch: no resync since
            if in_sync_at is None:
                st = await self._status_text()
                self._fail(f"the pair did not reach in_sync within {IN_SYNC_TIMEOUT_S:g} s of the heal: {st}")
                await self._check(verify=False)
                return
            self.result.time_to_in_sync_s = round(max(0.0, in_sync_at - t_heal), 3)
            self.event(f"in_sync {self.result.time_to_in_sync_s:.2f} s after the heal")
        finally:
            for task in (monitor, leaders):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            if self.workload is not None:
                await self.workload.stop(WRITE_TIMEOUT_S + 5)
        await self._check(verify=True)

    # ------------------------------------------------------------ monitoring
    async def _status(self) -> pb.VolumeStatus:
        assert self.cluster is not None
        return await sc.get_volume(self.cluster.coordinator_addr, VOLUME, timeout_s=2.0)

    async def _status_text(self) -> str:
        try:
            d = sc.volume_status_dict(await self._status())
            keep = ("state", "epoch", "primary_alive", "secondary_alive", "failed_bytes", "last_error", "resync")
            return json.dumps({k: d[k] for k in keep})
        except sc.ClientError as e:
            return f"status unavailable: {e}"

    async def _monitor(self) -> None:
        assert self.cluster is not None
        last_snap_poll = 0.0
        while True:
            try:
                st = await self._status()
                d = sc.volume_status_dict(st)
                self._note_roles(st)
                if d["state"] != self.state:
                    self.state = d["state"]
                    self.state_seen.add(self.state)
                    err = f": {d['last_error'][:160]}" if d["last_error"] and self.state != "in_sync" else ""
                    self.event(f"coordinator: {self.state} at epoch {d['epoch']}{err}")
            except sc.ClientError:
                pass
            if time.monotonic() - last_snap_poll > 0.25:
                last_snap_poll = time.monotonic()
                await self._capture_rollback_points()
            await asyncio.sleep(0.1)

    def _note_roles(self, st: pb.VolumeStatus) -> None:
        """Follow the roles as the coordinator records them (an event when they move)."""
        assert self.cluster is not None
        by_addr = {a: n for n, a in self.cluster.addresses.items()}
        roles = {"primary": by_addr.get(st.primary, ""), "secondary": by_addr.get(st.secondary, "")}
        if not roles["primary"] or not roles["secondary"]:
            return
        if roles["primary"] != self.roles["primary"]:
            self.result.promotions += 1
            self.event(f"coordinator: {roles['primary']} is the primary at epoch {st.epoch}, "
                       f"{roles['secondary']} the secondary")
        self.roles = roles
        self.epoch = int(st.epoch)

    async def _refresh_roles(self) -> dict[str, str]:
        """The roles now (the coordinator's record; the last known if it does not answer)."""
        try:
            self._note_roles(await self._status())
        except sc.ClientError:
            pass
        return dict(self.roles)

    def _name(self, target: str) -> str:
        """The process in role ``target`` ("primary", "secondary"; in the etcd
        mode "coordinator" is the leading one); any other name is itself."""
        if target == "coordinator" and self.etcd is not None:
            return self.leader
        return self.roles.get(target, target)

    # ------------------------------------------------------------ the etcd mode
    def _make_etcd(self) -> EtcdCluster:
        binary = shutil.which("etcd")
        if binary is None:
            raise RuntimeError("--store etcd needs the etcd binary (scripts/setup.sh installs Debian's etcd-server)")
        if self.net is not None:
            return etcd_on_host(binary, self.workdir / "etcd", ETCD_MEMBERS, self.net.host("etcd"))
        return EtcdCluster.make(binary, self.workdir / "etcd", ETCD_MEMBERS)

    async def _coordinator_infos(self) -> dict[str, dict[str, Any]]:
        """Every coordinator's CoordinatorInfo, by process name (``state`` "unreachable" when it does not answer)."""
        assert self.cluster is not None
        by_addr = {self.cluster.address(n): n for n in COORDINATORS}
        infos = await sc.coordinator_info(",".join(by_addr), timeout_s=INFO_TIMEOUT_S)
        return {by_addr[i["address"]]: i for i in infos}

    async def _refresh_leader(self) -> str:
        """The coordinator leading now (the last one seen while none does)."""
        if self.etcd is None:
            return "coordinator"
        asked = time.monotonic()
        leaders = [n for n, i in (await self._coordinator_infos()).items() if i["state"] == "leader"]
        if len(leaders) == 1:
            if leaders[0] != self.leader:
                self.event(f"coordinator: {leaders[0]} leads (was {self.leader})")
                self.leader = leaders[0]
            if self.leader_gone and asked > self.leader_gone_at:  # not an answer sent before the fault
                self.leader_gone = False
        return self.leader

    async def _monitor_leader(self) -> None:
        while True:
            with contextlib.suppress(sc.ClientError, ClusterError):
                await self._refresh_leader()
            await asyncio.sleep(0.3)

    async def _wait_live_leader(self, i: int) -> None:
        """Wait (bounded: LEADER_WAIT_S) until the leader last seen runs and is
        not SIGSTOPped, so that a fault of "the leader" right after the leader
        was killed or stopped hits the one elected next, not the dead one."""
        assert self.cluster is not None
        deadline = time.monotonic() + LEADER_WAIT_S
        t = time.monotonic()
        while self.leader_gone or not self.cluster.is_running(self.leader) or self.leader in self.stopped:
            if time.monotonic() >= deadline:
                self.event(f"[{i}] no live leader within {LEADER_WAIT_S:g} s; the fault hits {self.leader}")
                return
            await asyncio.sleep(0.05)
        if time.monotonic() - t > 0.1:
            self.event(f"[{i}] waited {time.monotonic() - t:.1f} s for a live leader: {self.leader}")

    def _coordinator_target(self, target: str) -> str:
        """``target`` "leader" or "follower" (the first follower in COORDINATORS order) as a process name."""
        if target == "leader":
            return self.leader
        return next(n for n in COORDINATORS if n != self.leader)

    # The leader as the leader monitor last saw it (every 0.3 s): asking now
    # could wait INFO_TIMEOUT_S behind a stopped coordinator.
    async def _do_coordinator_crash(self, i: int, st: Step) -> None:
        await self._do_crash(i, replace(st, target=self._coordinator_target(st.target)))

    async def _do_coordinator_hang(self, i: int, st: Step) -> None:
        await self._do_hang(i, replace(st, target=self._coordinator_target(st.target)))

    async def _do_leader_etcd_partition(self, i: int, st: Step) -> None:
        await self._do_partition(i, replace(st, target=self.leader, peer="etcd"))

    async def _do_etcd_member_crash(self, i: int, st: Step) -> None:
        assert self.etcd is not None
        m = int(st.target)
        self.etcd.kill(m)
        self.etcd_down.add(m)
        self.event(f"[{i}] SIGKILL etcd member {m}")
        await asyncio.sleep(st.duration_s)
        await self._restart_etcd_member(m, i)

    async def _restart_etcd_member(self, m: int, i: int) -> None:
        assert self.etcd is not None
        if m not in self.etcd_down:
            return
        self.etcd_down.discard(m)
        await asyncio.to_thread(self.etcd.start_member, m)  # waits until healthy (etcd.START_TIMEOUT_S)
        self.event(f"[{i}] restarted etcd member {m} (healthy)")

    async def _check_one_leader(self) -> None:
        """After the heal: exactly one coordinator leads and every one answers
        CoordinatorInfo, within LEADER_SETTLE_S (a follower resumed or
        reconnected may take an election TTL to see the current holder)."""
        deadline = time.monotonic() + LEADER_SETTLE_S
        while True:
            try:
                infos = await self._coordinator_infos()
            except (sc.ClientError, ClusterError) as e:
                infos, why = {}, str(e)
            else:
                leaders = [n for n, i in infos.items() if i["state"] == "leader"]
                silent = [n for n, i in infos.items() if i["state"] == "unreachable"]
                lead_addr = self.cluster.address(leaders[0]) if len(leaders) == 1 and self.cluster else None
                astray = [n for n, i in infos.items() if i["state"] == "follower" and i["leader"] != lead_addr]
                if len(leaders) == 1 and not silent and not astray:
                    self.leader = leaders[0]
                    self.event(f"coordinators: {leaders[0]} leads, every coordinator answers and follows it")
                    return
                why = (f"leaders {leaders or 'none'}, not answering {silent or 'none'}, following another "
                       f"{astray or 'none'}: {json.dumps(infos)[:600]}")
            if time.monotonic() >= deadline:
                self._fail(f"after the heal, not exactly one leader with every coordinator answering within "
                           f"{LEADER_SETTLE_S:g} s: {why}")
                return
            await asyncio.sleep(0.3)

    async def _capture_rollback_points(self) -> None:
        """Read every new pre-resync-* snapshot of the secondary (the rollback point)."""
        assert self.cluster is not None
        addr = self.cluster.address(self.roles["secondary"])
        try:
            async with rpc.channel(addr) as ch:
                r = await pbg.NodeServiceStub(ch).ListSnapshots(pb.ListSnapshotsRequest(volume=VOLUME), timeout=1.0)
            for snap in r.snapshots:
                if not snap.name.startswith("pre-resync-") or snap.id in self._captured:
                    continue
                t = self.now()
                data = await sc.read_local(addr, VOLUME, 0, VOLUME_SIZE, snap.id, timeout_s=5.0)
                self._captured.add(snap.id)
                touched = range(VOLUME_SIZE // BLOCK)
                self.captures.append((snap.name, t, blocks_from_bytes(data, 0, BLOCK, touched)))
                self.event(f"read rollback point {snap.name!r} (id {snap.id}) from the secondary")
        except (grpc.RpcError, sc.ClientError):
            pass

    async def _in_sync_now(self) -> int:
        """The epoch when the coordinator says in_sync with both nodes alive AND
        the primary itself says in sync at that epoch; 0 otherwise."""
        assert self.cluster is not None
        try:
            st = await self._status()
            if not (st.state == pb.PAIR_STATE_IN_SYNC and st.primary_alive and st.secondary_alive):
                return 0
            rep = await sc.node_status(st.primary, timeout_s=2.0)
        except sc.ClientError:
            return 0
        v = next((v for v in rep.volumes if v.name == VOLUME), None)
        ok = v is not None and v.state == pb.PAIR_STATE_IN_SYNC and v.epoch == st.epoch
        return int(st.epoch) if ok else 0

    async def _wait_in_sync(self, timeout_s: float, stable_s: float = 0.0) -> tuple[float, int] | None:
        """(monotonic time since when, epoch) once in sync (see ``_in_sync_now``)
        without interruption for ``stable_s``; None after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        since: tuple[float, int] | None = None
        while time.monotonic() < deadline:
            t = time.monotonic()
            epoch = await self._in_sync_now()
            if not epoch:
                since = None
            elif since is None or since[1] != epoch:
                since = (t, epoch)
            if since is not None and time.monotonic() - since[0] >= stable_s:
                return since
            await asyncio.sleep(0.1)
        return None

    # ------------------------------------------------------------ steps
    async def _trigger(self, trigger: str) -> bool:
        assert self.cluster is not None
        deadline = time.monotonic() + (IN_SYNC_TRIGGER_TIMEOUT_S if trigger == "in_sync" else TRIGGER_TIMEOUT_S)
        watcher = None
        if trigger == "final":
            watcher = LogWatcher(self.cluster.log_path(self.roles["primary"]), ", final)")
        elif trigger == "snapshot":
            watcher = LogWatcher(self.cluster.log_path(self.roles["primary"]), "common snapshot")
        while time.monotonic() < deadline:
            if trigger == "resyncing" and self.state == "resyncing":
                return True
            if trigger == "in_sync" and self.state == "in_sync":
                return True
            if watcher is not None and watcher.poll():
                return True
            await asyncio.sleep(0.02)
        return False

    async def _step(self, i: int, st: Step, caps: dict[str, str]) -> None:
        await asyncio.sleep(max(0.0, st.at_s - self.now()))
        if st.trigger != "time":
            seen = await self._trigger(st.trigger)
            if not seen:
                self.event(f"[{i}] {st.trigger} not seen within "
                           f"{IN_SYNC_TRIGGER_TIMEOUT_S if st.trigger == 'in_sync' else TRIGGER_TIMEOUT_S:g} s; "
                           "injecting anyway")
        why = caps.get(st.kind, "")
        if why:
            self.result.skipped[st.kind] = why
            self.event(f"[{i}] skipped {st.kind}: {why}")
            return
        if self.etcd is not None and ("coordinator" in (st.target, st.peer) or st.target == "leader"
                                      or st.kind == "isolate_primary"):
            await self._wait_live_leader(i)
        if st.kind not in FAILOVER_KINDS:
            # Roles (the failover kinds look them up themselves, at once).
            st = replace(st, target=self._name(st.target), peer=self._name(st.peer))
        self.faults[st.kind] += 1
        try:
            await getattr(self, f"_do_{st.kind}")(i, st)
        except Exception as e:
            log.exception("step %d failed", i)
            self.result.harness_errors.append(f"[{i}] {st.kind}: {type(e).__name__}: {e}")
            self.event(f"[{i}] {st.kind} could not be carried out: {e}")

    def _note_leader_fault(self, name: str) -> None:
        """``name`` is about to be killed or stopped: if it leads, a leader fault waits for the next one."""
        if self.etcd is not None and name == self.leader:
            self.leader_gone, self.leader_gone_at = True, time.monotonic()

    async def _do_crash(self, i: int, st: Step) -> None:
        c = self.cluster
        assert c is not None
        self._note_leader_fault(st.target)
        if c.is_running(st.target):
            pid = c.pid(st.target)
            c.kill(st.target)
            self.stopped.pop(st.target, None)
            self.event(f"[{i}] SIGKILL {st.target} (pid {pid})")
        else:
            self.event(f"[{i}] {st.target} already down")
        await asyncio.sleep(st.duration_s)
        await self._ensure_running(st.target, i)

    async def _ensure_running(self, name: str, i: int, timeout_s: float = 60.0) -> None:
        c = self.cluster
        assert c is not None
        if name in self.held:
            if not c.is_running(name):
                self.event(f"[{i}] {name} stays down: {self.held[name]}")
            return
        deadline = time.monotonic() + timeout_s
        while not c.is_running(name):
            try:
                await c.start_process(name)
                self.event(f"[{i}] restarted {name} (pid {c.pid(name)})")
                return
            except ClusterError as e:
                if time.monotonic() > deadline:
                    raise
                self.event(f"[{i}] restart of {name} failed ({e.summary}); retrying")
                await asyncio.sleep(1.0)

    async def _do_hang(self, i: int, st: Step) -> None:
        c = self.cluster
        assert c is not None
        if not c.is_running(st.target):
            self.event(f"[{i}] {st.target} is down; nothing to hang")
            return
        pid = c.pid(st.target)
        assert pid is not None
        self._note_leader_fault(st.target)
        c.pause(st.target)
        self.stopped[st.target] = pid
        self.event(f"[{i}] SIGSTOP {st.target} (pid {pid})")
        await asyncio.sleep(st.duration_s)
        if c.is_running(st.target) and c.pid(st.target) == pid:
            c.resume(st.target)
            self.stopped.pop(st.target, None)
            self.event(f"[{i}] SIGCONT {st.target} (pid {pid})")

    async def _do_partition(self, i: int, st: Step, oneway: bool = False) -> None:
        assert self.net is not None
        await asyncio.to_thread(self.net.partition, st.target, st.peer, oneway=oneway)
        arrow = "->" if oneway else "<->"
        self.event(f"[{i}] partition {st.target} {arrow} {st.peer}")
        await asyncio.sleep(st.duration_s)
        await asyncio.to_thread(self.net.unpartition, st.target, st.peer, oneway=oneway)
        self.event(f"[{i}] healed {st.target} {arrow} {st.peer}")

    async def _do_partition_oneway(self, i: int, st: Step) -> None:
        await self._do_partition(i, st, oneway=True)

    async def _do_link_down(self, i: int, st: Step) -> None:
        assert self.net is not None
        await asyncio.to_thread(self.net.link_down, st.target)
        self.event(f"[{i}] link of {st.target} down")
        await asyncio.sleep(st.duration_s)
        await asyncio.to_thread(self.net.link_up, st.target)
        self.event(f"[{i}] link of {st.target} up")

    async def _do_disk_full(self, i: int, st: Step) -> None:
        disk = self.disk_dirs.get(st.target)
        if disk is None:
            self.event(f"[{i}] the disk of {st.target} is not size-limited; no disk_full")
            return
        filler = disk / f"filler-{i}"
        self.fillers.add(filler)
        n = await asyncio.to_thread(netns.fill_disk, disk, filler.name)
        self.event(f"[{i}] disk of {st.target} (the secondary) full (filler of {n >> 20} MiB)")
        await asyncio.sleep(st.duration_s)
        with contextlib.suppress(FileNotFoundError):
            filler.unlink()
        self.fillers.discard(filler)
        self.event(f"[{i}] disk space of {st.target} freed")

    # ------------------------------------------------------------ failover faults
    async def _status_or_none(self) -> pb.VolumeStatus | None:
        try:
            st = await self._status()
        except sc.ClientError:
            return None
        self._note_roles(st)
        return st

    async def _wait_state(self, state: str, timeout_s: float) -> pb.VolumeStatus | None:
        """The status once the coordinator says ``state`` with both nodes alive; None after ``timeout_s``."""
        want = sc.STATE_VALUES[state]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            st = await self._status_or_none()
            if st is not None and st.state == want and st.primary_alive and st.secondary_alive:
                return st
            await asyncio.sleep(0.1)
        return None

    def _kill_for_good(self, i: int, name: str, why: str) -> None:
        """SIGKILL ``name`` and hold it down (no other fault restarts it) until released or the heal."""
        c = self.cluster
        assert c is not None
        self.held[name] = why
        if c.is_running(name):
            pid = c.pid(name)
            c.kill(name)
            self.stopped.pop(name, None)
            self.event(f"[{i}] SIGKILL {name} (pid {pid}): {why}")
        else:
            self.event(f"[{i}] {name} already down: {why}")

    async def _release(self, i: int, name: str, what: str) -> None:
        """Start a node held down again, with its old command line."""
        self.held.pop(name, None)
        self.event(f"[{i}] {what}: {name} starts with its old command line")
        await self._ensure_running(name, i)

    async def _promoted_away(self, i: int, old: str, how: str, *, force: bool = False) -> bool:
        """Wait (bounded) until the coordinator names another node than
        ``old`` primary: by itself (``how`` "auto": auto-failover, or the
        primary's data is missing) or on Promote (retried while refused for
        the lease or a secondary not ready yet). False when no promotion came:
        refused for good (why is in the events) or not within ROLE_WAIT_S."""
        c = self.cluster
        assert c is not None
        old_addr = c.address(old)
        deadline = time.monotonic() + ROLE_WAIT_S
        last = ""
        not_in_sync_since: float | None = None
        while time.monotonic() < deadline:
            st = await self._status_or_none()
            if st is not None and st.primary and st.primary != old_addr:
                self.event(f"[{i}] promoted: {st.primary} is the primary at epoch {st.epoch}")
                return True
            if how != "auto" or force:
                try:
                    r = await sc.promote(c.coordinator_addr, VOLUME, force=force, timeout_s=10.0)
                    self.event(f"[{i}] Promote{' force' if force else ''} accepted: {r.message[:400]}")
                    continue
                except sc.ClientError as e:
                    if not _retry_promote(e):
                        self.event(f"[{i}] Promote{' force' if force else ''} refused "
                                   f"({sc.status_code(e.code).name}): {e.message[:400]}")
                        return False
                    if e.message[:40] != last[:40]:
                        self.event(f"[{i}] Promote refused for now, retrying: {e.message[:200]}")
                    last = e.message
            elif st is not None and st.state != pb.PAIR_STATE_IN_SYNC:
                # Auto-failover acts only on a pair in sync: a stale secondary is never promoted by itself.
                not_in_sync_since = not_in_sync_since or time.monotonic()
                if time.monotonic() - not_in_sync_since > 3.0:
                    self.event(f"[{i}] no auto-failover: the pair is {sc.STATE_NAMES.get(st.state)} (the "
                               f"secondary is not current)")
                    return False
            else:
                not_in_sync_since = None
            await asyncio.sleep(0.3)
        self.event(f"[{i}] no promotion within {ROLE_WAIT_S:g} s: {await self._status_text()}")
        return False

    async def _do_lose_primary(self, i: int, st: Step) -> None:
        c = self.cluster
        assert c is not None
        roles = await self._refresh_roles()
        old = roles["primary"]
        self._kill_for_good(i, old, "the primary lost for good")
        promoted = await self._promoted_away(i, old, st.variant)
        if not promoted:
            await self._release(i, old, "no promotion: old primary returning")
            return
        if st.duration_s <= 0:
            self.held[old] = "the old primary, lost until the heal"
            self.event(f"[{i}] {old} stays down until the heal; writes go on at {self.roles['primary']}")
            return
        await asyncio.sleep(st.duration_s)
        before = await self._resync_sent(self.roles["primary"])
        await self._release(i, old, "old primary returning")
        self.event(f"[{i}] the new primary {self.roles['primary']} had sent {before} resync bytes before the "
                   "return")

    async def _resync_sent(self, name: str) -> int:
        assert self.cluster is not None
        try:
            rep = await sc.node_status(self.cluster.address(name), timeout_s=2.0)
        except sc.ClientError:
            return -1
        return int(next((v.resync_bytes_sent for v in rep.volumes if v.name == VOLUME), 0))

    async def _do_isolate_primary(self, i: int, st: Step) -> None:
        assert self.net is not None
        roles = await self._refresh_roles()
        old, other = roles["primary"], roles["secondary"]
        coordinator = self._name("coordinator")  # in the etcd mode: the leader
        cuts = [(old, coordinator), (old, other)]
        t_cut = time.monotonic()
        for a, b in cuts:
            await asyncio.to_thread(self.net.partition, a, b)
        self.event(f"[{i}] isolated the primary {old} from {coordinator} and {other} (the client still "
                   "reaches it)")
        promoted = await self._promoted_away(i, old, st.variant)
        # Held past lease + drift + node timeout in any case: it must stop
        # acknowledging by itself, not because the cut ended.
        hold = max(st.duration_s if promoted else 0.0,
                   FAILOVER_LEASE_S + FAILOVER_LEASE_DRIFT_S + FAILOVER_NODE_TIMEOUT_S - (time.monotonic() - t_cut))
        await asyncio.sleep(max(0.0, hold))
        for a, b in cuts:
            await asyncio.to_thread(self.net.unpartition, a, b)
        self.event(f"[{i}] healed the isolation of {old}"
                   + ("; it returns to the pair as the secondary" if promoted else ""))

    async def _may_lose_data_of(self, name: str) -> str:
        """Why the disk of ``name`` must not be destroyed now ("" = it may):
        the other replica must hold every acknowledged write. That is so when
        ``name`` is the secondary of a primary that runs, or the primary of a
        pair in sync on its own view and the coordinator's, with the secondary
        running. While the coordinator does not answer, never (a promotion
        may be under way)."""
        c = self.cluster
        assert c is not None
        st = await self._status_or_none()
        if st is None:
            return "the coordinator does not answer (a promotion may be under way)"
        other = self.roles["secondary"] if self.roles["primary"] == name else self.roles["primary"]
        if other in self.held or not c.is_running(other) or other in self.stopped:
            return f"the other replica {other} is down"
        if self.roles["secondary"] == name:
            return ""
        if not (st.state == pb.PAIR_STATE_IN_SYNC and st.primary_alive and st.secondary_alive):
            return f"the pair is {sc.STATE_NAMES.get(st.state)}: the primary may hold the only copy"
        try:
            rep = await sc.node_status(st.primary, timeout_s=2.0)
        except sc.ClientError as e:
            return f"the primary does not say it is in sync ({e})"
        v = next((v for v in rep.volumes if v.name == VOLUME), None)
        if v is None or v.state != pb.PAIR_STATE_IN_SYNC or v.epoch != st.epoch:
            return "the primary itself does not report in sync at the pair's epoch"
        return ""

    def _replace_data_dir(self, i: int, name: str) -> Path:
        """Move the data dir of the (stopped) node ``name`` aside, kept for the
        report, and leave an empty one in its place (a replaced disk)."""
        c = self.cluster
        assert c is not None
        d = c.data_dir(name)
        kept = self.workdir / f"{name}.replaced-{i}"
        if d in self.disk_dirs.values():  # a tmpfs mount point: move what is in it
            kept.mkdir()
            for child in d.iterdir():
                shutil.move(str(child), str(kept / child.name))
        else:
            d.rename(kept)
            d.mkdir()
        self.result.logs[f"{name} disk [{i}]"] = str(kept)
        return kept

    async def _do_replace_disk(self, i: int, st: Step) -> None:
        c = self.cluster
        assert c is not None
        roles = await self._refresh_roles()
        name = roles[st.target]
        epoch = self.epoch
        why = await self._may_lose_data_of(name)
        self._kill_for_good(i, name, f"its disk is being replaced (the {st.target})")
        if not why:
            # After the kill, the coordinator's record again: the node it
            # stopped must still be in the same role at the same epoch (in sync
            # for a primary: then it acknowledged nothing alone).
            st2 = await self._status_or_none()
            if st2 is None or st2.epoch != epoch or self.roles[st.target] != name:
                why = "the roles or the epoch moved meanwhile"
            elif st.target == "primary" and st2.state != pb.PAIR_STATE_IN_SYNC:
                why = "the pair left in_sync meanwhile"
        if why:
            self.event(f"[{i}] only a crash, not a replaced disk: {why}")
        else:
            kept = self._replace_data_dir(i, name)
            self.event(f"[{i}] replaced the disk of {name} (the {st.target}): an empty data dir; the old one "
                       f"is {kept}")
        await asyncio.sleep(st.duration_s)
        await self._release(i, name, "back with " + ("an empty data dir" if not why else "its data"))

    async def _do_promote_during_resync(self, i: int, st: Step) -> None:
        c = self.cluster
        assert c is not None
        roles = await self._refresh_roles()
        p, s = roles["primary"], roles["secondary"]
        t_split = self.now()
        self._kill_for_good(i, s, "the secondary falls behind")
        await asyncio.sleep(st.duration_s)
        await self._release(i, s, "the secondary returns")
        if await self._wait_state("resyncing", TRIGGER_TIMEOUT_S) is None:
            self.event(f"[{i}] no resync seen within {TRIGGER_TIMEOUT_S:g} s (it may be over already): "
                       f"{await self._status_text()}")
        self._kill_for_good(i, p, "the primary dies while resyncing")
        if st.variant.startswith("forced") and not self.resolve_why:
            await self._split_and_resolve(i, st, old=p, new=s, t_split=t_split)
            return
        if st.variant.startswith("forced"):
            self.event(f"[{i}] forced variant not run ({self.resolve_why}): promoting without force")
        if await self._promoted_away(i, p, "promote"):
            # Without force only a current secondary is promoted: the resync
            # must have completed before the kill (the final check decides).
            self.event(f"[{i}] promoted without force: the resync had completed before the primary died?")
        await self._release(i, p, "the primary restarts")

    async def _do_forced_promote(self, i: int, st: Step) -> None:
        c = self.cluster
        w = self.workload
        assert c is not None and w is not None
        roles = await self._refresh_roles()
        p, s = roles["primary"], roles["secondary"]
        t_split = self.now()
        self._kill_for_good(i, s, "the secondary falls behind")
        with contextlib.suppress(AssertionError):
            await w.wait_acked(3, timeout_s=10.0)
        await asyncio.sleep(st.duration_s)
        self.event(f"[{i}] {w.acked} writes acknowledged so far")
        self._kill_for_good(i, p, "the primary dies; its degraded writes are on it only")
        await self._release(i, s, "the stale secondary returns")
        await self._split_and_resolve(i, st, old=p, new=s, t_split=t_split)

    async def _split_and_resolve(self, i: int, st: Step, *, old: str, new: str, t_split: float) -> None:
        """``old`` (the primary, held down) holds writes ``new`` (the stale
        secondary, running) lacks: force-promote ``new``, write, bring ``old``
        back (split brain), then Resolve(keep=...) and record what it discarded."""
        c = self.cluster
        w = self.workload
        assert c is not None and w is not None
        t_promote = self.now()
        if not await self._promoted_away(i, old, "promote", force=True):
            self._fail(f"[{i}] the forced promote of {new} did not happen: {await self._status_text()}")
            await self._release(i, old, "no promotion: the old primary restarts")
            return
        with contextlib.suppress(AssertionError):
            await w.wait_acked(3, timeout_s=ROLE_WAIT_S)
        await asyncio.sleep(st.duration_s)
        await self._release(i, old, "old primary returning")
        sb = await self._wait_state("split_brain", STATE_WAIT_S)
        if sb is None:
            self._fail(f"[{i}] the pair did not report split_brain within {STATE_WAIT_S:g} s of the old "
                       f"primary's return after a forced promote: {await self._status_text()}")
            return
        d = sc.volume_status_dict(sb)
        self.event(f"[{i}] split brain: {json.dumps(d['split_brain'])}")
        keep, lose = (new, old) if st.variant.endswith("keep_new") else (old, new)
        keep_addr = c.address(keep)
        dry = await self._resolve(i, keep_addr, dry_run=True)
        if dry is None:
            return
        real = await self._resolve(i, keep_addr, dry_run=False)
        if real is None:
            return
        t_done = self.now()
        extents = tuple((int(e.offset), int(e.length)) for e in real.discarded_extents)
        if real.discarded != c.address(lose):
            self._fail(f"[{i}] Resolve(keep={keep_addr}) discarded {real.discarded!r}, not {c.address(lose)}")
        # When could the discarded node acknowledge a write after the split?
        # The old primary: from the split (it died before the promotion); the
        # promoted node: from its promotion; both until the resolve fenced it
        # (a reply may arrive a little after the resolve's answer).
        t_from = t_split if lose == old else t_promote
        self.discards.append(Discard(c.address(lose), extents, t_from, t_done + 5.0, t_split,
                                     int(real.discard_snapshot_id)))
        self.result.discarded_bytes += int(real.discarded_bytes)
        self.result.resolves.append({
            "step": i, "keep": keep, "discarded": lose, "discarded_bytes": int(real.discarded_bytes),
            "discarded_extents": len(extents), "discarded_exact": bool(real.discarded_exact),
            "dry_run_bytes": int(dry.discarded_bytes), "discard_snapshot": real.discard_snapshot,
            "kept_changed_bytes": int(real.kept_changed_bytes), "primary": real.primary,
        })
        if not real.discarded_exact:
            self._fail(f"[{i}] the real Resolve's figures are not exact (discarded_exact false): {real.message}")

    async def _resolve(self, i: int, keep: str, *, dry_run: bool) -> pb.ResolveReply | None:
        """CoordinatorService.Resolve, retried (bounded) while refused because
        a node has not reported the split brain yet; a failure fails the run."""
        assert self.cluster is not None
        what = f"Resolve(keep={keep}{', dry run' if dry_run else ''})"
        deadline = time.monotonic() + STATE_WAIT_S
        while True:
            try:
                async with rpc.channel(await self._leader_addr()) as ch:
                    r: pb.ResolveReply = await pbg.CoordinatorServiceStub(ch).Resolve(
                        pb.ResolveRequest(volume=VOLUME, keep=keep, dry_run=dry_run), timeout=30.0)
                self.event(f"[{i}] {what}: discards {r.discarded_bytes} bytes of {r.discarded} in "
                           f"{len(r.discarded_extents)} extents (exact: {r.discarded_exact}); "
                           f"{r.message[:300]}")
                return r
            except grpc.RpcError as e:
                code, details = e.code(), e.details() or ""
                retry = code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE,
                                 grpc.StatusCode.DEADLINE_EXCEEDED)
                if not retry or time.monotonic() > deadline:
                    self._fail(f"[{i}] {what} failed ({code.name}): {details}")
                    return None
                self.event(f"[{i}] {what} refused for now ({code.name}): {details[:200]}")
                await asyncio.sleep(0.5)

    async def _leader_addr(self) -> str:
        """The address to send a raw coordinator RPC to (the leader's, in the etcd mode)."""
        assert self.cluster is not None
        if self.etcd is not None:
            with contextlib.suppress(sc.ClientError):
                await self._refresh_leader()
        return self.cluster.address(self.leader)

    async def _probe_resolve(self) -> str:
        """Why Resolve cannot be used here ("" = it can): a dry run for a volume
        that does not exist answers NOT_FOUND where Resolve is implemented."""
        assert self.cluster is not None
        try:
            async with rpc.channel(await self._leader_addr()) as ch:
                await pbg.CoordinatorServiceStub(ch).Resolve(
                    pb.ResolveRequest(volume="nemesis-probe-no-such-volume", keep="none:0", dry_run=True),
                    timeout=5.0)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                return "the coordinator does not implement Resolve (UNIMPLEMENTED)"
        return ""

    async def _read_discard_snapshots(self) -> None:
        """Each resolve's discard snapshot (the discarded node's state at the
        resolve), decoded block -> version, for ``Discard.covers``."""
        c = self.cluster
        assert c is not None
        by_addr = {a: n for n, a in c.addresses.items()}
        for d in self.discards:
            try:
                data = await sc.read_local(d.node, VOLUME, 0, VOLUME_SIZE, d.snapshot_id, timeout_s=20.0)
            except sc.ClientError as e:
                self.event(f"cannot read the discard snapshot {d.snapshot_id} of {by_addr.get(d.node, d.node)}: {e}; "
                           "writes whose node is not known are not accounted as discarded")
                continue
            for b, block in blocks_from_bytes(data, 0, BLOCK, range(VOLUME_SIZE // BLOCK)).items():
                dec = decode_block(block, self.sched.seed, b * BLOCK, BLOCK)
                if dec.kind == "block":
                    d.versions[b] = dec.version

    def _accounted(self, h: History) -> tuple[History, int]:
        """``h`` with the acknowledged writes an operator discarded with
        Resolve marked DISCARDED, and how many: exactly those that lie inside
        a resolve's reported discarded extents and were acknowledged by the
        discarded node after the split (Discard.covers). Every other
        acknowledged write must be in the final volume."""
        w = self.workload
        if not self.discards or w is None:
            return h, 0

        def gone(o: Op) -> bool:
            return any(d.covers(o, w.acked_by.get((o.writer, o.version), "")) for d in self.discards)
        out = _relabel(h, gone)
        return out, sum(1 for o in out.ops if o.status == DISCARDED)

    async def _heal_all(self) -> None:
        c = self.cluster
        assert c is not None
        if self.net is not None:
            await asyncio.to_thread(self.net.heal_all)
        for f in list(self.fillers):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
        self.fillers.clear()
        for name, pid in list(self.stopped.items()):
            if c.is_running(name) and c.pid(name) == pid:
                c.resume(name)
        self.stopped.clear()
        for name, why in list(self.held.items()):
            self.event(f"heal: {name} returns ({why})" + (" -- old primary returning" if "primary" in why else ""))
        self.held.clear()
        for m in sorted(self.etcd_down):
            await self._restart_etcd_member(m, -1)
        for name in self.nodes:
            await self._ensure_running(name, -1)

    # ------------------------------------------------------------ checks
    async def _check(self, verify: bool) -> None:
        c = self.cluster
        w = self.workload
        assert c is not None and w is not None
        r = self.result
        r.acked, r.indeterminate = w.history.acked, w.history.indeterminate
        if self.etcd is not None:
            await self._check_one_leader()
        # What an operator discarded with Resolve is not a lost write (exactly
        # that: see _accounted); every other acknowledged write must be there.
        await self._read_discard_snapshots()
        h, r.discarded_writes = self._accounted(w.history)
        if self.discards:
            self.event(f"resolve accounting: {r.discarded_writes} acknowledged writes lie inside the discarded "
                       f"extents and were acknowledged by the discarded node after the split")
        # (2) every block on the final primary (whoever it is now): the
        # touched ones hold an allowed version, the others still zeros (a
        # write that landed at the wrong offset shows there too).
        roles = await self._refresh_roles()
        data = await sc.read_local(c.address(roles["primary"]), VOLUME, 0, VOLUME_SIZE, timeout_s=20.0)
        rep = check_blocks(h, blocks_from_bytes(data, 0, BLOCK, range(VOLUME_SIZE // BLOCK)))
        r.lost_blocks, r.garbage_blocks = rep.lost, rep.garbage
        lost_ops = set()
        index = {b: ops for b, ops in h.by_block().items()}
        for f in rep.findings:
            if f.kind == "lost":
                acked = [o for o in index.get(f.block, []) if o.status == "ok"]
                if acked:
                    lost_ops.add((acked[-1].writer, acked[-1].version))
        r.lost_writes = len(lost_ops)
        self.event(f"primary check ({roles['primary']}): {rep.summary().splitlines()[0]}")
        if not rep.ok:
            ops = h.op_index()
            who = "; ".join(
                f"w{k[0]}v{k[1]} acked at t={ops[k].t_done:.3f} by {w.acked_by.get(k) or 'a node not known'}"
                for k in sorted(lost_ops)[:8])
            self._fail("primary content: " + rep.summary() + (f"\n  lost writes: {who}" if who else ""))
        # (3) syncrep verify: primary == secondary (only meaningful in sync).
        if verify:
            for attempt in range(1, VERIFY_ATTEMPTS + 1):
                before = await self._in_sync_now()
                identical, text = await self._verify()
                after = await self._in_sync_now()
                self.event(f"verify: {text.splitlines()[0] if text else '?'}")
                if identical or (before and after == before) or attempt == VERIFY_ATTEMPTS:
                    break
                # Not in sync the whole time (the pair degraded meanwhile): a
                # difference proves nothing. Wait for in sync again and re-verify.
                self.event(f"the pair left in_sync around the verify (epoch {before} -> {after}); verifying again")
                if await self._wait_in_sync(IN_SYNC_TIMEOUT_S, stable_s=STABLE_IN_SYNC_S) is None:
                    self._fail(f"the pair did not get back in sync for a verify: {await self._status_text()}")
                    break
            r.divergent = 0 if identical else 1
            if not identical:
                self._fail(f"replicas differ while in sync (epoch {before}): {text}")
            # (3b) the periodic common snapshots are consistency points: the
            # same name must hold the same content on both nodes.
            bad = await self._check_common_snapshots()
            r.divergent += len(bad)  # a snapshot pair that differs is a divergent replica too
            if bad:
                self._fail(f"common snapshots differ between primary and secondary: {', '.join(bad)}")
        # (4) the secondary's rollback points. One read after a forced
        # promote's split is a state of either side's history: writes
        # acknowledged after the split by either side are indeterminate there.
        split = min((d.t_diverged for d in self.discards), default=math.inf)
        for name, t, blocks in self.captures:
            hh = h if t < split else _relabel(h, lambda o: o.status == OK and o.t_done > split)
            rr = check_rollback_point(hh, blocks, name=name, captured_at=t)
            r.rollback_checked += 1
            self.event(rr.summary().splitlines()[0])
            if not rr.ok:
                r.rollback_bad += 1
                self._fail(rr.summary())

    async def _check_common_snapshots(self) -> list[str]:
        assert self.cluster is not None

        async def snaps(addr: str) -> dict[str, int]:
            async with rpc.channel(addr) as ch:
                rep = await pbg.NodeServiceStub(ch).ListSnapshots(pb.ListSnapshotsRequest(volume=VOLUME), timeout=5)
            return {x.name: x.id for x in rep.snapshots if x.name.startswith("common-")}

        p, s = await asyncio.gather(snaps(self.cluster.primary_addr), snaps(self.cluster.secondary_addr))
        bad = []
        for name in sorted(set(p) & set(s)):
            try:
                a, b = await asyncio.gather(sc.checksum(self.cluster.primary_addr, VOLUME, snapshot_id=p[name]),
                                            sc.checksum(self.cluster.secondary_addr, VOLUME, snapshot_id=s[name]))
            except sc.ClientError:
                continue  # pruned meanwhile
            if a != b:
                bad.append(name)
        self.event(f"common snapshots: {len(set(p) & set(s))} on both nodes, {len(bad)} differ")
        return bad

    async def _verify(self) -> tuple[bool, str]:
        assert self.cluster is not None
        cmd = [sys.executable, "-m", "syncrep", "verify", VOLUME, "--coordinator", self.cluster.coordinator_addr,
               "--json", *self.cluster.security_args()]
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        if proc.returncode in (0, 1):
            try:
                d = json.loads(out)
                if d.get("identical"):
                    return True, f"syncrep verify: identical ({d['chunks']} chunks)"
                return False, f"syncrep verify: {d['mismatch_count']} extents differ: {d['mismatches'][:5]}"
            except (ValueError, KeyError):
                pass
        # The CLI could not run: compare per-chunk checksums directly.
        text = (err or out).decode(errors="replace").strip()
        p, s = await asyncio.gather(sc.checksum(self.cluster.address(self.roles["primary"]), VOLUME),
                                    sc.checksum(self.cluster.address(self.roles["secondary"]), VOLUME))
        bad = [i for i, (a, b) in enumerate(zip(p, s, strict=True)) if a != b]
        return not bad, f"checksums ({'syncrep verify failed: ' + text[:200] if text else ''}): {len(bad)} chunks differ"

    async def _teardown(self) -> None:
        if self.net is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.net.heal_all)
        if self.cluster is not None:
            for name, pid in list(self.stopped.items()):
                with contextlib.suppress(Exception):
                    if self.cluster.pid(name) == pid:
                        self.cluster.resume(name)
            await self.cluster.close()
        if self.etcd is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.etcd.close)
        for disk in self.disk_dirs.values():
            netns.umount(disk)


async def run_inner(sched: Schedule, workdir: Path, net: netns.TestNet | None, mode: str,
                    failover_faults: bool = False) -> RunResult:
    runner = Runner(sched, workdir, net, mode, failover_faults)
    main = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if main is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, main.cancel)
    try:
        return await runner.run()
    except asyncio.CancelledError:
        runner.result.failure = runner.result.failure or "runner interrupted (SIGTERM: timed out?)"
        return runner.result


# ================================================================ outer: one seed

#: Runners in progress (so an interrupted multi-job run can stop them all).
_RUNNING: set[subprocess.Popen[bytes]] = set()


def run_seed(
    seed: int,
    *,
    schedule_s: float = DEFAULT_SCHEDULE_S,
    workroot: Path | None = None,
    use_netns: bool | None = None,
    keep: bool = False,
    timeout_s: float | None = None,
    failover: bool = True,
    store: str = "sqlite",
) -> RunResult:
    """Run the schedule of ``seed`` on fresh test hosts (or loopback) and
    return its result. ``use_netns``: None = when available. ``failover``:
    the schedule may hold a failover episode (``generate_schedule``);
    ``store`` "etcd": the etcd mode (the module docstring)."""
    sched = generate_schedule(seed, schedule_s, failover=failover, store=store)
    root = Path(workroot) if workroot is not None else Path(tempfile.mkdtemp(prefix="syncrep-nemesis-"))
    workdir = root / f"seed-{seed}"
    if workdir.exists():
        shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    netns.sweep_stale_mounts()
    ok, why = netns.netns_available() if use_netns is not False else (False, "loopback requested")
    if use_netns and not ok:
        raise netns.NetnsError(why)
    net = (netns.TestNet(ETCD_HOSTS) if store == "etcd" else netns.TestNet()).open() if ok else None
    mode = "netns" if net is not None else f"loopback ({why})"
    result_path = workdir / "result.json"
    cmd = [sys.executable, "-m", "deploy.nemesis", "--inner", "--seed", str(seed),
           "--schedule-s", f"{schedule_s:g}", "--workdir", str(workdir), "--mode", mode]
    if not failover:
        cmd.append("--no-failover")
    if store != "sqlite":
        cmd += ["--store", store]
    if net is not None:
        cmd = [*net.exec_prefix("client"), *cmd, "--net", json.dumps(net.to_json())]
    limit = timeout_s or (schedule_s + IN_SYNC_TIMEOUT_S + 150 + (FAILOVER_EXTRA_S if sched.failover else 0)
                          + (ETCD_EXTRA_S if store == "etcd" else 0))
    env = dict(os.environ)
    root_dir = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (root_dir, env.get("PYTHONPATH", "")) if x)
    env["PYTHONUNBUFFERED"] = "1"
    t0 = time.monotonic()
    proc: subprocess.Popen[bytes] | None = None
    try:
        with open(workdir / "runner.log", "ab") as logf:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, cwd=root_dir, start_new_session=True)
            _RUNNING.add(proc)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=limit)
        if result_path.exists():
            result = RunResult.from_json(json.loads(result_path.read_text()))
        else:
            result = RunResult(seed, sched.to_json(), failure=f"the runner exited with {proc.returncode} and "
                               f"no result (see {workdir / 'runner.log'})", workdir=str(workdir), mode=mode,
                               schedule_s=schedule_s, failover_faults=failover, store=store)
            for name in (*(ETCD_NODES if store == "etcd" else NODES), "runner"):
                result.logs[name] = str(workdir / f"{name}.log")
        if time.monotonic() - t0 >= limit:
            result.failure = (result.failure + "; " if result.failure else "") + f"runner timed out after {limit:g} s"
            result.ok = False
    finally:
        _RUNNING.discard(proc)  # type: ignore[arg-type]
        if proc is not None and proc.poll() is None:
            # Timed out or interrupted: the runner tears its cluster down on SIGTERM.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        if net is not None:
            net.close()
    if result.ok and not keep:
        shutil.rmtree(workdir, ignore_errors=True)
        if workroot is None:
            shutil.rmtree(root, ignore_errors=True)
    return result


# ================================================================ summary


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = max(0, min(len(v) - 1, math.ceil(q * len(v)) - 1))
    return v[k]


def summary_table(results: Sequence[RunResult], wall_s: float | None = None) -> str:
    faults: Counter[str] = Counter()
    for r in results:
        faults.update(r.faults)
    times = [r.time_to_in_sync_s for r in results if r.time_to_in_sync_s is not None]
    failed = [r for r in results if not r.ok]
    skipped = {k: v for r in results for k, v in r.skipped.items()}
    p50, p99 = _pct(times, 0.50), _pct(times, 0.99)
    rows = [
        ("schedules run", f"{len(results)} ({len(results) - len(failed)} passed, {len(failed)} failed)"),
        ("faults injected", str(sum(faults.values()))),
        *((f"  {k}", str(faults.get(k, 0))) for k in ALL_KINDS
          if k not in ETCD_KINDS or any(r.store == "etcd" for r in results)),
        ("writes acknowledged", str(sum(r.acked for r in results))),
        ("writes indeterminate", str(sum(r.indeterminate for r in results))),
        ("writes lost", str(sum(r.lost_writes for r in results))),
        ("writes discarded by resolve", f"{sum(r.discarded_writes for r in results)} "
                                        f"({sum(r.discarded_bytes for r in results)} bytes reported discarded, "
                                        f"{sum(len(r.resolves) for r in results)} resolves)"),
        ("promotions", str(sum(r.promotions for r in results))),
        ("garbage blocks", str(sum(r.garbage_blocks for r in results))),
        ("divergent replicas", str(sum(r.divergent for r in results))),
        ("rollback points checked", f"{sum(r.rollback_checked for r in results)} "
                                    f"(not crash-consistent: {sum(r.rollback_bad for r in results)})"),
        ("time to in_sync p50/p99", "-" if p50 is None or p99 is None else f"{p50:.2f} s / {p99:.2f} s"),
    ]
    if wall_s is not None:
        rows.append(("wall time", f"{wall_s:.0f} s"))
    if failed:
        rows.append(("failed seeds", " ".join(str(r.seed) for r in failed)))
    if skipped:
        rows.append(("skipped fault kinds", "; ".join(f"{k}: {v}" for k, v in skipped.items())))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# ================================================================ CLI


def _duration(text: str) -> float:
    t = text.strip().lower()
    mult = {"s": 1, "m": 60, "h": 3600}
    if t and t[-1] in mult:
        return float(t[:-1]) * mult[t[-1]]
    return float(t)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m deploy.nemesis",
        description="Seeded fault schedules (crash, hang, partition, link down, disk full; and failover: primary "
        "lost, primary isolated, promote during resync, replaced disk, forced promote and resolve) against a "
        "coordinator, a primary and a secondary on separate test hosts (network namespaces; loopback "
        "when unavailable), with a workload and a checker. Prints a summary table.",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--seed", type=int, action="append", default=None,
                   help="run this seed's schedule (repeatable): the same cluster options and the same "
                        "faults at the same times (the cluster's own timing is not replayed)")
    g.add_argument("--seeds", type=int, default=None, metavar="N", help="run N random schedules")
    g.add_argument("--duration", type=_duration, default=None, metavar="T",
                   help="run random schedules until T has passed (e.g. 600, 10m, 1h)")
    p.add_argument("--first-seed", type=int, default=None, metavar="K",
                   help="with --seeds/--duration: seeds K, K+1, ... (default: random)")
    p.add_argument("--schedule-s", type=float, default=DEFAULT_SCHEDULE_S, metavar="S",
                   help="length of each schedule in seconds (part of what a seed replays)")
    p.add_argument("--workdir", type=Path, default=None, help="root directory for the runs' data and logs")
    p.add_argument("--keep", action="store_true", help="keep the data and logs of passing runs too")
    p.add_argument("--loopback", action="store_true", help="do not use network namespaces")
    p.add_argument("--jobs", type=int, default=1, metavar="J",
                   help="run J schedules at once (each on its own test hosts)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write every result to FILE (JSON lines)")
    p.add_argument("--print-schedule", action="store_true", help="print the schedule(s) and exit")
    p.add_argument("--summarize", type=Path, nargs="+", default=None, metavar="FILE",
                   help="print the summary table of results saved with --json (several runs together) and exit")
    p.add_argument("--no-failover", action="store_true",
                   help="plain fault kinds only: no failover episode (lose_primary, isolate_primary, "
                        "promote_during_resync, replace_disk, forced_promote); a seed's schedule is then what "
                        "it was before those existed")
    p.add_argument("--store", choices=("sqlite", "etcd"), default="sqlite",
                   help="etcd: 3 coordinators on a 3-member etcd, each on its own test host, and faults of the "
                        "control plane too (leader/follower killed, leader stopped, leader cut from etcd, an etcd "
                        "member killed); the default schedules' faults stay as they are")
    p.add_argument("--log-level", default="WARNING")
    # Internal: the runner, started on the client host by the outer process.
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--net", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="", help=argparse.SUPPRESS)
    return p


def _inner_main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s runner %(name)s: %(message)s")
    seed = args.seed[0]
    sched = generate_schedule(seed, args.schedule_s, failover=not args.no_failover, store=args.store)
    net = netns.TestNet.attach(json.loads(args.net)) if args.net else None
    result = asyncio.run(run_inner(sched, args.workdir, net, args.mode, not args.no_failover))
    tmp = args.workdir / "result.json.tmp"
    tmp.write_text(json.dumps(result.to_json()))
    tmp.replace(args.workdir / "result.json")
    print(result.report(), flush=True)
    return 0 if result.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.inner:
        return _inner_main(args)
    def _terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds: every run's teardown (namespaces, processes) runs

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.WARNING), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    first = args.first_seed if args.first_seed is not None else random.SystemRandom().randrange(1 << 31)
    seeds: Callable[[int], int | None]
    if args.seed:
        fixed = list(args.seed)
        seeds = lambda i: fixed[i] if i < len(fixed) else None  # noqa: E731
    elif args.seeds is not None:
        seeds = lambda i: first + i if i < args.seeds else None  # noqa: E731
    else:
        seeds = lambda i: first + i  # noqa: E731
    if args.summarize:
        saved = [RunResult.from_json(json.loads(line)) for f in args.summarize
                 for line in f.read_text().splitlines() if line.strip()]
        print(summary_table(saved))
        return 0 if saved and all(r.ok for r in saved) else 1
    if args.print_schedule:
        i = 0
        while (s := seeds(i)) is not None and i < 1000:
            print(generate_schedule(s, args.schedule_s, failover=not args.no_failover, store=args.store).describe())
            i += 1
        return 0
    deadline = time.monotonic() + args.duration if args.duration else None
    if args.seeds is None and not args.seed and deadline is None:
        seeds = lambda i: first if i == 0 else None  # noqa: E731
    results: list[RunResult] = []
    t0 = time.monotonic()
    workroot = args.workdir or Path(tempfile.mkdtemp(prefix="syncrep-nemesis-"))
    print(f"nemesis: data and logs under {workroot}", flush=True)
    lock = threading.Lock()
    counter = itertools.count()

    def next_seed() -> int | None:
        with lock:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            return seeds(next(counter))

    def worker() -> None:
        while (seed := next_seed()) is not None:
            r = run_seed(seed, schedule_s=args.schedule_s, workroot=workroot,
                         use_netns=False if args.loopback else None, keep=args.keep, failover=not args.no_failover,
                         store=args.store)
            faults = sum(r.faults.values())
            tis = "-" if r.time_to_in_sync_s is None else f"{r.time_to_in_sync_s:.2f}s"
            with lock:
                results.append(r)
                print(f"[{len(results)}] seed {seed}: {'ok  ' if r.ok else 'FAIL'} {r.elapsed_s:6.1f}s faults "
                      f"{faults:2d} acked {r.acked:5d} lost {r.lost_writes} divergent {r.divergent} in_sync "
                      f"after {tis}", flush=True)
                if not r.ok:
                    print(r.report(), flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(r.to_json()) + "\n")

    threads = [threading.Thread(target=worker, name=f"nemesis-{j}", daemon=True) for j in range(max(1, args.jobs))]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.5)
    except BaseException:
        # Interrupted: no new schedules; the runs in progress tear down (their
        # runners get SIGTERM, then each run deletes its test hosts).
        with lock:
            deadline = time.monotonic()
        for proc in list(_RUNNING):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for t in threads:
            t.join(60)
        raise
    print()
    print(summary_table(results, time.monotonic() - t0))
    return 0 if results and all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
