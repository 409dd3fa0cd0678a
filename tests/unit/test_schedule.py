"""The schedule source's ticks with an injected clock: intervals, a cron in a zone across both daylight-saving
changes, catch-up in each mode, jitter, overlap, and a wall clock that jumps (connectors.schedule)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest

from connectors.schedule import ScheduleSource, ScheduleSourceConfig
from connectors.schedule_ticks import Ticks, due, jitter, tick_id
from dispatcher.testing import StubContext
from tests.clock import FakeClock

BERLIN = "Europe/Berlin"


def at(text: str) -> float:
    """Unix seconds of an ISO time with its offset."""
    return datetime.fromisoformat(text).timestamp()


def local(ticks: Ticks, moments: list[float]) -> list[str]:
    return [ticks.local(t).isoformat() for t in moments]


# -- when ticks fall ------------------------------------------------------------------------


def test_every_n_seconds_falls_on_multiples_since_the_epoch() -> None:
    ticks = Ticks(every=30)
    assert ticks.after(1000) == 1020 and ticks.after(1020) == 1050
    newest, count = ticks.newest(1000, 1100)
    assert newest == [1080, 1050, 1020] and count == 3
    assert ticks.newest(1000, 16000, limit=10) == ([15990 - 30 * n for n in range(10)], 500)


def test_a_cron_in_a_zone_across_spring_forward_fires_a_missing_time_once_after_the_change() -> None:
    """Europe/Berlin skips 02:00 to 03:00 on 2026-03-29: 02:30 fires once at 03:00 (Debian's cron); */30 skips the hour
    that does not exist."""
    daily = Ticks(cron="30 2 * * *", timezone=BERLIN)
    newest, _ = daily.newest(at("2026-03-27T12:00:00+01:00"), at("2026-03-31T00:00:00+02:00"))
    assert local(daily, newest[::-1]) == ["2026-03-28T02:30:00+01:00", "2026-03-29T03:00:00+02:00",
                                          "2026-03-30T02:30:00+02:00"]
    halves = Ticks(cron="*/30 * * * *", timezone=BERLIN)
    newest, _ = halves.newest(at("2026-03-29T01:00:00+01:00"), at("2026-03-29T04:00:00+02:00"))
    assert local(halves, newest[::-1]) == ["2026-03-29T01:30:00+01:00", "2026-03-29T03:00:00+02:00",
                                           "2026-03-29T03:30:00+02:00", "2026-03-29T04:00:00+02:00"]


def test_a_cron_in_a_zone_across_fall_back_fires_a_fixed_time_once_and_a_repeating_one_in_both_hours() -> None:
    """Europe/Berlin has 02:00 to 03:00 twice on 2026-10-25."""
    daily = Ticks(cron="30 2 * * *", timezone=BERLIN)
    newest, _ = daily.newest(at("2026-10-24T12:00:00+02:00"), at("2026-10-26T12:00:00+01:00"))
    assert local(daily, newest[::-1]) == ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"]
    hourly = Ticks(cron="@hourly", timezone=BERLIN)
    newest, _ = hourly.newest(at("2026-10-25T01:30:00+02:00"), at("2026-10-25T03:30:00+01:00"))
    assert local(hourly, newest[::-1]) == ["2026-10-25T02:00:00+02:00", "2026-10-25T02:00:00+01:00",
                                           "2026-10-25T03:00:00+01:00"]
    # Each of the two 02:00 is a tick of its own: their ids differ (UTC in the id).
    assert len({tick_id("t", t) for t in newest}) == 3


def test_the_same_cron_in_utc_has_no_such_turns() -> None:
    ticks = Ticks(cron="30 2 * * *")
    newest, _ = ticks.newest(at("2026-03-28T00:00:00+00:00"), at("2026-03-31T00:00:00+00:00"))
    assert [datetime.fromtimestamp(t, UTC).hour for t in newest] == [2, 2, 2]


# -- which ticks are due ---------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "fired", "skipped"), [
    ("none", [110], 9),
    ("last", [110], 9),
    ("all", [101, 102, 103, 104, 105, 106, 107, 108, 109, 110], 0),
])
def test_catch_up_after_a_downtime(mode: Any, fired: list[int], skipped: int) -> None:
    """Last tick fired at 100, back at 110.2: 101 to 109 were missed, 110 is on time."""
    assert due(Ticks(every=1), 100, 110.2, mode, 100, None)[:3] == (fired, skipped, 110)


def test_catch_up_last_fires_the_newest_missed_tick_when_none_is_on_time() -> None:
    assert due(Ticks(every=10), 100, 125, "last", 100, None)[:3] == ([120], 1, 120)
    assert due(Ticks(every=10), 100, 125, "none", 100, None)[:3] == ([], 2, 120)


def test_catch_up_is_bounded_by_a_count_or_a_window() -> None:
    assert due(Ticks(every=1), 100, 110.2, "all", 3, None)[:3] == ([107, 108, 109, 110], 6, 110)
    assert due(Ticks(every=1), 100, 110.2, "all", None, 4.0)[:3] == ([107, 108, 109, 110], 6, 110)
    # A window older than every missed tick: ``last`` fires nothing of them (CronJob's startingDeadlineSeconds).
    assert due(Ticks(every=10), 100, 125, "last", None, 3.0)[:3] == ([], 2, 120)


def test_a_tick_waits_for_its_jitter_and_is_on_time_after_it() -> None:
    assert due(Ticks(every=10), 100, 112, "none", 100, None, lambda t: 3.0)[:3] == ([], 0, 100)
    assert due(Ticks(every=10), 100, 113.5, "none", 100, None, lambda t: 3.0)[:3] == ([110], 0, 110)


def test_jitter_stays_in_its_window_and_is_the_same_everywhere() -> None:
    delays = [jitter("nightly", 1_800_000_000 + 60 * n, 30.0) for n in range(2000)]
    assert all(0 <= d < 30 for d in delays)
    assert max(delays) > 28 and min(delays) < 2  # spread over the window
    assert delays == [jitter("nightly", 1_800_000_000 + 60 * n, 30.0) for n in range(2000)]  # another replica's
    assert jitter("other", 1_800_000_000, 30.0) != delays[0]  # triggers that share a schedule differ
    assert jitter("nightly", 1_800_000_000, 0) == 0


# -- the source, with an injected clock -------------------------------------------------------


def source(clock: FakeClock, **config: Any) -> ScheduleSource:
    return ScheduleSource(ScheduleSourceConfig(kind="schedule", **config), clock=clock)


@pytest.mark.anyio
async def test_every_tick_fires_once_in_order_with_its_scheduled_time() -> None:
    clock, ctx = FakeClock(1000.0), StubContext("beat")
    async with ctx.running(source(clock, every="1s")):
        for _ in range(5):
            await clock.move(1)
        await ctx.wait_emitted(5)
    assert ctx.emitted == [tick_id("beat", 1000.0 + n) for n in range(1, 6)]
    event = json.loads(json.dumps(ctx.checkpoints.values))  # (saved as JSON)
    assert json.loads(event["schedule"])["fired"] == 1005


@pytest.mark.anyio
async def test_the_event_says_which_tick_it_is_and_how_late() -> None:
    clock, ctx = FakeClock(1000.0), StubContext("beat")
    seen: list[Any] = []
    real_emit = ctx.emit

    async def emit(event: Any, ack: Any = None) -> None:
        seen.append(event)
        await real_emit(event, ack)

    ctx.emit = emit  # type: ignore[method-assign]
    async with ctx.running(source(clock, every="10s")):
        await clock.move(10.4)
        await ctx.wait_emitted(1)
    event = seen[0]
    assert event.type == "eventswarm.schedule.tick" and event.id == "beat/19700101T001650Z"
    assert event.time.startswith("1970-01-01T00:16:50") and event.data["scheduled"] == event.time
    assert event.data["late_seconds"] == pytest.approx(0.4) and event.data["again"] is False
    assert event.extensions["scheduledtime"] == event.time and event.extensions["schedule"] == "every 10s"


@pytest.mark.anyio
async def test_a_wall_clock_jump_forwards_is_a_catch_up_counted_and_backwards_fires_nothing_twice() -> None:
    clock, ctx = FakeClock(1000.0), StubContext("beat")
    async with ctx.running(source(clock, every="1s", catch_up="last")):
        await clock.move(1)
        await ctx.wait_emitted(1)
        await clock.move(3600)  # NTP steps forwards an hour: the newest tick fires, the others are counted
        await ctx.wait_emitted(2)
        assert ctx.emitted[-1] == tick_id("beat", 4601.0) and ctx.drops == {"missed": 3599}
        await clock.move(-30)  # and back 30 s: nothing fires until the clock is past the newest tick again
        for _ in range(29):
            await clock.move(1)
        assert len(ctx.emitted) == 2
        await clock.move(1.2)
        await clock.move(1)
        await ctx.wait_emitted(3)
    assert ctx.emitted[2] == tick_id("beat", 4602.0)
    assert len(set(ctx.emitted)) == len(ctx.emitted)


@pytest.mark.anyio
async def test_a_restart_fires_again_what_was_not_settled_and_catches_up_as_told() -> None:
    clock, ctx = FakeClock(1000.0), StubContext("beat")
    async with ctx.running(source(clock, every="1s", catch_up="all")):
        for _ in range(3):
            await clock.move(1)
        await ctx.wait_emitted(3)
        await ctx.settle(ctx.emitted[:2])
    ctx.forget()
    await clock.move(5)  # down for 5 s
    async with ctx.running(source(clock, every="1s", catch_up="all")):
        await ctx.wait_emitted(3 + 1 + 5)
    assert ctx.emitted[3:] == [tick_id("beat", t) for t in (1003.0, 1004.0, 1005.0, 1006.0, 1007.0, 1008.0)]


@pytest.mark.anyio
async def test_overlap_skip_counts_the_ticks_that_came_while_one_ran() -> None:
    clock, ctx = FakeClock(1000.0), StubContext("beat")
    async with ctx.running(source(clock, every="1s", overlap="skip")):
        await clock.move(1)
        await ctx.wait_emitted(1)
        for _ in range(3):
            await clock.move(1)
        assert len(ctx.emitted) == 1 and ctx.drops == {"overlap": 3}
        await ctx.settle()
        await clock.move(1)
        await ctx.wait_emitted(2)
    assert ctx.emitted[1] == tick_id("beat", 1005.0)


@pytest.mark.anyio
async def test_overlap_queue_keeps_one_tick_for_when_the_running_one_ends() -> None:
    clock, ctx = FakeClock(1000.0), StubContext("beat")
    async with ctx.running(source(clock, every="10s", overlap="queue")):
        await clock.move(10)
        await ctx.wait_emitted(1)
        await clock.move(10)  # 1020 waits
        await clock.move(10)  # 1030 is skipped: one waits already
        assert len(ctx.emitted) == 1 and ctx.drops == {"overlap": 1}
        await ctx.settle()
        await ctx.wait_emitted(2)
    assert ctx.emitted[1] == tick_id("beat", 1020.0)


@pytest.mark.anyio
async def test_the_first_start_fires_nothing_of_the_past() -> None:
    clock, ctx = FakeClock(1000.5), StubContext("beat")  # (1000 is 0.5 s past: on time, were it not the first start)
    async with ctx.running(source(clock, every="1s", catch_up="all")):
        await clock.move(0.5)
        await ctx.wait_emitted(1)
    assert ctx.emitted == [tick_id("beat", 1001.0)] and not ctx.drops


@pytest.mark.parametrize(("config", "message"), [
    ({"cron": "61 * * * *"}, "is not a cron expression"),
    ({"cron": "* * * * * *"}, "a seconds field is not supported"),
    ({"cron": "@hourly", "timezone": "Mars/Olympus"}, "is not a time zone"),
    ({}, "cron or every"),
    ({"cron": "@daily", "every": "1m"}, "cron or every"),
    ({"every": "1.5s"}, "not a whole number of seconds"),
    ({"every": "10s", "timezone": "UTC"}, "timezone is for cron"),
    ({"every": "10s", "jitter": "10s"}, "not shorter than the interval"),
    ({"every": "10s", "max_catch_up": 0}, "a count of 1 or more"),
])
def test_bad_config_is_refused_with_why(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ScheduleSourceConfig(kind="schedule", **config)


def test_upcoming_ticks_on_the_zones_wall_clock() -> None:
    config = ScheduleSourceConfig(kind="schedule", cron="30 2 * * *", timezone=BERLIN)
    assert [t.isoformat() for t in config.upcoming(3, at("2026-03-28T12:00:00+01:00"))] == \
        ["2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00", "2026-03-31T02:30:00+02:00"]


@pytest.mark.anyio
@pytest.mark.parametrize(("mode", "after_restart"), [
    ("all", [1004.0, 1005.0, 1006.0, 1007.0, 1008.0, 1009.0]),
    ("last", [1008.0, 1009.0]),
    ("none", [1009.0]),
])
async def test_ticks_missed_while_down_run_as_catch_up_says(mode: str, after_restart: list[float]) -> None:
    """Down from 1003.5 to 1008.5: 1004 to 1008 fell while no daemon ran (even 1008, 0.5 s before the start)."""
    clock, ctx = FakeClock(1000.0), StubContext("beat")
    async with ctx.running(source(clock, every="1s", catch_up=mode)):
        for _ in range(3):
            await clock.move(1)
        await ctx.wait_emitted(3)
        await ctx.settle()
    await clock.move(5.5)
    async with ctx.running(source(clock, every="1s", catch_up=mode)):
        await clock.move(1)
        await ctx.wait_emitted(3 + len(after_restart))
        await anyio.wait_all_tasks_blocked()
    assert ctx.emitted[3:] == [tick_id("beat", t) for t in after_restart]
    assert ctx.drops.get("missed", 0) == 5 - (len(after_restart) - 1)
