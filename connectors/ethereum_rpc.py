"""The Ethereum source's JSON-RPC: endpoints (``http(s)://`` and ``ws(s)://``) tried in order with failover, answers
checked for their shape, rate limits waited out, and the yellow paper's bloom (connectors/ethereum.py reads the
chain through this)."""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import anyio
from eth_utils.crypto import keccak
from websockets.asyncio.client import connect as ws_connect

from dispatcher.api import SourceError

log = logging.getLogger("eventswarm.ethereum")

MAX_MESSAGE = 256 * 1024 * 1024
"""The largest answer read from a ``ws(s)://`` endpoint (an ``eth_getLogs`` over a busy range is large)."""
RANGE_ERRORS = re.compile(r"range|too many|limit|exceed|10000 results|response size|timeout", re.IGNORECASE)
RATE_ERRORS = re.compile(r"rate.?limit|too many requests|request count|requests per|capacity|throughput|compute units",
                         re.IGNORECASE)
"""A JSON-RPC error that says the provider is limiting this client's rate (not the range): back off, ask again."""
SUGGESTED_RANGE = re.compile(r"\[\s*(0x[0-9a-fA-F]+)\s*,\s*(0x[0-9a-fA-F]+)\s*\]")
"""A range a provider suggests in its refusal ("this block range should work: [0x…, 0x…]")."""
RATE_WAIT_FIRST, RATE_WAIT_MAX, RATE_WAIT_TOTAL = 1.0, 60.0, 600.0
"""Backing off a rate-limited endpoint: the first wait (without Retry-After), the longest, and the longest in all
before the step fails (the source then restarts, from its checkpoint)."""
_HASH = re.compile(r"^0x[0-9a-fA-F]{64}$")
_QUANTITY = re.compile(r"^0x[0-9a-fA-F]{1,16}$")
_DATA = re.compile(r"^0x([0-9a-fA-F]{2})*$")
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")


def redacted(url: str) -> str:
    """A URL as logs may show it: scheme and host, without a path or credentials that may hold a key."""
    found = re.match(r"^(\w+://)(?:[^@/]*@)?([^/?#]*)", url)
    return f"{found[1]}{found[2]}/…" if found else "a URL"


class RpcError(SourceError):
    """A request to the node failed (a temporary error: the source restarts), or the node answered an error."""

    def __init__(self, message: str, code: int | None = None) -> None:
        self.code = code
        self.detail = message
        super().__init__(f"Ethereum node: {message}")


class Unreachable(RpcError):
    """The endpoint did not answer (refused, reset, timed out, not JSON-RPC): the next one is tried."""


class Malformed(Unreachable):
    """The endpoint answered what the method never returns (a result of the wrong type, a log without its fields):
    it counts as failing, as if it had not answered."""


class RateLimited(RpcError):
    """The endpoint limits this client's rate (HTTP 429, or a JSON-RPC error saying so): wait, ask again."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # (an HTTP date: backed off as without one)


def _quantity(value: Any, what: str) -> int:
    if not isinstance(value, str) or not _QUANTITY.match(value):
        raise Malformed(f"{what} answered {_shown(value)}, not a hex quantity")
    return int(value, 16)


def _shown(value: Any) -> str:
    return f"{type(value).__name__} {json.dumps(value, default=str)[:80]}"


def block_of(value: Any, endpoint: str) -> dict[str, Any] | None:
    """An ``eth_getBlockByNumber`` answer, checked: None, or a block with its number, hash and ``logsBloom``."""
    if value is None:
        return None
    what = f"{endpoint}: eth_getBlockByNumber"
    if not isinstance(value, dict):
        raise Malformed(f"{what} answered {_shown(value)}, not a block")
    _quantity(value.get("number"), f"{what} (its number)")
    if not isinstance(value.get("hash"), str) or not _HASH.match(value["hash"]):
        raise Malformed(f"{what} answered a block without a hash")
    bloom = value.get("logsBloom")
    if bloom is not None and (not isinstance(bloom, str) or len(bloom) != 514):
        raise Malformed(f"{what} answered a block whose logsBloom is not 256 bytes")
    return value


def logs_of(value: Any, endpoint: str, first: int | None = None, last: int | None = None) -> list[dict[str, Any]]:
    """An ``eth_getLogs`` answer, checked: a list of logs, each with what the source reads, within the range asked."""
    what = f"{endpoint}: eth_getLogs"
    if not isinstance(value, list):
        raise Malformed(f"{what} answered {_shown(value)}, not a list of logs")
    for entry in value:
        if not isinstance(entry, dict):
            raise Malformed(f"{what} answered a log that is {_shown(entry)}")
        topics = entry.get("topics")
        if not isinstance(topics, list) or not all(isinstance(t, str) and _HASH.match(t) for t in topics):
            raise Malformed(f"{what} answered a log without its topics: {_shown(entry)}")
        for key, pattern in (("blockHash", _HASH), ("transactionHash", _HASH), ("address", _ADDRESS),
                             ("data", _DATA), ("blockNumber", _QUANTITY), ("logIndex", _QUANTITY)):
            if not isinstance(entry.get(key), str) or not pattern.match(entry[key]):
                raise Malformed(f"{what} answered a log whose {key} is {_shown(entry.get(key))}")
        if first is not None and last is not None and not first <= int(entry["blockNumber"], 16) <= last:
            raise Malformed(f"{what} answered a log of block {int(entry['blockNumber'], 16)}, outside {first}-{last}")
    return value


def bloom_may_hold(bloom: str, addresses: Sequence[str], topics: Sequence[str]) -> bool:
    """May a block whose ``logsBloom`` is ``bloom`` hold a log of one of ``addresses`` (any, when empty) with one of
    ``topics`` as its first topic? (The yellow paper's bloom: three 11-bit indexes from an item's keccak.)"""
    bits = int(bloom, 16)

    def present(item: str) -> bool:
        digest = keccak(bytes.fromhex(item[2:]))
        return all(bits >> (((digest[i] << 8) | digest[i + 1]) & 2047) & 1 for i in (0, 2, 4))

    return (not addresses or any(map(present, addresses))) and any(map(present, topics))


T = TypeVar("T")


class Endpoint:
    """One JSON-RPC endpoint: ``http(s)://`` (a request per call) or ``ws(s)://`` (one connection, one call at a
    time: the source's steps are sequential; the ``newHeads`` subscription has a connection of its own)."""

    def __init__(self, url: str, name: str, timeout: float) -> None:
        self.url = url
        self.name = name
        self.timeout = timeout
        self.ws = url.startswith(("ws://", "wss://"))
        self._http = None
        if not self.ws:
            # (imported here: web3 takes most of a second to import, and the CLI reads the config, hence this
            # module, at every command)
            from aiohttp import ClientConnectionError
            from web3 import AsyncHTTPProvider
            from web3.providers.rpc.utils import ExceptionRetryConfiguration


            # web3 retries a failed connection itself, quickly; an HTTP error (a 429) comes here at once, so that
            # its Retry-After is honoured (``Node.step``)
            retry = ExceptionRetryConfiguration(errors=(ClientConnectionError, TimeoutError))
            self._http = AsyncHTTPProvider(url, request_kwargs={"timeout": timeout}, exception_retry_configuration=retry)
        self._socket: Any = None
        self._ids = itertools.count(1)

    async def call(self, method: str, *params: Any) -> Any:
        """The result of ``method``; ``Unreachable`` when the endpoint does not answer, ``RpcError`` when it
        answers an error."""
        try:
            with anyio.fail_after(self.timeout):
                response = await (self._ws_request(method, list(params)) if self.ws
                                  else self._http.make_request(method, list(params)))  # type: ignore[union-attr]
        except Exception as exc:  # aiohttp, websockets, timeouts, refused connections, answers that are not JSON
            await self._drop()
            if getattr(exc, "status", None) == 429:  # (aiohttp's ClientResponseError)
                headers = getattr(exc, "headers", None) or {}
                raise RateLimited(f"{self.name}: {method}: HTTP 429 Too Many Requests",
                                  _retry_after(headers.get("Retry-After"))) from None
            raise Unreachable(f"{self.name}: {method} failed: {type(exc).__name__}: {exc}"[:300]) from None
        if not isinstance(response, dict):
            raise Unreachable(f"{self.name}: {method}: not a JSON-RPC answer")
        error: Any = response.get("error")
        if error:
            message = error.get("message", error) if isinstance(error, dict) else error
            code = error.get("code") if isinstance(error, dict) else None
            if code == 429 or RATE_ERRORS.search(str(message)):
                raise RateLimited(f"{self.name}: {method}: {message}"[:300], None)
            raise RpcError(f"{method}: {message}", code)
        if "result" not in response:
            raise Malformed(f"{self.name}: {method}: a JSON-RPC answer without a result or an error")
        return response["result"]

    async def quantity(self, method: str, *params: Any) -> int:
        return _quantity(await self.call(method, *params), f"{self.name}: {method}")

    async def block(self, tag: str) -> dict[str, Any] | None:
        return block_of(await self.call("eth_getBlockByNumber", tag, False), self.name)

    async def logs(self, query: dict[str, Any], first: int | None = None, last: int | None = None) -> list[dict[str, Any]]:
        return logs_of(await self.call("eth_getLogs", query), self.name, first, last)

    async def _ws_request(self, method: str, params: list[Any]) -> Any:
        if self._socket is None:
            self._socket = await ws_connect(self.url, max_size=MAX_MESSAGE, open_timeout=self.timeout)
        request_id = next(self._ids)
        await self._socket.send(json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}))
        while True:
            answer = json.loads(await self._socket.recv())
            if isinstance(answer, dict) and answer.get("id") == request_id:
                return answer

    async def new_heads(self) -> AsyncIterator[None]:
        """Yields at each new head, over a connection of its own, until that connection fails (it raises)."""
        async with ws_connect(self.url, max_size=MAX_MESSAGE, open_timeout=self.timeout) as socket:
            await socket.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_subscribe",
                                          "params": ["newHeads"]}))
            with anyio.fail_after(self.timeout):
                answer = json.loads(await socket.recv())
            if not isinstance(answer, dict) or "result" not in answer:
                raise RpcError(f"eth_subscribe newHeads: {(answer or {}).get('error', answer)}"[:300])
            yield  # once subscribed: a block mined while it was being set up is read now, not at the next poll
            async for _ in socket:
                yield

    async def _drop(self) -> None:
        socket, self._socket = self._socket, None
        if socket is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                await socket.close()

    async def close(self) -> None:
        await self._drop()
        if self._http is not None:
            try:
                await self._http.disconnect()
            except Exception:
                pass


class Node:
    """The endpoints, in order. A step (the head query, the log query and the block checks that go with it)
    runs on one endpoint; when that endpoint does not answer, the whole step runs again on the next one. The
    step fails (and the source restarts) only when every endpoint failed it in turn."""

    def __init__(self, urls: list[str], timeout: float) -> None:
        self.endpoints = [Endpoint(url, f"endpoint {i + 1} ({redacted(url)})", timeout) for i, url in enumerate(urls)]
        self.current = 0

    @property
    def endpoint(self) -> Endpoint:
        return self.endpoints[self.current]

    async def step(self, work: Callable[[Endpoint], Awaitable[T]]) -> T:
        failures: list[str] = []
        waited, wait = 0.0, RATE_WAIT_FIRST
        while True:
            endpoint = self.endpoint
            try:
                return await work(endpoint)
            except RateLimited as exc:
                # The step runs again, on this endpoint, after its Retry-After (else a wait that doubles): the cursor
                # stays where it is, and the source stays up while the waits add up to less than RATE_WAIT_TOTAL.
                pause = min(RATE_WAIT_MAX, exc.retry_after if exc.retry_after is not None else wait)
                if waited + pause > RATE_WAIT_TOTAL:
                    raise Unreachable(f"{exc.detail}; still limited after {waited:g}s of waiting") from None
                if waited == 0:
                    log.warning("%s: waiting %gs, then asking again", exc.detail, pause)
                await anyio.sleep(pause)
                waited += pause
                wait = min(RATE_WAIT_MAX, wait * 2)
            except Unreachable as exc:
                failures.append(exc.detail)
                if len(failures) >= len(self.endpoints):
                    raise Unreachable("; ".join(failures)[:600]) from None
                self.current = (self.current + 1) % len(self.endpoints)
                log.warning("%s; the step runs again on %s", exc, self.endpoint.name)

    async def close(self) -> None:
        for endpoint in self.endpoints:
            await endpoint.close()
