"""The ``syncrep`` command line.

Servers::

    syncrep coordinator --listen HOST:PORT --data-dir DIR
    syncrep primary     --listen HOST:PORT --data-dir DIR --coordinator HOST:PORT [--advertise HOST:PORT]
    syncrep secondary   --listen HOST:PORT --data-dir DIR --coordinator HOST:PORT [--advertise HOST:PORT]

Clients::

    syncrep volume create NAME --size 64MiB --primary A --secondary B --coordinator C
    syncrep write NAME --offset 0 --coordinator C [--input FILE]
    syncrep read NAME --offset 0 --length 1MiB --coordinator C [--output FILE]
    syncrep status --coordinator C [--json]
    syncrep promote NAME --coordinator C [--force]
    syncrep switchover NAME --coordinator C [--handover-timeout-s S]
    syncrep verify NAME --coordinator C [--repair] [--chunk-bytes SIZE] [--json]
    syncrep demo [--workdir DIR] [--keep]

Errors print one line to stderr (``syncrep: error: <what> (<grpc code>)``) and
exit non-zero; logs go to stderr with a timestamp and the process role.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

import grpc

from syncrep import __version__
from syncrep.client import (
    RESYNC_MODES,
    ClientError,
    VolumeClient,
    create_volume,
    list_volumes,
    promote,
    switchover,
    volume_status_dict,
)
from syncrep.config import NodeOptions
from syncrep.core.vocab import MAX_WRITE_BYTES, parse_address
from syncrep.nbd.server import nbd_listen_type
from syncrep.units import format_size, parse_size
from syncrep.verify import RepairError, VerifyError, VerifyResult, verify_volume

log = logging.getLogger("syncrep.cli")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
#: ``syncrep verify``: the replicas differ (errors exit with EXIT_USAGE = 2).
EXIT_DIFFER = 1
#: ``syncrep verify``: mismatching extents listed before "... and K more".
VERIFY_SHOW_EXTENTS = 10


class CliError(Exception):
    """An error to show the user as one line (no traceback)."""


# ---------------------------------------------------------------- argument types


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_size(text: str) -> int:
    n = _size(text)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be greater than 0")
    return n


def _rate(text: str) -> int:
    """A size per second: ``100MiB``, ``100MiB/s`` or ``0`` (unlimited)."""
    t = text.strip()
    if t.lower().endswith("/s"):
        t = t[:-2]
    try:
        return parse_size(t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid rate {text!r}: expected a size per second such as 100MiB or 100MiB/s (0 = unlimited)"
        ) from None


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: expected a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: must be at least 1")
    return n


def _seconds(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: expected seconds, e.g. 0.5") from None
    if s < 0 or s != s:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be >= 0")
    return s


def _positive_seconds(text: str) -> float:
    s = _seconds(text)
    if s <= 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be > 0")
    return s


# The one address parser lives in the core vocabulary.
split_address = parse_address


def _listen_address(text: str) -> str:
    try:
        split_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.strip()


def _dial_address(text: str) -> str:
    try:
        _, port = split_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if port == 0:
        raise argparse.ArgumentTypeError(f"invalid address {text!r}: port 0 cannot be dialled")
    return text.strip()


_WILDCARD_HOSTS = {"0.0.0.0", "::", "[::]", "*", ""}


def check_advertise(address: str, *, flag: str = "--advertise") -> str:
    """Reject addresses other processes cannot dial (wildcard host, port 0)."""
    host, port = split_address(address)
    if host in _WILDCARD_HOSTS:
        raise CliError(
            f"{flag} {address}: a wildcard address cannot be dialled by other processes; "
            "pass --advertise with this host's reachable address, e.g. --advertise 10.0.0.5:7001"
        )
    if port == 0:
        raise CliError(
            f"{flag} {address}: port 0 cannot be advertised; listen on a fixed port "
            "or pass --advertise HOST:PORT"
        )
    return address


def size_text(n: int) -> str:
    """An exact, parse_size-compatible spelling of ``n`` bytes (for defaults)."""
    for suffix, unit in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


# ---------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``syncrep: error: <message>``."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"syncrep: error: {message} (see '{self.prog} --help')\n")
        sys.exit(EXIT_USAGE)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps description line breaks; appends "(default: X)" to every optional
    flag that has a meaningful default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "%(default)" in text
            or "default:" in text
            or action.default is None
            or action.default is argparse.SUPPRESS
            or isinstance(action.default, bool)
            or action.required
            or not action.option_strings
            or isinstance(action, argparse._HelpAction | argparse._VersionAction)
        ):
            return text
        return text + " (default: %(default)s)"


@dataclass(frozen=True)
class _NodeFlag:
    field: str
    flag: str
    help: str
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    is_switch: bool = False
    is_size: bool = False


_D = NodeOptions()

#: One flag per NodeOptions field (tests check that none is missing).
NODE_FLAGS: tuple[_NodeFlag, ...] = (
    _NodeFlag("durability", "--durability",
              "when a write counts as done: 'sync' = durable (fdatasync, group commit) on both nodes; "
              "'os' = in the page cache only (benchmarking; a power loss can lose acknowledged writes)",
              choices=("sync", "os")),
    _NodeFlag("ack_timeout_s", "--ack-timeout-s",
              "seconds without an ack from the secondary before it is declared failed and the pair "
              "goes degraded", type=_positive_seconds),
    _NodeFlag("on_secondary_failure", "--on-secondary-failure",
              "what the primary does with client writes while degraded: 'continue' accepts them and "
              "tracks them for resync; 'block' fails them with UNAVAILABLE", choices=("continue", "block")),
    _NodeFlag("on_quorum_loss", "--on-quorum-loss",
              "what the primary does with writes its secondary does not get while it holds no lease "
              "from the coordinator (it can reach neither): 'suspend' makes them wait for a lease up "
              "to --quorum-loss-timeout-s, then fail with UNAVAILABLE (EIO over NBD); 'io-error' "
              "fails them at once", choices=("suspend", "io-error")),
    _NodeFlag("quorum_loss_timeout_s", "--quorum-loss-timeout-s",
              "with --on-quorum-loss suspend: seconds a write waits for a lease before it fails",
              type=_positive_seconds),
    _NodeFlag("window_writes", "--window-writes",
              "replication window: most writes sent to the secondary but not yet acked", type=_positive_int),
    _NodeFlag("window_bytes", "--window-bytes",
              "replication window: most bytes sent to the secondary but not yet acked (size, e.g. 32MiB)",
              type=_positive_size, is_size=True),
    _NodeFlag("batch_max_writes", "--batch-max-writes",
              "group commit: most writes in one replicated batch", type=_positive_int),
    _NodeFlag("batch_max_bytes", "--batch-max-bytes",
              "group commit: most bytes in one replicated batch (size)", type=_positive_size, is_size=True),
    _NodeFlag("queue_writes", "--queue-writes",
              "client writes queued per volume beyond the replication window", type=_positive_int),
    _NodeFlag("connect_timeout_s", "--connect-timeout-s",
              "seconds allowed for one connection attempt to the secondary", type=_positive_seconds),
    _NodeFlag("connect_attempts", "--connect-attempts",
              "connection attempts to the secondary (exponential backoff) before giving up",
              type=_positive_int),
    _NodeFlag("enable_fault_injection", "--enable-fault-injection",
              "accept NodeService.InjectFault test hooks (never in production)", is_switch=True),
    _NodeFlag("resync_chunk_bytes", "--resync-chunk-bytes",
              "size of one resync chunk on the wire (size)", type=_positive_size, is_size=True),
    _NodeFlag("resync_max_rate_bytes_per_s", "--resync-max-rate",
              "resync bandwidth cap, a size per second such as 100MiB (0 = unlimited)",
              type=_rate, is_size=True),
    _NodeFlag("diff_delay_s", "--diff-delay-s",
              "resync variant B (direct): seconds to wait before taking the second diff snapshot",
              type=_seconds),
    _NodeFlag("final_diff_threshold_bytes", "--final-diff-threshold-bytes",
              "resync repeats diff rounds until the remaining difference is below this (size), then "
              "briefly quiesces writes for the last round", type=_positive_size, is_size=True),
    _NodeFlag("max_diff_rounds", "--max-diff-rounds",
              "most diff rounds before the final (quiesced) round", type=_positive_int),
    _NodeFlag("snapshot_period_s", "--snapshot-period-s",
              "period of common consistency snapshots on both nodes, in seconds (0 = off)", type=_seconds),
    _NodeFlag("snapshots_keep", "--snapshots-keep",
              "how many periodic snapshots to keep", type=_positive_int),
    _NodeFlag("nbd_listen", "--nbd-listen",
              "serve the node's volumes over NBD on HOST:PORT (or unix:PATH; comma-separated for "
              "several): export VOLUME is read-write on its primary and read-only on its secondary, "
              "VOLUME@SNAPSHOT a read-only snapshot (for qemu-img, nbdcopy, fio, nbd-client; "
              "default: off)", type=nbd_listen_type),
)


def _add_node_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("replication and resync options")
    for f in NODE_FLAGS:
        default = getattr(_D, f.field)
        if f.is_switch:
            g.add_argument(f.flag, dest=f.field, action="store_true", default=default, help=f.help)
        elif f.choices:
            g.add_argument(f.flag, dest=f.field, choices=f.choices, default=default, help=f.help)
        else:
            # Size defaults are spelled like the user would (argparse runs `type`
            # on string defaults), so --help shows 32MiB, not 33554432.
            shown = size_text(default) if f.is_size else default
            assert f.type is not None, f.field
            metavar = "SIZE" if f.is_size else "S" if f.field.endswith("_s") else "N"
            if f.type is _rate:
                metavar = "RATE"
            elif f.type is nbd_listen_type:
                metavar = "HOST:PORT"
            g.add_argument(f.flag, dest=f.field, type=f.type, default=shown, metavar=metavar, help=f.help)


def node_options_from_args(args: argparse.Namespace) -> NodeOptions:
    """Build NodeOptions from parsed ``syncrep primary|secondary`` flags."""
    return NodeOptions(**{f.field: getattr(args, f.field) for f in NODE_FLAGS})


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default=argparse.SUPPRESS,
        help="log verbosity, to stderr (default: INFO)",
    )

    parser = _Parser(
        prog="syncrep",
        description=(
            "syncrep: synchronous block-volume replication over gRPC with snapshot-diff resync.\n\n"
            "Run a coordinator and two nodes (primary, secondary), create a volume pair, then write\n"
            "and read it; every acknowledged write is on both nodes. When the secondary fails the\n"
            "primary carries on, and resync sends only the failed extents and what changed since.\n"
            "Try 'syncrep demo' for a guided tour on a local cluster."
        ),
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"syncrep {__version__}")
    parser.add_argument(
        "--log-level", type=str.upper, choices=LOG_LEVELS, default="INFO", help="log verbosity, to stderr"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help, description=description, parents=[common], formatter_class=_Formatter
        )

    # -- coordinator
    p = add(
        "coordinator",
        "run the coordinator (pair state, epochs, failed extents)",
        "Run the coordinator until SIGTERM/SIGINT. It keeps the node registry and every volume\n"
        "pair's state (in_sync / degraded / resyncing) and epoch, derives failed extents from the\n"
        "primary's failure reports, and starts resync when a failed secondary comes back.",
    )
    p.add_argument("--listen", required=True, type=_listen_address, metavar="HOST:PORT",
                   help="address to serve CoordinatorService on")
    p.add_argument("--data-dir", required=True, type=Path, metavar="DIR",
                   help="directory for the coordinator's durable state (created if missing)")
    p.add_argument("--heartbeat-interval-s", type=_positive_seconds, default=0.5, metavar="S",
                   help="how often nodes send heartbeats, in seconds")
    p.add_argument("--node-timeout-s", type=_positive_seconds, default=3.0, metavar="S",
                   help="a node silent for this long is considered dead")
    p.add_argument("--resync-mode", choices=tuple(RESYNC_MODES), default="direct",
                   help="default resync variant for new volumes: 'rewrite' (method variant A: rewrite "
                        "the failed extents, then send one diff) or 'direct' (variant B: send the failed "
                        "extents directly, then the diff)")
    p.add_argument("--no-auto-resync", dest="auto_resync", action="store_false", default=True,
                   help="do not start resync automatically when a failed secondary returns")
    p.add_argument("--lease-s", type=_positive_seconds, default=4.0, metavar="S",
                   help="how long a primary may write without its secondary after each heartbeat "
                        "reply (its lease); a promotion waits until the old primary's lease expired")
    p.add_argument("--lease-drift-s", type=_seconds, default=0.5, metavar="S",
                   help="margin added to a lease before a promotion, for clock-rate drift between "
                        "the coordinator and the primary")
    p.set_defaults(func=cmd_coordinator, role="coordinator")

    # -- primary / secondary
    for role in ("primary", "secondary"):
        p = add(
            role,
            f"run a node started as {role}",
            f"Run a storage node (started as {role}) until SIGTERM/SIGINT. The node registers with\n"
            "the coordinator, which assigns it volumes; the role it plays for each volume pair is\n"
            "assigned by the coordinator (the command name is only a hint). It serves client writes\n"
            "and reads when primary, replication and resync streams when secondary.",
        )
        p.add_argument("--listen", required=True, type=_listen_address, metavar="HOST:PORT",
                       help="address to serve on (e.g. 127.0.0.1:7001, or 0.0.0.0:7001 with --advertise)")
        p.add_argument("--data-dir", required=True, type=Path, metavar="DIR",
                       help="directory for volume data, snapshots and metadata (created if missing)")
        p.add_argument("--coordinator", required=True, type=_dial_address, metavar="HOST:PORT",
                       help="the coordinator's address")
        p.add_argument("--advertise", type=_listen_address, default=None, metavar="HOST:PORT",
                       help="the address other processes dial to reach this node; it is the node's "
                            "name (default: the --listen address; must not be 0.0.0.0 or port 0)")
        _add_node_flags(p)
        p.set_defaults(func=cmd_node, role=role)

    # -- volume create
    p = add("volume", "manage volume pairs", "Manage replicated volume pairs on the coordinator.")
    vsub = p.add_subparsers(dest="volume_command", metavar="SUBCOMMAND", required=True)
    p = vsub.add_parser(
        "create",
        help="create a volume pair",
        description="Create a volume pair: an empty volume of --size bytes on the primary, replicated\n"
                    "synchronously to the secondary. Both nodes must be running and registered.",
        parents=[common],
        formatter_class=_Formatter,
    )
    p.add_argument("name", metavar="NAME", help="volume name")
    p.add_argument("--size", required=True, type=_positive_size, metavar="SIZE",
                   help="volume size, e.g. 64MiB, 1GiB, 1048576 (a multiple of the block size)")
    p.add_argument("--primary", required=True, type=_dial_address, metavar="HOST:PORT",
                   help="advertise address of the node that takes the primary role")
    p.add_argument("--secondary", required=True, type=_dial_address, metavar="HOST:PORT",
                   help="advertise address of the node that takes the secondary role")
    p.add_argument("--coordinator", required=True, type=_dial_address, metavar="HOST:PORT",
                   help="the coordinator's address")
    p.add_argument("--block-size", type=_positive_size, default="4096", metavar="N",
                   help="block size in bytes (the unit of writes and of change tracking)")
    p.add_argument("--resync-mode", choices=tuple(RESYNC_MODES), default=None,
                   help="resync variant for this volume: 'rewrite' (variant A) or 'direct' (variant B); "
                        "default: the coordinator's --resync-mode")
    p.add_argument("--auto-failover", action="store_true",
                   help="let the coordinator promote the secondary by itself when the primary is lost "
                        "(after the primary's lease expired, and only when the secondary is alive and "
                        "in sync; default: off, promote with 'syncrep promote')")
    p.add_argument("--json", action="store_true", help="print the new volume's status as JSON")
    p.set_defaults(func=cmd_volume_create, role="client")

    # -- write
    p = add(
        "write",
        "write bytes from a file or stdin to a volume",
        "Write the input (a file, or stdin) to volume NAME starting at --offset. The input is\n"
        "sent through the primary's bidirectional Write stream in writes of at most --write-size,\n"
        "with up to --depth writes in flight. Each write returns only when both nodes have it.\n"
        "Offsets and write lengths must be multiples of the volume's block size (see --pad).",
    )
    p.add_argument("name", metavar="NAME", help="volume name")
    p.add_argument("--offset", required=True, type=_size, metavar="N",
                   help="byte offset to write at (size suffixes allowed, e.g. 4KiB)")
    p.add_argument("--coordinator", required=True, type=_dial_address, metavar="HOST:PORT",
                   help="the coordinator's address (used to find the primary)")
    p.add_argument("--input", type=Path, default=None, metavar="FILE", help="read from FILE (default: stdin)")
    p.add_argument("--write-size", type=_positive_size, default="1MiB", metavar="SIZE",
                   help=f"largest single write (at most {size_text(MAX_WRITE_BYTES)})")
    p.add_argument("--depth", type=_positive_int, default=8, metavar="N", help="writes in flight at once")
    p.add_argument("--pad", action="store_true",
                   help="zero-pad the end of the input to a whole number of blocks")
    p.set_defaults(func=cmd_write, role="client")

    # -- read
    p = add(
        "read",
        "read bytes from a volume to a file or stdout",
        "Read --length bytes of volume NAME at --offset from the primary and write the raw bytes\n"
        "to --output (default: stdout).",
    )
    p.add_argument("name", metavar="NAME", help="volume name")
    p.add_argument("--offset", required=True, type=_size, metavar="N", help="byte offset (e.g. 0, 4KiB)")
    p.add_argument("--length", required=True, type=_positive_size, metavar="N",
                   help="number of bytes to read (e.g. 4096, 1MiB)")
    p.add_argument("--coordinator", required=True, type=_dial_address, metavar="HOST:PORT",
                   help="the coordinator's address (used to find the primary)")
    p.add_argument("--output", type=Path, default=None, metavar="FILE", help="write to FILE (default: stdout)")
    p.set_defaults(func=cmd_read, role="client")

    # -- status
    p = add(
        "status",
        "show every volume pair's replication state",
        "Show every volume pair: its state, epoch, which nodes hold the primary and secondary\n"
        "roles now (they change with a promotion) and whether they are alive or hold no data,\n"
        "the primary's data generation (hex), its lease, the bytes the secondary lacks\n"
        "(out of sync), failed extents, and resync progress. --json prints the same as one JSON\n"
        "document.\n\n"
        "States: in_sync (both nodes have every write), degraded (the primary writes alone and\n"
        "tracks the changes), resyncing (the secondary is catching up), primary_lost (the primary\n"
        "is silent; nobody serves the volume: bring it back or 'syncrep promote'), split_brain\n"
        "(both sides wrote without each other after a forced promote; nothing is resynced).",
    )
    p.add_argument("--coordinator", required=True, type=_dial_address, metavar="HOST:PORT",
                   help="the coordinator's address")
    p.add_argument("--json", action="store_true", help="print JSON: {\"volumes\": [...]}")
    p.set_defaults(func=cmd_status, role="client")

    # -- promote
    p = add(
        "promote",
        "make a volume's secondary its primary (failover)",
        "Ask the coordinator to make the secondary of volume NAME its primary, at a new epoch.\n"
        "The old primary, if it comes back, is demoted to secondary and resynced (only what\n"
        "changed, never a full copy).\n\n"
        "The coordinator refuses, and the message says why:\n"
        "  * while the old primary's lease runs (it may still be writing): it says how long to wait;\n"
        "  * when the secondary is not alive, holds no data of the pair, or is not current (the\n"
        "    pair is not in_sync), unless --force.\n\n"
        "--force promotes a secondary that is not current: the writes it lacks (the pair's\n"
        "out-of-sync bytes; mid-resync: everything since its pre-resync rollback point) are lost\n"
        "on the new primary, and if the old primary comes back with them the pair is\n"
        "split_brain. Use it only when the old primary is gone for good.\n\n"
        "Exit status: 0 = promoted; 1 = refused or failed (the reason is on stderr).",
    )
    p.add_argument("name", metavar="NAME", help="volume name")
    p.add_argument("--coordinator", required=True, type=_dial_address, metavar="HOST:PORT",
                   help="the coordinator's address")
    p.add_argument("--force", action="store_true",
                   help="promote even when the secondary is not current (loses the writes it lacks)")
    p.add_argument("--json", action="store_true", help="print the volume's new status as JSON")
    p.set_defaults(func=cmd_promote, role="client")

    # -- switchover
    p = add(
        "switchover",
        "swap a volume's primary and secondary with no data loss (planned)",
        "Ask the coordinator to swap the roles of volume NAME's replicas, at a new epoch, losing\n"
        "no write: the primary closes its quiesce gate (new writes wait, they do not fail),\n"
        "drains (everything is on both nodes), and hands over; the secondary becomes the primary,\n"
        "in sync, and the old primary its secondary. Writes that waited at the gate are refused\n"
        "as 'not its primary' and re-sent by the client to the new primary.\n\n"
        "The coordinator refuses, and the message says why, unless the pair is in_sync with both\n"
        "nodes alive and at the same generation (wait for a resync, or use 'syncrep promote').\n"
        "Prints the write stall: from the handover request to the new primary's write path open.\n\n"
        "Exit status: 0 = switched over; 1 = refused or failed (the reason is on stderr; the pair\n"
        "stays as it was).",
    )
    p.add_argument("name", metavar="NAME", help="volume name")
    p.add_argument("--coordinator", required=True, type=_dial_address, metavar="HOST:PORT",
                   help="the coordinator's address")
    p.add_argument("--handover-timeout-s", type=float, default=0.0, metavar="S",
                   help="how long the old primary holds writes at its gate waiting for the swap "
                        "(default: the coordinator's, 5 s)")
    p.add_argument("--json", action="store_true", help="print the reply and the volume's new status as JSON")
    p.set_defaults(func=cmd_switchover, role="client")

    # -- verify
    p = add(
        "verify",
        "check that a pair's two replicas are identical (optionally repair)",
        "Online verify: the primary and the secondary each compute a crc32c of every --chunk-bytes\n"
        "chunk of their own copy of volume NAME (NodeService.Checksum; the data never leaves the\n"
        "nodes, only the checksums travel), concurrently and in slices, and the checksums are\n"
        "compared. Prints a one-line summary when the copies are identical, otherwise the\n"
        "mismatching extents (byte offset and length, adjacent chunks merged).\n\n"
        "--repair: when chunks differ, the primary re-sends just those extents to the secondary\n"
        "under a brief write quiesce (only while the pair is in_sync), then the volume is verified\n"
        "again and both results are shown.\n\n"
        "The two nodes read their copies at slightly different moments: a verify while writes are\n"
        "in flight can report transient differences (a write that had reached one node and not yet\n"
        "the other). Verify a quiet volume, or run verify again before acting on a difference. A\n"
        "pair that is degraded or resyncing differs until its resync completes.\n\n"
        "Exit status: 0 = identical (after the repair, with --repair); 1 = the replicas differ;\n"
        "2 = verify could not run (unreachable node or coordinator, unknown volume, bad argument).",
    )
    p.add_argument("name", metavar="NAME", help="volume name")
    p.add_argument("--coordinator", required=True, type=_dial_address, metavar="HOST:PORT",
                   help="the coordinator's address (used to find the primary and the secondary)")
    p.add_argument("--repair", action="store_true",
                   help="re-send the mismatching extents from the primary to the secondary, then verify "
                        "again (the pair must be in_sync)")
    p.add_argument("--chunk-bytes", type=_positive_size, default="1MiB", metavar="SIZE",
                   help="bytes per checksum: the granularity of a reported (and repaired) mismatch; a "
                        "multiple of the block size, at most 64MiB")
    p.add_argument("--max-extents", type=_positive_int, default=VERIFY_SHOW_EXTENTS, metavar="N",
                   help="mismatching extents to list before '... and K more'")
    p.add_argument("--json", action="store_true",
                   help="print the result as one JSON document (with --repair, the first pass is in "
                        "\"before_repair\")")
    p.set_defaults(func=cmd_verify, role="client", error_exit=EXIT_USAGE)

    # -- demo
    p = add(
        "demo",
        "run the guided demo on a local cluster",
        "Start a local cluster (a coordinator, a primary and a secondary as separate processes on\n"
        "loopback ports, the nodes with --enable-fault-injection), create a volume and write a\n"
        "workload from several concurrent streams. Then the whole story of a failure:\n"
        "  1. the secondary fails writes (NACK, a test fault): the pair goes degraded, with the\n"
        "     failed extents derived from the NACKs and a fault-recovery snapshot on the primary;\n"
        "  2. writes go on while degraded (tracked for resync);\n"
        "  3. the fault is cleared: watch the resync (state, bytes done of total, rate) to in_sync;\n"
        "  4. kill -9 the secondary under a write load, restart it, watch the resync again;\n"
        "  5. syncrep verify: both replicas identical, and equal to what the client wrote;\n"
        "  6. a summary: writes acknowledged, bytes resynced against the volume size.\n"
        "Exits 0 only when verify finds the replicas identical and the pair is in_sync.",
    )
    p.add_argument("--workdir", type=Path, default=None, metavar="DIR",
                   help="where the processes keep data and logs (default: a temporary directory, "
                        "removed at the end unless --keep or the demo fails)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    p.add_argument("--size", type=_positive_size, default="64MiB", metavar="SIZE", help="volume size")
    p.add_argument("--writes", type=_positive_int, default=320, metavar="N", help="writes in the workload")
    p.add_argument("--streams", type=_positive_int, default=8, metavar="N",
                   help="concurrent writers in the workload")
    p.add_argument("--seed", type=int, default=None, metavar="N",
                   help="random seed of the workload (default: random)")
    p.set_defaults(func=cmd_demo, role="demo")

    return parser


# ---------------------------------------------------------------- logging


def setup_logging(level: str, role: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s.%(msecs)03d %(levelname)s {role}[%(process)d] %(name)s: %(message)s",
            datefmt="%Y-%m-%dT%H:%M:%S",
        )
    )
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level, logging.INFO))


# ---------------------------------------------------------------- servers


def _load_serve(module: str, what: str) -> Callable[..., Coroutine[Any, Any, None]]:
    """Import a server module only when a server command runs (clients start fast)."""
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise CliError(f"{what} is not available in this installation: {e}") from None
    serve: Callable[..., Coroutine[Any, Any, None]] = mod.serve
    return serve


def cmd_coordinator(args: argparse.Namespace) -> int:
    serve = _load_serve("coordinator.server", "the coordinator")
    args.data_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(
        serve(
            args.listen,
            args.data_dir,
            heartbeat_interval_s=args.heartbeat_interval_s,
            node_timeout_s=args.node_timeout_s,
            auto_resync=args.auto_resync,
            default_resync_mode=RESYNC_MODES[args.resync_mode],
            lease_s=args.lease_s,
            lease_drift_s=args.lease_drift_s,
        )
    )
    return EXIT_OK


def cmd_node(args: argparse.Namespace) -> int:
    advertise = args.advertise
    if advertise is None:
        advertise = check_advertise(args.listen, flag="--listen (used as --advertise)")
    else:
        check_advertise(advertise)
    options = node_options_from_args(args)
    serve = _load_serve("syncrep.node", "the node")
    args.data_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(serve(args.role, args.listen, args.data_dir, args.coordinator, advertise, options))
    return EXIT_OK


# ---------------------------------------------------------------- volume create / status


def _generation_text(gen: int) -> str:
    """A generation id as status shows it: 16 hex digits, or why there is none."""
    return f"{gen:016x}" if gen else "none"


def state_line(v: dict[str, Any]) -> str:
    def node(role: str) -> str:
        alive = "up" if v[f"{role}_alive"] else "DOWN"
        if v.get(f"{role}_data_missing"):
            alive += ", NO DATA"
        return f"{role} {v[role] or '-'} ({alive})"

    parts = [
        f"{v['name']}",
        f"{v['state']}",
        f"epoch {v['epoch']}",
        f"{format_size(v['size_bytes'])} (block {v['block_size']})",
        node("primary"),
        node("secondary"),
        f"generation {_generation_text(v.get('generation', 0))}",
        f"acked {v['acked_seq']}/{v['last_seq']}",
    ]
    sgen = v.get("secondary_generation", 0)
    if sgen != v.get("generation", 0):
        parts.append(f"secondary generation {_generation_text(sgen)}")
    if v.get("lease_remaining_s", 0.0) > 0 or v["state"] != "in_sync":
        parts.append(f"lease {v.get('lease_remaining_s', 0.0):.1f} s left")
    if v.get("out_of_sync_bytes", 0) or v["state"] != "in_sync":
        parts.append(f"out of sync {format_size(v.get('out_of_sync_bytes', 0))}")
    if v.get("auto_failover"):
        parts.append("auto-failover")
    if v["failed_extents_count"] or v["state"] != "in_sync":
        parts.append(f"failed {format_size(v['failed_bytes'])} in {v['failed_extents_count']} extent(s)")
    r = v["resync"]
    if v["state"] == "resyncing" or r["bytes_total"]:
        pct = 100.0 * r["bytes_done"] / r["bytes_total"] if r["bytes_total"] else 0.0
        parts.append(
            f"resync round {r['round']}: {format_size(r['bytes_done'])}/{format_size(r['bytes_total'])} "
            f"({pct:.0f}%, {format_size(r['rate_bytes_per_s'])}/s, eta {r['eta_s']:.1f} s)"
        )
    if v["last_error"]:
        parts.append(f"last error: {' '.join(v['last_error'].split())}")
    return "  ".join(parts)


def cmd_volume_create(args: argparse.Namespace) -> int:
    async def run() -> dict[str, Any]:
        st = await create_volume(
            args.coordinator,
            args.name,
            args.size,
            args.primary,
            args.secondary,
            block_size=args.block_size,
            resync_mode=RESYNC_MODES[args.resync_mode] if args.resync_mode else 0,
            auto_failover=args.auto_failover,
        )
        return volume_status_dict(st)

    v = asyncio.run(run())
    if args.json:
        print(json.dumps(v, indent=2))
    else:
        print(f"created volume {state_line(v)}")
    return EXIT_OK


def cmd_promote(args: argparse.Namespace) -> int:
    # A refusal is a ClientError: main() prints the coordinator's message on
    # stderr (one line, with the gRPC code) and exits 1.
    reply = asyncio.run(promote(args.coordinator, args.name, force=args.force))
    v = volume_status_dict(reply.status)
    if args.json:
        print(json.dumps({"message": reply.message, "volume": v}, indent=2))
        return EXIT_OK
    if reply.message:
        print(" ".join(reply.message.split()))
    print(
        f"{v['name']}: primary is now {v['primary'] or '-'}, secondary {v['secondary'] or '-'} "
        f"(epoch {v['epoch']}, {v['state']}, generation {_generation_text(v['generation'])})"
    )
    return EXIT_OK


def cmd_switchover(args: argparse.Namespace) -> int:
    # A refusal is a ClientError: main() prints the coordinator's message on
    # stderr and exits 1.
    reply = asyncio.run(switchover(args.coordinator, args.name, handover_timeout_s=args.handover_timeout_s))
    v = volume_status_dict(reply.status)
    if args.json:
        print(json.dumps({"message": reply.message, "stall_s": reply.stall_s, "drain_s": reply.drain_s,
                          "acked_seq": reply.acked_seq, "volume": v}, indent=2))
        return EXIT_OK
    print(
        f"{v['name']}: switched over: primary is now {v['primary'] or '-'}, secondary {v['secondary'] or '-'} "
        f"(epoch {v['epoch']}, {v['state']}, generation {_generation_text(v['generation'])})"
    )
    print(f"write stall {reply.stall_s * 1000:.1f} ms (handover request to the new primary's write path open; "
          f"the old primary's drain {reply.drain_s * 1000:.1f} ms, up to seq {reply.acked_seq})")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    vols = [volume_status_dict(v) for v in asyncio.run(list_volumes(args.coordinator))]
    vols.sort(key=lambda v: v["name"])
    if args.json:
        print(json.dumps({"volumes": vols}, indent=2))
    elif not vols:
        print("no volumes")
    else:
        for v in vols:
            print(state_line(v))
    return EXIT_OK


# ---------------------------------------------------------------- write / read


async def _write_stream(
    client: VolumeClient,
    src: IO[bytes],
    offset: int,
    write_size: int,
    depth: int,
    pad_to: int,
) -> tuple[int, int]:
    """Stream ``src`` into the volume; return (bytes, writes). Raises the first error."""
    sem = asyncio.Semaphore(depth)
    errors: list[BaseException] = []
    tasks: set[asyncio.Task[None]] = set()
    total = 0
    count = 0

    async def one(off: int, data: bytes) -> None:
        try:
            await client.write(off, data)
        except BaseException as e:
            errors.append(e)
        finally:
            sem.release()

    pos = offset
    try:
        while not errors:
            chunk = await asyncio.to_thread(src.read, write_size)
            if not chunk:
                break
            if pad_to > 1 and len(chunk) % pad_to:
                chunk += b"\0" * (pad_to - len(chunk) % pad_to)
            await sem.acquire()
            if errors:
                sem.release()
                break
            t = asyncio.create_task(one(pos, chunk))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            pos += len(chunk)
            total += len(chunk)
            count += 1
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
    if errors:
        raise errors[0]
    return total, count


def cmd_write(args: argparse.Namespace) -> int:
    if args.write_size > MAX_WRITE_BYTES:
        raise CliError(
            f"--write-size {args.write_size}: larger than the largest write ({size_text(MAX_WRITE_BYTES)})"
        )

    async def run(src: IO[bytes]) -> tuple[int, int, float]:
        client = await VolumeClient.connect(args.coordinator, args.name)
        try:
            block = client.status.spec.block_size if (args.pad and client.status) else 1
            t0 = time.monotonic()
            n, count = await _write_stream(client, src, args.offset, args.write_size, args.depth, block)
            return n, count, time.monotonic() - t0
        finally:
            await client.close()

    if args.input is not None:
        try:
            src: IO[bytes] = open(args.input, "rb")
        except OSError as e:
            raise CliError(f"cannot open --input {args.input}: {e.strerror or e}") from None
    else:
        src = sys.stdin.buffer
    try:
        n, count, secs = asyncio.run(run(src))
    finally:
        if args.input is not None:
            src.close()
    rate = n / secs if secs > 0 else 0.0
    print(
        f"wrote {n} bytes ({format_size(n)}) to {args.name} at offset {args.offset} "
        f"in {count} write(s), {secs:.2f} s, {format_size(rate)}/s"
    )
    return EXIT_OK


def cmd_read(args: argparse.Namespace) -> int:
    async def run(dst: IO[bytes]) -> None:
        client = await VolumeClient.connect(args.coordinator, args.name)
        try:
            done = 0
            while done < args.length:
                n = min(MAX_WRITE_BYTES, args.length - done)
                data = await client.read(args.offset + done, n)
                dst.write(data)
                done += n
            dst.flush()
        finally:
            await client.close()

    if args.output is not None:
        try:
            dst: IO[bytes] = open(args.output, "wb")
        except OSError as e:
            raise CliError(f"cannot open --output {args.output}: {e.strerror or e}") from None
    else:
        dst = sys.stdout.buffer
    try:
        asyncio.run(run(dst))
    except BrokenPipeError:
        return EXIT_OK  # e.g. `syncrep read ... | head -c 10`
    finally:
        if args.output is not None:
            dst.close()
    return EXIT_OK


# ---------------------------------------------------------------- verify


def verify_summary(r: VerifyResult) -> str:
    """One line: identical, or how much differs."""
    blocks = r.size_bytes // r.block_size if r.block_size else 0
    head = f"{r.volume}: primary {r.primary} and secondary {r.secondary}"
    compared = (
        f"{blocks} blocks, {format_size(r.size_bytes)} compared in {r.elapsed_s:.2f} s "
        f"({format_size(r.hash_rate_bytes_per_s)}/s)"
    )
    if r.identical:
        return f"{head} are identical: {compared}"
    chunks = sum(-(-e.length // r.chunk_bytes) for e in r.mismatches)
    return (
        f"{head} DIFFER: {format_size(r.mismatched_bytes)} in {len(r.mismatches)} extent(s) "
        f"({chunks} of {r.chunks} chunks of {format_size(r.chunk_bytes)}); {compared}"
    )


def verify_extent_lines(r: VerifyResult, limit: int = VERIFY_SHOW_EXTENTS) -> list[str]:
    """The mismatching extents, the first ``limit`` then "... and K more"."""
    lines = [
        f"  offset {e.offset:>15}  length {e.length:>12}  ({format_size(e.length)} at {format_size(e.offset)})"
        for e in r.mismatches[:limit]
    ]
    if len(r.mismatches) > limit:
        lines.append(f"  ... and {len(r.mismatches) - limit} more")
    return lines


def _print_verify(r: VerifyResult, limit: int, prefix: str = "") -> None:
    print(prefix + verify_summary(r))
    for line in verify_extent_lines(r, limit):
        print(line)


def _verify_note(r: VerifyResult) -> str | None:
    if r.state == "in_sync":
        return None
    return (
        f"note: the pair is {r.state}: the secondary lacks the failed extents and the writes made since "
        "the failure until its resync completes, so differences are expected"
    )


def cmd_verify(args: argparse.Namespace) -> int:
    show_progress = not args.json and sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if show_progress and done < total:
            sys.stderr.write(f"\rverifying {args.name}: {format_size(done)} of {format_size(total)} "
                             f"({100.0 * done / total:.0f}%)   ")
            sys.stderr.flush()

    try:
        try:
            r = asyncio.run(
                verify_volume(args.coordinator, args.name, chunk_bytes=args.chunk_bytes,
                              repair=args.repair, progress=progress)
            )
        finally:
            if show_progress:
                sys.stderr.write("\r\033[K")
    except RepairError as e:
        # The first pass found differences; the repair itself was refused or failed.
        if args.json:
            print(json.dumps({**e.result.to_dict(), "repair_error": str(e)}, indent=2))
        else:
            _print_verify(e.result, args.max_extents)
        raise CliError(str(e)) from None
    except VerifyError as e:
        raise CliError(str(e)) from None
    if args.json:
        print(json.dumps(r.to_dict(), indent=2))
    else:
        if r.before_repair is not None:
            _print_verify(r.before_repair, args.max_extents)
            print(
                f"repair: the primary re-sent {format_size(r.repaired_bytes)} ({r.repaired_bytes} bytes) in "
                f"{len(r.before_repair.mismatches)} extent(s) to the secondary"
            )
            _print_verify(r, args.max_extents, prefix="after repair: ")
        else:
            _print_verify(r, args.max_extents)
        note = _verify_note(r)
        if note:
            print(note)
    return EXIT_OK if r.identical else EXIT_DIFFER


# ---------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    # The demo (a local cluster, a workload, faults) lives in deploy.demo; it
    # is imported only when the demo runs, as deploy.cluster was.
    from deploy import demo

    return demo.main(workdir=args.workdir, keep=args.keep, size=args.size, writes=args.writes,
                     streams=args.streams, seed=args.seed, log_level=args.log_level)


# ---------------------------------------------------------------- main


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.role)
    # The exit status of a failure: 1, except for commands whose 1 means
    # something else (verify: 1 = the replicas differ, 2 = an error).
    error_exit = int(getattr(args, "error_exit", EXIT_ERROR))
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        sys.stderr.write("syncrep: interrupted\n")
        return EXIT_INTERRUPTED
    except ClientError as e:
        sys.stderr.write(f"syncrep: error: {_one_line(str(e))}\n")
    except grpc.RpcError as e:
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        details = e.details() if hasattr(e, "details") else str(e)
        name = code.name if code is not None else "UNKNOWN"
        sys.stderr.write(f"syncrep: error: {_one_line(details or '')} ({name})\n")
    except CliError as e:
        sys.stderr.write(f"syncrep: error: {_one_line(str(e))}\n")
    except OSError as e:
        log.debug("OS error", exc_info=True)
        sys.stderr.write(f"syncrep: error: {_one_line(str(e))}\n")
    except Exception as e:
        log.debug("unexpected error", exc_info=True)
        # deploy.cluster.ClusterError carries a one-line summary (naming the
        # log file); its full text holds the tail of the failing process's log.
        summary = getattr(e, "summary", None)
        if isinstance(summary, str):
            sys.stderr.write(f"syncrep: error: {_one_line(summary)}\n")
            return error_exit
        what = getattr(e, "message", None) or str(e) or type(e).__name__
        code = getattr(e, "code", None)
        suffix = f" ({code.name})" if isinstance(code, grpc.StatusCode) else ""
        sys.stderr.write(f"syncrep: error: {_one_line(what)}{suffix} [{type(e).__name__}]\n")
    return error_exit

