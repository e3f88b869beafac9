"""The nemesis: seeded fault schedules against a real cluster on separate test hosts.

    python -m deploy.nemesis --seed 1234             # replay one schedule
    python -m deploy.nemesis --seeds 200             # 200 random schedules, then a summary table
    python -m deploy.nemesis --duration 10m          # random schedules until 10 minutes are up

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
   on the primary, ``syncrep verify`` (primary == secondary; repeated if the
   pair left in_sync during the verify), the periodic common snapshots
   identical on both nodes, and the crash consistency of every
   ``pre-resync-*`` rollback point it managed to read from the secondary
   during the run.

A failure prints the seed, the schedule, what happened when, and the path of
every node's log; ``--seed S`` (with the same ``--schedule-s``) replays it.
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
from deploy.workload import Workload, blocks_from_bytes, check_blocks, split_regions
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
KINDS = ("crash", "hang", "partition", "partition_oneway", "link_down", "disk_full")
TRIGGERS = ("time", "resyncing", "final", "snapshot")
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


# ================================================================ schedules (pure)


@dataclass(frozen=True)
class Step:
    """One fault. ``target``: a node (crash, hang), a host (link_down), the
    first host of a partition (``peer`` the second; one-directional: packets
    from ``target`` to ``peer`` are dropped) or "secondary" (disk_full)."""

    at_s: float
    kind: str
    target: str
    duration_s: float
    peer: str = ""
    trigger: str = "time"

    def describe(self) -> str:
        what = {
            "crash": f"SIGKILL {self.target}, restart after {self.duration_s:.1f} s",
            "hang": f"SIGSTOP {self.target} for {self.duration_s:.1f} s",
            "partition": f"partition {self.target} <-> {self.peer} for {self.duration_s:.1f} s",
            "partition_oneway": f"drop {self.target} -> {self.peer} for {self.duration_s:.1f} s",
            "link_down": f"link of {self.target} down for {self.duration_s:.1f} s",
            "disk_full": f"secondary disk full for {self.duration_s:.1f} s",
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

    def describe(self) -> str:
        head = (f"seed {self.seed}: {self.schedule_s:g} s, resync {self.resync_mode}, "
                f"snapshot period {self.snapshot_period_s or 'off'}, resync rate {self.resync_max_rate}, "
                f"{self.writers} writers")
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


def generate_schedule(seed: int, schedule_s: float = DEFAULT_SCHEDULE_S) -> Schedule:
    """The schedule of ``seed`` (pure and deterministic: same seed and length,
    same schedule). Episodes: a fault, and often a second one while the pair
    recovers (on ``resyncing``), during the switch-back (on ``final``),
    overlapping the first, or right after a periodic snapshot."""
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
    return Schedule(seed, schedule_s, mode, period, rate, writers, tuple(steps))


# ================================================================ workload


def make_workload(coordinator: str, seed: int, writers: int, t0: float) -> Workload:
    """Sequential writers on disjoint regions through the primary (one shared
    write stream), every write self-describing and recorded in a history
    (:mod:`deploy.workload`). The writers' random streams depend on the seed
    only, so a replayed seed writes the same offsets and sizes."""

    async def connect() -> sc.VolumeClient:
        return await sc.VolumeClient.connect(coordinator, VOLUME, write_timeout_s=WRITE_TIMEOUT_S)

    return Workload(connect, seed=seed, regions=split_regions(VOLUME_SIZE, writers, BLOCK), block_size=BLOCK,
                    t0=t0)


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
    harness_errors: list[str] = field(default_factory=list)
    logs: dict[str, str] = field(default_factory=dict)
    workdir: str = ""
    mode: str = ""
    elapsed_s: float = 0.0
    schedule_s: float = DEFAULT_SCHEDULE_S

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunResult:
        known = set(cls.__dataclass_fields__)
        d = {k: v for k, v in d.items() if k in known}
        d["events"] = [tuple(e) for e in d.get("events", [])]
        return cls(**d)

    def report(self) -> str:
        sched = generate_schedule(self.seed, self.schedule_s)
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
        if self.harness_errors:
            lines.append("harness errors: " + "; ".join(self.harness_errors))
        lines.append("logs:")
        lines += [f"  {name:<12} {path}" for name, path in self.logs.items()]
        lines.append(f"replay: python -m deploy.nemesis --seed {self.seed} --schedule-s {self.schedule_s:g}")
        return "\n".join(lines)


class Runner:
    """Runs one schedule. Must run where every host is reachable (the client host)."""

    def __init__(self, sched: Schedule, workdir: Path, net: netns.TestNet | None, mode: str) -> None:
        self.sched = sched
        self.workdir = workdir
        self.net = net
        self.mode = mode
        self.t0 = self.t_start = time.monotonic()
        self.result = RunResult(sched.seed, sched.to_json(), workdir=str(workdir), mode=mode,
                                schedule_s=sched.schedule_s)
        self.cluster: LocalCluster | None = None
        self.workload: Workload | None = None
        self.state = ""
        self.state_seen: set[str] = set()
        self.captures: list[tuple[str, float, dict[int, bytes]]] = []
        self._captured: set[int] = set()
        self.disk_dir: Path | None = None
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
                "link_down": why_net, "disk_full": why_disk}

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
            self.disk_dir = self.workdir / "secondary"
            netns.mount_tmpfs(self.disk_dir, DISK_BYTES)
        node_args = ["--ack-timeout-s", "1.0", "--resync-max-rate", s.resync_max_rate]
        if s.snapshot_period_s:
            node_args += ["--snapshot-period-s", str(s.snapshot_period_s)]
        hosts = dict(self.net.hosts) if self.net is not None else None
        self.cluster = c = LocalCluster(
            self.workdir, primary_args=node_args, secondary_args=node_args, hosts=hosts,
            stop_grace_s=3.0, startup_timeout_s=30.0,
        )
        for name in NODES:
            self.result.logs[name] = str(c.log_path(name))
        self.result.logs["runner"] = str(self.workdir / "runner.log")
        await c.start()
        await c.create_volume(VOLUME, VOLUME_SIZE, BLOCK, resync_mode=s.resync_mode, timeout_s=40)
        self.t0 = time.monotonic()
        self.event(f"cluster up ({self.mode}): {c.addresses}; volume {VOLUME} in_sync")
        self.workload = make_workload(c.coordinator_addr, s.seed, s.writers, self.t0)
        await self.workload.start()
        monitor = asyncio.create_task(self._monitor(), name="monitor")
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
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)
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

    async def _capture_rollback_points(self) -> None:
        """Read every new pre-resync-* snapshot of the secondary (the rollback point)."""
        assert self.cluster is not None
        addr = self.cluster.secondary_addr
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
            rep = await sc.node_status(self.cluster.primary_addr, timeout_s=2.0)
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
        deadline = time.monotonic() + TRIGGER_TIMEOUT_S
        watcher = None
        if trigger == "final":
            watcher = LogWatcher(self.cluster.log_path("primary"), ", final)")
        elif trigger == "snapshot":
            watcher = LogWatcher(self.cluster.log_path("primary"), "common snapshot")
        while time.monotonic() < deadline:
            if trigger == "resyncing" and self.state == "resyncing":
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
                self.event(f"[{i}] {st.trigger} not seen within {TRIGGER_TIMEOUT_S:g} s; injecting anyway")
        why = caps.get(st.kind, "")
        if why:
            self.result.skipped[st.kind] = why
            self.event(f"[{i}] skipped {st.kind}: {why}")
            return
        self.faults[st.kind] += 1
        try:
            await getattr(self, f"_do_{st.kind}")(i, st)
        except Exception as e:
            log.exception("step %d failed", i)
            self.result.harness_errors.append(f"[{i}] {st.kind}: {type(e).__name__}: {e}")
            self.event(f"[{i}] {st.kind} could not be carried out: {e}")

    async def _do_crash(self, i: int, st: Step) -> None:
        c = self.cluster
        assert c is not None
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
        assert self.disk_dir is not None
        filler = self.disk_dir / f"filler-{i}"
        self.fillers.add(filler)
        n = await asyncio.to_thread(netns.fill_disk, self.disk_dir, filler.name)
        self.event(f"[{i}] secondary disk full (filler of {n >> 20} MiB)")
        await asyncio.sleep(st.duration_s)
        with contextlib.suppress(FileNotFoundError):
            filler.unlink()
        self.fillers.discard(filler)
        self.event(f"[{i}] secondary disk space freed")

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
        for name in NODES:
            await self._ensure_running(name, -1)

    # ------------------------------------------------------------ checks
    async def _check(self, verify: bool) -> None:
        c = self.cluster
        w = self.workload
        assert c is not None and w is not None
        h = w.history
        r = self.result
        r.acked, r.indeterminate = h.acked, h.indeterminate
        # (2) every block on the primary: the touched ones hold an allowed
        # version, the others still zeros (a write that landed at the wrong
        # offset shows there too).
        data = await sc.read_local(c.primary_addr, VOLUME, 0, VOLUME_SIZE, timeout_s=20.0)
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
        self.event(f"primary check: {rep.summary().splitlines()[0]}")
        if not rep.ok:
            self._fail("primary content: " + rep.summary())
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
        # (4) the secondary's rollback points.
        for name, t, blocks in self.captures:
            rr = check_rollback_point(h, blocks, name=name, captured_at=t)
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
               "--json"]
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
        p, s = await asyncio.gather(sc.checksum(self.cluster.primary_addr, VOLUME),
                                    sc.checksum(self.cluster.secondary_addr, VOLUME))
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
        if self.disk_dir is not None:
            netns.umount(self.disk_dir)


async def run_inner(sched: Schedule, workdir: Path, net: netns.TestNet | None, mode: str) -> RunResult:
    runner = Runner(sched, workdir, net, mode)
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
) -> RunResult:
    """Run the schedule of ``seed`` on fresh test hosts (or loopback) and
    return its result. ``use_netns``: None = when available."""
    sched = generate_schedule(seed, schedule_s)
    root = Path(workroot) if workroot is not None else Path(tempfile.mkdtemp(prefix="syncrep-nemesis-"))
    workdir = root / f"seed-{seed}"
    if workdir.exists():
        shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    netns.sweep_stale_mounts()
    ok, why = netns.netns_available() if use_netns is not False else (False, "loopback requested")
    if use_netns and not ok:
        raise netns.NetnsError(why)
    net = netns.TestNet().open() if ok else None
    mode = "netns" if net is not None else f"loopback ({why})"
    result_path = workdir / "result.json"
    cmd = [sys.executable, "-m", "deploy.nemesis", "--inner", "--seed", str(seed),
           "--schedule-s", f"{schedule_s:g}", "--workdir", str(workdir), "--mode", mode]
    if net is not None:
        cmd = [*net.exec_prefix("client"), *cmd, "--net", json.dumps(net.to_json())]
    limit = timeout_s or schedule_s + IN_SYNC_TIMEOUT_S + 150
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
                               schedule_s=schedule_s)
            for name in (*NODES, "runner"):
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
        *((f"  {k}", str(faults.get(k, 0))) for k in KINDS),
        ("writes acknowledged", str(sum(r.acked for r in results))),
        ("writes indeterminate", str(sum(r.indeterminate for r in results))),
        ("writes lost", str(sum(r.lost_writes for r in results))),
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
        description="Seeded fault schedules (crash, hang, partition, link down, disk full) against a "
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
    sched = generate_schedule(seed, args.schedule_s)
    net = netns.TestNet.attach(json.loads(args.net)) if args.net else None
    result = asyncio.run(run_inner(sched, args.workdir, net, args.mode))
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
            print(generate_schedule(s, args.schedule_s).describe())
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
                         use_netns=False if args.loopback else None, keep=args.keep)
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
