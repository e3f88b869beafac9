"""Authorisation refused end to end (issue 11, "Hardening"): real processes, mutual TLS.

A LocalCluster with TLS on (its own CA; client certificates for admin, alice
and bob). Every unauthorised attempt is made with real certificates over real
gRPC, and each is refused with the right code, a message that names who was
refused and what they lacked, and ONE WARNING line in the refusing server's
log:

* alice without a grant writes and reads -> PERMISSION_DENIED; a read-only
  grant lets her read and not write (WriteOne and the Write stream); a
  read-write grant lets her write; revoked, she is refused again within a few
  heartbeats (a bounded poll); alice may not grant herself;
* a client certificate (alice) used as a node: NodeService.AssignVolume,
  InjectFault, CoordinatorService.RegisterNode, ReplicaService.Replicate;
* a node certificate that does not name the volume's primary opens a
  replication stream; registers under an address its SANs do not name; calls
  AssignVolume without being the node's coordinator;
* the NBD export (nbdinfo over ``nbds://``): alice without a grant is
  refused, with a read-only grant the export is read-only, with read-write
  it is writable; a plaintext ``nbd://`` client is refused;
* an expired client certificate (the CLI refuses to use it; the server
  refuses its handshake), a client certificate from another CA, a server
  whose SANs do not name the address dialed: the CLI says the TLS handshake
  failed.

Every test that writes ends by comparing the replicas block for block and
checking every acknowledged write. ``seed`` seeds the written blocks (each
test's docstring names its default).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import VOLUME, VOLUME_SIZE, wait_until
from e2e_helpers import BLOCK, assert_replicas_identical, check_model, write_blocks

from deploy.cluster import LocalCluster, free_port
from syncrep import certs
from syncrep.client import TLS_HINT
from syncrep.nbd.tls import write_nbd_client_dir
from syncrep.pb import syncrep_pb2 as pb
from syncrep.pb import syncrep_pb2_grpc as pbg

pytestmark = pytest.mark.e2e

#: Bound of every call; a refusal on loopback takes milliseconds.
RPC_TIMEOUT_S = 5.0
#: A grant or revoke reaches the nodes with their next heartbeat (0.5 s).
GRANT_PROPAGATION_S = 10.0
#: How long a server's log line may take to reach the file.
LOG_WAIT_S = 5.0


# ---------------------------------------------------------------- helpers


def credentials(ca_dir: Path, cert: Path, key: Path) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(ca_dir / certs.CA_CERT_FILE).read_bytes(),
        private_key=key.read_bytes(), certificate_chain=cert.read_bytes(),
    )


def user_creds(certs_dir: Path, user: str) -> grpc.ChannelCredentials:
    cert, key = certs.client_cert_files(certs_dir, user)
    return credentials(certs_dir, cert, key)


def node_creds(certs_dir: Path) -> grpc.ChannelCredentials:
    return credentials(certs_dir, certs_dir / certs.NODE_CERT_FILE, certs_dir / certs.NODE_KEY_FILE)


def channel(address: str, creds: grpc.ChannelCredentials, *options: tuple[str, Any]) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(address, creds, options=list(options))


async def refused(aw: Any) -> grpc.aio.AioRpcError:
    """The error of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await aw
    return ei.value


def count_lines(path: Path, *words: str) -> int:
    return sum(1 for line in path.read_text(errors="replace").splitlines() if all(w in line for w in words))


async def one_warning(cluster: LocalCluster, name: str, text: str) -> None:
    """Exactly one WARNING line in ``name``'s log holds ``text`` (waits for it)."""
    path = cluster.log_path(name)
    await wait_until(lambda: count_lines(path, " WARNING ", text) >= 1,
                     f"{name}'s log has a WARNING line with {text!r}", timeout_s=LOG_WAIT_S)
    n = count_lines(path, " WARNING ", text)
    assert n == 1, f"{n} WARNING lines with {text!r} in {path}, expected one"


def make_node_cert(cluster: LocalCluster, dest: Path, *hosts: str) -> Path:
    """A node certificate for ``hosts`` signed by the cluster's CA, in its own dir."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(cluster.certs_dir / certs.CA_CERT_FILE, dest / certs.CA_CERT_FILE)
    certs.create_node_cert(dest, cluster.ca_key, list(hosts))
    return dest


async def start(cluster_factory: Callable[..., LocalCluster], **kw: Any) -> LocalCluster:
    c = cluster_factory(users=("admin", "alice", "bob"), **kw)
    await c.start()
    await c.create_volume(VOLUME, VOLUME_SIZE, BLOCK)
    return c


async def cli(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return await cluster.run_cli(*args, timeout_s=60.0)


async def run(*cmd: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out.decode(), err.decode())


async def open_refused(call: Any, first: pb.ReplicateRequest) -> grpc.aio.AioRpcError:
    """Send a stream's opening message and read: the error the stream ends with.
    (The server may refuse before it reads the message: the write may fail.)"""
    try:
        await call.write(first)
    except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
        pass
    return await refused(asyncio.wait_for(call.read(), RPC_TIMEOUT_S))


def write_req(offset: int, data: bytes, seq: int = 1) -> pb.WriteRequest:
    return pb.WriteRequest(volume=VOLUME, client_seq=seq, offset=offset, data=data)


async def stream_write(stub: Any, offset: int, data: bytes) -> pb.WriteReply:
    """One write on a Write stream; its reply."""
    call = stub.Write()
    await call.write(write_req(offset, data, seq=7))
    reply = await asyncio.wait_for(call.read(), RPC_TIMEOUT_S)
    await call.done_writing()
    assert reply is not grpc.aio.EOF
    return reply


# ---------------------------------------------------------------- users and grants


async def test_user_without_grant_refused_read_only_grant_then_revoked(
    cluster_factory: Callable[..., LocalCluster], seed: int
) -> None:
    """Faults: alice writes and reads with no grant; writes under a read-only grant;
    writes after her grant was revoked; grants herself. (Seed: derived from the test id.)"""
    c = await start(cluster_factory)
    model: dict[int, bytes] = {}
    admin = await c.connect(VOLUME)
    try:
        await write_blocks(admin, 0, 16, 4, seed, model)
    finally:
        await admin.close()
    block = model[0]
    async with channel(c.primary_addr, user_creds(c.certs_dir, "alice")) as ch:
        stub = pbg.VolumeServiceStub(ch)
        # No grant: writes and reads refused, nothing written.
        e = await refused(stub.WriteOne(write_req(64 * BLOCK, b"a" * BLOCK), timeout=RPC_TIMEOUT_S))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        want = "user 'alice' (ipv4:127.0.0.1:"
        assert (e.details() or "").startswith(want), e.details()
        assert f"may not write to volume '{VOLUME}': no grant for it" in (e.details() or "")
        await one_warning(c, "primary", f"may not write to volume '{VOLUME}': no grant for it")
        e = await refused(stub.Read(pb.ReadRequest(volume=VOLUME, offset=0, length=BLOCK), timeout=RPC_TIMEOUT_S))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "user 'alice'" in (e.details() or "") and f"may not read volume '{VOLUME}'" in (e.details() or "")
        await one_warning(c, "primary", f"may not read volume '{VOLUME}': no grant for it")

        # alice may not grant herself (only admin may).
        r = await cli(c, "grant", "alice", "--volume", VOLUME, "--user", "alice")
        assert r.returncode == 1, r
        assert "may not call CoordinatorService.Grant: only admin may" in r.stderr, r.stderr
        assert "PERMISSION_DENIED" in r.stderr
        await one_warning(c, "coordinator", "user 'alice' (ipv4:127.0.0.1:")

        # A read-only grant: reads work (within a few heartbeats), writes do not.
        r = await cli(c, "grant", "alice", "--volume", VOLUME, "--read-only")
        assert r.returncode == 0, r.stderr
        assert f"user 'alice' may now read (read-only) volume '{VOLUME}'" in r.stdout

        async def can_read() -> bool:
            try:
                reply = await stub.Read(pb.ReadRequest(volume=VOLUME, offset=0, length=BLOCK),
                                        timeout=RPC_TIMEOUT_S)
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
                return False
            assert reply.data == block, "alice read something else than what admin wrote"
            return True

        await wait_until(can_read, "alice's read-only grant reaches the primary", timeout_s=GRANT_PROPAGATION_S,
                         interval_s=0.1)
        e = await refused(stub.WriteOne(write_req(64 * BLOCK, b"a" * BLOCK), timeout=RPC_TIMEOUT_S))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "the grant is read-only" in (e.details() or "")
        reply = await stream_write(stub, 65 * BLOCK, b"b" * BLOCK)
        assert reply.code == grpc.StatusCode.PERMISSION_DENIED.value[0], reply
        assert reply.client_seq == 7 and "the grant is read-only" in reply.message
        r = await cli(c, "grants", "--json")
        assert r.returncode == 0, r.stderr
        assert '"user": "alice"' in r.stdout and '"read_only": true' in r.stdout

        # Read-write: alice's writes are applied (and checked at the end).
        r = await cli(c, "grant", "alice", "--volume", VOLUME)
        assert r.returncode == 0 and "(was read-only)" in r.stdout, r

        async def can_write() -> bool:
            data = bytes([0xA1]) * BLOCK
            try:
                await stub.WriteOne(write_req(66 * BLOCK, data), timeout=RPC_TIMEOUT_S)
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
                return False
            model[66] = data
            return True

        await wait_until(can_write, "alice's read-write grant reaches the primary", timeout_s=GRANT_PROPAGATION_S,
                         interval_s=0.1)
        reply = await stream_write(stub, 67 * BLOCK, bytes([0xA2]) * BLOCK)
        assert reply.code == 0, reply
        model[67] = bytes([0xA2]) * BLOCK

        # Revoked: refused again within a few heartbeats, also on an open stream.
        call = stub.Write()
        await call.write(write_req(68 * BLOCK, bytes([0xA3]) * BLOCK, seq=1))
        first = await asyncio.wait_for(call.read(), RPC_TIMEOUT_S)
        assert first.code == 0, first
        model[68] = bytes([0xA3]) * BLOCK
        r = await cli(c, "revoke", "alice", "--volume", VOLUME)
        assert r.returncode == 0 and "may no longer use volume" in r.stdout, r
        seq = [1]

        async def stream_refused() -> bool:
            seq[0] += 1
            await call.write(write_req(69 * BLOCK, bytes([0xA4]) * BLOCK, seq=seq[0]))
            reply = await asyncio.wait_for(call.read(), RPC_TIMEOUT_S)
            if reply.code == 0:
                model[69] = bytes([0xA4]) * BLOCK
                return False
            assert reply.code == grpc.StatusCode.PERMISSION_DENIED.value[0], reply
            assert "no grant for it" in reply.message
            return True

        await wait_until(stream_refused, "the revoke reaches alice's open write stream",
                         timeout_s=GRANT_PROPAGATION_S, interval_s=0.1)
        await call.done_writing()
        e = await refused(stub.WriteOne(write_req(70 * BLOCK, b"c" * BLOCK), timeout=RPC_TIMEOUT_S))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "no grant for it" in (e.details() or "")
        r = await cli(c, "grants")
        assert r.returncode == 0 and "no grants" in r.stdout, r
        r = await cli(c, "revoke", "alice", "--volume", VOLUME)
        assert r.returncode == 1 and "holds no grant" in r.stderr and "NOT_FOUND" in r.stderr, r
        r = await cli(c, "grant", "alice", "--volume", "nope")
        assert r.returncode == 1 and "NOT_FOUND" in r.stderr, r
        r = await cli(c, "grant", "no body", "--volume", VOLUME)
        assert r.returncode == 1 and "INVALID_ARGUMENT" in r.stderr, r
    await assert_replicas_identical(c, VOLUME)
    await check_model(c, VOLUME, model)
    admin = await c.connect(VOLUME)
    try:
        for b in (64, 65, 70):
            assert await admin.read(b * BLOCK, BLOCK) == bytes(BLOCK), f"a refused write changed block {b}"
    finally:
        await admin.close()


# ---------------------------------------------------------------- the NBD export


async def test_nbd_export_needs_a_grant(cluster_factory: Callable[..., LocalCluster], tmp_path: Path,
                                        seed: int) -> None:
    """Faults: alice opens the NBD export with no grant, then with a read-only
    grant (served read-only); a plaintext client. (Seed: derived from the test id.)"""
    nbdinfo = shutil.which("nbdinfo")
    if nbdinfo is None:
        pytest.skip("nbdinfo not installed: install it with scripts/setup.sh (Debian: apt-get install libnbd-bin)")
    port = free_port()
    c = await start(cluster_factory, primary_args=["--nbd-listen", f"127.0.0.1:{port}"])
    model: dict[int, bytes] = {}
    admin = await c.connect(VOLUME)
    try:
        await write_blocks(admin, 0, 16, 4, seed, model)
    finally:
        await admin.close()
    gnutls = write_nbd_client_dir(certs.load_client_tls(c.certs_dir, "alice"), tmp_path / "gnutls-alice")
    url = f"nbds://127.0.0.1:{port}/{VOLUME}?tls-certificates={gnutls}"

    async def info() -> subprocess.CompletedProcess[str]:
        return await run(nbdinfo, "--json", url, timeout_s=30.0)

    r = await info()
    assert r.returncode != 0, r
    await one_warning(c, "primary", "user 'alice' (NBD) may not read volume")
    r = await run(nbdinfo, "--json", f"nbd://127.0.0.1:{port}/{VOLUME}", timeout_s=30.0)
    assert r.returncode != 0, "a plaintext NBD client got the export"
    assert (await cli(c, "grant", "alice", "--volume", VOLUME, "--read-only")).returncode == 0

    async def export_read_only() -> bool | None:
        r = await info()
        if r.returncode != 0:
            return None
        [export] = json.loads(r.stdout)["exports"]
        return bool(export["is_read_only"])

    async def served(read_only: bool) -> bool:
        return await export_read_only() is read_only

    await wait_until(lambda: served(True), "alice's read-only grant serves the export read-only",
                     timeout_s=GRANT_PROPAGATION_S, interval_s=0.2)
    assert (await cli(c, "grant", "alice", "--volume", VOLUME)).returncode == 0
    await wait_until(lambda: served(False), "alice's read-write grant serves the export writable",
                     timeout_s=GRANT_PROPAGATION_S, interval_s=0.2)
    await assert_replicas_identical(c, VOLUME)
    await check_model(c, VOLUME, model)


# ---------------------------------------------------------------- client certificates used as nodes


async def test_client_certificate_used_as_node_refused(
    cluster_factory: Callable[..., LocalCluster], seed: int
) -> None:
    """Faults: alice (a client certificate) calls NodeService.AssignVolume and
    InjectFault, CoordinatorService.RegisterNode, and opens ReplicaService.Replicate.
    (Seed: derived from the test id.)"""
    c = await start(cluster_factory, primary_args=["--enable-fault-injection"])
    model: dict[int, bytes] = {}
    admin = await c.connect(VOLUME)
    try:
        await write_blocks(admin, 0, 32, 4, seed, model)
    finally:
        await admin.close()
    st = await c.get_volume(VOLUME)
    alice = user_creds(c.certs_dir, "alice")
    async with channel(c.primary_addr, alice) as ch:
        node = pbg.NodeServiceStub(ch)
        e = await refused(node.AssignVolume(pb.VolumeAssignment(
            spec=pb.VolumeSpec(name=VOLUME, size_bytes=VOLUME_SIZE, block_size=BLOCK), role=pb.ROLE_SECONDARY,
            epoch=st.epoch + 5, peer_address=c.secondary_addr), timeout=RPC_TIMEOUT_S))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "user 'alice' (ipv4:127.0.0.1:" in (e.details() or "")
        assert "may not call NodeService.AssignVolume: only coordinators and admin may" in (e.details() or "")
        await one_warning(c, "primary", "may not call NodeService.AssignVolume")
        e = await refused(node.InjectFault(pb.InjectFaultRequest(volume=VOLUME, kind="eio", count=100),
                                           timeout=RPC_TIMEOUT_S))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "user 'alice'" in (e.details() or "") and "may not call NodeService.InjectFault" in (e.details() or "")
        await one_warning(c, "primary", "may not call NodeService.InjectFault")
    async with channel(c.secondary_addr, alice) as ch:
        e = await open_refused(pbg.ReplicaServiceStub(ch).Replicate(), pb.ReplicateRequest(open=pb.StreamOpen(
            volume=pb.VolumeSpec(name=VOLUME, size_bytes=VOLUME_SIZE, block_size=BLOCK), epoch=st.epoch + 5,
            first_seq=1)))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "user 'alice'" in (e.details() or "") and "may not call ReplicaService.Replicate" in (e.details() or "")
        await one_warning(c, "secondary", "may not call ReplicaService.Replicate")
    async with channel(c.coordinator_addr, alice) as ch:
        e = await refused(pbg.CoordinatorServiceStub(ch).RegisterNode(pb.RegisterNodeRequest(
            address=c.primary_addr, role_hint="primary"), timeout=RPC_TIMEOUT_S))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "may not call CoordinatorService.RegisterNode: only nodes may" in (e.details() or "")
        await one_warning(c, "coordinator", "may not call CoordinatorService.RegisterNode")
    # Nothing changed: same epoch, same roles, no fault armed (more writes succeed).
    after = await c.get_volume(VOLUME)
    assert (after.epoch, after.primary, after.secondary) == (st.epoch, st.primary, st.secondary)
    admin = await c.connect(VOLUME)
    try:
        await write_blocks(admin, 32, 32, 4, seed + 1, model)
    finally:
        await admin.close()
    await assert_replicas_identical(c, VOLUME)
    await check_model(c, VOLUME, model)


# ---------------------------------------------------------------- node certificates out of place


async def test_node_certificate_not_the_primary_refused(
    cluster_factory: Callable[..., LocalCluster], tmp_path: Path, seed: int
) -> None:
    """Faults: a node certificate for another host (127.0.0.2) opens a replication
    stream to the secondary, registers and heartbeats under the primary's address,
    and calls AssignVolume on the primary (it is not its coordinator). (Seed: derived
    from the test id.)"""
    c = await start(cluster_factory)
    model: dict[int, bytes] = {}
    admin = await c.connect(VOLUME)
    try:
        await write_blocks(admin, 0, 32, 4, seed, model)
    finally:
        await admin.close()
    st = await c.get_volume(VOLUME)
    rogue = node_creds(make_node_cert(c, tmp_path / "rogue", "127.0.0.2", "rogue.example"))
    async with channel(c.secondary_addr, rogue) as ch:
        e = await open_refused(pbg.ReplicaServiceStub(ch).Replicate(), pb.ReplicateRequest(open=pb.StreamOpen(
            volume=pb.VolumeSpec(name=VOLUME, size_bytes=VOLUME_SIZE, block_size=BLOCK), epoch=st.epoch + 1,
            first_seq=1, primary_address="127.0.0.2:1")))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        details = e.details() or ""
        assert "node certificate with SANs 127.0.0.2, rogue.example" in details, details
        assert (f"may not open a replication stream for volume '{VOLUME}': it is not the volume's primary "
                f"({c.primary_addr})") in details, details
        await one_warning(c, "secondary", "may not open a replication stream")
    async with channel(c.primary_addr, rogue) as ch:
        e = await refused(pbg.NodeServiceStub(ch).AssignVolume(pb.VolumeAssignment(
            spec=pb.VolumeSpec(name=VOLUME, size_bytes=VOLUME_SIZE, block_size=BLOCK), role=pb.ROLE_SECONDARY,
            epoch=st.epoch + 5, peer_address=c.secondary_addr), timeout=RPC_TIMEOUT_S))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "only coordinators and admin may (a coordinator is a node certificate with a SAN for the host of " \
               "this node's --coordinator: 127.0.0.1)" in (e.details() or ""), e.details()
        await one_warning(c, "primary", "may not call NodeService.AssignVolume")
    async with channel(c.coordinator_addr, rogue) as ch:
        coord = pbg.CoordinatorServiceStub(ch)
        e = await refused(coord.RegisterNode(pb.RegisterNodeRequest(address=c.primary_addr, role_hint="primary"),
                                             timeout=RPC_TIMEOUT_S))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        assert (f"may not register as node {c.primary_addr}: '127.0.0.1' is not among its certificate's SANs"
                in (e.details() or "")), e.details()
        await one_warning(c, "coordinator", f"may not register as node {c.primary_addr}")
        e = await refused(coord.Heartbeat(pb.HeartbeatRequest(address=c.primary_addr), timeout=RPC_TIMEOUT_S))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        await one_warning(c, "coordinator", f"may not heartbeat as node {c.primary_addr}")
    after = await c.get_volume(VOLUME)
    assert (after.epoch, after.primary, after.secondary) == (st.epoch, st.primary, st.secondary)
    admin = await c.connect(VOLUME)
    try:
        await write_blocks(admin, 32, 32, 4, seed + 1, model)
    finally:
        await admin.close()
    assert (await c.get_volume(VOLUME)).state == pb.PAIR_STATE_IN_SYNC
    await assert_replicas_identical(c, VOLUME)
    await check_model(c, VOLUME, model)


# ---------------------------------------------------------------- certificates that do not verify


def handshake_failures(c: LocalCluster, name: str) -> list[str]:
    """The lines of ``name``'s log where gRPC's core (on the process's stderr)
    says a TLS handshake failed: syncrep's handlers never see such a peer."""
    return [line for line in c.log_tail(name, 5000).splitlines() if "Handshake failed" in line]


async def server_logged_handshake_failure(c: LocalCluster, name: str, before: list[str], reason: str) -> None:
    """The server logged the refused handshake, with its reason (one line per
    attempt: a gRPC channel may try again within its call's deadline)."""
    async def logged() -> bool:
        return len(handshake_failures(c, name)) > len(before)

    await wait_until(logged, f"{name} logs the failed TLS handshake", timeout_s=10.0, interval_s=0.1)
    new = handshake_failures(c, name)[len(before):]
    assert all(reason in line for line in new), new


async def test_expired_client_certificate_refused(
    cluster_factory: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    """Fault: carol's client certificate expired (made valid for 1 day, 10 days ago)."""
    c = await start(cluster_factory)
    d = tmp_path / "expired"
    d.mkdir()
    shutil.copy(c.certs_dir / certs.CA_CERT_FILE, d / certs.CA_CERT_FILE)
    certs.create_client_cert(d, c.ca_key, "carol", lifetime_days=1,
                             now=dt.datetime.now(dt.UTC) - dt.timedelta(days=10))
    # The CLI refuses to present it, saying which file and what to run.
    r = await run(sys.executable, "-m", "syncrep", "status", "--coordinator", c.coordinator_addr,
                  "--certs-dir", str(d), "--user", "carol")
    assert r.returncode == 1, r
    assert f"{d / 'client.carol.crt'} expired on" in r.stderr and "--overwrite" in r.stderr, r.stderr
    # Presented anyway (raw gRPC), the server refuses the handshake: UNAVAILABLE.
    before = handshake_failures(c, "coordinator")
    async with channel(c.coordinator_addr, user_creds(d, "carol")) as ch:
        e = await refused(pbg.CoordinatorServiceStub(ch).ListVolumes(pb.ListVolumesRequest(), timeout=RPC_TIMEOUT_S))
        assert e.code() == grpc.StatusCode.UNAVAILABLE, e
    await server_logged_handshake_failure(c, "coordinator", before, "certificate has expired")


async def test_client_certificate_from_another_ca_refused(
    cluster_factory: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    """Fault: a certs dir made by another CA (its admin certificate), used against the cluster."""
    c = await start(cluster_factory)
    other = tmp_path / "other"
    certs.create_all(other / "certs", other / "ca.key", ["127.0.0.1"], users=("admin",))
    r = await run(sys.executable, "-m", "syncrep", "status", "--coordinator", c.coordinator_addr,
                  "--certs-dir", str(other / "certs"))
    assert r.returncode == 1, r
    assert f"cannot reach coordinator {c.coordinator_addr}" in r.stderr, r.stderr
    assert TLS_HINT in r.stderr and "UNAVAILABLE" in r.stderr, r.stderr
    # The other CA's client certificate, with the cluster's CA trusted: the server refuses it.
    cert, key = certs.client_cert_files(other / "certs", "admin")
    before = handshake_failures(c, "coordinator")
    async with channel(c.coordinator_addr, credentials(c.certs_dir, cert, key)) as ch:
        e = await refused(pbg.CoordinatorServiceStub(ch).ListVolumes(pb.ListVolumesRequest(), timeout=RPC_TIMEOUT_S))
        assert e.code() == grpc.StatusCode.UNAVAILABLE, e
    await server_logged_handshake_failure(c, "coordinator", before, "CERTIFICATE_VERIFY_FAILED")


async def test_server_whose_sans_do_not_name_the_address_refused(
    cluster_factory: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    """Fault: a server (signed by the cluster's CA) whose certificate names only
    other.example, dialed as 127.0.0.1: the client refuses it."""
    c = await start(cluster_factory)
    d = make_node_cert(c, tmp_path / "wrong-san", "other.example")
    server = grpc.aio.server()
    creds = grpc.ssl_server_credentials(
        [((d / certs.NODE_KEY_FILE).read_bytes(), (d / certs.NODE_CERT_FILE).read_bytes())],
        root_certificates=(d / certs.CA_CERT_FILE).read_bytes(), require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    try:
        r = await run(sys.executable, "-m", "syncrep", "status", "--coordinator", f"127.0.0.1:{port}",
                      "--certs-dir", str(c.certs_dir))
        assert r.returncode == 1, r
        assert f"cannot reach coordinator 127.0.0.1:{port}" in r.stderr, r.stderr
        assert TLS_HINT in r.stderr, r.stderr
        # The same server dialed by a name it has: the handshake succeeds (the call is unimplemented).
        async with channel(f"127.0.0.1:{port}", user_creds(c.certs_dir, "admin"),
                           ("grpc.ssl_target_name_override", "other.example")) as ch:
            e = await refused(pbg.CoordinatorServiceStub(ch).ListVolumes(pb.ListVolumesRequest(),
                                                                         timeout=RPC_TIMEOUT_S))
            assert e.code() == grpc.StatusCode.UNIMPLEMENTED, e
    finally:
        await server.stop(0)
