"""SQS queues as sources of the ``edp run`` daemon.

A queue may be fed by an EventBridge rule on the buckets' S3 events, by S3 Event
Notifications, or by SNS -> SQS; the decoder recognises every envelope, so each
SQS message is handed to the engine as it is. The source:

* long-polls (``sqs_wait_seconds``) and receives up to ``sqs_max_messages`` per call;
  a receive that returns fewer than that means the queue is *caught up* (SPEC 4);
* keeps the received messages invisible while the engine works on them
  (``ChangeMessageVisibility`` from a timer thread, see :class:`VisibilityKeeper`);
* deletes messages only in :meth:`SqsSource.ack`, which the daemon calls after
  the engine committed the step. Messages that could not be decoded are in the
  dead-letter store by then; ``sqs_delete_poison`` says whether to delete them
  too or to leave them to the queue's redrive policy (its own dead-letter queue).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edp.aws.clients import CONNECT_TIMEOUT, aws_errors, error_code, region_of_queue_url
from edp.aws.clients import client as make_client
from edp.daemon import RECEIVE_MARGIN, Received, ReceiveFailed
from edp.decode import decode_message
from edp.engine import Message
from edp.errors import ConfigError, DecodeError

if TYPE_CHECKING:
    from edp.config import Settings

log = logging.getLogger(__name__)

BATCH_LIMIT = 10
"""SQS batch calls (receive, delete, change visibility) take at most 10 entries."""


@dataclass(frozen=True, slots=True)
class SqsReceipt:
    """What it takes to delete (or keep invisible) one received message."""

    message_id: str
    handle: str
    poison: bool = False
    partly: bool = False
    """Poison with good records too (they were batched)."""


class VisibilityKeeper:
    """Extends the visibility timeout of held messages from a background thread.

    While a step works on received messages, they are made invisible for another
    ``timeout`` seconds every ``timeout / 2`` seconds, so that a slow step (a
    database under load, a big batch) does not let SQS hand them to another
    worker. Holding stops at :meth:`release` (acknowledged, or abandoned after a
    failed step: they then come back when their timeout runs out).
    """

    def __init__(self, sqs: Any, queue_url: str, timeout: int) -> None:
        self.sqs = sqs
        self.queue_url = queue_url
        self.timeout = timeout
        self.interval = timeout / 2
        self._tick = min(0.5, self.interval / 2)
        self._lock = threading.Lock()
        self._held: list[SqsReceipt] = []
        self._held_since = 0.0
        self._extended_at = 0.0
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.extensions = 0

    def hold(self, receipts: Sequence[SqsReceipt]) -> None:
        """Keep ``receipts`` invisible until :meth:`release`."""
        with self._lock:
            self._held = list(receipts)
            self._held_since = self._extended_at = time.monotonic()
        if self._thread is None and receipts:
            self._thread = threading.Thread(
                target=self._run, name=f"edp-sqs-visibility:{self.queue_url}", daemon=True
            )
            self._thread.start()

    def release(self) -> None:
        """Stop extending (the messages were deleted, or will come back on their own)."""
        with self._lock:
            self._held = []

    def close(self) -> None:
        """Stop the thread."""
        self.release()
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self._tick)
            with self._lock:
                now = time.monotonic()
                if not self._held or now - self._extended_at < self.interval:
                    continue
                self._extend(self._held, now)

    def _extend(self, held: list[SqsReceipt], now: float) -> None:
        self._extended_at = now
        for chunk in _chunks(held, BATCH_LIMIT):
            try:
                response = self.sqs.change_message_visibility_batch(
                    QueueUrl=self.queue_url,
                    Entries=[
                        {"Id": str(i), "ReceiptHandle": r.handle, "VisibilityTimeout": self.timeout}
                        for i, r in enumerate(chunk)
                    ],
                )
            except Exception as exc:  # a boundary: a background thread must not die
                log.warning("sqs %s: cannot extend visibility of %d messages: %s",
                            self.queue_url, len(chunk), exc, exc_info=True)
                continue
            self.extensions += 1
            for failed in response.get("Failed", []):
                log.warning("sqs %s: cannot extend visibility of message %s: %s",
                            self.queue_url, chunk[int(failed["Id"])].message_id,
                            failed.get("Message") or failed.get("Code"))
        log.debug("sqs %s: %d messages kept invisible for %ds more (held %.0fs)",
                  self.queue_url, len(held), self.timeout, now - self._held_since)


class SqsSource:
    """One SQS queue, as a :class:`edp.daemon.Source`."""

    def __init__(
        self,
        queue_url: str,
        *,
        sqs: Any = None,
        wait_seconds: int = 20,
        max_messages: int = 10,
        visibility_timeout: int = 60,
        delete_poison: bool = True,
        eventbridge_keys_encoded: bool = True,
        fallback_region: str | None = None,
    ) -> None:
        if not 0 <= wait_seconds <= 20:
            raise ConfigError(f"sqs_wait_seconds must be 0..20, got {wait_seconds}")
        if not 1 <= max_messages <= BATCH_LIMIT:
            raise ConfigError(f"sqs_max_messages must be 1..10, got {max_messages}")
        self.queue_url = queue_url
        self.name = f"sqs:{queue_url}"
        region = region_of_queue_url(queue_url)
        self.sqs = sqs if sqs is not None else make_client(
            "sqs", region=region, fallback_region=fallback_region,
        )
        # Receives have a client of their own, which tries once, with a read timeout
        # of the long poll and a margin (and 5 s to connect): the daemon tries again,
        # and a stop never waits for botocore's retries of a stalled receive (see
        # docs/aws-runtime.md: the stop's budget). A failed receive may have taken
        # messages (the answer was lost): the daemon then holds (ReceiveFailed).
        self.receiver = sqs if sqs is not None else make_client(
            "sqs", region=region, fallback_region=fallback_region,
            read_timeout=wait_seconds + RECEIVE_MARGIN - CONNECT_TIMEOUT, max_attempts=0,
        )
        self.wait_seconds = wait_seconds
        self.max_messages = max_messages
        self.visibility_timeout = visibility_timeout
        self.redelivery_delay = float(visibility_timeout)
        """After a crash in the middle of a step, how long until what it had received
        can be received again (see :meth:`edp.daemon.Daemon.run`)."""
        self.delete_poison = delete_poison
        self.eventbridge_keys_encoded = eventbridge_keys_encoded
        self.keeper = VisibilityKeeper(self.sqs, queue_url, visibility_timeout)

    @classmethod
    def from_settings(cls, queue_url: str, settings: Settings, *, sqs: Any = None) -> SqsSource:
        """A source for ``queue_url`` configured by the ``sqs_*`` settings."""
        return cls(
            queue_url,
            sqs=sqs,
            wait_seconds=settings.sqs_wait_seconds,
            max_messages=settings.sqs_max_messages,
            visibility_timeout=settings.sqs_visibility_timeout,
            delete_poison=settings.sqs_delete_poison,
            eventbridge_keys_encoded=not settings.eventbridge_raw_keys,
            fallback_region=settings.region,
        )

    def check(self) -> dict[str, str]:
        """Fail early, with a clear message, when the queue is missing or unreadable.

        Returns the queue's attributes. Warns when poison messages are to be left
        to a redrive policy that the queue does not have.
        """
        try:
            attributes: dict[str, str] = self.sqs.get_queue_attributes(
                QueueUrl=self.queue_url, AttributeNames=["All"]
            )["Attributes"]
        except aws_errors() as exc:
            raise ConfigError(
                f"SQS queue {self.queue_url} cannot be used ({error_code(exc) or exc}); "
                "check the URL, the region and the credentials"
            ) from None
        if not self.delete_poison and "RedrivePolicy" not in attributes:
            log.warning(
                "sqs %s: sqs_delete_poison is off but the queue has no redrive policy: "
                "undecodable messages will come back until they expire", self.queue_url,
            )
        return attributes

    def receive(self, *, wait: float) -> Received:
        """Receive up to ``sqs_max_messages``, long-polling at most ``wait`` seconds.

        SQS waits in whole seconds; a shorter wait (the next deadline is near) is
        slept here, then the queue is polled without waiting. No wait at all (the
        daemon drains a backlog) is a poll of one second: a long poll asks every SQS
        server and returns as soon as one has messages, where a short poll asks some
        and may come back empty from a queue that still holds a backlog's tail (the
        daemon would take it for caught up and move its clock to the wall clock).
        """
        self.keeper.release()  # an unacknowledged previous receive is abandoned
        wait = max(0.0, min(wait, float(self.wait_seconds)))
        if 0 < wait < 1:
            time.sleep(wait)
        seconds = int(wait) if wait > 0 else min(1, self.wait_seconds)
        try:
            response = self.receiver.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=self.max_messages,
                WaitTimeSeconds=seconds,
                VisibilityTimeout=self.visibility_timeout,
                MessageSystemAttributeNames=["ApproximateReceiveCount"],
            )
        except aws_errors() as exc:  # the daemon logs it and backs off
            raise ReceiveFailed(f"cannot receive from SQS queue {self.queue_url}: {exc}",
                                maybe_taken=_maybe_served(exc)) from exc
        raw: list[dict[str, Any]] = response.get("Messages", [])
        messages: list[Message] = []
        receipts: list[SqsReceipt] = []
        of_message: list[SqsReceipt] = []
        for item in raw:
            message = Message(
                body=item.get("Body", ""),
                location=f"message id {item['MessageId']}",
                source=self.name,
            )
            poison = None if self.delete_poison else self._poison(message)
            receipts.append(SqsReceipt(item["MessageId"], item["ReceiptHandle"],
                                       poison is not None, poison == "part"))
            if poison == "whole" and int(
                item.get("Attributes", {}).get("ApproximateReceiveCount", "1")
            ) > 1:
                # Nothing in it can be batched: it was dead-lettered on its first receive
                # (unless that step failed: SQS's own dead-letter queue keeps it anyway),
                # now it only waits for the redrive. A message with good records among
                # bad ones always goes to the engine: its good records must not be lost
                # to a first step that failed (a re-delivery counts them once).
                continue
            messages.append(message)
            of_message.append(receipts[-1])
        self.keeper.hold(receipts)
        return Received(messages, caught_up=len(raw) < self.max_messages, receipts=list(receipts),
                        message_receipts=of_message)

    def ack(self, received: Received) -> None:
        """Delete what the engine committed (poison too, unless left to the redrive policy)."""
        self.keeper.release()
        receipts = [r for r in received.receipts if isinstance(r, SqsReceipt)]
        for receipt in receipts:
            if receipt.poison:
                log.warning(
                    "sqs %s: message id %s %s (see `edp dead-letters`); left to the queue's "
                    "redrive policy", self.queue_url, receipt.message_id,
                    "holds records that could not be decoded (its other records count, "
                    "once)" if receipt.partly else "could not be decoded",
                )
        self.delete([r for r in receipts if not r.poison])

    def delete(self, receipts: Sequence[SqsReceipt]) -> int:
        """Delete messages; returns how many were deleted.

        A failed delete is logged, not raised: the message comes back later and
        the engine recognises it as a duplicate.
        """
        deleted = 0
        for chunk in _chunks(receipts, BATCH_LIMIT):
            try:
                response = self.sqs.delete_message_batch(
                    QueueUrl=self.queue_url,
                    Entries=[
                        {"Id": str(i), "ReceiptHandle": r.handle} for i, r in enumerate(chunk)
                    ],
                )
            except aws_errors() as exc:  # the step is committed already: log, go on
                log.warning("sqs %s: cannot delete %d messages (they will come again): %s",
                            self.queue_url, len(chunk), exc)
                continue
            deleted += len(response.get("Successful", []))
            for failed in response.get("Failed", []):
                log.warning("sqs %s: cannot delete message %s (it will come again): %s",
                            self.queue_url, chunk[int(failed["Id"])].message_id,
                            failed.get("Message") or failed.get("Code"))
        return deleted

    def close(self) -> None:
        """Stop the visibility thread and close the HTTP connections."""
        self.keeper.close()
        for client in (self.sqs, self.receiver):  # (one client twice: closing is idempotent)
            closer = getattr(client, "close", None)
            if callable(closer):
                closer()

    def _poison(self, message: Message) -> str | None:
        """Whether the engine will dead-letter this message: ``whole``, in ``part`` (bad
        records among good ones), or not at all (None).

        Only asked when poison is left to the redrive policy; decoding is pure, so
        this agrees with what the engine does with the same message.
        """
        try:
            decoded = decode_message(
                message.body, location=message.location,
                eventbridge_keys_encoded=self.eventbridge_keys_encoded,
            )
        except DecodeError:
            return "whole"
        if not decoded.errors:
            return None
        return "part" if decoded.events else "whole"


def _maybe_served(exc: Exception) -> bool:
    """Whether a receive that failed with ``exc`` may have reached the queue (which then
    hid the messages it handed out): only when the connection failed mid-request (a
    read timeout, a connection closed); not when connecting failed, the queue answered
    with an error, or the request was never made (no credentials, a bad parameter)."""
    from botocore.exceptions import ConnectionError, HTTPClientError

    return isinstance(exc, HTTPClientError) and not isinstance(exc, ConnectionError)


def _chunks(items: Sequence[SqsReceipt], size: int) -> Iterator[Sequence[SqsReceipt]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


__all__ = ["SqsReceipt", "SqsSource", "VisibilityKeeper"]
