"""The batcher's limits: count, bytes, and an oversized event never stuck; runs are cut, never reordered."""

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatcher.events import Event, Run
from dispatcher.pipeline import BatchBuilder, Lane


def run_of(sizes: list[int]) -> Run:
    return Run.of([Event(source="test", type="t", data="x" * n) for n in sizes])


def cut(builder: BatchBuilder, runs: list[Run]) -> list[list[Run]]:
    """Batches as the lane cuts them: as much of the next run as fits, the rest starts the next batch."""
    batches, pending = [], list(runs)
    while pending:
        head = pending[0]
        fits = builder.room(head)
        if fits:
            builder.add(head.slice(0, fits))
            pending[0] = head.slice(fits)
            if not len(pending[0]):
                pending.pop(0)
        if not fits or fits < len(head) or builder.full:
            batches.append(builder.take())
    if builder.runs:
        batches.append(builder.take())
    return batches


def ids(runs: list[Run]) -> list[str]:
    return [i for run in runs for i in run.ids]


runs_strategy = st.lists(st.lists(st.integers(min_value=0, max_value=3000), min_size=1, max_size=30), max_size=20)


@given(runs_strategy, st.integers(min_value=1, max_value=50), st.integers(min_value=200, max_value=20000))
def test_batches_respect_count_and_bytes_and_keep_every_event_in_order(sizes, max_events, max_bytes):
    runs = [run_of(s) for s in sizes]
    batches = cut(BatchBuilder(max_events, max_bytes), runs)
    assert [i for b in batches for i in ids(b)] == ids(runs)
    for batch in batches:
        events = sum(len(r) for r in batch)
        assert 1 <= events <= max_events
        if events > 1:
            assert sum(r.nbytes for r in batch) <= max_bytes


def test_an_event_larger_than_max_bytes_forms_a_batch_of_its_own():
    batches = cut(BatchBuilder(100, 1000), [run_of([10, 5000, 10])])
    assert [sum(len(r) for r in b) for b in batches] == [1, 1, 1]


@pytest.mark.anyio
@given(runs_strategy, st.integers(min_value=1, max_value=50))
async def test_a_lane_cuts_batches_by_count_and_hands_every_event_over_once_in_order(sizes, max_events):
    runs = [run_of(s) for s in sizes]
    total = sum(len(r) for r in runs)
    lane = Lane(10**6, max_events, 10**9, 0.0)
    for run in runs:
        assert lane.queue.put_nowait(run)
    seen: list[str] = []
    with anyio.fail_after(5):
        while len(seen) < total:
            batch = await lane.next_batch()
            assert 1 <= sum(len(r) for r in batch) <= max_events
            seen += ids(batch)
    assert seen == ids(runs) and lane.depth == 0


@pytest.mark.anyio
async def test_a_full_lane_refuses_a_run_until_a_batch_is_taken():
    lane = Lane(10, 10, 10**9, 0.0)
    assert lane.queue.put_nowait(run_of([1] * 8))
    assert not lane.queue.put_nowait(run_of([1] * 3))
    assert lane.queue.put_nowait(run_of([1] * 2))
    blocked = run_of([1] * 5)
    async with anyio.create_task_group() as tg:
        done = anyio.Event()

        async def put() -> None:
            await lane.queue.put(blocked)
            done.set()
        tg.start_soon(put)
        await anyio.wait_all_tasks_blocked()
        assert not done.is_set() and lane.depth == 10
        assert sum(len(r) for r in await lane.next_batch()) == 10
        with anyio.fail_after(5):
            await done.wait()
    assert lane.depth == 5
    # A run larger than the whole capacity still enters an empty lane: it is never stuck.
    assert sum(len(r) for r in await lane.next_batch()) == 5
    assert lane.queue.put_nowait(run_of([1] * 25))


@pytest.mark.parametrize("ordering", ["partition", "none"])
def test_partitions_take_lanes_in_turn_so_as_many_partitions_as_lanes_never_share_one(ordering):
    from dispatcher.config import TriggerBase
    from dispatcher.metrics import Metrics
    from dispatcher.pipeline import Pipeline

    config = TriggerBase(function="f", ordering=ordering, max_in_flight=4)
    pipeline = Pipeline("t", config, None, Metrics())  # type: ignore[arg-type]  # routing needs no dispatcher
    names = [f"orders/{p}" for p in range(4)]
    lanes = [pipeline._routed(Run.of([Event(source="s", type="t", partition=name)]))[0][0] for name in names * 3]
    if ordering == "partition":
        assert len({id(lane) for lane in lanes[:4]}) == 4 and lanes[:4] * 3 == lanes
    else:
        assert len({id(lane) for lane in lanes}) == 1
