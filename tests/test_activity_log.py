"""The activity log without I/O: which regions may differ after a primary crash."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncrep.blockstore import Extent
from syncrep.core.activity import ActivityLog

MiB = 1 << 20


def test_regions_for_covers_every_touched_region() -> None:
    al = ActivityLog(region_bytes=4 * MiB, max_regions=8)
    assert al.regions_for([(0, 4096)]) == {0}
    assert al.regions_for([(4 * MiB - 4096, 8192)]) == {0, 1}
    assert al.regions_for([(9 * MiB, 4 * MiB)]) == {2, 3}


def test_idle_lru_regions_are_evicted_busy_ones_never() -> None:
    al = ActivityLog(region_bytes=MiB, max_regions=2)
    al.add({0})
    al.acquire({0})  # a write to region 0 is in flight
    al.add({1})
    al.acquire({1})
    al.release({1})
    evicted = al.add({2})  # full: region 1 is idle, region 0 is busy
    assert evicted == [1]
    assert sorted(al.regions()) == [0, 2]
    al.acquire({2})
    assert al.add({3}) == []  # everything busy: the log grows rather than lie
    assert sorted(al.regions()) == [0, 2, 3]


def test_acquire_outside_the_log_is_a_bug() -> None:
    al = ActivityLog(region_bytes=MiB, max_regions=2)
    with pytest.raises(AssertionError, match="not in the activity log"):
        al.acquire({5})
    al.add({5})
    with pytest.raises(AssertionError, match="no write in flight"):
        al.release({5})


def test_extents_are_clipped_to_the_volume() -> None:
    al = ActivityLog(region_bytes=4 * MiB, max_regions=8, regions=[3, 0])
    assert al.extents(14 * MiB) == [Extent(0, 4 * MiB), Extent(12 * MiB, 2 * MiB)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 15), st.booleans()), max_size=80))
def test_a_region_with_a_write_in_flight_is_always_logged(ops: list[tuple[int, bool]]) -> None:
    """The invariant a crash relies on: in-flight => logged."""
    al = ActivityLog(region_bytes=MiB, max_regions=3)
    inflight: dict[int, int] = {}
    for region, start in ops:
        if start:
            al.add({region})
            al.acquire({region})
            inflight[region] = inflight.get(region, 0) + 1
        elif inflight.get(region):
            al.release({region})
            inflight[region] -= 1
        logged = set(al.regions())
        assert {r for r, n in inflight.items() if n} <= logged
