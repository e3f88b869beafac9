"""Workload and checkers shared by the multi-process tests.

``Workload`` runs several concurrent writers through the primary. Each writer
owns a disjoint region, so the expected content of every block is exact: the
model holds the last acknowledged write. A write that failed (or was still in
flight when the workload stopped) leaves its blocks *indeterminate*: they may
hold the old or the new bytes, never anything else.

``check_no_lost_writes`` reads every touched block back from the primary and
checks it against the model; ``assert_replicas_identical`` compares primary and
secondary block for block (per-chunk checksums computed on each node, then a
byte read of any chunk that differs, for a precise message).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

from deploy.cluster import LocalCluster
from syncrep import client as sc

BLOCK = 4096


@dataclass
class Region:
    start: int
    size: int
    model: bytearray
    # block index (relative) -> set of possible contents (bytes) when indeterminate
    maybe: dict[int, set[bytes]] = field(default_factory=dict)
    touched: set[int] = field(default_factory=set)


class Workload:
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
        self.cluster = cluster
        self.volume = volume
        self.seed = seed
        self.max_blocks = max_blocks
        total = region_size or (volume_size - region_start)
        per = (total // writers) // BLOCK * BLOCK
        self.regions = [
            Region(region_start + i * per, per, bytearray(per)) for i in range(writers)
        ]
        self.acked = 0
        self.failed = 0
        self.errors: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.client: sc.VolumeClient | None = None

    async def start(self) -> None:
        self.client = await self.cluster.connect(self.volume)
        self._tasks = [
            asyncio.create_task(self._writer(i, r)) for i, r in enumerate(self.regions)
        ]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        if self.client is not None:
            await self.client.close()

    async def run_for(self, seconds: float) -> None:
        await self.start()
        await asyncio.sleep(seconds)
        await self.stop()

    async def wait_acked(self, n: int, timeout_s: float = 30.0) -> None:
        """Wait until n more writes were acknowledged (bounded)."""
        target = self.acked + n
        deadline = time.monotonic() + timeout_s
        while self.acked < target:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {self.acked} of {target} writes acknowledged in {timeout_s} s")
            await asyncio.sleep(0.02)

    async def _writer(self, wid: int, r: Region) -> None:
        rng = random.Random(f"{self.seed}-{wid}")
        nblocks = r.size // BLOCK
        version = 0
        while not self._stop.is_set():
            version += 1
            n = rng.randint(1, min(self.max_blocks, nblocks))
            b0 = rng.randrange(0, nblocks - n + 1)
            data = rng.randbytes(n * BLOCK)
            off = r.start + b0 * BLOCK
            assert self.client is not None
            try:
                await self.client.write(off, data)
            except sc.ClientError as e:
                self.failed += 1
                self.errors.append(str(e))
                for i in range(n):
                    blk = b0 + i
                    r.maybe.setdefault(blk, {bytes(r.model[blk * BLOCK:(blk + 1) * BLOCK])}).add(
                        data[i * BLOCK:(i + 1) * BLOCK]
                    )
                    r.touched.add(blk)
                await asyncio.sleep(0.05)
                continue
            r.model[b0 * BLOCK:(b0 + n) * BLOCK] = data
            for i in range(n):
                r.maybe.pop(b0 + i, None)
                r.touched.add(b0 + i)
            self.acked += 1


async def check_no_lost_writes(cluster: LocalCluster, volume: str, w: Workload) -> None:
    """Every touched block on the primary holds the last acknowledged version
    (or, for blocks of failed writes, one of the versions that was possible)."""
    for r in w.regions:
        if not r.touched:
            continue
        data = b""
        step = 1 << 20
        for off in range(0, r.size, step):
            n = min(step, r.size - off)
            data += await sc.read_local(cluster.primary_addr, volume, r.start + off, n)
        for blk in sorted(r.touched):
            got = data[blk * BLOCK:(blk + 1) * BLOCK]
            want = bytes(r.model[blk * BLOCK:(blk + 1) * BLOCK])
            if blk in r.maybe:
                assert got in r.maybe[blk], (
                    f"block at offset {r.start + blk * BLOCK} holds bytes no writer wrote (seed {w.seed})"
                )
            else:
                assert got == want, (
                    f"LOST WRITE: block at offset {r.start + blk * BLOCK} does not hold the last "
                    f"acknowledged version (seed {w.seed})"
                )


async def assert_replicas_identical(cluster: LocalCluster, volume: str, chunk: int = 1 << 20) -> None:
    p, s = await asyncio.gather(
        sc.checksum(cluster.primary_addr, volume, chunk),
        sc.checksum(cluster.secondary_addr, volume, chunk),
    )
    assert len(p) == len(s)
    bad = [i for i, (a, b) in enumerate(zip(p, s, strict=True)) if a != b]
    if bad:
        i = bad[0]
        pa = await sc.read_local(cluster.primary_addr, volume, i * chunk, chunk)
        sa = await sc.read_local(cluster.secondary_addr, volume, i * chunk, chunk)
        first = next(k for k in range(0, chunk, BLOCK) if pa[k:k + BLOCK] != sa[k:k + BLOCK])
        raise AssertionError(
            f"replicas differ in {len(bad)} of {len(p)} chunks; first differing block at offset "
            f"{i * chunk + first}"
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
    per write, 8 in flight; record each block's bytes in ``model``. Returns bytes written."""
    rng = random.Random(seed)
    plan = []
    for b in range(first_block, first_block + count, per_write):
        data = rng.randbytes(per_write * BLOCK)
        plan.append((b * BLOCK, data))
        for i in range(per_write):
            model[b + i] = data[i * BLOCK:(i + 1) * BLOCK]
    await cl.write_many(plan, depth=8)
    return count * BLOCK


async def check_model(cluster: LocalCluster, volume: str, model: dict[int, bytes]) -> None:
    """Every block in ``model`` holds, on the primary, the bytes last acknowledged."""
    for b, want in sorted(model.items()):
        got = await sc.read_local(cluster.primary_addr, volume, b * BLOCK, BLOCK)
        assert got == want, f"LOST WRITE at block {b} (offset {b * BLOCK})"
