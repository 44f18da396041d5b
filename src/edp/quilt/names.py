"""Package names from a template over the batch prefix's segments.

The template (setting ``package_name_template``, default ``{0}/{1}``) is a Python
format string: ``{0}``, ``{1}``, ... are the prefix's ``/``-separated segments,
``{bucket}`` is the bucket and ``{prefix}`` the prefix without its slashes at the ends.
A segment the prefix does not have renders as an empty string.

Quilt allows names matching ``^[\\w-]+/[\\w-]+$``. A rendered name that already
matches is used as is. Otherwise it is made valid, never refused:

1. in each ``/``-separated part, every run of other characters becomes one ``-``;
   ``-`` at the ends of a part is dropped; empty parts are dropped;
2. three or more parts: the first is the user, the rest are joined with ``-``
   (``a/b/c`` -> ``a/b-c``);
3. one part ``p``: ``edp/p``; no part at all: ``edp/<bucket>`` (made valid the same way),
   and ``edp/package`` when even that is empty.

A template that is not a valid format string, or names a field other than the
segments, ``bucket`` and ``prefix``, is a :class:`~edp.errors.ConfigError`.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

from edp.errors import ConfigError

NAME_RULE = re.compile(r"[\w-]+/[\w-]+")
"""Quilt's package name rule (matched against the whole name)."""

FALLBACK_USER = "edp"
_INVALID = re.compile(r"[^\w-]+")
_FIELDS = frozenset({"bucket", "prefix"})


class _SegmentFormatter(string.Formatter):
    """``str.format`` where a missing positional segment renders as ``""``."""

    def get_value(self, key: int | str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        if isinstance(key, int):
            return args[key] if key < len(args) else ""
        if key not in _FIELDS:
            raise KeyError(key)
        return kwargs[key]


_FORMATTER = _SegmentFormatter()


_PLAIN_FIELD = re.compile(r"\d*|bucket|prefix")
"""A field a template may name: a segment number (or ``{}``, the next one),
``bucket`` or ``prefix``, as such (no attribute or index access such as
``{0.__class__}`` or ``{0[0]}``)."""


def template_problem(template: str) -> str | None:
    """Why ``template`` is not a usable package name template, or None: it must render
    for a sample prefix and name only segment numbers, ``bucket`` and ``prefix``,
    without conversions or format specifications."""
    try:
        for _, field, spec, conversion in _FORMATTER.parse(template):
            if field is None:
                continue
            if not _PLAIN_FIELD.fullmatch(field) or spec or conversion:
                raise ValueError(f"field {{{field}{'!' + conversion if conversion else ''}"
                                 f"{':' + spec if spec else ''}}} is not a plain segment "
                                 "number, bucket or prefix")
        _FORMATTER.format(template, "a", "b", bucket="bucket", prefix="a/b")
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        return (f"{template!r} is not usable: {_reason(exc)}; use {{0}}, {{1}}, ... for prefix "
                "segments and {bucket} or {prefix}, e.g. '{0}/{1}'")
    return None


def check_template(template: str) -> None:
    """Raise :class:`ConfigError` unless ``template`` is usable (:func:`template_problem`;
    settings are checked when loaded: this guards templates given by other code)."""
    problem = template_problem(template)
    if problem is not None:
        raise ConfigError(f"package_name_template {problem}")


def render(template: str, bucket: str, prefix: str) -> str:
    """The template rendered for (bucket, prefix), before it is made valid."""
    stripped = prefix.strip("/")
    segments = [s for s in stripped.split("/") if s] if stripped else []
    try:
        return _FORMATTER.format(template, *segments, bucket=bucket, prefix=stripped)
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise ConfigError(f"package_name_template {template!r} is not usable: "
                          f"{_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    """The message of a template's error, not its repr (``ValueError('...')``); a
    KeyError's text is only the key's repr: it says which field is unknown."""
    if isinstance(exc, KeyError):
        return f"no field {{{exc.args[0] if exc.args else ''}}}"
    return str(exc) or type(exc).__name__


def _clean(part: str) -> str:
    return _INVALID.sub("-", part).strip("-")


def make_valid(name: str, *, bucket: str) -> str:
    """``name`` if Quilt accepts it, else the valid name the rules above give."""
    if NAME_RULE.fullmatch(name):
        return name
    parts = [cleaned for part in name.split("/") if (cleaned := _clean(part))]
    if len(parts) >= 2:
        return f"{parts[0]}/{'-'.join(parts[1:])}"
    if len(parts) == 1:
        return f"{FALLBACK_USER}/{parts[0]}"
    return f"{FALLBACK_USER}/{_clean(bucket) or 'package'}"


def package_name(template: str, bucket: str, prefix: str) -> str:
    """The package name of the batch (bucket, prefix): rendered, then made valid."""
    return make_valid(render(template, bucket, prefix), bucket=bucket)


def is_valid(name: str) -> bool:
    """Whether Quilt accepts ``name``."""
    return NAME_RULE.fullmatch(name) is not None


__all__ = ["FALLBACK_USER", "NAME_RULE", "check_template", "is_valid", "make_valid",
           "package_name", "render"]
