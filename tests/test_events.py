"""``syncrep events`` and ``CoordinatorService.WatchEvents`` (issue 13).

End to end with real processes (mutual TLS, the harness default): ``syncrep
events`` runs as a subprocess, in ``--json`` and in plain form, while the
secondary is killed with SIGKILL, written around and restarted; the streams
must carry the pair's story (in_sync -> degraded, the resync's start, its
progress, its end back in sync), every line with a timestamp that has a
timezone and the epoch; Ctrl-C ends the command with 130 and no traceback.
``--now`` prints the current state and exits 0. A killed coordinator is said
once and the command reconnects by itself. In process: a subscriber that
falls behind gets one "dropped" event and its stream ends, and the
coordinator never waits for it.

Each multi-process test ends with the replicas compared block for block and
every acknowledged write checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until
from e2e_helpers import EventsProcess, assert_replicas_identical, check_model, wait_state, write_blocks

from coordinator.db import CoordinatorDB
from coordinator.service import EVENT_QUEUE_EVENTS, CoordinatorServicer, _Subscriber
from deploy.cluster import LocalCluster
from syncrep.pb import syncrep_pb2 as pb

VOL = "vol0"
SIZE = 16 << 20
BLOCK = 4096
#: ISO 8601 with a UTC offset (never a naive time).
TZ_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$")
#: One plain line: time, volume, "epoch N", kind, then what changed.
PLAIN_LINE = re.compile(
    r"^(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d) (?P<volume>\S+) epoch (?P<epoch>\d+) "
    r"(?P<kind>[a-z_]+)(?P<rest>.*)$"
)
#: How long a spawned ``syncrep events`` may take to print its first line.
FIRST_LINE_TIMEOUT_S = 30.0


def _json_events(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in lines]


def _first(events: list[dict[str, Any]], kind: str, start: int = 0, **match: str) -> int:
    for i, ev in enumerate(events[start:], start):
        if ev["kind"] == kind and all(ev[k] == v for k, v in match.items()):
            return i
    raise AssertionError(f"no {kind} event {match or ''} after #{start}; kinds: {[e['kind'] for e in events]}")


async def test_secondary_sigkill_and_restart_stream_state_change_resync_and_done_events(
    cluster_factory: Any, seed: int
) -> None:
    """Fault: SIGKILL of the secondary (12 MiB written while it is down), then a
    restart: ``syncrep events --json`` and the plain form show the whole story.
    Seeded writes: ``seed`` (default: from the test id)."""
    c: LocalCluster = cluster_factory(primary_args=["--resync-max-rate", "3MiB", "--resync-chunk-bytes", "65536"])
    await c.start()
    await c.create_volume(VOL, SIZE, BLOCK)
    cl = await c.connect(VOL)
    model: dict[int, bytes] = {}
    ev_json = await EventsProcess(c, "--json").start(FIRST_LINE_TIMEOUT_S)
    ev_plain = await EventsProcess(c).start(FIRST_LINE_TIMEOUT_S)
    try:
        await write_blocks(cl, 0, 256, 16, seed=seed, model=model)
        c.kill("secondary")
        await wait_state(c, VOL, "degraded", timeout_s=20)
        # Its heartbeats stop too: the coordinator says the node is down (node timeout).
        await c.wait_for_volume(VOL, lambda st: not st.secondary_alive, timeout_s=20)
        await write_blocks(cl, 256, 3072, 32, seed=seed + 1, model=model)  # 12 MiB while it is down
        await c.restart("secondary")
        await c.wait_for_volume(VOL, "in_sync", timeout_s=90)

        def done_seen() -> bool:
            return any('"resync_done"' in ln for ln in ev_json.lines) and any(
                " resync_done " in ln for ln in ev_plain.lines)

        await wait_until(done_seen, "a resync_done event on both event streams", timeout_s=20)
        rc_json, err_json = await ev_json.interrupt()
        rc_plain, err_plain = await ev_plain.interrupt()
    finally:
        await ev_json.close()
        await ev_plain.close()
    (Path(c.workdir) / "events.jsonl").write_text("\n".join(ev_json.lines) + "\n")
    (Path(c.workdir) / "events.txt").write_text("\n".join(ev_plain.lines) + "\n")
    print("\n".join(ev_plain.lines))  # the captured run, for the closing note (pytest -s)

    # Ctrl-C: exit 130, one line, no traceback.
    for rc, err in ((rc_json, err_json), (rc_plain, err_plain)):
        assert rc == 130, (rc, err)
        assert "Traceback" not in err and "interrupted" in err, err

    events = _json_events(ev_json.lines)
    for ev in events:
        assert TZ_TIME.match(ev["time"]), ev
        assert isinstance(ev["epoch"], int) and ev["epoch"] >= 1, ev
        assert ev["volume"] == VOL, ev
    seqs = [ev["seq"] for ev in events if ev["kind"] != "state"]
    assert seqs == sorted(seqs), f"events out of order: {seqs}"
    # The story, in order.
    assert events[0]["kind"] == "state" and events[0]["new"] == "in_sync", events[0]
    down = _first(events, "state_change", old="in_sync", new="degraded")
    start = _first(events, "resync_start", down, old="degraded", new="resyncing")
    progress = [i for i, ev in enumerate(events) if ev["kind"] == "resync_progress" and i > start
                and ev["progress"]["bytes_total"] > 0 and ev["progress"]["bytes_done"] > 0]
    assert progress, f"no resync_progress event with bytes after #{start}: {events[start:]}"
    done = _first(events, "resync_done", progress[0], new="in_sync")
    assert events[done]["old"] in ("degraded", "resyncing"), events[done]
    assert events[down]["epoch"] < events[start]["epoch"]
    assert events[done]["epoch"] == events[start]["epoch"]
    st = await c.get_volume(VOL)
    assert events[done]["epoch"] == st.epoch
    # Each node's connection state: the secondary went down, then came back.
    node_down = _first(events, "node_down", down)
    assert "secondary" in events[node_down]["message"] and node_down < start, events[node_down]
    assert _first(events, "node_up", node_down) < done
    assert events[done]["primary"] == c.primary_addr and events[done]["secondary"] == c.secondary_addr

    # The plain lines: the same story, one parseable line each.
    parsed = [PLAIN_LINE.match(ln) for ln in ev_plain.lines]
    assert all(parsed), [ln for ln, m in zip(ev_plain.lines, parsed, strict=True) if not m]
    kinds = [(m["kind"], m["rest"]) for m in parsed if m]
    assert any(k == "state_change" and r.startswith(" in_sync -> degraded: ") for k, r in kinds), kinds
    assert any(k == "resync_start" and r.startswith(" degraded -> resyncing: ") for k, r in kinds), kinds
    assert any(k == "resync_done" and "-> in_sync: " in r for k, r in kinds), kinds

    await check_model(c, VOL, model)
    await cl.close()
    await assert_replicas_identical(c, VOL)


async def test_events_now_prints_the_current_state_and_exits(cluster: LocalCluster, seed: int) -> None:
    """No fault: ``syncrep events --now`` (plain and --json) prints one state
    line per volume and exits 0; an unknown ``--volume`` is refused. Seeded
    writes: ``seed``."""
    cl = await cluster.connect(VOL)
    model: dict[int, bytes] = {}
    await write_blocks(cl, 0, 64, 8, seed=seed, model=model)
    st = await cluster.get_volume(VOL)

    plain = await cluster.run_cli("events", "--now", timeout_s=30)
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.splitlines()
    assert len(lines) == 1, lines
    m = PLAIN_LINE.match(lines[0])
    assert m and m["volume"] == VOL and m["kind"] == "state" and int(m["epoch"]) == st.epoch, lines
    assert m["rest"].startswith(" in_sync: primary ") and "out of sync 0 bytes" in m["rest"], lines

    as_json = await cluster.run_cli("events", "--now", "--json", "--volume", VOL, timeout_s=30)
    assert as_json.returncode == 0, as_json.stderr
    (ev,) = _json_events(as_json.stdout.splitlines())
    assert ev["kind"] == "state" and ev["new"] == "in_sync" and ev["epoch"] == st.epoch, ev
    assert ev["primary"] == cluster.primary_addr and ev["secondary"] == cluster.secondary_addr, ev
    assert TZ_TIME.match(ev["time"]), ev

    unknown = await cluster.run_cli("events", "--now", "--volume", "nosuch", timeout_s=30)
    assert unknown.returncode == 1, unknown
    assert "nosuch" in unknown.stderr and "NOT_FOUND" in unknown.stderr and "Traceback" not in unknown.stderr

    await check_model(cluster, VOL, model)
    await cl.close()
    await assert_replicas_identical(cluster, VOL)


async def test_coordinator_sigkill_is_reported_once_and_events_reconnect(cluster: LocalCluster, seed: int) -> None:
    """Fault: SIGKILL of the coordinator (down about 2 s) while ``syncrep events``
    follows: it says so once on stderr, retries with backoff, says when it is
    back and streams the current state again. Seeded writes: ``seed``."""
    cl = await cluster.connect(VOL)
    model: dict[int, bytes] = {}
    ev = await EventsProcess(cluster).start(FIRST_LINE_TIMEOUT_S)
    try:
        first = len(ev.lines)
        cluster.kill("coordinator")
        await asyncio.sleep(2.0)  # the outage itself: the retries must not flood stderr meanwhile
        await cluster.start_process("coordinator")
        # The current state again, whatever it is then (primary_lost until the
        # primary's first heartbeat reaches the new coordinator process).
        await wait_until(lambda: any(PLAIN_LINE.match(ln) and " state " in ln for ln in ev.lines[first:]),
                         "the state line again after the coordinator came back", timeout_s=45)
        await cluster.wait_for_volume(VOL, "in_sync", timeout_s=30)
        await write_blocks(cl, 0, 64, 8, seed=seed, model=model)
        rc, err = await ev.interrupt()
    finally:
        await ev.close()
    assert rc == 130 and "Traceback" not in err, (rc, err)
    assert err.count("retrying with backoff") == 1, err
    assert err.count("is back after") == 1, err
    await check_model(cluster, VOL, model)
    await cl.close()
    await assert_replicas_identical(cluster, VOL)


# ---------------------------------------------------------------- in process: a slow subscriber


def test_full_subscriber_queue_counts_what_it_misses() -> None:
    """Fault: a subscriber that takes nothing while 5 events arrive (queue of 3)."""
    sub = _Subscriber("", max_events=3)
    for i in range(5):
        sub.offer(pb.Event(volume=VOL, kind="state_change", seq=i + 1))
    assert sub.overflowed.is_set() and sub.queue.empty() and sub.dropped == 5
    other = _Subscriber("vol1", max_events=1)
    other.offer(pb.Event(volume=VOL))  # another volume's: filtered, never counted
    assert other.queue.empty() and not other.dropped


async def test_slow_subscriber_gets_dropped_event_and_never_blocks_the_coordinator(tmp_path: Path) -> None:
    """Fault: a subscriber that reads nothing while EVENT_QUEUE_EVENTS + 10 events
    are published: publishing never waits; its stream ends with "dropped N"."""
    db = CoordinatorDB(tmp_path / "coordinator.db")
    svc = CoordinatorServicer(db)
    try:
        stream = svc.WatchEvents(pb.WatchEventsRequest(), None)  # type: ignore[arg-type]
        first = asyncio.ensure_future(anext(stream))
        await wait_until(lambda: bool(svc._subscribers), "the subscriber registered", timeout_s=5)
        n = EVENT_QUEUE_EVENTS + 10
        for i in range(n):
            svc._publish(pb.Event(volume=VOL, kind="resync_progress", message=f"#{i}"))
        last = await asyncio.wait_for(first, 5)
        assert last.kind == "dropped" and f"dropped {n} events" in last.message, last
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(stream), 5)
        assert not svc._subscribers
        # A subscriber that keeps up gets everything, in order.
        stream = svc.WatchEvents(pb.WatchEventsRequest(volume=VOL), None)  # type: ignore[arg-type]
        got: list[pb.Event] = []

        async def consume() -> None:
            async for ev in stream:
                got.append(ev)

        task = asyncio.create_task(consume())
        await wait_until(lambda: bool(svc._subscribers), "the second subscriber registered", timeout_s=5)
        for i in range(50):
            svc._publish(pb.Event(volume=VOL, kind="nack", message=f"#{i}"))
            svc._publish(pb.Event(volume="vol1", kind="nack"))  # filtered out
            await asyncio.sleep(0)
        await wait_until(lambda: len(got) == 50, "50 events delivered", timeout_s=5)
        assert [ev.message for ev in got] == [f"#{i}" for i in range(50)]
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        db.close()
