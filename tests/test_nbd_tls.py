"""TLS on the NBD export (issue 11): NBD_OPT_STARTTLS, client-certificate
users, per-volume grants, and plaintext only where it is safe.

The server runs in this process (real sockets, an in-memory backend from
test_nbd_e2e) with a throwaway CA made by syncrep.certs in a temporary
directory: a node certificate for 127.0.0.1 and localhost, client
certificates for admin, alice and bob, and a second CA ("rogue") with its own
alice. Grants (the ``authorize`` callable the node gets from the coordinator):

    admin  read-write on vol0 and vol1
    alice  read-only on vol0, read-write on vol1
    bob    nothing

Real clients (nbdinfo, nbdcopy, qemu-img) connect with ``nbds://`` URIs and
GnuTLS certificate directories (syncrep.nbd.tls.write_nbd_client_dir); the
bytes they write are checked in the backend. Each refusal is checked on both
sides (a wrong CA, no certificate, an expired one, no grant, plaintext): the
client's error, and exactly one WARNING line on the server naming
who was refused and why. Tests skip (with the reason) only when a tool is not
installed; scripts/setup.sh installs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import random
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import wait_until
from test_nbd_e2e import MemBackend, closed_by_server, need_tool, read_option_reply, run_tool

from syncrep import certs
from syncrep.nbd import protocol as p
from syncrep.nbd.server import NbdServer, StaticExports
from syncrep.nbd.tls import client_ssl_context, server_ssl_context, write_nbd_client_dir

KiB = 1024
MiB = 1024 * KiB
LOGGER = "syncrep.nbd.server"
#: How long a refusal's log line may take to appear (the server task logs as it closes).
LOG_WAIT_S = 5.0
#: (user, volume) -> "rw" | "ro"; absent: no grant.
GRANTS = {("admin", "vol0"): "rw", ("admin", "vol1"): "rw", ("alice", "vol0"): "ro", ("alice", "vol1"): "rw"}


@dataclass
class Pki:
    certs_dir: Path
    rogue_dir: Path
    ca_key: Path
    #: user -> GnuTLS directory (ca-cert.pem, client-cert.pem, client-key.pem) for libnbd and qemu.
    gnutls: dict[str, Path] = field(default_factory=dict)
    rogue_gnutls: Path = Path()

    def client_ctx(self, user: str, *, rogue: bool = False) -> ssl.SSLContext:
        files = certs.load_client_tls(self.rogue_dir if rogue else self.certs_dir, user)
        ctx = client_ssl_context(files)
        if rogue:  # trust the real server (only the client certificate is from the rogue CA)
            ctx.load_verify_locations(cadata=(self.certs_dir / certs.CA_CERT_FILE).read_text())
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    certs_dir, rogue_dir = root / "certs", root / "rogue"
    certs.create_all(certs_dir, root / "ca.key", ["127.0.0.1", "localhost"], users=("admin", "alice", "bob"))
    certs.create_ca(rogue_dir, root / "rogue-ca.key")
    certs.create_client_cert(rogue_dir, root / "rogue-ca.key", "alice")
    pki = Pki(certs_dir, rogue_dir, root / "ca.key")
    for user in ("admin", "alice", "bob"):
        pki.gnutls[user] = write_nbd_client_dir(certs.load_client_tls(certs_dir, user), root / f"gnutls-{user}")
    # The rogue alice trusts the real CA (so the failure is the server refusing her certificate).
    rogue = certs.load_client_tls(rogue_dir, "alice")
    real_ca = (certs_dir / certs.CA_CERT_FILE).read_bytes()
    pki.rogue_gnutls = write_nbd_client_dir(
        certs.TlsFiles(real_ca, rogue.cert, rogue.key, rogue.cert_path, rogue.key_path, rogue.name),
        root / "gnutls-rogue-alice",
    )
    return pki


class Grants:
    """The authorize callable, recording every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, bool]] = []

    def __call__(self, volume: str, user: str, write: bool) -> str | None:
        self.calls.append((volume, user, write))
        grant = GRANTS.get((user, volume))
        if grant is None:
            return f"user {user!r} has no grant on volume {volume!r}"
        if write and grant == "ro":
            return f"user {user!r} has a read-only grant on volume {volume!r}"
        return None


@dataclass
class TlsEnv:
    server: NbdServer
    backends: dict[str, MemBackend]
    grants: Grants
    pki: Pki

    def url(self, user: str, export: str = "vol1") -> str:
        return f"nbds://127.0.0.1:{self.server.port}/{export}?tls-certificates={self.pki.gnutls[user]}"


@pytest.fixture
async def tls_env(pki: Pki, seed: int, caplog: pytest.LogCaptureFixture) -> AsyncIterator[TlsEnv]:
    caplog.set_level(logging.INFO, logger=LOGGER)
    backends = {
        "vol0": MemBackend("vol0", 4 * MiB),
        "vol1": MemBackend("vol1", 16 * MiB),
        "vol0@snap": MemBackend("vol0@snap", 4 * MiB, read_only=True),
    }
    backends["vol0"].lock_key = backends["vol0@snap"].lock_key = "vol0"
    backends["vol0"].buf[:] = random.Random(f"{seed}-vol0").randbytes(4 * MiB)
    grants = Grants()
    tls = server_ssl_context(certs.load_node_tls(pki.certs_dir))
    server = NbdServer("127.0.0.1:0", StaticExports(backends), tls=tls, authorize=grants)
    await server.start()
    try:
        yield TlsEnv(server, backends, grants, pki)
    finally:
        await server.stop()


def warnings_from_server(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


async def one_warning(caplog: pytest.LogCaptureFixture, *needles: str) -> str:
    """Wait for the server's WARNING line containing every needle; it must be the only WARNING."""
    await wait_until(lambda: any(all(n in m for n in needles) for m in warnings_from_server(caplog)),
                     f"a server WARNING containing {needles}", timeout_s=LOG_WAIT_S)
    found = warnings_from_server(caplog)
    assert len(found) == 1, found
    return found[0]


# ================================================================ a minimal TLS-capable client


class Haggler:
    """A fixed-newstyle client in option haggling, plaintext until ``starttls``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, port: int = 0, *, path: str = "") -> AsyncIterator[Haggler]:
        if path:
            reader, writer = await asyncio.open_unix_connection(path)
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        h = cls(reader, writer)
        try:
            p.parse_greeting(await reader.readexactly(p.GREETING_BYTES))
            writer.write(p.pack_client_flags())
            yield h
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def option(self, option: int, data: bytes = b"") -> list[tuple[p.OptionReplyHeader, bytes]]:
        """Send one option; its replies up to the final one (ACK or an error)."""
        self.writer.write(p.pack_option(option, data))
        await self.writer.drain()
        out = []
        while True:
            hdr, payload = await read_option_reply(self.reader)
            out.append((hdr, payload))
            if hdr.reply_type == p.REP_ACK or hdr.is_error:
                return out

    async def starttls(self, ctx: ssl.SSLContext, server_hostname: str = "127.0.0.1") -> None:
        [(hdr, _)] = await self.option(p.OPT_STARTTLS)
        assert (hdr.option, hdr.reply_type) == (p.OPT_STARTTLS, p.REP_ACK)
        await self.writer.start_tls(ctx, server_hostname=server_hostname)

    async def go(self, export: str) -> tuple[p.OptionReplyHeader, bytes, int]:
        """NBD_OPT_GO: (final reply header, its payload, the transmission flags from NBD_INFO_EXPORT)."""
        flags = -1
        replies = await self.option(p.OPT_GO, p.pack_info_request(export))
        for hdr, data in replies:
            if hdr.reply_type == p.REP_INFO:
                kind, val = p.parse_info_reply(data)
                if kind == p.INFO_EXPORT:
                    assert isinstance(val, tuple)
                    flags = val[1]
        hdr, data = replies[-1]
        return hdr, data, flags

    async def request(self, kind: int, handle: int, offset: int, length: int = 0, data: bytes = b"") -> int:
        """One request in transmission; its error (the data of a READ is read and dropped)."""
        self.writer.write(p.pack_request(kind, handle, offset, len(data) if data else length) + data)
        await self.writer.drain()
        err, got = p.parse_simple_reply(await self.reader.readexactly(p.SIMPLE_REPLY_BYTES))
        assert got == handle
        if kind == p.CMD_READ and err == 0:
            await self.reader.readexactly(length)
        return err


# ================================================================ real clients over TLS


async def test_nbdinfo_sees_the_export_over_tls(tls_env: TlsEnv) -> None:
    nbdinfo = need_tool("nbdinfo")
    r = await run_tool(nbdinfo, "--json", tls_env.url("admin", "vol1"))
    info = json.loads(r.stdout)
    [export] = info["exports"]
    assert export["export-size"] == 16 * MiB and export["is_read_only"] is False
    assert info["protocol"] == "newstyle-fixed" and info["TLS"] is True
    # alice's read-only grant on vol0: served read-only.
    r = await run_tool(nbdinfo, "--json", tls_env.url("alice", "vol0"))
    [export] = json.loads(r.stdout)["exports"]
    assert export["is_read_only"] is True
    assert ("vol0", "alice", True) in tls_env.grants.calls and ("vol0", "alice", False) in tls_env.grants.calls


async def test_nbdcopy_writes_through_tls_and_reads_back(tls_env: TlsEnv, tmp_path: Path, seed: int) -> None:
    """nbdcopy writes 16 MiB of seeded random bytes (``seed``) into vol1 over TLS
    as alice (read-write grant); the backend holds exactly them; nbdcopy reads them back."""
    nbdcopy = need_tool("nbdcopy")
    src, back = tmp_path / "src.raw", tmp_path / "back.raw"
    data = random.Random(f"{seed}-nbdcopy").randbytes(16 * MiB)
    src.write_bytes(data)
    await run_tool(nbdcopy, str(src), tls_env.url("alice", "vol1"))
    assert tls_env.backends["vol1"].buf == data
    await run_tool(nbdcopy, tls_env.url("alice", "vol1"), str(back))
    assert back.read_bytes() == data


async def test_qemu_img_converts_through_tls(tls_env: TlsEnv, tmp_path: Path, seed: int) -> None:
    """qemu-img convert (tls-creds-x509) writes a seeded image (``seed``) into
    vol1 as admin; the backend holds exactly it; qemu-img info reads the size."""
    qemu_img = need_tool("qemu-img")
    src = tmp_path / "src.raw"
    data = random.Random(f"{seed}-qemu").randbytes(16 * MiB)
    src.write_bytes(data)
    tls_obj = f"tls-creds-x509,id=tls0,endpoint=client,dir={tls_env.pki.gnutls['admin']}"
    target = f"driver=nbd,host=127.0.0.1,port={tls_env.server.port},export=vol1,tls-creds=tls0"
    await run_tool(qemu_img, "convert", "-n", "--object", tls_obj, "-f", "raw", str(src),
                   "--target-image-opts", target)
    assert tls_env.backends["vol1"].buf == data
    r = await run_tool(qemu_img, "info", "--output=json", "--object", tls_obj, "--image-opts", target)
    assert json.loads(r.stdout)["virtual-size"] == 16 * MiB


async def test_tls_is_required_on_a_unix_socket_too(pki: Pki, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A Unix-socket listener of a TLS server is FORCEDTLS as well: plaintext
    gets NBD_REP_ERR_TLS_REQD; nbdinfo with nbds+unix:// gets the export."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    sock = str(tmp_path / "nbd.sock")
    server = NbdServer(f"unix:{sock}", StaticExports({"vol1": MemBackend("vol1", 1 * MiB)}),
                       tls=server_ssl_context(certs.load_node_tls(pki.certs_dir)), authorize=Grants())
    await server.start()
    try:
        async with Haggler.connect(path=sock) as h:
            hdr, _, _ = await h.go("vol1")
            assert hdr.reply_type == p.REP_ERR_TLS_REQD
        async with Haggler.connect(path=sock) as h:
            await h.starttls(pki.client_ctx("alice"), server_hostname="localhost")
            hdr, _, flags = await h.go("vol1")
            assert hdr.reply_type == p.REP_ACK and not flags & p.FLAG_READ_ONLY
        nbdinfo = need_tool("nbdinfo")
        r = await run_tool(nbdinfo, "--json", f"nbds+unix:///vol1?socket={sock}&tls-certificates={pki.gnutls['alice']}")
        assert json.loads(r.stdout)["exports"][0]["export-size"] == 1 * MiB
    finally:
        await server.stop()


# ================================================================ refusals


async def test_plaintext_client_is_refused_tls_reqd(tls_env: TlsEnv, caplog: pytest.LogCaptureFixture) -> None:
    """A plaintext client: every option but STARTTLS and ABORT gets
    NBD_REP_ERR_TLS_REQD (no export named, not even by LIST); one log line."""
    async with Haggler.connect(tls_env.server.port) as h:
        for opt, data in ((p.OPT_LIST, b""), (p.OPT_GO, p.pack_info_request("vol1")),
                          (p.OPT_INFO, p.pack_info_request("nope")), (p.OPT_STRUCTURED_REPLY, b""), (77, b"")):
            [(hdr, msg)] = await h.option(opt, data)
            assert (hdr.option, hdr.reply_type) == (opt, p.REP_ERR_TLS_REQD), p.OPT_NAMES.get(opt, opt)
            assert b"TLS" in msg
        [(hdr, _)] = await h.option(p.OPT_ABORT)
        assert hdr.reply_type == p.REP_ACK
    line = await one_warning(caplog, "without TLS refused", "NBD_REP_ERR_TLS_REQD")
    assert "127.0.0.1:" in line
    assert tls_env.grants.calls == []  # nobody to authorise yet
    # The real tool, plaintext: it fails; libnbd reports NBD_REP_ERR_TLS_REQD as "Operation not
    # supported" and shows the server's message only in its debug output.
    nbdinfo = need_tool("nbdinfo")
    r = await run_tool("env", "LIBNBD_DEBUG=1", nbdinfo, f"nbd://127.0.0.1:{tls_env.server.port}/vol1",
                       check=False)
    assert r.returncode != 0 and "this server requires TLS with a client certificate" in r.stderr, r.stderr
    await wait_until(lambda: len(warnings_from_server(caplog)) == 2, "the server logged nbdinfo's refusal",
                     timeout_s=LOG_WAIT_S)
    assert "NBD_REP_ERR_TLS_REQD" in warnings_from_server(caplog)[1]


async def test_export_name_before_starttls_closes(tls_env: TlsEnv, caplog: pytest.LogCaptureFixture) -> None:
    """NBD_OPT_EXPORT_NAME cannot be answered with an error: without TLS the session ends."""
    async with Haggler.connect(tls_env.server.port) as h:
        h.writer.write(p.pack_option(p.OPT_EXPORT_NAME, b"vol1"))
        assert await closed_by_server(h.reader)
    await one_warning(caplog, "NBD_OPT_EXPORT_NAME without TLS", "closing")


async def test_starttls_twice_or_with_data_is_invalid(tls_env: TlsEnv) -> None:
    async with Haggler.connect(tls_env.server.port) as h:
        [(hdr, _)] = await h.option(p.OPT_STARTTLS, b"x")
        assert hdr.reply_type == p.REP_ERR_INVALID
        await h.starttls(tls_env.pki.client_ctx("alice"))
        [(hdr, msg)] = await h.option(p.OPT_STARTTLS)
        assert hdr.reply_type == p.REP_ERR_INVALID and b"already" in msg
        hdr, _, _ = await h.go("vol1")  # haggling goes on inside TLS
        assert hdr.reply_type == p.REP_ACK


async def test_client_certificate_of_another_ca_fails_the_handshake(
    tls_env: TlsEnv, caplog: pytest.LogCaptureFixture
) -> None:
    """alice's certificate signed by a rogue CA: the server refuses the
    handshake; one log line naming the peer address and the SSL error."""
    async with Haggler.connect(tls_env.server.port) as h:
        local = h.writer.get_extra_info("sockname")
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await h.starttls(tls_env.pki.client_ctx("alice", rogue=True))
            # TLS 1.3: the client finishes first; the server's alert arrives with the first read.
            await h.option(p.OPT_LIST)
    line = await one_warning(caplog, "TLS handshake failed", f"127.0.0.1:{local[1]}")
    assert "certificate verify failed" in line and "_ssl.c" not in line, line
    assert tls_env.grants.calls == []
    nbdinfo = need_tool("nbdinfo")
    r = await run_tool(
        nbdinfo, f"nbds://127.0.0.1:{tls_env.server.port}/vol1?tls-certificates={tls_env.pki.rogue_gnutls}",
        check=False,
    )
    assert r.returncode != 0, r.stdout


async def test_expired_client_certificate_fails_the_handshake(
    tls_env: TlsEnv, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """carol's certificate (right CA) expired yesterday: the handshake fails, one log line saying so."""
    expired_dir = tmp_path / "expired"
    expired_dir.mkdir()
    (expired_dir / certs.CA_CERT_FILE).write_bytes((tls_env.pki.certs_dir / certs.CA_CERT_FILE).read_bytes())
    made = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    certs.create_client_cert(expired_dir, tls_env.pki.ca_key, "carol", lifetime_days=2, now=made)
    cert_path, key_path = certs.client_cert_files(expired_dir, "carol")
    ctx = ssl.create_default_context(cadata=(tls_env.pki.certs_dir / certs.CA_CERT_FILE).read_text())
    ctx.load_cert_chain(cert_path, key_path)  # load_client_tls would refuse it: expired
    async with Haggler.connect(tls_env.server.port) as h:
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await h.starttls(ctx)
            await h.option(p.OPT_LIST)
    line = await one_warning(caplog, "TLS handshake failed")
    assert "certificate has expired" in line, line
    assert tls_env.grants.calls == []


async def test_client_without_a_certificate_fails_the_handshake(
    tls_env: TlsEnv, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = ssl.create_default_context(cadata=(tls_env.pki.certs_dir / certs.CA_CERT_FILE).read_text())
    async with Haggler.connect(tls_env.server.port) as h:
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await h.starttls(ctx)
            await h.option(p.OPT_LIST)
    line = await one_warning(caplog, "TLS handshake failed")
    assert "certificate" in line, line


async def test_user_without_grant_is_refused_policy(tls_env: TlsEnv, caplog: pytest.LogCaptureFixture) -> None:
    """bob (a valid certificate, no grant): NBD_REP_ERR_POLICY with the reason,
    LIST shows him nothing, one WARNING line naming bob, the volume and the reason."""
    async with Haggler.connect(tls_env.server.port) as h:
        await h.starttls(tls_env.pki.client_ctx("bob"))
        replies = await h.option(p.OPT_LIST)
        assert [hdr.reply_type for hdr, _ in replies] == [p.REP_ACK]  # no REP_SERVER: nothing granted
        hdr, msg, _ = await h.go("vol0")
        assert hdr.reply_type == p.REP_ERR_POLICY
        assert b"user 'bob' has no grant on volume 'vol0'" in msg, msg
    line = await one_warning(caplog, "'bob'", "'vol0'", "has no grant")
    assert "refused export" in line
    assert ("vol0", "bob", True) in tls_env.grants.calls and ("vol0", "bob", False) in tls_env.grants.calls
    # nbdinfo asks NBD_OPT_INFO, then NBD_OPT_GO: both refused, one more log line (the
    # reason reaches the client: libnbd prints it in its debug output).
    nbdinfo = need_tool("nbdinfo")
    r = await run_tool("env", "LIBNBD_DEBUG=1", nbdinfo, tls_env.url("bob", "vol0"), check=False)
    assert r.returncode != 0 and "user 'bob' has no grant on volume 'vol0'" in r.stderr, r.stderr
    await wait_until(lambda: len(warnings_from_server(caplog)) == 2, "the server logged nbdinfo's refusal",
                     timeout_s=LOG_WAIT_S)
    assert "'bob'" in warnings_from_server(caplog)[1]


async def test_user_without_grant_export_name_closes(tls_env: TlsEnv, caplog: pytest.LogCaptureFixture) -> None:
    """bob with NBD_OPT_EXPORT_NAME (no error reply possible): the session ends, one log line."""
    async with Haggler.connect(tls_env.server.port) as h:
        await h.starttls(tls_env.pki.client_ctx("bob"))
        h.writer.write(p.pack_option(p.OPT_EXPORT_NAME, b"vol1"))
        assert await closed_by_server(h.reader)
    await one_warning(caplog, "'bob'", "'vol1'", "has no grant")


async def test_snapshot_export_is_authorised_on_its_volume(tls_env: TlsEnv) -> None:
    """VOLUME@SNAPSHOT asks for a grant on VOLUME: alice reads vol0@snap, bob is refused."""
    async with Haggler.connect(tls_env.server.port) as h:
        await h.starttls(tls_env.pki.client_ctx("alice"))
        hdr, _, flags = await h.go("vol0@snap")
        assert hdr.reply_type == p.REP_ACK and flags & p.FLAG_READ_ONLY
    assert tls_env.grants.calls == [("vol0", "alice", False)]  # a read-only export: only a read grant asked
    async with Haggler.connect(tls_env.server.port) as h:
        await h.starttls(tls_env.pki.client_ctx("bob"))
        hdr, msg, _ = await h.go("vol0@snap")
        assert hdr.reply_type == p.REP_ERR_POLICY and b"'vol0'" in msg


async def test_read_only_grant_serves_read_only(tls_env: TlsEnv, tmp_path: Path) -> None:
    """alice's read-only grant on the writable vol0: NBD_FLAG_READ_ONLY, reads
    work, a WRITE fails EPERM and changes nothing (vol0 holds the fixture's seeded bytes)."""
    before = bytes(tls_env.backends["vol0"].buf)
    async with Haggler.connect(tls_env.server.port) as h:
        await h.starttls(tls_env.pki.client_ctx("alice"))
        names = [p.parse_rep_server(d) for hdr, d in await h.option(p.OPT_LIST) if hdr.reply_type == p.REP_SERVER]
        assert names == ["vol0", "vol0@snap", "vol1"]
        hdr, _, flags = await h.go("vol0")
        assert hdr.reply_type == p.REP_ACK
        assert flags == p.transmission_flags(read_only=True)
        assert await h.request(p.CMD_READ, 1, 0, 4096) == 0
        assert await h.request(p.CMD_WRITE, 2, 0, data=b"\xff" * 4096) == p.EPERM
        assert await h.request(p.CMD_WRITE_ZEROES, 3, 0, 4096) == p.EPERM
    assert tls_env.backends["vol0"].buf == before and tls_env.backends["vol0"].writes == []
    assert tls_env.grants.calls[-2:] == [("vol0", "alice", True), ("vol0", "alice", False)]
    # The same through nbdcopy: writing to it fails, the volume is unchanged.
    nbdcopy = need_tool("nbdcopy")
    src = tmp_path / "ones.raw"
    src.write_bytes(b"\x01" * (4 * MiB))
    r = await run_tool(nbdcopy, str(src), tls_env.url("alice", "vol0"), check=False)
    assert r.returncode != 0, r.stdout
    assert tls_env.backends["vol0"].buf == before


async def test_a_failing_grant_lookup_refuses(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    """authorize raising (the coordinator's grant table unreachable, say) refuses: fail closed."""
    caplog.set_level(logging.INFO, logger=LOGGER)

    def broken(volume: str, user: str, write: bool) -> str | None:
        raise RuntimeError("grant table unavailable")

    server = NbdServer("127.0.0.1:0", StaticExports({"vol1": MemBackend("vol1", 1 * MiB)}),
                       tls=server_ssl_context(certs.load_node_tls(pki.certs_dir)), authorize=broken)
    await server.start()
    try:
        async with Haggler.connect(server.port) as h:
            await h.starttls(pki.client_ctx("admin"))
            hdr, msg, _ = await h.go("vol1")
            assert hdr.reply_type == p.REP_ERR_POLICY and b"grant table unavailable" in msg
    finally:
        await server.stop()


# ================================================================ plaintext: where it is allowed


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", "10.1.2.3:0", "example.com:0",
                                    "unix:/tmp/x.sock,0.0.0.0:0"])
def test_plaintext_on_a_non_loopback_listener_is_refused(listen: str) -> None:
    with pytest.raises(ValueError, match="--certs-dir") as e:
        NbdServer(listen, StaticExports({}))
    assert "--insecure" in str(e.value)
    NbdServer(listen, StaticExports({}), allow_plaintext=True)  # --insecure: allowed


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "127.9.9.9:0", "[::1]:0", "localhost:0", "unix:/tmp/x.sock",
                                    "/tmp/x.sock,127.0.0.1:0"])
def test_plaintext_on_loopback_and_unix_is_allowed(listen: str) -> None:
    NbdServer(listen, StaticExports({}))


def test_tls_context_without_client_certificates_is_refused(pki: Pki) -> None:
    ctx = server_ssl_context(certs.load_node_tls(pki.certs_dir))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    with pytest.raises(ValueError, match="client certificate"):
        NbdServer("0.0.0.0:0", StaticExports({}), tls=ctx)


async def test_plaintext_server_still_answers_starttls_policy() -> None:
    """No TLS context: STARTTLS gets NBD_REP_ERR_POLICY (NOTLS mode), never TLS_REQD."""
    server = NbdServer("127.0.0.1:0", StaticExports({"vol1": MemBackend("vol1", 1 * MiB)}))
    await server.start()
    try:
        async with Haggler.connect(server.port) as h:
            [(hdr, msg)] = await h.option(p.OPT_STARTTLS)
            assert hdr.reply_type == p.REP_ERR_POLICY and b"--certs-dir" in msg
            hdr, _, flags = await h.go("vol1")
            assert hdr.reply_type == p.REP_ACK and not flags & p.FLAG_READ_ONLY
    finally:
        await server.stop()


def test_gnutls_dir_layout(pki: Pki) -> None:
    d = pki.gnutls["alice"]
    assert sorted(x.name for x in d.iterdir()) == ["ca-cert.pem", "client-cert.pem", "client-key.pem"]
    assert (d / "client-key.pem").stat().st_mode & 0o777 == 0o600
    assert certs.cert_common_name((d / "client-cert.pem").read_bytes()) == "alice"

