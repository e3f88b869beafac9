"""Crash safety: SIGKILL a writing child at a random moment, reopen, check nothing was lost.

The child writes blocks stamped ``(seq, block)`` (the whole block is a deterministic
pattern of the two), takes and deletes snapshots, and reports every operation that
*returned* on stdout. After the kill the parent reopens the volume and checks:

* every block holds the last reported write to it, or the write that was in flight
  when the child died (a stamp newer than anything reported) -- never anything older;
* every snapshot reported as created (and not reported deleted) still exists (but for
  one whose deletion was in flight) and
  reads back exactly as the head was when it was taken; reported deletions stuck;
* every block written after the last reported snapshot is in ``diff(last, None)``,
  and every block outside that diff reads the same at the head and in the snapshot
  (so even the in-flight write is tracked);
* the slot allocator is consistent and the volume keeps working after reopening.

Each case has its own default seed (1 .. 12, the parameter; $SYNCREP_TEST_SEED
overrides it, see tests/conftest.py). The seed replays the child's operations
and the number of reports before the kill; where inside the next operation the
kill lands is up to the scheduler.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from syncrep.blockstore import BlockStore

BS = 4096
NBLOCKS = 256
REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import random, struct, sys
from syncrep.blockstore import BlockStore

path, seed, durability = sys.argv[1], int(sys.argv[2]), sys.argv[3]
BS, NBLOCKS = 4096, 256
rng = random.Random(seed)
store = BlockStore.create(path, BS * NBLOCKS, BS, durability=durability, name="crash")

def block(seq, b):
    return struct.pack("<QQ", seq, b) * (BS // 16)

out = sys.stdout
# Start with some non-zero content so copy-on-write copies real data.
store.write(0, b"".join(block(0, b) for b in range(64)))
out.write("W 0 0 64\n"); out.flush()
seq = 0
live = []
n = 0
while True:
    r = rng.random()
    if r < 0.06:
        n += 1
        info = store.create_snapshot(f"s{n}")
        live.append(info.id)
        out.write(f"S {info.id}\n"); out.flush()
    elif r < 0.09 and len(live) >= 3:
        victim = live.pop(rng.randrange(len(live) - 1))  # never the newest
        store.delete_snapshot(victim)
        out.write(f"D {victim}\n"); out.flush()
    else:
        batch, lines = [], []
        for _ in range(rng.randint(1, 4)):
            seq += 1
            count = rng.choice([1, 1, 2, 3, 8, 32])
            first = rng.randrange(NBLOCKS - count + 1)
            batch.append((first * BS, b"".join(block(seq, b) for b in range(first, first + count))))
            lines.append(f"W {seq} {first} {count}\n")
        if len(batch) == 1 and rng.random() < 0.5:
            store.write(*batch[0])
        else:
            store.write_batch(batch)
        out.write("".join(lines)); out.flush()
"""


def stamp(data: bytes) -> tuple[int, int]:
    return struct.unpack_from("<QQ", data, 0)


def pattern(seq: int, b: int) -> bytes:
    return struct.pack("<QQ", seq, b) * (BS // 16)


@pytest.mark.parametrize(
    ("seed", "durability"),
    [(seed, "sync" if seed % 3 == 2 else "os") for seed in range(1, 13)],
    indirect=["seed"],
)
def test_sigkill_loses_nothing(tmp_path: Path, seed: int, durability: str) -> None:
    """Fault: SIGKILL of the writing child (at a seeded point in its report stream)."""
    path = tmp_path / "vol"
    rng = random.Random(seed * 7919)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(seed), durability],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    target = rng.randint(5, 600 if durability == "os" else 150)
    lines: list[bytes] = []
    deadline = time.monotonic() + 30
    while len(lines) < target and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
    # Deliberate, and the behaviour under test: a random delay so the kill lands anywhere
    # inside the next operation (not a wait for anything).
    time.sleep(rng.uniform(0, 0.004))
    proc.send_signal(signal.SIGKILL)
    # Read the rest through the same buffered reader (communicate() would skip its buffer).
    rest = proc.stdout.read()
    assert proc.stderr is not None
    err = proc.stderr.read()
    proc.wait(timeout=30)
    ctx = f"seed={seed} durability={durability} reports={len(lines)}"
    assert proc.returncode == -signal.SIGKILL, f"{ctx}: child exited by itself: {err.decode()[-2000:]}"
    text = b"".join(lines).decode() + rest.decode()
    reports = [ln.split() for ln in text.split("\n")[:-1]]  # drop a possibly torn last line

    # Replay the reports into a model.
    head: dict[int, int] = {}  # block -> seq of the last returned write
    snaps: dict[int, tuple[dict[int, int], int]] = {}  # id -> (head copy, max seq at snapshot)
    deleted: set[int] = set()
    last_snap: int | None = None
    after_last: set[int] = set()
    max_seq = -1
    for rep in reports:
        if rep[0] == "W":
            seq, first, count = int(rep[1]), int(rep[2]), int(rep[3])
            max_seq = max(max_seq, seq)
            for b in range(first, first + count):
                head[b] = seq
                after_last.add(b)
        elif rep[0] == "S":
            last_snap = int(rep[1])
            snaps[last_snap] = (dict(head), max_seq)
            after_last = set()
        elif rep[0] == "D":
            deleted.add(int(rep[1]))
            del snaps[int(rep[1])]
    assert reports, f"{ctx}: child reported nothing"

    with BlockStore.open(path, durability=durability) as store:
        live = {s.id for s in store.list_snapshots()}
        data = store.read(0, BS * NBLOCKS)
        in_flight: set[int] = set()
        for b in range(NBLOCKS):
            blk = data[b * BS : (b + 1) * BS]
            want = head.get(b)
            if want is not None and blk == pattern(want, b):
                continue
            if want is None and blk == bytes(BS):
                continue
            got_seq, got_b = stamp(blk)
            in_flight.add(b)
            # Only the write in flight at the kill may differ: newer than anything reported.
            assert got_b == b and got_seq > max_seq and blk == pattern(got_seq, b), (
                f"{ctx}: block {b} holds stamp {(got_seq, got_b)}, expected seq {want} "
                f"(or an in-flight write newer than {max_seq}) -- a returned write was lost"
            )

        # A delete in flight at the kill may have committed before it could be reported.
        vanished = sorted(set(snaps) - live)
        assert len(vanished) <= 1 and last_snap not in vanished, (
            f"{ctx}: reported snapshots {vanished} are gone after the crash"
        )
        if vanished:
            assert not in_flight, f"{ctx}: snapshot {vanished} vanished, yet a write was also in flight"
        for sid, (content, _) in snaps.items():
            if sid in vanished:
                continue
            sdata = store.read_at(sid, 0, BS * NBLOCKS)
            for b in range(NBLOCKS):
                want_blk = pattern(content[b], b) if b in content else bytes(BS)
                assert sdata[b * BS : (b + 1) * BS] == want_blk, (
                    f"{ctx}: snapshot {sid} block {b} changed after the crash (expected seq {content.get(b)})"
                )
        for sid in deleted:
            assert sid not in live, f"{ctx}: deleted snapshot {sid} came back after the crash"

        if last_snap is not None:
            changed = store.diff_bitmap(last_snap, None)
            missing = sorted(after_last - set(changed))
            assert not missing, (
                f"{ctx}: blocks {missing[:20]} written after snapshot {last_snap} not in its diff"
            )
            sdata = store.read_at(last_snap, 0, BS * NBLOCKS)
            for b in range(NBLOCKS):
                if b not in changed:
                    assert data[b * BS : (b + 1) * BS] == sdata[b * BS : (b + 1) * BS], (
                        f"{ctx}: block {b} differs from snapshot {last_snap} but is not in diff(last, None)"
                    )

        conn = store._conn
        used = [r[0] for r in conn.execute("SELECT slot FROM changes WHERE slot IS NOT NULL")]
        free = [r[0] for r in conn.execute("SELECT slot FROM free_slots")]
        assert len(used) == len(set(used)) and not set(used) & set(free), f"{ctx}: slot allocator corrupt"

        # The volume keeps working: write, snapshot, diff.
        store.write(0, pattern(10**9, 0))
        s = store.create_snapshot("after-crash")
        store.write(BS, pattern(10**9 + 1, 1))
        assert store.diff(s.id, None)[0].offset == BS
        assert store.read(0, BS) == pattern(10**9, 0)
