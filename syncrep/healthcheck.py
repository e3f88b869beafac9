"""``python -m syncrep.healthcheck [ADDR]``: exit 0 when the syncrep server at
ADDR answers the gRPC health service (grpc.health.v1 Check) with SERVING,
else 1 with one line on stderr saying why.

Why it exists: container HEALTHCHECKs and Kubernetes probes must check the
real gRPC server, and syncrep speaks mutual TLS by default, which the
kubelet's native ``grpc:`` probe cannot (it has no client certificate). So
the probe runs this beside the server, in the same container, with the same
certs dir: it presents the node certificate (or ``client.USER.crt`` with
``--user``), through syncrep.rpc like every other channel.

The name checked against the server's certificate: gRPC verifies that the
certificate lists the host it dials. A probe dials the loopback address,
which a node certificate usually does not list; since the server presents
the very ``node.crt`` of the certs dir given here, the default is to expect
that certificate's first SAN when dialling a loopback address (or the
address itself when the certificate lists it). ``--server-name`` overrides.

ADDR defaults to ``$SYNCREP_HEALTH_ADDR`` and the certs dir to
``$SYNCREP_CERTS_DIR`` (as for every syncrep command), so that an image can
set them once (deploy/Containerfile). Every failure exits 1, a usage error
included: a probe has only healthy and unhealthy (Docker reserves 2).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from syncrep import certs, rpc

#: Where the probe dials when no ADDR is given.
HEALTH_ADDR_ENV = "SYNCREP_HEALTH_ADDR"
#: How long one probe waits for the answer (a probe's own timeout should be longer).
DEFAULT_TIMEOUT_S = 3.0
EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"syncrep.healthcheck: error: {message}\n")
        sys.exit(EXIT_UNHEALTHY)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m syncrep.healthcheck",
                description="Exit 0 when the syncrep server at ADDR reports SERVING (gRPC health), else 1.")
    p.add_argument("address", nargs="?", default=os.environ.get(HEALTH_ADDR_ENV), metavar="ADDR",
                   help=f"HOST:PORT of the server (default: ${HEALTH_ADDR_ENV})")
    p.add_argument("--certs-dir", type=Path, default=None, metavar="DIR",
                   help=f"mutual TLS with DIR's ca.crt and node.crt (default: ${certs.CERTS_DIR_ENV})")
    p.add_argument("--insecure", action="store_true", help="plaintext (a server run with --insecure)")
    p.add_argument("--user", default="", metavar="USER",
                   help="present DIR/client.USER.crt instead of the node certificate")
    p.add_argument("--server-name", default="", metavar="NAME",
                   help="the name the server's certificate must list (default: the host of ADDR, or "
                        "for a loopback ADDR the first SAN of DIR/node.crt)")
    p.add_argument("--service", default="", metavar="NAME",
                   help="the health service name to check (default: '', the whole server)")
    p.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                   help=f"seconds to wait for the answer (default: {DEFAULT_TIMEOUT_S})")
    return p


class ProbeError(Exception):
    """Why the server is not healthy (or the probe cannot tell), one line."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def expected_server_name(address: str, certs_dir: Path, server_name: str = "") -> str:
    """The name to verify the server's certificate against ("" = gRPC's
    default, the host of ``address``); see the module docstring."""
    if server_name:
        return server_name
    host = rpc.host_of(address)
    if not _is_loopback(host):
        return ""
    try:
        sans = certs.cert_sans((certs_dir / certs.NODE_CERT_FILE).read_bytes())
    except (OSError, certs.CertError):
        return ""  # load_node_tls below says what is wrong with the file
    if not sans or host in sans:
        return ""
    return sans[0]


def security_from_args(args: argparse.Namespace) -> rpc.Security:
    certs_dir = args.certs_dir
    if certs_dir is None and not args.insecure and os.environ.get(certs.CERTS_DIR_ENV):
        certs_dir = Path(os.environ[certs.CERTS_DIR_ENV])
    if args.insecure and args.certs_dir is not None:
        raise ProbeError("--certs-dir and --insecure exclude each other")
    if args.insecure:
        return rpc.Security(None)
    if certs_dir is None:
        raise ProbeError(f"no --certs-dir (or ${certs.CERTS_DIR_ENV}) and no --insecure")
    return rpc.Security(certs_dir, args.user)


def check(address: str, *, server_name: str = "", service: str = "",
          timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """Ask ``address`` for its health with this process's rpc security;
    returns the status name when SERVING, raises ProbeError otherwise."""
    sec = rpc.security
    name = ""
    if sec is not None and sec.certs_dir is not None:
        name = expected_server_name(address, sec.certs_dir, server_name)
    if name:
        creds = rpc.channel_credentials()
        assert creds is not None
        ch = grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", name)])
    else:
        ch = rpc.sync_channel(address)
    try:
        with ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
    except grpc.RpcError as e:
        code = e.code().name if e.code() is not None else "UNKNOWN"
        raise ProbeError(f"{address}: {code}: {' '.join((e.details() or '').split())}") from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise ProbeError(f"{address}: {status}")
    return str(status)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not args.address:
            raise ProbeError(f"no ADDR and no ${HEALTH_ADDR_ENV}")
        try:
            rpc.configure(security_from_args(args))
        except certs.CertError as e:
            raise ProbeError(str(e)) from None
        status = check(args.address, server_name=args.server_name, service=args.service,
                       timeout_s=args.timeout_s)
    except ProbeError as e:
        sys.stderr.write(f"syncrep.healthcheck: unhealthy: {e}\n")
        return EXIT_UNHEALTHY
    sys.stdout.write(f"{args.address}: {status}\n")
    return EXIT_HEALTHY


if __name__ == "__main__":
    sys.exit(main())
