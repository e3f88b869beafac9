"""The primary's pair record: one value, written whole, read back equal."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from syncrep.blockstore.extents import Extent
from syncrep.core.pair import PairRecord
from syncrep.core.pairstate import PairState
from syncrep.core.vocab import META_AL, META_CLEAN

records = st.builds(
    PairRecord,
    state=st.sampled_from(list(PairState)),
    failed_extents=st.lists(st.builds(Extent, st.integers(0, 2**40), st.integers(1, 2**30))).map(tuple),
    fault_snapshot_id=st.integers(0, 2**31),
    last_error=st.text(),
    clean=st.sampled_from([None, "0", "1"]),
    rollback_to=st.text(),
    al_regions=st.none() | st.lists(st.integers(0, 2**20)).map(tuple),
)


@given(records)
def test_the_record_round_trips_through_the_metadata_table(rec: PairRecord) -> None:
    meta = rec.to_meta()
    assert PairRecord.from_meta(meta.get) == rec


def test_a_new_volume_reads_as_in_sync_with_no_log_and_no_clean_flag() -> None:
    empty: dict[str, str | None] = {}
    rec = PairRecord.from_meta(empty.get)
    assert rec == PairRecord()
    # Absent keys stay absent when written back (None deletes a key): a volume
    # without an activity log is still recognised as one after any write.
    assert rec.to_meta()[META_AL] is None and rec.to_meta()[META_CLEAN] is None


def test_evolve_keeps_every_other_field() -> None:
    rec = PairRecord(state=PairState.DEGRADED, failed_extents=(Extent(0, 4096),), fault_snapshot_id=3,
                     last_error="NACK", clean="0", al_regions=(1, 2))
    later = rec.evolve(al_regions=[1, 2, 5])
    assert later.al_regions == (1, 2, 5)
    assert later.evolve(al_regions=rec.al_regions) == rec
    assert rec.failed_bytes == 4096
