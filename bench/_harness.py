"""Shared pieces of the on-demand benchmarks (not a test, never run by pytest).

* :class:`WriteStream` — the minimal ``VolumeService.Write`` driver every
  benchmark uses: ONE pipelined bidirectional stream, writes multiplexed by
  ``client_seq`` (what :class:`syncrep.client.VolumeClient` does, minus its
  per-write timeout and re-open logic), so the single-hop ceiling, the
  replicated path and the unreplicated path are driven identically.
* :func:`run_load` — QD workers over one stream: IOPS, MiB/s, latency percentiles.
* :class:`AckServer` — a separate process serving ``VolumeService.Write`` with
  ``syncrep.rpc.Server`` that acks every request at once (no disk): the
  single-hop gRPC stream ceiling.
* :class:`Qd1Writer` — a separate process writing at queue depth 1 and recording
  (wall-clock start, latency) of every write, to see write stalls from the client.
* Small helpers: percentiles, CPU seconds of a pid, table printing, log parsing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing as mp
import os
import re
import shlex
import sys
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from syncrep import rpc  # noqa: E402
from syncrep.client import write_reply_outcomes  # noqa: E402
from syncrep.pb import syncrep_pb2 as pb  # noqa: E402
from syncrep.pb import syncrep_pb2_grpc as pb_grpc  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

_CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- formatting


def command_line() -> str:
    """The exact command that ran this benchmark (for the report)."""
    script = os.path.relpath(sys.argv[0], REPO) if os.path.isabs(sys.argv[0]) else sys.argv[0]
    return " ".join(shlex.quote(a) for a in ["python", script, *sys.argv[1:]])


def fmt_size(n: float) -> str:
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= div:
            v = n / div
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.2f} {unit}"
    return f"{n:.0f} B"


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], note: str = "") -> None:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = "+".join("-" * (w + 2) for w in widths)
    print()
    print(title)
    print(line)
    for k, r in enumerate(cells):
        print("|".join(f" {c:>{w}} " for c, w in zip(r, widths, strict=True)))
        if k == 0:
            print(line)
    print(line)
    if note:
        print(note)
    sys.stdout.flush()


def percentile(sorted_vals: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending sequence (nan when empty)."""
    if not sorted_vals:
        return float("nan")
    k = max(0, min(len(sorted_vals) - 1, int(-(-p * len(sorted_vals) // 100)) - 1))
    return sorted_vals[k]


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of a process (all its threads), from /proc (0 when unknown)."""
    if not pid:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy so far (from /proc/stat; iowait counts as idle)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


# "2026-11-25T17:01:47.542 WARNING primary[12186] primary.volume: volume v degraded: ...; write stall 5.0 ms"
_LOG_TS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)(?:[+-]\d\d:\d\d|Z)?\s")


def log_lines_since(path: Path, since_wall: float, pattern: str) -> list[tuple[float, str]]:
    """(wall-clock time, line) of every log line at or after ``since_wall`` matching ``pattern``."""
    rx = re.compile(pattern)
    out: list[tuple[float, str]] = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        m = _LOG_TS.match(line)
        if not m or not rx.search(line):
            continue
        try:
            ts = time.mktime(time.strptime(m.group(1).split(".")[0], "%Y-%m-%dT%H:%M:%S"))
        except ValueError:
            continue
        frac = m.group(1).split(".")[1] if "." in m.group(1) else "0"
        ts += float("0." + frac)
        if ts >= since_wall - 0.002:
            out.append((ts, line))
    return out


# ---------------------------------------------------------------- the write driver


class WriteStream:
    """One pipelined ``VolumeService.Write`` stream to ``address``."""

    def __init__(self, address: str, volume: str) -> None:
        self.address = address
        self.volume = volume
        self.channel = rpc.channel(address)
        self.call: Any = pb_grpc.VolumeServiceStub(self.channel).Write()
        self.pending: dict[int, asyncio.Future[None]] = {}
        self.send_lock = asyncio.Lock()
        self.asked_batch = False
        self.seq = itertools.count(1)
        self.error: BaseException | None = None
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                r = await self.call.read()
                if r is grpc.aio.EOF:
                    raise RuntimeError(f"write stream to {self.address} ended: {await self.call.code()}")
                for seq, code, message in write_reply_outcomes(r):
                    fut = self.pending.pop(seq, None)
                    if fut is None or fut.done():
                        continue
                    if code == 0:
                        fut.set_result(None)
                    else:
                        fut.set_exception(RuntimeError(f"write failed: code {code}: {message}"))
        except BaseException as e:
            self.error = e
            for f in self.pending.values():
                if not f.done():
                    f.set_exception(RuntimeError(f"write stream to {self.address} broke: {e!r}"))
            self.pending.clear()
            if not isinstance(e, asyncio.CancelledError | Exception):
                raise

    async def write(self, offset: int, data: bytes) -> None:
        if self.error is not None:
            raise RuntimeError(f"write stream to {self.address} is broken: {self.error!r}")
        seq = next(self.seq)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending[seq] = fut
        req = pb.WriteRequest(volume=self.volume, client_seq=seq, offset=offset, data=data)
        async with self.send_lock:
            if not self.asked_batch:  # the node's OK replies may come several to a message
                req.batch_replies = self.asked_batch = True
            await self.call.write(req)
        await fut

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            async with self.send_lock:
                await asyncio.wait_for(self.call.done_writing(), 2.0)
        self.reader.cancel()
        with contextlib.suppress(BaseException):
            await self.reader
        self.call.cancel()
        await self.channel.close()


class VolumeClientStream:
    """The same interface over :class:`syncrep.client.VolumeClient` (``--driver volumeclient``)."""

    def __init__(self, address: str, volume: str) -> None:
        from syncrep.client import VolumeClient

        self.client = VolumeClient(volume, address)

    async def write(self, offset: int, data: bytes) -> None:
        await self.client.write(offset, data)

    async def close(self) -> None:
        await self.client.close()


def open_stream(driver: str, address: str, volume: str) -> WriteStream | VolumeClientStream:
    if driver == "volumeclient":
        return VolumeClientStream(address, volume)
    return WriteStream(address, volume)


@dataclass
class LoadResult:
    size: int
    qd: int
    seconds: float = 0.0
    ops: int = 0
    lat_s: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    # process name -> CPU % of one core over the measured seconds; "all": the whole machine
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def iops(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    @property
    def mib_s(self) -> float:
        return self.iops * self.size / MiB

    def lat_ms(self, p: float) -> float:
        return percentile(self.lat_s, p) * 1000


async def run_load(
    stream: WriteStream | VolumeClientStream,
    *,
    size: int,
    qd: int,
    seconds: float,
    warmup_s: float,
    region_offset: int,
    region_bytes: int,
    cpu_pids: dict[str, int | None] | None = None,
) -> LoadResult:
    """``qd`` workers write ``size``-byte blocks sequentially (wrapping) over
    [region_offset, region_offset + region_bytes), for ``warmup_s`` (not
    counted) then ``seconds`` (counted: completions and their latencies)."""
    payload = os.urandom(size)
    slots = max(1, region_bytes // size)
    counter = itertools.count()
    res = LoadResult(size=size, qd=qd)
    t_measure = time.perf_counter() + warmup_s
    t_end = t_measure + seconds
    cpu0: dict[str, float] = {}

    async def worker() -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                return
            i = next(counter)
            try:
                await stream.write(region_offset + (i % slots) * size, payload)
            except Exception as e:
                res.errors += 1
                if not res.first_error:
                    res.first_error = str(e)
                await asyncio.sleep(0.01)
                continue
            t1 = time.perf_counter()
            if t0 >= t_measure and t1 <= t_end:
                res.ops += 1
                res.lat_s.append(t1 - t0)

    async def cpu_sampler() -> None:
        await asyncio.sleep(max(0.0, t_measure - time.perf_counter()))
        for name, pid in (cpu_pids or {}).items():
            cpu0[name] = cpu_seconds(pid) if pid else time.process_time()
        cpu0["all"] = machine_busy_seconds()

    sampler = asyncio.create_task(cpu_sampler())
    await asyncio.gather(*(worker() for _ in range(qd)))
    await sampler
    res.seconds = seconds
    for name, pid in (cpu_pids or {}).items():
        used = (cpu_seconds(pid) if pid else time.process_time()) - cpu0.get(name, 0.0)
        res.cpu[name] = 100.0 * used / seconds
    if cpu_pids:
        res.cpu["all"] = 100.0 * (machine_busy_seconds() - cpu0.get("all", 0.0)) / seconds
    res.lat_s.sort()
    return res


# ---------------------------------------------------------------- the ack server (separate process)


def _ack_server_main(conn: Any) -> None:
    async def main() -> None:
        class AckVolume(pb_grpc.VolumeServiceServicer):
            async def Write(self, request_iterator: Any, context: Any) -> Any:
                async for req in request_iterator:
                    yield pb.WriteReply(client_seq=req.client_seq, code=0)

        server = rpc.Server("127.0.0.1:0")
        server.add(pb_grpc.add_VolumeServiceServicer_to_server, AckVolume(), "syncrep.v1.VolumeService")
        port = await server.start()
        conn.send(port)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, conn.recv)  # any message (or EOF): stop
        await server.stop(0.5)

    with contextlib.suppress(EOFError, KeyboardInterrupt):
        asyncio.run(main())


def _await_child(proc: Any, conn: Any, what: str, timeout_s: float = 30.0) -> None:
    """Wait for a spawned child's first message; fail fast if it dies."""
    deadline = time.monotonic() + timeout_s
    while not conn.poll(0.1):
        if not proc.is_alive():
            raise RuntimeError(f"{what} exited with code {proc.exitcode} before it was ready")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{what} was not ready within {timeout_s:g} s")


class AckServer:
    """``VolumeService.Write`` that acks every request immediately (no disk), in
    its own process, built with ``syncrep.rpc.Server``: the single-hop ceiling."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_ack_server_main, args=(child,), daemon=True, name="ack-server")
        self.proc.start()
        _await_child(self.proc, self._conn, "the ack server")
        self.port = int(self._conn.recv())
        self.address = f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.send("stop")
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


async def measure_ceiling(
    cells: Sequence[tuple[int, int]], *, seconds: float, warmup_s: float, driver: str = "raw"
) -> dict[tuple[int, int], LoadResult]:
    """Single-hop ceiling for each (size, qd): the same driver against the ack server."""
    srv = AckServer()
    out: dict[tuple[int, int], LoadResult] = {}
    try:
        for size, qd in cells:
            stream = open_stream(driver, srv.address, "ceiling")
            try:
                out[(size, qd)] = await run_load(
                    stream,
                    size=size,
                    qd=qd,
                    seconds=seconds,
                    warmup_s=warmup_s,
                    region_offset=0,
                    region_bytes=1 << 40,
                    cpu_pids={"client": None, "ack": srv.pid},
                )
            finally:
                await stream.close()
    finally:
        srv.close()
    return out


# ---------------------------------------------------------------- QD1 writer (separate process)


def _rpc_security() -> Any:
    return rpc.security


def _qd1_writer_main(
    conn: Any, address: str, volume: str, size: int, region_offset: int, region_bytes: int,
    security: Any = None,
) -> None:
    """Write at QD1 until told to stop; send back (wall start, latency s, ok) arrays.
    ``security``: the parent's rpc security (a spawned child starts without it:
    against a TLS cluster every write failed)."""
    rpc.configure(security)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def wait_stop() -> None:
            with contextlib.suppress(EOFError):
                conn.recv()
            loop.call_soon_threadsafe(stop.set)

        loop.run_in_executor(None, wait_stop)
        starts = array("d")
        lats = array("d")
        oks = array("b")
        payload = os.urandom(size)
        slots = max(1, region_bytes // size)
        stream = WriteStream(address, volume)
        conn.send("ready")
        i = 0
        while not stop.is_set():
            off = region_offset + (i * 7919 % slots) * size
            i += 1
            w0 = time.time()
            t0 = time.perf_counter()
            ok = 1
            try:
                await stream.write(off, payload)
            except Exception:
                ok = 0
                await stream.close()
                await asyncio.sleep(0.05)
                stream = WriteStream(address, volume)
            starts.append(w0)
            lats.append(time.perf_counter() - t0)
            oks.append(ok)
        await stream.close()
        conn.send((starts.tobytes(), lats.tobytes(), oks.tobytes()))

    asyncio.run(main())


@dataclass
class WriteTrace:
    starts: array  # wall-clock start of each write
    lats: array  # seconds
    oks: array

    def overlapping(self, t0: float, t1: float) -> list[tuple[float, float, bool]]:
        """Writes whose [start, start + latency] overlaps [t0, t1]."""
        return [
            (s, lat, bool(ok))
            for s, lat, ok in zip(self.starts, self.lats, self.oks, strict=True)
            if s <= t1 and s + lat >= t0
        ]

    def max_latency(self, t0: float, t1: float) -> float:
        ws = self.overlapping(t0, t1)
        return max((lat for _, lat, _ in ws), default=float("nan"))


class Qd1Writer:
    """A separate process writing ``size`` bytes at QD1 to a volume, recording
    every write's wall-clock start and latency; :meth:`stop` returns the trace."""

    def __init__(
        self,
        address: str,
        volume: str,
        *,
        size: int = 4 * KiB,
        region_offset: int = 0,
        region_bytes: int = 64 * MiB,
    ) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_qd1_writer_main,
            args=(child, address, volume, size, region_offset, region_bytes, _rpc_security()),
            daemon=True,
            name="qd1-writer",
        )
        self.proc.start()
        _await_child(self.proc, self._conn, "the QD1 writer")
        self._conn.recv()

    def stop(self) -> WriteTrace:
        self._conn.send("stop")
        if not self._conn.poll(60):
            self.proc.kill()
            raise RuntimeError("the QD1 writer did not stop within 60 s")
        s, lat, ok = self._conn.recv()
        self.proc.join(5)
        starts, lats, oks = array("d"), array("d"), array("b")
        starts.frombytes(s)
        lats.frombytes(lat)
        oks.frombytes(ok)
        return WriteTrace(starts, lats, oks)

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
