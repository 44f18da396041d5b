"""Notifications about packages that did not go where they should (SNS, webhook).

A :class:`Notice` says what failed, where, and links to the package in the
catalog (``{catalog_url}/b/{bucket}/packages/{name}``) when it landed somewhere.
:class:`SnsNotifier` publishes text with a subject that SNS accepts (printable
ASCII, no line breaks, under 100 characters: :func:`sns_subject`);
:class:`WebhookNotifier` POSTs the notice as JSON, signed and retried like the
webhook sink's events. A notifier never raises: a
failed notification is logged and returned, so a package outcome is never lost
because a notification could not be sent.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
import urllib.error
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from edp.config import Settings
from edp.sinks.webhook import check_url, is_retryable, post, post_opener, signature

log = logging.getLogger(__name__)

MAX_SUBJECT = 99
MAX_ERROR_TEXT = 20_000


@dataclass(frozen=True, slots=True)
class Notice:
    """What happened to one batch's package."""

    kind: str
    """``package-quarantined`` or ``package-failed``."""
    package: str
    bucket: str
    prefix: str
    registry: str
    error: str
    landed_in: str | None = None
    url: str | None = None
    workflow: str | None = None
    batch_id: str | None = None
    event_id: str | None = None
    source: str | None = None
    """Where the files are (``s3://bucket/prefix/``, or a local folder in local mode)."""

    def subject(self) -> str:
        """A one-line summary."""
        verb = "quarantined" if self.kind == "package-quarantined" else "failed"
        return f"edp: package {self.package} {verb} ({self.bucket}/{self.prefix})"

    def text(self) -> str:
        """The human-readable body (SNS message, e-mail)."""
        lines = [
            f"Package {self.package} from {self.source or f's3://{self.bucket}/{self.prefix}'} "
            f"could not be pushed to {self.registry}"
            + (f" (workflow {self.workflow})" if self.workflow else "") + ".",
        ]
        if self.landed_in:
            lines.append(f"It was pushed to {self.landed_in} instead.")
        if self.url:
            lines.append(self.url)
        if self.batch_id:
            lines.append(f"Batch: {self.batch_id}")
        lines += ["", "Error:", self.error[:MAX_ERROR_TEXT]]
        return "\n".join(lines) + "\n"

    def as_dict(self) -> dict[str, Any]:
        """The notice as a JSON object (webhook body)."""
        body = asdict(self)
        body["error"] = self.error[:MAX_ERROR_TEXT]
        body["subject"] = self.subject()
        return body


def catalog_link(catalog_url: str | None, bucket: str | None, package: str) -> str | None:
    """``{catalog_url}/b/{bucket}/packages/{name}``, or None without a catalog URL or a
    bucket (a local registry, which no catalog shows)."""
    if not catalog_url or not bucket:
        return None
    return f"{catalog_url.rstrip('/')}/b/{bucket}/packages/{package}"


def sns_subject(text: str) -> str:
    """``text`` as a valid SNS subject: printable ASCII, one line, < 100 characters."""
    decomposed = unicodedata.normalize("NFKD", text)
    bare = "".join(c for c in decomposed if not unicodedata.combining(c))
    ascii_text = bare.encode("ascii", "replace").decode()
    line = re.sub(r"[^\x20-\x7e]+", " ", ascii_text)
    line = re.sub(r" {2,}", " ", line).strip()
    if len(line) > MAX_SUBJECT:
        line = line[: MAX_SUBJECT - 3].rstrip() + "..."
    return line or "edp notification"


class Notifier(Protocol):
    """Sends notices; returns the errors of the channels that failed (empty: all sent)."""

    def notify(self, notice: Notice) -> list[str]:
        """Send ``notice``; never raises."""
        ...


class SnsNotifier:
    """Publishes notices to an SNS topic."""

    def __init__(self, topic_arn: str, *, client_factory: Callable[[], Any] | None = None) -> None:
        self.topic_arn = topic_arn
        self._client_factory = client_factory or (lambda: _sns_client(topic_arn))
        self._client: Any = None

    def notify(self, notice: Notice) -> list[str]:
        """Publish the notice's text with a valid subject."""
        try:
            if self._client is None:
                self._client = self._client_factory()
            self._client.publish(
                TopicArn=self.topic_arn,
                Subject=sns_subject(notice.subject()),
                Message=notice.text(),
            )
        except Exception as exc:  # a boundary: the notification is best effort  # noqa: BLE001
            log.warning("SNS notification to %s failed: %s", self.topic_arn, exc)
            return [f"sns: {exc}"]
        return []


class WebhookNotifier:
    """POSTs notices as JSON to a URL (which may hold a token: it is never logged).

    Signed like the webhook sink's events (``X-Edp-Signature: sha256=<hex HMAC of the
    body>`` with ``webhook_secret``) when a secret is set. A connection error, a 5xx,
    408 or 429 answer is tried again, ``attempts`` times in all with a short
    exponential back-off; a redirect is an answer, not followed.
    """

    def __init__(
        self, url: str, *, secret: str | None = None, timeout: float = 10.0,
        attempts: int = 3, backoff: float = 0.5,
    ) -> None:
        # (tenacity is an extra's: imported here, not with the module, which the
        # settings' check of package_name_template imports on every command)
        from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

        check_url(url, "notify_webhook_url")
        parts = urlsplit(url)
        self.url = url
        self.host = parts.hostname or "?"
        self.timeout = timeout
        self._secret = secret
        self._opener = post_opener()
        self._retrying = Retrying(
            retry=retry_if_exception_type(_Transient),
            stop=stop_after_attempt(max(1, attempts)),
            wait=wait_exponential(multiplier=backoff, max=10 * backoff),
            reraise=True,
        )

    def notify(self, notice: Notice) -> list[str]:
        """POST the notice; any 2xx answer counts as delivered."""
        body = json.dumps(notice.as_dict()).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "edp"}
        if self._secret is not None:
            headers["X-Edp-Signature"] = signature(body, self._secret)
        try:
            status = self._retrying(self._post, body, headers)
        except _Transient as exc:
            log.warning("webhook notification to %s failed: %s", self.host, exc)
            return [f"webhook: {exc}"]
        if not 200 <= status < 300:
            log.warning("webhook notification to %s answered %d", self.host, status)
            return [f"webhook: HTTP {status}"]
        return []

    def _post(self, body: bytes, headers: dict[str, str]) -> int:
        """One attempt: the HTTP status, or :class:`_Transient` when another may succeed."""
        try:
            status = post(self._opener, self.url, body, headers, self.timeout)
        except (urllib.error.URLError, OSError) as exc:
            # The reason names the failure, never the URL (it may hold a token): the
            # error's type, or the text edp's post gave it (which holds no URL).
            reason = getattr(exc, "reason", exc)
            raise _Transient(reason if isinstance(reason, str) else type(reason).__name__
                             ) from None
        if is_retryable(status):
            raise _Transient(f"HTTP {status}")
        return status


class _Transient(Exception):
    """An attempt that a later one may fix."""


class FanOut:
    """Several notifiers as one."""

    def __init__(self, notifiers: Sequence[Notifier]) -> None:
        self.notifiers = list(notifiers)

    def notify(self, notice: Notice) -> list[str]:
        """Send to every notifier; collect their errors."""
        errors: list[str] = []
        for notifier in self.notifiers:
            errors += notifier.notify(notice)
        return errors


def build_notifier(settings: Settings) -> FanOut:
    """The notifiers the settings ask for (``notify_sns_topic``, ``notify_webhook_url``)."""
    notifiers: list[Notifier] = []
    if settings.notify_sns_topic:
        notifiers.append(SnsNotifier(settings.notify_sns_topic))
    if settings.notify_webhook_url:
        secret = settings.webhook_secret
        notifiers.append(WebhookNotifier(
            settings.notify_webhook_url,
            secret=secret.get_secret_value() if secret is not None else None,
        ))
    return FanOut(notifiers)


def _sns_client(topic_arn: str) -> Any:
    from edp.aws.clients import client

    parts = topic_arn.split(":")  # arn:aws:sns:<region>:<account>:<name>
    region = parts[3] if len(parts) > 5 and parts[3] else None
    return client("sns", region=region)


__all__ = ["FanOut", "Notice", "Notifier", "SnsNotifier", "WebhookNotifier", "build_notifier",
           "catalog_link", "sns_subject"]
