"""Low-level positional file I/O helpers (full reads/writes, hole punching)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def pread_full(fd: int, length: int, offset: int) -> bytes:
    """Read exactly ``length`` bytes at ``offset``; bytes past end-of-file read as zeros."""
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        chunk = os.pread(fd, length - got, offset + got)
        if not chunk:
            parts.append(bytes(length - got))
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def pwrite_full(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (retrying short writes)."""
    view = memoryview(data)
    total = len(view)
    done = os.pwrite(fd, view, offset)
    while done < total:
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:  # pragma: no cover - pwrite raises rather than returning 0 on regular files
            raise OSError(errno.EIO, f"short write at offset {offset + done}")
        done += n


class _HolePuncher:
    """``fallocate(PUNCH_HOLE | KEEP_SIZE)`` through ctypes; silently off where unsupported."""

    def __init__(self) -> None:
        self._fn = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            fn = libc.fallocate
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
            fn.restype = ctypes.c_int
            self._fn = fn
        except (OSError, AttributeError):  # pragma: no cover - non-glibc platforms
            self._fn = None

    def punch(self, fd: int, offset: int, length: int) -> bool:
        """Deallocate ``[offset, offset+length)``; returns False if unsupported (content then untouched)."""
        fn = self._fn
        if fn is None or length <= 0:
            return False
        rc = fn(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        if rc != 0:
            err = ctypes.get_errno()
            if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                self._fn = None  # don't keep trying on this filesystem/kernel
            return False
        return True


hole_puncher = _HolePuncher()
