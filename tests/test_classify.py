"""The secondary's apply/NACK decisions without sockets."""

import errno

import google_crc32c

from syncrep.core.classify import StreamState, nack_code_for_errno
from syncrep.pb import syncrep_pb2 as pb


def rw(seq: int, offset: int, data: bytes, crc: int | None = None) -> pb.ReplicatedWrite:
    return pb.ReplicatedWrite(
        seq=seq, offset=offset, data=data, crc32c=google_crc32c.value(data) if crc is None else crc
    )


def state(epoch: int = 3, next_seq: int = 1) -> StreamState:
    return StreamState(volume="v", epoch=epoch, next_seq=next_seq, size_bytes=1 << 20, block_size=4096)


BLOCK = b"x" * 4096


def test_in_order_writes_are_applied() -> None:
    st = state()
    p = st.plan(3, [rw(1, 0, BLOCK), rw(2, 4096, BLOCK)])
    assert [w.seq for w in p.apply] == [1, 2] and not p.refuse
    assert st.next_seq == 3


def test_checksum_mismatch_is_nacked_and_never_applied() -> None:
    st = state()
    p = st.plan(3, [rw(1, 0, BLOCK, crc=123)])
    assert not p.apply
    assert p.refuse[0].code == pb.NACK_CODE_CHECKSUM_MISMATCH
    assert "crc32c" in p.refuse[0].message


def test_stale_epoch_is_nacked() -> None:
    st = state(epoch=3)
    p = st.plan(2, [rw(1, 0, BLOCK)])
    assert p.refuse[0].code == pb.NACK_CODE_STALE_EPOCH
    assert "epoch 2" in p.refuse[0].message and "epoch 3" in p.refuse[0].message


def test_gap_in_seqs_is_out_of_order() -> None:
    st = state(next_seq=5)
    p = st.plan(3, [rw(7, 0, BLOCK)])
    assert p.refuse[0].code == pb.NACK_CODE_OUT_OF_ORDER


def test_after_a_failure_every_later_write_is_refused_precisely() -> None:
    st = state()
    p = st.plan(3, [rw(1, 0, BLOCK, crc=1), rw(2, 4096, BLOCK), rw(3, 8192, BLOCK)])
    assert not p.apply
    assert [r.code for r in p.refuse] == [
        pb.NACK_CODE_CHECKSUM_MISMATCH,
        pb.NACK_CODE_STREAM_FAILED,
        pb.NACK_CODE_STREAM_FAILED,
    ]
    assert [(r.seq, r.offset, r.length) for r in p.refuse] == [(1, 0, 4096), (2, 4096, 4096), (3, 8192, 4096)]


def test_out_of_range_and_misaligned_are_refused() -> None:
    st = state()
    p = st.plan(3, [rw(1, (1 << 20) - 4096, BLOCK * 2)])
    assert p.refuse[0].code == pb.NACK_CODE_OUT_OF_RANGE
    st = state()
    p = st.plan(3, [rw(1, 100, BLOCK)])
    assert p.refuse[0].code == pb.NACK_CODE_OUT_OF_RANGE


def test_storage_failure_fails_the_whole_group() -> None:
    st = state()
    p = st.plan(3, [rw(1, 0, BLOCK), rw(2, 4096, BLOCK)])
    refused = st.fail_applied(p.apply, nack_code_for_errno(errno.ENOSPC), "disk full")
    assert [(r.seq, r.code) for r in refused] == [(1, pb.NACK_CODE_NO_SPACE), (2, pb.NACK_CODE_NO_SPACE)]
    assert st.plan(3, [rw(3, 0, BLOCK)]).refuse[0].code == pb.NACK_CODE_STREAM_FAILED


def test_errno_classification() -> None:
    assert nack_code_for_errno(errno.ENOSPC) == pb.NACK_CODE_NO_SPACE
    assert nack_code_for_errno(errno.EDQUOT) == pb.NACK_CODE_NO_SPACE
    assert nack_code_for_errno(errno.EIO) == pb.NACK_CODE_IO_ERROR
    assert nack_code_for_errno(None) == pb.NACK_CODE_IO_ERROR
