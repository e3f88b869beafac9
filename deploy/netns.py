"""Test hosts: Linux network namespaces joined by veth links, for fault injection.

A :class:`TestNet` creates one network namespace per test host (by default
``coordinator``, ``primary``, ``secondary`` and ``client``), each with its own
address in a private /24 that exists only inside these namespaces, joined by
veth links to a bridge that lives in one more namespace (the *hub*)::

    coordinator (10.213.N.1) --veth--+
    primary     (10.213.N.2) --veth--+-- bridge in the hub namespace
    secondary   (10.213.N.3) --veth--+
    client      (10.213.N.4) --veth--+

Nothing is created in the machine's default network namespace: no address,
no route, no iptables rule. Traffic flows only between these hosts.

Faults (as root): :meth:`TestNet.partition` (iptables DROP inside a host's
namespace, symmetric or one-directional), :meth:`TestNet.heal`,
:meth:`TestNet.link_down` / :meth:`TestNet.link_up` (the host's veth on the
bridge side). :meth:`TestNet.exec_prefix` is the command prefix that runs a
process on a host (``ip netns exec NS``).

Every name starts with ``srn<pid>-`` (the owning process's pid), so
:func:`sweep_stale` can remove what a crashed run left behind without
touching a run that is still alive. :meth:`TestNet.close` kills every process
still inside the namespaces, then deletes them (which deletes the veths).

When namespaces cannot be created (not root, no ``ip``, no permission),
:func:`netns_available` says why; callers then fall back to loopback and skip
the link faults with that reason.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

PREFIX = "srn"
DEFAULT_HOSTS = ("coordinator", "primary", "secondary", "client")
#: Private range used inside the namespaces only (10.213.<N>.0/24).
SUBNET_BASE = "10.213"
_NAME_RE = re.compile(rf"^{PREFIX}(\d+)-")
CMD_TIMEOUT_S = 10.0
_TAGS = itertools.count()  # distinct tags for nets made in the same millisecond


class NetnsError(RuntimeError):
    """An ``ip``/``iptables`` command failed."""


def _run(cmd: Sequence[str], *, check: bool = True, timeout: float = CMD_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    try:
        p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetnsError(f"{' '.join(cmd)}: {e}") from None
    if check and p.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)} failed ({p.returncode}): {(p.stderr or p.stdout).strip()}")
    return p


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_namespaces() -> list[str]:
    """Names of every network namespace (``ip netns list``), [] when unavailable."""
    if shutil.which("ip") is None:
        return []
    try:
        p = _run(["ip", "netns", "list"], check=False)
    except NetnsError:
        return []
    return [line.split()[0] for line in p.stdout.splitlines() if line.strip()]


def netns_available() -> tuple[bool, str]:
    """(True, "") when this process can create network namespaces, else (False, why)."""
    if os.geteuid() != 0:
        return False, f"network namespaces need root (running as uid {os.geteuid()})"
    if shutil.which("ip") is None:
        return False, "the `ip` command (iproute2) is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe{next(_TAGS)}"  # unique: several runs may probe at once
    try:
        _run(["ip", "netns", "add", probe])
    except NetnsError as e:
        return False, f"cannot create a network namespace: {e}"
    try:
        _run(["ip", "-n", probe, "link", "set", "lo", "up"])
        _run(["ip", "-n", probe, "link", "add", "vprobe0", "type", "veth", "peer", "name", "vprobe1"])
    except NetnsError as e:
        return False, f"cannot create veth links in a network namespace: {e}"
    finally:
        _run(["ip", "netns", "delete", probe], check=False)
    return True, ""


def iptables_available() -> tuple[bool, str]:
    if shutil.which("iptables") is None:
        return False, "iptables is not installed (scripts/setup.sh installs it)"
    return True, ""


def _kill_netns_pids(ns: str) -> int:
    """SIGKILL every process inside ``ns`` (after SIGCONT, in case it is stopped)."""
    p = _run(["ip", "netns", "pids", ns], check=False)
    pids = [int(x) for x in p.stdout.split() if x.isdigit()]
    for pid in pids:
        if pid == os.getpid():
            continue
        for sig in (signal.SIGCONT, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
    return len(pids)


def sweep_stale(prefix: str = PREFIX) -> list[str]:
    """Delete namespaces named ``<prefix><pid>-*`` whose owner pid is gone
    (a run that crashed before its teardown). Returns the names removed."""
    removed = []
    for ns in list_namespaces():
        m = _NAME_RE.match(ns) if prefix == PREFIX else re.match(rf"^{re.escape(prefix)}(\d+)-", ns)
        if not m:
            continue
        if _pid_alive(int(m.group(1))):
            continue
        _kill_netns_pids(ns)
        _run(["ip", "netns", "delete", ns], check=False)
        removed.append(ns)
    if removed:
        log.warning("removed %d stale test namespaces: %s", len(removed), ", ".join(removed))
    return removed


@dataclass
class Host:
    """One test host: a network namespace with one address."""

    name: str
    netns: str
    address: str  # IPv4, no prefix length
    hub_if: str  # the veth end on the bridge (in the hub namespace)

    @property
    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns]


@dataclass
class TestNet:
    """Namespaces for ``hosts`` joined by a bridge. Use as a context manager
    (or call :meth:`open` / :meth:`close`)."""

    hosts_wanted: Sequence[str] = DEFAULT_HOSTS
    tag: str = ""
    hosts: dict[str, Host] = field(default_factory=dict)
    hub: str = ""
    subnet: str = ""
    _created: list[str] = field(default_factory=list)
    _partitions: list[tuple[str, str, bool]] = field(default_factory=list)
    _down: set[str] = field(default_factory=set)
    owner: bool = True  # False for a view attached from another process (see attach)

    __test__ = False  # not a pytest test class

    def __post_init__(self) -> None:
        pid = os.getpid()
        tag = self.tag or f"{(int(time.time() * 1000) + next(_TAGS) * 7919) % 100000:05d}"
        self.tag = tag
        self.base = f"{PREFIX}{pid}-{tag}"
        self.hub = f"{self.base}-hub"
        self.subnet = f"{SUBNET_BASE}.{pid % 250 + 1}"

    # ------------------------------------------------------------ lifecycle
    def open(self) -> TestNet:
        ok, why = netns_available()
        if not ok:
            raise NetnsError(why)
        sweep_stale()
        try:
            self._add_ns(self.hub)
            _run(["ip", "-n", self.hub, "link", "add", "br0", "type", "bridge"])
            _run(["ip", "-n", self.hub, "link", "set", "br0", "up"])
            for i, name in enumerate(self.hosts_wanted, start=1):
                ns = f"{self.base}-{name[:5]}{i}"
                hub_if = f"h{i}"
                self._add_ns(ns)
                _run(["ip", "-n", self.hub, "link", "add", hub_if, "type", "veth",
                      "peer", "name", "eth0", "netns", ns])
                _run(["ip", "-n", self.hub, "link", "set", hub_if, "master", "br0"])
                _run(["ip", "-n", self.hub, "link", "set", hub_if, "up"])
                addr = f"{self.subnet}.{i}"
                _run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0"])
                _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
                self.hosts[name] = Host(name, ns, addr, hub_if)
        except BaseException:
            self.close()
            raise
        log.info("test hosts up: %s", ", ".join(f"{h.name}={h.address} ({h.netns})" for h in self.hosts.values()))
        return self

    def _add_ns(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns])
        self._created.append(ns)
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def to_json(self) -> dict[str, object]:
        """What another process needs to :meth:`attach` (inject faults, place processes)."""
        return {
            "tag": self.tag, "hub": self.hub, "subnet": self.subnet, "base": self.base,
            "hosts": {n: {"netns": h.netns, "address": h.address, "hub_if": h.hub_if} for n, h in self.hosts.items()},
        }

    @classmethod
    def attach(cls, d: dict[str, object]) -> TestNet:
        """A view of namespaces created by another process: it can inject and
        heal faults; :meth:`close` leaves the namespaces alone."""
        hosts = d["hosts"]
        assert isinstance(hosts, dict)
        net = cls(tuple(hosts), tag=str(d["tag"]), owner=False)
        net.hub, net.subnet, net.base = str(d["hub"]), str(d["subnet"]), str(d["base"])
        net.hosts = {n: Host(n, h["netns"], h["address"], h["hub_if"]) for n, h in hosts.items()}
        return net

    def close(self) -> None:
        """Kill every process inside our namespaces, then delete them (and so
        their veth links). Idempotent; never raises."""
        if not self.owner:
            return
        for ns in reversed(self._created):
            try:
                _kill_netns_pids(ns)
            except NetnsError as e:
                log.warning("cannot list processes in %s: %s", ns, e)
        time.sleep(0.05)
        for ns in reversed(self._created):
            p = _run(["ip", "netns", "delete", ns], check=False)
            if p.returncode != 0 and ns in list_namespaces():
                log.warning("cannot delete namespace %s: %s", ns, p.stderr.strip())
        self._created.clear()
        self.hosts.clear()
        self._partitions.clear()
        self._down.clear()

    def __enter__(self) -> TestNet:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def namespaces(self) -> list[str]:
        return list(self._created)

    # ------------------------------------------------------------ placement
    def host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise ValueError(f"unknown test host {name!r}; hosts: {', '.join(self.hosts)}") from None

    def address(self, name: str) -> str:
        return self.host(name).address

    def exec_prefix(self, name: str) -> list[str]:
        return self.host(name).exec_prefix

    def run_in(self, name: str, cmd: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run([*self.exec_prefix(name), *cmd], check=check)

    # ------------------------------------------------------------ faults
    def partition(self, a: str, b: str, *, oneway: bool = False) -> None:
        """Drop traffic between hosts ``a`` and ``b`` (iptables in their
        namespaces). ``oneway``: only packets from ``a`` to ``b`` are dropped."""
        ha, hb = self.host(a), self.host(b)
        ok, why = iptables_available()
        if not ok:
            raise NetnsError(why)
        _run([*ha.exec_prefix, "iptables", "-w", "-I", "OUTPUT", "-d", hb.address, "-j", "DROP"])
        if not oneway:
            _run([*ha.exec_prefix, "iptables", "-w", "-I", "INPUT", "-s", hb.address, "-j", "DROP"])
        self._partitions.append((a, b, oneway))

    def unpartition(self, a: str, b: str, *, oneway: bool = False) -> None:
        """Remove exactly the rules one :meth:`partition` call added."""
        ha, hb = self.host(a), self.host(b)
        _run([*ha.exec_prefix, "iptables", "-w", "-D", "OUTPUT", "-d", hb.address, "-j", "DROP"], check=False)
        if not oneway:
            _run([*ha.exec_prefix, "iptables", "-w", "-D", "INPUT", "-s", hb.address, "-j", "DROP"], check=False)
        with contextlib.suppress(ValueError):
            self._partitions.remove((a, b, oneway))

    def heal(self) -> None:
        """Remove every partition rule (flush the filter table of every host)."""
        for h in self.hosts.values():
            if shutil.which("iptables") is not None:
                _run([*h.exec_prefix, "iptables", "-w", "-F"], check=False)
        self._partitions.clear()

    def link_down(self, name: str) -> None:
        _run(["ip", "-n", self.hub, "link", "set", self.host(name).hub_if, "down"])
        self._down.add(name)

    def link_up(self, name: str) -> None:
        _run(["ip", "-n", self.hub, "link", "set", self.host(name).hub_if, "up"])
        self._down.discard(name)

    def heal_all(self) -> None:
        self.heal()
        for name in list(self._down) or list(self.hosts):
            with contextlib.suppress(NetnsError):
                self.link_up(name)

    def rules(self, name: str) -> str:
        """The host's iptables rules (for tests and failure reports)."""
        return self.run_in(name, ["iptables", "-w", "-S"], check=False).stdout


# ---------------------------------------------------------------- size-limited data directories

TMPFS_SOURCE_PREFIX = "srnem"


def mount_tmpfs(path: str | os.PathLike[str], size_bytes: int) -> None:
    """Mount a tmpfs of ``size_bytes`` on ``path`` (root only). The mount's
    source is named ``srnem<pid>`` so :func:`sweep_stale_mounts` finds it."""
    os.makedirs(path, exist_ok=True)
    _run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755",
          f"{TMPFS_SOURCE_PREFIX}{os.getpid()}", os.fspath(path)])


def umount(path: str | os.PathLike[str]) -> None:
    p = _run(["umount", os.fspath(path)], check=False)
    if p.returncode != 0:
        _run(["umount", "-l", os.fspath(path)], check=False)


def our_mounts() -> list[tuple[str, str]]:
    """(source, mountpoint) of every tmpfs mounted by a run of this harness."""
    out = []
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "tmpfs" and parts[0].startswith(TMPFS_SOURCE_PREFIX):
                    out.append((parts[0], parts[1].replace("\\040", " ")))
    except OSError:
        pass
    return out


def sweep_stale_mounts() -> list[str]:
    """Unmount tmpfs mounts left by runs whose process is gone."""
    removed = []
    for source, mnt in our_mounts():
        pid = source[len(TMPFS_SOURCE_PREFIX):]
        if pid.isdigit() and not _pid_alive(int(pid)):
            umount(mnt)
            removed.append(mnt)
    return removed


def fill_disk(directory: str | os.PathLike[str], name: str, leave_bytes: int = 0) -> int:
    """Write a filler file in ``directory`` until the file system is full
    (minus ``leave_bytes``). Returns the bytes written. Delete the file to free them."""
    path = os.path.join(os.fspath(directory), name)
    chunk = b"\xa5" * (1 << 20)
    written = 0
    st = os.statvfs(directory)
    target = max(0, st.f_bavail * st.f_frsize - leave_bytes)
    with open(path, "wb", buffering=0) as f:
        while written < target:
            n = min(len(chunk), target - written)
            try:
                written += f.write(chunk[:n]) or 0
            except OSError:
                break
    return written
