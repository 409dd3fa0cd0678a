"""Ethereum log source: contract logs, decoded, dispatched once they are ``confirmations`` blocks deep.

``eth_getLogs`` is polled from a durable cursor, the source of truth (no ``eth_newFilter``). The
checkpoint (``block/<chain id>``) is the number and hash of the block of the last log settled (and
which of its logs come next), kept through a ``Progress`` tracker over ``(block, logIndex)``. Before
each step the newest block handed over is checked against the chain; after a reorg deeper than
``confirmations`` the source walks back to the common ancestor, sends a ``removed`` event for each
log handed over above it, and reads the new chain from there. Backfill goes in ranges of up to
``max_block_range`` blocks, halved when the node refuses a range (JSON-RPC ``-32005`` and the usual
messages) and grown back after successes.

Decoding uses a decoder prepared once per event signature (eth-abi): addresses checksummed, integers
beyond 2^53 as decimal strings, bytes as hex. A log that cannot be decoded travels raw with the
extension ``decodeerror``; it never stops the source.

This module is the algorithm alone (cursor, reorgs, hand-over and checkpoint), read top to bottom; it is a little
over our usual length because those steps share the remembered blocks and are easier to check side by side. The
decoder is ``ethereum_abi``, the JSON-RPC with failover ``ethereum_rpc``, the keys ``ethereum_config``.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import anyio

from dispatcher.api import (
    Committer,
    Event,
    Outcome,
    Progress,
    Run,
    Source,
    SourceContext,
    SourceError,
    Span,
    rfc3339,
)

try:
    from connectors.ethereum_abi import checksummed, load_decoders
    from connectors.ethereum_config import EthereumSourceConfig
    from connectors.ethereum_rpc import (
        RANGE_ERRORS,
        SUGGESTED_RANGE,
        Endpoint,
        Node,
        RateLimited,
        RpcError,
        Unreachable,
        bloom_may_hold,
    )
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the ethereum source needs web3: pip install 'eventswarm[ethereum]'") from exc

log = logging.getLogger("eventswarm.ethereum")

END = 1 << 62
"""A log index past every real one: ``(block, END)`` stands for "every log of that block"."""
REORG_WINDOW = 256
"""Blocks handed over that are remembered (hash and events) to handle a reorg deeper than ``confirmations``."""
SAVED_RECENT = 64
"""Of those, how many hashes are kept with the checkpoint, to find the common ancestor after a restart."""
CEILING_KEPT = 100
"""Successful steps after which a range the node refused is tried again."""
BLOOM_WINDOW = 16
"""The newest blocks of a range (within this many of the head) whose empty answer is checked against their
``logsBloom``: a load-balanced endpoint may answer from a node that has not seen them yet."""



# -- the source -----------------------------------------------------------------------------------


class EthereumSource(Source[EthereumSourceConfig]):
    config_model = EthereumSourceConfig
    single_reader = True
    """Among replicas sharing a state store, one reads it at a time: the holder of its lease."""

    def __init__(self, config: EthereumSourceConfig) -> None:
        super().__init__(config)
        self.decoders = load_decoders(config.events, config.abi_file)
        self.range = config.max_block_range
        self.ceiling = config.max_block_range
        """The largest range not refused lately."""
        self.successes = 0
        self.progress: Progress[tuple[int, int]] | None = None
        self.committer = Committer(self._save, config.commit_interval)
        self.hashes: dict[int, str] = {}
        """Hashes of the blocks handed over (range ends, blocks with logs) not yet checkpointed, by number."""
        self.recent: OrderedDict[int, tuple[str, list[Event]]] = OrderedDict()
        """The last ``REORG_WINDOW`` blocks handed over (range ends, blocks with logs): their hash and events,
        to find where a reorg began and to say which logs it removed."""
        self.saved_recent: dict[int, tuple[str, int]] = {}
        """Blocks handed over before the last restart (kept with the checkpoint): their hash and how many logs were
        handed over from them (-1: not known)."""
        self.backfill_from: int | None = None
        """The block a backfill under way began after."""
        self._woken = anyio.Event()
        self.start: tuple[int, int] = (0, 0)
        """The first position not settled at the start: logs before it are not handed over again."""
        self.checkpoint: tuple[int, str] | None = None
        self.chain_id: int | None = None
        self._ctx: SourceContext | None = None
        self._node: Node | None = None

    async def run(self, ctx: SourceContext) -> None:
        self._ctx = ctx
        node = self._node = Node(self.config.endpoints(), self.config.request_timeout)
        try:
            await node.step(lambda endpoint: self._start(ctx, endpoint))
            ctx.set_ready(True)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.committer.run)
                if any(endpoint.ws for endpoint in node.endpoints):
                    tg.start_soon(self._heads, node)
                await self._poll(ctx, node)
        finally:
            with anyio.CancelScope(shield=True):
                await node.close()
                ctx.set_ready(False)

    async def _start(self, ctx: SourceContext, node: Endpoint) -> None:
        chain = await node.quantity("eth_chainId")
        saved = await ctx.checkpoints.get("chain")
        expected = self.config.chain_id if self.config.chain_id is not None else (int(saved) if saved else None)
        if expected is not None and chain != expected:
            raise SourceError(f"the node serves chain {chain}, not chain {expected} (the one "
                              f"{'configured' if self.config.chain_id is not None else 'of the saved checkpoint'}): "
                              "refusing to read from it", temporary=False)
        if saved is None:
            await ctx.checkpoints.put({"chain": str(chain)})
        self.chain_id = chain
        point = await ctx.checkpoints.get(f"block/{chain}")
        if point is not None:
            state = json.loads(point)
            self.checkpoint = (int(state["number"]), str(state["hash"]))
            self.start = (self.checkpoint[0], int(state.get("next", END + 1)))
            # [number, hash, logs handed over from it] (older checkpoints: [number, hash])
            self.saved_recent = {int(n): (str(h), int(rest[0]) if rest else -1) for n, h, *rest in state.get("recent", [])}
        else:
            head = await node.quantity("eth_blockNumber")
            start = head if self.config.from_block == "latest" else self.config.from_block
            if start > head:
                log.warning("from_block %d is ahead of the head (%d): waiting for it", start, head)
            self.checkpoint = (start - 1, "")
            self.start = _after(start - 1)
        self.progress = Progress(self.start, after=_next_log, limit=self.config.max_uncommitted)
        self.committer.trackers["chain"] = self.progress

    async def _target(self, node: Endpoint) -> int:
        confirmations = self.config.confirmations
        if isinstance(confirmations, str):
            block = await node.block(confirmations)
            return int(block["number"], 16) if block else -1
        return await node.quantity("eth_blockNumber") - confirmations

    async def _poll(self, ctx: SourceContext, node: Node) -> None:
        assert self.checkpoint is not None and self.progress is not None
        number, next_index = self.start
        cursor = number if next_index > END else number - 1  # a block partly settled is read again
        while True:
            cursor, waiting = await node.step(functools.partial(self._step, ctx, cursor=cursor))
            if waiting:
                with anyio.move_on_after(self.config.poll_interval):
                    await self._woken.wait()
                self._woken = anyio.Event()

    async def _step(self, ctx: SourceContext, node: Endpoint, *, cursor: int) -> tuple[int, bool]:
        """One step on one endpoint: check for a reorg, ask for the target block, read the logs of the next range
        and hand them over. Returns the new cursor, and whether to wait for a new block (or room) before the next."""
        assert self.progress is not None
        cursor = await self._after_reorg(ctx, node, cursor)
        target = await self._target(node)
        self._report(ctx, target)
        if target <= cursor or not self.progress.has_room(1):
            return cursor, True
        first, last = cursor + 1, min(target, cursor + self.range)
        try:
            logs = await node.logs(self._filter(first, last), first, last)
        except (Unreachable, RateLimited):
            raise  # (not the range's fault: another endpoint is tried, or the same one later)
        except RpcError as exc:
            if exc.code in (-32005, -32602) or RANGE_ERRORS.search(str(exc)):
                span = last - first + 1
                if span > 1:
                    suggested = SUGGESTED_RANGE.search(exc.detail)
                    fits = int(suggested[2], 16) - int(suggested[1], 16) + 1 if suggested else 0
                    self.range = fits if 0 < fits < span else max(1, span // 2)
                    self.ceiling, self.successes = span - 1, 0  # not that many again for a while
                    log.info("the node refused %d blocks at once (%s): asking for %d%s", span, exc, self.range,
                             " (the range it suggested)" if 0 < fits < span else "")
                    return cursor, False
            raise
        block = await node.block(hex(last))
        if block is None:
            return cursor, False  # the node is behind its own head (a load balancer): ask again
        if last > target - BLOOM_WINDOW and not await self._complete(node, logs, max(first, target - BLOOM_WINDOW + 1),
                                                                      last, block):
            return cursor, False  # an answer from a node that has not seen the newest blocks yet: ask again
        self.successes += 1
        if self.successes >= CEILING_KEPT:
            self.ceiling = self.config.max_block_range  # try larger ranges again, now and then
        self.range = min(self.config.max_block_range, self.ceiling, self.range * 2)
        await self._hand_over(ctx, logs, last, block["hash"])
        return last, False

    async def _complete(self, node: Endpoint, logs: list[dict[str, Any]], first: int, last: int,
                        last_block: dict[str, Any]) -> bool:
        """Are the logs answered for blocks ``first``..``last`` (the newest of the range) all there are? A block
        without a log in the answer whose ``logsBloom`` says it may hold one is asked again by its hash (EIP-234): a
        node that has the block answers for it exactly; a bloom's false positive then shows as no log. The logs so
        found join ``logs``. False when such a block cannot be answered for yet (the step asks again)."""
        with_logs = {int(entry["blockNumber"], 16) for entry in logs}
        topics = list(self.decoders)
        for number in range(first, last + 1):
            if number in with_logs:
                continue
            block = last_block if number == last else await node.block(hex(number))
            if block is None or block.get("logsBloom") is None:
                return block is not None  # (a node without blooms: nothing to check against)
            if not bloom_may_hold(block["logsBloom"], self.config.addresses, topics):
                continue
            query = {"blockHash": block["hash"], "topics": [topics]}
            if self.config.addresses:
                query["address"] = self.config.addresses
            try:
                found = await node.logs(query, number, number)
            except (Unreachable, RateLimited):
                raise
            except RpcError as exc:  # (the node behind the balancer does not know the block yet)
                log.info("block %d may hold logs the answer lacked, and %s cannot say yet (%s): asking again",
                         number, node.name, exc)
                return False
            if found:
                log.warning("%s answered no log for block %d, which has %d: a node behind the others answered; "
                            "they are read by the block's hash", node.name, number, len(found))
                logs.extend(found)
        return True

    def _report(self, ctx: SourceContext, target: int) -> None:
        """The lag: blocks between the newest one deep enough to dispatch and the checkpoint. More than one
        range behind, a backfill begins: its progress (blocks checkpointed of blocks to do) goes to the daemon."""
        assert self.checkpoint is not None
        settled = self.checkpoint[0]
        ctx.set_lag(max(0, target - settled), "blocks")
        if self.backfill_from is None and target - settled > self.range:
            self.backfill_from = settled
        if self.backfill_from is not None:
            ctx.set_backfill(max(0, settled - self.backfill_from), max(0, target - self.backfill_from), "blocks")
            if settled >= target:
                self.backfill_from = None

    async def _heads(self, node: Node) -> None:
        """While the endpoint in use is ``ws(s)://``, a ``newHeads`` subscription wakes the poller at each new
        block; polling stays the source of truth (a lost subscription only means waiting ``poll_interval``)."""
        while True:
            endpoint = node.endpoint
            if endpoint.ws:
                try:
                    async for _ in endpoint.new_heads():
                        self._woken.set()
                except Exception as exc:
                    log.info("the newHeads subscription on %s ended (%s: %s): polling every %ss meanwhile",
                             endpoint.name, type(exc).__name__, str(exc)[:200], self.config.poll_interval)
            await anyio.sleep(max(1.0, self.config.poll_interval))

    async def _after_reorg(self, ctx: SourceContext, node: Endpoint, cursor: int) -> int:
        """Before each step: is the newest block handed over (or checkpointed) still on the chain? If not, a
        reorg went deeper than ``confirmations``: walk back to the common ancestor, send a ``removed`` event for
        each log handed over above it, and go on from there. Returns the block to read after."""
        known = {**{n: h for n, (h, _) in self.saved_recent.items()}, **{n: h for n, (h, _) in self.recent.items()}}
        assert self.checkpoint is not None
        if self.checkpoint[1]:
            known.setdefault(*self.checkpoint)
        if not known:
            return cursor
        top = max(known)
        block = await node.block(hex(top))
        if block is None or block["hash"] == known[top]:
            return cursor
        ancestor = None
        for number in sorted(known, reverse=True):
            block = await node.block(hex(number))
            if block is not None and block["hash"] == known[number]:
                ancestor = number
                break
        if ancestor is None:
            raise SourceError(f"a reorg replaced block {top} and every one of the {len(known)} blocks remembered "
                              f"below it (down to {min(known)}): the trigger stops rather than guess where the "
                              "chains meet", temporary=False)
        replaced = [event for number, (_, events) in self.recent.items() if number > ancestor for event in events]
        replaced += await self._before_restart(node, ancestor)
        log.warning("reorg: the blocks after %d were replaced (a reorg deeper than confirmations = %s); %d logs "
                    "handed over from them are sent again as removed, then the new chain's logs follow", ancestor,
                    self.config.confirmations, len(replaced))
        assert self.progress is not None
        await self.progress.idle()  # what is in flight settles first: positions above the ancestor are reused
        if replaced:
            await self._send_removed(ctx, replaced)
        self.recent = OrderedDict((n, v) for n, v in self.recent.items() if n <= ancestor)
        self.saved_recent = {n: v for n, v in self.saved_recent.items() if n <= ancestor}
        self.hashes = {n: h for n, h in self.hashes.items() if n <= ancestor}
        self.hashes[ancestor] = known[ancestor]
        self.start = _after(ancestor)
        self.progress = Progress(self.start, after=_next_log, limit=self.config.max_uncommitted)
        self.committer.trackers["chain"] = self.progress
        self.progress.committed = (-1, 0)
        await self.committer.save()  # the checkpoint moves back to the ancestor
        return ancestor

    async def _before_restart(self, node: Endpoint, ancestor: int) -> list[Event]:
        """The logs handed over before the last restart from blocks above ``ancestor`` that a reorg replaced: read
        again by block hash (nodes such as geth keep replaced blocks for a while). Those the node no longer serves
        are named in a warning: they get no removed event."""
        found: list[Event] = []
        lost: list[str] = []
        received = time.time()
        for number, (block_hash, count) in sorted(self.saved_recent.items()):
            if number <= ancestor or number in self.recent or count == 0:
                continue
            query = {"blockHash": block_hash, "topics": [list(self.decoders)]}
            if self.config.addresses:
                query["address"] = self.config.addresses
            try:
                logs = await node.logs(query)
            except (Unreachable, RateLimited):
                raise
            except RpcError as exc:
                lost.append(f"block {number} ({count if count >= 0 else 'some'} logs: {exc})")
                continue
            for entry in sorted(logs or [], key=lambda e: int(e["logIndex"], 16)):
                event = self._event(entry, received)
                if _position(event) < self.start:  # handed over (and settled) before the restart
                    found.append(event)
        if lost:
            log.warning("reorg while the daemon was down: the node no longer serves the replaced %s; the logs "
                        "handed over from them get no removed event", "; ".join(lost)[:1000])
        return found

    async def _send_removed(self, ctx: SourceContext, replaced: list[Event]) -> None:
        """One ``eventswarm.ethereum.log.removed`` event per replaced log; returns once all are settled."""
        settled = anyio.Event()
        remaining = len(replaced)

        async def ack(part: Run, outcome: Outcome) -> None:
            nonlocal remaining
            remaining -= len(part)
            if remaining <= 0:
                settled.set()

        events = [Event(id=f"{e.id}:removed", source=e.source, type="eventswarm.ethereum.log.removed",
                        subject=e.subject, time=rfc3339(time.time()), data={**(e.data or {}), "removed": True},
                        datacontenttype="application/json", extensions={**(e.extensions or {}), "removed": True},
                        partition=e.partition) for e in replaced]
        await ctx.emit_run(Run.of(events, ack))
        await settled.wait()

    def _filter(self, first: int, last: int) -> dict[str, Any]:
        query: dict[str, Any] = {"fromBlock": hex(first), "toBlock": hex(last), "topics": [list(self.decoders)]}
        if self.config.addresses:
            query["address"] = self.config.addresses
        return query

    async def _hand_over(self, ctx: SourceContext, logs: list[dict[str, Any]], last: int, last_hash: str) -> None:
        assert self.progress is not None
        self.hashes[last] = last_hash
        entries = [(int(e["blockNumber"], 16), int(e["logIndex"], 16), e) for e in logs if not e.get("removed")]
        entries = sorted(e for e in entries if (e[0], e[1]) >= self.start)  # before it: settled before a restart
        for block, _, entry in entries:
            self.hashes[block] = entry["blockHash"]
        self._remember(last, last_hash, [])
        positions = [(b, i) for b, i, _ in entries] + [(last, END)]
        span = self.progress.track_nowait(positions)
        span.settle([(last, END)])  # the range's end needs no settling of its own
        if not entries:
            return
        received = time.time()
        events = [self._event(entry, received) for _, _, entry in entries]
        for event, (block, _, entry) in zip(events, entries, strict=True):
            self._remember(block, entry["blockHash"], [event])
        await ctx.emit_run(Run.of(events, self._settle, token=span))

    def _remember(self, block: int, block_hash: str, events: list[Event]) -> None:
        known = self.recent.get(block)
        if known is None:
            self.recent[block] = (block_hash, events)
            self.recent.move_to_end(block)
            while len(self.recent) > REORG_WINDOW:
                self.recent.popitem(last=False)
        else:
            known[1].extend(events)

    def _event(self, entry: Mapping[str, Any], received: float) -> Event:
        topics = entry.get("topics") or []
        decoder = self.decoders.get(topics[0]) if topics else None
        address = checksummed(entry["address"])
        extensions: dict[str, Any] = {
            "address": address, "blocknumber": int(entry["blockNumber"], 16), "blockhash": entry["blockHash"],
            "transactionhash": entry["transactionHash"], "logindex": int(entry["logIndex"], 16)}
        data: dict[str, Any] = {
            "address": address, "event": decoder.name if decoder else None,
            "blockNumber": extensions["blocknumber"], "blockHash": entry["blockHash"],
            "transactionHash": entry["transactionHash"], "logIndex": extensions["logindex"]}
        try:
            if decoder is None:
                raise ValueError("no configured event has this log's first topic")
            data["args"] = decoder.decode(topics, entry.get("data", "0x"))
            extensions["event"] = decoder.name
        except ValueError as exc:
            data["topics"], data["data"] = topics, entry.get("data", "0x")
            extensions["decodeerror"] = str(exc)[:200]
        return Event(
            id=f"{self.chain_id}:{entry['blockHash']}:{extensions['logindex']}", source=f"ethereum:{self.chain_id}",
            type="eventswarm.ethereum.log", subject=address, time=rfc3339(received), data=data,
            datacontenttype="application/json", extensions=extensions, partition=address, received=received)

    async def _settle(self, part: Run, outcome: Outcome) -> None:
        span: Span[tuple[int, int]] = part.token
        span.settle(part.payloads, key=_position)
        # Saved with the acknowledgement (the same transaction as the batch's other acknowledgements):
        # after a crash, only batches in flight run again.
        await self.committer.save()

    async def _save(self, positions: Mapping[Any, tuple[int, int]]) -> None:
        """Checkpoint the committable position: the block of the last settled log (its hash known from the log or
        as a range end), and where in it reading resumes (``next``: every log of it, when the block is done)."""
        ctx = self._ctx
        committable = positions.get("chain")
        if ctx is None or committable is None:
            return
        number, following = committable
        if number not in self.hashes:
            return  # (a position at the start: nothing new)
        block_hash = self.hashes[number]
        known = {**self.saved_recent, **{n: (h, len(events)) for n, (h, events) in self.recent.items()}}
        recent = [[n, h, count] for n, (h, count) in known.items() if n <= number][-SAVED_RECENT:]
        await ctx.checkpoints.put({f"block/{self.chain_id}": json.dumps(
            {"number": number, "hash": block_hash, "next": following, "recent": recent})})
        self.checkpoint = (number, block_hash)
        for b in [b for b in self.hashes if b < number]:
            del self.hashes[b]


def _position(event: Event) -> tuple[int, int]:
    extensions = event.extensions or {}
    return extensions["blocknumber"], extensions["logindex"]


def _after(block: int) -> tuple[int, int]:
    """Where reading resumes after every log of ``block``."""
    return (block, END + 1)


def _next_log(position: tuple[int, int]) -> tuple[int, int]:
    return (position[0], position[1] + 1)
