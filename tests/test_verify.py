"""``syncrep verify``: online comparison of the two replicas by per-chunk crc32c.

* ``mismatched_extents`` (pure): identical, one chunk, adjacent chunks merged,
  the last partial chunk clipped to the volume size, an offset slice.
* The CLI without a cluster: ``--help``, bad arguments and an unreachable
  coordinator exit 2 with one line; the summary and extent listing.
* End to end on a real cluster: identical -> exit 0 with JSON; a block
  corrupted on purpose in the secondary's store (while it is stopped) -> exit 1
  naming that block's extent; ``--repair`` fixes it (exit 0); a final verify
  exits 0. Repair is refused (exit 2) while the pair is degraded.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from deploy.cluster import LocalCluster, free_port
from syncrep import cli, rpc
from syncrep.blockstore import BlockStore, Extent
from syncrep.client import inject_fault
from syncrep.verify import VerifyError, VerifyResult, mismatched_extents, verify_volume

REPO = Path(__file__).resolve().parent.parent
KiB = 1024
MiB = 1024 * KiB
# The `cluster` fixture's volume (tests/conftest.py).
VOLUME = "vol0"
VOLUME_SIZE = 16 * MiB
BLOCK_SIZE = 4096


def random_bytes(n: int, seed: int | str) -> bytes:
    """``n`` pseudo-random bytes of ``seed`` (derive it from the ``seed`` fixture)."""
    return random.Random(seed).randbytes(n)


# ---------------------------------------------------------------- mismatched_extents


@pytest.mark.parametrize(
    "primary,secondary,chunk,offset,size,expect",
    [
        pytest.param([1, 2, 3, 4], [1, 2, 3, 4], 100, 0, 400, [], id="identical"),
        pytest.param([], [], 100, 0, 0, [], id="empty"),
        pytest.param([1, 2, 3, 4], [1, 9, 3, 4], 100, 0, 400, [Extent(100, 100)], id="one-chunk"),
        pytest.param([1, 2, 3, 4], [1, 9, 9, 4], 100, 0, 400, [Extent(100, 200)], id="adjacent-merged"),
        pytest.param(
            [1, 2, 3, 4, 5], [9, 2, 9, 9, 5], 100, 0, 500, [Extent(0, 100), Extent(200, 200)], id="two-runs"
        ),
        pytest.param([1, 2, 3], [1, 2, 9], 100, 0, 250, [Extent(200, 50)], id="last-partial-clipped"),
        pytest.param([1, 2, 3], [1, 9, 9], 100, 0, 250, [Extent(100, 150)], id="merged-into-partial"),
        pytest.param([1, 2, 3], [9, 9, 9], 100, 0, 250, [Extent(0, 250)], id="all-differ"),
        pytest.param([1, 2], [1, 9], 4096, 8192, 20000, [Extent(12288, 4096)], id="offset-slice"),
        pytest.param([1, 2], [1, 9], 4096, 12288, 18000, [Extent(16384, 1616)], id="offset-slice-clipped"),
        pytest.param([1, 2, 3], [1, 2], 100, 0, 300, [Extent(200, 100)], id="missing-checksum-differs"),
        pytest.param([1, 2, 3, 4], [1, 2, 3, 4, 5], 100, 0, 400, [], id="beyond-volume-ignored"),
    ],
)
def test_mismatched_extents(
    primary: list[int], secondary: list[int], chunk: int, offset: int, size: int, expect: list[Extent]
) -> None:
    assert mismatched_extents(primary, secondary, chunk, offset, size) == expect


def test_mismatched_extents_is_symmetric_and_rejects_bad_chunk() -> None:
    a, b = [1, 2, 3, 4, 5, 6], [1, 0, 0, 4, 0, 6]
    assert mismatched_extents(a, b, 8, 0, 48) == mismatched_extents(b, a, 8, 0, 48) == [
        Extent(8, 16), Extent(32, 8)
    ]
    with pytest.raises(ValueError):
        mismatched_extents([1], [2], 0, 0, 10)


# ---------------------------------------------------------------- summary text


def _result(mismatches: list[Extent], **kw: object) -> VerifyResult:
    base: dict[str, object] = dict(
        volume="v1", primary="127.0.0.1:7001", secondary="127.0.0.1:7002", size_bytes=64 * MiB,
        block_size=4096, chunk_bytes=MiB, chunks=64, mismatches=mismatches,
        mismatched_bytes=sum(e.length for e in mismatches), elapsed_s=0.12, hash_rate_bytes_per_s=530 * MiB,
    )
    base.update(kw)
    return VerifyResult(**base)  # type: ignore[arg-type]


def test_summary_identical() -> None:
    line = cli.verify_summary(_result([]))
    assert line == (
        "v1: primary 127.0.0.1:7001 and secondary 127.0.0.1:7002 are identical: "
        "16384 blocks, 64.0 MiB compared in 0.12 s (530.0 MiB/s)"
    )


def test_summary_and_extents_differ() -> None:
    exts = [Extent(i * 2 * MiB, MiB) for i in range(13)]
    r = _result(exts)
    line = cli.verify_summary(r)
    assert "DIFFER" in line and "13 extent(s)" in line and "13 of 64 chunks" in line
    lines = cli.verify_extent_lines(r, limit=10)
    assert len(lines) == 11
    assert "offset" in lines[0] and str(2 * MiB) in lines[1] and str(MiB) in lines[1]
    assert lines[-1].strip() == "... and 3 more"
    d = r.to_dict()
    assert d["identical"] is False and d["mismatch_count"] == 13 and d["mismatched_bytes"] == 13 * MiB
    assert json.loads(json.dumps(d))["mismatches"][1] == {"offset": 2 * MiB, "length": MiB}


# ---------------------------------------------------------------- CLI, no cluster


def run_cli(*args: str, timeout: float = 60.0) -> tuple[int, str, str]:
    if not {"--certs-dir", "--insecure"} & set(args):
        # The security of the cluster the harness runs now (LocalCluster configures syncrep.rpc as admin).
        sec = rpc.security
        args = (*args, *(["--certs-dir", str(sec.certs_dir)] if sec and sec.certs_dir else ["--insecure"]))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), env.get("PYTHONPATH", "")) if x)
    r = subprocess.run(
        [sys.executable, "-m", "syncrep", *args], capture_output=True, timeout=timeout, env=env, cwd=str(REPO)
    )
    return r.returncode, r.stdout.decode(), r.stderr.decode()


async def arun_cli(*args: str, limit_s: float = 60.0) -> tuple[int, str, str]:
    """``python -m syncrep ARGS`` without blocking the event loop."""
    return await asyncio.to_thread(run_cli, *args, timeout=limit_s)


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {stderr!r}"
    assert lines[0].startswith("syncrep: error: "), lines[0]
    return lines[0]


def test_verify_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["verify", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("usage: syncrep verify")
    for word in ["NAME", "--coordinator", "--repair", "--chunk-bytes", "--json", "(default: 1MiB)",
                 "transient", "in flight", "Exit status", "crc32c"]:
        assert word in out, word


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["verify", "v"], "--coordinator"),
        (["verify", "v", "--coordinator", "nonsense"], "invalid address"),
        (["verify", "v", "--coordinator", "127.0.0.1:1", "--chunk-bytes", "1QiB"], "invalid size"),
        (["verify", "v", "--coordinator", "127.0.0.1:1", "--chunk-bytes", "0"], "greater than 0"),
    ],
)
def test_verify_bad_arguments_exit_2(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert needle in one_error_line(capsys.readouterr().err)


def test_verify_unreachable_coordinator_exit_2() -> None:
    port = free_port()
    t0 = time.monotonic()
    rc, out, err = run_cli("verify", "vol0", "--coordinator", f"127.0.0.1:{port}", timeout=20)
    assert rc == 2
    line = one_error_line(err)
    assert f"cannot reach coordinator 127.0.0.1:{port}" in line and line.endswith("(UNAVAILABLE)")
    assert out == ""
    assert time.monotonic() - t0 < 10


# ---------------------------------------------------------------- end to end


def corrupt_secondary_block(cluster: LocalCluster, offset: int) -> None:
    """Write garbage into the (stopped) secondary's own store, behind replication's back."""
    path = cluster.data_dir("secondary") / "volumes" / VOLUME
    store = BlockStore.open(path)
    try:
        old = store.read(offset, BLOCK_SIZE)
        new = bytes(b ^ 0xFF for b in old)
        store.write(offset, new)
    finally:
        store.close()


async def test_verify_cli_detects_and_repairs(cluster: LocalCluster, seed: int) -> None:
    """Fault: one block of the secondary's store is corrupted while it is stopped."""
    coord = cluster.coordinator_addr
    client = await cluster.connect(VOLUME)
    try:
        for i in range(8):
            await client.write(i * 2 * MiB, random_bytes(256 * KiB, seed=f"{seed}-{i}"))
    finally:
        await client.close()

    rc, out, err = await arun_cli("verify", VOLUME, "--coordinator", coord)
    assert rc == 0, err
    assert "are identical" in out and f"{VOLUME_SIZE // BLOCK_SIZE} blocks" in out
    rc, out, err = await arun_cli("verify", VOLUME, "--coordinator", coord, "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["identical"] is True and d["mismatches"] == [] and d["size_bytes"] == VOLUME_SIZE
    assert d["chunks"] == VOLUME_SIZE // MiB and d["chunk_bytes"] == MiB
    assert d["primary"] == cluster.primary_addr and d["secondary"] == cluster.secondary_addr
    assert d["hash_rate_bytes_per_s"] > 0

    # Make the replicas differ on purpose: one block of the secondary's copy.
    bad = 5 * MiB + 8 * KiB
    await cluster.stop("secondary")
    await asyncio.to_thread(corrupt_secondary_block, cluster, bad)
    await cluster.restart("secondary")
    await cluster.wait_for_volume(VOLUME, "in_sync", timeout_s=60)

    rc, out, err = await arun_cli("verify", VOLUME, "--coordinator", coord)
    assert rc == 1, (out, err)
    assert "DIFFER" in out and "1 extent(s)" in out
    assert f"offset {5 * MiB:>15}  length {MiB:>12}" in out, out
    rc, out, err = await arun_cli("verify", VOLUME, "--coordinator", coord, "--json")
    assert rc == 1, err
    assert json.loads(out)["mismatches"] == [{"offset": 5 * MiB, "length": MiB}]

    # Block granularity, in small slices (exercises slicing and the partial last slice).
    r = await verify_volume(coord, VOLUME, chunk_bytes=BLOCK_SIZE, slice_chunks=1000)
    assert r.mismatches == [Extent(bad, BLOCK_SIZE)] and r.mismatched_bytes == BLOCK_SIZE
    assert r.chunks == VOLUME_SIZE // BLOCK_SIZE

    rc, out, err = await arun_cli("verify", VOLUME, "--coordinator", coord, "--repair", "--json")
    assert rc == 0, (out, err)
    d = json.loads(out)
    assert d["identical"] is True and d["repaired_bytes"] == MiB
    assert d["before_repair"]["mismatches"] == [{"offset": 5 * MiB, "length": MiB}]

    rc, out, err = await arun_cli("verify", VOLUME, "--coordinator", coord)
    assert rc == 0, (out, err)
    assert "are identical" in out
    # The repaired block holds the primary's data on both nodes.
    r = await verify_volume(coord, VOLUME, chunk_bytes=BLOCK_SIZE)
    assert r.identical


async def test_verify_repair_text_output_and_bad_chunk(cluster: LocalCluster) -> None:
    """Fault: the first and the last block of the secondary's store are corrupted while it is stopped."""
    coord = cluster.coordinator_addr
    await cluster.stop("secondary")
    await asyncio.to_thread(corrupt_secondary_block, cluster, 0)
    await asyncio.to_thread(corrupt_secondary_block, cluster, VOLUME_SIZE - BLOCK_SIZE)
    await cluster.restart("secondary")
    await cluster.wait_for_volume(VOLUME, "in_sync", timeout_s=60)

    # A chunk that does not divide the volume: the last chunk is clipped to the volume size.
    r = await verify_volume(coord, VOLUME, chunk_bytes=3 * BLOCK_SIZE, slice_chunks=500)
    last = VOLUME_SIZE // (3 * BLOCK_SIZE) * 3 * BLOCK_SIZE
    assert r.mismatches == [Extent(0, 3 * BLOCK_SIZE), Extent(last, VOLUME_SIZE - last)]
    assert r.chunks == -(-VOLUME_SIZE // (3 * BLOCK_SIZE))

    rc, out, err = await arun_cli("verify", VOLUME, "--coordinator", coord, "--repair", "--chunk-bytes", "64KiB")
    assert rc == 0, (out, err)
    lines = out.splitlines()
    assert "DIFFER" in lines[0] and "2 extent(s)" in lines[0]
    assert any(ln.startswith("repair: the primary re-sent 128.0 KiB") for ln in lines), out
    assert lines[-1].startswith("after repair: ") and "are identical" in lines[-1]

    rc, out, err = await arun_cli("verify", VOLUME, "--coordinator", coord, "--chunk-bytes", "6KiB")
    assert rc == 2
    assert "multiple of the volume's 4096-byte block size" in one_error_line(err)
    with pytest.raises(VerifyError):
        await verify_volume(coord, VOLUME, chunk_bytes=128 * MiB)
    rc, _, err = await arun_cli("verify", "nope", "--coordinator", coord)
    assert rc == 2 and one_error_line(err).endswith("(NOT_FOUND)")


async def test_verify_while_degraded_differs_and_repair_is_refused(
    cluster_factory: Callable[..., LocalCluster], seed: int,
) -> None:
    """Fault: the secondary NACKs every write with ENOSPC (fault injection), so the pair degrades."""
    c = cluster_factory(extra_args={"secondary": ["--enable-fault-injection"]})
    await c.start()
    await c.create_volume(VOLUME, VOLUME_SIZE, BLOCK_SIZE)
    coord = c.coordinator_addr
    await inject_fault(c.secondary_addr, VOLUME, "enospc", count=1_000_000)
    client = await c.connect(VOLUME)
    try:
        await client.write(3 * MiB, random_bytes(64 * KiB, seed=f"{seed}-degraded"))
    finally:
        await client.close()
    await c.wait_for_volume(VOLUME, lambda st: st.fault_snapshot_id > 0 and len(st.failed_extents) > 0)

    rc, out, err = await arun_cli("verify", VOLUME, "--coordinator", coord)
    assert rc == 1, (out, err)
    assert f"offset {3 * MiB:>15}" in out
    assert "note: the pair is" in out

    rc, out, err = await arun_cli("verify", VOLUME, "--coordinator", coord, "--repair")
    assert rc == 2, (out, err)
    assert "DIFFER" in out  # the first pass is still shown
    line = one_error_line(err)
    assert "repair refused" in line and line.endswith("(FAILED_PRECONDITION)")

    await inject_fault(c.secondary_addr, VOLUME, "clear")
    await c.wait_for_volume(VOLUME, "in_sync", timeout_s=60)
    rc, out, err = await arun_cli("verify", VOLUME, "--coordinator", coord)
    assert rc == 0, (out, err)
