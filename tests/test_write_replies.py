"""Batched Write replies (issue 14, docs/PERF.md plan item 2, the reply side).

The node answers a group of writes that complete together with one
``WriteReply`` (``client_seq`` plus ``more_ok_seqs``), but only on a stream
whose client asked for it (``WriteRequest.batch_replies``): a client built
before the field reads only ``client_seq`` and would wait forever for the
others. Checked here:

* the packing (``node.pack_write_replies``) and the client's reading of a
  reply (``client.write_reply_outcomes``), pure functions, over random
  completion orders and drains: every write settled exactly once with its own
  code, refusals one per message, at most ``max_seqs`` writes per message,
  one message per write when the client did not ask;
* end to end, real processes: a raw stream without the flag still gets one
  reply per write, and one with it gets every write settled exactly once,
  while the writes complete together (the secondary held by SIGSTOP until
  they are all in flight, then let go); both end comparing the replicas
  block for block and reading back every acknowledged write.
"""

from __future__ import annotations

import asyncio
import collections
import math
import random
from typing import Any

import grpc
import pytest
from e2e_helpers import assert_replicas_identical, check_model
from hypothesis import given, settings
from hypothesis import strategies as st

from deploy.cluster import LocalCluster
from syncrep import client as sc
from syncrep import rpc
from syncrep.node import WRITE_REPLY_MAX_SEQS, pack_write_replies
from syncrep.pb import syncrep_pb2 as pb
from syncrep.pb import syncrep_pb2_grpc as pbg

BLOCK = 4096
VOL = "vol0"
SIZE = 16 << 20
#: Codes a write can be refused or failed with (besides OK, 0).
ERROR_CODES = [c.value[0] for c in (grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.INVALID_ARGUMENT,
                                    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.PERMISSION_DENIED)]

# ---------------------------------------------------------------- the pure functions


@st.composite
def completions(draw: st.DrawFn) -> tuple[list[list[tuple[int, int, str]]], int]:
    """Outcomes of a stream's writes in a random completion order, cut into
    the drains the sender takes (each at most WRITE_REPLY_MAX_SEQS, as in
    VolumeServicer.Write), and the stream's max_seqs (1: no batch flag).
    Seqs repeat sometimes (a client may reuse one: tests/test_fuzz_rpc.py)."""
    n = draw(st.integers(0, 700))
    seqs = [draw(st.sampled_from([i + 1, i + 1, i + 1, 0, 2**64 - 1, 7])) for i in range(n)]
    outcomes = []
    for s in seqs:
        code = draw(st.sampled_from([0] * 6 + ERROR_CODES))
        outcomes.append((s, code, f"refused {s}" if code else ""))
    rng = random.Random(draw(st.integers(0, 2**32)))
    rng.shuffle(outcomes)
    drains = []
    i = 0
    while i < len(outcomes):
        k = draw(st.integers(1, WRITE_REPLY_MAX_SEQS))
        drains.append(outcomes[i:i + k])
        i += k
    return drains, draw(st.sampled_from([1, 1, 2, 3, 64, WRITE_REPLY_MAX_SEQS]))


@settings(max_examples=300, deadline=None)
@given(completions())
def test_packed_replies_settle_every_write_exactly_once(case: tuple[list[list[tuple[int, int, str]]], int]) -> None:
    drains, max_seqs = case
    settled: collections.Counter[tuple[int, int, str]] = collections.Counter()
    for ready in drains:
        msgs = pack_write_replies(ready, max_seqs)
        ok = sum(1 for _, code, _ in ready if code == 0)
        errors = len(ready) - ok
        assert len(msgs) == errors + math.ceil(ok / max_seqs)
        for m in msgs:
            wire = pb.WriteReply.FromString(m.SerializeToString())
            got = sc.write_reply_outcomes(wire)
            assert 1 <= len(got) <= max_seqs
            if wire.code != 0:
                assert not wire.more_ok_seqs, "a refusal shares its message"
                assert wire.message == f"refused {wire.client_seq}"
            if max_seqs == 1:
                assert not wire.more_ok_seqs, "batched replies to a client that did not ask"
            settled.update(got)
    want = collections.Counter(o for ready in drains for o in ready)
    assert settled == want


def test_old_style_reply_is_one_outcome() -> None:
    """A reply without more_ok_seqs (an old node, or a refusal) settles its one write."""
    assert sc.write_reply_outcomes(pb.WriteReply(client_seq=5, code=0)) == [(5, 0, "")]
    assert sc.write_reply_outcomes(pb.WriteReply(client_seq=6, code=11, message="past the end")) == [
        (6, 11, "past the end")
    ]


# ---------------------------------------------------------------- end to end


#: Writes sent on one stream while the secondary is stopped (below the
#: primary's window_writes, 256, so that all of them get a seq and wait).
HELD_WRITES = 200
#: How long the writes may wait for the primary to sequence them (s).
SEQUENCE_WAIT_S = 30.0
#: How long the replies may take once the secondary runs again (s).
REPLIES_WAIT_S = 60.0


async def _primary_last_seq(cluster: LocalCluster) -> int:
    st = await sc.node_status(cluster.primary_addr)
    return next(v.last_seq for v in st.volumes if v.name == VOL)


async def _held_stream(cluster: LocalCluster, seed: int, batch: bool) -> tuple[list[pb.WriteReply], dict[int, bytes]]:
    """HELD_WRITES 4 KiB writes on one raw Write stream (seqs 1..N), sent
    while the secondary is SIGSTOPped and released once the primary has
    sequenced them all, so that they complete together. Returns every reply
    read until each write was answered, and the blocks written."""
    rng = random.Random(f"{seed}-{batch}")
    model: dict[int, bytes] = {}
    replies: list[pb.WriteReply] = []
    base = await _primary_last_seq(cluster)
    async with rpc.channel(cluster.primary_addr) as ch:
        call: Any = pbg.VolumeServiceStub(ch).Write()
        cluster.pause("secondary")
        try:
            # Distinct blocks: writes in flight together have no order between them.
            for i, block in enumerate(rng.sample(range(SIZE // BLOCK), HELD_WRITES)):
                data = rng.randbytes(BLOCK)
                model[block] = data
                req = pb.WriteRequest(volume=VOL, client_seq=i + 1, offset=block * BLOCK, data=data)
                if batch and i == 0:
                    req.batch_replies = True
                await call.write(req)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + SEQUENCE_WAIT_S
            while (last := await _primary_last_seq(cluster)) < base + HELD_WRITES:
                assert loop.time() < deadline, (
                    f"the primary sequenced {last - base} of {HELD_WRITES} writes in {SEQUENCE_WAIT_S:g} s")
                await asyncio.sleep(0.05)
        finally:
            cluster.resume("secondary")
        answered = 0
        async with asyncio.timeout(REPLIES_WAIT_S):
            while answered < HELD_WRITES:
                r = await call.read()
                assert r is not grpc.aio.EOF, f"the stream ended after {answered} of {HELD_WRITES} answers"
                replies.append(r)
                answered += 1 + len(r.more_ok_seqs)
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
    return replies, model


@pytest.mark.e2e
async def test_old_client_without_flag_gets_one_reply_per_write_when_a_group_completes(
    cluster_factory: Any, seed: int
) -> None:
    """Fault: SIGSTOP of the secondary while 200 writes are in flight on a
    stream that did not set batch_replies, then SIGCONT (seed in the report)."""
    c: LocalCluster = cluster_factory(primary_args=["--ack-timeout-s", "60"])
    await c.start()
    await c.create_volume(VOL, SIZE)
    replies, model = await _held_stream(c, seed, batch=False)
    assert all(not r.more_ok_seqs for r in replies), "batched replies to a client that did not ask"
    assert all(r.code == 0 for r in replies), [r for r in replies if r.code][:3]
    assert collections.Counter(r.client_seq for r in replies) == collections.Counter(range(1, HELD_WRITES + 1))
    await assert_replicas_identical(c, VOL)
    await check_model(c, VOL, model)


@pytest.mark.e2e
async def test_batched_replies_settle_every_write_once_when_a_group_completes(
    cluster_factory: Any, seed: int
) -> None:
    """Fault: SIGSTOP of the secondary while 200 writes are in flight on a
    stream that set batch_replies, then SIGCONT (seed in the report)."""
    c: LocalCluster = cluster_factory(primary_args=["--ack-timeout-s", "60"])
    await c.start()
    await c.create_volume(VOL, SIZE)
    replies, model = await _held_stream(c, seed, batch=True)
    assert all(r.code == 0 for r in replies), [r for r in replies if r.code][:3]
    settled = collections.Counter(s for r in replies for s, _, _ in sc.write_reply_outcomes(r))
    assert settled == collections.Counter(range(1, HELD_WRITES + 1))
    assert all(1 + len(r.more_ok_seqs) <= WRITE_REPLY_MAX_SEQS for r in replies)
    # The writes completed in a few groups once the secondary ran again; how
    # many is the scheduler's business, so this only says batching happened.
    assert len(replies) < HELD_WRITES, f"{len(replies)} messages for {HELD_WRITES} writes completed together"
    await assert_replicas_identical(c, VOL)
    await check_model(c, VOL, model)
    # The library's own stream asks for batches too, and reads them.
    cl = await c.connect(VOL)
    try:
        await cl.write_many([(b * BLOCK, model[b]) for b in sorted(model)], depth=64)
    finally:
        await cl.close()
    await assert_replicas_identical(c, VOL)
    await check_model(c, VOL, model)
