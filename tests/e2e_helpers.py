"""Workload and checkers shared by the multi-process tests.

The workload, the block format and the model are :mod:`deploy.workload`'s
(shared with the nemesis and ``syncrep demo``); this module binds them to a
:class:`~deploy.cluster.LocalCluster` under the names the tests import.

``Workload`` runs several concurrent writers through the primary. Each writer
owns a disjoint region and writes self-describing blocks, so the expected
content of every block is exact: the last acknowledged write. A write that
failed (or was still in flight when the workload stopped) is *indeterminate*:
its blocks may hold it or what was there before, never anything else.

``check_no_lost_writes`` reads every touched block back from the primary (the
node the coordinator names now: after a failover that is the process started
as "secondary") and checks it against the model; ``assert_replicas_identical`` compares primary and
secondary block for block (per-chunk checksums computed on each node, then a
byte read of any chunk that differs, for a precise message).

``write_blocks`` / ``check_model`` are for tests whose writes all succeed, one
batch after another: the model is simply block -> the bytes last written (a
test may add its own writes to it).
"""

from __future__ import annotations

import asyncio
import signal
import time

from deploy import workload as wl
from deploy.cluster import LocalCluster
from syncrep import client as sc

BLOCK = 4096


class Workload(wl.Workload):
    """:class:`deploy.workload.Workload` on ``volume`` of ``cluster``: ``writers``
    writers on equal regions of ``[region_start, region_start + region_size)``
    (default: the rest of the volume). ``stop()`` also closes the client."""

    def __init__(
        self,
        cluster: LocalCluster,
        volume: str,
        volume_size: int,
        *,
        writers: int = 4,
        seed: int = 0,
        max_blocks: int = 16,
        region_start: int = 0,
        region_size: int | None = None,
    ) -> None:
        total = region_size or (volume_size - region_start)

        async def connect() -> sc.VolumeClient:
            return await cluster.connect(volume)

        super().__init__(connect, seed=seed, regions=wl.split_regions(total, writers, BLOCK, region_start),
                         block_size=BLOCK, max_blocks=max_blocks)
        self.cluster = cluster
        self.volume = volume


async def check_no_lost_writes(cluster: LocalCluster, volume: str, w: wl.Workload) -> None:
    """Every touched block on the primary holds the last acknowledged version
    (or a version of a later indeterminate write); never an older one, never garbage."""
    h = w.history
    primary = await cluster.current_primary_addr(volume)
    read = await wl.read_blocks(primary, volume, h.touched_blocks(), h.block_size)
    rep = wl.check_blocks(h, read)
    # "LOST WRITE" and the seed: what a failing run's log is searched for.
    assert rep.ok, f"LOST WRITE or garbage on the primary (seed {w.seed}): {rep.summary()}"


async def assert_replicas_identical(cluster: LocalCluster, volume: str, chunk: int = 1 << 20) -> None:
    p, s = await asyncio.gather(
        sc.checksum(cluster.primary_addr, volume, chunk),
        sc.checksum(cluster.secondary_addr, volume, chunk),
    )
    assert len(p) == len(s), f"the replicas have different sizes: {len(p)} and {len(s)} chunks"
    bad = [i for i, (a, b) in enumerate(zip(p, s, strict=True)) if a != b]
    if bad:
        i = bad[0]
        pa = await sc.read_local(cluster.primary_addr, volume, i * chunk, chunk)
        sa = await sc.read_local(cluster.secondary_addr, volume, i * chunk, chunk)
        first = (wl.differing_blocks(pa, sa, BLOCK, i * chunk) or [i * chunk])[0]
        raise AssertionError(
            f"replicas differ in {len(bad)} of {len(p)} chunks; first differing block at offset "
            f"{first}: primary holds {wl.describe_block(pa[first - i * chunk:][:BLOCK], first, BLOCK)}, "
            f"secondary {wl.describe_block(sa[first - i * chunk:][:BLOCK], first, BLOCK)}"
        )


async def wait_state(cluster: LocalCluster, volume: str, state: str, timeout_s: float = 60.0) -> float:
    """Wait for the coordinator to report ``state``; returns the seconds waited."""
    t0 = time.monotonic()
    await cluster.wait_for_volume(volume, lambda st: sc.volume_status_dict(st)["state"] == state,
                                  timeout_s=timeout_s)
    return time.monotonic() - t0


async def wait_in_sync_and_identical(cluster: LocalCluster, volume: str, timeout_s: float = 90.0) -> None:
    await cluster.wait_for_volume(volume, "in_sync", timeout_s=timeout_s)
    await assert_replicas_identical(cluster, volume)


async def write_blocks(cl: sc.VolumeClient, first_block: int, count: int, per_write: int, seed: int,
                       model: dict[int, bytes]) -> int:
    """Write ``count`` distinct blocks from ``first_block``, ``per_write`` blocks
    per write, 8 in flight; record each block's bytes in ``model``. Returns bytes written.

    The blocks are self-describing (writer 0, version = the write's number in
    this call, run seed ``seed``), so a wrong block found later names the
    write it came from."""
    plan = []
    for v, b in enumerate(range(first_block, first_block + count, per_write), 1):
        data = wl.make_write(seed, 0, v, b * BLOCK, per_write, BLOCK)
        plan.append((b * BLOCK, data))
        for i in range(per_write):
            model[b + i] = data[i * BLOCK:(i + 1) * BLOCK]
    await cl.write_many(plan, depth=8)
    return count * BLOCK


async def check_model(cluster: LocalCluster, volume: str, model: dict[int, bytes]) -> None:
    """Every block in ``model`` holds, on the primary, the bytes last acknowledged."""
    read = await wl.read_blocks(await cluster.current_primary_addr(volume), volume, model, BLOCK)
    wrong = [b for b, want in sorted(model.items()) if read.get(b) != want]
    if wrong:
        b = wrong[0]
        raise AssertionError(
            f"LOST WRITE at block {b} (offset {b * BLOCK}), {len(wrong)} of {len(model)} blocks wrong: "
            f"holds {wl.describe_block(read.get(b, b''), b * BLOCK, BLOCK)}, "
            f"expected {wl.describe_block(model[b], b * BLOCK, BLOCK)}"
        )


class EventsProcess:
    """A ``syncrep events ARGS`` subprocess against ``cluster``: its stdout
    lines (``lines``) and stderr lines (``err``) collected as they come, both
    pipes read all along (an unread pipe that fills would block the process,
    and with it its Ctrl-C). ``close()`` in a ``finally`` ends it."""

    #: How long the process may take to exit after SIGINT/SIGTERM: generous,
    #: as a loaded 2-core box can take seconds to tear down grpc's threads;
    #: a process that never exits still fails.
    EXIT_TIMEOUT_S = 60.0

    def __init__(self, cluster: LocalCluster, *args: str) -> None:
        self.cluster = cluster
        self.args = args
        self.lines: list[str] = []
        self.err: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._readers: list[asyncio.Task[None]] = []

    async def start(self, first_line_timeout_s: float | None = None) -> EventsProcess:
        """Spawn it; with ``first_line_timeout_s``, also wait for its first stdout line."""
        self.proc = await asyncio.create_subprocess_exec(
            *self.cluster.cli_command("events", *self.args),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=self.cluster._environ(), cwd=str(self.cluster.workdir),
        )
        self._readers = [asyncio.create_task(_read_lines(self.proc.stdout, self.lines)),
                         asyncio.create_task(_read_lines(self.proc.stderr, self.err))]
        if first_line_timeout_s is not None:
            deadline = time.monotonic() + first_line_timeout_s
            while not self.lines:
                if self.proc.returncode is not None or time.monotonic() >= deadline:
                    raise AssertionError(
                        f"no first line from syncrep events {' '.join(self.args)} within "
                        f"{first_line_timeout_s:g} s (exit code {self.proc.returncode}); stderr: {self.err}")
                await asyncio.sleep(0.05)  # the poll's period
        return self

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    async def _end(self, sig: int) -> tuple[int, str]:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        rc = await asyncio.wait_for(self.proc.wait(), self.EXIT_TIMEOUT_S)
        for r in self._readers:
            await asyncio.wait_for(r, 10.0)
        return rc, "\n".join(self.err)

    async def interrupt(self) -> tuple[int, str]:
        """Ctrl-C (SIGINT): the exit code and the whole stderr."""
        return await self._end(signal.SIGINT)

    async def terminate(self) -> tuple[int, str]:
        """SIGTERM: the exit code and the whole stderr."""
        return await self._end(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()

    async def close(self) -> None:
        """The end of every test that started it (in a ``finally``): SIGTERM if
        it still runs (SIGKILL if it does not exit in time), readers ended."""
        if self.proc is None:
            return
        try:
            if self.proc.returncode is None:
                await self.terminate()
        except TimeoutError:
            self.kill()
            raise
        finally:
            for r in self._readers:
                r.cancel()


async def _read_lines(stream: asyncio.StreamReader | None, into: list[str]) -> None:
    """Every line of a subprocess's pipe, as it comes, into ``into``."""
    assert stream is not None
    while line := await stream.readline():
        into.append(line.decode(errors="replace").rstrip("\n"))
