"""The config: the example loads, environment overrides win, and every bad config names its key."""

import json
import subprocess
import sys
import tomllib

import pytest

from dispatcher.config import load, parse, schema
from dispatcher.errors import ConfigError
from tests.support import ROOT

GOOD = """
[functions.f]
image = "eventswarm/echo:test"

[triggers.t]
function = "f"
source = { kind = "webhook", path = "/hooks/t" }
"""

# (what is wrong, the config, the TOML path the error must name)
INVALID = [
    ("unknown top-level key", GOOD + "\n[deamon]\nlisten = '1'\n", "deamon"),
    ("unknown daemon key", "[daemon]\nlisten_addr = 'x'\n" + GOOD, "daemon.listen_addr"),
    ("listen without port", "[daemon]\nlisten = 'localhost'\n" + GOOD, "daemon.listen"),
    ("bad duration", "[daemon]\nshutdown_grace = 'soon'\n" + GOOD, "daemon.shutdown_grace"),
    ("bad log level", "[daemon]\nlog_level = 'loud'\n" + GOOD, "daemon.log_level"),
    ("bad executor kind", "[executor]\nkind = 'k8s'\n" + GOOD, "executor.kind"),
    ("zero in flight", "[executor]\nmax_in_flight = 0\n" + GOOD, "executor.max_in_flight"),
    ("bad cleanup", "[executor]\ncleanup = 'sometimes'\n" + GOOD, "executor.cleanup"),
    ("tls cert without key", "[executor]\ndocker_host = 'tcp://m:2376'\ntls_cert = '/etc/hostname'\n" + GOOD, "executor"),
    ("tls for a local engine", "[executor]\ntls_ca = '/etc/hostname'\n" + GOOD, "executor"),
    ("tls file missing", "[executor]\ndocker_host = 'tcp://m:2376'\ntls_ca = '/nonexistent/ca.pem'\n" + GOOD, "executor"),
    ("bad memory size", GOOD + "\n[functions.g]\nimage = 'x'\nmemory = 'lots'\n", "functions.g.memory"),
    ("bad function timeout", GOOD + "\n[functions.g]\nimage = 'x'\ntimeout = 5\ncpus = -1\n", "functions.g.cpus"),
    ("unknown function key", GOOD + "\n[functions.g]\nimage = 'x'\nentrypoint = ['sh']\n", "functions.g.entrypoint"),
    ("trigger without function", GOOD + "\n[triggers.u]\nsource = { kind = 'webhook', path = '/u' }\n", "triggers.u.function"),
    ("trigger naming a missing function", GOOD.replace('function = "f"', 'function = "nope"'), "triggers.t.function"),
    ("unknown source kind", GOOD.replace('kind = "webhook"', 'kind = "carrier-pigeon"'), "triggers.t.source"),
    ("source without kind", GOOD.replace('kind = "webhook", ', ''), "triggers.t.source"),
    ("webhook path without slash", GOOD.replace('"/hooks/t"', '"hooks/t"'), "triggers.t.source.path"),
    ("webhook reserved path", GOOD.replace('"/hooks/t"', '"/metrics"'), "triggers.t.source.path"),
    ("unknown webhook key", GOOD.replace('path = "/hooks/t"', 'path = "/hooks/t", verb = "POST"'), "triggers.t.source.verb"),
    ("bad webhook mode", GOOD.replace('path = "/hooks/t"', 'path = "/hooks/t", mode = "later"'), "triggers.t.source.mode"),
    ("bad max_body", GOOD.replace('path = "/hooks/t"', 'path = "/hooks/t", max_body = "big"'), "triggers.t.source.max_body"),
    ("bad batch size", GOOD + "batch = { max_events = 0 }\n", "triggers.t.batch.max_events"),
    ("bad retry key", GOOD + "retry = { attempts = 3 }\n", "triggers.t.retry.attempts"),
    ("bad ordering", GOOD + "ordering = 'alphabetical'\n", "triggers.t.ordering"),
    ("bad on_exhausted", GOOD + "on_exhausted = 'panic'\n", "triggers.t.on_exhausted"),
    ("bad filter", GOOD + "filter = 'data.x >'\n", "triggers.t.filter"),
    ("unsafe filter", GOOD + "filter = \"__import__('os')\"\n", "triggers.t.filter"),
    ("missing signature secret", GOOD.replace('path = "/hooks/t"', 'path = "/hooks/t", signature = { scheme = "github", secret_env = "ES_TEST_UNSET" }'), "triggers.t.source.signature"),
    ("negative buffer", GOOD + "buffer = -5\n", "triggers.t.buffer"),
    ("not TOML at all", "this is = not [toml", "invalid TOML"),
    ("mount without target", GOOD + "\n[functions.g]\nimage = 'x'\nmounts = ['/data']\n", "functions.g.mounts"),
    ("mount with relative target", GOOD + "\n[functions.g]\nimage = 'x'\nmounts = ['/data:data']\n", "functions.g.mounts"),
    ("mount with bad mode", GOOD + "\n[functions.g]\nimage = 'x'\nmounts = ['/data:/data:rx']\n", "functions.g.mounts"),
    ("mounts on the process executor", "[executor]\nkind = 'process'\n" + GOOD.replace(
        'image = "eventswarm/echo:test"', 'command = ["cat"]\nmounts = ["/data:/data"]'), "functions.f.mounts"),
    ("file source without path", GOOD.replace('kind = "webhook", path = "/hooks/t"', 'kind = "file"'), "triggers.t.source.path"),
    ("file source bad on_success", GOOD.replace('kind = "webhook", path = "/hooks/t"',
                                                'kind = "file", path = "/tmp", on_success = "archive"'), "triggers.t.source.on_success"),
    ("file source bad on_failure", GOOD.replace('kind = "webhook", path = "/hooks/t"',
                                                'kind = "file", path = "/tmp", on_failure = "delete"'), "triggers.t.source.on_failure"),
    ("file key in lines mode", GOOD.replace('kind = "webhook", path = "/hooks/t"',
                                            'kind = "file", path = "/tmp", mode = "lines", on_success = "delete"'),
     "triggers.t.source.on_success"),
    ("lines key in file mode", GOOD.replace('kind = "webhook", path = "/hooks/t"',
                                            'kind = "file", path = "/tmp", max_line = "1KiB"'), "triggers.t.source.max_line"),
    ("file source no patterns", GOOD.replace('kind = "webhook", path = "/hooks/t"',
                                             'kind = "file", path = "/tmp", patterns = []'), "triggers.t.source.patterns"),
]


@pytest.mark.parametrize(("why", "text", "path"), INVALID, ids=[c[0] for c in INVALID])
def test_each_invalid_config_exits_2_naming_the_bad_key_without_a_traceback(tmp_path, why, text, path):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    done = subprocess.run([sys.executable, "-m", "dispatcher", "validate", "-c", str(config)],
                          capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 2, done.stderr
    assert path in done.stderr, done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_every_problem_is_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as caught:
        parse({"daemon": {"listen": "x", "log_level": "loud"}, "executor": {"kind": "k8s"}})
    paths = {path for path, _ in caught.value.problems}
    assert {"daemon.log_level", "executor.kind"} <= paths


def test_the_example_config_is_valid():
    config = load(ROOT / "config.example.toml")
    assert "echo" in config.triggers


def test_environment_overrides_the_toml(tmp_path, monkeypatch):
    (tmp_path / "c.toml").write_text(GOOD + "\n[executor]\nmax_in_flight = 4\n")
    monkeypatch.setenv("EVENTSWARM_EXECUTOR__MAX_IN_FLIGHT", "32")
    monkeypatch.setenv("EVENTSWARM_DAEMON__SHUTDOWN_GRACE", "5s")
    config = load(tmp_path / "c.toml")
    assert config.executor.max_in_flight == 32
    assert config.daemon.shutdown_grace == 5.0
    assert config.triggers["t"].source.path == "/hooks/t"


def test_a_bad_environment_override_names_its_key(tmp_path, monkeypatch):
    (tmp_path / "c.toml").write_text(GOOD)
    monkeypatch.setenv("EVENTSWARM_EXECUTOR__MAX_IN_FLIGHT", "many")
    with pytest.raises(ConfigError, match=r"executor\.max_in_flight"):
        load(tmp_path / "c.toml")


def test_schema_includes_the_connectors_source_models():
    text = str(schema())
    assert "WebhookSourceConfig" in text and "max_in_flight" in text


def test_a_missing_config_file_says_how_to_give_one(tmp_path):
    done = subprocess.run([sys.executable, "-m", "dispatcher", "validate", "-c", str(tmp_path / "nope.toml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "config file not found" in done.stderr


def test_durations_and_sizes_reach_the_models():
    config = parse({"functions": {"f": {"image": "i", "memory": "256MiB", "timeout": "1m"}},
                    "triggers": {"t": {"function": "f", "source": {"kind": "webhook", "path": "/t"},
                                       "batch": {"max_bytes": "512KiB", "max_wait": "50ms"}}}})
    assert config.functions["f"].memory == 256 * 1024 * 1024 and config.functions["f"].timeout == 60
    batch = config.triggers["t"].batch
    assert (batch.max_bytes, batch.max_wait) == (512 * 1024, 0.05)



@pytest.mark.parametrize(("given", "expected"), [
    ("true", {"mode": "runner", "min_idle": 1, "max": 8, "idle_ttl": 600.0, "max_batches": 1000}),
    ('"persistent"', {"mode": "persistent", "max": 8}),
    ('{ min_idle = 0, max = 2, idle_ttl = "30s" }', {"mode": "runner", "min_idle": 0, "max": 2, "idle_ttl": 30.0}),
])
def test_warm_takes_true_persistent_or_a_table(given, expected):
    config = parse(tomllib.loads(GOOD.replace('test"', f'test"\nwarm = {given}', 1)))
    warm = config.functions["f"].warm
    assert warm is not None and {key: getattr(warm, key) for key in expected} == expected


def test_warm_false_or_absent_is_a_container_per_batch():
    assert parse(tomllib.loads(GOOD)).functions["f"].warm is None
    assert parse(tomllib.loads(GOOD.replace('test"', 'test"\nwarm = false', 1))).functions["f"].warm is None


def test_a_duration_or_size_as_a_number_means_seconds_or_bytes_in_the_code_and_the_schema(tmp_path):
    doc = {"functions": {"f": {"command": ["true"], "timeout": 20, "memory": 1048576}},
           "executor": {"kind": "process"}}
    parsed = parse(doc)
    assert parsed.functions["f"].timeout == 20.0 and parsed.functions["f"].memory == 1048576
    function = schema()["$defs"]["FunctionConfig"]["properties"]
    assert {"type": "number", "minimum": 0} in function["timeout"]["anyOf"]
    sizes = json.dumps(function["memory"], sort_keys=True)  # (memory may be left out: null)
    assert '{"minimum": 0, "type": "integer"}' in sizes and "a number of bytes" in sizes, sizes
    grace = schema()["$defs"]["DaemonConfig"]["properties"]["shutdown_grace"]
    assert {"type": "number", "minimum": 0} in grace["anyOf"]


def test_paths_are_taken_from_the_config_files_folder(tmp_path, monkeypatch):
    folder = tmp_path / "srv" / "app"
    folder.mkdir(parents=True)
    (folder / "eventswarm.toml").write_text(
        '[daemon]\nstate = "sqlite:///state/x.db"\napi_token_file = "token"\n'
        '[executor]\nkind = "process"\nscratch_dir = "scratch"\n'
        '[functions.f]\ncommand = ["sh", "fn/handle.sh"]\n'
        '[triggers.t]\nfunction = "f"\nsource = { kind = "file", path = "drop" }\n')
    (folder / "token").write_text("t0ken\n")
    monkeypatch.chdir(tmp_path)
    config = load("srv/app/eventswarm.toml")
    assert config.daemon.state == f"sqlite:///{folder / 'state' / 'x.db'}"
    assert config.daemon.api_token_file == str(folder / "token")
    assert config.executor.scratch_dir == str(folder / "scratch")
    assert config.functions["f"].workdir == str(folder)
    assert config.triggers["t"].source.path == str(folder / "drop")
    absolute = parse({"daemon": {"state": "sqlite:////var/lib/eventswarm/state.db"}}, str(folder / "x"))
    assert absolute.daemon.state_path == "/var/lib/eventswarm/state.db"


def test_mount_sources_and_secret_files_written_as_paths_are_taken_from_the_config_files_folder(tmp_path):
    folder = tmp_path / "app"
    doc = {"executor": {"kind": "docker"},
           "functions": {"f": {"image": "x", "mounts": ["./data:/data:rw", "../shared:/shared", "cache:/cache",
                                                         "/srv:/srv"],
                               "secrets": ["./token", "keys/api.key", "swarm-secret-name"]}}}
    function = parse(doc, str(folder / "eventswarm.toml")).functions["f"]
    assert [(m.source, m.target, m.read_only) for m in function.volumes] == [
        (str(folder / "data"), "/data", False), (str(tmp_path / "shared"), "/shared", True), ("cache", "/cache", True),
        ("/srv", "/srv", True)]
    assert function.secrets == [str(folder / "token"), str(folder / "keys" / "api.key"), "swarm-secret-name"]
