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
import re
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from syncrep.blockstore import BlockStore
from syncrep.config import Durability
from syncrep.core.identity import Identity
from syncrep.core.vocab import META_NODE_EPOCH, META_NODE_PEER, META_NODE_RESYNC_MODE, META_NODE_ROLE
from syncrep.errors import FailedPrecondition, InvalidArgument, NotFound
from syncrep.pb import syncrep_pb2 as pb

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


class VolumeRegistry:
    """The volumes held by one node, under ``<data_dir>/volumes/<name>``."""

    def __init__(self, data_dir: Path, durability: Durability) -> None:
        self.root = Path(data_dir) / "volumes"
        self.root.mkdir(parents=True, exist_ok=True)
        self.durability: Durability = durability
        self.volumes: dict[str, LocalVolume] = {}

    def open_existing(self) -> list[LocalVolume]:
        for d in sorted(self.root.iterdir()):
            if not d.is_dir() or not BlockStore.exists(d):
                continue
            store = BlockStore.open(d, durability=self.durability)
            lv = LocalVolume(
                name=d.name,
                store=store,
                role=as_role(int(store.meta_get(META_ROLE) or pb.ROLE_UNSPECIFIED)),
                epoch=int(store.meta_get(META_EPOCH) or 0),
                peer=store.meta_get(META_PEER) or "",
                resync_mode=int(store.meta_get(META_RESYNC_MODE) or pb.RESYNC_MODE_DIRECT),
            )
            self.volumes[lv.name] = lv
            log.info(
                "opened volume %s (%d bytes, %d-byte blocks, role %s, epoch %d)",
                lv.name,
                store.size_bytes,
                store.block_size,
                role_name(lv.role),
                lv.epoch,
            )
        return list(self.volumes.values())

    def get(self, name: str) -> LocalVolume:
        lv = self.volumes.get(name)
        if lv is None:
            raise NotFound(f"volume {name!r} does not exist on this node")
        return lv

    def assign(self, a: pb.VolumeAssignment) -> tuple[LocalVolume, bool]:
        """Create or update a volume from the coordinator's assignment.

        Returns (volume, role_changed): True when the volume is new or its role
        or peer changed — the write path must (re)start. A newer epoch alone is
        only recorded: the primary adopts epochs itself (StartResync), and
        restarting its write path for one would race with the resync it starts.
        Idempotent. Refuses a stale epoch or a spec that does not match the
        volume already on disk.
        """
        name = a.spec.name
        if not NAME_RE.match(name):
            raise InvalidArgument(f"invalid volume name {name!r}")
        lv = self.volumes.get(name)
        if lv is None:
            path = self.root / name
            if BlockStore.exists(path):
                store = BlockStore.open(path, durability=self.durability)
            else:
                store = BlockStore.create(
                    path, a.spec.size_bytes, a.spec.block_size or 4096, durability=self.durability, name=name
                )
            lv = LocalVolume(name=name, store=store, role=a.role, epoch=a.epoch, peer=a.peer_address,
                             resync_mode=a.resync_mode or pb.RESYNC_MODE_DIRECT)
            self._check_spec(lv, a)
            lv.persist_role()
            self.volumes[name] = lv
            log.info("volume %s assigned: role %s, epoch %d, peer %s",
                     name, role_name(a.role), a.epoch, a.peer_address)
            return lv, True
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
                lv.persist_role()
            except BaseException:
                # Not persisted (disk full, ...): memory must not claim it was,
                # or the next heartbeat sees nothing to do and never retries.
                lv.role, lv.epoch, lv.peer, lv.resync_mode = old
                raise
        return lv, role_changed

    @staticmethod
    def _check_spec(lv: LocalVolume, a: pb.VolumeAssignment) -> None:
        bs = a.spec.block_size or 4096
        if lv.store.size_bytes != a.spec.size_bytes or lv.store.block_size != bs:
            raise FailedPrecondition(
                f"volume {lv.name!r} on this node is {lv.store.size_bytes} bytes with "
                f"{lv.store.block_size}-byte blocks, but the assignment says {a.spec.size_bytes} bytes "
                f"with {bs}-byte blocks"
            )

    def close(self) -> None:
        for lv in self.volumes.values():
            lv.close()
        self.volumes.clear()
