"""The ``eventswarm`` command: the commands are in ``operate`` (run, check and steer the daemon) and ``records``
(what ran), with what they share in ``common``."""

from __future__ import annotations

import sqlite3
from typing import Any

import click

from dispatcher.cli import operate, records
from dispatcher.cli.common import fail
from dispatcher.errors import StoreError


class _Commands(click.Group):
    """Every command: a failing state store is one line and exit 1, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except StoreError as exc:
            fail(str(exc))
        except (sqlite3.Error, OSError) as exc:
            fail(f"the state store failed: {exc}")
        except Exception as exc:
            if type(exc).__module__.startswith("asyncpg"):  # (PostgreSQL's errors, imported only when used)
                fail(f"the state store failed: {exc}")
            raise


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="eventswarm")
def main() -> None:
    """Connect event streams to container functions on Docker Swarm."""


for _command in (operate.run, operate.validate, operate.schema, operate.invoke, operate.init, operate.status,
                 operate.reload, operate.gc, operate.schedule, records.invocations, records.logs, records.dlq):
    main.add_command(_command)
