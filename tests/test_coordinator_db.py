"""Coordinator persistence: everything survives a close and reopen."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from coordinator.db import (
    DB_FILENAME,
    SCHEMA_VERSION,
    CoordinatorDB,
    DBError,
    GrantRecord,
    PairExists,
    PairRecord,
    ProgressRecord,
    StateChange,
)
from syncrep.blockstore import Extent
from syncrep.core.pairstate import PairState


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "data" / DB_FILENAME


def _pair(name: str = "vol1", **kw: object) -> PairRecord:
    base = PairRecord(
        name=name,
        size_bytes=64 * 1024 * 1024,
        block_size=4096,
        primary="127.0.0.1:7001",
        secondary="127.0.0.1:7002",
        resync_mode=2,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_pragmas(path: Path) -> None:
    db = CoordinatorDB(path)
    try:
        assert db._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert db._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    finally:
        db.close()


def test_nodes_persist_and_upsert(path: Path) -> None:
    with CoordinatorDB(path) as db:
        db.upsert_node("127.0.0.1:7001", "primary", registered_at=100.0)
        db.upsert_node("127.0.0.1:7002", "secondary", registered_at=101.0)
        db.upsert_node("127.0.0.1:7001", "secondary", registered_at=102.0)
    with CoordinatorDB(path) as db:
        nodes = db.list_nodes()
        assert [(n.address, n.role_hint, n.registered_at) for n in nodes] == [
            ("127.0.0.1:7001", "secondary", 102.0),
            ("127.0.0.1:7002", "secondary", 101.0),
        ]
        assert db.get_node("127.0.0.1:7002") is not None
        assert db.get_node("127.0.0.1:9999") is None


def test_pair_roundtrip_all_fields(path: Path) -> None:
    pair = _pair(
        epoch=7,
        state=PairState.DEGRADED,
        failed_extents=(Extent(0, 4096), Extent(10_000, 3)),
        fault_snapshot_id=2**64 - 1,  # uint64 max survives SQLite's signed INTEGER
        progress=ProgressRecord(bytes_done=5, bytes_total=10, rate_bytes_per_s=1.5, eta_s=3.25, round=2),
        last_error="NACK: EIO",
        state_changed_at=1234.5,
        created_at=1000.0,
    )
    with CoordinatorDB(path) as db:
        created = db.create_pair(pair, "created")
        assert created == pair
    with CoordinatorDB(path) as db:
        got = db.get_pair("vol1")
        assert got == pair
        assert got is not None and got.failed_bytes == 4099
        assert db.list_pairs() == [pair]
        assert db.pairs_for_node("127.0.0.1:7002") == [pair]
        assert db.pairs_for_node("127.0.0.1:7003") == []


def test_create_sets_timestamps_and_event(path: Path) -> None:
    with CoordinatorDB(path) as db:
        p = db.create_pair(_pair(), "created by test")
        assert p.created_at > 0 and p.state_changed_at > 0
        (ev,) = db.events("vol1")
        assert (ev.from_state, ev.to_state, ev.epoch, ev.reason) == (
            None,
            PairState.IN_SYNC,
            1,
            "created by test",
        )


def test_duplicate_pair(path: Path) -> None:
    with CoordinatorDB(path) as db:
        db.create_pair(_pair(), "first")
        with pytest.raises(PairExists, match="vol1"):
            db.create_pair(_pair(primary="127.0.0.1:8001"), "second")
        # The failed insert recorded nothing.
        assert len(db.events("vol1")) == 1
        assert db.get_pair("vol1") == db.list_pairs()[0]


def test_save_pair_with_event_and_reopen(path: Path) -> None:
    with CoordinatorDB(path) as db:
        p = db.create_pair(_pair(), "created")
        p = db.save_pair(
            replace(
                p,
                state=PairState.DEGRADED,
                failed_extents=(Extent(0, 10), Extent(20, 5)),
                fault_snapshot_id=3,
            ),
            StateChange(PairState.IN_SYNC, "secondary failed: EIO"),
        )
        p = db.save_pair(
            replace(p, epoch=2, state=PairState.RESYNCING), StateChange(PairState.DEGRADED, "resync")
        )
        # Extents replaced, not appended.
        p = db.save_pair(replace(p, failed_extents=(Extent(0, 30),)))
    with CoordinatorDB(path) as db:
        got = db.get_pair("vol1")
        assert got == p
        assert got is not None and got.failed_extents == (Extent(0, 30),)
        evs = db.events("vol1")
        assert [(e.from_state, e.to_state, e.epoch) for e in evs] == [
            (None, PairState.IN_SYNC, 1),
            (PairState.IN_SYNC, PairState.DEGRADED, 1),
            (PairState.DEGRADED, PairState.RESYNCING, 2),
        ]
        assert evs[1].reason == "secondary failed: EIO"
        assert [e.to_state for e in db.events("vol1", limit=1)] == [PairState.RESYNCING]
        assert db.resync_started_at_epoch("vol1", 2)
        assert not db.resync_started_at_epoch("vol1", 1)


def test_save_is_atomic(path: Path) -> None:
    """A failing save leaves neither the pair update nor its event behind."""
    with CoordinatorDB(path) as db:
        p = db.create_pair(_pair(failed_extents=(Extent(0, 1),)), "created")
        bad = replace(
            p, state=PairState.DEGRADED, failed_extents=(Extent(0, 1), Extent(0, 2))
        )  # duplicate key
        with pytest.raises(sqlite3.IntegrityError):
            db.save_pair(bad, StateChange(PairState.IN_SYNC, "boom"))
        assert db.get_pair("vol1") == p
        assert len(db.events("vol1")) == 1


def test_save_unknown_pair(path: Path) -> None:
    with CoordinatorDB(path) as db, pytest.raises(KeyError, match="nope"):
        db.save_pair(_pair("nope"))


def test_update_progress_only(path: Path) -> None:
    with CoordinatorDB(path) as db:
        p = db.create_pair(_pair(state=PairState.RESYNCING, failed_extents=(Extent(5, 5),)), "created")
        db.update_progress(
            "vol1", ProgressRecord(bytes_done=1, bytes_total=2, rate_bytes_per_s=3.0, eta_s=4.0, round=1)
        )
    with CoordinatorDB(path) as db:
        got = db.get_pair("vol1")
        assert got == replace(p, progress=ProgressRecord(1, 2, 3.0, 4.0, 1))


def test_delete_pair(path: Path) -> None:
    with CoordinatorDB(path) as db:
        db.create_pair(_pair(failed_extents=(Extent(0, 1),)), "created")
        assert db.delete_pair("vol1", "rolled back")
        assert not db.delete_pair("vol1", "again")
        assert db.get_pair("vol1") is None
        assert db._conn.execute("SELECT COUNT(*) FROM failed_extents").fetchone()[0] == 0
    with CoordinatorDB(path) as db:
        assert db.list_pairs() == []
        evs = db.events("vol1")
        assert [(e.from_state, e.to_state) for e in evs] == [
            (None, PairState.IN_SYNC),
            (PairState.IN_SYNC, None),
        ]
        # The name can be used again.
        db.create_pair(_pair(), "recreated")


def test_many_extents(path: Path) -> None:
    exts = tuple(Extent(i * 8192, 4096) for i in range(5000))
    with CoordinatorDB(path) as db:
        db.create_pair(_pair(failed_extents=exts), "created")
    with CoordinatorDB(path) as db:
        got = db.get_pair("vol1")
        assert got is not None and got.failed_extents == exts


def test_events_all_volumes_in_order(path: Path) -> None:
    with CoordinatorDB(path) as db:
        db.create_pair(_pair("a"), "a")
        db.create_pair(_pair("b"), "b")
        assert [e.volume for e in db.events()] == ["a", "b"]


def test_schema_version_mismatch(path: Path) -> None:
    CoordinatorDB(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(DBError, match="schema version 999"):
        CoordinatorDB(path)


# The schema of version 1, as the coordinator of that version wrote it.
_V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    address       TEXT PRIMARY KEY,
    role_hint     TEXT NOT NULL,
    registered_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS pairs (
    name                   TEXT PRIMARY KEY,
    size_bytes             INTEGER NOT NULL,
    block_size             INTEGER NOT NULL,
    primary_address        TEXT NOT NULL,
    secondary_address      TEXT NOT NULL,
    epoch                  INTEGER NOT NULL,
    state                  TEXT NOT NULL CHECK (state IN ('in_sync', 'degraded', 'resyncing')),
    fault_snapshot_id      INTEGER NOT NULL,
    resync_mode            INTEGER NOT NULL,
    resync_bytes_done      INTEGER NOT NULL,
    resync_bytes_total     INTEGER NOT NULL,
    resync_rate_bytes_per_s REAL NOT NULL,
    resync_eta_s           REAL NOT NULL,
    resync_round           INTEGER NOT NULL,
    last_error             TEXT NOT NULL,
    state_changed_at       REAL NOT NULL,
    created_at             REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS failed_extents (
    volume TEXT NOT NULL REFERENCES pairs(name) ON DELETE CASCADE,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    PRIMARY KEY (volume, offset)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    ts         REAL NOT NULL,
    volume     TEXT NOT NULL,
    from_state TEXT,            -- NULL: the pair was created
    to_state   TEXT,            -- NULL: the pair was deleted
    epoch      INTEGER NOT NULL,
    reason     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_volume ON events (volume, id);
"""


def _v1_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.executescript(_V1_SCHEMA)
    conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '1')")
    conn.execute(
        "INSERT INTO pairs (name, size_bytes, block_size, primary_address, secondary_address, epoch, state, "
        "fault_snapshot_id, resync_mode, resync_bytes_done, resync_bytes_total, resync_rate_bytes_per_s, "
        "resync_eta_s, resync_round, last_error, state_changed_at, created_at) "
        "VALUES ('vol1', 1048576, 4096, 'a:1', 'b:2', 7, 'degraded', -2, 2, 10, 20, 1.5, 2.5, 3, 'nack', 50.0, 40.0)"
    )
    conn.execute("INSERT INTO failed_extents (volume, offset, length) VALUES ('vol1', 4096, 8192)")
    conn.execute(
        "INSERT INTO events (ts, volume, from_state, to_state, epoch, reason) "
        "VALUES (40.0, 'vol1', NULL, 'in_sync', 1, 'created')"
    )
    conn.commit()
    conn.close()


def test_migration_from_v1_keeps_pairs_extents_and_events(path: Path) -> None:
    _v1_file(path)
    with CoordinatorDB(path) as db:
        got = db.get_pair("vol1")
        assert got is not None
        assert (got.primary, got.secondary, got.epoch, got.state) == ("a:1", "b:2", 7, PairState.DEGRADED)
        assert got.fault_snapshot_id == 2**64 - 2
        assert got.failed_extents == (Extent(4096, 8192),)
        assert got.progress == ProgressRecord(10, 20, 1.5, 2.5, 3)
        assert (got.last_error, got.state_changed_at, got.created_at) == ("nack", 50.0, 40.0)
        # The new columns at their defaults.
        assert (got.volume_uuid, got.generation, got.secondary_generation) == ("", 0, 0)
        assert not got.auto_failover and not got.full_copy_pending
        assert [e.reason for e in db.events("vol1")] == ["created"]
        assert db._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        row = db._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        assert row[0] == str(SCHEMA_VERSION)
        # The rebuilt table accepts split_brain (v1's CHECK did not).
        db.save_pair(replace(got, state=PairState.SPLIT_BRAIN), StateChange(got.state, "split brain"))
    with CoordinatorDB(path) as db:
        again = db.get_pair("vol1")
        assert again is not None and again.state is PairState.SPLIT_BRAIN
        assert again.failed_extents == (Extent(4096, 8192),)


def test_migrated_db_deletes_cascade(path: Path) -> None:
    _v1_file(path)
    with CoordinatorDB(path) as db:
        assert db.delete_pair("vol1", "gone")
        assert db._conn.execute("SELECT COUNT(*) FROM failed_extents").fetchone()[0] == 0


def test_failover_fields_persist(path: Path) -> None:
    with CoordinatorDB(path) as db:
        db.create_pair(_pair(volume_uuid="u" * 32, generation=2**64 - 1, auto_failover=True), "created")
        pair = db.get_pair("vol1")
        assert pair is not None
        # A promotion swaps the roles: save_pair writes the addresses too.
        db.save_pair(
            replace(
                pair,
                primary=pair.secondary,
                secondary=pair.primary,
                secondary_generation=5,
                full_copy_pending=True,
                state=PairState.DEGRADED,
                epoch=2,
            ),
            StateChange(PairState.IN_SYNC, "promoted"),
        )
    with CoordinatorDB(path) as db:
        got = db.get_pair("vol1")
        assert got is not None
        assert (got.primary, got.secondary) == ("127.0.0.1:7002", "127.0.0.1:7001")
        assert (got.volume_uuid, got.generation, got.secondary_generation) == ("u" * 32, 2**64 - 1, 5)
        assert got.auto_failover and got.full_copy_pending


def test_newer_schema_refused(path: Path) -> None:
    CoordinatorDB(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    conn.commit()
    conn.close()
    with pytest.raises(DBError, match=rf"schema version {SCHEMA_VERSION + 1}.*newer coordinator"):
        CoordinatorDB(path)


# ---------------------------------------------------------------- grants (schema version 3, issue 11)


def _v2_file(path: Path) -> None:
    """A version 2 database: what the coordinator before grants wrote (its
    schema is version 3's without the grants table)."""
    with CoordinatorDB(path) as db:
        db.create_pair(_pair(), "created")
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE grants")
    conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()


def test_migration_from_v2_adds_an_empty_grants_table(path: Path) -> None:
    _v2_file(path)
    with CoordinatorDB(path) as db:
        row = db._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        assert row[0] == "3"
        assert db.list_grants() == []
        assert db.get_pair("vol1") is not None
        db.set_grant("vol1", "alice", True, at=5.0)
    with CoordinatorDB(path) as db:
        assert db.list_grants() == [GrantRecord("vol1", "alice", True, 5.0)]


def test_migration_from_v1_has_grants(path: Path) -> None:
    _v1_file(path)
    with CoordinatorDB(path) as db:
        db.set_grant("vol1", "bob", False, at=1.0)
        assert db.list_grants("vol1") == [GrantRecord("vol1", "bob", False, 1.0)]


def test_grants_persist_replace_and_revoke(path: Path) -> None:
    with CoordinatorDB(path) as db:
        db.create_pair(_pair("a"), "a")
        db.create_pair(_pair("b"), "b")
        assert db.set_grant("b", "alice", False, at=1.0) is None
        assert db.set_grant("a", "carol", True, at=2.0) is None
        assert db.set_grant("a", "alice", True, at=3.0) is None
        # A second grant replaces the first and returns it.
        assert db.set_grant("a", "alice", False, at=4.0) == GrantRecord("a", "alice", True, 3.0)
    with CoordinatorDB(path) as db:
        assert db.list_grants() == [
            GrantRecord("a", "alice", False, 4.0),
            GrantRecord("a", "carol", True, 2.0),
            GrantRecord("b", "alice", False, 1.0),
        ]
        assert [g.user for g in db.list_grants("a")] == ["alice", "carol"]
        assert db.delete_grant("a", "carol") == GrantRecord("a", "carol", True, 2.0)
        assert db.delete_grant("a", "carol") is None
    with CoordinatorDB(path) as db:
        assert [(g.volume, g.user) for g in db.list_grants()] == [("a", "alice"), ("b", "alice")]


def test_grant_on_unknown_volume_refused(path: Path) -> None:
    """Fault: a grant for a volume that does not exist."""
    with CoordinatorDB(path) as db, pytest.raises(KeyError, match="'nope' does not exist"):
        db.set_grant("nope", "alice", False)
    with CoordinatorDB(path) as db:
        assert db.list_grants() == []


def test_deleting_a_pair_drops_its_grants(path: Path) -> None:
    with CoordinatorDB(path) as db:
        db.create_pair(_pair("a"), "a")
        db.create_pair(_pair("b"), "b")
        db.set_grant("a", "alice", False)
        db.set_grant("b", "alice", False)
        assert db.delete_pair("a", "rolled back")
        db.create_pair(_pair("a"), "created again")
        assert [(g.volume, g.user) for g in db.list_grants()] == [("b", "alice")]
