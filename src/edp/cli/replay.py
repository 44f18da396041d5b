"""``edp replay``."""

from __future__ import annotations

import sys
from typing import Any

import click

from edp.cli import main
from edp.cli._common import grouping_options, handle_errors, settings_from


@main.command()
@click.argument("file", type=click.File("rb"))
@grouping_options
@click.option("--database-url",
              help="Replay into this store instead of a temporary SQLite one (not the "
                   "database_url setting: a replay never uses it by accident).")
@click.option("--strict", is_flag=True, help="Exit 1 when any line was rejected.")
@click.option("--workers", "replay_workers", metavar="N",
              help="replay_workers: processes replaying parts of one stream into "
              "the shared --database-url (each waits for all to register).")
@click.option("--worker-id", help="worker_id: this process's name among --workers.")
@handle_errors
def replay(file: Any, database_url: str | None, strict: bool, replay_workers: str | None,
           worker_id: str | None, **kwargs: Any) -> None:
    """Replay a JSON Lines file of S3 events (FILE, or - for stdin) deterministically.

    Prints one package-objects-ready event per line on stdout, in firing order;
    rejected lines and a summary go to stderr. Never touches the configured
    database unless --database-url names one.
    """
    from edp.config import check_database_url
    from edp.replay import run_replay

    if database_url is not None:
        check_database_url(database_url, "option --database-url")
    settings = settings_from(kwargs, replay_workers=replay_workers, worker_id=worker_id)
    summary = run_replay(
        file, settings, stdout=sys.stdout.buffer, stderr=sys.stderr, database_url=database_url
    )
    click.echo(summary.describe(), err=True)
    if summary.undelivered:
        click.echo(f"edp: error: {summary.undelivered} batch event(s) could not be written to "
                   f"standard output ({summary.output_error})", err=True)
        sys.exit(1)
    if strict and summary.rejected:
        sys.exit(1)
