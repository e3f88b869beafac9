"""A node process: holds volumes, plays the primary or secondary role per pair.

``syncrep primary`` and ``syncrep secondary`` both run this; the flag is only
a hint recorded at registration. Which role a node plays for a volume is a
property of the pair, assigned by the coordinator with an epoch, so promoting
a secondary later is an assignment, not a different program.

Servers: VolumeService (client writes/reads, on the primary), ReplicaService
(replication and resync streams, on the secondary), NodeService (assignment,
resync control, node-local reads and checksums, test fault hooks), health.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import grpc
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from primary.volume import PrimaryVolume
from secondary.replica import ReplicaServicer
from secondary.resync import ResyncReceiver, ResyncState
from syncrep import __version__, rpc
from syncrep.blockstore import Extent
from syncrep.config import NodeOptions
from syncrep.core.identity import Identity
from syncrep.core.pair import PairRecord
from syncrep.core.receiver import decode_extents, divergent_extents, encode_extents
from syncrep.core.vocab import MAX_WRITE_BYTES, META_NODE_DIVERGENT, META_NODE_PROMOTE_PENDING
from syncrep.errors import FailedPrecondition, InvalidArgument, SyncrepError, check_io_range
from syncrep.nbd.server import NbdServer, NodeExports
from syncrep.pb import syncrep_pb2 as pb
from syncrep.pb import syncrep_pb2_grpc as pbg
from syncrep.volumes import DataMissing, LocalVolume, VolumeRegistry, role_name

log = logging.getLogger(__name__)

MAX_OUTSTANDING_PER_STREAM = 512
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
        self.options = options
        self.data_dir = Path(data_dir)
        self.registry = VolumeRegistry(self.data_dir, options.durability)
        self.primaries: dict[str, PrimaryVolume] = {}
        self.server = rpc.Server(listen)
        self.heartbeat_interval_s = 0.5
        self._tasks: dict[asyncio.Task[Any], None] = {}  # ordered: see PrimaryVolume._tasks
        self._coord_channel: Any = None
        self._assign_lock = asyncio.Lock()
        self._assign_errors: dict[str, tuple[str, float]] = {}  # volume -> (last failure, monotonic time)
        self.resync_receiver = ResyncReceiver(self.registry)
        self.replica = ReplicaServicer(self.registry, self.resync_receiver)
        self.nbd: NbdServer | None = None  # --nbd-listen: volumes as NBD exports

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> int:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Before the volumes start: a primary that recovers from a crash
        # reports the pair degraded right away, through this channel.
        self._coord_channel = rpc.channel(self.coordinator)
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
            self.nbd = NbdServer(
                self.options.nbd_listen, NodeExports(self.primaries, self.registry, self.options.durability)
            )
            await self.nbd.start()
        self._spawn(self._coordinator_loop(), "coordinator-loop")
        return port

    async def stop(self, grace_s: float = rpc.SHUTDOWN_GRACE_S) -> None:
        log.info("node %s shutting down (grace %.1f s)", self.address, grace_s)
        if self.nbd is not None:
            await self.nbd.stop()  # first: in-flight NBD writes finish on a running write path
        for t in list(self._tasks):
            t.cancel()
        for pv in self.primaries.values():
            await pv.stop()
        await self.server.stop(grace_s)
        if self._coord_channel is not None:
            await self._coord_channel.close()
        self.registry.close()

    def _spawn(self, coro: Any, name: str) -> None:
        t = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks[t] = None
        t.add_done_callback(lambda done: self._tasks.pop(done, None))

    # ------------------------------------------------------------ roles
    async def _become_primary(self, lv: LocalVolume) -> PrimaryVolume:
        pv = self.primaries.get(lv.name)
        if pv is None:
            pv = PrimaryVolume(lv, self.options, self.address, self._report)
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
                        extra, demoted, reverted = await cur.run_io(_demotion_meta, cur, a.revert_to_generation)
            # DataMissing (no data of the pair here) propagates: logged by the
            # registry (rate limited), reported in every heartbeat, never served.
            lv, role_changed = await asyncio.to_thread(self.registry.assign, a, extra)
            if demoted is not None:
                lv.divergent = demoted
                if reverted is not None and reverted != lv.identity:
                    log.warning(
                        "volume %s: generations after %s were never confirmed by a lease from the coordinator "
                        "(the pair was in sync when %s was promoted, so this node acknowledged no write alone "
                        "under %s): reverted to %s; what it wrote since is in the divergent extents",
                        lv.name, reverted.short(), lv.peer, lv.identity.short(), reverted.short(),
                    )
                    lv.identity = reverted
                if handed_over is not None:
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
                released = pv.release_handover(request.epoch)
                return pb.PrepareHandoverReply(
                    epoch=lv.epoch, message="gate reopened" if released else "no handover in progress"
                )
            if not 0 < request.timeout_s <= MAX_HANDOVER_TIMEOUT_S:
                raise InvalidArgument(
                    f"handover timeout {request.timeout_s} s is not in (0, {MAX_HANDOVER_TIMEOUT_S:.0f}] s"
                )
        # Outside the lock: the drain waits for writes, and the demotion
        # (an assignment) must be able to come in while the gate is held.
        acked, drain_s = await pv.prepare_handover(lv.epoch, request.timeout_s)
        return pb.PrepareHandoverReply(
            epoch=lv.epoch, acked_seq=acked, identity=pb.Identity(**lv.identity.proto_fields()),  # type: ignore[arg-type]
            drain_s=drain_s, message=f"drained up to seq {acked} in {drain_s:.3f} s; writes wait at the gate",
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
        for name, lv in self.registry.volumes.items():
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
        for name, m in self.registry.missing.items():
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
                 self.coordinator, self.address, len(reply.assignments))
        await self._apply_assignments(reply.assignments)

    async def _apply_assignments(self, assignments: Any) -> None:
        """Apply the coordinator's assignments: every volume of this node (a
        registration's or heartbeat's reply carries the full set)."""
        # A volume no longer assigned here is no longer ours to report missing.
        self.registry.forget_missing({a.spec.name for a in assignments})
        for a in assignments:
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
        stub = pbg.CoordinatorServiceStub(self._coord_channel)
        registered = False
        warned = False
        while True:
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
                if not warned:
                    log.warning("coordinator %s unreachable: %s: %s (retrying)",
                                self.coordinator, e.code().name, e.details())
                    warned = True
                registered = registered and e.code() != grpc.StatusCode.NOT_FOUND
            except Exception:
                # Never let the loop die: a node that stops heartbeating is
                # declared dead for good, and its pairs never resync.
                log.exception("coordinator loop: unexpected error (retrying)")
            await asyncio.sleep(self.heartbeat_interval_s)

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
        stub = pbg.CoordinatorServiceStub(self._coord_channel)
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
                    reply = await stub.ReportReplication(report, timeout=rpc.DEFAULT_RPC_TIMEOUT_S)
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


def _demotion_meta(
    lv: LocalVolume, revert_to: int = 0
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
        meta.update(reverted.to_meta())
    return meta, div, reverted


def _handover_meta(identity: Identity) -> dict[str, str | None]:
    """What a primary that handed over (drained, gate held, docs/FAILOVER.md
    section 5) persists with its demotion: its primary record reset, no
    divergent extents (every write it has is on the new primary too) and the
    identity both replicas shared at the handover."""
    return {**PairRecord().to_meta(), META_NODE_DIVERGENT: encode_extents([]), **identity.to_meta()}


async def _abort(context: grpc.aio.ServicerContext, e: SyncrepError) -> None:
    await context.abort(e.code, e.message)


class VolumeServicer(pbg.VolumeServiceServicer):
    def __init__(self, node: Node) -> None:
        self.node = node

    async def Write(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        replies: asyncio.Queue[pb.WriteReply | None] = asyncio.Queue()
        sem = asyncio.Semaphore(MAX_OUTSTANDING_PER_STREAM)
        tasks: dict[asyncio.Task[None], None] = {}

        async def one(req: pb.WriteRequest) -> None:
            try:
                await self.node.primary(req.volume).write(req.offset, req.data)
                reply = pb.WriteReply(client_seq=req.client_seq, code=0)
            except SyncrepError as e:
                reply = pb.WriteReply(client_seq=req.client_seq, code=rpc.code_value(e.code), message=e.message)
            except Exception as e:  # a bug: report it on this write, keep the stream
                log.exception("write failed")
                reply = pb.WriteReply(
                    client_seq=req.client_seq, code=rpc.code_value(grpc.StatusCode.INTERNAL), message=str(e)
                )
            finally:
                sem.release()
            await replies.put(reply)

        async def reader() -> None:
            try:
                while True:
                    req = await context.read()
                    if req is grpc.aio.EOF:
                        break
                    await sem.acquire()
                    t = asyncio.create_task(one(req))
                    tasks[t] = None
                    t.add_done_callback(lambda done: tasks.pop(done, None))
                if tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
            finally:
                await replies.put(None)

        rt = asyncio.create_task(reader())
        try:
            while (r := await replies.get()) is not None:
                await context.write(r)
        finally:
            rt.cancel()

    async def WriteOne(self, request: pb.WriteRequest, context: grpc.aio.ServicerContext) -> pb.WriteReply:
        try:
            await self.node.primary(request.volume).write(request.offset, request.data)
        except SyncrepError as e:
            await _abort(context, e)
        return pb.WriteReply(client_seq=request.client_seq, code=0)

    async def Read(self, request: pb.ReadRequest, context: grpc.aio.ServicerContext) -> pb.ReadReply:
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
        try:
            msg = await self.node.assign(request)
        except SyncrepError as e:
            await _abort(context, e)
        return pb.AssignVolumeReply(message=msg)

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
    sig = await rpc.wait_for_signal()
    log.info("received signal %d", sig)
    await node.stop()
