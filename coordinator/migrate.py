"""``syncrep coordinator migrate --from DIR --to etcd://...`` (issue 12).

Moves a one-host coordinator's SQLite state (``DIR/coordinator.db``) to an
etcd store that coordinators started with ``--store etcd://...`` then share.
It copies everything the coordinator persists, as it is:

* every volume pair, whole: epoch, state, roles, failed extents, resync
  progress, identity and generations (the same ``PairRecord``);
* every node and every grant;
* every event, in order, each volume's numbered from 1 as the etcd store
  numbers them (the volume key's event counter continues after them), also
  those of volumes deleted since.

The target must hold no coordinator state: a volume, node, grant or event
already under its prefix is refused, naming what was found (copying over a
live store would overwrite decisions another coordinator made). Nothing is
deleted from the SQLite side; the SQLite coordinator must be stopped (its
database is read as it is on disk).

Each volume, with its events, is written by transactions that create keys
only (``create_revision == 0``), so a second run on the same target, or a
coordinator that started writing meanwhile, fails instead of overwriting.
The etcd store's own write path (``EtcdStore.create_pair``) is not used: it
records a creation event and would renumber the history; this module writes
the keys in the store's layout through its internals, on purpose.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.db import DB_FILENAME, CoordinatorDB, DBError, EventRecord
from coordinator.etcd_store import EtcdStore, EtcdTls
from coordinator.store import parse_store_url

log = logging.getLogger(__name__)

__all__ = ["MigrateError", "MigrateReport", "migrate"]

#: Events written per etcd transaction (etcd refuses more than 128 operations in one by default).
EVENTS_PER_TXN = 100


class MigrateError(Exception):
    """The migration did not run (or stopped): what and why, for a person."""


@dataclass
class MigrateReport:
    source: Path
    target: str
    volumes: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    grants: int = 0
    events: int = 0
    failed_extents: int = 0

    def text(self) -> str:
        vols = ", ".join(self.volumes) or "none"
        nodes = ", ".join(self.nodes) or "none"
        return (
            f"migrated {self.source / DB_FILENAME} to {self.target}: {len(self.volumes)} volumes ({vols}), "
            f"{len(self.nodes)} nodes ({nodes}), {self.grants} grants, {self.events} events, "
            f"{self.failed_extents} failed extents; start the coordinators with --store {self.target}"
        )


def _existing(store: EtcdStore) -> list[str]:
    """The coordinator keys under the target prefix (a few, for the message)."""
    found: list[str] = []
    for d in ("volumes", "nodes", "grants", "events"):
        _, kvs = store._run("the emptiness check", store._range(store._key(d, ""), prefix=True, limit=3, keys_only=True))
        found += [kv.key.decode(errors="replace") for kv in kvs]
    return found


def migrate(source: Path | str, target: str, *, prefix: str = "/syncrep/v1/", op_timeout_s: float = 5.0,
            start_timeout_s: float = 10.0, tls: EtcdTls | None = None) -> MigrateReport:
    """Copy the SQLite state in ``source`` (a coordinator's --data-dir) to the
    etcd store ``target`` ("etcd://h:p,..."; "etcds://..." needs ``tls``). Raises MigrateError."""
    source = Path(source)
    path = source / DB_FILENAME
    if not path.is_file():
        raise MigrateError(f"--from {source}: no coordinator database there (expected {path})")
    try:
        spec = parse_store_url(target)
    except ValueError as e:
        raise MigrateError(str(e)) from None
    if spec.kind != "etcd":
        raise MigrateError(f"--to {target!r}: the target must be an etcd store (etcd[s]://HOST:PORT[,...])")
    if spec.tls and tls is None:
        raise MigrateError(f"--to {target!r}: TLS to etcd needs certificates (--etcd-certs-dir or --certs-dir)")
    db = CoordinatorDB(path)
    try:
        pairs, nodes, grants = db.list_pairs(), db.list_nodes(), db.list_grants()
        events = db.events()
    finally:
        db.close()
    try:
        store = EtcdStore(spec.endpoints, prefix=prefix, op_timeout_s=op_timeout_s, start_timeout_s=start_timeout_s,
                          tls=tls if spec.tls else None)
    except DBError as e:
        raise MigrateError(f"cannot use {spec.url} as the target: {e}") from None
    report = MigrateReport(source, spec.url)
    try:
        found = _existing(store)
        if found:
            raise MigrateError(
                f"the target {spec.url} (prefix {prefix}) already holds coordinator state (e.g. {', '.join(found)}): "
                "refusing to copy over it (it may be a running cluster's); use an empty etcd or another prefix"
            )
        by_volume: dict[str, list[EventRecord]] = defaultdict(list)
        for ev in sorted(events, key=lambda e: e.id):
            by_volume[ev.volume].append(ev)
        t = store._client.transactions
        names = {p.name for p in pairs} | set(by_volume)
        for name in sorted(names):
            evs = by_volume.get(name, [])
            for start in range(0, len(evs), EVENTS_PER_TXN):
                batch = list(enumerate(evs[start : start + EVENTS_PER_TXN], start=start + 1))
                keys = [store._event_key(name, seq) for seq, _ in batch]
                ok, _ = store._run("copying events", store._txn(
                    [t.create(k) == 0 for k in keys],
                    [t.put(k, store._event_value(ev.ts, ev.volume, ev.from_state, ev.to_state, ev.epoch, ev.reason))
                     for k, (_, ev) in zip(keys, batch, strict=True)],
                    [],
                ))
                if not ok:
                    raise MigrateError(f"events of volume {name!r} appeared on {spec.url} while copying: stopped")
            report.events += len(evs)
        for pair in pairs:
            key = store._vol_key(pair.name)
            ok, _ = store._run("copying a volume", store._txn(
                [t.create(key) == 0], [t.put(key, store._vol_value(pair, len(by_volume.get(pair.name, []))))], []
            ))
            if not ok:
                raise MigrateError(f"volume {pair.name!r} appeared on {spec.url} while copying: stopped")
            report.volumes.append(pair.name)
            report.failed_extents += len(pair.failed_extents)
        for node in nodes:
            store.upsert_node(node.address, node.role_hint, registered_at=node.registered_at)
            report.nodes.append(node.address)
        for g in grants:
            store.set_grant(g.volume, g.user, g.read_only, at=g.granted_at or None)
            report.grants += 1
    except DBError as e:
        raise MigrateError(f"copying to {spec.url} failed: {e} (copied so far: {report.text()})") from None
    finally:
        store.close()
    log.info("%s", report.text())
    return report
