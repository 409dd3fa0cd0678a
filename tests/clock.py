"""A wall clock a test moves by hand, for sources that wait on a clock they are given (the schedule source)."""

from __future__ import annotations

import anyio


class FakeClock:
    """A wall clock the test moves; a sleep returns at the next move (the source reads the clock again then)."""

    def __init__(self, now: float) -> None:
        self._now = now
        self._moved = anyio.Event()

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        await self._moved.wait()

    async def move(self, seconds: float) -> None:
        await anyio.wait_all_tasks_blocked()  # (the source is asleep: it sees the move when it wakes)
        self._now += seconds
        moved, self._moved = self._moved, anyio.Event()
        moved.set()
        await anyio.wait_all_tasks_blocked()
