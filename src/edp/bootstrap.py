"""Wiring: settings -> store, sinks, engine, relay. The only place that builds them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edp.config import Settings
from edp.engine import Engine, StepObserver
from edp.relay import Relay
from edp.sinks import JsonlSink, LogSink, Sink, StdoutSink
from edp.store import Store, open_store


@dataclass(slots=True)
class Runtime:
    """A wired engine with its store and relay."""

    settings: Settings
    store: Store
    engine: Engine
    relay: Relay

    def close(self) -> None:
        """Release the store's connections."""
        self.store.close()


def build_sinks(settings: Settings, *, stdout: bool = False) -> list[Sink]:
    """The sinks the settings ask for (plus stdout when ``stdout``)."""
    sinks: list[Sink] = []
    if stdout:
        sinks.append(StdoutSink())
    if settings.jsonl_path:
        sinks.append(JsonlSink(settings.jsonl_path))
    if settings.log_events:
        sinks.append(LogSink())
    # -- network sinks (issue 4) are added below this line, imported lazily
    if settings.eventbridge_bus:
        from edp.sinks.eventbridge import EventBridgeSink

        sinks.append(EventBridgeSink(settings.eventbridge_bus, fallback_region=settings.region))
    if settings.sns_topic:
        from edp.sinks.sns import SnsSink

        sinks.append(SnsSink(settings.sns_topic, fallback_region=settings.region))
    if settings.webhook_url:
        from edp.sinks.webhook import WebhookSink

        secret = settings.webhook_secret
        sinks.append(WebhookSink(
            settings.webhook_url, secret=secret.get_secret_value() if secret else None
        ))
    return sinks


def build_observers(settings: Settings) -> list[StepObserver]:
    """Engine observers the settings ask for: ``package-ready`` detection (issue 5).

    Empty unless ``package_ready_registries`` names buckets; quilt/boto3 load lazily.
    Pass the list to :func:`build_runtime` (``observers=``) in long-running workers.
    """
    if not settings.package_ready_registries:
        return []
    from edp.quilt.ready import build_package_ready_observer

    return [build_package_ready_observer(settings)]


def build_runtime(
    settings: Settings,
    *,
    database_url: str | None = None,
    sinks: Sequence[Sink] | None = None,
    stdout: bool = False,
    worker_id: str | None = None,
    fast_unsafe: bool = False,
    observers: Sequence[StepObserver] = (),
    live: bool = True,
) -> Runtime:
    """Open the store and wire an engine and a relay to it.

    ``live``: the engine serves live input, so its clock may not run more than
    ``clock_max_ahead`` past the wall clock; a replay (``live=False``) follows its
    stream's times wherever they go, and its events go to its own sinks only (never to
    the shared sinks of a store it shares with live workers: see ``Engine.sinks``)."""
    store = open_store(database_url or settings.database_url, fast_unsafe=fast_unsafe,
                       idle_in_transaction=max(10.0, settings.worker_timeout))
    chosen = list(sinks) if sinks is not None else build_sinks(settings, stdout=stdout)
    engine = Engine(
        store, settings, sinks=[s.name for s in chosen], worker_id=worker_id,
        observers=observers, clock_max_ahead=settings.clock_max_ahead if live else None,
        borrow_sinks=live,
    )
    # Delivery leases are timed by the store's shared clock (PostgreSQL: the server's),
    # as the workers' clocks are: a relay on a machine whose clock runs ahead must not
    # take a lease another relay still holds.
    return Runtime(settings, store, engine, Relay(store, chosen, clock=store.wall_clock))
