"""Hiding secrets in URLs before they reach logs, errors or ``edp config``."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"]+")
_KEYWORD_PASSWORD = re.compile(r"\b(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s'\"]+)", re.I)
"""``password=...`` in a libpq keyword/value connection string."""


def redact_url(url: str) -> str:
    """``url`` with its password (or a user name without one: a token) and query values
    masked (``***``) and no fragment.

    >>> redact_url("postgresql://edp:s3cret@db:5432/edp?sslmode=require")
    'postgresql://edp:***@db:5432/edp?sslmode=***'
    """
    try:
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else None
        if userinfo is None and not parts.query and not parts.fragment:
            return url
        netloc = parts.netloc
        if userinfo is not None:
            host = netloc.rsplit("@", 1)[1]
            shown = f"{userinfo.split(':', 1)[0]}:***" if parts.password is not None else "***"
            netloc = f"{shown}@{host}"
        query = urlencode([(k, "***") for k, _ in parse_qsl(parts.query, keep_blank_values=True)],
                          safe="*")
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    except ValueError:  # not a URL we can parse: hide it all but the scheme
        return url.split("://", 1)[0] + "://***" if "://" in url else "***"


def redact_endpoint(url: str) -> str:
    """Only the scheme and host of ``url`` (its path may be a token, as in chat webhooks).

    >>> redact_endpoint("https://hooks.example.com/services/T0/B0/s3cret?x=1")
    'https://hooks.example.com/...'
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "***"
    rest = "/..." if parts.path.strip("/") or parts.query else ""
    return f"{parts.scheme}://{host}{port}{rest}"


def redact_text(text: str) -> str:
    """Every URL inside ``text`` redacted with :func:`redact_url`, and every libpq
    ``password=`` value masked."""
    text = _URL.sub(lambda match: redact_url(match.group(0)), text)
    return _KEYWORD_PASSWORD.sub(lambda match: match.group(1) + "***", text)
