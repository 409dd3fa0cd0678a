"""What the commands share: reading the config and the state store, calling the daemon's API, one line and an exit
status for what fails."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import anyio
import click

from dispatcher import config as configuration
from dispatcher.errors import ConfigError, EventswarmError
from dispatcher.store import Database

T = TypeVar("T")

EXIT_RUNTIME = 1
EXIT_USAGE = 2
TOKEN_ENV = "EVENTSWARM_API_TOKEN"
"""Where the CLI finds the API token first (then in the config)."""
REQUEST_TIMEOUT = 120
"""Seconds the CLI waits for the daemon (a reload waits for the changed triggers to finish what they hold)."""
WATCH_EVERY = 2.0
"""Seconds between two lists of `invocations --watch`."""
REPLAY_POLL = 0.5
"""Seconds between two looks at the replayed dead letters."""

config_option = click.option(
    "-c", "--config", "config_path", type=click.Path(dir_okay=False), default=None,
    help="Config file (default: $EVENTSWARM_CONFIG, then ./eventswarm.toml).",
)


def fail(message: str, code: int = EXIT_RUNTIME) -> NoReturn:
    click.echo(f"eventswarm: {message}", err=True)
    sys.exit(code)


def load_config(config_path: str | None, *, daemon_only: bool = False) -> configuration.ConfigBase:
    """The config, or its problems on stderr and exit 2. ``daemon_only``: what the commands that read the state or
    call the daemon need (``[daemon]`` and ``[executor]``); a source's secret need not be there."""
    try:
        return configuration.load(config_path, daemon_only=daemon_only)
    except ConfigError as exc:
        for line in exc.lines():
            click.echo(line, err=True)
        sys.exit(EXIT_USAGE)


def open_store(config_path: str | None) -> Database:
    config = load_config(config_path, daemon_only=True)
    path = config.daemon.state_path
    if not config.daemon.postgres and not Path(path).exists():
        fail(f"no state store at {path} (has the daemon run with this config?)")
    return Database(path, password=config.daemon.state_password)


def daemon_url(config_path: str | None, url: str | None) -> str:
    if url:
        return (url if "://" in url else f"http://{url}").rstrip("/")  # (as curl takes it: no scheme is http)
    host, port = load_config(config_path, daemon_only=True).daemon.host_port
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"


def api_token(config_path: str | None) -> str | None:
    """The API token: ``$EVENTSWARM_API_TOKEN``, else the config's (``daemon.api_token_env``/``_file``); with
    ``--url`` and no config, none."""
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    try:
        token = configuration.load(config_path, daemon_only=True).daemon.api_token
    except ConfigError:
        return None  # (the config is read only for the token: status --url works without one)
    return token.value() if token.given else None


def call_api(url: str, data: Any = None, *, config_path: str | None = None) -> Any:
    """``url`` of the daemon's API, with the API token of the config (if it has one); an error answer fails."""
    return post_api(url, data, config_path=config_path)[1]


def post_api(url: str, data: Any = None, *, config_path: str | None = None, accept: tuple[int, ...] = (422,)) -> \
        tuple[int, Any]:
    """The status and JSON answer of ``url`` (a POST of ``data``, else a GET); a status in ``accept`` is returned,
    any other error answer fails."""
    body = json.dumps(data).encode() if data is not None else None
    headers = {"Content-Type": "application/json"} if body else {}
    token = api_token(config_path)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        if exc.code in accept and data is not None:
            return exc.code, json.loads(detail)
        fail(f"{url}: HTTP {exc.code}: {detail}")
    except (urllib.error.URLError, OSError) as exc:
        fail(f"cannot reach the daemon at {url}: {exc} (is `eventswarm run` running?)")


def follow_logs(url: str, config_path: str | None) -> None:
    """Write an invocation's output as the daemon streams it: stdout to stdout, stderr to stderr."""
    token = api_token(config_path)
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
            for line in response:
                doc = json.loads(line)
                for name, stream in (("stdout", sys.stdout), ("stderr", sys.stderr)):
                    if name in doc:
                        stream.write(doc[name])
                        stream.flush()
    except urllib.error.HTTPError as exc:
        fail(f"{url}: HTTP {exc.code}: {exc.read().decode(errors='replace')}")
    except (urllib.error.URLError, OSError) as exc:
        fail(f"cannot follow the invocation at {url}: {exc} (is `eventswarm run` running?)")
    except KeyboardInterrupt:
        pass


def run_async(work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work`` on an event loop; an error becomes one line and exit 1."""
    try:
        return anyio.run(work)
    except EventswarmError as exc:
        fail(str(exc))


def output_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``-o table|wide|json`` (``--json`` is kept as an alias of ``-o json``)."""
    fn = click.option("--json", "as_json", is_flag=True, help="The same as -o json.")(fn)
    return click.option("-o", "--output", type=click.Choice(["table", "wide", "json"]), default="table",
                        show_default=True, help="table, wide (every column) or json (an array of objects).")(fn)


def resolve_id(store: Database, table: str, prefix: str, what: str) -> str:
    """The whole id that ``prefix`` names (a unique prefix is enough, as docker takes them); else exit 1."""
    found = store.resolve(table, prefix)
    if not found:
        fail(f"no {what} {prefix}")
    if len(found) > 1:
        fail(f"{prefix} is the start of several {what} ids ({', '.join(found)}, …): give more of it")
    return found[0]


def repeat(show: Callable[[], None], watch: bool) -> None:
    """``show()`` once, or (``--watch``) every ``WATCH_EVERY`` seconds until interrupted, each time after a line
    with the time."""
    while True:
        show()
        if not watch:
            return
        try:
            time.sleep(WATCH_EVERY)
        except KeyboardInterrupt:
            return
        click.echo(f"\n-- {time.strftime('%H:%M:%S')}")
