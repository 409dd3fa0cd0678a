"""When trace export is on, and where it goes: ``[telemetry]`` and the standard ``OTEL_*`` variables."""

from __future__ import annotations

import pytest

from dispatcher.config import TelemetryConfig


@pytest.fixture(autouse=True)
def _no_otel(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)


def test_off_by_default_and_on_with_the_standard_endpoint_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not TelemetryConfig().active()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")
    assert TelemetryConfig().active()
    assert TelemetryConfig().traces_url() == "http://collector:4318/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4318/custom")
    assert TelemetryConfig().traces_url() == "http://traces:4318/custom"
    assert not TelemetryConfig(enabled=False).active()  # the config says no
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not TelemetryConfig(enabled=True).active()  # the SDK's own switch wins


def test_the_config_alone_turns_it_on_and_names_the_collector() -> None:
    config = TelemetryConfig(enabled=True, endpoint="http://127.0.0.1:4318/v1/traces")
    assert config.active() and config.traces_url() == "http://127.0.0.1:4318/v1/traces"
    assert TelemetryConfig(enabled=True).traces_url() == "http://localhost:4318/v1/traces"


def test_a_queue_of_no_spans_is_refused() -> None:
    with pytest.raises(ValueError, match="max_queue"):
        TelemetryConfig(max_queue=0)
