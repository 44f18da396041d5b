"""The ``edp`` command line: thin wrappers that parse, wire and call the engine."""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from edp.bootstrap import Runtime, build_runtime
from edp.config import Settings, load_settings
from edp.errors import ConfigError, EdpError

F = TypeVar("F", bound=Callable[..., Any])

GROUPING_FLAGS = {
    "prefix_depth": "bucket_prefix_depth",
    "ignore_prefixes": "bucket_ignore_prefixes",
    "threshold_duration": "bucket_threshold_duration",
    "threshold_event_count": "bucket_threshold_event_count",
    "max_batch_age": "bucket_max_batch_age",
    "complete_markers": "bucket_complete_markers",
}

err = Console(stderr=True)


def grouping_options(func: F) -> F:
    """Add the grouping flags of SPEC section 6 (and ``--config``) to a command."""
    options = [
        click.option("--config", "config_file", type=click.Path(dir_okay=False),
                     help="TOML config file (default: $EDP_CONFIG, else ./edp.toml)."),
        click.option("--prefix-depth", help="bucket_prefix_depth: directory segments per prefix."),
        click.option("--ignore-prefixes", help="bucket_ignore_prefixes: comma-separated patterns."),
        click.option("--threshold-duration", help="bucket_threshold_duration: quiet seconds."),
        click.option("--threshold-event-count",
                     help="bucket_threshold_event_count: files per batch (0 = off)."),
        click.option("--max-batch-age", help="bucket_max_batch_age: seconds (0 = off)."),
        click.option("--complete-markers",
                     help="bucket_complete_markers: comma-separated file-name globs."),
        click.option("--eventbridge-raw-keys", is_flag=True, default=None,
                     help="Take EventBridge keys as sent (emulators), not URL-decoded."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def settings_from(kwargs: dict[str, Any], **extra: Any) -> Settings:
    """Pop the grouping flags from ``kwargs`` and load settings with them."""
    flags: dict[str, Any] = {GROUPING_FLAGS[k]: kwargs.pop(k) for k in GROUPING_FLAGS}
    flags["eventbridge_raw_keys"] = kwargs.pop("eventbridge_raw_keys")
    flags.update(extra)
    return load_settings(config_file=kwargs.pop("config_file"), flags=flags)


def handle_errors(func: F) -> F:
    """Turn edp's errors into a one-line message and exit status 2 (config) or 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            click.echo(f"edp: configuration error: {exc}", err=True)
            sys.exit(2)
        except EdpError as exc:
            click.echo(f"edp: error: {exc}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


@click.group()
@click.version_option(package_name="edp")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv: debug).")
def main(verbose: int) -> None:
    """edp: one event per batch of files, not one per file."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@main.command()
@click.argument("file", type=click.File("rb"))
@grouping_options
@click.option("--database-url", help="Replay into this store instead of a temporary SQLite one.")
@click.option("--strict", is_flag=True, help="Exit 1 when any line was rejected.")
@handle_errors
def replay(file: Any, database_url: str | None, strict: bool, **kwargs: Any) -> None:
    """Replay a JSON Lines file of S3 events (FILE, or - for stdin) deterministically.

    Prints one package-objects-ready event per line on stdout, in firing order;
    rejected lines and a summary go to stderr. Never touches the configured
    database unless --database-url names one.
    """
    from edp.replay import run_replay

    settings = settings_from(kwargs)
    summary = run_replay(
        file, settings, stdout=sys.stdout.buffer, stderr=sys.stderr, database_url=database_url
    )
    click.echo(summary.describe(), err=True)
    if strict and summary.rejected:
        sys.exit(1)


# -- batches ------------------------------------------------------------------------
def _runtime(config_file: str | None, database_url: str | None) -> Runtime:
    settings = load_settings(
        config_file=config_file, flags={"database_url": database_url}
    )
    return build_runtime(settings)


def store_options(func: F) -> F:
    """``--config`` and ``--database-url`` for commands that read the configured store."""
    func = click.option("--database-url", help="Store to use (default: database_url setting).")(
        func
    )
    return click.option("--config", "config_file", type=click.Path(dir_okay=False),
                        help="TOML config file.")(func)


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _span(seconds: float) -> str:
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    if seconds < 120:
        return f"{sign}{seconds:.0f}s"
    if seconds < 7200:
        return f"{sign}{seconds / 60:.0f}m"
    return f"{sign}{seconds / 3600:.1f}h"


@main.group(invoke_without_command=True)
@store_options
@click.option("--state", type=click.Choice(["open", "closed"]), help="Only these batches.")
@click.option("--limit", default=50, show_default=True, help="Rows per state.")
@click.pass_context
@handle_errors
def batches(
    ctx: click.Context, config_file: str | None, database_url: str | None,
    state: str | None, limit: int,
) -> None:
    """List open batches (by next deadline) and recent closed ones."""
    ctx.ensure_object(dict)
    ctx.obj.update(config_file=config_file, database_url=database_url)
    if ctx.invoked_subcommand is not None:
        return
    runtime = _runtime(config_file, database_url)
    now = time.time()
    table = Table(title=f"batches in {runtime.store.url}")
    for column in ("id", "state", "bucket", "prefix", "files", "age", "deadline", "trigger"):
        table.add_column(column)
    for row in runtime.store.list_batches(state=state, limit=limit):
        if row.state == "open":
            deadline = f"{_when(row.deadline)} (in {_span((row.deadline or now) - now)})"
            trigger = f"next: {row.deadline_trigger}"
        else:
            deadline, trigger = f"fired {_when(row.fired_at)}", str(row.trigger)
        table.add_row(row.batch_id[:8], row.state, row.bucket, row.prefix,
                      str(row.object_count), _span(now - row.first_activity), deadline, trigger)
    Console().print(table)
    runtime.close()


def _options(ctx: click.Context) -> tuple[str | None, str | None]:
    obj = ctx.find_root().obj or {}
    parent = ctx.parent.obj if ctx.parent and ctx.parent.obj else obj
    return parent.get("config_file"), parent.get("database_url")


@batches.command("show")
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
@handle_errors
def batches_show(ctx: click.Context, batch_id: str, as_json: bool) -> None:
    """Show one batch (BATCH_ID or a unique prefix of it) with its objects."""
    import orjson

    runtime = _runtime(*_options(ctx))
    row = runtime.store.get_batch(batch_id)
    objects = runtime.store.batch_objects(row.batch_id)
    if as_json:
        data = {"batch": row.__dict__ if hasattr(row, "__dict__") else _row_dict(row),
                "objects": [_row_dict(o) for o in objects]}
        click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    else:
        console = Console()
        console.print(f"[bold]batch {row.batch_id}[/] ({row.state})")
        console.print(f"  s3://{row.bucket}/{row.prefix}  generation {row.generation}")
        console.print(f"  files {row.object_count}, first event {_when(row.first_event_time)},"
                      f" last event {_when(row.last_event_time)}")
        if row.state == "open":
            console.print(f"  next deadline {_when(row.deadline)} ({row.deadline_trigger})")
        else:
            console.print(
                f"  fired {_when(row.fired_at)} by {row.trigger}, event id {row.event_id}"
            )
        table = Table()
        for column in ("key", "size", "etag", "sequencer", "event time"):
            table.add_column(column)
        for o in objects:
            table.add_row(o.key, "-" if o.size is None else str(o.size), o.etag or "-",
                          o.sequencer or "-", _when(o.event_time))
        console.print(table)
    runtime.close()


def _row_dict(row: Any) -> dict[str, Any]:
    return {name: getattr(row, name) for name in row.__slots__}


@batches.command("close")
@click.argument("batch_id")
@click.pass_context
@handle_errors
def batches_close(ctx: click.Context, batch_id: str) -> None:
    """Fire an open batch now (trigger manual) and deliver its event."""
    runtime = _runtime(*_options(ctx))
    ready = runtime.engine.close_batch(batch_id, now=time.time())
    report = runtime.relay.deliver()
    click.echo(f"closed batch {ready.batch_id} (s3://{ready.bucket}/{ready.prefix}, "
               f"{ready.object_count} files); event {ready.event_id}; "
               f"{report.delivered} deliveries made, {report.failed} to retry")
    runtime.close()


@batches.command("reemit")
@click.argument("batch_id")
@click.pass_context
@handle_errors
def batches_reemit(ctx: click.Context, batch_id: str) -> None:
    """Send a closed batch's event again to every sink, with the same id."""
    runtime = _runtime(*_options(ctx))
    event_id = runtime.engine.reemit(batch_id)
    report = runtime.relay.deliver()
    click.echo(f"re-emitted event {event_id}; {report.delivered} deliveries made, "
               f"{report.failed} to retry")
    runtime.close()


# -- store housekeeping -----------------------------------------------------------
@main.group()
def db() -> None:
    """Database schema: upgrade and status."""


@db.command("upgrade")
@store_options
@handle_errors
def db_upgrade(config_file: str | None, database_url: str | None) -> None:
    """Apply pending schema migrations (opening a store also does this)."""
    runtime = _runtime(config_file, database_url)
    applied, latest = runtime.store.schema_version()
    click.echo(f"{runtime.store.url}: schema version {applied} (latest {latest})")
    runtime.close()


@db.command("status")
@store_options
@handle_errors
def db_status(config_file: str | None, database_url: str | None) -> None:
    """Show the schema version and the store's figures."""
    runtime = _runtime(config_file, database_url)
    applied, latest = runtime.store.schema_version()
    click.echo(f"{runtime.store.url}: schema version {applied} (latest {latest})")
    for name, value in runtime.store.stats().items():
        click.echo(f"  {name}: {value}")
    runtime.close()


@main.command("dead-letters")
@store_options
@click.option("--limit", default=20, show_default=True)
@handle_errors
def dead_letters(config_file: str | None, database_url: str | None, limit: int) -> None:
    """List the most recent inputs that could not be decoded, with the reason."""
    runtime = _runtime(config_file, database_url)
    for letter in runtime.store.dead_letters(limit=limit):
        click.echo(f"#{letter.id} {_when(letter.received_at)} {letter.source} "
                   f"{letter.location}: {letter.reason}")
        click.echo(f"    {letter.body[:200]}")
    runtime.close()


@main.command("config")
@grouping_options
@handle_errors
def config_show(**kwargs: Any) -> None:
    """Print the effective settings (after file, environment and flags)."""
    settings = settings_from(kwargs)
    for name, value in settings.model_dump().items():
        click.echo(f"{name} = {value!r}")


if __name__ == "__main__":  # pragma: no cover
    main()
