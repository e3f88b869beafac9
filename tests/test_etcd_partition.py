"""The leading coordinator cut from etcd, on network-namespace test hosts (issue 12), real processes.

The fault: three coordinators on a 3-member etcd, and the LEADING one's host
is cut from etcd (iptables DROP in its namespace, against the etcd host's
address only: it still reaches the nodes, the other coordinators and the
client). docs/HA.md says what must follow: it stops acting as soon as its
view of its election lease expires (within the election TTL of the cut),
says why (etcd), refuses every mutating command; another coordinator is
elected once etcd expires the lease and handles the pair's next failure; the
cut healed, the old leader follows. No two leaders act at once.

Hosts (deploy/netns.py): ``coordinator``, ``coordinator2``, ``coordinator3``,
``etcd``, ``primary``, ``secondary`` and ``client``, each a namespace of its
own. The three etcd members run on the ``etcd`` host (deploy/netns_etcd.py:
the loopback ``EtcdCluster`` of deploy/etcd.py, placed there), so one
partition of the leader's host from that host cuts it from EVERY member and
from nothing else. The scenario runs on the client host (it must reach every
host; the pytest process lives in the machine's namespace, which reaches
none), as this very file run as a script (``ip netns exec <client> python
tests/test_etcd_partition.py --inner ...``), as tests/test_failover_isolated.py
does; the pytest test starts it and checks its exit code and its figures.

"No two leaders acted at once" is checked on the pair's event history as
etcd holds it (``events/vol0/<seq>``, each written by its coordinator's
fenced transaction): the events carry no leader or term field, so

* the holder of each event is read from etcd itself: the election key's
  value (``address\\nlease``) AT the event's revision (a range read at that
  revision; the test's etcd never compacts). Every event has one, and each
  term's events form one run in revision order (no term comes back);
* its writer is found independently, in the coordinators' logs: the one
  line ``volume vol0: A -> B (epoch E, ...`` of that change, logged by the
  coordinator that made it, must be the holder's;
* in wall-clock time (every process shares the kernel's clock): the old
  leader wrote no event after the cut + its TTL, nor after the new leader's
  take-over (its ``coordinator X leads now`` line); each new-term event is
  after that line; no CoordinatorInfo poll sent to the old leader after the
  new one took over was answered "leader".

A leader (or term) field in each event would make the writer exact without
the logs.

Run: ``.venv/bin/pytest -q tests/test_etcd_partition.py -s`` (root, for the
namespaces; ``-s`` prints the figures as JSON). A failed scenario's whole
output is in ``<tmp_path>/scenario.log``, the processes' logs in
``<tmp_path>/cluster/*.log`` and ``<tmp_path>/etcd/*.log``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
if __name__ == "__main__":  # run as the scenario script on the client host
    sys.path.insert(0, str(REPO))

from etcd_fixture import etcd_binary  # noqa: E402

from deploy import netns  # noqa: E402

HOSTS = ("coordinator", "coordinator2", "coordinator3", "etcd", "primary", "secondary", "client")
COORDINATORS = ("coordinator", "coordinator2", "coordinator3")
VOL = "vol0"
SIZE = 16 << 20
BLOCK = 4096
WRITERS = 3
LEASE_S = 2.0
LEASE_DRIFT_S = 0.2
NODE_TIMEOUT_S = 1.5
ELECTION_TTL_S = 2
#: The coordinators' etcd RPC deadline (coordinator/server.py's default; no flag sets it): a
#: keepalive lost in the cut fails after it, and only then does the coordinator know that it is
#: etcd it cannot reach (until then it says its "election lease may have expired").
ETCD_OP_TIMEOUT_S = 2.0
COORDINATOR_ARGS = ["--lease-s", str(LEASE_S), "--lease-drift-s", str(LEASE_DRIFT_S), "--node-timeout-s",
                    str(NODE_TIMEOUT_S), "--election-ttl-s", str(ELECTION_TTL_S)]
#: How often the old leader's CoordinatorInfo is asked while it must stop.
POLL_S = 0.05
#: A reply can take this long: the cut coordinator's event loop may be inside one synchronous
#: store call that the cut makes run to its deadline (ETCD_OP_TIMEOUT_S; a poll timed out after
#: 2 s in 1 of 6 runs), plus a TLS handshake and the call on a loaded 2-core machine.
INFO_TIMEOUT_S = ETCD_OP_TIMEOUT_S + 3.0
#: The etcd reason appears once a keepalive timed out: TTL + the RPC deadline + a loaded machine.
REASON_BOUND_S = ELECTION_TTL_S + ETCD_OP_TIMEOUT_S + 3.0
#: etcd expires the old lease within the TTL; a follower campaigns every 0.5 s; a loaded 2-core box.
TAKEOVER_BOUND_S = 2 * ELECTION_TTL_S + 4.0
#: After the heal the old leader's next campaign (every 0.5 s) sees the key held by the new one.
FOLLOW_BOUND_S = 20.0
#: A log line of a change is written after the change's transaction, whose time the event holds.
LOG_AFTER_EVENT_S = 5.0
ROLE_TIMEOUT_S = 60.0
SYNC_TIMEOUT_S = 120.0
SCENARIO_TIMEOUT_S = 420.0
#: A user the old leader is asked to grant while it is cut: it must never be granted.
REFUSED_USER = "mallory"

NETNS_OK, NETNS_WHY = netns.netns_available()
IPT_OK, IPT_WHY = netns.iptables_available()


# ================================================================ the pytest side


def _logs(tmp_path: Path, lines: int = 40) -> str:
    out = []
    files = [tmp_path / "cluster" / f"{n}.log" for n in (*COORDINATORS, "primary", "secondary")]
    files += sorted((tmp_path / "etcd").glob("etcd*.log"))
    for f in files:
        if f.exists():
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"---- {f.name} (last {lines} lines)\n" + "\n".join(tail))
    return "\n".join(out)


def _run_scenario(tmp_path: Path, seed: int) -> dict[str, Any]:
    etcd = etcd_binary()
    with netns.TestNet(HOSTS) as net:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), env.get("PYTHONPATH", "")) if x)
        cmd = [*net.exec_prefix("client"), sys.executable, str(Path(__file__).resolve()), "--inner",
               "--net", json.dumps(net.to_json()), "--workdir", str(tmp_path), "--etcd", etcd,
               "--seed", str(seed)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=SCENARIO_TIMEOUT_S, env=env,
                               check=False)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"the scenario did not finish within {SCENARIO_TIMEOUT_S:g} s; "
                                 f"output:\n{e.stdout!r}\n{e.stderr!r}\n{_logs(tmp_path)}") from None
    (tmp_path / "scenario.log").write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        raise AssertionError(f"the scenario failed (exit {p.returncode}; full output in "
                             f"{tmp_path / 'scenario.log'}):\n{p.stdout[-4000:]}\n{p.stderr[-8000:]}\n"
                             f"{_logs(tmp_path)}")
    result: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    print(json.dumps(result, indent=1))  # the figures, shown with -s
    return result


needs_netns = pytest.mark.skipif(not (NETNS_OK and IPT_OK),
                                 reason=f"test hosts unavailable: {NETNS_WHY or IPT_WHY}")


@needs_netns
@pytest.mark.e2e
@pytest.mark.timeout(SCENARIO_TIMEOUT_S + 60)
@pytest.mark.parametrize("seed", [1217], indirect=True)
def test_leading_coordinator_cut_from_every_etcd_member_stops_acting_and_another_leads(
    tmp_path: Path, seed: int
) -> None:
    """Fault: the secondary killed and restarted under the first leader; then an iptables cut of
    the leading coordinator's host from the etcd host (all 3 members; not from the nodes, the
    client or the other coordinators) under a 3-writer load; the secondary killed and restarted
    again, under the new leader; heal. Seed 1217."""
    r = _run_scenario(tmp_path, seed)
    assert r["new_leader"] != r["old_leader"], r
    assert [t for t, _ in r["events_by_term"]] == [r["old_leader"], r["new_leader"]], r


# ================================================================ the scenario (on the client host)

_TS_RE = re.compile(r"^(\S+) ")


def _log_lines(path: Path) -> list[tuple[float, str]]:
    """(unix time, line) of every timestamped line of a process's log (syncrep.logfmt's text format)."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        m = _TS_RE.match(line)
        if not m:
            continue
        try:
            out.append((dt.datetime.fromisoformat(m.group(1)).timestamp(), line))
        except ValueError:
            continue  # a harness banner, a traceback line
    return out


async def _info(address: str) -> dict[str, Any]:
    from syncrep import client as sc

    (i,) = await sc.coordinator_info(address, timeout_s=INFO_TIMEOUT_S)
    return i


async def _store_history(endpoints: list[str]) -> list[dict[str, Any]]:
    """The pair's events as etcd holds them, each with the election key's value at its revision."""
    from aetcd import rpc as etcd_rpc  # type: ignore[import-untyped]
    from aetcd.utils import prefix_range_end  # type: ignore[import-untyped]

    from coordinator.election import DEFAULT_ELECTION_KEY
    from coordinator.etcd_store import DEFAULT_PREFIX, connect_client

    client = connect_client(endpoints, 5.0)
    await client.connect()
    try:
        prefix = f"{DEFAULT_PREFIX}events/{VOL}/".encode()
        resp = await client.kvstub.Range(etcd_rpc.RangeRequest(key=prefix, range_end=prefix_range_end(prefix)),
                                         timeout=5.0)
        out = []
        for kv in sorted(resp.kvs, key=lambda kv: kv.create_revision):
            d = json.loads(kv.value)
            at = await client.kvstub.Range(
                etcd_rpc.RangeRequest(key=DEFAULT_ELECTION_KEY.encode(), revision=kv.create_revision), timeout=5.0)
            holder = at.kvs[0].value.decode() if at.kvs else None
            out.append({"revision": kv.create_revision, "ts": float(d["ts"]), "from": d["from_state"],
                        "to": d["to_state"], "epoch": int(d["epoch"]), "reason": d["reason"], "holder": holder})
        return out
    finally:
        await client.close()


def check_one_leader_at_a_time(history: list[dict[str, Any]], logs: dict[str, list[tuple[float, str]]],
                               addresses: dict[str, str], old: str, new: str, cut_wall: float,
                               old_leader_answers_sent: list[float]) -> dict[str, Any]:
    """The checks of the module docstring; returns figures for the report."""
    by_address = {a: n for n, a in addresses.items()}
    # (1) Every event was written while the election key had a holder, and terms never come back.
    terms: list[str] = []
    for e in history:
        assert e["holder"] is not None, f"event at revision {e['revision']} was written while nobody led: {e}"
        if not terms or terms[-1] != e["holder"]:
            assert e["holder"] not in terms, (
                f"term {e['holder']!r} wrote again at revision {e['revision']} after another term's events: "
                f"{[(x['revision'], x['holder']) for x in history]}")
            terms.append(e["holder"])
    # (2) The writer of every change, from the coordinators' own logs, is the holder at its revision.
    for e in history:
        if e["from"] is None and e["to"] is not None:
            needle = f"volume {VOL} created: "
        elif e["from"] is None or e["to"] is None or e["from"] == e["to"]:
            continue  # deleted / "stays": no line of its own to match
        else:
            needle = f"volume {VOL}: {e['from']} -> {e['to']} (epoch {e['epoch']},"
        writers = sorted({name for name, lines in logs.items()
                          if any(needle in line and e["ts"] - 0.01 <= t <= e["ts"] + LOG_AFTER_EVENT_S
                                 for t, line in lines)})
        holder = by_address[e["holder"].split("\n", 1)[0]]
        assert writers == [holder], (
            f"event {e} (revision {e['revision']}, term of {holder}): logged by {writers or 'nobody'}")
    # (3) Wall clock: the old leader acted before the new one took over, and not after its TTL.
    takeover = [t for t, line in logs[new] if f"coordinator {addresses[new]} leads now" in line]
    assert takeover, f"{new} never logged that it leads now"
    new_start = takeover[-1]
    old_events = [e for e in history if e["holder"].startswith(addresses[old] + "\n")]
    new_events = [e for e in history if e["holder"].startswith(addresses[new] + "\n")]
    assert new_events, f"the new leader {new} wrote no event: {history}"
    last_old = max((e["ts"] for e in old_events), default=0.0)
    assert last_old < cut_wall + ELECTION_TTL_S, (
        f"the old leader {old} wrote an event {last_old - cut_wall:.3f} s after the cut (TTL {ELECTION_TTL_S} s)")
    assert last_old < new_start, f"the old leader {old} wrote an event after {new} took over"
    first_new = min(e["ts"] for e in new_events if e["ts"] > cut_wall)
    assert first_new >= new_start, f"{new} wrote an event {new_start - first_new:.3f} s before it took over"
    late = [t for t in old_leader_answers_sent if t >= new_start]
    assert not late, (f"{old} answered 'leader' to a CoordinatorInfo sent {late[0] - new_start:.3f} s after "
                      f"{new} took over")
    return {
        "events": len(history),
        "events_by_term": [[by_address[t.split("\n", 1)[0]], sum(1 for e in history if e["holder"] == t)]
                           for t in terms],
        "last_old_event_after_cut_s": round(last_old - cut_wall, 3),
        "new_takeover_after_cut_s": round(new_start - cut_wall, 3),
        "first_new_event_after_takeover_s": round(first_new - new_start, 3),
    }


async def scenario(net_json: dict[str, Any], workdir: Path, etcd_binary: str, seed: int) -> dict[str, Any]:
    import grpc
    from e2e_helpers import Workload, assert_replicas_identical, check_no_lost_writes

    from deploy.cluster import LocalCluster
    from deploy.netns_etcd import etcd_on_host
    from syncrep import client as sc
    from syncrep import rpc
    from syncrep.pb import syncrep_pb2 as pb
    from syncrep.pb import syncrep_pb2_grpc as pbg

    net = netns.TestNet.attach(net_json)
    out: dict[str, Any] = {"seed": seed}
    etcd = etcd_on_host(etcd_binary, workdir / "etcd", 3, net.host("etcd"))
    await asyncio.to_thread(etcd.start)
    try:
        c = LocalCluster(workdir / "cluster", hosts=net.hosts, coordinator_args=COORDINATOR_ARGS,
                         coordinators=len(COORDINATORS), store=etcd.url)
        async with c:
            await c.create_volume(VOL, SIZE, BLOCK, timeout_s=60)
            addresses = {n: c.address(n) for n in COORDINATORS}
            w = Workload(c, VOL, SIZE, writers=WRITERS, seed=seed)
            await w.start()
            await w.wait_acked(100, timeout_s=60)
            old = await c.leader()
            # A failure handled by the first leader, so that its term too holds changes to check
            # against its log: the secondary killed -> degraded, restarted -> in_sync.
            c.kill("secondary")
            await sc.wait_for_volume(addresses[old], VOL, "degraded", timeout_s=ROLE_TIMEOUT_S)
            await c.start_process("secondary")
            await sc.wait_for_volume(addresses[old], VOL, "in_sync", timeout_s=SYNC_TIMEOUT_S)
            await w.wait_acked(50, timeout_s=60)
            old_addr = addresses[old]
            epoch0 = (await c.get_volume(VOL)).epoch

            # ---- the cut: the leader's host loses the etcd host (every member), nothing else.
            net.partition(old, "etcd")
            cut_t, cut_wall = time.monotonic(), time.time()  # after the rules are in: no keepalive gets through
            rules = net.rules(old)
            assert rules.count("-j DROP") == 2 and rules.count(net.address("etcd")) == 2, rules

            # (1) It stops acting within its TTL: every poll sent after cut + TTL says "not leader".
            leader_answers_sent: list[float] = []  # wall time each "leader" answer's poll was sent
            info_s: list[float] = []  # how long each answer took (a figure, not checked)
            while True:
                sent_t, sent_wall = time.monotonic(), time.time()
                i = await _info(old_addr)
                info_s.append(time.monotonic() - sent_t)
                assert i["state"] != "unreachable", f"the client cannot reach the cut coordinator: {i}"
                if i["state"] == "follower":
                    stopped_s = time.monotonic() - cut_t
                    break
                leader_answers_sent.append(sent_wall)
                assert sent_t - cut_t < ELECTION_TTL_S, (
                    f"{old} still says it leads to a poll sent {sent_t - cut_t:.3f} s after its cut from etcd "
                    f"(TTL {ELECTION_TTL_S} s)")
                await asyncio.sleep(POLL_S)
            assert i["leader"] in (None, old_addr) or i["leader"] in addresses.values(), i
            out.update(old_leader=old, stopped_after_cut_s=round(stopped_s, 3), first_why=i["why_not_leader"])

            # (2) It says why: etcd (once a keepalive's deadline ran out).
            while "etcd" not in (i["why_not_leader"] or ""):
                assert i["state"] == "follower", f"{old} leads again while cut from etcd: {i}"
                assert time.monotonic() - cut_t < REASON_BOUND_S, (
                    f"{old} does not say within {REASON_BOUND_S:g} s that it cannot reach etcd: {i}")
                await asyncio.sleep(POLL_S)
                sent_t = time.monotonic()
                i = await _info(old_addr)
                info_s.append(time.monotonic() - sent_t)
            out.update(etcd_reason_after_cut_s=round(time.monotonic() - cut_t, 3), why=i["why_not_leader"],
                       info_answer_max_s=round(max(info_s), 3), info_answers=len(info_s))

            # (3) A mutating command sent to it is refused, naming why; never carried out (checked at the end).
            async with rpc.channel(old_addr) as ch:
                stub = pbg.CoordinatorServiceStub(ch)
                for what, call in (
                    ("Grant", stub.Grant(pb.GrantRequest(user=REFUSED_USER, volume=VOL), timeout=10.0)),
                    ("Promote", stub.Promote(pb.PromoteRequest(volume=VOL), timeout=10.0)),
                ):
                    try:
                        await call
                        raise AssertionError(f"{what} was carried out by {old}, cut from etcd")
                    except grpc.RpcError as e:
                        assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION), e
                        assert "does not lead" in (e.details() or ""), e.details()
                        out[f"{what.lower()}_refusal"] = e.details()

            # (4) Another coordinator leads; the old one, still cut, does not.
            new = await c.leader(timeout_s=TAKEOVER_BOUND_S + 5.0)
            takeover_s = time.monotonic() - cut_t
            assert new != old, f"{old} leads again while cut from etcd"
            assert takeover_s <= TAKEOVER_BOUND_S, f"a new leader {takeover_s:.2f} s after the cut (> {TAKEOVER_BOUND_S:g} s)"
            i = await _info(old_addr)
            assert i["state"] == "follower", i
            doc = await c.status_json()
            assert doc["leader"] == addresses[new], doc
            olds = [x for x in doc["coordinators"] if x["address"] == old_addr]
            assert olds and olds[0]["state"] == "follower" and "etcd" in (olds[0]["why_not_leader"] or ""), doc
            out.update(new_leader=new, new_leader_after_cut_s=round(takeover_s, 3))

            # (5) A failure handled by the new leader: the secondary killed -> degraded, restarted -> in_sync.
            # Asked of the new leader by name, not of the list: the cut old leader answers GetVolume
            # from its stale copy, naming no leader, and syncrep.client takes that answer (it asks the
            # others only when a follower names a leader): through the list this wait would see the
            # pair as it was at the cut until the heal.
            new_addr = addresses[new]
            await w.wait_acked(50, timeout_s=60)
            c.kill("secondary")
            t = time.monotonic()
            await sc.wait_for_volume(new_addr, VOL, "degraded", timeout_s=ROLE_TIMEOUT_S)
            out["degraded_after_kill_s"] = round(time.monotonic() - t, 3)
            # What the list answers meanwhile (reported, not asserted: see above).
            via_list = await c.get_volume(VOL)
            out["state_via_the_list_when_degraded"] = sc.volume_status_dict(via_list)["state"]
            await w.wait_acked(50, timeout_s=60)  # the primary writes alone, on the new leader's lease
            await c.start_process("secondary")
            t = time.monotonic()
            await sc.wait_for_volume(new_addr, VOL, "in_sync", timeout_s=SYNC_TIMEOUT_S)
            out["in_sync_after_restart_s"] = round(time.monotonic() - t, 3)
            i = await _info(old_addr)
            assert i["state"] == "follower", f"{old} leads again while cut from etcd: {i}"

            # ---- heal: the old leader follows the new one.
            net.unpartition(old, "etcd")
            heal_t = time.monotonic()
            while True:
                i = await _info(old_addr)
                if i["state"] == "follower" and i["leader"] == addresses[new]:
                    break
                assert i["state"] != "leader", f"{old} leads after the heal though {new} holds the key: {i}"
                assert time.monotonic() - heal_t < FOLLOW_BOUND_S, f"{old} does not follow {new} after the heal: {i}"
                await asyncio.sleep(0.1)
            out["old_follows_after_heal_s"] = round(time.monotonic() - heal_t, 3)
            assert await c.leader() == new

            # ---- the end: in sync, identical block for block, no acknowledged write lost.
            await w.wait_acked(50, timeout_s=60)
            await w.stop()
            await c.wait_for_volume(VOL, "in_sync", timeout_s=SYNC_TIMEOUT_S)
            await assert_replicas_identical(c, VOL)
            await check_no_lost_writes(c, VOL, w)
            assert await c.role_of(VOL) == {"primary": "primary", "secondary": "secondary"}, "a promotion happened"
            grants = await sc.list_grants(c.coordinator_addr, VOL)
            assert all(g.user != REFUSED_USER for g in grants), f"the refused grant was carried out: {grants}"
            st = await c.get_volume(VOL)
            out.update(acked=w.acked, indeterminate=w.history.indeterminate, epochs=[epoch0, st.epoch])

            # ---- no two leaders acted at once (the module docstring).
            history = await _store_history(etcd.endpoints)
            logs = {n: _log_lines(c.log_path(n)) for n in COORDINATORS}
            out.update(check_one_leader_at_a_time(history, logs, addresses, old, new, cut_wall,
                                                  leader_answers_sent))
            for name in (*COORDINATORS, "primary", "secondary"):
                assert "Traceback" not in c.log_path(name).read_text(errors="replace"), f"a traceback in {name}'s log"
    finally:
        await asyncio.to_thread(etcd.close)
    return out


def _inner_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inner", action="store_true")
    ap.add_argument("--net", required=True)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--etcd", required=True)
    ap.add_argument("--seed", type=int, required=True)
    a = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    result = asyncio.run(scenario(json.loads(a.net), a.workdir, a.etcd, a.seed))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_inner_main(sys.argv[1:]))
