"""Which bind addresses count as loopback (no token needed) for `edp serve`."""

from __future__ import annotations

import pytest

from edp.net import is_loopback


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.1.2.3", True), ("localhost", True), ("::1", True),
    ("[::1]", True),
    ("0.0.0.0", False), ("", False), ("10.0.0.1", False), ("::", False),
    ("127.example.com", False),  # a name is not resolved: it may point anywhere
])
def test_only_loopback_literals_and_localhost_count(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
