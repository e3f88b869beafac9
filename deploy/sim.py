"""The deterministic simulator (after TigerBeetle's VOPR): seeded schedules of
faults against the REAL coordinator, primary and secondary, on virtual time.

    python -m deploy.sim --seeds 1000 [--first-seed S] [--jobs 2]
    python -m deploy.sim --seed S --trace           # the run, event by event, on stdout
    python -m deploy.sim --duration 10m              # as many seeds as fit
    python -m deploy.sim --seeds 500 --coordinators 3 --jobs 2   # 3 coordinators on a simulated etcd

What runs: ``coordinator.server.Coordinator`` and two ``syncrep.node.Node``
objects (the same classes the processes run), each on its own simulated host,
talking over ``deploy/simnet.py``, an in-memory gRPC network (the only switch
is ``syncrep.rpc.transport``). Block stores are the real ``BlockStore`` on
files under /dev/shm; each volume's I/O runs inline instead of on a thread.
Time is virtual: the event loop's clock jumps to the next timer when nothing
is ready, and ``time.monotonic``/``time.time`` read that clock, so an hour of
faults costs only the CPU it needs, and the same seed gives the same run,
event for event (the trace has no wall-clock times, pids or temp paths; run
with PYTHONHASHSEED=0, which ``main`` arranges by re-executing itself).

Faults (the nemesis's kinds): crash and restart of each process; a hang,
modelled as the host cut off both ways (its timers still run, which a real
SIGSTOP would not); symmetric and one-way partitions between primary and
secondary; the secondary's disk full (ENOSPC from its store) and freed;
resync chunks corrupted in transit (the secondary must refuse them).
Failover (docs/FAILOVER.md): the primary lost for good, then promoted away
from by the coordinator (auto-failover) or by its Promote RPC (retried while
the lease runs), the old primary returning with its data or an empty data
dir; the primary isolated from coordinator and secondary while the client
still reaches it (auto-failover); a replaced disk (restart with an empty data
dir) on the primary or the secondary, only when the other replica holds every
acknowledged write (else the fault is a plain crash: a lost disk of the only
copy loses writes by definition).
Operator actions, at most one per schedule (drawn after its faults, so that
adding them changed no seed's faults):
  * a switchover (docs/FAILOVER.md section 5) asked once the pair is in sync,
    or at any moment (then a refusal must be harmless), the workload running;
  * a forced promote (sections 3 and 6): the secondary misses writes (crashed,
    cut from the primary, or mid-resync), the primary is lost (crashed, or
    isolated with the client still reaching it), the secondary is promoted
    with Promote(force=True) and takes writes, the old primary returns: split
    brain; then Resolve(keep = a side at random) and the resync back to in
    sync. Meanwhile the other failover faults stand aside and no disk is
    replaced (each side may hold acknowledged writes the other lacks).
The client writes through the coordinator-following ``VolumeClient``.

Checked while it runs (every ``CHECK_EVERY_S``):
  * epochs only grow (coordinator record and each node's persisted epoch);
  * the coordinator names one of the two nodes primary, the other secondary;
    the primary moves only by a promotion, at a newer epoch;
  * at most one node acknowledges writes for the volume: a write sent to a
    node after the coordinator named the other one primary (counted from
    when the named node applied it: promotion, forced promotion, switchover,
    a resolve that keeps the secondary) is never acknowledged by it (an
    isolated or lost old primary holds no lease; a switched-over one refuses
    the writes waiting at its gate; a discarded one is fenced);
  * the replicas are identical whenever the pair is in sync and quiet
    (checked at every pause of the workload);
  * every rollback point (``pre-resync-*`` on the secondary) holds only
    versions that were written, none newer than the newest write (no garbage).
And at the end, after every fault healed and the pair is back in sync: the
replicas are identical block for block and no acknowledged write is lost
(each block holds the latest acknowledged version or a later indeterminate one),
except what a resolve discarded, exactly: a write may be missing only if it
lies inside the resolve's reported ``discarded_extents`` AND the discarded
node acknowledged it alone, under a lease, at a generation the kept replica
never had (after the divergence), before the resolve answered. Which writes a
primary acknowledged alone, and at which generation, is noted as it happens
(a wrapper of ``PrimaryVolume._acknowledge_alone``). So the writes a forced
promote "loses" (those the secondary lacked, mid-resync its pre-resync
rollback point) are allowed to be missing only if the resolve then discarded
the old primary's side; its Promote reply's figure ("the writes in N failed
extents ... and whatever the primary wrote alone since it last reported") is
prose with no bound, and the checker does not use it. A report marked exact
must cover every such write; the missing ones must be in the resolve's
snapshot of the discarded side; a rollback point the discarded side took
before the pair was back in sync is checked against its own branch.

Several coordinators (issue 12), opt-in: ``--coordinators 3`` runs three
real ``Coordinator`` objects on ``deploy/simstore.py``'s in-memory etcd (the
real ``EtcdStore`` and ``Election`` over it, election TTL 2 s), the nodes and
the client given the three addresses. The base schedule is the default
mode's (its "coord" target is the leader of the moment); on top, faults from
a stream of their own (``make_ha_schedule``): the leader or a follower killed
and restarted, a coordinator cut from the store while it still reaches the
nodes and the client (the leader: the stale-leader case), the store paused
(no quorum). Checked besides everything above: the store's audit (every
write fenced by the election key, one coordinator per term, no older term
writing after a newer one, a volume's epoch never going back: no epoch
handed out twice) and never two coordinators acting as leader at once. The
record the checks follow is the store's. The default (1, SQLite) runs
exactly as before, seed for seed.

Exit status 0 only when every schedule passed; a failure prints the seed and
the path of its trace.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import errno
import json
import logging
import os
import random
import secrets
import selectors
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.checker import check_rollback_point
from deploy.simnet import SimNet, current_host
from deploy.workload import (
    History,
    Workload,
    blocks_from_bytes,
    check_blocks,
    decode_block,
    describe_block,
    split_regions,
)

VOLUME = "simvol"
BLOCK = 4096
BLOCKS = 64
WRITERS = 4  # sequential writers on disjoint regions (deploy/workload.py, as the nemesis)
MAX_WRITE_BLOCKS = 4
CHECK_EVERY_S = 0.1
SETTLE_MAX_S = 120.0  # bounded wait for in_sync after the faults end (virtual)
HOSTS = ("coord", "node-a", "node-b")
ADDR = {"coord": "coord:7000", "node-a": "node-a:7001", "node-b": "node-b:7002"}
#: Product log records at this level and up go into the trace (SIM_TRACE_LOG=INFO for more).
TRACE_LOG_LEVEL = getattr(logging, os.environ.get("SIM_TRACE_LOG", "WARNING").upper(), logging.WARNING)
FAULT_KINDS = ("crash", "hang", "partition", "partition_oneway", "link_down", "disk_full", "corrupt",
               "lose_primary", "isolate_primary", "replace_disk")
#: Relative odds of each kind in a schedule. The failover kinds cost the most
#: (a lease must expire, then a fail-back resync runs): drawn half as often.
FAULT_WEIGHTS = (1, 1, 1, 1, 1, 1, 1, 0.5, 0.5, 1)
#: Operator actions, drawn apart from the kinds above (see make_schedule): a
#: schedule gets at most one, with these odds, on top of its 1-3 faults.
EXTRA_KINDS = ("switchover", "forced_promote")
EXTRA_ODDS = (0.12, 0.05)
ALL_KINDS = FAULT_KINDS + EXTRA_KINDS
#: Bounded waits of the switchover fault (virtual seconds).
SWITCHOVER_WAIT_IN_SYNC_S = 5.0  # for the pair to be in sync before asking
SWITCHOVER_ATTEMPTS = 4  # "in_sync": asks again, 0.5 s apart, while the refusal says to retry
SWITCHOVER_RPC_S = 12.0  # one Switchover call: more than the coordinator's default handover timeout (5 s)
#: Bounded waits of the forced promote (virtual seconds).
FORCED_START_WAIT_S = 5.0  # for every process to be up and no other failover under way, else skipped
SPLIT_WAIT_S = 15.0  # for the returning old primary to be reported split brain
RESOLVE_WAIT_S = 30.0  # Resolve retried (refused until both nodes report the split) this long
RESYNC_TRIGGER_WAIT_S = 5.0  # the "resync" variant: for the returning secondary's resync to start
#: Failover faults last long enough for the lease to expire and the secondary
#: to be promoted (node_timeout_s 3 + lease_s 4 + lease_drift_s 0.5 on the coordinator).
FAILOVER_S = (9.0, 14.0)
ROLE_WAIT_S = 30.0  # bounded wait for a promotion the fault expects
#: ``--coordinators 3`` (issue 12): three coordinators on the in-memory etcd
#: (deploy/simstore.py), and the faults of that mode, drawn from a stream of
#: their own after the base schedule (which stays the default mode's, seed for seed).
COORD_HOSTS_HA = ("coord-1", "coord-2", "coord-3")
HA_KINDS = ("kill_coord", "cut_store", "pause_store")
HA_WEIGHTS = (1, 1.5, 1)
#: The election's TTL in that mode (whole seconds, etcd's unit): a new leader within about 2 x TTL.
HA_ELECTION_TTL_S = 2
ETCD_ENDPOINT = "sim-etcd:2379"
#: When a fault starts: at its time, or (like the nemesis's second faults) the
#: first moment after its time that a resync is running / the final round is on.
TRIGGERS = ("time", "time", "resync", "final_round")


class SimFailure(AssertionError):
    pass


class SimDeadlock(RuntimeError):
    pass


# ---------------------------------------------------------------- virtual time


class _NullSelector(selectors.BaseSelector):
    """No file descriptor ever becomes ready (nothing does real I/O); a wait
    for ``timeout`` seconds moves the virtual clock instead of sleeping."""

    def __init__(self) -> None:
        self._map: dict[Any, selectors.SelectorKey] = {}
        self.loop: VirtualTimeLoop | None = None

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        key = selectors.SelectorKey(fileobj, fileobj if isinstance(fileobj, int) else fileobj.fileno(),
                                    events, data)
        self._map[key.fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        return self._map.pop(fd)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        assert self.loop is not None
        if timeout is None:
            raise SimDeadlock("nothing is scheduled: every task waits for something that never comes")
        if timeout > 0:
            self.loop.advance(timeout)
        return []

    def get_map(self) -> Any:
        return self._map

    def close(self) -> None:
        self._map.clear()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        sel = _NullSelector()
        super().__init__(selector=sel)
        sel.loop = self

    def time(self) -> float:
        return self._now

    def advance(self, dt: float) -> None:
        self._now += dt

    def _write_to_self(self) -> None:
        # Only other threads and signal handlers wake a loop; there are none.
        pass


class _InlineExecutor(concurrent.futures.Executor):
    """A volume's "I/O thread", inline: deterministic, and refuses once its host crashed."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.host = current_host.get()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        f: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            self.sim.check_alive(self.host)
            f.set_result(fn(*args, **kwargs))
        except BaseException as e:
            f.set_exception(e)
        return f

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass


# ---------------------------------------------------------------- schedules


@dataclass(frozen=True)
class Fault:
    at_s: float
    kind: str
    target: str
    duration_s: float
    trigger: str = "time"

    def __str__(self) -> str:
        when = "" if self.trigger == "time" else f" on {self.trigger}"
        return f"{self.kind}({self.target}) at {self.at_s:.3f}s{when} for {self.duration_s:.3f}s"


@dataclass
class Resolved:
    """What a resolve discarded, as the checker uses it (the contract: a write
    missing from the final volume is allowed only if it lies inside the
    resolve's discarded extents AND the discarded node acknowledged it after
    the divergence)."""

    kept: str  # host
    discarded: str  # host
    common: int  # the common generation
    extents: list[tuple[int, int]]  # (offset, length), as the reply reports them
    exact: bool
    #: Acknowledged by the discarded node alone, at a generation the kept
    #: replica never had (after the divergence), noted before the reply came.
    after_divergence: set[tuple[int, int]]
    #: The discarded node's state kept by the resolve (block -> bytes; None:
    #: it could not be read when the reply came).
    snapshot: dict[int, bytes] | None = None
    snapshot_name: str = ""
    #: The other branch: what the kept node acknowledged alone after the
    #: divergence, before the reply came (the discarded replica never had it).
    kept_branch: set[tuple[int, int]] = field(default_factory=set)
    #: Virtual unix times: the reply came; the pair was first in sync after.
    #: A rollback point the discarded node took between the two holds its
    #: own branch (the first resync's pre-resync snapshot).
    resolved_at: float = 0.0
    converged_at: float = float("inf")

    def covers(self, offset: int, length: int) -> bool:
        """[offset, offset + length) lies inside the union of the extents."""
        pos, end = offset, offset + length
        for o, n in sorted(self.extents):
            if o <= pos < o + n:
                pos = o + n
            if pos >= end:
                return True
        return pos >= end


def make_schedule(seed: int, length_s: float) -> list[Fault]:
    """A pure function of the seed: the faults, when, on what, for how long."""
    rng = random.Random(seed * 7919 + 17)
    faults: list[Fault] = []
    t = 0.5
    for _ in range(rng.randint(1, 3)):
        t += rng.uniform(0.2, length_s / 2)
        if t >= length_s:
            break
        kind = rng.choices(FAULT_KINDS, FAULT_WEIGHTS)[0]
        target = {
            "crash": rng.choice(["node-a", "node-b", "coord"]),
            "hang": rng.choice(["node-a", "node-b", "coord"]),
            "partition": "node-a|node-b",
            "partition_oneway": rng.choice(["node-a>node-b", "node-b>node-a"]),
            "link_down": rng.choice(["node-a", "node-b", "coord"]),
            "disk_full": "secondary",
            "corrupt": "primary>secondary",
            # The primary dies for good (until the end of the schedule): the
            # coordinator promotes the secondary by itself (a volume created
            # --auto-failover) or on a Promote RPC, retried until allowed.
            "lose_primary": rng.choice(["auto", "promote"]),
            "isolate_primary": "primary",  # cut from coordinator and secondary; the client still reaches it
            "replace_disk": rng.choice(["primary", "secondary"]),  # restarted with an empty data dir
        }[kind]
        # Only a later fault can meet a resync (an earlier fault starts it).
        trigger = rng.choice(TRIGGERS) if faults else "time"
        duration = rng.uniform(*FAILOVER_S) if kind in ("lose_primary", "isolate_primary") else rng.uniform(0.1, 4.0)
        faults.append(Fault(round(t, 3), kind, target, round(duration, 3), trigger))
    # The operator's actions come after, from the same stream, so that adding
    # them left every seed's faults above as they were (a seed named in a
    # commit message or a test still replays its run, unless it drew one).
    u = rng.random()
    for kind, odds in zip(EXTRA_KINDS, EXTRA_ODDS, strict=True):
        if u >= odds:
            u -= odds
            continue
        at = rng.uniform(0.7, length_s)
        if kind == "switchover":
            # "in_sync": asked once the pair is in sync (it must swap the roles
            # with no write lost); "any": asked whatever the pair is doing
            # (mid-resync, degraded, a node down): a refusal must be harmless.
            target = rng.choice(["in_sync", "any"])
            trigger = rng.choice(TRIGGERS) if target == "any" else "time"
            duration = 0.0
        else:
            # The secondary misses writes: "degraded" (it crashes), "partition"
            # (cut from the primary), "resync" (crashes briefly, and the
            # primary is lost while the resync runs), "isolated" (cut from the
            # primary, which is then cut from the coordinator too, the client
            # still reaching it: lost but alive). Then the secondary is
            # force-promoted, the old primary returns: split brain, resolved
            # keeping one side. duration: how long the primary writes alone
            # before it is lost.
            target = rng.choice(["degraded", "partition", "resync", "isolated"])
            trigger = "time"
            duration = rng.uniform(0.5, 2.5)
        faults.append(Fault(round(at, 3), kind, target, duration, trigger))
        break
    return faults


def make_ha_schedule(seed: int, length_s: float) -> list[Fault]:
    """The faults of ``--coordinators 3`` (a pure function of the seed, from
    its own stream: the base schedule is make_schedule's, unchanged). A
    coordinator killed and restarted ("leader" or "follower"); one cut from
    the store while it still reaches the nodes and the clients (the leader:
    the stale-leader case); the store paused (no quorum: nothing answered)."""
    rng = random.Random(seed * 104729 + 0x4A)
    faults: list[Fault] = []
    for _ in range(rng.randint(1, 2)):
        kind = rng.choices(HA_KINDS, HA_WEIGHTS)[0]
        at = rng.uniform(0.3, length_s)
        target = "store" if kind == "pause_store" else rng.choice(["leader", "leader", "follower"])
        duration = rng.uniform(0.5, 6.0)
        faults.append(Fault(round(at, 3), kind, target, round(duration, 3), "time"))
    return faults


# ---------------------------------------------------------------- the simulation


def read_all_blocks(store: Any, snapshot_id: int | None = None) -> dict[int, bytes]:
    return blocks_from_bytes(store.read_at(snapshot_id, 0, BLOCKS * BLOCK), 0, BLOCK, range(BLOCKS))



def _undo_attr(d: dict[str, Any], name: str) -> Callable[[], None]:
    return lambda: d.pop(name, None) and None



class Sim:
    def __init__(self, seed: int, root: Path, trace: list[str], length_s: float, coordinators: int = 1) -> None:
        self.seed = seed
        # The coordinators: one on SQLite ("coord", the default), or three on
        # the in-memory etcd (--coordinators 3), the nodes and the client
        # given all three addresses.
        self.coord_hosts: tuple[str, ...] = ("coord",) if coordinators == 1 else COORD_HOSTS_HA
        self.hosts: tuple[str, ...] = (*self.coord_hosts, "node-a", "node-b")
        self.addr = dict(ADDR) if coordinators == 1 else {
            **{h: f"{h}:7000" for h in COORD_HOSTS_HA}, "node-a": ADDR["node-a"], "node-b": ADDR["node-b"]}
        self.coord_list = ",".join(self.addr[h] for h in self.coord_hosts)
        self.etcd: Any = None
        if coordinators != 1:
            from coordinator.election import DEFAULT_ELECTION_KEY
            from coordinator.etcd_store import DEFAULT_PREFIX
            from deploy.simstore import SimEtcd

            self.etcd = SimEtcd(_virtual_monotonic, random.Random(seed ^ 0xE7CD),
                                election_key=DEFAULT_ELECTION_KEY.encode(), data_prefix=DEFAULT_PREFIX.encode(),
                                log=self.log)
        self.root = root
        self.trace = trace
        self.length_s = length_s
        self.rng = random.Random(seed)
        self.net = SimNet(random.Random(seed ^ 0x5EED))
        self.crashed: set[str] = set()
        self.tasks: dict[str, dict[asyncio.Task[Any], None]] = {h: {} for h in (*self.hosts, "client")}
        self.procs: dict[str, Any] = {}
        self.workload: Workload | None = None
        self.coord_epoch = 0
        self.node_epochs: dict[str, int] = {}
        self.failure: str | None = None
        self.writing = asyncio.Event()
        self.inflight = 0
        self.disk_full_undo: list[Callable[[], None]] = []
        # Periodic common snapshots (in-stream markers) in half of the schedules.
        self.snapshot_period_s = self.rng.choice([0.0, 0.0, 1.5, 3.0])
        self.rollback_checked: set[str] = set()
        self.down_count: dict[str, int] = {}
        self.corrupting = 0  # corrupt faults active now
        self.chunks_corrupted = 0
        self.net.tamper = self._tamper
        # The host the coordinator last named primary (its record while it is
        # up; the last one seen while it is down). Roles move on promotion.
        self.primary_host = "node-a"
        self.promotions = 0  # role changes to a degraded pair (a promotion)
        self.role_swaps = 0  # role changes to an in-sync pair (a switchover)
        self.switchovers = 0  # Switchover RPCs that answered OK
        self.switchovers_refused = 0
        self.disks_replaced = 0
        self.auto_failover = False
        self.write_sent: dict[int, tuple[str, str, int]] = {}
        # Writes a primary acknowledged alone, under a lease (not on its
        # secondary): (writer, version) -> (host, its current generation then).
        # Noted by the wrapper of PrimaryVolume._acknowledge_alone (_patched).
        self.alone_acks: dict[tuple[int, int], tuple[str, int]] = {}
        self.failover_active = 0  # lose_primary / isolate_primary / forced_promote faults running
        self.forcing = 0  # forced promotes running (the other failover faults then stand aside)
        self.split_pending = 0  # forced promotes not yet resolved: no replica may lose its disk
        self.resolves: list[Resolved] = []
        self.forced_promotions = 0
        self.lineage_seen: dict[str, set[int]] = {}  # host -> its replica's generations, last seen (identity_of)
        self.wipe_pending: set[str] = set()  # crashed hosts that restart with an empty data dir
        self.store_cuts: dict[str, int] = {}  # --coordinators 3: cuts from the store under way, per host
        self.store_pauses = 0
        self.ha_rng = random.Random(seed ^ 0x4A4A)  # which follower a fault picks

    # -- trace
    def log(self, text: str) -> None:
        self.trace.append(f"{asyncio.get_running_loop().time() - 1000.0:10.4f} {text}")

    # -- hosts
    def check_alive(self, host: str) -> None:
        if host in self.crashed:
            raise OSError(errno.EIO, f"sim: host {host} crashed")

    def role_host(self, role: str) -> str:
        """The host playing ``role`` ("primary"/"secondary") now, or a host name as is."""
        if role == "primary":
            return self.primary_host
        if role == "secondary":
            return "node-b" if self.primary_host == "node-a" else "node-a"
        return role

    def task_factory(self, loop: asyncio.AbstractEventLoop, coro: Any, context: Any = None) -> asyncio.Task[Any]:
        host = context[current_host] if context is not None and current_host in context else current_host.get()
        task = asyncio.Task(coro, loop=loop, context=context)
        bucket = self.tasks.setdefault(host, {})
        bucket[task] = None
        task.add_done_callback(lambda t: bucket.pop(t, None))
        return task

    def spawn_on(self, host: str, coro: Any) -> asyncio.Task[Any]:
        import contextvars

        ctx = contextvars.copy_context()
        ctx.run(current_host.set, host)
        return asyncio.get_running_loop().create_task(coro, context=ctx)

    async def start_host(self, host: str) -> None:
        from coordinator.server import Coordinator
        from syncrep.config import NodeOptions
        from syncrep.node import Node

        if self.etcd is not None and host in self.coord_hosts:
            # (A coordinator starts only once it reaches the store: the store's
            # start-up retries would sleep in real time.)
            while not self.etcd.reachable(host):  # noqa: ASYNC110 - waits on virtual time for a fault to end
                await asyncio.sleep(0.1)
            if self.down_count.get(host, 0) > 0:
                # Crashed again while it waited: that crash's end starts it
                # (starting it here too ran two instances of one coordinator,
                # one of them unreachable: seed 20637 --coordinators 3).
                self.log(f"start {host}: skipped, crashed again while it waited for the store")
                return
        self.crashed.discard(host)

        async def boot() -> None:
            # Built inside the host's context: its server, channels and tasks belong to it.
            proc: Any
            if host == "coord":
                proc = Coordinator(ADDR["coord"], self.root / "coord", node_timeout_s=3.0,
                                   resync_retry_max_s=5.0)
            elif host in self.coord_hosts:
                etcd = self.etcd
                proc = Coordinator(self.addr[host], self.root / host, node_timeout_s=3.0, resync_retry_max_s=5.0,
                                   store=f"etcd://{ETCD_ENDPOINT}", election_ttl_s=HA_ELECTION_TTL_S,
                                   etcd_start_timeout_s=0.0,
                                   etcd_client=lambda purpose: etcd.client(host, inline=purpose == "store"))
            else:
                opts = NodeOptions(durability="os", ack_timeout_s=1.0, connect_attempts=3,
                                   resync_chunk_bytes=16 * 1024, final_diff_threshold_bytes=16 * 1024,
                                   snapshot_period_s=self.snapshot_period_s)
                proc = Node("primary" if host == "node-a" else "secondary", ADDR[host], self.root / host,
                            self.coord_list, None, opts)
            self.procs[host] = proc
            await proc.start()

        await self.spawn_on(host, boot())
        self.log(f"start {host}")

    def crash_host(self, host: str) -> None:
        """SIGKILL: the network forgets the host, its stores close where they
        stand (no graceful step runs: any later I/O of its tasks fails), and
        every task of the host is cancelled."""
        self.crashed.add(host)
        self.net.crash(host)
        proc = self.procs.pop(host, None)
        if proc is not None:
            if host in self.coord_hosts:
                if proc.db is not None:
                    proc.db.close()
            else:
                proc.registry.close()
        for t in list(self.tasks.get(host, {})):
            t.cancel()
        self.log(f"crash {host}")

    # -- several coordinators (--coordinators 3)
    def leader_host(self) -> str | None:
        """The coordinator holding the election key on the store now (None: nobody)."""
        holder = self.etcd.holder() if self.etcd is not None else None
        if holder is None:
            return None
        from coordinator.election import leader_of_value

        address = leader_of_value(holder)
        return next((h for h in self.coord_hosts if self.addr[h] == address), None)

    def coord_host(self, target: str) -> str:
        """A fault's target as a host: "coord" (the base schedule's) and "leader"
        are the leader now, "follower" one of the others; any other as is."""
        if self.etcd is None or target not in ("coord", "leader", "follower"):
            return target
        leader = self.leader_host() or self.coord_hosts[0]
        if target == "follower":
            return self.ha_rng.choice([h for h in self.coord_hosts if h != leader])
        return leader

    def coord_target(self) -> str:
        """Where the sim's own coordinator RPCs go: the leader (as the store says) or the first one."""
        if self.etcd is None:
            return ADDR["coord"]
        return self.addr[self.leader_host() or self.coord_hosts[0]]

    async def wait_leader(self, bound_s: float) -> None:
        """Until a coordinator leads and has taken over its term (bounded)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + bound_s
        while loop.time() < give_up:
            host = self.leader_host()
            proc = self.procs.get(host) if host is not None else None
            if proc is not None and proc.servicer is not None and proc.servicer.leads():
                return
            await asyncio.sleep(0.05)
        raise SimFailure(f"no coordinator leads within {bound_s:.0f} s")

    def store_cut(self, host: str, on: bool) -> None:
        """Cut ``host`` from the store (or heal it); overlapping cuts: healed by the last one."""
        n = self.store_cuts.get(host, 0) + (1 if on else -1)
        self.store_cuts[host] = n
        if on and n == 1:
            self.etcd.cut(host)
        elif not on and n == 0:
            self.etcd.heal(host)

    async def ha_fault(self, f: Fault) -> None:
        if f.kind == "kill_coord":
            host = self.coord_host(f.target)
            self.log(f"kill_coord: {host} ({f.target}) killed for {f.duration_s:.3f} s")
            await self.crash_for(host, f.duration_s)
        elif f.kind == "cut_store":
            # It still reaches the nodes and the clients: the stale-leader case
            # when it leads (it must stop acting before another one is elected,
            # and every write it still sends must be refused by the fence).
            host = self.coord_host(f.target)
            self.log(f"cut_store: {host} ({f.target}) cut from the store for {f.duration_s:.3f} s")
            self.store_cut(host, True)
            await asyncio.sleep(f.duration_s)
            self.store_cut(host, False)
        elif f.kind == "pause_store":
            self.store_pauses += 1
            if self.store_pauses == 1:
                self.etcd.pause()
            await asyncio.sleep(f.duration_s)
            self.store_pauses -= 1
            if self.store_pauses == 0:
                self.etcd.resume()

    # -- faults
    async def crash_for(self, host: str, duration_s: float, wipe: bool = False,
                        meanwhile: Callable[[], Any] | None = None) -> None:
        """Crash ``host`` and restart it after ``duration_s`` (``meanwhile``
        first, if given), with an empty data dir if ``wipe`` (a replaced
        disk). Overlapping crashes of one host: it stays down until the last
        one ends."""
        self.down_count[host] = self.down_count.get(host, 0) + 1
        if self.down_count[host] == 1:
            self.crash_host(host)
        if wipe:
            self.wipe_pending.add(host)
        if meanwhile is not None:
            await meanwhile()
        await asyncio.sleep(duration_s)
        self.down_count[host] -= 1
        if self.down_count[host] == 0:
            if host in self.wipe_pending:  # (an overlapping crash's wipe counts too)
                self.wipe_pending.discard(host)
                shutil.rmtree(self.root / host, ignore_errors=True)
                (self.root / host).mkdir()
                self.node_epochs.pop(host, None)  # a new store starts its own epoch record
                self.disks_replaced += 1
                self.lineage_seen.pop(host, None)
                self.log(f"disk of {host} replaced (empty data dir)")
            await self.start_host(host)

    def may_lose_data_of(self, host: str) -> bool:
        """True when the other replica certainly holds every acknowledged
        write, so that ``host``'s disk may be destroyed without losing one:
        the pair is in sync (on the primary's own view: it acknowledges a
        write only once the secondary has it), or ``host`` is the secondary
        of a primary that serves (it acknowledged every write itself)."""
        from syncrep.core.pairstate import PairState

        # The coordinator's record now (the checker's last look may miss a
        # promotion just made); while it is down, never (one may be under way).
        if self.coordinator_pair() is None:
            return False
        # After a forced promote each replica may hold acknowledged writes the
        # other lacks, until the resolve says which are discarded.
        if self.split_pending:
            return False
        self.check_invariants()
        pv = self.primary_volume()
        if pv is None or self.primary_host in self.crashed:
            return False
        if host != self.primary_host:
            return True
        # In sync on the primary's view, and the secondary still holds it all:
        # a secondary that just crashed (or whose disk is being replaced) may
        # not have been noticed yet, with every acknowledged write only on the
        # two disks.
        other = self.role_host("secondary")
        return bool(pv.state is PairState.IN_SYNC and other not in self.crashed and other not in self.wipe_pending)

    async def lose_primary(self, f: Fault) -> None:
        """The primary is lost for good (for ``duration_s``, i.e. past the
        schedule's faults): a promotion must happen, automatically or through
        the coordinator's Promote RPC (retried while refused: the old
        primary's lease runs). It returns afterwards, with its data, or with
        a replaced disk when the other replica held every acknowledged write."""
        host = self.role_host("primary")
        other = self.role_host("secondary")
        wipe = self.may_lose_data_of(host) and self.rng.random() < 0.5
        self.log(f"lose_primary({host}): {'promote by RPC' if f.target == 'promote' else 'auto-failover'}, "
                 f"returns {'with an empty data dir' if wipe else 'with its data'}")

        async def promote() -> None:
            from syncrep.core.pairstate import PairState

            loop = asyncio.get_running_loop()
            give_up = loop.time() + ROLE_WAIT_S
            while loop.time() < give_up:
                self.check_invariants()  # follows the coordinator's record
                pair = self.coordinator_pair()
                if self.primary_host == other or (pair is not None and pair.state is not PairState.IN_SYNC):
                    break  # promoted; or not in sync, and nothing promotes without --force
                if f.target == "promote":
                    msg = await self.promote_rpc()
                    if msg:
                        self.log(f"promote: {msg}")
                await asyncio.sleep(0.5)
            self.log(f"lose_primary({host}): primary is {self.primary_host}")

        await self.crash_for(host, f.duration_s, wipe=wipe, meanwhile=promote)

    async def switchover(self, f: Fault) -> None:
        """The operator's planned role swap (docs/FAILOVER.md section 5), the
        workload running: the coordinator's Switchover RPC, from the client
        host. "in_sync": asked once the pair is in sync (bounded wait), when
        it should swap with no write lost; "any": asked as things are. Either
        way a refusal (FAILED_PRECONDITION, UNAVAILABLE: not in sync, a node
        down, the handover not drained in time) must leave the pair as it was;
        the checks that run all along say whether it did (no acknowledged
        write lost, never two nodes acknowledging, replicas equal when back
        in sync)."""
        from syncrep.core.pairstate import PairState

        if f.target == "in_sync":
            loop = asyncio.get_running_loop()
            give_up = loop.time() + SWITCHOVER_WAIT_IN_SYNC_S
            while loop.time() < give_up:
                pair, pv = self.coordinator_pair(), self.primary_volume()
                if (pair is not None and pair.state is PairState.IN_SYNC and pv is not None
                        and pv.state is PairState.IN_SYNC):
                    break
                await asyncio.sleep(0.05)
            else:
                self.log(f"switchover: the pair was not in sync within {SWITCHOVER_WAIT_IN_SYNC_S:.0f} s; "
                         "asking anyway")
        # As an operator would: "in_sync" asks again (a few times) when told
        # to retry in a moment (a node has not applied or reported its
        # assignment yet); "any" takes the first answer.
        for attempt in range(SWITCHOVER_ATTEMPTS if f.target == "in_sync" else 1):
            if attempt:
                await asyncio.sleep(0.5)
            old = self.primary_host
            msg, retry = await self.switchover_rpc()
            self.check_invariants()  # follows the swap (primary_host)
            self.log(f"switchover: {msg}; primary {old} -> {self.primary_host}")
            if not retry:
                break

    async def switchover_rpc(self) -> tuple[str, bool]:
        """One Switchover(volume) call. Returns what it said (a refusal is a
        normal outcome; any other error is logged as such), and whether the
        refusal says to retry."""
        import grpc

        from syncrep import rpc
        from syncrep.pb import syncrep_pb2 as pb
        from syncrep.pb import syncrep_pb2_grpc as pbg

        try:
            async with rpc.channel(self.coord_target()) as ch:
                r = await pbg.CoordinatorServiceStub(ch).Switchover(
                    pb.SwitchoverRequest(volume=VOLUME), timeout=SWITCHOVER_RPC_S)
        except grpc.aio.AioRpcError as e:
            what = "refused" if e.code() in (grpc.StatusCode.FAILED_PRECONDITION,
                                             grpc.StatusCode.UNAVAILABLE) else "failed"
            self.switchovers_refused += 1
            return f"{what}: {e.code().name}: {e.details()}", "retry" in (e.details() or "")
        except Exception as e:  # (the sim network raises only AioRpcError; say so if not)
            self.switchovers_refused += 1
            return f"failed: {type(e).__name__}: {e}", False
        self.switchovers += 1
        return f"switched over, write stall {r.stall_s * 1000:.1f} ms (drain {r.drain_s * 1000:.1f} ms)", False

    async def promote_rpc(self, force: bool = False) -> str:
        """One Promote(volume, force) call, from the client host. Returns what it said."""
        from syncrep import rpc
        from syncrep.pb import syncrep_pb2 as pb
        from syncrep.pb import syncrep_pb2_grpc as pbg

        try:
            async with rpc.channel(self.coord_target()) as ch:
                r = await pbg.CoordinatorServiceStub(ch).Promote(pb.PromoteRequest(volume=VOLUME, force=force),
                                                                 timeout=2.0)
        except Exception as e:
            code = getattr(e, "code", None)
            details = getattr(e, "details", None)
            return f"refused: {code() if callable(code) else type(e).__name__}: " \
                   f"{details() if callable(details) else e}"
        return f"promoted: {r.message or 'ok'}"

    # -- forced promote and resolve (docs/FAILOVER.md sections 3 and 6)
    def note_alone_ack(self, host: str, generation: int, writes: list[Any]) -> None:
        """``writes`` (the primary's queued writes) were just acknowledged by
        ``host`` alone, under a lease at ``generation``."""
        if self.workload is None:
            return
        for w in writes:
            if not w.fut.done() or w.fut.cancelled() or w.fut.exception() is not None:
                continue
            d = decode_block(w.data[:BLOCK], self.seed, w.offset, BLOCK)
            if d.kind == "block":
                self.alone_acks[(d.writer, d.version)] = (host, generation)

    def _down(self, host: str) -> None:
        """Crash ``host`` until the matching ``_up`` (overlapping crashes: the last one restarts it)."""
        self.down_count[host] = self.down_count.get(host, 0) + 1
        if self.down_count[host] == 1:
            self.crash_host(host)

    async def _up(self, host: str) -> None:
        self.down_count[host] -= 1
        if self.down_count[host] == 0:
            await self.start_host(host)

    def identity_of(self, host: str) -> set[int]:
        """The generations of ``host``'s replica (current and history); while
        it is down, the last ones seen (by this or the periodic check)."""
        node = self.procs.get(host)
        if node is not None and host not in self.crashed:
            with contextlib.suppress(Exception):
                ident = node.registry.get(VOLUME).identity
                self.lineage_seen[host] = {ident.current, *ident.history} - {0}
        return set(self.lineage_seen.get(host, set()))

    async def forced_promote(self, f: Fault) -> None:
        """The secondary misses writes (crashed, cut off, or mid-resync), the
        primary is lost, the secondary is force-promoted (Promote force=True,
        retried while the old primary's lease runs) and takes writes, the old
        primary returns with its data: split brain. Then Resolve keeps a side
        chosen at random, and the pair resyncs. The writes the discarded side
        acknowledged after the divergence are allowed to be missing at the
        end, exactly those (see Resolved). Skipped (a no-op) while a node is
        down or the coordinator is: the fault is about a clean split."""
        from syncrep.core.pairstate import PairState

        loop = asyncio.get_running_loop()
        give_up = loop.time() + FORCED_START_WAIT_S
        while True:
            busy = [h for h in self.hosts if h in self.crashed or self.down_count.get(h, 0)]
            if not busy and not self.failover_active and self.coordinator_pair() is not None:
                break
            if loop.time() >= give_up:
                self.log(f"forced_promote: skipped ({', '.join(busy) + ' down' if busy else 'another failover'} "
                         f"for {FORCED_START_WAIT_S:.0f} s)")
                return
            await asyncio.sleep(0.1)
        self.check_invariants()  # the roles as the coordinator records them now
        old, new = self.role_host("primary"), self.role_host("secondary")
        self.failover_active += 1
        self.forcing += 1
        self.split_pending += 1
        resolved = False
        try:
            self.log(f"forced_promote({f.target}): {new} misses writes, {old} writes alone for "
                     f"{f.duration_s:.3f} s, then is lost and {new} is force-promoted")
            isolated: list[tuple[str, str]] = []
            if f.target in ("partition", "isolated"):
                self.net.cut(old, new)
                self.net.cut(new, old)
                await asyncio.sleep(f.duration_s)
                if f.target == "isolated":
                    # Lost but alive: its write path runs, the client reaches
                    # it; it must stop acknowledging once its lease ended.
                    isolated = [(old, new), (new, old)]
                    for c in self.coord_hosts:
                        isolated += [(old, c), (c, old)]
                        self.net.cut(old, c)
                        self.net.cut(c, old)
                else:
                    self._down(old)
                    self.net.heal(old, new)
                    self.net.heal(new, old)
            elif f.target == "degraded":
                self._down(new)
                await asyncio.sleep(f.duration_s)
                self._down(old)
                await self._up(new)
            else:  # "resync": the old primary is lost while the resync to the secondary runs
                self._down(new)
                await asyncio.sleep(f.duration_s)
                await self._up(new)
                give_up = loop.time() + RESYNC_TRIGGER_WAIT_S
                while not self.triggered("resync") and loop.time() < give_up:  # noqa: ASYNC110 - polls product state on virtual time
                    await asyncio.sleep(0.001)
                pv = self.primary_volume()
                self.log(f"forced_promote: {old} is lost with the pair "
                         f"{'resyncing' if self.triggered('resync') else getattr(pv, 'state', 'unknown')}")
                self._down(old)
            # Force-promote the secondary, retried while refused (the old primary's lease runs).
            give_up = loop.time() + ROLE_WAIT_S
            while loop.time() < give_up:
                self.check_invariants()  # follows the coordinator's record (primary_host)
                if self.primary_host == new:
                    break
                msg = await self.promote_rpc(force=True)
                self.log(f"promote --force: {msg}")
                if msg.startswith("promoted"):
                    # (Not forced when the coordinator held the pair in sync:
                    # then the old primary acknowledged nothing alone.)
                    self.forced_promotions += "(forced:" in msg
                    continue
                await asyncio.sleep(0.5)
            if self.primary_host != new:
                self.log(f"forced_promote: {new} was not promoted within {ROLE_WAIT_S:.0f} s")
            else:
                await asyncio.sleep(self.rng.uniform(0.5, 2.0))  # the new primary takes writes alone
            if isolated:
                for a, b in isolated:
                    self.net.heal(a, b)
            else:
                await self._up(old)  # returns with its data
            give_up = loop.time() + SPLIT_WAIT_S
            state = None
            while loop.time() < give_up:
                pair = self.coordinator_pair()
                state = None if pair is None else pair.state
                if state in (PairState.SPLIT_BRAIN, PairState.RESYNCING, PairState.IN_SYNC):
                    break  # (resyncing, in sync: the old primary was demoted the ordinary way)
                await asyncio.sleep(0.1)
            if state is not PairState.SPLIT_BRAIN:
                # (The promoted secondary was current after all: the old
                # primary is demoted and resynced the ordinary way, and no
                # write may be missing.)
                self.log(f"forced_promote: no split brain (pair {getattr(state, 'value', state)}): the "
                         "promoted secondary was current; nothing to resolve")
                return
            self.log(f"forced_promote: split brain: {ADDR[self.primary_host]} primary, "
                     f"{ADDR[self.role_host('secondary')]} secondary")
            resolved = await self.resolve(self.rng.choice([old, new]))
        finally:
            self.failover_active -= 1
            self.forcing -= 1
            pair = self.coordinator_pair()
            if resolved or pair is None or pair.state is not PairState.SPLIT_BRAIN:
                self.split_pending -= 1
            else:
                # An unresolved split brain: the run fails at the end (never
                # back in sync); no disk may be replaced meanwhile.
                self.log("forced_promote: the split brain was not resolved")

    async def resolve(self, keep: str) -> bool:
        """Resolve(keep): a dry run (logged), then the real run, each retried
        while refused (until both nodes report the split). Records what the
        reply says was discarded (Resolved). True once resolved."""
        from syncrep.core.pairstate import PairState

        loop = asyncio.get_running_loop()
        give_up = loop.time() + RESOLVE_WAIT_S
        dry = None
        while loop.time() < give_up and dry is None:
            dry, msg = await self.resolve_rpc(keep, dry_run=True)
            self.log(f"resolve --keep {ADDR[keep]} (dry run): {msg}")
            if dry is None:
                await asyncio.sleep(0.5)
        if dry is None:
            return False
        host_of = {ADDR[h]: h for h in ("node-a", "node-b")}
        epoch_before = getattr(self.coordinator_pair(), "epoch", 0)
        other = "node-b" if keep == "node-a" else "node-a"
        while loop.time() < give_up:
            lineage, other_lineage = self.identity_of(keep), self.identity_of(other)
            reply, msg = await self.resolve_rpc(keep, dry_run=False)
            self.log(f"resolve --keep {ADDR[keep]}: {msg}")
            if reply is None:
                pair = self.coordinator_pair()
                if pair is not None and pair.state is not PairState.SPLIT_BRAIN and pair.epoch > epoch_before:
                    # Applied, its answer lost on the way: the dry run's figures stand in.
                    self.log("resolve: applied but its answer was lost; the dry run's report stands in")
                    reply = dry
                else:
                    await asyncio.sleep(0.5)
                    continue
            lineage |= self.identity_of(keep)
            break
        else:
            return False
        kept, discarded = host_of[reply.kept], host_of[reply.discarded]
        if keep != kept:
            raise SimFailure(f"resolve --keep {ADDR[keep]} kept {reply.kept}")
        if reply.common_generation not in lineage:
            raise SimFailure(f"resolve: the common generation {reply.common_generation:016x} is not one of the "
                             f"kept replica's ({kept}: {sorted(lineage)})")
        after = {k for k, (host, gen) in self.alone_acks.items() if host == discarded and gen not in lineage}
        r = Resolved(kept, discarded, reply.common_generation,
                     [(e.offset, e.length) for e in reply.discarded_extents], reply.discarded_exact, after,
                     snapshot_name=reply.discard_snapshot, resolved_at=time.time(),
                     kept_branch={k for k, (host, gen) in self.alone_acks.items()
                                  if host == kept and other_lineage and gen not in other_lineage})
        node = self.procs.get(discarded)
        if reply.discard_snapshot_id and node is not None and discarded not in self.crashed:
            with contextlib.suppress(Exception):
                r.snapshot = read_all_blocks(node.registry.get(VOLUME).store, reply.discard_snapshot_id)
        self.resolves.append(r)
        self.log(f"resolve: kept {kept}, discarded {discarded}: {len(r.extents)} extents, {reply.discarded_bytes} "
                 f"bytes ({'exact' if r.exact else 'not exact'}) since the common generation {r.common:016x}, "
                 f"snapshot {r.snapshot_name!r} ({'read' if r.snapshot is not None else 'not read'}); "
                 f"{len(after)} writes {discarded} acknowledged after the divergence may be missing")
        return True

    async def resolve_rpc(self, keep: str, dry_run: bool) -> tuple[Any, str]:
        """One Resolve(volume, keep, dry_run) call. Returns (the reply or None, what it said)."""
        from syncrep import rpc
        from syncrep.pb import syncrep_pb2 as pb
        from syncrep.pb import syncrep_pb2_grpc as pbg

        try:
            async with rpc.channel(self.coord_target()) as ch:
                r = await pbg.CoordinatorServiceStub(ch).Resolve(
                    pb.ResolveRequest(volume=VOLUME, keep=ADDR[keep], dry_run=dry_run), timeout=10.0)
        except Exception as e:
            code = getattr(e, "code", None)
            details = getattr(e, "details", None)
            return None, (f"refused: {code().name if callable(code) else type(e).__name__}: "
                          f"{details() if callable(details) else e}")
        return r, r.message

    def checked_history(self) -> History:
        """The workload's history as the end check reads it: the writes a
        resolve discarded (Resolved: acknowledged by the discarded side after
        the divergence, inside its reported extents) count as indeterminate,
        they may be missing; every other acknowledged write must be there.
        Fails when an exact report left out such a write."""
        import dataclasses

        hist = self.history
        if not self.resolves:
            return hist
        discarded: set[tuple[int, int]] = set()
        ops = hist.op_index()
        for r in self.resolves:
            for key in r.after_divergence:
                op = ops.get(key)
                if op is None or op.indeterminate:
                    continue
                if r.covers(op.offset, op.nblocks * BLOCK):
                    discarded.add(key)
                elif r.exact:
                    raise SimFailure(
                        f"resolve: w{op.writer}v{op.version} (offset {op.offset}, {op.nblocks} blocks), "
                        f"acknowledged by {r.discarded} alone after the divergence, lies outside the "
                        f"{len(r.extents)} extents the resolve reported exactly as discarded")
        return History(hist.seed, hist.block_size,
                       [dataclasses.replace(o, status="discarded") if (o.writer, o.version) in discarded else o
                        for o in hist.ops])

    def check_discarded(self, blocks: dict[int, bytes]) -> str:
        """The discarded writes missing from ``blocks`` (the final volume) must
        be in the resolve's snapshot of the discarded side. Returns a summary."""
        ops = self.history.op_index()
        missing = kept = 0
        for r in self.resolves:
            for key in sorted(r.after_divergence):
                op = ops.get(key)
                if op is None or op.indeterminate:
                    continue
                gone = []
                for b in op.blocks(BLOCK):
                    d = decode_block(blocks[b], self.seed, b * BLOCK, BLOCK)
                    if d.kind != "block" or d.version < op.version:
                        gone.append(b)
                if not gone:
                    kept += 1
                    continue
                missing += 1
                if r.snapshot is None:
                    continue
                for b in gone:
                    d = decode_block(r.snapshot[b], self.seed, b * BLOCK, BLOCK)
                    if d.kind != "block" or d.writer != op.writer or d.version < op.version:
                        raise SimFailure(
                            f"resolve: w{op.writer}v{op.version}, discarded, is not in the snapshot "
                            f"{r.snapshot_name!r} of {r.discarded}: block {b} holds "
                            f"{describe_block(r.snapshot[b], b * BLOCK, BLOCK)}")
        return (f"{missing} discarded writes missing (in the resolve's snapshot), "
                f"{kept} still present" if self.resolves else "")

    def triggered(self, trigger: str) -> bool:
        from syncrep.core.pairstate import PairState

        pv = self.primary_volume()
        if trigger == "resync":
            return pv is not None and pv.state is PairState.RESYNCING
        if trigger == "final_round":
            return pv is not None and pv.state is PairState.RESYNCING and pv._gate_holds > 0
        return True

    async def run_fault(self, f: Fault) -> None:
        await asyncio.sleep(f.at_s)
        if f.trigger != "time":
            # Wait (bounded) for the moment the trigger names; if it never comes, inject anyway.
            loop = asyncio.get_running_loop()
            give_up = loop.time() + 3.0
            while not self.triggered(f.trigger) and loop.time() < give_up:  # noqa: ASYNC110 - polls product state on virtual time
                await asyncio.sleep(0.005)
        self.check_invariants()  # roles as the coordinator records them now ("primary", "secondary")
        self.log(f"fault {f}")
        if f.kind == "crash":
            await self.crash_for(self.coord_host(f.target), f.duration_s)
        elif f.kind in ("hang", "link_down"):
            # Both cut the host off both ways. A real SIGSTOP also freezes the
            # host's timers; here they keep running (see the module docstring).
            target = self.coord_host(f.target)
            others = [h for h in (*self.hosts, "client") if h != target]
            for o in others:
                self.net.cut(target, o)
                self.net.cut(o, target)
            if self.etcd is not None and target in self.coord_hosts:
                self.store_cut(target, True)  # (cut off from everything: the store too)
            await asyncio.sleep(f.duration_s)
            for o in others:
                self.net.heal(target, o)
                self.net.heal(o, target)
            if self.etcd is not None and target in self.coord_hosts:
                self.store_cut(target, False)
        elif f.kind in ("partition", "partition_oneway"):
            a, b = f.target.replace(">", "|").split("|")
            pairs = [(a, b)] if f.kind == "partition_oneway" else [(a, b), (b, a)]
            for x, y in pairs:
                self.net.cut(x, y)
            await asyncio.sleep(f.duration_s)
            for x, y in pairs:
                self.net.heal(x, y)
        elif f.kind == "corrupt":
            # Resync chunks from the primary arrive with one byte flipped (their
            # crc32c still says what was sent): the secondary must refuse each
            # and never apply it; the primary re-sends. A brief crash of the
            # secondary first, so that there is a resync to corrupt.
            self.corrupting += 1
            await self.crash_for(self.role_host("secondary"), 0.3)
            await asyncio.sleep(f.duration_s)
            self.corrupting -= 1
        elif f.kind == "disk_full":
            self.disk_full(self.role_host(f.target), True)
            await asyncio.sleep(f.duration_s)
            self.disk_full(self.role_host(f.target), False)
        elif f.kind in ("lose_primary", "isolate_primary") and self.forcing:
            # (A second loss of the primary in the middle of a forced promote
            # tells nothing more, and muddles which side wrote what.)
            self.log(f"{f.kind}: skipped (a forced promote is under way)")
        elif f.kind == "lose_primary":
            self.failover_active += 1
            try:
                await self.lose_primary(f)
            finally:
                self.failover_active -= 1
        elif f.kind == "isolate_primary":
            # The primary is cut from the coordinator and its secondary, but
            # the client still reaches it: it must acknowledge nothing alone
            # (no lease lets it), and the coordinator promotes the secondary
            # once the lease certainly expired (the volume is --auto-failover).
            host = self.role_host("primary")
            others = [h for h in self.hosts if h != host]
            self.failover_active += 1
            for o in others:
                self.net.cut(host, o)
                self.net.cut(o, host)
            await asyncio.sleep(f.duration_s)
            for o in others:
                self.net.heal(host, o)
                self.net.heal(o, host)
            self.failover_active -= 1
        elif f.kind == "switchover":
            await self.switchover(f)
        elif f.kind == "forced_promote":
            await self.forced_promote(f)
        elif f.kind in HA_KINDS:
            await self.ha_fault(f)
        elif f.kind == "replace_disk":
            host = self.role_host(f.target)
            wipe = self.may_lose_data_of(host)
            self.log(f"replace_disk({host}): {'the disk is replaced' if wipe else 'only a crash'} "
                     f"({'the other replica holds every acknowledged write' if wipe else 'it may hold the only copy'})")
            await self.crash_for(host, f.duration_s, wipe=wipe)
        self.log(f"fault over {f.kind}({f.target})")

    def _tamper(self, src: str, dst: str, method: str, message: Any) -> Any:
        if src == "client" and method.endswith("/Write"):
            # Which node each writer's write went to last, and whom the
            # coordinator's record (read now, not the checker's last look)
            # named primary then; unknown while the coordinator is down (see check_ack).
            w = min(message.offset // (BLOCKS * BLOCK // WRITERS), WRITERS - 1)
            pair = self.coordinator_pair()
            named: tuple[str, int] = ("", 0)
            if pair is not None:
                host = pair.primary.split(":")[0]
                node = self.procs.get(host)
                pv = node.primaries.get(VOLUME) if node is not None and host not in self.crashed else None
                # Only once the named node has applied its promotion (its
                # write path runs at the pair's epoch; the promotion fenced the
                # old primary's stream first). Until then it is still the
                # secondary taking the old primary's stream, so the old
                # primary's in-sync acks are on it: nothing can be lost. (A
                # promotion the coordinator recorded while its own link was
                # down reaches the node later: seed 5969.)
                if pv is not None and pv.lv.epoch >= pair.epoch:
                    named = (host, pair.epoch)
            self.write_sent[w] = (dst.split(":")[0], *named)
        if not (self.corrupting and method.endswith("/Resync") and message.HasField("chunk")
                and message.chunk.data and self.rng.random() < 0.5):
            return message
        bad = type(message)()
        bad.CopyFrom(message)
        data = bytearray(bad.chunk.data)
        data[self.rng.randrange(len(data))] ^= 0x40
        bad.chunk.data = bytes(data)
        self.chunks_corrupted += 1
        return bad

    def disk_full(self, host: str, on: bool) -> None:
        if not on:
            for undo in self.disk_full_undo:
                undo()
            self.disk_full_undo.clear()
            return
        node = self.procs.get(host)
        if node is None:
            return
        for lv in node.registry.volumes.values():
            store = lv.store

            def full(*_: Any, **__: Any) -> Any:
                raise OSError(errno.ENOSPC, "No space left on device (sim)")

            for name in ("write_batch", "create_snapshot"):
                store.__dict__[name] = full
                self.disk_full_undo.append(_undo_attr(store.__dict__, name))

    # -- workload
    async def run_workload(self, stop: asyncio.Event) -> None:
        """The shared workload (deploy/workload.py): WRITERS sequential writers,
        each on its own region, every write recorded before it is sent."""
        from syncrep import client as sc

        loop = asyncio.get_running_loop()
        wl = Workload(
            lambda: sc.VolumeClient.connect(self.coord_list, VOLUME, write_timeout_s=5.0),
            seed=self.seed, regions=split_regions(BLOCKS * BLOCK, WRITERS, BLOCK), block_size=BLOCK,
            max_blocks=MAX_WRITE_BLOCKS, t0=loop.time(),
        )
        self.workload = wl

        async def writer(w: int) -> None:
            rng = random.Random(f"sim-pace-{self.seed}-{w}")
            while not stop.is_set():
                await self.writing.wait()
                self.inflight += 1
                try:
                    await wl.write_one(w)
                    if not self.check_ack(w):
                        return
                except sc.ClientError:
                    pass  # recorded as failed (indeterminate) by the workload
                finally:
                    self.inflight -= 1
                await asyncio.sleep(rng.uniform(0.02, 0.25))

        try:
            await asyncio.gather(*(writer(w) for w in range(WRITERS)))
        finally:
            if wl.client is not None:
                await wl.client.close()

    def check_ack(self, w: int) -> bool:
        """Two nodes never acknowledge writes for the volume at once: a write
        sent to a node after the coordinator had named the other one primary
        must not be acknowledged by it (its lease ended before the promotion,
        and it cannot replicate to the promoted node, which fences its epoch).
        The end check cannot see such an ack once a later write overwrote it.
        (Conservative: the sim learns of a promotion a little after it
        happens, and a node promoted back meanwhile may ack.) False: the
        run failed (the main task raises it at its next check; a writer
        task that raised would leave its exception unretrieved)."""
        if self.failure is not None:
            return False
        try:
            self.check_invariants()  # self.primary_host: the coordinator's record now
        except SimFailure as e:
            self.failure = str(e)
            return False
        node, primary_then, epoch_then = self.write_sent[w]
        if primary_then and node != primary_then and node != self.primary_host:
            self.failure = (f"{node} acknowledged a write of writer {w} sent to it after the coordinator "
                             f"had named {primary_then} primary (epoch {epoch_then})")
            return False
        return True

    @property
    def history(self) -> History:
        assert self.workload is not None
        return self.workload.history

    # -- checks
    def primary_volume(self) -> Any:
        """The write path of the node the coordinator names primary (None while it is down)."""
        node = self.procs.get(self.primary_host)
        return None if node is None or self.primary_host in self.crashed else node.primaries.get(VOLUME)

    def stores(self) -> dict[str, Any]:
        out = {}
        for host in ("node-a", "node-b"):
            node = self.procs.get(host)
            if node is not None and host not in self.crashed:
                try:
                    out[host] = node.registry.get(VOLUME).store
                except Exception:
                    pass
        return out

    def coordinator_pair(self) -> Any:
        if self.etcd is not None:
            # Several coordinators: the record is the store's (whoever wrote it).
            from coordinator.etcd_store import DEFAULT_PREFIX, _pair_from_json

            kv = self.etcd.kv.get(f"{DEFAULT_PREFIX}volumes/{VOLUME}".encode())
            return None if kv is None else _pair_from_json(json.loads(kv.value)["pair"])
        c = self.procs.get("coord")
        if c is None or c.db is None:
            return None
        return c.db.get_pair(VOLUME)

    def check_invariants(self) -> None:
        from syncrep.core.pairstate import PairState

        if self.failure is not None:
            raise SimFailure(self.failure)
        if self.etcd is not None:
            if self.etcd.violations:
                raise SimFailure(f"store audit: {self.etcd.violations[0]}")
            # Never two coordinators acting as leader at once (one virtual
            # clock: a deposed leader's view ends before the store expires its
            # lease, so before anyone else can win).
            leading = [h for h in self.coord_hosts if h not in self.crashed and self._acts_as_leader(h)]
            if len(leading) > 1:
                raise SimFailure(f"two coordinators act as leader at once: {leading} (the store's key: "
                                 f"{self.leader_host()})")
        pair = self.coordinator_pair()
        if pair is not None:
            if pair.epoch < self.coord_epoch:
                raise SimFailure(f"the coordinator's epoch went back from {self.coord_epoch} to {pair.epoch}")
            host_of = {ADDR[h]: h for h in ("node-a", "node-b")}
            if pair.primary not in host_of or pair.secondary not in host_of or pair.primary == pair.secondary:
                raise SimFailure(f"the coordinator records primary {pair.primary}, secondary {pair.secondary}")
            if host_of[pair.primary] != self.primary_host:
                # A role change is a promotion: always at a newer epoch.
                if pair.epoch <= self.coord_epoch:
                    raise SimFailure(f"the primary moved to {pair.primary} without a new epoch ({pair.epoch})")
                self.primary_host = host_of[pair.primary]
                # (Seen within CHECK_EVERY_S of the record changing: a swap
                # is still in sync then, a promotion is degraded at once.)
                swap = pair.state is PairState.IN_SYNC
                if swap:
                    self.role_swaps += 1
                else:
                    self.promotions += 1
                self.log(f"{'switchover' if swap else 'promotion'}: the coordinator names {self.primary_host} "
                         f"primary at epoch {pair.epoch} (state {pair.state.value})")
            self.coord_epoch = pair.epoch
            if pair.state is PairState.IN_SYNC:
                for r in self.resolves:
                    r.converged_at = min(r.converged_at, time.time())
        for host, store in self.stores().items():
            lv = self.procs[host].registry.get(VOLUME)
            if lv.epoch < self.node_epochs.get(host, 0):
                raise SimFailure(f"{host}'s epoch went back from {self.node_epochs[host]} to {lv.epoch}")
            self.node_epochs[host] = lv.epoch
            if self.split_pending:
                self.identity_of(host)  # remembered for a resolve that answers while it is down
            if host != self.primary_host:
                # (A node that is not the coordinator's primary may still
                # have a write path: an isolated primary not yet told. It
                # acknowledges nothing alone without a lease; the proof is
                # the end check: every acknowledged write is in the volume.)
                for snap in store.list_snapshots():
                    if snap.name.startswith("pre-resync-") and snap.name not in self.rollback_checked:
                        self.check_rollback_point(store, snap, host)

    def _acts_as_leader(self, host: str) -> bool:
        """``servicer.leads()`` without its side effect (it forgets a lapsed
        term): the checker must not change what the coordinator does."""
        proc = self.procs.get(host)
        servicer = proc.servicer if proc is not None else None
        lead = servicer.leadership if servicer is not None else None
        if lead is None:
            return False
        term = lead.term()
        return term is not None and lead.is_leader() and term == servicer._term  # type: ignore[union-attr]

    def check_rollback_point(self, store: Any, snap: Any, host: str) -> None:
        """A rollback point must be a state the primary had (crash-consistent
        per writer: deploy/checker.py). One the discarded side of a resolve
        took before the pair was back in sync holds that side's branch: the
        kept side's writes since the divergence are not in it."""
        if self.workload is None:
            return
        import dataclasses

        blocks = read_all_blocks(store, snap.id)
        now = asyncio.get_running_loop().time() - self.workload.t0
        hist = self.history
        other = set().union(*(r.kept_branch for r in self.resolves if r.discarded == host
                              and r.resolved_at <= snap.created_at < r.converged_at))
        if other:
            hist = History(hist.seed, hist.block_size,
                           [dataclasses.replace(o, status="other branch") if (o.writer, o.version) in other else o
                            for o in hist.ops])
        report = check_rollback_point(hist, blocks, name=snap.name, captured_at=now)
        if not report.ok:
            raise SimFailure(report.summary())
        self.rollback_checked.add(snap.name)

    def in_sync_and_quiet(self) -> bool:
        self.check_invariants()  # also follows a promotion (primary_host)
        pv = self.primary_volume()
        pair = self.coordinator_pair()
        if pv is None or pair is None or self.inflight or len(self.stores()) < 2:
            return False
        if self.procs[self.role_host("secondary")].primaries.get(VOLUME) is not None:
            return False  # the old primary has not taken its demotion yet
        from syncrep.core.pairstate import PairState

        link = pv.link
        return (pv.state is PairState.IN_SYNC and pair.state == PairState.IN_SYNC and link is not None
                and not link.failed and link.window.inflight_count == 0)

    def compare_replicas(self, where: str) -> None:
        s = self.stores()
        a, b = read_all_blocks(s[self.role_host("primary")]), read_all_blocks(s[self.role_host("secondary")])
        differ = [blk for blk in range(BLOCKS) if a[blk] != b[blk]]
        if differ:
            d = differ[0]
            raise SimFailure(f"{where}: replicas differ in {len(differ)} blocks, first {d}: primary "
                             f"{self.primary_host} holds "
                             f"{describe_block(a[d], d * BLOCK, BLOCK)}, secondary "
                             f"{describe_block(b[d], d * BLOCK, BLOCK)}")
        if self.workload is not None:
            report = check_blocks(self.checked_history(), a)
            if not report.ok:
                raise SimFailure(f"{where}: {report.summary()}")
            if where == "final" and self.resolves:
                self.log(f"final: {self.check_discarded(a)}")

    async def checker(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                self.check_invariants()
            except SimFailure as e:
                # The main task raises it at its next check (it awaits this one only at the end).
                self.failure = self.failure or str(e)
                return
            await asyncio.sleep(CHECK_EVERY_S)

    async def wait_in_sync(self, bound_s: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + bound_s
        while loop.time() < deadline:
            if self.in_sync_and_quiet():
                return True
            await asyncio.sleep(0.05)
        return False

    # -- the run
    async def run(self, faults: list[Fault]) -> None:
        from syncrep import rpc
        from syncrep.pb import syncrep_pb2 as pb
        from syncrep.pb import syncrep_pb2_grpc as pbg

        for h in self.hosts:
            await self.start_host(h)
        if self.etcd is not None:
            await self.wait_leader(10.0)
        async with rpc.channel(self.coord_target()) as ch:
            for _ in range(50):
                try:
                    await pbg.CoordinatorServiceStub(ch).CreateVolume(pb.CreateVolumeRequest(
                        name=VOLUME, size_bytes=BLOCKS * BLOCK, block_size=BLOCK,
                        primary=ADDR["node-a"], secondary=ADDR["node-b"],
                        resync_mode=self.rng.choice([pb.RESYNC_MODE_DIRECT, pb.RESYNC_MODE_REWRITE]),
                        auto_failover=self.auto_failover),
                        timeout=5.0)
                    break
                except Exception as e:
                    details = getattr(e, "details", None)
                    detail = f": {details() if callable(details) else e}" if self.etcd is not None else ""
                    self.log(f"create volume: {type(e).__name__}{detail}")
                    await asyncio.sleep(0.2)
            else:
                raise SimFailure("could not create the volume")
        self.log(f"volume created (auto-failover {'on' if self.auto_failover else 'off'})")
        if not await self.wait_in_sync(10.0):
            raise SimFailure("the new pair did not become in sync")
        stop = asyncio.Event()
        self.writing.set()
        wl = self.spawn_on("client", self.run_workload(stop))
        ck = self.spawn_on("client", self.checker(stop))
        fault_tasks = [self.spawn_on("client", self.run_fault(f)) for f in faults]
        # Pauses: the workload stops, the pair must come back in sync and the
        # replicas must then be identical.
        loop = asyncio.get_running_loop()
        end = loop.time() + self.length_s
        while loop.time() < end:
            await asyncio.sleep(self.rng.uniform(1.0, 4.0))
            self.writing.clear()
            if await self.wait_in_sync(2.0):
                self.compare_replicas("pause")
                self.log(f"pause: in sync, replicas identical ({self.history.acked} acks)")
            self.writing.set()
        await asyncio.gather(*fault_tasks)
        self.writing.clear()
        for h in self.hosts:
            if h not in self.procs:
                await self.start_host(h)
        if not await self.wait_in_sync(SETTLE_MAX_S):
            pv = self.primary_volume()
            raise SimFailure(f"not back in sync within {SETTLE_MAX_S:.0f} s after the faults ended "
                             f"(primary state {None if pv is None else pv.state}, "
                             f"coordinator {getattr(self.coordinator_pair(), 'state', None)})")
        stop.set()
        self.writing.set()
        await wl
        await ck
        if not await self.wait_in_sync(SETTLE_MAX_S):
            raise SimFailure("not in sync after the last writes")
        self.check_invariants()
        self.compare_replicas("final")
        self.log(f"final: in sync, replicas identical; {self.history.acked} writes acknowledged, "
                 f"{self.history.indeterminate} indeterminate, {self.chunks_corrupted} resync chunks corrupted "
                 f"in transit, {self.promotions} promotions, {self.role_swaps} switchovers "
                 f"({self.switchovers_refused} refused), {self.disks_replaced} disks replaced; "
                 f"primary {self.primary_host}")
        if self.etcd is not None:
            self.log(f"final: store audit clean; {self.etcd.leader_changes} changes of the election key, "
                     f"{self.etcd.fenced_refusals} writes refused by their fence, revision {self.etcd.revision}")

    async def shutdown(self) -> None:
        for host in list(self.procs):
            self.crash_host(host)
        await asyncio.sleep(0)


# ---------------------------------------------------------------- driving


_current_loop: list[VirtualTimeLoop] = []
_real_monotonic = time.monotonic


def _virtual_monotonic() -> float:
    return _current_loop[0].time() if _current_loop else _real_monotonic()


def _virtual_time() -> float:
    return 1_700_000_000.0 + _virtual_monotonic()


@contextlib.contextmanager
def _patched(sim_holder: list[Sim], loop: VirtualTimeLoop, seed: int) -> Iterator[None]:
    """Route every clock, thread hop and random id of the product code through the simulation."""
    from syncrep import rpc, volumes

    rng = random.Random(seed ^ 0xC0FFEE)
    # The module-level generator too: the coordinator draws its backoff
    # jitter from it (random.random(), tenacity's wait_exponential_jitter).
    # Unseeded, a retry's delay differed from run to run (seen as a trace of
    # seed 1029 that was not the same twice once its schedule met a failed
    # StartResync). Restored afterwards.
    saved_random = random.getstate()
    random.seed(seed ^ 0x5EEDED)
    _current_loop[:] = [loop]
    saved_time = (time.monotonic, time.time)
    # Patched before the coordinator's module is first imported: its
    # ``clock=time.monotonic`` default is bound at import, and must be the
    # virtual clock (which reads the current schedule's loop, so binding it
    # once serves every later schedule of this process too).
    time.monotonic = _virtual_monotonic
    time.time = _virtual_time
    from coordinator import service
    from primary.volume import PrimaryVolume

    saved = (*saved_time, asyncio.to_thread, secrets.token_hex, rpc.transport,
             volumes.io_executor_factory, volumes.new_generation, service.new_volume_uuid,
             PrimaryVolume._acknowledge_alone)
    ack_alone = PrimaryVolume._acknowledge_alone

    async def acknowledge_alone(self: PrimaryVolume, batch: list[Any]) -> None:
        # Which writes a primary acknowledges alone, and at which generation:
        # the resolve's checker allows exactly those of the discarded side
        # after the divergence to be missing. Its lease wait returns either
        # because the lease lets it write alone or because a resync completed
        # (then the write is on both nodes); nothing runs between that return
        # and the check below, so the lease still says which.
        waiting = [w for w in batch if not w.fut.done()]
        await ack_alone(self, batch)
        if waiting and self.may_write_alone():
            sim_holder[0].note_alone_ack(current_host.get(), self.lv.identity.current, waiting)

    async def to_thread(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        sim_holder[0].check_alive(current_host.get())
        return func(*args, **kwargs)

    # Functions that read the CURRENT loop, not this one: code that captured
    # time.monotonic earlier (a default argument bound at import, during an
    # earlier schedule of this process) must still see the running schedule's time.

    asyncio.to_thread = to_thread  # type: ignore[assignment]
    secrets.token_hex = lambda n=16: "".join(f"{rng.randrange(256):02x}" for _ in range(n or 16))  # type: ignore[assignment]
    rpc.transport = sim_holder[0].net
    volumes.io_executor_factory = lambda name: _InlineExecutor(sim_holder[0])
    # Generation ids and volume UUIDs appear in logs and decide nothing by
    # their value, but the trace must be byte-identical on every run.
    volumes.new_generation = lambda: rng.randrange(1, 2**63)
    service.new_volume_uuid = lambda: f"{rng.getrandbits(128):032x}"
    PrimaryVolume._acknowledge_alone = acknowledge_alone  # type: ignore[method-assign]
    try:
        yield
    finally:
        (time.monotonic, time.time, asyncio.to_thread, secrets.token_hex, rpc.transport,  # type: ignore[assignment]
         volumes.io_executor_factory, volumes.new_generation, service.new_volume_uuid, _) = saved
        PrimaryVolume._acknowledge_alone = saved[-1]  # type: ignore[method-assign]
        random.setstate(saved_random)
        _current_loop.clear()


class _TraceHandler(logging.Handler):
    """Product log lines (WARNING and up) into the trace, with virtual time and
    the temp root replaced, so the trace is the same on every run."""

    def __init__(self, sim: Sim) -> None:
        super().__init__(TRACE_LOG_LEVEL)
        self.sim = sim

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage().replace(str(self.sim.root), "$ROOT").replace(f"pid {os.getpid()}", "pid $PID")
            self.sim.log(f"{current_host.get():7s} {record.levelname} {record.name}: {msg}")
        except Exception:
            pass


#: ``--tls`` (inherited by the worker processes): every call carries its host's certificate identity.
TLS_ENV = "SYNCREP_SIM_TLS"
_IDENTITIES: dict[str, dict[str, list[bytes]]] = {}


def _sim_identity(host: str) -> dict[str, list[bytes]]:
    """``host``'s auth_context() on a mutual-TLS server: a node certificate
    naming the host for the node and coordinator hosts, the admin's client
    certificate for every other caller (the workload, the checker). Real
    certificates (syncrep.certs, the `syncrep cert` code), made once per
    process: key generation is slow, and they decide nothing by their bytes."""
    who = host if host in (*HOSTS, *COORD_HOSTS_HA) else "admin"
    auth = _IDENTITIES.get(who)
    if auth is None:
        from syncrep import certs

        d = Path(tempfile.mkdtemp(prefix="syncrep-sim-certs-"))
        try:
            ca_key = d / "ca.key"
            if not (d / "ca.crt").exists():
                certs.create_ca(d, ca_key)
            if who == "admin":
                certs.create_client_cert(d, ca_key, "admin")
                crt = (d / "client.admin.crt").read_bytes()
                auth = {"x509_common_name": [b"admin"], "x509_subject_alternative_name": []}
            else:
                certs.create_node_cert(d, ca_key, [who])
                crt = (d / "node.crt").read_bytes()
                auth = {"x509_common_name": [certs.NODE_CN.encode()],
                        "x509_subject_alternative_name": [who.encode()]}
        finally:
            shutil.rmtree(d, ignore_errors=True)
        auth.update(transport_security_type=[b"ssl"], x509_pem_cert=[crt])
        _IDENTITIES[who] = auth
    return auth


def run_seed(seed: int, length_s: float = 8.0, coordinators: int = 1,
             tls: bool | None = None) -> tuple[bool, list[str], dict[str, Any]]:
    """One schedule (``coordinators``: 1 on SQLite, or 3 on the in-memory etcd;
    ``tls``: every call carries its host's certificate identity and every
    server authorizes it, default from $SYNCREP_SIM_TLS). Returns (passed,
    trace lines, stats)."""
    if tls is None:
        tls = os.environ.get(TLS_ENV) == "1"
    trace: list[str] = []
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    root = Path(tempfile.mkdtemp(prefix=f"syncrep-sim-{seed}-", dir=base))
    loop = VirtualTimeLoop()
    sim = Sim(seed, root, trace, length_s, coordinators)
    if tls:
        # Made here, before the clocks and secrets are patched: a certificate
        # made inside a schedule would draw from its random stream.
        for who in (*HOSTS, *COORD_HOSTS_HA, "admin"):
            _sim_identity(who)
        sim.net.identities = _sim_identity
    holder = [sim]
    faults = make_schedule(seed, length_s)
    ha_faults = make_ha_schedule(seed, length_s) if coordinators != 1 else []
    # Auto-failover where a fault needs it, and in a quarter of the others
    # (there, short faults must never trigger a promotion that loses a write).
    sim.auto_failover = (any(f.kind == "isolate_primary" or (f.kind, f.target) == ("lose_primary", "auto")
                             for f in faults) or random.Random(seed ^ 0xFA11).random() < 0.25)
    handler = _TraceHandler(sim)
    root_logger = logging.getLogger()
    old_level = root_logger.level
    root_logger.addHandler(handler)
    root_logger.setLevel(TRACE_LOG_LEVEL)
    ok = True
    try:
        with _patched(holder, loop, seed):
            asyncio.set_event_loop(loop)
            loop.set_task_factory(sim.task_factory)  # type: ignore[arg-type]
            trace.append(f"seed {seed} schedule: " + ("; ".join(map(str, faults)) or "no faults"))
            if tls:
                trace.append("mutual TLS identities on every call; every server authorizes (syncrep.authz)")
            if coordinators != 1:
                trace.append(f"{coordinators} coordinators on the in-memory etcd; their faults: "
                             + "; ".join(map(str, ha_faults)))

            async def main() -> None:
                try:
                    await sim.run(faults + ha_faults)
                finally:
                    await sim.shutdown()

            try:
                loop.run_until_complete(asyncio.wait_for(main(), 3600.0))
            except (SimFailure, SimDeadlock, TimeoutError) as e:
                ok = False
                trace.append(f"FAILED: {type(e).__name__}: {e}")
            except Exception as e:
                ok = False
                trace.append(f"FAILED: {type(e).__name__}: {e}")
                trace.extend(traceback.format_exc().splitlines())
            finally:
                for bucket in sim.tasks.values():
                    for t in list(bucket):
                        t.cancel()
                with contextlib.suppress(Exception):
                    loop.run_until_complete(asyncio.sleep(0))
                with contextlib.suppress(Exception):
                    loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()
                asyncio.set_event_loop(None)
    finally:
        root_logger.removeHandler(handler)
        root_logger.setLevel(old_level)
        shutil.rmtree(root, ignore_errors=True)
    hist = sim.workload.history if sim.workload is not None else None
    stats = {"seed": seed, "faults": [f.kind for f in faults], "acks": hist.acked if hist else 0,
             "indeterminate": hist.indeterminate if hist else 0, "promotions": sim.promotions,
             "switchovers": sim.switchovers, "role_swaps": sim.role_swaps,
             "switchovers_refused": sim.switchovers_refused, "forced_promotions": sim.forced_promotions,
             "resolves": [(r.kept, r.discarded, len(r.after_divergence)) for r in sim.resolves],
             "disks_replaced": sim.disks_replaced}
    if sim.etcd is not None:
        stats.update(ha_faults=[f.kind for f in ha_faults], leader_changes=sim.etcd.leader_changes,
                     fenced_refusals=sim.etcd.fenced_refusals)
    return ok, trace, stats


def _trace_name(seed: int, coordinators: int) -> str:
    return f"sim-seed-{seed}.trace" if coordinators == 1 else f"sim-seed-{seed}-c{coordinators}.trace"


def _run_many(seeds: list[int], length_s: float, trace_dir: Path,
              coordinators: int = 1) -> tuple[int, int, list[str]]:
    passed = failed = 0
    messages: list[str] = []
    for seed in seeds:
        ok, trace, _ = run_seed(seed, length_s, coordinators)
        if ok:
            passed += 1
        else:
            failed += 1
            path = trace_dir / _trace_name(seed, coordinators)
            path.write_text("\n".join(trace) + "\n")
            mode = ("" if coordinators == 1 else f" --coordinators {coordinators}") + (
                " --tls" if os.environ.get(TLS_ENV) == "1" else "")
            messages.append(f"seed {seed} FAILED: {trace[-1]}  (trace: {path}; replay: "
                            f"python -m deploy.sim --seed {seed}{mode} --trace)")
    return passed, failed, messages


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.sim", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=0, help="run this many schedules")
    ap.add_argument("--first-seed", type=int, default=1, help="first seed of --seeds / --duration (default 1)")
    ap.add_argument("--seed", type=int, help="run one schedule")
    ap.add_argument("--trace", action="store_true", help="with --seed: print the run's trace")
    ap.add_argument("--duration", help="run schedules until this much wall time passed, e.g. 10m, 90s")
    ap.add_argument("--schedule-s", type=float, default=8.0,
                    help="virtual seconds in which the faults start (default 8)")
    ap.add_argument("--jobs", type=int, default=1, help="parallel worker processes (default 1)")
    ap.add_argument("--coordinators", type=int, choices=(1, 3), default=1,
                    help="1 coordinator on SQLite (default), or 3 on the simulated etcd (leader election, "
                         "fencing; their kills, cuts from the store and store pauses as faults)")
    ap.add_argument("--tls", action="store_true",
                    help="every call carries its host's mutual-TLS certificate identity (real certificates, "
                         "no encryption) and every server runs the authorization table (syncrep.authz), "
                         f"as the real processes do (also ${TLS_ENV}=1)")
    ap.add_argument("--trace-dir", type=Path, default=Path(tempfile.gettempdir()),
                    help="where failing schedules' traces are written (default the temp dir)")
    args = ap.parse_args(argv)
    if args.tls:
        os.environ[TLS_ENV] = "1"  # the worker processes (and a re-exec) inherit it
    if os.environ.get("PYTHONHASHSEED") != "0":
        # str hashing is randomised per process; a set of strings would then
        # iterate differently on every run. Same seed, same run: re-execute.
        os.execve(sys.executable, [sys.executable, "-m", "deploy.sim", *(argv or sys.argv[1:])],
                  {**os.environ, "PYTHONHASHSEED": "0"})
    if args.seed is not None:
        ok, trace, _ = run_seed(args.seed, args.schedule_s, args.coordinators)
        if args.trace:
            sys.stdout.write("\n".join(trace) + "\n")
        if not ok:
            path = args.trace_dir / _trace_name(args.seed, args.coordinators)
            path.write_text("\n".join(trace) + "\n")
            print(f"seed {args.seed} FAILED: {trace[-1]} (trace: {path})", file=sys.stderr)
        print(f"schedules 1 passed {int(ok)} failed {int(not ok)}")
        return 0 if ok else 1
    t0 = time.monotonic()
    messages: list[str]
    if args.duration:
        unit = {"s": 1, "m": 60, "h": 3600}[args.duration[-1]] if args.duration[-1] in "smh" else 1
        budget = float(args.duration.rstrip("smh")) * unit
        passed = failed = 0
        messages = []
        seed = args.first_seed
        while time.monotonic() - t0 < budget:
            p, f, m = _run_many([seed], args.schedule_s, args.trace_dir, args.coordinators)
            passed, failed, messages = passed + p, failed + f, messages + m
            seed += 1
    else:
        seeds = list(range(args.first_seed, args.first_seed + args.seeds))
        if args.jobs > 1 and len(seeds) > 1:
            chunks = [seeds[i::args.jobs] for i in range(args.jobs)]
            with concurrent.futures.ProcessPoolExecutor(args.jobs) as ex:
                results = list(ex.map(_run_many, chunks, [args.schedule_s] * len(chunks),
                                      [args.trace_dir] * len(chunks), [args.coordinators] * len(chunks)))
            passed = sum(r[0] for r in results)
            failed = sum(r[1] for r in results)
            messages = [m for r in results for m in r[2]]
        else:
            passed, failed, messages = _run_many(seeds, args.schedule_s, args.trace_dir, args.coordinators)
    for msg in messages:
        print(msg, file=sys.stderr)
    elapsed = time.monotonic() - t0
    rate = (passed + failed) / elapsed * 60 if elapsed > 0 else 0.0
    print(f"{elapsed:.1f} s wall, {rate:.0f} schedules/min, {args.jobs} job(s)")
    print(f"schedules {passed + failed} passed {passed} failed {failed}")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
