"""Mutual TLS, real processes: every process serves TLS, and SIGHUP reloads certificates without
dropping in-flight writes (issue 11, docs/SECURITY.md).

The fault: the node certificate is re-issued (same CA, new key and serial) under a running
workload, then every process gets SIGHUP. New connections must get the new certificate; the
workload must see no failed write; the test ends with the replicas compared block for block and
every acknowledged write checked.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
import subprocess
import sys
from typing import Any

import pytest
from e2e_helpers import Workload, assert_replicas_identical, check_no_lost_writes

from deploy.cluster import LocalCluster
from syncrep import certs, rpc

pytestmark = pytest.mark.e2e

VOL = "vol0"
SIZE = 16 << 20


def presented_certificate(c: LocalCluster, address: str) -> bytes:
    """The DER certificate the server at ``address`` presents to a new TLS connection (as admin)."""
    ctx = ssl.create_default_context(cafile=str(c.certs_dir / certs.CA_CERT_FILE))
    crt, key = certs.client_cert_files(c.certs_dir, "admin")
    ctx.load_cert_chain(str(crt), str(key))
    ctx.set_alpn_protocols(["h2"])
    host, port = rpc.host_of(address), int(address.rsplit(":", 1)[1])
    with socket.create_connection((host, port), timeout=5) as raw, ctx.wrap_socket(raw, server_hostname=host) as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return der


def der_of(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())


async def test_every_process_serves_tls_and_plaintext_clients_are_refused(cluster_factory: Any) -> None:
    c: LocalCluster = cluster_factory()
    await c.start()
    node_der = der_of((c.certs_dir / certs.NODE_CERT_FILE).read_bytes())
    for name in ("coordinator", "primary", "secondary"):
        assert presented_certificate(c, c.address(name)) == node_der, name
    # A plaintext client cannot talk to a TLS server: the command says it cannot reach it.
    r = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "syncrep", "status", "--coordinator", c.coordinator_addr, "--insecure"],
        capture_output=True, text=True, timeout=60, env=c._environ())
    assert r.returncode == 1 and "cannot reach coordinator" in r.stderr, r.stderr


async def test_sighup_reloads_certificates_without_dropping_in_flight_writes(cluster_factory: Any,
                                                                           seed: int) -> None:
    """Fault: the node certificate is replaced while writes run, then SIGHUP to every process."""
    c: LocalCluster = cluster_factory()
    await c.start()
    await c.create_volume(VOL, SIZE)
    w = Workload(c, VOL, SIZE, writers=3, seed=seed)
    await w.start()
    await w.wait_acked(100)
    old = der_of((c.certs_dir / certs.NODE_CERT_FILE).read_bytes())
    hosts = certs.cert_sans((c.certs_dir / certs.NODE_CERT_FILE).read_bytes())
    certs.create_node_cert(c.certs_dir, c.ca_key, hosts, overwrite=True)
    new = der_of((c.certs_dir / certs.NODE_CERT_FILE).read_bytes())
    assert new != old
    # Until the reload the processes present the certificate they loaded at start.
    assert presented_certificate(c, c.address("primary")) == old
    for name in ("coordinator", "primary", "secondary"):
        c.kill(name, signal.SIGHUP)
    for name in ("coordinator", "primary", "secondary"):
        await _wait_log(c, name, "SIGHUP: certificates reloaded")
        assert presented_certificate(c, c.address(name)) == new, f"{name} still presents the old certificate"
        assert c.is_running(name), f"{name} died on SIGHUP"
    # The writes went on through the reload, none failed.
    await w.wait_acked(250)
    await w.stop()
    assert w.failed == 0, f"seed {seed}: writes failed across the reload: {w.errors[:3]}"
    await c.wait_for_volume(VOL, "in_sync", timeout_s=60)
    await assert_replicas_identical(c, VOL)
    await check_no_lost_writes(c, VOL, w)
    # New connections of the harness itself (admin, new channels) work with the new certificates.
    rpc.reload()
    st = await c.get_volume(VOL)
    assert st.primary == c.address("primary")


async def test_sighup_with_a_broken_new_key_keeps_the_old_certificate(cluster_factory: Any) -> None:
    """Fault: node.key replaced by a file others can read; SIGHUP must refuse it and keep serving."""
    c: LocalCluster = cluster_factory()
    await c.start()
    old = presented_certificate(c, c.address("primary"))
    key = c.certs_dir / certs.NODE_KEY_FILE
    key.chmod(0o644)
    try:
        c.kill("primary", signal.SIGHUP)
        await _wait_log(c, "primary", "NOT reloaded")
        assert c.is_running("primary")
        assert presented_certificate(c, c.address("primary")) == old
        assert "chmod 600" in c.log_tail("primary", 50)
    finally:
        key.chmod(0o600)


async def _wait_log(c: LocalCluster, name: str, text: str, timeout_s: float = 10.0) -> None:
    from conftest import wait_until

    async def seen() -> bool:
        return text in c.log_tail(name, 200)

    await wait_until(seen, f"{name} logs {text!r}", timeout_s=timeout_s, interval_s=0.1)
