"""An isolated primary, on network-namespace test hosts (deploy/netns.py), real processes.

The fault (issue 10): the primary is cut off from the coordinator AND the
secondary (iptables DROP in the primary's namespace, as the nemesis does),
while its clients still reach it. It must stop acknowledging writes before the
promotion of the secondary is allowed; writes then go on at the new primary;
after the cut heals the old primary is demoted, reverts the generation it
minted alone (docs/FAILOVER.md "An isolated primary is not a split brain"),
is resynced with changes only, and the pair ends in_sync, identical block for
block, with every acknowledged write in the final volume.

Hosts: coordinator, primary, secondary and client each in its own namespace.
The scenario runs on the client host (it must reach every host; the pytest
process lives in the machine's namespace, which reaches none), as this very
file run as a script (``ip netns exec <client> python tests/test_failover_isolated.py
--inner ...``); the pytest test starts it and checks its exit code and report.

Writers, both from the client host:

* NBD, pinned to the OLD primary (``--nbd-listen`` on its host address): a
  small fixed-newstyle client (tests/test_nbd_e2e.py's ``NbdClient``, over
  syncrep.nbd.protocol) -- the path that stays up. The real tools (nbdcopy,
  qemu-io) are installed, but they start a process per run and report no
  per-write acknowledgement time; the kernel nbd-client needs a /dev/nbd
  device, and this container has none. Every write is recorded with the wall-clock time its reply arrived
  (``time.time()``: all processes share the kernel's clock), which is never
  earlier than when the server acknowledged it, so "last ack < promotion" is
  checked conservatively.
* gRPC ``VolumeClient`` through the coordinator (it follows the promotion):
  writes continue on the new primary.

The promotion time is the coordinator's own record: the first row of its
``events`` table (sqlite, ``coordinator/coordinator.db``) at an epoch above
the one before the cut. It is written with ``time.time()`` in the same
transaction as the role swap, before any node is told of the new roles, so no
write of the new primary can be older and the old primary's last ack must be.
(``syncrep status --json`` has only the current state's time, and a log line
is formatted to the millisecond; the row is exact and persisted.)

Tests: the coordinator promotes by itself (``--auto-failover``); an
operator's ``syncrep promote`` (refused while the old primary's lease may run,
then allowed) -- in both the gRPC writers connect after the promotion. A third
has the gRPC ``VolumeClient`` connected before the cut: the isolated old
primary answers its writes UNAVAILABLE for want of a lease, and after each the
client asks the coordinator where the primary is now (syncrep/client.py).

Run: ``.venv/bin/pytest -q tests/test_failover_isolated.py -s`` (root, for the
namespaces; ``-s`` prints each scenario's figures as JSON). A failed scenario's
whole output is in ``<tmp_path>/scenario.log``, the processes' logs in
``<tmp_path>/cluster/*.log``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
if __name__ == "__main__":  # run as the scenario script on the client host
    sys.path.insert(0, str(REPO))

from deploy import netns  # noqa: E402

VOL = "vol0"
SIZE = 64 << 20
BLOCK = 4096
NBD_PORT = 10809
LEASE_S = 2.0
LEASE_DRIFT_S = 0.2
NODE_TIMEOUT_S = 1.5
#: A write the isolated primary cannot replicate waits this long for a lease, then fails (EIO over NBD).
QUORUM_LOSS_TIMEOUT_S = 3.0
COORDINATOR_ARGS = ["--lease-s", str(LEASE_S), "--lease-drift-s", str(LEASE_DRIFT_S),
                    "--node-timeout-s", str(NODE_TIMEOUT_S)]
NODE_ARGS = ["--quorum-loss-timeout-s", str(QUORUM_LOSS_TIMEOUT_S)]
#: The NBD writers stay in the first 4 MiB, the gRPC writers in 8-16 MiB of the 64 MiB
#: volume: the old primary's divergent extents (activity log regions, 4 MiB) and the new
#: primary's changes cover only those, so a changes-only resync is far smaller than the volume.
NBD_REGION = (0, 4 << 20)
GRPC_REGION = (8 << 20, 8 << 20)
NBD_WRITERS = 2
GRPC_WRITERS = 2
#: Generous bounds: a loaded 2-core machine.
ROLE_TIMEOUT_S = 60.0
SYNC_TIMEOUT_S = 120.0
STATUS_SETTLE_S = 15.0
SCENARIO_TIMEOUT_S = 420.0

NETNS_OK, NETNS_WHY = netns.netns_available()
IPT_OK, IPT_WHY = netns.iptables_available()


# ================================================================ the pytest side


def _run_scenario(tmp_path: Path, promotion: str, seed: int, grpc_client: str = "after") -> dict[str, Any]:
    with netns.TestNet() as net:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), env.get("PYTHONPATH", "")) if x)
        cmd = [*net.exec_prefix("client"), sys.executable, str(Path(__file__).resolve()), "--inner",
               "--net", json.dumps(net.to_json()), "--workdir", str(tmp_path / "cluster"),
               "--promotion", promotion, "--grpc-client", grpc_client, "--seed", str(seed)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=SCENARIO_TIMEOUT_S, env=env,
                               check=False)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"the scenario did not finish within {SCENARIO_TIMEOUT_S:g} s; "
                                 f"output:\n{e.stdout!r}\n{e.stderr!r}\n{_logs(tmp_path)}") from None
    (tmp_path / "scenario.log").write_text(p.stdout + p.stderr)  # the whole story, for a failure
    if p.returncode != 0:
        raise AssertionError(f"the scenario failed (exit {p.returncode}; full output in "
                             f"{tmp_path / 'scenario.log'}):\n{p.stdout[-4000:]}\n{p.stderr[-8000:]}\n"
                             f"{_logs(tmp_path)}")
    result: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    print(json.dumps(result, indent=1))  # the figures, shown with -s
    return result


def _logs(tmp_path: Path, lines: int = 40) -> str:
    out = []
    for name in ("coordinator", "primary", "secondary"):
        f = tmp_path / "cluster" / f"{name}.log"
        if f.exists():
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"---- {name}.log (last {lines} lines)\n" + "\n".join(tail))
    return "\n".join(out)


needs_netns = pytest.mark.skipif(not (NETNS_OK and IPT_OK),
                                 reason=f"test hosts unavailable: {NETNS_WHY or IPT_WHY}")


@needs_netns
@pytest.mark.e2e
@pytest.mark.timeout(SCENARIO_TIMEOUT_S + 60)
def test_primary_isolated_from_coordinator_and_secondary_nbd_client_still_reaches_it_auto_failover(
    tmp_path: Path, seed: int
) -> None:
    """Fault: iptables cut of the primary from the coordinator and the secondary (not from its
    NBD client) of a volume with --auto-failover; heal."""
    r = _run_scenario(tmp_path, "auto", seed)
    assert r["last_nbd_ack_before_promotion_s"] > 0, r


@needs_netns
@pytest.mark.e2e
@pytest.mark.timeout(SCENARIO_TIMEOUT_S + 60)
def test_primary_isolated_from_coordinator_and_secondary_nbd_client_still_reaches_it_manual_promote(
    tmp_path: Path, seed: int
) -> None:
    """Fault: the same cut; `syncrep promote` is refused while the old primary's lease may run,
    then allowed; heal."""
    r = _run_scenario(tmp_path, "manual", seed)
    assert r["last_nbd_ack_before_promotion_s"] > 0, r
    assert r["promote_refusals"] >= 1, r


@needs_netns
@pytest.mark.e2e
@pytest.mark.timeout(SCENARIO_TIMEOUT_S + 60)
def test_primary_isolated_from_coordinator_and_secondary_grpc_client_connected_before_the_cut_follows(
    tmp_path: Path, seed: int
) -> None:
    """Fault: the same cut (--auto-failover), with a gRPC VolumeClient connected (through the
    coordinator) before the cut and still reaching the old primary: it must move to the new one
    (its writes there fail UNAVAILABLE for want of a lease; after each it asks the coordinator)."""
    _run_scenario(tmp_path, "auto", seed, grpc_client="before")


# ================================================================ the scenario (on the client host)


class NbdWriters:
    """``writers`` sequential NBD writers on disjoint parts of ``region``, sharing one
    connection to one node's export; every write recorded in :attr:`history`
    (monotonic times relative to ``t0``) and, when acknowledged, its reply's wall time
    in :attr:`ack_wall`. A failed write (NBD error, lost connection, no reply within
    ``reply_timeout_s``) is indeterminate; the writer pauses briefly and goes on,
    reconnecting when the connection is gone."""

    def __init__(self, host: str, port: int, seed: int, t0: float, *, writers: int,
                 region: tuple[int, int], max_blocks: int = 8, reply_timeout_s: float = 30.0) -> None:
        import random

        from deploy import workload as wl

        self.wl = wl
        self.host, self.port = host, port
        self.seed, self.t0 = seed, t0
        self.regions = wl.split_regions(region[1], writers, BLOCK, region[0])
        self.max_blocks = max_blocks
        self.reply_timeout_s = reply_timeout_s
        self.history = wl.History(seed, BLOCK)
        self.ack_wall: dict[tuple[int, int], float] = {}
        self.errors: list[str] = []
        self.acked = 0
        self._versions = [0] * writers
        self._rngs = [random.Random(f"nbd-writer-{seed}-{w}") for w in range(writers)]
        self._client: Any = None
        self._connecting: asyncio.Lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _conn(self) -> Any:
        from test_nbd_e2e import NbdClient  # the tests' NBD client (tests/ is this script's path)

        async with self._connecting:
            if self._client is None or self._client.closed.is_set():
                self._client = await asyncio.wait_for(NbdClient.open(self.host, self.port, VOL), 5.0)
            return self._client

    async def _drop(self, client: Any) -> None:
        if client is not None and self._client is client:
            self._client = None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 6.0)

    async def _write_one(self, w: int) -> None:
        from syncrep.nbd import protocol as p

        wl = self.wl
        start, size = self.regions[w]
        rng = self._rngs[w]
        n = rng.randint(1, self.max_blocks)
        off = start + rng.randrange(0, size // BLOCK - n + 1) * BLOCK
        self._versions[w] += 1
        data = wl.make_write(self.seed, w, self._versions[w], off, n, BLOCK)
        try:
            client = await self._conn()
        except (OSError, TimeoutError) as e:
            self.errors.append(f"connect: {e!r}")
            return  # nothing was sent: no op to record
        op = wl.Op(w, self._versions[w], off, n, 0, time.monotonic() - self.t0)
        self.history.add(op)  # recorded before it is sent: a write cut short stays indeterminate
        fut = client.submit(p.CMD_WRITE, off, data=data)
        closed = asyncio.ensure_future(client.closed.wait())
        try:
            await client.writer.drain()
            await asyncio.wait({fut, closed}, timeout=self.reply_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        except (OSError, ConnectionError) as e:
            self.errors.append(f"send: {e!r}")
        finally:
            closed.cancel()
        op.t_done = time.monotonic() - self.t0
        err = None
        if fut.done() and fut.exception() is None:
            err, _ = fut.result()
        if err == 0:
            self.ack_wall[(op.writer, op.version)] = time.time()
            op.status = wl.OK
            self.acked += 1
            return
        op.status = wl.FAIL
        op.error = "no reply" if err is None else f"NBD error {p.ERROR_NAMES.get(err, err)}"
        self.errors.append(op.error)
        if err is None:  # connection gone or stuck: a new one for the next write
            await self._drop(client)

    async def _loop(self, w: int) -> None:
        while not self._stop.is_set():
            before = len(self.history.ops)
            await self._write_one(w)
            if len(self.history.ops) == before or self.history.ops[-1].status != self.wl.OK:
                await asyncio.sleep(0.05)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._loop(w), name=f"nbd-writer-{w}") for w in range(len(self.regions))]

    async def stop(self) -> None:
        self._stop.set()
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._drop(self._client)
        crashed = [r for r in results if isinstance(r, BaseException)]
        if crashed:
            raise crashed[0]  # a bug of the writer, not a failed write

    async def wait_acked(self, n: int, timeout_s: float = 30.0) -> None:
        target = self.acked + n
        deadline = time.monotonic() + timeout_s
        while self.acked < target:
            assert time.monotonic() < deadline, (
                f"only {self.acked} of {target} NBD writes acknowledged in {timeout_s} s; errors: {self.errors[-3:]}")
            await asyncio.sleep(0.02)

    def last_ack_wall(self) -> float:
        return max(self.ack_wall.values(), default=0.0)


def promotion_event(db_path: Path, after_epoch: int) -> tuple[float, int, str, str]:
    """(ts, epoch, to_state, reason) of the coordinator's first recorded event of ``VOL``
    at an epoch above ``after_epoch`` (read-only: the coordinator owns the database)."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5.0)
    try:
        row = conn.execute(
            "SELECT ts, epoch, to_state, reason FROM events WHERE volume = ? AND epoch > ? ORDER BY id LIMIT 1",
            (VOL, after_epoch)).fetchone()
    finally:
        conn.close()
    assert row is not None, f"the coordinator recorded no event of {VOL} above epoch {after_epoch}"
    return float(row[0]), int(row[1]), str(row[2]), str(row[3])


def all_states(db_path: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5.0)
    try:
        return [str(r[0]) for r in conn.execute("SELECT to_state FROM events WHERE volume = ? ORDER BY id", (VOL,))]
    finally:
        conn.close()


async def scenario(net_json: dict[str, Any], workdir: Path, promotion: str, grpc_client: str,
                   seed: int) -> dict[str, Any]:
    """``promotion``: "auto" (--auto-failover) or "manual" (`syncrep promote`).
    ``grpc_client``: when the gRPC writers' VolumeClient connects: "after" the
    promotion, or "before" the cut (then it must follow the promotion by itself)."""
    import grpc
    from e2e_helpers import Workload, assert_replicas_identical

    from deploy import workload as wl
    from deploy.cluster import LocalCluster
    from syncrep import client as sc

    net = netns.TestNet.attach(net_json)
    out: dict[str, Any] = {"promotion": promotion, "grpc_client": grpc_client, "seed": seed}
    c = LocalCluster(
        workdir, hosts=net.hosts, coordinator_args=COORDINATOR_ARGS,
        primary_args=["--nbd-listen", f"{net.address('primary')}:{NBD_PORT}", *NODE_ARGS],
        secondary_args=["--nbd-listen", f"{net.address('secondary')}:{NBD_PORT}", *NODE_ARGS],
        # Plaintext (--insecure): the scenario's NBD client speaks nbd://; TLS on the
        # export is covered by tests/test_nbd_tls.py and tests/test_security_e2e.py.
        tls=False,
    )
    async with c:
        await c.create_volume(VOL, SIZE, BLOCK, auto_failover=promotion == "auto", timeout_s=60)
        db_path = c.data_dir("coordinator") / "coordinator.db"
        t0 = time.monotonic()
        nbd = NbdWriters(net.address("primary"), NBD_PORT, seed, t0, writers=NBD_WRITERS, region=NBD_REGION)
        grpc_w = Workload(c, VOL, SIZE, writers=GRPC_WRITERS, seed=seed + 1, region_start=GRPC_REGION[0],
                          region_size=GRPC_REGION[1])
        grpc_w.t0 = t0
        nbd.start()
        await nbd.wait_acked(100)
        if grpc_client == "before":
            await grpc_w.start()
            await grpc_w.wait_acked(50)
        st0 = await c.get_volume(VOL)
        assert sc.volume_status_dict(st0)["state"] == "in_sync", sc.volume_status_dict(st0)
        epoch0 = st0.epoch

        # ---- the cut: the primary loses the coordinator and the secondary, not the client host.
        net.partition("primary", "coordinator")
        net.partition("primary", "secondary")
        cut_wall = time.time()
        cut_t = time.monotonic() - t0  # NBD writes issued after this cannot have reached the secondary
        acked_at_cut = nbd.acked

        refusals: list[str] = []
        if promotion == "manual":
            # At once the old primary may still hold its lease: refused, saying so.
            try:
                await c.promote(VOL)
                raise AssertionError("promoted at once after the cut, while the old primary's lease may run")
            except sc.ClientError as e:
                assert e.code == grpc.StatusCode.FAILED_PRECONDITION, e
                assert "lease" in e.message.lower(), e.message
                refusals.append(e.message)
            deadline = time.monotonic() + ROLE_TIMEOUT_S
            while True:
                r = await c.run_cli("promote", VOL)
                if r.returncode == 0:
                    break
                assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
                refusals.append(r.stderr.strip())
                assert time.monotonic() < deadline, f"promote still refused after {ROLE_TIMEOUT_S} s: {r.stderr}"
            assert f"primary is now {c.address('secondary')}" in r.stdout, r.stdout
        else:
            await c.wait_for_volume(VOL, lambda st: st.primary == c.address("secondary"), timeout_s=ROLE_TIMEOUT_S)
        promoted_seen_wall = time.time()
        prom_ts, prom_epoch, prom_state, prom_reason = promotion_event(db_path, epoch0)
        out.update(promotion_event_state=prom_state, promotion_event_reason=prom_reason,
                   promote_refusals=len(refusals), first_refusal=refusals[0] if refusals else "")

        # (1) No NBD write was acknowledged by the old primary at or after the promotion.
        last_ack = nbd.last_ack_wall()
        assert last_ack < prom_ts, (
            f"the isolated old primary acknowledged an NBD write {last_ack - prom_ts:.3f} s AFTER the "
            f"coordinator recorded the promotion (epoch {prom_epoch}: {prom_reason})")
        # (2) Writes continue at the new primary, through the coordinator.
        if grpc_client == "after":
            await grpc_w.start()  # connects now: the coordinator names the new primary
        try:
            await grpc_w.wait_acked(100, timeout_s=ROLE_TIMEOUT_S)
        except AssertionError as e:
            raise AssertionError(f"{e}; the client writes to {grpc_w.client.primary if grpc_w.client else None}, "
                                 f"last errors: {grpc_w.errors[-2:]}") from None
        assert (await c.role_of(VOL)) == {"primary": "secondary", "secondary": "primary"}
        sent0 = int(next((v.resync_bytes_sent for v in (await sc.node_status(c.address("secondary"))).volumes
                          if v.name == VOL), 0))
        nbd_acks_isolated = nbd.acked - acked_at_cut

        # ---- heal: the old primary hears of the promotion, is demoted, reverts, resyncs.
        net.heal()
        heal_wall = time.time()
        await c.wait_for_volume(VOL, "in_sync", timeout_s=SYNC_TIMEOUT_S)
        in_sync_wall = time.time()
        await grpc_w.wait_acked(50, timeout_s=ROLE_TIMEOUT_S)  # in sync, replication goes on
        # The demoted node's export is read-only: at least one NBD write is refused after the heal.
        n_ops = len(nbd.history.ops)
        deadline = time.monotonic() + ROLE_TIMEOUT_S
        while not any(o.status == wl.FAIL for o in nbd.history.ops[n_ops:]):
            assert time.monotonic() < deadline, "the demoted old primary still accepts NBD writes"
            await asyncio.sleep(0.05)
        await nbd.stop()
        await grpc_w.stop()
        last_ack = nbd.last_ack_wall()
        assert last_ack < prom_ts, (
            f"the old primary acknowledged an NBD write {last_ack - prom_ts:.3f} s after the promotion "
            f"(after the heal: {last_ack > heal_wall})")
        assert (await c.role_of(VOL)) == {"primary": "secondary", "secondary": "primary"}

        # (3) Not a split brain: the old primary reverted its unconfirmed generation and was
        # resynced with changes only.
        states = all_states(db_path)
        assert "split_brain" not in states, states
        log_text = c.log_path("primary").read_text(errors="replace")
        assert "never confirmed by a lease" in log_text, "the old primary logged no revert of its generation"
        assert "demoted to secondary" in log_text, "the old primary logged no demotion"
        sent = int(next((v.resync_bytes_sent for v in (await sc.node_status(c.address("secondary"))).volumes
                         if v.name == VOL), 0)) - sent0
        assert 0 < sent < SIZE // 2, f"the resync sent {sent} bytes; expected only the changes (< {SIZE // 2})"

        # The end: in sync, identical block for block, no acknowledged write lost (either path).
        await c.wait_for_volume(VOL, "in_sync", timeout_s=SYNC_TIMEOUT_S)
        await assert_replicas_identical(c, VOL)
        primary = await c.current_primary_addr(VOL)
        for name, h in (("NBD (old primary)", nbd.history), ("gRPC (via the coordinator)", grpc_w.history)):
            read = await wl.read_blocks(primary, VOL, h.touched_blocks(), BLOCK)
            rep = wl.check_blocks(h, read)
            assert rep.ok, f"LOST WRITE or garbage of the {name} writers (seed {h.seed}): {rep.summary()}"
        # Stronger than "no acknowledged write lost": what the isolated primary wrote only to its
        # own disk (NBD writes issued after the cut, all refused) is gone from BOTH replicas --
        # the resync ran from the new primary over the old one's divergent extents, never back.
        by_version = nbd.history.op_index()
        for side in (c.primary_addr, c.secondary_addr):
            read = await wl.read_blocks(side, VOL, nbd.history.touched_blocks(), BLOCK)
            kept = []
            for b, data in sorted(read.items()):
                d = wl.decode_block(data, seed, b * BLOCK, BLOCK)
                op = by_version.get((d.writer, d.version)) if d.kind == "block" else None
                if op is not None and op.t_inv > cut_t:
                    kept.append((b, op))
            assert not kept, (
                f"{side} holds {len(kept)} blocks of NBD writes issued to the isolated primary after the cut "
                f"(first: block {kept[0][0]}, {wl.describe_op(kept[0][1])}, issued {kept[0][1].t_inv - cut_t:.3f} s "
                f"after the cut)" if kept else "")
        isolated_writes = sum(1 for o in nbd.history.ops if o.t_inv > cut_t)
        deadline = time.monotonic() + STATUS_SETTLE_S
        while True:
            doc = await c.status_json(VOL)
            if (doc["state"] == "in_sync" and doc["primary_alive"] and doc["secondary_alive"]
                    and doc["generation"] != 0 and doc["generation"] == doc["secondary_generation"]
                    and doc["out_of_sync_bytes"] == 0):
                break
            assert time.monotonic() < deadline, f"`syncrep status --json` never settled: {doc}"
            await asyncio.sleep(0.2)

        out.update(
            nbd_acked=nbd.acked, nbd_indeterminate=nbd.history.indeterminate,
            nbd_acks_after_cut=nbd_acks_isolated, nbd_writes_issued_after_cut=isolated_writes,
            grpc_acked=grpc_w.acked, grpc_indeterminate=grpc_w.history.indeterminate,
            last_nbd_ack_after_cut_s=round(last_ack - cut_wall, 3),
            last_nbd_ack_before_promotion_s=round(prom_ts - last_ack, 3),
            promotion_after_cut_s=round(prom_ts - cut_wall, 3),
            promotion_seen_after_cut_s=round(promoted_seen_wall - cut_wall, 3),
            in_sync_after_heal_s=round(in_sync_wall - heal_wall, 3),
            resync_bytes_sent=sent, volume_size=SIZE, epochs=[epoch0, prom_epoch],
        )
    return out


def _inner_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inner", action="store_true")
    ap.add_argument("--net", required=True)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--promotion", choices=("auto", "manual"), required=True)
    ap.add_argument("--grpc-client", choices=("before", "after"), required=True)
    ap.add_argument("--seed", type=int, required=True)
    a = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    result = asyncio.run(scenario(json.loads(a.net), a.workdir, a.promotion, a.grpc_client, a.seed))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_inner_main(sys.argv[1:]))
