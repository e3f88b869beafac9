"""The command line and the client library, with no cluster running.

* ``--help`` of every command exits 0 and explains each flag.
* Malformed input and an unreachable coordinator give ONE clear line on
  stderr and a non-zero exit, fast, without a traceback.
* ``status``, ``volume create``, ``write``, ``read`` and ``promote`` against
  in-process fake servers (a fake coordinator and two fake nodes built with
  syncrep.rpc), and the VolumeClient write stream: multiplexing, out-of-order
  replies, reply errors, stream failure and re-opening, and following a
  primary that moved (a refusal "not its primary", an unreachable primary).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import wait_until

from deploy.cluster import free_port
from syncrep import cli, rpc
from syncrep.client import (
    ClientError,
    VolumeClient,
    WriteError,
    get_volume,
    list_volumes,
    promote,
    volume_status_dict,
)
from syncrep.config import NodeOptions
from syncrep.core.vocab import MAX_WRITE_BYTES
from syncrep.pb import syncrep_pb2 as pb
from syncrep.pb import syncrep_pb2_grpc as pbg

REPO = Path(__file__).resolve().parent.parent
KiB = 1024
MiB = 1024 * KiB

COMMANDS: list[list[str]] = [
    [],
    ["coordinator"],
    ["primary"],
    ["secondary"],
    ["volume"],
    ["volume", "create"],
    ["write"],
    ["read"],
    ["status"],
    ["promote"],
    ["demo"],
]


#: The commands that need --certs-dir or --insecure (the fakes here are plaintext).
SECURED = {"coordinator", "primary", "secondary", "volume", "status", "read", "write", "verify", "promote",
           "switchover", "resolve"}


def _insecure(args: tuple[str, ...]) -> tuple[str, ...]:
    """``args`` with --insecure added for a secured command that names no security (the fake servers
    of this module are plaintext; tests of the security flags pass their own)."""
    if SECURED & set(args) and not {"--insecure", "--certs-dir", "--no-security-flag"} & set(args):
        return (*args, "--insecure")
    return tuple(a for a in args if a != "--no-security-flag")


def run_cli(*args: str, stdin: bytes | None = None, timeout: float = 30.0) -> subprocess.CompletedProcess[bytes]:
    """``python -m syncrep ARGS`` in a subprocess."""
    args = _insecure(args)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), env.get("PYTHONPATH", "")) if x)
    return subprocess.run(
        [sys.executable, "-m", "syncrep", *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        env=env,
        cwd=str(REPO),
    )


async def arun_cli(*args: str, stdin: bytes | None = None, limit_s: float = 30.0) -> tuple[int, bytes, bytes]:
    """Like run_cli, without blocking the event loop (fake servers keep serving)."""
    args = _insecure(args)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), env.get("PYTHONPATH", "")) if x)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "syncrep", *args,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=str(REPO),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), limit_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out, err


def one_error_line(stderr: str) -> str:
    # A server process run with --insecure warns at start (a log line) before any error.
    lines = [ln for ln in stderr.splitlines() if ln.strip() and "running in PLAINTEXT (--insecure)" not in ln]
    assert len(lines) == 1, f"expected one line on stderr, got: {stderr!r}"
    assert lines[0].startswith("syncrep: error: "), lines[0]
    assert "Traceback" not in stderr
    return lines[0]


# ---------------------------------------------------------------- --help


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "syncrep")
def test_help_exits_0_and_explains(cmd: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([*cmd, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: syncrep {' '.join(cmd)}".rstrip())
    # a description paragraph, and every flag explained
    assert len(out.split("\n\n")) >= 3, out
    assert "--log-level" in out
    parser_flags = [ln.strip().split()[0] for ln in out.splitlines() if ln.strip().startswith("--")]
    assert parser_flags
    for flag in parser_flags:
        line_idx = next(i for i, ln in enumerate(out.splitlines()) if ln.strip().startswith(flag))
        after = " ".join(out.splitlines()[line_idx : line_idx + 2])
        assert len(after.split()) > 2, f"{flag} has no explanation in:\n{out}"


@pytest.mark.parametrize(
    "cmd,expect",
    [
        (["coordinator"], ["--listen", "--data-dir", "--heartbeat-interval-s", "--node-timeout-s", "--resync-mode",
                           "(default: 0.5)", "(default: 3.0)", "(default: direct)", "--lease-s",
                           "(default: 4.0)", "--lease-drift-s"]),
        (["volume", "create"], ["NAME", "--size", "--primary", "--secondary", "--coordinator", "--block-size",
                                "--resync-mode", "64MiB", "(default: 4096)", "--auto-failover"]),
        (["write"], ["--offset", "--coordinator", "--input", "stdin", "(default: 1MiB)"]),
        (["read"], ["--offset", "--length", "--coordinator", "--output", "stdout"]),
        (["status"], ["--coordinator", "--json", "in_sync", "degraded", "resyncing", "primary_lost",
                      "split_brain", "generation", "lease"]),
        (["promote"], ["NAME", "--coordinator", "--force", "lease", "how long", "split_brain", "Exit status"]),
        (["demo"], ["--workdir", "--keep"]),
    ],
)
def test_help_names_flags_and_defaults(cmd: list[str], expect: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main([*cmd, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for word in expect:
        assert word in out, f"{word!r} missing from `syncrep {' '.join(cmd)} --help`"


def test_node_help_covers_every_node_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["primary", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    fields = {f.name for f in dataclasses.fields(NodeOptions)}
    assert fields == {f.field for f in cli.NODE_FLAGS}, "every NodeOptions field needs a flag"
    for f in cli.NODE_FLAGS:
        assert f.flag in out
    for flag in ["--durability", "--ack-timeout-s", "--on-secondary-failure", "--on-quorum-loss",
                 "--quorum-loss-timeout-s", "--window-writes", "--window-bytes",
                 "--enable-fault-injection", "--resync-max-rate", "--diff-delay-s", "--snapshot-period-s",
                 "--snapshots-keep", "--advertise", "(default: 32MiB)", "(default: sync)"]:
        assert flag in out


def test_python_m_syncrep_and_console_script() -> None:
    r = run_cli("--help")
    assert r.returncode == 0, r.stderr
    assert b"usage: syncrep" in r.stdout
    eps = [ep for ep in metadata.entry_points(group="console_scripts") if ep.name == "syncrep"]
    assert eps and eps[0].value == "syncrep.cli:main"


# ---------------------------------------------------------------- node flags


def test_node_flags_build_node_options() -> None:
    args = cli.build_parser().parse_args([
        "secondary", "--listen", "127.0.0.1:7002", "--data-dir", "/tmp/x", "--coordinator", "127.0.0.1:7000",
        "--durability", "os", "--ack-timeout-s", "2.5", "--on-secondary-failure", "block",
        "--window-writes", "7", "--window-bytes", "8MiB", "--batch-max-writes", "9", "--batch-max-bytes", "1MiB",
        "--queue-writes", "11", "--connect-timeout-s", "0.5", "--connect-attempts", "3",
        "--enable-fault-injection", "--resync-chunk-bytes", "256KiB", "--resync-max-rate", "100MiB/s",
        "--diff-delay-s", "0.25", "--final-diff-threshold-bytes", "2MiB", "--max-diff-rounds", "4",
        "--snapshot-period-s", "30", "--snapshots-keep", "5",
    ])
    assert cli.node_options_from_args(args) == NodeOptions(
        durability="os", ack_timeout_s=2.5, on_secondary_failure="block", window_writes=7,
        window_bytes=8 * MiB, batch_max_writes=9, batch_max_bytes=MiB, queue_writes=11, connect_timeout_s=0.5,
        connect_attempts=3, enable_fault_injection=True, resync_chunk_bytes=256 * KiB,
        resync_max_rate_bytes_per_s=100 * MiB, diff_delay_s=0.25, final_diff_threshold_bytes=2 * MiB,
        max_diff_rounds=4, snapshot_period_s=30.0, snapshots_keep=5,
    )


def test_node_defaults_equal_node_options_defaults() -> None:
    args = cli.build_parser().parse_args(
        ["primary", "--listen", "127.0.0.1:7001", "--data-dir", "d", "--coordinator", "127.0.0.1:7000"]
    )
    assert cli.node_options_from_args(args) == NodeOptions()
    assert args.advertise is None


# ---------------------------------------------------------------- one-line errors


@pytest.mark.parametrize(
    "argv",
    [
        ["volume", "create", "v", "--size", "12XB", "--primary", "a:1", "--secondary", "b:2", "--coordinator", "c:3"],
        ["volume", "create", "v", "--size", "lots", "--primary", "a:1", "--secondary", "b:2", "--coordinator", "c:3"],
        ["read", "v", "--offset", "0", "--length", "1.5MiB", "--coordinator", "c:3"],
        ["write", "v", "--offset=-4KiB", "--coordinator", "c:3"],
        ["primary", "--listen", "h:1", "--data-dir", "d", "--coordinator", "c:3", "--window-bytes", "32QiB"],
        ["demo", "--size", "sixty"],
    ],
)
def test_malformed_size_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code != 0
    cap = capsys.readouterr()
    line = one_error_line(cap.err)
    assert "invalid size" in line
    assert cap.out == ""


def test_malformed_size_subprocess_no_traceback() -> None:
    r = run_cli("volume", "create", "v", "--size", "64MeB", "--primary", "a:1", "--secondary", "b:2",
                "--coordinator", "c:3")
    assert r.returncode != 0
    line = one_error_line(r.stderr.decode())
    assert "'64MeB'" in line


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["status", "--coordinator", "nonsense"], "invalid address"),
        (["status", "--coordinator", "127.0.0.1:0"], "port 0"),
        (["status"], "--coordinator"),
        (["volume", "create", "v", "--size", "1MiB", "--primary", "a:1", "--secondary", "b:2",
          "--coordinator", "c:3", "--resync-mode", "fast"], "--resync-mode"),
        (["write", "v", "--offset", "0", "--coordinator", "c:3", "--depth", "0"], "at least 1"),
    ],
)
def test_bad_arguments_one_line(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert needle in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["primary", "--listen", "0.0.0.0:7001", "--data-dir", "d", "--coordinator", "127.0.0.1:7000"], "wildcard"),
        (["secondary", "--listen", "127.0.0.1:7001", "--data-dir", "d", "--coordinator", "127.0.0.1:7000",
          "--advertise", "0.0.0.0:7001"], "wildcard"),
        (["primary", "--listen", "127.0.0.1:0", "--data-dir", "d", "--coordinator", "127.0.0.1:7000"], "port 0"),
        (["primary", "--listen", "0.0.0.0:7001", "--data-dir", "d", "--coordinator", "127.0.0.1:7000",
          "--advertise", "10.0.0.5:0"], "port 0"),
    ],
)
def test_unusable_advertise_address_rejected(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = [str(tmp_path / "d") if a == "d" else a for a in argv] + ["--insecure"]
    assert cli.main(argv) == 1
    assert needle in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "d").exists(), "nothing is started or created for a rejected address"


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["status", "--json"],
        ["read", "vol0", "--offset", "0", "--length", "4KiB"],
        ["write", "vol0", "--offset", "0"],
        ["volume", "create", "vol0", "--size", "16MiB", "--primary", "127.0.0.1:1", "--secondary", "127.0.0.1:2"],
        ["promote", "vol0"],
    ],
    ids=lambda a: " ".join(a[:2]),
)
def test_unreachable_coordinator_one_line_fast(argv: list[str]) -> None:
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    r = run_cli(*argv, "--coordinator", f"127.0.0.1:{port}", stdin=b"x" * 4096, timeout=20)
    elapsed = time.monotonic() - t0
    assert r.returncode == 1
    line = one_error_line(r.stderr.decode())
    assert f"cannot reach coordinator 127.0.0.1:{port}" in line
    assert line.endswith("(UNAVAILABLE)")
    assert r.stdout == b""
    assert elapsed < 10, f"took {elapsed:.1f} s"


def test_write_missing_input_file_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["write", "v", "--offset", "0", "--coordinator", "127.0.0.1:1", "--input", str(tmp_path / "nope"),
                   "--insecure"])
    assert rc == 1
    assert "cannot open --input" in one_error_line(capsys.readouterr().err)


def test_server_command_logs_role_and_timestamp(tmp_path: Path) -> None:
    """A node whose coordinator does not exist still starts and logs with its role;
    here we only check the log format of a command that fails early."""
    r = run_cli("--log-level", "DEBUG", "status", "--coordinator", f"127.0.0.1:{free_port()}")
    lines = r.stderr.decode().splitlines()
    log_lines = [ln for ln in lines if not ln.startswith("syncrep: error:")]
    assert log_lines, "DEBUG logging produces log lines"
    for ln in log_lines:
        assert " client[" in ln, ln
        assert ln[:4].isdigit() and ln[10] == "T", ln


# ---------------------------------------------------------------- status JSON shape


def _status(name: str = "vol0", **kw: Any) -> pb.VolumeStatus:
    st = pb.VolumeStatus(
        spec=pb.VolumeSpec(name=name, size_bytes=16 * MiB, block_size=4096),
        state=kw.pop("state", pb.PAIR_STATE_IN_SYNC),
        epoch=3,
        primary="127.0.0.1:7001",
        secondary="127.0.0.1:7002",
        primary_alive=True,
        secondary_alive=kw.pop("secondary_alive", True),
        state_changed_at=1_700_000_000.5,
        acked_seq=10,
        last_seq=12,
        resync_mode=pb.RESYNC_MODE_DIRECT,
        **kw,
    )
    return st


def test_volume_status_dict_shape() -> None:
    st = _status(
        state=pb.PAIR_STATE_RESYNCING,
        failed_extents=[pb.Extent(offset=0, length=4096), pb.Extent(offset=8192, length=8192)],
        fault_snapshot_id=7,
        resync=pb.ResyncProgress(bytes_done=1, bytes_total=4, rate_bytes_per_s=2.0, eta_s=1.5, round=2),
        last_error="secondary timed out",
    )
    d = volume_status_dict(st)
    for key in ["name", "state", "epoch", "primary", "secondary", "primary_alive", "secondary_alive", "size_bytes",
                "block_size", "failed_extents", "failed_extents_count", "failed_bytes", "fault_snapshot_id",
                "resync", "last_error", "state_changed_at", "acked_seq", "last_seq"]:
        assert key in d, key
    assert d["state"] == "resyncing"
    assert d["failed_extents"] == [{"offset": 0, "length": 4096}, {"offset": 8192, "length": 8192}]
    assert d["failed_extents_count"] == 2
    assert d["failed_bytes"] == 12288
    assert d["resync"] == {"bytes_done": 1, "bytes_total": 4, "rate_bytes_per_s": 2.0, "eta_s": 1.5, "round": 2}
    assert d["state_changed_at"].startswith("2023-11-14T22:13:20.5")
    json.dumps(d)
    for state, name in [(pb.PAIR_STATE_IN_SYNC, "in_sync"), (pb.PAIR_STATE_DEGRADED, "degraded"),
                        (pb.PAIR_STATE_PRIMARY_LOST, "primary_lost"), (pb.PAIR_STATE_SPLIT_BRAIN, "split_brain"),
                        (pb.PAIR_STATE_UNSPECIFIED, "degraded")]:
        assert volume_status_dict(_status(state=state))["state"] == name


def test_volume_status_dict_failover_fields() -> None:
    st = _status(
        state=pb.PAIR_STATE_DEGRADED, volume_uuid="u-1", generation=0xABC, secondary_generation=0x12,
        lease_remaining_s=2.5, out_of_sync_bytes=8192, auto_failover=True, secondary_data_missing=True,
        resync_bytes_sent=16 * MiB,
    )
    d = volume_status_dict(st)
    assert {k: d[k] for k in ("volume_uuid", "generation", "secondary_generation", "lease_remaining_s",
                              "out_of_sync_bytes", "auto_failover", "primary_data_missing",
                              "secondary_data_missing", "resync_bytes_sent")} == {
        "volume_uuid": "u-1", "generation": 0xABC, "secondary_generation": 0x12, "lease_remaining_s": 2.5,
        "out_of_sync_bytes": 8192, "auto_failover": True, "primary_data_missing": False,
        "secondary_data_missing": True, "resync_bytes_sent": 16 * MiB,
    }
    line = cli.state_line(d)
    for part in ["degraded", "primary 127.0.0.1:7001 (up)", "secondary 127.0.0.1:7002 (up, NO DATA)",
                 "generation 0000000000000abc", "secondary generation 0000000000000012", "lease 2.5 s left",
                 "out of sync 8.0 KiB", "auto-failover"]:
        assert part in line, (part, line)


def test_coordinator_lease_flags_parse() -> None:
    base = ["coordinator", "--listen", "127.0.0.1:7000", "--data-dir", "d"]
    args = cli.build_parser().parse_args(base)
    assert (args.lease_s, args.lease_drift_s) == (4.0, 0.5)
    args = cli.build_parser().parse_args([*base, "--lease-s", "2", "--lease-drift-s", "0.1"])
    assert (args.lease_s, args.lease_drift_s) == (2.0, 0.1)


def test_coordinator_lease_of_zero_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["coordinator", "--listen", "127.0.0.1:7000", "--data-dir", "d", "--lease-s", "0"])
    assert exc.value.code == 2
    assert "--lease-s" in one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------- fake servers


@dataclass
class FakeCluster:
    """A fake coordinator and a fake primary in this process (syncrep.rpc servers)."""

    volume_size: int = 8 * MiB
    block_size: int = 4096
    data: bytearray = field(default_factory=bytearray)
    streams: int = 0
    writes: list[tuple[int, int]] = field(default_factory=list)
    reads: list[tuple[int, int]] = field(default_factory=list)
    reply_batch: int = 1  # >1: collect this many writes, reply in reverse order
    abort_at_offset: int | None = None  # abort the stream when a write to this offset arrives
    error_at_offset: dict[int, tuple[grpc.StatusCode, str]] = field(default_factory=dict)
    created: list[pb.CreateVolumeRequest] = field(default_factory=list)
    coordinator_addr: str = ""
    primary_addr: str = ""
    #: A second fake node: the secondary, until a promotion makes it the primary.
    secondary_addr: str = ""
    #: The node the coordinator names as the primary (a failover changes it).
    current_primary: str = ""
    epoch: int = 1
    #: Writes and reads a node refused because it is not the primary: (node, offset, length).
    refused: list[tuple[str, int, int]] = field(default_factory=list)
    promotes: list[pb.PromoteRequest] = field(default_factory=list)
    #: Promote refuses (FAILED_PRECONDITION) with this message unless forced.
    promote_refusal: str | None = None
    servers: dict[str, rpc.Server] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data = bytearray(self.volume_size)

    @property
    def other(self) -> str:
        return self.secondary_addr if self.current_primary == self.primary_addr else self.primary_addr

    def status(self, name: str = "vol0") -> pb.VolumeStatus:
        return pb.VolumeStatus(
            spec=pb.VolumeSpec(name=name, size_bytes=self.volume_size, block_size=self.block_size),
            state=pb.PAIR_STATE_IN_SYNC, epoch=self.epoch, primary=self.current_primary, secondary=self.other,
            primary_alive=True, secondary_alive=True, acked_seq=5, last_seq=5, generation=0xFEED,
        )


class _FakeCoordinator(pbg.CoordinatorServiceServicer):
    def __init__(self, fake: FakeCluster) -> None:
        self.fake = fake

    async def GetVolume(self, request: Any, context: Any) -> pb.VolumeStatus:
        if request.name != "vol0":
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no volume named {request.name!r}")
        return self.fake.status()

    async def ListVolumes(self, request: Any, context: Any) -> pb.ListVolumesReply:
        return pb.ListVolumesReply(volumes=[self.fake.status("vol1"), self.fake.status()])

    async def CreateVolume(self, request: Any, context: Any) -> pb.VolumeStatus:
        self.fake.created.append(request)
        if request.name == "vol0":
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, "volume 'vol0' already exists")
        st = self.fake.status(request.name)
        st.spec.size_bytes = request.size_bytes
        st.spec.block_size = request.block_size
        st.auto_failover = request.auto_failover
        return st

    async def Promote(self, request: Any, context: Any) -> pb.PromoteReply:
        f = self.fake
        f.promotes.append(request)
        if request.volume != "vol0":
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no volume named {request.volume!r}")
        if f.promote_refusal is not None and not request.force:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f.promote_refusal)
        old = f.current_primary
        f.current_primary, f.epoch = f.other, f.epoch + 1
        st = f.status()
        st.state = pb.PAIR_STATE_DEGRADED
        return pb.PromoteReply(status=st, message=f"promoted {f.current_primary} (was secondary of {old})")


class _FakeVolume(pbg.VolumeServiceServicer):
    """One fake node. It serves the volume only while the coordinator names it
    the primary; otherwise it refuses as syncrep.node does ("not its primary")."""

    def __init__(self, fake: FakeCluster) -> None:
        self.fake = fake
        self.address = ""

    def _refusal(self) -> str | None:
        if self.address == self.fake.current_primary:
            return None
        return (f"this node ({self.address}) is secondary for volume 'vol0', not its primary; writes go to "
                f"the primary ({self.fake.current_primary})")

    def _apply(self, req: Any) -> pb.WriteReply:
        f = self.fake
        refusal = self._refusal()
        if refusal is not None:
            f.refused.append((self.address, req.offset, len(req.data)))
            return pb.WriteReply(client_seq=req.client_seq, code=grpc.StatusCode.FAILED_PRECONDITION.value[0],
                                 message=refusal)
        f.writes.append((req.offset, len(req.data)))
        if req.offset in f.error_at_offset:
            code, msg = f.error_at_offset[req.offset]
            return pb.WriteReply(client_seq=req.client_seq, code=code.value[0], message=msg)
        if req.offset % f.block_size or len(req.data) % f.block_size:
            return pb.WriteReply(client_seq=req.client_seq, code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                 message="not aligned")
        if req.offset + len(req.data) > f.volume_size:
            return pb.WriteReply(client_seq=req.client_seq, code=grpc.StatusCode.OUT_OF_RANGE.value[0],
                                 message=f"write beyond the end of the {f.volume_size}-byte volume")
        f.data[req.offset : req.offset + len(req.data)] = req.data
        return pb.WriteReply(client_seq=req.client_seq, code=0)

    async def Write(self, request_iterator: Any, context: Any) -> AsyncIterator[pb.WriteReply]:
        self.fake.streams += 1
        held: list[pb.WriteReply] = []
        async for req in request_iterator:
            if self.fake.abort_at_offset is not None and req.offset == self.fake.abort_at_offset:
                self.fake.abort_at_offset = None
                await context.abort(grpc.StatusCode.UNAVAILABLE, "fake primary lost the stream")
            held.append(self._apply(req))
            if len(held) >= self.fake.reply_batch:
                for r in reversed(held):
                    yield r
                held = []
        for r in held:
            yield r

    async def Read(self, request: Any, context: Any) -> pb.ReadReply:
        f = self.fake
        refusal = self._refusal()
        if refusal is not None:
            f.refused.append((self.address, request.offset, request.length))
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, refusal)
        f.reads.append((request.offset, request.length))
        if request.offset % f.block_size or request.length % f.block_size:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "read not aligned")
        return pb.ReadReply(data=bytes(f.data[request.offset : request.offset + request.length]))


@pytest.fixture
async def fake() -> AsyncIterator[FakeCluster]:
    f = FakeCluster()
    coord = rpc.Server("127.0.0.1:0")
    coord.add(pbg.add_CoordinatorServiceServicer_to_server, _FakeCoordinator(f), "syncrep.v1.CoordinatorService")
    f.coordinator_addr = f"127.0.0.1:{await coord.start()}"
    for role in ("primary", "secondary"):
        node = _FakeVolume(f)
        server = rpc.Server("127.0.0.1:0")
        server.add(pbg.add_VolumeServiceServicer_to_server, node, "syncrep.v1.VolumeService")
        node.address = f"127.0.0.1:{await server.start()}"
        setattr(f, f"{role}_addr", node.address)
        f.servers[role] = server
    f.current_primary = f.primary_addr
    try:
        yield f
    finally:
        for server in f.servers.values():
            await server.stop(0)
        await coord.stop(0)


# ---------------------------------------------------------------- CLI against the fakes


async def test_status_plain_and_json(fake: FakeCluster) -> None:
    rc, out, err = await arun_cli("status", "--coordinator", fake.coordinator_addr)
    assert rc == 0, err
    lines = out.decode().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("vol0  in_sync  epoch 1") and lines[1].startswith("vol1  in_sync")
    rc, out, err = await arun_cli("status", "--json", "--coordinator", fake.coordinator_addr)
    assert rc == 0, err
    doc = json.loads(out)
    assert [v["name"] for v in doc["volumes"]] == ["vol0", "vol1"]
    v = doc["volumes"][0]
    assert v["state"] == "in_sync" and v["primary"] == fake.primary_addr and v["size_bytes"] == 8 * MiB


async def test_volume_create(fake: FakeCluster) -> None:
    rc, out, err = await arun_cli(
        "volume", "create", "vol9", "--size", "64MiB", "--block-size", "8KiB", "--resync-mode", "rewrite",
        "--primary", "127.0.0.1:7001", "--secondary", "127.0.0.1:7002", "--coordinator", fake.coordinator_addr,
        "--json",
    )
    assert rc == 0, err
    req = fake.created[-1]
    assert (req.name, req.size_bytes, req.block_size, req.resync_mode) == ("vol9", 64 * MiB, 8192,
                                                                          pb.RESYNC_MODE_REWRITE)
    assert (req.primary, req.secondary) == ("127.0.0.1:7001", "127.0.0.1:7002")
    assert json.loads(out)["name"] == "vol9"
    assert not req.auto_failover
    rc, out, err = await arun_cli(
        "volume", "create", "vol8", "--size", "1MiB", "--auto-failover", "--primary", "127.0.0.1:7001",
        "--secondary", "127.0.0.1:7002", "--coordinator", fake.coordinator_addr,
    )
    assert rc == 0, err
    assert fake.created[-1].auto_failover
    assert "auto-failover" in out.decode()
    rc, out, err = await arun_cli(
        "volume", "create", "vol0", "--size", "1MiB", "--primary", "127.0.0.1:7001", "--secondary",
        "127.0.0.1:7002", "--coordinator", fake.coordinator_addr,
    )
    assert rc == 1
    line = one_error_line(err.decode())
    assert "already exists" in line and line.endswith("(ALREADY_EXISTS)")


async def test_write_then_read_roundtrip(fake: FakeCluster, tmp_path: Path, seed: int) -> None:
    payload = random.Random(seed).randbytes(3 * MiB + 8192)
    src = tmp_path / "in.bin"
    src.write_bytes(payload)
    rc, out, err = await arun_cli("write", "vol0", "--offset", "64KiB", "--coordinator", fake.coordinator_addr,
                                  "--input", str(src))
    assert rc == 0, err
    assert b"wrote 3153920 bytes" in out
    assert fake.streams == 1, "one Write stream for the whole input"
    assert all(n <= MiB for _, n in fake.writes) and len(fake.writes) == 4
    assert bytes(fake.data[64 * KiB : 64 * KiB + len(payload)]) == payload
    # stdin in, stdout out
    rc, out, err = await arun_cli("write", "vol0", "--offset", "0", "--coordinator", fake.coordinator_addr,
                                  stdin=payload[:8192])
    assert rc == 0, err
    rc, out, err = await arun_cli("read", "vol0", "--offset", "0", "--length", "8KiB",
                                  "--coordinator", fake.coordinator_addr)
    assert rc == 0, err
    assert out == payload[:8192]
    dst = tmp_path / "out.bin"
    rc, out, err = await arun_cli("read", "vol0", "--offset", "64KiB", "--length", str(len(payload)),
                                  "--coordinator", fake.coordinator_addr, "--output", str(dst))
    assert rc == 0, err
    assert out == b""
    assert dst.read_bytes() == payload


async def test_write_pad_and_unaligned_read(fake: FakeCluster) -> None:
    rc, _, err = await arun_cli("write", "vol0", "--offset", "0", "--coordinator", fake.coordinator_addr,
                                "--pad", stdin=b"hello")
    assert rc == 0, err
    assert bytes(fake.data[:8]) == b"hello\0\0\0"
    rc, out, err = await arun_cli("read", "vol0", "--offset", "1", "--length", "3",
                                  "--coordinator", fake.coordinator_addr)
    assert rc == 0, err
    assert out == b"ell"


async def test_write_error_reply_one_line(fake: FakeCluster) -> None:
    rc, _, err = await arun_cli("write", "vol0", "--offset", "8MiB", "--coordinator", fake.coordinator_addr,
                                stdin=b"x" * 4096)
    assert rc == 1
    line = one_error_line(err.decode())
    assert "beyond the end" in line and line.endswith("(OUT_OF_RANGE)")


async def test_read_unknown_volume_one_line(fake: FakeCluster) -> None:
    rc, out, err = await arun_cli("read", "nope", "--offset", "0", "--length", "4096",
                                  "--coordinator", fake.coordinator_addr)
    assert rc == 1
    assert one_error_line(err.decode()).endswith("(NOT_FOUND)")
    assert out == b""


# ---------------------------------------------------------------- VolumeClient against the fakes


async def test_client_connect_and_coordinator_helpers(fake: FakeCluster) -> None:
    c = await VolumeClient.connect(fake.coordinator_addr, "vol0")
    try:
        assert c.primary == fake.primary_addr and c.block_size == 4096
    finally:
        await c.close()
    assert (await get_volume(fake.coordinator_addr, "vol0")).primary == fake.primary_addr
    assert [v.spec.name for v in await list_volumes(fake.coordinator_addr)] == ["vol1", "vol0"]
    with pytest.raises(ClientError) as exc:
        await VolumeClient.connect(fake.coordinator_addr, "missing")
    assert exc.value.code == grpc.StatusCode.NOT_FOUND


async def test_client_multiplexes_concurrent_writes_out_of_order(fake: FakeCluster) -> None:
    """Fault: the fake primary replies DATA_LOSS to one write of 64 (replies in reverse batches)."""
    fake.reply_batch = 8
    fake.error_at_offset[5 * 4096] = (grpc.StatusCode.DATA_LOSS, "disk on fire")
    async with await VolumeClient.connect(fake.coordinator_addr, "vol0") as c:
        results = await asyncio.gather(
            *(c.write(i * 4096, bytes([i]) * 4096) for i in range(64)), return_exceptions=True
        )
    assert fake.streams == 1
    errors = {i: r for i, r in enumerate(results) if r is not None}
    assert list(errors) == [5]
    err = errors[5]
    assert isinstance(err, WriteError)
    assert err.code == grpc.StatusCode.DATA_LOSS and err.message == "disk on fire"
    assert (err.offset, err.length) == (5 * 4096, 4096)
    for i in range(64):
        if i != 5:
            assert fake.data[i * 4096] == i


async def test_client_write_many_pipelined(fake: FakeCluster) -> None:
    """Fault: the fake primary replies RESOURCE_EXHAUSTED to the write at one offset."""
    fake.reply_batch = 4
    async with await VolumeClient.connect(fake.coordinator_addr, "vol0") as c:
        n = await c.write_many([(i * 8192, bytes([i % 251]) * 8192) for i in range(100)], depth=16)
        assert n == 100 * 8192
        assert await c.read(99 * 8192, 8192) == bytes([99]) * 8192
        fake.reply_batch = 1  # a partial batch would be held until the stream ends
        fake.error_at_offset[40 * 8192] = (grpc.StatusCode.RESOURCE_EXHAUSTED, "no space")
        with pytest.raises(WriteError) as exc:
            await c.write_many([(i * 8192, b"z" * 8192) for i in range(100)], depth=4)
        assert exc.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # submission stops soon after the failure (at most `depth` more writes)
    assert len(fake.writes) <= 100 + 40 + 1 + 4 + 4
    assert fake.streams == 1


async def test_client_stream_failure_fails_pending_then_reopens(fake: FakeCluster) -> None:
    """Fault: the fake primary aborts the Write stream (UNAVAILABLE) with 10 writes pending."""
    fake.reply_batch = 1000  # hold every reply: writes stay pending until the stream ends
    async with await VolumeClient.connect(fake.coordinator_addr, "vol0") as c:
        pending = [asyncio.create_task(c.write(i * 4096, b"p" * 4096)) for i in range(10)]
        # All 10 reached the fake primary (which records each on arrival) before the abort.
        await wait_until(lambda: len(fake.writes) == 10, "the fake primary received the 10 pending writes")
        fake.abort_at_offset = 100 * 4096
        trigger = asyncio.create_task(c.write(100 * 4096, b"t" * 4096))
        results = await asyncio.gather(*pending, trigger, return_exceptions=True)
        assert all(isinstance(r, WriteError) and r.code == grpc.StatusCode.UNAVAILABLE for r in results), results
        assert all("fake primary lost the stream" in str(r) for r in results)
        # later writes go over a new stream; nothing was retried silently
        fake.reply_batch = 1
        writes_before = len(fake.writes)
        await c.write(200 * 4096, b"n" * 4096)
        assert fake.streams == 2
        assert fake.writes[writes_before:] == [(200 * 4096, 4096)]


async def test_client_refuses_oversized_write_locally(fake: FakeCluster) -> None:
    async with await VolumeClient.connect(fake.coordinator_addr, "vol0") as c:
        with pytest.raises(WriteError) as exc:
            await c.write(0, b"x" * (MAX_WRITE_BYTES + 4096))
        assert exc.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert fake.streams == 0


async def test_client_write_timeout(fake: FakeCluster) -> None:
    """Fault: the fake primary withholds every reply."""
    fake.reply_batch = 1000
    async with await VolumeClient.connect(fake.coordinator_addr, "vol0", write_timeout_s=0.3) as c:
        t0 = time.monotonic()
        with pytest.raises(WriteError) as exc:
            await c.write(0, b"x" * 4096)
        assert exc.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 3


async def test_client_close_fails_pending(fake: FakeCluster) -> None:
    """Fault: the fake primary withholds the reply; the client is closed with the write pending."""
    fake.reply_batch = 1000
    c = await VolumeClient.connect(fake.coordinator_addr, "vol0")
    t = asyncio.create_task(c.write(0, b"x" * 4096))
    # Close only once the write is provably on the stream (the fake primary has it, unanswered).
    await wait_until(lambda: fake.writes == [(0, 4096)], "the fake primary received the write")
    assert not t.done()
    await c.close()
    with pytest.raises(WriteError) as exc:
        await t
    assert exc.value.code == grpc.StatusCode.CANCELLED
    with pytest.raises(WriteError):
        await c.write(0, b"x" * 4096)


# ---------------------------------------------------------------- promote and following the primary


async def test_promote_prints_message_and_new_roles(fake: FakeCluster) -> None:
    rc, out, err = await arun_cli("promote", "vol0", "--coordinator", fake.coordinator_addr)
    assert rc == 0, err
    text = out.decode()
    assert f"promoted {fake.secondary_addr}" in text
    assert f"primary is now {fake.secondary_addr}, secondary {fake.primary_addr} (epoch 2, degraded" in text
    assert [(r.volume, r.force) for r in fake.promotes] == [("vol0", False)]


async def test_promote_refused_prints_coordinator_message_and_exits_1(fake: FakeCluster) -> None:
    fake.promote_refusal = ("volume 'vol0': the primary's lease runs for 3.2 s more; promote after it "
                            "expired")
    rc, out, err = await arun_cli("promote", "vol0", "--coordinator", fake.coordinator_addr)
    assert rc == 1
    line = one_error_line(err.decode())
    assert "lease runs for 3.2 s more" in line and line.endswith("(FAILED_PRECONDITION)")
    assert out == b""
    assert fake.current_primary == fake.primary_addr, "a refused promote changes nothing"
    rc, out, err = await arun_cli("promote", "vol0", "--force", "--json", "--coordinator", fake.coordinator_addr)
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["volume"]["primary"] == fake.secondary_addr and doc["message"].startswith("promoted")
    assert [r.force for r in fake.promotes] == [False, True]


async def test_promote_client_refusal_is_client_error(fake: FakeCluster) -> None:
    fake.promote_refusal = "the secondary is not current; --force would lose 8 KiB"
    with pytest.raises(ClientError) as exc:
        await promote(fake.coordinator_addr, "vol0")
    assert exc.value.code == grpc.StatusCode.FAILED_PRECONDITION and "--force" in exc.value.message
    reply = await promote(fake.coordinator_addr, "vol0", force=True)
    assert reply.status.primary == fake.secondary_addr


async def test_client_write_refused_not_primary_is_resent_to_new_primary(fake: FakeCluster) -> None:
    """Fault: a failover: the node the client writes to is demoted (refuses "not its primary")."""
    async with await VolumeClient.connect(fake.coordinator_addr, "vol0") as c:
        await c.write(0, b"a" * 4096)
        fake.current_primary = fake.secondary_addr  # promoted behind the client's back
        await asyncio.gather(*(c.write(i * 4096, bytes([i]) * 4096) for i in range(1, 9)))
        assert c.primary == fake.secondary_addr
        assert {n for n, _, _ in fake.refused} == {fake.primary_addr}, "only the old primary refused"
        refused = [o for _, o, _ in fake.refused]
        assert refused and len(set(refused)) == len(refused) <= 8, refused
        assert set(refused) <= {i * 4096 for i in range(1, 9)}, refused
        # every write was applied exactly once by the node that accepted it
        assert sorted(fake.writes) == [(i * 4096, 4096) for i in range(9)]
        assert all(fake.data[i * 4096] == i for i in range(1, 9))
        # reads follow too
        assert await c.read(4096, 4096) == b"\x01" * 4096


async def test_client_read_follows_primary_when_old_one_is_unreachable(fake: FakeCluster) -> None:
    """Fault: the primary dies (its server stops) and the coordinator names the other node."""
    fake.data[0:4096] = b"r" * 4096
    async with await VolumeClient.connect(fake.coordinator_addr, "vol0", failover_wait_s=10) as c:
        await fake.servers["primary"].stop(0)
        fake.current_primary = fake.secondary_addr
        assert await c.read(0, 4096) == b"r" * 4096
        assert c.primary == fake.secondary_addr


async def test_client_not_primary_without_new_primary_fails_within_bound(fake: FakeCluster) -> None:
    """Fault: the node refuses "not its primary" but the coordinator still names it (no failover yet)."""
    async with await VolumeClient.connect(fake.coordinator_addr, "vol0", failover_wait_s=0.6) as c:
        # The node refuses while the coordinator still names it (it has not learnt of a promotion yet).
        node_refusal = "this node (x) is secondary for volume 'vol0', not its primary; writes go to the primary"
        fake.error_at_offset[0] = (grpc.StatusCode.FAILED_PRECONDITION, node_refusal)
        t0 = time.monotonic()
        with pytest.raises(WriteError) as exc:
            await c.write(0, b"x" * 4096)
        assert exc.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "named no other primary within 0.6 s" in exc.value.message
        assert time.monotonic() - t0 < 5


# ---------------------------------------------------------------- security flags (docs/SECURITY.md)


@pytest.mark.parametrize("cmd", [["status", "--coordinator", "127.0.0.1:1"],
                                 ["primary", "--listen", "127.0.0.1:7001", "--data-dir", "d",
                                  "--coordinator", "127.0.0.1:7000"],
                                 ["coordinator", "--listen", "127.0.0.1:7000", "--data-dir", "d"]])
def test_neither_certs_dir_nor_insecure_refuses_to_start_and_says_how(cmd: list[str], tmp_path: Path) -> None:
    env_before = os.environ.pop("SYNCREP_CERTS_DIR", None)
    try:
        r = run_cli(*[str(tmp_path / "d") if a == "d" else a for a in cmd], "--no-security-flag")
    finally:
        if env_before is not None:
            os.environ["SYNCREP_CERTS_DIR"] = env_before
    assert r.returncode == 1
    line = one_error_line(r.stderr.decode())
    assert "--certs-dir" in line and "--insecure" in line and "syncrep cert create-ca" in line, line
    assert not (tmp_path / "d").exists(), "a refused process created its data dir"


def test_insecure_warns_at_start_and_excludes_certs_dir(tmp_path: Path) -> None:
    r = run_cli("primary", "--listen", "0.0.0.0:7001", "--data-dir", str(tmp_path / "d"), "--coordinator",
                "127.0.0.1:7000", "--insecure")
    assert "running in PLAINTEXT (--insecure)" in r.stderr.decode(), r.stderr
    r = run_cli("status", "--coordinator", "127.0.0.1:1", "--insecure", "--certs-dir", str(tmp_path))
    assert r.returncode == 1 and "exclude each other" in one_error_line(r.stderr.decode())


def test_certs_dir_without_the_files_names_the_missing_file_and_the_command(tmp_path: Path) -> None:
    r = run_cli("status", "--coordinator", "127.0.0.1:1", "--certs-dir", str(tmp_path), "--user", "alice")
    line = one_error_line(r.stderr.decode())
    assert r.returncode == 1 and "ca.crt" in line and "syncrep cert" in line, line


def test_cert_commands_make_a_ca_node_and_client_and_security_flags_follow_the_subcommand(tmp_path: Path) -> None:
    d, key = tmp_path / "certs", tmp_path / "ca.key"
    for args in (["cert", "create-ca", "--certs-dir", str(d), "--ca-key", str(key)],
                 ["cert", "create-node", "127.0.0.1", "localhost", "--certs-dir", str(d), "--ca-key", str(key)],
                 ["cert", "create-client", "admin", "--certs-dir", str(d), "--ca-key", str(key)]):
        r = run_cli(*args)
        assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in d.iterdir()) == ["ca.crt", "client.admin.crt", "client.admin.key", "node.crt",
                                                   "node.key"]
    assert (d / "node.key").stat().st_mode & 0o777 == 0o600
    # The certificates load: the command gets as far as dialing (nothing listens there).
    r = run_cli("status", "--coordinator", "127.0.0.1:1", "--certs-dir", str(d))
    assert r.returncode == 1 and "cannot reach coordinator" in one_error_line(r.stderr.decode())
    # A key others can read is refused, as ssh does.
    (d / "client.admin.key").chmod(0o644)
    r = run_cli("status", "--coordinator", "127.0.0.1:1", "--certs-dir", str(d))
    assert r.returncode == 1 and "chmod 600" in one_error_line(r.stderr.decode())
