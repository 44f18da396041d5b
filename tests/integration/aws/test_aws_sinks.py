"""The network sinks against moto (EventBridge, SNS) and a local HTTP server (webhook)."""

from __future__ import annotations

import base64
import json
import logging
import socket
import time
import uuid
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest

from edp.errors import ConfigError, SinkError
from edp.relay import Relay
from edp.sinks.eventbridge import EventBridgeSink
from edp.sinks.sns import SnsSink, ascii_subject
from edp.sinks.webhook import WebhookSink
from edp.store import open_store
from edp.store.base import OutboxEntry, Store
from edp_testing import RecordingEndpoint, http_server


def envelope(bucket: str, prefix: str, **detail: Any) -> dict[str, Any]:
    return {
        "version": "0", "id": str(uuid.uuid4()), "detail-type": "package-objects-ready",
        "source": "com.quiltdata.edp", "account": "123456789012",
        "time": "2024-05-02T10:15:00Z", "region": "us-east-1",
        "resources": [f"arn:aws:s3:::{bucket}"],
        "detail": {"version": "0.1", "bucket": bucket, "prefix": prefix, "object-count": 3,
                   "trigger": "count", "batch-id": str(uuid.uuid4()), **detail},
    }


def entry(event: dict[str, Any], seq: int = 1) -> OutboxEntry:
    return OutboxEntry(seq, event["id"], event["detail-type"], json.dumps(event), 0.0)


def outbox(sink: str, events: list[dict[str, Any]]) -> Store:
    """A real store whose outbox holds ``events`` for ``sink``."""
    store = open_store("sqlite:///:memory:")
    with store.transaction() as tx:
        for event in events:
            tx.add_outbox(event_id=event["id"], kind=event["detail-type"],
                          payload=json.dumps(event), sinks=[sink], now=time.time())
    return store


def deliver_until_done(relay: Relay, store: Store, sink: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        relay.deliver()
        if not store.pending(sink, limit=1, now=time.time() + 3600):
            return
        time.sleep(0.05)


# -- EventBridge -------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_eventbridge_sends_many_events_in_calls_of_ten(aws: Any) -> None:
    # Given 23 events for one bucket, and a bus whose rule feeds a queue
    bucket = aws.bucket()
    out_url, out_arn = aws.queue("out")
    bus = aws.edp_bus(bucket, out_arn)
    events = [envelope(bucket, f"p/{n}/") for n in range(23)]

    # When the sink sends them
    failures = EventBridgeSink(bus).send([entry(e, n) for n, e in enumerate(events)])

    # Then all arrive, with the envelope's fields and the stable id in the detail
    assert failures == []
    received = aws.collect(out_url, 23, linger=0.5)
    assert sorted(r["detail"]["event-id"] for r in received) == sorted(e["id"] for e in events)
    sample = next(r for r in received if r["detail"]["event-id"] == events[0]["id"])
    assert sample["time"] == "2024-05-02T10:15:00Z"
    assert sample["resources"] == [f"arn:aws:s3:::{bucket}"]
    assert sample["detail"]["prefix"] == "p/0/"


@pytest.mark.timeout(60)
def test_eventbridge_refuses_an_oversized_entry_for_good_and_sends_the_rest(aws: Any) -> None:
    bucket = aws.bucket()
    out_url, out_arn = aws.queue("out")
    bus = aws.edp_bus(bucket, out_arn)
    small = [envelope(bucket, "a/b/"), envelope(bucket, "c/d/")]
    big = envelope(bucket, "e/f/", notes="x" * 300_000)

    failures = EventBridgeSink(bus).send([entry(small[0]), entry(big), entry(small[1])])

    assert [(f.event_id, f.permanent) for f in failures] == [(big["id"], True)]
    assert "256 KB" in failures[0].error
    assert len(aws.collect(out_url, 2, linger=0.5)) == 2


@pytest.mark.timeout(60)
def test_eventbridge_raises_when_the_bus_is_missing(aws: Any) -> None:
    with pytest.raises(SinkError, match="no-such-bus"):
        EventBridgeSink("no-such-bus").send([entry(envelope("b", "p/"))])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("service", ["eventbridge", "sns"])
def test_an_endpoint_that_stops_answering_is_tried_once_per_send(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from edp.aws import clients

    # Given an endpoint that reads requests and never answers (an AWS endpoint or a
    # proxy hung), with a short read timeout for the test
    requests: list[bytes] = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    held: list[socket.socket] = []

    def hang() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)
            requests.append(conn.recv(65536))

    threading.Thread(target=hang, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
    for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"
                        }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(clients, "SINK_READ_TIMEOUT", 1.0)
    sink = (EventBridgeSink("edp-bus") if service == "eventbridge"
            else SnsSink("arn:aws:sns:us-east-1:123456789012:edp-events"))
    try:
        # When the sink sends, Then it gives up after one try (the relay retries later,
        # with backoff; botocore's retries held the worker's main thread for minutes)
        with pytest.raises(SinkError):
            sink.send([entry(envelope("b", "p/"))])
        assert len(requests) == 1, requests
    finally:
        server.close()
        for conn in held:
            conn.close()


# -- SNS ---------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_sns_publishes_every_event_with_a_short_ascii_subject(aws: Any) -> None:
    # Given a topic with a queue subscribed, and 12 events, one with a long prefix
    out_url, out_arn = aws.queue("sns-out")
    topic = aws.sns_to_queue(out_arn)
    long_prefix = "Überlange Verzeichnisse/" * 8
    events = [envelope("bkt", f"p/{n}/") for n in range(11)] + [envelope("bkt", long_prefix)]

    # When the sink publishes them
    failures = SnsSink(topic).send([entry(e, n) for n, e in enumerate(events)])

    # Then each arrives once, whole, with attributes and a subject SNS accepts
    assert failures == []
    received = aws.collect(out_url, 12, linger=0.5)
    assert sorted(json.loads(r["Message"])["id"] for r in received) == sorted(
        e["id"] for e in events
    )
    subjects = [r["Subject"] for r in received]
    assert all(len(s) < 100 and s.isascii() for s in subjects)
    assert "edp package-objects-ready bkt/p/0/" in subjects
    assert any(s.startswith("edp package-objects-ready bkt/Uberlange") and s.endswith("...")
               for s in subjects)
    attributes = received[0]["MessageAttributes"]
    assert attributes["detail-type"]["Value"] == "package-objects-ready"
    assert attributes["source"]["Value"] == "com.quiltdata.edp"


@pytest.mark.timeout(60)
def test_sns_refuses_an_oversized_message_for_good(aws: Any) -> None:
    _, out_arn = aws.queue("sns-out")
    topic = aws.sns_to_queue(out_arn)
    big = envelope("bkt", "p/", notes="x" * 300_000)
    [failure] = SnsSink(topic).send([entry(big)])
    assert failure.permanent and failure.event_id == big["id"]


def test_ascii_subject() -> None:
    assert ascii_subject("edp x  y\nz") == "edp x y z"
    assert ascii_subject("café 日本") == "cafe ??"
    assert len(ascii_subject("a" * 300)) == 99


# -- webhook -----------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_webhook_signs_and_retries_until_delivered(webhook: Any) -> None:
    # Given a receiver that answers 503, then 429, then accepts
    webhook.statuses += [503, 429]
    events = [envelope("bkt", "a/"), envelope("bkt", "b/")]
    store = outbox("webhook", events)
    relay = Relay(store, [WebhookSink(webhook.url, secret=webhook.secret)], base_backoff=0.01)

    # When the relay delivers
    deliver_until_done(relay, store, "webhook")

    # Then each event arrived signed, in order, once accepted
    assert [e["id"] for e in webhook.valid()] == [e["id"] for e in events]
    assert [r["status"] for r in webhook.received][:2] == [503, 429]
    store.close()


@pytest.mark.timeout(30)
def test_webhook_client_errors_are_permanent(webhook: Any) -> None:
    # Given a receiver that refuses the first event (400)
    webhook.statuses += [400]
    events = [envelope("bkt", "a/"), envelope("bkt", "b/")]
    store = outbox("webhook", events)
    relay = Relay(store, [WebhookSink(webhook.url, secret=webhook.secret)], base_backoff=0.01)

    # When the relay delivers
    report = relay.deliver()

    # Then the refused one is parked (not retried) and the next is delivered
    assert (report.parked, report.delivered) == (1, 1)
    assert [e["id"] for e in webhook.valid()] == [events[1]["id"]]
    assert relay.deliver().delivered == 0
    store.close()


@pytest.mark.timeout(30)
def test_webhook_unreachable_is_retried_and_logs_no_secret(caplog: Any) -> None:
    # Given a webhook URL with credentials, on a port where nothing listens
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://user:hunter2@127.0.0.1:{port}/services/T0/path-t0k3n?token=abc"
    sink = WebhookSink(url, secret="top-secret", timeout=2)
    events = [envelope("bkt", "a/"), envelope("bkt", "b/")]

    # When it sends, with logging on
    caplog.set_level(logging.DEBUG)
    failures = sink.send([entry(e) for e in events])
    store = outbox("webhook", events)
    Relay(store, [sink]).deliver()
    store.close()

    # Then both failed for now (retried later), and no secret shows anywhere
    assert [(f.event_id, f.permanent) for f in failures] == [(e["id"], False) for e in events]
    shown = caplog.text + " ".join(f.error for f in failures)
    for secret in ("hunter2", "top-secret", "token=abc", "path-t0k3n"):  # chat webhooks
        assert secret not in shown                                       # put it in the path


@pytest.mark.timeout(30)
def test_webhook_credentials_in_the_url_are_sent_as_basic_authentication() -> None:
    # Given a webhook URL with a user and a percent-encoded password
    endpoint = RecordingEndpoint.fresh()
    with http_server(endpoint) as url:
        address = url.replace("http://", "http://alice:S3cret%20Pw%40x@")
        # When an event is sent
        failures = WebhookSink(f"{address}/hook", timeout=5).send([entry(envelope("b", "a/"))])
    # Then it arrived with HTTP Basic credentials, and the address carried none
    assert failures == []
    [(status, headers, _)] = endpoint.seen
    assert status == 200
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"alice:S3cret Pw@x").decode()
    assert "alice" not in headers["Host"]


class Trickle(BaseHTTPRequestHandler):
    """Answers 200, a byte every 0.3 s (each read well within a 1 s socket timeout)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        try:
            for byte in answer:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.3)
        except OSError:
            return  # (cut off by the client)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.timeout(60)
def test_a_webhook_answering_a_byte_at_a_time_is_cut_off_at_the_timeout() -> None:
    # Given an endpoint whose answer takes ~12 s, a byte at a time, and a 1 s timeout
    with http_server(Trickle) as url:
        sink = WebhookSink(f"{url}/hook", timeout=1)
        # When an event is sent
        [failure] = sink.send([entry(envelope("b", "a/"))])
    # Then the POST gave up at the timeout, to be retried (not held the worker ~12 s
    # for a success)
    assert not failure.permanent
    assert "no whole answer within 1s" in failure.error


@pytest.mark.timeout(60)
def test_a_webhook_deadline_that_passes_while_connecting_still_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given the byte-at-a-time endpoint, reached over a network slow to connect (the
    # connection takes longer than the whole 1 s timeout: a slow name lookup, a proxy)
    slow_connect = socket.create_connection

    def create_connection(*args: Any, **kwargs: Any) -> socket.socket:
        time.sleep(1.3)
        return slow_connect(*args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", create_connection)
    with http_server(Trickle) as url:
        # When an event is sent, Then the POST gives up as soon as it connected
        started = time.monotonic()
        [failure] = WebhookSink(f"{url}/hook", timeout=1).send([entry(envelope("b", "a/"))])
        took = time.monotonic() - started
    assert "no whole answer within 1s" in failure.error
    assert took < 5, took  # (not the ~12 s of the answer)


def self_signed(directory: Any) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, as PEM files (cryptography comes with
    moto, which these tests need anyway)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


@pytest.mark.timeout(60)
def test_a_webhook_over_https_is_cut_off_at_the_timeout_too(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ssl

    # Given the byte-at-a-time endpoint over TLS, with a certificate edp trusts
    cert, key = self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", cert)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    endpoint = RecordingEndpoint.fresh()
    with http_server(endpoint, tls=context) as url:
        # Then an event is delivered over HTTPS
        assert WebhookSink(f"{url}/hook", timeout=5).send([entry(envelope("b", "a/"))]) == []
    assert url.startswith("https://") and len(endpoint.seen) == 1
    with http_server(Trickle, tls=context) as url:
        # And a slow answer is cut off at the timeout, as over HTTP
        [failure] = WebhookSink(f"{url}/hook", timeout=1).send([entry(envelope("b", "a/"))])
    assert "no whole answer within 1s" in failure.error


def test_webhook_refuses_other_schemes() -> None:
    with pytest.raises(ConfigError, match="http"):
        WebhookSink("file:///etc/passwd")
    with pytest.raises(ConfigError, match="spaces"):  # would fail every POST, for ever
        WebhookSink("https://hooks.example.com/a b")
    with pytest.raises(ConfigError, match=r"'hooks\.example\.com:443x'"):  # (and no password)
        WebhookSink("https://alice:pw@hooks.example.com:443x/edp")


class GarbageEndpoint(BaseHTTPRequestHandler):
    """Answers every POST with something that is not HTTP."""

    posts = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        type(self).posts += 1
        self.wfile.write(b"garbage\r\n\r\n")

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_garbled_answer_is_a_retry_later_not_a_crash_or_a_resend_loop() -> None:
    # Given a webhook endpoint that answers with garbage
    events = [envelope("bkt", "a/"), envelope("bkt", "b/")]
    store = outbox("webhook", events)
    endpoint = type("Garbage", (GarbageEndpoint,), {"posts": 0})
    with http_server(endpoint) as url:
        relay = Relay(store, [WebhookSink(f"{url}/hook", timeout=2)])
        # When the relay delivers, twice in a row
        first = relay.deliver()
        second = relay.deliver()
    # Then it neither raised nor sent again at once: one attempt, retried after a backoff
    assert (first.delivered, first.failed) == (0, 2)
    assert (second.delivered, second.failed, endpoint.posts) == (0, 0, 1)
    assert store.stats()["pending_deliveries"] == 2
    store.close()


def test_after_a_failure_no_later_event_overtakes_the_failed_one() -> None:
    # Given a webhook that fails the first event once (503), then takes everything
    events = [envelope("bkt", f"{n}/") for n in range(4)]
    store = outbox("webhook", events[:2])
    endpoint = RecordingEndpoint.fresh()
    endpoint.answers.append(503)
    clock = [1000.0]
    with http_server(endpoint) as url:
        relay = Relay(store, [WebhookSink(f"{url}/hook", timeout=2)], clock=lambda: clock[0])
        relay.deliver()
        # When more events arrive while the first waits for its retry, and time passes
        with store.transaction() as tx:
            for event in events[2:]:
                tx.add_outbox(event_id=event["id"], kind=event["detail-type"],
                              payload=json.dumps(event), sinks=["webhook"], now=clock[0])
        relay.deliver()
        clock[0] += 400  # past any backoff
        relay.deliver()
    # Then the endpoint received every event once after the failure, in order
    ids = [body["id"] for body in endpoint.bodies()]
    assert ids == [events[0]["id"], *(e["id"] for e in events)]
    store.close()


class PagedSink:
    """A destination that takes at most ``max_page`` events per send (and records sends)."""

    name = "paged"
    max_page = 2

    def __init__(self) -> None:
        self.sends: list[int] = []

    def send(self, entries: list[OutboxEntry]) -> list[Any]:
        self.sends.append(len(entries))
        return []


def test_a_sink_s_page_limit_bounds_what_the_relay_hands_it() -> None:
    # Given five events for a sink that wants pages of two
    store = outbox("paged", [envelope("bkt", f"{n}/") for n in range(5)])
    sink = PagedSink()
    # When the relay delivers
    report = Relay(store, [sink]).deliver()
    # Then it did, two at a time
    assert report.delivered == 5 and sink.sends == [2, 2, 1]
    store.close()


@pytest.mark.parametrize("timeout", [0.5, 2.0, 10.0, 30.0, 120.0])
def test_a_webhook_page_fits_in_the_delivery_lease(timeout: float) -> None:
    # One POST per event, each up to the timeout: a page must be sent within the
    # PostgreSQL store's delivery lease (60 s), or another relay takes it too
    sink = WebhookSink("https://hooks.example.com/x", timeout=timeout)
    assert sink.max_page >= 1
    assert sink.max_page == 1 or sink.max_page * timeout < 60
