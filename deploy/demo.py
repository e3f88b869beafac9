"""``syncrep demo``: the guided tour on a local cluster.

A coordinator, a primary and a secondary as separate processes on loopback
ports (:class:`deploy.cluster.LocalCluster`), a volume, a workload from
several concurrent writers, then the story of a failure: the secondary NACKs
(degraded, failed extents), writes go on while degraded, the fault is cleared
and the resync is watched to in_sync, kill -9 of the secondary under load, a
second resync, ``syncrep verify``, and a block-by-block readback of both
replicas against the model of what the client wrote.

The command line (flags, help) is :mod:`syncrep.cli`'s; it calls :func:`main`.
The workload and the model are :mod:`deploy.workload`'s: every block written
is self-describing, so the readback checks each block against the writes
that were acknowledged -- and the ones that failed, which may or may not
have landed -- rather than against a copy of the bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from deploy.cluster import LocalCluster
from deploy.workload import (
    MIXED_SIZES,
    BlockReport,
    Workload,
    blocks_from_bytes,
    check_blocks,
    differing_blocks,
    split_regions,
)
from syncrep.cli import EXIT_ERROR, EXIT_OK, size_text, state_line, verify_extent_lines, verify_summary
from syncrep.client import VolumeClient, inject_fault, node_status, read_local, volume_status_dict
from syncrep.core.vocab import MAX_WRITE_BYTES
from syncrep.units import format_size
from syncrep.verify import verify_volume


class DemoFailure(Exception):
    """A demo step found something wrong (e.g. the replicas differ)."""


#: Flags of the demo's nodes: the NACK step arms a test fault on the secondary.
DEMO_NODE_ARGS = ("--enable-fault-injection",)
#: The demo's coordinator: nodes report (and the status shows) every 0.25 s.
DEMO_COORDINATOR_ARGS = ("--heartbeat-interval-s", "0.25")
#: Bound on each wait for a state in the demo.
DEMO_WAIT_S = 30.0
#: The largest write of the workload (1 MiB); the background load of the
#: kill -9 step writes at most 64 KiB.
DEMO_MAX_BLOCKS = 256
LOAD_MAX_BLOCKS = 16


@dataclass
class DemoContext:
    """State shared by the demo steps. Steps may add to ``facts``."""

    cluster: LocalCluster
    volume: str = "demo"
    size_bytes: int = 64 * 1024 * 1024
    block_size: int = 4096
    writes: int = 320
    streams: int = 8
    seed: int = 0
    out: IO[str] = field(default_factory=lambda: sys.stdout)
    facts: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # One writer per stream, each on its own region, for the whole demo:
        # the model orders a block's writes by their writer's version.
        self.workload = Workload(
            self._connect,
            seed=self.seed,
            regions=split_regions(self.size_bytes, self.streams, self.block_size),
            block_size=self.block_size,
            max_blocks=DEMO_MAX_BLOCKS,
            sizes=MIXED_SIZES,
        )
        self.t_start = time.monotonic()

    @property
    def sec(self) -> str:
        """The security flags of the commands the demo shows."""
        return " ".join(self.cluster.security_args())

    async def _connect(self) -> VolumeClient:
        return await VolumeClient.connect(self.cluster.coordinator_addr, self.volume)

    @property
    def client(self) -> VolumeClient | None:
        return self.workload.client

    @property
    def acked_writes(self) -> int:
        """Every write acknowledged to the client, over the whole demo."""
        return self.workload.acked

    @property
    def acked_bytes(self) -> int:
        return self.workload.acked_bytes

    def say(self, text: str = "") -> None:
        for line in text.splitlines() or [""]:
            print(f"    {line}", file=self.out, flush=True)

    async def status(self) -> dict[str, Any]:
        return volume_status_dict(await self.cluster.get_volume(self.volume))

    async def resync_bytes_sent(self) -> int:
        """The primary's own counter of resync bytes sent (the coordinator's
        copy lags by up to one heartbeat)."""
        reply = await node_status(self.cluster.primary_addr)
        for r in reply.volumes:
            if r.name == self.volume:
                return int(r.resync_bytes_sent)
        return int((await self.status())["resync_bytes_sent"])

    async def show_status(self) -> dict[str, Any]:
        v = await self.status()
        self.say(f"$ syncrep status --coordinator {self.cluster.coordinator_addr} {self.sec}")
        self.say(state_line(v))
        return v

    async def write_workload(self, writes: int) -> tuple[int, int, float]:
        """``writes`` random writes of mixed sizes (4 KiB .. 1 MiB) from all the
        writers at once, each writer waiting for each write before the next.
        A failure is raised. Returns (writes, bytes, seconds)."""
        n = self.streams
        counts = [writes // n + (1 if i < writes % n else 0) for i in range(n)]
        return await self.workload.write_each(counts)

    async def start_load(self, streams: int) -> tuple[int, int, int]:
        """Start a background load of small writes (4-64 KiB) from ``streams``
        of the writers, spread over the volume. A write that fails (the client
        cannot know whether it was applied) stays indeterminate in the model
        and the writer goes on. Returns the counters to pass to :meth:`stop_load`."""
        w = self.workload
        before = (w.acked, w.acked_bytes, w.failed)
        await w.start([i * self.streams // streams for i in range(streams)], max_blocks=LOAD_MAX_BLOCKS)
        return before

    async def stop_load(self, before: tuple[int, int, int]) -> tuple[int, int, int]:
        """Stop the load; (acknowledged writes, acknowledged bytes, failed writes) since it started."""
        w = self.workload
        await w.stop_writers()
        return w.acked - before[0], w.acked_bytes - before[1], w.failed - before[2]

    async def wait_state(self, want: Callable[[dict[str, Any]], bool], what: str,
                         timeout_s: float = DEMO_WAIT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            v = await self.status()
            if want(v):
                return v
            if time.monotonic() >= deadline:
                raise DemoFailure(f"the pair did not become {what} within {timeout_s:g} s "
                                  f"(last: {state_line(v)})")
            await asyncio.sleep(0.1)

    async def watch_resync(self, timeout_s: float = DEMO_WAIT_S) -> tuple[dict[str, Any], float]:
        """Poll the status and narrate the resync (state, round, bytes done of
        total, rate) until the pair is in_sync with both nodes up. Returns the
        final status and the seconds it took."""
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        last_key: tuple[Any, ...] = ()
        last_print = 0.0
        rounds_seen = False
        while True:
            v = await self.status()
            now = time.monotonic()
            done = v["state"] == "in_sync" and v["primary_alive"] and v["secondary_alive"]
            r = v["resync"]
            key = (v["state"], r["round"], r["bytes_done"], r["bytes_total"], v["last_error"])
            if key != last_key and (done or key[:1] != last_key[:1] or now - last_print >= 0.3):
                elapsed = f"+{now - t0:.1f} s"
                self.say(f"{elapsed:>7}  {self._progress_text(v, rounds_seen)}")
                last_key, last_print = key, now
            rounds_seen = rounds_seen or bool(r["bytes_total"])
            if done:
                return v, now - t0
            if now >= deadline:
                raise DemoFailure(f"the pair did not get back in sync within {timeout_s:g} s "
                                  f"(last: {state_line(v)})")
            await asyncio.sleep(0.1)

    @staticmethod
    def _progress_text(v: dict[str, Any], rounds_seen: bool = False) -> str:
        r = v["resync"]
        state = v["state"]
        if state == "in_sync":
            return "in_sync: the secondary is identical to the primary again; replication is synchronous"
        text = f"{state:<9}"
        if not v["secondary_alive"]:
            text += "  secondary DOWN"
        if r["bytes_total"]:
            pct = 100.0 * r["bytes_done"] / r["bytes_total"]
            text += (f"  round {r['round']}: {format_size(r['bytes_done'])} of {format_size(r['bytes_total'])} "
                     f"({pct:.0f}%), {format_size(r['rate_bytes_per_s'])}/s")
        elif state == "resyncing":
            text += "  next round (a new diff snapshot)" if rounds_seen else "  starting"
        if state == "degraded" and v["last_error"]:
            text += f"  ({' '.join(v['last_error'].split())[:110]})"
        return text

    def describe_failed(self, v: dict[str, Any], limit: int = 4) -> str:
        ext = v["failed_extents"]
        shown = ", ".join(f"[{e['offset']}, +{e['length']})" for e in ext[:limit])
        more = f" and {len(ext) - limit} more" if len(ext) > limit else ""
        return (f"{len(ext)} failed extent(s), {format_size(v['failed_bytes'])}: {shown}{more}"
                if ext else "no failed extents")

    async def check_model(self) -> None:
        """Read every block of both replicas; raise DemoFailure unless both are
        identical to each other and the primary holds what the client wrote:
        each block the latest acknowledged version (or a later write that
        failed: it may or may not have landed), zeros where nobody wrote."""
        prim, sec = self.cluster.primary_addr, self.cluster.secondary_addr
        bs = self.block_size
        history = self.workload.history
        step = MAX_WRITE_BYTES // bs * bs
        differ: list[int] = []
        rep = BlockReport()
        for off in range(0, self.size_bytes, step):
            n = min(step, self.size_bytes - off)
            a, b = await asyncio.gather(
                read_local(prim, self.volume, off, n), read_local(sec, self.volume, off, n)
            )
            differ += differing_blocks(a, b, bs, off)
            piece = range(off // bs, (off + n) // bs)
            rep.extend(check_blocks(history, blocks_from_bytes(a, off, bs, piece), blocks=piece))
        blocks = self.size_bytes // bs
        if differ or not rep.ok:
            if differ:
                self.say(f"ReadLocal: {len(differ)} of {blocks} blocks DIFFER between the replicas "
                         f"(first at offsets {differ[:5]}).")
            if not rep.ok:
                self.say(f"ReadLocal: {len(rep.findings)} blocks on the primary do not hold what the client "
                         f"wrote (first at offsets {[f.offset for f in rep.findings[:5]]}).")
                for line in rep.summary(limit=5).splitlines()[1:]:
                    self.say(line)
            raise DemoFailure("the replicas are not identical")
        self.say(
            f"ReadLocal: all {blocks} blocks of {bs} B read from each replica: identical, "
            f"and equal to what the client wrote ({self.acked_writes} acknowledged writes)."
        )


DemoStepFn = Callable[[DemoContext], Awaitable[None]]


@dataclass(frozen=True)
class DemoStep:
    title: str
    run: DemoStepFn


async def demo_start_cluster(ctx: DemoContext) -> None:
    ctx.say("Starting a coordinator, a primary and a secondary as separate processes on loopback ports...")
    t0 = time.monotonic()
    await ctx.cluster.start()
    c = ctx.cluster
    ctx.say(f"coordinator  {c.coordinator_addr}   (pid {c.pid('coordinator')})")
    ctx.say(f"primary      {c.primary_addr}   (pid {c.pid('primary')})")
    ctx.say(f"secondary    {c.secondary_addr}   (pid {c.pid('secondary')})")
    ctx.say(f"All three healthy after {time.monotonic() - t0:.1f} s. Logs: {c.workdir}/<name>.log")
    ctx.say("(The nodes run with --enable-fault-injection so the demo can make the secondary fail writes.)")


async def demo_create_volume(ctx: DemoContext) -> None:
    c = ctx.cluster
    ctx.say(
        f"$ syncrep volume create {ctx.volume} --size {size_text(ctx.size_bytes)} "
        f"--primary {c.primary_addr} --secondary {c.secondary_addr} --coordinator {c.coordinator_addr} {ctx.sec}"
    )
    st = await c.create_volume(ctx.volume, ctx.size_bytes, ctx.block_size)
    v = volume_status_dict(st)
    ctx.say(
        f"Volume {ctx.volume!r}: {format_size(v['size_bytes'])} in blocks of {v['block_size']} B, "
        f"state {v['state']}, epoch {v['epoch']}. Every write to the primary is now also written to "
        "the secondary before it is acknowledged."
    )


async def demo_write_workload(ctx: DemoContext) -> None:
    ctx.say(
        f"{ctx.streams} concurrent writers send {ctx.writes} random writes of 4 KiB to 1 MiB, all over "
        "ONE bidirectional Write stream to the primary..."
    )
    n, nbytes, secs = await ctx.write_workload(ctx.writes)
    ctx.facts["workload"] = {"writes": n, "bytes": nbytes, "seconds": secs}
    ctx.say(
        f"{n} writes, {format_size(nbytes)} acknowledged in {secs:.2f} s "
        f"({n / secs if secs else 0:.0f} writes/s, {format_size(nbytes / secs if secs else 0)}/s). "
        "Each acknowledgement means both nodes have the data."
    )


async def demo_show_status(ctx: DemoContext) -> None:
    # The coordinator learns the nodes' sequence numbers from heartbeats: give
    # it a moment to catch up so the numbers tell the settled story.
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        v = await ctx.status()
        if v["acked_seq"] == v["last_seq"]:
            break
        await asyncio.sleep(0.2)
    v = await ctx.show_status()
    if v["state"] == "in_sync":
        ctx.say(
            f"The pair is in_sync: the secondary acknowledged every replicated write "
            f"(through seq {v['acked_seq']}); no failed extents."
        )
    else:
        ctx.say(f"The pair is {v['state']}.")


async def demo_nack(ctx: DemoContext) -> None:
    sec = ctx.cluster.secondary_addr
    msg = await inject_fault(sec, ctx.volume, "enospc", count=1_000_000)
    ctx.say(f"Test hook on the secondary {sec}: every store write now fails with ENOSPC ({msg}).")
    writes = max(8, ctx.writes // 5)
    ctx.say(f"Writing {writes} more random writes from {ctx.streams} writers...")
    n, nbytes, secs = await ctx.write_workload(writes)
    try:
        # Usually caught while degraded; the coordinator soon starts (failing) resync attempts.
        v = await ctx.wait_state(lambda v: v["state"] == "degraded" and bool(v["failed_extents"]), "degraded",
                                 timeout_s=3.0)
    except DemoFailure:
        v = await ctx.wait_state(lambda v: v["state"] != "in_sync" and bool(v["failed_extents"]), "degraded")
    ctx.say(
        f"{n} writes, {format_size(nbytes)} acknowledged in {secs:.2f} s — by the primary alone once the "
        "secondary started answering with NACKs (method step 1: each NACK names the failed write)."
    )
    ctx.say(state_line(v))
    ctx.say(
        f"The pair went degraded. The coordinator derived {ctx.describe_failed(v)}. The primary took a "
        f"fault-recovery snapshot (id {v['fault_snapshot_id']}) under a brief quiesce (method step 2) "
        f"and keeps serving writes alone."
    )
    ctx.facts["nack_failed_bytes"] = v["failed_bytes"]


async def demo_write_degraded(ctx: DemoContext) -> None:
    writes = max(8, ctx.writes // 4)
    ctx.say(f"Writing {writes} more random writes while degraded...")
    n, nbytes, secs = await ctx.write_workload(writes)
    ctx.say(
        f"{n} writes, {format_size(nbytes)} acknowledged in {secs:.2f} s. They are on the primary only, "
        "tracked as blocks changed since the fault-recovery snapshot: resync will send them, and "
        "nothing else."
    )
    # The coordinator already tries to resync (both nodes are alive); the
    # secondary refuses the stream while its fault is armed.
    deadline = time.monotonic() + 1.5
    v = await ctx.status()
    while time.monotonic() < deadline and "resync" not in v["last_error"]:
        await asyncio.sleep(0.1)
        v = await ctx.status()
    ctx.say(state_line(v))
    if v["last_error"]:
        ctx.say(
            "Both nodes are up, so the coordinator already tries to resync; the secondary still refuses "
            "(its disk is 'full'), and the attempts are retried with backoff."
        )


async def demo_clear_and_resync(ctx: DemoContext) -> None:
    await inject_fault(ctx.cluster.secondary_addr, ctx.volume, "clear")
    ctx.say("Clearing the fault on the secondary. The next resync attempt goes through; watching it "
            "(method step 3):")
    _, secs = await ctx.watch_resync()
    sent = await ctx.resync_bytes_sent()
    ctx.facts["resync1"] = {"seconds": secs, "bytes": sent}
    ctx.say(
        f"Back in sync {secs:.1f} s after the fault was cleared: the resync sent {format_size(sent)} "
        f"(the failed extents plus the blocks written since the fault) of a {format_size(ctx.size_bytes)} "
        "volume."
    )


async def demo_kill_secondary(ctx: DemoContext) -> None:
    c = ctx.cluster
    streams = max(1, min(4, ctx.streams))
    ctx.say(f"Starting a write load ({streams} writers of 4-64 KiB writes), then `kill -9` the secondary...")
    load = await ctx.start_load(streams)
    try:
        await asyncio.sleep(0.5)
        pid = c.pid("secondary")
        c.kill("secondary")
        ctx.say(f"$ kill -9 {pid}   (the secondary, {c.secondary_addr})")
        v = await ctx.wait_state(lambda v: v["state"] == "degraded" and v["fault_snapshot_id"] > 0, "degraded")
        ctx.say(state_line(v))
        ctx.say(
            f"The primary lost its replication stream and went degraded: {ctx.describe_failed(v)} "
            "(the writes in flight without an ack). Its writers did not stop."
        )
        await asyncio.sleep(0.5)
    finally:
        n, nbytes, failed = await ctx.stop_load(load)
    ctx.say(
        f"The load wrote {n} writes, {format_size(nbytes)}, all acknowledged"
        + (f" ({failed} failed: their content is indeterminate)" if failed else "")
        + "."
    )
    ctx.facts["kill_load"] = {"writes": n, "bytes": nbytes, "failed": failed}


async def demo_restart_and_resync(ctx: DemoContext) -> None:
    c = ctx.cluster
    before = await ctx.resync_bytes_sent()
    t0 = time.monotonic()
    await c.start_process("secondary")
    ctx.say(f"Restarted the secondary (pid {c.pid('secondary')}, same address and data) in "
            f"{time.monotonic() - t0:.1f} s. Watching the resync:")
    _, secs = await ctx.watch_resync()
    sent = await ctx.resync_bytes_sent() - before
    ctx.facts["resync2"] = {"seconds": secs, "bytes": sent}
    ctx.say(f"Back in sync {secs:.1f} s after the restart; this resync sent {format_size(sent)}.")


async def demo_verify(ctx: DemoContext) -> None:
    c = ctx.cluster
    ctx.say(f"$ syncrep verify {ctx.volume} --coordinator {c.coordinator_addr} {ctx.sec}")
    r = await verify_volume(c.coordinator_addr, ctx.volume)
    ctx.say(verify_summary(r))
    for line in verify_extent_lines(r):
        ctx.say(line)
    ctx.facts["verify"] = r
    v = await ctx.status()
    if not r.identical:
        raise DemoFailure(f"verify found {len(r.mismatches)} mismatching extent(s)")
    if v["state"] != "in_sync":
        raise DemoFailure(f"the pair is {v['state']}, not in_sync")
    ctx.say("And reading back every block from BOTH replicas (NodeService.ReadLocal on each node)...")
    await ctx.check_model()


async def demo_summary(ctx: DemoContext) -> None:
    v = await ctx.status()
    resynced = await ctx.resync_bytes_sent()
    size = ctx.size_bytes
    w = 25
    ctx.say(f"{'Writes acknowledged:':<{w}}{ctx.acked_writes} ({format_size(ctx.acked_bytes)}), none lost.")
    for key, label in (("resync1", "Resync after the NACKs:"), ("resync2", "Resync after kill -9:")):
        f = ctx.facts.get(key)
        if f:
            ctx.say(f"{label:<{w}}{format_size(f['bytes'])} in {f['seconds']:.1f} s")
    ctx.say(
        f"{'Bytes resynced:':<{w}}{format_size(resynced)} in total for two failures, "
        f"{100.0 * resynced / size:.0f}% of the {format_size(size)} volume "
        f"(two full copies would have sent {format_size(2 * size)})."
    )
    ctx.say(f"{'Final state:':<{w}}{v['state']}, epoch {v['epoch']}; verify: identical.")


#: The demo, in order.
DEMO_STEPS: list[DemoStep] = [
    DemoStep("Start a local cluster", demo_start_cluster),
    DemoStep("Create a replicated volume", demo_create_volume),
    DemoStep("Write a workload", demo_write_workload),
    DemoStep("Show the status", demo_show_status),
    DemoStep("The secondary fails writes (NACK): the pair goes degraded", demo_nack),
    DemoStep("Keep writing while degraded", demo_write_degraded),
    DemoStep("Clear the fault: resync", demo_clear_and_resync),
    DemoStep("kill -9 the secondary under a write load", demo_kill_secondary),
    DemoStep("Restart the secondary: resync again", demo_restart_and_resync),
    DemoStep("Verify that the replicas are identical", demo_verify),
    DemoStep("Summary", demo_summary),
]


async def run_demo(ctx: DemoContext, steps: Sequence[DemoStep] = ()) -> None:
    """Run ``steps`` (default: DEMO_STEPS) in order; stop the writers, close
    the client and the cluster."""
    steps = list(steps) or DEMO_STEPS
    try:
        for i, step in enumerate(steps, 1):
            print(f"\n[{i}/{len(steps)}] {step.title}", file=ctx.out, flush=True)
            await step.run(ctx)
    finally:
        with contextlib.suppress(Exception):
            await ctx.workload.stop()
        await ctx.cluster.close()


def main(*, workdir: Path | None, keep: bool, size: int, writes: int, streams: int, seed: int | None,
         log_level: str) -> int:
    """``syncrep demo`` (the flags of the same names); the exit status."""
    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="syncrep-demo-")) if workdir is None else workdir
    workdir.mkdir(parents=True, exist_ok=True)
    seed = seed if seed is not None else random.randrange(2**32)
    cluster = LocalCluster(
        workdir,
        log_level=log_level,
        coordinator_args=DEMO_COORDINATOR_ARGS,
        primary_args=DEMO_NODE_ARGS,
        secondary_args=DEMO_NODE_ARGS,
    )
    ctx = DemoContext(cluster=cluster, size_bytes=size, writes=writes, streams=streams, seed=seed)
    if log_level != "DEBUG":
        # The steps narrate what the harness does (e.g. the kill -9); keep its log lines out.
        logging.getLogger("deploy.cluster").setLevel(logging.WARNING)
    print(f"syncrep demo (seed {seed}, work directory {workdir})")
    print(f"Mutual TLS: a throwaway CA and certificates in {cluster.certs_dir} (CA key {cluster.ca_key}); "
          "every process and command presents its certificate.")
    ok = False
    try:
        asyncio.run(run_demo(ctx))
        ok = True
    except DemoFailure as e:
        print(f"\nDEMO FAILED: {e}. Logs: {workdir}")
        return EXIT_ERROR
    finally:
        if own and ok and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not ok:
            print(f"Logs and data kept in {workdir}", file=sys.stderr)
    print("\nThe replicas are identical. Done.")
    if not own or keep:
        print(f"Logs and data are in {workdir}")
    return EXIT_OK
