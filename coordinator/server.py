"""The coordinator process: database + CoordinatorService + background loops."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from coordinator.db import DB_FILENAME, CoordinatorDB
from coordinator.service import CoordinatorServicer
from syncrep import rpc
from syncrep.pb import syncrep_pb2 as pb
from syncrep.pb import syncrep_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

__all__ = ["Coordinator", "serve"]


def _advertise(listen: str, port: int) -> str:
    """``listen`` with the bound port filled in (``127.0.0.1:0`` -> ``127.0.0.1:41234``)."""
    host = listen.rsplit(":", 1)[0] if ":" in listen else listen
    if host in ("", "0.0.0.0", "[::]"):
        host = "127.0.0.1"
    return f"{host}:{port}"


class Coordinator:
    """One coordinator: SQLite state in ``data_dir``, gRPC on ``listen``.

    Options (units in the names): ``heartbeat_interval_s`` (told to nodes),
    ``node_timeout_s`` (a node silent this long is dead), ``auto_resync``
    (run the resync driver), ``resync_retry_max_s`` (cap of the per-pair
    backoff between resync attempts), ``default_resync_mode`` (for
    CreateVolume with RESYNC_MODE_UNSPECIFIED), ``resync_check_interval_s``,
    ``lease_s`` (the term of a primary's lease) and ``lease_drift_s`` (the
    margin for clock-rate drift before a lease counts as expired; both > 0).
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
        **servicer_opts: Any,
    ) -> None:
        self.listen = listen
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
        self.db: CoordinatorDB | None = None
        self.servicer: CoordinatorServicer | None = None
        self._server: rpc.Server | None = None

    async def start(self) -> int:
        """Open the database, bind, start serving and the background loops. Returns the bound port."""
        if self._server is not None:
            raise RuntimeError("coordinator already started")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        db = CoordinatorDB(self.data_dir / DB_FILENAME)
        try:
            servicer = CoordinatorServicer(db, **self._opts)
            server = rpc.Server(self.listen)
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
        self.address = _advertise(self.listen, port)
        servicer.coordinator_address = self.address
        await servicer.start_background()
        return port

    async def stop(self, grace_s: float = rpc.SHUTDOWN_GRACE_S) -> None:
        """Stop accepting RPCs (in-flight ones get ``grace_s``), stop the loops, close the database."""
        server, servicer, db = self._server, self.servicer, self.db
        self._server = self.servicer = self.db = None
        try:
            if server is not None:
                await server.stop(grace_s)
        finally:
            if servicer is not None:
                await servicer.stop_background()
            if db is not None:
                db.close()


async def serve(listen: str, data_dir: Path, **opts: Any) -> None:
    """Run a coordinator until SIGTERM or SIGINT, then stop gracefully."""
    coord = Coordinator(listen, data_dir, **opts)
    port = await coord.start()
    log.info("coordinator listening on %s (port %d, data in %s)", coord.address, port, data_dir)
    try:
        sig = await rpc.wait_for_signal()
        log.info("coordinator: signal %d received, stopping", sig)
    finally:
        await coord.stop()
    log.info("coordinator stopped")
