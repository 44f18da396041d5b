"""Helpers of the ``edp bundle`` tests (constants, moto clients, resource names)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edp_testing import unique

REGION = "us-east-1"
ACCOUNT = "123456789012"
LOCAL_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def wheelhouse(root: Path, arch: str, python_version: str) -> Path:
    """The wheelhouse of one target inside the session's root."""
    return root / f"{arch}-cp{python_version.replace('.', '')}"


@dataclass
class Aws:
    """boto3 clients on the moto server."""

    s3: Any
    sqs: Any
    events: Any
    secrets: Any

    def queue(self, name: str) -> tuple[str, str]:
        """A new queue: (url, arn)."""
        url = self.sqs.create_queue(QueueName=unique(name))["QueueUrl"]
        attributes = self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
        return url, attributes["Attributes"]["QueueArn"]

    def bucket(self) -> str:
        """A new bucket that sends its events to EventBridge."""
        name = unique("bkt")
        self.s3.create_bucket(Bucket=name)
        self.s3.put_bucket_notification_configuration(
            Bucket=name, NotificationConfiguration={"EventBridgeConfiguration": {}}
        )
        return name

    def s3_events_to_queue(self, bucket: str) -> tuple[str, str]:
        """deploy/edp.yaml's S3EventsRule (default bus) into a new queue: (url, arn)."""
        url, arn = self.queue("ingest")
        rule = unique("s3-events")
        self.events.put_rule(Name=rule, EventPattern=json.dumps({
            "source": ["aws.s3"], "detail-type": ["Object Created", "Object Deleted"],
            "detail": {"bucket": {"name": [bucket]}},
        }))
        self.events.put_targets(Rule=rule, Targets=[{"Id": "ingest", "Arn": arn}])
        return url, arn

    def edp_bus_to_queue(self, bucket: str, *, source: str) -> tuple[str, str]:
        """A custom bus whose rule (the seeds' pattern) feeds a new queue: (bus, queue url)."""
        bus = unique("quilt-edp")
        self.events.create_event_bus(Name=bus)
        url, arn = self.queue("out")
        rule = unique("ready")
        self.events.put_rule(Name=rule, EventBusName=bus, EventPattern=json.dumps({
            "detail-type": ["package-objects-ready"], "source": [source],
            "detail": {"bucket": [bucket]},
        }))
        self.events.put_targets(Rule=rule, EventBusName=bus, Targets=[{"Id": "out", "Arn": arn}])
        return bus, url

    def receive(self, url: str, count: int, *, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Receive (and delete) messages until ``count`` arrived or ``timeout`` passed."""
        messages: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(messages) < count and time.monotonic() < deadline:
            response = self.sqs.receive_message(
                QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                AttributeNames=["All"], MessageAttributeNames=["All"],
            )
            for message in response.get("Messages", []):
                messages.append(message)
                self.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
        return messages
