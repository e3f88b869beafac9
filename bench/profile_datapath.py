"""Profile the replicated data path with py-spy (issue 14, step 1). Measurement only.

    python bench/profile_datapath.py [--seconds 10] [--scenarios 1m-sync,1m-os,4k-sync,resync]
                                     [--out /tmp/syncrep-profile] [--native | --no-native]

Why: the primary spends several CPU-ms per replicated MiB where a 1 MiB memcpy
costs about 0.1 ms, so something per block, per copy or per message dominates.
This script finds it by sampling the real processes under a steady load, and
turns the samples into numbers the fixes can be judged against.

Each write scenario runs on a fresh LocalCluster (real processes, mutual TLS as
the benchmarks, one volume in sync) and a steady load driven by the benchmarks'
own client (``bench/_harness.WriteStream``: one pipelined Write stream, QD
workers writing sequentially over a region). After a warm-up, three windows of
``--seconds`` each, back to back, under the same load:

1. **plain** -- no profiler: MiB written, CPU-seconds of the primary and the
   secondary (from /proc/PID/stat) and of each of their threads
   (/proc/PID/task/TID/stat): CPU-ms per MiB without the profiler's cost;
2. **raw** -- ``py-spy record --format raw --threads [--native]`` on both
   pids at once: collapsed stacks, analysed below;
3. **speedscope** -- ``py-spy record --format speedscope`` on both pids: the
   files to open in https://www.speedscope.app (kept under ``--out``, never
   in git).

The ``resync`` scenario is bench_resync.py --quick style: kill -9 the
secondary, write ``--resync-bytes`` (default 256 MiB) of 1 MiB writes at QD16
while it is down, wait until it is counted dead, restart it and record from
the restart until the pair is in sync (py-spy stopped with SIGINT then). Twice:
once raw, once speedscope. CPU-ms per MiB is per MiB the resync sent
(``resync_bytes_sent``).

From each collapsed-stack file: samples per thread (and that thread's CPU from
/proc), the top functions by self time (the leaf frame; and the innermost
Python frame, which is where py-spy without --native would put C time) and by
total time (a function counted once per sample), and cost buckets (fdatasync,
pwrite, crc32c, memcpy, TLS, protobuf, grpc, asyncio, sqlite, roaring,
logging...: the first rule matching from the leaf up) with CPU-ms per MiB
each, assuming samples are proportional to CPU time (py-spy without --idle
keeps only running threads). The summaries go to ``OUT/<scenario>-<proc>.txt``
and to stdout.

py-spy is a dev dependency (pyproject.toml); it needs ptrace rights over the
node processes (root, or kernel.yama.ptrace_scope 0). Not a test, never run
by pytest; the machine's load average is printed at each window, since hot
spots stay meaningful as shares of CPU time on a loaded machine while
throughput figures do not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import linecache
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import _harness as h
from _harness import KiB, MiB

from deploy.cluster import LocalCluster
from syncrep import client as sc

VOLUME = "profvol"
SCENARIOS = ("1m-sync", "1m-os", "4k-sync", "resync")
_CLK_TCK = os.sysconf("SC_CLK_TCK")
PYSPY_STOP_TIMEOUT_S = 30.0
TOP_N = 25


# ---------------------------------------------------------------- /proc


def thread_cpu(pid: int | None) -> dict[int, tuple[str, float]]:
    """tid -> (comm, CPU-seconds) of every thread of ``pid`` (empty when gone)."""
    out: dict[int, tuple[str, float]] = {}
    if not pid:
        return out
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    head, rest = f.read().rsplit(")", 1)
                fields = rest.split()
                out[int(tid)] = (head.split("(", 1)[1], (int(fields[11]) + int(fields[12])) / _CLK_TCK)
            except (OSError, IndexError, ValueError):
                continue
    return out


@dataclass
class Usage:
    """What one process used over a window."""

    cpu_s: float = 0.0
    threads: dict[int, tuple[str, float]] = field(default_factory=dict)  # tid -> (comm, CPU-s)


def usage_between(a: dict[int, tuple[str, float]], b: dict[int, tuple[str, float]]) -> Usage:
    u = Usage()
    for tid, (comm, cpu1) in b.items():
        d = cpu1 - a.get(tid, (comm, 0.0))[1]
        u.threads[tid] = (comm, d)
        u.cpu_s += d
    return u


# ---------------------------------------------------------------- the load


class SteadyLoad:
    """``qd`` workers writing ``size`` bytes sequentially (wrapping) over a
    region until stopped; ``done_bytes`` counts acknowledged bytes."""

    def __init__(self, address: str, size: int, qd: int, region_bytes: int) -> None:
        self.stream = h.WriteStream(address, VOLUME)
        self.size = size
        self.payload = os.urandom(size)
        self.slots = max(1, region_bytes // size)
        self.counter = itertools.count()
        self.done_bytes = 0
        self.errors = 0
        self.first_error = ""
        self.stop = asyncio.Event()
        self.tasks = [asyncio.create_task(self._worker()) for _ in range(qd)]

    async def _worker(self) -> None:
        while not self.stop.is_set():
            off = (next(self.counter) % self.slots) * self.size
            try:
                await self.stream.write(off, self.payload)
            except Exception as e:
                self.errors += 1
                self.first_error = self.first_error or str(e)
                await asyncio.sleep(0.01)
                continue
            self.done_bytes += self.size

    async def close(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.stream.close()


# ---------------------------------------------------------------- py-spy


def pyspy() -> str:
    exe = Path(sys.executable).with_name("py-spy")
    found = str(exe) if exe.exists() else shutil.which("py-spy")
    if not found:
        raise SystemExit("py-spy not found: install the dev extra (pip install -e '.[dev]') or pip install py-spy")
    return found


def spy_cmd(pid: int, fmt: str, out: Path, rate: int, seconds: float | None, native: bool) -> list[str]:
    cmd = [pyspy(), "record", "--pid", str(pid), "--rate", str(rate), "--format", fmt, "-o", str(out)]
    if seconds is not None:
        cmd += ["--duration", str(max(1, round(seconds)))]
    if fmt == "raw":
        cmd += ["--threads"]
    # --native needs the blocking mode (py-spy pauses the process per sample): on a loaded 2-core box
    # that stretched acks past ack_timeout_s and degraded the pair, so without it the sampler never
    # stops the process (a stack may then be torn at a rare sample; shares are unaffected).
    cmd += ["--native"] if native else ["--nonblocking"]
    return cmd


def start_spy(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        f.write(("$ " + " ".join(cmd) + "\n").encode())
        f.flush()
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)


async def wait_spies(spies: list[subprocess.Popen[bytes]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(p.poll() is None for p in spies):
        if time.monotonic() > deadline:
            for p in spies:
                if p.poll() is None:
                    p.kill()
            raise RuntimeError(f"py-spy did not finish within {timeout_s:g} s")
        await asyncio.sleep(0.1)


# ---------------------------------------------------------------- collapsed-stack analysis

_PYLINE = re.compile(r"^(?P<fn>.+?) \((?P<file>[^():]+\.py):(?P<line>\d+)\)$")
_PYFRAME = re.compile(r"^(?P<fn>.+?) \((?P<file>[^():]+\.py[x]?):\d+\)$")
_ADDR = re.compile(r"^0x[0-9a-f]+ \((?P<lib>[^)]+)\)$")
_NATIVE_LINE = re.compile(r"^(?P<fn>.+?) \((?P<file>[^():]+):\d+\)$")
_THREAD = re.compile(r"^thread \((?P<tid>\d+)\): ?(?P<name>.*)$")

# Cost buckets: (name, substrings); the first frame from the leaf up that
# matches any rule decides (so a memcpy inside protobuf parsing is a copy).
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("fdatasync/fsync (syscall)", ("fdatasync", "os_fsync", "fsync")),
    ("pwrite/pread (syscall)", ("pwrite", "pread", "os_pwrite", "os_pread")),
    ("crc32c", ("crc32c", "crc32")),
    ("memcpy/memmove (copies)", ("memcpy", "memmove", "__memcpy", "__memmove")),
    ("TLS (libssl/libcrypto)", ("libssl", "libcrypto", "SSL_", "ssl_", "aes_", "gcm_", "tsi_")),
    ("sqlite", ("sqlite", "_sqlite3")),
    ("roaring bitmaps", ("roaring", "pyroaring", "BitMap")),
    ("protobuf (upb, messages)", ("upb_", "_upb", "protobuf", "message.py", "PyUpb", "_message")),
    ("bytes alloc/free (malloc)", ("malloc", "free", "PyBytes_", "_PyBytes", "realloc", "munmap", "mmap")),
    ("logging", ("logging/",)),
    ("grpc (cython/core)", ("cygrpc", "grpc", "_cython", "aio/")),
    ("asyncio event loop", ("asyncio/", "selectors.py", "epoll", "events.py", "base_events")),
    ("threading/executor", ("threading.py", "concurrent/futures", "thread.py", "pthread_cond", "futex")),
]


def norm_frame(frame: str) -> str:
    """A frame without its line number: function (file) or [library] for bare addresses."""
    m = _ADDR.match(frame)
    if m:
        return f"[{m.group('lib')}]"
    m = _PYFRAME.match(frame) or _NATIVE_LINE.match(frame)
    if m:
        return f"{m.group('fn')} ({m.group('file')})"
    return frame


def is_python(frame: str) -> bool:
    return bool(_PYFRAME.match(frame))


OUR_CODE = ("primary/", "secondary/", "syncrep/", "coordinator/", "bench/")


# Samples whose nearest named frame (from the leaf up, skipping bare addresses)
# is one of these are a thread waiting, not running: py-spy's own idle filter
# does not catch them (it samples paused processes), so they are counted
# apart and left out of the CPU shares.
WAIT_FRAMES = ("epoll_wait", "select_epoll_poll", "PyThread_acquire_lock_timed", "pthread_cond_wait",
               "pthread_cond_timedwait", "sem_wait", "sem_timedwait", "sem_clockwait", "nanosleep",
               "clock_nanosleep", "futex", "poll (libc", "ppoll", "accept")
BLOCKING_IO = ("fdatasync", "fsync")


# Without --native the leaf is a Python line: its source text tells a wait
# (selector, queue, lock, condition) or a blocking fdatasync from running code.
WAIT_SOURCE = ("selector.select(", ".poll(", "work_queue.get(", ".acquire(", "waiter.acquire", ".wait(",
               "time.sleep(", "_wait_for_tstate_lock")
BLOCKING_SOURCE = ("fdatasync(", "fsync(")


@functools.cache
def source_line(file: str, lineno: int) -> str:
    """The text of a sampled line (py-spy prints paths relative to sys.path entries)."""
    for root in (str(h.REPO), *sys.path):
        path = os.path.join(root, file)
        if os.path.exists(path):
            return linecache.getline(path, lineno)
    return ""


def sample_kind(frames: list[str]) -> str:
    """'wait', 'blocking I/O' (a sync syscall: off-CPU, but the I/O thread's wall time) or 'cpu',
    decided by the nearest named frame from the leaf up (a native one with --native, else a
    Python line, by its source text)."""
    for fr in reversed(frames):
        if _ADDR.match(fr):
            continue
        m = _PYLINE.match(fr)
        text = source_line(m.group("file"), int(m.group("line"))) if m else fr
        if any(k in text for k in (BLOCKING_SOURCE if m else BLOCKING_IO)):
            return "blocking I/O"
        if any(k in text for k in (WAIT_SOURCE if m else WAIT_FRAMES)):
            return "wait"
        return "cpu"
    return "cpu"


def bucket_of(frames: list[str]) -> str:
    for fr in reversed(frames):
        m = _PYFRAME.match(fr)
        if m and m.group("file").startswith(OUR_CODE):
            return "syncrep Python (interpreted)"
        for name, keys in BUCKETS:
            if any(k in fr for k in keys):
                return name
    py = [f for f in frames if is_python(f)]
    return "other Python" if py else "other native"


@dataclass
class Profile:
    samples: int = 0  # running (cpu) samples only
    threads: Counter[tuple[int, str]] = field(default_factory=Counter)  # (tid, name) -> samples
    self_native: Counter[str] = field(default_factory=Counter)
    self_python: Counter[str] = field(default_factory=Counter)
    total: Counter[str] = field(default_factory=Counter)
    buckets: Counter[str] = field(default_factory=Counter)
    # bucket -> innermost Python function -> samples (who pays for the bucket)
    bucket_owner: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    thread_buckets: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    # (thread role, kind) -> samples; kind: cpu, wait, blocking I/O (only cpu samples are in the tables)
    kinds: Counter[tuple[str, str]] = field(default_factory=Counter)
    blocking: Counter[str] = field(default_factory=Counter)  # innermost Python caller -> samples


def thread_role(name: str) -> str:
    if name.startswith("MainThread"):
        return "event loop (MainThread)"
    if name.startswith("io-"):
        return "volume I/O thread"
    if name.startswith("asyncio_") or name.startswith("ThreadPoolExecutor"):
        return "default executor (to_thread)"
    return name or "unnamed"


def analyse(path: Path) -> Profile:
    p = Profile()
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, n_s = line.rpartition(" ")
            try:
                n = int(n_s)
            except ValueError:
                continue
            frames = stack.split(";")
            tid, tname = 0, ""
            if frames and (m := _THREAD.match(frames[0])):
                tid, tname = int(m.group("tid")), m.group("name")
                frames = frames[1:]
            if frames and frames[0].startswith("process "):
                frames = frames[1:]
            if not frames:
                continue
            kind = sample_kind(frames)
            if "_poll_wrapper" in tname and frames[-1].startswith("Thread.run (threading.py"):
                kind = "wait"  # grpc's poller thread inside its C poll (not visible without --native)
            p.kinds[(thread_role(tname), kind)] += n
            py = [f for f in frames if is_python(f)]
            if kind == "blocking I/O":
                p.blocking[norm_frame(py[-1]) if py else "(native only)"] += n
            if kind != "cpu":
                continue
            p.samples += n
            p.threads[(tid, tname)] += n
            p.self_native[norm_frame(frames[-1])] += n
            p.self_python[norm_frame(py[-1]) if py else "(no Python frame) " + norm_frame(frames[-1])] += n
            for fr in {norm_frame(f) for f in frames}:
                p.total[fr] += n
            b = bucket_of(frames)
            p.buckets[b] += n
            p.bucket_owner[b][norm_frame(py[-1]) if py else "(native only)"] += n
            p.thread_buckets[thread_role(tname)][b] += n
    return p


def report(title: str, prof: Profile, usage: Usage | None, mib: float, rate: int) -> str:
    """The text summary of one process's profile (py-spy top-like tables)."""
    lines: list[str] = [f"## {title}", ""]
    tot = max(1, prof.samples)
    cpu_ms_per_mib = (usage.cpu_s * 1000 / mib) if usage and mib else float("nan")
    seen_s = prof.samples / rate
    if usage:
        lines.append(
            f"samples {prof.samples} at {rate} Hz = {seen_s:.1f} thread-s running; /proc CPU in the window "
            f"{usage.cpu_s:.2f} s; MiB {mib:.0f}; CPU-ms/MiB {cpu_ms_per_mib:.2f}"
        )
    else:
        lines.append(f"samples {prof.samples} at {rate} Hz = {seen_s:.1f} thread-s running; MiB {mib:.0f}")
    lines.append("")

    def table(head: list[str], rows: list[list[str]]) -> None:
        w = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines.append("| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(head)) + " |")
        lines.append("|" + "|".join("-" * (x + 2) for x in w) + "|")
        for r in rows:
            lines.append("| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |")
        lines.append("")

    def ms(n: int) -> str:
        return f"{cpu_ms_per_mib * n / tot:.3f}" if mib and usage else "-"

    # Threads: samples from py-spy; CPU from /proc (matched by tid).
    rows = []
    for (tid, name), n in prof.threads.most_common():
        cpu = usage.threads.get(tid, ("", float("nan")))[1] if usage else float("nan")
        role = thread_role(name)
        rows.append([str(tid), role, f"{100 * n / tot:.1f}", f"{n / rate:.2f}",
                     f"{prof.kinds[(role, 'wait')] / rate:.2f}", f"{prof.kinds[(role, 'blocking I/O')] / rate:.2f}",
                     f"{cpu:.2f}"])
    if usage:
        seen = {tid for tid, _ in prof.threads}
        other = [(t, c) for t, c in usage.threads.items() if t not in seen and c[1] > 0.005]
        for tid, (comm, cpu) in sorted(other, key=lambda x: -x[1][1]):
            rows.append([str(tid), f"(not sampled: {comm})", "-", "-", "-", "-", f"{cpu:.2f}"])
    lines.append("Threads (py-spy samples as thread-seconds: running, waiting, in fdatasync; CPU-s from /proc):")
    table(["tid", "thread", "% running samples", "running s", "waiting s", "fdatasync s", "/proc CPU-s"], rows)
    if prof.blocking:
        lines.append("fdatasync/fsync (off-CPU, blocking the caller's thread), by innermost Python caller: "
                     + ", ".join(f"{o} {k / rate:.2f} s" for o, k in prof.blocking.most_common(4)))
        lines.append("")

    lines.append("Cost buckets (first matching frame from the leaf up), with the innermost Python callers:")
    rows = []
    for b, n in prof.buckets.most_common():
        owners = ", ".join(f"{o} {100 * k / n:.0f}%" for o, k in prof.bucket_owner[b].most_common(3))
        rows.append([b, f"{100 * n / tot:.1f}", ms(n), owners])
    table(["bucket", "% samples", "CPU-ms/MiB", "top callers (share of the bucket)"], rows)

    lines.append("Threads x buckets (% of all samples):")
    rows = []
    for role, c in sorted(prof.thread_buckets.items(), key=lambda x: -sum(x[1].values())):
        rows.append([role, ", ".join(f"{b} {100 * n / tot:.1f}" for b, n in c.most_common(6))])
    table(["thread", "top buckets"], rows)

    for label, counter in (
        ("self, leaf frame (native included)", prof.self_native),
        ("self, innermost Python frame (C time charged to its Python caller)", prof.self_python),
        ("total (a function counted once per sample)", prof.total),
    ):
        lines.append(f"Top {TOP_N} by {label}:")
        table(
            ["% samples", "CPU-ms/MiB", "function"],
            [[f"{100 * n / tot:.1f}", ms(n), fn] for fn, n in counter.most_common(TOP_N)],
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- scenarios


@dataclass
class Window:
    mib: float
    seconds: float
    usage: dict[str, Usage]
    load: str

    def line(self, label: str) -> str:
        per = "  ".join(
            f"{k} {u.cpu_s:.2f} CPU-s = {u.cpu_s * 1000 / self.mib:.2f} ms/MiB" if self.mib else f"{k} -"
            for k, u in self.usage.items()
        )
        return (
            f"  {label:10} {self.mib:8.1f} MiB in {self.seconds:5.1f} s = {self.mib / self.seconds:7.1f} MiB/s; "
            f"{per}; loadavg {self.load}"
        )


async def measure(
    load: SteadyLoad | None, pids: dict[str, int | None], seconds: float, spies: list[subprocess.Popen[bytes]]
) -> Window:
    t0 = time.perf_counter()
    b0 = load.done_bytes if load else 0
    th0 = {k: thread_cpu(p) for k, p in pids.items()}
    if spies:
        await wait_spies(spies, seconds + PYSPY_STOP_TIMEOUT_S)
    else:
        await asyncio.sleep(seconds)
    th1 = {k: thread_cpu(p) for k, p in pids.items()}
    secs = time.perf_counter() - t0
    mib = ((load.done_bytes if load else 0) - b0) / MiB
    return Window(mib, secs, {k: usage_between(th0[k], th1[k]) for k in pids}, h.loadavg())


async def write_scenario(name: str, args: argparse.Namespace, out: Path, work: Path) -> list[str]:
    size = MiB if name.startswith("1m") else 4 * KiB
    durability = name.split("-", 1)[1]
    c = LocalCluster(
        work / name, primary_args=["--durability", durability], secondary_args=["--durability", durability],
        log_level="INFO", tls=not args.insecure,
    )
    summaries: list[str] = []
    async with c:
        await c.create_volume(VOLUME, args.volume_bytes)
        pids = {"primary": c.pid("primary"), "secondary": c.pid("secondary")}
        region = args.volume_bytes if size >= MiB else min(args.volume_bytes, 256 * MiB)
        load = SteadyLoad(c.primary_addr, size, args.qd, region)
        try:
            await asyncio.sleep(args.warmup)
            plain = await measure(load, pids, args.seconds, [])
            print(plain.line("plain"), flush=True)
            raw_spies = []
            for proc, pid in pids.items():
                assert pid is not None
                raw_spies.append(start_spy(
                    spy_cmd(pid, "raw", out / f"{name}-{proc}.collapsed.txt", args.rate, args.seconds, args.native),
                    out / "py-spy.log",
                ))
            raw = await measure(load, pids, args.seconds, raw_spies)
            print(raw.line("raw"), flush=True)
            ss_spies = []
            for proc, pid in pids.items():
                assert pid is not None
                ss_spies.append(start_spy(
                    spy_cmd(pid, "speedscope", out / f"{name}-{proc}.speedscope.json", args.rate, args.seconds,
                            False),
                    out / "py-spy.log",
                ))
            ss = await measure(load, pids, args.seconds, ss_spies)
            print(ss.line("speedscope"), flush=True)
        finally:
            await load.close()
        if load.errors:
            print(f"  WARNING: {load.errors} writes failed (first: {load.first_error})", flush=True)
        st = await c.get_volume(VOLUME)
        if st.state != sc.STATE_VALUES["in_sync"]:
            print(f"  WARNING: the pair is {sc.STATE_NAMES.get(st.state)} after the load ({st.last_error})")
        failed = h.log_lines_since(c.log_path("primary"), 0.0, "secondary declared failed")
        if failed:
            print(f"  WARNING: the secondary was declared failed {len(failed)} times during the load "
                  f"(first: {failed[0][1][-160:]}); the profile mixes replicated and degraded writes", flush=True)
    head = (
        f"# {name}: {h.fmt_size(size)} QD{args.qd}, durability {durability}, "
        f"{'plaintext' if args.insecure else 'mutual TLS'}\n"
        + plain.line("plain") + "\n" + raw.line("raw") + "\n" + ss.line("speedscope")
    )
    for proc in pids:
        prof = analyse(out / f"{name}-{proc}.collapsed.txt")
        text = head + "\n\n" + report(f"{name} {proc}", prof, raw.usage[proc], raw.mib, args.rate)
        (out / f"{name}-{proc}.txt").write_text(text + "\n")
        summaries.append(text)
    return summaries


async def resync_scenario(args: argparse.Namespace, out: Path, work: Path) -> list[str]:
    name = "resync"
    c = LocalCluster(
        work / name, primary_args=["--durability", "sync"], secondary_args=["--durability", "sync"],
        log_level="INFO", tls=not args.insecure,
    )
    summaries: list[str] = []
    windows: dict[str, tuple[Window, float]] = {}
    async with c:
        size = max(args.volume_bytes, 2 * args.resync_bytes)
        await c.create_volume(VOLUME, size)
        for fmt in ("raw", "speedscope"):
            c.kill("secondary")
            s = h.WriteStream(c.primary_addr, VOLUME)
            with contextlib.suppress(Exception):
                await s.write(0, bytes(4 * KiB))  # the write that notices the broken link
            await s.close()
            await c.wait_for_volume(
                VOLUME, lambda st: st.state == sc.STATE_VALUES["degraded"] and st.fault_snapshot_id != 0,
                timeout_s=30.0,
            )
            offsets = [(i * MiB) % size for i in range(args.resync_bytes // MiB)]
            await write_offsets(c.primary_addr, offsets, MiB, 16)
            await c.wait_for_volume(VOLUME, lambda st: not st.secondary_alive, timeout_s=30.0)
            sent0 = await sent_bytes(c)
            await c.start_process("secondary")
            pids = {"primary": c.pid("primary"), "secondary": c.pid("secondary")}
            spies = []
            for proc, pid in pids.items():
                assert pid is not None
                spies.append(start_spy(
                    spy_cmd(pid, fmt, out / f"{name}-{proc}.{'collapsed.txt' if fmt == 'raw' else 'speedscope.json'}",
                            args.rate, None, args.native and fmt == "raw"),
                    out / "py-spy.log",
                ))
            t0 = time.perf_counter()
            th0 = {k: thread_cpu(p) for k, p in pids.items()}
            await c.wait_for_volume(
                VOLUME,
                lambda st: st.state == sc.STATE_VALUES["in_sync"] and st.primary_alive and st.secondary_alive,
                timeout_s=args.resync_timeout,
            )
            th1 = {k: thread_cpu(p) for k, p in pids.items()}
            secs = time.perf_counter() - t0
            for p in spies:
                p.send_signal(signal.SIGINT)
            await wait_spies(spies, PYSPY_STOP_TIMEOUT_S)
            sent = (await sent_bytes(c) - sent0) / MiB
            w = Window(sent, secs, {k: usage_between(th0[k], th1[k]) for k in pids}, h.loadavg())
            windows[fmt] = (w, secs)
            print(w.line(f"resync {fmt}") + f"  (restart -> in_sync {secs:.2f} s)", flush=True)
    head = (
        f"# resync: {h.fmt_size(args.resync_bytes)} written while the secondary was down, then restart -> in_sync "
        f"(MiB = resync bytes sent)\n" + "\n".join(w.line(f"resync {f}") for f, (w, _) in windows.items())
    )
    raw = windows["raw"][0]
    for proc in ("primary", "secondary"):
        prof = analyse(out / f"{name}-{proc}.collapsed.txt")
        text = head + "\n\n" + report(f"{name} {proc}", prof, raw.usage[proc], raw.mib, args.rate)
        (out / f"{name}-{proc}.txt").write_text(text + "\n")
        summaries.append(text)
    return summaries


async def write_offsets(addr: str, offsets: list[int], size: int, qd: int) -> None:
    """Write ``size`` random bytes at each offset, ``qd`` in flight (bench_resync's dirtying)."""
    payload = os.urandom(size)
    stream = h.WriteStream(addr, VOLUME)
    it = iter(offsets)

    async def worker() -> None:
        for off in it:
            await stream.write(off, payload)

    try:
        await asyncio.gather(*(worker() for _ in range(qd)))
    finally:
        await stream.close()


async def sent_bytes(c: LocalCluster) -> int:
    st = await sc.node_status(c.primary_addr)
    for v in st.volumes:
        if v.name == VOLUME:
            return int(v.resync_bytes_sent)
    raise RuntimeError(f"the primary reports no volume {VOLUME!r}")


async def main_async(args: argparse.Namespace) -> int:
    out = Path(args.out)
    await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="profile-datapath-"))
    print(
        f"profile_datapath: scenarios {', '.join(args.scenarios)}; {args.seconds:g} s per window after "
        f"{args.warmup:g} s warm-up; QD{args.qd}; py-spy {args.rate} Hz{' --native' if args.native else ''}; "
        f"out {out}; loadavg {h.loadavg()}; {os.cpu_count()} CPUs",
        flush=True,
    )
    texts: list[str] = []
    for name in args.scenarios:
        print(f"- {name}", flush=True)
        if name == "resync":
            texts += await resync_scenario(args, out, work)
        else:
            texts += await write_scenario(name, args, out, work)
    print()
    for t in texts:
        print(t)
        print()
    print(f"loadavg at the end: {h.loadavg()}")
    print(f"command: {h.command_line()}")
    print(f"collapsed stacks, speedscope files and summaries: {out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)}")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds per window (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds before the windows (default 2)")
    p.add_argument("--qd", type=int, default=64, help="queue depth of the write load (default 64)")
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second (default 200)")
    p.add_argument("--native", action="store_true",
                   help="raw recordings with --native: C frames (memcpy, crc32c, TLS, syscalls); pauses the "
                        "process per sample (blocking mode): on a loaded box it can degrade the pair")
    p.add_argument("--volume-size", default="1GiB", help="volume size (default 1GiB)")
    p.add_argument("--resync-bytes", default="256MiB", help="written while the secondary is down (default 256MiB)")
    p.add_argument("--resync-timeout", type=float, default=300.0, help="restart -> in_sync bound, s")
    p.add_argument("--insecure", action="store_true", help="plaintext clusters (default: mutual TLS)")
    p.add_argument("--out", default="/tmp/syncrep-profile", help="where the profiles go (never in git)")
    a = p.parse_args(argv)
    a.scenarios = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    for s in a.scenarios:
        if s not in SCENARIOS:
            p.error(f"--scenarios: {s!r} is not one of {', '.join(SCENARIOS)}")
    from syncrep.units import parse_size

    a.volume_bytes = parse_size(a.volume_size)
    a.resync_bytes = parse_size(a.resync_bytes)
    return a


def main() -> int:
    return asyncio.run(main_async(parse_args()))


if __name__ == "__main__":
    sys.exit(main())
