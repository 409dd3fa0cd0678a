"""Slow and idle HTTP clients are cut off after ``daemon.client_timeout``; ``daemon.max_connections`` caps them."""

from __future__ import annotations

import socket
import time

from tests.faults.conftest import recording_daemon


def closed_by_server(sock: socket.socket, within: float) -> tuple[bool, bytes]:
    """Whether the server closed ``sock`` within ``within`` seconds, and what it sent first."""
    sock.settimeout(within)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
        return True, received
    except TimeoutError:
        return False, received
    except ConnectionResetError:
        return True, received


def test_idle_slowloris_and_slow_body_clients_are_cut_off_and_connections_are_capped(tmp_path):
    daemon, _ = recording_daemon(tmp_path, tmp_path, client_timeout="1s", max_connections=12)
    daemon.start()
    address = ("127.0.0.1", daemon.port)
    try:
        idle = [socket.create_connection(address) for _ in range(10)]
        # The cap: 10 idle + 2 more fill it; the next connection is answered 503 and closed at once.
        extra = [socket.create_connection(address) for _ in range(2)]
        over = socket.create_connection(address)
        closed, answer = closed_by_server(over, within=5)
        over.close()
        assert closed and answer.startswith(b"HTTP/1.1 503"), answer

        for sock in idle + extra:
            closed, _ = closed_by_server(sock, within=10)
            assert closed, "an idle connection was never closed"
            sock.close()

        # Slowloris: headers a byte at a time, never finished (each byte comes before the timeout would end it).
        slow = socket.create_connection(address)
        slow.sendall(b"POST /hooks/in HTTP/1.1\r\nHost: x\r\n")
        deadline = time.monotonic() + 15
        cut = False
        while time.monotonic() < deadline:
            try:
                slow.sendall(b"X")
            except OSError:
                cut = True
                break
            closed, _ = closed_by_server(slow, within=0.3)  # the client's own pace, and the check for a close
            if closed:
                cut = True
                break
        assert cut, "a slowloris client kept its connection for 15 s"
        slow.close()

        # A body that never arrives in full: 408, then closed.
        body = socket.create_connection(address)
        body.sendall(b"POST /hooks/in HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"a\"")
        closed, answer = closed_by_server(body, within=10)
        assert closed and answer.startswith(b"HTTP/1.1 408"), answer
        body.close()

        # And the daemon still answers.
        fresh = socket.create_connection(address)
        fresh.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        closed, answer = closed_by_server(fresh, within=10)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        fresh.close()
    finally:
        daemon.stop()
