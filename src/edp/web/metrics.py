"""Prometheus ``/metrics``: the store's counters and figures, plus the ingest endpoint's own.

The store's figures are read at scrape time (through the reader thread) and exposed
by a custom collector, so every edp process on one database reports the same
totals; the ingest counters are per process.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edp.web.figures import NOT_AN_OUTCOME

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LABELLED_COUNTERS = (
    # counter-name prefix, metric name, label, help
    ("events.", "edp_events", "outcome",
     "S3 object events applied, by outcome (counted, overwrite, duplicate, delete)."),
    ("skipped.", "edp_events_skipped", "reason",
     "Object events not batched (created or deleted), by reason (shallow-key, ...)."),
    ("ignored.", "edp_events_ignored", "type", "S3 events of other types, by type."),
    ("batches.", "edp_batches_fired", "trigger",
     "Batches fired (package-objects-ready events emitted), by trigger."),
)
_GAUGES = (
    ("open_batches", "edp_open_batches", "Batches open now."),
    ("closed_batches", "edp_closed_batches",
     "Closed batches the store keeps (history_retention prunes them; "
     "edp_batches_fired_total counts every one)."),
    ("pending_deliveries", "edp_outbox_pending", "Outbox deliveries waiting for a sink."),
    ("parked_deliveries", "edp_outbox_parked",
     "Outbox deliveries a sink refused for good (see edp status)."),
    ("dead_letters", "edp_dead_letters", "Inputs kept in the dead-letter store."),
)


class StoreCollector(Collector):
    """Turns an :func:`edp.web.figures.overview` dict into metric families."""

    def __init__(self) -> None:
        self.figures: Mapping[str, Any] = {}

    def describe(self) -> list[Metric]:
        """Nothing up front: the names depend on the counters present."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The families of the figures last set."""
        counters: Mapping[str, int] = self.figures.get("counters", {})
        stats: Mapping[str, int] = self.figures.get("stats", {})
        for prefix, name, label, text in _LABELLED_COUNTERS:
            family = CounterMetricFamily(name, text, labels=[label])
            for key, value in sorted(counters.items()):
                if key.startswith(prefix) and key not in NOT_AN_OUTCOME:
                    family.add_metric([key.removeprefix(prefix)], value)
            yield family
        yield CounterMetricFamily(
            "edp_events_clock_ahead",
            "Object events dated further ahead of the wall clock than clock_max_ahead "
            "(also counted in edp_events_total by their outcome).",
            value=counters.get("events.clock_ahead", 0))
        yield CounterMetricFamily("edp_messages", "Input messages processed.",
                                  value=counters.get("messages", 0))
        yield CounterMetricFamily("edp_dead_letters_received",
                                  "Inputs that could not be decoded.",
                                  value=counters.get("dead_letters", 0))
        yield CounterMetricFamily("edp_step_errors", "Engine steps of this process that failed.",
                                  value=self.figures.get("step_errors", 0))
        for key, name, text in _GAUGES:
            yield GaugeMetricFamily(name, text, value=stats.get(key, 0))


class WebMetrics:
    """The metrics of one web app: its own registry, so several apps can live in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.ingest_requests = Counter(
            "edp_ingest_requests", "Requests to POST /ingest, by HTTP status.", ["status"],
            registry=self.registry,
        )
        self.ingest_seconds = Histogram(
            "edp_ingest_duration_seconds", "Time from a body's arrival to its commit.",
            registry=self.registry,
        )
        self._store = StoreCollector()
        self.registry.register(self._store)
        self._lock = threading.Lock()

    def render(self, figures: Mapping[str, Any]) -> bytes:
        """The text exposition of every metric, with the store's ``figures``."""
        with self._lock:
            self._store.figures = figures
            return generate_latest(self.registry)


__all__ = ["CONTENT_TYPE", "StoreCollector", "WebMetrics"]
