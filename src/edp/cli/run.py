"""``edp run``: the long-running worker on SQS queues."""

from __future__ import annotations

from typing import Any

import click

from edp.cli import main
from edp.cli._common import grouping_options, handle_errors, settings_from
from edp.errors import plural


@main.command()
@click.option("--sqs-queue", "sqs_queues", multiple=True, metavar="URL",
              help="SQS queue URL to consume (repeatable; setting sqs_queues).")
@click.option("--eventbridge-bus", metavar="NAME",
              help="Publish events to this EventBridge bus, name or ARN (setting "
                   "eventbridge_bus).")
@click.option("--sns-topic", metavar="ARN",
              help="Publish events to this SNS topic (setting sns_topic).")
@click.option("--webhook", "webhook_url", metavar="URL",
              help="POST events to this URL (setting webhook_url; signed with the "
                   "webhook_secret setting).")
@click.option("--database-url", help="Store (default: database_url, or database_secret_arn).")
@click.option("--worker-id", help="Stable worker_id of this worker (keep it across restarts).")
@click.option("--stdout", is_flag=True, help="Also print each event as a JSON line on stdout.")
@grouping_options
@handle_errors
def run(
    sqs_queues: tuple[str, ...],
    eventbridge_bus: str | None,
    sns_topic: str | None,
    webhook_url: str | None,
    database_url: str | None,
    worker_id: str | None,
    stdout: bool,
    **kwargs: Any,
) -> None:
    """Consume S3 object events from SQS and publish one event per batch, until stopped.

    The queues may be fed by an EventBridge rule on the buckets' S3 events, by S3
    Event Notifications or by SNS. Messages are deleted only once the engine has
    committed them; undecodable ones go to the dead-letter store (`edp
    dead-letters`). SIGTERM or SIGINT finishes the current step, delivers the
    outbox and exits 0. Every option also comes from the config file and EDP_*
    variables (EDP_SQS_QUEUES, EDP_EVENTBRIDGE_BUS, EDP_SNS_TOPIC, EDP_WEBHOOK_URL,
    EDP_WEBHOOK_SECRET, EDP_DATABASE_URL or EDP_DATABASE_SECRET_ARN...).
    """
    from edp.aws.secrets import resolve_database_url
    from edp.bootstrap import build_observers, build_runtime
    from edp.daemon import Daemon
    from edp.errors import ConfigError
    from edp.sources.sqs import SqsSource

    settings = settings_from(
        kwargs,
        sqs_queues=list(sqs_queues) or None,
        eventbridge_bus=eventbridge_bus,
        sns_topic=sns_topic,
        webhook_url=webhook_url,
        database_url=database_url,
        worker_id=worker_id,
    )
    if not settings.sqs_queues:
        raise ConfigError("no queue to consume: give --sqs-queue URL (or set sqs_queues)")
    sources = [SqsSource.from_settings(url, settings) for url in settings.sqs_queues]
    for source in sources:
        source.check()
    runtime = build_runtime(
        settings, database_url=resolve_database_url(settings), stdout=stdout,
        observers=build_observers(settings),
    )
    for sink in runtime.relay.sinks:
        check = getattr(sink, "check", None)
        if check is not None:  # (EventBridge, SNS: a bus or topic that does not exist)
            try:
                check()
            except ConfigError:
                runtime.close()
                raise
    sinks = ", ".join(runtime.relay.sink_names)
    borrowed = ", ".join(s for s in runtime.engine.sinks if s not in runtime.relay.sink_names)
    if not sinks:
        sinks = ("none of its own (events wait in the outbox for other workers' sinks: "
                 f"{borrowed or 'none known'})")
    elif borrowed:
        sinks += f" (its events also wait in the outbox for other workers' sinks: {borrowed})"
    click.echo(
        f"edp run: worker {runtime.engine.worker_id}, {len(sources)} queue(s), sinks: {sinks}",
        err=True,
    )
    daemon = Daemon(runtime, sources, max_wait=float(settings.sqs_wait_seconds))
    daemon.install_signal_handlers()
    try:
        stats = daemon.run()  # (marks the worker finished when it stops cleanly)
    finally:
        runtime.close()
    click.echo(
        f"edp run: stopped after {plural(stats.steps, 'step')}, "
        f"{plural(stats.messages, 'message')}, {plural(stats.fired, 'batch', 'batches')} "
        f"fired, {plural(stats.errors, 'error')}", err=True,
    )
