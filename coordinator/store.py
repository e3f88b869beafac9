"""The coordinator's store: one interface, two implementations (issue 12).

``Store`` is the surface of ``coordinator.db.CoordinatorDB`` the coordinator
uses (``coordinator/service.py``, ``coordinator/server.py``), as a structural
``Protocol``: the SQLite ``CoordinatorDB`` (one coordinator, the default) and
``coordinator.etcd_store.EtcdStore`` (several coordinators, one leader) both
satisfy it without inheriting from it, so the service does not know which one
it runs on. The records are ``coordinator.db``'s, shared by both.

Errors: both raise ``DBError`` for what a person has to look at,
``PairExists`` on a duplicate name and ``KeyError`` on an unknown volume.
The etcd store adds three subclasses of ``DBError`` (defined here, so that a
caller can catch them without importing etcd's client):

* ``StoreConflict``: a compare-and-swap lost (another writer changed the
  key since this store read it). The caller ``reload()``s and decides again.
* ``StoreUnavailable``: etcd did not answer in time (unreachable, no quorum).
  Nothing is known to be written; the caller stops mutating and retries later.
* ``NotLeader``: the write was fenced: this coordinator does not (or no longer)
  lead. Nothing was written; the caller answers with a redirect.

``parse_store_url`` turns ``--store`` into a ``StoreSpec``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from coordinator.db import (
    DBError,
    EventRecord,
    GrantRecord,
    NodeRecord,
    PairRecord,
    ProgressRecord,
    StateChange,
)

__all__ = [
    "DEFAULT_ETCD_PORT",
    "STORE_METHODS",
    "NotLeader",
    "Store",
    "StoreConflict",
    "StoreSpec",
    "StoreUnavailable",
    "parse_store_url",
]

DEFAULT_ETCD_PORT = 2379


class StoreConflict(DBError):
    """A compare-and-swap on ``key`` failed: it changed since this store last read it."""

    def __init__(self, key: str, detail: str = "") -> None:
        msg = f"store conflict on {key}: it was changed by another writer since this coordinator read it"
        super().__init__(msg + (f" ({detail})" if detail else "") + "; reload and decide again")
        self.key = key


class StoreUnavailable(DBError):
    """The store did not answer (etcd unreachable, or no quorum) within the bound."""


class NotLeader(DBError):
    """A write refused because this coordinator does not lead (``leader``: who does, if known)."""

    def __init__(self, message: str, leader: str | None = None) -> None:
        super().__init__(message)
        self.leader = leader


@runtime_checkable
class Store(Protocol):
    """What the coordinator needs of its persistent state (see ``CoordinatorDB`` for each method)."""

    # nodes
    def upsert_node(self, address: str, role_hint: str, registered_at: float | None = None) -> NodeRecord: ...
    def get_node(self, address: str) -> NodeRecord | None: ...
    def list_nodes(self) -> list[NodeRecord]: ...

    # pairs (a pair update and its event are one transaction)
    def create_pair(self, pair: PairRecord, reason: str, at: float | None = None) -> PairRecord: ...
    def save_pair(
        self, pair: PairRecord, change: StateChange | None = None, at: float | None = None
    ) -> PairRecord: ...
    def update_progress(self, name: str, progress: ProgressRecord) -> None: ...
    def delete_pair(self, name: str, reason: str, at: float | None = None) -> bool: ...
    def resize_pair(self, name: str, size_bytes: int, reason: str, at: float | None = None) -> PairRecord: ...
    def get_pair(self, name: str) -> PairRecord | None: ...
    def list_pairs(self) -> list[PairRecord]: ...
    def pairs_for_node(self, address: str) -> list[PairRecord]: ...

    # grants
    def set_grant(
        self, volume: str, user: str, read_only: bool, at: float | None = None
    ) -> GrantRecord | None: ...
    def delete_grant(self, volume: str, user: str) -> GrantRecord | None: ...
    def list_grants(self, volume: str | None = None) -> list[GrantRecord]: ...

    # events
    def events(self, volume: str | None = None, limit: int | None = None) -> list[EventRecord]: ...
    def resync_started_at_epoch(self, volume: str, epoch: int) -> bool: ...

    def close(self) -> None: ...


#: The public methods of ``Store`` (tests/test_etcd_store.py checks both
#: implementations against these names and their signatures).
STORE_METHODS: tuple[str, ...] = tuple(
    name for name, v in vars(Store).items() if callable(v) and not name.startswith("_")
)


@dataclass(frozen=True)
class StoreSpec:
    """A parsed ``--store``: ``kind`` "sqlite" (under ``--data-dir``) or "etcd"
    (``endpoints``; ``tls``: ``etcds://``, TLS to every member)."""

    kind: str
    endpoints: tuple[str, ...] = ()
    tls: bool = False

    @property
    def url(self) -> str:
        if self.kind == "sqlite":
            return "sqlite"
        return ("etcds://" if self.tls else "etcd://") + ",".join(self.endpoints)


_STORE_HELP = (
    "expected 'sqlite', 'etcd://HOST:PORT[,HOST:PORT...]' or, with TLS to etcd, 'etcds://HOST:PORT[,...]' "
    "(e.g. etcds://10.0.0.1:2379,10.0.0.2:2379)"
)


def parse_store_url(text: str) -> StoreSpec:
    """``"sqlite"``, ``"etcd://h1:2379,h2:2379"`` or ``"etcds://..."`` (TLS; a
    port defaults to 2379) -> a StoreSpec.

    ValueError, saying what a valid value looks like, for anything else."""
    value = text.strip()
    if value == "sqlite":
        return StoreSpec("sqlite")
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("etcd", "etcds"):
        raise ValueError(f"--store {text!r}: unknown store; {_STORE_HELP}")
    rest = rest.rstrip("/")
    if not rest:
        raise ValueError(f"--store {text!r}: no etcd endpoint; {_STORE_HELP}")
    endpoints: list[str] = []
    for part in rest.split(","):
        ep = part.strip()
        if not ep or "/" in ep or "@" in ep:
            raise ValueError(f"--store {text!r}: bad etcd endpoint {part!r}; {_STORE_HELP}")
        if ep.startswith("["):  # [v6]:port
            host, _, port_text = ep[1:].partition("]")
            port_text = port_text.removeprefix(":")
            host = f"[{host}]"
        elif ep.count(":") > 1:
            raise ValueError(
                f"--store {text!r}: IPv6 endpoint {ep!r} needs brackets ([::1]:2379); {_STORE_HELP}"
            )
        else:
            host, _, port_text = ep.partition(":")
        if not host or host == "[]":
            raise ValueError(f"--store {text!r}: endpoint {part!r} has no host; {_STORE_HELP}")
        port = DEFAULT_ETCD_PORT
        if port_text:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise ValueError(
                    f"--store {text!r}: endpoint {part!r} has a bad port {port_text!r} (1-65535); {_STORE_HELP}"
                )
            port = int(port_text)
        norm = f"{host}:{port}"
        if norm in endpoints:
            raise ValueError(f"--store {text!r}: endpoint {norm} is listed twice")
        endpoints.append(norm)
    return StoreSpec("etcd", tuple(endpoints), tls=scheme == "etcds")
