"""An in-memory etcd for the deterministic simulator (issue 12), on its virtual clock.

The simulator's ``--coordinators 3`` mode runs three REAL ``Coordinator``
objects on one store. What they need of etcd is small -- KV transactions,
linearizable ranges, leases -- and it must run on the simulator's virtual
time, deterministically, with faults injected by seed. So this module is an
etcd *server* at the protobuf level (``aetcd.rpc``'s ``TxnRequest``,
``RangeRequest``, ``LeaseGrantRequest``, ...), and ``SimEtcdClient`` is the
real ``aetcd.Client`` with these in-memory stubs in place of its gRPC ones:
aetcd's own request building, response parsing and error mapping run
unchanged, and so do ``coordinator.etcd_store.EtcdStore`` (its CAS on
``mod_revision``, its election fence in every transaction, its
StoreConflict / NotLeader / StoreUnavailable) and
``coordinator.election.Election``. Nothing of theirs is copied here: the
point is to test the real election and fencing code.

Semantics (etcd v3's, the parts syncrep uses):

* one global ``revision``; a transaction that writes bumps it once, and every
  key it writes gets that ``mod_revision`` (``create_revision`` when new,
  ``version`` + 1). A transaction is atomic: compares, then the success or
  the failure branch, in order (a range in it sees the earlier ops' writes).
* compares on VALUE / VERSION / CREATE / MOD / LEASE, over one key or a
  range (every key in it must match; an empty range compares the zero key,
  and a VALUE compare on a missing key fails), as etcd's ``applyCompare``.
* leases with a TTL on the virtual clock: a keepalive restarts it; when it
  runs out its keys are deleted (in one revision). A put naming an unknown
  lease fails the whole transaction (``requested lease not found``).
  Expiry is applied lazily, before each request is served: nobody can
  observe the difference.

Delivery. The store's own client (``inline=True``: EtcdStore runs each call
to completion on the caller's thread, see ``EtcdStore(client=...)``) is
answered at once; the election's client (on the event loop) waits
``latency_s`` each way. While a host is cut from the store, or the store is
paused, every request fails: the store's client at once with
DEADLINE_EXCEEDED (a blocked call cannot move the virtual clock without
freezing every other host too), the election's after its deadline. Each
write sent meanwhile meets a seeded fate, as on a real network: lost (never
applied), applied now with its answer lost (the caller thinks it failed:
"outcome unknown"), or held and applied when the cut heals (a stale
request reaching etcd late: the fence must refuse it if another coordinator
leads by then). ``pause()`` models etcd without quorum: nothing is served
and nothing expires; ``resume()`` is a new etcd raft leader, which renews
every lease (etcd's lessor ``Promote``), then the held requests arrive.

Audit (checked at every committed write, failures in ``violations``):

* every write of a data key (under ``data_prefix``: volumes, nodes, grants,
  events; not meta/schema nor the election key) is fenced: its transaction compares the election key's value;
* one term, one coordinator: every fenced write of one election value comes
  from one host, and once a newer term wrote, an older one never writes;
* epochs are never handed out twice: a volume key's epoch never goes back
  (its puts are one linear history under CAS).
``fenced_refusals`` counts the writes whose fence compare failed (a deposed
leader's write refused).
"""

# The stubs take gRPC stubs' ``timeout=`` keyword, as aetcd passes it:
# ruff: noqa: ASYNC109
from __future__ import annotations

import asyncio
import functools
import json
import random
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aetcd  # type: ignore[import-untyped]
import grpc
from aetcd import rpc as etcd_rpc  # type: ignore[import-untyped]
from grpc import aio

__all__ = ["SimEtcd", "SimEtcdClient"]

#: etcd's answer to a put naming a lease it does not have (gRPC NOT_FOUND).
LEASE_NOT_FOUND = "etcdserver: requested lease not found"
#: The fates of a write sent while its sender cannot reach the store (seeded).
FATES = ("lost", "applied", "delayed")
FATE_ODDS = (0.5, 0.25, 0.25)


def _rpc_error(code: grpc.StatusCode, details: str) -> aio.AioRpcError:
    return aio.AioRpcError(code, aio.Metadata(), aio.Metadata(), details=details)


@dataclass
class _KV:
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0

    def proto(self, key: bytes, keys_only: bool = False) -> Any:
        return etcd_rpc.KeyValue(
            key=key, value=b"" if keys_only else self.value, create_revision=self.create_revision,
            mod_revision=self.mod_revision, version=self.version, lease=self.lease,
        )


@dataclass
class _Lease:
    ttl: int
    expires_at: float
    keys: set[bytes] = field(default_factory=set)


def _in_range(key: bytes, start: bytes, end: bytes) -> bool:
    """etcd's [start, end): end b"" is the one key start, b"\\0" every key >= start."""
    if not end:
        return key == start
    if end == b"\0":
        return key >= start
    return start <= key < end


class SimEtcd:
    """The store's state and its fault hooks. ``clock``: the virtual clock
    (seconds, the event loop's). ``rng``: the fates of writes sent across a
    cut. ``election_key`` / ``data_prefix``: what the audit checks (None: no
    audit). ``log``: where notable events go (the simulator's trace)."""

    def __init__(
        self,
        clock: Callable[[], float],
        rng: random.Random,
        *,
        latency_s: float = 0.0005,
        election_key: bytes | None = None,
        data_prefix: bytes | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.clock = clock
        self.rng = rng
        self.latency_s = latency_s
        self.election_key = election_key
        self.data_prefix = data_prefix
        self.log = log or (lambda _text: None)
        self.revision = 1
        self.kv: dict[bytes, _KV] = {}
        self.leases: dict[int, _Lease] = {}
        self._next_lease = 0x5E7C0000
        self.cut_hosts: set[str] = set()
        self.paused = False
        self.held: list[tuple[str, Callable[[], Any]]] = []
        #: Fates to give the next writes across a fault, before the seeded ones (tests).
        self.next_fates: list[str] = []
        # audit
        self.violations: list[str] = []
        self.fenced_refusals = 0
        self.leader_changes = 0
        self._term_host: dict[bytes, str] = {}
        self._terms_ended: set[bytes] = set()
        self._last_term: bytes | None = None
        self._terms_written: set[bytes] = set()
        self._epochs: dict[bytes, tuple[int, int]] = {}  # volume key -> (create_revision, epoch)
        self._holder: bytes | None = None

    # ------------------------------------------------------------ faults

    def reachable(self, host: str) -> bool:
        return not self.paused and host not in self.cut_hosts

    def cut(self, host: str) -> None:
        """``host``'s requests no longer reach the store (nor its answers the host)."""
        self.cut_hosts.add(host)
        self.log(f"store: cut from {host}")

    def heal(self, host: str) -> None:
        self.cut_hosts.discard(host)
        self.log(f"store: reachable again from {host}")
        self._deliver_held(lambda h: h == host)

    def pause(self) -> None:
        """No quorum: nothing is answered, no lease expires."""
        self._expire()
        self.paused = True
        self.log("store: paused (no quorum)")

    def resume(self) -> None:
        """Quorum back: a new raft leader renews every lease, then the held requests arrive."""
        self.paused = False
        now = self.clock()
        for lease in self.leases.values():
            lease.expires_at = now + lease.ttl
        self.log(f"store: resumed ({len(self.leases)} leases renewed)")
        self._deliver_held(lambda h: h not in self.cut_hosts)

    def _deliver_held(self, which: Callable[[str], bool]) -> None:
        keep: list[tuple[str, Callable[[], Any]]] = []
        for host, apply in self.held:
            if not which(host) or not self.reachable(host):
                keep.append((host, apply))
                continue
            try:
                apply()
            except aio.AioRpcError as e:
                self.log(f"store: a late request of {host} failed: {e.details()}")
        self.held = keep

    def request(self, host: str, apply: Callable[[], Any], *, writes: bool) -> Any:
        """Serve one request of ``host`` now, or fail it as the faults say."""
        if self.reachable(host):
            return apply()
        if writes:
            fate = self.next_fates.pop(0) if self.next_fates else self.rng.choices(FATES, FATE_ODDS)[0]
            if fate == "applied":
                try:
                    apply()
                except aio.AioRpcError:
                    pass
            elif fate == "delayed":
                self.held.append((host, apply))
        why = "paused (no quorum)" if self.paused else f"unreachable from {host}"
        raise _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, f"sim etcd: deadline exceeded (the store is {why})")

    # ------------------------------------------------------------ leases

    def _expire(self) -> None:
        if self.paused:
            return
        now = self.clock()
        for lease_id in sorted(i for i, le in self.leases.items() if le.expires_at <= now):
            lease = self.leases.pop(lease_id)
            self._revoke_keys(lease, f"lease {lease_id:x} expired")

    def _revoke_keys(self, lease: _Lease, why: str) -> None:
        gone = [k for k in sorted(lease.keys) if k in self.kv and self.kv[k].lease]
        if gone:
            self.revision += 1
            for k in gone:
                del self.kv[k]
            self._note_holder(why)

    def lease_grant(self, req: Any) -> Any:
        self._expire()
        self._next_lease += 1
        lease_id = req.ID or self._next_lease
        if lease_id in self.leases:
            raise _rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "etcdserver: lease already exists")
        self.leases[lease_id] = _Lease(req.TTL, self.clock() + req.TTL)
        return etcd_rpc.LeaseGrantResponse(header=self._header(), ID=lease_id, TTL=req.TTL)

    def lease_keepalive(self, req: Any) -> Any:
        self._expire()
        lease = self.leases.get(req.ID)
        if lease is None:
            return etcd_rpc.LeaseKeepAliveResponse(header=self._header(), ID=req.ID, TTL=0)
        lease.expires_at = self.clock() + lease.ttl
        return etcd_rpc.LeaseKeepAliveResponse(header=self._header(), ID=req.ID, TTL=lease.ttl)

    def lease_revoke(self, req: Any) -> Any:
        self._expire()
        lease = self.leases.pop(req.ID, None)
        if lease is None:
            raise _rpc_error(grpc.StatusCode.NOT_FOUND, LEASE_NOT_FOUND)
        self._revoke_keys(lease, f"lease {req.ID:x} revoked")
        return etcd_rpc.LeaseRevokeResponse(header=self._header())

    # ------------------------------------------------------------ KV

    def _header(self) -> Any:
        return etcd_rpc.ResponseHeader(cluster_id=1, member_id=1, revision=self.revision, raft_term=1)

    def _keys(self, start: bytes, end: bytes) -> list[bytes]:
        if not end:
            return [start] if start in self.kv else []
        return sorted(k for k in self.kv if _in_range(k, start, end))

    def range(self, req: Any) -> Any:
        self._expire()
        return self._range(req)

    def _range(self, req: Any) -> Any:
        if req.revision:
            raise _rpc_error(grpc.StatusCode.UNIMPLEMENTED, "sim etcd: ranges at a past revision")
        keys = self._keys(req.key, req.range_end)
        if req.sort_order == etcd_rpc.RangeRequest.DESCEND:
            if req.sort_target != etcd_rpc.RangeRequest.KEY:
                raise _rpc_error(grpc.StatusCode.UNIMPLEMENTED, "sim etcd: sorting by other than the key")
            keys.reverse()
        count = len(keys)
        if req.limit:
            keys = keys[: req.limit]
        kvs = [] if req.count_only else [self.kv[k].proto(k, req.keys_only) for k in keys]
        return etcd_rpc.RangeResponse(header=self._header(), kvs=kvs, count=count, more=len(keys) < count)

    def _compare(self, c: Any) -> bool:
        keys = self._keys(c.key, c.range_end)
        kvs = [self.kv[k] for k in keys]
        if not kvs:
            if c.target == etcd_rpc.Compare.VALUE:
                return False  # etcd: a value compare on a missing key always fails
            kvs = [_KV(b"", 0, 0, 0, 0)]
        for kv in kvs:
            if c.target == etcd_rpc.Compare.VALUE:
                a: Any
                a, b = kv.value, c.value
            elif c.target == etcd_rpc.Compare.VERSION:
                a, b = kv.version, c.version
            elif c.target == etcd_rpc.Compare.CREATE:
                a, b = kv.create_revision, c.create_revision
            elif c.target == etcd_rpc.Compare.MOD:
                a, b = kv.mod_revision, c.mod_revision
            elif c.target == etcd_rpc.Compare.LEASE:
                a, b = kv.lease, c.lease
            else:
                raise _rpc_error(grpc.StatusCode.INVALID_ARGUMENT, f"sim etcd: compare target {c.target}")
            ok = {
                etcd_rpc.Compare.EQUAL: a == b,
                etcd_rpc.Compare.NOT_EQUAL: a != b,
                etcd_rpc.Compare.LESS: a < b,
                etcd_rpc.Compare.GREATER: a > b,
            }[c.result]
            if not ok:
                return False
        return True

    def txn(self, req: Any, host: str = "?") -> Any:
        self._expire()
        succeeded = all(self._compare(c) for c in req.compare)
        ops = list(req.success if succeeded else req.failure)
        for op in ops:
            kind = op.WhichOneof("request")
            if kind == "request_txn":
                raise _rpc_error(grpc.StatusCode.UNIMPLEMENTED, "sim etcd: nested transactions")
            if kind == "request_put" and op.request_put.lease and op.request_put.lease not in self.leases:
                raise _rpc_error(grpc.StatusCode.NOT_FOUND, LEASE_NOT_FOUND)
        rev = self.revision + 1  # the revision of this transaction's writes, if it makes any
        changed = False
        written: list[tuple[bytes, bytes]] = []
        responses = []
        for op in ops:
            kind = op.WhichOneof("request")
            if kind == "request_range":
                responses.append(etcd_rpc.ResponseOp(response_range=self._range(op.request_range)))
            elif kind == "request_put":
                p = op.request_put
                old = self.kv.get(p.key)
                prev = old.proto(p.key) if old is not None and p.prev_kv else None
                if old is not None and old.lease and old.lease in self.leases:
                    self.leases[old.lease].keys.discard(p.key)
                self.kv[p.key] = _KV(p.value, old.create_revision if old else rev, rev,
                                     (old.version if old else 0) + 1, p.lease)
                if p.lease:
                    self.leases[p.lease].keys.add(p.key)
                changed = True
                written.append((p.key, p.value))
                responses.append(etcd_rpc.ResponseOp(response_put=etcd_rpc.PutResponse(prev_kv=prev)))
            elif kind == "request_delete_range":
                d = op.request_delete_range
                keys = self._keys(d.key, d.range_end)
                prevs = [self.kv[k].proto(k) for k in keys] if d.prev_kv else []
                for k in keys:
                    del self.kv[k]
                    written.append((k, b""))
                changed = changed or bool(keys)
                responses.append(etcd_rpc.ResponseOp(
                    response_delete_range=etcd_rpc.DeleteRangeResponse(deleted=len(keys), prev_kvs=prevs)))
        if changed:
            self.revision = rev
        header = self._header()
        for r in responses:  # every response of the transaction carries its revision
            getattr(r, r.WhichOneof("response")).header.CopyFrom(header)
        self._audit(req, succeeded, written, host)
        if any(k == self.election_key for k, _ in written):
            self._note_holder(f"written by {host}")
        return etcd_rpc.TxnResponse(header=header, succeeded=succeeded, responses=responses)

    # ------------------------------------------------------------ audit

    def holder(self) -> bytes | None:
        """The election key's value now (the current term), None when nobody holds it."""
        if self.election_key is None:
            return None
        kv = self.kv.get(self.election_key)
        return kv.value if kv is not None else None

    def _note_holder(self, why: str) -> None:
        now = self.holder()
        if now != self._holder:
            if self._holder is not None:
                self._terms_ended.add(self._holder)
            self._holder = now
            self.leader_changes += 1
            shown = now.decode(errors="replace").replace("\n", " lease ") if now else "nobody"
            self.log(f"store: the election key is held by {shown} ({why})")

    def _fence_of(self, req: Any) -> bytes | None:
        for c in req.compare:
            if (c.key == self.election_key and not c.range_end and c.target == etcd_rpc.Compare.VALUE
                    and c.result == etcd_rpc.Compare.EQUAL):
                return bytes(c.value)
        return None

    def _audit(self, req: Any, succeeded: bool, written: list[tuple[bytes, bytes]], host: str) -> None:
        if self.election_key is None or self.data_prefix is None:
            return
        fence = self._fence_of(req)
        data = [(k, v) for k, v in written if k.startswith(self.data_prefix) and k != self.election_key
                and k != self.data_prefix + b"meta/schema"]
        if not succeeded:
            if fence is not None and fence != self.holder():
                self.fenced_refusals += 1
                self.log(f"store: a write of {host} refused by its fence (term "
                         f"{fence.decode(errors='replace').replace(chr(10), ' lease ')} is over)")
            return
        if not data:
            return
        if fence is None:
            self.violations.append(f"an unfenced write of {host} to {data[0][0].decode()} committed "
                                   f"at revision {self.revision}")
            return
        owner = self._term_host.setdefault(fence, host)
        if owner != host:
            self.violations.append(f"two coordinators wrote in one term {fence!r}: {owner} and {host}")
        if fence in self._terms_ended:
            self.violations.append(f"a write of {host} in the ended term {fence!r} committed at revision "
                                   f"{self.revision}")
        elif self._last_term is not None and fence != self._last_term and fence in self._terms_written:
            self.violations.append(f"a write of {host} in the older term {fence!r} committed after the "
                                   f"newer term {self._last_term!r} wrote")
        self._terms_written.add(fence)
        self._last_term = fence
        vol_prefix = self.data_prefix + b"volumes/"
        for k, v in data:
            if not k.startswith(vol_prefix) or not v:
                continue
            epoch = int(json.loads(v)["pair"]["epoch"])
            inc = self.kv[k].create_revision
            was = self._epochs.get(k)
            if was is not None and was[0] == inc and epoch < was[1]:
                self.violations.append(f"{k.decode()}: epoch went back from {was[1]} to {epoch} "
                                       f"(written by {host} at revision {self.revision})")
            self._epochs[k] = (inc, epoch)

    def client(self, host: str, *, inline: bool, timeout_s: float = 2.0) -> SimEtcdClient:
        return SimEtcdClient(self, host, inline=inline, timeout_s=timeout_s)


# ---------------------------------------------------------------- the client


class _Stubs:
    """The KV and Lease stubs of one client: each call is one request to the SimEtcd."""

    def __init__(self, client: SimEtcdClient) -> None:
        self.c = client

    async def _call(self, apply: Callable[[], Any], *, writes: bool, timeout: float | None) -> Any:
        c = self.c
        if c.closed:
            raise _rpc_error(grpc.StatusCode.UNAVAILABLE, "sim etcd: the client's channel is closed")
        etcd = c.etcd
        if c.inline:
            return etcd.request(c.host, apply, writes=writes)
        await asyncio.sleep(etcd.latency_s / 2)
        try:
            reply = etcd.request(c.host, apply, writes=writes)
        except aio.AioRpcError as e:
            if e.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                await asyncio.sleep(max(0.0, (timeout or c.timeout_s) - etcd.latency_s / 2))
            raise
        await asyncio.sleep(etcd.latency_s / 2)
        if not etcd.reachable(c.host):  # the answer is lost on the way back
            await asyncio.sleep(max(0.0, (timeout or c.timeout_s) - etcd.latency_s))
            raise _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "sim etcd: deadline exceeded (the answer was lost)")
        return reply

    # KV
    async def Txn(self, req: Any, timeout: float | None = None, metadata: Any = None) -> Any:
        writes = any(op.WhichOneof("request") != "request_range" for op in [*req.success, *req.failure])
        return await self._call(lambda: self.c.etcd.txn(req, self.c.host), writes=writes, timeout=timeout)

    async def Range(self, req: Any, timeout: float | None = None, metadata: Any = None) -> Any:
        return await self._call(lambda: self.c.etcd.range(req), writes=False, timeout=timeout)

    # Lease
    async def LeaseGrant(self, req: Any, timeout: float | None = None, metadata: Any = None) -> Any:
        return await self._call(lambda: self.c.etcd.lease_grant(req), writes=True, timeout=timeout)

    async def LeaseRevoke(self, req: Any, timeout: float | None = None, metadata: Any = None) -> Any:
        return await self._call(lambda: self.c.etcd.lease_revoke(req), writes=True, timeout=timeout)

    async def LeaseKeepAlive(self, reqs: Iterable[Any], timeout: float | None = None,
                             metadata: Any = None) -> AsyncIterator[Any]:
        etcd = self.c.etcd
        for r in reqs:
            yield await self._call(functools.partial(etcd.lease_keepalive, r), writes=True, timeout=timeout)


class SimEtcdClient(aetcd.Client):  # type: ignore[misc]
    """aetcd's real client, its stubs on a ``SimEtcd`` instead of a gRPC
    channel, as ``host``. ``inline``: every call completes without waiting
    (the client of an ``EtcdStore(client=...)``); else it waits the store's
    latency and, across a fault, its deadline (an ``Election``'s)."""

    def __init__(self, etcd: SimEtcd, host: str, *, inline: bool, timeout_s: float = 2.0) -> None:
        super().__init__(timeout=timeout_s)  # type: ignore[arg-type]
        self.etcd = etcd
        self.host = host
        self.inline = inline
        self.timeout_s = timeout_s
        self.closed = False

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        stubs = _Stubs(self)
        self.kvstub = self.leasestub = stubs
        self.metadata = None
        self._connected.set()

    async def close(self) -> None:
        self.closed = True

    async def watch_prefix(self, *_: Any, **__: Any) -> Any:
        raise NotImplementedError("sim etcd: watches are not modelled (the coordinator does not use them)")
