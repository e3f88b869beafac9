"""Several coordinators on etcd, one leading (issue 12), real processes end to end.

Three ``syncrep coordinator --store etcd://...`` processes share a real etcd
(tests/etcd_fixture.py), the nodes and every command get ``--coordinator
A,B,C``, mutual TLS on (the harness's default). Each test is named after the
fault it injects and ENDS with the pair in_sync, the replicas compared block
for block (tests/e2e_helpers.assert_replicas_identical) and every
acknowledged write checked on the primary. Every wait is a bounded poll of a
condition, never a sleep that could hide a race.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from typing import Any

import grpc
import pytest
from conftest import wait_until
from e2e_helpers import (
    EventsProcess,
    Workload,
    assert_replicas_identical,
    check_model,
    check_no_lost_writes,
    write_blocks,
)
from etcd_fixture import EtcdCluster, fixture_etcd, fixture_etcd_cluster3  # noqa: F401

from deploy.cluster import LocalCluster
from syncrep import client as sc
from syncrep import rpc
from syncrep.pb import syncrep_pb2 as pb
from syncrep.pb import syncrep_pb2_grpc as pbg

pytestmark = pytest.mark.e2e

VOL = "vol0"
SIZE = 16 << 20
BLOCK = 4096
LEASE_S = 2.0
LEASE_DRIFT_S = 0.2
NODE_TIMEOUT_S = 1.5
ELECTION_TTL_S = 2
#: The coordinators' flags, but for the election TTL (``make_cluster``'s ``election_ttl_s``).
COORDINATOR_BASE = ["--lease-s", str(LEASE_S), "--lease-drift-s", str(LEASE_DRIFT_S), "--node-timeout-s",
                    str(NODE_TIMEOUT_S)]
COORDINATOR = [*COORDINATOR_BASE, "--election-ttl-s", str(ELECTION_TTL_S)]
#: A dead leader's election lease expires within its TTL; a follower
#: campaigns every 0.5 s (coordinator/election.py); a loaded 2-core box.
FAILOVER_BOUND_S = 2 * ELECTION_TTL_S + 4.0
SYNC_TIMEOUT_S = 90.0


async def make_cluster(cluster_factory: Any, etcd: EtcdCluster, *, create: bool = True,
                       size: int = SIZE, election_ttl_s: int = ELECTION_TTL_S) -> LocalCluster:
    args = [*COORDINATOR_BASE, "--election-ttl-s", str(election_ttl_s), *etcd.coordinator_args]
    c: LocalCluster = cluster_factory(coordinator_args=args, coordinators=3, store=etcd.url)
    await c.start()
    if create:
        await c.create_volume(VOL, size, BLOCK)
    return c


async def finish(c: LocalCluster, w: Workload | None = None) -> None:
    """The end of every test: in sync, identical block for block, no acknowledged write lost."""
    await c.wait_for_volume(VOL, "in_sync", timeout_s=SYNC_TIMEOUT_S)
    await assert_replicas_identical(c, VOL)
    if w is not None:
        await check_no_lost_writes(c, VOL, w)


async def infos(c: LocalCluster) -> dict[str, dict[str, Any]]:
    """CoordinatorInfo of every coordinator process, by name."""
    names = {c.procs[n].address: n for n in c.coordinator_names}
    return {names[i["address"]]: i for i in await sc.coordinator_info(c.coordinator_addr, timeout_s=2.0)}


async def cli_via(c: LocalCluster, coordinator: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The real command line with ``--coordinator coordinator`` (not the cluster's whole list)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "syncrep", *args, "--coordinator", coordinator, *c.security_args(),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=c._environ(),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60.0)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(list(args), proc.returncode, out.decode(), err.decode())


async def test_three_coordinators_one_leader_follower_redirects(cluster_factory: Any, etcd: EtcdCluster) -> None:
    """No fault: 3 coordinators on one etcd elect one leader; a volume created
    through a follower (the CLI given only that follower) is redirected to the
    leader and succeeds; status --json names the leader and every coordinator."""
    c = await make_cluster(cluster_factory, etcd, create=False)
    leader = await c.leader()
    states = await infos(c)
    assert [n for n, i in states.items() if i["state"] == "leader"] == [leader], states
    follower = next(n for n in c.coordinator_names if n != leader)
    assert states[follower]["state"] == "follower", states
    assert states[follower]["leader"] == c.address(leader), states
    # The follower itself refuses a mutating RPC, naming the leader (message and trailing metadata).
    async with rpc.channel(c.address(follower)) as ch:
        with pytest.raises(grpc.RpcError) as refused:
            await pbg.CoordinatorServiceStub(ch).Promote(pb.PromoteRequest(volume=VOL), timeout=5.0)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value
    assert f"the leader is {c.address(leader)}" in (refused.value.details() or ""), refused.value.details()
    assert sc.redirect_of(refused.value) == c.address(leader)
    # The CLI given only the follower: it follows the redirect, exit 0.
    r = await cli_via(c, c.address(follower), "volume", "create", VOL, "--size", str(SIZE), "--primary",
                      c.primary_addr, "--secondary", c.secondary_addr)
    assert r.returncode == 0, r.stderr
    await c.wait_for_volume(VOL, "in_sync", timeout_s=SYNC_TIMEOUT_S)
    # A follower answers status (GetVolume) from its copy of the store.
    async def follower_knows() -> bool:
        try:
            async with rpc.channel(c.address(follower)) as ch:
                st = await pbg.CoordinatorServiceStub(ch).GetVolume(pb.GetVolumeRequest(name=VOL), timeout=5.0)
        except grpc.RpcError as e:
            # Its copy is refreshed at each tick: until then it does not know the volume.
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return st.primary == c.primary_addr

    await wait_until(follower_knows, "the follower's copy of the store has the volume", timeout_s=10.0)
    doc = await c.status_json()
    assert doc["leader"] == c.address(leader), doc
    assert sorted(x["address"] for x in doc["coordinators"]) == sorted(c.address(n) for n in c.coordinator_names)
    assert sorted(x["state"] for x in doc["coordinators"]) == ["follower", "follower", "leader"], doc
    assert [v["name"] for v in doc["volumes"]] == [VOL], json.dumps(doc)[:2000]
    await finish(c)


async def test_leader_kill9_under_load_then_secondary_lost(
    cluster_factory: Any, etcd: EtcdCluster, seed: int
) -> None:
    """Faults: kill -9 of the leading coordinator under a 4-writer load, then
    kill -9 of the secondary. A new leader within FAILOVER_BOUND_S, the nodes
    follow it (their heartbeats land: it sees both alive), writes go on (in
    sync: no lease needed); the secondary's loss is handled by the new leader
    (degraded, the primary's failure report accepted), and when the secondary
    returns it is resynced to in_sync. The writers' seed is the test's ``seed``."""
    await leader_kill9_then_secondary_lost(await make_cluster(cluster_factory, etcd), seed)


async def leader_kill9_then_secondary_lost(c: LocalCluster, seed: int) -> None:
    """The scenario of test_leader_kill9_under_load_then_secondary_lost on the
    cluster ``c`` (also run over TLS to etcd: tests/test_etcd_tls.py)."""
    w = Workload(c, VOL, SIZE, writers=4, seed=seed)
    await w.start()
    await w.wait_acked(100)
    old = await c.leader()
    t0 = time.monotonic()
    c.kill(old)
    new = await c.leader(timeout_s=FAILOVER_BOUND_S + 5.0)
    failover_s = time.monotonic() - t0
    print(f"leader failover: {old} killed, {new} leads after {failover_s:.2f} s (bound {FAILOVER_BOUND_S:g} s)")
    assert new != old
    assert failover_s <= FAILOVER_BOUND_S, f"a new leader after {failover_s:.2f} s (> {FAILOVER_BOUND_S:g} s)"
    # The nodes follow: the primary's heartbeats land on the new leader (a
    # new leader starts with no node report: the counters come from one).
    async with rpc.channel(c.address(new)) as ch:
        stub = pbg.CoordinatorServiceStub(ch)

        async def primary_heard() -> bool:
            st = await stub.GetVolume(pb.GetVolumeRequest(name=VOL), timeout=5.0)
            return bool(st.last_seq > 0 and st.state == pb.PAIR_STATE_IN_SYNC)

        await wait_until(primary_heard, "the new leader has the primary's heartbeat report", timeout_s=20.0,
                         interval_s=0.2)
    await w.wait_acked(100, timeout_s=60)  # writes go on
    # The secondary lost: the new leader handles it.
    c.kill("secondary")
    await c.wait_for_volume(VOL, lambda st: st.state == pb.PAIR_STATE_DEGRADED, timeout_s=SYNC_TIMEOUT_S)
    await w.wait_acked(100, timeout_s=60)  # degraded: the primary writes alone under the new leader's leases
    await c.start_process("secondary")
    await c.wait_for_volume(VOL, "in_sync", timeout_s=SYNC_TIMEOUT_S)
    await w.wait_acked(50, timeout_s=60)
    await w.stop()
    assert await c.leader() == new
    # The old leader returns: it follows.
    await c.start_process(old)
    await wait_until(lambda: _follows(c, old), f"{old} follows", timeout_s=20.0, interval_s=0.2)
    await finish(c, w)


async def _follows(c: LocalCluster, name: str) -> bool:
    return (await infos(c))[name]["state"] == "follower"


async def test_etcd_quorum_lost_coordinators_stop_nodes_serve(
    cluster_factory: Any, etcd_cluster3: EtcdCluster, seed: int
) -> None:
    """Fault: 2 of the 3 etcd members stopped (no quorum) under a 4-writer
    load, then started again. Meanwhile no coordinator leads and each says why
    (status --json: leader null, every coordinator a follower naming etcd), a
    mutating command is refused saying no coordinator leads, and the nodes
    keep serving in-sync writes (no lease needed in sync). Quorum back: a
    leader again, which carries out commands. The writers' seed is ``seed``."""
    etcd = etcd_cluster3
    c = await make_cluster(cluster_factory, etcd)
    w = Workload(c, VOL, SIZE, writers=4, seed=seed)
    await w.start()
    await w.wait_acked(100)
    await asyncio.to_thread(etcd.stop, 1)
    await asyncio.to_thread(etcd.stop, 2)

    async def nobody_leads() -> bool:
        return all(i["state"] != "leader" for i in (await infos(c)).values())

    await wait_until(nobody_leads, "no coordinator leads without etcd's quorum", timeout_s=FAILOVER_BOUND_S + 5.0,
                     interval_s=0.2)
    doc = await c.status_json()
    assert doc["leader"] is None, doc
    assert all(x["state"] == "follower" and x["why_not_leader"] for x in doc["coordinators"]), doc
    # The nodes keep serving in-sync writes.
    await w.wait_acked(200, timeout_s=60)
    r = await c.run_cli("grant", "alice", "--volume", VOL)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "does not lead" in r.stderr and "no leader" in r.stderr, r.stderr
    await w.wait_acked(100, timeout_s=60)
    # Quorum back: a leader again, and it acts.
    await asyncio.to_thread(etcd.start_member, 1)
    await asyncio.to_thread(etcd.start_member, 2)
    await c.leader(timeout_s=FAILOVER_BOUND_S + 10.0)
    r = await c.run_cli("grant", "alice", "--volume", VOL)
    assert r.returncode == 0, r.stderr
    await w.wait_acked(100, timeout_s=60)
    await w.stop()
    await finish(c, w)


async def test_leader_kill9_during_resync(cluster_factory: Any, etcd_cluster3: EtcdCluster, seed: int) -> None:
    """Fault: the secondary's disk replaced (kill -9, data wiped, restarted: a
    full-copy resync of a 64 MiB volume) under a 4-writer load, and kill -9 of
    the leading coordinator while the pair is resyncing, on a 3-member etcd.
    Another coordinator leads within FAILOVER_BOUND_S and the resync completes
    under it (the primary's reports reach the new leader). Seed: ``seed``."""
    size = 64 << 20
    c = await make_cluster(cluster_factory, etcd_cluster3, size=size)
    w = Workload(c, VOL, size, writers=4, seed=seed, region_size=8 << 20)
    await w.start()
    await w.wait_acked(50)
    c.kill("secondary")
    c.wipe_data("secondary")
    await c.start_process("secondary")
    await sc.wait_for_volume(c.coordinator_addr, VOL, lambda st: st.state == pb.PAIR_STATE_RESYNCING,
                             timeout_s=SYNC_TIMEOUT_S, poll_s=0.05)
    old = await c.leader()
    t0 = time.monotonic()
    c.kill(old)
    new = await c.leader(timeout_s=FAILOVER_BOUND_S + 5.0)
    failover_s = time.monotonic() - t0
    print(f"leader failover during a resync: {new} leads after {failover_s:.2f} s (bound {FAILOVER_BOUND_S:g} s)")
    assert failover_s <= FAILOVER_BOUND_S, f"a new leader after {failover_s:.2f} s (> {FAILOVER_BOUND_S:g} s)"
    await c.wait_for_volume(VOL, "in_sync", timeout_s=SYNC_TIMEOUT_S)
    await w.wait_acked(50, timeout_s=60)
    await w.stop()
    await finish(c, w)


MiB = 1 << 20


async def _size_on(c: LocalCluster, name: str) -> int:
    """The volume's size as coordinator process ``name`` answers it (no redirect)."""
    async with rpc.channel(c.address(name)) as ch:
        st = await pbg.CoordinatorServiceStub(ch).GetVolume(pb.GetVolumeRequest(name=VOL), timeout=5.0)
    return int(st.spec.size_bytes)


@pytest.mark.parametrize("seed", [1214], indirect=True)
async def test_resize_on_etcd_under_writes_then_leader_kill9(
    cluster_factory: Any, etcd: EtcdCluster, seed: int
) -> None:
    """Fault: an online resize (16 -> 48 MiB) on 3 coordinators on etcd while 3
    writers write the old 16 MiB, then kill -9 of the leader. The new leader
    reads the new size from etcd (its GetVolume says 48 MiB), writes past the
    old end work under it, and it resizes again (48 -> 64 MiB: its store's CAS
    on the record it reloaded). Replicas compared block for block, every
    acknowledged write and the written tail checked. Seed 1214."""
    c = await make_cluster(cluster_factory, etcd)
    w = Workload(c, VOL, SIZE, writers=3, seed=seed)
    await w.start()
    await w.wait_acked(50)
    r = await c.run_cli("volume", "resize", VOL, "--size", "48MiB")
    assert r.returncode == 0, r.stderr
    assert "grown online from 16777216 to 50331648 bytes" in r.stdout, r.stdout
    await w.wait_acked(50)  # the workload goes on, nothing failed
    old = await c.leader()
    assert await _size_on(c, old) == 48 * MiB
    c.kill(old)
    new = await c.leader(timeout_s=FAILOVER_BOUND_S + 5.0)
    assert new != old
    assert await _size_on(c, new) == 48 * MiB, "the new leader lost the resize"
    await w.wait_acked(50, timeout_s=60)  # writes go on under the new leader
    model: dict[int, bytes] = {}
    async with await c.connect(VOL) as cl:
        assert cl.size_bytes == 48 * MiB
        await write_blocks(cl, 47 * MiB // BLOCK, 256, 8, seed, model)  # the last MiB
    # The new leader resizes too (once the primary's heartbeat reached it: a
    # new leader starts with no node report, and a resize needs both alive).
    await c.wait_for_volume(VOL, "in_sync", timeout_s=SYNC_TIMEOUT_S)
    r = await c.run_cli("volume", "resize", VOL, "--size", "64MiB")
    assert r.returncode == 0, r.stderr
    assert "grown online from 50331648 to 67108864 bytes" in r.stdout, r.stdout
    assert await _size_on(c, new) == 64 * MiB
    await w.wait_acked(50, timeout_s=60)
    await w.stop()
    await finish(c, w)
    await check_model(c, VOL, model)
    for name in (new, "primary", "secondary"):
        assert "Traceback" not in c.log_tail(name, 2000), name


@pytest.mark.parametrize("seed", [1215], indirect=True)
async def test_events_and_watch_follow_the_leader_after_kill9(
    cluster_factory: Any, etcd: EtcdCluster, seed: int
) -> None:
    """Fault: kill -9 of the leading coordinator while ``syncrep events --json``
    (a subprocess given all 3 coordinators) and ``status --watch`` (in this
    process) follow it, under a 2-writer load; then the secondary stopped (a
    state change only a leader publishes). The events process says once that
    it follows the new leader, prints the degraded change from it, and does
    not exit; the watch view says it follows the new leader. The secondary
    back: in sync, replicas compared, acknowledged writes checked. Seed 1215."""
    import io

    from rich.console import Console

    from syncrep import watch

    c = await make_cluster(cluster_factory, etcd)
    w = Workload(c, VOL, SIZE, writers=2, seed=seed)
    await w.start()
    await w.wait_acked(50)
    old = await c.leader()
    proc = await EventsProcess(c, "--json").start()
    out, err = proc.lines, proc.err
    screen = io.StringIO()
    viewer = asyncio.ensure_future(watch.watch(
        c.coordinator_addr, interval_s=0.5, console=Console(file=screen, force_terminal=True, width=240)))
    try:
        def events() -> list[dict[str, Any]]:
            return [json.loads(line) for line in out]

        await wait_until(lambda: any(e["volume"] == VOL and e["kind"] == "state" for e in events()),
                         "the events process printed the current state", timeout_s=30.0, interval_s=0.1)
        await wait_until(lambda: c.address(old) in screen.getvalue(), "the watch view names the leader",
                         timeout_s=30.0, interval_s=0.1)
        c.kill(old)
        new = await c.leader(timeout_s=FAILOVER_BOUND_S + 5.0)
        said = f"following the leader {c.address(new)}"
        await wait_until(lambda: any(said in line for line in err), f"the events process says '{said}'",
                         timeout_s=30.0, interval_s=0.1)
        follows = [line for line in err if "following the leader" in line]
        assert len(follows) == 1, err
        assert follows[0].startswith(f"syncrep: events: coordinator {c.address(old)} lost ("), err
        assert proc.returncode is None, (proc.returncode, err)
        await w.wait_acked(50, timeout_s=60)
        # A state change after the kill: only the new leader can have published it.
        seen = len(out)
        await c.stop("secondary")

        def degraded() -> bool:
            return any(e["volume"] == VOL and e["new"] == "degraded" for e in events()[seen:])

        await wait_until(degraded, "the events process printed the pair's degraded change",
                         timeout_s=SYNC_TIMEOUT_S, interval_s=0.1)
        assert proc.returncode is None, (proc.returncode, err)
        assert "follows every volume" in c.log_tail(new, 2000), "the new leader never served the events stream"
        await wait_until(lambda: f"coordinator {c.address(old)} lost" in screen.getvalue()
                         and said in screen.getvalue(), "the watch view says it follows the new leader",
                         timeout_s=30.0, interval_s=0.1)
        assert not [line for line in err if "Traceback" in line], err
    finally:
        viewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await viewer
        await proc.close()
    print(f"events: {len(out)} lines; stderr: {err}")
    await c.start_process("secondary")
    await w.wait_acked(50, timeout_s=60)
    await w.stop()
    await finish(c, w)


@pytest.mark.parametrize("seed", [1216], indirect=True)
async def test_events_follow_a_new_leader_when_the_old_one_is_frozen(
    cluster_factory: Any, etcd: EtcdCluster, seed: int
) -> None:
    """Fault: the leading coordinator frozen (SIGSTOP) while ``syncrep events
    --json`` follows it: its stream neither breaks nor speaks, so only the
    client's leader check (CoordinatorInfo every 1 s, bound 3 s) notices. The
    events process follows the new leader, prints the degraded change (the
    secondary stopped) from it and does not exit; the old leader, resumed,
    follows. In sync again, replicas compared, acknowledged writes checked. Seed 1216."""
    c = await make_cluster(cluster_factory, etcd)
    w = Workload(c, VOL, SIZE, writers=2, seed=seed)
    await w.start()
    await w.wait_acked(50)
    old = await c.leader()
    proc = await EventsProcess(c, "--json").start()
    out, err = proc.lines, proc.err
    try:
        await wait_until(lambda: any(json.loads(line)["kind"] == "state" for line in out),
                         "the events process printed the current state", timeout_s=30.0, interval_s=0.1)
        c.pause(old)
        try:
            new = await c.leader(timeout_s=FAILOVER_BOUND_S + 5.0)
            said = f"following the leader {c.address(new)}"
            await wait_until(lambda: any(said in line for line in err), f"the events process says '{said}'",
                             timeout_s=30.0, interval_s=0.1)
            follows = [line for line in err if "following the leader" in line]
            assert len(follows) == 1 and "does not answer whether it leads" in follows[0], err
            seen = len(out)
            await c.stop("secondary")
            await wait_until(lambda: any(json.loads(line)["new"] == "degraded" for line in out[seen:]),
                             "the events process printed the degraded change", timeout_s=SYNC_TIMEOUT_S,
                             interval_s=0.1)
            assert proc.returncode is None, (proc.returncode, err)
        finally:
            c.resume(old)
        await wait_until(lambda: _follows(c, old), f"{old} follows once resumed", timeout_s=20.0, interval_s=0.2)
        assert proc.returncode is None, (proc.returncode, err)
    finally:
        await proc.close()
    print(f"events: {len(out)} lines; stderr: {err}")
    await c.start_process("secondary")
    await w.wait_acked(50, timeout_s=60)
    await w.stop()
    await finish(c, w)


# ---------------------------------------------------------------- bad input (no cluster)


def test_coordinator_list_and_store_flags_refuse_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    """Bad input: --coordinator lists with an empty entry, a repeated address or
    port 0, and a --store that is neither sqlite nor etcd://: one line each."""
    from syncrep import cli
    from syncrep.core.vocab import parse_address_list

    assert parse_address_list("a:1, b:2") == ["a:1", "b:2"]
    for bad, needle in [("a:1,,b:2", "empty entry"), ("a:1,a:1", "twice"), ("a:0", "port 0")]:
        with pytest.raises(ValueError, match=needle):
            parse_address_list(bad)
    for argv, needle in [
        (["status", "--coordinator", "127.0.0.1:1,127.0.0.1:1"], "twice"),
        (["status", "--coordinator", "127.0.0.1:1,nonsense"], "invalid address"),
        (["coordinator", "--listen", "127.0.0.1:0", "--data-dir", "/tmp/x", "--store", "mysql://h"], "unknown store"),
        (["coordinator", "--listen", "127.0.0.1:0", "--data-dir", "/tmp/x", "--election-ttl-s", "0"], "seconds >= 1"),
        (["coordinator", "migrate", "--from", "/tmp/x"], "--to"),
    ]:
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2, argv
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, (argv, err)
    # migrate to something else than etcd: refused, exit 1.
    assert cli.main(["coordinator", "migrate", "--from", "/nowhere", "--to", "sqlite"]) == 1
    assert "must be an etcd store" in capsys.readouterr().err


async def test_etcd_unreachable_at_start_is_said_and_bounded(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Fault: no etcd at the --store address. The coordinator says so once
    (naming the endpoint), retries with backoff, and gives up after its bound
    with an error naming the endpoint; nothing is left listening."""
    from coordinator.server import Coordinator
    from deploy.cluster import free_port

    port = free_port()
    coord = Coordinator("127.0.0.1:0", tmp_path, store=f"etcd://127.0.0.1:{port}", etcd_op_timeout_s=0.5,
                        etcd_start_timeout_s=1.5)
    t0 = time.monotonic()
    with pytest.raises(Exception, match=f"127.0.0.1:{port}.*unreachable after 1.5 s"):
        await coord.start()
    assert time.monotonic() - t0 < 10.0
    said = [r.getMessage() for r in caplog.records if "retrying with backoff" in r.getMessage()]
    assert len(said) == 1 and f"127.0.0.1:{port}" in said[0], said
