"""The Ethereum source's config: the keys of ``source = { kind = "ethereum", … }``, checked at load (addresses
checksummed, event signatures parsed, the ABI file read, endpoint URLs kept out of messages)."""

from __future__ import annotations

from typing import Literal

from eth_utils.address import to_checksum_address
from pydantic import Field, field_validator, model_validator

from connectors.ethereum_abi import load_decoders, parse_signature
from connectors.ethereum_rpc import redacted
from dispatcher.api import ConfigPath, Duration, Secret, SourceConfig


class EthereumSourceConfig(SourceConfig):
    kind: Literal["ethereum"]
    rpc_url: str | list[str] = []
    """JSON-RPC endpoints (``http(s)://`` or ``ws(s)://``: a ``newHeads`` subscription wakes the poller early), tried
    in order; for a URL that holds an API key, use ``rpc_url_env``."""
    rpc_url_env: str | list[str] = ""
    """Environment variables holding endpoint URLs (kept out of the TOML, logs and status)."""
    rpc_url_file: ConfigPath = ""
    """A file with endpoint URLs, one per line."""
    chain_id: int | None = None
    """The chain expected; default: the one the node reports at the first start (then it must stay the same)."""
    addresses: list[str] = []
    """Contracts whose logs to read; none: every contract."""
    events: list[str] = []
    """Solidity event signatures, e.g. ``"Transfer(address indexed from, address indexed to, uint256 value)"``."""
    abi_file: ConfigPath = ""
    """A JSON ABI (or a compiler artifact with ``"abi"``) whose events are read too."""
    from_block: int | Literal["latest"] = "latest"
    """Where the first start begins."""
    confirmations: int | Literal["safe", "finalized"] = 12
    """How deep a log must be before it is dispatched, in blocks, or the node's ``safe``/``finalized`` block."""
    max_block_range: int = Field(2000, ge=1)
    """Blocks per ``eth_getLogs`` at most (halved when the node refuses, grown back after successes)."""
    poll_interval: Duration = 2.0
    max_uncommitted: int = Field(100_000, ge=1)
    """Logs in flight behind the first unsettled one before reading pauses."""
    commit_interval: Duration = 1.0
    request_timeout: Duration = 30.0

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, addresses: list[str]) -> list[str]:
        checked: list[str] = []
        for address in addresses:
            try:
                checked.append(to_checksum_address(address))
            except ValueError:
                raise ValueError(f"{address!r} is not an address (0x and 40 hex digits)") from None
        return checked

    @field_validator("confirmations")
    @classmethod
    def _confirmations(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError("give 0 or more blocks, \"safe\" or \"finalized\"")
        return value

    @model_validator(mode="after")
    def _check(self) -> EthereumSourceConfig:
        if not self.urls_given():
            raise ValueError("rpc_url, rpc_url_env or rpc_url_file: name at least one node")
        problem = self.secret().problem("rpc_url") if self.secret().given else None
        if problem:
            raise ValueError(problem)
        for url in self.endpoints():
            if not url.startswith(("http://", "https://", "ws://", "wss://")):
                raise ValueError(f"rpc_url: {redacted(url)} is not an http(s):// or ws(s):// URL")
        if not self.events and not self.abi_file:
            raise ValueError("events or abi_file: say which events to read")
        for i, signature in enumerate(self.events):
            try:
                parse_signature(signature)
            except ValueError as exc:
                raise ValueError(f"events: [{i}] {exc}") from None
        if self.abi_file:
            try:
                load_decoders([], self.abi_file)
            except OSError as exc:
                raise ValueError(f"abi_file: cannot read {self.abi_file}: {exc.strerror}") from None
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"abi_file: {exc}") from None
        return self

    def urls_given(self) -> bool:
        return bool(self.rpc_url) or self.secret().given

    def secret(self) -> Secret:
        return Secret.of(self.rpc_url_env, self.rpc_url_file)

    def endpoints(self) -> list[str]:
        plain = [self.rpc_url] if isinstance(self.rpc_url, str) and self.rpc_url else list(self.rpc_url or [])
        secret = self.secret()
        return plain + (secret.values() if secret.given else [])
