"""``syncrep coordinator --advertise HOST:PORT`` (issue 12): on etcd, the
leader's advertised address is what followers redirect to, so a coordinator
listening on every interface must say which address others dial. Two real
coordinators on a real etcd, listening on 0.0.0.0, advertising
``localhost:PORT``: the leader is named by that address in CoordinatorInfo and
in a follower's redirect. And the bad inputs, refused before anything starts."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from etcd_fixture import EtcdCluster, fixture_etcd  # noqa: F401

from deploy.cluster import free_port
from syncrep import client as sc
from syncrep import rpc
from syncrep.pb import syncrep_pb2 as pb
from syncrep.pb import syncrep_pb2_grpc as pbg

SYNCREP = [sys.executable, "-m", "syncrep"]
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


@pytest.mark.parametrize("argv,fragment", [
    (["--listen", "0.0.0.0:7000", "--store", "etcd://127.0.0.1:2379"], "pass --advertise HOST:PORT"),
    (["--listen", "127.0.0.1:7000", "--advertise", "0.0.0.0:7000"], "not a wildcard"),
    (["--listen", "127.0.0.1:7000", "--advertise", "hostA:0"], "port 0 cannot be dialled"),
])
def test_bad_advertise_refused_before_start(tmp_path: Path, argv: list[str], fragment: str) -> None:
    """Bad input: a wildcard listen on etcd without --advertise, a wildcard or port-0 --advertise."""
    r = subprocess.run([*SYNCREP, "coordinator", "--data-dir", str(tmp_path), *argv, "--insecure"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode in (1, 2), r
    assert fragment in r.stderr, r.stderr
    assert not any(tmp_path.iterdir()), "a refused start wrote to its data dir"


def _start_coordinator(tmp_path: Path, i: int, port: int, store: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with (tmp_path / f"c{i}.log").open("wb") as f:
        return subprocess.Popen(
            [*SYNCREP, "coordinator", "--listen", f"0.0.0.0:{port}", "--advertise", f"localhost:{port}",
             "--data-dir", str(tmp_path / f"c{i}"), "--store", store, "--election-ttl-s", "2", "--insecure"],
            stdout=f, stderr=subprocess.STDOUT, env=env)


async def test_leader_is_named_by_its_advertised_address(
    tmp_path: Path, etcd: EtcdCluster, procs: list[subprocess.Popen[bytes]]
) -> None:
    """No fault: two coordinators listening on 0.0.0.0 advertise localhost:PORT; the leader's
    CoordinatorInfo, the follower's view of the leader and the follower's redirect all name
    localhost:PORT of the leader (never 0.0.0.0 or 127.0.0.1); SIGTERM stops both cleanly."""
    rpc.configure(rpc.Security(None))
    ports = [free_port(), free_port()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCREP_")}
    for i, port in enumerate(ports):
        procs.append(_start_coordinator(tmp_path, i, port, etcd.url, env))
    dial = ",".join(f"127.0.0.1:{p}" for p in ports)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:  # polling servers that are starting, not hiding a race
        infos = await sc.coordinator_info(dial, timeout_s=2.0)
        if sum(1 for i in infos if i["state"] == "leader") == 1 and all(i.get("leader") for i in infos):
            break
        for i, p in enumerate(procs):
            assert p.poll() is None, (tmp_path / f"c{i}.log").read_text()[-2000:]
        assert time.monotonic() < deadline, infos
        await asyncio.sleep(0.2)
    lead = next(k for k, i in enumerate(infos) if i["state"] == "leader")
    advertised = f"localhost:{ports[lead]}"
    assert all(i["leader"] == advertised for i in infos), infos
    async with rpc.channel(f"127.0.0.1:{ports[lead]}") as ch:
        me = await pbg.CoordinatorServiceStub(ch).CoordinatorInfo(pb.CoordinatorInfoRequest(), timeout=5.0)
    assert me.address == advertised and me.is_leader, me
    async with rpc.channel(f"127.0.0.1:{ports[1 - lead]}") as ch:
        with pytest.raises(grpc.RpcError) as refused:
            await pbg.CoordinatorServiceStub(ch).Promote(pb.PromoteRequest(volume="v"), timeout=5.0)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value
    assert sc.redirect_of(refused.value) == advertised, refused.value.details()
    for i, p in enumerate(procs):
        p.send_signal(signal.SIGTERM)
        assert p.wait(STOP_TIMEOUT_S) == 0, (tmp_path / f"c{i}.log").read_text()[-2000:]
        assert "Traceback" not in (tmp_path / f"c{i}.log").read_text()
