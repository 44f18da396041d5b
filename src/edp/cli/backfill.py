"""``edp backfill``: objects already in S3 fed to the engine as created events."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click

from edp.cli import main
from edp.cli._common import grouping_options, handle_errors, settings_from


@main.command()
@click.argument("location", metavar="s3://BUCKET[/PREFIX]")
@click.option("--database-url", help="Store (default: database_url, or database_secret_arn).")
@click.option("--since", metavar="TIME",
              help="Only objects modified at or after TIME (ISO 8601, e.g. 2024-05-01T00:00:00Z).")
@click.option("--worker-id", help="worker_id of this backfill (default: backfill-HOST-PID).")
@grouping_options
@handle_errors
def backfill(
    location: str, database_url: str | None, since: str | None, worker_id: str | None,
    **kwargs: Any,
) -> None:
    """List existing objects under s3://BUCKET[/PREFIX] and feed them as created events.

    For data that landed before edp ran, or while events were lost. The objects
    join batches as if they arrived now (count and marker batches fire at once,
    the others after their quiet period, fired by `edp run` or the emit Lambda);
    the events of fired batches go to the configured sinks. Running it again over
    the same objects changes nothing.
    """
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from edp.aws.backfill import S3Location
    from edp.aws.backfill import backfill as run_backfill
    from edp.aws.secrets import resolve_database_url
    from edp.bootstrap import build_runtime
    from edp.engine import default_worker_id
    from edp.errors import ConfigError

    where = S3Location.parse(location)
    after = None
    if since is not None:
        try:
            moment = datetime.fromisoformat(since)
        except ValueError:
            raise ConfigError(f"--since must be an ISO 8601 time, got {since!r}") from None
        after = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    settings = settings_from(kwargs, database_url=database_url)
    runtime = build_runtime(
        settings, database_url=resolve_database_url(settings),
        worker_id=worker_id or default_worker_id("backfill-"),
    )
    console = Console(stderr=True)
    try:
        with Progress(
            SpinnerColumn(), TextColumn("[bold]{task.description}"),
            TextColumn("{task.completed} objects"), TimeElapsedColumn(),
            console=console, transient=False,
        ) as progress:
            task = progress.add_task(f"backfill {where}", total=None)
            summary = run_backfill(
                runtime, where, since=after,
                progress=lambda done: progress.update(task, completed=done),
            )
    finally:
        runtime.close()
    click.echo(summary.describe(), err=True)
