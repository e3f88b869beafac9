"""The node's resync budget (issue 14, primary/resync.py ``ResyncBudget``,
``TokenBucket``): at most --max-concurrent-resyncs resyncs run on a node, the
others wait in order; all of them share --node-resync-max-rate. The unit
tests run on a fake clock; the end-to-end test runs three volumes on real
processes with one slot: a secondary killed under writes to all three comes
back, every resync runs in turn, every volume ends in sync and identical."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from e2e_helpers import assert_replicas_identical, check_model, wait_state, write_blocks

from primary.resync import ResyncBudget, TokenBucket

MiB = 1 << 20


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_token_bucket_holds_the_rate_and_banks_no_more_than_its_burst() -> None:
    clock = FakeClock()
    b = TokenBucket(100 * MiB, clock)  # burst: a quarter of a second
    assert b.debit(25 * MiB) == 0.0  # the burst
    assert b.debit(50 * MiB) == pytest.approx(0.5)  # overdrawn: sleep off the debt
    clock.t += 0.5
    assert b.debit(100 * MiB) == pytest.approx(1.0)
    clock.t += 3600.0  # an idle hour banks one burst, not an hour of the rate
    assert b.debit(25 * MiB) == 0.0
    assert b.debit(100 * MiB) == pytest.approx(1.0)
    assert TokenBucket(0, clock).debit(1 << 40) == 0.0  # 0: unlimited


async def test_budget_runs_at_most_max_concurrent_in_order_and_a_cancelled_waiter_leaves_the_queue() -> None:
    budget = ResyncBudget(2)
    release = {v: asyncio.Event() for v in "abcde"}
    started: list[str] = []
    peak = 0

    async def resync(v: str) -> None:
        nonlocal peak
        async with budget.slot(v):
            started.append(v)
            peak = max(peak, len(budget.running))
            await release[v].wait()

    tasks = {v: asyncio.create_task(resync(v)) for v in "abcde"}
    for _ in range(5):
        await asyncio.sleep(0)
    assert started == ["a", "b"] and budget.queued == ["c", "d", "e"]
    tasks["d"].cancel()  # AbortResync / the volume stops while it waits
    await asyncio.gather(tasks["d"], return_exceptions=True)
    assert budget.queued == ["c", "e"]
    release["a"].set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert started == ["a", "b", "c"]
    release["b"].set()
    release["c"].set()
    release["e"].set()
    await asyncio.gather(*(tasks[v] for v in "abce"))
    assert started == ["a", "b", "c", "e"] and peak == 2
    assert budget.running == set() and budget.queued == []


def test_budget_refuses_zero_slots() -> None:
    with pytest.raises(ValueError, match="max_concurrent"):
        ResyncBudget(0)


VOLS = ("v0", "v1", "v2")
SIZE = 8 * MiB
BLOCK = 4096


@pytest.mark.e2e
async def test_secondary_back_with_three_degraded_volumes_resyncs_them_one_at_a_time(
    cluster_factory: Any, seed: int
) -> None:
    """Fault: SIGKILL of the secondary while three volumes take writes; the
    primary runs with --max-concurrent-resyncs 1. On its return the resyncs
    queue and run in turn (the primary's log says which queued), and each
    volume ends in sync, identical block for block, every write present."""
    c = cluster_factory(primary_args=["--max-concurrent-resyncs", "1", "--resync-max-rate", "2MiB"])
    await c.start()
    models: dict[str, dict[int, bytes]] = {}
    clients = {}
    for v in VOLS:
        await c.create_volume(v, SIZE, BLOCK)
        clients[v] = await c.connect(v)
        models[v] = {}
        await write_blocks(clients[v], 0, 16, 4, seed=seed, model=models[v])
    c.kill("secondary")
    for i, v in enumerate(VOLS):
        await wait_state(c, v, "degraded", timeout_s=30)
        # 1 MiB each: at 2 MiB/s a resync lasts long enough (0.5 s) that the others queue.
        await write_blocks(clients[v], 256, 256, 16, seed=seed + 1 + i, model=models[v])
    await c.restart("secondary")
    for v in VOLS:
        await wait_state(c, v, "in_sync", timeout_s=120)
    for v in VOLS:
        await assert_replicas_identical(c, v)
        await check_model(c, v, models[v])
        await clients[v].close()
    log = c.log_path("primary").read_text(errors="replace")
    queued = set(re.findall(r"volume (v\d): resync queued", log))
    started_after = set(re.findall(r"volume (v\d): resync starts after", log))
    assert len(queued) >= 1 and queued <= started_after, (queued, started_after)
