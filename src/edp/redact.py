"""Hiding secrets in URLs before they reach logs, errors or ``edp config``."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"]+")


def redact_url(url: str) -> str:
    """``url`` with its password and query values masked (``***``) and no fragment.

    >>> redact_url("postgresql://edp:s3cret@db:5432/edp?sslmode=require")
    'postgresql://edp:***@db:5432/edp?sslmode=***'
    """
    try:
        parts = urlsplit(url)
        if parts.password is None and not parts.query and not parts.fragment:
            return url
        netloc = parts.netloc
        if parts.password is not None:
            userinfo, host = netloc.rsplit("@", 1)
            netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
        query = urlencode([(k, "***") for k, _ in parse_qsl(parts.query, keep_blank_values=True)],
                          safe="*")
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    except ValueError:  # not a URL we can parse: hide it all but the scheme
        return url.split("://", 1)[0] + "://***" if "://" in url else "***"


def redact_text(text: str) -> str:
    """Every URL inside ``text`` redacted with :func:`redact_url`."""
    return _URL.sub(lambda match: redact_url(match.group(0)), text)
