"""Hiding secrets in URLs before they reach logs, errors or ``edp config``."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit

_URL = re.compile(r"(?<![a-zA-Z0-9+.-])[0-9+.-]*+[a-zA-Z][a-zA-Z0-9+.-]*+://"
                  r"(?:[^\s:/?#@]*:[^\r\n/]*@(?=[^\s@]))?\S+")
"""A URL inside a text. A ``user:password@`` part may hold spaces (a password typed
unencoded: libpq refuses it, and its error must not show it), up to the last ``@`` of
the line that no ``/`` precedes. (Its scheme is looked for only where a word begins,
read without backtracking: tried at every letter of a long word, each try reading to
the word's end, it took seconds on a 40 kB line.)"""
_SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*+://")
_NOT_IN_USER = frozenset(":/?#@") | frozenset(" \t\f\v")
_PLAIN_PARAMETERS = frozenset({"sslmode", "connect_timeout", "target_session_attrs",
                               "application_name", "keepalives", "keepalives_idle",
                               "keepalives_interval", "keepalives_count", "tcp_user_timeout"})
"""Query parameters shown as they are (libpq's, that hold no secret): every other
parameter's value is masked."""
_TRAILING = "'\")]},;.:"
"""Characters that end a URL quoted in a message (``'postgresql://...'``) rather than
belong to it: left out of the URL only at its very end, so a quote *inside* a password
is still part of the URL that gets masked."""
_KEYWORD_PASSWORD = re.compile(r"\b(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s'\"]+)", re.I)
"""``password=...`` in a libpq keyword/value connection string."""


def redact_url(url: str) -> str:
    """``url`` with its password (or a user name without one: a token) and query values
    masked (``***``) and no fragment.

    The user information is everything up to the *last* ``@`` of the URL: libpq (and
    people) accept passwords holding ``#``, ``?``, ``/`` or quotes unencoded, which
    would end it early for :func:`urllib.parse.urlsplit`. So a URL with an ``@`` in its
    path or query is masked up to there too: more hidden, never less.

    >>> redact_url("postgresql://edp:s3cret@db:5432/edp?sslmode=require")
    'postgresql://edp:***@db:5432/edp?sslmode=***'
    >>> redact_url("postgresql://edp:a#b?c@db/edp")
    'postgresql://edp:***@db/edp'
    """
    if "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    if scheme.lower() == "sqlite":  # a file path: no user, no secret
        return url
    userinfo, at, after = rest.rpartition("@")
    shown = ""
    if at:
        user = userinfo.split(":", 1)[0]
        # (a "user" holding "@" or "/" is not one: a token, then more of the URL)
        shown = f"{user}:***@" if ":" in userinfo and not set("@/") & set(user) else "***@"
    after = after.split("#", 1)[0]
    location, question, query = after.partition("?")
    if question:
        try:
            pairs = parse_qsl(query, keep_blank_values=True)
        except ValueError:
            pairs = [("***", "")]
        query = urlencode([(k, v if k in _PLAIN_PARAMETERS else "***") for k, v in pairs],
                          safe="*")
    return f"{scheme}://{shown}{location}{question}{query}"


def redact_endpoint(url: str) -> str:
    """Only the scheme and host of ``url`` (its path may be a token, as in chat webhooks).

    >>> redact_endpoint("https://hooks.example.com/services/T0/B0/s3cret?x=1")
    'https://hooks.example.com/...'
    """
    schemeless = "//" not in url  # ('example.com/hook': its host as the user wrote it)
    try:
        parts = urlsplit("//" + url if schemeless else url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "***"
    rest = "/..." if parts.path.strip("/") or parts.query else ""
    return f"{'' if schemeless else parts.scheme + '://'}{host}{port}{rest}"


def redact_text(text: str) -> str:
    """Every URL inside ``text`` redacted with :func:`redact_url`, and every libpq
    ``password=`` value masked."""
    # (redact_url masks up to the last "@")
    text = redact_url(text) if _is_one_url(text) else _URL.sub(_redact_match, text)
    return _KEYWORD_PASSWORD.sub(lambda match: match.group(1) + "***", text)


def _is_one_url(text: str) -> bool:
    """Whether ``text``, holding spaces, is one URL (a setting's value) whose user
    information holds them: up to its last ``@``, which nothing but the host, path and
    query follow, it is ``user:password`` (the password any character but a line
    break, spaces and ``/`` together too) or a token without ``/``, ``?`` or ``#``. A
    message that merely begins with a URL (``https://host/x?y=1 and user@example.com``)
    is not one: its words are not a password."""
    scheme = _SCHEME.match(text)
    if scheme is None or "\n" in text or "\r" in text or not any(c.isspace() for c in text):
        return False
    userinfo, at, after = text[scheme.end():].rpartition("@")
    if not at or any(c.isspace() for c in after):
        return False
    user, colon, _ = userinfo.partition(":")
    if colon:
        return not _NOT_IN_USER & set(user)
    return not set("/?#") & set(userinfo)


def _redact_match(match: re.Match[str]) -> str:
    found = match.group(0)
    url = found.rstrip(_TRAILING)
    return redact_url(url) + found[len(url):]
