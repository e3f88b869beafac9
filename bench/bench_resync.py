"""Benchmark: recovery after a secondary outage (resync by snapshot diffs).

    python bench/bench_resync.py [--quick] [--size 4GiB] [--cycles N]

Part 1 — resync cost. For each variant (A = ``rewrite``, B = ``direct``, chosen at
volume create) and each dirty fraction (1 %, 10 %, 50 % of the volume's blocks),
on a fresh LocalCluster (real processes, ``--durability sync`` unless told
otherwise) with a sparse volume of ``--size`` (default 4 GiB; ``--quick`` 512 MiB):

1. create the volume; write initial data (in sync) over the first dirty chunks;
2. start a QD16 writer of 1 MiB writes over the first dirty chunks and, while it
   runs, ``kill -9`` the secondary: the writes in flight become the failed
   extents; the primary goes degraded and takes the fault-recovery snapshot;
3. stop that writer, then dirty X % of the blocks with 1 MiB writes at QD16 —
   *strided* by default (1 MiB chunk i*N/k for i < k, evenly spread, no
   overlap; ``--pattern random`` samples chunks without replacement). The
   failed extents lie inside the dirty chunks, so the minimum a resync must
   send is the dirty bytes (variant A) or dirty + failed bytes (variant B,
   which sends the failed extents and then the diff);
4. wait until the coordinator counts the secondary dead (so the restart is a
   return, not a blip), restart it, and time restart -> ``in_sync`` (GetVolume
   polled every 50 ms); bytes sent = delta of the primary's
   ``resync_bytes_sent`` (NodeStatus of the primary, the source of
   ``VolumeStatus.resync_bytes_sent``); verify both copies by checksums.

Baseline: a full copy — on a fresh in-sync volume of the same size,
``NodeService.Repair`` of the extent [0, size) on the primary, which streams
every block of the volume over the same Resync path (kind "repair") to the
secondary, which applies it. Reference rate: the 1 MiB single-hop gRPC stream
ceiling (bench/_harness.AckServer, QD64, measured in this run).

Part 2 — write stalls. One cluster, a background writer process at QD1 (4 KiB)
recording every write's latency; ``--cycles`` times (default 10, ``--quick`` 4):
kill -9 the secondary, dirty 16 MiB, wait for it to be counted dead, restart it,
wait for in_sync. Stall at fault-snapshot time and at switch-back: the primary's
``last_stall_ms`` (NodeStatus, read right after each event), its log lines
("... write stall X ms", "switch-back write stall X ms"), and the client's view:
the longest QD1 write overlapping the event.

Targets (PASS/FAIL printed, nothing asserted): bytes sent / (dirty + failed)
<= 1.01; resync throughput >= 0.7x the 1 MiB stream ceiling; stalls <= 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _harness as h
from _harness import GiB, MiB

from deploy.cluster import LocalCluster
from syncrep import client as sc
from syncrep import rpc
from syncrep.pb import syncrep_pb2 as pb
from syncrep.pb import syncrep_pb2_grpc as pb_grpc

VOLUME = "rsvol"
POLL_S = 0.05
STALL_TARGET_MS = 50.0
BYTES_TARGET = 1.01
RATE_TARGET = 0.7

IN_SYNC = sc.STATE_VALUES["in_sync"]
DEGRADED = sc.STATE_VALUES["degraded"]
RESYNCING = sc.STATE_VALUES["resyncing"]


# ---------------------------------------------------------------- helpers


class Coord:
    """A persistent channel to the coordinator for cheap 50 ms polling."""

    def __init__(self, address: str) -> None:
        self.ch = rpc.channel(address)
        self.stub = pb_grpc.CoordinatorServiceStub(self.ch)

    async def get(self) -> pb.VolumeStatus:
        return await self.stub.GetVolume(pb.GetVolumeRequest(name=VOLUME), timeout=5.0)

    async def wait(self, pred: Any, timeout_s: float, what: str) -> tuple[pb.VolumeStatus, float]:
        deadline = time.perf_counter() + timeout_s
        while True:
            st = await self.get()
            if pred(st):
                return st, time.perf_counter()
            if time.perf_counter() > deadline:
                raise TimeoutError(
                    f"{what}: not reached within {timeout_s:g} s (state "
                    f"{sc.STATE_NAMES.get(st.state)}, last_error {st.last_error!r})"
                )
            await asyncio.sleep(POLL_S)

    async def close(self) -> None:
        await self.ch.close()


async def primary_report(c: LocalCluster) -> pb.VolumeReport:
    st = await sc.node_status(c.primary_addr)
    for v in st.volumes:
        if v.name == VOLUME:
            return v
    raise RuntimeError(f"the primary reports no volume {VOLUME!r}")


async def write_offsets(addr: str, offsets: list[int], size: int, qd: int) -> float:
    """Write ``size`` bytes at each offset, ``qd`` in flight; returns seconds."""
    payload = os.urandom(size)
    stream = h.WriteStream(addr, VOLUME)
    it = iter(offsets)
    t0 = time.perf_counter()

    async def worker() -> None:
        for off in it:
            await stream.write(off, payload)

    try:
        await asyncio.gather(*(worker() for _ in range(qd)))
    finally:
        await stream.close()
    return time.perf_counter() - t0


def pick_chunks(n_chunks: int, k: int, pattern: str, seed: int) -> list[int]:
    if k >= n_chunks:
        return list(range(n_chunks))
    if pattern == "random":
        return sorted(random.Random(seed).sample(range(n_chunks), k))
    return [i * n_chunks // k for i in range(k)]


async def verify(c: LocalCluster) -> str:
    a, b = await asyncio.gather(sc.checksum(c.primary_addr, VOLUME), sc.checksum(c.secondary_addr, VOLUME))
    if a == b:
        return "equal"
    diff = sum(1 for x, y in zip(a, b, strict=False) if x != y)
    return f"DIFFER ({diff} MiB chunks)"


_BACK_IN_SYNC = re.compile(
    r"back in sync at epoch (\d+) after ([\d.]+) s; resync sent (\d+) bytes in (\d+) rounds.*"
    r"switch-back write stall ([\d.]+) ms"
)
_DEGRADED = re.compile(r"degraded: .*write stall ([\d.]+) ms")
_ROUND = re.compile(r"resync \S+ round (\d+) \((\w+)(, final)?\): (\d+) bytes in (\d+) chunks")
# The secondary's "resync <id> complete" line: logged when the final round is
# applied, before it answers (its pre-resync snapshot is released later, when replication reopens).
_RELEASED = r"resync \S+ complete"


@dataclass
class SwitchBack:
    """The last switch-back after ``since``, from the two nodes' log timestamps (ms resolution)."""

    final_bytes: int = 0
    final_chunks: int = 0
    to_secondary_done_ms: float = float("nan")  # primary 'final round' line -> secondary 'released' line
    to_back_ms: float = float("nan")  # secondary 'released' line -> primary 'back in sync' line

    def text(self) -> str:
        return (
            f"final round {h.fmt_size(self.final_bytes)}/{self.final_chunks} chunks; "
            f"final-round start->secondary done {self.to_secondary_done_ms:.0f} ms, ->back in sync "
            f"{self.to_back_ms:.0f} ms"
        )


def switch_back(c: LocalCluster, since: float) -> SwitchBack:
    sb = SwitchBack()
    finals = [
        (ts, m)
        for ts, line in h.log_lines_since(c.log_path("primary"), since, _ROUND.pattern)
        if (m := _ROUND.search(line)) and m.group(3)
    ]
    released = [ts for ts, _ in h.log_lines_since(c.log_path("secondary"), since, _RELEASED)]
    back = [ts for ts, _ in h.log_lines_since(c.log_path("primary"), since, _BACK_IN_SYNC.pattern)]
    if finals:
        ts_f, m = finals[-1]
        sb.final_bytes, sb.final_chunks = int(m.group(4)), int(m.group(5))
        if released:
            sb.to_secondary_done_ms = (released[-1] - ts_f) * 1000
    if released and back:
        sb.to_back_ms = (back[-1] - released[-1]) * 1000
    return sb


# ---------------------------------------------------------------- part 1: one outage


@dataclass
class OutageResult:
    mode: str
    frac: float
    dirty_bytes: int = 0
    failed_bytes: int = 0
    dirty_s: float = 0.0
    restart_healthy_s: float = 0.0
    restart_resyncing_s: float | None = None
    restart_in_sync_s: float = 0.0
    primary_resync_s: float | None = None
    rounds: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    verify: str = ""
    degrade_stall_ms: float = 0.0
    switch_stall_ms: float = 0.0
    early_attempts: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # % of one core from healthy to in_sync
    sb: SwitchBack = field(default_factory=lambda: SwitchBack())
    error: str = ""


async def one_outage(mode: str, frac: float, args: argparse.Namespace, workdir: Path) -> OutageResult:
    res = OutageResult(mode, frac)
    node_args = ["--durability", args.durability]
    wd = workdir / f"{mode}-{frac * 100:g}pct"
    c = LocalCluster(wd, primary_args=node_args, secondary_args=node_args)
    coord: Coord | None = None
    try:
        await c.start()
        await c.create_volume(VOLUME, args.size, resync_mode=mode)
        coord = Coord(c.coordinator_addr)
        n_chunks = args.size // MiB
        k = max(1, round(frac * n_chunks))
        chunks = pick_chunks(n_chunks, k, args.pattern, seed=int(frac * 1000))
        offsets = [i * MiB for i in chunks]
        res.dirty_bytes = len(offsets) * MiB
        hot = offsets[: min(len(offsets), 64)]  # the in-flight writer's chunks (also the initial data)
        await write_offsets(c.primary_addr, hot, MiB, 16)

        # In-flight writes at the moment of the kill -> failed extents.
        stop = asyncio.Event()
        stream = h.WriteStream(c.primary_addr, VOLUME)
        payload = os.urandom(MiB)

        async def loader(j: int) -> None:
            i = j
            while not stop.is_set():
                with contextlib.suppress(Exception):
                    await stream.write(hot[i % len(hot)], payload)
                i += 16

        loaders = [asyncio.create_task(loader(j)) for j in range(16)]
        await asyncio.sleep(0.5)
        wall_kill = time.time()
        c.kill("secondary")
        st, _ = await coord.wait(lambda s: s.state == DEGRADED and s.fault_snapshot_id != 0, 30, "degraded")
        stop.set()
        await asyncio.gather(*loaders)
        await stream.close()
        st = await coord.get()
        res.failed_bytes = int(st.failed_bytes)
        res.degrade_stall_ms = (await primary_report(c)).last_stall_ms

        # Dirty X % of the blocks while the secondary is down (the hot chunks first).
        res.dirty_s = await write_offsets(c.primary_addr, offsets, MiB, 16)
        await coord.wait(lambda s: not s.secondary_alive, 30, "secondary counted dead")
        res.early_attempts = len(
            h.log_lines_since(c.log_path("coordinator"), wall_kill, r"resync attempt \d+")
        )
        sent0 = (await primary_report(c)).resync_bytes_sent

        # Restart and time the return to in_sync.
        wall_restart = time.time()
        t0 = time.perf_counter()
        await c.start_process("secondary")
        res.restart_healthy_s = time.perf_counter() - t0
        pids = {"primary": c.pid("primary"), "secondary": c.pid("secondary")}
        cpu0 = {k: h.cpu_seconds(v) for k, v in pids.items()} | {"all": h.machine_busy_seconds()}
        t_healthy = time.perf_counter()
        while True:
            st = await coord.get()
            now = time.perf_counter()
            if st.state == RESYNCING and res.restart_resyncing_s is None:
                res.restart_resyncing_s = now - t0
            if st.state == IN_SYNC and st.primary_alive and st.secondary_alive:
                res.restart_in_sync_s = now - t0
                break
            if now - t0 > args.resync_timeout:
                raise TimeoutError(
                    f"not in sync {args.resync_timeout:g} s after the restart "
                    f"(state {sc.STATE_NAMES.get(st.state)}, {st.last_error!r})"
                )
            await asyncio.sleep(POLL_S)
        span = max(1e-6, time.perf_counter() - t_healthy)
        cpu1 = {k: h.cpu_seconds(v) for k, v in pids.items()} | {"all": h.machine_busy_seconds()}
        res.cpu = {k: 100.0 * (cpu1[k] - cpu0[k]) / span for k in cpu0}
        rep = await primary_report(c)
        res.bytes_sent = int(rep.resync_bytes_sent) - int(sent0)
        res.switch_stall_ms = rep.last_stall_ms
        plog = c.log_path("primary")
        # StartResync (the primary's "new resync" / "resuming resync" line) -> "back in sync", from the
        # millisecond timestamps of the primary's log (its own "after X s" has one decimal).
        starts = h.log_lines_since(plog, wall_restart, r"(new|resuming) resync ")
        for ts, line in h.log_lines_since(plog, wall_restart, _BACK_IN_SYNC.pattern):
            m = _BACK_IN_SYNC.search(line)
            if m:
                began = [t for t, _ in starts if t <= ts]
                res.primary_resync_s = ts - began[-1] if began else float(m.group(2))
        for _, line in h.log_lines_since(plog, wall_restart, _ROUND.pattern):
            m = _ROUND.search(line)
            if m:
                res.rounds.append(
                    f"r{m.group(1)}:{m.group(2)[0]}{'F' if m.group(3) else ''}={int(m.group(4)) / MiB:.0f}M"
                )
        res.sb = switch_back(c, wall_restart)
        if args.verify:
            res.verify = await verify(c)
    except Exception as e:
        res.error = f"{type(e).__name__}: {e}"
        print(f"  ERROR in {mode} {frac:.0%}: {res.error} (logs: {wd})", flush=True)
    finally:
        if coord is not None:
            await coord.close()
        await c.close()
        if not args.keep and not res.error:
            shutil.rmtree(wd, ignore_errors=True)
    return res


async def full_copy(args: argparse.Namespace, workdir: Path, stride_mib: int = 1) -> tuple[float, int, str]:
    """Repair [0, size) on an in-sync volume: every block over the Resync path.
    The volume holds 1 MiB of data every ``stride_mib`` MiB first: 1 = every
    block written (the data path's baseline); 64 = sparse (the rest is holes,
    which travel as zero chunks without a payload, issue 14)."""
    node_args = ["--durability", args.durability]
    wd = workdir / f"full-copy-{stride_mib}"
    c = LocalCluster(wd, primary_args=node_args, secondary_args=node_args)
    err = ""
    try:
        await c.start()
        await c.create_volume(VOLUME, args.size)
        await write_offsets(c.primary_addr, [i * MiB for i in range(0, args.size // MiB, stride_mib)], MiB, 16)
        async with rpc.channel(c.primary_addr) as ch:
            t0 = time.perf_counter()
            reply = await pb_grpc.NodeServiceStub(ch).Repair(
                pb.RepairRequest(volume=VOLUME, extents=[pb.Extent(offset=0, length=args.size)]),
                timeout=args.resync_timeout,
            )
            secs = time.perf_counter() - t0
        if args.verify:
            v = await verify(c)
            if v != "equal":
                err = f"after the full copy the copies {v}"
        return secs, int(reply.bytes_sent), err
    finally:
        await c.close()
        if not args.keep:
            shutil.rmtree(wd, ignore_errors=True)


# ---------------------------------------------------------------- part 2: stall cycles


@dataclass
class Cycle:
    degrade_ms: float = float("nan")  # primary last_stall_ms right after degrade
    degrade_log_ms: float = float("nan")
    degrade_client_ms: float = float("nan")
    switch_ms: float = float("nan")
    switch_log_ms: float = float("nan")
    switch_client_ms: float = float("nan")
    resync_client_max_ms: float = float("nan")  # longest write during resync, outside the switch window
    restart_in_sync_s: float = float("nan")
    sb: SwitchBack = field(default_factory=lambda: SwitchBack())


async def stall_cycles(args: argparse.Namespace, workdir: Path) -> tuple[list[Cycle], dict[str, float], str]:
    node_args = ["--durability", args.durability]
    wd = workdir / "stalls"
    c = LocalCluster(wd, primary_args=node_args, secondary_args=node_args)
    cycles: list[Cycle] = []
    events: list[tuple[float, float, float, float, float]] = []  # per cycle: kill, degraded, restart, in_sync
    writer: h.Qd1Writer | None = None
    coord: Coord | None = None
    err = ""
    size = 256 * MiB
    try:
        await c.start()
        await c.create_volume(VOLUME, size)
        coord = Coord(c.coordinator_addr)
        writer = h.Qd1Writer(c.primary_addr, VOLUME, size=4096, region_offset=0, region_bytes=64 * MiB)
        await asyncio.sleep(1.0)
        wall_first = time.time()
        for n in range(args.cycles):
            cy = Cycle()
            wall_kill = time.time()
            c.kill("secondary")
            await coord.wait(
                lambda s: s.state in (DEGRADED, RESYNCING) and s.fault_snapshot_id != 0, 30, "degraded"
            )
            wall_deg = time.time()
            cy.degrade_ms = (await primary_report(c)).last_stall_ms
            base = 128 * MiB + (n % 4) * 16 * MiB
            await write_offsets(c.primary_addr, [base + i * MiB for i in range(16)], MiB, 4)
            await coord.wait(lambda s: not s.secondary_alive, 30, "secondary counted dead")
            wall_restart = time.time()
            t0 = time.perf_counter()
            await c.start_process("secondary")
            await coord.wait(
                lambda s: s.state == IN_SYNC and s.primary_alive and s.secondary_alive,
                args.resync_timeout,
                "in_sync",
            )
            cy.restart_in_sync_s = time.perf_counter() - t0
            wall_sync = time.time()
            cy.switch_ms = (await primary_report(c)).last_stall_ms
            for _, line in h.log_lines_since(c.log_path("primary"), wall_kill, _DEGRADED.pattern):
                if "switch-back" not in line and (m := _DEGRADED.search(line)):
                    cy.degrade_log_ms = float(m.group(1))
                    break
            ts_switch = wall_sync
            for ts, line in h.log_lines_since(c.log_path("primary"), wall_restart, _BACK_IN_SYNC.pattern):
                if m := _BACK_IN_SYNC.search(line):
                    cy.switch_log_ms = float(m.group(5))
                    ts_switch = ts
            events.append((wall_kill, wall_deg, wall_restart, ts_switch, wall_sync))
            cy.sb = switch_back(c, wall_restart)
            cycles.append(cy)
            print(
                f"  stall cycle {n + 1}/{args.cycles}: degrade {cy.degrade_ms:.1f} ms, switch-back "
                f"{cy.switch_ms:.1f} ms ({cy.sb.text()}), restart->in_sync {cy.restart_in_sync_s:.2f} s",
                flush=True,
            )
            await asyncio.sleep(0.5)
        await asyncio.sleep(0.5)
        trace = writer.stop()
        writer = None
        # Client-side view of each event.
        for cy, (w_kill, w_deg, w_restart, ts_sw, _w_sync) in zip(cycles, events, strict=True):
            cy.degrade_client_ms = trace.max_latency(w_kill, w_deg) * 1000
            sw_ms = cy.switch_log_ms if cy.switch_log_ms == cy.switch_log_ms else 100.0
            lo = ts_sw - sw_ms / 1000 - 0.05
            cy.switch_client_ms = trace.max_latency(lo, ts_sw + 0.05) * 1000
            during = [(lat, s) for s, lat, _ in trace.overlapping(w_restart, lo) if s + lat < lo]
            worst = max(during, default=(float("nan"), w_restart))
            cy.resync_client_max_ms = worst[0] * 1000
            if worst[0] == worst[0] and worst[0] > STALL_TARGET_MS / 1000:
                stamp = (
                    time.strftime("%H:%M:%S", time.localtime(worst[1])) + f".{int(worst[1] % 1 * 1000):03d}"
                )
                print(
                    f"  note: cycle {cycles.index(cy) + 1}: a QD1 write during the "
                    f"resync (before the switch-back) took {worst[0] * 1000:.0f} ms; it started at {stamp} "
                    f"(wall clock), {worst[1] - w_restart:.2f} s after the restart",
                    flush=True,
                )
        # Steady in-sync latency: the writes before the first kill.
        steady = sorted(
            lat
            for s, lat, ok in zip(trace.starts, trace.lats, trace.oks, strict=True)
            if s < wall_first and ok
        )
        failed = sum(1 for ok in trace.oks if not ok)
        info = {
            "steady_p50_ms": h.percentile(steady, 50) * 1000,
            "steady_p99_ms": h.percentile(steady, 99) * 1000,
            "writes": float(len(trace.lats)),
            "failed_writes": float(failed),
        }
        return cycles, info, err
    finally:
        if writer is not None:
            writer.kill()
        if coord is not None:
            await coord.close()
        await c.close()
        if not args.keep:
            shutil.rmtree(wd, ignore_errors=True)


# ---------------------------------------------------------------- main


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None or x != x else fmt.format(x)


def _stats(vals: list[float]) -> tuple[float, float, float]:
    v = sorted(x for x in vals if x == x)
    return h.percentile(v, 50), h.percentile(v, 99), (v[-1] if v else float("nan"))


async def main_async(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-resync-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    load0 = h.loadavg()
    print(
        f"bench_resync: volume {h.fmt_size(args.size)} (sparse), dirty {', '.join(f'{f:.0%}' for f in args.fracs)}, "
        f"variants {', '.join(args.modes)}, durability {args.durability}, pattern {args.pattern}, "
        f"{args.cycles} stall cycles; workdir {workdir}",
        flush=True,
    )

    ceiling = await h.measure_ceiling([(MiB, 64), (MiB, 8)], seconds=args.ceiling_seconds, warmup_s=0.5)
    ceil = ceiling[(MiB, 64)].mib_s
    print(
        f"  1 MiB stream ceiling: QD64 {ceil:.0f} MiB/s, QD8 {ceiling[(MiB, 8)].mib_s:.0f} MiB/s", flush=True
    )

    results: list[OutageResult] = []
    for mode in args.modes:
        for frac in args.fracs:
            r = await one_outage(mode, frac, args, workdir)
            results.append(r)
            if not r.error:
                print(
                    f"  {mode:7} {frac:4.0%}: dirty {h.fmt_size(r.dirty_bytes)} failed {h.fmt_size(r.failed_bytes)}"
                    f" -> sent {h.fmt_size(r.bytes_sent)}; restart->in_sync {r.restart_in_sync_s:.2f} s "
                    f"(primary resync {_f(r.primary_resync_s)} s); {r.verify}",
                    flush=True,
                )

    fc_s, fc_bytes, fc_err = (float("nan"), 0, "skipped")
    sp_s, sp_bytes, sp_err = (float("nan"), 0, "skipped")
    if not args.no_full_copy:
        try:
            fc_s, fc_bytes, fc_err = await full_copy(args, workdir)
            print(f"  full copy (every block written): {h.fmt_size(fc_bytes)} in {fc_s:.2f} s {fc_err}", flush=True)
        except Exception as e:
            fc_err = f"{type(e).__name__}: {e}"
            print(f"  full copy FAILED: {fc_err}", flush=True)
        try:
            sp_s, sp_bytes, sp_err = await full_copy(args, workdir, stride_mib=64)
            print(f"  full copy (1 MiB written every 64 MiB): {h.fmt_size(sp_bytes)} in {sp_s:.2f} s "
                  f"({sp_s / fc_s:.3f} of the dense copy's time) {sp_err}", flush=True)
        except Exception as e:
            sp_err = f"{type(e).__name__}: {e}"
            print(f"  sparse full copy FAILED: {sp_err}", flush=True)

    cycles: list[Cycle] = []
    info: dict[str, float] = {}
    if args.cycles:
        try:
            cycles, info, _ = await stall_cycles(args, workdir)
        except Exception as e:
            print(f"  stall cycles FAILED: {type(e).__name__}: {e}", flush=True)

    # ---- tables 1 and 2: resync
    rows = []
    rows2 = []
    for r in results:
        name = f"{'A' if r.mode == 'rewrite' else 'B'} {r.mode}"
        if r.error:
            rows.append([name, f"{r.frac:.0%}", h.fmt_size(r.dirty_bytes), "", "", "", "", "", "", ""])
            rows2.append([name, f"{r.frac:.0%}", "", "", "", "", "", "", f"ERROR: {r.error[:100]}"])
            continue
        need = r.dirty_bytes + r.failed_bytes
        ratio = r.bytes_sent / need if need else float("nan")
        rate_s = r.primary_resync_s or r.restart_in_sync_s
        rate = r.bytes_sent / MiB / rate_s if rate_s else float("nan")
        rows.append(
            [
                name,
                f"{r.frac:.0%}",
                h.fmt_size(r.dirty_bytes),
                h.fmt_size(r.failed_bytes),
                h.fmt_size(r.bytes_sent),
                f"{ratio:.3f} {'PASS' if ratio <= BYTES_TARGET else 'FAIL'}",
                f"{r.restart_in_sync_s:.2f}",
                _f(r.restart_resyncing_s),
                _f(r.primary_resync_s),
                f"{fc_s / r.restart_in_sync_s:.1f}x" if fc_s == fc_s else "-",
            ]
        )
        rows2.append(
            [
                name,
                f"{r.frac:.0%}",
                f"{rate:.0f}",
                f"{rate / ceil:.2f}x {'PASS' if rate >= RATE_TARGET * ceil else 'FAIL'}",
                " ".join(f"{k if k == 'all' else k[0]}{v:.0f}" for k, v in r.cpu.items()),
                f"{r.degrade_stall_ms:.1f}",
                f"{r.switch_stall_ms:.1f} {'PASS' if r.switch_stall_ms <= STALL_TARGET_MS else 'FAIL'}",
                f"{r.sb.to_secondary_done_ms:.0f} + {r.sb.to_back_ms:.0f}",
                f"{r.verify}; {' '.join(r.rounds)}"
                + (f"; {r.early_attempts} resync attempt(s) while it was down" if r.early_attempts else ""),
            ]
        )
    if fc_s == fc_s:
        rows.append(
            [
                "full copy",
                "100%",
                h.fmt_size(args.size),
                "",
                h.fmt_size(fc_bytes),
                "",
                "",
                "",
                f"{fc_s:.2f}",
                "1.0x",
            ]
        )
        rows2.append(
            [
                "full copy",
                "100%",
                f"{fc_bytes / MiB / fc_s:.0f}",
                f"{fc_bytes / MiB / fc_s / ceil:.2f}x",
                "",
                "",
                "",
                "",
                fc_err or "Repair [0, size) over the Resync path, every block written",
            ]
        )
        rows2.append(
            [
                "full copy, sparse",
                "1.6%",
                f"{sp_bytes / MiB / sp_s:.0f}",
                f"{sp_bytes / MiB / sp_s / ceil:.2f}x",
                "",
                "",
                "",
                "",
                sp_err or f"1 MiB every 64 MiB: holes sent as zero chunks; {sp_s / fc_s:.3f} of the dense time",
            ]
        )
    h.print_table(
        f"Resync after an outage: volume {h.fmt_size(args.size)} (sparse), 1 MiB dirty writes "
        f"({args.pattern}), durability {args.durability}",
        [
            "variant",
            "dirty",
            "dirty bytes",
            "failed",
            "bytes sent",
            f"sent/(dirty+failed) <= {BYTES_TARGET}",
            "restart->in_sync s",
            "->resyncing s",
            "primary resync s",
            "full copy / this",
        ],
        rows,
        note=(
            "restart->in_sync: from starting the secondary process again (it was counted dead first) to the first "
            "GetVolume poll (every 50 ms) showing in_sync;\n  it includes process start-up, registration and the "
            "coordinator's resync start. ->resyncing: first poll showing resyncing (- = never seen).\n"
            "primary resync s: the primary's StartResync ('new/resuming resync' log line) -> 'back in sync' log "
            "line. bytes sent: delta of the primary's resync_bytes_sent.\n"
            "full copy: NodeService.Repair of [0, size) on an in-sync volume with every block written: every block "
            "read on the primary and streamed over the Resync path to the secondary, which applies it\n  (time of "
            "the Repair RPC). "
            "full copy / this: full-copy seconds / restart->in_sync seconds."
        ),
    )
    h.print_table(
        f"Resync throughput and stalls (1 MiB single-hop stream ceiling, QD64, this run: {ceil:.0f} MiB/s)",
        [
            "variant",
            "dirty",
            "resync MiB/s",
            f"/ceiling >= {RATE_TARGET}",
            "CPU %",
            "degrade stall ms",
            f"switch-back stall ms <= {STALL_TARGET_MS:g}",
            "switch-back: final->sec done + ->back ms",
            "verify; rounds r<n>:<kind>[F]=size",
        ],
        rows2,
        note=(
            "resync MiB/s = bytes sent / primary resync s. CPU %: of one core from the secondary being healthy to "
            "in_sync (p=primary, s=secondary, all=whole machine, max 200).\n"
            "stalls: the primary's last_stall_ms after the degrade and after the switch-back (one sample each; "
            "see the next table for repeated cycles).\n"
            "switch-back breakdown (log timestamps): primary 'round N (diff, final)' -> secondary 'resync complete' "
            "(the final chunks applied; the secondary\n  deletes its pre-resync snapshot when replication reopens) "
            "+ that -> primary 'back in sync' (replication stream re-opened, state persisted).\n"
            "rounds: e=failed extents (variant B round 0), d=diff, F=final round (writes quiesced while it is sent)."
        ),
    )

    # ---- table 2: stalls
    if cycles:
        srows = []
        for label, vals, src in (
            ("fault snapshot (degrade)", [c.degrade_ms for c in cycles], "primary last_stall_ms"),
            ("fault snapshot (degrade)", [c.degrade_log_ms for c in cycles], "primary log 'write stall'"),
            (
                "fault snapshot (degrade)",
                [c.degrade_client_ms for c in cycles],
                "client: longest QD1 write from kill to degraded seen (includes failure detection)",
            ),
            ("switch-back", [c.switch_ms for c in cycles], "primary last_stall_ms"),
            ("switch-back", [c.switch_log_ms for c in cycles], "primary log 'switch-back write stall'"),
            (
                "switch-back",
                [c.switch_client_ms for c in cycles],
                "client: longest QD1 write overlapping the quiesce (+-50 ms)",
            ),
            (
                "(context) during resync",
                [c.resync_client_max_ms for c in cycles],
                "client: longest QD1 write from restart to the quiesce",
            ),
            (
                "(context) switch-back part",
                [c.sb.to_secondary_done_ms for c in cycles],
                "log: final-round start -> secondary done (chunks + pre-resync snapshot deleted)",
            ),
            (
                "(context) switch-back part",
                [c.sb.to_back_ms for c in cycles],
                "log: secondary done -> primary back in sync",
            ),
            (
                "(context) final round size",
                [float(c.sb.final_chunks) for c in cycles],
                "chunks in the final (quiesced) round (count, not ms)",
            ),
            (
                "(context) final round size",
                [c.sb.final_bytes / 1024 for c in cycles],
                "KiB in the final (quiesced) round (KiB, not ms)",
            ),
        ):
            p50, p99, mx = _stats(vals)
            verdict = "" if label.startswith("(") else ("PASS" if p99 <= STALL_TARGET_MS else "FAIL")
            srows.append(
                [
                    label,
                    src,
                    len([v for v in vals if v == v]),
                    _f(p50, "{:.1f}"),
                    _f(p99, "{:.1f}"),
                    _f(mx, "{:.1f}"),
                    verdict,
                ]
            )
        h.print_table(
            f"Write stalls over {len(cycles)} fault/switch-back cycles (ms; target p99 <= {STALL_TARGET_MS:g} ms; "
            "p99 is nearest-rank, so with few cycles it is the max)",
            ["event", "source", "n", "p50", "p99", "max", "verdict"],
            srows,
            note=(
                f"background QD1 4 KiB writer: {info.get('writes', 0):.0f} writes, "
                f"{info.get('failed_writes', 0):.0f} failed; steady in-sync latency p50 "
                f"{info.get('steady_p50_ms', float('nan')):.2f} ms, p99 {info.get('steady_p99_ms', float('nan')):.2f} ms. "
                f"restart->in_sync per cycle: "
                + " ".join(f"{c.restart_in_sync_s:.1f}" for c in cycles)
                + " s"
            ),
        )
    print(f"\nloadavg at start: {load0}; at the end: {h.loadavg()}")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    print(f"command: {h.command_line()}")
    if args.keep:
        print(f"workdir kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from syncrep.units import parse_size

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="512 MiB volume, 4 stall cycles")
    p.add_argument("--size", default=None, help="volume size (default 4GiB; --quick 512MiB)")
    p.add_argument("--fractions", default="1,10,50", help="dirty percentages (default: 1,10,50)")
    p.add_argument("--modes", default="rewrite,direct", help="resync variants (default: rewrite,direct)")
    p.add_argument(
        "--pattern", choices=("strided", "random"), default="strided", help="which 1 MiB chunks are dirtied"
    )
    p.add_argument("--durability", choices=("sync", "os"), default="sync", help="node --durability")
    p.add_argument(
        "--cycles", type=int, default=None, help="fault/switch-back cycles (default 10; --quick 4)"
    )
    p.add_argument("--ceiling-seconds", type=float, default=3.0, help="seconds per ceiling cell")
    p.add_argument("--resync-timeout", type=float, default=600.0, help="give up on one resync after this")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the checksum comparison")
    p.add_argument("--no-full-copy", action="store_true", help="skip the full-copy baseline")
    p.add_argument("--workdir", default=None, help="cluster data and logs (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the workdir (logs, data) afterwards")
    a = p.parse_args(argv)
    a.size = parse_size(a.size) if a.size else (512 * MiB if a.quick else 4 * GiB)
    if a.size % MiB or a.size < 64 * MiB:
        p.error("--size must be a multiple of 1 MiB and at least 64 MiB")
    a.fracs = [float(x) / 100 for x in a.fractions.split(",") if x.strip()]
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    for m in a.modes:
        if m not in sc.RESYNC_MODES:
            p.error(f"--modes: {m!r} is not rewrite or direct")
    a.cycles = a.cycles if a.cycles is not None else (4 if a.quick else 10)
    return a


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(main_async(parse_args()))


if __name__ == "__main__":
    sys.exit(main())
