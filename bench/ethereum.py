"""Ethereum benchmark: logs/s dispatched during a backfill, against two loops over the same range, in the same run.

Prints its figures and writes them to bench/results/ethereum.json. Needs anvil and solc
(`make services`). Run: `.venv/bin/python bench/ethereum.py`.

- daemon: LOGS Transfer logs (TX_LOGS per transaction) on an anvil of the bench's own; an ethereum
  trigger (confirmations 0) backfills them from the contract's deployment through the process
  executor (`cat >/dev/null`, batches of BATCH); timed from the daemon's start until every log is
  acknowledged;
- fetch limit: a raw `eth_getLogs` loop (web3, no decoding) over the same blocks, in ranges of RANGE;
- user's loop: the same, with web3's `process_log` decoding each log, as a user would write it.

Each is the median of ROUNDS runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.files import timed  # noqa: E402
from dispatcher.config import parse  # noqa: E402
from dispatcher.daemon import Daemon  # noqa: E402
from tests.ethereum import TRANSFER, Token, compile_token, own_anvil  # noqa: E402

LOGS = 10_000
TX_LOGS = 200
BATCH = 1000
RANGE = 2000
ROUNDS = 3


def fetch_loop(token: Token, first: int, last: int, decode: bool) -> float:
    web3 = token.web3
    event = token.contract.events.Transfer()
    started = time.perf_counter()
    count = 0
    for start in range(first, last + 1, RANGE):
        logs = web3.eth.get_logs({"fromBlock": start, "toBlock": min(last, start + RANGE - 1),
                                  "address": token.address})
        if decode:
            for entry in logs:
                event.process_log(entry)
        count += len(logs)
    assert count == LOGS, count
    return count / (time.perf_counter() - started)


async def through_daemon(work: Path, node: str, token: Token) -> float:
    doc = parse({
        "daemon": {"state": f"sqlite:///{work}/state.db", "listen": "127.0.0.1:0"},
        "executor": {"kind": "process", "max_in_flight": 4},
        "functions": {"f": {"command": ["sh", "-c", "cat >/dev/null"], "timeout": "60s"}},
        "triggers": {"t": {"function": "f", "ordering": "none", "max_in_flight": 4, "buffer": 4 * BATCH,
                           "source": {"kind": "ethereum", "rpc_url": node, "addresses": [token.address],
                                      "events": [TRANSFER], "from_block": token.deployed_at, "confirmations": 0,
                                      "max_block_range": RANGE},
                           "batch": {"max_events": BATCH, "max_bytes": "64MiB", "max_wait": "50ms"}}},
    })
    daemon = Daemon(doc)
    acked = daemon.metrics.events_acked.labels("t")
    return LOGS / await timed(daemon, lambda: acked._value.get() >= LOGS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch, own_anvil(Path(scratch) / "anvil.log") as (node, _):
        token = Token(node, compile_token(Path(scratch) / "solc"))
        for n in range(LOGS // TX_LOGS):
            last = token.emit_many(TX_LOGS, n * TX_LOGS)
        first = token.deployed_at
        daemon_rates, raw_rates, user_rates = [], [], []
        for _ in range(args.rounds):
            raw_rates.append(fetch_loop(token, first, last, decode=False))
            user_rates.append(fetch_loop(token, first, last, decode=True))
            with tempfile.TemporaryDirectory() as work:
                daemon_rates.append(anyio.run(through_daemon, Path(work), node, token))
    daemon_rate, raw_rate, user_rate = (statistics.median(r) for r in (daemon_rates, raw_rates, user_rates))
    print(f"ethereum backfill of {LOGS} Transfer logs ({TX_LOGS} per block), process executor, batches of {BATCH}:")
    print(f"    raw get_logs loop, no decoding (the fetch limit): {raw_rate:.0f} logs/s")
    print(f"    get_logs + web3 process_log (the user's loop): {user_rate:.0f} logs/s")
    print(f"    eventswarm ethereum source: {daemon_rate:.0f} logs/s -> {daemon_rate / user_rate:.2f}x the user's loop "
          f"(target >= 1.5x), {daemon_rate / raw_rate:.2f}x the fetch limit (target >= 0.6x); medians of {args.rounds}")
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    out = results / "ethereum.json"
    out.write_text(json.dumps({
        "logs": LOGS, "per_block": TX_LOGS, "batch": BATCH, "daemon_logs_per_s": round(daemon_rate, 1),
        "fetch_limit_logs_per_s": round(raw_rate, 1), "user_loop_logs_per_s": round(user_rate, 1),
        "vs_user_loop": round(daemon_rate / user_rate, 3), "vs_fetch_limit": round(daemon_rate / raw_rate, 3),
        "rounds": {"daemon": daemon_rates, "raw": raw_rates, "user": user_rates}}, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
