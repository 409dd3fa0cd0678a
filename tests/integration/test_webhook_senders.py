"""Webhook signatures as the senders make them, with their own libraries, through the real server and a real config.

GitHub's @octokit/webhooks-methods (npm), Stripe's `stripe`, and `standardwebhooks` and `svix` (PyPI) sign; the
daemon verifies. Each scheme: its library's signature is accepted, a tampered body refused, a timestamp outside the
tolerance refused (GitHub signs none), and a rotation (two secrets) accepted either way.
"""

from __future__ import annotations

import base64
import datetime
import json
import subprocess
import time
from pathlib import Path

import pytest
import stripe
import svix.webhooks
from standardwebhooks.webhooks import Webhook as StandardWebhook

from tests.integration.test_webhook import call, config
from tests.support import running_daemon

pytestmark = pytest.mark.anyio

BODY = b'{"action": "opened", "number": 7}'


def octokit_sign(senders: Path, secret: str, body: bytes) -> str:
    """GitHub's own signature of ``body`` (X-Hub-Signature-256), by @octokit/webhooks-methods."""
    script = ('import { sign } from "@octokit/webhooks-methods";'
              'process.stdout.write(await sign(process.argv[1], require_body()));'
              'function require_body() { return Buffer.from(process.argv[2], "base64").toString("utf8"); }')
    done = subprocess.run(["node", "--input-type=module", "-e", script, secret, base64.b64encode(body).decode()],
                          cwd=senders, capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip()


async def test_github_signatures_by_octokit_and_the_event_header_reaches_the_function(tmp_path, monkeypatch, senders):
    monkeypatch.setenv("GITHUB_NEW", "the new secret")
    monkeypatch.setenv("GITHUB_OLD", "It's a Secret to Everybody")
    doc = config(tmp_path, mode="sync", headers=["X-GitHub-Event", "X-GitHub-Delivery", "X-Not-Sent"],
                 signature={"scheme": "github", "secret_env": ["GITHUB_NEW", "GITHUB_OLD"]})
    async with running_daemon(doc) as daemon:
        for secret in ("the new secret", "It's a Secret to Everybody"):  # a rotation: either verifies
            signature = octokit_sign(senders, secret, BODY)
            status, _, body = await call(daemon, BODY, {"X-Hub-Signature-256": signature, "X-GitHub-Event": "push",
                                                        "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958"})
            assert status == 200, body
            event = json.loads(body)["events"][0]
            assert json.loads(event["httpheaders"]) == {"x-github-event": "push",
                                                        "x-github-delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958"}
            assert event["data"] == json.loads(BODY)
        tampered = await call(daemon, BODY.replace(b"7", b"8"), {"X-Hub-Signature-256": signature})
        assert tampered[0] == 401
        other = await call(daemon, BODY, {"X-Hub-Signature-256": octokit_sign(senders, "a secret not set", BODY)})
        assert other[0] == 401


async def test_stripe_signatures_by_stripes_library(tmp_path, monkeypatch):
    monkeypatch.setenv("STRIPE_SECRET", "whsec_test_secret_new")
    doc = config(tmp_path, signature={"scheme": "stripe", "secret_env": "STRIPE_SECRET", "tolerance": "300s"})
    payload = BODY.decode()
    async with running_daemon(doc) as daemon:
        header = stripe.WebhookSignature.generate_signature_header(payload, "whsec_test_secret_new")
        assert (await call(daemon, BODY, {"Stripe-Signature": header}))[0] == 202
        assert (await call(daemon, BODY + b" ", {"Stripe-Signature": header}))[0] == 401
        stale = stripe.WebhookSignature.generate_signature_header(payload, "whsec_test_secret_new",
                                                                  timestamp=int(time.time()) - 301)
        assert (await call(daemon, BODY, {"Stripe-Signature": stale}))[0] == 401
        # During a rotation Stripe signs with both secrets: one v1 each, the old one first; a v0 is ignored.
        old = stripe.WebhookSignature.generate_signature_header(payload, "whsec_test_secret_old")
        stamp = old.split(",")[0].removeprefix("t=")
        new = stripe.WebhookSignature.generate_signature_header(payload, "whsec_test_secret_new", timestamp=int(stamp))
        both = f"t={stamp},{old.split(',')[1]},{new.split(',')[1]},v0=0000"
        assert (await call(daemon, BODY, {"Stripe-Signature": both}))[0] == 202
        assert (await call(daemon, BODY, {"Stripe-Signature": old}))[0] == 401  # the old secret alone is not set
        assert (await call(daemon, BODY, {"Stripe-Signature": "t=1,v1"}))[0] == 401
    # Stripe's library verifies what it made, as the daemon did: the test signs as Stripe does.
    stripe.WebhookSignature.verify_header(payload, header, "whsec_test_secret_new", tolerance=300)


@pytest.mark.parametrize("library", ["standardwebhooks", "svix"])
async def test_standard_webhooks_signatures_by_their_libraries(tmp_path, monkeypatch, library):
    new, old = "whsec_" + base64.b64encode(b"n" * 24).decode(), "whsec_" + base64.b64encode(b"o" * 24).decode()
    monkeypatch.setenv("HOOK_NEW", new)
    monkeypatch.setenv("HOOK_OLD", old)
    doc = config(tmp_path, signature={"scheme": "standard-webhooks", "secret_env": ["HOOK_NEW", "HOOK_OLD"]})
    prefix = "webhook" if library == "standardwebhooks" else "svix"

    def signed(secret: str, msg_id: str, at: datetime.datetime, body: bytes = BODY) -> dict[str, str]:
        hook = StandardWebhook(secret) if library == "standardwebhooks" else svix.webhooks.Webhook(secret)
        signature = hook.sign(msg_id, at, body.decode())
        return {f"{prefix}-id": msg_id, f"{prefix}-timestamp": str(int(at.timestamp())),
                f"{prefix}-signature": signature}

    now = datetime.datetime.now(tz=datetime.UTC)
    async with running_daemon(doc) as daemon:
        assert (await call(daemon, BODY, signed(new, "msg_1", now)))[0] == 202
        assert (await call(daemon, BODY, signed(old, "msg_2", now)))[0] == 202  # the rotation's other secret
        assert (await call(daemon, BODY + b" ", signed(new, "msg_3", now)))[0] == 401
        stale = now - datetime.timedelta(seconds=301)
        assert (await call(daemon, BODY, signed(new, "msg_4", stale)))[0] == 401
        again = await call(daemon, BODY, signed(new, "msg_1", now))  # a redelivery: deduplicated on its id
        assert again[0] == 200 and json.loads(again[2])["duplicate"] is True
        # Several signatures in one header (the sender's own rotation), space-separated: one must match.
        both = signed(new, "msg_5", now)
        both[f"{prefix}-signature"] = signed(old, "msg_5", now)[f"{prefix}-signature"] + " v1,AAAA"
        assert (await call(daemon, BODY, both))[0] == 202
