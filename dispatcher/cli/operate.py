"""The commands that run, check and steer the daemon: ``run``, ``validate``, ``schema``, ``invoke``, ``init``,
``status``, ``reload`` and ``gc``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import anyio
import click

from dispatcher import config as configuration
from dispatcher.cli.common import (
    EXIT_USAGE,
    call_api,
    config_option,
    daemon_url,
    fail,
    load_config,
    output_option,
    post_api,
    repeat,
    run_async,
)
from dispatcher.errors import EventswarmError, first_leaf
from dispatcher.lock import StoreLocked, store_lock
from dispatcher.progress import duration_text
from dispatcher.store import Database


@click.command()
@config_option
def run(config_path: str | None) -> None:
    """Run the daemon until SIGTERM or SIGINT."""
    from dispatcher import logs
    from dispatcher.daemon import Daemon, tune_gc

    config = load_config(config_path)
    logs.configure(config.daemon.log_level, config.daemon.log_format)
    tune_gc()
    try:
        daemon = Daemon(config, configuration.default_path() if config_path is None else config_path)
        anyio.run(daemon.run)
        if daemon.failure:
            sys.exit(1)  # (said in the log: taken over by another replica)
    except* StoreLocked as group:
        fail(str(first_leaf(group)), EXIT_USAGE)
    except* OSError as group:
        fail(f"cannot start: {first_leaf(group)}")
    except* EventswarmError as group:
        fail(str(first_leaf(group)))


@click.command()
@config_option
def validate(config_path: str | None) -> None:
    """Check the config; print every error with its TOML path (exit 0 or 2)."""
    config = load_config(config_path)
    found = configuration.warnings(config)
    if config.executor.kind != "process":
        found += _image_warnings(config)
    for path, message in found:
        click.echo(f"warning: {path}: {message}", err=True)
    click.echo(f"ok: {len(config.triggers)} triggers, {len(config.functions)} functions")


def _image_warnings(config: configuration.ConfigBase) -> list[tuple[str, str]]:
    """Functions whose image the engine does not have (or one warning when the engine cannot be asked)."""
    from dispatcher.executors.engine import missing_images

    images = {name: function.image for name, function in config.functions.items() if function.image}
    if not images:
        return []
    try:
        missing = set(missing_images(config.executor, sorted(set(images.values()))))
    except EventswarmError as exc:
        return [("executor", f"{exc}: the functions' images were not checked")]
    return [(f"functions.{name}.image", f"{image} is not on the engine: build or pull it before `run` "
             "(on Swarm, every node that may run it needs it)")
            for name, image in images.items() if image in missing]


@click.command()
def schema() -> None:
    """Print the config's JSON Schema (for editors)."""
    click.echo(json.dumps(configuration.schema(), indent=2))


@click.command()
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

    config = load_config(config_path)
    if trigger not in config.triggers:
        fail(f"no trigger {trigger!r} (triggers: {', '.join(sorted(config.triggers)) or 'none'})", EXIT_USAGE)
    payload: Any = None
    text: str | None = None
    if data is not None:
        try:
            text = Path(data[1:]).read_text() if data.startswith("@") else data
        except OSError as exc:
            fail(f"--data {data}: {exc.strerror}", EXIT_USAGE)
    elif not sys.stdin.isatty():
        text = sys.stdin.read()  # as faas-cli does: `echo '{"n": 1}' | eventswarm invoke t`
    if text is not None and text.strip():
        try:
            payload = json.loads(text)
        except ValueError as exc:
            fail(f"the data is not JSON: {exc}", EXIT_USAGE)
    event = Event(source="eventswarm:invoke", type="eventswarm.invoke", data=payload)
    if filter_only:
        predicate = compile_filter(config.triggers[trigger].filter)
        if predicate is None or predicate(event):
            click.echo("match" if predicate else "match (the trigger has no filter)")
            return
        click.echo("no match")
        sys.exit(1)

    outcome = run_async(lambda: Daemon(config, exclusive=False).invoke_once(trigger, event))
    sys.stdout.buffer.write(outcome.stdout)
    sys.stdout.flush()
    if outcome.status != "succeeded":
        fail(f"invocation {outcome.invocation_id} failed (exit code {outcome.exit_code}); "
              f"see `eventswarm logs {outcome.invocation_id}`")


@click.group()
def schedule() -> None:
    """Schedule triggers (``source = { kind = "schedule", … }``)."""


@schedule.command("next")
@config_option
@click.argument("trigger")
@click.option("-n", "count", default=5, show_default=True, type=click.IntRange(1, 1000), help="How many ticks.")
def schedule_next(config_path: str | None, trigger: str, count: int) -> None:
    """Print TRIGGER's next ticks on its zone's wall clock (and in UTC): check an expression before deploying."""
    import time
    from datetime import UTC

    config = load_config(config_path)
    if trigger not in config.triggers:
        fail(f"no trigger {trigger!r} (triggers: {', '.join(sorted(config.triggers)) or 'none'})", EXIT_USAGE)
    source = config.triggers[trigger].source
    ticks = source.upcoming(count, time.time())
    if ticks is None:
        fail(f"trigger {trigger!r} is not a schedule: its source is {source.kind!r}", EXIT_USAGE)
    now = time.time()
    for tick in ticks or []:
        wait = tick.timestamp() - now
        ahead = f"in {wait / 86400:.1f} d" if wait >= 86400 else f"in {wait / 3600:.1f} h" if wait >= 3600 else \
            f"in {wait / 60:.1f} min" if wait >= 60 else f"in {wait:.0f} s"
        click.echo(f"{tick.isoformat()}  {tick.tzname() or ''}  ({tick.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}, {ahead})")


@click.command()
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
        fail(str(exc), EXIT_USAGE)
    except OSError as exc:
        fail(f"cannot write the starter files: {exc}")
    for path in written:
        click.echo(f"wrote {path}")
    config = written[0]
    if kind == "docker":
        click.echo(f"next: docker build -t hello-fn:latest {written[1].parent}")
    click.echo(f"then: eventswarm run -c {config}   and   curl -d '{{\"n\": 1}}' http://127.0.0.1:8080/hooks/hello")


@click.command()
@config_option
@click.option("--url", default=None, help="The daemon's address (default: from daemon.listen; no scheme: http).")
@click.option("--watch", is_flag=True, help="Show it again every 2 s (a backfill with a progress bar), until interrupted.")
@output_option
def status(config_path: str | None, url: str | None, watch: bool, output: str, as_json: bool) -> None:
    """Triggers, buffer depth, in-flight, lag and last error, from a running daemon."""
    address = f"{daemon_url(config_path, url)}/v1/status"

    def show() -> None:
        report = call_api(address, config_path=config_path)
        if as_json or output == "json":
            click.echo(json.dumps(report, indent=2))
        else:
            _show_status(report, bars=watch)

    repeat(show, watch)


def _until(iso: str) -> float:
    """Seconds from now to the RFC 3339 time ``iso`` (0 when it is past)."""
    import time
    from datetime import datetime

    return max(0.0, datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() - time.time())


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
        schedule = t.get("schedule")
        if schedule:
            click.echo(f"{t['trigger']}: next tick {schedule['next_tick'] or 'none'}"
                       f"{' (in ' + duration_text(_until(schedule['next_tick'])) + ')' if schedule['next_tick'] else ''}"
                       f", last tick {schedule['last_tick'] or 'none since the start'}")
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


@click.command()
@config_option
@click.option("--url", default=None, help="The daemon's address (default: from daemon.listen).")
def reload(config_path: str | None, url: str | None) -> None:
    """Make the running daemon read its config again (as SIGHUP does); an invalid config changes nothing."""
    status, report = post_api(f"{daemon_url(config_path, url)}/v1/reload", {}, config_path=config_path)
    if status == 422:
        for line in report.get("problems", []):
            click.echo(line, err=True)
        fail("reload refused: the daemon keeps running on its config as it was", EXIT_USAGE)
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


@click.command()
@config_option
@click.option("--all", "everything", is_flag=True, help="Also what other daemons (other state stores) left behind.")
def gc(config_path: str | None, everything: bool) -> None:
    """Remove containers left behind by a crashed daemon (by label); on PostgreSQL, by this replica and by replicas
    that are gone (never what a live replica owns)."""
    from dispatcher.daemon import owner_id
    from dispatcher.executors import create
    from dispatcher.replicas import default_id

    config = load_config(config_path, daemon_only=True)
    replica = config.daemon.replica or default_id(config.daemon.host_port[1])
    lock = store_lock(config.daemon.state_path, config.daemon.state_password, replica)
    if config.daemon.postgres or Path(config.daemon.state_path).parent.is_dir():  # (else no daemon has run here)
        try:  # what a running daemon owns is not left behind: refuse while one runs
            lock.acquire("eventswarm gc")
        except StoreLocked as exc:
            fail(f"{exc}; gc removes what a stopped daemon left behind", EXIT_USAGE)

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
        removed = run_async(sweep)
    finally:
        lock.release()
    click.echo(f"removed {removed} containers, services, configs or processes")
