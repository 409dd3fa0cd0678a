"""What connectors may use: the event model, the source base classes and the context a source runs in.

A connector imports the daemon only through this module (import-linter checks it).

Runs and their acknowledgements (``Run``, ``RunAck``), the contract every source can rely on:

- A source hands over events one at a time (``emit``, with a per-event ``Ack``) or as a ``Run``
  (``emit_run``). A run's events are queued, batched and settled in order of ``run.ids``.
- ``run.ack(part, outcome)`` is called once for every *part* of the run when that part is settled:
  the whole run, or slices of it (a batch limit cut it, bisect split a failed batch, a partial
  failure named some of its events). ``part.ids`` and ``part.payloads`` say exactly which events
  the call covers; together, the parts cover every event of the run exactly once, in no given
  order. ``outcome.status`` is ``succeeded``, ``dead-lettered`` or ``dropped``: each means the
  event is done with, and the source may acknowledge it at its origin (commit the offset,
  checkpoint the block, move the file).
- ``part.token`` is the run's ``token``, shared by all its parts: the source's own handle on the
  run (a Kafka span), so that it can find what a part belongs to without a lookup.
- Nothing is acknowledged before it is settled, and an event handed back at shutdown is never
  acknowledged: it must come again from its origin.
- An acknowledgement that raises ``StoreError`` is tried again while the store fails. Any other
  exception fails the source, as if its ``run`` had raised a temporary ``SourceError``: ``/readyz``
  and ``status`` show why, ``eventswarm_source_errors_total`` counts it, and the source is
  cancelled (it saves what is settled) and restarted, so the events the failed acknowledgement
  covers come again from their origin. Bound what an acknowledgement waits for (a broker that does
  not answer) and raise ``SourceError`` with a one-line reason past it: a source never stalls silently.

A position-based source (offsets, bytes, blocks) tracks its items with ``Progress`` and saves with
``Committer``. ``dispatcher.testing.StubContext`` runs a source in a test, settling what the test
says; ``tests/unit/test_connector_contract.py`` holds what every connector must pass.

Checkpoints (``ctx.checkpoints``) are kept per trigger; name their keys after what they hold, as
``<what>/<where>``: ``offset/<topic>/<partition>``, ``file/<device>:<inode>``, ``block/<chain id>``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict

from dispatcher.errors import SourceError, StoreError
from dispatcher.events import (
    Event,
    Outcome,
    Run,
    RunAck,
    new_id,
    pairs_json,
    parse_json,
    rfc3339,
    rfc3339_ms,
    traceparent,
)
from dispatcher.paths import ConfigPath
from dispatcher.progress import Committer, Progress, Span
from dispatcher.secrets import Secret
from dispatcher.units import Duration, Size

__all__ = [
    "Ack",
    "Checkpoints",
    "Committer",
    "ConfigPath",
    "Duration",
    "Event",
    "HttpHandler",
    "HttpRequest",
    "HttpResponse",
    "Inbox",
    "Outcome",
    "Progress",
    "Run",
    "RunAck",
    "Secret",
    "Size",
    "Source",
    "SourceConfig",
    "SourceContext",
    "SourceError",
    "Span",
    "StoreError",
    "new_id",
    "pairs_json",
    "parse_json",
    "rfc3339",
    "rfc3339_ms",
    "traceparent",
]


class SourceConfig(BaseModel):
    """Base of every connector's config model; the connector declares ``kind: Literal["..."]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: str

    def folders(self) -> list[str]:
        """Host folders a function may be handed paths in (``validate`` warns when no mount covers one)."""
        return []

    def exclusive(self) -> list[str]:
        """What no two triggers may share, e.g. a webhook's ``"POST /hooks/x"``: ``validate`` refuses a second claim."""
        return []

    def upcoming(self, count: int, after: float) -> list[datetime] | None:
        """For a source that fires on a schedule: its next ``count`` times after ``after`` (Unix seconds), on its
        zone's wall clock (``eventswarm schedule next``). None for a source that does not."""
        return None

    def warnings(self) -> list[tuple[str, str]]:
        """What ``validate`` points out without refusing the config, as ``(key, message)``: what this host shows
        now will fail at run time (a folder that is not there)."""
        return []


ConfigT = TypeVar("ConfigT", bound=SourceConfig)


Ack = Callable[[Outcome], Awaitable[None]]
"""Called once per emitted event when it is settled; the source acknowledges it there."""


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """A request to a source's route. ``headers`` is case-insensitive: ``headers.get("content-type")``."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes
    query: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, doc: Any, headers: Mapping[str, str] | None = None) -> HttpResponse:
        import json

        return cls(status, json.dumps(doc).encode(), {"Content-Type": "application/json", **(headers or {})})


HttpHandler = Callable[[HttpRequest], Awaitable[HttpResponse]]


class Checkpoints(Protocol):
    """A source's durable positions (offsets, blocks, file states), by key, per trigger."""

    async def get(self, key: str) -> str | None: ...

    async def get_many(self, keys: list[str]) -> dict[str, str]:
        """The values of those of ``keys`` that are saved."""
        ...

    async def put(self, values: Mapping[str, str]) -> None: ...

    async def forget(self, prefix: str, before: float) -> None:
        """Delete the keys starting with ``prefix`` last saved before ``before`` (a time): memory bounded by age."""
        ...

    async def delete(self, keys: list[str]) -> None: ...

    async def items(self, prefix: str, limit: int = 100_000) -> dict[str, str]:
        """The keys starting with ``prefix`` and their values (at most ``limit``, in key order)."""
        ...


class Inbox(Protocol):
    """Durable storage for accepted events not yet settled (the webhook inbox)."""

    async def put(self, event: Event, dedupe_key: str | None = None) -> str | None:
        """Store ``event``; if ``dedupe_key`` was seen before, store nothing and return the earlier event id."""
        ...

    async def remove(self, event_id: str, *, forget_dedupe: bool = False) -> None: ...

    async def pending(self) -> AsyncIterator[Event]:
        """The events this replica stored so far (a snapshot), oldest first, read in pages."""
        ...

    async def claim(self) -> list[Event]:
        """Take over a page of the events that replicas now gone stored (oldest first; [] when there are none)."""
        ...

    async def orphaned(self) -> None:
        """Return when a replica was taken over (its events are there to ``claim``)."""
        ...


class SourceContext(Protocol):
    """What a running source gets from the daemon for its trigger."""

    @property
    def trigger(self) -> str:
        """The trigger's name."""
        ...

    @property
    def replica(self) -> str:
        """This daemon's name among replicas (``daemon.replica``; by default its host name and port): the same
        after a restart, so a source may name a client session after it."""
        ...

    @property
    def checkpoints(self) -> Checkpoints: ...

    @property
    def inbox(self) -> Inbox: ...

    async def emit(self, event: Event, ack: Ack | None = None) -> None:
        """Hand ``event`` to the trigger's pipeline; blocks while the trigger's buffer is full."""
        ...

    async def offer(self, event: Event, ack: Ack | None = None) -> bool:
        """``emit`` without waiting: False, and nothing taken, when the buffer is full."""
        ...

    async def emit_run(self, run: Run) -> None:
        """Hand over a run of events at once (much cheaper per event than ``emit``); blocks while the buffer is full."""
        ...

    async def offer_run(self, run: Run) -> bool:
        """``emit_run`` without waiting: False, and nothing taken, when the buffer has no room for the run."""
        ...

    async def invoke(self, event: Event) -> Outcome:
        """Run ``event`` now as a batch of one, once, and return how it ended (``mode = "sync"``). An event the trigger's
        ``filter`` keeps out does not run: its outcome is ``dropped``."""
        ...

    def add_route(self, method: str, path: str, handler: HttpHandler, *, max_body: int) -> None:
        """Serve ``method path`` on the daemon's HTTP server."""
        ...

    def set_ready(self, ready: bool, error: str | None = None) -> None:
        """Report whether the source is connected (for ``/readyz`` and ``status``)."""
        ...

    def set_lag(self, lag: float, unit: str = "events") -> None:
        """Report how far behind the source is, in ``unit`` (``records``, ``blocks``, ``files``, ``bytes``)."""
        ...

    def set_paused(self, paused: bool) -> None:
        """Report that the source stopped reading (the buffer is full, or its own cap is reached), or resumed."""
        ...

    def set_schedule(self, next_tick: float | None, last_tick: float | None) -> None:
        """Report a schedule's next tick and the last one fired (Unix seconds; ``status`` and the status page)."""
        ...

    def dropped(self, reason: str, count: int = 1) -> None:
        """Count ``count`` events the source let go of on purpose, by ``reason`` (a schedule's skipped ticks:
        ``missed``, ``overlap``): ``eventswarm_events_dropped_total{reason}``. The source logs why."""
        ...

    def set_backfill(self, done: float, total: float, unit: str) -> None:
        """Report a catch-up under way: ``done`` of ``total`` ``unit`` since it began (the daemon logs it every
        few seconds with a rate and the time left, and ``status`` shows it). ``done >= total`` ends it."""
        ...


class Source(Generic[ConfigT]):
    """A connector: constructed with its validated config, run inside the trigger's task group."""

    config_model: ClassVar[type[SourceConfig]]
    single_reader: bool = False
    """True for a source that must have one reader (a folder, a chain): with replicas, it runs on the holder of its
    lease only, and its checkpoint writes are fenced by the lease (refused once another replica may read it). A
    source may decide it from its config (set it in ``__init__``)."""

    def __init__(self, config: ConfigT) -> None:
        self.config = config

    async def run(self, ctx: SourceContext) -> None:
        """Read events and ``ctx.emit`` them until cancelled."""
        raise NotImplementedError

    async def replayed(self, event: Event) -> None:
        """A dead letter of this source's event, sent again (``eventswarm dlq replay``), succeeded: tidy what the
        source left of it when it was dead-lettered (the file source moves the file out of its failed folder).
        Default: nothing."""
