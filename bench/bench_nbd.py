"""Benchmark: fio over NBD, replicated vs unreplicated, mutual TLS vs plaintext.

    python bench/bench_nbd.py [--quick] [--seconds N] [--durability sync os] [--tls both|on|off]

Per ``--durability``, fresh LocalClusters (coordinator, primary, secondary as OS
processes; the primary serves ``--nbd-listen``), driven by fio's nbd ioengine
(libnbd):

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

TLS (issue 11). With ``--tls both`` (the default) every durability runs on two
clusters side by side, up at the same time: one with mutual TLS (the harness's
default: fio connects to ``nbds://127.0.0.1:PORT/benchvol``, NBD_OPT_STARTTLS
with the ``admin`` client certificate, and replication runs over mutual-TLS
gRPC), one with ``--insecure`` (fio on ``nbd://``, plaintext gRPC). The cells
alternate between the two (which one goes first alternates per cell), so the
load of a shared machine falls on both alike; a TLS-cost table gives TLS /
plaintext per cell, the CPU-seconds per GiB of the primary and of fio in both,
and the verdict against the goal "TLS costs less than 10% of throughput at
1 MiB" (every 1 MiB cell, replicated and unreplicated, at >= 0.90x).
Unreplicated isolates the NBD hop's TLS; replicated adds the replication
stream's. ``--tls on|off`` measures one of them only.

How fio gets its client certificate: fio's nbd engine passes the URI to
``nbd_connect_uri``, which refuses the ``tls-certificates=DIR`` query with
"local file access (tls-certificates) is not allowed, call
nbd_set_uri_allow_local_file to enable this: Operation not permitted" (fio
does not call it). Without that query libnbd loads the certificates from its
default directory: ``$HOME/.pki/libnbd`` (ca-cert.pem, client-cert.pem,
client-key.pem; written with syncrep.nbd.tls.write_nbd_client_dir) for a
non-root user, but ``/etc/pki/libnbd`` for root, a system-wide directory a
benchmark must not write. So fio runs with ``HOME`` set to a private
directory, and when the bench runs as root every fio (plaintext too, so both
sides run the same command) runs as ``nobody`` through ``setpriv``.

CPU: the primary's and secondary's from /proc over the measured window (after
the ramp), fio's own from its JSON (usr_cpu + sys_cpu), "all" the whole
machine (2 cores: 200 max; well above the sum of ours: others competed).

fio runs time-based (``--runtime``, after ``--ramp_time``), no verify (tests
do that). Output: the tables and one ``RESULT_JSON {...}`` line. Not a test:
numbers are measured and printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _harness as h
from _harness import GiB, KiB, MiB

from deploy.cluster import LocalCluster, free_port
from syncrep import certs, rpc
from syncrep import client as sc
from syncrep.nbd.tls import write_nbd_client_dir

VOLUME = "benchvol"
#: The goal of issue 11: TLS throughput / plaintext throughput at 1 MiB.
TLS_GOAL = 0.90
#: Who fio runs as when the bench runs as root (libnbd reads /etc/pki/libnbd for root: see the header).
NOBODY = 65534
#: How long the primary may take to notice the killed secondary and report the pair degraded.
DEGRADED_TIMEOUT_S = 60.0


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
    # who -> CPU % of one core over the measured window: primary, secondary, fio, all (the machine)
    cpu: dict[str, float] = field(default_factory=dict)

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
            cpu={"fio": float(job.get("usr_cpu", 0.0)) + float(job.get("sys_cpu", 0.0))},
        )

    def cpu_s_per_gib(self, who: str) -> float:
        """CPU-seconds ``who`` used per GiB written (from its CPU % and the throughput)."""
        gib_s = self.mib_s / 1024.0
        return (self.cpu.get(who, 0.0) / 100.0) / gib_s if gib_s else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"iops": round(self.iops, 1), "mib_s": round(self.mib_s, 2), "p50_ms": round(self.p50_ms, 3),
                "p99_ms": round(self.p99_ms, 3), "errors": self.errors,
                "cpu_pct": {k: round(v, 1) for k, v in self.cpu.items()},
                "cpu_s_per_gib": {k: round(self.cpu_s_per_gib(k), 3) for k in self.cpu if k != "all"}}


@dataclass
class Target:
    """One cluster's NBD export and how fio reaches it."""

    durability: str
    tls: bool
    cluster: LocalCluster
    url: str
    fio_env: dict[str, str]  # HOME with .pki/libnbd for nbds:// (see the header)

    @property
    def sec(self) -> str:
        return "tls" if self.tls else "plain"

    def use_rpc(self) -> None:
        """Point the harness's own gRPC calls at this cluster's security. Two
        clusters are up at once and ``rpc`` has one process-wide setting
        (LocalCluster sets it at start): set it before each control call."""
        c = self.cluster
        rpc.configure(rpc.Security(c.certs_dir, "admin") if c.tls else rpc.Security(None))


def fio_prefix() -> list[str]:
    """What fio runs under: nothing, or setpriv down to nobody when we are root."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        raise RuntimeError("bench_nbd runs as root and needs setpriv (util-linux) to run fio as nobody, so "
                           "that libnbd reads the client certificate from $HOME/.pki/libnbd, not /etc/pki/libnbd")
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def make_fio_home(c: LocalCluster, home: Path) -> dict[str, str]:
    """A HOME for fio whose .pki/libnbd holds the cluster's admin client certificate (GnuTLS layout)."""
    write_nbd_client_dir(certs.load_client_tls(c.certs_dir, "admin"), home / ".pki" / "libnbd")
    if os.geteuid() == 0:  # fio runs as nobody: it must own (and alone read) the key
        for path in (home, home / ".pki", home / ".pki" / "libnbd", *(home / ".pki" / "libnbd").iterdir()):
            os.chown(path, NOBODY, NOBODY)
    return {**os.environ, "HOME": str(home)}


def _sample_cpu(pids: dict[str, int | None]) -> dict[str, float]:
    out = {name: h.cpu_seconds(pid) for name, pid in pids.items()}
    out["all"] = h.machine_busy_seconds()
    return out


async def _fio(t: Target, argv: list[str], what: str) -> asyncio.Task[tuple[bytes, bytes]]:
    proc = await asyncio.create_subprocess_exec(
        *fio_prefix(), "fio", *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=t.fio_env,
    )

    async def done() -> tuple[bytes, bytes]:
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"fio ({what}, {t.url}) exited {proc.returncode}: {err.decode()[-2000:]}")
        return out, err

    return asyncio.create_task(done())


async def run_fio(t: Target, cell: Cell, volume_bytes: int, seconds: float, ramp_s: float, *,
                  replicated: bool) -> FioResult:
    size = cell.region or volume_bytes
    argv = [
        "--name=bench", "--ioengine=nbd", f"--uri={t.url}", f"--rw={cell.rw}", f"--bs={cell.bs}",
        f"--iodepth={cell.qd}", f"--size={size}", "--time_based", f"--runtime={seconds:g}",
        f"--ramp_time={ramp_s:g}", "--randrepeat=0", "--norandommap", "--output-format=json",
    ]
    pids = {"primary": t.cluster.pid("primary")}
    if replicated:
        pids["secondary"] = t.cluster.pid("secondary")
    task = await _fio(t, argv, cell.name)
    # The measured window: after the ramp, for --runtime (fio's connect and TLS handshake fall in the ramp).
    await asyncio.wait({task}, timeout=ramp_s)
    t0, cpu0 = time.perf_counter(), _sample_cpu(pids)
    await asyncio.wait({task}, timeout=seconds)
    elapsed, cpu1 = time.perf_counter() - t0, _sample_cpu(pids)
    out, _ = await task
    r = FioResult.parse(out.decode())
    for name in cpu0:
        r.cpu[name] = 100.0 * (cpu1[name] - cpu0[name]) / elapsed if elapsed > 0 else 0.0
    return r


async def fill(t: Target, nbytes: int) -> float:
    """Write [0, nbytes) once with 1 MiB sequential writes at QD8; seconds taken."""
    argv = ["--name=fill", "--ioengine=nbd", f"--uri={t.url}", "--rw=write", "--bs=1m", "--iodepth=8",
            f"--size={nbytes}", "--output-format=json"]
    t0 = time.perf_counter()
    await (await _fio(t, argv, "fill"))
    return time.perf_counter() - t0


def _line(label: str, t: Target, cell: Cell, r: FioResult) -> str:
    return (f"  {label:12} {t.durability:4} {t.sec:5} {cell.name:22} {r.iops:9.0f} IOPS {r.mib_s:8.1f} MiB/s "
            f"p50 {r.p50_ms:7.2f} ms p99 {r.p99_ms:7.2f} ms  CPU {_cpu(r)}")


Results = dict[str, dict[str, dict[str, FioResult]]]  # sec -> "replicated"|"unreplicated" -> cell -> result


async def run_durability(durability: str, tls_modes: list[bool], args: argparse.Namespace, workdir: Path,
                         fio_home: Path) -> tuple[Results, list[str]]:
    """Every cell, replicated then unreplicated, on one cluster per TLS mode, interleaved."""
    notes: list[str] = []
    node_args = ["--durability", durability]
    res: Results = {}
    async with contextlib.AsyncExitStack() as stack:
        targets: list[Target] = []
        for tls in tls_modes:
            sec = "tls" if tls else "plain"
            port = free_port()
            c = LocalCluster(
                workdir / f"cluster-{durability}-{sec}",
                primary_args=[*node_args, "--nbd-listen", f"127.0.0.1:{port}"],
                secondary_args=node_args, log_level="INFO", tls=tls,
            )
            await stack.enter_async_context(c)
            t = Target(durability, tls, c, f"{'nbds' if tls else 'nbd'}://127.0.0.1:{port}/{VOLUME}",
                       make_fio_home(c, fio_home / f"{durability}-{sec}") if tls else dict(os.environ))
            t.use_rpc()
            await c.create_volume(VOLUME, args.volume_bytes)
            targets.append(t)
            res[sec] = {"replicated": {}, "unreplicated": {}}

        def in_turn(i: int) -> list[Target]:  # alternate who goes first, so neither always runs second
            return targets if i % 2 == 0 else targets[::-1]

        # Replicated: written once first as well, so both sides measure overwrites.
        for t in targets:
            fill_s = await fill(t, args.volume_bytes)
            notes.append(f"[{durability} {t.sec}] replicated first fill of {h.fmt_size(args.volume_bytes)}: "
                         f"{args.volume_bytes / MiB / fill_s:.0f} MiB/s (not in the table)")
        for i, cell in enumerate(CELLS):
            for t in in_turn(i):
                res[t.sec]["replicated"][cell.name] = r = await run_fio(
                    t, cell, args.volume_bytes, args.seconds, args.ramp, replicated=True)
                print(_line("replicated", t, cell, r), flush=True)
        for t in targets:
            t.use_rpc()
            st = await t.cluster.get_volume(VOLUME)
            if st.state != sc.STATE_VALUES["in_sync"]:
                notes.append(f"[{durability} {t.sec}] WARNING: pair not in_sync after the replicated cells: "
                             f"{st.last_error}")

        # Unreplicated: the same export with the secondary dead; the primary goes degraded.
        for t in targets:
            t.cluster.kill("secondary")
            await fill(t, 1 * MiB)  # the writes that notice the broken link (stall ~ --ack-timeout-s)
            t.use_rpc()
            await t.cluster.wait_for_volume(
                VOLUME, lambda s: s.state == sc.STATE_VALUES["degraded"] and not s.secondary_alive,
                timeout_s=DEGRADED_TIMEOUT_S,
            )
            fill_s = await fill(t, args.volume_bytes)
            notes.append(f"[{durability} {t.sec}] degraded first-touch of {h.fmt_size(args.volume_bytes)} "
                         f"(change tracking against the fault snapshot): "
                         f"{args.volume_bytes / MiB / fill_s:.0f} MiB/s (not in the table)")
        for i, cell in enumerate(CELLS):
            for t in in_turn(i):
                res[t.sec]["unreplicated"][cell.name] = r = await run_fio(
                    t, cell, args.volume_bytes, args.seconds, args.ramp, replicated=False)
                print(_line("unreplicated", t, cell, r), flush=True)
        for t in targets:
            t.use_rpc()
            st = await t.cluster.get_volume(VOLUME)
            if st.state == sc.STATE_VALUES["in_sync"]:
                notes.append(f"[{durability} {t.sec}] WARNING: the pair is in_sync during the unreplicated cells")
    return res, notes


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def _cpu(r: FioResult) -> str:
    return " ".join(f"{k if k == 'all' else k[0]}{v:.0f}" for k, v in r.cpu.items())


def _metric(cell: Cell, r: FioResult) -> float:
    """What a cell is judged by: MiB/s for 1 MiB writes, IOPS for 4 KiB."""
    return r.mib_s if cell.bs >= MiB else r.iops


def _fmt_metric(cell: Cell, r: FioResult) -> str:
    return f"{r.mib_s:.1f} MiB/s" if cell.bs >= MiB else f"{r.iops:.0f} IOPS"


async def main_async(args: argparse.Namespace) -> int:
    if shutil.which("fio") is None:
        print("bench_nbd: fio is not installed (scripts/setup.sh installs it)", file=sys.stderr)
        return 2
    tls_modes = {"both": [False, True], "on": [True], "off": [False]}[args.tls]
    try:
        fio_prefix()
    except RuntimeError as e:
        print(f"bench_nbd: {e}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-nbd-"))
    workdir.mkdir(parents=True, exist_ok=True)
    # fio's HOME lives outside the workdir (mkdtemp: 0700, which nobody could not enter).
    fio_home = Path(tempfile.mkdtemp(prefix="bench-nbd-fio-home-"))
    if os.geteuid() == 0:
        os.chown(fio_home, NOBODY, NOBODY)
    print(f"bench_nbd: {len(CELLS)} cells x {len(args.durability)} durabilities x "
          f"{'/'.join('tls' if m else 'plain' for m in tls_modes)} x (replicated + unreplicated), "
          f"{args.seconds:g} s each after {args.ramp:g} s ramp; volume {h.fmt_size(args.volume_bytes)}; "
          f"fio {' '.join(fio_prefix()) or 'as ' + str(os.geteuid())}; workdir {workdir}", flush=True)
    load_start = h.loadavg()
    print(f"  loadavg at start: {load_start}", flush=True)
    t0 = time.perf_counter()
    results: dict[str, Results] = {}
    notes: list[str] = []
    for d in args.durability:
        results[d], n = await run_durability(d, tls_modes, args, workdir, fio_home)
        notes += n

    rows = []
    for d, by_sec in results.items():
        for sec, paths in by_sec.items():
            for cell in CELLS:
                r, u = paths["replicated"][cell.name], paths["unreplicated"][cell.name]
                rows.append([
                    d, "TLS (nbds://)" if sec == "tls" else "plain (nbd://)", cell.name,
                    _fmt_metric(cell, r), _fmt_metric(cell, u), _ratio(_metric(cell, r), _metric(cell, u)),
                    f"{r.p50_ms:.2f} / {r.p99_ms:.2f}", f"{u.p50_ms:.2f} / {u.p99_ms:.2f}", _cpu(r), _cpu(u),
                ])
    h.print_table(
        "fio over NBD (--ioengine=nbd): replicated vs unreplicated (same export, secondary killed)",
        ["durability", "security", "cell", "replicated", "unreplicated", "repl/unrepl", "repl p50/p99 ms",
         "unrepl p50/p99 ms", "repl CPU %", "unrepl CPU %"],
        rows,
        note="unreplicated = the same primary and NBD export after kill -9 of the secondary: the pair is "
             "degraded and\nthe primary acknowledges writes locally (tracked for resync). Latency: fio "
             "completion latency (clat).\nCPU %: of one core over the measured window (p=primary, "
             "s=secondary, f=fio), all=the whole machine (2 cores: max 200).",
    )

    goal_cells: list[dict[str, Any]] = []
    if len(tls_modes) == 2:
        trows = []
        for d, by_sec in results.items():
            for path in ("replicated", "unreplicated"):
                for cell in CELLS:
                    p0, t = by_sec["plain"][path][cell.name], by_sec["tls"][path][cell.name]
                    ratio = _metric(cell, t) / _metric(cell, p0) if _metric(cell, p0) else 0.0
                    judged = cell.bs >= MiB
                    ok = ratio >= TLS_GOAL
                    if judged:
                        goal_cells.append({"durability": d, "path": path, "cell": cell.name,
                                           "plain_mib_s": round(p0.mib_s, 2), "tls_mib_s": round(t.mib_s, 2),
                                           "ratio": round(ratio, 3), "pass": ok})
                    trows.append([
                        d, path, cell.name, _fmt_metric(cell, p0), _fmt_metric(cell, t), f"{ratio:.2f}x",
                        f"{p0.p50_ms:.2f} / {t.p50_ms:.2f}",
                        f"{p0.cpu_s_per_gib('primary'):.2f} / {t.cpu_s_per_gib('primary'):.2f}",
                        f"{p0.cpu_s_per_gib('fio'):.2f} / {t.cpu_s_per_gib('fio'):.2f}",
                        f">= {TLS_GOAL:.2f}x" if judged else "",
                        ("PASS" if ok else "FAIL") if judged else "",
                    ])
        h.print_table(
            "TLS cost over NBD: mutual TLS (nbds://, STARTTLS) vs plaintext (nbd://, --insecure), same run",
            ["durability", "path", "cell", "plain", "TLS", "TLS/plain", "p50 ms plain / TLS",
             "primary CPU s/GiB plain / TLS", "fio CPU s/GiB plain / TLS", "goal", "verdict"],
            trows,
            note="CPU s/GiB: CPU-seconds the process used per GiB written (its CPU % over the throughput), "
                 "independent of the number of cores.\nunreplicated: TLS on the NBD hop only; replicated: "
                 "plus the primary -> secondary stream over mutual-TLS gRPC.",
        )
    verdict = ("not measured (--tls both measures it)" if not goal_cells
               else "PASS" if all(g["pass"] for g in goal_cells) else "FAIL")
    if goal_cells:
        worst = min(goal_cells, key=lambda g: g["ratio"])
        print(f"\nTLS goal (1 MiB throughput TLS/plain >= {TLS_GOAL:.2f}x in every 1 MiB cell): {verdict}; "
              f"worst {worst['ratio']:.2f}x ({worst['durability']} {worst['path']})")
    for note in notes:
        print(note)
    load_end = h.loadavg()
    total_s = time.perf_counter() - t0
    print(f"\ntotal {total_s:.0f} s; loadavg at start {load_start}, at the end {load_end} (2 cores)")
    print(f"command: {h.command_line()}")
    doc = {
        "bench": "bench_nbd", "command": h.command_line(), "seconds": args.seconds, "ramp_s": args.ramp,
        "volume_bytes": args.volume_bytes, "tls": args.tls, "loadavg_start": load_start, "loadavg_end": load_end,
        "total_s": round(total_s, 1),
        "results": {d: {sec: {path: {c: r.to_json() for c, r in cells.items()} for path, cells in paths.items()}
                        for sec, paths in by_sec.items()} for d, by_sec in results.items()},
        "tls_goal": {"metric": "1 MiB seq write QD8 MiB/s, TLS / plaintext", "threshold": TLS_GOAL,
                     "cells": goal_cells, "verdict": verdict},
    }
    print("RESULT_JSON " + json.dumps(doc))
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(fio_home, ignore_errors=True)
    else:
        print(f"workdir kept: {workdir} (fio's HOME: {fio_home})")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 s cells, 1 s ramp, a 256 MiB volume")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per cell")
    ap.add_argument("--ramp", type=float, default=2.0, help="fio --ramp_time per cell (not measured)")
    ap.add_argument("--volume-bytes", type=int, default=1 * GiB, help="volume size in bytes")
    ap.add_argument("--durability", nargs="+", choices=("sync", "os"), default=["sync"],
                    help="node --durability values to measure (one cluster per TLS mode each)")
    ap.add_argument("--tls", choices=("both", "on", "off"), default="both",
                    help="mutual TLS (on: nbds://), plaintext (off: nbd://, --insecure), or both side by side "
                         "with the TLS-cost table (both, the default)")
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
