"""``python -m deploy up``: start a local cluster and keep it up until Ctrl-C.

Prints the three addresses (and ready-to-paste ``syncrep`` commands), then
waits; Ctrl-C or SIGTERM tears every process down.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from deploy.cluster import ClusterError, LocalCluster
from syncrep import rpc
from syncrep.client import ClientError
from syncrep.units import format_size, parse_size


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deploy",
        description="Local multi-process syncrep cluster for operators and developers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser(
        "up",
        help="start a coordinator, a primary and a secondary; print their addresses; run until Ctrl-C",
        description="Start a coordinator, a primary and a secondary as separate processes on free "
        "loopback ports, print their addresses, and keep them running until Ctrl-C (or SIGTERM).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--workdir", type=Path, default=None,
                   help="directory for data and <name>.log files (default: a new temporary directory)")
    p.add_argument("--volume", default=None, metavar="NAME", help="also create this volume")
    p.add_argument("--size", type=_size, default="64MiB", help="size of --volume")
    p.add_argument("--block-size", type=_size, default="4096", help="block size of --volume")
    p.add_argument("--node-arg", action="append", default=[], metavar="ARG",
                   help="extra flag for both nodes (repeatable; use --node-arg=--durability --node-arg=os)")
    p.add_argument("--coordinator-arg", action="append", default=[], metavar="ARG",
                   help="extra flag for the coordinator (repeatable)")
    p.add_argument("--log-level", default="INFO", help="log level of the processes and of this tool")
    p.add_argument("--insecure", action="store_true",
                   help="run plaintext (default: mutual TLS with a CA made in the workdir)")
    return parser


async def _up(args: argparse.Namespace) -> int:
    cluster = LocalCluster(
        args.workdir,
        coordinator_args=args.coordinator_arg,
        primary_args=args.node_arg,
        secondary_args=args.node_arg,
        log_level=args.log_level.upper(),
        tls=not args.insecure,
    )
    try:
        await cluster.start()
        c = cluster
        print(f"workdir      {c.workdir}")
        for name in ("coordinator", "primary", "secondary"):
            print(f"{name:<12} {c.address(name):<22} pid {c.pid(name)}  log {c.log_path(name)}")
        if args.volume:
            await c.create_volume(args.volume, args.size, args.block_size)
            print(f"volume       {args.volume} ({format_size(args.size)}) in_sync")
        sec = " ".join(c.security_args())
        print(f"security     {'mutual TLS, certificates in ' + str(c.certs_dir) if c.tls else 'PLAINTEXT (--insecure)'}")
        print()
        print("try:")
        if not args.volume:
            print(f"  syncrep volume create vol0 --size 64MiB --primary {c.primary_addr} "
                  f"--secondary {c.secondary_addr} --coordinator {c.coordinator_addr} {sec}")
        print(f"  syncrep status --coordinator {c.coordinator_addr} {sec}")
        print("Ctrl-C stops the cluster.", flush=True)
        sig = await rpc.wait_for_signal((signal.SIGINT, signal.SIGTERM))
        print(f"\nreceived {signal.Signals(sig).name}; stopping...", flush=True)
    finally:
        await cluster.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s deploy[%(process)d] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return asyncio.run(_up(args))
    except ClusterError as e:
        print(f"deploy: error: {e}", file=sys.stderr)
    except ClientError as e:
        print(f"deploy: error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
