"""The ordered-progress tracker: the committable position is always just past the settled prefix, for any
kind of position, any split and any order of settlements; with its cap, what it holds stays within it."""

from __future__ import annotations

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.progress import Backfill, Committer, Progress

KINDS = {
    # a Kafka offset: resume at the next one
    "offset": (lambda n: n * 3, lambda p: p + 1, 0),
    # a byte range of a file, by its end: resume right there
    "bytes": (lambda n: (n + 1) * 100, lambda p: p, 0),
    # a log by (block, logIndex): resume at the next log of the block
    "log": (lambda n: (n // 4, n % 4), lambda p: (p[0], p[1] + 1), (0, 0)),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_the_committable_position_is_just_past_the_settled_prefix(kind, data):
    position, after, start = KINDS[kind]
    count = data.draw(st.integers(min_value=1, max_value=60))
    positions = [position(n) for n in range(count)]
    cuts = sorted(set(data.draw(st.lists(st.integers(min_value=1, max_value=count - 1), max_size=10)))) if count > 1 else []
    runs = [positions[a:b] for a, b in zip([0, *cuts], [*cuts, count], strict=True)]
    limit = data.draw(st.integers(min_value=1, max_value=80))
    progress = Progress(start, after=after, limit=limit)
    parts = []
    spans = []
    settled: set = set()

    def check() -> None:
        unsettled = [p for p in positions[:sum(len(r) for r in runs[:len(spans)])] if p not in settled]
        tracked = positions[:sum(len(r) for r in runs[:len(spans)])]
        prefix = tracked[:tracked.index(unsettled[0])] if unsettled else tracked
        assert progress.committable == (after(prefix[-1]) if prefix else start)
        largest = max(len(r) for r in runs)
        assert progress.in_flight <= max(limit, largest)  # the cap (a run larger than it goes alone)

    # The source tracks runs while there is room, and settles parts of any of them in any order meanwhile.
    pending = list(runs)
    while pending or parts:
        if pending and progress.has_room(len(pending[0])) and (not parts or data.draw(st.booleans())):
            run = pending.pop(0)
            i = len(spans)
            spans.append(progress.track_nowait(run))
            shuffled = run if data.draw(st.booleans()) else data.draw(st.permutations(run))
            sizes = data.draw(st.lists(st.integers(min_value=1, max_value=5), min_size=len(run), max_size=len(run)))
            while shuffled:
                parts.append((i, shuffled[:sizes[0]]))
                shuffled, sizes = shuffled[sizes[0]:], sizes[1:]
        else:
            assert parts, "the cap stopped the source with nothing left to settle"
            i, part = parts.pop(data.draw(st.integers(min_value=0, max_value=len(parts) - 1)))
            part = sorted(part)
            spans[i].settle(part)
            settled.update(part)
        check()
    assert progress.committable == after(positions[-1])
    assert progress.in_flight == 0 and progress.unsettled == 0


def test_one_stuck_item_holds_the_commit_and_the_cap_stops_the_source():
    """One unsettled run and many settled ones behind it: the commit stays put, and memory with it."""
    progress = Progress(0, after=lambda p: p + 1, limit=10_000)
    stuck = progress.track_nowait(list(range(0, 2000)))
    offset = 2000
    while progress.has_room(2000):
        span = progress.track_nowait(list(range(offset, offset + 2000)))
        span.settle(list(range(offset, offset + 2000)))
        offset += 2000
    assert progress.committable == 0
    assert progress.in_flight <= 10_000
    stuck.settle(list(range(0, 2000)))
    assert progress.committable == offset and progress.in_flight == 0


@pytest.mark.anyio
async def test_track_waits_at_the_cap_until_the_first_unsettled_item_settles():
    progress = Progress(0, after=lambda p: p + 1, limit=4)
    first = await progress.track([0, 1])
    second = await progress.track([2, 3])
    second.settle([2, 3])
    tracked = anyio.Event()

    async def source() -> None:
        await progress.track([4, 5])
        tracked.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(source)
        await anyio.wait_all_tasks_blocked()
        assert not tracked.is_set(), "tracked past the cap"
        first.settle([0, 1])
        await tracked.wait()
    assert progress.committable == 4


@pytest.mark.anyio
async def test_the_committer_saves_what_moved_and_once_more_when_stopped():
    saved: list[dict] = []

    async def save(positions):
        saved.append(dict(positions))

    committer = Committer(save, interval=3600)
    progress = committer.trackers["votes/0"] = Progress(0, after=lambda p: p + 1)
    span = progress.track_nowait([0, 1, 2])
    async with anyio.create_task_group() as tg:
        tg.start_soon(committer.run)
        await anyio.wait_all_tasks_blocked()
        span.settle([0, 1])
        tg.cancel_scope.cancel()  # the source stops: what is settled is saved, shielded
    assert saved == [{"votes/0": 2}]
    await committer.save()
    assert saved == [{"votes/0": 2}], "saved again although nothing moved"


def test_a_run_that_begins_past_the_position_moves_it_when_nothing_is_in_flight():
    """Kafka offsets below a fetched run were compacted away or were transaction markers: nothing to settle."""
    progress = Progress(42, after=lambda p: p + 1)
    span = progress.track_nowait([50, 51, 52], begin=50)
    assert progress.committable == 50
    span.settle([(51, "record")], key=lambda record: record[0])
    assert progress.committable == 50
    span.settle([(50, "record")], key=lambda record: record[0])
    assert progress.committable == 52
    span.settle([(52, "record")], key=lambda record: record[0])
    assert progress.committable == 53 and progress.in_flight == 0


@pytest.mark.anyio
async def test_a_save_that_fails_saves_nothing_and_the_next_round_saves_the_position():
    """A refused Kafka commit (a rebalance) or a full disk: the position stays unsaved and is saved later."""
    saved: list[dict] = []
    failures = [RuntimeError("the broker said no")]

    async def save(positions):
        if failures:
            raise failures.pop()
        saved.append(dict(positions))

    committer = Committer(save, interval=3600)
    progress = committer.trackers["p"] = Progress(0, after=lambda p: p + 1)
    progress.track_nowait([0, 1]).settle([0, 1])
    with pytest.raises(RuntimeError):
        await committer.save()
    assert progress.committed == 0 and saved == []
    await committer.save()
    assert saved == [{"p": 2}] and progress.committed == 2


@pytest.mark.anyio
async def test_the_last_save_on_the_way_out_is_bounded_when_the_origin_does_not_answer():
    async def save(positions):
        await anyio.sleep_forever()  # a broker that is gone

    committer = Committer(save, interval=3600, final_wait=0.1)
    committer.trackers["p"] = progress = Progress(0, after=lambda p: p + 1)
    progress.track_nowait([0]).settle([0])
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(committer.run)
            await anyio.wait_all_tasks_blocked()
            tg.cancel_scope.cancel()
    assert progress.committed == 0


def test_a_backfill_reports_its_rate_and_the_time_left_and_logs_only_every_few_seconds():
    from dispatcher.progress import BACKFILL_LOG_EVERY, Backfill

    backfill = Backfill("blocks", 100, 10_100, now=0.0)
    assert backfill.eta is None and "unknown" in backfill.describe()
    assert not backfill.update(600, 10_100, now=1.0)  # 500 blocks/s
    assert backfill.rate == 500 and backfill.eta == 19.0
    assert backfill.update(5_100, 10_100, now=BACKFILL_LOG_EVERY)
    assert backfill.describe() == "5,100 of 10,100 blocks (50%), 500 blocks/s, about 10s left"
    report = backfill.report()
    assert report["percent"] == 50.5 and report["eta_seconds"] == 10.0 and report["unit"] == "blocks"
    assert not backfill.update(5_200, 10_100, now=BACKFILL_LOG_EVERY + 1)


def test_status_watch_draws_a_backfill_as_a_progress_bar(capsys):
    from dispatcher.cli.operate import _show_status

    backfill = Backfill("blocks", 0, 10_000, now=0.0)
    backfill.update(2_500, 10_000, now=5.0)
    trigger = {"trigger": "chain", "source": "ethereum", "state": "running", "buffered": 0, "in_flight": 1,
               "lag": 7_500, "lag_unit": "blocks", "last_error": None, "backfill": backfill.report()}
    _show_status({"executor": "process", "triggers": [trigger]}, bars=True)
    out = capsys.readouterr().out
    assert "7,500 blocks" in out and "chain: backfill 2,500 of 10,000 blocks (25%)" in out
    bar = out.splitlines()[-1]
    assert " 25%|" in bar and "2500/10000" in bar and "blocks/s" in bar, bar
