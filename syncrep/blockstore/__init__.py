"""Block store: sparse-file volumes with O(1) snapshots, O(changed) diffs and rollback.

See :mod:`syncrep.blockstore.store` for the on-disk layout and the durability contract.
"""

from .errors import (
    BlockStoreError,
    EmptyWriteError,
    InvalidArgumentError,
    InvalidDiffError,
    InvalidVolumeError,
    MisalignedError,
    OutOfRangeError,
    SnapshotExistsError,
    StoreClosedError,
    UnknownSnapshotError,
    VolumeBusyError,
)
from .extents import Extent, blocks_to_extents, extents_to_blocks, iter_block_runs, merge_extents
from .store import BlockStore, Durability, SnapshotInfo, zeros, zeros_crc32c

__all__ = [
    "BlockStore",
    "BlockStoreError",
    "Durability",
    "EmptyWriteError",
    "Extent",
    "InvalidArgumentError",
    "InvalidDiffError",
    "InvalidVolumeError",
    "MisalignedError",
    "OutOfRangeError",
    "SnapshotExistsError",
    "SnapshotInfo",
    "StoreClosedError",
    "UnknownSnapshotError",
    "VolumeBusyError",
    "blocks_to_extents",
    "extents_to_blocks",
    "iter_block_runs",
    "merge_extents",
    "zeros",
    "zeros_crc32c",
]
