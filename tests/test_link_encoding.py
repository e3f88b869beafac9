"""primary/link.py encode_batch writes the Replicate frame by hand (issue 14,
docs/PERF.md plan item 1): it must be byte for byte what protobuf's
SerializeToString gives for the same message, for every field value,
including zero (omitted) and 64-bit values, empty payloads and many writes,
zero ranges (``Zeros``, issue 14) mixed with payloads, and the secondary must
parse it back to the same writes."""

from __future__ import annotations

import google_crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from primary.link import Payload, Zeros, encode_batch
from syncrep.pb import syncrep_pb2 as pb

U64 = st.integers(min_value=0, max_value=2**64 - 1)
PAYLOADS = st.one_of(st.binary(max_size=9000), st.builds(Zeros, U64))
WRITES = st.lists(st.tuples(U64, U64, PAYLOADS), max_size=40)


def message(s: int, o: int, d: Payload) -> pb.ReplicatedWrite:
    if isinstance(d, Zeros):
        return pb.ReplicatedWrite(seq=s, offset=o, zero_length=d.length)
    return pb.ReplicatedWrite(seq=s, offset=o, data=d, crc32c=google_crc32c.value(d))


def reference(epoch: int, writes: list[tuple[int, int, Payload]]) -> bytes:
    batch = pb.WriteBatch(epoch=epoch, writes=[message(s, o, d) for s, o, d in writes])
    return pb.ReplicateRequest(batch=batch).SerializeToString()


@settings(max_examples=400, deadline=None)
@given(epoch=U64, writes=WRITES)
def test_encode_batch_equals_protobuf(epoch: int, writes: list[tuple[int, int, Payload]]) -> None:
    frame = encode_batch(epoch, writes)
    assert frame == reference(epoch, writes)
    parsed = pb.ReplicateRequest.FromString(frame)
    assert parsed.WhichOneof("kind") == "batch"
    assert parsed.batch.epoch == epoch
    assert [(w.seq, w.offset, w.data, w.crc32c, w.zero_length) for w in parsed.batch.writes] == [
        (s, o, b"", 0, d.length) if isinstance(d, Zeros) else (s, o, d, google_crc32c.value(d), 0)
        for s, o, d in writes
    ]


def test_encode_batch_large_payloads() -> None:
    """1 MiB payloads (multi-byte length varints) and the empty batch."""
    big: list[tuple[int, int, Payload]] = [
        (1, 0, bytes(range(256)) * 4096), (2, 1 << 40, b"\xff" * (1 << 20) + b"x"), (3, 4096, Zeros(64 << 30)),
    ]
    assert encode_batch(7, big) == reference(7, big)
    assert encode_batch(0, []) == reference(0, [])
