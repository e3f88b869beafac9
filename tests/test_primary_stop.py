"""Regressions of the primary's executor found by reading the code (docs review),
named after the fault."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from primary.volume import PrimaryVolume
from syncrep.config import NodeOptions
from syncrep.core.pair import PairRecord
from syncrep.core.pairstate import PairState
from syncrep.pb import syncrep_pb2 as pb
from syncrep.volumes import VolumeRegistry


class _FailedLink:
    """A replication link that has just failed with one write unacked."""

    failed = True
    failure_reason = "test: the secondary stopped answering"

    class window:
        nacks: list[Any] = []

    class _W:
        seq, offset, length = 7, 8192, 4096

    failed_writes = [_W()]

    async def close(self) -> None:
        pass


async def test_graceful_stop_during_a_degrade_keeps_the_failure_information(tmp_path: Path) -> None:
    """Fault: SIGTERM (graceful stop) while the primary is going degraded, with
    the fault snapshot still being written. Before the fix, stop() cancelled the
    degrade: the waiting writes were released although their failed extents were
    never persisted, and the record (still in sync in memory) was marked clean,
    so the next start would replicate without a resync. Now the degrade
    finishes first: the record on disk is degraded, with the unacked write as a
    failed extent, and not clean."""
    registry = VolumeRegistry(tmp_path, "os")
    lv, _ = registry.assign(pb.VolumeAssignment(
        spec=pb.VolumeSpec(name="v", size_bytes=1 << 20, block_size=4096), role=pb.ROLE_PRIMARY, epoch=1,
        peer_address="secondary.invalid:1"))
    reports: list[pb.ReplicationReport] = []

    async def reporter(r: pb.ReplicationReport) -> None:
        reports.append(r)

    pv = PrimaryVolume(lv, NodeOptions(durability="os"), "primary.invalid:1", reporter)
    # Hold the volume's I/O thread, so the degrade waits in its fault snapshot.
    release = threading.Event()
    io_busy = lv.submit_io(release.wait, 10.0)
    pv.link = _FailedLink()  # type: ignore[assignment]
    pv._begin_degrade("test: the secondary stopped answering")
    stopping = asyncio.get_running_loop().create_task(pv.stop())
    await asyncio.sleep(0)  # stop() is now waiting; the degrade is blocked on the I/O thread
    release.set()
    await io_busy
    await asyncio.wait_for(stopping, 10.0)
    on_disk = PairRecord.from_meta(lv.store.meta_get)
    assert on_disk.state is PairState.DEGRADED
    assert [(e.offset, e.length) for e in on_disk.failed_extents] == [(8192, 4096)]
    assert on_disk.fault_snapshot_id != 0 and on_disk.clean != "1"
    registry.close()
