"""``syncrep cert`` and the TLS credential loaders (syncrep/certs.py, issue 11).

* The commands, run through their argparse parsers (``add_cert_commands``):
  the files they write, their modes, their SANs and key usages, refusing to
  overwrite, refusing bad names and hosts.
* The loaders refuse, naming the file and the command that fixes it: a key
  file others can read, a missing file, a certificate from another CA, an
  expired one, a client certificate copied in as node.crt, a key that is not
  the certificate's. They never need the CA key.
* Real gRPC with mutual TLS on 127.0.0.1 (a grpc.aio server with
  ``require_client_auth=True`` and a bytes-in/bytes-out generic handler): the
  server sees the client's CN through ``peer_identity``; a client with a
  certificate from another CA, an expired certificate or none at all is
  refused at the handshake; a client dialing an address that is not in the
  server's SANs refuses the server (unless ``grpc.ssl_target_name_override``
  names a SAN).

None of these tests uses randomness (keys come from the OS's CSPRNG and do
not change what is tested), so none takes a seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import shutil
import stat
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from syncrep import certs
from syncrep.certs import CertError

#: Bound of every RPC of these tests; a handshake on loopback takes milliseconds.
RPC_TIMEOUT_S = 5.0
METHOD = "/syncrep.test.Who/Am"


def run(*argv: str) -> int:
    """Run ``syncrep cert ...`` through the parser syncrep.cli will use."""
    parser = argparse.ArgumentParser(prog="syncrep")
    sub = parser.add_subparsers(dest="command", required=True)
    certs.add_cert_commands(sub)
    args = parser.parse_args(["cert", *argv])
    assert args.role == "cert"
    return int(args.func(args))


def make_pki(root: Path, hosts: list[str], users: tuple[str, ...] = ("admin",)) -> tuple[Path, Path]:
    """A CA, a node certificate for ``hosts`` and client certificates, via the CLI."""
    d, ca_key = root / "certs", root / "safe" / "ca.key"
    assert run("create-ca", "--certs-dir", str(d), "--ca-key", str(ca_key)) == 0
    assert run("create-node", *hosts, "--certs-dir", str(d), "--ca-key", str(ca_key)) == 0
    for u in users:
        assert run("create-client", u, "--certs-dir", str(d), "--ca-key", str(ca_key)) == 0
    return d, ca_key


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def load(p: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(p.read_bytes())


# ---------------------------------------------------------------- the commands


def test_create_ca_node_client_write_files_with_modes_sans_and_usages(tmp_path: Path) -> None:
    d, ca_key = make_pki(tmp_path, ["127.0.0.1", "node-a.example", "[::1]"], users=("admin", "alice"))
    for key in (ca_key, d / "node.key", d / "client.admin.key", d / "client.alice.key"):
        assert mode(key) == 0o600, key
    for crt in ("ca.crt", "node.crt", "client.admin.crt", "client.alice.crt"):
        assert mode(d / crt) == 0o644, crt
    assert not (d / "ca.key").exists(), "the CA key goes to --ca-key only"

    ca = load(d / "ca.crt")
    assert certs.cert_common_name((d / "ca.crt").read_bytes()) == "syncrep CA"
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert bc.ca and ku.key_cert_sign and ku.crl_sign
    assert 3649 <= (ca.not_valid_after_utc - ca.not_valid_before_utc).days <= 3651

    node_pem = (d / "node.crt").read_bytes()
    assert certs.cert_common_name(node_pem) == "node"
    # Exactly the hosts given: no implicit localhost / 127.0.0.1 beyond them.
    assert certs.cert_sans(node_pem) == ["127.0.0.1", "node-a.example", "::1"]
    node = load(d / "node.crt")
    sans = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert sans.get_values_for_type(x509.DNSName) == ["node-a.example"]
    ekus = set(node.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert ekus == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    node.verify_directly_issued_by(ca)
    assert 364 <= (node.not_valid_after_utc - node.not_valid_before_utc).days <= 366

    alice = load(d / "client.alice.crt")
    assert certs.cert_common_name((d / "client.alice.crt").read_bytes()) == "alice"
    assert certs.cert_sans((d / "client.alice.crt").read_bytes()) == []
    assert set(alice.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.CLIENT_AUTH
    }
    alice.verify_directly_issued_by(ca)


def test_create_node_only_the_given_hosts(tmp_path: Path) -> None:
    d, _ = make_pki(tmp_path, ["10.1.2.3"])
    assert certs.cert_sans((d / "node.crt").read_bytes()) == ["10.1.2.3"]


def test_lifetime_days_and_lifetime_capped_by_the_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d, k = tmp_path / "certs", tmp_path / "ca.key"
    assert run("create-ca", "--certs-dir", str(d), "--ca-key", str(k), "--lifetime-days", "30") == 0
    assert run("create-client", "bob", "--certs-dir", str(d), "--ca-key", str(k), "--lifetime-days", "7") == 0
    bob = load(d / "client.bob.crt")
    assert 6 <= (bob.not_valid_after_utc - bob.not_valid_before_utc).days <= 7
    assert run("create-node", "h1", "--certs-dir", str(d), "--ca-key", str(k)) == 0
    assert load(d / "node.crt").not_valid_after_utc == load(d / "ca.crt").not_valid_after_utc
    assert "expires with its CA" in capsys.readouterr().err


def test_refuses_to_overwrite_without_overwrite_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d, k = make_pki(tmp_path, ["127.0.0.1"])
    before = {p.name: p.read_bytes() for p in [*d.iterdir(), k]}
    capsys.readouterr()
    assert run("create-ca", "--certs-dir", str(d), "--ca-key", str(k)) == 1
    err = capsys.readouterr().err
    assert "already exist" in err and "--overwrite" in err and err.count("\n") == 1
    assert run("create-node", "127.0.0.1", "--certs-dir", str(d), "--ca-key", str(k)) == 1
    assert run("create-client", "admin", "--certs-dir", str(d), "--ca-key", str(k)) == 1
    # A CA key alone (e.g. ca.crt deleted) still blocks a new CA: it would orphan every certificate.
    (d / "ca.crt").unlink()
    assert run("create-ca", "--certs-dir", str(d), "--ca-key", str(k)) == 1
    assert k.read_bytes() == before["ca.key"]
    for p in d.iterdir():
        assert p.read_bytes() == before[p.name], p
    assert not [p for p in d.iterdir() if p.name.startswith(".")], "no temporary files left"

    assert run("create-ca", "--certs-dir", str(d), "--ca-key", str(k), "--overwrite") == 0
    assert k.read_bytes() != before["ca.key"] and mode(k) == 0o600
    assert run("create-node", "127.0.0.2", "--certs-dir", str(d), "--ca-key", str(k), "--overwrite") == 0
    assert certs.cert_sans((d / "node.crt").read_bytes()) == ["127.0.0.2"]
    assert mode(d / "node.key") == 0o600
    certs.load_node_tls(d)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["create-client", "bad/name"], "invalid user name 'bad/name'"),
        (["create-client", "-x"], None),  # argparse: an option, usage error
        (["create-client", "a" * 65], "invalid user name"),
        (["create-client", ".hidden"], "invalid user name"),
        (["create-client", "node"], "reserved for node certificates"),
        (["create-node", "host:7001"], "without a port"),
        (["create-node", "bad_host!"], "invalid host"),
    ],
)
def test_refuses_bad_names_with_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str | None
) -> None:
    d, k = tmp_path / "certs", tmp_path / "ca.key"
    assert run("create-ca", "--certs-dir", str(d), "--ca-key", str(k)) == 0
    capsys.readouterr()
    if message is None:
        with pytest.raises(SystemExit) as e:
            run(*argv, "--certs-dir", str(d), "--ca-key", str(k))
        assert e.value.code == 2
        return
    assert run(*argv, "--certs-dir", str(d), "--ca-key", str(k)) == 1
    err = capsys.readouterr().err
    assert err.startswith("syncrep: error: ") and message in err and err.count("\n") == 1
    assert sorted(p.name for p in d.iterdir()) == ["ca.crt"]


def test_valid_user_names(tmp_path: Path) -> None:
    for name in ("admin", "a", "A.b_c-9", "x" * 64):
        certs.check_user_name(name)


def test_list_shows_cn_sans_expiry_and_signer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d, _ = make_pki(tmp_path, ["127.0.0.1", "node-a.example"])
    other, _ = make_pki(tmp_path / "other", ["127.0.0.1"])
    shutil.copy(other / "client.admin.crt", d / "client.stranger.crt")
    capsys.readouterr()
    assert run("list", "--certs-dir", str(d)) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["FILE", "CN", "SANS"]
    rows = {line.split()[0]: line for line in out[1:]}
    assert set(rows) == {"ca.crt", "client.admin.crt", "client.stranger.crt", "node.crt"}
    assert "syncrep CA" in rows["ca.crt"] and rows["ca.crt"].endswith("is the CA")
    assert "127.0.0.1,node-a.example" in rows["node.crt"] and rows["node.crt"].endswith("yes")
    assert rows["client.admin.crt"].split()[1] == "admin" and rows["client.admin.crt"].endswith("yes")
    assert rows["client.stranger.crt"].endswith("no")
    year = str(load(d / "node.crt").not_valid_after_utc.year)
    assert year in rows["node.crt"]


# ---------------------------------------------------------------- the loaders


def test_load_node_and_client_tls(tmp_path: Path) -> None:
    d, ca_key = make_pki(tmp_path, ["127.0.0.1"])
    ca_key.unlink()  # a running process never needs the CA key
    node = certs.load_node_tls(d)
    assert node.name == "node" and node.cert_path == d / "node.crt" and node.key_path == d / "node.key"
    assert node.ca_crt == (d / "ca.crt").read_bytes() and node.key == (d / "node.key").read_bytes()
    admin = certs.load_client_tls(d, "admin")
    assert admin.name == "admin" and admin.cert_path == d / "client.admin.crt"
    with pytest.raises(dataclasses.FrozenInstanceError):
        admin.name = "root"  # type: ignore[misc]


@pytest.mark.parametrize("bad_mode", [0o644, 0o640, 0o604, 0o620])
def test_key_file_accessible_by_others_is_refused(tmp_path: Path, bad_mode: int) -> None:
    d, _ = make_pki(tmp_path, ["127.0.0.1"])
    key = d / "node.key"
    key.chmod(bad_mode)
    with pytest.raises(CertError) as e:
        certs.load_node_tls(d)
    msg = str(e.value)
    assert msg.startswith(f"key file {key} is ") and f"by others (mode {bad_mode:04o})" in msg
    assert f"run `chmod 600 {key}`" in msg
    if bad_mode & 0o044:
        assert "is readable by others" in msg
    with pytest.raises(CertError):
        certs.check_key_file(key)
    key.chmod(0o600)
    certs.check_key_file(key)
    certs.load_node_tls(d)
    key.chmod(0o400)
    certs.check_key_file(key)


def test_world_readable_ca_key_is_refused_by_create_node(tmp_path: Path) -> None:
    d, k = make_pki(tmp_path, ["127.0.0.1"])
    k.chmod(0o644)
    with pytest.raises(CertError, match=r"readable by others \(mode 0644\); run `chmod 600"):
        certs.create_node_cert(d, k, ["127.0.0.1"], overwrite=True)


def test_missing_files_name_the_command_that_makes_them(tmp_path: Path) -> None:
    d, k = tmp_path / "certs", tmp_path / "ca.key"
    d.mkdir()
    with pytest.raises(CertError, match=r"ca\.crt is missing; .*syncrep cert create-ca --certs-dir"):
        certs.load_node_tls(d)
    certs.create_ca(d, k)
    with pytest.raises(CertError, match=r"node\.crt is missing; .*syncrep cert create-node HOST\.\.\. --certs-dir"):
        certs.load_node_tls(d)
    with pytest.raises(CertError, match=r"client\.bob\.crt is missing; .*syncrep cert create-client bob --certs-dir"):
        certs.load_client_tls(d, "bob")
    certs.create_node_cert(d, k, ["127.0.0.1"])
    (d / "node.key").unlink()
    with pytest.raises(CertError, match=r"node\.key is missing; .*create-node"):
        certs.load_node_tls(d)
    with pytest.raises(CertError, match="invalid user name"):
        certs.load_client_tls(d, "../etc")


def test_loader_refuses_node_cert_from_another_ca(tmp_path: Path) -> None:
    d, _ = make_pki(tmp_path / "a", ["127.0.0.1"])
    other, _ = make_pki(tmp_path / "b", ["127.0.0.1"])
    shutil.copy(other / "node.crt", d / "node.crt")
    shutil.copy(other / "node.key", d / "node.key")
    with pytest.raises(CertError, match=r"node\.crt is not signed by the CA in .*ca\.crt"):
        certs.load_node_tls(d)


def test_loader_refuses_key_of_another_cert(tmp_path: Path) -> None:
    d, _ = make_pki(tmp_path, ["127.0.0.1"])
    shutil.copy(d / "client.admin.key", d / "node.key")
    with pytest.raises(CertError, match=r"node\.key is not the key of .*node\.crt"):
        certs.load_node_tls(d)


def test_loader_refuses_expired_cert(tmp_path: Path) -> None:
    d, k = make_pki(tmp_path, ["127.0.0.1"])
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    certs.create_node_cert(d, k, ["127.0.0.1"], lifetime_days=1, overwrite=True, now=long_ago)
    with pytest.raises(CertError, match=r"node\.crt expired on .*--overwrite"):
        certs.load_node_tls(d)
    # Valid when the clock says so: the check is the expiry, nothing else.
    certs.load_node_tls(d, now=long_ago + dt.timedelta(hours=12))


def test_loader_refuses_client_cert_used_as_node(tmp_path: Path) -> None:
    d, _ = make_pki(tmp_path, ["127.0.0.1"])
    shutil.copy(d / "client.admin.crt", d / "node.crt")
    shutil.copy(d / "client.admin.key", d / "node.key")
    with pytest.raises(CertError, match=r"node\.crt is for 'admin', not 'node'"):
        certs.load_node_tls(d)
    # And a node certificate renamed as a user's is not that user.
    d2, _ = make_pki(tmp_path / "two", ["127.0.0.1"])
    shutil.copy(d2 / "node.crt", d2 / "client.admin.crt")
    shutil.copy(d2 / "node.key", d2 / "client.admin.key")
    with pytest.raises(CertError, match=r"client\.admin\.crt is for 'node', not 'admin'"):
        certs.load_client_tls(d2, "admin")


def test_peer_identity_without_tls_is_anonymous() -> None:
    assert certs.peer_identity({}) == ("", [])
    assert certs.peer_identity({"transport_security_type": [b"insecure"]}) == ("", [])
    ctx = {
        "transport_security_type": [b"ssl"],
        "x509_common_name": [b"node"],
        "x509_subject_alternative_name": [b"node-a.example", b"10.0.0.1"],
    }
    assert certs.peer_identity(ctx) == ("node", ["node-a.example", "10.0.0.1"])
    assert not certs.peer_is_node(ctx), "without the PEM the usage cannot be checked"


# ---------------------------------------------------------------- real gRPC with mutual TLS


async def _who(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    auth = context.auth_context()
    cn, sans = certs.peer_identity(auth)
    return json.dumps({"cn": cn, "sans": sans, "is_node": certs.peer_is_node(auth),
                       "keys": sorted(auth)}).encode()


class MtlsServer:
    """A grpc.aio server on 127.0.0.1 with node.crt, requiring a client certificate."""

    def __init__(self, node: certs.TlsFiles) -> None:
        self.server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            "syncrep.test.Who", {"Am": grpc.unary_unary_rpc_method_handler(_who)}
        )
        self.server.add_generic_rpc_handlers((handler,))
        creds = grpc.ssl_server_credentials(
            [(node.key, node.cert)], root_certificates=node.ca_crt, require_client_auth=True
        )
        self.port = self.server.add_secure_port("127.0.0.1:0", creds)
        assert self.port, "could not bind 127.0.0.1"

    async def __aenter__(self) -> MtlsServer:
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop(None)


async def call(
    port: int, ca: bytes, key: bytes | None, cert: bytes | None, *, host: str = "127.0.0.1",
    options: list[tuple[str, str]] | None = None,
) -> dict[str, Any]:
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    async with grpc.aio.secure_channel(f"{host}:{port}", creds, options=options or []) as ch:
        reply = await ch.unary_unary(METHOD)(b"", timeout=RPC_TIMEOUT_S)
    result: dict[str, Any] = json.loads(reply)
    return result


async def refused(coro: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await coro  # type: ignore[misc]
    return e.value


async def test_mtls_server_sees_client_cn(tmp_path: Path) -> None:
    d, _ = make_pki(tmp_path, ["127.0.0.1"], users=("alice",))
    node, alice = certs.load_node_tls(d), certs.load_client_tls(d, "alice")
    async with MtlsServer(node) as s:
        r = await call(s.port, alice.ca_crt, alice.key, alice.cert)
        assert r["cn"] == "alice" and r["sans"] == [] and r["is_node"] is False
        # A node dialing another node (or the coordinator) presents node.crt.
        r = await call(s.port, node.ca_crt, node.key, node.cert)
        assert r["cn"] == "node" and r["sans"] == ["127.0.0.1"] and r["is_node"] is True
        assert "x509_common_name" in r["keys"] and "transport_security_type" in r["keys"]


async def test_client_cert_from_another_ca_is_refused_at_handshake(tmp_path: Path) -> None:
    d, _ = make_pki(tmp_path / "a", ["127.0.0.1"])
    other, _ = make_pki(tmp_path / "b", ["127.0.0.1"])
    node, stranger = certs.load_node_tls(d), certs.load_client_tls(other, "admin")
    async with MtlsServer(node) as s:
        # The stranger trusts our CA (it could have copied the public ca.crt); its own cert is not ours.
        e = await refused(call(s.port, node.ca_crt, stranger.key, stranger.cert))
        assert e.code() == grpc.StatusCode.UNAVAILABLE, e
        # And a client trusting only its own CA refuses our server.
        e = await refused(call(s.port, stranger.ca_crt, stranger.key, stranger.cert))
        assert e.code() == grpc.StatusCode.UNAVAILABLE, e


async def test_client_without_certificate_is_refused_at_handshake(tmp_path: Path) -> None:
    d, _ = make_pki(tmp_path, ["127.0.0.1"])
    node = certs.load_node_tls(d)
    async with MtlsServer(node) as s:
        e = await refused(call(s.port, node.ca_crt, None, None))
        assert e.code() == grpc.StatusCode.UNAVAILABLE, e
        async with grpc.aio.insecure_channel(f"127.0.0.1:{s.port}") as ch:
            e = await refused(ch.unary_unary(METHOD)(b"", timeout=RPC_TIMEOUT_S))
        assert e.code() == grpc.StatusCode.UNAVAILABLE, e


async def test_expired_client_cert_is_refused_at_handshake(tmp_path: Path) -> None:
    d, k = make_pki(tmp_path, ["127.0.0.1"])
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    certs.create_client_cert(d, k, "old", lifetime_days=1, now=long_ago)
    node = certs.load_node_tls(d)
    with pytest.raises(CertError, match="expired"):
        certs.load_client_tls(d, "old")
    async with MtlsServer(node) as s:
        e = await refused(
            call(s.port, node.ca_crt, (d / "client.old.key").read_bytes(), (d / "client.old.crt").read_bytes())
        )
        assert e.code() == grpc.StatusCode.UNAVAILABLE, e


async def test_dialing_an_address_not_in_the_servers_sans_fails(tmp_path: Path) -> None:
    # The server's certificate names node-a.test and 127.0.0.2, not 127.0.0.1, which we dial.
    d, _ = make_pki(tmp_path, ["node-a.test", "127.0.0.2"])
    node, admin = certs.load_node_tls(d), certs.load_client_tls(d, "admin")
    async with MtlsServer(node) as s:
        e = await refused(call(s.port, admin.ca_crt, admin.key, admin.cert))
        assert e.code() == grpc.StatusCode.UNAVAILABLE, e
        assert "hostname verification" in (e.details() or "").lower(), e.details()
        # Verified against a SAN when the channel is told which name to expect...
        r = await call(s.port, admin.ca_crt, admin.key, admin.cert,
                       options=[("grpc.ssl_target_name_override", "node-a.test")])
        assert r["cn"] == "admin"
        # ...and still refused when that name is not a SAN either.
        e = await refused(call(s.port, admin.ca_crt, admin.key, admin.cert,
                               options=[("grpc.ssl_target_name_override", "node-b.test")]))
        assert e.code() == grpc.StatusCode.UNAVAILABLE, e
