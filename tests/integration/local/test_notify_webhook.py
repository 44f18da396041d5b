"""Packaging notifications over a real HTTP endpoint on 127.0.0.1: signed, retried."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest

from edp.config import Settings
from edp.quilt.notify import Notice, WebhookNotifier, build_notifier
from edp_testing import RecordingEndpoint, http_server

pytestmark = pytest.mark.timeout(60)

NOTICE = Notice(kind="package-quarantined", package="instrument/exp-1", bucket="lab",
                prefix="instrument/exp-1/", registry="s3://reg", error="ProjectID missing")


@pytest.fixture
def endpoint() -> Iterator[tuple[str, type[RecordingEndpoint]]]:
    handler = RecordingEndpoint.fresh()
    with http_server(handler) as base:
        yield f"{base}/hook?token=t0ken", handler


def test_a_notice_is_signed_and_a_transient_failure_is_tried_again(
    endpoint: tuple[str, type[RecordingEndpoint]],
) -> None:
    # Given an endpoint that answers 503, then 200, and a secret
    url, handler = endpoint
    handler.answers = [503]
    settings = Settings(notify_webhook_url=url, webhook_secret="s3cret-key")
    # When a notice is sent
    errors = build_notifier(settings).notify(NOTICE)
    # Then it arrived on the second attempt, signed with the secret, as JSON
    assert errors == []
    assert [status for status, _, _ in handler.seen] == [503, 200]
    _, headers, body = handler.seen[-1]
    expected = hmac.new(b"s3cret-key", body, hashlib.sha256).hexdigest()
    assert headers["X-Edp-Signature"] == f"sha256={expected}"
    assert json.loads(body)["package"] == "instrument/exp-1"


def test_a_permanent_answer_or_a_redirect_is_not_retried_and_is_reported(
    endpoint: tuple[str, type[RecordingEndpoint]], caplog: pytest.LogCaptureFixture,
) -> None:
    # Given an endpoint that answers 400, then 302
    url, handler = endpoint
    handler.answers = [400, 302]
    notifier = WebhookNotifier(url, backoff=0.01)
    # When two notices are sent
    first, second = notifier.notify(NOTICE), notifier.notify(NOTICE)
    # Then each was tried once, reported, unsigned, and the URL's token is never logged
    assert (first, second) == (["webhook: HTTP 400"], ["webhook: HTTP 302"])
    assert [status for status, _, _ in handler.seen] == [400, 302]
    assert "X-Edp-Signature" not in handler.seen[0][1]
    assert "t0ken" not in caplog.text


def test_an_endpoint_that_keeps_failing_is_given_up_after_the_attempts(
    endpoint: tuple[str, type[RecordingEndpoint]],
) -> None:
    # Given an endpoint that answers 429 and 500 and 502
    url, handler = endpoint
    handler.answers = [429, 500, 502]
    # When a notice is sent with 3 attempts
    errors = WebhookNotifier(url, attempts=3, backoff=0.01).notify(NOTICE)
    # Then all three were used and the last answer is reported
    assert errors == ["webhook: HTTP 502"]
    assert len(handler.seen) == 3


def test_a_refused_connection_is_reported_without_the_url() -> None:
    # Given a port nobody listens on
    with http_server(RecordingEndpoint.fresh()) as base:
        port = int(base.rsplit(":", 1)[1])
    # When a notice is sent there
    errors = WebhookNotifier(f"http://127.0.0.1:{port}/x?token=t0ken", attempts=2,
                             backoff=0.01).notify(NOTICE)
    # Then the error names the failure, not the URL
    assert len(errors) == 1 and errors[0].startswith("webhook: ")
    assert "t0ken" not in errors[0]


class Garbage(BaseHTTPRequestHandler):
    """Answers every POST with something that is not HTTP."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.wfile.write(b"garbage\r\n\r\n")

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_an_answer_that_is_not_http_is_retried_and_reported_not_raised() -> None:
    # Given an endpoint that answers garbage
    with http_server(Garbage) as base:
        # When a notice is sent there
        errors = WebhookNotifier(f"{base}/hook", attempts=2, backoff=0.01).notify(NOTICE)
    # Then the notifier reports it (a notifier never raises: the package stands)
    assert len(errors) == 1 and errors[0].startswith("webhook: ")


def test_a_notice_names_where_the_files_are_and_links_only_to_a_bucket() -> None:
    from edp.quilt.notify import catalog_link

    # An S3 batch: its s3:// URL (the default when no source is given)
    assert NOTICE.text().startswith(
        "Package instrument/exp-1 from s3://lab/instrument/exp-1/ could not be pushed")
    # A local folder's batch: the folder, not an s3:// URL it never had
    local = dataclasses.replace(NOTICE, source="/data/lab/instrument/exp-1")
    assert local.text().startswith(
        "Package instrument/exp-1 from /data/lab/instrument/exp-1 could not be pushed")
    # A catalog shows buckets: a link for a bucket, none for a local registry's folder
    assert catalog_link("https://quilt.example.com/", "reg", "a/b") == (
        "https://quilt.example.com/b/reg/packages/a/b")
    assert catalog_link("https://quilt.example.com/", None, "a/b") is None
