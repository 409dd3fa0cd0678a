"""The `eventswarm` command against a real state store and a running daemon (process executor)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from dispatcher.store import Database
from tests.support import DaemonProcess, base_config, free_port, post, store_of, toml, wait_until


def config(tmp_path: Path, script: str, port: int = 0) -> dict[str, Any]:
    doc = base_config(tmp_path, executor="process", port=port or free_port())
    doc["functions"]["f"] = {"command": ["sh", "-c", script], "timeout": "20s"}
    doc["triggers"]["t"] = {"function": "f", "source": {"kind": "webhook", "path": "/hooks/t"},
                            "ordering": "none", "batch": {"max_events": 10, "max_wait": "20ms"},
                            "retry": {"max_attempts": 2, "initial": "10ms", "jitter": False}}
    return doc


def cli(tmp_path: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "dispatcher", *args, "-c", str(tmp_path / "eventswarm.toml")],
                          capture_output=True, text=True, timeout=120)
    if check:
        assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return done


def test_invoke_runs_one_invocation_and_prints_its_stdout(tmp_path):
    (tmp_path / "eventswarm.toml").write_text(toml(config(tmp_path, "cat")))
    done = cli(tmp_path, "invoke", "t", "--data", '{"voter_id": 7}', "--wait")
    doc = json.loads(done.stdout)
    assert doc["events"][0]["data"] == {"voter_id": 7}
    records = json.loads(cli(tmp_path, "invocations", "--json").stdout)
    assert [r["status"] for r in records] == ["succeeded"]
    assert set(records[0]) >= {"id", "trigger", "function", "status", "attempt", "event_ids", "exit_code",
                               "queued_at", "started_at", "finished_at", "executor_ref"}
    assert json.loads(cli(tmp_path, "logs", records[0]["id"]).stdout) == doc


def test_invoke_of_a_failing_function_exits_1_and_names_the_logs(tmp_path):
    (tmp_path / "eventswarm.toml").write_text(toml(config(tmp_path, "echo broken >&2; exit 9")))
    done = cli(tmp_path, "invoke", "t", check=False)
    assert done.returncode == 1 and "exit code 9" in done.stderr and "eventswarm logs" in done.stderr
    record = json.loads(cli(tmp_path, "invocations", "--json").stdout)[0]
    assert cli(tmp_path, "logs", record["id"]).stderr == "broken\n"


def test_invoke_of_an_unknown_trigger_is_a_usage_error(tmp_path):
    (tmp_path / "eventswarm.toml").write_text(toml(config(tmp_path, "cat")))
    done = cli(tmp_path, "invoke", "nope", check=False)
    assert done.returncode == 2 and "no trigger 'nope'" in done.stderr


def test_dead_letters_can_be_listed_shown_replayed_and_purged(tmp_path, daemon_process):
    flag = tmp_path / "broken"
    flag.touch()
    doc = config(tmp_path, f"cat >/dev/null; if [ -e {flag} ]; then echo failing >&2; exit 5; fi")
    daemon = daemon_process(doc).start()
    url = f"http://127.0.0.1:{daemon.port}"
    ids = [json.loads(post(f"{url}/hooks/t", json.dumps({"n": i}).encode())[2])["id"] for i in range(3)]
    wait_until(lambda: len(store_of(doc).dead_letters()) == 3, timeout=30, what="three dead letters")

    letters = json.loads(cli(tmp_path, "dlq", "list", "--json").stdout)
    assert sorted(d["event"]["id"] for d in letters) == sorted(ids)
    # Every failed try is kept, bisect splits included; the last is the final attempt.
    assert all(d["attempts"][-1]["attempt"] == 2 and {a["exit_code"] for a in d["attempts"]} == {5} for d in letters)
    assert "failing" in letters[0]["attempts"][0]["stderr_tail"]
    shown = json.loads(cli(tmp_path, "dlq", "show", letters[0]["id"], "-o", "json").stdout)
    assert shown["event"]["id"] == letters[0]["event"]["id"]

    status = json.loads(cli(tmp_path, "status", "--json").stdout)
    assert status["triggers"][0]["trigger"] == "t" and "exit code 5" in status["triggers"][0]["last_error"]

    flag.unlink()
    replayed = cli(tmp_path, "dlq", "replay", letters[0]["id"][:10], letters[1]["id"]).stdout  # it waits for them
    assert "replaying 2" in replayed and "replayed 2 of 2: 2 ran, 0 failed again" in replayed, replayed
    assert len(store_of(doc).dead_letters()) == 1
    succeeded = {i for r in store_of(doc).invocations(status="succeeded") for i in r.event_ids}
    assert succeeded == {letters[0]["event"]["id"], letters[1]["event"]["id"]}
    assert "removed 1 dead letters" in cli(tmp_path, "dlq", "purge").stdout
    assert json.loads(cli(tmp_path, "dlq", "list", "--json").stdout) == []

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    for name in ("eventswarm_events_received_total", "eventswarm_events_acked_total", "eventswarm_batches_total",
                 "eventswarm_batch_size_bucket", "eventswarm_invocation_seconds_bucket", "eventswarm_in_flight",
                 "eventswarm_buffered_events", "eventswarm_dead_letters_total"):
        assert f'{name}{{' in metrics, name
    assert 'eventswarm_dead_letters_total{trigger="t"} 3.0' in metrics
    assert daemon.stop() == 0


def test_sigterm_lets_the_batch_in_flight_finish_and_exits_0(tmp_path, daemon_process):
    started, finished = tmp_path / "started", tmp_path / "finished"
    doc = config(tmp_path, f"cat >/dev/null; touch {started}; sleep 1; touch {finished}")
    daemon = daemon_process(doc).start()
    status, _, _ = post(f"http://127.0.0.1:{daemon.port}/hooks/t", b"{}")
    assert status == 202
    wait_until(started.exists, timeout=30, what="the function to start")
    assert daemon.stop() == 0
    assert finished.exists()
    assert [r.status for r in store_of(doc).invocations()] == ["succeeded"]
    assert store_of(doc).inbox_size("t") == 0


@pytest.mark.parametrize("command", [["invocations"], ["dlq", "list"], ["logs", "x"]])
def test_commands_reading_the_store_say_so_when_there_is_none(tmp_path, command):
    (tmp_path / "eventswarm.toml").write_text(toml(config(tmp_path, "cat")))
    done = cli(tmp_path, *command, check=False)
    assert done.returncode == 1 and "no state store" in done.stderr


def _validate(tmp_path: Path, doc: dict[str, Any], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    (tmp_path / "eventswarm.toml").write_text(toml(doc))
    return subprocess.run([sys.executable, "-m", "dispatcher", "validate", "-c", str(tmp_path / "eventswarm.toml")],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})


def _webhook(doc: dict[str, Any], name: str, **source: Any) -> None:
    doc["triggers"][name] = {"function": "f", "source": {"kind": "webhook", "path": "/hooks/t", **source}}


@pytest.mark.parametrize(("case", "expected"), [
    ("two triggers on one route", "triggers.second.source: POST /hooks/t is already served by trigger 't'"),
    ("a standard-webhooks secret that is not base64", "triggers.t.source.signature: a standard-webhooks secret is base64"),
    ("a topic_pattern that is not a regular expression", "triggers.k.source.topic_pattern: not a regular expression"),
    ("an environment override that is not JSON", "daemon: the environment variable EVENTSWARM_DAEMON is not valid JSON"),
    ("a listen address beyond loopback without an API token", "daemon.listen: 0.0.0.0:8080 is reachable beyond this "
                                                             "machine, and the API has no token"),
    ("an API token variable that is not set", "daemon.api_token_env: environment variable ES_NO_TOKEN is not set"),
    ("read_only under the process executor", "functions.f.read_only: a process cannot be given a read-only root"),
    ("a user this host does not know", "functions.f.user: no user 'no-such-user' on this host"),
])
def test_validate_refuses_configs_that_could_not_run_with_the_key_path(tmp_path, case, expected):
    doc = config(tmp_path, "cat")
    env: dict[str, str] = {}
    if case == "two triggers on one route":
        _webhook(doc, "second")
    elif case.startswith("a standard-webhooks"):
        env["HOOK_SECRET"] = "whsec_not*base64!"
        _webhook(doc, "t", signature={"scheme": "standard-webhooks", "secret_env": "HOOK_SECRET"})
    elif case.startswith("a topic_pattern"):
        doc["triggers"]["k"] = {"function": "f", "source": {"kind": "kafka", "bootstrap_servers": ["127.0.0.1:1"],
                                                            "topic_pattern": "votes-(", "group_id": "g"}}
    elif case.startswith("a listen address"):
        doc["daemon"]["listen"] = "0.0.0.0:8080"
    elif case.startswith("read_only"):
        doc["functions"]["f"]["read_only"] = True
    elif case.startswith("a user"):
        doc["functions"]["f"]["user"] = "no-such-user"
    elif case.startswith("an API token"):
        doc["daemon"]["api_token_env"] = "ES_NO_TOKEN"
    else:
        env["EVENTSWARM_DAEMON"] = "garbage{"
    done = _validate(tmp_path, doc, env)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert expected in done.stderr, done.stderr


def test_invocations_list_show_logs_and_watch_take_unique_prefixes_and_the_kubectl_habits(tmp_path, daemon_process):
    doc = config(tmp_path, 'cat >/dev/null; if grep -q fail "$EVENTSWARM_INPUT"; then echo no >&2; exit 4; fi; echo ok')
    doc["triggers"]["t"]["retry"] = {"max_attempts": 1}
    daemon = daemon_process(doc).start()
    hook = f"http://127.0.0.1:{daemon.port}/hooks/t"
    assert post(hook, b'{"n": 1}')[0] == 202
    wait_until(lambda: store_of(doc).invocations(status="succeeded"), timeout=30, what="a success")
    assert post(hook, b'{"fail": 1}')[0] == 202
    wait_until(lambda: store_of(doc).invocations(status="failed"), timeout=30, what="a failure")
    failed = store_of(doc).invocations(status="failed")[0]

    table = cli(tmp_path, "invocations").stdout.splitlines()
    assert table[0].split() == ["ID", "TRIGGER", "STATUS", "ATTEMPT", "EVENTS", "EXIT", "AGE", "DURATION"]
    assert len(table) == 3 and table[1].startswith(failed.id) and table[1].split()[2] == "failed"
    assert re.fullmatch(r"\d+(\.\d)?(ms|s|m)", table[1].split()[6]), table[1]  # AGE
    assert "FUNCTION" in cli(tmp_path, "invocations", "-o", "wide").stdout.splitlines()[0]
    assert json.loads(cli(tmp_path, "invocations", "-o", "json").stdout) == \
        json.loads(cli(tmp_path, "invocations", "--json").stdout)
    assert len(json.loads(cli(tmp_path, "invocations", "--since", "1h", "-o", "json").stdout)) == 2
    assert json.loads(cli(tmp_path, "invocations", "--since", "0s", "-o", "json").stdout) == []
    assert cli(tmp_path, "invocations", "--since", "soon", check=False).returncode == 2

    prefix = failed.id[:8]
    shown = cli(tmp_path, "invocations", "show", prefix).stdout
    assert "id:" in shown and failed.id in shown and "exit_code:" in shown and "stderr_bytes:" in shown
    assert json.loads(cli(tmp_path, "invocations", "show", prefix, "-o", "json").stdout)["exit_code"] == 4
    assert cli(tmp_path, "logs", prefix).stderr == "no\n"
    assert cli(tmp_path, "logs", "--last", "t").stderr == "no\n"
    missing = cli(tmp_path, "logs", "zzzz", check=False)
    assert missing.returncode == 1 and "no invocation zzzz" in missing.stderr
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}/v1/invocations/{prefix}", timeout=10) as answer:
        assert json.loads(answer.read())["id"] == failed.id
    letter = store_of(doc).dead_letters()[0]
    assert json.loads(cli(tmp_path, "dlq", "show", letter.id[:8], "-o", "json").stdout)["id"] == letter.id
    assert "AGE" in cli(tmp_path, "dlq", "list").stdout.splitlines()[0]
    assert "CREATED" in cli(tmp_path, "dlq", "list", "-o", "wide").stdout.splitlines()[0]
    assert json.loads(cli(tmp_path, "dlq", "list", "-o", "json").stdout)[0]["id"] == letter.id
    quick = cli(tmp_path, "dlq", "replay", "--no-wait", letter.id).stdout  # (it fails again: a new dead letter)
    assert quick == "replaying 1 dead letters\n", quick
    again = wait_until(lambda: [d for d in store_of(doc).dead_letters() if d.id != letter.id], timeout=30,
                       what="the replayed letter to fail again")[0]
    waited = cli(tmp_path, "dlq", "replay", "--timeout", "30s", "--url", f"http://127.0.0.1:{daemon.port}",
                 again.id, check=False)
    assert waited.returncode == 1, waited.stderr  # (documented: a replay whose events failed again exits 1)
    assert "replayed 1 of 1: 0 ran, 1 failed again" in waited.stdout, waited.stdout
    assert cli(tmp_path, "dlq", "replay", "--timeout", "soon", again.id, check=False).returncode == 2

    watch = subprocess.Popen([sys.executable, "-m", "dispatcher", "invocations", "--watch", "-c",
                              str(tmp_path / "eventswarm.toml")], stdout=subprocess.PIPE, text=True)
    try:
        assert watch.stdout is not None
        lines: list[str] = []
        while sum(1 for line in lines if line.startswith("ID ")) < 2:  # a second listing follows the first
            line = watch.stdout.readline()
            assert line, "invocations --watch ended"
            lines.append(line)
        assert sum(1 for line in lines if line.startswith("-- ")) == 1, lines
    finally:
        watch.terminate()
        watch.communicate(timeout=30)  # (and its pipe closed)
    for command in (["invocations"], ["invocations", "show"], ["logs"], ["dlq", "list"], ["reload"], ["status"]):
        helped = cli(tmp_path, *command, "--help").stdout
        assert "Usage:" in helped
    assert all(flag in cli(tmp_path, "invocations", "--help").stdout for flag in ("--since", "--watch", "-o,"))
    assert "--last" in cli(tmp_path, "logs", "--help").stdout
    assert daemon.stop() == 0


def test_init_writes_a_starter_that_validates_and_runs_and_refuses_to_overwrite(tmp_path, daemon_process):
    folder = tmp_path / "project"
    done = subprocess.run([sys.executable, "-m", "dispatcher", "init", "--dir", str(folder), "--executor", "process"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    config_file = folder / "eventswarm.toml"
    assert "wrote" in done.stdout and config_file.exists() and (folder / "functions" / "hello.py").exists()
    assert "# " in config_file.read_text()  # commented
    checked = subprocess.run([sys.executable, "-m", "dispatcher", "validate", "-c", str(config_file)],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    again = subprocess.run([sys.executable, "-m", "dispatcher", "init", "--dir", str(folder)],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "exists" in again.stderr
    (folder / "functions" / "hello.py").write_text("edited")
    forced = subprocess.run([sys.executable, "-m", "dispatcher", "init", "--dir", str(folder), "--executor", "process",
                             "--force"], capture_output=True, text=True, timeout=60)
    assert forced.returncode == 0 and "json.load" in (folder / "functions" / "hello.py").read_text()
    for executor in ("docker", "auto"):  # (auto: this machine has an engine, so docker)
        other = tmp_path / executor
        made = subprocess.run([sys.executable, "-m", "dispatcher", "init", "--dir", str(other), "--executor", executor],
                              capture_output=True, text=True, timeout=60)
        assert made.returncode == 0 and "docker build -t hello-fn:latest" in made.stdout, made.stderr
        assert (other / "functions" / "hello" / "Dockerfile").exists()
        assert subprocess.run([sys.executable, "-m", "dispatcher", "validate", "-c", str(other / "eventswarm.toml")],
                              capture_output=True, timeout=60).returncode == 0
    port = free_port()
    process = DaemonProcess(config_file, port, tmp_path / "daemon.log",
                            env={"EVENTSWARM_DAEMON__LISTEN": f"127.0.0.1:{port}"}).start()
    try:
        assert post(f"http://127.0.0.1:{port}/hooks/hello", b'{"n": 1}')[0] == 202
        store = Database(str(folder / "eventswarm.db"))
        record = wait_until(lambda: store.invocations(status="succeeded"), timeout=30, what="the starter function")[0]
        out, err = store.logs(record.id)
        assert json.loads(out.decode().splitlines()[0])["data"] == {"n": 1} and b"1 events in batch" in err
    finally:
        assert process.stop() == 0


def test_invoke_filter_tests_the_filter_without_running_and_invoke_reads_stdin(tmp_path):
    doc = config(tmp_path, "cat")
    doc["triggers"]["t"]["filter"] = "data.amount > 100"
    (tmp_path / "eventswarm.toml").write_text(toml(doc))
    base = [sys.executable, "-m", "dispatcher", "invoke", "t", "-c", str(tmp_path / "eventswarm.toml")]
    big = subprocess.run([*base, "--filter", "--data", '{"amount": 250}'], capture_output=True, text=True, timeout=60)
    small = subprocess.run([*base, "--filter"], input='{"amount": 5}', capture_output=True, text=True, timeout=60)
    assert (big.returncode, big.stdout) == (0, "match\n") and (small.returncode, small.stdout) == (1, "no match\n")
    assert not (tmp_path / "state.db").exists(), "--filter ran something"
    piped = subprocess.run(base, input='{"amount": 7}', capture_output=True, text=True, timeout=60)
    assert piped.returncode == 0 and json.loads(piped.stdout)["events"][0]["data"] == {"amount": 7}
    bad = subprocess.run(base, input="{not json", capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not JSON" in bad.stderr
    assert "--filter" in cli(tmp_path, "invoke", "--help").stdout and "stdin" in cli(tmp_path, "invoke", "--help").stdout


def test_shell_completion_as_the_readme_documents_it():
    import os

    env = {**os.environ, "_EVENTSWARM_COMPLETE": "bash_complete", "COMP_WORDS": "eventswarm invocations --out",
           "COMP_CWORD": "2"}
    command = str(Path(sys.executable).parent / "eventswarm")  # the console script: completion keys on its name
    done = subprocess.run([command], capture_output=True, text=True, timeout=60, env=env)
    assert "plain,--output" in done.stdout.splitlines(), done.stdout
    script = subprocess.run([command], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "_EVENTSWARM_COMPLETE": "bash_source"})
    assert "_eventswarm_completion()" in script.stdout


def test_logs_follow_streams_a_running_invocations_output_as_it_comes(tmp_path, daemon_process):
    doc = config(tmp_path, "cat >/dev/null; echo one; sleep 2; echo two >&2; sleep 1; echo three")
    daemon = daemon_process(doc).start()
    assert post(f"http://127.0.0.1:{daemon.port}/hooks/t", b'{"n": 1}')[0] == 202
    running = wait_until(lambda: store_of(doc).invocations(status="running"), timeout=30, what="the run")[0]
    follower = subprocess.Popen([sys.executable, "-m", "dispatcher", "logs", running.id[:10], "--follow", "--url",
                                 f"http://127.0.0.1:{daemon.port}", "-c", str(tmp_path / "eventswarm.toml")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline() == "one\n"
        assert store_of(doc).invocation(running.id).status == "running", "the line came only at the end"
        out, err = follower.communicate(timeout=60)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.communicate()
    assert follower.returncode == 0 and out == "three\n" and err == "two\n", (out, err)
    assert store_of(doc).invocation(running.id).status == "succeeded"
    assert "--follow" in cli(tmp_path, "logs", "--help").stdout
    assert daemon.stop() == 0


def test_status_watch_shows_the_status_again_and_again(tmp_path, daemon_process):
    daemon = daemon_process(config(tmp_path, "cat")).start()
    watch = subprocess.Popen([sys.executable, "-m", "dispatcher", "status", "--watch", "-c",
                              str(tmp_path / "eventswarm.toml")], stdout=subprocess.PIPE, text=True)
    try:
        assert watch.stdout is not None
        headers = 0
        while headers < 2:
            line = watch.stdout.readline()
            assert line, "status --watch ended"
            headers += line.startswith("TRIGGER ")
    finally:
        watch.terminate()
        watch.communicate(timeout=30)
    assert "--watch" in cli(tmp_path, "status", "--help").stdout
    assert daemon.stop() == 0
