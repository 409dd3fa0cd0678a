"""Webhook signatures against the schemes' published test vectors, and tampered variants."""

import base64
import hashlib
import hmac

import pytest

from connectors.webhook import SignatureConfig, SignatureError, verify

GITHUB_SECRET = b"It's a Secret to Everybody"
GITHUB_BODY = b"Hello, World!"
GITHUB_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"

SW_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SW_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SW_TIMESTAMP = 1614265330
SW_BODY = b'{"test": 2432232314}'
SW_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def sw_config(monkeypatch, secrets=SW_SECRET):
    monkeypatch.setenv("SW_SECRET", secrets)
    return SignatureConfig(scheme="standard-webhooks", secret_env="SW_SECRET")


def sw_headers(signature=SW_SIGNATURE, msg_id=SW_ID, timestamp=SW_TIMESTAMP):
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature}


def test_githubs_published_vector_verifies():
    verify(SignatureConfig.model_construct(scheme="github"), [GITHUB_SECRET], {"x-hub-signature-256": GITHUB_SIGNATURE}, GITHUB_BODY)


@pytest.mark.parametrize(("body", "signature"), [
    (b"Hello, World?", GITHUB_SIGNATURE),
    (GITHUB_BODY, GITHUB_SIGNATURE[:-1] + "8"),
    (GITHUB_BODY, GITHUB_SIGNATURE.removeprefix("sha256=")),
    (GITHUB_BODY, ""),
])
def test_tampered_github_deliveries_are_refused(body, signature):
    with pytest.raises(SignatureError):
        verify(SignatureConfig.model_construct(scheme="github"), [GITHUB_SECRET], {"x-hub-signature-256": signature}, body)


def test_standard_webhooks_published_vector_verifies(monkeypatch):
    config = sw_config(monkeypatch)
    verify(config, config.secrets(), sw_headers(), SW_BODY, now=SW_TIMESTAMP + 10)


def test_standard_webhooks_accepts_any_of_several_signatures_and_secrets(monkeypatch):
    monkeypatch.setenv("SW_OLD_SECRET", "whsec_" + base64.b64encode(b"rotated-away").decode())
    monkeypatch.setenv("SW_SECRET", SW_SECRET)
    config = SignatureConfig(scheme="standard-webhooks", secret_env=["SW_OLD_SECRET", "SW_SECRET"])
    verify(config, config.secrets(), sw_headers("v1,bm9wZQ== " + SW_SIGNATURE), SW_BODY, now=SW_TIMESTAMP)


@pytest.mark.parametrize("change", ["body", "id", "timestamp", "signature", "too-old", "too-new"])
def test_tampered_or_stale_standard_webhooks_are_refused(monkeypatch, change):
    config = sw_config(monkeypatch)
    body, headers, now = SW_BODY, sw_headers(), SW_TIMESTAMP
    if change == "body":
        body = b'{"test": 2432232315}'
    elif change == "id":
        headers = sw_headers(msg_id="msg_other")
    elif change == "timestamp":
        headers = sw_headers(timestamp=SW_TIMESTAMP + 1)
        now = SW_TIMESTAMP + 1
    elif change == "signature":
        headers = sw_headers("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OF=")
    elif change == "too-old":
        now = SW_TIMESTAMP + 301
    elif change == "too-new":
        now = SW_TIMESTAMP - 301
    with pytest.raises(SignatureError):
        verify(config, config.secrets(), headers, body, now=now)


def test_generic_hmac_accepts_hex_or_base64_in_the_configured_header():
    config = SignatureConfig.model_construct(scheme="hmac-sha256", header="X-Sig")
    digest = hmac.new(b"k", b"body", hashlib.sha256).digest()
    verify(config, [b"k"], {"x-sig": digest.hex()}, b"body")
    verify(config, [b"k"], {"x-sig": base64.b64encode(digest).decode()}, b"body")
    with pytest.raises(SignatureError):
        verify(config, [b"k"], {"x-sig": digest.hex()}, b"bodY")


def test_a_missing_secret_variable_is_a_config_error(monkeypatch):
    monkeypatch.delenv("NOPE_SECRET", raising=False)
    with pytest.raises(ValueError, match="NOPE_SECRET is not set"):
        SignatureConfig(scheme="github", secret_env="NOPE_SECRET")
