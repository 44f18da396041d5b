"""What a webhook URL is told at start (the sink and the packager's notifier share it)."""

from __future__ import annotations

import logging

import pytest

from edp.sinks.webhook import WebhookSink


@pytest.mark.parametrize(("url", "warned"), [
    ("http://edp:s3cret@hooks.example.com/in", True),
    ("https://edp:s3cret@hooks.example.com/in", False),
    ("http://edp:s3cret@127.0.0.1:9000/in", False),
    ("http://edp:s3cret@[::1]:9000/in", False),
    ("http://hooks.example.com/in", False),
])
def test_credentials_over_plain_http_are_warned_about(
    caplog: pytest.LogCaptureFixture, url: str, warned: bool
) -> None:
    with caplog.at_level(logging.WARNING, logger="edp.sinks.webhook"):
        WebhookSink(url, secret="a-secret")
    said = [r.getMessage() for r in caplog.records if "plain http" in r.getMessage()]
    assert bool(said) is warned
    # (and never with the password)
    assert not any("s3cret" in r.getMessage() for r in caplog.records)
