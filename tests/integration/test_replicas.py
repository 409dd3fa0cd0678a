"""Replicas sharing one state store, on both backends: leases with fencing tokens, the takeover of a dead replica
(one winner), and the claim of its inbox rows. (The daemons themselves, as processes: tests/faults/test_replicas.py.)"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from dispatcher.events import Event
from dispatcher.lock import PostgresLock
from dispatcher.replicas import Membership
from dispatcher.state import StateStore
from dispatcher.store import (
    Database,
    InvocationRecord,
    abandon_unfinished,
    insert_invocation,
    is_postgres,
    put_checkpoints,
)
from tests.support import wait_for_async

pytestmark = pytest.mark.anyio

TIMEOUT = 0.6
"""The replicas' timeout here: a lease lasts this long unless renewed."""


@pytest.fixture(params=["sqlite", "postgres"])
def location(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "state.db")
    return request.getfixturevalue("postgres_database")


@pytest.fixture
def replicas(location: str):
    """``make(name)``: a replica of its own (its own connection, and on PostgreSQL the lock of its id, as a daemon
    holds it) on the one store."""
    opened: list[Database] = []
    locks: list[PostgresLock] = []

    def make(name: str) -> Membership:
        if is_postgres(location):
            locks.append(PostgresLock(location, None, name).acquire())
        store = Database(location)
        opened.append(store)
        return Membership(StateStore(store), name, owner=f"owner-{name}", address="127.0.0.1:0", timeout=TIMEOUT)

    yield make
    for store in opened:
        store.close()
    for lock in locks:
        lock.release()


def checkpoint(member: Membership, key: str = "block/1") -> str | None:
    return member.state.store.checkpoint("t", key)


def terms(member: Membership) -> list[tuple[int, str, int, int]]:
    return [tuple(row) for row in member.state.store.conn.execute(
        "SELECT token, holder, writes, refused FROM lease_terms WHERE name = ? ORDER BY token", ("trigger/t",)).fetchall()]


async def fenced_put(member: Membership, token: int, value: str) -> bool:
    """A checkpoint write fenced by ``token``: whether it was made."""
    refused: list[bool] = []
    await member.state.write(member.fenced("trigger/t", token, [put_checkpoints("t", {"block/1": value})], refused))
    return not refused


async def test_a_lease_has_one_holder_and_a_holder_past_its_lease_writes_nothing(replicas):
    a, b = replicas("a"), replicas("b")
    await a.join()
    await b.join()
    first = await a.acquire("trigger/t")
    assert first is not None
    assert await b.acquire("trigger/t") is None  # held, and renewed below
    assert await b.holder("trigger/t") == "a"
    assert await fenced_put(a, first, "10")
    alive, held = await a.beat()
    assert alive and held == {"trigger/t": first}

    # a stops beating (paused): its lease runs out, and b takes it, with a new token
    second = await wait_for_lease(b)
    assert second == first + 1
    assert not await fenced_put(a, first, "11")  # the late write of the old holder
    assert checkpoint(a) == "10"
    assert await fenced_put(b, second, "20")
    assert checkpoint(a) == "20"
    alive, held = await a.beat()
    assert alive and held == {}  # its heartbeat says the lease is lost
    assert terms(a) == [(first, "a", 1, 1), (second, "b", 1, 0)]


async def wait_for_lease(member: Membership) -> int:
    return int(await wait_for_async(lambda: member.acquire("trigger/t"), timeout=10, what="the lease"))


@pytest.mark.parametrize("location", ["postgres"], indirect=True)  # (on SQLite, one daemon per file: below)
async def test_a_replica_that_stopped_beating_is_taken_over_once_and_its_inbox_claimed(replicas):
    a, b, c = replicas("a"), replicas("b"), replicas("c")
    for member in (a, b, c):
        await member.join()
    accepted = [Event(source="test", type="t", data={"n": i}) for i in range(5)]
    for event in accepted:
        await a.state.inbox_put("t", event, None)
    await a.state.write(insert_invocation(_running("inv-a", "a", [accepted[0].id])),
                        insert_invocation(_running("inv-b", "b", ["e"])))
    assert await b.state.inbox_claim("t") == []  # a is live: its events are its own
    await a.acquire("trigger/t")

    async def beat(member: Membership) -> None:
        while True:
            await member.beat()
            await anyio.sleep(TIMEOUT / 5)

    async with anyio.create_task_group() as tg:
        tg.start_soon(beat, b)
        tg.start_soon(beat, c)  # a does not beat: it is taken as dead after TIMEOUT
        dead = await wait_for_async(b.dead, timeout=10, what="a to be taken as dead")
        assert [d[0] for d in dead] == ["a"]
        replica, incarnation, owner = dead[0]
        assert owner == "owner-a"
        won = [await m.bury(replica, incarnation, lambda which: abandon_unfinished(0.0, which, "gone")) for m in (b, c)]
        tg.cancel_scope.cancel()
    assert [w is not None for w in won] == [True, False]
    assert [u.id for u in won[0] or []] == ["inv-a"]  # what a had running, for its job to be adopted
    records = {r.id: r for r in b.state.store.invocations()}
    assert records["inv-a"].status == "failed" and "interrupted: gone" in (records["inv-a"].error or "")
    assert records["inv-b"].status == "running"  # b's own stays
    assert await c.acquire("trigger/t") is not None  # a's lease was freed at once
    claimed = await b.state.inbox_claim("t", page=3) + await c.state.inbox_claim("t", page=3)
    # each once, oldest first; but the event of a's running invocation, held by b while it adopts the job
    assert [e.id for e in claimed] == [e.id for e in accepted[1:]]
    assert await b.state.inbox_claim("t") == [] and await c.state.inbox_claim("t") == []
    await b.settle_adopted([accepted[0].id], settled=False)  # (its job was gone, or failed: it runs again)
    assert [e.id for e in await c.state.inbox_claim("t")] == [accepted[0].id]
    assert not (await a.beat())[0]  # a, should it come back, learns that it was taken over


def _running(invocation_id: str, replica: str, events: list[str]) -> InvocationRecord:
    return InvocationRecord(invocation_id, "t", "f", "running", 1, 1, events, None, None, 1.0, 1.0, None, None, replica)


@pytest.mark.parametrize("location", ["sqlite"], indirect=True)
async def test_on_sqlite_the_name_a_daemon_had_before_is_taken_over_at_once(replicas):
    """One daemon per SQLite file (its lock): another row is this daemon under a name it had before (a new host
    name, another port), whose webhook events it claims without waiting for the heartbeat to go stale."""
    before, now = replicas("host-a:8080"), replicas("host-b:8080")
    await before.join()
    event = Event(source="test", type="t", data={})
    await before.state.inbox_put("t", event, None)
    await now.join()
    ((replica, incarnation, _),) = await now.dead()
    assert replica == "host-a:8080"
    assert await now.bury(replica, incarnation, lambda which: abandon_unfinished(0.0, which, "gone")) == []
    assert [e.id for e in await now.state.inbox_claim("t")] == [event.id]


async def test_on_sqlite_taking_over_a_former_name_leaves_the_daemons_own_containers_alone(tmp_path, docker_engine):
    """On SQLite every name of the daemon shares one owner label (the file's): taking over the name it had before
    must not remove what the daemon runs now."""
    import docker

    from dispatcher.daemon import owner_id
    from dispatcher.executors.base import LABEL_MANAGED, LABEL_OWNER
    from tests.support import BUSYBOX, base_config, running_daemon

    doc = base_config(tmp_path, replica="now", replica_timeout="1s")
    state = str(tmp_path / "state.db")
    before = Membership(StateStore(Database(state)), "before", owner_id(state), "127.0.0.1:0", 1.0)
    await before.join()
    before.state.store.close()
    client = docker.from_env()
    try:
        async with running_daemon(doc) as daemon:
            running = client.containers.create(BUSYBOX, ["sleep", "60"], network_mode="none",
                                               labels={LABEL_MANAGED: "true", LABEL_OWNER: daemon.owner})
            await wait_for_async(_only_now(daemon.membership), timeout=10, what="'before' to be taken over")
            assert client.containers.get(running.id).id == running.id  # (NotFound: removed as 'before's)
    finally:
        for container in client.containers.list(all=True, sparse=True, filters={"label": f"{LABEL_OWNER}={owner_id(state)}"}):
            container.remove(force=True)
        client.close()


def _only_now(membership: Membership):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        return [r["id"] for r in await membership.report()] == ["now"]
    return check
