"""Benchmark: fio over NBD, replicated vs unreplicated (the same export).

    python bench/bench_nbd.py [--quick] [--seconds N] [--durability sync os]

One run, per ``--durability``, on one fresh LocalCluster (coordinator, primary,
secondary as OS processes; the primary serves ``--nbd-listen``), with fio's
nbd ioengine (``--ioengine=nbd --uri=nbd://127.0.0.1:PORT/benchvol``):

* **4 KiB random write** at queue depth 1 and 32: IOPS, p50/p99 completion latency;
* **1 MiB sequential write** at queue depth 8: MiB/s.

Each cell first runs **replicated** (pair in_sync: every write on both nodes),
then **unreplicated**: the *same export* after ``kill -9`` of the secondary —
the primary runs degraded and acknowledges writes locally (tracking them for
resync). Before the unreplicated cells the working region is written once, so
they measure the steady local-only path rather than the one-off copy-on-write
change tracking of the first write to each block after the fault snapshot
(that first-touch rate is reported separately). The ratio replicated /
unreplicated is the cost of synchronous replication as an NBD client sees it.

fio runs time-based (``--runtime``, after ``--ramp_time``), no verify (tests
do that). Not a test: numbers are measured and printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import _harness as h
from _harness import GiB, KiB, MiB

from deploy.cluster import LocalCluster, free_port
from syncrep import client as sc

VOLUME = "benchvol"


@dataclass(frozen=True)
class Cell:
    name: str
    rw: str
    bs: int
    qd: int
    region: int  # bytes of the volume the cell writes over (0 = whole volume)


CELLS = (
    Cell("4 KiB randwrite QD1", "randwrite", 4 * KiB, 1, 256 * MiB),
    Cell("4 KiB randwrite QD32", "randwrite", 4 * KiB, 32, 256 * MiB),
    Cell("1 MiB seq write QD8", "write", 1 * MiB, 8, 0),
)


@dataclass
class FioResult:
    iops: float
    mib_s: float
    p50_ms: float
    p99_ms: float
    errors: int

    @classmethod
    def parse(cls, text: str) -> FioResult:
        doc = json.loads(text[text.index("{"):])
        job = doc["jobs"][0]
        w = job["write"]
        pct = w.get("clat_ns", {}).get("percentile", {})
        return cls(
            iops=float(w["iops"]),
            mib_s=float(w["bw_bytes"]) / MiB,
            p50_ms=float(pct.get("50.000000", 0.0)) / 1e6,
            p99_ms=float(pct.get("99.000000", 0.0)) / 1e6,
            errors=int(job.get("error", 0)),
        )


async def run_fio(url: str, cell: Cell, volume_bytes: int, seconds: float, ramp_s: float) -> FioResult:
    size = cell.region or volume_bytes
    argv = [
        "fio", "--name=bench", "--ioengine=nbd", f"--uri={url}", f"--rw={cell.rw}", f"--bs={cell.bs}",
        f"--iodepth={cell.qd}", f"--size={size}", "--time_based", f"--runtime={seconds:g}",
        f"--ramp_time={ramp_s:g}", "--randrepeat=0", "--norandommap", "--output-format=json",
    ]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"fio exited {proc.returncode}: {err.decode()[-2000:]}")
    return FioResult.parse(out.decode())


async def fill(url: str, nbytes: int) -> float:
    """Write [0, nbytes) once with 1 MiB sequential writes at QD8; seconds taken."""
    argv = ["fio", "--name=fill", "--ioengine=nbd", f"--uri={url}", "--rw=write", "--bs=1m", "--iodepth=8",
            f"--size={nbytes}", "--output-format=json"]
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"fio (fill) exited {proc.returncode}: {err.decode()[-2000:]}")
    return time.perf_counter() - t0


async def run_cluster(durability: str, args: argparse.Namespace, workdir: Path
                      ) -> tuple[dict[str, FioResult], dict[str, FioResult], list[str]]:
    notes: list[str] = []
    nbd_port = free_port()
    node_args = ["--durability", durability]
    c = LocalCluster(
        workdir / f"cluster-{durability}",
        primary_args=[*node_args, "--nbd-listen", f"127.0.0.1:{nbd_port}"],
        secondary_args=node_args,
        log_level="INFO",
    )
    url = f"nbd://127.0.0.1:{nbd_port}/{VOLUME}"
    rep: dict[str, FioResult] = {}
    unrep: dict[str, FioResult] = {}
    async with c:
        await c.create_volume(VOLUME, args.volume_bytes)
        # Replicated: written once first as well, so both sides measure overwrites.
        fill_s = await fill(url, args.volume_bytes)
        notes.append(f"[{durability}] replicated first fill of {h.fmt_size(args.volume_bytes)}: "
                     f"{args.volume_bytes / MiB / fill_s:.0f} MiB/s (not in the table)")
        for cell in CELLS:
            rep[cell.name] = r = await run_fio(url, cell, args.volume_bytes, args.seconds, args.ramp)
            print(f"  replicated   {durability:4} {cell.name:22} {r.iops:9.0f} IOPS {r.mib_s:8.1f} MiB/s "
                  f"p50 {r.p50_ms:7.2f} ms p99 {r.p99_ms:7.2f} ms", flush=True)
        st = await c.get_volume(VOLUME)
        if st.state != sc.STATE_VALUES["in_sync"]:
            notes.append(f"[{durability}] WARNING: pair not in_sync after the replicated cells: {st.last_error}")

        # Unreplicated: the same export with the secondary dead; the primary goes degraded.
        c.kill("secondary")
        await fill(url, 1 * MiB)  # the writes that notice the broken link (stall ~ --ack-timeout-s)
        await c.wait_for_volume(
            VOLUME, lambda s: s.state == sc.STATE_VALUES["degraded"] and not s.secondary_alive, timeout_s=60
        )
        fill_s = await fill(url, args.volume_bytes)
        notes.append(f"[{durability}] degraded first-touch of {h.fmt_size(args.volume_bytes)} (change tracking "
                     f"against the fault snapshot): {args.volume_bytes / MiB / fill_s:.0f} MiB/s (not in the table)")
        for cell in CELLS:
            unrep[cell.name] = r = await run_fio(url, cell, args.volume_bytes, args.seconds, args.ramp)
            print(f"  unreplicated {durability:4} {cell.name:22} {r.iops:9.0f} IOPS {r.mib_s:8.1f} MiB/s "
                  f"p50 {r.p50_ms:7.2f} ms p99 {r.p99_ms:7.2f} ms", flush=True)
        st = await c.get_volume(VOLUME)
        if st.state == sc.STATE_VALUES["in_sync"]:
            notes.append(f"[{durability}] WARNING: the pair is in_sync during the unreplicated cells")
    return rep, unrep, notes


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


async def main_async(args: argparse.Namespace) -> int:
    if shutil.which("fio") is None:
        print("bench_nbd: fio is not installed (scripts/setup.sh installs it)", file=sys.stderr)
        return 2
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-nbd-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"bench_nbd: {len(CELLS)} cells x {len(args.durability)} durabilities x (replicated + unreplicated), "
          f"{args.seconds:g} s each after {args.ramp:g} s ramp; volume {h.fmt_size(args.volume_bytes)}; "
          f"workdir {workdir}", flush=True)
    t0 = time.perf_counter()
    rows = []
    notes: list[str] = []
    for d in args.durability:
        rep, unrep, cluster_notes = await run_cluster(d, args, workdir)
        notes += cluster_notes
        for cell in CELLS:
            r, u = rep[cell.name], unrep[cell.name]
            big = cell.bs >= MiB
            rows.append([
                d, cell.name,
                f"{r.mib_s:.1f} MiB/s" if big else f"{r.iops:.0f} IOPS",
                f"{u.mib_s:.1f} MiB/s" if big else f"{u.iops:.0f} IOPS",
                _ratio(r.mib_s, u.mib_s) if big else _ratio(r.iops, u.iops),
                f"{r.p50_ms:.2f} / {r.p99_ms:.2f}",
                f"{u.p50_ms:.2f} / {u.p99_ms:.2f}",
            ])
    h.print_table(
        "fio over NBD (--ioengine=nbd): replicated vs unreplicated (same export, secondary killed)",
        ["durability", "cell", "replicated", "unreplicated", "repl/unrepl", "repl p50/p99 ms",
         "unrepl p50/p99 ms"],
        rows,
        note="unreplicated = the same primary and NBD export after kill -9 of the secondary: the pair is "
             "degraded and\nthe primary acknowledges writes locally (tracked for resync). Latency: fio "
             "completion latency (clat).",
    )
    for note in notes:
        print(note)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; loadavg at the end: {h.loadavg()}")
    print(f"command: {h.command_line()}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"workdir kept: {workdir}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 s cells, 1 s ramp, a 256 MiB volume")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per cell")
    ap.add_argument("--ramp", type=float, default=2.0, help="fio --ramp_time per cell (not measured)")
    ap.add_argument("--volume-bytes", type=int, default=1 * GiB, help="volume size in bytes")
    ap.add_argument("--durability", nargs="+", choices=("sync", "os"), default=["sync"],
                    help="node --durability values to measure (one cluster each)")
    ap.add_argument("--workdir", default="", help="where clusters live (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the workdir (logs, data)")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.ramp, args.volume_bytes = 3.0, 1.0, 256 * MiB
    return args


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
