"""Benchmark: the replicated write path against a single-hop gRPC ceiling.

    python bench/bench_replication.py [--quick] [--seconds N]

One run measures, for 4 KiB and 1 MiB writes at queue depth 1 and 64 (IOPS,
MiB/s, p50/p99 latency, and the CPU each process used):

* **ceiling** — a separate process serving ``VolumeService.Write`` with
  ``syncrep.rpc.Server`` that acks every request at once (no disk): what one
  grpc.aio stream hop can carry on this machine.
* **replicated** — a real LocalCluster (coordinator, primary, secondary as OS
  processes), one volume in sync, for each ``--durability`` (sync, os).
* **unreplicated** — the same cluster after ``kill -9`` of the secondary: the
  primary is degraded and writes locally only. Before measuring, the working
  region is written once in the degraded state, so the cells measure the
  steady local-only path, not the one-off first-write change tracking
  (copy-on-write bookkeeping against the fault-recovery snapshot).

All three are driven by the same client: ``bench/_harness.WriteStream``, one
pipelined bidirectional ``Write`` stream, writes multiplexed by client_seq (as
``syncrep.client.VolumeClient`` does; ``--driver volumeclient`` uses VolumeClient
itself). Writes are sequential, wrapping over a region of the volume.

TLS (issue 11): the clusters run mutual TLS (the harness's default). With
``--tls both`` (the default) the first durability is also measured on a
plaintext cluster (``--insecure``), replicated cells only, and a third table
gives TLS / plaintext per cell and the primary's CPU-seconds per GiB in both
(goal: TLS costs less than 10% of throughput at 1 MiB). ``--tls on|off``
measures one of them only. The single-hop ceiling is always plaintext.

Targets (PASS/FAIL printed, nothing asserted):
* 4 KiB replicated IOPS at QD64 >= 1.0x the single-hop ceiling at QD1 (the
  unbatched ceiling: batching must make up for the second hop and the disk);
* 1 MiB replicated MiB/s at QD64 >= 0.7x the single-hop ceiling at QD64.
Not a test: timings are measured and printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _harness as h
from _harness import GiB, KiB, LoadResult, MiB

from deploy.cluster import LocalCluster
from syncrep import client as sc
from syncrep import rpc
from syncrep.pb import syncrep_pb2 as pb
from syncrep.pb import syncrep_pb2_grpc as pb_grpc

VOLUME = "benchvol"
SIZES = (4 * KiB, 1 * MiB)
DEPTHS = (1, 64)


def region_for(size: int, volume_bytes: int) -> int:
    """Working region of a cell: 4 KiB writes over 256 MiB, 1 MiB writes over the whole volume."""
    return min(volume_bytes, 256 * MiB) if size < MiB else volume_bytes


async def wait_degraded(c: LocalCluster, timeout_s: float = 30.0) -> None:
    await c.wait_for_volume(
        VOLUME,
        lambda st: st.state == sc.STATE_VALUES["degraded"] and st.fault_snapshot_id != 0,
        timeout_s=timeout_s,
    )


async def run_cluster(
    durability: str,
    cells: list[tuple[int, int]],
    args: argparse.Namespace,
    workdir: Path,
    *,
    tls: bool = True,
    replicated_only: bool = False,
) -> tuple[dict[tuple[int, int], LoadResult], dict[tuple[int, int], LoadResult], list[str]]:
    """Replicated then (unless ``replicated_only``) unreplicated cells on one fresh cluster."""
    notes: list[str] = []
    node_args = ["--durability", durability]
    sec = "tls" if tls else "plain"
    c = LocalCluster(
        workdir / f"cluster-{durability}-{sec}", primary_args=node_args, secondary_args=node_args,
        log_level="INFO", tls=tls,
    )
    rep: dict[tuple[int, int], LoadResult] = {}
    unrep: dict[tuple[int, int], LoadResult] = {}
    async with c:
        await c.create_volume(VOLUME, args.volume_bytes)
        pids = {"client": None, "primary": c.pid("primary"), "secondary": c.pid("secondary")}
        for size, qd in cells:
            s = h.open_stream(args.driver, c.primary_addr, VOLUME)
            try:
                rep[(size, qd)] = r = await h.run_load(
                    s,
                    size=size,
                    qd=qd,
                    seconds=args.seconds,
                    warmup_s=args.warmup,
                    region_offset=0,
                    region_bytes=region_for(size, args.volume_bytes),
                    cpu_pids=pids,
                )
            finally:
                await s.close()
            print(
                f"  replicated   {durability:4} {sec:5} {h.fmt_size(size):>7} QD{qd:<3} {r.iops:9.0f} IOPS "
                f"{r.mib_s:8.1f} MiB/s p50 {r.lat_ms(50):7.2f} ms p99 {r.lat_ms(99):7.2f} ms"
                + (f"  ERRORS {r.errors}: {r.first_error}" if r.errors else ""),
                flush=True,
            )
        st = await c.get_volume(VOLUME)
        if st.state != sc.STATE_VALUES["in_sync"]:
            notes.append(
                f"[{durability}] WARNING: after the replicated cells the pair is "
                f"{sc.STATE_NAMES.get(st.state)} ({st.last_error})"
            )
        if replicated_only:
            return rep, unrep, notes

        # Unreplicated: kill -9 the secondary; the primary goes degraded and writes alone.
        c.kill("secondary")
        s = h.open_stream(args.driver, c.primary_addr, VOLUME)
        try:
            await s.write(0, b"\0" * 4096)  # the write that notices (or follows) the broken link
        except Exception as e:
            notes.append(f"[{durability}] first write after kill -9 failed: {e}")
        await s.close()
        await wait_degraded(c)
        # The coordinator counts the killed secondary alive for --node-timeout-s (3 s) and may try
        # a resync against it meanwhile (it fails; the attempt leaves a resync snapshot behind).
        # Wait until it is counted dead, so no snapshot appears after the touch below.
        await c.wait_for_volume(VOLUME, lambda st: not st.secondary_alive, timeout_s=30.0)
        snaps = await list_snapshots(c.primary_addr)
        notes.append(f"[{durability}] primary snapshots while degraded: {', '.join(snaps) or 'none'}")
        # Touch the whole working region once, so the cells below see only overwrites.
        t0 = time.perf_counter()
        s = h.open_stream(args.driver, c.primary_addr, VOLUME)
        try:
            offs = list(range(0, args.volume_bytes, MiB))
            buf = bytes(MiB)
            sem = asyncio.Semaphore(16)

            async def one(o: int) -> None:
                async with sem:
                    await s.write(o, buf)

            await asyncio.gather(*(one(o) for o in offs))
        finally:
            await s.close()
        touch_s = time.perf_counter() - t0
        notes.append(
            f"[{durability}] degraded first-touch of {h.fmt_size(args.volume_bytes)} with 1 MiB writes "
            f"at QD16 (change tracking against the fault snapshot): {touch_s:.2f} s = "
            f"{args.volume_bytes / MiB / touch_s:.0f} MiB/s (not in the table)"
        )
        pids = {"client": None, "primary": c.pid("primary")}
        for size, qd in cells:
            s = h.open_stream(args.driver, c.primary_addr, VOLUME)
            try:
                unrep[(size, qd)] = r = await h.run_load(
                    s,
                    size=size,
                    qd=qd,
                    seconds=args.seconds,
                    warmup_s=args.warmup,
                    region_offset=0,
                    region_bytes=region_for(size, args.volume_bytes),
                    cpu_pids=pids,
                )
            finally:
                await s.close()
            print(
                f"  unreplicated {durability:4} {h.fmt_size(size):>7} QD{qd:<3} {r.iops:9.0f} IOPS "
                f"{r.mib_s:8.1f} MiB/s p50 {r.lat_ms(50):7.2f} ms p99 {r.lat_ms(99):7.2f} ms"
                + (f"  ERRORS {r.errors}: {r.first_error}" if r.errors else ""),
                flush=True,
            )
        st = await c.get_volume(VOLUME)
        if st.state == sc.STATE_VALUES["in_sync"]:
            notes.append(f"[{durability}] WARNING: the pair is in_sync during the unreplicated cells")
    return rep, unrep, notes


async def list_snapshots(addr: str) -> list[str]:
    async with rpc.channel(addr) as ch:
        reply = await pb_grpc.NodeServiceStub(ch).ListSnapshots(
            pb.ListSnapshotsRequest(volume=VOLUME), timeout=5.0
        )
    return [s.name for s in reply.snapshots]


def _cpu_s_per_gib(r: LoadResult, who: str) -> float:
    """CPU-seconds process ``who`` used per GiB written during the cell."""
    gib_s = r.mib_s / 1024.0
    return (r.cpu.get(who, 0.0) / 100.0) / gib_s if gib_s else 0.0


def _cpu(r: LoadResult) -> str:
    return " ".join(f"{k if k == 'all' else k[0]}{v:.0f}" for k, v in r.cpu.items())


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


async def main_async(args: argparse.Namespace) -> int:
    cells = [(s, q) for s in SIZES for q in DEPTHS]
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-replication-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"bench_replication: {len(cells)} cells x (ceiling + {len(args.durability)} durabilities x "
        f"(replicated + unreplicated)), {args.seconds:g} s each after {args.warmup:g} s warm-up; "
        f"driver {args.driver}; workdir {workdir}",
        flush=True,
    )
    t_start = time.perf_counter()
    print(f"  loadavg at start: {h.loadavg()}", flush=True)
    ceiling = await h.measure_ceiling(cells, seconds=args.seconds, warmup_s=args.warmup, driver=args.driver)
    for (size, qd), r in ceiling.items():
        print(
            f"  ceiling           {h.fmt_size(size):>7} QD{qd:<3} {r.iops:9.0f} IOPS {r.mib_s:8.1f} MiB/s "
            f"p50 {r.lat_ms(50):7.2f} ms p99 {r.lat_ms(99):7.2f} ms",
            flush=True,
        )
    rep: dict[str, dict[tuple[int, int], LoadResult]] = {}
    unrep: dict[str, dict[tuple[int, int], LoadResult]] = {}
    notes: list[str] = []
    for d in args.durability:
        rep[d], unrep[d], n = await run_cluster(d, cells, args, workdir, tls=args.tls != "off")
        notes += n
    plain: dict[tuple[int, int], LoadResult] = {}
    if args.tls == "both":
        plain, _, n = await run_cluster(args.durability[0], cells, args, workdir, tls=False, replicated_only=True)
        notes += n

    # ---- table 1: every measurement
    rows = []
    for size, qd in cells:
        cr = ceiling[(size, qd)]
        rows.append(
            [
                "ceiling (1 hop, ack only)",
                h.fmt_size(size),
                qd,
                f"{cr.iops:.0f}",
                f"{cr.mib_s:.1f}",
                f"{cr.lat_ms(50):.2f}",
                f"{cr.lat_ms(99):.2f}",
                "",
                "",
                _cpu(cr),
            ]
        )
        for d in args.durability:
            for label, res in (("replicated", rep[d]), ("unreplicated", unrep[d])):
                r = res[(size, qd)]
                rows.append(
                    [
                        f"{label} ({d})",
                        h.fmt_size(size),
                        qd,
                        f"{r.iops:.0f}",
                        f"{r.mib_s:.1f}",
                        f"{r.lat_ms(50):.2f}",
                        f"{r.lat_ms(99):.2f}",
                        _ratio(rep[d][(size, qd)].iops, cr.iops) if label == "replicated" else "",
                        _ratio(rep[d][(size, qd)].iops, r.iops) if label == "unreplicated" else "",
                        _cpu(r) + (f" ERR{r.errors}" if r.errors else ""),
                    ]
                )
    h.print_table(
        "Write path: IOPS, throughput, latency (one Write stream; same driver for every row)",
        ["path", "size", "QD", "IOPS", "MiB/s", "p50 ms", "p99 ms", "repl/ceiling", "repl/unrepl", "CPU %"],
        rows,
        note=(
            "repl/ceiling: replicated / ceiling at the same size and QD; repl/unrepl: replicated / "
            "unreplicated at the same durability, size and QD.\n"
            "CPU %: of one core during the cell (c=client/bench process, a=ack server, p=primary, "
            "s=secondary), all=the whole machine (2 cores: max 200;\n  all well above the sum of ours means "
            "other processes competed for the CPU during that cell)."
        ),
    )

    # ---- table 2: targets
    trows = []
    verdicts = []
    c4 = ceiling[(4 * KiB, 1)]
    c1m = ceiling[(1 * MiB, 64)]
    for d in args.durability:
        r4 = rep[d][(4 * KiB, 64)]
        r4q1 = rep[d][(4 * KiB, 1)]
        r1m = rep[d][(1 * MiB, 64)]
        ok4 = r4.iops >= 1.0 * c4.iops
        ok1m = r1m.mib_s >= 0.7 * c1m.mib_s
        verdicts += [ok4, ok1m]
        trows.append(
            [
                d,
                "4 KiB IOPS: replicated QD64 / ceiling QD1",
                f"{r4.iops:.0f} / {c4.iops:.0f}",
                _ratio(r4.iops, c4.iops),
                ">= 1.0x",
                "PASS" if ok4 else "FAIL",
            ]
        )
        trows.append(
            [
                d,
                "4 KiB IOPS: replicated QD1 / ceiling QD1 (info)",
                f"{r4q1.iops:.0f} / {c4.iops:.0f}",
                _ratio(r4q1.iops, c4.iops),
                "",
                "",
            ]
        )
        trows.append(
            [
                d,
                "1 MiB MiB/s: replicated QD64 / ceiling QD64",
                f"{r1m.mib_s:.1f} / {c1m.mib_s:.1f}",
                _ratio(r1m.mib_s, c1m.mib_s),
                ">= 0.7x",
                "PASS" if ok1m else "FAIL",
            ]
        )
    h.print_table("Targets", ["durability", "metric", "measured", "ratio", "target", "verdict"], trows)
    if plain:
        d = args.durability[0]
        tls_rows = []
        for size, qd in cells:
            t, p0 = rep[d][(size, qd)], plain[(size, qd)]
            goal = ">= 0.90x" if size >= MiB else ""
            verdict = ("PASS" if t.mib_s >= 0.9 * p0.mib_s else "FAIL") if goal else ""
            tls_rows.append([
                d, h.fmt_size(size), qd, f"{p0.mib_s:.1f}", f"{t.mib_s:.1f}", _ratio(t.mib_s, p0.mib_s),
                f"{p0.lat_ms(50):.2f} / {t.lat_ms(50):.2f}", f"{_cpu_s_per_gib(p0, 'primary'):.2f}",
                f"{_cpu_s_per_gib(t, 'primary'):.2f}", f"{_cpu_s_per_gib(p0, 'secondary'):.2f}",
                f"{_cpu_s_per_gib(t, 'secondary'):.2f}", goal, verdict,
            ])
        h.print_table(
            "TLS cost: replicated, mutual TLS vs plaintext (--insecure), same machine, same run",
            ["durability", "size", "QD", "plain MiB/s", "TLS MiB/s", "TLS/plain", "p50 ms plain / TLS",
             "primary CPU s/GiB plain", "TLS", "secondary CPU s/GiB plain", "TLS", "goal", "verdict"],
            tls_rows,
            note="CPU s/GiB: CPU-seconds the process used per GiB written (from its CPU % and the throughput); "
                 "independent of the number of cores.",
        )
    for n in notes:
        print(n)
    print(f"\nloadavg at the end: {h.loadavg()}")
    print(
        f"total {time.perf_counter() - t_start:.0f} s; unreplicated = LocalCluster with the secondary "
        "killed (-9) after volume creation: the primary is degraded and writes locally only."
    )
    print(f"command: {h.command_line()}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"workdir kept: {workdir}")
    del verdicts  # PASS/FAIL is reported, never turned into an exit status
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short cells (2 s) and a 256 MiB volume")
    p.add_argument(
        "--seconds", type=float, default=None, help="measured seconds per cell (default 5; --quick 2)"
    )
    p.add_argument(
        "--warmup", type=float, default=None, help="warm-up seconds per cell (default 1; --quick 0.5)"
    )
    p.add_argument(
        "--durability",
        default="sync,os",
        help="comma-separated node --durability values to measure (default: sync,os)",
    )
    p.add_argument(
        "--volume-size", default=None, help="volume size, e.g. 1GiB (default 1GiB; --quick 256MiB)"
    )
    p.add_argument(
        "--driver",
        choices=("raw", "volumeclient"),
        default="raw",
        help="client: the minimal Write-stream driver, or syncrep.client.VolumeClient",
    )
    p.add_argument("--tls", choices=("both", "on", "off"), default="both",
                   help="mutual TLS (on), plaintext (off), or TLS plus a plaintext run of the first durability "
                        "for the TLS-cost table (both, the default)")
    p.add_argument("--workdir", default=None, help="cluster data and logs (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the workdir (logs) afterwards")
    a = p.parse_args(argv)
    a.seconds = a.seconds if a.seconds is not None else (2.0 if a.quick else 5.0)
    a.warmup = a.warmup if a.warmup is not None else (0.5 if a.quick else 1.0)
    a.durability = [d.strip() for d in a.durability.split(",") if d.strip()]
    for d in a.durability:
        if d not in ("sync", "os"):
            p.error(f"--durability: {d!r} is not sync or os")
    from syncrep.units import parse_size

    a.volume_bytes = parse_size(a.volume_size) if a.volume_size else (256 * MiB if a.quick else 1 * GiB)
    return a


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(main_async(parse_args()))


if __name__ == "__main__":
    sys.exit(main())
