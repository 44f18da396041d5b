"""``edp db``, ``edp dead-letters`` and ``edp config``: the store and the settings."""

from __future__ import annotations

import datetime
import math
from typing import Any

import click
import orjson
from pydantic import SecretStr

from edp import __version__
from edp.bootstrap import build_runtime
from edp.cli import main
from edp.cli._common import (
    grouping_options,
    handle_errors,
    open_runtime,
    printable,
    settings_from,
    store_options,
    store_url,
    when,
)
from edp.redact import redact_endpoint, redact_text
from edp.store import read_schema_state


@main.group()
def db() -> None:
    """Database schema (upgrade, status) and the sinks the store relays to."""


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
    """Show the schema version, the pending migrations (applied by `edp db upgrade`, not
    here) and the store's figures."""
    settings, url = store_url(config_file, database_url)
    # Read, not opened: opening a store applies its pending migrations, and a status
    # that changed the schema could never show one pending.
    state = read_schema_state(url)
    click.echo(f"{redact_text(url)}: schema version {state.applied} (latest {state.latest})")
    if state.applied > state.latest:
        click.echo(f"  newer than this edp ({__version__}) knows: it refuses to work on this"
                   " store; run the edp that upgraded it, or a newer one")
        return
    if state.pending:
        click.echo(f"  pending migrations: {', '.join(m.name for m in state.pending)} "
                   "(`edp db upgrade` applies them)")
        # (the figures' queries are those of the latest schema)
        click.echo("  figures: shown once the schema is at the latest version")
        return
    runtime = build_runtime(settings, database_url=url)
    try:
        stats = runtime.store.stats()
    finally:
        runtime.close()
    for name, value in stats.items():
        click.echo(f"  {name}: {value}")


@db.command("prune")
@store_options
@click.option("--older-than", "history_retention", metavar="SECONDS",
              help="history_retention: prune what is older than this (0 or >= 3600; "
                   "default: the setting).")
@handle_errors
def db_prune(
    config_file: str | None, database_url: str | None, history_retention: str | None
) -> None:
    """Delete the history older than history_retention: delivered batch events, the
    fired batches they announced with their files, and dead letters. Open batches,
    events still to deliver or parked (refused for good by a sink), package-ready
    events and key memories stay. Workers do this every 10 minutes when the setting is
    set; this runs it once, to the end."""
    # (the option's parameter bears the setting's name: an error names --older-than)
    flags = {"history_retention": history_retention}
    runtime = open_runtime(config_file, database_url, flags=flags)
    try:
        if not runtime.settings.history_retention:
            raise click.UsageError("history_retention is 0 (keep all history): give "
                                   "--older-than SECONDS or set history_retention")
        pruned = runtime.engine.prune_history(now=runtime.store.wall_clock())
    finally:
        runtime.close()
    click.echo(f"pruned history older than {runtime.settings.history_retention:.0f} s: "
               f"{pruned.events} events, {pruned.batches} batches, "
               f"{pruned.dead_letters} dead letters")


@db.command("sinks")
@store_options
@handle_errors
def db_sinks(config_file: str | None, database_url: str | None) -> None:
    """List the sinks the store knows (registered by a worker at its start, or with
    deliveries) and their deliveries: pending, parked (failed for good), delivered."""
    runtime = open_runtime(config_file, database_url)
    try:
        summaries = runtime.store.sink_summaries()
        parked = runtime.store.parked_deliveries(limit=PARKED_SHOWN)
    finally:
        runtime.close()
    if not summaries:
        click.echo("no sinks known")
    for sink in summaries:
        registered = ("not registered (known by its deliveries only)"
                      if sink.registered_at is None
                      else f"registered {when(sink.registered_at)}")
        click.echo(printable(f"{sink.name}: {registered}, {sink.pending} pending, "
                             f"{sink.parked} parked, {sink.delivered} delivered"))
    if parked:
        # Which events were refused for good, and of which batch: `edp batches reemit`
        # sends one again once its cause is fixed.
        click.echo(f"parked (the latest {len(parked)}; `edp batches reemit BATCH` sends "
                   "one again):")
        for delivery in parked:
            click.echo(printable(f"  {delivery.sink}: event {delivery.event_id}"
                                 f"{_batch_of(delivery.payload)} after {delivery.attempts} "
                                 f"attempt(s): {delivery.error or '?'}"))


PARKED_SHOWN = 20


def _batch_of(payload: str) -> str:
    """`` of batch ID (bucket/prefix)`` for a batch event's payload, else ``""``."""
    try:
        detail = orjson.loads(payload).get("detail") or {}
        return (f" of batch {detail['batch-id']} "
                f"({detail.get('bucket')}/{detail.get('prefix')})")
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
        return ""


@db.command("forget-sink")
@store_options
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@handle_errors
def db_forget_sink(config_file: str | None, database_url: str | None, name: str,
                   yes: bool) -> None:
    """Forget the sink NAME (one no worker relays to any more): its registration and its
    delivery rows go, so events are no longer recorded or kept for it. The events stay in
    the outbox for the other sinks. A worker that still relays to NAME registers it
    again when it starts."""
    runtime = open_runtime(config_file, database_url)
    try:
        known = {sink.name: sink for sink in runtime.store.sink_summaries()}
        if name not in known:
            raise click.BadParameter(
                f"the store knows no sink {name!r}; known: {', '.join(known) or 'none'}",
                param_hint="NAME")
        sink = known[name]
        if not yes:
            click.confirm(printable(f"Forget sink {name}: {sink.pending} pending and "
                                    f"{sink.parked} parked event(s) will never be sent "
                                    "to it. Go on?"), abort=True, err=True)
        forgotten = runtime.store.forget_sink(name)
    finally:
        runtime.close()
    dropped = (forgotten.pending + forgotten.parked) if forgotten else 0
    click.echo(printable(f"forgot sink {name}: {dropped} undelivered event(s) dropped for it"))


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
    """Print the effective settings (after file, environment and flags) as TOML, each
    with where its value came from; secrets and URL passwords masked, unset values
    commented out."""
    origins: dict[str, str] = {}
    settings = settings_from(kwargs, origins=origins)
    overrides = settings.bucket_overrides
    for name, value in settings.model_dump(exclude={"bucket_overrides"}).items():
        if isinstance(value, str) and name.endswith("webhook_url"):
            value = redact_endpoint(value)  # a chat webhook's path is its token
        elif isinstance(value, str):
            value = redact_text(value)
        origin = origins.get(name, "default")
        if value is None:
            click.echo(f"# {name} = (not set), {origin}")
        elif isinstance(value, SecretStr):
            click.echo(f"# {name} = (set, not shown: a secret), {origin}")
        else:
            try:
                click.echo(f"{name} = {toml_value(value)}  # {origin}")
            except ValueError as exc:
                click.echo(f"# {name} = (not shown as TOML: {exc}), {origin}")
        if name == "buckets" and value and overrides:
            # (a bucket with a per-bucket table is watched too: core.rules.RuleBook)
            watched = sorted({*value, *overrides})
            click.echo(f"# watched buckets (with the per-bucket tables'): {toml_value(watched)}")
    for bucket, table in overrides.items():
        click.echo(f"\n[bucket_overrides.{toml_value(bucket)}]  # {origins['bucket_overrides']}")
        for name, value in table.model_dump(exclude_none=True).items():
            click.echo(f"{name} = {toml_value(value)}")


def toml_value(value: Any) -> str:
    """``value`` (a setting's) written as TOML, its texts redacted (:func:`redact_text`);
    ValueError for what TOML cannot hold (a null, text that is not Unicode...)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise ValueError("an integer past 64 bits")
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r}")
        return repr(value)
    if isinstance(value, str):
        return _toml_string(redact_text(value))
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_string(str(k))} = {toml_value(v)}"
                               for k, v in value.items()) + "}"
    if value is None:
        raise ValueError("it holds a null, which TOML cannot write")
    raise ValueError(f"a {type(value).__name__}")


def _toml_string(text: str) -> str:
    """A TOML basic string."""
    out = ['"']
    for char in text:
        code = ord(char)
        if 0xD800 <= code <= 0xDFFF:
            raise ValueError("its text is not valid Unicode (from bytes that are not UTF-8)")
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)
