"""The pair state machine: every (state, event) pair, legal and illegal."""

from __future__ import annotations

import itertools

import pytest

from syncrep.core.pairstate import (
    PROTO_PAIR_STATE_PRIMARY_LOST,
    TRANSITIONS,
    IllegalTransition,
    PairEvent,
    PairState,
    is_legal,
    status_proto,
    transition,
)
from syncrep.pb import syncrep_pb2 as pb

S, E = PairState, PairEvent

# The expected table, written out independently of the module's.
LEGAL: dict[tuple[PairState, PairEvent], PairState] = {
    (S.IN_SYNC, E.SECONDARY_FAILED): S.DEGRADED,
    (S.RESYNCING, E.SECONDARY_FAILED): S.DEGRADED,
    (S.DEGRADED, E.SECONDARY_FAILED): S.DEGRADED,
    (S.DEGRADED, E.RESYNC_STARTED): S.RESYNCING,
    (S.RESYNCING, E.RESYNC_FAILED): S.DEGRADED,
    (S.RESYNCING, E.RESYNC_DONE): S.IN_SYNC,
    (S.DEGRADED, E.RESYNC_DONE): S.IN_SYNC,
    (S.IN_SYNC, E.PROMOTED): S.DEGRADED,
    (S.DEGRADED, E.PROMOTED): S.DEGRADED,
    (S.RESYNCING, E.PROMOTED): S.DEGRADED,
    (S.IN_SYNC, E.SWITCHED_OVER): S.IN_SYNC,
    (S.DEGRADED, E.SPLIT_BRAIN_DETECTED): S.SPLIT_BRAIN,
    (S.RESYNCING, E.SPLIT_BRAIN_DETECTED): S.SPLIT_BRAIN,
    (S.SPLIT_BRAIN, E.RESOLVED): S.DEGRADED,
}
ALL_PAIRS = list(itertools.product(PairState, PairEvent))
ILLEGAL = [p for p in ALL_PAIRS if p not in LEGAL]


def test_state_values_are_exactly_the_strings() -> None:
    assert [s.value for s in PairState] == ["in_sync", "degraded", "resyncing", "split_brain"]
    assert isinstance(PairState.IN_SYNC, str)
    assert PairState("degraded") is PairState.DEGRADED


def test_table_is_exactly_the_expected_one() -> None:
    assert TRANSITIONS == LEGAL
    assert len(ALL_PAIRS) == 32
    assert len(ILLEGAL) == 18


@pytest.mark.parametrize(("state", "event"), list(LEGAL), ids=lambda x: str(x))
def test_legal(state: PairState, event: PairEvent) -> None:
    assert transition(state, event) is LEGAL[(state, event)]
    assert is_legal(state, event)


@pytest.mark.parametrize(("state", "event"), ILLEGAL, ids=lambda x: str(x))
def test_illegal(state: PairState, event: PairEvent) -> None:
    assert not is_legal(state, event)
    with pytest.raises(IllegalTransition) as ei:
        transition(state, event)
    msg = str(ei.value)
    assert state.value in msg and event.value in msg
    assert ei.value.state is state and ei.value.event is event


def test_transition_accepts_plain_strings() -> None:
    assert transition("in_sync", "secondary_failed") is S.DEGRADED  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        transition("bogus", "secondary_failed")  # type: ignore[arg-type]


def test_every_state_reachable_and_every_event_used() -> None:
    assert {to for to in LEGAL.values()} == set(PairState)
    assert {ev for (_, ev) in LEGAL} == set(PairEvent)


@pytest.mark.parametrize(
    ("state", "proto"),
    [
        (S.IN_SYNC, pb.PAIR_STATE_IN_SYNC),
        (S.DEGRADED, pb.PAIR_STATE_DEGRADED),
        (S.RESYNCING, pb.PAIR_STATE_RESYNCING),
        (S.SPLIT_BRAIN, pb.PAIR_STATE_SPLIT_BRAIN),
    ],
)
def test_proto_round_trip(state: PairState, proto: int) -> None:
    assert state.to_proto() == proto
    assert PairState.from_proto(proto) is state


@pytest.mark.parametrize("bad", [pb.PAIR_STATE_UNSPECIFIED, pb.PAIR_STATE_PRIMARY_LOST, 6, -1])
def test_from_proto_rejects_unspecified_status_only_and_unknown(bad: int) -> None:
    with pytest.raises(ValueError, match=str(bad)):
        PairState.from_proto(bad)


def test_every_proto_state_maps() -> None:
    status_only = {pb.PAIR_STATE_UNSPECIFIED, pb.PAIR_STATE_PRIMARY_LOST}
    values = {v for _, v in pb.PairState.items() if v not in status_only}
    assert {PairState.from_proto(v).to_proto() for v in values} == values


def test_primary_lost_is_status_only() -> None:
    assert PROTO_PAIR_STATE_PRIMARY_LOST == pb.PAIR_STATE_PRIMARY_LOST
    for s in PairState:
        assert status_proto(s, primary_alive=False) == pb.PAIR_STATE_PRIMARY_LOST
        assert status_proto(s, primary_alive=True) == s.to_proto()


def test_split_brain_leaves_only_by_an_operators_resolve() -> None:
    assert [e for (s, e) in LEGAL if s is S.SPLIT_BRAIN] == [E.RESOLVED]
    # and RESOLVED means nothing outside split brain
    assert [s for (s, e) in LEGAL if e is E.RESOLVED] == [S.SPLIT_BRAIN]


def test_pairstate_module_is_dependency_free() -> None:
    import ast
    import inspect

    import syncrep.core.pairstate as mod

    tree = ast.parse(inspect.getsource(mod))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "enum", "typing"}
