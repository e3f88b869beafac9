"""The core vocabulary: limits agree with the transport, one address parser."""

from __future__ import annotations

import pytest

from syncrep import rpc
from syncrep.core import vocab
from syncrep.core.vocab import ResyncMode, parse_address, validate_dial_address


def test_the_largest_write_fits_in_one_grpc_message_with_room_for_framing() -> None:
    # rpc.py (foundation) cannot import the core, so it writes the figure out.
    assert rpc.MAX_MESSAGE_BYTES - vocab.MAX_WRITE_BYTES >= 64 * 1024


@pytest.mark.parametrize(
    ("text", "want"),
    [("127.0.0.1:7001", ("127.0.0.1", 7001)), (" host:0 ", ("host", 0)), ("[::1]:9", ("[::1]", 9))],
)
def test_parse_address(text: str, want: tuple[str, int]) -> None:
    assert parse_address(text) == want


@pytest.mark.parametrize("text", ["", "host", ":7001", "host:", "host:x", "host:70000"])
def test_parse_address_refuses_with_an_example(text: str) -> None:
    with pytest.raises(ValueError, match="invalid address"):
        parse_address(text)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("127.0.0.1:7001", None),
        ("[::1]:7001", None),
        ("node-a.example:1", None),
        ("host:0", "outside 1..65535"),
        ("host:65536", "outside 1..65535"),
        ("host:123456", "not of the form host:port"),
        ("a b:1", "not of the form host:port"),
        ("a:b:1", "not of the form host:port"),
        ("host", "not of the form host:port"),
    ],
)
def test_validate_dial_address(text: str, problem: str | None) -> None:
    got = validate_dial_address(text)
    if problem is None:
        assert got is None
    else:
        assert got is not None and problem in got


def test_resync_mode_from_proto_matches_the_wire_enum() -> None:
    from syncrep.pb import syncrep_pb2 as pb

    assert ResyncMode.from_proto(pb.RESYNC_MODE_REWRITE) is ResyncMode.REWRITE
    assert ResyncMode.from_proto(pb.RESYNC_MODE_DIRECT) is ResyncMode.DIRECT
    assert ResyncMode.from_proto(pb.RESYNC_MODE_UNSPECIFIED) is ResyncMode.DIRECT


def test_snapshot_names_are_recognised_by_their_prefixes() -> None:
    assert vocab.common_snapshot_name(5).startswith(vocab.COMMON_PREFIX)
    assert vocab.fault_snapshot_name("e3", 5) == "fault-e3-5"
    assert vocab.resync_snapshot_name("f1-ab", "d0") == "resync-f1-ab-d0"
    assert vocab.resync_final_snapshot_name("f1-ab", 4) == "resync-f1-ab-final-r4"
    assert vocab.pre_resync_snapshot_name("f1-ab").startswith(vocab.PRE_RESYNC_PREFIX)
