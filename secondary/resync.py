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
    """What the secondary persists about the resync in progress."""

    resync_id: str = ""
    pre_snapshot_id: int = 0
    # "round:base:target" -> applied_below
    progress: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, lv: LocalVolume) -> ResyncState:
        raw = lv.store.meta_get(META_RESYNC)
        if not raw:
            return cls()
        d = json.loads(raw)
        return cls(d["resync_id"], int(d["pre_snapshot_id"]), {k: int(v) for k, v in d["progress"].items()})

    def dump(self) -> str:
        return json.dumps(
            {"resync_id": self.resync_id, "pre_snapshot_id": self.pre_snapshot_id, "progress": self.progress}
        )


def round_key(h: pb.ResyncHeader) -> str:
    return f"{h.round}:{h.kind}:{h.base_snapshot_id}:{h.target_snapshot_id}"


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
        if st.resync_id != h.resync_id:
            if h.rollback_to_snapshot:
                snap = lv.store.find_snapshot(h.rollback_to_snapshot)
                if snap is None:
                    raise FailedPrecondition(
                        f"resync of {lv.name!r} needs a rollback to common snapshot "
                        f"{h.rollback_to_snapshot!r}, which this node does not have"
                    )
                n = lv.store.rollback_to(snap.id)
                log.warning("volume %s: rolled back %d bytes to common snapshot %r before resync",
                            lv.name, n, snap.name)
            if st.pre_snapshot_id:
                # An earlier, abandoned resync: its pre-resync snapshot is
                # still our last consistent point. Keep it.
                pre_id = st.pre_snapshot_id
            else:
                name = pre_resync_snapshot_name(h.resync_id)
                for s in lv.store.list_snapshots():
                    if s.name.startswith(PRE_RESYNC_PREFIX) and s.name != name:
                        # Orphan of a completed resync (crash before its release).
                        lv.store.delete_snapshot(s.id)
                existing = lv.store.find_snapshot(name)
                pre_id = existing.id if existing else lv.store.create_snapshot(name).id
            st = ResyncState(h.resync_id, pre_id, {})
            lv.store.meta_set({META_RESYNC: st.dump()})
            log.info("volume %s: resync %s begins; pre-resync snapshot %d is the rollback point",
                     lv.name, h.resync_id, pre_id)
        return st, st.progress.get(round_key(h), 0)

    def finish(self, lv: LocalVolume, st: ResyncState) -> None:
        """The final round is complete: the resync is over (the rollback point
        is released right after, by ``release_pre_snapshot``; a crash in
        between leaves an orphan that the next resync removes)."""
        lv.store.meta_set({META_RESYNC: None})
        log.info("volume %s: resync %s complete", lv.name, st.resync_id)

    @staticmethod
    def release_pre_snapshot(lv: LocalVolume, snapshot_id: int) -> None:
        if not snapshot_id:
            return
        try:
            lv.store.delete_snapshot(snapshot_id)
            log.info("volume %s: pre-resync snapshot %d released", lv.name, snapshot_id)
        except Exception as e:  # already gone is fine
            log.info("volume %s: pre-resync snapshot %d: %s", lv.name, snapshot_id, e)

    def abort(self, lv: LocalVolume, rollback: bool) -> tuple[str, int]:
        """Abandon the resync in progress (operator abort, primary lost)."""
        st = ResyncState.load(lv)
        if not st.resync_id:
            return f"volume {lv.name!r} has no resync in progress", 0
        lv.stream_token += 1  # fence any stream still applying
        n = 0
        if rollback and st.pre_snapshot_id:
            n = lv.store.rollback_to(st.pre_snapshot_id)
        if rollback:
            try:
                lv.store.delete_snapshot(st.pre_snapshot_id)
            except Exception:
                pass
            lv.store.meta_set({META_RESYNC: None})
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
                done = h.final and h.kind != "repair"
                if done:
                    await lv.run_io(self.finish, lv, st)
                await context.write(pb.ResyncReply(applied_below=expected, complete=True))
                if done:
                    # After the reply: the primary holds its writes paused until
                    # it hears "complete", and deleting a snapshot costs time in
                    # proportion to what it tracked.
                    await lv.run_io(self.release_pre_snapshot, lv, st.pre_snapshot_id)
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
