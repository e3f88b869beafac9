"""Unit tests of the nemesis: schedule generation (pure), the checker, and the
test hosts (network namespaces: setup, faults, teardown, stale sweep)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from deploy import netns
from deploy.checker import (
    History,
    Op,
    check_blocks,
    check_rollback_point,
    decode_block,
    make_block,
    make_write,
)
from deploy.nemesis import HOSTS, KINDS, NODES, TRIGGERS, RunResult, generate_schedule, summary_table

BS = 4096
NETNS_OK, NETNS_WHY = netns.netns_available()
needs_netns = pytest.mark.skipif(not NETNS_OK, reason=f"network namespaces unavailable: {NETNS_WHY}")


# ---------------------------------------------------------------- schedules


def test_schedule_is_a_pure_function_of_seed_and_length() -> None:
    for seed in (0, 1, 42, 2**31 - 1):
        assert generate_schedule(seed, 15) == generate_schedule(seed, 15)
    assert generate_schedule(1, 15) != generate_schedule(2, 15)
    assert generate_schedule(1, 15) != generate_schedule(1, 20)


def test_schedules_are_well_formed_and_cover_every_fault_and_trigger() -> None:
    kinds: set[str] = set()
    triggers: set[str] = set()
    targets: dict[str, set[str]] = {}
    overlapping = 0
    for seed in range(300):
        s = generate_schedule(seed, 15)
        assert s.steps, seed
        assert s.resync_mode in ("rewrite", "direct")
        assert 3 <= s.writers <= 6
        last_end = 0.0
        for st in s.steps:
            assert st.kind in KINDS and st.trigger in TRIGGERS, st
            assert 0 < st.at_s < s.schedule_s and st.duration_s > 0, st
            if st.kind in ("crash", "hang"):
                assert st.target in NODES
            elif st.kind.startswith("partition"):
                assert st.target in HOSTS and st.peer in HOSTS and st.peer != st.target
            elif st.kind == "link_down":
                assert st.target in HOSTS
            else:
                assert st.target == "secondary"
            if st.trigger == "snapshot":
                assert s.snapshot_period_s > 0
            if st.trigger == "time" and st.at_s < last_end:
                overlapping += 1
            last_end = max(last_end, st.at_s + st.duration_s)
            kinds.add(st.kind)
            triggers.add(st.trigger)
            targets.setdefault(st.kind, set()).add(st.target)
        assert s.describe().startswith(f"seed {seed}:")
    assert kinds == set(KINDS)
    assert triggers == set(TRIGGERS)
    assert targets["crash"] == set(NODES) and targets["hang"] == set(NODES)
    assert overlapping > 20  # a second fault while the first is still in force


def test_summary_table_counts_and_percentiles() -> None:
    rs = [
        RunResult(1, {}, ok=True, faults={"crash": 2, "hang": 1}, acked=10, time_to_in_sync_s=1.0),
        RunResult(2, {}, ok=False, faults={"crash": 1}, acked=5, lost_writes=1, divergent=1, time_to_in_sync_s=3.0),
    ]
    t = summary_table(rs)
    assert "2 (1 passed, 1 failed)" in t
    assert "15" in t.split("writes acknowledged")[1].splitlines()[0]
    assert t.split("writes lost")[1].splitlines()[0].strip() == "1"
    assert t.split("divergent replicas")[1].splitlines()[0].strip() == "1"
    assert "1.00 s / 3.00 s" in t
    assert t.split("failed seeds")[1].splitlines()[0].strip() == "2"


# ---------------------------------------------------------------- checker


def test_blocks_are_self_describing() -> None:
    b = make_block(7, 3, 42, 1, 8192, BS)
    d = decode_block(b, 7, 8192, BS)
    assert (d.kind, d.writer, d.version, d.index) == ("block", 3, 42, 1)
    assert decode_block(b, 7, 4096, BS).kind == "garbage"  # at the wrong offset
    assert decode_block(b, 8, 8192, BS).kind == "garbage"  # another run's
    assert decode_block(b[:100] + b"x" + b[101:], 7, 8192, BS).kind == "garbage"  # torn/corrupt
    assert decode_block(bytes(BS), 7, 8192, BS).kind == "zero"
    w = make_write(7, 0, 1, 0, 3, BS)
    assert len(w) == 3 * BS and decode_block(w[BS:2 * BS], 7, BS, BS).index == 1


def _hist(*ops: tuple[int, int, int, int, str]) -> History:
    h = History(seed=5, block_size=BS)
    for i, (w, v, block, n, status) in enumerate(ops):
        h.add(Op(w, v, block * BS, n, 0, t_inv=float(i), t_done=float(i) + 0.5, status=status))
    return h


def _content(h: History, picks: dict[int, tuple[int, int] | None]) -> dict[int, bytes]:
    """block -> (writer, version) whose data it holds (None = zeros)."""
    ops = {(o.writer, o.version): o for o in h.ops}
    out = {}
    for b, wv in picks.items():
        if wv is None:
            out[b] = bytes(BS)
        else:
            op = ops[wv]
            out[b] = make_block(h.seed, op.writer, op.version, b - op.offset // BS, b * BS, BS)
    return out


def test_check_blocks_latest_ack_or_later_indeterminate() -> None:
    h = _hist((0, 1, 0, 2, "ok"), (0, 2, 1, 2, "ok"), (0, 3, 2, 1, "fail"), (0, 4, 0, 1, "pending"))
    # block 0: v1 acked, then v4 pending -> v1 or v4; block 1: v2; block 2: v2 or v3 (failed later).
    good = _content(h, {0: (0, 4), 1: (0, 2), 2: (0, 3)})
    assert check_blocks(h, good).ok
    assert check_blocks(h, _content(h, {0: (0, 1), 1: (0, 2), 2: (0, 2)})).ok
    rep = check_blocks(h, _content(h, {0: (0, 1), 1: (0, 1), 2: (0, 2)}))  # block 1 lost v2
    assert [f.kind for f in rep.findings] == ["lost"] and rep.findings[0].block == 1
    rep = check_blocks(h, _content(h, {0: None, 1: (0, 2), 2: (0, 2)}))  # zeros after an ack
    assert rep.lost == 1
    bad = dict(good)
    bad[1] = b"\x01" * BS
    assert check_blocks(h, bad).garbage == 1


def test_check_blocks_refuses_an_older_indeterminate_write() -> None:
    h = _hist((0, 1, 0, 1, "fail"), (0, 2, 0, 1, "ok"))
    assert not check_blocks(h, _content(h, {0: (0, 1)})).ok  # v2 was acked after v1 failed
    h2 = _hist((0, 1, 0, 1, "fail"))
    assert check_blocks(h2, _content(h2, {0: None})).ok
    assert check_blocks(h2, _content(h2, {0: (0, 1)})).ok


def test_rollback_point_must_be_a_prefix_per_writer() -> None:
    h = _hist((0, 1, 0, 1, "ok"), (0, 2, 1, 1, "ok"), (0, 3, 0, 1, "ok"), (1, 1, 10, 1, "ok"))
    # A prefix: writer 0 up to v2 (block 0 still v1), writer 1 nothing yet.
    assert check_rollback_point(h, _content(h, {0: (0, 1), 1: (0, 2), 10: None})).ok
    assert check_rollback_point(h, _content(h, {0: (0, 3), 1: (0, 2), 10: (1, 1)})).ok
    # v3 visible but v2 (acked before v3 was issued) missing: not a state the primary had.
    rep = check_rollback_point(h, _content(h, {0: (0, 3), 1: None, 10: None}))
    assert [f.kind for f in rep.findings] == ["not_prefix"] and rep.findings[0].block == 1
    # The newest write of a writer may be torn (in flight at the cut): v4 covers blocks 0-1.
    h2 = _hist((0, 1, 0, 2, "ok"), (0, 2, 0, 2, "ok"))
    assert check_rollback_point(h2, _content(h2, {0: (0, 2), 1: (0, 1)})).ok
    h3 = _hist((0, 1, 0, 2, "ok"), (0, 2, 0, 2, "ok"), (0, 3, 5, 1, "ok"))
    assert not check_rollback_point(h3, _content(h3, {0: (0, 2), 1: (0, 1), 5: (0, 3)})).ok
    # From the future: invoked after the snapshot was read.
    rep = check_rollback_point(h, _content(h, {0: (0, 3), 1: (0, 2), 10: None}), captured_at=1.0)
    assert "future" in [f.kind for f in rep.findings]


# ---------------------------------------------------------------- test hosts


def _probe(net: netns.TestNet, src: str, dst: str, port: int = 7777) -> bool:
    code = (f"import socket\ntry:\n socket.create_connection(('{net.address(dst)}', {port}), timeout=0.7)\n"
            " print('ok')\nexcept OSError:\n print('no')")
    return net.run_in(src, [sys.executable, "-c", code]).stdout.strip() == "ok"


_SERVER = textwrap.dedent("""
    import socket
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 7777)); s.listen()
    while True:
        c, _ = s.accept(); c.close()
""")


@needs_netns
def test_test_hosts_faults_and_teardown() -> None:
    """Faults: a two-way and a one-way partition between two hosts, then a host's link down."""
    net = netns.TestNet().open()
    try:
        names = set(net.namespaces)
        assert len(names) == 5 and names <= set(netns.list_namespaces())
        addrs = {h: net.address(h) for h in HOSTS}
        assert len(set(addrs.values())) == 4 and all(a.startswith("10.213.") for a in addrs.values())
        server = subprocess.Popen([*net.exec_prefix("primary"), sys.executable, "-c", _SERVER])
        deadline = time.monotonic() + 10
        while not _probe(net, "client", "primary"):
            assert time.monotonic() < deadline, "server in the primary's namespace never answered"
            time.sleep(0.1)
        net.partition("client", "primary")
        assert not _probe(net, "client", "primary")
        assert _probe(net, "secondary", "primary")
        net.unpartition("client", "primary")
        assert _probe(net, "client", "primary")
        net.partition("client", "primary", oneway=True)  # SYNs from the client are dropped
        assert not _probe(net, "client", "primary")
        assert "DROP" in net.rules("client")
        net.heal()
        assert "DROP" not in net.rules("client")
        net.link_down("primary")
        assert not _probe(net, "secondary", "primary")
        net.link_up("primary")
        deadline = time.monotonic() + 5
        while not _probe(net, "secondary", "primary"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        net.close()
    # Every namespace is gone, and the process we left inside one was killed.
    assert not names & set(netns.list_namespaces())
    assert server.wait(timeout=5) == -9


@needs_netns
def test_stale_namespaces_of_dead_runs_are_swept() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{netns.PREFIX}{dead.pid}-00000-hub"
    mine = f"{netns.PREFIX}{os.getpid()}-99999-keep"
    for ns in (stale, mine):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        removed = netns.sweep_stale()
        assert stale in removed and mine not in removed
        assert stale not in netns.list_namespaces() and mine in netns.list_namespaces()
    finally:
        for ns in (stale, mine):
            subprocess.run(["ip", "netns", "delete", ns], check=False, capture_output=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="tmpfs needs root")
def test_size_limited_data_dir_fills_and_frees(tmp_path: Path) -> None:
    """Fault: a full disk (an 8 MiB tmpfs filled up)."""
    d = tmp_path / "disk"
    netns.mount_tmpfs(d, 8 << 20)
    try:
        assert any(m == str(d) for _, m in netns.our_mounts())
        n = netns.fill_disk(d, "filler")
        assert n > 7 << 20
        with pytest.raises(OSError):
            (d / "x").write_bytes(b"y" * 65536)
        (d / "filler").unlink()
        (d / "x").write_bytes(b"y" * 65536)
    finally:
        netns.umount(d)
    assert not any(m == str(d) for _, m in netns.our_mounts())


_CLUSTER_ON_HOSTS = textwrap.dedent("""
    import asyncio, json, sys
    from pathlib import Path
    from deploy.cluster import LocalCluster
    from deploy.netns import TestNet
    from syncrep import client as sc

    async def main():
        net = TestNet.attach(json.loads(sys.argv[1]))
        async with LocalCluster(Path(sys.argv[2]), hosts=net.hosts) as c:
            await c.create_volume("vol0", 4 << 20)
            async with await c.connect("vol0") as cl:
                await cl.write(0, b"n" * 8192)
            p, s = await asyncio.gather(sc.checksum(c.primary_addr, "vol0"), sc.checksum(c.secondary_addr, "vol0"))
            print(json.dumps({"addresses": c.addresses, "identical": p == s}))
    asyncio.run(main())
""")


@needs_netns
@pytest.mark.e2e
def test_cluster_runs_each_process_on_its_own_host(tmp_path: Path) -> None:
    with netns.TestNet() as net:
        p = net.run_in("client", [sys.executable, "-c", _CLUSTER_ON_HOSTS, json.dumps(net.to_json()),
                                  str(tmp_path)], check=False)
        assert p.returncode == 0, p.stdout + p.stderr
        out = json.loads(p.stdout.strip().splitlines()[-1])
        assert out["identical"]
        assert out["addresses"] == {n: f"{net.address(n)}:7000" for n in NODES}
