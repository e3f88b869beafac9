"""The node shell and the secondary under data identity (docs/FAILOVER.md).

What a node does with its stores when the coordinator assigns a volume:
create one only when told (``VolumeAssignment.create``), report and never serve
a missing or unrelated one, set aside (never delete) what a rebuild replaces,
keep data of the pair that came back. What the secondary accepts: a
replication stream only at its own generation, a resync only from a primary
that is a source for it; it adopts the primary's identity with the final
round's completion. Promotion and demotion as the node persists them.

Real block stores in tmp dirs, the real registry, receiver and servicer; a
real ``Node`` without a coordinator where the node's own logic is under test,
with ``PrimaryVolume`` replaced by a recorder where the test is about what the
node hands the write path (the write path itself is tested elsewhere).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import google_crc32c
import pytest

import syncrep.node as node_mod
from secondary.replica import ReplicaServicer
from secondary.resync import ResyncReceiver, ResyncState
from syncrep.blockstore import BlockStore, Extent
from syncrep.config import NodeOptions
from syncrep.core.activity import AL_REGION_BYTES
from syncrep.core.identity import Identity
from syncrep.core.pair import PairRecord
from syncrep.core.pairstate import PairState
from syncrep.core.receiver import Header, divergent_extents, header_refusal
from syncrep.core.vocab import META_NODE_DIVERGENT, META_NODE_PROMOTE_PENDING
from syncrep.errors import FailedPrecondition, NotFound
from syncrep.nbd.server import NodeExports
from syncrep.node import Node
from syncrep.pb import syncrep_pb2 as pb
from syncrep.volumes import SET_ASIDE_DIR, DataMissing, VolumeRegistry

VOL = "vol0"
BLOCK = 4096
SIZE = 16 << 20  # four activity-log regions
UUID = "1d3e5f70-0000-4000-8000-000000000001"
OTHER_UUID = "1d3e5f70-0000-4000-8000-0000000000ff"
GEN = 0x1111
NEWER = 0x2222


def ident(uuid: str = UUID, current: int = GEN, history: tuple[int, ...] = ()) -> pb.Identity:
    return pb.Identity(volume_uuid=uuid, current=current, history=list(history))


def assignment(role: int = pb.ROLE_SECONDARY, epoch: int = 1, *, create: bool = False, uuid: str = UUID,
               current: int = 0, peer: str = "peer.invalid:1") -> pb.VolumeAssignment:
    return pb.VolumeAssignment(
        spec=pb.VolumeSpec(name=VOL, size_bytes=SIZE, block_size=BLOCK), role=role, epoch=epoch,  # type: ignore[arg-type]
        peer_address=peer, identity=pb.Identity(volume_uuid=uuid, current=current), create=create,
    )


def new_volume(role: int = pb.ROLE_SECONDARY, epoch: int = 1, uuid: str = UUID) -> pb.VolumeAssignment:
    return assignment(role, epoch, create=True, uuid=uuid, current=GEN)


def rebuild(role: int = pb.ROLE_SECONDARY, epoch: int = 2) -> pb.VolumeAssignment:
    return assignment(role, epoch, create=True, current=0)


@pytest.fixture
def registry(tmp_path: Path) -> Any:
    reg = VolumeRegistry(tmp_path, "os")
    yield reg
    reg.close()


def reopen(reg: VolumeRegistry) -> VolumeRegistry:
    root = reg.root.parent
    reg.close()
    new = VolumeRegistry(root, "os")
    new.open_existing()
    return new


# ---------------------------------------------------------------- assignments: no data here


@pytest.mark.parametrize("role", [pb.ROLE_SECONDARY, pb.ROLE_PRIMARY])
def test_empty_data_dir_assignment_creates_nothing_and_reports_data_missing(
    registry: VolumeRegistry, role: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    with pytest.raises(DataMissing) as e:
        registry.assign(assignment(role, epoch=3))
    assert e.value.code.name == "FAILED_PRECONDITION"
    assert not (registry.root / VOL).exists(), "a store was created without create"
    assert VOL not in registry.volumes
    m = registry.missing[VOL]
    assert m.assignment.epoch == 3 and "there is no folder" in m.problem
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "has no data for it" in errors[0] and "at epoch 3" in errors[0], errors
    # Never served: every local access names the problem.
    with pytest.raises(FailedPrecondition, match="not served here"):
        registry.get(VOL)
    with pytest.raises(FailedPrecondition, match="has no data on this node"):
        ReplicaServicer(registry).accept_stream(
            pb.StreamOpen(volume=pb.VolumeSpec(name=VOL, size_bytes=SIZE, block_size=BLOCK), epoch=3,
                          identity=ident()))


def test_missing_volume_error_is_logged_once_per_interval(
    registry: VolumeRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    for _ in range(5):  # five heartbeats
        with pytest.raises(DataMissing):
            registry.assign(assignment())
    assert sum(r.levelno == logging.ERROR for r in caplog.records) == 1


def test_empty_folder_is_missing_data_and_left_alone(registry: VolumeRegistry) -> None:
    (registry.root / VOL).mkdir()
    with pytest.raises(DataMissing):
        registry.assign(assignment())
    assert "the folder is empty" in registry.missing[VOL].problem
    assert list((registry.root / VOL).iterdir()) == []


def test_unrelated_store_is_refused_reported_and_not_served(registry: VolumeRegistry) -> None:
    registry.assign(new_volume(uuid=OTHER_UUID))
    registry = reopen(registry)
    try:
        with pytest.raises(DataMissing, match=f"belongs to volume UUID {OTHER_UUID}, the pair is {UUID}"):
            registry.assign(assignment(epoch=2))
        assert VOL not in registry.volumes and VOL in registry.missing
        # Untouched on disk: an operator may still want it.
        assert BlockStore.exists(registry.root / VOL)
    finally:
        registry.close()


def test_store_without_volume_uuid_is_unrelated(registry: VolumeRegistry) -> None:
    BlockStore.create(registry.root / VOL, SIZE, BLOCK, durability="os", name=VOL).close()
    with pytest.raises(DataMissing, match=r"belongs to volume UUID \(none\)"):
        registry.assign(assignment())


def test_assignment_without_volume_uuid_is_invalid(registry: VolumeRegistry) -> None:
    with pytest.raises(Exception, match="carries no volume UUID"):
        registry.assign(assignment(uuid=""))


def test_data_back_in_place_is_served_again(registry: VolumeRegistry, tmp_path: Path) -> None:
    registry.assign(new_volume())
    registry.close()
    moved = tmp_path / "elsewhere"
    (registry.root / VOL).rename(moved)
    reg = VolumeRegistry(tmp_path, "os")
    try:
        reg.open_existing()
        with pytest.raises(DataMissing):
            reg.assign(assignment(epoch=2))
        moved.rename(reg.root / VOL)
        lv, _ = reg.assign(assignment(epoch=2))
        assert VOL not in reg.missing and lv.identity == Identity(UUID, GEN)
    finally:
        reg.close()


# ---------------------------------------------------------------- assignments: create


def test_new_volume_create_persists_identity_and_is_idempotent(registry: VolumeRegistry) -> None:
    lv, changed = registry.assign(new_volume())
    assert changed and lv.identity == Identity(UUID, GEN)
    again, changed = registry.assign(new_volume())
    assert again is lv and not changed
    registry = reopen(registry)
    try:
        lv = registry.get(VOL)
        assert lv.identity == Identity(UUID, GEN) and lv.role == pb.ROLE_SECONDARY and lv.epoch == 1
        _, changed = registry.assign(new_volume())  # a CreateVolume retried after a restart
        assert not changed
    finally:
        registry.close()


def test_new_volume_create_over_another_volumes_store_is_refused(registry: VolumeRegistry) -> None:
    registry.assign(new_volume(uuid=OTHER_UUID))
    with pytest.raises(FailedPrecondition, match=f"already holds a store of volume UUID {OTHER_UUID}"):
        registry.assign(new_volume())
    assert registry.get(VOL).identity.volume_uuid == OTHER_UUID


def test_new_volume_create_over_a_foreign_folder_is_refused(registry: VolumeRegistry) -> None:
    (registry.root / VOL).mkdir()
    (registry.root / VOL / "notes.txt").write_text("not a store")
    with pytest.raises(FailedPrecondition, match="holds files that are no usable volume store"):
        registry.assign(new_volume())
    assert (registry.root / VOL / "notes.txt").read_text() == "not a store"


def test_rebuild_sets_an_unrelated_store_aside_and_creates_an_empty_one(registry: VolumeRegistry) -> None:
    lv, _ = registry.assign(new_volume(uuid=OTHER_UUID))
    lv.store.write(0, b"\x07" * BLOCK)
    with pytest.raises(DataMissing):
        registry.assign(assignment(epoch=2))  # the heartbeat before the rebuild: reported
    lv, changed = registry.assign(rebuild())
    assert changed and lv.identity == Identity(UUID, 0) and not lv.identity.has_data
    assert lv.store.read(0, BLOCK) == bytes(BLOCK)
    assert VOL not in registry.missing
    aside = list((registry.root / SET_ASIDE_DIR).iterdir())
    assert len(aside) == 1 and aside[0].name.startswith(f"{VOL}-")
    old = BlockStore.open(aside[0], durability="os")
    try:
        assert old.read(0, BLOCK) == b"\x07" * BLOCK, "the set-aside store lost its data"
    finally:
        old.close()
    # Persisted, and the set-aside folder is no volume of this node.
    registry = reopen(registry)
    try:
        assert set(registry.volumes) == {VOL}
        assert registry.get(VOL).identity == Identity(UUID, 0)
    finally:
        registry.close()


def test_rebuild_over_a_missing_folder_creates_an_empty_store(registry: VolumeRegistry) -> None:
    lv, changed = registry.assign(rebuild())
    assert changed and lv.identity == Identity(UUID, 0)
    assert not (registry.root / SET_ASIDE_DIR).exists()


def test_rebuild_keeps_a_same_uuid_store_with_data(registry: VolumeRegistry) -> None:
    lv, _ = registry.assign(new_volume())
    lv.store.write(0, b"\x09" * BLOCK)
    lv, changed = registry.assign(rebuild(epoch=2))
    assert lv.identity == Identity(UUID, GEN), "data of the pair was replaced"
    assert lv.store.read(0, BLOCK) == b"\x09" * BLOCK and lv.epoch == 2 and not changed
    assert not (registry.root / SET_ASIDE_DIR).exists()


def test_spec_mismatch_is_still_refused(registry: VolumeRegistry) -> None:
    registry.assign(new_volume())
    a = assignment(epoch=2)
    a.spec.size_bytes = SIZE * 2
    with pytest.raises(FailedPrecondition, match="bytes with"):
        registry.assign(a)


# ---------------------------------------------------------------- the secondary: streams


def stream_open(identity: pb.Identity, epoch: int = 2) -> pb.StreamOpen:
    return pb.StreamOpen(volume=pb.VolumeSpec(name=VOL, size_bytes=SIZE, block_size=BLOCK), epoch=epoch,
                         first_seq=1, identity=identity)


def test_stream_open_at_the_same_generation_is_accepted(registry: VolumeRegistry) -> None:
    registry.assign(new_volume())
    lv, token = ReplicaServicer(registry).accept_stream(stream_open(ident()))
    assert token == 1 and lv.epoch == 2


@pytest.mark.parametrize(
    "primary",
    [ident(current=NEWER, history=(GEN,)), ident(current=NEWER), ident(uuid=OTHER_UUID), ident(current=0),
     pb.Identity()],
    ids=["primary_newer", "split_brain_or_unrelated_generation", "other_volume_uuid", "primary_empty",
         "no_identity"],
)
def test_stream_open_with_another_generation_is_refused_before_fencing(
    registry: VolumeRegistry, primary: pb.Identity
) -> None:
    lv, _ = registry.assign(new_volume())
    with pytest.raises(FailedPrecondition, match=f"volume '{VOL}'"):
        ReplicaServicer(registry).accept_stream(stream_open(primary))
    assert lv.stream_token == 0 and lv.epoch == 1, "a refused stream fenced or adopted its epoch"


def test_stream_open_to_an_empty_rebuilt_replica_is_refused(registry: VolumeRegistry) -> None:
    registry.assign(rebuild())
    with pytest.raises(FailedPrecondition, match="holds no data yet"):
        ReplicaServicer(registry).accept_stream(stream_open(ident(), epoch=3))


# ---------------------------------------------------------------- the secondary: resync


def resync_header(identity: pb.Identity, *, epoch: int = 2, final: bool = True, full_copy: bool = False,
                  kind: str = "diff", resync_id: str = "r1") -> pb.ResyncHeader:
    return pb.ResyncHeader(volume=pb.VolumeSpec(name=VOL, size_bytes=SIZE, block_size=BLOCK), epoch=epoch,
                           resync_id=resync_id, round=1, kind=kind, final=final, identity=identity,
                           full_copy=full_copy)


@pytest.mark.parametrize(
    "primary",
    [ident(current=0x0999), ident(current=0x0999, history=(0x0777,)), ident(uuid=OTHER_UUID, current=NEWER,
                                                                             history=(GEN,)), ident(current=0)],
    ids=["older_or_diverged_primary", "unrelated_history", "other_volume_uuid", "primary_without_data"],
)
def test_resync_header_from_an_older_or_unrelated_primary_is_refused(
    registry: VolumeRegistry, primary: pb.Identity
) -> None:
    lv, _ = registry.assign(new_volume())
    receiver = ResyncReceiver(registry)
    with pytest.raises(FailedPrecondition, match=f"volume '{VOL}'"):
        receiver.begin(lv, resync_header(primary))
    assert ResyncState.load(lv) == ResyncState(), "a refused resync left state behind"
    assert lv.store.list_snapshots() == [], "a refused resync took a rollback point"


def test_resync_from_a_newer_primary_is_accepted(registry: VolumeRegistry) -> None:
    lv, _ = registry.assign(new_volume())
    st, resume = ResyncReceiver(registry).begin(lv, resync_header(ident(current=NEWER, history=(GEN,))))
    assert st.resync_id == "r1" and resume == 0


def test_empty_replica_accepts_only_a_full_copy(registry: VolumeRegistry) -> None:
    lv, _ = registry.assign(rebuild())
    receiver = ResyncReceiver(registry)
    with pytest.raises(FailedPrecondition, match="only a full copy"):
        receiver.begin(lv, resync_header(ident(current=NEWER), epoch=3))
    st, _ = receiver.begin(lv, resync_header(ident(current=NEWER), epoch=3, full_copy=True))
    assert st.in_progress and st.pre_snapshot_id  # the empty store's rollback point: fine


def test_repair_needs_the_same_generation() -> None:
    repair = Header("", 1, "repair")
    assert header_refusal(Identity(UUID, GEN), Identity(UUID, GEN), VOL, repair, full_copy=False) is None
    why = header_refusal(Identity(UUID, GEN), Identity(UUID, NEWER, (GEN,)), VOL, repair, full_copy=False)
    assert why is not None and "repair refused" in why


def test_final_round_adopts_the_primary_identity_and_clears_divergent(registry: VolumeRegistry) -> None:
    lv, _ = registry.assign(new_volume())
    lv.store.meta_set({META_NODE_DIVERGENT: json.dumps([[0, BLOCK]])})
    registry = reopen(registry)
    try:
        lv = registry.get(VOL)
        assert lv.divergent == [Extent(0, BLOCK)]
        primary = ident(current=NEWER, history=(GEN,))
        receiver = ResyncReceiver(registry)
        st, _ = receiver.begin(lv, resync_header(primary))
        receiver.finish(lv, st, 2, Identity.from_proto(primary))
        adopted = Identity(UUID, NEWER, (GEN,))
        assert lv.identity == adopted and lv.divergent == []
        registry = reopen(registry)
        lv = registry.get(VOL)
        assert lv.identity == adopted and lv.divergent == []
        assert lv.store.meta_get(META_NODE_DIVERGENT) is None
        assert ResyncState.load(lv).complete
    finally:
        registry.close()


def test_crash_before_completion_keeps_the_old_identity(registry: VolumeRegistry) -> None:
    """The completion transaction is what adopts: a resync that stopped
    before it leaves the identity as it was, and the resumed resync is
    still accepted."""
    lv, _ = registry.assign(new_volume())
    primary = ident(current=NEWER, history=(GEN,))
    ResyncReceiver(registry).begin(lv, resync_header(primary))
    registry = reopen(registry)
    try:
        lv = registry.get(VOL)
        assert lv.identity == Identity(UUID, GEN)
        st, _ = ResyncReceiver(registry).begin(lv, resync_header(primary))
        assert st.resync_id == "r1" and st.in_progress
    finally:
        registry.close()


# ---------------------------------------------------------------- demotion (pure)


def test_divergent_extents_are_the_activity_log_failed_and_written_alone() -> None:
    rec = PairRecord(failed_extents=(Extent(AL_REGION_BYTES + 8192, 4096),), al_regions=(0, 3))
    got = divergent_extents(rec, SIZE, written_alone=[Extent(2 * AL_REGION_BYTES, 4096)],
                            already=[Extent(4096, 4096)])
    assert got == [Extent(0, AL_REGION_BYTES), Extent(AL_REGION_BYTES + 8192, 4096),
                   Extent(2 * AL_REGION_BYTES, 4096), Extent(3 * AL_REGION_BYTES, AL_REGION_BYTES)]


def test_divergent_extents_are_clipped_to_the_volume() -> None:
    rec = PairRecord(al_regions=(0,))
    assert divergent_extents(rec, 1 << 20) == [Extent(0, 1 << 20)]


# ---------------------------------------------------------------- the node


class RecordingPrimary:
    """Stands in for PrimaryVolume: records what the node handed it."""

    started: list[RecordingPrimary] = []

    def __init__(self, lv: Any, options: Any, address: str, reporter: Any, budget: Any = None) -> None:
        self.lv = lv
        self.budget = budget  # the node's ResyncBudget, shared by its primaries
        self.leases: list[tuple[pb.Lease, float]] = []
        self.stopped = False
        self.promote_pending_at_start: str | None = None
        self.role_at_start = 0

    async def start(self) -> None:
        self.promote_pending_at_start = self.lv.store.meta_get(META_NODE_PROMOTE_PENDING)
        self.role_at_start = int(self.lv.store.meta_get("node.role") or 0)
        RecordingPrimary.started.append(self)

    async def stop(self) -> None:
        self.stopped = True

    def on_lease(self, lease: pb.Lease, sent_at: float) -> None:
        self.leases.append((lease, sent_at))

    def report(self) -> pb.VolumeReport:
        return pb.VolumeReport(name=self.lv.name, role=pb.ROLE_PRIMARY, epoch=self.lv.epoch)


@pytest.fixture
async def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    RecordingPrimary.started = []
    monkeypatch.setattr(node_mod, "PrimaryVolume", RecordingPrimary)
    n = Node("secondary", "127.0.0.1:0", tmp_path, "127.0.0.1:1", None, NodeOptions(durability="os"))
    yield n
    n.registry.close()


async def test_node_reports_missing_volume_and_serves_nothing(node: Node) -> None:
    with pytest.raises(DataMissing):
        await node.assign(assignment(pb.ROLE_PRIMARY, epoch=4))
    assert node.primaries == {} and RecordingPrimary.started == []
    (r,) = node.reports()
    assert r.name == VOL and r.data_missing and "no folder" in r.data_problem
    assert r.role == pb.ROLE_PRIMARY and r.epoch == 4 and r.size_bytes == SIZE and r.block_size == BLOCK
    with pytest.raises(FailedPrecondition, match="not served here"):
        node.primary(VOL)
    # The heartbeat path swallows it (logged by the registry, reported above).
    await node._apply_assignments([assignment(pb.ROLE_PRIMARY, epoch=4)])
    assert node.primaries == {} and VOL in node.registry.missing
    # No longer assigned here (moved, deleted): no longer reported.
    await node._apply_assignments([])
    assert node.reports() == []


async def test_node_reports_secondary_identity_and_divergent_extents(node: Node) -> None:
    lv, _ = node.registry.assign(new_volume())
    lv.divergent = [Extent(0, BLOCK)]
    (r,) = node.reports()
    assert not r.data_missing and Identity.from_proto(r.identity) == Identity(UUID, GEN)
    assert [(e.offset, e.length) for e in r.divergent_extents] == [(0, BLOCK)]


async def test_promotion_persists_promote_pending_with_the_role(node: Node) -> None:
    await node.assign(new_volume(pb.ROLE_SECONDARY, epoch=1))
    await node.assign(assignment(pb.ROLE_PRIMARY, epoch=2))
    (pv,) = RecordingPrimary.started
    assert pv.promote_pending_at_start == "1" and pv.role_at_start == pb.ROLE_PRIMARY
    assert node.primaries[VOL] is pv


async def test_promotion_rolls_back_an_incomplete_resync_first(node: Node) -> None:
    lv, _ = node.registry.assign(new_volume(pb.ROLE_SECONDARY, epoch=1))
    lv.store.write(0, b"\x01" * BLOCK)
    primary = ident(current=NEWER, history=(GEN,))
    receiver = node.resync_receiver
    st, _ = receiver.begin(lv, resync_header(primary, final=False))
    # Half a resync applied: no consistent state.
    data = b"\x02" * BLOCK
    chunk = pb.ResyncChunk(index=0, offset=0, data=data, crc32c=google_crc32c.value(data))
    receiver._write_group(lv, [chunk], st, "1:diff:0:0", 1)
    assert lv.store.read(0, BLOCK) == data
    await node.assign(assignment(pb.ROLE_PRIMARY, epoch=3))
    assert lv.store.read(0, BLOCK) == b"\x01" * BLOCK, "the half-applied resync was not rolled back"
    assert not ResyncState.load(lv).in_progress
    (pv,) = RecordingPrimary.started
    assert pv.promote_pending_at_start == "1"


async def test_demotion_persists_divergent_extents_from_the_activity_log(node: Node) -> None:
    lv, _ = node.registry.assign(new_volume(pb.ROLE_PRIMARY, epoch=1))
    await node.assign(new_volume(pb.ROLE_PRIMARY, epoch=1))
    pv = node.primaries[VOL]
    far = 2 * AL_REGION_BYTES + 8 * BLOCK
    rec = PairRecord(state=PairState.DEGRADED, failed_extents=(Extent(far, BLOCK),), al_regions=(0,), clean="0")
    lv.store.meta_set(rec.to_meta())
    await node.assign(assignment(pb.ROLE_SECONDARY, epoch=2, peer="new-primary:1"))
    assert isinstance(pv, RecordingPrimary) and pv.stopped and VOL not in node.primaries
    want = [Extent(0, AL_REGION_BYTES), Extent(far, BLOCK)]
    assert lv.divergent == want
    assert json.loads(lv.store.meta_get(META_NODE_DIVERGENT) or "[]") == [[0, AL_REGION_BYTES], [far, BLOCK]]
    assert PairRecord.from_meta(lv.store.meta_get) == PairRecord(), "the primary record was not reset"
    assert lv.role == pb.ROLE_SECONDARY and lv.epoch == 2
    (r,) = node.reports()
    assert [(e.offset, e.length) for e in r.divergent_extents] == [(0, AL_REGION_BYTES), (far, BLOCK)]


async def test_demotion_includes_writes_since_the_fault_snapshot(node: Node) -> None:
    lv, _ = node.registry.assign(new_volume(pb.ROLE_PRIMARY, epoch=1))
    snap = lv.store.create_snapshot("fault-test").id
    lv.store.write(3 * AL_REGION_BYTES, b"\x05" * BLOCK)  # written alone, degraded
    lv.store.meta_set(PairRecord(state=PairState.DEGRADED, fault_snapshot_id=snap, al_regions=()).to_meta())
    await node.assign(assignment(pb.ROLE_SECONDARY, epoch=2))
    assert lv.divergent == [Extent(3 * AL_REGION_BYTES, BLOCK)]


async def test_demotion_after_unforced_promotion_reverts_an_unconfirmed_generation(node: Node) -> None:
    """An isolated primary went degraded on its own (new generation NEWER) but
    no lease let it acknowledge anything alone; the coordinator promoted the
    in-sync secondary at GEN. Demoted, it goes back to GEN (its writes since
    are divergent extents), so the pair is not reported split-brained."""
    lv, _ = node.registry.assign(new_volume(pb.ROLE_PRIMARY, epoch=1))
    snap = lv.store.create_snapshot("fault-isolated").id
    lv.store.write(3 * AL_REGION_BYTES, b"\x07" * BLOCK)  # applied locally, never acknowledged
    newer = Identity(UUID, NEWER, (GEN,))
    lv.store.meta_set({**PairRecord(state=PairState.DEGRADED, fault_snapshot_id=snap, al_regions=()).to_meta(),
                       **newer.to_meta()})
    lv.identity = newer
    a = assignment(pb.ROLE_SECONDARY, epoch=2)
    a.revert_to_generation = GEN
    await node.assign(a)
    assert lv.identity == Identity(UUID, GEN, ())
    assert Identity.from_meta(lv.store.meta_get) == Identity(UUID, GEN, ()), "not persisted with the demotion"
    assert lv.divergent == [Extent(3 * AL_REGION_BYTES, BLOCK)]


async def test_demotion_without_revert_keeps_its_generation(node: Node) -> None:
    lv, _ = node.registry.assign(new_volume(pb.ROLE_PRIMARY, epoch=1))
    newer = Identity(UUID, NEWER, (GEN,))
    lv.store.meta_set(newer.to_meta())
    lv.identity = newer
    await node.assign(assignment(pb.ROLE_SECONDARY, epoch=2))
    assert lv.identity == newer and Identity.from_meta(lv.store.meta_get) == newer


async def test_leases_go_to_the_primary_with_the_send_time(node: Node) -> None:
    await node.assign(new_volume(pb.ROLE_PRIMARY, epoch=1))
    node._on_leases([pb.Lease(volume=VOL, lease_s=5.0), pb.Lease(volume="other", lease_s=5.0)], 12.5)
    pv = node.primaries[VOL]
    assert isinstance(pv, RecordingPrimary)
    assert [(lease.volume, sent_at) for lease, sent_at in pv.leases] == [(VOL, 12.5)]


async def test_node_start_starts_no_primary_before_the_coordinator_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    RecordingPrimary.started = []
    monkeypatch.setattr(node_mod, "PrimaryVolume", RecordingPrimary)
    reg = VolumeRegistry(tmp_path, "os")
    reg.assign(new_volume(pb.ROLE_PRIMARY, epoch=1))
    reg.close()
    # The coordinator address answers nothing: registration never succeeds.
    n = Node("primary", "127.0.0.1:0", tmp_path, "127.0.0.1:1", None, NodeOptions(durability="os"))
    await n.start()
    try:
        assert VOL in n.registry.volumes and n.registry.volumes[VOL].role == pb.ROLE_PRIMARY
        assert n.primaries == {} and RecordingPrimary.started == []
        with pytest.raises(FailedPrecondition, match="not its primary"):
            n.primary(VOL)
        # The first registration's assignment starts it (unchanged role and epoch).
        await n._apply_assignments([assignment(pb.ROLE_PRIMARY, epoch=1)])
        assert VOL in n.primaries and len(RecordingPrimary.started) == 1
        assert RecordingPrimary.started[0].promote_pending_at_start is None
    finally:
        await n.stop(0)


async def test_unknown_volume_is_not_found(node: Node) -> None:
    with pytest.raises(NotFound):
        node.primary("nope")


async def test_nbd_does_not_export_an_empty_rebuilt_replica(registry: VolumeRegistry) -> None:
    exports = NodeExports({}, registry, "os")
    lv, _ = registry.assign(rebuild())
    assert await exports.open(VOL) is None and VOL not in await exports.names()
    lv.identity = Identity(UUID, NEWER)  # as a completed full copy leaves it
    backend = await exports.open(VOL)
    assert backend is not None and VOL in await exports.names()
    backend.close()


async def test_empty_rebuilt_replica_is_never_promoted(node: Node) -> None:
    await node.assign(rebuild(pb.ROLE_SECONDARY, epoch=2))
    with pytest.raises(FailedPrecondition, match="holds no data of the pair"):
        await node.assign(assignment(pb.ROLE_PRIMARY, epoch=3))
    lv = node.registry.get(VOL)
    assert RecordingPrimary.started == [] and lv.role == pb.ROLE_SECONDARY and lv.epoch == 2
    assert lv.store.meta_get(META_NODE_PROMOTE_PENDING) is None
    with pytest.raises(FailedPrecondition, match="not its primary"):
        node.primary(VOL)


async def test_empty_store_assigned_primary_serves_nothing(node: Node) -> None:
    with pytest.raises(FailedPrecondition, match="holds no data of the pair"):
        await node.assign(rebuild(pb.ROLE_PRIMARY, epoch=2))
    assert RecordingPrimary.started == [] and node.primaries == {}
    with pytest.raises(FailedPrecondition, match="holds no data of the pair"):
        node.primary(VOL)


def _corrupt_store(path: Path) -> None:
    """A store whose metadata database is garbage (a damaged disk)."""
    BlockStore.create(path, SIZE, BLOCK, durability="os", name=VOL).close()
    (path / "meta.sqlite3").write_bytes(b"not a database" * 100)


def test_unopenable_store_is_missing_data_and_a_rebuild_sets_it_aside(tmp_path: Path) -> None:
    reg = VolumeRegistry(tmp_path, "os")
    try:
        _corrupt_store(reg.root / VOL)
        assert reg.open_existing() == []
        with pytest.raises(DataMissing, match="cannot be opened"):
            reg.assign(assignment())
        with pytest.raises(FailedPrecondition, match="no usable volume store"):
            reg.assign(new_volume())
        lv, _ = reg.assign(rebuild())
        assert lv.identity == Identity(UUID, 0)
        assert len(list((reg.root / SET_ASIDE_DIR).iterdir())) == 1
    finally:
        reg.close()


async def test_a_failing_assignment_is_logged_once_per_interval(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    await node.assign(rebuild(pb.ROLE_SECONDARY, epoch=2))
    caplog.set_level(logging.ERROR)
    for _ in range(4):  # four heartbeats: the empty replica is never promoted
        await node._apply_assignments([assignment(pb.ROLE_PRIMARY, epoch=3)])
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "holds no data of the pair" in errors[0], errors
