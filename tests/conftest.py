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

    def make(doc: dict[str, Any], env: dict[str, str] | None = None, name: str = "") -> DaemonProcess:
        """A daemon of ``doc``; several at once each have a ``name`` (their config file and log are theirs)."""
        port = int(doc["daemon"]["listen"].rsplit(":", 1)[1])
        suffix = f"-{name}" if name else ""
        config_file = tmp_path / f"eventswarm{suffix}.toml"
        config_file.write_text(toml(doc))
        process = DaemonProcess(config_file, port, tmp_path / f"daemon{suffix}.log", env=env)
        started.append(process)
        return process

    yield make
    for process in started:
        if process.proc is not None and process.proc.poll() is None:
            process.stop()




def _service(script: str, **env: str) -> None:
    """Run the project's ``scripts/<script>`` (it installs and starts a service); fail the test, never skip, if it
    cannot."""
    import os

    done = subprocess.run(["bash", str(ROOT / "scripts" / script)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, **env})
    if done.returncode != 0:
        pytest.fail(f"scripts/{script} failed:\n{done.stdout}\n{done.stderr}")


@pytest.fixture(scope="session")
def senders() -> Path:
    """Where npm's @octokit/webhooks-methods is installed (scripts/senders.sh): run ``node`` there to sign."""
    import os

    _service("senders.sh")
    return Path(os.environ.get("EVENTSWARM_SERVICES_HOME", "/var/cache/eventswarm")) / "senders"


@pytest.fixture(scope="session")
def debian_tools() -> None:
    """Debian's stunnel4, openssl and logrotate (scripts/tools.sh): peers some tests drive for real."""
    _service("tools.sh")


@pytest.fixture(scope="session")
def kafka_broker() -> str:
    """A Kafka-protocol broker (tansu, started by scripts/kafka.sh) on 127.0.0.1."""
    import sys

    _service("kafka.sh", PYTHON=sys.executable)
    return "127.0.0.1:19092"


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium (installed by scripts/browser.sh), for playwright."""
    _service("browser.sh")
    return "/usr/bin/chromium"


@pytest.fixture(scope="session")
def python_image(docker_engine) -> str:  # type: ignore[no-untyped-def]
    """A Debian image with python3 (scripts/base-image.sh: debootstrap from this machine's mirror)."""
    _service("base-image.sh")
    return "eventswarm/base:local"


@pytest.fixture(scope="session")
def postgres() -> str:
    """PostgreSQL (installed and started by scripts/postgres.sh) on 127.0.0.1:15432."""
    _service("postgres.sh")
    return "postgresql://postgres@127.0.0.1:15432/postgres"


@pytest.fixture
def postgres_database(postgres: str) -> Iterator[str]:
    """A database of the test's own on the shared server (dropped afterwards): its URL."""
    import uuid

    name = f"test_{uuid.uuid4().hex[:12]}"

    def psql(sql: str) -> None:
        done = subprocess.run(["psql", postgres, "-v", "ON_ERROR_STOP=1", "-qc", sql], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr

    psql(f'CREATE DATABASE "{name}"')
    yield postgres.rsplit("/", 1)[0] + f"/{name}"
    psql(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def daemon_image(docker_engine) -> str:  # type: ignore[no-untyped-def]
    """The daemon's image (scripts/daemon-image.sh), built once per run on the host's engine."""
    import os
    import sys

    done = subprocess.run(["bash", str(ROOT / "scripts" / "daemon-image.sh"), "eventswarm:test"],
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=1500)
    if done.returncode != 0:
        pytest.fail(f"scripts/daemon-image.sh failed:\n{done.stdout}\n{done.stderr}")
    return "eventswarm:test"


@pytest.fixture(scope="session")
def swarm_cluster(docker_engine):  # type: ignore[no-untyped-def]
    """A three-node Swarm (scripts/swarm-cluster.sh: nested dockerds, mutual TLS on tcp://NODE:2376)."""
    from tests.cluster import Cluster

    _service("swarm-cluster.sh")
    return Cluster()


@pytest.fixture(scope="session")
def eth_node() -> str:
    """anvil and solc (installed and started by scripts/ethereum.sh) on 127.0.0.1."""
    _service("ethereum.sh")
    return "http://127.0.0.1:18545"


@pytest.fixture(scope="session")
def token_contract(eth_node: str, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """tests/contracts/Token.sol, compiled once per session."""
    from tests.ethereum import compile_token

    return compile_token(tmp_path_factory.mktemp("solc"))
