"""``edp serve``: the ingest endpoint for S3-compatible stores, and the dashboard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edp.cli import main
from edp.cli._common import grouping_options, handle_errors, settings_from
from edp.cli.watch import WATCH_FLAGS, require_watchfiles, watch_options, watching
from edp.errors import ConfigError
from edp.redact import redact_text


@main.command()
@click.option("--host", "serve_host", metavar="ADDRESS",
              help="serve_host: address to bind (default 127.0.0.1).")
@click.option("--port", "serve_port", metavar="PORT",
              help="serve_port: TCP port (default 8080; 0 = any free).")
@click.option("--max-body", "serve_max_body", metavar="BYTES",
              help="serve_max_body: largest accepted request body in bytes.")
@click.option("--database-url", help="Store to use (default: database_url setting).")
@click.option("--watch", "watch_dir", type=click.Path(exists=True, file_okay=False,
                                                      path_type=Path),
              help="Also watch this folder as a bucket (like edp watch).")
@click.option("--bucket", help="Bucket name for --watch (default: the folder's name).")
@watch_options
@click.option("--stdout", is_flag=True, help="Also print each emitted event on stdout.")
@grouping_options
@handle_errors
def serve(watch_dir: Path | None, bucket: str | None, stdout: bool, **kwargs: Any) -> None:
    """Serve POST /ingest for S3 event notifications, the dashboard, /api and /metrics.

    MinIO, Ceph RGW and other S3-compatible stores send their bucket notifications to
    http://HOST:PORT/ingest (webhook target) with "Authorization: Bearer <serve_token>".
    The token comes from EDP_SERVE_TOKEN or the config file, never from a flag; on a
    loopback address without one, a token is made up and shown here once. Binding any
    other address requires serve_token. Stop with Ctrl-C.
    """
    try:
        from edp.web.server import ServeStack
    except ImportError:
        raise ConfigError("edp serve needs the web extra: pip install 'edp[web]'") from None
    names = ("serve_host", "serve_port", "serve_max_body", "database_url", *WATCH_FLAGS)
    extra = {name: kwargs.pop(name) for name in names}
    if watch_dir is None and any(extra[name] is not None for name in WATCH_FLAGS):
        raise click.UsageError("--settle and --ignore are settings of the folder of --watch: "
                               "give --watch DIR")
    settings = settings_from(kwargs, **extra)
    sources = []
    if watch_dir is not None:
        from edp.sources.watch import FolderSource

        require_watchfiles()
        sources.append(FolderSource.from_settings(watch_dir, settings, bucket=bucket))
    stack = ServeStack(settings, stdout=stdout, sources=sources)
    click.echo(f"edp serve: dashboard {stack.url}/  ingest POST {stack.url}/ingest  "
               f"metrics {stack.url}/metrics", err=True)
    click.echo(f"edp serve: store {redact_text(stack.url_db)}", err=True)
    for source in sources:
        click.echo(f"edp serve: watching {watching(source)}", err=True)
    if stack.token_generated:
        click.echo(f"edp serve: no serve_token set; this run's ingest token is {stack.token}"
                   " (set EDP_SERVE_TOKEN to keep one)", err=True)
    stack.serve_forever()
    click.echo("edp serve: stopped", err=True)
