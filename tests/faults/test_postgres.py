"""The PostgreSQL store under faults, on a server of the test's own (scripts/postgres.sh on a free port): a server
out of reach at start is one clear error; a server that goes away fails writes with one line, and the store
works again once it is back, without a restart."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dispatcher.errors import StoreError
from dispatcher.schema import MIGRATIONS
from dispatcher.state import StateStore
from dispatcher.store import Database, InvocationRecord, insert_invocation
from tests.support import ROOT, free_port

pytestmark = pytest.mark.anyio


class Server:
    """A PostgreSQL server of the test's own."""

    def __init__(self, home: Path, port: int) -> None:
        self.home, self.port = home, port
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def start(self) -> None:
        done = subprocess.run(["bash", str(ROOT / "scripts" / "postgres.sh")], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "EVENTSWARM_PG_PORT": str(self.port),
                                                "EVENTSWARM_SERVICES_HOME": str(self.home)})
        assert done.returncode == 0, done.stdout + done.stderr

    def stop(self) -> None:
        pg_ctl = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))[-1]
        subprocess.run(["runuser", "-u", "postgres", "--", str(pg_ctl), "-D", str(self.home / "postgres" / "data"),
                        "-m", "immediate", "-w", "stop"], capture_output=True, timeout=60, check=True)


@pytest.fixture
def server(postgres) -> Iterator[Server]:  # (postgres: the package is installed)
    home = Path("/var/cache/eventswarm") / f"pg-fault-{uuid.uuid4().hex[:8]}"  # (the postgres user must reach it)
    server = Server(home, free_port())
    server.start()
    yield server
    try:
        server.stop()
    except subprocess.CalledProcessError:
        pass  # (stopped by the test)
    shutil.rmtree(home, ignore_errors=True)


def record(invocation_id: str) -> InvocationRecord:
    return InvocationRecord(invocation_id, "t", "f", "queued", 1, 1, ["e"], None, None, 1.0, None, None, None)


def test_a_server_out_of_reach_at_start_is_one_clear_permanent_error():
    with pytest.raises(StoreError) as caught:
        Database(f"postgresql://postgres:secret-pw@127.0.0.1:{free_port()}/postgres")
    message = str(caught.value)
    assert "cannot open the state store postgresql://postgres:***@127.0.0.1:" in message
    assert "is the PostgreSQL server up" in message and "secret-pw" not in message
    assert not caught.value.temporary and "\n" not in message


def test_replicas_opening_a_new_database_together_migrate_it_once(server):
    with ThreadPoolExecutor(6) as pool:
        stores = list(pool.map(lambda _: Database(server.url), range(6)))
    try:
        assert stores[0].conn.execute("SELECT version FROM eventswarm_schema").fetchall() == [(len(MIGRATIONS),)]
    finally:
        for store in stores:
            store.close()


async def test_a_server_that_goes_away_fails_writes_in_one_line_and_the_store_recovers_when_it_is_back(server):
    store = Database(server.url)
    state = StateStore(store)
    try:
        await state.write(insert_invocation(record("before")))
        server.stop()
        with pytest.raises(StoreError) as caught:
            await state.write(insert_invocation(record("during")))
        assert "\n" not in str(caught.value) and state.error is not None
        server.start()
        await state.write(insert_invocation(record("after")))  # reconnected, between transactions
        assert state.error is None
        assert {r.id for r in store.invocations()} == {"before", "after"}
    finally:
        store.close()
