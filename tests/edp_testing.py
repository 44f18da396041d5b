"""Helpers shared by edp's tests: building S3 events and running the engine."""

from __future__ import annotations

import json
import logging
import os
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote_plus

import orjson
import pytest

from edp.config import Settings
from edp.engine import Engine, Message
from edp.sinks.base import Failure
from edp.store import open_store
from edp.store.base import OutboxEntry

EVENTS_DIR = Path(__file__).parent / "events"
T0 = 1_700_000_000.0


def load_event(name: str) -> dict[str, Any]:
    """A sample payload from tests/events/."""
    data: dict[str, Any] = json.loads((EVENTS_DIR / name).read_text(encoding="utf-8"))
    return data


def iso(epoch: float) -> str:
    """Epoch seconds as an EventBridge time."""
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def eventbridge(
    key: str,
    t: float,
    *,
    bucket: str = "bucket",
    kind: str = "Object Created",
    sequencer: str | None = None,
    etag: str | None = "e",
    size: int | None = 1,
) -> dict[str, Any]:
    """An EventBridge S3 event as AWS sends it (key URL-encoded)."""
    obj: dict[str, Any] = {"key": quote_plus(key, safe="/")}
    if size is not None:
        obj["size"] = size
    if etag is not None:
        obj["etag"] = etag
    if sequencer is not None:
        obj["sequencer"] = sequencer
    return {
        "version": "0", "id": "x", "detail-type": kind, "source": "aws.s3",
        "account": "123456789012", "time": iso(t), "region": "us-east-1",
        "resources": [f"arn:aws:s3:::{bucket}"],
        "detail": {"version": "0", "bucket": {"name": bucket}, "object": obj,
                   "reason": "PutObject"},
    }


def jsonl(events: Iterable[dict[str, Any]]) -> bytes:
    """JSON Lines bytes of events."""
    return b"".join(orjson.dumps(e) + b"\n" for e in events)


def settings(**values: Any) -> Settings:
    """Settings from defaults plus ``values`` (no file, no environment)."""
    return Settings(**{"database_url": "sqlite:///:memory:", **values})


class ListSink:
    """A sink that keeps what it was sent (and can be told to fail)."""

    def __init__(self, name: str = "list") -> None:
        self.name = name
        self.sent: list[dict[str, Any]] = []
        self.fail_next = 0

    def send(self, entries: Sequence[OutboxEntry]) -> Sequence[Failure]:
        """Keep the events, or fail them while ``fail_next`` > 0."""
        if self.fail_next > 0:
            self.fail_next -= 1
            return [Failure(e.event_id, "told to fail") for e in entries]
        self.sent.extend(orjson.loads(e.payload) for e in entries)
        return ()


class SlowSink(ListSink):
    """A sink that takes ``delay`` seconds per page (a slow webhook, a packager);
    ``max_page``: the events per page it asks the relay for."""

    def __init__(self, name: str, delay: float, *, max_page: int | None = None) -> None:
        super().__init__(name)
        self.delay = delay
        if max_page is not None:
            self.max_page = max_page

    def send(self, entries: Sequence[OutboxEntry]) -> Sequence[Failure]:
        time.sleep(self.delay)
        return super().send(entries)


def run_engine(
    events: Sequence[dict[str, Any]], cfg: Settings, *, chunk: int = 1000
) -> list[dict[str, Any]]:
    """Run events through a fresh engine on an in-memory store as a replay does."""
    store = open_store("sqlite:///:memory:")
    engine = Engine(store, cfg, sinks=["list"], worker_id="test")
    out: list[dict[str, Any]] = []
    for start in range(0, len(events), chunk):
        part = [
            Message(e, f"line {start + i + 1}")
            for i, e in enumerate(events[start : start + chunk])
        ]
        engine.process(part, now=T0)
    engine.finish(now=T0)
    out = [orjson.loads(e.payload) for e in store.pending("list", limit=10**9, now=T0)]
    store.close()
    return out


@contextmanager
def http_server(
    handler: type[BaseHTTPRequestHandler], tls: ssl.SSLContext | None = None
) -> Iterator[str]:
    """Serve ``handler`` on 127.0.0.1 (a free port) in a thread, over TLS with a server
    context ``tls``; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class RecordingEndpoint(BaseHTTPRequestHandler):
    """Answers each POST with the next of ``answers`` (then 200) and keeps every request.

    Subclass it per test (``type("E", (RecordingEndpoint,), {"answers": [], "seen": []})``)
    so that tests do not share the lists.
    """

    answers: list[int]
    seen: list[tuple[int, dict[str, str], bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        status = self.answers.pop(0) if self.answers else 200
        self.seen.append((status, dict(self.headers), body))
        self.send_response(status)
        if status in (301, 302, 303, 307, 308):
            self.send_header("Location", "/elsewhere")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    @classmethod
    def bodies(cls) -> list[Any]:
        """The JSON bodies received, in order."""
        return [json.loads(body) for _, _, body in cls.seen]

    @classmethod
    def fresh(cls) -> type[RecordingEndpoint]:
        """A subclass with lists of its own."""
        return type("Endpoint", (cls,), {"answers": [], "seen": []})


def missing(reason: str) -> NoReturn:
    """A test's prerequisite is missing: fail under CI (``CI`` set), skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"CI needs this: {reason}")
    pytest.skip(reason)


def interruptible() -> None:
    """``preexec_fn`` of a process a test will Ctrl-C: SIGINT as a terminal gives it. A
    test run started in the background by a shell without job control inherits SIGINT
    ignored, and Python then leaves it ignored (the child would never see Ctrl-C)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def unique(prefix: str) -> str:
    """A resource name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@contextmanager
def moto_server() -> Iterator[str]:
    """moto in server mode on 127.0.0.1 (a free port), real HTTP; yields its URL."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        missing("moto[server] is not installed: pip install -e '.[aws,dev]'")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def fake_aws_environment(endpoint: str, home: Path, region: str = "us-east-1") -> dict[str, str]:
    """AWS variables for the moto server at ``endpoint``: fake credentials, files in ``home``."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": region,
        "AWS_REGION": region,
        "AWS_CONFIG_FILE": str(home / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials"),
        "HOME": str(home),
    }


def wait_until(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class FailsOnKey:
    """A step observer that fails every step holding one key: a message that no retry
    can get through (the engine's own checks refuse every such input known today)."""

    def __init__(self, key: str, error: type[Exception] = RuntimeError) -> None:
        self.key = key
        self.error = error

    def observe(self, tx: Any, events: Any, *, clock: float, now: float, sinks: Any) -> None:
        if any(event.key == self.key for event in events):
            raise self.error(f"step fails on {self.key}")

    def tick(self, tx: Any, *, clock: float, now: float, sinks: Any) -> int:
        return 0

    def after_commit(self, store: Any, *, now: float, sinks: Any) -> int:
        return 0
