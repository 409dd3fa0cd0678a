"""The webhook source over real HTTP: answers, signatures, dedupe, backpressure, and crash safety."""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
import logging
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import docker
import pytest

from dispatcher.daemon import owner_id
from tests.support import BUSYBOX, base_config, free_port, post, running_daemon, store_of, wait_for, wait_until

pytestmark = pytest.mark.anyio


def config(tmp_path, *, executor="process", script="cat", port=0, **source: Any) -> dict[str, Any]:
    doc = base_config(tmp_path, executor=executor, port=port)
    if executor == "process":
        doc["functions"]["f"] = {"command": ["sh", "-c", script], "timeout": "30s"}
    else:
        doc["functions"]["f"] = {"image": BUSYBOX, "command": ["sh", "-c", script], "timeout": "30s"}
    doc["triggers"]["t"] = {"function": "f", "source": {"kind": "webhook", "path": "/hooks/t", **source},
                            "ordering": "none", "batch": {"max_events": 50, "max_wait": "50ms"}}
    return doc


async def call(daemon, body: bytes, headers: dict[str, str] | None = None, path="/hooks/t", method="POST"):
    url = f"http://127.0.0.1:{daemon.http.port}{path}"
    if method != "POST":
        import urllib.request

        def get():
            try:
                with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as r:
                    return r.status, dict(r.headers), r.read()
            except urllib.error.HTTPError as exc:
                return exc.code, dict(exc.headers), exc.read()
        return await anyio.to_thread.run_sync(get)
    return await anyio.to_thread.run_sync(lambda: post(url, body, headers))


def succeeded_event_ids(doc) -> set[str]:
    return {i for r in store_of(doc).invocations(status="succeeded", limit=100_000) for i in r.event_ids}


async def test_sync_mode_answers_with_the_functions_stdout(tmp_path):
    async with running_daemon(config(tmp_path, mode="sync")) as daemon:
        status, headers, body = await call(daemon, b'{"hello": "world"}')
    assert status == 200
    doc = json.loads(body)
    assert doc["events"][0]["data"] == {"hello": "world"}
    assert headers["X-Eventswarm-Invocation"] == doc["batch_id"]


async def test_sync_mode_failure_is_a_502_naming_the_invocation(tmp_path):
    async with running_daemon(config(tmp_path, mode="sync", script="exit 3")) as daemon:
        status, _, body = await call(daemon, b"{}")
    assert status == 502
    assert json.loads(body)["invocation_id"]


async def test_async_mode_accepts_with_202_and_runs_the_event(tmp_path):
    doc = config(tmp_path)
    async with running_daemon(doc) as daemon:
        status, _, body = await call(daemon, b'{"n": 1}')
        assert status == 202
        event_id = json.loads(body)["id"]
        await wait_for(lambda: event_id in succeeded_event_ids(doc), timeout=20, what="the accepted event to run")
        await wait_for(lambda: store_of(doc).inbox_size("t") == 0, timeout=10, what="the inbox to empty")


async def test_bad_requests_get_the_right_status(tmp_path):
    async with running_daemon(config(tmp_path, max_body="100B")) as daemon:
        assert (await call(daemon, b'{"broken": '))[0] == 400
        assert (await call(daemon, b"x" * 101, {"Content-Type": "text/plain"}))[0] == 413
        assert (await call(daemon, b"{}", path="/hooks/nope"))[0] == 404
        assert (await call(daemon, b"", method="GET"))[0] == 405
        assert (await call(daemon, b"plain text", {"Content-Type": "text/plain"}))[0] == 202


async def test_compressed_bodies_are_undone_and_a_bad_or_unknown_encoding_is_a_4xx_without_a_traceback(tmp_path, caplog):
    import brotli
    from backports import zstd

    caplog.set_level(logging.INFO, logger="eventswarm.http")
    doc = config(tmp_path, mode="sync")
    good = {"gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress, "zstd": zstd.compress}
    async with running_daemon(doc) as daemon:
        for encoding, compress in good.items():
            status, _, body = await call(daemon, compress(b'{"via": "%s"}' % encoding.encode()),
                                         {"Content-Encoding": encoding})
            assert status == 200 and json.loads(body)["events"][0]["data"] == {"via": encoding}, (encoding, body)
        for encoding in good:
            status, _, body = await call(daemon, b"these bytes are not " + encoding.encode(),
                                         {"Content-Encoding": encoding})
            assert status == 400 and "malformed body: Can not decode content-encoding" in json.loads(body)["error"]
        for encoding in ("compress", "x-unknown", "gzip, deflate"):
            status, headers, body = await call(daemon, b"{}", {"Content-Encoding": encoding})
            assert status == 415 and "is not accepted" in json.loads(body)["error"], (encoding, status, body)
            assert headers["Accept-Encoding"] == "gzip, deflate, br, zstd"
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], \
        [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    malformed = [r.getMessage() for r in caplog.records if "had a malformed body" in r.getMessage()]
    assert len(malformed) == 4 and all(r.levelno == logging.INFO for r in caplog.records if "malformed" in r.getMessage())


async def test_github_signatures_are_checked_on_the_raw_body(tmp_path, monkeypatch):
    monkeypatch.setenv("HOOK_SECRET", "s3cret")
    doc = config(tmp_path, signature={"scheme": "github", "secret_env": "HOOK_SECRET"})
    body = b'{"action": "opened"}'
    good = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    async with running_daemon(doc) as daemon:
        assert (await call(daemon, body, {"X-Hub-Signature-256": good}))[0] == 202
        assert (await call(daemon, body + b" ", {"X-Hub-Signature-256": good}))[0] == 401
        assert (await call(daemon, body))[0] == 401


async def test_a_repeated_delivery_id_is_answered_200_and_not_run_again(tmp_path):
    doc = config(tmp_path, dedupe_header="X-GitHub-Delivery")
    async with running_daemon(doc) as daemon:
        first = await call(daemon, b"{}", {"X-GitHub-Delivery": "d-1"})
        again = await call(daemon, b"{}", {"X-GitHub-Delivery": "d-1"})
        other = await call(daemon, b"{}", {"X-GitHub-Delivery": "d-2"})
        ids = {json.loads(first[2])["id"], json.loads(other[2])["id"]}
        await wait_for(lambda: ids <= succeeded_event_ids(doc), timeout=20, what="both deliveries to run")
    assert (first[0], again[0], other[0]) == (202, 200, 202)
    assert json.loads(again[2]) == {"id": json.loads(first[2])["id"], "duplicate": True}
    assert sum(r.batch_size for r in store_of(doc).invocations()) == 2


async def test_a_flood_against_a_slow_function_gets_503_and_every_accepted_event_runs(tmp_path, docker_engine):
    doc = config(tmp_path, executor="docker", script="cat >/dev/null; sleep 0.5", enqueue_timeout="200ms")
    doc["triggers"]["t"].update({"buffer": 4, "max_in_flight": 1, "batch": {"max_events": 2, "max_wait": "10ms"}})
    async with running_daemon(doc) as daemon:
        url = f"http://127.0.0.1:{daemon.http.port}/hooks/t"

        def flood() -> list[tuple[int, dict[str, str], bytes]]:
            with ThreadPoolExecutor(16) as pool:
                return list(pool.map(lambda i: post(url, json.dumps({"n": i}).encode()), range(60)))

        answers = await anyio.to_thread.run_sync(flood)
        accepted = {json.loads(body)["id"] for status, _, body in answers if status == 202}
        refused = [headers for status, headers, _ in answers if status == 503]
        assert refused, "a full buffer must refuse some requests"
        assert all(int(h["Retry-After"]) >= 1 for h in refused)
        assert accepted and len(accepted) + len(refused) == 60
        await wait_for(lambda: accepted <= succeeded_event_ids(doc), timeout=120, what="every accepted event to run")


def test_accepted_webhooks_survive_kill_9_and_run_after_restart(tmp_path, docker_engine, daemon_process):
    port = free_port()
    # First run: the function hangs, so accepted events pile up undispatched.
    doc = config(tmp_path, executor="docker", script="sleep 300", port=port)
    doc["triggers"]["t"].update({"max_in_flight": 1, "batch": {"max_events": 1, "max_wait": "10ms"}})
    daemon = daemon_process(doc).start()
    url = f"http://127.0.0.1:{port}/hooks/t"
    answers = [post(url, json.dumps({"n": i}).encode()) for i in range(20)]
    assert {status for status, _, _ in answers} == {202}
    accepted = {json.loads(body)["id"] for _, _, body in answers}
    wait_until(lambda: store_of(doc).invocations(status="running"), timeout=30, what="the first batch to start")
    daemon.kill()
    assert succeeded_event_ids(doc) == set()
    # Second run: a working function; everything accepted before the crash must run.
    doc["functions"]["f"]["command"] = ["sh", "-c", "cat"]
    restarted = daemon_process(doc).start()
    wait_until(lambda: accepted <= succeeded_event_ids(doc), timeout=120, what="all accepted events to run")
    assert restarted.stop() == 0
    assert store_of(doc).inbox_size("t") == 0
    # The container the killed daemon left running was removed by the restarted one.
    client = docker.from_env()
    try:
        owner = owner_id(doc["daemon"]["state"].removeprefix("sqlite:///"))
        assert client.containers.list(all=True, sparse=True, filters={"label": f"io.eventswarm.owner={owner}"}) == []
    finally:
        client.close()



async def test_a_crashed_source_answers_503_on_its_routes_until_it_serves_them_again(tmp_path, monkeypatch):
    """Nothing is accepted with a 202 while no live source stands behind the route."""
    from dispatcher.api import HttpResponse
    from dispatcher.daemon import Daemon
    from dispatcher.errors import StoreError

    fail = anyio.Event()
    crashed = anyio.Event()
    runs = []

    class CrashesOnce:
        """Serves the route, then fails as a source whose backlog read hit a damaged store; works when restarted."""

        async def run(self, ctx):
            runs.append(1)

            async def accept(_request):
                return HttpResponse.json(202, {"id": "accepted"})
            ctx.add_route("POST", "/hooks/t", accept, max_body=1024)
            ctx.set_ready(True)
            if len(runs) == 1:
                await fail.wait()
                crashed.set()
                raise StoreError("the inbox cannot be read")
            await anyio.sleep_forever()

    build = Daemon.build_triggers

    def build_with_crashing_source(self):
        build(self)
        self.triggers["t"].source = CrashesOnce()
    monkeypatch.setattr(Daemon, "build_triggers", build_with_crashing_source)

    async with running_daemon(config(tmp_path)) as daemon:
        assert (await call(daemon, b"{}"))[0] == 202
        fail.set()
        await crashed.wait()
        status, headers, body = await call(daemon, b"{}")
        assert status == 503, body
        assert headers.get("Retry-After")
        # Restarted (after a second), the source serves its route again, without "two triggers serve" errors.
        await wait_for(lambda: len(runs) == 2, timeout=10, what="the source to restart")
        assert (await call(daemon, b"{}"))[0] == 202



async def test_githubs_test_vector_verifies_through_the_config_and_the_server_a_secret_with_spaces(tmp_path, monkeypatch):
    """GitHub's documented vector, end to end: the secret has spaces, set in the environment as a user sets it;
    during a rotation ``secret_env`` lists both variables, and either secret verifies."""
    monkeypatch.setenv("GITHUB_OLD_SECRET", "It's a Secret to Everybody")
    monkeypatch.setenv("GITHUB_NEW_SECRET", "a new secret, with spaces too")
    doc = config(tmp_path, signature={"scheme": "github", "secret_env": ["GITHUB_NEW_SECRET", "GITHUB_OLD_SECRET"]})
    async with running_daemon(doc) as daemon:
        vector = {"X-Hub-Signature-256": "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
                  "Content-Type": "text/plain"}
        assert (await call(daemon, b"Hello, World!", vector))[0] == 202
        new = hmac.new(b"a new secret, with spaces too", b"Hello, World!", hashlib.sha256).hexdigest()
        assert (await call(daemon, b"Hello, World!", {"X-Hub-Signature-256": f"sha256={new}",
                                                      "Content-Type": "text/plain"}))[0] == 202
        wrong = hmac.new(b"It's", b"Hello, World!", hashlib.sha256).hexdigest()  # the first word alone
        assert (await call(daemon, b"Hello, World!", {"X-Hub-Signature-256": f"sha256={wrong}",
                                                      "Content-Type": "text/plain"}))[0] == 401


async def test_named_headers_and_the_query_reach_the_function_losslessly(tmp_path):
    doc = config(tmp_path, mode="sync", headers=["X-Event", "X-Repeated", "X-Absent"], query=True)
    async with running_daemon(doc) as daemon:
        url = f"http://127.0.0.1:{daemon.http.port}/hooks/t?a=1&a=2&b=caf%C3%A9&c="

        def send() -> bytes:
            import http.client

            conn = http.client.HTTPConnection("127.0.0.1", daemon.http.port, timeout=10)
            conn.putrequest("POST", url.split(str(daemon.http.port), 1)[1])
            for name, value in (("X-Event", b"push"), ("x-repeated", b"one"), ("X-Repeated", b"\xff\xfe"),
                                ("Content-Type", b"application/json"), ("Content-Length", b"2")):
                conn.putheader(name, value)
            try:
                conn.endheaders(b"{}")
                response = conn.getresponse()
                assert response.status == 200
                return response.read()
            finally:
                conn.close()

        event = json.loads(await anyio.to_thread.run_sync(send))["events"][0]
    assert json.loads(event["httpheaders"]) == {"x-event": "push", "x-repeated": ["one", {"base64": "//4="}]}
    assert json.loads(event["httpquery"]) == {"a": ["1", "2"], "b": "caf\u00e9", "c": ""}


async def test_a_sync_webhooks_filter_keeps_out_what_it_does_not_match_without_running_it(tmp_path):
    doc = config(tmp_path, mode="sync")
    doc["triggers"]["t"]["filter"] = "data.amount > 100"
    async with running_daemon(doc) as daemon:
        kept = await call(daemon, b'{"amount": 150}')
        filtered = await call(daemon, b'{"amount": 5}')
    assert kept[0] == 200 and json.loads(kept[2])["events"][0]["data"] == {"amount": 150}
    assert (filtered[0], filtered[2], filtered[1].get("X-Eventswarm-Filtered")) == (204, b"", "true")
    assert len(store_of(doc).invocations()) == 1  # the filtered request ran nothing
