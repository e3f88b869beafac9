"""A node's volumes: the block store of each, its role, its epoch, its I/O thread.

Every mutation of a volume's store runs on that volume's single I/O thread, in
submission order. That is what makes ordering arguments simple: a snapshot
submitted after a batch of writes is taken after they land, and the secondary
applies overlapping writes in the primary's seq order.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from syncrep.blockstore import BlockStore, Extent, InvalidVolumeError, VolumeBusyError
from syncrep.config import Durability
from syncrep.core.identity import Identity
from syncrep.core.receiver import decode_extents
from syncrep.core.vocab import (
    META_NODE_DIVERGENT,
    META_NODE_EPOCH,
    META_NODE_PEER,
    META_NODE_RESYNC_MODE,
    META_NODE_ROLE,
)
from syncrep.errors import FailedPrecondition, InvalidArgument, NotFound
from syncrep.pb import syncrep_pb2 as pb
from syncrep.units import format_size

log = logging.getLogger(__name__)

T = TypeVar("T")

def role_name(role: int) -> str:
    return pb.Role.Name(cast("pb.Role.ValueType", role))


def as_role(value: int) -> pb.Role.ValueType:
    return cast("pb.Role.ValueType", value)


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# Keys of the node's own metadata, kept in the volume's SQLite database so it
# commits atomically with the store's metadata.
META_ROLE = META_NODE_ROLE
META_EPOCH = META_NODE_EPOCH
META_PEER = META_NODE_PEER
META_RESYNC_MODE = META_NODE_RESYNC_MODE


class FaultInjector:
    """Test hook: arm the next ``count`` store writes to fail with EIO or ENOSPC.

    Checked on the I/O thread right before the store is touched, so an armed
    fault behaves like a failing disk: nothing of the batch is written.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.kind = ""
        self.remaining = 0

    def arm(self, kind: str, count: int) -> None:
        if kind not in ("eio", "enospc", "clear"):
            raise InvalidArgument(f"unknown fault kind {kind!r}: expected eio, enospc or clear")
        with self._lock:
            self.kind = "" if kind == "clear" else kind
            self.remaining = 0 if kind == "clear" else max(1, count)

    def check_armed(self) -> None:
        """Fail like ``check`` while armed, without using up the count: a disk
        that is full refuses a resync before the first chunk, too."""
        with self._lock:
            kind = self.kind if self.remaining > 0 else ""
        if kind == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        if kind == "eio":
            raise OSError(errno.EIO, "Input/output error (injected)")

    def check(self) -> None:
        with self._lock:
            if not self.kind or self.remaining <= 0:
                return
            self.remaining -= 1
            kind = self.kind
            if self.remaining == 0:
                self.kind = ""
        if kind == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        raise OSError(errno.EIO, "Input/output error (injected)")



def _thread_executor(name: str) -> Executor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"io-{name}")


#: Makes each volume's FIFO I/O executor: one thread per volume. The
#: deterministic simulator (deploy/sim.py) replaces it with one that runs each
#: call inline, so the same code runs on virtual time without threads.
io_executor_factory: Callable[[str], Executor] = _thread_executor


def _random_generation() -> int:
    return secrets.randbits(63) + 1


#: Mints a new generation id (syncrep/core/identity.py): random, nonzero. The
#: simulator replaces it with a seeded one, so a run is reproducible.
new_generation: Callable[[], int] = _random_generation

@dataclass
class LocalVolume:
    name: str
    store: BlockStore
    role: pb.Role.ValueType
    epoch: int
    peer: str
    resync_mode: int = pb.RESYNC_MODE_DIRECT
    # The replica's data identity (syncrep/core/identity.py), as durable in
    # the store's metadata. Whoever changes it persists ``identity.to_meta()``
    # in the same transaction as the change it belongs to, then sets this.
    identity: Identity = field(default_factory=Identity)
    # A demoted primary's divergent extents (META_NODE_DIVERGENT), as durable:
    # reported to the coordinator until a resync overwrote them.
    divergent: list[Extent] = field(default_factory=list)
    faults: FaultInjector = field(default_factory=FaultInjector)
    # Fencing of replication/resync streams on the secondary: each accepted
    # stream bumps the token; a stream whose token is stale stops applying.
    stream_token: int = 0
    _io: Executor | None = None

    def __post_init__(self) -> None:
        self._io = io_executor_factory(self.name)

    @property
    def spec(self) -> pb.VolumeSpec:
        return pb.VolumeSpec(
            name=self.name, size_bytes=self.store.size_bytes, block_size=self.store.block_size
        )

    def submit_io(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue ``fn`` on this volume's I/O thread now (synchronously, so the
        FIFO position is fixed at the call) and return a future of its result."""
        assert self._io is not None
        return asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    async def run_io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on this volume's I/O thread (FIFO with every other mutation)."""
        return await self.submit_io(fn, *args)

    def role_meta(self) -> dict[str, str | None]:
        """The node's role record for this volume, as metadata keys."""
        return {
            META_ROLE: str(self.role),
            META_EPOCH: str(self.epoch),
            META_PEER: self.peer,
            META_RESYNC_MODE: str(self.resync_mode),
        }

    def persist_role(self) -> None:
        self.store.meta_set(self.role_meta())

    def close(self) -> None:
        if self._io is not None:
            self._io.shutdown(wait=True)
            self._io = None
        self.store.close()


#: Where a rebuild moves an unrelated store or foreign folder (never deleted),
#: under the registry's root. Skipped when the volumes are listed.
SET_ASIDE_DIR = ".set-aside"
#: Where a deleted volume's folder is renamed to just before it is removed (issue 13).
DELETING_DIR = ".deleting"
#: A volume that has no data here is logged at ERROR at most this often.
MISSING_LOG_INTERVAL_S = 30.0


@dataclass
class MissingVolume:
    """A volume assigned to this node that it cannot serve: no store (no
    folder, an empty or foreign folder) or a store of another volume UUID.
    Reported (``VolumeReport.data_missing``), never served, never a resync
    source; the coordinator rebuilds it (docs/FAILOVER.md section 1)."""

    assignment: pb.VolumeAssignment
    problem: str
    #: time.monotonic() of the last ERROR log about it (rate limit).
    logged_at_s: float = field(default=-MISSING_LOG_INTERVAL_S)


class DataMissing(FailedPrecondition):
    """The assignment names a volume this node has no data for. Nothing
    serves it; ``missing`` holds what the node reports."""

    def __init__(self, missing: MissingVolume) -> None:
        a = missing.assignment
        super().__init__(
            f"volume {a.spec.name!r} is assigned to this node as {role_name(a.role)} at epoch {a.epoch} "
            f"but this node has no data for it: {missing.problem}"
        )
        self.missing = missing


def _folder_state(path: Path) -> str:
    """'store', 'absent' (no folder or an empty one) or 'foreign' (files that are no store)."""
    if BlockStore.exists(path):
        return "store"
    if not path.exists():
        return "absent"
    if path.is_dir() and not any(path.iterdir()):
        return "absent"
    return "foreign"


class VolumeRegistry:
    """The volumes held by one node, under ``<data_dir>/volumes/<name>``."""

    def __init__(self, data_dir: Path, durability: Durability) -> None:
        self.root = Path(data_dir) / "volumes"
        self.root.mkdir(parents=True, exist_ok=True)
        self.durability: Durability = durability
        self.volumes: dict[str, LocalVolume] = {}
        # Assigned here but without data of the pair (see MissingVolume).
        self.missing: dict[str, MissingVolume] = {}
        # Stores on disk that no pair of the coordinator claims (issue 13:
        # deleted while this node was down): name -> path. Kept, never served.
        self.unclaimed: dict[str, Path] = {}

    def open_existing(self) -> list[LocalVolume]:
        for d in sorted(self.root.iterdir()):
            # Dot folders (.set-aside, .deleting) hold no volume: a name starts alphanumeric.
            if d.name.startswith(".") or not d.is_dir() or not BlockStore.exists(d):
                continue
            try:
                lv = self._open(d)
            except VolumeBusyError:
                raise  # another process holds this data dir: a configuration error, say so at start
            except InvalidVolumeError as e:
                # Reported as missing data when the coordinator assigns it.
                log.error("volume %s: the store at %s cannot be opened (%s); it will not be served", d.name, d, e)
                continue
            log.info(
                "opened volume %s (%d bytes, %d-byte blocks, role %s, epoch %d, volume UUID %s, generation %s)",
                lv.name,
                lv.store.size_bytes,
                lv.store.block_size,
                role_name(lv.role),
                lv.epoch,
                lv.identity.volume_uuid or "(none)",
                lv.identity.short(),
            )
        return list(self.volumes.values())

    def _open(self, d: Path) -> LocalVolume:
        store = BlockStore.open(d, durability=self.durability)
        lv = LocalVolume(
            name=d.name,
            store=store,
            role=as_role(int(store.meta_get(META_ROLE) or pb.ROLE_UNSPECIFIED)),
            epoch=int(store.meta_get(META_EPOCH) or 0),
            peer=store.meta_get(META_PEER) or "",
            resync_mode=int(store.meta_get(META_RESYNC_MODE) or pb.RESYNC_MODE_DIRECT),
            identity=Identity.from_meta(store.meta_get),
            divergent=decode_extents(store.meta_get(META_NODE_DIVERGENT)),
        )
        self.volumes[lv.name] = lv
        return lv

    def get(self, name: str) -> LocalVolume:
        lv = self.volumes.get(name)
        if lv is None:
            m = self.missing.get(name)
            if m is not None:
                raise FailedPrecondition(
                    f"volume {name!r} is assigned to this node but not served here: {m.problem}"
                )
            raise NotFound(f"volume {name!r} does not exist on this node")
        return lv

    def assign(
        self, a: pb.VolumeAssignment, extra_meta: Mapping[str, str | None] | None = None
    ) -> tuple[LocalVolume, bool]:
        """Create or update a volume from the coordinator's assignment.

        Returns (volume, role_changed): True when the volume is new or its role
        or peer changed — the write path must (re)start. A newer epoch alone is
        only recorded: the primary adopts epochs itself (StartResync), and
        restarting its write path for one would race with the resync it starts.
        Idempotent. Refuses a stale epoch or a spec that does not match the
        volume already on disk.

        A store is created only when the assignment says ``create``
        (docs/FAILOVER.md section 1). Without it, no store here or a store of
        another volume UUID raises ``DataMissing`` (recorded in ``missing``):
        nothing may serve the volume. Runs off the event loop (it may open,
        create or close stores).

        ``extra_meta`` is persisted in the same transaction as a change of
        role, epoch or peer (a promotion's or demotion's record); nothing is
        persisted when the assignment changes nothing.
        """
        name = a.spec.name
        if not NAME_RE.match(name):
            raise InvalidArgument(f"invalid volume name {name!r}")
        uuid = a.identity.volume_uuid
        if not uuid:
            raise InvalidArgument(
                f"assignment of volume {name!r} carries no volume UUID (VolumeAssignment.identity); this "
                "node serves only data it can prove belongs to the pair: upgrade the coordinator"
            )
        path = self.root / name
        lv = self.volumes.get(name)
        unreadable = ""
        if lv is None and _folder_state(path) == "store":
            try:
                lv = self._open(path)
            except VolumeBusyError as e:
                raise FailedPrecondition(
                    f"volume {name!r}: the store at {path} is in use by another process ({e}); is a second "
                    "node running on this data dir?"
                ) from e
            except InvalidVolumeError as e:
                unreadable = f"the store at {path} cannot be opened: {e}"
        created = False
        if a.create and a.identity.current == 0:
            lv, created = self._rebuild(a, lv, path)
        elif a.create:
            lv, created = self._create_new(a, lv, path)
        elif lv is None:
            state = _folder_state(path)
            what = "there is no folder" if not path.exists() else (
                "the folder is empty" if state == "absent" else "the folder holds files that are no volume store")
            raise self._missing(a, unreadable or f"{path}: {what}")
        elif lv.identity.volume_uuid != uuid:
            problem = (f"the store at {path} belongs to volume UUID {lv.identity.volume_uuid or '(none)'}, "
                       f"the pair is {uuid}")
            self._close(lv)
            raise self._missing(a, problem)
        if self.missing.pop(name, None) is not None:
            log.warning("volume %s: data present again (volume UUID %s, generation %s); served as assigned",
                        name, lv.identity.volume_uuid, lv.identity.short())
        if created:
            return lv, True
        return self._update(lv, a, extra_meta or {})

    def forget_missing(self, assigned: set[str]) -> None:
        """Drop the missing volumes that are not among ``assigned`` (moved to
        another node or deleted: nothing to report any more)."""
        for name in [n for n in self.missing if n not in assigned]:
            del self.missing[name]
            log.info("volume %s is no longer assigned to this node: no longer reported missing", name)

    def _missing(self, a: pb.VolumeAssignment, problem: str) -> DataMissing:
        name = a.spec.name
        m = self.missing.get(name)
        if m is None:
            m = self.missing[name] = MissingVolume(assignment=a, problem=problem)
        else:
            m.assignment, m.problem = a, problem
        now = time.monotonic()
        if now - m.logged_at_s >= MISSING_LOG_INTERVAL_S:
            m.logged_at_s = now
            log.error(
                "volume %s is assigned to this node as %s at epoch %d but this node has no data for it (%s): "
                "it will not be served; the coordinator rebuilds it (a new empty store and a full copy) or "
                "promotes its peer. If the data was moved, put it back at %s.",
                name, role_name(a.role), a.epoch, problem, self.root / name,
            )
        return DataMissing(m)

    def _close(self, lv: LocalVolume) -> None:
        self.volumes.pop(lv.name, None)
        lv.close()

    def _set_aside(self, path: Path, why: str) -> None:
        """Move ``path`` out of the way, never deleting it."""
        aside = self.root / SET_ASIDE_DIR
        aside.mkdir(exist_ok=True)
        base = f"{path.name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        dest, n = aside / base, 1
        while dest.exists():  # two rebuilds within a second
            n += 1
            dest = aside / f"{base}.{n}"
        os.rename(path, dest)
        log.warning("volume %s: %s; moved %s aside to %s (not deleted)", path.name, why, path, dest)

    def _new_store(self, a: pb.VolumeAssignment, path: Path, identity: Identity) -> LocalVolume:
        name = a.spec.name
        store = BlockStore.create(
            path, a.spec.size_bytes, a.spec.block_size or 4096, durability=self.durability, name=name
        )
        lv = LocalVolume(name=name, store=store, role=a.role, epoch=a.epoch, peer=a.peer_address,
                         resync_mode=a.resync_mode or pb.RESYNC_MODE_DIRECT, identity=identity)
        try:
            self._check_spec(lv, a)
            # One transaction: a store without its identity is never left behind
            # claiming to be this volume's.
            store.meta_set({**lv.role_meta(), **identity.to_meta()})
        except BaseException:
            lv.close()
            raise
        self.volumes[name] = lv
        return lv

    def _create_new(
        self, a: pb.VolumeAssignment, lv: LocalVolume | None, path: Path
    ) -> tuple[LocalVolume, bool]:
        """CreateVolume: a new store with the initial generation; idempotent."""
        uuid = a.identity.volume_uuid
        if lv is not None:
            if lv.identity.volume_uuid != uuid:
                raise FailedPrecondition(
                    f"cannot create volume {a.spec.name!r}: {path} already holds a store of volume UUID "
                    f"{lv.identity.volume_uuid or '(none)'} (the new volume is {uuid}); remove or move it, "
                    "or create the volume under another name"
                )
            return lv, False
        if _folder_state(path) != "absent":
            raise FailedPrecondition(
                f"cannot create volume {a.spec.name!r}: {path} exists and holds files that are no usable "
                "volume store; remove or move them, or create the volume under another name"
            )
        lv = self._new_store(a, path, Identity(uuid, a.identity.current))
        log.info("volume %s created: %d bytes, %d-byte blocks, role %s, epoch %d, volume UUID %s, generation %s",
                 a.spec.name, lv.store.size_bytes, lv.store.block_size, role_name(a.role), a.epoch, uuid,
                 lv.identity.short())
        return lv, True

    def _rebuild(self, a: pb.VolumeAssignment, lv: LocalVolume | None, path: Path) -> tuple[LocalVolume, bool]:
        """A rebuild (create with no generation): keep a store of the pair that
        holds data (it came back), else set anything in the way aside and
        create an empty store that receives a full copy."""
        uuid = a.identity.volume_uuid
        if lv is not None and lv.identity.volume_uuid == uuid:
            if lv.identity.has_data:
                log.warning("volume %s: asked to rebuild, but this node's store of the pair is back with data "
                            "(generation %s); it is kept, the coordinator sees its identity",
                            a.spec.name, lv.identity.short())
            return lv, False  # an empty store of the pair: already rebuilt
        if lv is not None:
            why = (f"rebuilding: the store belongs to volume UUID {lv.identity.volume_uuid or '(none)'}, "
                   f"the pair is {uuid}")
            self._close(lv)
            self._set_aside(path, why)
        elif _folder_state(path) != "absent":
            # Never created over: BlockStore.create would truncate what is there.
            self._set_aside(path, "rebuilding: the folder holds files that are no usable volume store")
        lv = self._new_store(a, path, Identity(uuid, 0))
        log.warning("rebuilding volume %s: empty store created (volume UUID %s), it receives a full copy",
                    a.spec.name, uuid)
        return lv, True

    def _update(
        self, lv: LocalVolume, a: pb.VolumeAssignment, extra_meta: Mapping[str, str | None]
    ) -> tuple[LocalVolume, bool]:
        name = lv.name
        self._check_spec(lv, a)
        if a.epoch < lv.epoch:
            raise FailedPrecondition(
                f"stale assignment for volume {name!r}: epoch {a.epoch} is older than this node's epoch {lv.epoch}"
            )
        changed = (a.role, a.epoch, a.peer_address) != (lv.role, lv.epoch, lv.peer)
        role_changed = (a.role, a.peer_address) != (lv.role, lv.peer)
        if changed:
            log.info(
                "volume %s reassigned: role %s -> %s, epoch %d -> %d, peer %s",
                name, role_name(lv.role), role_name(a.role), lv.epoch, a.epoch, a.peer_address,
            )
            old = (lv.role, lv.epoch, lv.peer, lv.resync_mode)
            lv.role, lv.epoch, lv.peer = a.role, a.epoch, a.peer_address
            lv.resync_mode = a.resync_mode or lv.resync_mode
            try:
                lv.store.meta_set({**lv.role_meta(), **extra_meta})
            except BaseException:
                # Not persisted (disk full, ...): memory must not claim it was,
                # or the next heartbeat sees nothing to do and never retries.
                lv.role, lv.epoch, lv.peer, lv.resync_mode = old
                raise
        return lv, role_changed

    @staticmethod
    def _check_spec(lv: LocalVolume, a: pb.VolumeAssignment) -> None:
        bs = a.spec.block_size or 4096
        # A store larger than the assignment says grew in a resize whose
        # record the coordinator has not updated yet (issue 13: both nodes
        # grow first, then the pair's size is saved): it is the same volume.
        if lv.store.size_bytes < a.spec.size_bytes or lv.store.block_size != bs:
            raise FailedPrecondition(
                f"volume {lv.name!r} on this node is {lv.store.size_bytes} bytes with "
                f"{lv.store.block_size}-byte blocks, but the assignment says {a.spec.size_bytes} bytes "
                f"with {bs}-byte blocks"
            )

    # ------------------------------------------------------------ lifecycle (issue 13)

    def delete(self, name: str) -> Path | None:
        """Close volume ``name`` and remove its store directory (the caller
        stopped serving it). The folder is first renamed into ``.deleting/``
        (one atomic step: a crash midway never leaves a half-removed store
        under the volume's name), then removed. Returns the removed path (None:
        no store here). Runs off the event loop."""
        self.missing.pop(name, None)
        self.unclaimed.pop(name, None)
        lv = self.volumes.pop(name, None)
        if lv is not None:
            lv.close()
        path = self.root / name
        if not path.exists():
            return None
        trash = self.root / DELETING_DIR
        trash.mkdir(exist_ok=True)
        dest = trash / f"{name}-{time.time_ns()}"
        os.rename(path, dest)
        shutil.rmtree(dest)
        return path

    def set_unclaimed(self, claimed: set[str]) -> list[str]:
        """At registration: the stores on disk that no pair of the coordinator
        claims (deleted while this node was down, or never this coordinator's)
        are closed, KEPT on disk and never served (not reported, not exported,
        no stream accepted); each is logged at WARNING once per process. They
        are not moved: a coordinator that restarted from an older state may
        claim them again (an assignment opens them as before), and a moved
        store would then look missing and be rebuilt by a full copy. Returns
        the newly unclaimed names."""
        new: list[str] = []
        for name in [n for n in self.volumes if n not in claimed]:
            lv = self.volumes.pop(name)
            lv.close()
            self.unclaimed[name] = self.root / name
            new.append(name)
            log.warning(
                "volume %s: no volume pair on the coordinator claims the store at %s (deleted while this node "
                "was down?); it is kept and not served. Remove it by hand once you are sure (rm -r %s), or "
                "create the volume again under another name",
                name, self.root / name, self.root / name,
            )
        for name in [n for n in self.unclaimed if n in claimed]:
            del self.unclaimed[name]
            log.info("volume %s is claimed by a pair again; served as assigned", name)
        return new

    def close(self) -> None:
        for lv in self.volumes.values():
            lv.close()
        self.volumes.clear()


def free_space(path: Path) -> int:
    """Bytes free for an unprivileged writer in the file system of ``path`` (statvfs)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def thin_warning(name: str, size_bytes: int, path: Path, node: str) -> tuple[int, str]:
    """(free bytes, a warning or ""): a thin volume larger than the free space
    of its node's data directory is allowed (issue 13), but its writes fail
    with ENOSPC once the disk fills, so the operator hears how much is free."""
    free = free_space(path)
    if size_bytes <= free:
        return free, ""
    return free, (
        f"volume {name!r} is {size_bytes} bytes ({format_size(size_bytes)}), more than the {free} bytes "
        f"({format_size(free)}) free in {path} on {node}: allowed (volumes are thin), but writes fail with "
        "ENOSPC once that disk fills"
    )

