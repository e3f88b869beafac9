"""TLS to etcd (``--store etcds://``, issues 11 and 12), real etcd processes.

The etcd members serve clients only over TLS and require a client
certificate (``--client-cert-auth``), from a PKI of their own
(deploy/etcd.py ``make(tls=True)``): the coordinators present it with
``--etcd-certs-dir``. A plaintext client, or one whose certificate another
CA signed, is refused with a message saying what to check; bad flags are
refused before anything starts. The cluster test ends in sync, replicas
compared block for block, every acknowledged write checked.
"""

from __future__ import annotations

import queue
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until
from etcd_fixture import EtcdCluster, fixture_etcd, fixture_etcd_tls3  # noqa: F401
from test_coordinator_ha import leader_kill9_then_secondary_lost, make_cluster

from coordinator.db import PairRecord
from coordinator.etcd_store import EtcdStore, EtcdTls
from coordinator.store import StoreUnavailable, parse_store_url
from syncrep import certs

pytestmark = pytest.mark.e2e


def _pair(name: str) -> PairRecord:
    return PairRecord(name=name, size_bytes=1 << 20, block_size=4096, primary="127.0.0.1:1",
                      secondary="127.0.0.1:2", epoch=1)


def test_store_url_etcds_parses_as_tls() -> None:
    """etcds:// is TLS, etcd:// plaintext; both keep their scheme in ``url``."""
    spec = parse_store_url("etcds://10.0.0.1,10.0.0.2:2380")
    assert spec.tls and spec.endpoints == ("10.0.0.1:2379", "10.0.0.2:2380")
    assert spec.url == "etcds://10.0.0.1:2379,10.0.0.2:2380"
    assert not parse_store_url("etcd://10.0.0.1").tls
    with pytest.raises(ValueError, match="etcds://"):
        parse_store_url("https://10.0.0.1:2379")


def test_tls_etcd_refuses_plaintext_and_a_foreign_certificate(
    etcd_tls3: EtcdCluster, tmp_path: Path
) -> None:
    """Bad input: a plaintext client, and a client whose certificate another CA
    signed, against etcd members that require TLS client certificates. Each
    is refused within its bound, with a hint at what to check; the right
    certificates work (a pair written and read back)."""
    etcd = etcd_tls3
    assert etcd.certs_dir is not None and etcd.url.startswith("etcds://")
    # The members really speak TLS only: plain HTTP to a client port fails.
    with pytest.raises((urllib.error.URLError, OSError)):
        urllib.request.urlopen(f"http://{etcd.endpoints[0]}/health", timeout=2.0).read()

    def plaintext() -> None:
        EtcdStore(etcd.endpoints, op_timeout_s=1.0, start_timeout_s=1.0).close()

    with pytest.raises(StoreUnavailable, match=r"use --store etcds://"):
        plaintext()

    other = tmp_path / "other-pki"
    certs.create_all(other, tmp_path / "other-ca.key", ["127.0.0.1"], users=())

    def foreign() -> None:
        EtcdStore(etcd.endpoints, op_timeout_s=1.0, start_timeout_s=1.0,
                  tls=EtcdTls.from_certs_dir(other, "127.0.0.1")).close()

    with pytest.raises(StoreUnavailable, match=r"signed by that ca\.crt"):
        foreign()

    def right() -> PairRecord | None:
        store = EtcdStore(etcd.endpoints, op_timeout_s=2.0, start_timeout_s=10.0,
                          tls=EtcdTls.from_certs_dir(etcd.certs_dir, "127.0.0.1"))
        try:
            store.create_pair(_pair("tls-vol"), "created over TLS")
            return store.get_pair("tls-vol")
        finally:
            store.close()

    got = right()
    assert got is not None and got.name == "tls-vol" and got.epoch == 1


def _coordinator_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "syncrep", "coordinator", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        # etcds:// with no certificates at all (--insecure, no --etcd-certs-dir).
        (["--store", "etcds://127.0.0.1:1", "--insecure"], "TLS to etcd needs certificates"),
        # The TLS flags with a plaintext store.
        (["--store", "etcd://127.0.0.1:1", "--insecure", "--etcd-certs-dir", "/nowhere"],
         "give the store as etcds://"),
        (["--store", "sqlite", "--insecure", "--etcd-server-name", "etcd"], "give the store as etcds://"),
        # A certs dir without the files.
        (["--store", "etcds://127.0.0.1:1", "--insecure", "--etcd-certs-dir", "/nowhere"], "--etcd-certs-dir"),
    ],
)
def test_etcd_tls_flags_refuse_bad_input(tmp_path: Path, args: list[str], needle: str) -> None:
    """Bad input: refused at start with one line naming the flag, nothing started."""
    r = _coordinator_cli("--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "c"), *args)
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "campaigning" not in r.stderr, r.stderr


def test_a_tls_coordinator_refuses_plaintext_etcd_unless_told(tmp_path: Path) -> None:
    """Bad input (secure by default): a coordinator with --certs-dir given a
    plaintext ``etcd://`` store refuses to start, saying what to use instead;
    ``--etcd-insecure`` with an ``etcds://`` store is refused too. With
    ``--etcd-insecure`` it starts (and warns): etcd on port 1 is unreachable,
    so it gives up after its start timeout, having got past the check."""
    certs.create_all(tmp_path / "certs", tmp_path / "ca.key", ["127.0.0.1"], users=())
    base = ["--listen", "127.0.0.1:0", "--advertise", "127.0.0.1:1", "--data-dir", str(tmp_path / "c"),
            "--certs-dir", str(tmp_path / "certs")]
    r = _coordinator_cli(*base, "--store", "etcd://127.0.0.1:1")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "plaintext to etcd from a process that runs mutual TLS is refused" in r.stderr, r.stderr
    assert "--store etcds://127.0.0.1:1" in r.stderr and "--etcd-insecure" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "campaigning" not in r.stderr, r.stderr
    r = _coordinator_cli(*base, "--store", "etcds://127.0.0.1:1", "--etcd-insecure")
    assert r.returncode == 1 and "--etcd-insecure is for a plaintext etcd:// store" in r.stderr, r.stderr
    # Told: past the check, it tries etcd (and says so); stopped there.
    proc = subprocess.Popen([sys.executable, "-m", "syncrep", "coordinator", *base, "--store", "etcd://127.0.0.1:1",
                             "--etcd-insecure"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # ends at EOF if it exits
            lines.append(line)
            if "etcd" in line and "127.0.0.1:1" in line:
                break
    finally:
        proc.kill()
        proc.wait(timeout=30)
    text = "".join(lines)
    assert "127.0.0.1:1" in text and "is refused" not in text and "Traceback" not in text, text


def test_migrate_to_etcds_without_certificates_is_refused(tmp_path: Path) -> None:
    """Bad input: ``coordinator migrate --to etcds://`` with --insecure and no
    --etcd-certs-dir: refused before reading anything."""
    r = subprocess.run([sys.executable, "-m", "syncrep", "coordinator", "migrate", "--from", str(tmp_path),
                        "--to", "etcds://127.0.0.1:1", "--insecure"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "TLS to etcd needs certificates" in r.stderr, r.stderr


async def test_three_coordinators_on_tls_etcd_leader_kill9_then_secondary_lost(
    cluster_factory: Any, etcd_tls3: EtcdCluster, seed: int
) -> None:
    """Faults: kill -9 of the leading coordinator under a 4-writer load, then
    kill -9 of the secondary (test_coordinator_ha's scenario), with every
    coordinator talking TLS to a 3-member etcd that requires client
    certificates. The coordinators say they use TLS; no plaintext warning.
    Replicas compared, every acknowledged write checked. Seed: ``seed``."""
    c = await make_cluster(cluster_factory, etcd_tls3)
    for name in c.coordinator_names:
        log = c.log_tail(name, 400)
        assert "over TLS (certificates from" in log, log
        assert "plaintext and unauthenticated" not in log, log
    # SIGHUP first: the store's and the election's clients are replaced, and
    # the scenario below (an election after a kill -9, a degraded pair
    # recorded) then runs on the new ones.
    for name in c.coordinator_names:
        c.kill(name, signal.SIGHUP)
    for name in c.coordinator_names:
        await wait_until(lambda n=name: "etcd client certificates reloaded from" in c.log_tail(n, 400),
                         f"{name} logs the etcd reload", timeout_s=10.0, interval_s=0.1)
        assert c.is_running(name), f"{name} died on SIGHUP"
    await leader_kill9_then_secondary_lost(c, seed)


async def test_a_tls_coordinator_on_plaintext_etcd_warns(cluster_factory: Any, etcd: EtcdCluster) -> None:
    """No fault: a coordinator whose own traffic is mutual TLS, on a plaintext
    ``etcd://`` it was told to accept (``--etcd-insecure``, which the harness
    passes for its plaintext etcd), says at start that the etcd traffic is
    plaintext and what to use instead."""
    c = await make_cluster(cluster_factory, etcd, create=False)
    for name in c.coordinator_names:
        log = c.log_tail(name, 400)
        assert "plaintext and unauthenticated" in log and "etcds://" in log, log


def test_etcds_defaults_to_the_coordinators_own_certificates(tmp_path: Path) -> None:
    """No --etcd-certs-dir: the coordinator's --certs-dir (its node.crt, the
    syncrep CA) is what it presents to etcd and checks etcd's certificates
    with; the server name defaults to the first endpoint's host."""
    import argparse

    from syncrep import cli, rpc

    certs.create_all(tmp_path / "certs", tmp_path / "ca.key", ["127.0.0.1"], users=())
    saved = rpc.security
    rpc.configure(rpc.Security(tmp_path / "certs"))
    try:
        args = argparse.Namespace(etcd_certs_dir=None, etcd_server_name=None)
        tls = cli._etcd_tls(args, "etcds://etcd-0.example:2379,etcd-1.example:2379")
        assert tls.source == str(tmp_path / "certs") and tls.server_name == "etcd-0.example"
        assert tls.cert == (tmp_path / "certs" / certs.NODE_CERT_FILE).read_bytes()
        assert tls.ca_crt == (tmp_path / "certs" / certs.CA_CERT_FILE).read_bytes()
        args = argparse.Namespace(etcd_certs_dir=None, etcd_server_name="etcd.example")
        assert cli._etcd_tls(args, "etcds://[::1]:2379").server_name == "etcd.example"
        plain = argparse.Namespace(etcd_certs_dir=None, etcd_server_name=None, etcd_insecure=True)
        assert cli._etcd_tls(plain, "etcd://h:1") is None
        with pytest.raises(cli.CliError, match="plaintext to etcd"):
            cli._etcd_tls(argparse.Namespace(etcd_certs_dir=None, etcd_server_name=None), "etcd://h:1")
    finally:
        rpc.configure(saved)


async def test_sighup_reload_of_etcd_certificates_uses_the_new_files_and_keeps_the_watch(
    etcd_tls3: EtcdCluster, tmp_path: Path
) -> None:
    """Fault: the certificate a coordinator presents to etcd is replaced and
    reloaded (``EtcdStore.reload_tls``, what SIGHUP calls), twice: first by
    one etcd does not trust (another CA signed it), then by a fresh one of the
    right CA. Each reload takes effect on the next call (a new connection):
    the untrusted one is refused by etcd, the fresh one works again. The
    volumes/ watch, a stream in flight on the connection opened at start,
    keeps delivering every change throughout."""
    etcd = etcd_tls3
    assert etcd.certs_dir is not None
    ca_key = etcd.certs_dir.parent / "pki-ca.key"
    mine = tmp_path / "mine"
    mine.mkdir()
    shutil.copy(etcd.certs_dir / certs.CA_CERT_FILE, mine / certs.CA_CERT_FILE)
    certs.create_node_cert(mine, ca_key, ["127.0.0.1"])
    other = tmp_path / "other-pki"
    certs.create_all(other, tmp_path / "other-ca.key", ["127.0.0.1"], users=())
    writer = EtcdStore(etcd.endpoints, op_timeout_s=2.0, start_timeout_s=10.0,
                       tls=EtcdTls.from_certs_dir(etcd.certs_dir, "127.0.0.1"))
    store = EtcdStore(etcd.endpoints, op_timeout_s=1.0, start_timeout_s=10.0,
                      tls=EtcdTls.from_certs_dir(mine, "127.0.0.1"))
    seen: queue.Queue[str] = queue.Queue()
    stop_watch = store.watch_changes(seen.put)
    try:
        def changed(name: str) -> None:
            while seen.get(timeout=10.0) != name:
                pass

        store.create_pair(_pair("before"), "before the reload")
        changed("before")

        foreign = certs.load_node_tls(other)
        untrusted = EtcdTls(etcd.certs_dir.joinpath(certs.CA_CERT_FILE).read_bytes(), foreign.cert, foreign.key,
                            "127.0.0.1", source=str(other))
        assert "reloaded from" in store.reload_tls(untrusted)
        with pytest.raises(StoreUnavailable):
            store.get_pair("before")
        writer.create_pair(_pair("during"), "while the untrusted certificate is loaded")
        changed("during")  # the watch's own connection was not touched

        certs.create_node_cert(mine, ca_key, ["127.0.0.1"], overwrite=True)
        fresh = EtcdTls.from_certs_dir(mine, "127.0.0.1")
        store.reload_tls(fresh)
        assert store.tls is fresh

        def answers() -> bool:
            try:
                return store.get_pair("during") is not None
            except StoreUnavailable:
                return False  # the breaker waits for its probe (every 0.5 s) to be answered

        await wait_until(answers, "the store answers with the fresh certificate", timeout_s=20.0, interval_s=0.2)
        store.create_pair(_pair("after"), "after the second reload")
        changed("after")
    finally:
        stop_watch()
        store.close()
        writer.close()
