"""syncrep/aio.py: a cancel that arrives as the awaited event is set ends the wait.

The fault: CPython 3.11's asyncio.wait_for returns normally when the awaited
result and a cancel of the waiter land in the same loop iteration (gh-86296);
a coordinator's background loop then went on running and its SIGTERM stop hung
(tests/test_coordinator_advertise.py). Deterministic: no timing involved.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable

import pytest

from syncrep.aio import wait_event, within


async def _set_and_cancel_together(waiter: Callable[[asyncio.Event], Awaitable[None]]) -> str:
    ev = asyncio.Event()
    task = asyncio.create_task(waiter(ev))
    await asyncio.sleep(0)  # the task is now waiting on ev
    await asyncio.sleep(0)
    ev.set()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return "cancelled"
    return "returned"


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="wait_for no longer swallows a cancel in 3.12+")
def test_wait_for_swallows_a_cancel_on_311() -> None:
    """The bug this module exists for: shows the scenario below is the racy one."""

    async def waiter(ev: asyncio.Event) -> None:
        await asyncio.wait_for(ev.wait(), 10.0)

    assert asyncio.run(_set_and_cancel_together(waiter)) == "returned"


def test_wait_event_cancel_as_event_is_set_is_not_swallowed() -> None:
    async def waiter(ev: asyncio.Event) -> None:
        await wait_event(ev, 10.0)

    assert asyncio.run(_set_and_cancel_together(waiter)) == "cancelled"


def test_within_cancel_as_result_arrives_is_not_swallowed() -> None:
    async def waiter(ev: asyncio.Event) -> None:
        await within(10.0, ev.wait())

    assert asyncio.run(_set_and_cancel_together(waiter)) == "cancelled"


def test_wait_event_times_out_and_reports_set() -> None:
    async def main() -> tuple[bool, bool, bool]:
        ev = asyncio.Event()
        timed_out = await wait_event(ev, 0.01)
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, ev.set)
        woke = await wait_event(ev, 10.0)
        already = await wait_event(ev, 0.0)
        return timed_out, woke, already

    assert asyncio.run(main()) == (False, True, True)


def test_within_raises_timeout() -> None:
    async def main() -> None:
        await within(0.01, asyncio.Event().wait())

    with pytest.raises(TimeoutError):
        asyncio.run(main())
