"""Coordinator persistence: SQLite (stdlib), WAL, synchronous=FULL.

Schema version 3 (older files are migrated on open: ``_migrate_v1_to_v2``,
``_migrate_v2_to_v3``). Tables: ``nodes``, ``pairs``, ``failed_extents`` (one
row per extent), ``events`` (every pair state change, with its reason) and
``grants`` (which user may read or write which volume: issue 11; a pair's
grants go with it when it is deleted). A pair update and the
event recording its state change commit in ONE transaction, so after a crash
the pair state and its history always agree. A coordinator restart loses
nothing: every committed transaction is fsynced before ``commit`` returns.

The connection is used from one thread (the coordinator's event loop); every
call is short.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from syncrep.blockstore import Extent
from syncrep.core.driver import Progress
from syncrep.core.pairstate import PairState

__all__ = [
    "DB_FILENAME",
    "SCHEMA_VERSION",
    "CoordinatorDB",
    "DBError",
    "EventRecord",
    "GrantRecord",
    "NodeRecord",
    "PairExists",
    "PairRecord",
    "ProgressRecord",
    "StateChange",
]

DB_FILENAME = "coordinator.db"
SCHEMA_VERSION = 3

#: The pairs table of the current schema (version 2: the data identity, the
#: failover settings, and 'split_brain' accepted by the state CHECK).
_PAIRS_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    name                   TEXT PRIMARY KEY,
    size_bytes             INTEGER NOT NULL,
    block_size             INTEGER NOT NULL,
    primary_address        TEXT NOT NULL,
    secondary_address      TEXT NOT NULL,
    epoch                  INTEGER NOT NULL,
    state                  TEXT NOT NULL CHECK (state IN ('in_sync', 'degraded', 'resyncing', 'split_brain')),
    fault_snapshot_id      INTEGER NOT NULL,
    resync_mode            INTEGER NOT NULL,
    resync_bytes_done      INTEGER NOT NULL,
    resync_bytes_total     INTEGER NOT NULL,
    resync_rate_bytes_per_s REAL NOT NULL,
    resync_eta_s           REAL NOT NULL,
    resync_round           INTEGER NOT NULL,
    last_error             TEXT NOT NULL,
    state_changed_at       REAL NOT NULL,
    created_at             REAL NOT NULL,
    volume_uuid            TEXT NOT NULL DEFAULT '',
    generation             INTEGER NOT NULL DEFAULT 0,  -- the primary's current, as last reported (uint64)
    secondary_generation   INTEGER NOT NULL DEFAULT 0,  -- the secondary's current, as last reported (uint64)
    auto_failover          INTEGER NOT NULL DEFAULT 0,
    full_copy_pending      INTEGER NOT NULL DEFAULT 0,
    revert_generation      INTEGER NOT NULL DEFAULT 0   -- see PairRecord.revert_generation (uint64)
)"""

#: Version 3: per-volume grants (a user is a client certificate's CN).
_GRANTS_TABLE = """
CREATE TABLE IF NOT EXISTS grants (
    volume     TEXT NOT NULL REFERENCES pairs(name) ON DELETE CASCADE,
    user       TEXT NOT NULL,
    read_only  INTEGER NOT NULL,
    granted_at REAL NOT NULL,
    PRIMARY KEY (volume, user)
) WITHOUT ROWID"""

#: Version 1's columns of the pairs table, copied as they are by the migration.
_V1_PAIR_COLUMNS = (
    "name, size_bytes, block_size, primary_address, secondary_address, epoch, state, "
    "fault_snapshot_id, resync_mode, resync_bytes_done, resync_bytes_total, "
    "resync_rate_bytes_per_s, resync_eta_s, resync_round, last_error, state_changed_at, created_at"
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    address       TEXT PRIMARY KEY,
    role_hint     TEXT NOT NULL,
    registered_at REAL NOT NULL
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
""" + _PAIRS_TABLE.format(name="pairs") + ";" + _GRANTS_TABLE

_I64_MAX = 2**63 - 1


def _u64_to_db(v: int) -> int:
    """uint64 -> SQLite's signed 64-bit INTEGER (two's complement)."""
    if not 0 <= v < 2**64:
        raise ValueError(f"value {v} is not a uint64")
    return v - 2**64 if v > _I64_MAX else v


def _u64_from_db(v: int) -> int:
    return v + 2**64 if v < 0 else v


class DBError(Exception):
    """A coordinator database problem a person has to look at."""


class PairExists(DBError):
    def __init__(self, name: str) -> None:
        super().__init__(f"volume {name!r} already exists")
        self.name = name


@dataclass(frozen=True)
class NodeRecord:
    address: str
    role_hint: str
    registered_at: float


#: Resync progress as last reported by the primary: the core's value type, stored as is.
ProgressRecord = Progress


@dataclass(frozen=True)
class PairRecord:
    """One volume pair, as persisted. Immutable: change it with ``dataclasses.replace``."""

    name: str
    size_bytes: int
    block_size: int
    primary: str
    secondary: str
    epoch: int = 1
    state: PairState = PairState.IN_SYNC
    failed_extents: tuple[Extent, ...] = ()
    fault_snapshot_id: int = 0
    resync_mode: int = 0  # syncrep.v1.ResyncMode value
    progress: ProgressRecord = field(default_factory=ProgressRecord)
    last_error: str = ""
    state_changed_at: float = 0.0
    created_at: float = 0.0
    #: The pair's UUID (issued at CreateVolume; "" for a pair created before version 2).
    volume_uuid: str = ""
    #: The primary's current generation as last reported (at creation: the initial one).
    generation: int = 0
    #: The secondary's current generation as last reported (0: no data / unknown).
    secondary_generation: int = 0
    #: Promote the secondary automatically when the primary is lost (in sync only).
    auto_failover: bool = False
    #: The secondary is being rebuilt: its next resync is a full copy.
    full_copy_pending: bool = False
    #: After an unforced promotion: the new primary's generation at the
    #: promotion point, which the old primary reverts to when it is demoted
    #: (VolumeAssignment.revert_to_generation). 0 = none. Cleared when the
    #: pair is back in sync.
    revert_generation: int = 0

    @property
    def failed_bytes(self) -> int:
        return sum(e.length for e in self.failed_extents)

    def role_of(self, address: str) -> str | None:
        if address == self.primary:
            return "primary"
        if address == self.secondary:
            return "secondary"
        return None

    def peer_of(self, address: str) -> str:
        return self.secondary if address == self.primary else self.primary


@dataclass(frozen=True)
class GrantRecord:
    """``user`` may read ``volume`` and, unless ``read_only``, write it."""

    volume: str
    user: str
    read_only: bool
    granted_at: float = 0.0


@dataclass(frozen=True)
class StateChange:
    """The event recorded with a pair update: ``from_state`` -> the pair's new state."""

    from_state: PairState | None
    reason: str


@dataclass(frozen=True)
class EventRecord:
    id: int
    ts: float
    volume: str
    from_state: PairState | None
    to_state: PairState | None
    epoch: int
    reason: str


class CoordinatorDB:
    """The coordinator's SQLite database at ``path`` (created if missing)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode; transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
        self._conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=10.0)
        self._conn.row_factory = sqlite3.Row
        try:
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise DBError(f"coordinator database {self.path}: cannot enable WAL (journal_mode is {mode})")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._init_schema()
        except sqlite3.Error as e:
            self._conn.close()
            raise DBError(f"cannot open coordinator database {self.path}: {e}") from e
        except DBError:
            self._conn.close()
            raise

    # ------------------------------------------------------------ plumbing

    def _init_schema(self) -> None:
        # Foreign keys off while the schema is created or migrated: rebuilding
        # the pairs table drops it, and with them on that would cascade into
        # failed_extents. (The pragma is a no-op inside a transaction.)
        self._conn.execute("PRAGMA foreign_keys=OFF")
        with self._tx() as c:
            c.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = None if row is None else int(row["value"])
            if version is not None and version > SCHEMA_VERSION:
                raise DBError(
                    f"coordinator database {self.path} has schema version {version}, this coordinator "
                    f"understands versions up to {SCHEMA_VERSION}; run a newer coordinator on it"
                )
            if version == 1:
                self._migrate_v1_to_v2(c)
                version = 2
            if version == 2:
                self._migrate_v2_to_v3(c)
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    c.execute(stmt)
            c.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )
            problems = c.execute("PRAGMA foreign_key_check").fetchall()
            if problems:
                raise DBError(
                    f"coordinator database {self.path}: {len(problems)} rows violate foreign keys "
                    f"after the schema migration (first: {tuple(problems[0])}); restore a backup"
                )
        self._conn.execute("PRAGMA foreign_keys=ON")

    @staticmethod
    def _migrate_v1_to_v2(c: sqlite3.Connection) -> None:
        """Version 1 -> 2: the pairs table rebuilt (its state CHECK must accept
        'split_brain', which ALTER TABLE cannot change), with the new columns at
        their defaults: no volume UUID, generations unknown (0), no auto-failover."""
        c.execute(_PAIRS_TABLE.format(name="pairs_v2"))
        c.execute(f"INSERT INTO pairs_v2 ({_V1_PAIR_COLUMNS}) SELECT {_V1_PAIR_COLUMNS} FROM pairs")
        c.execute("DROP TABLE pairs")
        c.execute("ALTER TABLE pairs_v2 RENAME TO pairs")

    @staticmethod
    def _migrate_v2_to_v3(c: sqlite3.Connection) -> None:
        """Version 2 -> 3: the grants table, empty (before it, only admin --
        or everyone, with --insecure -- could use a volume, so nobody held a
        grant to carry over)."""
        c.execute(_GRANTS_TABLE)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            yield c
        except BaseException:
            c.execute("ROLLBACK")
            raise
        else:
            c.execute("COMMIT")

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> CoordinatorDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ nodes

    def upsert_node(self, address: str, role_hint: str, registered_at: float | None = None) -> NodeRecord:
        """Insert or update a node; ``registered_at`` is the latest registration."""
        ts = time.time() if registered_at is None else registered_at
        with self._tx() as c:
            c.execute(
                "INSERT INTO nodes (address, role_hint, registered_at) VALUES (?, ?, ?) "
                "ON CONFLICT(address) DO UPDATE SET role_hint = excluded.role_hint, "
                "registered_at = excluded.registered_at",
                (address, role_hint, ts),
            )
        return NodeRecord(address, role_hint, ts)

    def get_node(self, address: str) -> NodeRecord | None:
        row = self._conn.execute(
            "SELECT address, role_hint, registered_at FROM nodes WHERE address = ?", (address,)
        ).fetchone()
        return None if row is None else NodeRecord(row["address"], row["role_hint"], row["registered_at"])

    def list_nodes(self) -> list[NodeRecord]:
        rows = self._conn.execute("SELECT address, role_hint, registered_at FROM nodes ORDER BY address")
        return [NodeRecord(r["address"], r["role_hint"], r["registered_at"]) for r in rows]

    # ------------------------------------------------------------ pairs

    def create_pair(self, pair: PairRecord, reason: str, at: float | None = None) -> PairRecord:
        """Insert a new pair (and its creation event, at wall-clock time ``at``,
        default now). PairExists if the name is taken."""
        now = time.time() if at is None else at
        pair = replace(
            pair,
            created_at=pair.created_at or now,
            state_changed_at=pair.state_changed_at or now,
        )
        try:
            with self._tx() as c:
                c.execute(
                    "INSERT INTO pairs (name, size_bytes, block_size, primary_address, secondary_address, "
                    "epoch, state, fault_snapshot_id, resync_mode, resync_bytes_done, resync_bytes_total, "
                    "resync_rate_bytes_per_s, resync_eta_s, resync_round, last_error, state_changed_at, "
                    "volume_uuid, generation, secondary_generation, auto_failover, full_copy_pending, "
                    "revert_generation, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        pair.name,
                        pair.size_bytes,
                        pair.block_size,
                        pair.primary,
                        pair.secondary,
                        *self._mutable_values(pair),
                        pair.created_at,
                    ),
                )
                self._write_extents(c, pair.name, pair.failed_extents)
                self._write_event(c, now, pair.name, None, pair.state, pair.epoch, reason)
        except sqlite3.IntegrityError as e:
            if "UNIQUE" in str(e) or "PRIMARY KEY" in str(e):
                raise PairExists(pair.name) from None
            raise
        return pair

    def save_pair(
        self, pair: PairRecord, change: StateChange | None = None, at: float | None = None
    ) -> PairRecord:
        """Write every mutable field of ``pair`` and its failed extents; with
        ``change``, record the event ``change.from_state -> pair.state`` (at
        wall-clock time ``at``, default now) in the same transaction. Returns
        the pair as saved. KeyError if it does not exist.
        """
        with self._tx() as c:
            cur = c.execute(
                "UPDATE pairs SET epoch = ?, state = ?, fault_snapshot_id = ?, resync_mode = ?, "
                "resync_bytes_done = ?, resync_bytes_total = ?, resync_rate_bytes_per_s = ?, "
                "resync_eta_s = ?, resync_round = ?, last_error = ?, state_changed_at = ?, "
                "volume_uuid = ?, generation = ?, secondary_generation = ?, auto_failover = ?, "
                "full_copy_pending = ?, revert_generation = ?, primary_address = ?, secondary_address = ? "
                "WHERE name = ?",
                (*self._mutable_values(pair), pair.primary, pair.secondary, pair.name),
            )
            if cur.rowcount != 1:
                raise KeyError(f"volume {pair.name!r} does not exist")
            c.execute("DELETE FROM failed_extents WHERE volume = ?", (pair.name,))
            self._write_extents(c, pair.name, pair.failed_extents)
            if change is not None:
                self._write_event(
                    c,
                    time.time() if at is None else at,
                    pair.name,
                    change.from_state,
                    pair.state,
                    pair.epoch,
                    change.reason,
                )
        return pair

    def update_progress(self, name: str, progress: ProgressRecord) -> None:
        """Persist resync progress only (frequent; touches no other field)."""
        with self._tx() as c:
            c.execute(
                "UPDATE pairs SET resync_bytes_done = ?, resync_bytes_total = ?, "
                "resync_rate_bytes_per_s = ?, resync_eta_s = ?, resync_round = ? WHERE name = ?",
                (*self._progress_values(progress), name),
            )

    def delete_pair(self, name: str, reason: str, at: float | None = None) -> bool:
        """Delete a pair and its failed extents; record the deletion event (at
        wall-clock time ``at``, default now). False if absent."""
        with self._tx() as c:
            row = c.execute("SELECT state, epoch FROM pairs WHERE name = ?", (name,)).fetchone()
            if row is None:
                return False
            c.execute("DELETE FROM failed_extents WHERE volume = ?", (name,))
            # Its grants go with it: a volume created later under the same
            # name starts with none (nobody inherits access to new data).
            c.execute("DELETE FROM grants WHERE volume = ?", (name,))
            c.execute("DELETE FROM pairs WHERE name = ?", (name,))
            ts = time.time() if at is None else at
            self._write_event(c, ts, name, PairState(row["state"]), None, row["epoch"], reason)
        return True

    def resize_pair(self, name: str, size_bytes: int, reason: str, at: float | None = None) -> PairRecord:
        """Issue 13: persist a pair's new (larger) size and its event, in one
        transaction (the only change of a pair's geometry: ``save_pair`` leaves
        size and block size as created). Returns the pair as saved; KeyError
        if it does not exist."""
        with self._tx() as c:
            row = c.execute("SELECT state, epoch FROM pairs WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise KeyError(f"volume {name!r} does not exist")
            c.execute("UPDATE pairs SET size_bytes = ? WHERE name = ?", (size_bytes, name))
            state = PairState(row["state"])
            self._write_event(c, time.time() if at is None else at, name, state, state, row["epoch"], reason)
        pair = self.get_pair(name)
        assert pair is not None
        return pair

    def get_pair(self, name: str) -> PairRecord | None:
        row = self._conn.execute("SELECT * FROM pairs WHERE name = ?", (name,)).fetchone()
        return None if row is None else self._pair_from_row(row)

    def list_pairs(self) -> list[PairRecord]:
        return [self._pair_from_row(r) for r in self._conn.execute("SELECT * FROM pairs ORDER BY name")]

    def pairs_for_node(self, address: str) -> list[PairRecord]:
        rows = self._conn.execute(
            "SELECT * FROM pairs WHERE primary_address = ? OR secondary_address = ? ORDER BY name",
            (address, address),
        )
        return [self._pair_from_row(r) for r in rows]

    # ------------------------------------------------------------ grants

    def set_grant(self, volume: str, user: str, read_only: bool, at: float | None = None) -> GrantRecord | None:
        """Grant ``user`` access to ``volume`` (replacing a grant it had).
        Returns the grant it had before, or None. KeyError if the volume does not exist."""
        ts = time.time() if at is None else at
        with self._tx() as c:
            if c.execute("SELECT 1 FROM pairs WHERE name = ?", (volume,)).fetchone() is None:
                raise KeyError(f"volume {volume!r} does not exist")
            row = c.execute(
                "SELECT volume, user, read_only, granted_at FROM grants WHERE volume = ? AND user = ?",
                (volume, user),
            ).fetchone()
            c.execute(
                "INSERT INTO grants (volume, user, read_only, granted_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(volume, user) DO UPDATE SET read_only = excluded.read_only, "
                "granted_at = excluded.granted_at",
                (volume, user, int(read_only), ts),
            )
        return None if row is None else self._grant_from_row(row)

    def delete_grant(self, volume: str, user: str) -> GrantRecord | None:
        """Revoke ``user``'s grant on ``volume``; returns it, or None if there was none."""
        with self._tx() as c:
            row = c.execute(
                "SELECT volume, user, read_only, granted_at FROM grants WHERE volume = ? AND user = ?",
                (volume, user),
            ).fetchone()
            c.execute("DELETE FROM grants WHERE volume = ? AND user = ?", (volume, user))
        return None if row is None else self._grant_from_row(row)

    def list_grants(self, volume: str | None = None) -> list[GrantRecord]:
        """Every grant (of ``volume`` if given), by volume then user."""
        sql = "SELECT volume, user, read_only, granted_at FROM grants"
        args: tuple[Any, ...] = ()
        if volume is not None:
            sql += " WHERE volume = ?"
            args = (volume,)
        return [self._grant_from_row(r) for r in self._conn.execute(sql + " ORDER BY volume, user", args)]

    @staticmethod
    def _grant_from_row(r: sqlite3.Row) -> GrantRecord:
        return GrantRecord(r["volume"], r["user"], bool(r["read_only"]), r["granted_at"])

    # ------------------------------------------------------------ events

    def events(self, volume: str | None = None, limit: int | None = None) -> list[EventRecord]:
        """State-change events, oldest first (the newest ``limit`` if given)."""
        sql = "SELECT * FROM events"
        args: list[Any] = []
        if volume is not None:
            sql += " WHERE volume = ?"
            args.append(volume)
        sql += " ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        rows = list(self._conn.execute(sql, args))
        rows.reverse()
        return [
            EventRecord(
                id=r["id"],
                ts=r["ts"],
                volume=r["volume"],
                from_state=None if r["from_state"] is None else PairState(r["from_state"]),
                to_state=None if r["to_state"] is None else PairState(r["to_state"]),
                epoch=r["epoch"],
                reason=r["reason"],
            )
            for r in rows
        ]

    def resync_started_at_epoch(self, volume: str, epoch: int) -> bool:
        """True if a transition into ``resyncing`` was recorded for ``volume`` at ``epoch``."""
        row = self._conn.execute(
            "SELECT 1 FROM events WHERE volume = ? AND epoch = ? AND to_state = 'resyncing' "
            "AND (from_state IS NULL OR from_state != 'resyncing') LIMIT 1",
            (volume, epoch),
        ).fetchone()
        return row is not None

    # ------------------------------------------------------------ helpers

    @staticmethod
    def _progress_values(p: ProgressRecord) -> tuple[int, int, float, float, int]:
        return (p.bytes_done, p.bytes_total, p.rate_bytes_per_s, p.eta_s, p.round)

    def _mutable_values(self, pair: PairRecord) -> tuple[Any, ...]:
        return (
            pair.epoch,
            PairState(pair.state).value,
            _u64_to_db(pair.fault_snapshot_id),
            pair.resync_mode,
            *self._progress_values(pair.progress),
            pair.last_error,
            pair.state_changed_at,
            pair.volume_uuid,
            _u64_to_db(pair.generation),
            _u64_to_db(pair.secondary_generation),
            int(pair.auto_failover),
            int(pair.full_copy_pending),
            _u64_to_db(pair.revert_generation),
        )

    @staticmethod
    def _write_extents(c: sqlite3.Connection, name: str, extents: Iterable[Extent]) -> None:
        c.executemany(
            "INSERT INTO failed_extents (volume, offset, length) VALUES (?, ?, ?)",
            ((name, e.offset, e.length) for e in extents),
        )

    @staticmethod
    def _write_event(
        c: sqlite3.Connection,
        ts: float,
        volume: str,
        from_state: PairState | None,
        to_state: PairState | None,
        epoch: int,
        reason: str,
    ) -> None:
        c.execute(
            "INSERT INTO events (ts, volume, from_state, to_state, epoch, reason) VALUES (?, ?, ?, ?, ?, ?)",
            (
                ts,
                volume,
                None if from_state is None else PairState(from_state).value,
                None if to_state is None else PairState(to_state).value,
                epoch,
                reason,
            ),
        )

    def _pair_from_row(self, r: sqlite3.Row) -> PairRecord:
        extents = tuple(
            Extent(e["offset"], e["length"])
            for e in self._conn.execute(
                "SELECT offset, length FROM failed_extents WHERE volume = ? ORDER BY offset", (r["name"],)
            )
        )
        return PairRecord(
            name=r["name"],
            size_bytes=r["size_bytes"],
            block_size=r["block_size"],
            primary=r["primary_address"],
            secondary=r["secondary_address"],
            epoch=r["epoch"],
            state=PairState(r["state"]),
            failed_extents=extents,
            fault_snapshot_id=_u64_from_db(r["fault_snapshot_id"]),
            resync_mode=r["resync_mode"],
            progress=ProgressRecord(
                bytes_done=r["resync_bytes_done"],
                bytes_total=r["resync_bytes_total"],
                rate_bytes_per_s=r["resync_rate_bytes_per_s"],
                eta_s=r["resync_eta_s"],
                round=r["resync_round"],
            ),
            last_error=r["last_error"],
            state_changed_at=r["state_changed_at"],
            created_at=r["created_at"],
            volume_uuid=r["volume_uuid"],
            generation=_u64_from_db(r["generation"]),
            secondary_generation=_u64_from_db(r["secondary_generation"]),
            auto_failover=bool(r["auto_failover"]),
            full_copy_pending=bool(r["full_copy_pending"]),
            revert_generation=_u64_from_db(r["revert_generation"]),
        )
