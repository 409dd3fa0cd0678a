"""The Ethereum source against a real node (anvil), with a contract compiled by solc."""

from __future__ import annotations

import json
import re
import signal
import sys
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.ethereum import TRANSFER, Proxy, Token, forward, own_anvil
from tests.support import base_config, free_port, running_daemon, store_of, wait_for, wait_until

pytestmark = pytest.mark.anyio

REPORT = """
import json, os, sys, urllib.request
doc = json.load(sys.stdin)
ask = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_blockNumber", "params": []}).encode()
request = urllib.request.Request(os.environ["NODE"], ask, {"Content-Type": "application/json"})
head = int(json.load(urllib.request.urlopen(request))["result"], 16)
if "--slow" in sys.argv:
    import time
    time.sleep(0.2)
for event in doc["events"]:
    data = event["data"]
    print(json.dumps({"block": data["blockNumber"], "index": data["logIndex"], "args": data.get("args"),
                      "event": data["event"], "head": head, "id": event["id"], "type": event["type"]}))
"""
"""A function that prints, for each log of its batch, where it is, what it says, and the head when it ran."""


def config(tmp_path: Path, node: str, token: Token, **source: Any) -> dict[str, Any]:
    doc = base_config(tmp_path, executor="process")
    script = tmp_path / "report.py"
    script.write_text(REPORT)
    doc["functions"]["f"] = {"command": [sys.executable, str(script)], "env": {"NODE": node}, "timeout": "30s"}
    doc["triggers"]["t"] = {"function": "f", "ordering": "partition", "max_in_flight": 4,
                            "batch": {"max_events": 50, "max_wait": "50ms"},
                            "source": {"kind": "ethereum", "rpc_url": node, "addresses": [token.address],
                                       "events": [TRANSFER], "from_block": token.deployed_at, "poll_interval": "100ms",
                                       **source}}
    return doc


def reports(doc, trigger: str | None = None) -> list[dict[str, Any]]:
    store = store_of(doc)
    found = []
    for record in store.invocations(trigger=trigger, status="succeeded", limit=100_000):
        found += [json.loads(line) for line in store.logs(record.id)[0].decode().splitlines()]
    return found


async def test_500_transfers_over_100_blocks_are_each_dispatched_once_decoded_and_only_3_blocks_deep(
        tmp_path, eth_node, token_contract):
    with own_anvil(tmp_path / "anvil.log") as (node, _):
        token = Token(node, token_contract)
        doc = config(tmp_path, node, token, confirmations=3)
        big = 2**60  # beyond 2^53: must arrive exact, as a decimal string
        async with running_daemon(doc):
            blocks = [token.emit_many(5, big + 5 * n) for n in range(100)]
            await wait_for(lambda: len(reports(doc)) >= 485, timeout=60, interval=0.2,
                           what="the logs 3 blocks deep")
            token.mine(3)
            await wait_for(lambda: len(reports(doc)) >= 500, timeout=60, interval=0.2, what="all 500 logs")
        seen = reports(doc)
    assert len(blocks) == len(set(blocks)) == 100
    positions = [(r["block"], r["index"]) for r in seen]
    assert len(positions) == len(set(positions)) == 500, "a log dispatched twice"
    values = sorted(int(r["args"]["value"]) for r in seen)
    assert values == [big + n for n in range(500)]
    assert all(r["event"] == "Transfer" and r["args"]["from"] == token.account for r in seen)
    assert {r["args"]["to"] for r in seen} == {f"0x{n:040x}" for n in range(1, 6)}
    early = [r for r in seen if r["head"] - r["block"] < 3]
    assert not early, f"dispatched before 3 confirmations: {early[:3]}"


async def test_a_node_that_refuses_large_ranges_still_gets_the_whole_backfill(tmp_path, eth_node, token_contract):
    """A JSON-RPC proxy in front of anvil refuses eth_getLogs over 100 blocks with -32005, as hosted nodes do."""
    refused: list[int] = []

    async def refuse(call: dict[str, Any]) -> dict[str, Any] | None:
        if call["method"] == "eth_getLogs":
            query = call["params"][0]
            span = int(query["toBlock"], 16) - int(query["fromBlock"], 16) + 1
            if span > 100:
                refused.append(span)
                return {"jsonrpc": "2.0", "id": call["id"], "error": {
                    "code": -32005, "message": "query returned more than 10000 results or range over 100 blocks"}}
        return None

    with own_anvil(tmp_path / "anvil.log") as (node, _):
        token = Token(node, token_contract)
        blocks = [token.emit_many(2, 1000 + 2 * n) for n in range(150)]
        token.mine(250)  # 400 blocks to backfill
        async with Proxy(node, refuse) as proxy:
            doc = config(tmp_path, proxy.url, token, confirmations=0, max_block_range=1000)
            async with running_daemon(doc):
                await wait_for(lambda: len(reports(doc)) >= 300, timeout=60, interval=0.2, what="all 300 logs")
    seen = reports(doc)
    assert sorted(int(r["args"]["value"]) for r in seen) == list(range(1000, 1300))
    assert {r["block"] for r in seen} == set(blocks)
    assert refused and max(refused) > 100, "the proxy never refused a range: it tested nothing"


async def through_a_provider(tmp_path: Path, token_contract: Any, make_answer: Any, logs: int = 40,
                             until: Any = None) -> tuple[dict, Any]:
    """``logs`` Transfers, one per block, emitted while the daemon reads them through a proxy that answers some calls
    itself, as providers do (``make_answer(node)``: the proxy's answer, given the node's URL); returns the config
    and the daemon's trigger once every log ran."""
    with own_anvil(tmp_path / "anvil.log") as (node, _):
        token = Token(node, token_contract)
        async with Proxy(node, make_answer(node)) as proxy:
            doc = config(tmp_path, proxy.url, token, confirmations=0)
            async with running_daemon(doc) as daemon:
                for value in range(logs):
                    await anyio.to_thread.run_sync(token.emit_one, 2000 + value)
                    await anyio.sleep(0.05)
                await wait_for(lambda: len({r["id"] for r in reports(doc)}) >= logs, timeout=90, interval=0.2,
                               what=f"all {logs} logs")
                if until is not None:  # (and what the proxy has to do: the source polls on meanwhile)
                    await wait_for(until, timeout=90, interval=0.2, what="the proxy's answers")
                trigger = daemon.triggers["t"]
    return doc, trigger


def assert_each_once(doc: dict, logs: int = 40) -> None:
    values = sorted(int(r["args"]["value"]) for r in reports(doc))
    assert values == list(range(2000, 2000 + logs)), "a log missing or twice"


async def test_rate_limits_are_waited_out_without_losing_the_cursor_or_the_source(
        tmp_path, eth_node, token_contract, caplog):
    """HTTP 429 (with and without Retry-After) and a JSON-RPC error that says the rate is limited, as hosted
    providers answer: the step waits and asks the same endpoint again; the source never fails."""
    from aiohttp import web

    calls = {"n": 0, "limited": 0}
    # which calls are limited, and how: twice in a row (the second wait doubles), once after the first logs ran
    LIMITED = {3: "retry-after", 4: "no retry-after", 8: "json-rpc", 30: "no retry-after", 31: "retry-after",
               60: "json-rpc"}

    def make_answer(node: str) -> Any:
        async def limit(call: dict[str, Any]) -> Any:
            calls["n"] += 1
            kind = LIMITED.get(calls["n"])
            if kind is None:
                return None
            calls["limited"] += 1
            if kind == "json-rpc":
                return {"jsonrpc": "2.0", "id": call["id"], "error": {
                    "code": -32005, "message": "daily request count exceeded, request rate limited"}}
            return web.Response(status=429, text="Too Many Requests",
                                headers={"Retry-After": "1"} if kind == "retry-after" else {})
        return limit

    doc, trigger = await through_a_provider(tmp_path, token_contract, make_answer, until=lambda: calls["limited"] == 6)
    assert_each_once(doc)
    assert calls["limited"] == 6, f"the proxy limited too few calls: it tested nothing ({calls})"
    assert not trigger.status()["last_error"], trigger.status()["last_error"]
    assert not [r for r in caplog.records if "source of trigger t failed" in r.getMessage()]
    assert any("429" in r.getMessage() and "waiting" in r.getMessage() for r in caplog.records)


async def test_malformed_answers_are_the_endpoints_failure_never_a_traceback(tmp_path, eth_node, token_contract, caplog):
    """A result of the wrong type, a log without topics, HTML with status 200, a block number that is not hex:
    each is the endpoint failing (one line), and no log is missing or twice."""
    from aiohttp import web

    bad = ["garbage", "no topics", "html", "number"]
    done: list[str] = []

    def make_answer(node: str) -> Any:
        async def garble(call: dict[str, Any]) -> Any:
            if not bad:
                return None
            if bad[0] == "number":
                if call["method"] != "eth_blockNumber":
                    return None
                done.append(bad.pop(0))
                return {"jsonrpc": "2.0", "id": call["id"], "result": 12}
            if call["method"] != "eth_getLogs":
                return None
            real = await forward(node, call)
            if bad[0] == "no topics" and not real.get("result"):
                return None  # (a range without logs: spoil one that has some)
            kind = bad.pop(0)
            done.append(kind)
            if kind == "garbage":
                return {"jsonrpc": "2.0", "id": call["id"], "result": "garbage"}
            if kind == "html":
                return web.Response(status=200, text="<html><body>502 Bad Gateway</body></html>",
                                    content_type="text/html")
            return {**real, "result": [{k: v for k, v in entry.items() if k != "topics"} for entry in real["result"]]}
        return garble

    doc, _ = await through_a_provider(tmp_path, token_contract, make_answer)
    assert_each_once(doc)
    assert done == ["garbage", "no topics", "html", "number"], done
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
    failures = " | ".join(r.getMessage() for r in caplog.records if "source of trigger t failed" in r.getMessage())
    for said in ("not a list of logs", "without its topics", "not a hex quantity"):
        assert said in failures, failures


async def test_an_empty_answer_from_a_node_behind_the_others_skips_no_log(tmp_path, eth_node, token_contract, caplog):
    """A load balancer answers some eth_getLogs of the newest blocks from a node that has not seen them: [] for
    logs that exist. The blocks' logsBloom says they may hold logs; read by block hash, none is skipped."""
    emptied: list[str] = []
    ranges = {"n": 0}

    def make_answer(node: str) -> Any:
        async def lag(call: dict[str, Any]) -> Any:
            query = call["params"][0] if call["method"] == "eth_getLogs" else {}
            if "toBlock" in query and len(emptied) < 20:
                ranges["n"] += 1
                if ranges["n"] % 2:  # every other range query, answered by the node behind
                    emptied.append(query["toBlock"])
                    return {"jsonrpc": "2.0", "id": call["id"], "result": []}
            return None
        return lag

    doc, _ = await through_a_provider(tmp_path, token_contract, make_answer)
    assert_each_once(doc)
    assert len(emptied) >= 5, "the proxy emptied too few answers: it tested nothing"
    assert any("a node behind the others answered" in r.getMessage() for r in caplog.records)


async def test_a_range_the_provider_suggests_in_its_refusal_is_the_one_asked_next(tmp_path, eth_node, token_contract):
    """Alchemy's refusal names a range that should work; the source asks for that many blocks next (not half)."""
    asked: list[int] = []

    async def suggest(call: dict[str, Any]) -> dict[str, Any] | None:
        if call["method"] == "eth_getLogs" and "fromBlock" in call["params"][0]:
            query = call["params"][0]
            first, last = int(query["fromBlock"], 16), int(query["toBlock"], 16)
            asked.append(last - first + 1)
            if last - first + 1 > 37:
                return {"jsonrpc": "2.0", "id": call["id"], "error": {"code": -32602, "message": (
                    "Log response size exceeded. You can make eth_getLogs requests with up to a 2K block range and "
                    "no limit on the response size, or you can request any block range with a cap of 10K logs in "
                    f"the response. Based on your parameters, this block range should work: [{hex(first)}, "
                    f"{hex(first + 36)}]")}}
        return None

    with own_anvil(tmp_path / "anvil.log") as (node, _):
        token = Token(node, token_contract)
        for n in range(20):
            token.emit_many(1, 3000 + n)
        token.mine(200)
        async with Proxy(node, suggest) as proxy:
            doc = config(tmp_path, proxy.url, token, confirmations=0, max_block_range=1000)
            async with running_daemon(doc):
                await wait_for(lambda: len(reports(doc)) >= 20, timeout=60, interval=0.2, what="all 20 logs")
    assert sorted(int(r["args"]["value"]) for r in reports(doc)) == list(range(3000, 3020))
    refused = asked.index(next(span for span in asked if span > 37))
    assert asked[refused + 1] == 37, asked[:10]  # the suggested range, not half of the refused one


async def test_an_unreachable_node_or_another_chain_is_the_triggers_error_and_the_daemon_stays_up(
        tmp_path, eth_node, token_contract):
    with own_anvil(tmp_path / "anvil.log") as (node, _):
        token = Token(node, token_contract)
        doc = config(tmp_path, node, token)
        doc["triggers"]["t"]["source"]["rpc_url"] = f"http://127.0.0.1:{free_port()}"
        doc["triggers"]["other"] = dict(doc["triggers"]["t"], source={**doc["triggers"]["t"]["source"],
                                                                      "rpc_url": node, "chain_id": 1})
        doc["triggers"]["hook"] = {"function": "f", "source": {"kind": "webhook", "path": "/hooks/h"}}
        async with running_daemon(doc, ready=False) as daemon:
            down, other = daemon.triggers["t"], daemon.triggers["other"]
            await wait_for(lambda: down.source_error, timeout=30, what="the unreachable node's error")
            assert "Ethereum node" in down.status()["last_error"] and "127.0.0.1" in down.status()["last_error"]
            await wait_for(lambda: other.stopped, timeout=30, what="the trigger on another chain to stop")
            assert "not chain 1" in other.status()["last_error"] and "refusing" in other.status()["last_error"]
            await wait_for(lambda: daemon.triggers["hook"].ready, timeout=30, what="the webhook trigger")
            assert (await daemon._ready())["sources"]["t"] is False


def test_kill_9_during_a_backfill_of_5000_logs_loses_none_and_reruns_only_batches_in_flight(
        tmp_path, eth_node, token_contract, daemon_process):
    with own_anvil(tmp_path / "anvil.log") as (node, _):
        token = Token(node, token_contract)
        for n in range(100):
            token.emit_many(50, 50 * n)
        doc = config(tmp_path, node, token, confirmations=0, max_block_range=10)
        doc["triggers"]["t"]["batch"] = {"max_events": 100, "max_wait": "50ms"}
        doc["functions"]["f"]["command"] += ["--slow"]
        doc["daemon"]["listen"] = f"127.0.0.1:{free_port()}"
        daemon = daemon_process(doc).start()
        wait_until(lambda: len(reports(doc)) >= 1000, timeout=60, interval=0.2, what="a fifth of the backfill")
        daemon.kill()
        in_flight = {i for r in store_of(doc).invocations(status="running", limit=1000) for i in r.event_ids}
        before = len(reports(doc))
        assert before < 5000, "the backfill finished before the kill: it tests nothing"
        daemon = daemon_process(doc).start()
        wait_until(lambda: len({r["id"] for r in reports(doc)}) == 5000, timeout=120, interval=0.2,
                   what="all 5000 logs after the restart")
        assert daemon.stop() == 0
    seen = reports(doc)
    assert sorted({int(r["args"]["value"]) for r in seen}) == list(range(5000))
    counts: dict[str, int] = {}
    for r in seen:
        counts[r["id"]] = counts.get(r["id"], 0) + 1
    twice = {i for i, n in counts.items() if n > 1}
    assert twice <= in_flight, "a log ran twice that was not in a batch in flight at the kill"


def reorg(token: Token, depth: int, values: list[int]) -> None:
    """``anvil_reorg``: the last ``depth`` blocks replaced by as many new ones, the k-th with a Transfer of
    ``values[k]`` (the head stays where it was)."""
    from tests.ethereum import rpc

    pairs = []
    for k, value in enumerate(values):
        call = token.contract.encode_abi("emitMany", args=[1, value])
        pairs.append([{"from": token.account, "to": token.address, "data": call, "gas": hex(500_000)}, k])
    rpc(token.url, "anvil_reorg", depth, pairs)


async def through_a_reorg(tmp_path: Path, token_contract: Any, blocks: int, depth: int) -> list[dict[str, Any]]:
    """A Transfer of value n in each of ``blocks`` blocks, with confirmations = 3; once those 3 deep are
    dispatched, the last ``depth`` blocks are replaced by blocks with the values 100, 101, …; what functions saw."""
    new = [100 + k for k in range(depth)]
    with own_anvil(tmp_path / "anvil.log") as (node, _):
        token = Token(node, token_contract)
        doc = config(tmp_path, node, token, confirmations=3)
        async with running_daemon(doc):
            for n in range(blocks):
                token.emit_many(1, n)
            await wait_for(lambda: len(reports(doc)) >= blocks - 3, timeout=30, what="the logs 3 deep")
            reorg(token, depth, new)
            token.mine(3)
            await wait_for(lambda: set(new) <= {int(r["args"]["value"]) for r in reports(doc)
                                                if r["type"] == "eventswarm.ethereum.log"},
                           timeout=60, what="the new chain's logs")
        return reports(doc)


def values_of(seen: list[dict[str, Any]], kind: str) -> list[int]:
    return sorted(int(r["args"]["value"]) for r in seen if r["type"] == kind)


async def test_a_reorg_shallower_than_confirmations_never_reaches_a_function(tmp_path, eth_node, token_contract):
    seen = await through_a_reorg(tmp_path, token_contract, blocks=10, depth=2)  # values 8 and 9 replaced
    assert values_of(seen, "eventswarm.ethereum.log") == [*range(8), 100, 101], \
        "a replaced log reached a function, or a log came twice"
    assert values_of(seen, "eventswarm.ethereum.log.removed") == []


async def test_a_reorg_deeper_than_confirmations_sends_removed_events_then_the_new_logs(
        tmp_path, eth_node, token_contract):
    seen = await through_a_reorg(tmp_path, token_contract, blocks=20, depth=5)  # 15-19 replaced; 15, 16 dispatched
    assert values_of(seen, "eventswarm.ethereum.log.removed") == [15, 16]
    assert values_of(seen, "eventswarm.ethereum.log") == [*range(17), 100, 101, 102, 103, 104]


async def test_a_reorg_while_the_daemon_was_down_sends_removed_events_for_the_logs_it_had_handed_over(
        tmp_path, eth_node, token_contract, caplog):
    """Trigger ``t`` reads through a proxy that keeps replaced blocks' logs, as geth does; trigger ``u`` reads anvil
    itself, which forgets them: it can only say so."""
    kept: dict[str, dict[str, Any]] = {}

    async def keep(call: dict[str, Any]) -> dict[str, Any] | None:
        if call["method"] != "eth_getLogs":
            return None
        answer = await forward(node, call)
        query = call["params"][0]
        if "blockHash" in query and "error" in answer and query["blockHash"] in kept:
            return {"jsonrpc": "2.0", "id": call["id"], "result": list(kept[query["blockHash"]].values())}
        for entry in answer.get("result") or []:
            kept.setdefault(entry["blockHash"], {})[entry["logIndex"]] = entry
        return answer

    new = [100 + k for k in range(5)]
    with own_anvil(tmp_path / "anvil.log") as (node, _):
        token = Token(node, token_contract)
        async with Proxy(node, keep) as proxy:
            doc = config(tmp_path, proxy.url, token, confirmations=3)
            doc["triggers"]["u"] = dict(doc["triggers"]["t"], source={**doc["triggers"]["t"]["source"], "rpc_url": node})
            async with running_daemon(doc):
                for n in range(20):
                    token.emit_many(1, n)
                await wait_for(lambda: all(len(reports(doc, t)) >= 17 for t in "tu"), timeout=30,
                               what="the logs 3 deep on both triggers")
            reorg(token, 5, new)  # while the daemon is down: the blocks of 15-19 replaced
            token.mine(3)
            async with running_daemon(doc):
                await wait_for(lambda: all(set(new) <= set(values_of(reports(doc, t), "eventswarm.ethereum.log"))
                                           for t in "tu"), timeout=60, what="the new chain's logs on both triggers")
    for trigger in "tu":
        assert values_of(reports(doc, trigger), "eventswarm.ethereum.log") == [*range(17), *new], trigger
    assert values_of(reports(doc, "t"), "eventswarm.ethereum.log.removed") == [15, 16]
    assert values_of(reports(doc, "u"), "eventswarm.ethereum.log.removed") == []
    assert any("no longer serves the replaced block" in r.getMessage() for r in caplog.records)


async def test_with_two_endpoints_a_step_runs_on_one_and_moves_whole_to_the_next_when_it_stops_answering(
        tmp_path, eth_node, token_contract):
    with own_anvil(tmp_path / "anvil.log") as (node, _):
        token = Token(node, token_contract)
        async with Proxy(node) as first, Proxy(node) as second:
            doc = config(tmp_path, node, token, confirmations=0, rpc_url=[first.url, second.url])
            async with running_daemon(doc) as daemon:
                for n in range(10):
                    token.emit_many(1, n)
                await wait_for(lambda: len(reports(doc)) >= 10, timeout=30, what="the first 10 logs")
                assert first.methods and not second.methods, "the second endpoint was used while the first answered"
                await first.stop()
                for n in range(10, 20):
                    token.emit_many(1, n)
                await wait_for(lambda: len(reports(doc)) >= 20, timeout=30, what="the next 10 logs")
                trigger = daemon.triggers["t"]
                assert trigger.ready and trigger.source_error is None, "the source restarted instead of failing over"
        values = sorted(int(r["args"]["value"]) for r in reports(doc))
    assert values == list(range(20))
    assert "eth_getLogs" in second.methods
    for proxy in (first, second):  # every log query follows a head query on the same endpoint
        for segment in " ".join(proxy.methods).split("eth_getLogs")[:-1]:
            assert "eth_blockNumber" in segment, f"a log query without its step's head query: {proxy.methods}"


async def test_a_ws_endpoint_wakes_the_poller_at_each_new_block(tmp_path, eth_node, token_contract):
    with own_anvil(tmp_path / "anvil.log") as (node, _):
        token = Token(node, token_contract)
        doc = config(tmp_path, node, token, confirmations=0, poll_interval="60s",
                     rpc_url=node.replace("http://", "ws://"))
        async with running_daemon(doc):
            for n in range(3):
                token.emit_many(1, n)
                await wait_for(lambda n=n: len(reports(doc)) > n, timeout=20,
                               what=f"log {n}, well before the next poll (60 s)")
    assert sorted(int(r["args"]["value"]) for r in reports(doc)) == [0, 1, 2]


def test_a_backfill_shows_blocks_done_of_blocks_to_do_and_the_time_left_in_status_and_the_log(
        tmp_path, eth_node, token_contract, daemon_process):
    from tests.integration.test_cli import cli

    with own_anvil(tmp_path / "anvil.log") as (node, _):
        token = Token(node, token_contract)
        for n in range(100):
            token.emit_many(1, n)
        doc = config(tmp_path, node, token, confirmations=0, max_block_range=2)
        doc["triggers"]["t"]["batch"] = {"max_events": 2, "max_wait": "10ms"}
        doc["functions"]["f"]["command"] += ["--slow"]
        doc["daemon"]["listen"] = f"127.0.0.1:{free_port()}"
        daemon = daemon_process(doc).start()
        url = f"http://127.0.0.1:{daemon.port}/v1/status"

        def reported() -> dict[str, Any] | None:
            with urllib.request.urlopen(url, timeout=10) as response:
                backfill = json.loads(response.read())["triggers"][0]["backfill"]
            return backfill if backfill and backfill["eta_seconds"] is not None else None

        report = wait_until(reported, timeout=60, interval=0.2, what="the backfill's progress in /v1/status")
        assert report["unit"] == "blocks" and report["total"] >= 100 and 0 < report["done"] < report["total"], report
        shown: list[str] = []

        def midway() -> bool:
            line = next((x for x in cli(tmp_path, "status").stdout.splitlines() if x.startswith("t: backfill")), "")
            found = re.search(r"backfill ([\d,]+) of ([\d,]+) blocks .* about \S+ left", line)
            if found and 0 < int(found[1].replace(",", "")) < int(found[2].replace(",", "")):
                shown.append(line)
            return bool(shown)

        wait_until(midway, timeout=60, interval=0.2, what="the backfill's progress in `eventswarm status`")
        with urllib.request.urlopen(url, timeout=10) as response:
            assert json.loads(response.read())["triggers"][0]["lag_unit"] == "blocks"
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}/metrics", timeout=10) as response:
            assert 'eventswarm_source_lag{trigger="t",unit="blocks"}' in response.read().decode()
        assert re.search(r"^t\s.*\d blocks", cli(tmp_path, "status").stdout, re.MULTILINE), "no LAG in blocks"
        wait_until(lambda: len(reports(doc)) >= 100, timeout=120, interval=0.5, what="all 100 logs")
        wait_until(lambda: "backfill done" in daemon.log.read_text(), timeout=30, what="the end of the backfill")
        assert json.loads(cli(tmp_path, "status", "--json").stdout)["triggers"][0]["backfill"] is None
        assert daemon.stop() == 0
    text = daemon.log.read_text()
    assert "backfill of" in text and "begins" in text
    assert re.search(r"backfill: [\d,]+ of [\d,]+ blocks \(\d+%\), [\d,]+ blocks/s, about \S+ left", text), \
        "no progress line in the log while the backfill ran"


async def test_a_node_stopped_for_10s_makes_the_source_not_ready_and_it_recovers_without_a_gap(
        tmp_path, eth_node, token_contract):
    with own_anvil(tmp_path / "anvil.log") as (node, anvil):
        token = Token(node, token_contract)
        doc = config(tmp_path, node, token, confirmations=0, request_timeout="1s")
        async with running_daemon(doc) as daemon:
            for n in range(10):
                token.emit_many(1, n)
            await wait_for(lambda: len(reports(doc)) >= 10, timeout=30, what="the first 10 logs")
            stopped_at = anyio.current_time()
            anvil.send_signal(signal.SIGSTOP)  # the same chain state when it comes back
            trigger = daemon.triggers["t"]
            await wait_for(lambda: not trigger.ready, timeout=30, what="the source to notice")
            assert (await daemon._ready())["sources"]["t"] is False
            assert "Ethereum node" in (trigger.source_error or "")
            await anyio.sleep(max(0.0, 10 - (anyio.current_time() - stopped_at)))  # the fault lasts 10 s
            anvil.send_signal(signal.SIGCONT)
            await wait_for(lambda: trigger.ready, timeout=60, what="the source to recover")
            for n in range(10, 20):
                token.emit_many(1, n)
            await wait_for(lambda: len(reports(doc)) >= 20, timeout=60, what="the next 10 logs")
        values = sorted(int(r["args"]["value"]) for r in reports(doc))
    assert values == list(range(20)), "a gap or a duplicate across the node's outage"
