"""The Kafka source over TLS, for real: a tansu broker of the test's own behind stunnel (Debian's stunnel4), with a
CA the test makes. tansu advertises the TLS port, so every connection, the producer's and the source's, crosses
the TLS front. Server TLS (``security = "SSL"`` with ``ca_file``), mutual TLS (stunnel verifies the client's
certificate: ``cert_file``/``key_file``), and their failures: a wrong CA, a missing client certificate."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from dispatcher.config import parse
from dispatcher.daemon import Daemon
from tests.integration.test_kafka import PRINT_IDS, config, seen_ids
from tests.kafka import new_topic, produce
from tests.support import SERVICES_HOME, free_port, make_ca, make_cert, own_service, running_daemon, wait_for

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="session")
def stunnel(debian_tools) -> str:
    return "stunnel4"


@dataclass
class TlsBroker:
    address: str
    certs: Path

    def client(self, *, with_cert: bool = False) -> dict[str, str]:
        """librdkafka's settings to reach it (the producer's)."""
        settings = {"security.protocol": "SSL", "ssl.ca.location": str(self.certs / "ca.pem")}
        if with_cert:
            settings |= {"ssl.certificate.location": str(self.certs / "client.pem"),
                         "ssl.key.location": str(self.certs / "client.key")}
        return settings


def tls_broker(tmp_path: Path, *, mutual: bool) -> Iterator[TlsBroker]:
    certs = tmp_path / "certs"
    certs.mkdir()
    make_ca(certs, "ca")
    make_ca(certs, "other-ca")
    make_cert(certs, "ca", "server", "IP:127.0.0.1,DNS:localhost")
    make_cert(certs, "ca", "client", "DNS:eventswarm-client")
    plain, tls = free_port(), free_port()
    tansu = [str(SERVICES_HOME / "tansu"), "broker", "--listener-url", f"tcp://127.0.0.1:{plain}",
             "--advertised-listener-url", f"tcp://127.0.0.1:{tls}"]
    front = tmp_path / "stunnel.conf"
    front.write_text("\n".join([
        "foreground = yes", "pid =", "debug = notice", "[kafka]", f"accept = 127.0.0.1:{tls}",
        f"connect = 127.0.0.1:{plain}", f"cert = {certs / 'server.pem'}", f"key = {certs / 'server.key'}",
        *([f"CAfile = {certs / 'ca.pem'}", "verifyChain = yes", "requireCert = yes"] if mutual else []), ""]))
    with own_service(tansu, plain, tmp_path / "tansu.log", "tansu"), \
            own_service(["stunnel4", str(front)], tls, tmp_path / "stunnel.log", "stunnel"):
        yield TlsBroker(f"127.0.0.1:{tls}", certs)


@pytest.fixture
def server_tls(tmp_path, stunnel) -> Iterator[TlsBroker]:
    yield from tls_broker(tmp_path, mutual=False)


@pytest.fixture
def mutual_tls(tmp_path, stunnel) -> Iterator[TlsBroker]:
    yield from tls_broker(tmp_path, mutual=True)


def tls_config(tmp_path: Path, broker: TlsBroker, topic: str, **source: str) -> dict:
    return config(tmp_path, broker.address, topic, PRINT_IDS, source={"security": "SSL", **source})


async def test_the_source_reads_over_tls_trusting_its_ca_file(tmp_path, server_tls):
    topic = new_topic(server_tls.address, 2, client=server_tls.client())
    high = produce(server_tls.address, topic, [(None, json.dumps({"n": n}).encode()) for n in range(20)],
                   client=server_tls.client())
    doc = tls_config(tmp_path, server_tls, topic, ca_file=str(server_tls.certs / "ca.pem"))
    async with running_daemon(doc):
        await wait_for(lambda: len(set(seen_ids(doc))) == sum(high.values()) == 20, timeout=60, what="all 20 records")


async def test_the_source_reads_over_mutual_tls_with_its_certificate(tmp_path, mutual_tls):
    client = mutual_tls.client(with_cert=True)
    topic = new_topic(mutual_tls.address, 1, client=client)
    produce(mutual_tls.address, topic, [(None, b'{"n": 1}'), (None, b'{"n": 2}')], client=client)
    doc = tls_config(tmp_path, mutual_tls, topic, ca_file=str(mutual_tls.certs / "ca.pem"),
                     cert_file=str(mutual_tls.certs / "client.pem"), key_file=str(mutual_tls.certs / "client.key"))
    async with running_daemon(doc):
        await wait_for(lambda: set(seen_ids(doc)) == {f"{topic}/0/0", f"{topic}/0/1"}, timeout=60, what="both")


@pytest.mark.parametrize("failure", ["wrong CA", "no client certificate"])
async def test_a_tls_failure_is_one_clear_source_error_not_a_hang(tmp_path, failure, request, stunnel):
    broker = request.getfixturevalue("server_tls" if failure == "wrong CA" else "mutual_tls")
    topic = new_topic(broker.address, 1, client=broker.client(with_cert=failure != "wrong CA"))
    ca = broker.certs / ("other-ca.pem" if failure == "wrong CA" else "ca.pem")
    doc = tls_config(tmp_path, broker, topic, ca_file=str(ca))
    daemon = Daemon(parse(doc))
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: daemon.run(handle_signals=False))
        await daemon.started.wait()
        await wait_for(lambda: daemon.triggers["t"].source_error, timeout=60, what="the source to report its error")
        error = daemon.triggers["t"].status()["last_error"]
        assert "Kafka" in error and "\n" not in error, error
        assert ("is not trusted" if failure == "wrong CA" else "certificate") in error, error
        assert not daemon.triggers["t"].ready
        daemon.stop()
    print(f"{failure}: {error}")
