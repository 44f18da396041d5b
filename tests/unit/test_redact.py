"""Secrets in URLs never reach logs, errors or ``edp config``."""

from __future__ import annotations

import pytest

from edp.redact import redact_text, redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://edp:s3cret@db:5432/edp", "postgresql://edp:***@db:5432/edp"),
        ("https://hooks.example/in?token=abc&x=1", "https://hooks.example/in?token=***&x=***"),
        ("https://user:pw@hooks.example/p#frag", "https://user:***@hooks.example/p"),
        ("sqlite:////tmp/edp.db", "sqlite:////tmp/edp.db"),
        ("https://hooks.example/plain", "https://hooks.example/plain"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redact_text_finds_urls_inside_messages() -> None:
    text = "cannot reach postgresql://a:b@h/db (timeout); retry https://x/y?key=k"
    assert redact_text(text) == "cannot reach postgresql://a:***@h/db (timeout); retry https://x/y?key=***"
