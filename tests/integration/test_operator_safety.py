"""Operator safety through the real daemon, CLI and HTTP server: one daemon per state store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import docker

from dispatcher.daemon import owner_id
from dispatcher.executors.base import LABEL_OWNER
from tests.integration.test_webhook import config
from tests.support import free_port, post, store_of, toml, wait_until


def test_a_second_daemon_on_the_same_state_store_exits_2_at_once_and_the_first_ones_work_is_untouched(
        tmp_path, docker_engine, daemon_process):
    doc = config(tmp_path, executor="docker", script="cat >/dev/null; sleep 300", port=free_port())
    doc["functions"]["f"]["timeout"] = "5m"
    first = daemon_process(doc).start()
    status, _, _ = post(f"http://127.0.0.1:{first.port}/hooks/t", b'{"n": 1}')
    assert status == 202
    client = docker.from_env()
    owner = {"label": f"{LABEL_OWNER}={owner_id(str(tmp_path / 'state.db'))}"}
    container = wait_until(lambda: client.containers.list(sparse=True, filters=owner), timeout=60,
                           what="the first daemon's container")[0]
    running = store_of(doc).invocations(status="running")[0]
    second_doc = json.loads(json.dumps(doc))
    second_doc["daemon"]["listen"] = f"127.0.0.1:{free_port()}"  # (so that it could not fail on the port instead)
    second_file = tmp_path / "second.toml"
    second_file.write_text(toml(second_doc))
    second = subprocess.run([sys.executable, "-m", "dispatcher", "run", "-c", str(second_file)],
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 2, second.stderr
    assert f"pid {first.proc.pid}" in second.stderr and "one daemon per state store" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert store_of(doc).invocations(status="running")[0].id == running.id, "the first one's invocation was touched"
    try:
        assert client.containers.get(container.id).status == "running", "the first one's container was touched"
    finally:
        client.close()
    gc = subprocess.run([sys.executable, "-m", "dispatcher", "gc", "-c", str(first.config_file)],
                        capture_output=True, text=True, timeout=60)
    assert gc.returncode == 2 and "in use by" in gc.stderr, gc.stderr
    listed = subprocess.run([sys.executable, "-m", "dispatcher", "invocations", "--json", "-c", str(first.config_file)],
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and json.loads(listed.stdout)[0]["id"] == running.id, "a reader was locked out"
    assert first.stop() == 0
    again = daemon_process(doc).start()  # the lock went with the first one
    assert again.stop() == 0


def test_the_api_needs_the_token_set_through_the_config_and_the_cli_sends_it(tmp_path, daemon_process):
    """The token comes from an environment variable named in the config, as a user sets it; two tokens (a
    rotation) are both accepted."""
    doc = config(tmp_path, executor="process", script="cat >/dev/null; echo failing >&2; exit 3", port=free_port())
    doc["daemon"].update({"api_token_env": ["ES_API_TOKEN", "ES_API_TOKEN_NEXT"], "listen": "0.0.0.0:" +
                          doc["daemon"]["listen"].rsplit(":", 1)[1]})  # beyond loopback: allowed with a token
    doc["triggers"]["t"]["retry"] = {"max_attempts": 1}
    tokens = {"ES_API_TOKEN": "t0k-en with spaces", "ES_API_TOKEN_NEXT": "next-token"}
    daemon = daemon_process(doc, env=tokens).start()
    base = f"http://127.0.0.1:{daemon.port}"

    def get(path: str, token: str | None = None, method: str = "GET", body: bytes | None = None) -> tuple[int, str]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(base + path, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    for path in ("/v1/status", "/v1/invocations", "/v1/invocations/x/logs", "/metrics"):
        assert get(path)[0] == 401, path
        assert get(path, "wrong")[0] == 401, path
        assert get(path, tokens["ES_API_TOKEN"])[0] in (200, 404), path
        assert get(path, tokens["ES_API_TOKEN_NEXT"])[0] in (200, 404), path
    assert get("/v1/dead-letters/replay", method="POST", body=b"{}")[0] == 401
    assert get("/v1/dead-letters/replay", tokens["ES_API_TOKEN"], "POST", b"{}")[0] == 400
    assert get("/v1/invocations?status=bogus", tokens["ES_API_TOKEN"])[0] == 400
    assert get("/v1/status", tokens["ES_API_TOKEN"], "DELETE")[0] == 405
    assert get("/healthz")[0] == 200 and get("/readyz")[0] == 200  # probes need no token
    assert post(f"{base}/hooks/t", b'{"n": 1}')[0] == 202  # nor webhooks: they have their own signatures
    wait_until(lambda: store_of(doc).dead_letters(), timeout=30, what="a dead letter")

    def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        plain = {k: v for k, v in os.environ.items() if k not in tokens and k != "EVENTSWARM_API_TOKEN"}
        return subprocess.run([sys.executable, "-m", "dispatcher", *args, "-c", str(daemon.config_file)],
                              capture_output=True, text=True, timeout=60, env={**plain, **env})

    shown = cli("status", "--json", **tokens)
    assert shown.returncode == 0 and json.loads(shown.stdout)["triggers"][0]["trigger"] == "t", shown.stderr
    replayed = cli("dlq", "replay", "--trigger", "t", **tokens)  # (through the API, with the token)
    assert replayed.returncode == 1 and "1 failed again" in replayed.stdout, replayed.stderr  # (its function fails)
    unset = cli("status")  # the variable the config names is not set: the config says so
    assert unset.returncode == 2 and "daemon.api_token_env: environment variable ES_API_TOKEN is not set" in unset.stderr
    refused = cli("status", "--url", base)  # no token at all
    assert refused.returncode == 1 and "HTTP 401" in refused.stderr and "Traceback" not in refused.stderr
    assert cli("status", "--url", base, EVENTSWARM_API_TOKEN="next-token").returncode == 0
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log.read_text()


def test_a_standard_webhooks_delivery_sent_twice_runs_once(tmp_path, daemon_process):
    from tests.faults.test_hostile_input import STANDARD_SECRET, standard

    doc = config(tmp_path, executor="process", port=free_port(),
                 signature={"scheme": "standard-webhooks", "secret_env": "STANDARD_SECRET"})
    daemon = daemon_process(doc, env={"STANDARD_SECRET": STANDARD_SECRET}).start()
    url = f"http://127.0.0.1:{daemon.port}/hooks/t"
    body = b'{"order": 17}'
    first = post(url, body, standard(body, "msg_2Lh9"))
    again = post(url, body, standard(body, "msg_2Lh9"))  # a replay: new timestamp, same delivery
    other = post(url, body, standard(body, "msg_other"))
    assert first[0] == 202 and other[0] == 202
    assert again[0] == 200 and json.loads(again[2]) == {"id": json.loads(first[2])["id"], "duplicate": True}
    wait_until(lambda: len({i for r in store_of(doc).invocations(status="succeeded") for i in r.event_ids}) == 2,
               timeout=30, what="the two deliveries to run")
    assert daemon.stop() == 0
    assert sum(len(r.event_ids) for r in store_of(doc).invocations()) == 2, "a delivery ran twice"


def test_a_process_function_sees_only_its_own_environment_and_runs_under_its_limits(tmp_path, daemon_process):
    """The daemon holds a webhook secret in its environment; functions see PATH, EVENTSWARM_*, their env and
    their secrets (as files), nothing else; ``user``, ``cpus``, ``memory`` and ``pids_limit`` hold."""
    assert os.geteuid() == 0, "this test runs as root (as CI does): functions run as another user"
    token = tmp_path / "token.txt"
    token.write_text("s3cret-file")
    doc = config(tmp_path, executor="process", port=free_port())
    doc["triggers"].clear()
    spawn8 = "cat >/dev/null; for i in 1 2 3 4 5 6 7 8; do sleep 2 & done; wait; echo spawned"
    hungry = [sys.executable, "-c", "import sys; sys.stdin.read(); bytearray(256 * 2**20); print('allocated')"]
    functions = {
        "env": {"command": ["sh", "-c", 'cat >/dev/null; env; echo "secret=$(cat "$EVENTSWARM_SECRETS/token.txt")"'],
                "env": {"OWN": "mine"}, "secrets": [str(token)]},
        "who": {"command": ["sh", "-c", "cat >/dev/null; id -u; nproc; cat \"$EVENTSWARM_INPUT\" >/dev/null && echo read"],
                "user": "nobody", "cpus": 1},
        "forks": {"command": ["sh", "-c", spawn8], "user": "nobody", "pids_limit": 4},
        "forks-free": {"command": ["sh", "-c", spawn8], "user": "nobody"},
        "hungry": {"command": hungry, "memory": "128MiB"},
        "fed": {"command": hungry},
    }
    for name, function in functions.items():
        doc["functions"][name] = {"timeout": "30s", **function}
        doc["triggers"][name] = {"function": name, "retry": {"max_attempts": 1},
                                 "source": {"kind": "webhook", "path": f"/hooks/{name}", "mode": "sync"}}
    daemon = daemon_process(doc, env={"HOOK_SECRET": "daemon-only", "UNRELATED": "x"}).start()

    def call(name: str) -> tuple[int, str]:
        status, _, body = post(f"http://127.0.0.1:{daemon.port}/hooks/{name}", b"{}")
        return status, body.decode()

    status, shown = call("env")
    assert status == 200, shown
    names = {line.split("=", 1)[0] for line in shown.splitlines() if "=" in line} - {"secret"}
    assert "HOOK_SECRET" not in names and "UNRELATED" not in names and "daemon-only" not in shown
    assert {"PATH", "OWN", "EVENTSWARM_TRIGGER", "EVENTSWARM_INPUT", "EVENTSWARM_SECRETS"} <= names
    assert {n for n in names if not n.startswith("EVENTSWARM_")} <= {"PATH", "OWN", "PWD"}, names  # (sh sets PWD)
    assert "secret=s3cret-file" in shown
    assert call("who") == (200, "65534\n1\nread\n")
    assert call("forks-free") == (200, "spawned\n")
    assert call("forks")[0] == 502
    assert call("fed") == (200, "allocated\n")
    assert call("hungry")[0] == 502
    failed = {r.trigger: store_of(doc).logs(r.id)[1].decode() for r in store_of(doc).invocations(status="failed")}
    assert "fork" in failed["forks"].lower() and "MemoryError" in failed["hungry"], failed
    assert daemon.stop() == 0


def test_sighup_adds_changes_and_removes_triggers_under_a_steady_webhook_load_and_loses_nothing(
        tmp_path, daemon_process):
    doc = config(tmp_path, executor="process", script="cat >/dev/null", port=free_port())
    base = doc["triggers"].pop("t")
    for name in "abc":
        doc["triggers"][name] = {**base, "source": {"kind": "webhook", "path": f"/hooks/{name}"}}
    daemon = daemon_process(doc).start()
    url = f"http://127.0.0.1:{daemon.port}"
    answers: dict[str, list[tuple[int, str | None]]] = {name: [] for name in "abcd"}
    stop = threading.Event()

    def load() -> None:  # one request at a time to each trigger, round and round, until told to stop
        n = 0
        while not stop.is_set():
            for name in "abcd":
                status, _, body = post(f"{url}/hooks/{name}", json.dumps({"n": n}).encode())
                answers[name].append((status, json.loads(body)["id"] if status == 202 else None))
            n += 1

    def status() -> dict:
        with urllib.request.urlopen(f"{url}/v1/status", timeout=10) as response:
            return json.loads(response.read())

    def accepted(name: str) -> int:
        return sum(1 for code, _ in answers[name] if code == 202)

    loader = threading.Thread(target=load)
    loader.start()
    try:
        wait_until(lambda: min(accepted(n) for n in "abc") >= 50, timeout=60, what="a steady load on a, b and c")
        first = status()["config"]
        doc["triggers"]["b"]["batch"] = {"max_events": 5, "max_wait": "10ms"}  # changed
        del doc["triggers"]["c"]  # removed
        doc["triggers"]["d"] = {**base, "source": {"kind": "webhook", "path": "/hooks/d"}}  # added
        daemon.config_file.write_text(toml(doc))
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: {t["trigger"] for t in status()["triggers"]} == {"a", "b", "d"}, timeout=60,
                   what="the reload")
        assert status()["config"]["hash"] != first["hash"]
        before = {name: accepted(name) for name in "abd"}
        wait_until(lambda: all(accepted(n) >= before[n] + 50 for n in "abd"), timeout=60,
                   what="more load on a, b and d after the reload")
        daemon.config_file.write_text("[triggers.broken\n")  # an invalid config: refused, nothing changes
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload refused" in daemon.log.read_text(), timeout=30, what="the refusal")
        assert {t["trigger"] for t in status()["triggers"]} == {"a", "b", "d"}
        assert accepted("a") > before["a"]
    finally:
        stop.set()
        loader.join(timeout=60)
    taken = {id_ for name in "abcd" for code, id_ in answers[name] if code == 202}
    wait_until(lambda: taken <= {i for r in store_of(doc).invocations(status="succeeded", limit=100_000)
                                 for i in r.event_ids}, timeout=60, what="every accepted event to run")
    assert {code for code, _ in answers["a"]} == {202}, "the unchanged trigger was disturbed"
    assert {code for code, _ in answers["b"]} <= {202, 503}
    assert accepted("c") >= 50 and accepted("d") >= 50
    del doc["triggers"]["d"]
    daemon.config_file.write_text(toml(doc))
    done = subprocess.run([sys.executable, "-m", "dispatcher", "reload", "--url", url, "-c", str(daemon.config_file)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "removed d" in done.stdout, (done.stdout, done.stderr)
    assert {t["trigger"] for t in status()["triggers"]} == {"a", "b"}
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log.read_text()


def test_metrics_parse_in_both_formats_with_webhook_codes_latency_lag_units_and_no_created_series(
        tmp_path, daemon_process):
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
    from prometheus_client.parser import text_string_to_metric_families

    doc = config(tmp_path, executor="process", port=free_port())
    daemon = daemon_process(doc).start()
    base = f"http://127.0.0.1:{daemon.port}"
    assert post(f"{base}/hooks/t", b'{"n": 1}')[0] == 202
    assert post(f"{base}/hooks/t", b'{"n": ')[0] == 400
    wait_until(lambda: store_of(doc).invocations(status="succeeded"), timeout=30, what="the event to run")

    def scrape(accept: str | None) -> tuple[str, str]:
        request = urllib.request.Request(f"{base}/metrics", headers={"Accept": accept} if accept else {})
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.headers["Content-Type"], response.read().decode()

    def samples(families) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}

    kind, text = scrape(None)
    assert kind.startswith("text/plain; version=0.0.4")
    plain = samples(text_string_to_metric_families(text))
    kind, text = scrape("application/openmetrics-text; version=1.0.0,text/plain;q=0.5")
    assert kind.startswith("application/openmetrics-text") and text.endswith("# EOF\n")
    opened = samples(openmetrics_families(text))
    for found in (plain, opened):
        assert found[("eventswarm_webhook_responses_total", (("code", "202"), ("trigger", "t")))] == 1
        assert found[("eventswarm_webhook_responses_total", (("code", "400"), ("trigger", "t")))] == 1
        assert found[("eventswarm_event_latency_seconds_count", (("trigger", "t"),))] >= 1
        assert any(name == "eventswarm_build_info" for name, _ in found)
        assert any(name == "process_resident_memory_bytes" for name, _ in found)
        assert not [name for name, _ in found if name.endswith("_created")], "a *_created series"
    assert daemon.stop() == 0


def test_json_logs_put_trigger_invocation_and_event_count_in_fields_of_their_own(tmp_path, daemon_process):
    doc = config(tmp_path, executor="process", script="cat >/dev/null; exit 3", port=free_port())
    doc["daemon"]["log_format"] = "json"
    doc["triggers"]["t"]["retry"] = {"max_attempts": 1}
    daemon = daemon_process(doc).start()
    assert post(f"http://127.0.0.1:{daemon.port}/hooks/t", b'{"n": 1}')[0] == 202
    wait_until(lambda: store_of(doc).dead_letters(), timeout=30, what="the dead letter")
    assert daemon.stop() == 0
    lines = [json.loads(line) for line in daemon.log.read_text().splitlines()]  # every line is JSON
    failed = next(line for line in lines if line["message"].startswith("invocation failed"))
    record = store_of(doc).invocations(status="failed")[0]
    assert failed["trigger"] == "t" and failed["invocation_id"] == record.id and failed["events"] == 1
    assert record.id not in failed["message"] and "trigger" not in failed["message"], failed["message"]
    lettered = next(line for line in lines if line["message"].startswith("stored as dead letters"))
    assert lettered["dead_letters"] == [store_of(doc).dead_letters()[0].id] and lettered["trigger"] == "t"
