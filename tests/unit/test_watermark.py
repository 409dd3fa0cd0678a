"""Kafka commits: the watermark never passes an unsettled record, whatever order records settle in."""

from hypothesis import given
from hypothesis import strategies as st

from connectors.kafka import Watermark


@given(st.integers(min_value=0, max_value=10**9), st.data())
def test_the_committable_offset_is_the_first_unsettled_one(start, data):
    count = data.draw(st.integers(min_value=1, max_value=60))
    gaps = data.draw(st.lists(st.integers(min_value=1, max_value=3), min_size=count, max_size=count))
    offsets, offset = [], start
    for gap in gaps:
        offsets.append(offset)
        offset += gap
    mark = Watermark(start)
    for o in offsets:
        mark.track(o)
    order = data.draw(st.permutations(offsets))
    settled: set[int] = set()
    for o in order:
        mark.settle(o)
        settled.add(o)
        unsettled = [x for x in offsets if x not in settled]
        if unsettled:
            assert mark.committable == max([start] + [x + 1 for x in offsets if x < unsettled[0]])
            assert mark.committable <= unsettled[0]
        else:
            assert mark.committable == offsets[-1] + 1
    assert mark.in_flight == 0


def test_nothing_in_flight_commits_nothing_new():
    mark = Watermark(42)
    assert mark.committable == 42
    mark.track(50)  # offsets 42..49 were compacted away or were transaction markers
    assert mark.committable == 50
    mark.settle(50)
    assert mark.committable == 51
