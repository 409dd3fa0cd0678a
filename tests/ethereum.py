"""Ethereum helpers for the tests: anvil nodes of the test's own, a compiled and deployed contract."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support import ROOT, SERVICES_HOME, free_port, own_service

HOME = SERVICES_HOME / "eth"
TRANSFER = "Transfer(address indexed from, address indexed to, uint256 value)"


def rpc(url: str, method: str, *params: Any) -> Any:
    import urllib.request

    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.loads(response.read())
    if "error" in answer:
        raise RuntimeError(f"{method}: {answer['error']}")
    return answer["result"]


@contextlib.contextmanager
def own_anvil(log: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """An anvil of the test's own on a free port (the test may stop it, and only it). Its binary is the
    one ``scripts/ethereum.sh`` installed (the ``eth_node`` fixture runs that script)."""
    port = free_port()
    argv = [str(HOME / "node_modules" / ".bin" / "anvil"), "--host", "127.0.0.1", "--port", str(port), *args]
    with own_service(argv, port, log, "the test's own anvil") as proc:
        yield f"http://127.0.0.1:{port}", proc


@dataclass
class Compiled:
    abi: list[dict[str, Any]]
    bytecode: str
    abi_file: Path


def compile_token(out: Path) -> Compiled:
    """tests/contracts/Token.sol compiled by solcjs (offline)."""
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(HOME / "node_modules" / ".bin" / "solcjs"), "--bin", "--abi", "-o", str(out),
                    str(ROOT / "tests" / "contracts" / "Token.sol")], check=True, capture_output=True, timeout=300,
                   cwd=ROOT / "tests" / "contracts")
    abi_file = next(out.glob("*Token.abi"))
    return Compiled(json.loads(abi_file.read_text()), next(out.glob("*Token.bin")).read_text().strip(), abi_file)


class Token:
    """A deployed Token, called from anvil's first (unlocked) account."""

    def __init__(self, url: str, compiled: Compiled) -> None:
        from web3 import Web3

        self.url = url
        self.web3 = Web3(Web3.HTTPProvider(url))
        self.account = self.web3.eth.accounts[0]
        contract = self.web3.eth.contract(abi=compiled.abi, bytecode=compiled.bytecode)
        receipt = self.web3.eth.wait_for_transaction_receipt(contract.constructor().transact({"from": self.account}))
        self.address = receipt["contractAddress"]
        self.deployed_at = receipt["blockNumber"]
        self.contract = self.web3.eth.contract(address=self.address, abi=compiled.abi)

    def emit_many(self, n: int, start: int) -> int:
        """Emit ``n`` Transfers in one transaction (one block with automine); its block number."""
        tx = self.contract.functions.emitMany(n, start).transact({"from": self.account, "gas": 5_000_000})
        return int(self.web3.eth.wait_for_transaction_receipt(tx)["blockNumber"])

    def emit_one(self, value: int) -> str:
        """Emit one Transfer in a block of its own; its event id as the source makes it."""
        tx = self.contract.functions.emitMany(1, value).transact({"from": self.account, "gas": 500_000})
        found = self.web3.eth.wait_for_transaction_receipt(tx)["logs"][0]
        return f"{self.web3.eth.chain_id}:0x{bytes(found['blockHash']).hex()}:{found['logIndex']}"

    def mine(self, blocks: int = 1) -> None:
        for _ in range(blocks):
            rpc(self.url, "evm_mine")

    def head(self) -> int:
        return int(self.web3.eth.block_number)


Answer = Callable[[dict[str, Any]], Awaitable[Any]]
"""A proxy's own answer to a call: a JSON-RPC response (a dict), an aiohttp response (any status, any body), or
None to forward the call to the node."""


class Proxy:
    """A JSON-RPC proxy of the test's own in front of a node: it records every call's method, may answer a call
    itself (``answer`` returns a response, or None to forward it), and can be stopped (connections refused)."""

    def __init__(self, node: str, answer: Answer | None = None) -> None:
        self.node = node
        self.answer = answer
        self.methods: list[str] = []
        self.url = ""
        self._runner: Any = None

    async def __aenter__(self) -> Proxy:
        from aiohttp import web

        async def handle(request: web.Request) -> web.Response:
            call = await request.json()
            self.methods.append(call["method"])
            answer = await self.answer(call) if self.answer else None
            if isinstance(answer, web.StreamResponse):
                return answer
            return web.json_response(answer if answer is not None else await forward(self.node, call))

        app = web.Application()
        app.router.add_post("/", handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/"  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def forward(node: str, call: dict[str, Any]) -> dict[str, Any]:
    """``call`` answered by ``node``."""
    from aiohttp import ClientSession

    async with ClientSession() as session, session.post(node, json=call) as response:
        return dict(await response.json())
