"""``edp watch DIR``: a local folder tree as a bucket."""

from __future__ import annotations

import hashlib
import logging
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from edp.cli import main
from edp.cli._common import F, grouping_options, handle_errors, printable, settings_from
from edp.config import Settings
from edp.engine import worker_sink
from edp.errors import ConfigError, plural
from edp.sinks.base import BucketScoped, Sink
from edp.sinks.local import StdoutSink
from edp.sources.watch import FolderSource

if TYPE_CHECKING:
    from edp.quilt.packager import PackageResult


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


WATCH_FLAGS = ("watch_settle_seconds", "watch_ignore")
"""The settings :func:`watch_options` sets, by their parameters' names."""


def watch_options(func: F) -> F:
    """``--settle`` and ``--ignore``: how a watched folder is read (``edp watch``, and
    ``edp serve --watch``)."""
    func = click.option("--ignore", "watch_ignore", metavar="GLOBS",
                        help="watch_ignore: comma-separated file-name globs never reported.")(func)
    return click.option("--settle", "watch_settle_seconds", metavar="SECONDS",
                        help="watch_settle_seconds: a file is complete when unchanged this "
                             "long.")(func)


def watching(source: FolderSource) -> str:
    """What a watcher says at its start: the folder, and as which bucket."""
    return f"{source.root} as bucket {source.bucket!r}"


def watch_worker_id(root: Path) -> str:
    """A worker id that is stable across restarts of one watcher, so its clock resumes."""
    digest = hashlib.blake2b(str(root.resolve()).encode(), digest_size=4).hexdigest()
    return f"watch-{socket.gethostname()}-{digest}"


def packager_sink(settings: Settings, source: FolderSource, registry: str, *,
                  name: str = "quilt-packager") -> Sink:
    """A sink (named ``name``) that packages each batch of the watched folder into
    ``registry``.

    The packager finds a batch's files at ``<local root>/<bucket>/<prefix>``, so the
    bucket must be the folder's name; a local registry must lie outside the folder.
    """
    from edp.quilt.packager import Packager
    from edp.quilt.publish import quilt3
    from edp.quilt.sink import PackagerSink

    quilt3()  # fail now, with the instruction, when the quilt extra is missing
    if source.bucket != source.root.name:
        raise ConfigError(f"--registry packages {source.root}/<prefix>: leave --bucket out "
                          f"(the bucket must be the folder's name, {source.root.name!r})")
    if "://" not in registry or registry.startswith("file://"):
        local = Path(registry.removeprefix("file://")).expanduser().resolve()
        if local == source.root or source.root in local.parents:
            raise ConfigError(f"the registry {local} must not be inside the watched folder")
    # Only the folder's own batches (the packager refuses others, unread); an operator's
    # command on a shared store hands this sink events of any bucket: left alone.
    return BucketScoped(PackagerSink(
        Packager(settings, registry=registry, local_root=source.root.parent,
                 buckets={source.bucket}), name=name, on_result=say_package,
    ), source.bucket)


def watcher_sinks(settings: Settings, source: FolderSource, worker_id: str, *,
                  stdout: bool, registry: str | None) -> list[Sink]:
    """The sinks of ``edp watch``: the configured ones, its stdout and its packager.

    Its stdout (a lasting stream a pipe reads) and its packager serve its folder's
    bucket: each is a sink of its own name, ``<kind>@<worker id>/<bucket>``, which only
    this watcher relays and for which whoever fires a batch of the folder records its
    event (another worker by time, an operator's `edp batches close`); their other
    buckets' batches (this watcher firing another's by time) are left alone. So two
    watchers on one store, each packaging its own folder, neither take nor lose each
    other's batches."""
    from edp.bootstrap import build_sinks

    sinks: list[Sink] = []
    for sink in build_sinks(settings, stdout=stdout):
        if isinstance(sink, StdoutSink):
            sink.name = worker_sink("stdout", worker_id, source.bucket)
            sinks.append(BucketScoped(sink, source.bucket))
        else:
            sinks.append(sink)
    if registry is not None:
        sinks.append(packager_sink(settings, source, registry,
                                   name=worker_sink("quilt-packager", worker_id, source.bucket)))
    return sinks


def say_package(result: PackageResult) -> None:
    """One line on stderr per batch packaged (or not), as the demo shows them. A
    failure is not said here: the relay logs it, with its attempt and next try (or that
    it is parked)."""
    if not result.ok:
        return
    what = {
        "pushed": f"package {result.package} ({plural(result.files, 'file')}) pushed to "
                  f"{result.registry}, top hash {result.top_hash}",
        "unchanged": f"package {result.package} unchanged in {result.registry}",
        "quarantined": f"package {result.package} quarantined in {result.registry}: "
                       f"{result.error}",
        "skipped": f"no package for {result.prefix}: {result.error or 'no files'}",
    }[result.status.value]
    click.echo(printable(f"edp watch: {what}"), err=True)


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--bucket", help="Bucket name of the events (default: the folder's name).")
@watch_options
@click.option("--database-url", help="Store to use (default: database_url setting).")
@click.option("--stdout/--no-stdout", default=True, show_default=True,
              help="Also print each event of the folder (package-objects-ready, and "
                   "package-ready of a watched registry folder) as a JSON line on stdout.")
@click.option("--registry",
              help="Also build a Quilt package of each batch into this registry (a local "
                   "folder or s3://bucket); needs the quilt extra.")
@grouping_options
@handle_errors
def watch(directory: Path, bucket: str | None, stdout: bool, registry: str | None,
          **kwargs: Any) -> None:
    """Watch DIRECTORY as a bucket: complete files become object events, batched as configured.

    A file counts once its size and mtime have not changed for --settle seconds; names such as
    *.part, *.tmp and ~$* are ignored, a rename is a delete plus a create. Events go to
    the configured sinks (and stdout). Files that appeared while edp was down are
    picked up at start; those already counted are not counted again. Stop with Ctrl-C.
    """
    require_watchfiles()
    from edp.bootstrap import build_observers, build_runtime
    from edp.daemon import Daemon

    extra = {name: kwargs.pop(name) for name in (*WATCH_FLAGS, "database_url")}
    settings = settings_from(kwargs, **extra)
    source = FolderSource.from_settings(directory, settings, bucket=bucket)
    if settings.package_ready_registries and not settings.package_local_root:
        # (package-ready pointers of a watched registry folder are files beside it)
        settings = settings.model_copy(update={"package_local_root": str(source.root.parent)})
    worker_id = settings.worker_id or watch_worker_id(directory)
    sinks = watcher_sinks(settings, source, worker_id, stdout=stdout, registry=registry)
    runtime = build_runtime(settings, sinks=sinks, worker_id=worker_id,
                            observers=build_observers(settings))
    click.echo(f"edp watch: {watching(source)}, store "
               f"{runtime.store.url}; Ctrl-C stops", err=True)
    daemon = Daemon(runtime, [source], max_wait=1.0)
    daemon.install_signal_handlers()
    try:
        stats = daemon.run()
    finally:
        runtime.close()
    click.echo(f"edp watch: stopped after {plural(stats.messages, 'file event')}, "
               f"{plural(stats.fired, 'batch', 'batches')} fired", err=True)
