"""``edp batches``: list, show, close and re-emit batches."""

from __future__ import annotations

from typing import Any

import click
import orjson
from click.core import ParameterSource
from rich.console import Console
from rich.table import Table

from edp.bootstrap import Runtime
from edp.cli import main
from edp.cli._common import (
    cell,
    fires_in,
    handle_errors,
    open_runtime,
    printable,
    span,
    store_options,
    when,
)
from edp.errors import plural


@main.group(invoke_without_command=True)
@store_options
@click.option("--state", type=click.Choice(["open", "closed"]), help="Only these batches.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True,
              help="Rows per state.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
@handle_errors
def batches(
    ctx: click.Context, config_file: str | None, database_url: str | None,
    state: str | None, limit: int, as_json: bool,
) -> None:
    """List open batches (by next deadline) and recent closed ones."""
    ctx.obj = {"config_file": config_file, "database_url": database_url, "json": as_json}
    if ctx.invoked_subcommand is not None:
        if state is not None or ctx.get_parameter_source("limit") is not ParameterSource.DEFAULT:
            raise click.UsageError("--state and --limit choose the batches listed: give them "
                                   "without a subcommand")
        if as_json and ctx.invoked_subcommand != "show":
            raise click.UsageError(f"--json has no effect on `{ctx.invoked_subcommand}`")
        return
    runtime = open_runtime(config_file, database_url)
    if as_json:
        rows = runtime.store.list_batches(state=state, limit=limit)
        runtime.close()
        data = {"batches": [_as_dict(row) for row in rows]}
        click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
        return
    now = runtime.store.wall_clock()  # (the workers' clock: on PostgreSQL the server's)
    table = Table(title=f"batches in {runtime.store.url}")
    for column in ("id", "state", "bucket", "prefix", "files", "age", "deadline", "trigger"):
        table.add_column(column)
    for row in runtime.store.list_batches(state=state, limit=limit):
        if row.state == "open":
            left = (row.deadline or now) - now
            deadline = (f"{when(row.deadline)} (in {span(left)})" if left >= 0 else
                        f"{when(row.deadline)} ({fires_in(left)}, not fired yet)")
            trigger = f"next: {row.deadline_trigger}"
        else:
            deadline, trigger = f"fired {when(row.fired_at)}", str(row.trigger)
        table.add_row(row.batch_id[:8], row.state, cell(row.bucket), cell(row.prefix),
                      str(row.object_count),
                      span(max(0.0, _age_end(row, now) - row.first_activity)),
                      deadline, trigger)
    Console(width=160).print(table)
    runtime.close()


def _age_end(row: Any, now: float) -> float:
    """A batch's age runs to now while it is open, to its firing once closed (as the
    dashboard shows it)."""
    return now if row.state == "open" or row.fired_at is None else float(row.fired_at)


def _store_args(
    ctx: click.Context, config_file: str | None, database_url: str | None
) -> tuple[str | None, str | None]:
    """The store options given after the subcommand, else those given before it."""
    obj = ctx.obj or {}
    return config_file or obj.get("config_file"), database_url or obj.get("database_url")


def _as_dict(row: Any) -> dict[str, Any]:
    if hasattr(row, "_asdict"):
        return dict(row._asdict())
    return {name: getattr(row, name) for name in row.__slots__}


@batches.command("show")
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@store_options
@click.pass_context
@handle_errors
def batches_show(ctx: click.Context, batch_id: str, as_json: bool, config_file: str | None,
                 database_url: str | None) -> None:
    """Show one batch (BATCH_ID or a unique prefix of it) with its objects."""
    runtime = open_runtime(*_store_args(ctx, config_file, database_url))
    row = runtime.store.get_batch(batch_id)
    objects = runtime.store.batch_objects(row.batch_id)
    runtime.close()
    if as_json or (ctx.obj or {}).get("json"):  # (`edp batches --json show ID` too)
        data = {"batch": _as_dict(row), "objects": [_as_dict(o) for o in objects]}
        click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
        return
    console = Console(width=160)
    console.print(f"batch {row.batch_id} ({row.state})", markup=False)
    console.print(printable(f"  s3://{row.bucket}/{row.prefix}  generation {row.generation}"),
                  markup=False)
    console.print(f"  files {row.object_count}, first event {when(row.first_event_time)},"
                  f" last event {when(row.last_event_time)}")
    if row.state == "open":
        console.print(f"  next deadline {when(row.deadline)} ({row.deadline_trigger})")
    else:
        console.print(f"  fired {when(row.fired_at)} by {row.trigger}, event id {row.event_id}")
    table = Table()
    for column in ("key", "size", "etag", "sequencer", "event time"):
        table.add_column(column)
    for o in objects:
        table.add_row(cell(o.key), "-" if o.size is None else str(o.size), cell(o.etag or "-"),
                      cell(o.sequencer or "-"), when(o.event_time))
    console.print(table)


@batches.command("close")
@click.argument("batch_id")
@store_options
@click.pass_context
@handle_errors
def batches_close(ctx: click.Context, batch_id: str, config_file: str | None,
                   database_url: str | None) -> None:
    """Fire an open batch now (trigger manual) and deliver its event."""
    runtime = open_runtime(*_store_args(ctx, config_file, database_url))
    try:
        ready = runtime.engine.close_batch(batch_id, now=runtime.store.wall_clock())
        report = runtime.relay.deliver()
        waiting = _waiting_note(runtime, ready.bucket)
    finally:
        runtime.close()
    click.echo(printable(f"closed batch {ready.batch_id} (s3://{ready.bucket}/{ready.prefix}, "
                         f"{plural(ready.object_count, 'file')}); event {ready.event_id}; "
                         f"{plural(report.delivered, 'delivery', 'deliveries')} made, "
                         f"{report.failed} to retry"))
    if waiting:
        click.echo(waiting)


@batches.command("reemit")
@click.argument("batch_id")
@store_options
@click.pass_context
@handle_errors
def batches_reemit(ctx: click.Context, batch_id: str, config_file: str | None,
                   database_url: str | None) -> None:
    """Send a closed batch's event again to every sink, with the same id."""
    runtime = open_runtime(*_store_args(ctx, config_file, database_url))
    try:
        event_id = runtime.engine.reemit(batch_id)
        report = runtime.relay.deliver()
        waiting = _waiting_note(runtime, runtime.store.get_batch(batch_id).bucket)
    finally:
        runtime.close()
    click.echo(f"re-emitted event {event_id}; {report.delivered} deliveries made, "
               f"{report.failed} to retry")
    if waiting:
        click.echo(waiting)


def _waiting_note(runtime: Runtime, bucket: str) -> str:
    """What to tell an operator whose command has no sink to deliver the event itself."""
    if runtime.relay.sinks:
        return ""
    # (the sinks its event was recorded for)
    known = ", ".join(runtime.engine.operator_sinks(bucket))
    return (f"note: no sink is configured for this command, so the event waits in the "
            f"outbox for a worker that delivers to its sinks ({known})")
