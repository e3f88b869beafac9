"""Prometheus metrics (issue 13): ``--metrics-listen HOST:PORT`` on every process.

Names follow the Prometheus conventions (the unit in the name, ``_total`` on
counters, base units: bytes and seconds), after drbd-reactor's
(``drbd_peerdevice_outofsync_bytes``, ``drbd_connection_apinflight_bytes``);
:data:`NODE_METRICS` and :data:`COORDINATOR_METRICS` list every family a
process exports (deploy/grafana/syncrep-dashboard.json uses only these, a
test checks it).

Why it is built this way:

* **Nothing on the write path but an addition.** The primary keeps plain
  integers and lock-free bucket counts (:class:`ReplicationStats`,
  :class:`Buckets`), touched only on the event loop: one ``bisect`` and two
  additions per acknowledged client write, one addition per ack message from
  the secondary. No prometheus_client metric object (each ``inc`` of those
  takes a lock) and nothing per block.
* **Everything else is read at scrape time**, by a custom Collector
  (:class:`NodeCollector`, :class:`CoordinatorCollector`) from the state the
  process keeps anyway (the pair record, the replication window, the lease,
  the coordinator's pairs and liveness), through a ``sample`` callable the
  process provides. Nothing is sprinkled through the code to keep a second
  copy of the state up to date, so the metrics cannot disagree with status.
* **On the event loop, without a thread.** :class:`MetricsServer` is a small
  asyncio HTTP/1.0 handler (no aiohttp): a scrape runs the collectors on the
  loop that owns the state, so it sees it consistent (no dict changing size
  under a reader thread, no lock). A scrape costs the loop well under a
  millisecond per volume; a loop that is stuck is also a scrape that hangs,
  which is what the operator should see.
* **One CollectorRegistry per process**, not prometheus_client's global
  default: several nodes and coordinators in one test process each export
  their own.

The port is plain HTTP without authentication: put it on a management
network or on loopback. It exposes figures (states, epochs, byte counts,
latencies, volume names and nothing of the data).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from syncrep import rpc
from syncrep.core.pairstate import PairState
from syncrep.core.vocab import parse_address
from syncrep.pb import syncrep_pb2 as pb

log = logging.getLogger(__name__)

__all__ = [
    "COORDINATOR_METRICS",
    "NODE_METRICS",
    "STALL_BUCKETS_S",
    "WRITE_LATENCY_BUCKETS_S",
    "Buckets",
    "CoordinatorCollector",
    "CoordinatorSample",
    "MetricsServer",
    "NodeCollector",
    "NodeSample",
    "ReplicationStats",
    "StreamCounter",
    "VolumeSample",
    "metrics_listen_type",
    "new_registry",
]

# Client write latency on the primary: from the write's arrival to its
# acknowledgement (local group commit and the secondary's ack, or tracked).
WRITE_LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
# Write stalls under the quiesce gate (degrade, the final resync round, a
# common snapshot): milliseconds normally; seconds are worth an alert.
STALL_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
# A scrape request (the request line and headers) must arrive within this
# long and this many bytes.
REQUEST_TIMEOUT_S = 5.0
MAX_REQUEST_BYTES = 8192

#: The states a node's own view of a pair can be in (``PairState``; the
#: status-only ``primary_lost`` is the coordinator's, never a node's).
NODE_STATES: tuple[str, ...] = tuple(s.value for s in PairState)
#: What the coordinator's status can show: the node states and ``primary_lost``.
STATUS_STATES: tuple[str, ...] = tuple(
    n.removeprefix("PAIR_STATE_").lower() for n in pb.PairState.keys() if n != "PAIR_STATE_UNSPECIFIED"
)
ROLES: tuple[str, ...] = tuple(n.removeprefix("ROLE_").lower() for n in pb.Role.keys() if n != "ROLE_UNSPECIFIED")

#: Every family a node exports: name -> (type, labels). ``histogram`` families
#: also have the ``_bucket``/``_sum``/``_count`` series.
NODE_METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "syncrep_volume_state": ("gauge", ("volume", "state")),
    "syncrep_volume_role": ("gauge", ("volume", "role")),
    "syncrep_volume_epoch": ("gauge", ("volume",)),
    "syncrep_volume_out_of_sync_bytes": ("gauge", ("volume",)),
    "syncrep_volume_write_latency_seconds": ("histogram", ("volume",)),
    "syncrep_replication_inflight_writes": ("gauge", ("volume",)),
    "syncrep_replication_inflight_bytes": ("gauge", ("volume",)),
    "syncrep_replication_acks_total": ("counter", ("volume",)),
    "syncrep_replication_nacks_total": ("counter", ("volume", "code")),
    "syncrep_resync_bytes_done": ("gauge", ("volume",)),
    "syncrep_resync_bytes_total": ("gauge", ("volume",)),
    "syncrep_resync_rate_bytes_per_second": ("gauge", ("volume",)),
    "syncrep_resync_eta_seconds": ("gauge", ("volume",)),
    "syncrep_quiesce_stall_seconds": ("histogram", ("volume",)),
    "syncrep_lease_remaining_seconds": ("gauge", ("volume",)),
    "syncrep_node_volumes": ("gauge", ()),
    "syncrep_node_open_streams": ("gauge", ()),
}
COORDINATOR_METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "syncrep_coordinator_nodes_alive": ("gauge", ()),
    "syncrep_coordinator_nodes": ("gauge", ()),
    "syncrep_coordinator_volumes": ("gauge", ("state",)),
    "syncrep_coordinator_is_leader": ("gauge", ()),
    "syncrep_coordinator_heartbeats": ("counter", ()),
    "syncrep_coordinator_volume_reports": ("counter", ()),
    "syncrep_coordinator_replication_reports": ("counter", ()),
}


def metrics_listen_type(text: str) -> str:
    """argparse ``type=`` for ``--metrics-listen`` ("" = off, else HOST:PORT)."""
    text = text.strip()
    if not text:
        return ""
    try:
        parse_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--metrics-listen: {e}") from None
    return text


# ---------------------------------------------------------------- the primary's counters


class Buckets:
    """A histogram's counts without a lock: observed and read on the event
    loop only. ``counts[i]`` counts the observations in ``(bounds[i-1],
    bounds[i]]``, the last one those above every bound (``+Inf``)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError(f"bucket bounds must be increasing and not empty: {bounds}")
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: (le, observations <= le), ``+Inf`` last."""
        out, n = [], 0
        for bound, c in zip((*self.bounds, float("inf")), self.counts, strict=True):
            n += c
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(n)))
        return out


@dataclass
class ReplicationStats:
    """One primary volume's counters, for as long as its write path lives
    (replication links come and go; these span them)."""

    #: Writes the secondary acknowledged.
    acks: int = 0
    #: NACKs received, by ``pb.NackCode`` value.
    nacks: dict[int, int] = field(default_factory=dict)
    write_latency: Buckets = field(default_factory=lambda: Buckets(WRITE_LATENCY_BUCKETS_S))
    stall: Buckets = field(default_factory=lambda: Buckets(STALL_BUCKETS_S))
    # The running resync (or the last one, once it ended): bytes of its
    # finished rounds, and the current round's figures.
    resync_rounds_bytes: int = 0
    resync_round_done: int = 0
    resync_round_total: int = 0

    def nack(self, code: int) -> None:
        self.nacks[code] = self.nacks.get(code, 0) + 1

    def resync_started(self) -> None:
        self.resync_rounds_bytes = self.resync_round_done = self.resync_round_total = 0

    def resync_progress(self, done: int, total: int) -> None:
        self.resync_round_done, self.resync_round_total = done, total

    def resync_round_sent(self, total: int) -> None:
        self.resync_rounds_bytes += total
        self.resync_round_done = self.resync_round_total = 0

    @property
    def resync_bytes_done(self) -> int:
        return self.resync_rounds_bytes + self.resync_round_done

    @property
    def resync_bytes_total(self) -> int:
        return self.resync_rounds_bytes + self.resync_round_total


# ---------------------------------------------------------------- samples (plain data)


@dataclass(frozen=True)
class VolumeSample:
    """What a node exports about one of its volumes. ``None``: not known
    here (a secondary knows neither the pair's state nor its out-of-sync
    figure; only a primary replicates and holds a lease)."""

    name: str
    role: str  # one of ROLES, or "unspecified"
    epoch: int
    state: str | None = None  # one of NODE_STATES
    out_of_sync_bytes: int | None = None
    inflight_writes: int = 0
    inflight_bytes: int = 0
    lease_remaining_s: float | None = None
    resync_rate_bytes_per_s: float = 0.0
    resync_eta_s: float = 0.0
    stats: ReplicationStats | None = None  # a primary's


@dataclass(frozen=True)
class NodeSample:
    volumes: Sequence[VolumeSample]
    open_streams: int


@dataclass(frozen=True)
class CoordinatorSample:
    nodes: int
    nodes_alive: int
    #: Volumes by the state their status shows (STATUS_STATES).
    volumes_by_state: dict[str, int]
    is_leader: bool
    #: Since the process started: Heartbeat calls handled, the volume
    #: reports they carried, ReportReplication calls handled.
    heartbeats: int = 0
    volume_reports: int = 0
    replication_reports: int = 0


# ---------------------------------------------------------------- collectors


def _nack_label(code: int) -> str:
    try:
        return pb.NackCode.Name(code).removeprefix("NACK_CODE_").lower()  # type: ignore[arg-type]
    except ValueError:
        return str(code)


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


class NodeCollector(Collector):
    """A node's metrics, read at scrape time from ``sample()`` (run on the
    node's event loop by :class:`MetricsServer`)."""

    def __init__(self, sample: Callable[[], NodeSample]) -> None:
        self._sample = sample

    def collect(self) -> Iterable[Metric]:
        s = self._sample()
        state = _gauge("syncrep_volume_state", "1 for the pair state this primary is in, 0 for the others "
                       "(a secondary does not know the pair's state: no series)", ("volume", "state"))
        role = _gauge("syncrep_volume_role", "1 for the role this node plays for the volume, 0 for the others",
                      ("volume", "role"))
        epoch = _gauge("syncrep_volume_epoch", "the epoch this node holds for the volume (it only grows)",
                       ("volume",))
        oos = _gauge("syncrep_volume_out_of_sync_bytes", "bytes the secondary lacks: the failed extents plus "
                     "what was written since the fault snapshot (an upper bound; 0 in sync)", ("volume",))
        latency = HistogramMetricFamily(
            "syncrep_volume_write_latency_seconds",
            "client write latency on the primary, from arrival to acknowledgement", labels=["volume"])
        in_w = _gauge("syncrep_replication_inflight_writes", "writes sent to the secondary and not yet acked",
                      ("volume",))
        in_b = _gauge("syncrep_replication_inflight_bytes", "bytes sent to the secondary and not yet acked",
                      ("volume",))
        acks = CounterMetricFamily("syncrep_replication_acks", "writes acknowledged by the secondary",
                                   labels=["volume"])
        nacks = CounterMetricFamily("syncrep_replication_nacks", "NACKs from the secondary, by code",
                                    labels=["volume", "code"])
        r_done = _gauge("syncrep_resync_bytes_done", "bytes the running resync has had applied (all its "
                        "rounds so far); after it ended, the last resync's", ("volume",))
        r_total = _gauge("syncrep_resync_bytes_total", "bytes of the running resync's rounds planned so far "
                         "(diff rounds are planned one after the other); after it ended, the last resync's",
                         ("volume",))
        r_rate = _gauge("syncrep_resync_rate_bytes_per_second", "the running resync's rate (0 when none runs)",
                        ("volume",))
        r_eta = _gauge("syncrep_resync_eta_seconds", "the running resync round's estimated time left "
                       "(0 when none runs)", ("volume",))
        stall = HistogramMetricFamily(
            "syncrep_quiesce_stall_seconds",
            "how long client writes were held at the quiesce gate (degrade, final resync round, common "
            "snapshot)", labels=["volume"])
        lease = _gauge("syncrep_lease_remaining_seconds", "seconds left on the primary's lease from the "
                       "coordinator (it may write without its secondary only under it)", ("volume",))
        for v in s.volumes:
            for r in ROLES:
                role.add_metric([v.name, r], 1.0 if v.role == r else 0.0)
            epoch.add_metric([v.name], v.epoch)
            if v.state is not None:
                for st in NODE_STATES:
                    state.add_metric([v.name, st], 1.0 if v.state == st else 0.0)
            if v.out_of_sync_bytes is not None:
                oos.add_metric([v.name], v.out_of_sync_bytes)
            if v.lease_remaining_s is not None:
                lease.add_metric([v.name], v.lease_remaining_s)
            st_ = v.stats
            if st_ is None:
                continue
            in_w.add_metric([v.name], v.inflight_writes)
            in_b.add_metric([v.name], v.inflight_bytes)
            acks.add_metric([v.name], st_.acks)
            for code, n in sorted(st_.nacks.items()):
                nacks.add_metric([v.name, _nack_label(code)], n)
            latency.add_metric([v.name], st_.write_latency.cumulative(), st_.write_latency.sum)
            stall.add_metric([v.name], st_.stall.cumulative(), st_.stall.sum)
            r_done.add_metric([v.name], st_.resync_bytes_done)
            r_total.add_metric([v.name], st_.resync_bytes_total)
            r_rate.add_metric([v.name], v.resync_rate_bytes_per_s)
            r_eta.add_metric([v.name], v.resync_eta_s)
        yield from (state, role, epoch, oos, latency, in_w, in_b, acks, nacks, r_done, r_total, r_rate, r_eta,
                    stall, lease)
        g = _gauge("syncrep_node_volumes", "volumes this node holds (either role)")
        g.add_metric([], len(s.volumes))
        yield g
        g = _gauge("syncrep_node_open_streams", "streaming RPCs this node is serving now (client Write "
                   "streams, replication and resync streams from a primary)")
        g.add_metric([], s.open_streams)
        yield g


class CoordinatorCollector(Collector):
    """The coordinator's metrics, read at scrape time from ``sample()``."""

    def __init__(self, sample: Callable[[], CoordinatorSample]) -> None:
        self._sample = sample

    def collect(self) -> Iterable[Metric]:
        s = self._sample()
        g = _gauge("syncrep_coordinator_nodes_alive", "nodes heard from within the node timeout")
        g.add_metric([], s.nodes_alive)
        yield g
        g = _gauge("syncrep_coordinator_nodes", "nodes registered (alive or not)")
        g.add_metric([], s.nodes)
        yield g
        g = _gauge("syncrep_coordinator_volumes", "volume pairs by the state their status shows",
                   ("state",))
        for st in STATUS_STATES:
            g.add_metric([st], s.volumes_by_state.get(st, 0))
        yield g
        g = _gauge("syncrep_coordinator_is_leader", "1 if this coordinator leads (decides and answers), 0 if "
                   "it stands by")
        g.add_metric([], 1.0 if s.is_leader else 0.0)
        yield g
        for name, doc, v in (
            ("syncrep_coordinator_heartbeats", "node heartbeats handled", s.heartbeats),
            ("syncrep_coordinator_volume_reports", "per-volume reports carried by the heartbeats handled",
             s.volume_reports),
            ("syncrep_coordinator_replication_reports", "ReportReplication calls handled (failures, resync "
             "progress and results)", s.replication_reports),
        ):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], v)
            yield c


def new_registry(collector: Collector) -> CollectorRegistry:
    """A registry of this process's own: ``collector`` and the standard
    ``process_*`` figures (CPU, memory, open files)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry


# ---------------------------------------------------------------- open streams


class StreamCounter(aio.ServerInterceptor):
    """Counts the streaming RPCs of the syncrep services being served now
    (``open``): the innermost interceptor of a node's server, so a call the
    authorisation refused is not counted. Health and reflection are not."""

    def __init__(self, prefix: str = "/syncrep.") -> None:
        self.prefix = prefix
        self.open = 0

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = str(getattr(handler_call_details, "method", ""))
        if handler is None or not method.startswith(self.prefix):
            return handler
        kinds: tuple[tuple[str, Callable[..., Any]], ...] = (
            ("unary_stream", grpc.unary_stream_rpc_method_handler),
            ("stream_unary", grpc.stream_unary_rpc_method_handler),
            ("stream_stream", grpc.stream_stream_rpc_method_handler),
        )
        for kind, make in kinds:
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                return make(  # type: ignore[no-any-return]
                    self._wrap(behaviour),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler

    def _wrap(self, behaviour: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        async def wrapped(request: Any, context: Any) -> Any:
            self.open += 1
            try:
                return await rpc.finish_behaviour(behaviour(request, context), context)
            finally:
                self.open -= 1

        return wrapped


# ---------------------------------------------------------------- the HTTP endpoint


class MetricsServer:
    """``GET /metrics`` on ``listen`` (HOST:PORT; port 0 = any: see ``port``),
    served on the running event loop. HTTP/1.0, one request per connection."""

    def __init__(self, listen: str, registry: CollectorRegistry) -> None:
        self.listen = listen
        self.registry = registry
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        host, port = parse_address(self.listen)
        host = host.strip("[]")
        self._server = await asyncio.start_server(self._handle, host, port, limit=MAX_REQUEST_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics (plain HTTP: keep it on a management network or loopback)",
                 host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"only GET /metrics\n"
            elif path != "/metrics":
                status, ctype, body = "404 Not Found", "text/plain", b"the metrics are at /metrics\n"
            else:
                try:
                    status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry)
                except Exception as e:  # a collector failed: say so, keep serving
                    log.exception("metrics: a collector failed")
                    status, ctype, body = "500 Internal Server Error", "text/plain", f"{e}\n".encode()
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode("latin-1")
            )
            if method != "HEAD":
                writer.write(body)
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

