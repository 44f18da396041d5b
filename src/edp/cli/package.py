"""``edp package``: turn package-objects-ready events into Quilt packages."""

from __future__ import annotations

import signal
import sys
import threading
from typing import IO, Any

import click
import orjson

from edp.cli import main
from edp.cli._common import handle_errors
from edp.errors import ConfigError


@main.command("package")
@click.argument("file", type=click.File("rb"), required=False)
@click.option("--sqs-queue", metavar="URL", help="Consume events from this SQS queue instead.")
@click.option("--registry", help="Target registry: s3://BUCKET or a local folder "
              "(default: setting registry, else the batch's own bucket).")
@click.option("--workflow", help="Quilt workflow to validate against (default: setting "
              "workflow, else the registry's default workflow).")
@click.option("--quarantine-registry", help="Where packages that fail validation go "
              "(setting quarantine_registry).")
@click.option("--local-root", type=click.Path(file_okay=False),
              help="Local mode: the files of bucket B, prefix P are in DIR/B/P "
                   "(setting package_local_root).")
@click.option("--once", is_flag=True, help="With --sqs-queue: stop when the queue is empty.")
@click.option("--wait", type=click.IntRange(0, 20), default=None,
              help="SQS long-poll seconds (0-20, as SQS allows; default: setting "
                   "sqs_wait_seconds, 20).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML config file.")
@handle_errors
def package(
    file: IO[bytes] | None, sqs_queue: str | None, registry: str | None, workflow: str | None,
    quarantine_registry: str | None, local_root: str | None, once: bool, wait: int | None,
    config_file: str | None,
) -> None:
    """Build a Quilt package for each package-objects-ready event.

    Events come as JSON Lines from FILE (- for stdin), or from an SQS queue with
    --sqs-queue (long polling; a message is deleted once its outcome is final).
    One JSON result per event goes to stdout. Exit status 1 if any event failed.
    """
    from edp.config import load_settings

    try:
        from edp.quilt.packager import Packager, PackageResult
        from edp.quilt.publish import quilt3
    except ImportError as exc:
        raise ConfigError(f"edp package needs the quilt extra ({exc}): "
                          "pip install 'edp[quilt]'") from None
    quilt3()  # fail now, with the instruction, when the quilt extra is missing

    if (file is None) == (sqs_queue is None):
        raise click.UsageError("give either FILE (or -) or --sqs-queue URL")
    settings = load_settings(config_file=config_file)
    packager = Packager(settings, registry=registry, workflow=workflow,
                        quarantine_registry=quarantine_registry, local_root=local_root)
    failed = 0

    def emit(result: PackageResult) -> None:
        nonlocal failed
        failed += not result.ok
        sys.stdout.buffer.write(orjson.dumps(result.as_dict()) + b"\n")
        sys.stdout.buffer.flush()

    if file is not None:
        for number, line in enumerate(file, start=1):
            if line.strip():
                result = packager.package(line)
                if result.error and not result.package:
                    result.error = f"line {number}: {result.error}"
                emit(result)
    else:
        assert sqs_queue is not None
        _consume(packager, sqs_queue, emit, once=once,
                 wait=settings.sqs_wait_seconds if wait is None else wait,
                 region=settings.region,
                 dead_letter=_dead_letter_keeper(settings, sqs_queue))
    if failed:
        click.echo(f"edp: {failed} event(s) failed", err=True)
        sys.exit(1)


def _dead_letter_keeper(settings: Any, queue_url: str) -> Any:
    """Keep messages that failed for good in the configured store's dead-letter table."""

    url: list[str] = []  # (the secret, if any, is read once)

    def keep(body: str, location: str, reason: str) -> None:
        import time

        from edp.aws.secrets import resolve_database_url
        from edp.store import open_store
        from edp.store.base import DeadLetter

        if not url:
            url.append(resolve_database_url(settings))
        store = open_store(url[0])
        try:
            with store.transaction() as tx:
                tx.add_dead_letters([DeadLetter(f"package:{queue_url}", location, reason, body,
                                                time.time())])
        finally:
            store.close()

    return keep


def _consume(packager: Any, queue_url: str, emit: Any, *, once: bool, wait: int,
             region: str, dead_letter: Any = None) -> None:
    from edp.aws.clients import client as aws_client
    from edp.quilt.queue import consume_queue

    stop = threading.Event()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):  # finish the current event, then stop
            previous[signum] = signal.signal(signum, lambda *_: stop.set())
    try:
        client = aws_client("sqs", region=_queue_region(queue_url) or region)
        consume_queue(packager, queue_url, client=client, on_result=emit, wait=wait,
                      until_empty=once, stop=stop, dead_letter=dead_letter)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _queue_region(url: str) -> str | None:
    host = url.split("//", 1)[-1].split("/", 1)[0]
    parts = host.split(".")
    return parts[1] if len(parts) >= 4 and parts[0] == "sqs" else None
