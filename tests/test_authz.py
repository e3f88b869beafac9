"""The authorisation table and its interceptor (syncrep/authz.py, issue 11), pure.

* Every RPC of ``syncrep_pb2`` (and health, reflection) has a rule, and no
  rule names an RPC that does not exist: a new RPC without a rule fails here.
* The table, case by case: admin, a user, a node, a coordinator, a client
  certificate with CN "node", a plaintext peer, against each kind of RPC.
* Refusal messages name who was refused and what they lacked.
* The per-request checks the handlers use: grants (none, read-only,
  read-write, not learnt yet), the address a node registers under, the
  primary a replication stream must come from.
* The interceptor on fake calls: a refused call never reaches its handler,
  is aborted with PERMISSION_DENIED (UNAUTHENTICATED without an identity) and
  logs ONE warning; an allowed unary, streaming or generator handler runs;
  a plaintext call passes.

Node certificates for the ``certs.peer_is_node`` check are real (a throwaway
CA in tmp_path). No randomness, so no seed.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from syncrep import authz, certs, rpc
from syncrep.authz import Policy, Who
from syncrep.errors import PermissionDenied
from syncrep.pb import syncrep_pb2

ADDR = "ipv4:127.0.0.1:40000"
COORD = "10.0.0.9:7000"
POLICY = Policy.for_node([COORD], fault_injection=True)

ADMIN = rpc.Peer(True, "admin", (), ADDR)
ALICE = rpc.Peer(True, "alice", (), ADDR)
NODE_A = rpc.Peer(True, certs.NODE_CN, ("10.0.0.1", "node-a.example"), ADDR)
COORDINATOR = rpc.Peer(True, certs.NODE_CN, ("10.0.0.9",), ADDR)
PLAIN = rpc.Peer(False, address=ADDR)


def m(service: str, method: str) -> str:
    return f"/syncrep.v1.{service}/{method}"


def all_methods() -> list[str]:
    out: list[str] = []
    for svc in syncrep_pb2.DESCRIPTOR.services_by_name.values():
        out.extend(f"/{svc.full_name}/{meth.name}" for meth in svc.methods)
    return out


# ---------------------------------------------------------------- completeness


def test_every_rpc_has_a_rule() -> None:
    """Fault: an RPC added to the proto without a rule in the table."""
    missing = authz.methods_without_rule(all_methods())
    assert not missing, f"RPCs without an authorisation rule in syncrep/authz.py RULES: {missing}"


def test_health_and_reflection_have_rules() -> None:
    for method in ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
                   "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"):
        assert authz.RULES[method].who == {Who.ANY}, method


def test_no_rule_for_an_rpc_that_does_not_exist() -> None:
    """Fault: a renamed RPC whose old rule stays behind (the new name would have none)."""
    known = set(all_methods())
    stale = [k for k in authz.RULES if k.startswith("/syncrep.") and k not in known]
    assert not stale, f"rules for RPCs that syncrep_pb2 does not have: {stale}"


def test_unknown_method_refused_by_default() -> None:
    why = POLICY.refusal("/syncrep.v1.NodeService/Nope", ADMIN)
    assert why is not None and "no authorisation rule" in why


def test_table_markdown_lists_every_rule() -> None:
    text = authz.table_markdown()
    assert text.count("\n") == len(authz.RULES) + 1
    assert "| `NodeService.AssignVolume` | coordinators and admin |" in text


# ---------------------------------------------------------------- the table, case by case

ALLOWED = [
    # (method, peer, allowed)
    (m("NodeService", "AssignVolume"), ADMIN, True),
    (m("NodeService", "AssignVolume"), COORDINATOR, True),
    (m("NodeService", "AssignVolume"), NODE_A, False),
    (m("NodeService", "AssignVolume"), ALICE, False),
    (m("NodeService", "Repair"), ALICE, False),
    (m("NodeService", "AbortResync"), NODE_A, False),
    (m("NodeService", "ReadLocal"), ALICE, False),
    (m("NodeService", "Checksum"), COORDINATOR, True),
    (m("NodeService", "PrepareHandover"), COORDINATOR, True),
    (m("NodeService", "InjectFault"), ADMIN, True),
    (m("NodeService", "InjectFault"), ALICE, False),
    (m("NodeService", "NodeStatus"), NODE_A, True),
    (m("NodeService", "NodeStatus"), ALICE, False),
    (m("ReplicaService", "Replicate"), NODE_A, True),  # which node: the handler checks
    (m("ReplicaService", "Replicate"), ALICE, False),
    (m("ReplicaService", "Resync"), ALICE, False),
    (m("ReplicaService", "Replicate"), ADMIN, True),
    (m("VolumeService", "Write"), ALICE, True),  # which volume: the handler checks
    (m("VolumeService", "Write"), NODE_A, False),
    (m("VolumeService", "Read"), ADMIN, True),
    (m("CoordinatorService", "RegisterNode"), NODE_A, True),
    (m("CoordinatorService", "RegisterNode"), ALICE, False),
    (m("CoordinatorService", "RegisterNode"), ADMIN, False),
    (m("CoordinatorService", "Heartbeat"), ALICE, False),
    (m("CoordinatorService", "ReportReplication"), ADMIN, False),
    (m("CoordinatorService", "GetVolume"), ALICE, True),
    (m("CoordinatorService", "ListVolumes"), NODE_A, True),
    (m("CoordinatorService", "CreateVolume"), ALICE, False),
    (m("CoordinatorService", "CreateVolume"), NODE_A, False),
    (m("CoordinatorService", "CreateVolume"), ADMIN, True),
    (m("CoordinatorService", "Promote"), ALICE, False),
    (m("CoordinatorService", "Switchover"), NODE_A, False),
    (m("CoordinatorService", "Resolve"), ALICE, False),
    (m("CoordinatorService", "Grant"), ALICE, False),
    (m("CoordinatorService", "Grant"), ADMIN, True),
    (m("CoordinatorService", "Revoke"), ALICE, False),
    (m("CoordinatorService", "ListGrants"), ALICE, False),
    ("/grpc.health.v1.Health/Check", ALICE, True),
    ("/grpc.health.v1.Health/Check", NODE_A, True),
]


@pytest.mark.parametrize(("method", "peer", "allowed"), ALLOWED,
                         ids=[f"{authz.short_method(a)}-{p.name}{p.sans[:1]}" for a, p, _ in ALLOWED])
def test_table(method: str, peer: rpc.Peer, allowed: bool) -> None:
    why = POLICY.refusal(method, peer)
    assert (why is None) == allowed, why


def test_plaintext_peer_may_do_everything() -> None:
    for method in all_methods():
        assert POLICY.refusal(method, PLAIN) is None, method


def test_refusal_names_who_and_what_was_lacking() -> None:
    why = POLICY.refusal(m("NodeService", "AssignVolume"), rpc.Peer(True, "bob", (), ADDR))
    assert why == (
        "user 'bob' (ipv4:127.0.0.1:40000) may not call NodeService.AssignVolume: only coordinators and admin may"
    )
    why = POLICY.refusal(m("NodeService", "AssignVolume"), NODE_A)
    assert why is not None
    assert "node certificate with SANs 10.0.0.1, node-a.example" in why
    assert "a SAN for the host of this node's --coordinator: 10.0.0.9" in why
    why = POLICY.refusal(m("CoordinatorService", "CreateVolume"), ALICE)
    assert why is not None and why.endswith("may not call CoordinatorService.CreateVolume: only admin may")


def test_fault_injection_needs_the_flag() -> None:
    """Fault: admin arms a fault on a node started without --enable-fault-injection."""
    off = Policy.for_node([COORD], fault_injection=False)
    why = off.refusal(m("NodeService", "InjectFault"), ADMIN)
    assert why is not None and "--enable-fault-injection" in why


def test_client_certificate_named_node_is_no_node() -> None:
    """Fault: someone with the CA key makes a client certificate with CN "node"
    (no serverAuth): it is neither a node nor a user."""
    fake = rpc.Peer(True, certs.NODE_CN, ("10.0.0.9",), ADDR)
    assert POLICY.roles(fake, is_node=False) == frozenset()
    why = POLICY.refusal(m("CoordinatorService", "RegisterNode"), fake, is_node=False)
    assert why is not None and "not a node certificate" in why
    assert POLICY.refusal(m("CoordinatorService", "RegisterNode"), fake, is_node=True) is None


def test_coordinator_is_a_node_naming_the_coordinator_host() -> None:
    assert Who.COORDINATOR in POLICY.roles(COORDINATOR)
    assert Who.COORDINATOR not in POLICY.roles(NODE_A)
    # On the coordinator itself nobody is a coordinator.
    assert Who.COORDINATOR not in Policy().roles(COORDINATOR)
    # Admin is a user too; a user is not admin.
    assert POLICY.roles(ADMIN) == {Who.ADMIN, Who.USER, Who.ANY}
    assert POLICY.roles(ALICE) == {Who.USER, Who.ANY}


@pytest.mark.parametrize(("san", "host", "match"), [
    ("127.0.0.1", "127.0.0.1", True),
    ("127.0.0.1", "127.0.0.2", False),
    ("::1", "[::1]", True),
    ("0:0:0:0:0:0:0:1", "::1", True),
    ("Node-A.Example", "node-a.example.", True),
    ("*.example", "node-a.example", True),
    ("*.example", "a.b.example", False),
    ("*.example", "example", False),
    ("", "x", False),
])
def test_san_matches(san: str, host: str, match: bool) -> None:
    assert authz.san_matches(san, host) is match


# ---------------------------------------------------------------- the handlers' checks

GRANTS = {"vol1": {"alice": True, "carol": False}}


def test_volume_grants() -> None:
    """Faults: no grant, a write under a read-only grant, a node writing, grants not learnt yet."""
    authz.check_volume(ADMIN, "vol1", True, None)  # admin: always
    authz.check_volume(PLAIN, "vol1", True, None)  # --insecure: always
    authz.check_volume(ALICE, "vol1", False, GRANTS)  # read-only grant: reads
    authz.check_volume(rpc.Peer(True, "carol", (), ADDR), "vol1", True, GRANTS)
    with pytest.raises(PermissionDenied, match="the grant is read-only") as ei:
        authz.check_volume(ALICE, "vol1", True, GRANTS)
    assert ei.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "user 'alice' (ipv4:127.0.0.1:40000) may not write to volume 'vol1'" in ei.value.message
    with pytest.raises(PermissionDenied, match=r"no grant for it .*syncrep grant alice --volume vol2"):
        authz.check_volume(ALICE, "vol2", False, GRANTS)
    with pytest.raises(PermissionDenied, match="has not received the grants"):
        authz.check_volume(ALICE, "vol1", False, None)
    with pytest.raises(PermissionDenied, match="only admin and users granted"):
        authz.check_volume(NODE_A, "vol1", False, GRANTS)


def test_registered_address_must_be_a_san() -> None:
    """Fault: a node registers under an address its certificate does not name."""
    authz.check_registered_address(NODE_A, "10.0.0.1:7001")
    authz.check_registered_address(NODE_A, "node-a.example:7001")
    authz.check_registered_address(PLAIN, "anything:1")
    with pytest.raises(PermissionDenied, match=r"'10\.0\.0\.2' is not among its certificate's SANs"):
        authz.check_registered_address(NODE_A, "10.0.0.2:7001")
    with pytest.raises(PermissionDenied, match="only node certificates may"):
        authz.check_registered_address(ADMIN, "10.0.0.1:7001")


def test_stream_only_from_the_volumes_primary() -> None:
    """Fault: a node that is not the volume's primary opens a replication stream."""
    authz.check_stream_peer(NODE_A, "vol1", "10.0.0.1:7001")
    authz.check_stream_peer(ADMIN, "vol1", "10.0.0.1:7001")
    with pytest.raises(PermissionDenied, match=r"not the volume's primary \(10\.0\.0\.5:7001\)"):
        authz.check_stream_peer(NODE_A, "vol1", "10.0.0.5:7001")
    with pytest.raises(PermissionDenied, match="none known"):
        authz.check_stream_peer(NODE_A, "vol1", "")
    with pytest.raises(PermissionDenied, match=r"user 'alice'.*only the volume's primary node"):
        authz.check_stream_peer(ALICE, "vol1", "10.0.0.1:7001")


# ---------------------------------------------------------------- the interceptor on fake calls


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class FakeContext:
    def __init__(self, auth: dict[str, list[bytes]]) -> None:
        self.auth = auth
        self.written: list[Any] = []

    def peer(self) -> str:
        return ADDR

    def auth_context(self) -> dict[str, list[bytes]]:
        return self.auth

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)

    async def write(self, item: Any) -> None:
        self.written.append(item)


class Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata: tuple[()] = ()


def tls_auth(cn: str, sans: list[str] = (), pem: bytes = b"") -> dict[str, list[bytes]]:  # type: ignore[assignment]
    auth = {"transport_security_type": [b"ssl"], "x509_common_name": [cn.encode()],
            "x509_subject_alternative_name": [s.encode() for s in sans]}
    if pem:
        auth["x509_pem_cert"] = [pem]
    return auth


@pytest.fixture(scope="module")
def node_pem(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    root = tmp_path_factory.mktemp("pki")
    certs.create_all(root / "certs", root / "ca.key", ["10.0.0.9"], users=())
    return (root / "certs" / certs.NODE_CERT_FILE).read_bytes()


async def intercept(method: str, handler: grpc.RpcMethodHandler, ctx: FakeContext,
                    policy: Policy = POLICY, request: Any = "req") -> Any:
    async def continuation(_: Any) -> grpc.RpcMethodHandler:
        return handler

    wrapped = await authz.Interceptor(policy).intercept_service(continuation, Details(method))  # type: ignore[arg-type]
    fn = wrapped.unary_unary or wrapped.unary_stream or wrapped.stream_unary or wrapped.stream_stream
    return await fn(request, ctx)


async def test_interceptor_refuses_before_the_handler(caplog: pytest.LogCaptureFixture) -> None:
    """Fault: user bob calls NodeService.AssignVolume."""
    called: list[Any] = []

    async def handler(request: Any, context: Any) -> str:
        called.append(request)
        return "done"

    ctx = FakeContext(tls_auth("bob"))
    with caplog.at_level(logging.WARNING, logger="syncrep.authz"), pytest.raises(Aborted) as ei:
        await intercept(m("NodeService", "AssignVolume"), grpc.unary_unary_rpc_method_handler(handler), ctx)
    assert not called, "the handler ran for a refused call"
    assert ei.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert ei.value.details == (
        "user 'bob' (ipv4:127.0.0.1:40000) may not call NodeService.AssignVolume: only coordinators and admin may"
    )
    lines = [r for r in caplog.records if r.name == "syncrep.authz"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert ei.value.details in lines[0].getMessage()


async def test_interceptor_lets_allowed_calls_through(node_pem: bytes) -> None:
    async def unary(request: Any, context: Any) -> str:
        return f"answer to {request}"

    async def generator(request: Any, context: Any) -> AsyncIterator[str]:
        yield "one"
        yield "two"

    async def writer(request_iterator: Any, context: Any) -> None:
        await context.write("written")

    assert await intercept(m("NodeService", "NodeStatus"), grpc.unary_unary_rpc_method_handler(unary),
                           FakeContext(tls_auth("admin"))) == "answer to req"
    ctx = FakeContext(tls_auth(certs.NODE_CN, ["10.0.0.9"], node_pem))
    assert await intercept(m("NodeService", "AssignVolume"), grpc.unary_unary_rpc_method_handler(unary),
                           ctx) == "answer to req"
    ctx = FakeContext(tls_auth("alice"))
    await intercept("/grpc.health.v1.Health/Watch", grpc.unary_stream_rpc_method_handler(generator), ctx)
    assert ctx.written == ["one", "two"]
    ctx = FakeContext(tls_auth("alice"))
    await intercept(m("VolumeService", "Write"), grpc.stream_stream_rpc_method_handler(writer), ctx)
    assert ctx.written == ["written"]


async def test_interceptor_plaintext_passes() -> None:
    async def unary(request: Any, context: Any) -> str:
        return "ok"

    for auth in ({}, {"transport_security_type": [b"insecure"]}):
        assert await intercept(m("NodeService", "AssignVolume"), grpc.unary_unary_rpc_method_handler(unary),
                               FakeContext(auth)) == "ok"


async def test_interceptor_tls_without_identity_is_unauthenticated() -> None:
    """Fault: a TLS connection whose certificate has no CN."""
    async def unary(request: Any, context: Any) -> str:
        raise AssertionError("the handler ran")

    with pytest.raises(Aborted) as ei:
        await intercept(m("CoordinatorService", "GetVolume"), grpc.unary_unary_rpc_method_handler(unary),
                        FakeContext({"transport_security_type": [b"ssl"]}))
    assert ei.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "no usable identity" in ei.value.details


async def test_interceptor_node_cn_without_server_auth_refused(tmp_path: Path) -> None:
    """Fault: a node's CN on a certificate without serverAuth (a client certificate's key usage)."""
    root = tmp_path
    certs.create_all(root / "certs", root / "ca.key", ["10.0.0.9"], users=("alice",))
    client_pem = (root / "certs" / "client.alice.crt").read_bytes()

    async def unary(request: Any, context: Any) -> str:
        raise AssertionError("the handler ran")

    with pytest.raises(Aborted) as ei:
        await intercept(m("CoordinatorService", "RegisterNode"), grpc.unary_unary_rpc_method_handler(unary),
                        FakeContext(tls_auth(certs.NODE_CN, ["10.0.0.9"], client_pem)))
    assert ei.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "not a node certificate" in ei.value.details


#: Each kind of gRPC method handler, by the attribute that holds its behaviour.
KINDS = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


@pytest.mark.parametrize("kind", list(KINDS))
async def test_interceptor_checks_every_kind_of_handler(kind: str) -> None:
    """Fault: user bob calls NodeService.AssignVolume through a handler of each of
    the four kinds (the interceptor rebuilds them with rpc.wrap_handler): refused
    before the handler, and the rebuilt handler keeps its kind and its
    (de)serializers; admin's call reaches the handler."""
    called: list[Any] = []

    async def behaviour(request: Any, context: Any) -> str:
        called.append(request)
        return "done"

    def deser(b: bytes) -> str:
        return b.decode()

    def ser(s: str) -> bytes:
        return s.encode()

    handler = KINDS[kind](behaviour, request_deserializer=deser, response_serializer=ser)

    async def continuation(_: Any) -> grpc.RpcMethodHandler:
        return handler

    method = m("NodeService", "AssignVolume")
    wrapped = await authz.Interceptor(POLICY).intercept_service(continuation, Details(method))  # type: ignore[arg-type]
    kinds = [k for k in KINDS if getattr(wrapped, k) is not None]
    assert kinds == [kind], f"a {kind} handler came back as {kinds}"
    assert (wrapped.request_deserializer, wrapped.response_serializer) == (deser, ser)
    assert wrapped.request_streaming == handler.request_streaming
    assert wrapped.response_streaming == handler.response_streaming
    fn = getattr(wrapped, kind)
    with pytest.raises(Aborted) as ei:
        await fn("req", FakeContext(tls_auth("bob")))
    assert ei.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert not called, f"the {kind} handler ran for a refused call"
    assert await fn("req", FakeContext(tls_auth("admin"))) == "done"
    assert called == ["req"]


def test_wrap_handler_leaves_an_empty_handler_alone() -> None:
    """A handler with no behaviour (none of the four kinds) comes back as it is."""
    empty = grpc.unary_unary_rpc_method_handler(None)  # type: ignore[arg-type]
    assert rpc.wrap_handler(empty, lambda b: b) is empty
