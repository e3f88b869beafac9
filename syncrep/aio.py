"""Bounded waits that never swallow a cancel.

Why this module: in CPython 3.11, ``asyncio.wait_for`` returns the awaited
result when that result arrives in the same loop iteration as a cancel of the
waiting task (gh-86296, fixed in 3.12 by rewriting wait_for on
``asyncio.timeout``). The cancel is then lost: a loop that waits on an event
between rounds goes on running, and whoever cancelled it and awaits it hangs.
That hung a coordinator on SIGTERM for 15 s+ in
tests/test_coordinator_advertise.py. ``asyncio.timeout`` cancels the waiting
task itself and tells its own cancel from anybody else's, so an outside cancel
always ends the wait with ``CancelledError``.

Every wait on an event between rounds of a long-lived loop goes through
``wait_event``; bounded calls inside such loops through ``within``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until ``event`` is set, at most ``timeout_s`` seconds.

    Returns whether it is set. A cancel of the calling task always raises
    ``CancelledError`` (never a silent return, unlike 3.11's wait_for)."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(max(0.0, timeout_s)):
            await event.wait()
    except TimeoutError:
        pass
    return event.is_set()


async def within(timeout_s: float, aw: Awaitable[T]) -> T:
    """``await aw``, bounded by ``timeout_s`` (TimeoutError past it).

    The drop-in for ``asyncio.wait_for(aw, timeout_s)`` inside loops that are
    stopped by a cancel: the cancel always propagates."""
    async with asyncio.timeout(max(0.0, timeout_s)):
        return await aw
