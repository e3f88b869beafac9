"""Real etcd processes for the tests of the etcd store and the election (issue 12);
the processes themselves are deploy/etcd.py's ``EtcdCluster``.

* ``etcd`` fixture: one etcd member on free loopback ports, in its own data
  directory under ``tmp_path``; killed at teardown.
* ``etcd_cluster3`` fixture: a 3-member cluster (the quorum-loss tests stop
  2 of its 3 members).
* ``etcd_tls3`` fixture: a 3-member cluster serving clients over TLS with
  client-certificate authentication (``.url`` is ``etcds://``,
  ``.coordinator_args`` the ``--etcd-certs-dir`` a coordinator needs).

Both wait until every member answers etcd's ``/health`` with ``"health":"true"``
(bounded: ``START_TIMEOUT_S``). They skip, saying why, only when the ``etcd``
binary is missing (``scripts/setup.sh`` installs Debian's ``etcd-server``);
in CI (``$CI`` set) a missing binary fails the test instead, since CI installs
it and a silent skip would hide the loss of every etcd test.

Import the fixtures into a test module (their functions are named apart from
the fixtures, so a test's ``etcd`` argument shadows nothing):
``from etcd_fixture import fixture_etcd, fixture_etcd_cluster3  # noqa: F401``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.etcd import START_TIMEOUT_S, EtcdCluster, EtcdMember

__all__ = [
    "START_TIMEOUT_S",
    "EtcdCluster",
    "EtcdMember",
    "etcd_binary",
    "fixture_etcd",
    "fixture_etcd_cluster3",
    "fixture_etcd_tls3",
]


def etcd_binary() -> str:
    """The etcd binary's path; skips the test when it is missing (fails in CI)."""
    path = shutil.which("etcd")
    if path is None:
        reason = "the etcd binary is missing (scripts/setup.sh installs Debian's etcd-server)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must install it", pytrace=False)
        pytest.skip(reason)
    return path


def _cluster(tmp_path: Path, size: int, *, tls: bool = False) -> Iterator[EtcdCluster]:
    c = EtcdCluster.make(etcd_binary(), tmp_path / f"etcd-{size}{'-tls' if tls else ''}", size, tls=tls)
    try:
        c.start()
        yield c
    finally:
        c.close()


@pytest.fixture(name="etcd")
def fixture_etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    """One etcd member (``.endpoints``, ``.url``, ``.members[0].pause()``)."""
    yield from _cluster(tmp_path, 1)


@pytest.fixture(name="etcd_cluster3")
def fixture_etcd_cluster3(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A 3-member etcd cluster."""
    yield from _cluster(tmp_path, 3)


@pytest.fixture(name="etcd_tls3")
def fixture_etcd_tls3(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A 3-member etcd cluster on TLS with client-certificate authentication."""
    yield from _cluster(tmp_path, 3, tls=True)
