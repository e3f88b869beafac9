"""Shared fixtures.

* ``cluster``: a started :class:`deploy.cluster.LocalCluster` (coordinator,
  primary, secondary as real processes) with volume ``vol0`` (16 MiB, 4 KiB
  blocks) created and in sync; torn down after the test.
* ``vclient``: a :class:`syncrep.client.VolumeClient` on ``vol0`` of ``cluster``.
* ``cluster_factory``: ``make(**LocalCluster kwargs)`` -> an unstarted cluster
  in its own directory under ``tmp_path``; every cluster made is torn down.

* ``seed``: the seed of a test's pseudo-randomness (use ``random.Random(seed)``,
  never the global ``random`` or ``os.urandom``): ``$SYNCREP_TEST_SEED`` when
  set, else the test's default -- the value of an indirect parametrization
  (``@pytest.mark.parametrize("seed", [...], indirect=True)``) or a value
  derived from the test's node id (stable across runs and machines). When a
  test that used it fails, its report has a ``seed`` section:
  ``seed=N (rerun with SYNCREP_TEST_SEED=N)``.

Tests that use a cluster fixture are marked ``e2e`` automatically (mark other
multi-process tests ``@pytest.mark.e2e`` yourself). When such a test fails, the
tail of every process's log is printed with the failure report.

``wait_until(condition, what)`` (import it: ``from conftest import wait_until``)
waits for a condition with a deadline instead of sleeping for a guessed time.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import random
import subprocess
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
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

SEED_ENV = "SYNCREP_TEST_SEED"
_SEED = pytest.StashKey[int]()


def random_bytes(n: int, seed: int | str = 0) -> bytes:
    """``n`` reproducible pseudo-random bytes."""
    return random.Random(seed).randbytes(n)


async def wait_until(
    condition: Callable[[], object | Awaitable[object]],
    what: str,
    *,
    timeout_s: float = 10.0,
    interval_s: float = 0.005,
) -> None:
    """Poll ``condition`` (a function, or a coroutine function) until it is
    true; after ``timeout_s`` fail with "timed out ... waiting until <what>"."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting until {what}")
        await asyncio.sleep(interval_s)


def _env_seed() -> int | None:
    text = os.environ.get(SEED_ENV, "").strip()
    if not text:
        return None
    try:
        return int(text, 0)
    except ValueError:
        raise pytest.UsageError(f"{SEED_ENV}={text!r} is not an integer") from None


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """This test's seed (see the module docstring); reported when the test fails."""
    value = _env_seed()
    if value is None:
        if hasattr(request, "param"):
            value = int(request.param)
        else:
            value = zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF
    request.node.stash[_SEED] = value
    return value


def pytest_report_header(config: pytest.Config) -> str | None:
    value = _env_seed()
    return None if value is None else f"{SEED_ENV}={value}: every test's seed"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    if rep.failed and _SEED in item.stash:
        n = item.stash[_SEED]
        rep.sections.append(("seed", f"seed={n} (rerun with {SEED_ENV}={n})"))
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


#: How long a process the ``procs`` fixture killed may take to be reaped.
PROCS_REAP_TIMEOUT_S = 15.0


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test started itself (append them): any still running at the
    end is SIGKILLed and reaped, whether the test passed or not."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait(PROCS_REAP_TIMEOUT_S)
