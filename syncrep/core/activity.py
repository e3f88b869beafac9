"""The activity log: which regions may differ between the nodes if the primary crashes.

DRBD's idea. While in sync, a write is sent to the secondary and applied
locally at the same time; if the primary crashes mid-way, either node may hold
a write the other lacks. Which writes, nobody knows after the restart — so
before a write touches a region that is not yet in the log, the region is
added and the log persisted; a region leaves the log (least recently used
first) only when no write to it is in flight. After a crash while in sync the
regions in the log are exactly the places the replicas can differ, and resync
sends those (plus what changed since) instead of the whole volume.

Pure bookkeeping: the primary persists ``regions()`` and carries out the I/O.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from syncrep.blockstore.extents import Extent

AL_REGION_BYTES = 4 * 1024 * 1024
AL_MAX_REGIONS = 1024  # 4 GiB of hot regions


class ActivityLog:
    def __init__(self, region_bytes: int = AL_REGION_BYTES, max_regions: int = AL_MAX_REGIONS,
                 regions: Iterable[int] = ()) -> None:
        if region_bytes <= 0 or max_regions <= 0:
            raise ValueError("region_bytes and max_regions must be > 0")
        self.region_bytes = region_bytes
        self.max_regions = max_regions
        # region -> writes in flight; order = least recently used first
        self._lru: OrderedDict[int, int] = OrderedDict((r, 0) for r in regions)

    def regions_for(self, writes: Iterable[tuple[int, int]]) -> set[int]:
        """Regions touched by (offset, length) writes."""
        out: set[int] = set()
        for off, n in writes:
            out.update(range(off // self.region_bytes, (off + max(n, 1) - 1) // self.region_bytes + 1))
        return out

    def missing(self, regions: Iterable[int]) -> list[int]:
        return sorted(r for r in regions if r not in self._lru)

    def add(self, regions: Iterable[int]) -> list[int]:
        """Add regions, evicting idle least-recently-used ones beyond
        max_regions. Returns the evicted regions. If every region is busy the
        log grows past max_regions (bounded by the replication window)."""
        new = [r for r in regions if r not in self._lru]
        keep = set(regions)
        evicted: list[int] = []
        excess = len(self._lru) + len(new) - self.max_regions
        if excess > 0:
            for r, inflight in self._lru.items():
                if excess <= 0:
                    break
                if inflight == 0 and r not in keep:
                    evicted.append(r)
                    excess -= 1
            for r in evicted:
                del self._lru[r]
        for r in new:
            self._lru[r] = 0
        return evicted

    def acquire(self, regions: Iterable[int]) -> None:
        for r in regions:
            assert r in self._lru, f"write to region {r} that is not in the activity log"
            self._lru[r] += 1
            self._lru.move_to_end(r)

    def release(self, regions: Iterable[int]) -> None:
        for r in regions:
            n = self._lru.get(r)
            assert n is not None and n > 0, f"release of region {r} with no write in flight"
            self._lru[r] = n - 1

    def regions(self) -> list[int]:
        return list(self._lru)

    def extents(self, volume_size: int) -> list[Extent]:
        """The logged regions as byte extents, clipped to the volume, in offset order."""
        out = []
        for r in sorted(self._lru):
            start = r * self.region_bytes
            if start < volume_size:
                out.append(Extent(start, min(self.region_bytes, volume_size - start)))
        return out
