"""The deployment files of deploy/ (docs/DEPLOY.md) pass their validators, and
what they claim about the processes holds.

* systemd: ``systemd-analyze verify`` wants every ExecStart binary to exist,
  and the units name /usr/local/bin/syncrep (where `pip install` puts it on a
  host). So the test verifies a temp copy with ExecStart pointed at this
  venv's ``syncrep``. A template (``syncrep-node@.service``) is verified as an
  instance, ``syncrep-node@test.service``, a symlink to it in the same temp
  dir: that is how systemd loads it, with %i expanded. systemd 252's verify
  exits 0 on an unknown key or a bad value (it only warns), so the test also
  requires an empty stderr. ``systemd-analyze security --offline`` scores the
  hardening (2.8 when written; the test fails above 3.5).
* MemoryDenyWriteExecute=yes is in both units. systemd is not PID 1 where the
  tests run (a container), so ``systemd-run -p MemoryDenyWriteExecute=yes``
  cannot be used; the kernel's own W^X switch, prctl(PR_SET_MDWE,
  PR_MDWE_REFUSE_EXEC_GAIN), inherited across execve, stands in: a
  coordinator and a node run under it with mutual TLS and answer the health
  check. (systemd 253+ uses that prctl itself; 252 uses a seccomp filter that
  also refuses mprotect(PROT_EXEC) on a mapping that is already executable,
  which the dynamic loader does not do.)
* Kubernetes: ``kubernetes-validate -k 1.30.0 --strict`` (unknown fields are
  errors) on every manifest, then what the validator cannot know: the
  anti-affinity, the probes, the PVCs, the PDB, resources on every container,
  etcd's TLS (clients and peers) and the coordinators' etcds:// store.
* The Containerfile is not built (no container daemon in CI): its
  instructions are known ones, its HEALTHCHECK runs a module that exists, and
  it copies every package the build needs.

Nothing here is random (no seed).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML, a dependency of kubernetes-validate

from syncrep import certs

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD_DIR = ROOT / "deploy" / "systemd"
K8S_DIR = ROOT / "deploy" / "k8s"
CONTAINERFILE = ROOT / "deploy" / "Containerfile"
VENV_BIN = Path(sys.executable).parent
UNIT_BINARY = "/usr/local/bin/syncrep"
K8S_VERSION = "1.30.0"
#: systemd-analyze security's exposure (0 = locked down, 10 = none): the units scored 2.8.
MAX_EXPOSURE = 3.5
VALIDATE_TIMEOUT_S = 120.0
SERVER_START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 30.0

# ---------------------------------------------------------------- systemd


def _units() -> list[Path]:
    return sorted(SYSTEMD_DIR.glob("*.service"))


def _unit_settings(path: Path) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values (repeatable keys keep every value)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.fixture
def verifiable_units(tmp_path: Path) -> list[Path]:
    """The units in a temp dir, ExecStart on this venv's syncrep, templates as instances."""
    syncrep_bin = VENV_BIN / "syncrep"
    assert syncrep_bin.exists(), f"{syncrep_bin} missing: run scripts/setup.sh"
    names: list[Path] = []
    for unit in _units():
        text = unit.read_text()
        assert UNIT_BINARY in text, f"{unit.name}: ExecStart should run {UNIT_BINARY}"
        copy = tmp_path / unit.name
        copy.write_text(text.replace(UNIT_BINARY, str(syncrep_bin)))
        if unit.name.endswith("@.service"):
            instance = tmp_path / unit.name.replace("@.service", "@test.service")
            instance.symlink_to(copy.name)
            names.append(instance)
        else:
            names.append(copy)
    return names


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    return exe


def test_systemd_units_pass_systemd_analyze_verify(verifiable_units: list[Path]) -> None:
    exe = _systemd_analyze()
    assert {p.name for p in verifiable_units} == {"syncrep-coordinator.service", "syncrep-node@test.service"}
    r = subprocess.run([exe, "verify", *map(str, verifiable_units)], capture_output=True, text=True,
                       timeout=VALIDATE_TIMEOUT_S, cwd=verifiable_units[0].parent)
    assert r.returncode == 0, r.stderr
    # verify only warns about an unknown key or a bad value: any line is a finding.
    assert r.stderr.strip() == "", r.stderr


def test_systemd_units_hardening_score(verifiable_units: list[Path]) -> None:
    exe = _systemd_analyze()
    for unit in verifiable_units:
        r = subprocess.run(
            [exe, "security", "--offline=yes", f"--threshold={int(MAX_EXPOSURE * 10)}", "--no-pager",
             str(unit)],
            capture_output=True, text=True, timeout=VALIDATE_TIMEOUT_S, cwd=unit.parent,
        )
        overall = [line for line in r.stdout.splitlines() if "Overall exposure level" in line]
        assert r.returncode == 0, f"{unit.name}: exposure above {MAX_EXPOSURE}: {overall} {r.stderr}"


REQUIRED_SERVICE_SETTINGS = {
    "Type": "notify",
    "Restart": "on-failure",
    "KillSignal": "SIGTERM",
    "ExecReload": "/bin/kill -HUP $MAINPID",
    "User": "syncrep",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ReadWritePaths": "/var/lib/syncrep",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "StateDirectory": "syncrep",
    "ConfigurationDirectory": "syncrep",
}


@pytest.mark.parametrize("unit", _units(), ids=lambda p: p.name)
def test_systemd_unit_settings(unit: Path) -> None:
    service = _unit_settings(unit)["Service"]
    for key, want in REQUIRED_SERVICE_SETTINGS.items():
        assert service.get(key, [None])[-1] == want, f"{unit.name}: {key}={service.get(key)}, want {want}"
    for key in ("RestartSec", "TimeoutStopSec", "LimitNOFILE"):
        assert key in service, f"{unit.name}: no {key}"
    stop_s = int(service["TimeoutStopSec"][-1].removesuffix("s"))
    assert 10 <= stop_s <= 60, f"{unit.name}: TimeoutStopSec={stop_s}s (the node stops in ~5 s)"
    exec_start = service["ExecStart"][-1]
    assert "--certs-dir /etc/syncrep/certs" in exec_start
    assert "--data-dir /var/lib/syncrep/" in exec_start
    assert "--insecure" not in exec_start


def test_systemd_unit_command_lines_parse() -> None:
    """ExecStart, with its environment file's variables, is a valid syncrep command line."""
    from syncrep.cli import build_parser

    env = {"SYNCREP_LISTEN": "0.0.0.0:7000", "SYNCREP_ROLE": "primary", "SYNCREP_ADVERTISE": "hostA:7001",
           "SYNCREP_COORDINATOR": "hostC:7000", "SYNCREP_COORDINATOR_ARGS": "--lease-s 4",
           "SYNCREP_NODE_ARGS": "--snapshot-period-s 300 --nbd-listen 127.0.0.1:10809"}
    for unit in _units():
        line = _unit_settings(unit)["Service"]["ExecStart"][-1].replace("%i", "test")
        line = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], line)
        words = re.sub(r"\$(\w+)", lambda m: env[m.group(1)], line).split()
        assert words[0] == UNIT_BINARY
        args = build_parser().parse_args(words[1:])
        assert args.certs_dir == Path("/etc/syncrep/certs")


# ---------------------------------------------------------------- W^X (MemoryDenyWriteExecute)

PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1

#: Run argv[1:] with the kernel's W^X switch on (inherited across execve).
MDWE_EXEC = f"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    sys.exit("prctl(PR_SET_MDWE): " + os.strerror(ctypes.get_errno()))
os.execv(sys.argv[1], sys.argv[1:])
"""


def _mdwe_supported() -> bool:
    # Probe in a child: the switch cannot be turned off again.
    r = subprocess.run([sys.executable, "-c", MDWE_EXEC, "/bin/true"], capture_output=True,
                       timeout=VALIDATE_TIMEOUT_S)
    return r.returncode == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthcheck(addr: str, certs_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", MDWE_EXEC, sys.executable, "-m", "syncrep.healthcheck", addr,
         "--certs-dir", str(certs_dir), *extra],
        capture_output=True, text=True, timeout=VALIDATE_TIMEOUT_S,
    )


def _wait_healthy(addr: str, certs_dir: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while True:
        assert proc.poll() is None, f"exited {proc.returncode}: {log.read_text()[-2000:]}"
        r = _healthcheck(addr, certs_dir, "--timeout-s", "1")
        if r.returncode == 0:
            return
        assert time.monotonic() < deadline, f"{addr} not healthy in {SERVER_START_TIMEOUT_S}s: {r.stderr}"
        time.sleep(0.2)  # polling a server that is starting, not hiding a race


@pytest.fixture
def mdwe_processes(tmp_path: Path) -> Iterator[list[tuple[subprocess.Popen[bytes], Path]]]:
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    yield procs
    for p, _ in procs:
        if p.poll() is None:
            p.kill()
            p.wait(STOP_TIMEOUT_S)


def test_servers_run_under_memory_deny_write_execute(
    tmp_path: Path, mdwe_processes: list[tuple[subprocess.Popen[bytes], Path]]
) -> None:
    """A coordinator and a primary node with mutual TLS under W^X: both answer the
    health check (python -m syncrep.healthcheck, itself under W^X), and both
    stop gracefully on SIGTERM (exit 0). First, that W^X is really on: a W+X
    mapping is refused in such a child."""
    if not _mdwe_supported():
        pytest.skip("this kernel has no prctl(PR_SET_MDWE) (Linux 6.3+): MemoryDenyWriteExecute untested")
    wx = subprocess.run(
        [sys.executable, "-c", MDWE_EXEC, sys.executable, "-c",
         "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)"],
        capture_output=True, text=True, timeout=VALIDATE_TIMEOUT_S,
    )
    assert wx.returncode != 0 and "PermissionError" in wx.stderr, wx.stderr

    certs_dir = tmp_path / "certs"
    certs.create_all(certs_dir, tmp_path / "ca.key", ["syncrep-test.example", "127.0.0.1"])
    syncrep_bin = str(VENV_BIN / "syncrep")
    c_addr, p_addr = f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"
    commands = {
        c_addr: ["coordinator", "--listen", c_addr, "--data-dir", str(tmp_path / "coord")],
        p_addr: ["primary", "--listen", p_addr, "--data-dir", str(tmp_path / "p"), "--coordinator", c_addr],
    }
    for addr, cmd in commands.items():
        log = tmp_path / f"{cmd[0]}.log"
        with log.open("wb") as f:
            p = subprocess.Popen([sys.executable, "-c", MDWE_EXEC, syncrep_bin, *cmd,
                                  "--certs-dir", str(certs_dir)], stdout=f, stderr=subprocess.STDOUT)
        mdwe_processes.append((p, log))
        _wait_healthy(addr, certs_dir, p, log)
    # A name the server's certificate does not list is refused: the check is real TLS.
    wrong = _healthcheck(c_addr, certs_dir, "--server-name", "other.example", "--timeout-s", "2")
    assert wrong.returncode == 1, wrong.stdout
    assert "unhealthy" in wrong.stderr
    for p, log in reversed(mdwe_processes):
        p.send_signal(signal.SIGTERM)
        assert p.wait(STOP_TIMEOUT_S) == 0, log.read_text()[-2000:]
        assert "Traceback" not in log.read_text(), log.read_text()[-2000:]


def test_healthcheck_loopback_expects_the_node_certificates_name(tmp_path: Path) -> None:
    """A probe dials 127.0.0.1, which the node certificate need not list: it
    expects the certificate's first SAN instead (the server presents that very
    certificate)."""
    from syncrep.healthcheck import expected_server_name

    certs_dir = tmp_path / "certs"
    certs.create_all(certs_dir, tmp_path / "ca.key", ["syncrep-primary-0.syncrep-primary.svc"])
    assert expected_server_name("127.0.0.1:7001", certs_dir) == "syncrep-primary-0.syncrep-primary.svc"
    assert expected_server_name("localhost:7001", certs_dir) == "syncrep-primary-0.syncrep-primary.svc"
    assert expected_server_name("hostA:7001", certs_dir) == ""
    assert expected_server_name("127.0.0.1:7001", certs_dir, "x.example") == "x.example"


def test_healthcheck_exits_1_without_a_server_or_security(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("SYNCREP_CERTS_DIR", "SYNCREP_HEALTH_ADDR")}
    for argv in ([], [f"127.0.0.1:{_free_port()}"], [f"127.0.0.1:{_free_port()}", "--insecure"]):
        r = subprocess.run([sys.executable, "-m", "syncrep.healthcheck", *argv, "--timeout-s", "1"],
                           capture_output=True, text=True, env=env, timeout=VALIDATE_TIMEOUT_S)
        assert r.returncode == 1, (argv, r.stdout, r.stderr)
        assert r.stderr.startswith("syncrep.healthcheck: "), r.stderr


# ---------------------------------------------------------------- Kubernetes


def _manifests() -> list[Path]:
    return sorted(K8S_DIR.glob("*.yaml"))


def _resources() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in _manifests():
        out.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return out


def test_kubernetes_manifests_pass_kubernetes_validate() -> None:
    exe = VENV_BIN / "kubernetes-validate"
    assert exe.exists(), f"{exe} missing: it is in the dev extra of pyproject.toml (scripts/setup.sh)"
    manifests = _manifests()
    assert manifests
    r = subprocess.run([str(exe), "-k", K8S_VERSION, "--strict", *map(str, manifests)],
                       capture_output=True, text=True, timeout=VALIDATE_TIMEOUT_S)
    assert r.returncode == 0, r.stdout + r.stderr
    passed = [line for line in r.stdout.splitlines() if " passed for resource " in line]
    assert len(passed) == len(_resources()), r.stdout


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in _resources() if d["kind"] == kind}


def test_kubernetes_objects_are_all_there() -> None:
    assert set(_by_kind("Namespace")) == {"syncrep"}
    sts = _by_kind("StatefulSet")
    assert set(sts) == {"syncrep-coordinator", "syncrep-primary", "syncrep-secondary", "syncrep-etcd"}
    assert sts["syncrep-etcd"]["spec"]["replicas"] == 3
    assert set(_by_kind("Service")) == set(sts)
    for name, svc in _by_kind("Service").items():
        assert svc["spec"]["clusterIP"] == "None", f"{name}: headless, for stable DNS names"
    assert {"syncrep-coordinator-certs", "syncrep-primary-certs", "syncrep-secondary-certs",
            "syncrep-etcd-certs"} == set(_by_kind("Secret"))
    for name, secret in _by_kind("Secret").items():
        assert "data" not in secret and "stringData" not in secret, f"{name}: a placeholder holds no key"
    # Three coordinators on the 3-member etcd; the nodes are given all three.
    coord = sts["syncrep-coordinator"]
    assert coord["spec"]["replicas"] == 3
    (c,) = _pod(coord)["containers"]
    args = c["args"]
    store = args[args.index("--store") + 1]
    assert store.startswith("etcds://") and store.count(":2379") == 3, store
    # TLS to etcd: every member is checked for the etcd service's name.
    server_name = args[args.index("--etcd-server-name") + 1]
    assert server_name == "syncrep-etcd.$(POD_NAMESPACE).svc.cluster.local", server_name
    from syncrep.cli import build_parser

    parsed = build_parser().parse_args(
        [a.replace("$(SYNCREP_ADVERTISE)", "x.example:7000").replace("$(POD_NAMESPACE)", "syncrep")
         for a in args])
    assert parsed.store == store.replace("$(POD_NAMESPACE)", "syncrep")
    assert parsed.etcd_server_name == "syncrep-etcd.syncrep.svc.cluster.local"
    # No --etcd-certs-dir: the coordinators' own certificates (--certs-dir), the syncrep CA.
    assert parsed.etcd_certs_dir is None and parsed.certs_dir == Path("/etc/syncrep/certs")
    # The store names the members as they advertise themselves.
    etcd_flags = _etcd_flags()
    member = etcd_flags["--advertise-client-urls"].removeprefix("https://")
    assert set(store.removeprefix("etcds://").split(",")) == {
        member.replace("$(POD_NAME)", f"syncrep-etcd-{i}") for i in range(3)}
    coordinators = {f"syncrep-coordinator-{i}.syncrep-coordinator.$(POD_NAMESPACE).svc.cluster.local:7000"
                    for i in range(3)}
    for role in ("primary", "secondary"):
        (n,) = _pod(sts[f"syncrep-{role}"])["containers"]
        assert set(n["args"][n["args"].index("--coordinator") + 1].split(",")) == coordinators, role
    assert _by_kind("PodDisruptionBudget")["syncrep-coordinators"]["spec"]["maxUnavailable"] == 1
    pdb = _by_kind("PodDisruptionBudget")["syncrep-nodes"]["spec"]
    assert pdb["maxUnavailable"] == 1
    assert pdb["selector"]["matchLabels"]["app.kubernetes.io/component"] == "node"


def _pod(sts: dict[str, Any]) -> dict[str, Any]:
    return dict(sts["spec"]["template"]["spec"])


def _etcd_container() -> dict[str, Any]:
    (c,) = _pod(_by_kind("StatefulSet")["syncrep-etcd"])["containers"]
    return dict(c)


def _etcd_flags() -> dict[str, str]:
    """etcd's command line: ``--flag=value`` -> {flag: value}; a bare ``--flag`` -> ""."""
    command = _etcd_container()["command"]
    assert command[0] == "etcd", command
    flags: dict[str, str] = {}
    for word in command[1:]:
        flag, _, value = word.partition("=")
        assert flag.startswith("--") and flag not in flags, word
        flags[flag] = value
    return flags


def test_kubernetes_etcd_speaks_tls_to_clients_and_peers() -> None:
    flags = _etcd_flags()
    member = "$(POD_NAME).syncrep-etcd.$(POD_NAMESPACE).svc.cluster.local"
    assert flags["--listen-client-urls"] == "https://0.0.0.0:2379"
    assert flags["--advertise-client-urls"] == f"https://{member}:2379"
    assert flags["--listen-peer-urls"] == "https://0.0.0.0:2380"
    assert flags["--initial-advertise-peer-urls"] == f"https://{member}:2380"
    cluster = dict(entry.split("=", 1) for entry in flags["--initial-cluster"].split(","))
    assert cluster == {f"syncrep-etcd-{i}": "https://" + member.replace("$(POD_NAME)", f"syncrep-etcd-{i}") + ":2380"
                       for i in range(3)}, cluster
    # Client certificates required on both sides.
    assert flags["--client-cert-auth"] == "" and flags["--peer-client-cert-auth"] == ""
    # Only the metrics listener, which the probes use, is plain HTTP.
    assert flags["--listen-metrics-urls"] == "http://0.0.0.0:2381"
    c = _etcd_container()
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] == "metrics", probe
    # The certificate files are those of the syncrep-etcd-certs Secret, mounted read-only.
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "certs"]
    assert mount.get("readOnly") is True
    (volume,) = [v for v in _pod(_by_kind("StatefulSet")["syncrep-etcd"])["volumes"] if v["name"] == "certs"]
    assert volume["secret"]["secretName"] == "syncrep-etcd-certs"
    assert "syncrep-etcd-certs" in _by_kind("Secret")
    files = {f"{mount['mountPath']}/{item['path']}": item["key"] for item in volume["secret"]["items"]}
    for prefix in ("--", "--peer-"):
        assert files[flags[f"{prefix}cert-file"]] == "node.crt", prefix
        assert files[flags[f"{prefix}key-file"]] == "node.key", prefix
        assert files[flags[f"{prefix}trusted-ca-file"]] == "ca.crt", prefix


def test_kubernetes_nodes_never_share_a_machine() -> None:
    sts = _by_kind("StatefulSet")
    for role in ("primary", "secondary"):
        s = sts[f"syncrep-{role}"]
        labels = s["spec"]["template"]["metadata"]["labels"]
        terms = _pod(s)["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert len(terms) == 1 and terms[0]["topologyKey"] == "kubernetes.io/hostname"
        selector = terms[0]["labelSelector"]["matchLabels"]
        # The selector matches both roles' pods (so each avoids the other), and this pod.
        assert selector.items() <= labels.items()
        other = sts[f"syncrep-{'secondary' if role == 'primary' else 'primary'}"]
        assert selector.items() <= other["spec"]["template"]["metadata"]["labels"].items()
        assert s["spec"]["replicas"] == 1
        assert s["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def test_kubernetes_syncrep_pods_probe_grpc_health_with_tls_and_advertise_dns() -> None:
    for name, s in _by_kind("StatefulSet").items():
        pod = _pod(s)
        for c in pod.get("initContainers", []) + pod["containers"]:
            assert "requests" in c["resources"] and "limits" in c["resources"], f"{name}/{c['name']}"
        if name == "syncrep-etcd":
            continue
        (c,) = pod["containers"]
        port = c["ports"][0]["containerPort"]
        for probe in ("readinessProbe", "livenessProbe"):
            cmd = c[probe]["exec"]["command"]
            assert cmd[:3] == ["python", "-m", "syncrep.healthcheck"], cmd
            assert cmd[3] == f"127.0.0.1:{port}" and "--certs-dir" in cmd, cmd
        args = c["args"]
        assert args[args.index("--listen") + 1] == f"0.0.0.0:{port}"
        assert args[args.index("--certs-dir") + 1] == "/etc/syncrep/certs"
        # Every syncrep pod: its stable DNS name is its --advertise address.
        assert args[args.index("--advertise") + 1] == "$(SYNCREP_ADVERTISE)"
        env = {e["name"]: e for e in c["env"]}
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert env["SYNCREP_ADVERTISE"]["value"] == (
            f"$(POD_NAME).{s['spec']['serviceName']}.$(POD_NAMESPACE).svc.cluster.local:{port}")
        # The key reaches syncrep at 0600 (it refuses a group-readable one).
        (init,) = pod["initContainers"]
        assert "install -m 0600 /secret/node.key" in init["command"][-1]
        from syncrep.cli import build_parser

        parsed = build_parser().parse_args(
            [a.replace("$(SYNCREP_ADVERTISE)", "x.example:7001").replace("$(POD_NAMESPACE)", "syncrep")
             for a in args])
        assert parsed.certs_dir == Path("/etc/syncrep/certs")


# ---------------------------------------------------------------- Containerfile

KNOWN_INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
    "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in CONTAINERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word, rest.strip()))
    assert not pending, "Containerfile ends in a continuation line"
    return out


def test_containerfile_parses() -> None:
    ins = _instructions()
    unknown = [w for w, _ in ins if w not in KNOWN_INSTRUCTIONS]
    assert not unknown, f"unknown instructions {unknown}"
    froms = [rest for w, rest in ins if w == "FROM"]
    assert froms and all(f.startswith("python:3.11-slim") for f in froms), froms
    final = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM"):]
    users = [rest for w, rest in final if w == "USER"]
    assert users and users[-1] not in ("root", "0"), users
    entry = [rest for w, rest in final if w == "ENTRYPOINT"]
    assert entry == ['["syncrep"]']
    exposed = {int(p) for w, rest in final if w == "EXPOSE" for p in rest.split()}
    assert {7000, 7001, 7002} <= exposed
    (health,) = [rest for w, rest in final if w == "HEALTHCHECK"]
    cmd = health.split(" CMD ", 1)[1]
    assert cmd.startswith('["python", "-m", "syncrep.healthcheck"'), cmd
    assert importlib.util.find_spec("syncrep.healthcheck") is not None
    assert any(w == "RUN" and "pip install" in rest for w, rest in final)


def test_containerfile_copies_every_package_the_build_needs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    includes = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in includes}
    copied = {rest.split()[0] for w, rest in _instructions() if w == "COPY" and "--from" not in rest}
    assert packages <= copied, f"packages not copied: {packages - copied}"
    assert {"pyproject.toml", project["project"]["readme"]} <= {
        f for w, rest in _instructions() if w == "COPY" for f in rest.split()[:-1]}
