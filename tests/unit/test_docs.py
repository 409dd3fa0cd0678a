"""The docs name every config key the models accept, so they cannot drift from the code."""

from connectors.ethereum import EthereumSourceConfig
from connectors.file import FileSourceConfig
from connectors.kafka import KafkaSourceConfig
from connectors.webhook import WebhookSourceConfig
from dispatcher.config import (
    BatchConfig,
    DaemonConfig,
    ExecutorConfig,
    FunctionConfig,
    RetryConfig,
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
                          (EthereumSourceConfig, "")]:
        for name in model.model_fields:
            if name not in ("kind", "batch", "retry") and f"`{prefix}{name}`" not in text:
                missing.append(f"{model.__name__}.{name}")
    assert missing == []


def test_the_warm_reference_names_every_key():
    text = (ROOT / "docs" / "warm.md").read_text()
    assert [name for name in WarmConfig.model_fields if f"`{name}`" not in text] == []
