"""``edp status``: the dashboard's figures as tables in the terminal."""

from __future__ import annotations

from typing import Any

import click
import orjson
from rich.console import Console, Group
from rich.table import Table

from edp.cli import main
from edp.cli._common import (
    cell,
    fires_in,
    handle_errors,
    open_runtime,
    span,
    store_options,
    when,
)
from edp.config import Settings
from edp.store.base import Store
from edp.web import figures


def status_report(store: Store, settings: Settings, now: float, *, limit: int) -> dict[str, Any]:
    """Everything ``edp status`` shows, as the JSON API shapes it."""
    data = figures.overview(store, now)
    data["open_batches"] = figures.batches(store, settings, now, state="open", limit=limit)
    data["events"] = figures.events(store, limit=limit)
    data["dead_letters"] = [figures.dead_letter_dict(d) for d in store.dead_letters(limit=limit)]
    return data


def status_tables(data: dict[str, Any]) -> Group:
    """The report as rich tables: figures, open batches, recent events, dead letters."""
    stats, totals = data["stats"], data["totals"]
    summary = Table(title=f"edp status: {data['store']}", show_header=False)
    summary.add_column("figure")
    summary.add_column("value", justify="right")
    fired = ", ".join(f"{k} {v}" for k, v in sorted(totals["fired"].items())) or "none"
    for label, value in (
        ("open batches", stats["open_batches"]),
        # (counted as they fired: history_retention prunes closed batches)
        ("batches fired", f"{totals['events_out']} ({fired})"),
        ("events in", totals["events_in"]),
        ("events out", totals["events_out"]),
        ("outbox backlog", stats["pending_deliveries"]),
        ("parked deliveries", f"{stats['parked_deliveries']} (edp db sinks names them)"
         if stats["parked_deliveries"] else "0"),
        ("dead letters", stats["dead_letters"]),
    ):
        summary.add_row(label, str(value))
    now = data["now"]
    batches = Table(title="open batches")
    for column in ("id", "bucket", "prefix", "files", "age", "fires in", "by"):
        batches.add_column(column)
    for b in data["open_batches"]:
        files = str(b["object_count"])
        if b["count_threshold"]:
            files += f"/{b['count_threshold']}"
        batches.add_row(b["batch_id"][:8], cell(b["bucket"]), cell(b["prefix"]), files,
                        span(b["age"]),
                        fires_in(b["deadline_in"]), str(b["deadline_trigger"]))
    events = Table(title="recent events")
    for column in ("emitted", "kind", "bucket", "prefix / package", "files", "trigger"):
        events.add_column(column)
    for e in data["events"]:
        d = e["detail"]
        events.add_row(when(e["created_at"]), e["kind"], cell(d.get("bucket", "")),
                       cell(d.get("prefix", d.get("package-name", ""))),
                       str(d.get("object-count", "")), str(d.get("trigger", "")))
    for table in (batches, events):
        if not table.row_count:
            table.caption = "none"
    parts: list[Any] = [summary, batches, events]
    if data["dead_letters"]:
        dead = Table(title="latest dead letters")
        for column in ("received", "where", "reason"):
            dead.add_column(column)
        for d in data["dead_letters"]:
            dead.add_row(when(d["received_at"]), cell(f"{d['source']} {d['location']}"),
                         cell(d["reason"]))
        parts.append(dead)
    parts.append(f"as of {when(now)}")
    return Group(*parts)


@main.command()
@store_options
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True,
              help="Rows per table.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (as /api/stats) instead.")
@handle_errors
def status(config_file: str | None, database_url: str | None, limit: int, as_json: bool) -> None:
    """Show open batches, recent events, totals in and out, the outbox backlog and dead letters."""
    runtime = open_runtime(config_file, database_url)
    try:
        data = status_report(runtime.store, runtime.settings, runtime.store.wall_clock(),
                             limit=limit)
    finally:
        runtime.close()
    if as_json:
        click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
        return
    Console(width=160).print(status_tables(data))
