"""TLS for the NBD export (``NBD_OPT_STARTTLS``), from the certificates of
:mod:`syncrep.certs` (issue 11).

The NBD server runs in FORCEDTLS mode whenever it has a TLS context (see
:class:`syncrep.nbd.server.NbdServer`): the client upgrades the connection
in the middle of option haggling, so the context here is a plain
:class:`ssl.SSLContext` handed to ``StreamWriter.start_tls``, not a listening
TLS socket. Who the client is comes from its certificate only: the server
context REQUIRES a client certificate signed by ``ca.crt`` and the user is its
CN, the same identity the gRPC services see.

The NBD clients (libnbd's nbdinfo/nbdcopy, qemu's ``tls-creds-x509``) use
GnuTLS and want a directory of ``ca-cert.pem``, ``client-cert.pem`` and
``client-key.pem``, not the cockroach-style names of a syncrep certs
directory: :func:`write_nbd_client_dir` makes one from ``client.USER.crt``.

TLS 1.2 is the floor (the NBD document: implementations MUST support 1.2 and
SHOULD NOT offer older versions by default); 1.3 is used where both ends have it.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from pathlib import Path

from syncrep import certs

#: What libnbd (``?tls-certificates=DIR``) and qemu (``tls-creds-x509,dir=DIR``) look for.
GNUTLS_CA_FILE = "ca-cert.pem"
GNUTLS_CLIENT_CERT_FILE = "client-cert.pem"
GNUTLS_CLIENT_KEY_FILE = "client-key.pem"


def server_ssl_context(files: certs.TlsFiles) -> ssl.SSLContext:
    """The NBD server's context: it presents ``files.cert`` (a node certificate)
    and requires a client certificate signed by ``files.ca_crt``.

    ``files`` comes from :func:`syncrep.certs.load_node_tls`, which checked the
    key's mode, that it matches the certificate and that the CA signed it. The
    CA is taken from those bytes; the certificate and key are read again from
    ``files.cert_path``/``files.key_path`` (OpenSSL loads a chain only from
    files). CertError when OpenSSL refuses them (replaced since they were checked)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # No client certificate, no user: every export needs a grant for a CN.
    ctx.verify_mode = ssl.CERT_REQUIRED
    # TLS 1.2 renegotiation initiated by the client is a cheap CPU sink; NBD never needs it.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    try:
        ctx.load_verify_locations(cadata=files.ca_crt.decode("ascii"))
        ctx.load_cert_chain(files.cert_path, files.key_path)
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as e:
        raise certs.CertError(
            f"cannot use {files.cert_path} and {files.key_path} for NBD TLS: {e}; "
            "check them with `syncrep cert list --certs-dir DIR`"
        ) from None
    return ctx


def client_ssl_context(files: certs.TlsFiles) -> ssl.SSLContext:
    """A client context that presents ``files.cert`` (a client or node
    certificate) and verifies the server against ``files.ca_crt``, its SAN
    against the address dialled (pass ``server_hostname`` to ``start_tls``).
    For tools and tests written in Python; the usual clients are libnbd and qemu."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cadata=files.ca_crt.decode("ascii"))
        ctx.load_cert_chain(files.cert_path, files.key_path)
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as e:
        raise certs.CertError(f"cannot use {files.cert_path} and {files.key_path} for TLS: {e}") from None
    return ctx


def write_nbd_client_dir(files: certs.TlsFiles, out_dir: Path) -> Path:
    """Write ``out_dir/ca-cert.pem``, ``client-cert.pem`` and ``client-key.pem``
    (mode 0600, the directory 0700) from ``files`` (e.g. from
    :func:`syncrep.certs.load_client_tls`), the layout GnuTLS-based NBD clients read:

        nbdinfo 'nbds://HOST:PORT/VOLUME?tls-certificates=OUT_DIR'
        qemu-img info --object tls-creds-x509,id=tls0,endpoint=client,dir=OUT_DIR \\
            --image-opts driver=nbd,host=HOST,port=PORT,export=VOLUME,tls-creds=tls0

    Returns ``out_dir``. Existing files there are replaced."""
    out_dir = Path(out_dir)
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name, data, mode in (
        (GNUTLS_CA_FILE, files.ca_crt, 0o644),
        (GNUTLS_CLIENT_CERT_FILE, files.cert, 0o644),
        (GNUTLS_CLIENT_KEY_FILE, files.key, 0o600),
    ):
        path = out_dir / name
        tmp = path.with_name(f".{name}.tmp")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # left by an interrupted call
        # O_EXCL with the final mode: the key is never readable by others, even briefly.
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return out_dir
