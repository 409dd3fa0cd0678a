"""Webhook source: HTTP requests become events, stored durably before they are answered.

``mode = "async"``: the event goes to the inbox (the state store) and the request is answered
``202 {"id": …}``; an accepted event survives a crash and runs after restart (or, with replicas, at another
replica once this one is taken over). ``mode = "sync"``:
the event runs at once as a batch of one, and the function's stdout is the response body.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import time
from collections.abc import Mapping
from typing import Literal

import anyio
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from dispatcher.api import (
    ConfigPath,
    Duration,
    Event,
    HttpRequest,
    HttpResponse,
    Outcome,
    Secret,
    Size,
    Source,
    SourceConfig,
    SourceContext,
    StoreError,
    pairs_json,
    parse_json,
    traceparent,
)

RESERVED_PATHS = ("/healthz", "/readyz", "/metrics", "/v1")
JSON = {"Content-Type": "application/json"}
STORE_RETRY_AFTER = "5"
"""Retry-After, in seconds, when the state store cannot take an event (a full disk)."""


class SignatureConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    scheme: Literal["github", "standard-webhooks", "stripe", "hmac-sha256"]
    secret_env: str | list[str] = ""
    """Environment variable holding the secret (spaces are part of it); during a rotation, a list of them."""
    secret_file: ConfigPath = ""
    """File holding the secret(s), one per line, instead of ``secret_env``."""
    header: str = ""
    """hmac-sha256 only: the header carrying the signature (default ``X-Signature``)."""
    tolerance: Duration = 300.0
    """standard-webhooks and stripe: how far the signed timestamp may be from now, either way."""

    @model_validator(mode="after")
    def _secret(self) -> SignatureConfig:
        problem = Secret.of(self.secret_env, self.secret_file).problem("secret")
        if problem:
            raise ValueError(problem)
        self.secrets()  # a standard-webhooks secret that is not base64 is a config error, found by validate
        return self

    def secrets(self) -> list[bytes]:
        secrets = []
        for word in Secret.of(self.secret_env, self.secret_file).values():
            if self.scheme == "standard-webhooks":
                try:
                    secrets.append(base64.b64decode(word.strip().removeprefix("whsec_"), validate=True))
                except binascii.Error:
                    where = self.secret_file or ", ".join([self.secret_env] if isinstance(self.secret_env, str)
                                                          else self.secret_env)
                    raise ValueError(f"a standard-webhooks secret is base64 after whsec_: {where}") from None
            else:
                secrets.append(word.encode())
        return secrets


class WebhookSourceConfig(SourceConfig):
    kind: Literal["webhook"]
    path: str
    """Where requests arrive, e.g. ``/hooks/github``."""
    methods: list[str] = ["POST"]
    mode: Literal["async", "sync"] = "async"
    max_body: Size = 1024 * 1024
    """Larger bodies are answered ``413``."""
    signature: SignatureConfig | None = None
    dedupe_header: str = ""
    """A header with a delivery id (e.g. ``X-GitHub-Delivery``): a repeated id is answered ``200`` and not run again.
    Default: ``webhook-id`` under the ``standard-webhooks`` signature (its spec asks receivers to dedupe on it)."""
    enqueue_timeout: Duration = 2.0
    """While the buffer stays full this long, requests are answered ``503`` with ``Retry-After``."""
    headers: list[str] = []
    """Request headers (names, any case) handed to the function, in the extension ``httpheaders``."""
    query: bool = False
    """Hand the query string's parameters to the function, in the extension ``httpquery``."""

    @field_validator("headers")
    @classmethod
    def _header_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not name or not all(c.isascii() and (c.isalnum() or c in "!#$%&'*+-.^_`|~") for c in name):
                raise ValueError(f"{name!r} is not a header name")
        return [name.lower() for name in value]

    def exclusive(self) -> list[str]:
        return [f"{method} {self.path}" for method in self.methods]

    @property
    def delivery_header(self) -> str:
        """The header (lower case) whose value a delivery is deduplicated on; "" for none."""
        if self.dedupe_header:
            return self.dedupe_header.lower()
        return "webhook-id" if self.signature is not None and self.signature.scheme == "standard-webhooks" else ""

    def delivery_id(self, headers: Mapping[str, str]) -> str | None:
        """The request's delivery id, if the source dedupes on one (standard-webhooks: ``webhook-id``, or Svix's
        ``svix-id``)."""
        name = self.delivery_header
        if not name:
            return None
        return headers.get(name) or (headers.get("svix-id") if name == "webhook-id" else None) or None

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"path must start with /, got {value!r}")
        if value == "/" or any(value == p or value.startswith(p + "/") for p in RESERVED_PATHS):  # (/ is the page)
            raise ValueError(f"path {value!r} is reserved for the daemon's own endpoints")
        return value

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        allowed = {"GET", "POST", "PUT", "PATCH", "DELETE"}
        upper = [m.upper() for m in value]
        bad = [m for m in upper if m not in allowed]
        if bad or not upper:
            raise ValueError(f"methods must be some of {sorted(allowed)}, got {value!r}")
        return upper


class SignatureError(Exception):
    """The request's signature is missing, malformed, stale or wrong."""


def verify(config: SignatureConfig, secrets: list[bytes], headers: Mapping[str, str], body: bytes,
           now: float | None = None) -> None:
    """Check ``body``'s signature against every secret (constant-time); raise ``SignatureError`` if none matches."""
    if config.scheme == "github":
        given = headers.get("x-hub-signature-256", "")
        if not given.startswith("sha256="):
            raise SignatureError("missing X-Hub-Signature-256")
        candidates = [_utf8(given.removeprefix("sha256=").strip().lower())]
        expected = [hmac.new(s, body, hashlib.sha256).hexdigest().encode() for s in secrets]
    elif config.scheme == "hmac-sha256":
        given = headers.get((config.header or "X-Signature").lower(), "").strip()
        if not given:
            raise SignatureError(f"missing {config.header or 'X-Signature'}")
        given = given.removeprefix("sha256=")
        digests = [hmac.new(s, body, hashlib.sha256).digest() for s in secrets]
        candidates = [_utf8(given.lower()), _utf8(given)]
        expected = [d.hex().encode() for d in digests] + [base64.b64encode(d) for d in digests]
    elif config.scheme == "stripe":
        # Stripe-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex> during a rotation][,v0=<hex>, not checked]
        given = headers.get("stripe-signature", "")
        fields = [part.split("=", 1) for part in given.split(",") if "=" in part]
        stamps = [value.strip() for key, value in fields if key.strip() == "t"]
        candidates = [_utf8(value.strip().lower()) for key, value in fields if key.strip() == "v1"]
        if not stamps or not candidates:
            raise SignatureError("missing Stripe-Signature, or its t= or v1=")
        stamp = stamps[0]
        if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
            raise SignatureError("the Stripe-Signature timestamp is not a number of seconds")
        if abs((time.time() if now is None else now) - int(stamp)) > config.tolerance:
            raise SignatureError("the Stripe-Signature timestamp is outside the tolerance")
        signed = _utf8(f"{stamp}.") + body
        expected = [hmac.new(s, signed, hashlib.sha256).hexdigest().encode() for s in secrets]
    else:
        # (Svix, which the spec came from, sends the same three as svix-id, svix-timestamp and svix-signature)
        prefix = "webhook" if "webhook-signature" in headers or "svix-signature" not in headers else "svix"
        msg_id = headers.get(f"{prefix}-id", "")
        stamp = headers.get(f"{prefix}-timestamp", "")
        given = headers.get(f"{prefix}-signature", "")
        if not (msg_id and stamp and given):
            raise SignatureError("missing webhook-id, webhook-timestamp or webhook-signature")
        if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
            raise SignatureError(f"{prefix}-timestamp is not a number of seconds")
        if abs((time.time() if now is None else now) - int(stamp)) > config.tolerance:
            raise SignatureError(f"{prefix}-timestamp is outside the tolerance")
        signed = _utf8(f"{msg_id}.{stamp}.") + body
        expected = [base64.b64encode(hmac.new(s, signed, hashlib.sha256).digest()) for s in secrets]
        candidates = [_utf8(part.split(",", 1)[1]) for part in given.split() if part.startswith("v1,")]
    ok = False
    for candidate in candidates:
        for want in expected:
            ok |= hmac.compare_digest(candidate, want)
    if not ok:
        raise SignatureError("signature does not match")


def _accepted(event: Event) -> HttpResponse:
    """``202 {"id": …}``, built without a JSON encoder (an id is hex)."""
    return HttpResponse(202, b'{"id": "%s"}' % event.id.encode(), JSON)


def _utf8(text: str) -> bytes:
    """A header value as bytes; characters that cannot be encoded (a non-UTF-8 header) only make it not match."""
    return text.encode("utf-8", "replace")


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


class WebhookSource(Source[WebhookSourceConfig]):
    config_model = WebhookSourceConfig

    async def run(self, ctx: SourceContext) -> None:
        config = self.config
        self._ctx = ctx
        self._secrets = config.signature.secrets() if config.signature else []
        backlog = await ctx.inbox.pending()  # a snapshot taken before new requests can arrive
        for method in config.methods:
            ctx.add_route(method, config.path, self.handle, max_body=config.max_body)
        async for event in backlog:
            await ctx.emit(event, ack=self._settled(event.id))
        ctx.set_ready(True)
        while True:  # events that replicas now gone accepted run here (or at another replica: each claims its own)
            while events := await ctx.inbox.claim():
                for event in events:
                    await ctx.emit(event, ack=self._settled(event.id))
            await ctx.inbox.orphaned()

    def _settled(self, event_id: str):  # type: ignore[no-untyped-def]
        async def ack(outcome: Outcome) -> None:
            if outcome.settled:
                await self._ctx.inbox.remove(event_id)
        return ack

    def to_event(self, request: HttpRequest, headers: Mapping[str, str]) -> Event:
        """The request as a CloudEvent; raises ``ValueError`` for a malformed JSON body."""
        content_type = headers.get("content-type", "")
        body = request.body
        extensions = {"httpmethod": request.method}
        if self.config.headers:
            getall = getattr(headers, "getall", None)
            named = [(name, value) for name in self.config.headers
                     for value in (getall(name, []) if getall else [v for v in [headers.get(name)] if v is not None])]
            extensions["httpheaders"] = pairs_json(named)
        if self.config.query:
            extensions["httpquery"] = pairs_json(request.query.items())
        delivery = self.config.delivery_id(headers)
        if delivery:
            extensions["deliveryid"] = delivery
        trace = traceparent(headers.get("traceparent"))
        if trace:  # the CloudEvents distributed-tracing extension: a trace begun outside continues in the function
            extensions["traceparent"] = trace
            if headers.get("tracestate"):
                extensions["tracestate"] = headers["tracestate"][:512]
        common = {"source": f"webhook:{self.config.path}", "type": "eventswarm.webhook.request", "extensions": extensions}
        if not body:
            return Event(**common)  # type: ignore[arg-type]
        if _is_json(content_type):
            return Event(data=parse_json(body), **common)  # type: ignore[arg-type]
        media = content_type.split(";", 1)[0].strip().lower()
        if media in ("", "text/plain", "application/x-www-form-urlencoded") and body.lstrip()[:1] in (b"{", b"["):
            # `curl -d '{...}'` sends JSON labelled as a form: take it as JSON when it parses as JSON.
            try:
                return Event(data=parse_json(body), **common)  # type: ignore[arg-type]
            except (ValueError, RecursionError):
                pass
        if media.startswith("text/") or media in ("", "application/x-www-form-urlencoded"):
            try:
                return Event(data=body.decode("utf-8"), datacontenttype=content_type or "text/plain", **common)  # type: ignore[arg-type]
            except UnicodeDecodeError:
                pass
        return Event(data_base64=body, datacontenttype=content_type or "application/octet-stream", **common)  # type: ignore[arg-type]

    async def handle(self, request: HttpRequest) -> HttpResponse:
        config = self.config
        headers = request.headers  # case-insensitive
        if config.signature is not None:
            try:
                verify(config.signature, self._secrets, headers, request.body)
            except SignatureError as exc:
                return HttpResponse.json(401, {"error": f"bad signature: {exc}"})
        try:
            event = self.to_event(request, headers)
            event.encode()  # here, so that a document too deep to encode is the client's 400, not our 500
        except ValueError as exc:
            return HttpResponse.json(400, {"error": f"malformed JSON body: {exc}"})
        except RecursionError:
            return HttpResponse.json(400, {"error": "JSON body nested too deeply"})
        if config.mode == "sync":
            return await self._run_now(event)
        dedupe_key = config.delivery_id(headers)
        try:
            earlier = await self._ctx.inbox.put(event, dedupe_key or None)
        except StoreError as exc:  # not stored, so not accepted: the sender tries again later
            return HttpResponse.json(503, {"error": f"cannot store the event: {exc}"}, {"Retry-After": STORE_RETRY_AFTER})
        if earlier is not None:
            return HttpResponse.json(200, {"id": earlier, "duplicate": True})
        if await self._ctx.offer(event, ack=self._settled(event.id)):
            return _accepted(event)  # room in the buffer: no timer needed
        with anyio.move_on_after(config.enqueue_timeout) as scope:
            await self._ctx.emit(event, ack=self._settled(event.id))
        if scope.cancelled_caught:
            with anyio.CancelScope(shield=True):
                try:
                    await self._ctx.inbox.remove(event.id, forget_dedupe=True)
                except StoreError:
                    pass  # it stays stored and runs after the next start: at least once, never lost
            retry = str(max(1, math.ceil(config.enqueue_timeout)))
            return HttpResponse.json(503, {"error": "the trigger's buffer is full"}, {"Retry-After": retry})
        return _accepted(event)

    async def _run_now(self, event: Event) -> HttpResponse:
        outcome = await self._ctx.invoke(event)
        if outcome.status == "dropped":  # the trigger's filter kept it out: nothing ran, nothing to answer with
            return HttpResponse(204, b"", {"X-Eventswarm-Filtered": "true"})
        if outcome.status != "succeeded":
            return HttpResponse.json(502, {"error": f"function failed (exit code {outcome.exit_code})",
                                           "invocation_id": outcome.invocation_id})
        body = outcome.stdout
        kind = "application/json" if body.lstrip()[:1] in (b"{", b"[") else "text/plain; charset=utf-8"
        return HttpResponse(200, body, {"Content-Type": kind, "X-Eventswarm-Invocation": outcome.invocation_id or ""})
