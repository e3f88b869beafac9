"""The volume lifecycle end to end (issue 13): real processes, mutual TLS.

* ``syncrep volume list [--json]``: name, size, state, primary, secondary.
* ``syncrep volume delete NAME``: refused without a terminal unless --yes;
  on a terminal (a pty) the volume's name must be typed; the pair record and
  its grants go, both nodes remove their store; a node that was down keeps its
  store, logs one WARNING and never serves it.
* ``syncrep volume resize NAME --size S``: grows online under a running
  workload (the secondary first, then the primary); the new blocks read as
  zeros, writes past the old end work once it returns (also on a client
  connected before); refused when shrinking, not block-aligned, or not in sync.
* A thin volume larger than the nodes' free space is created with a warning
  naming the free space; ``--size 10GB`` is refused with the 10GiB hint.
* I/O that crosses the end of a volume is refused before any byte moves:
  ``syncrep write`` measures its input (a file by fstat, a pipe spooled up to
  the room left plus one byte) and refuses OUT_OF_RANGE before the first
  write; ``syncrep read`` refuses before it creates the output file, and a
  read that fails later leaves no partial file (temporary file, renamed on
  success); ``VolumeClient.write``/``read`` check against the size GetVolume
  gave; the node still refuses a write past the end itself (OUT_OF_RANGE).

Every test that changes something ends by comparing the replicas block for
block and checking every acknowledged write. ``seed`` seeds the written
blocks (each test's docstring names its default).
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from conftest import VOLUME
from e2e_helpers import (
    BLOCK,
    Workload,
    assert_replicas_identical,
    check_model,
    check_no_lost_writes,
    wait_state,
    write_blocks,
)

from deploy.cluster import LocalCluster
from syncrep import client as sc
from syncrep import volumes

pytestmark = pytest.mark.e2e

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
#: The volume of the issue's example: thin, 1 GiB.
BIG = "big"
BIG_SIZE = 1 * GiB
#: Bound of one CLI run (a TLS handshake and a few RPCs on loopback).
CLI_TIMEOUT_S = 60.0


async def cli(cluster: LocalCluster, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """The real command line against ``cluster``; ``stdin`` is fed through a pipe (not a file)."""
    proc = await asyncio.create_subprocess_exec(
        *cluster.cli_command(*args),
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(cluster.workdir),
        env=cluster._environ(),  # as run_cli: this checkout's code, the cluster's certificates
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), CLI_TIMEOUT_S)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(list(args), proc.returncode, out, err)


async def both_zero(cluster: LocalCluster, volume: str, offset: int, length: int) -> None:
    """Neither replica holds anything but zeros in [offset, offset + length)."""
    for node in (cluster.primary_addr, cluster.secondary_addr):
        data = await sc.read_local(node, volume, offset, length)
        first = next((i for i, b in enumerate(data) if b), None)
        assert first is None, f"{node} holds written bytes at offset {offset + first} of {volume}"


def partial_files(d: Path) -> list[str]:
    """The temporary files ``syncrep read --output d/out.bin`` writes before its rename."""
    return sorted(f.name for f in d.glob(".out.bin.*"))


@pytest.fixture
async def big(cluster_factory: Callable[..., LocalCluster]) -> LocalCluster:
    c = cluster_factory()
    await c.start()
    await c.create_volume(BIG, BIG_SIZE, BLOCK)
    return c


# ---------------------------------------------------------------- 6: I/O past the end


@pytest.mark.parametrize("seed", [1306], indirect=True)
async def test_write_crossing_the_end_is_refused_before_any_byte_moves(
    big: LocalCluster, tmp_path: Path, seed: int
) -> None:
    """Fault: a 3 MiB write at 1022 MiB of a 1 GiB volume (it used to write 2 MiB, then fail), from a file
    and from a pipe, and with --pad; then the same at 1021 MiB, which fits. Seed 1306."""
    src = tmp_path / "3mib.bin"
    payload = bytes(range(256)) * (3 * MiB // 256)
    src.write_bytes(payload)
    at = 1022 * MiB
    r = await cli(big, "write", BIG, "--offset", str(at), "--input", str(src))
    assert r.returncode == 1, r
    err = r.stderr.decode()
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "ends at 1074790400, beyond the end of volume 'big' (1073741824 bytes" in err, err
    assert "nothing was written" in err and err.rstrip().endswith("(OUT_OF_RANGE)"), err
    # A pipe cannot be measured: it is spooled up to the room left plus one byte.
    r = await cli(big, "write", BIG, "--offset", str(at), stdin=payload)
    assert r.returncode == 1, r
    err = r.stderr.decode()
    assert "the input is longer than the 2097152 bytes left" in err and "(OUT_OF_RANGE)" in err, err
    # --pad rounds the length up to whole blocks before the check: 2 MiB + 1 byte does not fit.
    r = await cli(big, "write", BIG, "--offset", str(at), "--pad", stdin=payload[: 2 * MiB + 1])
    assert r.returncode == 1 and b"(OUT_OF_RANGE)" in r.stderr, r
    await both_zero(big, BIG, at, 2 * MiB)
    # The same write where it fits (ends exactly at the end), from a pipe: written in full.
    r = await cli(big, "write", BIG, "--offset", str(BIG_SIZE - 3 * MiB), stdin=payload)
    assert r.returncode == 0, r
    async with await big.connect(BIG) as c:
        assert await c.read(BIG_SIZE - 3 * MiB, 3 * MiB) == payload
        model: dict[int, bytes] = {(BIG_SIZE - 3 * MiB) // BLOCK + i: payload[i * BLOCK:(i + 1) * BLOCK]
                                   for i in range(3 * MiB // BLOCK)}
        await write_blocks(c, 0, 64, 4, seed, model)
    await big.wait_for_volume(BIG, "in_sync")
    await assert_replicas_identical(big, BIG)
    await check_model(big, BIG, model)


async def test_read_past_the_end_leaves_no_output_file(big: LocalCluster, tmp_path: Path) -> None:
    """Fault: a read of 2 MiB at 1023 MiB of a 1 GiB volume (it used to leave a partial output file);
    an existing output is left untouched; a read that fits creates the file whole. No seed (no writes)."""
    out = tmp_path / "out.bin"
    r = await cli(big, "read", BIG, "--offset", "1023MiB", "--length", "2MiB", "--output", str(out))
    assert r.returncode == 1, r
    err = r.stderr.decode()
    assert "beyond the end of volume 'big'" in err and "no output written" in err, err
    assert err.rstrip().endswith("(OUT_OF_RANGE)"), err
    assert not out.exists(), "a refused read created its output file"
    assert not partial_files(tmp_path), "a refused read left a temporary file"
    out.write_bytes(b"keep me")
    r = await cli(big, "read", BIG, "--offset", "1023MiB", "--length", "2MiB", "--output", str(out))
    assert r.returncode == 1 and out.read_bytes() == b"keep me", r
    # To stdout: refused before the first byte too.
    r = await cli(big, "read", BIG, "--offset", "1023MiB", "--length", "2MiB")
    assert r.returncode == 1 and r.stdout == b"", r
    # The last MiB, exactly: the whole file, no temporary left.
    r = await cli(big, "read", BIG, "--offset", "1023MiB", "--length", "1MiB", "--output", str(out))
    assert r.returncode == 0, r
    assert out.read_bytes() == bytes(MiB)
    assert not partial_files(tmp_path), "a temporary file was left"


async def test_read_failing_midway_leaves_no_partial_file(big: LocalCluster, tmp_path: Path) -> None:
    """Fault: the primary is stopped (SIGSTOP) in the middle of a long read: the read fails and its
    output file does not exist. No seed (no writes)."""
    out = tmp_path / "out.bin"
    task = asyncio.create_task(cli(big, "read", BIG, "--offset", "0", "--length", "1GiB", "--output", str(out)))
    await asyncio.sleep(0)  # the command starts; the pause comes while it reads
    partial = partial_files(tmp_path)
    deadline = asyncio.get_running_loop().time() + CLI_TIMEOUT_S
    while not partial and not task.done() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
        partial = partial_files(tmp_path)
    assert partial, "the read never started writing its temporary file"
    big.pause("primary")
    try:
        r = await task
    finally:
        big.resume("primary")
    assert r.returncode == 1, r
    assert not partial_files(tmp_path), partial_files(tmp_path)
    assert not out.exists(), "a read that failed midway left its output file"
    await big.wait_for_volume(BIG, "in_sync")


@pytest.mark.parametrize("seed", [1307], indirect=True)
async def test_volume_client_refuses_past_the_end_and_the_node_still_does(big: LocalCluster, seed: int) -> None:
    """Fault: VolumeClient writes and reads that cross the end (refused by the client, OUT_OF_RANGE,
    nothing sent), and a client that does not know the size (the node refuses, OUT_OF_RANGE). Seed 1307."""
    model: dict[int, bytes] = {}
    async with await big.connect(BIG) as c:
        with pytest.raises(sc.WriteError) as w:
            await c.write(BIG_SIZE - BLOCK, bytes(2 * BLOCK))
        assert w.value.code == grpc.StatusCode.OUT_OF_RANGE and "refused before sending anything" in w.value.message
        with pytest.raises(sc.ClientError) as rd:
            await c.read(BIG_SIZE - BLOCK, 2 * BLOCK)
        assert rd.value.code == grpc.StatusCode.OUT_OF_RANGE and "past the end" in rd.value.message
        await write_blocks(c, BIG_SIZE // BLOCK - 8, 8, 4, seed, model)
    # A client made without the coordinator knows no size: the node's own check answers.
    raw = sc.VolumeClient(BIG, big.primary_addr)
    try:
        with pytest.raises(sc.WriteError) as w:
            await raw.write(BIG_SIZE, bytes(BLOCK))
        assert w.value.code == grpc.StatusCode.OUT_OF_RANGE and "past the end" in w.value.message
    finally:
        await raw.close()
    await big.wait_for_volume(BIG, "in_sync")
    await assert_replicas_identical(big, BIG)
    await check_model(big, BIG, model)


# ---------------------------------------------------------------- 1: list


async def test_volume_list_shows_every_pair(cluster: LocalCluster) -> None:
    """Fault: none; a second volume is created and both are listed (table and --json). No seed."""
    await cluster.create_volume("vol1", 4 * MiB, BLOCK)
    r = await cluster.run_cli("volume", "list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "STATE", "PRIMARY", "SECONDARY"], r.stdout
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {VOLUME, "vol1"}, r.stdout
    assert rows["vol1"] == ["vol1", "4.0", "MiB", "in_sync", cluster.primary_addr, cluster.secondary_addr]
    r = await cluster.run_cli("volume", "list", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [v["name"] for v in doc["volumes"]] == [VOLUME, "vol1"]
    assert doc["volumes"][1] == {"name": "vol1", "size_bytes": 4 * MiB, "block_size": BLOCK, "state": "in_sync",
                                 "primary": cluster.primary_addr, "secondary": cluster.secondary_addr}
    for name in (VOLUME, "vol1"):
        await assert_replicas_identical(cluster, name)


# ---------------------------------------------------------------- 2: delete


async def delete_on_a_terminal(cluster: LocalCluster, name: str, typed: str) -> subprocess.CompletedProcess[bytes]:
    """``syncrep volume delete NAME`` with a pty as stdin, answering the prompt with ``typed``."""
    master, slave = pty.openpty()
    try:
        proc = await asyncio.create_subprocess_exec(
            *cluster.cli_command("volume", "delete", name), stdin=slave, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, cwd=str(cluster.workdir), env=cluster._environ(),
        )
        os.write(master, typed.encode() + b"\n")
        out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT_S)
    finally:
        os.close(slave)
        os.close(master)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(["volume", "delete", name], proc.returncode, out, err)


@pytest.mark.parametrize("seed", [1308], indirect=True)
async def test_volume_delete_asks_then_removes_it_on_both_nodes(cluster: LocalCluster, seed: int) -> None:
    """Fault: delete without a terminal (refused), on a terminal with the wrong name (refused), with the
    right name (deleted: record, grants, both stores), then --yes on another; the name is created again
    empty; vol0 is untouched. Seed 1308."""
    model: dict[int, bytes] = {}
    gone: dict[int, bytes] = {}
    await cluster.create_volume("gone", 4 * MiB, BLOCK)
    await cluster.create_volume("gone2", 4 * MiB, BLOCK)
    async with await cluster.connect("gone") as c:
        await write_blocks(c, 0, 32, 4, seed, gone)
    r = await cluster.run_cli("grant", "alice", "--volume", "gone")
    assert r.returncode == 0, r.stderr
    r = await cluster.run_cli("volume", "delete", "gone")  # stdin is /dev/null: no terminal
    assert r.returncode == 1, r
    assert "refusing to delete volume 'gone' without confirmation: stdin is not a terminal; pass --yes" in r.stderr
    r2 = await delete_on_a_terminal(cluster, "gone", "gonne")
    assert r2.returncode == 1 and b"Type the volume name to confirm" in r2.stderr, r2
    assert b"not confirmed" in r2.stderr, r2
    await check_model(cluster, "gone", gone)  # still there, with its data
    r2 = await delete_on_a_terminal(cluster, "gone", "gone")
    assert r2.returncode == 0, r2
    assert b"volume 'gone' deleted" in r2.stdout and b"store removed on" in r2.stdout, r2
    with pytest.raises(sc.ClientError) as e:
        await cluster.get_volume("gone")
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    for node in ("primary", "secondary"):
        assert not cluster.volume_dir(node, "gone").exists(), f"{node} still has the store of 'gone'"
        assert "volume gone deleted by the coordinator" in cluster.log_tail(node, 400), node
    r = await cluster.run_cli("volume", "delete", "gone2", "--yes")
    assert r.returncode == 0, r.stderr
    r = await cluster.run_cli("volume", "delete", "gone2", "--yes")
    assert r.returncode == 1 and "not found" in r.stderr and "(NOT_FOUND)" in r.stderr, r
    # The name again: a new, empty volume, with no grant inherited.
    await cluster.create_volume("gone", 4 * MiB, BLOCK)
    assert await sc.list_grants(cluster.coordinator_addr, "gone") == []
    await both_zero(cluster, "gone", 0, 32 * BLOCK)
    async with await cluster.connect(VOLUME) as c:
        await write_blocks(c, 0, 64, 4, seed, model)
    for name in (VOLUME, "gone"):
        await cluster.wait_for_volume(name, "in_sync")
        await assert_replicas_identical(cluster, name)
    await check_model(cluster, VOLUME, model)
    for node in ("primary", "secondary", "coordinator"):
        assert "Traceback" not in cluster.log_tail(node, 2000), node


@pytest.mark.parametrize("seed", [1309], indirect=True)
async def test_volume_deleted_while_a_node_is_down_is_kept_and_never_served(cluster: LocalCluster, seed: int) -> None:
    """Fault: the secondary is stopped (SIGTERM), the volume deleted, the secondary started again: it
    keeps the store, logs one WARNING, serves nothing of it; vol0 resyncs. Seed 1309."""
    model: dict[int, bytes] = {}
    await cluster.create_volume("orphan", 4 * MiB, BLOCK)
    async with await cluster.connect("orphan") as c:
        await write_blocks(c, 0, 16, 4, seed, {})
    await cluster.stop("secondary")
    r = await cluster.run_cli("volume", "delete", "orphan", "--yes")
    assert r.returncode == 0, r.stderr
    assert f"{cluster.secondary_addr} did not answer: it keeps its store" in r.stdout, r.stdout
    assert not cluster.volume_dir("primary", "orphan").exists()
    assert cluster.volume_dir("secondary", "orphan").exists()
    async with await cluster.connect(VOLUME) as c:
        await write_blocks(c, 0, 64, 4, seed, model)  # degraded: tracked for the resync
    await cluster.start_process("secondary")
    await cluster.wait_for_volume(VOLUME, "in_sync", timeout_s=60)
    log_text = cluster.log_tail("secondary", 400)
    assert log_text.count("no volume pair on the coordinator claims the store") == 1, log_text
    assert cluster.volume_dir("secondary", "orphan").exists(), "a store nobody claims was removed"
    with pytest.raises(sc.ClientError) as e:
        await sc.read_local(cluster.secondary_addr, "orphan", 0, BLOCK)
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    st = await sc.node_status(cluster.secondary_addr)
    assert "orphan" not in [v.name for v in st.volumes]
    await assert_replicas_identical(cluster, VOLUME)
    await check_model(cluster, VOLUME, model)


# ---------------------------------------------------------------- 3: resize


@pytest.mark.parametrize("seed", [1310], indirect=True)
async def test_volume_resize_grows_online_under_writes(cluster_factory: Callable[..., LocalCluster],
                                                       seed: int) -> None:
    """Fault: a resize from 16 MiB to 48 MiB while 3 writers write the old 16 MiB; then writes past the
    old end (a client connected before the resize, and the CLI); refusals: shrinking, unaligned, not in
    sync (secondary stopped). Seed 1310."""
    c = cluster_factory()
    await c.start()
    await c.create_volume("grow", 16 * MiB, BLOCK)
    early = await c.connect("grow")  # knows the old size
    w = Workload(c, "grow", 16 * MiB, writers=3, seed=seed)
    await w.start()
    await w.wait_acked(50)
    r = await c.run_cli("volume", "resize", "grow", "--size", "48MiB")
    assert r.returncode == 0, r.stderr
    assert "grown online from 16777216 to 50331648 bytes" in r.stdout, r.stdout
    acked_at_resize = w.history.acked
    await w.wait_acked(acked_at_resize + 50)  # the workload goes on, nothing failed
    assert (await c.get_volume("grow")).spec.size_bytes == 48 * MiB
    await both_zero(c, "grow", 16 * MiB, 32 * MiB)
    model: dict[int, bytes] = {}
    await write_blocks(early, 47 * MiB // BLOCK, 256, 8, seed, model)  # the last MiB
    await early.close()
    tail = bytes(range(256)) * (MiB // 256)
    r2 = await cli(c, "write", "grow", "--offset", "20MiB", stdin=tail)
    assert r2.returncode == 0, r2
    model.update({20 * MiB // BLOCK + i: tail[i * BLOCK:(i + 1) * BLOCK] for i in range(MiB // BLOCK)})
    # Refusals: nothing changes.
    r = await c.run_cli("volume", "resize", "grow", "--size", "32MiB")
    assert r.returncode == 1, r
    assert "shrinking would discard data at the end of the volume; not supported" in r.stderr, r.stderr
    r = await c.run_cli("volume", "resize", "grow", "--size", str(48 * MiB + 512))
    assert r.returncode == 1 and "not a multiple of the block size 4096 of volume 'grow'" in r.stderr, r.stderr
    await w.stop()
    await check_no_lost_writes(c, "grow", w)
    await c.stop("secondary")
    await wait_state(c, "grow", "degraded")
    r = await c.run_cli("volume", "resize", "grow", "--size", "64MiB")
    assert r.returncode == 1 and "not in sync" in r.stderr and "(FAILED_PRECONDITION)" in r.stderr, r.stderr
    await c.start_process("secondary")
    await c.wait_for_volume("grow", "in_sync", timeout_s=60)
    assert (await c.get_volume("grow")).spec.size_bytes == 48 * MiB
    await assert_replicas_identical(c, "grow")
    await check_no_lost_writes(c, "grow", w)
    await check_model(c, "grow", model)
    for node in ("primary", "secondary"):
        text = c.log_tail(node, 2000)
        assert "grown from 16777216 to 50331648 bytes" in text and "Traceback" not in text, node


# ---------------------------------------------------------------- 4, 5: thin volumes, decimal sizes


@pytest.mark.parametrize("seed", [1311], indirect=True)
async def test_thin_volume_larger_than_free_space_is_created_with_a_warning(cluster: LocalCluster,
                                                                           seed: int) -> None:
    """Fault: a volume twice the free space of the nodes' data directories (sparse). Created, with a
    WARNING naming the free bytes (CLI and node logs); its first and last MiB written and compared (a full
    comparison would read the whole size), then it is deleted. Seed 1311."""
    free = volumes.free_space(cluster.data_dir("primary"))
    size = min((2 * free // MiB + 1) * MiB, (1 << 32) * BLOCK)
    if size <= free:
        pytest.skip(f"the free space ({free} bytes) exceeds the largest volume at 4 KiB blocks")
    r = await cluster.run_cli("volume", "create", "thin", "--size", str(size), "--primary", cluster.primary_addr,
                              "--secondary", cluster.secondary_addr)
    assert r.returncode == 0, r.stderr
    assert "syncrep: warning: volume 'thin' is" in r.stderr and "bytes (" in r.stderr, r.stderr
    assert "free in" in r.stderr and "writes fail with ENOSPC once that disk fills" in r.stderr, r.stderr
    for node in ("primary", "secondary"):
        assert "more than the" in cluster.log_tail(node, 200) and "free in" in cluster.log_tail(node, 200), node
    await cluster.wait_for_volume("thin", "in_sync")
    model: dict[int, bytes] = {}
    async with await cluster.connect("thin") as c:
        await write_blocks(c, 0, 256, 8, seed, model)
        await write_blocks(c, (size - MiB) // BLOCK, 256, 8, seed + 1, model)
    for off in (0, size - MiB):
        p_sums, s_sums = await asyncio.gather(
            sc.checksum(cluster.primary_addr, "thin", offset=off, length=MiB),
            sc.checksum(cluster.secondary_addr, "thin", offset=off, length=MiB),
        )
        assert p_sums == s_sums, f"the replicas of 'thin' differ in the MiB at {off}"
    await check_model(cluster, "thin", model)
    r = await cluster.run_cli("volume", "delete", "thin", "--yes")
    assert r.returncode == 0, r.stderr


def test_decimal_size_is_refused_with_the_binary_hint(tmp_path: Path) -> None:
    """Fault: --size 10GB (create) and 3MB (resize): refused before anything is sent, naming 10GiB / 3MiB;
    the explicit byte count is accepted by the parser. No cluster (nothing is created), no seed."""
    for argv, hint in (
        (["volume", "create", "v", "--size", "10GB", "--primary", "a:1", "--secondary", "b:2"], "10GiB"),
        (["volume", "resize", "v", "--size", "3MB"], "3MiB"),
    ):
        r = subprocess.run([sys.executable, "-m", "syncrep", *argv, "--coordinator", "127.0.0.1:9", "--insecure"],
                           capture_output=True, text=True, timeout=CLI_TIMEOUT_S, cwd=tmp_path)
        assert r.returncode == 2, r
        assert f"you probably mean {hint}" in r.stderr and "uses a decimal unit" in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


# ---------------------------------------------------------------- the store's grow (no processes)


def test_store_grow_reads_zeros_keeps_snapshots_and_survives_a_crash_midway(tmp_path: Path) -> None:
    """Fault: a grow that crashed after extending the data file and before committing the size (the
    descriptor still says the old size): open() undoes the extension. Also: the new blocks read as zeros
    at the head and in an older snapshot, a write there is tracked by that snapshot's diff, shrinking and
    unaligned sizes are refused. No seed (fixed bytes)."""
    from syncrep.blockstore import BlockStore

    store = BlockStore.create(tmp_path / "v", 64 * KiB, BLOCK)
    store.write(0, b"a" * BLOCK)
    snap = store.create_snapshot("before")
    assert store.grow(128 * KiB) == 64 * KiB and store.size_bytes == 128 * KiB
    assert store.grow(128 * KiB) == 0  # idempotent
    assert store.read(64 * KiB, 64 * KiB) == bytes(64 * KiB)
    store.write(100 * KiB, b"b" * BLOCK)
    assert store.read_at(snap.id, 100 * KiB, BLOCK) == bytes(BLOCK)
    assert [(e.offset, e.length) for e in store.diff(snap.id)] == [(100 * KiB, BLOCK)]
    with pytest.raises(Exception, match="shrinking would discard data at the end of the volume; not supported"):
        store.grow(64 * KiB)
    with pytest.raises(Exception, match="not a multiple of its 4096-byte block size"):
        store.grow(128 * KiB + 512)
    store.close()
    reopened = BlockStore.open(tmp_path / "v")
    assert reopened.size_bytes == 128 * KiB and reopened.read(100 * KiB, BLOCK) == b"b" * BLOCK
    reopened.close()
    # The crash midway: the data file longer than the descriptor says.
    with open(tmp_path / "v" / "data", "r+b") as f:
        f.truncate(256 * KiB)
    again = BlockStore.open(tmp_path / "v")
    assert again.size_bytes == 128 * KiB and (tmp_path / "v" / "data").stat().st_size == 128 * KiB
    assert again.read(0, BLOCK) == b"a" * BLOCK
    again.close()
