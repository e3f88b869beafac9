"""The pure data-identity rules (syncrep/core/identity.py, docs/FAILOVER.md section 1).

Tables: ``relate`` for every relation (same, local newer, peer newer, split
brain with its common ancestor, empty either side, different uuid, no common
generation); ``stream_refusal`` and ``resync_refusal``; ``next_generation``
keeping at most HISTORY_MAX; metadata and proto round trips. A hypothesis
property: identities built from random sequences of degrades, promotions and
resync adoptions always relate symmetrically (relate(a, b) mirrors relate(b, a)).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from syncrep.core.identity import (
    HISTORY_MAX,
    META_GEN_CURRENT,
    META_GEN_HISTORY,
    META_VOLUME_UUID,
    Identity,
    Relation,
    Relationship,
    relate,
    resync_refusal,
    stream_refusal,
)
from syncrep.pb import syncrep_pb2 as pb

U = "uuid-a"
OTHER = "uuid-b"


def ident(current: int, *history: int, uuid: str = U) -> Identity:
    return Identity(uuid, current, tuple(history))


EMPTY = Identity(U, 0, ())
NOTHING = Identity()  # no uuid either: a node that never had a store


def counter(start: int = 100) -> Callable[[], int]:
    it = itertools.count(start)
    return lambda: next(it)


# ---------------------------------------------------------------- relate

RELATE_CASES: list[tuple[str, Identity, Identity, Relationship]] = [
    ("same generation", ident(5, 1, 2), ident(5, 1, 2), Relationship(Relation.SAME, 5)),
    ("same current, different histories", ident(5, 1), ident(5, 2), Relationship(Relation.SAME, 5)),
    ("local newer: the peer's current is in our history", ident(7, 1, 5), ident(5, 1),
     Relationship(Relation.LOCAL_NEWER, 5)),
    ("peer newer: our current is in the peer's history", ident(5, 1), ident(7, 1, 5),
     Relationship(Relation.PEER_NEWER, 5)),
    ("local newer by several generations", ident(9, 1, 5, 7), ident(5, 1), Relationship(Relation.LOCAL_NEWER, 5)),
    ("split brain: both moved on from 5", ident(7, 1, 5), ident(8, 1, 5), Relationship(Relation.SPLIT_BRAIN, 5)),
    ("split brain: the newest common ancestor wins", ident(7, 1, 3, 5), ident(8, 1, 3, 5, 6),
     Relationship(Relation.SPLIT_BRAIN, 5)),
    ("split brain: the common ancestor is old", ident(7, 1, 4), ident(8, 1, 6), Relationship(Relation.SPLIT_BRAIN, 1)),
    ("local empty (rebuilt, current 0)", EMPTY, ident(5, 1), Relationship(Relation.LOCAL_EMPTY)),
    ("local empty (no uuid at all)", NOTHING, ident(5, 1), Relationship(Relation.LOCAL_EMPTY)),
    ("peer empty", ident(5, 1), EMPTY, Relationship(Relation.PEER_EMPTY)),
    ("peer with no uuid at all", ident(5, 1), NOTHING, Relationship(Relation.PEER_EMPTY)),
    ("both empty compares as local empty", EMPTY, EMPTY, Relationship(Relation.LOCAL_EMPTY)),
    ("different volume uuid", ident(5, 1), ident(5, 1, uuid=OTHER), Relationship(Relation.UNRELATED)),
    ("different uuid beats empty", EMPTY, ident(5, uuid=OTHER), Relationship(Relation.UNRELATED)),
    ("no common generation", ident(5, 1, 2), ident(8, 3, 4), Relationship(Relation.UNRELATED)),
]


@pytest.mark.parametrize("local,peer,want", [c[1:] for c in RELATE_CASES], ids=[c[0] for c in RELATE_CASES])
def test_relate_table(local: Identity, peer: Identity, want: Relationship) -> None:
    assert relate(local, peer) == want


MIRROR = {
    Relation.SAME: Relation.SAME,
    Relation.LOCAL_NEWER: Relation.PEER_NEWER,
    Relation.PEER_NEWER: Relation.LOCAL_NEWER,
    Relation.SPLIT_BRAIN: Relation.SPLIT_BRAIN,
    Relation.LOCAL_EMPTY: Relation.PEER_EMPTY,
    Relation.PEER_EMPTY: Relation.LOCAL_EMPTY,
    Relation.UNRELATED: Relation.UNRELATED,
}


def assert_mirrors(a: Identity, b: Identity) -> None:
    ab, ba = relate(a, b), relate(b, a)
    different_uuids = bool(a.volume_uuid and b.volume_uuid and a.volume_uuid != b.volume_uuid)
    if not a.has_data and not b.has_data and not different_uuids:
        # Both empty: each side sees itself as the empty one (nothing to copy from either way).
        assert ab.relation == ba.relation == Relation.LOCAL_EMPTY
        return
    assert ba.relation == MIRROR[ab.relation], (a, b, ab, ba)
    if ab.relation in (Relation.SAME, Relation.LOCAL_NEWER, Relation.PEER_NEWER):
        assert ab.common == ba.common
    if ab.relation == Relation.SPLIT_BRAIN:
        # The newest common ancestor is the same generation from either side.
        assert ab.common == ba.common != 0


@pytest.mark.parametrize("local,peer", [c[1:3] for c in RELATE_CASES], ids=[c[0] for c in RELATE_CASES])
def test_relate_table_mirrors(local: Identity, peer: Identity) -> None:
    assert_mirrors(local, peer)


# ---------------------------------------------------------------- stream_refusal

STREAM_CASES: list[tuple[str, Identity, Identity, str | None]] = [
    ("same generation: accepted", ident(5, 1), ident(5, 1), None),
    ("secondary behind: needs a resync", ident(5, 1), ident(7, 1, 5), "generation mismatch"),
    ("secondary ahead (it was promoted alone)", ident(7, 1, 5), ident(5, 1), "generation mismatch"),
    ("split brain", ident(7, 5), ident(8, 5), "split_brain"),
    ("secondary empty: needs a full copy", EMPTY, ident(5, 1), "holds no data"),
    ("another volume's store", ident(5, 1, uuid=OTHER), ident(5, 1), "belongs to another volume"),
    ("a store without uuid", NOTHING, ident(5, 1), "belongs to another volume"),
]


@pytest.mark.parametrize("local,primary,needle", [c[1:] for c in STREAM_CASES], ids=[c[0] for c in STREAM_CASES])
def test_stream_refusal_table(local: Identity, primary: Identity, needle: str | None) -> None:
    why = stream_refusal(local, primary, "vol0")
    if needle is None:
        assert why is None
    else:
        assert why is not None and needle in why, why
        assert "'vol0'" in why, "the message names the volume"


# ---------------------------------------------------------------- resync_refusal

RESYNC_CASES: list[tuple[str, Identity, Identity, bool, str | None]] = [
    ("secondary behind: the primary knows its generation", ident(5, 1), ident(7, 1, 5), False, None),
    ("secondary at the primary's current (an interrupted resync)", ident(7, 5), ident(7, 5), False, None),
    ("secondary far behind", ident(1), ident(9, 1, 5, 7), False, None),
    ("secondary empty, full copy", EMPTY, ident(5, 1), True, None),
    ("secondary without uuid, full copy", NOTHING, ident(5, 1), True, None),
    ("secondary empty without full copy", EMPTY, ident(5, 1), False, "only a full copy"),
    ("secondary moved on by itself (split brain)", ident(8, 1, 5), ident(7, 1, 5), False, "syncrep resolve"),
    ("secondary newer than the primary", ident(7, 1, 5), ident(5, 1), False, "would lose this replica's writes"),
    ("unrelated generations", ident(3), ident(7, 5), False, "not in the primary's history"),
    ("split brain even with full copy: it is the caller who chose to copy", ident(8, 5), ident(7, 5), True, None),
    ("primary holds no data", ident(5, 1), EMPTY, False, "never a resync source"),
    ("primary holds no data, full copy", EMPTY, EMPTY, True, "never a resync source"),
    ("another volume's store", ident(5, uuid=OTHER), ident(7, 5), False, "belongs to another volume"),
    ("another volume's store, full copy", ident(5, uuid=OTHER), ident(7, 5), True, "belongs to another volume"),
]


@pytest.mark.parametrize("local,primary,full,needle", [c[1:] for c in RESYNC_CASES],
                         ids=[c[0] for c in RESYNC_CASES])
def test_resync_refusal_table(local: Identity, primary: Identity, full: bool, needle: str | None) -> None:
    why = resync_refusal(local, primary, "vol0", full_copy=full)
    if needle is None:
        assert why is None
    else:
        assert why is not None and needle in why, why
        assert "'vol0'" in why


# ---------------------------------------------------------------- next_generation


def test_next_generation_pushes_current_onto_history() -> None:
    a = ident(5, 1, 2)
    b = a.next_generation(counter(9))
    assert b == ident(9, 1, 2, 5)
    assert a == ident(5, 1, 2), "identities are values"
    assert relate(b, a) == Relationship(Relation.LOCAL_NEWER, 5)


def test_next_generation_keeps_at_most_history_max() -> None:
    a = ident(1)
    gen = counter(2)
    for _ in range(HISTORY_MAX + 10):
        a = a.next_generation(gen)
    assert len(a.history) == HISTORY_MAX
    assert a.current == HISTORY_MAX + 11
    # the oldest generations fell off the front, the newest are kept in order
    assert a.history == tuple(range(11, HISTORY_MAX + 11))
    # a peer still at a generation that fell off looks unrelated: a full copy, slow but correct
    assert relate(ident(1), a).relation == Relation.UNRELATED


def test_next_generation_refuses_empty_and_reused_ids() -> None:
    with pytest.raises(AssertionError):
        EMPTY.next_generation(counter())
    with pytest.raises(AssertionError):
        ident(5, 1).next_generation(lambda: 1)  # already in the history
    with pytest.raises(AssertionError):
        ident(5, 1).next_generation(lambda: 0)


def test_has_data_knows_and_short() -> None:
    assert ident(5).has_data and not EMPTY.has_data and not NOTHING.has_data
    assert not Identity("", 5).has_data, "a generation without the pair's uuid is no data of the pair"
    a = ident(7, 1, 5)
    assert a.knows(7) and a.knows(5) and a.knows(1) and not a.knows(3) and not a.knows(0)
    assert a.short() == "0000000000000007"
    assert EMPTY.short() == "none (no data)"


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("i", [ident(5, 1, 2), EMPTY, NOTHING, ident(2**64 - 1, 2**63, 3)],
                         ids=["data", "empty", "nothing", "large ids"])
def test_meta_round_trip(i: Identity) -> None:
    meta = i.to_meta()
    assert set(meta) == {META_VOLUME_UUID, META_GEN_CURRENT, META_GEN_HISTORY}
    assert Identity.from_meta(meta) == i
    assert Identity.from_meta(meta.get) == i


def test_from_meta_of_a_store_without_identity_keys_is_empty() -> None:
    """A store written before identities existed (or never assigned one) holds no data of any pair."""
    assert Identity.from_meta({}) == NOTHING
    assert not Identity.from_meta({}).has_data


@pytest.mark.parametrize("i", [ident(5, 1, 2), EMPTY, NOTHING, ident(2**64 - 1, 2**63, 3)],
                         ids=["data", "empty", "nothing", "large ids"])
def test_proto_round_trip(i: Identity) -> None:
    msg = pb.Identity(**i.proto_fields())  # type: ignore[arg-type]
    again = Identity.from_proto(pb.Identity.FromString(msg.SerializeToString()))
    assert again == i


def test_from_proto_of_an_unset_field_is_empty() -> None:
    assert Identity.from_proto(pb.StreamOpen().identity) == NOTHING


# ---------------------------------------------------------------- property


@hs.composite
def histories(draw: hs.DrawFn) -> tuple[Identity, Identity]:
    """Two replicas of one pair after a random sequence of: one side writing
    alone (degrade or promotion: next_generation), a resync (the other side
    adopts its identity), a rebuild of one side (empty), or nothing."""
    gen = counter(10)
    start = Identity(U, 1)
    sides = [start, start]
    for step in draw(hs.lists(hs.sampled_from(["alone", "adopt", "rebuild"]), max_size=40)):
        k = draw(hs.integers(0, 1))
        if step == "alone" and sides[k].has_data:
            sides[k] = sides[k].next_generation(gen)
        elif step == "adopt" and sides[1 - k].has_data:
            sides[k] = sides[1 - k]
        elif step == "rebuild" and draw(hs.booleans()):
            sides[k] = Identity(U, 0)
    return sides[0], sides[1]


@settings(max_examples=300, deadline=None)
@given(histories())
def test_relate_mirrors_for_random_histories(pair: tuple[Identity, Identity]) -> None:
    a, b = pair
    assert_mirrors(a, b)
    rel = relate(a, b)
    # consistency with the checks the nodes make
    if rel.relation == Relation.SAME:
        assert stream_refusal(a, b, "v") is None and stream_refusal(b, a, "v") is None
    else:
        assert stream_refusal(a, b, "v") is not None
    if rel.relation == Relation.PEER_NEWER:
        assert resync_refusal(a, b, "v", full_copy=False) is None
    if rel.relation == Relation.SPLIT_BRAIN:
        assert resync_refusal(a, b, "v", full_copy=False) is not None
        assert resync_refusal(b, a, "v", full_copy=False) is not None
    assert len(a.history) <= HISTORY_MAX and len(b.history) <= HISTORY_MAX


def test_reverted_to_drops_the_later_generations() -> None:
    i = Identity("u", 4, (1, 2, 3))
    assert i.reverted_to(2) == Identity("u", 2, (1,))
    assert i.reverted_to(4) == i
    assert i.reverted_to(9) is None and i.reverted_to(0) is None
