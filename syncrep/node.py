"""A node process: holds volumes, plays the primary or secondary role per pair.

``syncrep primary`` and ``syncrep secondary`` both run this; the flag is only
a hint recorded at registration. Which role a node plays for a volume is a
property of the pair, assigned by the coordinator with an epoch, so promoting
a secondary later is an assignment, not a different program.

Servers: VolumeService (client writes/reads, on the primary), ReplicaService
(replication and resync streams, on the secondary), NodeService (assignment,
resync control, node-local reads and checksums, test fault hooks), health.

Authorisation (issue 11): every server has ``syncrep.authz``'s interceptor
(who may call which RPC; the coordinator named by --coordinator counts as a
coordinator). What needs the request is checked here: a user's grant for the
volume of each write and read (``authz.check_volume``), and by the
ReplicaService that a stream comes from the volume's primary. The grants come
from the coordinator with every assignment (registration, heartbeats) and are
kept in memory only: a restarted node refuses users until it has registered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from primary.link import identity_msg
from primary.resync import ResyncBudget
from primary.volume import PrimaryVolume
from secondary.replica import ReplicaServicer
from secondary.resync import ResyncReceiver, ResyncState
from syncrep import __version__, authz, certs, metrics, rpc, sdnotify
from syncrep.blockstore import Extent
from syncrep.blockstore.store import MAX_BLOCKS
from syncrep.client import redirect_of
from syncrep.config import NodeOptions
from syncrep.core.identity import Identity
from syncrep.core.pair import PairRecord
from syncrep.core.pairstate import PairState
from syncrep.core.receiver import decode_extents, divergent_extents, encode_extents
from syncrep.core.vocab import (
    MAX_WRITE_BYTES,
    META_NODE_DIVERGENT,
    META_NODE_PROMOTE_PENDING,
    parse_address_list,
)
from syncrep.errors import FailedPrecondition, InvalidArgument, PermissionDenied, SyncrepError, check_io_range
from syncrep.nbd import tls as nbd_tls
from syncrep.nbd.server import NbdServer, NodeExports
from syncrep.pb import syncrep_pb2 as pb
from syncrep.pb import syncrep_pb2_grpc as pbg
from syncrep.volumes import DataMissing, LocalVolume, VolumeRegistry, role_name, thin_warning

log = logging.getLogger(__name__)

MAX_OUTSTANDING_PER_STREAM = 512
#: The most writes one batched WriteReply acknowledges (client_seq plus
#: more_ok_seqs: at most about 2.5 KiB on the wire). Issue 14: at 4 KiB QD64
#: one reply message per write was 20% of the primary's samples.
WRITE_REPLY_MAX_SEQS = 256
REPORT_RETRY_MAX_S = 30.0
# The same failed assignment is logged again at most this often.
ASSIGN_ERROR_LOG_INTERVAL_S = 30.0
# The longest a switchover may hold a primary's writes at its gate.
MAX_HANDOVER_TIMEOUT_S = 60.0


class Node:
    def __init__(
        self,
        role_hint: str,
        listen: str,
        data_dir: Path,
        coordinator: str,
        advertise: str | None,
        options: NodeOptions,
    ) -> None:
        self.role_hint = role_hint
        self.listen = listen
        self.address = advertise or listen
        self.coordinator = coordinator
        # Issue 12: --coordinator A,B,C. Heartbeats and reports go to the one
        # that leads as last learnt (a follower's redirect names it), a
        # channel per coordinator.
        self.coordinators = parse_address_list(coordinator)
        self.coordinator_now = self.coordinators[0]
        self._coord_channels: dict[str, Any] = {}
        self.options = options
        self.data_dir = Path(data_dir)
        self.registry = VolumeRegistry(self.data_dir, options.durability)
        self.primaries: dict[str, PrimaryVolume] = {}
        # What the resyncs this node sends share (--max-concurrent-resyncs,
        # --node-resync-max-rate): one node back with many degraded volumes
        # must not start a resync storm.
        self.resync_budget = ResyncBudget(options.max_concurrent_resyncs, options.node_resync_max_rate_bytes_per_s)
        # Metrics (--metrics-listen): the open streams are counted by the
        # innermost interceptor, after the authorisation.
        self.streams = metrics.StreamCounter()
        self.metrics: metrics.MetricsServer | None = None
        self.server = rpc.Server(listen, interceptors=[authz.Interceptor(
            authz.Policy.for_node(self.coordinators, fault_injection=options.enable_fault_injection)
        ), self.streams])
        self.heartbeat_interval_s = 0.5
        self._tasks: dict[asyncio.Task[Any], None] = {}  # ordered: see PrimaryVolume._tasks
        self._coord_channel: Any = None
        self._assign_lock = asyncio.Lock()
        self._assign_errors: dict[str, tuple[str, float]] = {}  # volume -> (last failure, monotonic time)
        # Volumes deleted by the coordinator (issue 13): name -> volume UUID. A
        # heartbeat reply sent before the delete may still assign one; it is
        # not "missing data", it is gone (a new pair of that name has another UUID).
        self._deleted: dict[str, str] = {}
        self.resync_receiver = ResyncReceiver(self.registry)
        self.replica = ReplicaServicer(self.registry, self.resync_receiver)
        self.replica.node_address = self.address  # named in its planned-stop message (issue 13)
        self.nbd: NbdServer | None = None  # --nbd-listen: volumes as NBD exports
        #: volume -> user -> read_only, from the coordinator's latest
        #: assignments; None until the first registration (users are refused).
        self.grants: dict[str, dict[str, bool]] | None = None

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> int:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Before the volumes start: a primary that recovers from a crash
        # reports the pair degraded right away, through this channel.
        self._coord_channel = self._coord_channel_to(self.coordinator_now)
        # No write path starts from disk: the coordinator records who is
        # primary (a secondary may have been promoted while this node was
        # down), so the first registration's assignments decide
        # (docs/FAILOVER.md section 4; _apply_assignments starts them).
        self.registry.open_existing()
        # A resync completed just before a crash may still owe the release of
        # its rollback point (secondary/resync.py): queued on each volume's
        # I/O thread, whatever the volume's role is now.
        self.resync_receiver.release_pending()
        self.server.add(pbg.add_VolumeServiceServicer_to_server, VolumeServicer(self), "syncrep.v1.VolumeService")
        self.server.add(pbg.add_ReplicaServiceServicer_to_server, self.replica, "syncrep.v1.ReplicaService")
        self.server.add(pbg.add_NodeServiceServicer_to_server, NodeServicer(self), "syncrep.v1.NodeService")
        port = await self.server.start()
        log.info("%s node listening on %s (advertised as %s), data in %s, durability %s",
                 self.role_hint, self.listen, self.address, self.data_dir, self.options.durability)
        if self.options.nbd_listen:
            # NBD: TLS with the node's certificate unless --insecure, the
            # client certificate's CN authorised by this node's grants
            # (syncrep.nbd: STARTTLS, then per export); plaintext only as
            # --insecure allows (or on loopback and unix sockets).
            tls, sec = None, rpc.security
            if sec is not None and sec.certs_dir is not None and rpc.transport is None:
                tls = nbd_tls.server_ssl_context(certs.load_node_tls(sec.certs_dir))
            self.nbd = NbdServer(
                self.options.nbd_listen, NodeExports(self.primaries, self.registry, self.options.durability),
                tls=tls, authorize=self.nbd_refusal if tls is not None else None,
                allow_plaintext=sec is None or sec.insecure,
            )
            await self.nbd.start()
            if tls is not None and sec is not None and sec.certs_dir is not None:
                certs_dir, nbd = sec.certs_dir, self.nbd

                def reload_nbd() -> str:
                    # SIGHUP: new NBD connections get the new certificates; the
                    # connected ones keep their TLS session.
                    nbd.tls = nbd_tls.server_ssl_context(certs.load_node_tls(certs_dir))
                    return "NBD TLS context reloaded"

                rpc.add_reload_hook(reload_nbd)
        if self.options.metrics_listen:
            registry = metrics.new_registry(metrics.NodeCollector(self.metrics_sample))
            self.metrics = metrics.MetricsServer(self.options.metrics_listen, registry)
            await self.metrics.start()
        self._spawn(self._coordinator_loop(), "coordinator-loop")
        return port

    async def stop(self, grace_s: float = rpc.SHUTDOWN_GRACE_S, *, reason: str = "stopping") -> None:
        log.info("node %s shutting down (grace %.1f s)", self.address, grace_s)
        if self.metrics is not None:
            await self.metrics.stop()
        if self.nbd is not None:
            await self.nbd.stop()  # first: in-flight NBD writes finish on a running write path
        for t in list(self._tasks):
            t.cancel()
        for pv in self.primaries.values():
            await pv.stop()
        await self._end_replica_streams(grace_s, reason)
        await self.server.stop(grace_s)
        for ch in self._coord_channels.values():
            await ch.close()
        self.registry.close()

    async def _end_replica_streams(self, grace_s: float, reason: str) -> None:
        """A planned stop (issue 13): the replication streams into this node
        end first, each telling its primary ``stopping`` once the writes it is
        applying are durable and acked (the primary logs a planned stop and
        goes degraded). So the server's stop finds no long call left and
        returns at once instead of waiting out its grace and cancelling the
        stream handlers (the CancelledError tracebacks of issue 13). Bounded
        by ``grace_s``."""
        told = self.replica.begin_stop(reason)
        if not told:
            return
        ended = await self.replica.wait_streams_ended(grace_s)
        log.info("planned stop (%s): %d replication stream(s) told%s", reason, told,
                 "" if ended else f", {self.replica.streams_open} still open after {grace_s:g} s")

    def _spawn(self, coro: Any, name: str) -> None:
        t = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks[t] = None
        t.add_done_callback(lambda done: self._tasks.pop(done, None))

    # ------------------------------------------------------------ metrics (issue 13)
    def metrics_sample(self) -> metrics.NodeSample:
        """What /metrics shows, read on the event loop at scrape time
        (syncrep/metrics.py): a primary's view from its write path, a
        secondary's role and epoch only (it does not know the pair's state)."""
        now = time.monotonic()
        out = []
        # A snapshot of the registry (one C-level copy, atomic under the GIL):
        # assignments insert into it from a worker thread (registry.assign).
        for name, lv in list(self.registry.volumes.items()):
            role = role_name(lv.role).removeprefix("ROLE_").lower()
            pv = self.primaries.get(name)
            if pv is None:
                out.append(metrics.VolumeSample(name=name, role=role, epoch=lv.epoch))
                continue
            link = pv.link
            window = link.window if link is not None and not link.failed else None
            # The progress stays as it was when a resync failed: no rate then.
            progress = pv.resync_progress if pv.state is PairState.RESYNCING else pb.ResyncProgress()
            out.append(metrics.VolumeSample(
                name=name, role=role, epoch=lv.epoch, state=pv.state.value,
                out_of_sync_bytes=pv.out_of_sync_bytes(),
                inflight_writes=window.inflight_count if window is not None else 0,
                inflight_bytes=window.inflight_bytes if window is not None else 0,
                lease_remaining_s=pv.lease.remaining_s(now),
                resync_rate_bytes_per_s=progress.rate_bytes_per_s, resync_eta_s=progress.eta_s,
                stats=pv.stats,
            ))
        return metrics.NodeSample(volumes=out, open_streams=self.streams.open)

    # ------------------------------------------------------------ roles
    async def _become_primary(self, lv: LocalVolume) -> PrimaryVolume:
        pv = self.primaries.get(lv.name)
        if pv is None:
            pv = PrimaryVolume(lv, self.options, self.address, self._report, self.resync_budget)
            self.primaries[lv.name] = pv
            try:
                await pv.start()
            except BaseException:
                # A start that failed (a promotion whose snapshot hit a full
                # disk, say) must not stay in the map: the next assignment (every
                # heartbeat) would find it and never retry. Dropped, it is
                # retried once the cause is gone. (Found by the simulator, seed 301.)
                if self.primaries.get(lv.name) is pv:
                    del self.primaries[lv.name]
                with contextlib.suppress(Exception):
                    await pv.stop()
                raise
        return pv

    async def assign(self, a: pb.VolumeAssignment) -> str:
        async with self._assign_lock:
            name = a.spec.name
            extra: dict[str, str | None] | None = None
            demoted: list[Extent] | None = None
            handed_over: Identity | None = None
            reverted: Identity | None = None
            cur = self.registry.volumes.get(name)
            if cur is not None and cur.identity.volume_uuid != a.identity.volume_uuid:
                # This store is about to be reported unrelated (or set aside by
                # a rebuild): stop serving it first.
                pv = self.primaries.pop(name, None)
                if pv is not None:
                    await pv.stop()
            elif cur is not None and a.epoch >= cur.epoch:  # a stale epoch: the registry refuses it
                if cur.role == pb.ROLE_SECONDARY and a.role == pb.ROLE_PRIMARY:
                    if not cur.identity.has_data:
                        # Refused before anything is persisted: an empty
                        # replica is never served (docs/FAILOVER.md section 1).
                        raise FailedPrecondition(_no_data_to_serve(cur, a.epoch, "promoted to primary"))
                    # Fence every replication and resync stream still applying
                    # here (the old primary's, at the old epoch): from now on
                    # this node takes writes from clients only. Without this a
                    # stream held up by a network fault could still be applied
                    # after the promotion, and the old primary would take its
                    # acks for in-sync writes (simulator seed 20360). Batches
                    # already on the I/O queue land before the promotion's
                    # snapshot (FIFO), so they are part of the promoted state.
                    cur.stream_token += 1
                    if a.switchover:
                        extra = await self._prepare_switchover(cur, a)
                    else:
                        extra = await self._prepare_promotion(cur, a)
                elif cur.role == pb.ROLE_SECONDARY and a.role == pb.ROLE_SECONDARY and a.discard_snapshot:
                    # `syncrep resolve` kept the primary's data (docs/FAILOVER.md
                    # section 6): this secondary's writes since the common
                    # generation are kept in a snapshot, then it reverts.
                    got = await cur.run_io(_discard_meta, cur, a.revert_to_generation, a.discard_snapshot)
                    if got is not None:
                        extra, reverted = got
                        demoted = list(cur.divergent)
                elif cur.role == pb.ROLE_PRIMARY and a.role == pb.ROLE_SECONDARY:
                    pv = self.primaries.pop(name, None)
                    # A switchover's demotion: only a write path that drained
                    # and still holds its gate has no write on this node alone.
                    handed_over = pv.hand_over(a.peer_address, a.epoch) if pv is not None and a.switchover else None
                    if pv is not None:
                        # Stop serving writes first (removed from the map
                        # before the await, so no request reaches it).
                        await pv.stop()
                    if handed_over is not None:
                        extra, demoted = _handover_meta(handed_over), []
                        if handed_over != cur.identity:
                            reverted = handed_over
                    else:
                        if a.switchover:
                            log.warning(
                                "volume %s: demoted by a switchover at epoch %d, but this node did not hand over "
                                "(restarted, or its handover expired): demoted the ordinary way, with divergent "
                                "extents", name, a.epoch,
                            )
                        extra, demoted, reverted = await cur.run_io(
                            _demotion_meta, cur, a.revert_to_generation, a.discard_snapshot
                        )
            # DataMissing (no data of the pair here) propagates: logged by the
            # registry (rate limited), reported in every heartbeat, never served.
            lv, role_changed = await asyncio.to_thread(self.registry.assign, a, extra)
            if demoted is not None:
                lv.divergent = demoted
                if reverted is not None and reverted != lv.identity and a.discard_snapshot:
                    log.warning(
                        "volume %s: split brain resolved in favour of %s: this replica's generation %s is "
                        "discarded; it reverts to the common generation %s, its state kept in snapshot %r; "
                        "%d extents (%d bytes) it wrote since will be overwritten by the resync",
                        lv.name, lv.peer, lv.identity.short(), reverted.short(), a.discard_snapshot,
                        len(demoted), sum(e.length for e in demoted),
                    )
                    lv.identity = reverted
                elif reverted is not None and reverted != lv.identity:
                    log.warning(
                        "volume %s: generations after %s were never confirmed by a lease from the coordinator "
                        "(the pair was in sync when %s was promoted, so this node acknowledged no write alone "
                        "under %s): reverted to %s; what it wrote since is in the divergent extents",
                        lv.name, reverted.short(), lv.peer, lv.identity.short(), reverted.short(),
                    )
                    lv.identity = reverted
                if a.discard_snapshot and reverted is not None:
                    pass  # a resolve's discard: logged above
                elif handed_over is not None:
                    log.warning("volume %s: secondary by switchover at epoch %d (new primary %s): handed over in "
                                "sync, no divergent extents", lv.name, lv.epoch, lv.peer)
                else:
                    log.warning(
                        "volume %s demoted to secondary at epoch %d (new primary %s): %d divergent extents "
                        "(%d bytes) will be overwritten by the resync", lv.name, lv.epoch, lv.peer, len(demoted),
                        sum(e.length for e in demoted),
                    )
            if lv.role == pb.ROLE_PRIMARY and not lv.identity.has_data:
                pv = self.primaries.pop(lv.name, None)
                if pv is not None:
                    await pv.stop()
                raise FailedPrecondition(_no_data_to_serve(lv, lv.epoch, "assigned primary"))
            if lv.role == pb.ROLE_PRIMARY:
                pv = self.primaries.get(lv.name)
                if pv is not None and role_changed:
                    # New peer: restart the write path towards it.
                    del self.primaries[lv.name]
                    await pv.stop()
                await self._become_primary(lv)
            elif lv.name in self.primaries:
                # Demoted: stop serving writes first (removed from the map
                # before the await, so no request reaches a stopping volume).
                await self.primaries.pop(lv.name).stop()
            return f"volume {lv.name} is {role_name(lv.role)} on {self.address} at epoch {lv.epoch}"

    async def _prepare_promotion(self, lv: LocalVolume, a: pb.VolumeAssignment) -> dict[str, str | None]:
        """This secondary becomes the primary (docs/FAILOVER.md section 3). An
        incomplete resync is rolled back to its rollback point first (the
        half-applied diff is no consistent state); the returned metadata is
        persisted with the role change, and PrimaryVolume.start() carries the
        promotion out (snapshot, new generation, degraded record)."""
        st = ResyncState.load(lv)
        if st.in_progress:
            msg, n = await lv.run_io(self.resync_receiver.abort, lv, True)
            log.warning("volume %s: promoted to primary at epoch %d during resync %s: %s (%d bytes rolled back)",
                        lv.name, a.epoch, st.resync_id, msg, n)
        log.warning("volume %s: promoted to primary at epoch %d (old primary %s), generation %s",
                    lv.name, a.epoch, lv.peer or "(none)", lv.identity.short())
        return {META_NODE_PROMOTE_PENDING: "1"}

    async def _prepare_switchover(self, lv: LocalVolume, a: pb.VolumeAssignment) -> dict[str, str | None]:
        """This secondary becomes the primary by a switchover (docs/FAILOVER.md
        section 5): the old primary drained and handed over, this replica has
        every write at the same generation, so it starts in sync (no promotion
        point, no new generation) and replicates to the old primary. A fresh
        primary record is persisted with the role change (whatever an earlier
        life as primary left is history). With a resync half applied here
        the coordinator was wrong: promoted the ordinary way (safe)."""
        st = ResyncState.load(lv)
        if st.in_progress:
            log.error("volume %s: assigned primary by a switchover at epoch %d, but a resync (%s) is half applied "
                      "here; taking the promotion path instead (rolled back, degraded)", lv.name, a.epoch,
                      st.resync_id)
            return await self._prepare_promotion(lv, a)
        log.warning("volume %s: primary by switchover at epoch %d (old primary %s), in sync at generation %s",
                    lv.name, a.epoch, lv.peer or "(none)", lv.identity.short())
        return {**PairRecord().to_meta(), META_NODE_PROMOTE_PENDING: None}

    async def prepare_handover(self, request: pb.PrepareHandoverRequest) -> pb.PrepareHandoverReply:
        """PrepareHandover (serialised with assignments, like StartResync)."""
        async with self._assign_lock:
            pv = self.primary(request.volume)
            lv = pv.lv
            if request.epoch != lv.epoch:
                raise FailedPrecondition(
                    f"volume {lv.name!r} is at epoch {lv.epoch} on this node, the handover asks for epoch "
                    f"{request.epoch}; retry once the assignments agree"
                )
            if request.release:
                return pb.PrepareHandoverReply(
                    epoch=lv.epoch, message=pv.release_handover(request.epoch, request.handover_id)
                )
            if not 0 < request.timeout_s <= MAX_HANDOVER_TIMEOUT_S:
                raise InvalidArgument(
                    f"handover timeout {request.timeout_s} s is not in (0, {MAX_HANDOVER_TIMEOUT_S:.0f}] s"
                )
        # Outside the lock: the drain waits for writes, and the demotion
        # (an assignment) must be able to come in while the gate is held.
        acked, drain_s = await pv.prepare_handover(lv.epoch, request.timeout_s, request.handover_id)
        return pb.PrepareHandoverReply(
            epoch=lv.epoch, acked_seq=acked, identity=pb.Identity(**lv.identity.proto_fields()),  # type: ignore[arg-type]
            drain_s=drain_s, message=f"drained up to seq {acked} in {drain_s:.3f} s; writes wait at the gate",
        )

    # ------------------------------------------------------------ lifecycle: delete, resize (issue 13)

    async def delete_volume(self, request: pb.NodeDeleteVolumeRequest) -> pb.NodeDeleteVolumeReply:
        """The coordinator deleted the pair: stop serving the volume (its write
        path, replication and resync streams, NBD) and remove its store.
        Serialised with assignments. Fenced: a store of another volume UUID, or
        at a newer epoch than the pair's last, is not this pair's to remove."""
        async with self._assign_lock:
            name = request.volume
            lv = self.registry.volumes.get(name)
            if lv is None:
                self.registry.missing.pop(name, None)  # assigned without data here: nothing to report any more
                return pb.NodeDeleteVolumeReply(
                    removed=False, message=f"volume {name!r}: no store on {self.address}; nothing to remove"
                )
            if request.volume_uuid and lv.identity.volume_uuid != request.volume_uuid:
                raise FailedPrecondition(
                    f"volume {name!r} on {self.address} is volume UUID {lv.identity.volume_uuid or '(none)'}, "
                    f"the deleted pair was {request.volume_uuid}: not removed"
                )
            if lv.epoch > request.epoch:
                raise FailedPrecondition(
                    f"stale delete of volume {name!r}: this node holds it at epoch {lv.epoch}, the delete "
                    f"names epoch {request.epoch}: not removed"
                )
            pv = self.primaries.pop(name, None)
            if pv is not None:
                await pv.stop()  # removed from the map first: no new request reaches it
            lv.stream_token += 1  # replication and resync streams stop applying
            self._deleted[name] = lv.identity.volume_uuid
            if self.grants is not None:
                self.grants.pop(name, None)
            path = await asyncio.to_thread(self.registry.delete, name)
        log.warning("volume %s deleted by the coordinator (epoch %d): no longer served; store %s removed",
                    name, request.epoch, path)
        return pb.NodeDeleteVolumeReply(removed=True, message=f"volume {name!r}: store {path} removed on {self.address}")

    async def resize_volume(self, request: pb.NodeResizeVolumeRequest) -> pb.NodeResizeVolumeReply:
        """Grow the volume online (the coordinator's ResizeVolume: the secondary
        first, then the primary). On the volume's I/O thread, FIFO with the
        writes: those queued before land first, those after may use the new
        blocks. Serialised with assignments; fenced by the epoch; idempotent."""
        async with self._assign_lock:
            lv = self.registry.get(request.volume)
            if request.epoch != lv.epoch:
                raise FailedPrecondition(
                    f"volume {lv.name!r} is at epoch {lv.epoch} on {self.address}, the resize names epoch "
                    f"{request.epoch}; retry once the assignments agree"
                )
            old = lv.store.size_bytes
            if request.size_bytes < old:
                raise FailedPrecondition(
                    f"volume {lv.name!r} is {old} bytes on {self.address}, the resize asks for "
                    f"{request.size_bytes}: shrinking would discard data at the end of the volume; not supported"
                )
            bs = lv.store.block_size
            if request.size_bytes % bs or request.size_bytes // bs > MAX_BLOCKS:
                raise InvalidArgument(
                    f"volume {lv.name!r}: new size {request.size_bytes} is not a multiple of its {bs}-byte block "
                    f"size, or more than {MAX_BLOCKS} blocks"
                )
            added = await lv.run_io(lv.store.grow, request.size_bytes)
        free, warning = thin_warning(lv.name, lv.store.size_bytes, self.registry.root, self.address)
        if warning:
            log.warning("%s", warning)
        if added:
            log.warning("volume %s grown from %d to %d bytes (%s role, epoch %d); the new blocks read as zeros",
                        lv.name, old, lv.store.size_bytes, role_name(lv.role), lv.epoch)
        msg = (f"volume {lv.name!r} on {self.address}: grown from {old} to {lv.store.size_bytes} bytes" if added
               else f"volume {lv.name!r} on {self.address}: already {old} bytes")
        return pb.NodeResizeVolumeReply(
            message=msg, size_bytes=lv.store.size_bytes, old_size_bytes=old, free_bytes=free, warning=warning
        )

    def primary(self, volume: str) -> PrimaryVolume:
        pv = self.primaries.get(volume)
        if pv is None:
            lv = self.registry.get(volume)  # NOT_FOUND if unknown; FAILED_PRECONDITION if its data is missing
            if lv.role == pb.ROLE_PRIMARY and not lv.identity.has_data:
                raise FailedPrecondition(_no_data_to_serve(lv, lv.epoch, "assigned primary"))
            raise FailedPrecondition(
                f"this node ({self.address}) is {role_name(lv.role)} for volume {volume!r}, not its "
                f"primary; writes go to the primary ({lv.peer})"
            )
        return pv

    # ------------------------------------------------------------ coordinator
    def reports(self) -> list[pb.VolumeReport]:
        out = []
        # Snapshots of the registry (one C-level copy each, atomic under the
        # GIL): registry.assign inserts from a worker thread, and iterating the
        # live dict raised "dictionary changed size during iteration", which
        # skipped heartbeats while volumes were created (bench_coordinator_scale).
        for name, lv in list(self.registry.volumes.items()):
            pv = self.primaries.get(name)
            if pv is not None:
                out.append(pv.report())
            else:
                r = pb.VolumeReport(
                    name=name, role=lv.role, epoch=lv.epoch,
                    size_bytes=lv.store.size_bytes, block_size=lv.store.block_size,
                    identity=pb.Identity(**lv.identity.proto_fields()),  # type: ignore[arg-type]
                )
                r.divergent_extents.extend(pb.Extent(offset=e.offset, length=e.length) for e in lv.divergent)
                out.append(r)
        for name, m in list(self.registry.missing.items()):
            a = m.assignment
            out.append(
                pb.VolumeReport(
                    name=name, role=a.role, epoch=a.epoch, size_bytes=a.spec.size_bytes,
                    block_size=a.spec.block_size or 4096, data_missing=True, data_problem=m.problem,
                )
            )
        return out

    async def _register(self) -> None:
        stub = pbg.CoordinatorServiceStub(self._coord_channel)
        reply = await stub.RegisterNode(
            pb.RegisterNodeRequest(
                address=self.address, role_hint=self.role_hint, pid=os.getpid(), version=__version__
            ),
            timeout=rpc.DEFAULT_RPC_TIMEOUT_S,
        )
        self.heartbeat_interval_s = reply.heartbeat_interval_s or 0.5
        log.info("registered with coordinator %s as %s (%d volumes assigned)",
                 self.coordinator_now, self.address, len(reply.assignments))
        # Issue 13: a store no pair claims (deleted while this node was down)
        # is kept and never served. Only a registration's assignments decide
        # this: a heartbeat's leave out a volume whose creation is still being
        # pushed.
        await asyncio.to_thread(self.registry.set_unclaimed, {a.spec.name for a in reply.assignments})
        await self._apply_assignments(reply.assignments)

    def nbd_refusal(self, volume: str, user: str, write: bool) -> str | None:
        """The NBD export's authorize(volume, user, write): None when the
        client certificate's CN ``user`` may (admin always), else why not."""
        return authz.volume_refusal(rpc.Peer(True, user, (), "NBD"), volume, write, self.grants)

    def set_grants(self, assignments: Any, *, full: bool = True) -> None:
        """Take the grants of ``assignments``: the full set of this node's
        volumes (``full``: a volume not among them has no grants any more),
        or one pushed assignment."""
        grants = {} if full or self.grants is None else dict(self.grants)
        for a in assignments:
            grants[a.spec.name] = {g.user: g.read_only for g in a.grants}
        self.grants = grants

    async def _apply_assignments(self, assignments: Any) -> None:
        """Apply the coordinator's assignments: every volume of this node (a
        registration's or heartbeat's reply carries the full set)."""
        # First: a revoked grant is refused from now on, whatever the
        # assignments below do (and however long they take).
        self.set_grants(assignments)
        # A volume no longer assigned here is no longer ours to report missing.
        self.registry.forget_missing({a.spec.name for a in assignments})
        for a in assignments:
            if self._deleted.get(a.spec.name) == a.identity.volume_uuid:
                continue  # deleted (issue 13): a reply older than the delete
            lv = self.registry.volumes.get(a.spec.name)
            if (
                lv is not None
                and (lv.role, lv.epoch, lv.peer) == (a.role, a.epoch, a.peer_address)
                and lv.identity.volume_uuid == a.identity.volume_uuid
            ):
                # Nothing changed, unless a primary's write path is not running
                # (the first registration after a start, or a failed start).
                if lv.role != pb.ROLE_PRIMARY or lv.name in self.primaries:
                    continue
            try:
                await self.assign(a)
            except DataMissing:
                pass  # logged by the registry, rate limited; reported as data_missing
            except SyncrepError as e:
                self._assign_failed(a.spec.name, e.message)
            except Exception as e:  # a storage failure (disk full, ...): retried at the next heartbeat
                self._assign_failed(a.spec.name, f"{type(e).__name__}: {e}")
            else:
                self._assign_errors.pop(a.spec.name, None)

    def _assign_failed(self, volume: str, why: str) -> None:
        """Log a failed assignment; the same failure again (every heartbeat
        retries it) at most every ASSIGN_ERROR_LOG_INTERVAL_S."""
        now = time.monotonic()
        last = self._assign_errors.get(volume)
        if last is not None and last[0] == why and now - last[1] < ASSIGN_ERROR_LOG_INTERVAL_S:
            return
        self._assign_errors[volume] = (why, now)
        log.error("cannot apply assignment of volume %s: %s (retried at every heartbeat)", volume, why)

    async def _coordinator_loop(self) -> None:
        """Register (retrying with backoff), then heartbeat; re-register when
        the coordinator forgot us (it restarted from an older state, say)."""
        registered = False
        warned = False
        while True:
            stub = pbg.CoordinatorServiceStub(self._coord_channel)  # the leader as last learnt
            try:
                if not registered:
                    await self._register()
                    registered = True
                    warned = False
                request = pb.HeartbeatRequest(address=self.address, volumes=self.reports())
                # The lease counts from when the request was sent (docs/FAILOVER.md section 2).
                sent_at = time.monotonic()
                reply = await stub.Heartbeat(request, timeout=max(1.0, self.heartbeat_interval_s * 4))
                if not reply.known:
                    registered = False
                    continue
                self._on_leases(reply.leases, sent_at)
                await self._apply_assignments(reply.assignments)
            except grpc.RpcError as e:
                if self._follow_coordinator(e) and redirect_of(e):
                    continue  # a redirect: to the leader at once (its lease grants keep coming)
                if not warned:
                    log.warning("coordinator %s unreachable: %s: %s (retrying)",
                                self.coordinator_now, e.code().name, e.details())
                    warned = True
                registered = registered and e.code() != grpc.StatusCode.NOT_FOUND
            except Exception:
                # Never let the loop die: a node that stops heartbeating is
                # declared dead for good, and its pairs never resync.
                log.exception("coordinator loop: unexpected error (retrying)")
            await asyncio.sleep(self.heartbeat_interval_s)

    # ------------------------------------------------------------ several coordinators (issue 12)
    def _coord_channel_to(self, address: str) -> Any:
        ch = self._coord_channels.get(address)
        if ch is None:
            ch = self._coord_channels[address] = rpc.channel(address)
        return ch

    def _follow_coordinator(self, err: grpc.RpcError) -> bool:
        """After a failed call to the coordinator: move to the leader a
        redirect names, or, when this one cannot be reached or knows no
        leader, to the next coordinator named. True when it moved."""
        leader = redirect_of(err)
        here = self.coordinator_now
        if leader:
            target = leader
        elif leader == "" or err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            if len(self.coordinators) < 2:
                return False
            i = self.coordinators.index(here) if here in self.coordinators else -1
            target = self.coordinators[(i + 1) % len(self.coordinators)]
        else:
            return False
        if target == here:
            return False
        log.info("coordinator %s %s: heartbeats and reports go to %s now", here,
                 f"redirects to the leader {leader}" if leader else "does not answer or knows no leader", target)
        self.coordinator_now = target
        self._coord_channel = self._coord_channel_to(target)
        return True

    def _on_leases(self, leases: Any, sent_at: float) -> None:
        """Hand each lease to its primary's write path; ``sent_at`` is when the
        request they answer was sent. A lease for a volume without a running
        primary here means nothing (it will be the next reply's business)."""
        for lease in leases:
            pv = self.primaries.get(lease.volume)
            if pv is not None:
                pv.on_lease(lease, sent_at)

    async def _report(self, report: pb.ReplicationReport) -> pb.ReportReplicationReply | None:
        """Deliver a failure/state report to the coordinator, retried with
        backoff for up to REPORT_RETRY_MAX_S (heartbeats carry the same state
        afterwards, so nothing is lost if this gives up). Returns the reply
        (its lease already handed to the primary), or None after giving up."""
        reply: pb.ReportReplicationReply | None = None
        sent_at = 0.0
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_delay(REPORT_RETRY_MAX_S),
                wait=wait_exponential_jitter(multiplier=0.1, max=2.0),
                retry=retry_if_exception_type(grpc.RpcError),
                reraise=True,
            ):
                with attempt:
                    sent_at = time.monotonic()  # of the attempt that succeeds
                    # The leader as last learnt; a redirect or an unreachable
                    # coordinator moves the next attempt (issue 12).
                    stub = pbg.CoordinatorServiceStub(self._coord_channel)
                    try:
                        reply = await stub.ReportReplication(report, timeout=rpc.DEFAULT_RPC_TIMEOUT_S)
                    except grpc.RpcError as e:
                        self._follow_coordinator(e)
                        raise
        except grpc.RpcError as e:
            log.warning("could not report %s state of volume %s to the coordinator: %s: %s",
                        pb.PairState.Name(report.state), report.volume, e.code().name, e.details())
            return None
        if reply is not None and reply.HasField("lease"):
            pv = self.primaries.get(report.volume)
            if pv is not None:
                pv.on_lease(reply.lease, sent_at)
        return reply


def _no_data_to_serve(lv: LocalVolume, epoch: int, what: str) -> str:
    return (
        f"volume {lv.name!r} is {what} at epoch {epoch} on this node, but this replica holds no data of the "
        f"pair (volume UUID {lv.identity.volume_uuid or '(none)'}, generation {lv.identity.short()}: a rebuild "
        "whose full copy has not completed); it is never served. Promote the replica that has the data"
    )


def _discard_meta(
    lv: LocalVolume, revert_to: int, snapshot: str
) -> tuple[dict[str, str | None], Identity] | None:
    """On the I/O thread: a secondary whose data `syncrep resolve` discards
    (docs/FAILOVER.md section 6). Its live state is kept in the snapshot
    ``snapshot`` (for recovery), then it reverts to the common generation
    ``revert_to`` (persisted with the assignment); its writes since are its
    divergent extents, persisted at its demotion, which the resync
    overwrites. None when there is nothing to do: already reverted (a
    re-sent assignment), or ``revert_to`` is not in its history."""
    reverted = lv.identity.reverted_to(revert_to) if revert_to else None
    if reverted is None or reverted == lv.identity:
        return None
    _keep_snapshot(lv, snapshot)
    return dict(reverted.to_meta()), reverted


def _keep_snapshot(lv: LocalVolume, name: str) -> int:
    """The snapshot ``name`` of the live state (created once: a re-sent
    assignment finds it)."""
    existing = lv.store.find_snapshot(name)
    if existing is not None:
        return existing.id
    info = lv.store.create_snapshot(name)
    log.warning("volume %s: snapshot %r (id %d) keeps this replica's state before it is discarded",
                lv.name, name, info.id)
    return info.id


def _demotion_meta(
    lv: LocalVolume, revert_to: int = 0, discard_snapshot: str = ""
) -> tuple[dict[str, str | None], list[Extent], Identity | None]:
    """On the I/O thread, the write path stopped: what a demoted primary
    persists with its role change (docs/FAILOVER.md section 4): its divergent
    extents (activity log regions, failed extents, what it wrote alone since
    its fault snapshot, any earlier ones) and its primary pair record reset,
    so a later promotion starts clean. Returns (metadata, divergent extents)."""
    store = lv.store
    rec = PairRecord.from_meta(store.meta_get)
    written_alone: list[Extent] = []
    if rec.fault_snapshot_id and any(s.id == rec.fault_snapshot_id for s in store.list_snapshots()):
        written_alone = store.diff(rec.fault_snapshot_id)
    div = divergent_extents(rec, store.size_bytes, written_alone, decode_extents(store.meta_get(META_NODE_DIVERGENT)))
    meta: dict[str, str | None] = {**PairRecord().to_meta(), META_NODE_DIVERGENT: encode_extents(div)}
    # After an unforced promotion the coordinator names the generation this
    # node shared with the new primary; anything newer it minted acknowledged
    # nothing (no lease let it write alone), so it goes back to that one and
    # the resync overwrites the divergent extents (docs/FAILOVER.md section 4).
    # Without this, an isolated primary that went degraded on its own would
    # look split-brained on its return although it lost nobody's write.
    reverted = lv.identity.reverted_to(revert_to) if revert_to else None
    if reverted is not None:
        if discard_snapshot and reverted != lv.identity:
            # `syncrep resolve` discards this old primary's data: its state is
            # kept first (docs/FAILOVER.md section 6).
            _keep_snapshot(lv, discard_snapshot)
        meta.update(reverted.to_meta())
    return meta, div, reverted


def _handover_meta(identity: Identity) -> dict[str, str | None]:
    """What a primary that handed over (drained, gate held, docs/FAILOVER.md
    section 5) persists with its demotion: its primary record reset, no
    divergent extents (every write it has is on the new primary too) and the
    identity both replicas shared at the handover."""
    return {**PairRecord().to_meta(), META_NODE_DIVERGENT: encode_extents([]), **identity.to_meta()}


async def _abort(context: grpc.aio.ServicerContext, e: SyncrepError) -> None:
    await context.abort(e.code, rpc.status_details(e.message))


#: One write's outcome on a Write stream: (client_seq, code, message), code 0 = OK.
WriteOutcome = tuple[int, int, str]


def pack_write_replies(ready: Sequence[WriteOutcome], max_seqs: int) -> list[pb.WriteReply]:
    """The WriteReply messages that answer the outcomes in ``ready``, each
    exactly once: every non-OK outcome in a message of its own (its code and
    message), the OK ones ``max_seqs`` to a message (``client_seq`` and then
    ``more_ok_seqs``). ``max_seqs`` 1 is the reply of a client that did not
    ask for batches: one message per write, ``more_ok_seqs`` empty."""
    out: list[pb.WriteReply] = []
    ok: list[int] = []
    for seq, code, message in ready:
        if code:
            out.append(pb.WriteReply(client_seq=seq, code=code, message=message))
        else:
            ok.append(seq)
    for i in range(0, len(ok), max_seqs):
        out.append(pb.WriteReply(client_seq=ok[i], more_ok_seqs=ok[i + 1:i + max_seqs]))
    return out


class VolumeServicer(pbg.VolumeServiceServicer):
    def __init__(self, node: Node) -> None:
        self.node = node

    def _refusal(self, peer: rpc.Peer, volume: str, write: bool) -> str | None:
        return authz.volume_refusal(peer, volume, write, self.node.grants)

    async def _check(self, context: grpc.aio.ServicerContext, volume: str, write: bool) -> None:
        """Refuse (PERMISSION_DENIED, one WARNING line) a user without the grant."""
        why = self._refusal(rpc.peer_of(context), volume, write)
        if why is not None:
            await authz.deny(context, why)

    async def Write(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        # Outcomes wait here for the sender; None: the reader is done and
        # every write it started is answered.
        replies: asyncio.Queue[WriteOutcome | None] = asyncio.Queue()
        # Writes per OK reply message: 1 until the client says it reads
        # more_ok_seqs (WriteRequest.batch_replies).
        per_reply = [1]
        sem = asyncio.Semaphore(MAX_OUTSTANDING_PER_STREAM)
        tasks: dict[asyncio.Task[None], None] = {}
        peer = rpc.peer_of(context)
        # Each request names its volume: the grant is checked per write (a
        # revoked one is refused from the next write on, on an open stream
        # too), the refusal is that write's reply and the stream goes on.
        # Logged once per stream and reason, not once per refused write.
        logged: set[str] = set()

        async def one(req: pb.WriteRequest) -> None:
            try:
                why = self._refusal(peer, req.volume, True)
                if why is not None:
                    if why not in logged:
                        logged.add(why)
                        authz.log.warning("refused: %s", why)
                    raise PermissionDenied(why)
                await self.node.primary(req.volume).write(req.offset, req.data)
                outcome: WriteOutcome = (req.client_seq, 0, "")
            except SyncrepError as e:
                outcome = (req.client_seq, rpc.code_value(e.code), e.message)
            except Exception as e:  # a bug: report it on this write, keep the stream
                log.exception("write failed")
                outcome = (req.client_seq, rpc.code_value(grpc.StatusCode.INTERNAL), str(e))
            finally:
                sem.release()
            replies.put_nowait(outcome)  # unbounded: the semaphore bounds it

        failed: list[BaseException] = []

        async def reader() -> None:
            try:
                while True:
                    req = await context.read()
                    if req is grpc.aio.EOF:
                        break
                    if req.batch_replies:
                        per_reply[0] = WRITE_REPLY_MAX_SEQS
                    await sem.acquire()
                    t = asyncio.create_task(one(req))
                    tasks[t] = None
                    t.add_done_callback(lambda done: tasks.pop(done, None))
            except Exception as e:
                # A message that does not parse (rpc.Guard raises on read), or
                # the stream broke: answer what was read, then end the call
                # with the error (found by tests/test_fuzz_rpc.py: it was lost
                # and the stream ended OK with writes unanswered).
                failed.append(e)
            finally:
                if tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
                await replies.put(None)

        rt = asyncio.create_task(reader())
        try:
            # Send what is ready now, packed (a group commit completes many
            # writes at once), without waiting for more: while one send is
            # flow-controlled, the next outcomes queue up for the next one.
            done = False
            while not done:
                first = await replies.get()
                ready: list[WriteOutcome] = []
                if first is None:
                    done = True
                else:
                    ready.append(first)
                    while not replies.empty() and len(ready) < WRITE_REPLY_MAX_SEQS:
                        nxt = replies.get_nowait()
                        if nxt is None:
                            done = True
                            break
                        ready.append(nxt)
                for r in pack_write_replies(ready, per_reply[0]):
                    await context.write(r)
        finally:
            rt.cancel()
        if failed:
            raise failed[0]

    async def WriteOne(self, request: pb.WriteRequest, context: grpc.aio.ServicerContext) -> pb.WriteReply:
        await self._check(context, request.volume, True)
        try:
            await self.node.primary(request.volume).write(request.offset, request.data)
        except SyncrepError as e:
            await _abort(context, e)
        return pb.WriteReply(client_seq=request.client_seq, code=0)

    async def Read(self, request: pb.ReadRequest, context: grpc.aio.ServicerContext) -> pb.ReadReply:
        await self._check(context, request.volume, False)
        try:
            data = await self.node.primary(request.volume).read(
                request.offset, request.length, request.snapshot_id
            )
        except SyncrepError as e:
            await _abort(context, e)
        except Exception as e:
            await _abort(context, _store_error(e))
        return pb.ReadReply(data=data)


def _store_error(e: Exception) -> SyncrepError:
    """Map a block store exception to a status: its message already names the bad value."""
    name = type(e).__name__
    code = {
        "OutOfRangeError": grpc.StatusCode.OUT_OF_RANGE,
        "MisalignedError": grpc.StatusCode.INVALID_ARGUMENT,
        "EmptyWriteError": grpc.StatusCode.INVALID_ARGUMENT,
        "UnknownSnapshotError": grpc.StatusCode.NOT_FOUND,
        "InvalidDiffError": grpc.StatusCode.INVALID_ARGUMENT,
    }.get(name, grpc.StatusCode.INTERNAL)
    return SyncrepError(str(e), code)


class NodeServicer(pbg.NodeServiceServicer):
    def __init__(self, node: Node) -> None:
        self.node = node

    async def AssignVolume(self, request: pb.VolumeAssignment, context: grpc.aio.ServicerContext) -> Any:
        # A pushed assignment carries the volume's grants too (CreateVolume's
        # come before any heartbeat names the volume).
        self.node.set_grants([request], full=False)
        try:
            msg = await self.node.assign(request)
        except SyncrepError as e:
            await _abort(context, e)
        reply = pb.AssignVolumeReply(message=msg)
        lv = self.node.registry.volumes.get(request.spec.name)
        if lv is not None:
            # What the coordinator needs to account for a demotion or a
            # resolve's discard at once (the heartbeats report it too).
            reply.divergent_extents.extend(pb.Extent(offset=e.offset, length=e.length) for e in lv.divergent)
            reply.identity.CopyFrom(identity_msg(lv.identity))
            if request.discard_snapshot:
                snap = await lv.run_io(lv.store.find_snapshot, request.discard_snapshot)
                if snap is not None:
                    reply.discard_snapshot, reply.discard_snapshot_id = snap.name, snap.id
            if request.create:
                # Issue 13: a thin volume larger than the free space is
                # allowed, with a warning saying how much is free.
                reply.free_bytes, reply.warning = thin_warning(
                    lv.name, lv.store.size_bytes, self.node.registry.root, self.node.address
                )
                if reply.warning:
                    log.warning("%s", reply.warning)
        return reply

    async def PrepareHandover(self, request: pb.PrepareHandoverRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await self.node.prepare_handover(request)
        except SyncrepError as e:
            await _abort(context, e)

    async def StartResync(self, request: pb.StartResyncRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            # Serialised with assignments: a resync never starts on a write
            # path that an assignment is replacing.
            async with self.node._assign_lock:
                msg = await self.node.primary(request.volume).start_resync(
                    request.epoch,
                    extra_extents=[Extent(e.offset, e.length) for e in request.extra_extents],
                    full_copy=request.full_copy,
                )
        except SyncrepError as e:
            await _abort(context, e)
        return pb.StartResyncReply(message=msg)

    async def NodeStatus(self, request: pb.NodeStatusRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.NodeStatusReply(address=self.node.address, volumes=self.node.reports())

    async def ReadLocal(self, request: pb.ReadRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            lv = self.node.registry.get(request.volume)
            check_io_range(lv.name, lv.store.size_bytes, lv.store.block_size, request.offset,
                           request.length, what="read")
            if request.length > MAX_WRITE_BYTES:
                raise InvalidArgument(
                    f"read of {request.length} bytes exceeds the {MAX_WRITE_BYTES}-byte limit per read"
                )
            data = await asyncio.to_thread(
                lv.store.read_at, request.snapshot_id or None, request.offset, request.length
            )
        except SyncrepError as e:
            await _abort(context, e)
        except Exception as e:
            await _abort(context, _store_error(e))
        return pb.ReadReply(data=data)

    async def Checksum(self, request: pb.ChecksumRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            lv = self.node.registry.get(request.volume)
            chunk = request.chunk_bytes or (1 << 20)
            if chunk % lv.store.block_size or chunk > (64 << 20):
                raise InvalidArgument(
                    f"chunk_bytes {chunk} must be a multiple of the {lv.store.block_size}-byte block size "
                    "and at most 64 MiB"
                )
            sums = await asyncio.to_thread(
                lv.store.checksums, request.offset, request.length, chunk, request.snapshot_id or None
            )
        except SyncrepError as e:
            await _abort(context, e)
        except Exception as e:
            await _abort(context, _store_error(e))
        return pb.ChecksumReply(chunk_bytes=chunk, crc32c=sums, offset=request.offset)

    async def InjectFault(self, request: pb.InjectFaultRequest, context: grpc.aio.ServicerContext) -> Any:
        if not self.node.options.enable_fault_injection:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "fault injection is disabled; start the node with --enable-fault-injection (tests only)",
            )
        try:
            lv = self.node.registry.get(request.volume)
            if request.kind == "corrupt_chunk":
                self.node.primary(request.volume).counters.corrupt_next = max(1, request.count)
            else:
                lv.faults.arm(request.kind, request.count)
                pv = self.node.primaries.get(request.volume)
                if request.kind == "clear" and pv is not None:
                    pv.counters.corrupt_next = 0
        except SyncrepError as e:
            await _abort(context, e)
        if request.kind == "clear":
            log.warning("fault injection cleared on volume %s", request.volume)
            return pb.InjectFaultReply(message=f"faults cleared on {request.volume}")
        log.warning("fault injection armed on volume %s: %s x%d", request.volume, request.kind, request.count)
        return pb.InjectFaultReply(message=f"armed {request.kind} x{request.count} on {request.volume}")


    async def ListSnapshots(self, request: pb.ListSnapshotsRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            lv = self.node.registry.get(request.volume)
        except SyncrepError as e:
            await _abort(context, e)
        snaps = await asyncio.to_thread(lv.store.list_snapshots)
        return pb.ListSnapshotsReply(
            snapshots=[pb.SnapshotInfo(id=s.id, name=s.name, created_at=s.created_at) for s in snaps]
        )

    async def Repair(self, request: pb.RepairRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            pv = self.node.primary(request.volume)
            for e in request.extents:
                check_io_range(pv.lv.name, pv.lv.store.size_bytes, pv.lv.store.block_size,
                               e.offset - e.offset % pv.lv.store.block_size,
                               max(pv.lv.store.block_size, e.length), what="repair extent")
            sent = await pv.repair([Extent(e.offset, e.length) for e in request.extents])
        except SyncrepError as e:
            await _abort(context, e)
        return pb.RepairReply(bytes_sent=sent, message=f"re-sent {sent} bytes to the secondary")

    async def AbortResync(self, request: pb.AbortResyncRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            lv = self.node.registry.get(request.volume)
            if lv.role != pb.ROLE_SECONDARY:
                raise FailedPrecondition(f"this node is {role_name(lv.role)} for {lv.name!r}; "
                                         "AbortResync runs on the secondary")
            msg, n = await lv.run_io(self.node.resync_receiver.abort, lv, request.rollback)
        except SyncrepError as e:
            await _abort(context, e)
        log.warning("volume %s: %s", request.volume, msg)
        return pb.AbortResyncReply(message=msg, rolled_back_bytes=n)

    # ------------------------------------------------------------ lifecycle (issue 13)

    async def DeleteVolume(self, request: pb.NodeDeleteVolumeRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await self.node.delete_volume(request)
        except SyncrepError as e:
            await _abort(context, e)

    async def ResizeVolume(self, request: pb.NodeResizeVolumeRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await self.node.resize_volume(request)
        except SyncrepError as e:
            await _abort(context, e)
        except Exception as e:  # the store refused (InvalidArgumentError) or the disk failed
            await _abort(context, _store_error(e))


async def serve(
    role_hint: str,
    listen: str,
    data_dir: Path,
    coordinator: str,
    advertise: str | None,
    options: NodeOptions,
) -> None:
    """Run a node until SIGTERM/SIGINT, then stop gracefully."""
    node = Node(role_hint, listen, data_dir, coordinator, advertise, options)
    await node.start()
    # systemd Type=notify (deploy/systemd): ready once it listens, not once it
    # registered (the coordinator may be down; it keeps trying).
    sdnotify.ready(f"{role_hint} node serving on {node.address}, coordinator {coordinator}")
    sig = await rpc.wait_for_signal()
    log.info("received signal %d", sig)
    sdnotify.stopping()
    await node.stop(reason=f"received {signal.Signals(sig).name}")
