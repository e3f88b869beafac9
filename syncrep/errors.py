"""Errors that carry the gRPC status a person should see.

Servicers translate these into ``context.abort(code, message)`` (or into a
per-write reply code on streams); nothing else decides status codes.
"""

from __future__ import annotations

import grpc


class SyncrepError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidArgument(SyncrepError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class OutOfRange(SyncrepError):
    code = grpc.StatusCode.OUT_OF_RANGE


class NotFound(SyncrepError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(SyncrepError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(SyncrepError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(SyncrepError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDenied(SyncrepError):
    code = grpc.StatusCode.PERMISSION_DENIED


def check_io_range(
    volume: str, size_bytes: int, block_size: int, offset: int, length: int, *, what: str = "write"
) -> None:
    """Validate a block-aligned (offset, length) against a volume; raise with a
    message that names the bad value and the limit."""
    if length <= 0:
        raise InvalidArgument(f"{what} of length {length} to volume {volume!r}: length must be > 0")
    if offset % block_size:
        raise InvalidArgument(
            f"{what} at offset {offset} is not aligned to the {block_size}-byte block size of volume {volume!r}"
        )
    if length % block_size:
        raise InvalidArgument(
            f"{what} length {length} is not a multiple of the {block_size}-byte block size of volume {volume!r}"
        )
    if offset + length > size_bytes:
        raise OutOfRange(
            f"{what} of {length} bytes at offset {offset} ends at {offset + length}, "
            f"past the end of volume {volume!r} ({size_bytes} bytes)"
        )


async def abort_with(context: grpc.aio.ServicerContext, err: SyncrepError) -> None:
    await context.abort(err.code, err.message)
