"""Shared fixtures.

* ``cluster``: a started :class:`deploy.cluster.LocalCluster` (coordinator,
  primary, secondary as real processes) with volume ``vol0`` (16 MiB, 4 KiB
  blocks) created and in sync; torn down after the test.
* ``vclient``: a :class:`syncrep.client.VolumeClient` on ``vol0`` of ``cluster``.
* ``cluster_factory``: ``make(**LocalCluster kwargs)`` -> an unstarted cluster
  in its own directory under ``tmp_path``; every cluster made is torn down.

Tests that use a cluster fixture are marked ``e2e`` automatically (mark other
multi-process tests ``@pytest.mark.e2e`` yourself). When such a test fails, the
tail of every process's log is printed with the failure report.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from deploy.cluster import NAMES, LocalCluster
from syncrep.client import VolumeClient

KiB = 1024
MiB = 1024 * KiB
VOLUME = "vol0"
VOLUME_SIZE = 16 * MiB
BLOCK_SIZE = 4096

_CLUSTER_FIXTURES = {"cluster", "cluster_factory", "vclient"}


def random_bytes(n: int, seed: int | str = 0) -> bytes:
    """``n`` reproducible pseudo-random bytes."""
    return random.Random(seed).randbytes(n)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


def _failed(request: pytest.FixtureRequest) -> bool:
    rep = getattr(request.node, "rep_call", None)
    return rep is None or rep.failed


def _report_logs(c: LocalCluster) -> None:
    for name in NAMES:
        tail = c.log_tail(name, 30)
        if tail:
            print(f"\n--- {name} ({c.log_path(name)}), last lines ---\n{tail}")


@pytest.fixture
async def cluster_factory(
    tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[..., LocalCluster]]:
    made: list[LocalCluster] = []

    def make(**kw: Any) -> LocalCluster:
        kw.setdefault("workdir", tmp_path / f"cluster{len(made)}")
        c = LocalCluster(**kw)
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in made:
            if _failed(request):
                _report_logs(c)
            await c.close()


@pytest.fixture
async def cluster(cluster_factory: Callable[..., LocalCluster]) -> LocalCluster:
    c = cluster_factory()
    await c.start()
    await c.create_volume(VOLUME, VOLUME_SIZE, BLOCK_SIZE)
    return c


@pytest.fixture
async def vclient(cluster: LocalCluster) -> AsyncIterator[VolumeClient]:
    client = await cluster.connect(VOLUME)
    try:
        yield client
    finally:
        await client.close()
