"""The SNS sink: every outbox event published to a topic.

The message is the event JSON exactly as stored (the whole EventBridge envelope,
with its stable ``id``). The subject, for e-mail subscribers, reads like
``edp package-objects-ready bucket/prefix/``: SNS wants fewer than 100 characters
of plain text, so it is transliterated to ASCII and cut. Message attributes carry
``detail-type``, ``source`` and ``bucket`` for subscription filter policies.

Events go out with ``PublishBatch`` (same ``sns:Publish`` permission), at most 10
per call and 256 KB per call. An entry SNS refuses as the sender's fault (too
large, invalid) is permanent; other failures are retried by the relay. On a FIFO
topic (``.fifo``) the event id is the deduplication id.
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Sequence
from typing import Any

import orjson

from edp.aws import clients
from edp.aws.clients import aws_errors, error_code, region_of_arn
from edp.aws.clients import client as make_client
from edp.errors import ConfigError, SinkError
from edp.sinks._calls import Prepared, send_in_calls
from edp.sinks.base import Failure
from edp.store.base import OutboxEntry

log = logging.getLogger(__name__)

MAX_ENTRIES = 10
MAX_SIZE = 256 * 1024
MAX_SUBJECT = 99
"""SNS: "less than 100 characters"."""


def subject_for(envelope: dict[str, Any]) -> str:
    """A short ASCII subject naming the event: ``edp <detail-type> <bucket>/<prefix>``."""
    detail = envelope.get("detail") or {}
    where = str(detail.get("bucket", ""))
    if "prefix" in detail:
        where += f"/{detail['prefix']}"
    elif "package-name" in detail:
        where += f" {detail['package-name']}"
    return ascii_subject(f"edp {envelope.get('detail-type', 'event')} {where}".strip())


def ascii_subject(text: str, limit: int = MAX_SUBJECT) -> str:
    """``text`` as one line of printable ASCII of at most ``limit`` characters."""
    folded = unicodedata.normalize("NFKD", text)
    chars = []
    for char in folded:
        if unicodedata.combining(char):
            continue
        if char in "\r\n\t" or not char.isprintable():
            chars.append(" ")
        elif ord(char) < 128:
            chars.append(char)
        else:
            chars.append("?")
    line = " ".join("".join(chars).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class SnsSink:
    """Publishes outbox events to an SNS topic (ARN)."""

    name = "sns"

    def __init__(
        self, topic_arn: str, *, sns: Any = None, fallback_region: str | None = None
    ) -> None:
        self.topic_arn = topic_arn
        self.fifo = topic_arn.endswith(".fifo")
        self._sns = sns
        self._fallback_region = fallback_region

    @property
    def sns(self) -> Any:
        """The boto3 ``sns`` client, made on first use (in the topic's region)."""
        if self._sns is None:
            self._sns = make_client(
                "sns", region=region_of_arn(self.topic_arn), fallback_region=self._fallback_region,
                read_timeout=clients.SINK_READ_TIMEOUT, max_attempts=0,
            )
        return self._sns

    def check(self) -> None:
        """Fail early, with a clear message, when the topic does not exist; say so (a
        warning) when it cannot be checked (no sns:GetTopicAttributes)."""
        try:
            self.sns.get_topic_attributes(TopicArn=self.topic_arn)
        except aws_errors() as exc:
            code = error_code(exc)
            if code in ("NotFound", "NotFoundException"):
                raise ConfigError(f"sns_topic {self.topic_arn} does not exist: create it, "
                                  "or fix the ARN") from None
            log.warning("sns_topic %s could not be checked (%s); events are published to "
                        "it anyway", self.topic_arn, code or type(exc).__name__)

    def send(self, entries: Sequence[OutboxEntry]) -> Sequence[Failure]:
        """Publish ``entries``, 10 (and at most 256 KB) per call."""
        return send_in_calls(
            entries, prepare=self._request, size_of=_size, call=self._publish, service="SNS",
            max_entries=MAX_ENTRIES, max_size=MAX_SIZE,
        )

    def _request(self, outbox: OutboxEntry) -> dict[str, Any]:
        envelope = orjson.loads(outbox.payload)
        if not isinstance(envelope, dict):
            raise ValueError("the payload is not a JSON object")
        attributes = {
            name: {"DataType": "String", "StringValue": str(value)}
            for name, value in (
                ("detail-type", envelope.get("detail-type")),
                ("source", envelope.get("source")),
                ("bucket", (envelope.get("detail") or {}).get("bucket")),
            )
            if value
        }
        request: dict[str, Any] = {
            "Message": outbox.payload,
            "Subject": subject_for(envelope),
            "MessageAttributes": attributes,
        }
        if self.fifo:
            request["MessageGroupId"] = str((envelope.get("detail") or {}).get("bucket") or "edp")
            request["MessageDeduplicationId"] = outbox.event_id
        return request

    def _publish(self, call: list[Prepared]) -> list[Failure]:
        try:
            response = self.sns.publish_batch(
                TopicArn=self.topic_arn,
                PublishBatchRequestEntries=[
                    {"Id": str(i), **request} for i, (_, request, _) in enumerate(call)
                ],
            )
        except aws_errors() as exc:
            raise SinkError(
                f"SNS PublishBatch to {self.topic_arn} failed: "
                f"{error_code(exc) or type(exc).__name__}: {exc}"
            ) from exc
        failures = []
        for failed in response.get("Failed", []):
            outbox = call[int(failed["Id"])][0]
            failures.append(Failure(
                outbox.event_id,
                f"SNS {failed.get('Code', 'error')}: {failed.get('Message', '')}".strip(),
                permanent=bool(failed.get("SenderFault")),
            ))
        return failures


def _size(request: dict[str, Any]) -> int:
    size = len(request["Message"].encode()) + len(request["Subject"].encode())
    for name, value in request["MessageAttributes"].items():
        size += len(name.encode()) + len(value["DataType"]) + len(value["StringValue"].encode())
    return size


__all__ = ["SnsSink", "ascii_subject", "subject_for"]
