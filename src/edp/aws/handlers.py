"""AWS Lambda entry points of the serverless deployment (``deploy/edp.yaml``).

``store_handler`` records S3 object events. It is invoked

* by SQS in batches (``Records`` with ``eventSource: aws:sqs``): each record is
  one message; the handler returns ``{"batchItemFailures": [...]}`` naming the
  records whose step failed, so that only those come back, and raises when none
  could be stored because the function cannot start or its database is unreachable
  (all come back, and Lambda's error metric shows it). A record that cannot
  be decoded is *not* a failure: it is kept in the dead-letter store and
  acknowledged (retrying would not make it decodable);
* or directly by EventBridge (or with any other single message): the event is
  one message, and an error is raised if its step fails (Lambda retries).

Its clock is the S3 event time (SPEC section 4): a backlog after an outage never
splits a batch. ``emit_handler`` runs on a schedule: the clock becomes the wall
clock, due batches fire, and the outbox is relayed to the sinks. It raises when
some deliveries failed, so that the Lambda's error metric (and alarm) shows it;
everything it did is committed either way and failed deliveries are retried.

Holds (see :meth:`edp.engine.Engine.hold`): records that were not stored come again
only after the ingest queue's visibility timeout (``sqs_visibility_timeout``), and
their batch must not fire by time meanwhile. Each store step first publishes a hold
at its oldest event's time (:meth:`~edp.engine.Engine.announce_hold`), which its own
commit clears: if the container dies in the step, or the store is lost, the hold
stays until the records are back. A container that saw the store unreachable (its
steps could not publish anything) holds from its next success: the store function at
the oldest event it could not store, the emit function where its firing by time had
got to. Records failing a step of their own (tried one by one) hold nothing: they
would hold again at each return, until the queue's redrive policy takes them; those
left untried after three such failures in a row hold at their own oldest time.

Settings come from ``EDP_*`` variables; the database URL from ``EDP_DATABASE_URL``
or the secret named by ``EDP_DATABASE_SECRET_ARN``. The runtime (settings, store
connection, sinks) is built on the first invocation of a container and reused;
after an error it is rebuilt, so a rotated password or a dropped connection
heals on the next invocation. Nothing is done at import time.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from edp.bootstrap import Runtime, build_observers, build_runtime
from edp.config import load_settings
from edp.engine import BACKLOG_LAG, Message, StepReport, decode_messages
from edp.errors import EdpError, one_line
from edp.store import is_outage

log = logging.getLogger(__name__)

GIVE_UP_AFTER = 3
"""Consecutive failed records after which the rest of an SQS batch is not tried."""

HISTORY_BUDGET = 2.0
"""Seconds an emit tick may spend pruning history (``history_retention``)."""

_lock = threading.Lock()
_runtimes: dict[str, Runtime] = {}
HOLD_MARGIN = 60.0
"""Seconds a hold lasts past the ingest queue's visibility timeout: a record that comes
back may wait for the batching window (5 s), a cold start and the secret's fetch
before its step publishes a hold of its own."""


@dataclass(slots=True)
class _Outage:
    """What a container keeps of a time its store was unreachable."""

    at: float
    """The time to hold at."""
    until: float | None = None
    """The hold's end, set when the store is reached again (None: not yet)."""


_outages: dict[str, _Outage] = {}
"""Per role, the container's hold after an outage (see the module's docstring): it
outlives the runtimes, which are replaced after each failure."""


def runtime(role: str) -> Runtime:
    """The container's runtime for ``role`` (``store`` or ``emit``), built once."""
    with _lock:
        cached = _runtimes.get(role)
        if cached is None:
            cached = _build(role)
            _runtimes[role] = cached
        return cached


def reset_runtime() -> None:
    """Drop the cached runtimes (closing their stores): the next call rebuilds them."""
    with _lock:
        for cached in _runtimes.values():
            try:
                cached.close()
            except Exception:  # a boundary: the connection may be broken already
                log.debug("closing a broken runtime failed", exc_info=True)
        _runtimes.clear()


def _build(role: str) -> Runtime:
    from edp.aws.secrets import resolve_database_url

    edp_log = logging.getLogger("edp")
    if edp_log.level == logging.NOTSET:
        edp_log.setLevel(logging.INFO)  # batch firings and deliveries belong in CloudWatch
    settings = load_settings()
    # One id per container: SPEC 4's floor waits for live containers only, and a
    # recycled container's row stops counting after worker_timeout.
    function = os.environ.get("AWS_LAMBDA_FUNCTION_NAME", "edp")
    worker_id = settings.worker_id or f"lambda-{role}-{function}-{uuid.uuid4().hex[:12]}"
    if settings.worker_id:
        log.warning("worker_id is set (%s): every container of the function shares one "
                    "worker row, so one's step clears the hold another published and their "
                    "clocks mix; leave it unset for the Lambda functions", worker_id)
    built = build_runtime(settings, database_url=resolve_database_url(settings),
                          worker_id=worker_id, observers=build_observers(settings))
    log.info("edp %s runtime: worker %s, sinks %s", role, worker_id,
             ", ".join(built.relay.sink_names) or "none")
    built.engine.register_sinks(now=time.time())
    return built


def store_handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """Record S3 object events: a batch of SQS records, or one EventBridge event."""
    records = event.get("Records") if isinstance(event, dict) else None
    if isinstance(records, list) and records and all(
        isinstance(r, dict) and r.get("eventSource") == "aws:sqs" for r in records
    ):
        return {"batchItemFailures": [{"itemIdentifier": i} for i in _store_sqs(records)]}
    where = event.get("id", "?") if isinstance(event, dict) else "?"
    message = Message(event, location=f"event id {where}", source="lambda")
    if not _started([message]):
        # (Lambda invokes it again, twice within minutes; the container holds for it)
        raise EdpError(f"the store function cannot start; event {where} comes again")
    step_by: str | None = None
    try:
        step_by = runtime("store").engine.worker_id
        report = _store_step([message])
    except Exception as exc:
        reset_runtime()
        # Lambda invokes it again (twice, within minutes): hold for it as for records
        # (unless it failed alone: it would hold at each try)
        if is_outage(exc):
            _missed([message])
        else:
            _release(step_by)
        raise
    return _summary(report)


def _store_step(messages: list[Message]) -> StepReport:
    """One engine step of the store function. Fresh events (none older than
    ``BACKLOG_LAG``) mean no backlog: the container is caught up, its clock becomes the
    wall clock, as a caught-up ``edp run`` worker's does, and it stops holding the
    emit function back until its next step. Older events keep the clock at their
    times, so a container storing a backlog still holds quiet batches back (SPEC 4)."""
    engine = runtime("store").engine
    now = engine.store.wall_clock()
    events, report = engine.decode(messages, now)
    seconds = _hold_seconds(engine.settings.sqs_visibility_timeout)
    kept = _outage_hold("store", now, seconds)
    if kept is not None:  # (published by this step's heartbeat)
        engine.hold(now=now, seconds=kept[1] - now, at=kept[0])
    if events:
        engine.announce_hold(now=now, seconds=seconds, at=min(e.time for e in events))
    # (a step with no event, only dead letters, says nothing about a backlog.)
    # Between invocations the container holds nothing in flight: once caught up it
    # must not hold quiet batches back until its heartbeat is worker_timeout old (its
    # last clock is this invocation's "now", before their deadlines), so the step marks
    # it finished; its next step's heartbeat makes it a live worker again.
    return engine.process_decoded(events, report, now=now, caught_up=bool(events),
                                  backlog_lag=BACKLOG_LAG, finish=True)


def _store_sqs(records: list[dict[str, Any]]) -> list[str]:
    """Process SQS records; return the message ids of those whose step failed. Raises
    when none could be stored because the store function cannot start or its store is
    unreachable (all come again)."""
    messages = [
        (str(r.get("messageId")), Message(
            r.get("body", ""),
            location=f"message id {r.get('messageId')}",
            source=f"sqs:{r.get('eventSourceARN', '')}",
        ))
        for r in records
    ]
    if not _started([m for _, m in messages]):
        # Raised, not reported per record: the same for SQS (the whole batch comes
        # again), but Lambda's error metric (the dashboard, alarms) shows it.
        raise EdpError(f"the store function cannot start; its {len(records)} SQS "
                       "record(s) come again")
    held_by: str | None = None  # the runtime whose step published the batch's hold
    try:
        held_by = runtime("store").engine.worker_id
        report = _store_step([m for _, m in messages])
    except Exception as exc:  # a boundary: fall back to one step per record
        reset_runtime()
        if is_outage(exc):
            # The database is unreachable: one step per record would only wait for it
            # again, record after record, past the function's timeout. All come again.
            # (Logged here: Lambda's runtime logs the raised error without its cause.)
            log.exception("the store is unreachable; all %d SQS records come again",
                          len(records))
            _missed([m for _, m in messages])
            raise EdpError(f"the store is unreachable; all {len(records)} SQS record(s) "
                           "come again") from exc
        log.exception("a batch of %d SQS records failed; trying them one by one", len(records))
    else:
        _log_rejected(report)
        return []
    failed: list[str] = []
    untried: list[Message] = []
    streak = 0
    for index, (message_id, message) in enumerate(messages):
        if streak >= GIVE_UP_AFTER:
            failed.append(message_id)
            untried.append(message)
            continue
        if not _started([m for _, m in messages[index:]]):
            if len(failed) == index:  # (none stored: the invocation fails, as above)
                raise EdpError(f"the store function cannot start; its {len(records)} SQS "
                               "record(s) come again")
            return failed + [mid for mid, _ in messages[index:]]
        step_by: str | None = None
        try:
            step_by = runtime("store").engine.worker_id
            _log_rejected(_store_step([message]))
            streak = 0
        except Exception as exc:  # a boundary: this record comes back, the others go on
            reset_runtime()
            if is_outage(exc):
                log.exception("the store is unreachable; the %d remaining SQS records come "
                              "again", len(messages) - index)
                _missed([m for _, m in messages[index:]])
                if len(failed) == index:
                    raise EdpError(f"the store is unreachable; all {len(records)} SQS "
                                   "record(s) come again") from exc
                return failed + [mid for mid, _ in messages[index:]]
            log.exception("SQS message %s failed; it will come again", message_id)
            failed.append(message_id)
            streak += 1
            _release(step_by)  # (a record failing alone holds nothing)
    # Every record was stored or failed alone, and the batch's hold is not needed; or
    # some were left untried: they come again, and the hold stays for them only.
    _release(held_by, untried)
    return failed


def _started(messages: list[Message]) -> bool:
    """Whether the store function's runtime is built (or can be now). When it cannot be
    (the database secret not readable, the settings wrong, the database unreachable),
    no record is at fault: they all come again, and the container holds for them once
    it starts, as after an outage."""
    try:
        runtime("store")
    except Exception:  # a boundary: the records come back; the log says why
        reset_runtime()
        log.exception("the store function cannot start (its settings, its database secret "
                      "or its database); its %d input(s) come again", len(messages))
        _missed(messages)
        return False
    return True


def _hold_seconds(visibility_timeout: float) -> float:
    """How long a hold lasts: records not stored come back after the ingest queue's
    visibility timeout."""
    return visibility_timeout + HOLD_MARGIN


def _oldest(messages: list[Message]) -> float | None:
    """The oldest event time of ``messages`` (decoding is pure: no store needed)."""
    events, _ = decode_messages(messages, now=time.time())
    return min((event.time for event in events), default=None)


def _outage_hold(role: str, now: float, seconds: float) -> tuple[float, float] | None:
    """The container's hold after an outage, as (at, until); None if none (any more).
    It begins when the store is reached again: records that failed until then come
    back within ``seconds`` of that."""
    seen = _outages.get(role)
    if seen is None:
        return None
    if seen.until is None:
        seen.until = now + seconds
    if now >= seen.until:
        del _outages[role]
        return None
    return seen.at, seen.until


def _remember_outage(role: str, at: float | None) -> None:
    """The store is unreachable: hold at ``at`` (or lower) once it is reached again."""
    if at is None:
        return
    seen = _outages.get(role)
    if seen is None:
        _outages[role] = _Outage(at)
    else:
        seen.at, seen.until = min(seen.at, at), None  # (the hold begins at the recovery)


def _missed(messages: list[Message]) -> None:
    """Records that could not be stored, the store being unreachable."""
    _remember_outage("store", _oldest(messages))


def _release(worker_id: str | None, away: list[Message] | None = None) -> None:
    """Retire a replaced runtime: its hold, published before a step whose records were
    since stored or failed alone, is dropped, except for the container's own hold after
    an outage and records ``away`` (left untried: they come again). Best effort: a hold
    ends by itself anyway."""
    if worker_id is None:
        return
    try:
        store = runtime("store").store
        now = store.wall_clock()
        seconds = _hold_seconds(runtime("store").settings.sqs_visibility_timeout)
        keep = [hold for hold in (_outage_hold("store", now, seconds),) if hold is not None]
        oldest = None if not away else _oldest(away)
        if oldest is not None:
            keep.append((oldest, now + seconds))
        store.retire_worker(
            worker_id,
            held=min((at for at, _ in keep), default=None),
            held_until=max((until for _, until in keep), default=None),
        )
    except Exception:  # a boundary: the hold then runs its course
        log.warning("could not drop the hold of %s; it ends by itself", worker_id,
                    exc_info=True)


def emit_handler(event: Any = None, context: Any = None) -> dict[str, Any]:
    """Fire the batches that are due now, deliver the outbox to every sink, and forget
    key memories older than ``sequencer_retention`` (cheap when there are none)."""
    fired_until = -math.inf
    try:
        current = runtime("emit")
        fired_until = current.engine.fired_until
        now = current.store.wall_clock()
        kept = _outage_hold("emit", now, _hold_seconds(current.settings.sqs_visibility_timeout))
        if kept is not None:
            # The store was unreachable here: store steps that failed meanwhile may
            # have left records away (see the module docstring).
            current.engine.hold(now=now, seconds=kept[1] - now, at=kept[0])
        waiting = _waiting_messages(current.settings.sqs_queues)
        if waiting:
            # The store function has not taken them yet (its concurrency cap, a
            # throttle): their times are unknown, and a quiet batch fired now by the
            # wall clock would split from those of its files. Its steps fire what their
            # events' times make due; this tick only relays (and publishes no clock
            # but a hold).
            log.info("edp emit: %d messages wait in the ingest queue: firing by time "
                     "waits for the store function to take them", waiting)
            fired = []
            if current.engine.held(now) is not None:
                # (a hold after an outage is published with the heartbeat that firing
                # would have sent: right after an outage the queue has a backlog. Its
                # clock is not: after the outage the runtime is new, its clock -inf,
                # published as the lowest time, which would keep every other worker
                # from firing anything, past the hold, while its row is live.)
                current.engine.beat(now=now, finished=True)
        else:
            fired = current.engine.fire_due(now=now)
        report = current.relay.deliver()
        pruned = current.engine.prune()
        # (a minute's tick: what is left for lack of time goes at the next)
        history = current.engine.prune_history(now=now, budget=HISTORY_BUDGET)
    except Exception as exc:
        if is_outage(exc):
            # Hold where this container's firing by time had got to (a new one that
            # never fired: at the failure)
            _remember_outage("emit", fired_until if math.isfinite(fired_until)
                             else time.time())
        reset_runtime()
        raise
    summary = {
        "waiting": waiting,
        "fired": len(fired),
        "delivered": report.delivered,
        "failed": report.failed,
        "parked": report.parked,
        "pruned": pruned,
        "pruned_history": {"events": history.events, "batches": history.batches,
                           "dead_letters": history.dead_letters},
    }
    log.info("edp emit: %s", summary)
    if report.failed or report.parked:
        raise EdpError(
            f"edp emit: {report.failed} deliveries will be retried, {report.parked} were refused "
            f"for good ({'; '.join(report.errors[:3])})"
        )
    return summary


_unreadable_queues: dict[str, float] = {}
"""Queues whose count could not be read, and when: warned about once per container,
asked again only after :data:`ASK_AGAIN_AFTER` (without a route to SQS each try costs
a connection timeout, 5 s of a tick). Wall-clock times: a container's monotonic clock
may stand still while Lambda freezes it between invocations."""
ASK_AGAIN_AFTER = 600.0


def _waiting_messages(queues: tuple[str, ...]) -> int | None:
    """Messages waiting in the ingest ``queues`` (visible or delayed: not yet taken by
    the store function), per SQS's approximate counts; None when there are no queues
    to ask or none could be read (firing by time then goes on as without them)."""
    from edp.aws.clients import aws_errors, client, region_of_queue_url

    waiting: int | None = None
    for url in queues:
        failed = _unreadable_queues.get(url)
        if failed is not None and 0 <= time.time() - failed < ASK_AGAIN_AFTER:
            continue
        try:
            attributes = client("sqs", region=region_of_queue_url(url), read_timeout=10.0,
                                max_attempts=0).get_queue_attributes(
                QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages",
                                              "ApproximateNumberOfMessagesDelayed"],
            )["Attributes"]
        except aws_errors() as exc:
            if failed is None:
                log.warning("cannot read how many messages wait in %s (%s): batches fire "
                            "by time without knowing (the emit role needs "
                            "sqs:GetQueueAttributes, its subnets a route to SQS); asked "
                            "again every %.0f s", url, one_line(str(exc)), ASK_AGAIN_AFTER)
            _unreadable_queues[url] = time.time()
            continue
        _unreadable_queues.pop(url, None)
        waiting = (waiting or 0) + sum(int(attributes.get(name, 0)) for name in (
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesDelayed"))
    return waiting


def _summary(report: StepReport) -> dict[str, Any]:
    _log_rejected(report)
    return {
        "messages": report.messages,
        "events": report.events,
        "fired": len(report.fired),
        "rejected": len(report.rejected),
    }


def _log_rejected(report: StepReport) -> None:
    for letter in report.rejected:
        log.warning("dead letter from %s, %s: %s", letter.source, letter.location, letter.reason)


__all__ = ["emit_handler", "reset_runtime", "runtime", "store_handler"]
