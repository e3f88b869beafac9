"""The coordinator's store on etcd (issue 12): several coordinators, one leader.

``EtcdStore`` implements ``coordinator.store.Store`` -- the same methods, the
same records and the same errors as the SQLite ``CoordinatorDB`` -- on an
etcd v3 cluster, through the ``aetcd`` client. Keys, under ``prefix``
(default ``/syncrep/v1/``; a name in a key is percent-encoded):

* ``meta/schema``: ``{"schema_version": 1, "cluster": NAME}``. A store that
  holds another version, another cluster's data, or keys without this one is
  refused at start, naming what it found.
* ``volumes/<name>``: the whole ``PairRecord`` -- failed extents and resync
  progress included -- as one JSON value, one key per volume like Physalia's
  per-volume cells, so that every change of a volume is one key's CAS.
* ``nodes/<address>``, ``grants/<volume>/<user>``.
* ``events/<volume>/<seq, zero-padded>``: append-only. A pair update and the
  event recording its state change are ONE etcd transaction (as in SQLite);
  an ``EventRecord.id`` is the etcd revision that wrote it (global order).

Consistency. EVERY update of a volume key is a compare-and-swap on the
``mod_revision`` this store last read or wrote for it (its cache; ``reload()``
and the reads refresh it): if another writer changed the key since, the
transaction does nothing and ``StoreConflict`` names the key; the caller
reloads and decides again. An epoch is raised only by such a transaction, so
two stores can never hand out the same epoch of a volume. EVERY write is
also fenced when a ``fence`` is given (``Election.fence``: the election key and
this coordinator's value in it, or None when it does not lead): the
transaction also compares that the election key still holds that value, so a
deposed leader that still believes it leads writes nothing (``NotLeader``).
No fence: one coordinator on the store (no election).

Synchronous, like ``CoordinatorDB``: the service calls the store from its
event loop and expects an answer, so aetcd runs on an event loop of its own
in a background thread and each call waits for it with
``run_coroutine_threadsafe(...).result(timeout=op_timeout_s)``. A timeout or
an unreachable etcd (no quorum) raises ``StoreUnavailable`` naming the
endpoints: the outcome of a write that timed out is unknown (it may still
commit), which the next CAS catches (the cache is then stale). At start an
unreachable etcd is logged once, clearly, then retried with backoff
(tenacity) for up to ``start_timeout_s``.

Several endpoints: one gRPC channel over all of them (``round_robin``: a dead
member is skipped). Host names are resolved once, at start.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote

import aetcd  # type: ignore[import-untyped]
import aetcd.exceptions  # type: ignore[import-untyped]
import grpc
from aetcd import rpc as etcd_rpc  # type: ignore[import-untyped]
from aetcd import watcher as etcd_watcher  # type: ignore[import-untyped]
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from coordinator.db import (
    DBError,
    EventRecord,
    GrantRecord,
    NodeRecord,
    PairExists,
    PairRecord,
    ProgressRecord,
    StateChange,
)
from coordinator.store import NotLeader, StoreConflict, StoreUnavailable
from syncrep.blockstore import Extent
from syncrep.core.pairstate import PairState

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_OP_TIMEOUT_S",
    "DEFAULT_PREFIX",
    "DEFAULT_START_TIMEOUT_S",
    "ETCD_SCHEMA_VERSION",
    "EtcdStore",
    "EtcdTls",
    "Fence",
    "connect_client",
    "default_server_name",
    "grpc_target",
]

DEFAULT_PREFIX = "/syncrep/v1/"
#: The version of the key layout above (meta/schema).
ETCD_SCHEMA_VERSION = 1
#: The bound of one store call (every RPC it makes, together).
DEFAULT_OP_TIMEOUT_S = 2.0
#: After a call timed out, the next calls fail at once (StoreUnavailable)
#: until a probe on the store's own loop is answered; the probe is retried
#: this often. Why: the service calls the store synchronously from its event
#: loop, so without this a leader cut from etcd sat op_timeout_s in every
#: call (every heartbeat's save), and its status answers, CoordinatorInfo
#: and health checks waited behind each one.
PROBE_INTERVAL_S = 0.5
#: How long the store keeps retrying an unreachable etcd at start.
DEFAULT_START_TIMEOUT_S = 30.0
#: The backoff between those retries (tenacity's exponential jitter).
START_RETRY_INITIAL_S = 0.2
START_RETRY_MAX_S = 5.0
#: The key directories of the store's data (meta/ aside).
_DATA_DIRS = ("volumes", "nodes", "grants", "events")
#: Event sequence numbers are zero-padded to this many digits (keys sort as numbers).
_SEQ_DIGITS = 12

#: ``Election.fence``: (election key, this coordinator's value in it), or None when it does not lead.
Fence = Callable[[], "tuple[bytes, bytes] | None"]

T = TypeVar("T")


# ---------------------------------------------------------------- the client


def grpc_target(endpoints: Sequence[str]) -> str:
    """The gRPC target of ``endpoints`` ("host:port" each): one endpoint as it
    is (gRPC's DNS resolver); several as one ``ipv4:``/``ipv6:`` address list
    (host names resolved now), which the round_robin policy balances over."""
    if not endpoints:
        raise ValueError("no etcd endpoint given")
    if len(endpoints) == 1:
        return endpoints[0]
    v4: list[str] = []
    v6: list[str] = []
    for ep in endpoints:
        host, _, port = ep.rpartition(":")
        host = host.strip("[]")
        try:
            ips = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, int(port), proto=socket.IPPROTO_TCP)
            except OSError as e:
                raise StoreUnavailable(f"etcd endpoint {ep}: cannot resolve {host!r}: {e}") from None
            ips = [ipaddress.ip_address(i[4][0]) for i in infos]
        for ip in dict.fromkeys(ips):
            (v4 if ip.version == 4 else v6).append(f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}")
    if v4 and v6:
        # gRPC's address-list targets take one family; IPv4 is the common one.
        log.warning("etcd endpoints %s: mixing IPv4 and IPv6, using the IPv4 addresses only", list(endpoints))
    return "ipv4:" + ",".join(v4) if v4 else "ipv6:" + ",".join(v6)


@dataclass(frozen=True)
class EtcdTls:
    """TLS to etcd (``--store etcds://``): ``ca_crt`` verifies every member's
    certificate, ``cert``/``key`` are presented as the client certificate
    (etcd's ``--client-cert-auth``), ``server_name`` is the name every
    member's certificate must carry. Why one name for all: one gRPC channel
    balances over the members (round_robin) and checks each handshake
    against the channel's single target name, so a member's own host name
    cannot be checked per member; give every member's certificate a shared
    name (a cluster DNS name, or the addresses of all members)."""

    ca_crt: bytes
    cert: bytes
    key: bytes
    server_name: str
    source: str = ""  # where the files came from, for messages

    @classmethod
    def from_certs_dir(cls, certs_dir: Path, server_name: str) -> EtcdTls:
        """``certs_dir`` laid out as syncrep's: ca.crt, node.crt, node.key
        (certs.CertError naming the missing or broken file)."""
        from syncrep import certs

        files = certs.load_node_tls(Path(certs_dir))
        return cls(files.ca_crt, files.cert, files.key, server_name, str(certs_dir))

    def describe(self) -> str:
        return f"TLS (certificates from {self.source or '?'}, etcd's certificates checked for {self.server_name!r})"


def default_server_name(endpoints: Sequence[str]) -> str:
    """The host of the first endpoint (brackets of an IPv6 address removed)."""
    host = endpoints[0].rpartition(":")[0]
    return host.strip("[]")


class _Client(aetcd.Client):  # type: ignore[misc]
    """aetcd's client on a gRPC target of our choice (several endpoints, round_robin):
    aetcd's own ``connect`` dials exactly one ``host:port``. With ``tls``, a
    secure channel (aetcd's own TLS takes files and one endpoint)."""

    def __init__(self, target: str, timeout_s: float, tls: EtcdTls | None = None) -> None:
        options: dict[str, Any] = {"grpc.lb_policy_name": "round_robin", "grpc.enable_retries": 0}
        if tls is not None:
            options["grpc.ssl_target_name_override"] = tls.server_name
        super().__init__(
            timeout=timeout_s,  # type: ignore[arg-type]  # every RPC's deadline (a float is fine for gRPC)
            options=options,
        )
        self._target = target
        self._tls = tls

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._tls is None:
            self.channel = etcd_rpc.insecure_channel(self._target, options=list(self._options.items()))
        else:
            creds = grpc.ssl_channel_credentials(
                root_certificates=self._tls.ca_crt, private_key=self._tls.key, certificate_chain=self._tls.cert
            )
            self.channel = etcd_rpc.secure_channel(self._target, creds, options=list(self._options.items()))
        self.kvstub = etcd_rpc.KVStub(self.channel)
        self.clusterstub = etcd_rpc.ClusterStub(self.channel)
        self.leasestub = etcd_rpc.LeaseStub(self.channel)
        self.maintenancestub = etcd_rpc.MaintenanceStub(self.channel)
        self._watcher = etcd_watcher.Watcher(
            etcd_rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()


def connect_client(endpoints: Sequence[str], timeout_s: float = DEFAULT_OP_TIMEOUT_S,
                   tls: EtcdTls | None = None) -> Any:
    """An aetcd client over ``endpoints`` (connected on first use, on the running
    loop); plaintext, or TLS with ``tls``."""
    return _Client(grpc_target(endpoints), timeout_s, tls)


async def _close_quietly(client: Any) -> None:
    """Close a client replaced by a reload (its calls have had their time)."""
    try:
        await client.close()
    except Exception as e:  # a channel to a dead etcd: nothing to keep
        log.debug("etcd: closing a replaced client: %s", e)


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    return (
        aetcd.exceptions.ConnectionFailedError,
        aetcd.exceptions.ConnectionTimeoutError,
        concurrent.futures.TimeoutError,
        asyncio.TimeoutError,
    )


# ---------------------------------------------------------------- encoding


def _pair_to_json(pair: PairRecord) -> dict[str, Any]:
    p = pair.progress
    return {
        "name": pair.name,
        "size_bytes": pair.size_bytes,
        "block_size": pair.block_size,
        "primary": pair.primary,
        "secondary": pair.secondary,
        "epoch": pair.epoch,
        "state": PairState(pair.state).value,
        "failed_extents": [[e.offset, e.length] for e in pair.failed_extents],
        "fault_snapshot_id": pair.fault_snapshot_id,
        "resync_mode": pair.resync_mode,
        "progress": [p.bytes_done, p.bytes_total, p.rate_bytes_per_s, p.eta_s, p.round],
        "last_error": pair.last_error,
        "state_changed_at": pair.state_changed_at,
        "created_at": pair.created_at,
        "volume_uuid": pair.volume_uuid,
        "generation": pair.generation,
        "secondary_generation": pair.secondary_generation,
        "auto_failover": pair.auto_failover,
        "full_copy_pending": pair.full_copy_pending,
        "revert_generation": pair.revert_generation,
    }


def _pair_from_json(d: dict[str, Any]) -> PairRecord:
    done, total, rate, eta, rnd = d["progress"]
    return PairRecord(
        name=d["name"],
        size_bytes=d["size_bytes"],
        block_size=d["block_size"],
        primary=d["primary"],
        secondary=d["secondary"],
        epoch=d["epoch"],
        state=PairState(d["state"]),
        failed_extents=tuple(Extent(o, n) for o, n in d["failed_extents"]),
        fault_snapshot_id=d["fault_snapshot_id"],
        resync_mode=d["resync_mode"],
        progress=ProgressRecord(
            bytes_done=done, bytes_total=total, rate_bytes_per_s=rate, eta_s=eta, round=rnd
        ),
        last_error=d["last_error"],
        state_changed_at=d["state_changed_at"],
        created_at=d["created_at"],
        volume_uuid=d["volume_uuid"],
        generation=d["generation"],
        secondary_generation=d["secondary_generation"],
        auto_failover=d["auto_failover"],
        full_copy_pending=d["full_copy_pending"],
        revert_generation=d["revert_generation"],
    )


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def _q(name: str) -> str:
    """A name as one key segment (no '/' left in it)."""
    return quote(name, safe="")


@dataclass(frozen=True)
class _Cached:
    """What this store last read or wrote of a volume key: the CAS's expectation."""

    pair: PairRecord
    create_revision: int  # this incarnation of the key (a re-created volume has another)
    mod_revision: int
    event_seq: int  # the last event's sequence number of this volume


# ---------------------------------------------------------------- the store


async def _cancel_other_tasks() -> None:
    me = asyncio.current_task()
    rest = [t for t in asyncio.all_tasks() if t is not me]
    for t in rest:
        t.cancel()
    await asyncio.gather(*rest, return_exceptions=True)


class EtcdStore:
    """``coordinator.store.Store`` on etcd at ``endpoints`` ("host:port" each).

    ``fence``: see the module docstring. ``cluster``: a name recorded in
    ``meta/schema`` at first use; a store holding another one is refused.
    ``clock``: wall-clock time of the persisted timestamps (default ``time.time``).
    ``client``: an aetcd-like client to use instead of connecting to
    ``endpoints`` (the simulator's in-memory etcd, deploy/simstore.py): its
    calls must complete without waiting, so each store call runs it to
    completion inline, on the caller's thread, with no loop or thread of
    the store's own; the election then runs on the caller's loop.
    """

    def __init__(
        self,
        endpoints: Sequence[str] | str,
        *,
        prefix: str = DEFAULT_PREFIX,
        fence: Fence | None = None,
        cluster: str = "",
        op_timeout_s: float = DEFAULT_OP_TIMEOUT_S,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
        clock: Callable[[], float] | None = None,
        client: Any = None,
        tls: EtcdTls | None = None,
    ) -> None:
        if isinstance(endpoints, str):
            endpoints = [e.strip() for e in endpoints.split(",") if e.strip()]
        if not endpoints:
            raise ValueError("EtcdStore: no etcd endpoint given (expected host:port[,host:port...])")
        if not prefix.endswith("/"):
            raise ValueError(f"EtcdStore: prefix {prefix!r} must end with '/'")
        if not op_timeout_s > 0 or not start_timeout_s >= 0:
            raise ValueError("EtcdStore: op_timeout_s must be > 0 and start_timeout_s >= 0")
        self.endpoints = tuple(endpoints)
        self.prefix = prefix
        self.fence = fence
        self.cluster = cluster
        self.op_timeout_s = op_timeout_s
        self.start_timeout_s = start_timeout_s
        self.tls = tls
        self._wall: Callable[[], float] = clock if clock is not None else (lambda: time.time())
        self._cache: dict[str, _Cached] = {}
        self._closed = False
        # Set while etcd is taken to be unreachable (a call timed out and no
        # probe was answered since): (time.monotonic() it began, the call).
        self._down: tuple[float, str] | None = None

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: Any = client
        # The client the volumes/ watch streams on (a SIGHUP keeps it open:
        # reload_tls), and clients replaced by reload_tls still to close.
        self._watch_client: Any = None
        self._retired: list[Any] = []
        if client is not None:
            self._start()
            return
        loop = self._loop = asyncio.new_event_loop()
        thread = self._thread = threading.Thread(
            target=loop.run_forever, name=f"etcd-store {','.join(self.endpoints)}", daemon=True
        )
        thread.start()
        try:
            self._client = self._run("connect", self._make_client())
            self._start()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ plumbing

    async def _make_client(self) -> Any:
        return connect_client(self.endpoints, self.op_timeout_s, self.tls)

    def reload_tls(self, tls: EtcdTls, election: Any = None) -> str:
        """SIGHUP (issue 11): the connections to etcd made from now on present
        ``tls``'s certificates (read and checked by the caller:
        ``EtcdTls.from_certs_dir``); calls go to a new client at once, and the
        election's too when given (it runs on this loop). What is in flight is
        not cut: a call on the old client finishes on it, which is then closed
        after ``op_timeout_s``; the volumes/ watch keeps streaming on its own
        connection until the store closes (a watch restarted would miss the
        changes made meanwhile). Returns what was done; "" without TLS or with
        an injected client (nothing of ours to replace)."""
        if self._loop is None or self.tls is None or self._closed:
            return ""
        loop = self._loop

        async def swap() -> None:
            old, self._client = self._client, connect_client(self.endpoints, self.op_timeout_s, tls)
            self.tls = tls
            if old is not None:
                self._retired.append(old)  # closed by close(), or below
            if old is not None and old is not self._watch_client:

                async def close_old() -> None:
                    if old in self._retired:  # not closed by close() meanwhile
                        self._retired.remove(old)
                        await _close_quietly(old)

                loop.call_later(self.op_timeout_s, lambda: loop.create_task(close_old()))
            if election is not None:
                election.use_tls(tls)

        asyncio.run_coroutine_threadsafe(swap(), loop).result(timeout=self.op_timeout_s)
        return (f"etcd client certificates reloaded from {tls.source or '?'} (connections to etcd made from "
                "now on present them; those open keep theirs)")

    def _where(self) -> str:
        return f"etcd at {','.join(self.endpoints)} (prefix {self.prefix})"

    def _unreachable_hint(self) -> str:
        """What to check when etcd does not answer: a TLS mismatch looks the
        same as a dead member to a gRPC client (UNAVAILABLE)."""
        if self.tls is None:
            return " (if etcd serves TLS, use --store etcds://)"
        return (f" (over TLS with the certificates from {self.tls.source or '?'}: is each member's "
                f"certificate signed by that ca.crt and does it name {self.tls.server_name!r} "
                "(--etcd-server-name)? does etcd trust that client certificate? does it serve https?)")

    def _run(self, what: str, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the store's loop; wait at most ``op_timeout_s``."""
        if self._closed:
            coro.close()
            raise DBError(f"{self._where()}: the store is closed ({what})")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError(f"EtcdStore.{what} called from the store's own thread (a watch callback?)")
        down = self._down
        if down is not None:
            coro.close()
            raise StoreUnavailable(
                f"{self._where()} has not answered since {time.monotonic() - down[0]:.1f} s ago ({down[1]} "
                f"timed out); {what} not tried: calls fail at once until a probe (every {PROBE_INTERVAL_S:g} s) "
                "is answered (a write's outcome before that is unknown)"
            )
        try:
            return self._wait(coro)
        except concurrent.futures.CancelledError:
            # close() cancelled it: the coordinator is stopping.
            raise DBError(f"{self._where()}: the store was closed during {what}") from None
        except concurrent.futures.TimeoutError:
            self._start_probe(what)
            raise StoreUnavailable(
                f"{self._where()} did not answer {what} within {self.op_timeout_s:g} s (op_timeout_s): "
                "is a quorum of its members up and reachable? (a write's outcome is unknown)"
            ) from None
        except _unavailable_errors() as e:
            raise StoreUnavailable(
                f"{self._where()} is unreachable or has no quorum ({what}): {type(e).__name__}: {e}"
                + self._unreachable_hint()
            ) from None
        except aetcd.exceptions.ClientError as e:
            raise DBError(f"{self._where()}: {what} failed: {type(e).__name__}: {e}") from None

    def _start_probe(self, what: str) -> None:
        """A call timed out: fail the next ones at once, and probe etcd on the
        store's loop until it answers (threaded mode only: an injected,
        inline client never waits)."""
        if self._loop is None or self._closed or self._down is not None:
            return
        self._down = (time.monotonic(), what)
        log.warning("%s did not answer %s within %g s: later calls fail at once until it answers a probe "
                    "(every %g s)", self._where(), what, self.op_timeout_s, PROBE_INTERVAL_S)
        asyncio.run_coroutine_threadsafe(self._probe_until_answered(), self._loop)

    async def _probe_until_answered(self) -> None:
        down = self._down
        while not self._closed:
            try:
                await asyncio.wait_for(self._range(self._key("meta", "schema")), self.op_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # every failure means "not yet"; which one is logged at debug
                log.debug("%s: probe not answered: %s: %s", self._where(), type(e).__name__, e)
                await asyncio.sleep(PROBE_INTERVAL_S)
                continue
            self._down = None
            since = time.monotonic() - down[0] if down is not None else 0.0
            log.warning("%s answers again (after %.1f s); calls go through again", self._where(), since)
            return

    def _wait(self, coro: Coroutine[Any, Any, T]) -> T:
        """``coro``'s result, on the store's loop within ``op_timeout_s``; inline
        with an injected client (``client=``), which must not wait."""
        if self._loop is None:
            try:
                coro.send(None)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            coro.close()
            raise RuntimeError("EtcdStore: the injected client's call waited (it must complete inline)")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout=self.op_timeout_s)
        except concurrent.futures.TimeoutError:
            if not self._closed:  # after close() the loop is gone: nothing left to cancel on it
                fut.cancel()
            raise

    def _key(self, *parts: str) -> bytes:
        return (self.prefix + "/".join(parts)).encode()

    def _vol_key(self, name: str) -> bytes:
        return self._key("volumes", _q(name))

    def _event_key(self, volume: str, seq: int) -> bytes:
        return self._key("events", _q(volume), f"{seq:0{_SEQ_DIGITS}d}")

    def _event_value(
        self,
        ts: float,
        volume: str,
        from_state: PairState | None,
        to_state: PairState | None,
        epoch: int,
        reason: str,
    ) -> bytes:
        return _dumps(
            {
                "ts": ts,
                "volume": volume,
                "from_state": None if from_state is None else PairState(from_state).value,
                "to_state": None if to_state is None else PairState(to_state).value,
                "epoch": epoch,
                "reason": reason,
            }
        )

    def _fence_compares(self, what: str) -> tuple[list[Any], bytes | None]:
        """The fence's compare (and the election key), or NotLeader when the election says we do not lead."""
        if self.fence is None:
            return [], None
        f = self.fence()
        if f is None:
            raise NotLeader(f"{what} refused: this coordinator does not lead (it holds no election key)")
        key, value = f
        return [self._client.transactions.value(key) == value], key

    async def _range(
        self,
        key: bytes,
        *,
        prefix: bool = False,
        limit: int = 0,
        descend: bool = False,
        keys_only: bool = False,
    ) -> tuple[int, list[Any]]:
        """A linearizable range read: (the store's revision, the KeyValues)."""
        await self._client.connect()
        req = etcd_rpc.RangeRequest(key=key, limit=limit, keys_only=keys_only)
        if prefix:
            req.range_end = aetcd.utils.prefix_range_end(key)
        req.sort_target = etcd_rpc.RangeRequest.KEY
        req.sort_order = etcd_rpc.RangeRequest.DESCEND if descend else etcd_rpc.RangeRequest.ASCEND
        try:
            resp = await self._client.kvstub.Range(
                req, timeout=self.op_timeout_s, metadata=self._client.metadata
            )
        except etcd_rpc.AioRpcError as e:
            aetcd.exceptions._handle_exception(e)
        return resp.header.revision, list(resp.kvs)

    async def _txn(
        self, compare: list[Any], success: list[Any], failure: list[Any]
    ) -> tuple[bool, list[Any]]:
        ok, responses = await self._client.transaction(compare=compare, success=success, failure=failure)
        return bool(ok), list(responses)

    def _cache_kv(self, kv: Any) -> PairRecord:
        d = json.loads(kv.value)
        pair = _pair_from_json(d["pair"])
        self._cache[pair.name] = _Cached(pair, kv.create_revision, kv.mod_revision, int(d["event_seq"]))
        return pair

    def _vol_value(self, pair: PairRecord, event_seq: int) -> bytes:
        return _dumps({"pair": _pair_to_json(pair), "event_seq": event_seq})

    def _why_failed(self, what: str, key: str, fence_key: bytes | None, responses: list[Any]) -> DBError:
        """The error of a transaction whose compares failed; ``responses``: the
        failure branch's reads, the election key's last when fenced."""
        if fence_key is not None and self.fence is not None:
            got = responses[-1]
            holder = got[0][0].decode(errors="replace") if got else None
            f = self.fence()
            if f is None or not got or got[0][0] != f[1]:
                from coordinator.election import leader_of_value

                leader = leader_of_value(got[0][0]) if got else None
                return NotLeader(
                    f"{what} refused: this coordinator no longer leads "
                    f"(the election key {fence_key.decode()} holds {holder!r})",
                    leader=leader,
                )
        return StoreConflict(key)

    def _start(self) -> None:
        """Check (or write) meta/schema, retrying an unreachable etcd for up to start_timeout_s."""
        warned = False

        def before_sleep(state: Any) -> None:
            nonlocal warned
            if not warned:
                warned = True
                log.warning(
                    "%s: %s; retrying with backoff for up to %g s (start_timeout_s)",
                    self._where(),
                    state.outcome.exception(),
                    self.start_timeout_s,
                )

        retrying = Retrying(
            stop=stop_after_delay(self.start_timeout_s),
            wait=wait_exponential_jitter(multiplier=START_RETRY_INITIAL_S, max=START_RETRY_MAX_S),
            retry=retry_if_exception_type(StoreUnavailable),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    self._run("the schema check", self._check_schema())
        except StoreUnavailable as e:
            last = str(e).removeprefix(self._where() + " ")  # said once, not twice
            raise StoreUnavailable(
                f"{self._where()} still unreachable after {self.start_timeout_s:g} s (start_timeout_s); "
                f"last: {last}"
            ) from None
        if warned:
            log.info("%s: reachable, schema version %d", self._where(), ETCD_SCHEMA_VERSION)

    async def _check_schema(self) -> None:
        key = self._key("meta", "schema")
        mine = {"schema_version": ETCD_SCHEMA_VERSION, "cluster": self.cluster}
        t = self._client.transactions
        # Keys of ours without meta/schema: a damaged store, or another
        # program's keys under our prefix. (Other keys -- the election key,
        # by default under the same prefix -- are not the store's.)
        ours = [self._key(d, "") for d in _DATA_DIRS]
        ok, responses = await self._txn(
            [t.create(key) == 0, *(t.create(d, aetcd.utils.prefix_range_end(d)) == 0 for d in ours)],
            [t.put(key, _dumps(mine))],
            [t.get(key)],
        )
        if ok:
            log.info("%s: new syncrep store (schema version %d)", self._where(), ETCD_SCHEMA_VERSION)
            return
        got = responses[0]
        if not got:
            kvs = []
            for d in ours:
                kvs += (await self._range(d, prefix=True, limit=3, keys_only=True))[1]
            raise DBError(
                f"{self._where()} holds keys but no meta/schema (e.g. {[kv.key.decode(errors='replace') for kv in kvs]}): "
                "not a syncrep coordinator store, or a damaged one; use another --store prefix or clean it up"
            )
        try:
            found = json.loads(got[0][0])
            version = int(found["schema_version"])
            cluster = str(found.get("cluster", ""))
        except (ValueError, KeyError, TypeError):
            raise DBError(
                f"{self._where()}: meta/schema holds {got[0][0][:200]!r}, not a syncrep schema record"
            ) from None
        if version != ETCD_SCHEMA_VERSION:
            newer = "a newer coordinator" if version > ETCD_SCHEMA_VERSION else "a migration of it"
            raise DBError(
                f"{self._where()} has schema version {version}, this coordinator understands version "
                f"{ETCD_SCHEMA_VERSION}; it needs {newer}"
            )
        if cluster != self.cluster:
            raise DBError(
                f"{self._where()} holds the data of cluster {cluster!r}, not {self.cluster!r}: "
                "refusing to use another cluster's store"
            )

    def close(self) -> None:
        if self._closed:
            return
        client = getattr(self, "_client", None)
        if self._loop is None:  # an injected client: nothing of ours runs
            self._closed = True
            if client is not None:
                with contextlib.suppress(Exception):
                    self._wait(client.close())
            return
        for c in [client, *self._retired]:
            if c is None:
                continue
            fut = asyncio.run_coroutine_threadsafe(c.close(), self._loop)
            try:
                fut.result(timeout=self.op_timeout_s)
            except Exception as e:  # closing a channel to a dead etcd: nothing to keep
                log.debug("%s: closing the client: %s", self._where(), e)
        self._retired.clear()
        self._closed = True
        # Calls still in flight (a store call from a thread, the election's
        # keepalive) end now, cancelled, rather than time out against a closed
        # loop after it (a stop without a traceback).
        cancel = asyncio.run_coroutine_threadsafe(_cancel_other_tasks(), self._loop)
        try:
            cancel.result(timeout=self.op_timeout_s)
        except Exception as e:
            log.debug("%s: cancelling the calls in flight: %s", self._where(), e)
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(timeout=self.op_timeout_s)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> EtcdStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ nodes

    def upsert_node(self, address: str, role_hint: str, registered_at: float | None = None) -> NodeRecord:
        ts = self._wall() if registered_at is None else registered_at
        compare, fence_key = self._fence_compares(f"registering node {address}")
        t = self._client.transactions
        ok, responses = self._run(
            "upsert_node",
            self._txn(
                compare,
                [
                    t.put(
                        self._key("nodes", _q(address)), _dumps({"role_hint": role_hint, "registered_at": ts})
                    )
                ],
                [] if fence_key is None else [t.get(fence_key)],
            ),
        )
        if not ok:
            raise self._why_failed(f"registering node {address}", f"nodes/{address}", fence_key, responses)
        return NodeRecord(address, role_hint, ts)

    @staticmethod
    def _node_from_kv(address: str, value: bytes) -> NodeRecord:
        d = json.loads(value)
        return NodeRecord(address, d["role_hint"], d["registered_at"])

    def get_node(self, address: str) -> NodeRecord | None:
        _, kvs = self._run("get_node", self._range(self._key("nodes", _q(address))))
        return self._node_from_kv(address, kvs[0].value) if kvs else None

    def list_nodes(self) -> list[NodeRecord]:
        base = self._key("nodes", "")
        _, kvs = self._run("list_nodes", self._range(base, prefix=True))
        nodes = [self._node_from_kv(unquote(kv.key[len(base) :].decode()), kv.value) for kv in kvs]
        return sorted(nodes, key=lambda n: n.address)

    # ------------------------------------------------------------ pairs

    async def _last_event_seq(self, volume: str) -> int:
        _, kvs = await self._range(
            self._key("events", _q(volume), ""), prefix=True, limit=1, descend=True, keys_only=True
        )
        return int(kvs[0].key.rsplit(b"/", 1)[1]) if kvs else 0

    def create_pair(self, pair: PairRecord, reason: str, at: float | None = None) -> PairRecord:
        now = self._wall() if at is None else at
        pair = replace(pair, created_at=pair.created_at or now, state_changed_at=pair.state_changed_at or now)
        what = f"creating volume {pair.name!r}"
        compare, fence_key = self._fence_compares(what)
        key = self._vol_key(pair.name)
        # The events of an earlier volume of this name stay: continue after them.
        seq = self._run("create_pair", self._last_event_seq(pair.name)) + 1
        ev_key = self._event_key(pair.name, seq)
        t = self._client.transactions
        ok, responses = self._run(
            "create_pair",
            self._txn(
                [t.create(key) == 0, t.create(ev_key) == 0, *compare],
                [
                    t.put(key, self._vol_value(pair, seq)),
                    t.put(ev_key, self._event_value(now, pair.name, None, pair.state, pair.epoch, reason)),
                ],
                [t.get(key)] + ([] if fence_key is None else [t.get(fence_key)]),
            ),
        )
        if not ok:
            err = self._why_failed(what, f"volumes/{pair.name}", fence_key, responses)
            if isinstance(err, NotLeader):
                raise err
            if responses[0]:
                raise PairExists(pair.name)
            raise err  # an event key of that sequence appeared: a concurrent creator
        rev = responses[0].response_put.header.revision
        self._cache[pair.name] = _Cached(pair, rev, rev, seq)
        return pair

    def _cached(self, name: str, what: str) -> _Cached | None:
        """This store's view of ``name`` (read now if it has none: None when absent)."""
        c = self._cache.get(name)
        if c is None:
            self.get_pair(name)
            c = self._cache.get(name)
        return c

    def _write_pair(
        self, what: str, pair: PairRecord, cached: _Cached, event: bytes | None, *, missing: Callable[[], T]
    ) -> PairRecord | T:
        """CAS the volume key from ``cached`` to ``pair`` (+ ``event`` as the next event)."""
        compare, fence_key = self._fence_compares(what)
        key = self._vol_key(pair.name)
        t = self._client.transactions
        seq = cached.event_seq + (1 if event is not None else 0)
        success = [t.put(key, self._vol_value(pair, seq))]
        cmp = [t.mod(key) == cached.mod_revision, *compare]
        if event is not None:
            ev_key = self._event_key(pair.name, seq)
            success.append(t.put(ev_key, event))
            cmp.append(t.create(ev_key) == 0)
        ok, responses = self._run(
            what, self._txn(cmp, success, [t.get(key)] + ([] if fence_key is None else [t.get(fence_key)]))
        )
        if not ok:
            err = self._why_failed(what, f"volumes/{pair.name}", fence_key, responses)
            if isinstance(err, NotLeader):
                raise err
            if not responses[0]:
                self._cache.pop(pair.name, None)
                return missing()
            raise StoreConflict(
                f"volumes/{pair.name}",
                f"{what}: expected mod_revision {cached.mod_revision}, found {responses[0][0][1].mod_revision}",
            )
        rev = responses[0].response_put.header.revision
        self._cache[pair.name] = _Cached(pair, cached.create_revision, rev, seq)
        return pair

    def save_pair(
        self, pair: PairRecord, change: StateChange | None = None, at: float | None = None
    ) -> PairRecord:
        def missing() -> PairRecord:
            raise KeyError(f"volume {pair.name!r} does not exist")

        known = pair.name in self._cache
        cached = self._cached(pair.name, "save_pair")
        if cached is None:
            missing()
        assert cached is not None
        if not known:
            # A pair this store never read is a blind write: it could undo
            # another writer's change. Read it (get_pair/reload), then decide.
            raise StoreConflict(f"volumes/{pair.name}", "this store had not read it")
        event = None
        if change is not None:
            ts = self._wall() if at is None else at
            event = self._event_value(ts, pair.name, change.from_state, pair.state, pair.epoch, change.reason)
        # The identity fields never change (CoordinatorDB's UPDATE leaves them): keep the stored ones.
        stored = replace(
            pair,
            size_bytes=cached.pair.size_bytes,
            block_size=cached.pair.block_size,
            created_at=cached.pair.created_at,
        )
        what = f"saving volume {pair.name!r} (epoch {pair.epoch}, {PairState(pair.state).value})"
        self._write_pair(what, stored, cached, event, missing=missing)
        return pair  # as CoordinatorDB: the pair as given

    def resize_pair(self, name: str, size_bytes: int, reason: str, at: float | None = None) -> PairRecord:
        """As ``CoordinatorDB.resize_pair`` (issue 13): the pair's new size and
        its event (its state to the same state, at its epoch) in ONE
        transaction -- the only write that changes a pair's size (``save_pair``
        keeps the stored one). A CAS on the volume key's mod_revision, fenced,
        like every update here: a resize decided on a stale view raises
        ``StoreConflict`` (nothing written), a deposed leader's ``NotLeader``.
        Returns the pair as saved; KeyError if it does not exist."""

        def missing() -> PairRecord:
            raise KeyError(f"volume {name!r} does not exist")

        # Not a blind write even when this store never read the volume: the
        # record is read now and only its size changes, as SQLite's UPDATE.
        cached = self._cached(name, "resize_pair")
        if cached is None:
            missing()
        assert cached is not None
        pair = replace(cached.pair, size_bytes=size_bytes)
        ts = self._wall() if at is None else at
        event = self._event_value(ts, name, pair.state, pair.state, pair.epoch, reason)
        what = f"resizing volume {name!r} from {cached.pair.size_bytes} to {size_bytes} bytes"
        self._write_pair(what, pair, cached, event, missing=missing)
        return pair

    def update_progress(self, name: str, progress: ProgressRecord) -> None:
        cached = self._cached(name, "update_progress")
        if cached is None:
            return  # as CoordinatorDB: progress of an unknown volume changes nothing
        self._write_pair(
            f"saving the resync progress of {name!r}",
            replace(cached.pair, progress=progress),
            cached,
            None,
            missing=lambda: None,
        )

    def delete_pair(self, name: str, reason: str, at: float | None = None) -> bool:
        cached = self._cached(name, "delete_pair")
        if cached is None:
            return False
        what = f"deleting volume {name!r}"
        compare, fence_key = self._fence_compares(what)
        key = self._vol_key(name)
        seq = cached.event_seq + 1
        ev_key = self._event_key(name, seq)
        ts = self._wall() if at is None else at
        t = self._client.transactions
        grants = self._key("grants", _q(name), "")
        ok, responses = self._run(
            "delete_pair",
            self._txn(
                [t.mod(key) == cached.mod_revision, t.create(ev_key) == 0, *compare],
                [
                    t.delete(key),
                    # Its grants go with it: a volume created later under the
                    # same name starts with none.
                    t.delete(grants, aetcd.utils.prefix_range_end(grants)),
                    t.put(
                        ev_key,
                        self._event_value(ts, name, cached.pair.state, None, cached.pair.epoch, reason),
                    ),
                ],
                [t.get(key)] + ([] if fence_key is None else [t.get(fence_key)]),
            ),
        )
        if not ok:
            err = self._why_failed(what, f"volumes/{name}", fence_key, responses)
            if isinstance(err, NotLeader):
                raise err
            if not responses[0]:
                self._cache.pop(name, None)
                return False
            raise StoreConflict(f"volumes/{name}", what)
        self._cache.pop(name, None)
        return True

    def get_pair(self, name: str) -> PairRecord | None:
        _, kvs = self._run("get_pair", self._range(self._vol_key(name)))
        if not kvs:
            self._cache.pop(name, None)
            return None
        return self._cache_kv(kvs[0])

    def list_pairs(self) -> list[PairRecord]:
        _, kvs = self._run("list_pairs", self._range(self._key("volumes", ""), prefix=True))
        pairs = [self._cache_kv(kv) for kv in kvs]
        names = {p.name for p in pairs}
        for gone in set(self._cache) - names:
            del self._cache[gone]
        return sorted(pairs, key=lambda p: p.name)

    def pairs_for_node(self, address: str) -> list[PairRecord]:
        return [p for p in self.list_pairs() if address in (p.primary, p.secondary)]

    def reload(self) -> list[PairRecord]:
        """Re-read every volume (a follower refreshing, a new leader taking over):
        the CAS expectations become etcd's current revisions. Returns the pairs."""
        return self.list_pairs()

    # ------------------------------------------------------------ grants

    def _grant_key(self, volume: str, user: str) -> bytes:
        return self._key("grants", _q(volume), _q(user))

    @staticmethod
    def _grant_from_value(value: bytes) -> GrantRecord:
        d = json.loads(value)
        return GrantRecord(d["volume"], d["user"], bool(d["read_only"]), d["granted_at"])

    def set_grant(
        self, volume: str, user: str, read_only: bool, at: float | None = None
    ) -> GrantRecord | None:
        ts = self._wall() if at is None else at
        cached = self._cached(volume, "set_grant")
        if cached is None:
            raise KeyError(f"volume {volume!r} does not exist")
        what = f"granting {user!r} access to {volume!r}"
        compare, fence_key = self._fence_compares(what)
        t = self._client.transactions
        vkey, gkey = self._vol_key(volume), self._grant_key(volume, user)
        value = _dumps({"volume": volume, "user": user, "read_only": read_only, "granted_at": ts})
        ok, responses = self._run(
            "set_grant",
            self._txn(
                # The volume still exists, and is the incarnation this store knows.
                [t.create(vkey) == cached.create_revision, *compare],
                [t.get(gkey), t.put(gkey, value)],
                [t.get(vkey)] + ([] if fence_key is None else [t.get(fence_key)]),
            ),
        )
        if not ok:
            err = self._why_failed(what, f"volumes/{volume}", fence_key, responses)
            if isinstance(err, NotLeader):
                raise err
            self._cache.pop(volume, None)
            if not responses[0]:
                raise KeyError(f"volume {volume!r} does not exist")
            raise StoreConflict(f"volumes/{volume}", f"{what}: the volume was deleted and created again")
        before = responses[0]
        return self._grant_from_value(before[0][0]) if before else None

    def delete_grant(self, volume: str, user: str) -> GrantRecord | None:
        what = f"revoking {user!r}'s access to {volume!r}"
        compare, fence_key = self._fence_compares(what)
        t = self._client.transactions
        ok, responses = self._run(
            "delete_grant",
            self._txn(
                compare,
                [t.delete(self._grant_key(volume, user), prev_kv=True)],
                [] if fence_key is None else [t.get(fence_key)],
            ),
        )
        if not ok:
            raise self._why_failed(what, f"grants/{volume}/{user}", fence_key, responses)
        prev = responses[0].response_delete_range.prev_kvs
        return self._grant_from_value(prev[0].value) if prev else None

    def list_grants(self, volume: str | None = None) -> list[GrantRecord]:
        base = self._key("grants", "") if volume is None else self._key("grants", _q(volume), "")
        _, kvs = self._run("list_grants", self._range(base, prefix=True))
        return sorted((self._grant_from_value(kv.value) for kv in kvs), key=lambda g: (g.volume, g.user))

    # ------------------------------------------------------------ events

    def events(self, volume: str | None = None, limit: int | None = None) -> list[EventRecord]:
        base = self._key("events", "") if volume is None else self._key("events", _q(volume), "")
        _, kvs = self._run("events", self._range(base, prefix=True))
        kvs.sort(key=lambda kv: kv.create_revision)
        if limit is not None:
            kvs = kvs[-limit:] if limit > 0 else []
        out = []
        for kv in kvs:
            d = json.loads(kv.value)
            out.append(
                EventRecord(
                    id=kv.create_revision,
                    ts=d["ts"],
                    volume=d["volume"],
                    from_state=None if d["from_state"] is None else PairState(d["from_state"]),
                    to_state=None if d["to_state"] is None else PairState(d["to_state"]),
                    epoch=d["epoch"],
                    reason=d["reason"],
                )
            )
        return out

    def resync_started_at_epoch(self, volume: str, epoch: int) -> bool:
        return any(
            e.epoch == epoch and e.to_state is PairState.RESYNCING and e.from_state is not PairState.RESYNCING
            for e in self.events(volume)
        )

    # ------------------------------------------------------------ the election's loop

    def start_election(self, election: Any) -> None:
        """Run ``election`` (a ``coordinator.election.Election`` given endpoints)
        on this store's own loop, not the caller's: the service's loop blocks
        in every store call (up to ``op_timeout_s``), and an election on it
        would miss keepalives meanwhile. ``is_leader()``/``fence()`` stay
        callable from any thread; ``on_change`` then runs on the store's
        thread (hand it to your loop with ``call_soon_threadsafe``)."""
        self._run("starting the election", election.start())

    def stop_election(self, election: Any) -> None:
        """``election.resign()`` on this store's loop (bounded: its RPCs are)."""
        if self._loop is None:  # an injected client: the election runs on the caller's loop
            asyncio.get_running_loop().create_task(election.resign(), name="election resign")
            return
        fut = asyncio.run_coroutine_threadsafe(election.resign(), self._loop)
        try:
            fut.result(timeout=3 * self.op_timeout_s)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            log.warning("%s: resigning the election timed out; its lease expires by itself", self._where())

    # ------------------------------------------------------------ watch

    def watch_changes(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call ``callback(volume name)`` whenever a volume key changes (any writer).

        The callback runs on the store's own thread: it must not call the
        store (hand the name to your loop, e.g. ``loop.call_soon_threadsafe``).
        Returns a function that stops the watch."""
        base = self._key("volumes", "")

        async def start() -> Any:
            self._watch_client = self._client
            watch = await self._client.watch_prefix(base)

            async def pump() -> None:
                try:
                    async for ev in watch:
                        try:
                            callback(unquote(ev.kv.key[len(base) :].decode()))
                        except Exception:
                            log.exception("%s: watch callback failed", self._where())
                except Exception as e:
                    log.warning("%s: the watch of volumes/ ended: %s", self._where(), e)

            task = asyncio.get_running_loop().create_task(pump())
            return watch, task

        watch, task = self._run("watch_changes", start())

        def stop() -> None:
            if self._closed:
                return

            async def cancel() -> None:
                task.cancel()
                await watch.cancel()

            try:
                self._run("cancelling the watch", cancel())
            except DBError as e:
                log.debug("%s: cancelling the watch: %s", self._where(), e)

        return stop
