"""The ``syncrep`` command line.

Servers::

    syncrep coordinator --listen HOST:PORT --data-dir DIR
    syncrep primary     --listen HOST:PORT --data-dir DIR --coordinator HOST:PORT [--advertise HOST:PORT]
    syncrep secondary   --listen HOST:PORT --data-dir DIR --coordinator HOST:PORT [--advertise HOST:PORT]

Clients::

    syncrep volume create NAME --size 64MiB --primary A --secondary B --coordinator C
    syncrep volume list --coordinator C [--json]
    syncrep volume delete NAME --coordinator C [--yes]
    syncrep volume resize NAME --size 2GiB --coordinator C
    syncrep write NAME --offset 0 --coordinator C [--input FILE]
    syncrep read NAME --offset 0 --length 1MiB --coordinator C [--output FILE]
    syncrep status [VOLUME] --coordinator C [--json] [--watch]
    syncrep events [--now] [--json] [--volume V] --coordinator C
    syncrep promote NAME --coordinator C [--force]
    syncrep switchover NAME --coordinator C [--handover-timeout-s S]
    syncrep resolve NAME --keep HOST:PORT --coordinator C
    syncrep verify NAME --coordinator C [--repair] [--chunk-bytes SIZE] [--json]
    syncrep grant USER --volume V [--read-only] --coordinator C
    syncrep revoke USER --volume V --coordinator C
    syncrep grants [--volume V] --coordinator C [--json]
    syncrep demo [--workdir DIR] [--keep]

Errors print one line to stderr (``syncrep: error: <what> (<grpc code>)``) and
exit non-zero; logs go to stderr with a timestamp and the process role.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import io
import json
import logging
import os
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

import grpc

from syncrep import __version__, certs, logfmt, rpc, settings
from syncrep.client import (
    RESYNC_MODES,
    ClientError,
    VolumeClient,
    coordinator_info,
    create_volume,
    delete_volume,
    event_dict,
    event_line,
    grant,
    list_grants,
    list_volumes,
    promote,
    resize_volume,
    resolve,
    revoke,
    switchover,
    tls_failure,
    volume_status_dict,
    watch_events,
)
from syncrep.config import NodeOptions
from syncrep.core.vocab import MAX_WRITE_BYTES, parse_address, parse_address_list
from syncrep.metrics import metrics_listen_type
from syncrep.nbd.server import nbd_listen_type
from syncrep.units import format_size, parse_size, parse_volume_size
from syncrep.verify import RepairError, VerifyError, VerifyResult, verify_volume

log = logging.getLogger("syncrep.cli")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
#: The user a command runs as unless --user says otherwise.
DEFAULT_USER = "admin"
#: The commands that talk gRPC, and so need --certs-dir or --insecure.
SECURED_ROLES = frozenset({"coordinator", "primary", "secondary", "client"})
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


def _volume_size(text: str) -> int:
    """A volume's size: a decimal unit (10GB) is refused with a hint (syncrep.units.parse_volume_size)."""
    try:
        n = parse_volume_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be greater than 0")
    return n


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


def _coordinator_list(text: str) -> str:
    """``--coordinator A[,B,C]`` (issue 12): one coordinator or several sharing
    an etcd store; the commands and nodes find the leader among them."""
    for part in text.split(","):
        if part.strip():
            _dial_address(part)  # its messages, as with one address
    try:
        addresses = parse_address_list(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return ",".join(addresses)


_WILDCARD_HOSTS = {"0.0.0.0", "::", "[::]", "*", ""}

def _add_coordinator_flag(p: argparse.ArgumentParser, help: str = "the coordinator's address") -> None:
    """``--coordinator HOST:PORT[,...]`` (required), as every client command takes it."""
    p.add_argument("--coordinator", required=True, type=_coordinator_list, metavar="HOST:PORT[,...]", help=help)


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
    _NodeFlag("max_concurrent_resyncs", "--max-concurrent-resyncs",
              "most resyncs this node runs at once as a primary; the others queue (in order) and start as "
              "slots free up, their writes tracked meanwhile: a node back with many degraded volumes "
              "does not start them all at once", type=_positive_int),
    _NodeFlag("node_resync_max_rate_bytes_per_s", "--node-resync-max-rate",
              "bandwidth cap shared by all resyncs of this node, a size per second such as 200MiB "
              "(0 = unlimited); --resync-max-rate still caps each one", type=_rate, is_size=True),
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
    # -- metrics (issue 13)
    _NodeFlag("metrics_listen", "--metrics-listen",
              "serve Prometheus metrics at http://HOST:PORT/metrics (plain HTTP without authentication: "
              "a management network or loopback; it shows figures, never data; default: off)",
              type=metrics_listen_type),
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
            elif f.type is nbd_listen_type or f.type is metrics_listen_type:
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
    common.add_argument(
        "--log-format", choices=logfmt.FORMATS, default=argparse.SUPPRESS,
        help="log lines as text (default) or as JSON objects with volume, epoch and seq fields",
    )
    common.add_argument(
        "--config", type=Path, default=argparse.SUPPRESS, metavar="FILE",
        help=f"a TOML file of settings (default: ${settings.CONFIG_ENV}, else {settings.DEFAULT_CONFIG_PATH} "
             "if present); flags win over SYNCREP_* environment variables, which win over the file; "
             "see 'syncrep config show'",
    )

    # Security flags (docs/SECURITY.md): on every command that talks gRPC,
    # accepted after the command's own arguments like --coordinator.
    secure = _Parser(add_help=False)
    g = secure.add_argument_group("security (mutual TLS by default)")
    g.add_argument("--certs-dir", type=Path, default=None, metavar="DIR",
                   help=f"directory with ca.crt and this process's certificate and key (node.crt/node.key "
                        f"for nodes and coordinators, client.USER.crt/.key for commands); turns on mutual "
                        f"TLS (default: ${certs.CERTS_DIR_ENV}; make them with 'syncrep cert')")
    g.add_argument("--insecure", action="store_true", default=False,
                   help="plaintext gRPC with no authentication: anyone who can reach the port may do "
                        "anything; only for a trusted test network")
    g.add_argument("--user", default=DEFAULT_USER, metavar="USER",
                   help="the user a command runs as: it presents DIR/client.USER.crt (default: admin)")

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
    parser.add_argument(
        "--log-format", choices=logfmt.FORMATS, default="text",
        help="log lines as text, or as JSON objects (one per line) with volume, epoch and seq fields",
    )
    parser.add_argument(
        "--config", type=Path, default=None, metavar="FILE",
        help=f"a TOML file of settings (default: ${settings.CONFIG_ENV}, else {settings.DEFAULT_CONFIG_PATH} "
             "if present): every flag can also be given there or as SYNCREP_<FLAG> in the environment; "
             "flags win over the environment, which wins over the file (see 'syncrep config show')",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help, description=description, parents=[common, secure], formatter_class=_Formatter
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
    p.add_argument("--advertise", type=_dial_address, default=None, metavar="HOST:PORT",
                   help="the address nodes, commands and the other coordinators dial to reach this one "
                        "(with --store etcd:// the leader's address, which followers redirect to; a name "
                        "in its node.crt); default: the --listen address, which must then not be 0.0.0.0 "
                        "on etcd")
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
    # -- coordinator metrics (issue 13)
    p.add_argument("--metrics-listen", type=metrics_listen_type, default="", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (plain HTTP without "
                        "authentication: a management network or loopback; default: off)")
    # -- coordinator on etcd (issue 12)
    p.add_argument("--store", type=_store_url, default="sqlite",
                   metavar="sqlite|etcd://HOST:PORT[,...]|etcds://HOST:PORT[,...]",
                   help="where the state lives: 'sqlite' under --data-dir (one coordinator; the default), "
                        "or an etcd cluster shared by several coordinators, one of which leads (elected "
                        "with an etcd lease) while the others answer status and redirect the rest; "
                        "etcds:// talks TLS to etcd (see --etcd-certs-dir), etcd:// plaintext (refused with "
                        "--certs-dir unless --etcd-insecure)")
    _add_etcd_tls_flags(p)
    p.add_argument("--election-ttl-s", type=_election_ttl, default=5, metavar="S",
                   help="with --store etcd://: the TTL of the leader's election lease, whole seconds; a "
                        "dead leader is replaced within about twice this. The leader holds through half of "
                        "it with no keepalive answered, so keep half of it above the time etcd takes to "
                        "elect a raft leader (about 2x etcd's --election-timeout, more on a loaded host), "
                        "or losing etcd's raft leader interrupts the coordinators' leadership")
    p.epilog = (
        "Moving an existing SQLite state to etcd (the target prefix must be empty):\n"
        "  syncrep coordinator migrate --from DIR --to etcd://HOST:PORT[,...]"
    )
    p.set_defaults(func=cmd_coordinator, role="coordinator")
    _add_coordinator_migrate(add)

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
        _add_coordinator_flag(p)
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
        parents=[common, secure],
        formatter_class=_Formatter,
    )
    p.add_argument("name", metavar="NAME", help="volume name")
    p.add_argument("--size", required=True, type=_volume_size, metavar="SIZE",
                   help="volume size, e.g. 64MiB, 1GiB, 1048576 (a multiple of the block size; decimal units "
                        "such as 10GB are refused with a hint: pass 10GiB, or the bytes); volumes are thin: "
                        "one larger than a node's free space is created with a warning")
    p.add_argument("--primary", required=True, type=_dial_address, metavar="HOST:PORT",
                   help="advertise address of the node that takes the primary role")
    p.add_argument("--secondary", required=True, type=_dial_address, metavar="HOST:PORT",
                   help="advertise address of the node that takes the secondary role")
    _add_coordinator_flag(p)
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

    # -- volume list / delete / resize (issue 13)
    p = vsub.add_parser(
        "list",
        help="list the volume pairs",
        description="List the volume pairs: name, size, state, and the nodes that hold the primary and the\n"
                    "secondary roles now. ('syncrep status' shows the replication details.)",
        parents=[common, secure],
        formatter_class=_Formatter,
    )
    _add_coordinator_flag(p)
    p.add_argument("--json", action="store_true",
                   help='print JSON: {"volumes": [{"name", "size_bytes", "block_size", "state", "primary", '
                        '"secondary"}, ...]}')
    p.set_defaults(func=cmd_volume_list, role="client")
    p = vsub.add_parser(
        "delete",
        help="delete a volume pair and its data on both nodes",
        description="Delete volume NAME: the coordinator removes the pair and its grants, then both nodes\n"
                    "stop serving it and remove its store. This destroys the data on both replicas.\n"
                    "On a terminal it asks you to type the volume name; without a terminal it refuses\n"
                    "unless --yes. A node that is down keeps its store, never serves it, and says so in\n"
                    "its log when it is back: remove it there by hand.",
        parents=[common, secure],
        formatter_class=_Formatter,
    )
    p.add_argument("name", metavar="NAME", help="volume name")
    _add_coordinator_flag(p)
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation (scripts)")
    p.set_defaults(func=cmd_volume_delete, role="client")
    p = vsub.add_parser(
        "resize",
        help="grow a volume online",
        description="Grow volume NAME to --size while it serves, on both nodes: the secondary first, then\n"
                    "the primary, then the pair's size. The new blocks read as zeros; writes in flight are\n"
                    "not affected; writes up to the new end work once the command returns. Refused unless\n"
                    "the pair is in_sync with both nodes alive; shrinking is refused (it would discard\n"
                    "the data at the end of the volume).",
        parents=[common, secure],
        formatter_class=_Formatter,
    )
    p.add_argument("name", metavar="NAME", help="volume name")
    p.add_argument("--size", required=True, type=_volume_size, metavar="SIZE",
                   help="the new size, larger than now, e.g. 2GiB (a multiple of the block size)")
    _add_coordinator_flag(p)
    p.add_argument("--json", action="store_true", help="print the reply and the volume's new status as JSON")
    p.set_defaults(func=cmd_volume_resize, role="client")

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
    _add_coordinator_flag(p, "the coordinator's address (used to find the primary)")
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
    _add_coordinator_flag(p, "the coordinator's address (used to find the primary)")
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
    _add_coordinator_flag(p)
    p.add_argument("--json", action="store_true", help="print JSON: {\"volumes\": [...]}")
    # Issue 13: one volume, the rich table on a terminal, and a live view.
    p.add_argument("volume", nargs="?", default=None, metavar="VOLUME",
                   help="show only this volume (default: every volume)")
    p.add_argument("--watch", action="store_true",
                   help="a live view on the terminal, redrawn every second, with resync progress bars (rate, "
                        "ETA); Ctrl-C exits. Without a terminal, or with --json, status prints once")
    p.epilog = ("On a terminal status prints a table; when stdout is not a terminal it prints one plain line "
                "per volume (stable, for scripts; --json for programs).")
    p.set_defaults(func=cmd_status, role="client")

    # -- events (issue 13)
    p = add(
        "events",
        "follow the coordinator's changes, one line per change",
        "Follow the coordinator's changes until Ctrl-C: first the current state of every volume\n"
        "(kind 'state'), then one line per change: state and role changes, resync start,\n"
        "progress (every few seconds), done, NACKs, promotions, switchovers, resolves, nodes\n"
        "going down and up. Each line: time (ISO 8601 with timezone), volume, epoch, kind,\n"
        "old -> new, and the message. If the coordinator goes away, says so and reconnects\n"
        "with backoff. --now prints the current state and exits.",
    )
    _add_coordinator_flag(p)
    p.add_argument("--now", action="store_true", help="print the current state of every volume and exit")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--volume", default="", metavar="VOLUME", help="only this volume's events (default: every volume)")
    p.set_defaults(func=cmd_events, role="client")

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
    _add_coordinator_flag(p)
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
    _add_coordinator_flag(p)
    p.add_argument("--handover-timeout-s", type=float, default=0.0, metavar="S",
                   help="how long the old primary holds writes at its gate waiting for the swap "
                        "(default: the coordinator's, 5 s)")
    p.add_argument("--json", action="store_true", help="print the reply and the volume's new status as JSON")
    p.set_defaults(func=cmd_switchover, role="client")

    # -- cert
    certs.add_cert_commands(sub, parents=[common], formatter_class=_Formatter)

    # -- grant / revoke / grants (issue 11: who may use which volume)
    p = add(
        "grant",
        "let a user read and write (or only read) a volume",
        "Let USER (the CN of a client certificate, 'syncrep cert create-client USER') use volume V\n"
        "through VolumeService and the NBD export: read and write, or only read with --read-only.\n"
        "A second grant replaces the first. Stored by the coordinator; the nodes apply it with\n"
        "their next heartbeat. admin may use every volume without a grant. Only admin may grant.",
    )
    # dest "grantee": "user" is --user's, the user this command runs as.
    p.add_argument("grantee", metavar="USER", help="the user: a client certificate's CN")
    p.add_argument("--volume", required=True, metavar="V", help="the volume")
    p.add_argument("--read-only", action="store_true", help="reads only (writes are refused)")
    _add_coordinator_flag(p)
    p.set_defaults(func=cmd_grant, role="client")

    p = add(
        "revoke",
        "take a user's grant on a volume away",
        "Take USER's grant on volume V away: the nodes refuse the user's next write or read of V\n"
        "(also on a stream already open) from their next heartbeat on. Refused if USER holds no\n"
        "grant on V. Only admin may revoke.",
    )
    # dest "grantee": "user" is --user's, the user this command runs as.
    p.add_argument("grantee", metavar="USER", help="the user: a client certificate's CN")
    p.add_argument("--volume", required=True, metavar="V", help="the volume")
    _add_coordinator_flag(p)
    p.set_defaults(func=cmd_revoke, role="client")

    p = add(
        "grants",
        "list who may use which volume",
        "List the grants: one line per volume and user, read-write or read-only (admin, who may\n"
        "use every volume, is not listed). Only admin may list them.",
    )
    p.add_argument("--volume", default="", metavar="V", help="only this volume's grants")
    _add_coordinator_flag(p)
    p.add_argument("--json", action="store_true",
                   help='print JSON: {"grants": [{"volume", "user", "read_only"}, ...]}')
    p.set_defaults(func=cmd_grants, role="client")

    # -- resolve
    p = add(
        "resolve",
        "end a split brain: keep one replica's data, discard the other's (recoverable)",
        "End the split brain of volume NAME (both replicas wrote without each other after a\n"
        "forced promote): keep the data of the replica at --keep, discard what the other one\n"
        "wrote since their common generation, and resync it from the kept one (changes only).\n\n"
        "First prints what the other side loses: the extents and bytes it wrote since the common\n"
        "generation (a dry run; exact when the discarded side is the secondary, which takes no\n"
        "writes in split brain). Then resolves, and prints the exact figures measured once the\n"
        "discarded side is fenced. The discarded replica keeps its state in a snapshot named\n"
        "split-brain-discarded-e<epoch>-<generation> on its node (syncrep never deletes it): read\n"
        "it with NodeService.ReadLocal (snapshot_id) to recover what you need.\n\n"
        "Keeping the secondary makes it the primary (a new epoch); the old primary stops writing\n"
        "and becomes the secondary.\n\n"
        "Exit status: 0 = resolved (the resync follows; 'syncrep status' shows it); 1 = refused or\n"
        "failed (the reason is on stderr; nothing changed).",
    )
    p.add_argument("name", metavar="NAME", help="volume name")
    p.add_argument("--keep", required=True, type=_dial_address, metavar="HOST:PORT",
                   help="the advertise address of the replica whose data is kept ('syncrep status' shows both)")
    _add_coordinator_flag(p)
    p.add_argument("--json", action="store_true",
                   help="print the result as one JSON object (the ResolveReply's fields)")
    p.set_defaults(func=cmd_resolve, role="client")

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
    _add_coordinator_flag(p, "the coordinator's address (used to find the primary and the secondary)")
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

    # -- config show (issue 13)
    p = add("config", "show the effective settings",
            "Settings come from flags, SYNCREP_* environment variables and a TOML file (--config FILE,\n"
            f"${settings.CONFIG_ENV}, or {settings.DEFAULT_CONFIG_PATH} when present), in that order of\n"
            "precedence. The file's top-level keys apply to every command that has the flag; the tables\n"
            "[process.coordinator], [process.node] (both node roles), [process.primary] and\n"
            "[process.secondary] to that process only.\n"
            "Keys are the flags' names (ack_timeout_s or ack-timeout-s).")
    csub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    p = csub.add_parser(
        "show",
        help="print the effective settings of a command and where each came from",
        description="Print every setting a command started now would get (flags aside) and where each\n"
                    "came from: env SYNCREP_X, file FILE [table] key, or default. COMMAND is a syncrep\n"
                    "command (coordinator, primary, secondary, status, 'volume create', ...); without it,\n"
                    "the coordinator, primary and secondary are shown. A bad value or an unknown key in\n"
                    "the file is an error here as it is when the command starts.",
        parents=[common],
        formatter_class=_Formatter,
    )
    p.add_argument("target", nargs="*", metavar="COMMAND", help="the command whose settings to show")
    p.add_argument("--json", action="store_true", help="print JSON: config_file and, per command, settings")
    p.set_defaults(func=cmd_config_show, role="local")

    return parser


def cmd_config_show(args: argparse.Namespace) -> int:
    parser = build_parser()
    targets = [tuple(args.target)] if args.target else [("coordinator",), ("primary",), ("secondary",)]
    argv = ["--config", str(args.config)] if getattr(args, "config", None) else []
    doc: dict[str, Any] = {"config_file": None, "commands": {}}
    out: list[str] = []
    for words in targets:
        try:
            layered, rows = settings.settings_of(parser, words, os.environ, argv)
        except settings.ConfigError as e:
            raise CliError(str(e)) from None
        doc["config_file"] = str(layered.config_path) if layered.config_path else None
        doc["config_origin"] = layered.config_origin
        name = " ".join(words)
        doc["commands"][name] = [
            {"setting": r.dest, "flag": r.flag, "value": _jsonable(r.value), "source": str(r.source)}
            for r in rows
        ]
        if not out:
            where = f"{layered.config_path} (from {layered.config_origin})" if layered.config_path else (
                layered.config_origin)
            out.append(f"config file: {where}")
        out.append("")
        out.append(f"syncrep {name}:")
        # The setting's name as the file and SYNCREP_<NAME> spell it.
        width = max((len(r.dest) for r in rows), default=0)
        vwidth = min(max((len(settings.show_value(r.value)) for r in rows), default=0), 48)
        for r in rows:
            out.append(f"  {r.dest:<{width}}  {settings.show_value(r.value):<{vwidth}}  {r.source}")
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print("\n".join(out))
    return EXIT_OK


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# ---------------------------------------------------------------- logging


def setup_logging(level: str, role: str, fmt: str = "text") -> None:
    """Log to stderr in ``fmt`` (syncrep.logfmt: text or JSON lines, times with their UTC offset)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logfmt.JsonFormatter(role) if fmt == "json" else logfmt.TextFormatter(role))
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


def _add_etcd_tls_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--etcd-certs-dir", type=Path, default=None, metavar="DIR",
                   help="with etcds://: a directory laid out as --certs-dir is (ca.crt, node.crt, node.key): "
                        "ca.crt verifies etcd's certificates, node.crt is this process's client "
                        "certificate for etcd's --client-cert-auth (default: --certs-dir, the same CA)")
    p.add_argument("--etcd-server-name", default=None, metavar="NAME",
                   help="with etcds://: the name every etcd member's certificate must carry (one channel "
                        "balances over all members, so one name is checked for all; default: the host of "
                        "the first endpoint)")
    p.add_argument("--etcd-insecure", action="store_true", default=False,
                   help="with etcd://: accept plaintext to etcd although this process runs with --certs-dir "
                        "(refused otherwise: without TLS anyone who reaches etcd reads and changes every "
                        "volume's record; use etcds:// instead)")


def _etcd_tls(args: argparse.Namespace, store_url: str) -> Any:
    """The ``EtcdTls`` of ``store_url`` (None: not etcds://); CliError naming
    what is missing or broken, before anything starts."""
    from coordinator.etcd_store import EtcdTls, default_server_name
    from coordinator.store import parse_store_url

    spec = parse_store_url(store_url)
    insecure_ok = bool(getattr(args, "etcd_insecure", False))
    if spec.tls and insecure_ok:
        raise CliError(f"--etcd-insecure is for a plaintext etcd:// store, not {store_url} (TLS): drop one of them")
    if not spec.tls:
        for flag, value in (("--etcd-certs-dir", args.etcd_certs_dir), ("--etcd-server-name",
                                                                        args.etcd_server_name)):
            if value is not None:
                raise CliError(f"{flag} is for TLS to etcd: give the store as etcds://..., not {store_url}")
        sec = rpc.security
        if spec.kind == "etcd" and sec is not None and sec.certs_dir is not None and not insecure_ok:
            # Secure by default (issue 11): plaintext to etcd only when asked for, as for gRPC.
            raise CliError(
                f"--store {store_url}: plaintext to etcd from a process that runs mutual TLS is refused: "
                "anyone who reaches etcd could read and change every volume's record. Serve etcd over TLS "
                f"and use --store etcds://{','.join(spec.endpoints)} (the client certificate: "
                "--etcd-certs-dir DIR, default --certs-dir), or pass --etcd-insecure to accept plaintext")
        return None
    certs_dir = args.etcd_certs_dir
    if certs_dir is None:
        sec = rpc.security
        certs_dir = sec.certs_dir if sec is not None else None
    if certs_dir is None:
        raise CliError(f"--store {store_url}: TLS to etcd needs certificates: pass --etcd-certs-dir DIR "
                       "(ca.crt, node.crt, node.key), or run with --certs-dir instead of --insecure")
    name = args.etcd_server_name or default_server_name(spec.endpoints)
    try:
        return EtcdTls.from_certs_dir(certs_dir, name)
    except certs.CertError as e:
        raise CliError(f"--etcd-certs-dir: {e}") from None


def cmd_coordinator(args: argparse.Namespace) -> int:
    serve = _load_serve("coordinator.server", "the coordinator")
    from coordinator.server import listens_on_wildcard

    etcd_tls = _etcd_tls(args, args.store)
    if args.advertise is None and args.store.startswith("etcd") and listens_on_wildcard(args.listen):
        raise CliError(
            f"--listen {args.listen} with --store etcd://...: pass --advertise HOST:PORT, the address the "
            "other hosts dial to reach this coordinator (followers redirect commands and nodes to the "
            "leader's advertised address)"
        )
    if args.advertise is not None and listens_on_wildcard(args.advertise):
        raise CliError(f"--advertise {args.advertise}: give the host name or address other hosts dial, "
                       "not a wildcard")
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
            metrics_listen=args.metrics_listen,
            store=args.store,
            election_ttl_s=args.election_ttl_s,
            advertise=args.advertise,
            etcd_tls=etcd_tls,
        )
    )
    return EXIT_OK


# ---------------------------------------------------------------- coordinator on etcd (issue 12)


def _store_url(text: str) -> str:
    from coordinator.store import parse_store_url

    try:
        return parse_store_url(text).url
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _election_ttl(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid TTL {text!r}: a whole number of seconds >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid TTL {text!r}: a whole number of seconds >= 1")
    return value


#: ``syncrep coordinator migrate ...`` is parsed as this command (the
#: coordinator's own parser requires --listen).
MIGRATE_COMMAND = "coordinator-migrate"


def _add_coordinator_migrate(add: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    p = add(
        MIGRATE_COMMAND,
        "copy a coordinator's SQLite state to etcd (run as 'syncrep coordinator migrate')",
        "Copy the state of a stopped SQLite coordinator (--from: its --data-dir) to an etcd\n"
        "cluster (--to), for coordinators started with --store etcd://...: every volume pair\n"
        "(epoch, state, failed extents, resync progress, roles, generations), node, grant and\n"
        "event. The target prefix must hold nothing (a coordinator state already there is\n"
        "refused, naming what was found). Prints what it copied.",
    )
    p.add_argument("--from", dest="source", required=True, type=Path, metavar="DIR",
                   help="the SQLite coordinator's --data-dir (the coordinator must be stopped)")
    p.add_argument("--to", dest="target", required=True, type=_store_url, metavar="etcd[s]://HOST:PORT[,...]",
                   help="the etcd cluster the coordinators will use (--store)")
    _add_etcd_tls_flags(p)
    p.set_defaults(func=cmd_coordinator_migrate, role="migrate")


def _migrate_argv(argv: list[str]) -> list[str]:
    """``coordinator migrate ...`` -> ``coordinator-migrate ...``."""
    for i, word in enumerate(argv):
        if not word.startswith("-"):
            if word == "coordinator" and argv[i + 1 : i + 2] == ["migrate"]:
                return [*argv[:i], MIGRATE_COMMAND, *argv[i + 2 :]]
            break
    return argv


def cmd_coordinator_migrate(args: argparse.Namespace) -> int:
    from coordinator.migrate import MigrateError, migrate

    if not args.target.startswith(("etcd://", "etcds://")):
        raise CliError(f"--to {args.target!r}: the target must be an etcd store (etcd[s]://HOST:PORT[,...])")
    tls = _etcd_tls(args, args.target)
    try:
        report = migrate(args.source, args.target, tls=tls)
    except MigrateError as e:
        raise CliError(str(e)) from None
    print(report.text())
    return EXIT_OK


def _status_coordinators(coordinator: str) -> dict[str, Any]:
    """``status --json``'s ``leader`` and ``coordinators`` (issue 12): every
    coordinator named, asked directly (CoordinatorInfo)."""
    coordinators = asyncio.run(coordinator_info(coordinator))
    leader = next((c["address"] for c in coordinators if c["state"] == "leader"), None)
    if leader is None:  # none named leads: perhaps one outside the list that a follower names
        asked = {c["address"] for c in coordinators}
        leader = next((c["leader"] for c in coordinators if c.get("leader") and c["leader"] not in asked), None)
    return {"leader": leader, "coordinators": coordinators}


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
    sb = v.get("split_brain")
    if sb:
        parts.append(
            f"split brain since generation {_generation_text(sb['common_generation'])}: primary changed "
            f"{format_size(sb['primary_changed_bytes'])} (at most), secondary changed "
            f"{format_size(sb['secondary_changed_bytes'])}; resolve with 'syncrep resolve {v['name']} --keep HOST:PORT'"
        )
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
        return {**volume_status_dict(st), "warnings": list(st.warnings)}

    v = asyncio.run(run())
    if args.json:
        print(json.dumps(v, indent=2))
    else:
        print(f"created volume {state_line(v)}")
    for w in v.get("warnings", []):  # issue 13: a thin volume larger than a node's free space
        print(f"syncrep: warning: {_one_line(w)}", file=sys.stderr)
    return EXIT_OK


# ---------------------------------------------------------------- volume list / delete / resize (issue 13)


def cmd_volume_list(args: argparse.Namespace) -> int:
    rows = [
        {"name": v["name"], "size_bytes": v["size_bytes"], "block_size": v["block_size"], "state": v["state"],
         "primary": v["primary"], "secondary": v["secondary"]}
        for v in sorted((volume_status_dict(st) for st in asyncio.run(list_volumes(args.coordinator))),
                        key=lambda v: v["name"])
    ]
    if args.json:
        print(json.dumps({"volumes": rows}, indent=2))
        return EXIT_OK
    if not rows:
        print("no volumes")
        return EXIT_OK
    table = [("NAME", "SIZE", "STATE", "PRIMARY", "SECONDARY")] + [
        (r["name"], format_size(r["size_bytes"]), r["state"], r["primary"] or "-", r["secondary"] or "-")
        for r in rows
    ]
    widths = [max(len(t[c]) for t in table) for c in range(4)]
    for t in table:
        print("  ".join(t[c].ljust(widths[c]) for c in range(4)) + "  " + t[4])
    return EXIT_OK


def _confirm_delete(name: str) -> None:
    """Ask the person at the terminal to type the volume's name (CliError unless they do)."""
    if not sys.stdin.isatty():
        raise CliError(
            f"refusing to delete volume {name!r} without confirmation: stdin is not a terminal; pass --yes "
            "to delete it (this destroys its data on both nodes)"
        )
    sys.stderr.write(f"This deletes volume {name!r} and its data on both nodes; it cannot be undone.\n"
                     f"Type the volume name to confirm: ")
    sys.stderr.flush()
    answer = sys.stdin.readline().strip()
    if answer != name:
        raise CliError(f"not confirmed (typed {answer!r}, not {name!r}): volume {name!r} not deleted")


def cmd_volume_delete(args: argparse.Namespace) -> int:
    if not args.yes:
        _confirm_delete(args.name)
    reply = asyncio.run(delete_volume(args.coordinator, args.name))
    print(_one_line(reply.message))
    return EXIT_OK


def cmd_volume_resize(args: argparse.Namespace) -> int:
    # A refusal (not in sync, shrinking, ...) is a ClientError: main() prints
    # the coordinator's message and exits 1.
    reply = asyncio.run(resize_volume(args.coordinator, args.name, args.size))
    v = volume_status_dict(reply.status)
    if args.json:
        print(json.dumps({"message": reply.message, "old_size_bytes": reply.old_size_bytes,
                          "warnings": list(reply.warnings), "volume": v}, indent=2))
    else:
        print(_one_line(reply.message))
    for w in reply.warnings:
        print(f"syncrep: warning: {_one_line(w)}", file=sys.stderr)
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


def _resolve_dict(reply: Any) -> dict[str, Any]:
    return {
        "message": reply.message,
        "kept": reply.kept,
        "discarded": reply.discarded,
        "common_generation": f"{reply.common_generation:016x}",
        "discarded_extents": [[e.offset, e.length] for e in reply.discarded_extents],
        "discarded_bytes": reply.discarded_bytes,
        "discarded_exact": reply.discarded_exact,
        "discard_snapshot": reply.discard_snapshot,
        "discard_snapshot_id": reply.discard_snapshot_id,
        "kept_changed_bytes": reply.kept_changed_bytes,
        "primary": reply.primary,
        "secondary": reply.secondary,
        "volume": volume_status_dict(reply.status),
    }


def _extents_text(extents: Sequence[Any], limit: int = 16) -> str:
    shown = ", ".join(f"[{e.offset}, +{format_size(e.length)})" for e in extents[:limit])
    more = f", ... ({len(extents) - limit} more)" if len(extents) > limit else ""
    return shown + more


def cmd_resolve(args: argparse.Namespace) -> int:
    # A refusal is a ClientError: main() prints the coordinator's message on
    # stderr and exits 1 (nothing changed).
    plan = asyncio.run(resolve(args.coordinator, args.name, keep=args.keep, dry_run=True))
    out = sys.stderr if args.json else sys.stdout
    if plan.discarded_exact:
        what = (f"{len(plan.discarded_extents)} extents, {format_size(plan.discarded_bytes)} "
                f"({plan.discarded_bytes} bytes)")
    else:
        what = (f"at most {format_size(plan.discarded_bytes)} ({plan.discarded_bytes} bytes) so far: it is the "
                "primary and writes until it is fenced; the exact extents follow")
    print(
        f"{args.name}: keeping {plan.kept}; {plan.discarded} loses what it wrote since the common generation "
        f"{plan.common_generation:016x}: {what}",
        file=out,
    )
    if plan.discarded_extents:
        print(f"  extents: {_extents_text(plan.discarded_extents)}", file=out)
    print(f"  its state is kept in snapshot {plan.discard_snapshot!r} on {plan.discarded}", file=out)
    out.flush()
    reply = asyncio.run(resolve(args.coordinator, args.name, keep=args.keep))
    if args.json:
        print(json.dumps(_resolve_dict(reply), indent=2))
        return EXIT_OK
    exact = "exact" if reply.discarded_exact else "as known so far"
    print(
        f"resolved: {reply.discarded} discarded {len(reply.discarded_extents)} extents, "
        f"{format_size(reply.discarded_bytes)} ({reply.discarded_bytes} bytes, {exact}), kept in snapshot "
        f"{reply.discard_snapshot!r} (id {reply.discard_snapshot_id or '?'}) on {reply.discarded}"
    )
    if reply.discarded_extents and list(reply.discarded_extents) != list(plan.discarded_extents):
        print(f"  extents: {_extents_text(reply.discarded_extents)}")
    print(f"{args.name}: primary {reply.primary}, secondary {reply.secondary}; the resync from {reply.kept} "
          f"follows (changes only; 'syncrep status' shows it)")
    if reply.message:
        print(" ".join(reply.message.split()))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    if args.watch and not args.json and sys.stdout.isatty():
        return _status_watch(args)
    vols = [volume_status_dict(v) for v in asyncio.run(list_volumes(args.coordinator))]
    vols.sort(key=lambda v: v["name"])
    if args.volume is not None:
        vols = _only_volume(vols, args.volume)
    if args.json:
        print(json.dumps({**_status_coordinators(args.coordinator), "volumes": vols}, indent=2))
    elif sys.stdout.isatty():
        from syncrep import watch  # rich: only for a terminal

        watch.print_status(vols)
    elif not vols:
        print("no volumes")
    else:
        for v in vols:
            print(state_line(v))
    return EXIT_OK


# ---------------------------------------------------------------- status VOLUME / --watch, events (issue 13)


def _only_volume(vols: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    only = [v for v in vols if v["name"] == name]
    if not only:
        known = ", ".join(repr(v["name"]) for v in vols) or "none"
        raise CliError(f"no volume {name!r} on the coordinator (volumes: {known})")
    return only


def _status_watch(args: argparse.Namespace) -> int:
    from syncrep import watch  # rich: only for a terminal

    try:
        asyncio.run(watch.watch(args.coordinator, args.volume))
    except KeyboardInterrupt:
        return EXIT_OK  # Ctrl-C is how a live view ends
    return EXIT_OK


#: ``syncrep events``: reconnect backoff after the coordinator went away.
EVENTS_RETRY_INITIAL_S = 0.5
EVENTS_RETRY_MAX_S = 10.0


def _print_event(ev: Any, as_json: bool) -> None:
    print(json.dumps(event_dict(ev)) if as_json else event_line(ev), flush=True)


async def _follow_events(args: argparse.Namespace) -> int:
    """Follow until interrupted. A lost coordinator is said once per outage
    (stderr), then asked again with exponential backoff up to
    EVENTS_RETRY_MAX_S; back, it says so and the stream starts again with the
    current state. A "dropped" event (this client fell behind) reconnects at once."""
    delay = EVENTS_RETRY_INITIAL_S
    down_since: float | None = None
    while True:
        try:
            # Several coordinators: watch_events follows the leader itself and says so here.
            async for ev in watch_events(args.coordinator, args.volume,
                                         on_follow=lambda line: sys.stderr.write(f"syncrep: {line}\n")):
                if down_since is not None:
                    sys.stderr.write(f"syncrep: events: coordinator {args.coordinator} is back after "
                                     f"{time.monotonic() - down_since:.1f} s\n")
                    down_since = None
                delay = EVENTS_RETRY_INITIAL_S
                _print_event(ev, args.json)
                if ev.kind == "dropped":
                    break
            else:
                # The coordinator ended the stream (it stopped): like going away.
                raise ClientError(grpc.StatusCode.UNAVAILABLE, "the coordinator ended the event stream",
                                  what=f"coordinator {args.coordinator}")
        except ClientError as e:
            if e.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                              grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL):
                raise
            if down_since is None:
                down_since = time.monotonic()
                sys.stderr.write(f"syncrep: events: {_one_line(str(e))}; retrying with backoff (up to "
                                 f"{EVENTS_RETRY_MAX_S:g} s between attempts)\n")
            await asyncio.sleep(delay)
            delay = min(EVENTS_RETRY_MAX_S, delay * 2)


def cmd_events(args: argparse.Namespace) -> int:
    if args.now:
        async def now() -> None:
            async for ev in watch_events(args.coordinator, args.volume, now=True):
                _print_event(ev, args.json)

        asyncio.run(now())
        return EXIT_OK
    try:
        return asyncio.run(_follow_events(args))
    except KeyboardInterrupt:
        sys.stderr.write("syncrep: events: interrupted\n")
        return EXIT_INTERRUPTED


# ---------------------------------------------------------------- grants


def cmd_grant(args: argparse.Namespace) -> int:
    reply = asyncio.run(grant(args.coordinator, args.grantee, args.volume, read_only=args.read_only))
    print(_one_line(reply.message))
    return EXIT_OK


def cmd_revoke(args: argparse.Namespace) -> int:
    reply = asyncio.run(revoke(args.coordinator, args.grantee, args.volume))
    print(_one_line(reply.message))
    return EXIT_OK


def cmd_grants(args: argparse.Namespace) -> int:
    grants = asyncio.run(list_grants(args.coordinator, args.volume))
    if args.json:
        rows = [{"volume": g.volume, "user": g.user, "read_only": g.read_only} for g in grants]
        print(json.dumps({"grants": rows}, indent=2))
    elif not grants:
        print(f"no grants{f' on volume {args.volume}' if args.volume else ''} (admin may use every volume)")
    else:
        table = [("VOLUME", "USER", "ACCESS")] + [
            (g.volume, g.user, "read-only" if g.read_only else "read-write") for g in grants
        ]
        widths = [max(len(t[c]) for t in table) for c in range(2)]
        for t in table:
            print(f"{t[0].ljust(widths[0])}  {t[1].ljust(widths[1])}  {t[2]}")
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
        spool: IO[bytes] | None = None
        try:
            block = client.status.spec.block_size if (args.pad and client.status) else 1
            # Issue 13: the whole input is checked against the volume's end
            # before the first byte is sent (a write that does not fit used to
            # land in part, then fail).
            room = max(0, client.size_bytes - args.offset)
            length, spooled = 0, False
            if client.size_bytes:
                src, length, spooled = await asyncio.to_thread(_measure_input, src, room + 1)
            if spooled:
                spool = src
            if block > 1 and length % block:
                length += block - length % block
            if client.size_bytes and length and args.offset + length > client.size_bytes:
                raise _past_end("write", args.name, args.offset, length, client.size_bytes,
                                at_least=spooled and length > room, outcome="nothing was written")
            t0 = time.monotonic()
            n, count = await _write_stream(client, src, args.offset, args.write_size, args.depth, block)
            return n, count, time.monotonic() - t0
        finally:
            if spool is not None:
                spool.close()
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
    async def run() -> None:
        client = await VolumeClient.connect(args.coordinator, args.name)
        try:
            # Issue 13: checked before the output file is created.
            size = client.size_bytes
            if size and args.offset + args.length > size:
                raise _past_end("read", args.name, args.offset, args.length, size,
                                outcome="nothing was read, no output written")
            with _Output(args.output) as dst:
                done = 0
                while done < args.length:
                    n = min(MAX_WRITE_BYTES, args.length - done)
                    data = await client.read(args.offset + done, n)
                    dst.write(data)
                    done += n
                dst.flush()
        finally:
            await client.close()

    try:
        asyncio.run(run())
    except BrokenPipeError:
        return EXIT_OK  # e.g. `syncrep read ... | head -c 10`
    return EXIT_OK


# ---------------------------------------------------------------- write / read: range checks (issue 13)


def _past_end_text(what: str, name: str, offset: int, length: int, size: int, *, outcome: str,
                   at_least: bool = False) -> str:
    vol = f"volume {name!r} ({size} bytes, {format_size(size)})"
    if at_least:  # a pipe, read only up to the room left plus one byte
        return (f"{what} at offset {offset}: the input is longer than the {max(0, size - offset)} bytes left "
                f"before the end of {vol}: it would go beyond the end; {outcome}")
    return f"{what} of {length} bytes at offset {offset} ends at {offset + length}, beyond the end of {vol}; {outcome}"


def _past_end(what: str, name: str, offset: int, length: int, size: int, *, outcome: str,
              at_least: bool = False) -> ClientError:
    """The refusal of an I/O that crosses the end of the volume (OUT_OF_RANGE, like the node's)."""
    return ClientError(grpc.StatusCode.OUT_OF_RANGE,
                       _past_end_text(what, name, offset, length, size, outcome=outcome, at_least=at_least))


def _measure_input(src: IO[bytes], bound: int) -> tuple[IO[bytes], int, bool]:
    """The input's length, and where to read it from: (stream, length, spooled).

    A regular file (``--input``, or stdin redirected from one) is measured with
    fstat. Anything else (a pipe, a terminal) cannot be measured without being
    read, so it is copied to a temporary file first, at most ``bound`` bytes (the
    room left in the volume plus one): an input that reaches the bound cannot fit
    and is refused before anything is sent, whatever its real length."""
    try:
        st = os.fstat(src.fileno())
        if stat.S_ISREG(st.st_mode):
            return src, max(0, st.st_size - src.tell()), False
    except (OSError, ValueError, io.UnsupportedOperation):
        pass
    spool = tempfile.TemporaryFile(prefix="syncrep-write-")
    n = 0
    try:
        while n < bound:
            chunk = src.read(min(MAX_WRITE_BYTES, bound - n))
            if not chunk:
                break
            spool.write(chunk)
            n += len(chunk)
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return spool, n, True


class _Output:
    """``syncrep read``'s output: stdout, or ``--output FILE`` written to a
    temporary file next to it and renamed over it only when the read succeeded,
    so a failed read leaves no partial file (and an existing file untouched).
    An existing non-regular file (/dev/null, a FIFO) is written in place."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.tmp: Path | None = None
        self.file: IO[bytes] | None = None

    def __enter__(self) -> IO[bytes]:
        if self.path is None:
            return sys.stdout.buffer
        try:
            if self.path.exists() and not self.path.is_file():
                self.file = open(self.path, "wb")
                return self.file
            self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
            # 0o666 and the umask, as open() would create the output itself.
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as e:
            raise CliError(f"cannot open --output {self.path}: {e.strerror or e}") from None
        self.file = os.fdopen(fd, "wb")
        return self.file

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self.file is None:
            return
        try:
            if exc_type is None and self.tmp is not None:
                self.file.flush()
                os.fsync(self.file.fileno())
        finally:
            self.file.close()
            if self.tmp is not None and self.path is not None:
                if exc_type is None:
                    os.replace(self.tmp, self.path)
                else:
                    self.tmp.unlink(missing_ok=True)


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


NO_SECURITY_HELP = (
    "no --certs-dir (or ${env}) and no --insecure: syncrep uses mutual TLS by default. Make the "
    "certificates once (keep ca.key off the nodes): 'syncrep cert create-ca --certs-dir certs --ca-key "
    "ca.key', 'syncrep cert create-node HOST... --certs-dir certs --ca-key ca.key', 'syncrep cert "
    "create-client admin --certs-dir certs --ca-key ca.key'; then pass --certs-dir certs. Or pass "
    "--insecure for plaintext with no authentication (a trusted test network only)"
)


def security_from_args(args: argparse.Namespace) -> rpc.Security:
    """--certs-dir / $SYNCREP_CERTS_DIR / --insecure as an rpc.Security (CliError if
    neither or both). Processes present the node certificate, commands --user's."""
    certs_dir = args.certs_dir
    if certs_dir is None and os.environ.get(certs.CERTS_DIR_ENV):
        certs_dir = Path(os.environ[certs.CERTS_DIR_ENV])
    insecure = bool(args.insecure)
    if insecure and certs_dir is not None:
        # Both set: the one from the higher level wins (flag over environment
        # over file); both from the same level is a contradiction.
        layered = getattr(args, "settings", None)
        rank = {"flag": 3, "env": 2, "file": 1, "default": 0}
        tls_from = layered.sources.get("certs_dir") if layered is not None else None
        plain_from = layered.sources.get("insecure") if layered is not None else None
        tls_rank = rank[tls_from.kind] if tls_from is not None else (3 if args.certs_dir is not None else 2)
        plain_rank = rank[plain_from.kind] if plain_from is not None else 3
        if tls_rank == plain_rank:
            raise CliError("--certs-dir and --insecure exclude each other: pick TLS or plaintext")
        if tls_rank > plain_rank:
            insecure = False
        else:
            certs_dir = None
    if insecure:
        return rpc.Security(None)
    if certs_dir is None:
        raise CliError(NO_SECURITY_HELP.replace("${env}", "$" + certs.CERTS_DIR_ENV))
    user = "" if args.role in ("coordinator", "primary", "secondary") else args.user
    if user:
        try:
            certs.check_user_name(user)
        except certs.CertError as e:
            raise CliError(f"--user: {e}") from None
    return rpc.Security(certs_dir, user)


def _configure_security(args: argparse.Namespace) -> None:
    sec = security_from_args(args)
    try:
        rpc.configure(sec)
    except certs.CertError as e:
        raise CliError(str(e)) from None
    if sec.insecure and args.role != "client":
        log.warning(
            "running in PLAINTEXT (--insecure): no TLS, no authentication; anyone who can reach this "
            "process's ports may write, read and reconfigure volumes"
        )
    elif sec.insecure:
        log.debug("plaintext (--insecure)")
    else:
        (log.debug if args.role == "client" else log.info)("security: %s", sec.describe())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words = _migrate_argv(list(sys.argv[1:] if argv is None else argv))
    try:
        layered = settings.apply(parser, words, os.environ)
    except settings.ConfigError as e:
        sys.stderr.write(f"syncrep: error: {_one_line(str(e))}\n")
        return EXIT_USAGE
    args = parser.parse_args(words)
    args.settings = layered
    setup_logging(args.log_level, args.role, getattr(args, "log_format", "text"))
    if args.role in SECURED_ROLES:
        try:
            _configure_security(args)
        except CliError as e:
            sys.stderr.write(f"syncrep: error: {_one_line(str(e))}\n")
            return EXIT_ERROR
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
        hint = " (TLS handshake failed? check --certs-dir, the CA and the server's SANs)" if (
            code == grpc.StatusCode.UNAVAILABLE and tls_failure(details or "")) else ""
        sys.stderr.write(f"syncrep: error: {_one_line(details or '')}{hint} ({name})\n")
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

