"""Authorisation: one table of RPC -> who may call it, and the server
interceptor that enforces it (issue 11).

Mutual TLS (``syncrep.rpc``) says *who* a peer is: the CN of its verified
certificate and, for node certificates, its SANs. This module says what each
of them may do, in one place, so that a reviewer reads one table instead of
every servicer:

* **admin**: a client certificate with CN ``admin``: may do everything an
  operator does (create, promote, grant, read and write every volume).
* **user**: any client certificate. The table lets users reach
  ``VolumeService``; the handler then checks the user's grant for the
  request's volume (:func:`check_volume`, grants stored by the coordinator).
* **node**: a node certificate (CN ``node`` *and* serverAuth, so a client
  certificate named "node" does not pass, ``certs.peer_is_node``).
* **coordinator**: a node certificate one of whose SANs is the host of the
  coordinator address this node was started with (``--coordinator``). Node
  and coordinator certificates are the same kind (``cockroach cert``
  conventions), so this is the only way to tell them apart. Limitation: on
  one host (every process on 127.0.0.1, as in the tests and the demo) every
  node certificate names that host, so every node qualifies as a coordinator
  of every other node there; across hosts, give each host its own node
  certificate with only its own names.

A plaintext peer (the server runs ``--insecure``: no TLS on the connection)
may do everything, as before TLS: --insecure means "no authentication". A
peer on a TLS connection without a usable identity is UNAUTHENTICATED.

Some rules need the request (which volume, which address) and are finished
by the handler with the helpers below: the interceptor sees only the method.
Every refusal is PERMISSION_DENIED (or UNAUTHENTICATED) with a message that
names who was refused and what they lacked, and ONE WARNING line in the
server's log with the same text (:func:`deny`). Nothing is changed by a
refused call: the interceptor runs before the handler, and the handlers'
checks come before anything they do.

Every RPC of ``syncrep_pb2`` must have a rule (tests/test_authz.py fails
otherwise); a method the table does not know is refused, not allowed.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio

from syncrep import certs, rpc
from syncrep.errors import PermissionDenied, SyncrepError

log = logging.getLogger(__name__)

#: The one user who may do everything (``syncrep cert create-client admin``).
ADMIN_USER = "admin"


class Who(enum.Enum):
    """A kind of caller a rule lets in (see the module docstring)."""

    ADMIN = "admin"
    USER = "users"
    NODE = "nodes"
    COORDINATOR = "coordinators"
    #: Any authenticated peer: a node or a client certificate.
    ANY = "any authenticated peer"


@dataclass(frozen=True)
class Rule:
    """Who may call one RPC. ``then``: what the handler checks besides
    (documentation, shown in the table); ``fault_injection``: also refused
    unless the node runs --enable-fault-injection."""

    who: frozenset[Who]
    then: str = ""
    fault_injection: bool = False

    def allowed_text(self) -> str:
        """``only coordinators and admin may`` (the end of a refusal message)."""
        if Who.ANY in self.who:
            return "any authenticated peer may"
        order = [Who.COORDINATOR, Who.NODE, Who.ADMIN, Who.USER]
        names = [w.value for w in order if w in self.who]
        text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        return f"only {text} may"


def _rule(*who: Who, then: str = "", fault_injection: bool = False) -> Rule:
    return Rule(frozenset(who), then, fault_injection)


_V1 = "syncrep.v1"
_CONTROL = _rule(Who.COORDINATOR, Who.ADMIN)
_ADMIN_ONLY = _rule(Who.ADMIN)
_REGISTERED = "the address it registers or reports as must be the host of one of its certificate's SANs"

#: Every RPC a syncrep server serves -> who may call it. Keys are gRPC's full
#: method names (``/package.Service/Method``), as the interceptor sees them.
RULES: dict[str, Rule] = {
    # ---- ReplicaService: primary -> secondary streams. Admin too (operator
    # tooling and tests open streams; admin may do everything anyway).
    f"/{_V1}.ReplicaService/Replicate": _rule(
        Who.NODE, Who.ADMIN,
        then="a node certificate must name (SAN) the host of the volume's current primary as this "
             "secondary knows it; the stream's epoch is checked by the stream protocol",
    ),
    f"/{_V1}.ReplicaService/Resync": _rule(
        Who.NODE, Who.ADMIN,
        then="a node certificate must name (SAN) the host of the volume's current primary as this "
             "secondary knows it; the stream's epoch is checked by the stream protocol",
    ),
    # ---- NodeService: control RPCs from the coordinator (and admin).
    f"/{_V1}.NodeService/AssignVolume": _CONTROL,
    f"/{_V1}.NodeService/StartResync": _CONTROL,
    f"/{_V1}.NodeService/Repair": _CONTROL,
    f"/{_V1}.NodeService/AbortResync": _CONTROL,
    f"/{_V1}.NodeService/ReadLocal": _CONTROL,
    f"/{_V1}.NodeService/Checksum": _CONTROL,
    f"/{_V1}.NodeService/ListSnapshots": _CONTROL,
    f"/{_V1}.NodeService/PrepareHandover": _CONTROL,
    f"/{_V1}.NodeService/DeleteVolume": _CONTROL,  # issue 13: the coordinator's DeleteVolume
    f"/{_V1}.NodeService/ResizeVolume": _CONTROL,  # issue 13: the coordinator's ResizeVolume
    f"/{_V1}.NodeService/InjectFault": _rule(
        Who.COORDINATOR, Who.ADMIN, then="the node runs --enable-fault-injection", fault_injection=True
    ),
    f"/{_V1}.NodeService/NodeStatus": _rule(Who.ADMIN, Who.COORDINATOR, Who.NODE),
    # ---- VolumeService: users with a grant for the request's volume.
    f"/{_V1}.VolumeService/Write": _rule(
        Who.ADMIN, Who.USER, then="a user needs a read-write grant for each request's volume"
    ),
    f"/{_V1}.VolumeService/WriteOne": _rule(
        Who.ADMIN, Who.USER, then="a user needs a read-write grant for the volume"
    ),
    f"/{_V1}.VolumeService/Read": _rule(Who.ADMIN, Who.USER, then="a user needs a grant (any) for the volume"),
    # ---- CoordinatorService.
    f"/{_V1}.CoordinatorService/RegisterNode": _rule(Who.NODE, then=_REGISTERED),
    f"/{_V1}.CoordinatorService/Heartbeat": _rule(Who.NODE, then=_REGISTERED),
    f"/{_V1}.CoordinatorService/ReportReplication": _rule(Who.NODE, then=_REGISTERED),
    f"/{_V1}.CoordinatorService/GetVolume": _rule(Who.ANY),
    f"/{_V1}.CoordinatorService/ListVolumes": _rule(Who.ANY),
    f"/{_V1}.CoordinatorService/CreateVolume": _ADMIN_ONLY,
    f"/{_V1}.CoordinatorService/Promote": _ADMIN_ONLY,
    f"/{_V1}.CoordinatorService/Switchover": _ADMIN_ONLY,
    f"/{_V1}.CoordinatorService/Resolve": _ADMIN_ONLY,
    f"/{_V1}.CoordinatorService/Grant": _ADMIN_ONLY,
    f"/{_V1}.CoordinatorService/Revoke": _ADMIN_ONLY,
    f"/{_V1}.CoordinatorService/ListGrants": _ADMIN_ONLY,
    f"/{_V1}.CoordinatorService/DeleteVolume": _ADMIN_ONLY,  # issue 13
    f"/{_V1}.CoordinatorService/ResizeVolume": _ADMIN_ONLY,  # issue 13
    # `syncrep events`: what status shows (ListVolumes), as it changes.
    f"/{_V1}.CoordinatorService/WatchEvents": _rule(Who.ANY),
    # Who this coordinator is and who leads (issue 12; `syncrep status`).
    f"/{_V1}.CoordinatorService/CoordinatorInfo": _rule(Who.ANY),
    # ---- Served by every rpc.Server: health and reflection.
    "/grpc.health.v1.Health/Check": _rule(Who.ANY),
    "/grpc.health.v1.Health/Watch": _rule(Who.ANY),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": _rule(Who.ANY),
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": _rule(Who.ANY),
}


def short_method(method: str) -> str:
    """``/syncrep.v1.NodeService/AssignVolume`` -> ``NodeService.AssignVolume``."""
    service, _, name = method.lstrip("/").rpartition("/")
    return f"{service.rsplit('.', 1)[-1]}.{name}" if service else method


def table_markdown() -> str:
    """The table as markdown (for the docs and the issue's closing note)."""
    lines = ["| RPC | who may call it | and the handler checks |", "|---|---|---|"]
    for method, rule in RULES.items():
        who = rule.allowed_text().removeprefix("only ").removesuffix(" may")
        lines.append(f"| `{short_method(method)}` | {who} | {rule.then or '-'} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- identities


def _norm_host(host: str) -> str:
    h = host.strip().lower().rstrip(".")
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        return h


def san_matches(san: str, host: str) -> bool:
    """Whether the SAN ``san`` names ``host`` (an IP address or a DNS name;
    a ``*.`` wildcard covers exactly one leftmost label, as in TLS)."""
    s, h = _norm_host(san), _norm_host(host)
    if not s or not h:
        return False
    if s.startswith("*."):
        head, _, rest = h.partition(".")
        return bool(head) and rest == s[2:]
    return s == h


def sans_name(sans: Iterable[str], host: str) -> bool:
    return any(san_matches(s, host) for s in sans)


def describe(peer: rpc.Peer) -> str:
    """Who ``peer`` is, for a refusal: ``user 'bob' (ipv4:127.0.0.1:40000)``."""
    if not peer.tls:
        return f"plaintext peer ({peer.address})"
    if peer.is_node:
        return f"node certificate with SANs {', '.join(peer.sans) or '(none)'} ({peer.address})"
    return f"user {peer.name!r} ({peer.address})"


@dataclass(frozen=True)
class Policy:
    """What the table needs to know about the server it guards.

    ``coordinator_hosts``: the hosts of the coordinator addresses this node
    was started with (a node certificate naming one of them is a
    coordinator); empty on the coordinator itself. ``fault_injection``: the
    node runs --enable-fault-injection."""

    coordinator_hosts: frozenset[str] = field(default_factory=frozenset)
    fault_injection: bool = False

    @classmethod
    def for_node(cls, coordinators: Iterable[str], *, fault_injection: bool = False) -> Policy:
        return cls(frozenset(rpc.host_of(a) for a in coordinators if a), fault_injection)

    def roles(self, peer: rpc.Peer, is_node: bool | None = None) -> frozenset[Who]:
        """The kinds ``peer`` (a TLS peer) counts as. ``is_node``: the stronger
        check of the certificate's key usage (``certs.peer_is_node``) when the
        caller has it; else the CN decides."""
        if not peer.tls:
            return frozenset(Who)
        node = peer.is_node if is_node is None else is_node
        if node:
            out = {Who.NODE, Who.ANY}
            if any(sans_name(peer.sans, h) for h in self.coordinator_hosts):
                out.add(Who.COORDINATOR)
            return frozenset(out)
        if peer.name == certs.NODE_CN:
            return frozenset()  # CN "node" without serverAuth: neither a node nor a user
        out = {Who.USER, Who.ANY}
        if peer.name == ADMIN_USER:
            out.add(Who.ADMIN)
        return frozenset(out)

    def lacks(self, peer: rpc.Peer, rule: Rule) -> str:
        """What ``peer`` lacked for ``rule``, said so that it can be fixed."""
        text = rule.allowed_text()
        if Who.COORDINATOR in rule.who and peer.is_node:
            hosts = ", ".join(sorted(self.coordinator_hosts)) or "(none: this server has no coordinator)"
            return (
                f"{text} (a coordinator is a node certificate with a SAN for the host of this node's "
                f"--coordinator: {hosts})"
            )
        return text

    def refusal(self, method: str, peer: rpc.Peer, is_node: bool | None = None) -> str | None:
        """None when ``peer`` may call ``method``; else the refusal's message."""
        if not peer.tls:
            return None
        rule = RULES.get(method)
        what = short_method(method)
        if rule is None:
            return f"{describe(peer)} may not call {what}: it has no authorisation rule (refused by default)"
        roles = self.roles(peer, is_node)
        if not roles:
            return (
                f"{describe(peer)} may not call {what}: its certificate has CN {certs.NODE_CN!r} but is not "
                "a node certificate (no serverAuth); make one with 'syncrep cert create-node'"
            )
        if not roles & rule.who:
            return f"{describe(peer)} may not call {what}: {self.lacks(peer, rule)}"
        if rule.fault_injection and not self.fault_injection:
            return (
                f"{describe(peer)} may not call {what}: fault injection is disabled on this node; start it "
                "with --enable-fault-injection (tests only)"
            )
        return None


# ---------------------------------------------------------------- per-request checks (in handlers)

#: Grants as a node keeps them: volume -> user -> read_only.
Grants = Mapping[str, Mapping[str, bool]]


def volume_refusal(peer: rpc.Peer, volume: str, write: bool, grants: Grants | None) -> str | None:
    """None when ``peer`` may read (``write`` False) or write ``volume``;
    else why not. ``grants`` None: this node has not learnt them yet (it
    learns them with its first registration)."""
    if not peer.tls or (peer.name == ADMIN_USER and not peer.is_node):
        return None
    what = "write to" if write else "read"
    who = describe(peer)
    if peer.is_node:
        return f"{who} may not {what} volume {volume!r}: only admin and users granted the volume may"
    if grants is None:
        return (
            f"{who} may not {what} volume {volume!r}: this node has not received the grants from the "
            "coordinator yet (it does at its registration); retry in a moment"
        )
    read_only = grants.get(volume, {}).get(peer.name)
    if read_only is None:
        return (
            f"{who} may not {what} volume {volume!r}: no grant for it (an admin runs "
            f"'syncrep grant {peer.name} --volume {volume}')"
        )
    if write and read_only:
        return (
            f"{who} may not {what} volume {volume!r}: the grant is read-only (an admin runs "
            f"'syncrep grant {peer.name} --volume {volume}' for read-write)"
        )
    return None


def check_volume(peer: rpc.Peer, volume: str, write: bool, grants: Grants | None) -> None:
    """Raise PermissionDenied unless ``peer`` may read or write ``volume``."""
    why = volume_refusal(peer, volume, write, grants)
    if why is not None:
        raise PermissionDenied(why)


def check_registered_address(peer: rpc.Peer, address: str, *, what: str = "register") -> None:
    """A node may register (heartbeat, report) only under an address whose
    host is one of its certificate's SANs; raise PermissionDenied otherwise."""
    if not peer.tls:
        return
    host = rpc.host_of(address)
    if peer.is_node and sans_name(peer.sans, host):
        return
    if not peer.is_node:
        raise PermissionDenied(f"{describe(peer)} may not {what} as node {address}: only node certificates may")
    raise PermissionDenied(
        f"{describe(peer)} may not {what} as node {address}: {host!r} is not among its certificate's SANs "
        f"(make the node's certificate with 'syncrep cert create-node {host} ...')"
    )


def check_stream_peer(peer: rpc.Peer, volume: str, primary: str, kind: str = "replication") -> None:
    """A replication or resync stream for ``volume`` only from the node that
    is its primary as this secondary knows it (``primary``, lv.peer): the
    peer's SANs must name that host. Admin may (operator tooling). Raise
    PermissionDenied otherwise."""
    if not peer.tls or (peer.name == ADMIN_USER and not peer.is_node):
        return
    host = rpc.host_of(primary)
    if peer.is_node and primary and sans_name(peer.sans, host):
        return
    if not peer.is_node:
        raise PermissionDenied(
            f"{describe(peer)} may not open a {kind} stream for volume {volume!r}: only the volume's primary "
            "node (and admin) may"
        )
    raise PermissionDenied(
        f"{describe(peer)} may not open a {kind} stream for volume {volume!r}: it is not the volume's "
        f"primary ({primary or 'none known'}): its certificate's SANs do not include {host!r}"
    )


async def deny(context: aio.ServicerContext, err: SyncrepError | str,
               code: grpc.StatusCode = grpc.StatusCode.PERMISSION_DENIED) -> None:
    """Refuse the call: one WARNING line in this server's log, then abort
    with ``code`` (a PermissionDenied's own code) and the same text."""
    if isinstance(err, SyncrepError):
        code, text = err.code, err.message
    else:
        text = err
    log.warning("refused: %s", text)
    await context.abort(code, rpc.status_details(text))


# ---------------------------------------------------------------- the interceptor


def _auth_context(context: Any) -> Mapping[str, Any]:
    try:
        return context.auth_context() or {}
    except Exception:  # in-memory contexts (the simulator) have none
        return {}


def _is_tls(auth: Mapping[str, Any]) -> bool:
    return [bytes(v) if isinstance(v, bytes | bytearray) else str(v).encode()
            for v in auth.get("transport_security_type", ())] == [b"ssl"]


async def check_call(policy: Policy, method: str, context: Any) -> bool:
    """Check the table for one call; refuse it (abort) and return False, or True."""
    auth = _auth_context(context)
    if not _is_tls(auth):
        return True  # a plaintext server (--insecure): no authentication, as before TLS
    peer = rpc.peer_of(context)
    if not peer.tls:
        await deny(
            context,
            f"TLS peer {peer.address} may not call {short_method(method)}: its certificate carries no "
            "usable identity (no CN); use a certificate made by 'syncrep cert'",
            grpc.StatusCode.UNAUTHENTICATED,
        )
        return False
    is_node = certs.peer_is_node(auth) if peer.is_node else False
    why = policy.refusal(method, peer, is_node)
    if why is not None:
        await deny(context, why)
        return False
    return True


class Interceptor(aio.ServerInterceptor):
    """Check :data:`RULES` before every handler (``rpc.Server(listen,
    interceptors=[Interceptor(policy)])``). An unknown method (no handler)
    is left to gRPC (UNIMPLEMENTED)."""

    def __init__(self, policy: Policy | None = None) -> None:
        self.policy = policy or Policy()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method  # type: ignore[attr-defined]
        policy = self.policy

        # The same check whatever the kind: it needs only the method and the
        # peer, never the request (or the request iterator), which it passes on.
        def checked(behaviour: rpc.Behaviour) -> rpc.Behaviour:
            async def wrapped(request: Any, context: Any) -> Any:
                if not await check_call(policy, method, context):
                    return None
                return await rpc.finish_behaviour(behaviour(request, context), context)

            return wrapped

        return rpc.wrap_handler(handler, checked)


def methods_without_rule(methods: Collection[str]) -> list[str]:
    """The full method names in ``methods`` that :data:`RULES` lacks."""
    return sorted(m for m in methods if m not in RULES)
