"""Settings from flags, SYNCREP_* environment variables and a TOML file
(syncrep/settings.py, issue 13): precedence as a data table, the file's
tables, refusals of bad values and unknown keys (naming where they came
from, before anything runs), ``syncrep config show``, and a real cluster
(coordinator, primary, secondary, CLI) configured by a file alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from syncrep import certs, cli, settings

SYNCREP = [sys.executable, "-m", "syncrep"]
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
CLI_TIMEOUT_S = 60.0


def parse(argv: list[str], env: Mapping[str, str] | None = None) -> tuple[Any, settings.Layered]:
    parser = cli.build_parser()
    layered = settings.apply(parser, argv, env or {})
    args = parser.parse_args(argv)
    args.settings = layered
    return args, layered


NODE = ["primary", "--listen", "127.0.0.1:7001", "--data-dir", "/tmp/x", "--coordinator", "127.0.0.1:7000"]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# Precedence, one row per case: (flag, env, top-level file, [process.node], [process.primary]) -> value, source.
PRECEDENCE = [
    # flag     env    top    node   primary   expected  source
    ("1.5",   "2.5", "3.5", "4.5", "5.5",    1.5,      "flag"),
    (None,    "2.5", "3.5", "4.5", "5.5",    2.5,      "env"),
    (None,    None,  "3.5", "4.5", "5.5",    5.5,      "file"),   # the most specific table wins
    (None,    None,  "3.5", "4.5", None,     4.5,      "file"),
    (None,    None,  "3.5", None,  None,     3.5,      "file"),
    (None,    None,  None,  None,  None,     1.0,      "default"),
]


@pytest.mark.parametrize("flag,env,top,node,primary,expected,source", PRECEDENCE)
def test_precedence_flag_env_file_default(
    tmp_path: Path, flag: str | None, env: str | None, top: str | None, node: str | None, primary: str | None,
    expected: float, source: str,
) -> None:
    """No fault: --ack-timeout-s from each level; the highest one present wins and is named as the source."""
    lines = [f"ack_timeout_s = {top}"] if top else []
    if node:
        lines += ["[process.node]", f"ack-timeout-s = {node}"]
    if primary:
        lines += ["[process.primary]", f"ack_timeout_s = {primary}"]
    cfg = write(tmp_path / "s.toml", "\n".join(lines) + "\n")
    argv = [*NODE, "--config", str(cfg)] + (["--ack-timeout-s", flag] if flag else [])
    args, layered = parse(argv, {"SYNCREP_ACK_TIMEOUT_S": env} if env else {})
    assert args.ack_timeout_s == expected
    assert layered.sources["ack_timeout_s"].kind == source
    assert cli.node_options_from_args(args).ack_timeout_s == expected


def test_a_required_flag_may_come_from_the_environment_or_the_file(tmp_path: Path) -> None:
    """--coordinator is required on a command: SYNCREP_COORDINATOR or the file's top-level key satisfies it."""
    args, layered = parse(["status"], {"SYNCREP_COORDINATOR": "hostC:7000,hostD:7000"})
    assert args.coordinator == "hostC:7000,hostD:7000" or list(args.coordinator) == ["hostC:7000", "hostD:7000"]
    assert str(layered.sources["coordinator"]) == "env SYNCREP_COORDINATOR"
    cfg = write(tmp_path / "s.toml", 'coordinator = ["hostE:7000", "hostF:7000"]\n')
    args, layered = parse(["status", "--config", str(cfg)])
    assert "hostE:7000" in str(args.coordinator) and "hostF:7000" in str(args.coordinator)
    assert layered.sources["coordinator"] == settings.Source("file", f"{cfg} coordinator")


def test_node_flags_all_settable_from_the_environment() -> None:
    """Every NodeOptions flag has a SYNCREP_<NAME> variable that goes through the flag's own check."""
    for f in cli.NODE_FLAGS:
        default = getattr(cli.NodeOptions(), f.field)
        want: object
        if f.is_switch:
            text, want = "true", True
        elif f.choices:
            text, want = f.choices[-1], f.choices[-1]
        elif f.field in ("nbd_listen", "metrics_listen"):
            text, want = "127.0.0.1:9999", "127.0.0.1:9999"
        elif f.is_size:
            text, want = "2MiB", 2 * 1024 * 1024
        else:
            text = "7"
            want = type(default)(7)
        args, layered = parse(NODE, {settings.env_name(f.field): text})
        assert getattr(args, f.field) == want, f.field
        assert layered.sources[f.field].kind == "env", f.field


def test_store_false_flag_by_its_name_or_by_its_setting(tmp_path: Path) -> None:
    """--no-auto-resync: ``no_auto_resync = true`` and ``auto_resync = false`` mean the same."""
    base = ["coordinator", "--listen", "127.0.0.1:7000", "--data-dir", str(tmp_path)]
    for text in ("[process.coordinator]\nno_auto_resync = true\n", "auto_resync = false\n"):
        cfg = write(tmp_path / "s.toml", text)
        args, _ = parse([*base, "--config", str(cfg)])
        assert args.auto_resync is False, text
    args, _ = parse(base, {"SYNCREP_AUTO_RESYNC": "no"})
    assert args.auto_resync is False


BAD = [
    # (file text, env, message fragment)
    ("ack_timout_s = 2\n", {}, "unknown setting 'ack_timout_s' (did you mean 'ack_timeout_s'?)"),
    ("[process.node]\nstore = 'sqlite'\n", {}, "unknown setting 'store' in [process.node]"),
    ("[nodes]\nlisten = 'x'\n", {}, "unknown table [nodes]"),
    ("[process.witness]\nlisten = 'x'\n", {}, "unknown table [process.witness]"),
    ("ack_timeout_s = = 2\n", {}, "not valid TOML"),
    ("ack_timeout_s = 'abc'\n", {}, "ack_timeout_s='abc': invalid value for --ack-timeout-s"),
    ("durability = 'fast'\n", {}, "invalid choice for --durability (choose from sync, os)"),
    ("enable_fault_injection = 'maybe'\n", {}, "not a boolean"),
    ("window_bytes = true\n", {}, "--window-bytes takes a value, not true/false"),
    ("", {"SYNCREP_ACK_TIMEOUT_S": "-1"}, "SYNCREP_ACK_TIMEOUT_S='-1': invalid value for --ack-timeout-s"),
    ("", {"SYNCREP_WINDOW_BYTES": "lots"}, "SYNCREP_WINDOW_BYTES='lots': invalid value for --window-bytes"),
]


@pytest.mark.parametrize("text,env,fragment", BAD)
def test_bad_setting_refused_naming_its_source(tmp_path: Path, text: str, env: dict[str, str],
                                               fragment: str) -> None:
    """Bad input: a bad value or an unknown key is refused before the command runs, naming where it came from."""
    cfg = write(tmp_path / "s.toml", text)
    with pytest.raises(settings.ConfigError) as e:
        parse([*NODE, "--config", str(cfg)], env)
    assert fragment in str(e.value), str(e.value)


def test_bad_setting_makes_the_command_exit_2_with_one_line(tmp_path: Path) -> None:
    """Bad input through the real entry point: exit 2, one line on stderr, no process started."""
    cfg = write(tmp_path / "s.toml", "[process.node]\nack_timeout_s = 'soon'\n")
    r = subprocess.run([*SYNCREP, *NODE, "--config", str(cfg)], capture_output=True, text=True,
                       timeout=CLI_TIMEOUT_S)
    assert r.returncode == 2, r
    assert r.stderr.startswith("syncrep: error: config file") or "[process.node] ack_timeout_s='soon'" in r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    missing = subprocess.run([*SYNCREP, "status", "--config", str(tmp_path / "nope.toml")],
                             capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert missing.returncode == 2 and "nope.toml: not found" in missing.stderr, missing


def test_insecure_flag_wins_over_certs_dir_from_the_environment(tmp_path: Path) -> None:
    """--insecure (flag) over SYNCREP_CERTS_DIR (environment); --certs-dir (flag) over insecure (file);
    both as flags is a contradiction."""
    args, _ = parse(["status", "--coordinator", "h:1", "--insecure"], {"SYNCREP_CERTS_DIR": str(tmp_path)})
    assert cli.security_from_args(args).insecure
    cfg = write(tmp_path / "s.toml", "insecure = true\n")
    args, _ = parse(["status", "--coordinator", "h:1", "--config", str(cfg), "--certs-dir", str(tmp_path)])
    assert not cli.security_from_args(args).insecure
    args, _ = parse(["status", "--coordinator", "h:1", "--insecure", "--certs-dir", str(tmp_path)])
    with pytest.raises(cli.CliError, match="exclude each other"):
        cli.security_from_args(args)


def test_config_show_names_each_source(tmp_path: Path) -> None:
    """``syncrep config show primary --json``: the file, the environment and the defaults, each named."""
    cfg = write(tmp_path / "s.toml", 'coordinator = "hostC:7000"\n[process.node]\ndata_dir = "/srv/n"\n'
                                     '[process.primary]\nlisten = "0.0.0.0:7001"\n')
    env = {**os.environ, "SYNCREP_CONFIG": str(cfg), "SYNCREP_ACK_TIMEOUT_S": "2.5"}
    r = subprocess.run([*SYNCREP, "config", "show", "primary", "--json"], capture_output=True, text=True,
                       env=env, timeout=CLI_TIMEOUT_S)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["config_file"] == str(cfg) and doc["config_origin"] == "$SYNCREP_CONFIG"
    rows = {x["setting"]: x for x in doc["commands"]["primary"]}
    assert rows["listen"]["value"] == "0.0.0.0:7001"
    assert rows["listen"]["source"] == f"file {cfg} [process.primary] listen"
    assert rows["data_dir"]["source"] == f"file {cfg} [process.node] data_dir"
    assert rows["ack_timeout_s"] == {"setting": "ack_timeout_s", "flag": "--ack-timeout-s", "value": 2.5,
                                     "source": "env SYNCREP_ACK_TIMEOUT_S"}
    assert rows["window_bytes"]["source"] == "default" and rows["window_bytes"]["value"] == 32 * 1024 * 1024
    text = subprocess.run([*SYNCREP, "config", "show"], capture_output=True, text=True, env=env,
                          timeout=CLI_TIMEOUT_S)
    assert text.returncode == 0, text.stderr
    assert f"config file: {cfg} (from $SYNCREP_CONFIG)" in text.stdout
    for section in ("syncrep coordinator:", "syncrep primary:", "syncrep secondary:"):
        assert section in text.stdout, text.stdout
    bad = subprocess.run([*SYNCREP, "config", "show", "witness"], capture_output=True, text=True, env=env,
                         timeout=CLI_TIMEOUT_S)
    assert bad.returncode == 1 and "'witness' is not a syncrep command" in bad.stderr, bad


# ---------------------------------------------------------------- a real cluster from a file


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(env: Mapping[str, str], *argv: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*SYNCREP, *argv], input=stdin, capture_output=True, env=dict(env),
                          timeout=CLI_TIMEOUT_S)


def test_cluster_configured_by_file_alone(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    """No fault: a coordinator, a primary and a secondary started with nothing but ``--config FILE`` (one file,
    mutual TLS, per-process tables), and CLI commands given only $SYNCREP_CONFIG: create, write, read back,
    verify (the replicas block for block), and a graceful stop of every process."""
    certs_dir = tmp_path / "certs"
    certs.create_all(certs_dir, tmp_path / "ca.key", ["127.0.0.1"])
    c, p, s = (f"127.0.0.1:{_free_port()}" for _ in range(3))
    cfg = write(tmp_path / "syncrep.toml", f"""
coordinator = "{c}"
certs_dir = "{certs_dir}"
log_format = "json"

[process.coordinator]
listen = "{c}"
data_dir = "{tmp_path / 'coord'}"
heartbeat-interval-s = 0.2

[process.node]
ack_timeout_s = 2.0

[process.primary]
listen = "{p}"
data_dir = "{tmp_path / 'p'}"

[process.secondary]
listen = "{s}"
data_dir = "{tmp_path / 's'}"
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCREP_")}
    logs = {}
    for role in ("coordinator", "primary", "secondary"):
        logs[role] = tmp_path / f"{role}.log"
        with logs[role].open("wb") as f:
            procs.append(subprocess.Popen([*SYNCREP, role, "--config", str(cfg)], stdout=f,
                                          stderr=subprocess.STDOUT, env=env))
    cli_env = {**env, "SYNCREP_CONFIG": str(cfg)}
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:  # polling servers that are starting, not hiding a race
        r = _run(cli_env, "volume", "create", "v", "--size", "4MiB", "--primary", p, "--secondary", s)
        if r.returncode == 0:
            break
        for proc, role in zip(procs, logs, strict=True):
            assert proc.poll() is None, f"{role} exited: {logs[role].read_text()[-2000:]}"
        assert time.monotonic() < deadline, r.stderr.decode()
        time.sleep(0.3)
    data = os.urandom(256 * 1024)
    w = _run(cli_env, "write", "v", "--offset", "1MiB", stdin=data)
    assert w.returncode == 0, w.stderr.decode()
    rd = _run(cli_env, "read", "v", "--offset", "1MiB", "--length", str(len(data)))
    assert rd.returncode == 0 and rd.stdout == data, rd.stderr.decode()
    v = _run(cli_env, "verify", "v", "--json")
    assert v.returncode == 0, (v.stdout.decode(), v.stderr.decode())
    assert json.loads(v.stdout)["identical"] is True
    # The file's settings reached the processes: JSON logs, the node's heartbeat from the coordinator.
    first = json.loads(logs["coordinator"].read_text().splitlines()[0])
    assert first["role"] == "coordinator", first
    for proc in reversed(procs):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(STOP_TIMEOUT_S) == 0
    for role, log in logs.items():
        assert "Traceback" not in log.read_text(), (role, log.read_text()[-2000:])


def test_shared_flags_keep_their_defaults_after_apply() -> None:
    """Flags shared by several parsers (``volume`` and ``volume create`` share --user): finding which
    flags the command line set must leave every default as it was."""
    args, layered = parse(["volume", "create", "v", "--size", "4MiB", "--primary", "a:1", "--secondary", "b:1",
                           "--coordinator", "c:1"])
    assert args.user == "admin" and args.insecure is False and args.certs_dir is None
    assert layered.sources["user"].kind == "default" and layered.sources["coordinator"].kind == "flag"
    again, _ = parse(["volume", "create", "v", "--size", "4MiB", "--primary", "a:1", "--secondary", "b:1",
                      "--coordinator", "c:1"])
    assert again.user == "admin"


def test_shipped_example_config_loads() -> None:
    """deploy/syncrep.toml.example is valid: every key known, every value passes its flag's check."""
    example = Path(__file__).resolve().parent.parent / "deploy" / "syncrep.toml.example"
    for words in (["coordinator"], ["primary"], ["secondary"], ["status"]):
        _, rows = settings.settings_of(cli.build_parser(), words, {}, ["--config", str(example)])
        from_file = [r for r in rows if r.source.kind == "file"]
        assert from_file, words
    _, rows = settings.settings_of(cli.build_parser(), ["primary"], {}, ["--config", str(example)])
    values = {r.dest: r.value for r in rows}
    assert values["ack_timeout_s"] == 1.0 and values["advertise"] == "hostA:7001"
