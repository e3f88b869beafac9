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
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import google_crc32c
import grpc

from secondary.replica import EOF_MARK, first_message, read_ahead
from syncrep.core.classify import STORAGE_ERRORS, storage_errno, storage_error_text
from syncrep.core.vocab import META_SECONDARY_RESYNC, PRE_RESYNC_PREFIX, pre_resync_snapshot_name
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


@dataclass
class ResyncState:
    """What the secondary persists about its current (or last) resync."""

    resync_id: str = ""
    # The rollback point (a ``pre-resync-*`` snapshot); 0 once released.
    pre_snapshot_id: int = 0
    # "round:base:target" -> applied_below
    progress: dict[str, int] = field(default_factory=dict)
    # The final round is applied and checked, persisted before the primary
    # hears "complete": the data is the primary's final target, a consistent
    # state, and the rollback point only awaits release.
    complete: bool = False
    # Epoch of the final round: a replication stream at this epoch or later
    # proves the primary switched back.
    epoch: int = 0

    @property
    def in_progress(self) -> bool:
        """A resync whose rollback point is still the DR copy's last consistent state."""
        return bool(self.resync_id) and not self.complete

    @classmethod
    def load(cls, lv: LocalVolume) -> ResyncState:
        raw = lv.store.meta_get(META_RESYNC)
        if not raw:
            return cls()
        d = json.loads(raw)
        return cls(
            d["resync_id"], int(d["pre_snapshot_id"]), {k: int(v) for k, v in d["progress"].items()},
            # Absent in states written before completion was persisted: those
            # were in progress (a completed resync used to clear its state).
            bool(d.get("complete", False)), int(d.get("epoch", 0)),
        )

    def dump(self) -> str:
        return json.dumps(
            {"resync_id": self.resync_id, "pre_snapshot_id": self.pre_snapshot_id, "progress": self.progress,
             "complete": self.complete, "epoch": self.epoch}
        )


def round_key(h: pb.ResyncHeader) -> str:
    return f"{h.round}:{h.kind}:{h.base_snapshot_id}:{h.target_snapshot_id}"


def _live_snapshot(lv: LocalVolume, snapshot_id: int) -> bool:
    return bool(snapshot_id) and any(s.id == snapshot_id for s in lv.store.list_snapshots())


def _log_release_failure(lv: LocalVolume, why: str, fut: asyncio.Future[list[str]]) -> None:
    if fut.cancelled():
        return
    e = fut.exception()
    if e is not None:
        # Still pending in the persisted state: the next trigger retries it.
        log.error("volume %s: releasing the rollback point (%s) failed: %s: %s; retried at the next "
                  "replication stream, resync or start", lv.name, why, type(e).__name__, e)


class ResyncReceiver:
    def __init__(self, registry: VolumeRegistry) -> None:
        self.registry = registry

    # ------------------------------------------------------------ control
    def begin(self, lv: LocalVolume, h: pb.ResyncHeader) -> tuple[ResyncState, int]:
        """Runs on the I/O thread. Returns (state, resume index)."""
        lv.faults.check_armed()
        if h.kind == "repair":
            # verify --repair while in sync: nothing to roll back to, nothing to resume.
            return ResyncState(), 0
        st = ResyncState.load(lv)
        if st.resync_id == h.resync_id and st.complete:
            self._reopen(lv, st)
        elif st.resync_id != h.resync_id:
            st = self._start(lv, h, st)
        return st, st.progress.get(round_key(h), 0)

    def _reopen(self, lv: LocalVolume, st: ResyncState) -> None:
        """The primary resumes a resync whose final round this node completed:
        it did not switch back (it crashed, or could not open the replication
        stream). Our data is that round's target, consistent. The rollback
        point is kept if not released yet, else the current state becomes it;
        a rollback to a common snapshot is not replayed (it would undo the
        rounds applied), and the persisted progress stays valid."""
        kept = _live_snapshot(lv, st.pre_snapshot_id)
        if not kept:
            st.pre_snapshot_id = self._pre_snapshot(lv, st.resync_id)
        st.complete = False
        lv.store.meta_set({META_RESYNC: st.dump()})
        log.warning("volume %s: resync %s resumed after its final round completed here (the primary did not "
                    "switch back); rollback point: %s snapshot %d", lv.name, st.resync_id,
                    "kept" if kept else "new", st.pre_snapshot_id)

    def _start(self, lv: LocalVolume, h: pb.ResyncHeader, st: ResyncState) -> ResyncState:
        if st.complete:
            # The previous resync completed; its rollback point awaits release.
            self.release_rollback_point(lv, f"resync {h.resync_id} begins")
            st = ResyncState()
        rolled_back = False
        if h.rollback_to_snapshot:
            snap = lv.store.find_snapshot(h.rollback_to_snapshot)
            if snap is None:
                raise FailedPrecondition(
                    f"resync of {lv.name!r} needs a rollback to common snapshot "
                    f"{h.rollback_to_snapshot!r}, which this node does not have"
                )
            n = lv.store.rollback_to(snap.id)
            rolled_back = True
            log.warning("volume %s: rolled back %d bytes to common snapshot %r before resync",
                        lv.name, n, snap.name)
        name = pre_resync_snapshot_name(h.resync_id)
        if st.in_progress and _live_snapshot(lv, st.pre_snapshot_id):
            # An earlier, abandoned resync: its pre-resync snapshot is
            # still our last consistent point. Keep it.
            pre_id = st.pre_snapshot_id
        elif st.in_progress and not rolled_back:
            # Abandoned mid-resync and its rollback point is gone: our data is
            # not known to be consistent, so no snapshot of it may pose as one.
            log.error("volume %s: resync %s begins over abandoned resync %s whose rollback point %d is "
                      "gone: no rollback point until it completes", lv.name, h.resync_id, st.resync_id,
                      st.pre_snapshot_id)
            pre_id = 0
        else:
            # No resync in progress (or just rolled back to a common snapshot):
            # our data is consistent.
            for s in lv.store.list_snapshots():
                if s.name.startswith(PRE_RESYNC_PREFIX) and s.name != name:
                    lv.store.delete_snapshot(s.id)
                    log.info("volume %s: stale rollback point %r (id %d) released: no resync in progress "
                             "(resync %s begins)", lv.name, s.name, s.id, h.resync_id)
            pre_id = self._pre_snapshot(lv, h.resync_id)
        st = ResyncState(h.resync_id, pre_id, {})
        lv.store.meta_set({META_RESYNC: st.dump()})
        log.info("volume %s: resync %s begins; pre-resync snapshot %d is the rollback point",
                 lv.name, h.resync_id, pre_id)
        return st

    @staticmethod
    def _pre_snapshot(lv: LocalVolume, resync_id: str) -> int:
        """The rollback point of ``resync_id``: taken now, or found (taken by a
        begin that crashed before persisting the state that names it)."""
        name = pre_resync_snapshot_name(resync_id)
        existing = lv.store.find_snapshot(name)
        return existing.id if existing else lv.store.create_snapshot(name).id

    def finish(self, lv: LocalVolume, st: ResyncState, epoch: int) -> None:
        """The final round is complete (runs on the I/O thread, before the
        "complete" reply). Persisted: from here on a release of the rollback
        point is owed, and one of the triggers (module docstring) runs it."""
        st.complete = True
        st.epoch = epoch
        lv.store.meta_set({META_RESYNC: st.dump()})
        log.info("volume %s: resync %s complete at epoch %d; rollback point %d awaits release (when the "
                 "primary opens the replication stream)", lv.name, st.resync_id, epoch, st.pre_snapshot_id)

    @staticmethod
    def release_rollback_point(lv: LocalVolume, why: str, epoch: int = 0) -> list[str]:
        """Release the rollback point of a *completed* resync (runs on the I/O
        thread). Idempotent: it re-reads the persisted state, deletes every
        ``pre-resync-*`` snapshot, then records that nothing awaits release.
        Does nothing while a resync is in progress (its rollback point is the
        DR copy's last consistent state) or, given ``epoch`` (a replication
        stream's), when that is older than the completed resync's. Without a
        resync record, leftovers (an abort that crashed before deleting its
        snapshot, an older version's completed resync) are released too: no
        resync in progress means our data is consistent. Returns the names."""
        st = ResyncState.load(lv)
        if st.in_progress:
            return []
        if st.complete and epoch and epoch < st.epoch:
            return []
        released = []
        for s in lv.store.list_snapshots():
            if not s.name.startswith(PRE_RESYNC_PREFIX):
                continue
            lv.store.delete_snapshot(s.id)
            released.append(s.name)
            if st.complete:
                log.info("volume %s: rollback point %r (id %d) released: resync %s completed at epoch %d; %s",
                         lv.name, s.name, s.id, st.resync_id, st.epoch, why)
            else:
                log.info("volume %s: stale rollback point %r (id %d) released: no resync in progress; %s",
                         lv.name, s.name, s.id, why)
        if st.pre_snapshot_id:
            # After the deletions: a crash in between leaves the release
            # pending, and the next one finds nothing left to delete. The
            # record itself stays, so a resumed resync_id is recognised.
            st.pre_snapshot_id = 0
            lv.store.meta_set({META_RESYNC: st.dump()})
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
        if not st.resync_id:
            return f"volume {lv.name!r} has no resync in progress", 0
        if st.complete:
            # Never rolled back: the data is the resync's consistent result.
            released = self.release_rollback_point(lv, "AbortResync found the resync complete")
            extra = f"; released {', '.join(released)}" if released else ""
            return f"volume {lv.name!r} has no resync in progress (resync {st.resync_id} is complete{extra})", 0
        lv.stream_token += 1  # fence any stream still applying
        n = 0
        if rollback and _live_snapshot(lv, st.pre_snapshot_id):
            n = lv.store.rollback_to(st.pre_snapshot_id)
        if rollback:
            # The data is the rollback point now: forget the resync first, then
            # delete the snapshot (a crash in between leaves a leftover that
            # the next release removes, never a resync naming a lost snapshot).
            lv.store.meta_set({META_RESYNC: None})
            try:
                lv.store.delete_snapshot(st.pre_snapshot_id)
            except Exception:
                pass
            return f"resync {st.resync_id} abandoned; rolled back {n} bytes to the pre-resync snapshot", n
        return f"resync {st.resync_id} left resumable; pre-resync snapshot {st.pre_snapshot_id} kept", 0

    # ------------------------------------------------------------ stream
    async def serve(self, replica: Any, context: grpc.aio.ServicerContext) -> None:
        first = await first_message(context, "header", "ResyncHeader", HEADER_TIMEOUT_S)
        if first is None:
            return
        h = first.header
        try:
            # A repair runs beside the live replication stream (the primary
            # quiesced it); every other resync fences older streams.
            lv, token = replica.accept_stream(
                pb.StreamOpen(volume=h.volume, epoch=h.epoch, first_seq=0), fence=h.kind != "repair"
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
        st: ResyncState,
        resume: int,
        inbox: asyncio.Queue[Any],
        context: grpc.aio.ServicerContext,
    ) -> None:
        expected = resume
        digest = hashlib.sha256()
        key = round_key(h)
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
                if t.chunk_count != expected or t.digest != digest.digest():
                    await context.abort(
                        grpc.StatusCode.DATA_LOSS,
                        f"resync round {h.round} trailer mismatch: {t.chunk_count} chunks announced, "
                        f"{expected} applied, digest {'ok' if t.digest == digest.digest() else 'differs'}",
                    )
                    return
                if h.final and h.kind != "repair":
                    await lv.run_io(self.finish, lv, st, h.epoch)
                # Nothing may follow this reply: the primary cancels the call
                # as soon as it reads it. The rollback point is released by a
                # step of its own (module docstring), outside the primary's
                # switch-back write stall.
                await context.write(pb.ResyncReply(applied_below=expected, complete=True))
                return
            if not msg.HasField("chunk"):
                continue
            group: list[pb.ResyncChunk] = []
            nbytes = 0
            refused: pb.ResyncChunk | None = None
            m: Any = msg
            while True:
                c = m.chunk
                if c.index != expected + len(group):
                    # Chunks after a refused one, sent before the primary saw
                    # the refusal: dropped, the primary re-sends from there.
                    pass
                elif google_crc32c.value(c.data) != c.crc32c or not self._in_range(lv, c):
                    refused = c
                    break
                else:
                    group.append(c)
                    nbytes += len(c.data)
                if nbytes >= GROUP_MAX_BYTES or inbox.empty():
                    break
                m = inbox.get_nowait()
                if m is EOF_MARK or not m.HasField("chunk"):
                    pending = m
                    break
            if group:
                try:
                    await lv.run_io(self._write_group, lv, group, st, key, expected + len(group))
                except STORAGE_ERRORS as e:
                    await context.abort(grpc.StatusCode.INTERNAL,
                                        f"secondary storage failed applying resync: {storage_error_text(e)}")
                    return
                for c in group:
                    digest.update(c.index.to_bytes(8, "little") + c.offset.to_bytes(8, "little"))
                    digest.update(c.data)
                expected += len(group)
                await context.write(pb.ResyncReply(applied_below=expected))
            if refused is not None:
                log.warning("volume %s: resync chunk %d at offset %d refused: crc32c mismatch or out of "
                            "range; asking for it again", lv.name, refused.index, refused.offset)
                await context.write(
                    pb.ResyncReply(
                        applied_below=expected, refused=True, refused_index=refused.index,
                        message=f"chunk {refused.index} at offset {refused.offset}: crc32c mismatch",
                    )
                )

    @staticmethod
    def _in_range(lv: LocalVolume, c: pb.ResyncChunk) -> bool:
        bs = lv.store.block_size
        n = len(c.data)
        return n > 0 and c.offset % bs == 0 and n % bs == 0 and c.offset + n <= lv.store.size_bytes

    @staticmethod
    def _write_group(
        lv: LocalVolume, group: list[pb.ResyncChunk], st: ResyncState, key: str, applied_below: int
    ) -> None:
        lv.faults.check()
        lv.store.write_batch([(c.offset, c.data) for c in group])
        if not st.resync_id:
            return  # a repair: nothing to persist
        # After the data is durable: progress never claims more than is applied.
        st.progress[key] = applied_below
        lv.store.meta_set({META_RESYNC: st.dump()})
