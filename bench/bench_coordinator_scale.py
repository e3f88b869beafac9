"""Benchmark: one coordinator carrying many volumes on two nodes, on SQLite and on etcd (issue 12).

    python bench/bench_coordinator_scale.py [--quick] [--volumes N] [--seconds S]
        [--stores sqlite,etcd] [--create-concurrency C] [--keep]

(--quick: 200 volumes and a 10 s window; the default 1000 volumes and 20 s.)

What it measures, for each store (``sqlite``: the default store under the
coordinator's data dir; ``etcd``: a 3-member etcd of deploy/etcd.py,
``--store etcd://...``), on a deploy.cluster.LocalCluster (one coordinator,
the two real nodes, mutual TLS):

1. **Create.** N volumes of 1 MiB (4 KiB blocks) created with
   syncrep.client.create_volume, ``--create-concurrency`` in flight, then
   waited until every one is in_sync with both nodes alive (ListVolumes
   polled). Create rate = N / (first create -> all in_sync); the rate of the
   first and of the last fifth is printed too (each heartbeat carries one
   report per volume, so the cost of a create grows with N).
2. **Steady window** (``--seconds``), in two halves:
   *heartbeats only* (the nodes' own load; the bench only probes GetVolume
   every PROBE_INTERVAL_S on one kept channel), then *heartbeats + status
   loops*: two QD1 loops in the bench, one GetVolume of a random volume, one
   full listing (ListVolumes: what ``syncrep status --json`` calls), each
   alternating a call through the client library (a new TLS channel per call,
   as the CLI does) with one on a kept channel, so the handshake's share is
   visible. Latency p50/p99 of each. CPU of every process over each half
   (bench/_harness.cpu_seconds: coordinator, each node, the etcd members, the
   bench itself) and of the whole machine.
3. **End.** A few volumes (written with 64 KiB of random data before the
   window) read back from both nodes (ReadLocal) equal to what was written,
   and their whole replicas compared (syncrep.client.checksum on both nodes).
   Then the secondary is stopped (SIGTERM): the primary goes degraded on
   every volume and sends one ReportReplication each (and its next
   heartbeat carries the same state): a burst of N failures to handle. The
   coordinator's log lines of the N ``in_sync -> degraded`` transitions
   give their span (transitions/s) and what told it first (a report or a
   heartbeat); its "stays degraded" lines, the reports that came second
   (a lower bound: not all are logged). Then the primary and the coordinator
   are stopped (SIGTERM); each stop is timed (SIGKILL only after
   STOP_GRACE_S: at 1,000 volumes a node's graceful stop outlasts the
   harness's default 8 s grace) and a non-zero exit code fails the run.

How heartbeats and reports are counted (the coordinator exports no such
counter: its /metrics has nodes, volumes by state and is_leader only, so
``--metrics-listen`` would not tell): every node heartbeats in a loop --
build one VolumeReport per volume it holds, Heartbeat RPC, apply the reply,
sleep the interval (0.5 s, syncrep/node.py) -- so the rate is
1 / (0.5 s + the loop's own time), and that own time is what 1,000 volumes
cost. The coordinator grants the primary's leases when it answers the
primary's heartbeat, all at one ``now``, and GetVolume returns
``lease_remaining_s = granted_at + lease_s + drift - now``; so
``t_reply + lease_remaining_s`` is, up to a constant, the time the last
heartbeat of the primary was handled (off by at most that GetVolume's
latency). The distinct such times (gaps > HEARTBEAT_GAP_S) in the window are
the primary's heartbeats the coordinator handled. The secondary runs the
same loop over the same number of volumes (smaller reports: no replication
figures), so its rate is taken as equal -- an assumption, said in the
output. Volume reports/s = heartbeats/s x N (one per volume per heartbeat).
ReportReplication (a primary's state-change report, syncrep/node.py
``_report``) is sent only when a pair changes state: the window checks that
no volume's ``state_changed_at`` moved, so none was due; the burst at the
end (3.) is where the coordinator's rate of failure reports is measured.

The stores' own work: on etcd, the members' /metrics
(``etcd_server_proposals_committed_total``: raft writes; the members' gRPC
requests handled, by method); on SQLite, the coordinator's ``write_bytes``
(/proc/PID/io). Threads and open files of every process are printed (one I/O
thread per volume on each node, and each volume's store files).

What bounds it: a 2-core machine shared by both nodes, the coordinator, the
etcd members, the bench and whatever else runs (loadavg printed). A
heartbeat is handled on the coordinator's one event loop under its lock (per
volume: the pair's decision and its lease; then the node's full assignment
list), so the coordinator's CPU per heartbeat grows with N, and a status
listing of N volumes queues behind it on the same loop. In steady state
neither store is written (a heartbeat that changes nothing persists
nothing; on etcd only the election lease's keepalive and its check run,
about 2 raft writes/s), so the two stores differ only in what a change
costs. Creation is bound by the nodes, not the coordinator: a node applies
assignments one at a time (syncrep/node.py ``_assign_lock``: the store
created and, on the primary, its write path and replication stream
started), so more than a few creates in flight only queue there, and one
queued past the coordinator's push deadline (5 s) fails its create (rolled
back, said in the error).

Output: a table per store, a side-by-side table, one ``RESULT_JSON {...}`` line.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import (
    KiB,
    MiB,
    command_line,
    cpu_seconds,
    loadavg,
    log_lines_since,
    machine_busy_seconds,
    percentile,
    print_table,
)
from deploy.cluster import LocalCluster
from deploy.etcd import EtcdCluster
from syncrep import client as sc
from syncrep import rpc
from syncrep.pb import syncrep_pb2 as pb
from syncrep.pb import syncrep_pb2_grpc as pb_grpc

VOLUME_SIZE = 1 * MiB
BLOCK_SIZE = 4 * KiB
#: The heartbeats-only half probes one volume this often (for the lease times).
PROBE_INTERVAL_S = 0.1
#: Two estimated heartbeat times further apart than this are two heartbeats
#: (the nodes' interval is 0.5 s; an estimate is off by at most its RPC's latency).
HEARTBEAT_GAP_S = 0.25
#: Volumes written before the window and compared on both nodes at the end.
CHECKED_VOLUMES = 6
CHECK_BYTES = 64 * KiB
#: ListVolumes of N volumes on a busy 2-core box: well above the 5 s default.
LIST_TIMEOUT_S = 60.0
STATUS_TIMEOUT_S = 30.0
ETCD_MEMBERS = 3
#: A node's graceful stop with N volumes takes longer than the harness's
#: default grace (8 s) at N = 1000: the bench waits this long before SIGKILL,
#: and prints how long each stop took.
STOP_GRACE_S = 180.0
#: How long the coordinator may take to show every volume degraded after the secondary stopped.
BURST_TIMEOUT_S = 120.0


def vol_name(i: int) -> str:
    return f"v{i:05d}"


# ---------------------------------------------------------------- process figures


def proc_threads(pid: int | None) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def proc_fds(pid: int | None) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def proc_write_bytes(pid: int | None) -> int:
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def scrape(url: str) -> dict[str, float]:
    """A Prometheus text page as {'name{labels}': value} (empty if unreachable)."""
    out: dict[str, float] = {}
    try:
        with urllib.request.urlopen(url, timeout=5.0) as r:
            text = r.read().decode()
    except OSError:
        return out
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out


def etcd_counters(etcd: EtcdCluster) -> dict[str, float]:
    """Raft writes committed (one member: the same on all) and gRPC requests
    handled by all members, by method."""
    out: dict[str, float] = {}
    for k, m in enumerate(etcd.members):
        page = scrape(f"http://{m.endpoint}/metrics")
        if k == 0:
            out["proposals_committed"] = page.get("etcd_server_proposals_committed_total", 0.0)
        for key, v in page.items():
            if key.startswith("grpc_server_handled_total{"):
                method = key.split('grpc_method="', 1)[1].split('"', 1)[0]
                out[f"grpc:{method}"] = out.get(f"grpc:{method}", 0.0) + v
    return out


class Usage:
    """CPU seconds of named pids (None: this process) and of the machine, between two marks."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids = pids
        self.t0 = 0.0
        self.c0: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        cpu = {name: sum(cpu_seconds(p) for p in pids) for name, pids in self.pids.items()}
        cpu["bench"] = time.process_time()
        cpu["machine"] = machine_busy_seconds()
        return cpu

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.c0 = self._now()

    def stop(self) -> dict[str, float]:
        """CPU % of one core of each, over the seconds since start()."""
        dt = time.monotonic() - self.t0
        c1 = self._now()
        return {k: round(100.0 * (c1[k] - self.c0[k]) / dt, 1) for k in c1}


# ---------------------------------------------------------------- heartbeat times from leases


class LeaseClock:
    """Estimated times (bench monotonic clock, up to a constant) at which the
    coordinator handled a heartbeat of the primary: t_reply + lease_remaining_s."""

    def __init__(self) -> None:
        self.samples: list[float] = []

    def add(self, t_reply: float, st: pb.VolumeStatus) -> None:
        if st.lease_remaining_s > 0:
            self.samples.append(t_reply + st.lease_remaining_s)

    def heartbeats(self) -> list[float]:
        """One time per distinct heartbeat: the sorted estimates split where two
        neighbours are more than HEARTBEAT_GAP_S apart; each heartbeat's time is
        its smallest estimate (a reply's delay only ever adds)."""
        out: list[float] = []
        prev = float("-inf")
        for g in sorted(self.samples):
            if g - prev > HEARTBEAT_GAP_S:
                out.append(g)
            prev = g
        return out

    def rate(self) -> tuple[float, float, int]:
        """(heartbeats/s, median period s, heartbeats seen) over the window."""
        hb = self.heartbeats()
        if len(hb) < 2:
            return float("nan"), float("nan"), len(hb)
        periods = sorted(b - a for a, b in itertools.pairwise(hb))
        return (len(hb) - 1) / (hb[-1] - hb[0]), percentile(periods, 50), len(hb)


# ---------------------------------------------------------------- phases


async def create_all(c: LocalCluster, n: int, concurrency: int, timeout_s: float) -> dict[str, Any]:
    """Create n volumes (bounded concurrency), wait all in_sync; return the rates."""
    sem = asyncio.Semaphore(concurrency)
    done_at: list[float] = []
    t0 = time.monotonic()

    async def one(i: int) -> None:
        async with sem:
            name = vol_name(i)
            try:
                await sc.create_volume(c.coordinator_addr, name, VOLUME_SIZE, c.primary_addr, c.secondary_addr,
                                       block_size=BLOCK_SIZE, timeout_s=STATUS_TIMEOUT_S)
            except sc.ClientError as e:
                raise RuntimeError(f"creating volume {name} (#{i + 1} of {n}) failed: {e}") from None
            done_at.append(time.monotonic() - t0)

    await asyncio.gather(*(one(i) for i in range(n)))
    t_created = time.monotonic() - t0
    deadline = time.monotonic() + timeout_s
    while True:
        vols = await sc.list_volumes(c.coordinator_addr, timeout_s=LIST_TIMEOUT_S)
        in_sync = [v for v in vols if v.state == pb.PAIR_STATE_IN_SYNC and v.primary_alive and v.secondary_alive]
        if len(in_sync) >= n:
            break
        if time.monotonic() >= deadline:
            states: dict[str, int] = {}
            for v in vols:
                k = f"{pb.PairState.Name(v.state)}{'' if v.primary_alive and v.secondary_alive else ' (node down)'}"
                states[k] = states.get(k, 0) + 1
            raise RuntimeError(f"{len(in_sync)} of {n} volumes in_sync {timeout_s:g} s after the last create: {states}")
        await asyncio.sleep(0.5)
    t_in_sync = time.monotonic() - t0
    done_at.sort()
    fifth = max(1, n // 5)
    first = fifth / done_at[fifth - 1] if done_at[fifth - 1] > 0 else float("nan")
    last_span = done_at[-1] - done_at[-fifth - 1] if n > fifth else done_at[-1]
    last = fifth / last_span if last_span > 0 else float("nan")
    return {
        "create_rpcs_s": round(t_created, 2),
        "create_to_all_in_sync_s": round(t_in_sync, 2),
        "create_rate_vol_s": round(n / t_in_sync, 1),
        "create_rate_first_fifth_vol_s": round(first, 1),
        "create_rate_last_fifth_vol_s": round(last, 1),
    }


async def write_checked(c: LocalCluster, names: list[str]) -> dict[str, bytes]:
    data: dict[str, bytes] = {}
    for name in names:
        payload = os.urandom(CHECK_BYTES)
        client = await c.connect(name)
        try:
            await client.write(0, payload)
        finally:
            await client.close()
        data[name] = payload
    return data


async def verify_checked(c: LocalCluster, data: dict[str, bytes]) -> None:
    a, b = c.primary_addr, c.secondary_addr
    for name, payload in data.items():
        ra, rb = await asyncio.gather(sc.read_local(a, name, 0, len(payload)), sc.read_local(b, name, 0, len(payload)))
        if ra != payload or rb != payload:
            raise AssertionError(f"volume {name}: an acknowledged write is not on both nodes "
                                 f"(primary {'ok' if ra == payload else 'differs'}, "
                                 f"secondary {'ok' if rb == payload else 'differs'})")
        ca, cb = await asyncio.gather(sc.checksum(a, name), sc.checksum(b, name))
        if not ca or ca != cb:
            raise AssertionError(f"volume {name}: the replicas differ (checksum {ca} vs {cb})")


def lat_summary(vals: list[float]) -> dict[str, float]:
    v = sorted(vals)
    return {"n": len(v), "p50_ms": round(percentile(v, 50) * 1000, 2), "p99_ms": round(percentile(v, 99) * 1000, 2)}


async def timed_loop(
    t_end: float, calls: list[Callable[[], Awaitable[Any]]], lats: list[list[float]],
    on_reply: Callable[[float, Any], None] | None = None,
) -> None:
    """QD1: call calls[0], calls[1], ... in turn until t_end; record each latency in lats[k]."""
    k = 0
    while time.monotonic() < t_end:
        j = k % len(calls)
        t0 = time.monotonic()
        reply = await calls[j]()
        t1 = time.monotonic()
        lats[j].append(t1 - t0)
        if on_reply is not None:
            on_reply(t1, reply)
        k += 1


async def steady_window(
    c: LocalCluster, n: int, seconds: float, usage: Usage, etcd: EtcdCluster | None
) -> dict[str, Any]:
    coord = c.coordinator_addr
    before = {v.spec.name: v.state_changed_at for v in await sc.list_volumes(coord, timeout_s=LIST_TIMEOUT_S)}
    half = seconds / 2
    out: dict[str, Any] = {}
    async with rpc.channel(c.address("coordinator")) as ch:
        stub = pb_grpc.CoordinatorServiceStub(ch)

        def rand_name() -> str:
            return vol_name(random.randrange(n))

        async def get_kept() -> pb.VolumeStatus:
            return await stub.GetVolume(pb.GetVolumeRequest(name=rand_name()), timeout=STATUS_TIMEOUT_S)

        async def get_lib() -> pb.VolumeStatus:
            return await sc.get_volume(coord, rand_name(), timeout_s=STATUS_TIMEOUT_S)

        async def list_kept() -> Any:
            return await stub.ListVolumes(pb.ListVolumesRequest(), timeout=LIST_TIMEOUT_S)

        async def list_lib() -> Any:
            return await sc.list_volumes(coord, timeout_s=LIST_TIMEOUT_S)

        for phase in ("heartbeats only", "heartbeats + status loops"):
            clock = LeaseClock()
            e0 = etcd_counters(etcd) if etcd else {}
            w0 = proc_write_bytes(c.pid("coordinator"))
            usage.start()
            t_start = time.monotonic()
            t_end = t_start + half
            res: dict[str, Any] = {"phase": phase}
            if phase == "heartbeats only":
                while time.monotonic() < t_end:
                    st = await get_kept()
                    clock.add(time.monotonic(), st)
                    await asyncio.sleep(PROBE_INTERVAL_S)
            else:
                g_lats: list[list[float]] = [[], []]
                l_lats: list[list[float]] = [[], []]
                await asyncio.gather(
                    timed_loop(t_end, [get_lib, get_kept], g_lats, clock.add),
                    timed_loop(t_end, [list_lib, list_kept], l_lats),
                )
                res["getvolume_client_lib"] = lat_summary(g_lats[0])
                res["getvolume_kept_channel"] = lat_summary(g_lats[1])
                res["listvolumes_client_lib"] = lat_summary(l_lats[0])
                res["listvolumes_kept_channel"] = lat_summary(l_lats[1])
            dt = time.monotonic() - t_start
            res["seconds"] = round(dt, 2)
            res["cpu_pct"] = usage.stop()
            rate, period, seen = clock.rate()
            res["primary_heartbeats_seen"] = seen
            res["primary_heartbeat_period_s"] = round(period, 3)
            res["heartbeats_per_s"] = round(2 * rate, 2)  # the secondary's taken as equal (module header)
            res["volume_reports_per_s"] = round(2 * rate * n)
            # The coordinator's CPU per volume report (meaningful in the heartbeats-only half).
            res["coordinator_cpu_us_per_volume_report"] = (
                round(res["cpu_pct"]["coordinator"] / 100 / (2 * rate * n) * 1e6, 1) if rate > 0 else None
            )
            res["coordinator_write_kib_s"] = round((proc_write_bytes(c.pid("coordinator")) - w0) / KiB / dt, 1)
            if etcd is not None:
                e1 = etcd_counters(etcd)
                res["etcd_proposals_per_s"] = round((e1.get("proposals_committed", 0) -
                                                     e0.get("proposals_committed", 0)) / dt, 1)
                res["etcd_grpc_per_s"] = {k[5:]: round((v - e0.get(k, 0.0)) / dt, 1)
                                          for k, v in e1.items() if k.startswith("grpc:") and v - e0.get(k, 0.0) > 0}
            res["loadavg"] = loadavg()
            out[phase] = res
            print(f"  {phase}: {json.dumps(res)}", flush=True)
    after = await sc.list_volumes(coord, timeout_s=LIST_TIMEOUT_S)
    moved = [v.spec.name for v in after if before.get(v.spec.name) != v.state_changed_at]
    not_in_sync = [v.spec.name for v in after if v.state != pb.PAIR_STATE_IN_SYNC]
    out["state_changes_in_window"] = len(moved)
    out["not_in_sync_after_window"] = len(not_in_sync)
    return out


async def run_store(store: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    n = args.volumes
    etcd: EtcdCluster | None = None
    store_url = "sqlite"
    if store == "etcd":
        etcd_bin = shutil.which("etcd")
        if etcd_bin is None:
            raise RuntimeError("etcd is not installed (scripts/setup.sh installs Debian's etcd-server)")
        etcd = EtcdCluster.make(etcd_bin, root / "etcd", ETCD_MEMBERS)
        etcd.start()
        store_url = etcd.url
    c = LocalCluster(workdir=root / "cluster", store=store_url)
    result: dict[str, Any] = {"store": store, "volumes": n}
    try:
        await c.start()
        pids = {
            "coordinator": [c.pid("coordinator") or 0],
            "primary": [c.pid("primary") or 0],
            "secondary": [c.pid("secondary") or 0],
        }
        if etcd is not None:
            pids["etcd"] = [m.pid for m in etcd.members]
        usage = Usage(pids)
        print(f"[{store}] cluster up ({c.coordinator_addr}); creating {n} volumes of {VOLUME_SIZE // KiB} KiB, "
              f"{args.create_concurrency} in flight; loadavg {loadavg()}", flush=True)
        usage.start()
        result.update(await create_all(c, n, args.create_concurrency, args.ready_timeout_s))
        result["create_cpu_pct"] = usage.stop()
        print(f"[{store}] {n} volumes in_sync after {result['create_to_all_in_sync_s']} s "
              f"({result['create_rate_vol_s']} volumes/s); loadavg {loadavg()}", flush=True)
        result["procs"] = {name: {"threads": proc_threads(p[0]), "fds": proc_fds(p[0])}
                           for name, p in pids.items() if name != "etcd"}
        checked = sorted({vol_name(0), vol_name(n - 1), *(vol_name(random.randrange(n))
                                                         for _ in range(CHECKED_VOLUMES - 2))})
        data = await write_checked(c, checked)
        result.update(await steady_window(c, n, args.seconds, usage, etcd))
        await verify_checked(c, data)
        result["checked_volumes"] = checked
        print(f"[{store}] {len(checked)} volumes identical on both nodes; stopping the secondary", flush=True)
        result.update(await report_burst_and_stop(c, n))
        print(f"[{store}] report burst: {result['burst']}; stopped: {result['stop_s']} s, "
              f"exit codes {result['exit_codes']}", flush=True)
    finally:
        await c.close()
        if etcd is not None:
            etcd.close()
    return result


async def report_burst_and_stop(c: LocalCluster, n: int) -> dict[str, Any]:
    """SIGTERM the secondary: the primary goes degraded on every volume and
    reports each (ReportReplication) -- a burst of N reports the coordinator
    handles, counted and timed from its log ("in_sync -> degraded ... event
    secondary_failed"). Then SIGTERM the primary, then the coordinator; each
    stop timed (bounded by STOP_GRACE_S, then SIGKILL) and its exit code kept."""
    since = time.time()
    stop_s: dict[str, float] = {}
    rcs: dict[str, int | None] = {}

    async def stop(name: str) -> None:
        t0 = time.monotonic()
        rcs[name] = await c.stop(name, STOP_GRACE_S)
        stop_s[name] = round(time.monotonic() - t0, 2)

    await stop("secondary")
    # Every volume degraded on the coordinator (the reports are retried for REPORT_RETRY_MAX_S).
    deadline = time.monotonic() + BURST_TIMEOUT_S
    while True:
        vols = await sc.list_volumes(c.coordinator_addr, timeout_s=LIST_TIMEOUT_S)
        if sum(1 for v in vols if v.state == pb.PAIR_STATE_DEGRADED) >= n or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.5)
    degraded = sum(1 for v in vols if v.state == pb.PAIR_STATE_DEGRADED)
    # The coordinator logs each pair's transition with what told it: a
    # ReportReplication ("primary P reports the secondary S failed") or the
    # primary's heartbeat ("heartbeat reports the pair degraded"), whichever
    # came first; a report that finds the pair degraded already logs "stays
    # degraded" (not every one: a lower bound on the reports handled).
    lines = log_lines_since(c.log_path("coordinator"), since,
                            r"(in_sync -> degraded|stays degraded) .*event secondary_failed")
    moves = [(t, line) for t, line in lines if "in_sync -> degraded" in line]
    burst: dict[str, Any] = {
        "degraded": degraded,
        "transitions": len(moves),
        "by_heartbeat": sum(1 for _, line in moves if "heartbeat reports" in line),
        "report_rpcs_logged": sum(1 for _, line in lines if " reports the secondary " in line),
    }
    if len(moves) >= 2:
        span = moves[-1][0] - moves[0][0]
        burst["span_s"] = round(span, 2)
        burst["transitions_per_s"] = round((len(moves) - 1) / span, 1) if span > 0 else None
    await stop("primary")
    await stop("coordinator")
    return {"burst": burst, "stop_s": stop_s, "exit_codes": rcs}


def fmt_lat(r: dict[str, Any], key: str) -> str:
    v = r.get("heartbeats + status loops", {}).get(key)
    return f"{v['p50_ms']:.1f} / {v['p99_ms']:.1f} ({v['n']})" if v else "-"


def report(results: list[dict[str, Any]]) -> None:
    stores = [r["store"] for r in results]
    idle = [r["heartbeats only"] for r in results]
    busy = [r["heartbeats + status loops"] for r in results]

    def row(label: str, f: Callable[[dict[str, Any]], Any]) -> list[Any]:
        return [label, *(f(r) for r in results)]

    rows = [
        row("volumes", lambda r: r["volumes"]),
        row("create: volumes/s (to all in_sync)", lambda r: r["create_rate_vol_s"]),
        row("create: first / last fifth, volumes/s",
            lambda r: f"{r['create_rate_first_fifth_vol_s']} / {r['create_rate_last_fifth_vol_s']}"),
        row("create: coordinator CPU %", lambda r: r["create_cpu_pct"]["coordinator"]),
    ]
    for label, phase in (("hb only", idle), ("hb+status", busy)):
        rows += [
            [f"{label}: heartbeats/s (2 nodes)", *(p["heartbeats_per_s"] for p in phase)],
            [f"{label}: primary heartbeat period s", *(p["primary_heartbeat_period_s"] for p in phase)],
            [f"{label}: volume reports/s", *(p["volume_reports_per_s"] for p in phase)],
            [f"{label}: CPU % coordinator", *(p["cpu_pct"]["coordinator"] for p in phase)],
            *([[f"{label}: coordinator CPU us / volume report",
                *(p["coordinator_cpu_us_per_volume_report"] for p in phase)]] if phase is idle else []),
            [f"{label}: CPU % primary / secondary",
             *(f"{p['cpu_pct']['primary']} / {p['cpu_pct']['secondary']}" for p in phase)],
            [f"{label}: CPU % etcd (3) / bench",
             *(f"{p['cpu_pct'].get('etcd', '-')} / {p['cpu_pct']['bench']}" for p in phase)],
            [f"{label}: CPU % machine (200 = 2 cores)", *(p["cpu_pct"]["machine"] for p in phase)],
            [f"{label}: store writes", *(f"{p['etcd_proposals_per_s']} raft/s" if "etcd_proposals_per_s" in p
                                         else f"{p['coordinator_write_kib_s']} KiB/s" for p in phase)],
        ]
    rows += [
        row("GetVolume p50/p99 ms, client lib (n)", lambda r: fmt_lat(r, "getvolume_client_lib")),
        row("GetVolume p50/p99 ms, kept channel", lambda r: fmt_lat(r, "getvolume_kept_channel")),
        row("ListVolumes p50/p99 ms, client lib", lambda r: fmt_lat(r, "listvolumes_client_lib")),
        row("ListVolumes p50/p99 ms, kept channel", lambda r: fmt_lat(r, "listvolumes_kept_channel")),
        row("ReportReplication in window", lambda r: f"0 due ({r['state_changes_in_window']} state changes)"),
        row("threads coordinator / primary / secondary",
            lambda r: " / ".join(str(r["procs"][k]["threads"]) for k in ("coordinator", "primary", "secondary"))),
        row("open fds coordinator / primary / secondary",
            lambda r: " / ".join(str(r["procs"][k]["fds"]) for k in ("coordinator", "primary", "secondary"))),
        row("burst: N in_sync -> degraded in s",
            lambda r: f"{r['burst']['transitions']} in {r['burst'].get('span_s')}"),
        row("burst: transitions/s", lambda r: r["burst"].get("transitions_per_s")),
        row("burst: told by report / by heartbeat",
            lambda r: f"{r['burst']['transitions'] - r['burst']['by_heartbeat']} / {r['burst']['by_heartbeat']}"),
        row("burst: ReportReplication logged (>=)", lambda r: r["burst"]["report_rpcs_logged"]),
        row("SIGTERM stop s: secondary / primary / coord",
            lambda r: " / ".join(str(r["stop_s"][k]) for k in ("secondary", "primary", "coordinator"))),
        row("exit codes: secondary / primary / coord",
            lambda r: " / ".join(str(r["exit_codes"][k]) for k in ("secondary", "primary", "coordinator"))),
        row("replicas compared", lambda r: f"{len(r['checked_volumes'])} identical"),
    ]
    print_table(
        f"coordinator scale: {results[0]['volumes']} volumes, 2 nodes, one coordinator ({', '.join(stores)})",
        ["", *stores], rows,
        note=("heartbeats/s: the primary's counted from its lease grants (GetVolume lease_remaining_s), the "
              "secondary's taken as equal; volume reports/s = heartbeats/s x volumes. CPU % of one core. "
              f"loadavg now {loadavg()} on {os.cpu_count()} cores."),
    )


async def main_async(args: argparse.Namespace) -> int:
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-coord-scale-"))
    print(f"# {command_line()}")
    print(f"# loadavg at start: {loadavg()} on {os.cpu_count()} cores; work directory {root}", flush=True)
    results: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    for store in args.stores:
        try:
            results.append(await run_store(store, args, root / store))
        except (RuntimeError, AssertionError, sc.ClientError) as e:
            # The other store is still measured; this one's logs stay in the work directory.
            errors[store] = f"{type(e).__name__}: {e}"
            print(f"[{store}] FAILED (logs in {root / store}): {errors[store]}", file=sys.stderr, flush=True)
    if not errors and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    if results:
        report(results)
    clean = all(rc == 0 for r in results for rc in r["exit_codes"].values())
    complete = all(r["burst"]["degraded"] >= r["volumes"] for r in results)
    summary = {"command": command_line(), "loadavg_end": loadavg(), "cores": os.cpu_count(),
               "clean_stops": clean, "burst_complete": complete, "errors": errors, "results": results}
    print("RESULT_JSON " + json.dumps(summary))
    for store, why in errors.items():
        print(f"FAIL: {store}: {why}", file=sys.stderr)
    if not clean:
        print("FAIL: a process did not stop cleanly on SIGTERM within "
              f"{STOP_GRACE_S:g} s (exit codes above)", file=sys.stderr)
    if not complete:
        print(f"FAIL: the coordinator did not show every volume degraded within {BURST_TIMEOUT_S:g} s "
              "of the secondary's stop", file=sys.stderr)
    return 0 if clean and complete and not errors else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="200 volumes and a 10 s window")
    p.add_argument("--volumes", type=int, default=None, help="volumes (default 1000; 200 with --quick)")
    p.add_argument("--seconds", type=float, default=None, help="steady window, two halves (default 20; 10 --quick)")
    p.add_argument("--stores", default="sqlite,etcd", help="comma-separated: sqlite, etcd")
    p.add_argument("--create-concurrency", type=int, default=4,
                   help="CreateVolume calls in flight (a node applies assignments one at a time: more only "
                        "queues them, and a push queued past the coordinator's 5 s RPC deadline fails the create)")
    p.add_argument("--ready-timeout-s", type=float, default=300.0,
                   help="how long all volumes may take to be in_sync after the last create")
    p.add_argument("--workdir", default=None, help="where to keep data and logs (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args()
    if args.volumes is None:
        args.volumes = 200 if args.quick else 1000
    if args.seconds is None:
        args.seconds = 10.0 if args.quick else 20.0
    args.stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    bad = [s for s in args.stores if s not in ("sqlite", "etcd")]
    if bad or not args.stores:
        p.error(f"--stores: unknown {bad}; use sqlite and/or etcd")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
