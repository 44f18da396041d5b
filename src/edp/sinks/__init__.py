"""Sinks deliver outbox events: stdout, a JSON Lines file, the log (more in adapters).

A sink is anything with a ``name`` and a ``send(entries)`` method that returns the
entries it failed to deliver (see :class:`edp.sinks.base.Sink`).
"""

from edp.sinks.base import Failure, Sink
from edp.sinks.local import JsonlSink, LogSink, StdoutSink

__all__ = ["Failure", "JsonlSink", "LogSink", "Sink", "StdoutSink"]
