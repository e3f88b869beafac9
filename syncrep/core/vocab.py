"""The pair's vocabulary: one place for every name the roles must agree on.

Why one module: the primary, the secondary, the coordinator and the tools all
read and write the same metadata keys and snapshot names, and compare the same
resync modes and round kinds. When each spelled them itself, a rename in one
place silently broke another (a snapshot the cleanup no longer recognised is a
snapshot that costs copy-on-write forever). Everything here is data or a pure
function; this module imports only the standard library.

Contents:

* metadata keys of the pair record (primary), of the node's role record, of
  the resync plan and of the secondary's resync progress;
* snapshot-name builders and the prefixes that recognise them;
* ``ResyncMode`` and ``RoundKind`` as enums (their values are the strings
  persisted in plans and sent in stream headers: they never change);
* ``parse_address``, the one parser of ``host:port``;
* the product limits (``MAX_WRITE_BYTES``).
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Final

__all__ = [
    "COMMON_PREFIX",
    "FAULT_PREFIX",
    "MAX_WRITE_BYTES",
    "META_AL",
    "META_CLEAN",
    "META_FAILED",
    "META_FAULT_SNAP",
    "META_LAST_ERROR",
    "META_NODE_DIVERGENT",
    "META_NODE_EPOCH",
    "META_NODE_PEER",
    "META_NODE_PROMOTE_PENDING",
    "META_NODE_RESYNC_MODE",
    "META_NODE_ROLE",
    "META_RESYNC_PLAN",
    "META_ROLLBACK_TO",
    "META_SECONDARY_RESYNC",
    "META_STATE",
    "PRE_RESYNC_PREFIX",
    "RESYNC_PREFIX",
    "ResyncMode",
    "RoundKind",
    "common_snapshot_name",
    "fault_snapshot_name",
    "parse_address",
    "parse_address_list",
    "pre_resync_snapshot_name",
    "resync_final_snapshot_name",
    "resync_snapshot_name",
    "validate_dial_address",
]

# ---------------------------------------------------------------- limits

#: The largest single write (and read) a client may send. The gRPC message
#: limit (``syncrep.rpc.MAX_MESSAGE_BYTES``) leaves room above it for framing;
#: ``tests/test_vocab.py`` checks that the two agree.
MAX_WRITE_BYTES: Final = 4 * 1024 * 1024

# ---------------------------------------------------------------- metadata keys
# The primary's pair record (see docs/PAIR.md for what each field means).
META_STATE: Final = "pair.state"
META_FAILED: Final = "pair.failed_extents"
META_FAULT_SNAP: Final = "pair.fault_snapshot_id"
META_LAST_ERROR: Final = "pair.last_error"
#: "1" only after a graceful stop. A primary that finds "0" while in sync
#: crashed with writes possibly in flight: failure information is missing.
META_CLEAN: Final = "pair.clean"
#: Name of the common snapshot both sides roll back to when failure
#: information was lost and no activity log exists.
META_ROLLBACK_TO: Final = "pair.rollback_to"
#: The activity log: regions that may differ after a crash.
META_AL: Final = "pair.activity_log"
#: The primary's resync plan (``syncrep.core.resync_plan.ResyncPlan`` as JSON).
META_RESYNC_PLAN: Final = "resync.plan"
#: The secondary's resync progress (which resync, which round, which chunk).
META_SECONDARY_RESYNC: Final = "secondary.resync"
# The node's role record for a volume (both roles).
META_NODE_ROLE: Final = "node.role"
META_NODE_EPOCH: Final = "node.epoch"
META_NODE_PEER: Final = "node.peer"
META_NODE_RESYNC_MODE: Final = "node.resync_mode"
# Set with the role change that promotes this replica (secondary -> primary),
# cleared in the transaction that persists the promoted primary's first record
# (docs/FAILOVER.md): a crash in between redoes the promotion at startup.
META_NODE_PROMOTE_PENDING: Final = "node.promote_pending"
# A demoted primary's divergent extents (JSON [[offset, length], ...]): where
# its writes may have reached only this replica. Cleared when it adopts the
# primary's identity at the end of a resync.
META_NODE_DIVERGENT: Final = "node.divergent_extents"

# ---------------------------------------------------------------- snapshot names
#: Periodic common snapshots, cut at the same seq on both nodes.
COMMON_PREFIX: Final = "common-"
#: Fault-recovery snapshots (F of the method).
FAULT_PREFIX: Final = "fault-"
#: Diff snapshots a resync creates on the primary (deleted when in sync).
RESYNC_PREFIX: Final = "resync-"
#: The secondary's rollback point while a resync is applied.
PRE_RESYNC_PREFIX: Final = "pre-resync-"


def fault_snapshot_name(cause: str, now_ms: int) -> str:
    """F of the method. ``cause`` says why: ``e<epoch>`` (the secondary failed at
    that epoch), ``al`` (crash while in sync, activity log), ``full`` (crash
    while in sync, no log and no common snapshot)."""
    return f"{FAULT_PREFIX}{cause}-{now_ms}"


def resync_snapshot_name(resync_id: str, tag: str) -> str:
    """A diff snapshot of resync ``resync_id``: ``d0``, ``d1``, ``d2``, ``r<k>``."""
    return f"{RESYNC_PREFIX}{resync_id}-{tag}"


def resync_final_snapshot_name(resync_id: str, round_no: int) -> str:
    """The final round's snapshot. One name per attempt: an interrupted final
    round is resumed as an ordinary round, and the next final round needs a
    snapshot of its own."""
    return f"{RESYNC_PREFIX}{resync_id}-final-r{round_no}"


def pre_resync_snapshot_name(resync_id: str) -> str:
    return f"{PRE_RESYNC_PREFIX}{resync_id}"


def common_snapshot_name(now_ms: int) -> str:
    return f"{COMMON_PREFIX}{now_ms}"


# ---------------------------------------------------------------- enums


class ResyncMode(StrEnum):
    """How a resync brings the failed extents across (see docs/METHOD.md)."""

    REWRITE = "rewrite"  # variant A
    DIRECT = "direct"  # variant B (the default)
    REPAIR = "repair"  # verify --repair: one round of named extents

    @classmethod
    def from_proto(cls, value: int) -> ResyncMode:
        """``syncrep.v1.ResyncMode`` -> mode. REWRITE (1) is variant A; anything
        else (DIRECT = 2, or unspecified) is the default, variant B."""
        return cls.REWRITE if int(value) == 1 else cls.DIRECT

    @property
    def variant(self) -> str:
        return {ResyncMode.REWRITE: "A (rewrite)", ResyncMode.DIRECT: "B (direct)"}.get(self, self.value)


class RoundKind(StrEnum):
    """What one resync round sends."""

    EXTENTS = "extents"  # the failed extents, read at a snapshot (variant B round 0)
    DIFF = "diff"  # diff(base, target) between two snapshots
    REPAIR = "repair"  # named extents read from the live head (verify --repair)


# ---------------------------------------------------------------- addresses

_HOST_RE = re.compile(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+")


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) -> (host, port).

    Raises ValueError, with a message a person can act on, when malformed.
    Port 0 is accepted here (a listen address may ask for any port); use
    ``validate_dial_address`` for addresses other processes must dial.
    """
    host, sep, port_s = text.strip().rpartition(":")
    if not sep or not host or not port_s.isdigit():
        raise ValueError(f"invalid address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:7001")
    port = int(port_s)
    if port > 65535:
        raise ValueError(f"invalid address {text!r}: port must be 0..65535")
    return host, port


def validate_dial_address(address: str) -> str | None:
    """None if ``address`` is a ``host:port`` another process can dial (a plain
    host name or IP, port 1..65535), else what is wrong with it."""
    host, sep, port_s = address.rpartition(":")
    if not sep or _HOST_RE.fullmatch(host) is None or not port_s.isdigit() or len(port_s) > 5:
        return f"address {address!r} is not of the form host:port (e.g. 127.0.0.1:7001)"
    port = int(port_s)
    if not 1 <= port <= 65535:
        return f"address {address!r} has port {port}, outside 1..65535 (expected host:port)"
    return None


def parse_address_list(text: str) -> list[str]:
    """``"A,B,C"`` (``--coordinator A,B,C``, issue 12) -> the dialable
    ``host:port`` addresses in order; one address is a list of one.

    Raises ValueError naming the bad entry (empty, not host:port, port 0,
    listed twice)."""
    out: list[str] = []
    for part in text.split(","):
        address = part.strip()
        if not address:
            raise ValueError(f"address list {text!r} has an empty entry (expected HOST:PORT[,HOST:PORT...])")
        problem = validate_dial_address(address)
        if problem is not None:
            raise ValueError(f"address list {text!r}: {problem}")
        if address in out:
            raise ValueError(f"address list {text!r} names {address} twice")
        out.append(address)
    return out
