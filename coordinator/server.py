"""The coordinator process: database + CoordinatorService + background loops."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coordinator.db import DB_FILENAME, CoordinatorDB
from coordinator.service import CoordinatorServicer
from coordinator.store import parse_store_url
from syncrep import authz, metrics, rpc, sdnotify
from syncrep.core.pairstate import status_proto
from syncrep.pb import syncrep_pb2 as pb
from syncrep.pb import syncrep_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

__all__ = ["Coordinator", "serve"]


#: Listen hosts that mean "every interface": no address another host can dial.
WILDCARD_HOSTS = ("", "0.0.0.0", "[::]", "::")


def _advertise(listen: str, port: int, advertise: str | None = None) -> str:
    """The address others dial to reach this coordinator: ``advertise`` when
    given, else ``listen`` with the bound port filled in (``127.0.0.1:0`` ->
    ``127.0.0.1:41234``; a wildcard host -> loopback, for one host only)."""
    if advertise:
        return advertise
    host = listen.rsplit(":", 1)[0] if ":" in listen else listen
    if host in WILDCARD_HOSTS:
        host = "127.0.0.1"
    return f"{host}:{port}"


def listens_on_wildcard(listen: str) -> bool:
    return (listen.rsplit(":", 1)[0] if ":" in listen else listen) in WILDCARD_HOSTS


class Coordinator:
    """One coordinator: SQLite state in ``data_dir``, gRPC on ``listen``.

    Options (units in the names): ``heartbeat_interval_s`` (told to nodes),
    ``node_timeout_s`` (a node silent this long is dead), ``auto_resync``
    (run the resync driver), ``resync_retry_max_s`` (cap of the per-pair
    backoff between resync attempts), ``default_resync_mode`` (for
    CreateVolume with RESYNC_MODE_UNSPECIFIED), ``resync_check_interval_s``,
    ``lease_s`` (the term of a primary's lease) and ``lease_drift_s`` (the
    margin for clock-rate drift before a lease counts as expired; both > 0),
    ``metrics_listen`` (HOST:PORT of the Prometheus endpoint, "" = off:
    syncrep/metrics.py).
    ``etcd_client``: on etcd, a factory of aetcd-like clients, called with
    "store" and "election", used instead of connecting to the endpoints
    (the simulator's in-memory etcd, deploy/simstore.py).
    Any other keyword goes to ``CoordinatorServicer``, e.g. its clocks:
    ``clock`` (monotonic: liveness, backoff) and ``wall_clock`` (persisted
    timestamps), which tests move forward instead of sleeping.
    """

    def __init__(
        self,
        listen: str,
        data_dir: Path | str,
        *,
        heartbeat_interval_s: float = 0.5,
        node_timeout_s: float = 3.0,
        auto_resync: bool = True,
        resync_retry_max_s: float = 10.0,
        default_resync_mode: int = pb.RESYNC_MODE_DIRECT,
        resync_check_interval_s: float = 0.5,
        lease_s: float = 4.0,
        lease_drift_s: float = 0.5,
        metrics_listen: str = "",
        store: str = "sqlite",
        election_ttl_s: int = 5,
        etcd_op_timeout_s: float = 2.0,
        etcd_start_timeout_s: float = 30.0,
        advertise: str | None = None,
        etcd_client: Callable[[str], Any] | None = None,
        etcd_tls: Any = None,
        **servicer_opts: Any,
    ) -> None:
        self.listen = listen
        # The address other coordinators redirect clients to when this one
        # leads (the election's value) and CoordinatorInfo reports.
        self.advertise = advertise
        # Issue 12: where the state lives ("sqlite" under data_dir, or
        # "etcd://h:p,..." shared by several coordinators, one leading).
        self.store_spec = parse_store_url(store)
        self.election_ttl_s = election_ttl_s
        self.etcd_op_timeout_s = etcd_op_timeout_s
        self.etcd_start_timeout_s = etcd_start_timeout_s
        self.etcd_client = etcd_client
        # TLS to etcd (coordinator.etcd_store.EtcdTls; --store etcds://): the
        # store's client and the election's.
        self.etcd_tls = etcd_tls
        if self.store_spec.kind == "etcd" and self.store_spec.tls and etcd_tls is None and etcd_client is None:
            raise ValueError(f"--store {self.store_spec.url}: TLS to etcd needs certificates "
                             "(--etcd-certs-dir, or the coordinator's --certs-dir)")
        self.election: Any = None
        self.metrics_listen = metrics_listen
        self.metrics: metrics.MetricsServer | None = None
        self.data_dir = Path(data_dir)
        self.address = ""
        self._opts: dict[str, Any] = dict(
            heartbeat_interval_s=heartbeat_interval_s,
            node_timeout_s=node_timeout_s,
            auto_resync=auto_resync,
            resync_retry_max_s=resync_retry_max_s,
            default_resync_mode=default_resync_mode,
            resync_check_interval_s=resync_check_interval_s,
            lease_s=lease_s,
            lease_drift_s=lease_drift_s,
            **servicer_opts,
        )
        self.db: Any = None  # CoordinatorDB or EtcdStore (coordinator.store.Store)
        self.servicer: CoordinatorServicer | None = None
        self._server: rpc.Server | None = None

    async def start(self) -> int:
        """Open the database, bind, start serving and the background loops. Returns the bound port."""
        if self._server is not None:
            raise RuntimeError("coordinator already started")
        if self.store_spec.kind == "etcd":
            return await self._start_on_etcd()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        db = CoordinatorDB(self.data_dir / DB_FILENAME)
        try:
            servicer = CoordinatorServicer(db, **self._opts)
            # Who may call what: syncrep.authz's table (no coordinator
            # hosts here: a coordinator calls nodes, never itself).
            server = rpc.Server(self.listen, interceptors=[authz.Interceptor(authz.Policy())])
            server.add(
                pb_grpc.add_CoordinatorServiceServicer_to_server,
                servicer,
                pb.DESCRIPTOR.services_by_name["CoordinatorService"].full_name,
            )
            port = await server.start()
        except BaseException:
            db.close()
            raise
        self.db, self.servicer, self._server = db, servicer, server
        self.address = _advertise(self.listen, port, self.advertise)
        servicer.coordinator_address = self.address
        await servicer.start_background()
        if self.metrics_listen:
            await self._start_metrics(servicer)
        return port

    # -- metrics (issue 13)
    async def _start_metrics(self, servicer: CoordinatorServicer) -> None:
        """Serve /metrics, read from the servicer at scrape time (on this loop)."""

        def sample() -> metrics.CoordinatorSample:
            live = servicer.liveness()
            by_state: dict[str, int] = {}
            for pair in servicer.pairs():
                shown = status_proto(pair.state, primary_alive=servicer.is_alive(pair.primary))
                name = pb.PairState.Name(shown).removeprefix("PAIR_STATE_").lower()  # type: ignore[arg-type]
                by_state[name] = by_state.get(name, 0) + 1
            return metrics.CoordinatorSample(
                nodes=len(live.nodes),
                nodes_alive=sum(1 for a in live.nodes if servicer.is_alive(a)),
                volumes_by_state=by_state,
                is_leader=self.is_leader(),
                heartbeats=servicer.heartbeats_handled,
                volume_reports=servicer.volume_reports_handled,
                replication_reports=servicer.replication_reports_handled,
            )

        registry = metrics.new_registry(metrics.CoordinatorCollector(sample))
        server = metrics.MetricsServer(self.metrics_listen, registry)
        await server.start()
        self.metrics = server

    def is_leader(self) -> bool:
        """Whether this coordinator leads: always on SQLite; on etcd (issue 12)
        the servicer's view (elected, and the term taken over), read at every scrape."""
        return self.servicer.leads() if self.servicer is not None else False

    # -- on etcd (issue 12)
    async def _start_on_etcd(self) -> int:
        """Bind first (the advertised address is the election's value), then
        the store (an unreachable etcd: said once, retried with backoff up to
        ``etcd_start_timeout_s``, in a thread: the loop stays free), then the
        election on the store's own loop (a service loop blocked in store
        calls cannot starve its keepalives). Until it wins, this coordinator
        follows: it answers status and redirects the rest to the leader."""
        from coordinator.election import Election
        from coordinator.etcd_store import EtcdStore

        election: Election | None = None

        def fence() -> tuple[bytes, bytes] | None:
            return election.fence() if election is not None else None

        endpoints = self.store_spec.endpoints
        make_client = self.etcd_client
        db = await asyncio.to_thread(
            lambda: EtcdStore(
                endpoints, fence=fence, op_timeout_s=self.etcd_op_timeout_s,
                start_timeout_s=self.etcd_start_timeout_s,
                client=make_client("store") if make_client is not None else None,
                tls=self.etcd_tls,
            )
        )
        server: rpc.Server | None = None
        try:
            servicer = CoordinatorServicer(db, **self._opts)
            servicer.store_url = self.store_spec.url
            servicer.election_ttl_s = float(self.election_ttl_s)
            # Not elected until the election runs: it follows (and redirects) meanwhile.
            leadership = _ElectionLeadership(None)
            servicer.leadership = leadership
            server = rpc.Server(self.listen, interceptors=[authz.Interceptor(authz.Policy())])
            server.add(
                pb_grpc.add_CoordinatorServiceServicer_to_server,
                servicer,
                pb.DESCRIPTOR.services_by_name["CoordinatorService"].full_name,
            )
            port = await server.start()
            address = _advertise(self.listen, port, self.advertise)
            servicer.coordinator_address = address
            loop = asyncio.get_running_loop()

            def on_change(leads: bool, leader: str | None) -> None:
                # On the store's thread: the servicer takes over on its own loop.
                log.info("coordinator %s: %s", address, "leads" if leads else f"follows (leader {leader or 'none'})")
                loop.call_soon_threadsafe(servicer.wake)

            election = Election(
                make_client("election") if make_client is not None else list(endpoints), address, ttl_s=self.election_ttl_s, op_timeout_s=self.etcd_op_timeout_s,
                on_change=on_change, tls=self.etcd_tls,
            )
            leadership.election = election
            await asyncio.to_thread(db.start_election, election)
        except BaseException:
            if server is not None:
                await server.stop(0)
            await asyncio.to_thread(db.close)
            raise
        self.db, self.servicer, self._server, self.election = db, servicer, server, election
        self.address = address
        if self.etcd_tls is not None and self.etcd_tls.source and self.etcd_client is None:
            rpc.add_reload_hook(self._reload_etcd_tls)
        await servicer.start_background()
        if self.metrics_listen:
            await self._start_metrics(servicer)
        log.info("coordinator %s on %s over %s: campaigning for leadership (election TTL %d s)",
                 address, self.store_spec.url,
                 self.etcd_tls.describe() if self.etcd_tls is not None else "plaintext", self.election_ttl_s)
        if self.etcd_tls is None and self.etcd_client is None and rpc.security is not None \
                and not rpc.security.insecure:
            log.warning("coordinator %s: the traffic to etcd (%s) is plaintext and unauthenticated while "
                        "this coordinator's own is mutual TLS: anyone who reaches etcd can read and change "
                        "every volume's record. Serve etcd over TLS and use --store etcds:// (docs/HA.md)",
                        address, self.store_spec.url)
        return port

    def _reload_etcd_tls(self) -> str:
        """SIGHUP: re-read the certificates presented to etcd from where they
        came from (``--etcd-certs-dir`` or ``--certs-dir``); the store's and
        the election's later connections use them. CertError (the old ones
        stay) when the new files are broken or the swap does not finish."""
        from coordinator.etcd_store import EtcdTls
        from syncrep import certs

        old, db = self.etcd_tls, self.db
        if old is None or db is None:
            return ""
        tls = EtcdTls.from_certs_dir(Path(old.source), old.server_name)  # CertError: broken new files
        try:
            done = db.reload_tls(tls, self.election)
        except Exception as e:
            raise certs.CertError(f"etcd client certificates from {old.source} NOT reloaded: {e!r}") from None
        self.etcd_tls = tls
        return str(done)

    async def stop(self, grace_s: float = rpc.SHUTDOWN_GRACE_S) -> None:
        """Stop accepting RPCs (in-flight ones get ``grace_s``), stop the loops, close the database."""
        rpc.remove_reload_hook(self._reload_etcd_tls)
        server, servicer, db = self._server, self.servicer, self.db
        self._server = self.servicer = self.db = None
        if self.metrics is not None:
            await self.metrics.stop()
            self.metrics = None
        election, self.election = self.election, None
        try:
            if server is not None:
                await server.stop(grace_s)
        finally:
            if election is not None and db is not None:
                # Resign first: a follower takes over at once, not after the TTL.
                await asyncio.to_thread(db.stop_election, election)
            if servicer is not None:
                await servicer.stop_background()
            if db is not None:
                await asyncio.to_thread(db.close) if election is not None else db.close()


class _ElectionLeadership:
    """``coordinator.service.Leadership`` from an ``Election``: the term is
    the election key's value while this coordinator holds it."""

    def __init__(self, election: Any) -> None:
        self.election = election  # None: not started yet (nobody leads here)

    def is_leader(self) -> bool:
        return self.election is not None and bool(self.election.is_leader())

    def leader(self) -> str | None:
        # A coordinator that cannot reach etcd itself does not know who leads:
        # the holder it last saw may have lost its lease since (no quorum).
        if self.election is None or str(getattr(self.election, "_last_error", "")):
            return None
        leader: str | None = self.election.leader()
        return leader

    def why_not_leader(self) -> str:
        return str(self.election.why_not_leader()) if self.election is not None else "not campaigning yet"

    def term(self) -> bytes | None:
        fence = self.election.fence() if self.election is not None else None
        return fence[1] if fence is not None else None


async def serve(listen: str, data_dir: Path, **opts: Any) -> None:
    """Run a coordinator until SIGTERM or SIGINT, then stop gracefully."""
    coord = Coordinator(listen, data_dir, **opts)
    port = await coord.start()
    log.info("coordinator listening on %s (port %d, data in %s)", coord.address, port, data_dir)
    # systemd Type=notify (deploy/systemd): ready once it serves.
    sdnotify.ready(f"coordinator serving on {coord.address}")
    try:
        sig = await rpc.wait_for_signal()
        log.info("coordinator: signal %d received, stopping", sig)
    finally:
        sdnotify.stopping()
        await coord.stop()
    log.info("coordinator stopped")
