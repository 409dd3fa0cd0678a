"""The docs name every config key the models accept, so they cannot drift from the code."""

from connectors.ethereum import EthereumSourceConfig
from connectors.file import FileSourceConfig
from connectors.kafka import KafkaSourceConfig
from connectors.schedule import ScheduleSourceConfig
from connectors.webhook import WebhookSourceConfig
from dispatcher.config import (
    BatchConfig,
    DaemonConfig,
    ExecutorConfig,
    FunctionConfig,
    RetryConfig,
    TelemetryConfig,
    TriggerBase,
    WarmConfig,
)
from tests.support import ROOT


def test_the_configuration_reference_names_every_key():
    text = (ROOT / "docs" / "configuration.md").read_text()
    missing = []
    for model, prefix in [(DaemonConfig, ""), (ExecutorConfig, ""), (FunctionConfig, ""), (TriggerBase, ""),
                          (BatchConfig, "batch."), (RetryConfig, "retry."), (WebhookSourceConfig, ""),
                          (KafkaSourceConfig, ""), (FileSourceConfig, ""),
                          (EthereumSourceConfig, ""), (ScheduleSourceConfig, ""),
                          (TelemetryConfig, "")]:
        for name in model.model_fields:
            if name not in ("kind", "batch", "retry") and f"`{prefix}{name}`" not in text:
                missing.append(f"{model.__name__}.{name}")
    assert missing == []


def test_the_warm_reference_names_every_key():
    text = (ROOT / "docs" / "warm.md").read_text()
    assert [name for name in WarmConfig.model_fields if f"`{name}`" not in text] == []


def test_the_metrics_reference_names_every_series_the_daemon_exports():
    from dispatcher.metrics import Metrics

    metrics = Metrics()
    metrics.pools.source = lambda: [{"function": "f", "size": 1, "idle": 1, "starts": 1, "replacements": {"oom": 1}}]
    exported = set()
    for family in metrics.registry.collect():
        exported.add(f"{family.name}_total" if family.type == "counter" else family.name)
    text = (ROOT / "docs" / "metrics.md").read_text()
    assert len(exported) > 20
    assert sorted(name for name in exported if f"`{name}`" not in text) == []
