"""``edp package --sqs-queue URL``: package the events of an SQS queue.

A small receive loop (long polling, one message a receive: a message's visibility
timeout runs from its receive, so messages received together would wait for each
other's packages and could come back, to be packaged twice, while still waiting):
each message is packaged on its own and deleted only after its outcome is final
(pushed, unchanged, quarantined, skipped, or failed for a reason a retry cannot
fix). A retryable failure leaves the message in the queue: it comes back after the
queue's visibility timeout (which must exceed the time a package takes) and goes to the
queue's dead-letter queue after its redrive policy's attempts. A message that
fails for good (not JSON, not a batch event) is handed to ``dead_letter`` (the CLI
keeps it in the store's dead-letter table) before it is deleted, so nothing is lost.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from edp.quilt.packager import Packager, PackageResult

log = logging.getLogger(__name__)


def consume_queue(
    packager: Packager,
    queue_url: str,
    *,
    client: Any,
    on_result: Callable[[PackageResult], None],
    wait: int = 20,
    until_empty: bool = False,
    stop: threading.Event | None = None,
    dead_letter: Callable[[str, str, str], None] | None = None,
) -> int:
    """Receive, package and delete until ``stop`` is set (or the queue is empty, with
    ``until_empty``); returns the number of messages packaged."""
    stop = stop or threading.Event()
    handled = 0
    while not stop.is_set():
        response = client.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=1, WaitTimeSeconds=0 if until_empty else wait,
        )
        messages = response.get("Messages", [])
        if not messages and until_empty:
            break
        for message in messages:
            # (a failure is logged once, below, with what becomes of its message)
            result = packager.package(message.get("Body", ""), report_failure=False)
            handled += 1
            on_result(result)
            if not result.ok and not result.retryable and dead_letter is not None:
                dead_letter(str(message.get("Body", "")),
                            f"message id {message.get('MessageId')}", result.error or "failed")
            if result.ok or not result.retryable:
                client.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
            if not result.ok:
                log.log(logging.WARNING if result.retryable else logging.ERROR,
                        "message %s (package %s, bucket=%s prefix=%s batch_id=%s) %s: %s",
                        message.get("MessageId"), result.package or "-", result.bucket,
                        result.prefix, result.batch_id,
                        "kept in the queue for a retry" if result.retryable
                        else "failed for good, deleted from the queue"
                        + (" (kept as a dead letter)" if dead_letter is not None else ""),
                        result.error)
            if stop.is_set():
                break
    return handled


__all__ = ["consume_queue"]
