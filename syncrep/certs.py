"""Certificates for mutual TLS: the ``syncrep cert`` commands and the loaders
every process uses (issue 11).

The conventions are those of ``cockroach cert``, so an operator who knows one
knows the other:

* one certs directory per host, holding ``ca.crt`` (the CA certificate, public),
  ``node.crt``/``node.key`` (nodes AND coordinators: they serve and they dial each
  other, so the certificate has both serverAuth and clientAuth) and
  ``client.USER.crt``/``client.USER.key`` (a command run as ``--user USER``);
* the CA key lives somewhere else (``--ca-key``): it signs certificates and is
  never needed by a running process, so nothing below that loads credentials
  ever reads it. A stolen certs directory cannot mint new identities.

Who a peer is comes from its certificate only: the CN (``node`` or the user
name) and the SANs (the addresses a node may serve and register under). gRPC
exposes both in ``context.auth_context()``; :func:`peer_identity` reads them.

Key files are written mode 0600 through a temporary file that is fsynced and
then renamed into place (a crash leaves the old file or the new one, never half
a key), and a process refuses a key file that group or others can access, as
ssh does: a world-readable key is as good as published. Keys are EC P-256:
small, fast to make (tests make many) and supported by every TLS stack gRPC
and the NBD clients (GnuTLS) use.

The loaders check what gRPC would otherwise report only as an opaque handshake
failure on the *other* side (a key that does not match its certificate, a
certificate from another CA, an expired one, a client certificate copied in as
node.crt) and say which file is wrong and which command makes a right one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import secrets
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: The environment variables that stand for ``--certs-dir`` and ``--ca-key``.
CERTS_DIR_ENV = "SYNCREP_CERTS_DIR"
CA_KEY_ENV = "SYNCREP_CA_KEY"

CA_CERT_FILE = "ca.crt"
NODE_CERT_FILE = "node.crt"
NODE_KEY_FILE = "node.key"
#: The CN of every node certificate (nodes and coordinators); never a user name.
NODE_CN = "node"
CA_CN = "syncrep CA"

DEFAULT_CA_LIFETIME_DAYS = 3650
DEFAULT_CERT_LIFETIME_DAYS = 365
#: Certificates start being valid this long before they are made, so a peer
#: whose clock is a little behind does not refuse a certificate made just now.
BACKDATE_S = 3600

KEY_FILE_MODE = 0o600
CERT_FILE_MODE = 0o644
#: A certs directory we create holds private keys: only its owner may list it.
CERTS_DIR_MODE = 0o700

#: A user name: it is part of a file name (client.NAME.crt) and the CN that
#: grants name, so it is kept to characters that need no quoting anywhere.
USER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DNS_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_EKU_NAMES = {ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth", ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth"}

EXIT_OK = 0
EXIT_ERROR = 1


class CertError(Exception):
    """A certificate or key problem, with a message that says what to run."""


@dataclass(frozen=True)
class TlsFiles:
    """The credentials one process presents and trusts (PEM bytes, as gRPC takes them)."""

    ca_crt: bytes
    cert: bytes
    key: bytes
    cert_path: Path
    key_path: Path
    #: The CN of ``cert``: ``node`` or the user name.
    name: str


# ---------------------------------------------------------------- names and checks


def client_cert_files(certs_dir: Path, user: str) -> tuple[Path, Path]:
    """``(DIR/client.USER.crt, DIR/client.USER.key)``."""
    return certs_dir / f"client.{user}.crt", certs_dir / f"client.{user}.key"


def check_user_name(name: str) -> None:
    """Raise CertError unless ``name`` can be a user (a client certificate's CN)."""
    if not USER_NAME_RE.fullmatch(name):
        raise CertError(
            f"invalid user name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or a digit"
        )
    if name == NODE_CN:
        # The CN "node" identifies node certificates; a client certificate with
        # it would be mistaken for a node by anything that looks only at the CN.
        raise CertError(f"user name {NODE_CN!r} is reserved for node certificates (syncrep cert create-node)")


def check_key_file(path: Path) -> None:
    """Refuse a private key that group or others may access, as ssh does."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CertError(f"key file {path} is missing") from None
    mode = st.st_mode & 0o777
    if mode & 0o077:
        what = "readable" if mode & 0o044 else "accessible"
        raise CertError(f"key file {path} is {what} by others (mode {mode:04o}); run `chmod 600 {path}`")


def _parse_host(host: str) -> x509.GeneralName:
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):  # [::1], as in a dial address
        text = text[1:-1]
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    if ":" in text:
        raise CertError(f"invalid host {host!r}: give a host name or an IP address, without a port")
    name = text.rstrip(".").lower()
    labels = name.split(".")
    if labels and labels[0] == "*":  # a wildcard covers exactly one leftmost label
        labels = labels[1:]
    if not name or len(name) > 253 or not labels or not all(_DNS_LABEL_RE.fullmatch(p) for p in labels):
        raise CertError(
            f"invalid host {host!r}: a host name is dot-separated labels of letters, digits and '-' "
            "(or give an IP address)"
        )
    return x509.DNSName(name)


def _general_names_text(names: Iterable[x509.GeneralName]) -> list[str]:
    out: list[str] = []
    for n in names:
        if isinstance(n, x509.IPAddress | x509.DNSName):
            out.append(str(n.value))
    return out


# ---------------------------------------------------------------- reading certificates


def _load_certs(pem: bytes, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise CertError(f"{what} is not a PEM certificate: {e}") from None
    return certs


def _load_cert(pem: bytes, what: str = "certificate") -> x509.Certificate:
    return _load_certs(pem, what)[0]


def cert_common_name(pem: bytes) -> str:
    """The subject CN of the (first) certificate in ``pem``; "" when it has none."""
    attrs = _load_cert(pem).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        return ""
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode()


def cert_sans(pem: bytes) -> list[str]:
    """The DNS-name and IP-address SANs of the (first) certificate in ``pem``, as strings."""
    return _sans(_load_cert(pem))


def _sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return _general_names_text(ext.value)


def _cn(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        return ""
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode()


def _ekus(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    try:
        return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return set()


def _signed_by(cert: x509.Certificate, cas: Sequence[x509.Certificate]) -> bool:
    """Whether one of ``cas`` issued ``cert`` (ca.crt may hold several CAs while one is rotated)."""
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
            return True
        except (ValueError, TypeError, InvalidSignature):
            continue
    return False


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _validity_problem(cert: x509.Certificate, now: dt.datetime) -> str | None:
    if now > cert.not_valid_after_utc:
        return f"expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
    if now < cert.not_valid_before_utc:
        return f"not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC (is this clock right?)"
    return None


def _read(path: Path, missing_hint: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertError(f"{path} is missing; {missing_hint}") from None
    except OSError as e:
        raise CertError(f"cannot read {path}: {e.strerror or e}") from None


def _public_bytes(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def _load_private_key(pem: bytes, path: Path) -> Any:
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise CertError(f"{path} is not an unencrypted PEM private key: {e}") from None


# ---------------------------------------------------------------- loaders (running processes)


def _load_tls(
    certs_dir: Path,
    cert_path: Path,
    key_path: Path,
    make_cmd: str,
    *,
    want_ekus: set[x509.ObjectIdentifier],
    want_cn: str,
    now: dt.datetime | None,
) -> TlsFiles:
    certs_dir = Path(certs_dir)
    make_hint = f"make it with `{make_cmd}`"
    ca_path = certs_dir / CA_CERT_FILE
    ca_pem = _read(
        ca_path,
        f"copy the CA certificate there, or make a CA with `syncrep cert create-ca --certs-dir {certs_dir} "
        "--ca-key SAFE_DIR/ca.key` (keep the CA key outside the certs directory)",
    )
    cert_pem = _read(cert_path, make_hint)
    key_pem = _read(key_path, make_hint)
    check_key_file(key_path)
    cas = _load_certs(ca_pem, str(ca_path))
    cert = _load_cert(cert_pem, str(cert_path))
    key = _load_private_key(key_pem, key_path)
    if _public_bytes(key.public_key()) != _public_bytes(cert.public_key()):
        raise CertError(f"{key_path} is not the key of {cert_path} (were they made together?); {make_hint}")
    if not _signed_by(cert, cas):
        raise CertError(f"{cert_path} is not signed by the CA in {ca_path}; {make_hint}")
    problem = _validity_problem(cert, now or _now())
    if problem:
        raise CertError(f"{cert_path} {problem}; make a new one with `{make_cmd} --overwrite`")
    name = _cn(cert)
    if name != want_cn:
        raise CertError(f"{cert_path} is for {name!r}, not {want_cn!r}; {make_hint}")
    missing = want_ekus - _ekus(cert)
    if missing:
        uses = " and ".join(sorted(_EKU_NAMES.get(o, o.dotted_string) for o in missing))
        raise CertError(f"{cert_path} lacks extended key usage {uses}; {make_hint}")
    return TlsFiles(ca_crt=ca_pem, cert=cert_pem, key=key_pem, cert_path=cert_path, key_path=key_path, name=name)


def load_node_tls(certs_dir: Path, *, now: dt.datetime | None = None) -> TlsFiles:
    """The credentials of a node or coordinator: DIR/ca.crt, DIR/node.crt, DIR/node.key.

    Checks the key's mode, that the key matches node.crt, that ca.crt signed
    node.crt, that it is valid now and that it is a node certificate (CN
    ``node``, serverAuth and clientAuth). Never reads the CA key."""
    certs_dir = Path(certs_dir)
    cmd = f"syncrep cert create-node HOST... --certs-dir {certs_dir} --ca-key CA_KEY"
    return _load_tls(
        certs_dir, certs_dir / NODE_CERT_FILE, certs_dir / NODE_KEY_FILE, cmd,
        want_ekus={ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH},
        want_cn=NODE_CN, now=now,
    )


def load_client_tls(certs_dir: Path, user: str, *, now: dt.datetime | None = None) -> TlsFiles:
    """The credentials of a command run as ``--user USER``: DIR/ca.crt,
    DIR/client.USER.crt, DIR/client.USER.key (same checks as load_node_tls;
    the CN must be USER). Never reads the CA key."""
    certs_dir = Path(certs_dir)
    check_user_name(user)
    cert_path, key_path = client_cert_files(certs_dir, user)
    cmd = f"syncrep cert create-client {user} --certs-dir {certs_dir} --ca-key CA_KEY"
    return _load_tls(
        certs_dir, cert_path, key_path, cmd,
        want_ekus={ExtendedKeyUsageOID.CLIENT_AUTH}, want_cn=user, now=now,
    )


def _auth_values(auth_context: Mapping[str, Sequence[bytes]], key: str) -> list[str]:
    out: list[str] = []
    for v in auth_context.get(key, ()):
        out.append(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
    return out


def peer_identity(auth_context: Mapping[str, Sequence[bytes]]) -> tuple[str, list[str]]:
    """``(common name, SANs)`` of the peer's verified certificate, from gRPC's
    ``context.auth_context()``; ``("", [])`` when the peer presented none
    (a plaintext connection, or TLS without a client certificate).

    gRPC fills ``x509_common_name`` and ``x509_subject_alternative_name`` (DNS
    names and IP addresses as text) only from a certificate that passed
    verification against the server's root certificates."""
    if _auth_values(auth_context, "transport_security_type") != ["ssl"]:
        return "", []
    cns = _auth_values(auth_context, "x509_common_name")
    return (cns[0] if cns else ""), _auth_values(auth_context, "x509_subject_alternative_name")


def peer_is_node(auth_context: Mapping[str, Sequence[bytes]]) -> bool:
    """Whether the peer presented a node certificate: CN ``node`` AND serverAuth
    (a client certificate only has clientAuth, so it cannot pass for a node even
    if someone with the CA key named a client "node")."""
    cn, _ = peer_identity(auth_context)
    pems = auth_context.get("x509_pem_cert", ())
    if cn != NODE_CN or not pems:
        return False
    try:
        cert = _load_cert(bytes(pems[0]))
    except CertError:
        return False
    return ExtendedKeyUsageOID.SERVER_AUTH in _ekus(cert)


# ---------------------------------------------------------------- writing files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes, mode: int, *, overwrite: bool) -> None:
    """Write ``data`` to ``path`` with exactly ``mode``: a new file (O_EXCL, so
    the key is never readable by others even for an instant), fsynced, then
    renamed into place; without ``overwrite`` an existing ``path`` is kept."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            os.fchmod(fd, mode)  # exactly mode, whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic: fails if path appeared meanwhile
            except FileExistsError:
                raise CertError(f"{path} already exists; pass --overwrite to replace it") from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _refuse_existing(paths: Iterable[Path], overwrite: bool) -> None:
    if overwrite:
        return
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        verb = "exists" if len(existing) == 1 else "exist"
        raise CertError(f"{' and '.join(existing)} already {verb}; pass --overwrite to replace")


def _make_dir(path: Path, mode: int) -> None:
    try:
        path.mkdir(mode=mode, parents=True, exist_ok=True)
    except OSError as e:
        raise CertError(f"cannot create directory {path}: {e.strerror or e}") from None


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _check_lifetime(days: int) -> None:
    if days <= 0:
        raise CertError(f"--lifetime-days must be > 0, not {days}")


# ---------------------------------------------------------------- making certificates


def create_ca(
    certs_dir: Path,
    ca_key: Path,
    *,
    lifetime_days: int = DEFAULT_CA_LIFETIME_DAYS,
    overwrite: bool = False,
    now: dt.datetime | None = None,
) -> Path:
    """Make a CA: DIR/ca.crt (mode 0644) and its key at ``ca_key`` (mode 0600).
    Refuses to replace either unless ``overwrite``. Returns the ca.crt path."""
    certs_dir, ca_key = Path(certs_dir), Path(ca_key)
    _check_lifetime(lifetime_days)
    ca_path = certs_dir / CA_CERT_FILE
    _refuse_existing([ca_path, ca_key], overwrite)
    _make_dir(certs_dir, CERTS_DIR_MODE)
    _make_dir(ca_key.parent, CERTS_DIR_MODE)
    now = now or _now()
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_CN)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(seconds=BACKDATE_S))
        .not_valid_after(now + dt.timedelta(days=lifetime_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    # The key first: a ca.crt without its key would be a CA nobody can use.
    _write_file(ca_key, _key_pem(key), KEY_FILE_MODE, overwrite=overwrite)
    _write_file(ca_path, _cert_pem(cert), CERT_FILE_MODE, overwrite=overwrite)
    return ca_path


def _load_ca(certs_dir: Path, ca_key: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey | Any]:
    ca_path = certs_dir / CA_CERT_FILE
    hint = f"make a CA with `syncrep cert create-ca --certs-dir {certs_dir} --ca-key {ca_key}`"
    ca_pem = _read(ca_path, hint)
    key_pem = _read(ca_key, hint)
    check_key_file(ca_key)
    key = _load_private_key(key_pem, ca_key)
    # ca.crt may hold several CAs (rotation): sign with the one this key belongs to.
    for ca in _load_certs(ca_pem, str(ca_path)):
        if _public_bytes(ca.public_key()) == _public_bytes(key.public_key()):
            return ca, key
    raise CertError(f"{ca_key} is not the key of the CA in {ca_path}")


def _issue(
    certs_dir: Path,
    ca_key: Path,
    cn: str,
    sans: list[x509.GeneralName],
    ekus: list[x509.ObjectIdentifier],
    cert_path: Path,
    key_path: Path,
    *,
    lifetime_days: int,
    overwrite: bool,
    now: dt.datetime | None,
) -> str | None:
    """Make a leaf certificate and key; returns a note for the user, or None."""
    _check_lifetime(lifetime_days)
    _refuse_existing([cert_path, key_path], overwrite)
    ca, signing_key = _load_ca(certs_dir, ca_key)
    now = now or _now()
    not_after = now + dt.timedelta(days=lifetime_days)
    note = None
    if not_after > ca.not_valid_after_utc:
        # A certificate outliving its CA would be refused from that day anyway.
        not_after = ca.not_valid_after_utc
        note = f"{cert_path} expires with its CA on {not_after:%Y-%m-%d}, before --lifetime-days"
    key = _new_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(seconds=BACKDATE_S))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(signing_key, hashes.SHA256())
    _write_file(key_path, _key_pem(key), KEY_FILE_MODE, overwrite=overwrite)
    _write_file(cert_path, _cert_pem(cert), CERT_FILE_MODE, overwrite=overwrite)
    return note


def create_node_cert(
    certs_dir: Path,
    ca_key: Path,
    hosts: Sequence[str],
    *,
    lifetime_days: int = DEFAULT_CERT_LIFETIME_DAYS,
    overwrite: bool = False,
    now: dt.datetime | None = None,
) -> str | None:
    """Make DIR/node.crt and DIR/node.key (CN ``node``, serverAuth and clientAuth)
    with every host as a SAN, exactly those (no implicit localhost). Returns a
    note for the user (the lifetime was cut to the CA's), or None."""
    certs_dir = Path(certs_dir)
    if not hosts:
        raise CertError("give at least one HOST: the names and addresses other processes dial this node by")
    sans: list[x509.GeneralName] = []
    for h in hosts:
        n = _parse_host(h)
        if n not in sans:
            sans.append(n)
    return _issue(
        certs_dir, Path(ca_key), NODE_CN, sans,
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        certs_dir / NODE_CERT_FILE, certs_dir / NODE_KEY_FILE,
        lifetime_days=lifetime_days, overwrite=overwrite, now=now,
    )


def create_client_cert(
    certs_dir: Path,
    ca_key: Path,
    name: str,
    *,
    lifetime_days: int = DEFAULT_CERT_LIFETIME_DAYS,
    overwrite: bool = False,
    now: dt.datetime | None = None,
) -> str | None:
    """Make DIR/client.NAME.crt and DIR/client.NAME.key (CN NAME, clientAuth)."""
    certs_dir = Path(certs_dir)
    check_user_name(name)
    cert_path, key_path = client_cert_files(certs_dir, name)
    return _issue(
        certs_dir, Path(ca_key), name, [], [ExtendedKeyUsageOID.CLIENT_AUTH], cert_path, key_path,
        lifetime_days=lifetime_days, overwrite=overwrite, now=now,
    )


def create_all(
    certs_dir: Path, ca_key: Path, hosts: Sequence[str], users: Sequence[str] = ("admin",)
) -> None:
    """A CA, a node certificate for ``hosts`` and a client certificate per user,
    in one call: for ``syncrep demo``, ``python -m deploy up`` and test
    harnesses that make a throwaway CA in their work directory."""
    create_ca(certs_dir, ca_key)
    create_node_cert(certs_dir, ca_key, hosts)
    for u in users:
        create_client_cert(certs_dir, ca_key, u)


@dataclass(frozen=True)
class CertInfo:
    """One certificate file of a certs directory, as ``syncrep cert list`` shows it."""

    file: str
    common_name: str
    sans: list[str]
    not_after: dt.datetime | None
    #: "yes", "no", "is the CA", "no ca.crt", or why the file could not be read.
    signed_by_ca: str
    expired: bool


def list_certs(certs_dir: Path, *, now: dt.datetime | None = None) -> list[CertInfo]:
    """Every ``*.crt`` in ``certs_dir``, sorted by file name."""
    certs_dir = Path(certs_dir)
    if not certs_dir.is_dir():
        raise CertError(f"certs directory {certs_dir} does not exist")
    now = now or _now()
    cas: list[x509.Certificate] = []
    ca_path = certs_dir / CA_CERT_FILE
    if ca_path.exists():
        try:
            cas = _load_certs(ca_path.read_bytes(), str(ca_path))
        except (CertError, OSError):
            cas = []
    out: list[CertInfo] = []
    for path in sorted(certs_dir.glob("*.crt")):
        try:
            cert = _load_cert(path.read_bytes(), str(path))
        except (CertError, OSError) as e:
            out.append(CertInfo(path.name, "", [], None, f"unreadable: {e}", False))
            continue
        if path.name == CA_CERT_FILE:
            signed = "is the CA"
        elif not cas:
            signed = "no ca.crt"
        else:
            signed = "yes" if _signed_by(cert, cas) else "no"
        out.append(
            CertInfo(path.name, _cn(cert), _sans(cert), cert.not_valid_after_utc, signed,
                     now > cert.not_valid_after_utc)
        )
    return out


# ---------------------------------------------------------------- the `syncrep cert` commands


def _fail(e: CertError) -> int:
    sys.stderr.write(f"syncrep: error: {' '.join(str(e).split())}\n")
    return EXIT_ERROR


def _warn_ca_key_location(certs_dir: Path, ca_key: Path) -> None:
    try:
        inside = ca_key.resolve().parent == certs_dir.resolve()
    except OSError:
        return
    if inside:
        sys.stderr.write(
            f"syncrep: warning: the CA key {ca_key} is in the certs directory; keep it elsewhere "
            "(running processes never need it, and whoever has it can make any certificate)\n"
        )


def cmd_create_ca(args: argparse.Namespace) -> int:
    try:
        _warn_ca_key_location(args.certs_dir, args.ca_key)
        path = create_ca(args.certs_dir, args.ca_key, lifetime_days=args.lifetime_days, overwrite=args.overwrite)
    except CertError as e:
        return _fail(e)
    print(f"wrote {path} and the CA key {args.ca_key} (mode 0600; keep it safe, off the nodes)")
    return EXIT_OK


def cmd_create_node(args: argparse.Namespace) -> int:
    try:
        note = create_node_cert(
            args.certs_dir, args.ca_key, args.hosts, lifetime_days=args.lifetime_days, overwrite=args.overwrite
        )
        sans = cert_sans((args.certs_dir / NODE_CERT_FILE).read_bytes())
    except CertError as e:
        return _fail(e)
    if note:
        sys.stderr.write(f"syncrep: note: {note}\n")
    print(f"wrote {args.certs_dir / NODE_CERT_FILE} and {args.certs_dir / NODE_KEY_FILE} for {', '.join(sans)}")
    return EXIT_OK


def cmd_create_client(args: argparse.Namespace) -> int:
    try:
        note = create_client_cert(
            args.certs_dir, args.ca_key, args.name, lifetime_days=args.lifetime_days, overwrite=args.overwrite
        )
    except CertError as e:
        return _fail(e)
    if note:
        sys.stderr.write(f"syncrep: note: {note}\n")
    cert_path, key_path = client_cert_files(args.certs_dir, args.name)
    print(f"wrote {cert_path} and {key_path} for user {args.name}")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    try:
        infos = list_certs(args.certs_dir)
    except CertError as e:
        return _fail(e)
    if not infos:
        print(f"no certificates in {args.certs_dir}")
        return EXIT_OK
    rows = [("FILE", "CN", "SANS", "NOT AFTER (UTC)", "SIGNED BY ca.crt")]
    for i in infos:
        after = "-" if i.not_after is None else f"{i.not_after:%Y-%m-%d %H:%M:%S}"
        if i.expired:
            after += " EXPIRED"
        rows.append((i.file, i.common_name or "-", ",".join(i.sans) or "-", after, i.signed_by_ca))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=False)) + "  " + r[-1])
    return EXIT_OK


def _lifetime(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of days: {text!r}") from None
    if days <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 days, not {days}")
    return days


def add_cert_commands(
    subparsers: Any,
    *,
    parents: Sequence[argparse.ArgumentParser] = (),
    formatter_class: type[argparse.HelpFormatter] = argparse.HelpFormatter,
) -> argparse.ArgumentParser:
    """Add ``cert create-ca|create-node|create-client|list`` to ``subparsers``
    (from ``parser.add_subparsers()``); ``parents`` and ``formatter_class`` are
    passed to every parser made (syncrep.cli passes its common flags and
    formatter). Each sub-command's ``func`` takes the parsed args and returns
    the exit code; errors print one line to stderr. Returns the ``cert`` parser."""
    kw: dict[str, Any] = {"parents": list(parents), "formatter_class": formatter_class}
    cert = subparsers.add_parser(
        "cert",
        help="make and list TLS certificates (a CA, node and client certificates)",
        description=(
            "Make the certificates for mutual TLS, as `cockroach cert` does. Each host has a certs\n"
            "directory with ca.crt, node.crt/node.key (nodes and coordinators) and\n"
            "client.USER.crt/.key (commands run as --user USER). The CA key signs certificates and\n"
            "is never needed by a running process: keep it off the nodes.\n\n"
            "  syncrep cert create-ca --certs-dir certs --ca-key safe/ca.key\n"
            "  syncrep cert create-node 10.0.0.5 node-a.example --certs-dir certs --ca-key safe/ca.key\n"
            "  syncrep cert create-client admin --certs-dir certs --ca-key safe/ca.key"
        ),
        **kw,
    )
    csub = cert.add_subparsers(dest="cert_command", metavar="SUBCOMMAND", required=True)
    env_dir = os.environ.get(CERTS_DIR_ENV)
    env_key = os.environ.get(CA_KEY_ENV)

    def certs_dir_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--certs-dir", type=Path, metavar="DIR", default=Path(env_dir) if env_dir else None,
                       required=not env_dir, help=f"the certs directory (default: ${CERTS_DIR_ENV})")

    def signing_args(p: argparse.ArgumentParser, lifetime: int) -> None:
        certs_dir_arg(p)
        p.add_argument("--ca-key", type=Path, metavar="KEYFILE", default=Path(env_key) if env_key else None,
                       required=not env_key,
                       help=f"the CA's private key, kept outside the certs directory (default: ${CA_KEY_ENV})")
        p.add_argument("--lifetime-days", type=_lifetime, default=lifetime, metavar="DAYS",
                       help=f"how long the certificate is valid, in days (default: {lifetime})")
        p.add_argument("--overwrite", action="store_true", help="replace existing files")

    p = csub.add_parser(
        "create-ca", help="make a CA: DIR/ca.crt and its key",
        description="Write DIR/ca.crt (EC P-256, CN 'syncrep CA') and the CA key to KEYFILE (mode 0600).\n"
                    "Refuses to replace either unless --overwrite.", **kw,
    )
    signing_args(p, DEFAULT_CA_LIFETIME_DAYS)
    p.set_defaults(func=cmd_create_ca, role="cert")

    p = csub.add_parser(
        "create-node", help="make DIR/node.crt and node.key for nodes and coordinators",
        description="Write DIR/node.crt and DIR/node.key (mode 0600), signed by the CA, for a node or\n"
                    "coordinator: CN 'node', usable as server and client, with every HOST as a SAN.\n"
                    "Only the HOSTs given are in it: add localhost or 127.0.0.1 yourself if peers dial that.",
        **kw,
    )
    p.add_argument("hosts", nargs="+", metavar="HOST",
                   help="a host name or IP address other processes dial this host by")
    signing_args(p, DEFAULT_CERT_LIFETIME_DAYS)
    p.set_defaults(func=cmd_create_node, role="cert")

    p = csub.add_parser(
        "create-client", help="make DIR/client.NAME.crt and .key for a user",
        description="Write DIR/client.NAME.crt and DIR/client.NAME.key (mode 0600), signed by the CA,\n"
                    "with CN NAME: what a command run as --user NAME presents.", **kw,
    )
    p.add_argument("name", metavar="NAME", help="the user name: letters, digits, '.', '_', '-' (at most 64)")
    signing_args(p, DEFAULT_CERT_LIFETIME_DAYS)
    p.set_defaults(func=cmd_create_client, role="cert")

    p = csub.add_parser(
        "list", help="list the certificates in DIR",
        description="Print every certificate in DIR: its file, CN, SANs, expiry, and whether DIR/ca.crt\n"
                    "signed it.", **kw,
    )
    certs_dir_arg(p)
    p.set_defaults(func=cmd_list, role="cert")
    return cert
