"""Wiring: settings -> store, sinks, engine, relay. The only place that builds them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edp.config import Settings
from edp.engine import Engine
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
    return sinks


def build_runtime(
    settings: Settings,
    *,
    database_url: str | None = None,
    sinks: Sequence[Sink] | None = None,
    stdout: bool = False,
    worker_id: str | None = None,
    fast_unsafe: bool = False,
) -> Runtime:
    """Open the store and wire an engine and a relay to it."""
    store = open_store(database_url or settings.database_url, fast_unsafe=fast_unsafe)
    chosen = list(sinks) if sinks is not None else build_sinks(settings, stdout=stdout)
    engine = Engine(
        store, settings, sinks=[s.name for s in chosen], worker_id=worker_id
    )
    return Runtime(settings, store, engine, Relay(store, chosen))
