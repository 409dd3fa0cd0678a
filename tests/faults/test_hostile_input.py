"""Hostile and malformed requests against the three signature schemes, both webhook modes and the /v1 API:
every answer is a 2xx, a 4xx or a 503, never a 5xx or a traceback, and every 202 runs once."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import time
from pathlib import Path

from tests.faults.conftest import ran_counts
from tests.support import DaemonProcess, base_config, free_port, toml, wait_until

GITHUB_SECRET = "It's a Secret to Everybody"
HMAC_SECRET = "hmac-secret"
STANDARD_KEY = b"standard-webhooks-key-0123456789"
STANDARD_SECRET = "whsec_" + base64.b64encode(STANDARD_KEY).decode()


def start(tmp_path: Path) -> tuple[DaemonProcess, Path]:
    ran = tmp_path / "ran"
    ran.mkdir()
    port = free_port()
    doc = base_config(tmp_path, executor="process", port=port, client_timeout="2s")
    doc["functions"]["record"] = {"command": ["sh", "-c", 'cat > "$RAN/$EVENTSWARM_BATCH_ID.json"; echo ok'],
                                  "env": {"RAN": str(ran)}, "timeout": "30s"}
    common = {"function": "record", "ordering": "none", "batch": {"max_events": 20, "max_wait": "20ms"},
              "retry": {"max_attempts": 1}}
    sources = {
        "plain": {"path": "/hooks/plain", "max_body": "64KiB"},
        "github": {"path": "/hooks/github", "signature": {"scheme": "github", "secret_env": "GITHUB_SECRET"},
                   "dedupe_header": "X-GitHub-Delivery"},
        "standard": {"path": "/hooks/standard",
                     "signature": {"scheme": "standard-webhooks", "secret_env": "STANDARD_SECRET"}},
        "hmac": {"path": "/hooks/hmac", "mode": "sync",
                 "signature": {"scheme": "hmac-sha256", "secret_env": "HMAC_SECRET", "header": "X-Sig"}},
    }
    for name, source in sources.items():
        doc["triggers"][name] = {**common, "source": {"kind": "webhook", **source}}
    config = tmp_path / "eventswarm.toml"
    config.write_text(toml(doc))
    env = {"GITHUB_SECRET": GITHUB_SECRET, "STANDARD_SECRET": STANDARD_SECRET, "HMAC_SECRET": HMAC_SECRET}
    return DaemonProcess(config, port, tmp_path / "daemon.log", env=env).start(), ran


def raw(method: str, path: str, headers: dict[str, bytes | str] | None = None, body: bytes = b"",
        length: bool = True) -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close"]
    if length:
        lines.append(f"Content-Length: {len(body)}".encode())
    for key, value in (headers or {}).items():
        lines.append(key.encode() + b": " + (value if isinstance(value, bytes) else value.encode()))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def exchange(port: int, request: bytes) -> tuple[int | None, bytes]:
    """Send ``request``; the status and body of the answer (None when the server closed without one)."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        try:
            sock.sendall(request)  # no half-close: the server would take it for a client gone away
        except OSError:
            pass
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
    if not answer.startswith(b"HTTP/"):
        return None, answer
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def github(body: bytes) -> dict[str, str]:
    return {"X-Hub-Signature-256": "sha256=" + hmac.new(GITHUB_SECRET.encode(), body, hashlib.sha256).hexdigest(),
            "Content-Type": "application/json"}


def standard(body: bytes, msg_id: str = "msg_1", stamp: int | None = None) -> dict[str, str]:
    stamp = int(time.time()) if stamp is None else stamp
    signature = base64.b64encode(hmac.new(STANDARD_KEY, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest())
    return {"webhook-id": msg_id, "webhook-timestamp": str(stamp), "webhook-signature": "v1," + signature.decode(),
            "Content-Type": "application/json"}


def hmac_sig(body: bytes) -> dict[str, str]:
    return {"X-Sig": hmac.new(HMAC_SECRET.encode(), body, hashlib.sha256).hexdigest(), "Content-Type": "application/json"}


HOSTILE_BODIES = {
    "nested 10,000 deep": b"[" * 10_000 + b"]" * 10_000,
    "nested objects 5,000 deep": b'{"a":' * 5_000 + b"1" + b"}" * 5_000,
    "NaN": b'{"x": NaN}',
    "Infinity": b"[Infinity]",
    "truncated": b'{"broken": ',
    "not UTF-8": b'{"x": "\xff\xfe"}',
    "a lone surrogate": b'{"x": "\\ud800"}',
    "trailing garbage": b'{"x": 1} trailing',
    "a NUL byte": b'{"x": 1}\x00',
    "only whitespace": b"   ",
    "a huge number": b'{"x": ' + b"9" * 5000 + b"}",
}


def corpus() -> list[tuple[str, bytes]]:
    cases: list[tuple[str, bytes]] = []
    for name, body in HOSTILE_BODIES.items():
        cases.append((f"plain: {name}", raw("POST", "/hooks/plain", {"Content-Type": "application/json"}, body)))
        cases.append((f"github signed: {name}", raw("POST", "/hooks/github", github(body), body)))
        cases.append((f"standard signed: {name}", raw("POST", "/hooks/standard", standard(body, f"id-{name}"), body)))
        cases.append((f"hmac signed (sync): {name}", raw("POST", "/hooks/hmac", hmac_sig(body), body)))
    good = b'{"ok": true}'
    signature_cases = {
        "github": [
            {}, {"X-Hub-Signature-256": "sha256="}, {"X-Hub-Signature-256": "md5=abc"},
            {"X-Hub-Signature-256": b"sha256=\xff\xfe\xfd"}, {"X-Hub-Signature-256": "sha256=" + "0" * 64},
            {"X-Hub-Signature-256": "sha256=" + "z" * 10_000}, github(b"another body"),
        ],
        "standard": [
            {}, {"webhook-id": "x", "webhook-timestamp": "now", "webhook-signature": "v1,abc"},
            {**standard(good), "webhook-timestamp": str(int(time.time()) - 3600)},
            {**standard(good), "webhook-signature": b"v1,\xff\xfe"}, {**standard(good), "webhook-signature": "v2,abc"},
            {**standard(good), "webhook-id": b"\xff\xff"}, {**standard(good), "webhook-timestamp": "1" * 400},
        ],
        "hmac": [
            {}, {"X-Sig": ""}, {"X-Sig": b"\xff\xfe"}, {"X-Sig": "sha256=" + "0" * 64}, hmac_sig(b"other"),
            {"X-Sig": "=" * 3000},
        ],
    }
    for trigger, variants in signature_cases.items():
        for n, headers in enumerate(variants):
            cases.append((f"{trigger} bad signature {n}", raw("POST", f"/hooks/{trigger}", headers, good)))
    cases += [
        ("body over max_body", raw("POST", "/hooks/plain", {"Content-Type": "text/plain"}, b"x" * 70_000)),
        ("Content-Length over max_body", raw("POST", "/hooks/plain", {"Content-Length": "999999999"}, b"", length=False)),
        ("negative Content-Length", raw("POST", "/hooks/plain", {"Content-Length": "-1"}, b"", length=False)),
        ("two Content-Lengths", raw("POST", "/hooks/plain", {"Content-Length": "2"}, b"{}")),
        ("broken chunked body", raw("POST", "/hooks/plain", {"Transfer-Encoding": "chunked"}, b"zz\r\nabc\r\n", length=False)),
        ("wrong method", raw("GET", "/hooks/plain")),
        ("unknown path", raw("POST", "/hooks/nothing", {}, b"{}")),
        ("path with NUL", raw("POST", "/hooks/plain%00", {}, b"{}")),
        ("very long path", raw("POST", "/" + "a" * 20_000, {}, b"{}")),
        ("garbage request line", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40),
        ("no HTTP version", b"POST /hooks/plain\r\n\r\n"),
        ("bad HTTP version", b"POST /hooks/plain HTTP/9.9\r\nHost: x\r\n\r\n"),
        ("header without colon", b"POST /hooks/plain HTTP/1.1\r\nHost x\r\nContent-Length: 0\r\n\r\n"),
        ("header too long", raw("POST", "/hooks/plain", {"X-Big": "y" * 100_000}, b"{}")),
        ("many headers", b"POST /hooks/plain HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(500)) + b"\r\n"),
        ("non-UTF-8 content type", raw("POST", "/hooks/plain", {"Content-Type": b"application/\xffjson"}, b"{}")),
        ("bare LF line ends", b"POST /hooks/plain HTTP/1.1\nHost: x\nContent-Length: 2\n\n{}"),
    ]
    api = "/v1/dead-letters/replay"
    for body in (b'{"ids": 5}', b"{}", b"[]", b'"x"', b'{"trigger": 5}', b'{"ids": [1, 2]}', b"{", b"[" * 10_000,
                 b'{"ids": "abc"}', b"\xff\xfe", b"null"):
        cases.append((f"replay {body[:20]!r}", raw("POST", api, {"Content-Type": "application/json"}, body)))
    cases += [
        ("replay too large", raw("POST", api, {"Content-Type": "application/json"}, b'{"ids": ["' + b"a" * 2_000_000 + b'"]}')),
        ("invocations limit not a number", raw("GET", "/v1/invocations?limit=abc")),
        ("invocations unknown status", raw("GET", "/v1/invocations?status=bogus")),
        ("invocations limit huge", raw("GET", "/v1/invocations?limit=" + "9" * 400)),
        ("logs of no invocation", raw("GET", "/v1/invocations/nothing/logs")),
        ("logs of a strange id", raw("GET", "/v1/invocations/%ff%fe/logs")),
        ("status with a body", raw("GET", "/v1/status", {}, b"x" * 100)),
        ("metrics with POST", raw("POST", "/metrics", {}, b"{}")),
        ("readyz with DELETE", raw("DELETE", "/readyz")),
    ]
    return cases


def test_hostile_requests_get_no_5xx_and_every_202_runs_once(tmp_path):
    daemon, ran = start(tmp_path)
    try:
        answers: dict[str, tuple[int | None, bytes]] = {}
        accepted: set[str] = set()
        cases = corpus()
        assert len(cases) >= 100
        # A few well-formed, signed deliveries among them: these must be accepted and run.
        for n in range(5):
            body = json.dumps({"good": n}).encode()
            cases.append((f"good github {n}", raw("POST", "/hooks/github", {**github(body), "X-GitHub-Delivery": f"d{n}"}, body)))
            cases.append((f"good standard {n}", raw("POST", "/hooks/standard", standard(body, f"good-{n}"), body)))
            cases.append((f"good plain {n}", raw("POST", "/hooks/plain", {"Content-Type": "application/json"}, body)))
        for name, request in cases:
            status, body = exchange(daemon.port, request)
            answers[name] = (status, body)
            if status == 202:
                accepted.add(json.loads(body)["id"])
        bad = {name: answer for name, answer in answers.items()
               if answer[0] is not None and not (200 <= answer[0] < 300 or 400 <= answer[0] < 500 or answer[0] == 503)}
        assert not bad, bad
        for n in range(5):
            assert answers[f"good github {n}"][0] == 202 and answers[f"good standard {n}"][0] == 202, {k: v for k, v in answers.items() if k.startswith("good")}
        for name in HOSTILE_BODIES:
            assert answers[f"hmac signed (sync): {name}"][0] in (200, 400), (name, answers[f"hmac signed (sync): {name}"])
        wait_until(lambda: accepted <= set(ran_counts(ran)), timeout=30, what="every accepted event to run")
        counts = ran_counts(ran)
        assert all(counts[i] == 1 for i in accepted), {i: counts[i] for i in accepted if counts[i] != 1}
        assert daemon.proc is not None and daemon.proc.poll() is None
        # Still serving after all that.
        assert exchange(daemon.port, raw("GET", "/healthz"))[0] == 200
    finally:
        daemon.stop()
    log = daemon.log.read_text()
    assert "Traceback" not in log, log[-5000:]
