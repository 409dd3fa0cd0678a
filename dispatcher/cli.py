"""The ``eventswarm`` command."""

from __future__ import annotations

import json
import os
import sqlite3
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
from dispatcher.errors import ConfigError, EventswarmError, StoreError, first_leaf
from dispatcher.lock import StoreLocked, store_lock
from dispatcher.progress import duration_text
from dispatcher.store import Database
from dispatcher.units import parse_duration

T = TypeVar("T")

EXIT_RUNTIME = 1
TOKEN_ENV = "EVENTSWARM_API_TOKEN"
REQUEST_TIMEOUT = 120
WATCH_EVERY = 2.0
REPLAY_POLL = 0.5
"""Seconds between two looks at the replayed dead letters."""
"""Seconds between two lists of `invocations --watch`."""
"""Seconds the CLI waits for the daemon (a reload waits for the changed triggers to finish what they hold)."""
"""Where the CLI finds the API token first (then in the config)."""
EXIT_USAGE = 2

config_option = click.option(
    "-c", "--config", "config_path", type=click.Path(dir_okay=False), default=None,
    help="Config file (default: $EVENTSWARM_CONFIG, then ./eventswarm.toml).",
)


def _fail(message: str, code: int = EXIT_RUNTIME) -> NoReturn:
    click.echo(f"eventswarm: {message}", err=True)
    sys.exit(code)


def _load(config_path: str | None) -> configuration.ConfigBase:
    try:
        return configuration.load(config_path)
    except ConfigError as exc:
        for line in exc.lines():
            click.echo(line, err=True)
        sys.exit(EXIT_USAGE)


def _store(config_path: str | None) -> Database:
    config = _load(config_path)
    path = config.daemon.state_path
    if not config.daemon.postgres and not Path(path).exists():
        _fail(f"no state store at {path} (has the daemon run with this config?)")
    return Database(path, password=config.daemon.state_password)


def _daemon_url(config_path: str | None, url: str | None) -> str:
    if url:
        return url.rstrip("/")
    host, port = _load(config_path).daemon.host_port
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"


def _token(config_path: str | None) -> str | None:
    """The API token: ``$EVENTSWARM_API_TOKEN``, else the config's (``daemon.api_token_env``/``_file``); with
    ``--url`` and no config, none."""
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    try:
        token = configuration.load(config_path).daemon.api_token
    except ConfigError:
        return None  # (the config is read only for the token: status --url works without one)
    return token.value() if token.given else None


def _request(url: str, data: Any = None, *, config_path: str | None = None) -> Any:
    """``url`` of the daemon's API, with the API token of the config (if it has one); an error answer fails."""
    return _post(url, data, config_path=config_path)[1]


def _post(url: str, data: Any = None, *, config_path: str | None = None, accept: tuple[int, ...] = (422,)) -> \
        tuple[int, Any]:
    """The status and JSON answer of ``url`` (a POST of ``data``, else a GET); a status in ``accept`` is returned,
    any other error answer fails."""
    body = json.dumps(data).encode() if data is not None else None
    headers = {"Content-Type": "application/json"} if body else {}
    token = _token(config_path)
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
        _fail(f"{url}: HTTP {exc.code}: {detail}")
    except (urllib.error.URLError, OSError) as exc:
        _fail(f"cannot reach the daemon at {url}: {exc} (is `eventswarm run` running?)")


def _follow(url: str, config_path: str | None) -> None:
    """Write an invocation's output as the daemon streams it: stdout to stdout, stderr to stderr."""
    token = _token(config_path)
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
        _fail(f"{url}: HTTP {exc.code}: {exc.read().decode(errors='replace')}")
    except (urllib.error.URLError, OSError) as exc:
        _fail(f"cannot follow the invocation at {url}: {exc} (is `eventswarm run` running?)")
    except KeyboardInterrupt:
        pass


def _run(work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work`` on an event loop; an error becomes one line and exit 1."""
    try:
        return anyio.run(work)
    except EventswarmError as exc:
        _fail(str(exc))


class _Commands(click.Group):
    """Every command: a failing state store is one line and exit 1, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except StoreError as exc:
            _fail(str(exc))
        except (sqlite3.Error, OSError) as exc:
            _fail(f"the state store failed: {exc}")
        except Exception as exc:
            if type(exc).__module__.startswith("asyncpg"):  # (PostgreSQL's errors, imported only when used)
                _fail(f"the state store failed: {exc}")
            raise


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="eventswarm")
def main() -> None:
    """Connect event streams to container functions on Docker Swarm."""


@main.command()
@config_option
def run(config_path: str | None) -> None:
    """Run the daemon until SIGTERM or SIGINT."""
    from dispatcher import logs
    from dispatcher.daemon import Daemon, tune_gc

    config = _load(config_path)
    logs.configure(config.daemon.log_level, config.daemon.log_format)
    tune_gc()
    try:
        daemon = Daemon(config, configuration.default_path() if config_path is None else config_path)
        anyio.run(daemon.run)
        if daemon.failure:
            sys.exit(1)  # (said in the log: taken over by another replica)
    except* StoreLocked as group:
        _fail(str(first_leaf(group)), EXIT_USAGE)
    except* OSError as group:
        _fail(f"cannot start: {first_leaf(group)}")
    except* EventswarmError as group:
        _fail(str(first_leaf(group)))


@main.command()
@config_option
def validate(config_path: str | None) -> None:
    """Check the config; print every error with its TOML path (exit 0 or 2)."""
    config = _load(config_path)
    for path, message in configuration.warnings(config):
        click.echo(f"warning: {path}: {message}", err=True)
    click.echo(f"ok: {len(config.triggers)} triggers, {len(config.functions)} functions")


@main.command()
def schema() -> None:
    """Print the config's JSON Schema (for editors)."""
    click.echo(json.dumps(configuration.schema(), indent=2))


@main.command()
@config_option
@click.argument("trigger")
@click.option("--data", "data", default=None,
              help="The event's data: JSON, or @FILE to read it from a file. Without it: stdin, when it is not a terminal.")
@click.option("--filter", "filter_only", is_flag=True,
              help="Only test the trigger's filter on this event: print `match` (exit 0) or `no match` (exit 1); "
                   "nothing runs.")
@click.option("--wait", is_flag=True, help="Wait for the function to finish (always the case: kept for scripts).")
def invoke(config_path: str | None, trigger: str, data: str | None, filter_only: bool, wait: bool) -> None:
    """Run one invocation through TRIGGER's function and executor; print its stdout."""
    from dispatcher.daemon import Daemon
    from dispatcher.events import Event
    from dispatcher.filters import compile_filter

    config = _load(config_path)
    if trigger not in config.triggers:
        _fail(f"no trigger {trigger!r} (triggers: {', '.join(sorted(config.triggers)) or 'none'})", EXIT_USAGE)
    payload: Any = None
    text: str | None = None
    if data is not None:
        try:
            text = Path(data[1:]).read_text() if data.startswith("@") else data
        except OSError as exc:
            _fail(f"--data {data}: {exc.strerror}", EXIT_USAGE)
    elif not sys.stdin.isatty():
        text = sys.stdin.read()  # as faas-cli does: `echo '{"n": 1}' | eventswarm invoke t`
    if text is not None and text.strip():
        try:
            payload = json.loads(text)
        except ValueError as exc:
            _fail(f"the data is not JSON: {exc}", EXIT_USAGE)
    event = Event(source="eventswarm:invoke", type="eventswarm.invoke", data=payload)
    if filter_only:
        predicate = compile_filter(config.triggers[trigger].filter)
        if predicate is None or predicate(event):
            click.echo("match" if predicate else "match (the trigger has no filter)")
            return
        click.echo("no match")
        sys.exit(1)

    outcome = _run(lambda: Daemon(config, exclusive=False).invoke_once(trigger, event))
    sys.stdout.buffer.write(outcome.stdout)
    sys.stdout.flush()
    if outcome.status != "succeeded":
        _fail(f"invocation {outcome.invocation_id} failed (exit code {outcome.exit_code}); "
              f"see `eventswarm logs {outcome.invocation_id}`")


@main.command()
@click.option("--dir", "folder", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Where to write eventswarm.toml and functions/.")
@click.option("--executor", type=click.Choice(["auto", "process", "docker"]), default="auto", show_default=True,
              help="auto: docker when a Docker engine answers here, else process.")
@click.option("--force", is_flag=True, help="Replace files that exist.")
def init(folder: str, executor: str, force: bool) -> None:
    """Write a commented starter eventswarm.toml and a function skeleton (a webhook trigger to try at once)."""
    from dispatcher import starter

    kind = executor if executor != "auto" else ("docker" if starter.docker_answers() else "process")
    try:
        written = starter.write(Path(folder), kind, force)
    except FileExistsError as exc:
        _fail(str(exc), EXIT_USAGE)
    except OSError as exc:
        _fail(f"cannot write the starter files: {exc}")
    for path in written:
        click.echo(f"wrote {path}")
    config = written[0]
    if kind == "docker":
        click.echo(f"next: docker build -t hello-fn:latest {written[1].parent}")
    click.echo(f"then: eventswarm run -c {config}   and   curl -d '{{\"n\": 1}}' http://127.0.0.1:8080/hooks/hello")


def output_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``-o table|wide|json`` (``--json`` is kept as an alias of ``-o json``)."""
    fn = click.option("--json", "as_json", is_flag=True, help="The same as -o json.")(fn)
    return click.option("-o", "--output", type=click.Choice(["table", "wide", "json"]), default="table",
                        show_default=True, help="table, wide (every column) or json (an array of objects).")(fn)


def _resolve(store: Database, table: str, prefix: str, what: str) -> str:
    """The whole id that ``prefix`` names (a unique prefix is enough, as docker takes them); else exit 1."""
    found = store.resolve(table, prefix)
    if not found:
        _fail(f"no {what} {prefix}")
    if len(found) > 1:
        _fail(f"{prefix} is the start of several {what} ids ({', '.join(found)}, …): give more of it")
    return found[0]


def _age(ts: float | None, now: float) -> str:
    return "" if ts is None else duration_text(now - ts, coarse=True)


def _duration(record: Any, now: float) -> str:
    if record.started_at is None:
        return ""
    end = record.finished_at if record.finished_at is not None else now
    return duration_text(end - record.started_at, coarse=True) + ("" if record.finished_at is not None else "…")


def _invocation_rows(records: list[Any], wide: bool) -> list[str]:
    now = time.time()
    header = f"{'ID':32}  {'TRIGGER':16} {'STATUS':10} {'ATTEMPT':>7} {'EVENTS':>6} {'EXIT':>4} {'AGE':>6} {'DURATION':>9}"
    if wide:
        header += f"  {'FUNCTION':16} {'QUEUED':24} EXECUTOR REF"
    lines = [header]
    for r in records:
        exit_code = "" if r.exit_code is None else str(r.exit_code)
        line = (f"{r.id:32}  {r.trigger:16} {r.status:10} {r.attempt:>7} {r.batch_size:>6} {exit_code:>4} "
                f"{_age(r.queued_at, now):>6} {_duration(r, now):>9}")
        if wide:
            line += f"  {r.function:16} {r.to_json()['queued_at']:24} {r.executor_ref or ''}"
        lines.append(line)
    return lines


@main.group(invoke_without_command=True)
@config_option
@click.option("--trigger", default=None, help="Only this trigger's.")
@click.option("--status", type=click.Choice(["queued", "running", "succeeded", "failed", "timed_out"]), default=None)
@click.option("--since", default=None, help="Only those queued within this long, e.g. 10m, 2h.")
@click.option("--limit", type=click.IntRange(1, 100000), default=20, show_default=True)
@click.option("--watch", is_flag=True, help="Print the list again every 2 s, until interrupted.")
@output_option
@click.pass_context
def invocations(ctx: click.Context, config_path: str | None, trigger: str | None, status: str | None,
                since: str | None, limit: int, watch: bool, output: str, as_json: bool) -> None:
    """Invocation records, newest first (AGE since queued, DURATION of the run); `invocations show ID` for one."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        window = parse_duration(since) if since else None
    except ValueError as exc:
        _fail(f"--since: {exc}", EXIT_USAGE)
    store = _store(config_path)
    def show() -> None:
        records = store.invocations(trigger=trigger, status=status, limit=limit,
                                    since=time.time() - window if window is not None else None)
        if as_json or output == "json":
            click.echo(json.dumps([r.to_json() for r in records], indent=2))
        else:
            click.echo("\n".join(_invocation_rows(records, output == "wide")))

    _repeat(show, watch)


def _repeat(show: Callable[[], None], watch: bool) -> None:
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


@invocations.command("show")
@config_option
@click.argument("invocation_id")
@output_option
def invocations_show(config_path: str | None, invocation_id: str, output: str, as_json: bool) -> None:
    """One invocation, every field (a unique prefix of its id is enough)."""
    store = _store(config_path)
    record = store.invocation(_resolve(store, "invocations", invocation_id, "invocation"))
    assert record is not None
    doc = record.to_json()
    stdout, stderr = store.logs(record.id) or (b"", b"")
    doc["stdout_bytes"], doc["stderr_bytes"] = len(stdout), len(stderr)
    if as_json or output == "json":
        click.echo(json.dumps(doc, indent=2))
        return
    width = max(len(k) for k in doc)
    for key, value in doc.items():
        shown = ", ".join(value) if isinstance(value, list) else ("" if value is None else value)
        click.echo(f"{key + ':':{width + 1}} {shown}")


@main.command()
@config_option
@click.argument("invocation_id", required=False)
@click.option("--last", "last_of", default=None, metavar="TRIGGER", help="The newest invocation of TRIGGER.")
@click.option("-f", "--follow", is_flag=True,
              help="Stream its output as it comes, from the running daemon, until it ends (live for the process "
                   "and docker executors; at the end for swarm).")
@click.option("--url", default=None, help="With --follow: the daemon's address (default: from daemon.listen).")
def logs(config_path: str | None, invocation_id: str | None, last_of: str | None, follow: bool,
         url: str | None) -> None:
    """Captured stdout, then stderr, of one invocation (a unique prefix of its id is enough)."""
    store = _store(config_path)
    if last_of:
        newest = store.invocations(trigger=last_of, limit=1)
        if not newest:
            _fail(f"trigger {last_of!r} has no invocations")
        invocation_id = newest[0].id
    elif not invocation_id:
        _fail("name an invocation, or --last TRIGGER", EXIT_USAGE)
    else:
        invocation_id = _resolve(store, "invocations", invocation_id, "invocation")
    if follow:
        _follow(f"{_daemon_url(config_path, url)}/v1/invocations/{invocation_id}/logs?follow=1", config_path)
        return
    found = store.logs(invocation_id)
    assert found is not None
    stdout, stderr = found
    sys.stdout.buffer.write(stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(stderr)
    sys.stderr.flush()


@main.group()
def dlq() -> None:
    """Dead letters: inspect, send back through their trigger, delete."""


@dlq.command("list")
@config_option
@click.option("--trigger", default=None)
@output_option
def dlq_list(config_path: str | None, trigger: str | None, output: str, as_json: bool) -> None:
    """List dead letters, oldest first (AGE since created)."""
    letters = _store(config_path).dead_letters(trigger=trigger)
    if as_json or output == "json":
        click.echo(json.dumps([d.to_json() for d in letters], indent=2))
        return
    now = time.time()
    wide = output == "wide"
    click.echo(f"{'ID':32}  {'TRIGGER':16} {'EVENT':32} {'ATTEMPTS':>8} {'AGE':>6}" + ("  CREATED" if wide else ""))
    for d in letters:
        click.echo(f"{d.id:32}  {d.trigger:16} {d.event.get('id', ''):32} {len(d.attempts):>8} "
                   f"{_age(d.created_at, now):>6}" + (f"  {d.to_json()['created_at']}" if wide else ""))


@dlq.command("show")
@config_option
@click.argument("dead_letter_id")
def dlq_show(config_path: str | None, dead_letter_id: str) -> None:
    """One dead letter as JSON: the event and every attempt."""
    store = _store(config_path)
    letter = store.dead_letter(_resolve(store, "dead_letters", dead_letter_id, "dead letter"))
    if letter is None:
        _fail(f"no dead letter {dead_letter_id}")
    click.echo(json.dumps(letter.to_json(), indent=2))


@dlq.command("replay")
@config_option
@click.argument("ids", nargs=-1)
@click.option("--trigger", default=None, help="Replay every dead letter of this trigger.")
@click.option("--url", default=None, help="The daemon's address (default: from daemon.listen).")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Follow the replay (a progress bar on a terminal) until every letter ran or failed again.")
@click.option("--timeout", default="10m", show_default=True, help="With --wait: give up waiting after this long.")
def dlq_replay(config_path: str | None, ids: tuple[str, ...], trigger: str | None, url: str | None, wait: bool,
               timeout: str) -> None:
    """Send dead letters back through their trigger in the running daemon."""
    if not ids and not trigger:
        _fail("name dead letter ids or --trigger", EXIT_USAGE)
    try:
        patience = parse_duration(timeout)
    except ValueError as exc:
        _fail(f"--timeout: {exc}", EXIT_USAGE)
    base = _daemon_url(config_path, url)
    store = _store(config_path)
    if ids:
        ids = tuple(_resolve(store, "dead_letters", i, "dead letter") for i in ids)
    letters = [d for d in store.dead_letters(trigger=trigger, limit=100_000) if not ids or d.id in ids]
    answer = _request(f"{base}/v1/dead-letters/replay", {"ids": list(ids), "trigger": trigger},
                      config_path=config_path)
    click.echo(f"replaying {answer['replayed']} dead letters")
    if wait and letters:
        _follow_replay(store, letters, patience)


def _follow_replay(store: Database, letters: list[Any], patience: float) -> None:
    """Wait until each replayed letter is gone (its event ran, or failed again as a new dead letter)."""
    from tqdm import tqdm

    pending = {d.id for d in letters}
    events = {d.event.get("id") for d in letters}
    deadline = time.monotonic() + patience
    with tqdm(total=len(pending), unit="letters", desc="replay", file=sys.stderr, disable=None) as bar:
        while pending and time.monotonic() < deadline:
            gone = {i for i in pending if store.dead_letter(i) is None}
            pending -= gone
            bar.update(len(gone))
            if pending:
                time.sleep(REPLAY_POLL)
    again = sum(1 for d in store.dead_letters(limit=100_000) if d.event.get("id") in events
                and d.id not in {x.id for x in letters})
    settled = len(letters) - len(pending)
    click.echo(f"replayed {settled} of {len(letters)}: {settled - again} ran, {again} failed again"
               + (f", {len(pending)} still waiting (see `eventswarm dlq list`)" if pending else ""))


@dlq.command("purge")
@config_option
@click.argument("ids", nargs=-1)
def dlq_purge(config_path: str | None, ids: tuple[str, ...]) -> None:
    """Delete the named dead letters, or all of them."""
    removed = _store(config_path).remove_dead_letters(list(ids) if ids else None)
    click.echo(f"removed {removed} dead letters")


@main.command()
@config_option
@click.option("--url", default=None, help="The daemon's address (default: from daemon.listen).")
@click.option("--json", "as_json", is_flag=True)
@click.option("--watch", is_flag=True, help="Show it again every 2 s (a backfill with a progress bar), until interrupted.")
def status(config_path: str | None, url: str | None, as_json: bool, watch: bool) -> None:
    """Triggers, buffer depth, in-flight, lag and last error, from a running daemon."""
    address = f"{_daemon_url(config_path, url)}/v1/status"

    def show() -> None:
        report = _request(address, config_path=config_path)
        if as_json:
            click.echo(json.dumps(report, indent=2))
        else:
            _show_status(report, bars=watch)

    _repeat(show, watch)


def _show_status(report: dict[str, Any], bars: bool) -> None:
    config = report.get("config") or {}
    click.echo(f"executor: {report['executor']}" + (f"  config: {config['hash'][:12]} (loaded {config['loaded_at']})"
                                                     if config.get("hash") else ""))
    click.echo(f"{'TRIGGER':16} {'SOURCE':9} {'STATE':9} {'BUFFERED':>8} {'IN-FLIGHT':>9} {'LAG':>16}  LAST ERROR")
    for t in report["triggers"]:
        lag = f"{t['lag']:,.0f} {t.get('lag_unit', '')}".strip()
        click.echo(f"{t['trigger']:16} {t['source']:9} {t['state']:9} {t['buffered']:>8} {t['in_flight']:>9} "
                   f"{lag:>16}  {t['last_error'] or ''}")
    for t in report["triggers"]:
        backfill = t.get("backfill")
        if backfill:
            eta = backfill["eta_seconds"]
            click.echo(f"{t['trigger']}: backfill {backfill['done']:,.0f} of {backfill['total']:,.0f} {backfill['unit']} "
                       f"({backfill['percent']:g}%), {backfill['rate']:,.0f} {backfill['unit']}/s, "
                       + ("time left unknown yet" if eta is None else f"about {duration_text(eta)} left"))
            if bars:
                from tqdm import tqdm

                click.echo("  " + tqdm.format_meter(backfill["done"], backfill["total"], backfill["elapsed_seconds"],
                                                    ncols=72, unit=backfill["unit"], rate=backfill["rate"] or None))
    pools = report.get("pools") or []
    if pools:
        click.echo(f"{'WARM POOL':16} {'MODE':10} {'SIZE':>4} {'MAX':>4} {'IDLE':>4} {'BUSY':>4} {'STARTS':>6}  REPLACED")
        for p in pools:
            replaced = ", ".join(f"{why} {n}" for why, n in sorted(p["replacements"].items())) or "none"
            click.echo(f"{p['function']:16} {p['mode']:10} {p['size']:>4} {p['max']:>4} {p['idle']:>4} {p['busy']:>4} "
                       f"{p['starts']:>6}  {replaced}")
    replicas = report.get("replicas") or []
    if len(replicas) > 1 or any(r["id"] != report.get("replica") for r in replicas):  # (one daemon alone: no table)
        click.echo(f"{'REPLICA':24} {'STATE':8} {'HEARTBEAT':>9} {'ADDRESS':22} HOLDS")
        for r in replicas:
            holds = ", ".join(f"{lease['name']} (token {lease['token']})" for lease in r["leases"]) or "-"
            name = f"{r['id']}{' *' if r['me'] else ''}"
            click.echo(f"{name:24} {r['state']:8} {duration_text(r['heartbeat_age'], coarse=True) + ' ago':>9} {r['address']:22} {holds}")


@main.command()
@config_option
@click.option("--url", default=None, help="The daemon's address (default: from daemon.listen).")
def reload(config_path: str | None, url: str | None) -> None:
    """Make the running daemon read its config again (as SIGHUP does); an invalid config changes nothing."""
    status, report = _post(f"{_daemon_url(config_path, url)}/v1/reload", {}, config_path=config_path)
    if status == 422:
        for line in report.get("problems", []):
            click.echo(line, err=True)
        _fail("reload refused: the daemon keeps running on its config as it was", EXIT_USAGE)
    click.echo(f"reloaded (config {report['config']['hash'][:12]}): added {', '.join(report['added']) or 'none'}; "
               f"changed {', '.join(report['changed']) or 'none'}; removed {', '.join(report['removed']) or 'none'}")


async def _gone_replicas(config: Any, replica: str) -> list[tuple[str, str, str]]:
    """The replicas on the config's PostgreSQL state that are gone (id, incarnation, owner)."""
    from dispatcher.replicas import Membership
    from dispatcher.state import StateStore

    store = Database(config.daemon.state_path, password=config.daemon.state_password)
    try:
        return await Membership(StateStore(store), replica, "", "", config.daemon.replica_timeout).dead()
    finally:
        store.close()


@main.command()
@config_option
@click.option("--all", "everything", is_flag=True, help="Also what other daemons (other state stores) left behind.")
def gc(config_path: str | None, everything: bool) -> None:
    """Remove containers left behind by a crashed daemon (by label); on PostgreSQL, by this replica and by replicas
    that are gone (never what a live replica owns)."""
    from dispatcher.daemon import owner_id
    from dispatcher.executors import create
    from dispatcher.replicas import default_id

    config = _load(config_path)
    replica = config.daemon.replica or default_id(config.daemon.host_port[1])
    lock = store_lock(config.daemon.state_path, config.daemon.state_password, replica)
    if config.daemon.postgres or Path(config.daemon.state_path).parent.is_dir():  # (else no daemon has run here)
        try:  # what a running daemon owns is not left behind: refuse while one runs
            lock.acquire("eventswarm gc")
        except StoreLocked as exc:
            _fail(f"{exc}; gc removes what a stopped daemon left behind", EXIT_USAGE)

    async def sweep() -> int:
        owners = [owner_id(config.daemon.state_path, replica)]
        if config.daemon.postgres and not everything:  # and what replicas that are gone left (none live is touched)
            owners += [owner for _, _, owner in await _gone_replicas(config, replica)]
        executor = create(config)
        await executor.start()
        try:
            if everything:
                return await executor.gc(None)
            return sum([await executor.gc(owner) for owner in owners])
        finally:
            await executor.close()

    try:
        removed = _run(sweep)
    finally:
        lock.release()
    click.echo(f"removed {removed} containers, services, configs or processes")


if __name__ == "__main__":
    main()

