"""``edp db``, ``edp dead-letters`` and ``edp config``: the store and the settings."""

from __future__ import annotations

from typing import Any

import click

from edp.cli import main
from edp.cli._common import (
    grouping_options,
    handle_errors,
    open_runtime,
    printable,
    settings_from,
    store_options,
    when,
)
from edp.redact import redact_endpoint, redact_text


@main.group()
def db() -> None:
    """Database schema: upgrade and status."""


@db.command("upgrade")
@store_options
@handle_errors
def db_upgrade(config_file: str | None, database_url: str | None) -> None:
    """Create the store, or apply its pending schema migrations (opening a store for
    work also does this)."""
    runtime = open_runtime(config_file, database_url, create=True)
    applied, latest = runtime.store.schema_version()
    runtime.close()
    click.echo(f"{runtime.store.url}: schema version {applied} (latest {latest})")


@db.command("status")
@store_options
@handle_errors
def db_status(config_file: str | None, database_url: str | None) -> None:
    """Show the schema version and the store's figures."""
    runtime = open_runtime(config_file, database_url)
    applied, latest = runtime.store.schema_version()
    stats = runtime.store.stats()
    runtime.close()
    click.echo(f"{runtime.store.url}: schema version {applied} (latest {latest})")
    for name, value in stats.items():
        click.echo(f"  {name}: {value}")


@main.command("dead-letters")
@store_options
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True)
@handle_errors
def dead_letters(config_file: str | None, database_url: str | None, limit: int) -> None:
    """List the most recent inputs that could not be decoded, with the reason."""
    runtime = open_runtime(config_file, database_url)
    letters = runtime.store.dead_letters(limit=limit)
    runtime.close()
    if not letters:
        click.echo("no dead letters")
    for letter in letters:
        click.echo(printable(f"#{letter.id} {when(letter.received_at)} {letter.source} "
                             f"{letter.location}: {letter.reason}"))
        click.echo(f"    {printable(letter.body[:200])}")


@main.command("config")
@grouping_options
@handle_errors
def config_show(**kwargs: Any) -> None:
    """Print the effective settings (after file, environment and flags)."""
    settings = settings_from(kwargs)
    for name, value in settings.model_dump().items():
        if isinstance(value, str) and name.endswith("webhook_url"):
            value = redact_endpoint(value)  # a chat webhook's path is its token
        elif isinstance(value, str):
            value = redact_text(value)
        click.echo(f"{name} = {value!r}")

