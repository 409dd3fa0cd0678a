"""The commands that read what ran: ``invocations`` (and ``show``), ``logs`` and the dead letters (``dlq``)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from dispatcher.cli.common import (
    EXIT_RUNTIME,
    EXIT_USAGE,
    REPLAY_POLL,
    call_api,
    config_option,
    daemon_url,
    fail,
    follow_logs,
    open_store,
    output_option,
    repeat,
    resolve_id,
)
from dispatcher.progress import duration_text
from dispatcher.store import Database
from dispatcher.units import parse_duration


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
        header += f"  {'FUNCTION':16} {'QUEUED':24} {'NODE':20} EXECUTOR REF"
    lines = [header]
    for r in records:
        exit_code = "" if r.exit_code is None else str(r.exit_code)
        line = (f"{r.id:32}  {r.trigger:16} {r.status:10} {r.attempt:>7} {r.batch_size:>6} {exit_code:>4} "
                f"{_age(r.queued_at, now):>6} {_duration(r, now):>9}")
        if wide:
            line += f"  {r.function:16} {r.to_json()['queued_at']:24} {r.node or '-':20} {r.executor_ref or ''}"
        lines.append(line)
    return lines


@click.group(invoke_without_command=True)
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
        fail(f"--since: {exc}", EXIT_USAGE)
    store = open_store(config_path)
    def show() -> None:
        records = store.invocations(trigger=trigger, status=status, limit=limit,
                                    since=time.time() - window if window is not None else None)
        if as_json or output == "json":
            click.echo(json.dumps([r.to_json() for r in records], indent=2))
        else:
            click.echo("\n".join(_invocation_rows(records, output == "wide")))

    repeat(show, watch)


@invocations.command("show")
@config_option
@click.argument("invocation_id")
@output_option
def invocations_show(config_path: str | None, invocation_id: str, output: str, as_json: bool) -> None:
    """One invocation, every field (a unique prefix of its id is enough)."""
    store = open_store(config_path)
    record = store.invocation(resolve_id(store, "invocations", invocation_id, "invocation"))
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


@click.command()
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
    store = open_store(config_path)
    if last_of:
        newest = store.invocations(trigger=last_of, limit=1)
        if not newest:
            fail(f"trigger {last_of!r} has no invocations")
        invocation_id = newest[0].id
    elif not invocation_id:
        fail("name an invocation, or --last TRIGGER", EXIT_USAGE)
    else:
        invocation_id = resolve_id(store, "invocations", invocation_id, "invocation")
    if follow:
        follow_logs(f"{daemon_url(config_path, url)}/v1/invocations/{invocation_id}/logs?follow=1", config_path)
        return
    found = store.logs(invocation_id)
    assert found is not None
    stdout, stderr = found
    sys.stdout.buffer.write(stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(stderr)
    sys.stderr.flush()


@click.group()
def dlq() -> None:
    """Dead letters: inspect, send back through their trigger, delete."""


@dlq.command("list")
@config_option
@click.option("--trigger", default=None)
@output_option
def dlq_list(config_path: str | None, trigger: str | None, output: str, as_json: bool) -> None:
    """List dead letters, oldest first (AGE since created)."""
    letters = open_store(config_path).dead_letters(trigger=trigger)
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
@output_option
def dlq_show(config_path: str | None, dead_letter_id: str, output: str, as_json: bool) -> None:
    """One dead letter: its event and every attempt (``-o json``: the whole record)."""
    store = open_store(config_path)
    letter = store.dead_letter(resolve_id(store, "dead_letters", dead_letter_id, "dead letter"))
    if letter is None:
        fail(f"no dead letter {dead_letter_id}")
    doc = letter.to_json()
    if as_json or output == "json":
        click.echo(json.dumps(doc, indent=2))
        return
    event = doc["event"]
    click.echo(f"dead letter {doc['id']}  trigger {doc['trigger']}  created {doc['created_at']}")
    click.echo(f"event {event.get('id', '')}  type {event.get('type', '')}  source {event.get('source', '')}"
               + (f"  subject {event['subject']}" if event.get("subject") else ""))
    click.echo(f"{'ATTEMPT':>7}  {'INVOCATION':32}  {'EXIT':>4}  ERROR")
    for number, attempt in enumerate(doc["attempts"], start=1):
        exit_code = "" if attempt.get("exit_code") is None else str(attempt["exit_code"])
        last_line = (attempt.get("stderr_tail") or "").strip().splitlines()[-1:]
        why = "; ".join(part for part in (attempt.get("error"), f"stderr: {last_line[0]}" if last_line else "") if part)
        click.echo(f"{attempt.get('attempt', number):>7}  {attempt.get('invocation_id') or '':32}  {exit_code:>4}  {why}")
    if output == "wide":
        click.echo("data: " + json.dumps(event.get("data", event.get("data_base64")), ensure_ascii=False)[:2000])


@dlq.command("replay")
@config_option
@click.argument("ids", nargs=-1)
@click.option("--trigger", default=None, help="Replay every dead letter of this trigger.")
@click.option("--url", default=None, help="The daemon's address (default: from daemon.listen; no scheme: http).")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Follow the replay (a progress bar on a terminal) until every letter ran or failed again; "
                   "exit 1 when any failed again or is still waiting.")
@click.option("--timeout", default="10m", show_default=True, help="With --wait: give up waiting after this long.")
def dlq_replay(config_path: str | None, ids: tuple[str, ...], trigger: str | None, url: str | None, wait: bool,
               timeout: str) -> None:
    """Send dead letters back through their trigger in the running daemon. Exit status with --wait: 0 when every
    one ran, 1 when any failed again (a new dead letter) or was still waiting at --timeout."""
    if not ids and not trigger:
        fail("name dead letter ids or --trigger", EXIT_USAGE)
    try:
        patience = parse_duration(timeout)
    except ValueError as exc:
        fail(f"--timeout: {exc}", EXIT_USAGE)
    base = daemon_url(config_path, url)
    store = open_store(config_path)
    if ids:
        ids = tuple(resolve_id(store, "dead_letters", i, "dead letter") for i in ids)
    letters = [d for d in store.dead_letters(trigger=trigger, limit=100_000) if not ids or d.id in ids]
    answer = call_api(f"{base}/v1/dead-letters/replay", {"ids": list(ids), "trigger": trigger},
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
    if again or pending:
        sys.exit(EXIT_RUNTIME)


@dlq.command("purge")
@config_option
@click.argument("ids", nargs=-1)
def dlq_purge(config_path: str | None, ids: tuple[str, ...]) -> None:
    """Delete the named dead letters, or all of them."""
    removed = open_store(config_path).remove_dead_letters(list(ids) if ids else None)
    click.echo(f"removed {removed} dead letters")
