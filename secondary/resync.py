"""The secondary end of a resync (method step 3): apply diff streams safely.

Protocol, per round (one ``Resync`` call):

    primary: header(resync_id, round, base, target, kind, final, rollback_to_snapshot)
    secondary: reply(applied_below = K)        <- resume point, persisted per round
    primary: chunk K, chunk K+1, ...           <- each with its crc32c
    secondary: reply(applied_below = ...)      <- after each durable group commit
               reply(refused, refused_index)   <- bad checksum: never applied, re-sent
    primary: trailer(chunk_count, digest)
    secondary: reply(complete)                 <- after checking count and digest

The secondary stays a usable DR copy throughout: before the first chunk of a
new resync it takes its own ``pre-resync-<id>`` snapshot — the last state it
knows to be consistent — and keeps it until the final round completes, so an
abandoned resync can be rolled back (``AbortResync(rollback=True)``).
Progress is persisted after every group commit, so an interrupted resync
resumes from the last applied chunk.

Releasing the rollback point is a step of its own, not the tail of the final
``Resync`` call:

1. At the final round's trailer the secondary persists, in its resync state
   (``secondary.resync``), ``complete`` and the round's epoch — *before* it
   answers ``complete``. From then on its data is the primary's final target
   snapshot, a consistent state, so the rollback point is no longer needed.
2. The primary cancels the call as soon as it reads ``complete`` (and holds
   client writes paused until it has switched back), so nothing may follow
   the reply in this call: a cancellation would skip it (it did: the
   ``pre-resync-*`` snapshot was left behind after about 1 resync in 7, and
   every later write paid copy-on-write for it).
3. The release (``release_rollback_point``: delete every ``pre-resync-*``
   snapshot, then record that nothing awaits release) runs on the volume's
   I/O thread when

   * the primary opens the replication stream at that epoch or later
     (``ReplicaServicer.Replicate``): proof that the switch-back happened;
     it is queued, not awaited, so the stream's ``accepted`` reply does not
     wait for it, and it is outside the primary's switch-back write stall;
   * the next resync begins (``begin``), whatever its id;
   * ``AbortResync`` finds the resync already complete;
   * the node starts (``release_pending``, for a node that calls it).

   It re-reads the persisted state on the I/O thread, so it is idempotent
   and ordered with every other store mutation; it never deletes the
   rollback point of a resync that is not complete.

Crash analysis: before ``complete`` is persisted the resync is not complete
and the snapshot is kept (the primary did not hear ``complete`` either, and
resumes). After it, whatever happens, one of the triggers above runs the
release: the primary must open a replication or a resync stream before the
pair is in sync again. A crash between deleting the snapshot and clearing
the pending mark is repaired by the next release (nothing left to delete).
A completed resync that the primary resumes (it crashed, or failed to open
the replication stream, before switching back) is reopened: its rollback
point, if not released yet, is kept; otherwise the current, consistent,
state becomes the new one — and a requested rollback to a common snapshot is
not replayed over the rounds already applied.

Every decision above (new resync, resume, reopen or refusal at a header; a
chunk applied, dropped or refused; the trailer; whether a release may run;
what ``AbortResync`` does) is a pure function of ``syncrep.core.receiver``,
given the persisted ``ResyncState`` and what happened. This module is its
executor: it reads the stream, makes the store calls on the volume's I/O
thread, persists, then replies.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from dataclasses import replace
from typing import Any

import google_crc32c
import grpc

from secondary.replica import EOF_MARK, first_message, read_ahead
from syncrep.blockstore import zeros, zeros_crc32c
from syncrep.core import receiver as core
from syncrep.core.classify import STORAGE_ERRORS, storage_errno, storage_error_text
from syncrep.core.identity import Identity
from syncrep.core.receiver import ChunkVerdict, Header, Opening, Snapshot
from syncrep.core.resync_window import RoundDigest
from syncrep.core.vocab import MAX_WRITE_BYTES, META_NODE_DIVERGENT, META_SECONDARY_RESYNC
from syncrep.errors import FailedPrecondition, SyncrepError
from syncrep.pb import syncrep_pb2 as pb
from syncrep.volumes import LocalVolume, VolumeRegistry

log = logging.getLogger(__name__)

META_RESYNC = META_SECONDARY_RESYNC
GROUP_MAX_BYTES = 8 * 1024 * 1024
# Chunks read ahead of the applier, coalesced into one group commit. The
# primary's resync window (primary/resync.py WINDOW_BYTES) bounds the bytes.
READ_AHEAD_MESSAGES = 256
HEADER_TIMEOUT_S = 10.0


class ResyncState(core.ResyncState):
    """What the secondary persists about its current (or last) resync
    (``syncrep.core.receiver.ResyncState``), read from the volume."""

    @classmethod
    def load(cls, lv: LocalVolume) -> ResyncState:
        return cls.from_json(lv.store.meta_get(META_RESYNC))


def header(h: pb.ResyncHeader) -> Header:
    return Header(h.resync_id, h.round, h.kind, h.base_snapshot_id, h.target_snapshot_id, h.final, h.epoch,
                  h.rollback_to_snapshot)


def _snapshots(lv: LocalVolume) -> list[Snapshot]:
    return [(s.name, s.id) for s in lv.store.list_snapshots()]


def _persist(lv: LocalVolume, st: core.ResyncState) -> None:
    lv.store.meta_set({META_RESYNC: st.dump()})


def _log_release_failure(lv: LocalVolume, why: str, fut: asyncio.Future[list[str]]) -> None:
    if fut.cancelled():
        return
    e = fut.exception()
    if e is not None:
        # Still pending in the persisted state: the next trigger retries it.
        log.error("volume %s: releasing the rollback point (%s) failed: %s: %s; retried at the next "
                  "replication stream, resync or start", lv.name, why, type(e).__name__, e)


class ResyncReceiver:
    """The I/O of the secondary's resync: reads the stream, carries out the
    decisions of ``syncrep.core.receiver`` on the volume's I/O thread (store
    calls, then persist), and replies."""

    def __init__(self, registry: VolumeRegistry) -> None:
        self.registry = registry

    # ------------------------------------------------------------ control
    @staticmethod
    def check_identity(lv: LocalVolume, h: pb.ResyncHeader) -> None:
        """Refuse (FAILED_PRECONDITION) a resync from a primary that is no
        source for this replica: checked before anything is applied or fenced."""
        why = core.header_refusal(lv.identity, Identity.from_proto(h.identity), lv.name, header(h),
                                  full_copy=h.full_copy)
        if why is not None:
            raise FailedPrecondition(why)

    def begin(self, lv: LocalVolume, h: pb.ResyncHeader) -> tuple[core.ResyncState, int]:
        """Runs on the I/O thread. Returns (state, resume index)."""
        self.check_identity(lv, h)
        lv.faults.check_armed()
        hd = header(h)
        if hd.repair:
            # verify --repair while in sync: nothing to roll back to, nothing to resume.
            return core.ResyncState(), 0
        st = ResyncState.load(lv)
        d = core.decide_begin(st, hd, lv.name, _snapshots(lv))
        if d.release_first:
            # The previous resync completed; its rollback point awaits release.
            self.release_rollback_point(lv, f"resync {h.resync_id} begins")
        if d.opening is Opening.REFUSE:
            raise FailedPrecondition(d.refuse)
        if d.rollback_to is not None:
            name, snap_id = d.rollback_to
            n = lv.store.rollback_to(snap_id)
            log.warning("volume %s: rolled back %d bytes to common snapshot %r before resync", lv.name, n, name)
        if d.no_rollback_point:
            log.error("volume %s: resync %s begins over abandoned resync %s whose rollback point %d is "
                      "gone: no rollback point until it completes", lv.name, h.resync_id, st.resync_id,
                      st.pre_snapshot_id)
        for name, snap_id in d.delete:
            lv.store.delete_snapshot(snap_id)
            log.info("volume %s: stale rollback point %r (id %d) released: no resync in progress "
                     "(resync %s begins)", lv.name, name, snap_id, h.resync_id)
        new = d.state
        if d.create_snapshot:
            new = replace(new, pre_snapshot_id=lv.store.create_snapshot(d.create_snapshot).id)
        if d.persist:
            _persist(lv, new)
        if d.opening is Opening.REOPEN:
            log.warning("volume %s: resync %s resumed after its final round completed here (the primary did "
                        "not switch back); rollback point: %s snapshot %d", lv.name, new.resync_id,
                        "kept" if d.kept else "new", new.pre_snapshot_id)
        elif d.opening is Opening.NEW:
            log.info("volume %s: resync %s begins; pre-resync snapshot %d is the rollback point",
                     lv.name, h.resync_id, new.pre_snapshot_id)
        return new, d.resume

    def finish(
        self, lv: LocalVolume, st: core.ResyncState, epoch: int, identity: Identity | None = None
    ) -> core.ResyncState:
        """The final round is complete (runs on the I/O thread, before the
        "complete" reply). Persisted: from here on a release of the rollback
        point is owed, and one of the triggers (module docstring) runs it.

        In the same transaction the replica adopts the primary's ``identity``
        (docs/FAILOVER.md section 1) and forgets its divergent extents (the
        resync overwrote them): a crash before it leaves the resync incomplete
        and the identity unchanged, so the next resync is still accepted."""
        st = st.completed(epoch)
        items: dict[str, str | None] = {META_RESYNC: st.dump()}
        if identity is not None:
            items.update(identity.to_meta())
            items[META_NODE_DIVERGENT] = None
        lv.store.meta_set(items)
        if identity is not None:
            old, lv.identity = lv.identity, identity
            lv.divergent = []
            log.info("volume %s: adopted the primary's identity: generation %s (was %s)", lv.name,
                     identity.short(), old.short())
        log.info("volume %s: resync %s complete at epoch %d; rollback point %d awaits release (when the "
                 "primary opens the replication stream)", lv.name, st.resync_id, epoch, st.pre_snapshot_id)
        return st

    @staticmethod
    def release_rollback_point(lv: LocalVolume, why: str, epoch: int = 0) -> list[str]:
        """Release the rollback point of a *completed* resync (runs on the I/O
        thread; ``core.decide_release`` says whether and what). Idempotent: it
        re-reads the persisted state, deletes every ``pre-resync-*`` snapshot,
        then records that nothing awaits release (after the deletions: a crash
        in between leaves the release pending, and the next one finds nothing
        left to delete). Returns the names."""
        st = ResyncState.load(lv)
        d = core.decide_release(st, _snapshots(lv), epoch)
        if d is None:
            return []
        released = []
        for name, snap_id in d.delete:
            lv.store.delete_snapshot(snap_id)
            released.append(name)
            if st.complete:
                log.info("volume %s: rollback point %r (id %d) released: resync %s completed at epoch %d; %s",
                         lv.name, name, snap_id, st.resync_id, st.epoch, why)
            else:
                log.info("volume %s: stale rollback point %r (id %d) released: no resync in progress; %s",
                         lv.name, name, snap_id, why)
        if d.state is not None:
            _persist(lv, d.state)
        return released

    def schedule_release(self, lv: LocalVolume, why: str, epoch: int = 0) -> asyncio.Future[list[str]] | None:
        """Queue ``release_rollback_point`` on the volume's I/O thread without
        waiting for it (so no reply waits for a snapshot deletion). Failures
        are logged; the release stays pending and the next trigger retries."""
        try:
            fut = lv.submit_io(self.release_rollback_point, lv, why, epoch)
        except RuntimeError as e:  # the volume is closing
            log.info("volume %s: release of the rollback point not queued (%s): %s", lv.name, why, e)
            return None
        fut.add_done_callback(lambda f: _log_release_failure(lv, why, f))
        return fut

    def release_pending(self) -> list[asyncio.Future[list[str]]]:
        """At node start, after the registry opened its volumes: queue the
        release of every completed resync's rollback point (a crash between
        "complete" and the release, whatever the volume's role now)."""
        futs = [self.schedule_release(lv, "node start") for lv in list(self.registry.volumes.values())]
        return [f for f in futs if f is not None]

    def abort(self, lv: LocalVolume, rollback: bool) -> tuple[str, int]:
        """Abandon the resync in progress (operator abort, primary lost)."""
        st = ResyncState.load(lv)
        d = core.decide_abort(st, lv.name, rollback, _snapshots(lv))
        if d.release:
            released = self.release_rollback_point(lv, "AbortResync found the resync complete")
            return d.message(released=released), 0
        if d.fence:
            lv.stream_token += 1  # fence any stream still applying
        n = lv.store.rollback_to(d.rollback_to) if d.rollback_to else 0
        if d.forget:
            lv.store.meta_set({META_RESYNC: None})
            try:
                lv.store.delete_snapshot(d.delete)
            except Exception:
                pass
        return d.message(rolled_back=n), n

    # ------------------------------------------------------------ stream
    async def serve(self, replica: Any, context: grpc.aio.ServicerContext) -> None:
        first = await first_message(context, "header", "ResyncHeader", HEADER_TIMEOUT_S)
        if first is None:
            return
        h = first.header
        try:
            # The identity first: a refused resync must not fence the live
            # replication stream nor adopt the header's epoch.
            known = self.registry.volumes.get(h.volume.name)
            if known is not None:
                self.check_identity(known, h)
            # A repair runs beside the live replication stream (the primary
            # quiesced it); every other resync fences older streams.
            lv, token = replica.accept_stream(
                pb.StreamOpen(volume=h.volume, epoch=h.epoch, first_seq=0), fence=h.kind != "repair",
                check_identity=False,
            )
            st, resume = await lv.run_io(self.begin, lv, h)
        except SyncrepError as e:
            log.warning("refused resync stream: %s", e.message)
            await context.abort(e.code, e.message)
            return
        except STORAGE_ERRORS as e:
            log.error("refused resync stream for %s: storage failed: %s", h.volume.name, e)
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED if storage_errno(e) == errno.ENOSPC else grpc.StatusCode.INTERNAL,
                f"secondary storage failed before resync: {storage_error_text(e)}")
            return
        log.info("volume %s: resync %s round %d (%s, snapshots %d->%d, %d bytes) resumes at chunk %d",
                 lv.name, h.resync_id, h.round, h.kind, h.base_snapshot_id, h.target_snapshot_id,
                 h.total_bytes, resume)
        await context.write(pb.ResyncReply(applied_below=resume))

        inbox, rt = read_ahead(context, READ_AHEAD_MESSAGES)
        try:
            await self._apply(lv, token, h, st, resume, inbox, context)
        finally:
            rt.cancel()

    async def _apply(
        self,
        lv: LocalVolume,
        token: int,
        h: pb.ResyncHeader,
        st: core.ResyncState,
        resume: int,
        inbox: asyncio.Queue[Any],
        context: grpc.aio.ServicerContext,
    ) -> None:
        hd = header(h)
        expected = resume
        # The round digest over (index, offset, length, crc32c) of each chunk
        # applied, in order, the same as the primary's (RoundDigest says why
        # that, with the crc32c check of every chunk below, is enough).
        digest = RoundDigest()
        bs, size = lv.store.block_size, lv.store.size_bytes
        pending: Any = None
        while True:
            msg = pending if pending is not None else await inbox.get()
            pending = None
            if msg is EOF_MARK:
                return
            if lv.stream_token != token:
                await context.abort(grpc.StatusCode.ABORTED,
                                    f"resync stream for {lv.name!r} superseded or aborted")
                return
            if msg.HasField("trailer"):
                t = msg.trailer
                verdict = core.check_trailer(hd, t.chunk_count, expected, t.digest == digest.digest())
                if verdict.refuse:
                    await context.abort(grpc.StatusCode.DATA_LOSS, verdict.refuse)
                    return
                if verdict.finish:
                    st = await lv.run_io(self.finish, lv, st, h.epoch, Identity.from_proto(h.identity))
                # Nothing may follow this reply: the primary cancels the call
                # as soon as it reads it. The rollback point is released by a
                # step of its own (module docstring), outside the primary's
                # switch-back write stall.
                await context.write(pb.ResyncReply(applied_below=expected, complete=True))
                return
            if not msg.HasField("chunk"):
                continue
            group: list[pb.ResyncChunk] = []
            # (index, offset, length, crc32c) of each chunk of the group, for
            # the digest once the group is applied.
            records: list[tuple[int, int, int, int]] = []
            nbytes = 0
            refused: pb.ResyncChunk | None = None
            m: Any = msg
            while True:
                c = m.chunk
                malformed = False
                if c.zero_length:
                    # Zeros sent without their payload (issue 14): checked
                    # against the crc32c of that many zeros. Data as well, or
                    # more than one write's worth, is a malformed chunk.
                    n = c.zero_length
                    malformed = bool(c.data) or n > MAX_WRITE_BYTES
                    crc = 0 if malformed else zeros_crc32c(n)
                else:
                    data = c.data  # upb copies on every read: once here
                    n = len(data)
                    crc = google_crc32c.value(data)
                # lv.store.size_bytes, not the size at the stream's start: an
                # online resize (issue 13) grows this secondary first. The
                # crc32c is checked here, before anything is applied: the
                # digest's records rely on it.
                v = ChunkVerdict.REFUSE if malformed else core.check_chunk(
                    c.index, c.offset, n, c.crc32c, crc, expected + len(group), bs,
                    max(size, lv.store.size_bytes))
                if v is ChunkVerdict.REFUSE:
                    refused = c
                    break
                if v is ChunkVerdict.APPLY:
                    group.append(c)
                    records.append((c.index, c.offset, n, c.crc32c))
                    nbytes += n
                if nbytes >= GROUP_MAX_BYTES or inbox.empty():
                    break
                m = inbox.get_nowait()
                if m is EOF_MARK or not m.HasField("chunk"):
                    pending = m
                    break
            if group:
                try:
                    st = await lv.run_io(self._write_group, lv, group, st, hd.key, expected + len(group))
                except STORAGE_ERRORS as e:
                    await context.abort(grpc.StatusCode.INTERNAL,
                                        f"secondary storage failed applying resync: {storage_error_text(e)}")
                    return
                for rec in records:
                    digest.add(*rec)
                expected += len(group)
                await context.write(pb.ResyncReply(applied_below=expected))
            if refused is not None:
                log.warning("volume %s: resync chunk %d at offset %d refused: crc32c mismatch or out of "
                            "range; asking for it again", lv.name, refused.index, refused.offset)
                await context.write(
                    pb.ResyncReply(
                        applied_below=expected, refused=True, refused_index=refused.index,
                        message=core.chunk_refusal(refused.index, refused.offset),
                    )
                )

    @staticmethod
    def _write_group(
        lv: LocalVolume, group: list[pb.ResyncChunk], st: core.ResyncState, key: str, applied_below: int
    ) -> core.ResyncState:
        lv.faults.check()
        # A chunk of all zeros (a range zeroed or trimmed on the primary, issue
        # 14) is punched rather than written, so this copy stays as thin as
        # the primary's (one memcmp per chunk to tell); adjacent ones are one
        # zero_range (one sync). The chunks of a round never overlap.
        writes: list[tuple[int, bytes]] = []
        holes: list[list[int]] = []  # [offset, length] runs
        for c in group:
            if c.zero_length:  # sent as zeros without a payload (checked above)
                n = c.zero_length
            else:
                data = c.data  # upb copies on every read: once
                n = len(data)
                if not data or data != zeros(n):
                    writes.append((c.offset, data))
                    continue
            if holes and holes[-1][0] + holes[-1][1] == c.offset:
                holes[-1][1] += n
            else:
                holes.append([c.offset, n])
        for off, n in holes:
            lv.store.zero_range(off, n)
        if writes:
            lv.store.write_batch(writes)
        new = st.applied(key, applied_below)
        if new is None:
            return st  # a repair: nothing to persist
        # After the data is durable: progress never claims more than is applied.
        _persist(lv, new)
        return new
