"""Benchmark: failover time and fail-back cost (docs/FAILOVER.md), real processes.

    python bench/bench_failover.py [--quick] [--runs N] [--lease-s S] [--size 64MiB]
                                   [--resync-mode direct|rewrite] [--modes auto,manual] [--keep]

(--quick: 2 runs per mode, about 30 s on an idle 2-core box; the default 5 runs, 1.5-3 min.)

Two modes, each on its own LocalCluster (coordinator + 2 nodes, real gRPC):
``auto`` (the volume is created with ``--auto-failover``: the coordinator
promotes by itself) and ``manual`` (``CoordinatorService.Promote`` retried
every 50 ms from the kill on, i.e. as soon as the coordinator allows it).
Each run is one cycle; the roles alternate, so run k kills the node run k-1
promoted:

1. 4 writers (deploy.workload, through a VolumeClient that follows the
   coordinator) write 1..16-block writes into the first ``--load-region`` of the
   volume; after 100 acknowledged writes, ``kill -9`` the primary.
2. Failover time = kill -> the first write the new primary acknowledges. A
   probe writes one block straight to the surviving node's VolumeService every
   50 ms from the kill on (a fresh stream per attempt, 1 s timeout); it is
   refused while that node is a secondary. "promote ok" is when the coordinator
   names it the primary (auto: GetVolume polled every 50 ms; manual: the
   Promote call that succeeded). "client new/any": the VolumeClient workload's
   view (adds the client's own re-resolution polling) -- the first ack of a
   write issued after the kill / of any write (the re-sent in-flight ones
   included) by the new primary. "lease left": the old primary's lease as the
   coordinator counted it (GetVolume) just before the kill -- a promotion waits
   for it; each run waits first until the coordinator has been up lease + drift
   + 1 s (before that it assumes a lease granted at its start, which can end
   sooner). Goal: failover <= lease_s + 2 s.
3. Stop the writers, write ``--known`` bytes (1 MiB writes, QD8) into an area
   of the volume the writers never touch, restart the old primary with its
   original command line, wait until the coordinator says in_sync.
4. Fail-back bytes sent = the growth of the new primary's
   ``resync_bytes_sent`` (NodeStatus) over the cycle. Accounting, by 4 KiB
   block, deduplicated:

   * new-primary changes: every block of a workload write that completed
     (acked or failed) after the cut -- 1 s before the new primary's first
     certain ack (the probe's, or a workload write issued after the kill) --
     or never completed, plus the known writes and the probe block. An ack
     before the cut came from the old primary in sync (the write was on both
     nodes at the promotion point); a failure before it was a refusal or a
     broken stream to a node not serving writes: neither is counted (shown as
     "excl"). Writes in flight at the kill, re-sent by the client to the new
     primary, complete after the cut: counted;
   * divergent: the old primary's divergent extents, as it reports them
     (``VolumeReport.divergent_extents`` of NodeStatus, polled every 50 ms from
     its restart until the resync clears them; else the byte total of its log
     line "N divergent extents (B bytes)"). These are whole 4 MiB activity-log
     regions, so on a small volume they can dominate.

   Ratios: sent / (changes + divergent) -- the issue's measure, the goal
   <= 1.01 is judged on it; sent / |changes U divergent| -- stricter: the
   minimum a correct resync must send, blocks in both counted once (the
   writers' region lies inside the divergent extents, so the writes there
   after the promotion are in both); and sent / changes -- WITHOUT the
   divergent extents, more than 1 whenever the activity-log regions are
   resent, context only. The new primary's log lines give the bytes of each
   resync round (variant B: round 0 = the failed/divergent extents, then the
   diffs since the promotion point).
5. Every cycle ends by comparing the replicas block for block (per-chunk
   checksums) and checking, on the primary, every acknowledged workload write,
   every known write and the probe.

A short table per mode, a summary, and one ``RESULT_JSON {...}`` line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _harness as h
from _harness import MiB

from deploy import workload as wl
from deploy.cluster import LocalCluster
from syncrep import client as sc

VOL = "vol0"
BLOCK = 4096
#: Coordinator defaults (syncrep/cli.py): the benchmark uses them unless told otherwise.
DEFAULT_LEASE_S = 4.0
DEFAULT_LEASE_DRIFT_S = 0.5
DEFAULT_NODE_TIMEOUT_S = 3.0
FAILOVER_SLACK_S = 2.0  # the goal: failover <= lease_s + 2 s
FAILBACK_TARGET = 1.01
POLL_S = 0.05
#: Generous bounds for a loaded 2-core box; a bound hit is an error of that run, never a figure.
FAILOVER_TIMEOUT_S = 60.0
SYNC_TIMEOUT_S = 180.0
PROBE_WRITER = 200  # the probe's writer id in the self-describing block format
KNOWN_WRITER = 201
KNOWN_WRITE_BLOCKS = 256  # 1 MiB writes

#: Failed writes that completed up to this long before the new primary's first certain ack count as its
#: changes (they may have been applied); the writers retry every 50 ms, so a wider margin sweeps in refusals.
CUT_MARGIN_S = 0.1
_ROUND_LOG = re.compile(r"resync \S+ round (\d+) \(([^)]*)\): (\d+) bytes")
_DIVERGENT_LOG = re.compile(r"(\d+) divergent extents \((\d+) bytes\)")


@dataclass
class Cycle:
    mode: str
    run: int
    killed: str = ""
    promoted: str = ""
    failover_s: float = float("nan")  # kill -> first write acked by the new primary (probe)
    promote_s: float = float("nan")  # kill -> the coordinator names the new primary
    client_resumed_s: float = float("nan")  # kill -> first VolumeClient ack of a write issued after the kill
    client_first_ack_s: float = float("nan")  # kill -> first VolumeClient ack by the new primary (any write)
    client_errors: list[str] = field(default_factory=list)  # distinct failures of the workload after the kill
    lease_left_s: float = float("nan")  # the old primary's lease as the coordinator counted it just before the kill
    promote_refusals: int = 0
    first_refusal: str = ""
    failback_s: float = float("nan")  # restart of the old primary -> in_sync
    sent: int = 0
    new_bytes: int = 0  # new-primary changes, deduplicated by block
    new_failed_ops: int = 0  # workload writes that failed after the cut (counted as changes)
    excluded_ops: int = 0  # workload writes completed between the kill and the cut (not counted)
    rounds: str = ""  # the new primary's log: bytes per resync round
    divergent_bytes: int = 0
    divergent_source: str = ""
    union_bytes: int = 0
    verify: str = ""
    error: str = ""

    @property
    def ratio_union(self) -> float:
        return self.sent / self.union_bytes if self.union_bytes else float("nan")

    @property
    def ratio_sum(self) -> float:
        d = self.new_bytes + self.divergent_bytes
        return self.sent / d if d else float("nan")

    @property
    def ratio_no_divergent(self) -> float:
        return self.sent / self.new_bytes if self.new_bytes else float("nan")


@dataclass
class ModeResult:
    mode: str
    cycles: list[Cycle] = field(default_factory=list)
    error: str = ""


def _f(v: float, fmt: str = "{:.2f}") -> str:
    return "-" if v != v else fmt.format(v)


async def resync_sent(addr: str) -> int:
    r = await sc.node_status(addr)
    return int(next((v.resync_bytes_sent for v in r.volumes if v.name == VOL), 0))


async def divergent_of(addr: str) -> list[tuple[int, int]]:
    """The divergent extents node ``addr`` reports for the volume ([] when unreachable)."""
    try:
        r = await sc.node_status(addr, timeout_s=1.0)
    except Exception:
        return []
    for v in r.volumes:
        if v.name == VOL:
            return [(int(e.offset), int(e.length)) for e in v.divergent_extents]
    return []


async def probe_until_accepted(addr: str, offset: int, data: bytes, deadline: float) -> float:
    """Write ``data`` at ``offset`` straight to node ``addr`` every POLL_S until it
    acknowledges; returns the monotonic time of the acknowledgement."""
    last = ""
    while time.monotonic() < deadline:
        s = h.WriteStream(addr, VOL)
        try:
            await asyncio.wait_for(s.write(offset, data), 1.0)
            return time.monotonic()
        except Exception as e:  # refused (still a secondary), unreachable, timed out: try again
            last = f"{type(e).__name__}: {e}"[:200]
        finally:
            await s.close()
        await asyncio.sleep(POLL_S)
    raise RuntimeError(f"{addr} accepted no write within {FAILOVER_TIMEOUT_S:g} s of the kill; last: {last}")


async def verify(c: LocalCluster, w: wl.Workload, model: dict[int, bytes]) -> str:
    """Replicas identical block for block; every acknowledged write on the primary."""
    a, b = c.address("primary"), c.address("secondary")
    ca, cb = await asyncio.gather(sc.checksum(a, VOL, MiB), sc.checksum(b, VOL, MiB))
    bad = [i for i, (x, y) in enumerate(zip(ca, cb, strict=True)) if x != y]
    if len(ca) != len(cb) or bad:
        raise AssertionError(f"replicas differ in {len(bad)} of {len(ca)} 1 MiB chunks (first {bad[:3]})")
    primary = await c.current_primary_addr(VOL)
    rep = wl.check_blocks(w.history, await wl.read_blocks(primary, VOL, w.history.touched_blocks(), BLOCK))
    if not rep.ok:
        raise AssertionError(f"LOST WRITE or garbage on the primary (seed {w.seed}): {rep.summary()}")
    got = await wl.read_blocks(primary, VOL, model, BLOCK)
    wrong = [blk for blk, want in model.items() if got.get(blk) != want]
    if wrong:
        raise AssertionError(f"{len(wrong)} of {len(model)} known/probe blocks wrong on the primary (first {wrong[0]})")
    return f"identical ({len(ca)} MiB), {w.history.acked} acked + {len(model)} known blocks ok"


async def one_cycle(c: LocalCluster, mode: str, run: int, args: argparse.Namespace, w: wl.Workload,
                    model: dict[int, bytes], coordinator_up: float) -> Cycle:
    roles = await c.role_of(VOL)
    old, new = roles["primary"], roles["secondary"]
    old_addr, new_addr = c.address(old), c.address(new)
    cy = Cycle(mode, run, killed=old, promoted=new)
    seed = w.seed * 100 + run
    ops0 = len(w.history.ops)
    try:
        await w.start()
        await w.wait_acked(100, timeout_s=60)
        sent0 = await resync_sent(new_addr)
        # A coordinator that started less than lease + drift ago assumes a lease granted at its
        # start (driver.lease_remaining_s), which can end sooner than one from the last heartbeat:
        # wait that out, so every run measures a lease granted by a heartbeat.
        drift = DEFAULT_LEASE_DRIFT_S if args.lease_drift_s is None else args.lease_drift_s
        await asyncio.sleep(max(0.0, coordinator_up + args.lease_s + drift + 1.0 - time.monotonic()))
        cy.lease_left_s = float((await c.get_volume(VOL)).lease_remaining_s)

        # ---- failover
        probe_block = args.size // BLOCK - 1  # the last block: no writer touches it
        probe = wl.make_write(seed, PROBE_WRITER, 1, probe_block * BLOCK, 1, BLOCK)
        t_kill = time.monotonic()
        c.kill(old)
        deadline = t_kill + FAILOVER_TIMEOUT_S
        probe_task = asyncio.create_task(probe_until_accepted(new_addr, probe_block * BLOCK, probe, deadline))
        try:
            if mode == "manual":
                while True:
                    try:
                        await c.promote(VOL, timeout_s=5.0)
                        break
                    except sc.ClientError as e:
                        cy.promote_refusals += 1
                        cy.first_refusal = cy.first_refusal or e.message[:160]
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"promote still refused {FAILOVER_TIMEOUT_S:g} s after the kill: "
                                               f"{e}") from None
                    await asyncio.sleep(POLL_S)
            else:
                while (await c.get_volume(VOL)).primary != new_addr:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"no auto-failover {FAILOVER_TIMEOUT_S:g} s after the kill")
                    await asyncio.sleep(POLL_S)
            cy.promote_s = time.monotonic() - t_kill
            t_acc = await probe_task
        finally:
            probe_task.cancel()
        model[probe_block] = probe
        cy.failover_s = t_acc - t_kill
        kill_rel = t_kill - w.t0
        await w.wait_acked(20, timeout_s=60)
        # Issued after the kill and acknowledged: only the new primary can have done that.
        resumed = [o.t_done for o in w.history.ops if o.status == wl.OK and o.t_inv > kill_rel]
        cy.client_resumed_s = min(resumed) - kill_rel if resumed else float("nan")
        await w.stop_writers()
        # The first moment the new primary certainly acknowledged a write (less a margin): a
        # failure before it was a refusal by, or a broken stream to, a node not serving writes.
        first_new_ack = min([t_acc - t_kill, cy.client_resumed_s] if resumed else [t_acc - t_kill])
        fail_cut_rel = kill_rel + first_new_ack - CUT_MARGIN_S

        # ---- known writes on the new primary
        known_start = args.load_region + 4 * MiB  # never touched by the writers, another AL region
        plan = []
        for v, b in enumerate(range(known_start // BLOCK, (known_start + args.known) // BLOCK, KNOWN_WRITE_BLOCKS), 1):
            data = wl.make_write(seed, KNOWN_WRITER, v, b * BLOCK, KNOWN_WRITE_BLOCKS, BLOCK)
            plan.append((b * BLOCK, data))
            for i in range(KNOWN_WRITE_BLOCKS):
                model[b + i] = data[i * BLOCK:(i + 1) * BLOCK]
        client = await w.get_client()
        await client.write_many(plan, depth=8)

        new_blocks: set[int] = {probe_block}
        new_blocks.update(range(known_start // BLOCK, (known_start + args.known) // BLOCK))
        after_cut = [o.t_done for o in w.history.ops[ops0:] if o.status == wl.OK and o.t_done > fail_cut_rel]
        cy.client_first_ack_s = min(after_cut) - kill_rel if after_cut else float("nan")
        for o in w.history.ops[ops0:]:
            msg = re.sub(r"\d+(\.\d+)?", "N", o.error)[:160]
            if o.status == wl.FAIL and o.t_done > kill_rel and msg not in cy.client_errors and len(cy.client_errors) < 4:
                cy.client_errors.append(msg)
        # A workload write of this cycle is a new-primary change when it was acknowledged after
        # the kill (re-sent by the client to the new primary; the few acked by the old primary
        # just after the kill are counted too, which can only lower the ratio), failed after the
        # fail cut (it may have been applied), or never completed. A failure before the fail cut
        # was not applied by anyone: not counted ("excl").
        for o in w.history.ops[ops0:]:
            if o.status == wl.PENDING or (o.status == wl.OK and o.t_done > kill_rel):
                new_blocks.update(o.blocks(BLOCK))
            elif o.status == wl.FAIL and o.t_done > fail_cut_rel:
                new_blocks.update(o.blocks(BLOCK))
                cy.new_failed_ops += 1
            elif o.status == wl.FAIL and o.t_done > kill_rel:
                cy.excluded_ops += 1
        cy.new_bytes = len(new_blocks) * BLOCK

        # ---- fail-back: the old primary returns with its original command line
        wall_restart = time.time()
        t_restart = time.monotonic()
        await c.start_process(old)
        seen: list[tuple[int, int]] = []
        pair_failed: list[tuple[int, int]] = []  # the coordinator's failed extents: the divergent ones merged in
        deadline = t_restart + SYNC_TIMEOUT_S
        while True:
            ext = await divergent_of(old_addr)
            if sum(n for _, n in ext) > sum(n for _, n in seen):
                seen = ext
            st = await c.get_volume(VOL)
            fe = [(int(e.offset), int(e.length)) for e in st.failed_extents]
            if sum(n for _, n in fe) > sum(n for _, n in pair_failed):
                pair_failed = fe
            if sc.volume_status_dict(st)["state"] == "in_sync" and st.primary == new_addr:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"not in_sync {SYNC_TIMEOUT_S:g} s after the old primary's restart: "
                                   f"{sc.volume_status_dict(st)}")
            await asyncio.sleep(POLL_S)
        cy.failback_s = time.monotonic() - t_restart
        cy.sent = await resync_sent(new_addr) - sent0

        div_blocks: set[int] = set()
        # The resync can clear the old primary's report between two polls (a fast fail-back):
        # then the coordinator's failed extents (into which it merged them) stand in for them.
        src = seen or pair_failed
        if src:
            for off, n in src:
                div_blocks.update(range(off // BLOCK, (off + n + BLOCK - 1) // BLOCK))
            cy.divergent_bytes = len(div_blocks) * BLOCK
            cy.divergent_source = (f"NodeStatus: {len(seen)} extents" if seen
                                   else f"coordinator failed extents: {len(pair_failed)}")
        else:
            lines = h.log_lines_since(c.log_path(old), wall_restart, _DIVERGENT_LOG.pattern)
            m = _DIVERGENT_LOG.search(lines[-1][1]) if lines else None
            if m:
                cy.divergent_bytes = int(m.group(2))
                cy.divergent_source = f"log: {m.group(1)} extents (union approximated by the sum)"
            else:
                cy.divergent_source = "none reported"
        cy.rounds = ", ".join(
            f"r{m.group(1)} {m.group(2)} {h.fmt_size(int(m.group(3)))}"
            for _, line in h.log_lines_since(c.log_path(new), wall_restart, _ROUND_LOG.pattern)
            if (m := _ROUND_LOG.search(line))
        )
        cy.union_bytes = (len(new_blocks | div_blocks) * BLOCK if div_blocks
                          else cy.new_bytes + cy.divergent_bytes)
        cy.verify = await verify(c, w, model)
    except Exception as e:
        cy.error = f"{type(e).__name__}: {e}"[:400]
    finally:
        await w.stop_writers()
    return cy


async def run_mode(mode: str, args: argparse.Namespace, workdir: Path) -> ModeResult:
    res = ModeResult(mode)
    coord = ["--lease-s", str(args.lease_s)]
    if args.lease_drift_s is not None:
        coord += ["--lease-drift-s", str(args.lease_drift_s)]
    if args.node_timeout_s is not None:
        coord += ["--node-timeout-s", str(args.node_timeout_s)]
    c = LocalCluster(workdir / mode, coordinator_args=coord)
    w: wl.Workload | None = None
    coordinator_up = time.monotonic()  # no later than the coordinator's own start
    try:
        await c.start()
        await c.create_volume(VOL, args.size, BLOCK, auto_failover=mode == "auto",
                              resync_mode=args.resync_mode, timeout_s=60)
        model: dict[int, bytes] = {}
        # One workload for all the cycles of a mode: its history is the whole model of the
        # writers' region, so every cycle checks every acknowledged write since the start.
        w = wl.Workload(lambda: c.connect(VOL), seed=args.seed * 10 + (0 if mode == "auto" else 5),
                        block_size=BLOCK, max_blocks=16, regions=wl.split_regions(args.load_region, 4, BLOCK, 0))
        for run in range(1, args.runs + 1):
            cy = await one_cycle(c, mode, run, args, w, model, coordinator_up)
            res.cycles.append(cy)
            if cy.error:
                print(f"  {mode} run {run}: ERROR {cy.error}", flush=True)
                break  # the cluster's state is unknown: no further cycle on it
            print(
                f"  {mode} run {run}: killed {cy.killed} (its lease: {cy.lease_left_s:.2f} s left); failover {cy.failover_s:.2f} s (promote "
                f"{cy.promote_s:.2f} s, client resumed {_f(cy.client_resumed_s)} s, first client ack "
                f"{_f(cy.client_first_ack_s)} s); fail-back "
                f"{cy.failback_s:.2f} s sent {h.fmt_size(cy.sent)} for changes {h.fmt_size(cy.new_bytes)} + "
                f"divergent {h.fmt_size(cy.divergent_bytes)} [{cy.divergent_source}] (union {h.fmt_size(cy.union_bytes)}); "
                f"rounds: {cy.rounds or '?'}; {cy.verify}"
                + (f"; client errors after the kill: {cy.client_errors}" if cy.client_errors else ""),
                flush=True,
            )
    except Exception as e:
        res.error = f"{type(e).__name__}: {e}"[:400]
        print(f"  {mode}: ERROR {res.error}", flush=True)
    finally:
        if w is not None:
            await w.stop()
        await c.close()
    return res


def _median(vals: list[float]) -> float:
    vals = [v for v in vals if v == v]
    return statistics.median(vals) if vals else float("nan")


async def main_async(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-failover-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    load0 = h.loadavg()
    goal_s = args.lease_s + FAILOVER_SLACK_S
    drift = DEFAULT_LEASE_DRIFT_S if args.lease_drift_s is None else args.lease_drift_s
    ntimeout = DEFAULT_NODE_TIMEOUT_S if args.node_timeout_s is None else args.node_timeout_s
    print(
        f"bench_failover: volume {h.fmt_size(args.size)}, load region {h.fmt_size(args.load_region)} (4 writers), "
        f"known writes {h.fmt_size(args.known)}, resync {args.resync_mode}, {args.runs} runs per mode ({', '.join(args.modes)}); coordinator "
        f"lease {args.lease_s:g} s, lease drift {drift:g} s, node timeout {ntimeout:g} s; workdir {workdir}",
        flush=True,
    )
    results = [await run_mode(m, args, workdir) for m in args.modes]

    summary: dict[str, Any] = {}
    for r in results:
        ok = [c for c in r.cycles if not c.error]
        rows = []
        for c in r.cycles:
            if c.error:
                rows.append([c.run, c.killed, "", "", "", "", "", "", "", "", "", "", "", "", "", f"ERROR: {c.error[:80]}"])
                continue
            rows.append([
                c.run, c.killed, f"{c.lease_left_s:.2f}", f"{c.failover_s:.2f}", f"{c.failover_s / goal_s:.2f}", f"{c.promote_s:.2f}",
                f"{_f(c.client_resumed_s)}/{_f(c.client_first_ack_s)}", c.promote_refusals if r.mode == "manual" else "-",
                f"{c.failback_s:.2f}", h.fmt_size(c.sent),
                f"{h.fmt_size(c.new_bytes)} + {h.fmt_size(c.divergent_bytes)}", h.fmt_size(c.union_bytes),
                f"{c.new_failed_ops}/{c.excluded_ops}",
                f"{c.ratio_sum:.3f}", f"{c.ratio_union:.3f}", f"{c.ratio_no_divergent:.2f}",
            ])
        fo = _median([c.failover_s for c in ok])
        ru = max((c.ratio_union for c in ok), default=float("nan"))
        rs = max((c.ratio_sum for c in ok), default=float("nan"))
        summary[r.mode] = {
            "runs": len(ok),
            "errors": [c.error for c in r.cycles if c.error] + ([r.error] if r.error else []),
            "failover_s": [round(c.failover_s, 3) for c in ok],
            "failover_median_s": round(fo, 3),
            "failover_ratio_to_goal": round(fo / goal_s, 3),
            "promote_median_s": round(_median([c.promote_s for c in ok]), 3),
            "client_resumed_median_s": round(_median([c.client_resumed_s for c in ok]), 3),
            "failback_ratio_union_max": round(ru, 4),
            "failback_ratio_sum_max": round(rs, 4),
            "failback_ratio_no_divergent_max": round(max((c.ratio_no_divergent for c in ok), default=float("nan")), 4),
            "cycles": [asdict(c) for c in r.cycles],
        }
        h.print_table(
            f"{r.mode}: failover (kill -9 -> new primary acks a write) and fail-back; goal failover <= "
            f"lease {args.lease_s:g} s + {FAILOVER_SLACK_S:g} s = {goal_s:g} s, fail-back <= {FAILBACK_TARGET}",
            ["run", "killed", "lease left s", "failover s", "/goal", "promote s", "client new/any s", "refused", "fail-back s", "sent",
             "changes + divergent", "union", "failed/excl", "sent/sum", "sent/union", "sent/changes"],
            rows,
            note=(
                f"median failover {_f(fo)} s = {_f(fo / goal_s)} x goal -> "
                f"{'PASS' if fo <= goal_s else 'FAIL'}; fail-back worst sent/(changes + divergent) "
                f"{_f(rs, '{:.3f}')} -> {'PASS' if rs <= FAILBACK_TARGET else 'FAIL'} (the issue's measure); "
                f"worst sent/union {_f(ru, '{:.3f}')} -> {'PASS' if ru <= FAILBACK_TARGET else 'FAIL'} (stricter)"
                + (f"; ERROR {r.error}" if r.error else "")
            ),
        )
    print(
        "\nAccounting (by 4 KiB block, deduplicated): 'changes' = what the new primary wrote since the promotion:"
        "\nthe workload writes acked after the kill (or failed less than 0.1 s before its first ack, or never"
        "\ncompleted), the known writes and the probe; 'failed/excl' = failed writes counted / not counted (refused"
        "\nbefore the new primary served). 'divergent' = the old primary's divergent extents as it reported them"
        "\n(whole 4 MiB activity-log regions: here they hold the writers' whole region). sent/sum is the issue's"
        "\nmeasure (the goal); sent/union counts the blocks in both once: what a correct resync must send at least;"
        "\nsent/changes leaves the divergent extents out (context only: > 1 by the activity-log regions resent)."
    )
    print(f"\nloadavg at start: {load0}; at the end: {h.loadavg()}")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    print(f"command: {h.command_line()}")
    doc = {
        "bench": "failover", "command": h.command_line(), "size": args.size, "known_bytes": args.known,
        "load_region": args.load_region, "lease_s": args.lease_s, "lease_drift_s": drift,
        "node_timeout_s": ntimeout, "goal_failover_s": goal_s, "goal_failback_ratio": FAILBACK_TARGET,
        "modes": summary,
    }
    print("RESULT_JSON " + json.dumps(doc, default=lambda o: None if o != o else str(o)))
    if args.keep:
        print(f"workdir kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    failed = any(s["errors"] for s in summary.values())
    return 1 if failed else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from syncrep.units import parse_size

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 runs per mode (default 5)")
    p.add_argument("--runs", type=int, default=None, help="cycles per mode (default 5; --quick 2)")
    p.add_argument("--modes", default="auto,manual", help="auto,manual (default both)")
    p.add_argument("--lease-s", type=float, default=DEFAULT_LEASE_S, help="coordinator --lease-s (default 4)")
    p.add_argument("--lease-drift-s", type=float, default=None, help="coordinator --lease-drift-s (default its own)")
    p.add_argument("--node-timeout-s", type=float, default=None, help="coordinator --node-timeout-s (default its own)")
    p.add_argument("--size", default="64MiB", help="volume size (default 64MiB)")
    p.add_argument("--load-region", default="8MiB", help="where the writers write, from offset 0 (default 8MiB)")
    p.add_argument("--known", default="16MiB", help="bytes written on the new primary after the failover")
    p.add_argument("--resync-mode", choices=("direct", "rewrite"), default="direct",
                   help="the volume's resync variant (default direct, the coordinator's default)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workdir", default=None, help="cluster data and logs (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the workdir (logs, data) afterwards")
    a = p.parse_args(argv)
    a.runs = a.runs or (2 if a.quick else 5)
    a.modes = [m for m in a.modes.split(",") if m]
    for m in a.modes:
        if m not in ("auto", "manual"):
            p.error(f"unknown mode {m!r}")
    a.size, a.load_region, a.known = (parse_size(x) for x in (a.size, a.load_region, a.known))
    if a.load_region + 4 * MiB + a.known > a.size - BLOCK:
        p.error("--load-region + 4 MiB + --known must fit in --size (less one block for the probe)")
    return a


def main() -> int:
    return asyncio.run(main_async(parse_args()))


if __name__ == "__main__":
    sys.exit(main())
