"""Kafka commits: the watermark never passes an unsettled record, whatever order runs and their parts settle in."""

from collections import namedtuple

from hypothesis import given
from hypothesis import strategies as st

from connectors.kafka import Watermark

Record = namedtuple("Record", "offset")


@given(st.integers(min_value=0, max_value=10**9), st.data())
def test_the_committable_offset_is_the_first_unsettled_one(start, data):
    """Runs of records (with gaps in their offsets) settle in parts of any size, in any order."""
    count = data.draw(st.integers(min_value=1, max_value=60))
    gaps = data.draw(st.lists(st.integers(min_value=1, max_value=3), min_size=count, max_size=count))
    offsets, offset = [], start
    for gap in gaps:
        offsets.append(offset)
        offset += gap
    cuts = sorted(set(data.draw(st.lists(st.integers(min_value=1, max_value=count - 1), max_size=10)))) if count > 1 else []
    runs = [offsets[a:b] for a, b in zip([0, *cuts], [*cuts, count], strict=True)]
    mark = Watermark(start)
    spans = [mark.track(run) for run in runs]
    # Every run is settled in parts: each part some of its records, the parts of all runs interleaved.
    parts = []
    for i, run in enumerate(runs):
        # A run is settled in slices in order (the common case) or in parts of any records.
        shuffled = run if data.draw(st.booleans()) else data.draw(st.permutations(run))
        sizes = data.draw(st.lists(st.integers(min_value=1, max_value=5), min_size=len(run), max_size=len(run)))
        while shuffled:
            parts.append((i, shuffled[:sizes[0]]))
            shuffled, sizes = shuffled[sizes[0]:], sizes[1:]
    settled: set[int] = set()
    for i, part in (parts if data.draw(st.booleans()) else data.draw(st.permutations(parts))):
        part = sorted(part)
        spans[i].settle([Record(o) for o in part])
        settled.update(part)
        unsettled = [o for o in offsets if o not in settled]
        if unsettled:
            assert mark.committable == max([start] + [o + 1 for o in offsets if o < unsettled[0]])
        else:
            assert mark.committable == offsets[-1] + 1
        assert mark.in_flight == count - len(settled)


def test_nothing_in_flight_commits_nothing_new():
    mark = Watermark(42)
    assert mark.committable == 42
    span = mark.track([50, 51, 52])  # offsets 42..49 were compacted away or were transaction markers
    assert mark.committable == 50
    span.settle([Record(51)])
    assert mark.committable == 50
    span.settle([Record(50)])
    assert mark.committable == 52
    span.settle([Record(52)])
    assert mark.committable == 53 and mark.in_flight == 0
