"""Fuzz every RPC of protos/syncrep.proto with hypothesis (issue 11, "Hardening (tests)").

One real cluster for the whole module (coordinator, primary, secondary as
processes; nodes WITHOUT --enable-fault-injection), one volume pair ``vol0``
(16 MiB) in sync with known data written. Then, for every RPC of every
service, derived from ``syncrep_pb2.DESCRIPTOR.services_by_name`` (a new RPC
is fuzzed automatically; ``test_every_rpc_has_a_fuzz_spec`` fails if it has
no entry in ``SPECS`` below):

* ``test_fuzz_fields``: requests with random field values (tests/fuzz_helpers.py:
  integer edges, NaN, 64 KiB and non-ASCII strings, bytes up to 5 MiB,
  unknown enum values, 10**4-entry repeated fields, the real volume's name,
  the real addresses, the current epoch and generation as hints);
* ``test_fuzz_raw_bytes``: random bytes as the serialized request (noise, or a
  real request truncated / with a byte flipped / with junk appended), to every
  process (one that does not serve the service must answer UNIMPLEMENTED);
* ``test_fuzz_streams``: for the streaming RPCs, sequences of messages in any
  order (data before the header, two headers, seq going backwards, huge
  counts), sent complete, cancelled by the client mid-way, or stalled (the
  client stops sending without closing: its short deadline ends the call).

Every call must end with a proper status (OK or a refusal code: ``REFUSALS``;
UNIMPLEMENTED for a service the process does not serve; CANCELLED and
DEADLINE_EXCEEDED only in the cancelled/stalled stream cases), never UNKNOWN
or INTERNAL, never past its deadline; after every batch (one RPC, one kind)
every process still runs, and nothing changed: per-chunk checksums of both
replicas, each node's report of vol0 and its snapshots, and the coordinator's
pair records (state, epoch, primary, secondary, generation, ...) and volume
list equal those taken before the first batch. The module ends by comparing
the replicas block for block and checking every written block.

Excluded, because they are legitimately state-changing when VALID (the
strategies are then rewritten by ``SPECS[...].guard`` into a harmless form, so
the refusal path is still fuzzed):

* WriteOne/Write to vol0: a valid write carries the bytes vol0 already holds
  there (the data does not change; sequence numbers do, and are not compared);
* CreateVolume: a request that would create a pair is renamed to vol0
  (ALREADY_EXISTS) or given the same node twice;
* RegisterNode: a valid registration gets an invalid role hint;
* Heartbeat: never from the real nodes' addresses (their reports drive the
  pair); from unknown addresses, or from a phantom node registered at setup
  when the coordinator lets the test register one (127.0.0.1:1, no volumes:
  its reports about vol0 must change nothing);
* ReportReplication: never from vol0's primary at vol0's epoch;
* Promote: vol0 only while the coordinator says its primary's lease runs
  >= 2 s (then it must be refused), else a name that does not exist;
* Switchover: vol0 only with an invalid handover timeout;
* AssignVolume: vol0 only with its real volume UUID at a stale epoch; other
  names never with ``create`` and a valid name (no new store);
* PrepareHandover: vol0 at its epoch only with ``release`` or an invalid timeout;
* Repair of vol0: at most 1 MiB of valid extents (it re-sends identical data);
* Replicate/Resync into vol0: the opening message carries a stale epoch or
  a wrong geometry (else it would fence the live stream: an accepted stream
  is a real primary's privilege);
* Grant: never for vol0 (renamed to a volume that does not exist); there is
  no grant at setup, so Revoke has nothing to remove (ListGrants is compared);
* DeleteVolume (coordinator and node): never vol0 (renamed to a volume that
  does not exist); ResizeVolume: never a growth of vol0 (a larger size
  becomes a smaller or unaligned one: refused);
* InjectFault: no guard; the nodes run without fault injection, so every
  call must be PERMISSION_DENIED.

Product bugs found by this module, fixed, each kept as a regression test
with its minimal input (``syncrep/rpc.py``'s ``Guard``, every server's
outermost interceptor, and ``VolumeServicer.Write``):

* ``test_undecodable_request_is_invalid_argument``: a request whose bytes do
  not parse got UNKNOWN ("Unexpected <class
  'google.protobuf.message.DecodeError'>", with a traceback logged at ERROR)
  instead of INVALID_ARGUMENT;
* ``test_undecodable_write_stream_message_is_refused``: on VolumeService.Write
  such a message ended the stream OK with the writes unanswered;
* ``test_refusal_of_a_long_name_keeps_its_code``: a refusal that echoed a
  20,000-character argument exceeded gRPC's metadata limit: the client got
  RESOURCE_EXHAUSTED "Stream removed (received metadata size exceeds hard
  limit ...)" instead of the refusal. First cut to 4,096 characters, which
  was not enough: the status message is percent-encoded on the wire, so
  4,096 "é" are 24 KiB (Read, ReadLocal, Checksum and WatchEvents still lost
  the refusal of a name of "é" * 20000). Status messages are now cut to
  ``rpc.MAX_STATUS_DETAILS_BYTES`` as sent, by the guard, for every server;
* ``test_guard_bounds_an_unexpected_exception`` and
  ``test_guard_bounds_the_trailing_metadata`` (an in-process server, no
  cluster): the same loss through the two other ways a reply's trailers grow:
  an exception a handler lets out (grpc.aio answers "Unexpected <class>:
  text", the whole text) and trailing metadata set by a handler.

Every answer is checked for both (``_record``): a refusal lost to the
metadata limit, or a status message longer than ``rpc.MAX_STATUS_DETAILS_BYTES``
on the wire, fails the example.

Not a server bug, counted apart: when a server ends a stream while the client
is still sending, the gRPC client reports INTERNAL "Internal error from Core"
(``Outcome.core_artefact``).

With mutual TLS on (the harness default) the test talks as admin, so the
node-only RPCs (RegisterNode, Heartbeat, ReportReplication) are refused by the
authorisation interceptor (PERMISSION_DENIED) before their handlers: their
guards matter for a cluster run with ``tls=False``.

Run: ``.venv/bin/pytest tests/test_fuzz_rpc.py`` (about a minute on an idle
2-core box; the budget is 4 minutes loaded). Seed:
``SYNCREP_TEST_SEED`` (default 11), printed in the summary with the number of
examples per RPC (``test_zz_fuzz_summary``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import google_crc32c
import grpc
import pytest
from conftest import random_bytes
from e2e_helpers import assert_replicas_identical, check_model
from fuzz_helpers import KiB, LoopThread, MiB, message_class, message_strategy, mutated_bytes
from google.protobuf import descriptor as _d
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hyp_seed
from hypothesis import strategies as st

from deploy.cluster import NAMES, LocalCluster
from syncrep import client as sc
from syncrep import rpc
from syncrep.core import driver
from syncrep.errors import SyncrepError, check_io_range
from syncrep.pb import syncrep_pb2 as pb
from syncrep.pb import syncrep_pb2_grpc as pb_grpc
from syncrep.volumes import NAME_RE

pytestmark = pytest.mark.e2e

VOL = "vol0"
SIZE = 16 * MiB
BS = 4096
MAX_WRITE = 4 * MiB
#: A registered node that does not exist (nothing listens on port 1): heartbeats come "from" it.
PHANTOM = "127.0.0.1:1"
SEED = int(os.environ.get("SYNCREP_TEST_SEED", "11"), 0)

#: gRPC deadline of every fuzz call; the test's own wait is longer (a call that
#: outlives its deadline is a HANG).
CALL_TIMEOUT_S = 10.0
HANG_MARGIN_S = 10.0
#: The deadline of a stalled stream (the client stops sending, never closes).
STALL_DEADLINE_S = 0.4
#: Promote vol0 only while the primary's lease has this long to run (it must be refused).
PROMOTE_LEASE_MARGIN_S = 2.0
#: After the last batch, two node heartbeats (0.5 s each) and some: a change a
#: refused call set off in the background (a fenced stream degrading the pair,
#: say) reaches the coordinator's record by then. Not a guess at a race: the
#: comparison is the same, only later.
SETTLE_S = 1.5

EXAMPLES_FIELDS = 80
EXAMPLES_RAW = 50
EXAMPLES_STREAMS = 60

S = grpc.StatusCode
#: The documented refusals (RESOURCE_EXHAUSTED: gRPC's own message size limit, or a full disk).
REFUSALS = frozenset({
    S.INVALID_ARGUMENT, S.OUT_OF_RANGE, S.FAILED_PRECONDITION, S.NOT_FOUND, S.PERMISSION_DENIED,
    S.UNAUTHENTICATED, S.ALREADY_EXISTS, S.RESOURCE_EXHAUSTED,
})
ALLOWED = REFUSALS | {S.OK}
#: Only where the client cancels or stalls the call.
CLIENT_ENDED = frozenset({S.CANCELLED, S.DEADLINE_EXCEEDED})
#: grpc.aio's answer to a request that does not parse (the known bug, module docstring).
DECODE_ERROR_DETAILS = "Unexpected <class 'google.protobuf.message.DecodeError'>"

SERVED_BY = {
    "syncrep.v1.CoordinatorService": ("coordinator",),
    "syncrep.v1.VolumeService": ("primary", "secondary"),
    "syncrep.v1.ReplicaService": ("primary", "secondary"),
    "syncrep.v1.NodeService": ("primary", "secondary"),
}


@dataclass(frozen=True)
class Method:
    service: str
    name: str
    desc: _d.MethodDescriptor

    @property
    def key(self) -> str:
        return f"{self.service}/{self.name}"

    @property
    def path(self) -> str:
        return f"/{self.key}"

    @property
    def streaming(self) -> bool:
        return bool(self.desc.client_streaming or self.desc.server_streaming)

    @property
    def input(self) -> _d.Descriptor:
        return self.desc.input_type


METHODS = [
    Method(s.full_name, m.name, m)
    for s in pb.DESCRIPTOR.services_by_name.values()
    for m in s.methods
]
STREAMING = [m for m in METHODS if m.streaming]

#: Examples run: COUNTS[(rpc, kind)]; KNOWN_BUG_HITS[rpc]: decode errors tolerated.
COUNTS: collections.Counter[tuple[str, str]] = collections.Counter()
KNOWN_BUG_HITS: collections.Counter[str] = collections.Counter()
#: CODES[rpc][status name]: what the calls ended with (shown in the summary).
CODES: collections.defaultdict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
#: The first answer seen per (rpc, status), for the summary (what the refusals say).
SAMPLES: dict[tuple[str, str], str] = {}
#: Streams the server ended while the client was still sending (Outcome.core_artefact).
ARTEFACTS: collections.Counter[str] = collections.Counter()


# ---------------------------------------------------------------- the live cluster


@dataclass
class Fz:
    """The module's cluster and what the guards and checks need to know of it."""

    loop: LoopThread
    cluster: LocalCluster
    addr: dict[str, str]
    epoch: int
    generation: int
    uuid: str
    model: bytes  # vol0's whole content, as written at setup
    written: dict[int, bytes]  # block -> bytes, the blocks written at setup
    channels: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] = field(default_factory=dict)

    def run(self, coro: Any, what: str, timeout_s: float = CALL_TIMEOUT_S + HANG_MARGIN_S) -> Any:
        return self.loop.run(coro, timeout_s, what)

    def __repr__(self) -> str:  # short: hypothesis prints strategies (and their arguments) on failure
        return f"Fz({self.cluster!r}, epoch {self.epoch})"


async def _setup(workdir: Path) -> Fz:
    cluster = LocalCluster(workdir)
    await cluster.start()
    try:
        await cluster.create_volume(VOL, SIZE, BS)
        model = bytearray(SIZE)
        written: dict[int, bytes] = {}
        plan = []
        # Known data everywhere: the first MiB, then 64 KiB every 512 KiB.
        for i, off in enumerate([0, *range(MiB, SIZE, 512 * KiB)]):
            n = MiB if off == 0 else 64 * KiB
            data = random_bytes(n, f"fuzz-setup-{i}")
            plan.append((off, data))
            model[off:off + n] = data
            for b in range(off // BS, (off + n) // BS):
                written[b] = data[(b * BS - off):(b * BS - off) + BS]
        client = await cluster.connect(VOL)
        try:
            await client.write_many(plan, depth=8)
        finally:
            await client.close()
        st = await cluster.wait_for_volume(VOL, "in_sync", timeout_s=30.0)
        await assert_replicas_identical(cluster, VOL)
        # The phantom node: registered, never heartbeating by itself, in no
        # pair. With mutual TLS only nodes may register (the test talks as
        # admin): then there is no phantom, and Heartbeat is refused anyway.
        async with rpc.channel(cluster.coordinator_addr) as ch:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await pb_grpc.CoordinatorServiceStub(ch).RegisterNode(
                    pb.RegisterNodeRequest(address=PHANTOM, role_hint="secondary", pid=1, version="fuzz"),
                    timeout=CALL_TIMEOUT_S,
                )
        fz = Fz(
            loop=None,  # type: ignore[arg-type]  # set by the fixture
            cluster=cluster,
            addr={n: cluster.address(n) for n in NAMES},
            epoch=int(st.epoch),
            generation=int(st.generation),
            uuid=st.volume_uuid,
            model=bytes(model),
            written=written,
        )
        fz.channels = {n: rpc.channel(a) for n, a in fz.addr.items()}
        return fz
    except BaseException:
        await cluster.close()
        raise


async def _teardown(fz: Fz, failed: bool) -> None:
    for ch in fz.channels.values():
        with contextlib.suppress(Exception):
            await ch.close()
    if failed:
        for name in NAMES:
            print(f"\n--- {name} ({fz.cluster.log_path(name)}), last lines ---\n{fz.cluster.log_tail(name, 40)}")
    await fz.cluster.close()


@pytest.fixture(scope="module")
def fz(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Fz]:
    loop = LoopThread()
    try:
        f = loop.run(_setup(tmp_path_factory.mktemp("fuzz-cluster")), 120.0, "cluster setup")
        f.loop = loop
        f.baseline = f.run(_state(f), "the baseline state")
        failed_before = request.session.testsfailed
        yield f
        loop.run(_teardown(f, request.session.testsfailed > failed_before), 60.0, "cluster teardown")
    finally:
        loop.close()


# ---------------------------------------------------------------- state: what must not change


def _ext(items: Any) -> list[tuple[int, int]]:
    return [(int(e.offset), int(e.length)) for e in items]


def _ident(i: pb.Identity) -> tuple[str, int, tuple[int, ...]]:
    return (i.volume_uuid, int(i.current), tuple(int(h) for h in i.history))


async def _state(fz: Fz) -> dict[str, Any]:
    """Everything a refused call must leave as it was (sequence numbers,
    leases, liveness and timestamps move by themselves and are left out)."""
    t = CALL_TIMEOUT_S
    coord = pb_grpc.CoordinatorServiceStub(fz.channels["coordinator"])
    vols = await coord.ListVolumes(pb.ListVolumesRequest(), timeout=t)
    pairs = {
        v.spec.name: {
            "spec": (int(v.spec.size_bytes), int(v.spec.block_size)),
            "state": pb.PairState.Name(v.state),
            "epoch": int(v.epoch),
            "primary": v.primary,
            "secondary": v.secondary,
            "generation": int(v.generation),
            "secondary_generation": int(v.secondary_generation),
            "volume_uuid": v.volume_uuid,
            "failed_extents": _ext(v.failed_extents),
            "failed_bytes": int(v.failed_bytes),
            "out_of_sync_bytes": int(v.out_of_sync_bytes),
            "fault_snapshot_id": int(v.fault_snapshot_id),
            "resync_mode": int(v.resync_mode),
            "auto_failover": bool(v.auto_failover),
            "last_error": v.last_error,
            "data_missing": (bool(v.primary_data_missing), bool(v.secondary_data_missing)),
            "common_generation": int(v.common_generation),
        }
        for v in vols.volumes
    }
    nodes: dict[str, Any] = {}
    for name in ("primary", "secondary"):
        stub = pb_grpc.NodeServiceStub(fz.channels[name])
        ns = await stub.NodeStatus(pb.NodeStatusRequest(), timeout=t)
        reports = {
            r.name: {
                "role": pb.Role.Name(r.role),
                "epoch": int(r.epoch),
                "state": int(r.state),
                "identity": _ident(r.identity),
                "failed_extents": _ext(r.failed_extents),
                "divergent_extents": _ext(r.divergent_extents),
                "fault_snapshot_id": int(r.fault_snapshot_id),
                "data_missing": bool(r.data_missing),
                "last_error": r.last_error,
                "out_of_sync_bytes": int(r.out_of_sync_bytes),
                "suspended": bool(r.suspended),
                "common_snapshots": int(r.common_snapshots),
                "geometry": (int(r.size_bytes), int(r.block_size)),
            }
            for r in ns.volumes
            # A refused AssignVolume of a name the coordinator does not know
            # is reported missing until the node's next heartbeat reply drops
            # it (syncrep/volumes.py forget_missing); the last test waits for that.
            if not (r.data_missing and r.name not in pairs)
        }
        sums = await stub.Checksum(pb.ChecksumRequest(volume=VOL, chunk_bytes=256 * KiB), timeout=t)
        snaps = await stub.ListSnapshots(pb.ListSnapshotsRequest(volume=VOL), timeout=t)
        nodes[name] = {
            "address": ns.address,
            "reports": reports,
            "checksums": [int(c) for c in sums.crc32c],
            "snapshots": [(int(s.id), s.name) for s in snaps.snapshots],
        }
    return {"volumes": sorted(pairs), "pairs": pairs, "nodes": nodes, "grants": await _grants(fz)}


async def _grants(fz: Fz) -> list[str] | None:
    """Every grant the coordinator stores (None when the proto has no ListGrants)."""
    m = next((m for m in METHODS if m.key == "syncrep.v1.CoordinatorService/ListGrants"), None)
    if m is None:
        return None
    out = await _unary(fz, "coordinator", m, b"")
    assert out.code == S.OK, f"ListGrants: {out}"
    reply = message_class(m.desc.output_type).FromString(out.replies[0])
    return sorted(str(g).replace("\n", " ") for g in reply.grants)  # type: ignore[attr-defined]


def _diff(a: Any, b: Any, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append(f"{where}/{k}: {'absent' if k not in a else a[k]!r} -> "
                           f"{'absent' if k not in b else b[k]!r}")
            else:
                out += _diff(a[k], b[k], f"{where}/{k}")
        return out
    if a != b:
        if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            idx = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
            return [f"{where}: {len(idx)} of {len(a)} entries differ, first at index {idx[0]}: "
                    f"{a[idx[0]]!r} -> {b[idx[0]]!r}"]
        return [f"{where}: {str(a)[:300]} -> {str(b)[:300]}"]
    return []


def check_unchanged(fz: Fz, after: str) -> None:
    """Every process runs and the state equals the baseline (module docstring)."""
    dead = [n for n in NAMES if not fz.cluster.is_running(n)]
    assert not dead, (
        f"CRASH after {after}: {', '.join(dead)} no longer running; last log lines:\n"
        + "\n".join(f"--- {n} ---\n{fz.cluster.log_tail(n, 30)}" for n in dead)
    )
    now = fz.run(_state(fz), f"the state after {after}")
    changes = _diff(fz.baseline, now)
    assert not changes, f"STATE CHANGED after {after}:\n  " + "\n  ".join(changes)


# ---------------------------------------------------------------- calls


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    replies: list[bytes]
    #: A stream the server ended while the client still had messages to send.
    cut_short: bool = False

    @property
    def core_artefact(self) -> bool:
        """What the gRPC client reports when the server ended a stream while
        the client was still sending (the server's own status is lost): not
        the server's answer."""
        return self.cut_short and self.code == S.INTERNAL and self.details == "Internal error from Core"

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details[:500]}"


async def _unary(fz: Fz, target: str, m: Method, body: bytes) -> Outcome:
    call = fz.channels[target].unary_unary(m.path)
    try:
        reply = await call(body, timeout=CALL_TIMEOUT_S)
        return Outcome(S.OK, "", [reply])
    except grpc.aio.AioRpcError as e:
        return Outcome(e.code(), e.details() or "", [])


async def _server_stream(fz: Fz, target: str, m: Method, bodies: list[bytes], mode: str) -> Outcome:
    """A server-streaming RPC (one request, a stream of replies; WatchEvents):
    called as such, with the first body (if none, an empty request through the
    RPC's guard: a client cannot send it zero or several), read to the end
    ("complete"), cancelled once it started ("cancel"), or cut by the short
    deadline ("stall")."""
    body = bodies[0] if bodies else SPECS[m.key].guard(fz, message_class(m.input)(), 0).SerializeToString()
    call = fz.channels[target].unary_stream(m.path)(
        body, timeout=STALL_DEADLINE_S if mode == "stall" else CALL_TIMEOUT_S
    )
    replies: list[bytes] = []
    if mode == "cancel":
        await asyncio.sleep(0)  # let the call start
        call.cancel()
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
        async for r in call:
            replies.append(r)
    code = await call.code()
    return Outcome(code, await call.details() or "", replies)


async def _stream(fz: Fz, target: str, m: Method, bodies: list[bytes], mode: str, stop_at: int) -> Outcome:
    """A bidi stream: ``mode`` "complete" (send all, close, read all),
    "cancel" (send ``stop_at`` messages, cancel), "stall" (send ``stop_at``,
    never close; the short deadline ends it)."""
    if not m.desc.client_streaming:
        return await _server_stream(fz, target, m, bodies, mode)
    call = fz.channels[target].stream_stream(m.path)(
        timeout=STALL_DEADLINE_S if mode == "stall" else CALL_TIMEOUT_S
    )
    replies: list[bytes] = []

    async def reader() -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for r in call:
                replies.append(r)

    rt = asyncio.create_task(reader())
    cut_short = False
    try:
        for i, b in enumerate(bodies):
            if mode != "complete" and i >= stop_at:
                break
            if call.done():
                cut_short = True
                break
            await call.write(b)
        if mode == "complete" and not call.done():
            await call.done_writing()
        elif mode == "cancel":
            if stop_at and replies == [] and not call.done():
                await asyncio.sleep(0)  # let the server see what was sent
            call.cancel()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        cut_short = True  # the server ended the call first: its status is below
    await rt
    code = await call.code()
    return Outcome(code, await call.details() or "", replies, cut_short)


def _too_big_to_send(out: Outcome) -> bool:
    """gRPC's own limit, on the client: the message never left."""
    return out.code == S.RESOURCE_EXHAUSTED and out.details.startswith("CLIENT: Sent message larger than max")


WRITE = "syncrep.v1.VolumeService/Write"


def _decode_error_answer(m: Method, out: Outcome, sent: int) -> bool:
    """The answers of the known bugs to a request that does not parse
    (test_undecodable_*): UNKNOWN "Unexpected DecodeError" (grpc.aio), on a
    stream also what the client sees when that ended the call while it was
    still sending (``Outcome.core_artefact``), and from Write an OK with the
    writes unanswered (its reader task dies, the error is lost)."""
    # Fixed: a request that does not parse gets INVALID_ARGUMENT (an allowed
    # code); what is left is the client's view of a call the server ended
    # while the client was still sending.
    return bool(out.core_artefact)


def _record(m: Method, kind: str, out: Outcome) -> None:
    COUNTS[(m.key, kind)] += 1
    CODES[m.key][out.code.name] += 1
    SAMPLES.setdefault((m.key, out.code.name), out.details[:200])
    # A refusal lost to the client's metadata limit, or a status message that
    # could be (test_refusal_of_a_long_name_keeps_its_code): a failure, whatever the RPC.
    assert not (out.code == S.RESOURCE_EXHAUSTED and "metadata size exceeds" in out.details), (
        f"{m.key}: a reply lost its status to gRPC's metadata limit: {out}")
    assert rpc.status_wire_bytes(out.details) <= rpc.MAX_STATUS_DETAILS_BYTES, (
        f"{m.key}: a status message of {rpc.status_wire_bytes(out.details)} bytes on the wire, more than "
        f"rpc.MAX_STATUS_DETAILS_BYTES ({rpc.MAX_STATUS_DETAILS_BYTES}): {out}")


def _fail(m: Method, target: str, what: str, out: Outcome, req: Any) -> str:
    shown = req if isinstance(req, bytes | list) else f"{type(req).__name__}({str(req)[:1500]})"
    if isinstance(shown, bytes | list):
        shown = repr(shown)[:1500]
    return f"{m.key} to {target} ({fz_addr_hint(target)}): {what}: {out}\nrequest: {shown}"


def fz_addr_hint(target: str) -> str:
    return {"coordinator": "the coordinator", "primary": "vol0's primary", "secondary": "vol0's secondary"}[target]


# ---------------------------------------------------------------- per-RPC specs: targets, hints, guards

Guard = Callable[["Fz", Message, int], Message]
Expect = Callable[["Fz", str, Message, Outcome], str | None]


def _no_guard(fz: Fz, msg: Message, choice: int) -> Message:
    return msg


@dataclass(frozen=True)
class Spec:
    """How to fuzz one RPC: the processes to call, the guard that rewrites a
    request that would validly change state (module docstring; ``choice``
    picks among the harmless rewrites), and extra expectations."""

    guard: Guard = _no_guard
    expect: Expect | None = None


def _valid_write(offset: int, length: int) -> bool:
    return offset % BS == 0 and length % BS == 0 and 0 < length <= MAX_WRITE and offset + length <= SIZE


def guard_write(fz: Fz, msg: Message, choice: int) -> Message:
    assert isinstance(msg, pb.WriteRequest)
    if msg.volume == VOL and _valid_write(msg.offset, len(msg.data)):
        msg.data = fz.model[msg.offset:msg.offset + len(msg.data)]  # what is there already
    return msg


def expect_write_one(fz: Fz, target: str, msg: Message, out: Outcome) -> str | None:
    if out.code == S.OK and target != "primary":
        return "a write accepted by a node that is not vol0's primary"
    return None


def guard_create(fz: Fz, msg: Message, choice: int) -> Message:
    assert isinstance(msg, pb.CreateVolumeRequest)
    args = driver.CreateVolumeArgs(
        name=msg.name, size_bytes=msg.size_bytes, primary=msg.primary, secondary=msg.secondary,
        block_size=msg.block_size, resync_mode=msg.resync_mode, auto_failover=msg.auto_failover,
    )
    problem = driver.validate_create_volume(
        args, default_resync_mode=1, registered={fz.addr["primary"], fz.addr["secondary"], PHANTOM}, existing={},
    )
    if problem is None:  # would create a pair
        if choice % 2:
            msg.name = VOL  # ALREADY_EXISTS
        else:
            msg.secondary = msg.primary
    return msg


def guard_register(fz: Fz, msg: Message, choice: int) -> Message:
    assert isinstance(msg, pb.RegisterNodeRequest)
    if driver.validate_register(msg.address, msg.role_hint) is None:
        msg.role_hint = ["coordinator", "PRIMARY", " primary", "x" * 1000][choice % 4]
    return msg


def guard_heartbeat(fz: Fz, msg: Message, choice: int) -> Message:
    assert isinstance(msg, pb.HeartbeatRequest)
    if msg.address in (fz.addr["primary"], fz.addr["secondary"]):
        msg.address = [PHANTOM, "127.0.0.1:2", fz.addr["coordinator"]][choice % 3]
    return msg


def guard_report(fz: Fz, msg: Message, choice: int) -> Message:
    assert isinstance(msg, pb.ReplicationReport)
    if msg.volume == VOL and msg.reporter == fz.addr["primary"] and msg.epoch == fz.epoch:
        c = choice % 3
        if c == 0:
            msg.reporter = fz.addr["secondary"]
        elif c == 1:
            msg.epoch = fz.epoch + 1
        else:
            msg.reporter = PHANTOM
    return msg


def guard_switchover(fz: Fz, msg: Message, choice: int) -> Message:
    assert isinstance(msg, pb.SwitchoverRequest)
    t = msg.handover_timeout_s
    if msg.volume == VOL and (t == 0 or 0 < t <= 60):
        msg.handover_timeout_s = [-1.0, 60.5, float("nan"), float("inf")][choice % 4]
    return msg


def guard_assign(fz: Fz, msg: Message, choice: int) -> Message:
    assert isinstance(msg, pb.VolumeAssignment)
    if msg.spec.name == VOL:
        if fz.epoch == 0:
            msg.spec.name = "vol0-stale"
        else:
            msg.identity.volume_uuid = fz.uuid
            msg.epoch = choice % fz.epoch  # stale: refused before anything changes
    elif msg.create and NAME_RE.match(msg.spec.name) and msg.identity.volume_uuid:
        msg.create = False  # no new store on the node
    return msg


def guard_handover(fz: Fz, msg: Message, choice: int) -> Message:
    assert isinstance(msg, pb.PrepareHandoverRequest)
    if msg.volume == VOL and msg.epoch == fz.epoch and not msg.release and 0 < msg.timeout_s <= 60:
        msg.timeout_s = [0.0, -1.0, 61.0, float("nan")][choice % 4]
    return msg


def _repair_valid(e: pb.Extent) -> bool:
    try:
        check_io_range(VOL, SIZE, BS, e.offset - e.offset % BS, max(BS, e.length))
        return True
    except SyncrepError:
        return False


def guard_repair(fz: Fz, msg: Message, choice: int) -> Message:
    assert isinstance(msg, pb.RepairRequest)
    if msg.volume == VOL and all(_repair_valid(e) for e in msg.extents):
        total = sum(max(BS, e.length) for e in msg.extents)
        if total > MiB or len(msg.extents) > 64:
            msg.extents.add(offset=[SIZE, 2**64 - 1, 1][choice % 3] , length=[BS, BS, 0][choice % 3])
    return msg


def guard_grant(fz: Fz, msg: Message, choice: int) -> Message:
    if getattr(msg, "volume", None) == VOL:
        msg.volume = ["vol0-no-such-volume", "", "../vol0"][choice % 3]  # type: ignore[attr-defined]
    return msg


def guard_lifecycle(fz: Fz, msg: Message, choice: int) -> Message:
    """Issue 13: never delete vol0 (renamed to a volume that does not exist), never grow it (a
    larger size becomes a smaller, refused one; its own size is a no-op)."""
    field = "name" if hasattr(msg, "name") else "volume"
    if getattr(msg, field) == VOL:
        if not hasattr(msg, "size_bytes"):
            setattr(msg, field, ["vol0-no-such-volume", "", "../vol0"][choice % 3])
        elif msg.size_bytes > SIZE:  # type: ignore[attr-defined]
            msg.size_bytes = [SIZE - BS, 0, SIZE + 1][choice % 3]  # type: ignore[attr-defined]
    return msg


def expect_inject(fz: Fz, target: str, msg: Message, out: Outcome) -> str | None:
    if out.code not in (S.PERMISSION_DENIED, S.RESOURCE_EXHAUSTED):
        return "fault injection is disabled on every node: expected PERMISSION_DENIED"
    return None


def _invalid_open(fz: Fz, spec: pb.VolumeSpec, choice: int) -> int:
    """The epoch for a stream opening into vol0 that the secondary must refuse
    before it fences or adopts anything: stale, or with a wrong geometry."""
    c = choice % 3
    if c == 0 and fz.epoch > 0:
        return fz.epoch - 1
    if c == 1 or fz.epoch == 0:
        spec.size_bytes = SIZE + BS if spec.size_bytes == SIZE else spec.size_bytes
    else:
        spec.block_size = 512 if spec.block_size == BS else spec.block_size
    if (spec.size_bytes, spec.block_size) == (SIZE, BS):
        spec.size_bytes = SIZE + BS
    return -1


def guard_replicate(fz: Fz, msg: Message, choice: int) -> Message:
    assert isinstance(msg, pb.ReplicateRequest)
    if msg.HasField("open") and msg.open.volume.name == VOL:
        e = _invalid_open(fz, msg.open.volume, choice)
        if e >= 0:
            msg.open.epoch = e
    return msg


def guard_resync(fz: Fz, msg: Message, choice: int) -> Message:
    assert isinstance(msg, pb.ResyncRequest)
    if msg.HasField("header") and msg.header.volume.name == VOL:
        e = _invalid_open(fz, msg.header.volume, choice)
        if e >= 0:
            msg.header.epoch = e
    return msg


def guard_watch_events(fz: Fz, msg: Message, choice: int) -> Message:
    assert isinstance(msg, pb.WatchEventsRequest)
    msg.now = True
    return msg


def expect_refused_stream(fz: Fz, target: str, msg: Message, out: Outcome) -> str | None:
    if out.code == S.OK:
        return "a stream into vol0 ended OK, but every opening was meant to be refused"
    return None


SPECS: dict[str, Spec] = {
    "syncrep.v1.VolumeService/Write": Spec(guard_write),
    "syncrep.v1.VolumeService/WriteOne": Spec(guard_write, expect_write_one),
    "syncrep.v1.VolumeService/Read": Spec(),
    "syncrep.v1.ReplicaService/Replicate": Spec(guard_replicate, expect_refused_stream),
    "syncrep.v1.ReplicaService/Resync": Spec(guard_resync, expect_refused_stream),
    "syncrep.v1.NodeService/AssignVolume": Spec(guard_assign),
    # In sync: every StartResync is refused ("nothing to resync").
    "syncrep.v1.NodeService/StartResync": Spec(),
    "syncrep.v1.NodeService/NodeStatus": Spec(),
    "syncrep.v1.NodeService/ReadLocal": Spec(),
    "syncrep.v1.NodeService/Checksum": Spec(),
    "syncrep.v1.NodeService/InjectFault": Spec(expect=expect_inject),
    "syncrep.v1.NodeService/ListSnapshots": Spec(),
    "syncrep.v1.NodeService/Repair": Spec(guard_repair),
    # No resync ever ran on vol0: an abort has nothing to abandon.
    "syncrep.v1.NodeService/AbortResync": Spec(),
    "syncrep.v1.NodeService/PrepareHandover": Spec(guard_handover),
    "syncrep.v1.CoordinatorService/RegisterNode": Spec(guard_register),
    "syncrep.v1.CoordinatorService/Heartbeat": Spec(guard_heartbeat),
    "syncrep.v1.CoordinatorService/CreateVolume": Spec(guard_create),
    "syncrep.v1.CoordinatorService/GetVolume": Spec(),
    "syncrep.v1.CoordinatorService/ListVolumes": Spec(),
    "syncrep.v1.CoordinatorService/ReportReplication": Spec(guard_report),
    # vol0 only while its primary's lease runs (see _before_send).
    "syncrep.v1.CoordinatorService/Promote": Spec(),
    "syncrep.v1.CoordinatorService/Switchover": Spec(guard_switchover),
    # vol0 is in sync, not in split brain: every Resolve is refused.
    "syncrep.v1.CoordinatorService/Resolve": Spec(),
    # Grants (issue 11): never one for vol0 (a valid grant changes state);
    # there is none at setup, so a Revoke has nothing to remove.
    "syncrep.v1.CoordinatorService/Grant": Spec(lambda fz, msg, choice: guard_grant(fz, msg, choice)),
    "syncrep.v1.CoordinatorService/Revoke": Spec(),
    "syncrep.v1.CoordinatorService/ListGrants": Spec(),
    # Issue 13: a follower's stream lasts until the client ends it, so every
    # call asks for the current state only (now: it ends by itself).
    "syncrep.v1.CoordinatorService/WatchEvents": Spec(guard_watch_events),
    "syncrep.v1.CoordinatorService/CoordinatorInfo": Spec(),
    # Issue 13, the volume lifecycle: never a delete or a growth of vol0.
    "syncrep.v1.CoordinatorService/DeleteVolume": Spec(guard_lifecycle),
    "syncrep.v1.CoordinatorService/ResizeVolume": Spec(guard_lifecycle),
    "syncrep.v1.NodeService/DeleteVolume": Spec(guard_lifecycle),
    "syncrep.v1.NodeService/ResizeVolume": Spec(guard_lifecycle),
}


def spec_of(fz: Fz, m: Method) -> Spec:
    """The RPC's spec; skips (saying so) an RPC the proto declares but its process does not serve yet."""
    spec = SPECS.get(m.key)
    if spec is None:
        pytest.fail(f"{m.key} has no fuzz spec: add it to SPECS in tests/test_fuzz_rpc.py (and a guard if a "
                    "valid call changes state)")
    target = SERVED_BY[m.service][0]
    if m.streaming:
        probe = fz.run(_stream(fz, target, m, [], "complete", 0), f"probing {m.key}")
    else:
        probe = fz.run(_unary(fz, target, m, b""), f"probing {m.key}")
    if probe.code == S.UNIMPLEMENTED:
        pytest.skip(f"{m.key} is declared in protos/syncrep.proto but the {target} does not serve it "
                    f"(UNIMPLEMENTED: {probe.details})")
    return spec


async def _before_send(fz: Fz, m: Method, msg: Message) -> Message:
    """Checks that need the live cluster: Promote vol0 only while the lease runs."""
    if m.key == "syncrep.v1.CoordinatorService/Promote" and isinstance(msg, pb.PromoteRequest) and msg.volume == VOL:
        st = await sc.get_volume(fz.addr["coordinator"], VOL)
        if st.lease_remaining_s < PROMOTE_LEASE_MARGIN_S:
            msg.volume = "vol0-lease-too-short"
    return msg


def hints(fz: Fz) -> dict[str, tuple[str, st.SearchStrategy[Any]]]:
    names = st.sampled_from([VOL, VOL, VOL, "vol1", "other-volume", "VOL0", "vol0 ", "vol0\x00", "../vol0",
                             ".set-aside", "v" * 64])
    addrs = st.sampled_from([*fz.addr.values(), PHANTOM, "127.0.0.1:2", "localhost:0", "[::1]:70000",
                             "no-port", ":7000", "unix:/tmp/fuzz.sock", "256.1.1.1:80", "http://x:1"])
    epochs = st.sampled_from(sorted({0, max(0, fz.epoch - 1), fz.epoch, fz.epoch + 1, 2**64 - 1}))
    offsets = st.one_of(st.integers(0, SIZE // BS).map(lambda b: b * BS),
                        st.sampled_from([SIZE - BS, SIZE, 1, 2**64 - BS]))
    timeouts = st.sampled_from([0.001, 0.5, 60.0, 61.0, -1.0])
    snapshot_names = st.sampled_from(["common-1", "pre-resync-x", "split-brain-discarded-e1-1", ""])
    h: dict[str, tuple[str, st.SearchStrategy[Any]]] = {}
    for kind, fields, values in [
        ("str", ["volume", "name"], names),
        ("str", ["address", "primary", "secondary", "reporter", "keep", "peer_address", "primary_address"], addrs),
        ("int", ["epoch"], epochs),
        ("str", ["volume_uuid"], st.sampled_from([fz.uuid, "", "0" * 32])),
        ("int", ["current"], st.sampled_from([fz.generation, 0, fz.generation ^ 1])),
        ("int", ["history"], st.sampled_from([fz.generation, fz.generation ^ 1])),
        ("int", ["offset"], offsets),
        ("int", ["length"], st.sampled_from([0, BS, 2 * BS, MiB, MAX_WRITE, MAX_WRITE + BS, SIZE])),
        ("int", ["size_bytes"], st.sampled_from([SIZE, SIZE + BS, BS])),
        ("int", ["block_size"], st.sampled_from([BS, 512, 64 * KiB, 4097, 0])),
        ("int", ["chunk_bytes"], st.sampled_from([BS, MiB, 64 * MiB, 64 * MiB + BS, 3])),
        ("int", ["snapshot_id"], st.sampled_from([0, 1, 2, 2**63 - 1, 2**64 - 1])),
        ("str", ["role_hint"], st.sampled_from(["primary", "secondary", "", "coordinator"])),
        ("str", ["kind"], st.sampled_from(["eio", "enospc", "corrupt_chunk", "clear", "extents", "diff", "repair",
                                           ""])),
        ("float", ["timeout_s", "handover_timeout_s"], timeouts),
        ("str", ["rollback_to_snapshot", "discard_snapshot"], snapshot_names),
        ("str", ["resync_id"], st.sampled_from(["r1", "", "x" * 1000])),
        ("str", ["user"], st.sampled_from(["admin", "alice", "", "node", "x" * 1000, "CN=admin"])),
        # Whole blocks (a valid write to vol0 then carries vol0's own bytes: guard_write).
        ("bytes", ["data"], st.sampled_from([bytes(BS), bytes(2 * BS), bytes(64 * KiB), bytes(MAX_WRITE)])),
    ]:
        for f in fields:
            h[f] = (kind, values)
    return h


_STRATEGY_CACHE: dict[tuple[int, str], st.SearchStrategy[Message]] = {}


def request_strategy(fz: Fz, m: Method) -> st.SearchStrategy[Message]:
    key = (id(fz), m.input.full_name)
    if key not in _STRATEGY_CACHE:
        _STRATEGY_CACHE[key] = message_strategy(m.input, hints(fz))
    return _STRATEGY_CACHE[key]


def targets(m: Method) -> list[str]:
    return list(SERVED_BY[m.service])


FUZZ_SETTINGS = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                           HealthCheck.large_base_example, HealthCheck.function_scoped_fixture],
    print_blob=True,
)


def _guarded(fz: Fz, spec: Spec, msg: Message, choice: int, focused: bool = False) -> Message:
    msg = copy.deepcopy(msg)
    if focused:
        focus(msg)
    return spec.guard(fz, msg, choice)


#: Where a request names its volume (the paths through nested messages).
VOLUME_FIELDS = [("volume",), ("name",), ("spec", "name"), ("open", "volume", "name"), ("header", "volume", "name")]


def focus(msg: Message) -> None:
    """Aim a random request at vol0: every field that names the volume says
    vol0 (half the examples; otherwise most calls stop at NOT_FOUND)."""
    for path in VOLUME_FIELDS:
        m: Any = msg
        for name in path[:-1]:
            if name not in m.DESCRIPTOR.fields_by_name:
                break
            oneof = m.DESCRIPTOR.fields_by_name[name].containing_oneof
            if oneof is not None and m.WhichOneof(oneof.name) != name:
                break  # another member of the oneof is set: leave it
            m = getattr(m, name)
        else:
            f = m.DESCRIPTOR.fields_by_name.get(path[-1])
            if f is not None and f.type == _d.FieldDescriptor.TYPE_STRING and not f.is_repeated:
                setattr(m, path[-1], VOL)


def _check(m: Method, spec: Spec, fz: Fz, target: str, msg: Any, out: Outcome, allowed: frozenset[Any]) -> None:
    assert out.code in allowed, _fail(m, target, "improper status", out, msg)
    if spec.expect is not None and isinstance(msg, Message):
        why = spec.expect(fz, target, msg, out)
        assert why is None, _fail(m, target, why, out, msg)


# ---------------------------------------------------------------- the tests


def test_every_rpc_has_a_fuzz_spec() -> None:
    """Every RPC in the descriptors is fuzzed: a new one fails here until it has a spec."""
    missing = [m.key for m in METHODS if m.key not in SPECS]
    assert not missing, f"RPCs without a fuzz spec in tests/test_fuzz_rpc.py SPECS: {missing}"
    assert {m.service for m in METHODS} <= set(SERVED_BY), "a new service: add it to SERVED_BY"


@pytest.mark.parametrize("m", [m for m in METHODS if not m.streaming], ids=lambda m: m.key)
def test_fuzz_fields(fz: Fz, m: Method) -> None:
    """Random field values for one unary RPC (module docstring); seed SYNCREP_TEST_SEED (default 11)."""
    spec = spec_of(fz, m)

    @settings(FUZZ_SETTINGS, max_examples=EXAMPLES_FIELDS)
    @hyp_seed(SEED)
    @given(req=request_strategy(fz, m), target=st.sampled_from(targets(m)), choice=st.integers(0, 11),
           focused=st.sampled_from([True, False]))  # vol0 first: the simplest, the most drawn
    def run(req: Message, target: str, choice: int, focused: bool) -> None:
        msg = _guarded(fz, spec, req, choice, focused)

        async def go() -> tuple[Message, Outcome]:
            sent = await _before_send(fz, m, msg)
            return sent, await _unary(fz, target, m, sent.SerializeToString())

        sent, out = fz.run(go(), f"{m.key} to {target}")
        _record(m, "fields", out)
        _check(m, spec, fz, target, sent, out, ALLOWED)

    run()
    check_unchanged(fz, f"fuzzing the fields of {m.key}")


def _raw_body(fz: Fz, spec: Spec, m: Method, body: bytes, choice: int) -> tuple[bytes, bool]:
    """``body`` as sent, and whether it parses. Bytes that parse into a request
    the guard would rewrite are replaced by the rewritten request."""
    try:
        parsed = message_class(m.input).FromString(body)
    except DecodeError:
        return body, False
    guarded = spec.guard(fz, copy.deepcopy(parsed), choice)
    return (body if guarded == parsed else guarded.SerializeToString()), True


@pytest.mark.parametrize("m", METHODS, ids=lambda m: m.key)
def test_fuzz_raw_bytes(fz: Fz, m: Method) -> None:
    """Random bytes as the serialized request of one RPC, to every process
    (module docstring); seed SYNCREP_TEST_SEED (default 11)."""
    spec = spec_of(fz, m)
    bodies = mutated_bytes(request_strategy(fz, m))

    @settings(FUZZ_SETTINGS, max_examples=EXAMPLES_RAW)
    @hyp_seed(SEED)
    @given(raw=st.lists(bodies, min_size=1, max_size=3 if m.streaming else 1),
           target=st.sampled_from(list(NAMES)), choice=st.integers(0, 11))
    def run(raw: list[bytes], target: str, choice: int) -> None:
        sent = [_raw_body(fz, spec, m, b, choice) for b in raw]
        bodies_sent = [b for b, _ in sent]
        if m.streaming:
            out = fz.run(_stream(fz, target, m, bodies_sent, "complete", 0), f"{m.key} (raw) to {target}")
        else:
            out = fz.run(_unary(fz, target, m, bodies_sent[0]), f"{m.key} (raw) to {target}")
        _record(m, "raw", out)
        if target not in SERVED_BY[m.service]:
            assert out.code == S.UNIMPLEMENTED or _too_big_to_send(out) or out.core_artefact, _fail(m, target, "expected UNIMPLEMENTED (not served here)",
                                                     out, bodies_sent)
            return
        parses = all(p for _, p in sent)
        if not parses and _decode_error_answer(m, out, len(bodies_sent)):
            return  # the server ended the call while the client still sent
        assert out.code in ALLOWED, _fail(m, target, "improper status", out, bodies_sent)
        if m.key == WRITE and out.code == S.OK:
            assert len(out.replies) == len(bodies_sent), _fail(
                m, target, f"{len(bodies_sent)} writes sent, {len(out.replies)} answered", out, bodies_sent)

    run()
    check_unchanged(fz, f"fuzzing {m.key} with random bytes")


def test_fuzz_unknown_methods(fz: Fz) -> None:
    """Paths no service has: UNIMPLEMENTED from every process, nothing else."""
    paths = ["/syncrep.v1.NodeService/Nope", "/syncrep.v1.Nope/Write", "/syncrep.v2.NodeService/NodeStatus",
             "/nope", "/syncrep.v1.NodeService/", "/syncrep.v1.NodeService/nodestatus",
             "/" + "x" * 4096 + "/y"]

    @settings(FUZZ_SETTINGS, max_examples=40)
    @hyp_seed(SEED)
    @given(path=st.sampled_from(paths), body=st.binary(max_size=64), target=st.sampled_from(list(NAMES)))
    def run(path: str, body: bytes, target: str) -> None:
        async def go() -> Outcome:
            try:
                await fz.channels[target].unary_unary(path)(body, timeout=CALL_TIMEOUT_S)
                return Outcome(S.OK, "", [])
            except grpc.aio.AioRpcError as e:
                return Outcome(e.code(), e.details() or "", [])

        out = fz.run(go(), f"{path} to {target}")
        COUNTS[("(unknown methods)", "raw")] += 1
        CODES["(unknown methods)"][out.code.name] += 1
        assert out.code == S.UNIMPLEMENTED, f"{path} to {target}: expected UNIMPLEMENTED, got {out}"

    run()
    check_unchanged(fz, "calling unknown methods")


# ---------------------------------------------------------------- streams


def _crc(data: bytes) -> int:
    return int(google_crc32c.value(data))


@st.composite
def write_sequence(draw: st.DrawFn, fz: Fz) -> list[Message]:
    """Writes to vol0 with client_seq going backwards and repeating, some valid
    (they carry vol0's own bytes: guard_write), some not."""
    out: list[Message] = []
    for _ in range(draw(st.integers(1, 8))):
        block = draw(st.integers(0, SIZE // BS))
        n = draw(st.sampled_from([BS, 2 * BS, 64 * KiB, MAX_WRITE, MAX_WRITE + BS, 0, 1]))
        out.append(pb.WriteRequest(volume=VOL, client_seq=draw(st.sampled_from([0, 1, 1, 2, 7, 3, 2**64 - 1])),
                                   offset=block * BS + draw(st.sampled_from([0, 0, 0, 1, 512])), data=bytes(n)))
    return out


@st.composite
def replicate_sequence(draw: st.DrawFn, fz: Fz) -> list[Message]:
    """Opens, batches and markers in any order: a batch first, two opens, seq
    going backwards, huge counts, epochs old and new, bad checksums."""
    out: list[Message] = []
    for _ in range(draw(st.integers(1, 7))):
        kind = draw(st.sampled_from(["open", "batch", "batch", "marker"]))
        seq = draw(st.sampled_from([1, 2, 1, 0, 5, 3, 2**64 - 1]))
        epoch = draw(st.sampled_from([fz.epoch, fz.epoch + 1, 0, 2**64 - 1]))
        if kind == "open":
            out.append(pb.ReplicateRequest(open=pb.StreamOpen(
                volume=pb.VolumeSpec(name=VOL, size_bytes=SIZE, block_size=BS), epoch=epoch, first_seq=seq,
                primary_address=draw(st.sampled_from([fz.addr["primary"], fz.addr["secondary"], PHANTOM])),
                identity=pb.Identity(volume_uuid=fz.uuid, current=fz.generation))))
        elif kind == "batch":
            count = draw(st.sampled_from([1, 2, HUGE_WRITES]))
            off = draw(st.integers(0, SIZE // BS - 1)) * BS
            data = fz.model[off:off + BS]
            crc = _crc(data) if draw(st.booleans()) else 0
            out.append(pb.ReplicateRequest(batch=pb.WriteBatch(epoch=epoch, writes=[
                pb.ReplicatedWrite(seq=(seq + i) % 2**64, offset=off, data=data, crc32c=crc) for i in range(count)])))
        else:
            out.append(pb.ReplicateRequest(marker=pb.SnapshotMarker(
                seq=seq, name=draw(st.sampled_from(["common-fuzz", "", "../x"])), epoch=epoch,
                keep=draw(st.sampled_from([0, 1, 2**32 - 1])))))
    return out


@st.composite
def resync_sequence(draw: st.DrawFn, fz: Fz) -> list[Message]:
    """Headers, chunks and trailers in any order: data before the header, two
    headers, a header after data, chunk indexes going backwards, huge counts."""
    out: list[Message] = []
    for _ in range(draw(st.integers(1, 7))):
        kind = draw(st.sampled_from(["header", "chunk", "chunk", "trailer"]))
        if kind == "header":
            out.append(pb.ResyncRequest(header=pb.ResyncHeader(
                volume=pb.VolumeSpec(name=VOL, size_bytes=SIZE, block_size=BS),
                epoch=draw(st.sampled_from([fz.epoch, fz.epoch + 1, 2**64 - 1])),
                resync_id=draw(st.sampled_from(["fuzz-1", "", "x" * 1000])),
                round=draw(st.sampled_from([0, 1, 2**32 - 1])),
                base_snapshot_id=draw(st.sampled_from([0, 1, 2**64 - 1])),
                target_snapshot_id=draw(st.sampled_from([0, 1, 2**64 - 1])),
                total_bytes=draw(st.sampled_from([0, SIZE, 2**64 - 1])),
                start_index=draw(st.sampled_from([0, 1, 2**64 - 1])),
                kind=draw(st.sampled_from(["extents", "diff", "repair", "", "bogus"])),
                final=draw(st.booleans()), full_copy=draw(st.booleans()),
                rollback_to_snapshot=draw(st.sampled_from(["", "common-1", "pre-resync-fuzz"])),
                identity=pb.Identity(volume_uuid=fz.uuid, current=fz.generation, history=[fz.generation ^ 1]))))
        elif kind == "chunk":
            off = draw(st.integers(0, SIZE // BS - 1)) * BS
            data = fz.model[off:off + draw(st.sampled_from([BS, 64 * KiB]))]
            out.append(pb.ResyncRequest(chunk=pb.ResyncChunk(
                index=draw(st.sampled_from([0, 1, 0, 5, 2**64 - 1])), offset=off, data=data,
                crc32c=_crc(data) if draw(st.booleans()) else 1)))
        else:
            out.append(pb.ResyncRequest(trailer=pb.ResyncTrailer(
                chunk_count=draw(st.sampled_from([0, 1, 2**64 - 1])), digest=draw(st.binary(max_size=40)))))
    return out


#: Entries in a huge replicated batch (each a 4 KiB write: about 4 MiB in all).
HUGE_WRITES = 1000
STRUCTURED: dict[str, Callable[[Fz], st.SearchStrategy[list[Message]]]] = {
    WRITE: write_sequence,
    "syncrep.v1.ReplicaService/Replicate": replicate_sequence,
    "syncrep.v1.ReplicaService/Resync": resync_sequence,
}
MODES = ("complete", "cancel", "stall")
EXAMPLES_PER_MODE = {"complete": EXAMPLES_STREAMS, "cancel": EXAMPLES_STREAMS // 2, "stall": EXAMPLES_STREAMS // 3}


def _check_write_replies(m: Method, target: str, out: Outcome, sent: list[Message], complete: bool) -> None:
    """Write answers every write exactly once (proto: "in any order"), with a proper code."""
    replies = [pb.WriteReply.FromString(r) for r in out.replies]
    bad = [r for r in replies if grpc.StatusCode.OK.value[0] != r.code
           and r.code not in {c.value[0] for c in REFUSALS}]
    assert not bad, _fail(m, target, f"a write answered with code {bad[0].code} ({bad[0].message})", out, sent)
    if complete and out.code == S.OK:
        want = collections.Counter(int(w.client_seq) for w in sent if isinstance(w, pb.WriteRequest))
        got = collections.Counter(int(r.client_seq) for r in replies)
        assert got == want, _fail(m, target, f"writes answered {dict(got)}, sent {dict(want)}", out, sent)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m", STREAMING, ids=lambda m: m.key)
def test_fuzz_streams(fz: Fz, m: Method, mode: str) -> None:
    """Streams of random or structured (out of order) messages for one streaming
    RPC, complete, cancelled or stalled (module docstring); seed
    SYNCREP_TEST_SEED (default 11)."""
    spec = spec_of(fz, m)
    structured = STRUCTURED.get(m.key)
    sequences = st.lists(request_strategy(fz, m), max_size=6)
    if structured is not None:
        sequences = st.one_of(structured(fz), sequences)
    allowed = ALLOWED | (CLIENT_ENDED if mode != "complete" else frozenset())

    @settings(FUZZ_SETTINGS, max_examples=EXAMPLES_PER_MODE[mode])
    @hyp_seed(SEED)
    @given(msgs=sequences, target=st.sampled_from(targets(m)), choice=st.integers(0, 11),
           focused=st.sampled_from([True, False]), stop_at=st.integers(0, 6))
    def run(msgs: list[Message], target: str, choice: int, focused: bool, stop_at: int) -> None:
        sent = [_guarded(fz, spec, x, choice, focused) for x in msgs]
        bodies = [x.SerializeToString() for x in sent]
        out = fz.run(_stream(fz, target, m, bodies, mode, stop_at), f"{m.key} ({mode}) to {target}")
        _record(m, f"stream {mode}", out)
        if out.core_artefact:
            ARTEFACTS[m.key] += 1
            return
        assert out.code in allowed, _fail(m, target, f"improper status ({mode})", out, sent)
        if spec.expect is not None:
            why = spec.expect(fz, target, sent[0] if sent else message_class(m.input)(), out)
            assert why is None, _fail(m, target, why, out, sent)
        if m.key == WRITE:
            _check_write_replies(m, target, out, sent, mode == "complete")

    run()
    check_unchanged(fz, f"fuzzing {m.key} streams ({mode})")


def test_undecodable_request_is_invalid_argument(fz: Fz) -> None:
    """Minimal input found by test_fuzz_raw_bytes: the single byte 0xff (a field
    tag with no end) as a GetVolumeRequest, to the coordinator; the same for
    every unary RPC on the process that serves it."""
    got = {}
    for m in METHODS:
        if m.streaming:
            continue
        target = SERVED_BY[m.service][0]
        out = fz.run(_unary(fz, target, m, b"\xff"), f"{m.key} with b'\\xff'")
        got[m.key] = out.code
    wrong = {k: c.name for k, c in got.items() if c != S.INVALID_ARGUMENT}
    assert not wrong, f"undecodable request (b'\\xff') not refused with INVALID_ARGUMENT: {wrong}"


def test_undecodable_write_stream_message_is_refused(fz: Fz) -> None:
    """Minimal input found by test_fuzz_raw_bytes[Write]: one message b'\\xca'
    (field 25, wire type 2, no length) on a Write stream to vol0's primary."""
    m = next(m for m in METHODS if m.key == WRITE)
    out = fz.run(_stream(fz, "primary", m, [b"\xca"], "complete", 0), "Write with b'\\xca'")
    assert out.code == S.INVALID_ARGUMENT, f"a Write stream with an undecodable message ended {out}"


#: Longer than gRPC's 16 KiB hard limit on a reply's metadata (the status message is
#: metadata), each in its own way: ASCII, two UTF-8 bytes a character (6 on the wire,
#: percent-encoded), "%" (3 on the wire), four UTF-8 bytes a character (12 on the wire).
LONG_NAMES = {"ascii": "x" * 20_000, "e-acute": "\u00e9" * 20_000, "percent": "%" * 20_000,
              "emoji": "\U0001f4a3" * 5_000}


def _long_name_calls(name: str) -> dict[str, tuple[str, str, bytes]]:
    """RPC -> (target, key, request) naming the volume ``name`` (none of them exists)."""
    return {
        "GetVolume": ("coordinator", "syncrep.v1.CoordinatorService/GetVolume",
                      pb.GetVolumeRequest(name=name).SerializeToString()),
        "WatchEvents": ("coordinator", "syncrep.v1.CoordinatorService/WatchEvents",
                        pb.WatchEventsRequest(volume=name, now=True).SerializeToString()),
        "Read": ("primary", "syncrep.v1.VolumeService/Read",
                 pb.ReadRequest(volume=name, length=BS).SerializeToString()),
        "ReadLocal": ("primary", "syncrep.v1.NodeService/ReadLocal",
                      pb.ReadRequest(volume=name, length=BS).SerializeToString()),
        "Checksum": ("secondary", "syncrep.v1.NodeService/Checksum",
                     pb.ChecksumRequest(volume=name, chunk_bytes=256 * KiB).SerializeToString()),
    }


def test_refusal_of_a_long_name_keeps_its_code(fz: Fz) -> None:
    """Found by test_fuzz_fields (the 64 KiB string edge, then "\u00e9" * 20000 of
    fuzz_helpers.STRING_EDGES; seed 11): GetVolume and WatchEvents on the coordinator,
    Read, ReadLocal and Checksum on a node, for a volume named by each of LONG_NAMES:
    NOT_FOUND, with a message that says it was cut and fits rpc.MAX_STATUS_DETAILS_BYTES."""
    by_key = {m.key: m for m in METHODS}
    wrong = {}
    for kind, name in LONG_NAMES.items():
        for rpc_name, (target, key, body) in _long_name_calls(name).items():
            m = by_key[key]
            if m.desc.server_streaming:
                out = fz.run(_stream(fz, target, m, [body], "complete", 0), f"{rpc_name} with a long name ({kind})")
            else:
                out = fz.run(_unary(fz, target, m, body), f"{rpc_name} with a long name ({kind})")
            size = rpc.status_wire_bytes(out.details)
            if out.code != S.NOT_FOUND or size > rpc.MAX_STATUS_DETAILS_BYTES or "more characters)" not in out.details:
                wrong[f"{rpc_name} ({kind})"] = f"{size} bytes on the wire: {str(out)[:200]}"
    assert not wrong, f"refusals of a 20,000-character volume name lost their code or their bound: {wrong}"


# ---------------------------------------------------------------- the guard alone (in-process, no cluster)


@contextlib.asynccontextmanager
async def _guarded_server(handlers: dict[str, grpc.RpcMethodHandler]) -> Any:
    """A bare grpc.aio server with rpc.Guard (as every rpc.Server has) serving
    ``handlers`` under the service ``fuzz.Guard``; yields a plaintext channel to it."""
    server = grpc.aio.server(interceptors=[rpc.Guard()])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("fuzz.Guard", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield ch
    finally:
        await server.stop(0)


async def _call_both(ch: Any) -> dict[str, grpc.aio.AioRpcError]:
    """Call /fuzz.Guard/Unary and /fuzz.Guard/Stream; the errors they end with."""
    out = {}
    for kind in ("Unary", "Stream"):
        try:
            if kind == "Unary":
                await ch.unary_unary(f"/fuzz.Guard/{kind}")(b"", timeout=CALL_TIMEOUT_S)
            else:
                async for _ in ch.unary_stream(f"/fuzz.Guard/{kind}")(b"", timeout=CALL_TIMEOUT_S):
                    pass
        except grpc.aio.AioRpcError as e:
            out[kind] = e
    return out


def test_guard_bounds_an_unexpected_exception() -> None:
    """Fault: a handler (unary, and server-streaming) raises a ValueError whose text
    quotes 20,000 "\u00e9" (a request's field, say), and one sets a code first. Before:
    grpc.aio answered "Unexpected <class 'ValueError'>: <the whole text>" (120 KiB on
    the wire), lost to RESOURCE_EXHAUSTED. Now: UNKNOWN (or the code set), the same
    words, cut to rpc.MAX_STATUS_DETAILS_BYTES. Seed: none (fixed input)."""
    text = "\u00e9" * 20_000

    async def unary(request: Any, context: Any) -> bytes:
        raise ValueError(text)

    async def stream(request: Any, context: Any) -> Any:
        context.set_code(grpc.StatusCode.INTERNAL)
        yield b""
        raise ValueError(text)

    async def go() -> dict[str, grpc.aio.AioRpcError]:
        async with _guarded_server({"Unary": grpc.unary_unary_rpc_method_handler(unary),
                                    "Stream": grpc.unary_stream_rpc_method_handler(stream)}) as ch:
            return await _call_both(ch)

    got = asyncio.run(go())
    assert set(got) == {"Unary", "Stream"}, f"a call that raised ended OK: {got}"
    for kind, want in (("Unary", S.UNKNOWN), ("Stream", S.INTERNAL)):
        e = got[kind]
        details = e.details() or ""
        assert e.code() == want, f"{kind}: {e.code().name}: {details[:200]}"
        assert details.startswith("Unexpected <class 'ValueError'>: \u00e9"), f"{kind}: {details[:200]}"
        assert rpc.status_wire_bytes(details) <= rpc.MAX_STATUS_DETAILS_BYTES, f"{kind}: {len(details)} characters"


def test_guard_bounds_the_trailing_metadata() -> None:
    """Fault: handlers refuse with 20 KiB of trailing metadata next to their status
    (one with abort(..., trailing_metadata=...), one with set_trailing_metadata and
    then abort). Before: the reply's trailers passed gRPC's 16 KiB limit and the
    client got RESOURCE_EXHAUSTED. Now: the refusal arrives (NOT_FOUND, its
    message) with the entries that fit rpc.MAX_TRAILING_METADATA_BYTES and
    without the one that does not. Seed: none (fixed input)."""
    small = ("syncrep-leader", "127.0.0.1:7000")
    big = ("syncrep-huge", "x" * 20_000)

    async def unary(request: Any, context: Any) -> bytes:
        await context.abort(S.NOT_FOUND, "no such volume", trailing_metadata=(small, big))
        raise AssertionError("unreachable")

    async def stream(request: Any, context: Any) -> Any:
        context.set_trailing_metadata((small, big))
        await context.abort(S.NOT_FOUND, "no such volume")
        yield b""

    async def go() -> dict[str, grpc.aio.AioRpcError]:
        async with _guarded_server({"Unary": grpc.unary_unary_rpc_method_handler(unary),
                                    "Stream": grpc.unary_stream_rpc_method_handler(stream)}) as ch:
            return await _call_both(ch)

    got = asyncio.run(go())
    assert set(got) == {"Unary", "Stream"}, f"a refused call ended OK: {got}"
    for kind, e in got.items():
        assert (e.code(), e.details()) == (S.NOT_FOUND, "no such volume"), f"{kind}: {e.code().name}: {e.details()}"
        keys = dict(e.trailing_metadata() or ())
        assert keys.get("syncrep-leader") == "127.0.0.1:7000", f"{kind}: the entry that fits was lost: {keys}"
        assert "syncrep-huge" not in keys, f"{kind}: the 20 KiB entry was sent"


def test_zz_fuzz_summary(fz: Fz, capsys: pytest.CaptureFixture[str]) -> None:
    """After every batch: wait SETTLE_S (see there), compare once more, check that no
    refused AssignVolume left a volume reported missing, compare the replicas
    block for block and check every block written at setup; print the counts."""
    time.sleep(SETTLE_S)
    check_unchanged(fz, "the whole run (settled)")

    async def no_missing() -> list[str]:
        left = []
        for n in ("primary", "secondary"):
            ns = await sc.node_status(fz.addr[n])
            left += [f"{n}: {r.name!r}" for r in ns.volumes if r.data_missing]
        return left

    deadline = time.monotonic() + 10.0
    while (left := fz.run(no_missing(), "NodeStatus")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"volumes still reported missing 10 s after the last refused assignment: {left}"
    fz.run(assert_replicas_identical(fz.cluster, VOL, chunk=256 * KiB), "comparing the replicas")
    fz.run(check_model(fz.cluster, VOL, fz.written), "checking the written blocks")

    assert not KNOWN_BUG_HITS, f"undecodable requests answered wrongly: {dict(KNOWN_BUG_HITS)}"
    per_rpc: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for (k, kind), n in sorted(COUNTS.items()):
        per_rpc[k][kind] = n
    total = sum(COUNTS.values())
    lines = [f"fuzz cases (seed {SEED}, hypothesis): {total} in total"]
    for k, kinds in per_rpc.items():
        hits = f"; {KNOWN_BUG_HITS[k]} undecodable (known bug)" if KNOWN_BUG_HITS[k] else ""
        if ARTEFACTS[k]:
            hits += f"; {ARTEFACTS[k]} ended by the server mid-send"
        codes = ", ".join(f"{c} {n}" for c, n in CODES[k].most_common())
        lines.append(f"  {k}: {sum(kinds.values())} ({', '.join(f'{a} {b}' for a, b in kinds.items())}){hits}"
                     f" -> {codes}")
    if os.environ.get("SYNCREP_FUZZ_SAMPLES"):
        lines += [f"  sample {k} {c}: {d}" for (k, c), d in sorted(SAMPLES.items())]
    text = "\n".join(lines)
    with capsys.disabled():  # for the closing note: shown even when output is captured
        print("\n" + text)
    missing = [m.key for m in METHODS if not any(k == m.key for k, _ in COUNTS)]
    assert not missing, f"RPCs never fuzzed in this run (run the whole module): {missing}"
