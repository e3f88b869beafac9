"""Benchmark: how long a new coordinator takes to lead after the leader dies (issue 12).

    python bench/bench_takeover.py [--quick] [--kills N] [--election-ttl-s S] [--etcd-members N] [--keep]

(--quick: 5 kills, about 30 s; the default 20 kills, about 2 min on a 2-core box.)

Setup: ``--etcd-members`` real etcd processes (deploy/etcd.py; 3 by default),
three ``syncrep coordinator --store etcd://...`` processes and the two nodes
of deploy.cluster.LocalCluster (mutual TLS), one volume pair in sync, so the
coordinators carry real heartbeats while they change hands.

Each run: find the leader (CoordinatorInfo of all three), ``kill -9`` it, then
poll CoordinatorInfo of the two others every 20 ms until one says ``leader``
(it has won the election *and* taken over the term: read the store, counted
the nodes). Takeover time = kill -> that answer. Then the killed coordinator
is started again with its command line and must come back as a follower
before the next run. After the last run: the pair still in sync, a mutating
command (a grant) carried out by the last leader, the replicas compared.

What bounds it: the dead leader's election lease expires ``--election-ttl-s``
after its last keepalive (coordinator/election.py keeps it alive every TTL/3),
and a follower campaigns every ``CAMPAIGN_INTERVAL_S``; so the expected
takeover is between TTL - TTL/3 and TTL + the campaign interval + the
take-over's store read. The report gives p50, p99 and max against that bound
(``2 x TTL``, the issue's "another leads within 2 x the lease").

Output: a table per run, a summary, and one ``RESULT_JSON {...}`` line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import command_line, loadavg, percentile, print_table
from deploy.cluster import LocalCluster
from deploy.etcd import EtcdCluster
from syncrep import client as sc

VOL = "bench"
SIZE = 16 << 20
POLL_S = 0.02
#: A run that finds no new leader within this many TTLs fails the benchmark.
GIVE_UP_TTLS = 6


async def states(c: LocalCluster, names: list[str]) -> dict[str, str]:
    """Each running coordinator's state, asked directly (no redirect)."""
    by_address = {c.procs[n].address: n for n in names if c.procs[n].running}
    if not by_address:
        return {}
    infos = await sc.coordinator_info(",".join(by_address), timeout_s=1.0)
    return {by_address[i["address"]]: str(i["state"]) for i in infos if i["address"] in by_address}


async def one_run(c: LocalCluster, ttl_s: int) -> dict[str, Any]:
    names = list(c.coordinator_names)
    old = await c.leader(timeout_s=GIVE_UP_TTLS * ttl_s)
    t0 = time.monotonic()
    c.kill(old)
    others = [n for n in names if n != old]
    new = None
    polls = 0
    while new is None:
        polls += 1
        found = await states(c, others)
        new = next((n for n, s in found.items() if s == "leader"), None)
        if new is None:
            if time.monotonic() - t0 > GIVE_UP_TTLS * ttl_s:
                raise RuntimeError(f"no new leader {GIVE_UP_TTLS * ttl_s} s after killing {old}: {found}")
            await asyncio.sleep(POLL_S)
    takeover_s = time.monotonic() - t0
    await c.start_process(old)
    t1 = time.monotonic()
    while (await states(c, [old])).get(old) != "follower":
        if time.monotonic() - t1 > GIVE_UP_TTLS * ttl_s:
            raise RuntimeError(f"{old} restarted but does not follow {new}")
        await asyncio.sleep(0.1)
    return {"killed": old, "new_leader": new, "takeover_s": takeover_s, "polls": polls}


async def main_async(args: argparse.Namespace) -> int:
    etcd_bin = shutil.which("etcd")
    if etcd_bin is None:
        print("etcd is not installed (scripts/setup.sh installs Debian's etcd-server)", file=sys.stderr)
        return 2
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-takeover-"))
    etcd = EtcdCluster.make(etcd_bin, root / "etcd", args.etcd_members)
    print(f"# {command_line()}")
    print(f"# loadavg at start: {loadavg()}; work directory {root}")
    etcd.start()
    c = LocalCluster(
        workdir=root / "cluster",
        coordinators=3,
        store=etcd.url,
        coordinator_args=["--election-ttl-s", str(args.election_ttl_s), "--node-timeout-s", "3"],
    )
    runs: list[dict[str, Any]] = []
    ok = False
    try:
        await c.start()
        await c.create_volume(VOL, SIZE, 4096)
        for k in range(args.kills):
            r = await one_run(c, args.election_ttl_s)
            r["run"] = k + 1
            r["loadavg"] = loadavg()
            runs.append(r)
            print(f"run {k + 1}/{args.kills}: killed {r['killed']}, {r['new_leader']} leads after "
                  f"{r['takeover_s']:.3f} s ({r['polls']} polls; loadavg {r['loadavg']})", flush=True)
        # The cluster still works: in sync, a mutating command carried out, replicas identical.
        await c.wait_for_volume(VOL, "in_sync", timeout_s=60)
        g = await c.run_cli("grant", "bench-user", "--volume", VOL)
        assert g.returncode == 0, g.stderr
        a, b = c.address("primary"), c.address("secondary")
        ca, cb = await asyncio.gather(sc.checksum(a, VOL, 1 << 20), sc.checksum(b, VOL, 1 << 20))
        assert ca == cb and ca, "the replicas differ after the leader kills"
        ok = True
    finally:
        await c.close()
        etcd.close()
        if ok and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    times = sorted(r["takeover_s"] for r in runs)
    bound = 2 * args.election_ttl_s
    print_table(
        "takeover after kill -9 of the leading coordinator",
        ["run", "killed", "new leader", "takeover s"],
        [[r["run"], r["killed"], r["new_leader"], f"{r['takeover_s']:.3f}"] for r in runs],
    )
    summary = {
        "kills": len(times),
        "election_ttl_s": args.election_ttl_s,
        "etcd_members": args.etcd_members,
        "takeover_p50_s": round(percentile(times, 50), 3),
        "takeover_p99_s": round(percentile(times, 99), 3),
        "takeover_max_s": round(times[-1], 3),
        "takeover_min_s": round(times[0], 3),
        "bound_s": bound,
        "within_bound": all(t <= bound for t in times),
        "loadavg_end": loadavg(),
    }
    print(f"takeover over {len(times)} kills: p50 {summary['takeover_p50_s']:.3f} s, p99 "
          f"{summary['takeover_p99_s']:.3f} s, max {summary['takeover_max_s']:.3f} s "
          f"(election TTL {args.election_ttl_s} s; bound 2 x TTL = {bound} s: "
          f"{'PASS' if summary['within_bound'] else 'FAIL'})")
    print("RESULT_JSON " + json.dumps(summary))
    return 0 if summary["within_bound"] else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="5 kills instead of 20")
    p.add_argument("--kills", type=int, default=None, help="leader kills (default 20; 5 with --quick)")
    p.add_argument("--election-ttl-s", type=int, default=2, help="the coordinators' --election-ttl-s")
    p.add_argument("--etcd-members", type=int, default=3, help="etcd cluster size")
    p.add_argument("--workdir", default=None, help="where to keep data and logs (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args()
    if args.kills is None:
        args.kills = 5 if args.quick else 20
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
