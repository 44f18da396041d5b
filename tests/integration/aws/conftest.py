"""Fixtures of the AWS runtime tests.

One moto server per session, in server mode on 127.0.0.1 (real HTTP, port chosen by
the OS); every test gets fake credentials, ``AWS_ENDPOINT_URL`` pointing at that
server, its own HOME and data directory, no ``EDP_*`` variables from outside, and
unique resource names, so tests do not see each other's buckets and queues.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from edp_testing import fake_aws_environment, http_server, missing, moto_server, unique

REGION = "us-east-1"
SEEDS_SOURCE = "com.quiltdata.edp"


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A moto server for the whole session: ``http://127.0.0.1:PORT``."""
    if importlib.util.find_spec("boto3") is None:
        missing("boto3 is not installed (pip install -e '.[aws,dev]')")
    with moto_server() as url:
        yield url


@pytest.fixture(autouse=True)
def aws_env(
    moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """The environment of a test (and of the `edp` processes it starts)."""
    home = tmp_path / "home"
    home.mkdir()
    for name in list(os.environ):
        if name.startswith(("EDP_", "AWS_")):
            monkeypatch.delenv(name)
    values = {
        **fake_aws_environment(moto_endpoint, home, REGION),
        "XDG_DATA_HOME": str(home / "data"),
        "QUILT_DISABLE_USAGE_METRICS": "true",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    return values


@dataclass
class Aws:
    """boto3 clients on the moto server, and helpers to build the plumbing of a test."""

    s3: Any
    sqs: Any
    sns: Any
    events: Any

    def queue(self, name: str = "q", **attributes: str) -> tuple[str, str]:
        """A new queue: (url, arn)."""
        url = self.sqs.create_queue(QueueName=unique(name), Attributes=attributes)["QueueUrl"]
        arn = self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
        return url, arn["Attributes"]["QueueArn"]

    def bucket(self) -> str:
        """A new, empty bucket."""
        name = unique("bkt")
        self.s3.create_bucket(Bucket=name)
        return name

    def s3_events_via_eventbridge(self, bucket: str, queue_arn: str) -> None:
        """EventBridge notifications on, and a default-bus rule sending Object Created to SQS."""
        self.s3.put_bucket_notification_configuration(
            Bucket=bucket, NotificationConfiguration={"EventBridgeConfiguration": {}}
        )
        rule = unique("s3-rule")
        self.events.put_rule(Name=rule, EventPattern=json.dumps({
            "source": ["aws.s3"], "detail-type": ["Object Created"],
            "detail": {"bucket": {"name": [bucket]}},
        }))
        self.events.put_targets(Rule=rule, Targets=[{"Id": "ingest", "Arn": queue_arn}])

    def s3_events_to_queue(self, bucket: str, queue_arn: str) -> None:
        """S3 Event Notifications straight to SQS."""
        self.s3.put_bucket_notification_configuration(
            Bucket=bucket,
            NotificationConfiguration={"QueueConfigurations": [
                {"QueueArn": queue_arn, "Events": ["s3:ObjectCreated:*"]}
            ]},
        )

    def s3_events_via_sns(self, bucket: str, queue_arn: str) -> str:
        """S3 Event Notifications to an SNS topic, subscribed by the queue; returns the topic."""
        topic = self.sns.create_topic(Name=unique("s3-topic"))["TopicArn"]
        self.sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn)
        self.s3.put_bucket_notification_configuration(
            Bucket=bucket,
            NotificationConfiguration={"TopicConfigurations": [
                {"TopicArn": topic, "Events": ["s3:ObjectCreated:*"]}
            ]},
        )
        return topic

    def edp_bus(self, bucket: str, queue_arn: str) -> str:
        """A custom bus with the seeds' rule (detail-type, source, detail.bucket) to SQS."""
        bus = unique("edp-bus")
        self.events.create_event_bus(Name=bus)
        rule = unique("edp-rule")
        self.events.put_rule(Name=rule, EventBusName=bus, EventPattern=json.dumps({
            "detail-type": ["package-objects-ready"], "source": [SEEDS_SOURCE],
            "detail": {"bucket": [bucket]},
        }))
        self.events.put_targets(
            Rule=rule, EventBusName=bus, Targets=[{"Id": "out", "Arn": queue_arn}]
        )
        return bus

    def sns_to_queue(self, queue_arn: str) -> str:
        """A topic with the queue subscribed (SNS envelopes, not raw)."""
        topic = self.sns.create_topic(Name=unique("edp-topic"))["TopicArn"]
        self.sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn)
        return topic

    def put(self, bucket: str, *keys: str, body: bytes = b"data") -> float:
        """Upload objects; returns the time after the last upload."""
        for key in keys:
            self.s3.put_object(Bucket=bucket, Key=key, Body=body)
        return time.time()

    def collect(
        self, queue_url: str, count: int, *, timeout: float = 20.0, linger: float = 1.5,
        unwrap_sns: bool = False, raw: bool = False,
    ) -> list[Any]:
        """Receive (and delete) messages until ``count`` arrived, then ``linger`` for extras."""
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        extra_until: float | None = None
        while time.monotonic() < (extra_until or deadline):
            response = self.sqs.receive_message(
                QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1
            )
            for message in response.get("Messages", []):
                if raw:
                    out.append(message["Body"])
                else:
                    body = json.loads(message["Body"])
                    out.append(json.loads(body["Message"]) if unwrap_sns else body)
                self.sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
            if len(out) >= count and extra_until is None:
                extra_until = time.monotonic() + linger
        return out


@pytest.fixture
def aws() -> Aws:
    """boto3 clients on the moto server."""
    import boto3

    return Aws(
        s3=boto3.client("s3"), sqs=boto3.client("sqs"),
        sns=boto3.client("sns"), events=boto3.client("events"),
    )


# -- edp run in a subprocess --------------------------------------------------------
EDP = [sys.executable, "-c", "from edp.cli import main; main()"]


@dataclass
class EdpProcess:
    """A running `edp` command, with its output in files."""

    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then wait; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def kill(self) -> None:
        """SIGKILL: no chance to clean up."""
        self.process.kill()
        self.process.wait()

    def log(self) -> str:
        """What it wrote on stderr."""
        return self.stderr.read_text(errors="replace")


@pytest.fixture
def start_edp(tmp_path: Path) -> Iterator[Any]:
    """Start `edp ARGS...` with the test's environment (plus ``env``); stopped at teardown."""
    started: list[EdpProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> EdpProcess:
        n = len(started)
        out, err = tmp_path / f"edp-{n}.out", tmp_path / f"edp-{n}.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            process = subprocess.Popen(
                [*EDP, *args], env={**os.environ, **(env or {})}, stdout=stdout, stderr=stderr
            )
        started.append(EdpProcess(process, out, err))
        return started[-1]

    yield start
    for proc in started:
        if proc.process.poll() is None:
            proc.kill()


# -- a webhook receiver ----------------------------------------------------------
@dataclass
class Hook:
    """What the local webhook server received, and what it answers next."""

    url: str
    secret: str
    received: list[dict[str, Any]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    """Status codes to answer, first come first served; 200 when empty."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def valid(self) -> list[dict[str, Any]]:
        """Events received with a valid signature (and a matching event id header)."""
        with self.lock:
            return [r["event"] for r in self.received if r["signed"] and r["status"] == 200]


@pytest.fixture
def webhook() -> Iterator[Hook]:
    """An HTTP server on 127.0.0.1 that checks X-Edp-Signature with its secret."""
    hook = Hook(url="", secret=uuid.uuid4().hex)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            expected = "sha256=" + hmac.new(hook.secret.encode(), body, hashlib.sha256).hexdigest()
            given = self.headers.get("X-Edp-Signature", "")
            event = json.loads(body)
            signed = hmac.compare_digest(expected, given) and (
                self.headers.get("X-Edp-Event-Id") == event.get("id")
            )
            with hook.lock:
                status = hook.statuses.pop(0) if hook.statuses else 200
                hook.received.append({"event": event, "signed": signed, "status": status})
            self.send_response(status if signed else 401)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    with http_server(Handler) as base:
        hook.url = f"{base}/hooks/edp"
        yield hook


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A store of the test's own: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'edp.db'}"
        return
    from integration.postgres.pg_testing import fresh_database, require_server

    require_server()
    with fresh_database("aws") as url:
        yield url
