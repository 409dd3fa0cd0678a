"""The batcher's limits: count, bytes, and an oversized event never stuck."""

from hypothesis import given
from hypothesis import strategies as st

from dispatcher.dispatch import Delivery
from dispatcher.events import Event
from dispatcher.pipeline import BatchBuilder


def delivery(payload_len: int) -> Delivery:
    return Delivery(Event(source="test", type="t", data="x" * payload_len), None)


def cut(builder: BatchBuilder, deliveries: list[Delivery]) -> list[list[Delivery]]:
    batches, carry = [], list(deliveries)
    while carry:
        item = carry.pop(0)
        if not builder.fits(item):
            batches.append(builder.take())
        builder.add(item)
        if builder.full:
            batches.append(builder.take())
    if builder.items:
        batches.append(builder.take())
    return batches


@given(st.lists(st.integers(min_value=0, max_value=3000), max_size=200),
       st.integers(min_value=1, max_value=50), st.integers(min_value=200, max_value=20000))
def test_batches_respect_count_and_bytes_and_keep_every_event_in_order(sizes, max_events, max_bytes):
    deliveries = [delivery(n) for n in sizes]
    batches = cut(BatchBuilder(max_events, max_bytes), deliveries)
    assert [d for b in batches for d in b] == deliveries
    for batch in batches:
        assert 1 <= len(batch) <= max_events
        if len(batch) > 1:
            assert sum(d.event.size + 1 for d in batch) <= max_bytes


def test_an_event_larger_than_max_bytes_forms_a_batch_of_its_own():
    big, small = delivery(5000), delivery(10)
    batches = cut(BatchBuilder(100, 1000), [small, big, small])
    assert [len(b) for b in batches] == [1, 1, 1]
