"""The local multi-process harness: a coordinator, a primary and a secondary as
real OS processes on loopback ports.

Used by the end-to-end tests, ``syncrep demo`` and benchmarks::

    async with LocalCluster(tmp_path) as c:          # starts and waits until healthy
        await c.create_volume("vol0", 16 * MiB)       # waits until in_sync and writable
        client = await c.connect("vol0")
        c.kill("secondary")                           # SIGKILL (process group)
        await c.restart("secondary")

    with LocalCluster() as c:                         # plain scripts, no event loop
        c.create_volume_sync("vol0", 16 * MiB)

Failover (docs/FAILOVER.md): the process *names* ("primary", "secondary")
are fixed, the *roles* move with a promotion. ``await c.role_of(vol)`` maps
role -> process name as the coordinator says now; ``c.kill(name)`` then
``await c.start_process(name)`` restarts a process with its original command
line; ``c.wipe_data(name)`` empties a stopped node's data dir (a replaced
disk); ``await c.promote(vol)`` and ``c.run_cli(...)`` / ``await
c.status_json()`` drive the real ``syncrep`` command line.

Each process runs ``sys.executable -m syncrep <role> ...`` in its own session
(process group), with its data in ``<workdir>/<name>/`` and its stdout+stderr
in ``<workdir>/<name>.log`` (appended across restarts). Teardown sends SIGTERM
(and SIGCONT, in case the process is stopped) to the group, then SIGKILL after a
bounded grace; an ``atexit`` hook kills whatever a crashed test left behind.

Test hosts (optional): ``hosts={"primary": placement, ...}`` puts a process on
its own host -- anything with an ``address`` (the IP it listens on and is
reached at) and an ``exec_prefix`` (e.g. ``["ip", "netns", "exec", NS]``),
such as :class:`deploy.netns.Host`. A placed process listens on
``<address>:<HOST_PORT>`` (the host is private, so the port is fixed) and is
spawned as ``exec_prefix + command`` (``ip netns exec`` execs, so the pid and
the process group are those of the process itself). The harness talks to
the processes (health checks, volume creation), so the caller must run where
every host is reachable -- on the client host (see ``deploy.nemesis``).
Without ``hosts`` (the default) everything runs on loopback as before.

Security (docs/SECURITY.md): by default (``tls=True``) the cluster makes a
throwaway CA in ``<workdir>/certs`` (its key in ``<workdir>/ca.key``, outside
the certs dir), a node certificate for every host it places a process on
(and 127.0.0.1, localhost) and a client certificate for ``admin``; every
process runs with ``--certs-dir``, the harness's own calls go through
``syncrep.rpc`` as ``admin`` (``rpc.configure`` while the cluster runs; the
previous setting comes back at close) and ``run_cli`` passes ``--certs-dir``
too. ``tls=False`` runs everything with ``--insecure``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc

import syncrep
from syncrep import certs, rpc
from syncrep import client as sc
from syncrep.pb import syncrep_pb2 as pb
from syncrep.pb import syncrep_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

NAMES = ("coordinator", "primary", "secondary")
#: Port of a process placed on its own test host (``hosts=``).
HOST_PORT = 7000
DEFAULT_STARTUP_TIMEOUT_S = 20.0
# Longer than the servers' own graceful-shutdown grace, so a clean stop is not cut short.
DEFAULT_STOP_GRACE_S = rpc.SHUTDOWN_GRACE_S + 3.0
DEFAULT_VOLUME_READY_TIMEOUT_S = 20.0
LOG_TAIL_LINES = 40
PORT_ATTEMPTS = 5
_ADDR_IN_USE_HINTS = (
    "address already in use",
    "address in use",
    "cannot listen on",
    "failed to add port",
    "failed to bind",
)

# ---------------------------------------------------------------- orphan protection

_LIVE_GROUPS: dict[int, subprocess.Popen[bytes]] = {}
_LIVE_LOCK = threading.Lock()


def _kill_group(pgid: int, sig: int) -> bool:
    """Signal a whole process group; False when it no longer exists."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


@atexit.register
def _kill_leftovers() -> None:
    """Last resort (interpreter exit): no process of ours survives us."""
    with _LIVE_LOCK:
        procs = list(_LIVE_GROUPS.items())
        _LIVE_GROUPS.clear()
    for pgid, _ in procs:
        _kill_group(pgid, signal.SIGTERM)
        _kill_group(pgid, signal.SIGCONT)
    deadline = time.monotonic() + 1.0
    for pgid, p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        _kill_group(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=1.0)


# ---------------------------------------------------------------- helpers


class ClusterError(RuntimeError):
    """The harness could not do what was asked (a process failed to start, ...).

    ``summary`` is one line (for the CLI); ``str(err)`` adds the tail of the
    failing process's log.
    """

    def __init__(self, summary: str, *, name: str | None = None, log_tail: str = "") -> None:
        self.summary = summary
        self.name = name
        self.log_tail = log_tail
        text = summary
        if log_tail:
            text += f"\n--- last lines of the {name} log ---\n{log_tail.rstrip()}\n---"
        super().__init__(text)


#: Where free_port draws from: below the kernel's ephemeral range, so that the
#: port is not taken meanwhile as the local end of somebody's outgoing
#: connection (a CI run failed so: etcd "bind: address already in use" on a
#: port bind(0) had handed out, which a client socket then held).
_PORT_FLOOR = 10000
_handed_out: set[int] = set()
_handed_lock = threading.Lock()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago, that this process has not handed out
    before, drawn at random below the ephemeral range (see ``_PORT_FLOOR``);
    bind(0) when that range is too small."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    top = _ephemeral_low() - 1
    if top - _PORT_FLOOR >= 1000:
        rng = random.SystemRandom()
        for _ in range(200):
            port = rng.randrange(_PORT_FLOOR, top + 1)
            with _handed_lock:
                if port in _handed_out:
                    continue
            with socket.socket(family, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError as e:
                    if e.errno == errno.EADDRINUSE:
                        continue
                    raise
            with _handed_lock:
                _handed_out.add(port)
            return port
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _fmt_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class HostPlacement(Protocol):
    """Where a process runs: its address and the command prefix that enters its host."""

    @property
    def address(self) -> str: ...

    @property
    def exec_prefix(self) -> list[str]: ...


@dataclass
class ManagedProcess:
    """One process of the cluster."""

    name: str
    role: str  # "coordinator" | "primary" | "secondary"
    host: str
    port: int
    data_dir: Path
    log_path: Path
    extra_args: list[str] = field(default_factory=list)
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0
    # Test-host placement: command prefix (e.g. ``ip netns exec NS``) and a fixed port.
    exec_prefix: list[str] = field(default_factory=list)
    fixed_port: int = 0

    @property
    def address(self) -> str:
        return _fmt_addr(self.host, self.port)

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    @property
    def running(self) -> bool:
        """Started and not exited (a SIGSTOPped process is still running)."""
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll() if self.popen is not None else None


# ---------------------------------------------------------------- the cluster


class LocalCluster:
    """A coordinator, a primary and a secondary as separate OS processes.

    ``workdir`` (default: a new temporary directory, never removed by the
    cluster) holds ``<name>/`` data dirs and ``<name>.log`` files.
    ``*_args`` are extra command-line flags for that process (e.g.
    ``secondary_args=["--enable-fault-injection"]``,
    ``coordinator_args=["--node-timeout-s", "1.5"]``); ``extra_args`` maps a
    name to flags the same way and wins over the ``*_args`` parameters.

    Several coordinators (issue 12): ``coordinators=3, store="etcd://h:p,..."``
    runs processes "coordinator", "coordinator2", "coordinator3" on that etcd
    (``coordinator_args`` go to each); the nodes and every command get
    ``--coordinator A,B,C`` (``coordinator_addr`` is that list), and
    ``await c.leader()`` names the leading one. ``coordinators > 1`` needs
    an etcd ``store``; the default is one coordinator on SQLite, as before.
    """

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        host: str = "127.0.0.1",
        coordinator_args: Sequence[str] = (),
        primary_args: Sequence[str] = (),
        secondary_args: Sequence[str] = (),
        extra_args: Mapping[str, Sequence[str]] | None = None,
        log_level: str = "INFO",
        startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
        stop_grace_s: float = DEFAULT_STOP_GRACE_S,
        env: Mapping[str, str] | None = None,
        hosts: Mapping[str, HostPlacement] | None = None,
        tls: bool = True,
        users: Sequence[str] = ("admin",),
        coordinators: int = 1,
        store: str = "sqlite",
    ) -> None:
        if coordinators < 1 or (coordinators > 1 and not store.startswith(("etcd://", "etcds://"))):
            raise ValueError(f"coordinators={coordinators} with store={store!r}: several coordinators need an "
                             "etcd store (store='etcd://HOST:PORT,...')")
        self.store = store
        #: The coordinator processes' names, the first one "coordinator" (issue 12).
        self.coordinator_names = ["coordinator"] + [f"coordinator{i}" for i in range(2, coordinators + 1)]
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="syncrep-cluster-"))
        self.tls = tls
        self.users = tuple(users)
        self._saved_security: rpc.Security | None = None
        self.host = host
        self.log_level = log_level
        self.startup_timeout_s = startup_timeout_s
        self.stop_grace_s = stop_grace_s
        self.env = dict(env or {})
        args: dict[str, list[str]] = {
            "coordinator": list(coordinator_args),
            "primary": list(primary_args),
            "secondary": list(secondary_args),
        }
        for name, a in (extra_args or {}).items():
            if name not in args:
                raise ValueError(f"unknown process {name!r}; expected one of {', '.join(NAMES)}")
            args[name] = list(a)
        self.procs: dict[str, ManagedProcess] = {
            name: ManagedProcess(
                name=name,
                role=name,
                host=host,
                port=0,
                data_dir=self.workdir / name,
                log_path=self.workdir / f"{name}.log",
                extra_args=args[name],
            )
            for name in NAMES
        }
        for name in self.coordinator_names[1:]:
            self.procs[name] = ManagedProcess(
                name=name, role="coordinator", host=host, port=0, data_dir=self.workdir / name,
                log_path=self.workdir / f"{name}.log", extra_args=list(args["coordinator"]),
            )
        for name, h in (hosts or {}).items():
            if name not in self.procs:
                continue  # e.g. the workload client's host
            p = self.procs[name]
            p.host = h.address
            p.exec_prefix = list(h.exec_prefix)
            p.fixed_port = HOST_PORT
        self.hosts = dict(hosts or {})
        self._started = False

    # ------------------------------------------------------------ addresses

    def _proc(self, name: str) -> ManagedProcess:
        try:
            return self.procs[name]
        except KeyError:
            raise ValueError(f"unknown process {name!r}; expected one of {', '.join(NAMES)}") from None

    def address(self, name: str) -> str:
        p = self._proc(name)
        if not p.port:
            raise ClusterError(f"{name} has no address yet: the cluster is not started", name=name)
        return p.address

    @property
    def coordinator_addr(self) -> str:
        """The coordinator's address; with several, all of them ("A,B,C": what --coordinator takes)."""
        return ",".join(self.address(name) for name in self.coordinator_names)

    async def leader(self, timeout_s: float = 20.0) -> str:
        """The name of the coordinator process that leads now, waiting (bounded) for one to."""
        deadline = time.monotonic() + timeout_s
        while True:
            by_address = {self.procs[n].address: n for n in self.coordinator_names if self.procs[n].running}
            if by_address:
                for info in await sc.coordinator_info(",".join(by_address), timeout_s=2.0):
                    if info["state"] == "leader":
                        return by_address[info["address"]]
            if time.monotonic() >= deadline:
                raise ClusterError(f"no coordinator leads within {timeout_s:g} s")
            await asyncio.sleep(0.1)

    @property
    def primary_addr(self) -> str:
        return self.address("primary")

    @property
    def secondary_addr(self) -> str:
        return self.address("secondary")

    @property
    def addresses(self) -> dict[str, str]:
        return {name: p.address for name, p in self.procs.items() if p.port}

    def pid(self, name: str) -> int | None:
        return self._proc(name).pid

    def log_path(self, name: str) -> Path:
        return self._proc(name).log_path

    def data_dir(self, name: str) -> Path:
        return self._proc(name).data_dir

    def log_tail(self, name: str, lines: int = LOG_TAIL_LINES) -> str:
        return _tail(self._proc(name).log_path, lines)

    def is_running(self, name: str) -> bool:
        return self._proc(name).running

    @property
    def certs_dir(self) -> Path:
        """The cluster's certificates (ca.crt, node.crt/key, client.USER.crt/key)."""
        return self.workdir / "certs"

    @property
    def ca_key(self) -> Path:
        """The CA key: outside the certs dir, never given to a process."""
        return self.workdir / "ca.key"

    def security_args(self) -> list[str]:
        """The flags every process and command of this cluster gets."""
        return ["--certs-dir", str(self.certs_dir)] if self.tls else ["--insecure"]

    def make_certs(self) -> None:
        """The cluster's CA and certificates (once per workdir; kept across restarts)."""
        if not self.tls or (self.certs_dir / certs.NODE_CERT_FILE).exists():
            return
        hosts = sorted({"127.0.0.1", "localhost", self.host, *(p.host for p in self.procs.values())})
        certs.create_all(self.certs_dir, self.ca_key, hosts, users=self.users)

    def _configure_rpc(self) -> None:
        """The harness's own calls (health checks, status, clients) as admin."""
        self._saved_security = rpc.security
        rpc.configure(rpc.Security(self.certs_dir, "admin") if self.tls else rpc.Security(None))

    def set_args(self, name: str, extra_args: Sequence[str]) -> None:
        """Replace a process's extra flags; they apply at its next (re)start."""
        self._proc(name).extra_args = list(extra_args)

    # ------------------------------------------------------------ spawning

    def _command(self, p: ManagedProcess) -> list[str]:
        cmd = [
            *p.exec_prefix,
            sys.executable, "-m", "syncrep", "--log-level", self.log_level,
            p.role, "--listen", p.address, "--data-dir", str(p.data_dir),
        ]
        if p.role != "coordinator":
            cmd += ["--coordinator", ",".join(self.procs[n].address for n in self.coordinator_names)]
        elif self.store != "sqlite":
            cmd += ["--store", self.store]
            if self.tls and self.store.startswith("etcd://"):
                # A TLS coordinator refuses plaintext etcd unless told; the harness's
                # plaintext test etcd is an explicit choice (as --insecure is).
                cmd += ["--etcd-insecure"]
        return cmd + self.security_args() + p.extra_args

    def _environ(self) -> dict[str, str]:
        env = dict(os.environ)
        root = str(Path(syncrep.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(x for x in (root, env.get("PYTHONPATH", "")) if x)
        env["PYTHONUNBUFFERED"] = "1"
        # Commands a test spawns with this environment find the certificates.
        env.pop(certs.CERTS_DIR_ENV, None)
        if self.tls:
            env[certs.CERTS_DIR_ENV] = str(self.certs_dir)
        env.update(self.env)
        return env

    def _spawn(self, p: ManagedProcess) -> None:
        if p.running:
            raise ClusterError(f"{p.name} is already running (pid {p.pid})", name=p.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        p.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = self._command(p)
        with open(p.log_path, "ab") as logf:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            logf.write(f"==== {stamp} harness: starting {p.name}: {' '.join(cmd)}\n".encode())
            logf.flush()
            p.popen = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=self._environ(),
                cwd=str(self.workdir),
                start_new_session=True,
            )
        p.starts += 1
        with _LIVE_LOCK:
            _LIVE_GROUPS[p.popen.pid] = p.popen
        log.debug("started %s (pid %d) on %s", p.name, p.popen.pid, p.address)

    def _startup_error(self, p: ManagedProcess, why: str) -> ClusterError:
        return ClusterError(
            f"{p.name} failed to start on {p.address}: {why} (log: {p.log_path})",
            name=p.name,
            log_tail=_tail(p.log_path),
        )

    async def _wait_healthy(self, p: ManagedProcess, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if p.popen is None or p.popen.poll() is not None:
                rc = p.popen.poll() if p.popen is not None else None
                raise self._startup_error(p, f"the process exited with code {rc}")
            if await rpc.health_check(p.address, timeout_s=1.0):
                return
            if time.monotonic() >= deadline:
                raise self._startup_error(p, f"not healthy within {timeout_s:g} s")
            await asyncio.sleep(0.1)

    def _address_in_use(self, p: ManagedProcess) -> bool:
        tail = _tail(p.log_path, 20).lower()
        return any(h in tail for h in _ADDR_IN_USE_HINTS)

    async def _start_one(self, p: ManagedProcess, *, new_port: bool) -> None:
        """Spawn ``p`` and wait until healthy. With ``new_port``, pick a free
        port and retry on a collision; otherwise keep the process's port (its
        address is its identity)."""
        if p.fixed_port:
            new_port = False  # a host of its own: the port is always free
            p.port = p.fixed_port
        attempts = PORT_ATTEMPTS if new_port else 1
        for attempt in range(1, attempts + 1):
            if new_port:
                p.port = free_port(self.host)
            self._spawn(p)
            try:
                await self._wait_healthy(p, self.startup_timeout_s)
                return
            except ClusterError:
                collided = p.popen is not None and p.popen.poll() is not None and self._address_in_use(p)
                await asyncio.to_thread(self._terminate, p, 1.0)
                if collided and attempt < attempts:
                    log.info("%s: port %d was taken; retrying on another", p.name, p.port)
                    continue
                raise

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> LocalCluster:
        """Start all three processes and wait (bounded) until they are healthy.

        On failure every process is stopped and :class:`ClusterError` names the
        failing process and carries the tail of its log.
        """
        if self._started:
            return self
        self._started = True
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            await asyncio.to_thread(self.make_certs)
            self._configure_rpc()
            for name in self.coordinator_names:
                await self._start_one(self.procs[name], new_port=True)
            await asyncio.gather(
                self._start_one(self.procs["primary"], new_port=True),
                self._start_one(self.procs["secondary"], new_port=True),
            )
            await self._wait_coordinator_ready()
        except BaseException:
            await self.close()
            raise
        log.debug("cluster up: %s (workdir %s)", self.addresses, self.workdir)
        return self

    async def _wait_coordinator_ready(self) -> None:
        """ListVolumes answers (the coordinator serves its API, not only health)."""
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            try:
                await sc.list_volumes(self.coordinator_addr, timeout_s=2.0)
                if self.store == "sqlite":
                    return
                # On etcd: and a coordinator leads (a volume can be created).
                if any(i["state"] == "leader" for i in await sc.coordinator_info(self.coordinator_addr)):
                    return
                if time.monotonic() >= deadline:
                    raise self._startup_error(self.procs["coordinator"], "no coordinator leads")
            except sc.ClientError as e:
                if time.monotonic() >= deadline:
                    raise self._startup_error(self.procs["coordinator"], f"ListVolumes fails: {e}") from None
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        """Stop every process: SIGTERM, then SIGKILL after ``stop_grace_s``."""
        await asyncio.gather(
            *(asyncio.to_thread(self._terminate, p, self.stop_grace_s) for p in self.procs.values())
        )
        self._restore_rpc()
        self._started = False

    def _restore_rpc(self) -> None:
        if self._started:
            rpc.configure(self._saved_security)

    def start_sync(self) -> LocalCluster:
        """:meth:`start` for code without an event loop."""
        return asyncio.run(self.start())

    def close_sync(self) -> None:
        """Synchronous teardown (safe inside or outside an event loop)."""
        for p in self.procs.values():
            self._terminate(p, self.stop_grace_s)
        self._restore_rpc()
        self._started = False

    async def __aenter__(self) -> LocalCluster:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __enter__(self) -> LocalCluster:
        return self.start_sync()

    def __exit__(self, *exc: object) -> None:
        self.close_sync()

    # ------------------------------------------------------------ process control

    def _terminate(self, p: ManagedProcess, grace_s: float) -> int | None:
        """SIGTERM the group (+SIGCONT), wait ``grace_s``, then SIGKILL. Returns the exit code."""
        popen = p.popen
        if popen is None:
            return None
        pgid = popen.pid
        if popen.poll() is None:
            _kill_group(pgid, signal.SIGTERM)
            _kill_group(pgid, signal.SIGCONT)  # a stopped process cannot handle SIGTERM
            try:
                popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM for %.1f s; SIGKILL", p.name, pgid, grace_s)
        # Kill the whole group whatever happened to the leader: no orphans.
        _kill_group(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=5.0)
        with _LIVE_LOCK:
            _LIVE_GROUPS.pop(pgid, None)
        return popen.poll()

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the process group of ``name`` (SIGKILL, SIGTERM,
        SIGSTOP, SIGCONT, ...). After SIGKILL the process is reaped."""
        p = self._proc(name)
        if p.popen is None or p.popen.poll() is not None:
            raise ClusterError(f"{name} is not running", name=name)
        log.info("sending %s to %s (pid %d)", signal.Signals(sig).name, name, p.popen.pid)
        _kill_group(p.popen.pid, sig)
        if sig == signal.SIGKILL:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=5.0)
            with _LIVE_LOCK:
                _LIVE_GROUPS.pop(p.popen.pid, None)

    def pause(self, name: str) -> None:
        """SIGSTOP: the process hangs (TCP stays open, nothing answers)."""
        self.kill(name, signal.SIGSTOP)

    def resume(self, name: str) -> None:
        """SIGCONT after :meth:`pause`."""
        self.kill(name, signal.SIGCONT)

    async def stop(self, name: str, grace_s: float | None = None) -> int | None:
        """Graceful stop: SIGTERM, SIGKILL after ``grace_s``. Returns the exit code."""
        p = self._proc(name)
        return await asyncio.to_thread(self._terminate, p, self.stop_grace_s if grace_s is None else grace_s)

    async def restart(
        self,
        name: str,
        *,
        extra_args: Sequence[str] | None = None,
        grace_s: float | None = None,
    ) -> None:
        """Stop ``name`` if it runs (SIGTERM, then SIGKILL), start it again on
        the same port with the same data dir, and wait until healthy.
        ``extra_args`` replaces its extra flags."""
        p = self._proc(name)
        if not p.port:
            raise ClusterError(f"cannot restart {name}: the cluster was never started", name=name)
        if extra_args is not None:
            p.extra_args = list(extra_args)
        await self.stop(name, grace_s)
        self._started = True
        await self._start_one(p, new_port=False)

    async def start_process(self, name: str) -> None:
        """Start a stopped/killed process again (same port, same data, its
        original command line)."""
        p = self._proc(name)
        if p.running:
            raise ClusterError(f"{name} is already running (pid {p.pid})", name=name)
        await self._start_one(p, new_port=not p.port)

    def wipe_data(self, name: str) -> None:
        """Empty the data dir of a stopped node (a replaced or empty disk): the
        directory stays, with nothing in it."""
        p = self._proc(name)
        if p.running:
            raise ClusterError(f"cannot wipe the data of {name}: it is running (pid {p.pid}); kill it first",
                               name=name)
        if p.data_dir.exists():
            shutil.rmtree(p.data_dir)
        p.data_dir.mkdir(parents=True)

    def volume_dir(self, name: str, volume: str) -> Path:
        """Where node ``name`` keeps the store of ``volume`` (syncrep.volumes.VolumeRegistry)."""
        return self._proc(name).data_dir / "volumes" / volume

    def set_aside_dir(self, name: str) -> Path:
        """Where node ``name`` moves stores it must not use (docs/FAILOVER.md: never deleted)."""
        return self._proc(name).data_dir / "volumes" / ".set-aside"

    # ------------------------------------------------------------ volumes

    async def create_volume(
        self,
        name: str,
        size: int,
        block_size: int = 4096,
        *,
        resync_mode: int | str = 0,
        auto_failover: bool = False,
        wait: bool = True,
        timeout_s: float = DEFAULT_VOLUME_READY_TIMEOUT_S,
    ) -> pb.VolumeStatus:
        """Create a volume pair (primary = "primary", secondary = "secondary").

        Retries while the nodes are not yet registered; with ``wait``, returns
        once the pair is in_sync with both nodes alive and the primary serves
        reads of the volume.
        """
        deadline = time.monotonic() + timeout_s
        attempt = 0
        retry_codes = {
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        }
        while True:
            attempt += 1
            try:
                st = await sc.create_volume(
                    self.coordinator_addr,
                    name,
                    size,
                    self.primary_addr,
                    self.secondary_addr,
                    block_size=block_size,
                    resync_mode=resync_mode,
                    auto_failover=auto_failover,
                )
                break
            except sc.ClientError as e:
                if e.code == grpc.StatusCode.ALREADY_EXISTS and attempt > 1:
                    st = await sc.get_volume(self.coordinator_addr, name)  # an earlier attempt won
                    break
                if e.code not in retry_codes or time.monotonic() >= deadline:
                    raise
                log.debug("CreateVolume %s: %s; retrying", name, e)
                await asyncio.sleep(0.2)
        if not wait:
            return st
        remaining = max(1.0, deadline - time.monotonic())
        st = await sc.wait_for_volume(self.coordinator_addr, name, "in_sync", timeout_s=remaining)
        await self._wait_primary_serves(name, block_size, max(1.0, deadline - time.monotonic()))
        return st

    async def _wait_primary_serves(self, volume: str, block_size: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        async with rpc.channel(self.primary_addr) as ch:
            stub = pb_grpc.VolumeServiceStub(ch)
            while True:
                try:
                    await stub.Read(pb.ReadRequest(volume=volume, offset=0, length=block_size), timeout=2.0)
                    return
                except grpc.RpcError as e:
                    if time.monotonic() >= deadline:
                        raise sc.ClientError.from_rpc(
                            e, f"waiting for the primary {self.primary_addr} to serve volume {volume!r}"
                        ) from None
                await asyncio.sleep(0.1)

    def create_volume_sync(self, name: str, size: int, block_size: int = 4096, **kw: Any) -> pb.VolumeStatus:
        """:meth:`create_volume` for code without an event loop."""
        return asyncio.run(self.create_volume(name, size, block_size, **kw))

    async def get_volume(self, name: str) -> pb.VolumeStatus:
        return await sc.get_volume(self.coordinator_addr, name)

    async def list_volumes(self) -> list[pb.VolumeStatus]:
        return await sc.list_volumes(self.coordinator_addr)

    async def wait_for_volume(
        self,
        name: str,
        predicate: Callable[[pb.VolumeStatus], bool] | str,
        *,
        timeout_s: float = 30.0,
    ) -> pb.VolumeStatus:
        """Poll until the volume reaches a state ("in_sync", "degraded",
        "resyncing" — with both nodes alive) or ``predicate(status)`` holds."""
        return await sc.wait_for_volume(self.coordinator_addr, name, predicate, timeout_s=timeout_s)

    async def role_of(self, volume: str) -> dict[str, str]:
        """``{"primary": process name, "secondary": process name}`` as the
        coordinator records the pair now (roles move with a promotion)."""
        st = await self.get_volume(volume)
        by_addr = {p.address: n for n, p in self.procs.items() if p.port}
        out: dict[str, str] = {}
        for role, addr in (("primary", st.primary), ("secondary", st.secondary)):
            if addr not in by_addr:
                raise ClusterError(f"volume {volume!r}: the {role} {addr!r} is no process of this cluster")
            out[role] = by_addr[addr]
        return out

    async def current_primary_addr(self, volume: str) -> str:
        """The address of the node the coordinator names the primary of ``volume`` now."""
        return (await self.get_volume(volume)).primary

    async def promote(self, volume: str, *, force: bool = False, timeout_s: float = 20.0) -> pb.PromoteReply:
        """``CoordinatorService.Promote`` (raises ClientError on refusal)."""
        return await sc.promote(self.coordinator_addr, volume, force=force, timeout_s=timeout_s)

    def cli_command(self, *args: str) -> list[str]:
        """``syncrep ARGS --coordinator <this cluster's coordinator>``."""
        return [sys.executable, "-m", "syncrep", *args, "--coordinator", self.coordinator_addr,
                *self.security_args()]

    async def run_cli(self, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run the real command line against this cluster (``--coordinator``
        added), without blocking the event loop; returns exit code and output."""
        proc = await asyncio.create_subprocess_exec(
            *self.cli_command(*args),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=self._environ(), cwd=str(self.workdir),
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise ClusterError(f"`syncrep {' '.join(args)}` did not finish within {timeout_s:g} s") from None
        assert proc.returncode is not None
        return subprocess.CompletedProcess(list(args), proc.returncode, out.decode(), err.decode())

    async def status_json(self, volume: str | None = None) -> Any:
        """``syncrep status --json``: the whole document, or one volume's entry."""
        r = await self.run_cli("status", "--json")
        if r.returncode != 0:
            raise ClusterError(f"`syncrep status --json` failed ({r.returncode}): {r.stderr.strip()}")
        doc = json.loads(r.stdout)
        if volume is None:
            return doc
        for v in doc["volumes"]:
            if v["name"] == volume:
                return v
        raise ClusterError(f"`syncrep status --json` lists no volume {volume!r}")

    async def connect(self, volume: str, **kw: Any) -> sc.VolumeClient:
        """A :class:`syncrep.client.VolumeClient` for ``volume``."""
        return await sc.VolumeClient.connect(self.coordinator_addr, volume, **kw)

    def __repr__(self) -> str:
        procs = ", ".join(
            f"{n}={p.address}{'' if p.running else ' (down)'}" for n, p in self.procs.items() if p.port
        )
        return f"LocalCluster({self.workdir}: {procs or 'not started'})"
