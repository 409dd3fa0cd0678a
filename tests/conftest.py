"""Fixtures: the real Docker engine (started by scripts/services.sh) and daemons run as processes."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import BUSYBOX, ROOT, DaemonProcess, toml


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def docker_engine() -> str:
    """A running Docker engine (a Swarm manager) with the test images built; fails, never skips, without one."""
    for script in ("services.sh", "images.sh"):
        done = subprocess.run(["bash", str(ROOT / "scripts" / script)], capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.fail(f"scripts/{script} failed:\n{done.stdout}\n{done.stderr}")
    return BUSYBOX


@pytest.fixture
def daemon_process(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def make(doc: dict[str, Any], env: dict[str, str] | None = None) -> DaemonProcess:
        port = int(doc["daemon"]["listen"].rsplit(":", 1)[1])
        config_file = tmp_path / "eventswarm.toml"
        config_file.write_text(toml(doc))
        process = DaemonProcess(config_file, port, tmp_path / "daemon.log", env=env)
        started.append(process)
        return process

    yield make
    for process in started:
        if process.proc is not None and process.proc.poll() is None:
            process.stop()




@pytest.fixture(scope="session")
def kafka_broker() -> str:
    """A Kafka-protocol broker (tansu, started by scripts/kafka.sh) on 127.0.0.1; fails, never skips, without one."""
    import os
    import sys

    done = subprocess.run(["bash", str(ROOT / "scripts" / "kafka.sh")], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable})
    if done.returncode != 0:
        pytest.fail(f"scripts/kafka.sh failed:\n{done.stdout}\n{done.stderr}")
    return "127.0.0.1:19092"


@pytest.fixture(scope="session")
def eth_node() -> str:
    """anvil and solc (installed and started by scripts/ethereum.sh) on 127.0.0.1; fails, never skips, without them."""
    done = subprocess.run(["bash", str(ROOT / "scripts" / "ethereum.sh")], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"scripts/ethereum.sh failed:\n{done.stdout}\n{done.stderr}")
    return "http://127.0.0.1:18545"


@pytest.fixture(scope="session")
def token_contract(eth_node: str, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """tests/contracts/Token.sol, compiled once per session."""
    from tests.ethereum import compile_token

    return compile_token(tmp_path_factory.mktemp("solc"))
