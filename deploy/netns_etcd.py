"""A real etcd cluster on a network-namespace test host (issue 12).

deploy/etcd.py's :class:`~deploy.etcd.EtcdCluster` runs its members on
loopback, in the caller's namespace. A test that cuts a coordinator from etcd
needs etcd on a host of its own (deploy/netns.py), so that a partition of the
coordinator's host from that one host cuts it from EVERY member, and from
nothing else (the nodes, the other coordinators and the client stay reachable).

:func:`etcd_on_host` lays out ``size`` members on one test host (``host``: its
``address`` and ``exec_prefix``, e.g. a :class:`deploy.netns.Host`), each
listening on ``<address>:<port>`` with ports fixed from ``first_port`` (the
host is private: they are free), and returns an ordinary ``EtcdCluster``
whose ``start()``/``kill(i)``/``stop(i)``/health checks work as before. The
members are entered through a tiny wrapper script, ``<root>/etcd-on-host``
(``exec ip netns exec NS etcd "$@"``): ``EtcdCluster`` spawns its binary
with the member's flags, and ``sh exec`` and ``ip netns exec`` both exec,
so the pid it holds is etcd's own (its kill and stop reach etcd, not a
wrapper). The health checks (HTTP to each member's ``/health``) need the
caller to run where that host is reachable: on the client host.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from deploy.cluster import HostPlacement
from deploy.etcd import HOST, EtcdCluster, EtcdMember

__all__ = ["FIRST_PORT", "HostedEtcdMember", "etcd_on_host"]

#: Client port of the first member; member i uses FIRST_PORT + 10 i (client) and + 1 (peer).
FIRST_PORT = 2379
WRAPPER_NAME = "etcd-on-host"


@dataclass
class HostedEtcdMember(EtcdMember):
    """An etcd member listening on its test host's address, not loopback."""

    host: str = HOST

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"


def etcd_on_host(binary: str, root: Path, size: int, host: HostPlacement, *,
                 first_port: int = FIRST_PORT) -> EtcdCluster:
    """``size`` etcd members on test host ``host`` (not started: call ``start()``)."""
    root.mkdir(parents=True, exist_ok=True)
    wrapper = root / WRAPPER_NAME
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.join([*host.exec_prefix, binary])} "$@"\n')
    wrapper.chmod(0o755)
    c = EtcdCluster(str(wrapper), root)
    for i in range(size):
        name = f"etcd{i}"
        port = first_port + 10 * i
        c.members.append(HostedEtcdMember(name, root / name, port, port + 1, root / f"{name}.log",
                                          host=host.address))
    return c
