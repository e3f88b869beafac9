"""Real etcd processes on loopback for the tests and the benchmarks (issue 12).

``EtcdCluster.make(binary, root, size)`` lays out ``size`` members on free
loopback ports, each in its own data directory under ``root``;
``start()``/``stop(i)``/``kill(i)``/``start_member(i)`` run them, and every
start waits (bounded: ``START_TIMEOUT_S``) until etcd's ``/health`` says
``"health":"true"``. Raft timings are short (50 ms heartbeats, 500 ms
election timeout) so that a lost member is noticed in about a second.
The pytest fixtures are in tests/etcd_fixture.py.

``make(..., tls=True)``: the members serve clients over TLS and require a
client certificate (``--client-cert-auth``), from a PKI of their own made
with syncrep's cert code under ``root/pki`` (ca.crt, node.crt for
127.0.0.1/localhost, node.key: serverAuth and clientAuth, so the same files
serve a coordinator as ``--etcd-certs-dir``); ``url`` is then ``etcds://``.
Peer traffic between the members stays plaintext on loopback.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.cluster import free_port
from syncrep import certs

__all__ = ["HOST", "START_TIMEOUT_S", "STOP_TIMEOUT_S", "EtcdCluster", "EtcdMember"]

#: How long a member (or the whole cluster) may take to become healthy.
START_TIMEOUT_S = 20.0
#: How long a member may take to exit after SIGTERM before it is killed.
STOP_TIMEOUT_S = 5.0
HOST = "127.0.0.1"


@dataclass
class EtcdMember:
    name: str
    data_dir: Path
    client_port: int
    peer_port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    #: TLS to clients: the PKI directory (ca.crt, node.crt, node.key), or None.
    certs_dir: Path | None = None

    @property
    def endpoint(self) -> str:
        return f"{HOST}:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"{'https' if self.certs_dir is not None else 'http'}://{self.endpoint}"

    def _open(self, req: urllib.request.Request | str) -> Any:
        ctx = None
        if self.certs_dir is not None:
            ctx = ssl.create_default_context(cafile=str(self.certs_dir / certs.CA_CERT_FILE))
            ctx.load_cert_chain(str(self.certs_dir / certs.NODE_CERT_FILE), str(self.certs_dir / certs.NODE_KEY_FILE))
        return urllib.request.urlopen(req, timeout=1.0, context=ctx)

    @property
    def peer_url(self) -> str:
        return f"http://{HOST}:{self.peer_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"etcd member {self.name} is not running"
        return self.proc.pid

    def healthy(self) -> bool:
        """etcd's /health says true (it has a leader and answers a quorum read)."""
        try:
            with self._open(f"{self.client_url}/health") as r:
                return bool(json.loads(r.read()).get("health") in ("true", True))
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def status(self) -> dict[str, Any]:
        """etcd's Maintenance.Status over its JSON gateway: ``header.member_id``, ``leader``, ..."""
        req = urllib.request.Request(f"{self.client_url}/v3/maintenance/status", data=b"{}", method="POST")
        with self._open(req) as r:
            return dict(json.loads(r.read()))

    def pause(self) -> None:
        """SIGSTOP: the member stops answering (no keepalive, no reads), its sockets stay open."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class EtcdCluster:
    """etcd members started by a test: ``start()``/``stop(i)``/``kill(i)``/``start_member(i)``."""

    binary: str
    root: Path
    members: list[EtcdMember] = field(default_factory=list)

    #: With TLS: the PKI directory the members and their clients use.
    certs_dir: Path | None = None

    @classmethod
    def make(cls, binary: str, root: Path, size: int, *, tls: bool = False) -> EtcdCluster:
        c = cls(binary, root)
        if tls:
            c.certs_dir = root / "pki"
            if not (c.certs_dir / certs.NODE_CERT_FILE).exists():
                certs.create_all(c.certs_dir, root / "pki-ca.key", [HOST, "localhost"], users=())
        for i in range(size):
            name = f"etcd{i}"
            c.members.append(
                EtcdMember(name, root / name, free_port(HOST), free_port(HOST), root / f"{name}.log",
                           certs_dir=c.certs_dir)
            )
        return c

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def url(self) -> str:
        """The coordinator's ``--store`` value for this cluster."""
        return ("etcds://" if self.certs_dir is not None else "etcd://") + ",".join(self.endpoints)

    @property
    def coordinator_args(self) -> list[str]:
        """The flags a coordinator needs besides ``--store url`` (TLS: the client certificate)."""
        return [] if self.certs_dir is None else ["--etcd-certs-dir", str(self.certs_dir)]

    def _initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def start_member(self, i: int, *, wait: bool = True) -> None:
        m = self.members[i]
        if m.proc is not None and m.proc.poll() is None:
            raise RuntimeError(f"etcd member {m.name} is already running")
        m.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            self.binary,
            "--name", m.name,
            "--data-dir", str(m.data_dir),
            "--listen-client-urls", m.client_url,
            "--advertise-client-urls", m.client_url,
            "--listen-peer-urls", m.peer_url,
            "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", self._initial_cluster(),
            "--initial-cluster-token", f"syncrep-test-{self.root.name}",
            # Short raft timings: a member lost is noticed (and a leader
            # elected) in about a second, not the default's several.
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
        ]  # fmt: skip
        if m.certs_dir is not None:
            argv += [
                "--cert-file", str(m.certs_dir / certs.NODE_CERT_FILE),
                "--key-file", str(m.certs_dir / certs.NODE_KEY_FILE),
                "--trusted-ca-file", str(m.certs_dir / certs.CA_CERT_FILE),
                "--client-cert-auth",
            ]  # fmt: skip
        # A restart rejoins with its data directory ("existing"); a first start bootstraps.
        state = "existing" if (m.data_dir / "member").exists() else "new"
        argv += ["--initial-cluster-state", state]
        log = m.log_path.open("ab")
        try:
            m.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        if wait:
            self.wait_healthy([i])

    def start(self) -> None:
        for i in range(len(self.members)):
            self.start_member(i, wait=False)
        self.wait_healthy()

    def wait_healthy(self, which: list[int] | None = None, timeout_s: float = START_TIMEOUT_S) -> None:
        which = list(range(len(self.members))) if which is None else which
        deadline = time.monotonic() + timeout_s
        while True:
            sick = [self.members[i] for i in which if not self.members[i].healthy()]
            if not sick:
                return
            for m in sick:
                if m.proc is not None and m.proc.poll() is not None:
                    raise RuntimeError(
                        f"etcd member {m.name} exited with code {m.proc.returncode}:\n{m.log_tail()}"
                    )
            if time.monotonic() >= deadline:
                tails = "\n".join(f"--- {m.name}:\n{m.log_tail()}" for m in sick)
                raise RuntimeError(
                    f"etcd members {[m.name for m in sick]} not healthy after {timeout_s:g} s:\n{tails}"
                )
            time.sleep(0.05)

    def raft_leader(self, timeout_s: float = START_TIMEOUT_S) -> int:
        """The index of the member that leads etcd's raft now (bounded wait until one answers)."""
        deadline = time.monotonic() + timeout_s
        while True:
            ids: dict[str, int] = {}
            leader = None
            for i, m in enumerate(self.members):
                if m.proc is None:
                    continue
                try:
                    st = m.status()
                except (OSError, urllib.error.URLError, ValueError):
                    continue
                ids[str(st["header"]["member_id"])] = i
                leader = str(st.get("leader", "")) or leader
            if leader is not None and leader in ids:
                return ids[leader]
            if time.monotonic() >= deadline:
                raise RuntimeError(f"no etcd raft leader found among {self.endpoints} in {timeout_s:g} s")
            time.sleep(0.05)

    def stop(self, i: int) -> None:
        """Stop member ``i`` (SIGTERM, then SIGKILL after STOP_TIMEOUT_S); its data stays."""
        m = self.members[i]
        if m.proc is None:
            return
        if m.proc.poll() is None:
            m.proc.send_signal(signal.SIGCONT)  # a paused member cannot act on SIGTERM
            m.proc.terminate()
            try:
                m.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                m.proc.kill()
                m.proc.wait(STOP_TIMEOUT_S)
        m.proc = None

    def kill(self, i: int) -> None:
        """SIGKILL member ``i``."""
        m = self.members[i]
        if m.proc is not None and m.proc.poll() is None:
            m.proc.kill()
            m.proc.wait(STOP_TIMEOUT_S)
        m.proc = None

    def close(self) -> None:
        for i in range(len(self.members)):
            self.stop(i)
