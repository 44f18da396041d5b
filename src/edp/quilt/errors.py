"""The errors of packaging, below :class:`edp.errors.EdpError`::

    EdpError
    └── PackagingError       a batch could not be turned into a package
        ├── InvalidRequest   the input is not a package-objects-ready event (never retried)
        ├── MetadataError    the metadata file is missing (when required) or broken
        └── PublishError     the registry refused or failed the push/build (may be retried)

``retryable`` says whether trying the same event again later may succeed.
"""

from __future__ import annotations

from edp.errors import EdpError


class PackagingError(EdpError):
    """A batch could not be packaged; the message names bucket, prefix and package."""

    retryable = False


class InvalidRequest(PackagingError):
    """The input is not a ``package-objects-ready`` event edp can package.

    ``bucket``, ``prefix``, ``batch_id`` and ``event_id`` are what the input said
    (text only), so that the failure can be told apart from others."""

    bucket = ""
    prefix = ""
    batch_id: str | None = None
    event_id: str | None = None


class MetadataError(PackagingError):
    """The metadata file of a prefix is broken, or missing while required."""


class PublishError(PackagingError):
    """Pushing or building the package failed (S3 errors, a broken registry)."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable
