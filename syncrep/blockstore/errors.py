"""Exceptions raised by the block store.

Every error is a :class:`BlockStoreError`. Errors about bad arguments are also
``ValueError`` (or ``LookupError`` for unknown snapshots) so generic callers can
catch them the usual way. Each message names the bad value and the limit it broke.
Argument errors are raised before anything is changed, in memory or on disk.
"""

from __future__ import annotations


class BlockStoreError(Exception):
    """Base class of every error raised by :mod:`syncrep.blockstore`."""


class InvalidArgumentError(BlockStoreError, ValueError):
    """An argument has the wrong type or a value outside what the call accepts."""


class OutOfRangeError(InvalidArgumentError):
    """An offset or length falls (partly) outside the volume."""


class MisalignedError(InvalidArgumentError):
    """An offset, length or buffer is not a whole number of blocks."""


class EmptyWriteError(InvalidArgumentError):
    """A write carried no data."""


class InvalidDiffError(InvalidArgumentError):
    """A diff whose base snapshot is newer than its target."""


class UnknownSnapshotError(BlockStoreError, LookupError):
    """No live snapshot has the given id."""

    def __str__(self) -> str:  # LookupError would otherwise repr() a single arg
        return str(self.args[0]) if self.args else ""


class SnapshotExistsError(BlockStoreError):
    """A live snapshot already has the requested name."""


class InvalidVolumeError(BlockStoreError):
    """The volume cannot be created or opened (bad geometry, missing, already exists, corrupt)."""


class VolumeBusyError(InvalidVolumeError):
    """The volume is already open (in this or another process)."""


class StoreClosedError(BlockStoreError):
    """The store was used after :meth:`BlockStore.close`."""
