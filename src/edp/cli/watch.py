"""``edp watch DIR``: a local folder tree as a bucket."""

from __future__ import annotations

import hashlib
import logging
import socket
from pathlib import Path
from typing import Any

import click

from edp.cli import main
from edp.cli._common import grouping_options, handle_errors, settings_from
from edp.errors import ConfigError


def require_watchfiles() -> None:
    """Fail with an instruction when the ``web`` extra (watchfiles) is not installed."""
    try:
        import watchfiles  # noqa: F401
    except ImportError:
        raise ConfigError(
            "watching a folder needs watchfiles: pip install 'edp[web]'"
        ) from None
    # watchfiles logs every change at INFO; edp's own lines say what matters.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)


def watch_worker_id(root: Path) -> str:
    """A worker id that is stable across restarts of one watcher, so its clock resumes."""
    digest = hashlib.blake2b(str(root.resolve()).encode(), digest_size=4).hexdigest()
    return f"watch-{socket.gethostname()}-{digest}"


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--bucket", help="Bucket name of the events (default: the folder's name).")
@click.option("--settle", "watch_settle_seconds",
              help="watch_settle_seconds: a file is complete when unchanged this long.")
@click.option("--ignore", "watch_ignore",
              help="watch_ignore: comma-separated file-name globs never reported.")
@click.option("--database-url", help="Store to use (default: database_url setting).")
@click.option("--stdout/--no-stdout", default=True, show_default=True,
              help="Also print each package-objects-ready event as a JSON line on stdout.")
@grouping_options
@handle_errors
def watch(directory: Path, bucket: str | None, stdout: bool, **kwargs: Any) -> None:
    """Watch DIRECTORY as a bucket: complete files become object events, batched as configured.

    A file counts once its size has been stable for --settle seconds; names such as
    *.part, *.tmp and ~$* are ignored, a rename is a delete plus a create. Events go to
    the configured sinks (and stdout). Files that appeared while edp was down are
    picked up at start; those already counted are not counted again. Stop with Ctrl-C.
    """
    require_watchfiles()
    from edp.bootstrap import build_runtime
    from edp.daemon import Daemon
    from edp.sources.watch import FolderSource

    extra = {name: kwargs.pop(name) for name in ("watch_settle_seconds", "watch_ignore",
                                                 "database_url")}
    settings = settings_from(kwargs, **extra)
    source = FolderSource(
        directory, bucket=bucket, settle=settings.watch_settle_seconds,
        ignore=settings.watch_ignore, chunk=settings.chunk_size,
    )
    runtime = build_runtime(
        settings, stdout=stdout, worker_id=settings.worker_id or watch_worker_id(directory)
    )
    click.echo(f"edp watch: {source.root} as bucket {source.bucket!r}, store "
               f"{runtime.store.url}; Ctrl-C stops", err=True)
    daemon = Daemon(runtime, [source], max_wait=1.0)
    daemon.install_signal_handlers()
    try:
        stats = daemon.run()
    finally:
        runtime.close()
    click.echo(f"edp watch: stopped after {stats.messages} file events, "
               f"{stats.fired} batches fired", err=True)
