"""Warm functions benchmark: the same function, cold (a container per batch) and warm (a pool), in one daemon.

The daemon runs as `eventswarm run` (a process of its own, as users run it) with the docker executor and two
synchronous webhook triggers on the same busybox function (`cat`, 1 KB body, network none): one cold, one warm
(`warm = { min_idle = 8, max = 8 }`). Measured in the same run:

- latency: the client's whole round trip of sequential synchronous webhooks (p50, p99; after a warm-up);
- throughput: 8 clients each sending synchronous webhooks back to back (8 in flight, batches of one), as
  invocations/s over the run;
- the daemon's own share of a warm round trip: the same batch run by the warm executor alone, in this
  process (no HTTP, no records), subtracted from the round trip's p50.

Prints its figures and writes them to bench/results/warm.json. Needs the project's services (`make services`).
Run: `.venv/bin/python bench/warm.py`.
"""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "eventswarm/busybox:test"
BODY = json.dumps({"event": "vote.cast", "padding": "x" * 1000}).encode()
LATENCY_SAMPLES = {"cold": 60, "warm": 1000}
THROUGHPUT_SECONDS = {"cold": 15.0, "warm": 10.0}
CLIENTS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(state: Path, port: int) -> str:
    function = f'image = "{IMAGE}"\ncommand = ["cat"]\ntimeout = "30s"\n'
    trigger = ('ordering = "none"\nmax_in_flight = 8\n'
               'retry = {{ max_attempts = 1 }}\nsource = {{ kind = "webhook", path = "/hooks/{0}", mode = "sync" }}\n')
    return f"""
[daemon]
state = "sqlite:///{state}"
listen = "127.0.0.1:{port}"
log_level = "warning"

[executor]
kind = "docker"
max_in_flight = 16

[functions.cold]
{function}
[functions.warm]
{function}warm = {{ min_idle = 8, max = 8 }}

[triggers.cold]
function = "cold"
{trigger.format("cold")}
[triggers.warm]
function = "warm"
{trigger.format("warm")}"""


def post(conn: http.client.HTTPConnection, path: str) -> float:
    started = time.perf_counter()
    conn.request("POST", path, BODY, {"Content-Type": "application/json"})
    response = conn.getresponse()
    body = response.read()
    elapsed = time.perf_counter() - started
    if response.status != 200 or b"xxxxxxxxxx" not in body:  # (cat: the input document, with the body in it)
        raise SystemExit(f"{path}: {response.status} {body[:200]!r}")
    return elapsed


def latency(port: int, name: str) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for _ in range(5 if name == "cold" else 50):
        post(conn, f"/hooks/{name}")
    samples = sorted(post(conn, f"/hooks/{name}") for _ in range(LATENCY_SAMPLES[name]))
    conn.close()
    return {"p50_ms": 1000 * statistics.median(samples),
            "p99_ms": 1000 * samples[min(len(samples) - 1, int(len(samples) * 0.99))],
            "samples": len(samples)}


def throughput(port: int, name: str) -> float:
    done = [0] * CLIENTS
    stop = time.perf_counter() + THROUGHPUT_SECONDS[name]

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.perf_counter() < stop:
            post(conn, f"/hooks/{name}")
            done[i] += 1
        conn.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.perf_counter() - started)


def executor_alone() -> float:
    """p50 (ms) of the warm executor running the bench's batch by itself: the part of a round trip that is the
    container's (the runner starting `cat` on the input) and the frames'."""
    import anyio

    from dispatcher.config import ExecutorConfig, FunctionConfig, WarmConfig
    from dispatcher.dispatch import input_document
    from dispatcher.events import Event, Run
    from dispatcher.executors.base import Invocation
    from dispatcher.executors.docker import DockerExecutor

    function = FunctionConfig(image=IMAGE, command=["cat"], warm=WarmConfig(min_idle=1, max=1))
    event = Event(source="bench", type="t", data=json.loads(BODY))

    async def measure() -> float:
        executor = DockerExecutor(ExecutorConfig(kind="docker"), tempfile.mkdtemp())
        await executor.start()
        samples = []
        try:
            for i in range(LATENCY_SAMPLES["warm"] + 50):
                batch_id = f"bench-{i}"
                invocation = Invocation(id=batch_id, trigger="warm", function_name="alone", function=function,
                                        input=input_document("warm", "alone", batch_id, 1, [Run.of([event])]),
                                        env={"EVENTSWARM_BATCH_ID": batch_id}, args=[], owner="bench-warm")
                started = time.perf_counter()
                result = await executor.run(invocation)
                if i >= 50:
                    samples.append(time.perf_counter() - started)
                if not result.ok:
                    raise SystemExit(f"executor alone: {result}")
        finally:
            await executor.close()
        return 1000 * statistics.median(samples)

    return anyio.run(measure)


def wait_pool(port: int, size: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the daemon exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status", timeout=2) as answer:
                pools = json.load(answer).get("pools", [])
            if pools and pools[0]["idle"] >= size:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("the warm pool never filled")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        config_file = Path(tmp) / "eventswarm.toml"
        config_file.write_text(config(Path(tmp) / "state.db", port))
        process = subprocess.Popen([str(ROOT / ".venv" / "bin" / "eventswarm"), "run", "-c", str(config_file)])
        try:
            wait_pool(port, 8, process)
            result: dict[str, object] = {}
            for name in ("cold", "warm"):
                result[f"{name}_latency"] = latency(port, name)
                result[f"{name}_invocations_per_s"] = throughput(port, name)
                print(f"{name}: sync webhook p50 {result[f'{name}_latency']['p50_ms']:.1f} ms, "  # type: ignore[index]
                      f"p99 {result[f'{name}_latency']['p99_ms']:.1f} ms; "  # type: ignore[index]
                      f"{result[f'{name}_invocations_per_s']:.1f} invocations/s with {CLIENTS} in flight")
        finally:
            process.terminate()
            process.wait()
    alone = executor_alone()
    result["warm_executor_alone_p50_ms"] = alone
    result["daemon_share_p50_ms"] = result["warm_latency"]["p50_ms"] - alone  # type: ignore[index]
    print(f"warm executor alone: p50 {alone:.2f} ms; the daemon's own share of a warm round trip (HTTP, records, "
          f"the thread hop): {result['daemon_share_p50_ms']:.2f} ms")
    result["throughput_ratio"] = result["warm_invocations_per_s"] / result["cold_invocations_per_s"]  # type: ignore[operator]
    result["latency_ratio"] = (result["cold_latency"]["p50_ms"]  # type: ignore[index]
                               / result["warm_latency"]["p50_ms"])  # type: ignore[index]
    result["clients"] = CLIENTS
    print(f"warm vs cold: p50 {result['latency_ratio']:.0f}x lower, {result['throughput_ratio']:.0f}x the invocations/s")
    out = ROOT / "bench" / "results" / "warm.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
