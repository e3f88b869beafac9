"""The deterministic simulator (after TigerBeetle's VOPR): seeded schedules of
faults against the REAL coordinator, primary and secondary, on virtual time.

    python -m deploy.sim --seeds 1000 [--first-seed S] [--jobs 2]
    python -m deploy.sim --seed S --trace           # the run, event by event, on stdout
    python -m deploy.sim --duration 10m              # as many seeds as fit

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
copy loses writes by definition). Never a forced promote (see below).
The client writes through the coordinator-following ``VolumeClient``.

Checked while it runs (every ``CHECK_EVERY_S``):
  * epochs only grow (coordinator record and each node's persisted epoch);
  * the coordinator names one of the two nodes primary, the other secondary;
    the primary moves only by a promotion, at a newer epoch;
  * at most one node acknowledges writes for the volume: a write sent to a
    node after the coordinator named the other one primary is never
    acknowledged by it (an isolated or lost old primary holds no lease);
  * the replicas are identical whenever the pair is in sync and quiet
    (checked at every pause of the workload);
  * every rollback point (``pre-resync-*`` on the secondary) holds only
    versions that were written, none newer than the newest write (no garbage).
And at the end, after every fault healed and the pair is back in sync: the
replicas are identical block for block and no acknowledged write is lost
(each block holds the latest acknowledged version or a later indeterminate one).

Not simulated: ``Promote --force``. It promotes a stale secondary, loses
what it lacked, and leaves the pair split brain until ``syncrep resolve``:
the checker would have to accept exactly the loss the promotion reports.

Exit status 0 only when every schedule passed; a failure prints the seed and
the path of its trace.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import errno
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.checker import check_rollback_point
from deploy.simnet import SimNet, current_host
from deploy.workload import History, Workload, blocks_from_bytes, check_blocks, describe_block, split_regions

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
#: Failover faults last long enough for the lease to expire and the secondary
#: to be promoted (node_timeout_s 3 + lease_s 4 + lease_drift_s 0.5 on the coordinator).
FAILOVER_S = (9.0, 14.0)
ROLE_WAIT_S = 30.0  # bounded wait for a promotion the fault expects
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
    return faults


# ---------------------------------------------------------------- the simulation


def read_all_blocks(store: Any, snapshot_id: int | None = None) -> dict[int, bytes]:
    return blocks_from_bytes(store.read_at(snapshot_id, 0, BLOCKS * BLOCK), 0, BLOCK, range(BLOCKS))



def _undo_attr(d: dict[str, Any], name: str) -> Callable[[], None]:
    return lambda: d.pop(name, None) and None



class Sim:
    def __init__(self, seed: int, root: Path, trace: list[str], length_s: float) -> None:
        self.seed = seed
        self.root = root
        self.trace = trace
        self.length_s = length_s
        self.rng = random.Random(seed)
        self.net = SimNet(random.Random(seed ^ 0x5EED))
        self.crashed: set[str] = set()
        self.tasks: dict[str, dict[asyncio.Task[Any], None]] = {h: {} for h in (*HOSTS, "client")}
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
        self.promotions = 0
        self.disks_replaced = 0
        self.auto_failover = False
        self.write_sent: dict[int, tuple[str, str, int]] = {}
        self.wipe_pending: set[str] = set()  # crashed hosts that restart with an empty data dir

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

        self.crashed.discard(host)

        async def boot() -> None:
            # Built inside the host's context: its server, channels and tasks belong to it.
            proc: Any
            if host == "coord":
                proc = Coordinator(ADDR["coord"], self.root / "coord", node_timeout_s=3.0,
                                   resync_retry_max_s=5.0)
            else:
                opts = NodeOptions(durability="os", ack_timeout_s=1.0, connect_attempts=3,
                                   resync_chunk_bytes=16 * 1024, final_diff_threshold_bytes=16 * 1024,
                                   snapshot_period_s=self.snapshot_period_s)
                proc = Node("primary" if host == "node-a" else "secondary", ADDR[host], self.root / host,
                            ADDR["coord"], None, opts)
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
            if host == "coord":
                if proc.db is not None:
                    proc.db.close()
            else:
                proc.registry.close()
        for t in list(self.tasks.get(host, {})):
            t.cancel()
        self.log(f"crash {host}")

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

    async def promote_rpc(self) -> str:
        """One Promote(volume) call (never forced), from the client host. Returns what it said."""
        from syncrep import rpc
        from syncrep.pb import syncrep_pb2 as pb
        from syncrep.pb import syncrep_pb2_grpc as pbg

        try:
            async with rpc.channel(ADDR["coord"]) as ch:
                r = await pbg.CoordinatorServiceStub(ch).Promote(pb.PromoteRequest(volume=VOLUME), timeout=2.0)
        except Exception as e:
            code = getattr(e, "code", None)
            details = getattr(e, "details", None)
            return f"refused: {code() if callable(code) else type(e).__name__}: " \
                   f"{details() if callable(details) else e}"
        return f"promoted: {r.message or 'ok'}"

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
            await self.crash_for(f.target, f.duration_s)
        elif f.kind in ("hang", "link_down"):
            # Both cut the host off both ways. A real SIGSTOP also freezes the
            # host's timers; here they keep running (see the module docstring).
            others = [h for h in (*HOSTS, "client") if h != f.target]
            for o in others:
                self.net.cut(f.target, o)
                self.net.cut(o, f.target)
            await asyncio.sleep(f.duration_s)
            for o in others:
                self.net.heal(f.target, o)
                self.net.heal(o, f.target)
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
        elif f.kind == "lose_primary":
            await self.lose_primary(f)
        elif f.kind == "isolate_primary":
            # The primary is cut from the coordinator and its secondary, but
            # the client still reaches it: it must acknowledge nothing alone
            # (no lease lets it), and the coordinator promotes the secondary
            # once the lease certainly expired (the volume is --auto-failover).
            host = self.role_host("primary")
            others = [h for h in HOSTS if h != host]
            for o in others:
                self.net.cut(host, o)
                self.net.cut(o, host)
            await asyncio.sleep(f.duration_s)
            for o in others:
                self.net.heal(host, o)
                self.net.heal(o, host)
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
            lambda: sc.VolumeClient.connect(ADDR["coord"], VOLUME, write_timeout_s=5.0),
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
        c = self.procs.get("coord")
        if c is None or c.db is None:
            return None
        return c.db.get_pair(VOLUME)

    def check_invariants(self) -> None:
        if self.failure is not None:
            raise SimFailure(self.failure)
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
                self.promotions += 1
                self.log(f"promotion: the coordinator names {self.primary_host} primary at epoch {pair.epoch} "
                         f"(state {pair.state.value})")
            self.coord_epoch = pair.epoch
        for host, store in self.stores().items():
            lv = self.procs[host].registry.get(VOLUME)
            if lv.epoch < self.node_epochs.get(host, 0):
                raise SimFailure(f"{host}'s epoch went back from {self.node_epochs[host]} to {lv.epoch}")
            self.node_epochs[host] = lv.epoch
            if host != self.primary_host:
                # (A node that is not the coordinator's primary may still
                # have a write path: an isolated primary not yet told. It
                # acknowledges nothing alone without a lease; the proof is
                # the end check: every acknowledged write is in the volume.)
                for snap in store.list_snapshots():
                    if snap.name.startswith("pre-resync-") and snap.name not in self.rollback_checked:
                        self.check_rollback_point(store, snap)

    def check_rollback_point(self, store: Any, snap: Any) -> None:
        """A rollback point must be a state the primary had (crash-consistent
        per writer: deploy/checker.py)."""
        if self.workload is None:
            return
        blocks = read_all_blocks(store, snap.id)
        now = asyncio.get_running_loop().time() - self.workload.t0
        report = check_rollback_point(self.history, blocks, name=snap.name, captured_at=now)
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
            report = check_blocks(self.history, a)
            if not report.ok:
                raise SimFailure(f"{where}: {report.summary()}")

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

        for h in HOSTS:
            await self.start_host(h)
        async with rpc.channel(ADDR["coord"]) as ch:
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
                    self.log(f"create volume: {type(e).__name__}")
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
        for h in HOSTS:
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
                 f"in transit, {self.promotions} promotions, {self.disks_replaced} disks replaced; "
                 f"primary {self.primary_host}")

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
    _current_loop[:] = [loop]
    saved_time = (time.monotonic, time.time)
    # Patched before the coordinator's module is first imported: its
    # ``clock=time.monotonic`` default is bound at import, and must be the
    # virtual clock (which reads the current schedule's loop, so binding it
    # once serves every later schedule of this process too).
    time.monotonic = _virtual_monotonic
    time.time = _virtual_time
    from coordinator import service

    saved = (*saved_time, asyncio.to_thread, secrets.token_hex, rpc.transport,
             volumes.io_executor_factory, volumes.new_generation, service.new_volume_uuid)

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
    try:
        yield
    finally:
        (time.monotonic, time.time, asyncio.to_thread, secrets.token_hex, rpc.transport,  # type: ignore[assignment]
         volumes.io_executor_factory, volumes.new_generation, service.new_volume_uuid) = saved
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


def run_seed(seed: int, length_s: float = 8.0) -> tuple[bool, list[str], dict[str, Any]]:
    """One schedule. Returns (passed, trace lines, stats)."""
    trace: list[str] = []
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    root = Path(tempfile.mkdtemp(prefix=f"syncrep-sim-{seed}-", dir=base))
    loop = VirtualTimeLoop()
    sim = Sim(seed, root, trace, length_s)
    holder = [sim]
    faults = make_schedule(seed, length_s)
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

            async def main() -> None:
                try:
                    await sim.run(faults)
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
             "disks_replaced": sim.disks_replaced}
    return ok, trace, stats


def _run_many(seeds: list[int], length_s: float, trace_dir: Path) -> tuple[int, int, list[str]]:
    passed = failed = 0
    messages: list[str] = []
    for seed in seeds:
        ok, trace, _ = run_seed(seed, length_s)
        if ok:
            passed += 1
        else:
            failed += 1
            path = trace_dir / f"sim-seed-{seed}.trace"
            path.write_text("\n".join(trace) + "\n")
            messages.append(f"seed {seed} FAILED: {trace[-1]}  (trace: {path}; replay: "
                            f"python -m deploy.sim --seed {seed} --trace)")
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
    ap.add_argument("--trace-dir", type=Path, default=Path(tempfile.gettempdir()),
                    help="where failing schedules' traces are written (default the temp dir)")
    args = ap.parse_args(argv)
    if os.environ.get("PYTHONHASHSEED") != "0":
        # str hashing is randomised per process; a set of strings would then
        # iterate differently on every run. Same seed, same run: re-execute.
        os.execve(sys.executable, [sys.executable, "-m", "deploy.sim", *(argv or sys.argv[1:])],
                  {**os.environ, "PYTHONHASHSEED": "0"})
    if args.seed is not None:
        ok, trace, _ = run_seed(args.seed, args.schedule_s)
        if args.trace:
            sys.stdout.write("\n".join(trace) + "\n")
        if not ok:
            path = args.trace_dir / f"sim-seed-{args.seed}.trace"
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
            p, f, m = _run_many([seed], args.schedule_s, args.trace_dir)
            passed, failed, messages = passed + p, failed + f, messages + m
            seed += 1
    else:
        seeds = list(range(args.first_seed, args.first_seed + args.seeds))
        if args.jobs > 1 and len(seeds) > 1:
            chunks = [seeds[i::args.jobs] for i in range(args.jobs)]
            with concurrent.futures.ProcessPoolExecutor(args.jobs) as ex:
                results = list(ex.map(_run_many, chunks, [args.schedule_s] * len(chunks),
                                      [args.trace_dir] * len(chunks)))
            passed = sum(r[0] for r in results)
            failed = sum(r[1] for r in results)
            messages = [m for r in results for m in r[2]]
        else:
            passed, failed, messages = _run_many(seeds, args.schedule_s, args.trace_dir)
    for msg in messages:
        print(msg, file=sys.stderr)
    elapsed = time.monotonic() - t0
    rate = (passed + failed) / elapsed * 60 if elapsed > 0 else 0.0
    print(f"{elapsed:.1f} s wall, {rate:.0f} schedules/min, {args.jobs} job(s)")
    print(f"schedules {passed + failed} passed {passed} failed {failed}")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
