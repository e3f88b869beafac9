"""TRIM and WRITE_ZEROES as replicated zero ranges (issue 14), end to end.

A real cluster with NBD exports on both nodes and a 64 GiB thin volume, driven
by qemu-io: data written in a few places, then ``discard`` of the whole volume
(64 commands of 1 GiB, qemu-io's limit per command being 2 GiB - 512).
It must be one zero-range op per NBD request (holes punched on both nodes, no
zero buffers through the replicated write path): afterwards nothing is
allocated in either node's data file (st_blocks 0), what was written reads back
as zeros on both nodes, and the replicas are identical (``syncrep verify``,
which answers holes without reading them). Then the secondary is killed, the
primary TRIMs degraded (tracked in the fault snapshot's change set), writes
again inside the trimmed range, and the resync makes the secondary identical.

The TRIM's time is printed, not asserted: speed is checked by bench/, not by
tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from test_nbd_e2e import VOLUME, assert_replicas_identical, need_tool, run_tool, start_nbd_cluster

from deploy.cluster import LocalCluster
from syncrep.pb import syncrep_pb2 as pb

MiB = 1 << 20
GiB = 1 << 30
SIZE = 64 * GiB
#: Where qemu-io writes before the TRIM: start, middle, end of the volume.
SPOTS = (0, 17 * GiB + 3 * MiB, SIZE - 4 * MiB)


def allocated(c: LocalCluster, node: str) -> int:
    """Bytes allocated to the data file of VOLUME on ``node`` (st_blocks)."""
    return (c.volume_dir(node, VOLUME) / "data").stat().st_blocks * 512


async def qemu_io(url: str, *cmds: str, read_only: bool = False, timeout_s: float = 300.0) -> float:
    """Run qemu-io commands against an NBD export; returns the seconds it took."""
    argv = ["qemu-io", "-f", "raw", *(["-r"] if read_only else [])]
    for cmd in cmds:
        argv += ["-c", cmd]
    t0 = time.monotonic()
    r = await run_tool(*argv, url, timeout_s=timeout_s)
    assert "Pattern verification failed" not in r.stdout + r.stderr, r.stdout + r.stderr
    return time.monotonic() - t0


async def test_trim_of_64_gib_volume_punches_holes_on_both_nodes_then_degraded_trim_resyncs(
    cluster_factory: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    """Fault: the secondary is SIGKILLed, then the primary TRIMs and writes
    degraded; the secondary comes back and is resynced."""
    need_tool("qemu-io")
    n = await start_nbd_cluster(cluster_factory, size=SIZE)
    c = n.c
    await qemu_io(n.url("primary"), *(f"write -P 0x5a {o} {4 * MiB}" for o in SPOTS))
    for node in ("primary", "secondary"):
        assert allocated(c, node) >= len(SPOTS) * 4 * MiB, (node, allocated(c, node))
    await qemu_io(n.url("secondary"), *(f"read -P 0x5a {o} {4 * MiB}" for o in SPOTS), read_only=True)

    # qemu-io takes at most 2 GiB - 512 per discard: 64 of 1 GiB, one session.
    took = await qemu_io(n.url("primary"), *(f"discard {o} {GiB}" for o in range(0, SIZE, GiB)))
    print(f"TRIM of {SIZE >> 30} GiB through NBD: {took:.2f} s; allocated after: primary "
          f"{allocated(c, 'primary')} bytes, secondary {allocated(c, 'secondary')} bytes")
    assert allocated(c, "primary") == 0
    assert allocated(c, "secondary") == 0
    for node in ("primary", "secondary"):
        await qemu_io(n.url(node), *(f"read -P 0 {o} {4 * MiB}" for o in SPOTS), read_only=True)
    st = await c.get_volume(VOLUME)
    assert st.state == pb.PAIR_STATE_IN_SYNC, "a TRIM must not degrade the pair"
    t0 = time.monotonic()
    await assert_replicas_identical(c)
    print(f"syncrep verify of the trimmed {SIZE >> 30} GiB volume: {time.monotonic() - t0:.2f} s")

    # Degraded: data written while in sync, the secondary killed, then a TRIM
    # over it and a write inside the trimmed range, both on the primary only.
    await qemu_io(n.url("primary"), f"write -P 0x33 {GiB} {8 * MiB}")
    c.kill("secondary")
    took = await qemu_io(n.url("primary"), f"discard {GiB // 2} {GiB}", f"write -P 0x44 {GiB + 2 * MiB} {MiB}")
    print(f"degraded TRIM of 1 GiB (8 MiB of it allocated) + 1 MiB write: {took:.2f} s")
    st = await c.get_volume(VOLUME)
    assert st.state != pb.PAIR_STATE_IN_SYNC, "the pair should be degraded with the secondary dead"
    await c.restart("secondary")
    await c.wait_for_volume(VOLUME, "in_sync", timeout_s=120)
    expect = (f"read -P 0 {GiB} {2 * MiB}", f"read -P 0x44 {GiB + 2 * MiB} {MiB}",
              f"read -P 0 {GiB + 3 * MiB} {5 * MiB}", *(f"read -P 0 {o} {4 * MiB}" for o in SPOTS))
    for node in ("primary", "secondary"):
        await qemu_io(n.url(node), *expect, read_only=True)
    await assert_replicas_identical(c)
